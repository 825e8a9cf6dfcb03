//! Faults at the object store: uploads fail, are retried next cycle, nothing is lost.

mod common;

use common::fleet::{age, create_db, insert_rows, Backend, Fleet};
use common::s3::{Fault, TRICKLE_PIECES};
use rusqlite::Connection;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Databases `p/d/t0` .. `p/d/t{n-1}` of `rows` rows each, last written
/// an hour ago (cold, not racy).
fn aged_databases(f: &Fleet, n: usize, rows: usize) {
    for i in 0..n {
        let p = f.db_path("p", "d", &format!("t{i}"));
        drop(create_db(&p, rows));
        age(&p);
    }
}

async fn restore_all(f: &Fleet, n: usize, rows: i64) {
    let keys: Vec<String> = (0..n).map(|i| format!("p/d/t{i}")).collect();
    f.assert_restores(&keys, rows).await;
}

/// The server dies in the middle of a cycle: some uploads succeed, the rest
/// fail; the next cycle after it is back uploads exactly the failed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_failing_mid_cycle_is_retried_next_cycle() {
    let f = Fleet::new(Backend::S3).await;
    let n = 10;
    aged_databases(&f, n, 3);
    let rep = f.replicator();
    let token = CancellationToken::new();
    // The first requests list the fleet log an earlier run may have left,
    // and read and write the replica's identity; then four uploads succeed.
    f.s3().set_fault(Fault::FailAfter(7));
    let r = rep.cycle(&token).await;
    assert_eq!(r.uploaded + r.failed, n);
    assert!(r.uploaded >= 1 && r.failed >= 1, "{r:?}");
    assert_eq!(r.uploaded, 4, "each small snapshot is one PUT: {r:?}");
    f.s3().set_fault(Fault::None);
    let r2 = rep.cycle(&token).await;
    assert_eq!((r2.uploaded, r2.failed), (r.failed, 0));
    assert_eq!(rep.cycle(&token).await.uploaded, 0);
    restore_all(&f, n, 3).await;
}

/// The server is really gone (connection refused), then comes back on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stopped_then_restarted() {
    let mut f = Fleet::new(Backend::S3).await;
    let n = 6;
    aged_databases(&f, n, 2);
    let rep = f.replicator();
    let token = CancellationToken::new();
    f.s3.as_mut().unwrap().stop().await;
    let r = rep.cycle(&token).await;
    assert_eq!((r.uploaded, r.failed), (0, n));
    assert_eq!(r.scan.pending, n);
    f.s3.as_mut().unwrap().restart().await;
    let r = rep.cycle(&token).await;
    assert_eq!((r.uploaded, r.failed), (n, 0));
    restore_all(&f, n, 2).await;
}

/// 500s and 503s for a while: uploads fail fast (bounded retries), the queue
/// does not grow past the tracked set, and everything lands once healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_for_several_cycles_then_heal() {
    let f = Fleet::new(Backend::S3).await;
    let n = 5;
    aged_databases(&f, n, 4);
    let rep = f.replicator();
    let token = CancellationToken::new();
    for fault in [Fault::Unavailable, Fault::InternalError, Fault::Unavailable] {
        f.s3().set_fault(fault);
        let r = rep.cycle(&token).await;
        assert_eq!((r.uploaded, r.failed, r.scan.pending), (0, n, n));
    }
    f.s3().set_fault(Fault::None);
    assert_eq!(rep.cycle(&token).await.uploaded, n);
    restore_all(&f, n, 4).await;
}

