//! Benchmarks (`litefleet bench ...`), not timed tests.
//!
//! `bench scan` builds (or reuses) a tree of tiny databases laid out like the
//! product's example pattern, tracks it, and reports the median time of a
//! full rescan with nothing changed, the same for `find -printf '%s %T@'` on
//! the same tree (the floor for "stat every file"), peak RSS, and the bytes
//! the tracking table holds per database.
//!
//! `bench lag` streams N hot WAL databases to a `file://` replica while each
//! gets one small commit a second, and reports the time from each commit to
//! the upload of the segment holding it completing (from the shipper's
//! [`ShipEvent`]s), plus open file descriptors and RSS at steady state.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::capture::ship::{self, HotContext, ShipConfig, ShipEvent};
use crate::replica::storage::Replica;
use crate::source::discover::Pattern;
use crate::source::keys::Owners;
use crate::source::template::KeyTemplate;
use crate::source::track::Tracker;
use crate::stats::Stats;
use crate::{Error, Result};

/// Databases per leaf directory in the benchmark tree (10 x 10 x 10 x 100 = 100k).
pub const PER_DIR: usize = 100;
const MARKER: &str = ".litefleet-bench-complete";

/// The benchmark's glob pattern, relative to the tree root.
pub const PATTERN: &str = "*/databases/*/branches/*/tenants/*.db";

/// Path of database `i` in a benchmark tree.
pub fn bench_path(root: &Path, i: usize) -> PathBuf {
    let leaf = i / PER_DIR;
    root.join(format!("p{}", leaf / 100))
        .join("databases")
        .join(format!("d{}", (leaf / 10) % 10))
        .join("branches")
        .join(format!("b{}", leaf % 10))
        .join("tenants")
        .join(format!("t{i:06}.db"))
}

/// Builds a tree of `n` identical tiny databases (reused if already complete).
pub fn build_tree(root: &Path, n: usize) -> Result<()> {
    let marker = root.join(MARKER);
    if std::fs::read_to_string(&marker)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        == Some(n)
    {
        return Ok(());
    }
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let template = tmp.path().join("t.db");
    {
        let c = rusqlite::Connection::open(&template).map_err(|e| Error::sqlite(&template, e))?;
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .map_err(|e| Error::sqlite(&template, e))?;
    }
    let bytes = std::fs::read(&template).map_err(|e| Error::io(&template, e))?;
    for i in 0..n {
        let p = bench_path(root, i);
        if i % PER_DIR == 0 {
            let d = p.parent().expect("has parent");
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        std::fs::write(&p, &bytes).map_err(|e| Error::io(&p, e))?;
    }
    std::fs::write(&marker, n.to_string()).map_err(|e| Error::io(&marker, e))?;
    Ok(())
}

/// Reads a `Vm*` line of /proc/self/status in bytes.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Results of `bench scan`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScanBench {
    pub databases: usize,
    pub iterations: usize,
    /// The daemon's first scan: headers are read at the first snapshot.
    pub first_scan_ms: f64,
    /// A first scan that opens every new file for its SQLite header.
    pub first_scan_headers_ms: f64,
    pub rescan_median_ms: f64,
    /// The key check a scan that found new or removed databases is followed
    /// by (`source::keys::Owners::update`: every tracked database's key
    /// rendered and checked), over the whole table.
    pub key_check_ms: f64,
    pub find_median_ms: Option<f64>,
    pub table_bytes_per_db: f64,
    pub rss_delta_bytes_per_db: f64,
    pub peak_rss_mib: f64,
}

