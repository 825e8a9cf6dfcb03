//! The hot tier's WAL shipper: one per hot database, streaming committed WAL
//! frames into the generation layout of [`crate::replica::hot`].
//!
//! A [`Shipper`] owns one SQLite connection to the database and nothing of
//! the application's: three file descriptors (the database, `-wal` and
//! `-shm`; the WAL is also opened for each read of frames, and closed again).
//! It never writes to the database; it only holds a read transaction, takes
//! the WAL write lock for the span of a checkpoint, and runs checkpoints. The
//! rules it keeps, and why they leave no silent gap:
//!
//! * **Always hold a read transaction**, from the start of a generation to
//!   the stream's end, except inside our own checkpoint. SQLite cannot
//!   checkpoint frames past the oldest read mark in use, and cannot restart
//!   the WAL (write it again from the front) while a reader uses it. So while
//!   we read, every frame we have not copied yet stays in the WAL file. New
//!   frames are read from the `-wal` file directly, so the read transaction
//!   never needs to move except to let a checkpoint through.
//! * **Copy only committed frames**, validated by [`crate::capture::wal::read_committed`]
//!   (header salts and the checksum chain, cut after the last commit frame).
//!   Each sync's frames go up as one segment, in order; a failed upload is
//!   kept in memory and retried before anything else is read.
//! * **A WAL restart at the tip is continuity, anything else is a new
//!   generation.** Once a read reached the end of the valid frames and a read
//!   transaction has been held continuously since, the WAL can only be
//!   restarted if every frame in it had been checkpointed *and* none was
//!   appended after our read: a reader using the WAL (read mark > 0) blocks
//!   any restart, and a reader on the database file alone (read mark 0) blocks
//!   every checkpoint of frames appended after it began. So the old WAL ended
//!   exactly where we stopped reading, and the next WAL continues the same
//!   generation at index + 1, offset 32; its end is recorded in the
//!   generation's metadata. Any other change (salts changed without the tip,
//!   WAL truncated under a cursor, a frame overwritten, the database file
//!   replaced) means frames we never saw may be gone: we start a new
//!   generation with a fresh snapshot.
//! * **Our own checkpoints** keep the WAL bounded without the application's
//!   help. Above `checkpoint-pages` frames we take the WAL write lock
//!   (`ShmLock`: SQLite's own lock, taken on the `-shm` file through
//!   its VFS, giving up after [`WRITE_LOCK_WAIT`]), read the last frames
//!   (nothing can be appended now), end our read, run a PASSIVE checkpoint,
//!   begin a new read and release the lock. Writers wait for that span only:
//!   one checkpoint. Holding the lock ourselves, rather than through a second
//!   connection's `BEGIN IMMEDIATE`, is what lets one connection (three file
//!   descriptors) do it: SQLite cannot checkpoint on a connection that is
//!   inside a transaction. If every frame was checkpointed, the next writer
//!   restarts the WAL, which is a restart at the tip.
//! * Above `truncate-pages` we then also try `wal_checkpoint(TRUNCATE)` to
//!   give the file's space back. It needs the write lock itself, so for its
//!   span we hold neither lock nor read; `PRAGMA data_version` before and
//!   after tells whether any other connection committed meanwhile. If none
//!   did, every frame it removed was one we had read (a restart at the tip);
//!   if one did, its frames may have been truncated unseen, so the tip is
//!   forgotten and a WAL that moved on starts a new generation.
//!
//! A generation is renewed: once it is `snapshot-interval` old (a day by
//! default), the next sync ends it (recording where) and starts a new one
//! with a fresh snapshot, so a database that never goes cold does not keep
//! one generation, and its whole WAL history, for ever.
//!
//! Application checkpoints keep working: PASSIVE ones (including SQLite's
//! autocheckpoint) stop at our read mark; RESTART and TRUNCATE ones wait for
//! our reader like for any other and may report SQLITE_BUSY, as with
//! Litestream.
//!
//! A shipper is blocking code; [`stream`] drives one on tokio's blocking pool
//! every `sync-interval` and does the uploads. Every object is named with its
//! commit time (see [`crate::replica::hot`]): a segment's is taken just before
//! its WAL read, a snapshot's just after its copy.
//!
//! When syncs keep failing for `release-after` (the store is down), the
//! stream ends ([`HotExit::Released`]) and closes its connection: holding
//! the read transaction longer would let the application's WAL grow without
//! bound. The cold tier takes the database over; it streams again, in a new
//! generation, once the cold tier could upload it (the store is back). A database that fails `quick_check`
//! when a generation starts ends the stream at once
//! ([`HotExit::CannotStream`]) instead of being copied every sync.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use tempfile::{NamedTempFile, TempPath};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::capture::fleetlog::{FleetLog, Spool};
use crate::capture::wal::{
    self, Position, ReadOutcome, WalCursor, WalHeader, FRAME_HEADER_SIZE, WAL_HEADER_SIZE,
};
use crate::capture::work::{self, bounded, Work};
use crate::capture::{snapshot, upload};
use crate::error::IoContext;
use crate::replica::cold;
use crate::replica::hot::{self, GenerationId, Metadata};
use crate::replica::pack::{Part, WalOpening};
use crate::replica::storage::Replica;
use crate::source::config::MultiDb;
use crate::source::discover::{not_regular_error, shm_path, wal_path};
use crate::source::pin::Pinned;
use crate::source::shm::{ShmClaim, SourceFiles};
use crate::stats::Stats;
use crate::{Error, Result};

pub use crate::replica::hot::MAX_SEGMENT_BYTES;
/// Most bytes of committed frames a read holds in memory. A larger segment
/// (one transaction bigger than [`MAX_SEGMENT_BYTES`] allows for) is left
/// in the WAL file, which our read transaction keeps as it is, and streamed
/// from there into a staged file at upload, bypassing the fleet log (see
/// [`crate::capture::upload::upload_wal_segment`]). Before, a 200 MB
/// transaction cost ~630 MB of RSS (black-box probe): its frames, their
/// compressed copy and the fleet log object holding that copy.
pub const IN_MEMORY_SEGMENT_BYTES: u64 = 2 * MAX_SEGMENT_BYTES;

/// How much a WAL may grow between a read's `fstat` and the read, in the
/// room the read takes from the streams' common budget of frames in
/// memory ([`work::frames_budget`]): frames beyond the room are left in the
/// WAL and cost a segment object of their own, so a few commits' worth.
const WAL_GROWTH_ROOM: u64 = 1 << 20;

/// Parts of at most [`MAX_SEGMENT_BYTES`] one sync ships beyond its first
/// when the stream is behind its writer: with the first, 272 MiB a sync,
/// so a stream keeps up with a writer of up to that much per
/// `sync-interval` (more than a disk writes in a second), and a sync still
/// ends (the next one goes on).
pub const CATCH_UP_PARTS: usize = 16;
/// Attempts at starting a generation while the WAL keeps changing under
/// the start (see [`Shipper::begin_generation`]); then the stream's sync
/// fails and is tried again at the next one.
const GENERATION_STARTS: u32 = 3;
/// How long our checkpoint waits for the application's writer to finish its
/// transaction before trying again at the next sync. Short, because while we
/// wait for the write lock, nobody else can take it either.
pub const WRITE_LOCK_WAIT: Duration = Duration::from_millis(100);
/// Page cache of our connection, in pages. We read almost nothing through
/// SQLite (the WAL is read directly; a read transaction starts on page 1),
/// and 1000 hot databases must stay cheap. Below 3 SQLite also skips its
/// bulk allocation of cache room (see [`crate::capture::configure_sqlite`]).
const CACHE_PAGES: i64 = 2;

/// The hot tier knobs (see [`crate::source::config::MultiDb`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipConfig {
    pub sync_interval: Duration,
    pub checkpoint_pages: u64,
    pub truncate_pages: u64,
    /// Failing this long, a stream lets go of the database (see [`stream`]).
    pub release_after: Duration,
    /// With the fleet log: how often a stream's parts are consolidated into
    /// a pack of its own (see [`crate::capture::fleetlog`]).
    pub consolidate_every: Duration,
    /// A generation this old is ended and a new one started with a fresh
    /// snapshot (see [`crate::source::config::DEFAULT_SNAPSHOT_INTERVAL`]).
    pub snapshot_interval: Duration,
    /// Parts a sync ships beyond its first when the stream is behind its
    /// writer ([`CATCH_UP_PARTS`]); a stream's last sync ships all.
    pub catch_up_parts: usize,
}

impl ShipConfig {
    pub fn from_config(m: &MultiDb) -> ShipConfig {
        ShipConfig {
            sync_interval: m.sync_interval,
            checkpoint_pages: m.checkpoint_pages,
            truncate_pages: m.truncate_pages,
            release_after: m.release_after,
            consolidate_every: m.log_consolidate_interval,
            snapshot_interval: m.snapshot_interval,
            catch_up_parts: CATCH_UP_PARTS,
        }
    }
}

/// Where reading stands in the WAL.
#[derive(Debug, Clone, Copy)]
enum WalState {
    /// WAL `index` has no header yet (no WAL, or truncated by a checkpoint).
    Awaiting {
        index: u64,
    },
    Reading(WalCursor),
}

/// What a read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing new.
    Idle,
    /// New committed frames are waiting to be uploaded.
    Frames,
    /// Continuity is lost (the reason); a new generation is needed.
    Lost(String),
}

/// What [`Shipper::checkpoint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Frames in the WAL and frames checkpointed by the PASSIVE pass.
    pub log: i64,
    pub checkpointed: i64,
    /// Whether the WAL was also truncated.
    pub truncated: bool,
}

/// Frames read but not uploaded yet.
#[derive(Debug)]
pub enum Segment {
    /// Held in memory (at most [`IN_MEMORY_SEGMENT_BYTES`]).
    Frames(Frames),
    /// Left in the WAL file `wal` (still open): `frames` as read from `cursor`.
    InWal {
        wal: Arc<File>,
        cursor: WalCursor,
        frames: wal::Committed,
    },
}

/// Frames held in memory, with their share of the streams' common budget
/// ([`work::frames_budget`]), given back when they are dropped (shipped, or
/// their stream gone).
#[derive(Debug)]
pub struct Frames {
    bytes: Vec<u8>,
    _held: OwnedSemaphorePermit,
}

impl std::ops::Deref for Frames {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Segment {
    /// Bytes of frames.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Frames(b) => b.len() as u64,
            Segment::InWal { frames, .. } => frames.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The shipper of one hot database. See the module docs.
pub struct Shipper {
    db: PathBuf,
    /// The root of the pattern it was found below, if known (see
    /// [`Shipper::open_below`]).
    root: Option<PathBuf>,
    /// The database's directory, resolved when the stream began (see
    /// [`Shipper::reopen`]).
    dir: PathBuf,
    wal: PathBuf,
    key: String,
    /// Device and inode of the database when we opened it.
    ident: (u64, u64),
    /// Our only connection; holds the read transaction (see the module docs).
    conn: Connection,
    /// Where the frames a read keeps in memory take their bytes from
    /// ([`work::frames_budget`], shared by every stream).
    budget: Arc<Semaphore>,
    generation: Option<GenerationId>,
    meta: Option<Metadata>,
    /// What this stream knows of its `metadata.json` in the replica: the
    /// condition of the next write ([`hot::MetadataVersion`]).
    meta_version: hot::MetadataVersion,
    state: WalState,
    /// Frames read but not uploaded yet, and where they start.
    pending: Option<(Position, Segment)>,
    /// Continuity was lost while shipping (a segment left in the WAL
    /// changed before its upload): the next [`Shipper::read`] says so.
    lost: Option<String>,
    /// When the read of `pending` began: every frame in it had committed by
    /// then (its commit time, see [`crate::replica::hot`]).
    pending_time: DateTime<Utc>,
    /// The generation's snapshot, not uploaded yet.
    snapshot: Option<TempPath>,
    /// When the snapshot copy was complete (its commit time).
    snapshot_time: DateTime<Utc>,
    /// Where in WAL 0 of the generation the snapshot's state is (see
    /// [`crate::replica::hot::SnapshotEntry::covers`]).
    snapshot_covers: Option<u64>,
    /// The newest generation already in the replica (listed before a new
    /// one starts): a new id never sorts older than it, whatever the clock.
    newest: Option<GenerationId>,
    /// The last read reached the end of the valid frames and a read
    /// transaction has been held continuously since.
    tip: bool,
    /// Our read transaction is open. Every [`Shipper::read`] begins one
    /// first if it is not (after a failed checkpoint), and `tip` then only
    /// holds once a read after it reached the end.
    reading: bool,
    /// The last read stopped at [`MAX_SEGMENT_BYTES`] with more frames behind.
    cut_short: bool,
    /// The last [`Shipper::read`]'s lost continuity was the WAL's own (it
    /// restarted or was cut under our cursor), not the database's files
    /// (replaced, written over, side files swapped): only then is a
    /// generation start that saw it worth keeping (see
    /// [`Shipper::begin_generation`]).
    wal_lost: bool,
    /// `metadata.json` must be written by the end of this sync (a snapshot
    /// was shipped, the stream stops) or before the next segment if that
    /// starts a WAL.
    meta_dirty: bool,
    /// The metadata records a WAL restart (where a WAL ended, the next
    /// one's header) that the replica's `metadata.json` does not have yet.
    /// A restore must know it before it reads the first segment of the new
    /// WAL: through the fleet log, the part holding that segment carries it
    /// ([`crate::replica::pack::WalOpening`]) and the metadata is written at
    /// its next occasion; a segment object of its own needs the metadata
    /// written first.
    meta_behind: bool,
    /// The `-wal` and `-shm` our connection has open (device, inode), taken
    /// when it opened them: see [`Shipper::side_files_replaced`].
    side: Option<[(u64, u64); 2]>,
    /// Where our last checkpoint found the WAL wholly backfilled (and, if
    /// it wanted to, truncated nothing): until the WAL moves past it, a
    /// checkpoint again would do nothing but take the application's write
    /// lock (an idle database whose WAL stays above `checkpoint-pages`
    /// was checkpointed at every sync, ~5 a second at 200 ms).
    backfilled: Option<Position>,
    /// When the current generation started, by the runtime's clock (paused
    /// in tests): it is renewed `snapshot-interval` later (see [`sync`]).
    generation_started: Option<tokio::time::Instant>,
    /// The header's file format bytes when the connection opened (see
    /// [`Shipper::overwritten`]): besides 2/2, only these are SQLite's.
    opened_mode: Option<[u8; 2]>,
    /// The database file as our read transaction last saw it, to tell
    /// SQLite's writes to it from anyone else's (see
    /// [`Shipper::written_outside`]).
    file_seen: Option<FileSeen>,
    /// This process's claim on the `-shm` of `conn` (declared after it:
    /// released once the connection is closed).
    _shm: ShmClaim,
    /// The database's directory, pinned while `conn` (declared before it)
    /// lives: SQLite opens the side files there ([`crate::source::pin`]).
    _dir: Pinned,
}

/// The database file's size, modification and change times (ns), and the
/// WAL-index's checkpoint state read just before them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileSeen {
    index: crate::source::vfs::WalIndex,
    stat: (u64, i128, i128),
}

/// Size, mtime and ctime (ns) of the file at `path` itself.
fn file_times(path: &Path) -> std::io::Result<(u64, i128, i128)> {
    use crate::source::track::{ctime_nanos, mtime_nanos};
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.len(), mtime_nanos(&m), ctime_nanos(&m)))
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::sqlite(path, e)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn begin_read(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN DEFERRED")?;
    // A read transaction starts at its first read.
    let r = conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0));
    if r.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    r.map(|_| ())
}

fn end_read(conn: &Connection) -> rusqlite::Result<()> {
    if conn.is_autocommit() {
        Ok(())
    } else {
        conn.execute_batch("ROLLBACK")
    }
}

/// (device, inode) of the file at `path` itself: a link put there is
/// another file, never its target.
fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Opens the `-wal` at `path` for reading our frames: never through a link,
/// and without blocking on a FIFO (`O_NONBLOCK`, which a regular file
/// ignores). `Ok(None)` when there is none; an error naming what is there
/// when it is no regular file.
fn open_wal(path: &Path) -> Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            // ELOOP: a link; named by what the path holds.
            return Err(match std::fs::symlink_metadata(path) {
                Ok(m) if !m.file_type().is_file() => not_regular_error(path, &m),
                _ => Error::io(path, e),
            });
        }
    };
    let m = f.metadata().map_err(|e| Error::io(path, e))?;
    if !m.file_type().is_file() {
        return Err(not_regular_error(path, &m));
    }
    Ok(Some(f))
}

