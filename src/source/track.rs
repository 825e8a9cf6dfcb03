//! Tracking: the compact in-memory table of every database litefleet knows,
//! and change detection by fingerprint.
//!
//! Memory per database is the product's scaling limit, so an entry is a
//! fixed 32-byte record (`Entry`): the directory is an index into a table of
//! interned directories (databases share their directory with their siblings),
//! the file name lives in one shared byte arena, and the stat results are
//! folded into a 64-bit fingerprint of `(size, mtime, ctime, inode)` of the
//! database and `(size, mtime, inode)` of its `-wal` (see `fingerprint_of`
//! for why not its ctime). A hash table of `u32` entry indices gives lookups by
//! `(directory, name)` for about 5 bytes more per entry. Nothing here holds a
//! file descriptor or a SQLite connection.
//!
//! Between scans, change notifications name the files to look at again
//! ([`Tracker::recheck`]): the same stat and fingerprint as a scan for a
//! tracked database, and a database the table does not hold yet is added
//! as the scan would add it (when a pattern matches it), so a new database
//! is uploaded without waiting for the next scan. Deleted databases leave
//! the table at the scans only.
//!
//! A database is *pending* while the fingerprint seen by the last scan (or
//! re-check) differs from the one recorded at its last successful upload. A failed upload leaves
//! it pending, so it is retried by the next cycle; a database that changes
//! while it is being uploaded stays pending too.
//!
//! Racy timestamps: a file written within [`RACY_WINDOW`] of the scan that
//! saw it could be written again within the same mtime tick without changing
//! its size, which would look "unchanged". Such an upload is recorded as not
//! quite synced, so the next scan uploads once more (the same trick as git's
//! racy-index handling). It costs one extra upload after a burst of writes
//! and guarantees no write is ever missed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::hash::BuildHasher;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::source::discover::{is_aux, Pattern, Visitor};
use crate::source::vfs::has_sqlite_header;

/// Writes this close to a scan are "racy" (see the module docs). Two seconds
/// covers coarse-mtime filesystems (FAT: 2 s; ext4/xfs: one kernel tick).
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Compact the name arena once this many bytes are dead and they are over
/// half of it: keeps churn from growing it without bound.
const ARENA_COMPACT_MIN: usize = 64 * 1024;

/// First bytes of the state file (format version 1).
const STATE_MAGIC: &[u8; 8] = b"LFSTATE1";

const LIVE: u8 = 1;
const IN_FLIGHT: u8 = 2;
const RACY: u8 = 4;
/// Its SQLite header has not been read yet (see [`Tracker::defer_header_checks`]).
const UNCHECKED: u8 = 8;
/// An upload of it failed at the store since its last successful one (see
/// [`Tracker::doubt`]).
const DOUBT: u8 = 16;

/// One tracked database: 32 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Fingerprint from the most recent scan.
    seen: u64,
    /// Fingerprint at the last successful upload (0: never uploaded).
    synced: u64,
    /// Index into `Tracker::dirs`.
    dir: u32,
    /// Offset of the file name in `Tracker::names`.
    name_off: u32,
    /// Unix seconds of the first change not yet uploaded (0: none).
    pending_since: u32,
    name_len: u16,
    /// Scan epoch that last saw this file; older ones are swept.
    epoch: u8,
    flags: u8,
}

/// Handle of a tracked database (stable while the database exists).
pub type Id = u32;

/// What an upload has to remember to report back.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    pub id: Id,
    /// The database's fingerprint at the scan that made it pending.
    pub fingerprint: u64,
    racy: bool,
    /// When the upload began (Unix seconds): what it uploads was seen then.
    begun: u32,
}

/// Counts from one scan.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    /// Databases tracked after the scan.
    pub databases: usize,
    /// Databases seen for the first time.
    pub new: usize,
    /// Known databases whose fingerprint changed.
    pub changed: usize,
    /// Databases that disappeared and left the table.
    pub removed: usize,
    /// Databases waiting for an upload after the scan.
    pub pending: usize,
    /// Errors met while walking (each logged once until it clears).
    pub errors: usize,
}

/// What a [`Tracker::recheck`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rechecked {
    /// Tracked databases whose fingerprint changed (also
    /// [`Tracker::changed`] until the next scan or re-check).
    pub changed: Vec<Id>,
    /// Databases the table did not hold, added as a scan would add them;
    /// pending.
    pub added: Vec<Id>,
}

