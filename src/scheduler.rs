//! The replicate loop: scan, upload what changed, retry what failed, stop cleanly.
//!
//! One [`Replicator`] serves the whole fleet. Each cycle
//!
//! 1. runs a [`Tracker::scan`] on the blocking pool (pure `stat` work),
//! 2. takes every pending database and uploads it through a [`JoinSet`] that
//!    never holds more than `max-concurrent` tasks (so memory, temp disk and
//!    open files are bounded however many databases changed at once),
//! 3. records each outcome: success marks the database synced *as of the scan
//!    that selected it*; failure leaves it pending, so the next cycle retries it.
//!
//! Shutdown (SIGINT/SIGTERM, see [`crate::cli`]) cancels a token: no new
//! upload starts, uploads already running are finished, then `run` returns.
//! Retention runs beside the loop on its own interval.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::Loaded;
use crate::layout;
use crate::retention;
use crate::snapshot;
use crate::storage::Replica;
use crate::track::{ScanReport, Ticket, Tracker};
use crate::{Error, Result};

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
    pub bytes_uploaded: AtomicU64,
    pub last_scan_micros: AtomicU64,
    pub last_scan_unix: AtomicU64,
    pub oldest_pending_unix: AtomicU64,
    pub retention_deleted: AtomicU64,
}

/// What one cycle did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CycleReport {
    pub scan: ScanReport,
    pub uploaded: usize,
    pub failed: usize,
    pub bytes: u64,
    /// Shutdown was requested before every pending database was dispatched.
    pub interrupted: bool,
}

/// The fleet replicator.
pub struct Replicator {
    loaded: Arc<Loaded>,
    replica: Replica,
    tracker: Arc<Mutex<Tracker>>,
    stats: Arc<Stats>,
    temp_dir: PathBuf,
    state_file: PathBuf,
    /// Databases whose last upload failed, so a failure that repeats every
    /// cycle (permission denied, a corrupt file, a full disk) is logged once
    /// at warn and then at debug until the database recovers.
    /// Holds only failing databases, so it is empty in a healthy fleet.
    failing: Mutex<HashSet<PathBuf>>,
}

/// At most this many individual upload failures are logged per cycle; the
/// rest are counted in the cycle summary. An S3 outage fails every pending
/// database at once, and 100,000 identical lines help nobody.
const FAILURE_LINES_PER_CYCLE: usize = 20;

