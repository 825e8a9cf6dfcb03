//! The replica lease: at most one `litefleet replicate` writes to a replica root.
//!
//! Two replicators pointed at the same root would upload over each other and
//! run retention against each other's snapshots. So `replicate` first takes a
//! lease: the object `<prefix>/.litefleet/lease.json`, holding who owns it
//! (an owner id unique to one acquisition: host, pid, start time and a
//! counter), the host name and pid for people, and when it was acquired and
//! expires. Every change to it is a compare-and-swap (see [`crate::replica::storage`]):
//!
//! * **acquire**: create it only if absent (`PutMode::Create`, S3
//!   `If-None-Match: *`). If it exists and has not expired, refuse with an
//!   error naming the holder's host, pid and expiry. If it has expired, take
//!   it over by replacing exactly the version that was read
//!   (`PutMode::Update`, S3 `If-Match: <etag>`), so of two processes racing
//!   for an expired lease exactly one wins.
//! * **renew**: replace our own version with a later expiry (If-Match). If
//!   that fails someone else took the lease over (ours had expired) or removed
//!   it: [`Error::LeaseLost`], and the replicator must stop writing.
//!   [`spawn_renewer`] renews every [`Lease::ttl`] / 3 and cancels the
//!   replication token when the lease is lost. When it cannot be renewed
//!   before it expires locally (store unreachable), the fence refuses
//!   writes from then on, and renewals go on: the first that succeeds
//!   (nobody took the lease over meanwhile: the compare-and-swap is on our
//!   version) opens the fence again, so a store outage pauses replication
//!   instead of ending it.
//! * **fence**: every write of the replicator goes through a replica with the
//!   lease's [`Fence`] (see [`crate::replica::storage`]). It is open until the
//!   *local* expiry: the monotonic instant at which the last successful
//!   acquisition or renewal was *sent*, plus the TTL, minus [`Lease::margin`]
//!   (a quarter of the TTL), and no later than the written expiry minus the
//!   margin on the wall clock (the monotonic clock stands still while the
//!   host is suspended). A renewal is bounded by that instant too: if
//!   none succeeds before it, writes stop there, whatever the store is
//!   doing, and a write in flight is abandoned, until a later renewal
//!   succeeds. A successor can take the
//!   lease only after the expiry written in it (sent time + TTL by the
//!   holder's wall clock), so the margin separates the last write of the old
//!   holder from the first of the new one, as long as the hosts' clocks
//!   agree to within it and no single request outlives it after being sent
//!   (a request the store applies later than that cannot be fenced).
//! * **lost**: the fence closes at once, in-flight writes are abandoned, the
//!   final hot sync and retention do not run (their writes are refused), and
//!   the replicator exits non-zero without recording anything as uploaded
//!   that was not confirmed before.
//! * A conditional write whose response was lost but which the store applied
//!   (a retry then sees 412) is recognized by reading the lease back: if it
//!   holds our owner id (and, for a renewal, the expiry we wrote), it is ours.
//!   A renewal that finds our owner id with another expiry (an earlier
//!   renewal that timed out and was applied late, after a stall of the
//!   store) renews again from the version it holds: every write since our
//!   last known version was ours, each conditional on a version of ours
//!   (up to three writes, so the answer to that write may be
//!   lost too). A read-back that fails is a failed renewal, tried again
//!   like any other, never a lost lease: only a lease held by another owner
//!   id, or deleted, is lost. An acquisition whose write got no answer (a
//!   timeout, a connection lost after sending) reads the lease back before
//!   it fails, so a start does not leave behind a lease it took without
//!   hearing of it.
//! * **release** (clean shutdown): mark the lease expired and released with
//!   an If-Match write on our version, which any later acquirer takes over
//!   at once. (Earlier versions deleted it while it was valid for 15 s
//!   more.)
//! * **takeover wait**: a lease that was deleted (missing on a replica that
//!   holds an identity, so a replicator ran there) or that expired without
//!   being released may have a holder that still runs: someone deleted or
//!   edited its lease by hand, taking it for a dead one's. Such a holder
//!   writes until its next renewal finds the lease changed, or at most
//!   until its fence closes, `ttl - margin` after its last renewal, which
//!   the store applied no later than the lease object's last change. So
//!   the new holder writes nothing before then ([`Lease::takeover_wait`];
//!   black-box probe H27: with the lease deleted, a second replicator took
//!   it at once, the first went on uploading for 4-10 s, and a restore
//!   returned the other database's rows with exit 0). A lease its holder
//!   released, and a new replica, need no wait.
//!
//! Expiry is wall-clock time written by the holder and read by contenders, so
//! hosts' clocks must agree to well within the margin (NTP does).
//!
//! Backend support (object_store 0.14): S3 and S3-compatible stores do both
//! conditional puts natively (AWS S3, MinIO, R2). `file://`'s
//! `LocalFileSystem` has no `PutMode::Update`, so storage does the
//! compare-and-swap itself under an `flock` (safe for every process on one
//! host). The in-process test server (`s3s-fs` 0.14) checks `If-None-Match`
//! and `If-Match` on PutObject and answers 412, but check and write are not
//! atomic there, so the test wrapper serializes conditional PUTs the way
//! real S3 does.
//!
//! All operations take `now` explicitly (`*_at`) so tests can move time
//! without sleeping; the plain versions use the system clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path as ObjPath;
use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::replica::storage::{Fence, Replica};
use crate::{Error, Result};
use std::sync::Arc;
use std::time::Instant;

