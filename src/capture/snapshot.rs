//! Consistent snapshots of one database, LZ4-compressed.
//!
//! A database file that an application is writing can never be copied byte by
//! byte: the copy could mix pages from before and after a transaction, and in
//! WAL mode the newest committed pages are not even in the main file. We use
//! the SQLite online backup API with "all pages in one step", which reads every
//! page inside a single read transaction: the copy is exactly the database as of
//! one commit, uncheckpointed WAL frames included, and writers are not blocked
//! (in WAL mode readers never block writers).
//!
//! The source is opened read-only so that closing our connection never
//! checkpoints or deletes the application's WAL. The copy is checked with
//! `PRAGMA quick_check` and compressed in the LZ4 *frame* format (with
//! content checksum) so `lz4 -d` can read any snapshot without litefleet.
//! A database is not copied where SQLite's locking allows it: inside one
//! read transaction that sees the database file alone (no WAL frames in its
//! view, see [`file_only`]), the file's pages *are* that transaction's
//! consistent version, and nothing can write them until the transaction
//! ends (a checkpoint needs the WAL's read-lock 0 exclusively, a rollback
//! writer an exclusive lock on the file). So `quick_check` runs on that
//! transaction and the file is read straight from disk, through SQLite's
//! VFS (never through a descriptor of our own: closing it would drop every
//! POSIX lock this process holds on the file, the hot tier's included). A
//! database of up to [`IN_MEMORY_MAX`] in that view (almost every database
//! of a fleet) is read into memory through the connection's handle and
//! compressed there; a larger one is compressed while the check runs, from
//! a second handle ([`VfsFile`]).
//!
//! When the view holds WAL frames (an application wrote since the last
//! checkpoint), the backup API copies the database: a small one (file and
//! `-wal` up to [`IN_MEMORY_MAX`]) into an in-memory database, checked and
//! compressed there (no temporary file is created), a larger one into a
//! temporary file (no journal, no fsync: it is thrown away), checked and
//! compressed into a second one.
//!
//! The source connection opens the database inside its pinned directory
//! ([`crate::source::pin`]): the file, `-wal` and `-shm` it reads are one
//! directory's, whatever the path names meanwhile. The last check
//! (`still_there`) shows that the path still leads to the file read.
//!
//! Every cold snapshot starts with a [`SnapshotTimes`] record in an LZ4
//! *skippable frame* (which `lz4 -d` and every LZ4 frame decoder skip): when
//! the copy began and when it was complete. Point-in-time restore selects by
//! the recorded completion time, never by the store's listing time (whole
//! seconds on S3, and the end of the upload rather than of the copy).
//!
//! [`decompress`] classifies what goes wrong: a malformed frame, a failed
//! checksum or an object that ends early is [`Error::Damaged`]; an error of
//! the download stream is [`Error::Store`] (the caller may retry); an error
//! writing the output is [`Error::Io`]. Only damage may make a restore try an
//! older copy.
//!
//! The compressed object is kept in memory for databases up to
//! [`IN_MEMORY_MAX`] and staged in a temporary file above that;
//! [`Snapshot::upload`] sends either.
//!
//! Everything here except the upload is blocking file I/O; the scheduler
//! runs it on tokio's blocking pool.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use lz4_flex::frame::FrameEncoder;
use rusqlite::{Connection, OpenFlags};
use tempfile::{NamedTempFile, TempPath};

use object_store::path::Path as ObjPath;

use crate::capture::work::side_by_side;
use crate::error::IoContext;
use crate::replica::cold::SnapshotTimes;
use crate::replica::storage::Replica;
use crate::source::pin::Pinned;
use crate::source::shm::ShmClaim;
use crate::source::vfs::{VfsFile, VfsHandle};
use crate::{Error, Result};

/// How long to wait on a locked database (e.g. during a rollback-journal
/// write or an exclusive checkpoint) before giving up until the next cycle.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// How long this thread's snapshots wait on a locked database: see
    /// [`waiting_at_most`].
    static BUSY_WAIT: std::cell::Cell<Duration> = const { std::cell::Cell::new(BUSY_TIMEOUT) };
}

/// Runs `f` with this thread's snapshots waiting at most `wait` on a locked
/// database instead of [`BUSY_TIMEOUT`]. For a task that snapshots many
/// databases one after the other: an application that keeps its database
/// locked (`PRAGMA locking_mode=EXCLUSIVE`) costs the whole wait at every
/// attempt, and a dozen of them in a row stalled every scan for a minute
/// (black-box probe), so such a task spends one wait's worth in all (see
/// `daemon::scheduler`).
pub fn waiting_at_most<T>(wait: Duration, f: impl FnOnce() -> T) -> T {
    struct Restore(Duration);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUSY_WAIT.with(|w| w.set(self.0));
        }
    }
    let _restore = Restore(BUSY_WAIT.with(|w| w.replace(wait)));
    f()
}

/// This thread's wait on a locked database (see [`waiting_at_most`]).
fn busy_wait() -> Duration {
    BUSY_WAIT.with(|w| w.get())
}

/// Copy buffer for compression and decompression: large enough to keep
/// syscalls rare, small enough that 100 concurrent uploads cost little.
pub const IO_BUFFER: usize = 256 * 1024;
/// The smallest copy buffer, for tiny files: one page of the largest usual
/// SQLite page size.
const MIN_IO_BUFFER: usize = 8 * 1024;

/// Any skippable frame: the magic without its low nibble.
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE_BASE: u32 = 0x184D_2A50;

/// Databases up to this size (file and `-wal`) are copied, checked and
/// compressed in memory, not through staged files: no temporary file to
/// create, write, read back and unlink, for what is almost every database
/// of a fleet. The copy lives only while its snapshot runs (a few at once,
/// see [`crate::capture::work`]); the compressed objects wait for their
/// upload, which at `max-concurrent` 100 bounds them to ~100 MiB
/// (compressed objects are smaller than their database), within what the
/// upload of a staged file already held (it reads objects up to
/// [`crate::replica::storage::UPLOAD_PART`] into memory).
pub const IN_MEMORY_MAX: u64 = 1024 * 1024;

/// Where a compressed snapshot waits for its upload.
#[derive(Debug)]
pub enum Staged {
    /// A small snapshot, whole in memory.
    Memory(bytes::Bytes),
    /// A large one, in a temporary `.lz4` file (deleted when dropped).
    File(TempPath),
}

/// How a snapshot read its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// The backup API copied it into an in-memory database (small ones
    /// whose read transaction saw WAL frames).
    InMemory,
    /// A small one, read from its file into memory inside a read
    /// transaction that saw the file alone.
    DirectInMemory,
    /// The backup API copied it into a temporary file (its read transaction
    /// saw WAL frames).
    TempFile,
    /// Its file was read directly, inside a read transaction that saw the
    /// file alone, while that transaction checked it.
    Direct,
    /// The same, through the connection's own handle after the check (the
    /// path names another file now, or no second handle could be opened).
    DirectAfterCheck,
}

/// A compressed snapshot waiting for its upload.
#[derive(Debug)]
pub struct Snapshot {
    /// The compressed object: the [`SnapshotTimes`] record, then the LZ4 frame.
    pub staged: Staged,
    /// How the database was read.
    pub copied: Copied,
    /// Size of the uncompressed database copy.
    pub db_bytes: u64,
    /// Size of the compressed file.
    pub compressed_bytes: u64,
    /// When the copy began and was complete (also recorded in the file).
    pub times: SnapshotTimes,
    /// The fingerprint of the database's files at its path
    /// ([`crate::source::track::fingerprint_with`]), taken right before the
    /// last checks that the path names what was read (`still_there`):
    /// what the snapshot holds, for telling it from what the scan saw.
    pub read: u64,
}

impl Snapshot {
    /// The snapshot with [`Snapshot::read`] set.
    fn read(mut self, read: u64) -> Snapshot {
        self.read = read;
        self
    }
}

/// A read-only connection to a source database, with the claim on its
/// `-shm` that it holds while open ([`crate::source::shm`]). Used as the
/// [`Connection`] it derefs to.
pub struct ReadOnly {
    /// Declared first: closed before the claim is released and the
    /// directory unpinned.
    conn: Connection,
    _shm: ShmClaim,
    /// Its directory ([`crate::source::pin`]), where SQLite opens its side
    /// files by name while the connection lives.
    dir: Pinned,
}

impl std::ops::Deref for ReadOnly {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// Opens `path` read-only (no checkpoint on close, no WAL deletion), with
/// its directory pinned ([`crate::source::pin`]): its `-wal` and `-shm` are
/// the ones beside the file opened, whatever the path names meanwhile.
/// Found below the pattern root `root`, it is opened only through real
/// directories from there ([`crate::source::pin::pin_below`]). Only regular files (see
/// [`crate::source::discover::check_regular_files`]), and only while this
/// process has its `-shm` open for no other database
/// ([`crate::source::shm`]).
pub fn open_read_only(path: &Path, root: Option<&Path>) -> Result<ReadOnly> {
    let dir = crate::source::pin::pin_below(root, path)?;
    let files = crate::source::discover::check_regular_files_at(path, &dir)?;
    let shm = crate::source::shm::claim(path, files)?;
    let conn = dir
        .open(
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| open_failed(path, e))?;
    conn.busy_timeout(busy_wait())
        .map_err(|e| Error::sqlite(path, e))?;
    Ok(ReadOnly {
        conn,
        _shm: shm,
        dir,
    })
}

/// The error of a failed open of the database `path`. SQLite says only
/// "unable to open database file" and its connection, closed with the
/// failure, takes the cause with it; the file system's cause (out of
/// descriptors, permission, gone) is what a reader needs (black-box probe
/// J20: under `EMFILE` snapshots failed as the database's fault, errno
/// lost). Asked through SQLite's own VFS, never with a descriptor of ours
/// (closing one would drop this process's locks on the file).
pub fn open_failed(path: &Path, e: rusqlite::Error) -> Error {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen) {
        if let Err(cause) = crate::source::vfs::VfsFile::open(path) {
            return Error::io(path, cause);
        }
    }
    Error::sqlite(path, e)
}

/// Copies the database of connection `source` (named `src` in errors) into a
/// new file `dst`. If `source` is inside a read transaction, the copy is
/// exactly that transaction's view (the hot tier relies on this).
pub fn backup_from(source: &Connection, src: &Path, dst: &Path) -> Result<()> {
    let mut target = Connection::open(dst).map_err(|e| Error::sqlite(dst, e))?;
    // The copy is a throwaway file until it is compressed: a crash leaves a
    // temporary file to discard, never one to recover. No rollback journal
    // (created, synced and deleted per snapshot otherwise) and no fsync.
    target
        .execute_batch("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;")
        .map_err(|e| Error::sqlite(dst, e))?;
    copy_pages(source, src, &mut target).map_err(|e| copy_full(e, dst))?;
    target.close().map_err(|(_, e)| Error::sqlite(dst, e))?;
    Ok(())
}

/// A backup step that failed because the disk is full failed writing the
/// copy, `dst`, not reading the source: named so (black-box probe J20: a
/// full `temp-dir` read "<the source database>: database or disk is full").
fn copy_full(e: Error, dst: &Path) -> Error {
    match e {
        Error::Sqlite { source, .. }
            if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) =>
        {
            Error::sqlite(dst, source)
        }
        e => e,
    }
}

/// Copies the database of connection `source` (named `src` in errors) into
/// a new in-memory database: no file to create, write, reopen and unlink,
/// which is most of the cost of snapshotting a small database. The empty
/// target takes the source's page size from the backup.
pub fn backup_in_memory(source: &Connection, src: &Path) -> Result<Connection> {
    let mut target = Connection::open_in_memory().map_err(|e| Error::sqlite(src, e))?;
    copy_pages(source, src, &mut target)?;
    Ok(target)
}

/// Runs the backup from `source` into the empty `target` in one step.
fn copy_pages(source: &Connection, src: &Path, target: &mut Connection) -> Result<()> {
    let backup =
        rusqlite::backup::Backup::new(source, target).map_err(|e| Error::sqlite(src, e))?;
    // -1: all pages in one step, i.e. one read transaction -> one consistent version.
    // Busy/Locked (a writer holds an exclusive lock) is retried for this
    // thread's wait (BUSY_TIMEOUT unless `waiting_at_most`).
    let deadline = std::time::Instant::now() + busy_wait();
    loop {
        use rusqlite::backup::StepResult;
        match backup.step(-1).map_err(|e| Error::sqlite(src, e))? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => {
                return Err(Error::invalid(
                    src.display(),
                    format!("backup did not complete ({other:?}): the database stayed locked"),
                ))
            }
        }
    }
}

