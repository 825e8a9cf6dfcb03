//! Restore drills: prove that the backups restore, and that what they
//! restore is what the source held.
//!
//! [`verify`] restores every database key under a prefix (or a random
//! sample, or only keys uploaded recently) into a scratch directory
//! **through the same code path as `restore --prefix`** ([`super::bulk`]:
//! the tier choice, the hot tier's continuity proof, the LZ4 checksums,
//! `PRAGMA integrity_check` and the checked install), deletes each restore
//! after its check, and reports per key one of:
//!
//! * **ok**: the key restored and passed every check;
//! * **problem**: the replica cannot give the database back, or gives back
//!   something else ([`Problem`]): a damaged object (LZ4 frame or checksum,
//!   not a SQLite database, a broken WAL checksum chain), a continuity gap
//!   (a missing WAL segment), an integrity failure, nothing in the replica
//!   for a database on this host (not found), or a restore whose content
//!   differs from an unchanged source;
//! * **could not check** ([`Unverifiable`]): the drill itself failed, not the
//!   backup: a transport error after the retries, a local disk error in the
//!   scratch directory. The backup is neither proven good nor bad.
//!
//! # The source comparison
//!
//! When the key belongs to a database on this host (the config's patterns,
//! walked like `replicate` walks them, rendered through the key template),
//! the restore is compared with it: page size, text encoding, `user_version`
//! and `application_id`, the schema (`sqlite_master`), and the rows of
//! every table (their number and a digest of their content, `rowid`
//! included, in whatever order they are stored). A live database moves on after its last upload, and a
//! difference then is lag, not a bad backup. So the comparison is made only
//! when the source **has not changed since the replicated state**:
//!
//! * a hot-tier restore ends at a known place of a known WAL (the offset
//!   after the last frame replayed, and the WAL header the generation's
//!   metadata recorded: salts that SQLite renews at every WAL restart). A
//!   source whose `-wal` has that header and commits up to exactly that
//!   offset holds that state, however recently it was written: compared.
//!   The same WAL with commits past it is newer. File times cannot tell
//!   this for an idle hot database: its last segment's commit time is taken
//!   just after the WAL was read, within a second of the last commit, so a
//!   time margin never held (black-box probe: "newer, lag 0.0s" for a
//!   database idle for ten minutes);
//! * otherwise (cold tier, a `-wal` restarted, truncated or gone), by file
//!   times: the latest `mtime`/`ctime` of the database file and its `-wal`
//!   is earlier than the restored state's time by at least
//!   [`SOURCE_MARGIN`]. The restored state's time is when the cold
//!   snapshot's copy began (recorded in the object; it holds every commit
//!   before), or the commit time of the newest generation object replayed
//!   (taken after its WAL was read).
//!
//! A source changed after the state's time says "source newer than replica
//! (lag Ns)": information, not a problem. One changed within the margin
//! before it is not compared and not called newer either (the replica may
//! well hold that change): "cannot tell". The database file's `ctime` is used beside its `mtime` because a
//! file put in place with an old `mtime` (`cp -p`, `mv`) still gets a new
//! `ctime`. The `-wal`'s `ctime` is not: SQLite running as root `fchown`s
//! the `-wal` at every open to keep its owner (`robustFchown`), so every
//! snapshot, and this comparison's own read, would count as a change. The
//! source is read in one read transaction, and its times (and its `-wal`'s
//! committed end) are read again afterwards; a source that changed
//! meanwhile is not compared either.
//!
//! # Scratch space
//!
//! Each drill restores into its own `.litefleet-verify-XXXXXX` directory under
//! `temp-dir` ([`Scratch`]), locked (`flock`) while the drill runs and
//! removed when it ends, also when `litefleet verify` is stopped by SIGINT
//! or SIGTERM. What a killed drill (SIGKILL) left is removed by the next
//! drill and by `replicate`'s start ([`remove_stale_scratch`]): a directory
//! whose lock can be taken; never one whose drill still runs.
//!
//! A database on this host whose key the replica does not hold is a problem
//! ("not found") once it is older than [`NEW_DATABASE_GRACE`]; a newer one
//! may simply not have been uploaded yet and is left out.
//!
//! This module never draws anything and never writes to the replica; the
//! command line prints the report, the daemon counts it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::hash::BuildHasher;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use rusqlite::Connection;
use serde::Serialize;

use super::list::{list_databases, KeyListing};
use super::single::{restore_key, How, Tier, WalEnd};
use crate::capture::snapshot;
use crate::capture::wal::{self, ReadOutcome, WalCursor};
use crate::replica::cold;
use crate::replica::hot;
use crate::replica::layout::{check_key, check_new_key};
use crate::replica::storage::Replica;
use crate::source::config::Loaded;
use crate::source::discover::Visitor;
use crate::source::keys::key_for;
use crate::source::vfs::has_sqlite_header;
use crate::{Error, Result};

/// How much earlier than the restored state's time the source's last change
/// must be for a difference to count as a problem. It covers the kernel's
/// coarse file-time clock (a few milliseconds behind the wall clock), the
/// time between reading a WAL and stamping its segment, and stores that
/// keep upload times in whole seconds; a source written within it of its
/// last upload is reported as lag instead.
pub const SOURCE_MARGIN: Duration = Duration::from_secs(2);

/// A database on this host that the replica does not hold is reported as
/// "not found" only once its files are older than this: `replicate` uploads
/// a change within one scan interval (15 s by default) and retries failed
/// uploads every scan, so a database unchanged for ten minutes and still
/// absent is not waiting for its first upload.
pub const NEW_DATABASE_GRACE: Duration = Duration::from_secs(600);

/// Databases checked at once by default: as many as a bulk restore restores
/// ([`super::DEFAULT_BULK_CONCURRENCY`]), for the same reasons.
pub const DEFAULT_VERIFY_CONCURRENCY: usize = super::DEFAULT_BULK_CONCURRENCY;

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Key prefix (`p1/orders`); empty or `/` for the whole replica.
    pub prefix: String,
    /// Check this many keys picked at random (after `since`), not all.
    pub sample: Option<usize>,
    /// Only keys with an object uploaded within this long.
    pub since: Option<Duration>,
    /// Keys checked at once (at least 1).
    pub concurrency: usize,
    /// Where the scratch directory of the restores is made.
    pub scratch_parent: PathBuf,
    /// Compare restores with the databases on this host (see the module docs).
    pub compare_source: bool,
    /// See [`SOURCE_MARGIN`] (the default); tests of the comparison shorten it.
    pub source_margin: Duration,
    /// See [`NEW_DATABASE_GRACE`] (the default).
    pub new_database_grace: Duration,
}

impl VerifyOptions {
    /// Every key under `prefix`, compared with the source, scratch space
    /// under the config's `temp-dir`.
    pub fn new(loaded: &Loaded, prefix: &str) -> VerifyOptions {
        VerifyOptions {
            prefix: prefix.to_string(),
            sample: None,
            since: None,
            concurrency: DEFAULT_VERIFY_CONCURRENCY,
            scratch_parent: loaded.temp_dir(),
            compare_source: true,
            source_margin: SOURCE_MARGIN,
            new_database_grace: NEW_DATABASE_GRACE,
        }
    }
}

/// How one key ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Ok,
    Problem,
    CouldNotCheck,
}

