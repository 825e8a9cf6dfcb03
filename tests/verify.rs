//! `litefleet verify`, the restore drill, against the in-process S3 server
//! and file://: a clean fleet in both tiers passes (exit 0); a damaged cold
//! snapshot, a damaged generation snapshot and a deleted WAL segment are
//! problems naming the key and the object or gap (exit 1); a replica that
//! cannot be reached exits 2; `--json` and `--sample`; a replica whose
//! content differs from an unchanged source is caught. And the daemon's
//! drill schedule, in paused time.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::fleet::{create_db, Fleet};
use common::generations::GenWriter;
use common::litefleet;
use litefleet::capture::snapshot;
use litefleet::capture::wal::Position;
use litefleet::daemon::scheduler::{verify_loop, VerifyCounts, VerifyJob};
use litefleet::replica::cold;
use litefleet::replica::hot;
use litefleet::replica::storage::Replica;
use litefleet::restore::verify::Quiet;
use litefleet::restore::VerifyOptions;
use litefleet::stats::Stats;
use object_store::path::Path as ObjPath;
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;

/// Runs `litefleet verify ARGS` on the fleet's config.
fn verify(f: &Fleet, args: &[&str]) -> Output {
    let cfg = f.config_path();
    let mut all = vec!["--config", cfg.to_str().unwrap(), "verify"];
    all.extend_from_slice(args);
    litefleet(f.work.path(), &all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `verify --json ARGS`: exit code and the parsed document.
fn verify_json(f: &Fleet, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = verify(f, &all);
    let doc = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(&o), common::stderr(&o)));
    (o.status.code().unwrap(), doc)
}

/// The summary counts (databases, ok, problems, could not check).
fn counts(doc: &serde_json::Value) -> (u64, u64, u64, u64) {
    let s = &doc["summary"];
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {doc}"));
    (n("databases"), n("ok"), n("problems"), n("could_not_check"))
}

fn result<'a>(doc: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .unwrap_or_else(|| panic!("no result for {key} in {doc}"))
}

/// `n` tenants of p0/d0, each with its own row count, replicated once to
/// the cold tier.
async fn cold_fleet(f: &Fleet, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for t in 0..n {
        drop(create_db(&f.db_path("p0", "d0", &format!("t{t}")), 3 + t));
        keys.push(Fleet::key("p0", "d0", &format!("t{t}")));
    }
    let r = f.replicator().cycle(&CancellationToken::new()).await;
    assert_eq!((r.scan.databases, r.failed), (n, 0));
    keys
}

/// A database of the fleet streamed into a generation by hand: a
/// generation snapshot, then two WAL segments (rows 1..=18).
struct HotDb {
    w: GenWriter,
    /// Generation snapshot object.
    snapshot: ObjPath,
    /// Where the two segments start.
    segments: [Position; 2],
    _copies: tempfile::TempDir,
}

async fn hot_db(f: &Fleet, r: &Replica, tenant: &str) -> HotDb {
    let path = f.db_path("p1", "d0", tenant);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = GenWriter::create(path, &Fleet::key("p1", "d0", tenant), 100);
    w.commit(10);
    w.checkpoint(false);
    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("copy.db");
    std::fs::copy(&w.db, &copy).unwrap();
    let committed = Utc::now();
    litefleet::capture::upload::upload_snapshot(
        r,
        &w.key,
        &w.gen,
        0,
        committed,
        &copy,
        copies.path(),
    )
    .await
    .unwrap();
    let snapshot = hot::snapshot_path(&r.prefix, &w.key, &w.gen, 0, committed);
    w.commit(5);
    let first = w.ship(r).await;
    w.commit(3);
    let second = w.ship(r).await;
    HotDb {
        w,
        snapshot,
        segments: [first, second],
        _copies: copies,
    }
}

/// The cold snapshot object of `key` (the fleet's only one).
async fn cold_object(r: &Replica, key: &str) -> ObjPath {
    let snaps = cold::snapshots(r, key).await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    snaps[0].location.clone()
}

/// Flips a byte in the middle of an object.
async fn flip(r: &Replica, loc: &ObjPath) {
    let mut bytes = r.get_bytes(loc).await.unwrap().unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    r.store.put(loc, bytes.into()).await.unwrap();
}

