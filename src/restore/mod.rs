//! Restore: from the replica back to a database file.
//!
//! This stage reads the replica and writes databases; it never writes to the
//! replica. What the objects are named, how they are listed and which ones a
//! restore at `T` uses belong to the tier layouts in [`crate::replica`]; this
//! module composes them, does the downloads and installs the result:
//!
//! * [`single`]: one database: choosing the tier, retries, damage;
//! * [`replay`]: downloading a generation snapshot and applying its WAL
//!   segments under the hot layout's continuity proof;
//! * [`install`]: the atomic, checked, no-clobber install of the output;
//! * [`mod@list`]: which keys the replica holds, across both tiers;
//! * [`bulk`]: every database under a key prefix;
//! * [`mod@verify`]: restore drills: every database restored into scratch
//!   space through the bulk path, checked, compared with its source on this
//!   host, and deleted.
//!
//! A database key (`p1/orders/main/t1`) can have backups in two tiers:
//!
//! * **cold**: hourly snapshots `<key>/<stem>-YYYYMMDD-HH0000.db.lz4`
//!   ([`crate::replica::cold`]);
//! * **hot**: WAL generations `<key>/generations/<gen>/...`, a snapshot plus
//!   the WAL segments shipped after it ([`crate::replica::hot`]).
//!
//! `restore` resolves what the user named (a key, or the path of a database
//! that one of the patterns matches) to a key and finds, at the restore time
//! `T` (`--timestamp`, or now):
//!
//! * the newest cold snapshot taken at or before `T`
//!   ([`crate::replica::cold::choose_cold`]): each cold object records when
//!   its copy began and was complete ([`crate::replica::cold::SnapshotTimes`],
//!   read with a ranged GET of its first bytes). An object named hour `H` was
//!   complete before `H`; objects without the record (earlier versions) are
//!   used only if `H <= T`;
//! * the newest generation restore point at or before `T`
//!   ([`crate::replica::hot::plan_latest`]): the newest generation with a
//!   snapshot committed at or before `T`, that snapshot and its segments
//!   committed at or before `T` (commit times are in the object names).
//!
//! The store's listing times are never used to decide what a restore at `T`
//! may include: S3 gives them in whole seconds.
//! Whichever represents the **later state** is restored ([`choose_tier`]):
//! a cold snapshot's state is when its copy began (it holds every commit
//! before), a generation restore point's is the commit time of the newest
//! object it uses ([`crate::replica::hot::Plan::time`]). On a tie the generation wins.
//! Either way the output is written atomically:
//!
//! 0. refuse an output that exists, and an output whose `-wal`, `-shm` or
//!    `-journal` exists: SQLite would replay or roll back such a leftover
//!    onto the restored file when it is first opened;
//! 1. write it into a temporary file next to the output: stream a cold
//!    snapshot through the LZ4 frame decoder, or download the generation
//!    snapshot and replay its WAL segments ([`replay::restore_plan`]);
//!    LZ4 content checksums are verified by the decoder,
//! 2. `fsync` it, check the SQLite header and run `PRAGMA integrity_check`,
//! 3. rename it to the output name **without replacing** anything (an output
//!    that appeared meanwhile is an error, never overwritten), `fsync` the
//!    directory, and check the output again: the very file that was checked
//!    (same inode and size), with no side file present.
//!
//! A crash or an error at any point leaves either no output or a complete,
//! checked one.
//!
//! Failures:
//!
//! * Only **damage** ([`crate::Error::Damaged`]: a malformed LZ4 frame, a failed
//!   checksum, a cold snapshot's times record failing its checksum or sanity
//!   checks, not a SQLite database, a failed integrity check) is taken for
//!   a bad copy. A damaged cold snapshot fails the restore, naming it and
//!   the older state that could be restored instead; with `--allow-older`
//!   it is skipped with a warning and the choice is made again without it
//!   (the next older cold snapshot, or the generation if that is now the
//!   later state).
//! * Transport errors while downloading are retried ([`DOWNLOAD_ATTEMPTS`])
//!   and then fail the restore; local errors (disk full at the output) fail
//!   it at once; so does any error that is not classified as damage.
//! * Any failure of the **hot** tier once it was chosen (a gap in the WAL
//!   segments, a broken checksum chain, a damaged generation snapshot or
//!   segment, a failed integrity check) fails the restore loudly. It never
//!   falls back to an older cold snapshot by itself: that would silently
//!   restore an older state than the replica claims to hold, and a damaged
//!   generation cannot be told apart from a broken one by its error. The
//!   error names the cold snapshot that could be restored instead and how
//!   (`--timestamp` at its upload time, or `lz4 -d` of the object).
//! * Nothing in either tier at or before `T` is [`crate::Error::NotFound`] (or
//!   [`RestoreOutcome::NoReplica`] with `--if-replica-exists`).
//!
//! Progress is reported through hooks ([`OnBytes`] for one download,
//! [`BulkProgress`] for a bulk restore); this module never draws anything.
//! [`crate::cli::progress`] decides between a terminal bar and log lines. A
//! generation restore reports its compressed size (snapshot and segments) at
//! the start and at the end only.

pub mod bulk;
pub mod install;
pub mod list;
pub mod replay;
pub mod single;
pub mod verify;

pub use bulk::{
    output_path, restore_bulk, BulkItem, BulkOptions, BulkOutcome, BulkProgress, BulkReport,
    NoProgress, DEFAULT_BULK_CONCURRENCY,
};
pub use list::{list, list_databases, KeyListing};
pub use single::{
    choose_tier, fetch_to, fetch_to_with_progress, resolve_key, restore, restore_with_progress,
    OnBytes, RestoreOptions, RestoreOutcome, Tier, DOWNLOAD_ATTEMPTS,
};
pub use verify::{verify, VerifyOptions, VerifyProgress, VerifyReport};
