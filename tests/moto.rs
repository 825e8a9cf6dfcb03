//! A second S3 implementation: `moto_server` (PyPI), started by `.ci/run` on
//! 127.0.0.1 and named by `LITEFLEET_MOTO_ENDPOINT`.
//!
//! The in-process server keeps sub-second modification times; moto, like AWS,
//! lists whole seconds. These tests replicate and restore through it, hot
//! point-in-time restores included, so selection by the store's listing time
//! (instead of what an object holds) shows up as rows committed after the
//! asked time. Without the variable they are skipped, except under CI
//! (`CI` set), where a missing server is a failure.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::fleet::{age, count_rows, create_db, insert_rows};
use common::{litefleet, stderr};
use litefleet::daemon::scheduler::Replicator;
use litefleet::source::config::Loaded;
use rusqlite::Connection;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// The moto endpoint, or `None` (test skipped) outside CI.
fn endpoint() -> Option<String> {
    match std::env::var("LITEFLEET_MOTO_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e.trim_end_matches('/').to_string()),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI runs these tests against moto_server: set LITEFLEET_MOTO_ENDPOINT")
        }
        _ => {
            eprintln!("LITEFLEET_MOTO_ENDPOINT not set: skipping the moto tests");
            None
        }
    }
}

/// Creates `bucket` with one plain HTTP request (moto does not check
/// signatures); the endpoint must be `http://127.0.0.1:PORT`.
fn create_bucket(endpoint: &str, bucket: &str) {
    let host = endpoint.strip_prefix("http://").expect("http:// endpoint");
    assert!(
        host.starts_with("127.0.0.1:"),
        "moto must listen on 127.0.0.1"
    );
    let mut s = TcpStream::connect(host).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
}

/// A fleet of databases `data/<tenant>.db` replicated to a fresh moto bucket.
struct MotoFleet {
    data: TempDir,
    work: TempDir,
    endpoint: String,
    bucket: String,
}

