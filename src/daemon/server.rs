//! The operations endpoint: `/healthz`, `/stats` (JSON) and `/metrics`
//! (Prometheus text), served by axum on the config's `addr` (off when unset).
//!
//! Everything served here is an aggregate read from [`Stats`] atomics: no
//! lock is taken on the database table, and no series or field is ever per
//! database, so the response size and the metric cardinality are the same for
//! ten databases and for a hundred thousand.
//!
//! Health: the loop is healthy while a scan has completed within
//! [`HEALTHY_INTERVALS`] scan intervals (counting from start-up before the
//! first scan). A stuck filesystem, a deadlock or a dead loop turns it 503;
//! so does a fleet in which the last scan found no database at all (a
//! pattern that matches nothing backs nothing up), and so does a closed
//! write fence of the replica lease ([`Fence`]): while the lease cannot be
//! renewed (the store stalls) every replica write is refused, nothing is
//! backed up, and `/healthz` says so until a renewal opens the fence again.
//! Last, every upload failing for [`HEALTHY_INTERVALS`] scan intervals (the
//! store refuses data while the lease still renews, a full replica disk)
//! is 503 until one succeeds.
//!
//! Connections: at most [`MAX_CONNECTIONS`] at once, each closed after
//! [`IDLE_TIMEOUT`] without a byte either way (`Bounded`), at the latest
//! [`CONNECTION_LIFETIME`] after it was accepted, and after its
//! response (`Connection: close`: no keep-alive, so clients that poll
//! hold a slot only while they are answered). Without a cap and a
//! timeout, connections that never sent a request were kept for good, and
//! enough of them took every file descriptor the daemon had: its scans,
//! its upload records and its lease renewals failed; with keep-alive, 32
//! polling clients held every slot (black-box probes). A stop waits at
//! most [`STOP_GRACE`] for connections still open (one sending half a
//! request held the daemon's exit).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::replica::storage::Fence;
use crate::stats::Stats;
use crate::{Error, Result};

/// A scan must complete at least once per this many scan intervals for
/// `/healthz` to say 200. Three tolerates one slow scan (a cold page cache
/// after boot, a burst of uploads) without flapping, yet flags a loop that
/// has stopped within a minute at the default 15 s interval.
pub const HEALTHY_INTERVALS: u32 = 3;

#[derive(Clone)]
struct Ops {
    stats: Arc<Stats>,
    scan_interval: Duration,
    /// The replica lease's write fence; `None` when no lease is held.
    fence: Option<Arc<Fence>>,
}

/// The `/stats` document. Ages are seconds, `null` when there is nothing to age.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatsView {
    pub databases: u64,
    pub hot: u64,
    pub cold: u64,
    pub pending: u64,
    pub uploads_ok: u64,
    pub uploads_failed: u64,
    /// Snapshots that failed at the source (locked, damaged): no upload.
    pub snapshots_failed: u64,
    pub bytes_uploaded: u64,
    pub scans: u64,
    pub last_scan_duration_seconds: f64,
    pub last_scan_age_seconds: Option<u64>,
    pub oldest_pending_age_seconds: Option<u64>,
    pub retention_deleted: u64,
    /// Retention passes that failed, and whether the last one did.
    pub retention_failures: u64,
    pub retention_last_failed: bool,
    pub hot_promotions: u64,
    pub hot_demotions: u64,
    pub wal_segments: u64,
    pub wal_bytes: u64,
    pub generations: u64,
    pub checkpoints: u64,
    /// WAL parts shipped beyond a sync's first, the stream behind its writer.
    pub wal_catch_up_parts: u64,
    pub hot_errors: u64,
    /// Fleet log objects written, consolidated packs written, log objects
    /// deleted after consolidation.
    pub log_objects: u64,
    pub log_packs: u64,
    pub log_deleted: u64,
    /// Databases refused because another database owns their key.
    pub key_collisions: u64,
    /// Databases refused because their key breaks the key rule (an empty,
    /// `.` or `..` segment).
    pub invalid_keys: u64,
    /// Directories watched for change notifications.
    pub watched_dirs: u64,
    /// Writes noticed by change notifications between scans.
    pub rechecks: u64,
    /// Restore drills run (`verify-interval`).
    pub verify_runs: u64,
    /// When the last drill ended (unix seconds); `null` before the first.
    pub verify_last_run_unix: Option<u64>,
    /// Whether the last drill proved every database it checked (no
    /// problem, none unchecked, and it ran); `null` before the first.
    pub verify_last_ok: Option<bool>,
    /// The last drill's databases by result.
    pub verify_ok: u64,
    pub verify_problems: u64,
    pub verify_could_not_check: u64,
    /// Whether the replica lease's write fence is closed, so that every
    /// replica write is refused: the lease could not be renewed before it
    /// expired locally (writes resume at the next successful renewal), or
    /// it was lost. `false` without a lease.
    pub lease_writes_paused: bool,
    /// Scans complete on schedule, the last one found a database, replica
    /// writes are not paused and uploads do not all fail (the rules of
    /// `/healthz`).
    pub healthy: bool,
}

