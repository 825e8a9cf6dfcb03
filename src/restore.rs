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
//!
//! Bulk restore ([`restore_bulk`]) restores every database under a key prefix
//! into a directory that mirrors the keys (`DIR/<key>.db`), a bounded number
//! at a time. One database failing (a bad key, a corrupt snapshot, an
//! existing output) is reported and the others go on. Keys come from object
//! names, which anyone with write access to the bucket controls, so every
//! key is checked before it becomes a path: no `.`, `..` or empty segments,
//! not absolute, no backslash ([`output_path`]), and the result must stay inside
//! the directory.
//!
//! Progress is reported through hooks ([`OnBytes`] for one download,
//! [`BulkProgress`] for a bulk restore); this module never draws anything.
//! [`crate::progress`] decides between a terminal bar and log lines.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
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

/// Databases restored at once by a bulk restore unless told otherwise. Each
/// one is a GET stream plus a blocking decompress-and-check thread; 16 keeps
/// a link busy with small databases without oversubscribing a small host.
pub const DEFAULT_BULK_CONCURRENCY: usize = 16;

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key", "empty key"));
    }
    if key.starts_with('/')
        || key
            .split('/')
            .any(|p| p == ".." || p == "." || p.is_empty())
        || key.contains('\\')
    {
        return Err(Error::invalid(
            format!("key {key:?}"),
            "must be relative and must not contain `.`, `..` or empty segments or `\\`",
        ));
    }
    Ok(())
}

/// Where bulk restore writes the database with `key`: `dir/<key>.db`, the
/// key's segments as directories and its last segment + `.db` as the file.
/// Refuses any key that could name a path outside `dir`.
pub fn output_path(dir: &Path, key: &str) -> Result<PathBuf> {
    check_key(key)?;
    let mut out = dir.to_path_buf();
    let mut parts = key.split('/').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_some() {
            out.push(part);
        } else {
            out.push(format!("{part}.db"));
        }
    }
    // check_key leaves only normal segments; make sure the OS agrees.
    let inside = out
        .strip_prefix(dir)
        .map(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))))
        .unwrap_or(false);
    if !inside {
        return Err(Error::invalid(
            format!("key {key:?}"),
            format!("would be restored outside {}", dir.display()),
        ));
    }
    Ok(out)
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