/// Runs the scan benchmark on a tree under `dir` with `n` databases.
pub fn scan(dir: &Path, n: usize, iterations: usize) -> Result<ScanBench> {
    let t0 = Instant::now();
    build_tree(dir, n)?;
    eprintln!(
        "tree ready in {:.1}s: {}",
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
    let pattern = Pattern::compile(PATTERN, dir).map_err(|e| Error::invalid(PATTERN, e))?;
    let patterns = [pattern];
    // Warm the dentry/inode caches so the first timed scan is not a cold-disk outlier.
    let _ = Command::new("find").arg(dir).stdout(Stdio::null()).status();

    // The daemon's first scan (headers read at the first snapshot), then,
    // once the table's memory is measured, a first scan that reads every
    // header.
    let rss_before = proc_status_bytes("VmRSS:").unwrap_or(0);
    let mut tracker = Tracker::new();
    tracker.defer_header_checks(true);
    let t = Instant::now();
    let first = tracker.scan(&patterns);
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_after = proc_status_bytes("VmRSS:").unwrap_or(0);
    let t = Instant::now();
    let read = Tracker::new().scan(&patterns);
    let first_headers_ms = t.elapsed().as_secs_f64() * 1e3;
    for r in [first, read] {
        if r.databases != n {
            return Err(Error::invalid(
                dir.display(),
                format!("expected {n} databases, tracked {}", r.databases),
            ));
        }
    }
    let template = KeyTemplate::default_for(patterns[0].wildcards());
    let t = Instant::now();
    let refused = Owners::default().update(&patterns, &template, &tracker);
    let key_check_ms = t.elapsed().as_secs_f64() * 1e3;
    if !refused.is_empty() {
        return Err(Error::invalid(
            dir.display(),
            format!(
                "{} generated databases refused for their key",
                refused.len()
            ),
        ));
    }
    let mut rescans = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        let r = tracker.scan(&patterns);
        rescans.push(t.elapsed());
        assert_eq!(
            r.changed + r.new + r.removed,
            0,
            "benchmark tree changed during the run"
        );
    }
    let mut finds = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        let ok = Command::new("find")
            .arg(dir)
            .args(["-name", "*.db", "-printf", "%s %T@\n"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            finds.clear();
            break;
        }
        finds.push(t.elapsed());
    }
    Ok(ScanBench {
        databases: n,
        iterations,
        first_scan_ms: first_ms,
        first_scan_headers_ms: first_headers_ms,
        rescan_median_ms: median(rescans).as_secs_f64() * 1e3,
        key_check_ms,
        find_median_ms: (!finds.is_empty()).then(|| median(finds).as_secs_f64() * 1e3),
        table_bytes_per_db: tracker.heap_bytes() as f64 / n as f64,
        rss_delta_bytes_per_db: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        peak_rss_mib: proc_status_bytes("VmHWM:").unwrap_or(0) as f64 / (1024.0 * 1024.0),
    })
}

// ---------------------------------------------------------------------------
// `bench lag`: commit-to-replica latency of the hot tier.
// ---------------------------------------------------------------------------

/// Options of `bench lag`.
#[derive(Debug, Clone)]
pub struct LagOptions {
    /// Hot (WAL-streamed) databases.
    pub hot: usize,
    /// How long the writers run.
    pub duration: Duration,
    /// The shipper's `sync-interval`.
    pub sync_interval: Duration,
    /// Ship through the fleet log (the default) rather than one object per
    /// database per sync.
    pub fleet_log: bool,
}

/// Results of `bench lag`. Lags are seconds from a commit returning to the
/// upload of the segment holding it completing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LagBench {
    pub databases: usize,
    pub duration_s: f64,
    pub sync_interval_s: f64,
    /// Time for every database's first snapshot to reach the replica.
    pub initial_snapshots_s: f64,
    pub commits: u64,
    pub shipped: u64,
    /// Commits never matched to an uploaded segment (0 unless a new generation started).
    pub unmatched: u64,
    pub write_errors: u64,
    /// Snapshots beyond the first per database (new generations).
    pub extra_snapshots: u64,
    pub checkpoints: u64,
    pub hot_errors: u64,
    pub lag_median_s: f64,
    pub lag_p90_s: f64,
    pub lag_p99_s: f64,
    pub lag_max_s: f64,
    /// Open file descriptors of the process, sampled mid-run.
    pub open_fds: Option<usize>,
    /// RSS sampled mid-run, and the peak.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// Fleet log objects written (0 without the fleet log).
    pub log_objects: u64,
}

/// Open files `replicate` wants per hot database: its connection holds 4
/// descriptors (the database, its `-wal` and `-shm`, and its pinned
/// directory, [`crate::source::pin`]; measured in `tests/hot_fleet.rs`) and
/// a 5th while a sync reads its WAL or a large segment waits in it.
pub const NOFILE_PER_HOT: u64 = 5;

/// Open files `replicate` wants for `max_hot` hot databases
/// ([`NOFILE_PER_HOT`] each), plus 256 for the cold tier's snapshots (a few
/// at once, each its 3 files and its pinned directory) and uploads, the
/// store client's sockets and the rest. 1000 hot databases exceed the
/// common soft limit of 1024, rarely the hard one.
pub fn nofile_needed(max_hot: usize) -> u64 {
    max_hot as u64 * NOFILE_PER_HOT + 256
}

/// The soft and hard `RLIMIT_NOFILE` of this process, unchanged.
pub fn nofile_limits() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    Some((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    let (cur, max) = nofile_limits()?;
    if cur >= max {
        return Some(cur);
    }
    let raised = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: setrlimit only reads `raised`.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0;
    Some(if ok { max } else { cur })
}

/// Open file descriptors of this process (entries of /proc/self/fd).
pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted values.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

const LAG_WRITER_THREADS: usize = 8;

/// Commit instants per database index, and failed commits.
type WriterOutput = (Vec<(usize, Vec<Instant>)>, u64);

fn lag_db_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("db{i:05}.db"))
}

