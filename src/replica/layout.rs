//! Replica layout: where each database's objects live, for both tiers.
//!
//! ```text
//! <prefix>/<key>/<stem>-YYYYMMDD-HH0000.db.lz4     cold tier  (super::cold)
//! <prefix>/<key>/generations/<gen>/...             hot tier   (super::hot)
//! <prefix>/.litefleet/lease.json                   the replica lease (super::lease)
//! <prefix>/.litefleet/replica.json                 the replica's identity (super::identity)
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
/// segments, a backslash or a NUL: such a key could name a path outside a
/// restore directory or an object of another key ([`key_path`] drops empty
/// segments, so `k/` would name `k`'s objects). The one rule for keys:
/// `replicate` refuses a database whose key breaks it before anything is
/// uploaded ([`crate::source::keys`]), `restore` refuses such a key.
pub fn check_key(key: &str) -> Result<()> {
    match key_problem(key) {
        None => Ok(()),
        Some(why) => Err(Error::invalid(
            format!("key {key:?}"),
            format!(
                "{why}: keys must be relative and must not contain `.`, `..` or empty segments, `\\` or NUL, nor start with `.litefleet`"
            ),
        )),
    }
}

/// [`check_key`] for a key about to be uploaded: also refuses a key with a
/// `generations` segment after its first ([`new_key_problem`]). Restores
/// still accept such keys, for what was uploaded before.
pub fn check_new_key(key: &str) -> Result<()> {
    check_key(key)?;
    match upload_problem(key) {
        None => Ok(()),
        Some(why) => Err(Error::invalid(format!("key {key:?}"), why)),
    }
}

/// What [`check_new_key`] finds wrong with `key`: [`key_problem`], or a
/// segment `generations` after the first. Each key keeps its hot tier
/// under `<key>/generations/` ([`crate::replica::hot::GENERATIONS_DIR`]),
/// so the objects of a key `K/generations/X` lie among `K`'s generations:
/// `list`, bulk restore and `verify` counted that database as a generation
/// of `K` and left it out (exit 0), and a point-in-time restore of `K`
/// was planned from a generation that was not `K`'s (black-box probe).
///
/// Nor a segment named like a cold snapshot (`<stem>-YYYYMMDD-HH0000.db.lz4`):
/// its directory would lie among another key's snapshots, where a
/// `file://` listing refuses a directory of that name (black-box probe:
/// `acme/acme-20260101-100000.db.lz4` made `acme` unrestorable).
pub fn new_key_problem(key: &str) -> Option<&'static str> {
    key_problem(key).or_else(|| upload_problem(key))
}

/// The rules [`new_key_problem`] adds to [`key_problem`].
fn upload_problem(key: &str) -> Option<&'static str> {
    let mut segments = key.split('/');
    if segments
        .clone()
        .skip(1)
        .any(|s| s == crate::replica::hot::GENERATIONS_DIR)
    {
        return Some(
            "has a `generations` segment after its first: each key keeps its hot tier \
             under `<key>/generations/`, so this key's objects would be taken for another \
             key's (rename the directory, or change multi-db.replica.path)",
        );
    }
    segments
        .any(|s| crate::replica::cold::parse_snapshot_name(s).is_some())
        .then_some(
            "has a segment named like a cold snapshot object (`<stem>-YYYYMMDD-HH0000.db.lz4`): \
             its directory would lie among another key's snapshots (rename the file or \
             directory, or change multi-db.replica.path)",
        )
}

/// The directory of litefleet's own objects under a replica root (the
/// lease, the replica's identity, the fleet log): never a key's first
/// segment.
pub const RESERVED_DIR: &str = ".litefleet";

/// What [`check_key`] finds wrong with `key`, in a few words, or `None`.
pub fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("empty key")
    } else if key.starts_with('/') {
        Some("absolute (starts with `/`)")
    } else if key.ends_with('/') {
        Some("empty segment at the end (trailing `/`)")
    } else if key.split('/').any(str::is_empty) {
        Some("empty segment (`//`)")
    } else if key.split('/').any(|p| p == "." || p == "..") {
        Some("`.` or `..` segment")
    } else if key.contains('\\') {
        Some("contains `\\`")
    } else if key.contains('\0') {
        Some("contains NUL")
    } else if key.split('/').next() == Some(RESERVED_DIR) {
        // The lease, the replica's identity and the fleet log live there:
        // a database keyed into it failed every upload or had its own
        // objects taken for fleet log objects (black-box probe).
        Some("starts with `.litefleet`, the replica's own directory")
    } else {
        None
    }
}

