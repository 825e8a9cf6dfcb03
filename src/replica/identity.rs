//! Which replica the state file's upload records belong to.
//!
//! `replicate` keeps, in its state file, the fingerprint of every database
//! at its last upload, so a restart does not upload the unchanged ones
//! again. Those records are only true of the replica they were made
//! against. A replica emptied behind the daemon's back (a bucket or
//! directory wiped, a store that lost its data) must get every database
//! again, and "the replica holds nothing" is not a test for that: the
//! daemon may have written to the emptied replica before it noticed (a hot
//! database's next sync), or been killed while uploading everything again,
//! and each time the replica held *something* while the stale records
//! said the rest was there (black-box probe: 290 of 300, and 2,900 of
//! 3,000 databases never uploaded again, the daemon healthy).
//!
//! So a replica root holds an identity: the object
//! `<prefix>/.litefleet/replica.json` with a random id, written once and
//! never deleted by litefleet. The state file has a sidecar with the id its
//! records were made against (`crate::source::track::recorded_replica`). At start the records are trusted only when
//! the two agree; otherwise they are forgotten (and the emptied state saved)
//! before a missing identity is written anew and the sidecar updated, in
//! that order, so a crash at any point leaves records that are either
//! forgotten or true. A replica and state file that both predate
//! identities keep the earlier test (the replica holds backups at all).
//!
//! Deleting `.litefleet/` (or a lifecycle rule expiring it) costs one
//! upload of every database at the next start, never a missing backup.

use object_store::path::Path as ObjPath;
use serde::{Deserialize, Serialize};

use crate::replica::layout::key_path;
use crate::replica::storage::Replica;
use crate::{Error, Result};

/// The identity object, under the lease's directory (which listings of
/// keys pass over).
pub const IDENTITY_OBJECT: &str = ".litefleet/replica.json";
/// Largest identity object read: ours is under 100 bytes; a bigger one is
/// not ours, and is refused before it is downloaded.
const MAX_IDENTITY_BYTES: u64 = 64 << 10;

/// What the identity object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// 32 hex digits, random.
    pub id: String,
    /// When it was made (RFC 3339), for people.
    pub created: String,
}

impl Identity {
    /// A new random identity.
    pub fn new() -> Identity {
        // std's `RandomState` is seeded from the OS's entropy; two of them,
        // over the time and the process, give 128 bits without another crate.
        use std::hash::BuildHasher;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let half =
            || std::collections::hash_map::RandomState::new().hash_one((now, std::process::id()));
        Identity {
            id: format!("{:016x}{:016x}", half(), half()),
            created: chrono::Utc::now().to_rfc3339(),
        }
    }
}

impl Default for Identity {
    fn default() -> Self {
        Identity::new()
    }
}

/// Where the identity of `replica` is stored.
pub fn location(replica: &Replica) -> ObjPath {
    key_path(&replica.prefix, IDENTITY_OBJECT)
}

/// The replica's identity; `None` when it has none. An object that is not
/// an identity is an error naming it.
pub async fn read(replica: &Replica) -> Result<Option<Identity>> {
    let loc = location(replica);
    let Some(bytes) = replica.get_small(&loc, MAX_IDENTITY_BYTES).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::invalid(&loc, format!("not a replica identity: {e}")))
}

/// A replica root that another one lies inside (see [`enclosing_root`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnclosingRoot {
    /// How to name it: `file:///dir` or the bucket prefix.
    pub name: String,
    /// When its identity was made, if it says so readably.
    pub created: Option<chrono::DateTime<chrono::Utc>>,
}

impl Identity {
    /// When it was made, if its `created` is an RFC 3339 time.
    pub fn created_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::parse_from_rfc3339(&self.created)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }
}

/// The replica root that `replica`'s lies inside, if any: a parent
/// directory (`file://`) or a shorter prefix of the same bucket (S3) that
/// holds an identity. A replicator of that root lists everything under it,
/// so it would take this replica's objects for databases of its own and
/// delete them by its retention (black-box probe: a root with `retention:
/// 1h` deleted a 7-hour-old snapshot of one nested in it, kept for 720h).
/// One request per level of the prefix on S3 (a GET of the identity where
/// there is one), a read per parent directory on `file://`; a parent that
/// cannot be read holds no replica of ours.
pub async fn enclosing_root(replica: &Replica) -> Result<Option<EnclosingRoot>> {
    let created = |bytes: &[u8]| {
        serde_json::from_slice::<Identity>(bytes)
            .ok()
            .and_then(|i| i.created_at())
    };
    if let Some(dir) = replica.local_root() {
        for d in dir.ancestors().skip(1) {
            let path = d.join(IDENTITY_OBJECT);
            if std::fs::symlink_metadata(&path).is_ok() {
                return Ok(Some(EnclosingRoot {
                    name: format!("file://{}", d.display()),
                    created: crate::replica::storage::read_regular(&path, MAX_IDENTITY_BYTES)
                        .ok()
                        .and_then(|b| created(&b)),
                }));
            }
        }
        return Ok(None);
    }
    // The prefix's own parts, already encoded: a prefix rebuilt from its
    // text was encoded twice where it holds `%` or non-ASCII characters,
    // and the root above it was never found (black-box probe).
    let parts: Vec<_> = replica.prefix.parts().collect();
    for n in (0..parts.len()).rev() {
        let outer: ObjPath = parts[..n].iter().cloned().collect();
        let loc = key_path(&outer, IDENTITY_OBJECT);
        let name = if n == 0 {
            "the root of the same bucket".to_string()
        } else {
            format!("the prefix \"{outer}\" of the same bucket")
        };
        match replica.get_small(&loc, MAX_IDENTITY_BYTES).await {
            Ok(Some(bytes)) => {
                return Ok(Some(EnclosingRoot {
                    name,
                    created: created(&bytes),
                }))
            }
            Ok(None) => {}
            // Credentials for this prefix only may not read above it: a
            // root there is not one these credentials replicate to.
            Err(Error::Store {
                source:
                    object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. },
                ..
            }) => {}
            // Too large to be an identity: still a root of someone's.
            Err(Error::Invalid { .. }) => {
                return Ok(Some(EnclosingRoot {
                    name,
                    created: None,
                }))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Writes `identity` as the replica's (durable when it returns).
pub async fn write(replica: &Replica, identity: &Identity) -> Result<()> {
    let body = serde_json::to_vec_pretty(identity)
        .map_err(|e| Error::invalid(location(replica), e.to_string()))?;
    replica.put_bytes(&location(replica), body).await
}
