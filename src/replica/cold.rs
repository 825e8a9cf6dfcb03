//! Cold-tier replica layout: hourly snapshots, their names, the times they
//! record, and which one a restore uses.
//!
//! ```text
//! <prefix>/<key>/<stem>-YYYYMMDD-HH0000.db.lz4
//! ```
//!
//! * `<stem>` is the database file name without its extension, and the time
//!   is the *next* full hour (UTC) after the copy was complete. Every upload
//!   within an hour overwrites the same object, so a database costs at most one
//!   stored object per hour however often it changes, and retention can work
//!   from names alone.
//! * Each object is an LZ4 frame of the whole database, preceded by a
//!   [`SnapshotTimes`] record in an LZ4 *skippable frame* (which `lz4 -d`
//!   and every LZ4 frame decoder skip): when the copy began and when it was
//!   complete, (`lfsnap03`) a hash of the key it was written for
//!   ([`key_hash`]), and an xxHash32 of all that. Capture writes it
//!   ([`crate::capture::snapshot`]). Records of the previous versions
//!   (`lfsnap02`: no key; `lfsnap01`: no checksum either) are still read.
//! * Every record is checked when it is read ([`record`]): checksum,
//!   `started <= taken`, `taken` in the hour the name implies, and the key
//!   being the one the object is listed under.
//!   A record failing a check is [`Error::Damaged`], never "no record": a
//!   flipped bit must not let a restore at `T` pick a copy completed after
//!   `T`.
//!
//! Choosing ([`choose_cold`]): the newest object, or for a restore at `T` the
//! newest whose copy was complete at or before `T`, read from its record
//! with a ranged GET of its first bytes. An object named hour `H` was
//! complete before `H`; objects without a record (earlier versions) are used
//! only if `H <= T`. The store's listing times are never used to decide what
//! a restore at `T` may include: S3 gives them in whole seconds.

use chrono::{DateTime, Duration as ChronoDuration, NaiveDateTime, TimeZone, Timelike, Utc};
use object_store::path::Path as ObjPath;
use object_store::ObjectMeta;

use crate::replica::layout::{check_key, key_path};
use crate::replica::storage::Replica;
use crate::{Error, Result};

/// Suffix of cold-tier snapshot objects.
pub const SNAPSHOT_SUFFIX: &str = ".db.lz4";
/// `-YYYYMMDD-HH0000` between the stem and the suffix.
const TIME_FORMAT: &str = "%Y%m%d-%H%M%S";
const TIME_LEN: usize = 15;

/// Magic of the skippable frame holding a [`SnapshotTimes`] record: one of
/// the sixteen the LZ4 frame format reserves for user data
/// (`0x184D2A50..=0x184D2A5F`), which decoders skip.
const RECORD_MAGIC: u32 = 0x184D_2A5A;
/// Magic of an LZ4 frame: an object of a version before the record starts
/// with it.
const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;
/// First bytes of the record's payload: names the format and its version.
/// `lfsnap03`: the times, an xxHash32 of the key's object path (the key the
/// object was written for), and an xxHash32 of the tag, the times and that.
const RECORD_TAG: &[u8; 8] = b"lfsnap03";
/// The second version: the times and an xxHash32 of the tag and both times,
/// no key. Still read (without the key check), written only by
/// [`SnapshotTimes::encode`] for tests of older objects.
const RECORD_TAG_V2: &[u8; 8] = b"lfsnap02";
/// The first version of the record: the times without a checksum. Still
/// read (with the same sanity checks), never written.
const RECORD_TAG_V1: &[u8; 8] = b"lfsnap01";
/// Payload: the tag, two times in Unix milliseconds (little endian), the
/// key's hash ([`key_hash`]) and the xxHash32 (seed 0, little endian) of the
/// 28 bytes before it.
const RECORD_PAYLOAD: usize = 8 + 8 + 8 + 4 + 4;
/// Payload of an `lfsnap02` record: the tag, the two times and the checksum.
const RECORD_PAYLOAD_V2: usize = 8 + 8 + 8 + 4;
/// Payload of an `lfsnap01` record: the tag and the two times.
const RECORD_PAYLOAD_V1: usize = 8 + 8 + 8;
/// Bytes of the whole record frame at the start of a cold snapshot object:
/// magic, payload length, payload. A ranged GET of this many bytes reads it
/// (and the record of earlier objects, which is shorter).
pub const RECORD_LEN: usize = 4 + 4 + RECORD_PAYLOAD;
/// Bytes of an `lfsnap02` record frame.
pub const RECORD_LEN_V2: usize = 4 + 4 + RECORD_PAYLOAD_V2;