both_backends!(clean_fleet_in_both_tiers_verifies, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    let mut keys = cold_fleet(&f, 3).await;
    let mut hot = hot_db(&f, &r, "t0").await;
    keys.push(hot.w.key.clone());

    let o = verify(&f, &[]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", common::stderr(&o));
    assert_eq!(
        out,
        "verified 4 databases: 4 ok, 0 problems, 0 could not be checked\n"
    );

    let (code, doc) = verify_json(&f, &[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(counts(&doc), (4, 4, 0, 0));
    for key in &keys {
        assert_eq!(result(&doc, key)["status"], "ok", "{doc}");
    }
    let h = result(&doc, &hot.w.key);
    assert_eq!(h["tier"], "hot", "{h}");
    assert_eq!(
        h["object"],
        format!("{} + 2 WAL segments", hot.snapshot).as_str()
    );
    // Written just before its last segment was read, and idle since: its
    // -wal has the generation's header and commits up to where the restore
    // ends, so it is compared, although its last change is within a moment
    // of the state's time (before, "newer, lag 0.0s" for ever).
    assert_eq!(h["source"]["result"], "match", "{h}");
    assert!(
        h["source"]["detail"]
            .as_str()
            .unwrap()
            .contains("1 table(s) match"),
        "{h}"
    );
    assert_eq!(result(&doc, &keys[0])["tier"], "cold");

    // A prefix narrows the drill; scratch restores are gone afterwards.
    let (code, doc) = verify_json(&f, &["p1"]);
    assert_eq!((code, counts(&doc)), (0, (1, 1, 0, 0)), "{doc}");
    let tmp = f.work.path().join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| !n
            .to_string_lossy()
            .starts_with(litefleet::restore::verify::SCRATCH_PREFIX)),
        "{left:?}"
    );

    // A commit not shipped: the same WAL goes on past the restored end,
    // so the source is newer, never compared (its row count differs).
    hot.w.commit(2);
    let (code, doc) = verify_json(&f, &["p1"]);
    assert_eq!((code, counts(&doc)), (0, (1, 1, 0, 0)), "{doc}");
    let h = result(&doc, &hot.w.key);
    assert_eq!(h["source"]["result"], "newer", "{h}");
    assert!(
        h["source"]["detail"]
            .as_str()
            .unwrap()
            .contains("commits after the restored state"),
        "{h}"
    );
});

both_backends!(
    damaged_cold_snapshot_is_a_problem_naming_the_object,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let keys = cold_fleet(&f, 3).await;
        let bad = cold_object(&r, &keys[1]).await;
        flip(&r, &bad).await;

        let o = verify(&f, &[]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{out}{}", common::stderr(&o));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].starts_with(&format!("{}: damaged object: ", keys[1])),
            "{out}"
        );
        assert!(lines[0].contains(bad.as_ref()), "{out}");
        assert_eq!(
            lines[1],
            "verified 3 databases: 2 ok, 1 problems, 0 could not be checked"
        );

        let (code, doc) = verify_json(&f, &[]);
        assert_eq!((code, counts(&doc)), (1, (3, 2, 1, 0)), "{doc}");
        let res = result(&doc, &keys[1]);
        assert_eq!(res["status"], "problem");
        assert_eq!(res["what"], "damaged object");
        assert_eq!(doc["results"].as_array().unwrap().len(), 3);

        // --sample checks exactly that many keys, picked from all of them.
        let (_, doc) = verify_json(&f, &["--sample", "2"]);
        assert_eq!(counts(&doc).0, 2, "{doc}");
        assert_eq!(doc["results"].as_array().unwrap().len(), 2);
        // --sample 0 is every key, as `verify-sample: 0` in the config.
        let (_, doc) = verify_json(&f, &["--sample", "0"]);
        assert_eq!(counts(&doc).0, 3, "{doc}");
        // Everything was uploaded just now.
        let (_, doc) = verify_json(&f, &["--since", "1h"]);
        assert_eq!(counts(&doc).0, 3, "{doc}");
    }
);

// A hot database whose newest generation streams into the fleet log has
// uploads its generation's listing does not show (parts of shared log
// objects until the hourly consolidation): `--since` keeps it, as it keeps
// one whose metadata was written since. An idle generation of the same age
// is left out (black-box probe G27: `--since` checked none of 24
// always-hot databases).
both_backends!(
    since_keeps_a_generation_streaming_into_the_fleet_log,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let idle = hot_db(&f, &r, "t0").await;
        idle.w.write_metadata(&r).await;
        let logged = hot_db(&f, &r, "t1").await;
        logged.w.write_metadata_logged(&r, true).await;
        let rewritten = hot_db(&f, &r, "t2").await;
        // Everything above is more than a second old, but `t2`'s metadata.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rewritten.w.write_metadata(&r).await;
        let (_, doc) = verify_json(&f, &["--since", "1s"]);
        let mut keys: Vec<&str> = doc["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [logged.w.key.as_str(), rewritten.w.key.as_str()],
            "{doc}"
        );
    }
);

