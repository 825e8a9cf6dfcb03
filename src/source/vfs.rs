//! Reading the first bytes of a database file without dropping this
//! process's SQLite locks on it.
//!
//! SQLite locks database files with POSIX advisory locks (`fcntl`), which
//! belong to the process, not to a descriptor: closing *any* descriptor of a
//! file drops every lock the process holds on it. The hot tier keeps
//! connections open on the databases it streams (a shared lock on the file
//! that stops another process's last close from checkpointing and deleting
//! the WAL under it), and the cold tier holds read transactions while it
//! snapshots. A plain `File::open` + `close` of such a file here, to read its
//! header, would silently drop those locks.
//!
//! SQLite's own unix VFS knows this: when a file it opened is closed while a
//! connection of the process still holds a lock on the same inode, it keeps
//! the descriptor open until the last lock is released. So headers are read
//! through that VFS (`xOpen` read-only as a main database, `xRead`,
//! `xClose`): same system calls, one `stat` more, and no lock is lost.
//! Nothing else (no journal, no WAL, no `-shm`) is opened.

use std::ffi::{c_int, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rusqlite::{ffi, Connection};

/// The 16-byte header every SQLite 3 database file starts with.
pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// True if the file starts with the SQLite 3 header. `Ok(false)` for short or
/// foreign files.
pub fn has_sqlite_header(path: &Path) -> io::Result<bool> {
    VfsFile::open(path)?.handle()?.has_sqlite_header()
}

/// Reads the first `buf.len()` bytes of the file at `path` into `buf` and
/// returns how many it has (fewer for a shorter file), through SQLite's
/// default VFS (see the module docs). The errors are the file system's:
/// [`io::ErrorKind::NotFound`] for a file that is gone.
pub fn read_start(path: &Path, buf: &mut [u8]) -> io::Result<usize> {
    VfsFile::open(path)?.handle()?.read_start(buf)
}

impl VfsHandle<'_> {
    /// True if the file starts with the SQLite 3 header. `Ok(false)` for
    /// short or foreign files.
    pub fn has_sqlite_header(&self) -> io::Result<bool> {
        let mut buf = [0u8; SQLITE_HEADER.len()];
        Ok(self.read_start(&mut buf)? == buf.len() && &buf == SQLITE_HEADER)
    }

    /// Reads the first `buf.len()` bytes of the file into `buf` and returns
    /// how many it has (fewer for a shorter file).
    pub fn read_start(&self, buf: &mut [u8]) -> io::Result<usize> {
        let want = i64::try_from(buf.len()).map_err(io::Error::other)?;
        let size = self.size()?;
        let mut n = usize::try_from(size.clamp(0, want)).map_err(io::Error::other)?;
        if !self.read_at(&mut buf[..n], 0)? {
            // Truncated meanwhile: SQLite zero-filled the rest.
            n = n.min(usize::try_from(self.size()?.max(0)).map_err(io::Error::other)?);
        }
        Ok(n)
    }
}

/// An open file of SQLite's VFS, borrowed for `'f`: the handle and the
/// VFS's own methods on it. The one place litefleet calls them (`xRead`,
/// `xFileSize`, `xFileControl`), for a connection's database file
/// ([`VfsHandle::of`]) and for a [`VfsFile`] of its own alike.
#[derive(Clone, Copy)]
pub struct VfsHandle<'f> {
    file: *mut ffi::sqlite3_file,
    methods: &'f ffi::sqlite3_io_methods,
}

