//! The replicate loop: scan, upload what changed, retry what failed, stop cleanly.
//!
//! One [`Replicator`] serves the whole fleet. Each cycle
//!
//! 1. runs a [`Tracker::scan`] on the blocking pool (pure `stat` work),
//! 2. takes every pending database and uploads it through a [`JoinSet`] that
//!    never holds more than `max-concurrent` databases (so memory, temp disk
//!    and open files are bounded however many databases changed at once),
//!    in batches whose snapshots one blocking task takes one after the other
//!    (`SNAPSHOT_BATCH`); on a `file://` replica a batch's small snapshots
//!    are made durable together (`LocalBatch`: two `syncfs` per batch),
//! 3. records each outcome: success marks the database synced *as of the scan
//!    that selected it*; failure leaves it pending, so the next cycle retries it.
//!
//! A hot database's pending change is handed to its WAL stream instead, with
//! the same kind of ticket: it is marked synced only when a sync that began
//! after that scan has uploaded everything (checked at the next cycles), and
//! goes back to the cold tier when the stream fails or ends without that. So
//! neither the table nor the state file ever says "synced" for something that
//! was not uploaded, and a crash before a stream shipped leaves the database
//! pending for the next run.
//!
//! Shutdown (SIGINT/SIGTERM, see [`crate::cli`]) cancels a token: no new
//! upload starts, uploads already running are finished, then `run` returns.
//! Retention runs beside the loop on its own interval, and so do restore
//! drills when `verify-interval` is set ([`verify_loop`]). What a drill does
//! is the restore stage's (`litefleet verify`), which sits above this one:
//! the command line hands the drill in as a [`VerifyJob`]
//! ([`Replicator::with_verify`]); this module owns when it runs and
//! records its counts in [`Stats`].

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::capture::fleetlog;
use crate::capture::ship::{self, HotContext, HotExit, ShipConfig, StreamProgress};
use crate::capture::snapshot;
use crate::capture::work::{bounded, Work};
use crate::replica::cold;
use crate::replica::retention;
use crate::replica::storage::{LocalBatch, Replica};
use crate::source::config::Loaded;
use crate::source::discover::{check_no_link_below, root_of};
use crate::source::keys::{key_for, Owners, Refusal};
use crate::source::tier::{TierConfig, Tiers};
use crate::source::track::{Id, ScanReport, Ticket, Tracker};
use crate::source::vfs::has_sqlite_header;
use crate::source::watch::{Batch, Watch};
use crate::stats::Stats;
use crate::{Error, Result};

/// Staged `file://` objects older than this at a start were left by a
/// killed run ([`Replica::remove_stale_staging`]); a margin for the clock
/// that stamps files, which lags the system clock by up to a kernel tick,
/// so nothing this run stages is taken for one.
const STAGING_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether an upload pass is followed by others ([`Tracker::pending`]) or
/// is the last one (`replicate --once`, the pass at a clean stop), which
/// also makes the second upload of racy databases
/// ([`Tracker::pending_all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Ongoing,
    Last,
}

/// What one cycle did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CycleReport {
    pub scan: ScanReport,
    pub uploaded: usize,
    pub failed: usize,
    pub bytes: u64,
    /// Databases refused for their key after this cycle (a key another
    /// database owns, or one `restore` would refuse: see
    /// [`crate::source::keys`]): matched, but not backed up.
    pub refused: usize,
    /// Shutdown was requested before every pending database was dispatched.
    pub interrupted: bool,
    /// Of `failed`, uploads whose request got no answer within
    /// `replica.timeout` (see [`Replicator::upload_limit`]).
    pub timed_out: usize,
    /// The databases this cycle uploaded (4 bytes each): the stop's
    /// accounting takes a hot database the stop pass uploaded as covered,
    /// whatever its stream's last sync did.
    pub uploaded_ids: Vec<Id>,
}

/// The fleet replicator.
pub struct Replicator {
    loaded: Arc<Loaded>,
    replica: Replica,
    tracker: Arc<Mutex<Tracker>>,
    stats: Arc<Stats>,
    temp_dir: PathBuf,
    state_file: PathBuf,
    /// Databases whose last upload failed, so a failure that repeats every
    /// cycle (permission denied, a corrupt file, a full disk) is logged once
    /// at warn and then at debug until the database recovers.
    /// Holds only failing databases, so it is empty in a healthy fleet.
    failing: Mutex<HashSet<PathBuf>>,
    /// Databases whose last snapshot found them locked by their application
    /// (`SQLITE_BUSY`): their next attempt waits only [`MIN_BUSY_WAIT`], so a
    /// database kept locked (`locking_mode=EXCLUSIVE`) does not spend a
    /// batch's whole wait at every cycle (probe G: with a 2 s scan interval,
    /// cycles ran back to back and writes to other databases waited 9.6 s
    /// for their upload). Empty unless databases are locked.
    busy: Mutex<HashSet<PathBuf>>,
    /// The hot tier: tiering decisions and one streaming task per hot database.
    hot: HotTier,
    /// Databases refused for their key: one another database owns
    /// (multi-pattern fleets), or one that breaks the key rule.
    owners: Mutex<Owners>,
    /// Rounds of the `run` loop completed (a cycle, or a re-check after
    /// change notifications), for whoever waits on the loop.
    rounds: tokio::sync::watch::Sender<u64>,
    /// Cold uploads in flight at once (see [`Replicator::upload_limit`]).
    upload_limit: std::sync::atomic::AtomicUsize,
    /// Scans begun: the service manager is told the daemon is ready once
    /// the first one has (see [`crate::daemon::notify`]).
    scans_started: tokio::sync::watch::Sender<u64>,
    /// Databases a re-check uploaded or handed on, and when: for one scan
    /// interval after that, notifications about them wait for the scan.
    /// Holds only recently notified databases.
    notified: Mutex<HashMap<Id, tokio::time::Instant>>,
    /// Upload records were loaded from the state file and are still to be
    /// checked against the replica, before the first scan
    /// ([`Replicator::check_records`]).
    records_unchecked: std::sync::atomic::AtomicBool,
    /// The restore drill run every `verify-interval` (see [`verify_loop`]).
    verify: Option<VerifyJob>,
    /// The last save of upload records failed: the next failure is logged
    /// at debug, until a save succeeds (probe J20: a full state-dir logged
    /// it at every cycle and notification, 37 lines in 10 s).
    state_save_failing: std::sync::atomic::AtomicBool,
    /// The replica identity the upload records were checked against
    /// ([`Replicator::check_records`]), recorded beside the state file
    /// again whenever that record is gone ([`Replicator::save_state`]).
    replica_id: Mutex<Option<String>>,
}

/// The counts of one restore drill, as the daemon records them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyCounts {
    pub ok: u64,
    pub problems: u64,
    pub could_not_check: u64,
    /// The files on this host of the keys the drill found a problem with
    /// (damaged, a gap, not found, differing from an unchanged source):
    /// the daemon uploads them again ([`Replicator::renew`]).
    pub renew: Vec<PathBuf>,
}

/// One restore drill: `Err` when it could not run at all (the replica is
/// unreachable, nothing to verify).
pub type VerifyJob =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<VerifyCounts>> + Send + Sync>;

/// Runs `job` every `every` (the first after one interval) until
/// `shutdown`, one drill at a time (a drill longer than the interval delays
/// the next), and records each in `stats`. A drill still running at
/// shutdown is abandoned: it only reads the replica, and its scratch space
/// is removed as it is dropped.
pub async fn verify_loop(
    every: std::time::Duration,
    job: VerifyJob,
    stats: Arc<Stats>,
    renew: impl Fn(&[PathBuf]),
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = job() => r,
        };
        let c = match &result {
            Ok(c) => c.clone(),
            Err(_) => VerifyCounts::default(),
        };
        renew(&c.renew);
        stats.verify_last_ok.store(c.ok, Ordering::Relaxed);
        stats
            .verify_last_problems
            .store(c.problems, Ordering::Relaxed);
        stats
            .verify_last_unverifiable
            .store(c.could_not_check, Ordering::Relaxed);
        stats
            .verify_last_failed
            .store(u64::from(result.is_err()), Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        stats.verify_last_unix.store(now, Ordering::Relaxed);
        stats.verify_runs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(c) if c.problems > 0 => tracing::error!(
                ok = c.ok,
                problems = c.problems,
                could_not_check = c.could_not_check,
                "restore drill found problems (run `litefleet verify` for the details)"
            ),
            Ok(c) if c.could_not_check > 0 => tracing::warn!(
                ok = c.ok,
                could_not_check = c.could_not_check,
                "restore drill could not check every database"
            ),
            Ok(c) => tracing::info!(ok = c.ok, "restore drill: every database checked is ok"),
            Err(e) => {
                tracing::warn!(error = %e, "restore drill could not run; will retry next interval")
            }
        }
    }
}

/// The hot tier's moving parts (see [`crate::source::tier`] and [`crate::capture::ship`]).
struct HotTier {
    tiers: Mutex<Tiers>,
    /// `hot-duration`: how recently a file must have been written to stream.
    recent: std::time::Duration,
    running: Mutex<HashMap<Id, Running>>,
    /// The fingerprints ended streams' checkpoints left their databases
    /// with ([`StreamProgress::left_by_checkpoint`]), until a scan sees the
    /// database change: a change to exactly that is no write.
    left: Mutex<HashMap<Id, u64>>,
    ctx: Arc<HotContext>,
    /// The fleet log's writer, until the first cycle starts it (see
    /// [`Replicator::start_log`]), and then its task and stop token.
    log_writer: Mutex<Option<fleetlog::LogWriter>>,
    log_task: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    /// The fleet log an earlier run left has been consolidated (or tried).
    log_recovered: std::sync::atomic::AtomicBool,
    /// An earlier run may have been killed while writing: the start looks
    /// for staged objects it left ([`Replicator::after_clean_stop`]).
    sweep_staging: bool,
    /// Streams that ended on their own (could not start, lost their file,
    /// released it) send their database here, and the daemon's loop hands
    /// it to the cold tier at once ([`Replicator::after_stream_ended`]).
    ended: tokio::sync::mpsc::UnboundedSender<Id>,
    /// Its receiving end, which [`Replicator::run`] takes.
    ended_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Id>>>,
}

/// A streaming task.
struct Running {
    path: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<HotExit>,
    /// What the stream has shipped (see [`ship::StreamProgress`]).
    progress: Arc<StreamProgress>,
    /// The database's pending change, handed to the stream: the ticket of
    /// the scan that saw it, and the [`ship::stamp`] taken after that scan.
    /// Settled by [`Running::settle`].
    ticket: Option<(Ticket, u64)>,
}

impl Running {
    /// The task is running and not stopping.
    fn streaming(&self) -> bool {
        !self.stop.is_cancelled() && !self.task.is_finished()
    }

    /// Records the ticket's outcome once it is known: synced when a sync that
    /// began after the ticket shipped everything; back to pending (for the
    /// cold tier) when the stream is failing or has ended without that.
    fn settle(&mut self, tracker: &mut Tracker, ended: bool) {
        let Some((ticket, since)) = self.ticket.take() else {
            return;
        };
        if self.progress.shipped_since(since) {
            tracker.finish_upload(ticket, true);
        } else if ended || self.progress.failing() {
            tracker.finish_upload(ticket, false);
        } else {
            self.ticket = Some((ticket, since));
        }
    }
}

/// At most this many individual upload failures are logged per cycle; the
/// rest are counted in the cycle summary. An S3 outage fails every pending
/// database at once, and 100,000 identical lines help nobody.
const FAILURE_LINES_PER_CYCLE: usize = 20;

/// At most this many failed databases are named in `replicate --once`'s
/// closing error, the line a cron mail shows; the warnings name every one
/// up to [`FAILURE_LINES_PER_CYCLE`].
const FAILED_NAMED: usize = 3;

