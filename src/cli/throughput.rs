//! `litefleet bench snapshot`: cold-tier throughput against the reference
//! tools, side by side in one run.
//!
//! This machine is shared and noisy, so every figure is a ratio to a
//! reference command run in the same round, on the same files, alternating
//! with litefleet; each round is repeated and the median reported:
//!
//! * **many small databases**: one `replicate --once` cycle (the real
//!   [`Replicator`], cold tier only, to a fresh `file://` replica, fsyncs
//!   included) against `find -print0 | xargs -0 -P2 -n 500 lz4 -q -m` over
//!   a copy of the same files (compression only: no consistency, no
//!   durability; the floor for "read, compress, write every file"), by
//!   wall time and by CPU time (user + system, `getrusage`), which other
//!   jobs on a shared machine disturb less; and against the *consistency
//!   floor* (`consistency_floor`): the least a checked, consistent copy
//!   of each database costs through SQLite (open read-only, one read
//!   transaction with `quick_check`, read the file through SQLite's handle,
//!   LZ4, write one file; one thread, no `fsync`, no directories), which
//!   tells the part of the gap to `lz4` that SQLite's consistency takes
//!   from the part that is litefleet's own;
//! * **one large database**: the same cycle on one database against
//!   `sqlite3 .backup` + `lz4` (a consistent compressed copy with the stock
//!   tools) and raw `lz4` of the file (the limit: one read, one write);
//! * **restore** of that database (download, decompress, fsync,
//!   `integrity_check`, atomic install) against `lz4 -d` alone and `lz4 -d`
//!   followed by `sqlite3 'PRAGMA integrity_check'` (the floor for a checked
//!   restore).
//!
//! The reference tools must be on `PATH` (`apt install lz4 sqlite3`).
//! Everything runs warm (the files are read once before the first round):
//! the figures compare CPU and syscall work, not the disk. Every timed
//! step starts with nothing dirty (`settle`, an untimed `sync`), so that
//! no side pays for writing back what another left: litefleet's `syncfs`
//! would otherwise write back the copies and outputs the reference steps
//! before it left in the page cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::bench::{build_tree, PATTERN};
use crate::daemon::scheduler::Replicator;
use crate::restore::{RestoreOptions, RestoreOutcome};
use crate::source::config::Loaded;
use crate::{Error, Result};

/// Files per `lz4` process in the small-database reference: large enough
/// that process start-up is not what is measured, as the issue's reference.
const LZ4_BATCH: usize = 500;
/// Bytes per row of the large database: 400 random bytes (incompressible)
/// and 600 zero bytes, so it compresses about 2.3x like typical table data.
const ROW_RANDOM: usize = 400;
const ROW_ZERO: usize = 600;

/// What to run.
#[derive(Debug, Clone)]
pub struct SnapshotBenchOptions {
    pub databases: usize,
    pub large_mb: u64,
    pub repeat: usize,
    pub dir: PathBuf,
}

/// One measured pair (or triple): median seconds of each command.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub what: String,
    pub litefleet_s: f64,
    pub reference: String,
    pub reference_s: f64,
    /// litefleet time / reference time: below 1 is faster than the reference.
    pub ratio: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotBenchReport {
    pub databases: usize,
    pub small_db_bytes: u64,
    pub large_db_bytes: u64,
    pub repeat: usize,
    pub rows: Vec<Row>,
    /// Most threads of this process during a small-database cycle (median
    /// over rounds; the sampling thread not counted), and before the first.
    pub small_peak_threads: u64,
    pub idle_threads: u64,
    /// CPU seconds (user + system, median over rounds) of the small-database
    /// cycle and of its reference: steadier than wall time on a shared
    /// machine, where other jobs' load stretches both.
    pub small_cpu_s: f64,
    pub small_reference_cpu_s: f64,
    /// CPU seconds of the consistency floor (see the module docs) over the same databases
    /// (median over rounds).
    pub small_floor_cpu_s: f64,
}

