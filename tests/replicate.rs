//! Replicate, restore and retention against the in-process S3 server and file://.

mod common;

use object_store::ObjectStoreExt;
use std::time::Duration;

use chrono::Utc;
use common::fleet::{age, count_rows, create_db, insert_rows, Fleet};
use litefleet::replica::{cold, layout};
use litefleet::restore::RestoreOutcome;
use tokio_util::sync::CancellationToken;

both_backends!(replicate_then_restore_by_key_and_path, |b| async move {
    let f = Fleet::new(b).await;
    let mut paths = Vec::new();
    for (i, (p, d, t)) in [
        ("p1", "orders", "acme"),
        ("p1", "orders", "zeta"),
        ("p2", "users", "acme"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = f.db_path(p, d, t);
        drop(create_db(&path, 10 + i));
        paths.push((path, Fleet::key(p, d, t), 10 + i as i64));
    }
    let r = f.replicator().cycle(&CancellationToken::new()).await;
    assert_eq!((r.scan.databases, r.uploaded, r.failed), (3, 3, 0));

    let out = tempfile::tempdir().unwrap();
    for (i, (path, key, rows)) in paths.iter().enumerate() {
        let o = out.path().join(format!("by-key-{i}.db"));
        let res = f.restore(key, &o, None).await.unwrap();
        assert!(matches!(res, RestoreOutcome::Restored { .. }), "{res:?}");
        assert_eq!(count_rows(&o), *rows);
        let o = out.path().join(format!("by-path-{i}.db"));
        f.restore(path.to_str().unwrap(), &o, None).await.unwrap();
        assert_eq!(count_rows(&o), *rows);
    }
    let listed = litefleet::restore::list(&f.replica(), None).await.unwrap();
    let keys: Vec<_> = listed.keys().cloned().collect();
    assert_eq!(
        keys,
        vec!["p1/orders/acme", "p1/orders/zeta", "p2/users/acme"]
    );
});

both_backends!(unchanged_database_is_not_uploaded_again, |b| async move {
    let f = Fleet::new(b).await;
    let a = f.db_path("p", "d", "a");
    let c = f.db_path("p", "d", "c");
    drop(create_db(&a, 1));
    drop(create_db(&c, 1));
    age(&a);
    age(&c);
    let rep = f.replicator();
    let token = CancellationToken::new();
    assert_eq!(rep.cycle(&token).await.uploaded, 2);
    let requests = f.s3.as_ref().map(|s| s.request_count());
    let r = rep.cycle(&token).await;
    assert_eq!((r.uploaded, r.scan.changed, r.scan.pending), (0, 0, 0));
    // A scan of unchanged databases costs no request at all.
    assert_eq!(f.s3.as_ref().map(|s| s.request_count()), requests);

    // A write makes exactly that database upload again.
    let conn = rusqlite::Connection::open(&a).unwrap();
    insert_rows(&conn, 5);
    drop(conn);
    age(&a);
    let r = rep.cycle(&token).await;
    assert_eq!((r.scan.changed, r.uploaded), (1, 1));
    assert_eq!(rep.cycle(&token).await.uploaded, 0);

    // A restarted replicator remembers what it uploaded (state file).
    let again = f.replicator();
    assert_eq!(again.cycle(&token).await.uploaded, 0);
    let out = tempfile::tempdir().unwrap();
    f.restore("p/d/a", &out.path().join("a.db"), None)
        .await
        .unwrap();
    assert_eq!(count_rows(&out.path().join("a.db")), 6);
});

both_backends!(wal_frames_not_checkpointed_are_restored, |b| async move {
    let f = Fleet::new(b).await;
    let path = f.db_path("p", "d", "walled");
    let conn = create_db(&path, 0);
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    insert_rows(&conn, 123);
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .unwrap()
        .len();
    assert!(wal > 0, "writes must still be in the WAL");
    let r = f.replicator().cycle(&CancellationToken::new()).await;
    assert_eq!(r.uploaded, 1);
    // The application's connection is still open and its WAL untouched.
    assert_eq!(
        std::fs::metadata(path.with_extension("db-wal"))
            .unwrap()
            .len(),
        wal
    );
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("r.db");
    f.restore("p/d/walled", &o, None).await.unwrap();
    assert_eq!(count_rows(&o), 123);
    drop(conn);
});

both_backends!(
    concurrent_writer_yields_a_committed_prefix,
    |b| async move {
        let f = Fleet::new(b).await;
        let path = f.db_path("p", "d", "busy");
        drop(create_db(&path, 0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = rusqlite::Connection::open(&path).unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                let mut n = 0i64;
                // Numbered transactions: each inserts id n with a large-ish payload.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 50 {
                    n += 1;
                    c.execute("INSERT INTO t(id, v) VALUES (?1, randomblob(3000))", [n])
                        .unwrap();
                }
                n
            })
        };
        let rep = f.replicator();
        let token = CancellationToken::new();
        let out = tempfile::tempdir().unwrap();
        for round in 0..4 {
            let r = rep.cycle(&token).await;
            assert_eq!(r.failed, 0);
            let o = out.path().join(format!("r{round}.db"));
            f.restore("p/d/busy", &o, None).await.unwrap();
            // Prefix property: ids 1..=k with no gap, whatever k was at snapshot time.
            let c = rusqlite::Connection::open(&o).unwrap();
            let (count, max): (i64, Option<i64>) = c
                .query_row("SELECT count(*), max(id) FROM t", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap();
            assert_eq!(
                max.unwrap_or(0),
                count,
                "round {round}: a gap in committed transactions"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let total = writer.join().unwrap();
        assert!(total >= 50);
    }
);

both_backends!(snapshot_named_after_the_next_hour, |b| async move {
    let f = Fleet::new(b).await;
    drop(create_db(&f.db_path("p", "d", "t1"), 1));
    let before = Utc::now();
    f.replicator().cycle(&CancellationToken::new()).await;
    let after = Utc::now();
    let prefix = match b {
        common::fleet::Backend::S3 => object_store::path::Path::from("fleet"),
        common::fleet::Backend::File => object_store::path::Path::default(),
    };
    let expected: Vec<String> = [before, after]
        .iter()
        .map(|t| cold::snapshot_path(&prefix, "p/d/t1", "t1", *t).to_string())
        .collect();
    let objects = f.objects().await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert!(
        expected.contains(&objects[0]),
        "{objects:?} not in {expected:?}"
    );
    let name = objects[0].rsplit('/').next().unwrap();
    let parsed = cold::parse_snapshot_name(name).unwrap();
    assert!(parsed.hour > before && parsed.hour <= after + chrono::Duration::hours(1));
    assert_eq!(parsed.hour.format("%M%S").to_string(), "0000");

    // A second change within the hour overwrites the same object.
    let p = f.db_path("p", "d", "t1");
    let c = rusqlite::Connection::open(&p).unwrap();
    insert_rows(&c, 3);
    drop(c);
    let r = f.replicator().cycle(&CancellationToken::new()).await;
    assert_eq!(r.uploaded, 1);
    if Utc::now() < parsed.hour {
        assert_eq!(f.objects().await.len(), 1);
    }
});

// A cold snapshot named by a clock that ran ahead (two days here) would
// hide every later upload named by the right time: a latest restore
// returned its older state with exit 0 for two days (probe J). Such a
// restore now fails naming it; one at a time picks the newest copy
// complete by then.
both_backends!(
    a_snapshot_named_in_the_future_is_not_the_newest,
    |b| async move {
        let f = Fleet::new(b).await;
        let db = f.db_path("p", "d", "a");
        let c = create_db(&db, 3);
        age(&db);
        let r = f.replicator();
        assert_eq!(r.cycle(&CancellationToken::new()).await.uploaded, 1);
        let replica = f.replica();
        let key = Fleet::key("p", "d", "a");
        let now_obj = cold::snapshots(&replica, &key).await.unwrap().remove(0);
        // The same copy, as a host two days ahead would have named and dated it.
        let ahead = Utc::now() + chrono::Duration::days(2);
        let mut bytes = replica
            .get_bytes(&now_obj.location)
            .await
            .unwrap()
            .unwrap()
            .to_vec();
        let times = cold::SnapshotTimes {
            started: ahead - chrono::Duration::seconds(1),
            taken: ahead,
        };
        bytes[..cold::RECORD_LEN].copy_from_slice(&times.encode_for(&key));
        let future = cold::snapshot_path(&replica.prefix, &key, "a", ahead);
        replica.store.put(&future, bytes.into()).await.unwrap();
        insert_rows(&c, 4);
        age(&db);
        assert_eq!(r.cycle(&CancellationToken::new()).await.uploaded, 1);
        let out = f.work.path().join("latest.db");
        let e = f.restore(&key, &out, None).await.unwrap_err().to_string();
        assert!(
            e.contains(future.as_ref()) && e.contains("ran ahead"),
            "{e}"
        );
        assert!(!out.exists());
        assert!(matches!(
            f.restore(&key, &out, Some(Utc::now())).await.unwrap(),
            RestoreOutcome::Restored { .. }
        ));
        assert_eq!(count_rows(&out), 7);
        // Three hours ahead, under the 12 hours a restore compares with its
        // own clock: the store dated the later upload later.
        std::fs::remove_file(&out).unwrap();
        let db = f.db_path("p", "d", "b");
        let c = create_db(&db, 2);
        age(&db);
        assert_eq!(r.cycle(&CancellationToken::new()).await.uploaded, 1);
        let key = Fleet::key("p", "d", "b");
        let now_obj = cold::snapshots(&replica, &key).await.unwrap().remove(0);
        let ahead = Utc::now() + chrono::Duration::hours(3);
        let bytes = replica.get_bytes(&now_obj.location).await.unwrap().unwrap();
        let future = cold::snapshot_path(&replica.prefix, &key, "b", ahead);
        replica.store.put(&future, bytes.into()).await.unwrap();
        // Store dates have whole seconds on some backends.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        insert_rows(&c, 4);
        age(&db);
        assert_eq!(r.cycle(&CancellationToken::new()).await.uploaded, 1);
        let e = f.restore(&key, &out, None).await.unwrap_err().to_string();
        assert!(
            e.contains(future.as_ref()) && e.contains("ran ahead"),
            "{e}"
        );
        assert!(!out.exists());
    }
);

both_backends!(retention_deletes_old_and_keeps_newest, |b| async move {
    let f = Fleet::new(b).await;
    let replica = f.replica();
    let now = Utc::now();
    let days = |d: i64| now - chrono::Duration::days(d);
    let put = |key, stem, t| f.put_cold_snapshot(key, stem, t);
    let a_old1 = put("p/d/a", "a", days(40)).await;
    let a_old2 = put("p/d/a", "a", days(35)).await;
    let a_new = put("p/d/a", "a", days(1)).await;
    let b_old = put("p/d/b", "b", days(45)).await;
    let b_newest_but_expired = put("p/d/b", "b", days(39)).await;
    // Not a snapshot name: never touched.
    let other = {
        use object_store::ObjectStoreExt;
        let loc = layout::key_path(&replica.prefix, "p/d/a").join("notes.txt");
        replica
            .store
            .put(&loc, bytes::Bytes::from_static(b"keep").into())
            .await
            .unwrap();
        loc.to_string()
    };
    let report =
        litefleet::replica::retention::enforce(&replica, Duration::from_secs(30 * 86400), now)
            .await
            .unwrap();
    assert_eq!(
        (report.examined, report.deleted, report.kept_newest_expired),
        (5, 2, 1)
    );
    // a_old2 is the state a restore anywhere from the cutoff until a_new
    // returns: kept with everything after it (probe J: it was deleted, and
    // such restores failed).
    let left = f.objects().await;
    let mut want = vec![a_old2, a_new, b_newest_but_expired, other];
    want.sort();
    assert_eq!(left, want);
    for gone in [a_old1, b_old] {
        assert!(!left.contains(&gone));
    }
});

// Another replica root inside this one (its own `.litefleet/`): its
// objects are another replicator's, kept for its own retention; ours never
// deletes them (black-box probe: a root with `retention: 1h` deleted a
// 7-hour-old snapshot of one nested in it, kept for 720h there).
both_backends!(
    retention_leaves_a_nested_replica_root_alone,
    |b| async move {
        use object_store::ObjectStoreExt;
        let f = Fleet::new(b).await;
        let replica = f.replica();
        let now = Utc::now();
        let days = |d: i64| now - chrono::Duration::days(d);
        let put = |key, stem, t| f.put_cold_snapshot(key, stem, t);
        // Past the cutoff, the older of two goes (the newer is the base).
        let ours_old = put("p/d/a", "a", days(45)).await;
        let ours_base = put("p/d/a", "a", days(40)).await;
        let theirs_old = put("sub/x/b", "b", days(45)).await;
        let theirs_base = put("sub/x/b", "b", days(40)).await;
        let marker = layout::key_path(&replica.prefix, "sub/.litefleet/replica.json");
        replica
            .store
            .put(&marker, bytes::Bytes::from_static(b"{}").into())
            .await
            .unwrap();
        let report =
            litefleet::replica::retention::enforce(&replica, Duration::from_secs(30 * 86400), now)
                .await
                .unwrap();
        assert_eq!(report.deleted, 1);
        let left = f.objects().await;
        assert!(!left.contains(&ours_old), "{left:?}");
        for kept in [ours_base, theirs_old, theirs_base] {
            assert!(left.contains(&kept), "{kept}: {left:?}");
        }
    }
);

both_backends!(non_sqlite_files_are_skipped, |b| async move {
    let f = Fleet::new(b).await;
    drop(create_db(&f.db_path("p", "d", "real"), 1));
    let fake = f.db_path("p", "d", "fake");
    std::fs::write(&fake, b"this is a text file that matches the glob").unwrap();
    let empty = f.db_path("p", "d", "empty");
    std::fs::write(&empty, b"").unwrap();
    let rep = f.replicator();
    let r = rep.cycle(&CancellationToken::new()).await;
    assert_eq!((r.scan.databases, r.uploaded), (1, 1));
    let r = rep.cycle(&CancellationToken::new()).await;
    assert_eq!(r.scan.databases, 1);
    assert_eq!(f.objects().await.len(), 1);
});

both_backends!(restore_flags_and_errors, |b| async move {
    let f = Fleet::new(b).await;
    drop(create_db(&f.db_path("p", "d", "x"), 2));
    f.replicator().cycle(&CancellationToken::new()).await;
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("x.db");
    f.restore("p/d/x", &o, None).await.unwrap();
    // Output exists: an error unless --if-db-not-exists.
    let e = f.restore("p/d/x", &o, None).await.unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    // So does a dangling symlink: nothing is written through it.
    let link = out.path().join("link.db");
    std::os::unix::fs::symlink(out.path().join("nowhere.db"), &link).unwrap();
    let e = f
        .restore("p/d/x", &link, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert!(!out.path().join("nowhere.db").exists());
    std::fs::remove_file(&link).unwrap();
    // A directory is named as one, not to be removed (black-box probe G27).
    let e = f
        .restore("p/d/x", out.path(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is a directory: -o names the database file to write"),
        "{e}"
    );
    let opts = |target: &str, out: &std::path::Path| litefleet::restore::RestoreOptions {
        target: target.into(),
        output: out.into(),
        timestamp: None,
        if_replica_exists: true,
        if_db_not_exists: true,
        allow_older: false,
    };
    let r = litefleet::restore::restore(&f.loaded(), &f.replica(), &opts("p/d/x", &o))
        .await
        .unwrap();
    assert_eq!(r, RestoreOutcome::OutputExists);
    let missing = out.path().join("missing.db");
    let r = litefleet::restore::restore(&f.loaded(), &f.replica(), &opts("p/d/nope", &missing))
        .await
        .unwrap();
    assert_eq!(r, RestoreOutcome::NoReplica);
    assert!(!missing.exists());
    let e = f
        .restore("p/d/nope", &missing, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no snapshot"), "{e}");
    // Before the first upload: nothing to restore at that time.
    let e = f
        .restore(
            "p/d/x",
            &missing,
            Some(Utc::now() - chrono::Duration::hours(2)),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("at or before"), "{e}");
    // --if-replica-exists excuses a key with nothing in the replica, not a
    // time before everything the replica holds of it.
    let before = litefleet::restore::RestoreOptions {
        timestamp: Some(Utc::now() - chrono::Duration::hours(2)),
        ..opts("p/d/x", &missing)
    };
    let e = litefleet::restore::restore(&f.loaded(), &f.replica(), &before)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, litefleet::Error::NotFound(m) if m.contains("at or before")),
        "{e}"
    );
    let none = litefleet::restore::RestoreOptions {
        timestamp: Some(Utc::now()),
        ..opts("p/d/nope", &missing)
    };
    let r = litefleet::restore::restore(&f.loaded(), &f.replica(), &none)
        .await
        .unwrap();
    assert_eq!(r, RestoreOutcome::NoReplica);
    assert!(!missing.exists());
    // Keys cannot escape the replica root.
    let e = f
        .restore("p/../../etc", &missing, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be relative"), "{e}");
    // Nor name one with an empty segment, at the end either (black-box
    // probe: `p/t/` was trimmed and restored `p/t`, where `p//t` failed).
    for key in ["p/d//x", "p/d/x/"] {
        let e = f
            .restore(key, &missing, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty segment"), "{key}: {e}");
    }
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("x.db")]);
});

both_backends!(deleted_database_leaves_the_table, |b| async move {
    let f = Fleet::new(b).await;
    let p = f.db_path("p", "d", "gone");
    drop(create_db(&p, 1));
    drop(create_db(&f.db_path("p", "d", "stays"), 1));
    let rep = f.replicator();
    assert_eq!(rep.cycle(&CancellationToken::new()).await.scan.databases, 2);
    std::fs::remove_file(&p).unwrap();
    let _ = std::fs::remove_file(p.with_extension("db-wal"));
    let r = rep.cycle(&CancellationToken::new()).await;
    assert_eq!((r.scan.removed, r.scan.databases), (1, 1));
    assert_eq!(rep.tracked(), 1);
});

/// Interval logic with paused time: cycles happen every scan-interval, and
/// cancelling stops the loop. No real sleeping.
#[tokio::test(start_paused = true)]
async fn run_loop_scans_every_interval_and_stops_on_cancel() {
    let f = Fleet::new(common::fleet::Backend::File).await;
    drop(create_db(&f.db_path("p", "d", "x"), 1));
    let rep = std::sync::Arc::new(f.replicator());
    let stats = rep.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(rep.clone().run(false, token.clone()));
    // Ticks at t = 0, 15, 30 and 45 s, and one more scan at the stop (for
    // what changed since the last).
    tokio::time::sleep(Duration::from_secs(46)).await;
    token.cancel();
    task.await.unwrap().unwrap();
    let scans = stats.scans.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(scans, 5);
    assert!(stats.uploads_ok.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

// The replica is emptied behind litefleet's back (a new bucket, a wiped
// directory): the upload records of the state file no longer describe it, so
// a restart uploads every database again instead of trusting them for good.
both_backends!(
    an_emptied_replica_gets_every_database_again,
    |b| async move {
        let f = Fleet::new(b).await;
        let keys = ["p/d/a", "p/d/b"];
        for t in ["a", "b"] {
            let p = f.db_path("p", "d", t);
            drop(create_db(&p, 2));
            age(&p);
        }
        let token = CancellationToken::new();
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 2);
        // A restart trusts its records while the replica holds the backups.
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 0);
        let r = f.replica();
        for name in f.objects().await {
            if !name.contains(".litefleet") {
                r.delete(&object_store::path::Path::from(name))
                    .await
                    .unwrap();
            }
        }
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 2);
        f.assert_restores(&keys, 2).await;

        // Emptied whole, and written to again before the restart (the
        // daemon's own uploads before it noticed, or a restart killed while
        // uploading everything again): the replica holds *something*, and
        // the records are still not its (probe F: 290 of 300 databases were
        // never uploaded again). Its identity tells.
        let kept = f
            .objects()
            .await
            .into_iter()
            .find(|n| n.contains("p/d/a/"))
            .unwrap();
        let kept_bytes = r
            .store
            .get(&kept.as_str().into())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let identity = format!("{}/.litefleet/replica.json", r.prefix);
        for name in f.objects().await.into_iter().chain([identity]) {
            r.delete(&object_store::path::Path::from(name))
                .await
                .unwrap();
        }
        r.store
            .put(&kept.as_str().into(), kept_bytes.into())
            .await
            .unwrap();
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 2);
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 0);
        f.assert_restores(&keys, 2).await;

        // Only the identity deleted: every database once more, never one
        // missing.
        r.delete(&object_store::path::Path::from(format!(
            "{}/.litefleet/replica.json",
            r.prefix
        )))
        .await
        .unwrap();
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 2);
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 0);

        // An identity that is no identity (damaged, foreign) identifies
        // nothing: replaced, every database once more, then trusted.
        let identity =
            object_store::path::Path::from(format!("{}/.litefleet/replica.json", r.prefix));
        r.store
            .put(&identity, b"garbage{".to_vec().into())
            .await
            .unwrap();
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 2);
        let now = r.get_bytes(&identity).await.unwrap().unwrap();
        assert!(now.starts_with(b"{"), "{now:?}");
        assert_eq!(f.replicator().cycle(&token).await.uploaded, 0);
    }
);