/// Takes a consistent, compressed snapshot of `db` using `tmp_dir` for
/// staging; `db` was found below the pattern root `root`, if any
/// ([`open_read_only`]).
///
/// When a read transaction sees the database file alone ([`file_only`]),
/// the file is read directly, checked on that transaction: into memory if
/// that version fits in [`IN_MEMORY_MAX`], else compressed into a staged
/// file in `tmp_dir`. Otherwise the backup API copies it, into an in-memory
/// database (file and `-wal` together up to [`IN_MEMORY_MAX`]) or a
/// temporary file in `tmp_dir`, where it is checked and compressed.
pub fn capture(db: &Path, root: Option<&Path>, key: &str, tmp_dir: &Path) -> Result<Snapshot> {
    let source = open_read_only(db, root)?;
    if !has_header(&source, db)? {
        return Err(no_header(db));
    }
    capture_open(source, db, key, tmp_dir)
}

/// Whether the main file of `conn` (the database `db`) starts with SQLite's
/// header, read through the connection's own handle before any statement
/// runs. Checked before the first read transaction because that is where
/// SQLite, finding an empty database file beside a `-wal`, deletes the
/// `-wal` (any connection, read-only too): litefleet never reads a file
/// that is not (or no longer) a database, so it never deletes that WAL.
pub fn has_header(conn: &Connection, db: &Path) -> Result<bool> {
    connection_file(conn, db)?.has_sqlite_header().at(db)
}

/// The error for a known database whose file lost SQLite's header.
pub fn no_header(db: &Path) -> Error {
    Error::invalid(
        db.display(),
        "no longer starts with SQLite's header (empty, or written over): not read, so its -wal is left alone",
    )
}

/// [`capture`] for a file whose header was never read: `None`, and nothing
/// read past its first 16 bytes, if it does not start with SQLite's header.
/// The header is read through the snapshot's own connection (its main file,
/// [`VfsHandle::of`]), so a new database is opened once, not once for the
/// header and again for the snapshot.
pub fn capture_if_sqlite(
    db: &Path,
    root: Option<&Path>,
    key: &str,
    tmp_dir: &Path,
) -> Result<Option<Snapshot>> {
    let source = open_read_only(db, root)?;
    if !has_header(&source, db)? {
        return Ok(None);
    }
    capture_open(source, db, key, tmp_dir).map(Some)
}

/// [`capture`] on `source`, a connection [`open_read_only`] on `db`.
fn capture_open(source: ReadOnly, db: &Path, key: &str, tmp_dir: &Path) -> Result<Snapshot> {
    let started = Utc::now();
    #[cfg(test)]
    tests::BEFORE_READ.with(|h| h.borrow_mut().take().map(|f| f()));
    if let Some(db_bytes) = file_only(&source, db)? {
        if db_bytes <= IN_MEMORY_MAX {
            return capture_small(source, db, key, db_bytes, started);
        }
        std::fs::create_dir_all(tmp_dir).at(tmp_dir)?;
        return capture_file(source, db, key, db_bytes, started, tmp_dir);
    }
    // WAL frames in view: a copy through the backup API, in memory if the
    // file and its `-wal` (in the pinned directory, where SQLite reads
    // them: one lookup each relative to its descriptor) are small.
    let len = |suffix: &str, named: &Path| match source.dir.lstat(suffix) {
        Ok(e) => Ok(e.len),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io(named, e)),
    };
    let on_disk = len("", db)? + len("-wal", &crate::source::discover::wal_path(db))?;
    if on_disk <= IN_MEMORY_MAX {
        let mut copy = backup_in_memory(&source, db)?;
        let read = still_there(&source, db)?;
        drop(source);
        let times = SnapshotTimes {
            started,
            taken: Utc::now(),
        };
        check_conn(&copy, db, "quick_check").map_err(|e| damaged_copy(db, e))?;
        let data = copy
            .serialize(rusqlite::MAIN_DB)
            .map_err(|e| Error::sqlite(db, e))?;
        return in_memory(db, key, &data, times, Copied::InMemory).map(|s| s.read(read));
    }
    std::fs::create_dir_all(tmp_dir).at(tmp_dir)?;
    let copy = NamedTempFile::with_prefix_in(".copy.litefleet-", tmp_dir)
        .at(tmp_dir)?
        .into_temp_path();
    backup_from(&source, db, &copy)?;
    let read = still_there(&source, db)?;
    drop(source);
    let times = SnapshotTimes {
        started,
        taken: Utc::now(),
    };
    // The copy is ours alone: checked and compressed side by side.
    let input = File::open(&copy).at(&*copy)?;
    let db_bytes = input.metadata().at(&*copy)?.len();
    let (snap, ()) = check_beside(
        || (check(&copy, "quick_check"), ()),
        || {
            stage(
                &copy,
                key,
                input,
                db_bytes,
                times,
                tmp_dir,
                Copied::TempFile,
            )
        },
        db,
    )?;
    Ok(snap.read(read))
}

/// Compresses the `db_bytes` of `input` (read from `src`) behind the
/// `times` record into a new staged file in `tmp_dir`.
fn stage(
    src: &Path,
    key: &str,
    input: impl Read,
    db_bytes: u64,
    times: SnapshotTimes,
    tmp_dir: &Path,
    copied: Copied,
) -> Result<Snapshot> {
    let out = staged_file(tmp_dir)?;
    let mut w = BufWriter::with_capacity(io_buffer(db_bytes), out.as_file());
    w.write_all(&times.encode_for(key)).at(out.path())?;
    let mut w = compress_stream(src, input, db_bytes, w, out.path())?;
    w.flush().at(out.path())?;
    drop(w);
    let staged = out.into_temp_path();
    Ok(Snapshot {
        compressed_bytes: std::fs::metadata(&staged).at(&*staged)?.len(),
        staged: Staged::File(staged),
        copied,
        db_bytes,
        times,
        read: 0,
    })
}

/// A new file in `tmp_dir` for a compressed snapshot. Created 0666 minus
/// the umask, as `object_store` creates objects, because a `file://`
/// replica may link it in as the object itself
/// ([`Replica::upload_file`]); tempfile's default, 0600, would make such
/// objects unreadable to anyone else.
pub fn staged_file(tmp_dir: &Path) -> Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".snap.litefleet-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(tmp_dir)
        .at(tmp_dir)
}

/// Opens a read transaction on `source` (the database `db`) and returns the
/// size of the transaction's version when that transaction sees the database
/// file alone: then the file's first that many bytes are exactly that
/// version, and stay so until the transaction ends. Otherwise (WAL frames in
/// view) ends the transaction and returns `None`.
///
/// The transaction sees the file alone when, checked while it is open:
/// - the connection is not in WAL mode (a rollback journal: our shared lock
///   keeps every writer out of the file);
/// - or the WAL-index says every frame of the WAL is in the file already
///   (`nBackfill == mxFrame`, [`VfsHandle::wal_index`]). A reader that uses frames
///   up to `m` keeps checkpoints from backfilling past `m`, so if the
///   backfill has reached the newest frame, `m` is the newest frame and the
///   file holds it; a reader that uses no frame holds read-lock 0, which
///   every backfill must take exclusively. An empty WAL has no frame, so
///   its index says so too (`0 == 0`). Not judged by the `-wal` at the
///   path: one renamed or deleted from under the connection stays in its
///   view through SQLite's handle
///   (`a_wal_renamed_away_is_still_in_the_transactions_view`).
///
/// Nothing here opens the database or its `-shm` with a descriptor of its
/// own: closing one would drop every POSIX lock this process holds on that
/// file, the hot tier's among them. The file is read through SQLite's own
/// handle ([`VfsHandle::of`]).
pub fn file_only(source: &Connection, db: &Path) -> Result<Option<u64>> {
    let sql = |e| Error::sqlite(db, e);
    // The first read starts the transaction (and waits out a busy writer
    // for BUSY_TIMEOUT). It reads a header field only: a statement that
    // needs the schema (these pragmas, `quick_check`) run before the
    // transaction began would load it in a transaction of its own, one
    // more round of locks and reads per snapshot.
    source
        .execute_batch("BEGIN; PRAGMA schema_version;")
        .map_err(sql)?;
    let pages: i64 = source
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(sql)?;
    let page_size: i64 = source
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(sql)?;
    let mode: String = source
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(sql)?;
    if pages <= 0 {
        // The header was there when the file was opened: emptied since (a
        // `cp` over it truncates it first). A copy would be a new, empty
        // database, a state this one never had (black-box probe: uploaded
        // as the latest backup, exit 0 on restore).
        source.execute_batch("COMMIT").map_err(sql)?;
        return Err(Error::invalid(
            db.display(),
            "is empty now (emptied or being written over while it was read): not uploading a copy",
        ));
    }
    let alone = !mode.eq_ignore_ascii_case("wal")
        || VfsHandle::of(source)
            .and_then(|f| f.wal_index())
            .is_some_and(|i| i.backfill == i.max_frame);
    if alone && pages > 0 && page_size > 0 {
        return Ok(Some(pages as u64 * page_size as u64));
    }
    source.execute_batch("COMMIT").map_err(sql)?;
    Ok(None)
}

/// The connection's own handle on `db`'s file (see [`VfsHandle::of`]).
pub fn connection_file<'c>(source: &'c Connection, db: &Path) -> Result<VfsHandle<'c>> {
    VfsHandle::of(source)
        .ok_or_else(|| Error::invalid(db.display(), "SQLite gives no handle of the open file"))
}

/// Reads all of `buf` at an offset: the two SQLite handles a snapshot reads
/// a database file through, the connection's and one of its own.
trait ReadAt {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for VfsHandle<'_> {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        VfsHandle::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for VfsFile {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.handle()?.read_exact_at(buf, offset)
    }
}

/// The first `end` bytes of a file, as a reader.
struct Prefix<F> {
    file: F,
    pos: u64,
    end: u64,
}

impl<F: ReadAt> Read for Prefix<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.pos) as usize;
        if n > 0 {
            self.file.read_exact_at(&mut buf[..n], self.pos)?;
            self.pos += n as u64;
        }
        Ok(n)
    }
}

/// Checks `source`, whose read transaction [`file_only`] opened, with
/// `quick_check`, and compresses the first `db_bytes` of its file, which
/// that transaction keeps unchanged until both are done: no copy.
///
/// The two run side by side when a second handle on the same file can be
/// opened through SQLite's VFS ([`VfsFile`]: SQLite asks only that no two
/// threads use one handle at once, and its VFS keeps this process's locks
/// when the handle closes). That handle is opened by path, so it is used
/// only if neither it nor the connection's file has moved since (checked
/// connection, new handle, connection again: the path would have to be
/// renamed away and back between two `stat`s). Otherwise the file is read
/// through the connection's own handle after the check.
fn capture_file(
    source: ReadOnly,
    db: &Path,
    key: &str,
    db_bytes: u64,
    started: chrono::DateTime<Utc>,
    tmp_dir: &Path,
) -> Result<Snapshot> {
    // The transaction's version is the file now: it existed at this time.
    let times = SnapshotTimes {
        started,
        taken: Utc::now(),
    };
    let moved = |f: Option<VfsHandle>| f.is_none_or(|f| f.has_moved().unwrap_or(true));
    // Opened where SQLite opened the file: in its pinned directory.
    let beside = VfsFile::open(source.dir.path()).ok().and_then(|mut f| {
        let same = !moved(VfsHandle::of(&source))
            && !moved(f.handle().ok())
            && !moved(VfsHandle::of(&source));
        same.then_some(f)
    });
    if let Some(file) = beside {
        let input = Prefix {
            file,
            pos: 0,
            end: db_bytes,
        };
        // The connection comes back from the check, so its transaction
        // lasts until the compression is done too.
        let (snap, source) = check_beside(
            move || {
                let checked = check_conn(&source, db, "quick_check");
                (checked, source)
            },
            || stage(db, key, input, db_bytes, times, tmp_dir, Copied::Direct),
            db,
        )?;
        let read = still_there(&source, db)?;
        return Ok(snap.read(read));
    }
    check_conn(&source, db, "quick_check").map_err(|e| damaged_copy(db, e))?;
    let file = connection_file(&source, db)?;
    let input = Prefix {
        file,
        pos: 0,
        end: db_bytes,
    };
    // `input` borrows `source`, whose read transaction lasts until the
    // whole file is compressed.
    let snap = stage(
        db,
        key,
        input,
        db_bytes,
        times,
        tmp_dir,
        Copied::DirectAfterCheck,
    )?;
    let read = still_there(&source, db)?;
    Ok(snap.read(read))
}