/// Download progress hook: called with (compressed bytes received so far,
/// compressed object size) as the object streams in.
pub type OnBytes = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Restores one database.
pub async fn restore(
    loaded: &Loaded,
    replica: &Replica,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome> {
    restore_with_progress(loaded, replica, opts, None).await
}

/// [`restore`], reporting download progress to `on_bytes`.
pub async fn restore_with_progress(
    loaded: &Loaded,
    replica: &Replica,
    opts: &RestoreOptions,
    on_bytes: Option<OnBytes>,
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
    let snaps = snapshots(replica, &key).await?;
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
    let (snap, bytes) =
        fetch_newest_valid(replica, snaps, snap, opts.timestamp, &opts.output, on_bytes).await?;
    Ok(RestoreOutcome::Restored {
        key,
        object: snap.location.to_string(),
        bytes,
        uploaded: snap.uploaded,
    })
}

/// Installs `first` at `output`, or, if it turns out damaged, the next older
/// snapshot in `snaps` (at or before `at`), and so on.
///
/// A damaged object (a partial write by a store without atomic PUT, bit rot)
/// fails the LZ4 content checksum recorded at upload or the integrity check,
/// so it is never installed; the fallback is logged as a warning. Store and
/// local I/O errors are not damage and stop the restore.
async fn fetch_newest_valid(
    replica: &Replica,
    mut snaps: Vec<SnapshotInfo>,
    first: SnapshotInfo,
    at: Option<DateTime<Utc>>,
    output: &Path,
    on_bytes: Option<OnBytes>,
) -> Result<(SnapshotInfo, u64)> {
    let mut snap = first;
    loop {
        match fetch_to_with_progress(replica, &snap.location, output, on_bytes.clone()).await {
            Ok(bytes) => return Ok((snap, bytes)),
            Err(e @ (Error::Invalid { .. } | Error::Sqlite { .. })) => {
                snaps.retain(|s| s.location != snap.location);
                let Some(older) = choose(&snaps, at).cloned() else {
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
    fetch_to_with_progress(replica, location, output, None).await
}

/// [`fetch_to`], calling `on_bytes` as compressed bytes arrive.
pub async fn fetch_to_with_progress(
    replica: &Replica,
    location: &ObjPath,
    output: &Path,
    on_bytes: Option<OnBytes>,
) -> Result<u64> {
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let got = replica
        .store
        .get(location)
        .await
        .map_err(|e| Error::store(location, e))?;
    let total = got.meta.size;
    let mut received = 0u64;
    let stream = got
        .into_stream()
        .inspect_ok(move |chunk| {
            if let Some(f) = &on_bytes {
                received += chunk.len() as u64;
                f(received, total);
            }
        })
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

/// What to restore in bulk and how.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// Key prefix (`p1/orders`); empty or `/` for the whole replica.
    pub prefix: String,
    /// Directory the keys are mirrored into.
    pub output_dir: PathBuf,
    pub timestamp: Option<DateTime<Utc>>,
    /// Databases restored at once (at least 1).
    pub concurrency: usize,
    /// Skip databases whose output already exists (else they fail).
    pub if_db_not_exists: bool,
    /// Succeed with nothing to do when the prefix holds no database (else an error).
    pub if_replica_exists: bool,
}

/// How one database of a bulk restore ended.
#[derive(Debug)]
pub enum BulkOutcome {
    Restored {
        object: String,
        bytes: u64,
        uploaded: DateTime<Utc>,
    },
    /// The output exists and `if_db_not_exists` was given.
    SkippedExists,
    /// No snapshot was uploaded at or before `--timestamp` (the database is newer).
    SkippedNoSnapshotAtTime,
    Failed(Error),
}

/// One database of a bulk restore, as reported to [`BulkProgress::finished`].
#[derive(Debug)]
pub struct BulkItem {
    pub key: String,
    /// `None` when the key was refused before it became a path.
    pub output: Option<PathBuf>,
    pub outcome: BulkOutcome,
}

/// Totals of a bulk restore; `failed` holds (key, error) in completion order.
#[derive(Debug, Default)]
pub struct BulkReport {
    pub databases: usize,
    pub restored: usize,
    pub skipped: usize,
    pub failed: Vec<(String, Error)>,
    /// Decompressed bytes written.
    pub bytes: u64,
}

/// Receives bulk restore progress (implemented by [`crate::progress`]).
pub trait BulkProgress: Send + Sync {
    /// The listing is done: `total` databases will be restored.
    fn started(&self, total: usize);
    /// One database is done (restored, skipped or failed).
    fn finished(&self, item: &BulkItem);
}

/// A [`BulkProgress`] that reports nothing.
pub struct NoProgress;

impl BulkProgress for NoProgress {
    fn started(&self, _: usize) {}
    fn finished(&self, _: &BulkItem) {}
}

async fn restore_one(
    replica: &Replica,
    opts: &BulkOptions,
    key: String,
    snaps: Vec<SnapshotInfo>,
) -> BulkItem {
    let output = match output_path(&opts.output_dir, &key) {
        Ok(p) => p,
        Err(e) => {
            return BulkItem {
                key,
                output: None,
                outcome: BulkOutcome::Failed(e),
            }
        }
    };
    let outcome = if output.exists() {
        if opts.if_db_not_exists {
            BulkOutcome::SkippedExists
        } else {
            BulkOutcome::Failed(Error::invalid(
                output.display(),
                "already exists; remove it or pass --if-db-not-exists",
            ))
        }
    } else {
        match choose(&snaps, opts.timestamp).cloned() {
            None => BulkOutcome::SkippedNoSnapshotAtTime,
            Some(first) => {
                match fetch_newest_valid(replica, snaps, first, opts.timestamp, &output, None).await
                {
                    Ok((snap, bytes)) => BulkOutcome::Restored {
                        object: snap.location.to_string(),
                        bytes,
                        uploaded: snap.uploaded,
                    },
                    Err(e) => BulkOutcome::Failed(e),
                }
            }
        }
    };
    BulkItem {
        key,
        output: Some(output),
        outcome,
    }
}

/// Restores every database under `opts.prefix` into `opts.output_dir`.
///
/// Errors only when nothing can be attempted (bad prefix, listing failed, no
/// database under the prefix); per-database failures are in the report.
pub async fn restore_bulk(
    replica: &Replica,
    opts: &BulkOptions,
    progress: &dyn BulkProgress,
) -> Result<BulkReport> {
    let prefix = opts.prefix.trim_matches('/');
    let dbs = list(replica, Some(prefix)).await?;
    let mut report = BulkReport {
        databases: dbs.len(),
        ..BulkReport::default()
    };
    if dbs.is_empty() {
        if opts.if_replica_exists {
            progress.started(0);
            return Ok(report);
        }
        let under = if prefix.is_empty() {
            String::new()
        } else {
            format!(" under prefix {prefix:?}")
        };
        return Err(Error::NotFound(format!("no databases{under} in {replica}")));
    }
    std::fs::create_dir_all(&opts.output_dir).at(&opts.output_dir)?;
    progress.started(dbs.len());
    let mut done = futures::stream::iter(dbs)
        .map(|(key, snaps)| restore_one(replica, opts, key, snaps))
        .buffer_unordered(opts.concurrency.max(1));
    while let Some(item) = done.next().await {
        progress.finished(&item);
        match item.outcome {
            BulkOutcome::Restored { bytes, .. } => {
                report.restored += 1;
                report.bytes += bytes;
            }
            BulkOutcome::SkippedExists | BulkOutcome::SkippedNoSnapshotAtTime => {
                report.skipped += 1
            }
            BulkOutcome::Failed(e) => report.failed.push((item.key, e)),
        }
    }
    Ok(report)
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
        for bad in [
            "../etc",
            "a/../../b",
            "/abs",
            "a/./b",
            "a\\b",
            "",
            "a//b",
            "a/",
            "..",
        ] {
            assert!(check_key(bad).is_err(), "{bad}");
            assert!(output_path(Path::new("/out"), bad).is_err(), "{bad}");
        }
        check_key("p1/d1/main/t1").unwrap();
        assert_eq!(
            output_path(Path::new("/out"), "p1/d1/t1").unwrap(),
            Path::new("/out/p1/d1/t1.db")
        );
        assert_eq!(
            output_path(Path::new("out"), "..x/t").unwrap(),
            Path::new("out/..x/t.db")
        );
    }
}
