//! `litefleet bench soak`: random writers against a fleet while the store
//! fails at random, then every database is restored and compared with its
//! source. The figure that matters is "restored exactly": it must equal the
//! number of databases.
//!
//! Faults are injected by [`FaultyStore`], an [`ObjectStore`] wrapper around
//! the real replica store (a `file://` directory by default, or the replica
//! of `--config`), so every layer above the store (retries, the pending
//! table, the state file) is the production code path. Fault windows
//! alternate with healthy ones, [`FAULT_WINDOW`] each.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::daemon::scheduler::Replicator;
use crate::restore::{self, RestoreOptions, RestoreOutcome};
use crate::source::config::Loaded;
use crate::source::keys::key_for;
use crate::{Error, Result};

/// Length of each faulty and each healthy period: several scan intervals, so
/// uploads fail, stay pending and are retried within one run.
pub const FAULT_WINDOW: Duration = Duration::from_secs(3);
/// Share of store calls that fail inside a fault window, in per mille.
pub const FAULT_RATE_PER_MILLE: u32 = 300;
/// Scan interval of the soak: short, so a 60 s soak runs dozens of cycles.
const SOAK_SCAN_INTERVAL: &str = "1s";
/// Restores running at once at the end.
const RESTORE_CONCURRENCY: usize = 32;

/// An [`ObjectStore`] that fails a share of calls with a generic error.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    rate_per_mille: AtomicU32,
    calls: AtomicU64,
    faults: AtomicU64,
    /// Requests by S3 price class, for `bench cost`: PUT (puts, multipart
    /// starts, copies, renames), GET, LIST, DELETE.
    puts: AtomicU64,
    gets: AtomicU64,
    lists: AtomicU64,
    deletes: Arc<AtomicU64>,
}

/// Requests a [`FaultyStore`] passed on, by S3 price class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Requests {
    pub put: u64,
    pub get: u64,
    pub list: u64,
    pub delete: u64,
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> FaultyStore {
        FaultyStore {
            inner,
            rate_per_mille: AtomicU32::new(0),
            calls: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            lists: AtomicU64::new(0),
            deletes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Requests passed on so far (failed injected ones are not requests).
    pub fn requests(&self) -> Requests {
        Requests {
            put: self.puts.load(Ordering::Relaxed),
            get: self.gets.load(Ordering::Relaxed),
            list: self.lists.load(Ordering::Relaxed),
            delete: self.deletes.load(Ordering::Relaxed),
        }
    }

    pub fn set_rate(&self, per_mille: u32) {
        self.rate_per_mille.store(per_mille, Ordering::Relaxed);
    }

    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    fn check(&self) -> object_store::Result<()> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let rate = self.rate_per_mille.load(Ordering::Relaxed);
        if rate > 0 && (splitmix(n) % 1000) < u64::from(rate) {
            self.faults.fetch_add(1, Ordering::Relaxed);
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: "injected fault (bench soak)".into(),
            });
        }
        Ok(())
    }
}

/// splitmix64's increment: 2^64 / the golden ratio.
pub(crate) const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// A fixed pseudo-random sequence (splitmix64): `splitmix(s)` for
/// `s = seed, seed + SPLITMIX_GAMMA, ...` is splitmix64's stream from `seed`.
/// Reproducible runs, no RNG crate.
pub(crate) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(SPLITMIX_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.check()?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        // One DELETE per object: what a single-object delete costs; S3's
        // batch delete would be one request per 1,000, but is free anyway.
        let deletes = self.deletes.clone();
        self.inner
            .delete_stream(locations)
            .inspect(move |r| {
                if r.is_ok() {
                    deletes.fetch_add(1, Ordering::Relaxed);
                }
            })
            .boxed()
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        match self.check() {
            Ok(()) => {
                // At least one request; one per 1,000 keys listed.
                self.lists.fetch_add(1, Ordering::Relaxed);
                self.inner.list(prefix)
            }
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&ObjPath>,
        offset: &ObjPath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        self.check()?;
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.check()?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.check()?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.rename_opts(from, to, options).await
    }
}

/// What a soak run did.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub databases: usize,
    pub duration_seconds: f64,
    pub writes: u64,
    pub faults_injected: u64,
    pub uploads_ok: u64,
    pub uploads_failed: u64,
    pub cycles: u64,
    pub restored_exactly: usize,
    pub mismatched: Vec<String>,
    pub restore_seconds: f64,
}

/// Soak parameters.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub databases: usize,
    pub duration: Duration,
    pub writers: usize,
    pub dir: PathBuf,
}

pub(crate) fn soak_path(root: &Path, i: usize) -> PathBuf {
    root.join("data")
        .join(format!("g{}", i / 100))
        .join(format!("t{i:05}.db"))
}

