//! The command line: parses arguments (clap derive), loads the config, sets up
//! logging and signals, and calls into the modules that do the work.
//!
//! Every error is printed once as `error: <what>: <why>` and exits 1; a
//! `--once` run that did not back up every matched database (an upload
//! failed, a path was unreadable, a database was refused for its key) exits
//! 1 too, so cron notices. `verify` has exit codes of its own (0 all proven,
//! 1 problems, 2 could not check; see [`mod@crate::restore::verify`]).
//!
//! The top of the tree: it may use every stage, and nothing uses it. Its
//! submodules are the presentation and the harness, kept out of the
//! product stages: [`progress`] (restore progress on a terminal or as log
//! lines), and the `bench` (with `bench cost` and `bench snapshot`), `soak` and `demo`
//! subcommands ([`mod@bench`], [`cost`], [`throughput`], [`soak`], [`demo`]), which drive
//! the product code from the outside; [`mod@explain`] previews a config.

pub mod bench;
pub mod cost;
pub mod demo;
pub mod explain;
pub mod logline;
pub mod loss;
pub mod progress;
pub mod soak;
pub mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::daemon::scheduler::Replicator;
use crate::replica::cold;
use crate::replica::storage::Replica;
use crate::restore::{RestoreOptions, RestoreOutcome};
use crate::source::config::Loaded;
use crate::{restore, Error, Result};

#[derive(Debug, Parser)]
#[command(
    name = "litefleet",
    version,
    about = "Continuous backup of very many SQLite databases to S3 or a directory"
)]
pub struct Cli {
    /// Config file (YAML, `multi-db:` section). Read by replicate,
    /// restore, list, generations, snapshots, verify and explain.
    #[arg(
        long,
        short,
        global = true,
        default_value = "litefleet.yml",
        env = "LITEFLEET_CONFIG"
    )]
    pub config: PathBuf,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter such
    /// as `litefleet=debug,info`). Overridden by LITEFLEET_LOG; an invalid
    /// filter in either is a usage error.
    #[arg(long, global = true, default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,
    /// Log lines as text, or as one JSON object per line (for a log
    /// collector).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "LITEFLEET_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the databases and replicate changes.
    Replicate {
        /// Run one scan-and-upload cycle (and a retention pass), then exit;
        /// exit 1 if a matched database was not backed up.
        #[arg(long)]
        once: bool,
    },
    /// Restore a database from the replica.
    Restore(RestoreArgs),
    /// List the databases and snapshots in the replica.
    List {
        /// Only keys under this prefix.
        prefix: Option<String>,
        /// Show every snapshot, not only a summary line per database.
        #[arg(long, short)]
        snapshots: bool,
    },
    /// WAL generations of one database (hot tier), newest first.
    Generations {
        /// Database key or path.
        target: String,
    },
    /// Every snapshot of one database: hourly (cold) and per generation (hot).
    Snapshots {
        /// Database key or path.
        target: String,
    },
    /// Create sample databases for the demo config (examples/litefleet.yml).
    Demo {
        /// How many databases to create.
        #[arg(long, default_value_t = 100)]
        databases: usize,
        /// Root of the demo tree.
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Preview what the config will do and cost: resolved settings, matches
    /// per pattern, key collisions and refused keys, limits, likely hot
    /// databases and the monthly S3 bill. Sends no request to the replica
    /// and writes nothing.
    Explain {
        /// Bill this many hot databases instead of those written within hot-duration.
        #[arg(long)]
        hot: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Exit 1 when there is any warning (no match, collision, refused key, limit).
        #[arg(long)]
        strict: bool,
    },
    /// Restore drill: restore every database (or a sample) into scratch
    /// space, check it and compare it with its source on this host. Exit
    /// 0: all ok, 1: problems found, 2: could not check.
    Verify(VerifyArgs),
    /// Print a shell completion script (e.g. `litefleet completions bash >
    /// /etc/bash_completion.d/litefleet`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only keys under this prefix (default: every key).
    pub prefix: Option<String>,
    /// Check this many keys picked at random (0: every key, as
    /// `verify-sample: 0` in the config).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Only keys with an object uploaded within this long (humantime: 24h, 30m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Databases checked at once [default: 16].
    #[arg(long, value_parser = parse_concurrency)]
    pub concurrency: Option<usize>,
    /// Print one JSON document (per-key results and the summary) instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// `litefleet verify`: runs the drill, prints a line per failure and the
/// summary (or the JSON document), and returns the exit code: 0 every
/// database proven, 1 problems found, 2 could not run or could not check,
/// 128 + the signal's number when SIGINT or SIGTERM stopped it (its scratch
/// directory removed first). Its final error is a JSON log line with
/// `--log-format json`, as other commands' are.
async fn verify_command(config: &std::path::Path, args: VerifyArgs, format: LogFormat) -> u8 {
    use std::io::Write as _;
    // The error line (a JSON log line with JSON logs) and, with --json, the
    // error document; then `code`.
    let fail = |e: &Error, code: u8| {
        if format == LogFormat::Json {
            tracing::error!("{e}");
        } else {
            logline::to_stderr(&logline::escape_line(&format!("error: {e}\n"), false));
        }
        if args.json {
            let mut out = logline::Lossy(std::io::stdout());
            let _ = writeln!(out, "{}", serde_json::json!({ "error": e.to_string() }));
        }
        code
    };
    let run = async {
        let loaded = Loaded::from_file(config)?;
        // Many databases: each fleet log index read once.
        let replica = loaded.open_existing_replica()?.with_memo();
        let mut opts = restore::VerifyOptions::new(&loaded, args.prefix.as_deref().unwrap_or(""));
        opts.sample = args.sample.filter(|&n| n > 0);
        opts.since = args.since;
        opts.concurrency = args.concurrency.unwrap_or(opts.concurrency);
        tracing::info!(prefix = %opts.prefix, sample = ?opts.sample, concurrency = opts.concurrency, "verifying backups in {replica}");
        let reporter = progress::BulkReporter::verify_for_stderr();
        let report = restore::verify(&loaded, &replica, &opts, &reporter).await;
        reporter.finish();
        report
    };
    // The drill's scratch space is a full copy of a database at a time, so
    // an interrupted drill must not leave it.
    let report = match until_signal(run, &[libc::SIGINT, libc::SIGTERM]).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail(&e, 2),
        // The drill (and its scratch directory, see
        // `restore::verify::Scratch`) was dropped with `run`.
        Err(n) => {
            let why = format!(
                "interrupted by {}; scratch restores removed",
                signal_name(n)
            );
            return fail(&Error::invalid("verify", why), 128 + n as u8);
        }
    };
    // What stdout cannot take (a full disk) is dropped: the exit code still
    // says what the drill found, where `println!` panicked with 101, a
    // code verify does not document (black-box probe G27).
    let mut out = logline::Lossy(std::io::stdout());
    if args.json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        for line in report.results.iter().filter_map(|r| r.failure_line()) {
            let _ = writeln!(out, "{}", shown(&line));
        }
        let _ = writeln!(out, "{}", report.summary.line());
    }
    report.summary.exit_code()
}

