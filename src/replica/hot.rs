//! Hot-tier replica layout: WAL generations, their naming, listing and
//! metadata, planning a restore at `T`, and the continuity proof a replay
//! must pass ([`Replay`]). Writing the objects is capture's
//! ([`crate::capture::upload`]); downloading and applying them is
//! restore's ([`crate::restore::replay`]).
//!
//! A *generation* is one unbroken history of a database: snapshots plus every
//! committed WAL frame after them, as long as the shipper never lost track of
//! the WAL (see [`crate::capture::wal::Lost`]). When it does, it starts a new
//! generation with a fresh snapshot. Under the database's key:
//!
//! ```text
//! <prefix>/<key>/generations/<gen>/metadata.json
//! <prefix>/<key>/generations/<gen>/snapshots/<index:016x>_<time:016x>.snapshot.lz4
//! <prefix>/<key>/generations/<gen>/wal/<index:016x>_<offset:016x>_<time:016x>.wal.lz4
//! ```
//!
//! * `<gen>` is 24 lowercase hex digits: `u64::MAX - unix_millis` of its
//!   creation (16) and 32 random bits (8). Names therefore sort **newest
//!   first**, so restore reads the generation list once (one LIST with
//!   delimiter) and looks at the newest candidates first, never at all history.
//! * A snapshot with index `i` is an LZ4 frame (as [`crate::capture::snapshot::compress`]
//!   writes it) of the whole database as of the *start* of WAL file `i`:
//!   replay after it starts at WAL `i`, offset 32.
//! * A WAL segment is an LZ4 frame of committed frames only, starting at byte
//!   `offset` of WAL file `index` (so the first segment of a WAL is at 32).
//!   Its end is `offset` + its decompressed length; the next segment starts
//!   there, or at offset 32 of WAL `index + 1` after SQLite restarted the WAL.
//!   Replay after snapshot `i` starts with segment `(i, 32)`, and WAL `i + 1`
//!   may only follow a segment of WAL `i`: the shipper moves to the next index
//!   only after shipping frames of the current WAL (a WAL restart it did not
//!   cause itself is [`crate::capture::wal::Lost`], i.e. a new generation).
//! * `<time>` is the object's **commit time** in Unix milliseconds (rounded
//!   up): every transaction it holds had committed by then. For a segment it
//!   is taken just after the WAL was read, for a snapshot just after the copy
//!   was complete. Point-in-time restore selects by it, never by the store's
//!   listing time, which S3 gives in whole seconds (an object uploaded at
//!   12:00:00.9 lists as 12:00:00) and which says when the upload finished,
//!   not what the object holds. Names without `_<time>` (written by earlier
//!   versions) fall back to the listing time.
//! * `metadata.json` ([`Metadata`]) describes the generation, and records
//!   where each finished WAL ended (`wal_ends`), which names cannot tell: it
//!   is written before the first segment of every WAL is uploaded (the
//!   generation's first included), so a restore that replays past the end
//!   of a WAL can prove that WAL's last segment is present. Through the
//!   fleet log, the part holding the first frames of a later WAL carries
//!   that WAL's header and where the previous one ended instead
//!   ([`pack::WalOpening`]), and the metadata records them at its next
//!   write; a restore folds them in ([`Metadata::fold_openings`]), and a
//!   part contradicting the metadata fails it. A generation with segments
//!   and no metadata has lost it: restore refuses it. One with its snapshot
//!   alone restores without it.
//!
//! Snapshot checksum: the LZ4 frame's content checksum, which is the xxHash32
//! of the uncompressed database and is stored in the frame's last 4 bytes
//! (we write frames with content checksums on). The uploader
//! ([`crate::capture::upload::upload_snapshot`]) reads it
//! from there and records it as `xxh32:<8 hex>`; restore verifies it for free
//! because the LZ4 decoder checks it. No hash crate is needed.
//!
//! Point in time: a restore at `T` uses the newest generation with a
//! snapshot committed at or before `T`, its newest such snapshot, and every
//! segment of it committed at or before `T`, in `(index, offset)` order.
//!
//! Continuity, proven before a restore succeeds ([`Replay`] and the frame
//! checks of the replay):
//! * the segments are contiguous from where the snapshot ends (each starts
//!   where the previous one ended, by decompressed length); a gap is an error
//!   naming the missing position, never skipped;
//! * each segment's frames continue the previous segment's checksum chain
//!   and salts within one WAL, and the first segment of each WAL continues
//!   the header `metadata.json` recorded for it ([`WalStart`], recorded
//!   before that segment was uploaded, or by the fleet log part holding it;
//!   metadata of earlier versions has none, and those first frames are
//!   checked for their shape only);
//! * replay moves from WAL `i` to WAL `i + 1` only where `metadata.json` (or
//!   the part opening WAL `i + 1`) says WAL `i` ended; a missing or
//!   different end is an error naming the range;
//! * a restore of the latest state (or at a time after every segment
//!   listed) reaches at least the `last` position the metadata recorded as
//!   shipped, read *before* the segments are listed ([`plan_latest`]), so a
//!   stream still shipping cannot make it fail;
//! * a restore at a time before some segment listed stops exactly where
//!   the first such segment starts (or where the metadata says the WAL
//!   ended, if it starts the next WAL): a missing segment before it may
//!   hold commits at or before that time, and restoring without it would be
//!   a silently older state.
//!
//! What cannot be proven: that segments were uploaded after the metadata was
//! last written (a live generation). A missing newest segment of a live
//! generation therefore restores the state before it: a state the database
//! really had, but not the newest.

use chrono::{DateTime, Utc};
use object_store::path::Path as ObjPath;
use object_store::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::replica::layout::{check_key, commit_millis, key_path, random_u32};
use crate::replica::pack::{self, PackIndex};
use crate::replica::storage::Replica;
use crate::{Error, Result};

/// Directory under a key that holds its generations.
pub const GENERATIONS_DIR: &str = "generations";
/// Directory of a generation holding its snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Directory of a generation holding its WAL segments.
pub const WAL_DIR: &str = "wal";
/// Name of a generation's metadata object.
pub const METADATA_FILE: &str = "metadata.json";
/// Suffix of snapshot objects.
pub const SNAPSHOT_SUFFIX: &str = ".snapshot.lz4";
/// Suffix of WAL segment objects.
pub const SEGMENT_SUFFIX: &str = ".wal.lz4";
/// Hex digits of an index or offset in an object name (a whole `u64`).
const HEX_DIGITS: usize = 16;
/// Hex digits of a generation id: 16 for the inverted time, 8 random.
pub const GENERATION_ID_LEN: usize = 24;
/// Where the first frame of a WAL starts, after its 32-byte header: the
/// offset of a WAL's first segment (the WAL format's header size,
/// `capture::wal::WAL_HEADER_SIZE`, asserted equal there).
pub const FIRST_FRAME: u64 = 32;

/// Most bytes of frames read into one segment. Bounds memory per hot
/// database during a burst; a single larger transaction is still read whole
/// (a segment must end at a commit frame). So a segment of at least this
/// many bytes was cut there, with more frames behind it at the time, and a
/// shorter one reached the WAL's committed end (what
/// [`Plan::without_unproven_prefix`] relies on; every version wrote them so).
pub const MAX_SEGMENT_BYTES: u64 = 16 << 20;

/// A place in the stream of WAL files: WAL file number `index` (counted by
/// litefleet, +1 each time SQLite restarts the WAL) and a byte offset in it.
/// Offsets are file offsets, so the first frame is at 32. Ordered by
/// `(index, offset)`; displays as `<index:016x>_<offset:016x>`, the segment
/// object name stem.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Position {
    pub index: u64,
    pub offset: u64,
}

impl Position {
    /// The first frame of WAL `index`.
    pub fn start(index: u64) -> Position {
        Position {
            index,
            offset: FIRST_FRAME,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}_{:016x}", self.index, self.offset)
    }
}

/// A generation id: newest sorts first. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GenerationId {
    id: String,
    created: DateTime<Utc>,
}

impl GenerationId {
    /// Parses a generation directory name; `None` for anything else.
    pub fn parse(s: &str) -> Option<GenerationId> {
        if s.len() != GENERATION_ID_LEN
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let inverted = u64::from_str_radix(&s[..HEX_DIGITS], 16).ok()?;
        let millis = i64::try_from(u64::MAX - inverted).ok()?;
        let created = DateTime::from_timestamp_millis(millis)?;
        Some(GenerationId {
            id: s.to_string(),
            created,
        })
    }

