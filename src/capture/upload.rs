//! Writing the hot tier's objects: a generation snapshot compressed from a
//! copy of the database, and WAL segments compressed from committed frames,
//! uploaded under the names [`crate::replica::hot`] gives them. The shipper
//! ([`super::ship`]) decides what to write and when.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use chrono::{DateTime, Utc};

use crate::capture::snapshot;
use crate::capture::wal::{self, Committed, WalCursor};
use crate::error::IoContext;
use crate::replica::hot::{segment_path, snapshot_path, GenerationId, Position, SnapshotEntry};
use crate::replica::layout::check_new_key;
use crate::replica::storage::Replica;
use crate::{Error, Result};

/// Reads the LZ4 content checksum (xxHash32 of the uncompressed data) from
/// the end of a frame written with content checksums on.
fn lz4_content_checksum(path: &Path) -> Result<u32> {
    let mut f = File::open(path).at(path)?;
    let len = f.metadata().at(path)?.len();
    if len < 8 {
        return Err(Error::invalid(path.display(), "LZ4 frame too short"));
    }
    let mut tail = [0u8; 8];
    f.seek(SeekFrom::Start(len - 8))
        .and_then(|_| f.read_exact(&mut tail))
        .at(path)?;
    if tail[..4] != [0, 0, 0, 0] {
        return Err(Error::invalid(
            path.display(),
            "LZ4 frame does not end with an end mark and content checksum",
        ));
    }
    Ok(u32::from_le_bytes([tail[4], tail[5], tail[6], tail[7]]))
}

/// Compresses the database file `db` (which must not change meanwhile: a
/// copy made for this purpose, complete at `committed`) into `tmp_dir` and
/// uploads it as snapshot `index` of `gen`. Returns its [`crate::replica::hot::Metadata`] entry.
pub async fn upload_snapshot(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
    index: u64,
    committed: DateTime<Utc>,
    db: &Path,
    tmp_dir: &Path,
) -> Result<SnapshotEntry> {
    check_new_key(key)?;
    let (db, tmp_dir) = (db.to_path_buf(), tmp_dir.to_path_buf());
    let (tmp, size, compressed_size, sum) = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&tmp_dir).at(&tmp_dir)?;
        let size = std::fs::metadata(&db).at(&db)?.len();
        let out = snapshot::staged_file(&tmp_dir)?;
        snapshot::compress(&db, out.as_file(), out.path())?;
        let tmp = out.into_temp_path();
        let compressed = std::fs::metadata(&tmp).at(&*tmp)?.len();
        let sum = lz4_content_checksum(&tmp)?;
        Ok::<_, Error>((tmp, size, compressed, sum))
    })
    .await
    .map_err(|e| Error::invalid("snapshot", format!("task failed: {e}")))??;
    let location = snapshot_path(&replica.prefix, key, gen, index, committed);
    replica.upload_file(&location, &tmp).await?;
    Ok(SnapshotEntry {
        index,
        size,
        compressed_size,
        checksum: crate::replica::hot::checksum_name(sum),
        covers: None,
    })
}

/// LZ4-compresses committed WAL frames read at `pos` (as
/// [`crate::capture::wal::read_committed`] returns them, from a read that began at
/// `committed`) and uploads them as one segment. Returns the end position,
/// where the next segment of this WAL starts.
/// Compression runs inline: LZ4 handles a few hundred MB/s per core, so a
/// segment costs milliseconds.
pub async fn upload_segment(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
    pos: Position,
    committed: DateTime<Utc>,
    frames: &[u8],
) -> Result<Position> {
    check_new_key(key)?;
    let location = segment_path(&replica.prefix, key, gen, pos, committed);
    let compressed = compress_segment(key, pos, frames)?;
    replica.put_bytes(&location, compressed).await?;
    Ok(Position {
        index: pos.index,
        offset: pos.offset + frames.len() as u64,
    })
}

/// Uploads as one segment the committed frames a read left in the WAL file
/// (one transaction larger than [`crate::capture::ship::IN_MEMORY_SEGMENT_BYTES`]):
/// they are checked again and compressed into a staged file as they are
/// read from the WAL, and the file is uploaded (in parts on S3), so memory
/// stays at one LZ4 block whatever the transaction's size. Returns the
/// number of transactions in it.
#[allow(clippy::too_many_arguments)]
pub async fn upload_wal_segment(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
    pos: Position,
    committed_at: DateTime<Utc>,
    wal: (std::sync::Arc<File>, &Path),
    cursor: WalCursor,
    frames: Committed,
    tmp_dir: &Path,
) -> Result<u64> {
    check_new_key(key)?;
    let (file, wal_path, tmp_dir) = (wal.0, wal.1.to_path_buf(), tmp_dir.to_path_buf());
    let (tmp, commits) = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&tmp_dir).at(&tmp_dir)?;
        let out = snapshot::staged_file(&tmp_dir)?;
        let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(
            snapshot::frame_info(frames.len()),
            std::io::BufWriter::new(out.as_file()),
        );
        let commits = wal::copy_committed(&file, &wal_path, &cursor, &frames, &mut enc)?;
        let lz4 = |e: lz4_flex::frame::Error| Error::io(out.path(), std::io::Error::other(e));
        enc.finish()
            .map_err(lz4)?
            .into_inner()
            .map_err(|e| Error::io(out.path(), e.into_error()))?;
        Ok::<_, Error>((out.into_temp_path(), commits))
    })
    .await
    .map_err(|e| Error::invalid("WAL segment", format!("task failed: {e}")))??;
    let location = segment_path(&replica.prefix, key, gen, pos, committed_at);
    replica.upload_file(&location, &tmp).await?;
    Ok(commits)
}

/// The LZ4 frame of a segment (what a segment object or a pack part holds):
/// committed frames starting at `pos`, which must be at or after the first
/// frame of its WAL.
pub fn compress_segment(key: &str, pos: Position, frames: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("WAL segment {pos} of {key:?}");
    if frames.is_empty() || pos.offset < crate::replica::hot::FIRST_FRAME {
        return Err(Error::invalid(
            what(),
            "a segment needs committed frames at offset 32 or later",
        ));
    }
    let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(
        snapshot::frame_info(frames.len() as u64),
        Vec::with_capacity(frames.len() / 2),
    );
    enc.write_all(frames)
        .map_err(|e| Error::invalid(what(), format!("lz4: {e}")))?;
    enc.finish()
        .map_err(|e| Error::invalid(what(), format!("lz4: {e}")))
}