/// One part of a listed object path, decoded: object_store percent-encodes
/// the parts of the paths it stores and lists (`h#x` is stored as `h%23x`,
/// `%` as `%25`, a `.` part as `%2E`), so the key a user wrote is the
/// decoded parts. `Err` (why) for a part that decodes to what no part of a
/// key can be: not UTF-8, empty, `.`, `..`, or holding `/` or NUL. Such an
/// object was not written by litefleet (every key passed [`check_key`]).
pub fn decode_part(part: &str) -> std::result::Result<String, String> {
    let decoded = percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map_err(|_| format!("object path part {part:?} does not decode to UTF-8"))?;
    let bad = match decoded.as_ref() {
        "" => Some("is empty"),
        "." | ".." => Some("is `.` or `..`"),
        d if d.contains('/') => Some("holds `/`"),
        d if d.contains('\0') => Some("holds NUL"),
        _ => None,
    };
    match bad {
        Some(why) => Err(format!(
            "object path part {part:?} decodes to {decoded:?}, which {why}: \
             a key must not contain `.`, `..` or empty segments, `/` within a segment or NUL"
        )),
        None => Ok(decoded.into_owned()),
    }
}

/// The key a listed object path (relative to the replica prefix, parts
/// percent-encoded as object_store lists them) names: every part decoded
/// ([`decode_part`]). The inverse of [`key_path`]; a path with a part that
/// decodes to what no key part can be is refused, naming it.
pub fn decode_key(encoded: &str) -> Result<String> {
    let parts: std::result::Result<Vec<String>, String> =
        encoded.split('/').map(decode_part).collect();
    parts
        .map(|p| p.join("/"))
        .map_err(|why| Error::invalid(format!("key {encoded:?}"), why))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key [`key_path`] would not map to itself is refused, with the
    /// reason; `k/` above all, which would name `k`'s objects.
    #[test]
    fn key_problems_name_the_reason() {
        for (key, why) in [
            ("", "empty key"),
            ("/k", "absolute"),
            ("k/", "trailing `/`"),
            ("a//b", "empty segment"),
            (".", "`.` or `..`"),
            ("a/../b", "`.` or `..`"),
            ("a\\b", "contains `\\`"),
            (".litefleet/lease.json", "the replica's own directory"),
            (".litefleet/log/t1", "the replica's own directory"),
            (".litefleet", "the replica's own directory"),
        ] {
            let problem = key_problem(key).unwrap_or_else(|| panic!("{key:?} accepted"));
            assert!(problem.contains(why), "{key:?}: {problem}");
            let err = check_key(key).unwrap_err().to_string();
            assert!(
                err.contains(problem) && err.contains("must not contain"),
                "{err}"
            );
        }
        let prefix = ObjPath::from("fleet");
        for key in [
            "k",
            "p1/app",
            "..k/k..",
            ".hidden/x",
            "a/.litefleet",
            ".litefleetx/y",
        ] {
            assert_eq!(key_problem(key), None, "{key:?}");
            assert_eq!(key_path(&prefix, key).as_ref(), format!("fleet/{key}"));
        }
    }

    /// A key whose objects would lie among another key's generations is
    /// not uploaded; restores still take it (probe V).
    #[test]
    fn keys_inside_another_keys_generations_are_not_uploaded() {
        for key in [
            "acme/generations/ffffe6a1",
            "a/generations",
            "a/b/generations/c/d",
        ] {
            let why = new_key_problem(key).unwrap_or_else(|| panic!("{key:?} accepted"));
            assert!(
                why.contains("`generations` segment after its first"),
                "{key}: {why}"
            );
            assert!(check_new_key(key).is_err(), "{key}");
            assert_eq!(key_problem(key), None, "{key}");
            check_key(key).unwrap();
        }
        let why = new_key_problem("acme/acme-20260101-100000.db.lz4").unwrap();
        assert!(why.contains("named like a cold snapshot"), "{why}");
        for key in [
            "generations",
            "generations/x",
            "a/generation",
            "a/my-generations/x",
            "a/x.db.lz4",
            "a/b-20260101.db.lz4",
        ] {
            assert_eq!(new_key_problem(key), None, "{key:?}");
        }
        assert_eq!(new_key_problem("a//b"), key_problem("a//b"));
    }

    #[test]
    fn listed_paths_decode_to_the_keys_that_made_them() {
        let prefix = ObjPath::from("backups");
        for key in [
            "d1/h#x",
            "d1/é",
            "d1/p%2Fq",
            "new\nline/t",
            "a b/c~d",
            "p1/d1/main/t1",
        ] {
            check_key(key).unwrap();
            let p = key_path(&prefix, key);
            let rel = &p.as_ref()["backups/".len()..];
            assert_eq!(decode_key(rel).unwrap(), key, "{rel}");
        }
        assert_eq!(
            key_path(&prefix, "d1/h#x").as_ref(),
            "backups/d1/h%23x",
            "object_store encodes parts"
        );
    }

    #[test]
    fn parts_that_cannot_be_key_parts_are_refused() {
        for bad in ["p%2Fq", "%2E", "%2E%2E", "a%00b", "%FF", ""] {
            let e = decode_key(&format!("d1/{bad}/t")).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(check_key("a\0b").is_err());
    }
}
