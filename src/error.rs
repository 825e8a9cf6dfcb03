//! The error type every fallible litefleet operation returns.
//!
//! Each variant carries the thing it is about (a file path, an object key, a
//! config key) so that a message is actionable on its own. Object store errors
//! are wrapped, never formatted with credentials: `object_store` does not put
//! secrets in its errors, and our own config type redacts them in `Debug`.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; `key` is the YAML path (`multi-db.replica.url`).
    #[error("config {file}: {key}: {reason}")]
    Config {
        file: String,
        key: String,
        reason: String,
    },

    /// An I/O error on a local file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// SQLite refused an operation on a local database file.
    #[error("{}: sqlite: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// The object store failed; `key` is the object or prefix.
    #[error("replica {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },

    /// A file or object is not what it should be (bad header, failed integrity check, ...).
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },

    /// A replica object failed a content check: its LZ4 frame is malformed
    /// or fails its checksum, or what it holds is not a SQLite database or
    /// fails `PRAGMA integrity_check`. The only error restore may answer by
    /// trying an older copy (and only when asked to, `--allow-older`);
    /// transport and local errors are never taken for damage.
    #[error("{what}: {reason}")]
    Damaged { what: String, reason: String },

    /// Nothing in the replica matches what was asked for.
    #[error("{0}")]
    NotFound(String),

    /// Another process holds the replica lease; `object` is the lease object,
    /// `reason` names the holder (host, pid) and when its lease expires.
    #[error("replica lease {object}: {reason}")]
    LeaseHeld { object: String, reason: String },

    /// This process held the replica lease and no longer does (another process
    /// took it over or it was removed): it must stop writing to the replica.
    #[error("replica lease {object} lost: {reason}")]
    LeaseLost { object: String, reason: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn sqlite(path: impl Into<PathBuf>, source: rusqlite::Error) -> Self {
        Error::Sqlite {
            path: path.into(),
            source,
        }
    }

    pub fn store(key: impl std::fmt::Display, source: object_store::Error) -> Self {
        Error::Store {
            key: key.to_string(),
            source,
        }
    }

    pub fn damaged(what: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::Damaged {
            what: what.to_string(),
            reason: reason.into(),
        }
    }

    pub fn invalid(what: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.to_string(),
            reason: reason.into(),
        }
    }
}

/// Adds the path to `std::io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
