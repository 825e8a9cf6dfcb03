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
//! pattern that matches nothing backs nothing up).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    pub bytes_uploaded: u64,
    pub scans: u64,
    pub last_scan_duration_seconds: f64,
    pub last_scan_age_seconds: Option<u64>,
    pub oldest_pending_age_seconds: Option<u64>,
    pub retention_deleted: u64,
    pub hot_promotions: u64,
    pub hot_demotions: u64,
    pub wal_segments: u64,
    pub wal_bytes: u64,
    pub generations: u64,
    pub checkpoints: u64,
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
    pub healthy: bool,
}

impl StatsView {
    /// Reads the counters at `now` (unix seconds).
    pub fn read(stats: &Stats, scan_interval: Duration, now: u64) -> StatsView {
        use std::sync::atomic::Ordering::Relaxed;
        let databases = stats.databases.load(Relaxed);
        let hot = stats.hot.load(Relaxed).min(databases);
        let last_scan = stats.last_scan_unix.load(Relaxed);
        let oldest = stats.oldest_pending_unix.load(Relaxed);
        let age_base = |t: u64| (t > 0).then_some(t);
        let age = |t: u64| age_base(t).map(|t| now.saturating_sub(t));
        let since = if last_scan > 0 {
            last_scan
        } else {
            stats.started_unix.load(Relaxed)
        };
        let limit = scan_interval.as_secs().max(1) * u64::from(HEALTHY_INTERVALS);
        StatsView {
            databases,
            hot,
            cold: databases - hot,
            pending: stats.pending.load(Relaxed),
            uploads_ok: stats.uploads_ok.load(Relaxed),
            uploads_failed: stats.uploads_failed.load(Relaxed),
            bytes_uploaded: stats.bytes_uploaded.load(Relaxed),
            scans: stats.scans.load(Relaxed),
            last_scan_duration_seconds: stats.last_scan_micros.load(Relaxed) as f64 / 1e6,
            last_scan_age_seconds: age(last_scan),
            oldest_pending_age_seconds: age(oldest),
            retention_deleted: stats.retention_deleted.load(Relaxed),
            hot_promotions: stats.hot_promotions.load(Relaxed),
            hot_demotions: stats.hot_demotions.load(Relaxed),
            wal_segments: stats.wal_segments.load(Relaxed),
            wal_bytes: stats.wal_bytes.load(Relaxed),
            generations: stats.generations.load(Relaxed),
            checkpoints: stats.checkpoints.load(Relaxed),
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
            healthy: now.saturating_sub(since) <= limit && !(last_scan > 0 && databases == 0),
        }
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
            "Databases not backed up because their key is one restore refuses (an empty, . or .. segment).",
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
            "litefleet_healthy",
            "gauge",
            "1 while scans complete on schedule.",
            &[("", if self.healthy { 1.0 } else { 0.0 })],
        );
        out
    }
}

fn now_unix() -> u64 {
    chrono::Utc::now().timestamp().max(0) as u64
}

impl Ops {
    fn view(&self) -> StatsView {
        StatsView::read(&self.stats, self.scan_interval, now_unix())
    }
}

async fn healthz(State(ops): State<Ops>) -> Response {
    let v = ops.view();
    if v.healthy {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let msg = if v.last_scan_age_seconds.is_some() && v.databases == 0 {
            "unhealthy: the last scan found no SQLite database matching the patterns\n".to_string()
        } else {
            format!(
                "unhealthy: no scan completed in {} intervals of {:?}\n",
                HEALTHY_INTERVALS, ops.scan_interval
            )
        };
        (StatusCode::SERVICE_UNAVAILABLE, msg).into_response()
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

/// The endpoint's routes over `stats`.
pub fn router(stats: Arc<Stats>, scan_interval: Duration) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/stats", get(stats_json))
        .route("/metrics", get(metrics))
        .with_state(Ops {
            stats,
            scan_interval,
        })
}

/// Binds `addr` now (so a taken port is a start-up error naming it) and serves
/// until `shutdown` is cancelled. Returns the bound address and the task.
pub async fn serve(
    addr: SocketAddr,
    stats: Arc<Stats>,
    scan_interval: Duration,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::invalid(format!("addr {addr}"), format!("cannot listen: {e}")))?;
    let bound = listener.local_addr().unwrap_or(addr);
    let app = router(stats, scan_interval);
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "operations endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "operations endpoint: /healthz /stats /metrics");
    Ok((bound, task))
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
        // A scan that found nothing: a config that backs up nothing.
        s.databases.store(0, Relaxed);
        assert!(!StatsView::read(&s, iv, 2001).healthy);
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
        // Every sample line belongs to a declared metric; no per-database series.
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 27);
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
}
