//! The replica lease against the in-process S3 server (conditional PUTs with
//! If-None-Match / If-Match) and file:// (compare-and-swap under flock).
//! Time is passed explicitly, so nothing here sleeps to make a lease expire.

mod common;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use common::fleet::Fleet;
use litefleet::replica::lease::{lease_path, spawn_renewer, Lease, DEFAULT_TTL, LEASE_OBJECT};
use litefleet::Error;
use object_store::{ObjectStoreExt, PutPayload};
use tokio_util::sync::CancellationToken;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 13, 0, 0).unwrap()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn me() -> String {
    format!("pid {}", std::process::id())
}

both_backends!(
    second_acquire_is_refused_naming_the_holder,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let a = Lease::acquire(&r, t0()).await.unwrap();
        assert_eq!(a.expires(), t0() + secs(60));
        let stored = Lease::current(&r).await.unwrap().unwrap();
        assert_eq!(&stored, a.record());

        let err = Lease::acquire(&r, t0() + secs(18)).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::LeaseHeld { .. }), "{msg}");
        assert!(msg.contains(LEASE_OBJECT), "{msg}");
        assert!(
            msg.contains(&format!("host {}", a.record().hostname)),
            "{msg}"
        );
        assert!(msg.contains(&me()), "{msg}");
        assert!(
            msg.contains("expires 2026-11-22T13:01:00Z (in 42s)"),
            "{msg}"
        );
        // The refused attempt changed nothing.
        assert_eq!(Lease::current(&r).await.unwrap().unwrap(), stored);
        // Lease objects are invisible to restore's listing.
        assert!(litefleet::restore::list(&r, None).await.unwrap().is_empty());
    }
);

both_backends!(after_release_acquire_succeeds, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    let a = Lease::acquire(&r, t0()).await.unwrap();
    a.release_at(t0() + secs(5)).await.unwrap();
    let left = Lease::current(&r).await.unwrap().unwrap();
    assert!(left.released && left.expires <= t0() + secs(5), "{left:?}");
    let b2 = Lease::acquire(&r, t0() + secs(6)).await.unwrap();
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *b2.record());
    assert_eq!(b2.takeover_wait(), Duration::ZERO);

    // Released close to expiry: marked expired the same way, and the
    // next acquirer takes it over at once.
    b2.release_at(t0() + secs(60)).await.unwrap();
    let left = Lease::current(&r).await.unwrap().unwrap();
    assert!(left.expires <= t0() + secs(60), "{left:?}");
    // Marked as released, so the next start does not take it for a
    // crashed holder's (black-box probe P23).
    assert!(left.released, "{left:?}");
    let c = Lease::acquire(&r, t0() + secs(60)).await.unwrap();
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *c.record());
    assert!(!c.record().released);
});

both_backends!(
    renewal_extends_and_expired_lease_is_taken_over,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let mut a = Lease::acquire(&r, t0()).await.unwrap();
        a.renew_at(t0() + secs(30)).await.unwrap();
        assert_eq!(a.expires(), t0() + secs(90));
        assert_eq!(
            Lease::current(&r).await.unwrap().unwrap().expires,
            t0() + secs(90)
        );
        // Still valid at 61 s thanks to the renewal.
        assert!(matches!(
            Lease::acquire(&r, t0() + secs(61)).await,
            Err(Error::LeaseHeld { .. })
        ));

        // Expired at 91 s: taken over.
        let mut b2 = Lease::acquire(&r, t0() + secs(91)).await.unwrap();
        assert_ne!(b2.record().owner, a.record().owner);

        // The old holder's renewal fails and says who has it now.
        let err = a.renew_at(t0() + secs(92)).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::LeaseLost { .. }), "{msg}");
        assert!(msg.contains("taken over by host"), "{msg}");
        assert!(msg.contains(&me()), "{msg}");
        // ... and its release does not remove the new holder's lease.
        assert!(matches!(
            a.release_at(t0() + secs(93)).await,
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *b2.record());
        b2.renew_at(t0() + secs(100)).await.unwrap();
        b2.release_at(t0() + secs(101)).await.unwrap();
        assert!(Lease::current(&r).await.unwrap().unwrap().released);
    }
);

