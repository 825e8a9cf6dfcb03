//! `litefleet bench cost`: the S3 request bill of a fleet, measured.
//!
//! Creates `databases` WAL databases and runs the real replicator (`run`,
//! with change notifications and the hot tier as configured by default) on a
//! `file://` replica behind a [`FaultyStore`] that injects no fault and
//! counts every request by S3 price class. Two phases are measured:
//!
//! 1. **idle**: after the initial upload of every database, one scan
//!    interval with no writes: what an idle fleet costs (the target is 0
//!    requests per idle database);
//! 2. **hot**: `hot` databases each get one commit per second (spread over
//!    the second) for `duration`, then the replicator shuts down (final
//!    syncs included).
//!
//! The bill is extrapolated to the product description's scenario
//! (100,000 databases of which 250 change, 30 days) at S3 Standard list
//! prices: PUT, COPY and LIST $0.005 per 1,000 requests, GET $0.0004 per
//! 1,000, DELETE free (counted, not charged). The replica lease, which the `replicate` command holds and this
//! benchmark does not, is added from its renewal interval.
//!
//! Counted at the object-store API, one call per request: a multipart upload
//! is counted as one PUT (its parts are more: small objects here never use
//! it), a listing as one LIST per call.
//!
//! The extrapolation is [`CostModel`], the one cost model of the project:
//! `bench cost` feeds it the rates it measured, `litefleet explain`
//! ([`super::explain`]) the rates last measured (documented in the README,
//! [`CostModel::default`]) and the fleet it finds on disk ([`FleetLoad`]).
//! Besides the measured hot and idle rates the model counts what the
//! benchmark is too short to see: cold-tier uploads (next-hour names), the
//! lease's renewals and the retention passes' listings.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::soak::{age_databases, create_fleet, spawn_hot_writer, FaultyStore, Requests};
use crate::daemon::scheduler::Replicator;
use crate::source::config::Loaded;
use crate::{Error, Result};

/// Uploads a cold database's change costs: at its change notification, and
/// again at the next scan, because an upload that close to a write is racy
/// (`source::track`'s `RACY_WINDOW`: a write in the same timestamp tick would
/// otherwise go unseen). A database busy beyond `max-hot-databases` costs
/// as many per scan interval (black-box probe I28 counted both: 2.00).
pub const UPLOADS_PER_CHANGE: f64 = 2.0;

/// The product description's scenario.
pub const SCENARIO_DATABASES: u64 = 100_000;
pub const SCENARIO_HOT: u64 = 250;
/// 30 days.
pub const MONTH_SECS: u64 = 30 * 86_400;
/// S3 Standard list prices, dollars per request.
pub const PUT_USD: f64 = 0.005 / 1000.0;
pub const GET_USD: f64 = 0.0004 / 1000.0;
/// The description's promise for the whole S3 bill of the scenario.
pub const TARGET_USD: f64 = 16.0;
/// PUT requests per hot database per second, last measured by `bench cost`
/// (README, 2026-11-24: 15,750 PUT for 250 databases x 60 s, one commit per
/// second each, sync interval 1 s): one segment per sync plus each stream's
/// generation snapshot and metadata.
pub const MEASURED_HOT_PUT_PER_S: f64 = 1.05;
/// LIST requests per hot database per second, same run: 250 LIST (one per
/// stream start, listing its generations) in 15,000 hot database-seconds.
pub const MEASURED_HOT_LIST_PER_S: f64 = 250.0 / 15_000.0;
/// The sync interval of that run.
pub const MEASURED_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// With the fleet log (the default): requests per hot database's stream,
/// from its start to its end, last measured by `bench cost` (README,
/// 2026-12-04: 1,373 PUT and 250 LIST in a 60 s hot phase of 250 databases,
/// less the log's steady 1.00 object per sync): the LIST of its
/// generations, the generation snapshot, its metadata (at the start and at
/// the end), the consolidated pack written when it ends, and the log object
/// its first frames go into on their own.
pub const MEASURED_LOG_PER_STREAM: RequestRates = RequestRates {
    put: 5.25,
    get: 0.0,
    list: 1.0,
    delete: 0.0,
};
/// Stream starts per hot database per day the bill assumes at least: a
/// database written all the time streams without a break but starts a new
/// generation every `snapshot-interval` (a day by default), which costs
/// what a stream start does; one a day also stands for a daily restart of
/// the daemon or one wake-up after `cold-after` of quiet.
pub const STREAMS_PER_DAY: f64 = 1.0;

