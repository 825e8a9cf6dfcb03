//! Retention: delete what only serves restore points older than the retention
//! period, but never what the newest state of a database needs.
//!
//! The cutoff is `now - retention`. A pass has two parts.
//!
//! **Cold snapshots** (`<key>/<stem>-YYYYMMDD-HH0000.db.lz4`): a restore at
//! any `T` at or after the cutoff uses the newest snapshot copied by `T`, so
//! each database keeps every snapshot named after the cutoff and the newest
//! one named at or before it (*base*: its copy was complete by the cutoff);
//! the older ones are deleted. So the newest snapshot is never deleted,
//! however old it is, and a database that changed 31 and 2 days ago still
//! restores its 31-day-old state at 10 days ago (black-box probe: that
//! snapshot was deleted, and the restore failed). Ages come from the names
//! (the hour in the name), which sort and compare without a HEAD request
//! per object.
//!
//! **Hot generations** (`<key>/generations/<gen>/...`, see
//! [`crate::replica::hot`]): a restore at `T` uses the newest generation with a
//! snapshot committed at or before `T` (the time in its name), its newest
//! such snapshot, and the
//! segments from that snapshot's WAL index on. Retention keeps whatever a
//! restore at any `T` at or after the cutoff could use, and deletes the rest:
//!
//! * Within a generation, let *base* be its newest snapshot both uploaded
//!   and committed at or before the cutoff (a whole-second listing time can
//!   precede the commit time). Every restore at or after the cutoff that uses this
//!   generation starts from *base* or a later snapshot, so snapshots with a
//!   lower index than *base* and segments of WAL indexes below *base*'s are
//!   deleted. *base* and everything after it stay. A generation without such
//!   a snapshot loses nothing.
//! * A generation other than the newest (the first id of
//!   [`crate::replica::hot::list_generation_ids`]) is deleted entirely, `metadata.json` included,
//!   when its newest object was uploaded before the cutoff **and** a newer
//!   generation has a snapshot uploaded at or before the cutoff. The second
//!   condition is what makes this safe: from the cutoff on, restore always
//!   finds that newer generation first (and keeps its *base*). Without it, a
//!   database that was idle past the cutoff and only then started a new
//!   generation would lose the restore points between the cutoff and the new
//!   generation's first snapshot, and a newest generation without any
//!   snapshot yet would leave nothing to restore.
//! * The newest generation is therefore never deleted entirely: it keeps its
//!   newest snapshot and every segment after it, however old they are.
//! * `metadata.json` of a generation that stays is not rewritten, so it may
//!   still list snapshots that were deleted; restore does not read it.
//!
//! Objects whose names do not parse (neither a cold snapshot name nor a
//! generation's snapshot, segment or metadata) are never deleted; objects
//! inside a generation directory are never treated as cold snapshots.
//!
//! Memory and requests per pass:
//!
//! * One streaming LIST of the whole replica prefix (one request per 1000
//!   objects). It keeps the newest cold snapshot per database and, per
//!   generation, a few counters (its newest upload, *base*, its lowest
//!   snapshot and segment index): one small entry per database and
//!   generation, dropped at the end of the pass. Cold deletions are sent
//!   while listing.
//! * No other request for a generation with nothing to delete: a database
//!   that stays hot for months costs its share of that one listing only, not
//!   a LIST of its own every pass (at the product's scenario, 250 always-hot
//!   databases, that is 360,000 LIST requests a month saved).
//! * A generation with something to delete gets a streaming LIST of its
//!   directory that deletes as it goes; the decision is a rule (index below
//!   *base*, or the whole generation), not a list of names. Generations
//!   created after the first listing are not known to the pass, so the
//!   newest one it knows is never deleted whole (a later one would only
//!   make deleting safer).
//! * Deletions go out in batches of [`DELETE_BATCH`] (one DeleteObjects
//!   request each on S3), so memory does not grow with the number of objects.
//!   Up to [`KEY_CONCURRENCY`] keys are handled at once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;

use crate::replica::cold::parse_snapshot_name;
use crate::replica::hot::{
    generation_dir, generation_parts, parse_generation_object, parse_snapshot_name_time,
    GenerationId, GenerationObject,
};
use crate::replica::layout::check_key;
use crate::replica::storage::Replica;
use crate::Result;