/// Turns off the connection's lookaside allocator: by default every
/// connection preallocates 1200 slots of 100 bytes (~120 KB), which for two
/// mostly idle connections per hot database would be most of its memory.
/// A speed optimisation for busy connections that ours are not.
fn disable_lookaside(conn: &Connection) {
    use rusqlite::ffi;
    // SAFETY: the handle is valid for `conn`'s lifetime, nothing else uses
    // it concurrently (we hold `&Connection`), and no statement has run yet,
    // so no lookaside memory is in use. A failure leaves the default.
    unsafe {
        ffi::sqlite3_db_config(
            conn.handle(),
            ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
}

/// Opens the stream's connection to `db` inside its pinned directory
/// ([`crate::source::pin`]), with the claim on its `-shm`
/// ([`crate::source::shm`]) and the pin, both of which must outlive it.
///
/// Pinned, SQLite's file, `-wal` and `-shm` are one directory's: a
/// directory of the path exchanged for another tree between the open and
/// the first read gave a connection on one tree's file with the other
/// tree's WAL, whose generation snapshots and WAL parts restored rows of
/// both trees, exit 0 (black-box probe N22c, both before and after the
/// cold tier's pin); its checkpoints would write one tree's frames into
/// the other's file.
///
/// Found below the pattern root `root`, it is opened only through real
/// directories from there ([`crate::source::pin::pin_below`]): the check
/// of [`Shipper::open_below`] alone left an instant before this open to a
/// directory swapped for a link.
fn open_conn(db: &Path, root: Option<&Path>) -> Result<(Connection, ShmClaim, Pinned)> {
    let dir = crate::source::pin::pin_below(root, db)?;
    // Only regular files: SQLite would open the `-wal` beside a link's
    // target while we read the one beside the link, and a FIFO blocks the
    // open (see `check_regular_files`).
    let files = crate::source::discover::check_regular_files_at(db, &dir)?;
    let shm = crate::source::shm::claim(db, files)?;
    // Read-write (a checkpoint needs it) but never create: a database deleted
    // under us must not come back as an empty file.
    let conn = dir
        .open(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| snapshot::open_failed(db, e))?;
    #[cfg(test)]
    tests::run(&tests::AFTER_OPEN);
    // Before any statement: the first read would delete the `-wal` of an
    // emptied file (see `snapshot::has_header`).
    if !snapshot::has_header(&conn, db)? {
        return Err(snapshot::no_header(db));
    }
    // SQLite's last connection to a WAL database checkpoints the WAL into
    // the file and deletes the `-wal` and `-shm` by name when it closes, if
    // it can lock the file. Ours must never: it would be our checkpoint of
    // the application's WAL at a moment nobody chose, and when the file was
    // replaced in place (same inode) since our read began, it writes the old
    // WAL's pages into the new file and deletes the new WAL, committed
    // writes and all. Our own checkpoints stay explicit, under the checks
    // of `Shipper::checkpoint`.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(sqlite(db))?;
    disable_lookaside(&conn);
    conn.busy_timeout(WRITE_LOCK_WAIT).map_err(sqlite(db))?;
    conn.pragma_update(None, "cache_size", CACHE_PAGES)
        .map_err(sqlite(db))?;
    Ok((conn, shm, dir))
}

/// Number of commit frames in `frames` (whole frames of `page_size` pages).
pub fn commit_frames(frames: &[u8], page_size: u32) -> u64 {
    let size = (FRAME_HEADER_SIZE + u64::from(page_size)) as usize;
    frames
        .chunks_exact(size)
        .filter(|f| f[4..8] != [0, 0, 0, 0])
        .count() as u64
}

/// True if `path` may stream: its header says WAL mode (bytes 18 and 19, the
/// file format read/write versions, are 2) and it or its `-wal` was written
/// within `recent` (a change seen now to a file last written an hour ago, e.g.
/// a restored or copied file, is not a busy database). Unreadable or short
/// files are `false`: the cold tier reports their errors.
pub fn stream_candidate(path: &Path, recent: Duration) -> bool {
    let mut header = [0u8; 20];
    // Through SQLite's VFS: a plain open and close here would drop the
    // locks this process's connections hold on the file.
    let wal_mode = crate::source::vfs::read_start(path, &mut header)
        .is_ok_and(|n| n == header.len() && header[18] == 2 && header[19] == 2);
    if !wal_mode {
        return false;
    }
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let newest = [path, Path::new(&wal)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max();
    newest.is_some_and(|t| t.elapsed().map_or(true, |age| age < recent))
}

impl Shipper {
    /// Opens `db` for streaming under `key`. Fails (and the database stays
    /// cold) if it is not in WAL mode.
    pub fn open(db: &Path, key: &str) -> Result<Shipper> {
        Self::open_in(db, key, None, None)
    }

    /// [`Shipper::open`] of a database found below the pattern root `root`:
    /// refused when a directory between them is no longer a directory of
    /// its own (see [`crate::source::discover::link_below`]); so is every
    /// reopen.
    pub fn open_below(db: &Path, key: &str, root: Option<&Path>) -> Result<Shipper> {
        Self::open_in(db, key, root, None)
    }

    /// [`Shipper::open`] again after lost continuity: refused when the
    /// database's directory now resolves elsewhere than when the stream
    /// began (a directory of its path replaced by a link, say to a tree
    /// outside the pattern root, which the scan never follows: black-box
    /// probe, the outside database was uploaded under this key and side
    /// files were created beside it). The old connection is closed first
    /// (see [`stream`]).
    pub fn reopen(self) -> Result<Shipper> {
        let (db, key, dir) = (self.db.clone(), self.key.clone(), self.dir.clone());
        let root = self.root.clone();
        drop(self);
        Self::open_in(&db, &key, root.as_deref(), Some(&dir))
    }

    fn open_in(
        db: &Path,
        key: &str,
        root: Option<&Path>,
        expect_dir: Option<&Path>,
    ) -> Result<Shipper> {
        crate::capture::configure_sqlite();
        // The open below refuses a link atomically (`pin::pin_below`); this
        // walk first names one on a reopen, where the comparison with the
        // directory at the stream's start would otherwise report it.
        crate::source::discover::check_no_link_below(root, db)?;
        let parent = db.parent().unwrap_or(Path::new("."));
        let dir = std::fs::canonicalize(parent).at(parent)?;
        if let Some(was) = expect_dir.filter(|&was| was != dir) {
            return Err(Error::invalid(
                db.display(),
                format!(
                    "its directory now resolves to {} (it was {} when the stream began): a directory \
                     of the path was replaced, perhaps by a link; not streamed from there",
                    dir.display(),
                    was.display()
                ),
            ));
        }
        let (conn, mut shm, pinned) = open_conn(db, root)?;
        #[cfg(test)]
        tests::run(&tests::AFTER_FIRST_READ);
        // The files SQLite opened: in the pinned directory, whatever the
        // path names now (each read compares the path's files with these).
        let ident = pinned.lstat("").at(db)?.id;
        if crate::source::vfs::VfsHandle::of(&conn).is_none_or(|f| f.has_moved().unwrap_or(true)) {
            return Err(Error::invalid(
                db.display(),
                "was replaced or renamed while the stream opened it; tried again later",
            ));
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(sqlite(db))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::invalid(
                db.display(),
                format!("journal_mode is {mode}, not wal: WAL streaming needs WAL mode; the database stays in the cold tier"),
            ));
        }
        // A stream takes SQLite's WAL-index locks, which need the `-shm`
        // writable: where litefleet may only read it (another user's
        // database), every generation start failed as if the application
        // held the write lock, every sync interval, and stops exited 1
        // (black-box probe Y32).
        let shm_path = {
            let mut p = db.as_os_str().to_owned();
            p.push("-shm");
            PathBuf::from(p)
        };
        if !may_write(&shm_path) {
            return Err(Error::invalid(shm_path.display(), SHM_NOT_WRITABLE));
        }
        // SQLite runs a file in WAL mode whenever a `-wal` is beside it,
        // whatever its header says: a database renamed over another one
        // beside the old `-wal` keeps its rollback header (1/1) until a
        // checkpoint rewrites page 1. That header is no sign of a file
        // written over in place (crash harness: every generation start
        // failed for seconds, each copying a full snapshot).
        let opened_mode = Self::format_bytes(&conn);
        // That read opened (or created) both side files; they stay open
        // while the connection is.
        let wal = wal_path(db);
        let shm_id = pinned.lstat("-shm").ok().map(|e| e.id);
        let side = match (pinned.lstat("-wal"), shm_id) {
            (Ok(w), Some(m)) => Some([w.id, m]),
            _ => None,
        };
        // The `-shm` SQLite opened is, as far as a `stat` can tell, the one
        // claimed (or, created by that read, claimed now).
        let now = SourceFiles {
            db: Some(ident),
            shm: shm_id,
        };
        shm.confirm(db, now)?;
        Ok(Shipper {
            db: db.to_path_buf(),
            root: root.map(Path::to_path_buf),
            dir,
            wal,
            key: key.to_string(),
            ident,
            conn,
            budget: work::frames_budget(),
            generation: None,
            meta: None,
            meta_version: hot::MetadataVersion::Absent,
            state: WalState::Awaiting { index: 0 },
            pending: None,
            lost: None,
            pending_time: DateTime::UNIX_EPOCH,
            snapshot: None,
            snapshot_time: DateTime::UNIX_EPOCH,
            snapshot_covers: None,
            newest: None,
            tip: false,
            reading: false,
            cut_short: false,
            wal_lost: false,
            meta_dirty: false,
            meta_behind: false,
            side,
            backfilled: None,
            generation_started: None,
            opened_mode,
            file_seen: None,
            _shm: shm,
            _dir: pinned,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn path(&self) -> &Path {
        &self.db
    }

    pub fn generation(&self) -> Option<&GenerationId> {
        self.generation.as_ref()
    }

    /// Frames read but not yet uploaded (or a snapshot not yet uploaded).
    pub fn has_unshipped(&self) -> bool {
        self.pending.is_some() || self.snapshot.is_some() || self.generation.is_none()
    }

    /// Everything committed when the last read began is uploaded: nothing is
    /// unshipped and that read was not cut short by [`MAX_SEGMENT_BYTES`].
    pub fn caught_up(&self) -> bool {
        !self.has_unshipped() && !self.cut_short
    }

    /// Where the next read starts.
    pub fn position(&self) -> Position {
        match self.state {
            WalState::Awaiting { index } => Position::start(index),
            WalState::Reading(c) => c.pos,
        }
    }

    /// Starts a new generation: a snapshot of the database as of a new read
    /// transaction (kept open), then the committed frames already in the WAL.
    /// Nothing is uploaded here; see [`stream`].
    ///
    /// Tried up to three times (`GENERATION_STARTS`) while the WAL changes under
    /// the start: when every frame was checkpointed as our read began (an
    /// application's PASSIVE checkpoint had just caught up), our read holds
    /// no frame, and a writer may restart the WAL between our read of its
    /// header and of its frames. That is no loss (the snapshot holds every
    /// frame of the old WAL), but the start failed and the stream waited a
    /// sync to start again (black-box probe: 4 of 20 streams started
    /// during application checkpoints did).
    ///
    /// `Ok(false)` when the database's files changed under the start (the
    /// file replaced, written over or its side files swapped: our
    /// connection may have copied another database, the one now at another
    /// path, with commits made there): nothing of the start is kept, no
    /// generation is begun, and the next [`Shipper::read`] reports the lost
    /// continuity, so the stream reopens the path and starts again. A
    /// start kept after such a change was uploaded later, and
    /// point-in-time restores returned another database's state, exit 0
    /// (black-box probe: two databases swapped by renames while hot).
    pub fn begin_generation(&mut self, tmp_dir: &Path) -> Result<bool> {
        let mut tries = 1;
        loop {
            match self.try_begin_generation(tmp_dir)? {
                Ok(true) => return Ok(true),
                Ok(false) => return Ok(false),
                Err(reason) if tries < GENERATION_STARTS => {
                    tracing::debug!(path = %self.db.display(), %reason, "the WAL changed while starting a generation; starting it again");
                    tries += 1;
                }
                Err(reason) => {
                    return Err(Error::invalid(
                        self.wal.display(),
                        format!("WAL changed while starting a generation: {reason}"),
                    ))
                }
            }
        }
    }

    /// One attempt of [`Shipper::begin_generation`]: `Ok(Err(why))` when
    /// the WAL changed under it, `Ok(Ok(false))`, with the start dropped,
    /// when the database's files did.
    fn try_begin_generation(
        &mut self,
        tmp_dir: &Path,
    ) -> Result<std::result::Result<bool, String>> {
        let db = self.db.clone();
        self.end_read()?;
        self.cut_short = false;
        self.pending = None;
        self.snapshot = None;
        self.generation = None;
        self.meta = None;
        // Where in the WAL our snapshot's state is: the WAL's committed end
        // as our read begins. Under SQLite's write lock nobody commits, so a
        // scan of the file then finds exactly that end; one scan before the
        // lock reads most of the WAL, so writers wait only for what was
        // committed since.
        let before = committed_end(&self.wal, None, None)?;
        let Some(lock) = ShmLock::wait(&self.conn, &db)? else {
            return Ok(Err("the application held SQLite's write lock".into()));
        };
        let under_lock = (|| -> Result<Option<(WalHeader, u64)>> {
            self.begin_read()?;
            Ok(committed_end(&self.wal, before, Some(&self.conn))?.map(|c| (c.1, c.0.pos.offset)))
        })();
        let released = lock.release();
        let at_read = under_lock?;
        released?;
        // The header read as our transaction began: the frames before
        // `covers` are in our snapshot (a replay checks but does not apply
        // them), later ones are newer.
        let header = at_read.map(|(h, _)| h);
        // With no WAL (no header: its application closed the database and
        // SQLite deleted it), WAL 0 is yet to come and every frame of it is
        // newer than the snapshot. Recorded as such: `None` is what earlier
        // versions wrote, and a restore whose first segments are long ones
        // (one transaction larger than a segment) refused the generation as
        // one of theirs (black-box probe R30).
        self.snapshot_covers = Some(at_read.map_or(WAL_HEADER_SIZE, |(_, end)| end));
        std::fs::create_dir_all(tmp_dir).at(tmp_dir)?;
        let copy = NamedTempFile::with_prefix_in(".hot.litefleet-", tmp_dir)
            .at(tmp_dir)?
            .into_temp_path();
        snapshot::backup_from(&self.conn, &db, &copy)?;
        #[cfg(test)]
        tests::run(&tests::AFTER_START_COPY);
        snapshot::check(&copy, "quick_check").map_err(|e| {
            Error::damaged(
                db.display(),
                format!("database is damaged, not starting a generation ({e})"),
            )
        })?;
        let page_size: u32 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sqlite(&db))?;
        let now = Utc::now();
        let id = hot::new_generation_id_after(now, self.newest.as_ref());
        // Never before the id's time, so the new generation's objects do not
        // sort before the older generation's on a clock that went back.
        self.snapshot_time = now.max(id.created());
        self.meta_version = hot::MetadataVersion::Absent;
        self.meta = Some(Metadata {
            generation: id.clone(),
            page_size,
            created: id.created(),
            first: Position::start(0),
            last: Position::start(0),
            snapshots: Vec::new(),
            wal_ends: Vec::new(),
            logged: false,
            wal_starts: Some(Vec::new()),
            written: None,
            key: Some(self.key.clone()),
        });
        self.generation = Some(id);
        self.snapshot = Some(copy);
        self.meta_dirty = true;
        self.state = match header {
            Some(h) => {
                let cur = WalCursor::at_start(0, &h);
                if let Some(m) = &mut self.meta {
                    m.record_wal_start(cur.wal_start());
                }
                WalState::Reading(cur)
            }
            None => WalState::Awaiting { index: 0 },
        };
        // The read checks, after the copy, that the path still holds the
        // file our connection has open, and its side files. A read that
        // fails proves neither (SQLite's "disk I/O error" when the `-shm`
        // was swapped): the start is dropped too, or the next sync would
        // upload it (black-box probe: a generation snapshot of the file
        // then at another path, restored with exit 0).
        let step = match self.read() {
            Ok(step) => step,
            Err(e) => {
                self.drop_start();
                return Err(e);
            }
        };
        match step {
            Step::Lost(reason) if self.wal_lost => Ok(Err(reason)),
            Step::Lost(reason) => {
                self.drop_start();
                self.lost = Some(reason);
                Ok(Ok(false))
            }
            _ => Ok(Ok(true)),
        }
    }

    /// Forgets a generation start: its snapshot (deleted), metadata and
    /// cursor; nothing of it is uploaded.
    fn drop_start(&mut self) {
        self.pending = None;
        self.snapshot = None;
        self.generation = None;
        self.meta = None;
        self.meta_dirty = false;
        self.meta_behind = false;
        self.state = WalState::Awaiting { index: 0 };
    }

    /// `Some(Step::Lost)` when the database file is gone or is another file
    /// (another inode) than the one we opened.
    fn replaced(&self) -> Result<Option<Step>> {
        match identity(&self.db) {
            Ok(id) if id == self.ident => Ok(None),
            Ok(_) => Ok(Some(Step::Lost("the database file was replaced".into()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Some(Step::Lost("the database file is gone".into())))
            }
            Err(e) => Err(Error::io(&self.db, e)),
        }
    }

    /// `Some(Step::Lost)` when the file we opened no longer starts with
    /// SQLite's header in WAL mode (file format versions 2 and 2, or the
    /// versions it had when our connection opened it, see
    /// `Shipper::opened_mode`): written over in place, same inode, which
    /// [`Shipper::replaced`] cannot see.
    /// While our read transaction is open nobody can take the database out
    /// of WAL mode (that needs the file exclusively), and a checkpoint
    /// rewrites page 1 with the same first 20 bytes, so anything else was
    /// not written by SQLite. Read through the connection's own handle
    /// (never a descriptor of ours; see [`crate::source::vfs`]): 20 bytes
    /// per sync.
    fn overwritten(&self) -> Result<Option<Step>> {
        let Some(file) = crate::source::vfs::VfsHandle::of(&self.conn) else {
            return Ok(None);
        };
        let mut head = [0u8; 20];
        let lost = |what: &str| Ok(Some(Step::Lost(format!("the database file {what}"))));
        match file.read_exact_at(&mut head, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return lost("was truncated under the stream")
            }
            Err(e) => return Err(Error::io(&self.db, e)),
        }
        if &head[..16] != b"SQLite format 3\0" {
            return lost("no longer starts with SQLite's header (written over in place)");
        }
        let mode = [head[18], head[19]];
        if mode != [2, 2] && Some(mode) != self.opened_mode {
            return lost("is no longer in WAL mode (written over in place)");
        }
        Ok(None)
    }

    /// The file format bytes (header offsets 18 and 19) of the database our
    /// connection opened, read through its own handle.
    fn format_bytes(conn: &Connection) -> Option<[u8; 2]> {
        let file = crate::source::vfs::VfsHandle::of(conn)?;
        let mut b = [0u8; 2];
        file.read_exact_at(&mut b, 18).ok()?;
        Some(b)
    }

    /// `Some(Step::Lost)` when the `-wal` or `-shm` at their paths are no
    /// longer the files our connection has open, given the `-wal` we just
    /// opened (`wal`). While a connection of ours is open SQLite never
    /// deletes or recreates them (a WAL restart rewrites the same `-wal`;
    /// only the last connection to close deletes them), so other files
    /// there mean the database was replaced or rolled back in place (its
    /// side files removed, another database copied over the same inode) and
    /// an application made new ones: a new WAL that only looks like a
    /// restart of ours, whose frames belong to another database, while our
    /// connection still reads the old WAL and WAL-index (black-box probe:
    /// restores mixed the two, and our checkpoint wrote old pages into the
    /// new file).
    fn side_files_replaced(&self, wal: Option<&File>) -> Result<Option<Step>> {
        let Some([ours_wal, ours_shm]) = self.side else {
            return Ok(None);
        };
        let lost = |what: &str| {
            Ok(Some(Step::Lost(format!(
                "the {what} was replaced (the database was replaced or rolled back in place)"
            ))))
        };
        let wal_now = match wal.map(File::metadata) {
            Some(Ok(m)) => Some((m.dev(), m.ino())),
            Some(Err(e)) => return Err(Error::io(&self.wal, e)),
            None => None,
        };
        if wal_now.is_some_and(|w| w != ours_wal) {
            return lost("-wal");
        }
        match identity(&shm_path(&self.db)) {
            Ok(m) if m == ours_shm => Ok(None),
            Ok(_) => lost("-shm (WAL-index)"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => lost("-shm (WAL-index)"),
            Err(e) => Err(Error::io(shm_path(&self.db), e)),
        }
    }

    /// Reads the committed frames after the current position into the
    /// pending segment. Does nothing while a segment is pending.
    pub fn read(&mut self) -> Result<Step> {
        self.wal_lost = false;
        #[cfg(test)]
        if tests::FAIL_START_READ.with(|f| f.take()) {
            return Err(Error::invalid(self.db.display(), "injected: read failed"));
        }
        if self.pending.is_some() {
            return Ok(Step::Frames);
        }
        if let Some(reason) = self.lost.take() {
            return Ok(Step::Lost(reason));
        }
        if let Some(lost) = self.replaced()? {
            return Ok(lost);
        }
        if let Some(lost) = self.overwritten()? {
            return Ok(lost);
        }
        let was_reading = self.reading;
        if !self.reading {
            // A checkpoint failed before our read was back. Frames written
            // since are protected from here on; a restart that happened
            // meanwhile is lost continuity (`tip` is unset).
            self.begin_read()?;
        }
        #[cfg(test)]
        tests::run(&tests::BETWEEN_CHECK_AND_OPEN);
        let file = match open_wal(&self.wal) {
            Ok(f) => f,
            // What SQLite never makes: another file put there.
            Err(Error::Invalid { reason, .. }) => {
                return Ok(Step::Lost(format!("the -wal {reason}")))
            }
            Err(e) => return Err(e),
        };
        // Replaced between the check above and the open: the WAL we hold may
        // be the new file's. Checked again now that it is open.
        if let Some(lost) = self.replaced()? {
            return Ok(lost);
        }
        if let Some(lost) = self.side_files_replaced(file.as_ref())? {
            return Ok(lost);
        }
        // (A read begun just now has just seen the file.)
        if was_reading {
            if let Some(lost) = self.written_outside()? {
                return Ok(lost);
            }
        }
        // At most three rounds: a restart at the tip moves to the next WAL
        // once (Reading -> Awaiting), its header starts a cursor (-> Reading)
        // and the frames already in it are read in the same sync.
        for _ in 0..3 {
            match self.state {
                WalState::Awaiting { index } => {
                    let Some(f) = &file else {
                        return Ok(Step::Idle);
                    };
                    let Some(h) = wal::read_header(f, &self.wal)? else {
                        return Ok(Step::Idle);
                    };
                    let cur = WalCursor::at_start(index, &h);
                    if let Some(m) = &mut self.meta {
                        // Recorded before the WAL's first segment is uploaded.
                        m.record_wal_start(cur.wal_start());
                    }
                    self.meta_behind = true;
                    self.state = WalState::Reading(cur);
                }
                WalState::Reading(cur) => {
                    let Some(f) = &file else {
                        return Ok(Step::Lost("the WAL file was deleted".into()));
                    };
                    #[cfg(test)]
                    tests::run(&tests::BEFORE_WAL_READ);
                    // Room in memory for the frames, from the streams'
                    // common budget: as much as is free, up to what the WAL
                    // holds after the cursor (and room for it to grow by a
                    // few commits meanwhile), at most IN_MEMORY_SEGMENT_BYTES.
                    // Frames beyond it are left in the WAL, like a
                    // transaction too large for memory.
                    let after = f
                        .metadata()
                        .at(&self.wal)?
                        .len()
                        .saturating_sub(cur.pos.offset);
                    let mut room = work::hold_up_to(
                        &self.budget,
                        after
                            .saturating_add(WAL_GROWTH_ROOM)
                            .min(IN_MEMORY_SEGMENT_BYTES),
                    );
                    let keep = room.as_ref().map_or(0, |r| r.num_permits() as u64);
                    // Only frames SQLite has published. While the index
                    // describes another WAL (restarted), no frame is read:
                    // the read only checks the file's continuity (a new
                    // header there is a restart), and leaves the tip as the
                    // last read left it.
                    let (published, other_wal) = match published_end(&self.conn, &cur, &self.wal)? {
                        Published::Upto(end) => (end, false),
                        Published::OtherWal => (cur.pos.offset, true),
                    };
                    let outcome = wal::read_committed_within(
                        f,
                        &self.wal,
                        &cur,
                        (MAX_SEGMENT_BYTES, published),
                        keep,
                    )?;
                    // The segment's commit time: taken once the read is
                    // done, so every transaction it holds had committed by
                    // then (a commit landing during the read is in it).
                    let read_at = Utc::now();
                    match outcome {
                        ReadOutcome::Frames {
                            bytes,
                            next,
                            committed,
                            in_file,
                        } => {
                            // A read cut short by the size limit is not the tip.
                            if !other_wal {
                                self.cut_short = committed.len() >= MAX_SEGMENT_BYTES;
                                self.tip = !self.cut_short;
                            }
                            if committed.is_empty() {
                                return Ok(Step::Idle);
                            }
                            // Frames written after a copy put over the
                            // file during the read belong to the copy.
                            if let Some(lost) = self.written_outside()? {
                                return Ok(lost);
                            }
                            // What the frames hold of the room; the rest
                            // goes back as `room` drops.
                            let held = match in_file {
                                true => None,
                                false => room.as_mut().and_then(|r| r.split(bytes.len())),
                            };
                            let segment = match held {
                                Some(held) => Segment::Frames(Frames { bytes, _held: held }),
                                None => Segment::InWal {
                                    wal: Arc::new(f.try_clone().at(&self.wal)?),
                                    cursor: cur,
                                    frames: committed,
                                },
                            };
                            self.pending = Some((cur.pos, segment));
                            // Never earlier than the previous segment's: a
                            // restore at a point in time relies on times
                            // growing with positions (`hot::plan`), also
                            // when this host's clock went back.
                            self.pending_time =
                                read_at.max(self.snapshot_time).max(self.pending_time);
                            self.state = WalState::Reading(next);
                            return Ok(Step::Frames);
                        }
                        ReadOutcome::Lost(lost) => {
                            let restarted = match &lost {
                                wal::Lost::Reset { .. } => true,
                                wal::Lost::Truncated { len, .. } => *len < WAL_HEADER_SIZE,
                                _ => false,
                            };
                            if !(self.tip && restarted) {
                                self.wal_lost = true;
                                return Ok(Step::Lost(lost.to_string()));
                            }
                            tracing::debug!(path = %self.db.display(), end = %cur.pos, "WAL restarted after our last frame; continuing in the next WAL");
                            if let Some(m) = &mut self.meta {
                                m.wal_ends.push(cur.pos);
                            }
                            self.meta_behind = true;
                            self.state = WalState::Awaiting {
                                index: cur.pos.index + 1,
                            };
                        }
                    }
                }
            }
        }
        Ok(Step::Idle)
    }

    /// The pending segment, taken for upload (put it back with
    /// [`Shipper::unshipped`] if the upload fails).
    pub fn take_pending(&mut self) -> Option<(Position, Segment)> {
        self.pending.take()
    }

    pub fn unshipped(&mut self, pos: Position, segment: Segment) {
        self.pending = Some((pos, segment));
    }

    /// After uploads: runs our own checkpoint when the WAL is large enough.
    pub fn advance(&mut self, cfg: &ShipConfig) -> Result<Option<CheckpointReport>> {
        if self.pending.is_some() {
            return Ok(None);
        }
        let WalState::Reading(cur) = self.state else {
            return Ok(None);
        };
        let frames = (cur.pos.offset - WAL_HEADER_SIZE) / cur.frame_size();
        if frames < cfg.checkpoint_pages || !self.tip || self.backfilled == Some(cur.pos) {
            return Ok(None);
        }
        self.checkpoint(frames >= cfg.truncate_pages)
    }

    /// Our checkpoint; see the module docs. `Ok(None)` when the application
    /// held the write lock longer than [`WRITE_LOCK_WAIT`] (try again later).
    /// Frames read under the lock are left pending.
    pub fn checkpoint(&mut self, truncate: bool) -> Result<Option<CheckpointReport>> {
        let db = self.db.clone();
        let Some(lock) = ShmLock::wait(&self.conn, &db)? else {
            return Ok(None);
        };
        let under_lock = (|| -> Result<Option<(i64, i64, i64, i64)>> {
            if let Step::Lost(_) = self.read()? {
                // Handled by the next sync, which starts a new generation.
                return Ok(None);
            }
            if !self.tip {
                // Cut short by MAX_SEGMENT_BYTES: frames we have not read
                // are in the WAL, and a checkpoint now would let the next
                // writer restart over them. The next sync reads on.
                return Ok(None);
            }
            if matches!(self.pending, Some((_, Segment::InWal { .. }))) {
                // Read just now but left in the WAL: the same, until the
                // next sync has uploaded them.
                return Ok(None);
            }
            self.end_read()?;
            let r = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                });
            // Our read must be back before the lock goes, whatever happened.
            #[cfg(test)]
            if tests::FAIL_READ_AFTER_CHECKPOINT.with(|f| f.take()) {
                return Err(Error::invalid(db.display(), "injected: read not resumed"));
            }
            self.begin_read()?;
            // Under the write lock nothing was appended or restarted while
            // our read was away: we still have every frame of the WAL.
            self.tip = true;
            let (busy, log, checkpointed) = r.map_err(sqlite(&db))?;
            // Read under the lock: nobody else can have committed since.
            let version = data_version(&self.conn).map_err(sqlite(&db))?;
            Ok(Some((busy, log, checkpointed, version)))
        })();
        if under_lock.is_err() {
            // Our read may not be back: a WAL restart seen later cannot be
            // trusted to be at our tip any more.
            self.tip = false;
        }
        let released = lock.release();
        let Some((busy, log, checkpointed, version)) = under_lock? else {
            released?;
            return Ok(None);
        };
        released?;
        let mut truncated = false;
        if truncate && busy == 0 && log == checkpointed {
            truncated = self.truncate(version)?;
        }
        self.backfilled = match self.state {
            WalState::Reading(cur) if busy == 0 && log == checkpointed && truncate == truncated => {
                Some(cur.pos)
            }
            _ => None,
        };
        Ok(Some(CheckpointReport {
            log,
            checkpointed,
            truncated,
        }))
    }

    /// `wal_checkpoint(TRUNCATE)`, right after our checkpoint backfilled
    /// every frame, all of which we had read; `version` is the
    /// `data_version` our read saw then. True if the WAL was truncated.
    fn truncate(&mut self, version: i64) -> Result<bool> {
        let db = self.db.clone();
        // TRUNCATE needs the write lock and no reader: ours must end. From
        // here until our next read, another connection could commit frames
        // that TRUNCATE then removes unseen.
        self.end_read()?;
        #[cfg(test)]
        tests::run(&tests::BEFORE_TRUNCATE);
        let r = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
        self.begin_read()?;
        let busy = match r {
            Ok(b) => b,
            Err(e) if is_busy(&e) => 1,
            Err(e) => return Err(Error::sqlite(&db, e)),
        };
        // Nobody else committed: every frame the WAL lost was one we had
        // read, and the read we hold now blocks the next restart as before.
        self.tip = data_version(&self.conn).map_err(sqlite(&db))? == version;
        Ok(busy == 0)
    }

    /// Releases our read transaction, as after an error: the next read
    /// cannot trust a WAL restart any more and starts a new generation if the
    /// WAL moved on without us.
    pub fn interrupt(&mut self) {
        let _ = self.end_read();
    }

    /// Begins our read transaction. Whatever happened to the WAL before it
    /// is unknown, so `tip` stays unset until a read reaches the end.
    fn begin_read(&mut self) -> Result<()> {
        self.tip = false;
        begin_read(&self.conn).map_err(sqlite(&self.db))?;
        self.reading = true;
        self.file_seen = self.see_file()?;
        Ok(())
    }

    /// The database file and the WAL-index's checkpoint state now: the
    /// index first, so a checkpoint that ends between the two reads shows
    /// as one that ended after both. `None` while the index cannot be read
    /// (a writer is changing it).
    fn see_file(&self) -> Result<Option<FileSeen>> {
        let Some(index) = crate::source::vfs::VfsHandle::of(&self.conn).and_then(|f| f.wal_index())
        else {
            return Ok(None);
        };
        match file_times(&self.db) {
            Ok(stat) => Ok(Some(FileSeen { index, stat })),
            // Gone or replaced: `replaced` says so.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&self.db, e)),
        }
    }

    /// `Some(Step::Lost)` when the database file was written since our read
    /// transaction began (or since the last checkpoint seen), other than by
    /// a checkpoint: copied over in place, same inode and a header SQLite
    /// could have written, which neither [`Shipper::replaced`] nor
    /// [`Shipper::overwritten`] can see (black-box probe: an older copy put
    /// back with `cp` while the application was stopped; the stream went
    /// on shipping the application's next frames on top of the old base,
    /// and the latest restore returned a state the database never had).
    ///
    /// While our read transaction is open, SQLite writes the database file
    /// only in a checkpoint, and a checkpoint copies only frames our read
    /// covers, then advances the WAL-index's `nBackfill` (all under the
    /// WAL-index's checkpoint lock; if our read uses no frame at all, no
    /// checkpoint writes the file: it needs the read lock we hold). So a
    /// change of the file's size, mtime or ctime with `nBackfill` not grown,
    /// in the same WAL, was made by something else. It is judged under the
    /// checkpoint lock, so a checkpoint half done is never taken for one;
    /// when an application's checkpoint holds that lock, the next sync
    /// looks again. Not seen: a write outside SQLite in the same interval as
    /// a checkpoint, or one that keeps size, mtime and ctime (only a clock
    /// set back can).
    fn written_outside(&mut self) -> Result<Option<Step>> {
        let Some(seen) = self.file_seen else {
            self.file_seen = self.see_file()?;
            return Ok(None);
        };
        match file_times(&self.db) {
            Ok(stat) if stat == seen.stat => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&self.db, e)),
        }
        let Some(lock) = ShmLock::try_take(&self.conn, &self.db, WAL_CKPT_LOCK)? else {
            return Ok(None);
        };
        let now = self.see_file();
        lock.release()?;
        let Some(now) = now? else {
            return Ok(None);
        };
        let checkpointed =
            now.index.salt == seen.index.salt && now.index.backfill > seen.index.backfill;
        if now.stat != seen.stat && !checkpointed {
            // A rename over the path shows here too when it lands between
            // `replaced`'s look and this one (probe D18: logged as a write
            // from outside).
            let why = match identity(&self.db) {
                Ok(id) if id == self.ident => {
                    "the database file was changed by something other than SQLite (a copy put over it in place, or its owner or mode changed)"
                }
                _ => "the database file was replaced (renamed over, or deleted) under the stream",
            };
            return Ok(Some(Step::Lost(why.into())));
        }
        self.file_seen = Some(now);
        Ok(None)
    }

    /// Ends our read transaction: from now on the WAL may restart under us.
    fn end_read(&mut self) -> Result<()> {
        self.tip = false;
        self.reading = false;
        end_read(&self.conn).map_err(sqlite(&self.db))
    }
}

/// `PRAGMA data_version`: changes between two calls on one connection if and
/// only if another connection committed in between.
/// The cursor at the committed end of the `-wal` at `wal` (numbered WAL 0)
/// and its header; `None` when there is no WAL yet. `from`: a cursor from
/// an earlier scan of the same WAL, to read on from (ignored if the WAL
/// was restarted since).
fn committed_end(
    wal: &Path,
    from: Option<(WalCursor, WalHeader)>,
    conn: Option<&Connection>,
) -> Result<Option<(WalCursor, WalHeader)>> {
    let Some(f) = open_wal(wal)? else {
        return Ok(None);
    };
    let Some(h) = wal::read_header(&f, wal)? else {
        return Ok(None);
    };
    let start = WalCursor::at_start(0, &h);
    // With `conn` (in a read transaction), only the frames its WAL-index
    // publishes ([`published_end`]). An index that describes another WAL
    // (restarted, every frame of this file in the database file) bounds
    // nothing: this file's frames are then all before the snapshot.
    let published = match conn.map(|c| published_end(c, &start, wal)).transpose()? {
        Some(Published::Upto(end)) => end,
        Some(Published::OtherWal) | None => u64::MAX,
    };
    for cur in [
        from.map(|(c, _)| c)
            .filter(|c| c.salt == h.salt && c.pos.offset <= published),
        Some(start),
    ]
    .into_iter()
    .flatten()
    {
        match wal::read_committed_within(&f, wal, &cur, (u64::MAX, published), 0)? {
            ReadOutcome::Frames { next, .. } => return Ok(Some((next, h))),
            ReadOutcome::Lost(_) => continue,
        }
    }
    Err(Error::invalid(
        wal.display(),
        "the WAL changed while its committed end was read",
    ))
}

/// What the WAL-index says of the WAL a cursor reads ([`published_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Published {
    /// Its published frames end at this byte of the file (`mxFrame`).
    Upto(u64),
    /// The index holds other salts: the WAL was restarted in the index
    /// (by a RESTART or TRUNCATE checkpoint, or a writer about to write
    /// the new header), so none of the file's frames after the ones the
    /// database file holds is published.
    OtherWal,
}