/// The consistency floor of one round: for each database of `paths`, on
/// this thread, what any checked, consistent snapshot through SQLite must
/// do (open it read-only, start one read transaction with `quick_check`,
/// read the file through SQLite's own handle, LZ4-compress it) and write
/// the result to one file in `out` (no `fsync`, no directory per
/// database); returns the CPU seconds this thread used. A reference, not
/// litefleet's code: it neither looks at the WAL nor syncs anything.
fn consistency_floor(paths: &[PathBuf], out: &Path) -> Result<f64> {
    use std::io::Write;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cpu = cpu_seconds(libc::RUSAGE_THREAD);
    for (i, p) in paths.iter().enumerate() {
        let sql = |e| Error::sqlite(p, e);
        let conn = rusqlite::Connection::open_with_flags(
            p,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.execute_batch("BEGIN").map_err(sql)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(sql)?;
        let file = crate::capture::snapshot::connection_file(&conn, p)?;
        let len = file.size().map_err(|e| Error::io(p, e))?;
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        file.read_exact_at(&mut data, 0)
            .map_err(|e| Error::io(p, e))?;
        if check != "ok" {
            return Err(Error::invalid(p.display(), format!("quick_check: {check}")));
        }
        let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
        enc.write_all(&data).map_err(|e| Error::io(p, e))?;
        let lz4 = enc
            .finish()
            .map_err(|e| Error::invalid(p.display(), format!("lz4: {e}")))?;
        let dst = out.join(format!("{i}.db.lz4"));
        std::fs::write(&dst, lz4).map_err(|e| Error::io(&dst, e))?;
    }
    Ok(cpu_seconds(libc::RUSAGE_THREAD) - cpu)
}

/// User + system CPU seconds used so far by this process
/// (`libc::RUSAGE_SELF`), by its children that were waited for
/// (`libc::RUSAGE_CHILDREN`) or by the calling thread
/// (`libc::RUSAGE_THREAD`); 0 if the system does not say.
fn cpu_seconds(who: i32) -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `sh -c script` and returns its wall time; a failure is an error.
fn timed_sh(script: &str) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .map_err(|e| Error::invalid("bench snapshot", format!("cannot run sh: {e}")))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Error::invalid(
            "bench snapshot",
            format!(
                "reference command failed: {script}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(secs)
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

fn require_tools() -> Result<()> {
    for tool in ["lz4", "sqlite3", "find", "xargs"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Err(Error::invalid(
                "bench snapshot",
                format!("the reference tool `{tool}` is not on PATH (apt install lz4 sqlite3)"),
            ));
        }
    }
    Ok(())
}

/// A cold-tier-only config for `pattern`, replicating to `replica`.
fn config(pattern: &Path, work: &Path, replica: &Path) -> Result<Loaded> {
    let yaml = format!(
        "multi-db:\n  patterns: [\"{}\"]\n  max-hot-databases: 0\n  watch: false\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    url: file://{}\n",
        pattern.display(),
        work.join("tmp").display(),
        replica.with_extension("state").display(),
        replica.display(),
    );
    Loaded::from_str(&yaml, "bench-snapshot.yml", work)
}

/// Threads of this process now (`/proc/self/status`; 0 where there is none).
fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Writes back everything dirty (`sync(2)`), untimed, before a timed
/// step (see the module docs).
fn settle() {
    // SAFETY: `sync` takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// How often the thread count is sampled during a cycle.
const THREAD_SAMPLE: Duration = Duration::from_millis(5);

/// One `replicate --once` cycle into a fresh replica; returns seconds and
/// the most threads the process had meanwhile.
async fn litefleet_cycle(
    pattern: &Path,
    work: &Path,
    round: usize,
    expect: usize,
) -> Result<(f64, u64)> {
    let replica = work.join(format!("replica-{round}"));
    let loaded = config(pattern, work, &replica)?;
    let replicator = Replicator::new(loaded)?;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(threads());
                std::thread::sleep(THREAD_SAMPLE);
            }
            // Not counting the sampler itself.
            peak.saturating_sub(1)
        })
    };
    settle();
    let start = Instant::now();
    let r = replicator.cycle(&CancellationToken::new()).await;
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    if r.uploaded != expect || r.failed > 0 {
        return Err(Error::invalid(
            "bench snapshot",
            format!(
                "expected {expect} uploads, got {} ({} failed)",
                r.uploaded, r.failed
            ),
        ));
    }
    Ok((secs, peak))
}

fn remove(p: &Path) -> Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e)),
        Ok(_) => std::fs::remove_file(p).map_err(|e| Error::io(p, e)),
        Err(_) => Ok(()),
    }
}

/// Builds the large database (reused when it already has the size).
fn build_large(path: &Path, mb: u64) -> Result<()> {
    let rows = mb * 1024 * 1024 / (ROW_RANDOM + ROW_ZERO) as u64;
    let marker = path.with_extension("rows");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(&rows.to_string()) {
        return Ok(());
    }
    remove(path)?;
    let dir = path.parent().expect("has parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = rusqlite::Connection::open(path).map_err(|e| Error::sqlite(path, e))?;
    c.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {rows})
         INSERT INTO t SELECT x, randomblob({ROW_RANDOM}) || zeroblob({ROW_ZERO}) FROM n;
         PRAGMA wal_checkpoint(TRUNCATE);"
    ))
    .map_err(|e| Error::sqlite(path, e))?;
    drop(c);
    std::fs::write(&marker, rows.to_string()).map_err(|e| Error::io(&marker, e))
}

