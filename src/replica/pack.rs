//! Packs: one object holding many WAL segments ("parts"), with an index in
//! front. The hot tier's fleet log and its consolidated per-database objects
//! are both packs.
//!
//! Why: one object per hot database per sync costs one PUT each (about $12
//! per always-hot database per month at S3 list prices). Every sync, the
//! frames that all hot databases committed go into **one** pack instead, the
//! *fleet log* object; at the consolidation interval (hourly by default, and
//! when its stream ends) each database's parts are written again as one pack
//! of its own inside its generation, after which the log objects whose every
//! part is consolidated are deleted. Restore reads the parts of one database
//! only: the index says where they lie, and a log object is read by range.
//!
//! ```text
//! <prefix>/.litefleet/log/<time:016x>_<random:08x>.pack           fleet log
//! <prefix>/<key>/generations/<gen>/wal/<first>_<time:016x>_<random:08x>.pack
//! ```
//!
//! * `<time>` is when the pack was written, in Unix milliseconds (a log
//!   object's name sorts by it); for a consolidated pack it is the commit
//!   time of its newest part. `<first>` is the position of its first part
//!   (`<index:016x>_<offset:016x>`, as segment names). The random part
//!   makes every pack's name its own: a pack is never overwritten, so the
//!   consolidation after a crash (which sees only the log objects left) can
//!   never replace a complete pack with one holding fewer parts.
//! * Format: the 8 bytes `LFPACK1\n`, a little-endian `u32` index length
//!   `N`, `N` bytes of JSON `{"parts": [...]}`, then the parts' bytes back
//!   to back, in index order. Each part is exactly what a segment object
//!   holds (an LZ4 frame of committed WAL frames with its content checksum)
//!   and is described by its key, generation, position, commit time and
//!   compressed length ([`Part`]).
//! * A part is a segment in every rule of [`crate::replica::hot`]: restore
//!   lists packs with the segments, admits parts by position and commit
//!   time, and checks their frames exactly as a segment's. The same part
//!   may be in a log object and in a consolidated pack at once (between the
//!   consolidation and the log object's deletion); the bytes are the same.
//! * A pack is written with one PUT and is never rewritten; a part is
//!   reported shipped only after the PUT of the log object holding it
//!   completed (and was synced, on `file://`).
//!
//! Which generations may have parts in the log: metadata written while the
//! generation streams through the log says so ([`crate::replica::hot::Metadata::logged`]);
//! a restore of such a generation lists the log (one LIST, and one or two
//! range GETs per log object for the indexes). The log is short: one
//! object per sync tick with changes, since the last consolidation.

use std::ops::Range;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path as ObjPath;
use object_store::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::replica::layout::{check_key, commit_millis, key_path, random_u32};
use crate::replica::storage::Replica;
use crate::{Error, Result};

/// Where the fleet log lives, under the replica prefix. `.litefleet` also
/// holds the lease; no key can be a pack (keys name directories).
pub const LOG_DIR: &str = ".litefleet/log";
/// Suffix of pack objects.
pub const PACK_SUFFIX: &str = ".pack";
/// First bytes of every pack.
const MAGIC: &[u8; 8] = b"LFPACK1\n";
/// Magic and index length.
const HEADER_LEN: u64 = 12;
/// Bytes read to find the index: one GET holds the index of a log object
/// with a few hundred parts (~130 bytes of JSON each); larger ones take a
/// second GET.
const INDEX_PROBE: u64 = 64 << 10;
/// Largest index accepted (a sanity bound against hostile objects: 64 MiB
/// is ~500,000 parts).
const MAX_INDEX_LEN: u64 = 64 << 20;
/// Where the first frame of a WAL starts (after its 32-byte header): no part
/// starts before it.
const MIN_OFFSET: u64 = 32;

/// One segment inside a pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub key: String,
    /// Its generation's id (see [`crate::replica::hot::GenerationId`]).
    pub generation: String,
    /// Position of its first frame: WAL index and byte offset (see
    /// [`crate::replica::hot::Position`]).
    pub index: u64,
    pub offset: u64,
    /// Commit time, Unix milliseconds rounded up (as in segment names).
    pub time: u64,
    /// Bytes of the part (its LZ4 frame) in the pack.
    pub len: u64,
    /// For the first part of a WAL after the generation's first: that WAL's
    /// header and where the previous WAL ended ([`WalOpening`]). `None`
    /// in packs of earlier versions, which wrote both into
    /// `metadata.json` before such a part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens: Option<WalOpening>,
}