/// What is wrong with a key's backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    /// An object fails its checksums or is not what it should be.
    Damaged,
    /// A WAL segment is missing: the generation cannot be replayed to its end.
    Gap,
    /// The restored database fails `PRAGMA integrity_check`.
    Integrity,
    /// Nothing in the replica to restore.
    NotFound,
    /// The restore differs from a source unchanged since the replicated state.
    Mismatch,
    /// Restore refused for another reason about the replica's content
    /// (invalid metadata, say).
    Unrestorable,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Damaged => "damaged object",
            Problem::Gap => "continuity gap",
            Problem::Integrity => "integrity failure",
            Problem::NotFound => "not found",
            Problem::Mismatch => "differs from source",
            Problem::Unrestorable => "cannot be restored",
        }
    }
}

/// Why a key could not be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unverifiable {
    /// The store failed (after the client's and the download's retries).
    Transport,
    /// A local error: the scratch directory, disk full, a task that failed.
    Local,
}

impl Unverifiable {
    pub fn as_str(self) -> &'static str {
        match self {
            Unverifiable::Transport => "could not check (transport)",
            Unverifiable::Local => "could not check (local)",
        }
    }
}

/// What a failed restore says about the backup: a [`Problem`] with it, or
/// that the drill could not tell ([`Unverifiable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Problem(Problem),
    Unverifiable(Unverifiable),
}

/// Classifies a restore error (see the module docs). Restore's errors name
/// their kind by variant where they can ([`Error::Damaged`],
/// [`Error::Store`], [`Error::Io`], [`Error::NotFound`]); the hot tier's
/// continuity proof and the download retries report [`Error::Invalid`], told
/// apart by the words their messages are built from (and a hot-tier
/// failure that names a cold fallback wraps the original message).
pub fn classify(e: &Error) -> Verdict {
    let text = e.to_string();
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let integrity = || has(&["integrity_check failed", "quick_check failed"]);
    // An entry of a file:// replica that litefleet refuses to open or list
    // (a FIFO, a link to nothing): the replica's content, not the drill
    // (probe Y: "could not check (transport)").
    let not_an_object = || {
        has(&[
            "not a regular file",
            crate::replica::storage::LINK_TO_NOTHING,
            crate::replica::storage::DIRECTORY_LIKE_AN_OBJECT,
        ])
    };
    match e {
        Error::Store {
            source: object_store::Error::NotSupported { .. },
            ..
        } => Verdict::Problem(Problem::Damaged),
        Error::Store { .. } => Verdict::Unverifiable(Unverifiable::Transport),
        Error::Io { .. } | Error::Config { .. } => Verdict::Unverifiable(Unverifiable::Local),
        Error::NotFound(_) => Verdict::Problem(Problem::NotFound),
        Error::Damaged { .. } if integrity() => Verdict::Problem(Problem::Integrity),
        Error::Damaged { .. } => Verdict::Problem(Problem::Damaged),
        Error::Sqlite { source, .. } if super::install::says_unsound(source) => {
            Verdict::Problem(Problem::Integrity)
        }
        Error::Sqlite { .. }
        | Error::LeaseHeld { .. }
        | Error::LeaseLost { .. }
        | Error::LeasePaused { .. } => Verdict::Unverifiable(Unverifiable::Local),
        Error::Invalid { what, reason } => {
            // Also wrapped by a hot-tier failure that names a cold
            // fallback (black-box probe: a store failing every GET of a
            // generation's snapshot was "cannot be restored", exit 1).
            if not_an_object() {
                Verdict::Problem(Problem::Damaged)
            } else if reason.starts_with("download failed") || reason.contains(": download failed ")
            {
                Verdict::Unverifiable(Unverifiable::Transport)
            } else if what == "restore" && reason.starts_with("task failed") {
                Verdict::Unverifiable(Unverifiable::Local)
            } else if has(&[
                "past a gap",
                "WAL segment(s) from",
                "refusing to replay into WAL",
                "overlaps the previous segment",
                // A generation's snapshot missing (black-box probe G27, F5).
                "is in the replica: it was lost",
            ]) {
                Verdict::Problem(Problem::Gap)
            } else if integrity() {
                Verdict::Problem(Problem::Integrity)
            } else if has(&[
                "not a valid LZ4",
                "checksum",
                "not a SQLite database",
                "invalid page size",
                "salts",
                "WAL header",
                // Wrapped by the hot tier's "not falling back" (black-box
                // probe G27, F5: both were "cannot be restored").
                "not a valid pack",
                "not the snapshot that was uploaded",
            ]) {
                Verdict::Problem(Problem::Damaged)
            } else {
                Verdict::Problem(Problem::Unrestorable)
            }
        }
    }
}

/// How the restore compared with the database on this host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceCheck {
    pub path: PathBuf,
    /// `match`, `mismatch`, `newer` (the source changed after the replicated
    /// state: lag, not a problem) or `skipped`.
    pub result: SourceResult,
    pub detail: String,
    /// For `newer`: how much later the source's last change is.
    pub lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceResult {
    Match,
    Mismatch,
    Newer,
    Skipped,
}

/// The result of one key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyResult {
    pub key: String,
    pub status: Status,
    /// For a problem or could-not-check: what kind ([`Problem::as_str`],
    /// [`Unverifiable::as_str`]).
    pub what: Option<String>,
    /// For a problem or could-not-check: the error, naming the object.
    pub why: Option<String>,
    /// Where the restore came from (`cold` or `hot`) and its object(s).
    pub tier: Option<String>,
    pub object: Option<String>,
    /// The restored state's time (see [`super::RestoreOutcome::Restored`]).
    pub state: Option<DateTime<Utc>>,
    /// Size of the restored database.
    pub bytes: Option<u64>,
    /// The comparison with the database on this host, when there is one.
    pub source: Option<SourceCheck>,
    /// The files on this host that render this key (not in the report: the
    /// daemon uploads those of a key with a problem again).
    #[serde(skip)]
    pub sources: Vec<PathBuf>,
}

impl KeyResult {
    fn new(key: String) -> KeyResult {
        KeyResult {
            key,
            status: Status::Ok,
            what: None,
            why: None,
            tier: None,
            object: None,
            state: None,
            bytes: None,
            source: None,
            sources: Vec::new(),
        }
    }

    fn failed(mut self, e: &Error) -> KeyResult {
        let (status, what) = match classify(e) {
            Verdict::Problem(p) => (Status::Problem, p.as_str()),
            Verdict::Unverifiable(u) => (Status::CouldNotCheck, u.as_str()),
        };
        self.status = status;
        self.what = Some(what.to_string());
        self.why = Some(e.to_string());
        self
    }

    /// `key: what: why` for a problem or could-not-check, else `None`.
    pub fn failure_line(&self) -> Option<String> {
        (self.status != Status::Ok).then(|| {
            format!(
                "{}: {}: {}",
                self.key,
                self.what.as_deref().unwrap_or(""),
                self.why.as_deref().unwrap_or("")
            )
        })
    }
}

/// Totals of a verify run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub databases: usize,
    pub ok: usize,
    pub problems: usize,
    pub could_not_check: usize,
}

impl Summary {
    /// `verified N databases: X ok, Y problems, Z could not be checked`.
    pub fn line(&self) -> String {
        format!(
            "verified {} databases: {} ok, {} problems, {} could not be checked",
            self.databases, self.ok, self.problems, self.could_not_check
        )
    }

