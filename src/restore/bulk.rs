//! Bulk restore: every database under a key prefix into a directory that
//! mirrors the keys (`DIR/<key>.db`), a bounded number at a time, each with
//! the same cold-or-hot choice as a single restore (a key's generations are
//! listed and planned when it is restored, and only if the listing saw any).
//! One database failing (a bad key, a corrupt snapshot, a gap, an existing
//! output) is reported and the others go on. Keys come from object names,
//! which anyone with write access to the bucket controls, so every key is
//! checked before it becomes a path ([`output_path`]): no `.`, `..` or empty
//! segments, not absolute, no backslash or NUL, and the result must stay
//! inside the directory. Keys are the decoded object path parts (`h#x`, not
//! `h%23x`, see [`mod@super::list`]); a path whose part decodes to `/`, NUL,
//! `.`, `..` or nothing is refused before anything else
//! ([`KeyListing::refused`]).

use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::install::refuse_side_files;
use super::list::{list_databases, KeyListing};
use super::single::{restore_key, How, Tier};
use crate::replica::layout::check_key;
use crate::replica::storage::Replica;
use crate::{Error, Result};

/// Databases restored at once by a bulk restore unless told otherwise. Each
/// one is a GET stream plus a blocking decompress-and-check thread; 16 keeps
/// a link busy with small databases without oversubscribing a small host.
pub const DEFAULT_BULK_CONCURRENCY: usize = 16;

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

/// The first directory between `dir` and `output` that is there but is no
/// directory of its own (a symbolic link, a file): restoring through it
/// would write outside `dir`, wherever the link leads (black-box probe U31,
/// F10: a link planted in a shared restore directory had a bulk restore,
/// run as root, write there, exit 0). `None` when every one is a directory
/// or missing (made by the restore).
fn link_inside(dir: &Path, output: &Path) -> Option<PathBuf> {
    let rel = output.parent()?.strip_prefix(dir).ok()?;
    let mut at = dir.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            _ => return Some(at),
        }
    }
    None
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
    /// As [`super::RestoreOptions::allow_older`], for every database.
    pub allow_older: bool,
}

/// How one database of a bulk restore ended.
#[derive(Debug)]
pub enum BulkOutcome {
    /// Fields as in [`super::RestoreOutcome::Restored`].
    Restored {
        tier: Tier,
        object: String,
        bytes: u64,
        uploaded: DateTime<Utc>,
    },
    /// The output exists and `if_db_not_exists` was given.
    SkippedExists,
    /// Neither tier has a snapshot uploaded at or before `--timestamp` (the
    /// database is newer).
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
    /// How many of `restored` came from the hot tier (WAL generations).
    pub restored_hot: usize,
    pub skipped: usize,
    pub failed: Vec<(String, Error)>,
    /// Decompressed bytes written.
    pub bytes: u64,
}

/// Receives bulk restore progress (implemented by [`crate::cli::progress`]).
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
    listed: KeyListing,
) -> BulkItem {
    if let Some(why) = &listed.refused {
        let outcome = BulkOutcome::Failed(Error::invalid(format!("key {key:?}"), why.clone()));
        return BulkItem {
            key,
            output: None,
            outcome,
        };
    }
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
    // A symlink (even a dangling one) is something at the path too.
    let outcome = if let Some(link) = link_inside(&opts.output_dir, &output) {
        BulkOutcome::Failed(Error::invalid(
            output.display(),
            format!(
                "{} is a symbolic link (or no directory): a bulk restore writes only below its \
                 output directory, never through a link in it",
                link.display()
            ),
        ))
    } else if output.symlink_metadata().is_ok() {
        if opts.if_db_not_exists {
            BulkOutcome::SkippedExists
        } else {
            BulkOutcome::Failed(Error::invalid(
                output.display(),
                "already exists; remove it or pass --if-db-not-exists",
            ))
        }
    } else if let Err(e) = refuse_side_files(&output) {
        BulkOutcome::Failed(e)
    } else {
        let how = How {
            hot: !listed.generations.is_empty(),
            at: opts.timestamp,
            allow_older: opts.allow_older,
        };
        match restore_key(replica, &key, listed.snapshots, how, &output, None).await {
            Ok(None) => BulkOutcome::SkippedNoSnapshotAtTime,
            Ok(Some(r)) => BulkOutcome::Restored {
                tier: r.tier,
                object: r.object,
                bytes: r.bytes,
                uploaded: r.uploaded,
            },
            Err(e) if opts.if_db_not_exists && super::install::appeared(&e, &output) => {
                BulkOutcome::SkippedExists
            }
            Err(e) => BulkOutcome::Failed(e),
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
    let dbs = list_databases(replica, Some(prefix)).await?;
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
    if std::fs::metadata(&opts.output_dir).is_ok_and(|m| !m.is_dir()) {
        return Err(Error::invalid(
            opts.output_dir.display(),
            "exists and is not a directory: a bulk restore writes one database per key below a directory",
        ));
    }
    super::install::create_dir_durably(&opts.output_dir)?;
    progress.started(dbs.len());
    let mut none_at_time = 0;
    let mut done = futures::stream::iter(dbs)
        .map(|(key, listed)| restore_one(replica, opts, key, listed))
        .buffer_unordered(opts.concurrency.max(1));
    while let Some(item) = done.next().await {
        progress.finished(&item);
        match item.outcome {
            BulkOutcome::Restored { tier, bytes, .. } => {
                report.restored += 1;
                report.restored_hot += usize::from(tier == Tier::Hot);
                report.bytes += bytes;
            }
            BulkOutcome::SkippedExists => report.skipped += 1,
            BulkOutcome::SkippedNoSnapshotAtTime => {
                report.skipped += 1;
                none_at_time += 1;
            }
            BulkOutcome::Failed(e) => report.failed.push((item.key, e)),
        }
    }
    // Every database skipped for want of a backup that old: nothing was
    // restored, an error as a prefix without databases is (black-box probe
    // G27: exit 0, where a single restore of any of them exits 1).
    if none_at_time == report.databases && !opts.if_replica_exists {
        let at = opts.timestamp.map(|t| t.to_rfc3339()).unwrap_or_default();
        return Err(Error::NotFound(format!(
            "none of the {} databases under prefix {prefix:?} in {replica} has a backup at or before {at}",
            report.databases
        )));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

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