/// Stream starts (or new generations) per hot database per day at
/// `snapshot-interval` `snapshot_interval_s` (see [`STREAMS_PER_DAY`]).
pub fn streams_per_day(snapshot_interval_s: f64) -> f64 {
    (86_400.0 / snapshot_interval_s.max(f64::MIN_POSITIVE)).max(STREAMS_PER_DAY)
}
/// Objects one S3 LIST call returns at most (ListObjectsV2 page size).
pub const LIST_PAGE: f64 = 1000.0;
/// Objects one DeleteObjects request removes at most.
pub const DELETE_BATCH: f64 = 1000.0;

/// Requests by S3 price class, as estimates (per second, or over a period).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RequestRates {
    pub put: f64,
    pub get: f64,
    pub list: f64,
    pub delete: f64,
}

impl RequestRates {
    /// Measured counts over `unit_secs` (database-seconds): a rate per unit.
    pub fn per(r: &Requests, unit_secs: f64) -> RequestRates {
        let d = unit_secs.max(f64::MIN_POSITIVE);
        RequestRates {
            put: r.put as f64 / d,
            get: r.get as f64 / d,
            list: r.list as f64 / d,
            delete: r.delete as f64 / d,
        }
    }

    pub fn scale(self, k: f64) -> RequestRates {
        RequestRates {
            put: self.put * k,
            get: self.get * k,
            list: self.list * k,
            delete: self.delete * k,
        }
    }

    pub fn plus(self, o: RequestRates) -> RequestRates {
        RequestRates {
            put: self.put + o.put,
            get: self.get + o.get,
            list: self.list + o.list,
            delete: self.delete + o.delete,
        }
    }

    /// Dollars at S3 Standard list prices. DELETE requests are counted but
    /// cost nothing: S3 does not charge for them.
    pub fn usd(&self) -> f64 {
        (self.put + self.list) * PUT_USD + self.get * GET_USD
    }
}

/// Request rates per database, from measurements (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CostModel {
    /// Requests per hot database per second, one commit per second each,
    /// measured at [`CostModel::hot_sync_interval_s`].
    pub hot: RequestRates,
    /// The sync interval `hot` was measured at. At a longer one a hot
    /// database's PUTs shrink in proportion (one segment per sync with new
    /// frames); at a shorter one they do not grow past one per commit.
    pub hot_sync_interval_s: f64,
    /// Requests per idle (unchanged) database per second.
    pub idle: RequestRates,
    /// With the fleet log: what it costs instead of per-database segments
    /// (`hot` is then what a hot database costs per second besides these,
    /// about nothing).
    pub log: Option<LogRates>,
}

/// The fleet log's requests (see [`crate::capture::fleetlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LogRates {
    /// The whole fleet's requests per sync tick with changes: one log
    /// object PUT (and its deletion once consolidated).
    pub per_tick: RequestRates,
    /// Requests per hot database's stream, start to end (see
    /// [`MEASURED_LOG_PER_STREAM`]).
    pub per_stream: RequestRates,
    /// `log-consolidate-interval`: one pack PUT per hot database each.
    pub consolidate_s: f64,
    /// Stream starts or new generations per hot database per day (see
    /// [`streams_per_day`]).
    pub streams_per_day: f64,
}

impl LogRates {
    /// The measured rates, consolidating every `consolidate_s`, a new
    /// generation every `snapshot_interval_s`.
    pub fn measured(consolidate_s: f64, snapshot_interval_s: f64) -> LogRates {
        LogRates {
            per_tick: RequestRates {
                put: 1.0,
                delete: 1.0,
                ..RequestRates::default()
            },
            per_stream: MEASURED_LOG_PER_STREAM,
            consolidate_s,
            streams_per_day: streams_per_day(snapshot_interval_s),
        }
    }
}

