//! `fsync`, in one place. Every point where litefleet makes something
//! durable before it counts as done (a `file://` object and the directories
//! above it, the state file of upload records, a restored database and its
//! directory) syncs through these two functions.
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

#[cfg(test)]
thread_local! {
    /// A path whose [`sync_path`] fails on this thread (as it does when the
    /// process is out of descriptors), for tests of what a failed sync
    /// leaves behind.
    static FAIL: std::cell::RefCell<Option<std::path::PathBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes [`sync_path`] of `path` fail on this thread (`None`: no more).
#[cfg(test)]
pub fn fail_sync_of(path: Option<&Path>) {
    FAIL.with(|f| *f.borrow_mut() = path.map(Path::to_path_buf));
}

#[cfg(test)]
static SYNCED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn record(path: &Path) {
    SYNCED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(path.to_path_buf());
}

/// The paths this test process synced below `dir` (every test's syncs are
/// recorded: each looks below its own temporary directory), relative to
/// it, oldest first.
#[cfg(test)]
pub fn synced_below(dir: &Path) -> Vec<std::path::PathBuf> {
    SYNCED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(|p| p.strip_prefix(dir).ok().map(Path::to_path_buf))
        .collect()
}