/// Deletions are sent in batches of this size: S3's DeleteObjects limit.
pub const DELETE_BATCH: usize = 1000;
/// Keys whose generations are examined at the same time.
pub const KEY_CONCURRENCY: usize = 8;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    /// Cold snapshot objects looked at.
    pub examined: usize,
    /// Cold snapshot objects deleted.
    pub deleted: usize,
    /// Databases whose newest cold snapshot is older than the cutoff and was kept.
    pub kept_newest_expired: usize,
    /// Keys that have a `generations/` directory.
    pub generation_keys: usize,
    /// Generations looked at.
    pub generations: usize,
    /// Generations deleted entirely (superseded before the cutoff).
    pub generations_deleted: usize,
    /// Generation snapshot objects deleted (in deleted generations too).
    pub generation_snapshots_deleted: usize,
    /// WAL segment objects deleted (in deleted generations too).
    pub wal_deleted: usize,
}

impl RetentionReport {
    /// Adds the generation counters of `other` (the cold ones stay).
    fn add_hot(&mut self, other: RetentionReport) {
        self.generations += other.generations;
        self.generations_deleted += other.generations_deleted;
        self.generation_snapshots_deleted += other.generation_snapshots_deleted;
        self.wal_deleted += other.wal_deleted;
    }
}

/// Enforces `retention` at time `now` over the whole replica.
pub async fn enforce(
    replica: &Replica,
    retention: Duration,
    now: DateTime<Utc>,
) -> Result<RetentionReport> {
    let cutoff = now - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let (mut report, keys) = enforce_cold(replica, cutoff).await?;
    report.generation_keys = keys.len();
    let hot = futures::stream::iter(keys)
        .map(|(key, gens)| enforce_key(replica, key, gens, cutoff))
        .buffer_unordered(KEY_CONCURRENCY)
        .try_fold(RetentionReport::default(), |mut acc, r| async move {
            acc.add_hot(r);
            Ok(acc)
        })
        .await?;
    report.add_hot(hot);
    Ok(report)
}

/// Per key with generations: each generation (newest first, as ids sort)
/// and what the listing found in it.
type Generations = BTreeMap<String, BTreeMap<GenerationId, Scan>>;

/// The streaming pass: cold snapshots, and what each generation holds.
async fn enforce_cold(
    replica: &Replica,
    cutoff: DateTime<Utc>,
) -> Result<(RetentionReport, Generations)> {
    let mut cold: HashMap<String, ColdKey> = HashMap::new();
    let mut keys: Generations = BTreeMap::new();
    let mut deleter = Deleter::default();
    let mut report = RetentionReport::default();
    let mut nested: Vec<String> = Vec::new();
    let local_root = replica.local_root();
    let mut on_disk: HashMap<String, bool> = HashMap::new();
    let mut listing = replica.list_all(&replica.prefix);
    while let Some(meta) = listing.try_next().await? {
        let rel = relative(&meta.location, &replica.prefix);
        if let Some(rel) = rel {
            if let Some(root) = nested_root(rel) {
                note_nested(&mut nested, root);
                continue;
            }
            if nested.iter().any(|n| under(rel, n)) {
                continue;
            }
        }
        let in_generation = rel.and_then(generation_parts);
        if let Some((key, gen, rest)) = in_generation {
            let obj = parse_generation_object(rest);
            let scan = match keys.get_mut(key) {
                Some(gens) => gens.entry(gen).or_default(),
                None => keys
                    .entry(key.to_string())
                    .or_default()
                    .entry(gen)
                    .or_default(),
            };
            scan.add(&meta, obj, cutoff);
            continue;
        }
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
            .unwrap_or("")
            .to_string();
        let db = format!("{dir}/{}", snap.stem);
        let seen = cold.entry(db).or_default();
        seen.newest = seen.newest.max(Some(snap.hour));
        if snap.hour > cutoff {
            continue;
        }
        // At or before the cutoff: only the newest such one (the base)
        // stays; the one it replaces as base, or this one, goes.
        let gone = match &mut seen.base {
            Some(base) if snap.hour > base.0 => {
                Some(std::mem::replace(base, (snap.hour, meta.location)).1)
            }
            Some(_) => Some(meta.location),
            None => {
                seen.base = Some((snap.hour, meta.location));
                None
            }
        };
        if let Some(loc) = gone {
            // A `file://` listing is not sorted: a nested root's
            // `.litefleet/` may come after its keys' objects (S3 lists in
            // order, so `nested` has it by then).
            if local_root
                .as_deref()
                .is_some_and(|root| nested_on_disk(root, &dir, &mut on_disk, &mut nested))
            {
                continue;
            }
            deleter.push(replica, loc).await?;
            report.deleted += 1;
        }
    }
    deleter.flush(replica).await?;
    // Generations are decided after the listing, which has seen every
    // nested root by then.
    keys.retain(|key, _| !nested.iter().any(|n| under(key, n)));
    report.kept_newest_expired = cold
        .values()
        .filter(|k| k.newest.is_some_and(|h| h < cutoff))
        .count();
    Ok((report, keys))
}

