//! Restore and listing: from the replica back to a database file.
//!
//! `restore` resolves what the user named (a key such as `p1/orders/main/t1`,
//! or the path of a database that one of the patterns matches) to a key, picks
//! the newest snapshot under it (or the newest uploaded at or before
//! `--timestamp`), and writes the output atomically:
//!
//! 1. stream the object through the LZ4 frame decoder into a temporary file
//!    next to the output (content checksum verified by the decoder),
//! 2. `fsync` it and run `PRAGMA integrity_check`,
//! 3. rename it over the output name and `fsync` the directory.
//!
//! A crash at any point leaves either no output or a complete, checked one.
//!
//! Point in time: a snapshot's object `last_modified` is when its upload
//! finished, which is after the copy was taken, so "uploaded at or before T"
//! guarantees the copy holds nothing written after T.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::config::Loaded;
use crate::error::IoContext;
use crate::layout::{key_path, parse_snapshot_name};
use crate::scheduler::key_for;
use crate::snapshot;
use crate::storage::Replica;
use crate::{Error, Result};

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// A database key, or a path matched by one of the patterns.
    pub target: String,
    pub output: PathBuf,
    pub timestamp: Option<DateTime<Utc>>,
    /// Succeed quietly when the replica has no snapshot.
    pub if_replica_exists: bool,
    /// Succeed quietly when the output already exists.
    pub if_db_not_exists: bool,
}

/// How a restore ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    Restored {
        key: String,
        object: String,
        bytes: u64,
        uploaded: DateTime<Utc>,
    },
    OutputExists,
    NoReplica,
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

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key", "empty key"));
    }
    if key.starts_with('/') || key.split('/').any(|p| p == ".." || p == ".") || key.contains('\\') {
        return Err(Error::invalid(
            format!("key {key:?}"),
            "must be relative and must not contain `.` or `..` segments",
        ));
    }
    Ok(())
}

/// Resolves a restore target (key or database path) to a key.
pub fn resolve_key(loaded: &Loaded, target: &str) -> Result<String> {
    let p = Path::new(target);
    let looks_like_path =
        p.is_absolute() || target.starts_with("./") || target.starts_with("../") || p.exists();
    if looks_like_path {
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let abs: PathBuf = abs
            .components()
            .filter(|c| *c != Component::CurDir)
            .collect();
        return key_for(loaded, &abs).map(|(k, _)| k).ok_or_else(|| {
            Error::invalid(
                abs.display(),
                "is not matched by any pattern in the config; pass its replica key instead (see `litefleet list`)",
            )
        });
    }
    let key = target.trim_matches('/').to_string();
    check_key(&key)?;
    Ok(key)
}