both_backends!(
    damaged_generation_and_missing_segment_are_problems,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let cold = cold_fleet(&f, 1).await;
        let damaged = hot_db(&f, &r, "t0").await;
        flip(&r, &damaged.snapshot).await;
        let gap = hot_db(&f, &r, "t1").await;
        let missing = gap.segments[0];
        r.delete(&gap.w.segment_path(&r, missing)).await.unwrap();

        let o = verify(&f, &[]);
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{out}{}", common::stderr(&o));
        let line = |key: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("no line for {key}: {out}"))
                .to_string()
        };
        let d = line(&damaged.w.key);
        assert!(
            d.starts_with(&format!("{}: damaged object: ", damaged.w.key)),
            "{d}"
        );
        assert!(d.contains(damaged.snapshot.as_ref()), "{d}");
        let g = line(&gap.w.key);
        assert!(
            g.starts_with(&format!("{}: continuity gap: ", gap.w.key)),
            "{g}"
        );
        assert!(
            g.contains(&format!(
                "{missing}_* (WAL 0 offset {}) is missing",
                missing.offset
            )),
            "{g}"
        );
        assert!(!out.contains(&format!("{}: ", cold[0])), "{out}");
        assert!(
            out.ends_with("verified 3 databases: 1 ok, 2 problems, 0 could not be checked\n"),
            "{out}"
        );
    }
);

both_backends!(unreachable_replica_exits_2, |b| async move {
    let mut f = Fleet::new(b).await;
    cold_fleet(&f, 2).await;
    match b {
        common::fleet::Backend::S3 => f.s3.as_mut().unwrap().stop().await,
        common::fleet::Backend::File => {
            std::fs::remove_dir_all(f.work.path().join("replica")).unwrap()
        }
    }
    let o = verify(&f, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(
        common::stderr(&o).contains("error: "),
        "{}",
        common::stderr(&o)
    );
    let (code, doc) = verify_json(&f, &[]);
    assert_eq!(code, 2);
    assert!(doc["error"].as_str().is_some(), "{doc}");
});

/// Uploads a consistent copy of `db` as the cold snapshot of `key`, recorded
/// as begun `ahead` from now (so the source's last change is well before
/// it), under the name the replicator would give it (replacing its object).
async fn put_cold(r: &Replica, key: &str, db: &Path, ahead: chrono::Duration) {
    let tmp = tempfile::tempdir().unwrap();
    let snap = snapshot::capture(db, None, key, tmp.path()).unwrap();
    let times = cold::SnapshotTimes {
        started: Utc::now() + ahead,
        taken: Utc::now() + ahead,
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut snap.reader().unwrap(), &mut bytes).unwrap();
    let record = times.encode_for(key);
    bytes[..record.len()].copy_from_slice(&record);
    let stem = db.file_stem().unwrap().to_str().unwrap();
    let loc = cold::snapshot_path(&r.prefix, key, stem, times.taken);
    r.store.put(&loc, bytes.into()).await.unwrap();
}

both_backends!(
    replica_differing_from_an_unchanged_source_is_a_problem,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let keys = cold_fleet(&f, 2).await;
        let ahead = chrono::Duration::seconds(10);
        // t0: a valid snapshot of another database (one more row).
        let other = tempfile::tempdir().unwrap();
        let other_db = other.path().join("t0.db");
        drop(create_db(&other_db, 4));
        put_cold(&r, &keys[0], &other_db, ahead).await;
        // t1: a true copy, so the comparison has something to match.
        put_cold(&r, &keys[1], &f.db_path("p0", "d0", "t1"), ahead).await;

        let (code, doc) = verify_json(&f, &[]);
        assert_eq!((code, counts(&doc)), (1, (2, 1, 1, 0)), "{doc}");
        let bad = result(&doc, &keys[0]);
        assert_eq!(bad["what"], "differs from source", "{bad}");
        assert_eq!(bad["source"]["result"], "mismatch", "{bad}");
        assert!(
            bad["why"]
                .as_str()
                .unwrap()
                .contains("table \"t\": source 3 rows, restored 4 rows"),
            "{bad}"
        );
        let good = result(&doc, &keys[1]);
        assert_eq!(good["status"], "ok");
        assert_eq!(good["source"]["result"], "match", "{good}");

        let o = verify(&f, &[]);
        let out = stdout(&o);
        assert!(
            out.starts_with(&format!("{}: differs from source: ", keys[0])),
            "{out}"
        );
    }
);

