//! Two databases never share a replica key: a collision the config makes
//! certain is a config error; one found at scan time refuses every database
//! but the key's owner, which keeps its objects. A database whose key
//! `restore` would refuse (an empty, `.` or `..` segment) is refused too.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use common::fleet::{count_rows, create_db, Fleet};
use common::{litefleet, stderr};
use litefleet::daemon::scheduler::Replicator;
use litefleet::source::config::Loaded;
use tokio_util::sync::CancellationToken;

/// Config with patterns `*/*.db` then `*/*.sqlite`, both keyed
/// `{{project}}/{{tenant}}`: `p1/app.db` and `p1/app.sqlite` share `p1/app`.
fn yaml(f: &Fleet) -> String {
    let d = f.data.path().display();
    format!(
        "multi-db:\n  patterns: [\"{d}/*/*.db\", \"{d}/*/*.sqlite\"]\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    path: \"{{{{project}}}}/{{{{tenant}}}}\"\n{}",
        f.work.path().join("tmp").display(),
        f.work.path().join("state").display(),
        f.replica_yaml()
    )
}

fn loaded(f: &Fleet) -> Loaded {
    Loaded::from_str(&yaml(f), "test.yml", f.data.path()).unwrap()
}

/// Restores `target` with the binary; the row count, or the error output.
fn restore(f: &Fleet, target: &str) -> Result<i64, String> {
    restore_with(f, &yaml(f), target)
}