/// Why `replicate --once` failed, for its closing line: what was refused,
/// failed and unreadable, by count, then the `failing` paths by name (the
/// first [`FAILED_NAMED`] in order, then how many more), then a failed
/// retention pass. The names are those of both the failed databases and
/// the unreadable paths, which is how they are kept: listed under the
/// failures alone they outnumbered them (black-box probe N22: "5
/// database(s) failed (a, b, c and 3 more)" with one path unreadable).
fn once_failed(r: &CycleReport, mut failing: Vec<String>, retention: Option<String>) -> String {
    let mut parts = Vec::new();
    if r.refused > 0 {
        parts.push(format!(
            "{} database(s) refused for their key (see the \"not backed up\" errors)",
            r.refused
        ));
    }
    if r.failed > 0 {
        parts.push(format!(
            "{} database(s) failed to snapshot or upload (see the warnings)",
            r.failed
        ));
    }
    if r.scan.errors > 0 {
        parts.push(format!(
            "{} path(s) could not be read (see the \"cannot read\" warnings)",
            r.scan.errors
        ));
    }
    let mut why = Vec::new();
    if !parts.is_empty() {
        why.push(format!(
            "not everything was backed up: {}",
            parts.join(", ")
        ));
    }
    if r.failed + r.scan.errors > 0 && !failing.is_empty() {
        failing.sort();
        let more = failing.len().saturating_sub(FAILED_NAMED);
        failing.truncate(FAILED_NAMED);
        if more > 0 {
            failing.push(format!("and {more} more"));
        }
        why.push(format!("failing: {}", failing.join(", ")));
    }
    if let Some(e) = retention {
        why.push(format!("the retention pass failed: {e}"));
    }
    why.join("; ")
}

