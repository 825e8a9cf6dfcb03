//! Bounds on the blocking work of capture: how many WAL syncs, stream
//! starts and cold snapshots run on tokio's blocking pool at once.
//!
//! Every capture step is blocking file and SQLite I/O. Handed to the pool
//! unbounded, a fleet-log tick that wakes 1000 streams, or a scan that finds
//! thousands of changed databases, grows the pool to hundreds of threads
//! (tokio's cap is 512) that mostly wait on each other, and whose stacks and
//! allocator arenas stay behind as memory. Each kind of work has its own
//! bound, sized by the cores, so a long snapshot never holds up the hot
//! tier's syncs. Only the work itself is bounded, never the pool: tasks that
//! wait on other blocking tasks (the `file://` store's reads, for one) must
//! not count against these.

use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{Error, Result};

/// WAL syncs (reads, our checkpoints) at once, per core. They are short and
/// mostly wait on the page cache or the disk, so a few per core keep the
/// disk busy.
const SYNCS_PER_CORE: usize = 4;
/// Fewest concurrent syncs, whatever the core count.
const MIN_SYNCS: usize = 8;
/// Streams opening their database or starting a generation (a snapshot of
/// the whole database) at once, per core: CPU and disk bound, so a couple
/// per core keep both busy. When the daemon starts with 1000 hot databases
/// they all start together.
const STARTS_PER_CORE: usize = 2;
/// Cold-tier snapshots (backup copy and LZ4 compression) at once, per core:
/// the same reasoning as [`STARTS_PER_CORE`]. A large one runs its
/// `quick_check` on a second thread of its own beside the compression, so
/// this bounds those threads too. Uploads are bounded separately by
/// `max-concurrent`.
const SNAPSHOTS_PER_CORE: usize = 2;

/// What a blocking task is, for its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A hot stream's WAL read or checkpoint.
    Sync,
    /// A hot stream opening its database or starting a generation.
    Start,
    /// A cold-tier snapshot.
    Snapshot,
}

impl Work {
    fn slots(self) -> &'static Semaphore {
        static SYNC: OnceLock<Semaphore> = OnceLock::new();
        static START: OnceLock<Semaphore> = OnceLock::new();
        static SNAPSHOT: OnceLock<Semaphore> = OnceLock::new();
        // The count is worked out once: `available_parallelism` reads the
        // cgroup files at every call.
        let (cell, n): (_, fn(usize) -> usize) = match self {
            Work::Sync => (&SYNC, |c| (c * SYNCS_PER_CORE).max(MIN_SYNCS)),
            Work::Start => (&START, |c| c * STARTS_PER_CORE),
            Work::Snapshot => (&SNAPSHOT, |c| c * SNAPSHOTS_PER_CORE),
        };
        cell.get_or_init(|| Semaphore::new(n(cores())))
    }

    fn name(self) -> &'static str {
        match self {
            Work::Sync => "WAL sync",
            Work::Start => "stream start",
            Work::Snapshot => "snapshot",
        }
    }
}

/// Bytes of WAL frames the hot streams hold in memory all together, read
/// and not shipped yet: four of the largest segments a stream keeps in
/// memory ([`crate::capture::ship::IN_MEMORY_SEGMENT_BYTES`], 32 MiB). A
/// read that finds the budget spent leaves its frames in the WAL file, to be
/// streamed from there at upload as a segment object of its own
/// ([`crate::capture::ship::Segment::InWal`]): a PUT more, no memory. Each
/// stream used to hold its frames whatever the others held: after an
/// outage of the store, 40 hot databases 18 MB behind their writers held
/// 1.4 GB, and 1,000 would have held 32 GB (and made fleet log objects
/// larger than S3 takes in one PUT, 5 GB). With the budget, a fleet log
/// object holds at most this much (compressed), and the daemon's memory for
/// frames is this, twice (the frames and their compressed copy), plus the
/// reads in flight (at most one segment per [`Work::Sync`] slot).
const FRAMES_IN_MEMORY: usize = 128 << 20;

/// The hot streams' common budget of frames held in memory; see
/// `FRAMES_IN_MEMORY` (128 MiB). One permit is one byte.
pub fn frames_budget() -> Arc<Semaphore> {
    static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();
    BUDGET
        .get_or_init(|| Arc::new(Semaphore::new(FRAMES_IN_MEMORY)))
        .clone()
}

/// Takes up to `want` bytes of `budget`, as many as are free now (none
/// when it is spent); never waits. Given back when the permit is dropped;
/// [`OwnedSemaphorePermit::split`] keeps part of it.
pub fn hold_up_to(budget: &Arc<Semaphore>, want: u64) -> Option<OwnedSemaphorePermit> {
    // Another stream may take what was free between the two calls: then
    // look again (a few times; none is a valid answer).
    for _ in 0..3 {
        let n = budget
            .available_permits()
            .min(want.min(u32::MAX as u64) as usize);
        if let Ok(p) = budget.clone().try_acquire_many_owned(n as u32) {
            return Some(p);
        }
    }
    None
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` on the blocking pool once `work`'s bound lets it. `f` must not
/// wait for other blocking tasks (see the module docs).
pub async fn bounded<T: Send + 'static>(
    work: Work,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let _permit = work
        .slots()
        .acquire()
        .await
        .map_err(|e| Error::invalid(work.name(), format!("task slots closed: {e}")))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::invalid(work.name(), format!("task failed: {e}")))
}

/// Runs `there` on a thread of its own while `here` runs on this one, and
/// returns both results (`there`'s `Err` if it panicked). Where the host
/// gives no thread (a process or memory limit: `ulimit -u`, `TasksMax`,
/// `ulimit -v`), `there` runs here after `here`: `std::thread::scope`'s
/// `spawn` panicked then, and every snapshot over 1 MiB failed as if the
/// database were at fault while `/healthz` said 200 (black-box probe L29).
pub fn side_by_side<A: Send, B>(
    there: impl FnOnce() -> A + Send,
    here: impl FnOnce() -> B,
) -> (std::thread::Result<A>, B) {
    side_by_side_on(std::thread::Builder::new(), there, here)
}

/// [`side_by_side`] with `there`'s thread made by `thread`.
pub(crate) fn side_by_side_on<A: Send, B>(
    thread: std::thread::Builder,
    there: impl FnOnce() -> A + Send,
    here: impl FnOnce() -> B,
) -> (std::thread::Result<A>, B) {
    let slot = std::sync::Mutex::new(Some(there));
    let take = || slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    std::thread::scope(|s| {
        let spawned = thread.spawn_scoped(s, || take().map(|f| f()));
        let b = here();
        let a = match spawned {
            Ok(h) => h.join(),
            // No thread for it: it runs here.
            Err(_) => Ok(take().map(|f| f())),
        };
        // `there` ran exactly once, on one side or the other.
        (a.map(|a| a.expect("taken once")), b)
    })
}
