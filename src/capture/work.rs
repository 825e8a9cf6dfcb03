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

use std::sync::OnceLock;

use tokio::sync::Semaphore;

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