impl MotoFleet {
    fn new(endpoint: String) -> MotoFleet {
        let bucket = format!(
            "litefleet-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        create_bucket(&endpoint, &bucket);
        MotoFleet {
            data: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            endpoint,
            bucket,
        }
    }

    fn yaml(&self) -> String {
        format!(
            "multi-db:\n  patterns: [\"{}/*.db\"]\n  scan-interval: 200ms\n  sync-interval: 100ms\n  hot-duration: 1h\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    url: s3://{}/fleet\n    endpoint: {}\n    force-path-style: true\n    region: us-east-1\n    access-key-id: moto\n    secret-access-key: moto\n    retries: 0\n    timeout: 10s\n",
            self.data.path().display(),
            self.work.path().join("tmp").display(),
            self.work.path().join("state").display(),
            self.bucket,
            self.endpoint
        )
    }

    fn loaded(&self) -> Loaded {
        Loaded::from_str(&self.yaml(), "moto.yml", self.data.path()).unwrap()
    }

    fn db(&self, tenant: &str) -> PathBuf {
        self.data.path().join(format!("{tenant}.db"))
    }

    /// Restores `key` (at `at`) with the binary; the row count, or the error.
    fn restore(&self, key: &str, at: Option<DateTime<Utc>>, out: &Path) -> Result<i64, String> {
        let config = self.work.path().join("moto.yml");
        std::fs::write(&config, self.yaml()).unwrap();
        let _ = std::fs::remove_file(out);
        let mut args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "restore".into(),
            key.into(),
            "-o".into(),
            out.display().to_string(),
        ];
        if let Some(t) = at {
            args.push("--timestamp".into());
            args.push(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = litefleet(self.work.path(), &args);
        if o.status.success() {
            Ok(count_rows(out))
        } else {
            Err(stderr(&o))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_snapshots_replicate_and_restore() {
    let Some(endpoint) = endpoint() else { return };
    let f = MotoFleet::new(endpoint);
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        create_db(&f.db(t), 10 * (i + 1));
        age(&f.db(t));
    }
    let r = Replicator::new(f.loaded()).unwrap();
    let report = r.cycle(&CancellationToken::new()).await;
    assert_eq!((report.uploaded, report.failed), (3, 0), "{report:?}");
    let out = f.work.path().join("out.db");
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(f.restore(t, None, &out), Ok(10 * (i as i64 + 1)), "{t}");
    }
    // Uploads that replace an object of the same hour name the version
    // they replace: the one this replicator wrote (`a`), or, after a
    // restart that forgot it, the one a HEAD finds (`b`). An hour may
    // begin in between; then they are new names, written as such.
    let grow = |t: &str| {
        let c = rusqlite::Connection::open(f.db(t)).unwrap();
        insert_rows(&c, 5);
        drop(c);
        age(&f.db(t));
    };
    grow("a");
    let report = r.cycle(&CancellationToken::new()).await;
    assert_eq!((report.uploaded, report.failed), (1, 0), "{report:?}");
    drop(r);
    grow("b");
    let r = Replicator::new(f.loaded()).unwrap();
    let report = r.cycle(&CancellationToken::new()).await;
    assert_eq!((report.uploaded, report.failed), (1, 0), "{report:?}");
    for (t, rows) in [("a", 15), ("b", 25), ("c", 30)] {
        assert_eq!(f.restore(t, None, &out), Ok(rows), "{t}");
    }
}

/// Commits at ~20 per second into a hot database while the replicator runs,
/// then restores at many times T: never a row committed after T, and every
/// row committed well before T (one sync interval plus a margin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_holds_nothing_after_t() {
    let Some(endpoint) = endpoint() else { return };
    let f = MotoFleet::new(endpoint);
    let path = f.db("hot");
    let c = create_db(&path, 1);
    age(&path);
    let r = Arc::new(Replicator::new(f.loaded()).unwrap());
    let token = CancellationToken::new();
    let run = tokio::spawn(r.clone().run(false, token.clone()));
    // Wait for the first (cold) upload, then write: the database turns hot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while r
        .stats()
        .uploads_ok
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "no first upload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each commit happened between `before` and `after`.
    let mut commits: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for _ in 0..80 {
        let before = Utc::now();
        c.execute("INSERT INTO t(v) VALUES ('row')", []).unwrap();
        commits.push((before, Utc::now()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    run.await.unwrap().unwrap();
    drop(c);
    let out = f.work.path().join("pitr.db");
    assert_eq!(f.restore("hot", None, &out), Ok(commits.len() as i64 + 1));
    // Times spread over the writes, at odd sub-second offsets. The first row
    // was there before the writes.
    let first = commits[0].0;
    let mut checked = 0;
    for k in 0..12 {
        let t = first + chrono::Duration::milliseconds(300 + k * 317);
        let committed_by_t = 1 + commits.iter().filter(|(before, _)| *before <= t).count() as i64;
        // Shipped within a sync interval (100 ms); a margin for a slow machine.
        let settled = t - chrono::Duration::milliseconds(100 + 1500);
        let certain = 1 + commits
            .iter()
            .filter(|(_, after)| *after <= settled)
            .count() as i64;
        match f.restore("hot", Some(t), &out) {
            Ok(rows) => {
                assert!(
                    rows <= committed_by_t,
                    "restore at {t} holds {rows} rows, only {committed_by_t} were committed by then"
                );
                assert!(
                    rows >= certain,
                    "restore at {t} holds {rows} rows, {certain} were committed well before"
                );
                checked += 1;
            }
            Err(e) => panic!("restore at {t} failed: {e}"),
        }
        let db = Connection::open(&out).unwrap();
        let ok: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
    assert_eq!(checked, 12);
}

/// moto honours the conditional writes the replica lease stands on: the
/// check every `replicate` start makes passes, and a second replicator is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_conditional_write_check_passes() {
    let Some(endpoint) = endpoint() else { return };
    use litefleet::replica::lease::Lease;
    let f = MotoFleet::new(endpoint);
    let replica = f.loaded().open_replica().unwrap();
    let mut lease = Lease::acquire(&replica, Utc::now()).await.unwrap();
    lease.check_conditional_writes().await.unwrap();
    let e = Lease::acquire(&replica, Utc::now()).await.unwrap_err();
    assert!(matches!(e, litefleet::Error::LeaseHeld { .. }), "{e}");
    lease.renew().await.unwrap();
    lease.release().await.unwrap();
}
