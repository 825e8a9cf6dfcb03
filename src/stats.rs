//! The replicator's counters: one set for the whole fleet, written by every
//! stage (scans and cold uploads in the daemon, WAL shipping in capture) and
//! read by the operations server. It sits below every stage so that each can
//! count without depending on the daemon that owns the loop.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared with the operations surface. Aggregates only: nothing
/// here grows with the number of databases.
#[derive(Debug, Default)]
pub struct Stats {
    pub started_unix: AtomicU64,
    pub scans: AtomicU64,
    pub databases: AtomicU64,
    /// Databases in the hot tier (WAL streaming); the rest are cold.
    pub hot: AtomicU64,
    pub pending: AtomicU64,
    pub uploads_ok: AtomicU64,
    pub uploads_failed: AtomicU64,
    /// Snapshots that failed at the source (a database locked, damaged or
    /// unreadable), not at the store: no upload was tried.
    pub snapshots_failed: AtomicU64,
    /// Unix seconds of the first failed upload since the last one that
    /// succeeded; 0 while the last upload succeeded (see
    /// [`Stats::upload_ok`]). `/healthz` fails when it is too old: the store
    /// takes nothing.
    pub uploads_failing_since_unix: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub last_scan_micros: AtomicU64,
    pub last_scan_unix: AtomicU64,
    /// When the loop last showed progress: a scan completed, or an upload
    /// ended (landed or failed). `/healthz` reads it, so a long cycle (a
    /// first backup) that keeps uploading is healthy.
    pub last_progress_unix: AtomicU64,
    pub oldest_pending_unix: AtomicU64,
    pub retention_deleted: AtomicU64,
    /// Retention passes that failed (a listing or a delete the store
    /// refused), and whether the last one did (1) or not (0).
    pub retention_failures: AtomicU64,
    pub retention_last_failed: AtomicU64,
    /// Promotions to and demotions from the hot tier.
    pub hot_promotions: AtomicU64,
    pub hot_demotions: AtomicU64,
    /// WAL segments and bytes (uncompressed frames) shipped.
    pub wal_segments: AtomicU64,
    pub wal_bytes: AtomicU64,
    /// WAL generations started (each with a snapshot).
    pub generations: AtomicU64,
    /// Our own checkpoints of hot databases.
    pub checkpoints: AtomicU64,
    /// WAL parts shipped beyond a sync's first because the stream was
    /// behind its writer (see `crate::capture::ship::CATCH_UP_PARTS`).
    pub wal_catch_up_parts: AtomicU64,
    /// Failed hot syncs (retried every sync interval).
    pub hot_errors: AtomicU64,
    /// Fleet log objects written, consolidated packs written, and log
    /// objects deleted once consolidated (see [`crate::capture::fleetlog`]).
    pub log_objects: AtomicU64,
    pub log_packs: AtomicU64,
    pub log_deleted: AtomicU64,
    /// Databases refused because another database owns their key (see
    /// [`crate::source::keys`]).
    pub key_collisions: AtomicU64,
    /// Databases refused because their key breaks the key rule `restore`
    /// applies (an empty, `.` or `..` segment; see [`crate::source::keys`]).
    pub invalid_keys: AtomicU64,
    /// Directories watched for change notifications.
    pub watched_dirs: AtomicU64,
    /// Re-checks of databases named by change notifications that found a
    /// change (each is a cycle without a scan).
    pub rechecks: AtomicU64,
    /// Restore drills run by `verify-interval` (the daemon's
    /// `verify_loop`), and the last one's end
    /// (unix seconds, 0 before the first) and counts; `verify_last_failed`
    /// is 1 when the last drill could not run at all.
    pub verify_runs: AtomicU64,
    pub verify_last_unix: AtomicU64,
    pub verify_last_ok: AtomicU64,
    pub verify_last_problems: AtomicU64,
    pub verify_last_unverifiable: AtomicU64,
    pub verify_last_failed: AtomicU64,
}

impl Stats {
    /// Counts an upload (snapshot, segment or log object) that succeeded.
    /// Records that the loop made progress now (see
    /// [`Stats::last_progress_unix`]).
    pub fn progressed(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs().max(1));
        self.last_progress_unix.fetch_max(now, Ordering::Relaxed);
    }

    pub fn upload_ok(&self) {
        self.uploads_ok.fetch_add(1, Ordering::Relaxed);
        self.progressed();
        self.store_took_a_write();
    }

    /// The store took a write (an upload, a WAL segment): a failing stretch
    /// ends.
    pub fn store_took_a_write(&self) {
        self.uploads_failing_since_unix.store(0, Ordering::Relaxed);
    }

    /// Counts an upload the store did not take (not a source that could not
    /// be read); the first since the last success starts the failing
    /// stretch.
    pub fn upload_failed(&self) {
        self.uploads_failed.fetch_add(1, Ordering::Relaxed);
        self.progressed();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs().max(1));
        let _ = self.uploads_failing_since_unix.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}
