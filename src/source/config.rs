//! Configuration: the YAML file, `${VAR}` expansion, defaults and validation.
//!
//! The native file follows Litestream's multi-database shape (the product
//! description's `replica-template` spelling and Litestream's own `dbs:`
//! list are translated into it first, by [`crate::source::compat`]):
//!
//! ```yaml
//! multi-db:
//!   patterns: ["/data/*/databases/*/branches/*/tenants/*.db"]
//!   scan-interval: 15s
//!   max-concurrent: 100
//!   replica:
//!     url: s3://bucket/prefix          # or file:///var/backups/litefleet
//!     path: "{{project}}/{{database}}/{{branch}}/{{tenant}}"
//!     region: ${AWS_REGION}
//!     endpoint: http://127.0.0.1:9000  # optional, S3-compatible stores
//!     force-path-style: true           # optional
//!     retention: 720h
//!     retention-check-interval: 1h
//! ```
//!
//! This module owns turning text into a [`Config`] that is known to be usable:
//! every later stage can assume patterns compile, the template binds every
//! `*` segment, and the replica URL names a bucket. Errors name the config key
//! (`multi-db.replica.url`) and the file. Credentials are held in [`Secret`],
//! whose `Debug` and `Display` never show the value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::replica::storage::{
    check_credential, check_endpoint, Replica, ReplicaUrl, Secret, StoreOptions, CREDENTIALS_IN_URL,
};
use crate::source::compat;
use crate::source::discover::Pattern;
use crate::source::template::KeyTemplate;
use crate::{Error, Result};

/// Default scan interval: the product promise is "changes reach the replica
/// within one scan", and a `stat` pass over 100k databases costs ~0.1 s, so
/// 15 s keeps scanning under 1% of one core.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(15);
/// Default upload concurrency: enough to hide S3 latency (~50 ms per PUT gives
/// ~2000 small uploads/s) while bounding temp disk and open files.
pub const DEFAULT_MAX_CONCURRENT: usize = 100;
/// Default retention: 30 days, the usual point-in-time window for backups.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default retention check: hourly, matching the hourly snapshot names.
pub const DEFAULT_RETENTION_CHECK: Duration = Duration::from_secs(3600);
/// Default per-request retries inside the object store client. The scheduler
/// retries failed uploads on the next scan anyway, so a few quick retries are
/// enough and keep a dead endpoint from stalling a whole cycle.
pub const DEFAULT_RETRIES: usize = 3;
/// The shortest interval of a loop the daemon runs on a timer (scans,
/// syncs, consolidations, retention checks, drills): a shorter one only
/// keeps a core busy (black-box probe C26: `scan-interval: 1ns` ran 94,811
/// scans in 6 s, `verify-interval: 1ms` a thousand drills, each at a full
/// core). The tests run these loops at 50 ms and more.
pub const MIN_LOOP_INTERVAL: Duration = Duration::from_millis(10);
/// Default per-request timeout for the object store client.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Default hot duration: a database that changed within one default scan
/// interval is "changing now" and worth streaming.
pub const DEFAULT_HOT_DURATION: Duration = Duration::from_secs(15);
/// Default cap on hot databases. Each costs two SQLite connections (about
/// 4 file descriptors and ~100 KB with our small page cache) and one sync per
/// `sync-interval`; 1000 keeps that under ~100 MB and ~1000 syncs/s.
pub const DEFAULT_MAX_HOT: usize = 1000;
/// Default cold-after: five minutes without a change; long enough that a
/// bursty writer does not flap between tiers (each promotion costs a full
/// snapshot), short enough that idle databases give their handles back.
pub const DEFAULT_COLD_AFTER: Duration = Duration::from_secs(300);
/// Default sync interval for hot databases: the promise is "at most ~1 s of
/// writes lost".
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Default PASSIVE checkpoint threshold in WAL frames: SQLite's own
/// autocheckpoint default (1000 pages, ~4 MB at 4 KiB pages), so WAL sizes
/// stay what applications are used to.
pub const DEFAULT_CHECKPOINT_PAGES: u64 = 1000;
/// Default TRUNCATE threshold: 10x the passive one (~40 MB). Restarting the
/// WAL keeps its size bounded by the largest burst; truncating also gives
/// that space back after a burst, at the cost of a short writer pause.
pub const DEFAULT_TRUNCATE_PAGES: u64 = 10_000;
/// Default release-after: how long a hot database's syncs may keep failing
/// (the store is down) before its stream lets go of its read transaction.
/// While held, the application's checkpoints cannot pass it and the WAL
/// grows with every write; two minutes rides out a blip without a new
/// generation, and bounds the growth to two minutes of writes.
pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(120);
/// Default shutdown-timeout: the longest a SIGTERM's drain (in-flight
/// uploads, the hot streams' last syncs, the lease's release) may take
/// before the process exits without it. Below the 180 s `TimeoutStopSec`
/// of the shipped systemd unit, so a store that does not answer ends in
/// our own error line and exit 1, not in systemd's SIGKILL (black-box
/// probe: a hung store with the default 60 s request timeout and 3
/// retries made a stop take 424 s).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(150);
/// Default snapshot-interval: a hot database's stream that has shipped
/// into one generation this long starts a new one with a fresh snapshot.
/// Without it a database that never goes cold keeps one generation for
/// ever: a restore replays every WAL segment since its stream began, and
/// retention can delete none of them (it never deletes what restores the
/// newest state). A day bounds the replay to a day of writes and lets
/// retention drop history past its period, for one snapshot upload per
/// hot database per day (the cost model's "daily stream restart").
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Default consolidation interval of the fleet log: each hot database's
/// frames are rewritten from the shared log objects into one object of its
/// own this often (and when its stream ends). Hourly matches the cold tier's
/// next-hour snapshots: one PUT per changed database per hour, which is
/// $0.90/month for 250 always-hot databases, while the log objects it lets
/// go of bound how much a restore must read from the shared log.
pub const DEFAULT_LOG_CONSOLIDATE: Duration = Duration::from_secs(3600);
/// Default keys per scheduled restore drill: a random 100 finds a fault
/// that affects 3% of the fleet with 95% probability per run ((0.97)^100 is
/// about 5%), while costing 100 restores (seconds of work and ~300 GET/LIST
/// requests) whatever the fleet's size; a drill of every key of a 100,000
/// database fleet is a job for `litefleet verify` at a quiet hour.
pub const DEFAULT_VERIFY_SAMPLE: usize = 100;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The fleet of databases to replicate.
    pub multi_db: MultiDb,
    /// Where to serve `/healthz`, `/stats` and `/metrics` (off when unset).
    #[serde(default)]
    pub addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MultiDb {
    /// `false` turns replication off: `replicate` refuses to start (with
    /// an error naming this key), while `list` and `restore` still read the
    /// replica. The product description's spelling; default `true`.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Glob patterns; each `*` segment is bound, in order, to a template variable.
    pub patterns: Vec<String>,
    #[serde(default = "default_scan_interval", with = "humantime_serde")]
    pub scan_interval: Duration,
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Where snapshots are staged before upload (default: the system temp dir).
    #[serde(default)]
    pub temp_dir: Option<PathBuf>,
    /// Where the record of what was uploaded is kept across restarts
    /// (default: `$XDG_STATE_HOME/litefleet` or `~/.local/state/litefleet`).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// A database that changed within this long becomes hot (WAL streaming).
    #[serde(default = "default_hot_duration", with = "humantime_serde")]
    pub hot_duration: Duration,
    /// At most this many hot databases; the most recently changed win. 0 turns the hot tier off.
    #[serde(default = "default_max_hot")]
    pub max_hot_databases: usize,
    /// A hot database unchanged this long goes cold (handles closed).
    #[serde(default = "default_cold_after", with = "humantime_serde")]
    pub cold_after: Duration,
    /// How often a hot database's new WAL frames are shipped.
    #[serde(default = "default_sync_interval", with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Run a PASSIVE checkpoint when the WAL holds at least this many frames.
    #[serde(default = "default_checkpoint_pages")]
    pub checkpoint_pages: u64,
    /// Also truncate the WAL when it held at least this many frames.
    #[serde(default = "default_truncate_pages")]
    pub truncate_pages: u64,
    /// A hot database whose syncs keep failing this long releases its read
    /// transaction and goes back to the cold tier (see [`DEFAULT_RELEASE_AFTER`]).
    #[serde(default = "default_release_after", with = "humantime_serde")]
    pub release_after: Duration,
    /// A hot database's stream starts a new generation with a fresh
    /// snapshot after this long (see [`DEFAULT_SNAPSHOT_INTERVAL`]).
    #[serde(default = "default_snapshot_interval", with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// The longest a stop after SIGTERM/SIGINT may take (see
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`]).
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Ship every hot database's frames of one sync into one shared object
    /// (the fleet log, see [`crate::replica::pack`]) instead of one object
    /// per database per sync. On by default; `false` writes per-database
    /// segments every sync, one PUT each.
    #[serde(default = "default_fleet_log")]
    pub fleet_log: bool,
    /// How often a hot database's frames move from the fleet log into an
    /// object of its own (see [`DEFAULT_LOG_CONSOLIDATE`]).
    #[serde(default = "default_log_consolidate", with = "humantime_serde")]
    pub log_consolidate_interval: Duration,
    /// Change notifications (inotify) on the directories of tracked
    /// databases: a write is noticed at once instead of at the next scan
    /// (see [`crate::source::watch`]). On by default.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// Run a restore drill (`litefleet verify`) inside `replicate` this
    /// often; off when unset or `0s`.
    #[serde(default, with = "humantime_serde")]
    pub verify_interval: Option<Duration>,
    /// Keys each drill of `verify-interval` checks, picked at random; 0
    /// checks every key (see [`DEFAULT_VERIFY_SAMPLE`]).
    #[serde(default = "default_verify_sample")]
    pub verify_sample: usize,
    pub replica: ReplicaConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplicaConfig {
    /// `s3://bucket/prefix`, `file:///abs/dir`, `file://./rel/dir` or a plain
    /// directory (see [`split_replica_url`]).
    pub url: String,
    /// Key template, e.g. `{{project}}/{{database}}`; default: the `*` values joined by `/`.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    #[serde(default)]
    pub access_key_id: Option<Secret>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    #[serde(default = "default_retention_check", with = "humantime_serde")]
    pub retention_check_interval: Duration,
    #[serde(default = "default_retries")]
    pub retries: usize,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Lifetime of the replica lease (see [`crate::replica::lease`]): renewed every
    /// third of it; a crashed replicator's successor waits at most this long.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Check at every start that the store honours the conditional writes
    /// the lease stands on (see [`crate::replica::lease::Lease::check_conditional_writes`]);
    /// `false` skips the check on a store known not to, for someone who
    /// keeps replicators apart by other means.
    #[serde(default = "default_check_conditional_writes")]
    pub check_conditional_writes: bool,
}

