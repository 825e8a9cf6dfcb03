//! Bulk restore (`restore --prefix`) and restore progress, against the
//! in-process S3 server and file://.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::fleet::{count_rows, create_db, Fleet};
use common::litefleet;
use litefleet::restore::{
    restore_bulk, restore_with_progress, BulkItem, BulkOptions, BulkProgress, NoProgress,
    RestoreOptions, RestoreOutcome,
};
use litefleet::Error;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use tokio_util::sync::CancellationToken;

const PROJECTS: usize = 2;
const DATABASES: usize = 2;
const TENANTS: usize = 5;

/// (key, rows) of the fleet made by `fleet_of_20`.
fn expected() -> Vec<(String, i64)> {
    let mut v = Vec::new();
    for p in 0..PROJECTS {
        for d in 0..DATABASES {
            for t in 0..TENANTS {
                let rows = (1 + p * 100 + d * 10 + t) as i64;
                v.push((
                    Fleet::key(&format!("p{p}"), &format!("d{d}"), &format!("t{t}")),
                    rows,
                ));
            }
        }
    }
    v
}

/// 20 databases with distinct row counts, replicated once.
async fn fleet_of_20(b: common::fleet::Backend) -> Fleet {
    let f = Fleet::new(b).await;
    for (key, rows) in expected() {
        let parts: Vec<&str> = key.split('/').collect();
        drop(create_db(
            &f.db_path(parts[0], parts[1], parts[2]),
            rows as usize,
        ));
    }
    let r = f.replicator().cycle(&CancellationToken::new()).await;
    assert_eq!((r.scan.databases, r.failed), (20, 0));
    f
}

fn opts(prefix: &str, dir: &Path) -> BulkOptions {
    BulkOptions {
        prefix: prefix.to_string(),
        output_dir: dir.to_path_buf(),
        timestamp: None,
        concurrency: 4,
        if_db_not_exists: false,
        allow_older: false,
        if_replica_exists: false,
    }
}

/// Records what a bulk restore reports.
#[derive(Default)]
struct Recorder {
    total: Mutex<Option<usize>>,
    keys: Mutex<Vec<String>>,
}

impl BulkProgress for Recorder {
    fn started(&self, total: usize) {
        *self.total.lock().unwrap() = Some(total);
    }
    fn finished(&self, item: &BulkItem) {
        self.keys.lock().unwrap().push(item.key.clone());
    }
}

both_backends!(
    bulk_restores_every_database_under_a_prefix,
    |b| async move {
        let f = fleet_of_20(b).await;
        let replica = f.replica();
        let out = tempfile::tempdir().unwrap();

        // One project: exactly its 10 databases, mirrored as directories.
        let dir = out.path().join("p0");
        let rec = Recorder::default();
        let r = restore_bulk(&replica, &opts("p0", &dir), &rec)
            .await
            .unwrap();
        assert_eq!((r.databases, r.restored, r.skipped), (10, 10, 0));
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert_eq!(*rec.total.lock().unwrap(), Some(10));
        assert_eq!(rec.keys.lock().unwrap().len(), 10);
        for (key, rows) in expected() {
            let p = dir.join(format!("{key}.db"));
            assert_eq!(p.exists(), key.starts_with("p0/"), "{}", p.display());
            if key.starts_with("p0/") {
                assert_eq!(count_rows(&p), rows, "{key}");
            }
        }

        // The whole replica ("/"), every row count compared.
        let all = out.path().join("all");
        let r = restore_bulk(&replica, &opts("/", &all), &NoProgress)
            .await
            .unwrap();
        assert_eq!((r.databases, r.restored, r.skipped), (20, 20, 0));
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert!(r.bytes > 0);
        for (key, rows) in expected() {
            assert_eq!(count_rows(&all.join(format!("{key}.db"))), rows, "{key}");
        }

        // As of a time before any upload: nothing to restore, an error as a
        // prefix without databases is (a single restore of each fails too),
        // unless --if-replica-exists: then every database is skipped.
        let early = out.path().join("early");
        let mut o = opts("p1", &early);
        o.timestamp = Some(chrono::Utc::now() - chrono::Duration::hours(1));
        let e = restore_bulk(&replica, &o, &NoProgress).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("none of the 10 databases under prefix \"p1\""),
            "{e}"
        );
        o.if_replica_exists = true;
        let r = restore_bulk(&replica, &o, &NoProgress).await.unwrap();
        assert_eq!((r.restored, r.skipped, r.failed.len()), (0, 10, 0));
    }
);