/// The hash a record keeps of the key its object was written for: xxHash32
/// (seed 0) of the key's object path below the replica's prefix
/// ([`key_path`] of the key under an empty prefix: its parts encoded as in
/// object names). An object copied or moved under another key no longer
/// matches it (black-box probe: another database's snapshot copied under a
/// key was restored as that key's, exit 0); a whole replica moved under
/// another prefix still does.
pub fn key_hash(key: &str) -> u32 {
    path_hash(&key_path(&ObjPath::default(), key))
}

/// xxHash32 (seed 0) of an object path's text, as [`key_hash`] takes it.
fn path_hash(path: &ObjPath) -> u32 {
    twox_hash::XxHash32::oneshot(0, path.as_ref().as_bytes())
}

/// [`key_hash`] of the key a cold snapshot object at `location` is listed
/// under, in a replica at `prefix`: the object's path below the prefix,
/// without its name. `None` when `location` is not below `prefix`.
fn listed_key_hash(prefix: &ObjPath, location: &ObjPath) -> Option<u32> {
    let parts: Vec<_> = location.prefix_match(prefix)?.collect();
    let (_, dirs) = parts.split_last()?;
    Some(path_hash(&dirs.iter().cloned().collect()))
}

/// xxHash32 (seed 0) of a record's tag and times.
fn record_checksum(tag_and_times: &[u8]) -> u32 {
    twox_hash::XxHash32::oneshot(0, tag_and_times)
}

/// When a cold snapshot's copy began and when it was complete: it holds
/// every transaction committed before `started` and none committed after
/// `taken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotTimes {
    pub started: DateTime<Utc>,
    pub taken: DateTime<Utc>,
}

impl SnapshotTimes {
    /// The record frame (see [`RECORD_LEN`]). `taken` is rounded up and
    /// `started` down to the millisecond, so both stay true bounds; a
    /// `started` after `taken` (the clock stepped back during the copy) is
    /// written as `taken`, an earlier bound that is still true and that
    /// [`SnapshotTimes::decode`] accepts.
    /// The record of an object written for `key` (`lfsnap03`).
    pub fn encode_for(&self, key: &str) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(RECORD_PAYLOAD as u32).to_le_bytes());
        b[8..16].copy_from_slice(RECORD_TAG);
        b[16..32].copy_from_slice(&self.times_bytes());
        b[32..36].copy_from_slice(&key_hash(key).to_le_bytes());
        let sum = record_checksum(&b[8..36]);
        b[36..40].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// An `lfsnap02` record, as versions before the key's hash wrote it
    /// (tests of older objects).
    pub fn encode(&self) -> [u8; RECORD_LEN_V2] {
        let mut b = [0u8; RECORD_LEN_V2];
        b[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(RECORD_PAYLOAD_V2 as u32).to_le_bytes());
        b[8..16].copy_from_slice(RECORD_TAG_V2);
        b[16..32].copy_from_slice(&self.times_bytes());
        let sum = record_checksum(&b[8..32]);
        b[32..36].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// `started` and `taken` as the record holds them.
    fn times_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        let started = self.started.min(self.taken).timestamp_millis();
        b[..8].copy_from_slice(&started.to_le_bytes());
        let taken = crate::replica::layout::commit_millis(self.taken) as i64;
        b[8..].copy_from_slice(&taken.to_le_bytes());
        b
    }

    /// The record at the start of an object named hour `hour` (its first
    /// [`RECORD_LEN`] bytes, or all of a shorter object). `Ok(None)` when
    /// the object starts with an LZ4 frame instead (written by a version
    /// before the record). Anything else is damage, and the reason is
    /// returned: an object that starts with neither, a record of unknown
    /// length or tag, cut short, failing its checksum (`lfsnap02`), or
    /// whose times cannot be true: `started` after `taken`, or `taken`
    /// outside the hour the name implies (`[hour - 1h, hour]`: the name is
    /// the next full hour after the copy was complete, and `taken` is
    /// rounded up to the millisecond, which can reach `hour` itself).
    pub fn decode(
        head: &[u8],
        hour: DateTime<Utc>,
    ) -> std::result::Result<Option<SnapshotTimes>, String> {
        Self::decode_keyed(head, hour).map(|r| r.map(|(t, _)| t))
    }

    /// [`SnapshotTimes::decode`], with the [`key_hash`] an `lfsnap03`
    /// record holds (`None` for older ones).
    pub fn decode_keyed(
        head: &[u8],
        hour: DateTime<Utc>,
    ) -> std::result::Result<Option<(SnapshotTimes, Option<u32>)>, String> {
        let word = |i: usize| {
            head.get(i..i + 4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        };
        let long = |i: usize| i64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
        match word(0) {
            None => return Err(format!("{} bytes, too short for a snapshot", head.len())),
            Some(LZ4_FRAME_MAGIC) => return Ok(None),
            Some(RECORD_MAGIC) => {}
            Some(m) => {
                return Err(format!(
                    "starts with neither a times record nor an LZ4 frame (magic {m:#010x})"
                ))
            }
        }
        let payload = word(4).ok_or("times record cut short")? as usize;
        let tag = head.get(8..16);
        let v3 = payload == RECORD_PAYLOAD && tag == Some(&RECORD_TAG[..]);
        let v2 = payload == RECORD_PAYLOAD_V2 && tag == Some(&RECORD_TAG_V2[..]);
        let v1 = payload == RECORD_PAYLOAD_V1 && tag == Some(&RECORD_TAG_V1[..]);
        if !v1 && !v2 && !v3 {
            return Err(format!(
                "times record of unknown length {payload} or tag {:?}",
                String::from_utf8_lossy(tag.unwrap_or_default())
            ));
        }
        if head.len() < 8 + payload {
            return Err("times record cut short".into());
        }
        let checked = if v3 { 36 } else { 32 };
        if (v2 || v3)
            && word(checked).expect("length checked") != record_checksum(&head[8..checked])
        {
            return Err("times record fails its checksum".into());
        }
        let key = v3.then(|| word(32).expect("length checked"));
        let time = |ms: i64| {
            DateTime::from_timestamp_millis(ms)
                .ok_or_else(|| format!("times record: {ms} ms is out of range"))
        };
        let times = SnapshotTimes {
            started: time(long(16))?,
            taken: time(long(24))?,
        };
        let rfc = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        if times.started > times.taken {
            return Err(format!(
                "times record says the copy began ({}) after it was complete ({})",
                rfc(times.started),
                rfc(times.taken)
            ));
        }
        if times.taken > hour || times.taken < hour - ChronoDuration::seconds(HOUR_SECS) {
            return Err(format!(
                "times record says the copy was complete at {}, outside the hour its name implies (before {})",
                rfc(times.taken),
                rfc(hour)
            ));
        }
        Ok(Some((times, key)))
    }
}

