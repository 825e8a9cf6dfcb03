//! Opening a source database with its directory pinned: the file, its
//! `-wal` and its `-shm` all come from one directory, whatever happens to
//! the path while the connection is open.
//!
//! SQLite opens a database's file when the connection opens, and its
//! `-wal` and `-shm` by name later, at the first read transaction, each
//! looked up from the path again. A directory on the path exchanged for
//! another tree holding a database of the same name between those lookups
//! gave a snapshot of one tree's file with the other tree's WAL frames: a
//! state neither database ever had, restored with exit 0 and a clean
//! `integrity_check` (black-box probe N21: 35-46 of 150 snapshots mixed
//! with directories exchanged back and forth without pause; 3-4 of 150
//! still after the snapshot's last checks, which look the path up anew
//! too and can be passed by an adversary flipping fast enough). Hot
//! streams had the same gap: generation snapshots and WAL parts of both
//! trees (probe N22c).
//!
//! So a snapshot's or a stream's connection opens
//! `/proc/<pid>/fd/<d>/<name>`, where `d`
//! is a descriptor of the database's directory opened just before
//! ([`pin`]): the kernel resolves `/proc/<pid>/fd/<d>` to that very
//! directory at every lookup, so SQLite's later opens of `<name>-wal` and
//! `<name>-shm` find the files beside the file it opened, never another
//! tree's. What the connection reads is then one directory's database; a
//! snapshot's last check ([`crate::capture::snapshot`]) and a stream's
//! checks at each sync ([`crate::capture::ship`]) only have to show that
//! the path still leads to the files read.
//!
//! SQLite's unix VFS would undo the pin: it resolves every link on a path
//! it opens (one `lstat` per component, and `/proc/<pid>/fd/<d>` is a link
//! that reads as the directory's path *now*). So these connections open
//! through the unix VFS registered once more under another name
//! ([`SOURCE_VFS`]) whose `xFullPathname` takes a plain absolute path as
//! it is. Its other methods are the unix VFS's own, so files opened
//! through either share its per-inode state (locks, the WAL-index
//! mapping): a connection of this process closing keeps the locks of
//! another, as [`crate::source::vfs`] requires. The pinned path is short
//! and skips the per-component `lstat`s (11 for
//! `/data/p/databases/d/branches/b/tenants/t.db`), which were about a
//! sixth of the system calls of a small database's snapshot.
//!
//! SQLite keeps one name of a database's `-shm` per process (the first
//! connection's, in its per-inode state), which may then be a pinned path
//! whose descriptor is closed or reused. It uses that name once only: to
//! delete the `-shm` when the last connection of the process closes after
//! checkpointing the whole WAL under an exclusive lock. Litefleet's
//! connections never do: snapshot connections are read-only, and hot
//! streams close without checkpointing (`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`,
//! [`crate::capture::ship`]).
//!
//! The directory of a database found below its pattern root is opened
//! from the root ([`pin_below`]) by one `openat2` that refuses every link
//! on the way: the scan never follows links below a root, and a check of
//! the path's directories followed by an open through the path let a
//! directory swapped for a link to an outside tree in between the two
//! (`bench/mix_swapdirs.sh` with `TWIN=link`).
//!
//! Cost: one descriptor per open source connection (a snapshot's while it
//! runs, a stream's for as long as it streams), held until the connection
//! is closed. Where `/proc/self/fd` is not there (not Linux,
//! no procfs), connections open the path as given, as before.

use std::ffi::{c_char, c_int, CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rusqlite::{ffi, Connection, OpenFlags};

use crate::source::discover::check_no_link_below;

/// The name of the VFS pinned connections open with: SQLite's unix VFS
/// registered once more, its `xFullPathname` taking plain absolute paths
/// as they are (see the module docs).
pub const SOURCE_VFS: &CStr = c"litefleet-pinned";

/// A database's path with its directory held open: [`Pinned::path`] names
/// the database inside that directory for as long as this lives.
#[derive(Debug)]
pub struct Pinned {
    /// The directory, opened with `O_PATH` (search permission is enough,
    /// as for the path itself); `None` where pinning is not available.
    dir: Option<OwnedFd>,
    /// `/proc/<pid>/fd/<dir>/<name>`, or the path as given without `dir`.
    path: PathBuf,
    /// The database's file name, for lookups relative to `dir`.
    name: std::ffi::OsString,
}

/// What `lstat` says of a file: its identity and whether it is a regular
/// file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// (device, inode).
    pub id: (u64, u64),
    /// A regular file (not a link, FIFO, directory, socket or device).
    pub regular: bool,
    /// Its size in bytes.
    pub len: u64,
}

