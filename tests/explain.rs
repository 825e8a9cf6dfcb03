//! `litefleet explain`: what a config matches and costs, with no request to
//! the replica and nothing written.

mod common;

use std::path::{Path, PathBuf};

use common::fleet::{age, create_db};
use common::s3::S3Server;
use common::{litefleet, stderr};
use litefleet::cli::cost::{CostModel, FleetLoad};
use litefleet::source::config::Loaded;

const ACCESS_KEY: &str = "AKIAEXPLAINTEST12345";
const SECRET_KEY: &str = "EXPLAIN-SECRET-DO-NOT-PRINT";

/// A fleet under `data`: four `.db` databases of two projects, a `.sqlite`
/// one that renders the same key as `p1/orders/t1.db`, and a matching file
/// that is not a database. Only `t1.db` was written just now.
fn make_fleet(data: &Path) {
    let db = |p: &str| data.join(p);
    for p in [
        "p1/databases/orders/tenants/t1.db",
        "p1/databases/orders/tenants/t2.db",
        "p1/databases/orders/tenants/t3.db",
        "p2/databases/billing/tenants/t4.db",
        "p1/databases/orders/tenants/t1.sqlite",
    ] {
        drop(create_db(&db(p), 2));
    }
    for p in [
        "p1/databases/orders/tenants/t2.db",
        "p1/databases/orders/tenants/t3.db",
        "p2/databases/billing/tenants/t4.db",
        "p1/databases/orders/tenants/t1.sqlite",
    ] {
        age(&db(p));
    }
    std::fs::write(db("p2/databases/billing/tenants/notes.db"), b"not sqlite").unwrap();
}

/// Patterns: the fleet's `.db` and `.sqlite` files, and two that match
/// nothing (one absolute, one relative to the working directory).
fn yaml(data: &Path, replica: &str) -> String {
    format!(
        "multi-db:\n  patterns:\n    - \"{d}/*/databases/*/tenants/*.db\"\n    - \"{d}/*/databases/*/tenants/*.sqlite\"\n    - \"{d}/missing/*/databases/*/tenants/*.db\"\n    - \"./nowhere/*/databases/*/tenants/*.db\"\n  hot-duration: 10m\n  replica:\n    path: \"{{{{project}}}}/{{{{database}}}}/{{{{tenant}}}}\"\n{replica}",
        d = data.display()
    )
}

fn s3_replica(s3: &S3Server) -> String {
    format!(
        "    url: s3://{}/fleet\n    endpoint: {}\n    force-path-style: true\n    region: us-east-1\n    access-key-id: {ACCESS_KEY}\n    secret-access-key: {SECRET_KEY}\n",
        s3.bucket(),
        s3.endpoint()
    )
}

/// Runs the binary off the runtime's threads (the S3 server lives there).
async fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let (dir, args): (PathBuf, Vec<String>) = (
        dir.to_path_buf(),
        args.iter().map(|s| s.to_string()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        litefleet(&dir, &args)
    })
    .await
    .unwrap()
}

