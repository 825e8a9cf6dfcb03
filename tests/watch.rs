//! Change notifications: a write to a database that was idle reaches the
//! replica without waiting for the next scan (here an hour away), through
//! the cold tier (a rollback-journal database, uploaded by the re-check
//! itself) and through the hot tier (a WAL database, promoted by the
//! re-check and streamed). A new database in a watched directory is added
//! and uploaded by the re-check too, after the same key check as at a scan;
//! a new file that is no database is rejected as at a scan.

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

/// A running replicator: its rounds, its stop, its task.
type Running = (
    Arc<Replicator>,
    tokio::sync::watch::Receiver<u64>,
    CancellationToken,
    tokio::task::JoinHandle<litefleet::Result<()>>,
);

/// Starts `run` and waits for its first round (a full cycle, after which
/// the directories are watched).
async fn start(f: &Fleet) -> Running {
    let (rep, rounds, token, task) = run_started(f).await;
    assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1);
    assert!(rep.stats().watched_dirs.load(Ordering::Relaxed) >= 1);
    (rep, rounds, token, task)
}

/// Starts `run` and waits for its first round.
async fn run_started(f: &Fleet) -> Running {
    let rep = Arc::new(f.replicator());
    let mut rounds = rep.rounds();
    let token = CancellationToken::new();
    let task = tokio::spawn(rep.clone().run(false, token.clone()));
    rounds.changed().await.unwrap();
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
        // A clean stop uploads what waits for the scan (black-box probes
        // H27, F27: it left it out, and said "shut down cleanly").
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(restored_rows(&f, &key).await, Some(9));
        let r = rep.cycle(&CancellationToken::new()).await;
        assert_eq!(r.uploaded, 0, "{r:?}");
    }
);

// A clean stop scans once more and uploads every database that changed
// since its last upload, also where no notification says so (watching
// off); a database never uploaded is left to the next start, so a stop
// does not wait for the rest of a first backup.
both_backends!(
    a_clean_stop_uploads_what_changed_since_the_last_scan,
    |backend| async move {
        let mut f = Fleet::with_yaml(backend, "  watch: false\n").await;
        f.scan_interval = "1h";
        let (key, c) = (
            Fleet::key("p1", "orders", "acme"),
            create(&f.db_path("p1", "orders", "acme"), "delete", 3),
        );
        let (rep, _, token, task) = run_started(&f).await;
        assert_eq!(restored_rows(&f, &key).await, Some(3));
        insert_rows(&c, 4);
        let new = f.db_path("p1", "orders", "bolt");
        drop(create(&new, "delete", 2));
        token.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(restored_rows(&f, &key).await, Some(7));
        let bolt = Fleet::key("p1", "orders", "bolt");
        assert_eq!(
            restored_rows(&f, &bolt).await,
            None,
            "a first upload at the stop"
        );
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 2);
    }
);

/// A WAL database `p1/orders/acme` of 3 rows, backed up by a running
/// replicator that streams what is written within the hour, syncs every
/// 50 ms and scans once an hour (after its first round).
async fn idle_wal_database(
    backend: common::fleet::Backend,
) -> (
    Fleet,
    std::path::PathBuf,
    String,
    rusqlite::Connection,
    Running,
) {
    let mut f = Fleet::with_yaml(backend, "  hot-duration: 1h\n  sync-interval: 50ms\n").await;
    f.scan_interval = "1h";
    let path = f.db_path("p1", "orders", "acme");
    let c = create(&path, "wal", 3);
    let key = Fleet::key("p1", "orders", "acme");
    let running = start(&f).await;
    (f, path, key, c, running)
}