/// [`restore`] with the config `yaml`.
fn restore_with(f: &Fleet, yaml: &str, target: &str) -> Result<i64, String> {
    let config = f.work.path().join(format!("keys-{}.yml", rand_suffix()));
    std::fs::write(&config, yaml).unwrap();
    let out = f.work.path().join(format!("out-{}.db", rand_suffix()));
    let o = litefleet(
        f.work.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "restore",
            target,
            "-o",
            out.to_str().unwrap(),
        ],
    );
    if o.status.success() {
        Ok(count_rows(&out))
    } else {
        Err(stderr(&o))
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn db(f: &Fleet, name: &str, rows: usize) -> PathBuf {
    let p = f.data.path().join("p1").join(name);
    create_db(&p, rows);
    // Not "just written" (racy), so one upload each suffices.
    common::fleet::age(&p);
    p
}

async fn cycle(r: &Replicator) -> litefleet::daemon::scheduler::CycleReport {
    r.cycle(&CancellationToken::new()).await
}

both_backends!(
    same_scan_the_earlier_pattern_owns_the_key,
    |backend| async move {
        let f = Fleet::new(backend).await;
        let _db = db(&f, "app.db", 10);
        let sqlite = db(&f, "app.sqlite", 3);
        let r = Replicator::new(loaded(&f)).unwrap();
        let report = cycle(&r).await;
        assert_eq!(
            report.uploaded, 1,
            "only the key's owner is uploaded: {report:?}"
        );
        assert_eq!(r.stats().key_collisions.load(Ordering::Relaxed), 1);
        assert_eq!(restore(&f, "p1/app"), Ok(10), "the key holds app.db");
        // Restoring the refused database by path fails instead of returning app.db.
        let err = restore(&f, sqlite.to_str().unwrap()).unwrap_err();
        assert!(err.contains("shares its replica key"), "{err}");
        assert!(err.contains("app.db"), "{err}");
        // Later writes to the refused database never reach the replica.
        create_db(&sqlite, 50);
        common::fleet::age(&sqlite);
        assert_eq!(cycle(&r).await.uploaded, 0);
        assert_eq!(restore(&f, "p1/app"), Ok(10));
    }
);

// The key's owner deleted: the database it refused stays refused, so its
// first upload never replaces the owner's newest backup under the same
// hour's name (probe J: restore then returned the other database, exit 0).
both_backends!(
    a_deleted_owner_keeps_its_key_from_the_refused,
    |backend| async move {
        let f = Fleet::new(backend).await;
        let owner = db(&f, "app.db", 10);
        let _refused = db(&f, "app.sqlite", 3);
        let r = Replicator::new(loaded(&f)).unwrap();
        assert_eq!(cycle(&r).await.uploaded, 1);
        std::fs::remove_file(&owner).unwrap();
        for _ in 0..2 {
            let report = cycle(&r).await;
            assert_eq!((report.uploaded, report.refused), (0, 1), "{report:?}");
        }
        assert_eq!(restore(&f, "p1/app"), Ok(10), "app.db's backup is intact");
        // Nor after a restart in the same hour (the owner is kept beside
        // the state file; black-box probe: separate `--once` runs).
        drop(r);
        let r = Replicator::new(loaded(&f)).unwrap();
        let report = cycle(&r).await;
        assert_eq!((report.uploaded, report.refused), (0, 1), "{report:?}");
        assert_eq!(restore(&f, "p1/app"), Ok(10), "app.db's backup is intact");
        // Where that is kept cannot be read: the start fails naming it,
        // rather than handing the key over.
        drop(r);
        let kept = litefleet::source::track::contested_file(&loaded(&f).state_file());
        std::fs::write(&kept, "{ damaged").unwrap();
        let e = Replicator::new(loaded(&f))
            .err()
            .expect("a start that fails");
        assert!(e.to_string().contains(kept.to_str().unwrap()), "{e}");
    }
);

both_backends!(
    a_later_database_never_takes_an_uploaded_key,
    |backend| async move {
        let f = Fleet::new(backend).await;
        let _sqlite = db(&f, "app.sqlite", 3);
        let r = Replicator::new(loaded(&f)).unwrap();
        assert_eq!(cycle(&r).await.uploaded, 1);
        // app.db (the earlier pattern) appears later: app.sqlite owns the key.
        let _db = db(&f, "app.db", 10);
        let report = cycle(&r).await;
        assert_eq!(report.uploaded, 0, "{report:?}");
        assert_eq!(r.stats().key_collisions.load(Ordering::Relaxed), 1);
        assert_eq!(
            restore(&f, "p1/app"),
            Ok(3),
            "app.sqlite's objects are intact"
        );
        // After a restart (upload records from the state file) the owner is the same.
        drop(r);
        let r = Replicator::new(loaded(&f)).unwrap();
        assert_eq!(cycle(&r).await.uploaded, 0);
        assert_eq!(r.stats().key_collisions.load(Ordering::Relaxed), 1);
        assert_eq!(restore(&f, "p1/app"), Ok(3));
    }
);

both_backends!(
    a_file_that_is_no_database_takes_no_key,
    |backend| async move {
        // The daemon reads a new file's header only when it first uses it.
        // app.db (the earlier pattern, the key's owner if it were a
        // database) is text: it must neither refuse app.sqlite nor fail.
        let f = Fleet::new(backend).await;
        let text = f.data.path().join("p1/app.db");
        std::fs::create_dir_all(text.parent().unwrap()).unwrap();
        std::fs::write(&text, "notes, not a database").unwrap();
        common::fleet::age(&text);
        let _sqlite = db(&f, "app.sqlite", 3);
        let r = Replicator::new(loaded(&f)).unwrap();
        let report = cycle(&r).await;
        assert_eq!((report.uploaded, report.failed), (1, 0), "{report:?}");
        assert_eq!(r.stats().key_collisions.load(Ordering::Relaxed), 0);
        assert_eq!(restore(&f, "p1/app"), Ok(3));
        // A lone file that is no database: skipped at its first snapshot,
        // neither uploaded nor failed, and not tried again.
        let other = f.data.path().join("p1/other.db");
        std::fs::write(&other, "also text").unwrap();
        common::fleet::age(&other);
        let report = cycle(&r).await;
        assert_eq!((report.uploaded, report.failed), (0, 0), "{report:?}");
        assert_eq!(r.tracked(), 1, "only app.sqlite is a database");
        let report = cycle(&r).await;
        assert_eq!((report.scan.new, report.failed), (0, 0), "{report:?}");
    }
);

/// Runs `replicate --once` in `dir` (config `litefleet.yml` there, replica
/// `dir/replica`) with `patterns` and the key template `template` (the
/// default when empty): its exit code and log.
fn replicate_once(dir: &Path, patterns: &[String], template: &str) -> (Option<i32>, String) {
    let template = match template {
        "" => String::new(),
        t => format!("    path: {t:?}\n"),
    };
    let yaml = format!(
        "multi-db:\n  patterns: {patterns:?}\n  replica:\n    url: file://{}\n{template}",
        dir.join("replica").display()
    );
    std::fs::write(dir.join("litefleet.yml"), yaml).unwrap();
    let o = litefleet(dir, &["replicate", "--once"]);
    (o.status.code(), stderr(&o))
}

#[test]
fn refused_database_is_logged_once_per_path() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    for name in ["app.db", "app.sqlite", "web.db", "web.sqlite", "only.db"] {
        create_db(&data.join("p1").join(name), 1);
    }
    let d = data.display();
    let (code, err) = replicate_once(
        t.path(),
        &[format!("{d}/*/*.db"), format!("{d}/*/*.sqlite")],
        "{{project}}/{{tenant}}",
    );
    // Not everything matched was backed up: cron must see a failure.
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("2 database(s) refused"), "{err}");
    for refused in ["app.sqlite", "web.sqlite"] {
        let lines = err
            .lines()
            .filter(|l| l.contains("not backed up") && l.contains(refused))
            .count();
        assert_eq!(lines, 1, "{refused}: {err}");
    }
}