// A cycle snapshots databases in batches, one blocking task per batch: each
// database still gets an outcome of its own. Forty databases (three
// batches) with a text file and a damaged database among them: every sound
// one is uploaded and restores, the damaged one alone fails (and stays
// pending), the text file is no database.
both_backends!(
    each_database_of_a_batch_has_its_own_outcome,
    |b| async move {
        let f = Fleet::new(b).await;
        let mut keys = Vec::new();
        for i in 0..40 {
            let t = format!("t{i:02}");
            let p = f.db_path("p", "d", &t);
            match i {
                7 => std::fs::write(&p, b"a text file the glob matches").unwrap(),
                23 => {
                    let c = create_db(&p, 300);
                    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
                    drop(c);
                    // Overwrite the second page (a b-tree page of `t`) with
                    // garbage: the file keeps SQLite's header, the tree is broken.
                    use std::os::unix::fs::FileExt;
                    let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                    file.write_all_at(&[0xA5; 512], 4096 + 8).unwrap();
                }
                _ => {
                    drop(create_db(&p, 3));
                    keys.push(format!("p/d/{t}"));
                }
            }
            age(&p);
        }
        let rep = f.replicator();
        let r = rep.cycle(&CancellationToken::new()).await;
        assert_eq!(
            (r.scan.databases, r.uploaded, r.failed),
            (39, 38, 1),
            "{r:?}"
        );
        let r = rep.cycle(&CancellationToken::new()).await;
        assert_eq!(
            (r.uploaded, r.failed),
            (0, 1),
            "only the damaged one again: {r:?}"
        );
        let names = f.objects().await;
        assert!(
            names
                .iter()
                .all(|n| !n.contains("t23") && !n.contains("t07")),
            "{names:?}"
        );
        f.assert_restores(&keys, 3).await;
    }
);

