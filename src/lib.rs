//! litefleet continuously backs up very many SQLite databases on one host to
//! S3-compatible object storage (or a local directory), and restores them.
//!
//! Litestream gives every database its own goroutines, connection, S3 client
//! and metrics. That is the right shape for ten databases and the wrong one for
//! a hundred thousand. litefleet keeps *one* compact table of every database it
//! tracks (about 50 bytes each), *one* object store client, and opens a
//! database only while it is being snapshotted.
//!
//! # Layout
//!
//! Folders are the stages of the pipeline; data flows left to right and
//! dependencies point down, from the command line to storage, with no
//! import circle (`tests/layers.rs` checks it):
//!
//! ```text
//!    source ──────▶ capture ──────▶ replica ──────▶ restore     data flow
//!  what exists      read it         store it         get it back
//!
//!  stage     modules                                       may use
//!  cli       mod, bench, cost, loss, throughput, soak,     everything below
//!            demo, progress, explain
//!  daemon    scheduler, server, notify                     capture and below
//!  restore   single, install, replay, list, bulk, verify   capture and below
//!  capture   snapshot, wal, ship, upload, fleetlog, work   source and below
//!  source    config, compat, discover, template, keys,     replica and below
//!            track, tier, watch, vfs, shm
//!  replica   storage, layout, cold, hot, pack, lease,      error, rfc3339,
//!            retention                                     durable
//!  stats, error: shared vocabulary, use nothing
//!  durable: every fsync (tests see which paths were synced), uses nothing
//! ```
//!
//! * [`source`]: which databases exist and what each is called: the YAML
//!   config ([`source::config`], `${VAR}` expansion, validation; other
//!   spellings translated by [`source::compat`]), discovery
//!   from glob patterns ([`source::discover`]), key templates
//!   ([`source::template`]) and the rule against two databases sharing a
//!   key ([`source::keys`]), the compact table of tracked databases and
//!   their fingerprints ([`source::track`]), change notifications
//!   ([`source::watch`]), hot/cold tiering ([`source::tier`]), reading
//!   files through SQLite's VFS, which keeps this process's locks
//!   ([`source::vfs`]), and opening a database with its directory pinned,
//!   so its file and side files are one directory's ([`source::pin`]).
//! * [`capture`]: reading live databases consistently: the cold snapshot
//!   from the file a read transaction protects, or through the SQLite
//!   backup API, LZ4-compressed with its recorded times
//!   ([`capture::snapshot`]); the WAL format and committed-frame reader
//!   ([`capture::wal`]); the hot stream of one database ([`capture::ship`]);
//!   compressing and uploading hot objects ([`capture::upload`]); the fleet
//!   log that ships every hot database's frames of one sync in one object
//!   ([`capture::fleetlog`]); how much of that blocking work runs at once
//!   ([`capture::work`]).
//! * [`replica`]: the object store and what lives in it: the client and its
//!   write fence ([`replica::storage`]), key to path ([`replica::layout`]),
//!   one layout module per tier owning its naming, listing and planning
//!   ([`replica::cold`], [`replica::hot`]), packs of many segments (the
//!   fleet log, [`replica::pack`]), the lease ([`replica::lease`])
//!   and retention ([`replica::retention`]).
//! * [`restore`]: back to a database file: choosing the tier, retries and
//!   damage ([`restore::single`]), installing atomically
//!   ([`restore::install`]), replaying a generation ([`restore::replay`]),
//!   listing ([`mod@restore::list`]), bulk restore ([`restore::bulk`]) and
//!   restore drills ([`mod@restore::verify`]).
//!   It composes the tier layouts; it never writes to the replica.
//! * [`daemon`]: the `replicate` process: the scan/upload/stream loop
//!   ([`daemon::scheduler`]), `/healthz`, `/stats`, `/metrics`
//!   ([`daemon::server`]) and systemd readiness ([`daemon::notify`]).
//! * [`cli`]: the command line (clap) that wires it together, and the
//!   harness that drives it from the outside ([`cli::bench`],
//!   [`cli::cost`], [`cli::soak`], [`cli::demo`]); [`cli::explain`]
//!   previews what a config will do and cost.
//! * [`stats`]: the fleet's counters, written by every stage and read by the
//!   operations server; [`error`]: the one error type.
//!
//! Where a change goes: a new kind of source or a config key → `source`;
//! how a database is read → `capture`; an object name, a listing or what a
//! restore at `T` may use → `replica`; how the result is written → `restore`;
//! when things happen → `daemon`.
//!
//! Errors that reach the user are [`Error`]s: each names the path, key or
//! config key it is about and never contains a credential.

pub mod capture;
pub mod cli;
pub mod daemon;
pub mod durable;
pub mod error;
pub mod replica;
pub mod restore;
mod rfc3339;
pub mod source;
pub mod stats;

pub use error::{Error, Result};