impl<'f> VfsHandle<'f> {
    /// The main database file of `conn`, as SQLite's VFS has it open
    /// (`SQLITE_FCNTL_FILE_POINTER`): reads through it see the very file the
    /// connection's transaction protects, not one renamed over its path
    /// since. `None` if the VFS gives none.
    pub fn of(conn: &'f Connection) -> Option<VfsHandle<'f>> {
        Self::pointer(conn, ffi::SQLITE_FCNTL_FILE_POINTER)
    }

    /// The WAL file `conn` reads, as SQLite's VFS has it open
    /// (`SQLITE_FCNTL_JOURNAL_POINTER`): `None` unless the connection is in
    /// WAL mode with its WAL open (in rollback mode the pointer is the
    /// journal's, which a reader never opens).
    pub fn wal_of(conn: &'f Connection) -> Option<VfsHandle<'f>> {
        let wal_mode = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
            .is_ok_and(|m| m.eq_ignore_ascii_case("wal"));
        wal_mode
            .then(|| Self::pointer(conn, ffi::SQLITE_FCNTL_JOURNAL_POINTER))
            .flatten()
    }

    /// The file of `conn`'s main database that the file control `op`
    /// (`FILE_POINTER`, `JOURNAL_POINTER`) names, if open.
    fn pointer(conn: &'f Connection, op: c_int) -> Option<VfsHandle<'f>> {
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: the handle is valid while `conn` is borrowed; both
        // controls write one pointer through the pointer given, which
        // outlives the call.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                op,
                (&mut file as *mut *mut ffi::sqlite3_file).cast(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return None;
        }
        // SAFETY: a file of the connection (a closed one has null methods:
        // `None`), open while it is borrowed.
        unsafe { VfsHandle::new(file) }
    }

    /// The open file at `file`, `None` for a null or closed one.
    ///
    /// # Safety
    /// `file`, when not null, must be a `sqlite3_file` its VFS opened, that
    /// stays open and is used by no other thread for `'f`.
    unsafe fn new(file: *mut ffi::sqlite3_file) -> Option<VfsHandle<'f>> {
        // SAFETY: per the contract; the methods table is the VFS's own,
        // valid while the file is open.
        let methods = unsafe { file.as_ref()?.pMethods.as_ref()? };
        Some(VfsHandle { file, methods })
    }

    /// The handle, for the methods below it (shared memory, locks).
    pub fn raw(&self) -> *mut ffi::sqlite3_file {
        self.file
    }

    /// The file's methods when its VFS has shared memory (version 2 and
    /// later: `xShmMap`, `xShmLock`), which WAL mode needs.
    pub fn shm(&self) -> Option<&'f ffi::sqlite3_io_methods> {
        (self.methods.iVersion >= 2).then_some(self.methods)
    }

    /// The file's size in bytes.
    pub fn size(&self) -> io::Result<i64> {
        let size = self
            .methods
            .xFileSize
            .ok_or_else(|| io::Error::other("the SQLite VFS cannot size files"))?;
        let mut n: ffi::sqlite3_int64 = 0;
        // SAFETY: the file is open; `n` outlives the call.
        let rc = unsafe { size(self.file, &mut n) };
        check(rc, "size")?;
        Ok(n)
    }

    /// Whether the path it was opened at names another file now (renamed
    /// over, or deleted): `SQLITE_FCNTL_HAS_MOVED`.
    pub fn has_moved(&self) -> io::Result<bool> {
        let control = self
            .methods
            .xFileControl
            .ok_or_else(|| io::Error::other("the SQLite VFS has no file controls"))?;
        let mut moved: c_int = 0;
        // SAFETY: the file is open; HAS_MOVED writes one int through the
        // pointer given, which outlives the call.
        let rc = unsafe {
            control(
                self.file,
                ffi::SQLITE_FCNTL_HAS_MOVED,
                (&mut moved as *mut c_int).cast(),
            )
        };
        check(rc, "file control")?;
        Ok(moved != 0)
    }

    /// Reads `buf` at `offset`: `Ok(false)` if the file ended first (SQLite
    /// zero-fills the rest).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let read = self
            .methods
            .xRead
            .ok_or_else(|| io::Error::other("the SQLite VFS cannot read"))?;
        let len = c_int::try_from(buf.len()).map_err(io::Error::other)?;
        let offset = i64::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: `buf` is valid for `len` bytes; the file is open.
        let rc = unsafe { read(self.file, buf.as_mut_ptr().cast(), len, offset) };
        if rc == ffi::SQLITE_IOERR_SHORT_READ {
            return Ok(false);
        }
        check(rc, "read").map(|()| true)
    }

