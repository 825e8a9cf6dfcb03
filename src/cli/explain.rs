//! `litefleet explain`: what a config will do and cost, before it runs.
//!
//! Reads the config and the local disk only: it sends no request to the
//! replica, takes no lease, writes nothing (not the replica directory, not
//! the state file, not the staging directory) and opens no database with
//! SQLite. What it reports:
//!
//! 1. the resolved config, defaults filled in and credentials masked (an
//!    access key shows at most its AWS type prefix, `AKIA…(masked)`; a
//!    secret key is `****`);
//! 2. per pattern, the databases it matches now, found by the real walker
//!    ([`crate::source::discover`]) and counted only when they carry the
//!    SQLite header, as `replicate` does, with example `path -> key`
//!    mappings ([`crate::source::keys::key_for`]); a pattern that matches
//!    nothing is a warning, with what a relative pattern resolved to;
//! 3. the keys `replicate` would refuse in the matched set, as it would
//!    (see [`crate::source::keys`]): keys that break the key rule `restore`
//!    applies ([`crate::replica::layout::key_problem`]: an empty, `.` or
//!    `..` segment), and key collisions (two databases rendering one key:
//!    `replicate` would refuse all but one); patterns that name single
//!    files with one key are already a config error
//!    ([`crate::source::keys::certain_collision`]);
//! 4. limits that will bite: open files against `max-hot-databases`
//!    ([`super::bench::nofile_needed`], the check `replicate` makes) and,
//!    with `watch` on, inotify's per-user watches against the directories
//!    holding databases (one watch per directory, [`crate::source::watch`]);
//! 5. how many databases are likely hot (written within `hot-duration`, in
//!    WAL mode: [`crate::capture::ship::stream_candidate`], the scheduler's
//!    own test) or changing (written within the last hour), and the monthly
//!    S3 bill of that fleet from [`super::cost::CostModel`], the model of
//!    `bench cost`, with the description's scenario beside it.
//!
//! A config that does not load is an error (exit 1). Warnings (refused
//! keys among them: the config loads, the files are the problem) are
//! printed and exit 0, unless `--strict`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::io::{self, Write};

use crate::cli::logline::shown;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::cost::{
    thousands, usd_text, Bill, CostModel, FleetLoad, RequestRates, GET_USD, PUT_USD,
};
use crate::replica::layout::new_key_problem;
use crate::replica::storage::{ReplicaUrl, Secret};
use crate::source::config::{self, Loaded};
use crate::source::discover::Visitor;
use crate::source::keys::key_for;
use crate::source::vfs::has_sqlite_header;
use crate::{Error, Result};

/// Example `path -> key` mappings shown per pattern.
pub const EXAMPLES: usize = 3;
/// Collisions listed in the text output (JSON lists them all).
const COLLISIONS_SHOWN: usize = 10;
/// Read errors kept for the warnings: the first few say what is wrong.
const ERRORS_KEPT: usize = 5;
/// "Changing" means written within this long: the cold tier uploads a
/// changing database at most once per hour (next-hour names).
pub const CHANGING_WINDOW: Duration = Duration::from_secs(3600);

/// A `lease-ttl` below this is warned about: renewals every 3 s and writes
/// paused after 7.5 s without one ride out the stalls a loaded store has
/// (black-box probe S31: with 2 s on a loaded moto server, writes paused
/// and 5 of 14 clean stops exited 1, "replica behind").
const SHORT_LEASE_TTL: Duration = Duration::from_secs(10);

/// What to assume instead of measuring.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExplainOptions {
    /// Hot databases to bill instead of the recently written ones.
    pub hot: Option<u64>,
}

/// One resolved setting.
#[derive(Debug, Clone, Serialize)]
pub struct Setting {
    pub key: String,
    pub value: String,
    /// The value is the built-in default.
    pub default: bool,
}

/// One `path -> key` mapping.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mapping {
    pub path: String,
    pub key: String,
}

/// What one pattern matches.
#[derive(Debug, Clone, Serialize)]
pub struct PatternReport {
    pub index: usize,
    /// As written in the config.
    pub pattern: String,
    /// Absolute, as the walker uses it.
    pub resolved: String,
    /// Where walking starts, and whether it exists.
    pub root: String,
    pub root_exists: bool,
    /// SQLite databases it matches (also those an earlier pattern matched).
    pub databases: u64,
    /// Of those, matched by an earlier pattern too (keyed by that one).
    pub also_earlier: u64,
    /// Matching files without the SQLite header (not replicated).
    pub not_sqlite: u64,
    /// Matching symlinks (not followed).
    pub symlinks: u64,
    /// Matching FIFOs, sockets and devices (never opened). They were
    /// counted as symlinks (black-box probe U31, F6).
    pub not_regular: u64,
    /// The first [`EXAMPLES`] databases in path order, with their keys.
    pub examples: Vec<Mapping>,
}

/// Databases that would share one key.
#[derive(Debug, Clone, Serialize)]
pub struct Collision {
    pub key: String,
    /// Sorted; `replicate` keeps one (on a fresh start, the earlier
    /// pattern's, else the smaller path) and refuses the others.
    pub paths: Vec<String>,
}

/// A database whose key breaks the key rule: `replicate` refuses it.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedKey {
    pub path: String,
    pub key: String,
    /// What is wrong with the key.
    pub reason: String,
}

/// Process limits against what the config needs.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    /// What `replicate` wants for `max-hot-databases`.
    pub nofile_needed: u64,
    pub watch: bool,
    /// Distinct directories holding matched databases: one inotify watch each.
    pub directories: u64,
    pub inotify_max_user_watches: Option<u64>,
    pub inotify_max_user_instances: Option<u64>,
}