impl Default for CostModel {
    /// The figures last measured by `bench cost` (see [`MEASURED_HOT_PUT_PER_S`]);
    /// an idle database measured 0 requests.
    fn default() -> Self {
        CostModel {
            hot: RequestRates {
                put: MEASURED_HOT_PUT_PER_S,
                list: MEASURED_HOT_LIST_PER_S,
                ..RequestRates::default()
            },
            hot_sync_interval_s: MEASURED_SYNC_INTERVAL.as_secs_f64(),
            idle: RequestRates::default(),
            log: None,
        }
    }
}

impl CostModel {
    /// The last measured model for `m`'s hot tier: the fleet log's when it
    /// is on, else one segment per database per sync.
    pub fn for_config(m: &crate::source::config::MultiDb) -> CostModel {
        if !m.fleet_log {
            return CostModel::default();
        }
        CostModel {
            hot: RequestRates::default(),
            log: Some(LogRates::measured(
                m.log_consolidate_interval.as_secs_f64(),
                m.snapshot_interval.as_secs_f64(),
            )),
            ..CostModel::default()
        }
    }
}

/// What a fleet does, as the model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FleetLoad {
    /// Every database.
    pub databases: u64,
    /// Databases in the hot tier (at most `max-hot-databases`).
    pub hot: u64,
    /// Cold databases that change about once an hour.
    pub cold_changing: u64,
    /// Databases that change all the time but find no room in the hot
    /// tier: one cold upload per scan interval each.
    pub over_max_hot: u64,
    pub sync_interval_s: f64,
    pub scan_interval_s: f64,
    pub lease_ttl_s: f64,
    pub retention_s: f64,
    pub retention_check_interval_s: f64,
    /// The period billed (30 days).
    pub period_s: f64,
}

impl FleetLoad {
    /// A fleet under `m`'s intervals, billed for 30 days.
    pub fn new(
        m: &crate::source::config::MultiDb,
        databases: u64,
        hot: u64,
        cold_changing: u64,
        over_max_hot: u64,
    ) -> FleetLoad {
        FleetLoad {
            databases,
            hot,
            cold_changing,
            over_max_hot,
            sync_interval_s: m.sync_interval.as_secs_f64(),
            scan_interval_s: m.scan_interval.as_secs_f64(),
            lease_ttl_s: m.replica.lease_ttl.as_secs_f64(),
            retention_s: m.replica.retention.as_secs_f64(),
            retention_check_interval_s: m.replica.retention_check_interval.as_secs_f64(),
            period_s: MONTH_SECS as f64,
        }
    }

    /// The product description's scenario under `m`'s intervals: 100,000
    /// databases of which 250 change (all hot), the rest idle.
    pub fn scenario(m: &crate::source::config::MultiDb) -> FleetLoad {
        Self::new(m, SCENARIO_DATABASES, SCENARIO_HOT, 0, 0)
    }

    /// Databases with no change: the fleet less the changing ones.
    pub fn idle(&self) -> u64 {
        self.databases
            .saturating_sub(self.hot + self.cold_changing + self.over_max_hot)
    }
}

/// One part of a [`Bill`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BillLine {
    /// `hot`, `cold`, `over-max-hot`, `idle`, `lease` or `retention`.
    pub part: &'static str,
    /// How the count was reached.
    pub basis: String,
    /// Requests over the period.
    pub requests: RequestRates,
    pub usd: f64,
}

/// The requests and dollars of a [`FleetLoad`] over its period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bill {
    pub lines: Vec<BillLine>,
    pub total: RequestRates,
    pub total_usd: f64,
    /// Objects the replica holds after one retention period, which each
    /// retention pass lists (the basis of the `retention` line).
    pub objects_held: f64,
}

impl Bill {
    /// The dollars of one part (0 when it is not in the bill).
    pub fn usd(&self, part: &str) -> f64 {
        self.line(part).map_or(0.0, |l| l.usd)
    }