/// Fails unless `db`'s path still names the file `source` has open (not
/// renamed away, replaced or deleted), checked once the copy is complete.
/// The connection opened the file at that path; if the path still holds
/// it now, it held it all along, so the copy is a state of this database.
/// A file renamed away between the open and the read took commits made
/// at its new path (another database's, or an application's stragglers
/// after a rotation), and its copy was uploaded as this database's state,
/// which it never had (the hot tier's generation starts showed it: black-box
/// probe). Checked with the path as given and as SQLite opened it (in the
/// pinned directory, [`crate::source::pin`]; `SQLITE_FCNTL_HAS_MOVED`),
/// and with the WAL ([`same_wal`]); returns the files' fingerprint for
/// [`Snapshot::read`].
///
/// The pin is what makes these checks enough: the file, `-wal` and `-shm`
/// read are one directory's, so a directory exchanged for another tree and
/// back during the snapshot gives a copy of one tree's database, never one
/// tree's file with the other's WAL frames (black-box probe N21), and
/// the path leading to that file at the end shows it is this database's.
fn still_there(source: &ReadOnly, db: &Path) -> Result<u64> {
    #[cfg(test)]
    tests::BEFORE_CHECK.with(|h| h.borrow_mut().take().map(|f| f()));
    // SQLite's own check (`has_moved`, below) looks at the path it opened:
    // in the pinned directory, or with the links SQLite resolved at the
    // open. A directory or link on the path changed since is invisible to
    // it (black-box probe N21). So the path as given must lead to the file
    // at the opened one; the fingerprint for [`Snapshot::read`] comes from
    // that very `stat`.
    let moved = || {
        Error::invalid(
            db.display(),
            "was replaced, renamed or deleted while it was copied: not uploading this copy \
             (the next cycle copies the file at this path then)",
        )
    };
    // A path that names nothing now: moved away or deleted.
    let stat = |path: &Path| match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(moved()),
        m => m.at(path),
    };
    let here = stat(db)?;
    use std::os::unix::fs::MetadataExt;
    // The file read: in the pinned directory, one lookup relative to its
    // descriptor; else at the path SQLite resolved, named in the message
    // (a pinned path names a descriptor, nothing a reader can look at).
    let (read_id, shown) = if source.dir.is_pinned() {
        match source.dir.lstat("") {
            Ok(e) => (Some(e.id), String::new()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(moved()),
            Err(e) => return Err(Error::io(db, e)),
        }
    } else {
        match source.path().map(PathBuf::from).filter(|r| r != db) {
            Some(r) => {
                let there = stat(&r)?;
                (
                    Some((there.dev(), there.ino())),
                    format!(" ({})", r.display()),
                )
            }
            None => (None, String::new()),
        }
    };
    if read_id.is_some_and(|id| id != (here.dev(), here.ino())) {
        return Err(Error::invalid(
            db.display(),
            format!(
                "its path leads to another file now than the one read{shown}: a link or \
                 directory on its path changed while it was read; not uploading this copy \
                 (the next cycle copies the database as it is then)"
            ),
        ));
    }
    let read = crate::source::track::fingerprint_with(db, &here);
    if connection_file(source, db)?.has_moved().at(db)? {
        return Err(moved());
    }
    if !same_wal(source, db)? {
        return Err(Error::invalid(
            db.display(),
            "its -wal or -shm is not the one at its path now (replaced, or its directory \
             exchanged and back while it was read): not uploading this copy (the next cycle \
             copies the database as it is then)",
        ));
    }
    Ok(read)
}

/// The bytes of a WAL header: magic, format, page size, checkpoint
/// sequence, the two salts (new at every restart, random) and a checksum.
const WAL_HEADER: usize = 32;

/// Whether the WAL `source` reads (and the WAL-index it reads it with) are
/// the ones at `db`'s path now. SQLite opens a database's `-wal` and `-shm`
/// by name after the file itself: in the pinned directory
/// ([`crate::source::pin`]), where a `-wal` renamed in or away meanwhile
/// is another than the one at the path; unpinned (no `/proc`), a directory
/// on the path exchanged for another tree and back within one snapshot
/// gave one tree's file with the other's WAL frames, while
/// [`still_there`] saw the path as it was (black-box probe N21). Told by
/// the WAL headers, read now through SQLite's handle and at the path (the
/// salts differ between any two WALs that did not start as copies of one
/// another), and by the WAL-index's salts, which are the header's while the
/// index holds frames. True when the connection has no WAL open (rollback
/// mode).
///
/// An application's commit may restart the WAL (new salts, same file)
/// between those reads, and they disagree though nothing was replaced:
/// the snapshot of a database written and checkpointed without pause was
/// refused about once in 1,200 (CI, 2026-12-07:
/// `large_snapshots_are_consistent_while_the_database_is_written`). So the
/// reads are taken again, up to [`SAME_WAL_READS`] times: any one round
/// that agrees shows the same WAL (headers equal in salts come from one
/// WAL), while a WAL that is another keeps disagreeing in every round.
///
/// The `-wal` at the path is read with a descriptor of our own: SQLite
/// locks the database file and its `-shm`, never the `-wal`, so closing it
/// drops no lock of this process. Opened without blocking and without
/// following a link (`a_fifo_in_place_of_the_wal_never_blocks_the_last_check`).
fn same_wal(source: &Connection, db: &Path) -> Result<bool> {
    let Some(ours) = VfsHandle::wal_of(source) else {
        return Ok(true);
    };
    let wal_path = crate::source::discover::wal_path(db);
    for _ in 0..SAME_WAL_READS {
        if wal_reads_agree(source, ours, &wal_path)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Rounds of reads [`same_wal`] takes before it calls a WAL another: each
/// round lasts microseconds, and a restart needs an application's commit
/// after a complete checkpoint, so a same WAL that disagrees in three
/// rounds in a row takes three such restarts each falling inside one;
/// a WAL that is another disagrees in every round, and costs two rounds
/// more before the copy is refused.
const SAME_WAL_READS: usize = 3;

/// One round of [`same_wal`]: whether the header of `ours` (the WAL
/// `source` reads) agrees with the one at `wal_path` now and with the
/// salts of `source`'s WAL-index.
fn wal_reads_agree(source: &Connection, ours: VfsHandle, wal_path: &Path) -> Result<bool> {
    let mut read = [0u8; WAL_HEADER];
    let n = usize::try_from(ours.size().at(wal_path)?.clamp(0, WAL_HEADER as i64)).unwrap_or(0);
    ours.read_exact_at(&mut read[..n], 0).at(wal_path)?;
    #[cfg(test)]
    tests::BETWEEN_WAL_READS.with(|h| h.borrow_mut().take().map(|f| f()));
    let mut there = [0u8; WAL_HEADER];
    // Never blocked by a FIFO renamed there, never through a link: either
    // reads no WAL header, and the copy is refused.
    let opened = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(wal_path)
    };
    let m = match opened {
        Ok(mut f) => read_full(&mut f, &mut there).at(wal_path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(wal_path, e)),
    };
    if read[..n] != there[..m] {
        return Ok(false);
    }
    let index = VfsHandle::of(source).and_then(|f| f.wal_index());
    Ok(match index {
        Some(i) if i.max_frame > 0 && n == WAL_HEADER => {
            let be32 = crate::capture::wal::be32;
            i.header_salts() == [be32(&read, 16), be32(&read, 20)]
        }
        _ => true,
    })
}

/// Runs `check` (a `quick_check` of `db`, returning its result and whatever
/// must outlive the compression) on a thread of its own while `compress`
/// runs here ([`side_by_side`], which runs it here after the compression
/// where the host gives no thread): on two cores the snapshot takes about
/// as long as the longer of the two. A failed check discards the
/// compressed snapshot.
fn check_beside<K: Send>(
    check: impl FnOnce() -> (Result<()>, K) + Send,
    compress: impl FnOnce() -> Result<Snapshot>,
    db: &Path,
) -> Result<(Snapshot, K)> {
    checked_beside(side_by_side(check, compress), db)
}

/// The outcome of [`check_beside`] from the two results.
fn checked_beside<K>(
    (checking, snap): (std::thread::Result<(Result<()>, K)>, Result<Snapshot>),
    db: &Path,
) -> Result<(Snapshot, K)> {
    let (checked, keep) =
        checking.map_err(|_| Error::invalid(db.display(), "the integrity check panicked"))?;
    checked.map_err(|e| damaged_copy(db, e))?;
    Ok((snap?, keep))
}

/// A small database whose read transaction sees its file alone
/// ([`file_only`]): checked on that transaction, its file read into memory
/// through the connection's own handle and compressed from there, with no
/// second connection and no backup copy.
fn capture_small(
    source: ReadOnly,
    db: &Path,
    key: &str,
    db_bytes: u64,
    started: chrono::DateTime<Utc>,
) -> Result<Snapshot> {
    let times = SnapshotTimes {
        started,
        taken: Utc::now(),
    };
    check_conn(&source, db, "quick_check").map_err(|e| damaged_copy(db, e))?;
    let len = usize::try_from(db_bytes).map_err(|e| Error::invalid(db.display(), e.to_string()))?;
    let mut data = vec![0u8; len];
    connection_file(&source, db)?
        .read_exact_at(&mut data, 0)
        .at(db)?;
    let read = still_there(&source, db)?;
    drop(source);
    in_memory(db, key, &data, times, Copied::DirectInMemory).map(|s| s.read(read))
}

/// A snapshot of `data`, the consistent bytes of `db`, compressed into
/// memory behind its times record.
fn in_memory(
    db: &Path,
    key: &str,
    data: &[u8],
    times: SnapshotTimes,
    copied: Copied,
) -> Result<Snapshot> {
    let db_bytes = data.len() as u64;
    let memory = Path::new("(memory)");
    let out = if data.is_empty() || data.len() > SMALL_BLOCK {
        let head = times.encode_for(key).to_vec();
        bytes::Bytes::from(compress_stream(db, data, db_bytes, head, memory)?)
    } else {
        SMALL_ENCODER.with(|cell| {
            let mut cached = cell.borrow_mut();
            // Taken out while in use: an error drops it, never reused half-way.
            let mut enc = cached
                .take()
                .unwrap_or_else(|| FrameEncoder::with_frame_info(frame_info(0), Vec::new()));
            enc.get_mut().clear();
            enc.get_mut().extend_from_slice(&times.encode_for(key));
            enc.write_all(data).at(memory)?;
            enc.try_finish().map_err(|e| lz4_error(e, db, memory))?;
            let out = bytes::Bytes::copy_from_slice(enc.get_ref());
            *cached = Some(enc);
            Ok::<_, Error>(out)
        })?
    };
    Ok(Snapshot {
        compressed_bytes: out.len() as u64,
        staged: Staged::Memory(out),
        copied,
        db_bytes,
        times,
        read: 0,
    })
}

/// The smallest LZ4 block (64 KiB): a database up to this size is
/// compressed into one block by [`SMALL_ENCODER`].
const SMALL_BLOCK: usize = 64 << 10;

thread_local! {
    /// One frame encoder per snapshot thread for databases of one block: an
    /// encoder holds ~150 KiB of buffers (input, output, match table) that
    /// would otherwise be allocated, zeroed and freed for every small
    /// database, a few percent of a first backup's CPU. `lz4_flex` starts a
    /// new frame on an encoder after `try_finish` and resets its state (the
    /// table cleared, the checksum restarted); only an empty input would not
    /// start one, so it never comes here. Freed with the thread.
    static SMALL_ENCODER: std::cell::RefCell<Option<FrameEncoder<Vec<u8>>>> =
        const { std::cell::RefCell::new(None) };
}

/// A corrupt or truncated source copies "successfully" page by page; never
/// let such a copy overwrite a good snapshot of the same hour. `e` is what
/// the check said: its findings, or SQLite's error. Only an error that
/// says the file is corrupt or no database is damage; any other (an I/O
/// error, a full disk, no memory) is not, and stays itself: a staged copy
/// on a full `temp-dir` failing its check with "disk I/O error" was
/// reported as the source database's damage (black-box probe Z32).
fn damaged_copy(db: &Path, e: Error) -> Error {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match &e {
        Error::Sqlite { source, .. }
            if !matches!(
                source.sqlite_error_code(),
                Some(DatabaseCorrupt | NotADatabase)
            ) =>
        {
            e
        }
        _ => Error::invalid(
            db.display(),
            format!("database is damaged, not uploading this copy ({e})"),
        ),
    }
}

impl Snapshot {
    /// Uploads the snapshot to `location` (one PUT, or a multipart upload
    /// for a large staged file), replacing the object of its hour there
    /// only if it is the one our last upload wrote
    /// ([`Replica::put_replacing`]); returns the compressed size.
    pub async fn upload(&self, replica: &Replica, location: &ObjPath) -> Result<u64> {
        match &self.staged {
            Staged::Memory(b) => {
                replica.put_replacing(location, b.clone()).await?;
                Ok(b.len() as u64)
            }
            Staged::File(f) => replica.upload_file_replacing(location, f).await,
        }
    }

    /// Reads the compressed object (for checks and tests).
    pub fn reader(&self) -> Result<Box<dyn Read + Send>> {
        Ok(match &self.staged {
            Staged::Memory(b) => Box::new(std::io::Cursor::new(b.clone())),
            Staged::File(f) => Box::new(File::open(f).at(&**f)?),
        })
    }
}

/// LZ4 frame settings for `len` bytes of input: independent blocks and a
/// content checksum, so a damaged object fails loudly on restore instead of
/// yielding a bad database. The block is the smallest of 64 KiB, 256 KiB,
/// 1 MiB and 4 MiB that holds the whole input (4 MiB above that): the
/// encoder reserves about twice the block size up front, so a 16 KiB
/// database or a one-commit WAL segment costs ~130 KiB of buffers instead of
/// ~8 MiB, and the output is the same (the input fits one block either way).
pub(crate) fn frame_info(len: u64) -> lz4_flex::frame::FrameInfo {
    use lz4_flex::frame::BlockSize;
    let block = [
        (64 << 10, BlockSize::Max64KB),
        (256 << 10, BlockSize::Max256KB),
        (1 << 20, BlockSize::Max1MB),
    ]
    .into_iter()
    .find(|&(size, _)| len <= size)
    .map_or(BlockSize::Max4MB, |(_, b)| b);
    lz4_flex::frame::FrameInfo::new()
        .block_size(block)
        .content_checksum(true)
}

/// Compresses file `src` into `out`, the file at `out_path` (LZ4 frame
/// format).
pub fn compress(src: &Path, out: &File, out_path: &Path) -> Result<()> {
    let input = File::open(src).at(src)?;
    let len = input.metadata().at(src)?.len();
    let mut w = compress_stream(
        src,
        input,
        len,
        BufWriter::with_capacity(io_buffer(len), out),
        out_path,
    )?;
    w.flush().at(out_path)
}

/// A copy buffer for a file of `len` bytes: no larger than the file (a
/// 256 KiB buffer is its own mmap per snapshot), within the bounds above.
fn io_buffer(len: u64) -> usize {
    (len as usize).clamp(MIN_IO_BUFFER, IO_BUFFER)
}

/// Compresses the `len` bytes of `input` (read from `src`) into `w`
/// (written to `out`); returns `w`. A read error names `src`, a write error
/// (a full disk, say) names `out`.
fn compress_stream<R: Read, W: Write>(
    src: &Path,
    mut input: R,
    len: u64,
    w: W,
    out: &Path,
) -> Result<W> {
    let mut enc = FrameEncoder::with_frame_info(frame_info(len), w);
    let mut buf = vec![0u8; io_buffer(len)];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(src, e)),
        };
        enc.write_all(&buf[..n]).at(out)?;
    }
    enc.finish().map_err(|e| lz4_error(e, src, out))
}