/// `/stats`' `pending` counts the databases a cycle has still to upload
/// while it runs, not only at its end (probe F: a first backup of 3,000
/// databases showed 0 pending until it was over), and drops as they land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_is_counted_while_a_cycle_runs() {
    use std::sync::atomic::Ordering::Relaxed;
    let f = Fleet::new(Backend::S3).await;
    let n = 6;
    aged_databases(&f, n, 2);
    let rep = std::sync::Arc::new(f.replicator());
    let stats = rep.stats();
    // Every request takes 300 ms: the cycle is surely seen midway.
    f.s3()
        .set_fault(Fault::Delay(std::time::Duration::from_millis(300)));
    let cycle = {
        let rep = rep.clone();
        tokio::spawn(async move { rep.cycle(&CancellationToken::new()).await })
    };
    let mut seen = 0;
    while !cycle.is_finished() {
        seen = seen.max(stats.pending.load(Relaxed));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let r = cycle.await.unwrap();
    assert_eq!(r.uploaded, n);
    assert_eq!(seen, n as u64, "pending seen during the cycle");
    assert_eq!(stats.pending.load(Relaxed), 0);
    f.s3().set_fault(Fault::None);
}

/// The replica's identity cannot be read at the first cycle (the store
/// fails): the state file's upload records are not applied, so a replica
/// that turns out to have lost its data gets every database again once the
/// store answers (probe H: the records were applied by the first scan and
/// could not be taken back; 49 of 50 databases were never uploaded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_not_trusted_while_the_replica_cannot_be_read() {
    let f = Fleet::new(Backend::S3).await;
    let n = 3;
    aged_databases(&f, n, 2);
    let token = CancellationToken::new();
    assert_eq!(f.replicator().cycle(&token).await.uploaded, n);
    // The store loses everything but one snapshot, its identity included.
    let r = f.replica();
    let objects = f.objects().await;
    for name in objects.iter().skip(1) {
        r.delete(&name.as_str().into()).await.unwrap();
    }
    r.delete(
        &format!("{}/.litefleet/replica.json", r.prefix)
            .as_str()
            .into(),
    )
    .await
    .unwrap();
    // A restart whose first requests fail, then a store that answers.
    let rep = f.replicator();
    f.s3().set_fault(Fault::Unavailable);
    let first = rep.cycle(&token).await;
    assert_eq!((first.uploaded, first.failed), (0, n), "{first:?}");
    f.s3().set_fault(Fault::None);
    let second = rep.cycle(&token).await;
    assert_eq!((second.uploaded, second.failed), (n, 0), "{second:?}");
    let keys: Vec<String> = (0..n).map(|i| format!("p/d/t{i}")).collect();
    f.assert_restores(&keys, 2).await;
    // And the restart after it trusts what it recorded.
    assert_eq!(f.replicator().cycle(&token).await.uploaded, 0);
}

/// An upload the client gave up on (the store did not answer within
/// `replica.timeout`) may still be applied by the store later, over the
/// next upload of the same hour's object (black-box probe: a PUT held 6 s
/// and forwarded after a newer one put the older state back; restore
/// returned it, exit 0, nothing pending). So the next successful upload is
/// followed by one more at the next cycle. A store that answered with an
/// error costs nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_given_up_on_is_uploaded_once_more() {
    let mut f = Fleet::new(Backend::S3).await;
    f.timeout = "1s";
    aged_databases(&f, 1, 2);
    let rep = f.replicator();
    let token = CancellationToken::new();
    f.s3()
        .set_fault(Fault::Delay(std::time::Duration::from_secs(3)));
    let r = rep.cycle(&token).await;
    assert_eq!((r.uploaded, r.failed), (0, 1), "{r:?}");
    f.s3().set_fault(Fault::None);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(rep.cycle(&token).await.uploaded);
    }
    assert_eq!(got, vec![1, 1, 0]);
    restore_all(&f, 1, 2).await;
}

/// Makes the replica refuse every write (`broken`), or take them again: on
/// S3 every request answers 503; on `file://` the replica's directory is
/// moved aside and a file put in its place.
fn break_replica(f: &Fleet, broken: bool) {
    if f.backend == Backend::S3 {
        f.s3().set_fault(if broken {
            Fault::Unavailable
        } else {
            Fault::None
        });
        return;
    }
    let root = f.work.path().join("replica");
    let aside = f.work.path().join("replica.aside");
    if broken {
        std::fs::rename(&root, &aside).unwrap();
        std::fs::write(&root, b"in the way").unwrap();
    } else {
        std::fs::remove_file(&root).unwrap();
        std::fs::rename(&aside, &root).unwrap();
    }
}