// A fleet database the replica does not hold is left out while it may
// still be waiting for its first upload, and "not found" after that.
both_backends!(database_without_backup_is_not_found, |b| async move {
    let f = Fleet::new(b).await;
    cold_fleet(&f, 1).await;
    let new = f.db_path("p2", "d0", "t0");
    drop(create_db(&new, 1));
    // An old mtime is not enough (a copy keeps it): ctime says "new" too.
    common::fleet::age(&new);
    // One whose key replicate refuses is no backup either (black-box probe
    // G27, F8: left out of the report).
    let refused = f.db_path("p2", "d0", "back\\slash");
    drop(create_db(&refused, 1));
    let (code, doc) = verify_json(&f, &[]);
    assert_eq!((code, counts(&doc)), (0, (1, 1, 0, 0)), "{doc}");

    let loaded = f.loaded();
    let mut opts = VerifyOptions::new(&loaded, "");
    opts.new_database_grace = Duration::ZERO;
    let report = litefleet::restore::verify(&loaded, &f.replica(), &opts, &Quiet)
        .await
        .unwrap();
    assert_eq!(report.summary.exit_code(), 1);
    assert_eq!((report.summary.ok, report.summary.problems), (1, 2));
    let missing = report
        .results
        .iter()
        .find(|r| r.key == "p2/d0/back\\slash")
        .unwrap();
    assert_eq!(missing.what.as_deref(), Some("not found"));
    let why = missing.why.as_deref().unwrap();
    assert!(
        why.contains("not backed up: replicate refuses the key of")
            && why.contains(&refused.display().to_string()),
        "{missing:?}"
    );
    let missing = report.results.iter().find(|r| r.key == "p2/d0/t0").unwrap();
    assert_eq!(missing.what.as_deref(), Some("not found"));
    assert!(
        missing
            .why
            .as_deref()
            .unwrap()
            .contains(&new.display().to_string()),
        "{missing:?}"
    );
});

/// The daemon's drill: none before the first interval, one per interval,
/// each recorded in the stats; a drill that cannot run is recorded as such.
#[tokio::test(start_paused = true)]
async fn drills_run_every_interval_and_are_counted() {
    let stats = Arc::new(Stats::default());
    let (tx, mut ran) = tokio::sync::mpsc::unbounded_channel::<()>();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = calls.clone();
    let job: VerifyJob = Arc::new(move || {
        let tx = tx.clone();
        let n = c.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let _ = tx.send(());
            if n == 0 {
                Ok(VerifyCounts {
                    ok: 99,
                    problems: 1,
                    could_not_check: 0,
                    renew: vec!["/data/a.db".into()],
                })
            } else {
                Err(litefleet::Error::NotFound("nothing to verify".into()))
            }
        })
    });
    let hour = Duration::from_secs(3600);
    let token = CancellationToken::new();
    let renewed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let to_renew = renewed.clone();
    let renew = move |paths: &[std::path::PathBuf]| to_renew.lock().unwrap().push(paths.to_vec());
    let task = tokio::spawn(verify_loop(hour, job, stats.clone(), renew, token.clone()));
    // Let it start its clock.
    tokio::task::yield_now().await;
    let runs = |s: &Stats| s.verify_runs.load(Ordering::SeqCst);
    async fn settle(stats: &Stats, want: u64) {
        while stats.verify_runs.load(Ordering::SeqCst) < want {
            tokio::task::yield_now().await;
        }
    }

    tokio::time::advance(hour - Duration::from_secs(1)).await;
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    ran.recv().await.unwrap();
    settle(&stats, 1).await;
    assert_eq!(stats.verify_last_ok.load(Ordering::SeqCst), 99);
    assert_eq!(stats.verify_last_problems.load(Ordering::SeqCst), 1);
    assert_eq!(stats.verify_last_failed.load(Ordering::SeqCst), 0);
    assert!(stats.verify_last_unix.load(Ordering::SeqCst) > 0);
    // The drill's problem keys' files go to the daemon to upload again.
    assert_eq!(
        *renewed.lock().unwrap(),
        vec![vec![std::path::PathBuf::from("/data/a.db")]]
    );

    tokio::time::advance(hour).await;
    ran.recv().await.unwrap();
    settle(&stats, 2).await;
    assert_eq!(runs(&stats), 2);
    assert_eq!(stats.verify_last_failed.load(Ordering::SeqCst), 1);
    assert_eq!(stats.verify_last_problems.load(Ordering::SeqCst), 0);

    token.cancel();
    task.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The daemon (`replicate`) on the fleet, with the command line's drill