impl ReplicaConfig {
    /// What the object store client is built from.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            force_path_style: self.force_path_style,
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            retries: self.retries,
            timeout: self.timeout,
        }
    }
}

fn default_scan_interval() -> Duration {
    DEFAULT_SCAN_INTERVAL
}
/// The most `max-concurrent` allows: uploads in flight at once, each with an
/// open file or a buffer and a connection; far beyond what a host or a store
/// serves.
pub const MAX_CONCURRENT: usize = 100_000;

/// The most `max-hot-databases` allows: a thousand times the largest fleet
/// measured (1,000,000 databases); the open files they would need (4 each)
/// still fit the counts built on it, and `explain` warns about them.
pub const MAX_HOT_DATABASES: usize = 1_000_000_000;

fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}
fn default_hot_duration() -> Duration {
    DEFAULT_HOT_DURATION
}
fn default_max_hot() -> usize {
    DEFAULT_MAX_HOT
}
fn default_cold_after() -> Duration {
    DEFAULT_COLD_AFTER
}
fn default_sync_interval() -> Duration {
    DEFAULT_SYNC_INTERVAL
}
fn default_checkpoint_pages() -> u64 {
    DEFAULT_CHECKPOINT_PAGES
}
fn default_truncate_pages() -> u64 {
    DEFAULT_TRUNCATE_PAGES
}
fn default_enabled() -> bool {
    true
}
fn default_fleet_log() -> bool {
    true
}
fn default_log_consolidate() -> Duration {
    DEFAULT_LOG_CONSOLIDATE
}
fn default_watch() -> bool {
    true
}
fn default_verify_sample() -> usize {
    DEFAULT_VERIFY_SAMPLE
}
fn default_release_after() -> Duration {
    DEFAULT_RELEASE_AFTER
}
fn default_snapshot_interval() -> Duration {
    DEFAULT_SNAPSHOT_INTERVAL
}
fn default_shutdown_timeout() -> Duration {
    DEFAULT_SHUTDOWN_TIMEOUT
}
fn default_retention() -> Duration {
    DEFAULT_RETENTION
}
fn default_retention_check() -> Duration {
    DEFAULT_RETENTION_CHECK
}
fn default_retries() -> usize {
    DEFAULT_RETRIES
}
fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}
fn default_check_conditional_writes() -> bool {
    true
}
fn default_lease_ttl() -> Duration {
    crate::replica::lease::DEFAULT_TTL
}

/// A validated configuration with its compiled patterns and template.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub patterns: Vec<Pattern>,
    pub template: KeyTemplate,
    pub replica: ReplicaUrl,
    /// What relative paths in the config were resolved against (the config
    /// file's directory).
    pub base: PathBuf,
    /// The replica URL's key as the file spells it (`multi-db.replica.url`,
    /// Litestream's `dbs[0].replica.url`), for errors about the replica.
    pub replica_key: String,
}