both_backends!(racing_acquirers_exactly_one_wins, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    let race = |now: DateTime<Utc>| {
        let r = r.clone();
        async move {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let r = r.clone();
                    tokio::spawn(async move { Lease::acquire(&r, now).await })
                })
                .collect();
            let mut won = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(l) => won.push(l),
                    Err(Error::LeaseHeld { .. }) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            won
        }
    };
    // Nothing there yet: If-None-Match: * lets exactly one create it.
    let won = race(t0()).await;
    assert_eq!(won.len(), 1);
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *won[0].record());
    // Expired: If-Match on the expired version lets exactly one take it over.
    let won = race(t0() + secs(120)).await;
    assert_eq!(won.len(), 1);
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *won[0].record());
});

both_backends!(corrupt_lease_object_is_a_clear_error, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    r.store
        .put(&lease_path(&r), PutPayload::from_static(b"not json"))
        .await
        .unwrap();
    let msg = Lease::acquire(&r, t0()).await.unwrap_err().to_string();
    assert!(msg.contains("is not a litefleet lease"), "{msg}");
    assert!(msg.contains("delete it"), "{msg}");
});

// A lease object larger than litefleet ever writes is refused before it is
// read (black-box probe N29: a 5 GB one made every start abort on the
// allocation, and a 300 MB one of valid JSON was taken as the lease).
both_backends!(
    an_oversized_lease_object_is_refused_unread,
    |b| async move {
        use litefleet::replica::lease::MAX_LEASE_BYTES;
        let f = Fleet::new(b).await;
        let r = f.replica();
        let mut big = br#"{"pad":""#.to_vec();
        big.resize(MAX_LEASE_BYTES as usize + 1 - 2, b'x');
        big.extend_from_slice(br#""}"#);
        r.store
            .put(&lease_path(&r), PutPayload::from(big))
            .await
            .unwrap();
        let msg = Lease::acquire(&r, t0()).await.unwrap_err().to_string();
        assert!(
            msg.contains(&format!(
                "is {} bytes, more than the {MAX_LEASE_BYTES} litefleet ever writes there",
                MAX_LEASE_BYTES + 1
            )),
            "{msg}"
        );
        assert!(msg.contains("lease.json"), "{msg}");
    }
);

both_backends!(
    renewer_renews_and_cancels_replication_when_taken_over,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        // A short TTL so the renewer (every ttl/3) acts within the test.
        let ttl = Duration::from_secs(3);
        let lease = Lease::acquire_with_ttl(&r, Utc::now(), ttl).await.unwrap();
        let first_expiry = lease.expires();
        let token = CancellationToken::new();
        let renewer = spawn_renewer(lease, token.clone());

        // It renews: the stored expiry moves forward.
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let cur = Lease::current(&r).await.unwrap().unwrap();
                if cur.expires > first_expiry {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the renewer never renewed");
        assert!(!token.is_cancelled());

        // Another process whose clock says the lease expired takes it over; the
        // renewer's next renewal fails and it cancels replication.
        let other =
            Lease::acquire_with_ttl(&r, Utc::now() + chrono::Duration::seconds(60), DEFAULT_TTL)
                .await
                .unwrap();
        tokio::time::timeout(Duration::from_secs(30), token.cancelled())
            .await
            .expect("the renewer did not cancel replication after losing the lease");
        let err = renewer.stop().await.unwrap_err();
        assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
        assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *other.record());

        // A renewer stopped cleanly hands the lease back for release.
        other
            .release_at(Utc::now() + chrono::Duration::seconds(60))
            .await
            .unwrap();
        let lease = Lease::acquire(&r, Utc::now()).await.unwrap();
        let token = CancellationToken::new();
        let renewer = spawn_renewer(lease, token.clone());
        renewer.release().await.unwrap();
        assert!(!token.is_cancelled());
        assert!(Lease::current(&r).await.unwrap().unwrap().released);
    }
);

