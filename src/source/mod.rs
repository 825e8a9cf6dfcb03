//! Source: which databases exist on this host, what each one is called in
//! the replica, and how hot each one is.
//!
//! Owns the configuration file ([`config`]) and its other spellings
//! (the description's and Litestream's, translated by [`compat`]), discovery from glob patterns
//! ([`discover`]), key templates ([`template`]) and the rules that refuse a
//! database for its key: one another database renders, or one `restore`
//! would refuse ([`keys`]), the compact table of tracked
//! databases with their change fingerprints ([`track`]), reading files
//! through SQLite's VFS without dropping this process's locks ([`vfs`]),
//! opening a database with its directory pinned ([`pin`]), the
//! rule that this process opens each `-shm` for one database at a time
//! ([`shm`]), change
//! notifications that name the databases to re-check between scans
//! ([`watch`]), and the choice of which databases are streamed ([`tier`]).
//!
//! Everything here is local: it stats and reads database files but never
//! opens a database for writing and never talks to the replica. It may use
//! [`crate::replica`]'s settings types (the config file names the replica),
//! nothing above it.

pub mod compat;
pub mod config;
pub mod discover;
pub mod keys;
pub mod pin;
pub mod shm;
pub mod template;
pub mod tier;
pub mod track;
pub mod vfs;
pub mod watch;
