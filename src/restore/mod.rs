//! Restore and listing: from the replica back to a database file.
//!
//! A database key (`p1/orders/main/t1`) can have backups in two tiers:
//!
//! * **cold**: hourly snapshots `<key>/<stem>-YYYYMMDD-HH0000.db.lz4`
//!   ([`crate::replica::layout`]);
//! * **hot**: WAL generations `<key>/generations/<gen>/...`, a snapshot plus
//!   the WAL segments shipped after it ([`crate::replica::hot`]).
//!
//! `restore` resolves what the user named (a key, or the path of a database
//! that one of the patterns matches) to a key and finds, at the restore time
//! `T` (`--timestamp`, or now):
//!
//! * the newest cold snapshot taken at or before `T` (`choose_cold`): each
//!   cold object records when its copy began and was complete
//!   ([`snapshot::SnapshotTimes`], read with a ranged GET of its first
//!   bytes). An object named hour `H` was complete before `H`; objects
//!   without the record (earlier versions) are used only if `H <= T`;
//! * the newest generation restore point at or before `T`
//!   ([`hot::plan_latest`]): the newest generation with a snapshot
//!   committed at or before `T`, that snapshot and its segments committed at
//!   or before `T` (commit times are in the object names).
//!
//! The store's listing times are never used to decide what a restore at `T`
//! may include: S3 gives them in whole seconds.
//! Whichever represents the **later state** is restored ([`choose_tier`]):
//! a cold snapshot's state is when its copy began (it holds every commit
//! before), a generation restore point's is the commit time of the newest
//! object it uses ([`hot::Plan::time`]). On a tie the generation wins.
//! Either way the output is written atomically:
//!
//! 0. refuse an output that exists, and an output whose `-wal`, `-shm` or
//!    `-journal` exists: SQLite would replay or roll back such a leftover
//!    onto the restored file when it is first opened;
//! 1. write it into a temporary file next to the output: stream a cold
//!    snapshot through the LZ4 frame decoder, or download the generation
//!    snapshot and replay its WAL segments ([`hot::restore_plan`]);
//!    LZ4 content checksums are verified by the decoder,
//! 2. `fsync` it, check the SQLite header and run `PRAGMA integrity_check`,
//! 3. rename it to the output name **without replacing** anything (an output
//!    that appeared meanwhile is an error, never overwritten), `fsync` the
//!    directory, and check the database again at its final path
//!    (`quick_check`, with no side file present).
//!
//! A crash or an error at any point leaves either no output or a complete,
//! checked one.
//!
//! Failures:
//!
//! * Only **damage** ([`Error::Damaged`]: a malformed LZ4 frame, a failed
//!   checksum, not a SQLite database, a failed integrity check) is taken for
//!   a bad copy. A damaged cold snapshot fails the restore, naming it and
//!   the older state that could be restored instead; with `--allow-older`
//!   it is skipped with a warning and the choice is made again without it
//!   (the next older cold snapshot, or the generation if that is now the
//!   later state).
//! * Transport errors while downloading are retried ([`DOWNLOAD_ATTEMPTS`])
//!   and then fail the restore; local errors (disk full at the output) fail
//!   it at once; so does any error that is not classified as damage.
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
//! [`crate::cli::progress`] decides between a terminal bar and log lines. A
//! generation restore reports its compressed size (snapshot and segments) at
//! the start and at the end only.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::ObjectStoreExt;
use tempfile::TempPath;

use crate::capture::snapshot;
use crate::error::IoContext;
use crate::replica::cold::{self, choose_cold, ColdChoice, SnapshotInfo};
use crate::replica::hot::{self, GenerationId, Plan, RestorePoint};
use crate::replica::layout::{check_key, key_path};
use crate::replica::storage::Replica;
use crate::source::config::Loaded;
use crate::source::keys::key_for;
use crate::{Error, Result};

pub mod replay;

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
    /// Restore the next older state when the newest cold snapshot is damaged
    /// (else that is an error naming both).
    pub allow_older: bool,
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