both_backends!(storage_conditional_puts_are_honoured, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    let loc = litefleet::replica::layout::key_path(&r.prefix, ".litefleet/cas-test");
    let v1 = r
        .put_if_absent(&loc, bytes::Bytes::from_static(b"one"))
        .await
        .unwrap()
        .expect("created");
    // If-None-Match: * on an existing object: refused, content unchanged.
    assert!(r
        .put_if_absent(&loc, bytes::Bytes::from_static(b"two"))
        .await
        .unwrap()
        .is_none());
    let (got, v) = r.get_versioned(&loc, 1 << 20).await.unwrap().unwrap();
    assert_eq!((&got[..], &v.e_tag), (&b"one"[..], &v1.e_tag));
    // If-Match with the current ETag: written; with the old one: refused.
    let v2 = r
        .put_if_match(&loc, bytes::Bytes::from_static(b"three"), &v1)
        .await
        .unwrap()
        .expect("updated");
    assert_ne!(v2.e_tag, v1.e_tag);
    assert!(r
        .put_if_match(&loc, bytes::Bytes::from_static(b"four"), &v1)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        &r.get_versioned(&loc, 1 << 20).await.unwrap().unwrap().0[..],
        b"three"
    );
    r.delete(&loc).await.unwrap();
    assert!(r.get_versioned(&loc, 1 << 20).await.unwrap().is_none());
    // If-Match on a missing object: refused, nothing created.
    assert!(r
        .put_if_match(&loc, bytes::Bytes::from_static(b"five"), &v2)
        .await
        .unwrap()
        .is_none());
    assert!(r.get_versioned(&loc, 1 << 20).await.unwrap().is_none());
});