    /// Reads all of `buf` at `offset`; a file that ends first is an
    /// [`io::ErrorKind::UnexpectedEof`].
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.read_at(buf, offset)? {
            true => Ok(()),
            false => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// SQLite's WAL-index page size (`WALINDEX_PGSZ`): the first region holds
/// the header.
const WAL_INDEX_REGION: c_int = 32 * 1024;
/// The WAL-index format version SQLite writes (3.7.0).
const WAL_INDEX_VERSION: u32 = 3_007_000;

/// What the WAL-index header (`-shm`) says of a database's WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalIndex {
    /// `mxFrame`: the last valid (committed) frame of the WAL.
    pub max_frame: u32,
    /// `nBackfill`: the frames a checkpoint has copied into the database
    /// file. It only grows, until the WAL restarts (back to 0).
    pub backfill: u32,
    /// `aSalt`: the WAL's salts, new at every restart.
    pub salt: [u32; 2],
}

impl WalIndex {
    /// The index's salts as a WAL header's (big-endian) fields read: the
    /// index keeps the header's bytes in place, read here as native-order
    /// words. A WAL is the one this index describes only where its
    /// header's salts are these.
    pub fn header_salts(&self) -> [u32; 2] {
        self.salt.map(|w| u32::from_be_bytes(w.to_ne_bytes()))
    }
}

impl VfsHandle<'_> {
    /// The WAL-index header of this connection's database file. The layout
    /// (<https://www.sqlite.org/walformat.html>, native byte order): two
    /// copies of a 48-byte header (`iVersion` at 0, `isInit` at 12,
    /// `mxFrame` at 16, `aSalt` at 32), then the checkpoint info
    /// (`nBackfill` at 96). The copies must agree, as SQLite's own readers
    /// require (`None` if not: a writer is changing them). Read from the
    /// region SQLite has mapped (`xShmMap`), only for a connection in WAL
    /// mode inside a read transaction, which has it mapped already: never
    /// through a descriptor of our own on the `-shm` (see the module docs).
    pub fn wal_index(&self) -> Option<WalIndex> {
        let map = self.shm()?.xShmMap?;
        let mut region: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: region 0 at SQLite's own region size, not extended: the
        // connection mapped it when its read began; the pointer stays valid
        // while the connection is open.
        let rc = unsafe { map(self.raw(), 0, WAL_INDEX_REGION, 0, &mut region) };
        if rc != ffi::SQLITE_OK || region.is_null() {
            return None;
        }
        let mut head = [0u8; 100];
        for (i, b) in head.iter_mut().enumerate() {
            // SAFETY: inside the mapped region (32 KiB); volatile, as other
            // processes write it.
            *b = unsafe { std::ptr::read_volatile(region.cast::<u8>().add(i)) };
        }
        let word =
            |at: usize| u32::from_ne_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        (head[..48] == head[48..96] && word(0) == WAL_INDEX_VERSION && head[12] == 1).then(|| {
            WalIndex {
                max_frame: word(16),
                backfill: word(96),
                salt: [word(32), word(36)],
            }
        })
    }
}

/// A file opened read-only through SQLite's default VFS, closed (by the VFS,
/// which defers it while this process holds locks there) on drop. Its
/// own handle: it may be read on one thread while a connection of this
/// process uses the same file on another (SQLite asks only that one handle
/// is never used by two threads at once).
pub struct VfsFile {
    /// `szOsFile` bytes, 8-aligned, that the VFS fills in (`sqlite3_file`
    /// is the first member of its own structure).
    mem: Vec<u64>,
    /// The name passed to `xOpen`, which must outlive the open file.
    name: ffi::sqlite3_filename,
}

// SAFETY: the handle is plain memory owned by this value; the unix VFS's
// shared per-inode state is guarded by its own mutexes. It is never used
// from two threads at once (`handle` borrows it mutably).
unsafe impl Send for VfsFile {}

impl VfsFile {
    /// Opens `path` read-only as a main database file (no journal, WAL or
    /// `-shm` is opened).
    pub fn open(path: &Path) -> io::Result<VfsFile> {
        // SQLite's own open adds O_NOFOLLOW, but a FIFO would block it
        // until a writer comes: only regular files (see
        // `discover::check_regular_files`).
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    crate::source::discover::not_regular(&m),
                ));
            }
        }
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
        // SAFETY: sqlite3_vfs_find initializes SQLite and returns the
        // registered default VFS, valid for the life of the process.
        let vfs = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
        // SAFETY: non-null pointers to SQLite's static VFS structure.
        let Some(open) = (unsafe { vfs.as_ref() }).and_then(|v| v.xOpen) else {
            return Err(io::Error::other("SQLite has no default VFS"));
        };
        // SAFETY: `vfs` is non-null here (checked above).
        let size = usize::try_from(unsafe { (*vfs).szOsFile }).map_err(io::Error::other)?;
        // The name in the form the VFS expects of a main database
        // (sqlite3_create_filename: no journal, WAL or URI parameters).
        // SAFETY: valid C strings; a null parameter array with count 0.
        let name = unsafe {
            ffi::sqlite3_create_filename(
                c_path.as_ptr(),
                c"".as_ptr(),
                c"".as_ptr(),
                0,
                std::ptr::null_mut(),
            )
        };
        if name.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut file = VfsFile {
            mem: vec![0u64; size.div_ceil(8).max(1)],
            name,
        };
        let mut out_flags: c_int = 0;
        // SAFETY: `mem` holds szOsFile bytes for the VFS to fill in; `name`
        // lives as long as `file`. On failure the VFS leaves `pMethods`
        // null, so dropping `file` does not close anything.
        let rc = unsafe {
            open(
                vfs,
                name,
                file.raw(),
                ffi::SQLITE_OPEN_READONLY | ffi::SQLITE_OPEN_MAIN_DB,
                &mut out_flags,
            )
        };
        if rc != ffi::SQLITE_OK {
            // The cause, for the caller: what the file system says of the
            // path (gone, not permitted), else the error open(2) left.
            let errno = io::Error::last_os_error();
            // SAFETY: a failed xOpen must not be closed; make sure drop
            // sees no methods.
            unsafe { (*file.raw()).pMethods = std::ptr::null() };
            // Never a plain open here: closing it would drop the locks.
            return Err(match std::fs::metadata(path) {
                Err(e) => e,
                Ok(_) if errno.raw_os_error().unwrap_or(0) != 0 => errno,
                Ok(_) => io::Error::other(format!("SQLite could not open it (code {rc})")),
            });
        }
        Ok(file)
    }

    fn raw(&mut self) -> *mut ffi::sqlite3_file {
        self.mem.as_mut_ptr().cast()
    }

    /// The open file, for reading (see [`VfsHandle`]).
    pub fn handle(&mut self) -> io::Result<VfsHandle<'_>> {
        // SAFETY: `mem` holds the file the VFS opened (or, after a failed
        // open, null methods, giving `None`); it stays open while `self` is
        // borrowed, and the mutable borrow keeps other threads off it.
        unsafe { VfsHandle::new(self.raw()) }
            .ok_or_else(|| io::Error::other("the file is not open"))
    }
}