/// Pins the directory of `db` ([`Pinned`]): opened now, through the path as
/// it is now. Fails with the directory's open error (`NotFound` if it is
/// gone, as the database's own open would). Without `/proc/self/fd`, or
/// for a path without a file name, the path is kept as it is.
pub fn pin(db: &Path) -> io::Result<Pinned> {
    let Some(name) = db.file_name().filter(|_| available()) else {
        return Ok(Pinned::as_given(db));
    };
    let parent = match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    #[cfg(test)]
    test_trees::before_dir_open();
    Ok(pinned_at(open_path(parent, None, 0)?, name))
}

/// [`pin`] for a database found below the pattern root `root`, where the
/// scan never follows links: the directory is opened from the root by one
/// `openat2` that refuses every symbolic link on the way
/// (`RESOLVE_NO_SYMLINKS`) and every way out of the root
/// (`RESOLVE_BENEATH`). A check of the path's directories and then an open
/// through the path (as before) left the instant between the two to a
/// directory swapped for a link to a tree outside the root: the outside
/// database was read as this one. The root itself may be reached through a
/// link (`/srv -> /mnt/disk/srv`), as at the scan. A refusal names the
/// directory in the way, as [`check_no_link_below`] does.
///
/// Without a root, for a database not below it or directly in it, or
/// where nothing is pinned, the directories are checked and then the
/// path pinned, as before; so too where `openat2` is missing (Linux
/// before 5.6, or a seccomp filter refusing it).
pub fn pin_below(root: Option<&Path>, db: &Path) -> crate::Result<Pinned> {
    let below = root
        .and_then(|r| Some((r, db.parent()?.strip_prefix(r).ok()?)))
        .filter(|(_, rel)| !rel.as_os_str().is_empty() && available() && openat2_works());
    let Some((root, rel)) = below else {
        check_no_link_below(root, db)?;
        return pin(db).map_err(|e| crate::Error::io(db, e));
    };
    let refused = |e: io::Error| match e.raw_os_error() {
        // A link, a file or nothing where a directory should be (or a way
        // out of the root): named by the walk; a walk that finds nothing
        // wrong (put back meanwhile) names the whole path.
        Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT | libc::EXDEV) => {
            check_no_link_below(Some(root), db).and(Err(crate::Error::invalid(
                db.display(),
                format!(
                    "a directory between {} and it was a link or gone while it was opened \
                     (links below the pattern root are never followed); not opened",
                    root.display()
                ),
            )))
        }
        _ => Err(crate::Error::io(db, e)),
    };
    let top = open_path(root, None, 0).or_else(refused)?;
    #[cfg(test)]
    test_trees::before_dir_open();
    let dir = open_path(
        rel,
        Some(&top),
        libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH,
    )
    .or_else(refused)?;
    drop(top);
    Ok(pinned_at(dir, db.file_name().unwrap_or_default()))
}

/// Opens the directory `path` with `O_PATH`: relative to `at` by `openat2`
/// with `resolve` flags, else by `open`.
fn open_path(path: &Path, at: Option<&OwnedFd>, resolve: u64) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    let fd = match at {
        None => {
            // SAFETY: a NUL-terminated path; the descriptor returned is ours.
            unsafe { libc::open(c.as_ptr(), flags) }
        }
        Some(at) => {
            // SAFETY: plain integers, all zero is a valid value.
            let mut how: libc::open_how = unsafe { std::mem::zeroed() };
            how.flags = flags as u64;
            how.resolve = resolve;
            // SAFETY: a valid directory descriptor, a NUL-terminated path and
            // a complete `open_how` of the size passed.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    at.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            c_int::try_from(fd).unwrap_or(-1)
        }
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether this kernel has `openat2` and lets this process call it
/// (Linux 5.6 and later, unless a seccomp filter refuses it), tried once.
fn openat2_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let root = match open_path(Path::new("/"), None, 0) {
            Ok(fd) => fd,
            Err(_) => return false,
        };
        !matches!(
            open_path(Path::new("."), Some(&root), libc::RESOLVE_NO_SYMLINKS)
                .map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOSYS | libc::EPERM))
        )
    })
}