/// Locks one of the scheduler's tables, going on after a panic poisoned it:
/// none of them can be left half-updated in a way that loses data (the
/// worst case is a redundant upload, or a tier decision the next scan makes
/// again).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replicator {
    pub fn new(loaded: Loaded) -> Result<Replicator> {
        let replica = loaded.open_replica()?;
        Self::with_replica(loaded, replica)
    }

    /// A replicator writing to an already built replica (the soak benchmark
    /// wraps the store to inject faults).
    pub fn with_replica(loaded: Loaded, replica: Replica) -> Result<Replicator> {
        // Staging files live in a directory of their own per replica set-up
        // (the lease guarantees one process per replica root), so whatever a
        // killed predecessor left there can be removed at start.
        let temp_dir = loaded
            .temp_dir()
            .join(format!("{:016x}", loaded.state_tag()));
        match std::fs::remove_dir_all(&temp_dir) {
            Ok(()) => tracing::debug!(dir = %temp_dir.display(), "removed stale staging files"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %temp_dir.display(), error = %e, "cannot clean staging directory")
            }
        }
        // Both must be writable: say so now, naming the directory and the
        // config key, not at the first upload.
        let state_file = loaded.state_file();
        for (dir, key) in [
            (temp_dir.as_path(), "multi-db.temp-dir"),
            (
                state_file.parent().unwrap_or(Path::new(".")),
                "multi-db.state-dir",
            ),
        ] {
            std::fs::create_dir_all(dir)
                .and_then(|()| tempfile::tempfile_in(dir).map(drop))
                .map_err(|e| {
                    Error::invalid(
                        key,
                        format!("{} is not a writable directory: {e}", dir.display()),
                    )
                })?;
        }
        let leftovers = crate::source::track::remove_state_leftovers(&state_file);
        if leftovers > 0 {
            tracing::debug!(
                files = leftovers,
                "removed temporary state files of a killed run"
            );
        }
        let mut tracker = Tracker::new();
        // The first snapshot opens every new file anyway: it checks the
        // header then, and the scan stays a walk and a stat per file.
        tracker.defer_header_checks(true);
        match tracker.load_state(&state_file, loaded.state_tag()) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(records = n, file = %state_file.display(), "loaded upload records")
            }
            Err(e) => tracing::warn!(
                file = %state_file.display(),
                error = %e,
                "cannot read upload records; every database will be uploaded once"
            ),
        }
        // Keys two databases rendered, and their owners: a restart must not
        // hand a deleted owner's key to a database refused for it.
        // Unreadable, it is an error, not "no key contested": a database
        // refused for a deleted owner's key would take it.
        let mut owners = Owners::default();
        owners
            .load_contested(&state_file, loaded.state_tag())
            .map_err(|e| {
                Error::invalid(
                    crate::source::track::contested_file(&state_file).display(),
                    format!(
                        "cannot read the owners of contested keys ({e}); fix or remove the file \
                         (without it, a database refused for a deleted owner's key takes the key)"
                    ),
                )
            })?;
        let stats = Stats::default();
        stats.started_unix.store(
            chrono::Utc::now().timestamp().max(0) as u64,
            Ordering::Relaxed,
        );
        let stats = Arc::new(stats);
        let m = loaded.multi_db();
        let (log, log_writer) = if m.fleet_log {
            let (log, writer) =
                fleetlog::FleetLog::new(replica.clone(), m.sync_interval, stats.clone());
            (Some(log), Some(writer))
        } else {
            (None, None)
        };
        let (ended, ended_rx) = tokio::sync::mpsc::unbounded_channel();
        let hot = HotTier {
            ended,
            ended_rx: Mutex::new(Some(ended_rx)),
            log_writer: Mutex::new(log_writer),
            log_task: Mutex::new(None),
            log_recovered: std::sync::atomic::AtomicBool::new(false),
            sweep_staging: true,
            tiers: Mutex::new(Tiers::new(TierConfig {
                hot_duration: m.hot_duration,
                max_hot: m.max_hot_databases,
                cold_after: m.cold_after,
            })),
            recent: m.hot_duration,
            running: Mutex::new(HashMap::new()),
            left: Mutex::new(HashMap::new()),
            ctx: Arc::new(HotContext {
                replica: replica.clone(),
                temp_dir: temp_dir.join("hot"),
                cfg: ShipConfig::from_config(m),
                stats: stats.clone(),
                permits: Arc::new(Semaphore::new(m.max_concurrent)),
                consolidation: crate::capture::fleetlog::consolidation_budget(),
                events: None,
                log,
            }),
        };
        Ok(Replicator {
            upload_limit: std::sync::atomic::AtomicUsize::new(m.max_concurrent.max(1)),
            rounds: tokio::sync::watch::Sender::new(0),
            scans_started: tokio::sync::watch::Sender::new(0),
            notified: Mutex::new(HashMap::new()),
            records_unchecked: std::sync::atomic::AtomicBool::new(true),
            verify: None,
            loaded: Arc::new(loaded),
            replica,
            tracker: Arc::new(Mutex::new(tracker)),
            stats,
            temp_dir,
            state_file,
            failing: Mutex::new(HashSet::new()),
            busy: Mutex::new(HashSet::new()),
            state_save_failing: std::sync::atomic::AtomicBool::new(false),
            replica_id: Mutex::new(None),
            hot,
            owners: Mutex::new(owners),
        })
    }

    /// Runs `job` every `verify-interval` beside the loop (not with
    /// `--once`); without it, or with the interval unset, no drill runs.
    pub fn with_verify(mut self, job: VerifyJob) -> Replicator {
        self.verify = Some(job);
        self
    }

    /// The run before this one stopped cleanly (its replica lease was
    /// released: [`crate::replica::lease::Lease::after_clean_stop`]), so it
    /// left no staged object behind: the start does not walk the whole
    /// `file://` replica looking for them, which it did at every start,
    /// every `replicate --once` included (the runtime waits for the walk
    /// before the process exits).
    pub fn after_clean_stop(mut self) -> Replicator {
        self.hot.sweep_staging = false;
        self
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The patterns as the config gave them, for messages (relative ones
    /// were resolved against the config file's directory).
    fn patterns_text(&self) -> String {
        format!(
            "{:?} (relative patterns are resolved against the config file's directory)",
            self.loaded.multi_db().patterns
        )
    }

    /// Before the first scan: upload records from the state file are only
    /// trusted when they were made against this replica, as its identity
    /// tells (see [`crate::replica::identity`]): a replica emptied behind our
    /// back (a new bucket, a wiped directory, a store that lost its data)
    /// would otherwise never get the databases that do not change again.
    /// Then the identity is made sure of: written if the replica has none,
    /// and recorded beside the state file. `false` when the replica could
    /// not be read or written: the check runs again at the next cycle. The
    /// records the state file gave are not kept when the replica could not
    /// be read: the first scan would apply them, and a check that succeeds
    /// later could no longer take them back (probe H: a store that failed
    /// the first GETs and then answered "no identity" got a new identity
    /// over the stale records, and 49 of 50 databases were never uploaded
    /// again). Forgetting costs one upload of every database; keeping them
    /// could cost backups.
    async fn check_records(&self) -> bool {
        use crate::replica::identity::{self, Identity};
        let found = match identity::read(&self.replica).await {
            Ok(found) => found,
            // An object that is no identity (damaged, foreign) identifies
            // nothing: replaced below like a missing one (probe H: it was
            // ignored at debug level and read again every scan).
            Err(e @ Error::Invalid { .. }) => {
                tracing::warn!(error = %e, "the replica's identity is unreadable; writing a new one");
                None
            }
            Err(e) => {
                self.distrust_records(&format!("cannot read the replica's identity: {e}"))
                    .await;
                return false;
            }
        };
        let state_file = self.state_file.clone();
        let recorded = crate::source::track::recorded_replica(&state_file);
        // The identities agree (or both predate them), and the replica was
        // not emptied of its keys alone.
        let records = lock(&self.tracker).upload_records();
        let same = match (&found, &recorded) {
            (Some(found), Some(recorded)) => found.id == *recorded,
            (None, None) => true,
            // A replica without its identity (emptied, or its `.litefleet/`
            // deleted), or records not known to belong to it.
            _ => false,
        };
        let trusted = same && (records == 0 || self.holds_backups().await == Some(true));
        if !trusted
            && !self
                .distrust_records(
                    "the state file's upload records were not made against this replica (it was emptied, is another one, or could not be listed)",
                )
                .await
        {
            return false;
        }
        let identity = match found {
            Some(found) => found,
            None => {
                let new = Identity::new();
                if let Err(e) = identity::write(&self.replica, &new).await {
                    tracing::debug!(error = %e, "cannot write the replica's identity; trying again next cycle");
                    return false;
                }
                tracing::info!(replica = %self.replica, id = %new.id, "wrote the replica's identity");
                new
            }
        };
        if recorded.as_deref() != Some(identity.id.as_str()) {
            let id = identity.id.clone();
            let r = tokio::task::spawn_blocking(move || {
                crate::source::track::record_replica(&state_file, &id)
            })
            .await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::warn!(file = %self.state_file.display(), "cannot record the replica's identity beside the state file; trying again next cycle");
                return false;
            }
        }
        *lock(&self.replica_id) = Some(identity.id);
        true
    }

    /// Uploads the databases at `paths` again, whose backups a restore
    /// drill found a problem with (a damaged newest object, a gap, nothing
    /// there): left alone, an unchanged database was never uploaded again
    /// and its backup stayed unusable until the application wrote to it. A
    /// cold one counts as changed, so the next cycle takes a fresh snapshot
    /// (the next hour's name: newer than, or in place of, the damaged one);
    /// a streaming one's stream ends, and it streams again in a new
    /// generation, which starts with a fresh snapshot.
    pub fn renew(&self, paths: &[PathBuf]) {
        let now = std::time::SystemTime::now();
        let mut tracker = lock(&self.tracker);
        let running = lock(&self.hot.running);
        for path in paths {
            let Some(id) = tracker.find(path) else {
                continue;
            };
            if let Some(r) = running.get(&id) {
                r.stop.cancel();
            }
            tracker.mark_unsynced(id, now);
            tracing::warn!(path = %path.display(), "the restore drill found a problem with this database's backup; uploading it again");
        }
    }

    /// Forgets the upload records the state file gave, if any, and saves
    /// the state without them before anything can say they belong to this
    /// replica; `false` if that save failed.
    async fn distrust_records(&self, why: &str) -> bool {
        let n = lock(&self.tracker).forget_upload_records();
        if n == 0 {
            return true;
        }
        tracing::warn!(
            records = n,
            replica = %self.replica,
            "{why}: uploading every database again"
        );
        self.save_state().await
    }

    /// Whether the replica holds backups at all: the test for a state file
    /// and replica that both predate identities. One LIST with delimiter at
    /// the replica root; `None` when it cannot be listed.
    async fn holds_backups(&self) -> Option<bool> {
        let root = self.replica.prefix.clone();
        match self.replica.list_children(&root).await {
            Ok((dirs, objects)) => {
                let lease_dir =
                    crate::replica::layout::key_path(&root, crate::replica::lease::LEASE_DIR);
                Some(!objects.is_empty() || dirs.iter().any(|d| *d != lease_dir))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the replica root");
                None
            }
        }
    }

    /// Counts the rounds of [`Replicator::run`]: it changes after each
    /// cycle or notified re-check, once its effects (uploads, watches) are
    /// complete.
    pub fn rounds(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rounds.subscribe()
    }

    /// Counts the scans begun by [`Replicator::cycle`]: it changes as each
    /// scan starts, before its uploads.
    pub fn scans_started(&self) -> tokio::sync::watch::Receiver<u64> {
        self.scans_started.subscribe()
    }

    /// Number of databases currently tracked.
    pub fn tracked(&self) -> usize {
        lock(&self.tracker).len()
    }

    /// One scan and the uploads it calls for.
    pub async fn cycle(&self, shutdown: &CancellationToken) -> CycleReport {
        self.cycle_with(shutdown, Pass::Ongoing).await
    }

    /// [`Replicator::cycle`] as `replicate --once`'s only cycle: a racy
    /// database's second upload is made now (a last pass).
    pub async fn last_cycle(&self, shutdown: &CancellationToken) -> CycleReport {
        self.cycle_with(shutdown, Pass::Last).await
    }

    async fn cycle_with(&self, shutdown: &CancellationToken, pass: Pass) -> CycleReport {
        if self.records_unchecked.swap(false, Ordering::AcqRel) && !self.check_records().await {
            self.records_unchecked.store(true, Ordering::Release);
        }
        let scan = self.scan().await;
        let report = self.dispatch_with(scan, None, shutdown, pass).await;
        if report.uploaded + report.failed >= TRIM_AFTER_UPLOADS {
            give_back_freed_memory();
        }
        report
    }

    /// At a clean stop (the loop ended by a signal, the lease still held):
    /// one last scan, and the upload of every database that changed since
    /// its last upload. Without it a stop left out what waited for the next
    /// scan: the writes to a database a change notification had uploaded
    /// within the last scan interval, and those in a directory not watched
    /// yet (black-box probe H27: a clean stop, exit 0, left a cold
    /// database's last commits out of the replica, silently). Databases
    /// never uploaded are left to the next start, so a stop that interrupts
    /// a first backup is not held up by the rest of it; hot databases are
    /// shipped by their streams' last syncs, after this. Bounded like the
    /// rest of the stop (`shutdown-timeout`; a second signal exits at once).
    async fn upload_changes_at_stop(&self) -> CycleReport {
        let scan = self.scan().await;
        let unreadable_before = scan.errors;
        let only: HashSet<Id> = {
            let mut t = lock(&self.tracker);
            // A stream failing now hands its database to this pass: its
            // ticket, settled here, no longer keeps the database in flight
            // (out of `pending_all`) until the next cycle, which a stop
            // does not have.
            for r in lock(&self.hot.running).values_mut() {
                r.settle(&mut t, false);
            }
            t.pending_all()
                .into_iter()
                .filter(|id| t.has_upload_record(*id))
                .collect()
        };
        if only.is_empty() {
            return CycleReport {
                scan,
                ..Default::default()
            };
        }
        let mut report = self
            .dispatch_with(scan, Some(&only), &CancellationToken::new(), Pass::Last)
            .await;
        // A changed database the pass could not read (permission denied)
        // was not uploaded either: the stop leaves the replica behind
        // (black-box probe L29: "shut down cleanly", exit 0, the replica a
        // row behind). Paths never uploaded are left to the next start.
        report.failed += report.scan.errors.saturating_sub(unreadable_before);
        tracing::info!(
            uploaded = report.uploaded,
            failed = report.failed,
            "uploaded at the stop what changed since the last scan"
        );
        report
    }

    /// One scan of the patterns, with its statistics and key checks.
    async fn scan(&self) -> ScanReport {
        self.scans_started.send_modify(|n| *n += 1);
        let tracker = self.tracker.clone();
        let loaded = self.loaded.clone();
        let (scan, took) = tokio::task::spawn_blocking(move || {
            crate::source::track::timed(|| lock(&tracker).scan(&loaded.patterns))
        })
        .await
        .expect("scan task panicked");
        self.stats.scans.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_scan_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        tracing::debug!(
            databases = scan.databases,
            new = scan.new,
            changed = scan.changed,
            removed = scan.removed,
            pending = scan.pending,
            took_ms = took.as_millis() as u64,
            "scan complete"
        );

        if scan.new > 0 || scan.removed > 0 {
            // It reads the headers of new files whose key it refuses, and
            // drops those that are no database: counted after it.
            self.check_keys();
        }
        self.stats
            .databases
            .store(self.tracked() as u64, Ordering::Relaxed);
        // When the scan completed (with its database count, which /healthz
        // reads with it), not the cycle: a first backup's uploads can take
        // many scan intervals (black-box probe: `/healthz` said "no scan
        // completed" while hundreds of uploads a second landed, and `/stats`
        // showed `scans: 1` beside no last scan).
        self.stats.last_scan_unix.store(
            chrono::Utc::now().timestamp().max(0) as u64,
            Ordering::Relaxed,
        );
        self.stats.progressed();
        scan
    }

    /// A cycle for the files change notifications named (see
    /// [`crate::source::watch`]): re-checks only those databases, and adds
    /// the new ones among them as a scan would, then checks the keys if it
    /// added any and hands what changed to the hot tier or uploads it (the
    /// new databases too), as a cycle does. Deleted databases wait for the
    /// next full cycle.
    pub async fn recheck(
        &self,
        files: Vec<(u32, std::ffi::OsString)>,
        shutdown: &CancellationToken,
    ) -> CycleReport {
        // A streaming database's stream ships its writes every sync
        // interval; the scans keep its ticket. Re-checking it at every write
        // would only churn its ticket.
        //
        // A database a notification already had uploaded within the last
        // scan interval waits for the scan: the first write after a quiet
        // spell is protected at once, a database written all the time is
        // uploaded once per scan as before, not at every write (each upload
        // is a PUT).
        let now = tokio::time::Instant::now();
        let window = self.loaded.multi_db().scan_interval;
        let mut skip: HashSet<Id> = {
            let mut notified = lock(&self.notified);
            notified.retain(|_, at| now.duration_since(*at) < window);
            notified.keys().copied().collect()
        };
        {
            let running = lock(&self.hot.running);
            skip.extend(
                running
                    .iter()
                    .filter(|(_, r)| r.streaming())
                    .map(|(id, _)| *id),
            );
        }
        let tracker = self.tracker.clone();
        let loaded = self.loaded.clone();
        let found = tokio::task::spawn_blocking(move || {
            lock(&tracker).recheck(&files, &loaded.patterns, |id| skip.contains(&id))
        })
        .await
        .expect("recheck task panicked");
        if found.changed.is_empty() && found.added.is_empty() {
            return CycleReport::default();
        }
        self.stats.rechecks.fetch_add(1, Ordering::Relaxed);
        if !found.added.is_empty() {
            // As after a scan that adds databases: nothing is uploaded
            // before its key is checked.
            self.check_keys();
            self.stats
                .databases
                .store(self.tracked() as u64, Ordering::Relaxed);
        }
        {
            // Not the new ones: the first writes after a creation (the
            // rows after the schema) are uploaded at once too, once.
            let mut notified = lock(&self.notified);
            notified.extend(found.changed.iter().map(|id| (*id, now)));
        }
        let scan = ScanReport {
            databases: self.tracked(),
            new: found.added.len(),
            changed: found.changed.len(),
            ..Default::default()
        };
        let only: HashSet<Id> = found.changed.into_iter().chain(found.added).collect();
        self.dispatch(scan, Some(&only), shutdown).await
    }

    /// A stream that ended on its own (it could not start, its file was
    /// replaced by one it cannot stream, the store kept failing) left its
    /// database's writes since its last sync unshipped: the database goes
    /// back to the cold tier, which uploads it now, not at the next scan
    /// (black-box probe M29: a hot database replaced by a rollback-journal
    /// file, or one whose stream start met side files an application was
    /// deleting, went unuploaded for up to two scan intervals, 12-21 s,
    /// while written). Its task is reaped first; it sent its id as it
    /// returned, so it is finished, or finishes while this yields.
    async fn after_stream_ended(&self, id: Id, shutdown: &CancellationToken) {
        for _ in 0..STREAM_END_YIELDS {
            let finished = lock(&self.hot.running)
                .get(&id)
                .is_none_or(|r| r.task.is_finished());
            if finished {
                break;
            }
            tokio::task::yield_now().await;
        }
        let scan = ScanReport {
            databases: self.tracked(),
            ..Default::default()
        };
        let only: HashSet<Id> = [id].into_iter().collect();
        self.dispatch(scan, Some(&only), shutdown).await;
    }

    /// After a scan or a re-check: retier, then upload or hand to streams
    /// what is pending (after a re-check, `only` what it found changed:
    /// failed uploads are retried at the scans), record the outcomes and
    /// save the state.
    async fn dispatch(
        &self,
        scan: ScanReport,
        only: Option<&HashSet<Id>>,
        shutdown: &CancellationToken,
    ) -> CycleReport {
        self.dispatch_with(scan, only, shutdown, Pass::Ongoing)
            .await
    }

    /// [`Replicator::dispatch`]; a [`Pass::Last`] uploads racy databases
    /// again now ([`Tracker::pending_all`]).
    async fn dispatch_with(
        &self,
        scan: ScanReport,
        only: Option<&HashSet<Id>>,
        shutdown: &CancellationToken,
        pass: Pass,
    ) -> CycleReport {
        let mut report = CycleReport {
            scan,
            ..Default::default()
        };
        if !shutdown.is_cancelled() {
            self.start_log().await;
            self.retier();
        }
        let pending = {
            let mut t = lock(&self.tracker);
            let mut running = lock(&self.hot.running);
            let mut pending = match pass {
                Pass::Ongoing => t.pending(),
                Pass::Last => t.pending_all(),
            };
            if let Some(only) = only {
                pending.retain(|id| only.contains(id));
            } else {
                // What `/stats` says during the cycle (each upload takes one
                // off; the end of the cycle counts again): a first backup
                // used to show 0 pending until it was over (probe F). All
                // that is pending, as at the cycle's end: not only what this
                // cycle uploads, which leaves out racy databases waiting for
                // their second upload (`/stats` said 0 for part of every
                // cycle while they waited: flaky-test hunt).
                self.stats
                    .pending
                    .store(t.pending_count() as u64, Ordering::Relaxed);
                self.stats
                    .oldest_pending_unix
                    .store(t.oldest_pending().unwrap_or(0) as u64, Ordering::Relaxed);
            }
            // A hot database's change goes to the replica through its WAL
            // stream: the stream takes the ticket, and the database counts as
            // synced only once a sync that began after this point shipped
            // everything (settled at the next cycles). A stream that is
            // failing leaves its database to the cold tier meanwhile.
            let since = ship::stamp();
            let owners = lock(&self.owners);
            report.refused = owners.refused().len();
            pending.retain(|id| !owners.is_refused(*id));
            pending.retain(|id| match running.get_mut(id) {
                Some(r) if r.streaming() && !r.progress.failing() => {
                    r.ticket = Some((t.begin_upload(*id), since));
                    false
                }
                _ => true,
            });
            pending
        };
        let max = self.upload_limit();
        let dispatched = pending.len();
        // Batches of snapshots ([`SNAPSHOT_BATCH`]), at most `max`
        // databases in flight in all.
        let per_batch = SNAPSHOT_BATCH.min(max);
        let mut set: JoinSet<Vec<(Ticket, PathBuf, Result<Snapped>)>> = JoinSet::new();
        for ids in pending.chunks(per_batch) {
            if shutdown.is_cancelled() {
                report.interrupted = true;
                break;
            }
            while set.len() >= (max / per_batch).max(1) {
                if let Some(done) = set.join_next().await {
                    self.reap_all(done, &mut report);
                }
            }
            let jobs: Vec<(Ticket, PathBuf, bool)> = {
                let mut t = lock(&self.tracker);
                ids.iter()
                    .map(|&id| (t.begin_upload(id), t.path(id), !t.is_checked(id)))
                    .collect()
            };
            let batch = {
                let busy = lock(&self.busy);
                jobs.iter()
                    .map(|(_, p, unchecked)| BatchItem {
                        path: p.clone(),
                        unchecked: *unchecked,
                        was_busy: !busy.is_empty() && busy.contains(p),
                    })
                    .collect()
            };
            let job = upload_batch(
                self.loaded.clone(),
                self.replica.clone(),
                batch,
                self.temp_dir.clone(),
            );
            set.spawn(async move {
                let results = AssertUnwindSafe(job)
                    .catch_unwind()
                    .await
                    .unwrap_or_default();
                let mut results = results.into_iter();
                jobs.into_iter()
                    .map(|(ticket, path, _)| {
                        let r = results
                            .next()
                            .unwrap_or_else(|| Err(Error::invalid(path.display(), PANICKED)));
                        (ticket, path, r)
                    })
                    .collect()
            });
        }
        while let Some(done) = set.join_next().await {
            self.reap_all(done, &mut report);
        }
        self.adapt_upload_limit(max, dispatched, &report);
        let pending = {
            let t = lock(&self.tracker);
            let mut failing = lock(&self.failing);
            // Forget failures of databases that left the table (deleted, renamed).
            failing.retain(|path| t.find(path).is_some());
            drop(failing);
            lock(&self.busy).retain(|path| t.find(path).is_some());
            let pending = t.pending_count();
            self.stats.pending.store(pending as u64, Ordering::Relaxed);
            self.stats
                .oldest_pending_unix
                .store(t.oldest_pending().unwrap_or(0) as u64, Ordering::Relaxed);
            pending
        };
        self.save_state().await;
        if report.uploaded + report.failed > 0 {
            tracing::info!(
                uploaded = report.uploaded,
                failed = report.failed,
                bytes = report.bytes,
                pending,
                "cycle complete"
            );
        }
        report
    }

    /// Cold uploads a cycle keeps in flight at once: `max-concurrent`;
    /// after a cycle in which uploads timed out, half as many as that cycle
    /// had in flight (down to one), and half as many again as the limit
    /// after a cycle whose uploads all got their answer (back up to
    /// `max-concurrent`). The timeout is per request, but the uploads in
    /// flight share one link: on a slow uplink every one of them timed out
    /// at every cycle, and nothing was ever backed up, where one at a time
    /// fit (black-box probe K28: four 6 MB uploads on a 1 MB/s link with a
    /// 15 s timeout).
    pub fn upload_limit(&self) -> usize {
        self.upload_limit.load(Ordering::Relaxed)
    }

    /// Sets [`Replicator::upload_limit`] after a cycle run with the limit
    /// `used` that dispatched `dispatched` databases.
    fn adapt_upload_limit(&self, used: usize, dispatched: usize, report: &CycleReport) {
        let configured = self.loaded.multi_db().max_concurrent.max(1);
        let next = if report.timed_out > 0 {
            (used.min(dispatched) / 2).max(1)
        } else if report.uploaded > 0 {
            used.saturating_add((used / 2).max(1)).min(configured)
        } else {
            used
        };
        if next == used {
            return;
        }
        self.upload_limit.store(next, Ordering::Relaxed);
        if next < used {
            tracing::warn!(
                timed_out = report.timed_out,
                in_flight = next,
                "uploads timed out (the link cannot carry this many at once within multi-db.replica.timeout): fewer at once from the next cycle on"
            );
        } else {
            tracing::debug!(
                in_flight = next,
                "uploads answered in time: more at once again"
            );
        }
    }

    /// Records the outcomes of one batch ([`Replicator::reap`]).
    fn reap_all(
        &self,
        done: std::result::Result<Vec<(Ticket, PathBuf, Result<Snapped>)>, tokio::task::JoinError>,
        report: &mut CycleReport,
    ) {
        // The task body never panics through (catch_unwind above); a JoinError here
        // would mean the runtime is shutting down, and the tickets are lost with it.
        let Ok(done) = done else {
            return;
        };
        for (ticket, path, result) in done {
            self.reap(ticket, path, result, report);
        }
    }

    fn reap(
        &self,
        ticket: Ticket,
        path: PathBuf,
        result: Result<Snapped>,
        report: &mut CycleReport,
    ) {
        let ok = matches!(result, Ok(Snapped::Uploaded(..)));
        let store_failed = matches!(result, Ok(Snapped::StoreFailed(_)));
        {
            let mut busy = lock(&self.busy);
            if matches!(&result, Err(e) if e.is_busy()) {
                busy.insert(path.clone());
            } else if !busy.is_empty() {
                busy.remove(&path);
            }
        }
        match result {
            Ok(Snapped::NotADatabase) => {
                // No SQLite header, seen at its first snapshot: not a
                // database, neither an upload nor a failure.
                let mut t = lock(&self.tracker);
                t.finish_upload(ticket, false);
                t.reject(ticket.id);
                report.scan.databases = report.scan.databases.saturating_sub(1);
                self.stats
                    .databases
                    .store(t.len() as u64, Ordering::Relaxed);
                return;
            }
            Ok(Snapped::Unreadable(e)) => {
                // What the scan reported before it left headers to the first
                // snapshot: a path it cannot read, retried every cycle.
                report.scan.errors += 1;
                let mut failing = lock(&self.failing);
                if failing.insert(path.clone()) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read; will retry every cycle (logged once until it recovers)");
                }
            }
            Ok(Snapped::Uploaded(bytes, read)) => {
                if read != ticket.fingerprint {
                    // The files read were not the ones the scan saw (written
                    // since, or the path led elsewhere meanwhile: a link
                    // above the root retargeted, a directory renamed there
                    // and back). Recorded as almost synced, so the next scan
                    // uploads once more: with the scan's fingerprint, the
                    // other files' state stood as this database's latest
                    // once the path led back (black-box probe N21).
                    lock(&self.tracker).doubt(ticket.id);
                }
                report.uploaded += 1;
                report.uploaded_ids.push(ticket.id);
                report.bytes += bytes;
                self.stats.upload_ok();
                let _ =
                    self.stats
                        .pending
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(n.saturating_sub(1))
                        });
                self.stats
                    .bytes_uploaded
                    .fetch_add(bytes, Ordering::Relaxed);
                let mut failing = lock(&self.failing);
                if !failing.is_empty() && failing.remove(&path) {
                    tracing::debug!(path = %path.display(), "upload recovered");
                }
            }
            Ok(Snapped::StoreFailed(e)) | Err(e) => {
                report.failed += 1;
                if store_failed && e.timed_out() {
                    report.timed_out += 1;
                }
                let host = if store_failed {
                    None
                } else {
                    host_failed(&e, &self.temp_dir)
                };
                if store_failed || host.is_some() {
                    // A copy that cannot be staged cannot be uploaded: for
                    // `/healthz` an upload that failed (probe J20: a full
                    // temp-dir backed nothing up, and /healthz said 200).
                    self.stats.upload_failed();
                    if store_failed && e.may_have_landed() {
                        lock(&self.tracker).doubt(ticket.id);
                    }
                } else {
                    // The source's failure (locked, damaged): not the
                    // store's, so not `/healthz`'s "every upload failed"
                    // (probe D: one locked database in an idle fleet
                    // turned it 503).
                    self.stats.snapshots_failed.fetch_add(1, Ordering::Relaxed);
                }
                let mut failing = lock(&self.failing);
                // Once per failing stretch: messages can differ between
                // attempts (staging file names), the problem usually does not.
                let repeated = !failing.insert(path.clone());
                // Which side failed, in words: the store, or the source
                // database (probe O: a damaged database was "upload failed").
                let what = if store_failed {
                    "upload failed"
                } else {
                    host.unwrap_or("snapshot failed (the database, not the store)")
                };
                if repeated || report.failed > FAILURE_LINES_PER_CYCLE {
                    tracing::debug!(path = %path.display(), error = %e, "{what} again");
                } else {
                    tracing::warn!(path = %path.display(), error = %e, "{what}; the daemon tries again next cycle (logged once until it recovers)");
                }
            }
        }
        if ok && lock(&self.hot.tiers).uploaded(ticket.id) {
            // Held cold until now: its next write is re-checked, to stream
            // at once, rather than wait for the scan as a database just
            // uploaded for a notification does (`recheck`).
            lock(&self.notified).remove(&ticket.id);
        }
        lock(&self.tracker).finish_upload(ticket, ok);
    }

    /// Refuses databases whose key breaks the key rule, and of those that
    /// share a key all but the key's owner (see [`crate::source::keys`]);
    /// each newly refused one is logged once, at error level.
    fn check_keys(&self) {
        let mut tracker = lock(&self.tracker);
        let mut owners = lock(&self.owners);
        let before = owners.clone();
        let mut refused = owners.update(&self.loaded.patterns, &self.loaded.template, &tracker);
        // A file whose header was not read yet may be no database at all,
        // and then it has no key: read the headers of the (few) refused
        // files and owners, drop those that are not databases, and decide again.
        let unread: Vec<Id> = owners
            .refused()
            .iter()
            .flat_map(|(id, r)| [Some(*id), r.owner().and_then(|o| tracker.find(o))])
            .flatten()
            .filter(|&id| !tracker.is_checked(id))
            .collect();
        if !unread.is_empty() {
            for id in unread {
                if let Err(e) = tracker.confirm(id) {
                    tracing::debug!(path = %tracker.path(id).display(), error = %e, "cannot read the header");
                }
            }
            *owners = before;
            refused = owners.update(&self.loaded.patterns, &self.loaded.template, &tracker);
        }
        for (path, r) in refused {
            match &r.why {
                Refusal::Collision { owner } => tracing::error!(
                    path = %path.display(),
                    key = %r.key,
                    owner = %owner.display(),
                    "database not backed up: its key belongs to another database; \
                     change multi-db.patterns or multi-db.replica.path so each database gets its own key"
                ),
                Refusal::InvalidKey(why) => tracing::error!(
                    path = %path.display(),
                    key = ?r.key,
                    reason = %why,
                    "database not backed up: its key is not one restore accepts (the reason \
                     says why); rename the file or change multi-db.patterns or \
                     multi-db.replica.path"
                ),
            }
        }
        if owners.contested_dirty() {
            if let Err(e) = owners.save_contested(&self.state_file, self.loaded.state_tag()) {
                tracing::warn!(
                    file = %crate::source::track::contested_file(&self.state_file).display(),
                    error = %e,
                    "cannot save the owners of contested keys; trying again at the next change"
                );
            }
        }
        let invalid = owners.invalid();
        self.stats
            .key_collisions
            .store((owners.refused().len() - invalid) as u64, Ordering::Relaxed);
        self.stats
            .invalid_keys
            .store(invalid as u64, Ordering::Relaxed);
    }

    /// Feeds the last scan's changes to the tiering rules and makes the
    /// streaming tasks match the hot set: finished tasks are reaped, demoted
    /// ones stopped (they ship their last frames first), new ones started.
    fn retier(&self) {
        let now = tokio::time::Instant::now();
        let mut tracker = lock(&self.tracker);
        let mut tiers = lock(&self.hot.tiers);
        let mut running = lock(&self.hot.running);
        // Only recently written WAL-mode databases can stream; the others
        // stay cold without being counted as promoted (a 20-byte read and two
        // stats per changed file).
        let recent = self.hot.recent;
        let owners = lock(&self.owners);
        let mut left = lock(&self.hot.left);
        // A change that is only our own checkpoint at a stream's end (the
        // stream may not be reaped yet) is no write: the database stays
        // cold (black-box probe V31: each stream ended by `cold-after`
        // streamed again at once, a new generation and a full snapshot).
        let ours = |id: Id, left: &mut HashMap<Id, u64>| {
            let by_stream = running
                .get(&id)
                .and_then(|r| r.progress.left_by_checkpoint());
            let f = left.remove(&id).or(by_stream);
            f == Some(tracker.seen(id))
        };
        let candidates: Vec<Id> = tracker
            .changed()
            .iter()
            .copied()
            .filter(|&id| !ours(id, &mut left))
            .filter(|&id| !owners.is_refused(id))
            .filter(|&id| tiers.is_hot(id) || ship::stream_candidate(&tracker.path(id), recent))
            .collect();
        drop(owners);
        tiers.observe(&candidates, now);
        // Settle what the streams have shipped since the last cycle.
        for r in running.values_mut() {
            r.settle(&mut tracker, false);
        }
        // Reap finished tasks.
        let done: Vec<Id> = running
            .iter()
            .filter(|(_, r)| r.task.is_finished())
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let mut r = running.remove(&id).expect("listed above");
            if let Some(f) = r.progress.left_by_checkpoint() {
                left.insert(id, f);
            }
            r.settle(&mut tracker, true);
            let same_db = tracker.find(&r.path) == Some(id);
            let exit = r
                .task
                .now_or_never()
                .and_then(|j| j.ok())
                .unwrap_or(HotExit::Unshipped);
            match exit {
                HotExit::Clean => {}
                HotExit::Unshipped => {
                    if same_db {
                        tracker.mark_unsynced(id, std::time::SystemTime::now());
                        // Deleted under its stream (or as it started): not
                        // started again while gone. It was, at once, as it
                        // stayed in the hot set: each new stream found no
                        // file and ended, up to 800 times a second, and its
                        // tickets kept it in flight, which the scans never
                        // drop (black-box probe W32: a deleted database
                        // tracked for minutes). Held, the cold tier tries
                        // it (a database created there again is uploaded
                        // and streams again) and the next scan drops it.
                        if std::fs::symlink_metadata(&r.path)
                            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                        {
                            tiers.hold(id);
                        }
                    }
                }
                HotExit::Released => {
                    if same_db {
                        // Streaming again at once would hold the WAL for
                        // another `release-after` while the store is down
                        // (black-box probe: the -wal grew to 131 MB over
                        // four generations in a 90 s outage).
                        tiers.hold(id);
                        tracker.mark_unsynced(id, std::time::SystemTime::now());
                    }
                }
                HotExit::CannotStream(e) => {
                    tracing::info!(path = %r.path.display(), error = %e, "cannot stream this database; the cold tier uploads it");
                    if same_db {
                        if matches!(e, Error::Damaged { .. }) || ship::cannot_write_shm(&e) {
                            // Copied again at every start (damaged), or
                            // refused again (a `-shm` litefleet may not
                            // write): kept cold for `cold-after`, the cold
                            // tier uploads it.
                            tiers.bar(id, now);
                        } else {
                            // A start refused by what the files were at
                            // that moment (a database created again and
                            // not written yet, side files made anew):
                            // streams again once the cold tier uploaded
                            // it, which it does at once. Barred for
                            // `cold-after`, a database re-created empty
                            // and written a second later stayed cold for
                            // minutes while written (black-box probe O30).
                            tiers.hold(id);
                        }
                        // Whatever the scans saw while it was "hot" was
                        // never shipped: the cold tier uploads it.
                        tracker.mark_unsynced(id, std::time::SystemTime::now());
                    }
                }
            }
            if !same_db {
                tiers.forget(id);
            }
        }
        // Databases that left the fleet (their ids may be reused).
        for (id, r) in running.iter() {
            if tracker.find(&r.path) != Some(*id) {
                r.stop.cancel();
                tiers.forget(*id);
            }
        }
        let decision = tiers.decide(now);
        for id in &decision.demote {
            if let Some(r) = running.get(id) {
                tracing::debug!(path = %r.path.display(), "hot -> cold");
                r.stop.cancel();
            }
        }
        let hot: Vec<Id> = tiers.hot_ids().collect();
        for id in hot {
            if running.contains_key(&id) {
                continue;
            }
            let path = tracker.path(id);
            let Some((key, _)) = key_for(&self.loaded.patterns, &self.loaded.template, &path)
            else {
                tiers.forget(id);
                continue;
            };
            tracing::debug!(path = %path.display(), %key, "cold -> hot");
            let stop = CancellationToken::new();
            let progress = Arc::new(StreamProgress::default());
            // The scan never follows links below this root; the stream's
            // opens check that nothing there became one since.
            let root = root_of(&self.loaded.patterns, &path).map(Path::to_path_buf);
            let stream = ship::stream_reporting(
                self.hot.ctx.clone(),
                u64::from(id),
                path.clone(),
                root,
                key,
                stop.clone(),
                progress.clone(),
            );
            let ended = self.hot.ended.clone();
            let task = tokio::spawn(async move {
                let exit = stream.await;
                if !matches!(exit, HotExit::Clean) {
                    let _ = ended.send(id);
                }
                exit
            });
            running.insert(
                id,
                Running {
                    path,
                    stop,
                    task,
                    progress,
                    ticket: None,
                },
            );
        }
        self.stats
            .hot
            .store(tiers.hot_count() as u64, Ordering::Relaxed);
        self.stats
            .hot_promotions
            .store(tiers.promotions, Ordering::Relaxed);
        self.stats
            .hot_demotions
            .store(tiers.demotions, Ordering::Relaxed);
    }

    /// Before the first stream: the log objects an earlier run left are
    /// consolidated (every log object is an orphan now, as no stream of
    /// ours has started), with the fleet log on or off (black-box probe: a
    /// start with `fleet-log: false` left a crashed run's log objects for
    /// ever); then the fleet log's writer starts, if it is on.
    async fn start_log(&self) {
        if !self.hot.log_recovered.swap(true, Ordering::AcqRel) {
            // What a killed run left half-written in a `file://` replica,
            // in the background: a walk of the whole replica.
            if self.hot.sweep_staging {
                let replica = self.replica.clone();
                let before = std::time::SystemTime::now() - STAGING_AGE;
                tokio::task::spawn_blocking(move || match replica.remove_stale_staging(before) {
                    0 => {}
                    n => tracing::info!(
                        files = n,
                        "removed the staged objects a killed run left in the replica"
                    ),
                });
            }
            match fleetlog::recover(&self.replica, &self.hot.ctx.temp_dir).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    objects = n,
                    "consolidated the fleet log left by an earlier run"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consolidate the fleet log left by an earlier run; restores read it where it is, the next start tries again")
                }
            }
        }
        let writer = lock(&self.hot.log_writer).take();
        let Some(w) = writer else { return };
        let stop = CancellationToken::new();
        let task = tokio::spawn(w.run(stop.clone()));
        *lock(&self.hot.log_task) = Some((stop, task));
    }

    /// Stops every streaming task and waits for their last syncs.
    /// Returns how many streams ended with frames unshipped because their
    /// last sync failed (the store), for the stop's exit code.
    ///
    /// A stream whose last sync failed leaves its database behind, unless
    /// the stop pass uploaded it (`uploaded`): that snapshot, begun after
    /// the signal, holds every commit made before it; or unless the cold
    /// tier had uploaded it as the stop's scan saw it (its stream failing
    /// all along: black-box probe Y32, a `-shm` litefleet cannot write,
    /// exited 1 with every commit in the replica). A stream whose
    /// generation could not start (the application held SQLite's write lock
    /// all along) leaves its database to the cold tier, whose stop pass
    /// uploads it; the stop exited 1, "replica behind", with every commit in
    /// the replica (black-box probe V31, F1).
    async fn stop_hot(&self, uploaded: &HashSet<Id>) -> usize {
        let mut failed = 0;
        let tasks: Vec<(Id, Running)> = {
            let mut running = lock(&self.hot.running);
            running.drain().collect()
        };
        for (_, r) in &tasks {
            r.stop.cancel();
        }
        for (id, mut r) in tasks {
            let exit = (&mut r.task).await;
            let mut t = lock(&self.tracker);
            r.settle(&mut t, true);
            if let Ok(HotExit::Unshipped | HotExit::Released) = exit {
                if t.find(&r.path) == Some(id) {
                    // As the stop's scan saw it: in the replica already.
                    let covered = uploaded.contains(&id) || t.is_synced(id);
                    t.mark_unsynced(id, std::time::SystemTime::now());
                    if r.progress.failing() && !covered {
                        failed += 1;
                    }
                }
            }
        }
        self.save_state().await;
        failed
    }

    /// Persists upload records if they changed (a failure only costs
    /// re-uploads after a restart); `false` if that failed.
    async fn save_state(&self) -> bool {
        let tracker = self.tracker.clone();
        let file = self.state_file.clone();
        let tag = self.loaded.state_tag();
        let id = lock(&self.replica_id).clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut t = lock(&tracker);
            if !t.state_dirty() {
                return Ok(());
            }
            t.save_state(&file, tag).map_err(|e| (file.clone(), e))?;
            // The record of which replica these records belong to, written
            // again if it is gone (the state directory removed while the
            // daemon ran: black-box probe L29 saw the state file written
            // anew without it, and the next start uploaded every database
            // again, trusting none of the records).
            match id {
                Some(id)
                    if crate::source::track::recorded_replica(&file).as_deref() != Some(&id) =>
                {
                    crate::source::track::record_replica(&file, &id).map_err(|e| (file, e))
                }
                _ => Ok(()),
            }
        })
        .await;
        match r {
            Ok(Ok(())) => {
                if self.state_save_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("upload records saved again");
                }
                true
            }
            Ok(Err((file, e))) => {
                if self.state_save_failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(file = %file.display(), error = %e, "cannot save upload records, again");
                } else {
                    tracing::warn!(file = %file.display(), error = %e, "cannot save upload records (a restart uploads again what they miss; logged once until a save succeeds)");
                }
                false
            }
            Err(_) => false,
        }
    }

    /// One retention pass.
    pub async fn retention(&self) -> Result<retention::RetentionReport> {
        let r = retention::enforce(
            &self.replica,
            self.loaded.multi_db().replica.retention,
            chrono::Utc::now(),
        )
        .await;
        // Counted, not only logged: a retention that keeps failing lets the
        // replica grow without bound, and nothing else would show it.
        let failed = u64::from(r.is_err());
        self.stats
            .retention_failures
            .fetch_add(failed, Ordering::Relaxed);
        self.stats
            .retention_last_failed
            .store(failed, Ordering::Relaxed);
        let r = r?;
        self.stats.retention_deleted.fetch_add(
            (r.deleted + r.generation_snapshots_deleted + r.wal_deleted) as u64,
            Ordering::Relaxed,
        );
        Ok(r)
    }

    /// Where the time of the last retention pass is kept: beside the state
    /// file, as the other records of this replica and layout are.
    fn retention_file(&self) -> PathBuf {
        crate::source::track::retention_file(&self.loaded.state_file())
    }

    /// Runs cycles every `scan-interval` until `shutdown` (or once), with retention beside.
    pub async fn run(self: Arc<Self>, once: bool, shutdown: CancellationToken) -> Result<()> {
        let m = self.loaded.multi_db();
        tracing::info!(
            replica = %self.replica,
            patterns = m.patterns.len(),
            scan_interval = ?m.scan_interval,
            max_concurrent = m.max_concurrent,
            "replicating"
        );
        if once {
            let r = self.last_cycle(&shutdown).await;
            let mut retention_failed = None;
            if !shutdown.is_cancelled() {
                let pass = self.retention().await;
                retention_failed = pass.as_ref().err().map(ToString::to_string);
                log_retention(pass);
                record_retention(&self.retention_file(), std::time::SystemTime::now());
            }
            tracing::info!(
                databases = r.scan.databases,
                uploaded = r.uploaded,
                failed = r.failed,
                unreadable = r.scan.errors,
                refused = r.refused,
                "single cycle done"
            );
            // A path the scan could not read (permission denied, an I/O
            // error), or a database refused for its key, was not backed up
            // either: cron must see it as a failure.
            // So is a retention pass that failed: the replica keeps what it
            // should have deleted, and a cron job is the only one to tell.
            return if r.failed + r.scan.errors + r.refused > 0 || retention_failed.is_some() {
                // Named here too (probe D18: the last line, the one a cron
                // mail shows, named none).
                let failing: Vec<String> = lock(&self.failing)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                Err(Error::invalid(
                    "replicate --once",
                    once_failed(&r, failing, retention_failed),
                ))
            } else if r.scan.databases == 0 {
                // A cron job must notice a config that backs up nothing.
                Err(Error::invalid(
                    "replicate --once",
                    format!(
                        "no SQLite database matched the patterns {}",
                        self.patterns_text()
                    ),
                ))
            } else {
                Ok(())
            };
        }
        let retention_task = {
            let me = self.clone();
            let token = shutdown.clone();
            let every = m.replica.retention_check_interval;
            let file = self.retention_file();
            let first = first_retention_in(&file, every, std::time::SystemTime::now());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tick.tick() => {
                            log_retention(me.retention().await);
                            record_retention(&file, std::time::SystemTime::now());
                        }
                    }
                }
            })
        };
        let verify_task = match (&self.verify, m.verify_interval) {
            (Some(job), Some(every)) => {
                tracing::info!(every = ?every, sample = m.verify_sample, "restore drills scheduled");
                let me = self.clone();
                Some(tokio::spawn(verify_loop(
                    every,
                    job.clone(),
                    self.stats.clone(),
                    move |paths| me.renew(paths),
                    shutdown.clone(),
                )))
            }
            _ => None,
        };
        let mut watch = if m.watch {
            match Watch::new() {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "change notifications unavailable; writes are noticed at each scan");
                    None
                }
            }
        } else {
            None
        };
        let mut tick = tokio::time::interval(m.scan_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut empty_warned = false;
        let mut ended = lock(&self.hot.ended_rx).take();
        loop {
            // A full cycle at each tick, and when notifications cannot say
            // what changed; otherwise a re-check of what they name, or the
            // hand-over of a stream that ended to the cold tier.
            let full = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => true,
                Some(id) = next_ended(&mut ended) => {
                    self.after_stream_ended(id, &shutdown).await;
                    false
                }
                batch = next_change(&mut watch) => match batch {
                    Batch::Changed(files) => {
                        self.recheck(files, &shutdown).await;
                        false
                    }
                    Batch::Overflow => true,
                    Batch::Failed => {
                        // Not again and again: a broken stream would turn
                        // every round into a full scan.
                        watch = None;
                        self.stats.watched_dirs.store(0, Ordering::Relaxed);
                        true
                    }
                },
            };
            if full {
                let r = self.cycle(&shutdown).await;
                // A walk that could not read a directory says so itself
                // ("cannot read"); "nothing matched" would mislead then.
                if r.scan.databases == 0 && r.scan.errors == 0 && !empty_warned {
                    empty_warned = true;
                    tracing::warn!(
                        patterns = %self.patterns_text(),
                        "no SQLite database matched the patterns; nothing is backed up until one does"
                    );
                }
                if let Some(w) = &mut watch {
                    let dirs = w.new_dirs(&lock(&self.tracker));
                    if !dirs.is_empty() {
                        w.add(&dirs);
                    }
                    // Also after watches ended (directories deleted).
                    self.stats
                        .watched_dirs
                        .store(w.watched() as u64, Ordering::Relaxed);
                }
            }
            self.rounds.send_modify(|n| *n += 1);
        }
        let (failed, uploaded) = if self.replica.writes_refused() {
            (0, HashSet::new())
        } else {
            let r = self.upload_changes_at_stop().await;
            (r.failed, r.uploaded_ids.into_iter().collect())
        };
        let _ = retention_task.await;
        if let Some(t) = verify_task {
            let _ = t.await;
        }
        let unshipped = self.stop_hot(&uploaded).await;
        let log_task = lock(&self.hot.log_task).take();
        if let Some((stop, task)) = log_task {
            stop.cancel();
            let _ = task.await;
        }
        stop_outcome(self.replica.writes_refused(), failed, unshipped)
    }
}

