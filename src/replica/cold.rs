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
//!   complete. Capture writes it ([`crate::capture::snapshot`]).
//!
//! Choosing ([`choose_cold`]): the newest object, or for a restore at `T` the
//! newest whose copy was complete at or before `T`, read from its record
//! with a ranged GET of its first bytes. An object named hour `H` was
//! complete before `H`; objects without a record (earlier versions) are used
//! only if `H <= T`. The store's listing times are never used to decide what
//! a restore at `T` may include: S3 gives them in whole seconds.

use chrono::{DateTime, Duration as ChronoDuration, NaiveDateTime, TimeZone, Timelike, Utc};
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStoreExt};

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
/// First bytes of the record's payload: names the format and its version.
const RECORD_TAG: &[u8; 8] = b"lfsnap01";
/// Payload: the tag and two times in Unix milliseconds (little endian).
const RECORD_PAYLOAD: usize = 8 + 8 + 8;
/// Bytes of the whole record frame at the start of a cold snapshot object:
/// magic, payload length, payload. A ranged GET of this many bytes reads it.
pub const RECORD_LEN: usize = 4 + 4 + RECORD_PAYLOAD;
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
    /// `started` down to the millisecond, so both stay true bounds.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(RECORD_PAYLOAD as u32).to_le_bytes());
        b[8..16].copy_from_slice(RECORD_TAG);
        b[16..24].copy_from_slice(&self.started.timestamp_millis().to_le_bytes());
        let taken = crate::replica::layout::commit_millis(self.taken) as i64;
        b[24..32].copy_from_slice(&taken.to_le_bytes());
        b
    }

    /// The record at the start of an object (its first [`RECORD_LEN`] bytes
    /// or more); `None` when the object has none (written by an earlier
    /// version) or it is not ours.
    pub fn decode(head: &[u8]) -> Option<SnapshotTimes> {
        let b = head.get(..RECORD_LEN)?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let long = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if word(0) != RECORD_MAGIC || word(4) as usize != RECORD_PAYLOAD || &b[8..16] != RECORD_TAG
        {
            return None;
        }
        Some(SnapshotTimes {
            started: DateTime::from_timestamp_millis(long(16))?,
            taken: DateTime::from_timestamp_millis(long(24))?,
        })
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

/// The snapshot an object is, if its name is a cold snapshot name.
pub fn to_info(meta: ObjectMeta) -> Option<SnapshotInfo> {
    let name = parse_snapshot_name(meta.location.filename()?)?;
    Some(SnapshotInfo {
        stem: name.stem,
        hour: name.hour,
        uploaded: meta.last_modified,
        size: meta.size,
        location: meta.location,
    })
}

/// The snapshots of the database with `key`, oldest first.
///
/// A key usually names a directory holding one database's snapshots. If two
/// databases share a directory (different stems), `dir/stem` selects one.
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
            found = replica
                .list_dir(&key_path(&replica.prefix, dir))
                .await?
                .into_iter()
                .filter_map(to_info)
                .filter(|s| s.stem == stem)
                .collect();
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
/// ranged GET of a few bytes); `None` when it has none.
pub async fn recorded_times(replica: &Replica, s: &SnapshotInfo) -> Result<Option<SnapshotTimes>> {
    if s.size < RECORD_LEN as u64 {
        return Ok(None);
    }
    let head = replica
        .store
        .get_range(&s.location, 0..RECORD_LEN as u64)
        .await
        .map_err(|e| Error::store(&s.location, e))?;
    Ok(SnapshotTimes::decode(&head))
}

/// The cold snapshot to restore: the newest, or the newest whose copy was
/// complete at or before `at` (see the module docs). `with_times`: read the
/// record of the newest one too (needed to compare it with the hot tier).
pub async fn choose_cold(
    replica: &Replica,
    snaps: &[SnapshotInfo],
    at: Option<DateTime<Utc>>,
    with_times: bool,
) -> Result<Option<ColdChoice>> {
    let mut newest_first: Vec<&SnapshotInfo> = snaps.iter().collect();
    newest_first.sort_by_key(|s| std::cmp::Reverse((s.hour, s.uploaded)));
    let Some(t) = at else {
        let Some(&s) = newest_first.first() else {
            return Ok(None);
        };
        let times = if with_times {
            recorded_times(replica, s).await?
        } else {
            None
        };
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
        let times = recorded_times(replica, s).await?;
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

    #[tokio::test]
    async fn without_a_record_only_the_hour_name_counts() {
        // Objects of earlier versions (too small to hold a record, so nothing
        // is read): usable at T only if their hour name is at or before T,
        // whatever their listing time says.
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::for_test_dir(dir.path());
        let s = vec![snap(2, 10), snap(3, 50), snap(4, 5)];
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
}