fn to_info(meta: ObjectMeta) -> Option<SnapshotInfo> {
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

/// Picks the snapshot to restore: the newest, or the newest uploaded at or before `at`.
pub fn choose(snaps: &[SnapshotInfo], at: Option<DateTime<Utc>>) -> Option<&SnapshotInfo> {
    snaps
        .iter()
        .filter(|s| at.is_none_or(|t| s.uploaded <= t))
        .max_by_key(|s| (s.hour, s.uploaded))
}

/// Restores one database.
pub async fn restore(
    loaded: &Loaded,
    replica: &Replica,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome> {
    let key = resolve_key(loaded, &opts.target)?;
    if opts.output.exists() {
        if opts.if_db_not_exists {
            return Ok(RestoreOutcome::OutputExists);
        }
        return Err(Error::invalid(
            opts.output.display(),
            "already exists; remove it or pass --if-db-not-exists",
        ));
    }
    let mut snaps = snapshots(replica, &key).await?;
    let Some(snap) = choose(&snaps, opts.timestamp).cloned() else {
        if opts.if_replica_exists {
            return Ok(RestoreOutcome::NoReplica);
        }
        let when = opts
            .timestamp
            .map(|t| format!(" uploaded at or before {}", t.to_rfc3339()))
            .unwrap_or_default();
        return Err(Error::NotFound(format!(
            "no snapshot of {key:?}{when} in {replica}"
        )));
    };
    // A damaged object (a partial write by a store without atomic PUT, bit
    // rot) fails the LZ4 content checksum or the integrity check; it is never
    // installed. Fall back to the next older snapshot, loudly. Store and local
    // I/O errors are not damage and stop the restore.
    let mut snap = snap;
    loop {
        match fetch_to(replica, &snap.location, &opts.output).await {
            Ok(bytes) => {
                return Ok(RestoreOutcome::Restored {
                    key,
                    object: snap.location.to_string(),
                    bytes,
                    uploaded: snap.uploaded,
                })
            }
            Err(e @ (Error::Invalid { .. } | Error::Sqlite { .. })) => {
                snaps.retain(|s| s.location != snap.location);
                let Some(older) = choose(&snaps, opts.timestamp).cloned() else {
                    return Err(e);
                };
                tracing::warn!(object = %snap.location, error = %e, fallback = %older.location, "snapshot is damaged; restoring the next older one");
                snap = older;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Downloads, decompresses, checks and atomically installs one snapshot at `output`.
pub async fn fetch_to(replica: &Replica, location: &ObjPath, output: &Path) -> Result<u64> {
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let got = replica
        .store
        .get(location)
        .await
        .map_err(|e| Error::store(location, e))?;
    let stream = got
        .into_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::StreamReader::new(stream);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let output = output.to_path_buf();
    let what = location.to_string();
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let (mut file, tmp) = snapshot::temp_sibling(&output)?;
        let n = snapshot::decompress(bridge, &what, &mut file)?;
        file.sync_all().at(&*tmp)?;
        drop(file);
        if !crate::discover::has_sqlite_header(&tmp).at(&*tmp)? {
            return Err(Error::invalid(
                &what,
                "decompressed data is not a SQLite database",
            ));
        }
        snapshot::integrity_check(&tmp)?;
        tmp.persist(&output)
            .map_err(|e| Error::io(&output, e.error))?;
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .at(dir)?;
        }
        Ok(n)
    })
    .await
    .map_err(|e| Error::invalid("restore", format!("task failed: {e}")))?
}

/// Databases in the replica (key -> snapshots, oldest first), optionally under `prefix`.
pub async fn list(
    replica: &Replica,
    prefix: Option<&str>,
) -> Result<BTreeMap<String, Vec<SnapshotInfo>>> {
    let root = match prefix {
        Some(p) if !p.trim_matches('/').is_empty() => {
            let p = p.trim_matches('/');
            check_key(p)?;
            key_path(&replica.prefix, p)
        }
        _ => replica.prefix.clone(),
    };
    let base = replica.prefix.as_ref().len();
    let mut out: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
    let mut stream = replica.list_all(&root);
    while let Some(meta) = stream.try_next().await? {
        let Some(info) = to_info(meta) else { continue };
        let loc = info.location.as_ref();
        let dir = loc.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let key = dir
            .get(base..)
            .unwrap_or("")
            .trim_start_matches('/')
            .to_string();
        out.entry(key).or_default().push(info);
    }
    // A directory holding several databases' snapshots lists them as dir/stem.
    let mut split: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
    for (key, mut snaps) in out {
        snaps.sort_by_key(|s| (s.hour, s.uploaded));
        let first = snaps[0].stem.clone();
        if snaps.iter().all(|s| s.stem == first) {
            split.insert(key, snaps);
        } else {
            for s in snaps {
                let k = if key.is_empty() {
                    s.stem.clone()
                } else {
                    format!("{key}/{}", s.stem)
                };
                split.entry(k).or_default().push(s);
            }
        }
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

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

    #[test]
    fn chooses_newest_at_or_before() {
        let s = vec![snap(2, 10), snap(3, 50), snap(4, 5)];
        assert_eq!(choose(&s, None).unwrap().hour, s[2].hour);
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 2, 55, 0).unwrap();
        assert_eq!(choose(&s, Some(t)).unwrap().hour, s[1].hour);
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 1, 9, 0).unwrap();
        assert!(choose(&s, Some(t)).is_none());
    }

    #[test]
    fn keys_cannot_escape() {
        for bad in ["../etc", "a/../../b", "/abs", "a/./b", "a\\b", ""] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        check_key("p1/d1/main/t1").unwrap();
    }
}
