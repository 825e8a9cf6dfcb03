//! Retention: delete snapshots older than the retention period, but never the
//! newest snapshot of a database, however old it is.
//!
//! A pass streams one listing of the replica prefix and keeps, per database,
//! only the newest snapshot seen so far (a small map: one entry per database,
//! dropped at the end of the pass). Everything else older than the cutoff is
//! deleted in batches, so memory does not grow with the number of objects.
//! Ages come from the names (`<stem>-YYYYMMDD-HH0000.db.lz4`), which sort and
//! compare without a HEAD request per object.
//!
//! Objects that are not snapshot names are never touched.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;

use crate::layout::parse_snapshot_name;
use crate::storage::Replica;
use crate::{Error, Result};

/// Deletions are sent in batches of this size: S3's DeleteObjects limit.
pub const DELETE_BATCH: usize = 1000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    /// Snapshot objects looked at.
    pub examined: usize,
    /// Snapshot objects deleted.
    pub deleted: usize,
    /// Databases whose newest snapshot is older than the cutoff and was kept.
    pub kept_newest_expired: usize,
}

/// Enforces `retention` at time `now` over the whole replica.
pub async fn enforce(
    replica: &Replica,
    retention: Duration,
    now: DateTime<Utc>,
) -> Result<RetentionReport> {
    let cutoff = now - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut newest: HashMap<String, (DateTime<Utc>, ObjPath)> = HashMap::new();
    let mut doomed: Vec<ObjPath> = Vec::new();
    let mut report = RetentionReport::default();
    let mut listing = replica.list_all(&replica.prefix);
    while let Some(meta) = listing.try_next().await? {
        let Some(name) = meta.location.filename() else {
            continue;
        };
        let Some(snap) = parse_snapshot_name(name) else {
            continue;
        };
        report.examined += 1;
        let dir = meta
            .location
            .as_ref()
            .rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or("");
        let db = format!("{dir}/{}", snap.stem);
        let candidate = match newest.get_mut(&db) {
            None => {
                newest.insert(db, (snap.hour, meta.location));
                None
            }
            Some(cur) if snap.hour > cur.0 => {
                let old = std::mem::replace(cur, (snap.hour, meta.location));
                Some(old)
            }
            Some(_) => Some((snap.hour, meta.location)),
        };
        if let Some((hour, loc)) = candidate {
            if hour < cutoff {
                doomed.push(loc);
                if doomed.len() >= DELETE_BATCH {
                    report.deleted += delete_batch(replica, &mut doomed).await?;
                }
            }
        }
    }
    report.deleted += delete_batch(replica, &mut doomed).await?;
    report.kept_newest_expired = newest.values().filter(|(h, _)| *h < cutoff).count();
    Ok(report)
}

async fn delete_batch(replica: &Replica, doomed: &mut Vec<ObjPath>) -> Result<usize> {
    if doomed.is_empty() {
        return Ok(0);
    }
    let paths: Vec<ObjPath> = std::mem::take(doomed);
    let n = paths.len();
    let input = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
    let mut results = replica.store.delete_stream(input);
    while let Some(r) = results.next().await {
        match r {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Error::store("retention delete", e)),
        }
    }
    Ok(n)
}
