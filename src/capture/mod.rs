//! Capture: turning a live database into replica objects.
//!
//! Owns reading databases consistently while applications write them: the
//! cold tier's whole-database snapshot through the SQLite backup API
//! ([`snapshot`]), the WAL file format and reading committed frames
//! ([`wal`]), the hot tier's stream of one database with its read
//! transaction, checkpoints and generations ([`ship`]), and compressing and
//! uploading the hot tier's objects ([`upload`]), and the fleet log that
//! gathers every hot database's frames of one sync into one object
//! ([`fleetlog`]), and the bounds on how much of that blocking work runs at
//! once ([`work`]).
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
pub mod work;

/// Process-wide SQLite settings, applied once, before the first connection
/// opens (later calls, and calls after another part of the process opened a
/// connection first, change nothing).
///
/// * No bulk page-cache allocation: by default every connection reserves
///   room for 20 pages (~88 KB at 4 KiB pages) at its first read, whatever
///   its `cache_size`, and keeps it until it closes. A hot database's
///   connection reads a page or two, so that reservation was most of its
///   memory; without it pages are allocated as they are used. Connections
///   that read many pages (snapshots, restores) lose only the saving of a
///   few `malloc` calls.
pub fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SQLITE_CONFIG_PAGECACHE takes (void*, int, int); a null
        // buffer with 0 pages is documented as "no bulk allocation". It is
        // only legal before SQLite initialises, and then returns
        // SQLITE_MISUSE without changing anything, which is fine.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_PAGECACHE,
                std::ptr::null_mut::<std::ffi::c_void>(),
                0 as std::ffi::c_int,
                0 as std::ffi::c_int,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was initialised already; its page-cache settings stay"
            );
        }
    });
}

/// Turns SQLite's memory statistics off (`SQLITE_CONFIG_MEMSTATUS`), as the
/// binary does before [`configure_sqlite`]: with them on, every allocation
/// SQLite makes takes one process-wide mutex to count it, and snapshot
/// threads opening and closing databases one after another queue on it
/// (`perf` of a first backup of 3,000 small databases: ~10% of the CPU in
/// that mutex's lock and wake-ups). litefleet never reads the counters;
/// tests that do (`sqlite3_memory_used`) leave them on. Like
/// [`configure_sqlite`], it only takes effect before SQLite initialises.
pub fn sqlite_statistics_off() {
    // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int; before SQLite
    // initialises it sets the option, after it returns SQLITE_MISUSE and
    // changes nothing.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int)
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!(rc, "SQLite was initialised already; its statistics stay on");
    }
}