/// The drill `replicate` runs every `verify-interval`: `verify-sample`
/// random keys (every key with 0) of the whole replica, scratch space in
/// the replicator's staging directory (cleared at each start), each
/// failure logged as a warning.
pub fn verify_job(loaded: Arc<Loaded>, replica: Replica) -> crate::daemon::scheduler::VerifyJob {
    Arc::new(move || {
        let (loaded, replica) = (loaded.clone(), replica.clone());
        Box::pin(async move {
            let mut opts = restore::VerifyOptions::new(&loaded, "");
            let sample = loaded.multi_db().verify_sample;
            opts.sample = (sample > 0).then_some(sample);
            opts.scratch_parent = loaded
                .temp_dir()
                .join(format!("{:016x}", loaded.state_tag()));
            let report = restore::verify(&loaded, &replica, &opts, &restore::verify::Quiet).await?;
            for line in report.results.iter().filter_map(|r| r.failure_line()) {
                tracing::warn!("verify: {line}");
            }
            let s = &report.summary;
            let renew = report
                .results
                .iter()
                .filter(|r| r.status == restore::verify::Status::Problem)
                .flat_map(|r| r.sources.iter().cloned())
                .collect();
            Ok(crate::daemon::scheduler::VerifyCounts {
                ok: s.ok as u64,
                problems: s.problems as u64,
                could_not_check: s.could_not_check as u64,
                renew,
            })
        })
    })
}

/// How log lines are written to stderr (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (ANSI colours on a terminal).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, and
    /// `fields` (with `message`).
    Json,
}

/// Subcommands that never read the config file: the global `--config` is
/// hidden from their help (a local, hidden `--config` stands in for it, so
/// passing one is still accepted and ignored).
const WITHOUT_CONFIG: [&str; 3] = ["demo", "bench", "completions"];

/// The command line as parsed: the derived [`Cli`], with `--config` hidden
/// from the subcommands that do not read it (demo, bench, completions).
pub fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    for name in WITHOUT_CONFIG {
        cmd = cmd.mut_subcommand(name, |sub| {
            sub.arg(
                clap::Arg::new("config")
                    .long("config")
                    .short('c')
                    .value_parser(clap::value_parser!(PathBuf))
                    .hide(true),
            )
        });
    }
    cmd
}

/// [`command`] as shell completions describe it: `--config` offered for
/// the commands that read a config only. The parser's hidden `--config` of
/// `demo`, `bench` and `completions` (which accept and ignore it) showed up
/// in the bash and fish scripts anyway (black-box probe).
fn completion_command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command().mut_arg("config", |a| a.global(false));
    let Some(config) = cmd
        .get_arguments()
        .find(|a| a.get_id() == "config")
        .cloned()
    else {
        return cmd;
    };
    let reading: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .filter(|n| !WITHOUT_CONFIG.contains(&n.as_str()))
        .collect();
    for name in reading {
        let config = config.clone();
        cmd = cmd.mut_subcommand(name, |sub| sub.arg(config));
    }
    cmd
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Database key (e.g. p1/orders/main/t1) or the path of a database matched by a pattern.
    #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
    pub target: Option<String>,
    /// Restore every database under this key prefix (`/` for all) into the
    /// directory given by -o, as `OUTPUT/<key>.db`.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Where to write the restored database (with --prefix: a directory).
    #[arg(short, long)]
    pub output: PathBuf,
    /// With --prefix: databases restored at once [default: 16].
    #[arg(long, value_parser = parse_concurrency)]
    pub concurrency: Option<usize>,
    /// Restore the newest state the replica holds as of this time (RFC 3339):
    /// nothing committed after it is included.
    #[arg(long, value_parser = parse_timestamp)]
    pub timestamp: Option<DateTime<Utc>>,
    /// Exit successfully if the replica has no snapshot of the database
    /// (with --prefix: no database under the prefix).
    #[arg(long)]
    pub if_replica_exists: bool,
    /// Exit successfully, doing nothing, if the output already exists
    /// (with --prefix: skip databases whose output exists).
    #[arg(long)]
    pub if_db_not_exists: bool,
    /// If the newest cold snapshot is damaged, restore the next older state
    /// (with a warning) instead of failing.
    #[arg(long)]
    pub allow_older: bool,
}

/// Upper bound for --concurrency: beyond this the blocking thread pool and
/// open files, not the network, are the limit.
const MAX_RESTORE_CONCURRENCY: usize = 1024;

fn parse_concurrency(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_RESTORE_CONCURRENCY).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a number from 1 to {MAX_RESTORE_CONCURRENCY}"
        )),
    }
}

