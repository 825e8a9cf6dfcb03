//! Replay of a hot-tier restore plan: download the generation snapshot,
//! then apply its WAL segments one after the other.
//!
//! What to replay and the proof that it is continuous belong to the hot
//! layout ([`crate::replica::hot::plan`], [`crate::replica::hot::Replay`]);
//! this module does the I/O: it streams the snapshot through the LZ4 decoder
//! into the output, prefetches segments, verifies each segment's frames
//! (salts and checksum chain, [`crate::capture::wal::verify_frames`]) and
//! writes their pages into the database. The output is synced but not
//! integrity-checked or renamed: [`super`] owns the atomic install.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use crate::capture::snapshot;
use crate::capture::wal::{self, ChainLink};
use crate::replica::hot::{
    self, plan_latest, Continues, Plan, Replay, RestorePoint, SegmentObject,
};
use crate::replica::storage::Replica;
use crate::{Error, Result};

/// Download progress hook: called with (compressed bytes received so far,
/// compressed object size) as the object streams in.
pub type OnBytes = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A blocking reader of a downloaded object, for the decompressor on the
/// blocking pool. A `file://` object is read straight from the file
/// `object_store` opened for it; any other is bridged from its download
/// stream (for `file://` that stream is 8 KiB chunks, each its own trip
/// through the blocking pool and back: ~94,000 for a 770 MB snapshot). Read
/// errors of either carry [`snapshot::StreamError`], so they count as store
/// errors, never as a damaged object. Must be called inside the runtime.
pub fn object_reader(
    got: object_store::GetResult,
    on_bytes: Option<OnBytes>,
) -> Box<dyn Read + Send> {
    let total = got.meta.size;
    match got.payload {
        object_store::GetResultPayload::File(file, path) => Box::new(FileObject {
            file,
            path,
            start: got.range.start,
            pos: got.range.start,
            end: got.range.end,
            total,
            on_bytes,
        }),
        object_store::GetResultPayload::Stream(stream) => {
            let mut received = 0u64;
            let stream = stream
                .inspect_ok(move |chunk| {
                    if let Some(f) = &on_bytes {
                        received += chunk.len() as u64;
                        f(received, total);
                    }
                })
                .map_err(snapshot::StreamError::io);
            Box::new(tokio_util::io::SyncIoBridge::new(
                tokio_util::io::StreamReader::new(stream),
            ))
        }
    }
}

/// A `file://` object's byte range, read from its open file.
struct FileObject {
    file: File,
    path: std::path::PathBuf,
    start: u64,
    pos: u64,
    end: u64,
    total: u64,
    on_bytes: Option<OnBytes>,
}

impl Read for FileObject {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = usize::try_from(self.end.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos).map_err(|e| {
            snapshot::StreamError::io(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: format!("reading {}: {e}", self.path.display()).into(),
            })
        })?;
        self.pos += n as u64;
        if let Some(f) = &self.on_bytes {
            f(self.pos - self.start, self.total);
        }
        Ok(n)
    }
}

/// Segments downloaded ahead of the one being applied during restore: enough
/// to hide request latency, few enough that memory stays at a handful of
/// segments.
const SEGMENT_PREFETCH: usize = 4;
/// Size of the SQLite database header (we need its page size field).
const DB_HEADER_SIZE: usize = 100;

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::invalid("restore", format!("task failed: {e}"))
}

/// The page size in a SQLite database file's header.
fn db_page_size(file: &File, what: &str) -> Result<u32> {
    let mut h = [0u8; DB_HEADER_SIZE];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| Error::invalid(what, format!("not a SQLite database: {e}")))?;
    if &h[..16] != b"SQLite format 3\0" {
        return Err(Error::invalid(what, "not a SQLite database (bad header)"));
    }
    let raw = u32::from(u16::from_be_bytes([h[16], h[17]]));
    let page_size = if raw == 1 { wal::MAX_PAGE_SIZE } else { raw };
    if !wal::valid_page_size(page_size) {
        return Err(Error::invalid(what, format!("invalid page size {raw}")));
    }
    Ok(page_size)
}