/// How busy the fleet is now, from modification times.
#[derive(Debug, Clone, Serialize)]
pub struct Activity {
    /// WAL-mode databases written within `hot-duration`: stream candidates.
    pub hot_candidates: u64,
    /// Databases written within `hot-duration` that are not in WAL mode
    /// (they cannot stream; the cold tier uploads them).
    pub recent_not_wal: u64,
    /// Databases written within [`CHANGING_WINDOW`] (the hot ones included).
    pub changed_last_hour: u64,
    /// `--hot` was given.
    pub hot_overridden: bool,
    /// Billed as hot: the candidates (or `--hot`), at most `max-hot-databases`.
    pub hot: u64,
    /// Busy beyond `max-hot-databases`: one cold upload per scan each.
    pub over_max_hot: u64,
    /// Changing within the hour but not hot: about one upload per hour each.
    pub cold_changing: u64,
}

/// The bill of the fleet as found, and of the description's scenario.
#[derive(Debug, Clone, Serialize)]
pub struct CostEstimate {
    pub model: CostModel,
    pub assumptions: Vec<String>,
    pub load: FleetLoad,
    pub bill: Bill,
    /// The first upload of every database (once, not monthly).
    pub initial_puts: u64,
    pub scenario_load: FleetLoad,
    pub scenario: Bill,
}

/// Everything `explain` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub config_file: String,
    pub settings: Vec<Setting>,
    pub patterns: Vec<PatternReport>,
    /// Distinct databases over all patterns.
    pub databases: u64,
    /// Distinct valid keys.
    pub distinct_keys: u64,
    pub collisions: Vec<Collision>,
    /// Sorted by key, then path.
    pub refused_keys: Vec<RefusedKey>,
    pub limits: Limits,
    pub activity: Activity,
    pub cost: CostEstimate,
    pub warnings: Vec<String>,
}

/// A database found by the walk.
struct Found {
    /// Newest modification of the file and its `-wal`.
    newest: Option<SystemTime>,
}

/// Collects one pattern's matches.
#[derive(Default)]
struct Collect {
    found: Vec<(PathBuf, Option<SystemTime>)>,
    not_sqlite: u64,
    symlinks: u64,
    not_regular: u64,
    errors: Vec<String>,
    error_count: u64,
}

impl Visitor for Collect {
    fn database(&mut self, dir: &Path, name: &OsStr, db: &Metadata, wal: Option<&Metadata>) {
        let path = dir.join(name);
        match has_sqlite_header(&path) {
            Ok(true) => {
                let newest = [Some(db), wal]
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.modified().ok())
                    .max();
                self.found.push((path, newest));
            }
            Ok(false) => self.not_sqlite += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => self.error(&path, e),
        }
    }

    fn skipped(&mut self, _: &Path, reason: &str) {
        match reason.contains("symlink") {
            true => self.symlinks += 1,
            false => self.not_regular += 1,
        }
    }

    fn error(&mut self, path: &Path, err: io::Error) {
        self.error_count += 1;
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(format!("{}: {err}", path.display()));
        }
    }
}

/// Longest file name Linux file systems store (`NAME_MAX`).
const FILE_NAME_MAX: usize = 255;

/// Longest object name S3 takes, in bytes.
const S3_NAME_MAX: usize = 1024;

/// Adds a warning per item of `items` (at most [`COLLISIONS_SHOWN`]),
/// then one counting the rest: "... and N more `more`".
fn warn_capped<T>(
    warnings: &mut Vec<String>,
    items: &[T],
    line: impl Fn(&T) -> String,
    more: &str,
) {
    warnings.extend(items.iter().take(COLLISIONS_SHOWN).map(line));
    if items.len() > COLLISIONS_SHOWN {
        warnings.push(format!(
            "... and {} more {more}",
            items.len() - COLLISIONS_SHOWN
        ));
    }
}

/// What a `file://` upload adds to an object's file name while it is
/// written: it is staged as `<name>#<n>` (`#1` unless a crashed writer
/// left one), so a name of 254 or 255 bytes never stores (black-box probe:
/// `explain` said nothing, every upload failed with "File name too long").
const STAGING_SUFFIX: usize = "#1".len();

/// What the hot tier adds to a key's object path at most, measured on the
/// names it writes (their fields are fixed-width hex): a fleet-log pack,
/// `/generations/<id>/wal/<index>_<offset>_<time>_<random>.pack`, is the
/// longest, 6 bytes more than a WAL segment (black-box probe: keys 919 to
/// 924 bytes long were not warned about, and S3 would refuse every pack).
fn hot_suffix_max() -> usize {
    use crate::replica::hot;
    let root = object_store::path::Path::default();
    let now = chrono::Utc::now();
    let gen = hot::new_generation_id_after(now, None);
    let far = hot::Position {
        index: u64::MAX,
        offset: u64::MAX,
    };
    [
        hot::segment_path(&root, "k", &gen, far, now),
        hot::pack_path(&root, "k", &gen, far, now),
        hot::snapshot_path(&root, "k", &gen, u64::MAX, now),
        hot::metadata_path(&root, "k", &gen),
    ]
    .iter()
    .map(|p| p.as_ref().len() - "k".len())
    .max()
    .unwrap_or(0)
}

/// Why `dir` cannot be created or written by this process, without
/// creating anything: its nearest existing ancestor is no directory, or is
/// not writable (when `dir` itself is missing) or `dir` is not writable.
fn not_creatable(dir: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir
        .ancestors()
        .find(|a| std::fs::symlink_metadata(a).is_ok())?;
    match std::fs::metadata(existing) {
        Ok(m) if !m.is_dir() => return Some(format!("{} is not a directory", existing.display())),
        Err(e) => return Some(format!("{}: {e}", existing.display())),
        Ok(_) => {}
    }
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: access(2) on a NUL-terminated path; no other effect.
    let writable = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    (!writable).then(|| format!("{} is not writable", existing.display()))
}