/// Starts the daemon's loop on `f`, waits for its first round, writes 2
/// rows through `c` (3 before), then stops it, with the replica refusing
/// writes if `broken` ([`break_replica`]): a clean stop with everything
/// uploaded if not, otherwise an error containing `behind` (and with the
/// key `key` at `rows_failed` rows, where that is known).
async fn stop_under(
    f: &Fleet,
    c: &Connection,
    broken: bool,
    key: &str,
    behind: &str,
    rows_failed: Option<i64>,
) {
    let rep = std::sync::Arc::new(f.replicator());
    let mut rounds = rep.rounds();
    let token = CancellationToken::new();
    let task = tokio::spawn(rep.clone().run(false, token.clone()));
    rounds.changed().await.unwrap();
    f.assert_restores(&[key], 3).await;
    insert_rows(c, 2);
    if broken {
        break_replica(f, true);
    }
    token.cancel();
    let r = task.await.unwrap();
    if !broken {
        r.unwrap();
        f.assert_restores(&[key], 5).await;
        return;
    }
    break_replica(f, false);
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("stopped with the replica behind: ") && e.contains(behind),
        "{e}"
    );
    if let Some(rows) = rows_failed {
        f.assert_restores(&[key], rows).await;
    }
}

/// A stop that leaves the replica behind its databases is an error (exit 1
/// from `replicate`), not "shut down cleanly": here the stop pass cannot
/// upload a database written since the last scan, because the store
/// answers 503 or the replica's directory is gone (black-box probe D26: a
/// SIGTERM while the store stalled exited 0 with its uploads abandoned).
/// With the replica taking writes, the same stop is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_cannot_upload_what_changed_is_an_error() {
    for (backend, broken) in [
        (Backend::S3, true),
        (Backend::S3, false),
        (Backend::File, true),
        (Backend::File, false),
    ] {
        let mut f = Fleet::with_yaml(backend, "  watch: false\n").await;
        f.scan_interval = "1h";
        aged_databases(&f, 2, 3);
        // Rollback journal: cold, whatever its writes (the hot tier has a
        // test of its own below).
        let t1 = f.db_path("p", "d", "t1");
        let c = Connection::open(&t1).unwrap();
        c.pragma_update(None, "journal_mode", "delete").unwrap();
        age(&t1);
        let behind = "1 database(s) changed since their last upload could not be read, snapshotted or uploaded at the stop";
        stop_under(&f, &c, broken, "p/d/t1", behind, Some(3)).await;
    }
}

/// The same for a hot database: a stop whose last sync cannot ship the
/// stream's frames says so and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_whose_hot_stream_cannot_ship_is_an_error() {
    for (backend, broken) in [
        (Backend::S3, true),
        (Backend::S3, false),
        (Backend::File, true),
        (Backend::File, false),
    ] {
        let mut f = Fleet::with_yaml(
            backend,
            "  watch: false\n  hot-duration: 1h\n  cold-after: 1h\n  sync-interval: 50ms\n",
        )
        .await;
        f.scan_interval = "1h";
        let c = create_db(&f.db_path("p", "d", "t0"), 3);
        let behind = "1 hot database(s) could not ship their last WAL frames";
        stop_under(&f, &c, broken, "p/d/t0", behind, None).await;
    }
}

/// A download goes on as long as the store keeps sending: `replica.timeout`
/// bounds the wait for each piece of an answer, not the whole answer
/// (black-box probe K28: a 15 MB snapshot at 1.84 Mbit/s could never be
/// restored at the default 60 s). Here every GET body comes in 8 pieces,
/// each after the timeout's third; a store that stops sending for longer
/// than the timeout still fails the restore, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_longer_than_the_timeout_goes_on_while_the_store_sends() {
    let mut f = Fleet::new(Backend::S3).await;
    f.timeout = "1s";
    aged_databases(&f, 1, 3);
    let r = f.replicator().cycle(&CancellationToken::new()).await;
    assert_eq!(r.uploaded, 1);
    f.s3().set_fault(Fault::Trickle(Duration::from_millis(330)));
    let started = std::time::Instant::now();
    restore_all(&f, 1, 3).await;
    assert!(
        started.elapsed() > Duration::from_millis(330 * u64::from(TRICKLE_PIECES)),
        "each download took longer than the timeout"
    );
    f.s3()
        .set_fault(Fault::Trickle(Duration::from_millis(1500)));
    let out = tempfile::tempdir().unwrap();
    let e = f
        .restore("p/d/t0", &out.path().join("t0.db"), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("replica.timeout"), "{e}");
}