/// A renewal stalled past the lease's local expiry: the holder stops every
/// write there (a write in flight is abandoned, new ones are refused without
/// a request), before a second replicator can take the lease over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_renewal_stops_writes_before_a_successor_can_write() {
    let f = Fleet::new(common::fleet::Backend::S3).await;
    let r = f.replica();
    let ttl = litefleet::replica::lease::MIN_TTL;
    let lease = Lease::acquire_with_ttl(&r, Utc::now(), ttl).await.unwrap();
    let fence = lease.fence();
    let written_expiry = lease.expires();
    // Writes stop a quarter of the TTL before the written expiry (the
    // margin the README's guarantee rests on; mutation audit O23: an
    // eighth passed every test).
    let margin = written_expiry - fence.wall_until();
    assert_eq!(margin.num_milliseconds(), (ttl / 4).as_millis() as i64);
    let a = r.clone().with_fence(fence.clone());
    let token = CancellationToken::new();
    let renewer = spawn_renewer(lease, token.clone());
    a.put_bytes(&"a/1".into(), b"ok".to_vec()).await.unwrap();

    // Every request now takes far longer than the lease lives.
    let s3 = f.s3.as_ref().unwrap();
    s3.set_fault(common::s3::Fault::Delay(Duration::from_secs(30)));
    let in_flight = tokio::spawn({
        let a = a.clone();
        async move { a.put_bytes(&"a/2".into(), b"late".to_vec()).await }
    });
    // The fence closes at its local expiry, with no answer from the store.
    tokio::time::sleep_until(tokio::time::Instant::from_std(fence.until())).await;
    assert!(!fence.is_open());
    let stopped_at = Utc::now();
    // Stopped at the local expiry, a margin before the written one.
    assert!(stopped_at < written_expiry + chrono::Duration::seconds(1));
    let e = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the write in flight was not abandoned")
        .unwrap()
        .unwrap_err();
    // Expired, not known lost: a pause.
    assert!(matches!(e, Error::LeasePaused { .. }), "{e}");
    // The renewer goes on trying (see the next test); stopped here, so a
    // successor can take the lease over.
    assert!(!token.is_cancelled());
    drop(renewer.stop().await.unwrap());

    // The store comes back; a successor takes the lease once it expired.
    s3.set_fault(common::s3::Fault::None);
    let b = loop {
        match Lease::acquire_with_ttl(&r, Utc::now(), ttl).await {
            Ok(l) => break l,
            Err(Error::LeaseHeld { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(b.record().acquired >= written_expiry);
    // The old holder writes nothing, without even asking the store.
    let requests = s3.request_count();
    let e = a
        .put_bytes(&"a/3".into(), b"no".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeasePaused { .. }), "{e}");
    let e = a.delete(&"a/1".into()).await.unwrap_err();
    assert!(matches!(e, Error::LeasePaused { .. }), "{e}");
    // Nor do retention's bulk deletes (mutation audit O23: `delete_many`
    // without the fence passed every test).
    let e = a.delete_many(vec!["a/1".into()]).await.unwrap_err();
    assert!(matches!(e, Error::LeasePaused { .. }), "{e}");
    assert_eq!(s3.request_count(), requests);
    assert!(r.get_bytes(&"a/3".into()).await.unwrap().is_none());
    assert!(r.get_bytes(&"a/1".into()).await.unwrap().is_some());
}

// A lease taken over: the holder's writes are refused at once (no final
// sync, no retention, no upload gets through after the loss).
both_backends!(lost_lease_closes_the_write_fence, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    let ttl = Duration::from_secs(3);
    let lease = Lease::acquire_with_ttl(&r, Utc::now(), ttl).await.unwrap();
    let a = r.clone().with_fence(lease.fence());
    let token = CancellationToken::new();
    let renewer = spawn_renewer(lease, token.clone());
    a.put_bytes(&"k/before".into(), b"ok".to_vec())
        .await
        .unwrap();
    // Another process whose clock says the lease expired takes it over.
    let _other =
        Lease::acquire_with_ttl(&r, Utc::now() + chrono::Duration::seconds(60), DEFAULT_TTL)
            .await
            .unwrap();
    tokio::time::timeout(Duration::from_secs(30), token.cancelled())
        .await
        .expect("the renewer did not notice the loss");
    let e = a
        .put_bytes(&"k/after".into(), b"no".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
    assert!(e.to_string().contains("lost"), "{e}");
    assert!(r.get_bytes(&"k/after".into()).await.unwrap().is_none());
    assert!(renewer.stop().await.is_err());
});

/// The fleet's replica through a [`common::stores::LostPuts`] (no fault
/// until one is set), and that wrapper.
fn with_lost_puts(
    f: &Fleet,
) -> (
    litefleet::replica::storage::Replica,
    std::sync::Arc<common::stores::LostPuts>,
) {
    let r = f.replica();
    let lost = std::sync::Arc::new(common::stores::LostPuts::new(
        r.store.clone(),
        common::stores::LostPut::default(),
    ));
    (r.with_store(lost.clone()), lost)
}

/// A conditional PUT applied by the store whose response was lost (the
/// client's retry gets 412): acquiring and renewing recognize their own
/// write instead of reporting the lease as held by another or lost.
#[tokio::test]
async fn own_write_behind_a_lost_response_is_recognized() {
    let f = Fleet::new(common::fleet::Backend::S3).await;
    let (r, lost) = with_lost_puts(&f);
    lost.rewrite
        .left
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let mut lease = Lease::acquire(&r, t0()).await.unwrap();
    assert_eq!(
        lost.rewrite.left.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *lease.record());
    lost.rewrite
        .left
        .store(1, std::sync::atomic::Ordering::SeqCst);
    lease.renew_at(t0() + secs(20)).await.unwrap();
    assert_eq!(lease.expires(), t0() + secs(80));
    // And the renewed version is the one the next write must name.
    lease.renew_at(t0() + secs(40)).await.unwrap();
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *lease.record());
}

/// Black-box probe M21, three ways a lone daemon lost its lease to a bad
/// network (each fails without the fix):
/// - a renewal that finds a late renewal of ours and writes on its version,
///   applied, its answer lost too (the client's retry gets 412): "lost: it
///   was changed by another writer with our owner id", exit 1;
/// - a renewal applied with its answer lost, whose read-back then fails
///   (503): taken for a lost lease; it is a failed renewal, and the next
///   one renews;
/// - a start whose lease write was applied but timed out failed, leaving a
///   lease that held every later start off until it expired; it reads the
///   lease back and finds its own.
#[tokio::test]
async fn unanswered_lease_writes_of_ours_never_lose_the_lease() {
    use std::sync::atomic::Ordering::SeqCst;
    let f = Fleet::new(common::fleet::Backend::S3).await;
    let (r, lost) = with_lost_puts(&f);
    let faults = &lost.rewrite;

    lost.rewrite.timed_out.store(1, SeqCst);
    let mut lease = Lease::acquire(&r, t0()).await.unwrap();
    assert_eq!(faults.timed_out.load(SeqCst), 0, "the write was applied");
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *lease.record());

    // A renewal of ours applied late, then the write on its version
    // applied with its answer lost.
    let path = lease_path(&r);
    let (_, v) = r.get_versioned(&path, 1 << 20).await.unwrap().unwrap();
    let mut late = lease.record().clone();
    late.expires = t0() + secs(70);
    let body = bytes::Bytes::from(serde_json::to_vec(&late).unwrap());
    assert!(r.put_if_match(&path, body, &v).await.unwrap().is_some());
    faults.left.store(1, SeqCst);
    lease.renew_at(t0() + secs(20)).await.unwrap();
    assert_eq!(faults.left.load(SeqCst), 0);
    assert_eq!(lease.expires(), t0() + secs(80));
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *lease.record());

    // Applied, answer lost, and the read-back fails: a failed renewal.
    faults.left.store(1, SeqCst);
    faults.failing_gets.store(1, SeqCst);
    let e = lease.renew_at(t0() + secs(40)).await.unwrap_err();
    assert!(!matches!(e, Error::LeaseLost { .. }), "{e}");
    lease.renew_at(t0() + secs(45)).await.unwrap();
    assert_eq!(lease.expires(), t0() + secs(105));
    assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *lease.record());

    // Another owner's lease is still lost, however the answers go.
    let (_, v) = r.get_versioned(&path, 1 << 20).await.unwrap().unwrap();
    let mut other = lease.record().clone();
    other.owner = "someone-else".to_string();
    let body = bytes::Bytes::from(serde_json::to_vec(&other).unwrap());
    assert!(r.put_if_match(&path, body, &v).await.unwrap().is_some());
    let e = lease.renew_at(t0() + secs(60)).await.unwrap_err();
    assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
}