both_backends!(
    a_write_to_an_idle_wal_database_is_streamed_without_a_scan,
    |backend| async move {
        let (f, _, key, c, (rep, _rounds, token, task)) = idle_wal_database(backend).await;
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

// A hot database replaced by a rollback-journal one the way the README
// asks (the application closed, the old `-wal` and `-shm` removed, the new
// file renamed over it): its stream cannot go on with it, and the cold tier
// uploads the new file as soon as the stream ends, not at the next scan, an
// hour away here (black-box probe M29: ~21 s, two scan intervals, during
// which the old file was restored as the latest).
both_backends!(
    a_hot_database_replaced_by_one_it_cannot_stream_is_uploaded_at_once,
    |backend| async move {
        let (f, path, key, c, (rep, _rounds, token, task)) = idle_wal_database(backend).await;
        insert_rows(&c, 4);
        until_streamed(&f, &rep, &key, 7).await;
        drop(c);
        for side in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", path.display()));
        }
        let new = path.with_extension("new");
        drop(create(&new, "delete", 20));
        std::fs::rename(&new, &path).unwrap();
        // (Between the removal and the rename the stream may start a
        // generation of the old file without its WAL, a database without
        // the table: not yet the new file.)
        let new_rows = || async {
            let out = tempfile::tempdir().unwrap();
            let o = out.path().join("r.db");
            f.restore(&key, &o, None).await.ok()?;
            rusqlite::Connection::open(&o)
                .ok()?
                .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .ok()
        };
        let deadline = tokio::time::Instant::now() + WITHIN;
        while new_rows().await != Some(20) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new file did not reach the replica within {WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1);
        token.cancel();
        task.await.unwrap().unwrap();
    }
);

// A hot database deleted with its side files and created again empty (the
// database written a moment later), as an application that recreates its
// file does: the stream's restart meets the empty file and cannot start,
// and the new database streams as soon as it is written, not `cold-after`
// (5 minutes here) later. It was kept cold that long, written all along
// (black-box probe O30: never streamed during 110 s of 4 commits a second,
// and its history in that hour no restore point).
both_backends!(
    a_database_created_again_streams_once_it_is_written,
    |backend| async move {
        let (f, path, key, c, (rep, _rounds, token, task)) = idle_wal_database(backend).await;
        insert_rows(&c, 4);
        until_streamed(&f, &rep, &key, 7).await;
        drop(c);
        let empty = path.with_extension("new");
        std::fs::File::create(&empty).unwrap();
        for side in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", path.display()));
        }
        std::fs::rename(&empty, &path).unwrap();
        let deadline = tokio::time::Instant::now() + WITHIN;
        while rep.stats().hot.load(Ordering::Relaxed) != 0 {
            assert!(tokio::time::Instant::now() < deadline, "still streaming");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let promoted = rep.stats().hot_promotions.load(Ordering::Relaxed);
        let c = create(&path, "wal", 2);
        let deadline = tokio::time::Instant::now() + WITHIN;
        while rep.stats().hot_promotions.load(Ordering::Relaxed) == promoted
            || rep.stats().hot.load(Ordering::Relaxed) != 1
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new database is not streamed within {WITHIN:?}"
            );
            insert_rows(&c, 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1);
        token.cancel();
        task.await.unwrap().unwrap();
    }
);