fn create_lag_db(p: &Path) -> Result<()> {
    let c = rusqlite::Connection::open(p).map_err(|e| Error::sqlite(p, e))?;
    c.query_row("PRAGMA journal_mode=wal", [], |r| r.get::<_, String>(0))
        .map_err(|e| Error::sqlite(p, e))?;
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .map_err(|e| Error::sqlite(p, e))?;
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(|e| Error::sqlite(p, e))?;
    Ok(())
}

/// One writer thread: commits to databases `t, t+W, ...` once per second
/// each, database `i` offset by `i/n` of a second. Returns the commit
/// instants per database (in the thread's order) and the failed commits.
fn lag_writer(
    paths: Vec<(usize, PathBuf)>,
    n: usize,
    start: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
) -> Result<WriterOutput> {
    let mut conns = Vec::with_capacity(paths.len());
    for (i, p) in &paths {
        let c = rusqlite::Connection::open(p).map_err(|e| Error::sqlite(p, e))?;
        c.busy_timeout(Duration::from_secs(5))
            .map_err(|e| Error::sqlite(p, e))?;
        conns.push((*i, c, Vec::new()));
    }
    let mut errors = 0u64;
    let second = Duration::from_secs(1);
    'rounds: for round in 0u32.. {
        for (i, c, times) in conns.iter_mut() {
            let due = start + second * round + second.mul_f64(*i as f64 / n as f64);
            if due >= end || stop.load(Ordering::Relaxed) {
                break 'rounds;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            match c.execute("INSERT INTO t(v) VALUES (randomblob(100))", []) {
                Ok(_) => times.push(Instant::now()),
                Err(_) => errors += 1,
            }
        }
    }
    Ok((
        conns.into_iter().map(|(i, _, times)| (i, times)).collect(),
        errors,
    ))
}

/// Per database: cumulative shipped commits and when each upload completed.
#[derive(Default)]
struct Shipped {
    snapshots: u64,
    segments: Vec<(u64, Instant)>,
}

fn record(shipped: &mut [Shipped], ev: ShipEvent) {
    let Some(s) = shipped.get_mut(ev.tag as usize) else {
        return;
    };
    if ev.snapshot {
        s.snapshots += 1;
    } else if ev.commits > 0 {
        let before = s.segments.last().map_or(0, |l| l.0);
        s.segments.push((before + ev.commits, ev.at));
    }
}

