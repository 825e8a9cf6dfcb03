//! This process's claims on `-shm` files: one WAL-index file is only ever
//! opened for one database at a time.
//!
//! SQLite keeps a WAL database's index in its `-shm`, mapped into memory,
//! one mapping per database file (by inode) per process. When a connection
//! is the first to open a `-shm`, SQLite truncates it and rebuilds it from
//! its own `-wal`. It decides "first" with `F_GETLK`, which never reports the
//! process's own locks. So if this process has a `-shm` open for one
//! database, and a `-shm` renamed beside another database (side files
//! swapped between databases, or rotated in a ring) makes a second
//! connection of ours open the same file for that other database, SQLite
//! truncates the first one's index under it and writes the other
//! database's index there:
//!
//! * a read of the first connection at that moment dies of `SIGBUS` (its
//!   mapping now lies past the file's end): the daemon's crash that
//!   black-box probe D18 saw twice in 16 runs of such a ring;
//! * its next transaction reads its own `-wal` through the other
//!   database's index: an older or a mixed state of its database (a
//!   scratch program read 37 rows of a 200-row database this way);
//! * when the second connection closes, the process's locks on that file
//!   go (POSIX locks belong to the process and the inode), and with them
//!   the first connection's read lock, which stops an application's
//!   checkpoint from overwriting the frames that read uses.
//!
//! So before SQLite opens a source, its `-shm` is claimed for its database
//! ([`claim`]): refused while this process has that file open for another
//! database, and held until the connection is closed. The check uses the
//! `stat` that [`crate::source::discover::check_regular_files`] takes
//! anyway; a rename between it and SQLite's own open (microseconds) is not
//! seen.
//!
//! A claim can outlive the file it names: the `-shm` seen before the open
//! was deleted before SQLite opened one (which it then created anew), or
//! the connection left WAL mode and closed it. A freed inode number is soon
//! given to a new file, another database's new `-shm` say, which the stale
//! claim then refused for as long as its connection lived (black-box probe
//! G19, databases replaced and recreated in the same second). So a claim
//! held for another database is honoured only while some descriptor of
//! this process has that very file open (`/proc/self/fd`, read only then);
//! otherwise it is stale and the new claim takes its place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// (device, inode) of a file.
pub type FileId = (u64, u64);

/// The files SQLite is about to open for a database, as one `stat` each saw
/// them: `None` for one that is not there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceFiles {
    /// The database file.
    pub db: Option<FileId>,
    /// Its `-shm`.
    pub shm: Option<FileId>,
}

/// Who holds a `-shm`: the database it is open for, a path that names it
/// (for the error), how many of our connections hold it, and which claims
/// are its (a holder found stale is replaced; its claims then release
/// nothing).
struct Holder {
    db: FileId,
    path: PathBuf,
    count: usize,
    token: u64,
}

/// Tokens of holders, never reused.
static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Every `-shm` this process has claimed, by (device, inode).
static CLAIMS: Mutex<Option<HashMap<FileId, Holder>>> = Mutex::new(None);

fn claims() -> MutexGuard<'static, Option<HashMap<FileId, Holder>>> {
    // A panic elsewhere leaves the map as consistent as before it.
    CLAIMS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `-shm` claimed for one database, released on drop (after the
/// connection that uses it, which must be dropped first). Claims nothing
/// when the database or its `-shm` was not there.
#[derive(Debug, Default)]
pub struct ShmClaim {
    /// The `-shm` and its holder's token.
    shm: Option<(FileId, u64)>,
}

/// Claims `files.shm` for `files.db` (the files of `db`): refused, naming
/// the other database, while this process has that `-shm` open for
/// another database file.
pub fn claim(db: &Path, files: SourceFiles) -> crate::Result<ShmClaim> {
    let (Some(db_id), Some(shm)) = (files.db, files.shm) else {
        return Ok(ShmClaim::default());
    };
    let mut guard = claims();
    let map = guard.get_or_insert_with(HashMap::new);
    match map.get_mut(&shm) {
        Some(held) if held.db == db_id => {
            held.count += 1;
            return Ok(ShmClaim {
                shm: Some((shm, held.token)),
            });
        }
        // Held for another database, and that file still open here.
        Some(holder) if process_has_open(shm) != Some(false) => {
            return Err(crate::Error::invalid(
                db.display(),
                format!(
                    "its -shm is the file this process has open as the WAL index of {} \
                     (another database file): side files were renamed between databases, or \
                     both databases were replaced at the same moment; not read now, tried \
                     again later (SQLite would reset that database's index under our \
                     connection to it)",
                    holder.path.display()
                ),
            ))
        }
        // Unclaimed, or a stale claim this one replaces.
        _ => {}
    }
    let token = TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    map.insert(
        shm,
        Holder {
            db: db_id,
            path: db.to_path_buf(),
            count: 1,
            token,
        },
    );
    Ok(ShmClaim {
        shm: Some((shm, token)),
    })
}

/// Whether a descriptor of this process has the file `id` open; `None`
/// where `/proc/self/fd` cannot tell (then a claim is kept).
fn process_has_open(id: FileId) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let fds = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(fds.flatten().any(|fd| {
        // The link's target, deleted or not (a descriptor closed meanwhile
        // fails, and is not that file).
        std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == id)
    }))
}

