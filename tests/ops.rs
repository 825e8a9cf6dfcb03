//! The running daemon: the operations endpoint, secrets kept out of every
//! output, and a SIGKILL in the middle of uploads followed by a restart.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fleet::{count_rows, create_db, insert_rows, Backend, Fleet};
use common::s3::Fault;
use common::{chmod, walk_files};
use object_store::ObjectStoreExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `litefleet replicate` child whose stderr is collected as it arrives.
struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(f: &Fleet, args: &[&str]) -> Daemon {
        Self::start_with(f, args, &[])
    }

    /// `wrapper` runs the binary (e.g. `setpriv --reuid ...`).
    fn start_with(f: &Fleet, args: &[&str], wrapper: &[&str]) -> Daemon {
        let cfg = f.config_path();
        let bin = env!("CARGO_BIN_EXE_litefleet");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(["--config", cfg.to_str().unwrap(), "--log-level", "debug"])
            .args(args)
            .env_remove("LITEFLEET_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Daemon {
            child,
            log,
            reader: Some(reader),
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for exit; returns the exit code and the whole log.
    async fn wait(mut self) -> (Option<i32>, String) {
        let status = tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            self.reader.take().unwrap().join().unwrap();
            (status.code(), self.log())
        });
        status.await.unwrap()
    }
}

/// Polls `cond` (without sleeping a fixed time in place of a condition).
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `/healthz`, `/stats` and `/metrics` on the configured address, reflecting
/// real uploads; no credential in any response or in the debug log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoint_reports_and_never_leaks_credentials() {
    let mut f = Fleet::new(Backend::S3).await;
    let addr = free_port();
    f.top_yaml = format!("addr: {addr}\n");
    f.scan_interval = "500ms";
    for i in 0..3 {
        drop(create_db(&f.db_path("p", "d", &format!("t{i}")), 2));
    }
    let d = Daemon::start(&f, &["replicate"]);
    until("three uploads in /stats", async || {
        match http_get(addr, "/stats").await {
            Some((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                v["uploads_ok"].as_u64() >= Some(3) && v["pending"].as_u64() == Some(0)
            }
            _ => false,
        }
    })
    .await;
    let (code, health) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!((code, health.as_str()), (200, "ok\n"));
    let (_, stats) = http_get(addr, "/stats").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["databases"], 3);
    assert_eq!(v["cold"], 3);
    assert_eq!(v["healthy"], true);
    assert!(v["scans"].as_u64().unwrap() >= 1);
    let (code, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("litefleet_databases{tier=\"cold\"} 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE litefleet_uploads_total counter"),
        "{metrics}"
    );
    let (code, _) = http_get(addr, "/nope").await.unwrap();
    assert_eq!(code, 404);

    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
    for out in [&log, &stats, &metrics, &health] {
        assert!(!out.contains(f.s3().secret_key()), "secret leaked: {out}");
        assert!(
            !out.contains(f.s3().access_key()),
            "access key leaked: {out}"
        );
    }
    assert!(log.contains("operations endpoint"), "{log}");
}