/// Databases restored at once by a bulk restore unless told otherwise. Each
/// one is a GET stream plus a blocking decompress-and-check thread; 16 keeps
/// a link busy with small databases without oversubscribing a small host.
pub const DEFAULT_BULK_CONCURRENCY: usize = 16;

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
        let key = key_for(&loaded.patterns, &loaded.template, &abs).map(|(k, _)| k).ok_or_else(|| {
            Error::invalid(
                abs.display(),
                "is not matched by any pattern in the config; pass its replica key instead (see `litefleet list`)",
            )
        })?;
        if let Some(other) =
            crate::source::keys::shared_with(&loaded.patterns, &loaded.template, &abs)
        {
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

/// How many times a download interrupted by a transport error (a reset
/// connection, a 5xx in the middle of a body) is tried in all. The S3 client
/// already retries each request before it returns; this covers a body that
/// breaks after the response started, which it cannot retry.
pub const DOWNLOAD_ATTEMPTS: u32 = 3;
/// Wait before the first retry of a download; doubled for each further one.
const RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(250);
/// Picks the tier holding the later state, given the state time of the
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
    Cold(&'a ColdChoice),
    Hot(&'a Plan),
}

fn pick<'a>(cold: Option<&'a ColdChoice>, hot: Option<&'a Plan>) -> Option<Source<'a>> {
    match choose_tier(cold.map(ColdChoice::state_time), hot.map(Plan::time))? {
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
    refuse_side_files(&opts.output)?;
    let snaps = cold::snapshots(replica, &key).await?;
    let at = opts.timestamp;
    let how = How {
        hot: true,
        at,
        allow_older: opts.allow_older,
    };
    match restore_key(replica, &key, snaps, how, &opts.output, on_bytes).await? {
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

/// ` at or before <at>` for messages about what a restore at `at` found
/// nothing of; empty for the latest state.
pub(crate) fn uploaded_by(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| format!(" at or before {}", t.to_rfc3339()))
        .unwrap_or_default()
}

/// The side files SQLite would apply to a database at `output` when it is
/// first opened: a leftover `-wal` is replayed onto it, a `-journal` rolled
/// back into it, a `-shm` taken for its WAL index.
pub fn side_files(output: &Path) -> Vec<PathBuf> {
    ["-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| {
            let mut p = output.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// Fails when `output` has side files (see [`side_files`]), naming them.
fn refuse_side_files(output: &Path) -> Result<()> {
    let found = side_files(output);
    if found.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
    Err(Error::invalid(
        output.display(),
        format!(
            "leftover {} of an earlier database exist(s) next to the output; SQLite would apply \
             them to the restored database when it is first opened. Move or delete them first",
            names.join(", ")
        ),
    ))
}

/// What [`restore_key`] is asked to do.
#[derive(Debug, Clone, Copy)]
struct How {
    /// List and plan the key's generations too.
    hot: bool,
    at: Option<DateTime<Utc>>,
    allow_older: bool,
}

/// What [`restore_key`] installed.
struct Restored {
    tier: Tier,
    object: String,
    bytes: u64,
    uploaded: DateTime<Utc>,
}

/// Restores `key` at `how.at` into `output` from the tier holding the later
/// state (see the module docs); `Ok(None)` when neither tier has anything at
/// or before `at`. `snaps` are its cold snapshots; its generations are only
/// listed when `how.hot` is set.
///
/// A damaged cold snapshot ([`Error::Damaged`]: a partial write by a store
/// without atomic PUT, bit rot) fails the LZ4 content checksum recorded at
/// upload or the integrity check, so it is never installed. The restore then
/// fails naming it and the next older state, unless `how.allow_older`: then
/// it is dropped, the choice is made again and the fallback is logged as a
/// warning. Every other error stops the restore, and so does any failure of
/// the hot tier (see [`hot_failed`]).
async fn restore_key(
    replica: &Replica,
    key: &str,
    mut snaps: Vec<SnapshotInfo>,
    how: How,
    output: &Path,
    on_bytes: Option<OnBytes>,
) -> Result<Option<Restored>> {
    let at = how.at;
    let plan = if how.hot {
        match hot::plan_latest(replica, key, at).await {
            Ok(p) => p,
            Err(e) => {
                let cold = choose_cold(replica, &snaps, at, false).await.ok().flatten();
                return Err(hot_failed(e, cold.as_ref()));
            }
        }
    } else {
        None
    };
    let mut damaged: Option<(SnapshotInfo, Error)> = None;
    loop {
        let cold = choose_cold(replica, &snaps, at, plan.is_some()).await?;
        let source = pick(cold.as_ref(), plan.as_ref());
        if let Some((bad, e)) = damaged.take() {
            let fallback = match &source {
                None => return Err(e),
                Some(Source::Cold(c)) => c.info.location.to_string(),
                Some(Source::Hot(p)) => describe_plan(p),
            };
            if !how.allow_older {
                return Err(Error::damaged(
                    &bad.location,
                    format!(
                        "{e}; not restoring the next older state ({fallback}) by itself: \
                         pass --allow-older to restore it"
                    ),
                ));
            }
            tracing::warn!(object = %bad.location, error = %e, %fallback, "snapshot is damaged; restoring the next older state (--allow-older)");
        }
        let snap = match source {
            None => return Ok(None),
            Some(Source::Hot(p)) => {
                let installed = with_retries(&describe_plan(p), || {
                    install_plan(replica, key, p, output, on_bytes.clone())
                })
                .await;
                return match installed {
                    Ok(point) => Ok(Some(Restored {
                        tier: Tier::Hot,
                        object: describe_plan(p),
                        bytes: point.bytes,
                        uploaded: point.time,
                    })),
                    Err(e) => Err(hot_failed(e, cold.as_ref())),
                };
            }
            Some(Source::Cold(c)) => c.info.clone(),
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
            Err(e @ Error::Damaged { .. }) => {
                snaps.retain(|s| s.location != snap.location);
                damaged = Some((snap, e));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether an error of a download is worth trying again: the store failed
/// in a way that is not an answer about the object (a reset connection, a
/// body cut short, a 5xx after the client's own retries).
fn transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Store {
            source: object_store::Error::Generic { .. },
            ..
        }
    )
}

/// Runs a download (which writes a fresh temporary file each time) up to
/// [`DOWNLOAD_ATTEMPTS`] times while it fails with a [`transient`] error.
async fn with_retries<T, F, Fut>(what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut n = 1;
    loop {
        match attempt().await {
            Err(e) if n < DOWNLOAD_ATTEMPTS && transient(&e) => {
                tracing::warn!(object = %what, attempt = n, error = %e, "download failed; retrying");
                tokio::time::sleep(RETRY_BACKOFF * 2u32.pow(n - 1)).await;
                n += 1;
            }
            Err(e) if transient(&e) => {
                return Err(Error::invalid(
                    what,
                    format!("download failed {DOWNLOAD_ATTEMPTS} times, the last with: {e}"),
                ))
            }
            r => return r,
        }
    }
}

/// The error of a failed hot-tier restore. Damage (a gap, a broken chain, a
/// bad object, a failed check) is never papered over with an older cold
/// snapshot; when there is one, the error says how to restore it on
/// purpose. Store and local I/O errors are returned as they are.
fn hot_failed(e: Error, cold: Option<&ColdChoice>) -> Error {
    match (&e, cold) {
        (Error::Invalid { .. } | Error::Damaged { .. } | Error::Sqlite { .. }, Some(c)) => {
            let t = c
                .restorable_at()
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            Error::invalid(
                "hot-tier restore (WAL generation)",
                format!(
                    "{e}; not falling back to the older cold snapshot {} (taken {t}) by \
                     itself: to restore that one, pass --timestamp {t}, or decompress the \
                     object with `lz4 -d`",
                    c.info.location
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
    /// `PRAGMA integrity_check`, renames it to the output without replacing
    /// anything, `fsync`s the directory and checks the database again at its
    /// final path (blocking). `what` names the source in errors.
    fn install(self, what: &str) -> Result<()> {
        let Staged { file, tmp, output } = self;
        file.sync_all().at(&*tmp)?;
        drop(file);
        if !crate::source::discover::has_sqlite_header(&tmp).at(&*tmp)? {
            return Err(Error::damaged(
                what,
                "restored data is not a SQLite database",
            ));
        }
        snapshot::integrity_check(&tmp).map_err(|e| as_damage(what, e))?;
        // Side files that appeared since the restore began would be applied
        // to the restored database on its first open.
        refuse_side_files(&output)?;
        let tmp = tmp.keep().map_err(|e| Error::io(&output, e.error))?;
        if let Err(e) = rename_noreplace(&tmp, &output) {
            let _ = std::fs::remove_file(&tmp);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::invalid(
                    output.display(),
                    "appeared while the restore ran; not overwritten (the restored copy was discarded)",
                )
            } else {
                Error::io(&output, e)
            });
        }
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
        }
        // What a reader of the output will see: with no side file present,
        // the database as installed.
        let checked = refuse_side_files(&output)
            .and_then(|()| snapshot::check(&output, "quick_check").map_err(|e| as_damage(what, e)));
        if let Err(e) = checked {
            // Ours since the rename: nothing else can have it yet.
            let _ = std::fs::remove_file(&output);
            for f in side_files(&output) {
                tracing::warn!(path = %f.display(), "side file next to a restore output that failed its final check; left in place");
            }
            return Err(e);
        }
        Ok(())
    }
}

/// A failed check of restored data is damage of what it came from; SQLite
/// errors that say the file is not a sound database are too. Anything else
/// (a local I/O error, disk full) is not.
fn as_damage(what: &str, e: Error) -> Error {
    let corrupt = |e: &rusqlite::Error| {
        matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
        )
    };
    match e {
        Error::Invalid { reason, .. } => Error::damaged(what, reason),
        Error::Sqlite { ref source, .. } if corrupt(source) => Error::damaged(what, e.to_string()),
        other => other,
    }
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), so an
/// output that appeared after the existence check is never overwritten:
/// `renameat2(RENAME_NOREPLACE)` where the kernel and filesystem have it,
/// else a hard link (which fails if `to` exists) and an unlink of `from`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
        };
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: both are valid NUL-terminated paths that outlive the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS | libc::ENOTSUP) => {}
            _ => return Err(e),
        }
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
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
    let point = replay::restore_plan(replica, key, plan, &mut staged.file).await?;
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
    with_retries(location.as_ref(), || {
        fetch_once(replica, location, output, on_bytes.clone())
    })
    .await
}

/// One attempt of [`fetch_to_with_progress`].
async fn fetch_once(
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
        .map_err(snapshot::StreamError::io);
    let reader = tokio_util::io::StreamReader::new(stream);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let output = output.to_path_buf();
    let what = location.to_string();
    blocking(move || {
        let mut staged = Staged::new(&output)?;
        let tmp = staged.tmp.to_path_buf();
        let n = snapshot::decompress_to(bridge, &what, &mut staged.file, &tmp)?;
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
        Some(hot::SNAPSHOTS_DIR | hot::WAL_DIR) => {
            is_gen(up.next()) && is(up.next(), hot::GENERATIONS_DIR)
        }
        last => is_gen(last) && is(up.next(), hot::GENERATIONS_DIR),
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
    let shape = dir == hot::SNAPSHOTS_DIR
        && gens == hot::GENERATIONS_DIR
        && hot::parse_snapshot_name(name).is_some();
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
        if let Some(info) = cold::to_info(meta) {
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
    /// As [`RestoreOptions::allow_older`], for every database.
    pub allow_older: bool,
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

/// Receives bulk restore progress (implemented by [`crate::cli::progress`]).
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
    } else if let Err(e) = refuse_side_files(&output) {
        BulkOutcome::Failed(e)
    } else {
        let how = How {
            hot: !listed.generations.is_empty(),
            at: opts.timestamp,
            allow_older: opts.allow_older,
        };
        match restore_key(replica, &key, listed.snapshots, how, &output, None).await {
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

    #[tokio::test]
    async fn without_a_record_only_the_hour_name_counts() {
        // Objects of earlier versions (too small to hold a record, so nothing
        // is read): usable at T only if their hour name is at or before T,
        // whatever their listing time says.
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::for_test_dir(dir.path());
        let s = vec![snap(2, 10), snap(3, 50), snap(4, 5)];
        let hour = |c: Option<ColdChoice>| c.map(|c| c.info.hour);
        let pick = |t| choose_cold(&r, &s, t, true);
        assert_eq!(hour(pick(None).await.unwrap()), Some(s[2].hour));
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 2, 55, 0).unwrap();
        assert_eq!(hour(pick(Some(t)).await.unwrap()), Some(s[0].hour));
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap();
        assert_eq!(hour(pick(Some(t)).await.unwrap()), Some(s[1].hour));
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 1, 9, 0).unwrap();
        assert!(pick(Some(t)).await.unwrap().is_none());
    }

    #[test]
    fn install_rename_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("tmp"), dir.path().join("out.db"));
        std::fs::write(&from, b"restored").unwrap();
        std::fs::write(&to, b"appeared meanwhile").unwrap();
        let e = rename_noreplace(&from, &to).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"appeared meanwhile");
        assert!(from.exists());
        std::fs::remove_file(&to).unwrap();
        rename_noreplace(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"restored");
        assert!(!from.exists());
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