impl Loaded {
    /// Reads, expands and validates a config file. Relative paths in it
    /// (patterns, `file://` replicas, Litestream's `path:`/`dir:`) resolve
    /// against the file's own directory, so a config means the same thing
    /// whatever directory `litefleet` is started from.
    pub fn from_file(path: &Path) -> Result<Loaded> {
        use std::io::Read;
        let fail = |reason: String| Error::Config {
            file: path.display().to_string(),
            key: "(file)".into(),
            reason,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "longer than {MAX_CONFIG_BYTES} bytes: not a config file (a device or a log?)"
            )));
        }
        let base = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(lexical))
            .unwrap_or_default();
        Self::from_str(&text, &path.display().to_string(), &base)
    }

    /// Parses config text; `file` names it in errors, relative paths resolve against `base`.
    /// Foreign spellings (see [`crate::source::compat`]) are translated first;
    /// errors then name the keys as written, and ignored keys are logged
    /// once each as warnings.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, file: &str, base: &Path) -> Result<Loaded> {
        let err = |key: &str, reason: String| Error::Config {
            file: file.to_string(),
            key: key.to_string(),
            reason,
        };
        let expanded = expand_env(text, |v| std::env::var(v).ok())
            .map_err(|(line, reason)| err(&format!("line {line}"), reason))?;
        // A document that does not parse as YAML at all is reported by the
        // typed parse below, with its line and key; a Litestream one by the
        // YAML parser itself, with its line: the typed parse, which knows
        // only the native keys, stopped at `dbs` and blamed it (black-box
        // probe U31, F4: "dbs: unknown field `dbs`" for a quote left open
        // further down).
        let tree: Option<serde_yaml_ng::Value> = match serde_yaml_ng::from_str(&expanded) {
            Ok(tree) => Some(tree),
            Err(e) if expanded.lines().any(|l| l.starts_with("dbs:")) => {
                return Err(err("(YAML)", e.to_string()))
            }
            Err(_) => None,
        };
        let translated = match &tree {
            Some(tree) => {
                compat::translate(tree, base).map_err(|(key, reason)| err(&key, reason))?
            }
            None => None,
        };
        let Some(translated) = translated else {
            let de = serde_yaml_ng::Deserializer::from_str(&expanded);
            return Self::validate(de, &err, base);
        };
        for w in &translated.warnings {
            tracing::warn!(file, "{w}");
        }
        let mut loaded =
            Self::validate(translated.doc.clone(), &err, base).map_err(|e| match e {
                Error::Config { file, key, reason } => Error::Config {
                    file,
                    key: translated.written(&key),
                    reason,
                },
                other => other,
            })?;
        loaded.replica_key = translated.written(&loaded.replica_key);
        Ok(loaded)
    }

    /// The native config from `de`, checked (see the module docs).
    fn validate<'de>(
        de: impl serde::Deserializer<'de>,
        err: &dyn Fn(&str, String) -> Error,
        base: &Path,
    ) -> Result<Loaded> {
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".to_string()
            } else {
                key
            };
            // The YAML error names the parent mapping again
            // ("multi-db: unknown field ..."): the key path already says it.
            let msg = e.into_inner().to_string();
            let msg = match msg.split_once(": ") {
                Some((head, rest)) if key.starts_with(head) => rest.to_string(),
                _ => msg,
            };
            err(&key, msg)
        })?;
        // Relative directories resolve against the config's directory, as
        // the patterns and a `file://./` replica do: a daemon started from
        // another working directory (systemd's is `/`) must find the same
        // upload records and staging.
        let mut config = config;
        for dir in [
            &mut config.multi_db.state_dir,
            &mut config.multi_db.temp_dir,
        ]
        .into_iter()
        .flatten()
        {
            if dir.is_relative() {
                // `components` drops the `.` of `./state`.
                *dir = base.join(&*dir).components().collect();
            }
        }
        let m = &config.multi_db;
        if m.patterns.is_empty() {
            return Err(err(
                "multi-db.patterns",
                "at least one pattern is required".into(),
            ));
        }
        if m.max_concurrent == 0 {
            return Err(err("multi-db.max-concurrent", "must be at least 1".into()));
        }
        // Larger values are no setting anyone needs, and overflow the counts
        // built on them (a semaphore's permits, the open files a fleet
        // wants): a start panicked holding the lease (black-box probe).
        for (key, value, max) in [
            ("multi-db.max-concurrent", m.max_concurrent, MAX_CONCURRENT),
            (
                "multi-db.max-hot-databases",
                m.max_hot_databases,
                MAX_HOT_DATABASES,
            ),
        ] {
            if value > max {
                return Err(err(
                    key,
                    format!("{value} is more than the most allowed, {max}"),
                ));
            }
        }
        for (key, d, unset) in [
            ("multi-db.scan-interval", Some(m.scan_interval), ""),
            ("multi-db.sync-interval", Some(m.sync_interval), ""),
            (
                "multi-db.log-consolidate-interval",
                Some(m.log_consolidate_interval),
                "",
            ),
            (
                "multi-db.replica.retention-check-interval",
                Some(m.replica.retention_check_interval),
                "",
            ),
            (
                "multi-db.verify-interval",
                m.verify_interval,
                " (leave it unset to run no drills)",
            ),
        ] {
            if d.is_some_and(|d| d < MIN_LOOP_INTERVAL) {
                return Err(err(
                    key,
                    format!(
                        "must be at least {}: a loop run more often only keeps a core busy{unset}",
                        humantime::format_duration(MIN_LOOP_INTERVAL)
                    ),
                ));
            }
        }
        for (key, d) in [
            ("multi-db.release-after", m.release_after),
            ("multi-db.snapshot-interval", m.snapshot_interval),
            ("multi-db.shutdown-timeout", m.shutdown_timeout),
            ("multi-db.hot-duration", m.hot_duration),
            ("multi-db.cold-after", m.cold_after),
        ] {
            if d.is_zero() {
                return Err(err(key, "must be greater than zero".into()));
            }
        }
        if m.snapshot_interval < m.sync_interval {
            // Each renewal uploads a whole snapshot: one per sync would be
            // the cold tier's cost at every sync interval.
            return Err(err(
                "multi-db.snapshot-interval",
                format!(
                    "{} is shorter than multi-db.sync-interval ({}): every sync would start a new \
                     generation with a full snapshot; the default is 24h",
                    humantime::format_duration(m.snapshot_interval),
                    humantime::format_duration(m.sync_interval)
                ),
            ));
        }
        let r = &m.replica;
        for (key, d) in [
            ("multi-db.scan-interval", Some(m.scan_interval)),
            ("multi-db.sync-interval", Some(m.sync_interval)),
            ("multi-db.release-after", Some(m.release_after)),
            ("multi-db.snapshot-interval", Some(m.snapshot_interval)),
            ("multi-db.shutdown-timeout", Some(m.shutdown_timeout)),
            (
                "multi-db.log-consolidate-interval",
                Some(m.log_consolidate_interval),
            ),
            ("multi-db.hot-duration", Some(m.hot_duration)),
            ("multi-db.cold-after", Some(m.cold_after)),
            ("multi-db.verify-interval", m.verify_interval),
            ("multi-db.replica.retention", Some(r.retention)),
            (
                "multi-db.replica.retention-check-interval",
                Some(r.retention_check_interval),
            ),
            ("multi-db.replica.timeout", Some(r.timeout)),
            ("multi-db.replica.lease-ttl", Some(r.lease_ttl)),
        ] {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return Err(err(key, "must be at most 100 years".into()));
            }
        }
        if let Some(region) = &r.region {
            if region.is_empty()
                || !region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                // The value is not shown: a secret pasted in the wrong key.
                return Err(err(
                    "multi-db.replica.region",
                    "not a region name (letters, digits, '-', '_' and '.' only, e.g. us-east-1)"
                        .into(),
                ));
            }
        }
        if let Some(endpoint) = &r.endpoint {
            check_endpoint(endpoint).map_err(|why| err("multi-db.replica.endpoint", why))?;
        }
        for (key, value) in [
            ("multi-db.replica.access-key-id", &r.access_key_id),
            ("multi-db.replica.secret-access-key", &r.secret_access_key),
        ] {
            if let Some(v) = value {
                check_credential(v.expose()).map_err(|why| err(key, why))?;
            }
        }
        if m.checkpoint_pages == 0 {
            return Err(err(
                "multi-db.checkpoint-pages",
                "must be at least 1".into(),
            ));
        }
        if m.truncate_pages < m.checkpoint_pages {
            return Err(err(
                "multi-db.truncate-pages",
                format!("must be at least checkpoint-pages ({})", m.checkpoint_pages),
            ));
        }
        if m.replica.timeout.is_zero() {
            // Every request would fail with "error sending request", naming
            // no setting (black-box probe).
            return Err(err(
                "multi-db.replica.timeout",
                "must be greater than zero (the time one request may take)".into(),
            ));
        }
        if m.replica.lease_ttl < crate::replica::lease::MIN_TTL {
            return Err(err(
                "multi-db.replica.lease-ttl",
                format!(
                    "must be at least {:?}: the lease is renewed every third of it",
                    crate::replica::lease::MIN_TTL
                ),
            ));
        }
        let mut patterns = Vec::with_capacity(m.patterns.len());
        for (i, p) in m.patterns.iter().enumerate() {
            let pattern = Pattern::compile(p, base).map_err(|reason| {
                err(
                    &format!("multi-db.patterns[{i}]"),
                    format!("{p:?}: {reason}"),
                )
            })?;
            patterns.push(pattern);
        }
        let template = match &m.replica.path {
            Some(t) => KeyTemplate::parse(t).map_err(|r| err("multi-db.replica.path", r))?,
            None => {
                // The default joins the bound values, so every pattern must
                // bind as many (black-box probe: the error named a variable
                // `{{$2}}` nobody wrote, and changed with the patterns' order).
                let w = patterns[0].wildcards();
                if let Some((i, p)) = patterns
                    .iter()
                    .enumerate()
                    .find(|(_, p)| p.wildcards() != w)
                {
                    return Err(err(
                        "multi-db.replica.path",
                        format!(
                            "is not set, and the default key (the `*` values joined by `/`) needs every \
                             pattern to have as many `*` levels: multi-db.patterns[0] {:?} has {w}, \
                             multi-db.patterns[{i}] {:?} has {}; write a template that fits them all",
                            patterns[0].source(),
                            p.source(),
                            p.wildcards()
                        ),
                    ));
                }
                KeyTemplate::default_for(w)
            }
        };
        for (i, p) in patterns.iter().enumerate() {
            template.check_binds(p).map_err(|r| {
                err(
                    "multi-db.replica.path",
                    format!("{r} (pattern multi-db.patterns[{i}] {:?})", p.source()),
                )
            })?;
        }
        if let Some((i, j, key)) = crate::source::keys::certain_collision(&patterns, &template) {
            return Err(err(
                "multi-db.replica.path",
                format!(
                    "patterns multi-db.patterns[{i}] {:?} and multi-db.patterns[{j}] {:?} \
                     both give key {key:?}: each database needs its own key",
                    patterns[i].source(),
                    patterns[j].source()
                ),
            ));
        }
        let replica =
            parse_replica_url(&m.replica.url, base).map_err(|r| err("multi-db.replica.url", r))?;
        if let ReplicaUrl::File { .. } = replica {
            if m.replica.endpoint.is_some() {
                return Err(err(
                    "multi-db.replica.endpoint",
                    "only valid for s3:// replicas".into(),
                ));
            }
        }
        Ok(Loaded {
            config,
            patterns,
            template,
            replica,
            base: base.to_path_buf(),
            replica_key: "multi-db.replica.url".into(),
        })
    }

    /// The replica this config names. A `file://` directory is created if
    /// missing; when it cannot be, the error names the config key and why.
    pub fn open_replica(&self) -> Result<Replica> {
        if let ReplicaUrl::File { dir } = &self.replica {
            create_replica_dir(dir).map_err(|why| {
                Error::invalid(
                    format!("{}: file://{}", self.replica_key, dir.display()),
                    format!("cannot create the replica directory: {why}"),
                )
            })?;
        }
        Replica::open(&self.replica, &self.multi_db().replica.store_options())
    }

    /// The replica this config names, for commands that only read it: a
    /// `file://` directory that does not exist is an error (a mistyped
    /// path), not a new empty replica.
    pub fn open_existing_replica(&self) -> Result<Replica> {
        if let ReplicaUrl::File { dir } = &self.replica {
            if !dir.is_dir() {
                return Err(Error::invalid(
                    format!("{}: file://{}", self.replica_key, dir.display()),
                    "no such directory: nothing was replicated there (check the path)",
                ));
            }
        }
        self.open_replica()
    }

    /// `Ok` unless the config turns replication off (`multi-db.enabled: false`):
    /// `replicate` calls this before touching anything.
    pub fn check_enabled(&self, file: &Path) -> Result<()> {
        if self.config.multi_db.enabled {
            return Ok(());
        }
        Err(Error::Config {
            file: file.display().to_string(),
            key: "multi-db.enabled".into(),
            reason: "is false: replication is disabled in this config, so `replicate` does not \
                     run (set it to true; list and restore still work)"
                .into(),
        })
    }

    pub fn multi_db(&self) -> &MultiDb {
        &self.config.multi_db
    }

    /// The state file for this replica and key layout (see [`crate::source::track`]).
    pub fn state_file(&self) -> PathBuf {
        let dir = self.config.multi_db.state_dir.clone().unwrap_or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .filter(|v| !v.is_empty())
                        .map(|h| PathBuf::from(h).join(".local/state"))
                })
                .unwrap_or_else(std::env::temp_dir)
                .join("litefleet")
        });
        dir.join(format!("{:016x}.state", self.state_tag()))
    }

    /// Identifies the replica and key layout that upload records are valid for:
    /// a different URL, endpoint, template or pattern set starts from
    /// scratch. The endpoint counts: `s3://b/p` on two S3 servers is two
    /// stores, and two daemons sharing one state file (the per-user default
    /// `state-dir`) trusted each other's records (black-box probe: a change
    /// uploaded to one store was never uploaded to the other). Without an
    /// endpoint the tag is what it was before it counted.
    pub fn state_tag(&self) -> u64 {
        let mut text = format!(
            "{:?}\n{:?}\n",
            self.replica, self.config.multi_db.replica.path
        );
        if let Some(endpoint) = &self.config.multi_db.replica.endpoint {
            text.push_str("endpoint ");
            text.push_str(endpoint.trim_end_matches('/'));
            text.push('\n');
        }
        for p in &self.patterns {
            text.push_str(p.source());
            text.push('\n');
        }
        let words: Vec<u64> = text
            .as_bytes()
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        crate::source::track::fingerprint(&words)
    }

    /// Where snapshots are staged before upload.
    pub fn temp_dir(&self) -> PathBuf {
        self.config
            .multi_db
            .temp_dir
            .clone()
            // One per user: another user's run must not own our staging.
            .unwrap_or_else(|| {
                // SAFETY: getuid has no preconditions and cannot fail.
                let uid = unsafe { libc::getuid() };
                std::env::temp_dir().join(format!("litefleet-{uid}"))
            })
    }
}

