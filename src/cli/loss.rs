//! `litefleet bench loss`: what a SIGKILL of `replicate` loses, for hot
//! databases and for databases that wake from idle.
//!
//! Creates `hot + waking` WAL databases (the waking ones aged an hour, so
//! they start cold) and runs the real `replicate` binary on a `file://`
//! replica. Hot databases get one commit per second each, all along. Each
//! round, every waking database gets 5 commits (the case: writes
//! into databases that had been idle), and at a random time after them
//! (uniform between 0 and twice `kill-after`, drawn from `seed`, so a kill
//! lands anywhere in the sync cycle and the run can be repeated) the
//! replicator is SIGKILLed, every database is restored from the replica as it is, and each
//! commit made before the kill that the restore lacks is counted as lost.
//! Then the lease is removed (as an operator who knows the process is dead
//! may) and the replicator restarted for the next round; a start that takes
//! over a deleted lease writes nothing for its TTL less the margin, so the
//! replicator runs with a 4 s `lease-ttl` and each round settles 3 s longer.
//!
//! Per class it reports the commits made before a kill, the commits lost,
//! and the *loss window*: per database and kill, how long before the kill
//! its oldest lost commit returned (0 when nothing was lost); p50, p99 and
//! max over databases and kills. The loss window is the commit-to-replica
//! lag seen at a random instant: the age of the oldest commit not yet in the
//! replica. The target: no commit older than `sync-interval` + 0.5 s lost,
//! in either class.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::soak::{
    age_databases, create_fleet, open_writer, soak_path, spawn_hot_writer, splitmix, SPLITMIX_GAMMA,
};
use crate::restore::{self, RestoreOptions, RestoreOutcome};
use crate::source::config::Loaded;
use crate::{Error, Result};

/// Commits into each waking database per round.
const WAKE_COMMITS: usize = 5;
/// The loss target beyond `sync-interval`: a commit older than
/// `sync-interval` + this may never be lost.
const TARGET_MARGIN: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Debug, Clone)]
pub struct LossOptions {
    pub hot: usize,
    pub waking: usize,
    pub kills: usize,
    /// Mean time from the waking databases' commits to the SIGKILL (each
    /// round draws it uniformly from 0 to twice this).
    pub kill_after: Duration,
    /// Seeds the kill times.
    pub seed: u64,
    pub sync_interval: Duration,
    pub scan_interval: Duration,
    pub dir: PathBuf,
}

/// One class of databases.
#[derive(Debug, Clone, Serialize)]
pub struct ClassLoss {
    pub class: &'static str,
    pub databases: usize,
    /// Commits returned before a kill, over all kills.
    pub commits: u64,
    pub lost: u64,
    /// Lost commits that had returned more than the target before the kill.
    pub lost_beyond_target: u64,
    pub window_p50_s: f64,
    pub window_p99_s: f64,
    pub window_max_s: f64,
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    pub kills: usize,
    pub seed: u64,
    /// Each round's time from the waking commits to the SIGKILL.
    pub kill_after_s: Vec<f64>,
    pub sync_interval_s: f64,
    pub target_s: f64,
    pub classes: Vec<ClassLoss>,
}

/// Commit times of each database (index: database), row id = position + 2
/// (row 1 is the seed).
type Log = Arc<Mutex<Vec<Vec<Instant>>>>;

fn commit(c: &rusqlite::Connection, path: &Path) -> Result<()> {
    c.execute("INSERT INTO t(v) VALUES ('loss')", [])
        .map(|_| ())
        .map_err(|e| Error::sqlite(path, e))
}

fn start(exe: &Path, config: &Path, log: &Path) -> Result<Child> {
    let err = std::fs::File::create(log).map_err(|e| Error::io(log, e))?;
    Command::new(exe)
        .args(["--log-level", "warn", "--config"])
        .arg(config)
        .arg("replicate")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(|e| Error::io(exe, e))
}