/// One pattern `<data>/**/*.db` with the default template: `k.db` renders
/// `k`, `k/.db` renders `k/`, `..db` `.`, `...db` `..` and `.db` the empty key.
fn deep_yaml(f: &Fleet) -> String {
    one_pattern_yaml(f, "**/*.db", "")
}

/// Config with the one pattern `<data>/<pattern>` and the replica lines
/// `extra` (a `path:` line, or nothing for the default template).
fn one_pattern_yaml(f: &Fleet, pattern: &str, extra: &str) -> String {
    format!(
        "multi-db:\n  patterns: [\"{}/{pattern}\"]\n  temp-dir: {}\n  state-dir: {}\n  replica:\n{extra}{}",
        f.data.path().display(),
        f.work.path().join("tmp").display(),
        f.work.path().join("state").display(),
        f.replica_yaml()
    )
}

/// Files whose keys `restore` would refuse, beside `k.db`.
const BAD_KEYS: [&str; 4] = ["k/.db", "..db", "...db", ".db"];

both_backends!(
    keys_restore_would_refuse_are_refused_at_backup,
    |backend| async move {
        let f = Fleet::new(backend).await;
        let good = f.data.path().join("k.db");
        create_db(&good, 10);
        common::fleet::age(&good);
        for name in BAD_KEYS {
            let p = f.data.path().join(name);
            create_db(&p, 3);
            common::fleet::age(&p);
        }
        let r =
            Replicator::new(Loaded::from_str(&deep_yaml(&f), "test.yml", f.data.path()).unwrap())
                .unwrap();
        let report = cycle(&r).await;
        assert_eq!(
            (report.uploaded, report.failed, report.refused),
            (1, 0, 4),
            "{report:?}"
        );
        assert_eq!(r.stats().invalid_keys.load(Ordering::Relaxed), 4);
        assert_eq!(r.stats().key_collisions.load(Ordering::Relaxed), 0);
        // `k/` never reached the replica under `k`: k.db restores.
        assert_eq!(restore(&f, "k"), Ok(10));
        let objects = f.objects().await;
        let backups: Vec<&String> = objects
            .iter()
            .filter(|o| !o.contains(".litefleet"))
            .collect();
        assert_eq!(backups.len(), 1, "{objects:?}");
        let mut tail = backups[0].rsplit('/');
        let (name, dir) = (tail.next().unwrap(), tail.next());
        assert!(dir == Some("k") && name.starts_with("k-"), "{objects:?}");
        // Later writes to a refused database are never uploaded either.
        let bad = f.data.path().join(BAD_KEYS[0]);
        create_db(&bad, 50);
        common::fleet::age(&bad);
        let report = cycle(&r).await;
        assert_eq!((report.uploaded, report.refused), (0, 4), "{report:?}");
        assert_eq!(restore(&f, "k"), Ok(10));
    }
);

#[test]
fn a_refused_key_fails_once_and_is_logged_once_per_path() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    create_db(&data.join("k.db"), 1);
    for name in BAD_KEYS {
        create_db(&data.join(name), 1);
    }
    let (code, err) = replicate_once(t.path(), &[format!("{}/**/*.db", data.display())], "");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("4 database(s) refused"), "{err}");
    for (name, why) in [
        ("k/.db", "empty segment"),
        ("..db", "`.` or `..` segment"),
        ("...db", "`.` or `..` segment"),
        (".db", "empty key"),
    ] {
        let path = data.join(name).display().to_string();
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("not backed up") && l.contains(&format!("path={path} ")))
            .collect();
        assert_eq!(lines.len(), 1, "{name}: {err}");
        assert!(lines[0].contains(why), "{name}: {}", lines[0]);
    }
    let good = format!("path={} ", data.join("k.db").display());
    assert!(!err.contains(&good), "{err}");
}

#[test]
fn a_certain_collision_is_a_config_error() {
    let t = tempfile::tempdir().unwrap();
    let yaml = "multi-db:\n  patterns: [\"/srv/a/app.db\", \"/srv/b/app.db\"]\n  replica:\n    url: file:///tmp/x\n";
    let Err(err) = Loaded::from_str(yaml, "test.yml", t.path()) else {
        panic!("a certain collision was accepted");
    };
    let err = err.to_string();
    assert!(err.contains("multi-db.replica.path"), "{err}");
    assert!(
        err.contains("/srv/a/app.db") && err.contains("/srv/b/app.db"),
        "{err}"
    );
    assert!(err.contains("\"app\""), "{err}");
    // The same file twice is no collision.
    let yaml = "multi-db:\n  patterns: [\"/srv/a/app.db\", \"/srv/a/app.db\"]\n  replica:\n    url: file:///tmp/x\n";
    assert!(Loaded::from_str(yaml, "test.yml", t.path()).is_ok());
}

