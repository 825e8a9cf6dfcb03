//! capture
pub mod ship;
pub mod snapshot;
pub mod upload;
pub mod wal;
