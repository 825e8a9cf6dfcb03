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
//! Each module owns one concern; data flows top to bottom:
//!
//! * [`config`]: the YAML file (`multi-db:` section), `${VAR}` expansion and
//!   validation. Everything later receives an already validated [`config::Config`].
//! * [`discover`]: compiles the glob patterns into per-directory-level matchers,
//!   walks only the directories a pattern can reach, and binds the `*`
//!   segments to the key template's variables.
//! * [`track`]: the compact in-memory table of tracked databases and the
//!   fingerprint (size + mtime + inode of the database and its `-wal`) that
//!   makes change detection a pure `stat` pass.
//! * [`keys`]: which database a replica key belongs to: key rendering, and
//!   the rule that refuses a second database rendering the same key.
//! * [`snapshot`]: a consistent copy of one database through the SQLite backup
//!   API, LZ4-compressed (frame format) into a temporary file, recording
//!   when the copy began and was complete; damage-classifying decompression.
//! * [`layout`]: where objects live in the replica: key rendering and parsing
//!   of the `<db>-YYYYMMDD-HH0000.db.lz4` snapshot names.
//! * [`storage`]: builds the `object_store` client for `s3://` and `file://`
//!   replicas and does streaming uploads and downloads; `file://` writes are
//!   fsynced; every write passes the lease's write fence.
//! * [`tier`]: which databases are hot (written within `hot-duration`, at
//!   most `max-hot-databases`, most recent wins) and when they go cold again
//!   (`cold-after`). Pure bookkeeping on ids and instants, no I/O.
//! * [`ship`]: WAL streaming of one hot database: a held read transaction,
//!   committed frames every `sync-interval`, our own checkpoints, a new
//!   generation whenever continuity is lost.
//! * [`scheduler`]: the replicate loop: scan, pick changed databases, upload
//!   with bounded concurrency, retry failures next cycle, start and stop the
//!   hot tier's streams, shut down gracefully.
//! * [`retention`]: deletes snapshots and generations older than the
//!   retention period, always keeping what restores the newest state.
//! * [`wal`]: the SQLite WAL file format for the hot tier: header and
//!   checksum validation, reading only committed frames from a position, noticing
//!   when the WAL was restarted under us, and replaying frames onto a database.
//! * [`generation`]: the hot tier's replica layout (generations of a snapshot
//!   plus WAL segments, newest-first ids) and point-in-time restore from it.
//! * [`lease`]: the replica lease that keeps a second replicator off the same
//!   replica root (conditional puts, renewal, takeover of expired leases) and
//!   drives the write fence that stops every write when it is not renewed.
//! * [`restore`]: picks a snapshot (latest or at a timestamp, by recorded
//!   commit times), writes the database atomically without replacing
//!   anything and checks its integrity; only damage may make it consider an
//!   older copy (`--allow-older`); bulk restore of a key prefix; also the
//!   `list` command.
//! * [`progress`]: restore progress, a bar on a terminal or log lines otherwise.
//! * [`server`]: the operations endpoint (`/healthz`, `/stats`, `/metrics`),
//!   aggregate counters only, so its cost does not grow with the fleet.
//! * [`demo`], [`bench`] and [`soak`]: sample data for a first run, the scan
//!   benchmark, and the soak (writers + injected store faults + full restore).
//! * [`cli`]: the command line (clap) that wires all of the above together.
//!
//! Errors that reach the user are [`Error`]s: each names the path, key or
//! config key it is about and never contains a credential.

pub mod capture;
pub mod cli;
pub mod daemon;
pub mod error;
pub mod replica;
pub mod restore;
mod rfc3339;
pub mod source;
pub mod stats;

pub use error::{Error, Result};
