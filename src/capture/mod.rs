//! capture
pub mod ship;
pub mod snapshot;
pub mod wal;