/// The directory of litefleet's own objects under the replica root (the
/// lease); never a database key ([`crate::replica::layout::key_problem`]).
pub const LEASE_DIR: &str = crate::replica::layout::RESERVED_DIR;
/// Where the lease lives under the replica prefix. Keys never start with
/// its directory, and restore, list and retention ignore objects whose
/// names are not snapshot names.
pub const LEASE_OBJECT: &str = ".litefleet/lease.json";
/// Largest lease object read: ours is a few hundred bytes of JSON; a larger
/// one is refused before it is downloaded (black-box probe N29: a 5 GB one
/// made every start abort on the allocation, and a 300 MB one was taken).
pub const MAX_LEASE_BYTES: u64 = 64 << 10;
/// Default lease lifetime. Long enough that a renewal every 20 s survives two
/// failed requests (each bounded by the replica `timeout`), short enough that
/// a crashed replicator's successor waits at most a minute.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Shortest `lease-ttl`: renewal runs every third of it, and the fence
/// margin is a quarter of it.
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// The ETag the conditional-write check makes a replacement conditional on
/// ([`Lease::check_conditional_writes`]): S3 ETags are quoted hex digests,
/// so no object has this one.
const NO_SUCH_ETAG: &str = "\"litefleet-conditional-write-check\"";
/// Acquisition attempts when the lease changes between our read and our
/// conditional write (another process acquiring or releasing at that moment),
/// or a write fails without saying whether the store applied it.
const ACQUIRE_ATTEMPTS: usize = 3;
/// Conditional writes one renewal sends at most: after a refused one, the
/// lease is read back, and if it still holds our owner id (every write of
/// it since our last known version was one of ours that the store applied
/// without our hearing of it), the renewal is written again on the version
/// read. Three cover a late renewal of ours and a lost answer to the write
/// that follows it (black-box probe M21).
const RENEW_ATTEMPTS: usize = 3;

/// Sends `write`, one write of the conditional-write check, again while it
/// fails without an answer about the object (a reset connection, a 5xx
/// after the client's own retries), as reads are
/// ([`crate::replica::storage::retrying`]): one such fault failed the start
/// (black-box probe D26). Sending it again changes nothing the check finds:
/// a store that honours the condition refuses every attempt, one that
/// ignores it applies each.
async fn check_write<F, Fut>(write: F) -> Result<Option<UpdateVersion>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<UpdateVersion>>>,
{
    let transient = |e: &Error| matches!(e, Error::Store { source, .. } if crate::replica::storage::is_transient(source));
    crate::replica::storage::retrying(transient, write).await
}

