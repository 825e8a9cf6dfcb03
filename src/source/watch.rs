//! Change notifications: a write to a tracked database is seen within
//! milliseconds, not at the next scan.
//!
//! One inotify instance watches every directory that holds a tracked
//! database (one watch per directory, not per file). An event on a
//! database, its `-wal` or its `-journal` names a file the scheduler
//! re-checks at once ([`crate::source::track::Tracker::recheck`]): a stat of
//! that database and its `-wal`, exactly as a scan would do it. A database
//! created in (or renamed into) a watched directory is named the same way,
//! by its own events or its `-wal`'s: if a pattern matches it, the re-check
//! adds it as a scan would and the scheduler checks its key and uploads it
//! at once, so what is written to a new database is not at risk until the
//! next scan. Everything else stays with the periodic scan, which remains
//! the safety net: it finds the databases in directories not watched yet (a
//! directory is watched from the scan that finds its first database on,
//! and again from the scan that finds one in it after it was deleted or
//! moved away and made again at its path) and
//! drops deleted ones, and any event that is lost (a full kernel queue,
//! [`Batch::Overflow`]) costs a full scan. The scheduler bounds what
//! notifications cost: a database they already had uploaded within the
//! last scan interval waits for the scan, and streaming databases are left
//! to their streams.
//!
//! Limits: the kernel bounds the watches per user
//! (`fs.inotify.max_user_watches`). When a watch cannot be added for that
//! reason the watcher says so once, with the number of directories it
//! needed, and stops adding: the directories it could not watch are
//! noticed by the scan only, as before.
//!
//! Memory: the directories are the tracker's (interned once); the watcher
//! keeps a map from watch id to directory index and watch, about 32 bytes
//! per directory, and one read buffer.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::source::track::Tracker;

/// How long a batch keeps collecting events after its first one: a commit
/// is several writes to the `-wal` (frames, then the commit frame), and a
/// burst of commits across databases is one re-check rather than many.
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// Bytes read from the inotify descriptor at a time: room for ~250 events
/// with names of a typical length.
const READ_BUFFER: usize = 16 * 1024;

/// What changed since the last batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    /// Files that were written, created or renamed into place, as
    /// (tracker directory index, file name): databases (tracked or not yet)
    /// and their side files, and any other file of a watched directory.
    Changed(Vec<(u32, OsString)>),
    /// The kernel dropped events: only a full scan can tell what changed.
    Overflow,
    /// The notification stream failed or ended: the scans are all there is
    /// from now on (after one full scan, as for an overflow).
    Failed,
}

/// The inotify watcher of the tracked directories.
pub struct Watch {
    events: EventStream<Vec<u8>>,
    watches: Watches,
    /// Watch id -> tracker directory index, and the watch (to remove it
    /// when the directory at the path is another one).
    dirs: HashMap<i32, (u32, WatchDescriptor)>,
    /// Tracker directories `0..next_dir` have been considered.
    next_dir: usize,
    /// Considered directories without a watch: gone when they were to be
    /// watched, or whose watch ended (the directory was deleted or moved
    /// away). Watched again once the tracker holds a database in them (a
    /// directory deleted and made again at the same path has the same
    /// tracker index, so it is not new).
    lost: HashSet<u32>,
    /// Set when the kernel's watch limit was reached (logged once).
    full: bool,
}

impl Watch {
    /// An inotify instance with no watches yet (needs a tokio runtime).
    pub fn new() -> io::Result<Watch> {
        let events = Inotify::init()?.into_event_stream(vec![0u8; READ_BUFFER])?;
        let watches = events.watches();
        Ok(Watch {
            events,
            watches,
            dirs: HashMap::new(),
            next_dir: 0,
            lost: HashSet::new(),
            full: false,
        })
    }

