//! `litefleet bench cost`: the S3 request bill of a fleet, measured.
//!
//! Creates `databases` WAL databases and runs the real replicator (`run`,
//! with change notifications and the hot tier as configured by default) on a
//! `file://` replica behind a [`FaultyStore`] that injects no fault and
//! counts every request by S3 price class. Two phases are measured:
//!
//! 1. **idle**: after the initial upload of every database, one scan
//!    interval with no writes: what an idle fleet costs (the target is 0
//!    requests per idle database);
//! 2. **hot**: `hot` databases each get one commit per second (spread over
//!    the second) for `duration`, then the replicator shuts down (final
//!    syncs included).
//!
//! The bill is extrapolated to the product description's scenario
//! (100,000 databases of which 250 change, 30 days) at S3 Standard list
//! prices: PUT, COPY, LIST and DELETE $0.005 per 1,000 requests, GET $0.0004
//! per 1,000 (DELETE is free on S3; counted at the PUT price here, an upper
//! bound). The replica lease, which the `replicate` command holds and this
//! benchmark does not, is added from its renewal interval.
//!
//! Counted at the object-store API, one call per request: a multipart upload
//! is counted as one PUT (its parts are more: small objects here never use
//! it), a listing as one LIST per call.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::soak::{create_fleet, open_writer, soak_path, FaultyStore, Requests};
use crate::daemon::scheduler::Replicator;
use crate::source::config::Loaded;
use crate::{Error, Result};

/// The product description's scenario.
pub const SCENARIO_DATABASES: u64 = 100_000;
pub const SCENARIO_HOT: u64 = 250;
/// 30 days.
pub const MONTH_SECS: u64 = 30 * 86_400;
/// S3 Standard list prices, dollars per request.
pub const PUT_USD: f64 = 0.005 / 1000.0;
pub const GET_USD: f64 = 0.0004 / 1000.0;
/// The description's promise for the whole S3 bill of the scenario.
pub const TARGET_USD: f64 = 16.0;

/// What to run.
#[derive(Debug, Clone)]
pub struct CostOptions {
    pub databases: usize,
    pub hot: usize,
    pub duration: Duration,
    pub sync_interval: Duration,
    pub scan_interval: Duration,
    pub dir: PathBuf,
}

/// What it measured, and the scenario's bill.
#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    pub databases: usize,
    pub hot: usize,
    pub duration_s: f64,
    pub sync_interval_s: f64,
    pub scan_interval_s: f64,
    pub commits: u64,
    pub idle_window_s: f64,
    pub idle: Requests,
    pub hot_phase: Requests,
    pub put_per_hot_db_per_s: f64,
    pub requests_per_idle_db_per_day: f64,
    pub scenario_hot_usd: f64,
    pub scenario_idle_usd: f64,
    pub scenario_lease_usd: f64,
    pub scenario_total_usd: f64,
    pub target_usd: f64,
}

fn usd(r: &Requests) -> f64 {
    (r.put + r.list + r.delete) as f64 * PUT_USD + r.get as f64 * GET_USD
}

fn minus(a: Requests, b: Requests) -> Requests {
    Requests {
        put: a.put - b.put,
        get: a.get - b.get,
        list: a.list - b.list,
        delete: a.delete - b.delete,
    }
}