// A renewal that timed out while the store stalled, applied by the store
// after the client gave up: the next renewal meets our owner id with that
// renewal's expiry and a version it does not know. The lease is still ours
// (found by a black-box probe: a 10 s stall made the daemon exit, "changed
// by another writer with our owner id"); another owner's record is not.
both_backends!(
    a_late_applied_renewal_of_ours_keeps_the_lease,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let mut lease = Lease::acquire(&r, t0()).await.unwrap();
        let path = lease_path(&r);
        let ours = lease.record().clone();
        let late = |expires: DateTime<Utc>, owner: &str| {
            let mut rec = ours.clone();
            rec.expires = expires;
            rec.owner = owner.to_string();
            bytes::Bytes::from(serde_json::to_vec(&rec).unwrap())
        };
        // The late renewal lands on the version we know, as the store applies it.
        let (_, v) = r.get_versioned(&path, 1 << 20).await.unwrap().unwrap();
        let body = late(t0() + secs(70), &ours.owner);
        assert!(r.put_if_match(&path, body, &v).await.unwrap().is_some());
        lease.renew_at(t0() + secs(40)).await.unwrap();
        assert_eq!(lease.expires(), t0() + secs(100));
        assert_eq!(Lease::current(&r).await.unwrap().unwrap(), *lease.record());
        // Another owner's record in its place: lost.
        let (_, v) = r.get_versioned(&path, 1 << 20).await.unwrap().unwrap();
        let body = late(t0() + secs(200), "someone-else");
        assert!(r.put_if_match(&path, body, &v).await.unwrap().is_some());
        let e = lease.renew_at(t0() + secs(60)).await.unwrap_err();
        assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
        assert!(!lease.fence().is_open());
    }
);