/// Why a snapshot or upload task failed that panicked: a host failure for
/// `/healthz` ([`host_failed`]), not the database's (black-box probe L29:
/// panics of a host out of threads were "the database, not the store",
/// and `/healthz` said 200 while nothing was uploaded).
const PANICKED: &str = "the snapshot or upload task panicked";

/// Yields [`Replicator::after_stream_ended`] waits at most for a stream
/// task that sent its id to finish returning (one or two in practice; a
/// task not finished by then is reaped at the next round).
const STREAM_END_YIELDS: usize = 1000;

/// How a daemon's stop ends: "cleanly", or, when it left the replica
/// behind its databases, an error (exit 1) saying what was left: writes
/// the lease refused (it could not be renewed while the store stalled, or
/// was lost), uploads of the stop pass that failed, hot streams whose last
/// sync failed. A supervisor or an operator stopping the daemon to move a
/// host must not read "clean" then (black-box probe D26: a SIGTERM while
/// the store stalled exited 0 with the uploads abandoned). The next start
/// uploads what is missing, as after a crash.
fn stop_outcome(refused: bool, failed: usize, unshipped: usize) -> Result<()> {
    let mut left = Vec::new();
    if refused {
        left.push(
            "replica writes were refused by the lease (it could not be renewed, or was lost), so uploads in flight were abandoned"
                .to_string(),
        );
    }
    if failed > 0 {
        left.push(format!(
            "{failed} database(s) changed since their last upload could not be read, snapshotted or uploaded at the stop (see the warnings)"
        ));
    }
    if unshipped > 0 {
        left.push(format!(
            "{unshipped} hot database(s) could not ship their last WAL frames (see the warnings)"
        ));
    }
    if left.is_empty() {
        tracing::info!("shut down cleanly: in-flight uploads finished");
        return Ok(());
    }
    Err(Error::invalid(
        "replicate",
        format!(
            "stopped with the replica behind: {}; the next start uploads what is missing",
            left.join("; ")
        ),
    ))
}