/// `file` as the config file was named; relative patterns and paths
/// resolved against the config file's directory (as [`Loaded::from_file`] does).
pub fn explain(loaded: &Loaded, file: &Path, opts: ExplainOptions) -> Result<Explanation> {
    let m = loaded.multi_db();
    // The S3 client is built (not used) so that what `replicate` would
    // refuse at start (a lone access key, a bad endpoint) is refused here.
    // A file:// replica is not opened: opening creates its directory.
    if let ReplicaUrl::S3 { .. } = loaded.replica {
        drop(loaded.open_replica()?);
    }
    let base = loaded.base.clone();
    let mut warnings = Vec::new();
    // What `replicate` refuses at start, before it touches anything
    // (black-box probe: `explain --strict` passed such configs).
    if !m.enabled {
        warnings.push(
            "multi-db.enabled is false: replicate refuses to start (list and restore still work)"
                .to_string(),
        );
    }
    let state_file = loaded.state_file();
    let mut dirs = vec![
        ("multi-db.temp-dir", loaded.temp_dir()),
        (
            "multi-db.state-dir",
            state_file.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ),
    ];
    if let ReplicaUrl::File { dir } = &loaded.replica {
        dirs.push(("multi-db.replica.url", dir.clone()));
    }
    for (key, dir) in dirs {
        if let Some(why) = not_creatable(&dir) {
            warnings.push(format!(
                "{key}: {} cannot be a writable directory ({why}): replicate refuses to start",
                dir.display()
            ));
        }
    }

    let ttl = m.replica.lease_ttl;
    if ttl < SHORT_LEASE_TTL {
        warnings.push(format!(
            "multi-db.replica.lease-ttl {} is short: the lease is renewed every {}, and writes pause once no renewal has succeeded for {} (three quarters of it), so a store that stalls that long (a loaded S3-compatible server) pauses replication, and a stop then exits 1 \"stopped with the replica behind\"; the default is {}",
            dur(ttl),
            dur(ttl / 3),
            dur(ttl - ttl / 4),
            dur(crate::replica::lease::DEFAULT_TTL)
        ));
    }

    // 2. Patterns: the real walker, one pattern at a time.
    let mut all: HashMap<PathBuf, Found> = HashMap::new();
    let mut patterns = Vec::new();
    for (i, p) in loaded.patterns.iter().enumerate() {
        let mut c = Collect::default();
        p.walk(&mut c);
        let mut also_earlier = 0;
        let mut examples: Vec<PathBuf> = Vec::new();
        let databases = c.found.len() as u64;
        for (path, newest) in c.found {
            if let Some(at) = examples.binary_search(&path).err() {
                if at < EXAMPLES {
                    examples.insert(at, path.clone());
                    examples.truncate(EXAMPLES);
                }
            }
            match all.entry(path) {
                std::collections::hash_map::Entry::Occupied(_) => also_earlier += 1,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Found { newest });
                }
            }
        }
        // As the walker sees it: `./` dropped, `..` kept.
        let resolved: PathBuf = base
            .join(p.source())
            .components()
            .filter(|c| *c != std::path::Component::CurDir)
            .collect();
        let resolved = resolved.display().to_string();
        let root_exists = p.root().is_dir();
        if databases == 0 {
            let why = if root_exists {
                format!(
                    "{} exists, but nothing below it matches",
                    p.root().display()
                )
            } else {
                format!("{} does not exist", p.root().display())
            };
            let not_sqlite = match c.not_sqlite {
                0 => String::new(),
                n => format!("; {n} matching file(s) are not SQLite databases"),
            };
            warnings.push(format!(
                "multi-db.patterns[{i}] {:?} matches no SQLite database (resolved to {resolved}: {why}{not_sqlite})",
                p.source()
            ));
        }
        if c.error_count > 0 {
            warnings.push(format!(
                "multi-db.patterns[{i}]: {} path(s) could not be read (replicate retries them every scan): {}",
                c.error_count,
                c.errors.join("; ")
            ));
        }
        patterns.push(PatternReport {
            index: i,
            pattern: p.source().to_string(),
            resolved,
            root: p.root().display().to_string(),
            root_exists,
            databases,
            also_earlier,
            not_sqlite: c.not_sqlite,
            symlinks: c.symlinks,
            not_regular: c.not_regular,
            examples: examples
                .iter()
                .map(|path| Mapping {
                    path: path.display().to_string(),
                    key: key_for(&loaded.patterns, &loaded.template, path)
                        .map(|(k, _)| k)
                        .unwrap_or_default(),
                })
                .collect(),
        });
    }

    // 3. Keys of the matched set.
    let mut by_key: HashMap<String, Vec<&Path>> = HashMap::with_capacity(all.len());
    let mut refused_keys = Vec::new();
    for path in all.keys() {
        if path.to_str().is_none() {
            // What `replicate` refuses (see `source::keys::Owners::update`).
            refused_keys.push(RefusedKey {
                path: path.display().to_string(),
                key: path.to_string_lossy().into_owned(),
                reason: "its path is not valid UTF-8, and keys are UTF-8 text".into(),
            });
            continue;
        }
        if let Some((key, _)) = key_for(&loaded.patterns, &loaded.template, path) {
            match new_key_problem(&key) {
                Some(why) => refused_keys.push(RefusedKey {
                    path: path.display().to_string(),
                    key,
                    reason: why.to_string(),
                }),
                None => by_key.entry(key).or_default().push(path),
            }
        }
    }
    refused_keys.sort_by(|a, b| (&a.key, &a.path).cmp(&(&b.key, &b.path)));
    warn_capped(
        &mut warnings,
        &refused_keys,
        |r| {
            format!(
            "refused key: {} renders key {:?}: {}; restore refuses such a key, so replicate does not back it up (rename the file or change multi-db.patterns or multi-db.replica.path)",
            r.path, r.key, r.reason
        )
        },
        "refused key(s) (see --json)",
    );
    // A file:// replica stores each object path part as a file name, at
    // most 255 bytes (black-box probe: a 243-byte database name failed
    // every upload with "File name too long", and --strict passed). S3
    // takes object names of at most 1,024 bytes, and a key's characters
    // that need encoding take 3 bytes each in them (probe V: an 80-character
    // CJK tenant name failed every upload with KeyTooLongError).
    let s3_prefix = match &loaded.replica {
        // The prefix as object names hold it (encoded), and the `/` after
        // it: none for a bucket's root.
        ReplicaUrl::S3 { prefix, .. } => Some(
            match object_store::path::Path::from(prefix.as_str())
                .as_ref()
                .len()
            {
                0 => 0,
                n => n + 1,
            },
        ),
        ReplicaUrl::File { .. } => None,
    };
    let mut deep: Vec<(String, String)> = by_key
        .values()
        .flatten()
        .filter_map(|p| {
            crate::source::discover::path_too_long(p).map(|why| (p.display().to_string(), why))
        })
        .collect();
    deep.sort();
    warn_capped(
        &mut warnings,
        &deep,
        |(p, why)| format!("{p}: {why}"),
        "databases whose paths are too long for SQLite",
    );
    let hot_suffix = hot_suffix_max();
    // The databases whose object names are too long, and whether their
    // cold snapshots' are (else only the hot tier's).
    let mut long: Vec<(String, bool)> = by_key
        .iter()
        .flat_map(|(key, paths)| paths.iter().map(move |p| (key, p)))
        .filter_map(|(key, p)| {
            let stem = p
                .file_name()
                .and_then(|n| n.to_str())
                .map(crate::source::template::stem)
                .unwrap_or_default();
            let object = crate::replica::cold::snapshot_path(
                &object_store::path::Path::default(),
                key,
                stem,
                chrono::Utc::now(),
            );
            let (cold, hot) = match s3_prefix {
                None => {
                    let parts: Vec<_> = object.parts().collect();
                    let last = parts.len().saturating_sub(1);
                    let cold = parts.iter().enumerate().any(|(i, part)| {
                        let staging = if i == last { STAGING_SUFFIX } else { 0 };
                        part.as_ref().len() + staging > FILE_NAME_MAX
                    });
                    (cold, false)
                }
                Some(prefix) => {
                    let key =
                        crate::replica::layout::key_path(&object_store::path::Path::default(), key);
                    (
                        prefix + object.as_ref().len() > S3_NAME_MAX,
                        prefix + key.as_ref().len() + hot_suffix > S3_NAME_MAX,
                    )
                }
            };
            (cold || hot).then(|| (p.display().to_string(), cold))
        })
        .collect();
    long.sort();
    let (store, limit) = match s3_prefix {
        None => (
            "file://",
            format!(
                "{FILE_NAME_MAX} bytes with the `#1` it is written under first, which no file \
                 system stores"
            ),
        ),
        Some(_) => ("S3", format!("{S3_NAME_MAX} bytes, which S3 refuses")),
    };
    warn_capped(
        &mut warnings,
        &long,
        |(p, cold)| {
            let fails = if *cold {
                "every upload of it fails"
            } else {
                "its cold snapshots fit, but every upload of its hot tier (WAL, fleet-log packs) fails"
            };
            format!(
                "{p}: its object name on the {store} replica would be longer than {limit}: \
                 {fails} (rename it, or shorten multi-db.replica.path)"
            )
        },
        &format!("with object names too long for a {store} replica"),
    );
    let distinct_keys = by_key.len() as u64;
    let mut collisions: Vec<Collision> = by_key
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(key, v)| {
            let mut paths: Vec<String> = v.iter().map(|p| p.display().to_string()).collect();
            paths.sort();
            Collision { key, paths }
        })
        .collect();
    collisions.sort_by(|a, b| a.key.cmp(&b.key));
    warn_capped(
        &mut warnings,
        &collisions,
        |c| {
            format!(
            "key collision: {} databases would get key {:?}: {}; replicate backs up one and refuses the others",
            c.paths.len(),
            c.key,
            c.paths.join(", ")
        )
        },
        "key collision(s) (see --json)",
    );

    // 4. Limits.
    let mut dirs: Vec<&Path> = all.keys().filter_map(|p| p.parent()).collect();
    dirs.sort_unstable();
    dirs.dedup();
    let (nofile_soft, nofile_hard) = match super::bench::nofile_limits() {
        Some((s, h)) => (Some(s), Some(h)),
        None => (None, None),
    };
    let limits = Limits {
        nofile_soft,
        nofile_hard,
        nofile_needed: super::bench::nofile_needed(m.max_hot_databases),
        watch: m.watch,
        directories: dirs.len() as u64,
        inotify_max_user_watches: read_proc_number("/proc/sys/fs/inotify/max_user_watches"),
        inotify_max_user_instances: read_proc_number("/proc/sys/fs/inotify/max_user_instances"),
    };
    // replicate raises the soft limit to the hard one: the hard one decides.
    if let Some(hard) = limits.nofile_hard.filter(|&h| h < limits.nofile_needed) {
        warnings.push(format!(
            "open files: the hard limit {hard} is below the {} that max-hot-databases {} needs ({} per hot database + 256): raise it (`ulimit -Hn`, LimitNOFILE=) or lower multi-db.max-hot-databases",
            limits.nofile_needed, m.max_hot_databases, super::bench::NOFILE_PER_HOT
        ));
    }
    if m.watch {
        if let Some(max) = limits
            .inotify_max_user_watches
            .filter(|&w| w < limits.directories)
        {
            warnings.push(format!(
                "inotify: {} directories hold databases but fs.inotify.max_user_watches is {max} (shared by all of this user's processes): writes in the rest are noticed at the next scan only; raise it (sysctl fs.inotify.max_user_watches={})",
                limits.directories,
                limits.directories.next_power_of_two().max(8192)
            ));
        }
        if limits.inotify_max_user_instances == Some(0) {
            warnings.push(
                "inotify: fs.inotify.max_user_instances is 0: change notifications cannot start; writes are noticed at each scan only".into(),
            );
        }
    }

    // 5. Activity and cost.
    let now = SystemTime::now();
    let within = |t: Option<SystemTime>, d: Duration| {
        t.is_some_and(|t| now.duration_since(t).map_or(true, |age| age < d))
    };
    let (mut hot_candidates, mut recent_not_wal, mut changed_last_hour) = (0u64, 0u64, 0u64);
    for (path, f) in &all {
        if within(f.newest, m.hot_duration) {
            if crate::capture::ship::stream_candidate(path, m.hot_duration) {
                hot_candidates += 1;
            } else {
                recent_not_wal += 1;
            }
        }
        if within(f.newest, CHANGING_WINDOW.max(m.hot_duration)) {
            changed_last_hour += 1;
        }
    }
    let max_hot = m.max_hot_databases as u64;
    let busy = opts.hot.unwrap_or(hot_candidates);
    let hot = busy.min(max_hot);
    let over_max_hot = busy - hot;
    let cold_changing = changed_last_hour.saturating_sub(busy);
    let activity = Activity {
        hot_candidates,
        recent_not_wal,
        changed_last_hour,
        hot_overridden: opts.hot.is_some(),
        hot,
        over_max_hot,
        cold_changing,
    };
    let databases = all.len() as u64;
    let model = CostModel::for_config(m);
    let load = FleetLoad::new(
        m,
        databases.max(busy + cold_changing),
        hot,
        cold_changing,
        over_max_hot,
    );
    let scenario_load = FleetLoad::scenario(m);
    let cost = CostEstimate {
        assumptions: assumptions(&model, &load),
        bill: model.bill(&load),
        initial_puts: databases,
        scenario: model.bill(&scenario_load),
        scenario_load,
        load,
        model,
    };

    Ok(Explanation {
        config_file: file.display().to_string(),
        settings: settings(loaded, &base),
        patterns,
        databases,
        distinct_keys,
        collisions,
        refused_keys,
        limits,
        activity,
        cost,
        warnings,
    })
}