/// SIGKILL while uploads are on the wire, then a restart: the restarted run
/// uploads everything and every database restores with all its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_upload_then_restart_loses_nothing() {
    let mut f = Fleet::new(Backend::S3).await;
    f.top_yaml = "    lease-ttl: 8s\n".into();
    let n = 8;
    for i in 0..n {
        drop(create_db(&f.db_path("p", "d", &format!("t{i}")), 3 + i));
    }
    f.s3().set_fault(Fault::Delay(Duration::from_millis(400)));
    let d = Daemon::start(&f, &["replicate"]);
    // Seven requests take the lease and check the start (GET, a GET of the
    // replica's identity, conditional PUT, two refused conditional PUTs and
    // one applied, a HEAD for an enclosing replica root), one lists the
    // fleet log an earlier run may have left, two read and write the
    // replica's identity; the rest are uploads.
    until("an upload on the wire", async || {
        f.s3().request_count() >= 11
    })
    .await;
    d.signal("-KILL");
    let (code, log) = d.wait().await;
    assert_eq!(code, None, "killed by a signal: {log}");
    f.s3().set_fault(Fault::None);

    // The dead process's lease is still valid: a restart is refused until it
    // expires (TTL 8 s, renewed every 2.7 s) ...
    let d = Daemon::start(&f, &["replicate", "--once"]);
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("wait until its lease expires"), "{log}");
    // ... or until an operator removes it, as here.
    let lease = litefleet::replica::lease::lease_path(&f.replica());
    f.replica().store.delete(&lease).await.unwrap();

    let d = Daemon::start(&f, &["replicate", "--once"]);
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
    // A lease deleted by hand may have had a live holder: the start writes
    // nothing until such a holder's fence has closed (`ttl - margin`).
    let at = |what: &str| {
        let line = log.lines().find(|l| l.contains(what)).expect(what);
        let stamp = line.split_whitespace().next().unwrap();
        chrono::DateTime::parse_from_rfc3339(stamp).expect(stamp)
    };
    let waited =
        at("uploaded snapshot") - at("took over a replica lease its holder did not release");
    assert!(waited >= chrono::Duration::seconds(6), "{waited:?}: {log}");
    // Staging files of the killed run were swept at start; this run's are gone.
    let staged: Vec<_> = walk_files(&f.work.path().join("tmp"));
    assert!(staged.is_empty(), "{staged:?}");
    let out = tempfile::tempdir().unwrap();
    for i in 0..n {
        let o = out.path().join(format!("{i}.db"));
        f.restore(&format!("p/d/t{i}"), &o, None).await.unwrap();
        assert_eq!(count_rows(&o), 3 + i as i64);
    }
}

fn chmod_tree(dir: &std::path::Path, mode: u32) {
    chmod(dir, mode);
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            chmod_tree(&e.path(), mode);
        } else {
            chmod(&e.path(), 0o666);
        }
    }
}

/// Opens `f`'s databases, work directory and replica to everyone, so a
/// daemon run as `nobody` ([`as_nobody`]) can use them.
fn open_to_nobody(f: &Fleet) {
    for dir in [f.data.path(), f.work.path()] {
        chmod_tree(dir, 0o777);
    }
    std::fs::create_dir_all(f.work.path().join("replica")).unwrap();
    chmod(&f.work.path().join("replica"), 0o777);
}

/// The wrapper that runs the daemon as `nobody` when the tests run as root
/// (root ignores file modes); none otherwise.
fn as_nobody() -> &'static [&'static str] {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        &[]
    }
}

/// A database file and a directory the daemon may not read: each is logged
/// once (not once per scan) and every other database is replicated. Root
/// ignores permissions, so as root the daemon runs as `nobody` via `setpriv`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_is_logged_once_and_others_continue() {
    let mut f = Fleet::new(Backend::File).await;
    f.scan_interval = "100ms";
    for i in 0..3 {
        drop(create_db(&f.db_path("p", "d", &format!("t{i}")), 2));
    }
    let locked_db = f.db_path("p", "d", "locked");
    drop(create_db(&locked_db, 1));
    let hidden = f.db_path("p", "hidden", "x");
    drop(create_db(&hidden, 1));
    open_to_nobody(&f);
    chmod(&locked_db, 0o000);
    let hidden_dir = hidden.parent().unwrap().to_path_buf();
    chmod(&hidden_dir, 0o000);

    let wrapper = as_nobody();
    let d = Daemon::start_with(&f, &["replicate"], wrapper);
    until("five scans", async || {
        d.log().matches("scan complete").count() >= 5
    })
    .await;
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    chmod(&hidden_dir, 0o755);
    assert_eq!(code, Some(0), "{log}");
    let warns_about = |needle: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains(needle))
            .count()
    };
    assert_eq!(warns_about(locked_db.to_str().unwrap()), 1, "{log}");
    assert_eq!(warns_about(hidden_dir.to_str().unwrap()), 1, "{log}");
    assert!(log.to_lowercase().contains("permission denied"), "{log}");
    let out = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let o = out.path().join(format!("{i}.db"));
        f.restore(&format!("p/d/t{i}"), &o, None).await.unwrap();
        assert_eq!(count_rows(&o), 2);
    }
}