/// The next batch of change notifications; never, without a watcher.
/// The next database whose stream ended on its own; never, without the
/// channel (a second `run`).
async fn next_ended(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Id>>) -> Option<Id> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_change(watch: &mut Option<Watch>) -> Batch {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// How to log a snapshot that failed for this host, not for its database
/// or the store, or `None`: writing its staged copy in `temp_dir` (a full
/// or read-only disk there; the error names a file under `temp_dir`), or
/// out of file descriptors. Either way nothing can be backed up until it is
/// fixed, so it counts for `/healthz` as a failed upload (black-box probe
/// J20: both were "the database, not the store", and `/healthz` said 200).
fn host_failed(e: &Error, temp_dir: &Path) -> Option<&'static str> {
    match e {
        Error::Invalid { reason, .. } if reason == PANICKED => Some(
            "snapshot failed: its task panicked (the host refused a thread or memory, or a bug; see the panic above: not the database, not the store)",
        ),
        Error::Io { path, .. } | Error::Sqlite { path, .. } if path.starts_with(temp_dir) => Some(
            "snapshot failed staging its copy (multi-db.temp-dir, this host's disk: not the database, not the store)",
        ),
        Error::Io { source, .. } if out_of_descriptors(source) => {
            Some(
                "snapshot failed: out of file descriptors (raise the limit: LimitNOFILE, ulimit -n; not the database, not the store)",
            )
        }
        _ => None,
    }
}