/// What a pass has seen of one database's cold snapshots.
#[derive(Default)]
struct ColdKey {
    /// The newest hour name.
    newest: Option<DateTime<Utc>>,
    /// The newest snapshot named at or before the cutoff, kept.
    base: Option<(DateTime<Utc>, ObjPath)>,
}

/// The replica root inside ours that `rel` (relative to our prefix) is
/// litefleet's own object of: the part before a `.litefleet/` that is not
/// our own (not at the top). Objects under such a root are another
/// replicator's (black-box probe: a root with `retention: 1h` deleted a
/// 7-hour-old snapshot of one nested in it, kept for 720h there). Its
/// `.litefleet/` sorts before most of its keys (names starting with a
/// letter or digit), so a pass finds it before their objects.
fn nested_root(rel: &str) -> Option<&str> {
    let ours = crate::replica::layout::RESERVED_DIR;
    rel.match_indices('/')
        .map(|(i, _)| i)
        .find(|&i| {
            rel[i + 1..]
                .strip_prefix(ours)
                .is_some_and(|rest| rest.starts_with('/'))
        })
        .map(|i| &rel[..i])
}

/// Adds `root` to the nested roots a pass found, with one warning each.
fn note_nested(nested: &mut Vec<String>, root: &str) {
    if !nested.iter().any(|n| n == root) {
        tracing::warn!(root = %root, "another replica root lies inside this one: retention leaves everything under it alone");
        nested.push(root.to_string());
    }
}

/// Whether the directory `dir` (an object path) of a `file://` replica at
/// `root` lies inside a nested replica root: one of its parents below our
/// root holds an identity. Each parent is looked at once a pass (`seen`);
/// found roots join `nested`.
fn nested_on_disk(
    root: &std::path::Path,
    dir: &str,
    seen: &mut HashMap<String, bool>,
    nested: &mut Vec<String>,
) -> bool {
    let mut at = 0;
    for part in dir.split('/') {
        at += part.len();
        let parent = &dir[..at];
        at += 1;
        let found = *seen.entry(parent.to_string()).or_insert_with(|| {
            std::fs::symlink_metadata(
                root.join(parent)
                    .join(crate::replica::identity::IDENTITY_OBJECT),
            )
            .is_ok()
        });
        if found {
            note_nested(nested, parent);
            return true;
        }
    }
    false
}

/// `rel` is `root` or below it.
fn under(rel: &str, root: &str) -> bool {
    rel.strip_prefix(root)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `path` relative to `dir` (`None` if it is not under `dir`).
fn relative<'a>(path: &'a ObjPath, dir: &ObjPath) -> Option<&'a str> {
    let (path, dir) = (path.as_ref(), dir.as_ref());
    if dir.is_empty() {
        return Some(path);
    }
    path.strip_prefix(dir)?.strip_prefix('/')
}

/// The key, generation and path inside the generation of
/// The key of `<key>/generations/<gen>/<more>`; see [`generation_parts`].
#[cfg(test)]
fn generation_key(rel: &str) -> Option<&str> {
    generation_parts(rel).map(|(key, _, _)| key)
}