/// An LZ4 encoder's error: a write error names the output `out`, anything
/// else the input `src`.
fn lz4_error(e: lz4_flex::frame::Error, src: &Path, out: &Path) -> Error {
    match e {
        lz4_flex::frame::Error::IoError(e) => Error::io(out, e),
        e => Error::invalid(src.display(), format!("lz4: {e}")),
    }
}

/// Reads past leading skippable frames (such as the [`SnapshotTimes`]
/// record); returns the first bytes of the LZ4 frame after them.
fn skip_skippable(src: &mut impl Read) -> std::io::Result<Vec<u8>> {
    loop {
        let mut magic = [0u8; 4];
        let n = read_full(src, &mut magic)?;
        if n < 4 || u32::from_le_bytes(magic) & SKIPPABLE_MASK != SKIPPABLE_BASE {
            return Ok(magic[..n].to_vec());
        }
        let mut len = [0u8; 4];
        src.read_exact(&mut len)?;
        let len = u64::from(u32::from_le_bytes(len));
        let skipped = std::io::copy(&mut src.take(len), &mut std::io::sink())?;
        if skipped < len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// `read_exact` that reports how much it read at end of input.
pub(crate) fn read_full(src: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// An error of the stream a snapshot is read from (the download): carried
/// through the decoder's `io::Error` and turned back into [`Error::Store`].
#[derive(Debug)]
pub struct StreamError(pub object_store::Error);

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StreamError {}

impl StreamError {
    /// An `io::Error` for a stream of object bytes.
    pub fn io(e: object_store::Error) -> std::io::Error {
        std::io::Error::other(StreamError(e))
    }
}

/// The store's error, when reading `what` failed because its download did
/// ([`StreamError`]); else `e` back.
pub(crate) fn store_error(
    what: &str,
    e: std::io::Error,
) -> std::result::Result<Error, std::io::Error> {
    if !e.get_ref().is_some_and(|i| i.is::<StreamError>()) {
        return Err(e);
    }
    let source = e
        .into_inner()
        .and_then(|i| i.downcast::<StreamError>().ok())
        .map(|s| s.0)
        .expect("checked above");
    Ok(Error::store(what, source))
}

/// Classifies an error reading (and decoding) `what`; see the module docs.
fn read_error(what: &str, e: std::io::Error) -> Error {
    let e = match store_error(what, e) {
        Ok(store) => return store,
        Err(e) => e,
    };
    let inner = e.get_ref();
    if inner.is_some_and(|i| i.is::<lz4_flex::frame::Error>())
        || e.kind() == std::io::ErrorKind::UnexpectedEof
    {
        return Error::damaged(what, format!("not a valid LZ4 snapshot: {e}"));
    }
    Error::invalid(what, format!("reading failed: {e}"))
}

/// The input of an LZ4 frame decoder, watched for its end.
///
/// `lz4_flex`'s decoder ends a frame quietly where its input ends before a
/// block header, as if the frame were complete: an object cut short at a
/// block boundary (an upload or a copy that stopped early, a damaged file)
/// would decode to a prefix of the database or of a WAL segment, without its
/// end mark and content checksum ever being read. A complete frame is read
/// up to its checksum and no further, so the decoder never meets the end of
/// its input: [`FrameInput::finish`] fails when it did, or when bytes follow
/// the frame.
pub(crate) struct FrameInput<R> {
    inner: R,
    ran_dry: bool,
}

impl<R: Read> FrameInput<R> {
    pub(crate) fn new(inner: R) -> Self {
        FrameInput {
            inner,
            ran_dry: false,
        }
    }

    /// After the decoder returned the end of its frame: the frame was whole
    /// and nothing follows it.
    pub(crate) fn finish(mut self) -> std::result::Result<(), FrameEnd> {
        if self.ran_dry {
            return Err(FrameEnd::CutShort);
        }
        let mut more = [0u8; 1];
        match read_full(&mut self.inner, &mut more) {
            Ok(0) => Ok(()),
            Ok(_) => Err(FrameEnd::Trailing),
            Err(e) => Err(FrameEnd::Read(e)),
        }
    }
}

/// Why [`FrameInput::finish`] refused the end of a frame.
#[derive(Debug)]
pub(crate) enum FrameEnd {
    CutShort,
    Trailing,
    /// Reading past the frame failed (the download broke).
    Read(std::io::Error),
}

impl std::fmt::Display for FrameEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameEnd::CutShort => {
                f.write_str("the frame is cut short (no end mark and content checksum)")
            }
            FrameEnd::Trailing => f.write_str("bytes follow the end of its frame"),
            FrameEnd::Read(e) => e.fmt(f),
        }
    }
}

impl<R: Read> Read for FrameInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ran_dry = true;
        }
        Ok(n)
    }
}

/// Decompresses an LZ4 frame stream into `dst` (named `out` in errors),
/// skipping leading skippable frames; returns the bytes written. The frame
/// must be whole (`FrameInput`) and the last thing in the stream. Errors
/// are classified (see the module docs).
pub fn decompress_to(src: impl Read, what: &str, dst: &mut File, out: &Path) -> Result<u64> {
    let mut src = BufReader::with_capacity(IO_BUFFER, src);
    let head = skip_skippable(&mut src).map_err(|e| read_error(what, e))?;
    let mut dec =
        lz4_flex::frame::FrameDecoder::new(FrameInput::new(std::io::Cursor::new(head).chain(src)));
    let mut w = BufWriter::with_capacity(IO_BUFFER, dst);
    let mut buf = vec![0u8; IO_BUFFER];
    let mut n = 0u64;
    loop {
        let k = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(what, e)),
        };
        w.write_all(&buf[..k]).at(out)?;
        n += k as u64;
    }
    if n == 0 {
        return Err(Error::damaged(what, "not a valid LZ4 snapshot: no frame"));
    }
    dec.into_inner().finish().map_err(|e| match e {
        FrameEnd::Read(e) => read_error(what, e),
        e => Error::damaged(what, format!("not a valid LZ4 snapshot: {e}")),
    })?;
    w.flush().at(out)?;
    Ok(n)
}

/// [`decompress_to`] for an output without a path of its own.
pub fn decompress(src: impl Read, what: &str, dst: &mut File) -> Result<u64> {
    decompress_to(src, what, dst, Path::new("(restore output)"))
}

/// Runs `PRAGMA integrity_check` on a database file; `Err` names what failed.
pub fn integrity_check(path: &Path) -> Result<()> {
    check(path, "integrity_check")
}

/// Runs `PRAGMA <pragma>` (`integrity_check` or the cheaper `quick_check`,
/// which skips index-content checks) and expects the single row `ok`.
pub(crate) fn check(path: &Path, pragma: &str) -> Result<()> {
    let conn = Connection::open(path).map_err(|e| Error::sqlite(path, e))?;
    check_conn(&conn, path, pragma)?;
    conn.close().map_err(|(_, e)| Error::sqlite(path, e))
}

/// [`check`] on an open connection (its database named `path` in errors).
fn check_conn(conn: &Connection, path: &Path, pragma: &str) -> Result<()> {
    let mut stmt = conn
        .prepare(&format!("PRAGMA {pragma}"))
        .map_err(|e| Error::sqlite(path, e))?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|it| it.collect())
        .map_err(|e| Error::sqlite(path, e))?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(Error::invalid(
            path.display(),
            format!("{pragma} failed: {}", rows.join("; ")),
        ))
    }
}

/// The most of the target's name a staging file's name repeats (see
/// [`temp_sibling`]): with `.` before it and `.litefleet-XXXXXX` after it,
/// 218 bytes, under the 255 bytes file systems allow.
const STAGING_NAME_MAX: usize = 200;

/// A path next to `target` for writing it atomically: `.NAME.litefleet-XXXXXX`.
pub fn temp_sibling(target: &Path) -> Result<(File, TempPath)> {
    let (dir, prefix) = staging_prefix(target);
    // 0666 minus the umask, as SQLite creates a database (tempfile's own
    // default, 0600, would leave a restored database unreadable to the group
    // that reads the original).
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(&dir)
        .at(&dir)?;
    let (file, path) = tmp.into_parts();
    Ok((file, path))
}