/// Restores database `i` as the replica holds it; its highest row id (0
/// when nothing is restorable).
async fn restored_rows(loaded: &Loaded, root: &Path, i: usize, out: &Path) -> Result<i64> {
    let _ = std::fs::remove_file(out);
    let replica = loaded.open_replica()?;
    let opts = RestoreOptions {
        target: soak_path(root, i).display().to_string(),
        output: out.to_path_buf(),
        timestamp: None,
        if_replica_exists: true,
        if_db_not_exists: false,
        allow_older: false,
    };
    match restore::restore(loaded, &replica, &opts).await? {
        RestoreOutcome::Restored { .. } => {
            let c = rusqlite::Connection::open(out).map_err(|e| Error::sqlite(out, e))?;
            c.query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
                .map_err(|e| Error::sqlite(out, e))
        }
        _ => Ok(0),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// The replicator's `lease-ttl`: short, because each round deletes the
/// killed holder's lease and the restart waits its TTL less the margin
/// before writing (3 s here, 45 s at the default).
const LEASE_TTL: Duration = Duration::from_secs(4);

/// Runs the benchmark (see the module docs).
pub async fn loss(opts: LossOptions) -> Result<LossReport> {
    let root = opts.dir.clone();
    let n = opts.hot + opts.waking;
    if n == 0 || opts.kills == 0 {
        return Err(Error::invalid("bench loss", "needs databases and kills"));
    }
    create_fleet(&root, n, "bench loss").await?;
    // The waking ones were written an hour ago, as far as the replicator
    // can tell: cold, not hot.
    age_databases(&root, opts.hot..n)?;
    let yaml = format!(
        "multi-db:\n  patterns: [\"{}/data/*/*.db\"]\n  scan-interval: {}ms\n  sync-interval: {}ms\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    url: file://{}\n    path: \"{{{{group}}}}/{{{{db}}}}\"\n    lease-ttl: {}ms\n",
        root.display(),
        opts.scan_interval.as_millis(),
        opts.sync_interval.as_millis(),
        root.join("tmp").display(),
        root.join("state").display(),
        root.join("replica").display(),
        LEASE_TTL.as_millis(),
    );
    let config = root.join("loss.yml");
    std::fs::write(&config, &yaml).map_err(|e| Error::io(&config, e))?;
    let loaded = Loaded::from_str(&yaml, "loss.yml", &root)?;
    let exe = std::env::current_exe().map_err(|e| Error::io("litefleet", e))?;
    let lease = root.join("replica").join(".litefleet").join("lease.json");

    let log: Log = Arc::new(Mutex::new(vec![Vec::new(); n]));
    let halt = Arc::new(AtomicBool::new(false));
    let hot_writer = {
        let log = log.clone();
        spawn_hot_writer(root.clone(), opts.hot, halt.clone(), move |i| {
            log.lock().unwrap_or_else(|p| p.into_inner())[i].push(Instant::now());
        })
    };
    let waking: Vec<rusqlite::Connection> = (opts.hot..n)
        .map(|i| open_writer(&soak_path(&root, i)))
        .collect::<Result<_>>()?;
    // Per class: commits before kills, lost, lost beyond target, windows.
    let mut tallies = [(0u64, 0u64, 0u64, Vec::new()), (0, 0, 0, Vec::new())];
    let target = opts.sync_interval + TARGET_MARGIN;
    let out = root.join("restored.db");
    let mut rng = opts.seed;
    let mut delays = Vec::new();
    for round in 0..opts.kills {
        let _ = std::fs::remove_file(&lease);
        let mut child = start(&exe, &config, &root.join(format!("replicate-{round}.log")))?;
        // Settle: the first round uploads every database; later ones catch
        // up after the restart (a scan, then the streams' first syncs).
        // After a kill the lease was deleted, and a start that takes over
        // a deleted lease writes nothing for its TTL less the margin.
        let takeover = if round == 0 {
            Duration::ZERO
        } else {
            LEASE_TTL - LEASE_TTL / 4
        };
        let settle =
            opts.scan_interval * 2 + Duration::from_secs(if round == 0 { 8 } else { 4 }) + takeover;
        tokio::time::sleep(settle).await;
        for (k, c) in waking.iter().enumerate() {
            let i = opts.hot + k;
            for _ in 0..WAKE_COMMITS {
                commit(c, &soak_path(&root, i))?;
                log.lock().unwrap_or_else(|p| p.into_inner())[i].push(Instant::now());
            }
        }
        // A uniform draw in [0, 2 × kill-after].
        let z = splitmix(rng);
        rng = rng.wrapping_add(SPLITMIX_GAMMA);
        let delay = opts
            .kill_after
            .mul_f64(2.0 * (z >> 11) as f64 / (1u64 << 53) as f64);
        delays.push(delay.as_secs_f64());
        tokio::time::sleep(delay).await;
        let _ = child.kill();
        let killed = Instant::now();
        let _ = child.wait();
        eprintln!(
            "round {}: SIGKILL {:.2} s after the waking commits; restoring {n} databases",
            round + 1,
            delay.as_secs_f64()
        );
        let commits: Vec<Vec<Instant>> = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (i, times) in commits.iter().enumerate() {
            let class = usize::from(i >= opts.hot);
            let rows = restored_rows(&loaded, &root, i, &out).await?;
            let before: Vec<&Instant> = times.iter().filter(|t| **t < killed).collect();
            let t = &mut tallies[class];
            t.0 += before.len() as u64;
            // Row ids: seed 1, then commit j has id j + 2.
            let lost: Vec<Duration> = before
                .iter()
                .enumerate()
                .filter(|(j, _)| (*j as i64 + 2) > rows)
                .map(|(_, c)| killed.duration_since(**c))
                .collect();
            t.1 += lost.len() as u64;
            t.2 += lost.iter().filter(|d| **d > target).count() as u64;
            t.3.push(lost.iter().max().map_or(0.0, |d| d.as_secs_f64()));
        }
    }
    halt.store(true, Ordering::Relaxed);
    hot_writer
        .join()
        .map_err(|_| Error::invalid("bench loss", "writer thread panicked"))??;
    let classes = tallies
        .into_iter()
        .zip([("hot", opts.hot), ("waking", opts.waking)])
        .map(
            |((commits, lost, beyond, mut windows), (class, databases))| {
                windows.sort_by(f64::total_cmp);
                ClassLoss {
                    class,
                    databases,
                    commits,
                    lost,
                    lost_beyond_target: beyond,
                    window_p50_s: percentile(&windows, 50.0),
                    window_p99_s: percentile(&windows, 99.0),
                    window_max_s: windows.last().copied().unwrap_or(0.0),
                }
            },
        )
        .collect();
    Ok(LossReport {
        kills: opts.kills,
        seed: opts.seed,
        kill_after_s: delays,
        sync_interval_s: opts.sync_interval.as_secs_f64(),
        target_s: target.as_secs_f64(),
        classes,
    })
}