/// A cold snapshot's PUT that the store applies late, after the client gave
/// up on it and after a newer snapshot of the same hour was uploaded and
/// recorded, is refused there: the replica keeps the newer copy. Before,
/// the older copy landed over it, and the database restored without its
/// last writes until the upload once more after a failed one
/// (`Tracker::doubt`) put it back, a scan later; a write the store applied
/// later than that stayed. S3 only: a `file://` write is complete when it
/// returns.
#[tokio::test]
async fn a_snapshot_applied_late_never_lands_over_a_newer_one() {
    use common::stores::{HeldPut, HeldPuts};
    use litefleet::daemon::scheduler::Replicator;
    // An hour can begin between the two uploads, which are then named
    // apart and nothing is replaced; two hours cannot.
    for (attempt, t) in ["acme", "bolt"].into_iter().enumerate() {
        let f = Fleet::with_yaml(common::fleet::Backend::S3, "  max-hot-databases: 0\n").await;
        let path = f.db_path("p1", "orders", t);
        drop(create_db(&path, 10));
        age(&path);
        let held = std::sync::Arc::new(HeldPuts::new(
            f.replica().store.clone(),
            HeldPut::new(".db.lz4", 1),
        ));
        let rep =
            Replicator::with_replica(f.loaded(), f.replica().with_store(held.clone())).unwrap();
        let token = CancellationToken::new();
        let r = rep.cycle(&token).await;
        assert_eq!((r.uploaded, r.failed), (0, 1), "the upload is held: {r:?}");
        let c = rusqlite::Connection::open(&path).unwrap();
        insert_rows(&c, 5);
        drop(c);
        age(&path);
        let r = rep.cycle(&token).await;
        assert_eq!((r.uploaded, r.failed), (1, 0), "{r:?}");
        let newer = f.objects().await;
        let answers = held.apply_held().await;
        assert_eq!(answers.len(), 1);
        if newer.iter().any(|n| n.ends_with(".db.lz4")) && f.objects().await != newer {
            // The held copy was named for another hour.
            assert_eq!(attempt, 0, "two hours began during the test");
            continue;
        }
        assert!(answers[0].is_err(), "the late write was applied");
        f.assert_restores(&[Fleet::key("p1", "orders", t)], 15)
            .await;
        // The upload after a failed one is done once more (`Tracker::doubt`),
        // then the database is idle.
        assert_eq!(rep.cycle(&token).await.uploaded, 1);
        let r = rep.cycle(&token).await;
        assert_eq!((r.uploaded, r.scan.pending), (0, 0), "{r:?}");
        f.assert_restores(&[Fleet::key("p1", "orders", t)], 15)
            .await;
        return;
    }
}