fn read_proc_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn assumptions(model: &CostModel, load: &FleetLoad) -> Vec<String> {
    let hot = match &model.log {
        None => format!(
            "a hot database commits about once a second and costs {:.3} PUT + {:.4} LIST per second at sync-interval {}s (measured by `bench cost` at {}s; a longer sync-interval ships fewer, larger segments)",
            model.hot_put_per_s(load.sync_interval_s),
            model.hot.list,
            load.sync_interval_s,
            model.hot_sync_interval_s
        ),
        Some(log) => format!(
            "hot databases share the fleet log: {:.2} object per sync-interval {}s for all of them together, plus per hot database one consolidated pack per {}s and, per stream start or new generation (assumed {} a day: snapshot-interval, or a restart), {} PUT + {} LIST (measured by `bench cost`)",
            log.per_tick.put,
            load.sync_interval_s,
            log.consolidate_s,
            log.streams_per_day,
            log.per_stream.put,
            log.per_stream.list
        ),
    };
    vec![
        hot,
        "a changing cold database changes about once an hour: two PUTs per hour (uploaded at its change notification and again at the next scan, as an upload that close to a write is racy; every upload within an hour goes to the same next-hour name)".into(),
        format!(
            "a database busy beyond max-hot-databases is uploaded at every scan-interval ({}s)",
            load.scan_interval_s
        ),
        format!(
            "an idle database costs {:.3} requests per day (the scan is a stat, not a request)",
            (model.idle.put + model.idle.get + model.idle.list + model.idle.delete) * 86_400.0
        ),
        format!(
            "the replica lease is renewed every lease-ttl/3 ({:.0}s): one conditional PUT",
            load.lease_ttl_s / 3.0
        ),
        "each retention pass lists the whole replica once (1 LIST per 1,000 objects; a generation gets a LIST of its own only when something in it is deleted); objects held: what one retention period accumulates (a database that never leaves the hot tier starts a new generation every snapshot-interval, and the older ones age out like cold snapshots)".into(),
        format!(
            "S3 Standard list prices: PUT, LIST ${:.3} per 1,000, GET ${:.4} per 1,000, DELETE free; 30 days",
            PUT_USD * 1000.0,
            GET_USD * 1000.0
        ),
    ]
}