/// Creates `dir` and its parents. On failure, says which path is at fault:
/// the nearest existing ancestor when it is not a directory (`create_dir_all`
/// reports that as `File exists`), else the first missing one and the error.
fn create_replica_dir(dir: &Path) -> std::result::Result<(), String> {
    let Err(e) = std::fs::create_dir_all(dir) else {
        return Ok(());
    };
    let mut missing = dir;
    for a in dir.ancestors() {
        match std::fs::metadata(a) {
            Ok(m) if !m.is_dir() => return Err(format!("{}: Not a directory", a.display())),
            Ok(_) => break,
            Err(_) => missing = a,
        }
    }
    Err(format!("{}: {e}", missing.display()))
}

/// Parses `s3://bucket/prefix`, `file:///abs`, `file:/abs`,
/// `file://localhost/abs`, `file://./rel` or a plain path (see
/// [`split_replica_url`] for what is refused).
pub fn parse_replica_url(url: &str, base: &Path) -> std::result::Result<ReplicaUrl, String> {
    let path = match split_replica_url(url)? {
        UrlTarget::S3(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "{url:?} has no bucket (expected s3://bucket/prefix)"
                ));
            }
            if bucket.contains('@') {
                // Never echoed: what precedes the `@` is a secret.
                return Err(format!("{}: {CREDENTIALS_IN_URL}", redact_userinfo(url)));
            }
            if let Some(c) = bucket
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
            {
                return Err(format!(
                    "{url:?}: {c:?} cannot be part of a bucket name (letters, digits, '-', '.' \
                     and '_' only)"
                ));
            }
            // A trailing `/` is the usual way to write a folder; a leading
            // one (`s3://bucket//p`) is an empty segment like `a//b`.
            let prefix = prefix.trim_end_matches('/');
            // Stored literally, `..` named a folder `%2E%2E` that every
            // listing then refused, and `a//b` was quietly made `a/b`
            // (black-box probes).
            if let Some(seg) = prefix
                .split('/')
                .find(|s| !prefix.is_empty() && ["", ".", ".."].contains(s))
            {
                return Err(format!(
                    "{url:?}: the prefix has an empty, `.` or `..` segment ({seg:?}); S3 keys \
                     take them literally, and litefleet refuses keys holding them"
                ));
            }
            return Ok(ReplicaUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        UrlTarget::Dir(path) => path,
    };
    if path.is_empty() {
        return Err(format!("{url:?} names no directory"));
    }
    let dir = Path::new(path);
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        base.join(dir)
    };
    // The file system's root as a replica root: objects written among the
    // system's own directories, and retention walking all of them, /proc
    // included (black-box probe). By the names alone: `..` above the
    // root is the root.
    let depth = dir.components().fold(0usize, |d, c| match c {
        std::path::Component::Normal(_) => d + 1,
        std::path::Component::ParentDir => d.saturating_sub(1),
        _ => d,
    });
    if depth == 0 {
        return Err(format!(
            "{url:?} is the file system's root directory: give the replica a directory of its own"
        ));
    }
    // `file://./r` relative to /etc/litefleet is /etc/litefleet/r, not
    // /etc/litefleet/./r (in logs and in the lease's name). `..` stays: only
    // the filesystem knows where it leads through a symlink.
    Ok(ReplicaUrl::File {
        dir: dir
            .components()
            .filter(|c| *c != std::path::Component::CurDir)
            .collect(),
    })
}