fn lock(t: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    // A panic while holding the lock cannot leave the table half-updated in a
    // way that loses data (the worst case is a redundant upload), so go on.
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replicator {
    pub fn new(loaded: Loaded) -> Result<Replicator> {
        let replica = Replica::for_config(&loaded)?;
        Self::with_replica(loaded, replica)
    }

    /// A replicator writing to an already built replica (the soak benchmark
    /// wraps the store to inject faults).
    pub fn with_replica(loaded: Loaded, replica: Replica) -> Result<Replicator> {
        // Staging files live in a directory of their own per replica set-up
        // (the lease guarantees one process per replica root), so whatever a
        // killed predecessor left there can be removed at start.
        let temp_dir = loaded
            .temp_dir()
            .join(format!("{:016x}", loaded.state_tag()));
        match std::fs::remove_dir_all(&temp_dir) {
            Ok(()) => tracing::debug!(dir = %temp_dir.display(), "removed stale staging files"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %temp_dir.display(), error = %e, "cannot clean staging directory")
            }
        }
        let state_file = loaded.state_file();
        let mut tracker = Tracker::new();
        match tracker.load_state(&state_file, loaded.state_tag()) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(records = n, file = %state_file.display(), "loaded upload records")
            }
            Err(e) => tracing::warn!(
                file = %state_file.display(),
                error = %e,
                "cannot read upload records; every database will be uploaded once"
            ),
        }
        let stats = Stats::default();
        stats.started_unix.store(
            chrono::Utc::now().timestamp().max(0) as u64,
            Ordering::Relaxed,
        );
        Ok(Replicator {
            loaded: Arc::new(loaded),
            replica,
            tracker: Arc::new(Mutex::new(tracker)),
            stats: Arc::new(stats),
            temp_dir,
            state_file,
            failing: Mutex::new(HashSet::new()),
        })
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Number of databases currently tracked.
    pub fn tracked(&self) -> usize {
        lock(&self.tracker).len()
    }

    /// One scan and the uploads it calls for.
    pub async fn cycle(&self, shutdown: &CancellationToken) -> CycleReport {
        let tracker = self.tracker.clone();
        let loaded = self.loaded.clone();
        let (scan, took) = tokio::task::spawn_blocking(move || {
            crate::track::timed(|| lock(&tracker).scan(&loaded.patterns))
        })
        .await
        .expect("scan task panicked");
        self.stats.scans.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_scan_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.stats
            .databases
            .store(scan.databases as u64, Ordering::Relaxed);
        tracing::debug!(
            databases = scan.databases,
            new = scan.new,
            changed = scan.changed,
            removed = scan.removed,
            pending = scan.pending,
            took_ms = took.as_millis() as u64,
            "scan complete"
        );

        let mut report = CycleReport {
            scan,
            ..Default::default()
        };
        let pending = lock(&self.tracker).pending();
        let max = self.loaded.multi_db().max_concurrent;
        let mut set: JoinSet<(Ticket, PathBuf, Result<u64>)> = JoinSet::new();
        for id in pending {
            if shutdown.is_cancelled() {
                report.interrupted = true;
                break;
            }
            while set.len() >= max {
                if let Some(done) = set.join_next().await {
                    self.reap(done, &mut report);
                }
            }
            let (ticket, path) = {
                let mut t = lock(&self.tracker);
                (t.begin_upload(id), t.path(id))
            };
            let job = upload_one(
                self.loaded.clone(),
                self.replica.clone(),
                path.clone(),
                self.temp_dir.clone(),
            );
            set.spawn(async move {
                let r = AssertUnwindSafe(job)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::invalid(path.display(), "upload task panicked"))
                    });
                (ticket, path, r)
            });
        }
        while let Some(done) = set.join_next().await {
            self.reap(done, &mut report);
        }
        let pending = {
            let t = lock(&self.tracker);
            let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            // Forget failures of databases that left the table (deleted, renamed).
            failing.retain(|path| t.find(path).is_some());
            drop(failing);
            let pending = t.pending_count();
            self.stats.pending.store(pending as u64, Ordering::Relaxed);
            self.stats
                .oldest_pending_unix
                .store(t.oldest_pending().unwrap_or(0) as u64, Ordering::Relaxed);
            pending
        };
        self.stats.last_scan_unix.store(
            chrono::Utc::now().timestamp().max(0) as u64,
            Ordering::Relaxed,
        );
        self.save_state().await;
        if report.uploaded + report.failed > 0 {
            tracing::info!(
                uploaded = report.uploaded,
                failed = report.failed,
                bytes = report.bytes,
                pending,
                "cycle complete"
            );
        }
        report
    }

    fn reap(
        &self,
        done: std::result::Result<(Ticket, PathBuf, Result<u64>), tokio::task::JoinError>,
        report: &mut CycleReport,
    ) {
        // The task body never panics through (catch_unwind above); a JoinError here
        // would mean the runtime is shutting down, and the ticket is lost with it.
        let Ok((ticket, path, result)) = done else {
            return;
        };
        let ok = result.is_ok();
        match result {
            Ok(bytes) => {
                report.uploaded += 1;
                report.bytes += bytes;
                self.stats.uploads_ok.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_uploaded
                    .fetch_add(bytes, Ordering::Relaxed);
                let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
                if !failing.is_empty() && failing.remove(&path) {
                    tracing::debug!(path = %path.display(), "upload recovered");
                }
            }
            Err(e) => {
                report.failed += 1;
                self.stats.uploads_failed.fetch_add(1, Ordering::Relaxed);
                let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
                // Once per failing stretch: messages can differ between
                // attempts (staging file names), the problem usually does not.
                let repeated = !failing.insert(path.clone());
                if repeated || report.failed > FAILURE_LINES_PER_CYCLE {
                    tracing::debug!(path = %path.display(), error = %e, "upload failed again; will retry next cycle");
                } else {
                    tracing::warn!(path = %path.display(), error = %e, "upload failed; will retry next cycle (logged once until it recovers)");
                }
            }
        }
        lock(&self.tracker).finish_upload(ticket, ok);
    }

    /// Persists upload records if they changed (a failure only costs re-uploads after a restart).
    async fn save_state(&self) {
        let tracker = self.tracker.clone();
        let file = self.state_file.clone();
        let tag = self.loaded.state_tag();
        let r = tokio::task::spawn_blocking(move || {
            let mut t = lock(&tracker);
            if t.state_dirty() {
                t.save_state(&file, tag).map_err(|e| (file, e))
            } else {
                Ok(())
            }
        })
        .await;
        if let Ok(Err((file, e))) = r {
            tracing::warn!(file = %file.display(), error = %e, "cannot save upload records");
        }
    }

    /// One retention pass.
    pub async fn retention(&self) -> Result<retention::RetentionReport> {
        let r = retention::enforce(
            &self.replica,
            self.loaded.multi_db().replica.retention,
            chrono::Utc::now(),
        )
        .await?;
        self.stats
            .retention_deleted
            .fetch_add(r.deleted as u64, Ordering::Relaxed);
        Ok(r)
    }

    /// Runs cycles every `scan-interval` until `shutdown` (or once), with retention beside.
    pub async fn run(self: Arc<Self>, once: bool, shutdown: CancellationToken) -> Result<()> {
        let m = self.loaded.multi_db();
        tracing::info!(
            replica = %self.replica,
            patterns = m.patterns.len(),
            scan_interval = ?m.scan_interval,
            max_concurrent = m.max_concurrent,
            "replicating"
        );
        if once {
            let r = self.cycle(&shutdown).await;
            if !shutdown.is_cancelled() {
                log_retention(self.retention().await);
            }
            tracing::info!(
                databases = r.scan.databases,
                uploaded = r.uploaded,
                failed = r.failed,
                "single cycle done"
            );
            return if r.failed > 0 {
                Err(Error::invalid(
                    "replicate --once",
                    format!("{} uploads failed", r.failed),
                ))
            } else {
                Ok(())
            };
        }
        let retention_task = {
            let me = self.clone();
            let token = shutdown.clone();
            let every = m.replica.retention_check_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tick.tick() => log_retention(me.retention().await),
                    }
                }
            })
        };
        let mut tick = tokio::time::interval(m.scan_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.cycle(&shutdown).await;
        }
        let _ = retention_task.await;
        tracing::info!("shut down cleanly: in-flight uploads finished");
        Ok(())
    }
}