    /// The exit code of `litefleet verify`: 0 when every database was
    /// proven good, 1 when a problem was found, 2 when nothing was found
    /// wrong but some (or all) databases could not be checked.
    pub fn exit_code(&self) -> u8 {
        if self.problems > 0 {
            1
        } else if self.could_not_check > 0 || self.databases == 0 {
            2
        } else {
            0
        }
    }
}

/// What [`verify`] found: the results by key, and the totals.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub summary: Summary,
    pub started: DateTime<Utc>,
    pub seconds: f64,
    /// Sorted by key.
    pub results: Vec<KeyResult>,
}

/// Receives verify progress (implemented by [`crate::cli::progress`]).
pub trait VerifyProgress: Send + Sync {
    /// `total` keys will be checked.
    fn started(&self, total: usize);
    /// One key is done.
    fn finished(&self, result: &KeyResult);
}

/// A [`VerifyProgress`] that reports nothing (the daemon's runs).
pub struct Quiet;

impl VerifyProgress for Quiet {
    fn started(&self, _: usize) {}
    fn finished(&self, _: &KeyResult) {}
}

/// One key to check: what the replica lists for it (`None`: nothing, the
/// key comes from a database on this host) and its files on this host.
struct Job {
    key: String,
    listed: Option<KeyListing>,
    sources: Vec<PathBuf>,
}

/// Verifies the databases under `opts.prefix` (see the module docs).
///
/// Errors only when nothing can be attempted: a bad prefix, the listing
/// failed (the replica is unreachable), the scratch directory cannot be
/// made, or there is nothing to verify.
pub async fn verify(
    loaded: &Loaded,
    replica: &Replica,
    opts: &VerifyOptions,
    progress: &dyn VerifyProgress,
) -> Result<VerifyReport> {
    let started = Utc::now();
    let clock = std::time::Instant::now();
    let prefix = opts.prefix.trim_matches('/').to_string();
    if !prefix.is_empty() {
        check_key(&prefix)?;
    }
    let listed = list_databases(replica, Some(&prefix)).await?;
    let local = if opts.compare_source {
        let (patterns, template) = (loaded.patterns.clone(), loaded.template.clone());
        let prefix = prefix.clone();
        tokio::task::spawn_blocking(move || local_databases(&patterns, &template, &prefix))
            .await
            .map_err(|e| Error::invalid("verify", format!("discovery task failed: {e}")))?
    } else {
        BTreeMap::new()
    };
    let mut jobs = drop_new(
        jobs(listed, local, opts.since.is_none()),
        opts.new_database_grace,
    )
    .await;
    if let Some(since) = opts.since {
        jobs = recent(
            replica,
            jobs,
            since_cutoff(started, since),
            opts.concurrency,
        )
        .await;
    }
    if let Some(n) = opts.sample {
        jobs = sample(jobs, n);
    }
    if jobs.is_empty() {
        let under = if prefix.is_empty() {
            String::new()
        } else {
            format!(" under prefix {prefix:?}")
        };
        let since = opts
            .since
            .map(|d| format!(" with an upload within {}", humantime::format_duration(d)))
            .unwrap_or_default();
        return Err(Error::NotFound(format!(
            "no databases{under}{since} in {replica} to verify"
        )));
    }
    let scratch = Scratch::new(&opts.scratch_parent)?;
    progress.started(jobs.len());
    let mut done = futures::stream::iter(jobs.into_iter().enumerate())
        .map(|(i, job)| check_one(replica, opts, job, scratch.dir().join(format!("{i}.db"))))
        .buffer_unordered(opts.concurrency.max(1));
    let mut results = Vec::new();
    while let Some(r) = done.next().await {
        progress.finished(&r);
        results.push(r);
    }
    results.sort_by(|a, b| a.key.cmp(&b.key));
    let count = |s: Status| results.iter().filter(|r| r.status == s).count();
    let summary = Summary {
        databases: results.len(),
        ok: count(Status::Ok),
        problems: count(Status::Problem),
        could_not_check: count(Status::CouldNotCheck),
    };
    Ok(VerifyReport {
        summary,
        started,
        seconds: clock.elapsed().as_secs_f64(),
        results,
    })
}

/// The keys to check: every key the replica lists, with its files on this
/// host, and (when `with_missing`) the keys of databases on this host that
/// the replica does not hold.
fn jobs(
    listed: BTreeMap<String, KeyListing>,
    mut local: BTreeMap<String, Vec<PathBuf>>,
    with_missing: bool,
) -> Vec<Job> {
    let mut out: Vec<Job> = listed
        .into_iter()
        .map(|(key, l)| Job {
            sources: local.remove(&key).unwrap_or_default(),
            key,
            listed: Some(l),
        })
        .collect();
    if with_missing {
        out.extend(local.into_iter().map(|(key, sources)| Job {
            key,
            listed: None,
            sources,
        }));
    }
    out
}

/// Keeps the jobs with an object uploaded at or after `cutoff`: a cold
/// snapshot, a generation created since, or else an object of the key's
/// newest generation (one LIST of it; done `concurrency` at a time), or its
/// metadata written since or saying its frames go to the fleet log: those
/// are parts of shared log objects until the hourly consolidation, which
/// the generation's listing does not show (black-box probe G27: `--since`
/// checked none of 24 always-hot databases). A key whose newest generation
/// cannot be listed or read is kept: its check will say why.
async fn recent(
    replica: &Replica,
    jobs: Vec<Job>,
    cutoff: DateTime<Utc>,
    concurrency: usize,
) -> Vec<Job> {
    futures::stream::iter(jobs)
        .map(|job| async move {
            let l = job.listed.as_ref()?;
            if l.snapshots.iter().any(|s| s.uploaded >= cutoff)
                || l.generations.iter().any(|g| g.created() >= cutoff)
            {
                return Some(job);
            }
            let newest = l.generations.first()?;
            let listed = match hot::list_generation(replica, &job.key, newest).await {
                Ok(g) => g
                    .snapshots
                    .iter()
                    .map(|s| s.uploaded)
                    .chain(g.segments.iter().map(|s| s.uploaded))
                    .any(|t| t >= cutoff),
                Err(_) => return Some(job),
            };
            if listed {
                return Some(job);
            }
            match hot::read_metadata(replica, &job.key, newest).await {
                Ok(Some(m)) => (m.logged || m.written.is_some_and(|w| w >= cutoff)).then_some(job),
                Ok(None) => None,
                Err(_) => Some(job),
            }
        })
        .buffer_unordered(concurrency.max(1))
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// `n` jobs picked at random: ordered by a hash keyed with this process's
/// random seed, so each run draws another sample.
fn sample(mut jobs: Vec<Job>, n: usize) -> Vec<Job> {
    let seed = std::collections::hash_map::RandomState::new();
    jobs.sort_by_cached_key(|j| seed.hash_one(&j.key));
    jobs.truncate(n);
    jobs
}

/// The databases on this host under `prefix`, by key: every file the
/// config's patterns match (as `replicate` walks them), rendered through
/// the key template. A key rendered by several files maps to all of them.
fn local_databases(
    patterns: &[crate::source::discover::Pattern],
    template: &crate::source::template::KeyTemplate,
    prefix: &str,
) -> BTreeMap<String, Vec<PathBuf>> {
    struct Collect<'a> {
        patterns: &'a [crate::source::discover::Pattern],
        template: &'a crate::source::template::KeyTemplate,
        prefix: &'a str,
        found: BTreeMap<String, Vec<PathBuf>>,
    }
    impl Visitor for Collect<'_> {
        fn database(
            &mut self,
            dir: &Path,
            name: &OsStr,
            _: &std::fs::Metadata,
            _: Option<&std::fs::Metadata>,
        ) {
            let path = dir.join(name);
            let Some((key, _)) = key_for(self.patterns, self.template, &path) else {
                return;
            };
            let under = self.prefix.is_empty()
                || key == self.prefix
                || key
                    .strip_prefix(self.prefix)
                    .is_some_and(|rest| rest.starts_with('/'));
            // A key `restore` would refuse is kept: such a database is
            // not backed up (replicate refuses it at every scan), which
            // the drill reports rather than leaves out (black-box probe
            // G27, F8).
            if under {
                let paths = self.found.entry(key).or_default();
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }
        fn skipped(&mut self, _: &Path, _: &str) {}
        fn error(&mut self, path: &Path, err: std::io::Error) {
            tracing::debug!(path = %path.display(), error = %err, "verify: cannot read while discovering sources");
        }
    }
    let mut c = Collect {
        patterns,
        template,
        prefix,
        found: BTreeMap::new(),
    };
    for p in patterns {
        p.walk(&mut c);
    }
    c.found
}