/// A database written since its last upload that the stop cannot read
/// (permission denied) leaves the replica behind: the stop exits 1 saying
/// so, not "cleanly" (black-box probe L29: exit 0, the replica a row
/// behind). As root the daemon runs as `nobody` via `setpriv`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_cannot_read_a_changed_database_is_an_error() {
    let mut f = Fleet::new(Backend::File).await;
    f.scan_interval = "100ms";
    let db = f.db_path("p", "d", "t0");
    drop(create_db(&db, 2));
    open_to_nobody(&f);
    let wrapper = as_nobody();
    let d = Daemon::start_with(&f, &["replicate"], wrapper);
    until("the first upload", async || {
        d.log().contains("uploaded snapshot")
    })
    .await;
    chmod(&db, 0o000);
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        insert_rows(&c, 1);
    }
    let scans = d.log().matches("scan complete").count();
    until("two scans after the write", async || {
        d.log().matches("scan complete").count() >= scans + 2
    })
    .await;
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    chmod(&db, 0o666);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("could not be read, snapshotted or uploaded at the stop"),
        "{log}"
    );
    assert!(!log.contains("shut down cleanly"), "{log}");
}

/// A second replicator on the same replica root is refused, naming the
/// holder; after the first shuts down (releasing the lease) it may run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_replicator_on_the_same_root_is_refused() {
    for backend in [Backend::File, Backend::S3] {
        let f = Fleet::new(backend).await;
        drop(create_db(&f.db_path("p", "d", "t0"), 1));
        let first = Daemon::start(&f, &["replicate"]);
        until("the first replicator's lease", async || {
            first.log().contains("replica lease acquired")
        })
        .await;
        let second = Daemon::start(&f, &["replicate", "--once"]);
        let (code, log) = second.wait().await;
        assert_eq!(code, Some(1), "{backend:?}: {log}");
        let pid = format!("pid {}", first.child.id());
        assert!(log.contains(&pid), "{backend:?}: holder not named: {log}");
        first.signal("-TERM");
        let (code, log) = first.wait().await;
        assert_eq!(code, Some(0), "{backend:?}: {log}");
        let again = Daemon::start(&f, &["replicate", "--once"]);
        let (code, log) = again.wait().await;
        assert_eq!(code, Some(0), "{backend:?}: {log}");
    }
}

/// The staging disk is full for one large database (a 256 KiB tmpfs in a
/// private mount namespace): its failure is logged once while the small
/// databases keep replicating. Needs root for the mount; skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_while_staging_is_logged_once_and_others_continue() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let mut f = Fleet::new(Backend::File).await;
    f.scan_interval = "100ms";
    f.max_concurrent = 1;
    for i in 0..3 {
        drop(create_db(&f.db_path("p", "d", &format!("t{i}")), 2));
    }
    let big = f.db_path("p", "d", "big");
    let c = create_db(&big, 0);
    // Above IN_MEMORY_MAX, so its copy is staged on the full disk (smaller
    // databases are copied in memory and stage nothing).
    let blob = litefleet::capture::snapshot::IN_MEMORY_MAX + 500_000;
    c.execute_batch(&format!(
        "CREATE TABLE b(x); INSERT INTO b VALUES (randomblob({blob}));"
    ))
    .unwrap();
    drop(c);
    let staging = f.work.path().join("tmp");
    std::fs::create_dir_all(&staging).unwrap();
    let script = "mount -t tmpfs -o size=256k tmpfs \"$0\" && exec \"$@\"";
    let wrapper = [
        "unshare",
        "-m",
        "sh",
        "-c",
        script,
        staging.to_str().unwrap(),
    ];
    let d = Daemon::start_with(&f, &["replicate"], &wrapper);
    until("five scans", async || {
        d.log().matches("scan complete").count() >= 5
    })
    .await;
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(big.to_str().unwrap()))
        .count();
    assert_eq!(warns, 1, "{log}");
    // SQLite's words when the backup copy fills it, the system's when the
    // compressed object does.
    assert!(
        log.contains("disk is full") || log.contains("No space left on device"),
        "{log}"
    );
    let out = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let o = out.path().join(format!("{i}.db"));
        f.restore(&format!("p/d/t{i}"), &o, None).await.unwrap();
        assert_eq!(count_rows(&o), 2);
    }
}