/// Where [`temp_sibling`] stages `target`, and the start of its name:
/// `.<name>.litefleet-`. A file name may have 255 bytes and the staging
/// name adds 18: a target named near that limit is staged under the start
/// of its name.
fn staging_prefix(target: &Path) -> (PathBuf, String) {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.len() > STAGING_NAME_MAX {
        let cut = (0..=STAGING_NAME_MAX)
            .rev()
            .find(|&i| name.is_char_boundary(i))
            .unwrap_or(0);
        name.truncate(cut);
    }
    (
        dir,
        format!(".{name}{}", crate::source::discover::STAGING_MARK),
    )
}

/// Staging files of `target` ([`temp_sibling`]) in its directory, with their
/// `-wal` and `-shm`: what restores of it left when they were killed
/// (SIGKILL), or what restores of it running now are writing. One
/// directory listing.
pub fn staged_beside(target: &Path) -> Vec<PathBuf> {
    let (dir, prefix) = staging_prefix(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            // Lossy, as the prefix is (see `staging_prefix`).
            let n = n.to_string_lossy();
            let n = n.as_bytes();
            let staged = [&b"-wal"[..], b"-shm"]
                .iter()
                .find_map(|s| n.strip_suffix(*s))
                .unwrap_or(n);
            staged.starts_with(prefix.as_bytes())
                && crate::source::discover::is_staging(staged)
                && staged.len() == prefix.len() + 6
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Test databases that `quick_check` and `integrity_check` must refuse,
/// shared with the restore tests.
#[cfg(test)]
pub(crate) mod test_db {
    use std::path::Path;

    /// Creates at `path` a WAL-mode database of 1 KiB pages without
    /// automatic checkpoints, with a table `t(id INTEGER PRIMARY KEY, v
    /// TEXT)`, and returns its connection.
    pub(crate) fn wal_1k(path: &Path) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(path).unwrap();
        c.pragma_update(None, "page_size", 1024).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        c
    }

    /// Creates at `path` a database of 4 KiB pages holding 2000 indexed
    /// rows (with a random `blob` of that many bytes each, if given) and
    /// returns its bytes.
    pub(crate) fn indexed(path: &Path, blob: Option<usize>) -> Vec<u8> {
        let (columns, values) = match blob {
            Some(n) => ("x, y BLOB".to_string(), format!("i, randomblob({n})")),
            None => ("x".to_string(), "i".to_string()),
        };
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(&format!(
                "PRAGMA page_size=4096; CREATE TABLE t({columns}); CREATE INDEX ti ON t(x);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
                 INSERT INTO t SELECT {values} FROM n;"
            ))
            .unwrap();
        std::fs::read(path).unwrap()
    }

    /// Swaps the databases at `a` and `b` by renames, each with its `-wal`
    /// and `-shm` (side files that are not there are skipped; the
    /// databases must be).
    pub(crate) fn swap_with_side_files(a: &Path, b: &Path) {
        let tmp = a.with_extension("swap");
        for suffix in ["", "-wal", "-shm"] {
            let side = |p: &Path| std::path::PathBuf::from(format!("{}{suffix}", p.display()));
            for (from, to) in [
                (side(a), side(&tmp)),
                (side(b), side(a)),
                (side(&tmp), side(b)),
            ] {
                match std::fs::rename(&from, &to) {
                    Err(e) if suffix.is_empty() || e.kind() != std::io::ErrorKind::NotFound => {
                        panic!("{}: {e}", from.display())
                    }
                    _ => {}
                }
            }
        }
    }

    /// `bytes` of such a database with the header and cell pointers of
    /// page 3 (a b-tree page) scribbled over.
    pub(crate) fn damaged(bytes: &[u8]) -> Vec<u8> {
        let mut bytes = bytes.to_vec();
        bytes[2 * 4096 + 1..2 * 4096 + 64].fill(0xA5);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the host gives no thread, the check still runs (on the
    /// caller's thread), and its failure still discards the snapshot; a
    /// thread that cannot be made is not the database's fault (black-box
    /// probe L29: every snapshot over 1 MiB panicked under `ulimit -u`).
    #[test]
    fn the_check_runs_here_when_no_thread_can_be_made() {
        use crate::capture::work::side_by_side_on;
        let db = Path::new("/data/a.db");
        // A stack no host can give: the spawn fails.
        let no_thread = || std::thread::Builder::new().stack_size(usize::MAX);
        let here = std::thread::current().id();
        let compress = || Err(Error::invalid("a.db", "compressed"));
        let failing = || {
            (
                Err(Error::invalid("a.db", "row 3 missing")),
                std::thread::current().id(),
            )
        };
        let e = checked_beside(side_by_side_on(no_thread(), failing, compress), db).unwrap_err();
        assert!(e.to_string().contains("database is damaged"), "{e}");
        let passing = || {
            assert_eq!(std::thread::current().id(), here, "ran on this thread");
            (Ok(()), ())
        };
        let e = checked_beside(side_by_side_on(no_thread(), passing, compress), db).unwrap_err();
        assert!(e.to_string().contains("compressed"), "{e}");
        // With a thread, on that thread.
        let elsewhere = || {
            assert_ne!(std::thread::current().id(), here);
            (Err(Error::invalid("a.db", "row 3 missing")), ())
        };
        let e = check_beside(elsewhere, compress, db).unwrap_err();
        assert!(e.to_string().contains("database is damaged"), "{e}");
    }

    /// The size of `path`, 0 if it does not exist.
    fn file_len(path: &Path) -> Result<u64> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::io(path, e)),
        }
    }
    use crate::source::vfs::writable_from_outside;

    thread_local! {
        /// Runs once in a capture, after the open and before the read.
        pub(super) static BEFORE_READ: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
            std::cell::RefCell::new(None);
        /// Runs once in a capture, after the read and before its last
        /// checks ([`still_there`]).
        pub(super) static BEFORE_CHECK: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
            std::cell::RefCell::new(None);
        /// Runs once in [`same_wal`], between its reads of the WAL header
        /// through SQLite's handle and at the path.
        pub(super) static BETWEEN_WAL_READS: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
            std::cell::RefCell::new(None);
    }

    /// An application's commit that restarts the WAL (every frame was
    /// checkpointed, so the commit writes the WAL from its start under new
    /// salts) between [`same_wal`]'s two reads of the header: the same WAL,
    /// taken for another once in ~1,200 snapshots of
    /// `large_snapshots_are_consistent_while_the_database_is_written`
    /// (CI, 2026-12-07). The reads are taken again, and agree.
    #[test]
    fn a_wal_restarted_between_the_last_checks_reads_is_the_same_wal() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("w.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(x); INSERT INTO t VALUES (1);
             PRAGMA wal_checkpoint(PASSIVE);",
        )
        .unwrap();
        let wal = crate::source::discover::wal_path(&db);
        let salts = |p: &Path| std::fs::read(p).unwrap()[16..24].to_vec();
        let before = salts(&wal);
        let source = open_read_only(&db, None).unwrap();
        assert!(file_only(&source, &db).unwrap().is_some(), "all backfilled");
        BETWEEN_WAL_READS.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                app.execute("INSERT INTO t VALUES (2)", []).unwrap();
            }))
        });
        assert!(same_wal(&source, &db).unwrap());
        assert!(BETWEEN_WAL_READS.with(|h| h.borrow().is_none()), "ran");
        assert_ne!(salts(&wal), before, "the commit restarted the WAL");
        // A WAL that is another (new salts, never ours) stays another.
        drop(source);
        let source = open_read_only(&db, None).unwrap();
        assert!(
            file_only(&source, &db).unwrap().is_none(),
            "a frame in view"
        );
        source
            .execute_batch("BEGIN; SELECT count(*) FROM t;")
            .unwrap();
        let mut other = std::fs::read(&wal).unwrap();
        other[16] ^= 0xff;
        let aside = t.path().join("aside");
        std::fs::write(&aside, &other).unwrap();
        std::fs::rename(&aside, &wal).unwrap();
        assert!(!same_wal(&source, &db).unwrap());
    }

    /// A database emptied between a snapshot's open (which saw its header)
    /// and its read, as `cp` over it does first: no copy (it was a new,
    /// empty database, uploaded as the latest backup).
    #[test]
    fn a_database_emptied_during_its_snapshot_is_not_uploaded() {
        let t = tempfile::tempdir().unwrap();
        for mode in ["DELETE", "WAL"] {
            let db = t.path().join(format!("{mode}.db"));
            Connection::open(&db)
                .unwrap()
                .execute_batch(&format!(
                    "PRAGMA journal_mode={mode}; CREATE TABLE t(x); INSERT INTO t VALUES (1);"
                ))
                .unwrap();
            let emptied = db.clone();
            BEFORE_READ.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&emptied)
                        .unwrap()
                        .set_len(0)
                        .unwrap();
                }))
            });
            let e = capture(&db, None, "k", t.path()).unwrap_err().to_string();
            assert!(e.contains("is empty now"), "{mode}: {e}");
        }
    }

    /// Two databases swapped by renames between a snapshot's open and its
    /// read, and a commit made at the other path into the file our
    /// connection has open: a state this path never had. The copy is
    /// refused, small and large, and the next one takes the file now at
    /// the path. (In WAL mode SQLite itself may fail such a read, opening
    /// the other database's `-shm` by path: refused either way.)
    #[test]
    fn a_file_renamed_away_during_its_snapshot_is_not_uploaded() {
        let t = tempfile::tempdir().unwrap();
        for (rows, mode) in [
            (10, "DELETE"),
            (20_000, "DELETE"),
            (10, "WAL"),
            (20_000, "WAL"),
        ] {
            let (a, b) = (t.path().join("a.db"), t.path().join("b.db"));
            for (p, n) in [(&a, rows), (&b, rows + 1)] {
                Connection::open(p)
                    .unwrap()
                    .execute_batch(&format!(
                        "PRAGMA journal_mode={mode}; CREATE TABLE t(x);
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n})
                     INSERT INTO t SELECT randomblob(64) FROM n;"
                    ))
                    .unwrap();
            }
            let (a2, b2) = (a.clone(), b.clone());
            BEFORE_READ.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || {
                    test_db::swap_with_side_files(&a2, &b2);
                    // An application at b commits into the file that was a.
                    Connection::open(&b2)
                        .unwrap()
                        .execute("INSERT INTO t VALUES (1)", [])
                        .unwrap();
                }))
            });
            let e = capture(&a, None, "k", t.path()).unwrap_err().to_string();
            assert!(
                mode == "WAL" || e.contains("was replaced, renamed or deleted while it was copied"),
                "{rows} {mode}: {e}"
            );
            let snap = capture(&a, None, "k", t.path()).unwrap();
            assert!(snap.db_bytes > 0);
            for p in [&a, &b] {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
                }
            }
        }
    }

    /// The block (and with it the encoder's buffers) fits the input; data
    /// of any size round-trips through the frame decoder.
    #[test]
    fn lz4_blocks_fit_the_input() {
        use lz4_flex::frame::BlockSize;
        let block = |len| frame_info(len).block_size;
        assert_eq!(block(0), BlockSize::Max64KB);
        assert_eq!(block(16 << 10), BlockSize::Max64KB);
        assert_eq!(block((64 << 10) + 1), BlockSize::Max256KB);
        assert_eq!(block(1 << 20), BlockSize::Max1MB);
        assert_eq!(block(600 << 20), BlockSize::Max4MB);
        let t = tempfile::tempdir().unwrap();
        for len in [0usize, 100, 70_000, 5 << 20] {
            let src = t.path().join(format!("in-{len}"));
            let data: Vec<u8> = (0..len)
                .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
                .collect();
            std::fs::write(&src, &data).unwrap();
            let out = t.path().join(format!("out-{len}.lz4"));
            compress(&src, &File::create(&out).unwrap(), &out).unwrap();
            let mut back = Vec::new();
            lz4_flex::frame::FrameDecoder::new(File::open(&out).unwrap())
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len} bytes");
        }
    }

    /// One thread compresses many databases in a row through its cached
    /// encoder (one-block inputs), interleaved with larger and empty ones
    /// (fresh encoders): every object holds its own times and decodes to
    /// exactly its own bytes, checksum verified.
    #[test]
    fn a_reused_encoder_frames_every_snapshot_on_its_own() {
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for i in 0..40usize {
            let len = match i % 5 {
                0 => 512,
                1 => SMALL_BLOCK,
                2 => SMALL_BLOCK + 1,
                3 => 0,
                _ => 4096 * (1 + i % 7),
            };
            inputs.push((0..len).map(|j| ((j * (i + 3)) % 253) as u8).collect());
        }
        // Whole milliseconds, as the record keeps them.
        let t0 = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
        for (i, data) in inputs.iter().enumerate() {
            let times = SnapshotTimes {
                started: t0 + chrono::Duration::milliseconds(i as i64),
                taken: t0 + chrono::Duration::milliseconds(2 * i as i64),
            };
            let snap =
                in_memory(Path::new("x.db"), "k", data, times, Copied::DirectInMemory).unwrap();
            let Staged::Memory(obj) = &snap.staged else {
                panic!("in memory")
            };
            assert_eq!(snap.compressed_bytes, obj.len() as u64);
            let hour = crate::replica::cold::next_hour(times.taken);
            let head = SnapshotTimes::decode(obj, hour).expect("a sound record");
            let head = head.expect("a times record");
            assert_eq!(head, times, "input {i}");
            let mut back = Vec::new();
            lz4_flex::frame::FrameDecoder::new(&obj[crate::replica::cold::RECORD_LEN..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(&back, data, "input {i} ({} bytes)", data.len());
        }
    }

    #[test]
    fn wal_frames_are_captured_and_frame_is_valid() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("w.db");
        let app = Connection::open(&db).unwrap();
        app.pragma_update(None, "journal_mode", "wal").unwrap();
        app.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        app.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1),(2),(3);")
            .unwrap();
        assert!(std::fs::metadata(t.path().join("w.db-wal")).unwrap().len() > 0);
        let snap = capture(&db, None, "k", &t.path().join("tmp")).unwrap();
        // The application's WAL is untouched by our read-only connection.
        assert!(std::fs::metadata(t.path().join("w.db-wal")).unwrap().len() > 0);
        assert!(
            matches!(snap.staged, Staged::Memory(_)),
            "a small database stays in memory"
        );
        let (_, rows) = restored(&snap, &t.path().join("restored.db"));
        assert_eq!(rows, 3);
    }

    /// A database above [`IN_MEMORY_MAX`] in rollback-journal mode is read
    /// from its own file (our shared lock keeps writers out) and staged in
    /// a file, and its object (times record, then the frame) restores every
    /// row.
    #[test]
    fn a_large_snapshot_is_staged_in_a_file() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("big.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch(
            "CREATE TABLE t(x BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600)
             INSERT INTO t SELECT randomblob(4000) FROM n;",
        )
        .unwrap();
        let snap = capture(&db, None, "k", &t.path().join("tmp")).unwrap();
        assert!(snap.db_bytes > IN_MEMORY_MAX);
        assert_eq!(snap.copied, Copied::Direct);
        assert_eq!(snap.db_bytes, std::fs::metadata(&db).unwrap().len());
        let Staged::File(staged) = &snap.staged else {
            panic!("a {} byte database was kept in memory", snap.db_bytes);
        };
        assert_eq!(
            std::fs::metadata(staged).unwrap().len(),
            snap.compressed_bytes
        );
        let (_, rows) = restored(&snap, &t.path().join("restored.db"));
        assert_eq!(rows, 600);
    }

    /// A large WAL database is read from its file only when every WAL frame
    /// is in the file: with frames not yet checkpointed it is copied through
    /// the backup API (and the copy has them); once a checkpoint has copied
    /// them (the WAL still full of them, as SQLite leaves it), from the file.
    #[test]
    fn a_large_wal_database_is_read_from_its_file_once_checkpointed() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("wal.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(x BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
             INSERT INTO t SELECT randomblob(4000) FROM n;
             PRAGMA wal_checkpoint(TRUNCATE);
             INSERT INTO t SELECT randomblob(4000) FROM t LIMIT 100;",
        )
        .unwrap();
        let wal = crate::source::discover::wal_path(&db);
        assert!(file_len(&wal).unwrap() > 0);
        let snap = capture(&db, None, "k", &t.path().join("tmp")).unwrap();
        assert_eq!(snap.copied, Copied::TempFile, "frames not in the file yet");
        assert_eq!(restored(&snap, &t.path().join("copied.db")).1, 500);

        let (busy, log, done): (i64, i64, i64) = app
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((busy, log), (0, done));
        assert!(file_len(&wal).unwrap() > 0, "the WAL keeps its frames");
        let snap = capture(&db, None, "k", &t.path().join("tmp")).unwrap();
        assert_eq!(snap.copied, Copied::Direct, "every frame is in the file");
        assert_eq!(restored(&snap, &t.path().join("direct.db")).1, 500);
    }

    /// While an application commits and checkpoints as fast as it can, every
    /// snapshot of a large WAL database, read from the file or copied, is
    /// one of its committed versions, and not an older one than was
    /// committed when the snapshot began. Each transaction counts itself in
    /// `total` and stamps that count on a row of `t`, which it adds (the
    /// file grows) or rewrites in place (it does not): in every restored
    /// copy the newest stamp is the count, and the count is at least the
    /// commits before the snapshot.
    #[test]
    fn large_snapshots_are_consistent_while_the_database_is_written() {
        use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("busy.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(x BLOB, n INTEGER); CREATE TABLE total(n);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
             INSERT INTO t SELECT randomblob(4000), 0 FROM n;
             INSERT INTO total VALUES (0);",
        )
        .unwrap();
        let stop = AtomicBool::new(false);
        let committed = AtomicI64::new(0);
        let (mut direct, mut copied) = (0, 0);
        std::thread::scope(|s| {
            let (stop, committed) = (&stop, &committed);
            let writer = s.spawn(move || {
                let mut commits = 0i64;
                while !stop.load(Ordering::Relaxed) && commits < 5_000 {
                    app.execute_batch(if commits % 2 == 0 {
                        "BEGIN; UPDATE total SET n = n + 1;
                         INSERT INTO t VALUES (randomblob(4000), (SELECT n FROM total));
                         COMMIT;"
                    } else {
                        "BEGIN; UPDATE total SET n = n + 1;
                         UPDATE t SET x = randomblob(4000), n = (SELECT n FROM total)
                           WHERE rowid = 1 + (SELECT n FROM total) % 300;
                         COMMIT;"
                    })
                    .unwrap();
                    commits += 1;
                    committed.store(commits, Ordering::SeqCst);
                    // Checkpoints (which write the database file) race
                    // with the snapshots' reads of it.
                    if commits % 3 == 0 {
                        app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                            .unwrap();
                    }
                }
                commits
            });
            for i in 0..16 {
                let floor = committed.load(Ordering::SeqCst);
                let snap = capture(&db, None, "k", &t.path().join("tmp")).unwrap();
                match snap.copied {
                    Copied::Direct => direct += 1,
                    _ => copied += 1,
                }
                let out = t.path().join(format!("r{i}.db"));
                let n = decompress(
                    snap.reader().unwrap(),
                    "snap",
                    &mut File::create(&out).unwrap(),
                )
                .unwrap();
                assert_eq!(n, snap.db_bytes);
                integrity_check(&out).unwrap();
                let c = Connection::open(&out).unwrap();
                let (stamp, total): (i64, i64) = c
                    .query_row("SELECT (SELECT max(n) FROM t), n FROM total", [], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .unwrap();
                assert_eq!(stamp, total, "snapshot {i} ({:?}) is torn", snap.copied);
                assert!(total >= floor, "snapshot {i} ({:?}) is older", snap.copied);
            }
            stop.store(true, Ordering::Relaxed);
            assert!(writer.join().unwrap() > 0);
        });
        eprintln!("{direct} snapshots read from the file, {copied} copied");
    }

    /// A database file replaced by a rename after SQLite opened the old one:
    /// the snapshot is read through SQLite's own handle (the file the read
    /// transaction protects, not the one now at the path), and then not
    /// uploaded, as the path no longer names that file
    /// ([`still_there`]).
    #[test]
    fn a_database_replaced_since_it_was_opened_is_read_through_sqlite() {
        let t = tempfile::tempdir().unwrap();
        let (db, other) = (t.path().join("r.db"), t.path().join("other.db"));
        for (path, rows) in [(&db, 300), (&other, 500)] {
            Connection::open(path)
                .unwrap()
                .execute_batch(&format!(
                    "CREATE TABLE t(x BLOB);
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
                     INSERT INTO t SELECT randomblob(4000) FROM n;"
                ))
                .unwrap();
        }
        let source = open_read_only(&db, None).unwrap();
        std::fs::rename(&other, &db).unwrap();
        let len = file_only(&source, &db).unwrap().expect("no WAL");
        let e = capture_file(source, &db, "k", len, Utc::now(), t.path()).unwrap_err();
        assert!(
            e.to_string().contains("was replaced, renamed or deleted"),
            "{e}"
        );
        // Unmoved, the file is read through a second handle beside the check.
        let source = open_read_only(&db, None).unwrap();
        let len = file_only(&source, &db).unwrap().expect("no WAL");
        let snap = capture_file(source, &db, "k", len, Utc::now(), t.path()).unwrap();
        assert_eq!(snap.copied, Copied::Direct);
        assert_eq!(restored(&snap, &t.path().join("out.db")).1, 500);
    }

    /// A backup step that fails for a full disk failed writing the copy,
    /// so the error names the copy (in `temp-dir`), not the source (probe
    /// J20: "<source>: database or disk is full" for a full temp-dir; the
    /// disk is full here through the copy's `max_page_count`).
    #[test]
    fn a_copy_that_fills_its_disk_names_the_copy() {
        let t = tempfile::tempdir().unwrap();
        let (db, dst) = (t.path().join("src.db"), t.path().join("copy.db"));
        drop(test_db::indexed(&db, None));
        let source = open_read_only(&db, None).unwrap();
        let mut target = Connection::open(&dst).unwrap();
        target.pragma_update(None, "max_page_count", 1).unwrap();
        let e = copy_full(copy_pages(&source, &db, &mut target).unwrap_err(), &dst);
        assert!(
            matches!(&e, Error::Sqlite { path, .. } if path == &dst),
            "{e:?}"
        );
    }

    /// A database of 40 rows, every one of them (and its table) in WAL
    /// frames, opened by a snapshot's connection, which then has the
    /// `-wal` and `-shm` open.
    fn wal_only_db(t: &Path) -> (PathBuf, Connection, ReadOnly) {
        let db = t.join("r.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x)",
        )
        .unwrap();
        for _ in 0..40 {
            app.execute("INSERT INTO t VALUES (randomblob(100))", [])
                .unwrap();
        }
        let source = open_read_only(&db, None).unwrap();
        let rows: i64 = source
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 40, "the WAL and its index are open");
        (db, app, source)
    }

    /// A WAL-index (`-shm`) whose header names other salts than the WAL
    /// read, as one of another WAL opened by name after it would: not the
    /// same WAL, though both WAL headers agree (the last check's third
    /// comparison; every test passed without it, mutation audit O23 M35).
    /// The salts are rewritten in both copies of the index header in place,
    /// while the source's read transaction keeps SQLite from reading the
    /// index again (it would rebuild it from the WAL).
    #[test]
    fn a_wal_index_naming_other_salts_is_not_the_same_wal() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let (db, _app, source) = wal_only_db(t.path());
        source
            .execute_batch("BEGIN; SELECT count(*) FROM t;")
            .unwrap();
        assert!(same_wal(&source, &db).unwrap());
        let shm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.path().join("r.db-shm"))
            .unwrap();
        // `aSalt` at 32 in each 48-byte copy of the header.
        for at in [32, 48 + 32] {
            let mut salt = [0u8; 8];
            shm.read_exact_at(&mut salt, at).unwrap();
            shm.write_all_at(&salt.map(|b| !b), at).unwrap();
        }
        assert!(!same_wal(&source, &db).unwrap());
    }

    /// The `-wal` renamed away from under open connections (a hostile
    /// application, or a ring renaming side files): the read transaction
    /// still sees its frames, through SQLite's handle. So the file alone is
    /// not that transaction's version, and it is not read as the snapshot:
    /// the copy holds the 40 rows. Judged by the `-wal`'s path, the main
    /// file alone (no table at all) was uploaded as the latest state.
    #[test]
    fn a_wal_renamed_away_is_still_in_the_transactions_view() {
        let t = tempfile::tempdir().unwrap();
        let (db, app, source) = wal_only_db(t.path());
        let wal = crate::source::discover::wal_path;
        std::fs::rename(wal(&db), t.path().join("elsewhere")).unwrap();
        assert!(file_only(&source, &db).unwrap().is_none(), "frames in view");
        // Not the file alone, and not a copy either: the WAL read is no
        // longer the one at the path ([`same_wal`]); the next cycle copies
        // the database as it is then.
        let e = capture_open(source, &db, "k", t.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("its -wal or -shm is not the one at its path"),
            "{e}"
        );
        drop(app);
    }

    /// A link above the pattern root retargeted while a snapshot read the
    /// database it led to: SQLite checks the path it resolved at the open,
    /// which still names the file read, so the copy of the other tree's
    /// database went out as the state of the database the path leads to
    /// now (black-box probe N21). Refused.
    #[test]
    fn a_link_retargeted_during_a_snapshot_is_seen() {
        let t = tempfile::tempdir().unwrap();
        for tree in ["a", "b"] {
            std::fs::create_dir(t.path().join(tree)).unwrap();
            Connection::open(t.path().join(tree).join("x.db"))
                .unwrap()
                .execute_batch(&format!(
                    "CREATE TABLE t(x); INSERT INTO t VALUES ('{tree}');"
                ))
                .unwrap();
        }
        let link = t.path().join("data");
        let point = {
            let (root, link) = (t.path().to_path_buf(), link.clone());
            move |tree: &str| {
                let tmp = root.join("data.new");
                std::os::unix::fs::symlink(root.join(tree), &tmp).unwrap();
                std::fs::rename(&tmp, &link).unwrap();
            }
        };
        point("b");
        let back = point.clone();
        BEFORE_CHECK.with(|h| *h.borrow_mut() = Some(Box::new(move || back("a"))));
        let db = link.join("x.db");
        let e = capture(&db, None, "k", t.path()).unwrap_err().to_string();
        assert!(e.contains("its path leads to another file now"), "{e}");
        let snap = capture(&db, None, "k", t.path()).unwrap();
        let now = std::fs::symlink_metadata(&db).unwrap();
        assert_eq!(snap.read, crate::source::track::fingerprint_with(&db, &now));
    }

    /// A FIFO put in place of the `-wal` while a snapshot reads: the last
    /// check reads the header at the path, and a FIFO must not block it
    /// until a writer comes (the snapshot is refused instead).
    #[test]
    fn a_fifo_in_place_of_the_wal_never_blocks_the_last_check() {
        use std::os::unix::ffi::OsStrExt;
        let t = tempfile::tempdir().unwrap();
        let (db, app, source) = wal_only_db(t.path());
        let wal = crate::source::discover::wal_path(&db);
        let fifo = {
            let (wal, aside) = (wal.clone(), t.path().join("aside"));
            move || {
                std::fs::rename(&wal, aside).unwrap();
                let c = std::ffi::CString::new(wal.as_os_str().as_bytes()).unwrap();
                // SAFETY: a valid C string.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            }
        };
        drop(source);
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = t.path().to_path_buf();
        std::thread::spawn(move || {
            BEFORE_CHECK.with(|h| *h.borrow_mut() = Some(Box::new(fifo)));
            let r = capture(&db, None, "k", &dir)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the last check blocked on a FIFO");
        assert!(r.is_err(), "{r:?}");
        drop(app);
    }

    /// The directory of a database exchanged for another tree holding a
    /// database of the same name between the snapshot's open and its read:
    /// SQLite opened this tree's file and, without the pin, the other
    /// tree's `-wal` and `-shm` by name, and the copy held this file's pages
    /// with the other's frames, a state neither database had, while the
    /// path named this file again at the last check (black-box probe N21).
    /// With the directory pinned the copy is this tree's database alone;
    /// exchanged back before the end, it is uploaded, and left exchanged,
    /// refused (the path leads to the other tree's file).
    #[test]
    fn a_directory_exchanged_during_a_snapshot_gives_one_trees_copy_or_none() {
        let t = tempfile::tempdir().unwrap();
        let (data, other) = (t.path().join("data"), t.path().join("other"));
        crate::source::pin::test_trees::tagged(&data, "mine");
        crate::source::pin::test_trees::tagged(&other, "theirs");
        let exchange =
            crate::source::pin::test_trees::exchanger(&data, &other, &t.path().join("swap"));
        let back = exchange.clone();
        BEFORE_READ.with(|h| *h.borrow_mut() = Some(Box::new(exchange.clone())));
        BEFORE_CHECK.with(|h| *h.borrow_mut() = Some(Box::new(back)));
        let db = data.join("x.db");
        let rows = |snap: &Snapshot| {
            let out = t.path().join("out.db");
            let _ = std::fs::remove_file(&out);
            restored(snap, &out);
            crate::source::pin::test_trees::rows(&Connection::open(&out).unwrap())
        };
        let snap = capture(&db, None, "k", t.path()).unwrap();
        assert_eq!(rows(&snap), ["mine"], "this tree's file and frames");
        BEFORE_READ.with(|h| *h.borrow_mut() = Some(Box::new(exchange.clone())));
        let e = capture(&db, None, "k", t.path()).unwrap_err().to_string();
        assert!(e.contains("leads to another file now"), "{e}");
        assert!(!e.contains("/proc/"), "no descriptor path: {e}");
        exchange();
        assert_eq!(rows(&capture(&db, None, "k", t.path()).unwrap()), ["mine"]);
    }

    /// A directory below the pattern root swapped for a link to a tree
    /// outside it at the instant the snapshot opens the database's
    /// directory: after the check of the path's directories, as a
    /// directory-flipping adversary can time it. The open itself refuses
    /// the link (`pin::pin_below`); with the check and an open through the
    /// path, the outside tree's database was copied as this one's. Put back,
    /// the snapshot is this tree's again.
    #[test]
    fn a_directory_swapped_for_a_link_as_the_snapshot_opens_is_refused() {
        use crate::source::pin::test_trees::{
            at_next_dir_open, link_in_place, rows as rows_of, tagged,
        };
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let (data, outside, away) = (root.join("d"), t.path().join("outside"), root.join("away"));
        tagged(&data, "mine");
        tagged(&outside, "theirs");
        let db = data.join("x.db");
        let (d, o, a) = (data.clone(), outside.clone(), away.clone());
        at_next_dir_open(move || link_in_place(&d, &a, &o));
        let e = capture(&db, Some(&root), "k", t.path())
            .expect_err("copied through a link below the root")
            .to_string();
        assert!(e.contains("no directory of its own"), "{e}");
        assert!(e.contains(&data.display().to_string()), "names it: {e}");
        std::fs::remove_file(&data).unwrap();
        std::fs::rename(&away, &data).unwrap();
        let snap = capture(&db, Some(&root), "k", t.path()).unwrap();
        let out = t.path().join("out.db");
        restored(&snap, &out);
        assert_eq!(rows_of(&Connection::open(&out).unwrap()), ["mine"]);
    }

    /// A small database with frames in its WAL, renamed away with its side
    /// files after SQLite opened it, and written at its new path before the
    /// copy: the backup copy (through SQLite's handles, which follow the
    /// files) holds a row the database never had at this path, so it is
    /// not uploaded ([`still_there`] after [`backup_in_memory`]; without
    /// that check a copy of 41 rows was uploaded for a path that only ever
    /// held 40, or the replacement's 7: a surviving mutant of audit F19).
    #[test]
    fn a_copy_of_a_database_written_after_it_moved_away_is_not_uploaded() {
        let t = tempfile::tempdir().unwrap();
        let (db, app, source) = wal_only_db(t.path());
        let (gone, other) = (t.path().join("q.db"), t.path().join("other.db"));
        Connection::open(&other)
            .unwrap()
            .execute_batch(
                "CREATE TABLE t(x);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 7)
                 INSERT INTO t SELECT i FROM n;",
            )
            .unwrap();
        let wal = crate::source::discover::wal_path;
        let shm = crate::source::discover::shm_path;
        for (from, to) in [
            (db.clone(), gone.clone()),
            (wal(&db), wal(&gone)),
            (shm(&db), shm(&gone)),
        ] {
            std::fs::rename(from, to).unwrap();
        }
        app.execute("INSERT INTO t VALUES (randomblob(100))", [])
            .unwrap();
        std::fs::rename(&other, &db).unwrap();
        let e = capture_open(source, &db, "k", t.path()).unwrap_err();
        assert!(
            e.to_string().contains("was replaced, renamed or deleted"),
            "{e}"
        );
        drop(app);
    }

    /// Side files renamed between databases (probe D18's ring): a `-shm`
    /// this process has open for one database is never opened for
    /// another, by a snapshot or a stream. SQLite would take the second
    /// open for the first (it cannot see its own process's locks),
    /// truncate the index and rebuild it from the other database's WAL:
    /// the first connection's next read then saw another state (37 rows
    /// of 200 here), or died of SIGBUS while the file was short.
    #[test]
    fn a_shm_open_for_another_database_is_not_opened_for_a_second() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a.db"), t.path().join("b.db"));
        for (path, rows) in [(&a, 200), (&b, 37)] {
            // One commit per row, every frame left in the WAL, and the
            // `-wal` and `-shm` left behind at close.
            let app = Connection::open(path).unwrap();
            app.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            )
            .unwrap();
            app.execute_batch(
                "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x)",
            )
            .unwrap();
            for _ in 0..rows {
                app.execute("INSERT INTO t VALUES (randomblob(100))", [])
                    .unwrap();
            }
        }
        let count = |c: &Connection| -> i64 {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap()
        };
        let reader = open_read_only(&a, None).unwrap();
        assert_eq!(count(&reader), 200);
        // Another connection to the same database shares its index.
        assert_eq!(count(&open_read_only(&a, None).unwrap()), 200);
        let shm = |db: &Path| crate::source::discover::shm_path(db);
        std::fs::rename(shm(&a), shm(&b)).unwrap();
        let e = capture(&b, None, "k", t.path()).unwrap_err().to_string();
        assert!(e.contains("WAL index of") && e.contains("a.db"), "{e}");
        let e = crate::capture::ship::Shipper::open(&b, "k").err().unwrap();
        assert!(e.to_string().contains("WAL index of"), "{e}");
        assert_eq!(count(&reader), 200, "the first connection's own state");
        // Released with the connection: b is read with an index of its own.
        drop(reader);
        let snap = capture(&b, None, "k", t.path()).unwrap();
        assert_eq!(restored(&snap, &t.path().join("out.db")).1, 37);
    }

    /// POSIX locks belong to the process, and closing any descriptor of a
    /// file drops all of them: a snapshot must never open and close the
    /// database or its `-shm` itself while a connection of this process
    /// (the hot tier's, say) holds a lock there. An application connection
    /// here holds the write lock (the `-shm` lock in WAL mode, the file's
    /// RESERVED lock in rollback mode) across large snapshots; another
    /// process must still find it locked afterwards.
    #[test]
    fn snapshots_keep_the_locks_this_process_holds() {
        for wal in [true, false] {
            let t = tempfile::tempdir().unwrap();
            let db = t.path().join("locked.db");
            let app = Connection::open(&db).unwrap();
            let mode = if wal { "wal" } else { "delete" };
            app.execute_batch(&format!(
                "PRAGMA journal_mode={mode}; CREATE TABLE t(x BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
                 INSERT INTO t SELECT randomblob(4000) FROM n;"
            ))
            .unwrap();
            if wal {
                // Every frame backfilled, the WAL kept: the WAL-index is read.
                app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .unwrap();
                assert!(file_len(&crate::source::discover::wal_path(&db)).unwrap() > 0);
            }
            app.execute_batch("BEGIN IMMEDIATE").unwrap();
            assert!(!writable_from_outside(&db), "wal {wal}: the lock is held");
            let snap = capture(&db, None, "k", &t.path().join("tmp")).unwrap();
            assert_eq!(snap.copied, Copied::Direct, "wal {wal}");
            assert!(
                !writable_from_outside(&db),
                "wal {wal}: a snapshot dropped the lock"
            );
            app.execute_batch("COMMIT").unwrap();
            assert!(writable_from_outside(&db), "wal {wal}");
            assert_eq!(restored(&snap, &t.path().join("out.db")).1, 400);
        }
    }

    /// A file whose header was never read is snapshotted only if its
    /// snapshot's connection finds SQLite's header: foreign, empty and short
    /// files (even the header's first 15 bytes) are `None`, nothing is made
    /// in the temp dir for them, and a database holding the lock of another
    /// connection of this process keeps it.
    #[test]
    fn only_files_with_sqlite_headers_are_captured_unchecked() {
        let t = tempfile::tempdir().unwrap();
        let tmp = t.path().join("tmp");
        for (name, bytes) in [
            ("text", b"just some text, not a database".to_vec()),
            ("empty", Vec::new()),
            ("short", crate::source::vfs::SQLITE_HEADER[..15].to_vec()),
            ("pdf", b"%PDF-1.7 and then a lot more bytes".repeat(200)),
        ] {
            let f = t.path().join(format!("{name}.db"));
            std::fs::write(&f, &bytes).unwrap();
            assert!(
                capture_if_sqlite(&f, None, "k", &tmp).unwrap().is_none(),
                "{name}"
            );
            assert_eq!(std::fs::read(&f).unwrap(), bytes, "{name} untouched");
        }
        assert!(!tmp.exists(), "nothing staged for a foreign file");
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            4,
            "no -wal, -shm, -journal"
        );
        let db = t.path().join("real.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch(
            "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES (1),(2);
             BEGIN IMMEDIATE;",
        )
        .unwrap();
        let snap = capture_if_sqlite(&db, None, "k", &tmp)
            .unwrap()
            .expect("a database");
        assert!(!writable_from_outside(&db), "the lock is still held");
        app.execute_batch("COMMIT").unwrap();
        assert_eq!(restored(&snap, &t.path().join("out.db")).1, 2);
        assert!(capture_if_sqlite(&t.path().join("gone.db"), None, "k", &tmp).is_err());
    }

    /// A damaged large database read from its own file is refused by the
    /// `quick_check` that runs beside the compression.
    #[test]
    fn a_damaged_large_database_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("d.db");
        let sound = test_db::indexed(&db, Some(1000));
        assert!(sound.len() as u64 > IN_MEMORY_MAX);
        std::fs::write(&db, test_db::damaged(&sound)).unwrap();
        match capture(&db, None, "k", &t.path().join("tmp")) {
            Ok(s) => panic!("a damaged database was captured ({:?})", s.copied),
            Err(e) => assert!(e.to_string().contains("damaged, not uploading"), "{e}"),
        }
    }

    /// Restores `snap` into `out` and returns its page size and rows of `t`.
    fn restored(snap: &Snapshot, out: &Path) -> (i64, i64) {
        let n = decompress(
            snap.reader().unwrap(),
            "snap",
            &mut File::create(out).unwrap(),
        )
        .unwrap();
        assert_eq!(n, snap.db_bytes);
        integrity_check(out).unwrap();
        let c = Connection::open(out).unwrap();
        let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        let rows: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        (page, rows)
    }

    /// A small database is copied, checked and compressed in memory: it
    /// needs no temporary directory at all (here one that cannot be
    /// created), and the copy keeps the source's page size, be it the
    /// smallest or the largest SQLite allows.
    #[test]
    fn small_snapshots_stay_in_memory_with_their_page_size() {
        for page in [512, 4096, 65536] {
            let t = tempfile::tempdir().unwrap();
            let db = t.path().join("p.db");
            let app = Connection::open(&db).unwrap();
            app.execute_batch(&format!(
                "PRAGMA page_size={page}; PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0;
                 CREATE TABLE t(x); INSERT INTO t VALUES (1),(2);"
            ))
            .unwrap();
            // Under a regular file: no directory can be made there.
            let tmp = db.join("tmp");
            let snap = capture(&db, None, "k", &tmp).unwrap();
            assert!(matches!(snap.staged, Staged::Memory(_)), "page {page}");
            assert_eq!(snap.copied, Copied::InMemory, "frames in the WAL");
            let (restored_page, rows) = restored(&snap, &t.path().join("out.db"));
            assert_eq!((restored_page, rows), (page, 2), "page {page}");
            // Checkpointed (and one more row), the file alone is read.
            app.execute_batch("INSERT INTO t VALUES (3); PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
            let snap = capture(&db, None, "k", &tmp).unwrap();
            assert!(matches!(snap.staged, Staged::Memory(_)), "page {page}");
            assert_eq!(snap.copied, Copied::DirectInMemory, "page {page}");
            let (restored_page, rows) = restored(&snap, &t.path().join("out2.db"));
            assert_eq!((restored_page, rows), (page, 3), "page {page}");
        }
    }

    /// A damaged small database reads (or copies page by page) without
    /// complaint; the check refuses it, so it never replaces a good
    /// snapshot.
    /// A check that could not run for a reason other than damage (an I/O
    /// error reading the staged copy on a full disk) is that error, which
    /// names the copy's path (the scheduler's "staging its copy"), not
    /// "database is damaged"; SQLite saying the file is corrupt or no
    /// database is damage.
    #[test]
    fn only_corruption_is_damage() {
        let fail = |code| {
            let e = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
            damaged_copy(Path::new("/data/a.db"), Error::sqlite("/tmp/copy", e))
        };
        let e = fail(rusqlite::ffi::SQLITE_IOERR);
        assert!(
            matches!(&e, Error::Sqlite { path, .. } if path == Path::new("/tmp/copy")),
            "{e}"
        );
        assert!(!e.to_string().contains("damaged"), "{e}");
        assert!(matches!(
            fail(rusqlite::ffi::SQLITE_FULL),
            Error::Sqlite { .. }
        ));
        for code in [rusqlite::ffi::SQLITE_CORRUPT, rusqlite::ffi::SQLITE_NOTADB] {
            let e = fail(code).to_string();
            assert!(e.contains("/data/a.db") && e.contains("damaged"), "{e}");
        }
        let found = Error::invalid("/tmp/copy", "quick_check failed: row 3 missing");
        let e = damaged_copy(Path::new("/data/a.db"), found).to_string();
        assert!(e.contains("damaged") && e.contains("row 3 missing"), "{e}");
    }

    #[test]
    fn a_damaged_small_database_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("d.db");
        let sound = test_db::indexed(&db, None);
        assert!(sound.len() as u64 <= IN_MEMORY_MAX);
        std::fs::write(&db, test_db::damaged(&sound)).unwrap();
        match capture(&db, None, "k", &t.path().join("tmp")) {
            Ok(s) => panic!("a damaged database was captured ({} bytes)", s.db_bytes),
            Err(e) => assert!(e.to_string().contains("damaged, not uploading"), "{e}"),
        }
    }

    /// A database a writer left mid-transaction (a hot rollback journal):
    /// the snapshot fails, names the journal and says why, instead of
    /// SQLite's "attempt to write a readonly database"; the database and
    /// its journal are left as they were.
    #[test]
    fn a_hot_journal_is_explained_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.db");
        let c = Connection::open(&live).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=DELETE; PRAGMA cache_size=2;
             CREATE TABLE t(v); INSERT INTO t VALUES (randomblob(3000));",
        )
        .unwrap();
        c.execute_batch("BEGIN; UPDATE t SET v = randomblob(3000);")
            .unwrap();
        for _ in 0..40 {
            c.execute("INSERT INTO t VALUES (randomblob(3000))", [])
                .unwrap();
        }
        // The writer "stops" here: its files as a crash would leave them.
        let db = dir.path().join("crashed.db");
        std::fs::copy(&live, &db).unwrap();
        let journal = dir.path().join("crashed.db-journal");
        std::fs::copy(dir.path().join("live.db-journal"), &journal).unwrap();
        drop(c);
        let before = (
            std::fs::read(&db).unwrap(),
            std::fs::read(&journal).unwrap(),
        );
        let e = capture(&db, None, "k", dir.path()).unwrap_err().to_string();
        assert!(e.contains("hot rollback journal"), "{e}");
        assert!(e.contains("crashed.db"), "{e}");
        let after = (
            std::fs::read(&db).unwrap(),
            std::fs::read(&journal).unwrap(),
        );
        assert!(before == after, "the database or its journal changed");
    }

    #[test]
    fn corrupt_lz4_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let mut f = File::create(t.path().join("x")).unwrap();
        let e = decompress(&b"garbage that is not lz4"[..], "obj", &mut f).unwrap_err();
        assert!(e.to_string().contains("not a valid LZ4"), "{e}");
    }

    /// A target whose name is near the file system's 255 bytes is staged
    /// under a name that fits (probe G: a restore of a key with a 240-byte
    /// last part failed with "File name too long" on its staging file).
    #[test]
    fn staging_files_beside_a_target_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.db");
        assert!(staged_beside(&target).is_empty());
        let (_, own) = temp_sibling(&target).unwrap();
        let wal = format!("{}-wal", own.display());
        std::fs::write(&wal, b"x").unwrap();
        for other in [
            "app.db",
            ".app.db.litefleet-abc",
            ".other.db.litefleet-a1B2c3",
            "x.litefleet-a1B2c3",
        ] {
            std::fs::write(dir.path().join(other), b"x").unwrap();
        }
        let found = staged_beside(&target);
        assert_eq!(found, vec![own.to_path_buf(), PathBuf::from(wal)]);
    }

    #[test]
    fn a_long_target_name_has_a_staging_name_that_fits() {
        let t = tempfile::tempdir().unwrap();
        for name in ["é".repeat(120) + ".db", "x".repeat(252)] {
            let target = t.path().join(&name);
            let (_, tmp) = temp_sibling(&target).unwrap();
            let staged = tmp.file_name().unwrap().to_str().unwrap().to_string();
            assert!(staged.len() <= 255, "{}", staged.len());
            assert!(
                staged.starts_with(&format!(".{}", &name[..100])),
                "{staged}"
            );
            // Never taken for a database by the scan.
            assert!(crate::source::discover::is_aux(tmp.file_name().unwrap()));
            std::fs::rename(&tmp, &target).unwrap();
            assert!(target.exists());
        }
    }

    /// A frame cut short at a block boundary decodes, in `lz4_flex`, to a
    /// prefix of its content without an error: [`FrameInput`] makes it
    /// damage, and bytes after a frame too.
    #[test]
    fn a_frame_cut_at_a_block_boundary_is_damage() {
        use lz4_flex::frame::{BlockMode, BlockSize, FrameInfo};
        let content: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let info = FrameInfo::new()
            .block_size(BlockSize::Max64KB)
            .block_mode(BlockMode::Independent)
            .content_checksum(true);
        let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(&content).unwrap();
        let frame = enc.finish().unwrap();
        // Walk the blocks: 7-byte header, then (size, data) until the end mark.
        let mut at = 7;
        let mut ends = Vec::new();
        loop {
            let word = u32::from_le_bytes(frame[at..at + 4].try_into().unwrap());
            if word == 0 {
                break;
            }
            at += 4 + (word & 0x7fff_ffff) as usize;
            ends.push(at);
        }
        assert!(ends.len() > 2, "{ends:?}");
        let decode = |bytes: &[u8]| -> (Vec<u8>, Result<()>) {
            let mut dec = lz4_flex::frame::FrameDecoder::new(FrameInput::new(bytes));
            let mut out = Vec::new();
            if let Err(e) = dec.read_to_end(&mut out) {
                return (out, Err(Error::damaged("obj", e.to_string())));
            }
            let end = dec.into_inner().finish();
            (out, end.map_err(|e| Error::damaged("obj", e.to_string())))
        };
        let (whole, end) = decode(&frame);
        assert_eq!(whole, content);
        end.unwrap();
        for cut in [ends[1], frame.len() - 8, frame.len() - 4] {
            let (_, end) = decode(&frame[..cut]);
            let e = end.unwrap_err().to_string();
            assert!(
                e.contains("cut short") || e.contains("fill whole buffer"),
                "{cut}: {e}"
            );
            let t = tempfile::tempdir().unwrap();
            let mut f = File::create(t.path().join("x")).unwrap();
            let e = decompress(&frame[..cut], "obj", &mut f).unwrap_err();
            assert!(matches!(e, Error::Damaged { .. }), "{cut}: {e:?}");
        }
        let mut more = frame.clone();
        more.push(0);
        let (_, end) = decode(&more);
        assert!(end.unwrap_err().to_string().contains("bytes follow"));
    }
}