/// What a stream knows when it ships the first frames of a WAL (offset 32
/// of WAL `index`), carried by the part that holds them: the WAL's header
/// (salts and checksum seed, which the part's first frame must continue)
/// and where WAL `index - 1` ended. Without it the stream would have to
/// write `metadata.json` before every such part (one PUT per hot database
/// per WAL restart, ~3.4 an hour at one commit a second; black-box probe
/// I28), because a restore proves continuity across WALs from those two
/// records ([`crate::replica::hot`]). A restore reads them from the parts
/// as from the metadata, which records them again when it is next written
/// (at the generation's end, its next snapshot, or its stream's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalOpening {
    pub salt: [u32; 2],
    pub checksum: [u32; 2],
    pub big_endian: bool,
    /// Where WAL `index - 1` ended (its committed end, offset in bytes):
    /// `None` for the generation's first WAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_end: Option<u64>,
}

impl Part {
    /// The commit time, as a segment name records it.
    pub fn commit_time(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(i64::try_from(self.time).unwrap_or(i64::MAX))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// A part of `key`'s `generation` starting at WAL `index`, byte
    /// `offset`, whose every transaction had committed at `committed`, of
    /// `len` bytes (an LZ4 segment frame).
    pub fn new(
        key: &str,
        generation: &str,
        index: u64,
        offset: u64,
        committed: DateTime<Utc>,
        len: u64,
    ) -> Part {
        Part {
            key: key.to_string(),
            generation: generation.to_string(),
            index,
            offset,
            time: commit_millis(committed),
            len,
            opens: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct IndexJson {
    parts: Vec<Part>,
}

/// A pack's index: each part and where its bytes lie in the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackIndex {
    pub parts: Vec<(Part, Range<u64>)>,
}

/// Builds a pack of `parts` (each part's `len` is set from its bytes).
pub fn encode(parts: Vec<(Part, Bytes)>) -> Result<Vec<u8>> {
    Ok(encode_pieces(parts)?.concat())
}

/// [`encode`], as the pack's pieces in order: its header with the index,
/// then each part's bytes as they were given (not copied), for
/// [`Replica::put_pieces`]. A pack joined into one buffer is held twice in
/// memory while it is written (the parts, and the pack): up to 128 MiB for
/// one fleet log object after an outage, and 64 MiB per consolidation.
pub fn encode_pieces(parts: Vec<(Part, Bytes)>) -> Result<Vec<Bytes>> {
    let mut index = IndexJson {
        parts: Vec::with_capacity(parts.len()),
    };
    for (p, b) in &parts {
        let mut p = p.clone();
        p.len = b.len() as u64;
        index.parts.push(p);
    }
    let json = serde_json::to_vec(&index)
        .map_err(|e| Error::invalid("pack", format!("serializing its index: {e}")))?;
    let len =
        u32::try_from(json.len()).map_err(|_| Error::invalid("pack", "index larger than 4 GiB"))?;
    let mut head = Vec::with_capacity(HEADER_LEN as usize + json.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&len.to_le_bytes());
    head.extend_from_slice(&json);
    let mut out = Vec::with_capacity(1 + parts.len());
    out.push(Bytes::from(head));
    out.extend(parts.into_iter().map(|(_, b)| b));
    Ok(out)
}

/// What the first bytes of a pack say: the index, or how many bytes from the
/// start are needed to read it.
enum Head {
    Index(PackIndex),
    Need(u64),
}

fn parse_head(head: &[u8], size: u64, what: &str) -> Result<Head> {
    let bad = |m: String| Error::invalid(what, format!("not a valid pack: {m}"));
    if head.len() < HEADER_LEN as usize || &head[..8] != MAGIC {
        return Err(bad("bad magic".into()));
    }
    let n = u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]]));
    if n > MAX_INDEX_LEN || HEADER_LEN + n > size {
        return Err(bad(format!("index of {n} bytes in an object of {size}")));
    }
    let end = HEADER_LEN + n;
    if (head.len() as u64) < end {
        return Ok(Head::Need(end));
    }
    let index: IndexJson = serde_json::from_slice(&head[HEADER_LEN as usize..end as usize])
        .map_err(|e| bad(format!("index: {e}")))?;
    let mut at = end;
    let mut parts = Vec::with_capacity(index.parts.len());
    for p in index.parts {
        let stop = at
            .checked_add(p.len)
            .filter(|s| *s <= size)
            .ok_or_else(|| {
                bad(format!(
                    "part at {}:{} is beyond the object's end",
                    p.index, p.offset
                ))
            })?;
        let opening_ok = p.opens.is_none_or(|o| {
            p.offset == MIN_OFFSET
                && o.previous_end
                    .is_none_or(|end| p.index > 0 && end >= MIN_OFFSET)
        });
        if p.offset < MIN_OFFSET || p.len == 0 || !opening_ok || check_key(&p.key).is_err() {
            return Err(bad(format!(
                "part {:?} at {}:{} is malformed",
                p.key, p.index, p.offset
            )));
        }
        parts.push((p, at..stop));
        at = stop;
    }
    Ok(Head::Index(PackIndex { parts }))
}