fn log_retention(r: Result<retention::RetentionReport>) {
    match r {
        Ok(r) if r.deleted > 0 => {
            tracing::info!(deleted = r.deleted, examined = r.examined, "retention pass")
        }
        Ok(r) => tracing::debug!(examined = r.examined, "retention pass: nothing to delete"),
        Err(e) => tracing::warn!(error = %e, "retention pass failed; will retry next interval"),
    }
}

/// The object key (`<rendered template>`) and stem of a database path.
pub fn key_for(loaded: &Loaded, path: &Path) -> Option<(String, String)> {
    let name = path.file_name()?.to_str()?;
    let stem = layout::stem(name).to_string();
    loaded.patterns.iter().find_map(|p| {
        let caps = p.captures(path)?;
        Some((loaded.template.render(&caps, &stem), stem.clone()))
    })
}

/// Snapshot one database and upload it under its next-hour name.
async fn upload_one(
    loaded: Arc<Loaded>,
    replica: Replica,
    path: PathBuf,
    temp_dir: PathBuf,
) -> Result<u64> {
    let (key, stem) = key_for(&loaded, &path)
        .ok_or_else(|| Error::invalid(path.display(), "matches no pattern any more"))?;
    let taken = chrono::Utc::now();
    let src = path.clone();
    let snap = tokio::task::spawn_blocking(move || snapshot::capture(&src, &temp_dir))
        .await
        .map_err(|e| Error::invalid(path.display(), format!("snapshot task failed: {e}")))??;
    let location = layout::snapshot_path(&replica.prefix, &key, &stem, taken);
    let bytes = replica.upload_file(&location, &snap.file).await?;
    tracing::debug!(
        path = %path.display(),
        object = %location,
        db_bytes = snap.db_bytes,
        compressed = bytes,
        "uploaded snapshot"
    );
    Ok(bytes)
}