both_backends!(prefix_without_databases_is_a_clear_error, |b| async move {
    let f = fleet_of_20(b).await;
    let replica = f.replica();
    let out = tempfile::tempdir().unwrap();
    let err = restore_bulk(&replica, &opts("p7", out.path()), &NoProgress)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NotFound(_)), "{msg}");
    assert!(msg.contains("no databases under prefix \"p7\""), "{msg}");
    // A prefix that is a prefix of a key segment ("p" of "p0") holds nothing either.
    assert!(restore_bulk(&replica, &opts("p", out.path()), &NoProgress)
        .await
        .is_err());
    // --if-replica-exists: nothing to do, no error.
    let mut o = opts("p7", out.path());
    o.if_replica_exists = true;
    let r = restore_bulk(&replica, &o, &NoProgress).await.unwrap();
    assert_eq!((r.databases, r.restored), (0, 0));
    // A prefix that tries to climb out is refused before anything is listed.
    let err = restore_bulk(&replica, &opts("p0/../..", out.path()), &NoProgress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");
});

both_backends!(if_db_not_exists_skips_existing_outputs, |b| async move {
    let f = fleet_of_20(b).await;
    let replica = f.replica();
    let out = tempfile::tempdir().unwrap();
    let r = restore_bulk(&replica, &opts("p1", out.path()), &NoProgress)
        .await
        .unwrap();
    assert_eq!(r.restored, 10);

    // Without the flag an existing output is a per-database failure.
    let r = restore_bulk(&replica, &opts("p1", out.path()), &NoProgress)
        .await
        .unwrap();
    assert_eq!((r.restored, r.skipped, r.failed.len()), (0, 0, 10));
    assert!(
        r.failed[0].1.to_string().contains("already exists"),
        "{}",
        r.failed[0].1
    );

    // Remove three, and mark one kept output so we can tell it is untouched.
    for t in ["t0", "t1", "t2"] {
        std::fs::remove_file(out.path().join(format!("p1/d0/{t}.db"))).unwrap();
    }
    let kept = out.path().join("p1/d1/t4.db");
    rusqlite::Connection::open(&kept)
        .unwrap()
        .execute("DELETE FROM t", [])
        .unwrap();
    let mut o = opts("p1", out.path());
    o.if_db_not_exists = true;
    let r = restore_bulk(&replica, &o, &NoProgress).await.unwrap();
    assert_eq!((r.restored, r.skipped, r.failed.len()), (3, 7, 0));
    assert_eq!(count_rows(&kept), 0);
    for (key, rows) in expected()
        .into_iter()
        .filter(|(k, _)| k.starts_with("p1/d0/"))
    {
        assert_eq!(
            count_rows(&out.path().join(format!("{key}.db"))),
            rows,
            "{key}"
        );
    }
});

// A symbolic link planted in the output directory is never written
// through: the keys below it fail naming it, the others restore (black-box
// probe U31, F10: a bulk restore wrote into the link's target, exit 0).
both_backends!(
    a_link_in_the_output_directory_is_not_followed,
    |b| async move {
        let f = fleet_of_20(b).await;
        let out = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), out.path().join("p1")).unwrap();
        let r = restore_bulk(&f.replica(), &opts("/", out.path()), &NoProgress)
            .await
            .unwrap();
        assert_eq!((r.restored, r.failed.len()), (10, 10));
        for (key, e) in &r.failed {
            assert!(key.starts_with("p1/"), "{key}");
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }
);