    /// Number of directories watched.
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Directories of `tracker` not considered yet (they only ever grow),
    /// those whose watch was lost that hold a tracked database again, and
    /// those already watched in which the last scan met a new or changed
    /// file: a directory at that path may be another one now (its parent
    /// moved away and made again; the watch followed the old one, and no
    /// event says so). Watching it again costs one system call: the kernel
    /// answers with the same watch for the same directory. To pass to
    /// [`Watch::add`] without holding the tracker meanwhile.
    ///
    /// Called after a scan, which has dropped the databases of directories
    /// that are gone: a lost directory without one is forgotten here (were
    /// it made again, its databases would be new to the next scan, which
    /// names it), so `lost` does not make every later call walk the table.
    pub fn new_dirs(&mut self, tracker: &Tracker) -> Vec<(u32, PathBuf)> {
        let again = match self.lost.is_empty() {
            true => Vec::new(),
            false => tracker.dirs_in_use(&self.lost),
        };
        self.lost.retain(|d| again.binary_search(d).is_ok());
        let considered = self.next_dir as u32;
        let touched: Vec<u32> = tracker
            .touched_dirs()
            .iter()
            .copied()
            .filter(|d| *d < considered && !self.lost.contains(d))
            .collect();
        (considered..tracker.dir_count() as u32)
            .chain(again)
            .chain(touched)
            .map(|i| (i, tracker.dir(i).to_path_buf()))
            .collect()
    }

    /// Watches `dirs` (from [`Watch::new_dirs`]). A directory that is gone
    /// is skipped (the scan drops its databases); the watch limit stops
    /// adding, with one warning.
    pub fn add(&mut self, dirs: &[(u32, PathBuf)]) {
        let mask = WatchMask::MODIFY
            | WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR;
        // Directories below this were watched (or tried) before.
        let considered = self.next_dir;
        for (n, (i, dir)) in dirs.iter().enumerate() {
            self.next_dir = self.next_dir.max(*i as usize + 1);
            if self.full {
                continue;
            }
            match self.watches.add(dir, mask) {
                Ok(wd) => {
                    let id = wd.get_watch_descriptor_id();
                    if (*i as usize) < considered && !self.dirs.contains_key(&id) {
                        // Another directory at the path than the one
                        // watched for it so far (moved away with its
                        // parent): that watch is about nothing of ours
                        // any more (black-box probe: each such move kept
                        // one more watch).
                        let stale: Vec<i32> = self
                            .dirs
                            .iter()
                            .filter(|(_, (d, _))| d == i)
                            .map(|(w, _)| *w)
                            .collect();
                        for w in stale {
                            if let Some((_, old)) = self.dirs.remove(&w) {
                                let _ = self.watches.remove(old);
                            }
                        }
                    }
                    self.dirs.insert(id, (*i, wd));
                    self.lost.remove(i);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    self.full = true;
                    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|_| "?".into());
                    tracing::warn!(
                        watched = self.dirs.len(),
                        needed = self.dirs.len() + (dirs.len() - n),
                        max_user_watches = %limit,
                        "inotify watch limit reached: writes in the remaining directories are \
                         noticed at the next scan only; raise fs.inotify.max_user_watches above \
                         the number of directories holding databases"
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.lost.insert(*i);
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory; the scan covers it");
                }
            }
        }
    }

    /// Waits for the next change, then collects what else arrives within
    /// [`DEBOUNCE`]. Cancel-safe: events not yet read stay in the kernel's
    /// queue.
    pub async fn next(&mut self) -> Batch {
        loop {
            let mut seen: HashSet<(u32, OsString)> = HashSet::new();
            let mut overflow = false;
            let first = self.events.next().await;
            let mut alive = self.take(first, &mut seen, &mut overflow);
            if alive {
                let deadline = tokio::time::Instant::now() + DEBOUNCE;
                while let Ok(ev) = tokio::time::timeout_at(deadline, self.events.next()).await {
                    if !self.take(ev, &mut seen, &mut overflow) {
                        alive = false;
                        break;
                    }
                }
            }
            if !alive {
                return Batch::Failed;
            }
            if overflow {
                return Batch::Overflow;
            }
            if !seen.is_empty() {
                return Batch::Changed(seen.into_iter().collect());
            }
        }
    }