/// The restore output's disk is full (a 64 KiB tmpfs in a private mount
/// namespace): a local write error fails the restore, never taken for a
/// damaged snapshot, so the small older snapshot that would fit is not
/// restored in its place. Needs root for the mount; skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_at_the_restore_output_fails_without_falling_back() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let f = Fleet::new(Backend::File).await;
    let path = f.db_path("p", "d", "a");
    let c = create_db(&path, 2);
    let token = tokio_util::sync::CancellationToken::new();
    assert_eq!(f.replicator().cycle(&token).await.uploaded, 1);
    // The small snapshot becomes an hour older; the newest one is large.
    let small = f.objects().await.pop().unwrap();
    let name =
        litefleet::replica::cold::parse_snapshot_name(small.rsplit('/').next().unwrap()).unwrap();
    let older = format!(
        "{}/a-{}.db.lz4",
        small.rsplit_once('/').unwrap().0,
        (name.hour - chrono::Duration::hours(1)).format("%Y%m%d-%H%M%S")
    );
    let store = f.replica().store.clone();
    store
        .copy(&small.as_str().into(), &older.as_str().into())
        .await
        .unwrap();
    // Above IN_MEMORY_MAX, so its copy is staged on the full disk (smaller
    // databases are copied in memory and stage nothing).
    let blob = litefleet::capture::snapshot::IN_MEMORY_MAX + 500_000;
    c.execute_batch(&format!(
        "CREATE TABLE b(x); INSERT INTO b VALUES (randomblob({blob}));"
    ))
    .unwrap();
    drop(c);
    assert_eq!(f.replicator().cycle(&token).await.uploaded, 1);

    let out_dir = f.work.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let cfg = f.config_path();
    let script = "mount -t tmpfs -o size=64k tmpfs \"$0\" && exec \"$@\"";
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", script, out_dir.to_str().unwrap()])
        .arg(env!("CARGO_BIN_EXE_litefleet"))
        .args(["-c", cfg.to_str().unwrap(), "restore", "p/d/a", "-o"])
        .arg(out_dir.join("a.db"))
        .env_remove("LITEFLEET_CONFIG")
        .env("XDG_STATE_HOME", f.work.path().join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("damaged") && !err.contains("older"), "{err}");
}

/// A start that fails after taking the replica lease (here: the operations
/// port is in use) gives the lease back: the next start does not have to
/// wait for it to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_releases_the_lease() {
    let mut f = Fleet::new(Backend::File).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    f.top_yaml = format!("addr: {}\n", busy.local_addr().unwrap());
    drop(create_db(&f.db_path("p", "d", "t0"), 1));
    let (code, log) = Daemon::start(&f, &["replicate"]).wait().await;
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("replica lease acquired"), "{log}");
    drop(busy);
    f.top_yaml = String::new();
    let (code, log) = Daemon::start(&f, &["replicate", "--once"]).wait().await;
    assert_eq!(code, Some(0), "the lease was left behind: {log}");
}

