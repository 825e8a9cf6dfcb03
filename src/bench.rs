//! Benchmarks (`litefleet bench ...`), not timed tests.
//!
//! `bench scan` builds (or reuses) a tree of tiny databases laid out like the
//! product's example pattern, tracks it, and reports the median time of a
//! full rescan with nothing changed, the same for `find -printf '%s %T@'` on
//! the same tree (the floor for "stat every file"), peak RSS, and the bytes
//! the tracking table holds per database.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::discover::Pattern;
use crate::track::Tracker;
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
    pub first_scan_ms: f64,
    pub rescan_median_ms: f64,
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

    let rss_before = proc_status_bytes("VmRSS:").unwrap_or(0);
    let mut tracker = Tracker::new();
    let t = Instant::now();
    let first = tracker.scan(&patterns);
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_after = proc_status_bytes("VmRSS:").unwrap_or(0);
    if first.databases != n {
        return Err(Error::invalid(
            dir.display(),
            format!("expected {n} databases, tracked {}", first.databases),
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
        rescan_median_ms: median(rescans).as_secs_f64() * 1e3,
        find_median_ms: (!finds.is_empty()).then(|| median(finds).as_secs_f64() * 1e3),
        table_bytes_per_db: tracker.heap_bytes() as f64 / n as f64,
        rss_delta_bytes_per_db: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        peak_rss_mib: proc_status_bytes("VmHWM:").unwrap_or(0) as f64 / (1024.0 * 1024.0),
    })
}