/// `d` for the report, to the millisecond (a third of a 2 s lease was
/// `666ms 666us 666ns`).
fn dur(d: Duration) -> String {
    let ms = Duration::from_millis(d.as_millis().min(u64::MAX as u128) as u64);
    humantime::format_duration(ms).to_string()
}

/// `AKIA…(masked)` for an AWS access key id (the prefix names its type,
/// not the key), `****` for anything else. Never the value.
fn mask_key_id(s: &Secret) -> String {
    let v = s.expose();
    match ["AKIA", "ASIA"].into_iter().find(|p| v.starts_with(p)) {
        Some(p) if v.len() > p.len() => format!("{p}…(masked)"),
        _ => "****".into(),
    }
}

fn settings(loaded: &Loaded, base: &Path) -> Vec<Setting> {
    let m = loaded.multi_db();
    let r = &m.replica;
    let mut out = Vec::new();
    let mut set = |key: &str, value: String, default: bool| {
        out.push(Setting {
            key: key.into(),
            value,
            default,
        })
    };
    match &loaded.replica {
        ReplicaUrl::S3 { bucket, prefix } => {
            set("replica", format!("s3://{bucket}/{prefix}"), false);
            set("replica.bucket", bucket.clone(), false);
            set(
                "replica.prefix",
                if prefix.is_empty() {
                    "(none: the bucket root)".into()
                } else {
                    prefix.clone()
                },
                false,
            );
            let (region, default) = match r.region.as_deref().filter(|s| !s.is_empty()) {
                Some(s) => (s.to_string(), false),
                None => match std::env::var("AWS_REGION")
                    .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                    .ok()
                    .filter(|s| !s.is_empty())
                {
                    Some(s) => (format!("{s} (from the environment)"), false),
                    None => (crate::replica::storage::DEFAULT_REGION.to_string(), true),
                },
            };
            set("replica.region", region, default);
            set(
                "replica.endpoint",
                r.endpoint.clone().unwrap_or_else(|| "(AWS S3)".into()),
                r.endpoint.is_none(),
            );
            // With an endpoint, requests are path-style whatever the flag
            // says (`replica::storage`): show what is used.
            let path_style = match (r.force_path_style, &r.endpoint) {
                (true, _) => "true".to_string(),
                (false, Some(_)) => "true (any endpoint is addressed path-style)".to_string(),
                (false, None) => "false".to_string(),
            };
            set("replica.force-path-style", path_style, !r.force_path_style);
            let creds = match (&r.access_key_id, &r.secret_access_key) {
                (Some(k), Some(_)) => {
                    format!("access-key-id {}, secret-access-key ****", mask_key_id(k))
                }
                _ => "(not in the config: from the environment, profile or instance role)".into(),
            };
            set("replica.credentials", creds, r.access_key_id.is_none());
            set(
                "replica.retries",
                r.retries.to_string(),
                r.retries == config::DEFAULT_RETRIES,
            );
            set(
                "replica.timeout",
                dur(r.timeout),
                r.timeout == config::DEFAULT_REQUEST_TIMEOUT,
            );
        }
        ReplicaUrl::File { dir } => {
            let state = if dir.is_dir() {
                "exists"
            } else {
                "does not exist yet: the first replicate creates it"
            };
            set(
                "replica",
                format!("file://{} ({state})", dir.display()),
                false,
            );
        }
    }
    let template = r
        .path
        .clone()
        .unwrap_or_else(|| "(default: the `*` values joined by `/`)".into());
    set("replica.path", template, r.path.is_none());
    set(
        "replica.lease-ttl",
        format!(
            "{} (renewed every {})",
            dur(r.lease_ttl),
            dur(r.lease_ttl / 3)
        ),
        r.lease_ttl == crate::replica::lease::DEFAULT_TTL,
    );
    for (key, d, default) in [
        ("replica.retention", r.retention, config::DEFAULT_RETENTION),
        (
            "replica.retention-check-interval",
            r.retention_check_interval,
            config::DEFAULT_RETENTION_CHECK,
        ),
        (
            "multi-db.scan-interval",
            m.scan_interval,
            config::DEFAULT_SCAN_INTERVAL,
        ),
        (
            "multi-db.hot-duration",
            m.hot_duration,
            config::DEFAULT_HOT_DURATION,
        ),
        (
            "multi-db.cold-after",
            m.cold_after,
            config::DEFAULT_COLD_AFTER,
        ),
        (
            "multi-db.sync-interval",
            m.sync_interval,
            config::DEFAULT_SYNC_INTERVAL,
        ),
        (
            "multi-db.release-after",
            m.release_after,
            config::DEFAULT_RELEASE_AFTER,
        ),
        (
            "multi-db.snapshot-interval",
            m.snapshot_interval,
            config::DEFAULT_SNAPSHOT_INTERVAL,
        ),
        (
            "multi-db.shutdown-timeout",
            m.shutdown_timeout,
            config::DEFAULT_SHUTDOWN_TIMEOUT,
        ),
        (
            "multi-db.log-consolidate-interval",
            m.log_consolidate_interval,
            config::DEFAULT_LOG_CONSOLIDATE,
        ),
    ] {
        set(key, dur(d), d == default);
    }
    for (key, n, default) in [
        (
            "multi-db.max-concurrent",
            m.max_concurrent as u64,
            config::DEFAULT_MAX_CONCURRENT as u64,
        ),
        (
            "multi-db.max-hot-databases",
            m.max_hot_databases as u64,
            config::DEFAULT_MAX_HOT as u64,
        ),
        (
            "multi-db.checkpoint-pages",
            m.checkpoint_pages,
            config::DEFAULT_CHECKPOINT_PAGES,
        ),
        (
            "multi-db.truncate-pages",
            m.truncate_pages,
            config::DEFAULT_TRUNCATE_PAGES,
        ),
    ] {
        let value = match (key, n) {
            ("multi-db.max-hot-databases", 0) => "0 (hot tier off)".into(),
            _ => n.to_string(),
        };
        set(key, value, n == default);
    }
    set(
        "multi-db.fleet-log",
        if m.fleet_log {
            "on (one object per sync for every hot database)"
        } else {
            "off (one object per hot database per sync)"
        }
        .into(),
        m.fleet_log,
    );
    set(
        "multi-db.watch",
        if m.watch {
            "on (inotify)"
        } else {
            "off (scans only)"
        }
        .into(),
        m.watch,
    );
    let temp = loaded.temp_dir();
    set(
        "multi-db.temp-dir",
        format!("{}{}", temp.display(), exists_note(&temp)),
        m.temp_dir.is_none(),
    );
    let state = loaded.state_file();
    let state_dir = state.parent().map(Path::to_path_buf).unwrap_or_default();
    set(
        "multi-db.state-dir",
        state_dir.display().to_string(),
        m.state_dir.is_none(),
    );
    set(
        "state file",
        format!(
            "{}{}",
            state.display(),
            if state.is_file() {
                " (exists: upload records are reused)"
            } else {
                " (absent: the first run uploads every database)"
            }
        ),
        false,
    );
    set(
        "addr",
        loaded
            .config
            .addr
            .map_or("(off: no /healthz, /stats, /metrics)".into(), |a| {
                a.to_string()
            }),
        loaded.config.addr.is_none(),
    );
    set(
        "relative paths resolve against",
        base.display().to_string(),
        false,
    );
    out
}