/// The writes of one replaced object on S3 ([`Replica::put_replacing`]):
/// the first creates it, each later one names the version the last made;
/// a late write landing between two of ours makes the next one read the
/// version there and write over it; a late write landing after a newer one
/// is refused.
#[tokio::test]
async fn replacing_writes_name_what_they_replace() {
    use common::stores::{HeldPut, HeldPuts};
    let f = Fleet::new(common::fleet::Backend::S3).await;
    let r = f.replica();
    // Each holds the next PUT of the object; both share `r`'s memory of
    // the versions written.
    let holding = || {
        let held = std::sync::Arc::new(HeldPuts::new(r.store.clone(), HeldPut::new("x.db.lz4", 1)));
        (held.clone(), r.clone().with_store(held))
    };
    let loc = object_store::path::Path::from("fleet/k/x.db.lz4");
    let body = |n: u8| bytes::Bytes::from(vec![n; 8]);
    let now = || async { r.get_bytes(&loc).await.unwrap().unwrap() };
    // Held, then applied before the next write: that write finds it there.
    let (held, late) = holding();
    late.put_replacing(&loc, body(1)).await.unwrap_err();
    assert!(held.apply_held().await[0].is_ok());
    late.put_replacing(&loc, body(2)).await.unwrap();
    assert_eq!(now().await, body(2));
    // Held, then applied after a newer write: refused.
    let (held, late) = holding();
    late.put_replacing(&loc, body(3)).await.unwrap_err();
    late.put_replacing(&loc, body(4)).await.unwrap();
    assert!(held.apply_held().await[0].is_err(), "the late write landed");
    assert_eq!(now().await, body(4));
    // Someone else's write in between: read and written over.
    r.put_bytes(&loc, body(5)).await.unwrap();
    r.put_replacing(&loc, body(6)).await.unwrap();
    assert_eq!(now().await, body(6));
    // The version written is remembered: the next write is one request.
    let s3 = f.s3.as_ref().unwrap();
    let requests = s3.request_count();
    r.put_replacing(&loc, body(7)).await.unwrap();
    assert_eq!(s3.request_count() - requests, 1);
    assert_eq!(now().await, body(7));
}
