//! Restore and listing: from the replica back to a database file.
//!
//! A database key (`p1/orders/main/t1`) can have backups in two tiers:
//!
//! * **cold**: hourly snapshots `<key>/<stem>-YYYYMMDD-HH0000.db.lz4`
//!   ([`crate::layout`]);
//! * **hot**: WAL generations `<key>/generations/<gen>/...`, a snapshot plus
//!   the WAL segments shipped after it ([`crate::generation`]).
//!
//! `restore` resolves what the user named (a key, or the path of a database
//! that one of the patterns matches) to a key and finds, at the restore time
//! `T` (`--timestamp`, or now):
//!
//! * the newest cold snapshot uploaded at or before `T` ([`choose`]);
//! * the newest generation restore point at or before `T`
//!   ([`generation::plan_latest`]): the newest generation with a snapshot
//!   uploaded at or before `T`, that snapshot and its segments uploaded at or
//!   before `T`.
//!
//! Both are decided from listings alone, nothing is downloaded to choose.
//! Whichever represents the **later state** is restored ([`choose_tier`]):
//! a cold snapshot's state is its upload time, a generation restore point's
//! is the latest upload time of the snapshot and segments it uses
//! ([`generation::Plan::time`]). On a tie the generation wins. Either way the
//! output is written atomically:
//!
//! 1. write it into a temporary file next to the output: stream a cold
//!    snapshot through the LZ4 frame decoder, or download the generation
//!    snapshot and replay its WAL segments ([`generation::restore_plan`]);
//!    LZ4 content checksums are verified by the decoder,
//! 2. `fsync` it, check the SQLite header and run `PRAGMA integrity_check`,
//! 3. rename it over the output name and `fsync` the directory.
//!
//! A crash or an error at any point leaves either no output or a complete,
//! checked one.
//!
//! Failures:
//!
//! * A damaged **cold** snapshot (LZ4 checksum or integrity check fails) is
//!   skipped with a warning and the choice is made again without it: the
//!   next older cold snapshot, or the generation if that is now the later
//!   state.
//! * Any failure of the **hot** tier once it was chosen (a gap in the WAL
//!   segments, a broken checksum chain, a damaged generation snapshot or
//!   segment, a failed integrity check) fails the restore loudly. It never
//!   falls back to an older cold snapshot by itself: that would silently
//!   restore an older state than the replica claims to hold, and a damaged
//!   generation cannot be told apart from a broken one by its error. The
//!   error names the cold snapshot that could be restored instead and how
//!   (`--timestamp` at its upload time, or `lz4 -d` of the object).
//! * Nothing in either tier at or before `T` is [`Error::NotFound`] (or
//!   [`RestoreOutcome::NoReplica`] with `--if-replica-exists`).
//!
//! Point in time: an object's `last_modified` is when its upload finished,
//! which is after the copy was taken (cold) or the frames were committed
//! (hot), so "uploaded at or before T" guarantees the output holds nothing
//! written after T.
//!
//! Listing ([`list_databases`], [`list`]) reads every object under a prefix
//! once, as a stream: cold snapshots give their key (or `dir/stem` when
//! several databases share a directory); hot-tier objects
//! (`<key>/generations/<gen>/...`) give `<key>`, never a key of their own,
//! and only the generation ids are kept, so memory per key stays small
//! however many WAL segments there are. A key with generations but no cold
//! snapshot is listed too.
//!
//! Bulk restore ([`restore_bulk`]) restores every database under a key prefix
//! into a directory that mirrors the keys (`DIR/<key>.db`), a bounded number
//! at a time, each with the same cold-or-hot choice (a key's generations are
//! listed and planned when it is restored, and only if the listing saw any).
//! One database failing (a bad key, a corrupt snapshot, a gap, an existing
//! output) is reported and the others go on. Keys come from object
//! names, which anyone with write access to the bucket controls, so every
//! key is checked before it becomes a path: no `.`, `..` or empty segments,
//! not absolute, no backslash ([`output_path`]), and the result must stay inside
//! the directory.
//!
//! Progress is reported through hooks ([`OnBytes`] for one download,
//! [`BulkProgress`] for a bulk restore); this module never draws anything.
//! [`crate::progress`] decides between a terminal bar and log lines. A
//! generation restore reports its compressed size (snapshot and segments) at
//! the start and at the end only.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStoreExt};
use tempfile::TempPath;