/// Restores one key into `output`, checks it, compares it with its source
/// and deletes it.
async fn check_one(
    replica: &Replica,
    opts: &VerifyOptions,
    job: Job,
    output: PathBuf,
) -> KeyResult {
    let mut result = KeyResult::new(job.key.clone());
    result.sources = job.sources.clone();
    let Some(listed) = job.listed else {
        if let Err(e) = check_new_key(&job.key) {
            return result.failed(&Error::NotFound(format!(
                "not backed up: replicate refuses the key of {} ({e})",
                names(&job.sources)
            )));
        }
        return missing(result, &job.sources, opts.new_database_grace);
    };
    if let Some(why) = &listed.refused {
        return result.failed(&Error::invalid(format!("key {:?}", job.key), why.clone()));
    }
    let how = How {
        hot: !listed.generations.is_empty(),
        at: None,
        allow_older: false,
    };
    let restored = restore_key(
        replica,
        &job.key,
        listed.snapshots.clone(),
        how,
        &output,
        None,
    )
    .await;
    let mut result = match restored {
        Err(e) => result.failed(&e),
        Ok(None) => result.failed(&Error::NotFound(format!(
            "no snapshot or WAL generation of {:?} in {replica}",
            job.key
        ))),
        Ok(Some(r)) => {
            let mut result = result;
            result.tier = Some(r.tier.to_string());
            result.object = Some(r.object.clone());
            result.bytes = Some(r.bytes);
            result.state = Some(r.uploaded);
            if let Some(source) = job.sources.first() {
                result.source = Some(if job.sources.len() > 1 {
                    skipped(
                        source,
                        format!(
                            "{} files on this host render this key; not comparing",
                            job.sources.len()
                        ),
                    )
                } else {
                    let wal_end = r.wal_end;
                    let state = match r.tier {
                        Tier::Hot => Ok(Some(r.uploaded)),
                        Tier::Cold => cold_state(replica, &listed.snapshots, &r.object).await,
                    };
                    match state {
                        Ok(Some(state)) => {
                            let (source, restored, margin) =
                                (source.clone(), output.clone(), opts.source_margin);
                            tokio::task::spawn_blocking(move || {
                                compare(&source, &restored, state, margin, wal_end)
                            })
                            .await
                            .unwrap_or_else(|e| {
                                skipped(&job.sources[0], format!("comparison task failed: {e}"))
                            })
                        }
                        Ok(None) => skipped(
                            source,
                            "the snapshot records no copy time (written by an earlier version)",
                        ),
                        Err(e) => skipped(source, format!("cannot read the snapshot's times: {e}")),
                    }
                });
            }
            if let Some(SourceCheck {
                result: SourceResult::Mismatch,
                detail,
                path,
                ..
            }) = &result.source
            {
                result.status = Status::Problem;
                result.what = Some(Problem::Mismatch.as_str().to_string());
                result.why = Some(format!(
                    "restored {} ({}) differs from {}, unchanged since: {detail}",
                    r.object,
                    r.uploaded.to_rfc3339(),
                    path.display()
                ));
            }
            result
        }
    };
    if let Err(e) = remove_restore(&output) {
        tracing::warn!(path = %output.display(), error = %e, "verify: cannot delete a scratch restore");
        if result.status == Status::Ok {
            result = result.failed(&e);
        }
    }
    result
}