/// Reads of the WAL-index header [`published_end`] takes while its two
/// copies disagree (a writer is changing it; SQLite's readers retry too)
/// before it fails: a header is written in microseconds.
const INDEX_READS: u32 = 64;

/// Where the frames SQLite has published end in the WAL `cur` reads: the
/// WAL-index's `mxFrame`, as `conn` (inside a read transaction) maps it.
/// Frames after it are not committed, even where the checksum chain holds
/// and the last is a commit frame: a writer writes its frames first and
/// publishes them in the index after, and one killed between the two
/// leaves frames that no reader sees and the next writer overwrites
/// (black-box probe T31: shipped, they restored as a transaction that
/// never happened; see [`wal::read_committed_within`]).
fn published_end(conn: &Connection, cur: &WalCursor, wal: &Path) -> Result<Published> {
    for attempt in 0..INDEX_READS {
        let index = crate::source::vfs::VfsHandle::of(conn).and_then(|f| f.wal_index());
        if let Some(i) = index {
            return Ok(match i.header_salts() == cur.salt {
                true => {
                    Published::Upto(WAL_HEADER_SIZE + u64::from(i.max_frame) * cur.frame_size())
                }
                false => Published::OtherWal,
            });
        }
        if attempt < 8 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    Err(Error::invalid(
        wal.display(),
        "the header of its WAL-index (-shm) could not be read (its two copies kept disagreeing): \
         nothing is read from the WAL until it can",
    ))
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
}

/// One of SQLite's WAL-index locks on a database, held without a
/// transaction: the write lock, or for a moment the checkpoint lock (see
/// [`Shipper::written_outside`]).
///
/// The write lock is the lock `BEGIN IMMEDIATE` takes in WAL mode (lock 0 of the
/// `-shm` file's eight, `WAL_WRITE_LOCK` in SQLite's WAL-index format), taken
/// through the connection's VFS (`xShmLock`), so SQLite in every process
/// honours it and the connection stays free to end and begin reads and to
/// checkpoint while we hold it. SQLite's own connection does not know we
/// hold it; nothing it does under our lock (ending and beginning a read, a
/// PASSIVE checkpoint) takes this lock, and if it ever tried (recovering a
/// damaged WAL-index) it would get SQLITE_BUSY, not a deadlock.
struct ShmLock {
    file: *mut rusqlite::ffi::sqlite3_file,
    /// Which of the WAL-index's locks ([`WAL_WRITE_LOCK`], [`WAL_CKPT_LOCK`]).
    index: std::ffi::c_int,
    lock: unsafe extern "C" fn(
        *mut rusqlite::ffi::sqlite3_file,
        std::ffi::c_int,
        std::ffi::c_int,
        std::ffi::c_int,
    ) -> std::ffi::c_int,
    released: bool,
}

/// `WAL_WRITE_LOCK`: index 0 of the WAL-index locks (SQLite's file format,
/// <https://www.sqlite.org/walformat.html>).
const WAL_WRITE_LOCK: std::ffi::c_int = 0;
/// `WAL_CKPT_LOCK`: index 1, held by a checkpoint from before it writes the
/// database file until it has advanced `nBackfill`.
const WAL_CKPT_LOCK: std::ffi::c_int = 1;
/// Pause between two attempts at the write lock: SQLite's own busy handler
/// starts at 1 ms too.
const WRITE_LOCK_POLL: Duration = Duration::from_millis(1);

impl ShmLock {
    /// Takes the write lock, trying for up to [`WRITE_LOCK_WAIT`]; `None` if
    /// the application held it all that time. `conn` must have read the database
    /// in WAL mode already (its `-shm` is open) and must outlive the lock.
    fn wait(conn: &Connection, db: &Path) -> Result<Option<ShmLock>> {
        ShmLock::take(conn, db, WAL_WRITE_LOCK, WRITE_LOCK_WAIT)
    }

    /// Lock `index` if it is free now; `None` if someone holds it.
    fn try_take(conn: &Connection, db: &Path, index: std::ffi::c_int) -> Result<Option<ShmLock>> {
        ShmLock::take(conn, db, index, Duration::ZERO)
    }

    fn take(
        conn: &Connection,
        db: &Path,
        index: std::ffi::c_int,
        wait: Duration,
    ) -> Result<Option<ShmLock>> {
        use rusqlite::ffi;
        let shm_lock = crate::source::vfs::VfsHandle::of(conn)
            .and_then(|f| Some((f.raw(), f.shm()?.xShmLock?)));
        let Some((file, lock)) = shm_lock else {
            return Err(Error::invalid(
                db.display(),
                "the SQLite VFS has no shared-memory locks; WAL streaming needs them",
            ));
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            // SAFETY: as above; SQLite serialises lock calls on the
            // shared-memory node itself.
            let rc = unsafe {
                lock(
                    file,
                    index,
                    1,
                    ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE,
                )
            };
            match rc {
                ffi::SQLITE_OK => {
                    return Ok(Some(ShmLock {
                        file,
                        index,
                        lock,
                        released: false,
                    }))
                }
                ffi::SQLITE_BUSY if std::time::Instant::now() < deadline => {
                    std::thread::sleep(WRITE_LOCK_POLL)
                }
                ffi::SQLITE_BUSY => return Ok(None),
                rc => {
                    return Err(Error::sqlite(
                        db,
                        rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None),
                    ))
                }
            }
        }
    }

    fn unlock(&mut self) -> std::ffi::c_int {
        use rusqlite::ffi;
        if self.released {
            return ffi::SQLITE_OK;
        }
        self.released = true;
        // SAFETY: taken by `wait` on this file, which is still open.
        unsafe {
            (self.lock)(
                self.file,
                self.index,
                1,
                ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE,
            )
        }
    }

    fn release(mut self) -> Result<()> {
        match self.unlock() {
            rusqlite::ffi::SQLITE_OK => Ok(()),
            rc => Err(Error::invalid(
                format!("WAL-index lock {}", self.index),
                format!("releasing it failed (SQLite code {rc})"),
            )),
        }
    }
}