/// The times recorded at the start of the cold snapshot `location` (named
/// hour `hour`) of a replica at `prefix`, from `head`, its first
/// [`RECORD_LEN`] bytes (or all of a shorter object):
/// [`SnapshotTimes::decode`], a bad record being [`Error::Damaged`] naming
/// the object, and so is a record written for another key than the one
/// the object is listed under ([`key_hash`]).
pub fn record(
    prefix: &ObjPath,
    location: &ObjPath,
    hour: DateTime<Utc>,
    head: &[u8],
) -> Result<Option<SnapshotTimes>> {
    let got =
        SnapshotTimes::decode_keyed(head, hour).map_err(|why| Error::damaged(location, why))?;
    match got {
        Some((_, Some(recorded))) if listed_key_hash(prefix, location) != Some(recorded) => {
            Err(Error::damaged(
                location,
                "its times record names another key than the one it is listed under: the \
                 snapshot of another database, copied or moved here",
            ))
        }
        got => Ok(got.map(|(t, _)| t)),
    }
}

/// The next full hour after `t` (a snapshot at 13:00:00 exactly is named 14:00).
pub fn next_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = t
        .with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .unwrap_or(t);
    floor + ChronoDuration::hours(1)
}

/// `<prefix>/<key>/<stem>-YYYYMMDD-HH0000.db.lz4` for a snapshot taken at `taken`.
pub fn snapshot_path(prefix: &ObjPath, key: &str, stem: &str, taken: DateTime<Utc>) -> ObjPath {
    let name = format!(
        "{stem}-{}{SNAPSHOT_SUFFIX}",
        next_hour(taken).format(TIME_FORMAT)
    );
    key_path(prefix, key).join(name.as_str())
}

/// A snapshot object name split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotName {
    pub stem: String,
    pub hour: DateTime<Utc>,
}

/// Parses `<stem>-YYYYMMDD-HH0000.db.lz4`; `None` for any other object.
pub fn parse_snapshot_name(name: &str) -> Option<SnapshotName> {
    let base = name.strip_suffix(SNAPSHOT_SUFFIX)?;
    if base.len() < TIME_LEN + 2 || !base.is_char_boundary(base.len() - TIME_LEN) {
        return None;
    }
    let (head, time) = base.split_at(base.len() - TIME_LEN);
    let stem = head.strip_suffix('-')?;
    let naive = NaiveDateTime::parse_from_str(time, TIME_FORMAT).ok()?;
    Some(SnapshotName {
        stem: stem.to_string(),
        hour: Utc.from_utc_datetime(&naive),
    })
}