/// Reads the index of a whole pack held in memory.
pub fn decode_index(bytes: &[u8], what: &str) -> Result<PackIndex> {
    match parse_head(bytes, bytes.len() as u64, what)? {
        Head::Index(i) => Ok(i),
        Head::Need(_) => Err(Error::invalid(what, "not a valid pack: truncated index")),
    }
}

/// [`read_index`], or the index kept from an earlier read of the same
/// object where the replica keeps them ([`Replica::with_memo`]): a pack and
/// a fleet log object never change once written.
pub async fn read_index_kept(
    replica: &Replica,
    meta: &ObjectMeta,
) -> Result<Option<std::sync::Arc<PackIndex>>> {
    if let Some(kept) = replica.memo_get::<PackIndex>(meta) {
        return Ok(Some(kept));
    }
    let Some(index) = read_index(replica, meta).await? else {
        return Ok(None);
    };
    let index = std::sync::Arc::new(index);
    replica.memo_put(meta, index.clone(), index.parts.len().max(1));
    Ok(Some(index))
}

/// Reads a pack's index (one range GET, two for a large index); `None` if
/// the object is gone.
pub async fn read_index(replica: &Replica, meta: &ObjectMeta) -> Result<Option<PackIndex>> {
    let what = meta.location.to_string();
    if meta.size < HEADER_LEN {
        // Not even a header (an empty object, say): no range to ask for.
        return Err(Error::invalid(
            &what,
            format!("not a valid pack: {} bytes", meta.size),
        ));
    }
    let probe = INDEX_PROBE.min(meta.size);
    let Some(head) = replica.get_range_bytes(&meta.location, 0..probe).await? else {
        return Ok(None);
    };
    match parse_head(&head, meta.size, &what)? {
        Head::Index(i) => Ok(Some(i)),
        Head::Need(end) => {
            let Some(head) = replica.get_range_bytes(&meta.location, 0..end).await? else {
                return Ok(None);
            };
            match parse_head(&head, meta.size, &what)? {
                Head::Index(i) => Ok(Some(i)),
                Head::Need(_) => Err(Error::invalid(&what, "not a valid pack: truncated index")),
            }
        }
    }
}

/// `<prefix>/.litefleet/log`
pub fn log_dir(prefix: &ObjPath) -> ObjPath {
    key_path(prefix, LOG_DIR)
}

/// A new fleet log object's name, written at `now`.
pub fn log_path(prefix: &ObjPath, now: DateTime<Utc>) -> ObjPath {
    let t = commit_millis(now);
    log_dir(prefix).join(format!("{t:016x}_{:08x}{PACK_SUFFIX}", random_u32()).as_str())
}

/// `<index:016x>_<offset:016x>_<time:016x>_<random:08x>.pack`: the name of
/// a consolidated pack whose first part is at WAL `index`, byte `offset`,
/// and newest part committed at `newest`; a new name at every call (see
/// the module docs; [`crate::replica::hot::pack_path`] places it).
pub fn pack_name(index: u64, offset: u64, newest: DateTime<Utc>) -> String {
    let t = commit_millis(newest);
    format!(
        "{index:016x}_{offset:016x}_{t:016x}_{:08x}{PACK_SUFFIX}",
        random_u32()
    )
}