/// Copies a real snapshot of p0/d0/t0 to `p9/d9/t1` (fine) and to hostile
/// names in the same directory: stems `..` and `.`, which `list` reports as
/// keys `p9/d9/..` and `p9/d9/.`. (object_store itself refuses `.`, `..` and
/// empty segments in the directories of listed keys, so a snapshot's stem is
/// where such a segment can come from.)
/// The object of `p0/d0/t0` and the `-YYYYMMDD-HHMMSS.db.lz4` end of its
/// name: a copy under another stem keeps the hour its times record says.
async fn source_object(f: &Fleet) -> (bytes::Bytes, String) {
    let replica = f.replica();
    let src = f
        .objects()
        .await
        .into_iter()
        .find(|o| o.contains("p0/d0/t0/"))
        .unwrap();
    let bytes = replica
        .store
        .get(&ObjPath::from(src.as_str()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    (bytes, src.rsplit_once("/t0").unwrap().1.to_string())
}

/// `bytes`, a cold snapshot object, with its times record rewritten for
/// `key`: an object copied under another key is refused as another
/// database's, so planted objects are written for the key they are put
/// under.
fn bound_to(bytes: &[u8], key: &str) -> bytes::Bytes {
    let ms = |i: usize| i64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
    let at = |ms| chrono::DateTime::from_timestamp_millis(ms).unwrap();
    let times = litefleet::replica::cold::SnapshotTimes {
        started: at(ms(16)),
        taken: at(ms(24)),
    };
    let mut out = bytes.to_vec();
    out[..litefleet::replica::cold::RECORD_LEN].copy_from_slice(&times.encode_for(key));
    out.into()
}

/// Puts `bytes` as the object `name` in `key`'s directory, as is; its path.
async fn put_in_key(
    replica: &litefleet::replica::storage::Replica,
    key: &str,
    name: &str,
    bytes: bytes::Bytes,
) -> ObjPath {
    let loc = litefleet::replica::layout::key_path(&replica.prefix, key).join(name);
    replica
        .store
        .put(&loc, PutPayload::from(bytes))
        .await
        .unwrap();
    loc
}

async fn plant_hostile_keys(f: &Fleet) {
    let replica = f.replica();
    let (bytes, time) = source_object(f).await;
    let bytes = bound_to(&bytes, "p9/d9");
    for stem in ["t1", "..", "."] {
        put_in_key(&replica, "p9/d9", &format!("{stem}{time}"), bytes.clone()).await;
    }
}

// Another database's cold snapshot copied under a key is damage naming the
// object, on both backends (black-box probe X: it restored as that key's,
// exit 0); written for that key, the same bytes restore.
both_backends!(
    a_snapshot_copied_under_another_key_is_damage,
    |b| async move {
        let f = fleet_of_20(b).await;
        let replica = f.replica();
        let (bytes, time) = source_object(&f).await;
        let name = format!("t1{time}");
        let loc = put_in_key(&replica, "p9/d9/t1", &name, bytes.clone()).await;
        let base = tempfile::tempdir().unwrap();
        let r = restore_bulk(&replica, &opts("p9", &base.path().join("a")), &NoProgress)
            .await
            .unwrap();
        assert_eq!((r.databases, r.restored), (1, 0));
        let e = r.failed[0].1.to_string();
        assert!(matches!(r.failed[0].1, Error::Damaged { .. }), "{e}");
        assert!(
            e.contains("names another key") && e.contains(loc.as_ref()),
            "{e}"
        );
        put_in_key(&replica, "p9/d9/t1", &name, bound_to(&bytes, "p9/d9/t1")).await;
        let r = restore_bulk(&replica, &opts("p9", &base.path().join("b")), &NoProgress)
            .await
            .unwrap();
        assert_eq!((r.databases, r.restored), (1, 1), "{:?}", r.failed);
    }
);

both_backends!(
    keys_that_could_escape_the_directory_are_refused,
    |b| async move {
        let f = fleet_of_20(b).await;
        plant_hostile_keys(&f).await;
        let replica = f.replica();
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("out");
        let rec = Recorder::default();
        let r = restore_bulk(&replica, &opts("p9", &dir), &rec)
            .await
            .unwrap();
        assert_eq!((r.databases, r.restored, r.skipped), (3, 1, 0));
        let mut failed: Vec<&str> = r.failed.iter().map(|(k, _)| k.as_str()).collect();
        failed.sort();
        assert_eq!(failed, vec!["p9/d9/.", "p9/d9/.."]);
        for (key, e) in &r.failed {
            let msg = e.to_string();
            assert!(msg.contains(&format!("{key:?}")), "{msg}");
            assert!(msg.contains("must not contain"), "{msg}");
        }
        // The good one is restored; nothing was written anywhere else.
        assert_eq!(count_rows(&dir.join("p9/d9/t1.db")), 1);
        let top: Vec<_> = std::fs::read_dir(base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top, vec!["out"]);
        let inner: Vec<_> = std::fs::read_dir(dir.join("p9/d9"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(inner, vec!["t1.db"]);
    }
);

/// Keys with characters object_store percent-encodes in object paths,
/// with their rows.
const SPECIAL_KEYS: [(&str, usize); 4] = [
    ("p8/d1/h#x", 1),
    ("p8/d1/é", 2),
    ("p8/d1/p%2Fq", 3),
    ("new\nline/d1/t", 4),
];

// Object paths are stored percent-encoded; keys are listed, printed, taken
// by `restore`/`snapshots` and mirrored by a bulk restore decoded.
both_backends!(keys_are_listed_used_and_restored_decoded, |b| async move {
    let f = Fleet::new(b).await;
    for (key, rows) in SPECIAL_KEYS {
        let p: Vec<&str> = key.split('/').collect();
        drop(create_db(&f.db_path(p[0], p[1], p[2]), rows));
    }
    let r = f.replicator().cycle(&CancellationToken::new()).await;
    assert_eq!((r.scan.databases, r.failed), (4, 0));
    let objects = f.objects().await;
    assert!(
        objects.iter().any(|o| o.contains("p8/d1/h%23x/h%23x-")),
        "{objects:?}"
    );
    let replica = f.replica();
    let listed = litefleet::restore::list_databases(&replica, None)
        .await
        .unwrap();
    let mut want: Vec<&str> = SPECIAL_KEYS.iter().map(|(k, _)| *k).collect();
    want.sort();
    assert_eq!(listed.keys().collect::<Vec<_>>(), want);
    assert!(listed.values().all(|l| l.refused.is_none()));

    let cfg = f.config_path();
    let cfg = cfg.to_str().unwrap();
    let o = litefleet(f.work.path(), &["-c", cfg, "list"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let shown: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(
        shown,
        vec!["new\\nline/d1/t", "p8/d1/h#x", "p8/d1/p%2Fq", "p8/d1/é"],
        "{out}"
    );
    for key in ["p8/d1/h#x", "p8/d1/é", "p8/d1/p%2Fq"] {
        let o = litefleet(f.work.path(), &["-c", cfg, "snapshots", key]);
        assert!(o.status.success(), "{key}: {}", common::stderr(&o));
    }

    let out = tempfile::tempdir().unwrap();
    for (i, (key, rows)) in SPECIAL_KEYS.iter().enumerate() {
        let o = out.path().join(format!("{i}.db"));
        f.restore(key, &o, None).await.unwrap();
        assert_eq!(count_rows(&o), *rows as i64, "{key}");
    }
    let dir = out.path().join("bulk");
    let r = restore_bulk(&replica, &opts("/", &dir), &NoProgress)
        .await
        .unwrap();
    assert_eq!((r.databases, r.restored), (4, 4), "{:?}", r.failed);
    for (key, rows) in SPECIAL_KEYS {
        assert_eq!(
            count_rows(&dir.join(format!("{key}.db"))),
            rows as i64,
            "{key}"
        );
    }
    let mut files: Vec<String> = common::walk_files(&dir)
        .iter()
        .map(|p| p.strip_prefix(&dir).unwrap().to_str().unwrap().to_string())
        .collect();
    files.sort();
    let mut want: Vec<String> = SPECIAL_KEYS
        .iter()
        .map(|(k, _)| format!("{k}.db"))
        .collect();
    want.sort();
    assert_eq!(files, want);
});

// Parts of object paths that decode to `/`, `..` or NUL (object names no
// litefleet wrote) never become keys or paths: each database is refused on
// its own, saying why, and nothing is written outside the output
// directory. S3 only: a file:// replica decodes such parts into its own
// file names when it stores them, so it cannot hold these.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_parts_that_could_escape_are_refused() {
    let f = fleet_of_20(common::fleet::Backend::S3).await;
    let (bytes, time) = source_object(&f).await;
    let bytes = bound_to(&bytes, "p7/m");
    let replica = f.replica();
    for rel in [
        format!("p7/a%2Fb/t0{time}"),
        format!("p7/%2E%2E/t0{time}"),
        format!("p7/x%00y/t0{time}"),
        format!("p7/m/ok{time}"),
        format!("p7/m/a%2F..{time}"),
    ] {
        let loc = ObjPath::parse(format!("{}/{rel}", replica.prefix)).unwrap();
        replica
            .store
            .put(&loc, PutPayload::from(bytes.clone()))
            .await
            .unwrap();
    }
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("out");
    let r = restore_bulk(&replica, &opts("p7", &dir), &NoProgress)
        .await
        .unwrap();
    assert_eq!((r.databases, r.restored, r.skipped), (5, 1, 0));
    let mut failed: Vec<&str> = r.failed.iter().map(|(k, _)| k.as_str()).collect();
    failed.sort();
    assert_eq!(
        failed,
        vec!["p7/%2E%2E", "p7/a%2Fb", "p7/m/a%2F..", "p7/x%00y"]
    );
    for (key, e) in &r.failed {
        let msg = e.to_string();
        assert!(msg.contains(&format!("{key:?}")), "{msg}");
        assert!(msg.contains("decodes to"), "{msg}");
    }
    assert_eq!(count_rows(&dir.join("p7/m/ok.db")), 1);
    let all: Vec<_> = common::walk_files(base.path());
    assert_eq!(all, vec![dir.join("p7/m/ok.db")]);

    // `list` shows them as stored, saying why; `verify` fails each.
    let cfg = f.config_path();
    let cfg = cfg.to_str().unwrap();
    let o = litefleet(f.work.path(), &["-c", cfg, "list", "p7"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        out.lines()
            .any(|l| l.starts_with("p7/a%2Fb\t") && l.contains("\trefused: ")),
        "{out}"
    );
    let o = litefleet(f.work.path(), &["-c", cfg, "verify", "--json", "p7"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let failed: Vec<&str> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] != "ok")
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(failed.len(), 4, "{doc}");
}

both_backends!(single_restore_reports_download_bytes, |b| async move {
    let f = fleet_of_20(b).await;
    let out = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new((0u64, 0u64)));
    let (c, l) = (calls.clone(), last.clone());
    let hook: litefleet::restore::OnBytes = Arc::new(move |got, total| {
        c.fetch_add(1, Ordering::SeqCst);
        let mut last = l.lock().unwrap();
        assert!(got >= last.0 && got <= total, "{got} of {total}");
        *last = (got, total);
    });
    let o = RestoreOptions {
        target: "p1/d1/t4".into(),
        output: out.path().join("x.db"),
        timestamp: None,
        if_replica_exists: false,
        if_db_not_exists: false,
        allow_older: false,
    };
    let res = restore_with_progress(&f.loaded(), &f.replica(), &o, Some(hook))
        .await
        .unwrap();
    assert!(matches!(res, RestoreOutcome::Restored { .. }), "{res:?}");
    assert_eq!(count_rows(&o.output), 115);
    let snaps = litefleet::replica::cold::snapshots(&f.replica(), "p1/d1/t4")
        .await
        .unwrap();
    let size = snaps.last().unwrap().size;
    assert!(calls.load(Ordering::SeqCst) >= 1);
    assert_eq!(*last.lock().unwrap(), (size, size));
});

both_backends!(
    cli_bulk_restore_logs_plain_lines_off_a_terminal,
    |b| async move {
        let f = fleet_of_20(b).await;
        let cfg = f.config_path();
        let cfg = cfg.to_str().unwrap();
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("restored");
        let d = dir.to_str().unwrap();
        let o = tokio::task::spawn_blocking({
            let (w, cfg, d) = (f.work.path().to_path_buf(), cfg.to_string(), d.to_string());
            move || litefleet(&w, &["-c", &cfg, "restore", "--prefix", "p0", "-o", &d])
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert!(
            !err.contains('\u{1b}'),
            "ANSI escape in non-tty output: {err:?}"
        );
        assert!(err.contains("bulk restore started"), "{err}");
        assert!(err.contains("databases=10"), "{err}");
        assert!(
            err.contains("bulk restore finished: restored 10, skipped 0, failed 0"),
            "{err}"
        );
        for (key, rows) in expected().into_iter().filter(|(k, _)| k.starts_with("p0/")) {
            assert_eq!(count_rows(&dir.join(format!("{key}.db"))), rows, "{key}");
        }

        // Failures: exit 1, each failure logged, the summary still printed.
        plant_hostile_keys(&f).await;
        let o = tokio::task::spawn_blocking({
            let (w, cfg, d) = (f.work.path().to_path_buf(), cfg.to_string(), d.to_string());
            move || {
                litefleet(
                    &w,
                    &[
                        "-c",
                        &cfg,
                        "restore",
                        "--prefix",
                        "p9",
                        "-o",
                        &d,
                        "--concurrency",
                        "2",
                    ],
                )
            }
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(!err.contains('\u{1b}'), "{err:?}");
        assert!(err.contains("restored 1, skipped 0, failed 2"), "{err}");
        assert!(err.contains("restore failed; continuing"), "{err}");
        assert!(
            err.contains("error: restore --prefix \"p9\": 2 of 3 database(s) failed"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        // Any failure fails the run, however many others were restored
        // (audit F19: exit 0 for fewer failures than restores went unseen).
        let everything = out.path().join("everything");
        let o = tokio::task::spawn_blocking({
            let (w, cfg) = (f.work.path().to_path_buf(), cfg.to_string());
            let d = everything.to_str().unwrap().to_string();
            move || litefleet(&w, &["-c", &cfg, "restore", "--prefix", "/", "-o", &d])
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("restored 21, skipped 0, failed 2"), "{err}");

        // An empty prefix: a clear error, exit 1.
        let o = tokio::task::spawn_blocking({
            let (w, cfg, d) = (f.work.path().to_path_buf(), cfg.to_string(), d.to_string());
            move || litefleet(&w, &["-c", &cfg, "restore", "--prefix", "nope", "-o", &d])
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("no databases under prefix \"nope\""), "{err}");
    }
);

/// Writes a file at `at` when the first snapshot is read: another process
/// installing the same output while the restore runs.
#[derive(Debug)]
struct Appears {
    at: std::path::PathBuf,
}

impl common::stores::Rewrite for Appears {
    fn get(&self, r: object_store::GetResult) -> object_store::GetResult {
        if !self.at.exists() {
            std::fs::create_dir_all(self.at.parent().unwrap()).unwrap();
            std::fs::write(&self.at, b"installed by another restore").unwrap();
        }
        r
    }
}

// An output that appears while its restore runs (another restore into the
// same directory installed it first) is never replaced; with
// --if-db-not-exists it is skipped like one that existed at the start, not
// a failure (black-box probe G27: two such bulk restores both exited 1).
both_backends!(
    an_output_that_appears_meanwhile_is_skipped_if_db_not_exists,
    |b| async move {
        let f = fleet_of_20(b).await;
        let out = tempfile::tempdir().unwrap();
        for skip in [false, true] {
            let dir = out.path().join(format!("skip-{skip}"));
            let at = dir.join("p0/d1/t0.db");
            let appears = Arc::new(common::stores::Wrapped::new(
                f.replica().store.clone(),
                Appears { at: at.clone() },
            ));
            let replica = f.replica().with_store(appears);
            let mut o = opts("p0/d1/t0", &dir);
            o.if_db_not_exists = skip;
            let r = restore_bulk(&replica, &o, &NoProgress).await.unwrap();
            assert_eq!(r.databases, 1);
            if skip {
                assert_eq!(
                    (r.restored, r.skipped, r.failed.len()),
                    (0, 1, 0),
                    "{:?}",
                    r.failed
                );
            } else {
                assert_eq!((r.restored, r.skipped, r.failed.len()), (0, 0, 1));
                assert!(r.failed[0]
                    .1
                    .to_string()
                    .contains("appeared while the restore ran"));
            }
            assert_eq!(std::fs::read(&at).unwrap(), b"installed by another restore");
        }
    }
);