/// The [`Pinned`] of the database `name` in the directory `dir`.
fn pinned_at(dir: OwnedFd, name: &std::ffi::OsStr) -> Pinned {
    // `/proc/<pid>`, not `/proc/self`: one link less to follow at every
    // lookup SQLite makes (the process's threads share its descriptors).
    let mut path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        dir.as_raw_fd()
    ));
    path.push(name);
    Pinned {
        dir: Some(dir),
        path,
        name: name.to_owned(),
    }
}

impl Pinned {
    /// `db` as given, nothing pinned: for connections that resolve their
    /// path the stock way.
    pub fn as_given(db: &Path) -> Pinned {
        Pinned {
            dir: None,
            path: db.to_path_buf(),
            name: Default::default(),
        }
    }

    /// `lstat` of the database's file with `suffix` (`""`, `"-wal"`, ...):
    /// in the pinned directory, relative to its descriptor (one lookup,
    /// where a path through `/proc` costs several and a `procfs` lookup
    /// each: `perf` of a cold cycle over 3,000 small databases put path
    /// walks at 12% of its samples with them, 8.5% before the pin); at the
    /// path as given when not pinned.
    pub fn lstat(&self, suffix: &str) -> io::Result<Entry> {
        let Some(dir) = &self.dir else {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            let m = std::fs::symlink_metadata(path)?;
            use std::os::unix::fs::MetadataExt;
            return Ok(Entry {
                id: (m.dev(), m.ino()),
                regular: m.file_type().is_file(),
                len: m.len(),
            });
        };
        let mut name = self.name.as_bytes().to_vec();
        name.extend_from_slice(suffix.as_bytes());
        let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a valid directory descriptor, a NUL-terminated name and
        // room for one `stat`, filled in on success.
        let rc = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: filled in by the successful call.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)] // u64 on some targets, not all
        Ok(Entry {
            id: (st.st_dev as u64, st.st_ino as u64),
            regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
            len: u64::try_from(st.st_size).unwrap_or(0),
        })
    }

    /// The path to open and look the database's files up at: inside the
    /// pinned directory. Never for messages (it names a descriptor).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory is pinned (else [`Pinned::path`] is the path
    /// as given).
    pub fn is_pinned(&self) -> bool {
        self.dir.is_some()
    }

    /// Opens a connection on the pinned path with `flags`, through
    /// [`SOURCE_VFS`] (SQLite's default VFS when not pinned, or if it could
    /// not be registered). The connection must be closed before `self` is
    /// dropped: SQLite opens the side files by this path whenever it needs
    /// them.
    pub fn open(&self, flags: OpenFlags) -> rusqlite::Result<Connection> {
        match source_vfs().filter(|_| self.is_pinned()) {
            Some(vfs) => Connection::open_with_flags_and_vfs(&self.path, flags, vfs),
            None => Connection::open_with_flags(&self.path, flags),
        }
    }
}

/// Whether this process can name its descriptors by path
/// (`/proc/self/fd`), checked once.
fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| Path::new("/proc/self/fd").is_dir() && source_vfs().is_some())
}

/// SQLite's unix VFS, registered once more as [`SOURCE_VFS`] with its
/// `xFullPathname` replaced by [`full_pathname`]: `None` if it cannot be
/// registered. Never the default VFS.
fn source_vfs() -> Option<&'static CStr> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: initializes SQLite if needed and finds its registered
            // unix VFS; the pointer is valid for the life of the process.
            let unix = unsafe {
                ffi::sqlite3_initialize();
                ffi::sqlite3_vfs_find(c"unix".as_ptr())
            };
            // SAFETY: a non-null pointer to SQLite's static VFS structure.
            let Some(base) = (unsafe { unix.as_ref() }) else {
                return false;
            };
            if base.xFullPathname.is_none() || UNIX_FULL_PATHNAME.set(base.xFullPathname).is_err() {
                return false;
            }
            let mut ours = *base;
            ours.pNext = std::ptr::null_mut();
            ours.zName = SOURCE_VFS.as_ptr();
            ours.xFullPathname = Some(full_pathname);
            // SQLite keeps the pointer for the life of the process: leaked.
            let ours: &'static mut ffi::sqlite3_vfs = Box::leak(Box::new(ours));
            // SAFETY: a complete copy of the unix VFS, alive forever.
            unsafe { ffi::sqlite3_vfs_register(ours, 0) == ffi::SQLITE_OK }
        })
        .then_some(SOURCE_VFS)
}