/// `restore --prefix`: every database under a prefix, with progress.
/// Warns when a restore's `--timestamp` is older than the config's
/// retention period at `now`: retention deleted the restore points before
/// it, but for the newest one of each database, so the state restored (the
/// newest the replica still holds at or before that time, exit 0) may be
/// much older than the database's state then (black-box probe B18: the
/// first hourly snapshot, which outlives the generations, came back for a
/// time weeks after it). `None` when nothing is said.
fn retention_warning(
    loaded: &Loaded,
    at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<String> {
    let at = at?;
    let retention = loaded.multi_db().replica.retention;
    let cutoff = now - chrono::Duration::from_std(retention).ok()?;
    (at < cutoff).then(|| {
        format!(
            "--timestamp {} is before the retention period of this config's replica ({}, from {}): \
             restore points before then were deleted, so a database's state restored may be \
             older than its state at that time (the newest kept at or before it)",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            config_duration(retention),
            cutoff.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    })
}

/// A duration as the config spells the defaults (`720h`): whole hours in
/// hours, anything else as humantime writes it.
fn config_duration(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s > 0 && s % 3600 == 0 && d.subsec_nanos() == 0 => format!("{}h", s / 3600),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn warn_before_retention(loaded: &Loaded, at: Option<DateTime<Utc>>, now: DateTime<Utc>) {
    if let Some(why) = retention_warning(loaded, at, now) {
        tracing::warn!("{why}");
    }
}

async fn restore_prefix(replica: &Replica, prefix: String, args: RestoreArgs) -> Result<()> {
    let opts = restore::BulkOptions {
        prefix,
        output_dir: args.output,
        timestamp: args.timestamp,
        concurrency: args
            .concurrency
            .unwrap_or(restore::DEFAULT_BULK_CONCURRENCY),
        if_db_not_exists: args.if_db_not_exists,
        if_replica_exists: args.if_replica_exists,
        allow_older: args.allow_older,
    };
    tracing::info!(prefix = %opts.prefix, output = %opts.output_dir.display(), concurrency = opts.concurrency, "bulk restore from {replica}");
    let reporter = progress::BulkReporter::for_stderr();
    let result = restore::restore_bulk(replica, &opts, &reporter).await;
    reporter.finish();
    let report = result?;
    if report.databases == 0 {
        tracing::info!(prefix = %opts.prefix, "no databases under the prefix; nothing to do (--if-replica-exists)");
        return Ok(());
    }
    tracing::info!(
        bytes = report.bytes,
        "bulk restore finished: restored {}, skipped {}, failed {} (restored from the hot tier: {}, from cold snapshots: {})",
        report.restored,
        report.skipped,
        report.failed.len(),
        report.restored_hot,
        report.restored - report.restored_hot,
    );
    if report.failed.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(
        format!("restore --prefix {:?}", opts.prefix),
        format!(
            "{} of {} database(s) failed; first: {}: {}",
            report.failed.len(),
            report.databases,
            report.failed[0].0,
            report.failed[0].1
        ),
    ))
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Rescan cost and tracking memory for a tree of tiny databases.
    Scan {
        #[arg(long, default_value_t = 100_000, value_parser = at_least_one)]
        databases: usize,
        /// Tree location (reused when it already holds that many databases).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Timed rescans (the median is reported).
        #[arg(long, default_value_t = 7, value_parser = at_least_one)]
        iterations: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Commit-to-replica lag of the hot tier (WAL streaming), one commit per second per database.
    Lag {
        /// Hot databases (each streamed by its own task).
        #[arg(long, default_value_t = 1000)]
        hot: usize,
        /// How long writers run (seconds, or humantime: 20s, 2m).
        #[arg(long, default_value = "20s", value_parser = parse_secs)]
        duration: std::time::Duration,
        /// The shipper's sync interval (seconds, or humantime: 1s, 500ms).
        #[arg(long, default_value = "1s", value_parser = parse_secs)]
        sync_interval: std::time::Duration,
        /// One object per database per sync instead of the fleet log (the
        /// layout before the fleet log, for comparison).
        #[arg(long)]
        no_fleet_log: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The S3 request bill: an idle fleet, then hot databases at one commit per second each.
    Cost {
        #[arg(long, default_value_t = 10_000)]
        databases: usize,
        /// Databases written, one commit per second each.
        #[arg(long, default_value_t = 250)]
        hot: usize,
        /// How long they are written (seconds, or humantime: 60s, 5m).
        #[arg(long, default_value = "60s", value_parser = parse_secs)]
        duration: std::time::Duration,
        /// The hot tier's sync interval.
        #[arg(long, default_value = "1s", value_parser = parse_secs)]
        sync_interval: std::time::Duration,
        /// The scan interval (also the length of the idle measurement).
        #[arg(long, default_value = "15s", value_parser = parse_secs)]
        scan_interval: std::time::Duration,
        /// Working directory; a fresh temp dir by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// One object per database per sync instead of the fleet log (the
        /// layout before the fleet log, for comparison).
        #[arg(long)]
        no_fleet_log: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What a SIGKILL of `replicate` loses: hot databases and databases waking from idle.
    Loss {
        /// Databases written once a second each, all along.
        #[arg(long, default_value_t = 50)]
        hot: usize,
        /// Databases idle until each round, then written 5 times.
        #[arg(long, default_value_t = 50)]
        waking: usize,
        /// Rounds, each ending with a SIGKILL.
        #[arg(long, default_value_t = 3)]
        kills: usize,
        /// Mean time from the waking databases' writes to the SIGKILL; each
        /// round draws it uniformly from 0 to twice this.
        #[arg(long, default_value = "2s", value_parser = parse_secs)]
        kill_after: std::time::Duration,
        /// Seed of the kill times (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value = "1s", value_parser = parse_secs)]
        sync_interval: std::time::Duration,
        #[arg(long, default_value = "15s", value_parser = parse_secs)]
        scan_interval: std::time::Duration,
        /// Working directory; a fresh temp dir by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cold-tier snapshot and restore speed against lz4 and sqlite3, side by side.
    Snapshot {
        /// Small databases for the many-databases round.
        #[arg(long, default_value_t = 3_000, value_parser = at_least_one)]
        databases: usize,
        /// Size of the one large database, in MB.
        #[arg(long, default_value_t = 256)]
        large_mb: u64,
        /// Rounds (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = at_least_one)]
        repeat: usize,
        /// Working directory (reused: the generated databases are kept); a fresh temp dir by default.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Random writers and injected store faults, then restore everything and compare.
    Soak {
        #[arg(long, default_value_t = 10_000)]
        databases: usize,
        /// How long writers run (humantime: 60s, 5m).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Writer threads.
        #[arg(long, default_value_t = 2)]
        writers: usize,
        /// Working directory (fleet, replica, restores); a fresh temp dir by default.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// A benchmark's working directory: `dir`, made absolute (the configs the
/// benchmarks write name it, and a relative `file://` URL names a host:
/// black-box probe Z32, `bench snapshot --dir rel`), or a fresh temporary
/// one that is removed when the returned guard drops.
fn work_dir(dir: Option<PathBuf>) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    match dir {
        Some(d) => Ok((None, std::path::absolute(&d).map_err(|e| Error::io(&d, e))?)),
        None => {
            let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            let path = tmp.path().to_path_buf();
            Ok((Some(tmp), path))
        }
    }
}

/// A count that must be at least 1 (a benchmark of no databases measures
/// nothing: `bench scan --databases 0` failed with "No such file or
/// directory", black-box probe U31).
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// What limits a process's threads, for the errors of a host that refuses
/// them.
const THREAD_LIMITS: &str =
    "a limit on this process's threads or memory: ulimit -u, systemd TasksMax, ulimit -v?";

/// A panic's message (its payload, when it is text).
fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// A duration: plain seconds (`20`, `0.5`) or humantime (`20s`, `500ms`).
fn parse_secs(s: &str) -> std::result::Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(std::time::Duration::from_secs_f64(f)),
        Ok(_) => Err(format!("invalid duration {s:?}")),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

/// One line per database: its cold snapshots and hot-tier generations (a
/// database that only ever streamed has no cold snapshot).
// A key as `list` shows it: decoded (the key `restore` takes), with
// control characters escaped (`\n`, `\u{1b}`) so that a key from a
// hostile object name can neither break the one-line-per-key output nor
// drive the terminal.
use logline::shown;

fn print_listing(
    out: &mut impl std::io::Write,
    dbs: &std::collections::BTreeMap<String, restore::KeyListing>,
    snapshots: bool,
) -> std::io::Result<()> {
    for (key, l) in dbs {
        let cold = match l.snapshots.last() {
            // The object's name is the hour *after* its upload (at most
            // one object per hour): show when it was uploaded, and the name.
            Some(newest) => format!(
                "{} snapshot(s)\tnewest uploaded {} (hourly object {})\t{} bytes",
                l.snapshots.len(),
                newest.uploaded.format("%Y-%m-%dT%H:%M:%SZ"),
                newest.hour.format("%Y%m%d-%H0000"),
                newest.size
            ),
            None => "0 snapshot(s)".to_string(),
        };
        let hot = match l.generations.first() {
            Some(g) => format!(
                "\t{} generation(s)\tnewest {} created {}",
                l.generations.len(),
                g,
                g.created().format("%Y-%m-%dT%H:%M:%SZ")
            ),
            None => String::new(),
        };
        let refused = match &l.refused {
            Some(why) => format!("\trefused: {}", shown(why)),
            None => String::new(),
        };
        writeln!(out, "{}\t{cold}{hot}{refused}", shown(key))?;
        if snapshots {
            for s in &l.snapshots {
                writeln!(
                    out,
                    "  {}\t{} bytes\tuploaded {}",
                    s.location,
                    s.size,
                    s.uploaded.to_rfc3339()
                )?;
            }
        }
    }
    out.flush()
}

fn parse_timestamp(s: &str) -> std::result::Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            // A time without its offset would be read in some zone: say
            // which part is missing rather than "premature end of input".
            if DateTime::parse_from_rfc3339(&format!("{s}Z")).is_ok() {
                format!("{s:?} has no time zone offset: add Z for UTC (e.g. {s}Z) or one such as +01:00")
            } else {
                format!("{s:?} is not an RFC 3339 timestamp (e.g. 2026-11-22T13:00:00Z): {e}")
            }
        })
}

/// `filter` as a tracing filter, or why it is not one.
fn log_filter(filter: &str) -> std::result::Result<tracing_subscriber::EnvFilter, String> {
    // A bare word that is no level is a directive for a target of that
    // name, which matches nothing of ours: `inof` or `warnn` silenced every
    // line, warnings and errors included (black-box probe U31, F8).
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    if let Some(word) = filter.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', '[', ':'])
            && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d))
    }) {
        return Err(format!(
            "{word:?} is no level: use error, warn, info, debug, trace or off, or a tracing \
             filter such as litefleet=debug,info (a target takes its level after =)"
        ));
    }
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| {
        format!(
            "not a log filter ({e}): use error, warn, info, debug, trace or a tracing \
             filter such as litefleet=debug,info"
        )
    })
}

/// Checks `--log-level` when the command line is parsed.
fn parse_log_level(level: &str) -> std::result::Result<String, String> {
    if level.trim().is_empty() {
        return Err("empty: use error, warn, info, debug, trace or off".into());
    }
    log_filter(level).map(|_| level.to_string())
}

/// The log filter: `LITEFLEET_LOG` if set, else `level` (`--log-level`,
/// already checked). An invalid `LITEFLEET_LOG` is a usage error, like a
/// bad `--log-level`.
fn log_filter_from_env(level: &str) -> std::result::Result<tracing_subscriber::EnvFilter, String> {
    let filter = match std::env::var("LITEFLEET_LOG") {
        // Set but empty (an env file's `LITEFLEET_LOG=`) is no value, as in
        // the config's `${VAR}`: it filtered out every line (probe U31, F8).
        Ok(v) if !v.trim().is_empty() => {
            return log_filter(&v)
                .map_err(|why| format!("invalid value {v:?} for LITEFLEET_LOG: {why}"))
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => match level {
            // At `info`, the object store client's line per retried request
            // is noise: the request's final failure is ours to log. A full
            // filter, or `debug`/`trace`, is taken as given.
            "info" => "info,object_store=warn".to_string(),
            other => other.to_string(),
        },
        Err(std::env::VarError::NotUnicode(v)) => {
            return Err(format!("invalid value {v:?} for LITEFLEET_LOG: not UTF-8"))
        }
    };
    log_filter(&filter)
}

fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            fmt.with_ansi(ansi)
                .with_writer(move || logline::OneLine::new(logline::Lossy(std::io::stderr()), ansi))
                .try_init()
        }
        LogFormat::Json => fmt
            .with_writer(|| logline::Lossy(std::io::stderr()))
            .json()
            .try_init(),
    };
}