/// Whether `e` says this process (`EMFILE`) or the system (`ENFILE`) has no
/// file descriptor left.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// How long this run waits for its first retention pass: what is left of
/// `every` since the last pass of any run, recorded in `file`
/// ([`record_retention`]). A daemon restarted more often than `every`
/// waited a whole interval at each start and never pruned (black-box probe
/// B26: 128 restarts in 15 minutes with a 15 s interval deleted nothing,
/// and the replica grew to ten times its databases). With no record (a
/// first start, or one unreadable) the count starts now and is recorded;
/// one in the future (the clock went back) counts as none.
fn first_retention_in(
    file: &Path,
    every: std::time::Duration,
    now: std::time::SystemTime,
) -> std::time::Duration {
    let last = std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
    match last.and_then(|l| now.duration_since(l).ok()) {
        Some(since) => every.saturating_sub(since),
        None => {
            record_retention(file, now);
            every
        }
    }
}

/// Records `now` in `file` as when the last retention pass ran, passed or
/// failed (a failing one is retried an interval later, not at every
/// start). Best effort: without the record a start waits a whole interval,
/// as it always did.
fn record_retention(file: &Path, now: std::time::SystemTime) {
    let Ok(secs) = now.duration_since(std::time::UNIX_EPOCH) else {
        return;
    };
    if let Err(e) = std::fs::write(file, format!("{}\n", secs.as_secs())) {
        tracing::debug!(file = %file.display(), error = %e, "cannot record the retention pass");
    }
}

fn log_retention(r: Result<retention::RetentionReport>) {
    match r {
        Ok(r) if r.deleted + r.generation_snapshots_deleted + r.wal_deleted > 0 => {
            tracing::info!(
                deleted = r.deleted,
                examined = r.examined,
                generations_deleted = r.generations_deleted,
                generation_snapshots_deleted = r.generation_snapshots_deleted,
                wal_deleted = r.wal_deleted,
                "retention pass"
            )
        }
        Ok(r) => tracing::debug!(examined = r.examined, "retention pass: nothing to delete"),
        Err(e) => tracing::warn!(error = %e, "retention pass failed; will retry next interval"),
    }
}

/// glibc malloc arenas this process may use. By default glibc gives threads
/// that meet in the allocator arenas of their own, up to 8 per core, and
/// each arena keeps the pages its threads used: 16 arenas on 2 cores held
/// ~65 bytes per tracked database at 100,000 idle databases
/// (`bench/daemon-rss.sh`: 178 B per database above the empty process with
/// the default, 113 B with one arena, 2026-12-05). Two, not one: the
/// snapshot threads (2 per core, `capture::work`) queue on a single arena's
/// lock for SQLite's page-sized allocations, which glibc's per-thread cache
/// does not serve (`perf`: ~10% of a small-database cycle in lock waits and
/// the context switches they cause). 2026-12-06, same machine, builds
/// alternating: `bench snapshot --databases 3000` small-database cycle
/// 5.41x / 5.13x `xargs lz4` with two against 9.12x / 9.05x with one (CPU
/// 0.544 / 0.503 s against 0.858 / 0.697 s), and `bench/daemon-rss.sh` at
/// 100,000 idle databases 106 / 98 B per database against 97 / 96 B: within
/// the 120 B the daemon is held to (at 1,000,000: 60 B).
const MALLOC_ARENAS: i32 = 2;

/// Limits the allocator's arenas (to two: see `MALLOC_ARENAS`); call it first thing,
/// before any thread starts. Nothing outside glibc.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before other
    // threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Uploads in one cycle after which the cycle hands freed memory back to the
/// system: a burst of snapshots leaves their buffers free but mapped in the
/// allocator's per-thread arenas, where an idle daemon would keep them for
/// good. Trimming costs a walk over the arenas (milliseconds), so it is only
/// worth it after a burst, not after every small cycle.
const TRIM_AFTER_UPLOADS: usize = 1000;

/// Returns the allocator's free memory to the system (glibc's `malloc_trim`,
/// which also releases free pages inside every arena; elsewhere nothing).
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only inspects and releases the allocator's own
    // free memory; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What became of one database's snapshot.
#[derive(Debug)]
enum Snapped {
    /// Uploaded: its compressed size, and the fingerprint of the database's
    /// files once its snapshot was read ([`snapshot::Snapshot::read`]).
    Uploaded(u64, u64),
    /// Its header, read at its first snapshot, is not SQLite's.
    NotADatabase,
    /// Its header could not be read (permission denied, an I/O error).
    Unreadable(Error),
    /// The snapshot was taken, and the replica did not take it: the store's
    /// failure, which `/healthz` counts (a database that cannot be read or
    /// is damaged is the source's, an `Err`).
    StoreFailed(Error),
}

