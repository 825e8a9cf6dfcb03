//! 1000 hot databases streaming at once with a small write load: file
//! descriptors and memory stay bounded, and stopping the streams (what going
//! cold does) gives every file descriptor back. Alone in its own test binary
//! so `/proc/self/fd` counts only this test. The figures are printed
//! (`cargo test --test hot_fleet -- --nocapture`); `litefleet bench lag`
//! measures the same setup over time.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::fleet::{create_db, Backend, Fleet};
use litefleet::capture::ship::{self, HotContext, HotExit, ShipConfig, ShipEvent};
use litefleet::stats::Stats;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The figure: `max-hot-databases` defaults to 1000.
const DATABASES: u64 = 1000;

/// Per hot database: one connection with the database, `-wal` and `-shm`
/// open, and the directory it pinned (`source::pin`; the WAL file we read
/// frames from is opened per sync and closed again; the spool file per
/// append). Measured: exactly 4.0 (3.0 before the pin). Anything above this
/// is a leak.
const FDS_PER_DATABASE: usize = 4;

/// Longest wait for all databases to ship one round.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A `kB` figure of `/proc/self/status`.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// Resident KiB of the `-shm` mappings: pages of the page cache that the
/// application maps too.
fn shm_kib() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut shm = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if shm {
                total += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        } else if !line.starts_with(char::is_uppercase) {
            shm = line.ends_with("-shm");
        }
    }
    total
}

fn sqlite_heap() -> i64 {
    // SAFETY: a plain read of SQLite's global counter.
    unsafe { rusqlite::ffi::sqlite3_memory_used() }
}

/// Waits until every database has shipped a snapshot (or a WAL segment).
async fn round(events: &mut UnboundedReceiver<ShipEvent>, want_snapshot: bool) {
    let mut seen = HashSet::new();
    tokio::time::timeout(ROUND_TIMEOUT, async {
        while (seen.len() as u64) < DATABASES {
            let e = events.recv().await.expect("streams running");
            if e.snapshot == want_snapshot {
                seen.insert(e.tag);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} databases shipped", seen.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_hot_databases_stay_bounded() {
    litefleet::cli::bench::raise_nofile_limit();
    // As the binary does first thing.
    litefleet::capture::configure_sqlite();
    let f = Fleet::new(Backend::File).await;
    let paths: Vec<_> = (0..DATABASES)
        .map(|i| f.db_path("p", "d", &format!("t{i}")))
        .collect();
    for p in &paths {
        drop(create_db(p, 1));
    }
    let fds_before = open_fds();
    let rss_before = rss_kib();
    let sqlite_before = sqlite_heap();
    let (tx, mut events) = unbounded_channel();
    let stats = Arc::new(Stats::default());
    let (log, writer) = litefleet::capture::fleetlog::FleetLog::new(
        f.replica(),
        Duration::from_secs(1),
        stats.clone(),
    );
    tokio::spawn(writer.run(CancellationToken::new()));
    let ctx = Arc::new(HotContext {
        replica: f.replica(),
        temp_dir: f.work.path().join("tmp"),
        cfg: ShipConfig {
            sync_interval: Duration::from_secs(1),
            checkpoint_pages: 1000,
            truncate_pages: 10_000,
            release_after: litefleet::source::config::DEFAULT_RELEASE_AFTER,
            consolidate_every: litefleet::source::config::DEFAULT_LOG_CONSOLIDATE,
            snapshot_interval: litefleet::source::config::DEFAULT_SNAPSHOT_INTERVAL,
            catch_up_parts: litefleet::capture::ship::CATCH_UP_PARTS,
        },
        stats,
        permits: Arc::new(Semaphore::new(100)),
        consolidation: litefleet::capture::fleetlog::consolidation_budget(),
        events: Some(tx),
        log: Some(log),
    });
    let stop = CancellationToken::new();
    let tasks: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            tokio::spawn(ship::stream(
                ctx.clone(),
                i as u64,
                p.clone(),
                format!("p/d/t{i}"),
                stop.clone(),
            ))
        })
        .collect();
    round(&mut events, true).await;
    // A small write load: one transaction per database, from another
    // process as applications are. (A connection of this process, once
    // closed, would leave its database descriptor open inside SQLite until
    // our streams close theirs: SQLite keeps it so as not to drop the POSIX
    // locks the process holds on that file.)
    let list = f.work.path().join("paths");
    std::fs::write(
        &list,
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let script = "import sqlite3, sys\n\
        for p in open(sys.argv[1]).read().split('\\n'):\n\
        \x20   c = sqlite3.connect(p, timeout=30)\n\
        \x20   c.execute(\"INSERT INTO t(v) VALUES ('row')\"); c.commit(); c.close()\n";
    let status = tokio::process::Command::new("python3")
        .args(["-c", script])
        .arg(&list)
        .status()
        .await
        .expect("python3 runs");
    assert!(status.success());
    round(&mut events, false).await;
    let fds = open_fds() - fds_before;
    let rss = rss_kib().saturating_sub(rss_before);
    let per = |kib: u64| kib as f64 / DATABASES as f64;
    let sqlite = (sqlite_heap() - sqlite_before).max(0) as u64 / 1024;
    let shm = shm_kib();
    println!(
        "{DATABASES} hot databases: {fds} file descriptors ({:.1} each), RSS +{} MiB ({:.0} KiB each: \
         {:.0} KiB -shm mapping, {:.0} KiB SQLite heap, {:.0} KiB the rest); {} threads",
        fds as f64 / DATABASES as f64,
        rss / 1024,
        per(rss),
        per(shm),
        per(sqlite),
        per(rss.saturating_sub(shm + sqlite)),
        status_kib("Threads:"),
    );
    assert!(
        fds <= FDS_PER_DATABASE * DATABASES as usize,
        "{fds} file descriptors for {DATABASES} databases"
    );
    // The bound: 100 KiB per hot database. Measured ~87 KiB (debug
    // build): 32 KiB of -shm mapping, ~24 KiB of SQLite heap (one
    // connection, a 2-page cache, no lookaside, no bulk page allocation),
    // the rest the stream's task and state and the bounded blocking pool.
    assert!(
        rss <= 100 * DATABASES,
        "RSS grew by {rss} KiB: {:.0} KiB per hot database",
        per(rss)
    );
    stop.cancel();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), HotExit::Clean));
    }
    let left = open_fds().saturating_sub(fds_before);
    assert!(
        left < 16,
        "{left} file descriptors still open after every stream stopped"
    );
}
