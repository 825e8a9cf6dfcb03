//! The binary: config errors, demo + replicate + restore end to end, graceful shutdown.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{count_rows, create_db, Backend, Fleet};
use common::{chmod, litefleet, litefleet_command, stderr, walk_files};

/// Writes `dir/litefleet.yml`: the patterns `./data/*/*.db` (key
/// `{{a}}/{{b}}`) replicated to the `file://` directory `replica`.
/// `litefleet --config cfg replicate` running, its log (at info) piped.
fn spawn_replicate(cfg: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_litefleet"))
        .args(["--config", cfg.to_str().unwrap(), "replicate"])
        .env("LITEFLEET_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends `sig` (`-TERM`, `-HUP`) to `child`.
fn signal(child: &std::process::Child, sig: &str) {
    let sent = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn write_file_config(dir: &Path, replica: &Path) {
    let yaml = format!(
        "multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n    url: file://{}\n    path: \"{{{{a}}}}/{{{{b}}}}\"\n",
        replica.display()
    );
    std::fs::write(dir.join("litefleet.yml"), yaml).unwrap();
}

/// In `dir`: the config of [`write_file_config`] with the replica at
/// `dir/replica`, one database `data/x/app.db` (key `x/app`) of `rows` rows,
/// and a `replicate --once` that backed it up.
fn one_database_backed_up(dir: &Path, rows: usize) {
    write_file_config(dir, &dir.join("replica"));
    drop(create_db(&dir.join("data/x/app.db"), rows));
    let o = litefleet(dir, &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn bad_configs_are_clear_errors_not_panics() {
    let t = tempfile::tempdir().unwrap();
    let good = "multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n    url: s3://bucket/x\n    path: \"{{a}}/{{b}}\"\n";
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown key",
            good.replace("path:", "pth:"),
            "unknown field `pth`",
        ),
        (
            "bad duration",
            good.replace("  replica:", "  scan-interval: soon\n  replica:"),
            "multi-db.scan-interval",
        ),
        (
            "a scan loop that only spins",
            good.replace("  replica:", "  scan-interval: 1ns\n  replica:"),
            "multi-db.scan-interval: must be at least 10ms",
        ),
        (
            "drills off by a zero interval",
            good.replace("  replica:", "  verify-interval: 0s\n  replica:"),
            "multi-db.verify-interval: must be at least 10ms: a loop run more often only keeps a core busy (leave it unset to run no drills)",
        ),
        (
            "zero request timeout",
            good.replace("    path:", "    timeout: 0s\n    path:"),
            "multi-db.replica.timeout: must be greater than zero",
        ),
        (
            "snapshot-interval under sync-interval",
            good.replace("  replica:", "  snapshot-interval: 1ms\n  replica:"),
            "multi-db.snapshot-interval: 1ms is shorter than multi-db.sync-interval (1s)",
        ),
        (
            "unbound variable",
            good.replace("{{b}}", "{{b}}/{{c}}"),
            "{{c}}",
        ),
        (
            "missing bucket",
            good.replace("s3://bucket/x", "s3://"),
            "no bucket",
        ),
        (
            "unset env var",
            good.replace("s3://bucket/x", "s3://${LITEFLEET_TEST_UNSET}/x"),
            "LITEFLEET_TEST_UNSET",
        ),
        ("not yaml", "multi-db: [\n".to_string(), "litefleet.yml"),
        (
            "s3 url with one slash",
            good.replace("s3://bucket/x", "s3:/bucket/x"),
            "multi-db.replica.url: \"s3:/bucket/x\" looks like an s3:// URL with one slash",
        ),
        (
            "rfc 8089 file url without a path",
            good.replace("s3://bucket/x", "file:rel"),
            "multi-db.replica.url: \"file:rel\"",
        ),
        (
            "file url with a host",
            good.replace("s3://bucket/x", "file://somehost/tmp/x"),
            "multi-db.replica.url: \"file://somehost/tmp/x\" names the host \"somehost\"",
        ),
        (
            "unknown scheme, one slash",
            good.replace("s3://bucket/x", "gopher:/x"),
            "multi-db.replica.url: \"gopher:/x\": unsupported scheme \"gopher\"",
        ),
    ];
    for (what, yaml, needle) in cases {
        std::fs::write(t.path().join("litefleet.yml"), yaml).unwrap();
        let o = litefleet(t.path(), &["replicate", "--once"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(needle), "{what}: expected {needle:?} in {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            !err.contains("pth: multi-db"),
            "{what}: key path said twice: {err}"
        );
    }
    // None of them became a directory beside the config.
    let names: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["litefleet.yml"], "{names:?}");
    let o = litefleet(t.path(), &["--config", "missing.yml", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.yml"), "{}", stderr(&o));
}

/// A benchmark of no databases, or of no rounds, is a usage error naming
/// the option (black-box probe U31: `bench scan --databases 0` failed with
/// "No such file or directory").
#[test]
fn bench_counts_of_zero_are_usage_errors() {
    let t = tempfile::tempdir().unwrap();
    for args in [
        ["bench", "scan", "--databases", "0"],
        ["bench", "snapshot", "--databases", "0"],
        ["bench", "snapshot", "--repeat", "0"],
        ["bench", "scan", "--iterations", "0"],
    ] {
        let o = litefleet(t.path(), &args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(&format!("'0' for '{}", args[2])), "{e}");
        assert!(e.contains("must be at least 1"), "{e}");
    }
}

/// An invalid log filter, in `--log-level` or `LITEFLEET_LOG`, is a usage
/// error (exit 2, like any bad flag) naming where it came from and the
/// value; valid levels and tracing filters get past it to the config.
#[test]
fn bad_log_filters_are_usage_errors() {
    let t = tempfile::tempdir().unwrap();
    let run = |level: Option<&str>, env: Option<&str>| {
        let mut cmd = litefleet_command(t.path(), &["--config", "missing.yml", "list"]);
        cmd.env_remove("LITEFLEET_LOG");
        if let Some(l) = level {
            cmd.args(["--log-level", l]);
        }
        if let Some(e) = env {
            cmd.env("LITEFLEET_LOG", e);
        }
        cmd.output().unwrap()
    };
    for (level, env, needles) in [
        (
            Some("blah[[["),
            None,
            &["--log-level", "'blah[[['", "not a log filter"],
        ),
        (
            None,
            Some("====="),
            &["LITEFLEET_LOG", "\"=====\"", "not a log filter"],
        ),
        (
            Some("debug"),
            Some("litefleet=nope"),
            &["LITEFLEET_LOG", "\"litefleet=nope\"", "not a log filter"],
        ),
        // A bare word that is no level named a target that matches
        // nothing: every line, errors included, was dropped (black-box
        // probe U31, F8).
        (
            Some("inof"),
            None,
            &["--log-level", "\"inof\"", "is no level"],
        ),
        (
            None,
            Some("warnn,litefleet=debug"),
            &["LITEFLEET_LOG", "\"warnn\"", "is no level"],
        ),
        (Some(""), None, &["--log-level", "empty", "use error"]),
    ] {
        let o = run(level, env);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{level:?} {env:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{level:?} {env:?}: {n:?} not in {err}");
        }
    }
    for (level, env) in [
        (Some("warn"), None),
        (Some("trace"), None),
        (Some("litefleet=debug,info"), None),
        (None, Some("error")),
        (None, Some("litefleet=debug,info")),
        (Some("WARN"), None),
        // Set but empty: the default, as an empty `${VAR}` is no value.
        (None, Some("")),
    ] {
        let o = run(level, env);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{level:?} {env:?}: {err}");
        assert!(err.contains("missing.yml"), "{level:?} {env:?}: {err}");
    }
}

/// `--timestamp` without a time zone offset names what is missing
/// (usage error, exit 2); other malformed times keep the parser's reason.
#[test]
fn timestamps_without_an_offset_say_so() {
    let t = tempfile::tempdir().unwrap();
    for (ts, needle) in [
        ("2026-12-05 13:09:43", "has no time zone offset: add Z"),
        ("2026-12-05T13:09:43", "has no time zone offset: add Z"),
        ("2026-12-05T25:09:43Z", "is not an RFC 3339 timestamp"),
        ("yesterday", "is not an RFC 3339 timestamp"),
    ] {
        let o = litefleet_command(
            t.path(),
            &[
                "--config",
                "missing.yml",
                "restore",
                "k",
                "-o",
                "x.db",
                "--timestamp",
                ts,
            ],
        )
        .output()
        .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{ts}: {err}");
        assert!(err.contains(needle), "{ts}: {needle:?} not in {err}");
    }
}

/// A `file://` replica directory that cannot be created is a config error
/// naming the key as written, the URL and the path in the way, not a bare
/// `File exists` about some parent.
#[test]
fn replica_directory_that_cannot_be_created_names_the_key() {
    let t = tempfile::tempdir().unwrap();
    drop(create_db(&t.path().join("data/x/app.db"), 1));
    let native = "multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n    url: file://./litefleet.yml/replica\n    path: \"{{a}}/{{b}}\"\n";
    let litestream = "dbs:\n  - path: ./data/x/app.db\n    replica:\n      url: file://./litefleet.yml/replica/app\n";
    for (yaml, key) in [
        (native, "multi-db.replica.url"),
        (litestream, "dbs[0].replica.url"),
    ] {
        std::fs::write(t.path().join("litefleet.yml"), yaml).unwrap();
        let o = litefleet(t.path(), &["replicate", "--once"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let cfg = t.path().join("litefleet.yml");
        let want = format!(
            "{key}: file://{}/replica: cannot create the replica directory: {}: Not a directory",
            cfg.display(),
            cfg.display()
        );
        assert!(err.contains(&want), "expected {want:?} in {err}");
    }
}

/// A start after a run that did not stop cleanly (its replica lease left
/// unreleased: it was killed) removes the staged objects (`<object>#<n>`)
/// such a run can leave in a `file://` replica; a start after a clean stop
/// does not look for them, which was a walk of the whole replica at every
/// start, each `replicate --once` included.
#[test]
fn staged_objects_are_looked_for_after_a_run_that_did_not_stop_cleanly() {
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 3);
    let replica = t.path().join("replica");
    let staged = replica.join("x/app.planted#7");
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let age = |p: &Path| {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(hour_ago).unwrap();
    };
    std::fs::write(&staged, b"half an object").unwrap();
    age(&staged);
    // After the clean stop of the run above.
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(staged.exists(), "looked for after a clean stop");
    // The lease as a killed run leaves it: unreleased, expired.
    let lease = replica.join(".litefleet/lease.json");
    let mut held: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&lease).unwrap()).unwrap();
    held.as_object_mut().unwrap().remove("released");
    held["expires"] = "2026-01-01T00:00:00Z".into();
    std::fs::write(&lease, serde_json::to_vec(&held).unwrap()).unwrap();
    age(&lease);
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!staged.exists(), "left after a killed run");
}

/// A config whose patterns match no database backs up nothing: `--once`
/// (what cron runs) says so and exits 1 instead of reporting success.
#[test]
fn once_with_no_matching_database_fails() {
    let t = tempfile::tempdir().unwrap();
    write_file_config(t.path(), &t.path().join("replica"));
    std::fs::create_dir_all(t.path().join("data/x")).unwrap();
    std::fs::write(t.path().join("data/x/notes.db"), b"not sqlite").unwrap();
    let o = litefleet(t.path(), &["replicate", "--once"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no SQLite database matched the patterns"),
        "{err}"
    );
    assert!(err.contains("./data/*/*.db"), "{err}");
    // Once a database exists, the same config succeeds.
    drop(create_db(&t.path().join("data/x/app.db"), 1));
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn secrets_never_reach_the_output() {
    let t = tempfile::tempdir().unwrap();
    // Nothing listens on this port: every request fails, and errors are logged.
    let yaml = "multi-db:\n  patterns: [\"./data/*.db\"]\n  replica:\n    url: s3://bucket/x\n    endpoint: http://127.0.0.1:9\n    access-key-id: AKIDLEAKCHECK\n    secret-access-key: SECRETLEAKCHECK\n    retries: 0\n    timeout: 2s\n";
    std::fs::write(t.path().join("litefleet.yml"), yaml).unwrap();
    drop(create_db(&t.path().join("data/x.db"), 1));
    let o = litefleet(t.path(), &["--log-level", "debug", "replicate", "--once"]);
    let all = format!("{}{}", stderr(&o), String::from_utf8_lossy(&o.stdout));
    assert_eq!(o.status.code(), Some(1), "{all}");
    // The first request (the replica lease) fails, and the error says where.
    assert!(all.contains("lease.json"), "{all}");
    assert!(all.contains("127.0.0.1:9"), "{all}");
    assert!(!all.contains("SECRETLEAKCHECK"), "{all}");
}

#[test]
fn demo_config_replicates_and_restores() {
    let t = tempfile::tempdir().unwrap();
    // The config's relative paths resolve against its directory: placed in
    // `examples/` under the demo's directory, as in the repository.
    std::fs::create_dir(t.path().join("examples")).unwrap();
    let cfg = t.path().join("examples/litefleet.yml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/litefleet.yml"),
        &cfg,
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let o = litefleet(t.path(), &["demo", "--databases", "30"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let hour = || chrono::Utc::now().format("%Y-%m-%dT%H:").to_string();
    let before = hour();
    let o = litefleet(t.path(), &["--config", cfg, "replicate", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("uploaded=30"), "{}", stderr(&o));
    let o = litefleet(t.path(), &["--config", cfg, "list"]);
    assert!(o.status.success());
    let listing = String::from_utf8_lossy(&o.stdout);
    assert_eq!(listing.lines().count(), 30);
    // The upload time, not the next-hour object name, is what "newest" says.
    let line = listing.lines().next().unwrap();
    assert!(
        [before, hour()]
            .iter()
            .any(|h| line.contains(&format!("newest uploaded {h}"))),
        "{line}"
    );
    let o = litefleet(
        t.path(),
        &[
            "--config",
            cfg,
            "restore",
            "project0/db0/main/tenant00007",
            "-o",
            "out/t7.db",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let restored = rusqlite::Connection::open(t.path().join("out/t7.db")).unwrap();
    let rows: i64 = restored
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, litefleet::cli::demo::ROWS as i64);
    let o = litefleet(
        t.path(),
        &[
            "--config",
            cfg,
            "snapshots",
            "project0/db0/main/tenant00007",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("cold  project0/db0/main/tenant00007/tenant00007-"),
        "{out}"
    );
    let o = litefleet(
        t.path(),
        &[
            "--config",
            cfg,
            "generations",
            "project0/db0/main/tenant00007",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("0 generation(s)"), "{}", stderr(&o));
    // The object is an LZ4 skippable frame (the snapshot's times, which LZ4
    // decoders skip) and an LZ4 frame of a SQLite database.
    let obj = std::fs::read_dir(t.path().join("demo-replica/project0/db0/main/tenant00007"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(&obj).unwrap();
    let name = obj.file_name().unwrap().to_str().unwrap();
    let hour = litefleet::replica::cold::parse_snapshot_name(name)
        .unwrap()
        .hour;
    let times = litefleet::replica::cold::SnapshotTimes::decode(&bytes, hour)
        .expect("a sound record")
        .expect("a times record");
    assert!(times.started <= times.taken);
    let record = litefleet::replica::cold::RECORD_LEN;
    assert_eq!(
        bytes[..4],
        0x184D_2A5Au32.to_le_bytes(),
        "a skippable frame magic"
    );
    assert_eq!(
        u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize,
        record - 8
    );
    let mut dec = lz4_flex::frame::FrameDecoder::new(&bytes[record..]);
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut dec, &mut head).unwrap();
    assert_eq!(&head, litefleet::source::vfs::SQLITE_HEADER);
    // The README's `lz4 -d`, where the lz4 tool is installed.
    if let Ok(o) = std::process::Command::new("lz4")
        .args(["-d", "-c"])
        .arg(&obj)
        .output()
    {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(&o.stdout[..16], litefleet::source::vfs::SQLITE_HEADER);
    }
}

/// SIGTERM while the store does not answer: the stop ends after
/// `shutdown-timeout` with exit 1 and a line saying why, not after every
/// request's timeouts and retries (black-box probe: 424 s with the
/// defaults, past systemd's stop timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_against_a_hung_store_ends_at_its_timeout() {
    let mut f = Fleet::with_yaml(Backend::S3, "  shutdown-timeout: 2s\n").await;
    f.timeout = "3600s";
    for i in 0..4 {
        drop(create_db(&f.db_path("p", "d", &format!("t{i}")), 5));
    }
    let cfg = f.config_path();
    let mut child = spawn_replicate(&cfg);
    // The lease is taken and the start checked (GET, a GET of the replica's
    // identity, conditional PUT, two refused conditional PUTs and one
    // applied, a HEAD for an enclosing replica root): from now on the store
    // holds every request for an hour.
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.s3().request_count() < 7 {
        assert!(Instant::now() < deadline, "no lease taken");
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.s3()
        .set_fault(common::s3::Fault::Delay(Duration::from_secs(3600)));
    let held = f.s3().request_count() + 1;
    while f.s3().request_count() < held {
        assert!(Instant::now() < deadline, "no request held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let signalled = Instant::now();
    signal(&child, "-TERM");
    let (status, err) = tokio::task::spawn_blocking(move || {
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("multi-db.shutdown-timeout"), "{err}");
    assert!(
        took < Duration::from_secs(20),
        "the stop took {took:?}: {err}"
    );
    f.s3().set_fault(common::s3::Fault::None);
}

/// SIGTERM while the lease is still being taken from a store that does not
/// answer: the start stops at once, exit 0, nothing replicated (black-box
/// probe: the stop waited for the slow lease GET and PUT, 62 s, and only
/// then started its shutdown timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_lease_is_taken_is_prompt() {
    let mut f = Fleet::with_yaml(Backend::S3, "").await;
    f.timeout = "3600s";
    drop(create_db(&f.db_path("p", "d", "t0"), 5));
    let cfg = f.config_path();
    f.s3()
        .set_fault(common::s3::Fault::Delay(Duration::from_secs(3600)));
    let child = spawn_replicate(&cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.s3().request_count() < 1 {
        assert!(Instant::now() < deadline, "the lease was never asked for");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut child = child;
    signal(&child, "-TERM");
    // Bounded: the code before this fix waited for the held request.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("still running 10 s after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("stopped while taking the replica lease"),
        "{err}"
    );
    f.s3().set_fault(common::s3::Fault::None);
}

/// SIGHUP stops the daemon like SIGTERM: exit 0 and the lease given back,
/// so the next start is not refused (black-box probe: its default action
/// killed the daemon like a crash, and restarts were refused for the
/// lease's lifetime).
#[test]
fn sighup_stops_gracefully() {
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 1);
    let mut child = spawn_replicate(&t.path().join("litefleet.yml"));
    // Wait for its first cycle (the lease is held by then).
    let mut err = child.stderr.take().unwrap();
    let mut log = String::new();
    let mut buf = [0u8; 4096];
    while !log.contains("cycle complete") {
        let n = std::io::Read::read(&mut err, &mut buf).unwrap();
        assert!(n > 0, "exited early: {log}");
        log.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    signal(&child, "-HUP");
    std::io::Read::read_to_string(&mut err, &mut log).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{log}");
    assert!(log.contains("shutdown requested"), "{log}");
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// SIGTERM while uploads are in flight: they finish, the process exits 0, and
/// every object in the replica restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_uploads() {
    let f = Fleet::with_yaml(Backend::S3, "").await;
    for i in 0..12 {
        drop(create_db(&f.db_path("p", "d", &format!("t{i}")), 5));
    }
    // Every request takes 300 ms, so uploads are surely in flight when we signal.
    f.s3()
        .set_fault(common::s3::Fault::Delay(Duration::from_millis(300)));
    let cfg = f.config_path();
    let mut child = spawn_replicate(&cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Seven requests take the replica lease and check the start (GET, a GET
    // of the replica's identity telling a new replica from a lease deleted
    // by hand, conditional PUT, two refused conditional PUTs and one
    // applied, a HEAD for an enclosing replica root), one lists the fleet
    // log (what an earlier run left), two read and write the replica's
    // identity; an eleventh is an upload.
    while f.s3().request_count() < 11 {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("litefleet exited early ({status}): {err}");
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no upload started: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(0), "{}", status.1);
    assert!(status.1.contains("shut down cleanly"), "{}", status.1);
    f.s3().set_fault(common::s3::Fault::None);
    let listed = litefleet::restore::list(&f.replica(), None).await.unwrap();
    assert!(
        !listed.is_empty(),
        "in-flight uploads must complete: {}",
        status.1
    );
    let out = tempfile::tempdir().unwrap();
    for key in listed.keys() {
        let o = out.path().join(key.replace('/', "_"));
        f.restore(key, &o, None).await.unwrap();
        assert_eq!(count_rows(&o), 5);
    }
}

/// Reading commands never create a replica, and say when there is nothing:
/// `list` of a `file://` directory that does not exist fails instead of
/// creating it; `snapshots` and `generations` of a key without backups
/// exit 1.
#[test]
fn reading_commands_report_missing_replicas_and_keys() {
    let t = tempfile::tempdir().unwrap();
    let replica = t.path().join("replica-typo");
    write_file_config(t.path(), &replica);
    let o = litefleet(t.path(), &["list"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no such directory"), "{}", stderr(&o));
    assert!(!replica.exists(), "list created the replica directory");
    // Nor restore, single or bulk, even with --if-replica-exists (a boot
    // script with a mistyped path must not start on an empty database;
    // black-box probe: exit 0, nothing restored, the directory created).
    for args in [
        &["restore", "x/app", "-o", "out.db", "--if-replica-exists"][..],
        &[
            "restore",
            "--prefix",
            "x",
            "-o",
            "outdir",
            "--if-replica-exists",
        ][..],
    ] {
        let o = litefleet(t.path(), args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("no such directory"), "{}", stderr(&o));
        assert!(!replica.exists(), "{args:?} created the replica directory");
    }

    drop(create_db(&t.path().join("data/x/app.db"), 1));
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for cmd in ["snapshots", "generations"] {
        let o = litefleet(t.path(), &[cmd, "x/app"]);
        assert_eq!(o.status.code(), Some(0), "{cmd}: {}", stderr(&o));
        let o = litefleet(t.path(), &[cmd, "x/nope"]);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {}", stderr(&o));
        assert!(stderr(&o).contains("x/nope"), "{cmd}: {}", stderr(&o));
    }
}

/// Output into a pipe its reader closed (`litefleet snapshots KEY | head
/// -1`) ends the command quietly, as Unix tools do, not with a panic and
/// exit 101 (probe E).
#[test]
fn output_into_a_closed_pipe_is_no_panic() {
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 1);
    for args in [
        &["snapshots", "x/app"][..],
        &["generations", "x/app"],
        &["list"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = Command::new(env!("CARGO_BIN_EXE_litefleet"))
            .args(args)
            .current_dir(t.path())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(o.status.code(), Some(101), "{args:?}: {err}");
    }
}

/// A bulk restore into a path that is a file says so (probe: it printed
/// "File exists (os error 17)"), and leaves the file alone.
#[test]
fn a_bulk_restore_into_a_file_says_it_is_not_a_directory() {
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 1);
    let file = t.path().join("existing");
    std::fs::write(&file, b"mine").unwrap();
    let o = litefleet(t.path(), &["restore", "--prefix", "", "-o", "existing"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("existing: exists and is not a directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
}

/// A restored database gets the mode SQLite would give a new database
/// (0666 minus the umask), not the temporary file's 0600.
#[test]
fn restored_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 3);
    let out = t.path().join("restored.db");
    let o = litefleet(t.path(), &["restore", "x/app", "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
        .unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask, "mode {mode:o}, umask {umask:o}");
    assert_eq!(count_rows(&out), 3);
}

/// A restore target is a key unless it is written as a path or names a
/// database file here that a pattern matches: a directory or an unrelated
/// file named like the key in the current directory does not turn the key
/// into a path ("is not matched by any pattern").
#[test]
fn a_key_is_not_taken_for_a_file_of_the_same_name() {
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 3);
    let restore = |target: &str, out: &str| {
        let out = t.path().join(out);
        let o = litefleet(t.path(), &["restore", target, "-o", out.to_str().unwrap()]);
        (o, out)
    };
    // A directory named like the key.
    std::fs::create_dir_all(t.path().join("x/app")).unwrap();
    let (o, out) = restore("x/app", "r1.db");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(count_rows(&out), 3);
    // A file named like the key that no pattern matches.
    std::fs::remove_dir(t.path().join("x/app")).unwrap();
    std::fs::write(t.path().join("x/app"), b"notes").unwrap();
    let (o, out) = restore("x/app", "r2.db");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(count_rows(&out), 3);
    // A matched database file, relative: its key.
    let (o, out) = restore("data/x/app.db", "r3.db");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(count_rows(&out), 3);
    // Written as a path and matched by nothing: an error naming it.
    let (o, out) = restore("./x/app", "r4.db");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is not matched by any pattern"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// A staging or state directory that cannot be used is a clear error at
/// start, naming the config key and the path, not a failure at the first
/// upload.
#[test]
fn unusable_temp_and_state_dirs_fail_at_start() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("a-file"), b"x").unwrap();
    drop(create_db(&t.path().join("data/x/app.db"), 1));
    for (key, line) in [
        ("multi-db.temp-dir", "  temp-dir: ./a-file/tmp\n"),
        ("multi-db.state-dir", "  state-dir: ./a-file/state\n"),
    ] {
        let yaml = format!(
            "multi-db:\n  patterns: [\"./data/*/*.db\"]\n{line}  replica:\n    url: file://{}\n    path: \"{{{{a}}}}/{{{{b}}}}\"\n",
            t.path().join("replica").display()
        );
        std::fs::write(t.path().join("litefleet.yml"), yaml).unwrap();
        let o = litefleet(t.path(), &["replicate", "--once"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{key}: {err}");
        assert!(err.contains(key) && err.contains("a-file"), "{key}: {err}");
    }
}

/// `cmd` run as `nobody` when the tests run as root, whom file modes and
/// process limits do not bind.
fn as_nobody_if_root(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
    cmd
}

/// A command whose runtime cannot get its threads (a process limit of one
/// task: `prlimit --nproc=1`, as `nobody` when the tests run as root, whom the
/// limit does not bind) exits 1 at once saying why, where tokio's panic
/// exited 101 or hung for ever (black-box probe L29). So does one whose
/// runtime got its workers but no thread for a blocking task (a limit just
/// above the main thread and one worker per core), which panicked with
/// exit 101 (black-box probe Y32). The limit counts every thread of the
/// user: that part runs as root only, as a user id no other process has.
#[test]
fn a_runtime_without_threads_is_an_error_not_a_hang() {
    use std::os::unix::process::CommandExt;
    let t = tempfile::tempdir().unwrap();
    write_file_config(t.path(), &t.path().join("replica"));
    drop(create_db(&t.path().join("data/x/app.db"), 1));
    chmod(t.path(), 0o777);
    for sub in ["data", "data/x"] {
        chmod(&t.path().join(sub), 0o777);
    }
    chmod(&t.path().join("litefleet.yml"), 0o644);
    let bin = env!("CARGO_BIN_EXE_litefleet");
    let run = |nproc: usize, args: &[&str], uid: Option<u32>| {
        let mut cmd = std::process::Command::new("timeout");
        let limit = format!("--nproc={nproc}");
        cmd.args(["-s", "KILL", "60", "prlimit", &limit, "--", bin])
            .args(args)
            .env("XDG_STATE_HOME", t.path().join("state"))
            .current_dir(t.path());
        match uid {
            Some(u) => cmd.uid(u).gid(u),
            None => as_nobody_if_root(&mut cmd),
        };
        let o = cmd.output().unwrap();
        (o.status.code(), stderr(&o))
    };
    let (code, err) = run(1, &["list"], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot start the runtime"), "{err}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    // No process runs as this user: the limit counts this run's alone,
    // `timeout`'s process, and litefleet's main thread and workers.
    const LONE_UID: u32 = 64_999;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (code, err) = run(2 + workers, &["replicate", "--once"], Some(LONE_UID));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot start a thread"), "{err}");
    assert!(
        err.contains("ulimit -u") && !err.contains("panicked"),
        "{err}"
    );
}

/// A database the scan cannot read was not backed up: `--once` counts it
/// and exits 1, so a cron job can tell that not everything was saved. As
/// root (CI) the run drops to `nobody`, for whom mode 000 really is
/// unreadable.
#[test]
fn once_with_unreadable_databases_fails() {
    let t = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let db = t.path().join(format!("data/x/db{i}.db"));
        drop(create_db(&db, 1));
        chmod(&db, if i == 0 { 0o666 } else { 0o000 });
    }
    for d in ["", "data", "data/x"] {
        chmod(&t.path().join(d), 0o777);
    }
    write_file_config(t.path(), &t.path().join("replica"));
    let mut cmd = litefleet_command(t.path(), &["replicate", "--once"]);
    let o = as_nobody_if_root(&mut cmd).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("2 path(s) could not be read"), "{err}");
    assert!(err.contains("db1.db") && err.contains("db2.db"), "{err}");
    // The readable one was still backed up.
    let backed_up: Vec<_> = walk_files(&t.path().join("replica"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("db0"))
        .collect();
    assert_eq!(backed_up.len(), 1, "{backed_up:?}\n{err}");
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs `litefleet list` against an S3 config with an empty environment
/// (no AWS_* variables from the machine), plus `env`.
fn list_s3(yaml_replica: &str, env: &[(&str, String)]) -> (Option<i32>, String) {
    let t = tempfile::tempdir().unwrap();
    let yaml = format!("multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n{yaml_replica}");
    std::fs::write(t.path().join("litefleet.yml"), yaml).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_litefleet"))
        .current_dir(t.path())
        .arg("list")
        .env_clear()
        .env("XDG_STATE_HOME", t.path().join("state"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (o.status.code(), stderr(&o))
}

/// No credentials anywhere: the error says so and where they are looked
/// for, instead of a failed request to an address the user never named.
/// (The metadata service is pointed at a closed local port: tests never
/// send traffic off 127.0.0.1.)
#[test]
fn missing_s3_credentials_are_named() {
    let replica = format!(
        "    url: s3://bucket/x\n    endpoint: http://127.0.0.1:{}\n    retries: 0\n",
        closed_port()
    );
    let metadata = format!("http://127.0.0.1:{}", closed_port());
    let (code, err) = list_s3(&replica, &[("AWS_METADATA_ENDPOINT", metadata)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no S3 credentials found"), "{err}");
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    assert!(err.contains("access-key-id"), "{err}");
}

/// Credentials, a token or a region from the environment holding a control
/// character, and an endpoint variable written `http:host`, are errors naming
/// the variable (never its value), exit 1: each panicked the S3 client at its
/// first request, exit 101 (black-box probe U31, F1 and F2).
#[test]
fn odd_s3_variables_are_named_not_a_panic() {
    let port = closed_port();
    let with_endpoint =
        format!("    url: s3://bucket/x\n    endpoint: http://127.0.0.1:{port}\n    retries: 0\n");
    let without = "    url: s3://bucket/x\n    retries: 0\n".to_string();
    let key = ("AWS_SECRET_ACCESS_KEY", "Pa55word".to_string());
    for (replica, name, value) in [
        (&with_endpoint, "AWS_ACCESS_KEY_ID", "AKIA\nPa55"),
        (&with_endpoint, "AWS_SESSION_TOKEN", "tok\nPa55"),
        (&with_endpoint, "AWS_REGION", "us\neast-1"),
        (&with_endpoint, "AWS_ACCESS_KEY_ID", "AKIA\u{7f}"),
        (&without, "AWS_ENDPOINT", "http:127.0.0.1:9"),
    ] {
        let mut env = vec![(name, value.to_string()), key.clone()];
        if name != "AWS_ACCESS_KEY_ID" {
            env.push(("AWS_ACCESS_KEY_ID", "AKIDTEST".into()));
        }
        let (code, err) = list_s3(replica, &env);
        assert_eq!(code, Some(1), "{name}={value:?}: {err}");
        assert!(err.contains(name), "{name}: {err}");
        assert!(!err.contains("Pa55") && !err.contains("panicked"), "{err}");
    }
}

/// An endpoint where nothing listens: "connection refused" and the endpoint.
#[test]
fn refused_endpoint_is_named() {
    let port = closed_port();
    let replica = format!(
        "    url: s3://bucket/x\n    endpoint: http://127.0.0.1:{port}\n    retries: 0\n    access-key-id: AKIDTEST\n    secret-access-key: not-shown-anywhere\n"
    );
    let (code, err) = list_s3(&replica, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("not-shown-anywhere"), "{err}");
}

/// A database whose name holds a line break and a terminal control sequence
/// is logged inside its own line, escaped: a file name cannot forge or hide
/// a log line (text format; JSON escapes its strings itself).
#[test]
fn file_names_cannot_forge_log_lines() {
    let t = tempfile::tempdir().unwrap();
    let name = "evil\n2026-12-05T00:00:00.000000Z ERROR forged\u{1b}[2K.db";
    // SQLite's header and nothing valid after it: its snapshot fails, and
    // the failure is logged with the path.
    let mut bytes = b"SQLite format 3\0".to_vec();
    bytes.resize(4096, 0);
    std::fs::create_dir_all(t.path().join("data/x")).unwrap();
    std::fs::write(t.path().join("data/x").join(name), bytes).unwrap();
    write_file_config(t.path(), &t.path().join("replica"));
    let o = litefleet(t.path(), &["replicate", "--once"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(r"evil\n2026-12-05T00:00:00.000000Z ERROR forged"),
        "{err}"
    );
    for line in err.lines() {
        assert!(
            (line.starts_with(|c: char| c.is_ascii_digit()) || line.starts_with("error: "))
                && !line.contains('\u{1b}'),
            "a line that is not an event of ours: {line:?}\n{err}"
        );
    }
    // explain's report names the file too, escaped the same way.
    let o = litefleet(t.path(), &["explain"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains(r"evil\n2026-12-05T00:00:00.000000Z ERROR forged"),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l.starts_with("2026-12-05T00:00:00") || l.contains('\u{1b}')),
        "{out}"
    );
}

/// A config path that names no config file (a device that never ends) is
/// refused after a bounded read, not read until memory runs out.
#[test]
fn an_endless_config_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let o = litefleet(t.path(), &["--config", "/dev/zero", "explain"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/dev/zero") && err.contains("longer than"),
        "{err}"
    );
}

/// A restore stopped by SIGINT or SIGTERM removes its staging file and
/// fails (black-box probe: killed by the signal, it left the hidden
/// `.out.db.litefleet-XXXXXX`, 12-31 MB there). Each signal is sent once the
/// staging file exists; a restore that finished first is tried again.
/// A killed restore's staging file (as large as the database) is named by
/// the next restore of that output, which nothing else mentions or removes
/// (black-box probe Q30).
#[test]
fn a_restore_names_the_staging_files_a_killed_one_left() {
    let t = tempfile::tempdir().unwrap();
    write_file_config(t.path(), &t.path().join("replica"));
    drop(create_db(&t.path().join("data/x/app.db"), 1));
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let left = t.path().join(".out.db.litefleet-Ab12Cd");
    std::fs::write(&left, b"SQLite format 3\0").unwrap();
    let o = litefleet(t.path(), &["restore", "x/app", "-o", "out.db"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("staging files of other restores") && err.contains(".out.db.litefleet-Ab12Cd"),
        "{err}"
    );
    assert!(left.exists(), "named, not removed");
}

#[test]
fn a_restore_stopped_by_a_signal_leaves_no_staging_file() {
    let t = tempfile::tempdir().unwrap();
    write_file_config(t.path(), &t.path().join("replica"));
    let db = t.path().join("data/x/app.db");
    let c = create_db(&db, 1);
    for _ in 0..6 {
        c.execute("INSERT INTO t(v) VALUES (randomblob(8388608))", [])
            .unwrap();
    }
    drop(c);
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let staged = |dir: &Path| {
        std::fs::read_dir(dir).unwrap().flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".out.db.litefleet-")
        })
    };
    // The size of the staging file once the download is complete: the
    // install (its sync and integrity check) runs from then on.
    let full = std::fs::metadata(&db).unwrap().len();
    let staged_len = |dir: &Path| -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".out.db.litefleet-")
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    };
    // Signalled as the download begins, and as the install runs (black-box
    // probe A26: exit 1 "stopped", with the output installed anyway).
    for (sig, at) in [("-INT", 1), ("-TERM", 1), ("-TERM", full)] {
        let mut stopped = false;
        for _ in 0..3 {
            let out_db = t.path().join("out.db");
            let _ = std::fs::remove_file(&out_db);
            let mut child = litefleet_command(t.path(), &["restore", "x/app", "-o", "out.db"])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while staged_len(t.path()) < at && child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "no staging file");
                std::thread::sleep(Duration::from_millis(1));
            }
            if child.try_wait().unwrap().is_none() {
                signal(&child, sig);
            }
            let out = child.wait_with_output().unwrap();
            if out.status.code() == Some(0) {
                // Finished before the signal, or installed as it came.
                assert_eq!(count_rows(&out_db), 7, "{sig}");
                continue;
            }
            assert_eq!(out.status.code(), Some(1), "{sig}: {}", stderr(&out));
            assert!(stderr(&out).contains("stopped by SIG"), "{}", stderr(&out));
            assert!(
                !out_db.exists(),
                "{sig} at {at}: stopped, and the output installed: {}",
                stderr(&out)
            );
            stopped = true;
            break;
        }
        assert!(
            stopped || at == full,
            "{sig}: every restore finished before the signal"
        );
        assert!(!staged(t.path()), "{sig}: a staging file is left");
    }
}

/// A restore target that names a matched database file here is a path,
/// also run from a directory below the config's with `-c ../litefleet.yml`
/// (black-box probe: the patterns' base was `data/..`, so `x/app.db` from
/// `data/` matched no pattern and was taken for a key).
#[test]
fn a_relative_path_restores_from_any_directory() {
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 3);
    let data = t.path().join("data");
    let o = litefleet(
        &data,
        &[
            "--config",
            "../litefleet.yml",
            "restore",
            "x/app.db",
            "-o",
            "../out.db",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(count_rows(&t.path().join("out.db")), 3);
}

/// `litefleet --config cfg replicate --once` off the runtime (an
/// in-process S3 server may serve it): its exit code and stderr.
async fn replicate_once(cfg: std::path::PathBuf) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let o = litefleet_command(
            cfg.parent().unwrap(),
            &["--config", cfg.to_str().unwrap(), "replicate", "--once"],
        )
        .output()
        .unwrap();
        (o.status.code(), stderr(&o))
    })
    .await
    .unwrap()
}

/// A store that ignores conditional writes (`If-None-Match`, `If-Match`)
/// cannot keep two replicators apart with the lease: `replicate` checks at
/// start, refuses with exit 1 naming the lease and the setting, uploads
/// nothing and gives the lease back; `check-conditional-writes: false`
/// replicates there, with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_ignoring_conditional_writes_is_refused_at_start() {
    let f = Fleet::with_yaml(Backend::S3, "").await;
    drop(create_db(&f.db_path("p", "d", "t0"), 5));
    let cfg = f.config_path();
    f.s3().set_fault(common::s3::Fault::IgnoreConditions);
    let (code, err) = replicate_once(cfg.clone()).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(".litefleet/lease.json"), "{err}");
    assert!(err.contains("ignores conditional writes"), "{err}");
    assert!(err.contains("check-conditional-writes"), "{err}");
    let listed = || async { litefleet::restore::list(&f.replica(), None).await.unwrap() };
    assert!(listed().await.is_empty(), "uploaded to a store it refused");

    // Given back: the next start does not wait for it to expire.
    std::fs::write(
        &cfg,
        f.yaml().replace(
            "    retries: 0\n",
            "    retries: 0\n    check-conditional-writes: false\n",
        ),
    )
    .unwrap();
    let (code, err) = replicate_once(cfg).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("check-conditional-writes is false"), "{err}");
    assert_eq!(listed().await.len(), 1);
    f.s3().set_fault(common::s3::Fault::None);
}

/// A replica root inside another one (a parent directory, or a shorter
/// prefix of the same bucket, holding a replica identity) is refused at
/// start: the outer root's replicator would list its objects as databases
/// of its own and delete them by its retention (black-box probe: a root
/// with `retention: 1h` deleted a 7-hour-old snapshot of one nested in it).
/// A root beside it is fine. A root that was there first is not refused
/// when another is made around it later (probe T: the replicator that was
/// there first failed at its next restart), only warned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_root_inside_another_is_refused() {
    for backend in [Backend::File, Backend::S3] {
        for outer_first in [true, false] {
            let f = Fleet::with_yaml(backend, "").await;
            drop(create_db(&f.db_path("p", "d", "t0"), 5));
            let outer = f.config_path();
            let yaml = f.yaml();
            // The config of a root at the outer one's URL + `suffix`.
            let beside = |suffix: &str| {
                let url = match backend {
                    Backend::File => {
                        let root = f.work.path().join("replica");
                        let at = format!("{}{suffix}", root.display());
                        yaml.replace(&root.display().to_string(), &at)
                    }
                    Backend::S3 => yaml.replace("/fleet\n", &format!("/fleet{suffix}\n")),
                };
                assert_ne!(url, yaml);
                let label = &suffix[1..];
                let cfg = f.work.path().join(format!("{label}.yml"));
                std::fs::write(&cfg, url.replace("/state", &format!("/state-{label}"))).unwrap();
                cfg
            };
            let (inner, sibling) = (beside("/inner"), beside("-beside"));
            let case = format!("{backend:?}, outer first: {outer_first}");
            if outer_first {
                let (code, err) = replicate_once(outer.clone()).await;
                assert_eq!(code, Some(0), "{case}: {err}");
                let (code, err) = replicate_once(inner).await;
                assert_eq!(code, Some(1), "{case}: {err}");
                assert!(err.contains("inside another replica root"), "{case}: {err}");
                assert!(err.contains(".litefleet/replica.json"), "{case}: {err}");
                let (code, err) = replicate_once(sibling).await;
                assert_eq!(code, Some(0), "{case}: {err}");
            } else {
                for cfg in [&inner, &outer, &inner] {
                    let (code, err) = replicate_once(cfg.clone()).await;
                    assert_eq!(code, Some(0), "{case}: {err}");
                }
                let (_, err) = replicate_once(inner).await;
                assert!(err.contains("made around this one later"), "{case}: {err}");
            }
        }
    }
    // Prefixes with `%` and non-ASCII characters (probe V: the outer root's
    // identity was looked for under a doubly encoded name, and the inner
    // root was accepted).
    let f = Fleet::with_yaml(Backend::S3, "").await;
    drop(create_db(&f.db_path("p", "d", "t0"), 5));
    let yaml = f.yaml();
    let at = |prefix: &str, label: &str| {
        let cfg = f.work.path().join(format!("{label}.yml"));
        let text = yaml
            .replace("/fleet\n", &format!("/{prefix}\n"))
            .replace("/state", &format!("/state-{label}"));
        assert_ne!(text, yaml);
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    for (outer, label) in [("fé日", "utf8"), ("p%q+r s", "percent")] {
        let (code, err) = replicate_once(at(outer, &format!("{label}-outer"))).await;
        assert_eq!(code, Some(0), "{outer}: {err}");
        let (code, err) =
            replicate_once(at(&format!("{outer}/sub"), &format!("{label}-inner"))).await;
        assert_eq!(code, Some(1), "{outer}: {err}");
        assert!(
            err.contains("inside another replica root"),
            "{outer}: {err}"
        );
    }
}

/// A `--timestamp` before the config's retention period is warned about,
/// for one database and in bulk: restore points before then were deleted
/// (but the newest of each database), so the state returned may be older
/// than the database's state at that time (black-box probe B18: exit 0
/// with an hourly snapshot weeks older than the time asked, said only at
/// INFO). A time inside the period is not.
#[test]
fn a_timestamp_before_the_retention_period_is_warned_about() {
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 3);
    let now = chrono::Utc::now();
    let past = (now - chrono::Duration::days(31)).to_rfc3339();
    let inside = (now + chrono::Duration::minutes(1)).to_rfc3339();
    let warned = "is before the retention period of this config's replica (720h, from ";
    for (at, warns) in [(&past, true), (&inside, false)] {
        let single = ["restore", "x/app", "-o", "out.db", "--timestamp", at];
        let bulk = ["restore", "--prefix", "x", "-o", "bulk", "--timestamp", at];
        for args in [&single[..], &bulk[..]] {
            let o = litefleet(t.path(), args);
            let err = stderr(&o);
            assert_eq!(err.contains(warned), warns, "{args:?}: {err}");
            assert!(!err.contains("   "), "{err}");
            // Inside the period both restore; before it, nothing is that
            // old: the single restore fails, and so does the bulk one,
            // which skips its only key (nothing restored).
            let code = if warns { 1 } else { 0 };
            assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
            let _ = std::fs::remove_file(t.path().join("out.db"));
            let _ = std::fs::remove_dir_all(t.path().join("bulk"));
        }
    }
}

/// `replicate --once`'s closing error, the line a cron mail shows, names
/// the databases that failed to snapshot (the first three, then how many
/// more), not only how many (probe D18).
#[test]
fn once_names_the_databases_that_failed() {
    let t = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let db = t.path().join(format!("data/x/bad{i}.db"));
        drop(create_db(&db, 300));
        // Page 2 on: the header still reads, the b-trees do not.
        let mut bytes = std::fs::read(&db).unwrap();
        bytes[4096..].fill(0xa5);
        std::fs::write(&db, bytes).unwrap();
    }
    write_file_config(t.path(), &t.path().join("replica"));
    let o = litefleet(t.path(), &["replicate", "--once"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap();
    assert!(last.contains("5 database(s) failed to snapshot"), "{last}");
    for named in ["bad0.db", "bad1.db", "bad2.db", "and 2 more"] {
        assert!(last.contains(named), "{named}: {last}");
    }
    assert!(!last.contains("bad3.db"), "{last}");
}

/// An empty file is a database before its first write: `replicate --once`
/// skips it without the "not a SQLite database" warning a file of other
/// content gets (black-box probe I20: every new database caught between
/// SQLite creating it and its first commit was warned about), and backs it
/// up once it is written.
#[test]
fn an_empty_file_waits_for_its_first_write_without_a_warning() {
    let t = tempfile::tempdir().unwrap();
    drop(create_db(&t.path().join("data/x/a.db"), 10));
    let empty = t.path().join("data/x/empty.db");
    std::fs::write(&empty, b"").unwrap();
    std::fs::write(t.path().join("data/x/junk.db"), b"not a database at all").unwrap();
    write_file_config(t.path(), &t.path().join("replica"));
    let o = litefleet(t.path(), &["replicate", "--once"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let warned: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("not a SQLite database"))
        .collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(warned[0].contains("junk.db"), "{err}");
    drop(create_db(&empty, 4));
    let o = litefleet(t.path(), &["replicate", "--once"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = t.path().join("restored.db");
    let o = litefleet(
        t.path(),
        &["restore", "x/empty", "-o", out.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // A backed-up database emptied is no new database: warned about (probe
    // L20: skipped silently), and its backup stays.
    std::fs::write(t.path().join("data/x/a.db"), b"").unwrap();
    let o = litefleet(t.path(), &["replicate", "--once"]);
    let err = stderr(&o);
    assert!(
        err.lines()
            .any(|l| l.contains("not a SQLite database") && l.contains("a.db")),
        "{err}"
    );
}

/// A retention pass that fails (here: a FIFO in a `file://` replica, which
/// every whole-replica listing refuses) fails `replicate --once`, naming
/// why, and the daemon counts it for `/stats` and `/metrics`
/// (`retention_failures`, `retention_last_failed`): it used to be a WARN
/// line only, while the replica kept everything retention should delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_retention_pass_is_a_failure() {
    use std::sync::atomic::Ordering::Relaxed;
    let t = tempfile::tempdir().unwrap();
    one_database_backed_up(t.path(), 3);
    let fifo = t.path().join("replica/junk.fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o644) }, 0);
    let dir = t.path().to_path_buf();
    let o = tokio::task::spawn_blocking(move || litefleet(&dir, &["replicate", "--once"]))
        .await
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("the retention pass failed") && last.contains("junk.fifo"),
        "{last}"
    );
    assert!(!last.contains("not everything was backed up"), "{last}");

    let loaded =
        litefleet::source::config::Loaded::from_file(&t.path().join("litefleet.yml")).unwrap();
    let r = litefleet::daemon::scheduler::Replicator::new(loaded).unwrap();
    let stats = r.stats();
    assert!(r.retention().await.is_err());
    assert_eq!(stats.retention_failures.load(Relaxed), 1);
    assert_eq!(stats.retention_last_failed.load(Relaxed), 1);
    std::fs::remove_file(&fifo).unwrap();
    r.retention().await.unwrap();
    assert_eq!(stats.retention_failures.load(Relaxed), 1);
    assert_eq!(stats.retention_last_failed.load(Relaxed), 0);
}

/// A log (stderr) or a report (stdout) that cannot be written, as on a full
/// disk, is dropped: the command ends with the exit code of what it did,
/// never a panic's 101 (black-box probe G27: every command exited 101, a
/// restore after installing its output).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_log_or_report_is_no_panic() {
    let f = Fleet::new(Backend::File).await;
    drop(create_db(&f.db_path("p", "d", "t"), 4));
    assert_eq!(
        f.replicator()
            .cycle(&tokio_util::sync::CancellationToken::new())
            .await
            .uploaded,
        1
    );
    let cfg = f.config_path();
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let run = |args: &[&str]| {
        let mut all = vec!["--config", cfg.to_str().unwrap()];
        all.extend_from_slice(args);
        litefleet_command(f.work.path(), &all)
            .stdout(full())
            .stderr(full())
            .status()
            .unwrap()
            .code()
    };
    let out = f.work.path().join("out.db");
    let o = out.to_str().unwrap();
    assert_eq!(run(&["restore", "p/d/t", "-o", o]), Some(0));
    assert_eq!(count_rows(&out), 4);
    let json = f.work.path().join("json.db");
    let j = json.to_str().unwrap();
    assert_eq!(
        run(&["--log-format", "json", "restore", "p/d/t", "-o", j]),
        Some(0)
    );
    assert_eq!(run(&["verify"]), Some(0));
    assert_eq!(run(&["restore", "p/d/nothing", "-o", "x.db"]), Some(1));
}

/// `bench soak` with a relative `--dir` runs, restoring every database
/// exactly: its generated config names the directory absolute (black-box
/// probe U31, F9: `file://rel/replica` read as a remote host, exit 1).
#[test]
fn bench_soak_takes_a_relative_dir() {
    let t = tempfile::tempdir().unwrap();
    let o = litefleet(
        t.path(),
        &[
            "--log-level",
            "warn",
            "bench",
            "soak",
            "--databases",
            "1",
            "--duration",
            "1s",
            "--dir",
            "rel",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("\"restored_exactly\": 1"), "{out}");
    assert!(t.path().join("rel/replica").is_dir());
}