    pub fn line(&self, part: &str) -> Option<&BillLine> {
        self.lines.iter().find(|l| l.part == part)
    }
}

impl CostModel {
    /// PUTs per hot database per second at `sync_interval_s` (see
    /// [`CostModel::hot_sync_interval_s`]).
    pub fn hot_put_per_s(&self, sync_interval_s: f64) -> f64 {
        let slower = self.hot_sync_interval_s / sync_interval_s.max(f64::MIN_POSITIVE);
        self.hot.put * slower.min(1.0)
    }

    /// The bill of `load` (see the module docs for what each line counts).
    pub fn bill(&self, load: &FleetLoad) -> Bill {
        let t = load.period_s;
        let hours = t / 3600.0;
        let mut lines = Vec::new();
        let mut line = |part, basis: String, requests: RequestRates| {
            lines.push(BillLine {
                part,
                basis,
                requests,
                usd: requests.usd(),
            })
        };
        let hot_put = self.hot_put_per_s(load.sync_interval_s);
        let hot_rate = RequestRates {
            put: hot_put,
            ..self.hot
        };
        // Objects each hot database adds per second (what retention lists).
        let hot_objects_per_s;
        match &self.log {
            None => {
                hot_objects_per_s = hot_put;
                line(
                    "hot",
                    format!(
                        "{} hot x {:.3} PUT + {:.4} LIST per second (WAL segments at sync-interval {}s)",
                        load.hot, hot_put, self.hot.list, load.sync_interval_s
                    ),
                    hot_rate.scale(load.hot as f64 * t),
                );
            }
            Some(log) => {
                let consolidate = 1.0 / log.consolidate_s.max(f64::MIN_POSITIVE);
                let streams = log.streams_per_day / 86_400.0;
                let per_db = hot_rate
                    .plus(log.per_stream.scale(streams))
                    .plus(RequestRates {
                        put: consolidate,
                        ..RequestRates::default()
                    });
                hot_objects_per_s = consolidate + streams * (log.per_stream.put);
                line(
                    "hot",
                    format!(
                        "{} hot x (1 consolidated pack per {}s + {} stream start a day x {} PUT + {} LIST)",
                        load.hot,
                        log.consolidate_s,
                        log.streams_per_day,
                        log.per_stream.put,
                        log.per_stream.list
                    ),
                    per_db.scale(load.hot as f64 * t),
                );
                let ticks = if load.hot > 0 {
                    t / load.sync_interval_s.max(f64::MIN_POSITIVE)
                } else {
                    0.0
                };
                line(
                    "fleet log",
                    format!(
                        "1 log object per sync-interval {}s with changes, for all hot databases together (deleted once consolidated)",
                        load.sync_interval_s
                    ),
                    log.per_tick.scale(ticks),
                );
            }
        }
        line(
            "cold",
            format!(
                "{} changing cold x {UPLOADS_PER_CHANGE} PUT per hour (next-hour snapshot names)",
                load.cold_changing
            ),
            RequestRates {
                put: load.cold_changing as f64 * hours * UPLOADS_PER_CHANGE,
                ..RequestRates::default()
            },
        );
        line(
            "over-max-hot",
            format!(
                "{} busy beyond max-hot-databases x {UPLOADS_PER_CHANGE} PUT per scan-interval {}s",
                load.over_max_hot, load.scan_interval_s
            ),
            RequestRates {
                put: load.over_max_hot as f64 * t * UPLOADS_PER_CHANGE
                    / load.scan_interval_s.max(f64::MIN_POSITIVE),
                ..RequestRates::default()
            },
        );
        line(
            "idle",
            format!(
                "{} idle x {:.3} requests per day",
                load.idle(),
                (self.idle.put + self.idle.get + self.idle.list + self.idle.delete) * 86_400.0
            ),
            self.idle.scale(load.idle() as f64 * t),
        );
        // The lease is renewed every third of its lifetime: one conditional PUT.
        line(
            "lease",
            format!("1 PUT per lease-ttl/3 = {:.0}s", load.lease_ttl_s / 3.0),
            RequestRates {
                put: t / (load.lease_ttl_s / 3.0).max(f64::MIN_POSITIVE),
                ..RequestRates::default()
            },
        );
        // Retention (see crate::replica::retention): each pass lists the
        // whole prefix once; a generation gets a LIST of its own only when
        // something in it is deleted (rare, not counted). What is held
        // after one retention period: the newest snapshot of every
        // database, an hourly snapshot per changing database, and what each
        // hot database adds (a segment per sync without the fleet log, a
        // pack per consolidation with it).
        let retention_h = load.retention_s / 3600.0;
        let hot_objects_per_db = hot_objects_per_s * load.retention_s;
        let objects_held = load.databases as f64
            + (load.cold_changing + load.over_max_hot) as f64 * retention_h
            + load.hot as f64 * hot_objects_per_db;
        let passes = t / load.retention_check_interval_s.max(f64::MIN_POSITIVE);
        let per_pass = (objects_held / LIST_PAGE).ceil();
        let expired_cold = (load.cold_changing + load.over_max_hot) as f64 * hours;
        line(
            "retention",
            format!(
                "{passes:.0} passes (every {}s) x {} LIST ({} objects held after retention {}h)",
                load.retention_check_interval_s,
                thousands(per_pass),
                thousands(objects_held),
                retention_h
            ),
            RequestRates {
                list: passes * per_pass,
                delete: (expired_cold / DELETE_BATCH).ceil(),
                ..RequestRates::default()
            },
        );
        let total = lines
            .iter()
            .fold(RequestRates::default(), |a, l| a.plus(l.requests));
        Bill {
            total_usd: total.usd(),
            total,
            lines,
            objects_held,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CostOptions {
    pub databases: usize,
    pub hot: usize,
    pub duration: Duration,
    pub sync_interval: Duration,
    pub scan_interval: Duration,
    pub dir: PathBuf,
    /// Ship through the fleet log (the default).
    pub fleet_log: bool,
}

/// What it measured, and the scenario's bill.
#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    pub databases: usize,
    pub hot: usize,
    pub duration_s: f64,
    pub sync_interval_s: f64,
    pub scan_interval_s: f64,
    pub commits: u64,
    pub idle_window_s: f64,
    pub idle: Requests,
    pub hot_phase: Requests,
    /// Every PUT of the hot phase (log objects included) per hot database
    /// per second.
    pub put_per_hot_db_per_s: f64,
    /// Fleet log objects written in the hot phase.
    pub log_objects: u64,
    /// Fleet log objects per sync interval over the hot phase's second half
    /// (every stream running).
    pub log_objects_per_tick: f64,
    pub requests_per_idle_db_per_day: f64,
    pub scenario_hot_usd: f64,
    pub scenario_log_usd: f64,
    pub scenario_idle_usd: f64,
    pub scenario_lease_usd: f64,
    pub scenario_retention_usd: f64,
    pub scenario_total_usd: f64,
    pub target_usd: f64,
}

fn minus(a: Requests, b: Requests) -> Requests {
    Requests {
        put: a.put - b.put,
        get: a.get - b.get,
        list: a.list - b.list,
        delete: a.delete - b.delete,
    }
}

/// `1234.567` -> `$1,234.57`.
pub fn usd_text(usd: f64) -> String {
    let cents = (usd * 100.0).round().max(0.0) as u64;
    format!("${}.{:02}", thousands((cents / 100) as f64), cents % 100)
}

/// `1234567.8` -> `1,234,568`.
pub fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Runs the benchmark (see the module docs).
pub async fn cost(opts: CostOptions) -> Result<CostReport> {
    if opts.hot > opts.databases {
        return Err(Error::invalid("bench cost --hot", "more than --databases"));
    }
    // Absolute: the generated config's `file://` URL and patterns take it
    // as written (black-box probe U31, F9: a relative `--dir` made
    // `file://rel/replica`, a remote host, and the run refused its own
    // config).
    let root = std::path::absolute(&opts.dir).map_err(|e| Error::io(&opts.dir, e))?;
    let n = opts.databases;
    create_fleet(&root, n, "bench cost").await?;
    // Written an hour ago, as far as change detection can tell: no upload is
    // "racy" (just written, uploaded once more at the next scan), so the idle
    // phase measures an idle fleet, not the tail of its first upload.
    let aged = root.clone();
    tokio::task::spawn_blocking(move || age_databases(&aged, 0..n))
        .await
        .map_err(|e| Error::invalid("bench cost", e.to_string()))??;
    let yaml = format!(
        "multi-db:\n  patterns: [\"{}/data/*/*.db\"]\n  fleet-log: {}\n  scan-interval: {}ms\n  sync-interval: {}ms\n  temp-dir: {}\n  state-dir: {}\n  replica:\n    url: file://{}\n    path: \"{{{{group}}}}/{{{{db}}}}\"\n",
        root.display(),
        opts.fleet_log,
        opts.scan_interval.as_millis(),
        opts.sync_interval.as_millis(),
        root.join("tmp").display(),
        root.join("state").display(),
        root.join("replica").display(),
    );
    let loaded = Loaded::from_str(&yaml, "bench-cost.yml", &root)?;
    let multi_db = loaded.multi_db().clone();
    let plain = loaded.open_replica()?;
    let counted = Arc::new(FaultyStore::new(plain.store.clone()));
    let replicator = Arc::new(Replicator::with_replica(
        loaded,
        plain.with_store(counted.clone()),
    )?);
    let stats = replicator.stats();
    let mut rounds = replicator.rounds();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(replicator.clone().run(false, cancel.clone()));
    rounds
        .changed()
        .await
        .map_err(|_| Error::invalid("bench cost", "the replicator stopped"))?;
    tracing::info!(
        databases = n,
        "initial upload done; measuring the idle fleet"
    );

    // Idle: one scan interval plus a little, so exactly one more scan runs.
    let before = counted.requests();
    let idle_window = opts.scan_interval + Duration::from_millis(500);
    tokio::time::sleep(idle_window).await;
    let idle = minus(counted.requests(), before);

    tracing::info!(hot = opts.hot, "writing");
    let before = counted.requests();
    let log_before = stats.log_objects.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let commits = commits.clone();
        spawn_hot_writer(root.clone(), opts.hot, stop.clone(), move |_| {
            commits.fetch_add(1, Ordering::Relaxed);
        })
    };
    let started = Instant::now();
    // The log's steady rate is taken over the second half, after every
    // stream has started (a stream's start ships on its own, outside the
    // ticks' batches: that is counted per stream).
    tokio::time::sleep(opts.duration / 2).await;
    let (log_mid, mid) = (stats.log_objects.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(opts.duration - opts.duration / 2).await;
    let steady_log = stats.log_objects.load(Ordering::Relaxed) - log_mid;
    let steady_ticks = mid.elapsed().as_secs_f64() / opts.sync_interval.as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .map_err(|_| Error::invalid("bench cost", "writer thread panicked"))??;
    let duration = started.elapsed();
    cancel.cancel();
    run.await
        .map_err(|e| Error::invalid("bench cost", e.to_string()))??;
    let hot_phase = minus(counted.requests(), before);
    let log_objects = stats.log_objects.load(Ordering::Relaxed) - log_before;

    let hot_db_secs = (opts.hot.max(1) as f64) * duration.as_secs_f64();
    let idle_db_secs = (n.max(1) as f64) * idle_window.as_secs_f64();
    let idle_total = (idle.put + idle.get + idle.list + idle.delete) as f64;
    let model = if multi_db.fleet_log {
        // The log's objects are the fleet's; everything else a hot database
        // did in the run happens once per stream (start and end).
        let ticks = duration.as_secs_f64() / opts.sync_interval.as_secs_f64();
        let per_tick = steady_log as f64 / steady_ticks.max(1.0);
        let steady_puts = (per_tick * ticks).round() as u64;
        let per_stream = Requests {
            put: hot_phase.put.saturating_sub(steady_puts),
            delete: hot_phase.delete.saturating_sub(steady_puts),
            ..hot_phase
        };
        CostModel {
            hot: RequestRates::default(),
            hot_sync_interval_s: opts.sync_interval.as_secs_f64(),
            idle: RequestRates::per(&idle, idle_db_secs),
            log: Some(LogRates {
                per_tick: RequestRates {
                    put: per_tick,
                    delete: per_tick,
                    ..RequestRates::default()
                },
                per_stream: RequestRates::per(&per_stream, opts.hot.max(1) as f64),
                consolidate_s: multi_db.log_consolidate_interval.as_secs_f64(),
                streams_per_day: streams_per_day(multi_db.snapshot_interval.as_secs_f64()),
            }),
        }
    } else {
        CostModel {
            hot: RequestRates::per(&hot_phase, hot_db_secs),
            hot_sync_interval_s: opts.sync_interval.as_secs_f64(),
            idle: RequestRates::per(&idle, idle_db_secs),
            log: None,
        }
    };
    let scenario = model.bill(&FleetLoad::scenario(&multi_db));
    Ok(CostReport {
        databases: n,
        hot: opts.hot,
        duration_s: duration.as_secs_f64(),
        sync_interval_s: opts.sync_interval.as_secs_f64(),
        scan_interval_s: opts.scan_interval.as_secs_f64(),
        commits: commits.load(Ordering::Relaxed),
        idle_window_s: idle_window.as_secs_f64(),
        idle,
        hot_phase,
        put_per_hot_db_per_s: (hot_phase.put as f64) / hot_db_secs,
        log_objects,
        log_objects_per_tick: steady_log as f64 / steady_ticks.max(1.0),
        requests_per_idle_db_per_day: idle_total / idle_db_secs * 86_400.0,
        scenario_hot_usd: scenario.usd("hot"),
        scenario_log_usd: scenario.usd("fleet log"),
        scenario_idle_usd: scenario.usd("idle"),
        scenario_lease_usd: scenario.usd("lease"),
        scenario_retention_usd: scenario.usd("retention"),
        scenario_total_usd: scenario.total_usd,
        target_usd: TARGET_USD,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: f64 = 86_400.0;

    /// A fleet under the default config's intervals (sync 1 s, scan 15 s,
    /// lease 60 s, retention 30 days checked hourly).
    fn load(databases: u64, hot: u64, cold: u64, over: u64) -> FleetLoad {
        let yaml = "multi-db:\n  patterns: [\"/x/*.db\"]\n  replica:\n    url: s3://b/p\n";
        let loaded =
            crate::source::config::Loaded::from_str(yaml, "t.yml", std::path::Path::new("/"))
                .unwrap();
        FleetLoad::new(loaded.multi_db(), databases, hot, cold, over)
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(680_400_000.0), "680,400,000");
        assert_eq!(usd_text(3402.0), "$3,402.00");
        assert_eq!(usd_text(0.646), "$0.65");
    }

    #[test]
    fn hot_tier_at_the_measured_rate() {
        let bill = CostModel::default().bill(&load(100_000, 250, 0, 0));
        let hot = bill.line("hot").unwrap();
        // 250 hot x 1.05 PUT/s x 30 days.
        let puts = 250.0 * 1.05 * DAY * 30.0;
        assert_eq!(puts, 680_400_000.0);
        assert!((hot.requests.put - puts).abs() < 1.0, "{hot:?}");
        // One LIST per stream start, measured as 250 per 15,000 hot DB-seconds.
        let lists = 250.0 * (250.0 / 15_000.0) * DAY * 30.0;
        assert!((hot.requests.list - lists).abs() < 1.0, "{hot:?}");
        // $3,402 of PUTs + $54 of LISTs.
        assert!((hot.usd - (3402.0 + 54.0)).abs() < 0.01, "{}", hot.usd);
        assert_eq!(bill.usd("idle"), 0.0);
        assert_eq!(bill.line("cold").unwrap().requests.put, 0.0);
    }

    #[test]
    fn sync_interval_scales_hot_puts_down_never_up() {
        let m = CostModel::default();
        assert!((m.hot_put_per_s(2.0) - 0.525).abs() < 1e-9);
        assert_eq!(m.hot_put_per_s(0.5), 1.05);
        let mut l = load(10, 10, 0, 0);
        l.sync_interval_s = 10.0;
        let hot = m.bill(&l).line("hot").unwrap().requests.put;
        assert!((hot - 10.0 * 0.105 * DAY * 30.0).abs() < 1.0, "{hot}");
    }

    #[test]
    fn cold_lease_over_and_retention() {
        let m = CostModel::default();
        let bill = m.bill(&load(1000, 0, 10, 2));
        // 10 changing cold databases: two PUTs an hour each, 720 hours.
        assert_eq!(bill.line("cold").unwrap().requests.put, 14_400.0);
        // 2 busy ones without room in the hot tier: two PUTs per 15 s scan.
        assert_eq!(
            bill.line("over-max-hot").unwrap().requests.put,
            2.0 * 2.0 * 172_800.0
        );
        // Renewed every 20 s.
        let lease = bill.line("lease").unwrap();
        assert_eq!(lease.requests.put, 129_600.0);
        assert!((lease.usd - 0.648).abs() < 1e-9);
        // Held after 720 h: 1000 newest snapshots + 12 x 720 hourly ones:
        // 9,640 objects, 10 LIST pages per hourly pass.
        assert_eq!(bill.objects_held, 1000.0 + 12.0 * 720.0);
        let r = bill.line("retention").unwrap();
        assert_eq!(r.requests.list, 720.0 * 10.0);
        // 8,640 expired hourly snapshots a month, deleted 1,000 per request.
        assert_eq!(r.requests.delete, 9.0);
        assert_eq!(
            bill.line("idle").unwrap().basis.split(' ').next(),
            Some("988")
        );
        let sum: f64 = bill.lines.iter().map(|l| l.usd).sum();
        assert!((bill.total_usd - sum).abs() < 1e-9);
    }

    #[test]
    fn retention_lists_grow_with_hot_segments() {
        let bill = CostModel::default().bill(&load(100, 1, 0, 0));
        // One hot database holds 1.05 x 30 days of segments, listed once per
        // pass with the whole prefix.
        let segments = 1.05 * DAY * 30.0;
        assert_eq!(bill.objects_held, 100.0 + segments);
        let per_pass = ((100.0 + segments) / 1000.0).ceil();
        assert_eq!(
            bill.line("retention").unwrap().requests.list,
            720.0 * per_pass
        );
    }

    #[test]
    fn the_fleet_log_bills_one_object_per_sync_for_the_whole_fleet() {
        let l = load(100_000, 250, 0, 0);
        let m = CostModel {
            log: Some(LogRates::measured(3600.0, 86_400.0)),
            hot: RequestRates::default(),
            ..CostModel::default()
        };
        let bill = m.bill(&l);
        // One log object per second for all 250 together: 2,592,000 PUTs.
        let log = bill.line("fleet log").unwrap();
        assert_eq!(log.requests.put, DAY * 30.0);
        assert!((log.usd - 12.96).abs() < 1e-9, "{}", log.usd);
        // Per hot database: 720 hourly packs, one stream start a day.
        let hot = bill.line("hot").unwrap();
        let per_db = 720.0 + 30.0 * MEASURED_LOG_PER_STREAM.put;
        assert!((hot.requests.put - 250.0 * per_db).abs() < 1e-6, "{hot:?}");
        // Without hot databases, no log objects.
        assert_eq!(m.bill(&load(100, 0, 0, 0)).usd("fleet log"), 0.0);
        // DELETE is counted, never charged.
        let deletes = RequestRates {
            delete: 1e9,
            ..RequestRates::default()
        };
        assert_eq!(deletes.usd(), 0.0);
    }

    #[test]
    fn measured_requests_become_rates() {
        let r = RequestRates::per(
            &Requests {
                put: 15_750,
                get: 0,
                list: 250,
                delete: 0,
            },
            250.0 * 60.0,
        );
        assert_eq!(r.put, 1.05);
        assert_eq!(r.list, MEASURED_HOT_LIST_PER_S);
    }
}