impl StatsView {
    /// Reads the counters at `now` (unix seconds), as for a daemon without
    /// a lease; [`StatsView::with_fence`] adds the lease's write fence.
    pub fn read(stats: &Stats, scan_interval: Duration, now: u64) -> StatsView {
        use std::sync::atomic::Ordering::Relaxed;
        let databases = stats.databases.load(Relaxed);
        let hot = stats.hot.load(Relaxed).min(databases);
        let last_scan = stats.last_scan_unix.load(Relaxed);
        let oldest = stats.oldest_pending_unix.load(Relaxed);
        let age_base = |t: u64| (t > 0).then_some(t);
        let age = |t: u64| age_base(t).map(|t| now.saturating_sub(t));
        StatsView {
            databases,
            hot,
            cold: databases - hot,
            pending: stats.pending.load(Relaxed),
            uploads_ok: stats.uploads_ok.load(Relaxed),
            uploads_failed: stats.uploads_failed.load(Relaxed),
            snapshots_failed: stats.snapshots_failed.load(Relaxed),
            bytes_uploaded: stats.bytes_uploaded.load(Relaxed),
            scans: stats.scans.load(Relaxed),
            last_scan_duration_seconds: stats.last_scan_micros.load(Relaxed) as f64 / 1e6,
            last_scan_age_seconds: age(last_scan),
            oldest_pending_age_seconds: age(oldest),
            retention_deleted: stats.retention_deleted.load(Relaxed),
            retention_failures: stats.retention_failures.load(Relaxed),
            retention_last_failed: stats.retention_last_failed.load(Relaxed) != 0,
            hot_promotions: stats.hot_promotions.load(Relaxed),
            hot_demotions: stats.hot_demotions.load(Relaxed),
            wal_segments: stats.wal_segments.load(Relaxed),
            wal_bytes: stats.wal_bytes.load(Relaxed),
            generations: stats.generations.load(Relaxed),
            checkpoints: stats.checkpoints.load(Relaxed),
            wal_catch_up_parts: stats.wal_catch_up_parts.load(Relaxed),
            hot_errors: stats.hot_errors.load(Relaxed),
            log_objects: stats.log_objects.load(Relaxed),
            log_packs: stats.log_packs.load(Relaxed),
            log_deleted: stats.log_deleted.load(Relaxed),
            key_collisions: stats.key_collisions.load(Relaxed),
            invalid_keys: stats.invalid_keys.load(Relaxed),
            watched_dirs: stats.watched_dirs.load(Relaxed),
            rechecks: stats.rechecks.load(Relaxed),
            verify_runs: stats.verify_runs.load(Relaxed),
            verify_last_run_unix: age_base(stats.verify_last_unix.load(Relaxed)),
            verify_last_ok: (stats.verify_runs.load(Relaxed) > 0).then(|| {
                stats.verify_last_failed.load(Relaxed) == 0
                    && stats.verify_last_problems.load(Relaxed) == 0
                    && stats.verify_last_unverifiable.load(Relaxed) == 0
            }),
            verify_ok: stats.verify_last_ok.load(Relaxed),
            verify_problems: stats.verify_last_problems.load(Relaxed),
            verify_could_not_check: stats.verify_last_unverifiable.load(Relaxed),
            lease_writes_paused: false,
            healthy: scan_problem(stats, scan_interval, now).is_none()
                && upload_problem(stats, scan_interval, now).is_none(),
        }
    }

    /// Adds the replica lease's write `fence` (`None`: no lease): while it
    /// is closed, writes are paused and the daemon is not healthy.
    pub fn with_fence(mut self, fence: Option<&Fence>) -> StatsView {
        self.lease_writes_paused = fence.is_some_and(|f| !f.is_open());
        self.healthy &= !self.lease_writes_paused;
        self
    }