/// What the lease object holds (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Unique to one acquisition: `host:pid:start-nanos:counter`.
    pub owner: String,
    pub hostname: String,
    pub pid: u32,
    #[serde(with = "crate::rfc3339")]
    pub acquired: DateTime<Utc>,
    #[serde(with = "crate::rfc3339")]
    pub expires: DateTime<Utc>,
    /// Marked expired by its holder at a clean shutdown
    /// ([`Lease::release_at`]), not left by a process that died: the next
    /// start takes it over without the warning a crash gets (black-box probe P23: a clean stop with a
    /// short `lease-ttl` was logged at the next start as a crash was).
    /// Absent in leases of earlier versions, which ignore it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

impl LeaseRecord {
    /// "host h, pid p, expires T (in 42s)" for messages; "expired T (3s
    /// ago)" once it has (a takeover used to log an expired lease as
    /// "expires T (in 0s)": seconds were cut toward zero).
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        let ms = (self.expires - now).num_milliseconds();
        let at = self
            .expires
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let when = if ms > 0 {
            format!("expires {at} (in {}s)", (ms + 999) / 1000)
        } else {
            format!("expired {at} ({}s ago)", -ms / 1000)
        };
        format!("host {}, pid {}, {when}", self.hostname, self.pid)
    }
}

/// A held replica lease. Dropping it does not release it (use
/// [`Lease::release`]); an unreleased lease simply expires.
#[derive(Debug)]
pub struct Lease {
    replica: Replica,
    location: ObjPath,
    record: LeaseRecord,
    version: UpdateVersion,
    ttl: Duration,
    /// Open while the lease is held; see the module docs.
    fence: Arc<Fence>,
    /// How long after acquiring it no write may be sent (see the module
    /// docs: takeover wait).
    takeover_wait: Duration,
    /// See [`Lease::after_clean_stop`].
    after_clean_stop: bool,
}

/// The lease object's path under the replica prefix.
pub fn lease_path(replica: &Replica) -> ObjPath {
    crate::replica::layout::key_path(&replica.prefix, LEASE_OBJECT)
}

/// How long from now until `fenced_for` has passed since the lease object
/// at `location` last changed (the store's modification time: a holder's
/// renewals that the store applied were no later), at most `fenced_for`;
/// all of it when that time cannot be read. See the module docs (takeover
/// wait).
async fn since_last_change(
    replica: &Replica,
    location: &ObjPath,
    fenced_for: Duration,
) -> Duration {
    use object_store::ObjectStoreExt;
    match replica.store.head(location).await {
        Ok(m) => (m.last_modified + ttl_delta(fenced_for) - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(fenced_for),
        Err(_) => fenced_for,
    }
}

/// The lease object as named in messages (`s3://bucket/prefix/.litefleet/lease.json`).
fn lease_name(replica: &Replica) -> String {
    format!(
        "{}/{LEASE_OBJECT}",
        replica.to_string().trim_end_matches('/')
    )
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // unless truncated, and we stop at the first NUL or the end either way.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn new_owner(host: &str, pid: u32) -> String {
    /// Distinguishes acquisitions within one process (tests, restarts of the loop).
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{host}:{pid}:{nanos:x}:{n}")
}

fn parse(replica: &Replica, bytes: &[u8]) -> Result<LeaseRecord> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::invalid(
            lease_name(replica),
            format!(
                "is not a litefleet lease ({e}); if no litefleet replicates to this replica, delete it"
            ),
        )
    })
}

fn encode(record: &LeaseRecord) -> Bytes {
    // Serializing a struct of strings and integers cannot fail.
    Bytes::from(serde_json::to_vec_pretty(record).unwrap_or_default())
}

/// Times as stored (millisecond precision), so a record reads back equal.
fn stored(t: DateTime<Utc>) -> DateTime<Utc> {
    chrono::SubsecRound::trunc_subsecs(t, 3)
}

/// See [`Lease::margin`].
fn margin(ttl: Duration) -> Duration {
    ttl / 4
}