fn exists_note(p: &Path) -> &'static str {
    if p.is_dir() {
        ""
    } else {
        " (created at start)"
    }
}

impl Explanation {
    /// The plain-text report.
    pub fn write_text(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(
            out,
            "litefleet explain {}: a preview (nothing written, no lease taken, the replica not contacted)",
            self.config_file
        )?;
        writeln!(out, "\nConfig (* = the built-in default)")?;
        for s in &self.settings {
            let mark = if s.default { "*" } else { " " };
            writeln!(out, "  {:<34}{mark} {}", s.key, shown(&s.value))?;
        }

        writeln!(out, "\nPatterns")?;
        for p in &self.patterns {
            writeln!(out, "  [{}] {}", p.index, shown(&p.pattern))?;
            if p.resolved != p.pattern {
                writeln!(out, "      resolved to {}", shown(&p.resolved))?;
            }
            let mut line = format!("      {} SQLite database(s)", p.databases);
            if p.also_earlier > 0 {
                line += &format!(", {} also matched by an earlier pattern", p.also_earlier);
            }
            if p.not_sqlite > 0 {
                line += &format!(", {} matching file(s) not SQLite (skipped)", p.not_sqlite);
            }
            if p.symlinks > 0 {
                line += &format!(", {} symlink(s) (not followed)", p.symlinks);
            }
            if p.not_regular > 0 {
                line += &format!(
                    ", {} FIFO(s), socket(s) or device(s) (never opened)",
                    p.not_regular
                );
            }
            writeln!(out, "{line}")?;
            if p.databases == 0 {
                writeln!(
                    out,
                    "      NO MATCH: walk root {} {}",
                    shown(&p.root),
                    if p.root_exists {
                        "exists"
                    } else {
                        "does not exist"
                    }
                )?;
            }
            for e in &p.examples {
                writeln!(out, "        {} -> {}", shown(&e.path), shown(&e.key))?;
            }
        }

        writeln!(out, "\nKeys")?;
        writeln!(
            out,
            "  {} database(s), {} distinct key(s), {} collision(s), {} refused key(s)",
            self.databases,
            self.distinct_keys,
            self.collisions.len(),
            self.refused_keys.len()
        )?;
        for c in self.collisions.iter().take(COLLISIONS_SHOWN) {
            writeln!(
                out,
                "  COLLISION {:?}: {}",
                c.key,
                shown(&c.paths.join(", "))
            )?;
        }
        for r in self.refused_keys.iter().take(COLLISIONS_SHOWN) {
            writeln!(
                out,
                "  REFUSED {:?}: {}: {}",
                r.key,
                shown(&r.path),
                shown(&r.reason)
            )?;
        }

        let l = &self.limits;
        let opt = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
        writeln!(out, "\nLimits")?;
        let verdict = |limit: Option<u64>, needed: u64| match limit {
            Some(n) if n < needed => "TOO LOW",
            Some(_) => "ok",
            None => "unknown",
        };
        writeln!(
            out,
            "  open files: soft {}, hard {} (replicate raises soft to hard); needed for max-hot-databases: {}: {}",
            opt(l.nofile_soft),
            opt(l.nofile_hard),
            l.nofile_needed,
            verdict(l.nofile_hard, l.nofile_needed)
        )?;
        if l.watch {
            writeln!(
                out,
                "  inotify: {} directories to watch (one watch each); max_user_watches {}, max_user_instances {} (1 needed): {}",
                l.directories,
                opt(l.inotify_max_user_watches),
                opt(l.inotify_max_user_instances),
                verdict(l.inotify_max_user_watches, l.directories)
            )?;
        } else {
            writeln!(out, "  inotify: watch is off; no watches needed")?;
        }

        let a = &self.activity;
        writeln!(
            out,
            "\nActivity (from modification times of each database and its -wal)"
        )?;
        writeln!(
            out,
            "  written within hot-duration: {} in WAL mode (stream candidates), {} not in WAL mode (cold only)",
            a.hot_candidates, a.recent_not_wal
        )?;
        writeln!(
            out,
            "  written within the last hour: {}",
            a.changed_last_hour
        )?;
        if a.hot_candidates > 0 && !a.hot_overridden {
            writeln!(
                out,
                "  (a database written within hot-duration is billed as busy from now on; when that is not so, e.g. right after `litefleet demo`, give --hot N)"
            )?;
        }
        writeln!(
            out,
            "  billed as hot: {}{}; busy beyond max-hot-databases: {}; changing cold: {}; idle: {}",
            a.hot,
            if a.hot_overridden { " (--hot)" } else { "" },
            a.over_max_hot,
            a.cold_changing,
            self.cost.load.idle()
        )?;

        let c = &self.cost;
        writeln!(out, "\nCost per 30 days (estimate)")?;
        writeln!(out, "  assumptions:")?;
        for s in &c.assumptions {
            writeln!(out, "    - {s}")?;
        }
        write_bill(out, &c.bill)?;
        writeln!(
            out,
            "  plus once, at the first run: {} PUT (one snapshot per database)",
            thousands(c.initial_puts as f64)
        )?;
        writeln!(
            out,
            "  scenario (description: {} databases, {} hot, these settings): {}/month (hot {}, fleet log {}, retention {}, lease {})",
            thousands(c.scenario_load.databases as f64),
            c.scenario_load.hot,
            usd_text(c.scenario.total_usd),
            usd_text(c.scenario.usd("hot")),
            usd_text(c.scenario.usd("fleet log")),
            usd_text(c.scenario.usd("retention")),
            usd_text(c.scenario.usd("lease"))
        )?;

        writeln!(out)?;
        if self.warnings.is_empty() {
            writeln!(out, "no warnings")?;
        }
        for w in &self.warnings {
            writeln!(out, "warning: {}", shown(w))?;
        }
        out.flush()
    }
}