/// The signature of a VFS's `xFullPathname`.
type FullPathname =
    unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *const c_char, c_int, *mut c_char) -> c_int;

/// The unix VFS's own `xFullPathname`, for the paths [`full_pathname`]
/// leaves to it.
static UNIX_FULL_PATHNAME: OnceLock<Option<FullPathname>> = OnceLock::new();

/// Whether `path` is absolute with no empty, `.` or `..` component: what
/// [`full_pathname`] takes as it is.
fn plain_absolute(path: &[u8]) -> bool {
    path.strip_prefix(b"/").is_some_and(|rest| {
        rest.split(|&b| b == b'/')
            .all(|c| !matches!(c, b"" | b"." | b".."))
    })
}

/// `xFullPathname` of [`SOURCE_VFS`]: a plain absolute path (a pinned one)
/// as it is, any other through the unix VFS's own method.
unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    path: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: SQLite passes a NUL-terminated path and an output buffer of
    // `n_out` bytes.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes_with_nul();
    if plain_absolute(&bytes[..bytes.len() - 1]) && bytes.len() <= n_out.max(0) as usize {
        // SAFETY: `bytes.len()` bytes fit in `out` (checked above).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().cast(), out, bytes.len()) };
        return ffi::SQLITE_OK;
    }
    match UNIX_FULL_PATHNAME.get().copied().flatten() {
        // SAFETY: the unix VFS's own method, with SQLite's own arguments.
        Some(unix) => unsafe { unix(vfs, path, n_out, out) },
        None => ffi::SQLITE_CANTOPEN,
    }
}

/// Trees of one database each, for tests of paths changing under a
/// snapshot.
#[cfg(test)]
pub(crate) mod test_trees {
    use std::path::Path;

    use rusqlite::Connection;

    /// A new directory `dir` with a WAL database `x.db` whose table is in
    /// the file and whose one row, `tag`, is in the WAL only.
    pub(crate) fn tagged(dir: &Path, tag: &str) {
        std::fs::create_dir(dir).unwrap();
        let app = Connection::open(dir.join("x.db")).unwrap();
        app.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        app.execute_batch(&format!(
            "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x);
             PRAGMA wal_checkpoint(TRUNCATE); INSERT INTO t VALUES ('{tag}');"
        ))
        .unwrap();
    }

