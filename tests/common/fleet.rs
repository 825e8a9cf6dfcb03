//! A fleet of SQLite databases in a temp dir, replicated to either the
//! in-process S3 server or a `file://` directory, with helpers to write,
//! age and read databases.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use litefleet::daemon::scheduler::Replicator;
use litefleet::replica::storage::Replica;
use litefleet::restore::{RestoreOptions, RestoreOutcome};
use litefleet::source::config::Loaded;
use rusqlite::Connection;
use tempfile::TempDir;

use super::s3::S3Server;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    S3,
    File,
}

/// Generates `mod $name { async fn s3(); async fn file(); }` from one body
/// taking `Backend`, so every replicate/restore/retention test runs on both.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn s3() {
                ($body)(common::fleet::Backend::S3).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn file() {
                ($body)(common::fleet::Backend::File).await
            }
        }
    };
}

pub struct Fleet {
    pub backend: Backend,
    /// Root of the database tree.
    pub data: TempDir,
    /// Config file, state, temp and (for File) the replica live here.
    pub work: TempDir,
    pub s3: Option<S3Server>,
    pub extra_yaml: String,
    /// `replica.timeout` for S3 (per request).
    pub timeout: &'static str,
    pub max_concurrent: usize,
    pub scan_interval: &'static str,
    /// Appended at the top level of the config (e.g. `addr: ...`).
    pub top_yaml: String,
}

impl Fleet {
    pub async fn new(backend: Backend) -> Fleet {
        Self::with_yaml(backend, "").await
    }

    /// `extra` is inserted into the `multi-db:` section (indented by 2).
    pub async fn with_yaml(backend: Backend, extra: &str) -> Fleet {
        let s3 = match backend {
            Backend::S3 => Some(S3Server::start().await),
            Backend::File => None,
        };
        Fleet {
            backend,
            data: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            s3,
            extra_yaml: extra.to_string(),
            timeout: "10s",
            max_concurrent: 8,
            scan_interval: "15s",
            top_yaml: String::new(),
        }
    }

    pub fn s3(&self) -> &S3Server {
        self.s3.as_ref().expect("S3 backend")
    }

    pub fn replica_yaml(&self) -> String {
        match &self.s3 {
            Some(s) => format!(
                "    url: s3://{}/fleet\n    endpoint: {}\n    force-path-style: true\n    region: us-east-1\n    access-key-id: {}\n    secret-access-key: {}\n    retries: 0\n    timeout: {}\n",
                s.bucket(),
                s.endpoint(),
                s.access_key(),
                s.secret_key(),
                self.timeout
            ),
            None => format!("    url: file://{}\n", self.work.path().join("replica").display()),
        }
    }

    pub fn yaml(&self) -> String {
        format!(
            "multi-db:\n  patterns: [\"{}/*/databases/*/tenants/*.db\"]\n  scan-interval: {}\n  max-concurrent: {}\n  temp-dir: {}\n  state-dir: {}\n{}  replica:\n    path: \"{{{{project}}}}/{{{{database}}}}/{{{{tenant}}}}\"\n{}{}",
            self.data.path().display(),
            self.scan_interval,
            self.max_concurrent,
            self.work.path().join("tmp").display(),
            self.work.path().join("state").display(),
            self.extra_yaml,
            self.replica_yaml(),
            self.top_yaml
        )
    }

    pub fn config_path(&self) -> PathBuf {
        let p = self.work.path().join("litefleet.yml");
        std::fs::write(&p, self.yaml()).unwrap();
        p
    }

    pub fn loaded(&self) -> Loaded {
        Loaded::from_str(&self.yaml(), "test.yml", self.data.path()).unwrap()
    }

    pub fn replicator(&self) -> Replicator {
        Replicator::new(self.loaded()).unwrap()
    }

    pub fn replica(&self) -> Replica {
        self.loaded().open_replica().unwrap()
    }

    pub fn db_path(&self, project: &str, database: &str, tenant: &str) -> PathBuf {
        self.data
            .path()
            .join(project)
            .join("databases")
            .join(database)
            .join("tenants")
            .join(format!("{tenant}.db"))
    }

    pub fn key(project: &str, database: &str, tenant: &str) -> String {
        format!("{project}/{database}/{tenant}")
    }

    pub async fn restore(
        &self,
        target: &str,
        out: &Path,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> litefleet::Result<RestoreOutcome> {
        self.restore_with(target, out, at, false).await
    }

    /// The latest state, or the next older one if the newest cold snapshot
    /// is damaged (`--allow-older`).
    pub async fn restore_allowing_older(
        &self,
        target: &str,
        out: &Path,
    ) -> litefleet::Result<RestoreOutcome> {
        self.restore_with(target, out, None, true).await
    }

    async fn restore_with(
        &self,
        target: &str,
        out: &Path,
        at: Option<chrono::DateTime<chrono::Utc>>,
        allow_older: bool,
    ) -> litefleet::Result<RestoreOutcome> {
        let opts = RestoreOptions {
            target: target.to_string(),
            output: out.to_path_buf(),
            timestamp: at,
            if_replica_exists: false,
            if_db_not_exists: false,
            allow_older,
        };
        litefleet::restore::restore(&self.loaded(), &self.replica(), &opts).await
    }

    /// Restores each key into a temp dir and checks it holds `rows` rows.
    pub async fn assert_restores<K: AsRef<str>>(&self, keys: &[K], rows: i64) {
        let out = tempfile::tempdir().unwrap();
        for key in keys {
            let key = key.as_ref();
            let o = out.path().join(key.replace('/', "_"));
            self.restore(key, &o, None).await.unwrap();
            assert_eq!(count_rows(&o), rows, "{key}");
        }
    }

    /// Puts a placeholder cold snapshot of `key`/`stem` taken at `taken`;
    /// returns its object key.
    pub async fn put_cold_snapshot(
        &self,
        key: &str,
        stem: &str,
        taken: chrono::DateTime<chrono::Utc>,
    ) -> String {
        use object_store::ObjectStoreExt;
        let r = self.replica();
        let loc = litefleet::replica::cold::snapshot_path(&r.prefix, key, stem, taken);
        r.store
            .put(&loc, bytes::Bytes::from_static(b"x").into())
            .await
            .unwrap();
        loc.to_string()
    }

    pub async fn objects(&self) -> Vec<String> {
        use futures::TryStreamExt;
        let r = self.replica();
        let mut v: Vec<String> = r
            .list_all(&r.prefix)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        // The replica's identity, written at the first cycle, is no backup.
        v.retain(|o| !o.ends_with(litefleet::replica::identity::IDENTITY_OBJECT));
        v.sort();
        v
    }
}

/// Creates a WAL-mode database with a table `t(id INTEGER PRIMARY KEY, v)` and `rows` rows.
pub fn create_db(path: &Path, rows: usize) -> Connection {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    insert_rows(&c, rows);
    c
}

pub fn insert_rows(c: &Connection, rows: usize) {
    c.execute_batch("BEGIN").unwrap();
    for _ in 0..rows {
        c.execute("INSERT INTO t(v) VALUES ('row')", []).unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
}

pub fn count_rows(path: &Path) -> i64 {
    let c = Connection::open(path).unwrap();
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// Moves the mtime of a database and its side files an hour into the past,
/// so change detection does not treat them as "racy" (just written).
pub fn age(path: &Path) {
    let past = SystemTime::now() - Duration::from_secs(3600);
    for suffix in ["", "-wal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(f) = std::fs::File::options().write(true).open(&p) {
            f.set_modified(past).unwrap();
        }
    }
}