/// A daemon whose patterns match nothing backs nothing up: `/healthz` says
/// so (503) once a scan has run, and the log warns once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_fleet_is_unhealthy() {
    let mut f = Fleet::new(Backend::File).await;
    let addr = free_port();
    f.top_yaml = format!("addr: {addr}\n");
    let d = Daemon::start(&f, &["replicate"]);
    until("a 503 from /healthz after the first scan", async || {
        matches!(http_get(addr, "/healthz").await, Some((503, body)) if body.contains("no SQLite database"))
    })
    .await;
    // The warning is logged by the cycle the scan started, which the 503
    // (set when the scan completes) may precede.
    until("the warning in the log", async || {
        d.log().contains("no SQLite database matched the patterns")
    })
    .await;
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A daemon on S3 with one database, healthy, then its store stalled until
/// its lease expires locally and `/healthz` says writes are paused; the
/// store still stalls (a 30 s delay) when this returns.
async fn daemon_with_its_lease_paused() -> (Fleet, SocketAddr, Daemon) {
    let mut f = Fleet::new(Backend::S3).await;
    let addr = free_port();
    // The shortest lease (`MIN_TTL`): its fence closes 1.5 s after the last
    // renewal. The first line belongs to the replica section.
    f.top_yaml = format!("    lease-ttl: 2s\naddr: {addr}\n");
    f.scan_interval = "500ms";
    drop(create_db(&f.db_path("p", "d", "t0"), 2));
    let d = Daemon::start(&f, &["replicate"]);
    until("a healthy daemon", async || {
        http_get(addr, "/healthz").await == Some((200, "ok\n".to_string()))
    })
    .await;
    f.s3().set_fault(Fault::Delay(Duration::from_secs(30)));
    until("a 503 naming the paused writes", async || {
        matches!(http_get(addr, "/healthz").await, Some((503, body))
            if body.contains("unhealthy: writes paused: the replica lease could not be renewed (expired locally at "))
    })
    .await;
    (f, addr, d)
}

/// A store that stalls past the lease's local expiry pauses every replica
/// write: `/healthz` says so (503, not "ok"), `/stats` and `/metrics` show
/// the pause, and all three are back once the store answers and the lease
/// is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lease_makes_the_daemon_unhealthy_until_renewed() {
    let (f, addr, d) = daemon_with_its_lease_paused().await;
    let ok = Some((200, "ok\n".to_string()));
    let (_, stats) = http_get(addr, "/stats").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        (&v["lease_writes_paused"], &v["healthy"]),
        (&true.into(), &false.into())
    );
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("litefleet_lease_writes_paused 1\n"),
        "{metrics}"
    );
    f.s3().set_fault(Fault::None);
    until("health back after a renewal", async || {
        http_get(addr, "/healthz").await == ok
    })
    .await;
    let (_, stats) = http_get(addr, "/stats").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["lease_writes_paused"], false);
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("writes resume"), "{log}");
}

/// A SIGTERM while the lease is paused (the store stalls) stops with exit 1
/// and says the uploads were abandoned: the replica is behind, and a stop
/// is "clean" only when it is not (black-box probe D26: exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_lease_is_paused_is_no_clean_stop() {
    let (f, _, d) = daemon_with_its_lease_paused().await;
    // Still down, but answering at once: the stop need not wait for it.
    f.s3().set_fault(Fault::Unavailable);
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("stopped with the replica behind: replica writes were refused by the lease"),
        "{log}"
    );
    assert!(!log.contains("shut down cleanly"), "{log}");
}