    /// Exchanges directories `a` and `b` (three renames, through `via`)
    /// each time it is called.
    pub(crate) fn exchanger(a: &Path, b: &Path, via: &Path) -> impl Fn() + Clone + 'static {
        let (a, b, via) = (a.to_path_buf(), b.to_path_buf(), via.to_path_buf());
        move || {
            std::fs::rename(&a, &via).unwrap();
            std::fs::rename(&b, &a).unwrap();
            std::fs::rename(&via, &b).unwrap();
        }
    }

    /// Renames the directory `dir` to `away` and puts a link to `target`
    /// in its place.
    pub(crate) fn link_in_place(dir: &Path, away: &Path, target: &Path) {
        std::fs::rename(dir, away).unwrap();
        std::os::unix::fs::symlink(target, dir).unwrap();
    }

    thread_local! {
        static BEFORE_DIR_OPEN: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// Runs `f` once on this thread, just before the next pin of it opens
    /// a database's directory (for [`super::pin_below`]: after the root).
    pub(crate) fn at_next_dir_open(f: impl FnOnce() + 'static) {
        BEFORE_DIR_OPEN.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    /// Runs the function [`at_next_dir_open`] set, if any.
    pub(super) fn before_dir_open() {
        if let Some(f) = BEFORE_DIR_OPEN.with(|h| h.borrow_mut().take()) {
            f()
        }
    }

    /// The rows of such a database.
    pub(crate) fn rows(c: &Connection) -> Vec<String> {
        c.prepare("SELECT x FROM t")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_trees::{exchanger, rows, tagged};
    use super::*;

    /// `pin_below` opens a database's directory only through real
    /// directories below the root, naming what is in the way otherwise; a
    /// root reached through a link, or a database right in the root, is
    /// fine.
    #[test]
    fn pin_below_opens_only_through_real_directories_below_the_root() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir_all(real.join("a/b")).unwrap();
        let root = t.path().join("root");
        std::os::unix::fs::symlink(&real, &root).unwrap();
        let db = root.join("a/b/x.db");
        let pinned = pin_below(Some(&root), &db).expect("a linked root is fine");
        assert_eq!(pinned.is_pinned(), available());
        assert!(pin_below(Some(&root), &root.join("x.db")).is_ok());
        assert!(pin_below(None, &db).is_ok());
        drop(pinned);
        // `b` a link to a directory outside the root.
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        test_trees::link_in_place(&real.join("a/b"), &real.join("a/was-b"), &outside);
        let e = pin_below(Some(&root), &db).unwrap_err().to_string();
        let named = format!("{} is no directory of its own", root.join("a/b").display());
        assert!(e.contains(&named), "{e}");
        // Gone.
        std::fs::remove_file(real.join("a/b")).unwrap();
        let e = pin_below(Some(&root), &db).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} is gone", root.join("a/b").display())),
            "{e}"
        );
        // Not below the root: as `pin`.
        let elsewhere = outside.join("x.db");
        assert!(pin_below(Some(&root), &elsewhere).is_ok());
    }

    /// A directory exchanged for another tree after the open and before the
    /// first read: a pinned connection reads its own directory's WAL; the
    /// path as given, opened the stock way, reads the file it opened with
    /// the other tree's WAL (what probe N21's mixed snapshots were made of).
    #[test]
    fn a_pinned_connection_reads_its_directorys_wal_whatever_the_path_names_later() {
        let t = tempfile::tempdir().unwrap();
        let (data, other, swap) = (
            t.path().join("data"),
            t.path().join("other"),
            t.path().join("swap"),
        );
        tagged(&data, "mine");
        tagged(&other, "theirs");
        let db = data.join("x.db");
        let exchange = exchanger(&data, &other, &swap);
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY;
        // The stock connection holds `mine`'s file and reads `theirs`' WAL
        // (same schema, so its row).
        let stock = Connection::open_with_flags(&db, flags).unwrap();
        exchange();
        assert_eq!(rows(&stock), ["theirs"], "mixed without the pin");
        drop(stock);
        exchange();
        let pinned = pin(&db).unwrap();
        assert!(pinned.is_pinned(), "/proc/self/fd is there on Linux");
        let ours = pinned.open(flags).unwrap();
        exchange();
        assert_eq!(
            rows(&ours),
            ["mine"],
            "file and WAL of the pinned directory"
        );
        drop(ours);
        exchange();
        let gone = pin(&t.path().join("nowhere").join("x.db")).unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
    }

    /// Pinned paths are taken as they are; any other path still goes
    /// through the unix VFS's own method.
    #[test]
    fn only_plain_absolute_paths_are_taken_as_they_are() {
        assert!(plain_absolute(b"/proc/4242/fd/7/x.db"));
        for p in [
            &b"a/b.db"[..],
            b"/a//b.db",
            b"/a/./b.db",
            b"/a/../b.db",
            b"/a/",
            b"/",
        ] {
            assert!(!plain_absolute(p), "{}", String::from_utf8_lossy(p));
        }
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("x.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES ('a');")
            .unwrap();
        let dotted = t.path().join(".").join("x.db");
        let pinned = pin(&dotted).unwrap();
        let c = pinned.open(OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        assert_eq!(rows(&c), ["a"]);
        let proc_fd = format!("/proc/{}/fd/", std::process::id());
        assert!(c.path().unwrap().starts_with(&proc_fd));
    }
}