/// Most bytes read of a config file: a config is a few hundred bytes, and
/// `--config /dev/zero` grew memory by 1.5 GB/s until killed (black-box
/// probe).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Longest duration a config key takes. Durations are added to clock times
/// (the lease's expiry, retention's cutoff), and a sum past the calendar's
/// end panicked (black-box probe: `lease-ttl: 9999999999999999s`).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Where a replica URL points, before a relative directory is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlTarget<'a> {
    /// An `s3://` URL: what follows the scheme (`bucket/prefix`).
    S3(&'a str),
    /// A directory: absolute, or relative to the config file's directory.
    Dir(&'a str),
}

/// Splits a replica URL into an S3 location or a directory, refusing
/// anything that looks like a URL (`scheme:...`) but is not one of the
/// supported forms, rather than taking it for a relative directory name:
/// `s3:/bucket` (one slash), `S3://bucket`, `gs://bucket`, `gopher:/x`,
/// `file://host/dir` (a remote host), `file:rel`. Accepted: `s3://...`,
/// `file:///abs`, `file://localhost/abs`, `file:/abs` (RFC 8089),
/// `file://./rel`, `file://../rel` and a plain path. A relative directory
/// whose first segment has a `:` is written `./name:x`. Errors show the
/// value with any `user:password@` replaced by `***@`.
pub fn split_replica_url(url: &str) -> std::result::Result<UrlTarget<'_>, String> {
    // A query or fragment is not part of a bucket, prefix or directory
    // name; taken literally it names the wrong place without a word.
    // Shown without them: they may carry a token or a secret key
    // (`?secretAccessKey=...`; black-box probe), which would then be in
    // every error.
    if let Some(cut) = url.find(['?', '#']).filter(|_| url_scheme(url).is_some()) {
        return Err(format!(
            "{:?} (the rest not shown): a replica URL takes no query (`?`) or fragment (`#`): \
             set the endpoint, region and path style as keys of their own (a directory whose \
             name holds `?` or `#` can be given as a plain path)",
            format!("{}{}...", redact_userinfo(&url[..cut]), &url[cut..cut + 1])
        ));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        return Ok(UrlTarget::S3(rest));
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if let Some(dir) = file_url_dir(rest) {
            return Ok(UrlTarget::Dir(dir));
        }
    } else if let Some(rest) = url.strip_prefix("file:") {
        if rest.starts_with('/') {
            return Ok(UrlTarget::Dir(rest));
        }
    } else if url_scheme(url).is_none() && !url.contains("://") {
        return Ok(UrlTarget::Dir(url));
    }
    Err(url_refusal(&redact_userinfo(url)))
}

/// The directory of a `file://` URL after the `file://`: an absolute path
/// (empty or `localhost` host), or litefleet's relative `./dir`, `../dir`.
/// `None` for a remote host.
fn file_url_dir(rest: &str) -> Option<&str> {
    let relative = [".", ".."].contains(&rest) || rest.starts_with("./") || rest.starts_with("../");
    if rest.is_empty() || rest.starts_with('/') || relative {
        return Some(rest);
    }
    match rest.strip_prefix("localhost") {
        Some("") => Some("/"),
        Some(path) if path.starts_with('/') => Some(path),
        _ => None,
    }
}

/// `Some((scheme, rest))` when `value` starts like a URL: a scheme
/// (`[A-Za-z][A-Za-z0-9+.-]*`), a `:` and something after it.
fn url_scheme(value: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = value.split_once(':')?;
    let mut chars = scheme.chars();
    let starts = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let valid = chars.all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c));
    (starts && valid && !rest.is_empty()).then_some((scheme, rest))
}

/// Why [`split_replica_url`] refuses `url` (already redacted).
fn url_refusal(url: &str) -> String {
    const USE: &str = "use s3://bucket/prefix, file:///abs/dir, file://./rel/dir or a plain path";
    if let Some(rest) = url.strip_prefix("file://") {
        let host = rest.split('/').next().unwrap_or(rest);
        return format!(
            "{url:?} names the host {host:?}: remote file hosts are not supported \
             (write file:///abs/dir, or file://./{rest} for a directory relative to the config)"
        );
    }
    if let Some(rest) = url.strip_prefix("file:") {
        return format!(
            "{url:?}: a file: URL needs an absolute path (file:///abs/dir); \
             for a directory relative to the config write file://./{rest}"
        );
    }
    let Some((scheme, rest)) = url_scheme(url) else {
        return format!("{url:?}: unsupported scheme ({USE})");
    };
    let after_slashes = rest.trim_start_matches('/');
    if scheme == "s3" {
        let what = if rest.starts_with('/') {
            "with one slash"
        } else {
            "without the //"
        };
        return format!("{url:?} looks like an s3:// URL {what} (write s3://{after_slashes})");
    }
    if scheme.eq_ignore_ascii_case("s3") {
        return format!(
            "{url:?}: unsupported scheme {scheme:?}: schemes are lower case (write s3://{after_slashes})"
        );
    }
    if scheme.eq_ignore_ascii_case("file") {
        return format!(
            "{url:?}: unsupported scheme {scheme:?}: schemes are lower case (write file:{rest})"
        );
    }
    if rest.starts_with("//") {
        format!("{url:?}: unsupported scheme {scheme:?} ({USE})")
    } else {
        format!(
            "{url:?}: unsupported scheme {scheme:?} ({USE}; a relative directory whose name \
             has a ':' is written ./{url})"
        )
    }
}

/// `url` with a `user:password@` before its host replaced by `***@`, for
/// error messages.
pub(crate) fn redact_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(colon) = url.find(':') else {
        return url.into();
    };
    let after = &url[colon + 1..];
    let start = url.len() - after.trim_start_matches('/').len();
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]).into(),
        None => url.into(),
    }
}

/// Expands `${VAR}` and `${VAR:-default}` in config text. Comments are left
/// alone (a line whose first non-blank character is `#`, and the rest of a
/// line from a `#` that YAML reads as a comment: after a blank, outside
/// quotes), so a commented-out line or a note after a value
/// (`url: x  # was ${OLD_URL}`) never fails on an unset variable (black-box
/// probe H27: every command failed on one). A value becomes exactly the string it holds
/// (see `substitute`): escaped inside quotes, quoted where YAML would read
/// part of it as syntax. Returns `(line, reason)` for an unset variable or a
/// value that cannot be placed where it stands.
pub fn expand_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> std::result::Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        if let Some(kept) = empty_setting(line, &lookup) {
            out.push_str(&kept);
            continue;
        }
        let comment = comment_start(line);
        let mut done = 0;
        while let Some(found) = line.get(done..comment).and_then(|l| l.find("${")) {
            let start = done + found;
            out.push_str(&line[done..start]);
            let after = &line[start + 2..];
            let Some(end) = after.find('}') else {
                done = start;
                break;
            };
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let value = match (lookup(name), default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.to_string(),
                (None, None) => {
                    return Err((
                        n + 1,
                        format!(
                            "environment variable ${{{name}}} is not set (use ${{{name}:-default}} for a default)"
                        ),
                    ))
                }
            };
            done = start + 2 + end + 1;
            let placed = substitute(&value, &line[..start], &line[done..])
                .map_err(|why| (n + 1, format!("the value of ${{{name}}} {why}")))?;
            out.push_str(&placed);
        }
        out.push_str(&line[done..]);
    }
    Ok(out)
}

/// A line `key: ${VAR:-}` (the whole value one variable, a comment after
/// it allowed) whose value is empty, made a comment: the setting is then
/// absent and keeps its default, whatever its type. YAML would read the
/// empty value as null, which a duration, number or flag refuses (black-box
/// probe: `retention: ${R:-}` was an error, though an empty value is
/// documented as no value). The line stays, so line numbers do too.
fn empty_setting(line: &str, lookup: &impl Fn(&str) -> Option<String>) -> Option<String> {
    let body = line.trim_start();
    let indent = &line[..line.len() - body.len()];
    let (key, value) = body.split_once(": ")?;
    if key.is_empty() || key.contains(['$', '#', '"', '\'', '{', '[']) || key.starts_with('-') {
        return None;
    }
    let value = value.trim();
    let rest = value.strip_prefix("${")?;
    let end = rest.find('}')?;
    let after = rest[end + 1..].trim_start();
    if !(after.is_empty() || after.starts_with('#')) {
        return None;
    }
    let inner = &rest[..end];
    let empty = match inner.split_once(":-") {
        Some((name, default)) => lookup(name).unwrap_or_else(|| default.to_string()),
        None => lookup(inner)?,
    };
    empty
        .is_empty()
        .then(|| format!("{indent}# (empty: default) {body}"))
}

/// Where the comment of `line` starts, as YAML reads it: at a `#` after a
/// blank (or at the start), outside quotes; the line's length if none.
fn comment_start(line: &str) -> usize {
    let mut blank_before = true;
    for (i, c) in line.char_indices() {
        if c == '#' && blank_before && quoting_at(&line[..i]) == Quoting::Plain {
            return i;
        }
        blank_before = c == ' ' || c == '\t';
    }
    line.len()
}

/// Where a `${VAR}` stands in its line, as YAML reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quoting {
    Plain,
    Double,
    Single,
}