/// Applies the generation rules (module docs) to one key, whose
/// generations the streaming pass found as `gens`.
async fn enforce_key(
    replica: &Replica,
    key: String,
    gens: BTreeMap<GenerationId, Scan>,
    cutoff: DateTime<Utc>,
) -> Result<RetentionReport> {
    if let Err(e) = check_key(&key) {
        tracing::warn!(key, error = %e, "retention: skipping generations under an unusable key");
        return Ok(RetentionReport::default());
    }
    let mut report = RetentionReport {
        generations: gens.len(),
        ..RetentionReport::default()
    };
    // Whether a newer generation has a snapshot uploaded and committed at or
    // before the cutoff: always false for the newest one, so it is never
    // deleted whole.
    let mut covered = false;
    for (id, scan) in &gens {
        let dir = generation_dir(&replica.prefix, &key, id);
        let rule = if covered && scan.newest.is_some_and(|t| t < cutoff) {
            Some(Rule::Whole)
        } else {
            scan.base.map(Rule::Before)
        };
        covered |= scan.base.is_some();
        let Some(rule) = rule.filter(|r| scan.would_delete(*r)) else {
            continue;
        };
        let swept = sweep(replica, &dir, rule, cutoff).await?;
        match rule {
            Rule::Whole => tracing::info!(
                key,
                generation = %id,
                snapshots = swept.generation_snapshots_deleted,
                segments = swept.wal_deleted,
                "retention: deleted a generation superseded before the cutoff"
            ),
            Rule::Before(base) => tracing::debug!(
                key,
                generation = %id,
                base,
                snapshots = swept.generation_snapshots_deleted,
                segments = swept.wal_deleted,
                "retention: deleted history before the snapshot at the cutoff"
            ),
        }
        report.add_hot(swept);
    }
    Ok(report)
}

/// What to delete from one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Every snapshot, segment and `metadata.json` uploaded before the cutoff.
    Whole,
    /// Snapshots and segments of WAL indexes below this snapshot index.
    Before(u64),
}

/// What one listing of a generation found (a few counters, whatever its size).
#[derive(Debug, Default)]
struct Scan {
    /// Upload time of its newest object, known or not.
    newest: Option<DateTime<Utc>>,
    /// Index of its newest snapshot uploaded at or before the cutoff.
    base: Option<u64>,
    /// Lowest snapshot index and lowest segment WAL index.
    lowest_snapshot: Option<u64>,
    lowest_segment: Option<u64>,
    /// Snapshots, segments and `metadata.json` (what [`Rule::Whole`] deletes).
    known: usize,
}

impl Scan {
    /// Counts one object of the generation (`obj`: what its path inside the
    /// generation names, if anything).
    fn add(
        &mut self,
        meta: &object_store::ObjectMeta,
        obj: Option<GenerationObject>,
        cutoff: DateTime<Utc>,
    ) {
        let scan = self;
        {
            let up = meta.last_modified;
            scan.newest = scan.newest.max(Some(up));
            let Some(obj) = obj else {
                return;
            };
            scan.known += 1;
            match obj {
                GenerationObject::Snapshot(i) => {
                    // A restore at the cutoff selects by commit time (in the
                    // name), which a listing time in whole seconds can
                    // precede: the base must be committed by the cutoff.
                    let committed = meta
                        .location
                        .filename()
                        .and_then(parse_snapshot_name_time)
                        .and_then(|(_, t)| t)
                        .unwrap_or(up);
                    if committed.max(up) <= cutoff {
                        scan.base = scan.base.max(Some(i));
                    }
                    scan.lowest_snapshot = Some(scan.lowest_snapshot.map_or(i, |l| l.min(i)));
                }
                GenerationObject::Segment(p) | GenerationObject::Pack(p) => {
                    scan.lowest_segment =
                        Some(scan.lowest_segment.map_or(p.index, |l| l.min(p.index)));
                }
                GenerationObject::Metadata => {}
            }
        }
    }

    fn would_delete(&self, rule: Rule) -> bool {
        match rule {
            Rule::Whole => self.known > 0,
            Rule::Before(base) => [self.lowest_snapshot, self.lowest_segment]
                .into_iter()
                .flatten()
                .any(|i| i < base),
        }
    }
}