    /// When the generation was created (millisecond precision, host clock).
    pub fn created(&self) -> DateTime<Utc> {
        self.created
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Display for GenerationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

impl TryFrom<String> for GenerationId {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<GenerationId, String> {
        GenerationId::parse(&s).ok_or_else(|| format!("invalid generation id {s:?}"))
    }
}

impl From<GenerationId> for String {
    fn from(g: GenerationId) -> String {
        g.id
    }
}

/// A new generation id for a generation created at `now`.
pub fn new_generation_id(now: DateTime<Utc>) -> GenerationId {
    let millis = now.timestamp_millis().max(0) as u64;
    let id = format!("{:016x}{:08x}", u64::MAX - millis, random_u32());
    // Millisecond precision, exactly what `parse` will read back.
    let created = DateTime::from_timestamp_millis(millis as i64).unwrap_or(now);
    GenerationId { id, created }
}

/// A new generation id for a generation created at `now` that sorts before
/// (is newer than) `newest`, the newest generation already in the replica:
/// if this host's clock is behind the one that created `newest`, the id is
/// `newest`'s time plus 1 ms, so restore of the latest state never picks a
/// stale generation because of a clock.
pub fn new_generation_id_after(now: DateTime<Utc>, newest: Option<&GenerationId>) -> GenerationId {
    let floor = newest.map(|g| g.created() + chrono::Duration::milliseconds(1));
    new_generation_id(floor.map_or(now, |f| now.max(f)))
}

/// `<prefix>/<key>/generations`
pub fn generations_dir(prefix: &ObjPath, key: &str) -> ObjPath {
    key_path(prefix, key).join(GENERATIONS_DIR)
}

/// `<prefix>/<key>/generations/<gen>`
pub fn generation_dir(prefix: &ObjPath, key: &str, gen: &GenerationId) -> ObjPath {
    generations_dir(prefix, key).join(gen.as_str())
}

/// `<prefix>/<key>/generations/<gen>/snapshots/<index:016x>_<time:016x>.snapshot.lz4`
/// for a snapshot whose every transaction had committed at `committed`.
pub fn snapshot_path(
    prefix: &ObjPath,
    key: &str,
    gen: &GenerationId,
    index: u64,
    committed: DateTime<Utc>,
) -> ObjPath {
    let t = commit_millis(committed);
    generation_dir(prefix, key, gen)
        .join(SNAPSHOTS_DIR)
        .join(format!("{index:016x}_{t:016x}{SNAPSHOT_SUFFIX}").as_str())
}

/// `<prefix>/<key>/generations/<gen>/wal/<index:016x>_<offset:016x>_<time:016x>.wal.lz4`
/// for frames that had all committed at `committed`.
pub fn segment_path(
    prefix: &ObjPath,
    key: &str,
    gen: &GenerationId,
    pos: Position,
    committed: DateTime<Utc>,
) -> ObjPath {
    let t = commit_millis(committed);
    generation_dir(prefix, key, gen)
        .join(WAL_DIR)
        .join(format!("{pos}_{t:016x}{SEGMENT_SUFFIX}").as_str())
}

/// `<prefix>/<key>/generations/<gen>/metadata.json`
pub fn metadata_path(prefix: &ObjPath, key: &str, gen: &GenerationId) -> ObjPath {
    generation_dir(prefix, key, gen).join(METADATA_FILE)
}

fn parse_hex16(s: &str) -> Option<u64> {
    if s.len() != HEX_DIGITS
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// `<time:016x>` of a name: a commit time in Unix milliseconds.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(i64::try_from(parse_hex16(s)?).ok()?)
}

/// The index and commit time in a snapshot object name
/// (`<index:016x>_<time:016x>.snapshot.lz4`, or `<index:016x>.snapshot.lz4`
/// of earlier versions, without a time).
pub fn parse_snapshot_name_time(name: &str) -> Option<(u64, Option<DateTime<Utc>>)> {
    let stem = name.strip_suffix(SNAPSHOT_SUFFIX)?;
    match stem.split_once('_') {
        None => Some((parse_hex16(stem)?, None)),
        Some((i, t)) => Some((parse_hex16(i)?, Some(parse_time(t)?))),
    }
}

/// The index in a snapshot object name; see [`parse_snapshot_name_time`].
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    parse_snapshot_name_time(name).map(|(i, _)| i)
}

/// The position and commit time in a segment object name
/// (`<index:016x>_<offset:016x>_<time:016x>.wal.lz4`, or without `_<time>`
/// as earlier versions wrote it). Offsets before the first frame (32) are
/// rejected.
pub fn parse_segment_name_time(name: &str) -> Option<(Position, Option<DateTime<Utc>>)> {
    let mut parts = name.strip_suffix(SEGMENT_SUFFIX)?.split('_');
    let pos = Position {
        index: parse_hex16(parts.next()?)?,
        offset: parse_hex16(parts.next()?)?,
    };
    let time = match parts.next() {
        None => None,
        Some(t) => Some(parse_time(t)?),
    };
    if parts.next().is_some() || pos.offset < FIRST_FRAME {
        return None;
    }
    Some((pos, time))
}

/// The position in a segment object name; see [`parse_segment_name_time`].
pub fn parse_segment_name(name: &str) -> Option<Position> {
    parse_segment_name_time(name).map(|(p, _)| p)
}

/// A known object of a generation (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationObject {
    Snapshot(u64),
    Segment(Position),
    /// A consolidated pack of parts ([`crate::replica::pack`]), by the
    /// position of its first part.
    Pack(Position),
    Metadata,
}

/// Parses a path relative to a generation directory (`snapshots/<name>`,
/// `wal/<name>` or `metadata.json`); `None` for anything else.
pub fn parse_generation_object(rel: &str) -> Option<GenerationObject> {
    if rel == METADATA_FILE {
        return Some(GenerationObject::Metadata);
    }
    match rel.split_once('/')? {
        (SNAPSHOTS_DIR, name) => parse_snapshot_name(name).map(GenerationObject::Snapshot),
        (WAL_DIR, name) => parse_segment_name(name)
            .map(GenerationObject::Segment)
            .or_else(|| pack_position(name).map(GenerationObject::Pack)),
        _ => None,
    }
}

/// One snapshot as recorded in [`Metadata`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub index: u64,
    /// Bytes of the uncompressed database.
    pub size: u64,
    /// Bytes of the stored LZ4 object.
    pub compressed_size: u64,
    /// `xxh32:<8 hex>`: the LZ4 frame content checksum of the database.
    pub checksum: String,
    /// Where in WAL `index` the snapshot's state is: it holds every frame
    /// committed before this offset. The stream ships that WAL from its
    /// first frame anyway (segments chain from the WAL's header), so a
    /// replay applies only frames from here on: replaying a prefix of the
    /// frames before it over the snapshot would lay older pages over newer
    /// ones (black-box probe: a point-in-time restore between two parts of
    /// that WAL gave a state the database never had, with exit 0). `None`
    /// in metadata of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers: Option<u64>,
}

/// Largest `metadata.json` read; a bigger one is refused before it is
/// downloaded. Ours grows by one `wal_ends` and one `wal_starts` entry per
/// WAL the generation ships (under 300 bytes), and a stream starts a new
/// generation after [`MAX_GENERATION_WALS`] of them, so what we write stays
/// under a quarter of this (`the_largest_metadata_we_write_is_read`).
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

/// WALs one generation ships at most: a stream whose generation has
/// shipped this many starts a new one (as at `snapshot-interval`, see
/// [`crate::capture::ship`]). It bounds `metadata.json`, which is written
/// again at each WAL restart: a writer that fills `checkpoint-pages` every
/// second would otherwise upload a few more MB of it with every WAL, all
/// day. 30,000 is at most 9 MB of metadata, eight hours of such a writer.
pub const MAX_GENERATION_WALS: usize = 30_000;

/// `metadata.json` of a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub generation: GenerationId,
    pub page_size: u32,
    #[serde(with = "crate::rfc3339")]
    pub created: DateTime<Utc>,
    /// Where the generation's history starts (start of the first snapshot's WAL).
    pub first: Position,
    /// End of the last segment shipped when this was written.
    pub last: Position,
    pub snapshots: Vec<SnapshotEntry>,
    /// Where each finished WAL ended (the end of its last segment), in order:
    /// what names alone cannot tell (a missing last segment of a WAL).
    #[serde(default)]
    pub wal_ends: Vec<Position>,
    /// The header of each WAL the generation ships ([`WalStart`]), recorded
    /// before the first segment of that WAL. `None` in metadata written by
    /// earlier versions, whose WALs' first frames cannot be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_starts: Option<Vec<WalStart>>,
    /// Parts of this generation may be in the fleet log only
    /// ([`crate::replica::pack`]): a restore must read the log too. Written
    /// `true` while the generation streams through the log, `false` once
    /// its stream ended with everything consolidated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logged: bool,
    /// When it was written, by the writer's clock, just before its upload:
    /// everything `last` records had committed by then. A restore that
    /// finds a cold snapshot whose copy began later knows that copy holds
    /// all of it ([`Plan::recorded_after`]). `None` in metadata written by
    /// earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<DateTime<Utc>>,
    /// The key the generation was shipped for. A generation whose metadata
    /// names another key (copied or moved under this one) is refused by
    /// [`read_metadata`] (black-box probe: another database's generation
    /// copied under a key was restored as that key's, exit 0). `None` in
    /// metadata written by earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What the header of WAL `index` says about its frames: the salts every
/// frame carries and the checksum that seeds the first frame's, in the
/// chain's byte order. Segments hold frames only; with this a restore checks
/// the first frames of every WAL too, so a segment from another WAL (another
/// database, an earlier life of this one) cannot start a WAL unnoticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalStart {
    pub index: u64,
    pub salt: [u32; 2],
    pub checksum: [u32; 2],
    pub big_endian: bool,
}

impl Metadata {
    /// Records the header of WAL `start.index` (once).
    pub fn record_wal_start(&mut self, start: WalStart) {
        let starts = self.wal_starts.get_or_insert_with(Vec::new);
        if !starts.iter().any(|s| s.index == start.index) {
            starts.push(start);
        }
    }

    /// The header recorded for WAL `index`, if any.
    pub fn wal_start(&self, index: u64) -> Option<WalStart> {
        self.wal_starts
            .as_ref()?
            .iter()
            .find(|s| s.index == index)
            .copied()
    }

    /// Where WAL `index` ended, if that is recorded.
    pub fn wal_end(&self, index: u64) -> Option<Position> {
        self.wal_ends.iter().find(|p| p.index == index).copied()
    }

    /// What a fleet log part holding the first frames of WAL `index`
    /// records of it ([`pack::WalOpening`]; read back by
    /// [`Metadata::fold_openings`]): `None` without a header recorded for
    /// that WAL (a stream records it once the WAL is read).
    pub fn opening(&self, index: u64) -> Option<pack::WalOpening> {
        let start = self.wal_start(index)?;
        Some(pack::WalOpening {
            salt: start.salt,
            checksum: start.checksum,
            big_endian: start.big_endian,
            previous_end: index
                .checked_sub(1)
                .and_then(|prev| self.wal_end(prev))
                .map(|p| p.offset),
        })
    }

    /// Adds what the parts among `segments` that open a WAL record of it
    /// ([`pack::WalOpening`]: its header, where the previous WAL ended) to
    /// what this metadata records, as if it had been written after them.
    /// A stream writing through the fleet log records a WAL restart there
    /// and in this metadata only at its next write. A record that
    /// contradicts the metadata's, or another part's, fails: one of them
    /// is not this generation's.
    pub fn fold_openings<'a>(
        &mut self,
        key: &str,
        segments: impl IntoIterator<Item = &'a SegmentObject>,
    ) -> Result<()> {
        let generation = self.generation.clone();
        let what = || format!("generation {generation} of {key:?}");
        for seg in segments {
            let Some(o) = seg.part.as_ref().and_then(|p| p.opens) else {
                continue;
            };
            let index = seg.pos.index;
            let start = WalStart {
                index,
                salt: o.salt,
                checksum: o.checksum,
                big_endian: o.big_endian,
            };
            match self.wal_start(index) {
                Some(known) if known != start => {
                    return Err(Error::invalid(
                        what(),
                        format!(
                            "the header of WAL {index} recorded by {} differs from the one                              recorded before; refusing to restore",
                            seg.location
                        ),
                    ))
                }
                Some(_) => {}
                None => self.record_wal_start(start),
            }
            let Some(offset) = o.previous_end else {
                continue;
            };
            let end = Position {
                index: index.saturating_sub(1),
                offset,
            };
            match self.wal_end(end.index) {
                Some(known) if known != end => {
                    return Err(Error::invalid(
                        what(),
                        format!(
                            "{} records that WAL {} ended at {}, where {} was recorded before;                              refusing to restore",
                            seg.location,
                            end.index,
                            describe(end),
                            describe(known)
                        ),
                    ))
                }
                Some(_) => {}
                None => {
                    self.wal_ends.push(end);
                    self.wal_ends.sort();
                }
            }
        }
        Ok(())
    }
}

/// How a segment continues a replay ([`Replay::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continues {
    /// The next frames of the WAL being replayed: its checksum chain goes on.
    SameWal,
    /// The first frames of a WAL: their chain starts from the WAL's header,
    /// when the metadata recorded it (`None`: earlier versions).
    WalStart(Option<WalStart>),
}

/// A snapshot object found in the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotObject {
    pub index: u64,
    pub location: ObjPath,
    /// Listing time (when the upload finished, at the store's precision).
    pub uploaded: DateTime<Utc>,
    /// Commit time from the name (see the module docs); `uploaded` for names
    /// of earlier versions.
    pub time: DateTime<Utc>,
    pub size: u64,
}

