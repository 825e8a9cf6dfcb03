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

use common::fleet::{create_db, insert_rows, Backend, Fleet};
use litefleet::capture::ship::{self, HotContext, HotExit, ShipConfig, ShipEvent};
use litefleet::stats::Stats;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The figure: `max-hot-databases` defaults to 1000.
const DATABASES: u64 = 1000;

/// Per hot database: two connections, each with the database, `-wal` and
/// `-shm` open (the WAL file we read frames from is opened per sync and
/// closed again). Measured: exactly 6.0. Anything above this is a leak.
const FDS_PER_DATABASE: usize = 6;

/// Longest wait for all databases to ship one round.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
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
    let f = Fleet::new(Backend::File).await;
    let paths: Vec<_> = (0..DATABASES)
        .map(|i| f.db_path("p", "d", &format!("t{i}")))
        .collect();
    for p in &paths {
        drop(create_db(p, 1));
    }
    let fds_before = open_fds();
    let rss_before = rss_kib();
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
        },
        stats,
        permits: Arc::new(Semaphore::new(100)),
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
    // A small write load: one transaction per database.
    let writer = {
        let paths = paths.clone();
        tokio::task::spawn_blocking(move || {
            for p in &paths {
                insert_rows(&rusqlite::Connection::open(p).unwrap(), 1);
            }
        })
    };
    writer.await.unwrap();
    round(&mut events, false).await;
    let fds = open_fds() - fds_before;
    let rss = rss_kib().saturating_sub(rss_before);
    println!(
        "{DATABASES} hot databases: {fds} file descriptors ({:.1} each), RSS +{} MiB ({:.0} KiB each)",
        fds as f64 / DATABASES as f64,
        rss / 1024,
        rss as f64 / DATABASES as f64
    );
    assert!(
        fds <= FDS_PER_DATABASE * DATABASES as usize,
        "{fds} file descriptors for {DATABASES} databases"
    );
    // Measured ~333 KiB per database (debug build): SQLite's page cache is
    // capped at 16 pages per connection and lookaside is off; the rest is
    // the -shm mapping and allocator arenas of the blocking threads.
    assert!(rss < 600 * 1024, "RSS grew by {rss} KiB");
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