/// A replica that takes no data while its lease still renews (here a file
/// where the database's key directory must go): once every upload has
/// failed for 3 scan intervals `/healthz` is 503 and says so, and it is 200
/// again after the next upload that succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_all_fail_make_the_daemon_unhealthy() {
    let mut f = Fleet::new(Backend::File).await;
    f.scan_interval = "1s";
    let addr = free_port();
    f.top_yaml = format!("addr: {addr}\n");
    drop(create_db(&f.db_path("p", "d", "a"), 3));
    let blocker = f.work.path().join("replica/p");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let d = Daemon::start(&f, &["replicate"]);
    until("a 503 saying every upload failed", async || {
        matches!(http_get(addr, "/healthz").await,
            Some((503, body)) if body.starts_with("unhealthy: every upload has failed since "))
    })
    .await;
    let (_, stats) = http_get(addr, "/stats").await.unwrap();
    assert!(stats.contains("\"healthy\":false"), "{stats}");
    std::fs::remove_file(&blocker).unwrap();
    until("200 after an upload succeeded", async || {
        matches!(http_get(addr, "/healthz").await, Some((200, _)))
    })
    .await;
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A staging directory that cannot take a snapshot's copy (here a file where
/// the replicator's staging directory must be; a full disk in practice): the
/// failure is this host's staging disk's, named so, and with nothing backed
/// up `/healthz` turns 503 as for a store that takes nothing (probe J20: a
/// full temp-dir was logged as "the database, not the store", counted in
/// `snapshots_failed`, and `/healthz` stayed 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_dir_that_cannot_stage_makes_the_daemon_unhealthy() {
    let mut f = Fleet::new(Backend::File).await;
    f.scan_interval = "1s";
    f.extra_yaml = "  max-hot-databases: 0\n".into();
    let addr = free_port();
    f.top_yaml = format!("addr: {addr}\n");
    let d = Daemon::start(&f, &["replicate"]);
    until("the daemon's endpoint", async || {
        http_get(addr, "/healthz").await.is_some()
    })
    .await;
    let tmp = f.work.path().join("tmp");
    let staging: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(staging.len(), 1, "{staging:?}");
    std::fs::remove_dir_all(&staging[0]).unwrap();
    std::fs::write(&staging[0], b"in the way").unwrap();
    // Over 1 MiB: staged in a file, not compressed in memory.
    let c = create_db(&f.db_path("p", "d", "big"), 0);
    c.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500)
         INSERT INTO t(v) SELECT hex(randomblob(1000)) FROM n;",
    )
    .unwrap();
    drop(c);
    until("a 503 saying every upload failed", async || {
        matches!(http_get(addr, "/healthz").await,
            Some((503, body)) if body.contains("every upload has failed since "))
    })
    .await;
    let (_, stats) = http_get(addr, "/stats").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["snapshots_failed"], 0, "{stats}");
    assert!(
        d.log()
            .contains("snapshot failed staging its copy (multi-db.temp-dir"),
        "{}",
        d.log()
    );
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A database its application keeps locked fails its snapshot every
/// cycle, in a fleet where nothing else changes: that is the source's
/// failure, not the store's, and `/healthz` stays 200 (probe D: the
/// "every upload has failed" rule turned it 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_is_not_a_store_failure() {
    let mut f = Fleet::new(Backend::File).await;
    f.scan_interval = "3s";
    let addr = free_port();
    f.top_yaml = format!("addr: {addr}\n");
    drop(create_db(&f.db_path("p", "d", "idle"), 3));
    let locked = create_db(&f.db_path("p", "d", "locked"), 1);
    locked
        .execute_batch(
            "PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE; INSERT INTO t(v) VALUES ('x');",
        )
        .unwrap();
    let d = Daemon::start(&f, &["replicate"]);
    let failed = |stats: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(stats).unwrap();
        v["snapshots_failed"].as_u64().unwrap()
    };
    // Five failed cycles of about 5 s each (its busy wait): past the 3 scan
    // intervals of the rule after the last success (the idle database's
    // second upload, its first one being racy).
    until(
        "five failed snapshots of the locked database",
        async || matches!(http_get(addr, "/stats").await, Some((200, s)) if failed(&s) >= 5),
    )
    .await;
    let (code, body) = http_get(addr, "/healthz").await.unwrap();
    let stats = http_get(addr, "/stats").await.unwrap().1;
    assert_eq!(code, 200, "{body} {stats} {}", d.log());
    // Counted as a failed snapshot, not a failed upload (probe O: it grew
    // `litefleet_uploads_total{result="failed"}`), and logged so.
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(v["uploads_failed"], 0, "{stats}");
    assert!(
        d.log()
            .contains("snapshot failed (the database, not the store)"),
        "{}",
        d.log()
    );
    drop(locked);
    d.signal("-TERM");
    let (code, log) = d.wait().await;
    assert_eq!(code, Some(0), "{log}");
}