use crate::config::Loaded;
use crate::error::IoContext;
use crate::generation::{self, GenerationId, Plan, RestorePoint};
use crate::keys::key_for;
use crate::layout::{key_path, parse_snapshot_name};
use crate::snapshot;
use crate::storage::Replica;
use crate::{Error, Result};

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// A database key, or a path matched by one of the patterns.
    pub target: String,
    pub output: PathBuf,
    pub timestamp: Option<DateTime<Utc>>,
    /// Succeed quietly when the replica has no snapshot.
    pub if_replica_exists: bool,
    /// Succeed quietly when the output already exists.
    pub if_db_not_exists: bool,
}

/// Which tier of the replica a database was restored from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// An hourly snapshot (`<key>/<stem>-YYYYMMDD-HH0000.db.lz4`).
    Cold,
    /// A WAL generation: its snapshot plus the WAL segments replayed onto it.
    Hot,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Cold => "cold",
            Tier::Hot => "hot",
        })
    }
}

/// How a restore ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    Restored {
        key: String,
        tier: Tier,
        /// The cold snapshot object, or the generation snapshot object and
        /// the number of WAL segments replayed (`<path> + 3 WAL segments`).
        object: String,
        /// Size of the restored database file.
        bytes: u64,
        /// The state restored, as an upload time: the cold snapshot's, or the
        /// latest of the generation snapshot and segments used.
        uploaded: DateTime<Utc>,
    },
    OutputExists,
    NoReplica,
}

/// One snapshot object of a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub location: ObjPath,
    pub stem: String,
    pub hour: DateTime<Utc>,
    pub uploaded: DateTime<Utc>,
    pub size: u64,
}

/// Databases restored at once by a bulk restore unless told otherwise. Each
/// one is a GET stream plus a blocking decompress-and-check thread; 16 keeps
/// a link busy with small databases without oversubscribing a small host.
pub const DEFAULT_BULK_CONCURRENCY: usize = 16;

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key", "empty key"));
    }
    if key.starts_with('/')
        || key
            .split('/')
            .any(|p| p == ".." || p == "." || p.is_empty())
        || key.contains('\\')
    {
        return Err(Error::invalid(
            format!("key {key:?}"),
            "must be relative and must not contain `.`, `..` or empty segments or `\\`",
        ));
    }
    Ok(())
}

/// Where bulk restore writes the database with `key`: `dir/<key>.db`, the
/// key's segments as directories and its last segment + `.db` as the file.
/// Refuses any key that could name a path outside `dir`.
pub fn output_path(dir: &Path, key: &str) -> Result<PathBuf> {
    check_key(key)?;
    let mut out = dir.to_path_buf();
    let mut parts = key.split('/').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_some() {
            out.push(part);
        } else {
            out.push(format!("{part}.db"));
        }
    }
    // check_key leaves only normal segments; make sure the OS agrees.
    let inside = out
        .strip_prefix(dir)
        .map(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))))
        .unwrap_or(false);
    if !inside {
        return Err(Error::invalid(
            format!("key {key:?}"),
            format!("would be restored outside {}", dir.display()),
        ));
    }
    Ok(out)
}

/// Resolves a restore target (key or database path) to a key.
pub fn resolve_key(loaded: &Loaded, target: &str) -> Result<String> {
    let p = Path::new(target);
    let looks_like_path =
        p.is_absolute() || target.starts_with("./") || target.starts_with("../") || p.exists();
    if looks_like_path {
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let abs: PathBuf = abs
            .components()
            .filter(|c| *c != Component::CurDir)
            .collect();
        let key = key_for(loaded, &abs).map(|(k, _)| k).ok_or_else(|| {
            Error::invalid(
                abs.display(),
                "is not matched by any pattern in the config; pass its replica key instead (see `litefleet list`)",
            )
        })?;
        if let Some(other) = crate::keys::shared_with(loaded, &abs) {
            return Err(Error::invalid(
                abs.display(),
                format!(
                    "shares its replica key {key:?} with {}, so the replica holds only one of \
                     them (the first one found; the other is refused and logged by `replicate`); \
                     restore by key and check which, and give each database its own key",
                    other.display()
                ),
            ));
        }
        return Ok(key);
    }
    let key = target.trim_matches('/').to_string();
    check_key(&key)?;
    Ok(key)
}