/// Cancels the token on the first SIGINT/SIGTERM/SIGHUP; a second one exits
/// at once. SIGHUP (a closed terminal, or `kill -HUP` meant as a reload)
/// stops gracefully too: its default action killed the daemon like a crash,
/// leaving its lease to refuse the next start (black-box probe).
///
/// The handlers are installed before this returns, not in the task: a
/// signal that came before the task first ran (the daemon already asking
/// for its lease) had its default action, and killed the process.
fn install_signals(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {}, _ = hup.recv() => {} }
        tracing::info!(
            "shutdown requested: finishing in-flight uploads (signal again to exit now)"
        );
        token.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {}, _ = hup.recv() => {} }
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(130);
    });
}

/// Runs `work` until it ends, or until one of `signals` arrives: then
/// `work` is dropped, which removes what it staged (a restore's staging
/// file, a drill's scratch directory; a blocking step under way removes its
/// own when it ends, and the runtime waits for it before the process
/// exits; a second signal ends the process), and the signal's number is
/// returned. Killed by the signal
/// instead, a restore left its `.NAME.litefleet-XXXXXX` file behind and a
/// drill its scratch copy (black-box probe). Without handlers (they could
/// not be installed) `work` runs to its end.
async fn until_signal<T>(
    work: impl std::future::Future<Output = T>,
    signals: &[libc::c_int],
) -> std::result::Result<T, libc::c_int> {
    use tokio::signal::unix::{signal, SignalKind};
    let streams: std::io::Result<Vec<_>> = signals
        .iter()
        .map(|&n| signal(SignalKind::from_raw(n)).map(|s| (n, s)))
        .collect();
    let Ok(mut streams) = streams else {
        tracing::warn!(
            "cannot install signal handlers: a stop by signal leaves what the command staged"
        );
        return Ok(work.await);
    };
    let any = futures::future::select_all(streams.iter_mut().map(|(n, s)| {
        Box::pin(async move {
            s.recv().await;
            *n
        })
    }));
    tokio::select! {
        r = work => Ok(r),
        (n, _, _) = any => {
            // A second signal ends the process at once, as it ends the
            // daemon: the runtime waits for a blocking step under way
            // before the process exits, and one that never ends (a read
            // that hangs on the file system) held the command with every
            // later SIGTERM caught (black-box probe).
            for &s in signals {
                // SAFETY: restores the default disposition of a signal.
                unsafe {
                    libc::signal(s, libc::SIG_DFL);
                }
            }
            Err(n)
        }
    }
}