/// beside its loop: its stats, its stop token and its task.
fn drilling_daemon(
    f: &Fleet,
) -> (
    Arc<Stats>,
    CancellationToken,
    tokio::task::JoinHandle<litefleet::Result<()>>,
) {
    let loaded = f.loaded();
    let job = litefleet::cli::verify_job(Arc::new(loaded.clone()), f.replica());
    let replicator = Arc::new(
        litefleet::daemon::scheduler::Replicator::with_replica(loaded, f.replica())
            .unwrap()
            .with_verify(job),
    );
    let stats = replicator.stats();
    let token = CancellationToken::new();
    let run = tokio::spawn(replicator.run(false, token.clone()));
    (stats, token, run)
}

// `replicate` with `verify-interval`: the command line's drill runs beside
// the loop and its counts reach the stats the endpoint serves.
both_backends!(replicate_runs_drills_on_its_interval, |b| async move {
    let f = Fleet::with_yaml(b, "  verify-interval: 100ms\n  verify-sample: 2\n").await;
    cold_fleet(&f, 3).await;
    let (stats, token, run) = drilling_daemon(&f);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stats.verify_runs.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "no drill ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel();
    run.await.unwrap().unwrap();
    // A sample of two, both good.
    assert_eq!(stats.verify_last_ok.load(Ordering::SeqCst), 2);
    assert_eq!(stats.verify_last_problems.load(Ordering::SeqCst), 0);
    assert_eq!(stats.verify_last_failed.load(Ordering::SeqCst), 0);
    let view = litefleet::daemon::server::StatsView::read(&stats, Duration::from_secs(15), 0);
    assert_eq!(view.verify_last_ok, Some(true));
});

