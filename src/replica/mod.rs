//! Replica: the object store and what lives in it.
//!
//! The bottom of the pipeline: every other stage reads or writes the
//! replica through this module, and it depends on nothing above it.
//!
//! * [`storage`]: the `object_store` client for `s3://` and `file://`,
//!   streaming uploads and downloads, fsync on `file://`, and the lease's
//!   write fence on every write;
//! * [`layout`]: key to object path, and which keys are acceptable;
//! * [`cold`]: the cold tier's hourly snapshots: naming, listing, the times
//!   each records, and which one a restore at `T` uses;
//! * [`hot`]: the hot tier's WAL generations: naming, listing, metadata,
//!   planning a restore at `T`, and the continuity proof a replay must pass;
//! * [`pack`]: objects holding many segments with an index in front: the
//!   fleet log (every hot database's frames of one sync in one object) and
//!   its consolidated per-database packs;
//! * [`lease`]: one replicator per replica root;
//! * [`identity`]: which replica the state file's upload records belong to;
//! * [`retention`]: deleting what is older than the retention period,
//!   never what restores the newest state.
//!
//! Compressing, reading databases and writing databases are not here: they
//! belong to [`crate::capture`] and [`crate::restore`].

pub mod cold;
pub mod hot;
pub mod identity;
pub mod layout;
pub mod lease;
pub mod pack;
pub mod retention;
pub mod storage;