impl Drop for ShmLock {
    fn drop(&mut self) {
        let _ = self.unlock();
    }
}

/// One event per uploaded snapshot or segment, for the lag benchmark and
/// tests that wait for a sync instead of sleeping.
#[derive(Debug, Clone, Copy)]
pub struct ShipEvent {
    /// The `tag` passed to [`stream`].
    pub tag: u64,
    /// Commit frames (transactions) in the segment; 0 for a snapshot.
    pub commits: u64,
    /// A generation snapshot (rather than a WAL segment) was uploaded.
    pub snapshot: bool,
    pub at: std::time::Instant,
}

/// What [`stream`] needs besides the database.
pub struct HotContext {
    pub replica: Replica,
    pub temp_dir: PathBuf,
    pub cfg: ShipConfig,
    pub stats: Arc<Stats>,
    /// Shared with the cold tier's uploads: `max-concurrent` in all.
    pub permits: Arc<Semaphore>,
    /// Memory the streams' consolidations hold at once, in bytes:
    /// [`crate::capture::fleetlog::consolidation_budget`] in the daemon.
    pub consolidation: Arc<Semaphore>,
    pub events: Option<tokio::sync::mpsc::UnboundedSender<ShipEvent>>,
    /// The fleet log: when set, streams sync at its ticks and append their
    /// segments to it instead of writing one object each.
    pub log: Option<Arc<FleetLog>>,
}

/// A stream's place in the fleet log.
struct LogStream {
    log: Arc<FleetLog>,
    id: u64,
    ticks: tokio::sync::watch::Receiver<u64>,
    /// The tick being served.
    tick: u64,
    spool: Spool,
}

impl LogStream {
    fn open(ctx: &HotContext, key: &str) -> Option<LogStream> {
        let log = ctx.log.clone()?;
        let id = log.register();
        let dir = ctx.temp_dir.join(".litefleet-spool");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the fleet log spool directory");
        }
        let spool = Spool::new(dir.join(format!("{}-{id}.spool", std::process::id())), key);
        Some(LogStream {
            ticks: log.ticks(),
            tick: 0,
            log,
            id,
            spool,
        })
    }
}

/// Writes a stream's spooled parts as a pack of its own and releases their
/// log objects, once `room` lets it take the memory it needs
/// ([`crate::capture::fleetlog::consolidation_budget`]).
async fn consolidate(ctx: &HotContext, ls: &mut LogStream, room: Room) -> Result<Consolidation> {
    consolidate_with(
        (&ctx.replica, &ctx.permits, &ctx.consolidation, &ctx.stats),
        ls,
        room,
    )
    .await
}

/// How a consolidation takes its memory from [`crate::capture::fleetlog::consolidation_budget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Waits until enough is free: at a stream's end or its generation's
    /// change (which must not go on without it), and in the background.
    Wait,
    /// Only if enough is free now, else [`Consolidation::NoRoom`]: a
    /// consolidation that is due by the clock, whose stream must not stop
    /// syncing while others consolidate (it tries again at the next tick).
    IfFree,
}

/// What [`consolidate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consolidation {
    /// A pack was written; the log objects of its parts are released.
    Written,
    /// Nothing to write: an empty spool.
    Nothing,
    /// Not now: [`Room::IfFree`] found too little of the budget free.
    NoRoom,
    /// The spool is broken and could not be rebuilt yet (it cannot be
    /// written: see [`Spool::rebuild`]): its parts stay in the log.
    Broken,
}

/// [`consolidate`] with the context's replica, upload permits and stats
/// (for [`consolidate_later`]'s task, which outlives the stream's borrow of
/// the context).
async fn consolidate_with(
    (replica, permits, budget, stats): (&Replica, &Semaphore, &Semaphore, &Stats),
    ls: &mut LogStream,
    room: Room,
) -> Result<Consolidation> {
    if ls.spool.is_empty() {
        return Ok(Consolidation::Nothing);
    }
    // The memory first, then the upload slot (which cold uploads hold
    // without waiting for memory): always in this order, so no two wait
    // on each other.
    let need = ls.spool.memory();
    let _memory = match room {
        Room::Wait => budget.acquire_many(need).await.ok(),
        Room::IfFree => match budget.try_acquire_many(need) {
            Ok(p) => Some(p),
            Err(_) => return Ok(Consolidation::NoRoom),
        },
    };
    let _permit = permits.acquire().await;
    if let (true, Some((from, upto))) = (ls.spool.is_broken(), ls.spool.span()) {
        // A part it could not spool: read its parts back from the log.
        let held = ls.log.held(from, upto).await?;
        ls.spool.rebuild(replica, held).await?;
        if ls.spool.is_broken() {
            return Ok(Consolidation::Broken);
        }
    }
    let Some(upto) = ls.spool.consolidate(replica).await? else {
        return Ok(Consolidation::Nothing);
    };
    stats.log_packs.fetch_add(1, Ordering::Relaxed);
    ls.log.consolidated(ls.id, upto);
    Ok(Consolidation::Written)
}

/// Ticks between two tries of [`consolidate_later`], at most: its waits
/// double from one tick up to this (about a minute at the 1 s default).
const LATER_TICKS_MAX: u32 = 64;

