//! Installing a restored database: it is written into a temporary file
//! next to the output, synced and checked, and only then renamed to the
//! output without replacing anything; then checked again where it now is:
//! the output must be the very file that was checked (same inode and size)
//! with no side file beside it. A rename moves no bytes, so that is the
//! checked database; a second full read (`quick_check`) would only repeat
//! the integrity check's work.
//! A crash or an error at any point leaves either no output or a complete,
//! checked one. Refuses outputs with SQLite side files (`-wal`, `-shm`,
//! `-journal`) that SQLite would apply to the restored file.

use std::fs::File;
use std::path::{Path, PathBuf};

use tempfile::TempPath;

use crate::capture::snapshot;
use crate::error::IoContext;
use crate::{Error, Result};

/// The side files SQLite would apply to a database at `output` when it is
/// first opened: a leftover `-wal` is replayed onto it, a `-journal` rolled
/// back into it, a `-shm` taken for its WAL index.
pub fn side_files(output: &Path) -> Vec<PathBuf> {
    ["-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| {
            let mut p = output.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// Fails when `output` has side files (see [`side_files`]), naming them.
pub fn refuse_side_files(output: &Path) -> Result<()> {
    let found = side_files(output);
    if found.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
    Err(Error::invalid(
        output.display(),
        format!(
            "{} exist(s) next to the output (left by an earlier database there, or made by \
             another process meanwhile); SQLite would apply them to the restored database when \
             it is first opened. Move or delete them first",
            names.join(", ")
        ),
    ))
}

/// The output being written: a temporary file next to it that becomes the
/// output only once complete and checked ([`Staged::install`]). Dropped
/// without installing, it deletes the temporary file.
pub struct Staged {
    pub file: File,
    pub tmp: TempPath,
    output: PathBuf,
    _side: TempSideFiles,
}

/// Removes, when dropped, the side files SQLite may leave beside the
/// temporary file (the integrity check opens it, and a restored database in
/// WAL mode gets a `-wal` and `-shm` there): a check cut short by an error
/// (out of descriptors) left them behind after a failed restore (black-box
/// probe J20: 17-27 per bulk restore). The temporary name is ours alone, so
/// are its side files.
struct TempSideFiles(PathBuf);

impl Drop for TempSideFiles {
    fn drop(&mut self) {
        for f in side_files(&self.0) {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Staged {
    /// Creates the output's directory and the temporary file (blocking).
    /// Directories it creates are made durable: each one's entry in its
    /// parent is synced, up to the first directory that existed (black-box
    /// probe J20: a restore into new directories, exit 0, could vanish in a
    /// power loss). The output's own directory is synced at the install.
    pub fn new(output: &Path) -> Result<Staged> {
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_dir_durably(dir)?;
        }
        let (file, tmp) = snapshot::temp_sibling(output)?;
        let side = TempSideFiles(tmp.to_path_buf());
        Ok(Staged {
            file,
            tmp,
            output: output.to_path_buf(),
            _side: side,
        })
    }

    /// Checks the SQLite header, `fsync`s the temporary file while
    /// `PRAGMA integrity_check` runs, renames it to the output without replacing
    /// anything, `fsync`s the directory and checks the output again: the
    /// checked file, no side file (blocking). `what` names the source in
    /// errors.
    pub fn install(self, what: &str) -> Result<()> {
        let Staged {
            file,
            tmp,
            output,
            _side,
        } = self;
        let checked = file.metadata().at(&*tmp)?;
        if !crate::source::vfs::has_sqlite_header(&tmp).at(&*tmp)? {
            return Err(Error::damaged(
                what,
                "restored data is not a SQLite database",
            ));
        }
        // The data is complete: the disk writes it back while the check
        // reads it from the page cache, side by side. Both must succeed
        // before anything is renamed.
        let (synced, integrity) = crate::capture::work::side_by_side(
            || crate::durable::sync_file(&file, &tmp),
            || snapshot::integrity_check(&tmp),
        );
        synced
            .unwrap_or_else(|_| Err(std::io::Error::other("fsync panicked")))
            .at(&*tmp)?;
        drop(file);
        integrity.map_err(|e| as_damage(what, e))?;
        // Side files that appeared since the restore began would be applied
        // to the restored database on its first open.
        refuse_side_files(&output)?;
        let turn = GATE.take().ok_or_else(|| {
            Error::invalid(
                output.display(),
                "not installed: the restore was stopped (the restored copy was discarded)",
            )
        })?;
        let tmp = tmp.keep().map_err(|e| Error::io(&output, e.error))?;
        if let Err(e) = rename_noreplace(&tmp, &output) {
            let _ = std::fs::remove_file(&tmp);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::io(
                    &output,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "appeared while the restore ran; not overwritten (the restored copy was discarded)",
                    ),
                )
            } else {
                Error::io(&output, e)
            });
        }
        let dir = output
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Err(e) = crate::durable::sync_path(dir) {
            // Renamed, not durable: a restore that fails leaves no output
            // (probe J20: a failure under EMFILE left its output installed,
            // and the rerun refused it as existing). Ours since the rename.
            let _ = std::fs::remove_file(&output);
            return Err(Error::io(dir, e));
        }
        check_installed(&output, &checked)?;
        turn.installed();
        Ok(())
    }
}

/// Installs in this process and whether a stop was asked for: the line
/// between a restore that is stopped and one that is done. A restore
/// stopped by a signal drops its work, but an install already under way
/// runs in a blocking task that goes on to its end (black-box probe A26:
/// stopped during the integrity check, a restore exited 1 "stopped" with
/// its output installed). So the rename takes a turn here first, refused
/// once [`stop_installs`] ran, and a stop waits for the turns taken.
struct InstallGate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

struct GateState {
    stopped: bool,
    /// Installs past their turn and not ended yet.
    under_way: usize,
    /// Installs that ended with the output in place.
    done: usize,
}

/// The process's one gate: every restore's install, and the stop of the
/// command.
static GATE: InstallGate = InstallGate::new();

impl InstallGate {
    const fn new() -> InstallGate {
        InstallGate {
            state: std::sync::Mutex::new(GateState {
                stopped: false,
                under_way: 0,
                done: 0,
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A turn at renaming an output into place; `None` once stopped.
    fn take(&self) -> Option<InstallTurn<'_>> {
        let mut g = self.state();
        if g.stopped {
            return None;
        }
        g.under_way += 1;
        Some(InstallTurn {
            gate: self,
            done: false,
        })
    }

    /// Refuses every turn from now on, waits for the turns taken to end,
    /// and returns how many outputs were installed in all.
    fn stop(&self) -> usize {
        let mut g = self.state();
        g.stopped = true;
        while g.under_way > 0 {
            g = self
                .changed
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.done
    }
}

/// One install's turn at renaming its output into place.
struct InstallTurn<'g> {
    gate: &'g InstallGate,
    done: bool,
}

impl InstallTurn<'_> {
    /// The output is in place, checked and durable.
    fn installed(mut self) {
        self.done = true;
    }
}

impl Drop for InstallTurn<'_> {
    fn drop(&mut self) {
        let mut g = self.gate.state();
        g.under_way -= 1;
        g.done += usize::from(self.done);
        self.gate.changed.notify_all();
    }
}

/// Refuses every install from now on, waits for those under way to end,
/// and returns how many outputs this process installed in all (blocking).
/// A restore stopped by a signal calls it before it reports the stop: no
/// output appears after that report, and one that appeared before it is
/// counted.
pub fn stop_installs() -> usize {
    GATE.stop()
}

/// Whether `e` says `output` appeared while its restore ran (another
/// process installed it first): with `--if-db-not-exists` that output is
/// one that exists, skipped like one found at the start (black-box probe
/// G27: two such bulk restores into one directory both exited 1).
pub fn appeared(e: &Error, output: &Path) -> bool {
    matches!(e, Error::Io { path, source }
        if path == output && source.kind() == std::io::ErrorKind::AlreadyExists)
}

/// Creates `dir` and its missing parents, and syncs each new directory's
/// entry in its parent, down from the first directory that existed, so a
/// restore into new directories survives a power loss (probe J20 for one
/// output, L20 for a bulk restore's `-o`). The new directories' own
/// entries are synced as files are installed in them.
pub fn create_dir_durably(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .collect();
    if let Err(e) = std::fs::create_dir_all(dir) {
        // The first existing ancestor is no directory (a file where the
        // output's directory should be): named, where the error read only
        // "File exists" (black-box probe A26).
        // A link to nothing is named too (black-box probe G27: "File
        // exists" for a dangling link in the output tree).
        let blocking = dir.ancestors().find_map(|d| match std::fs::metadata(d) {
            Ok(m) if !m.is_dir() => Some((d, "is not a directory")),
            Err(_) if std::fs::symlink_metadata(d).is_ok_and(|m| m.is_symlink()) => {
                Some((d, "is a link to nothing (its target does not exist)"))
            }
            _ => None,
        });
        // An I/O error, this host's: the hot tier passes it on as it is
        // (black-box probe G27: it was worded as a replica failure, with
        // advice to restore an older cold snapshot).
        return Err(match blocking {
            Some((b, what)) => Error::io(
                b,
                std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    format!("{what}, so {} cannot be made", dir.display()),
                ),
            ),
            None => Error::io(dir, e),
        });
    }
    for created in missing.iter().rev() {
        let parent = created
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::durable::sync_path(parent).at(parent)?;
    }
    Ok(())
}

/// What a reader of the installed `output` will see: the file `checked`
/// (same device, inode and size), with no side file that SQLite would apply
/// to it. With a side file the output is removed (it is ours since the
/// rename); a file that replaced ours is left alone.
fn check_installed(output: &Path, checked: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let same = |m: std::fs::Metadata| {
        (m.dev(), m.ino(), m.len()) == (checked.dev(), checked.ino(), checked.len())
    };
    if !std::fs::symlink_metadata(output).is_ok_and(same) {
        // Replaced or removed since the rename: not ours to delete.
        return Err(Error::invalid(
            output.display(),
            "changed while the restore installed it: it is not the file that was checked",
        ));
    }
    if let Err(e) = refuse_side_files(output) {
        // Ours since the rename: nothing else can have it yet.
        let _ = std::fs::remove_file(output);
        for f in side_files(output) {
            tracing::warn!(path = %f.display(), "side file next to a restore output that failed its final check; left in place");
        }
        return Err(e);
    }
    Ok(())
}

/// A failed check of restored data is damage of what it came from; SQLite
/// errors that say the file is not a sound database are too. Anything else
/// (a local I/O error, disk full) is not.
fn as_damage(what: &str, e: Error) -> Error {
    match e {
        Error::Invalid { reason, .. } => Error::damaged(what, reason),
        Error::Sqlite { ref source, .. } if says_unsound(source) => {
            Error::damaged(what, e.to_string())
        }
        other => other,
    }
}

/// Whether SQLite's error says the file is not a sound database (not one,
/// or corrupt), as opposed to the host failing it (a full disk, no
/// descriptor, a lock).
pub fn says_unsound(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), so an
/// output that appeared after the existence check is never overwritten:
/// `renameat2(RENAME_NOREPLACE)` where the kernel and filesystem have it,
/// else a hard link (which fails if `to` exists) and an unlink of `from`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
        };
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: both are valid NUL-terminated paths that outlive the call.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS | libc::ENOTSUP) => {}
            _ => return Err(e),
        }
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// After the rename the output must be the checked file with no side
    /// file: a side file that appeared removes our output (and stays), a
    /// file that replaced ours is an error and is left alone.
    #[test]
    fn the_installed_output_is_the_checked_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.db");
        std::fs::write(&out, b"checked").unwrap();
        let checked = std::fs::metadata(&out).unwrap();
        check_installed(&out, &checked).unwrap();

        let wal = dir.path().join("out.db-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let e = check_installed(&out, &checked).unwrap_err().to_string();
        assert!(e.contains("out.db-wal"), "{e}");
        assert!(!out.exists() && wal.exists());

        std::fs::remove_file(&wal).unwrap();
        std::fs::write(&out, b"someone else's").unwrap();
        let e = check_installed(&out, &checked).unwrap_err().to_string();
        assert!(e.contains("not the file that was checked"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"someone else's");
    }

    /// An output that appeared after the restore began (another restore,
    /// an application creating its database) is never replaced: the install
    /// fails naming it, the file there is left as it was, and the restored
    /// copy is discarded (mutation audit O23: a plain `rename` in place of
    /// the no-replace one passed every test, and its last check too, since
    /// the output then *is* the checked file).
    #[test]
    fn an_output_that_appeared_meanwhile_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sound = snapshot::test_db::indexed(&dir.path().join("src.db"), None);
        let out = dir.path().join("out").join("restored.db");
        let mut staged = Staged::new(&out).unwrap();
        staged.file.write_all(&sound).unwrap();
        std::fs::write(&out, b"appeared").unwrap();
        let e = staged.install("obj").unwrap_err().to_string();
        assert!(e.contains("appeared while the restore ran"), "{e}");
        let mut staged = Staged::new(&out.with_file_name("again.db")).unwrap();
        staged.file.write_all(&sound).unwrap();
        std::fs::write(out.with_file_name("again.db"), b"appeared").unwrap();
        let e = staged.install("obj").unwrap_err();
        assert!(appeared(&e, &out.with_file_name("again.db")), "{e:?}");
        assert!(!appeared(&e, &out), "{e:?}");
        assert_eq!(std::fs::read(&out).unwrap(), b"appeared");
        let left = std::fs::read_dir(out.parent().unwrap()).unwrap().count();
        assert_eq!(left, 2, "only the files that appeared, no temp file");
    }

    /// A restored file with SQLite's header but damaged pages fails
    /// `integrity_check` (which runs beside the `fsync`): nothing is
    /// installed and no temporary file is left; a sound one is installed.
    #[test]
    fn only_a_checked_file_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let sound = snapshot::test_db::indexed(&dir.path().join("src.db"), None);
        let damaged = snapshot::test_db::damaged(&sound);
        let out = dir.path().join("out").join("restored.db");
        for (bytes, ok) in [(&damaged, false), (&sound, true)] {
            let mut staged = Staged::new(&out).unwrap();
            staged.file.write_all(bytes).unwrap();
            let r = staged.install("obj");
            assert_eq!(r.is_ok(), ok, "{r:?}");
            if let Err(e) = r {
                assert!(matches!(e, Error::Damaged { .. }), "{e:?}");
            }
            assert_eq!(out.exists(), ok);
            let left = std::fs::read_dir(out.parent().unwrap()).unwrap().count();
            assert_eq!(left, usize::from(ok), "only the output, no temp file");
        }
        assert_eq!(std::fs::read(&out).unwrap(), sound);
        // The installed file was synced under its temporary name (in
        // `out/`), then its directory after the rename (audit F19: a
        // restore that skipped the file's fsync failed no test).
        let synced = crate::durable::synced_below(dir.path());
        let file = synced
            .iter()
            .rposition(|p| p.parent() == Some(Path::new("out")))
            .unwrap_or_else(|| panic!("the restored file was not synced: {synced:?}"));
        assert!(
            synced[file + 1..].iter().any(|p| p == Path::new("out")),
            "{synced:?}"
        );
    }

    /// Directories a restore creates for its output are durable: each
    /// one's entry is synced in its parent, down from the first that
    /// existed, and the output's own directory after the rename (probe J20:
    /// none of them was, so a restore into new directories that exited 0
    /// could vanish in a power loss).
    #[test]
    fn directories_made_for_the_output_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let sound = snapshot::test_db::indexed(&dir.path().join("src.db"), None);
        let out = dir.path().join("a/b/restored.db");
        let mut staged = Staged::new(&out).unwrap();
        staged.file.write_all(&sound).unwrap();
        staged.install("obj").unwrap();
        let synced = crate::durable::synced_below(dir.path());
        let at = |p: &str| {
            synced
                .iter()
                .position(|s| s == Path::new(p))
                .unwrap_or_else(|| panic!("{p:?} not synced: {synced:?}"))
        };
        // The root's entry for a, a's for b, then b's for the output.
        assert!(at("") < at("a") && at("a") < at("a/b"), "{synced:?}");
    }

    /// A restore whose last step (syncing the output's directory after the
    /// rename) fails leaves no output, as any failed restore, and neither
    /// the temporary file nor side files of it (probe J20: under EMFILE a
    /// bulk restore reported such keys failed with their outputs installed,
    /// so a rerun refused them as existing, and left `-wal` files of its
    /// temporary files).
    #[test]
    fn a_restore_that_fails_at_its_last_sync_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sound = snapshot::test_db::indexed(&dir.path().join("src.db"), None);
        let out = dir.path().join("out/restored.db");
        let mut staged = Staged::new(&out).unwrap();
        staged.file.write_all(&sound).unwrap();
        let mut side = staged.tmp.as_os_str().to_owned();
        side.push("-wal");
        std::fs::write(&side, b"left by a check cut short").unwrap();
        crate::durable::fail_sync_of(Some(&dir.path().join("out")));
        let e = staged.install("obj").unwrap_err();
        crate::durable::fail_sync_of(None);
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        let left = || -> Vec<_> {
            std::fs::read_dir(dir.path().join("out"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        assert!(left().is_empty(), "{:?}", left());
        // Given up before its install (a download failed), with side files
        // a check cut short left.
        let staged = Staged::new(&out).unwrap();
        for suffix in ["-wal", "-shm"] {
            let mut side = staged.tmp.as_os_str().to_owned();
            side.push(suffix);
            std::fs::write(&side, b"left by a check cut short").unwrap();
        }
        drop(staged);
        assert!(left().is_empty(), "{:?}", left());
    }

    #[test]
    fn a_stop_waits_for_installs_under_way_and_refuses_later_ones() {
        let gate = InstallGate::new();
        let done = gate.take().unwrap();
        done.installed();
        let failed = gate.take().unwrap();
        drop(failed);
        let under_way = gate.take().unwrap();
        std::thread::scope(|s| {
            let stopping = s.spawn(|| gate.stop());
            // The stop waits for the turn under way.
            while !gate.state().stopped {
                std::thread::yield_now();
            }
            assert!(!stopping.is_finished());
            assert!(gate.take().is_none(), "a turn after the stop");
            under_way.installed();
            assert_eq!(stopping.join().unwrap(), 2);
        });
        assert!(gate.take().is_none());
        assert_eq!(gate.stop(), 2);
    }

    #[test]
    fn a_file_where_the_output_directory_goes_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pfile");
        std::fs::write(&file, b"x").unwrap();
        let e = create_dir_durably(&file.join("sub"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}: is not a directory", file.display())),
            "{e}"
        );
        // A link to nothing, not "File exists" (black-box probe G27).
        let link = dir.path().join("sp ace");
        std::os::unix::fs::symlink(dir.path().join("nonexistent"), &link).unwrap();
        let e = create_dir_durably(&link.join("b")).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: is a link to nothing (its target does not exist), so ",
                link.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn install_rename_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("tmp"), dir.path().join("out.db"));
        std::fs::write(&from, b"restored").unwrap();
        std::fs::write(&to, b"appeared meanwhile").unwrap();
        let e = rename_noreplace(&from, &to).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"appeared meanwhile");
        assert!(from.exists());
        std::fs::remove_file(&to).unwrap();
        rename_noreplace(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"restored");
        assert!(!from.exists());
    }
}