/// An `io::Error` for a failed VFS call: the system's error when SQLite's
/// code is an I/O error (the unix VFS leaves `errno` set), else the code.
fn check(rc: c_int, what: &str) -> io::Result<()> {
    match rc {
        ffi::SQLITE_OK => Ok(()),
        rc => {
            let errno = io::Error::last_os_error();
            Err(match errno.raw_os_error() {
                Some(e) if e != 0 => errno,
                _ => io::Error::other(format!("SQLite VFS {what} failed (code {rc})")),
            })
        }
    }
}

impl Drop for VfsFile {
    fn drop(&mut self) {
        if let Some(close) = self.handle().ok().and_then(|h| h.methods.xClose) {
            // SAFETY: the file is open and closed once; the VFS keeps the
            // descriptor while this process holds locks on the inode.
            unsafe { close(self.raw()) };
        }
        // SAFETY: made by sqlite3_create_filename, freed once, after the
        // file that used it is closed.
        unsafe { ffi::sqlite3_free_filename(self.name) };
    }
}

/// Whether another process (python3's sqlite3) can take the write lock of
/// `db` now: how tests see that this process still holds its locks.
#[cfg(test)]
pub(crate) fn writable_from_outside(db: &Path) -> bool {
    let script = "import sqlite3, sys\n\
        c = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\n\
        try:\n    c.execute('BEGIN IMMEDIATE'); print('acquired')\n\
        except sqlite3.OperationalError: print('locked')\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(db)
        .output()
        .expect("python3 runs");
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(said == "acquired" || said == "locked", "{said:?} {out:?}");
    said == "acquired"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x");
        std::fs::write(&p, b"SQLite format 3\0rest").unwrap();
        assert!(has_sqlite_header(&p).unwrap());
        std::fs::write(&p, b"SQLite").unwrap();
        assert!(!has_sqlite_header(&p).unwrap());
        let mut buf = [7u8; 10];
        assert_eq!(read_start(&p, &mut buf).unwrap(), 6);
        assert_eq!(&buf[..6], b"SQLite");
        std::fs::write(&p, b"").unwrap();
        assert!(!has_sqlite_header(&p).unwrap());
        std::fs::write(&p, b"not a database at all").unwrap();
        assert!(!has_sqlite_header(&p).unwrap());
        let gone = has_sqlite_header(&t.path().join("missing")).unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
        assert!(has_sqlite_header(t.path()).is_err(), "a directory");
    }

    /// POSIX locks belong to the process and closing any descriptor of a
    /// file drops them all: reading a header while a connection of this
    /// process holds the file's RESERVED lock must leave it held. With a
    /// plain `File::open` + close, the other process acquires the lock.
    #[test]
    fn reading_a_header_keeps_the_locks_this_process_holds() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("locked.db");
        let app = Connection::open(&db).unwrap();
        app.execute_batch("CREATE TABLE t(x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        assert!(!writable_from_outside(&db), "the lock is held");
        for _ in 0..3 {
            assert!(has_sqlite_header(&db).unwrap());
        }
        assert!(
            !writable_from_outside(&db),
            "reading the header dropped the lock"
        );
        app.execute_batch("COMMIT").unwrap();
        assert!(writable_from_outside(&db));
    }
}