/// Consolidates in the background the spool of a stream that could not
/// consolidate it itself (the store failed as the stream ended, or as its
/// generation changed), trying again at growing intervals of fleet log
/// ticks until it is written or the daemon stops (a restart then rewrites
/// the log objects, see [`crate::capture::fleetlog::recover`]). The stream
/// no longer uses `ls.id`, so the pack releases exactly the log objects
/// holding these parts. Before, the parts were abandoned: their log
/// objects stayed until the next restart, up to `log-consolidate-interval`
/// of them per such end, read by every restore of the key (black-box probe
/// O30: a store stall as a stream ended by `cold-after`).
fn consolidate_later(ctx: &HotContext, mut ls: LogStream) {
    let (replica, permits, budget, stats) = (
        ctx.replica.clone(),
        ctx.permits.clone(),
        ctx.consolidation.clone(),
        ctx.stats.clone(),
    );
    if ls.spool.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut wait = 1;
        loop {
            for _ in 0..wait {
                // The writer has stopped: the daemon is stopping.
                if ls.ticks.changed().await.is_err() {
                    return;
                }
            }
            match consolidate_with((&replica, &permits, &budget, &stats), &mut ls, Room::Wait).await
            {
                Ok(Consolidation::Written) => {
                    tracing::info!(
                        key = ls.spool.key(),
                        "consolidated the fleet log parts of an ended stream"
                    );
                    return;
                }
                Ok(Consolidation::Nothing | Consolidation::NoRoom) => return,
                Ok(Consolidation::Broken) => {
                    wait = (wait * 2).min(LATER_TICKS_MAX);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot consolidate an ended stream's fleet log parts yet");
                    wait = (wait * 2).min(LATER_TICKS_MAX);
                }
            }
        }
    });
}

/// Appends one segment to the fleet log and keeps it for consolidation.
async fn log_segment(
    ctx: &HotContext,
    ls: &mut LogStream,
    key: &str,
    gen: &GenerationId,
    (pos, opens): (Position, Option<WalOpening>),
    committed: DateTime<Utc>,
    frames: &[u8],
) -> Result<()> {
    if ls.spool.generation().is_some_and(|g| g != gen.as_str()) {
        // The previous generation's parts go into its own pack first.
        if let Err(e) = consolidate(ctx, ls, Room::Wait).await {
            tracing::warn!(key, error = %e, "cannot consolidate the previous generation's fleet log parts yet; they stay in the log and are tried again in the background");
            // The stream goes on under a new id with an empty spool: the
            // old id's objects are released only by the old spool's pack.
            match LogStream::open(ctx, key) {
                Some(mut fresh) => {
                    fresh.tick = ls.tick;
                    fresh.ticks = ls.ticks.clone();
                    let old = std::mem::replace(ls, fresh);
                    old.log.unregister(old.id);
                    consolidate_later(ctx, old);
                }
                None => ls.spool.abandon(),
            }
        }
    }
    let compressed = bytes::Bytes::from(upload::compress_segment(key, pos, frames)?);
    let part = Part {
        opens,
        ..Part::new(
            key,
            gen.as_str(),
            pos.index,
            pos.offset,
            committed,
            compressed.len() as u64,
        )
    };
    let seq = ls
        .log
        .append(ls.id, ls.tick, part.clone(), compressed.clone())
        .await?;
    ls.spool.add(&part, &compressed, seq);
    Ok(())
}

/// Why a database cannot stream when litefleet may not write its `-shm`
/// (see [`cannot_write_shm`]).
const SHM_NOT_WRITABLE: &str = "litefleet may not write it (permission denied), and a stream needs SQLite's WAL-index write lock: the database stays in the cold tier (run litefleet as a user that may write the database's side files to stream it)";

/// The stream could not start because litefleet may not write the
/// database's `-shm`: it never will until the files' permissions change,
/// so the database is kept cold for `cold-after`, not offered again at once.
pub fn cannot_write_shm(e: &Error) -> bool {
    matches!(e, Error::Invalid { reason, .. } if reason == SHM_NOT_WRITABLE)
}

/// Whether this process may write `path` (`faccessat` with the effective
/// ids; never opens it, which would drop this process's SQLite locks on
/// it). A path that does not exist yet may be.
fn may_write(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: a valid NUL-terminated path; no memory is handed over.
    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::W_OK, libc::AT_EACCESS) };
    if rc == 0 {
        return true;
    }
    let errno = std::io::Error::last_os_error().raw_os_error();
    !matches!(errno, Some(libc::EACCES | libc::EROFS | libc::EPERM))
}

/// How a [`stream`] ended.
#[derive(Debug)]
pub enum HotExit {
    /// Everything read was shipped.
    Clean,
    /// Something was not shipped (uploads failing at shutdown): the caller
    /// must let the cold tier upload a snapshot.
    Unshipped,
    /// The database cannot be streamed (not WAL mode, unreadable).
    CannotStream(Error),
    /// Syncs kept failing for `release-after` (the store is down), so the
    /// stream let go; like [`HotExit::Unshipped`], and the database must not
    /// stream again until the cold tier could upload it.
    Released,
}

/// Runs `f` on the shipper in `slot` (see [`bounded`]).
async fn blocking<T: Send + 'static>(
    slot: &mut Option<Shipper>,
    work: Work,
    f: impl FnOnce(&mut Shipper) -> T + Send + 'static,
) -> Result<T> {
    let Some(mut s) = slot.take() else {
        return Err(Error::invalid(
            "hot tier",
            "shipper lost after a failed task",
        ));
    };
    let (s, r) = bounded(work, move || {
        let r = f(&mut s);
        (s, r)
    })
    .await?;
    *slot = Some(s);
    Ok(r)
}

/// A point on a process-wide monotonic clock, in nanoseconds; only compared
/// with other stamps (see [`StreamProgress`]).
pub fn stamp() -> u64 {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    // Saturates after 584 years of uptime.
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What a running [`stream`] tells its owner without being asked: up to when
/// everything the database had committed is in the replica. The scheduler
/// marks a hot database synced only through this (see
/// [`crate::daemon::scheduler`]), so a stream that has not shipped yet, or keeps
/// failing, never makes a database look backed up, in memory or in the state
/// file.
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// [`stamp`] taken before the start of the last sync that read the WAL to
    /// its end and left nothing unshipped (+1, so 0 means "never").
    clean: AtomicU64,
    /// The last sync failed.
    failing: AtomicBool,
    /// The fingerprint ([`crate::source::track::fingerprint_with`]) the
    /// database's files had right after the checkpoint at the stream's end
    /// ([`hand_back`]); 0 when there was none.
    left: AtomicU64,
}

impl StreamProgress {
    /// The fingerprint the database's files had right after our checkpoint
    /// at the stream's end, if it ran: a change to exactly that is ours, no
    /// write of the application's, and must not make the database hot
    /// again (black-box probe V31: every stream ended by `cold-after`
    /// started a new generation at once, with a full snapshot, on its own
    /// checkpoint's change).
    pub fn left_by_checkpoint(&self) -> Option<u64> {
        Some(self.left.load(Ordering::Acquire)).filter(|f| *f != 0)
    }

    /// True when every transaction committed before `since` (a [`stamp`]) has
    /// been uploaded.
    pub fn shipped_since(&self, since: u64) -> bool {
        self.clean.load(Ordering::Acquire) > since
    }

    /// True while the stream's syncs fail (uploads, reads): the cold tier
    /// should not count on it.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }
}

/// Streams `db` until `stop` is cancelled, syncing every `sync-interval`; the
/// last sync runs after `stop`, so a demoted or shut-down database leaves
/// nothing behind. `tag` identifies it in [`ShipEvent`]s.
pub async fn stream(
    ctx: Arc<HotContext>,
    tag: u64,
    db: PathBuf,
    key: String,
    stop: CancellationToken,
) -> HotExit {
    stream_reporting(ctx, tag, db, None, key, stop, Arc::default()).await
}

/// [`stream`], reporting what has been shipped through `progress`.
/// `root`: the root of the pattern `db` was found below (see
/// [`Shipper::open_below`]).
pub async fn stream_reporting(
    ctx: Arc<HotContext>,
    tag: u64,
    db: PathBuf,
    root: Option<PathBuf>,
    key: String,
    stop: CancellationToken,
    progress: Arc<StreamProgress>,
) -> HotExit {
    let (d, k) = (db.clone(), key.clone());
    let opened = bounded(Work::Start, move || {
        Shipper::open_below(&d, &k, root.as_deref())
    })
    .await;
    let mut slot = match opened {
        Ok(Ok(s)) => Some(s),
        // Deleted (or renamed away) since it was found: nothing to stream,
        // and nothing that stops a database created at this path next from
        // streaming. `CannotStream` would keep the path cold for
        // `cold-after` (probe E: a database re-created at once stayed cold
        // for ~20 s while written); the cold tier and the scan deal with it.
        Ok(Err(_)) | Err(_)
            if std::fs::symlink_metadata(&db)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
        {
            return HotExit::Unshipped
        }
        Ok(Err(e)) | Err(e) => return HotExit::CannotStream(e),
    };
    // Without the fleet log each stream syncs on a timer of its own. The
    // first sync runs now; the next ones at the stream's phase of the
    // interval, so streams started in one pass (a daemon starting with its
    // hot databases) sync spread evenly over it, not all at once.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + next_sync_slot(ctx.cfg.sync_interval),
        ctx.cfg.sync_interval,
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut first = true;
    let mut ls = LogStream::open(&ctx, &key);
    let mut failing = false;
    let mut failing_since: Option<tokio::time::Instant> = None;
    // The stream's last sync failed: whatever it read or not, it did not
    // ship all the WAL holds.
    let mut last_failed = false;
    loop {
        match ls.as_mut() {
            None if std::mem::take(&mut first) => {}
            Some(l) => tokio::select! {
                _ = stop.cancelled() => {}
                r = l.ticks.changed() => match r {
                    Ok(()) => l.tick = *l.ticks.borrow_and_update(),
                    // The writer is gone: only the stop is left to wait for.
                    Err(_) => stop.cancelled().await,
                },
            },
            None => tokio::select! {
                _ = stop.cancelled() => {}
                _ = tick.tick() => {}
            },
        }
        let last = stop.is_cancelled();
        if last {
            // Record where the generation ends.
            if let Some(s) = slot.as_mut() {
                s.meta_dirty = true;
            }
        }
        let started = stamp();
        let r = sync(&ctx, tag, &mut slot, &mut ls, !last).await;
        if let Some(l) = &ls {
            l.log.synced(l.id, l.tick);
        }
        let r = match (r, ls.as_mut()) {
            (Ok(()), Some(l)) if l.spool.due(ctx.cfg.consolidate_every) && !last => {
                // Without room now, the next tick tries again.
                consolidate(&ctx, l, Room::IfFree).await.map(|_| ())
            }
            (r, _) => r,
        };
        match r {
            Ok(()) => {
                failing_since = None;
                progress.failing.store(false, Ordering::Release);
                if slot.as_ref().is_some_and(|s| s.caught_up()) {
                    progress.clean.fetch_max(started + 1, Ordering::AcqRel);
                }
                if std::mem::take(&mut failing) {
                    tracing::info!(path = %db.display(), "WAL streaming recovered");
                }
            }
            Err(e @ Error::Damaged { .. }) => {
                // A damaged database would be copied again every sync
                // interval: hand it to the cold tier, which checks it once
                // per scan and logs the damage.
                progress.failing.store(true, Ordering::Release);
                ctx.stats.hot_errors.fetch_add(1, Ordering::Relaxed);
                close_log(&ctx, &mut ls, &mut slot).await;
                return HotExit::CannotStream(e);
            }
            Err(e) => {
                progress.failing.store(true, Ordering::Release);
                ctx.stats.hot_errors.fetch_add(1, Ordering::Relaxed);
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if !last && since.elapsed() >= ctx.cfg.release_after {
                    tracing::warn!(path = %db.display(), error = %e, after = ?ctx.cfg.release_after,
                        "WAL syncs kept failing: releasing the database (its WAL can be checkpointed again); \
                         it goes back to the cold tier and streams in a new generation once the cold tier could upload it (the error says why the syncs failed)");
                    close_log(&ctx, &mut ls, &mut slot).await;
                    hand_back(slot, &progress).await;
                    return HotExit::Released;
                }
                if slot.is_none() {
                    // No shipper left to retry with (its reopen after lost
                    // continuity failed: the file is gone, or no longer
                    // one it can stream; probe M29: "retrying every sync
                    // interval" was logged for a file that had become a
                    // rollback-journal database).
                    tracing::info!(path = %db.display(), error = %e, "WAL streaming ended: the database goes back to the cold tier, which uploads it");
                    close_log(&ctx, &mut ls, &mut slot).await;
                    return HotExit::Unshipped;
                }
                if last {
                    // Nothing retries it: the database goes to the cold
                    // tier (black-box probe O30: "retrying" was logged
                    // for streams that had ended).
                    last_failed = true;
                    tracing::warn!(path = %db.display(), error = %e, "the last WAL sync of an ending stream failed; the cold tier uploads what it did not ship");
                } else if std::mem::replace(&mut failing, true) {
                    tracing::debug!(path = %db.display(), error = %e, "WAL sync failed again");
                } else {
                    tracing::warn!(path = %db.display(), error = %e, "WAL sync failed; retrying every sync interval (logged once until it recovers)");
                }
            }
        }
        if last {
            break;
        }
    }
    close_log(&ctx, &mut ls, &mut slot).await;
    // A last sync that failed before it read the WAL's newest frames (its
    // metadata write, say) left nothing read unshipped, and the stream
    // ended "clean": the stop exited 0 with those commits missing from the
    // replica (black-box probe Z32, a `file://` replica read-only at the
    // stop).
    let exit = match &slot {
        Some(s) if !last_failed && !s.has_unshipped() => HotExit::Clean,
        _ => HotExit::Unshipped,
    };
    hand_back(slot, &progress).await;
    exit
}

/// At a stream's end: the WAL is checkpointed into the database file and
/// truncated (`wal_checkpoint(TRUNCATE)`, after our read ends) where no
/// other connection uses it, as the application's last close would have
/// done had our read not held it back, and our connection closed. Without
/// it the commits made while the database was hot stayed in its `-wal` for
/// good after its application closed it (our connection closes without
/// checkpointing, see [`crate::source::pin`]), past the stream's end and a
/// clean stop: a copy of the `.db` alone held none of them, and a leftover
/// `-wal` deleted by hand took them away (black-box probe T31, F1). The
/// database's next stream starts a new generation, and the cold tier
/// uploads the file as it is then, so nothing here is shipped. A
/// checkpoint that finds the database busy is left to its application.
async fn hand_back(slot: Option<Shipper>, progress: &StreamProgress) {
    let Some(mut s) = slot else { return };
    let r = bounded(Work::Sync, move || {
        let r = s.end_read().and_then(|()| {
            s.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(sqlite(&s.db))
        });
        // What the files are now, before our connection closes: a change
        // to exactly this is the checkpoint's (see
        // [`StreamProgress::left_by_checkpoint`]).
        let left = std::fs::symlink_metadata(&s.db)
            .ok()
            .map(|m| crate::source::track::fingerprint_with(&s.db, &m));
        (r, s.db.clone(), left)
    })
    .await;
    let r = r.map(|(r, db, left)| {
        if let (Ok(0), Some(f)) = (&r, left) {
            progress.left.store(f.max(1), Ordering::Release);
        }
        (r, db)
    });
    match r {
        Ok((Ok(0), _)) => {}
        Ok((Ok(_), db)) => {
            tracing::debug!(path = %db.display(), "the WAL is in use: left to the application to checkpoint")
        }
        Ok((Err(e), db)) if e.is_busy() => {
            tracing::debug!(path = %db.display(), error = %e, "the WAL is in use: left to the application to checkpoint")
        }
        Ok((Err(e), db)) => {
            tracing::debug!(path = %db.display(), error = %e, "cannot checkpoint the WAL at the stream's end")
        }
        Err(e) => tracing::debug!(error = %e, "cannot checkpoint the WAL at the stream's end"),
    }
}

/// How long until the next sync slot of a new stream without the fleet log
/// (see [`stream`]). Streams take phases of the interval from a Weyl
/// sequence (the n-th stream of the process at n times the golden ratio,
/// modulo 1), which spreads any run of consecutive streams about evenly
/// over the interval (the gaps between neighbours take at most three
/// sizes); a phase is a position within the wall clock's interval, the same
/// reference for every stream, and the wait is less than one interval.
fn next_sync_slot(interval: Duration) -> Duration {
    static STREAMS: AtomicU64 = AtomicU64::new(0);
    let n = STREAMS.fetch_add(1, Ordering::Relaxed);
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    sync_wait(n, since_epoch, interval)
}

