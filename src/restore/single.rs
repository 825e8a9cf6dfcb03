//! Restore of one database: resolve what the user named to a key, choose
//! the tier holding the later state at `T`, download with retries, and tell
//! damage from every other error (see the [module docs](super) for the
//! rules).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use object_store::path::Path as ObjPath;
use object_store::ObjectStoreExt;

use super::install::{refuse_side_files, Staged};
use super::replay::{self, uploaded_by};
use crate::capture::snapshot;
use crate::replica::cold::{self, choose_cold, ChooseError, ColdChoice, SnapshotInfo};
use crate::replica::hot::{self, Plan, RestorePoint};
use crate::replica::layout::check_key;
use crate::replica::storage::Replica;
use crate::source::config::Loaded;
use crate::source::keys::key_for;
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

/// Resolves a restore target (key or database path) to a key.
///
/// A target written as a path (absolute, `./`, `../`) is a path and must be
/// matched by a pattern. Any other target is a path only when it names a
/// file here that a pattern matches; otherwise it is a key, so a key is not
/// taken for a path because a directory or an unrelated file of that name
/// happens to be in the current directory.
pub fn resolve_key(loaded: &Loaded, target: &str) -> Result<String> {
    let p = Path::new(target);
    let written_as_path = p.is_absolute() || target.starts_with("./") || target.starts_with("../");
    if written_as_path || p.is_file() {
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let abs = crate::source::config::lexical(&abs);
        let key = match key_for(&loaded.patterns, &loaded.template, &abs) {
            Some((key, _)) => key,
            None if written_as_path => {
                return Err(Error::invalid(
                    abs.display(),
                    "is not matched by any pattern in the config; pass its replica key instead (see `litefleet list`)",
                ))
            }
            None => return key_target(target),
        };
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
    key_target(target)
}

/// A restore target taken as a key: as written, by the rule every key
/// follows (a trailing `/` is an empty segment, refused like `p//t`).
fn key_target(target: &str) -> Result<String> {
    check_key(target)?;
    Ok(target.to_string())
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

pub use super::replay::OnBytes;

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
    // A symlink (even a dangling one) is something at the path too.
    if let Ok(m) = opts.output.symlink_metadata() {
        if opts.if_db_not_exists {
            return Ok(RestoreOutcome::OutputExists);
        }
        // Not "remove it" for a directory (black-box probe G27: `-o out/`).
        if m.is_dir() {
            return Err(Error::invalid(
                opts.output.display(),
                "is a directory: -o names the database file to write (restore --prefix writes one per key below a directory)",
            ));
        }
        return Err(Error::invalid(
            opts.output.display(),
            "already exists; remove it or pass --if-db-not-exists",
        ));
    }
    refuse_side_files(&opts.output)?;
    let snaps = cold::snapshots(replica, &key).await?;
    let has_cold = !snaps.is_empty();
    let at = opts.timestamp;
    let how = How {
        hot: true,
        at,
        allow_older: opts.allow_older,
    };
    let restored = match restore_key(replica, &key, snaps, how, &opts.output, on_bytes).await {
        Err(e) if opts.if_db_not_exists && super::install::appeared(&e, &opts.output) => {
            return Ok(RestoreOutcome::OutputExists)
        }
        r => r?,
    };
    match restored {
        Some(r) => Ok(RestoreOutcome::Restored {
            key,
            tier: r.tier,
            object: r.object,
            bytes: r.bytes,
            uploaded: r.uploaded,
        }),
        // `--if-replica-exists` excuses a key the replica holds nothing of,
        // not a time before everything it holds.
        None if opts.if_replica_exists
            && (at.is_none()
                || !has_cold && hot::list_generation_ids(replica, &key).await?.is_empty()) =>
        {
            Ok(RestoreOutcome::NoReplica)
        }
        None => Err(Error::NotFound(format!(
            "no snapshot or WAL generation of {key:?}{} in {replica}",
            uploaded_by(at)
        ))),
    }
}

/// What [`restore_key`] is asked to do.
#[derive(Debug, Clone, Copy)]
pub(super) struct How {
    /// List and plan the key's generations too.
    pub(super) hot: bool,
    pub(super) at: Option<DateTime<Utc>>,
    pub(super) allow_older: bool,
}

/// What [`restore_key`] installed.
pub(super) struct Restored {
    pub(super) tier: Tier,
    pub(super) object: String,
    pub(super) bytes: u64,
    pub(super) uploaded: DateTime<Utc>,
    /// Hot tier: where in which WAL the restored state ends (the end of
    /// the last segment replayed, and the header the generation's metadata
    /// recorded for that WAL), when the metadata recorded that header.
    pub(super) wal_end: Option<WalEnd>,
}

/// The end of a hot-tier restore in its WAL: the WAL's header (salts and
/// checksum seed, which SQLite changes at every WAL restart) and the offset
/// after the last frame replayed. A live source whose `-wal` has the same
/// header and commits up to the same offset holds exactly that state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalEnd {
    pub(crate) start: hot::WalStart,
    pub(crate) offset: u64,
}