/// One snapshot object of a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub location: ObjPath,
    pub stem: String,
    pub hour: DateTime<Utc>,
    pub uploaded: DateTime<Utc>,
    pub size: u64,
}

/// The snapshot an object is, if its name is a cold snapshot name. Its
/// stem is decoded ([`crate::replica::layout::decode_part`]: the stem the
/// database file had); one that cannot be a key part is kept as listed.
pub fn to_info(meta: ObjectMeta) -> Option<SnapshotInfo> {
    let name = parse_snapshot_name(meta.location.filename()?)?;
    Some(SnapshotInfo {
        stem: crate::replica::layout::decode_part(&name.stem).unwrap_or(name.stem),
        hour: name.hour,
        uploaded: meta.last_modified,
        size: meta.size,
        location: meta.location,
    })
}

/// The snapshots of the database with `key`, oldest first.
///
/// A key names a directory holding one database's snapshots. Where
/// several databases share one (different stems, written by versions that
/// did not refuse such keys), `dir/stem` selects one; only there: a key
/// `dir/stem` whose own directory is empty is otherwise another database
/// than `dir`'s (black-box probe: `restore a/main`, never backed up,
/// returned key `a`'s database `main.db` with exit 0).
pub async fn snapshots(replica: &Replica, key: &str) -> Result<Vec<SnapshotInfo>> {
    check_key(key)?;
    let mut found: Vec<SnapshotInfo> = replica
        .list_dir(&key_path(&replica.prefix, key))
        .await?
        .into_iter()
        .filter_map(to_info)
        .collect();
    if found.is_empty() {
        if let Some((dir, stem)) = key.rsplit_once('/') {
            let shared: Vec<SnapshotInfo> = replica
                .list_dir(&key_path(&replica.prefix, dir))
                .await?
                .into_iter()
                .filter_map(to_info)
                .collect();
            if shared.iter().any(|s| s.stem != shared[0].stem) {
                found = shared.into_iter().filter(|s| s.stem == stem).collect();
            }
        }
    }
    let mut stems: Vec<&str> = found.iter().map(|s| s.stem.as_str()).collect();
    stems.sort_unstable();
    stems.dedup();
    if stems.len() > 1 {
        return Err(Error::invalid(
            format!("key {key:?}"),
            format!(
                "holds snapshots of several databases; name one of: {}",
                stems
                    .iter()
                    .map(|s| format!("{key}/{s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    found.sort_by_key(|s| (s.hour, s.uploaded));
    Ok(found)
}

/// One hour: an object named hour `H` holds a copy completed in `[H - 1h, H)`.
pub const HOUR_SECS: i64 = 3600;
/// How far past now the newest name may lie for a restore of the newest
/// state: one hour by design (the next hour's name), and room for the
/// clocks of the uploading and the restoring host to disagree (tests run
/// hours ahead on purpose). Beyond it, the object was named by a clock that
/// ran ahead, and it would hide every later upload named by the right time
/// (black-box probe: one `replicate` at +2 days pinned every latest restore
/// to its state for two days). A clock less than this far ahead is not
/// caught.
pub const FUTURE_NAME_SECS: i64 = 12 * HOUR_SECS;

/// How far `named` lies after this host's clock, when that is more than
/// [`FUTURE_NAME_SECS`]: a name (a cold snapshot's hour, a generation's
/// creation) given by a clock that ran ahead, or put there by hand.
pub fn named_far_ahead(named: DateTime<Utc>) -> Option<chrono::Duration> {
    let ahead = named - Utc::now();
    (ahead > chrono::Duration::seconds(FUTURE_NAME_SECS)).then_some(ahead)
}

/// How far the store's clock may be behind the uploader's for a snapshot
/// still to count as named by the right time: its name is the hour after
/// its upload, so it is at most an hour after the date the store gives
/// it, plus this. S3 refuses requests signed more than 15 minutes off its
/// clock, so a store that accepted the upload was no further behind.
pub const STORE_CLOCK_SLACK_SECS: i64 = 15 * 60;

/// A cold snapshot chosen for a restore.
#[derive(Debug, Clone)]
pub struct ColdChoice {
    pub info: SnapshotInfo,
    /// The times it recorded; `None` for objects of earlier versions, or
    /// when they were not needed (a latest restore with no hot tier).
    pub times: Option<SnapshotTimes>,
}

impl ColdChoice {
    /// The state it holds, to compare with the hot tier: when its copy began
    /// (it holds every commit before); the listing time without a record.
    pub fn state_time(&self) -> DateTime<Utc> {
        self.times.map_or(self.info.uploaded, |t| t.started)
    }

    /// A `--timestamp` that selects it: when its copy was complete, or its
    /// hour name for objects without a record.
    pub fn restorable_at(&self) -> DateTime<Utc> {
        self.times.map_or(self.info.hour, |t| t.taken)
    }
}

/// Reads the times recorded at the start of a cold snapshot object (a
/// ranged GET of a few bytes); `None` when it has none (an object of a
/// version before the record). A record that fails its checksum or its
/// sanity checks is [`Error::Damaged`] (see [`record`]), never `None`.
pub async fn recorded_times(replica: &Replica, s: &SnapshotInfo) -> Result<Option<SnapshotTimes>> {
    let len = s.size.min(RECORD_LEN as u64);
    let gone = || {
        Error::invalid(
            &s.location,
            "was listed but is gone (deleted meanwhile, by retention or by hand)",
        )
    };
    let head = if len == 0 {
        // Listed empty: read whole (there is nothing to download), so that
        // a `file://` entry that is no regular file, which lists as 0
        // bytes (a FIFO, a socket, a device), fails naming what it is, as
        // its download does, rather than reading as an empty object, which
        // is damage and let `--allow-older` pass over it (black-box probe
        // A26).
        replica
            .get_small(&s.location, RECORD_LEN as u64)
            .await?
            .ok_or_else(gone)?
    } else {
        // Retried like every read (black-box probe: one stalled range GET
        // failed the whole restore at once).
        replica
            .get_range_bytes(&s.location, 0..len)
            .await?
            .ok_or_else(gone)?
    };
    record(&replica.prefix, &s.location, s.hour, &head)
}

/// Why [`choose_cold`] could not choose.
#[derive(Debug)]
pub enum ChooseError {
    /// The times record of this snapshot, which the choice needed, is
    /// damaged ([`Error::Damaged`], see [`recorded_times`]): whether it may
    /// be restored at the asked time cannot be told, and it is never taken
    /// for an object without a record.
    Damaged(Box<SnapshotInfo>, Error),
    /// Any other error (the store failed).
    Other(Error),
}

impl ChooseError {
    fn of(s: &SnapshotInfo, e: Error) -> ChooseError {
        match e {
            Error::Damaged { .. } => ChooseError::Damaged(Box::new(s.clone()), e),
            e => ChooseError::Other(e),
        }
    }
}

impl From<ChooseError> for Error {
    fn from(e: ChooseError) -> Error {
        match e {
            ChooseError::Damaged(_, e) | ChooseError::Other(e) => e,
        }
    }
}

/// The cold snapshot to restore: the newest, or the newest whose copy was
/// complete at or before `at` (see the module docs). `with_times`: read the
/// record of the newest one too (needed to compare it with the hot tier).
/// A damaged record of a snapshot it had to read stops the choice
/// ([`ChooseError::Damaged`]): the caller decides whether to go on without
/// that snapshot.
pub async fn choose_cold(
    replica: &Replica,
    snaps: &[SnapshotInfo],
    at: Option<DateTime<Utc>>,
    with_times: bool,
) -> std::result::Result<Option<ColdChoice>, ChooseError> {
    let mut newest_first: Vec<&SnapshotInfo> = snaps.iter().collect();
    newest_first.sort_by_key(|s| std::cmp::Reverse((s.hour, s.uploaded)));
    let read = |s: &SnapshotInfo| {
        let s = s.clone();
        async move {
            recorded_times(replica, &s)
                .await
                .map_err(|e| ChooseError::of(&s, e))
        }
    };
    let Some(t) = at else {
        let Some(&s) = newest_first.first() else {
            return Ok(None);
        };
        if let Some(ahead) = named_far_ahead(s.hour) {
            return Err(ChooseError::Other(Error::invalid(
                s.location.as_ref(),
                format!(
                    "the newest snapshot by name is named {}, {} hours from now: the clock of the host \
                     that uploaded it ran ahead, and later uploads, named by the right time, may hold \
                     newer states; not restoring it as the newest. Restore with --timestamp (the newest \
                     copy complete by then), or delete that object",
                    s.hour.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    ahead.num_hours()
                ),
            )));
        }
        // Less far ahead: a name more than an hour after the store dated
        // the object (the store's clock, not the uploader's) was given by a
        // clock that ran ahead, and a snapshot the store dated later holds
        // a newer state under an earlier name.
        let early = s.hour - s.uploaded;
        if early > chrono::Duration::seconds(HOUR_SECS + STORE_CLOCK_SLACK_SECS) {
            if let Some(later) = newest_first.iter().find(|o| o.uploaded > s.uploaded) {
                return Err(ChooseError::Other(Error::invalid(
                    s.location.as_ref(),
                    format!(
                        "the newest snapshot by name is named {}, {} minutes after the store dated it \
                         ({}): the clock of the host that uploaded it ran ahead, and {} (dated {}) \
                         holds a newer state under an earlier name; not restoring it as the newest. \
                         Restore with --timestamp (the newest copy complete by then), or delete that object",
                        s.hour.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        early.num_minutes(),
                        s.uploaded.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        later.location,
                        later.uploaded.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    ),
                )));
            }
        }
        let times = if with_times { read(s).await? } else { None };
        return Ok(Some(ColdChoice {
            info: s.clone(),
            times,
        }));
    };
    for s in newest_first {
        if s.hour - chrono::Duration::seconds(HOUR_SECS) > t {
            // Completed at or after the hour before its name: after `at`.
            continue;
        }
        let times = read(s).await?;
        let usable = match times {
            Some(r) => r.taken <= t,
            // Earlier versions: only the name is certain.
            None => s.hour <= t,
        };
        if usable {
            return Ok(Some(ColdChoice {
                info: s.clone(),
                times,
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    /// An entry of a `file://` replica that is no regular file lists as 0
    /// bytes under a snapshot's name; reading its times record (a
    /// point-in-time restore's choice) names what it is, as its download
    /// does, and is no damage that `--allow-older` would pass over
    /// (black-box probe A26). A real empty object is damage.
    #[tokio::test]
    async fn a_snapshot_name_on_a_fifo_is_named_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::open_dir(dir.path()).unwrap();
        let loc = snapshot_path(&r.prefix, "k", "k", Utc::now());
        std::fs::create_dir_all(dir.path().join("k")).unwrap();
        let path = dir.path().join(loc.as_ref());
        let c = std::ffi::CString::new(path.clone().into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let listed = snapshots(&r, "k").await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].size, 0);
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            recorded_times(&r, &listed[0]),
        )
        .await
        .expect("hung")
        .unwrap_err();
        assert!(!matches!(e, Error::Damaged { .. }), "{e:?}");
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        std::fs::remove_file(&path).unwrap();
        r.put_bytes(&loc, Vec::new()).await.unwrap();
        let listed = snapshots(&r, "k").await.unwrap();
        let e = recorded_times(&r, &listed[0]).await.unwrap_err();
        assert!(matches!(e, Error::Damaged { .. }), "{e:?}");
    }

    #[test]
    fn next_hour_naming() {
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 13, 42, 7).unwrap();
        let p = snapshot_path(&ObjPath::from("backups"), "p1/d1/main/t1", "t1", t);
        assert_eq!(
            p.as_ref(),
            "backups/p1/d1/main/t1/t1-20261122-140000.db.lz4"
        );
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 0, 0).unwrap();
        assert_eq!(
            snapshot_path(&ObjPath::default(), "k", "x", t).as_ref(),
            "k/x-20270101-000000.db.lz4"
        );
    }

    #[test]
    fn parse_roundtrip() {
        let n = parse_snapshot_name("my-db-20261122-140000.db.lz4").unwrap();
        assert_eq!(n.stem, "my-db");
        assert_eq!(
            n.hour,
            Utc.with_ymd_and_hms(2026, 11, 22, 14, 0, 0).unwrap()
        );
        assert!(parse_snapshot_name("x-2026112-140000.db.lz4").is_none());
        assert!(parse_snapshot_name("x.db").is_none());
        assert!(parse_snapshot_name("-20261122-140000.db.lz4").is_none());
    }

    fn snap(hour: u32, up_min: u32) -> SnapshotInfo {
        SnapshotInfo {
            location: ObjPath::from(format!("k/x-202611220{hour}0000.db.lz4")),
            stem: "x".into(),
            hour: Utc.with_ymd_and_hms(2026, 11, 22, hour, 0, 0).unwrap(),
            uploaded: Utc
                .with_ymd_and_hms(2026, 11, 22, hour - 1, up_min, 0)
                .unwrap(),
            size: 1,
        }
    }

    /// Stores `head` and an LZ4 frame as the object of `s`.
    async fn put(r: &Replica, s: &mut SnapshotInfo, head: &[u8]) {
        use std::io::Write;
        let mut enc = lz4_flex::frame::FrameEncoder::new(head.to_vec());
        enc.write_all(b"a database").unwrap();
        let obj = enc.finish().unwrap();
        s.size = obj.len() as u64;
        r.store.put(&s.location, obj.into()).await.unwrap();
    }

    #[tokio::test]
    async fn without_a_record_only_the_hour_name_counts() {
        // Objects of earlier versions (an LZ4 frame, no record): usable at
        // T only if their hour name is at or before T, whatever their
        // listing time says.
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::for_test_dir(dir.path());
        let mut s = vec![snap(2, 10), snap(3, 50), snap(4, 5)];
        for s in &mut s {
            put(&r, s, &[]).await;
        }
        let hour = |c: Option<ColdChoice>| c.map(|c| c.info.hour);
        let pick = |t| choose_cold(&r, &s, t, true);
        assert_eq!(hour(pick(None).await.unwrap()), Some(s[2].hour));
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 2, 55, 0).unwrap();
        assert_eq!(hour(pick(Some(t)).await.unwrap()), Some(s[0].hour));
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap();
        assert_eq!(hour(pick(Some(t)).await.unwrap()), Some(s[1].hour));
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 1, 9, 0).unwrap();
        assert!(pick(Some(t)).await.unwrap().is_none());
    }

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, h, m, s).unwrap()
    }

    /// An `lfsnap01` record, as the previous version wrote it.
    fn v1(started: DateTime<Utc>, taken: DateTime<Utc>) -> Vec<u8> {
        let mut b = RECORD_MAGIC.to_le_bytes().to_vec();
        b.extend_from_slice(&(RECORD_PAYLOAD_V1 as u32).to_le_bytes());
        b.extend_from_slice(RECORD_TAG_V1);
        b.extend_from_slice(&started.timestamp_millis().to_le_bytes());
        b.extend_from_slice(&taken.timestamp_millis().to_le_bytes());
        b
    }

    /// A copy from 10:01:50 to 10:01:55.
    fn sample() -> SnapshotTimes {
        SnapshotTimes {
            started: at(10, 1, 50),
            taken: at(10, 1, 55),
        }
    }

    #[test]
    fn records_roundtrip_and_old_ones_are_read() {
        let t = sample();
        let hour = next_hour(t.taken);
        let mut obj = t.encode_for("k").to_vec();
        obj.extend_from_slice(&LZ4_FRAME_MAGIC.to_le_bytes());
        assert_eq!(&obj[8..16], b"lfsnap03");
        assert_eq!(SnapshotTimes::decode(&obj, hour), Ok(Some(t)));
        assert_eq!(SnapshotTimes::decode(&obj[..RECORD_LEN], hour), Ok(Some(t)));
        let mut obj = t.encode().to_vec();
        obj.extend_from_slice(&LZ4_FRAME_MAGIC.to_le_bytes());
        assert_eq!(&obj[8..16], b"lfsnap02");
        assert_eq!(SnapshotTimes::decode(&obj, hour), Ok(Some(t)));
        let old = v1(t.started, t.taken);
        assert_eq!(SnapshotTimes::decode(&old, hour), Ok(Some(t)));
        // No record: an LZ4 frame right away.
        assert_eq!(
            SnapshotTimes::decode(&LZ4_FRAME_MAGIC.to_le_bytes(), hour),
            Ok(None)
        );
        // Rounded up to the hour itself: still its hour.
        let edge = SnapshotTimes {
            started: at(10, 59, 59),
            taken: at(10, 59, 59) + ChronoDuration::microseconds(999_900),
        };
        assert_eq!(
            SnapshotTimes::decode(&edge.encode(), next_hour(edge.taken))
                .unwrap()
                .unwrap()
                .taken,
            at(11, 0, 0)
        );
        // The clock stepped back during the copy: `started` is written as
        // `taken`, so the record stays sound.
        let stepped = SnapshotTimes {
            started: at(10, 1, 56),
            taken: at(10, 1, 55),
        };
        let back = SnapshotTimes::decode(&stepped.encode(), hour)
            .unwrap()
            .unwrap();
        assert_eq!((back.started, back.taken), (stepped.taken, stepped.taken));
    }

    #[test]
    fn every_flipped_bit_of_a_record_is_damage() {
        let t = sample();
        let hour = next_hour(t.taken);
        let v2 = t.encode();
        for bit in 0..RECORD_LEN_V2 * 8 {
            let mut b = v2;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(SnapshotTimes::decode(&b, hour).is_err(), "bit {bit}");
        }
        let good = t.encode_for("p/d/t");
        for bit in 0..RECORD_LEN * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(SnapshotTimes::decode(&b, hour).is_err(), "bit {bit}");
        }
        // The tester's flip: bit 20 of `taken`.
        let mut b = good;
        b[24 + 2] ^= 1 << 4;
        let why = SnapshotTimes::decode(&b, hour).unwrap_err();
        assert!(why.contains("checksum"), "{why}");
        // Cut short, empty, or not ours.
        for n in [0, 3, 8, 20, RECORD_LEN - 1] {
            assert!(SnapshotTimes::decode(&good[..n], hour).is_err(), "{n}");
        }
        assert!(SnapshotTimes::decode(b"garbage!", hour).is_err());
    }

    /// A record names the key its object was written for: listed under
    /// another key (copied or moved there), the object is damage; a whole
    /// replica under another prefix is not; records without a key (older
    /// versions) are read as before (probe X: another database's snapshot
    /// copied under a key was restored as that key's, exit 0).
    #[test]
    fn a_record_belongs_to_its_key() {
        let t = sample();
        let hour = next_hour(t.taken);
        let head = t.encode_for("p/d/é t");
        let prefix = ObjPath::from("fleet");
        let at = |key: &str| snapshot_path(&prefix, key, "t", t.taken);
        assert_eq!(
            record(&prefix, &at("p/d/é t"), hour, &head).unwrap(),
            Some(t)
        );
        let e = record(&prefix, &at("p/d/b"), hour, &head).unwrap_err();
        assert!(matches!(e, Error::Damaged { .. }), "{e:?}");
        assert!(e.to_string().contains("names another key"), "{e}");
        assert!(e.to_string().contains("p/d/b"), "{e}");
        // Below a prefix, or a part of it, that is not the replica's.
        let e = record(&prefix, &at("d/é t"), hour, &head).unwrap_err();
        assert!(e.to_string().contains("names another key"), "{e}");
        let moved = ObjPath::from("new/place");
        let loc = snapshot_path(&moved, "p/d/é t", "t", t.taken);
        assert_eq!(record(&moved, &loc, hour, &head).unwrap(), Some(t));
        // Older records carry no key.
        assert_eq!(
            record(&prefix, &at("p/d/b"), hour, &t.encode()).unwrap(),
            Some(t)
        );
    }

    #[test]
    fn old_records_are_sanity_checked() {
        let hour = at(11, 0, 0);
        // The tester's flip on an `lfsnap01` record: taken 10:19:20 became
        // 10:01:55, before the copy began.
        let why = SnapshotTimes::decode(&v1(at(10, 19, 20), at(10, 1, 55)), hour).unwrap_err();
        assert!(why.contains("after it was complete"), "{why}");
        // Taken outside the hour the name implies, either way.
        for taken in [at(9, 59, 59), at(11, 0, 1), at(2, 0, 0)] {
            let why = SnapshotTimes::decode(&v1(at(1, 0, 0), taken), hour).unwrap_err();
            assert!(why.contains("outside the hour"), "{why}");
        }
        assert!(SnapshotTimes::decode(&v1(at(10, 0, 0), at(10, 0, 0)), hour).is_ok());
        // A v1 record cut short is damage too.
        let old = v1(at(10, 1, 0), at(10, 2, 0));
        assert!(SnapshotTimes::decode(&old[..31], hour).is_err());
    }

    #[tokio::test]
    async fn a_damaged_record_stops_the_choice() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::for_test_dir(dir.path());
        let (mut old, mut new) = (snap(2, 10), snap(3, 50));
        put(&r, &mut old, &[]).await;
        // Really taken 02:50; the flip says 02:01.
        let mut rec = v1(at(2, 49, 0), at(2, 50, 0));
        rec[24..32].copy_from_slice(&at(2, 1, 0).timestamp_millis().to_le_bytes());
        put(&r, &mut new, &rec).await;
        let s = vec![old.clone(), new.clone()];
        for t in [Some(at(2, 30, 0)), None] {
            match choose_cold(&r, &s, t, true).await {
                Err(ChooseError::Damaged(info, e)) => {
                    assert_eq!(info.location, new.location);
                    assert!(matches!(e, Error::Damaged { .. }), "{e}");
                    assert!(e.to_string().contains(new.location.as_ref()), "{e}");
                }
                other => panic!("{other:?}"),
            }
        }
        // Before its hour began it is never read.
        let c = choose_cold(&r, &s, Some(at(1, 59, 0)), true).await.unwrap();
        assert!(c.is_none());
    }
}