/// Where a segment lies inside a pack ([`crate::replica::pack`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRange {
    /// Its bytes in the pack object.
    pub range: std::ops::Range<u64>,
    /// The pack holds this database's parts only (a consolidated pack): a
    /// restore downloads it whole, once, rather than each part by range.
    pub whole: bool,
    /// The WAL this part opens, as its pack's index records it
    /// ([`pack::WalOpening`]; folded into the metadata by
    /// [`Metadata::fold_openings`]).
    pub opens: Option<pack::WalOpening>,
}

/// A WAL segment found in the replica: an object of its own, or a part of
/// a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentObject {
    pub pos: Position,
    pub location: ObjPath,
    /// Listing time (when the upload finished, at the store's precision).
    pub uploaded: DateTime<Utc>,
    /// Commit time from the name (see the module docs); `uploaded` for names
    /// of earlier versions.
    pub time: DateTime<Utc>,
    pub size: u64,
    /// Inside a pack: where (`location` is the pack). `None`: the whole
    /// object is the segment.
    pub part: Option<PartRange>,
}

/// The objects of one generation, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationListing {
    pub id: GenerationId,
    pub snapshots: Vec<SnapshotObject>,
    pub segments: Vec<SegmentObject>,
}

/// A summary of one generation, for `litefleet generations` / `snapshots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationInfo {
    pub id: GenerationId,
    pub created: DateTime<Utc>,
    /// Oldest index first.
    pub snapshots: Vec<SnapshotObject>,
    pub segments: usize,
    /// Start of the last segment, if any.
    pub last_segment: Option<Position>,
    /// Earliest and latest `last_modified` of its snapshots and segments.
    pub first_upload: Option<DateTime<Utc>>,
    pub last_upload: Option<DateTime<Utc>>,
}

/// What restore will read: a snapshot and the segments after it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub generation: GenerationId,
    pub snapshot: SnapshotObject,
    pub segments: Vec<SegmentObject>,
    /// The restore time the plan was made for (`None`: latest).
    at: Option<DateTime<Utc>>,
    /// Segments from the snapshot's WAL on that were committed after `at`:
    /// not replayed, only named in gap errors ("committed after the restore
    /// time"). Empty when `at` is `None`.
    late: Vec<SegmentObject>,
    /// The metadata as read *before* the segments were listed
    /// ([`plan_latest`]): everything it records as shipped was uploaded
    /// before it was written, so the listing must hold it. (Read after the
    /// listing, a live stream's newer metadata would name segments the
    /// listing could not see.) Checked when no segment committed after the
    /// restore time was listed ([`Replay::finish`]).
    recorded: Option<Metadata>,
}

impl Plan {
    /// The header the generation's metadata (as the plan read it) recorded
    /// for WAL `index`, if it did.
    pub fn wal_start(&self, index: u64) -> Option<WalStart> {
        self.recorded.as_ref()?.wal_start(index)
    }

    /// The plan without a prefix of its snapshot's WAL that may end before
    /// the snapshot's state, when the metadata does not record where that
    /// state is (`covers`, missing in generations of earlier versions).
    ///
    /// A stream ships its snapshot's WAL from the first frame, and a WAL
    /// longer than [`MAX_SEGMENT_BYTES`] goes in parts with later commit
    /// times. Replaying only the first parts over the snapshot lays older
    /// pages over newer ones (black-box probe E19: a replica written by an
    /// earlier version restored, at a time between two parts, a state the
    /// database never had, exit 0). Without `covers`, the end of the first
    /// part shorter than [`MAX_SEGMENT_BYTES`] is the first place known to
    /// be at or after the snapshot's state: it ended at the WAL's committed
    /// end when it was read, after the snapshot. So segments that are all
    /// such cut parts (their lengths read from the next part's offset) are
    /// left out, and the snapshot's own state is restored, the newest
    /// provable at or before the time. A part whose length the listing
    /// cannot tell (the last one) is checked by the replay
    /// ([`Plan::unproven_prefix`]).
    pub fn without_unproven_prefix(mut self) -> Plan {
        if self.recorded_snapshot().and_then(|e| e.covers).is_some() {
            return self;
        }
        let index = self.snapshot.index;
        if self.segments.iter().any(|s| s.pos.index != index) {
            // A later WAL: this one was shipped to its end, past the state.
            return self;
        }
        let mut chain: Vec<Position> = self
            .segments
            .iter()
            .chain(&self.late)
            .filter(|s| s.pos.index == index)
            .map(|s| s.pos)
            .collect();
        chain.sort();
        let cut = |pos: Position| {
            chain
                .iter()
                .find(|p| **p > pos)
                .is_some_and(|next| next.offset - pos.offset >= MAX_SEGMENT_BYTES)
        };
        if !self.segments.is_empty() && self.segments.iter().all(|s| cut(s.pos)) {
            let mut left_out = std::mem::take(&mut self.segments);
            left_out.append(&mut self.late);
            self.late = left_out;
        }
        self
    }

    /// Whether a replay that applied segments of lengths `applied` (in
    /// bytes of frames, in order, from the snapshot's WAL on) may have
    /// stopped before the snapshot's state: no `covers` recorded, and every
    /// one was a cut part of the snapshot's own WAL (see
    /// [`Plan::without_unproven_prefix`]). A latest restore too: a stream
    /// stopped mid catch-up (killed) leaves its generation's shipped WAL
    /// inside those parts (black-box probe G19: the latest restore of such
    /// a generation returned a state the database never had, exit 0).
    pub fn unproven_prefix(&self, applied: &[(Position, u64)]) -> bool {
        self.recorded_snapshot().and_then(|e| e.covers).is_none()
            && !applied.is_empty()
            && applied
                .iter()
                .all(|(pos, len)| pos.index == self.snapshot.index && *len >= MAX_SEGMENT_BYTES)
    }

    /// What the generation's metadata recorded of the plan's snapshot when
    /// it was uploaded (its size and content checksum), if it did.
    pub fn recorded_snapshot(&self) -> Option<&SnapshotEntry> {
        self.recorded
            .as_ref()?
            .snapshots
            .iter()
            .find(|e| e.index == self.snapshot.index)
    }

    /// Whether the generation's metadata recorded WAL frames shipped (past
    /// the plan's snapshot) that may have committed at or after `t`: it was
    /// written at or after `t`, or says not when. A cold snapshot whose copy
    /// began at `t` then holds a newer state than the plan's objects show
    /// only if those objects hold everything recorded, which only a replay
    /// proves ([`Replay::finish`]): a missing segment would make the cold
    /// copy look newer than the hot tier's real state.
    pub fn recorded_after(&self, t: DateTime<Utc>) -> bool {
        self.recorded.as_ref().is_some_and(|m| {
            m.last > Position::start(self.snapshot.index) && m.written.is_none_or(|w| w >= t)
        })
    }

    /// The state the plan restores, as a commit time: the latest commit time
    /// of its snapshot and segments (what [`RestorePoint::time`] will be if
    /// replay succeeds). Everything restored had committed by then.
    pub fn time(&self) -> DateTime<Utc> {
        self.segments
            .iter()
            .map(|s| s.time)
            .fold(self.snapshot.time, DateTime::max)
    }
}

/// What [`crate::restore::replay::restore_plan`] (or
/// [`crate::restore::replay::restore_generation`]) restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePoint {
    pub generation: GenerationId,
    pub snapshot_index: u64,
    /// End of the last segment replayed (start of the snapshot's WAL if none).
    pub position: Position,
    /// Commit time of the newest object used (snapshot or segment).
    pub time: DateTime<Utc>,
    pub segments: usize,
    /// Size of the restored database file.
    pub bytes: u64,
}

fn snapshot_object(meta: ObjectMeta) -> Option<SnapshotObject> {
    let (index, time) = parse_snapshot_name_time(meta.location.filename()?)?;
    Some(SnapshotObject {
        index,
        uploaded: meta.last_modified,
        time: time.unwrap_or(meta.last_modified),
        size: meta.size,
        location: meta.location,
    })
}

fn segment_object(meta: ObjectMeta) -> Option<SegmentObject> {
    let (pos, time) = parse_segment_name_time(meta.location.filename()?)?;
    Some(SegmentObject {
        pos,
        uploaded: meta.last_modified,
        time: time.unwrap_or(meta.last_modified),
        size: meta.size,
        location: meta.location,
        part: None,
    })
}

/// The generations of `key`, newest first; names below
/// `<key>/generations/` that are not generation ids are ignored.
///
/// Found from every object below `<key>/generations/`, not from a
/// delimiter listing's "directories": a store may name a directory there
/// only when it holds an object directly (s3rver does), and a generation
/// that had lost its `metadata.json` then went unseen, its segments and
/// snapshots with it, and restores returned an older generation with exit
/// 0 (black-box probe Q23) where the lost metadata must refuse them. One
/// LIST request per 1,000 objects of the key's generations.
pub async fn list_generation_ids(replica: &Replica, key: &str) -> Result<Vec<GenerationId>> {
    check_key(key)?;
    let dir = generations_dir(&replica.prefix, key);
    let mut ids = std::collections::BTreeSet::new();
    let mut listing = replica.list_all(&dir);
    while let Some(m) = futures::TryStreamExt::try_next(&mut listing).await? {
        let id = m
            .location
            .prefix_match(&dir)
            .and_then(|mut parts| parts.next())
            .and_then(|part| GenerationId::parse(part.as_ref()));
        ids.extend(id);
    }
    Ok(ids.into_iter().collect())
}

/// The snapshots of one generation, oldest index first.
pub async fn list_snapshots(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
) -> Result<Vec<SnapshotObject>> {
    let dir = generation_dir(&replica.prefix, key, gen).join(SNAPSHOTS_DIR);
    let mut v: Vec<SnapshotObject> = replica
        .list_dir(&dir)
        .await?
        .into_iter()
        .filter_map(snapshot_object)
        .collect();
    v.sort_by_key(|s| s.index);
    Ok(v)
}

/// The WAL segments of one generation, in `(index, offset)` order: segment
/// objects and the parts of its consolidated packs (one GET or two per pack
/// for its index). Not the fleet log's parts: see [`plan_latest`].
pub async fn list_segments(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
) -> Result<Vec<SegmentObject>> {
    let dir = generation_dir(&replica.prefix, key, gen).join(WAL_DIR);
    let mut v = Vec::new();
    let mut packs = Vec::new();
    for meta in replica.list_dir(&dir).await? {
        let is_pack = meta.location.filename().and_then(pack_position).is_some();
        if is_pack {
            packs.push(meta);
        } else if let Some(s) = segment_object(meta) {
            v.push(s);
        }
    }
    // A pack gone meanwhile: retention deleted the generation.
    v.extend(
        pack_segments(replica, &packs, key, gen, true)
            .await?
            .into_iter()
            .flatten()
            .flatten(),
    );
    Ok(dedup_segments(v))
}

/// `<prefix>/<key>/generations/<gen>/wal/<index>_<offset>_<time>_<random>.pack`:
/// a new consolidated pack of `key`'s generation `gen` whose first part is
/// at `first` and newest part committed at `newest` (see
/// [`crate::replica::pack`]).
pub fn pack_path(
    prefix: &ObjPath,
    key: &str,
    gen: &GenerationId,
    first: Position,
    newest: DateTime<Utc>,
) -> ObjPath {
    generation_dir(prefix, key, gen)
        .join(WAL_DIR)
        .join(pack::pack_name(first.index, first.offset, newest).as_str())
}