    /// Prometheus text exposition (format 0.0.4). Aggregate series only.
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let f = |v: u64| v as f64;
        metric(
            "litefleet_databases",
            "gauge",
            "Databases tracked, by tier.",
            &[
                ("{tier=\"hot\"}", f(self.hot)),
                ("{tier=\"cold\"}", f(self.cold)),
            ],
        );
        metric(
            "litefleet_pending_databases",
            "gauge",
            "Databases with changes not yet in the replica.",
            &[("", f(self.pending))],
        );
        metric(
            "litefleet_uploads_total",
            "counter",
            "Snapshot uploads, by result.",
            &[
                ("{result=\"ok\"}", f(self.uploads_ok)),
                ("{result=\"failed\"}", f(self.uploads_failed)),
            ],
        );
        metric(
            "litefleet_snapshots_failed_total",
            "counter",
            "Snapshots that failed at the source database (locked, damaged, unreadable): no upload was tried.",
            &[("", f(self.snapshots_failed))],
        );
        metric(
            "litefleet_uploaded_bytes_total",
            "counter",
            "Compressed bytes uploaded.",
            &[("", f(self.bytes_uploaded))],
        );
        metric(
            "litefleet_scans_total",
            "counter",
            "Completed scans.",
            &[("", f(self.scans))],
        );
        metric(
            "litefleet_last_scan_duration_seconds",
            "gauge",
            "Duration of the last scan.",
            &[("", self.last_scan_duration_seconds)],
        );
        metric(
            "litefleet_oldest_pending_age_seconds",
            "gauge",
            "Age of the oldest change not yet replicated (0 when none).",
            &[("", f(self.oldest_pending_age_seconds.unwrap_or(0)))],
        );
        metric(
            "litefleet_retention_deleted_total",
            "counter",
            "Objects deleted by retention.",
            &[("", f(self.retention_deleted))],
        );
        metric(
            "litefleet_retention_failures_total",
            "counter",
            "Retention passes that failed.",
            &[("", f(self.retention_failures))],
        );
        metric(
            "litefleet_retention_last_failed",
            "gauge",
            "1 when the last retention pass failed, else 0.",
            &[("", f(u64::from(self.retention_last_failed)))],
        );
        metric(
            "litefleet_tier_changes_total",
            "counter",
            "Hot-tier promotions and demotions.",
            &[
                ("{to=\"hot\"}", f(self.hot_promotions)),
                ("{to=\"cold\"}", f(self.hot_demotions)),
            ],
        );
        metric(
            "litefleet_wal_segments_total",
            "counter",
            "WAL segments shipped by the hot tier.",
            &[("", f(self.wal_segments))],
        );
        metric(
            "litefleet_wal_bytes_total",
            "counter",
            "Uncompressed WAL bytes shipped by the hot tier.",
            &[("", f(self.wal_bytes))],
        );
        metric(
            "litefleet_generations_total",
            "counter",
            "WAL generations started (each with a snapshot).",
            &[("", f(self.generations))],
        );
        metric(
            "litefleet_checkpoints_total",
            "counter",
            "Checkpoints run by the hot tier.",
            &[("", f(self.checkpoints))],
        );
        metric(
            "litefleet_wal_catch_up_parts_total",
            "counter",
            "WAL parts shipped beyond a sync's first because a stream was behind its writer.",
            &[("", f(self.wal_catch_up_parts))],
        );
        metric(
            "litefleet_hot_errors_total",
            "counter",
            "Failed hot-tier syncs (retried every sync interval).",
            &[("", f(self.hot_errors))],
        );
        metric(
            "litefleet_log_objects_total",
            "counter",
            "Fleet log objects written (one per sync with changes, for every hot database).",
            &[("", f(self.log_objects))],
        );
        metric(
            "litefleet_log_packs_total",
            "counter",
            "Consolidated per-database packs written from the fleet log.",
            &[("", f(self.log_packs))],
        );
        metric(
            "litefleet_log_deleted_total",
            "counter",
            "Fleet log objects deleted once every part in them was consolidated.",
            &[("", f(self.log_deleted))],
        );
        metric(
            "litefleet_key_collisions",
            "gauge",
            "Databases not backed up because another database owns their key.",
            &[("", f(self.key_collisions))],
        );
        metric(
            "litefleet_invalid_keys",
            "gauge",
            "Databases not backed up because their key is not one litefleet uploads (an empty, . or .. segment, a first segment .litefleet, a generations segment after the first, a segment named like a cold snapshot).",
            &[("", f(self.invalid_keys))],
        );
        metric(
            "litefleet_watched_directories",
            "gauge",
            "Directories watched for change notifications (inotify).",
            &[("", f(self.watched_dirs))],
        );
        metric(
            "litefleet_notified_rechecks_total",
            "counter",
            "Changes noticed by change notifications between scans.",
            &[("", f(self.rechecks))],
        );
        metric(
            "litefleet_verify_runs_total",
            "counter",
            "Restore drills run by verify-interval.",
            &[("", f(self.verify_runs))],
        );
        metric(
            "litefleet_verify_last_run_timestamp_seconds",
            "gauge",
            "When the last restore drill ended (unix time; 0 before the first).",
            &[("", f(self.verify_last_run_unix.unwrap_or(0)))],
        );
        // Only once a drill has run: a 0 before the first is no finding.
        if let Some(ok) = self.verify_last_ok {
            metric(
                "litefleet_verify_last_ok",
                "gauge",
                "1 when the last restore drill proved every database it checked.",
                &[("", if ok { 1.0 } else { 0.0 })],
            );
            metric(
                "litefleet_verify_databases",
                "gauge",
                "Databases of the last restore drill, by result.",
                &[
                    ("{result=\"ok\"}", f(self.verify_ok)),
                    ("{result=\"problem\"}", f(self.verify_problems)),
                    (
                        "{result=\"could_not_check\"}",
                        f(self.verify_could_not_check),
                    ),
                ],
            );
        }
        metric(
            "litefleet_lease_writes_paused",
            "gauge",
            "1 while the replica lease could not be renewed (or was lost): every replica write is refused.",
            &[("", if self.lease_writes_paused { 1.0 } else { 0.0 })],
        );
        metric(
            "litefleet_healthy",
            "gauge",
            "1 while scans complete on schedule, replica writes are not paused and uploads succeed.",
            &[("", if self.healthy { 1.0 } else { 0.0 })],
        );
        out
    }
}

/// Seconds a rule of `/healthz` tolerates: [`HEALTHY_INTERVALS`] scan
/// intervals.
fn health_limit(scan_interval: Duration) -> u64 {
    scan_interval.as_secs().max(1) * u64::from(HEALTHY_INTERVALS)
}