/// Runs the benchmark (see the module docs).
pub async fn snapshot_bench(opts: SnapshotBenchOptions) -> Result<SnapshotBenchReport> {
    require_tools()?;
    if opts.repeat == 0 || opts.databases == 0 {
        return Err(Error::invalid(
            "bench snapshot",
            "--repeat and --databases must be at least 1",
        ));
    }
    let dir = opts.dir.clone();
    let small = dir.join("small");
    let large_dir = dir.join("large");
    let large = large_dir.join("big.db");
    let work = dir.join("work");
    let (n, mb) = (opts.databases, opts.large_mb);
    {
        let (small, large) = (small.clone(), large.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            build_tree(&small, n)?;
            build_large(&large, mb)
        })
        .await
        .map_err(|e| Error::invalid("bench snapshot", e.to_string()))??;
    }
    // The reference's copies, one per round (lz4 -m writes next to its
    // inputs); earlier runs' are removed.
    let copy = |round: usize| dir.join(format!("small-lz4-{round}"));
    for round in 0..opts.repeat {
        remove(&copy(round))?;
    }
    remove(&work)?;
    // Warm the page cache for everyone.
    timed_sh(&format!(
        "cat {} >/dev/null && find {} -type f -exec cat {{}} + >/dev/null",
        sh_quote(&large),
        sh_quote(&small)
    ))?;

    let small_pattern = small.join(PATTERN);
    let large_pattern = large_dir.join("*.db");
    let mut rows = Vec::new();
    let (mut lf, mut rf, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    let (mut lf_cpu, mut rf_cpu) = (Vec::new(), Vec::new());
    let (mut floor, mut floor_cpu) = (Vec::new(), Vec::new());
    let small_paths: Arc<Vec<PathBuf>> = Arc::new(
        (0..n)
            .map(|i| super::bench::bench_path(&small, i))
            .collect(),
    );
    let floor_out = |round: usize| work.join(format!("floor-{round}"));
    let idle_threads = threads();
    // Each round writes into directories of its own and nothing is deleted
    // until the end. Where ext4 runs without a journal (this machine's
    // disk), it skips inodes deleted within the last minute or more when
    // it allocates one, reading their inode tables: right after deleting
    // the last round's objects that was 65% of a round's CPU (perf), and
    // it weighs on litefleet twice (a key directory and an object per
    // database, against one output file).
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    for round in 0..opts.repeat {
        let cpu = cpu_seconds(libc::RUSAGE_SELF);
        let (secs, peak) = litefleet_cycle(&small_pattern, &work, round, n).await?;
        lf_cpu.push(cpu_seconds(libc::RUSAGE_SELF) - cpu);
        lf.push(secs);
        peaks.push(peak as f64);
        let copy = copy(round);
        timed_sh(&format!("cp -r {} {}", sh_quote(&small), sh_quote(&copy)))?;
        settle();
        let cpu = cpu_seconds(libc::RUSAGE_CHILDREN);
        rf.push(timed_sh(&format!(
            "find {} -name '*.db' -print0 | xargs -0 -P2 -n {LZ4_BATCH} lz4 -q -m",
            sh_quote(&copy)
        ))?);
        rf_cpu.push(cpu_seconds(libc::RUSAGE_CHILDREN) - cpu);
        let (paths, out) = (small_paths.clone(), floor_out(round));
        settle();
        let start = Instant::now();
        let cpu = tokio::task::spawn_blocking(move || consistency_floor(&paths, &out))
            .await
            .map_err(|e| Error::invalid("bench snapshot", e.to_string()))??;
        floor.push(start.elapsed().as_secs_f64());
        floor_cpu.push(cpu);
    }
    rows.push(row(
        format!("{n} small databases, replicate --once"),
        &lf,
        format!("find | xargs -0 -P2 -n {LZ4_BATCH} lz4 -q -m"),
        &rf,
    ));
    rows.push(row(
        format!("{n} small databases, replicate --once"),
        &lf,
        "consistency floor, one thread".into(),
        &floor,
    ));

    let (mut lf, mut backup, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let ref_copy = work.join("ref-copy.db");
    let ref_lz4 = work.join("ref-copy.db.lz4");
    let raw_lz4 = dir.join("raw.db.lz4");
    for round in 0..opts.repeat {
        remove(&work)?;
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        lf.push(litefleet_cycle(&large_pattern, &work, round, 1).await?.0);
        settle();
        backup.push(timed_sh(&format!(
            "sqlite3 {} \".backup {}\" && lz4 -q -f {} {}",
            sh_quote(&large),
            ref_copy.display(),
            sh_quote(&ref_copy),
            sh_quote(&ref_lz4)
        ))?);
        remove(&raw_lz4)?;
        settle();
        raw.push(timed_sh(&format!(
            "lz4 -q -f {} {}",
            sh_quote(&large),
            sh_quote(&raw_lz4)
        ))?);
    }
    let large_bytes = std::fs::metadata(&large)
        .map_err(|e| Error::io(&large, e))?
        .len();
    rows.push(row(
        format!(
            "one {} MB database, replicate --once",
            large_bytes / 1_000_000
        ),
        &lf,
        "sqlite3 .backup + lz4".into(),
        &backup,
    ));
    rows.push(row(
        format!(
            "one {} MB database, replicate --once",
            large_bytes / 1_000_000
        ),
        &lf,
        "raw lz4 of the file".into(),
        &raw,
    ));

    // Restore the large database from the last round's replica.
    let replica = work.join(format!("replica-{}", opts.repeat - 1));
    let loaded = config(&large_pattern, &work, &replica)?;
    let store = loaded.open_existing_replica()?;
    let (mut lf, mut dec, mut dec_check) = (Vec::new(), Vec::new(), Vec::new());
    let out = dir.join("restored.db");
    let ref_out = dir.join("ref-restored.db");
    for _ in 0..opts.repeat {
        remove(&out)?;
        let ropts = RestoreOptions {
            target: "big".into(),
            output: out.clone(),
            timestamp: None,
            if_replica_exists: false,
            if_db_not_exists: false,
            allow_older: false,
        };
        settle();
        let start = Instant::now();
        match crate::restore::restore(&loaded, &store, &ropts).await? {
            RestoreOutcome::Restored { .. } => {}
            other => {
                return Err(Error::invalid(
                    "bench snapshot",
                    format!("restore did not restore: {other:?}"),
                ))
            }
        }
        lf.push(start.elapsed().as_secs_f64());
        remove(&ref_out)?;
        settle();
        dec.push(timed_sh(&format!(
            "lz4 -d -q -f {} {}",
            sh_quote(&raw_lz4),
            sh_quote(&ref_out)
        ))?);
        remove(&ref_out)?;
        settle();
        dec_check.push(timed_sh(&format!(
            "lz4 -d -q -f {} {} && sqlite3 {} 'PRAGMA integrity_check' | grep -qx ok",
            sh_quote(&raw_lz4),
            sh_quote(&ref_out),
            sh_quote(&ref_out)
        ))?);
    }
    rows.push(row(
        "restore of that database".into(),
        &lf,
        "lz4 -d".into(),
        &dec,
    ));
    rows.push(row(
        "restore of that database".into(),
        &lf,
        "lz4 -d + sqlite3 integrity_check".into(),
        &dec_check,
    ));
    for p in [&out, &ref_out, &raw_lz4, &work] {
        remove(p)?;
    }
    for round in 0..opts.repeat {
        remove(&copy(round))?;
    }
    let small_db_bytes = std::fs::metadata(super::bench::bench_path(&small, 0))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(SnapshotBenchReport {
        databases: n,
        small_db_bytes,
        large_db_bytes: large_bytes,
        repeat: opts.repeat,
        rows,
        small_peak_threads: median(peaks) as u64,
        idle_threads,
        small_cpu_s: median(lf_cpu),
        small_reference_cpu_s: median(rf_cpu),
        small_floor_cpu_s: median(floor_cpu),
    })
}

fn row(what: String, lf: &[f64], reference: String, rf: &[f64]) -> Row {
    let (l, r) = (median(lf.to_vec()), median(rf.to_vec()));
    Row {
        what,
        litefleet_s: l,
        reference,
        reference_s: r,
        ratio: l / r.max(f64::EPSILON),
    }
}

/// The report as a table.
pub fn print(r: &SnapshotBenchReport) {
    println!(
        "bench snapshot: {} small databases ({} B each), one {:.0} MB database, median of {}",
        r.databases,
        r.small_db_bytes,
        r.large_db_bytes as f64 / 1e6,
        r.repeat
    );
    println!(
        "{:<44} {:>11} {:<36} {:>11} {:>7}",
        "what", "litefleet", "reference", "reference", "ratio"
    );
    for row in &r.rows {
        println!(
            "{:<44} {:>10.3}s {:<36} {:>10.3}s {:>6.2}x",
            row.what, row.litefleet_s, row.reference, row.reference_s, row.ratio
        );
    }
    println!(
        "threads during the small-database cycle: {} at most (median of rounds), {} before it",
        r.small_peak_threads, r.idle_threads
    );
    println!(
        "CPU (user + system) of the small-database cycle: {:.3}s, reference {:.3}s, ratio {:.2}x",
        r.small_cpu_s,
        r.small_reference_cpu_s,
        r.small_cpu_s / r.small_reference_cpu_s.max(f64::EPSILON)
    );
    println!(
        "CPU of the consistency floor: {:.3}s ({:.2}x the reference); the cycle is {:.2}x the floor",
        r.small_floor_cpu_s,
        r.small_floor_cpu_s / r.small_reference_cpu_s.max(f64::EPSILON),
        r.small_cpu_s / r.small_floor_cpu_s.max(f64::EPSILON)
    );
}