/// Cold-tier snapshots taken one after the other by one blocking task
/// ([`upload_batch`]). A task per database handed each one to a blocking
/// thread and back, and on to the `file://` writer and back: on a fleet of
/// small databases those thread wake-ups (and the task's own bookkeeping)
/// cost more than the snapshot (`perf` of a first backup of 3,000 8 KiB
/// databases on `tmpfs`: ~15% of the CPU in `futex` and the scheduler).
/// Sixteen small snapshots take a few milliseconds, so a batch holds its
/// snapshot slot about as long as one medium database would; never more
/// than `max-concurrent`, which bounds the uploads a batch leaves in flight.
/// It is also what a `file://` replica makes durable at once
/// ([`LocalBatch`]): two `syncfs` per 16 objects where each made two or
/// three `fsync`s, while no finished snapshot waits long to be recorded.
const SNAPSHOT_BATCH: usize = 16;

/// What the snapshot of one database leaves for the upload.
enum Captured {
    /// Nothing more to do (written already, or nothing to upload).
    Done(Snapped),
    /// `snap` goes to the replica as `location`.
    Upload {
        snap: snapshot::Snapshot,
        location: object_store::path::Path,
    },
    /// `snap`, held in memory, is staged as `location` in the batch's
    /// [`LocalBatch`], at `index` of its outcomes: uploaded once the batch
    /// is published.
    Staged {
        snap: snapshot::Snapshot,
        location: object_store::path::Path,
        index: usize,
    },
}

/// Snapshots one database (blocking) for the object under its next-hour
/// name. When `unchecked` (its header was never read, see
/// [`Tracker::defer_header_checks`]) the snapshot's connection reads it
/// first ([`snapshot::capture_if_sqlite`]). A snapshot held in memory is
/// written to a plain `file://` replica right here: staged in the batch's
/// `local` ([`LocalBatch`], made durable with the rest of the batch) where
/// there is one, else on its own ([`Replica::put_bytes_here`]).
fn snapshot_one(
    loaded: &Loaded,
    replica: &Replica,
    local: Option<&mut LocalBatch<'_>>,
    path: &Path,
    temp_dir: &Path,
    unchecked: bool,
) -> Result<Captured> {
    let (key, stem) = key_for(&loaded.patterns, &loaded.template, path)
        .ok_or_else(|| Error::invalid(path.display(), "matches no pattern any more"))?;
    // Refused at the scan already (`check_keys`); never uploaded under a
    // key `restore` would refuse, whatever the path to this point.
    crate::replica::layout::check_new_key(&key)?;
    // A directory below the pattern root swapped for a link since the scan
    // (or the change notification) named this path: the scan never follows
    // links there, so neither does its snapshot (black-box probe: a
    // database outside the root was uploaded under this key). The
    // snapshot's open refuses it (`pin::pin_below`).
    let root = root_of(&loaded.patterns, path);
    let snap = if !unchecked {
        snapshot::capture(path, root, &key, temp_dir)?
    } else {
        match snapshot::capture_if_sqlite(path, root, &key, temp_dir) {
            Ok(Some(snap)) => snap,
            Ok(None) => return Ok(Captured::Done(Snapped::NotADatabase)),
            // SQLite could not open or snapshot it: the header, read on its
            // own, tells a file that is gone, unreadable or foreign from a
            // database that failed its snapshot; never through a link
            // below the root (the open's refusal stands).
            Err(failed) if check_no_link_below(root, path).is_err() => return Err(failed),
            Err(failed) => match has_sqlite_header(path) {
                Ok(true) => return Err(failed),
                Ok(false) => return Ok(Captured::Done(Snapped::NotADatabase)),
                // Gone: a failed upload, as for a checked database; the next
                // scan drops it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::io(path, e))
                }
                // Out of descriptors: this host's failure, not a file it
                // cannot read (probe L20: new databases were "cannot read").
                Err(e) if out_of_descriptors(&e) => return Err(Error::io(path, e)),
                Err(e) => return Ok(Captured::Done(Snapped::Unreadable(Error::io(path, e)))),
            },
        }
    };
    // Named by the hour after the copy was complete: an object named `H`
    // holds nothing committed at or after `H`.
    let location = cold::snapshot_path(&replica.prefix, &key, &stem, snap.times.taken);
    if let snapshot::Staged::Memory(bytes) = &snap.staged {
        if let Some(local) = local {
            return match local.stage(&location, bytes) {
                Ok(index) => Ok(Captured::Staged {
                    snap,
                    location,
                    index,
                }),
                Err(e) => Ok(Captured::Done(Snapped::StoreFailed(e))),
            };
        }
        match replica.put_bytes_here(&location, bytes) {
            Ok(true) => {
                uploaded(path, &location, &snap, bytes.len() as u64);
                return Ok(Captured::Done(Snapped::Uploaded(
                    bytes.len() as u64,
                    snap.read,
                )));
            }
            Ok(false) => {}
            Err(e) => return Ok(Captured::Done(Snapped::StoreFailed(e))),
        }
    }
    Ok(Captured::Upload { snap, location })
}

/// The outcome of `snap`, staged as `location` in a [`LocalBatch`], from
/// its outcome in the batch's publication (`None`: it had none, which
/// [`LocalBatch::publish`] never leaves).
fn published_snapshot(
    path: &Path,
    snap: &snapshot::Snapshot,
    location: &object_store::path::Path,
    outcome: Option<Result<()>>,
) -> Snapped {
    match outcome {
        Some(Ok(())) => {
            uploaded(path, location, snap, snap.compressed_bytes);
            Snapped::Uploaded(snap.compressed_bytes, snap.read)
        }
        Some(Err(e)) => Snapped::StoreFailed(e),
        None => Snapped::StoreFailed(Error::invalid(location, "staged and never published")),
    }
}

fn uploaded(
    path: &Path,
    location: &object_store::path::Path,
    snap: &snapshot::Snapshot,
    bytes: u64,
) {
    tracing::debug!(
        path = %path.display(),
        object = %location,
        db_bytes = snap.db_bytes,
        compressed = bytes,
        "uploaded snapshot"
    );
}

/// Snapshots the databases of `batch` (path, and whether its header is
/// unchecked) one after the other in one blocking task ([`SNAPSHOT_BATCH`])
/// and uploads what is left to upload, all at once; one outcome per
/// database, in order. A panic fails only the database it happened on.
/// Shortest wait on a locked database once a batch spent its wait: a
/// writer's transaction commits within it (a database locked for good
/// fails at once, and is tried again next cycle).
const MIN_BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// One database of an [`upload_batch`].
struct BatchItem {
    path: PathBuf,
    /// Its SQLite header is not checked yet.
    unchecked: bool,
    /// Its last snapshot found it locked: wait [`MIN_BUSY_WAIT`] only.
    was_busy: bool,
}

