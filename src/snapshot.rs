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
//! checkpoints or deletes the application's WAL. The copy is written to a
//! temporary file and then compressed in the LZ4 *frame* format (with content
//! checksum) so `lz4 -d` can read any snapshot without litefleet.
//!
//! Everything here is blocking file I/O; the scheduler runs it on tokio's
//! blocking pool.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tempfile::{NamedTempFile, TempPath};

use crate::error::IoContext;
use crate::{Error, Result};

/// How long to wait on a locked database (e.g. during a rollback-journal
/// write or an exclusive checkpoint) before giving up until the next cycle.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Copy buffer for compression and decompression: large enough to keep
/// syscalls rare, small enough that 100 concurrent uploads cost little.
pub const IO_BUFFER: usize = 256 * 1024;

/// A compressed snapshot waiting in a temporary file.
#[derive(Debug)]
pub struct Snapshot {
    /// The `.lz4` file; deleted when dropped.
    pub file: TempPath,
    /// Size of the uncompressed database copy.
    pub db_bytes: u64,
    /// Size of the compressed file.
    pub compressed_bytes: u64,
}

/// Opens `path` read-only (no checkpoint on close, no WAL deletion).
pub fn open_read_only(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| Error::sqlite(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| Error::sqlite(path, e))?;
    Ok(conn)
}

/// Copies `src` consistently into a new file `dst` with the backup API.
pub fn backup_to(src: &Path, dst: &Path) -> Result<()> {
    let source = open_read_only(src)?;
    backup_from(&source, src, dst)
}

/// Copies the database of connection `source` (named `src` in errors) into a
/// new file `dst`. If `source` is inside a read transaction, the copy is
/// exactly that transaction's view (the hot tier relies on this).
pub fn backup_from(source: &Connection, src: &Path, dst: &Path) -> Result<()> {
    let mut target = Connection::open(dst).map_err(|e| Error::sqlite(dst, e))?;
    {
        let backup = rusqlite::backup::Backup::new(source, &mut target)
            .map_err(|e| Error::sqlite(src, e))?;
        // -1: all pages in one step, i.e. one read transaction -> one consistent version.
        // Busy/Locked (a writer holds an exclusive lock) is retried for BUSY_TIMEOUT.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            use rusqlite::backup::StepResult;
            match backup.step(-1).map_err(|e| Error::sqlite(src, e))? {
                StepResult::Done => break,
                StepResult::More | StepResult::Busy | StepResult::Locked
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => {
                    return Err(Error::invalid(
                        src.display(),
                        format!("backup did not complete ({other:?}); will retry next cycle"),
                    ))
                }
            }
        }
    }
    target.close().map_err(|(_, e)| Error::sqlite(dst, e))?;
    Ok(())
}

/// Takes a consistent, compressed snapshot of `db` using `tmp_dir` for staging.
pub fn capture(db: &Path, tmp_dir: &Path) -> Result<Snapshot> {
    std::fs::create_dir_all(tmp_dir).at(tmp_dir)?;
    let copy = NamedTempFile::with_prefix_in("copy-", tmp_dir)
        .at(tmp_dir)?
        .into_temp_path();
    backup_to(db, &copy)?;
    // A corrupt or truncated source copies "successfully" page by page; never
    // let such a copy overwrite a good snapshot of the same hour.
    check(&copy, "quick_check").map_err(|e| {
        Error::invalid(
            db.display(),
            format!("database is damaged, not uploading this copy ({e})"),
        )
    })?;
    let db_bytes = std::fs::metadata(&copy).at(&*copy)?.len();
    let out = NamedTempFile::with_prefix_in("snap-", tmp_dir).at(tmp_dir)?;
    compress(&copy, out.as_file())?;
    let file = out.into_temp_path();
    let compressed_bytes = std::fs::metadata(&file).at(&*file)?.len();
    Ok(Snapshot {
        file,
        db_bytes,
        compressed_bytes,
    })
}

