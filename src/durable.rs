//! `fsync`, in one place. Every point where litefleet makes something
//! durable before it counts as done (a `file://` object and the directories
//! above it, the state file of upload records, a restored database and its
//! directory) syncs through these functions: [`sync_file`] and
//! [`sync_path`] one file or directory, [`sync_filesystem`] a whole
//! filesystem at once (a batch of small `file://` objects, see
//! `replica::storage`'s `LocalBatch`).
//!
//! Why a module of two calls: whether the kernel persisted a write cannot
//! be observed from a test, but a durability point that stops calling
//! `fsync` can. In test builds every sync is recorded, and the tests of each
//! durability point assert that the very file and directories were synced
//! before the write returned (black-box audit F19: removing any of five of
//! these `fsync`s failed no test).

use std::fs::File;
use std::io;
use std::path::Path;

/// `fsync`s the open `file`, found at `path` (named in test records).
pub fn sync_file(file: &File, path: &Path) -> io::Result<()> {
    file.sync_all()?;
    #[cfg(test)]
    record(path);
    #[cfg(not(test))]
    let _ = path;
    Ok(())
}

/// Opens `path` (a file or a directory) and `fsync`s it: for a directory,
/// the entries created, renamed or removed in it.
pub fn sync_path(path: &Path) -> io::Result<()> {
    #[cfg(test)]
    if FAIL.with(|f| f.borrow().as_deref() == Some(path)) {
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    sync_file(&File::open(path)?, path)
}

/// `syncfs(2)`: makes everything written to the filesystem holding the
/// open `file` durable (data, new names and directories), in one
/// journal commit where [`sync_file`] of each file would make one each.
/// `path` (where `file` is) is named in test records. Only where
/// [`syncfs_reports_errors`]: an older kernel's `syncfs` can succeed
/// after a write-back error, so callers use [`sync_file`] there.
pub fn sync_filesystem(file: &File, path: &Path) -> io::Result<()> {
    #[cfg(test)]
    if FAIL.with(|f| f.borrow().as_deref() == Some(path)) {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    syncfs(file)?;
    #[cfg(test)]
    record_filesystem(path);
    #[cfg(not(test))]
    let _ = path;
    Ok(())
}

#[cfg(target_os = "linux")]
fn syncfs(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `file` is open for the duration of the call; `syncfs` takes a
    // descriptor and nothing else.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Nothing stands in for `syncfs` elsewhere: never called there
/// ([`syncfs_reports_errors`] is false), and never a false success.
#[cfg(not(target_os = "linux"))]
fn syncfs(_file: &File) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// The first Linux release whose `syncfs` returns write-back errors that
/// happened on the filesystem since the descriptor was opened (5.8,
/// `errseq` on the superblock); before it, `syncfs` returned 0 even after
/// a failed write-back, which would record a lost object as uploaded.
const SYNCFS_REPORTS_ERRORS: (u32, u32) = (5, 8);

/// Whether [`sync_filesystem`] can stand in for a [`sync_file`] per file:
/// Linux 5.8 or later (see `SYNCFS_REPORTS_ERRORS`). Read once.
pub fn syncfs_reports_errors() -> bool {
    static REPORTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REPORTS.get_or_init(|| {
        cfg!(target_os = "linux")
            && std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .is_ok_and(|release| reports_errors(&release))
    })
}

/// Whether the Linux release `release` (`uname -r`) is one whose `syncfs`
/// reports write-back errors ([`SYNCFS_REPORTS_ERRORS`]).
fn reports_errors(release: &str) -> bool {
    parse_release(release).is_some_and(|r| r >= SYNCFS_REPORTS_ERRORS)
}

/// `"6.18.44-fc-v1300\n"` -> `(6, 18)`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
thread_local! {
    /// A path whose [`sync_path`] fails on this thread (as it does when the
    /// process is out of descriptors), for tests of what a failed sync
    /// leaves behind.
    static FAIL: std::cell::RefCell<Option<std::path::PathBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes [`sync_path`] or [`sync_filesystem`] of `path` fail on this thread (`None`: no more).
#[cfg(test)]
pub fn fail_sync_of(path: Option<&Path>) {
    FAIL.with(|f| *f.borrow_mut() = path.map(Path::to_path_buf));
}

#[cfg(test)]
static SYNCED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

#[cfg(test)]
static SYNCED_FILESYSTEMS: std::sync::Mutex<Vec<std::path::PathBuf>> =
    std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn record(path: &Path) {
    record_in(&SYNCED, path);
}

#[cfg(test)]
fn record_filesystem(path: &Path) {
    record_in(&SYNCED_FILESYSTEMS, path);
}

#[cfg(test)]
fn record_in(records: &std::sync::Mutex<Vec<std::path::PathBuf>>, path: &Path) {
    records
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(path.to_path_buf());
}

#[cfg(test)]
fn recorded_below(
    records: &std::sync::Mutex<Vec<std::path::PathBuf>>,
    dir: &Path,
) -> Vec<std::path::PathBuf> {
    records
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(|p| p.strip_prefix(dir).ok().map(Path::to_path_buf))
        .collect()
}

/// The paths through which this test process synced a whole filesystem
/// ([`sync_filesystem`]) below `dir`, relative to it, oldest first.
#[cfg(test)]
pub fn filesystems_synced_below(dir: &Path) -> Vec<std::path::PathBuf> {
    recorded_below(&SYNCED_FILESYSTEMS, dir)
}

/// The paths this test process synced below `dir` (every test's syncs are
/// recorded: each looks below its own temporary directory), relative to
/// it, oldest first.
#[cfg(test)]
pub fn synced_below(dir: &Path) -> Vec<std::path::PathBuf> {
    recorded_below(&SYNCED, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_read_as_major_and_minor() {
        assert_eq!(parse_release("6.18.44-fc-v1300\n"), Some((6, 18)));
        assert_eq!(parse_release("5.8.0"), Some((5, 8)));
        assert_eq!(parse_release("5.4-rc1"), Some((5, 4)));
        assert_eq!(parse_release("4.19.0-generic"), Some((4, 19)));
        assert_eq!(parse_release("junk"), None);
        assert_eq!(parse_release(""), None);
        // Compared as numbers: 5.10 is later than 5.8, 5.4 and 4.19 earlier.
        for (release, reports) in [
            ("6.18.44-fc-v1300", true),
            ("5.10.0", true),
            ("5.8.0-1", true),
            ("5.7.19", false),
            ("5.4.0-150-generic", false),
            ("4.19.0", false),
            ("unknown", false),
        ] {
            assert_eq!(reports_errors(release), reports, "{release}");
        }
    }
}