// A drill of the daemon that finds a key's backup damaged uploads that
// database again: an unchanged database was otherwise never uploaded
// again, and its newest backup stayed unrestorable (left by session 17).
both_backends!(a_drill_that_finds_damage_uploads_again, |b| async move {
    let mut f = Fleet::with_yaml(
        b,
        "  verify-interval: 300ms\n  verify-sample: 0\n  max-hot-databases: 0\n",
    )
    .await;
    f.scan_interval = "200ms";
    let keys = cold_fleet(&f, 2).await;
    let r = f.replica();
    let (stats, token, run) = drilling_daemon(&f);
    let runs = || stats.verify_runs.load(Ordering::SeqCst);
    let good = || {
        stats.verify_last_problems.load(Ordering::SeqCst) == 0
            && stats.verify_last_ok.load(Ordering::SeqCst) == 2
    };
    // The daemon's own uploads (its first start uploads every database,
    // and a racy one once more) done and proved.
    until("a drill finds every key good, nothing pending", || {
        runs() > 0 && good() && stats.pending.load(Ordering::SeqCst) == 0
    })
    .await;
    let damaged = cold_object(&r, &keys[0]).await;
    flip(&r, &damaged).await;
    // A drill finds the damage, the next cycle uploads the database again,
    // and a later drill finds every key good. (Not `verify` from here in
    // between: the daemon may have uploaded again by then, and rightly;
    // `damaged_cold_snapshot_is_a_problem_naming_the_object` is that test.)
    until("a drill finds the damage", || {
        stats.verify_last_problems.load(Ordering::SeqCst) == 1
    })
    .await;
    let found = runs();
    until("a later drill finds every key good", || {
        runs() > found && good()
    })
    .await;
    token.cancel();
    run.await.unwrap().unwrap();
    let (code, doc) = verify_json(&f, &[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(counts(&doc), (2, 2, 0, 0));
});

// The same for a streaming database whose generation snapshot is damaged:
// its stream ends and it streams again in a new generation.
both_backends!(
    a_drill_that_finds_a_damaged_generation_streams_anew,
    |b| async move {
        let drills = "  verify-interval: 300ms\n  verify-sample: 0\n";
        let streams = "  sync-interval: 100ms\n  hot-duration: 1h\n";
        let mut f = Fleet::with_yaml(b, &format!("{drills}{streams}")).await;
        f.scan_interval = "200ms";
        let key = Fleet::key("p0", "d0", "t0");
        let db = create_db(&f.db_path("p0", "d0", "t0"), 3);
        let r = f.replica();
        let (stats, token, run) = drilling_daemon(&f);
        let runs = || stats.verify_runs.load(Ordering::SeqCst);
        let good = || {
            stats.verify_last_problems.load(Ordering::SeqCst) == 0
                && stats.verify_last_ok.load(Ordering::SeqCst) == 1
        };
        // A known database that changes is promoted to the hot tier.
        until("streaming", || {
            common::fleet::insert_rows(&db, 1);
            stats.hot.load(Ordering::SeqCst) == 1
        })
        .await;
        let since = runs();
        until("a drill finds it good", || runs() > since && good()).await;
        let generations = stats.generations.load(Ordering::SeqCst);
        let h = newest_in_generation(&f, &stats, &db, &key).await;
        let object = h["object"].as_str().unwrap();
        let snapshot = object.split(" + ").next().unwrap();
        flip(&r, &ObjPath::from(snapshot)).await;
        until("a drill finds the damage", || {
            stats.verify_last_problems.load(Ordering::SeqCst) == 1
        })
        .await;
        // The drill's finding ends the stream; the database is uploaded
        // again (a drill may find that cold upload good first) and streams
        // in a new generation (counted as it begins, before its uploads).
        until("a new generation", || {
            stats.generations.load(Ordering::SeqCst) > generations
        })
        .await;
        let h = newest_in_generation(&f, &stats, &db, &key).await;
        assert_ne!(
            h["object"].as_str().unwrap().split(" + ").next(),
            Some(snapshot)
        );
        let found = runs();
        until("a later drill finds it good", || runs() > found && good()).await;
        token.cancel();
        run.await.unwrap().unwrap();
        // From either tier: a drill that began before the new generation
        // was up finds the old damage once more, and its renewal ends the
        // new stream (one more upload; nothing lost).
        let (code, doc) = verify_json(&f, &[]);
        assert_eq!(code, 0, "{doc}");
    }
);

/// `verify`'s result for `key` once its generation (the hot tier) restores
/// the newest state, which a row written to `db` and shipped by the stream
/// makes sure of: the stream ships it after the generation's snapshot and
/// metadata, and after a cold upload begun as the stream started, which can
/// end after the generation's start with the same rows at a later time, so
/// that restores rightly take it (the later tier wins; CI, 2026-12-07).
/// While a drill's renewal is under way `verify` may also find the old
/// damage still the newest state (the stream that recorded it ended after
/// the cold copy began, so only its replay could prove the copy), or a
/// renewal may end the new stream before it ships the row: then once more,
/// with another row.
async fn newest_in_generation(
    f: &Fleet,
    stats: &Stats,
    db: &rusqlite::Connection,
    key: &str,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..10 {
        let shipped = stats.wal_segments.load(Ordering::SeqCst);
        let uploaded = stats.uploads_ok.load(Ordering::SeqCst);
        common::fleet::insert_rows(db, 1);
        until("a new row shipped, or uploaded cold", || {
            stats.wal_segments.load(Ordering::SeqCst) > shipped
                || stats.uploads_ok.load(Ordering::SeqCst) > uploaded
        })
        .await;
        let (code, doc) = verify_json(f, &[]);
        let h = result(&doc, key);
        if code == 0 && h["tier"] == "hot" {
            return h.clone();
        }
        last = doc;
    }
    panic!("{key}: its generation never restored the newest state: {last}");
}

/// Waits (at most a minute) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The drill scratch directories under the fleet's temp-dir that hold
/// their lock file (made by a drill that got that far).
fn scratch_dirs(f: &Fleet) -> Vec<std::path::PathBuf> {
    let tmp = f.work.path().join("tmp");
    let mut dirs: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(litefleet::restore::verify::SCRATCH_PREFIX)
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Starts `litefleet verify` and returns it once its scratch directory
/// exists and is locked (the drill is restoring).
async fn running_drill(f: &Fleet) -> (std::process::Child, std::path::PathBuf) {
    let cfg = f.config_path();
    let before = scratch_dirs(f);
    let child = common::litefleet_command(
        f.work.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "verify",
            "--concurrency",
            "1",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let mut dir = None;
    until("the drill's scratch directory", || {
        dir = scratch_dirs(f)
            .into_iter()
            .find(|d| !before.contains(d) && d.join(".lock").exists());
        dir.is_some()
    })
    .await;
    (child, dir.unwrap())
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// A drill stopped by SIGTERM removes its scratch directory (a full-size
/// copy of a database) and exits 143; one killed outright leaves it, and
/// the next drill or `replicate`'s start removes it, but never the
/// directory of a drill still running. Before, an interrupted drill left
/// `temp-dir/verify-XXXX` for ever (black-box probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_drills_leave_no_scratch() {
    let f = Fleet::new(common::fleet::Backend::S3).await;
    cold_fleet(&f, 20).await;
    // Each request takes a while: a drill of 20 keys one at a time runs
    // for several seconds after it made its scratch directory.
    f.s3()
        .set_fault(common::s3::Fault::Delay(Duration::from_millis(300)));

    // SIGKILL: the directory stays, unlocked.
    let (mut a, a_dir) = running_drill(&f).await;
    signal(&a, libc::SIGKILL);
    a.wait().unwrap();
    assert!(a_dir.exists());

    // The next drill removes it, not its own.
    let (mut b, b_dir) = running_drill(&f).await;
    assert!(!a_dir.exists(), "{:?}", scratch_dirs(&f));
    assert_eq!(
        litefleet::restore::verify::remove_stale_scratch(&f.work.path().join("tmp")),
        0
    );
    assert!(b_dir.join(".lock").exists());

    // `replicate`'s start removes a killed drill's directory, not a
    // running one's.
    signal(&b, libc::SIGKILL);
    b.wait().unwrap();
    let (mut c, c_dir) = running_drill(&f).await;
    assert!(!b_dir.exists());
    let (mut d, d_dir) = running_drill(&f).await;
    signal(&c, libc::SIGKILL);
    c.wait().unwrap();
    f.s3().set_fault(common::s3::Fault::None);
    // The fleet was uploaded in-process, without a lease: a lease released
    // at a clean stop spares the start the wait a deleted one costs.
    litefleet::replica::lease::Lease::acquire(&f.replica(), Utc::now())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let cfg = f.config_path();
    let o = litefleet(
        f.work.path(),
        &["--config", cfg.to_str().unwrap(), "replicate", "--once"],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("removed the scratch directories"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(scratch_dirs(&f), vec![d_dir.clone()]);
    assert!(!c_dir.exists());

    // SIGTERM: the drill removes its own directory and says it stopped.
    signal(&d, libc::SIGTERM);
    let status = d.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert_eq!(scratch_dirs(&f), Vec::<std::path::PathBuf>::new());
}

/// An unusable temp-dir is an error naming the setting, as `replicate`'s
/// (before: only `error: <path>: Not a directory`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_temp_dir_is_named() {
    let f = Fleet::new(common::fleet::Backend::File).await;
    cold_fleet(&f, 1).await;
    let not_a_dir = f.work.path().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let yaml = f.yaml().replace(
        &format!("temp-dir: {}", f.work.path().join("tmp").display()),
        &format!("temp-dir: {}", not_a_dir.display()),
    );
    let cfg = f.work.path().join("bad-temp.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let o = litefleet(
        f.work.path(),
        &["--config", cfg.to_str().unwrap(), "verify"],
    );
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "error: multi-db.temp-dir: {} is not a writable directory",
            not_a_dir.display()
        )),
        "{err}"
    );
}

/// With `--log-format json`, verify's final error is a JSON log line (level
/// ERROR), as every other command's; before, a plain `error: ...` line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_end_with_a_json_error() {
    let f = Fleet::new(common::fleet::Backend::File).await;
    cold_fleet(&f, 1).await;
    let cfg = f.config_path();
    let o = litefleet(
        f.work.path(),
        &[
            "--log-format",
            "json",
            "--config",
            cfg.to_str().unwrap(),
            "verify",
            "nokey",
        ],
    );
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}\n{err}"));
        assert!(v["level"].is_string(), "{line}");
    }
    let last: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{err}");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("no databases under prefix \"nokey\""),
        "{err}"
    );
}