pub(crate) fn open_writer(path: &Path) -> Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open(path).map_err(|e| Error::sqlite(path, e))?;
    c.busy_timeout(Duration::from_secs(5))
        .map_err(|e| Error::sqlite(path, e))?;
    c.execute_batch("PRAGMA journal_mode=wal; PRAGMA synchronous=normal;")
        .map_err(|e| Error::sqlite(path, e))?;
    Ok(c)
}

/// Commits one row into each of the fleet's first `hot` databases
/// ([`soak_path`]) every second, spread evenly over the second, until
/// `stop`; calls `on_commit(i)` as each commit into database `i` returns.
/// For `bench cost` and `bench loss`.
pub(crate) fn spawn_hot_writer(
    root: PathBuf,
    hot: usize,
    stop: Arc<AtomicBool>,
    mut on_commit: impl FnMut(usize) + Send + 'static,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || -> Result<()> {
        let conns = (0..hot)
            .map(|i| open_writer(&soak_path(&root, i)))
            .collect::<Result<Vec<_>>>()?;
        let begin = Instant::now();
        let mut second = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (i, c) in conns.iter().enumerate() {
                let at = Duration::from_secs(second)
                    + Duration::from_secs_f64(i as f64 / hot.max(1) as f64);
                if let Some(wait) = at.checked_sub(begin.elapsed()) {
                    std::thread::sleep(wait);
                }
                c.execute("INSERT INTO t(v) VALUES ('hot')", [])
                    .map_err(|e| Error::sqlite(soak_path(&root, i), e))?;
                on_commit(i);
            }
            second += 1;
        }
        Ok(())
    })
}

fn count(path: &Path) -> Result<i64> {
    let c = rusqlite::Connection::open(path).map_err(|e| Error::sqlite(path, e))?;
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .map_err(|e| Error::sqlite(path, e))
}