/// Lists the generation at `dir` again and deletes what `rule` covers.
/// Deciding by rule rather than by names from the first listing keeps memory
/// flat, and objects uploaded in between are safe: new snapshots and segments
/// have indexes at or above the base, and [`Rule::Whole`] spares anything
/// uploaded at or after the cutoff.
async fn sweep(
    replica: &Replica,
    dir: &ObjPath,
    rule: Rule,
    cutoff: DateTime<Utc>,
) -> Result<RetentionReport> {
    let mut report = RetentionReport::default();
    let mut deleter = Deleter::default();
    let mut listing = replica.list_all(dir);
    while let Some(meta) = listing.try_next().await? {
        let Some(obj) = relative(&meta.location, dir).and_then(parse_generation_object) else {
            continue;
        };
        let doomed = match (rule, obj) {
            (Rule::Whole, _) => meta.last_modified < cutoff,
            (Rule::Before(base), GenerationObject::Snapshot(i)) => i < base,
            (Rule::Before(base), GenerationObject::Segment(p)) => p.index < base,
            // A pack may hold parts of later WALs too: kept.
            (Rule::Before(_), GenerationObject::Metadata | GenerationObject::Pack(_)) => false,
        };
        if !doomed {
            continue;
        }
        match obj {
            GenerationObject::Snapshot(_) => report.generation_snapshots_deleted += 1,
            GenerationObject::Segment(_) | GenerationObject::Pack(_) => report.wal_deleted += 1,
            GenerationObject::Metadata => {}
        }
        deleter.push(replica, meta.location).await?;
    }
    deleter.flush(replica).await?;
    if rule == Rule::Whole {
        report.generations_deleted = 1;
    }
    Ok(report)
}

/// Paths waiting to be deleted, sent in batches of [`DELETE_BATCH`].
#[derive(Default)]
struct Deleter {
    doomed: Vec<ObjPath>,
}

impl Deleter {
    async fn push(&mut self, replica: &Replica, location: ObjPath) -> Result<()> {
        self.doomed.push(location);
        if self.doomed.len() >= DELETE_BATCH {
            self.flush(replica).await?;
        }
        Ok(())
    }

    /// Deletes everything pending (a missing object counts as deleted).
    async fn flush(&mut self, replica: &Replica) -> Result<()> {
        if self.doomed.is_empty() {
            return Ok(());
        }
        let paths: Vec<ObjPath> = std::mem::take(&mut self.doomed);
        replica.delete_many(paths).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_key_finds_the_key() {
        let g = "fffffe6b2f5c7e1f0123abcd";
        let cases = [
            (format!("p/d/t/generations/{g}/wal/x"), Some("p/d/t")),
            (format!("k/generations/{g}/metadata.json"), Some("k")),
            (format!("k/generations/{g}/anything"), Some("k")),
            // A key may itself contain a `generations` level.
            (
                format!("a/generations/b/generations/{g}/x"),
                Some("a/generations/b"),
            ),
            (format!("generations/{g}/metadata.json"), None),
            (format!("k/generations/{g}"), None),
            ("k/generations/not-a-generation/x".into(), None),
            ("k/oldgenerations/fffffe6b2f5c7e1f0123abcd/x".into(), None),
            ("k/t-20260101-000000.db.lz4".into(), None),
        ];
        for (rel, want) in cases {
            assert_eq!(generation_key(&rel), want, "{rel}");
        }
        let p = ObjPath::from("fleet/k/x");
        assert_eq!(relative(&p, &ObjPath::from("fleet")), Some("k/x"));
        assert_eq!(relative(&p, &ObjPath::from("fle")), None);
        assert_eq!(relative(&p, &ObjPath::default()), Some("fleet/k/x"));
    }

    #[test]
    fn scan_decides_what_to_delete() {
        let scan = Scan {
            base: Some(2),
            lowest_snapshot: Some(2),
            lowest_segment: Some(1),
            known: 4,
            ..Scan::default()
        };
        assert!(scan.would_delete(Rule::Before(2)));
        assert!(!scan.would_delete(Rule::Before(1)));
        assert!(scan.would_delete(Rule::Whole));
        let empty = Scan::default();
        assert!(!empty.would_delete(Rule::Whole) && !empty.would_delete(Rule::Before(9)));
    }
}