impl ShmClaim {
    /// Checks the claim against the `-shm` that is beside `db` now, after
    /// SQLite opened it: a claim made when there was none (SQLite created
    /// it) is made now. One for another file than the one there now is
    /// refused (renamed while opened: which one SQLite has is unknown),
    /// unless no descriptor of this process has the claimed file open and
    /// one has the file there now: then SQLite opened that one, and it is
    /// claimed. An application that opens and closes a connection per
    /// transaction deletes its side files at each close and makes them
    /// anew at the next open, between our `stat` and SQLite's open
    /// (black-box probe M29: such databases' stream starts were refused
    /// now and then, and the database stayed cold).
    pub fn confirm(&mut self, db: &Path, files: SourceFiles) -> crate::Result<()> {
        match self.shm.map(|(shm, _)| shm) {
            claimed if claimed == files.shm => Ok(()),
            None => {
                *self = claim(db, files)?;
                Ok(())
            }
            Some(old)
                if process_has_open(old) == Some(false)
                    && files
                        .shm
                        .is_some_and(|now| process_has_open(now) == Some(true)) =>
            {
                *self = claim(db, files)?;
                Ok(())
            }
            Some(_) => Err(crate::Error::invalid(
                db.display(),
                "its -shm was replaced while SQLite opened it: side files are being renamed; \
                 not read until they settle",
            )),
        }
    }
}

impl Drop for ShmClaim {
    fn drop(&mut self) {
        let Some((shm, token)) = self.shm else { return };
        let mut guard = claims();
        let Some(map) = guard.as_mut() else { return };
        if let Some(holder) = map.get_mut(&shm).filter(|h| h.token == token) {
            holder.count -= 1;
            if holder.count == 0 {
                map.remove(&shm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A claim on a file no descriptor of this process has open is stale (a
    /// `-shm` deleted before SQLite opened one, whose inode number went to
    /// another database's new `-shm`: probe G19's false refusals): the next
    /// claim for another database replaces it, and the stale claim's drop
    /// releases nothing. One held open is honoured.
    #[test]
    fn a_claim_on_a_file_nobody_has_open_is_stale() {
        let t = tempfile::tempdir().unwrap();
        let shm = t.path().join("x.db-shm");
        std::fs::write(&shm, b"").unwrap();
        let m = std::fs::metadata(&shm).unwrap();
        let id = (m.dev(), m.ino());
        let files = |db: u64| SourceFiles {
            db: Some((u64::MAX, db)),
            shm: Some(id),
        };
        let stale = claim(&t.path().join("a.db"), files(1)).unwrap();
        let b = claim(&t.path().join("b.db"), files(2)).unwrap();
        drop(stale);
        let open = std::fs::File::open(&shm).unwrap();
        let e = claim(&t.path().join("c.db"), files(3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.db"), "{e}");
        // Another connection to b's database shares the claim.
        let b2 = claim(&t.path().join("b.db"), files(2)).unwrap();
        drop((b, b2, open));
        claim(&t.path().join("c.db"), files(3)).unwrap();
    }

    /// A `-shm` deleted and made anew between the claim's `stat` and
    /// SQLite's open (an application closing its last connection, then
    /// opening again) is the one SQLite has, when nothing here has the old
    /// one open: the claim moves to it (black-box probe M29: refused). While
    /// the old one is still open here, which one SQLite has is unknown:
    /// refused.
    #[test]
    fn a_shm_made_anew_before_the_open_is_claimed() {
        let t = tempfile::tempdir().unwrap();
        let (db, shm) = (t.path().join("x.db"), t.path().join("x.db-shm"));
        let id = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        std::fs::write(&shm, b"").unwrap();
        let old = id(&shm);
        let files = |shm| SourceFiles {
            db: Some((u64::MAX, 7)),
            shm: Some(shm),
        };
        let mut c = claim(&db, files(old)).unwrap();
        let kept_old = std::fs::File::open(&shm).unwrap();
        std::fs::remove_file(&shm).unwrap();
        std::fs::write(&shm, b"").unwrap();
        let new = id(&shm);
        assert_ne!(old, new);
        let sqlite_has = std::fs::File::open(&shm).unwrap();
        let e = c.confirm(&db, files(new)).unwrap_err().to_string();
        assert!(e.contains("was replaced while SQLite opened it"), "{e}");
        drop(kept_old);
        c.confirm(&db, files(new)).unwrap();
        assert_eq!(c.shm.map(|(s, _)| s), Some(new));
        drop((c, sqlite_has));
    }
}
