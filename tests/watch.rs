//! Change notifications: a write to a database that was idle reaches the
//! replica without waiting for the next scan (here an hour away), through
//! the cold tier (a rollback-journal database, uploaded by the re-check
//! itself) and through the hot tier (a WAL database, promoted by the
//! re-check and streamed).

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::fleet::{count_rows, insert_rows, Fleet};
use litefleet::daemon::scheduler::Replicator;
use tokio_util::sync::CancellationToken;

/// Bound on how long a notified write may take to reach the replica in
/// these tests: generous for a loaded CI machine, and still 360 times
/// shorter than the scan interval, so only a notification can explain it.
const WITHIN: Duration = Duration::from_secs(10);

fn create(path: &Path, journal_mode: &str, rows: usize) -> rusqlite::Connection {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = rusqlite::Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", journal_mode).unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    insert_rows(&c, rows);
    c
}

async fn restored_rows(f: &Fleet, key: &str) -> Option<i64> {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("r.db");
    f.restore(key, &o, None).await.ok()?;
    Some(count_rows(&o))
}

/// Starts `run` and waits for its first round (a full cycle, after which
/// the directories are watched).
async fn start(
    f: &Fleet,
) -> (
    Arc<Replicator>,
    tokio::sync::watch::Receiver<u64>,
    CancellationToken,
    tokio::task::JoinHandle<litefleet::Result<()>>,
) {
    let rep = Arc::new(f.replicator());
    let mut rounds = rep.rounds();
    let token = CancellationToken::new();
    let task = tokio::spawn(rep.clone().run(false, token.clone()));
    rounds.changed().await.unwrap();
    assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1);
    assert!(rep.stats().watched_dirs.load(Ordering::Relaxed) >= 1);
    (rep, rounds, token, task)
}

both_backends!(
    a_write_to_an_idle_cold_database_is_uploaded_without_a_scan,
    |backend| async move {
        let mut f = Fleet::with_yaml(backend, "").await;
        f.scan_interval = "1h";
        let path = f.db_path("p1", "orders", "acme");
        let c = create(&path, "delete", 3);
        let key = Fleet::key("p1", "orders", "acme");
        let (rep, mut rounds, token, task) = start(&f).await;
        assert_eq!(restored_rows(&f, &key).await, Some(3));

        insert_rows(&c, 4);
        // Each round after the first is a notified re-check: no scan is due.
        tokio::time::timeout(WITHIN, async {
            loop {
                rounds.changed().await.unwrap();
                if restored_rows(&f, &key).await == Some(7) {
                    break;
                }
            }
        })
        .await
        .expect("the write reached the replica within the bound");
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1);
        assert!(rep.stats().rechecks.load(Ordering::Relaxed) >= 1);

        // Written again within the scan interval: the notification is
        // noticed (a round runs) but the upload waits for the scan, so a
        // database written all the time costs one upload per scan, not one
        // per write.
        let uploads = rep.stats().uploads_ok.load(Ordering::Relaxed);
        insert_rows(&c, 2);
        tokio::time::timeout(WITHIN, rounds.changed())
            .await
            .expect("a round for the notification")
            .unwrap();
        assert_eq!(rep.stats().uploads_ok.load(Ordering::Relaxed), uploads);
        assert_eq!(restored_rows(&f, &key).await, Some(7));
        token.cancel();
        task.await.unwrap().unwrap();
        // The scan uploads it.
        let r = rep.cycle(&CancellationToken::new()).await;
        assert_eq!(r.uploaded, 1);
        assert_eq!(restored_rows(&f, &key).await, Some(9));
    }
);

both_backends!(
    a_write_to_an_idle_wal_database_is_streamed_without_a_scan,
    |backend| async move {
        let mut f = Fleet::with_yaml(backend, "  hot-duration: 1h\n  sync-interval: 50ms\n").await;
        f.scan_interval = "1h";
        let path = f.db_path("p1", "orders", "acme");
        let c = create(&path, "wal", 3);
        let key = Fleet::key("p1", "orders", "acme");
        let (rep, _rounds, token, task) = start(&f).await;
        assert_eq!(restored_rows(&f, &key).await, Some(3));
        assert_eq!(rep.stats().hot.load(Ordering::Relaxed), 0, "idle: cold");

        insert_rows(&c, 4);
        // The re-check promotes it; its stream ships on its own schedule,
        // which no round reports: poll the replica.
        let deadline = tokio::time::Instant::now() + WITHIN;
        while restored_rows(&f, &key).await != Some(7) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the write did not reach the replica within {WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1);
        assert!(rep.stats().hot_promotions.load(Ordering::Relaxed) >= 1);
        token.cancel();
        task.await.unwrap().unwrap();
    }
);