/// LZ4 frame settings: independent 4 MiB blocks and a content checksum, so a
/// damaged object fails loudly on restore instead of yielding a bad database.
pub(crate) fn frame_info() -> lz4_flex::frame::FrameInfo {
    lz4_flex::frame::FrameInfo::new()
        .block_size(lz4_flex::frame::BlockSize::Max4MB)
        .content_checksum(true)
}

/// Compresses file `src` into `out` (LZ4 frame format).
pub fn compress(src: &Path, out: &File) -> Result<()> {
    let mut input = BufReader::with_capacity(IO_BUFFER, File::open(src).at(src)?);
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(
        frame_info(),
        BufWriter::with_capacity(IO_BUFFER, out),
    );
    std::io::copy(&mut input, &mut enc).at(src)?;
    let mut w = enc
        .finish()
        .map_err(|e| Error::invalid(src.display(), format!("lz4: {e}")))?;
    w.flush().at(src)?;
    Ok(())
}

/// Decompresses an LZ4 frame stream into `dst`; returns the bytes written.
pub fn decompress(src: impl Read, what: &str, dst: &mut File) -> Result<u64> {
    let mut dec = lz4_flex::frame::FrameDecoder::new(BufReader::with_capacity(IO_BUFFER, src));
    let mut w = BufWriter::with_capacity(IO_BUFFER, dst);
    let n = std::io::copy(&mut dec, &mut w)
        .map_err(|e| Error::invalid(what, format!("not a valid LZ4 snapshot: {e}")))?;
    w.flush()
        .map_err(|e| Error::invalid(what, format!("write failed: {e}")))?;
    Ok(n)
}

/// Runs `PRAGMA integrity_check` on a database file; `Err` names what failed.
pub fn integrity_check(path: &Path) -> Result<()> {
    check(path, "integrity_check")
}

/// Runs `PRAGMA <pragma>` (`integrity_check` or the cheaper `quick_check`,
/// which skips index-content checks) and expects the single row `ok`.
pub(crate) fn check(path: &Path, pragma: &str) -> Result<()> {
    let conn = Connection::open(path).map_err(|e| Error::sqlite(path, e))?;
    let mut stmt = conn
        .prepare(&format!("PRAGMA {pragma}"))
        .map_err(|e| Error::sqlite(path, e))?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|it| it.collect())
        .map_err(|e| Error::sqlite(path, e))?;
    drop(stmt);
    conn.close().map_err(|(_, e)| Error::sqlite(path, e))?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(Error::invalid(
            path.display(),
            format!("{pragma} failed: {}", rows.join("; ")),
        ))
    }
}

/// A path next to `target` for writing it atomically.
pub fn temp_sibling(target: &Path) -> Result<(File, TempPath)> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = NamedTempFile::with_prefix_in(format!(".{name}.litefleet-"), &dir).at(&dir)?;
    let (file, path) = tmp.into_parts();
    Ok((file, path))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let snap = capture(&db, &t.path().join("tmp")).unwrap();
        // The application's WAL is untouched by our read-only connection.
        assert!(std::fs::metadata(t.path().join("w.db-wal")).unwrap().len() > 0);
        let out = t.path().join("restored.db");
        let mut f = File::create(&out).unwrap();
        let n = decompress(File::open(&snap.file).unwrap(), "snap", &mut f).unwrap();
        assert_eq!(n, snap.db_bytes);
        integrity_check(&out).unwrap();
        let c = Connection::open(&out).unwrap();
        let cnt: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(cnt, 3);
    }

    #[test]
    fn corrupt_lz4_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let mut f = File::create(t.path().join("x")).unwrap();
        let e = decompress(&b"garbage that is not lz4"[..], "obj", &mut f).unwrap_err();
        assert!(e.to_string().contains("not a valid LZ4"), "{e}");
    }
}