fn ttl_delta(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

impl Lease {
    /// Takes the lease with [`DEFAULT_TTL`] at `now`.
    pub async fn acquire(replica: &Replica, now: DateTime<Utc>) -> Result<Lease> {
        Self::acquire_with_ttl(replica, now, DEFAULT_TTL).await
    }

    /// Takes the lease at `now`, valid for `ttl`: creates it, or takes over an
    /// expired one. [`Error::LeaseHeld`] if another process holds it.
    pub async fn acquire_with_ttl(
        replica: &Replica,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> Result<Lease> {
        if ttl.is_zero() {
            return Err(Error::invalid("lease ttl", "must be greater than zero"));
        }
        let replica = &replica.unfenced();
        // Before anything is sent: the fence must not outlive the expiry the
        // store will hold, whatever the requests' latency.
        let sent = Instant::now();
        let location = lease_path(replica);
        let host = hostname();
        let pid = std::process::id();
        let record = LeaseRecord {
            owner: new_owner(&host, pid),
            hostname: host,
            pid,
            acquired: stored(now),
            expires: stored(now + ttl_delta(ttl)),
            released: false,
        };
        let body = encode(&record);
        // A write that failed without an answer (a timeout, a connection
        // lost after sending) may have been applied: the next attempt reads
        // the lease back first, and finds our record if it was (black-box
        // probe M21: the start failed, and the lease it had written held
        // every later start off until it expired).
        let mut unanswered: Option<Error> = None;
        // The longest a holder whose lease was deleted or edited by hand
        // can still write (see the module docs).
        let fenced_for = ttl.saturating_sub(margin(ttl));
        let mut takeover_wait = Duration::ZERO;
        // What the lease said of the run before ours (see
        // `Lease::after_clean_stop`); not known when the lease we find is
        // our own write, applied although its answer was lost.
        let mut after_clean_stop = false;
        // The ETags an If-Match takeover was refused on: the same one every
        // time means the lease never changed, and the store refused its own
        // ETag (black-box probe K28: read as "another litefleet is
        // starting").
        let mut refused_on: Vec<Option<String>> = Vec::new();
        for _ in 0..ACQUIRE_ATTEMPTS {
            let current = match replica.get_versioned(&location, MAX_LEASE_BYTES).await {
                Ok(c) => c,
                Err(e) => return Err(unanswered.unwrap_or(e)),
            };
            let written = match current {
                None => {
                    // A replica without an identity is new (or emptied);
                    // one that cannot be read counts as holding one.
                    let ran_here =
                        !matches!(crate::replica::identity::read(replica).await, Ok(None));
                    takeover_wait = if ran_here { fenced_for } else { Duration::ZERO };
                    after_clean_stop = !ran_here;
                    replica.put_if_absent(&location, body.clone()).await
                }
                Some((bytes, version)) => {
                    let held = parse(replica, &bytes)?;
                    if held == record {
                        // Our own write of a moment ago, applied although
                        // its response was lost.
                        Ok(Some(version))
                    } else if held.expires > now && !held.released {
                        return Err(Error::LeaseHeld {
                            object: lease_name(replica),
                            reason: format!(
                                "held by another litefleet ({}); stop it, or wait until its lease expires if it died",
                                held.describe(now)
                            ),
                        });
                    } else {
                        after_clean_stop = held.released;
                        takeover_wait = if held.released {
                            Duration::ZERO
                        } else {
                            since_last_change(replica, &location, fenced_for).await
                        };
                        let took = replica
                            .put_if_match(&location, body.clone(), &version)
                            .await;
                        if matches!(took, Ok(None)) {
                            refused_on.push(version.e_tag.clone());
                        }
                        match took {
                            Ok(Some(_)) if held.released => tracing::info!(
                                lease = %lease_name(replica),
                                previous = %held.describe(now),
                                "took over the replica lease its holder released at a clean stop"
                            ),
                            Ok(Some(_)) => tracing::warn!(
                                lease = %lease_name(replica),
                                previous = %held.describe(now),
                                "took over an expired replica lease"
                            ),
                            _ => {}
                        }
                        took
                    }
                }
            };
            let written = match written {
                Ok(w) => w,
                Err(e) if e.may_have_landed() => {
                    unanswered = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(version) = written {
                tracing::debug!(
                    lease = %lease_name(replica),
                    owner = %record.owner,
                    expires = %record.expires.to_rfc3339(),
                    "acquired replica lease"
                );
                let fence = Arc::new(Fence::new(
                    lease_name(replica),
                    sent + ttl.saturating_sub(margin(ttl)),
                    record.expires - ttl_delta(margin(ttl)),
                ));
                return Ok(Lease {
                    replica: replica.clone(),
                    location,
                    record,
                    version,
                    ttl,
                    fence,
                    takeover_wait,
                    after_clean_stop,
                });
            }
            // Someone changed the lease between our read and our write: look again.
        }
        if let Some(e) = unanswered {
            return Err(e);
        }
        if refused_on.len() == ACQUIRE_ATTEMPTS
            && refused_on[0].is_some()
            && refused_on.iter().all(|t| *t == refused_on[0])
        {
            return Err(Error::invalid(
                format!("replica lease {}", lease_name(replica)),
                format!(
                    "the store refused a write conditional on the lease's ETag (If-Match) \
                     {ACQUIRE_ATTEMPTS} times while the lease did not change: it does not \
                     honour If-Match on its own ETags, so litefleet does not replicate to it; \
                     use a store that honours If-Match (AWS S3, MinIO, R2)"
                ),
            ));
        }
        Err(Error::LeaseHeld {
            object: lease_name(replica),
            reason: format!(
                "changed {ACQUIRE_ATTEMPTS} times while acquiring it; another litefleet is starting against this replica"
            ),
        })
    }

    /// Checks that the store honours the two conditional writes the lease
    /// stands on, by sending each where it must be refused: a create of the
    /// lease we hold (`If-None-Match: *` on an existing object) and a
    /// replacement of it conditional on an ETag it does not have
    /// (`NO_SUCH_ETAG`). Some S3-compatible stores ignore these headers
    /// and write anyway; there two replicators would both "win" the lease
    /// and upload over each other. Both writes carry the lease's own bytes,
    /// so a store that applies them changes nothing but its version, which
    /// is kept. Then one write that must be applied
    /// (`check_own_etag_matches`). Three PUTs per start; `file://`
    /// replicas do their compare-and-swap themselves and send nothing.
    /// [`Error::Invalid`] naming the ignored condition if one was applied,
    /// or the refusal of our own ETag.
    pub async fn check_conditional_writes(&mut self) -> Result<()> {
        if self.replica.is_local() {
            return Ok(());
        }
        let body = encode(&self.record);
        let no_such = UpdateVersion {
            e_tag: Some(NO_SUCH_ETAG.to_string()),
            version: None,
        };
        let (replica, location) = (&self.replica, &self.location);
        let ignored = if let Some(v) =
            check_write(|| replica.put_if_absent(location, body.clone())).await?
        {
            self.version = v;
            "a create conditional on no object existing (If-None-Match: *) replaced the existing lease"
        } else if let Some(v) =
            check_write(|| replica.put_if_match(location, body.clone(), &no_such)).await?
        {
            self.version = v;
            "a write conditional on an ETag the lease does not have (If-Match) was applied"
        } else {
            return self.check_own_etag_matches().await;
        };
        Err(Error::invalid(
            format!("replica lease {}", lease_name(&self.replica)),
            format!(
                "the store ignores conditional writes: {ignored}. On this store the lease cannot keep two replicators apart, so litefleet does not replicate to it; use a store that honours If-None-Match and If-Match (AWS S3, MinIO, R2), or set `multi-db.replica.check-conditional-writes: false` if you make sure yourself that only one replicator runs"
            ),
        ))
    }

    /// The third write of [`Lease::check_conditional_writes`], one the
    /// store must apply: our lease again, conditional on the ETag its
    /// last write returned (If-Match), as every renewal is. A store that
    /// cannot match its own ETags (one comparing a quoted ETag with an
    /// unquoted one, say) passed the two refusals, and then every renewal
    /// failed as "lost: changed by another writer with our owner id", and
    /// the next start blamed another litefleet (black-box probe K28).
    async fn check_own_etag_matches(&mut self) -> Result<()> {
        let body = encode(&self.record);
        let (replica, location, version) = (&self.replica, &self.location, &self.version);
        if let Some(v) =
            check_write(|| replica.put_if_match(location, body.clone(), version)).await?
        {
            self.version = v;
            return Ok(());
        }
        match Self::current(&self.replica).await? {
            Some(r) if r == self.record => Err(Error::invalid(
                format!("replica lease {}", lease_name(&self.replica)),
                "the store refused a write conditional on the lease's own ETag (If-Match with the \
                 ETag the store returned for it), so it cannot renew the lease or update an \
                 object safely, and litefleet does not replicate to it; use a store that honours \
                 If-Match (AWS S3, MinIO, R2)",
            )),
            _ => Err(self.lost(Utc::now()).await),
        }
    }

    /// What is stored in the replica's lease object now, if anything.
    pub async fn current(replica: &Replica) -> Result<Option<LeaseRecord>> {
        match replica
            .get_versioned(&lease_path(replica), MAX_LEASE_BYTES)
            .await?
        {
            None => Ok(None),
            Some((bytes, _)) => parse(replica, &bytes).map(Some),
        }
    }

    /// Our record (owner, host, pid, acquired, expires as last written).
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    pub fn expires(&self) -> DateTime<Utc> {
        self.record.expires
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long before the written expiry our writes stop: a quarter of the
    /// TTL (15 s at the default), for clock skew and request time.
    pub fn margin(&self) -> Duration {
        margin(self.ttl)
    }

    /// How long after acquiring the lease its holder must not write: a
    /// holder whose lease was deleted or edited by hand, and which may
    /// still run, writes no longer than that (see the module docs); zero
    /// for a lease released at a clean stop, and on a new replica.
    pub fn takeover_wait(&self) -> Duration {
        self.takeover_wait
    }

    /// The run before this one stopped cleanly: the lease it held was
    /// released (or the replica is new, and no run came before). Otherwise
    /// (it expired unreleased, or was deleted) that run may have been
    /// killed while writing, and left staged objects behind.
    pub fn after_clean_stop(&self) -> bool {
        self.after_clean_stop
    }

    /// The write fence of this lease, for [`Replica::with_fence`].
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// Extends the lease to now + ttl.
    pub async fn renew(&mut self) -> Result<()> {
        self.renew_at(Utc::now()).await
    }

    /// Extends the lease to `now` + ttl, only if the stored lease is still the
    /// version we wrote last. [`Error::LeaseLost`] if it is not.
    pub async fn renew_at(&mut self, now: DateTime<Utc>) -> Result<()> {
        let sent = Instant::now();
        let mut next = self.record.clone();
        next.expires = stored(now + ttl_delta(self.ttl));
        let body = encode(&next);
        let mut version = self.version.clone();
        let mut written = None;
        for attempt in 1..=RENEW_ATTEMPTS {
            // An error here (no answer, or the store failing) is a failed
            // renewal, tried again by the renewer: the lease may well be ours
            // still. Only what the store holds can say it is lost.
            if let Some(v) = self
                .replica
                .put_if_match(&self.location, body.clone(), &version)
                .await?
            {
                written = Some(v);
                break;
            }
            let Some((bytes, v)) = self
                .replica
                .get_versioned(&self.location, MAX_LEASE_BYTES)
                .await?
            else {
                break; // deleted: lost
            };
            match parse(&self.replica, &bytes).ok() {
                // Applied although its response was lost (a retry got 412).
                Some(held) if held == next => {
                    written = Some(v);
                    break;
                }
                // An earlier write of ours applied without our hearing of
                // it: a renewal that timed out and landed late (after a
                // stall), or the previous attempt of this one. Every write
                // since our last known version was ours: each was
                // conditional on a version of ours, and a successor writes
                // its own owner id. So the lease is still ours: renew from
                // the version it holds.
                Some(held) if held.owner == self.record.owner => {
                    tracing::debug!(lease = %lease_name(&self.replica), expires = %held.expires.to_rfc3339(), "an earlier write of ours was applied unanswered; renewing from it");
                    if attempt == RENEW_ATTEMPTS {
                        return Err(Error::invalid(
                            lease_name(&self.replica),
                            "the lease kept changing under our owner id while it was renewed \
                             (writes of ours the store applied late); tried again later",
                        ));
                    }
                    version = v;
                }
                // Another owner's record, or none we can read: not ours.
                _ => break,
            }
        }
        match written {
            Some(v) => {
                self.fence.extend(
                    sent + self.ttl.saturating_sub(self.margin()),
                    next.expires - ttl_delta(self.margin()),
                );
                if self.record.expires <= now {
                    tracing::warn!(lease = %lease_name(&self.replica), "renewed a replica lease after it had expired (nobody took it over)");
                }
                self.version = v;
                self.record = next;
                Ok(())
            }
            None => Err(self.lost(now).await),
        }
    }

    /// Explains why our conditional write failed: who holds the lease now.
    async fn lost(&self, now: DateTime<Utc>) -> Error {
        self.fence.close();
        let reason = match Self::current(&self.replica).await {
            Ok(Some(r)) if r.owner == self.record.owner => {
                "it was changed by another writer with our owner id".to_string()
            }
            Ok(Some(r)) => format!("taken over by {}", r.describe(now)),
            Ok(None) => "it was deleted".to_string(),
            Err(e) => format!("it changed, and reading it failed: {e}"),
        };
        Error::LeaseLost {
            object: lease_name(&self.replica),
            reason,
        }
    }

    /// Gives the lease up (clean shutdown), using the system clock.
    pub async fn release(self) -> Result<()> {
        self.release_at(Utc::now()).await
    }

    /// Gives the lease up at `now`: marks it expired and released
    /// (If-Match on our version), so the next acquirer takes it over at
    /// once and knows no holder is left writing ([`Lease::takeover_wait`]).
    /// Earlier versions deleted it; a lease that is missing now tells of a
    /// hand's deletion.
    /// [`Error::LeaseLost`] if it is no longer ours (then nothing is
    /// changed).
    pub async fn release_at(self, now: DateTime<Utc>) -> Result<()> {
        let name = lease_name(&self.replica);
        let mut last = self.record.clone();
        last.expires = stored(now).min(self.record.expires);
        last.released = true;
        match self
            .replica
            .put_if_match(&self.location, encode(&last), &self.version)
            .await?
        {
            Some(_) => {
                tracing::info!(lease = %name, "released replica lease");
                Ok(())
            }
            None => Err(self.lost(now).await),
        }
    }
}

/// The background task that keeps a lease alive; see [`spawn_renewer`].
#[derive(Debug)]
pub struct Renewer {
    stop: CancellationToken,
    task: JoinHandle<Result<Lease>>,
}

impl Renewer {
    /// Stops renewing and hands the lease back (for [`Lease::release`]), or
    /// the error that ended renewal (the replication token was cancelled then).
    pub async fn stop(self) -> Result<Lease> {
        self.stop.cancel();
        self.task
            .await
            .map_err(|e| Error::invalid("lease renewer", format!("task failed: {e}")))?
    }

    /// Stops renewing and releases the lease: the clean-shutdown path, called
    /// after replication (including in-flight uploads) has finished.
    pub async fn release(self) -> Result<()> {
        self.stop().await?.release().await
    }

    /// True once the task ended by itself (lease lost or unrenewable).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Renews `lease` every ttl/3 until [`Renewer::stop`]. If the lease is lost
/// (taken over or deleted), it cancels `cancel` (which stops replication)
/// and ends with that error. If it cannot be renewed before it expires
/// locally (the store keeps failing), the fence refuses writes from then on
/// and renewals go on every ttl/12: one that succeeds (nobody took the
/// lease over) opens the fence again.
///
/// Stop it only after replication has finished: uploads that are still in
/// flight after `cancel` must stay covered by the lease.
pub fn spawn_renewer(mut lease: Lease, cancel: CancellationToken) -> Renewer {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let interval = lease.ttl / 3;
        // After a failed renewal, try again sooner: a few attempts fit before expiry.
        let retry = (interval / 4).max(Duration::from_millis(100));
        let mut wait = interval;
        // The fence expired locally without a renewal (the store did not
        // answer in time): writes are refused until a renewal succeeds.
        let mut stalled = false;
        loop {
            tokio::select! {
                _ = stopped.cancelled() => return Ok(lease),
                _ = tokio::time::sleep(wait) => {}
            }
            // Bounded by the local expiry: a renewal still pending then is
            // too late, whatever the store does with it. Once expired, each
            // attempt is bounded by the renewal interval instead.
            let fence = lease.fence();
            let deadline = tokio::time::Instant::from_std(fence.until())
                .max(tokio::time::Instant::now() + if stalled { interval } else { Duration::ZERO });
            let renewed = match tokio::time::timeout_at(deadline, lease.renew()).await {
                Ok(r) => r,
                Err(_) => Err(Error::invalid(
                    lease_name(&lease.replica),
                    "the renewal did not complete before the lease expired locally",
                )),
            };
            match renewed {
                Ok(()) => {
                    if stalled {
                        tracing::warn!(lease = %lease_name(&lease.replica), "replica lease renewed after the store came back; writes resume");
                    }
                    stalled = false;
                    wait = interval;
                }
                Err(e @ Error::LeaseLost { .. }) => {
                    fence.close();
                    tracing::error!(error = %e, "replica lease lost: stopping replication");
                    cancel.cancel();
                    return Err(e);
                }
                Err(e) => {
                    let left = fence.until().saturating_duration_since(Instant::now());
                    if left <= retry {
                        // Past the local expiry the fence refuses every
                        // write by itself. The lease may still be ours: a
                        // renewal is a compare-and-swap on our version, so
                        // it succeeds only if nobody took the lease over
                        // (which needs its written expiry to pass), and then
                        // writes resume; if somebody did, it fails as lost
                        // and replication stops. Meanwhile uploads fail and
                        // are retried, as in any store outage.
                        if !stalled {
                            tracing::error!(error = %e, "cannot renew the replica lease before it expires locally: writes stop until the store answers and the lease is renewed");
                        }
                        stalled = true;
                        wait = retry;
                        continue;
                    }
                    tracing::warn!(error = %e, left_ms = left.as_millis() as u64, "replica lease renewal failed; retrying");
                    wait = retry.min(left / 2);
                }
            }
        }
    });
    Renewer { stop, task }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn record_round_trips_and_describes_holder() {
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 13, 0, 0).unwrap();
        let r = LeaseRecord {
            owner: "h:1:ff:0".into(),
            hostname: "h".into(),
            pid: 1,
            acquired: t,
            expires: t + chrono::Duration::seconds(60),
            released: false,
        };
        let back: LeaseRecord = serde_json::from_slice(&encode(&r)).unwrap();
        assert_eq!(back, r);
        // Written only when set; read as unset from earlier versions.
        assert!(!String::from_utf8_lossy(&encode(&r)).contains("released"));
        let released = LeaseRecord {
            released: true,
            ..r.clone()
        };
        let back: LeaseRecord = serde_json::from_slice(&encode(&released)).unwrap();
        assert!(back.released);
        let d = r.describe(t + chrono::Duration::seconds(18));
        assert_eq!(d, "host h, pid 1, expires 2026-11-22T13:01:00Z (in 42s)");
        let late = |ms: i64| r.describe(t + chrono::Duration::milliseconds(60_000 + ms));
        assert_eq!(
            late(-300),
            "host h, pid 1, expires 2026-11-22T13:01:00Z (in 1s)"
        );
        assert_eq!(
            late(300),
            "host h, pid 1, expired 2026-11-22T13:01:00Z (0s ago)"
        );
        assert_eq!(
            late(4_000),
            "host h, pid 1, expired 2026-11-22T13:01:00Z (4s ago)"
        );
    }

    #[test]
    fn owners_are_unique_within_a_process() {
        assert_ne!(new_owner("h", 1), new_owner("h", 1));
        assert!(!hostname().is_empty());
    }
}