/// Runs the benchmark (see the module docs).
pub async fn cost(opts: CostOptions) -> Result<CostReport> {
    if opts.hot > opts.databases {
        return Err(Error::invalid("bench cost --hot", "more than --databases"));
    }
    let root = opts.dir.clone();
    let n = opts.databases;
    create_fleet(&root, n, "bench cost").await?;
    // Written an hour ago, as far as change detection can tell: no upload is
    // "racy" (just written, uploaded once more at the next scan), so the idle
    // phase measures an idle fleet, not the tail of its first upload.
    let aged = root.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let past = std::time::SystemTime::now() - Duration::from_secs(3600);
        for i in 0..n {
            let db = soak_path(&aged, i);
            let mut wal = db.clone().into_os_string();
            wal.push("-wal");
            for p in [db.into_os_string(), wal] {
                if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                    f.set_modified(past).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::invalid("bench cost", e.to_string()))??;
    let yaml = format!(
        "multi-db:\n  patterns: [\"{}/data/*/*.db\"]\n  scan-interval: {}ms\n  sync-interval: {}ms\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    url: file://{}\n    path: \"{{{{group}}}}/{{{{db}}}}\"\n",
        root.display(),
        opts.scan_interval.as_millis(),
        opts.sync_interval.as_millis(),
        root.join("tmp").display(),
        root.join("state").display(),
        root.join("replica").display(),
    );
    let loaded = Loaded::from_str(&yaml, "bench-cost.yml", &root)?;
    let lease_ttl = loaded.multi_db().replica.lease_ttl;
    let plain = loaded.open_replica()?;
    let counted = Arc::new(FaultyStore::new(plain.store.clone()));
    let replicator = Arc::new(Replicator::with_replica(
        loaded,
        plain.with_store(counted.clone()),
    )?);
    let mut rounds = replicator.rounds();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(replicator.clone().run(false, cancel.clone()));
    rounds
        .changed()
        .await
        .map_err(|_| Error::invalid("bench cost", "the replicator stopped"))?;
    tracing::info!(
        databases = n,
        "initial upload done; measuring the idle fleet"
    );

    // Idle: one scan interval plus a little, so exactly one more scan runs.
    let before = counted.requests();
    let idle_window = opts.scan_interval + Duration::from_millis(500);
    tokio::time::sleep(idle_window).await;
    let idle = minus(counted.requests(), before);

    tracing::info!(hot = opts.hot, "writing");
    let before = counted.requests();
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, commits, root, hot) = (stop.clone(), commits.clone(), root.clone(), opts.hot);
        std::thread::spawn(move || -> Result<()> {
            let conns = (0..hot)
                .map(|i| open_writer(&soak_path(&root, i)))
                .collect::<Result<Vec<_>>>()?;
            let start = Instant::now();
            let mut second = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (i, c) in conns.iter().enumerate() {
                    // Commits spread evenly over each second.
                    let at = Duration::from_secs(second)
                        + Duration::from_secs_f64(i as f64 / hot.max(1) as f64);
                    if let Some(wait) = at.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    c.execute("INSERT INTO t(v) VALUES ('cost')", [])
                        .map_err(|e| Error::sqlite(soak_path(&root, i), e))?;
                    commits.fetch_add(1, Ordering::Relaxed);
                }
                second += 1;
            }
            Ok(())
        })
    };
    let started = Instant::now();
    tokio::time::sleep(opts.duration).await;
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| Error::invalid("bench cost", "writer thread panicked"))??;
    let duration = started.elapsed();
    cancel.cancel();
    run.await
        .map_err(|e| Error::invalid("bench cost", e.to_string()))??;
    let hot_phase = minus(counted.requests(), before);

    let hot_db_secs = (opts.hot.max(1) as f64) * duration.as_secs_f64();
    let put_per_hot_db_per_s = hot_phase.put as f64 / hot_db_secs;
    let scenario_hot_usd = usd(&hot_phase) / hot_db_secs * (SCENARIO_HOT * MONTH_SECS) as f64;
    let idle_db_secs = (n.max(1) as f64) * idle_window.as_secs_f64();
    let idle_total = (idle.put + idle.get + idle.list + idle.delete) as f64;
    let scenario_idle_usd =
        usd(&idle) / idle_db_secs * ((SCENARIO_DATABASES - SCENARIO_HOT) * MONTH_SECS) as f64;
    // The lease is renewed every third of its lifetime: one conditional PUT.
    let renewals = MONTH_SECS as f64 / (lease_ttl.as_secs_f64() / 3.0);
    let scenario_lease_usd = renewals * PUT_USD;
    Ok(CostReport {
        databases: n,
        hot: opts.hot,
        duration_s: duration.as_secs_f64(),
        sync_interval_s: opts.sync_interval.as_secs_f64(),
        scan_interval_s: opts.scan_interval.as_secs_f64(),
        commits: commits.load(Ordering::Relaxed),
        idle_window_s: idle_window.as_secs_f64(),
        idle,
        hot_phase,
        put_per_hot_db_per_s,
        requests_per_idle_db_per_day: idle_total / idle_db_secs * 86_400.0,
        scenario_hot_usd,
        scenario_idle_usd,
        scenario_lease_usd,
        scenario_total_usd: scenario_hot_usd + scenario_idle_usd + scenario_lease_usd,
        target_usd: TARGET_USD,
    })
}