/// Fails unless the replayed database's size (set by the last commit frame
/// applied) is the one its header records, when the header's record is
/// valid (its change counter, bytes 24..28, equal to bytes 92..96; SQLite
/// keeps it so, and it is what SQLite reads the size from). A WAL commit
/// frame's size field is covered by the frame checksums, not by anything
/// a store cannot forge: a crafted one grew a restore to an 8.8 TB sparse
/// file that passed `integrity_check`, exit 0 (black-box probe N29), as
/// SQLite reads the size from the header and ignores the rest. Returns
/// the size.
fn sized_as_its_header_says(file: &File, path: &Path, page_size: u32, what: &str) -> Result<u64> {
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut h = [0u8; DB_HEADER_SIZE];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| Error::io(path, e))?;
    let be = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let (pages, counter, valid_for) = (be(28), be(24), be(92));
    if pages == 0 || counter != valid_for {
        return Ok(len);
    }
    let expected = u64::from(pages) * u64::from(page_size);
    if len != expected {
        return Err(Error::invalid(
            what,
            format!(
                "the WAL replayed leaves the database {len} bytes long, but its header records \
                 {pages} pages of {page_size} bytes ({expected}): a commit frame's size is not \
                 the database's; refusing to restore"
            ),
        ));
    }
    Ok(len)
}

/// Restores `key` into `out` (opened for reading and writing; its contents
/// are replaced) from the newest generation with a snapshot committed at or
/// before `at` (`None`: the latest state). See the module docs for the rules.
/// `out` is synced but not integrity-checked: the caller owns its path,
/// `out_path`, which errors of the file name.
/// [`plan_latest`] then [`restore_plan`].
pub async fn restore_generation(
    replica: &Replica,
    key: &str,
    at: Option<DateTime<Utc>>,
    out: &mut File,
    out_path: &Path,
) -> Result<RestorePoint> {
    match plan_latest(replica, key, at, None).await? {
        Some(p) => restore_plan(replica, key, &p, out, out_path).await,
        None => Err(Error::NotFound(format!(
            "no WAL generation of {key:?} has a snapshot{} in {replica}",
            uploaded_by(at)
        ))),
    }
}

