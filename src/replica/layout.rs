//! Replica layout: where each database's objects live, for both tiers.
//!
//! ```text
//! <prefix>/<key>/<stem>-YYYYMMDD-HH0000.db.lz4     cold tier  (super::cold)
//! <prefix>/<key>/generations/<gen>/...             hot tier   (super::hot)
//! <prefix>/.litefleet/lease.json                   the replica lease (super::lease)
//! ```
//!
//! * `<prefix>` is the path part of the replica URL (`s3://bucket/<prefix>`).
//! * `<key>` is the key template rendered with the values bound by the
//!   pattern's `*` levels (see [`crate::source::template`]), e.g.
//!   `{{project}}/{{database}}/{{branch}}/{{tenant}}` gives
//!   `p1/orders/main/acme`. The key identifies one database; `restore` and
//!   `list` speak in keys.
//!
//! This module owns the two rules every tier shares: how a key becomes an
//! object path ([`key_path`]) and which keys are acceptable at all
//! ([`check_key`]): keys also come from object names, which anyone with
//! write access to the bucket controls.

use chrono::{DateTime, Utc};
use object_store::path::Path as ObjPath;

use crate::{Error, Result};

/// Joins the replica prefix and a rendered key into an object path.
pub fn key_path(prefix: &ObjPath, key: &str) -> ObjPath {
    let mut p = prefix.clone();
    for part in key.split('/').filter(|s| !s.is_empty()) {
        p = p.join(part);
    }
    p
}

/// Refuses a key that is empty, absolute, or has `.`, `..`, empty
/// segments or a backslash: such a key could name a path outside a
/// restore directory or an object of another key.
pub fn check_key(key: &str) -> Result<()> {
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

/// A commit time as it is written in names: Unix milliseconds, rounded up,
/// so the recorded time is never before the real one.
pub fn commit_millis(t: DateTime<Utc>) -> u64 {
    let ms = t.timestamp_millis();
    let rounded_up = if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms + 1
    };
    rounded_up.max(0) as u64
}

/// 32 random bits without a `rand` dependency: std's `RandomState` is seeded
/// from the OS once per thread and differs for every instance; we also mix in
/// the pid, a process-wide counter and the clock.
pub fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    let x = h.finish();
    (x >> 32) as u32 ^ x as u32
}