/// Asserts that `out` holds `needle`, showing `out` when not.
fn has(out: &str, needle: &str) {
    assert!(out.contains(needle), "expected {needle:?} in:\n{out}");
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `explain` in `dir`, asserts it exits 0, and returns its output.
fn explain_ok(dir: &Path) -> String {
    let o = litefleet(dir, &["explain"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explains_matches_keys_and_collisions_without_a_request() {
    let s3 = S3Server::start().await;
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    make_fleet(data.path());
    // A link and a FIFO matching the first pattern: told apart (black-box
    // probe U31: the FIFO was counted as a symlink).
    let tenants = data.path().join("p2/databases/billing/tenants");
    std::os::unix::fs::symlink(tenants.join("t4.db"), tenants.join("t5.db")).unwrap();
    let fifo = std::ffi::CString::new(tenants.join("t6.db").into_os_string().into_encoded_bytes())
        .unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::fs::write(
        work.path().join("litefleet.yml"),
        yaml(data.path(), &s3_replica(&s3)),
    )
    .unwrap();

    let o = run(work.path(), &["explain"]).await;
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    let all = format!("{out}{err}");
    // Credentials: masked, never the values.
    assert!(!all.contains(SECRET_KEY), "{all}");
    assert!(!all.contains(ACCESS_KEY), "{all}");
    has(&out, "AKIA…(masked)");
    // The resolved replica.
    has(&out, &format!("s3://{}/fleet", s3.bucket()));
    has(&out, &s3.endpoint());
    // Defaults filled in.
    has(&out, "multi-db.scan-interval            * 15s");
    has(&out, "multi-db.hot-duration               10m");
    has(&out, "state file");
    // Match counts per pattern (only real SQLite files) and example keys.
    has(
        &out,
        "4 SQLite database(s), 1 matching file(s) not SQLite (skipped), 1 symlink(s) (not \
         followed), 1 FIFO(s), socket(s) or device(s) (never opened)",
    );
    has(&out, "1 SQLite database(s)\n");
    let t1 = data.path().join("p1/databases/orders/tenants/t1.db");
    has(&out, &format!("{} -> p1/orders/t1", t1.display()));
    let t2 = data.path().join("p1/databases/orders/tenants/t2.db");
    has(&out, &format!("{} -> p1/orders/t2", t2.display()));
    // The collision, in the keys section and as a warning.
    has(&out, "5 database(s), 4 distinct key(s), 1 collision(s)");
    let sqlite = data.path().join("p1/databases/orders/tenants/t1.sqlite");
    has(
        &out,
        &format!(
            "warning: key collision: 2 databases would get key \"p1/orders/t1\": {}, {}",
            t1.display(),
            sqlite.display()
        ),
    );
    // Patterns that match nothing are flagged; the relative one says what
    // it resolved to.
    let missing = data.path().join("missing");
    has(
        &out,
        &format!(
            "warning: multi-db.patterns[2] \"{}/*/databases/*/tenants/*.db\" matches no SQLite database (resolved to {0}/*/databases/*/tenants/*.db: {0} does not exist)",
            missing.display()
        ),
    );
    let nowhere = work.path().join("nowhere/*/databases/*/tenants/*.db");
    has(
        &out,
        &format!(
            "warning: multi-db.patterns[3] \"./nowhere/*/databases/*/tenants/*.db\" matches no SQLite database (resolved to {}: {} does not exist)",
            nowhere.display(),
            work.path().join("nowhere").display()
        ),
    );
    // Activity: only t1.db was written within hot-duration; the directories
    // holding databases are two.
    has(&out, "written within hot-duration: 1 in WAL mode");
    has(&out, "inotify: 2 directories to watch");
    has(&out, "scenario (description: 100,000 databases, 250 hot");

    // --strict: the same warnings are an error.
    let o = run(work.path(), &["explain", "--strict"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("explain --strict"), "{}", stderr(&o));

    // --json parses, and its bill is the shared model's for its inputs.
    let o = run(work.path(), &["explain", "--json", "--hot", "3"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(!text.contains(SECRET_KEY) && !text.contains(ACCESS_KEY));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let counts: Vec<u64> = v["patterns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["databases"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [4, 1, 0, 0]);
    assert_eq!(v["databases"], 5);
    assert_eq!(v["collisions"][0]["key"], "p1/orders/t1");
    assert_eq!(v["activity"]["hot"], 3);
    assert_eq!(v["activity"]["hot_overridden"], true);
    let load = &v["cost"]["load"];
    assert_eq!(load["hot"], 3);
    let num = |x: &serde_json::Value| x.as_u64().unwrap();
    let loaded =
        Loaded::from_str(&yaml(data.path(), &s3_replica(&s3)), "t.yml", work.path()).unwrap();
    let expected = CostModel::for_config(loaded.multi_db()).bill(&FleetLoad::new(
        loaded.multi_db(),
        num(&load["databases"]),
        3,
        num(&load["cold_changing"]),
        num(&load["over_max_hot"]),
    ));
    let total = v["cost"]["bill"]["total_usd"].as_f64().unwrap();
    assert!(
        (total - expected.total_usd).abs() < 1e-6,
        "{total} vs {}",
        expected.total_usd
    );
    let hot_puts = v["cost"]["bill"]["lines"][0]["requests"]["put"]
        .as_f64()
        .unwrap();
    assert_eq!(v["cost"]["bill"]["lines"][0]["part"], "hot");
    // Through the fleet log (the default): per hot database one
    // consolidated pack an hour and one stream a day; the log's objects are
    // the fleet's, one per sync.
    let per_stream = litefleet::cli::cost::MEASURED_LOG_PER_STREAM.put;
    assert!(
        (hot_puts - 3.0 * (24.0 + per_stream) * 30.0).abs() < 1.0,
        "{hot_puts}"
    );
    assert_eq!(v["cost"]["bill"]["lines"][1]["part"], "fleet log");
    let log_puts = v["cost"]["bill"]["lines"][1]["requests"]["put"]
        .as_f64()
        .unwrap();
    assert!((log_puts - 86_400.0 * 30.0).abs() < 1.0, "{log_puts}");

    // Not one request reached the replica.
    assert_eq!(s3.request_count(), 0);
}

#[test]
fn touches_no_file_replica_state_or_staging() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    make_fleet(data.path());
    let replica = work.path().join("replica");
    let extra = format!(
        "  temp-dir: {}\n  state-dir: {}\n",
        work.path().join("tmp").display(),
        work.path().join("state-dir").display()
    );
    let y = yaml(
        data.path(),
        &format!("    url: file://{}\n", replica.display()),
    )
    .replace("  replica:\n", &format!("{extra}  replica:\n"));
    std::fs::write(work.path().join("litefleet.yml"), y).unwrap();
    let out = explain_ok(work.path());
    has(
        &out,
        &format!("file://{} (does not exist yet", replica.display()),
    );
    has(&out, "(absent: the first run uploads every database)");
    for p in ["replica", "tmp", "state-dir", "state"] {
        assert!(!work.path().join(p).exists(), "{p} was created");
    }
    // No SQLite side file was left next to any database.
    let tenants = data.path().join("p1/databases/orders/tenants");
    let names: Vec<String> = std::fs::read_dir(&tenants)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-wal") || n.ends_with("-shm"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn config_errors_exit_1_and_limits_warn() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    make_fleet(data.path());
    let cfg = work.path().join("litefleet.yml");
    let s3 = "    url: s3://bucket/x\n    endpoint: http://127.0.0.1:9\n";
    // A lone access key is refused as replicate would refuse it.
    std::fs::write(
        &cfg,
        yaml(
            data.path(),
            &format!("{s3}    access-key-id: {ACCESS_KEY}\n"),
        ),
    )
    .unwrap();
    let o = litefleet(work.path(), &["explain"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("must be set together"), "{err}");
    assert!(!err.contains(ACCESS_KEY), "{err}");
    // A bad value names its key.
    std::fs::write(
        &cfg,
        yaml(data.path(), s3).replace("hot-duration: 10m", "hot-duration: soon"),
    )
    .unwrap();
    let o = litefleet(work.path(), &["explain"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("multi-db.hot-duration"),
        "{}",
        stderr(&o)
    );
    // More hot databases than any open-file limit allows: a warning, exit 0.
    std::fs::write(
        &cfg,
        yaml(data.path(), s3).replace(
            "hot-duration: 10m",
            "hot-duration: 10m\n  max-hot-databases: 1000000000",
        ),
    )
    .unwrap();
    let out = explain_ok(work.path());
    has(&out, "warning: open files: the hard limit");
    // With an endpoint, requests are path-style whatever the flag says.
    has(&out, "true (any endpoint is addressed path-style)");
    has(&out, "5000000256 that max-hot-databases 1000000000 needs");
    // What replicate refuses at start is a warning (probe J: --strict
    // passed them): a directory that cannot be made, replication disabled.
    std::fs::write(
        &cfg,
        yaml(data.path(), s3).replace(
            "hot-duration: 10m",
            "hot-duration: 10m\n  state-dir: /dev/null/st\n  enabled: false",
        ),
    )
    .unwrap();
    let out = explain_ok(work.path());
    has(&out, "multi-db.state-dir: /dev/null/st");
    has(&out, "/dev/null is not a directory");
    has(&out, "multi-db.enabled is false");
    let o = litefleet(work.path(), &["explain", "--strict"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // A lease-ttl a loaded store's stalls outlast (black-box probe S31:
    // 2 s on moto paused writes, and clean stops exited 1).
    let lease = |ttl: &str| {
        let replica = format!("{s3}    lease-ttl: {ttl}\n");
        std::fs::write(&cfg, yaml(data.path(), &replica)).unwrap();
        explain_ok(work.path())
    };
    let out = lease("2s");
    has(&out, "warning: multi-db.replica.lease-ttl 2s is short: the lease is renewed every 666ms, and writes pause once no renewal has succeeded for 1s 500ms");
    has(&out, "2s (renewed every 666ms)");
    // The value as given, never rounded up to the threshold (black-box
    // probe Z32: `9999ms` was warned about as "10.0s").
    has(&lease("9999ms"), "lease-ttl 9s 999ms is short");
    assert!(!lease("10s").contains("is short"));
}

/// Keys `restore` would refuse (`k/.db` renders `k/`, `..db` renders `.`)
/// are reported with their reason, like collisions: a warning (exit 0, as
/// every warning; 1 with `--strict`), not counted as keys, listed in JSON.
#[test]
fn keys_restore_would_refuse_are_reported() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    for name in ["k.db", "k/.db", "..db", "k/generations/x.db"] {
        drop(create_db(&data.path().join(name), 1));
    }
    let y = format!(
        "multi-db:\n  patterns: [\"{}/**/*.db\"]\n  replica:\n    url: file://{}\n",
        data.path().display(),
        work.path().join("replica").display()
    );
    std::fs::write(work.path().join("litefleet.yml"), y).unwrap();
    let out = explain_ok(work.path());
    has(
        &out,
        "4 database(s), 1 distinct key(s), 0 collision(s), 3 refused key(s)",
    );
    for (name, key, why) in [
        ("k/.db", "k/", "empty segment"),
        ("..db", ".", "`.` or `..` segment"),
        // Its objects would lie among `k`'s generations (probe V).
        (
            "k/generations/x.db",
            "k/generations/x",
            "`generations` segment after its first",
        ),
    ] {
        let path = data.path().join(name).display().to_string();
        has(&out, &format!("REFUSED {key:?}: {path}: "));
        let warning = out
            .lines()
            .find(|l| l.starts_with("warning: refused key") && l.contains(&path))
            .unwrap_or_else(|| panic!("no warning for {path}:\n{out}"));
        assert!(warning.contains(why), "{warning}");
        assert!(warning.contains("not back it up"), "{warning}");
    }
    let o = litefleet(work.path(), &["explain", "--strict"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = litefleet(work.path(), &["explain", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["distinct_keys"], 1);
    let refused = v["refused_keys"].as_array().unwrap();
    assert_eq!(refused.len(), 3, "{v}");
    assert_eq!(refused[0]["key"], ".");
    assert_eq!(refused[1]["key"], "k/");
    assert_eq!(refused[2]["key"], "k/generations/x");
    assert!(refused[1]["reason"]
        .as_str()
        .unwrap()
        .contains("empty segment"));
}

/// Writes `yaml` as the config in `t` and runs `explain --strict`: its
/// exit code and output.
fn explain(t: &tempfile::TempDir, yaml: &str) -> (Option<i32>, String) {
    std::fs::write(t.path().join("litefleet.yml"), yaml).unwrap();
    rerun(t)
}

/// `explain --strict` again on the config in `t`.
fn rerun(t: &tempfile::TempDir) -> (Option<i32>, String) {
    let o = litefleet(t.path(), &["explain", "--strict"]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    (o.status.code(), out)
}

/// Renames the database `from` in `t`'s `data/p` to `to`.
fn rename_db(t: &tempfile::TempDir, from: &str, to: &str) {
    let dir = t.path().join("data/p");
    std::fs::rename(dir.join(from), dir.join(to)).unwrap();
}

/// A database whose object name on a file:// replica would pass the file
/// name limit is a warning (probe J: every upload of it failed with "File
/// name too long", and --strict passed).
#[test]
fn names_too_long_for_the_replica_are_warned_about() {
    let t = tempfile::tempdir().unwrap();
    let long = format!("{}.db", "x".repeat(240));
    drop(create_db(&t.path().join("data/p").join(&long), 1));
    drop(create_db(&t.path().join("data/p/short.db"), 1));
    let (code, out) = explain(
        &t,
        "multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n    url: file://./replica\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("longer than 255 bytes"), "{out}");
    assert!(
        out.contains(&long) && !out.contains("short.db: its object"),
        "{out}"
    );
    // S3 takes names of at most 1,024 bytes, in which a CJK character
    // takes 9 (probe V: every upload failed with KeyTooLongError).
    let cjk = format!("{}.db", "日".repeat(80));
    drop(create_db(&t.path().join("data/p").join(&cjk), 1));
    std::fs::remove_file(t.path().join("data/p").join(&long)).unwrap();
    let (code, out) = explain(
        &t,
        "multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n    url: s3://bucket/prefix\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("on the S3 replica would be longer than 1024 bytes"),
        "{out}"
    );
    assert!(
        out.contains(&cjk) && !out.contains("short.db: its object"),
        "{out}"
    );
    // At a bucket's root, names of exactly 1,024 bytes are taken (the
    // check counted a `/` after the empty prefix): the key `p/<stem>` is in
    // the cold object's name twice, `p/<stem>/<stem>-<time>.db.lz4`, so a
    // stem of 499 bytes as object names hold it (55 CJK characters of 9,
    // 4 ASCII) makes a name of 1,024 bytes, and one more byte 1,026.
    std::fs::remove_file(t.path().join("data/p").join(&cjk)).unwrap();
    let at = |ascii: usize| format!("{}{}.db", "日".repeat(55), "a".repeat(ascii));
    drop(create_db(&t.path().join("data/p").join(at(4)), 1));
    let (_, out) = explain(
        &t,
        "multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n    url: s3://bucket\n",
    );
    assert!(!out.contains("would be longer than"), "{out}");
    rename_db(&t, &at(4), &at(5));
    let (_, out) = rerun(&t);
    assert!(out.contains("would be longer than 1024 bytes"), "{out}");
    // The hot tier's longest names are its fleet-log packs, 106 bytes
    // after the key: a key of 924 bytes (as object names hold it) has cold
    // names of 949 bytes and packs of 1,030 (probe: not warned about).
    let (a, b) = (
        format!("k1030{}", "日".repeat(53)),
        format!("{}xx", "日".repeat(48)),
    );
    drop(create_db(
        &t.path().join("deep").join(&a).join(&b).join("t.db"),
        1,
    ));
    let (_, out) = explain(&t, "multi-db:\n  patterns: [\"./deep/*/*/*.db\"]\n  replica:\n    url: s3://bucket\n    path: \"{{a}}/{{b}}/{{t}}\"\n");
    assert!(
        out.contains("its cold snapshots fit, but every upload of its hot tier"),
        "{out}"
    );
    // On file://, an object is written as `<name>#1` first: 253 bytes is
    // the longest name that stores.
    let stem = |n: usize| format!("{}.db", "s".repeat(n));
    std::fs::remove_dir_all(t.path().join("deep")).unwrap();
    std::fs::remove_dir_all(t.path().join("data")).unwrap();
    drop(create_db(&t.path().join("data/p").join(stem(230)), 1));
    let (_, out) = explain(
        &t,
        "multi-db:\n  patterns: [\"./data/*/*.db\"]\n  replica:\n    url: file://./replica\n",
    );
    assert!(!out.contains("would be longer than"), "{out}");
    rename_db(&t, &stem(230), &stem(231));
    let (_, out) = rerun(&t);
    assert!(out.contains("longer than 255 bytes"), "{out}");
}

/// SQLite opens no database whose absolute path is longer than 504 bytes:
/// `explain` names such databases, and their snapshots fail saying so
/// (black-box probe: "unable to open database file", explain silent).
#[test]
fn paths_too_long_for_sqlite_are_named() {
    let t = tempfile::tempdir().unwrap();
    let short = t.path().join("short.db");
    drop(create_db(&short, 1));
    // Three directories of 100 bytes and one that makes the database's
    // path 505 bytes long, and one of 504 beside it.
    let base = t.path().join("data");
    let mut dir = base.clone();
    for _ in 0..3 {
        dir.push("d".repeat(100));
    }
    let fill = 505 - dir.as_os_str().len() - "/x.db".len() - 1;
    let (long, fits) = (
        dir.join("e".repeat(fill)).join("x.db"),
        dir.join("e".repeat(fill - 1)).join("x.db"),
    );
    assert_eq!((long.as_os_str().len(), fits.as_os_str().len()), (505, 504));
    for p in [&long, &fits] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::copy(&short, p).unwrap();
    }
    std::fs::write(
        t.path().join("litefleet.yml"),
        "multi-db:\n  patterns: [\"./data/*/*/*/*/*.db\"]\n  replica:\n    url: file://./replica\n    path: \"{{a}}/{{b}}/{{c}}/{{d}}/{{t}}\"\n",
    )
    .unwrap();
    let o = litefleet(t.path(), &["explain", "--strict"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let named = format!(
        "{}: its absolute path is 505 bytes, and SQLite opens no database whose path is longer than 504 bytes",
        long.display()
    );
    assert!(out.contains(&named), "{out}{}", stderr(&o));
    assert!(!out.contains(&format!("{}:", fits.display())), "{out}");
    let o = litefleet(t.path(), &["replicate", "--once"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("SQLite opens no database whose path is longer than 504 bytes"),
        "{err}"
    );
    assert!(!err.contains("unable to open database file"), "{err}");
}