/// Runs the hot-tier lag benchmark in a fresh temp dir.
pub async fn lag(opts: LagOptions) -> Result<LagBench> {
    let n = opts.hot.max(1);
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let root = tmp.path().to_path_buf();
    let dbs = root.join("dbs");
    std::fs::create_dir_all(&dbs).map_err(|e| Error::io(&dbs, e))?;
    let t0 = Instant::now();
    {
        let dbs = dbs.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for i in 0..n {
                create_lag_db(&lag_db_path(&dbs, i))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::invalid("bench lag", e.to_string()))??;
    }
    eprintln!(
        "created {n} WAL databases in {:.1}s under {}",
        t0.elapsed().as_secs_f64(),
        root.display()
    );

    let replica_dir = root.join("replica");
    let replica = Replica::open_dir(&replica_dir)?;
    let temp_dir = root.join("tmp");
    std::fs::create_dir_all(&temp_dir).map_err(|e| Error::io(&temp_dir, e))?;
    let stats = Arc::new(Stats::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let log_stop = CancellationToken::new();
    let (log, writer) = if opts.fleet_log {
        let (log, writer) = crate::capture::fleetlog::FleetLog::new(
            replica.clone(),
            opts.sync_interval,
            stats.clone(),
        );
        (Some(log), Some(tokio::spawn(writer.run(log_stop.clone()))))
    } else {
        (None, None)
    };
    let ctx = Arc::new(HotContext {
        replica,
        temp_dir,
        cfg: ShipConfig {
            sync_interval: opts.sync_interval,
            checkpoint_pages: 1000,
            truncate_pages: 10_000,
            release_after: crate::source::config::DEFAULT_RELEASE_AFTER,
            consolidate_every: crate::source::config::DEFAULT_LOG_CONSOLIDATE,
            snapshot_interval: crate::source::config::DEFAULT_SNAPSHOT_INTERVAL,
            catch_up_parts: crate::capture::ship::CATCH_UP_PARTS,
        },
        stats: stats.clone(),
        permits: Arc::new(Semaphore::new(100)),
        consolidation: crate::capture::fleetlog::consolidation_budget(),
        events: Some(tx),
        log,
    });

    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        streams.push(tokio::spawn(ship::stream(
            ctx.clone(),
            i as u64,
            lag_db_path(&dbs, i),
            format!("db{i:05}"),
            stop.clone(),
        )));
    }
    drop(ctx);
    let mut shipped: Vec<Shipped> = (0..n).map(|_| Shipped::default()).collect();
    let mut with_snapshot = 0usize;
    let snapshot_deadline = Duration::from_secs(120) + Duration::from_millis(50 * n as u64);
    while with_snapshot < n {
        let left = snapshot_deadline.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(ev)) => {
                let first = ev.snapshot
                    && shipped
                        .get(ev.tag as usize)
                        .is_some_and(|s| s.snapshots == 0);
                record(&mut shipped, ev);
                with_snapshot += usize::from(first);
            }
            Ok(None) | Err(_) => {
                stop.cancel();
                return Err(Error::invalid(
                    "bench lag",
                    format!("only {with_snapshot} of {n} databases uploaded their first snapshot"),
                ));
            }
        }
    }
    let initial_snapshots_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "all {n} initial snapshots shipped in {initial_snapshots_s:.1}s; writing for {:?}",
        opts.duration
    );

    let collector = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            record(&mut shipped, ev);
        }
        shipped
    });

    let start = Instant::now() + Duration::from_millis(200);
    let end = start + opts.duration;
    let halt = Arc::new(AtomicBool::new(false));
    let threads = LAG_WRITER_THREADS.min(n);
    let mut writers = Vec::with_capacity(threads);
    for t in 0..threads {
        let paths: Vec<(usize, PathBuf)> = (t..n)
            .step_by(threads)
            .map(|i| (i, lag_db_path(&dbs, i)))
            .collect();
        let halt = halt.clone();
        writers.push(std::thread::spawn(move || {
            lag_writer(paths, n, start, end, halt)
        }));
    }

    // Sample resources at steady state, halfway through.
    tokio::time::sleep_until((start + opts.duration / 2).into()).await;
    let fds = open_fds();
    let rss = proc_status_bytes("VmRSS:").unwrap_or(0);

    let joined = tokio::task::spawn_blocking(move || {
        writers.into_iter().map(|w| w.join()).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Error::invalid("bench lag", e.to_string()))?;
    let mut commits: Vec<Vec<Instant>> = vec![Vec::new(); n];
    let mut write_errors = 0u64;
    let mut failure = None;
    for j in joined {
        match j {
            Ok(Ok((per_db, errors))) => {
                write_errors += errors;
                for (i, times) in per_db {
                    commits[i] = times;
                }
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(Error::invalid("bench lag", "writer thread panicked")),
        }
    }
    halt.store(true, Ordering::Relaxed);
    // Let trailing commits ship on the regular schedule before the final sync.
    tokio::time::sleep(opts.sync_interval * 2 + Duration::from_millis(500)).await;
    stop.cancel();
    for s in streams {
        let _ = s.await;
    }
    log_stop.cancel();
    if let Some(w) = writer {
        let _ = w.await;
    }
    let shipped = collector
        .await
        .map_err(|e| Error::invalid("bench lag", e.to_string()))?;
    if let Some(e) = failure {
        return Err(e);
    }

    let mut lags = Vec::new();
    let mut unmatched = 0u64;
    let mut extra_snapshots = 0u64;
    for (times, s) in commits.iter().zip(&shipped) {
        extra_snapshots += s.snapshots.saturating_sub(1);
        let mut j = 0;
        for (k, c) in times.iter().enumerate() {
            let k = k as u64 + 1;
            while j < s.segments.len() && s.segments[j].0 < k {
                j += 1;
            }
            match s.segments.get(j) {
                Some(&(_, at)) => lags.push(at.saturating_duration_since(*c)),
                None => unmatched += 1,
            }
        }
    }
    lags.sort();
    let secs = |d: Duration| d.as_secs_f64();
    Ok(LagBench {
        databases: n,
        duration_s: opts.duration.as_secs_f64(),
        sync_interval_s: opts.sync_interval.as_secs_f64(),
        initial_snapshots_s,
        commits: commits.iter().map(|c| c.len() as u64).sum(),
        shipped: lags.len() as u64,
        unmatched,
        write_errors,
        extra_snapshots,
        checkpoints: stats.checkpoints.load(Ordering::Relaxed),
        log_objects: stats.log_objects.load(Ordering::Relaxed),
        hot_errors: stats.hot_errors.load(Ordering::Relaxed),
        lag_median_s: secs(percentile(&lags, 50.0)),
        lag_p90_s: secs(percentile(&lags, 90.0)),
        lag_p99_s: secs(percentile(&lags, 99.0)),
        lag_max_s: secs(lags.last().copied().unwrap_or_default()),
        open_fds: fds,
        rss_mib: rss as f64 / (1024.0 * 1024.0),
        peak_rss_mib: proc_status_bytes("VmHWM:").unwrap_or(0) as f64 / (1024.0 * 1024.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 90.0), Duration::from_millis(90));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&v, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