/// The table of tracked databases.
pub struct Tracker {
    entries: Vec<Entry>,
    free: Vec<Id>,
    names: Vec<u8>,
    dead_name_bytes: usize,
    table: HashTable<Id>,
    dirs: Vec<Box<Path>>,
    dir_table: HashTable<u32>,
    hasher: DefaultHashBuilder,
    epoch: u8,
    live: usize,
    /// Matching files that are not databases (yet): fingerprint and epoch, so
    /// each is logged once and rechecked only when it changes.
    skipped: HashMap<PathBuf, (u64, u8)>,
    /// Paths with an error logged already, and the epoch that last saw it.
    problems: HashMap<PathBuf, u8>,
    /// Upload records from the state file, consumed by the first scan.
    preload: HashMap<PathBuf, u64>,
    /// Upload records changed since the state file was last written.
    state_dirty: bool,
    /// Known databases whose fingerprint changed in the last scan or
    /// re-check (the hot tier's input; new databases are not in it).
    changed: Vec<Id>,
    /// Directories in which the last scan met files it did not track, or
    /// tracked files that changed (consecutive repeats dropped): the
    /// watcher looks at them again (see
    /// [`crate::source::watch::Watch::new_dirs`]).
    touched_dirs: Vec<u32>,
    /// New files are tracked without reading their header; the header is
    /// read when the file is first used ([`Tracker::is_checked`]).
    defer_headers: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_secs(t: SystemTime) -> u32 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            entries: Vec::new(),
            free: Vec::new(),
            names: Vec::new(),
            dead_name_bytes: 0,
            table: HashTable::new(),
            dirs: Vec::new(),
            dir_table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            epoch: 0,
            live: 0,
            skipped: HashMap::new(),
            problems: HashMap::new(),
            preload: HashMap::new(),
            state_dirty: false,
            changed: Vec::new(),
            touched_dirs: Vec::new(),
            defer_headers: false,
        }
    }

    /// Tracks new files without opening them for their SQLite header; what
    /// uses a file first checks it ([`Tracker::is_checked`], then
    /// [`Tracker::reject`] if it is no database). The daemon does this: the
    /// first snapshot opens every new file anyway, so the scan that finds
    /// them stays a directory walk and a `stat` per file. Until its header is
    /// read, a matching file counts as a database.
    pub fn defer_header_checks(&mut self, on: bool) {
        self.defer_headers = on;
    }

    /// False while `id`'s SQLite header has not been read (see
    /// [`Tracker::defer_header_checks`]).
    pub fn is_checked(&self, id: Id) -> bool {
        self.entries[id as usize].flags & UNCHECKED == 0
    }

    /// Reads the header of `id` if it was not read yet: `Ok(true)` for a
    /// SQLite database (now checked), `Ok(false)` for another file, which
    /// [`Tracker::reject`] has dropped.
    pub fn confirm(&mut self, id: Id) -> io::Result<bool> {
        if self.is_checked(id) {
            return Ok(true);
        }
        if has_sqlite_header(&self.path(id))? {
            self.entries[id as usize].flags &= !UNCHECKED;
            Ok(true)
        } else {
            self.reject(id);
            Ok(false)
        }
    }

    /// Drops `id`, found to be no SQLite database when it was first used:
    /// it is skipped (and logged once) like a file whose header the scan
    /// read, until it changes.
    pub fn reject(&mut self, id: Id) {
        let path = self.path(id);
        let e = &self.entries[id as usize];
        let (fp, uploaded) = (e.seen, e.synced != 0);
        self.remove(id);
        self.skip_foreign(path, fp, uploaded);
    }

    /// Skips `path`, a file without the SQLite header seen with fingerprint
    /// `fp`, until it changes; logged once. An empty file never `uploaded`
    /// and without WAL frames is a database before its first write (SQLite
    /// creates the file at the open and writes it at the first commit): it
    /// waits for that write with no warning, and counts as new again once it
    /// changes, as any skipped file does. A backed-up database emptied, or
    /// one emptied beside a `-wal` that holds frames (its writer killed),
    /// is warned about: its replica keeps the last backup (probe L20: such
    /// a database was skipped silently).
    fn skip_foreign(&mut self, path: PathBuf, fp: u64, uploaded: bool) {
        if self
            .skipped
            .insert(path.clone(), (fp, self.epoch))
            .is_none()
        {
            let len = |p: &Path| std::fs::symlink_metadata(p).map_or(0, |m| m.len());
            let empty = !uploaded
                && std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() == 0)
                && len(&super::discover::wal_path(&path)) == 0;
            if empty {
                tracing::debug!(path = %path.display(), "empty file: waiting for its first write");
            } else {
                tracing::warn!(path = %path.display(), "skipping: not a SQLite database (no SQLite header)");
            }
        }
    }

    /// Number of tracked databases.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn name(&self, e: &Entry) -> &[u8] {
        &self.names[e.name_off as usize..e.name_off as usize + e.name_len as usize]
    }

    fn key_hash(&self, dir: u32, name: &[u8]) -> u64 {
        self.hasher.hash_one((dir, name))
    }

    /// Full path of a tracked database.
    pub fn path(&self, id: Id) -> PathBuf {
        let e = &self.entries[id as usize];
        self.dirs[e.dir as usize].join(OsStr::from_bytes(self.name(e)))
    }

    /// Number of directories interned so far (their indices never change).
    pub fn dir_count(&self) -> usize {
        self.dirs.len()
    }

    /// Directory number `i` (see [`Tracker::dir_count`]).
    pub fn dir(&self, i: u32) -> &Path {
        &self.dirs[i as usize]
    }

    /// The directories among `dirs` that hold a tracked database, sorted.
    pub fn dirs_in_use(&self, dirs: &std::collections::HashSet<u32>) -> Vec<u32> {
        let mut used: Vec<u32> = self
            .entries
            .iter()
            .filter(|e| e.flags & LIVE != 0 && dirs.contains(&e.dir))
            .map(|e| e.dir)
            .collect();
        used.sort_unstable();
        used.dedup();
        used
    }

    /// Every tracked database.
    pub fn ids(&self) -> impl Iterator<Item = Id> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.flags & LIVE != 0)
            .map(|(i, _)| i as Id)
    }

    /// The fingerprint the last scan (or re-check) saw of `id`.
    pub fn seen(&self, id: Id) -> u64 {
        self.entries[id as usize].seen
    }

    /// True when the replica holds `id` as the last scan saw it: uploaded
    /// at that fingerprint (not "almost synced" after a racy upload).
    pub fn is_synced(&self, id: Id) -> bool {
        !Self::is_pending(&self.entries[id as usize])
    }

    /// True when `id` was uploaded once (in this run or, per the state file,
    /// an earlier one).
    pub fn has_upload_record(&self, id: Id) -> bool {
        self.entries[id as usize].synced != 0
    }

    /// Looks up a database by path.
    pub fn find(&self, path: &Path) -> Option<Id> {
        let (dir, name) = (path.parent()?, path.file_name()?.as_bytes());
        let dh = self.hasher.hash_one(dir);
        let d = *self
            .dir_table
            .find(dh, |&i| &*self.dirs[i as usize] == dir)?;
        self.lookup(d, name)
    }

    /// The number of directory `dir`, if interned.
    #[cfg(test)]
    fn find_dir(&self, dir: &Path) -> Option<u32> {
        let h = self.hasher.hash_one(dir);
        self.dir_table
            .find(h, |&i| &*self.dirs[i as usize] == dir)
            .copied()
    }

    /// The database named `name` in directory number `dir`.
    fn lookup(&self, dir: u32, name: &[u8]) -> Option<Id> {
        let h = self.key_hash(dir, name);
        self.table
            .find(h, |&i| {
                let e = &self.entries[i as usize];
                e.dir == dir && self.name(e) == name
            })
            .copied()
    }

    fn intern_dir(&mut self, dir: &Path) -> u32 {
        let h = self.hasher.hash_one(dir);
        if let Some(&i) = self.dir_table.find(h, |&i| &*self.dirs[i as usize] == dir) {
            return i;
        }
        let i = self.dirs.len() as u32;
        self.dirs.push(dir.into());
        let (dirs, hasher) = (&self.dirs, &self.hasher);
        self.dir_table
            .insert_unique(h, i, |&j| hasher.hash_one(&*dirs[j as usize]));
        i
    }

    fn insert(&mut self, dir: u32, name: &[u8], fingerprint: u64, racy: bool, now: u32) -> Id {
        let name_off = self.names.len() as u32;
        self.names.extend_from_slice(name);
        let entry = Entry {
            seen: fingerprint,
            synced: 0,
            dir,
            name_off,
            pending_since: now,
            name_len: name.len() as u16,
            epoch: self.epoch,
            flags: LIVE | if racy { RACY } else { 0 },
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as Id
            }
        };
        let h = self.key_hash(dir, name);
        let hasher = &self.hasher;
        let (entries, names) = (&self.entries, &self.names);
        self.table.insert_unique(h, id, |&i| {
            let e = &entries[i as usize];
            hasher.hash_one((
                e.dir,
                &names[e.name_off as usize..e.name_off as usize + e.name_len as usize],
            ))
        });
        self.live += 1;
        id
    }

    fn remove(&mut self, id: Id) {
        let e = self.entries[id as usize];
        let h = self.key_hash(e.dir, self.name(&e));
        if let Ok(entry) = self.table.find_entry(h, |&i| i == id) {
            entry.remove();
        }
        self.entries[id as usize].flags = 0;
        self.dead_name_bytes += e.name_len as usize;
        self.free.push(id);
        self.live -= 1;
        self.state_dirty = true;
    }

    fn compact_names(&mut self) {
        if self.dead_name_bytes < ARENA_COMPACT_MIN || self.dead_name_bytes * 2 < self.names.len() {
            return;
        }
        let mut names = Vec::with_capacity(self.names.len() - self.dead_name_bytes);
        for e in self.entries.iter_mut().filter(|e| e.flags & LIVE != 0) {
            let off = names.len() as u32;
            names.extend_from_slice(
                &self.names[e.name_off as usize..e.name_off as usize + e.name_len as usize],
            );
            e.name_off = off;
        }
        self.names = names;
        self.dead_name_bytes = 0;
    }

    /// Walks every pattern, updates fingerprints, adds new databases and drops deleted ones.
    pub fn scan(&mut self, patterns: &[Pattern]) -> ScanReport {
        self.scan_at(patterns, SystemTime::now())
    }

    /// [`Tracker::scan`] as if the clock said `now` (which only decides
    /// what is racy).
    pub fn scan_at(&mut self, patterns: &[Pattern], now: SystemTime) -> ScanReport {
        self.epoch = self.epoch.wrapping_add(1);
        self.changed.clear();
        // Not `clear`: a first scan's list would keep its capacity.
        self.touched_dirs = Vec::new();
        let mut v = ScanVisitor {
            t: self,
            now_secs: unix_secs(now),
            racy_after: unix_nanos(now.checked_sub(RACY_WINDOW).unwrap_or(UNIX_EPOCH)),
            report: ScanReport::default(),
            last_dir: None,
        };
        for p in patterns {
            p.walk(&mut v);
        }
        let mut report = v.report;
        let epoch = self.epoch;
        let mut stale: Vec<Id> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.flags & LIVE != 0 && e.flags & IN_FLIGHT == 0 && e.epoch != epoch)
            .map(|(i, _)| i as Id)
            .collect();
        // A database the walk could not see (its directory, or an ancestor,
        // or the file itself could not be read: out of descriptors, a
        // permission taken away, an I/O error) is not gone: kept, with what
        // it was last seen as, until a scan reads it again (black-box probe
        // J20: one `EMFILE` on the pattern's root dropped every database,
        // hot streams with them).
        // (A copy of the few paths: the table changes below.)
        let unreadable: Vec<PathBuf> = self
            .problems
            .iter()
            .filter(|(_, e)| **e == epoch)
            .map(|(p, _)| p.clone())
            .collect();
        let hidden = |path: &Path| unreadable.iter().any(|u| path.starts_with(u));
        if !unreadable.is_empty() {
            stale.retain(|id| !hidden(&self.path(*id)));
        }
        for id in &stale {
            tracing::info!(path = %self.path(*id).display(), "database removed; no longer tracked");
            self.remove(*id);
        }
        report.removed = stale.len();
        self.compact_names();
        self.skipped.retain(|_, (_, e)| *e == epoch);
        if !self.preload.is_empty() {
            // The upload records of databases this scan could not see stay
            // (and are saved again) until a scan does: without them a
            // directory unreadable at a start cost a new upload of every
            // database below it once readable (probe L20; with `--once` from
            // cron, at every such run).
            if unreadable.is_empty() {
                self.preload = HashMap::new();
            } else {
                self.preload.retain(|p, _| hidden(p));
            }
        }
        self.problems.retain(|_, e| *e == epoch);
        report.databases = self.live;
        report.pending = self.pending_count();
        report
    }

    /// Re-checks only the databases that `files` name (a database, or its
    /// `-wal` or `-journal`, as (directory index, file name)): the same stat
    /// and fingerprint as a scan, without walking anything. A named database
    /// the table does not hold yet is added as a scan would add it
    /// ([`Tracker::scan`]), if one of `patterns` matches its path: same
    /// fingerprint, header read deferred when the scan defers it, pending
    /// until uploaded. Two things differ from a scan, both to keep
    /// notifications from adding a file again and again while it is being
    /// written: an empty file is left alone (it holds nothing yet, and its
    /// first write is notified too), and a file already skipped as no
    /// database has its header read here when it changed, so it is added
    /// only once it is one. Deleted databases are left to the next scan, and
    /// so are the tracked databases `skip` names. Replaces
    /// [`Tracker::changed`] with the tracked databases that changed here
    /// (new ones are not in it, as after a scan).
    pub fn recheck(
        &mut self,
        files: &[(u32, std::ffi::OsString)],
        patterns: &[Pattern],
        skip: impl Fn(Id) -> bool,
    ) -> Rechecked {
        self.changed.clear();
        let now = SystemTime::now();
        let now_secs = unix_secs(now);
        let racy_after = unix_nanos(now.checked_sub(RACY_WINDOW).unwrap_or(UNIX_EPOCH));
        let mut added = Vec::new();
        // A database and its `-wal` both name it: one stat each time.
        let mut done: std::collections::HashSet<Id> = std::collections::HashSet::new();
        for (dir, file) in files {
            if *dir as usize >= self.dirs.len() {
                continue;
            }
            let name = database_name(file);
            let Some(id) = self.lookup(*dir, name.as_bytes()) else {
                if let Some(id) = self.recheck_new(*dir, name, patterns, now_secs, racy_after) {
                    done.insert(id);
                    added.push(id);
                }
                continue;
            };
            if skip(id) || !done.insert(id) {
                continue;
            }
            let path = self.path(id);
            let Ok(db) = std::fs::symlink_metadata(&path) else {
                continue; // gone or unreadable: the scan decides
            };
            let wal = std::fs::symlink_metadata(super::discover::wal_path(&path)).ok();
            let (fp, racy) = fingerprint_of(&db, wal.as_ref(), racy_after);
            if self.observe(id, fp, racy, now_secs) {
                self.changed.push(id);
            }
        }
        Rechecked {
            changed: self.changed.clone(),
            added,
        }
    }

    /// [`Tracker::recheck`] of `name` in directory `d`, a database the
    /// table does not hold: its id if it was added.
    fn recheck_new(
        &mut self,
        d: u32,
        name: &OsStr,
        patterns: &[Pattern],
        now_secs: u32,
        racy_after: i128,
    ) -> Option<Id> {
        if is_aux(name) {
            return None;
        }
        let path = self.dirs[d as usize].join(name);
        if !patterns.iter().any(|p| p.captures(&path).is_some()) {
            return None;
        }
        // Gone or unreadable: the scan decides. Not a regular file (a
        // symlink, which the scan logs once): the scan skips it.
        let db = std::fs::symlink_metadata(&path).ok()?;
        if !db.is_file() || db.len() == 0 {
            return None;
        }
        let wal = std::fs::symlink_metadata(super::discover::wal_path(&path)).ok();
        let (fp, racy) = fingerprint_of(&db, wal.as_ref(), racy_after);
        let defer = self.defer_headers && !self.skipped.contains_key(&path);
        match self.track_new(d, path, fp, racy, now_secs, defer) {
            Ok(added) => added,
            Err((path, e)) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot read the header; the scan retries");
                None
            }
        }
    }

    /// A file the table does not hold, `path` in directory `d`, seen with
    /// fingerprint `fp`: added unless it is a skipped file that did not
    /// change, or (its header read unless `defer`, or unless the state file
    /// vouches for it) no database. Its id if it was added; the error of
    /// reading its header.
    fn track_new(
        &mut self,
        d: u32,
        path: PathBuf,
        fp: u64,
        racy: bool,
        now_secs: u32,
        defer: bool,
    ) -> Result<Option<Id>, (PathBuf, io::Error)> {
        let epoch = self.epoch;
        if let Some((old, e)) = self.skipped.get_mut(&path) {
            *e = epoch;
            if *old == fp {
                return Ok(None);
            }
            *old = fp;
        }
        // The upload record from the state file, if any (the first scan
        // consumes them; what it leaves is dropped at its end).
        let preloaded = self.preload.remove(&path);
        // A file the state file says we uploaded as a database, unchanged
        // since (same size, mtime and inode, with its -wal): its header is
        // the one we read then. Not opening it keeps a restart's first scan
        // close to a plain directory walk.
        let deferred = preloaded != Some(fp) && defer;
        let header = if preloaded == Some(fp) || deferred {
            Ok(true)
        } else {
            has_sqlite_header(&path)
        };
        match header {
            Ok(true) => {
                self.skipped.remove(&path);
                let name = path.file_name().unwrap_or_default();
                let id = self.add(d, name, fp, racy, now_secs, deferred);
                if let Some(synced) = preloaded {
                    let e = &mut self.entries[id as usize];
                    e.synced = synced;
                    if synced == fp {
                        e.pending_since = 0;
                    }
                }
                Ok(Some(id))
            }
            Ok(false) => {
                self.skip_foreign(path, fp, false);
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err((path, e)),
        }
    }

    /// Adds a new database in directory `d`; `unchecked` when its header
    /// was not read.
    fn add(
        &mut self,
        d: u32,
        name: &OsStr,
        fp: u64,
        racy: bool,
        now_secs: u32,
        unchecked: bool,
    ) -> Id {
        let id = self.insert(d, name.as_bytes(), fp, racy, now_secs);
        if unchecked {
            self.entries[id as usize].flags |= UNCHECKED;
        }
        id
    }

    /// Records what a scan or a re-check saw of `id`; true if it changed.
    fn observe(&mut self, id: Id, fp: u64, racy: bool, now_secs: u32) -> bool {
        let e = &mut self.entries[id as usize];
        let changed = e.seen != fp;
        if changed {
            if e.seen == e.synced || e.pending_since == 0 {
                e.pending_since = now_secs;
            }
            e.seen = fp;
        }
        if racy {
            e.flags |= RACY;
        } else {
            e.flags &= !RACY;
        }
        changed
    }

    fn is_pending(e: &Entry) -> bool {
        e.flags & LIVE != 0 && e.seen != e.synced
    }

    /// Databases waiting for an upload and not being uploaded now. One
    /// uploaded at the fingerprint it still has, recorded "almost synced"
    /// because it was racy, waits until it no longer is: uploaded again
    /// within the window, it would be racy again (black-box probe: with a
    /// 2 s scan interval one write was uploaded three times).
    pub fn pending(&self) -> Vec<Id> {
        self.pending_ids(false)
    }

    /// [`Tracker::pending`] with the databases whose second upload waits
    /// for the racy window to pass: for a last pass (`replicate --once`,
    /// the one at a clean stop), after which nothing would upload them.
    /// The first upload may lack a commit that was in the files the scan
    /// saw (its frames written to the `-wal`, not yet published, when the
    /// snapshot's read began): black-box probe S31 saw a `--once` exit 0,
    /// and a clean stop, without a commit that had returned 30-490 ms
    /// before it began.
    pub fn pending_all(&self) -> Vec<Id> {
        self.pending_ids(true)
    }

    fn pending_ids(&self, racy_too: bool) -> Vec<Id> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Self::is_pending(e) && e.flags & IN_FLIGHT == 0)
            .filter(|(_, e)| racy_too || !(e.synced == !e.seen && e.flags & RACY != 0))
            .map(|(i, _)| i as Id)
            .collect()
    }

    /// Databases with changes not yet in the replica (including in-flight ones).
    pub fn pending_count(&self) -> usize {
        self.entries.iter().filter(|e| Self::is_pending(e)).count()
    }

    /// Unix seconds of the oldest change not yet in the replica.
    pub fn oldest_pending(&self) -> Option<u32> {
        self.entries
            .iter()
            .filter(|e| Self::is_pending(e) && e.pending_since != 0)
            .map(|e| e.pending_since)
            .min()
    }

    /// Marks a database as being uploaded; the ticket remembers what was seen.
    pub fn begin_upload(&mut self, id: Id) -> Ticket {
        let e = &mut self.entries[id as usize];
        e.flags |= IN_FLIGHT;
        Ticket {
            id,
            fingerprint: e.seen,
            racy: e.flags & RACY != 0,
            begun: unix_secs(SystemTime::now()),
        }
    }

    /// Records that an upload of `id` failed at the store, where the store
    /// may still apply it later: a PUT the client gave up on (a timeout, a
    /// connection lost after the body was sent) can land after the next
    /// upload of the same hour's object and put the older state back
    /// (black-box probe: restore returned it with exit 0, nothing pending).
    /// The next successful upload is then recorded as "almost synced", so
    /// the scan after it uploads once more. (On S3 a snapshot sent in one
    /// PUT is also conditional on what it replaces, which refuses a late
    /// write whenever it lands: the replica's `put_replacing`.)
    pub fn doubt(&mut self, id: Id) {
        self.entries[id as usize].flags |= DOUBT;
    }

    /// Records the outcome of an upload. On failure the database stays pending.
    pub fn finish_upload(&mut self, ticket: Ticket, ok: bool) {
        let e = &mut self.entries[ticket.id as usize];
        e.flags &= !IN_FLIGHT;
        if ok {
            let doubt = e.flags & DOUBT != 0;
            e.flags &= !DOUBT;
            // A racy upload, or the first since an upload the store may
            // still apply ([`Tracker::doubt`]), is recorded as "almost
            // synced" (any value but the fingerprint) so the next scan
            // uploads once more.
            e.synced = if ticket.racy || doubt {
                !ticket.fingerprint
            } else {
                ticket.fingerprint
            };
            // Still pending (a racy upload, or written since): the replica
            // holds everything up to when this upload began, less the racy
            // window, so that is how far behind it is; a database written
            // all the time is not "pending since" its first write forever.
            e.pending_since = if e.synced == e.seen {
                0
            } else {
                ticket
                    .begun
                    .saturating_sub(RACY_WINDOW.as_secs() as u32)
                    .max(e.pending_since)
            };
            self.state_dirty = true;
        }
    }

    /// Directories in which the last scan met files it did not track yet,
    /// or tracked files that changed.
    pub fn touched_dirs(&self) -> &[u32] {
        &self.touched_dirs
    }

    /// Known databases whose fingerprint changed in the last scan or
    /// re-check (not the new ones).
    pub fn changed(&self) -> &[Id] {
        &self.changed
    }

    /// Makes `id` pending again (the hot tier could not ship all of it), so
    /// the cold tier uploads a snapshot now: its record is neither the
    /// fingerprint seen nor the "almost synced" one a racy upload leaves
    /// (its complement), whose second upload waits until the file is no
    /// longer racy (black-box probe M29: a database whose stream ended
    /// while it was written every half second waited for the scan after
    /// its writes stopped).
    pub fn mark_unsynced(&mut self, id: Id, now: SystemTime) {
        let e = &mut self.entries[id as usize];
        if e.flags & LIVE != 0 {
            if e.synced == e.seen {
                e.pending_since = unix_secs(now);
            }
            // Never `seen`, nor `!seen` (which is `-seen - 1`: it equals
            // `seen + 1` only if `2 * seen + 2` is 0 modulo 2^64, that is
            // for `seen` = 2^63 - 1 or 2^64 - 1, when `seen + 2` is used).
            let next = e.seen.wrapping_add(1);
            e.synced = if next == !e.seen {
                e.seen.wrapping_add(2)
            } else {
                next
            };
            self.state_dirty = true;
        }
    }

    /// True when upload records changed since the last [`Tracker::save_state`].
    pub fn state_dirty(&self) -> bool {
        self.state_dirty
    }

    /// Writes the upload records (path and fingerprint at the last upload) to
    /// `path` atomically, so a restart does not re-upload unchanged databases.
    /// `tag` identifies the replica and key layout the records are valid for.
    pub fn save_state(&mut self, path: &Path, tag: u64) -> io::Result<()> {
        use std::io::Write;
        write_state_file(path, |file| {
            let mut w = io::BufWriter::new(file);
            w.write_all(STATE_MAGIC)?;
            w.write_all(&tag.to_le_bytes())?;
            let mut record = |synced: u64, p: &Path| -> io::Result<()> {
                let b = p.as_os_str().as_bytes();
                w.write_all(&synced.to_le_bytes())?;
                w.write_all(&(b.len() as u32).to_le_bytes())?;
                w.write_all(b)
            };
            for (i, e) in self.entries.iter().enumerate() {
                if e.flags & LIVE == 0 || e.synced == 0 {
                    continue;
                }
                record(e.synced, &self.path(i as Id))?;
            }
            // Records of databases no scan could see yet (see `scan_at`).
            for (p, synced) in &self.preload {
                record(*synced, p)?;
            }
            w.flush()
        })?;
        self.state_dirty = false;
        Ok(())
    }

    /// Reads upload records written by [`Tracker::save_state`]; the next scan
    /// applies them to the databases it finds. A missing file, another tag or
    /// a damaged file just means "nothing uploaded yet" (never data loss: the
    /// worst case is one redundant upload per database). Returns the record count.
    pub fn load_state(&mut self, path: &Path, tag: u64) -> io::Result<usize> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "damaged state file");
        let rest = data.strip_prefix(STATE_MAGIC).ok_or_else(bad)?;
        if rest.len() < 8 || rest[..8] != tag.to_le_bytes() {
            return Ok(0);
        }
        let mut rest = &rest[8..];
        let mut map = HashMap::new();
        while !rest.is_empty() {
            if rest.len() < 12 {
                return Err(bad());
            }
            let fp = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
            let p = rest.get(12..12 + len).ok_or_else(bad)?;
            map.insert(PathBuf::from(OsStr::from_bytes(p)), fp);
            rest = &rest[12 + len..];
        }
        let n = map.len();
        self.preload = map;
        Ok(n)
    }

    /// How many upload records the state file gave (before the first scan).
    pub fn upload_records(&self) -> usize {
        self.preload.len()
    }

    /// Forgets the upload records loaded from the state file (before the
    /// first scan): every database counts as never uploaded. The next
    /// [`Tracker::save_state`] writes the state file without them.
    pub fn forget_upload_records(&mut self) -> usize {
        self.state_dirty = true;
        std::mem::take(&mut self.preload).len()
    }

    /// Heap bytes held by the table (entries, names, indexes, directories).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.free.capacity() * std::mem::size_of::<Id>()
            + self.names.capacity()
            + self.table.allocation_size()
            + self.dir_table.allocation_size()
            + self.dirs.capacity() * std::mem::size_of::<Box<Path>>()
            + self.dirs.iter().map(|d| d.as_os_str().len()).sum::<usize>()
    }
}