/// The position of a consolidated pack's first part, from its name.
fn pack_position(name: &str) -> Option<Position> {
    pack::parse_pack_name(name).map(|(index, offset)| Position { index, offset })
}

/// Pack index reads in flight while a restore lists a generation's packs or
/// looks through the fleet log.
const INDEX_READS: usize = 16;

/// The parts of `key`'s generation `gen` in `index` (of the pack `meta`),
/// as segments. `whole`: the pack holds one database's parts, so a restore
/// downloads it once rather than by range.
fn segments_of(
    meta: &ObjectMeta,
    index: &PackIndex,
    key: &str,
    gen: &GenerationId,
    whole: bool,
) -> Vec<SegmentObject> {
    index
        .parts
        .iter()
        .filter(|(p, _)| p.key == key && p.generation == gen.as_str())
        .map(|(p, range)| SegmentObject {
            pos: Position {
                index: p.index,
                offset: p.offset,
            },
            location: meta.location.clone(),
            uploaded: meta.last_modified,
            time: p.commit_time(),
            size: p.len,
            part: Some(PartRange {
                range: range.clone(),
                whole,
                opens: p.opens,
            }),
        })
        .collect()
}

/// The parts of `key`'s generation `gen` in each of the packs `metas`
/// ([`segments_of`]), their indexes read [`INDEX_READS`] at a time; `None`
/// for a pack gone before its index was read.
async fn pack_segments(
    replica: &Replica,
    metas: &[ObjectMeta],
    key: &str,
    gen: &GenerationId,
    whole: bool,
) -> Result<Vec<Option<Vec<SegmentObject>>>> {
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(metas.iter().cloned())
        .map(|meta| async move {
            Ok::<_, Error>(
                pack::read_index_kept(replica, &meta)
                    .await?
                    .map(|i| segments_of(&meta, &i, key, gen, whole)),
            )
        })
        .buffered(INDEX_READS)
        .try_collect()
        .await
}

/// Every part of `key`'s generation `gen` in the fleet log objects `log`,
/// as segments. `Ok(None)` when a listed log object was gone before its
/// index was read: it was consolidated meanwhile, and the caller must list
/// again (the consolidated pack may have been written after it listed the
/// generation).
async fn log_segments(
    replica: &Replica,
    log: &[ObjectMeta],
    key: &str,
    gen: &GenerationId,
) -> Result<Option<Vec<SegmentObject>>> {
    let reads = pack_segments(replica, log, key, gen, false).await?;
    Ok(reads
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().flatten().collect()))
}

/// One listing of generation `gen`'s segments: its own objects, and its
/// parts in the fleet log when `logged`, sorted and deduplicated. The log
/// is listed first: a part consolidated after that is in a log object
/// listed, or (that object gone when its index is read) `Ok(None)`, and
/// the caller lists again.
async fn all_segments(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
    logged: bool,
) -> Result<Option<Vec<SegmentObject>>> {
    let log = if logged {
        pack::list_log(replica).await?
    } else {
        Vec::new()
    };
    let mut segments = list_segments(replica, key, gen).await?;
    Ok(log_segments(replica, &log, key, gen).await?.map(|parts| {
        segments.extend(parts);
        dedup_segments(segments)
    }))
}

/// Sorted by position, one segment per position: a part can be in a log
/// object and in a consolidated pack at once, with the same bytes; the
/// consolidated copy (or a segment object) is kept.
fn dedup_segments(mut v: Vec<SegmentObject>) -> Vec<SegmentObject> {
    let rank = |s: &SegmentObject| match &s.part {
        None => 0,
        Some(p) if p.whole => 1,
        Some(_) => 2,
    };
    v.sort_by(|a, b| a.pos.cmp(&b.pos).then(rank(a).cmp(&rank(b))));
    v.dedup_by(|later, kept| later.pos == kept.pos);
    v
}

/// One generation's snapshots and segments (two LISTs).
pub async fn list_generation(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
) -> Result<GenerationListing> {
    let (snapshots, segments) = futures::try_join!(
        list_snapshots(replica, key, gen),
        list_segments(replica, key, gen)
    )?;
    Ok(GenerationListing {
        id: gen.clone(),
        snapshots,
        segments,
    })
}

/// Every generation of `key`, newest first, summarized.
pub async fn list_generations(replica: &Replica, key: &str) -> Result<Vec<GenerationInfo>> {
    let mut out = Vec::new();
    // Listed once, for the generations whose metadata says their segments
    // may be in the fleet log (black-box probe: a generation streaming, or
    // left by a crash, showed `wal segments 0` where a restore replayed
    // 1,274 segments from the log).
    let mut log: Option<Vec<ObjectMeta>> = None;
    for id in list_generation_ids(replica, key).await? {
        let mut l = list_generation(replica, key, &id).await?;
        let logged = read_metadata(replica, key, &id)
            .await?
            .is_none_or(|m| m.logged);
        if logged {
            if log.is_none() {
                log = Some(pack::list_log(replica).await?);
            }
            let listed = log.as_deref().unwrap_or_default();
            // `None`: the log changed while it was read; the objects of the
            // generation's own directory are shown.
            if let Some(parts) = log_segments(replica, listed, key, &id).await? {
                l.segments.extend(parts);
                l.segments = dedup_segments(std::mem::take(&mut l.segments));
            }
        }
        let times = l
            .snapshots
            .iter()
            .map(|s| s.uploaded)
            .chain(l.segments.iter().map(|s| s.uploaded));
        let first_upload = times.clone().min();
        let last_upload = times.max();
        out.push(GenerationInfo {
            created: id.created(),
            id,
            segments: l.segments.len(),
            last_segment: l.segments.last().map(|s| s.pos),
            snapshots: l.snapshots,
            first_upload,
            last_upload,
        });
    }
    Ok(out)
}

/// Where the next segment may start during replay.
#[derive(Debug, Clone, Copy)]
struct Expect {
    index: u64,
    /// Known end of the previous segment of `index` (`None` while planning,
    /// before lengths are known).
    offset: Option<u64>,
}

/// Why a segment cannot follow: the position that should have come first.
enum Break {
    Missing(Position),
    Overlaps(Position),
}

fn check_next(e: Expect, pos: Position) -> std::result::Result<(), Break> {
    if pos.index == e.index {
        match e.offset {
            Some(o) if pos.offset == o => Ok(()),
            Some(o) if pos.offset < o => Err(Break::Overlaps(Position {
                index: e.index,
                offset: o,
            })),
            Some(o) => Err(Break::Missing(Position {
                index: e.index,
                offset: o,
            })),
            None => Ok(()),
        }
    } else if pos.index == e.index + 1 && pos.offset == FIRST_FRAME {
        // Where WAL `index` ended is proven during replay, from `wal_ends`.
        Ok(())
    } else {
        Err(Break::Missing(Position::start(e.index + 1)))
    }
}

fn describe(p: Position) -> String {
    format!("{p}_* (WAL {} offset {})", p.index, p.offset)
}

/// `others`: segments not in the plan; one at the missing position was
/// committed after `at` and is named as such.
fn gap_error(
    key: &str,
    gen: &GenerationId,
    others: &[SegmentObject],
    at: Option<DateTime<Utc>>,
    brk: Break,
    found: &SegmentObject,
) -> Error {
    let what = format!("generation {gen} of {key:?}");
    let reason = match brk {
        Break::Overlaps(end) => format!(
            "WAL segment {} overlaps the previous segment, which ends at {}; refusing to restore",
            describe(found.pos),
            describe(end)
        ),
        Break::Missing(missing) => {
            let mut r = format!(
                "WAL segment {} is missing (the next segment present is {}); refusing to restore past a gap",
                describe(missing),
                describe(found.pos)
            );
            if let (Some(t), Some(late)) = (at, others.iter().find(|s| s.pos == missing)) {
                r.push_str(&format!(
                    "; it holds commits up to {}, after the restore time {}: restore at or after that time, \
                     or before {}",
                    late.time.to_rfc3339(),
                    t.to_rfc3339(),
                    found.time.to_rfc3339()
                ));
            } else if let Some(t) = at.filter(|t| found.time > *t) {
                r.push_str(&format!(
                    "; the next segment present holds commits up to {}, after the restore time {}, \
                     but the missing one may hold commits at or before it",
                    found.time.to_rfc3339(),
                    t.to_rfc3339()
                ));
            }
            r
        }
    };
    Error::invalid(what, reason)
}

/// Replay reached `end` in WAL `end.index` and the next segment is in the
/// next WAL: the metadata must record that WAL `end.index` ended exactly
/// there, or segments at its end may be missing.
fn check_wal_end(key: &str, plan: &Plan, meta: Option<&Metadata>, end: Position) -> Result<()> {
    let what = || format!("generation {} of {key:?}", plan.generation);
    let Some(m) = meta else {
        return Err(Error::invalid(
            what(),
            format!(
                "metadata.json is missing, so nothing proves that WAL {} ended at {}; refusing to replay into WAL {}",
                end.index,
                describe(end),
                end.index + 1
            ),
        ));
    };
    match m.wal_end(end.index) {
        Some(recorded) if recorded == end => Ok(()),
        Some(recorded) => Err(Error::invalid(
            what(),
            format!(
                "WAL {} ended at {} (metadata.json), but the segments present end at {}: \
                 WAL segment(s) from {} to {} are missing; refusing to restore past a gap",
                end.index,
                describe(recorded),
                describe(end),
                describe(end),
                describe(recorded)
            ),
        )),
        None => Err(Error::invalid(
            what(),
            format!(
                "metadata.json does not record where WAL {} ended (segments present end at {}); \
                 refusing to replay into WAL {}",
                end.index,
                describe(end),
                end.index + 1
            ),
        )),
    }
}

/// Chooses what to restore from one generation at `at` (`None`: latest): its
/// newest snapshot committed at or before `at`, and every segment after that
/// snapshot committed at or before `at`, in order. `Ok(None)` when no snapshot
/// qualifies. Fails on gaps visible from names alone (a WAL whose first
/// segment is not at offset 32, a skipped WAL index); gaps inside a WAL are
/// found during replay, when segment lengths are known.
pub fn plan(
    listing: &GenerationListing,
    key: &str,
    at: Option<DateTime<Utc>>,
) -> Result<Option<Plan>> {
    let ok = |t: DateTime<Utc>| at.is_none_or(|a| t <= a);
    let Some(snapshot) = listing
        .snapshots
        .iter()
        .filter(|s| ok(s.time))
        .max_by_key(|s| (s.index, s.time))
        .cloned()
    else {
        return Ok(None);
    };
    let (mut segments, late): (Vec<SegmentObject>, Vec<SegmentObject>) = listing
        .segments
        .iter()
        .filter(|s| s.pos.index >= snapshot.index)
        .cloned()
        .partition(|s| ok(s.time));
    segments.sort_by_key(|s| s.pos);
    // Commit times grow with positions; a segment committed after `at`
    // before one committed at or before it (a clock that went back) would
    // be skipped in the middle of the history: a gap, named as such.
    if let Some(first_late) = late.iter().min_by_key(|s| s.pos) {
        if let Some(after) = segments.iter().find(|s| s.pos > first_late.pos) {
            return Err(gap_error(
                key,
                &listing.id,
                &late,
                at,
                Break::Missing(first_late.pos),
                after,
            ));
        }
    }
    if at.is_some() {
        times_grow(key, &listing.id, &snapshot, &segments, &late)?;
    }
    let mut e = Expect {
        index: snapshot.index,
        offset: Some(FIRST_FRAME),
    };
    for s in &segments {
        check_next(e, s.pos).map_err(|b| gap_error(key, &listing.id, &late, at, b, s))?;
        e = Expect {
            index: s.pos.index,
            offset: None,
        };
    }
    Ok(Some(Plan {
        generation: listing.id.clone(),
        snapshot,
        segments,
        at,
        late,
        recorded: None,
    }))
}