/// The bill as a table. Each column is as wide as its default or its widest
/// cell and a space, so that numbers never run together (black-box probe
/// U31: `explain --hot 1000000000` printed `0519,120,113,760`).
fn write_bill(out: &mut impl Write, bill: &Bill) -> io::Result<()> {
    let cells = |r: &RequestRates, usd: f64| {
        [
            thousands(r.put),
            thousands(r.get),
            thousands(r.list),
            thousands(r.delete),
            usd_text(usd),
        ]
    };
    let mut rows: Vec<(&str, [String; 5], &str)> = bill
        .lines
        .iter()
        .map(|l| (l.part, cells(&l.requests, l.usd), l.basis.as_str()))
        .collect();
    rows.push(("total", cells(&bill.total, bill.total_usd), ""));
    let mut widths = [15, 9, 15, 12, 12];
    for (_, c, _) in &rows {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count() + 1);
        }
    }
    let line = |out: &mut dyn Write, part: &str, c: &[String; 5], basis: &str| {
        let [w0, w1, w2, w3, w4] = widths;
        writeln!(
            out,
            "  {part:<13}{:>w0$}{:>w1$}{:>w2$}{:>w3$}{:>w4$}  {basis}",
            c[0], c[1], c[2], c[3], c[4]
        )
    };
    let head = ["PUT", "GET", "LIST", "DELETE", "USD"].map(String::from);
    line(out, "part", &head, "basis")?;
    for (part, c, basis) in &rows {
        line(out, part, c, basis)?;
    }
    Ok(())
}