/// The wait of the `n`-th stream at wall-clock time `now` (see
/// [`next_sync_slot`]).
fn sync_wait(n: u64, now: Duration, interval: Duration) -> Duration {
    /// The golden ratio's fractional part.
    const WEYL: f64 = 0.618_033_988_749_894_9;
    let period = interval.as_nanos().max(1);
    let phase = ((n as f64 * WEYL).fract() * period as f64) as u128 % period;
    let at = now.as_nanos() % period;
    let wait = (phase + period - at) % period;
    Duration::from_nanos(u64::try_from(wait).unwrap_or(0))
}

/// At a stream's end: its spooled parts become a pack of its own, and the
/// generation's metadata says the log holds nothing more of it (so a restore
/// does not read the log). Failures leave the parts in the log, where
/// restore reads them, and a restart consolidates them.
async fn close_log(ctx: &HotContext, ls: &mut Option<LogStream>, slot: &mut Option<Shipper>) {
    let Some(l) = ls.as_mut() else { return };
    let consolidated = match consolidate(ctx, l, Room::Wait).await {
        Ok(Consolidation::Written | Consolidation::Nothing) => !l.spool.is_broken(),
        Ok(Consolidation::NoRoom | Consolidation::Broken) => false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot consolidate a stream's fleet log parts at its end; they stay in the log and are tried again in the background");
            false
        }
    };
    l.log.unregister(l.id);
    if !consolidated {
        if let Some(l) = ls.take() {
            consolidate_later(ctx, l);
        }
    }
    if let Some(s) = slot.as_mut() {
        let done = consolidated && !s.has_unshipped();
        if done && s.meta.as_ref().is_some_and(|m| m.logged) {
            if let Some(m) = &mut s.meta {
                m.logged = false;
            }
            if let Err(e) = write_meta(ctx, s).await {
                tracing::debug!(error = %e, "cannot record that a generation left the fleet log");
            }
        }
    }
    *ls = None;
}

/// One sync: start a generation if needed (`renew`: also when the current
/// one is `snapshot-interval` old), read, upload, move forward. `renew` is
/// false only for a stream's last sync, which ships all that is behind
/// instead of [`CATCH_UP_PARTS`] more parts at most.
async fn sync(
    ctx: &HotContext,
    tag: u64,
    slot: &mut Option<Shipper>,
    ls: &mut Option<LogStream>,
    renew: bool,
) -> Result<()> {
    if renew {
        end_old_generation(ctx, slot, ls).await?;
    }
    // Bounded: a generation start, a segment, the parts of a stream behind
    // its writer, and the frames our checkpoint read.
    let mut catch_up = 0;
    // The last sync, at a stop, ships all that is behind: what it leaves
    // would wait for the next start's snapshot (the stop itself is bounded
    // by `shutdown-timeout`).
    let catch_up_limit = if renew {
        ctx.cfg.catch_up_parts
    } else {
        usize::MAX
    };
    for _ in 0..5 {
        let needs_generation = slot.as_ref().is_some_and(|s| s.generation.is_none());
        if needs_generation {
            if let Some(s) = slot.as_mut() {
                // One LIST per generation start (rare): the new id must sort
                // first even if this host's clock is behind the one that
                // created the newest generation.
                s.newest = hot::list_generation_ids(&ctx.replica, &s.key)
                    .await?
                    .into_iter()
                    .next()
                    .filter(|g| !named_far_ahead(&s.key, g));
            }
            let tmp = ctx.temp_dir.clone();
            let started = blocking(slot, Work::Start, move |s| s.begin_generation(&tmp)).await?;
            // Also when the start failed: the shipper keeps the generation
            // its last try began (snapshot, metadata, cursor), and the next
            // sync ships it and streams on in it, its segments into the log
            // like any other's. Its metadata must say so, or a restore never
            // reads the log for it and silently returns its snapshot (or
            // fails, segments "missing", when the WAL restarted meanwhile).
            // (Black-box crash harness: 1,007 of 1,034 generations were such
            // failed starts, after a database renamed over beside its old
            // `-wal`; latest restores then returned 196 of 202 rows.) It is
            // renewed after `snapshot-interval` like any other, too.
            if let Some(s) = slot.as_mut() {
                if s.generation.is_some() {
                    s.generation_started = Some(tokio::time::Instant::now());
                }
                if let (Some(m), Some(_)) = (&mut s.meta, ls.as_ref()) {
                    m.logged = true;
                }
            }
            // Not begun when the database's files changed under the start:
            // the read below reports the lost continuity and reopens.
            if started? {
                ctx.stats.generations.fetch_add(1, Ordering::Relaxed);
                let s = slot.as_ref().expect("present after a successful task");
                tracing::debug!(path = %s.db.display(), generation = %s.generation.as_ref().map(|g| g.to_string()).unwrap_or_default(), "started a WAL generation");
            }
        }
        upload(ctx, tag, slot, ls).await?;
        let step = blocking(slot, Work::Sync, |s| s.read()).await??;
        if let Step::Lost(reason) = step {
            let s = slot.take().expect("present after a successful task");
            tracing::info!(path = %s.db.display(), %reason, "WAL continuity lost; starting a new generation with a fresh snapshot");
            // Reopen: the file may have been replaced. The old connection
            // closes first (it never checkpoints on close, see `open_conn`):
            // open beside it, a new connection to the same inode shares its
            // WAL-index (the process's SQLite keeps one per inode), and when
            // the file was replaced in place that index describes the old
            // WAL. Should the open fail, the stream has no shipper and ends
            // at this sync's error, handing the database to the cold tier;
            // the old one must never carry on after lost continuity.
            let fresh = bounded(Work::Start, move || s.reopen()).await??;
            *slot = Some(fresh);
            continue;
        }
        upload(ctx, tag, slot, ls).await?;
        let mut lost = None;
        while catch_up < catch_up_limit && slot.as_ref().is_some_and(|s| s.cut_short) {
            // Behind the writer: the read stopped at MAX_SEGMENT_BYTES with
            // more committed frames behind it. One part a sync would cap the
            // stream at 16 MiB per sync-interval, and a faster writer would
            // grow the WAL without end, never checkpointed (that waits for
            // the stream to catch up; black-box probe: 24 MB/s). The next
            // parts go straight to the store, as segment objects a restore
            // reads beside the log: the log's appends wait for its next tick.
            catch_up += 1;
            let step = blocking(slot, Work::Sync, |s| s.read()).await??;
            if let Step::Lost(reason) = step {
                lost = Some(reason);
                break;
            }
            upload(ctx, tag, slot, &mut None).await?;
            ctx.stats.wal_catch_up_parts.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(reason), Some(s)) = (lost, slot.as_mut()) {
            // The next round's read reports it, and starts a new generation.
            s.lost = Some(reason);
            continue;
        }
        let cfg = ctx.cfg;
        let ckpt = blocking(slot, Work::Sync, move |s| s.advance(&cfg)).await??;
        let Some(c) = ckpt else { return Ok(()) };
        ctx.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            log = c.log,
            checkpointed = c.checkpointed,
            truncated = c.truncated,
            "checkpoint"
        );
        upload(ctx, tag, slot, ls).await?;
        return Ok(());
    }
    Ok(())
}

/// Ends the stream's generation once it is `snapshot-interval` old (or
/// has shipped [`hot::MAX_GENERATION_WALS`] WALs) and everything read from
/// it is shipped, so that this sync starts a new one
/// with a fresh snapshot: a restore then replays at most that much WAL, and
/// retention can delete the older generation once it is past its period
/// (it never deletes the newest). Its fleet log parts go into a pack of
/// its own first, and its `metadata.json` records where it ends; frames
/// committed since the last read are in the new generation's snapshot, so
/// nothing falls between the two. A failure leaves the generation going on
/// and fails the sync (tried again at the next one).
async fn end_old_generation(
    ctx: &HotContext,
    slot: &mut Option<Shipper>,
    ls: &mut Option<LogStream>,
) -> Result<()> {
    let Some(s) = slot.as_mut() else {
        return Ok(());
    };
    let due = s
        .generation_started
        .is_some_and(|t| t.elapsed() >= ctx.cfg.snapshot_interval)
        || s.meta
            .as_ref()
            .is_some_and(|m| m.wal_ends.len() >= hot::MAX_GENERATION_WALS);
    if !due || s.generation.is_none() || !s.caught_up() {
        return Ok(());
    }
    let mut logged = false;
    if let Some(l) = ls.as_mut() {
        if consolidate(ctx, l, Room::IfFree).await? == Consolidation::NoRoom {
            // Other streams are consolidating: the generation goes on, and
            // the next sync tries again.
            return Ok(());
        }
        // Parts it could not spool stay in the log: restore must read it.
        logged = l.spool.is_broken();
    }
    if let Some(m) = &mut s.meta {
        m.logged = logged;
    }
    write_meta(ctx, s).await?;
    tracing::info!(path = %s.db.display(), generation = %s.generation.as_ref().map(|g| g.to_string()).unwrap_or_default(),
        interval = ?ctx.cfg.snapshot_interval,
        "generation is snapshot-interval old: starting a new one with a fresh snapshot");
    s.generation = None;
    s.meta = None;
    s.generation_started = None;
    Ok(())
}

/// Uploads what is waiting, in order: snapshot, segment, metadata.
async fn upload(
    ctx: &HotContext,
    tag: u64,
    slot: &mut Option<Shipper>,
    ls: &mut Option<LogStream>,
) -> Result<()> {
    let Some(s) = slot.as_mut() else {
        return Err(Error::invalid(
            "hot tier",
            "shipper lost after a failed task",
        ));
    };
    let Some(gen) = s.generation.clone() else {
        return Ok(());
    };
    let mut snapshot_shipped = false;
    if let Some(copy) = s.snapshot.take() {
        let r = {
            let _permit = ctx.permits.acquire().await;
            upload::upload_snapshot(
                &ctx.replica,
                &s.key,
                &gen,
                0,
                s.snapshot_time,
                &copy,
                &ctx.temp_dir,
            )
            .await
        };
        match r {
            Ok(mut entry) => {
                entry.covers = s.snapshot_covers;
                ctx.stats.upload_ok();
                ctx.stats
                    .bytes_uploaded
                    .fetch_add(entry.compressed_size, Ordering::Relaxed);
                if let Some(m) = &mut s.meta {
                    m.snapshots.push(entry);
                }
                s.meta_dirty = true;
                snapshot_shipped = true;
            }
            Err(e) => {
                ctx.stats.upload_failed();
                s.snapshot = Some(copy);
                return Err(e);
            }
        }
    }
    let starts_wal = s
        .pending
        .as_ref()
        .is_some_and(|(pos, _)| pos.offset == WAL_HEADER_SIZE);
    let through_log = ls.is_some()
        && s.pending
            .as_ref()
            .is_some_and(|(_, seg)| matches!(seg, Segment::Frames(_)));
    if starts_wal && (s.meta_dirty || (s.meta_behind && !through_log)) {
        // Where the previous WAL ended, and the header of this one, must be
        // in the replica before any segment of it: restore proves
        // continuity from them. A fleet log part carries them itself
        // (`opening`), so a WAL restart costs no metadata write there.
        write_meta(ctx, s).await?;
    }
    let opening = match (&s.pending, &s.meta) {
        (Some((pos, _)), Some(m)) if starts_wal && through_log => m.opening(pos.index),
        _ => None,
    };
    if let Some((pos, segment)) = s.take_pending() {
        let page_size = s.meta.as_ref().map_or(4096, |m| m.page_size);
        let r = match (&segment, ls.as_mut()) {
            (Segment::Frames(bytes), Some(l)) => {
                log_segment(ctx, l, &s.key, &gen, (pos, opening), s.pending_time, bytes)
                    .await
                    .map(|()| commit_frames(bytes, page_size))
            }
            (Segment::Frames(bytes), None) => {
                let _permit = ctx.permits.acquire().await;
                upload::upload_segment(&ctx.replica, &s.key, &gen, pos, s.pending_time, bytes)
                    .await
                    .map(|_| commit_frames(bytes, page_size))
            }
            // Never through the fleet log, which holds its objects in
            // memory: the log parts before it are durable already.
            (
                Segment::InWal {
                    wal,
                    cursor,
                    frames,
                },
                _,
            ) => {
                let _permit = ctx.permits.acquire().await;
                upload::upload_wal_segment(
                    &ctx.replica,
                    &s.key,
                    &gen,
                    pos,
                    s.pending_time,
                    (wal.clone(), &s.wal),
                    *cursor,
                    *frames,
                    &ctx.temp_dir,
                )
                .await
            }
        };
        match r {
            Ok(commits) => {
                ctx.stats.wal_segments.fetch_add(1, Ordering::Relaxed);
                ctx.stats.store_took_a_write();
                ctx.stats
                    .wal_bytes
                    .fetch_add(segment.len(), Ordering::Relaxed);
                if let Some(tx) = &ctx.events {
                    let _ = tx.send(ShipEvent {
                        tag,
                        commits,
                        snapshot: false,
                        at: std::time::Instant::now(),
                    });
                }
            }
            // Frames left in the WAL that changed before their upload (not
            // SQLite's doing): nothing of them was uploaded, and the
            // generation cannot go on.
            Err(Error::Invalid { what, reason }) if matches!(segment, Segment::InWal { .. }) => {
                ctx.stats.upload_failed();
                s.lost = Some(format!("{what}: {reason}"));
                return Err(Error::Invalid { what, reason });
            }
            Err(e) => {
                ctx.stats.upload_failed();
                s.unshipped(pos, segment);
                return Err(e);
            }
        }
    }
    if s.meta_dirty {
        // Written with the snapshot, at each WAL restart and at close; not per
        // segment, which would double the request count.
        write_meta(ctx, s).await?;
    }
    // After the metadata: a restore that sees the event sees the generation.
    if let (true, Some(tx)) = (snapshot_shipped, &ctx.events) {
        let _ = tx.send(ShipEvent {
            tag,
            commits: 0,
            snapshot: true,
            at: std::time::Instant::now(),
        });
    }
    Ok(())
}

/// Whether generation `g` of `key` was named more than
/// [`cold::FUTURE_NAME_SECS`] (12 h) after this host's clock: by a clock
/// that ran ahead, or planted. A new generation is then named by this
/// host's clock, not after it (with a warning): named after it, every
/// later generation, and every commit time in it, lay in that future, and
/// a restore at any real time silently went back to the cold tier's first
/// snapshot (black-box probe N29: 8 rows where 177 were committed, exit 0).
/// A restore of the latest state fails while it is the newest
/// ([`hot::plan_latest`]), naming it.
fn named_far_ahead(key: &str, g: &GenerationId) -> bool {
    let Some(ahead) = cold::named_far_ahead(g.created()) else {
        return false;
    };
    tracing::warn!(key, generation = %g, created = %g.created().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "the newest generation is named {} hours after this host's clock (a clock that ran ahead, or an object put there by hand): the new generation is named by this host's clock, not after it; a restore of the latest state fails until that generation is deleted", ahead.num_hours());
    true
}

/// Writes the generation's metadata, with `last` at what was shipped.
async fn write_meta(ctx: &HotContext, s: &mut Shipper) -> Result<()> {
    let last = s.position_shipped();
    if let Some(m) = &mut s.meta {
        m.last = last;
        m.written = Some(Utc::now());
        let _permit = ctx.permits.acquire().await;
        hot::write_metadata_over(&ctx.replica, &s.key, m, &mut s.meta_version).await?;
    }
    s.meta_dirty = false;
    s.meta_behind = false;
    Ok(())
}