/// A write gets `replica.timeout` once per 10 MiB it sends: a 21 MiB
/// single PUT (a fleet log object or a consolidated pack can be one)
/// answered 2.5 s after it arrived passes with a 2 s timeout (6 s for its
/// three parts' worth, sending included), where a small PUT answered as
/// late fails, naming the timeout (black-box probe K28: 25 MB and 59 MB
/// PUTs timed out on a link that fit 10 MiB in the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_gets_the_timeout_once_per_10_mib() {
    let mut f = Fleet::new(Backend::S3).await;
    f.timeout = "2s";
    let r = f.replica();
    f.s3().set_fault(Fault::Delay(Duration::from_millis(2500)));
    let large = vec![7u8; 21 << 20];
    r.put_bytes(&"x/large".into(), large).await.unwrap();
    let e = r
        .put_bytes(&"x/small".into(), b"x".to_vec())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("replica.timeout"), "{e}");
}

/// A store without multi-object delete (`POST ?delete` answers 501, as
/// LocalBucket's does; Google Cloud Storage's XML API has none): deletes
/// go one object per request from the first refusal on, so retention and
/// the fleet log's clean-up work there (black-box probe K28: every pass
/// failed and the replica only grew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_multi_object_delete_gets_single_deletes() {
    let f = Fleet::new(Backend::S3).await;
    let r = f.replica();
    let paths: Vec<object_store::path::Path> = (0..4)
        .map(|i| format!("{}/x/o{i}", r.prefix).as_str().into())
        .collect();
    for p in &paths {
        r.put_bytes(p, b"x".to_vec()).await.unwrap();
    }
    let ours = |objects: Vec<String>| objects.iter().filter(|o| o.contains("x/o")).count();
    assert_eq!(ours(f.objects().await), 4);
    f.s3().set_fault(Fault::NoBulkDelete);
    r.delete_many(paths[..2].to_vec()).await.unwrap();
    let refused = f.s3().fault_count();
    assert!(refused >= 1, "the bulk delete was tried first");
    r.delete_many(paths[2..].to_vec()).await.unwrap();
    assert_eq!(f.s3().fault_count(), refused, "no bulk delete tried again");
    f.s3().set_fault(Fault::None);
    assert_eq!(ours(f.objects().await), 0);
}

/// Uploads that time out halve how many go at once, down to one, and a
/// cycle answered in time doubles it back: the timeout is per request,
/// while the uploads in flight share one link (black-box probe K28: four
/// 6 MB uploads on a 1 MB/s link with a 15 s timeout all timed out at
/// every cycle, where one at a time fit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_time_out_go_fewer_at_once() {
    let mut f = Fleet::new(Backend::S3).await;
    f.timeout = "1s";
    f.max_concurrent = 4;
    aged_databases(&f, 4, 2);
    let rep = f.replicator();
    let token = CancellationToken::new();
    assert_eq!(rep.upload_limit(), 4);
    f.s3().set_fault(Fault::Delay(Duration::from_millis(1500)));
    let mut limits = Vec::new();
    for _ in 0..3 {
        let r = rep.cycle(&token).await;
        assert!(r.timed_out > 0 && r.uploaded == 0, "{r:?}");
        limits.push(rep.upload_limit());
    }
    assert_eq!(limits, vec![2, 1, 1]);
    f.s3().set_fault(Fault::None);
    let r = rep.cycle(&token).await;
    assert_eq!((r.uploaded, r.failed, r.timed_out), (4, 0, 0), "{r:?}");
    assert_eq!(rep.upload_limit(), 2);
    restore_all(&f, 4, 2).await;
}
