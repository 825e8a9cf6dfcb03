//! Listing: which databases the replica holds, read from every object
//! under a prefix once, as a stream.
//!
//! Cold snapshots give their key (or `dir/stem` when several databases
//! share a directory); hot-tier objects (`<key>/generations/<gen>/...`)
//! give `<key>`, never a key of their own, and only the generation ids are
//! kept, so memory per key stays small however many WAL segments there are.
//! A key with generations but no cold snapshot is listed too. Which object
//! belongs to which key is each tier layout's rule
//! ([`crate::replica::cold::to_info`], [`crate::replica::hot::generation_parts`]).
//!
//! Object paths are listed percent-encoded (object_store encodes each part:
//! `h#x` is stored as `h%23x`); keys are their decoded parts
//! ([`crate::replica::layout::decode_key`]), the keys `restore` and
//! `snapshots` take. A path with a part that decodes to `/`, NUL, `.`, `..`
//! or nothing names no key: it is listed as stored, with
//! [`KeyListing::refused`] saying why.

use std::collections::{BTreeMap, BTreeSet};

use futures::TryStreamExt;

use crate::replica::cold::{self, SnapshotInfo};
use crate::replica::hot::{generation_parts, in_generation, GenerationId};
use crate::replica::layout::{check_key, decode_key, key_path};
use crate::replica::storage::Replica;
use crate::Result;

/// What the replica holds for one database key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyListing {
    /// Cold snapshots, oldest first; empty for a key with only generations.
    pub snapshots: Vec<SnapshotInfo>,
    /// Its generations that hold at least one snapshot, newest first. Only
    /// the ids: their segments are listed when the key is restored.
    pub generations: Vec<GenerationId>,
    /// Why its objects' path cannot be a key (a part decodes to `/`, NUL,
    /// `.`, `..` or nothing, see [`crate::replica::layout::decode_part`]):
    /// such a database is listed under its path as stored and never
    /// restored.
    pub refused: Option<String>,
}

/// The key of the listed (percent-encoded) path `encoded`, or, refused,
/// `encoded` itself and why.
fn key_of(encoded: &str) -> (String, Option<String>) {
    if encoded.is_empty() {
        // Objects at the prefix itself: the empty key, refused by restore.
        return (String::new(), None);
    }
    match decode_key(encoded) {
        Ok(k) => (k, None),
        Err(crate::Error::Invalid { reason, .. }) => (encoded.to_string(), Some(reason)),
        Err(e) => (encoded.to_string(), Some(e.to_string())),
    }
}

/// The listing of `key`, refused if any of its paths is.
fn entry(
    out: &mut BTreeMap<String, KeyListing>,
    (key, refused): (String, Option<String>),
) -> &mut KeyListing {
    let e = out.entry(key).or_default();
    e.refused = e.refused.take().or(refused);
    e
}

/// The stem of a cold snapshot object as listed (still percent-encoded).
fn listed_stem(s: &SnapshotInfo) -> &str {
    let name = s.location.filename().unwrap_or_default();
    let time_and_suffix = "-YYYYMMDD-HHMMSS".len() + cold::SNAPSHOT_SUFFIX.len();
    name.get(..name.len().saturating_sub(time_and_suffix))
        .unwrap_or_default()
}

/// Databases in the replica, optionally under `prefix`: every key with a
/// cold snapshot or a generation snapshot (see the module docs).
pub async fn list_databases(
    replica: &Replica,
    prefix: Option<&str>,
) -> Result<BTreeMap<String, KeyListing>> {
    let root = match prefix {
        Some(p) if !p.trim_matches('/').is_empty() => {
            let p = p.trim_matches('/');
            check_key(p)?;
            key_path(&replica.prefix, p)
        }
        _ => replica.prefix.clone(),
    };
    let base = replica.prefix.as_ref().len();
    let mut cold: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
    let mut hot: BTreeMap<String, BTreeSet<GenerationId>> = BTreeMap::new();
    let mut stream = replica.list_all(&root);
    while let Some(meta) = stream.try_next().await? {
        let loc = meta.location.as_ref();
        let rel = loc.get(base..).unwrap_or("").trim_start_matches('/');
        // Any object of a generation names it, not only its snapshots: a
        // generation whose snapshot is lost must reach the restore, which
        // refuses it, rather than leave the key cold (black-box probe: a
        // bulk restore installed the cold snapshot, exit 0).
        if let Some((key, gen, _)) = generation_parts(rel) {
            hot.entry(key.to_string()).or_default().insert(gen);
            continue;
        }
        let dir = rel.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        if in_generation(dir) {
            continue;
        }
        let dir = dir.to_string();
        if let Some(info) = cold::to_info(meta) {
            cold.entry(dir).or_default().push(info);
        }
    }
    // Keys are the decoded paths; a path that decodes to no key is listed
    // as stored, with why (a decoded `/` must never become a directory).
    let mut out: BTreeMap<String, KeyListing> = BTreeMap::new();
    // A directory holding several databases' snapshots lists them as dir/stem.
    for (dir, mut snaps) in cold {
        snaps.sort_by_key(|s| (s.hour, s.uploaded));
        let first = snaps[0].stem.clone();
        if snaps.iter().all(|s| s.stem == first) {
            entry(&mut out, key_of(&dir)).snapshots = snaps;
        } else {
            for s in snaps {
                let path = if dir.is_empty() {
                    listed_stem(&s).to_string()
                } else {
                    format!("{dir}/{}", listed_stem(&s))
                };
                entry(&mut out, key_of(&path)).snapshots.push(s);
            }
        }
    }
    for (dir, gens) in hot {
        entry(&mut out, key_of(&dir)).generations = gens.into_iter().collect();
    }
    Ok(out)
}

/// Databases in the replica (key -> cold snapshots, oldest first),
/// optionally under `prefix`. Keys with only WAL generations are included
/// with no snapshots; [`list_databases`] also names their generations.
pub async fn list(
    replica: &Replica,
    prefix: Option<&str>,
) -> Result<BTreeMap<String, Vec<SnapshotInfo>>> {
    Ok(list_databases(replica, prefix)
        .await?
        .into_iter()
        .map(|(k, l)| (k, l.snapshots))
        .collect())
}