/// The scan rules of `/healthz` at `now` (unix seconds): why they fail, as
/// a line of its 503 body, or `None`.
fn scan_problem(stats: &Stats, scan_interval: Duration, now: u64) -> Option<String> {
    use std::sync::atomic::Ordering::Relaxed;
    let last_scan = stats.last_scan_unix.load(Relaxed);
    // A scan, or an upload of the cycle it started: a long cycle that keeps
    // uploading is no stuck loop.
    let since = match last_scan.max(stats.last_progress_unix.load(Relaxed)) {
        0 => stats.started_unix.load(Relaxed),
        t => t,
    };
    let limit = health_limit(scan_interval);
    if last_scan > 0 && stats.databases.load(Relaxed) == 0 {
        Some("unhealthy: the last scan found no SQLite database matching the patterns\n".into())
    } else if now.saturating_sub(since) > limit {
        Some(format!(
            "unhealthy: no scan or upload completed in {HEALTHY_INTERVALS} intervals of {scan_interval:?}\n"
        ))
    } else {
        None
    }
}

/// The upload rule of `/healthz` at `now` (unix seconds): every upload has
/// failed for longer than [`HEALTHY_INTERVALS`] scan intervals, so nothing
/// reaches the replica (the store refuses writes, the replica's disk is
/// full) while the loop itself runs on schedule (black-box probe: 177
/// failed uploads in 70 s, and `/healthz` said 200). One blip (a store
/// restart, a failed cycle) does not flap it; a success ends the stretch.
fn upload_problem(stats: &Stats, scan_interval: Duration, now: u64) -> Option<String> {
    use std::sync::atomic::Ordering::Relaxed;
    let since = stats.uploads_failing_since_unix.load(Relaxed);
    if since == 0 || now.saturating_sub(since) <= health_limit(scan_interval) {
        return None;
    }
    let at = DateTime::from_timestamp(since as i64, 0).map_or_else(
        || since.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    Some(format!(
        "unhealthy: every upload has failed since {at} ({} failed so far; the log says why)\n",
        stats.uploads_failed.load(Relaxed)
    ))
}

/// The lease rule of `/healthz`: why a closed write `fence` fails it, as a
/// line of its 503 body, or `None` while the fence is open.
fn lease_problem(fence: &Fence, now: DateTime<Utc>) -> Option<String> {
    if fence.is_open() {
        None
    } else if fence.is_lost() {
        Some(
            "unhealthy: writes stopped: the replica lease was lost (taken over or removed); replication is stopping\n"
                .into(),
        )
    } else {
        let at = local_expiry(fence, now).to_rfc3339_opts(SecondsFormat::Secs, true);
        Some(format!(
            "unhealthy: writes paused: the replica lease could not be renewed (expired locally at {at}); retrying\n"
        ))
    }
}

/// When `fence` closes on the wall clock: the earlier of its wall-clock
/// limit and its monotonic one (placed relative to `now`).
fn local_expiry(fence: &Fence, now: DateTime<Utc>) -> DateTime<Utc> {
    let (until, here) = (fence.until(), std::time::Instant::now());
    let mono = if until >= here {
        TimeDelta::from_std(until - here)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
    } else {
        TimeDelta::from_std(here - until)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
    };
    let wall = fence.wall_until();
    mono.map_or(wall, |m| m.min(wall))
}

fn now_unix() -> u64 {
    Utc::now().timestamp().max(0) as u64
}

impl Ops {
    fn view(&self) -> StatsView {
        StatsView::read(&self.stats, self.scan_interval, now_unix())
            .with_fence(self.fence.as_deref())
    }

    /// `/healthz`'s 503 body at `now`, a line per failing rule (the lease
    /// first); empty while healthy. The same rules as [`StatsView::healthy`].
    fn problems(&self, now: DateTime<Utc>) -> String {
        let lease = self.fence.as_deref().and_then(|f| lease_problem(f, now));
        let scans = scan_problem(
            &self.stats,
            self.scan_interval,
            now.timestamp().max(0) as u64,
        );
        let uploads = upload_problem(
            &self.stats,
            self.scan_interval,
            now.timestamp().max(0) as u64,
        );
        lease.into_iter().chain(scans).chain(uploads).collect()
    }
}

async fn healthz(State(ops): State<Ops>) -> Response {
    let problems = ops.problems(Utc::now());
    if problems.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems).into_response()
    }
}

async fn stats_json(State(ops): State<Ops>) -> Json<StatsView> {
    Json(ops.view())
}

async fn metrics(State(ops): State<Ops>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.view().prometheus(),
    )
        .into_response()
}

/// The endpoint's routes over `stats` and the replica lease's write `fence`
/// (`None` when no lease is held).
pub fn router(stats: Arc<Stats>, scan_interval: Duration, fence: Option<Arc<Fence>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/stats", get(stats_json))
        .route("/metrics", get(metrics))
        // No keep-alive (see the module docs).
        .layer(axum::middleware::map_response(
            |mut r: Response| async move {
                r.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                r
            },
        ))
        .with_state(Ops {
            stats,
            scan_interval,
            fence,
        })
}

