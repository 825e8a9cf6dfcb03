//! Capture: turning a live database into replica objects.
//!
//! Owns reading databases consistently while applications write them: the
//! cold tier's whole-database snapshot through the SQLite backup API
//! ([`snapshot`]), the WAL file format and reading committed frames
//! ([`wal`]), the hot tier's stream of one database with its read
//! transaction, checkpoints and generations ([`ship`]), and compressing and
//! uploading the hot tier's objects ([`upload`]), and the fleet log that
//! gathers every hot database's frames of one sync into one object
//! ([`fleetlog`]).
//!
//! It writes to the replica only through [`crate::replica::storage`], under
//! the names the tier layouts give ([`crate::replica::cold`],
//! [`crate::replica::hot`]). It does not decide *when* a database is
//! captured: that is the daemon's scheduler.

pub mod fleetlog;
pub mod ship;
pub mod snapshot;
pub mod upload;
pub mod wal;