/// The `explain` command: report on stdout (text or JSON); with `strict`,
/// any warning is an error (exit 1).
pub async fn command(
    file: PathBuf,
    loaded: Loaded,
    opts: ExplainOptions,
    json: bool,
    strict: bool,
) -> Result<()> {
    let shown = file.clone();
    let e = tokio::task::spawn_blocking(move || explain(&loaded, &file, opts))
        .await
        .map_err(|e| Error::invalid("explain", e.to_string()))??;
    let mut out = std::io::stdout().lock();
    let written = if json {
        serde_json::to_writer_pretty(&mut out, &e)
            .map_err(io::Error::other)
            .and_then(|()| writeln!(out))
    } else {
        e.write_text(&mut out)
    };
    // A closed pipe (`litefleet explain | head`) just ends the report.
    let _ = written;
    if strict && !e.warnings.is_empty() {
        return Err(Error::invalid(
            format!("explain --strict {}", shown.display()),
            format!(
                "{} warning(s); the first: {}",
                e.warnings.len(),
                e.warnings[0]
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_keys_are_masked() {
        assert_eq!(
            mask_key_id(&Secret::new("AKIAIOSFODNN7EXAMPLE")),
            "AKIA…(masked)"
        );
        assert_eq!(mask_key_id(&Secret::new("minio-user")), "****");
        assert_eq!(mask_key_id(&Secret::new("AKIA")), "****");
    }

    /// Numbers wider than their column's default widen it: every cell
    /// stays apart from its neighbours.
    #[test]
    fn bill_columns_never_run_together() {
        let huge = RequestRates {
            put: 345_599_654_400_000.0,
            get: 0.0,
            list: 519_120_113_760.0,
            delete: 719_999_280.0,
        };
        let line = |part| crate::cli::cost::BillLine {
            part,
            basis: "b".into(),
            requests: huge,
            usd: 1_727_998_272.0,
        };
        let bill = Bill {
            lines: vec![line("over-max-hot"), line("retention")],
            total: huge,
            total_usd: 3_455_996_544.0,
            objects_held: 0.0,
        };
        let mut out = Vec::new();
        write_bill(&mut out, &bill).unwrap();
        let text = String::from_utf8(out).unwrap();
        for l in text.lines().skip(1) {
            let cells: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(
                &cells[1..6],
                [
                    "345,599,654,400,000",
                    "0",
                    "519,120,113,760",
                    "719,999,280",
                    cells[5]
                ],
                "{text}"
            );
            assert!(cells[5].starts_with('$'), "{text}");
        }
    }
}