/// Binds `addr` now (so a taken port is a start-up error naming it) and serves
/// until `shutdown` is cancelled. Returns the bound address and the task.
pub async fn serve(
    addr: SocketAddr,
    stats: Arc<Stats>,
    scan_interval: Duration,
    fence: Option<Arc<Fence>>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::invalid(format!("addr {addr}"), format!("cannot listen: {e}")))?;
    let bound = listener.local_addr().unwrap_or(addr);
    let app = router(stats, scan_interval, fence);
    let listener = Bounded {
        inner: listener,
        slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        idle: IDLE_TIMEOUT,
        lifetime: CONNECTION_LIFETIME,
        failing: None,
    };
    let task = tokio::spawn(async move {
        let stopping = shutdown.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopping.cancelled().await });
        let cut = async {
            shutdown.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::select! {
            r = served => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "operations endpoint stopped");
                }
            }
            () = cut => tracing::debug!("operations endpoint: connections still open at the stop are dropped"),
        }
    });
    tracing::info!(addr = %bound, "operations endpoint: /healthz /stats /metrics");
    Ok((bound, task))
}

/// Connections the endpoint serves at once; more wait in the kernel's
/// accept queue, holding no descriptor of the daemon's. A monitor and a
/// scraper or two need a handful.
pub const MAX_CONNECTIONS: usize = 32;

/// A connection with no byte read or written for this long is closed: a
/// request is a few hundred bytes sent at once, and no connection is kept
/// after its response, so only a client that connects and sends nothing
/// (or half a request) waits this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a connection is kept, however it moves: a request and its
/// response take milliseconds, and with no keep-alive a connection serves
/// one. Without it, clients trickling a byte every few seconds (never idle
/// for [`IDLE_TIMEOUT`]) held every slot for as long as they liked, and no
/// health check was answered (left by session 17); now such a client
/// holds a slot for this long at most, and a waiting check is accepted
/// when one frees.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// How long a stop waits for the endpoint's open connections to end.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// A listener that accepts a connection only while fewer than its `slots`
/// are taken, and closes one idle for `idle` (see the module docs).
struct Bounded {
    inner: tokio::net::TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    idle: Duration,
    /// [`CONNECTION_LIFETIME`].
    lifetime: Duration,
    /// The error of the accept failing since its last success, if any:
    /// logged once, not at every retry (black-box probe L20: one warning a
    /// second for as long as the daemon was out of descriptors).
    failing: Option<std::io::ErrorKind>,
}

