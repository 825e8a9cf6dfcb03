//! A hot database counts as backed up only once its WAL stream has uploaded
//! it: a stream that has not shipped yet, or keeps failing, never marks it
//! synced, neither in memory nor in the state file, so a restart after a
//! crash uploads it again and the cold tier takes over meanwhile.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::fleet::{create_db, insert_rows, Fleet};
use litefleet::cli::soak::FaultyStore;
use litefleet::daemon::scheduler::Replicator;
use tokio_util::sync::CancellationToken;

/// Polls `cond` until it holds; fails the test after 20 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

both_backends!(
    unshipped_hot_change_is_uploaded_after_a_crash,
    |backend| async move {
        let f = Fleet::with_yaml(backend, "  hot-duration: 1h\n  sync-interval: 50ms\n").await;
        let path = f.db_path("p1", "orders", "acme");
        let key = Fleet::key("p1", "orders", "acme");
        let c = create_db(&path, 10);
        // The first run writes through a store that starts failing after its
        // first (cold) upload.
        let faulty = Arc::new(FaultyStore::new(f.replica().store.clone()));
        let first =
            Replicator::with_replica(f.loaded(), f.replica().with_store(faulty.clone())).unwrap();
        let token = CancellationToken::new();
        assert_eq!(first.cycle(&token).await.uploaded, 1);
        faulty.set_rate(1000);

        // A write makes the database hot; its stream cannot upload anything.
        insert_rows(&c, 5);
        first.cycle(&token).await;
        let stats = first.stats();
        assert_eq!(stats.hot.load(Ordering::Relaxed), 1, "the database is hot");
        until("the stream failed a sync", || {
            stats.hot_errors.load(Ordering::Relaxed) > 0
        })
        .await;
        assert_eq!(
            stats.pending.load(Ordering::Relaxed),
            1,
            "a change the stream has not shipped is still pending"
        );
        // With the stream failing, the cold tier tries the database again.
        let r = first.cycle(&token).await;
        assert_eq!(r.failed, 1, "the cold tier took the database over: {r:?}");
        assert_eq!(stats.pending.load(Ordering::Relaxed), 1);

        // "Crash": the first run goes away without a clean stop (its streams
        // keep failing on their own store). The restart reads the state file.
        drop(first);
        let second = f.replicator();
        let r = second.cycle(&token).await;
        assert_eq!(r.uploaded, 1, "the unshipped change is uploaded: {r:?}");
        f.assert_restores(&[key], 15).await;
    }
);

both_backends!(
    shipped_hot_change_becomes_synced_without_a_cold_upload,
    |backend| async move {
        let f = Fleet::with_yaml(backend, "  hot-duration: 1h\n  sync-interval: 50ms\n").await;
        let path = f.db_path("p1", "orders", "acme");
        let c = create_db(&path, 10);
        let r = f.replicator();
        let token = CancellationToken::new();
        assert_eq!(r.cycle(&token).await.uploaded, 1);
        insert_rows(&c, 5);
        let second = r.cycle(&token).await;
        assert_eq!(second.uploaded, 0, "the stream ships it, not the cold tier");
        let stats = r.stats();
        assert_eq!(stats.hot.load(Ordering::Relaxed), 1);
        assert_eq!(stats.pending.load(Ordering::Relaxed), 1, "not shipped yet");
        until("the stream shipped its generation", || {
            stats.generations.load(Ordering::Relaxed) > 0
                && stats.uploads_ok.load(Ordering::Relaxed) > 1
        })
        .await;
        // The next cycle settles the stream's ticket: synced, no cold upload.
        // The sync that began after the ticket may still be uploading: cycle
        // until it is settled, never with a cold upload.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let report = r.cycle(&token).await;
            assert_eq!(
                report.uploaded, 0,
                "a shipped hot database needs no cold upload"
            );
            if stats.pending.load(Ordering::Relaxed) == 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never settled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
);