/// Drops the keys of databases on this host that the replica does not hold
/// and that may simply not be uploaded yet: files changed within
/// `grace` ([`NEW_DATABASE_GRACE`]), or that are not SQLite databases
/// (`replicate` uploads nothing else). The others stay, to be reported
/// "not found".
async fn drop_new(jobs: Vec<Job>, grace: Duration) -> Vec<Job> {
    let now = SystemTime::now();
    tokio::task::spawn_blocking(move || {
        jobs.into_iter()
            .filter(|j| {
                j.listed.is_some()
                    || j.sources.iter().any(|p| {
                        has_sqlite_header(p).unwrap_or(false)
                            && last_change(p)
                                .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= grace)
                    })
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// A database on this host that the replica does not hold (see [`drop_new`]).
fn missing(result: KeyResult, sources: &[PathBuf], grace: Duration) -> KeyResult {
    result.failed(&Error::NotFound(format!(
        "no snapshot or WAL generation in the replica for {} (unchanged for more than {})",
        names(sources),
        humantime::format_duration(grace)
    )))
}

/// `paths`, comma-separated.
fn names(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// The state time of the cold snapshot `object`: when its copy began.
async fn cold_state(
    replica: &Replica,
    snaps: &[cold::SnapshotInfo],
    object: &str,
) -> Result<Option<DateTime<Utc>>> {
    let Some(info) = snaps.iter().find(|s| s.location.as_ref() == object) else {
        return Ok(None);
    };
    Ok(cold::recorded_times(replica, info)
        .await?
        .map(|t| t.started))
}

fn skipped(path: &Path, detail: impl Into<String>) -> SourceCheck {
    SourceCheck {
        path: path.to_path_buf(),
        result: SourceResult::Skipped,
        detail: detail.into(),
        lag_seconds: None,
    }
}

/// The latest change of a database and its `-wal`: the database file's
/// `mtime` or `ctime`, the `-wal`'s `mtime` (its `ctime` moves at every open
/// by root, see the module docs); `None` when the database is gone. An
/// empty `-wal` holds no commit and is left out: a read-only connection
/// (the replicator's snapshot, this comparison) creates one where there was
/// none.
fn last_change(db: &Path) -> Option<SystemTime> {
    let at = |secs: i64, nanos: i64| {
        let d = Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
        SystemTime::UNIX_EPOCH + d
    };
    let m = std::fs::metadata(db).ok()?;
    let db_time = at(m.mtime(), m.mtime_nsec()).max(at(m.ctime(), m.ctime_nsec()));
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal_time = std::fs::metadata(&wal)
        .ok()
        .filter(|m| m.len() > 0)
        .map(|m| at(m.mtime(), m.mtime_nsec()));
    Some(wal_time.map_or(db_time, |w| w.max(db_time)))
}

/// What the comparison reads of a database: header fields, the schema and
/// the rows of every table.
#[derive(Debug, PartialEq, Eq)]
struct Facts {
    page_size: i64,
    encoding: String,
    user_version: i64,
    application_id: i64,
    /// (type, name, sql) of every schema object, sorted.
    schema: Vec<(String, String, Option<String>)>,
    /// Rows per table (virtual tables are left out: their module may be
    /// missing here; their shadow tables are counted).
    rows: BTreeMap<String, Rows>,
}

/// The rows of one table: how many, and a digest of their content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rows {
    count: i64,
    /// The wrapping sum of one [`row_digest`] per row: the same rows give
    /// the same sum in whatever order a scan meets them (a `VACUUM`ed or
    /// rebuilt copy stores them elsewhere), and a row changed, added or
    /// removed changes it. A row holds its `rowid` beside its columns (an
    /// application may refer to it); `WITHOUT ROWID` tables have none.
    digest: u64,
}

/// One row's digest: each value's type, length and bytes, in column order
/// (an integer and the text of its digits, a text and the blob of its bytes
/// and a NULL and an empty text all differ).
fn row_digest(row: &rusqlite::Row, columns: usize) -> rusqlite::Result<u64> {
    use rusqlite::types::ValueRef;
    use std::hash::Hasher;
    let mut h = twox_hash::XxHash64::with_seed(0);
    for i in 0..columns {
        match row.get_ref(i)? {
            ValueRef::Null => h.write_u8(0),
            ValueRef::Integer(v) => {
                h.write_u8(1);
                h.write_i64(v);
            }
            ValueRef::Real(v) => {
                h.write_u8(2);
                h.write_u64(v.to_bits());
            }
            ValueRef::Text(b) => {
                h.write_u8(3);
                h.write_usize(b.len());
                h.write(b);
            }
            ValueRef::Blob(b) => {
                h.write_u8(4);
                h.write_usize(b.len());
                h.write(b);
            }
        }
    }
    Ok(h.finish())
}

/// Reads every row of table `name` (see [`Rows`]).
fn table_rows(conn: &Connection, name: &str) -> rusqlite::Result<Rows> {
    let quoted = name.replace('"', "\"\"");
    // `rowid` names a column of that name where the table has one, which is
    // then read twice; a `WITHOUT ROWID` table has no `rowid` to select.
    let mut stmt = match conn.prepare(&format!("SELECT rowid, * FROM \"{quoted}\"")) {
        Ok(s) => s,
        Err(_) => conn.prepare(&format!("SELECT * FROM \"{quoted}\""))?,
    };
    let columns = stmt.column_count();
    let mut rows = stmt.query([])?;
    let mut out = Rows {
        count: 0,
        digest: 0,
    };
    while let Some(row) = rows.next()? {
        out.count += 1;
        out.digest = out.digest.wrapping_add(row_digest(row, columns)?);
    }
    Ok(out)
}

/// Reads [`Facts`] in one read transaction.
fn facts(path: &Path, conn: &Connection) -> Result<Facts> {
    let q = |e: rusqlite::Error| Error::sqlite(path, e);
    conn.execute_batch("BEGIN").map_err(q)?;
    let read = || -> rusqlite::Result<Facts> {
        let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0));
        let mut stmt =
            conn.prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")?;
        let schema: Vec<(String, String, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut rows = BTreeMap::new();
        for (kind, name, sql) in &schema {
            let is_virtual = sql
                .as_deref()
                .is_some_and(|s| s.to_ascii_uppercase().starts_with("CREATE VIRTUAL"));
            if kind == "table" && !is_virtual {
                rows.insert(name.clone(), table_rows(conn, name)?);
            }
        }
        Ok(Facts {
            page_size: pragma("page_size")?,
            encoding: conn.query_row("PRAGMA encoding", [], |r| r.get(0))?,
            user_version: pragma("user_version")?,
            application_id: pragma("application_id")?,
            schema,
            rows,
        })
    };
    let got = read();
    let _ = conn.execute_batch("COMMIT");
    got.map_err(q)
}

/// The first difference between two [`Facts`], in words.
fn difference(source: &Facts, restored: &Facts) -> Option<String> {
    let field = |name: &str, s: &dyn std::fmt::Debug, r: &dyn std::fmt::Debug| {
        format!("{name}: source {s:?}, restored {r:?}")
    };
    if source.page_size != restored.page_size {
        return Some(field("page size", &source.page_size, &restored.page_size));
    }
    if source.encoding != restored.encoding {
        return Some(field("encoding", &source.encoding, &restored.encoding));
    }
    if source.user_version != restored.user_version {
        return Some(field(
            "user_version",
            &source.user_version,
            &restored.user_version,
        ));
    }
    if source.application_id != restored.application_id {
        return Some(field(
            "application_id",
            &source.application_id,
            &restored.application_id,
        ));
    }
    if source.schema != restored.schema {
        let names = |f: &Facts| -> BTreeSet<String> {
            f.schema
                .iter()
                .map(|(k, n, _)| format!("{k} {n}"))
                .collect()
        };
        let (s, r) = (names(source), names(restored));
        let only_s: Vec<_> = s.difference(&r).collect();
        let only_r: Vec<_> = r.difference(&s).collect();
        return Some(format!(
            "schema differs (only in source: {only_s:?}; only in restore: {only_r:?}; or a definition changed)"
        ));
    }
    source
        .rows
        .iter()
        .find(|(t, n)| restored.rows.get(*t) != Some(n))
        .map(|(t, n)| match restored.rows.get(t) {
            Some(r) if r.count == n.count => format!(
                "table {t:?}: {} rows on both sides, but their content differs",
                n.count
            ),
            r => format!(
                "table {t:?}: source {} rows, restored {} rows",
                n.count,
                r.map_or(0, |r| r.count)
            ),
        })
}

/// What a live source's `-wal` says about a hot-tier restore ending at a
/// [`WalEnd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalSays {
    /// The same WAL (header), committed up to exactly the restored end:
    /// nothing was committed since the replicated state.
    Same,
    /// The same WAL, with commits after the restored end: the source is newer.
    Beyond,
    /// No `-wal`, another WAL (SQLite restarted it, or checkpointed and
    /// truncated it), or unreadable: the file times must tell.
    Unknown,
}

/// Reads the header and the committed end of the `-wal` beside `db` (see
/// [`WalSays`]). SQLite gives every restarted WAL new salts, and appends to
/// a WAL without rewriting it until then, so the same header and committed
/// end are the same commits.
fn source_wal(db: &Path, end: &WalEnd) -> WalSays {
    let mut path = db.as_os_str().to_owned();
    path.push("-wal");
    let path = PathBuf::from(path);
    let Ok(f) = std::fs::File::open(&path) else {
        return WalSays::Unknown;
    };
    let Ok(Some(h)) = wal::read_header(&f, &path) else {
        return WalSays::Unknown;
    };
    let cur = WalCursor::at_start(end.start.index, &h);
    if cur.wal_start() != end.start {
        return WalSays::Unknown;
    }
    match wal::read_committed_within(&f, &path, &cur, (u64::MAX, u64::MAX), 0) {
        Ok(ReadOutcome::Frames { next, .. }) => match next.pos.offset.cmp(&end.offset) {
            std::cmp::Ordering::Equal => WalSays::Same,
            std::cmp::Ordering::Greater => WalSays::Beyond,
            std::cmp::Ordering::Less => WalSays::Unknown,
        },
        _ => WalSays::Unknown,
    }
}

/// Compares the restore at `restored` (state time `state`; for the hot
/// tier, its end in the WAL) with `source` (see the module docs).
fn compare(
    source: &Path,
    restored: &Path,
    state: DateTime<Utc>,
    margin: Duration,
    wal_end: Option<WalEnd>,
) -> SourceCheck {
    let result = |result, detail: String, lag: Option<f64>| SourceCheck {
        path: source.to_path_buf(),
        result,
        detail,
        lag_seconds: lag,
    };
    let Some(before) = last_change(source) else {
        return skipped(source, "the source database is gone");
    };
    let changed: DateTime<Utc> = before.into();
    let lag = (changed - state).num_milliseconds().max(0) as f64 / 1000.0;
    let says = wal_end.map_or(WalSays::Unknown, |e| source_wal(source, &e));
    match says {
        WalSays::Same => {}
        WalSays::Beyond => {
            return result(
                SourceResult::Newer,
                format!(
                    "source newer than replica: its -wal holds commits after the restored state (lag {lag:.1}s)"
                ),
                Some(lag),
            )
        }
        WalSays::Unknown if changed > state => {
            return result(
                SourceResult::Newer,
                format!("source newer than replica (lag {lag:.1}s)"),
                Some(lag),
            )
        }
        WalSays::Unknown
            if changed >= state - chrono::Duration::from_std(margin).unwrap_or_default() =>
        {
            return skipped(
                source,
                format!(
                    "the source last changed at {}, within {} before the replicated state ({}): \
                     cannot tell whether the replica holds that change; not compared",
                    changed.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    humantime::format_duration(margin),
                    state.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                ),
            )
        }
        WalSays::Unknown => {}
    }
    // Never read a file that lost SQLite's header: SQLite would delete the
    // `-wal` beside an emptied one (see `snapshot::has_header`).
    let src = snapshot::open_read_only(source, None).and_then(|c| {
        if !snapshot::has_header(&c, source)? {
            return Err(snapshot::no_header(source));
        }
        facts(source, &c)
    });
    let moved =
        says == WalSays::Same && wal_end.is_some_and(|e| source_wal(source, &e) != WalSays::Same);
    if moved || last_change(source) != Some(before) {
        return result(
            SourceResult::Newer,
            "the source changed while it was read".into(),
            None,
        );
    }
    let src = match src {
        Ok(f) => f,
        Err(e) => return skipped(source, format!("cannot read the source: {e}")),
    };
    let rst = match Connection::open(restored)
        .map_err(|e| Error::sqlite(restored, e))
        .and_then(|c| facts(restored, &c))
    {
        Ok(f) => f,
        Err(e) => return skipped(source, format!("cannot read the restore: {e}")),
    };
    match difference(&src, &rst) {
        None => result(
            SourceResult::Match,
            format!(
                "page size, schema and rows of {} table(s) match",
                src.rows.len()
            ),
            None,
        ),
        Some(d) => result(SourceResult::Mismatch, d, None),
    }
}

/// The earliest upload time `--since` takes in, `since` before `started`;
/// the beginning of time when that is before chrono's first date
/// (`--since 600000y` panicked: black-box probe).
fn since_cutoff(started: DateTime<Utc>, since: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(since)
        .ok()
        .and_then(|d| started.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Names of drill scratch directories start with this (in `temp-dir`, or
/// the daemon's staging directory): a name the scan never enters
/// ([`crate::source::discover::OWN_DIR_MARK`]), since the restored
/// databases in it would be taken for sources where a pattern reaches into
/// `temp-dir` (black-box probe U31, F3).
pub const SCRATCH_PREFIX: &str = ".litefleet-verify-";
/// What scratch directories' names began with before: a killed drill's is
/// still removed.
const OLD_SCRATCH_PREFIX: &str = "verify-";

/// The file in a scratch directory that its drill holds locked (`flock`)
/// while it runs: a directory whose lock can be taken belongs to no running
/// drill.
const SCRATCH_LOCK: &str = ".lock";

/// A scratch directory without a lock file (one made by an earlier
/// version, or by a drill killed between making it and its lock) is
/// removed as stale once it is unchanged for this long.
const UNLOCKED_SCRATCH_AGE: Duration = Duration::from_secs(24 * 3600);

/// A drill's scratch directory, locked for as long as it lives, deleted on
/// drop (a drill interrupted by a signal is dropped too, see
/// [`crate::cli`]). What a killed drill left is removed by the next drill
/// and by `replicate`'s start ([`remove_stale_scratch`]).
pub struct Scratch {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl Scratch {
    /// Makes `.litefleet-verify-XXXXXX` under `parent` and locks it. An unusable
    /// `parent` is an error naming `multi-db.temp-dir`, as `replicate`'s.
    pub fn new(parent: &Path) -> Result<Scratch> {
        let named = |e: std::io::Error| {
            Error::invalid(
                "multi-db.temp-dir",
                format!("{} is not a writable directory: {e}", parent.display()),
            )
        };
        std::fs::create_dir_all(parent).map_err(named)?;
        let stale = remove_stale_scratch(parent) + remove_stale_daemon_scratch(parent);
        if stale > 0 {
            tracing::info!(dir = %parent.display(), removed = stale, "removed the scratch directories of interrupted drills");
        }
        let dir = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .tempdir_in(parent)
            .map_err(named)?
            .keep();
        // Locked before it gets its name: a cleaner that opened `.lock`
        // between its creation and our lock took the lock first and
        // removed a running drill's directory (CI, once).
        let locked = (|| {
            let fresh = dir.join(".lock.new");
            let f = std::fs::File::create(&fresh)?;
            f.try_lock().map_err(std::io::Error::from)?;
            std::fs::rename(&fresh, dir.join(SCRATCH_LOCK))?;
            Ok(f)
        })();
        match locked {
            Ok(lock) => Ok(Scratch { dir, _lock: lock }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(named(e))
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // A restore task still running may add a file while the directory
        // is emptied: try again. Whatever is left (unlocked once this
        // process is gone) is the next drill's to remove.
        for _ in 0..3 {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => {}
            }
        }
        tracing::warn!(dir = %self.dir.display(), "verify: cannot delete the scratch directory");
    }
}

/// [`remove_stale_scratch`] in each staging directory of a replicator
/// under `temp_dir` (named by its 16 hex digit state tag), where the
/// daemon's drills make their scratch: what a killed daemon's drill left
/// (a restored copy of a database per slot) went only with that
/// replicator's next start (black-box probe K20), though a standalone
/// `verify` is documented to remove it too.
fn remove_stale_daemon_scratch(temp_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(temp_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.len() == 16
                && name.bytes().all(|b| b.is_ascii_hexdigit())
                && e.file_type().is_ok_and(|t| t.is_dir())
        })
        .map(|e| remove_stale_scratch(&e.path()))
        .sum()
}

/// Removes the scratch directories under `parent` that belong to no running
/// drill: their lock can be taken (the drill that held it is gone: killed,
/// SIGKILL, power loss), or, without a lock file, they are unchanged for
/// `UNLOCKED_SCRATCH_AGE`. A running drill's directory is never removed:
/// its lock is held. Returns how many were removed.
pub fn remove_stale_scratch(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(SCRATCH_PREFIX) || name.starts_with(OLD_SCRATCH_PREFIX))
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let dir = entry.path();
        // Held while removing, so no two cleaners remove one directory.
        let _lock = match std::fs::File::open(dir.join(SCRATCH_LOCK)) {
            Ok(lock) => {
                if lock.try_lock().is_err() {
                    continue;
                }
                Some(lock)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= UNLOCKED_SCRATCH_AGE);
                if !old {
                    continue;
                }
                None
            }
            Err(_) => continue,
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the scratch directory of an interrupted drill")
            }
        }
    }
    removed
}

/// Deletes a scratch restore and any side file opening it left.
fn remove_restore(output: &Path) -> Result<()> {
    let mut files = super::install::side_files(output);
    files.push(output.to_path_buf());
    for f in files {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(f, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan never enters a drill's scratch directory.
    #[test]
    fn scratch_directories_are_never_scanned() {
        assert!(SCRATCH_PREFIX.starts_with(crate::source::discover::OWN_DIR_MARK));
    }

    fn invalid(what: &str, reason: &str) -> Error {
        Error::invalid(what, reason)
    }

    /// A drill (here `verify`'s) removes what killed drills left in the
    /// temp-dir and in each replicator's staging directory under it (the
    /// daemon's drills), but never a running drill's scratch (its lock is
    /// held), nor other directories.
    #[test]
    fn a_drill_removes_what_killed_drills_left_in_the_daemons_staging_too() {
        let tmp = tempfile::tempdir().unwrap();
        let staging = tmp.path().join("8cca8ca68ceb0bb9");
        let killed = |parent: &Path, name: &str| {
            let d = parent.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(SCRATCH_LOCK), b"").unwrap();
            std::fs::write(d.join(".1.db.litefleet-X1tio9"), b"a restored copy").unwrap();
            d
        };
        let left = [killed(tmp.path(), "verify-a"), killed(&staging, "verify-b")];
        let other = killed(&tmp.path().join("not-a-tag"), "verify-c");
        let running = killed(&staging, "verify-r");
        let lock = std::fs::File::open(running.join(SCRATCH_LOCK)).unwrap();
        lock.try_lock().unwrap();
        let scratch = Scratch::new(tmp.path()).unwrap();
        for d in &left {
            assert!(!d.exists(), "{d:?}");
        }
        assert!(running.exists() && scratch.dir().exists());
        assert!(other.exists());
    }

    #[test]
    fn errors_are_classified() {
        use Problem::*;
        use Unverifiable::*;
        let p = Verdict::Problem;
        let u = Verdict::Unverifiable;
        let cases = [
            (
                invalid(
                    "generation g of \"k\"",
                    "WAL segment 0000_* is missing (the next segment present is x); refusing to restore past a gap",
                ),
                p(Gap),
            ),
            (
                invalid(
                    "hot-tier restore (WAL generation)",
                    "generation g: WAL 0 ended at a (metadata.json), but the segments present end at b: WAL segment(s) from b to a are missing; refusing to restore past a gap; not falling back",
                ),
                p(Gap),
            ),
            (
                invalid(
                    "generation g of \"k\"",
                    "metadata.json records WAL frames shipped up to a, but the segments present end at b: WAL segment(s) from b on are missing; refusing to restore",
                ),
                p(Gap),
            ),
            (Error::damaged("k/db.lz4", "not a valid LZ4 snapshot: bad checksum"), p(Damaged)),
            // A FIFO or a link to nothing in a file:// replica (probe Y).
            (
                Error::store(
                    "k/gen/metadata.json",
                    object_store::Error::NotSupported {
                        source: "/r/k/metadata.json is a FIFO (named pipe), not a regular file".into(),
                    },
                ),
                p(Damaged),
            ),
            (
                invalid(
                    "hot-tier restore (WAL generation)",
                    "download failed: /r/k/x.wal.lz4 is a FIFO (named pipe), not a regular file: opening it would block",
                ),
                p(Damaged),
            ),
            (Error::damaged("k/db.lz4", "integrity_check failed: row 3 missing"), p(Integrity)),
            (
                invalid("hot-tier restore (WAL generation)", "k/gen/s.lz4: not a valid LZ4 snapshot: x; not falling back"),
                p(Damaged),
            ),
            (invalid("seg", "WAL checksum chain broken at frame 2 of 3"), p(Damaged)),
            (
                invalid(
                    "hot-tier restore (WAL generation)",
                    ".litefleet/log/x.pack: not a valid pack: index of 2831 bytes in an object of 300; not falling back",
                ),
                p(Damaged),
            ),
            (
                invalid(
                    "hot-tier restore (WAL generation)",
                    "k/generations/g/snapshots/s.snapshot.lz4: its size is 342 bytes where metadata.json recorded 332 bytes at its upload: not the snapshot that was uploaded; not falling back",
                ),
                p(Damaged),
            ),
            (
                invalid(
                    "generation g of \"k\"",
                    "its metadata.json records 1 snapshot(s) uploaded, but no snapshot of it is in the replica: it was lost; refusing to restore an older generation or cold snapshot in its place",
                ),
                p(Gap),
            ),
            (Error::NotFound("nothing".into()), p(NotFound)),
            (invalid("k/x.lz4", "download failed 3 times, the last with: reset"), u(Transport)),
            (
                invalid(
                    "hot-tier restore (WAL generation)",
                    "k/gen/s.lz4: download failed 3 times, the last with: 500 checksum; not falling back",
                ),
                u(Transport),
            ),
            // The restore's output file (disk full): its path, by variant.
            (
                Error::io("/out/.x.db.litefleet-1", std::io::Error::other("no space")),
                u(Local),
            ),
            (Error::io("/tmp/x", std::io::Error::other("disk full")), u(Local)),
            (
                Error::store("k", object_store::Error::Generic { store: "S3", source: "down".into() }),
                u(Transport),
            ),
            (invalid("k/metadata.json", "invalid metadata: eof"), p(Unrestorable)),
        ];
        for (e, want) in cases {
            assert_eq!(classify(&e), want, "{e}");
        }
    }

    #[test]
    fn exit_codes() {
        let s = |ok, problems, could_not_check| Summary {
            databases: ok + problems + could_not_check,
            ok,
            problems,
            could_not_check,
        };
        assert_eq!(s(3, 0, 0).exit_code(), 0);
        assert_eq!(s(3, 1, 0).exit_code(), 1);
        assert_eq!(s(3, 1, 2).exit_code(), 1);
        assert_eq!(s(3, 0, 1).exit_code(), 2);
        assert_eq!(s(0, 0, 3).exit_code(), 2);
        assert_eq!(
            s(2, 1, 0).line(),
            "verified 3 databases: 2 ok, 1 problems, 0 could not be checked"
        );
    }

    #[test]
    fn comparison_waits_for_an_unchanged_source() {
        let dir = tempfile::tempdir().unwrap();
        let (src, rst) = (dir.path().join("s.db"), dir.path().join("r.db"));
        for (p, rows) in [(&src, 3), (&rst, 2)] {
            let c = Connection::open(p).unwrap();
            c.execute_batch("CREATE TABLE t(x); CREATE TABLE \"we\"\"ird\"(y);")
                .unwrap();
            for i in 0..rows {
                c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
            }
        }
        let later = Utc::now() + chrono::Duration::seconds(10);
        let c = compare(&src, &rst, later, SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Mismatch, "{c:?}");
        assert!(
            c.detail
                .contains("table \"t\": source 3 rows, restored 2 rows"),
            "{c:?}"
        );
        // A state older than the source's last change: lag, not a problem.
        let earlier = Utc::now() - chrono::Duration::seconds(30);
        let c = compare(&src, &rst, earlier, SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Newer, "{c:?}");
        assert!(c.lag_seconds.unwrap() >= 29.0, "{c:?}");
        // Within the margin before the state: not compared, and not called
        // newer either (it may not be).
        let c = compare(&src, &rst, Utc::now(), SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Skipped, "{c:?}");
        assert!(c.detail.contains("cannot tell"), "{c:?}");
        // Equal content matches.
        let c = compare(&src, &src, later, SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Match, "{c:?}");
        assert!(c.detail.contains("2 table(s)"), "{c:?}");
        // A WAL-mode source: reading it leaves an empty -wal behind, which
        // is no change.
        let conn = Connection::open(&src).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.execute("INSERT INTO t VALUES (9)", []).unwrap();
        drop(conn);
        let later = Utc::now() + chrono::Duration::seconds(10);
        let c = compare(&src, &src, later, SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Match, "{c:?}");
        assert!(c.detail.contains("2 table(s)"), "{c:?}");
    }

    #[test]
    fn any_since_has_a_cutoff() {
        let now = Utc::now();
        let hour = Duration::from_secs(3600);
        assert_eq!(since_cutoff(now, hour), now - chrono::Duration::hours(1));
        for years in [600_000, 300_000_000] {
            let since = Duration::from_secs(years * 365 * 86_400);
            assert_eq!(since_cutoff(now, since), DateTime::<Utc>::MIN_UTC);
        }
        assert_eq!(since_cutoff(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
    }

    /// The same number of rows with other content is a mismatch (black-box
    /// probe: a restore of another state with the same row counts was
    /// reported as a match); the same rows stored elsewhere are not.
    #[test]
    fn content_is_compared_not_only_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (src, rst) = (dir.path().join("s.db"), dir.path().join("r.db"));
        let fill = |p: &Path, reverse: bool, last: &str| {
            let c = Connection::open(p).unwrap();
            c.execute_batch(
                "CREATE TABLE t(x, y); CREATE TABLE w(k TEXT PRIMARY KEY, v) WITHOUT ROWID;",
            )
            .unwrap();
            let mut ids: Vec<i64> = (1..=50).collect();
            if reverse {
                ids.reverse();
            }
            for i in ids {
                c.execute(
                    "INSERT INTO t(rowid, x, y) VALUES (?1, ?2, zeroblob(100))",
                    rusqlite::params![i, i * 7],
                )
                .unwrap();
                c.execute(
                    "INSERT INTO w VALUES (?1, ?2)",
                    rusqlite::params![format!("k{i}"), i],
                )
                .unwrap();
            }
            c.execute("UPDATE w SET v = ?1 WHERE k = 'k50'", [last])
                .unwrap();
        };
        let later = || Utc::now() + chrono::Duration::seconds(10);
        // The same rows, written in the other order: a match.
        fill(&src, false, "end");
        fill(&rst, true, "end");
        let c = compare(&src, &rst, later(), SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Match, "{c:?}");
        assert!(c.detail.contains("rows of 2 table(s) match"), "{c:?}");
        // A rebuilt copy stores them elsewhere: still a match.
        Connection::open(&rst)
            .unwrap()
            .execute_batch("VACUUM")
            .unwrap();
        let c = compare(&src, &rst, later(), SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Match, "{c:?}");
        // One value of a WITHOUT ROWID table differs.
        std::fs::remove_file(&rst).unwrap();
        fill(&rst, false, "END");
        let c = compare(&src, &rst, later(), SOURCE_MARGIN, None);
        assert_eq!(c.result, SourceResult::Mismatch, "{c:?}");
        assert!(
            c.detail
                .contains("table \"w\": 50 rows on both sides, but their content differs"),
            "{c:?}"
        );
        // The same values under other rowids differ too; so do an integer
        // and the text of its digits.
        let edited = |sql: &str| {
            Connection::open(&rst).unwrap().execute_batch(sql).unwrap();
            compare(&src, &rst, later(), SOURCE_MARGIN, None)
        };
        let c = edited(
            "UPDATE w SET v = 'end' WHERE k = 'k50'; UPDATE t SET rowid = 1000 WHERE rowid = 1;",
        );
        assert_eq!(c.result, SourceResult::Mismatch, "{c:?}");
        assert!(
            c.detail.contains("table \"t\": 50 rows on both sides"),
            "{c:?}"
        );
        let c = edited(
            "UPDATE t SET rowid = 1 WHERE rowid = 1000; UPDATE t SET x = '7' WHERE rowid = 1;",
        );
        assert_eq!(c.result, SourceResult::Mismatch, "{c:?}");
    }

    /// The first file-system tick after `than`: file times come from a
    /// coarse clock, so a change made right after `than` can carry its time.
    fn a_tick_after(dir: &Path, than: SystemTime) -> SystemTime {
        let probe = dir.join("tick");
        loop {
            std::fs::write(&probe, b"").unwrap();
            let t = std::fs::metadata(&probe).unwrap().modified().unwrap();
            if t > than {
                return t;
            }
            std::thread::yield_now();
        }
    }

    /// SQLite running as root `fchown`s a `-wal` at every open (the daemon's
    /// snapshots, this comparison's own read), which moves its `ctime`: that
    /// is no change of the database, or verify as root would never compare
    /// a live WAL database. Done here with the owner the file already has,
    /// which any user may do.
    #[test]
    fn an_owner_kept_on_the_wal_is_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("s.db");
        let live = Connection::open(&src).unwrap();
        live.pragma_update(None, "journal_mode", "wal").unwrap();
        live.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        let wal = dir.path().join("s.db-wal");
        let written = std::fs::metadata(&wal).unwrap().modified().unwrap();
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        let state = a_tick_after(dir.path(), written);
        let before = last_change(&src).unwrap();
        assert!(before < state);
        // A later open by root keeps the owner and moves the `ctime` only.
        let moved = a_tick_after(dir.path(), state);
        let m = std::fs::metadata(&wal).unwrap();
        std::os::unix::fs::chown(&wal, Some(m.uid()), Some(m.gid())).unwrap();
        let ctime = std::fs::metadata(&wal).unwrap().ctime();
        assert!(
            ctime
                >= moved
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64
        );
        assert_eq!(last_change(&src), Some(before));
        let c = compare(&src, &src, state.into(), Duration::ZERO, None);
        assert_eq!(c.result, SourceResult::Match, "{c:?}");
        drop(live);
    }
}