impl axum::serve::Listener for Bounded {
    type Io = IdleClosing;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (IdleClosing, SocketAddr) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            // Never closed; waiting for ever is what a closed one means.
            return std::future::pending().await;
        };
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    if self.failing.take().is_some() {
                        tracing::info!("operations endpoint: accepting connections again");
                    }
                    let idle = self.idle;
                    let now = tokio::time::Instant::now();
                    let end = now + self.lifetime;
                    let timer = Box::pin(tokio::time::sleep_until((now + idle).min(end)));
                    let io = IdleClosing {
                        io,
                        idle,
                        end,
                        timer,
                        _slot: slot,
                    };
                    return (io, addr);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to
                    // close rather than spin (what axum's own listener does).
                    if newly_failing(&mut self.failing, e.kind()) {
                        tracing::warn!(
                            error = %e,
                            "operations endpoint: cannot accept a connection (retried every \
                             second, logged again when it succeeds or fails otherwise)"
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Records that accepting fails with `kind`: true (log it) unless it was
/// already failing so.
fn newly_failing(failing: &mut Option<std::io::ErrorKind>, kind: std::io::ErrorKind) -> bool {
    failing.replace(kind) != Some(kind)
}

/// A connection of [`Bounded`]: reads and writes fail with `TimedOut` once
/// nothing moved either way for `idle`, or at its `end` (the server then
/// closes it), and its slot is given back when it is dropped.
struct IdleClosing {
    io: tokio::net::TcpStream,
    idle: Duration,
    /// Accepted + [`CONNECTION_LIFETIME`].
    end: tokio::time::Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl IdleClosing {
    fn moved(&mut self) {
        let next = (tokio::time::Instant::now() + self.idle).min(self.end);
        self.timer.as_mut().reset(next);
    }

    /// What a read or write of the connection gave: progress restarts the
    /// idle timer, waiting is bounded by it.
    fn after<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match polled {
            std::task::Poll::Pending => self.poll_idle(cx),
            ready => {
                self.moved();
                ready
            }
        }
    }

    fn poll_idle<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match std::future::Future::poll(self.timer.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle or too long connection closed",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for IdleClosing {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        this.after(cx, polled)
    }
}

impl tokio::io::AsyncWrite for IdleClosing {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        this.after(cx, polled)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn health_follows_the_last_scan() {
        let s = Stats::default();
        s.started_unix.store(1000, Relaxed);
        let iv = Duration::from_secs(15);
        // Before any scan: healthy during the grace period from start-up.
        assert!(StatsView::read(&s, iv, 1045).healthy);
        assert!(!StatsView::read(&s, iv, 1046).healthy);
        s.databases.store(1, Relaxed);
        s.last_scan_unix.store(2000, Relaxed);
        assert!(StatsView::read(&s, iv, 2045).healthy);
        assert!(!StatsView::read(&s, iv, 2046).healthy);
        // A long cycle that keeps uploading (a first backup) makes progress
        // (black-box probe: 503 "no scan completed" while it uploaded).
        s.last_progress_unix.store(2100, Relaxed);
        assert!(StatsView::read(&s, iv, 2145).healthy);
        assert!(!StatsView::read(&s, iv, 2146).healthy);
        // A scan that found nothing: a config that backs up nothing.
        s.databases.store(0, Relaxed);
        assert!(!StatsView::read(&s, iv, 2001).healthy);
    }

    #[test]
    fn health_fails_when_every_upload_has_failed_for_three_intervals() {
        let s = Stats::default();
        let iv = Duration::from_secs(15);
        s.databases.store(1, Relaxed);
        s.upload_failed();
        let since = s.uploads_failing_since_unix.load(Relaxed);
        assert!(since > 0);
        s.upload_failed();
        assert_eq!(
            s.uploads_failing_since_unix.load(Relaxed),
            since,
            "the first failure"
        );
        let t = since + 45;
        s.last_scan_unix.store(t, Relaxed);
        assert!(StatsView::read(&s, iv, t).healthy, "a short stretch");
        s.last_scan_unix.store(t + 1, Relaxed);
        assert!(!StatsView::read(&s, iv, t + 1).healthy);
        let line = upload_problem(&s, iv, t + 1).unwrap();
        assert!(
            line.starts_with("unhealthy: every upload has failed since "),
            "{line}"
        );
        assert!(line.contains("(2 failed so far;"), "{line}");
        s.upload_ok();
        assert!(StatsView::read(&s, iv, t + 1).healthy);
    }

    #[test]
    fn view_and_metrics_are_aggregates() {
        let s = Stats::default();
        s.databases.store(100_000, Relaxed);
        s.hot.store(7, Relaxed);
        s.pending.store(3, Relaxed);
        s.oldest_pending_unix.store(90, Relaxed);
        s.uploads_ok.store(12, Relaxed);
        s.hot_promotions.store(4, Relaxed);
        s.wal_segments.store(30, Relaxed);
        s.log_objects.store(9, Relaxed);
        s.invalid_keys.store(2, Relaxed);
        s.retention_failures.store(5, Relaxed);
        s.retention_last_failed.store(1, Relaxed);
        let v = StatsView::read(&s, Duration::from_secs(15), 100);
        assert_eq!((v.hot, v.cold, v.pending), (7, 99_993, 3));
        assert_eq!(v.oldest_pending_age_seconds, Some(10));
        assert_eq!(v.last_scan_age_seconds, None);
        let text = v.prometheus();
        assert!(text.contains("litefleet_databases{tier=\"cold\"} 99993\n"));
        assert!(text.contains("litefleet_uploads_total{result=\"ok\"} 12\n"));
        assert!(text.contains("litefleet_oldest_pending_age_seconds 10\n"));
        assert!(text.contains("litefleet_tier_changes_total{to=\"hot\"} 4\n"));
        assert!(text.contains("litefleet_wal_segments_total 30\n"));
        assert!(text.contains("litefleet_log_objects_total 9\n"));
        assert!(text.contains("litefleet_invalid_keys 2\n"));
        assert!(text.contains("litefleet_retention_failures_total 5\n"));
        assert!(text.contains("litefleet_retention_last_failed 1\n"));
        assert!(v.retention_last_failed);
        // Every sample line belongs to a declared metric; no per-database series.
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 32);
        assert!(text.contains("litefleet_lease_writes_paused 0\n"));
        assert!(text.contains("litefleet_verify_last_run_timestamp_seconds 0\n"));
        assert!(!text.contains("litefleet_verify_last_ok"));
    }

    #[test]
    fn verify_results_are_shown_after_the_first_drill() {
        let s = Stats::default();
        s.verify_runs.store(2, Relaxed);
        s.verify_last_unix.store(1_700_000_000, Relaxed);
        s.verify_last_ok.store(97, Relaxed);
        s.verify_last_problems.store(3, Relaxed);
        let v = StatsView::read(&s, Duration::from_secs(15), 100);
        assert_eq!(v.verify_last_run_unix, Some(1_700_000_000));
        assert_eq!(v.verify_last_ok, Some(false));
        let text = v.prometheus();
        assert!(text.contains("litefleet_verify_last_run_timestamp_seconds 1700000000\n"));
        assert!(text.contains("litefleet_verify_last_ok 0\n"));
        assert!(text.contains("litefleet_verify_databases{result=\"problem\"} 3\n"));
        assert!(text.contains("litefleet_verify_databases{result=\"ok\"} 97\n"));
        s.verify_last_problems.store(0, Relaxed);
        let v = StatsView::read(&s, Duration::from_secs(15), 100);
        assert_eq!(v.verify_last_ok, Some(true));
        assert!(v.prometheus().contains("litefleet_verify_last_ok 1\n"));
    }

    /// Endpoint state over fresh, healthy stats (a scan just found a
    /// database) and `fence`.
    fn ops(fence: Option<Arc<Fence>>) -> Ops {
        let stats = Stats::default();
        stats.databases.store(1, Relaxed);
        stats.last_scan_unix.store(now_unix(), Relaxed);
        Ops {
            stats: Arc::new(stats),
            scan_interval: Duration::from_secs(15),
            fence,
        }
    }

    /// What the three routes' handlers answer: `/healthz`'s status and
    /// body, `/stats`' `lease_writes_paused`, and `/metrics`' gauge line.
    async fn answers(ops: &Ops) -> (StatusCode, String, bool, bool) {
        let health = healthz(State(ops.clone())).await;
        let code = health.status();
        let body = axum::body::to_bytes(health.into_body(), usize::MAX)
            .await
            .unwrap();
        let Json(view) = stats_json(State(ops.clone())).await;
        let text = axum::body::to_bytes(metrics(State(ops.clone())).await.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(text.to_vec()).unwrap();
        let gauge = text.contains("litefleet_lease_writes_paused 1\n");
        assert!(gauge || text.contains("litefleet_lease_writes_paused 0\n"));
        assert_eq!(text.contains("litefleet_healthy 1\n"), view.healthy);
        assert_eq!(view.healthy, code == StatusCode::OK);
        let body = String::from_utf8(body.to_vec()).unwrap();
        (code, body, view.lease_writes_paused, gauge)
    }

    /// A fence that expired locally (the lease could not be renewed) turns
    /// `/healthz` 503 with the local expiry, `/stats` and `/metrics` show
    /// the pause, and a renewal (`extend`) makes the daemon healthy again; a
    /// lost lease is 503 too.
    #[tokio::test]
    async fn a_closed_write_fence_is_unhealthy_until_the_lease_is_renewed() {
        let later = std::time::Instant::now() + Duration::from_secs(60);
        let soon = Utc::now() + chrono::Duration::seconds(60);
        let open = (StatusCode::OK, "ok\n".to_string(), false, false);
        assert_eq!(answers(&ops(None)).await, open);
        let fence = Arc::new(Fence::new("lease", later, soon));
        let ops = ops(Some(fence.clone()));
        assert_eq!(answers(&ops).await, open);
        // Expired on the wall clock (as after a suspend); the monotonic
        // limit is later, so the wall-clock one is the local expiry.
        let expired = DateTime::parse_from_rfc3339("2020-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc);
        fence.extend(later, expired);
        assert_eq!(
            answers(&ops).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy: writes paused: the replica lease could not be renewed \
                 (expired locally at 2020-01-02T03:04:05Z); retrying\n"
                    .to_string(),
                true,
                true
            )
        );
        fence.extend(later, soon);
        assert_eq!(answers(&ops).await, open);
        fence.close();
        let (code, body, paused, gauge) = answers(&ops).await;
        assert_eq!(
            (code, paused, gauge),
            (StatusCode::SERVICE_UNAVAILABLE, true, true)
        );
        assert!(body.contains("the replica lease was lost"), "{body}");
    }

    /// The lease rule comes on top of the scan rules: each failing rule is a
    /// line of the 503 body, the lease's first; the local expiry is the
    /// earlier of the fence's two limits.
    #[test]
    fn every_failing_rule_is_a_line_of_the_answer() {
        let soon = Utc::now() + chrono::Duration::seconds(60);
        // Expired on the monotonic clock (an instant already past).
        let fence = Fence::new("lease", std::time::Instant::now(), soon);
        let now = Utc::now();
        let at = local_expiry(&fence, now);
        assert!(
            at <= now && at > now - chrono::Duration::seconds(60),
            "{at}"
        );
        let ops = ops(Some(Arc::new(fence)));
        ops.stats.last_scan_unix.store(1000, Relaxed);
        let problems = ops.problems(now);
        let lines: Vec<&str> = problems.lines().collect();
        assert_eq!(lines.len(), 2, "{problems}");
        assert!(
            lines[0].starts_with("unhealthy: writes paused: "),
            "{problems}"
        );
        assert!(lines[1].starts_with("unhealthy: no scan or upload completed in 3 intervals"));
        let v = ops.view();
        assert!(v.lease_writes_paused && !v.healthy);
        // Without a lease only the scan rules count.
        let v = StatsView::read(&ops.stats, ops.scan_interval, now_unix()).with_fence(None);
        assert!(!v.lease_writes_paused && !v.healthy);
        ops.stats.last_scan_unix.store(now_unix(), Relaxed);
        assert!(ops
            .problems(Utc::now())
            .starts_with("unhealthy: writes paused: "));
        assert!(StatsView::read(&ops.stats, ops.scan_interval, now_unix()).healthy);
    }

    /// An accept that keeps failing the same way is logged once, until it
    /// succeeds or fails another way.
    #[test]
    fn a_failing_accept_is_logged_once() {
        use std::io::ErrorKind::{Other, OutOfMemory};
        let mut failing = None;
        assert!(newly_failing(&mut failing, Other));
        assert!(!newly_failing(&mut failing, Other));
        assert!(newly_failing(&mut failing, OutOfMemory));
        failing.take();
        assert!(newly_failing(&mut failing, OutOfMemory));
    }

    /// The endpoint on an ephemeral port with two connection slots: its
    /// address, stop token and task.
    async fn two_slots(
        idle: Duration,
        lifetime: Duration,
    ) -> (
        SocketAddr,
        CancellationToken,
        JoinHandle<std::io::Result<()>>,
    ) {
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let listener = Bounded {
            inner,
            slots: Arc::new(tokio::sync::Semaphore::new(2)),
            idle,
            lifetime,
            failing: None,
        };
        let app = router(Arc::new(Stats::default()), Duration::from_secs(15), None);
        let stop = CancellationToken::new();
        let server = tokio::spawn({
            let stop = stop.clone();
            async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }
        });
        (addr, stop, server)
    }

    /// Asks `/healthz` at `addr`: when the answer ended, and the answer.
    async fn health_check(addr: SocketAddr) -> (tokio::time::Instant, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        (
            tokio::time::Instant::now(),
            String::from_utf8_lossy(&got).into_owned(),
        )
    }

    /// Connections beyond the cap wait, unaccepted, and idle ones are
    /// closed, which frees their slots (black-box probe: idle connections
    /// took every descriptor of the daemon).
    #[tokio::test]
    async fn idle_connections_are_closed_and_capped() {
        use tokio::io::AsyncReadExt;
        let idle = Duration::from_millis(400);
        let (addr, stop, server) = two_slots(idle, CONNECTION_LIFETIME).await;
        let start = tokio::time::Instant::now();
        // Two connections that never send a request take both slots.
        let mut quiet = Vec::new();
        for _ in 0..2 {
            quiet.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let closed = async move {
            let mut at = Vec::new();
            for mut c in quiet {
                let mut b = [0u8; 16];
                // End of stream or a reset: closed by the server either way.
                let n = c.read(&mut b).await.unwrap_or(0);
                assert_eq!(n, 0, "an idle connection got bytes");
                at.push(tokio::time::Instant::now());
            }
            at
        };
        let asked = health_check(addr);
        let limit = Duration::from_secs(30);
        let (closed, (answered, reply)) =
            tokio::time::timeout(limit, async { tokio::join!(closed, asked) })
                .await
                .expect("idle connections were never closed");
        assert!(reply.starts_with("HTTP/1.1 "), "{reply}");
        for at in &closed {
            assert!(
                *at - start >= idle,
                "closed before it was idle: {:?}",
                *at - start
            );
        }
        // The third connection was served only once a slot was free.
        let first_closed = closed.iter().min().unwrap();
        assert!(answered >= *first_closed, "served beyond the cap");
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// Clients that trickle a byte at a time, never idle, are closed at the
    /// end of their lifetime, which frees their slots for a health check
    /// waiting behind them (they held every slot for good).
    #[tokio::test]
    async fn trickling_connections_end_with_their_lifetime() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let lifetime = Duration::from_millis(600);
        let (addr, stop, server) = two_slots(Duration::from_secs(10), lifetime).await;
        let start = tokio::time::Instant::now();
        let trickle = |mut c: tokio::net::TcpStream| async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let ask = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            for b in ask.iter().chain(std::iter::repeat(&b'a')) {
                tick.tick().await;
                if c.write_all(&[*b]).await.is_err() {
                    break;
                }
                // Closed by the server: the next read ends.
                let mut buf = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(1), c.read(&mut buf)).await
                {
                    break;
                }
            }
            tokio::time::Instant::now()
        };
        let mut slow = Vec::new();
        for _ in 0..2 {
            let c = tokio::net::TcpStream::connect(addr).await.unwrap();
            slow.push(tokio::spawn(trickle(c)));
        }
        let asked = health_check(addr);
        let limit = Duration::from_secs(30);
        let (answered, reply) = tokio::time::timeout(limit, asked)
            .await
            .expect("the health check was never answered");
        assert!(reply.starts_with("HTTP/1.1 "), "{reply}");
        assert!(answered - start >= lifetime, "{:?}", answered - start);
        for t in slow {
            let ended = tokio::time::timeout(limit, t)
                .await
                .expect("a trickling client was never closed")
                .unwrap();
            assert!(ended - start >= lifetime, "{:?}", ended - start);
        }
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// Every response closes its connection (no keep-alive: polling clients
    /// held every slot, probe Y), and a stop does not wait for a client that
    /// sent half a request (it held the daemon's exit).
    #[tokio::test]
    async fn connections_end_with_their_response_and_at_the_stop() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            stats,
            Duration::from_secs(15),
            None,
            stop.clone(),
        )
        .await
        .unwrap();
        let limit = Duration::from_secs(30);
        for path in ["/healthz", "/stats", "/metrics"] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let ask = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.write_all(ask.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(limit, c.read_to_end(&mut got))
                .await
                .expect("a kept-alive connection")
                .unwrap();
            let reply = String::from_utf8_lossy(&got).to_ascii_lowercase();
            assert!(reply.contains("\r\nconnection: close\r\n"), "{reply}");
        }
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let stopped = tokio::time::Instant::now();
        stop.cancel();
        tokio::time::timeout(limit, task)
            .await
            .expect("the stop waited for a half-sent request")
            .unwrap();
        assert!(stopped.elapsed() < IDLE_TIMEOUT, "{:?}", stopped.elapsed());
    }
}