/// The WAL index and offset of a consolidated pack's first part, from its
/// name; `None` for other names.
pub fn parse_pack_name(name: &str) -> Option<(u64, u64)> {
    let mut parts = name.strip_suffix(PACK_SUFFIX)?.split('_');
    let hex = |s: Option<&str>, len: usize| {
        let s = s?;
        (s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
    };
    let index = hex(parts.next(), 16)?;
    let offset = hex(parts.next(), 16)?;
    hex(parts.next(), 16)?;
    hex(parts.next(), 8)?;
    (parts.next().is_none() && offset >= MIN_OFFSET).then_some((index, offset))
}

/// The objects of the fleet log, oldest first (one LIST of its directory,
/// where every log object is written). A "directory" there named like a
/// log object (a directory in a `file://` replica, objects below such a
/// name on S3) fails the listing: the listing would leave it out, and a
/// restore went without the newest frames, exit 0 (black-box probe A26).
pub async fn list_log(replica: &Replica) -> Result<Vec<ObjectMeta>> {
    let dir = log_dir(&replica.prefix);
    let (dirs, objects) = replica.list_children(&dir).await?;
    let is_pack = |p: &ObjPath| p.filename().is_some_and(|f| f.ends_with(PACK_SUFFIX));
    if let Some(d) = dirs.iter().find(|d| is_pack(d)) {
        return Err(Error::invalid(
            d,
            format!(
                "{} in the fleet log: litefleet never writes one there, and a listing leaves \
                 it out (a restore would go without the frames a log object there holds); \
                 move or delete it",
                crate::replica::storage::DIRECTORY_LIKE_AN_OBJECT
            ),
        ));
    }
    let mut v: Vec<ObjectMeta> = objects
        .into_iter()
        .filter(|m| is_pack(&m.location))
        .collect();
    v.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEN: &str = "fffffe6b2f5c7e1f0123abcd";

    #[test]
    fn encode_and_decode_round_trip() {
        let now = DateTime::from_timestamp_millis(1_763_812_800_232).unwrap();
        let parts = vec![
            (
                Part::new("a/b", GEN, 0, 32, now, 0),
                Bytes::from_static(b"first"),
            ),
            (
                Part::new("c", GEN, 0, 4152, now, 0),
                Bytes::from_static(b"second!"),
            ),
        ];
        let bytes = encode(parts).unwrap();
        let i = decode_index(&bytes, "x").unwrap();
        assert_eq!(i.parts.len(), 2);
        let (p, r) = &i.parts[1];
        assert_eq!((p.key.as_str(), p.len, p.offset), ("c", 7, 4152));
        assert_eq!(&bytes[r.start as usize..r.end as usize], b"second!");
        assert_eq!(p.commit_time(), now);
        let (p, r) = &i.parts[0];
        assert_eq!(&bytes[r.start as usize..r.end as usize], b"first");
        assert_eq!((p.index, p.offset, p.generation.as_str()), (0, 32, GEN));
        // Truncated, bad magic, a hostile key or offset: errors, not panics.
        assert!(decode_index(&bytes[..bytes.len() - 1], "x").is_err());
        assert!(decode_index(&bytes[..20], "x").is_err());
        assert!(decode_index(b"LFPACK2\n\0\0\0\0", "x").is_err());
        let one = |key: &str, offset: u64| {
            encode(vec![(
                Part::new(key, GEN, 0, offset, now, 0),
                Bytes::from_static(b"z"),
            )])
            .unwrap()
        };
        assert!(decode_index(&one("ok", 32), "x").is_ok());
        assert!(decode_index(&one("..", 32), "x").is_err());
        assert!(decode_index(&one("ok", 31), "x").is_err());
        // A WAL opening belongs on a WAL's first part, after WAL 0's end.
        let opening = |index: u64, offset: u64, previous_end: Option<u64>| {
            let part = Part {
                opens: Some(WalOpening {
                    salt: [1, 2],
                    checksum: [3, 4],
                    big_endian: false,
                    previous_end,
                }),
                ..Part::new("ok", GEN, index, offset, now, 0)
            };
            decode_index(
                &encode(vec![(part, Bytes::from_static(b"z"))]).unwrap(),
                "x",
            )
        };
        let decoded = opening(1, 32, Some(4152)).unwrap();
        assert_eq!(
            decoded.parts[0].0.opens.and_then(|o| o.previous_end),
            Some(4152)
        );
        assert!(opening(0, 32, None).is_ok());
        assert!(opening(1, 4152, Some(4152)).is_err());
        assert!(opening(0, 32, Some(4152)).is_err());
        assert!(opening(1, 32, Some(31)).is_err());
    }

    #[test]
    fn names() {
        let p = ObjPath::from("pre");
        let at = DateTime::from_timestamp_millis(1_763_812_800_232).unwrap();
        let name = pack_name(2, 4152, at);
        assert!(
            name.starts_with("0000000000000002_0000000000001038_0000019aab6f76e8_"),
            "{name}"
        );
        assert_eq!(parse_pack_name(&name), Some((2, 4152)));
        // Never the same name twice: a pack is never overwritten.
        assert_ne!(name, pack_name(2, 4152, at));
        for bad in [
            "0000000000000002_0000000000001038_0000019aab6f76e8.pack",
            "0000000000000002_0000000000001038_0000019aab6f76e8_0123abcd.wal.lz4",
            "0000000000000002_0000000000000000_0000019aab6f76e8_0123abcd.pack",
            "0000000000000002_0000000000001038_0000019aab6f76e8_0123ABCD.pack",
        ] {
            assert!(parse_pack_name(bad).is_none(), "{bad}");
        }
        let l = log_path(&p, at);
        assert!(
            l.as_ref()
                .starts_with("pre/.litefleet/log/0000019aab6f76e8_"),
            "{l}"
        );
        assert!(l.as_ref().ends_with(".pack"));
    }
}