/// Executes a plan made by [`crate::replica::hot::plan`] or [`plan_latest`] for `key`: downloads
/// the snapshot into `out` (opened for reading and writing; its contents are
/// replaced) and replays the segments, checking that each continues where the
/// previous one ended (a gap is an error naming the missing position).
/// `out` is synced but not integrity-checked or renamed: the caller owns its
/// path, `out_path`, which errors of the file name (as [`Error::Io`]: the
/// host's failure, never the replica's; see [`crate::restore`] for the
/// atomic install).
pub async fn restore_plan(
    replica: &Replica,
    key: &str,
    plan: &Plan,
    out: &mut File,
    out_path: &Path,
) -> Result<RestorePoint> {
    let snap = &plan.snapshot;
    let mut replay = Replay::start(replica, key, plan).await?;
    check_recorded_snapshot(replica, plan).await?;
    let mut file = out.try_clone().map_err(|e| Error::io(out_path, e))?;
    let got = match replica.store.get(&snap.location).await {
        Ok(g) => g,
        // Listed, then deleted (retention ended the generation meanwhile).
        Err(object_store::Error::NotFound { .. }) => {
            return Err(Error::invalid(&snap.location, OBJECT_GONE))
        }
        Err(e) => return Err(Error::store(&snap.location, e)),
    };
    let bridge = object_reader(got, None);
    let what = snap.location.to_string();
    let path = out_path.to_path_buf();
    let (mut file, page_size) = tokio::task::spawn_blocking(move || -> Result<(File, u32)> {
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .map_err(|e| Error::io(&path, e))?;
        snapshot::decompress_to(bridge, &what, &mut file, &path)?;
        let page_size = db_page_size(&file, &what)?;
        Ok((file, page_size))
    })
    .await
    .map_err(join_error)??;

    let mut fetches = futures::stream::iter(fetch_units(&plan.segments))
        .map(move |unit| fetch_unit(replica, unit))
        .buffered(SEGMENT_PREFETCH)
        .map_ok(|v| futures::stream::iter(v.into_iter().map(Ok::<_, Error>)))
        .try_flatten();

    // Where in its WAL the snapshot's state is (see `SnapshotEntry::covers`):
    // frames before it are checked but not applied.
    let covers = plan
        .recorded_snapshot()
        .and_then(|e| e.covers)
        .map(|offset| crate::replica::hot::Position {
            index: snap.index,
            offset,
        });
    let mut chain: Option<ChainLink> = None;
    let mut lengths = Vec::new();
    while let Some(next) = fetches.next().await {
        let (seg, fetched) = next?;
        match replay.admit(&seg)? {
            Continues::SameWal => {}
            Continues::WalStart(start) => chain = start.map(ChainLink::from),
        }
        let what = seg.location.to_string();
        let skip = covers
            .filter(|c| c.index == seg.pos.index)
            .map_or(0, |c| c.offset.saturating_sub(seg.pos.offset));
        let path = out_path.to_path_buf();
        let compressed: Box<dyn Read + Send> = match fetched {
            Fetched::Bytes(b) => Box::new(std::io::Cursor::new(b)),
            Fetched::Large => match replica.store.get(&seg.location).await {
                Ok(got) => object_reader(got, None),
                Err(e) => return Err(Error::store(&seg.location, e)),
            },
        };
        let (f, info, len) = tokio::task::spawn_blocking(move || {
            let (info, len) = wal::replay_segment(
                &what,
                compressed,
                (&mut file, &path),
                page_size,
                chain,
                skip,
            )?;
            Ok::<_, Error>((file, info, len))
        })
        .await
        .map_err(join_error)??;
        file = f;
        chain = Some(info.into());
        lengths.push((seg.pos, len));
        replay.applied(&seg, len);
    }
    if plan.unproven_prefix(&lengths) {
        return Err(Error::invalid(
            format!("generation {} of {key:?}", plan.generation),
            format!(
                "its metadata.json does not record where in its first WAL its snapshot's state \
                 is (it was written by a version of litefleet from before 2026-12-07, which \
                 did not record it for every generation), and the WAL it shipped up to this \
                 time ends inside \
                 the parts that re-ship that WAL: the replay could lay older pages over the \
                 snapshot; its snapshot's state is restored with --timestamp {}",
                snap.time
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        ));
    }
    let (pos, time, applied) = replay.finish()?;
    let path = out_path.to_path_buf();
    let generation = format!("generation {} of {key:?}", plan.generation);
    let bytes = tokio::task::spawn_blocking(move || -> Result<u64> {
        let len = sized_as_its_header_says(&file, &path, page_size, &generation)?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        Ok(len)
    })
    .await
    .map_err(join_error)??;
    Ok(RestorePoint {
        generation: plan.generation.clone(),
        snapshot_index: snap.index,
        position: pos,
        time,
        segments: applied,
        bytes,
    })
}

/// Checks the plan's snapshot object against what the generation's
/// metadata recorded at its upload: its size, and the LZ4 content checksum
/// in the frame's last four bytes (one ranged GET). The decoder checks the
/// content against that trailer, so together they prove the object is the
/// snapshot that was uploaded. Another valid snapshot put in its place (the
/// generation's older one, another database's) is damage; before, it was
/// replayed over and the restore gave a state that never existed, with
/// exit 0 (black-box probe). Metadata that records nothing of the snapshot
/// (written by earlier versions) is not checked.
async fn check_recorded_snapshot(replica: &Replica, plan: &Plan) -> Result<()> {
    let Some(entry) = plan.recorded_snapshot() else {
        return Ok(());
    };
    let snap = &plan.snapshot;
    let damaged = |what: &str, found: String, recorded: String| {
        Err(Error::damaged(
            &snap.location,
            format!(
                "its {what} is {found} where metadata.json recorded {recorded} at its upload: \
                 not the snapshot that was uploaded"
            ),
        ))
    };
    if snap.size != entry.compressed_size {
        return damaged(
            "size",
            format!("{} bytes", snap.size),
            format!("{} bytes", entry.compressed_size),
        );
    }
    let tail = match snap.size.checked_sub(4) {
        Some(start) => match replica
            .get_range_bytes(&snap.location, start..snap.size)
            .await?
        {
            Some(t) => Some(t),
            // Listed, then deleted: not damage (black-box probe: a
            // generation retention deleted during a restore was called
            // "not the snapshot that was uploaded").
            None => return Err(Error::invalid(&snap.location, OBJECT_GONE)),
        },
        None => None,
    };
    let sum = tail
        .filter(|t| t.len() == 4)
        .map(|t| hot::checksum_name(u32::from_le_bytes([t[0], t[1], t[2], t[3]])));
    match sum {
        Some(sum) if sum == entry.checksum => Ok(()),
        sum => damaged(
            "content checksum",
            sum.unwrap_or_else(|| "missing".into()),
            entry.checksum.clone(),
        ),
    }
}

/// Why a restore failed when a pack it planned with was gone when its
/// parts were downloaded (see [`is_part_gone`]).
const LOG_PART_GONE: &str =
    "was listed, but is gone now (a fleet log object consolidated into a pack meanwhile, or deleted by retention or by hand)";
/// Why a restore failed when an object of its plan other than a fleet log
/// object was gone when it was read (see [`is_part_gone`]).
const OBJECT_GONE: &str =
    "was listed, but is gone now (deleted meanwhile, by retention or by hand)";

/// The restore failed because an object it planned with was gone when it
/// was read: a fleet log object consolidated and deleted after the plan was
/// made (planning again finds its parts in the consolidated pack), or a
/// generation's snapshot deleted by retention (planning again finds what
/// is there now, or fails naming it). Never damage.
pub fn is_part_gone(e: &Error) -> bool {
    matches!(e, Error::Invalid { reason, .. } if reason == LOG_PART_GONE || reason == OBJECT_GONE)
}

/// Segments downloaded together: one segment object, one part of a fleet
/// log object (by range), or the consecutive parts of one consolidated pack
/// (the pack downloaded once).
fn fetch_units(segments: &[SegmentObject]) -> Vec<Vec<SegmentObject>> {
    let mut units: Vec<Vec<SegmentObject>> = Vec::new();
    for s in segments {
        let whole = s.part.as_ref().is_some_and(|p| p.whole);
        match units.last_mut() {
            Some(u) if whole && u[0].location == s.location => u.push(s.clone()),
            _ => units.push(vec![s.clone()]),
        }
    }
    units
}

/// Segment objects larger than this are not downloaded ahead: each is read
/// from the store as it is replayed, so a restore's memory does not grow
/// with a transaction's size (black-box probe Q30: 804 MB of RSS to restore
/// after one 1.5 GB transaction, whose segment object was held whole, and
/// up to [`SEGMENT_PREFETCH`] such). Smaller ones, and fleet log parts (at
/// most 32 MiB of frames each), come ahead in memory.
const PREFETCH_MAX: u64 = 16 << 20;

/// A segment as [`fetch_unit`] got it.
enum Fetched {
    Bytes(bytes::Bytes),
    /// Larger than [`PREFETCH_MAX`]: read when it is replayed.
    Large,
}

async fn fetch_unit(
    replica: &Replica,
    unit: Vec<SegmentObject>,
) -> Result<Vec<(SegmentObject, Fetched)>> {
    let first = &unit[0];
    let loc = first.location.clone();
    let missing = || Error::invalid(&loc, LOG_PART_GONE);
    match &first.part {
        None if first.size > PREFETCH_MAX => Ok(vec![(
            unit.into_iter().next().expect("one"),
            Fetched::Large,
        )]),
        None => {
            let got = replica
                .store
                .get(&loc)
                .await
                .map_err(|e| Error::store(&loc, e))?;
            let bytes = got.bytes().await.map_err(|e| Error::store(&loc, e))?;
            Ok(vec![(
                unit.into_iter().next().expect("one"),
                Fetched::Bytes(bytes),
            )])
        }
        Some(p) if !p.whole => {
            let bytes = replica
                .get_range_bytes(&loc, p.range.clone())
                .await?
                .ok_or_else(missing)?;
            Ok(vec![(
                unit.into_iter().next().expect("one"),
                Fetched::Bytes(bytes),
            )])
        }
        Some(_) => {
            let all = replica.get_bytes(&loc).await?.ok_or_else(missing)?;
            unit.into_iter()
                .map(|s| {
                    let r = s.part.as_ref().map(|p| p.range.clone()).unwrap_or(0..0);
                    if r.end > all.len() as u64 {
                        return Err(Error::invalid(
                            &loc,
                            format!("pack is shorter than its index says (part at {})", s.pos),
                        ));
                    }
                    let b = all.slice(r.start as usize..r.end as usize);
                    Ok((s, Fetched::Bytes(b)))
                })
                .collect()
        }
    }
}

/// ` at or before <at>` for messages about what a restore at `at` found
/// nothing of; empty for the latest state.
pub fn uploaded_by(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| format!(" at or before {}", t.to_rfc3339()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::upload::{upload_segment, upload_snapshot};
    use crate::capture::wal::{ReadOutcome, WalCursor};
    use crate::replica::hot::{
        list_generation_ids, list_generations, new_generation_id, read_metadata, segment_path,
        snapshot_path, write_metadata, GenerationId, Metadata, Position, SnapshotEntry, WalStart,
    };
    use crate::replica::layout::commit_millis;
    use chrono::Duration;
    use rusqlite::Connection;
    use std::path::{Path, PathBuf};

    /// A commit time as names record it (whole milliseconds).
    fn named_time(t: DateTime<Utc>) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(commit_millis(t) as i64).unwrap()
    }

    // ---- end to end against file:// ----

    fn file_replica(dir: &Path) -> Replica {
        Replica::for_test_dir(dir)
    }

    /// A segment object larger than `PREFETCH_MAX` is not downloaded ahead
    /// (there is none to download here: a GET would fail), a smaller one is.
    #[tokio::test]
    async fn large_segment_objects_are_read_as_they_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let r = file_replica(dir.path());
        let seg = |name: &str, size: u64| SegmentObject {
            pos: Position {
                index: 0,
                offset: 32,
            },
            location: object_store::path::Path::from(name),
            uploaded: Utc::now(),
            time: Utc::now(),
            size,
            part: None,
        };
        let got = fetch_unit(&r, vec![seg("absent", PREFETCH_MAX + 1)])
            .await
            .unwrap();
        assert!(matches!(got[..], [(_, Fetched::Large)]));
        assert!(fetch_unit(&r, vec![seg("absent", PREFETCH_MAX)])
            .await
            .is_err());
        r.put_bytes(&object_store::path::Path::from("small"), vec![7u8; 10])
            .await
            .unwrap();
        let got = fetch_unit(&r, vec![seg("small", 10)]).await.unwrap();
        assert!(matches!(&got[..], [(_, Fetched::Bytes(b))] if b.len() == 10));
    }

    struct Writer {
        db: PathBuf,
        conn: Connection,
        rows: i64,
        index: u64,
        cursor: Option<WalCursor>,
        gen: GenerationId,
        /// Where each finished WAL ended, and each WAL's header, as the
        /// shipper records them in the metadata before a WAL's first segment.
        wal_ends: Vec<Position>,
        wal_starts: Vec<WalStart>,
    }

    /// Upload times are file mtimes; keep them apart so cutoffs are exact.
    async fn tick() {
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    impl Writer {
        fn commit(&mut self, n: i64) {
            let tx = self.conn.unchecked_transaction().unwrap();
            for _ in 0..n {
                self.rows += 1;
                tx.execute(
                    "INSERT INTO t(id, v) VALUES (?1, ?2)",
                    rusqlite::params![self.rows, format!("{:>300}", self.rows)],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }

        fn wal(&self) -> PathBuf {
            PathBuf::from(format!("{}-wal", self.db.display()))
        }

        /// Ships everything committed as one segment; returns its commit time.
        async fn ship(&mut self, r: &Replica) -> DateTime<Utc> {
            let committed = named_time(Utc::now());
            let wp = self.wal();
            let f = File::open(&wp).unwrap();
            let cur = match self.cursor {
                Some(c) => c,
                None => {
                    let c = WalCursor::at_start(
                        self.index,
                        &wal::read_header(&f, &wp).unwrap().unwrap(),
                    );
                    self.wal_starts.push(c.wal_start());
                    self.write_metadata(r, c.pos).await;
                    c
                }
            };
            let ReadOutcome::Frames { bytes, next, .. } =
                wal::read_committed(&f, &wp, &cur, u64::MAX).unwrap()
            else {
                panic!("continuity lost")
            };
            let end = upload_segment(r, "k", &self.gen, cur.pos, committed, &bytes)
                .await
                .unwrap();
            assert_eq!(end, next.pos);
            self.cursor = Some(next);
            tick().await;
            committed
        }

        /// TRUNCATE checkpoint (after shipping everything), then snapshot the
        /// database file as snapshot `index` of the next WAL.
        async fn checkpoint_and_snapshot(
            &mut self,
            r: &Replica,
            tmp: &Path,
            new_wal: bool,
        ) -> DateTime<Utc> {
            let busy: i64 = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .unwrap();
            assert_eq!(busy, 0);
            if new_wal {
                self.wal_ends.extend(self.cursor.map(|c| c.pos));
                self.index += 1;
            }
            self.cursor = None;
            let copy = tmp.join("copy.db");
            std::fs::copy(&self.db, &copy).unwrap();
            let committed = named_time(Utc::now());
            upload_snapshot(r, "k", &self.gen, self.index, committed, &copy, tmp)
                .await
                .unwrap();
            tick().await;
            committed
        }
    }

    /// A `file://` replica in `dir` and a writer of a new WAL database
    /// there (1024-byte pages, no automatic checkpoints, table `t`).
    fn writer(dir: &Path) -> (Replica, Writer) {
        let r = file_replica(&dir.join("replica"));
        let db = dir.join("app.db");
        let conn = crate::capture::snapshot::test_db::wal_1k(&db);
        let w = Writer {
            db,
            conn,
            rows: 0,
            index: 0,
            cursor: None,
            gen: new_generation_id(Utc::now()),
            wal_ends: Vec::new(),
            wal_starts: Vec::new(),
        };
        (r, w)
    }

    impl Writer {
        /// The generation's metadata as the shipper writes it before a WAL's
        /// first segment, `last` at what was shipped.
        async fn write_metadata(&self, r: &Replica, last: Position) {
            let meta = Metadata {
                generation: self.gen.clone(),
                page_size: 1024,
                created: self.gen.created(),
                first: Position::start(0),
                last,
                snapshots: Vec::new(),
                wal_starts: Some(self.wal_starts.clone()),
                wal_ends: self.wal_ends.clone(),
                logged: false,
                written: Some(Utc::now()),
                key: None,
            };
            write_metadata(r, "k", &meta).await.unwrap();
        }
    }

    async fn restore_rows(
        r: &Replica,
        at: Option<DateTime<Utc>>,
        dir: &Path,
    ) -> Result<(RestorePoint, i64)> {
        let out = tempfile::Builder::new()
            .suffix(".db")
            .tempfile_in(dir)
            .unwrap();
        let path = out.path().to_path_buf();
        let mut f = out.reopen().unwrap();
        let point = restore_generation(r, "k", at, &mut f, &path).await?;
        drop(f);
        assert!(!PathBuf::from(format!("{}-wal", path.display())).exists());
        snapshot::integrity_check(&path).unwrap();
        let c = Connection::open(&path).unwrap();
        let (n, max): (i64, i64) = c
            .query_row("SELECT count(*), coalesce(max(id), 0) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(n, max, "rows are 1..=n");
        Ok((point, n))
    }

    /// A `file://` object is read from its file, whole or a byte range,
    /// with progress counted from the range's start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_object_is_read_from_its_file() {
        use object_store::{GetOptions, GetRange, ObjectStoreExt, PutPayload};
        let dir = tempfile::tempdir().unwrap();
        let replica = file_replica(dir.path());
        let location = replica.prefix.clone().join("object");
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        replica
            .store
            .put(&location, PutPayload::from(content.clone()))
            .await
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new((0, 0)));
        let hook: OnBytes = {
            let seen = seen.clone();
            std::sync::Arc::new(move |got, total| *seen.lock().unwrap() = (got, total))
        };
        let got = replica.store.get(&location).await.unwrap();
        assert!(matches!(
            got.payload,
            object_store::GetResultPayload::File(..)
        ));
        let mut reader = object_reader(got, Some(hook));
        let read = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            reader.read_to_end(&mut v).unwrap();
            v
        })
        .await
        .unwrap();
        assert_eq!(read, content);
        assert_eq!(*seen.lock().unwrap(), (100_000, 100_000));
        let opts = GetOptions {
            range: Some(GetRange::Bounded(1000..5000)),
            ..Default::default()
        };
        let got = replica.store.get_opts(&location, opts).await.unwrap();
        let mut reader = object_reader(got, None);
        let read = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            reader.read_to_end(&mut v).unwrap();
            v
        })
        .await
        .unwrap();
        assert_eq!(read, &content[1000..5000]);
    }

    /// A commit frame whose size field is not the database's (its
    /// checksum recomputed, as anyone who can write to the replica can) is
    /// refused by the replay, where it grew the restore to a sparse file of
    /// that many pages that passed `integrity_check`, exit 0 (black-box
    /// probe N29); so is a frame beyond SQLite's largest page number.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_frame_sized_unlike_the_database_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (r, mut w) = writer(tmp.path());
        w.commit(10);
        w.checkpoint_and_snapshot(&r, tmp.path(), false).await;
        w.commit(3);
        let wp = w.wal();
        let f = File::open(&wp).unwrap();
        let h = wal::read_header(&f, &wp).unwrap().unwrap();
        let cur = WalCursor::at_start(0, &h);
        w.wal_starts.push(cur.wal_start());
        w.write_metadata(&r, cur.pos).await;
        let ReadOutcome::Frames { bytes, .. } =
            wal::read_committed(&f, &wp, &cur, u64::MAX).unwrap()
        else {
            panic!("continuity lost")
        };
        // The last frame (the commit) says so many pages, or names a page
        // SQLite never writes; its checksum is made right again.
        let forge = |pgno: Option<u32>, pages: u32| {
            let mut v = bytes.to_vec();
            let fsize = 24 + 1024;
            let last = v.len() - fsize;
            let prev = if last == 0 {
                h.checksum
            } else {
                let p = &v[last - fsize + 16..last - fsize + 24];
                wal::Checksum(
                    u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                    u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                )
            };
            if let Some(n) = pgno {
                v[last..last + 4].copy_from_slice(&n.to_be_bytes());
            }
            v[last + 4..last + 8].copy_from_slice(&pages.to_be_bytes());
            let c = wal::checksum(h.order, prev, &v[last..last + 8]);
            let c = wal::checksum(h.order, c, &v[last + 24..last + fsize]);
            v[last + 16..last + 20].copy_from_slice(&c.0.to_be_bytes());
            v[last + 20..last + 24].copy_from_slice(&c.1.to_be_bytes());
            v
        };
        let committed = named_time(Utc::now());
        for (frames, why) in [
            (forge(None, 0x00ff_ffff), "its header records"),
            (
                forge(Some(u32::MAX), u32::MAX),
                "beyond SQLite's largest page number",
            ),
        ] {
            upload_segment(&r, "k", &w.gen, cur.pos, committed, &frames)
                .await
                .unwrap();
            let e = restore_rows(&r, None, tmp.path()).await.unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        // The frames as written restore.
        upload_segment(&r, "k", &w.gen, cur.pos, committed, &bytes)
            .await
            .unwrap();
        assert_eq!(restore_rows(&r, None, tmp.path()).await.unwrap().1, 13);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn build_restore_and_detect_gaps() {
        let tmp = tempfile::tempdir().unwrap();
        let (r, mut w) = writer(tmp.path());
        w.commit(10);
        // (upload time, rows restorable at that time, snapshot index used)
        let mut points = vec![(
            w.checkpoint_and_snapshot(&r, tmp.path(), false).await,
            10,
            0,
        )];
        for n in [3, 40, 1] {
            w.commit(n);
            w.commit(2);
            points.push((w.ship(&r).await, w.rows, 0));
        }
        // WAL 0 ends; snapshot 1 is the database at the start of WAL 1.
        points.push((
            w.checkpoint_and_snapshot(&r, tmp.path(), true).await,
            w.rows,
            1,
        ));
        let mut wal1 = Vec::new();
        for n in [5, 1, 30] {
            w.commit(n);
            let pos = w.cursor.map_or(Position::start(1), |c| c.pos);
            let committed = w.ship(&r).await;
            wal1.push((pos, committed));
            points.push((committed, w.rows, 1));
        }
        for pair in points.windows(2) {
            assert!(pair[0].0 < pair[1].0, "upload times are distinct");
        }

        for &(time, rows, index) in &points {
            let (p, n) = restore_rows(&r, Some(time), tmp.path()).await.unwrap();
            assert_eq!((n, p.snapshot_index, p.time), (rows, index, time));
            // Until the next upload, the same point is restored.
            let (_, n) = restore_rows(&r, Some(time + Duration::milliseconds(10)), tmp.path())
                .await
                .unwrap();
            assert_eq!(n, rows);
        }
        let (latest, n) = restore_rows(&r, None, tmp.path()).await.unwrap();
        assert_eq!((n, latest.segments, latest.snapshot_index), (w.rows, 3, 1));
        assert_eq!(latest.position, w.cursor.unwrap().pos);
        let e = restore_rows(&r, Some(points[0].0 - Duration::seconds(1)), tmp.path())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");

        // Listing.
        let gens = list_generations(&r, "k").await.unwrap();
        assert_eq!(gens.len(), 1);
        assert_eq!((gens[0].snapshots.len(), gens[0].segments), (2, 6));
        // Listing times: when the uploads finished.
        assert!(gens[0].first_upload < gens[0].last_upload);
        assert_eq!(gens[0].last_segment, Some(wal1[2].0));

        // Metadata: written before the first segment of each WAL, where
        // the previous WAL ended; a round trip keeps it.
        let meta = read_metadata(&r, "k", &w.gen)
            .await
            .unwrap()
            .expect("written before WAL 1's first segment");
        assert_eq!(meta.wal_ends, w.wal_ends);
        assert_eq!((meta.wal_ends.len(), meta.last), (1, Position::start(1)));
        let mut meta = Metadata {
            snapshots: vec![SnapshotEntry {
                index: 0,
                size: 4096,
                compressed_size: 100,
                checksum: "xxh32:00000000".into(),
                covers: Some(32),
            }],
            ..meta
        };
        meta.last = w.cursor.unwrap().pos;
        write_metadata(&r, "k", &meta).await.unwrap();
        assert_eq!(read_metadata(&r, "k", &w.gen).await.unwrap(), Some(meta));

        // A middle segment of WAL 1 goes missing: restore fails and names it.
        let middle = segment_path(&r.prefix, "k", &w.gen, wal1[1].0, wal1[1].1);
        r.delete(&middle).await.unwrap();
        let e = restore_rows(&r, None, tmp.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "{}_* (WAL 1 offset {}) is missing",
                wal1[1].0, wal1[1].0.offset
            )),
            "{e}"
        );
        // So does a point after the segment before it and before the one
        // after it: the missing one may hold commits at or before it.
        let e = restore_rows(&r, Some(points[5].0), tmp.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("may hold commits at or before it"), "{e}");
        // A point whose next segment follows on (the snapshot of WAL 1)
        // still restores.
        let (time, rows, _) = points[4];
        let (_, n) = restore_rows(&r, Some(time), tmp.path()).await.unwrap();
        assert_eq!(n, rows);

        // A new generation (continuity lost) wins for later times only.
        w.gen = new_generation_id(Utc::now());
        w.index = 0;
        w.commit(7);
        let g2 = w.checkpoint_and_snapshot(&r, tmp.path(), false).await;
        let (p, n) = restore_rows(&r, None, tmp.path()).await.unwrap();
        assert_eq!((p.generation.clone(), n), (w.gen.clone(), w.rows));
        let (p, n) = restore_rows(&r, Some(points[4].0), tmp.path())
            .await
            .unwrap();
        assert_ne!(p.generation, w.gen);
        assert_eq!(n, points[4].1);
        assert!(points[4].0 < g2);
        let gens = list_generations(&r, "k").await.unwrap();
        assert_eq!(gens[0].id, w.gen);
        assert_eq!(gens.len(), 2);
    }

    #[tokio::test]
    async fn snapshot_entry_checksum_is_the_lz4_content_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let r = file_replica(&tmp.path().join("replica"));
        let db = tmp.path().join("x.db");
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        let g = new_generation_id(Utc::now());
        let now = Utc::now();
        let e = upload_snapshot(&r, "k", &g, 0, now, &db, tmp.path())
            .await
            .unwrap();
        assert_eq!(e.size, std::fs::metadata(&db).unwrap().len());
        assert!(e.checksum.starts_with("xxh32:") && e.checksum.len() == 14);
        // Corrupting the stored checksum makes the decoder refuse the object.
        let loc = snapshot_path(&r.prefix, "k", &g, 0, now);
        let mut obj = r.get_bytes(&loc).await.unwrap().unwrap().to_vec();
        assert_eq!(obj.len() as u64, e.compressed_size);
        let n = obj.len();
        obj[n - 1] ^= 0xff;
        let mut sink = tempfile::tempfile().unwrap();
        assert!(snapshot::decompress(&obj[..], "x", &mut sink).is_err());
        assert!(upload_segment(&r, "k", &g, Position::start(0), now, &[])
            .await
            .is_err());
        assert!(list_generation_ids(&r, "../x").await.is_err());
    }
}