/// Polls until `rep` streams one database and `key` restores `rows` rows
/// (a stream ships on its own schedule, which no round reports).
async fn until_streamed(f: &Fleet, rep: &Replicator, key: &str, rows: i64) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while rep.stats().hot.load(Ordering::Relaxed) != 1 || restored_rows(f, key).await != Some(rows)
    {
        assert!(tokio::time::Instant::now() < deadline, "not streamed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits, round by round, until `done` holds; panics after [`WITHIN`].
async fn until<F, Fut>(rounds: &mut tokio::sync::watch::Receiver<u64>, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(WITHIN, async {
        while !done().await {
            rounds.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {WITHIN:?}"));
}

/// Waits for the round of a notification, stops `run`, then runs one full
/// cycle.
async fn round_then_scan(
    rep: &Replicator,
    rounds: &mut tokio::sync::watch::Receiver<u64>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<litefleet::Result<()>>,
) -> litefleet::daemon::scheduler::CycleReport {
    tokio::time::timeout(WITHIN, rounds.changed())
        .await
        .expect("a round for the notification")
        .unwrap();
    token.cancel();
    task.await.unwrap().unwrap();
    rep.cycle(&CancellationToken::new()).await
}

/// A fleet with one rollback-journal database, `p1/orders/acme` (3 rows),
/// scans an hour apart.
async fn one_database(backend: common::fleet::Backend) -> (Fleet, rusqlite::Connection) {
    let mut f = Fleet::with_yaml(backend, "").await;
    f.scan_interval = "1h";
    let c = create(&f.db_path("p1", "orders", "acme"), "delete", 3);
    (f, c)
}

both_backends!(
    a_new_database_in_a_watched_directory_is_uploaded_without_a_scan,
    |backend| async move {
        let (f, _old) = one_database(backend).await;
        let (rep, mut rounds, token, task) = start(&f).await;
        assert_eq!(rep.stats().databases.load(Ordering::Relaxed), 1);

        // Written in place by SQLite (created empty, then written), and
        // made elsewhere and renamed into place.
        let _newco = create(&f.db_path("p1", "orders", "newco"), "delete", 5);
        let made = f.work.path().join("made.db");
        drop(create(&made, "delete", 8));
        std::fs::rename(&made, f.db_path("p1", "orders", "moved")).unwrap();
        let (newco, moved) = (
            Fleet::key("p1", "orders", "newco"),
            Fleet::key("p1", "orders", "moved"),
        );
        let (fr, newco, moved) = (&f, newco.as_str(), moved.as_str());
        until(
            &mut rounds,
            "both new databases reached the replica",
            || async move {
                restored_rows(fr, newco).await == Some(5)
                    && restored_rows(fr, moved).await == Some(8)
            },
        )
        .await;
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1, "no scan ran");
        assert!(rep.stats().rechecks.load(Ordering::Relaxed) >= 1);
        assert_eq!(rep.tracked(), 3);
        assert_eq!(rep.stats().databases.load(Ordering::Relaxed), 3);

        token.cancel();
        task.await.unwrap().unwrap();
        // The scan finds nothing new.
        let r = rep.cycle(&CancellationToken::new()).await;
        assert_eq!((r.scan.new, r.scan.databases), (0, 3));
    }
);

both_backends!(
    a_new_file_that_is_no_database_in_a_watched_directory_is_not_uploaded,
    |backend| async move {
        let (f, _old) = one_database(backend).await;
        let (rep, mut rounds, token, task) = start(&f).await;
        let junk = f.db_path("p1", "orders", "junk");
        std::fs::write(&junk, b"hello, not a database").unwrap();
        // A file outside the patterns in the same directory: ignored.
        let notes = junk.with_file_name("notes.txt");
        std::fs::write(&notes, b"not matched").unwrap();
        // A database after them, so a round has seen all three once it is uploaded.
        let _new = create(&f.db_path("p1", "orders", "newco"), "delete", 2);
        let newco = Fleet::key("p1", "orders", "newco");
        let (fr, newco, repr) = (&f, newco.as_str(), &rep);
        // Both in one condition: newco's upload can land before the same
        // round drops junk.db, whose first snapshot fails (flaky-test
        // hunt: 4 of 736 loaded runs still tracked 3).
        until(
            &mut rounds,
            "the new database reached the replica, junk.db no longer tracked",
            || async move { repr.tracked() == 2 && restored_rows(fr, newco).await == Some(2) },
        )
        .await;
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1, "no scan ran");
        assert_eq!(rep.stats().databases.load(Ordering::Relaxed), 2);
        assert_eq!(rep.stats().uploads_failed.load(Ordering::Relaxed), 0);
        let junk_key = Fleet::key("p1", "orders", "junk");
        assert!(
            !f.objects().await.iter().any(|o| o.contains(&junk_key)),
            "{:?}",
            f.objects().await
        );

        // Written again, still no database: nothing of it is uploaded, at
        // the notification or at the scan (which may upload the others
        // once more: they were written just now, see RACY_WINDOW).
        std::fs::write(&junk, b"hello again, still not a database").unwrap();
        let r = round_then_scan(&rep, &mut rounds, token, task).await;
        assert_eq!((r.failed, r.scan.databases), (0, 2), "{r:?}");
        assert!(!f.objects().await.iter().any(|o| o.contains(&junk_key)));
        assert_eq!(rep.tracked(), 2);
    }
);

/// Patterns `*/*.db` then `*/*.sqlite`, both keyed `{{project}}/{{tenant}}`
/// (`p1/app.db` and `p1/app.sqlite` share `p1/app`), scans an hour apart.
fn two_pattern_yaml(f: &Fleet) -> String {
    let d = f.data.path().display();
    format!(
        "multi-db:\n  patterns: [\"{d}/*/*.db\", \"{d}/*/*.sqlite\"]\n  scan-interval: 1h\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    path: \"{{{{project}}}}/{{{{tenant}}}}\"\n{}",
        f.work.path().join("tmp").display(),
        f.work.path().join("state").display(),
        f.replica_yaml()
    )
}

fn two_pattern_loaded(f: &Fleet) -> litefleet::source::config::Loaded {
    litefleet::source::config::Loaded::from_str(&two_pattern_yaml(f), "test.yml", f.data.path())
        .unwrap()
}

/// Rows of `key` restored with the two-pattern config.
async fn restored_app_rows(f: &Fleet, key: &str) -> i64 {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("r.db");
    let loaded = two_pattern_loaded(f);
    let opts = litefleet::restore::RestoreOptions {
        target: key.to_string(),
        output: o.clone(),
        timestamp: None,
        if_replica_exists: false,
        if_db_not_exists: false,
        allow_older: false,
    };
    litefleet::restore::restore(&loaded, &loaded.open_replica().unwrap(), &opts)
        .await
        .unwrap();
    count_rows(&o)
}

both_backends!(
    a_new_database_with_a_taken_key_is_refused_without_a_scan,
    |backend| async move {
        let f = Fleet::new(backend).await;
        let loaded = two_pattern_loaded(&f);
        let _owner = create(&f.data.path().join("p1/app.sqlite"), "delete", 3);
        let rep = Arc::new(Replicator::new(loaded).unwrap());
        let mut rounds = rep.rounds();
        let token = CancellationToken::new();
        let task = tokio::spawn(rep.clone().run(false, token.clone()));
        rounds.changed().await.unwrap();
        assert_eq!(rep.stats().uploads_ok.load(Ordering::Relaxed), 1);
        assert_eq!(restored_app_rows(&f, "p1/app").await, 3);

        // app.db (the earlier pattern) appears: app.sqlite keeps the key,
        // and app.db is refused before anything of it is uploaded.
        let taker = create(&f.data.path().join("p1/app.db"), "delete", 10);
        let stats = rep.stats();
        let stats = &stats;
        until(&mut rounds, "app.db refused", || async move {
            stats.key_collisions.load(Ordering::Relaxed) == 1
        })
        .await;
        assert_eq!(rep.stats().scans.load(Ordering::Relaxed), 1, "no scan ran");
        assert_eq!(rep.tracked(), 2);
        assert_eq!(rep.stats().databases.load(Ordering::Relaxed), 2);
        assert_eq!(rep.stats().uploads_ok.load(Ordering::Relaxed), 1);
        assert_eq!(restored_app_rows(&f, "p1/app").await, 3);

        // Later writes to it are not uploaded either, nor at the scan
        // (which uploads app.sqlite once more: it was written just now,
        // see RACY_WINDOW).
        insert_rows(&taker, 1);
        let r = round_then_scan(&rep, &mut rounds, token, task).await;
        assert_eq!((r.scan.new, r.failed, r.refused), (0, 0, 1), "{r:?}");
        assert_eq!(restored_app_rows(&f, "p1/app").await, 3);
    }
);