/// Where the state `point` restored from `plan` ends in its WAL (see
/// [`WalEnd`]). A generation snapshot may hold frames of its WAL past the
/// WAL's start (`covers`): the state ends there at least. Unknown when the
/// metadata recorded no header for that WAL, or, with no segment replayed,
/// not what the snapshot covers (metadata of earlier versions).
fn wal_end(plan: &Plan, point: &RestorePoint) -> Option<WalEnd> {
    let start = plan.wal_start(point.position.index)?;
    let covers = plan
        .recorded_snapshot()
        .and_then(|e| e.covers)
        .filter(|_| point.position.index == plan.snapshot.index);
    let offset = match covers {
        Some(c) => c.max(point.position.offset),
        None if point.segments == 0 => return None,
        None => point.position.offset,
    };
    Some(WalEnd { start, offset })
}

/// Restores `key` at `how.at` into `output` from the tier holding the later
/// state (see the module docs); `Ok(None)` when neither tier has anything at
/// or before `at`. `snaps` are its cold snapshots; its generations are only
/// listed when `how.hot` is set.
///
/// A damaged cold snapshot ([`Error::Damaged`]: a partial write by a store
/// without atomic PUT, bit rot) fails the LZ4 content checksum recorded at
/// upload, the check of its times record (read when choosing, or checked
/// as it is downloaded) or the integrity check, so it is never installed. The restore then
/// fails naming it and the next older state, unless `how.allow_older`: then
/// it is dropped, the choice is made again and the fallback is logged as a
/// warning. Every other error stops the restore, and so does any failure of
/// the hot tier (see [`hot_failed`]).
pub(super) async fn restore_key(
    replica: &Replica,
    key: &str,
    mut snaps: Vec<SnapshotInfo>,
    how: How,
    output: &Path,
    on_bytes: Option<OnBytes>,
) -> Result<Option<Restored>> {
    let at = how.at;
    // A generation that lost its snapshot, passed over because the newest
    // cold copy at `at` began after everything left of it
    // ([`hot::plan_latest`]): that copy, or a later state, is what this
    // restore must end with; else it fails with the generation's error.
    let mut superseded: Option<Superseded> = None;
    let mut plan = if how.hot {
        match hot::plan_latest(replica, key, at, None).await {
            Ok(p) => p,
            Err(e) => {
                // With its times record: the `--timestamp` the error suggests is
                // when its copy was complete, not its hour name.
                let cold = choose_cold(replica, &snaps, at, true).await.ok().flatten();
                let Some((copy, began)) = cold
                    .as_ref()
                    .and_then(|c| c.times.map(|t| (c.info.location.clone(), t.started)))
                else {
                    return Err(hot_failed(e, cold.as_ref()));
                };
                match hot::plan_latest(replica, key, at, Some(began)).await {
                    Ok(p) => {
                        superseded = Some(Superseded {
                            copy,
                            began,
                            lost: e,
                        });
                        p
                    }
                    Err(e) => return Err(hot_failed(e, cold.as_ref())),
                }
            }
        }
    } else {
        None
    };
    let later_copy = superseded.as_ref().map(|s| s.began);
    // Damaged cold snapshots met so far, newest first: passed over only
    // with `how.allow_older`; else the restore fails naming the newest and
    // the state that would be restored instead.
    let mut damaged: Vec<(SnapshotInfo, Error)> = Vec::new();
    // Plans made again for this restore ([`plan_again`]).
    let mut replans = 0;
    loop {
        let cold = match choose_cold(replica, &snaps, at, plan.is_some()).await {
            Ok(c) => c,
            Err(ChooseError::Damaged(bad, e)) => {
                // Its times record is damaged, so whether it may be
                // restored at `at` is unknown: damage, like a damaged
                // download. Unless the generation holds a later state
                // whatever the times were (the copy began before the hour
                // in its name): then it would not be restored anyway.
                snaps.retain(|s| s.location != bad.location);
                if plan.as_ref().is_none_or(|p| p.time() < bad.hour) {
                    damaged.push((*bad, e));
                }
                continue;
            }
            Err(ChooseError::Other(e)) => return Err(e),
        };
        let source = pick(cold.as_ref(), plan.as_ref());
        if let Some(s) = superseded.take_if(|s| !s.stands_for(source.as_ref())) {
            return Err(hot_failed(s.lost, cold.as_ref()));
        }
        if !damaged.is_empty() {
            let fallback = match &source {
                None => return Err(damaged.swap_remove(0).1),
                Some(Source::Cold(c)) => c.info.location.to_string(),
                Some(Source::Hot(p)) => describe_plan(p),
            };
            if !how.allow_older {
                let (bad, e) = damaged.remove(0);
                let also = if damaged.is_empty() {
                    String::new()
                } else {
                    let names: Vec<String> = damaged
                        .iter()
                        .map(|(s, _)| s.location.to_string())
                        .collect();
                    format!(
                        " (older damaged snapshots passed over too: {})",
                        names.join(", ")
                    )
                };
                return Err(Error::damaged(
                    &bad.location,
                    format!(
                        "{e}; not restoring the next older state ({fallback}){also} by itself: \
                         pass --allow-older to restore it"
                    ),
                ));
            }
            for (bad, e) in damaged.drain(..) {
                tracing::warn!(object = %bad.location, error = %e, %fallback, "snapshot is damaged; restoring the next older state (--allow-older)");
            }
        }
        if let (Some(Source::Cold(c)), Some(p)) = (&source, &plan) {
            if p.recorded_after(c.state_time()) {
                // The cold copy looks newer than the generation's objects,
                // but the generation recorded frames shipped after that
                // copy began: unless its objects hold all of them (a
                // replay proves it), the hot tier's real state is newer and
                // something of it is missing. Never the cold copy then.
                match replays_in_full(replica, key, p, output).await {
                    Ok(()) => {}
                    // A fleet log object consolidated since the plan (a
                    // stream that ended writes its metadata, then moves
                    // its parts into a pack): plan again and choose again.
                    Err(e) if replay::is_part_gone(&e) && replans < REPLANS => {
                        replans += 1;
                        plan = Some(plan_again(replica, key, at, later_copy, e, Some(c)).await?);
                        continue;
                    }
                    Err(e) => return Err(hot_failed(e, Some(c))),
                }
            }
        }
        let snap = match source {
            None => return Ok(None),
            Some(Source::Hot(p)) => {
                let mut p = p.clone();
                loop {
                    let installed = with_retries(&describe_plan(&p), || {
                        install_plan(replica, key, &p, output, on_bytes.clone())
                    })
                    .await;
                    return match installed {
                        Ok(point) => Ok(Some(Restored {
                            tier: Tier::Hot,
                            object: describe_plan(&p),
                            bytes: point.bytes,
                            uploaded: point.time,
                            wal_end: wal_end(&p, &point),
                        })),
                        // A fleet log object consolidated since the plan:
                        // its parts are in a pack now.
                        Err(e) if replay::is_part_gone(&e) && replans < REPLANS => {
                            replans += 1;
                            p = plan_again(replica, key, at, later_copy, e, cold.as_ref()).await?;
                            continue;
                        }
                        Err(e) => Err(hot_failed(e, cold.as_ref())),
                    };
                }
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
                    wal_end: None,
                }))
            }
            Err(e @ Error::Damaged { .. }) => {
                snaps.retain(|s| s.location != snap.location);
                damaged.push((snap, e));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A generation passed over by [`hot::plan_latest`] because the cold copy
/// `copy`, begun at `began`, is later than everything left of it.
struct Superseded {
    copy: ObjPath,
    began: DateTime<Utc>,
    /// The generation's error, as the plan without `began` gave it.
    lost: Error,
}

impl Superseded {
    /// Whether the state chosen stands for the lost generation: that very
    /// copy, another whose copy began no earlier, or a generation's plan
    /// whose last commit is no earlier. Not an older state that a damaged
    /// copy (`--allow-older`) would fall back to: the lost generation's
    /// states are newer than that.
    fn stands_for(&self, source: Option<&Source>) -> bool {
        match source {
            Some(Source::Cold(c)) => {
                c.info.location == self.copy || c.times.is_some_and(|t| t.started >= self.began)
            }
            Some(Source::Hot(p)) => p.time() >= self.began,
            None => false,
        }
    }
}

/// Whether an error of a download is worth trying again: the store failed
/// in a way that is not an answer about the object (a reset connection, a
/// body cut short, a 5xx after the client's own retries).
fn transient(e: &Error) -> bool {
    matches!(e, Error::Store { source, .. } if crate::replica::storage::is_transient(source))
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
/// purpose. Store and local errors (I/O, and SQLite's that do not say the
/// restored file is unsound: a full disk, out of descriptors) are returned
/// as they are, so `verify` counts them as its own, not the replica's.
fn hot_failed(e: Error, cold: Option<&ColdChoice>) -> Error {
    match (&e, cold) {
        (Error::Sqlite { source, .. }, _) if !super::install::says_unsound(source) => e,
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

/// The plan made again after `gone` ([`replay::is_part_gone`]: a fleet log
/// object consolidated since the plan was made, its parts in a pack now),
/// for both uses of a plan: the install, and the replay that proves a
/// newer cold copy. With no plan at all now, the restore fails with `gone`
/// (never the cold copy instead), worded beside `cold` as [`hot_failed`]
/// words every failure of the hot tier.
async fn plan_again(
    replica: &Replica,
    key: &str,
    at: Option<DateTime<Utc>>,
    later_copy: Option<DateTime<Utc>>,
    gone: Error,
    cold: Option<&ColdChoice>,
) -> Result<Plan> {
    match hot::plan_latest(replica, key, at, later_copy).await {
        Ok(Some(again)) => Ok(again),
        Ok(None) => Err(hot_failed(gone, cold)),
        Err(e) => Err(hot_failed(e, cold)),
    }
}

/// Plans made again when a fleet log object went away during a restore
/// (each consolidation moves a database's parts once an hour, so a second
/// time in a row means something else deletes them).
const REPLANS: usize = 3;

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::invalid("restore", format!("task failed: {e}")))?
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
    let point = replay::restore_plan(replica, key, plan, &mut staged.file, &staged.tmp).await?;
    let what = format!("generation {} of {key:?}", plan.generation);
    blocking(move || staged.install(&what)).await?;
    progress(total);
    Ok(point)
}

/// Replays `plan` into a scratch file beside `output` (removed after) to
/// prove its objects hold everything the generation recorded as shipped
/// ([`crate::replica::hot::Replay::finish`]).
async fn replays_in_full(replica: &Replica, key: &str, plan: &Plan, output: &Path) -> Result<()> {
    let out = output.to_path_buf();
    let mut staged = blocking(move || Staged::new(&out)).await?;
    replay::restore_plan(replica, key, plan, &mut staged.file, &staged.tmp).await?;
    Ok(())
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
    let mut bridge = Head {
        inner: replay::object_reader(got, on_bytes),
        head: Vec::with_capacity(cold::RECORD_LEN),
    };
    let output = output.to_path_buf();
    let location = location.clone();
    let prefix = replica.prefix.clone();
    blocking(move || {
        let what = location.to_string();
        let mut staged = Staged::new(&output)?;
        let tmp = staged.tmp.to_path_buf();
        let n = snapshot::decompress_to(&mut bridge, &what, &mut staged.file, &tmp)?;
        // The decoder skips the times record; a damaged one is damage of
        // the object all the same (a restore at a time before it was
        // taken could have chosen it), so it is never installed.
        if let Some(name) = location.filename().and_then(cold::parse_snapshot_name) {
            cold::record(&prefix, &location, name.hour, &bridge.head)?;
        }
        staged.install(&what)?;
        Ok(n)
    })
    .await
}

/// A reader that keeps the first [`cold::RECORD_LEN`] bytes read through
/// it: the times record of a cold snapshot, checked after the download
/// streamed through the decoder (no second request).
struct Head<R> {
    inner: R,
    head: Vec<u8>,
}

impl<R: std::io::Read> std::io::Read for Head<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let keep = (cold::RECORD_LEN - self.head.len()).min(n);
        self.head.extend_from_slice(&buf[..keep]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

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

    /// A hot-tier restore that failed while an older cold snapshot exists:
    /// damage is reported with how to restore that snapshot on purpose,
    /// while the host's own failures (an I/O error, SQLite out of disk or
    /// descriptors during the check) stay what they are, so `verify` counts
    /// them as "could not check (local)", not as a problem of the replica.
    #[test]
    fn only_damage_of_a_generation_names_the_cold_snapshot() {
        use crate::restore::verify::{classify, Unverifiable, Verdict};
        let hour = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
        let cold = ColdChoice {
            info: crate::replica::cold::SnapshotInfo {
                location: "k/x.lz4".into(),
                stem: "x".into(),
                hour,
                uploaded: hour,
                size: 1,
            },
            times: None,
        };
        let sqlite = |code| {
            Error::sqlite(
                "/out/.x.db.litefleet-1",
                rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
            )
        };
        let local = [
            Error::io("/out/.x.db.litefleet-1", std::io::Error::other("no space")),
            sqlite(rusqlite::ffi::SQLITE_FULL),
            sqlite(rusqlite::ffi::SQLITE_CANTOPEN),
        ];
        for e in local {
            let text = e.to_string();
            let e = hot_failed(e, Some(&cold));
            assert_eq!(e.to_string(), text);
            assert_eq!(
                classify(&e),
                Verdict::Unverifiable(Unverifiable::Local),
                "{e}"
            );
        }
        let damaged = [
            Error::damaged("k/gen/s.lz4", "not a valid LZ4 snapshot: x"),
            sqlite(rusqlite::ffi::SQLITE_CORRUPT),
        ];
        for e in damaged {
            let e = hot_failed(e, Some(&cold));
            assert!(e.to_string().contains("--timestamp"), "{e}");
            assert!(matches!(classify(&e), Verdict::Problem(_)), "{e}");
        }
    }
}