/// A database whose name is not UTF-8 has no key (keys are text): it is
/// refused like an invalid key, counted once, and never attempted every
/// cycle as an upload that fails (black-box probe: "matches no pattern any
/// more" at every cycle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_not_utf8_is_refused_not_failed() {
    use std::os::unix::ffi::OsStrExt;
    let f = Fleet::new(common::fleet::Backend::File).await;
    let good = f.data.path().join("k.db");
    create_db(&good, 10);
    common::fleet::age(&good);
    let bad = f
        .data
        .path()
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.db"));
    create_db(&bad, 3);
    common::fleet::age(&bad);
    // Directories whose names are not UTF-8 either: a lossy key would give
    // both `b\u{FFFD}/t` (probe J: both uploaded into one object).
    for dir in [&b"b\xff"[..], b"b\xfe"] {
        let p = f
            .data
            .path()
            .join(std::ffi::OsStr::from_bytes(dir))
            .join("t.db");
        create_db(&p, 2);
        common::fleet::age(&p);
    }
    let r = Replicator::new(Loaded::from_str(&deep_yaml(&f), "test.yml", f.data.path()).unwrap())
        .unwrap();
    for _ in 0..2 {
        let report = cycle(&r).await;
        assert_eq!((report.failed, report.refused), (0, 3), "{report:?}");
    }
    assert_eq!(r.stats().invalid_keys.load(Ordering::Relaxed), 3);
    assert_eq!(restore(&f, "k"), Ok(10));
    let objects = f.objects().await;
    assert!(
        objects
            .iter()
            .all(|o| o.starts_with("k/") || o.starts_with(".litefleet/")),
        "{objects:?}"
    );
}

// One pattern whose template puts two placeholders in one segment:
// `{{p}}-{{t}}` renders `a-b-c` for both `a-b/c.db` and `a/b-c.db`. The
// second is refused like a collision across patterns, and restoring it by
// path fails (probe J: both were uploaded into one object, and the restore
// by path returned the other database with exit 0).
both_backends!(
    two_databases_of_one_pattern_never_share_a_key,
    |backend| async move {
        let f = Fleet::new(backend).await;
        let yaml = one_pattern_yaml(&f, "*/*.db", "    path: \"{{p}}-{{t}}\"\n");
        let one = f.data.path().join("a-b/c.db");
        let two = f.data.path().join("a/b-c.db");
        create_db(&one, 10);
        create_db(&two, 3);
        common::fleet::age(&one);
        common::fleet::age(&two);
        let r =
            Replicator::new(Loaded::from_str(&yaml, "test.yml", f.data.path()).unwrap()).unwrap();
        let report = cycle(&r).await;
        assert_eq!((report.uploaded, report.refused), (1, 1), "{report:?}");
        assert_eq!(r.stats().key_collisions.load(Ordering::Relaxed), 1);
        // The smaller path (`a` < `a-b`) owns the key and holds its objects.
        assert_eq!(restore_with(&f, &yaml, "a-b-c"), Ok(3));
        for path in [&one, &two] {
            let err = restore_with(&f, &yaml, path.to_str().unwrap()).unwrap_err();
            assert!(err.contains("shares its replica key"), "{err}");
        }
    }
);

// A key that was never backed up restores nothing, even when the key of
// its parent directory holds a database of its name (probe J: with
// `data/**/main.db`, `restore a/main` returned key `a`'s `main.db`, exit 0).
both_backends!(
    a_key_never_backed_up_is_not_found_under_its_parent,
    |backend| async move {
        let f = Fleet::new(backend).await;
        let yaml = one_pattern_yaml(&f, "**/main.db", "");
        let parent = f.data.path().join("a/main.db");
        create_db(&parent, 10);
        common::fleet::age(&parent);
        let r =
            Replicator::new(Loaded::from_str(&yaml, "test.yml", f.data.path()).unwrap()).unwrap();
        assert_eq!(cycle(&r).await.uploaded, 1);
        let out = f.work.path().join("child.db");
        let got = f.restore("a/main", &out, None).await;
        assert!(
            matches!(
                got,
                Ok(litefleet::restore::RestoreOutcome::NoReplica) | Err(_)
            ),
            "{got:?}"
        );
        assert!(!out.exists());
        assert_eq!(restore(&f, "a").map_err(|_| ()), Ok(10));
    }
);
