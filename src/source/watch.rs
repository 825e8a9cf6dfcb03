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
//! directory is watched from the scan that finds its first database on) and
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
//! keeps a map from watch id to directory index, about 16 bytes per
//! directory, and one read buffer.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchMask, Watches};

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
    /// Watch id -> tracker directory index.
    dirs: HashMap<i32, u32>,
    /// Tracker directories `0..next_dir` have been considered.
    next_dir: usize,
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
            full: false,
        })
    }

    /// Number of directories watched.
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Directories of `tracker` not considered yet (they only ever grow),
    /// to pass to [`Watch::add`] without holding the tracker meanwhile.
    pub fn new_dirs(&self, tracker: &Tracker) -> Vec<(u32, PathBuf)> {
        (self.next_dir..tracker.dir_count())
            .map(|i| (i as u32, tracker.dir(i as u32).to_path_buf()))
            .collect()
    }

    /// Watches `dirs` (from [`Watch::new_dirs`]). A directory that is gone
    /// is skipped (the scan drops its databases); the watch limit stops
    /// adding, with one warning.
    pub fn add(&mut self, dirs: &[(u32, PathBuf)]) {
        let mask = WatchMask::MODIFY | WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ONLYDIR;
        for (n, (i, dir)) in dirs.iter().enumerate() {
            self.next_dir = self.next_dir.max(*i as usize + 1);
            if self.full {
                continue;
            }
            match self.watches.add(dir, mask) {
                Ok(wd) => {
                    self.dirs.insert(wd.get_watch_descriptor_id(), *i);
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
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
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
                let dir = self.dirs.get(&ev.wd.get_watch_descriptor_id()).copied();
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    *overflow = true;
                } else if ev.mask.contains(EventMask::IGNORED) {
                    self.dirs.remove(&ev.wd.get_watch_descriptor_id());
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