/// The name prefix of the temporary files the state file at `path` (and
/// its replica sidecar) are written through: `.<name>.tmp`, so a start can
/// remove what a killed predecessor left ([`remove_state_leftovers`])
/// without touching other files of the directory.
pub fn state_temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp")
}

/// Removes temporary files of the state file at `path` and of its replica
/// sidecar left by a process killed while it saved them (each a whole copy
/// of the state). Only one replicator uses a state file (the replica lease),
/// so none of them is being written. Returns how many were removed.
pub fn remove_state_leftovers(path: &Path) -> usize {
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefixes = [
        state_temp_prefix(path),
        state_temp_prefix(&replica_sidecar(path)),
        state_temp_prefix(&contested_file(path)),
    ];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            prefixes.iter().any(|p| name.starts_with(p.as_str()))
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// The sidecar of the state file at `path`: the id of the replica identity
/// its records were made against (see [`crate::replica::identity`]).
pub fn replica_sidecar(path: &Path) -> PathBuf {
    sidecar(path, ".replica")
}

/// The file beside `path` named by it and `suffix`.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The sidecar of the state file at `path` that records when the last
/// retention pass ran (`crate::daemon::scheduler`).
pub fn retention_file(path: &Path) -> PathBuf {
    sidecar(path, ".retention")
}

/// The sidecar of the state file at `path` that keeps the owners of
/// contested keys (`crate::source::keys::Owners::save_contested`).
pub fn contested_file(path: &Path) -> PathBuf {
    sidecar(path, ".keys")
}

/// The replica identity the records of the state file at `path` belong to;
/// `None` when its sidecar is missing or not an id.
pub fn recorded_replica(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(replica_sidecar(path)).ok()?;
    let id = s.trim();
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// Records, atomically and durably, that the records of the state file at
/// `path` belong to the replica identity `id`.
pub fn record_replica(path: &Path, id: &str) -> io::Result<()> {
    use std::io::Write;
    write_state_file(&replica_sidecar(path), |mut file| {
        file.write_all(format!("{id}\n").as_bytes())
    })
}

/// Writes the file at `path` (the state file, its sidecar) atomically and
/// durably: `write` fills a temporary file beside it (named with
/// [`state_temp_prefix`]), which is synced, renamed over `path`, and the
/// directory synced, since the rename itself is durable only once the
/// directory is.
pub(crate) fn write_state_file(
    path: &Path,
    write: impl FnOnce(&std::fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(&state_temp_prefix(path))
        .tempfile_in(dir)?;
    write(tmp.as_file())?;
    crate::durable::sync_file(tmp.as_file(), tmp.path())?;
    tmp.persist(path).map_err(|e| e.error)?;
    crate::durable::sync_path(dir)
}

/// Folds stat values into a 64-bit fingerprint. Deterministic across runs (it
/// is persisted in the state file), so not a randomly seeded hasher: a
/// multiply-rotate fold finished with the murmur3 avalanche.
pub fn fingerprint(values: &[u64]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15; // 2^64 / golden ratio
    let mut h: u64 = 0x243F_6A88_85A3_08D3;
    for &v in values {
        h = (h ^ v).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    // Never 0: that value means "never uploaded".
    h.max(1)
}

fn unix_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// A file's mtime in nanoseconds since the epoch.
pub(crate) fn mtime_nanos(m: &Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// A file's ctime (its last change, content or metadata) in nanoseconds.
pub(crate) fn ctime_nanos(m: &Metadata) -> i128 {
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

/// The name of the database a changed file belongs to: itself, or the
/// database beside a `-wal` or `-journal`.
pub fn database_name(name: &OsStr) -> &OsStr {
    let b = name.as_bytes();
    let db = b
        .strip_suffix(b"-wal")
        .or_else(|| b.strip_suffix(b"-journal"))
        .unwrap_or(b);
    OsStr::from_bytes(db)
}

/// The fingerprint a scan would give the database at `db`, whose file's
/// metadata is `m`, with its `-wal` as it is now: after a snapshot, what
/// tells whether the snapshot read the files the scan had seen there.
pub fn fingerprint_with(db: &Path, m: &Metadata) -> u64 {
    let wal = std::fs::symlink_metadata(crate::source::discover::wal_path(db))
        .ok()
        .filter(|w| w.is_file());
    fingerprint_of(m, wal.as_ref(), i128::MAX).0
}

/// The fingerprint of a database and its `-wal`, and whether either was
/// written after `racy_after` (see [`RACY_WINDOW`]).
fn fingerprint_of(db: &Metadata, wal: Option<&Metadata>, racy_after: i128) -> (u64, bool) {
    // An empty `-wal` holds no frames, so it means the same as none. It
    // matters: our own read-only snapshot connection creates an empty
    // `-wal` and `-shm` (and, being read-only, cannot remove them), which
    // must not count as a change of the database.
    // The ctime too: a copy written over the file in place that keeps its
    // size and sets its mtime back (`cp -p`, `touch -r`) changes only the
    // ctime, which nobody can set (black-box probe: such a change was never
    // uploaded). A `chmod` changes it as well and costs one upload. The
    // racy window stays on the mtime: only a second such copy within one
    // timestamp tick of the first would escape it, and a file whose mtime
    // was set back long ago is not written now. Not the `-wal`'s ctime:
    // SQLite running as root `fchown`s a `-wal` at every open (ours
    // included), which would make every WAL database look changed after
    // each of its snapshots.
    let w = wal
        .filter(|w| w.len() > 0)
        .map(|w| (w.len(), mtime_nanos(w), w.ino()));
    let (wl, wm, wi) = w.unwrap_or((u64::MAX, 0, 0));
    let fp = fingerprint(&[
        db.len(),
        mtime_nanos(db) as u64,
        ctime_nanos(db) as u64,
        db.ino(),
        wl,
        wm as u64,
        wi,
    ]);
    let newest = mtime_nanos(db).max(wm);
    (fp, newest >= racy_after)
}

struct ScanVisitor<'a> {
    t: &'a mut Tracker,
    now_secs: u32,
    racy_after: i128,
    report: ScanReport,
    last_dir: Option<(u32, PathBuf)>,
}

impl ScanVisitor<'_> {
    /// Notes directory `d` in [`Tracker::touched_dirs`].
    fn touched(&mut self, d: u32) {
        if self.t.touched_dirs.last() != Some(&d) {
            self.t.touched_dirs.push(d);
        }
    }

    fn fingerprint(&self, db: &Metadata, wal: Option<&Metadata>) -> (u64, bool) {
        fingerprint_of(db, wal, self.racy_after)
    }

    fn dir_id(&mut self, dir: &Path) -> u32 {
        if let Some((id, d)) = &self.last_dir {
            if d == dir {
                return *id;
            }
        }
        let id = self.t.intern_dir(dir);
        self.last_dir = Some((id, dir.to_path_buf()));
        id
    }

    /// A file the table does not hold, in `dir` (interned as `d`).
    fn new_file(&mut self, d: u32, dir: &Path, name: &OsStr, fp: u64, racy: bool) {
        if self.t.defer_headers && self.t.skipped.is_empty() && self.t.preload.is_empty() {
            // Nothing to look up by path (a new daemon's first scan): no
            // path is even built.
            self.t.add(d, name, fp, racy, self.now_secs, true);
            self.report.new += 1;
            return;
        }
        let defer = self.t.defer_headers;
        match self
            .t
            .track_new(d, dir.join(name), fp, racy, self.now_secs, defer)
        {
            Ok(Some(_)) => self.report.new += 1,
            Ok(None) => {}
            Err((path, e)) => self.error(&path, e),
        }
    }
}

impl Visitor for ScanVisitor<'_> {
    fn database(&mut self, dir: &Path, name: &OsStr, db: &Metadata, wal: Option<&Metadata>) {
        let (fp, racy) = self.fingerprint(db, wal);
        let d = self.dir_id(dir);
        match self.t.lookup(d, name.as_bytes()) {
            Some(id) => {
                let epoch = self.t.epoch;
                self.t.entries[id as usize].epoch = epoch;
                if self.t.observe(id, fp, racy, self.now_secs) {
                    self.report.changed += 1;
                    self.t.changed.push(id);
                    // (Another inode at the path, say: its directory may
                    // be another one too.)
                    self.touched(d);
                }
            }
            None => {
                self.touched(d);
                self.new_file(d, dir, name, fp, racy)
            }
        }
    }

    fn skipped(&mut self, path: &Path, reason: &str) {
        let epoch = self.t.epoch;
        if self
            .t
            .skipped
            .insert(path.to_path_buf(), (0, epoch))
            .is_none()
        {
            tracing::warn!(path = %path.display(), "skipping: {reason}");
        }
    }

    fn error(&mut self, path: &Path, err: io::Error) {
        let epoch = self.t.epoch;
        let before = self.t.problems.insert(path.to_path_buf(), epoch);
        // Once per path and scan: a `**` level lists a directory twice
        // (its files, then its subdirectories), and one unreadable
        // directory was counted as two (black-box probe C26).
        if before != Some(epoch) {
            self.report.errors += 1;
        }
        if before.is_none() {
            tracing::warn!(path = %path.display(), error = %err, "cannot read; will retry every scan (logged once)");
        }
    }
}

/// Time a closure; used by the scheduler and the benchmark.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let v = f();
    (v, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn header_file(p: &Path, extra: &[u8]) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut b = SQLITE_HEADER_BYTES.to_vec();
        b.extend_from_slice(extra);
        fs::write(p, b).unwrap();
    }
    const SQLITE_HEADER_BYTES: &[u8] = crate::source::vfs::SQLITE_HEADER;

    /// Records every pending database as uploaded (not racy).
    fn upload_all(tr: &mut Tracker) {
        for id in tr.pending() {
            let tk = tr.begin_upload(id);
            tr.finish_upload(Ticket { racy: false, ..tk }, true);
        }
    }

    #[test]
    fn entry_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    #[test]
    fn detects_new_changed_removed_and_skips_foreign_files() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*/*.db", t.path()).unwrap()];
        header_file(&t.path().join("a/one.db"), b"1");
        header_file(&t.path().join("a/two.db"), b"2");
        fs::write(t.path().join("a/text.db"), b"hello, not sqlite").unwrap();
        let mut tr = Tracker::new();
        let r = tr.scan(&pat);
        assert_eq!((r.databases, r.new, r.pending), (2, 2, 2));
        let one = tr.find(&t.path().join("a/one.db")).unwrap();
        assert_eq!(tr.path(one), t.path().join("a/one.db"));
        assert!(tr.find(&t.path().join("a/text.db")).is_none());

        // Upload both (not racy: pretend by clearing the flag via a rescan later).
        upload_all(&mut tr);
        let r = tr.scan(&pat);
        assert_eq!((r.new, r.changed, r.pending), (0, 0, 0));

        // A WAL appearing is a change of that database only.
        fs::write(t.path().join("a/one.db-wal"), b"frames").unwrap();
        let r = tr.scan(&pat);
        assert_eq!((r.changed, r.pending), (1, 1));
        assert_eq!(tr.pending(), vec![one]);

        // A failed upload keeps it pending.
        let tk = tr.begin_upload(one);
        assert!(tr.pending().is_empty());
        tr.finish_upload(tk, false);
        assert_eq!(tr.pending(), vec![one]);

        // Deleting removes it from the table.
        fs::remove_file(t.path().join("a/two.db")).unwrap();
        let r = tr.scan(&pat);
        assert_eq!((r.removed, r.databases), (1, 1));
    }

    /// A directory the walk cannot list (out of descriptors, permission
    /// taken away, an I/O error) hides its databases, it does not delete
    /// them: they stay tracked, with their upload records, and the scan
    /// counts the error (which fails `replicate --once`). Black-box probe
    /// J20: one `EMFILE` on the pattern's root logged every database as
    /// removed and ended the hot streams, though none was deleted.
    #[test]
    fn databases_behind_an_unreadable_directory_are_not_removed() {
        use crate::source::discover::tests::UNREADABLE;
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*/*.db", t.path()).unwrap()];
        for p in ["a/one.db", "a/two.db", "b/three.db"] {
            header_file(&t.path().join(p), b"");
        }
        let mut tr = Tracker::new();
        assert_eq!(tr.scan(&pat).databases, 3);
        upload_all(&mut tr);
        let unreadable = |dirs: &[&Path]| {
            UNREADABLE.with(|u| *u.borrow_mut() = dirs.iter().map(|d| d.to_path_buf()).collect())
        };
        // The directory of two of them, then the pattern's root.
        for dir in [t.path().join("a"), t.path().to_path_buf()] {
            unreadable(&[&dir]);
            fs::remove_file(t.path().join("b/three.db")).ok();
            let r = tr.scan(&pat);
            assert_eq!(r.errors, 1, "{r:?}");
            assert_eq!(r.pending, 0, "{r:?}");
            assert!(tr.find(&t.path().join("a/one.db")).is_some());
            assert!(tr.find(&t.path().join("a/two.db")).is_some());
            if dir == t.path() {
                assert_eq!((r.removed, r.databases), (0, 2), "{r:?}");
            } else {
                // b is read: its deleted database is removed.
                assert_eq!((r.removed, r.databases), (1, 2), "{r:?}");
            }
        }
        // A `**` level lists each directory twice (its files, then its
        // subdirectories): one unreadable directory is one error.
        let deep = vec![Pattern::compile("**/*.db", t.path()).unwrap()];
        unreadable(&[&t.path().join("a")]);
        assert_eq!(tr.scan(&deep).errors, 1);
        unreadable(&[]);
        fs::remove_file(t.path().join("a/two.db")).unwrap();
        let r = tr.scan(&pat);
        assert_eq!(
            (r.errors, r.removed, r.databases, r.pending),
            (0, 1, 1, 0),
            "{r:?}"
        );
    }

    /// Upload records of databases a start's first scan cannot see (their
    /// directory unreadable) are kept, in memory and in the state file
    /// saved meanwhile, until a scan sees them: once readable, they are
    /// not uploaded again (probe L20: every database below such a directory
    /// was, and with `--once` from cron at every run).
    #[test]
    fn upload_records_behind_an_unreadable_directory_are_kept() {
        use crate::source::discover::tests::UNREADABLE;
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*/*.db", t.path()).unwrap()];
        header_file(&t.path().join("a/one.db"), b"");
        header_file(&t.path().join("b/two.db"), b"");
        let state = t.path().join("state/x.state");
        let mut tr = Tracker::new();
        tr.scan(&pat);
        upload_all(&mut tr);
        tr.save_state(&state, 7).unwrap();

        let a = t.path().join("a");
        UNREADABLE.with(|u| *u.borrow_mut() = vec![a.clone()]);
        let mut blind = Tracker::new();
        assert_eq!(blind.load_state(&state, 7).unwrap(), 2);
        let r = blind.scan(&pat);
        assert_eq!((r.databases, r.pending, r.errors), (1, 0, 1), "{r:?}");
        // b's database changed and was uploaded: the file is saved again.
        header_file(&t.path().join("b/two.db"), b"more");
        blind.scan(&pat);
        upload_all(&mut blind);
        blind.save_state(&state, 7).unwrap();
        UNREADABLE.with(|u| u.borrow_mut().clear());

        let mut seeing = Tracker::new();
        assert_eq!(seeing.load_state(&state, 7).unwrap(), 2);
        let r = seeing.scan(&pat);
        assert_eq!((r.databases, r.pending), (2, 0), "{r:?}");
    }

    /// Temporary files a killed save left beside the state file (each a
    /// whole copy of it; probe F found them piling up over crashes) are
    /// removed at start, and nothing else of the directory.
    #[test]
    fn a_killed_save_leaves_nothing_for_good() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("0123.state");
        let mut tr = Tracker::new();
        tr.save_state(&state, 7).unwrap();
        record_replica(&state, &"ab".repeat(16)).unwrap();
        assert_eq!(recorded_replica(&state), Some("ab".repeat(16)));
        for name in [".0123.state.tmpA1b2C3", ".0123.state.replica.tmpX"] {
            std::fs::write(t.path().join(name), b"partial").unwrap();
        }
        for keep in ["other.state", ".other.state.tmpQ", "0123.state.bak"] {
            std::fs::write(t.path().join(keep), b"x").unwrap();
        }
        assert_eq!(remove_state_leftovers(&state), 2);
        let mut left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".other.state.tmpQ",
                "0123.state",
                "0123.state.bak",
                "0123.state.replica",
                "other.state"
            ]
        );
        std::fs::write(replica_sidecar(&state), b"not an id\n").unwrap();
        assert_eq!(recorded_replica(&state), None);
    }

    #[test]
    fn state_file_survives_restart_and_is_tag_checked() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        header_file(&t.path().join("a.db"), b"");
        header_file(&t.path().join("b.db"), b"");
        let mut tr = Tracker::new();
        tr.scan(&pat);
        let a = tr.find(&t.path().join("a.db")).unwrap();
        let tk = tr.begin_upload(a);
        tr.finish_upload(Ticket { racy: false, ..tk }, true);
        assert!(tr.state_dirty());
        let state = t.path().join("state/x.state");
        tr.save_state(&state, 7).unwrap();
        assert!(!tr.state_dirty());
        // Synced before its rename, its directory after (audit F19).
        let synced = crate::durable::synced_below(&t.path().join("state"));
        assert_eq!(synced.len(), 2, "{synced:?}");
        assert!(
            synced[0].to_string_lossy().starts_with(".x.state") && synced[1] == Path::new(""),
            "{synced:?}"
        );

        let mut again = Tracker::new();
        assert_eq!(again.load_state(&state, 7).unwrap(), 1);
        let r = again.scan(&pat);
        assert_eq!(
            (r.databases, r.pending),
            (2, 1),
            "only b.db still needs an upload"
        );
        assert_eq!(
            again.pending(),
            vec![again.find(&t.path().join("b.db")).unwrap()]
        );

        let mut other = Tracker::new();
        assert_eq!(
            other.load_state(&state, 8).unwrap(),
            0,
            "another replica's records are ignored"
        );
        assert_eq!(other.scan(&pat).pending, 2);
        std::fs::write(&state, b"garbage").unwrap();
        assert!(Tracker::new().load_state(&state, 7).is_err());
    }

    /// After a restart, a file the state file recorded as uploaded is not
    /// opened again while its fingerprint is unchanged (the header it had
    /// then still holds), and is when it changed.
    #[test]
    fn restart_rereads_headers_of_changed_files_only() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        let (a, b) = (t.path().join("a.db"), t.path().join("b.db"));
        header_file(&a, b"0123");
        header_file(&b, b"0123");
        let mut tr = Tracker::new();
        tr.scan(&pat);
        for p in [&a, &b] {
            let tk = tr.begin_upload(tr.find(p).unwrap());
            tr.finish_upload(Ticket { racy: false, ..tk }, true);
        }
        let state = t.path().join("state/x.state");
        tr.save_state(&state, 7).unwrap();
        // b.db loses its header and grows; a.db is left alone.
        fs::write(&b, b"no longer a database").unwrap();

        let mut again = Tracker::new();
        assert_eq!(again.load_state(&state, 7).unwrap(), 2);
        let r = again.scan(&pat);
        assert_eq!(r.databases, 1, "b.db changed: its header is read again");
        let a_id = again.find(&a).expect("a.db unchanged: trusted as uploaded");
        assert!(again.is_checked(a_id), "a.db's header is not read again");
        assert!(again.find(&b).is_none());
        assert!(again.pending().is_empty());

        // A copy written over a.db in place that keeps its size and sets
        // its mtime back (`cp -p`, `touch -r`) changed its ctime: changed,
        // so its header is read again too (black-box probe: such a change
        // was trusted as uploaded and never backed up).
        again.save_state(&state, 7).unwrap();
        let mtime = fs::metadata(&a).unwrap().modified().unwrap();
        let same_size = vec![b'x'; SQLITE_HEADER_BYTES.len() + 4];
        fs::write(&a, &same_size).unwrap();
        fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let mut third = Tracker::new();
        assert_eq!(third.load_state(&state, 7).unwrap(), 1);
        assert_eq!(third.scan(&pat).databases, 0, "a.db's header is read again");
    }

    /// With deferred header checks a new file is tracked unread; the first
    /// use reads its header once: a database stays (checked), another file
    /// is dropped and skipped until it changes, then tracked (unread) again.
    #[test]
    fn deferred_headers_are_read_at_first_use() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        let (db, text) = (t.path().join("db.db"), t.path().join("text.db"));
        header_file(&db, b"");
        fs::write(&text, b"not a database at all").unwrap();
        let mut tr = Tracker::new();
        tr.defer_header_checks(true);
        let r = tr.scan(&pat);
        assert_eq!((r.databases, r.new), (2, 2), "nothing opened yet");
        let (d, x) = (tr.find(&db).unwrap(), tr.find(&text).unwrap());
        assert!(!tr.is_checked(d) && !tr.is_checked(x));
        assert!(tr.confirm(d).unwrap());
        assert!(tr.is_checked(d));
        assert!(!tr.confirm(x).unwrap());
        assert!(tr.find(&text).is_none());
        assert_eq!(tr.len(), 1);
        let r = tr.scan(&pat);
        assert_eq!((r.databases, r.new), (1, 0), "skipped while unchanged");
        fs::write(&text, b"not a database, still").unwrap();
        let r = tr.scan(&pat);
        assert_eq!((r.databases, r.new), (2, 1), "changed: tracked again");
        assert!(!tr.is_checked(tr.find(&text).unwrap()));
        // Without deferral the scan reads the header itself.
        let mut plain = Tracker::new();
        assert_eq!(plain.scan(&pat).databases, 1);
        assert!(plain.is_checked(plain.find(&db).unwrap()));
    }

    /// Content copied over a database in place that keeps its size, with
    /// its mtime set back (`cp -p`, `touch -r`): a change, by its ctime
    /// (black-box probe: never uploaded, `/stats` said synced).
    #[test]
    fn a_copy_that_keeps_size_and_mtime_is_a_change() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        let x = t.path().join("x.db");
        header_file(&x, b"old!");
        let later = || SystemTime::now() + Duration::from_secs(10);
        let mut tr = Tracker::new();
        tr.scan_at(&pat, later());
        let tk = tr.begin_upload(tr.find(&x).unwrap());
        assert!(!tk.racy);
        tr.finish_upload(tk, true);
        assert_eq!(tr.scan_at(&pat, later()).pending, 0);
        let mtime = fs::metadata(&x).unwrap().modified().unwrap();
        header_file(&x, b"new!");
        fs::File::options()
            .write(true)
            .open(&x)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(tr.scan_at(&pat, later()).pending, 1);
    }

    /// A directory with one database `x.db` written just now, its pattern,
    /// and a tracker that scanned it and uploaded it once (racy).
    fn uploaded_while_racy() -> (tempfile::TempDir, Vec<Pattern>, Tracker, Id) {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        header_file(&t.path().join("x.db"), b"");
        let mut tr = Tracker::new();
        tr.scan(&pat);
        let id = tr.pending()[0];
        let tk = tr.begin_upload(id);
        assert!(tk.racy, "file written just now must be racy");
        tr.finish_upload(tk, true);
        (t, pat, tr, id)
    }

    #[test]
    fn racy_upload_is_uploaded_once_more() {
        let (_t, pat, mut tr, id) = uploaded_while_racy();
        assert_eq!(tr.scan(&pat).pending, 1);
        // Not within the window, where it would be racy again (black-box
        // probe: with a 2 s scan interval one write was uploaded 3 times).
        assert!(tr.pending().is_empty());
        // Out of the window.
        tr.scan_at(&pat, SystemTime::now() + Duration::from_secs(10));
        assert_eq!(tr.pending(), vec![id]);
        let tk = tr.begin_upload(id);
        assert!(!tk.racy);
        tr.finish_upload(tk, true);
        assert_eq!(tr.scan(&pat).pending, 0);
    }

    /// A database the hot tier hands back ([`Tracker::mark_unsynced`]) is
    /// pending at once, also while it is racy, where a racy upload's second
    /// pass waits until the file is no longer racy.
    #[test]
    fn a_database_handed_back_is_pending_at_once_while_racy() {
        let (_t, pat, mut tr, id) = uploaded_while_racy();
        tr.scan(&pat);
        assert!(tr.pending().is_empty(), "the racy second pass waits");
        tr.mark_unsynced(id, SystemTime::now());
        assert_eq!(tr.pending(), vec![id]);
        let tk = tr.begin_upload(id);
        tr.finish_upload(tk, true);
        tr.scan(&pat);
        assert!(tr.pending().is_empty(), "racy again: its second pass waits");
    }

    #[test]
    fn a_database_written_all_the_time_is_pending_since_its_last_upload() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        header_file(&t.path().join("x.db"), b"");
        let mut tr = Tracker::new();
        tr.scan(&pat);
        let id = tr.pending()[0];
        // Pending since long ago (a busy database, changed at every scan).
        tr.entries[id as usize].pending_since = 1_000;
        let tk = tr.begin_upload(id);
        assert!(tk.racy);
        tr.finish_upload(tk, true);
        // Still pending (racy), but only since the upload began.
        let now = unix_secs(SystemTime::now());
        let since = tr.oldest_pending().unwrap();
        assert!(
            since + RACY_WINDOW.as_secs() as u32 + 1 >= now,
            "{since} vs {now}"
        );
        // A failed upload changes nothing.
        let tk = tr.begin_upload(id);
        tr.entries[id as usize].pending_since = 1_000;
        tr.finish_upload(tk, false);
        assert_eq!(tr.oldest_pending(), Some(1_000));
    }

    #[test]
    fn in_flight_entries_survive_deletion_until_finished() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        header_file(&t.path().join("x.db"), b"");
        let mut tr = Tracker::new();
        tr.scan(&pat);
        let id = tr.pending()[0];
        let tk = tr.begin_upload(id);
        fs::remove_file(t.path().join("x.db")).unwrap();
        assert_eq!(tr.scan(&pat).databases, 1);
        tr.finish_upload(tk, false);
        assert_eq!(tr.scan(&pat).databases, 0);
    }

    /// A notified file the table does not hold is added as a scan would
    /// add it, when a pattern matches it: by its own name or its `-wal`'s,
    /// header deferred as the scan defers it, pending. Files no pattern
    /// matches, side files alone, empty files and files known to be no
    /// database (until they become one) are not.
    #[test]
    fn recheck_adds_new_databases_as_a_scan_would() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*/*.db", t.path()).unwrap()];
        header_file(&t.path().join("a/old.db"), b"");
        let mut tr = Tracker::new();
        tr.defer_header_checks(true);
        assert_eq!(tr.scan(&pat).databases, 1);
        let old = tr.find(&t.path().join("a/old.db")).unwrap();
        let tk = tr.begin_upload(old);
        tr.finish_upload(Ticket { racy: false, ..tk }, true);
        let d = tr.find_dir(&t.path().join("a")).unwrap();
        let named = |names: &[&str]| -> Vec<(u32, std::ffi::OsString)> {
            names.iter().map(|n| (d, (*n).into())).collect()
        };

        header_file(&t.path().join("a/new.db"), b"");
        header_file(&t.path().join("a/walled.db"), b"");
        fs::write(t.path().join("a/walled.db-wal"), b"frames").unwrap();
        header_file(&t.path().join("a/notes.txt"), b"");
        fs::write(t.path().join("a/empty.db"), b"").unwrap();
        fs::write(t.path().join("a/gone.db-journal"), b"x").unwrap();
        let found = tr.recheck(
            &named(&[
                "new.db",
                "new.db-journal",
                "walled.db-wal",
                "notes.txt",
                "empty.db",
                "gone.db-journal",
            ]),
            &pat,
            |_| false,
        );
        let new = tr.find(&t.path().join("a/new.db")).unwrap();
        let walled = tr.find(&t.path().join("a/walled.db")).unwrap();
        assert_eq!(found.added, vec![new, walled]);
        assert!(found.changed.is_empty() && tr.changed().is_empty());
        assert_eq!(tr.len(), 3);
        assert!(!tr.is_checked(new), "header deferred, as at the scan");
        let mut pending = tr.pending();
        pending.sort_unstable();
        assert_eq!(pending, vec![new, walled]);
        // The scan that follows sees the same fingerprints: nothing new
        // (but the empty file, which it adds, and the first use rejects).
        fs::remove_file(t.path().join("a/empty.db")).unwrap();
        let r = tr.scan(&pat);
        assert_eq!((r.new, r.changed, r.databases), (0, 0, 3), "{r:?}");

        // A file that is no database: added unread, rejected at first use
        // (one log line), then not added again while it stays no database,
        // and added (read) once it is one.
        let junk = t.path().join("a/junk.db");
        fs::write(&junk, b"not a database").unwrap();
        let found = tr.recheck(&named(&["junk.db"]), &pat, |_| false);
        let id = tr.find(&junk).unwrap();
        assert_eq!(found.added, vec![id]);
        assert!(!tr.confirm(id).unwrap());
        assert!(tr.find(&junk).is_none());
        fs::write(&junk, b"not a database, still").unwrap();
        assert!(tr
            .recheck(&named(&["junk.db"]), &pat, |_| false)
            .added
            .is_empty());
        assert_eq!(tr.scan(&pat).new, 0, "the scan knows it is no database");
        header_file(&junk, b"a database now");
        let found = tr.recheck(&named(&["junk.db"]), &pat, |_| false);
        let id = tr.find(&junk).unwrap();
        assert_eq!(found.added, vec![id]);
        assert!(tr.is_checked(id), "its header was read");

        // Without deferral the header is read at once, as the scan does.
        let mut plain = Tracker::new();
        plain.scan(&pat);
        let d = plain.find_dir(&t.path().join("a")).unwrap();
        fs::write(t.path().join("a/text.db"), b"hello").unwrap();
        header_file(&t.path().join("a/more.db"), b"");
        let found = plain.recheck(
            &[(d, "text.db".into()), (d, "more.db".into())],
            &pat,
            |_| false,
        );
        assert_eq!(found.added.len(), 1);
        assert!(plain.find(&t.path().join("a/text.db")).is_none());
        assert!(plain.is_checked(found.added[0]));
    }

    #[test]
    fn a_file_that_becomes_a_database_is_picked_up() {
        let t = tempfile::tempdir().unwrap();
        let pat = vec![Pattern::compile("*.db", t.path()).unwrap()];
        fs::write(t.path().join("x.db"), b"").unwrap();
        let mut tr = Tracker::new();
        assert_eq!(tr.scan(&pat).databases, 0);
        header_file(&t.path().join("x.db"), b"now a database");
        assert_eq!(tr.scan(&pat).databases, 1);
    }
}