/// For a restore at a point in time: the commit times of the segments
/// (`segments` and `late`, from `snapshot`'s WAL on) must not go down as
/// positions go up, since which commits were at or before the time is read
/// from them. A time that does (one altered in a name or a pack's index,
/// or a writer whose clock went back) makes such a restore damage rather
/// than a guess (black-box probe: one bit flipped in a pack's index moved a
/// commit a second earlier, and the restore included commits made after
/// the time asked for, with exit 0). Streams take each segment's time no
/// earlier than the previous one's (`capture::ship`).
fn times_grow(
    key: &str,
    id: &GenerationId,
    snapshot: &SnapshotObject,
    segments: &[SegmentObject],
    late: &[SegmentObject],
) -> Result<()> {
    let mut all: Vec<&SegmentObject> = segments.iter().chain(late).collect();
    all.sort_by_key(|s| s.pos);
    let mut prev: Option<&SegmentObject> = None;
    for s in all {
        let floor = prev.map_or(snapshot.time, |p| p.time);
        if s.time < floor {
            let before = prev.map_or_else(
                || format!("the snapshot {}", snapshot.location),
                |p| format!("segment {}", p.pos),
            );
            return Err(earlier_than(key, id, s, &before, floor));
        }
        prev = Some(s);
    }
    Ok(())
}