fn to_info(meta: ObjectMeta) -> Option<SnapshotInfo> {
    let name = parse_snapshot_name(meta.location.filename()?)?;
    Some(SnapshotInfo {
        stem: name.stem,
        hour: name.hour,
        uploaded: meta.last_modified,
        size: meta.size,
        location: meta.location,
    })
}

/// The snapshots of the database with `key`, oldest first.
///
/// A key usually names a directory holding one database's snapshots. If two
/// databases share a directory (different stems), `dir/stem` selects one.
pub async fn snapshots(replica: &Replica, key: &str) -> Result<Vec<SnapshotInfo>> {
    check_key(key)?;
    let mut found: Vec<SnapshotInfo> = replica
        .list_dir(&key_path(&replica.prefix, key))
        .await?
        .into_iter()
        .filter_map(to_info)
        .collect();
    if found.is_empty() {
        if let Some((dir, stem)) = key.rsplit_once('/') {
            found = replica
                .list_dir(&key_path(&replica.prefix, dir))
                .await?
                .into_iter()
                .filter_map(to_info)
                .filter(|s| s.stem == stem)
                .collect();
        }
    }
    let mut stems: Vec<&str> = found.iter().map(|s| s.stem.as_str()).collect();
    stems.sort_unstable();
    stems.dedup();
    if stems.len() > 1 {
        return Err(Error::invalid(
            format!("key {key:?}"),
            format!(
                "holds snapshots of several databases; name one of: {}",
                stems
                    .iter()
                    .map(|s| format!("{key}/{s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    found.sort_by_key(|s| (s.hour, s.uploaded));
    Ok(found)
}

/// Picks the snapshot to restore: the newest, or the newest uploaded at or before `at`.
pub fn choose(snaps: &[SnapshotInfo], at: Option<DateTime<Utc>>) -> Option<&SnapshotInfo> {
    snaps
        .iter()
        .filter(|s| at.is_none_or(|t| s.uploaded <= t))
        .max_by_key(|s| (s.hour, s.uploaded))
}

/// Picks the tier holding the later state, given the upload time of the
/// chosen cold snapshot and the [`Plan::time`] of the chosen generation
/// restore point (each `None` when that tier has nothing). A tie goes to the
/// hot tier: its state is at least as new and it is never older than the
/// point in time asked for.
pub fn choose_tier(cold: Option<DateTime<Utc>>, hot: Option<DateTime<Utc>>) -> Option<Tier> {
    match (cold, hot) {
        (Some(c), Some(h)) if c > h => Some(Tier::Cold),
        (_, Some(_)) => Some(Tier::Hot),
        (Some(_), None) => Some(Tier::Cold),
        (None, None) => None,
    }
}

/// What a database is restored from.
enum Source<'a> {
    Cold(&'a SnapshotInfo),
    Hot(&'a Plan),
}

fn pick<'a>(cold: Option<&'a SnapshotInfo>, hot: Option<&'a Plan>) -> Option<Source<'a>> {
    match choose_tier(cold.map(|s| s.uploaded), hot.map(Plan::time))? {
        Tier::Cold => cold.map(Source::Cold),
        Tier::Hot => hot.map(Source::Hot),
    }
}

/// `<generation snapshot> + N WAL segments`: what a hot restore used.
fn describe_plan(plan: &Plan) -> String {
    let n = plan.segments.len();
    let s = if n == 1 { "" } else { "s" };
    format!("{} + {n} WAL segment{s}", plan.snapshot.location)
}

/// Download progress hook: called with (compressed bytes received so far,
/// compressed object size) as the object streams in.
pub type OnBytes = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Restores one database.
pub async fn restore(
    loaded: &Loaded,
    replica: &Replica,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome> {
    restore_with_progress(loaded, replica, opts, None).await
}

/// [`restore`], reporting download progress to `on_bytes`.
pub async fn restore_with_progress(
    loaded: &Loaded,
    replica: &Replica,
    opts: &RestoreOptions,
    on_bytes: Option<OnBytes>,
) -> Result<RestoreOutcome> {
    let key = resolve_key(loaded, &opts.target)?;
    if opts.output.exists() {
        if opts.if_db_not_exists {
            return Ok(RestoreOutcome::OutputExists);
        }
        return Err(Error::invalid(
            opts.output.display(),
            "already exists; remove it or pass --if-db-not-exists",
        ));
    }
    let snaps = snapshots(replica, &key).await?;
    let at = opts.timestamp;
    match restore_key(replica, &key, snaps, true, at, &opts.output, on_bytes).await? {
        Some(r) => Ok(RestoreOutcome::Restored {
            key,
            tier: r.tier,
            object: r.object,
            bytes: r.bytes,
            uploaded: r.uploaded,
        }),
        None if opts.if_replica_exists => Ok(RestoreOutcome::NoReplica),
        None => Err(Error::NotFound(format!(
            "no snapshot or WAL generation of {key:?}{} in {replica}",
            uploaded_by(at)
        ))),
    }
}

/// ` uploaded at or before <at>` for messages about what a restore at `at`
/// found nothing of; empty for the latest state.
pub(crate) fn uploaded_by(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| format!(" uploaded at or before {}", t.to_rfc3339()))
        .unwrap_or_default()
}

/// What [`restore_key`] installed.
struct Restored {
    tier: Tier,
    object: String,
    bytes: u64,
    uploaded: DateTime<Utc>,
}

/// Restores `key` at `at` into `output` from the tier holding the later
/// state (see the module docs); `Ok(None)` when neither tier has anything at
/// or before `at`. `snaps` are its cold snapshots; its generations are only
/// listed when `hot` is set.
///
/// A damaged cold snapshot (a partial write by a store without atomic PUT,
/// bit rot) fails the LZ4 content checksum recorded at upload or the
/// integrity check, so it is never installed: it is dropped, the choice is
/// made again and the fallback is logged as a warning. Store and local I/O
/// errors are not damage and stop the restore, and so does any failure of
/// the hot tier (see [`hot_failed`]).
async fn restore_key(
    replica: &Replica,
    key: &str,
    mut snaps: Vec<SnapshotInfo>,
    hot: bool,
    at: Option<DateTime<Utc>>,
    output: &Path,
    on_bytes: Option<OnBytes>,
) -> Result<Option<Restored>> {
    let plan = if hot {
        generation::plan_latest(replica, key, at)
            .await
            .map_err(|e| hot_failed(e, choose(&snaps, at)))?
    } else {
        None
    };
    let mut damaged: Option<(SnapshotInfo, Error)> = None;
    loop {
        let cold = choose(&snaps, at);
        let source = pick(cold, plan.as_ref());
        if let Some((bad, e)) = damaged.take() {
            let fallback = match &source {
                None => return Err(e),
                Some(Source::Cold(s)) => s.location.to_string(),
                Some(Source::Hot(p)) => describe_plan(p),
            };
            tracing::warn!(object = %bad.location, error = %e, %fallback, "snapshot is damaged; restoring the next older state");
        }
        let snap = match source {
            None => return Ok(None),
            Some(Source::Hot(p)) => {
                return match install_plan(replica, key, p, output, on_bytes).await {
                    Ok(point) => Ok(Some(Restored {
                        tier: Tier::Hot,
                        object: describe_plan(p),
                        bytes: point.bytes,
                        uploaded: point.time,
                    })),
                    Err(e) => Err(hot_failed(e, cold)),
                };
            }
            Some(Source::Cold(s)) => s.clone(),
        };
        match fetch_to_with_progress(replica, &snap.location, output, on_bytes.clone()).await {
            Ok(bytes) => {
                return Ok(Some(Restored {
                    tier: Tier::Cold,
                    object: snap.location.to_string(),
                    bytes,
                    uploaded: snap.uploaded,
                }))
            }
            Err(e @ (Error::Invalid { .. } | Error::Sqlite { .. })) => {
                snaps.retain(|s| s.location != snap.location);
                damaged = Some((snap, e));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The error of a failed hot-tier restore. Damage (a gap, a broken chain, a
/// bad object, a failed check) is never papered over with an older cold
/// snapshot; when there is one, the error says how to restore it on
/// purpose. Store and local I/O errors are returned as they are.
fn hot_failed(e: Error, cold: Option<&SnapshotInfo>) -> Error {
    match (&e, cold) {
        (Error::Invalid { .. } | Error::Sqlite { .. }, Some(c)) => {
            let t = c
                .uploaded
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            Error::invalid(
                "hot-tier restore (WAL generation)",
                format!(
                    "{e}; not falling back to the older cold snapshot {} (uploaded {t}) by \
                     itself: to restore that one, pass --timestamp {t}, or decompress the \
                     object with `lz4 -d`",
                    c.location
                ),
            )
        }
        _ => e,
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::invalid("restore", format!("task failed: {e}")))?
}

/// The output being written: a temporary file next to it that becomes the
/// output only once complete and checked ([`Staged::install`]). Dropped
/// without installing, it deletes the temporary file.
struct Staged {
    file: File,
    tmp: TempPath,
    output: PathBuf,
}

impl Staged {
    /// Creates the output's directory and the temporary file (blocking).
    fn new(output: &Path) -> Result<Staged> {
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).at(dir)?;
        }
        let (file, tmp) = snapshot::temp_sibling(output)?;
        Ok(Staged {
            file,
            tmp,
            output: output.to_path_buf(),
        })
    }

    /// `fsync`s the temporary file, checks the SQLite header and runs
    /// `PRAGMA integrity_check`, renames it over the output and `fsync`s the
    /// directory (blocking). `what` names the source in errors.
    fn install(self, what: &str) -> Result<()> {
        let Staged { file, tmp, output } = self;
        file.sync_all().at(&*tmp)?;
        drop(file);
        if !crate::discover::has_sqlite_header(&tmp).at(&*tmp)? {
            return Err(Error::invalid(
                what,
                "restored data is not a SQLite database",
            ));
        }
        snapshot::integrity_check(&tmp)?;
        tmp.persist(&output)
            .map_err(|e| Error::io(&output, e.error))?;
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
        }
        Ok(())
    }
}

/// Restores a generation plan of `key` and installs it at `output` like a
/// cold snapshot ([`Staged`]). Progress: the plan's compressed size at the
/// start and at the end.
async fn install_plan(
    replica: &Replica,
    key: &str,
    plan: &Plan,
    output: &Path,
    on_bytes: Option<OnBytes>,
) -> Result<RestorePoint> {
    let total = plan.snapshot.size + plan.segments.iter().map(|s| s.size).sum::<u64>();
    let progress = |n| {
        if let Some(f) = &on_bytes {
            f(n, total)
        }
    };
    progress(0);
    let out = output.to_path_buf();
    let mut staged = blocking(move || Staged::new(&out)).await?;
    let point = generation::restore_plan(replica, key, plan, &mut staged.file).await?;
    let what = format!("generation {} of {key:?}", plan.generation);
    blocking(move || staged.install(&what)).await?;
    progress(total);
    Ok(point)
}

/// Downloads, decompresses, checks and atomically installs one snapshot at `output`.
pub async fn fetch_to(replica: &Replica, location: &ObjPath, output: &Path) -> Result<u64> {
    fetch_to_with_progress(replica, location, output, None).await
}

/// [`fetch_to`], calling `on_bytes` as compressed bytes arrive.
pub async fn fetch_to_with_progress(
    replica: &Replica,
    location: &ObjPath,
    output: &Path,
    on_bytes: Option<OnBytes>,
) -> Result<u64> {
    let got = replica
        .store
        .get(location)
        .await
        .map_err(|e| Error::store(location, e))?;
    let total = got.meta.size;
    let mut received = 0u64;
    let stream = got
        .into_stream()
        .inspect_ok(move |chunk| {
            if let Some(f) = &on_bytes {
                received += chunk.len() as u64;
                f(received, total);
            }
        })
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::StreamReader::new(stream);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let output = output.to_path_buf();
    let what = location.to_string();
    blocking(move || {
        let mut staged = Staged::new(&output)?;
        let n = snapshot::decompress(bridge, &what, &mut staged.file)?;
        staged.install(&what)?;
        Ok(n)
    })
    .await
}

/// What the replica holds for one database key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyListing {
    /// Cold snapshots, oldest first; empty for a key with only generations.
    pub snapshots: Vec<SnapshotInfo>,
    /// Its generations that hold at least one snapshot, newest first. Only
    /// the ids: their segments are listed when the key is restored.
    pub generations: Vec<GenerationId>,
}

/// Whether `dir` (a path relative to the replica prefix) is a generation's
/// directory or one of its `snapshots`/`wal` directories: nothing in there
/// is a cold snapshot or names a key of its own.
fn in_generation(dir: &str) -> bool {
    let mut up = dir.rsplit('/');
    let is_gen = |p: Option<&str>| p.and_then(GenerationId::parse).is_some();
    let is = |p: Option<&str>, name: &str| p == Some(name);
    match up.next() {
        Some(generation::SNAPSHOTS_DIR | generation::WAL_DIR) => {
            is_gen(up.next()) && is(up.next(), generation::GENERATIONS_DIR)
        }
        last => is_gen(last) && is(up.next(), generation::GENERATIONS_DIR),
    }
}

/// The key and generation of a generation snapshot object
/// (`<key>/generations/<gen>/snapshots/<index>.snapshot.lz4`, relative to
/// the replica prefix); `None` for any other object.
fn generation_snapshot(rel: &str) -> Option<(&str, GenerationId)> {
    let mut up = rel.rsplitn(5, '/');
    let name = up.next()?;
    let dir = up.next()?;
    let gen = GenerationId::parse(up.next()?)?;
    let gens = up.next()?;
    let key = up.next()?;
    let shape = dir == generation::SNAPSHOTS_DIR
        && gens == generation::GENERATIONS_DIR
        && generation::parse_snapshot_name(name).is_some();
    (shape && !key.is_empty()).then_some((key, gen))
}

/// Databases in the replica, optionally under `prefix`: every key with a
/// cold snapshot or a generation snapshot (see the module docs).
pub async fn list_databases(
    replica: &Replica,
    prefix: Option<&str>,
) -> Result<BTreeMap<String, KeyListing>> {
    let root = match prefix {
        Some(p) if !p.trim_matches('/').is_empty() => {
            let p = p.trim_matches('/');
            check_key(p)?;
            key_path(&replica.prefix, p)
        }
        _ => replica.prefix.clone(),
    };
    let base = replica.prefix.as_ref().len();
    let mut cold: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
    let mut hot: BTreeMap<String, BTreeSet<GenerationId>> = BTreeMap::new();
    let mut stream = replica.list_all(&root);
    while let Some(meta) = stream.try_next().await? {
        let loc = meta.location.as_ref();
        let rel = loc.get(base..).unwrap_or("").trim_start_matches('/');
        if let Some((key, gen)) = generation_snapshot(rel) {
            hot.entry(key.to_string()).or_default().insert(gen);
            continue;
        }
        let dir = rel.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        if in_generation(dir) {
            continue;
        }
        let dir = dir.to_string();
        if let Some(info) = to_info(meta) {
            cold.entry(dir).or_default().push(info);
        }
    }
    let mut out: BTreeMap<String, KeyListing> = BTreeMap::new();
    // A directory holding several databases' snapshots lists them as dir/stem.
    for (key, mut snaps) in cold {
        snaps.sort_by_key(|s| (s.hour, s.uploaded));
        let first = snaps[0].stem.clone();
        if snaps.iter().all(|s| s.stem == first) {
            out.entry(key).or_default().snapshots = snaps;
        } else {
            for s in snaps {
                let k = if key.is_empty() {
                    s.stem.clone()
                } else {
                    format!("{key}/{}", s.stem)
                };
                out.entry(k).or_default().snapshots.push(s);
            }
        }
    }
    for (key, gens) in hot {
        out.entry(key).or_default().generations = gens.into_iter().collect();
    }
    Ok(out)
}

/// Databases in the replica (key -> cold snapshots, oldest first),
/// optionally under `prefix`. Keys with only WAL generations are included
/// with no snapshots; [`list_databases`] also names their generations.
pub async fn list(
    replica: &Replica,
    prefix: Option<&str>,
) -> Result<BTreeMap<String, Vec<SnapshotInfo>>> {
    Ok(list_databases(replica, prefix)
        .await?
        .into_iter()
        .map(|(k, l)| (k, l.snapshots))
        .collect())
}

/// What to restore in bulk and how.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// Key prefix (`p1/orders`); empty or `/` for the whole replica.
    pub prefix: String,
    /// Directory the keys are mirrored into.
    pub output_dir: PathBuf,
    pub timestamp: Option<DateTime<Utc>>,
    /// Databases restored at once (at least 1).
    pub concurrency: usize,
    /// Skip databases whose output already exists (else they fail).
    pub if_db_not_exists: bool,
    /// Succeed with nothing to do when the prefix holds no database (else an error).
    pub if_replica_exists: bool,
}

/// How one database of a bulk restore ended.
#[derive(Debug)]
pub enum BulkOutcome {
    /// Fields as in [`RestoreOutcome::Restored`].
    Restored {
        tier: Tier,
        object: String,
        bytes: u64,
        uploaded: DateTime<Utc>,
    },
    /// The output exists and `if_db_not_exists` was given.
    SkippedExists,
    /// Neither tier has a snapshot uploaded at or before `--timestamp` (the
    /// database is newer).
    SkippedNoSnapshotAtTime,
    Failed(Error),
}

/// One database of a bulk restore, as reported to [`BulkProgress::finished`].
#[derive(Debug)]
pub struct BulkItem {
    pub key: String,
    /// `None` when the key was refused before it became a path.
    pub output: Option<PathBuf>,
    pub outcome: BulkOutcome,
}

/// Totals of a bulk restore; `failed` holds (key, error) in completion order.
#[derive(Debug, Default)]
pub struct BulkReport {
    pub databases: usize,
    pub restored: usize,
    /// How many of `restored` came from the hot tier (WAL generations).
    pub restored_hot: usize,
    pub skipped: usize,
    pub failed: Vec<(String, Error)>,
    /// Decompressed bytes written.
    pub bytes: u64,
}

/// Receives bulk restore progress (implemented by [`crate::progress`]).
pub trait BulkProgress: Send + Sync {
    /// The listing is done: `total` databases will be restored.
    fn started(&self, total: usize);
    /// One database is done (restored, skipped or failed).
    fn finished(&self, item: &BulkItem);
}

/// A [`BulkProgress`] that reports nothing.
pub struct NoProgress;

impl BulkProgress for NoProgress {
    fn started(&self, _: usize) {}
    fn finished(&self, _: &BulkItem) {}
}

async fn restore_one(
    replica: &Replica,
    opts: &BulkOptions,
    key: String,
    listed: KeyListing,
) -> BulkItem {
    let output = match output_path(&opts.output_dir, &key) {
        Ok(p) => p,
        Err(e) => {
            return BulkItem {
                key,
                output: None,
                outcome: BulkOutcome::Failed(e),
            }
        }
    };
    let outcome = if output.exists() {
        if opts.if_db_not_exists {
            BulkOutcome::SkippedExists
        } else {
            BulkOutcome::Failed(Error::invalid(
                output.display(),
                "already exists; remove it or pass --if-db-not-exists",
            ))
        }
    } else {
        let hot = !listed.generations.is_empty();
        let at = opts.timestamp;
        match restore_key(replica, &key, listed.snapshots, hot, at, &output, None).await {
            Ok(None) => BulkOutcome::SkippedNoSnapshotAtTime,
            Ok(Some(r)) => BulkOutcome::Restored {
                tier: r.tier,
                object: r.object,
                bytes: r.bytes,
                uploaded: r.uploaded,
            },
            Err(e) => BulkOutcome::Failed(e),
        }
    };
    BulkItem {
        key,
        output: Some(output),
        outcome,
    }
}

/// Restores every database under `opts.prefix` into `opts.output_dir`.
///
/// Errors only when nothing can be attempted (bad prefix, listing failed, no
/// database under the prefix); per-database failures are in the report.
pub async fn restore_bulk(
    replica: &Replica,
    opts: &BulkOptions,
    progress: &dyn BulkProgress,
) -> Result<BulkReport> {
    let prefix = opts.prefix.trim_matches('/');
    let dbs = list_databases(replica, Some(prefix)).await?;
    let mut report = BulkReport {
        databases: dbs.len(),
        ..BulkReport::default()
    };
    if dbs.is_empty() {
        if opts.if_replica_exists {
            progress.started(0);
            return Ok(report);
        }
        let under = if prefix.is_empty() {
            String::new()
        } else {
            format!(" under prefix {prefix:?}")
        };
        return Err(Error::NotFound(format!("no databases{under} in {replica}")));
    }
    std::fs::create_dir_all(&opts.output_dir).at(&opts.output_dir)?;
    progress.started(dbs.len());
    let mut done = futures::stream::iter(dbs)
        .map(|(key, listed)| restore_one(replica, opts, key, listed))
        .buffer_unordered(opts.concurrency.max(1));
    while let Some(item) = done.next().await {
        progress.finished(&item);
        match item.outcome {
            BulkOutcome::Restored { tier, bytes, .. } => {
                report.restored += 1;
                report.restored_hot += usize::from(tier == Tier::Hot);
                report.bytes += bytes;
            }
            BulkOutcome::SkippedExists | BulkOutcome::SkippedNoSnapshotAtTime => {
                report.skipped += 1
            }
            BulkOutcome::Failed(e) => report.failed.push((item.key, e)),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn snap(hour: u32, up_min: u32) -> SnapshotInfo {
        SnapshotInfo {
            location: ObjPath::from(format!("k/x-202611220{hour}0000.db.lz4")),
            stem: "x".into(),
            hour: Utc.with_ymd_and_hms(2026, 11, 22, hour, 0, 0).unwrap(),
            uploaded: Utc
                .with_ymd_and_hms(2026, 11, 22, hour - 1, up_min, 0)
                .unwrap(),
            size: 1,
        }
    }

    #[test]
    fn chooses_newest_at_or_before() {
        let s = vec![snap(2, 10), snap(3, 50), snap(4, 5)];
        assert_eq!(choose(&s, None).unwrap().hour, s[2].hour);
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 2, 55, 0).unwrap();
        assert_eq!(choose(&s, Some(t)).unwrap().hour, s[1].hour);
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 1, 9, 0).unwrap();
        assert!(choose(&s, Some(t)).is_none());
    }

    #[test]
    fn later_tier_wins_and_ties_go_to_the_generation() {
        let t = |m| Utc.with_ymd_and_hms(2026, 11, 22, 12, m, 0).unwrap();
        assert_eq!(choose_tier(None, None), None);
        assert_eq!(choose_tier(Some(t(5)), None), Some(Tier::Cold));
        assert_eq!(choose_tier(None, Some(t(5))), Some(Tier::Hot));
        assert_eq!(choose_tier(Some(t(6)), Some(t(5))), Some(Tier::Cold));
        assert_eq!(choose_tier(Some(t(5)), Some(t(6))), Some(Tier::Hot));
        assert_eq!(choose_tier(Some(t(5)), Some(t(5))), Some(Tier::Hot));
    }

    #[test]
    fn generation_objects_name_their_key_only() {
        let g = "fffffe6b2f5c7e1f0123abcd";
        let snap = format!("a/b/generations/{g}/snapshots/0000000000000003.snapshot.lz4");
        let (key, id) = generation_snapshot(&snap).unwrap();
        assert_eq!((key, id.as_str()), ("a/b", g));
        for other in [
            format!("a/b/generations/{g}/wal/0000000000000003_0000000000000020.wal.lz4"),
            format!("a/b/generations/{g}/metadata.json"),
            format!("generations/{g}/snapshots/0000000000000003.snapshot.lz4"),
            format!("a/b/generations/{g}x/snapshots/0000000000000003.snapshot.lz4"),
            format!("a/b/gens/{g}/snapshots/0000000000000003.snapshot.lz4"),
            "a/b/x-20261122-140000.db.lz4".to_string(),
        ] {
            assert!(generation_snapshot(&other).is_none(), "{other}");
        }
        for dir in [
            format!("a/generations/{g}"),
            format!("a/generations/{g}/snapshots"),
            format!("a/generations/{g}/wal"),
        ] {
            assert!(in_generation(&dir), "{dir}");
        }
        for dir in [
            "a/generations",
            "a/snapshots",
            "",
            "a/b",
            "generations/x/wal",
        ] {
            assert!(!in_generation(dir), "{dir}");
        }
    }

    #[test]
    fn keys_cannot_escape() {
        for bad in [
            "../etc",
            "a/../../b",
            "/abs",
            "a/./b",
            "a\\b",
            "",
            "a//b",
            "a/",
            "..",
        ] {
            assert!(check_key(bad).is_err(), "{bad}");
            assert!(output_path(Path::new("/out"), bad).is_err(), "{bad}");
        }
        check_key("p1/d1/main/t1").unwrap();
        assert_eq!(
            output_path(Path::new("/out"), "p1/d1/t1").unwrap(),
            Path::new("/out/p1/d1/t1.db")
        );
        assert_eq!(
            output_path(Path::new("out"), "..x/t").unwrap(),
            Path::new("out/..x/t.db")
        );
    }
}