// A store outage longer than the lease's local expiry pauses replication
// instead of ending it: the fence refuses writes, renewals go on, and once
// the store answers (nobody took the lease over) the lease is renewed and
// writes resume (found by a black-box probe: a 35 s outage made the daemon
// exit 1, "could not be renewed before it expired locally").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lease_resumes_when_the_store_answers() {
    let f = Fleet::new(common::fleet::Backend::S3).await;
    let r = f.replica();
    let ttl = litefleet::replica::lease::MIN_TTL;
    let lease = Lease::acquire_with_ttl(&r, Utc::now(), ttl).await.unwrap();
    let fence = lease.fence();
    let owner = lease.record().owner.clone();
    let a = r.clone().with_fence(fence.clone());
    let token = CancellationToken::new();
    let renewer = spawn_renewer(lease, token.clone());
    let s3 = f.s3.as_ref().unwrap();
    s3.set_fault(common::s3::Fault::Delay(Duration::from_secs(30)));
    tokio::time::sleep_until(tokio::time::Instant::from_std(fence.until())).await;
    assert!(!fence.is_open());
    let e = a
        .put_bytes(&"a/1".into(), b"no".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::LeasePaused { .. }), "{e}");
    assert!(
        e.to_string().contains("paused") && !e.to_string().contains("lost"),
        "{e}"
    );
    s3.set_fault(common::s3::Fault::None);
    // Renewals go on every ttl/12: the fence opens again at the first that
    // succeeds.
    tokio::time::timeout(Duration::from_secs(30), async {
        while !fence.is_open() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the lease was never renewed after the store came back");
    assert!(!token.is_cancelled(), "replication was not stopped");
    a.put_bytes(&"a/2".into(), b"ok".to_vec()).await.unwrap();
    assert!(r.get_bytes(&"a/1".into()).await.unwrap().is_none());
    assert_eq!(Lease::current(&r).await.unwrap().unwrap().owner, owner);
    renewer.release().await.unwrap();
}

/// Some S3-compatible stores ignore `If-None-Match` and `If-Match` and
/// write anyway: there two replicators would both take the lease. The
/// check every start makes sends each condition where it must be refused;
/// on a store that honours them it changes nothing (the lease renews and
/// releases as before), and on one that ignores either it fails naming the
/// ignored condition, leaving the lease ours (its new version kept).
#[tokio::test]
async fn a_store_ignoring_conditional_writes_fails_the_check() {
    use common::fleet::Backend;
    use common::s3::Fault;
    let f = Fleet::new(Backend::S3).await;
    let r = f.replica();
    let mut a = Lease::acquire(&r, Utc::now()).await.unwrap();
    a.check_conditional_writes().await.unwrap();
    assert_eq!(&Lease::current(&r).await.unwrap().unwrap(), a.record());
    assert_eq!(f.s3().fault_count(), 0);
    a.renew().await.unwrap();
    a.release().await.unwrap();

    for (fault, named) in [
        (Fault::IgnoreConditions, "If-None-Match: *"),
        (Fault::IgnoreIfMatch, "(If-Match)"),
    ] {
        f.s3().set_fault(fault);
        let mut b = Lease::acquire(&r, Utc::now()).await.unwrap();
        let e = b.check_conditional_writes().await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Invalid { .. }), "{msg}");
        assert!(msg.contains(LEASE_OBJECT), "{msg}");
        assert!(msg.contains("ignores conditional writes"), "{msg}");
        assert!(msg.contains(named), "{fault:?}: {msg}");
        assert!(msg.contains("check-conditional-writes: false"), "{msg}");
        // The write the store should have refused held our own bytes.
        assert_eq!(&Lease::current(&r).await.unwrap().unwrap(), b.record());
        f.s3().set_fault(Fault::None);
        b.renew().await.unwrap();
        b.release().await.unwrap();
    }
}

/// A store that refuses every If-Match write, its own ETag's too, fails
/// the check at start, naming that; before, it passed, and the first
/// renewal said the lease was "changed by another writer with our owner
/// id" (black-box probe K28).
#[tokio::test]
async fn a_store_refusing_its_own_etag_fails_the_check() {
    use common::fleet::Backend;
    use common::s3::Fault;
    let f = Fleet::new(Backend::S3).await;
    let r = f.replica();
    f.s3().set_fault(Fault::RefuseIfMatch);
    let mut a = Lease::acquire(&r, Utc::now()).await.unwrap();
    let e = a.check_conditional_writes().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Invalid { .. }), "{msg}");
    assert!(
        msg.contains("refused a write conditional on the lease's own ETag (If-Match"),
        "{msg}"
    );
    assert!(f.s3().fault_count() >= 2, "the refusal check and this one");
    // The next start cannot take the lease over (an If-Match write): it
    // says why, not that another litefleet is starting.
    let later = Utc::now() + chrono::Duration::hours(1);
    let e = Lease::acquire(&r, later).await.unwrap_err().to_string();
    assert!(
        e.contains("refused a write conditional on the lease's ETag (If-Match) 3 times while the lease did not change"),
        "{e}"
    );
    f.s3().set_fault(Fault::None);
    a.check_conditional_writes().await.unwrap();
    a.release().await.unwrap();
}

/// A store fault on one of the check's writes (a 503 after the client's
/// own retries, a reset connection) is tried again rather than failing the
/// start (black-box probe D26); a store that keeps failing still fails it,
/// naming the store's error, not an ignored condition.
#[tokio::test]
async fn the_conditional_write_check_rides_out_a_store_fault() {
    use std::sync::atomic::Ordering;
    let f = Fleet::new(common::fleet::Backend::S3).await;
    let (r, lost) = with_lost_puts(&f);
    let mut a = Lease::acquire(&r, Utc::now()).await.unwrap();
    // Two faults on the first write (`If-None-Match: *`), then two on the
    // second (`If-Match`).
    for faults in [&lost.rewrite.failing_puts, &lost.rewrite.failing_updates] {
        faults.store(2, Ordering::SeqCst);
        a.check_conditional_writes().await.unwrap();
        assert_eq!(faults.load(Ordering::SeqCst), 0);
    }
    lost.rewrite.failing_puts.store(100, Ordering::SeqCst);
    let e = a.check_conditional_writes().await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("503 Slow Down"), "{msg}");
    assert!(!msg.contains("ignores conditional writes"), "{msg}");
    lost.rewrite.failing_puts.store(0, Ordering::SeqCst);
    a.release().await.unwrap();
}

