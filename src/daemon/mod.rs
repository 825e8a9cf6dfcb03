//! Daemon: the `replicate` process.
//!
//! Owns the loop that ties the stages together ([`scheduler`]: scan the
//! sources, upload changed databases' cold snapshots with bounded
//! concurrency, start and stop hot streams, run retention, shut down
//! gracefully), the operations endpoint ([`server`]: `/healthz`,
//! `/stats`, `/metrics`) and the readiness notification to systemd
//! ([`notify`]).
//!
//! It decides *when* things happen; *how* a database is captured, named or
//! stored is below it ([`crate::source`], [`crate::capture`],
//! [`crate::replica`]). Nothing below depends on it.

pub mod notify;
pub mod scheduler;
pub mod server;