impl Shipper {
    /// End of what has been shipped (the start of the pending segment, if any).
    fn position_shipped(&self) -> Position {
        match &self.pending {
            Some((pos, _)) => *pos,
            None => self.position(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Write as _;

    /// A test hook: a closure a test sets and the code runs once at one
    /// point (see the thread-locals below).
    pub(super) type Hook = std::thread::LocalKey<RefCell<Option<Box<dyn FnOnce()>>>>;

    /// Without the fleet log, the syncs of 1000 streams started together
    /// (within 50 ms) fall evenly over the interval: every tenth of it holds
    /// 95-105 of them, and no two neighbours are more than 3 ms apart.
    #[test]
    fn syncs_are_spread_over_the_interval() {
        let interval = Duration::from_secs(1);
        let mut slots = Vec::new();
        for n in 0..1000u64 {
            let now = Duration::from_millis(1_700_000_000_000 + n * 37 % 50);
            let wait = sync_wait(n, now, interval);
            assert!(wait < interval);
            slots.push(((now + wait).as_nanos() % interval.as_nanos()) as u64);
        }
        slots.sort_unstable();
        let mut tenths = [0u32; 10];
        for s in &slots {
            tenths[(s / 100_000_000) as usize] += 1;
        }
        assert!(
            tenths.iter().all(|&n| (95..=105).contains(&n)),
            "{tenths:?}"
        );
        let widest = slots.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(widest <= 3_000_000, "gap of {widest} ns");
        assert_eq!(sync_wait(5, Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }

    /// Runs `hook` once if a test set it (the hook may set itself again).
    pub(super) fn run(hook: &'static Hook) {
        let f = hook.with(|h| h.borrow_mut().take());
        if let Some(f) = f {
            f()
        }
    }

    /// Sets `hook` to run `f` once.
    fn set(hook: &'static Hook, f: impl FnOnce() + 'static) {
        hook.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    thread_local! {
        /// Runs once between the identity check of [`Shipper::read`] and its
        /// opening of the `-wal`: the window a replacement by rename can hit.
        pub(super) static BETWEEN_CHECK_AND_OPEN: RefCell<Option<Box<dyn FnOnce()>>> =
            RefCell::new(None);
        /// Makes our checkpoint fail where resuming its read transaction
        /// could (SQLITE_BUSY, I/O), after the checkpoint itself ran.
        /// Makes the next [`Shipper::read`] fail.
        pub(super) static FAIL_START_READ: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
        pub(super) static FAIL_READ_AFTER_CHECKPOINT: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
        /// Runs once in [`Shipper::open`], after the connection opened the
        /// database file and before its first read (the schema, for
        /// `cache_size`) opens the side files.
        pub(super) static AFTER_OPEN: RefCell<Option<Box<dyn FnOnce()>>> =
            RefCell::new(None);
        /// Runs once in [`Shipper::open`], after the first read, before the
        /// files' identities are taken.
        pub(super) static AFTER_FIRST_READ: RefCell<Option<Box<dyn FnOnce()>>> =
            RefCell::new(None);
        /// Runs once in a generation start, after its copy of the database.
        pub(super) static AFTER_START_COPY: RefCell<Option<Box<dyn FnOnce()>>> =
            RefCell::new(None);
        /// Runs once just before [`Shipper::read`] reads the WAL.
        pub(super) static BEFORE_WAL_READ: RefCell<Option<Box<dyn FnOnce()>>> =
            RefCell::new(None);
        /// Runs once in [`Shipper::truncate`], after our read ended and
        /// before the TRUNCATE checkpoint: the window another connection's
        /// commit can hit.
        pub(super) static BEFORE_TRUNCATE: RefCell<Option<Box<dyn FnOnce()>>> =
            RefCell::new(None);
    }

    /// A transaction that commits while the shipper is about to read the
    /// WAL is in the segment, so the segment's commit time (what a
    /// point-in-time restore selects by) is no earlier than that commit.
    /// With the time taken before the read, a restore at a time just before
    /// the commit included a transaction begun after it (crash harness).
    #[test]
    fn a_segment_commit_time_covers_a_commit_made_during_the_read() {
        let (_dir, a, app, mut s) = streaming();
        let committed = std::rc::Rc::new(std::cell::Cell::new(None));
        let (c, app_path) = (committed.clone(), a.clone());
        set(&BEFORE_WAL_READ, move || {
            let w = Connection::open(&app_path).unwrap();
            w.execute("INSERT INTO t VALUES (42)", []).unwrap();
            c.set(Some(Utc::now()));
        });
        assert_eq!(s.read().unwrap(), Step::Frames);
        let Some((_, Segment::Frames(frames))) = s.take_pending() else {
            panic!("the new commit, in memory");
        };
        assert!(commit_frames(&frames, 4096) >= 1);
        let done = committed.get().expect("the hook ran");
        assert!(
            s.pending_time >= done,
            "segment time {} before its commit at {}",
            s.pending_time,
            done
        );
        drop(app);
    }

    /// The host's clock went back between two segments (here: the last
    /// segment is stamped an hour ahead of now, and the generation's
    /// snapshot two hours ahead): the next segment's commit time is still
    /// no earlier than either, so times keep growing with positions, which a
    /// point-in-time plan relies on (`hot::plan` refuses times that go back,
    /// so every restore into the generation would fail as damage).
    #[test]
    fn segment_times_never_go_back_with_the_clock() {
        let (_dir, _, app, mut s) = streaming();
        app.execute("INSERT INTO t VALUES (100)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        s.take_pending().expect("row 100");
        let ahead = Utc::now() + chrono::Duration::hours(1);
        s.pending_time = ahead;
        app.execute("INSERT INTO t VALUES (101)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        s.take_pending().expect("row 101");
        assert!(s.pending_time >= ahead, "{} < {ahead}", s.pending_time);
        let snapshot_ahead = Utc::now() + chrono::Duration::hours(2);
        s.snapshot_time = snapshot_ahead;
        app.execute("INSERT INTO t VALUES (102)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        s.take_pending().expect("row 102");
        assert_eq!(s.pending_time, snapshot_ahead);
    }

    /// Our checkpoint fails after releasing our read transaction: the WAL
    /// can now be restarted with frames we never read, so a restart seen
    /// later is continuity lost, not the next WAL of the generation.
    #[test]
    fn a_failed_checkpoint_forgets_the_tip() {
        let (_dir, _, app, mut s) = streaming();
        assert!(s.tip);
        FAIL_READ_AFTER_CHECKPOINT.with(|f| f.set(true));
        assert!(s.checkpoint(false).is_err());
        // Unseen frames, checkpointed away, and a new WAL.
        app.execute("INSERT INTO t VALUES (100)", []).unwrap();
        app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        app.execute("INSERT INTO t VALUES (101)", []).unwrap();
        assert!(
            matches!(s.read().unwrap(), Step::Lost(_)),
            "a restart after frames we never read must not continue the generation"
        );
    }

    /// After an error left us without a read transaction, the next read
    /// begins one before it reads: the application's TRUNCATE then cannot
    /// remove a frame we have not read (here row 101, written after that
    /// read). Without it, the read would count as a tip while nothing held
    /// the WAL, and row 101 would be truncated and skipped.
    #[test]
    fn a_read_after_an_interruption_holds_the_wal_again() {
        let (_dir, _, app, mut s) = streaming();
        s.interrupt();
        app.execute("INSERT INTO t VALUES (100)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        s.take_pending().expect("row 100");
        app.execute("INSERT INTO t VALUES (101)", []).unwrap();
        app.busy_timeout(Duration::ZERO).unwrap();
        let busy: i64 = app
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 1, "our read must hold the WAL again");
        app.execute("INSERT INTO t VALUES (102)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        let Some((pos, Segment::Frames(frames))) = s.take_pending() else {
            panic!("rows 101 and 102, in memory");
        };
        assert_eq!(pos.index, 0, "the same WAL, not a restart");
        assert_eq!(commit_frames(&frames, 4096), 2);
    }

    /// Another connection commits while our TRUNCATE runs without our read
    /// or lock (it needs both gone): its frames are truncated before we see
    /// them, so the next WAL is continuity lost. Keeping the tip here would
    /// continue the generation without that commit.
    #[test]
    fn a_commit_during_our_truncate_forgets_the_tip() {
        let (_dir, a, app, mut s) = streaming();
        let app_path = a.clone();
        set(&BEFORE_TRUNCATE, move || {
            let w = Connection::open(&app_path).unwrap();
            w.execute("INSERT INTO t VALUES (100)", []).unwrap();
        });
        let report = s.checkpoint(true).unwrap().expect("a checkpoint");
        assert!(report.truncated, "{report:?}");
        assert!(s.take_pending().is_none());
        assert!(!s.tip, "a commit during TRUNCATE must forget the tip");
        app.execute("INSERT INTO t VALUES (101)", []).unwrap();
        assert!(
            matches!(s.read().unwrap(), Step::Lost(_)),
            "the WAL holding row 100 was truncated unseen"
        );
    }

    /// A stream starting just after the application's checkpoint caught up
    /// (every frame backfilled, so our read holds none) while a writer
    /// restarts the WAL between our read of its header and of its frames:
    /// the start is made again instead of failing the sync, and the new
    /// generation holds every row (black-box probe: streams started during
    /// application checkpoints lost their first generation).
    #[test]
    fn a_wal_restarted_under_a_generation_start_starts_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let app = wal_db(&a, 3);
        let (busy, log, done): (i64, i64, i64) = app
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((busy, log), (0, done), "every frame backfilled");
        let mut s = Shipper::open(&a, "k").unwrap();
        let app_path = a.clone();
        set(&BEFORE_WAL_READ, move || {
            let w = Connection::open(&app_path).unwrap();
            w.execute("INSERT INTO t VALUES (100)", []).unwrap();
        });
        s.begin_generation(dir.path()).unwrap();
        let snapshot = s.snapshot.as_ref().expect("a snapshot").to_path_buf();
        let frames = s.take_pending();
        // Row 100 is in the snapshot, or in the frames read after it.
        let rows: i64 = Connection::open(&snapshot)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert!(
            rows == 4 || (rows == 3 && frames.is_some()),
            "{rows} {frames:?}"
        );
        drop(app);
    }

    /// Nobody commits during our TRUNCATE: the tip holds and the next WAL
    /// continues the generation at the next index.
    #[test]
    fn an_unraced_truncate_keeps_the_tip() {
        let (_dir, _, app, mut s) = streaming();
        let report = s.checkpoint(true).unwrap().expect("a checkpoint");
        assert!(report.truncated, "{report:?}");
        assert!(s.tip);
        app.execute("INSERT INTO t VALUES (101)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        let (pos, _) = s.take_pending().expect("the new WAL's frames");
        assert_eq!((pos.index, pos.offset), (1, 32));
    }

    /// An idle database whose WAL stays above `checkpoint-pages`: one
    /// checkpoint backfills it, and the next syncs leave it alone (and the
    /// application's write lock free) until new frames arrive.
    #[test]
    fn a_backfilled_wal_is_not_checkpointed_again_until_it_moves() {
        let (_dir, _, app, mut s) = streaming();
        let cfg = ShipConfig {
            sync_interval: Duration::from_millis(50),
            checkpoint_pages: 1,
            truncate_pages: 1_000_000,
            release_after: Duration::from_secs(60),
            consolidate_every: Duration::from_secs(60),
            snapshot_interval: crate::source::config::DEFAULT_SNAPSHOT_INTERVAL,
            catch_up_parts: CATCH_UP_PARTS,
        };
        let report = s.advance(&cfg).unwrap().expect("a checkpoint");
        assert_eq!(report.log, report.checkpointed);
        assert_eq!(s.read().unwrap(), Step::Idle);
        assert!(s.advance(&cfg).unwrap().is_none(), "nothing to backfill");
        assert!(s.advance(&cfg).unwrap().is_none());
        app.execute("INSERT INTO t VALUES (7)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        s.take_pending().expect("the new frames");
        assert!(s.advance(&cfg).unwrap().is_some(), "the WAL moved");
    }

    /// Our write lock is SQLite's: while we hold it, writers in this process
    /// and in another one get SQLITE_BUSY; once released, they write.
    #[test]
    fn our_write_lock_holds_writers_off() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let app = wal_db(&a, 3);
        let mut s = Shipper::open(&a, "k").unwrap();
        s.begin_generation(dir.path()).unwrap();
        let other_process = |path: &Path| {
            // timeout=0: report the lock at once instead of waiting.
            let script = "import sqlite3, sys\n\
                c = sqlite3.connect(sys.argv[1], timeout=0)\n\
                try:\n    c.execute('INSERT INTO t VALUES (7)'); c.commit(); print('wrote')\n\
                except sqlite3.OperationalError as e:\n    print(e)\n";
            let out = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(path)
                .output()
                .expect("python3 runs");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let lock = ShmLock::wait(&s.conn, &a).unwrap().expect("free");
        app.busy_timeout(Duration::ZERO).unwrap();
        let e = app.execute("INSERT INTO t VALUES (5)", []).unwrap_err();
        assert!(is_busy(&e), "{e}");
        assert_eq!(other_process(&a), "database is locked");
        // Taken already: a second attempt gives up after WRITE_LOCK_WAIT.
        assert!(ShmLock::wait(&s.conn, &a).unwrap().is_none());
        lock.release().unwrap();
        app.execute("INSERT INTO t VALUES (5)", []).unwrap();
        assert_eq!(other_process(&a), "wrote");
    }

    /// A WAL database of 3 rows (its application connection kept open) and
    /// a shipper that started a generation and took the frames in the WAL.
    fn streaming() -> (tempfile::TempDir, PathBuf, Connection, Shipper) {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let app = wal_db(&a, 3);
        let mut s = Shipper::open(&a, "k").unwrap();
        s.begin_generation(dir.path()).unwrap();
        s.take_pending().expect("the frames already in the WAL");
        (dir, a, app, s)
    }

    /// Frames stay in memory only within the streams' common budget: a read
    /// that finds it spent leaves them in the WAL, shipped from there as a
    /// segment of their own, and frames dropped (shipped) give their bytes
    /// back. Without the budget, every stream held its frames whatever the
    /// others held: 40 streams behind after a store outage held 1.4 GB.
    #[test]
    fn frames_beyond_the_common_budget_stay_in_the_wal() {
        let (_dir, _a, app, mut s) = streaming();
        let budget = Arc::new(Semaphore::new(64 << 10));
        s.budget = budget.clone();
        app.execute("INSERT INTO t VALUES (zeroblob(16000))", [])
            .unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        let Some((pos, Segment::Frames(frames))) = s.take_pending() else {
            panic!("within the budget: in memory");
        };
        let held = frames.len();
        assert!(held > 16000, "{held} bytes of frames");
        assert_eq!(budget.available_permits(), (64 << 10) - held);
        drop(frames);
        assert_eq!(budget.available_permits(), 64 << 10, "given back");

        // Beyond what is free: left in the WAL, and the same frames.
        app.execute("INSERT INTO t VALUES (zeroblob(100000))", [])
            .unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        let Some((
            next,
            Segment::InWal {
                wal,
                cursor,
                frames,
            },
        )) = s.take_pending()
        else {
            panic!("beyond the budget: left in the WAL");
        };
        assert_eq!(next.offset, pos.offset + held as u64);
        let mut copy = Vec::new();
        let commits = wal::copy_committed(&wal, &s.wal, &cursor, &frames, &mut copy).unwrap();
        assert_eq!((commits, copy.len() as u64), (1, frames.len()));
        assert_eq!(commit_frames(&copy, 4096), 1);
        assert_eq!(budget.available_permits(), 64 << 10, "nothing held");
    }

    fn wal_db(path: &Path, rows: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch("CREATE TABLE IF NOT EXISTS t(x)").unwrap();
        for i in 0..rows {
            c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        c
    }

    /// An operator replaces a hot database in place (removes its `-wal` and
    /// `-shm`, copies another database over the same inode) and the
    /// application starts a new WAL. Our stream ends with the old WAL still
    /// open: closing its connection must neither checkpoint those stale
    /// frames into the new file nor delete the new `-wal` and `-shm` by name,
    /// as SQLite's checkpoint on close does (black-box probe: the source
    /// became the old rows at SIGTERM, and a committed write was deleted).
    #[test]
    fn closing_a_stream_never_touches_a_database_replaced_in_place() {
        let (dir, a, app, mut s) = streaming();
        for i in 10..40 {
            app.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        assert_eq!(s.read().unwrap(), Step::Frames);
        // Our read holds the WAL: the application's close cannot checkpoint.
        drop(app);
        let other = dir.path().join("new.db");
        let n = Connection::open(&other).unwrap();
        n.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES ('new');")
            .unwrap();
        drop(n);
        let new = std::fs::read(&other).unwrap();
        std::fs::remove_file(wal_path(&a)).unwrap();
        std::fs::remove_file(shm_path(&a)).unwrap();
        write_in_place(&a, &new);
        std::fs::write(wal_path(&a), b"the application's new WAL").unwrap();
        std::fs::write(shm_path(&a), b"its new WAL-index").unwrap();
        drop(s);
        assert!(
            std::fs::read(&a).unwrap() == new,
            "the new file was written"
        );
        assert_eq!(
            std::fs::read(wal_path(&a)).unwrap(),
            b"the application's new WAL"
        );
        assert_eq!(std::fs::read(shm_path(&a)).unwrap(), b"its new WAL-index");
    }

    /// A hot database written over in place (same inode) with bytes that
    /// are not SQLite's: the stream says so at its next read instead of
    /// idling on a WAL that no longer has a database (black-box probe: no
    /// log line, `hot` in `/stats`, while the source was garbage).
    #[test]
    fn a_database_written_over_in_place_is_continuity_lost() {
        for (bytes, why) in [
            (vec![0x5Au8; 8192], "header"),
            (Vec::new(), "truncated"),
            (b"SQLite format 3\0\x10\x00\x01\x01".to_vec(), "WAL mode"),
        ] {
            let (_dir, a, app, mut s) = streaming();
            drop(app);
            write_in_place(&a, &bytes);
            match s.read().unwrap() {
                Step::Lost(reason) => assert!(reason.contains(why), "{why}: {reason}"),
                other => panic!("{why}: {other:?}"),
            }
            assert!(s.take_pending().is_none());
        }
    }

    /// Runs `f` on another thread; fails the test instead of hanging when it
    /// blocks (an open of a FIFO waits for a writer forever).
    fn within_seconds<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what} blocked"))
    }

    /// A hot database replaced by a symbolic link to another WAL database
    /// (a deploy-style `ln -s` + `mv -T`): SQLite would open the link's
    /// target and its `-wal`, while the stream reads the `-wal` beside the
    /// link, the replaced database's (black-box probe: restores mixed the
    /// two with exit 0, and the target's side files were created outside
    /// the pattern root). The stream loses continuity and never reopens
    /// through the link; a snapshot refuses it too, and the target's
    /// directory gets no file of ours.
    #[test]
    fn a_database_replaced_by_a_link_is_never_opened_through_it() {
        let (dir, a, app, mut s) = streaming();
        let outside = tempfile::tempdir().unwrap();
        let y = outside.path().join("y.db");
        drop(wal_db(&y, 5));
        let before: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&y, &link).unwrap();
        std::fs::rename(&link, &a).unwrap();
        match s.read().unwrap() {
            Step::Lost(reason) => assert!(reason.contains("replaced"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(s);
        let e = Shipper::open(&a, "k")
            .err()
            .expect("opened through a link")
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = snapshot::capture(&a, None, "k", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let after: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        assert_eq!(before.len(), after.len(), "files made beside the target");
        drop(app);
    }

    /// The directory of a hot database replaced by a link to a tree outside
    /// the pattern root (which the scan never follows): the stream loses
    /// continuity and does not reopen there, so nothing of the outside
    /// database is streamed under this key and no file is made beside it.
    #[test]
    fn a_stream_never_reopens_through_a_directory_replaced_by_a_link() {
        let top = tempfile::tempdir().unwrap();
        let d = top.path().join("d");
        std::fs::create_dir(&d).unwrap();
        let a = d.join("a.db");
        let app = wal_db(&a, 3);
        let mut s = Shipper::open(&a, "k").unwrap();
        s.begin_generation(top.path()).unwrap();
        s.take_pending().expect("the frames already in the WAL");
        let outside = tempfile::tempdir().unwrap();
        drop(wal_db(&outside.path().join("a.db"), 5));
        let before: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        std::fs::rename(&d, top.path().join("old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), &d).unwrap();
        match s.read().unwrap() {
            Step::Lost(reason) => assert!(reason.contains("replaced"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let e = s
            .reopen()
            .err()
            .expect("reopened through the link")
            .to_string();
        assert!(e.contains("its directory now resolves to"), "{e}");
        let after: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        assert_eq!(before.len(), after.len(), "files made beside the target");
        drop(app);
    }

    /// A directory below the pattern root swapped for a link to a tree
    /// outside it between the scan and the stream's start, or at the very
    /// instant the stream opens the database's directory (after the path's
    /// directories were checked): the open refuses it (the scan never
    /// follows links below a root; `pin::pin_below`) and creates nothing
    /// beside the outside database, while a root that is itself reached
    /// through a link (`/srv -> /mnt/disk/srv`) is fine.
    #[test]
    fn a_stream_never_opens_below_a_link_under_its_pattern_root() {
        use crate::source::pin::test_trees::{at_next_dir_open, link_in_place};
        let real = tempfile::tempdir().unwrap();
        let (d, away) = (real.path().join("d"), real.path().join("old"));
        std::fs::create_dir(&d).unwrap();
        let app = wal_db(&d.join("a.db"), 3);
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        std::os::unix::fs::symlink(real.path(), &root).unwrap();
        let db = root.join("d/a.db");
        let s = Shipper::open_below(&db, "k", Some(&root)).expect("a linked root is fine");
        drop(s);
        let outside = tempfile::tempdir().unwrap();
        drop(wal_db(&outside.path().join("a.db"), 5));
        let before = std::fs::read_dir(outside.path()).unwrap().count();
        let refused = || {
            let e = Shipper::open_below(&db, "k", Some(&root))
                .err()
                .expect("opened below a link")
                .to_string();
            assert!(e.contains("no directory of its own"), "{e}");
            let after = std::fs::read_dir(outside.path()).unwrap().count();
            assert_eq!(before, after, "files made beside the target");
        };
        link_in_place(&d, &away, outside.path());
        refused();
        std::fs::remove_file(&d).unwrap();
        std::fs::rename(&away, &d).unwrap();
        let (d2, away2, o) = (d.clone(), away.clone(), outside.path().to_path_buf());
        at_next_dir_open(move || link_in_place(&d2, &away2, &o));
        refused();
        std::fs::remove_file(&d).unwrap();
        std::fs::rename(&away, &d).unwrap();
        assert!(Shipper::open_below(&db, "k", Some(&root)).is_ok());
        drop(app);
    }

    /// FIFOs where a database or its side files should be: nothing blocks
    /// on them (black-box probe: an open of a FIFO renamed over a hot
    /// database, or named like a database's `-journal`, stopped every scan
    /// and SIGTERM), and each is named in the error.
    #[test]
    fn fifos_in_place_of_a_database_or_its_side_files_never_block() {
        let fifo = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid C string; mkfifo has no other precondition.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        };
        // A FIFO renamed over a hot database.
        let (dir, a, app, mut s) = streaming();
        let f = dir.path().join("f");
        fifo(&f);
        std::fs::rename(&f, &a).unwrap();
        let (a2, tmp) = (a.clone(), dir.path().to_path_buf());
        let (step, reopen, snap) = within_seconds("a stream over a FIFO", move || {
            let step = s.read().unwrap();
            drop(s);
            let reopen = Shipper::open(&a2, "k").err().map(|e| e.to_string());
            let snap = snapshot::capture(&a2, None, "k", &tmp)
                .err()
                .map(|e| e.to_string());
            (step, reopen, snap)
        });
        assert!(matches!(step, Step::Lost(_)), "{step:?}");
        for e in [reopen, snap] {
            assert!(e.as_deref().unwrap().contains("FIFO"), "{e:?}");
        }
        drop(app);
        // A FIFO as the -wal of a hot database, and as the -journal of a
        // database in rollback mode.
        let (dir, a, app, mut s) = streaming();
        std::fs::remove_file(wal_path(&a)).unwrap();
        fifo(&wal_path(&a));
        let step = within_seconds("a stream with a FIFO -wal", move || s.read().unwrap());
        match step {
            Step::Lost(reason) => assert!(reason.contains("FIFO"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(app);
        let b = dir.path().join("b.db");
        drop(
            Connection::open(&b)
                .unwrap()
                .execute_batch("CREATE TABLE t(x)"),
        );
        let mut journal = b.as_os_str().to_owned();
        journal.push("-journal");
        fifo(Path::new(&journal));
        let tmp = dir.path().to_path_buf();
        let e = within_seconds("a snapshot with a FIFO -journal", move || {
            snapshot::capture(&b, None, "k", &tmp)
                .err()
                .map(|e| e.to_string())
        });
        // Named by its path, not by the pinned directory's descriptor.
        let named = format!("{}: is a FIFO", journal.to_string_lossy());
        assert!(e.as_deref().unwrap().contains(&named), "{e:?}");
    }

    /// A WAL database whose main file was truncated to 0 bytes, its `-wal`
    /// still there: SQLite deletes such a `-wal` at the first read of any
    /// connection. Neither a stream nor a snapshot may be that reader
    /// (black-box probe: the `-wal` of 60 committed rows vanished within a
    /// second of the truncation).
    #[test]
    fn an_emptied_database_is_never_read_so_its_wal_stays() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let app = wal_db(&a, 30);
        let wal = std::fs::read(wal_path(&a)).unwrap();
        assert!(wal.len() > 32);
        write_in_place(&a, b"");
        let e = Shipper::open(&a, "k").err().expect("no stream").to_string();
        assert!(e.contains("SQLite's header"), "{e}");
        let e = snapshot::capture(&a, None, "k", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("SQLite's header"), "{e}");
        assert_eq!(
            std::fs::read(wal_path(&a)).unwrap(),
            wal,
            "the -wal is left alone"
        );
        drop(app);
    }

    /// A hot database rolled back in place (its `-wal` and `-shm` removed,
    /// an older copy written over the same inode) and its application
    /// restarted at once, so new side files are there before our next
    /// read: the new WAL only looks like a restart of ours. Continuity is
    /// lost; its frames must never join our generation (black-box probe:
    /// restores mixed both databases, and our checkpoint through the old
    /// connection wrote the old WAL's pages into the new file).
    #[test]
    fn new_side_files_after_an_in_place_rollback_are_continuity_lost() {
        let (dir, a, app, mut s) = streaming();
        app.execute("INSERT INTO t VALUES (9)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        s.take_pending().expect("the new frames");
        drop(app);
        // The older copy and the WAL its restarted application writes.
        let other = dir.path().join("b.db");
        let b = wal_db(&other, 2);
        std::fs::remove_file(wal_path(&a)).unwrap();
        std::fs::remove_file(shm_path(&a)).unwrap();
        write_in_place(&a, &std::fs::read(&other).unwrap());
        std::fs::copy(wal_path(&other), wal_path(&a)).unwrap();
        std::fs::copy(shm_path(&other), shm_path(&a)).unwrap();
        match s.read().unwrap() {
            Step::Lost(reason) => assert!(reason.contains("was replaced"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(s.take_pending().is_none());
        drop(b);
    }

    /// An older copy of a hot database put back over it in place (`cp`:
    /// same inode, the same WAL-mode header, its `-wal` and `-shm` left as
    /// they were) while the stream had everything backfilled, then the
    /// application writes on: its next frames belong to the copy, not to
    /// the base our generation has. Continuity is lost (black-box probe:
    /// the latest restore returned the generation's base with the copy's
    /// later frames on it, a state the database never had).
    #[test]
    fn an_older_copy_put_over_a_hot_database_in_place_is_continuity_lost() {
        let (_dir, a, app, mut s) = streaming();
        s.checkpoint(false).unwrap().expect("checkpointed");
        let older = std::fs::read(&a).unwrap();
        app.execute("INSERT INTO t VALUES (9)", []).unwrap();
        assert_eq!(s.read().unwrap(), Step::Frames);
        s.take_pending().expect("the new frames");
        s.checkpoint(false).unwrap().expect("checkpointed");
        assert_eq!(s.read().unwrap(), Step::Idle);
        write_in_place(&a, &older);
        app.execute("INSERT INTO t VALUES (10)", []).unwrap();
        match s.read().unwrap() {
            Step::Lost(reason) => assert!(reason.contains("other than SQLite"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(s.take_pending().is_none());
    }

    /// The application's own checkpoints write the database file too (the
    /// frames our read covers): never taken for a write from outside, nor
    /// are ours.
    #[test]
    fn checkpoints_are_not_writes_from_outside() {
        let (_dir, a, app, mut s) = streaming();
        for round in 0..4 {
            app.execute("INSERT INTO t VALUES (?1)", [round]).unwrap();
            // Backfills what our read covers (the frames before it began).
            let before = std::fs::metadata(&a).unwrap().len();
            let (busy, _, done): (i64, i64, i64) = app
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .unwrap();
            assert_eq!(busy, 0);
            if round == 0 {
                assert!(done > 0 && std::fs::metadata(&a).unwrap().len() >= before);
            }
            assert_eq!(s.read().unwrap(), Step::Frames, "round {round}");
            s.take_pending().expect("the new frames");
            s.checkpoint(false).unwrap().expect("checkpointed");
            assert_eq!(s.read().unwrap(), Step::Idle, "round {round}");
        }
    }

    /// Writes `bytes` over the file at `path`, keeping its inode (as `cp`
    /// over an existing file does).
    fn write_in_place(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(bytes))
            .unwrap();
    }

    /// A database replaced by rename between the identity check and the
    /// opening of its `-wal`: the other file's WAL is never read into this
    /// generation.
    #[test]
    fn a_replacement_after_the_identity_check_is_continuity_lost() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let app = wal_db(&a, 3);
        // Everything checkpointed and the WAL emptied: the shipper waits
        // for a WAL header.
        app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let mut s = Shipper::open(&a, "k").unwrap();
        s.begin_generation(dir.path()).unwrap();
        assert!(matches!(s.state, WalState::Awaiting { index: 0 }));
        let other = dir.path().join("b.db");
        let _b = wal_db(&other, 5);
        let (a2, other2) = (a.clone(), other.clone());
        set(&BETWEEN_CHECK_AND_OPEN, move || {
            std::fs::rename(wal_path(&other2), wal_path(&a2)).unwrap();
            std::fs::rename(&other2, &a2).unwrap();
        });
        assert_eq!(
            s.read().unwrap(),
            Step::Lost("the database file was replaced".into())
        );
        assert!(s.take_pending().is_none());
    }

    /// Two databases swapped by renames while a generation starts: the
    /// copy our connection made is the file now at the other path, and
    /// nothing of that start is kept (it was uploaded a sync later, and
    /// point-in-time restores returned the other database's state, exit 0:
    /// black-box probe). The next read reports the lost continuity, so the
    /// stream reopens the path.
    #[test]
    fn a_start_the_files_changed_under_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        let _apps = (wal_db(&a, 3), wal_db(&b, 5));
        let mut s = Shipper::open(&a, "k").unwrap();
        let (a2, b2) = (a.clone(), b.clone());
        set(&AFTER_START_COPY, move || {
            crate::capture::snapshot::test_db::swap_with_side_files(&a2, &b2)
        });
        assert!(!s.begin_generation(dir.path()).unwrap());
        assert!(s.generation().is_none());
        assert!(s.snapshot.is_none() && s.meta.is_none() && !s.meta_dirty);
        assert_eq!(
            s.read().unwrap(),
            Step::Lost("the database file was replaced".into())
        );
        // Reopened at its path, it starts on the file there now.
        let mut s = s.reopen().unwrap();
        assert!(s.begin_generation(dir.path()).unwrap());
        assert!(s.generation().is_some());
        // A start whose read fails is dropped too (the probe's "disk I/O
        // error" with swapped side files): nothing of it to upload.
        let mut s = s.reopen().unwrap();
        FAIL_START_READ.with(|f| f.set(true));
        assert!(s.begin_generation(dir.path()).is_err());
        assert!(s.generation().is_none());
        assert!(s.snapshot.is_none() && s.meta.is_none() && !s.meta_dirty);
    }

    /// The directory of a hot database exchanged for another tree holding
    /// a database of the same name between the stream's open and its first
    /// read, and back before the stream took its side files' identities:
    /// SQLite opened this tree's file and, unpinned, the other tree's
    /// `-wal` and `-shm` by name, every later identity check at the path
    /// passed, and the generation snapshot (and the parts after it) held
    /// rows of both trees, restored with exit 0 (black-box probe N22). With
    /// the directory pinned the connection reads this tree alone.
    #[test]
    fn a_directory_exchanged_while_a_stream_opens_gives_one_trees_generation() {
        use crate::source::pin::test_trees::{rows, tagged};
        let dir = tempfile::tempdir().unwrap();
        let (data, other) = (dir.path().join("data"), dir.path().join("other"));
        tagged(&data, "mine");
        tagged(&other, "theirs");
        let exchange =
            crate::source::pin::test_trees::exchanger(&data, &other, &dir.path().join("swap"));
        set(&AFTER_OPEN, exchange.clone());
        set(&AFTER_FIRST_READ, exchange);
        let mut s = Shipper::open(&data.join("x.db"), "k").unwrap();
        assert!(s.begin_generation(dir.path()).unwrap());
        let snapshot = s.snapshot.as_ref().expect("a snapshot").to_path_buf();
        assert_eq!(rows(&Connection::open(&snapshot).unwrap()), ["mine"]);
    }
}