/// A `file://` replica's compare-and-swap is litefleet's own: the check
/// sends nothing and passes.
#[tokio::test]
async fn a_file_replica_passes_the_conditional_write_check() {
    let f = Fleet::new(common::fleet::Backend::File).await;
    let r = f.replica();
    let mut a = Lease::acquire(&r, Utc::now()).await.unwrap();
    a.check_conditional_writes().await.unwrap();
    a.release().await.unwrap();
}

// A lease that was deleted (on a replica where a replicator ran), or that
// expired without being released, may have a holder that still runs: its
// lease was deleted or edited by hand. The new holder writes nothing until
// such a holder's fence has closed (black-box probe H27: a second
// replicator took the deleted lease at once, the first went on uploading
// for 4-10 s, and a restore returned the other database's rows, exit 0).
// A new replica, and a lease released at a clean stop, need no wait.
both_backends!(
    a_lease_its_holder_did_not_release_is_written_under_only_after_a_wait,
    |b| async move {
        use litefleet::replica::identity::{self, Identity};
        let f = Fleet::new(b).await;
        let r = f.replica();
        let ttl = Duration::from_secs(3);
        let fenced_for = ttl - ttl / 4;
        let acquire = || Lease::acquire_with_ttl(&r, Utc::now(), ttl);
        // A new replica. `after_clean_stop`: no run before this one can
        // have left staged objects (the start looks for them otherwise).
        let a = acquire().await.unwrap();
        assert_eq!(a.takeover_wait(), Duration::ZERO);
        assert!(a.after_clean_stop());
        a.release().await.unwrap();
        // Released at a clean stop.
        let a = acquire().await.unwrap();
        assert_eq!(a.takeover_wait(), Duration::ZERO);
        assert!(a.after_clean_stop());
        identity::write(&r, &Identity::new()).await.unwrap();
        // Deleted by hand while its holder runs: the holder renews every
        // ttl/3 and stops writing at once when it finds the lease changed,
        // or when its fence runs out (ttl - margin after its last renewal).
        let token = CancellationToken::new();
        let fence = a.fence();
        let renewer = spawn_renewer(a, token.clone());
        r.store.delete(&lease_path(&r)).await.unwrap();
        let b2 = acquire().await.unwrap();
        assert_eq!(b2.takeover_wait(), fenced_for);
        assert!(!b2.after_clean_stop());
        assert!(fence.is_open(), "the old holder has not noticed yet");
        tokio::time::sleep(b2.takeover_wait()).await;
        assert!(!fence.is_open(), "the old holder still writes");
        assert!(matches!(renewer.stop().await, Err(Error::LeaseLost { .. })));
        assert!(token.is_cancelled());
        // Edited to look expired: the wait counts from the edit.
        let edited = Lease::current(&r).await.unwrap().unwrap();
        let mut old = edited.clone();
        old.expires = t0();
        r.store
            .put(
                &lease_path(&r),
                PutPayload::from(serde_json::to_vec(&old).unwrap()),
            )
            .await
            .unwrap();
        let c = acquire().await.unwrap();
        assert!(!c.after_clean_stop());
        let wait = c.takeover_wait();
        assert!(wait > fenced_for / 2 && wait <= fenced_for, "{wait:?}");
        drop(b2);
        // Expired long ago (a holder that died): no wait.
        if let Some(root) = r.local_root() {
            let mut dead = Lease::current(&r).await.unwrap().unwrap();
            dead.expires = t0();
            let path = root.join(LEASE_OBJECT);
            std::fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() - ttl * 2)
                .unwrap();
            let d = acquire().await.unwrap();
            assert_eq!(d.takeover_wait(), Duration::ZERO);
            assert!(!d.after_clean_stop(), "a holder that died");
        }
    }
);
