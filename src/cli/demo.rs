//! Sample data for a first run: a tree of small WAL-mode databases laid out
//! like `examples/litefleet.yml`'s pattern, so a new user sees litefleet work
//! with no cloud account.
//!
//! Layout: `<root>/project<P>/databases/db<D>/branches/<main|dev>/tenants/tenant<N>.db`
//! with up to [`TENANTS_PER_BRANCH`] tenants per branch.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::{Error, Result};

/// Tenants per branch directory: keeps directories small like real fleets.
pub const TENANTS_PER_BRANCH: usize = 50;
/// Rows written into each sample database.
pub const ROWS: usize = 20;

/// The path of the `i`th demo database under `root`.
pub fn demo_path(root: &Path, i: usize) -> PathBuf {
    let branch_no = i / TENANTS_PER_BRANCH;
    let branch = if branch_no.is_multiple_of(2) {
        "main"
    } else {
        "dev"
    };
    let db = (branch_no / 2) % 10;
    let project = branch_no / 20;
    root.join(format!("project{project}"))
        .join("databases")
        .join(format!("db{db}"))
        .join("branches")
        .join(branch)
        .join("tenants")
        .join(format!("tenant{i:05}.db"))
}

/// Creates `n` databases (WAL mode, a table with [`ROWS`] rows) under `root`.
/// Existing ones get more rows, so running it again produces changes.
pub fn create(root: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let path = demo_path(root, i);
        let dir = path.parent().expect("demo path has a parent");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut conn = Connection::open(&path).map_err(|e| Error::sqlite(&path, e))?;
        let sq = |e| Error::sqlite(&path, e);
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(sq)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, tenant TEXT, body TEXT, at TEXT DEFAULT CURRENT_TIMESTAMP)",
        )
        .map_err(sq)?;
        let tx = conn.transaction().map_err(sq)?;
        for r in 0..ROWS {
            tx.execute(
                "INSERT INTO events(tenant, body) VALUES (?1, ?2)",
                (format!("tenant{i:05}"), format!("sample event {r}")),
            )
            .map_err(sq)?;
        }
        tx.commit().map_err(sq)?;
        out.push(path);
    }
    Ok(out)
}