/// The name of a stop signal [`until_signal`] returns.
fn signal_name(n: libc::c_int) -> &'static str {
    match n {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// A restore stopped by SIGINT, SIGTERM or SIGHUP fails (see
/// [`until_signal`]) and installs nothing from then on
/// ([`restore::install::stop_installs`], which waits for an install under
/// way). A single restore (`one`) whose output was installed as the signal
/// came is complete: it ends as it would have, exit 0. A bulk restore's
/// outputs installed before the stop stay, and the error counts them.
async fn interruptible<T>(
    work: impl std::future::Future<Output = Result<T>>,
    one: bool,
) -> Result<T> {
    tokio::pin!(work);
    let n = match until_signal(work.as_mut(), &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]).await {
        Ok(r) => return r,
        Err(n) => n,
    };
    let installed = tokio::task::spawn_blocking(restore::install::stop_installs)
        .await
        .unwrap_or(0);
    if one && installed > 0 {
        // Only its last steps are left (the report).
        return work.await;
    }
    let kept = match installed {
        0 => "nothing was installed".to_string(),
        n => format!("the {n} output(s) installed before the stop stay, no other is installed"),
    };
    Err(Error::invalid(
        "restore",
        format!(
            "stopped by {}; {kept}, and its temporary files are removed",
            signal_name(n)
        ),
    ))
}

/// Exits the process `limit` after `token` is cancelled (a stop was asked
/// for) if it is still draining then: a store that does not answer would
/// otherwise hold the stop for the requests' timeouts and retries, past
/// systemd's stop timeout and into its SIGKILL (see
/// [`crate::source::config::DEFAULT_SHUTDOWN_TIMEOUT`]). Nothing is
/// recorded as uploaded that was not, so this loses no more than a crash.
fn spawn_shutdown_watchdog(token: CancellationToken, limit: std::time::Duration) {
    tokio::spawn(async move {
        token.cancelled().await;
        tokio::time::sleep(limit).await;
        tracing::error!(
            timeout = ?limit,
            "the stop took longer than multi-db.shutdown-timeout (the store does not answer?): exiting without waiting; what was not uploaded is uploaded at the next start"
        );
        std::process::exit(1);
    });
}

/// How long an idle thread of tokio's blocking pool waits for more work
/// before it exits (tokio's default: 10 s). Scans run every 15 s by
/// default, and in the benches every 5 s, so with the default the threads
/// of one scan's burst never left an idle daemon; with 2 s an idle daemon
/// is down to its runtime's threads between scans, and a hot tier that
/// syncs every second keeps the ones it uses.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = match command()
        .try_get_matches()
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let filter = match log_filter_from_env(&cli.log_level) {
        Ok(f) => f,
        Err(why) => command()
            .error(clap::error::ErrorKind::InvalidValue, why)
            .exit(),
    };
    init_logging(filter, cli.log_format);
    if !matches!(cli.command, Command::Replicate { .. }) {
        // A command whose output is cut off (`litefleet snapshots KEY |
        // head -3`) ends quietly, as Unix tools do, rather than panicking
        // in `println!` with exit 101 (probe E). Not the daemon: it writes
        // nothing a reader would close on it, and must never die of it.
        // SAFETY: before any other thread exists; sets a signal disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let format = cli.log_format;
    // tokio's `build` panics when the host refuses its worker threads, and
    // the unwinding from there could wait for the threads it had made, for
    // ever (black-box probe L29: `restore`, `replicate --once` and the
    // daemon hung after "OS can't spawn worker thread" under `ulimit -u` or
    // `ulimit -v`). A panic while the runtime starts ends the process at
    // once, exit 1, saying why.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        logline::to_stderr(&format!(
            "error: cannot start the runtime: {} ({THREAD_LIMITS})\n",
            panic_text(info)
        ));
        std::process::exit(1);
    }));
    let built = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build();
    // Later, the blocking pool grows a thread at a time, and a thread it
    // cannot start panics where the work was handed over. In the command's
    // own task (the main thread) that ends the command, exit 1, saying why
    // (black-box probe Y32: `replicate --once` under `ulimit -u 3` panicked
    // with exit 101 at its first blocking read). In the daemon's spawned
    // tasks the panic is caught and counted as the host's failure, and the
    // daemon goes on (see `PANICKED`).
    std::panic::set_hook(Box::new(move |info| {
        let why = panic_text(info);
        let no_thread = why.contains("can't spawn") || why.starts_with("failed to spawn thread");
        if no_thread && std::thread::current().name() == Some("main") {
            logline::to_stderr(&format!(
                "error: cannot start a thread: {why} ({THREAD_LIMITS})\n"
            ));
            std::process::exit(1);
        }
        hook(info)
    }));
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            logline::to_stderr(&format!("error: cannot start runtime: {e}\n"));
            return ExitCode::FAILURE;
        }
    };
    let cli = match cli.command {
        Command::Verify(args) => {
            return ExitCode::from(rt.block_on(verify_command(&cli.config, args, format)))
        }
        command => Cli { command, ..cli },
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // With JSON logs the final error is a log line too, so a collector
        // reading stderr sees only JSON.
        Err(e) if format == LogFormat::Json => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            logline::to_stderr(&logline::escape_line(&format!("error: {e}\n"), false));
            ExitCode::FAILURE
        }
    }
}

/// Refuses a replica root that lies inside another one (see
/// [`crate::replica::identity::enclosing_root`]), unless this one was made
/// first: then the other is the newcomer (a start cannot find the roots
/// inside its own without listing all of it), and refusing the replicator
/// that was there first would stop its backups at its next restart (a
/// crash loop under systemd); the newcomer's retention leaves it alone.
async fn nested_in(replica: &Replica) -> Result<()> {
    use crate::replica::identity;
    let Some(outer) = identity::enclosing_root(replica).await? else {
        return Ok(());
    };
    let ours = identity::read(replica)
        .await
        .ok()
        .flatten()
        .and_then(|i| i.created_at());
    if let (Some(ours), Some(theirs)) = (ours, outer.created) {
        if ours < theirs {
            tracing::warn!(
                enclosing = %outer.name,
                "another replica root was made around this one later; its retention leaves this one alone, but its `list` shows this one's databases: move one of them"
            );
            return Ok(());
        }
    }
    Err(Error::invalid(
        format!("replica {replica}"),
        format!(
            "lies inside another replica root, {} (it holds {}): its replicator would list this replica's objects as databases of its own and delete them by its retention; choose a replica URL outside it",
            outer.name,
            identity::IDENTITY_OBJECT
        ),
    ))
}