/// The damage [`times_grow`] finds: segment `s` is named with a commit
/// time earlier than `floor`, that of `before`, which precedes it.
fn earlier_than(
    key: &str,
    id: &GenerationId,
    s: &SegmentObject,
    before: &str,
    floor: DateTime<Utc>,
) -> Error {
    Error::damaged(
        format!("generation {id} of {key:?}"),
        format!(
            "the commit time of segment {} ({}) is earlier than that of {before} ({}): \
             a time was altered (or the writer's clock went back), so a restore at a \
             point in time cannot tell which commits were at or before it; a latest \
             restore does not depend on these times",
            s.pos,
            s.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            floor.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
    )
}

/// Plans a restore of `key` at `at` (`None`: the latest state) without
/// downloading anything: the newest generation with a snapshot committed at
/// or before `at`, planned by [`plan`]. Lists the generation ids once, then
/// the snapshots of generations newest first until one qualifies, and the
/// segments of that one only. `Ok(None)` when no generation has such a
/// snapshot; gaps visible from names are errors, not `None`.
///
/// `later_copy`: when the copy of a cold snapshot restorable at `at` began,
/// if the restore has one. A generation that lost its snapshot fails the
/// plan unless everything the replica holds of it is older than that copy
/// (`missing_snapshot`, `GenerationTraces::superseded_by`).
pub async fn plan_latest(
    replica: &Replica,
    key: &str,
    at: Option<DateTime<Utc>>,
    later_copy: Option<DateTime<Utc>>,
) -> Result<Option<Plan>> {
    for (i, id) in list_generation_ids(replica, key)
        .await?
        .into_iter()
        .enumerate()
    {
        if i == 0 && at.is_none() {
            not_named_far_ahead(key, &id)?;
        }
        let snapshots = list_snapshots(replica, key, &id).await?;
        if let Some(t) = at {
            named_after_its_generation(key, &id, &snapshots, t)?;
        }
        if !snapshots.iter().any(|s| at.is_none_or(|t| s.time <= t)) {
            missing_snapshot(replica, key, &id, &snapshots, at, later_copy).await?;
            continue;
        }
        let mut tries = 0;
        let (meta, segments) = loop {
            // Before the segments are listed: see `Plan::recorded`.
            let meta = read_metadata(replica, key, &id).await?;
            // The log is listed before the generation: a part consolidated
            // after the log was listed is in a log object listed here, or
            // (that object gone when its index is read) the listing is redone.
            let logged = meta.as_ref().is_none_or(|m| m.logged);
            match all_segments(replica, key, &id, logged).await? {
                Some(segments) => {
                    if meta.is_none() && !segments.is_empty() {
                        // The metadata is written before the first segment of
                        // every WAL (`capture::ship`), so segments without it
                        // mean it is gone, or was written just after it was
                        // read here: then list again.
                        if tries < LOG_RELISTS && read_metadata(replica, key, &id).await?.is_some()
                        {
                            tries += 1;
                            continue;
                        }
                        return Err(Error::invalid(
                            format!("generation {id} of {key:?}"),
                            format!(
                                "metadata.json is missing, but {} WAL segment(s) are present: nothing \
                                 proves how far the WAL was shipped, or where each WAL began and ended; \
                                 refusing to restore",
                                segments.len()
                            ),
                        ));
                    }
                    let mut meta = meta;
                    if let Some(m) = &mut meta {
                        m.fold_openings(key, &segments)?;
                    }
                    break (meta, segments);
                }
                None if tries < LOG_RELISTS => tries += 1,
                None => {
                    return Err(Error::invalid(
                        format!("generation {id} of {key:?}"),
                        "the fleet log kept changing while it was read; try again",
                    ))
                }
            }
        };
        let listing = GenerationListing {
            segments,
            id,
            snapshots,
        };
        return Ok(plan(&listing, key, at)?
            .map(|p| Plan {
                recorded: meta,
                ..p
            })
            .map(Plan::without_unproven_prefix));
    }
    Ok(None)
}

/// For a restore of the latest state: fails when the newest generation,
/// `id`, was named more than [`crate::replica::cold::FUTURE_NAME_SECS`]
/// (12 h) after this host's clock, as for a cold snapshot: named by a clock
/// that ran ahead (or put there by hand), it sorts before every generation
/// named since by the right time, which may hold newer states (black-box
/// probe N29). A restore at a time passes it by.
fn not_named_far_ahead(key: &str, id: &GenerationId) -> Result<()> {
    let Some(ahead) = crate::replica::cold::named_far_ahead(id.created()) else {
        return Ok(());
    };
    Err(Error::invalid(
        format!("generation {id} of {key:?}"),
        format!(
            "the newest generation is named {}, {} hours from now: the clock of the host that \
             started it ran ahead (or it was put there by hand), and generations named since by \
             the right time may hold newer states; not restoring it as the newest. Restore with \
             --timestamp (the current time, say), or delete that generation",
            id.created()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ahead.num_hours()
        ),
    ))
}

/// For a restore at `at`: fails when a snapshot of generation `id` that
/// `at` would take is named with a commit time before the generation
/// began. A stream names its snapshots no earlier than its generation's
/// start (`capture::ship`), so such a time was altered, and which states
/// were at or before `at` cannot be told (black-box probe A26: a newer
/// generation's snapshot named 30 s earlier was taken for a time before
/// that generation existed). Snapshots named by versions that put no time
/// in the name (their time is the store's) are not judged.
fn named_after_its_generation(
    key: &str,
    id: &GenerationId,
    snapshots: &[SnapshotObject],
    at: DateTime<Utc>,
) -> Result<()> {
    let named = |s: &SnapshotObject| {
        s.location
            .filename()
            .and_then(parse_snapshot_name_time)
            .is_some_and(|(_, t)| t.is_some())
    };
    match snapshots
        .iter()
        .find(|s| s.time <= at && s.time < id.created() && named(s))
    {
        Some(s) => Err(Error::damaged(
            format!("generation {id} of {key:?}"),
            format!(
                "its snapshot {} is named with commit time {}, before the generation began \
                 ({}): a time was altered, so a restore at a point in time cannot tell which \
                 states were at or before it; a latest restore does not depend on these times",
                s.location,
                s.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                id.created()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        )),
        None => Ok(()),
    }
}

/// Fails when generation `id`, in which no snapshot at or before `at` is
/// listed (`snapshots`: those that are), must have had one; `Ok` when it
/// really begins after `at` or never had a snapshot uploaded (a stream
/// killed while its first upload was in flight leaves at most a directory).
///
/// A generation's first snapshot is uploaded before its metadata and before
/// any of its segments ([`crate::capture::ship`]), so a `metadata.json` or a
/// segment proves that a snapshot was uploaded; with none listed it was
/// lost, and the generation's newer states with it. Skipping it would
/// restore an older generation or cold snapshot with exit 0: a state the
/// database had, but not the newest one (black-box probe: a lost generation
/// snapshot gave 42 of 899 rows). For a restore at `at`: a generation
/// created after `at`, or whose first snapshot (index 0) is listed, holds
/// nothing at or before `at`; one with later snapshots only lost its
/// history before them (retention trims it so), and no older state stands
/// in for it. One GET, and one LIST when it has no metadata; only for
/// generations with no snapshot at or before `at`.
///
/// Except when a later state stands in for all of it: a cold copy that
/// began (`later_copy`) after everything the replica holds of a generation
/// with no snapshot at all ([`GenerationTraces::superseded_by`]) holds every
/// state those objects recorded, and a later one; the generation is passed
/// over then, with a warning. A replica emptied while a database streamed
/// (black-box probe C26: its contents lost, a store restarted empty) is
/// written on by the replicator until its lease renewal notices; the
/// frames it wrote there belong to a generation whose snapshot went with
/// the rest, and the next start uploads every database again. Those frames
/// made the key unrestorable for good, the newer cold copy and the
/// `--timestamp` the error suggested alike.
async fn missing_snapshot(
    replica: &Replica,
    key: &str,
    id: &GenerationId,
    snapshots: &[SnapshotObject],
    at: Option<DateTime<Utc>>,
    later_copy: Option<DateTime<Utc>>,
) -> Result<()> {
    let Some(oldest) = snapshots.first() else {
        return match at {
            Some(t) if t < id.created() => Ok(()),
            _ => lost_snapshot(replica, key, id, at, later_copy).await,
        };
    };
    match at {
        Some(t) if t >= id.created() && oldest.index > 0 => Err(Error::NotFound(format!(
            "{key:?} at {}: generation {id} holds that time, but its history before its \
             oldest snapshot ({}) is no longer in the replica (deleted by retention, or lost); \
             not restoring an older state in its place",
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            oldest.location
        ))),
        // Its first snapshot is named after `at`, so nothing of it had
        // committed by then, unless a time was altered: commit times grow
        // with positions from that snapshot's on ([`times_grow`]), and a
        // segment named earlier than the snapshot shows it (black-box probe
        // A26: a generation snapshot's name moved 30 s later, and a restore
        // at a time in between took an older cold snapshot, exit 0). Listed
        // only for a time between the generation's start and its first
        // snapshot.
        Some(t) if t >= id.created() => {
            let traces = GenerationTraces::read(replica, key, id, None).await?;
            match traces
                .segments
                .iter()
                .filter(|s| s.time < oldest.time)
                .min_by_key(|s| s.pos)
            {
                Some(s) => Err(earlier_than(
                    key,
                    id,
                    s,
                    &format!("the snapshot {}", oldest.location),
                    oldest.time,
                )),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// [`missing_snapshot`] for a generation with no snapshot listed at all.
async fn lost_snapshot(
    replica: &Replica,
    key: &str,
    id: &GenerationId,
    at: Option<DateTime<Utc>>,
    later_copy: Option<DateTime<Utc>>,
) -> Result<()> {
    // Its metadata alone proves a snapshot was uploaded; without it, its
    // segments or its parts in the fleet log do (listed only then, or to
    // weigh them against a later copy).
    let (why, traces) = match read_metadata(replica, key, id).await? {
        Some(m) => {
            let why = format!(
                "its metadata.json records {} snapshot(s) uploaded and the WAL shipped to {}",
                m.snapshots.len(),
                m.last
            );
            let traces = match later_copy {
                Some(_) => Some(GenerationTraces::read(replica, key, id, Some(m)).await?),
                None => None,
            };
            (why, traces)
        }
        None => {
            let t = GenerationTraces::read(replica, key, id, None).await?;
            let why = match (t.segments.len(), t.in_log()) {
                (0, _) => return Ok(()),
                (n, 0) => format!("{n} WAL segment(s) of it are present"),
                (n, l) => {
                    format!("{n} WAL segment(s) of it are present ({l} of them in the fleet log)")
                }
            };
            (why, Some(t))
        }
    };
    if let (Some(copy), Some(l)) = (later_copy, &traces) {
        if l.superseded_by(copy) {
            tracing::warn!(
                key,
                generation = %id,
                copy_began = %copy.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "{why}, but no snapshot of it is in the replica; everything of it there is older \
                 than the cold copy restored, which holds all of it"
            );
            return Ok(());
        }
    }
    Err(Error::invalid(
        format!("generation {id} of {key:?}"),
        format!(
            "{why}, but no snapshot of it {}is in the replica: it was lost; refusing to \
             restore an older generation or cold snapshot in its place",
            if at.is_some() {
                "at or before that time "
            } else {
                ""
            }
        ),
    ))
}

/// What the replica holds of a generation beside its snapshots: its
/// metadata (when read), its segments and its parts in the fleet log.
struct GenerationTraces {
    meta: Option<Metadata>,
    segments: Vec<SegmentObject>,
}

impl GenerationTraces {
    /// How many of the segments are parts in the fleet log (read by
    /// range, `whole: false`).
    fn in_log(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| s.part.as_ref().is_some_and(|p| !p.whole))
            .count()
    }

    /// Lists what is left of generation `id` beside its `meta` (read
    /// already): the log first, as [`plan_latest`] does, and again when a
    /// log object was consolidated before its index was read.
    async fn read(
        replica: &Replica,
        key: &str,
        id: &GenerationId,
        meta: Option<Metadata>,
    ) -> Result<GenerationTraces> {
        for _ in 0..=LOG_RELISTS {
            if let Some(segments) = all_segments(replica, key, id, true).await? {
                return Ok(GenerationTraces { meta, segments });
            }
        }
        Err(Error::invalid(
            format!("generation {id} of {key:?}"),
            "the fleet log kept changing while it was read; try again",
        ))
    }

    /// Whether a cold copy that began at `copy` holds every state these
    /// objects record: each segment's commit time (named when its frames
    /// were read, after they committed) and the metadata's `written` (by
    /// then everything it records had committed) are earlier than `copy`.
    /// Metadata of earlier versions, with no `written`, is never
    /// superseded: nothing tells when it was written.
    fn superseded_by(&self, copy: DateTime<Utc>) -> bool {
        self.meta
            .as_ref()
            .is_none_or(|m| m.written.is_some_and(|w| w < copy))
            && self.segments.iter().all(|s| s.time < copy)
    }
}

/// Times [`plan_latest`] lists again when a log object it listed was
/// consolidated and deleted before its index was read (once an hour per
/// database at most, so more than one retry means something else is wrong).
const LOG_RELISTS: usize = 5;

/// The continuity proof of a replay (see the module docs), fed each segment
/// of a [`Plan`] in order. A restore composes it with the downloads and the
/// frame checks: [`Replay::admit`] before applying a segment,
/// [`Replay::applied`] after, [`Replay::finish`] at the end. Every failure
/// names the missing range.
pub struct Replay<'a> {
    key: &'a str,
    plan: &'a Plan,
    meta: Option<Metadata>,
    pos: Position,
    time: DateTime<Utc>,
    applied: usize,
}

impl<'a> Replay<'a> {
    /// Starts the proof at the plan's snapshot, with the generation's
    /// `metadata.json` (where each WAL ended and began).
    pub async fn start(replica: &Replica, key: &'a str, plan: &'a Plan) -> Result<Replay<'a>> {
        let snap = &plan.snapshot;
        let mut meta = read_metadata(replica, key, &plan.generation).await?;
        if let Some(m) = &mut meta {
            // What the parts listed record of the WALs they open, which
            // this metadata may not have yet (see `pack::WalOpening`).
            m.fold_openings(key, plan.segments.iter().chain(&plan.late))?;
        }
        Ok(Replay {
            key,
            plan,
            meta,
            pos: Position::start(snap.index),
            time: snap.time,
            applied: 0,
        })
    }

    /// Checks that `seg` continues where the replay is, and says how its
    /// frames' checksum chain continues: a segment at the start of a WAL
    /// starts from that WAL's recorded header, which metadata written by
    /// this version must have.
    pub fn admit(&self, seg: &SegmentObject) -> Result<Continues> {
        self.follows_on(seg)?;
        if seg.pos.offset != FIRST_FRAME {
            return Ok(Continues::SameWal);
        }
        let Some(m) = self.meta.as_ref().filter(|m| m.wal_starts.is_some()) else {
            return Ok(Continues::WalStart(None));
        };
        match m.wal_start(seg.pos.index) {
            Some(s) => Ok(Continues::WalStart(Some(s))),
            None => Err(Error::invalid(
                format!("generation {} of {:?}", self.plan.generation, self.key),
                format!(
                    "metadata.json records no header of WAL {} ({}): its first frames cannot \
                     be proven to belong to this database; refusing to restore",
                    seg.pos.index, seg.location
                ),
            )),
        }
    }

    /// Checks that `seg` starts exactly where the replay is: at the end of
    /// the last segment applied, or at the start of the next WAL where the
    /// metadata says this one ended. A gap names the missing position.
    fn follows_on(&self, seg: &SegmentObject) -> Result<()> {
        let e = Expect {
            index: self.pos.index,
            offset: Some(self.pos.offset),
        };
        check_next(e, seg.pos).map_err(|b| {
            gap_error(
                self.key,
                &self.plan.generation,
                &self.plan.late,
                self.plan.at,
                b,
                seg,
            )
        })?;
        if seg.pos.index != self.pos.index {
            check_wal_end(self.key, self.plan, self.meta.as_ref(), self.pos)?;
        }
        Ok(())
    }

    /// Records `seg` as applied: `len` bytes of frames (its decompressed length).
    pub fn applied(&mut self, seg: &SegmentObject, len: u64) {
        self.pos = Position {
            index: seg.pos.index,
            offset: seg.pos.offset + len,
        };
        self.time = self.time.max(seg.time);
        self.applied += 1;
    }

    /// After the last segment, the replay must have stopped where the
    /// history it was asked for ends:
    /// - at a point in time with segments committed after it listed, the
    ///   first of those must start exactly where the replay ended (in the
    ///   next WAL only where the metadata says this one ended): otherwise a
    ///   missing segment between them may hold commits at or before the
    ///   restore time, and restoring without it would silently be older;
    /// - otherwise (the latest state, or a time after every segment listed)
    ///   it must reach at least what `metadata.json` recorded as shipped.
    ///
    /// Returns where the replay ended, the commit time of the state it
    /// restored, and how many segments it applied.
    pub fn finish(self) -> Result<(Position, DateTime<Utc>, usize)> {
        let (key, pos) = (self.key, self.pos);
        if let Some(next) = self.plan.late.iter().min_by_key(|s| s.pos) {
            self.follows_on(next)?;
        } else if let Some(m) = &self.plan.recorded {
            // The latest state reaches at least what was recorded as shipped
            // (the start of the next WAL is where the previous one ended).
            let next_wal = m.last == Position::start(pos.index + 1) && m.wal_ends.contains(&pos);
            if m.last > pos && !next_wal {
                return Err(Error::invalid(
                    format!("generation {} of {key:?}", self.plan.generation),
                    format!(
                        "metadata.json records WAL frames shipped up to {}, but the segments present end at {}: \
                         WAL segment(s) from {} on are missing; refusing to restore",
                        describe(m.last),
                        describe(pos),
                        describe(pos)
                    ),
                ));
            }
        }
        Ok((pos, self.time, self.applied))
    }
}

/// Writes (replaces) the generation's `metadata.json`, unconditionally
/// (the stream writes through [`write_metadata_over`]).
pub async fn write_metadata(replica: &Replica, key: &str, meta: &Metadata) -> Result<()> {
    let (location, json) = metadata_object(replica, key, meta)?;
    replica.put_bytes(&location, json).await
}

/// Where `meta` is written for `key`, and its bytes.
fn metadata_object(
    replica: &Replica,
    key: &str,
    meta: &Metadata,
) -> Result<(ObjPath, bytes::Bytes)> {
    check_key(key)?;
    let location = metadata_path(&replica.prefix, key, &meta.generation);
    let json = serde_json::to_vec_pretty(meta)
        .map_err(|e| Error::invalid(&location, format!("serializing: {e}")))?;
    Ok((location, json.into()))
}

/// What the writer of a generation's `metadata.json` knows of the object:
/// the condition of its next write. Every write names the version it
/// replaces, so a write the store applies late (its answer lost to a
/// timeout, the request held up on the way) finds the object changed and
/// is refused, instead of putting an older metadata back over a newer one
/// (black-box probe D26: a generation start's write held past the timeout
/// landed over the one recording where WAL 0 ended, and every restore into
/// WAL 1 failed, for good once the daemon was killed).
#[derive(Debug, Clone, Default)]
pub enum MetadataVersion {
    /// Nothing written in this generation yet: the first write creates it.
    #[default]
    Absent,
    /// The version the last write made.
    Known(object_store::UpdateVersion),
    /// A write whose outcome is unknown: the next one reads what is there.
    Unknown,
}

/// Writes `meta` as its generation's `metadata.json` over `version`, and
/// records the version written (see [`MetadataVersion`]); a write refused
/// because the object changed (a late write of ours landed) reads its
/// version and writes again ([`Replica::put_over`]). On `file://` a write
/// is complete when the call returns, so none lands late: written as any
/// object. Conditional writes are those the replica lease stands on: a
/// store without them holds no lease.
pub async fn write_metadata_over(
    replica: &Replica,
    key: &str,
    meta: &Metadata,
    version: &mut MetadataVersion,
) -> Result<()> {
    let (location, json) = metadata_object(replica, key, meta)?;
    if replica.local_root().is_some() {
        return replica.put_bytes(&location, json).await;
    }
    // Unknown until this write's answer says otherwise.
    let expected = match std::mem::replace(version, MetadataVersion::Unknown) {
        MetadataVersion::Absent => None,
        MetadataVersion::Known(v) => Some(v),
        MetadataVersion::Unknown => replica.version_of(&location).await?,
    };
    let written = replica.put_over(&location, json, expected).await?;
    *version = MetadataVersion::Known(written);
    Ok(())
}

/// Reads a generation's `metadata.json`; `None` if it was not written yet.
pub async fn read_metadata(
    replica: &Replica,
    key: &str,
    gen: &GenerationId,
) -> Result<Option<Metadata>> {
    check_key(key)?;
    let location = metadata_path(&replica.prefix, key, gen);
    let Some(bytes) = replica.get_small(&location, MAX_METADATA_BYTES).await? else {
        return Ok(None);
    };
    let meta: Metadata = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(&location, format!("invalid metadata: {e}")))?;
    // Metadata that is not this generation's, or not this key's: a
    // generation copied, moved or renamed from elsewhere.
    if meta.generation != *gen {
        return Err(Error::invalid(
            &location,
            format!(
                "invalid metadata: it is generation {}'s, not {gen}'s (a generation renamed or moved here)",
                meta.generation
            ),
        ));
    }
    if let Some(theirs) = meta.key.as_deref().filter(|k| *k != key) {
        return Err(Error::invalid(
            &location,
            format!(
                "invalid metadata: the generation was shipped for the key {theirs:?}, not {key:?} \
                 (another database's generation, copied or moved here)"
            ),
        ));
    }
    Ok(Some(meta))
}

/// Whether `dir` (a path relative to the replica prefix) is a generation's
/// directory or one of its `snapshots`/`wal` directories: nothing in there
/// is a cold snapshot or names a key of its own.
pub fn in_generation(dir: &str) -> bool {
    let mut up = dir.rsplit('/');
    let is_gen = |p: Option<&str>| p.and_then(GenerationId::parse).is_some();
    let is = |p: Option<&str>, name: &str| p == Some(name);
    match up.next() {
        Some(SNAPSHOTS_DIR | WAL_DIR) => is_gen(up.next()) && is(up.next(), GENERATIONS_DIR),
        last => is_gen(last) && is(up.next(), GENERATIONS_DIR),
    }
}

/// How a [`SnapshotEntry`] records an LZ4 frame's content checksum (the
/// frame's last four bytes, little-endian): `xxh32:<8 hex>`.
pub fn checksum_name(sum: u32) -> String {
    format!("xxh32:{sum:08x}")
}

/// `<key>/generations/<gen>/<more>` (relative to the replica prefix); `None`
/// for any other object. The last such `generations` level wins, since
/// nothing under a generation directory has one.
pub fn generation_parts(rel: &str) -> Option<(&str, GenerationId, &str)> {
    rel.rmatch_indices(GENERATIONS_DIR).find_map(|(i, _)| {
        let key = rel[..i].strip_suffix('/')?;
        let (gen, more) = rel[i + GENERATIONS_DIR.len()..]
            .strip_prefix('/')?
            .split_once('/')?;
        let gen = GenerationId::parse(gen)?;
        (!key.is_empty() && !more.is_empty()).then_some((key, gen, more))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_largest_metadata_we_write_is_read() {
        let id = GenerationId::parse("fffffe6b2f5c7e1f0123abcd").unwrap();
        let mut m = Metadata {
            page_size: 65536,
            logged: true,
            written: Some(id.created()),
            key: Some("k/".repeat(512)),
            ..fresh_metadata(&id)
        };
        for i in 0..MAX_GENERATION_WALS as u64 {
            let index = u64::MAX - i;
            m.wal_ends.push(Position {
                index,
                offset: u64::MAX,
            });
            m.wal_starts.get_or_insert_with(Vec::new).push(WalStart {
                index,
                salt: [u32::MAX; 2],
                checksum: [u32::MAX; 2],
                big_endian: true,
            });
        }
        let written = serde_json::to_vec_pretty(&m).unwrap().len() as u64;
        assert!(written < MAX_METADATA_BYTES / 4, "{written} bytes");
    }

    use super::*;
    use chrono::{Duration, TimeZone};

    /// The metadata of generation `id` as a stream first writes it: no
    /// snapshot or WAL recorded yet, 4096-byte pages, key `k`.
    fn fresh_metadata(id: &GenerationId) -> Metadata {
        Metadata {
            generation: id.clone(),
            page_size: 4096,
            created: id.created(),
            first: Position::start(0),
            last: Position::start(0),
            snapshots: Vec::new(),
            wal_ends: Vec::new(),
            wal_starts: Some(Vec::new()),
            logged: false,
            written: None,
            key: Some("k".into()),
        }
    }

    /// Metadata names its generation and (since it holds it) its key: a
    /// generation copied or moved under another key, or renamed, is
    /// refused, naming the object (probe X: another database's generation
    /// copied under a key was restored as that key's, exit 0).
    #[tokio::test]
    async fn a_generation_belongs_to_its_key_and_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::open_dir(dir.path()).unwrap();
        let gen = new_generation_id(t(0));
        let meta = |key: Option<&str>| Metadata {
            key: key.map(str::to_string),
            ..fresh_metadata(&gen)
        };
        write_metadata(&r, "p/a", &meta(Some("p/a"))).await.unwrap();
        assert!(read_metadata(&r, "p/a", &gen).await.unwrap().is_some());
        // Copied under another key.
        write_metadata(&r, "p/b", &meta(Some("p/a"))).await.unwrap();
        let e = read_metadata(&r, "p/b", &gen)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shipped for the key \"p/a\", not \"p/b\""),
            "{e}"
        );
        assert!(
            e.contains(metadata_path(&r.prefix, "p/b", &gen).as_ref()),
            "{e}"
        );
        // Renamed to another generation's name.
        let other = new_generation_id(t(1));
        let bytes = serde_json::to_vec(&meta(Some("p/a"))).unwrap();
        r.put_bytes(&metadata_path(&r.prefix, "p/a", &other), bytes)
            .await
            .unwrap();
        let e = read_metadata(&r, "p/a", &other)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("it is generation {gen}'s, not {other}'s")),
            "{e}"
        );
        // Written by a version before the key: read as before.
        write_metadata(&r, "p/c", &meta(None)).await.unwrap();
        assert!(read_metadata(&r, "p/c", &gen).await.unwrap().is_some());
    }

    fn t(sec: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap() + Duration::seconds(sec)
    }

    #[test]
    fn generation_ids_sort_newest_first_and_parse() {
        let a = new_generation_id(t(0));
        let b = new_generation_id(t(1));
        assert_eq!(a.as_str().len(), GENERATION_ID_LEN);
        assert!(b < a, "newer sorts first: {b} < {a}");
        assert_eq!(GenerationId::parse(a.as_str()), Some(a.clone()));
        assert_eq!(a.created(), t(0));
        // Same millisecond: different ids.
        assert_ne!(new_generation_id(t(0)), new_generation_id(t(0)));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<GenerationId>(&json).unwrap(), a);
        assert!(serde_json::from_str::<GenerationId>("\"zz\"").is_err());
        for bad in [
            "",
            "abc",
            "FFFFFE6B2F5C7E1F0123ABCD",
            "fffffe6b2f5c7e1f0123abc",
            "fffffe6b2f5c7e1f0123abcde",
            "+ffffe6b2f5c7e1f0123abcd",
            "fffffe6b2f5c7e1f0123abcé",
            "0000000000000000deadbeef", // millis beyond i64
        ] {
            assert!(GenerationId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn paths_and_names() {
        let g = GenerationId::parse("fffffe6b2f5c7e1f0123abcd").unwrap();
        let p = ObjPath::from("pre");
        // 0x19aab6f76e8 ms; a time between milliseconds is rounded up.
        let at = DateTime::from_timestamp_millis(1_763_812_800_232).unwrap();
        let just_after = at - Duration::nanoseconds(999_999);
        let snap = snapshot_path(&p, "a/b", &g, 3, just_after);
        assert_eq!(
            snap.as_ref(),
            "pre/a/b/generations/fffffe6b2f5c7e1f0123abcd/snapshots/0000000000000003_0000019aab6f76e8.snapshot.lz4"
        );
        assert_eq!(
            parse_snapshot_name_time(snap.filename().unwrap()),
            Some((3, Some(at)))
        );
        let pos = Position {
            index: 2,
            offset: 4152,
        };
        let s = segment_path(&p, "a/b", &g, pos, at);
        assert_eq!(
            s.as_ref(),
            "pre/a/b/generations/fffffe6b2f5c7e1f0123abcd/wal/0000000000000002_0000000000001038_0000019aab6f76e8.wal.lz4"
        );
        assert_eq!(
            parse_segment_name_time(s.filename().unwrap()),
            Some((pos, Some(at)))
        );
        // Names of earlier versions carry no time.
        assert_eq!(
            parse_segment_name_time("0000000000000002_0000000000001038.wal.lz4"),
            Some((pos, None))
        );
        assert_eq!(
            parse_snapshot_name_time("0000000000000003.snapshot.lz4"),
            Some((3, None))
        );
        assert_eq!(
            metadata_path(&p, "a/b", &g).as_ref(),
            "pre/a/b/generations/fffffe6b2f5c7e1f0123abcd/metadata.json"
        );
        assert_eq!(
            parse_snapshot_name("00000000000000ff.snapshot.lz4"),
            Some(255)
        );
        for bad in [
            "ff.snapshot.lz4",
            "00000000000000FF.snapshot.lz4",
            "+0000000000000ff.snapshot.lz4",
            "00000000000000ff.snapshot",
            "00000000000000ff.wal.lz4",
        ] {
            assert!(parse_snapshot_name(bad).is_none(), "{bad}");
        }
        for bad in [
            "0000000000000002_0000000000000000.wal.lz4", // before the first frame
            "0000000000000002-0000000000001038.wal.lz4",
            "0000000000000002_0000000000001038_1.wal.lz4",
            "0000000000000002_0000000000001038_0000019aab6f76e8_0.wal.lz4",
            "0000000000000002_00000000000010é.wal.lz4",
            "_.wal.lz4",
            "0000000000000002_0000000000001038.snapshot.lz4",
        ] {
            assert!(parse_segment_name(bad).is_none(), "{bad}");
        }
    }

    fn snap(index: u64, up: i64) -> SnapshotObject {
        SnapshotObject {
            index,
            location: ObjPath::from(format!("s/{index}")),
            uploaded: t(up),
            time: t(up),
            size: 1,
        }
    }

    fn seg(index: u64, offset: u64, up: i64) -> SegmentObject {
        let pos = Position { index, offset };
        SegmentObject {
            pos,
            location: ObjPath::from(format!("w/{pos}")),
            uploaded: t(up),
            time: t(up),
            size: 1,
            part: None,
        }
    }

    /// A fleet log part opening WAL `index` (WAL `index - 1` ended at
    /// `previous_end`) is folded into the metadata as if written after it;
    /// one contradicting the metadata, or another part, is refused.
    #[test]
    fn wal_openings_are_folded_into_the_metadata() {
        let gen = GenerationId::parse("fffffe6b2f5c7e1f0123abcd").unwrap();
        let mut m = Metadata {
            wal_starts: Some(vec![WalStart {
                index: 0,
                salt: [1, 1],
                checksum: [0, 0],
                big_endian: false,
            }]),
            logged: true,
            ..fresh_metadata(&gen)
        };
        let opening = |index: u64, salt: u32, previous_end: Option<u64>| SegmentObject {
            part: Some(PartRange {
                range: 0..1,
                whole: false,
                opens: Some(pack::WalOpening {
                    salt: [salt, salt],
                    checksum: [0, 0],
                    big_endian: false,
                    previous_end,
                }),
            }),
            ..seg(index, FIRST_FRAME, 0)
        };
        m.fold_openings("k", &[seg(0, 32, 0), opening(1, 2, Some(4152))])
            .unwrap();
        assert_eq!(
            m.wal_ends,
            vec![Position {
                index: 0,
                offset: 4152
            }]
        );
        assert_eq!(m.wal_starts.as_ref().unwrap()[1].salt, [2, 2]);
        // The same records again change nothing.
        let before = m.clone();
        m.fold_openings("k", &[opening(1, 2, Some(4152))]).unwrap();
        assert_eq!(m, before);
        // Another header for a WAL, another end: refused, naming the part.
        for other in [opening(1, 3, Some(4152)), opening(1, 2, Some(8272))] {
            let e = m.clone().fold_openings("k", &[other]).unwrap_err();
            assert!(e.to_string().contains("refusing to restore"), "{e}");
            assert!(e.to_string().contains("w/"), "{e}");
        }
        // WAL 0's header as the metadata recorded it.
        let e = m
            .clone()
            .fold_openings("k", &[opening(0, 9, None)])
            .unwrap_err();
        assert!(e.to_string().contains("header of WAL 0"), "{e}");
    }

    fn listing(snapshots: Vec<SnapshotObject>, segments: Vec<SegmentObject>) -> GenerationListing {
        GenerationListing {
            id: GenerationId::parse("fffffe6b2f5c7e1f0123abcd").unwrap(),
            snapshots,
            segments,
        }
    }

    fn positions(p: &Plan) -> Vec<(u64, u64)> {
        p.segments
            .iter()
            .map(|s| (s.pos.index, s.pos.offset))
            .collect()
    }

    /// Metadata without `covers` (earlier versions): a point-in-time plan
    /// whose segments are all cut parts of the snapshot's WAL (at least
    /// MAX_SEGMENT_BYTES to the next part) leaves them out; one that
    /// reaches a shorter part, or a later WAL, keeps them; a replay that
    /// applied only cut parts of unknown length is unproven, at a point in
    /// time only (probe E19).
    #[test]
    fn cut_parts_without_covers_are_not_replayed_alone() {
        let m = MAX_SEGMENT_BYTES;
        let l = listing(
            vec![snap(0, 0)],
            vec![
                seg(0, 32, 10),
                seg(0, 32 + m, 20),
                seg(0, 32 + 2 * m + 4096, 30),
                seg(0, 32 + 2 * m + 8192, 40),
                seg(1, 32, 50),
            ],
        );
        let at = |s: i64| plan(&l, "k", Some(t(s))).unwrap().unwrap();
        let kept = |p: Plan| positions(&p.without_unproven_prefix());
        assert_eq!(kept(at(15)), vec![]);
        assert_eq!(kept(at(25)), vec![]);
        // The third part is shorter: it reached the WAL's end.
        assert_eq!(kept(at(35)).len(), 3);
        assert_eq!(kept(at(55)).len(), 5);
        let latest = plan(&l, "k", None).unwrap().unwrap();
        assert_eq!(kept(latest).len(), 5);
        // Recorded `covers`: replayed as planned, the prefix skipped.
        let mut p = at(15);
        let id = l.id.clone();
        p.recorded = Some(Metadata {
            generation: id.clone(),
            page_size: 4096,
            created: id.created(),
            first: Position::start(0),
            last: Position::start(0),
            snapshots: vec![SnapshotEntry {
                index: 0,
                size: 0,
                compressed_size: 0,
                checksum: String::new(),
                covers: Some(32),
            }],
            wal_ends: Vec::new(),
            wal_starts: None,
            logged: false,
            written: None,
            key: None,
        });
        assert_eq!(kept(p).len(), 1);
        let pos = |o: u64| Position {
            index: 0,
            offset: o,
        };
        assert!(at(15).unproven_prefix(&[(pos(32), m)]));
        assert!(!at(15).unproven_prefix(&[(pos(32), m - 1)]));
        assert!(latest_of(&l).unproven_prefix(&[(pos(32), m)]));
        assert!(!latest_of(&l).unproven_prefix(&[(pos(32), m), (pos(32 + m), 4096)]));
    }

    fn latest_of(l: &GenerationListing) -> Plan {
        plan(l, "k", None).unwrap().unwrap()
    }

    #[test]
    fn plan_picks_snapshot_and_segments_by_time() {
        let l = listing(
            vec![snap(0, 0), snap(2, 50)],
            vec![
                seg(0, 32, 10),
                seg(0, 1000, 20),
                seg(1, 32, 30),
                seg(2, 32, 60),
                seg(2, 500, 70),
            ],
        );
        assert!(plan(&l, "k", Some(t(-1))).unwrap().is_none());
        let p = plan(&l, "k", Some(t(0))).unwrap().unwrap();
        assert_eq!((p.snapshot.index, positions(&p)), (0, vec![]));
        let p = plan(&l, "k", Some(t(25))).unwrap().unwrap();
        assert_eq!(positions(&p), vec![(0, 32), (0, 1000)]);
        let p = plan(&l, "k", Some(t(49))).unwrap().unwrap();
        assert_eq!(p.snapshot.index, 0);
        assert_eq!(positions(&p), vec![(0, 32), (0, 1000), (1, 32)]);
        // Snapshot 2 replaces WALs 0 and 1.
        let p = plan(&l, "k", Some(t(60))).unwrap().unwrap();
        assert_eq!((p.snapshot.index, positions(&p)), (2, vec![(2, 32)]));
        let p = plan(&l, "k", None).unwrap().unwrap();
        assert_eq!(positions(&p), vec![(2, 32), (2, 500)]);
        // A WAL without segments (restarted before any frame) may be followed
        // by the next one: replay proves where it ended from the metadata.
        let l = listing(vec![snap(0, 0)], vec![seg(1, 32, 1)]);
        assert_eq!(
            positions(&plan(&l, "k", None).unwrap().unwrap()),
            vec![(1, 32)]
        );
    }

    #[test]
    fn plan_refuses_gaps_visible_from_names() {
        // First segment of the snapshot's WAL missing.
        let l = listing(vec![snap(3, 0)], vec![seg(3, 1000, 1)]);
        let e = plan(&l, "k", None).unwrap_err().to_string();
        assert!(
            e.contains("0000000000000003_0000000000000020_* (WAL 3 offset 32) is missing"),
            "{e}"
        );
        // A whole WAL index skipped.
        let l = listing(vec![snap(0, 0)], vec![seg(0, 32, 1), seg(2, 32, 2)]);
        let e = plan(&l, "k", None).unwrap_err().to_string();
        assert!(e.contains("(WAL 1 offset 32) is missing"), "{e}");
        // A new WAL not starting at 32.
        let l = listing(vec![snap(0, 0)], vec![seg(0, 32, 1), seg(1, 64, 2)]);
        assert!(plan(&l, "k", None).is_err());
        // The missing segment exists but was uploaded after the restore time.
        let l = listing(vec![snap(0, 0)], vec![seg(0, 32, 9), seg(1, 32, 2)]);
        let e = plan(&l, "k", Some(t(5))).unwrap_err().to_string();
        assert!(e.contains("after the restore time"), "{e}");
    }

    /// A commit time that goes down as positions go up (altered in a name
    /// or an index) fails a restore at a point in time as damage; a latest
    /// restore does not read the times.
    #[test]
    fn commit_times_that_go_back_fail_a_point_in_time_plan() {
        let frame = 1024 + 24;
        let l = listing(
            vec![snap(0, 0)],
            vec![
                seg(0, 32, 1),
                seg(0, 32 + frame, 3),
                // Committed at 6, its time altered to 2.
                seg(0, 32 + 2 * frame, 2),
                seg(0, 32 + 3 * frame, 7),
            ],
        );
        let e = plan(&l, "k", Some(t(5))).unwrap_err();
        assert!(matches!(e, Error::Damaged { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("is earlier than that of segment"), "{e}");
        assert_eq!(positions(&plan(&l, "k", None).unwrap().unwrap()).len(), 4);
        // Times that only grow plan as before.
        let l = listing(
            vec![snap(0, 0)],
            vec![
                seg(0, 32, 1),
                seg(0, 32 + frame, 3),
                seg(0, 32 + 2 * frame, 9),
            ],
        );
        assert_eq!(
            positions(&plan(&l, "k", Some(t(5))).unwrap().unwrap()).len(),
            2
        );
    }

    #[test]
    fn generation_objects_name_their_key_only() {
        let g = "fffffe6b2f5c7e1f0123abcd";
        // Every object of a generation names it (a generation whose
        // snapshot is lost is still listed, see `restore::list`).
        for (object, rest) in [
            (
                format!("a/b/generations/{g}/snapshots/0000000000000003.snapshot.lz4"),
                "snapshots/0000000000000003.snapshot.lz4",
            ),
            (
                format!("a/b/generations/{g}/wal/0000000000000003_0000000000000020.wal.lz4"),
                "wal/0000000000000003_0000000000000020.wal.lz4",
            ),
            (
                format!("a/b/generations/{g}/metadata.json"),
                "metadata.json",
            ),
        ] {
            let (key, id, more) = generation_parts(&object).unwrap();
            assert_eq!((key, id.as_str(), more), ("a/b", g, rest), "{object}");
        }
        for other in [
            format!("generations/{g}/snapshots/0000000000000003.snapshot.lz4"),
            format!("a/b/generations/{g}x/snapshots/0000000000000003.snapshot.lz4"),
            format!("a/b/gens/{g}/snapshots/0000000000000003.snapshot.lz4"),
            format!("a/b/generations/{g}"),
            "a/b/x-20261122-140000.db.lz4".to_string(),
        ] {
            assert!(generation_parts(&other).is_none(), "{other}");
        }
        for dir in [
            format!("a/generations/{g}"),
            format!("a/generations/{g}/snapshots"),
            format!("a/generations/{g}/wal"),
        ] {
            assert!(in_generation(&dir), "{dir}");
        }
        for dir in [
            "a/generations",
            "a/snapshots",
            "",
            "a/b",
            "generations/x/wal",
        ] {
            assert!(!in_generation(dir), "{dir}");
        }
    }
}