    /// Adds one event to a batch; false when the stream failed or ended.
    fn take(
        &mut self,
        ev: Option<io::Result<inotify::EventOwned>>,
        seen: &mut HashSet<(u32, OsString)>,
        overflow: &mut bool,
    ) -> bool {
        match ev {
            Some(Ok(ev)) => {
                let dir = self
                    .dirs
                    .get(&ev.wd.get_watch_descriptor_id())
                    .map(|(d, _)| *d);
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    *overflow = true;
                } else if ev.mask.contains(EventMask::IGNORED) {
                    // Deleted (or its watch removed below): watched again
                    // when a scan finds a database there.
                    if let Some((dir, _)) = self.dirs.remove(&ev.wd.get_watch_descriptor_id()) {
                        self.lost.insert(dir);
                    }
                } else if ev.mask.contains(EventMask::MOVE_SELF) {
                    // Moved away: its events no longer name files at its
                    // path. A directory made again at the path is watched
                    // anew; the moved one, if a pattern still matches it,
                    // as the new directory a scan finds it to be.
                    if let Some((dir, wd)) = self.dirs.remove(&ev.wd.get_watch_descriptor_id()) {
                        self.lost.insert(dir);
                        let _ = self.watches.remove(wd);
                    }
                } else if let (Some(name), Some(dir)) = (ev.name, dir) {
                    // `-shm` changes with every read transaction (ours
                    // included) and never holds data of its own.
                    if !name.as_bytes().ends_with(b"-shm") {
                        seen.insert((dir, name));
                    }
                }
                true
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading change notifications failed; from now on writes are noticed at each scan");
                false
            }
            None => {
                tracing::warn!(
                    "change notifications ended; from now on writes are noticed at each scan"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::discover::Pattern;
    use std::path::Path;

    fn database(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut b = crate::source::vfs::SQLITE_HEADER.to_vec();
        b.extend_from_slice(&[0; 84]);
        std::fs::write(p, b).unwrap();
    }

    /// The next batch, which must come within seconds.
    async fn next(w: &mut Watch) -> Batch {
        tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("a notification")
    }

    /// Scans, then watches what the scan found (as the scheduler does
    /// after each full cycle).
    fn scan_and_watch(w: &mut Watch, tr: &mut Tracker, pat: &[Pattern]) {
        tr.scan(pat);
        let dirs = w.new_dirs(tr);
        w.add(&dirs);
    }

    /// A watched directory deleted and made again at the same path, moved
    /// away and made again, or made again after its parent moved away
    /// (which sends the watch no event at all), is watched again from the
    /// scan that finds a database in it (black-box probes: it kept the
    /// tracker index of the first, which counted as considered, so its
    /// writes waited for the scans for good).
    #[tokio::test]
    async fn a_directory_made_again_is_watched_again() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let pat = vec![Pattern::compile("*/*/*.db", &root).unwrap()];
        let (dir, db) = (root.join("eu/acme"), root.join("eu/acme/app.db"));
        database(&db);
        let mut tr = Tracker::new();
        let mut w = Watch::new().unwrap();
        scan_and_watch(&mut w, &mut tr, &pat);
        assert_eq!(w.watched(), 1);
        let a = tr.find(&db).map(|_| 0u32).unwrap();

        for how in [
            "deleted",
            "moved away",
            "its parent moved away",
            "its parent moved away and made again before a scan",
        ] {
            let elsewhere = t.path().join("elsewhere");
            match how {
                "deleted" => std::fs::remove_dir_all(&dir).unwrap(),
                "moved away" => std::fs::rename(&dir, &elsewhere).unwrap(),
                _ => std::fs::rename(root.join("eu"), &elsewhere).unwrap(),
            }
            let parent = how.starts_with("its parent");
            if !parent {
                // The watch ends (IGNORED, or MOVE_SELF). (`next` returns
                // only with changed files: it is cut short to look.)
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while w.watched() > 0 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{how}: the watch did not end"
                    );
                    let _ = tokio::time::timeout(Duration::from_millis(50), w.next()).await;
                }
            }
            // A scan without the directory (but for the last case, whose
            // scan meets the same names, changed), then one that finds it
            // again.
            if !how.ends_with("before a scan") {
                scan_and_watch(&mut w, &mut tr, &pat);
            }
            database(&db);
            scan_and_watch(&mut w, &mut tr, &pat);
            assert_eq!(w.watched(), 1, "{how}: not watched again");
            std::fs::write(&db, b"SQLite format 3\0written").unwrap();
            match next(&mut w).await {
                Batch::Changed(files) => {
                    assert!(files.contains(&(a, "app.db".into())), "{how}: {files:?}")
                }
                other => panic!("{how}: {other:?}"),
            }
            let _ = std::fs::remove_dir_all(&elsewhere);
            // (The events of the moved directory's removal, if any.)
            while let Ok(b) = tokio::time::timeout(Duration::from_millis(50), w.next()).await {
                drop(b);
            }
        }
    }
}