/// `e`, after giving back the replica lease taken for a start that failed
/// (so the next start need not wait for it to expire).
async fn given_back(lease: crate::replica::lease::Lease, e: Error) -> Error {
    if let Err(r) = lease.release().await {
        tracing::warn!(error = %r, "could not release the replica lease; it expires by itself");
    }
    e
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Verify(args) => match verify_command(&cli.config, args, cli.log_format).await {
            0 => Ok(()),
            code => Err(Error::invalid("verify", format!("exit code {code}"))),
        },
        Command::Replicate { once } => {
            let loaded = Loaded::from_file(&cli.config)?;
            loaded.check_enabled(&cli.config)?;
            // See bench::nofile_needed (and `litefleet explain`).
            let nofile = bench::raise_nofile_limit();
            let hot = loaded.multi_db().max_hot_databases;
            if let Some(n) = nofile.filter(|&n| n < bench::nofile_needed(hot)) {
                // Without a hot tier the descriptors are the uploads' and
                // the store's (black-box probe L20: "for the hot tier" with
                // `max-hot-databases: 0`).
                let what = if hot == 0 {
                    "open file limit may be too low for the uploads and the store's connections; \
                     raise `ulimit -n`"
                } else {
                    "open file limit may be too low for the hot tier; raise `ulimit -n`"
                };
                tracing::warn!(
                    limit = n,
                    wanted = bench::nofile_needed(hot),
                    max_hot_databases = hot,
                    "{what}"
                );
            }
            let token = CancellationToken::new();
            install_signals(token.clone());
            let addr = loaded.config.addr;
            let scan_interval = loaded.multi_db().scan_interval;
            let shutdown_timeout = loaded.multi_db().shutdown_timeout;
            // From the start: a stop while the lease is being taken is
            // bounded too (black-box probe: a slow store held it 62 s).
            spawn_shutdown_watchdog(token.clone(), shutdown_timeout);
            // One writer per replica root: take the lease before anything
            // touches the replica or the staging directory.
            let replica = loaded.open_replica()?;
            let ttl = loaded.multi_db().replica.lease_ttl;
            let check = loaded.multi_db().replica.check_conditional_writes;
            let acquire = async {
                let mut lease = crate::replica::lease::Lease::acquire_with_ttl(
                    &replica,
                    chrono::Utc::now(),
                    ttl,
                )
                .await?;
                if !check {
                    tracing::warn!("multi-db.replica.check-conditional-writes is false: not checked that the store honours the lease's conditional writes");
                } else if let Err(e) = lease.check_conditional_writes().await {
                    return Err(given_back(lease, e).await);
                }
                match nested_in(&replica).await {
                    Ok(()) => Ok(lease),
                    Err(e) => Err(given_back(lease, e).await),
                }
            };
            let lease = tokio::select! {
                lease = acquire => lease?,
                () = token.cancelled() => {
                    tracing::info!("stopped while taking the replica lease: nothing was replicated (a lease write still in flight may hold the replica until it expires)");
                    return Ok(());
                }
            };
            tracing::info!(holder = %lease.record().owner, expires = %lease.expires().to_rfc3339(), "replica lease acquired");
            // Every write of the replicator stops when the lease does (and
            // /healthz says so while it is stopped).
            let fence = lease.fence();
            let replica = replica.with_fence(fence.clone());
            let wait = lease.takeover_wait();
            let after_clean_stop = lease.after_clean_stop();
            let renewer = crate::replica::lease::spawn_renewer(lease, token.clone());
            if !wait.is_zero() {
                tracing::warn!(
                    wait_secs = wait.as_secs(),
                    "took over a replica lease its holder did not release (it expired, or was deleted or edited by hand): writing nothing until a holder that may still run has found it lost and stopped"
                );
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = token.cancelled() => {
                        // Stopped, or the lease lost meanwhile (the error says so).
                        return renewer.release().await;
                    }
                }
            }
            // The endpoint outlives the loop's drain, so /healthz answers
            // while in-flight uploads finish; it stops after `run` returns.
            let ops_stop = CancellationToken::new();
            // Scratch directories of `litefleet verify` runs that were killed
            // (a running drill's is locked and stays).
            let stale = crate::restore::verify::remove_stale_scratch(&loaded.temp_dir());
            if stale > 0 {
                tracing::info!(removed = stale, dir = %loaded.temp_dir().display(), "removed the scratch directories of interrupted verify runs");
            }
            let verify = verify_job(Arc::new(loaded.clone()), replica.unfenced());
            let started = async {
                let mut replicator = Replicator::with_replica(loaded, replica)?.with_verify(verify);
                if after_clean_stop {
                    replicator = replicator.after_clean_stop();
                }
                let replicator = Arc::new(replicator);
                let ops = match addr {
                    Some(addr) => Some(
                        crate::daemon::server::serve(
                            addr,
                            replicator.stats(),
                            scan_interval,
                            Some(fence),
                            ops_stop.clone(),
                        )
                        .await?
                        .1,
                    ),
                    None => None,
                };
                Ok::<_, Error>((replicator, ops))
            }
            .await;
            let (replicator, ops) = match started {
                Ok(v) => v,
                Err(e) => {
                    // A start that fails (the operations port in use, say)
                    // gives the lease back, so the next start need not wait
                    // for it to expire.
                    if let Err(r) = renewer.release().await {
                        tracing::warn!(error = %r, "could not release the replica lease; it expires by itself");
                    }
                    return Err(e);
                }
            };
            // READY=1 / STOPPING=1 for systemd's `Type=notify`: the lease
            // is held and the endpoint listens by now.
            let notify = crate::daemon::notify::spawn(&replicator, token.clone());
            let stopping = token.clone();
            let result = replicator.run(once, token).await;
            if let Some(task) = notify {
                // After a signal it has said STOPPING=1 (or is about to);
                // otherwise it would wait for one for ever.
                if stopping.is_cancelled() {
                    let _ = task.await;
                } else {
                    task.abort();
                }
            }
            // Uploads have finished: now the lease may go.
            let released = renewer.release().await;
            ops_stop.cancel();
            if let Some(task) = ops {
                let _ = task.await;
            }
            // A lost lease is the more important error: it explains why the
            // loop stopped.
            match (result, released) {
                (_, Err(e @ Error::LeaseLost { .. })) => Err(e),
                (Err(e), released) => {
                    // Said even when the run failed: the lease left behind
                    // refuses the next run until it expires.
                    if let Err(r) = released {
                        tracing::warn!(error = %r, "could not release the replica lease; it expires by itself, and until then another replicate is refused");
                    }
                    Err(e)
                }
                (Ok(()), Err(e)) => {
                    tracing::warn!(error = %e, "could not release the replica lease; it expires by itself");
                    Ok(())
                }
                (Ok(()), Ok(())) => Ok(()),
            }
        }
        Command::Restore(args) => {
            let loaded = Loaded::from_file(&cli.config)?;
            // Reading: a mistyped file:// path fails, also with
            // --if-replica-exists, rather than becoming an empty replica.
            let replica = loaded.open_existing_replica()?;
            let target = match (args.prefix.clone(), args.target.clone()) {
                (Some(prefix), _) => {
                    warn_before_retention(&loaded, args.timestamp, Utc::now());
                    // Many databases: each fleet log index read once.
                    let replica = replica.with_memo();
                    return interruptible(restore_prefix(&replica, prefix, args), false).await;
                }
                (None, _) if args.concurrency.is_some() => {
                    return Err(Error::invalid(
                        "restore --concurrency",
                        "only applies with --prefix",
                    ))
                }
                (None, Some(t)) => t,
                (None, None) => {
                    return Err(Error::invalid("restore", "name a database or --prefix"))
                }
            };
            warn_before_retention(&loaded, args.timestamp, Utc::now());
            let opts = RestoreOptions {
                target,
                output: args.output,
                timestamp: args.timestamp,
                if_replica_exists: args.if_replica_exists,
                if_db_not_exists: args.if_db_not_exists,
                allow_older: args.allow_older,
            };
            let bar = progress::download_bar(&opts.target);
            let result = interruptible(
                restore::restore_with_progress(
                    &loaded,
                    &replica,
                    &opts,
                    bar.as_ref().map(|(_, hook)| hook.clone()),
                ),
                true,
            )
            .await;
            if let Some((bar, _)) = &bar {
                bar.finish_and_clear();
            }
            match result? {
                RestoreOutcome::Restored {
                    key,
                    tier,
                    object,
                    bytes,
                    uploaded,
                } => {
                    let from = match tier {
                        restore::Tier::Cold => "the cold tier (hourly snapshot)",
                        restore::Tier::Hot => {
                            "the hot tier (WAL generation: snapshot + WAL replay)"
                        }
                    };
                    tracing::info!(%key, %tier, %object, bytes, uploaded = %uploaded.to_rfc3339(), output = %opts.output.display(), "restored from {from}; integrity_check ok");
                }
                RestoreOutcome::OutputExists => {
                    tracing::info!(output = %opts.output.display(), "output exists; nothing to do (--if-db-not-exists)");
                }
                RestoreOutcome::NoReplica => {
                    tracing::info!(target = %opts.target, "no snapshot in the replica; nothing to do (--if-replica-exists)");
                }
            }
            // A restore killed (SIGKILL) leaves its staging file, as large
            // as the database, which nothing else ever removes (black-box
            // probe Q30: 1-1.6 GB each, unmentioned by the next restores).
            let left = crate::capture::snapshot::staged_beside(&opts.output);
            if !left.is_empty() {
                let files: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
                tracing::warn!(files = %files.join(" "), "staging files of other restores of this output lie beside it: a killed restore leaves them; delete them unless a restore of it is running");
            }
            Ok(())
        }
        Command::List { prefix, snapshots } => {
            let loaded = Loaded::from_file(&cli.config)?;
            let replica = loaded.open_existing_replica()?;
            let dbs = restore::list_databases(&replica, prefix.as_deref()).await?;
            let mut out = std::io::stdout().lock();
            // A closed pipe (`litefleet list | head`) just ends the listing.
            let _ = print_listing(&mut out, &dbs, snapshots);
            eprintln!("{} database(s) in {replica}", dbs.len());
            Ok(())
        }
        Command::Generations { target } => {
            let loaded = Loaded::from_file(&cli.config)?;
            let replica = loaded.open_existing_replica()?;
            let key = restore::resolve_key(&loaded, &target)?;
            let gens = crate::replica::hot::list_generations(&replica, &key).await?;
            let rfc = |t: Option<DateTime<Utc>>| t.map_or("-".to_string(), |t| t.to_rfc3339());
            for g in &gens {
                println!(
                    "{}  created {}  snapshots {}  wal segments {}  last position {}  uploads {} .. {}",
                    g.id.as_str(),
                    g.created.to_rfc3339(),
                    g.snapshots.len(),
                    g.segments,
                    g.last_segment.map_or("-".to_string(), |p| p.to_string()),
                    rfc(g.first_upload),
                    rfc(g.last_upload),
                );
            }
            eprintln!(
                "{} generation(s) of {} in {replica}",
                gens.len(),
                shown(&key)
            );
            if gens.is_empty() && cold::snapshots(&replica, &key).await?.is_empty() {
                return Err(Error::NotFound(format!(
                    "no backup of {key:?} in {replica} (see `litefleet list`)"
                )));
            }
            Ok(())
        }
        Command::Snapshots { target } => {
            let loaded = Loaded::from_file(&cli.config)?;
            let replica = loaded.open_existing_replica()?;
            let key = restore::resolve_key(&loaded, &target)?;
            let mut n = 0;
            for s in cold::snapshots(&replica, &key).await? {
                n += 1;
                println!(
                    "cold  {}  uploaded {}  {} bytes",
                    s.location,
                    s.uploaded.to_rfc3339(),
                    s.size
                );
            }
            for g in crate::replica::hot::list_generations(&replica, &key).await? {
                for s in &g.snapshots {
                    n += 1;
                    println!(
                        "hot   {}  uploaded {}  {} bytes",
                        s.location,
                        s.uploaded.to_rfc3339(),
                        s.size
                    );
                }
            }
            eprintln!("{n} snapshot(s) of {} in {replica}", shown(&key));
            if n == 0 {
                return Err(Error::NotFound(format!(
                    "no snapshot of {key:?} in {replica} (see `litefleet list`)"
                )));
            }
            Ok(())
        }
        Command::Explain { hot, json, strict } => {
            let loaded = Loaded::from_file(&cli.config)?;
            explain::command(
                cli.config,
                loaded,
                explain::ExplainOptions { hot },
                json,
                strict,
            )
            .await
        }
        Command::Completions { shell } => {
            // Into a buffer: `generate` panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut completion_command(), "litefleet", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
                .map_err(|e| Error::invalid("completions", format!("cannot write to stdout: {e}")))
        }
        Command::Demo { databases, dir } => {
            let made = tokio::task::spawn_blocking(move || {
                demo::create(&dir, databases).map(|v| (v, dir))
            })
            .await
            .map_err(|e| Error::invalid("demo", e.to_string()))??;
            println!(
                "created {} demo databases under {}",
                made.0.len(),
                made.1.display()
            );
            Ok(())
        }
        Command::Bench(BenchCommand::Soak {
            databases,
            duration,
            writers,
            dir,
        }) => {
            let (_tmp, dir) = work_dir(dir)?;
            let r = crate::cli::soak::soak(crate::cli::soak::SoakOptions {
                databases,
                duration,
                writers,
                dir,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            if r.restored_exactly == r.databases {
                Ok(())
            } else {
                Err(Error::invalid(
                    "bench soak",
                    format!(
                        "{} of {} databases restored exactly",
                        r.restored_exactly, r.databases
                    ),
                ))
            }
        }
        Command::Bench(BenchCommand::Snapshot {
            databases,
            large_mb,
            repeat,
            dir,
            json,
        }) => {
            let (_tmp, dir) = work_dir(dir)?;
            let r = throughput::snapshot_bench(throughput::SnapshotBenchOptions {
                databases,
                large_mb,
                repeat,
                dir,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                throughput::print(&r);
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Cost {
            databases,
            hot,
            duration,
            sync_interval,
            scan_interval,
            dir,
            no_fleet_log,
            json,
        }) => {
            if sync_interval.is_zero() || scan_interval.is_zero() {
                return Err(Error::invalid("bench cost", "intervals must be > 0"));
            }
            let nofile = bench::raise_nofile_limit();
            tracing::debug!(?nofile, "open file limit");
            let (_tmp, dir) = work_dir(dir)?;
            let r = cost::cost(cost::CostOptions {
                databases,
                hot,
                duration,
                sync_interval,
                scan_interval,
                dir,
                fleet_log: !no_fleet_log,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                let row = |label: &str, value: String| println!("{label:<40}{value}");
                let reqs = |q: &soak::Requests| {
                    format!(
                        "PUT {} / GET {} / LIST {} / DELETE {}",
                        q.put, q.get, q.list, q.delete
                    )
                };
                row("databases / hot", format!("{} / {}", r.databases, r.hot));
                row(
                    "sync interval / scan interval",
                    format!("{}s / {}s", r.sync_interval_s, r.scan_interval_s),
                );
                row(
                    &format!("idle fleet, {:.1} s", r.idle_window_s),
                    reqs(&r.idle),
                );
                row(
                    "requests per idle database per day",
                    format!("{:.3}", r.requests_per_idle_db_per_day),
                );
                row(
                    &format!("hot phase, {:.0} s, {} commits", r.duration_s, r.commits),
                    reqs(&r.hot_phase),
                );
                row(
                    "PUT per hot database per second",
                    format!("{:.4}", r.put_per_hot_db_per_s),
                );
                row(
                    "fleet log objects (per sync, steady)",
                    format!("{} ({:.2})", r.log_objects, r.log_objects_per_tick),
                );
                row(
                    "scenario: 100k DBs, 250 hot, 30 days",
                    format!(
                        "${:.2} (hot ${:.2} + fleet log ${:.2} + idle ${:.2} + lease ${:.2} + retention ${:.2}); target <= ${:.0}",
                        r.scenario_total_usd,
                        r.scenario_hot_usd,
                        r.scenario_log_usd,
                        r.scenario_idle_usd,
                        r.scenario_lease_usd,
                        r.scenario_retention_usd,
                        r.target_usd
                    ),
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Loss {
            hot,
            waking,
            kills,
            kill_after,
            seed,
            sync_interval,
            scan_interval,
            dir,
            json,
        }) => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
            if sync_interval.is_zero() || scan_interval.is_zero() {
                return Err(Error::invalid("bench loss", "intervals must be > 0"));
            }
            let (_tmp, dir) = work_dir(dir)?;
            let r = loss::loss(loss::LossOptions {
                hot,
                waking,
                kills,
                kill_after,
                seed,
                sync_interval,
                scan_interval,
                dir,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "{} kills (seed {}; at {} s after the waking commits), sync interval {}s, target: nothing older than {}s lost",
                    r.kills,
                    r.seed,
                    r.kill_after_s
                        .iter()
                        .map(|d| format!("{d:.2}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.sync_interval_s,
                    r.target_s
                );
                println!(
                    "{:<8}{:>10}{:>10}{:>8}{:>16}{:>22}",
                    "class", "databases", "commits", "lost", "beyond target", "window p50/p99/max"
                );
                for c in &r.classes {
                    println!(
                        "{:<8}{:>10}{:>10}{:>8}{:>16}{:>22}",
                        c.class,
                        c.databases,
                        c.commits,
                        c.lost,
                        c.lost_beyond_target,
                        format!(
                            "{:.2}/{:.2}/{:.2} s",
                            c.window_p50_s, c.window_p99_s, c.window_max_s
                        )
                    );
                }
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Lag {
            hot,
            duration,
            sync_interval,
            no_fleet_log,
            json,
        }) => {
            if sync_interval.is_zero() {
                return Err(Error::invalid("bench lag --sync-interval", "must be > 0"));
            }
            let nofile = bench::raise_nofile_limit();
            tracing::debug!(?nofile, "open file limit");
            let r = bench::lag(bench::LagOptions {
                hot,
                duration,
                sync_interval,
                fleet_log: !no_fleet_log,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                let row = |label: &str, value: String| println!("{label:<34}{value}");
                row("hot databases", r.databases.to_string());
                row(
                    "duration / sync interval",
                    format!("{:.0}s / {}s", r.duration_s, r.sync_interval_s),
                );
                row(
                    "initial snapshots",
                    format!("{:.1} s", r.initial_snapshots_s),
                );
                row(
                    "commits (shipped)",
                    format!(
                        "{} ({}, {} unmatched, {} write errors)",
                        r.commits, r.shipped, r.unmatched, r.write_errors
                    ),
                );
                row(
                    "lag median / p90 / p99 / max",
                    format!(
                        "{:.3} / {:.3} / {:.3} / {:.3} s",
                        r.lag_median_s, r.lag_p90_s, r.lag_p99_s, r.lag_max_s
                    ),
                );
                row(
                    "checkpoints / new generations",
                    format!("{} / {}", r.checkpoints, r.extra_snapshots),
                );
                row("sync errors", r.hot_errors.to_string());
                row("fleet log objects", r.log_objects.to_string());
                row(
                    "open fds (steady state)",
                    r.open_fds.map_or("(unknown)".into(), |n| n.to_string()),
                );
                row(
                    "RSS (steady state / peak)",
                    format!("{:.1} / {:.1} MiB", r.rss_mib, r.peak_rss_mib),
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Scan {
            databases,
            dir,
            iterations,
            json,
        }) => {
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("litefleet-bench-{databases}"))
            });
            let r = tokio::task::spawn_blocking(move || {
                bench::scan(&dir, databases, iterations.max(1))
            })
            .await
            .map_err(|e| Error::invalid("bench", e.to_string()))??;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                let n = r.iterations;
                let row = |label: String, value: String| println!("{label:<34}{value}");
                row("databases".into(), r.databases.to_string());
                row(
                    "first scan (new table)".into(),
                    format!("{:.1} ms", r.first_scan_ms),
                );
                row(
                    "first scan reading headers".into(),
                    format!("{:.1} ms", r.first_scan_headers_ms),
                );
                row(
                    format!("rescan, unchanged (median of {n})"),
                    format!("{:.1} ms", r.rescan_median_ms),
                );
                row(
                    "key check after a change".into(),
                    format!("{:.1} ms", r.key_check_ms),
                );
                row(
                    format!("find -printf (median of {n})"),
                    r.find_median_ms
                        .map_or("(find not available)".into(), |f| format!("{f:.1} ms")),
                );
                row(
                    "table bytes per database".into(),
                    format!("{:.1}", r.table_bytes_per_db),
                );
                row(
                    "RSS growth per database".into(),
                    format!("{:.1}", r.rss_delta_bytes_per_db),
                );
                row("peak RSS".into(), format!("{:.1} MiB", r.peak_rss_mib));
            }
            Ok(())
        }
    }
}