/// The quoting in effect at the end of `prefix` (the line before `${`). A
/// quote opens a quoted scalar only where a scalar starts: at the start of
/// the line or after `:`, `-`, `[`, `,` or `{`.
fn quoting_at(prefix: &str) -> Quoting {
    let mut q = Quoting::Plain;
    let mut last = None::<char>;
    let mut chars = prefix.chars().peekable();
    while let Some(c) = chars.next() {
        match q {
            Quoting::Plain
                if (c == '"' || c == '\'') && last.is_none_or(|l| ":-[,{".contains(l)) =>
            {
                q = if c == '"' {
                    Quoting::Double
                } else {
                    Quoting::Single
                };
            }
            Quoting::Plain if !c.is_whitespace() => last = Some(c),
            Quoting::Plain => {}
            Quoting::Double if c == '\\' => {
                chars.next();
            }
            Quoting::Single if c == '\'' && chars.peek() == Some(&'\'') => {
                chars.next();
            }
            Quoting::Double | Quoting::Single
                if c == if q == Quoting::Double { '"' } else { '\'' } =>
            {
                q = Quoting::Plain;
                last = Some(c);
            }
            Quoting::Double | Quoting::Single => {}
        }
    }
    q
}

/// `value` written inside double quotes: `\`, `"` and control characters
/// escaped.
fn double_quoted_body(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Whether YAML would read `value`, written bare, as something other than
/// that string: a line break, a comment (` #`), a mapping (`: `), blanks it
/// trims, or a leading quote or indicator. A value that starts with `[` or
/// `{` is left to YAML on purpose (a list or map given through the
/// environment).
fn changes_bare(value: &str) -> bool {
    !value.starts_with(['[', '{'])
        && (value.contains(['\n', '\r'])
            || value.starts_with(['#', '\'', '"', '&', '*', '!', '|', '>', '%', '@', '`'])
            || value.contains(" #")
            || value.contains("\t#")
            || value.contains(": ")
            || value.ends_with(':')
            || value != value.trim())
}

/// The text that puts `value` between `prefix` and `suffix` of its line so
/// that YAML reads exactly `value` there: escaped inside double or single
/// quotes; bare where that reads the same; double-quoted where the `${VAR}`
/// is a whole bare value. Else why not.
fn substitute(value: &str, prefix: &str, suffix: &str) -> std::result::Result<String, String> {
    match quoting_at(prefix) {
        Quoting::Double => Ok(double_quoted_body(value)),
        Quoting::Single if value.contains(['\n', '\r']) => Err(
            "holds a line break, which single quotes cannot keep; use double quotes: \"${...}\""
                .into(),
        ),
        Quoting::Single => Ok(value.replace('\'', "''")),
        Quoting::Plain => {
            // A whole value: after a key's `: ` or a list item's `- ` (blank
            // after the indicator), or inside `[...]`/`{...}`.
            let before = prefix.trim_end();
            let spaced = before.len() < prefix.len();
            let indicator = |c: char| {
                before.strip_suffix(c).is_some_and(|b| {
                    spaced && (c == ':' || b.is_empty() || b.ends_with(char::is_whitespace))
                })
            };
            let after = suffix.trim_start();
            let whole = (before.is_empty()
                || indicator(':')
                || indicator('-')
                || before.ends_with(['[', ',', '{']))
                && (after.is_empty() || after.starts_with(['#', ',', ']', '}']));
            // A whole `null` or `~` would be no value at all (the setting's
            // default); an empty one is, on purpose (`${VAR:-}`).
            let null_word = matches!(value, "~" | "null" | "Null" | "NULL");
            let quote = changes_bare(value) || (whole && null_word);
            if !quote {
                Ok(value.to_string())
            } else if whole {
                Ok(format!("\"{}\"", double_quoted_body(value)))
            } else {
                Err("holds characters YAML would read as syntax here (a line break, ` #`, `: `, \
                     or blanks at its ends); put the whole value in double quotes: \"...${...}...\""
                    .into())
            }
        }
    }
}

/// `path` (absolute) without `.` and `..` components, resolved by name:
/// `-c ../cfg.yml` from `/srv/data` gives the base `/srv`, not
/// `/srv/data/..`, so the database paths the patterns match are the ones a
/// restore by path (relative to any directory) renders the same way
/// (black-box probe: run from a subdirectory, `restore p0/t3.db` was taken
/// for a key). Symbolic links are not resolved, as before.
pub fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if out.file_name().is_some() {
                    out.pop();
                } else if !out.has_root() {
                    out.push(c);
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_paths_drop_dot_components() {
        for (path, want) in [
            ("/srv/data/..", "/srv"),
            ("/srv/./data/../x/y", "/srv/x/y"),
            ("/..", "/"),
            ("/a/../..", "/"),
        ] {
            assert_eq!(lexical(Path::new(path)), PathBuf::from(want), "{path}");
        }
    }

    fn load(yaml: &str) -> Result<Loaded> {
        Loaded::from_str(yaml, "test.yml", Path::new("/base"))
    }

    const GOOD: &str = r#"
multi-db:
  patterns: ["/data/*/databases/*/branches/*/tenants/*.db"]
  replica:
    url: s3://bucket/some/prefix
    path: "{{project}}/{{database}}/{{branch}}/{{tenant}}"
"#;

    /// Counts beyond any fleet are config errors naming the key, not a
    /// panic after the lease was taken (black-box probe).
    #[test]
    fn counts_beyond_any_fleet_are_refused() {
        let with = |line: &str| {
            load(&GOOD.replace("  replica:", &format!("  {line}\n  replica:")))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for (line, key) in [
            (
                "max-concurrent: 2305843009213693952",
                "multi-db.max-concurrent",
            ),
            ("max-concurrent: 100001", "multi-db.max-concurrent"),
            (
                "max-hot-databases: 18446744073709551615",
                "multi-db.max-hot-databases",
            ),
        ] {
            let e = with(line).unwrap_err();
            assert!(e.contains(key) && e.contains("most allowed"), "{line}: {e}");
        }
        with("max-concurrent: 100000").unwrap();
        with("max-hot-databases: 1000000000").unwrap();
    }

    /// An empty `${VAR:-}` is no value for every kind of setting: the
    /// default (black-box probe: durations, numbers and flags refused it).
    #[test]
    fn an_empty_variable_keeps_every_default() {
        let yaml = "multi-db:\n  patterns: [\"./data/*.db\"]\n  scan-interval: ${LF_TEST_UNSET_1:-} # comment\n  \
                    watch: ${LF_TEST_UNSET_2:-}\n  max-concurrent: ${LF_TEST_UNSET_3:-}\n  replica:\n    \
                    url: s3://b/p\n    retention: ${LF_TEST_UNSET_4:-}\n    lease-ttl: ${LF_TEST_UNSET_5:-}\n";
        let l = Loaded::from_str(yaml, "test.yml", Path::new("/base")).unwrap();
        let m = l.multi_db();
        assert_eq!(m.scan_interval, DEFAULT_SCAN_INTERVAL);
        assert!(m.watch);
        assert_eq!(m.max_concurrent, 100);
        assert_eq!(m.replica.retention, DEFAULT_RETENTION);
        // A line number in an error still counts every line.
        let bad = yaml.replace(
            "retention: ${LF_TEST_UNSET_4:-}",
            "retention: ${LF_TEST_UNSET_4}",
        );
        let e = Loaded::from_str(&bad, "test.yml", Path::new("/base"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 8"), "{e}");
    }

    #[test]
    fn the_default_key_needs_patterns_of_one_depth() {
        for patterns in [
            r#"["./data/*/*.db", "./other/*.db"]"#,
            r#"["./other/*.db", "./data/*/*.db"]"#,
        ] {
            let yaml =
                format!("multi-db:\n  patterns: {patterns}\n  replica:\n    url: s3://b/p\n");
            let Err(e) = Loaded::from_str(&yaml, "test.yml", Path::new("/base")) else {
                panic!("accepted: {patterns}");
            };
            let e = e.to_string();
            assert!(
                e.contains("multi-db.replica.path: is not set") && e.contains("as many `*` levels"),
                "{e}"
            );
            assert!(!e.contains("{{$"), "{e}");
        }
    }

    #[test]
    fn two_endpoints_never_share_upload_records() {
        let yaml = |endpoint: &str| {
            format!(
                "multi-db:\n  patterns: [\"./data/*.db\"]\n  replica:\n    url: s3://b/p\n{endpoint}"
            )
        };
        let tag = |y: String| {
            Loaded::from_str(&y, "test.yml", Path::new("/base"))
                .unwrap()
                .state_tag()
        };
        let none = tag(yaml(""));
        let one = tag(yaml("    endpoint: http://127.0.0.1:9000\n"));
        let two = tag(yaml("    endpoint: http://127.0.0.1:9001\n"));
        assert!(none != one && one != two && none != two);
        assert_eq!(one, tag(yaml("    endpoint: http://127.0.0.1:9000/\n")));
    }

    /// Relative `state-dir` and `temp-dir` resolve against the config's
    /// directory, like the patterns, whatever the working directory.
    #[test]
    fn relative_dirs_resolve_against_the_config() {
        let l = load(&GOOD.replace(
            "  replica:",
            "  state-dir: ./state\n  temp-dir: tmp/stage\n  replica:",
        ))
        .unwrap();
        assert_eq!(l.temp_dir(), Path::new("/base/tmp/stage"));
        assert_eq!(l.state_file().parent(), Some(Path::new("/base/state")));
        let l = load(&GOOD.replace("  replica:", "  state-dir: /abs/state\n  replica:")).unwrap();
        assert_eq!(l.state_file().parent(), Some(Path::new("/abs/state")));
    }

    #[test]
    fn defaults_and_parse() {
        let l = load(GOOD).unwrap();
        let m = l.multi_db();
        assert_eq!(m.scan_interval, Duration::from_secs(15));
        assert_eq!(m.max_concurrent, 100);
        assert_eq!(m.hot_duration, Duration::from_secs(15));
        assert_eq!(m.max_hot_databases, 1000);
        assert_eq!(m.cold_after, Duration::from_secs(300));
        assert_eq!(m.sync_interval, Duration::from_secs(1));
        assert_eq!((m.checkpoint_pages, m.truncate_pages), (1000, 10_000));
        assert_eq!(m.replica.retention, Duration::from_secs(720 * 3600));
        assert_eq!(
            m.replica.retention_check_interval,
            Duration::from_secs(3600)
        );
        assert_eq!(m.replica.lease_ttl, Duration::from_secs(60));
        assert_eq!(
            l.replica,
            ReplicaUrl::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
    }

    #[test]
    fn env_expansion() {
        let env = |v: &str| (v == "REGION").then(|| "eu-west-1".to_string());
        assert_eq!(
            expand_env("region: ${REGION}\n", env).unwrap(),
            "region: eu-west-1\n"
        );
        assert_eq!(expand_env("a: ${NOPE:-x}\n", env).unwrap(), "a: x\n");
        assert_eq!(
            expand_env("# a: ${NOPE}\nb: 1\n", env).unwrap(),
            "# a: ${NOPE}\nb: 1\n"
        );
        let (line, why) = expand_env("x: 1\na: ${NOPE}\n", env).unwrap_err();
        assert_eq!(line, 2);
        assert!(why.contains("${NOPE} is not set"), "{why}");
        // A comment after a value is a comment too (black-box probe H27);
        // a `#` inside quotes or without a blank before it is not one.
        for (text, expanded) in [
            (
                "url: x  # was ${NOPE}\n",
                "url: x  # was ${NOPE}\n".to_string(),
            ),
            (
                "r: ${REGION} # ${NOPE}\n",
                "r: eu-west-1 # ${NOPE}\n".to_string(),
            ),
            (
                "u: \"a # ${REGION}\"\n",
                "u: \"a # eu-west-1\"\n".to_string(),
            ),
            ("u: a#${REGION}\n", "u: a#eu-west-1\n".to_string()),
            // A default holding what looks like a comment is the value's.
            (
                "u: ${NOPE:-a #b} # ${NOPE}\n",
                "u: \"a #b\" # ${NOPE}\n".to_string(),
            ),
        ] {
            assert_eq!(expand_env(text, env).unwrap(), expanded, "{text}");
        }
    }

    /// A value becomes exactly the string it holds wherever it stands: a
    /// secret with ` #` is not cut at a comment, a line break cannot add
    /// keys, quotes and backslashes inside quotes are escaped; numbers and
    /// lists given through the environment keep working.
    #[test]
    fn values_are_placed_as_the_strings_they_hold() {
        let vars: std::collections::HashMap<&str, &str> = [
            ("HASH", "Super #tail"),
            ("LINES", "a\nmulti-db: injected"),
            ("QUOTES", "q\"uo'te\\"),
            ("N", "100"),
            ("LIST", "[\"/a/*.db\", \"/b/*.db\"]"),
            ("COLON", "x: y"),
            ("NULL", "null"),
            ("TILDE", "~"),
            ("EMPTY", ""),
        ]
        .into_iter()
        .collect();
        let env = |v: &str| vars.get(v).map(|s| s.to_string());
        let parse = |yaml: &str| -> serde_yaml_ng::Value {
            serde_yaml_ng::from_str(&expand_env(yaml, env).unwrap()).unwrap()
        };
        let one = |yaml: &str| parse(yaml)["k"].clone();
        assert_eq!(one("k: ${HASH}\n"), "Super #tail");
        assert_eq!(one("k: ${HASH}   # a comment\n"), "Super #tail");
        assert_eq!(one("k: ${LINES}\n"), "a\nmulti-db: injected");
        assert!(parse("k: ${LINES}\n").get("multi-db").is_none());
        assert_eq!(one("k: ${COLON}\n"), "x: y");
        assert_eq!(
            one("k: \"pre-${QUOTES}-${HASH}\"\n"),
            "pre-q\"uo'te\\-Super #tail"
        );
        assert_eq!(one("k: 'pre-${QUOTES}'\n"), "pre-q\"uo'te\\");
        assert_eq!(one("k: [${HASH}, \"${LINES}\"]\n")[0], "Super #tail");
        assert_eq!(one("k: ${N}\n"), 100);
        // The word `null` is a string; an empty value is no value (`${VAR:-}`).
        assert_eq!(one("k: ${NULL}\n"), "null");
        assert_eq!(one("k: ${TILDE}\n"), "~");
        assert_eq!(one("k: pre-${NULL}\n"), "pre-null");
        assert!(one("k: ${EMPTY}\n").is_null());
        assert_eq!(one("k: ${LIST}\n")[1], "/b/*.db");
        // Part of a bare value: it cannot be quoted for the user.
        let (line, why) = expand_env("a: 1\nk: pre-${HASH}\n", env).unwrap_err();
        assert_eq!(line, 2);
        assert!(
            why.contains("${HASH}") && why.contains("double quotes"),
            "{why}"
        );
        assert!(expand_env("k: 'x${LINES}'\n", env).is_err());
    }

    #[test]
    fn unset_variable_names_it() {
        let e = load("multi-db:\n  patterns: [\"${LITEFLEET_SURELY_UNSET_VAR}\"]\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("LITEFLEET_SURELY_UNSET_VAR") && s.contains("line 2"),
            "{s}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load(&GOOD.replace("path:", "paht:"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("multi-db.replica") && e.contains("paht"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let y = GOOD.replace("replica:", "scan-interval: fifteen\n  replica:");
        let e = load(&y).unwrap_err().to_string();
        assert!(e.contains("multi-db.scan-interval"), "{e}");
    }

    #[test]
    fn unbound_template_variable() {
        let y = GOOD.replace("{{tenant}}", "{{tenant}}/{{extra}}");
        let e = load(&y).unwrap_err().to_string();
        assert!(
            e.contains("multi-db.replica.path") && e.contains("extra"),
            "{e}"
        );
    }

    #[test]
    fn unbound_segment() {
        let y = GOOD.replace("/{{tenant}}", "");
        let e = load(&y).unwrap_err().to_string();
        assert!(
            e.contains("multi-db.replica.path") && e.contains("not bound"),
            "{e}"
        );
    }

    #[test]
    fn missing_bucket() {
        let e = url_error("s3:///prefix");
        assert!(e.contains("no bucket"), "{e}");
    }

    /// The load error for [`GOOD`] with `url` as the replica URL: it names the key.
    fn url_error(url: &str) -> String {
        let e = load(&GOOD.replace("s3://bucket/some/prefix", url))
            .unwrap_err()
            .to_string();
        assert!(e.contains("multi-db.replica.url"), "{e}");
        e
    }

    #[test]
    fn missing_replica() {
        let e = load("multi-db:\n  patterns: [\"/x/*.db\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replica"), "{e}");
    }

    #[test]
    fn file_urls() {
        let base = Path::new("/base");
        let ReplicaUrl::File { dir } = parse_replica_url("file://./demo-replica", base).unwrap()
        else {
            panic!("a file:// URL")
        };
        // Without the `./`, also as text (logs, the lease's name).
        assert_eq!(dir.display().to_string(), "/base/demo-replica");
        assert_eq!(
            parse_replica_url("file:///var/b", base).unwrap(),
            ReplicaUrl::File {
                dir: "/var/b".into()
            }
        );
        assert!(parse_replica_url("gs://x", base).is_err());
        // RFC 8089's one-slash form, and the `localhost` host.
        for url in ["file:/var/b", "file://localhost/var/b"] {
            assert_eq!(
                parse_replica_url(url, base).unwrap(),
                ReplicaUrl::File {
                    dir: "/var/b".into()
                },
                "{url}"
            );
        }
        // Plain paths, also with a ':' past the first segment or after `./`.
        for (url, dir) in [
            ("backups", "/base/backups"),
            ("/var/b", "/var/b"),
            ("./s3:/x", "/base/s3:/x"),
            ("b/c:d", "/base/b/c:d"),
            ("file://../r", "/base/../r"),
        ] {
            assert_eq!(
                parse_replica_url(url, base).unwrap(),
                ReplicaUrl::File { dir: dir.into() },
                "{url}"
            );
        }
    }

    /// A value that starts like a URL is a supported URL or an error, never
    /// a directory named after it under the config's directory.
    #[test]
    fn url_like_values_are_refused() {
        let base = Path::new("/base");
        for (url, needle) in [
            (
                "s3:/mybucket/prefix",
                "s3:// URL with one slash (write s3://mybucket/prefix)",
            ),
            (
                "s3:mybucket",
                "s3:// URL without the // (write s3://mybucket)",
            ),
            ("S3://mybucket", "lower case (write s3://mybucket)"),
            ("FILE:///x", "lower case (write file:///x)"),
            ("gopher:/x", "unsupported scheme \"gopher\""),
            ("gs://b/x", "unsupported scheme \"gs\""),
            ("http://h/x", "unsupported scheme \"http\""),
            ("data:v1", "./data:v1"),
            ("file://somehost/tmp/x", "host \"somehost\""),
            ("file://backups", "file://./backups"),
            ("file:///", "the file system's root directory"),
            ("/", "the file system's root directory"),
            ("file:///tmp/../..", "the file system's root directory"),
            ("s3://b/../x", "an empty, `.` or `..` segment (\"..\")"),
            ("s3://b/a//x", "an empty, `.` or `..` segment (\"\")"),
            ("s3://b//x", "an empty, `.` or `..` segment (\"\")"),
            ("s3://b/a/./x/", "an empty, `.` or `..` segment (\".\")"),
            ("file://~/x", "host \"~\""),
            ("file:rel", "absolute path"),
            ("./a://b", "unsupported scheme"),
        ] {
            let e = parse_replica_url(url, base).unwrap_err();
            assert!(e.contains(needle), "{url}: {e}");
            assert!(e.contains(&format!("{url:?}")), "{url}: the value: {e}");
        }
        // A query or fragment is named, not shown: it may hold a secret.
        for (url, shown) in [
            ("s3://bucket?region=x", "\"s3://bucket?...\""),
            ("s3://bucket/p#frag", "\"s3://bucket/p#...\""),
            ("file:///d/r?x=1", "\"file:///d/r?...\""),
            (
                "s3://b/p?secretAccessKey=hunter2",
                "\"s3://b/p?...\" (the rest not shown)",
            ),
            ("s3://u:hunter2@b/p#hunter2", "\"s3://***@b/p#...\""),
        ] {
            let e = parse_replica_url(url, base).unwrap_err();
            assert!(e.contains("no query (`?`) or fragment"), "{url}: {e}");
            assert!(e.contains(shown) && !e.contains("hunter2"), "{url}: {e}");
        }
        // Through the whole config the key is named.
        let e = url_error("s3:/bucket/some/prefix");
        assert!(e.contains("one slash"), "{e}");
    }

    #[test]
    fn url_errors_hide_passwords() {
        for url in [
            "http://user:hunter2@h/x",
            "file://user:hunter2@h/x",
            "ftp:/user:hunter2@h",
        ] {
            let e = parse_replica_url(url, Path::new("/base")).unwrap_err();
            assert!(!e.contains("hunter2") && e.contains("***@h"), "{e}");
        }
        assert_eq!(redact_userinfo("s3://b/k@x"), "s3://b/k@x");
    }

    /// Credentials or tokens in a URL are refused without being shown, and
    /// malformed endpoints, regions and durations are config errors, not a
    /// panic at the first request (black-box probe).
    #[test]
    fn urls_that_carry_secrets_or_break_the_client_are_refused() {
        let with = |key: &str, value: &str| {
            let yaml = GOOD.replace("    path:", &format!("    {key}: {value}\n    path:"));
            load(&yaml).unwrap_err().to_string()
        };
        for (key, value, says) in [
            (
                "endpoint",
                "'http://user:Pa55word@127.0.0.1:9/'",
                "credentials do not belong",
            ),
            (
                "endpoint",
                "'http://127.0.0.1:9/?X-Amz-Security-Token=Pa55word'",
                "no query",
            ),
            ("endpoint", "'http://127.0.0.1:9/#Pa55word'", "no query"),
            ("endpoint", "'htp:/x@@:x'", "http:// or https://"),
            ("endpoint", "'127.0.0.1:9000'", "expected e.g. http://"),
            ("endpoint", "'not-a-url'", "is not a URL"),
            ("region", "\"us-east-1\\n\"", "not a region name"),
            ("region", "\"Pa55word\\n\"", "not a region name"),
            (
                "endpoint",
                "'http://127.0.0.1:9/a b'",
                "ASCII without spaces",
            ),
            ("endpoint", "'http://é.localhost:9'", "ASCII without spaces"),
            // Read as http://h/ by the URL parser, panicked the client
            // (black-box probe U31, F2).
            ("endpoint", "'http:127.0.0.1:9000'", "as http://host[:port]"),
            ("endpoint", "'http:/h'", "as http://host[:port]"),
            ("endpoint", "'http:///h'", "as http://host[:port]"),
            ("endpoint", "'https:h'", "as https://host[:port]"),
            // Percent-encoded credentials are masked too (probe U31, F7).
            (
                "endpoint",
                "'http%3A%2F%2Fu%3APa55word%40127.0.0.1%3A9'",
                "is not a URL",
            ),
            // A control character panicked the client (probe U31, F1).
            ("access-key-id", "\"AKIA\\nX\"", "control character"),
            (
                "secret-access-key",
                "\"Pa55word\\u0000\"",
                "control character",
            ),
            ("lease-ttl", "9999999999999999s", "at most 100 years"),
            ("retention", "300000000y", "at most 100 years"),
        ] {
            let e = with(key, value);
            assert!(
                e.contains(&format!("multi-db.replica.{key}")),
                "{value}: {e}"
            );
            assert!(e.contains(says), "{value}: {e}");
            assert!(!e.contains("Pa55word"), "{value}: {e}");
        }
        let e = load(&GOOD.replace("s3://bucket/some/prefix", "s3://AKIAUSER:Pa55word@bucket/p"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials do not belong"), "{e}");
        assert!(!e.contains("Pa55word") && !e.contains("AKIAUSER"), "{e}");
        let e = load(&GOOD.replace("s3://bucket/some/prefix", "s3://b ucket/p"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be part of a bucket name"), "{e}");
        // What works stays accepted.
        for (key, value) in [
            ("endpoint", "http://127.0.0.1:9000"),
            ("endpoint", "https://s3.example.com/"),
            ("region", "eu-west-1"),
            ("lease-ttl", "1day"),
        ] {
            let yaml = GOOD.replace("    path:", &format!("    {key}: {value}\n    path:"));
            load(&yaml).unwrap_or_else(|e| panic!("{key}: {value}: {e}"));
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let y = GOOD.replace(
            "path:",
            "access-key-id: AKIAEXAMPLE\n    secret-access-key: verysecretvalue\n    path:",
        );
        let l = load(&y).unwrap();
        let dbg = format!("{l:?}");
        assert!(
            !dbg.contains("verysecretvalue") && !dbg.contains("AKIAEXAMPLE"),
            "{dbg}"
        );
        assert_eq!(
            l.multi_db()
                .replica
                .secret_access_key
                .as_ref()
                .unwrap()
                .expose(),
            "verysecretvalue"
        );
    }
}