async fn upload_batch(
    loaded: Arc<Loaded>,
    replica: Replica,
    batch: Vec<BatchItem>,
    temp_dir: PathBuf,
) -> Vec<Result<Snapped>> {
    let n = batch.len();
    let snapper = replica.clone();
    let captured = bounded(Work::Snapshot, move || {
        // One wait on locked databases for the whole batch: what failed
        // snapshots took is spent (see `snapshot::waiting_at_most`).
        let mut budget = snapshot::BUSY_TIMEOUT;
        let mut local = snapper.local_batch();
        let captured = batch
            .iter()
            .map(|item| {
                let path = &item.path;
                let started = std::time::Instant::now();
                let wait = if item.was_busy {
                    MIN_BUSY_WAIT
                } else {
                    budget.max(MIN_BUSY_WAIT)
                };
                let r = snapshot::waiting_at_most(wait, || {
                    std::panic::catch_unwind(AssertUnwindSafe(|| {
                        let local = local.as_mut();
                        snapshot_one(&loaded, &snapper, local, path, &temp_dir, item.unchecked)
                    }))
                    .unwrap_or_else(|_| Err(Error::invalid(path.display(), PANICKED)))
                });
                if r.is_err() {
                    budget = budget.saturating_sub(started.elapsed());
                }
                r.map(|c| (path.clone(), c))
            })
            .collect::<Vec<_>>();
        // The batch's small snapshots, durable together.
        let mut published: Vec<Option<Result<()>>> = match local {
            Some(local) => local.publish().into_iter().map(Some).collect(),
            None => Vec::new(),
        };
        captured
            .into_iter()
            .map(|c| match c {
                Ok((
                    path,
                    Captured::Staged {
                        snap,
                        location,
                        index,
                    },
                )) => {
                    let outcome = published.get_mut(index).and_then(Option::take);
                    let outcome = published_snapshot(&path, &snap, &location, outcome);
                    Ok((path, Captured::Done(outcome)))
                }
                other => other,
            })
            .collect::<Vec<_>>()
    })
    .await;
    let captured = match captured {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            return (0..n)
                .map(|_| Err(Error::invalid("snapshot", msg.clone())))
                .collect();
        }
    };
    let uploads = captured.into_iter().map(|c| {
        let replica = &replica;
        async move {
            match c? {
                (_, Captured::Done(outcome)) => Ok(outcome),
                (path, Captured::Staged { location, .. }) => Err(Error::invalid(
                    path.display(),
                    format!("{location} was staged and never published"),
                )),
                (path, Captured::Upload { snap, location }) => {
                    match snap.upload(replica, &location).await {
                        Ok(bytes) => {
                            uploaded(&path, &location, &snap, bytes);
                            Ok(Snapped::Uploaded(bytes, snap.read))
                        }
                        Err(e) => Ok(Snapped::StoreFailed(e)),
                    }
                }
            }
        }
    });
    futures::future::join_all(uploads).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `replicate --once`'s closing line counts the failed databases and
    /// the unreadable paths apart, and names them together: a path that
    /// could not be read is in both the `failing` set and `scan.errors`, so
    /// names listed under the failures alone outnumbered them (black-box
    /// probe N22: "5 database(s) failed (a, b, c and 3 more)").
    #[test]
    fn the_once_failure_line_names_as_many_paths_as_it_counts() {
        let mut r = CycleReport {
            failed: 5,
            ..Default::default()
        };
        r.scan.errors = 1;
        let names = (0..6).map(|i| format!("/d/{i}.db")).collect();
        let line = once_failed(&r, names, None);
        assert_eq!(
            line,
            "not everything was backed up: 5 database(s) failed to snapshot or upload (see \
             the warnings), 1 path(s) could not be read (see the \"cannot read\" warnings); \
             failing: /d/0.db, /d/1.db, /d/2.db, and 3 more"
        );
        // Unreadable paths alone are named too (mutation audit O23: a
        // condition on `failed` alone passed the case above).
        let mut unreadable = CycleReport::default();
        unreadable.scan.errors = 1;
        let line = once_failed(&unreadable, vec!["/d/x.db".into()], None);
        assert!(line.ends_with("; failing: /d/x.db"), "{line}");
        let retention = Some("store unreachable".to_string());
        let only = once_failed(&CycleReport::default(), vec!["/d/x.db".into()], retention);
        assert_eq!(only, "the retention pass failed: store unreachable");
    }

    /// Which snapshot failures are this host's (logged as such and counted
    /// for `/healthz` as failed uploads): a file under the staging
    /// directory, or no descriptor left; a database's own errors are not.
    #[test]
    fn host_failures_are_told_from_the_databases() {
        let tmp = Path::new("/var/tmp/litefleet-0/8cca8ca68ceb0bb9");
        let os = |n| std::io::Error::from_raw_os_error(n);
        let staging = Error::io(tmp.join("snap-x"), os(libc::ENOSPC));
        assert!(host_failed(&staging, tmp)
            .unwrap()
            .contains("multi-db.temp-dir"));
        let fds = Error::io("/data/a.db", os(libc::EMFILE));
        assert!(host_failed(&fds, tmp).unwrap().contains("file descriptors"));
        let panicked = Error::invalid("/data/a.db", PANICKED);
        assert!(host_failed(&panicked, tmp).unwrap().contains("panicked"));
        for own in [
            Error::io("/data/a.db", os(libc::EACCES)),
            Error::invalid("/data/a.db", "quick_check failed"),
        ] {
            assert_eq!(host_failed(&own, tmp), None, "{own}");
        }
        // SQLite's "unable to open" carries the file system's cause.
        let gone = Path::new("/nonexistent/litefleet/a.db");
        let cantopen = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            None,
        );
        let e = crate::capture::snapshot::open_failed(gone, cantopen);
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{e:?}"
        );
    }

    /// The first retention pass of a run is due an interval after the last
    /// pass of any run, as recorded; with no usable record, an interval
    /// from now, recorded.
    #[test]
    fn the_first_retention_pass_counts_from_the_last_recorded_one() {
        use std::time::{Duration, UNIX_EPOCH};
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("x.state.retention");
        let hour = Duration::from_secs(3600);
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // None yet: the count starts now.
        assert_eq!(first_retention_in(&file, hour, now), hour);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "1800000000\n");
        let later = |secs| now + Duration::from_secs(secs);
        assert_eq!(
            first_retention_in(&file, hour, later(1000)),
            Duration::from_secs(2600)
        );
        assert_eq!(first_retention_in(&file, hour, later(7200)), Duration::ZERO);
        // A record in the future, or unreadable, is none.
        for bad in ["1900000000", "x"] {
            std::fs::write(&file, bad).unwrap();
            assert_eq!(first_retention_in(&file, hour, now), hour);
            assert_eq!(std::fs::read_to_string(&file).unwrap(), "1800000000\n");
        }
    }

    /// A daemon started more often than `retention-check-interval` still
    /// prunes: its first pass comes when the last recorded one is an
    /// interval old, here at once (black-box probe B26: restarted every
    /// few seconds, it never ran one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overdue_retention_pass_runs_at_start() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let r = Arc::new(cold_replicator(&data, t.path(), &t.path().join("replica")));
        let file = r.retention_file();
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        let overdue = now() - 2 * 3600;
        std::fs::write(&file, format!("{overdue}\n")).unwrap();
        let stop = CancellationToken::new();
        let run = tokio::spawn(r.clone().run(false, stop.clone()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let recorded = || {
            std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        while recorded() == Some(overdue) {
            assert!(std::time::Instant::now() < deadline, "no retention pass");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(recorded().unwrap() >= now() - 60);
        stop.cancel();
        let _ = run.await.unwrap();
    }

    /// A cold-tier-only replicator of `data/*.db` to the `file://` replica
    /// `replica`, its state and staging below `work`, without notifications.
    /// Sets `db`'s mtime an hour back: not racy (see `track::RACY_WINDOW`).
    fn written_an_hour_ago(db: &Path) {
        std::fs::File::options()
            .write(true)
            .open(db)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
    }

    fn cold_replicator(data: &Path, work: &Path, replica: &Path) -> Replicator {
        let yaml = format!(
            "multi-db:\n  patterns: [\"{}/*.db\"]\n  max-hot-databases: 0\n  watch: false\n  \
             state-dir: {}\n  temp-dir: {}\n  replica:\n    url: file://{}\n",
            data.display(),
            work.join("state").display(),
            work.join("tmp").display(),
            replica.display()
        );
        Replicator::new(Loaded::from_str(&yaml, "t.yml", work).unwrap()).unwrap()
    }

    /// A racy upload (the database written within the racy window of the
    /// scan) is made once more: by a later cycle once the window passed,
    /// and at once by a last pass (`replicate --once`, the pass at a clean
    /// stop), after which no cycle would. The first upload may lack a
    /// commit whose frames were in the `-wal` the scan saw but not yet
    /// published when the snapshot began (black-box probe S31: a `--once`
    /// exit 0, and a clean stop, without a commit that had returned
    /// 30-490 ms before it began).
    #[tokio::test]
    async fn a_last_pass_uploads_a_racy_database_once_more() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let c = rusqlite::Connection::open(data.join("x.db")).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(v); INSERT INTO t VALUES (1);")
            .unwrap();
        // Racy however slow the machine: written "in an hour".
        for f in ["x.db", "x.db-wal"] {
            std::fs::File::options()
                .write(true)
                .open(data.join(f))
                .unwrap()
                .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
                .unwrap();
        }
        let r = cold_replicator(&data, t.path(), &t.path().join("replica"));
        let stop = CancellationToken::new();
        assert_eq!(r.cycle(&stop).await.uploaded, 1);
        // Within the racy window an ongoing cycle waits for it to pass.
        assert_eq!(r.cycle(&stop).await.uploaded, 0);
        assert_eq!(lock(&r.tracker).pending_count(), 1);
        assert_eq!(r.last_cycle(&stop).await.uploaded, 1);
        // The stop's pass does the same.
        assert_eq!(r.upload_changes_at_stop().await.uploaded, 1);
    }

    /// A link above the pattern root retargeted between a scan and the
    /// snapshot, and back after it: the snapshot read the other tree's
    /// database, under the fingerprint the scan took of this one, so once
    /// the link led back nothing was pending and the other tree's state
    /// stood as this database's latest backup (black-box probe N21). The
    /// snapshot's files are fingerprinted after it: not the scan's, so the
    /// next scan uploads once more.
    #[tokio::test]
    async fn a_snapshot_of_other_files_than_the_scan_saw_is_uploaded_again() {
        let t = tempfile::tempdir().unwrap();
        for (tree, v) in [("a", 1), ("b", 2)] {
            std::fs::create_dir_all(t.path().join(tree)).unwrap();
            rusqlite::Connection::open(t.path().join(tree).join("x.db"))
                .unwrap()
                .execute_batch(&format!("CREATE TABLE t(v); INSERT INTO t VALUES ({v});"))
                .unwrap();
            // Written an hour ago: not racy (see `track::RACY_WINDOW`).
            std::fs::File::options()
                .write(true)
                .open(t.path().join(tree).join("x.db"))
                .unwrap()
                .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
                .unwrap();
        }
        let link = t.path().join("data");
        let point = |tree: &str| {
            let tmp = t.path().join("data.new");
            std::os::unix::fs::symlink(t.path().join(tree), &tmp).unwrap();
            std::fs::rename(&tmp, &link).unwrap();
        };
        point("a");
        let r = cold_replicator(&link, t.path(), &t.path().join("replica"));
        let stop = CancellationToken::new();
        let scan = lock(&r.tracker).scan(&r.loaded.patterns);
        assert_eq!(scan.new, 1);
        point("b");
        assert_eq!(r.dispatch(scan, None, &stop).await.uploaded, 1);
        point("a");
        let again = r.cycle(&stop).await;
        assert_eq!(again.uploaded, 1, "a's own state is uploaded");
        assert_eq!(r.cycle(&stop).await.uploaded, 0, "and then it is synced");
    }

    /// The record of which replica the state file's records belong to is
    /// written again with them when it is gone (black-box probe L29: the
    /// state directory removed while the daemon ran; the next start trusted
    /// none of the records and uploaded every database again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_replica_record_comes_back_with_the_state_file() {
        let t = tempfile::tempdir().unwrap();
        let (data, replica) = (t.path().join("data"), t.path().join("replica"));
        std::fs::create_dir_all(&data).unwrap();
        let write = |i: usize, rows: usize| {
            let db = data.join(format!("d{i}.db"));
            let c = rusqlite::Connection::open(&db).unwrap();
            c.execute_batch("CREATE TABLE IF NOT EXISTS t(v)").unwrap();
            for _ in 0..rows {
                c.execute("INSERT INTO t VALUES (randomblob(5000))", [])
                    .unwrap();
            }
            written_an_hour_ago(&db);
        };
        for i in 0..3 {
            write(i, 1);
        }
        let r = cold_replicator(&data, t.path(), &replica);
        assert_eq!(r.cycle(&CancellationToken::new()).await.uploaded, 3);
        // The state directory goes while the daemon runs; a change makes
        // the next cycle save the records again, and their replica's.
        std::fs::remove_dir_all(t.path().join("state")).unwrap();
        write(0, 2);
        assert_eq!(r.cycle(&CancellationToken::new()).await.uploaded, 1);
        // The next start trusts them: nothing to upload again.
        let again = cold_replicator(&data, t.path(), &replica);
        let report = again.cycle(&CancellationToken::new()).await;
        assert_eq!((report.uploaded, report.failed), (0, 0), "{report:?}");
    }

    /// A cycle's small snapshots to a `file://` replica are made durable a
    /// batch at a time ([`LocalBatch`]): two `syncfs` per batch (content,
    /// then names), no `fsync` per object, and each database counts as
    /// uploaded only once its batch is published.
    #[tokio::test]
    async fn small_snapshots_are_made_durable_a_batch_at_a_time() {
        let Some(t) = crate::replica::storage::batch_tempdir() else {
            return;
        };
        let data = t.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        for i in 0..20 {
            let db = data.join(format!("d{i}.db"));
            rusqlite::Connection::open(&db)
                .unwrap()
                .execute_batch(&format!("CREATE TABLE t(v); INSERT INTO t VALUES ({i});"))
                .unwrap();
            written_an_hour_ago(&db);
        }
        let replica = t.path().join("replica");
        let r = cold_replicator(&data, t.path(), &replica);
        let report = r.cycle(&CancellationToken::new()).await;
        assert_eq!((report.uploaded, report.failed), (20, 0));
        // Batches of 16 and 4: each synced its filesystem through its first
        // staged file, then through that object once renamed.
        let fs = crate::replica::storage::filesystems_synced_below(&replica);
        assert_eq!(fs.len(), 4, "{fs:?}");
        for staged in fs.iter().filter_map(|p| p.to_str()?.strip_suffix("#1")) {
            let content = fs
                .iter()
                .position(|p| p.to_str() == Some(&format!("{staged}#1")));
            let name = fs.iter().position(|p| p == Path::new(staged));
            assert!(content < name, "{staged}: {fs:?}");
        }
        let objects = crate::replica::storage::synced_below(&replica);
        assert!(
            !objects
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".db.lz4")),
            "an object synced on its own: {objects:?}"
        );
        let uploaded = std::fs::read_dir(&replica)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('d')
            })
            .count();
        assert_eq!(uploaded, 20);
    }

    /// A directory below the pattern root swapped for a link to a tree
    /// outside it after the scan (or the change notification) named the
    /// database: its cold snapshot refuses it, uploads nothing and creates
    /// nothing out there (probe D: the outside database was uploaded under
    /// this key, with its side files created beside it).
    #[test]
    fn a_cold_snapshot_never_reads_below_a_link_under_its_pattern_root() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("d")).unwrap();
        let db = data.join("d/x.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(v); INSERT INTO t VALUES (1);")
            .unwrap();
        let yaml = format!(
            "multi-db:\n  patterns: [\"{}/*/*.db\"]\n  replica:\n    url: file://{}\n",
            data.display(),
            t.path().join("replica").display()
        );
        let loaded = Loaded::from_str(&yaml, "t.yml", t.path()).unwrap();
        let replica = loaded.open_replica().unwrap();
        let temp = t.path().join("tmp");
        std::fs::create_dir_all(&temp).unwrap();
        assert!(matches!(
            snapshot_one(&loaded, &replica, None, &db, &temp, false),
            Ok(Captured::Done(Snapped::Uploaded(..)))
        ));
        let outside = tempfile::tempdir().unwrap();
        rusqlite::Connection::open(outside.path().join("x.db"))
            .unwrap()
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(v); INSERT INTO t VALUES (2);")
            .unwrap();
        let before: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        std::fs::rename(data.join("d"), data.join("old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), data.join("d")).unwrap();
        let e = match snapshot_one(&loaded, &replica, None, &db, &temp, false) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("snapshotted through the link"),
        };
        assert!(e.contains("no directory of its own"), "{e}");
        let after: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        assert_eq!(before.len(), after.len(), "files made beside the target");
    }
}
