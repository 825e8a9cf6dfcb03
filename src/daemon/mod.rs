//! daemon
pub mod scheduler;
pub mod server;