/// Sets the modification time of the fleet's databases `ids` and their
/// `-wal` files (where there is one) to an hour ago: written long ago, as far
/// as change detection can tell (blocking).
pub(crate) fn age_databases(root: &Path, ids: std::ops::Range<usize>) -> Result<()> {
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for i in ids {
        let db = soak_path(root, i);
        let wal = crate::source::discover::wal_path(&db);
        for p in [db, wal] {
            if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                f.set_modified(past).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    Ok(())
}

/// Creates `n` WAL databases of one row each under `root/data/g<i/100>/`
/// ([`soak_path`]), for `soak` and `bench cost`.
pub(crate) async fn create_fleet(root: &Path, n: usize, what: &'static str) -> Result<()> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<()> {
        for i in 0..n {
            let p = soak_path(&root, i);
            if i % 100 == 0 {
                let d = p.parent().expect("has parent");
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            let c = open_writer(&p)?;
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t(v) VALUES ('seed');",
            )
            .map_err(|e| Error::sqlite(&p, e))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::invalid(what, e.to_string()))?
}

/// Runs a soak: creates the fleet, writes and replicates under faults for
/// `duration`, drains, restores everything and compares row counts.
pub async fn soak(opts: SoakOptions) -> Result<SoakReport> {
    // Absolute: the generated config's `file://` URL and patterns take it
    // as written (black-box probe U31, F9: a relative `--dir` made
    // `file://rel/replica`, a remote host, and the run refused its own
    // config).
    let root = std::path::absolute(&opts.dir).map_err(|e| Error::io(&opts.dir, e))?;
    let n = opts.databases;
    create_fleet(&root, n, "bench soak").await?;
    tracing::info!(databases = n, dir = %root.display(), "fleet ready");

    let yaml = format!(
        "multi-db:\n  patterns: [\"{}/data/*/*.db\"]\n  scan-interval: {SOAK_SCAN_INTERVAL}\n  max-concurrent: 100\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    url: file://{}\n    path: \"{{{{group}}}}/{{{{db}}}}\"\n",
        root.display(),
        root.join("tmp").display(),
        root.join("state").display(),
        root.join("replica").display(),
    );
    let loaded = Loaded::from_str(&yaml, "bench-soak.yml", &root)?;
    let plain = loaded.open_replica()?;
    let faulty = Arc::new(FaultyStore::new(plain.store.clone()));
    let replicator = Arc::new(Replicator::with_replica(
        loaded.clone(),
        plain.clone().with_store(faulty.clone()),
    )?);

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..opts.writers.max(1) {
        let (stop, writes, root) = (stop.clone(), writes.clone(), root.clone());
        writers.push(std::thread::spawn(move || -> Result<()> {
            let mut seq = (w as u64) << 40;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let r = splitmix(seq);
                let p = soak_path(&root, (r % n as u64) as usize);
                let c = open_writer(&p)?;
                let rows = 1 + (r >> 32) % 3;
                c.execute_batch("BEGIN").map_err(|e| Error::sqlite(&p, e))?;
                for _ in 0..rows {
                    c.execute("INSERT INTO t(v) VALUES ('soak')", [])
                        .map_err(|e| Error::sqlite(&p, e))?;
                }
                c.execute_batch("COMMIT")
                    .map_err(|e| Error::sqlite(&p, e))?;
                writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }

    let cancel = CancellationToken::new();
    let run = tokio::spawn(replicator.clone().run(false, cancel.clone()));
    let started = Instant::now();
    let mut faulty_window = false;
    while started.elapsed() < opts.duration {
        faulty_window = !faulty_window;
        faulty.set_rate(if faulty_window {
            FAULT_RATE_PER_MILLE
        } else {
            0
        });
        tokio::time::sleep(FAULT_WINDOW.min(opts.duration.saturating_sub(started.elapsed()))).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join()
            .map_err(|_| Error::invalid("bench soak", "writer thread panicked"))??;
    }
    faulty.set_rate(0);
    cancel.cancel();
    let _ = run.await;
    let duration = started.elapsed();

    // Drain: past the racy window, cycles until nothing is pending.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let token = CancellationToken::new();
    for _ in 0..10 {
        let r = replicator.cycle(&token).await;
        if r.scan.pending == 0 || (r.uploaded == 0 && r.failed == 0) {
            break;
        }
    }
    let stats = replicator.stats();
    tracing::info!("soak done; restoring every database");

    let restore_start = Instant::now();
    let out = root.join("restored");
    let _ = std::fs::remove_dir_all(&out);
    let loaded = Arc::new(loaded);
    let plain = Arc::new(plain);
    let mut mismatched = Vec::new();
    let mut exact = 0;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        while set.len() >= RESTORE_CONCURRENCY {
            tally(set.join_next().await, &mut exact, &mut mismatched);
        }
        let (loaded, plain, out) = (loaded.clone(), plain.clone(), out.clone());
        let src = soak_path(&root, i);
        set.spawn(async move {
            let (key, _) = key_for(&loaded.patterns, &loaded.template, &src)
                .expect("soak path matches its pattern");
            let output = out.join(format!("{i}.db"));
            let opts = RestoreOptions {
                target: key.clone(),
                output: output.clone(),
                timestamp: None,
                if_replica_exists: false,
                if_db_not_exists: false,
                allow_older: false,
            };
            let r = restore::restore(&loaded, &plain, &opts).await;
            let ok = matches!(r, Ok(RestoreOutcome::Restored { .. }))
                && tokio::task::spawn_blocking(move || {
                    let source = count(&src).ok();
                    source.is_some() && source == count(&output).ok()
                })
                .await
                .unwrap_or(false);
            (key, ok)
        });
    }
    while !set.is_empty() {
        tally(set.join_next().await, &mut exact, &mut mismatched);
    }
    Ok(SoakReport {
        databases: n,
        duration_seconds: duration.as_secs_f64(),
        writes: writes.load(Ordering::Relaxed),
        faults_injected: faulty.faults(),
        uploads_ok: stats.uploads_ok.load(Ordering::Relaxed),
        uploads_failed: stats.uploads_failed.load(Ordering::Relaxed),
        cycles: stats.scans.load(Ordering::Relaxed),
        restored_exactly: exact,
        mismatched,
        restore_seconds: restore_start.elapsed().as_secs_f64(),
    })
}

fn tally(
    done: Option<std::result::Result<(String, bool), tokio::task::JoinError>>,
    exact: &mut usize,
    mismatched: &mut Vec<String>,
) {
    match done {
        Some(Ok((_, true))) => *exact += 1,
        Some(Ok((key, false))) => mismatched.push(key),
        Some(Err(e)) => mismatched.push(format!("(task failed: {e})")),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn requests_are_counted_by_price_class() {
        let store = FaultyStore::new(Arc::new(object_store::memory::InMemory::new()));
        let (a, b) = (ObjPath::from("k/a"), ObjPath::from("k/b"));
        store.put(&a, b"x".to_vec().into()).await.unwrap();
        store.put(&b, b"y".to_vec().into()).await.unwrap();
        store.get(&a).await.unwrap();
        store
            .list_with_delimiter(Some(&ObjPath::from("k")))
            .await
            .unwrap();
        let listed: Vec<_> = store.list(Some(&ObjPath::from("k"))).collect().await;
        assert_eq!(listed.len(), 2);
        let gone: Vec<_> = store
            .delete_stream(futures::stream::iter([Ok(a.clone()), Ok(b.clone())]).boxed())
            .collect()
            .await;
        assert!(gone.iter().all(|r| r.is_ok()));
        assert_eq!(
            store.requests(),
            Requests {
                put: 2,
                get: 1,
                list: 2,
                delete: 2
            }
        );
        // An injected fault is not a request that reached the store.
        store.set_rate(1000);
        assert!(store.get(&a).await.is_err());
        assert_eq!(store.requests().get, 1);
    }
}
