//! The error type every fallible litefleet operation returns.
//!
//! Each variant carries the thing it is about (a file path, an object key, a
//! config key) so that a message is actionable on its own. Object store errors
//! are wrapped, never formatted with credentials: our own config type
//! redacts them in `Debug`, and an object store error is shown through
//! [`store_text`], which masks what S3 echoes of a request in its error
//! bodies (AWS answers a bad signature with the access key id, the string
//! to sign and the canonical request, and the S3 client quotes the body
//! whole; black-box probe: the key id in `replicate`, `restore` and `list`
//! messages) and every credential registered with [`mask_in_errors`].

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

    /// SQLite refused an operation on a local database file; `hint` says
    /// in plain words what a cause SQLite words obscurely means (see
    /// [`sqlite_hint`]).
    #[error("{}: sqlite: {hint}{source}", path.display())]
    Sqlite {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    /// The object store failed; `key` is the object or prefix, `hint` says
    /// in plain words what a well-known cause means (see [`store_hint`]).
    #[error("replica {key}: {hint}{}", store_text(source))]
    Store {
        key: String,
        hint: &'static str,
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

    /// A write refused while the replica lease could not be renewed in
    /// time: writes resume at the next renewal unless the lease was taken
    /// over meanwhile (then [`Error::LeaseLost`] follows). Said apart from a
    /// lost lease (black-box probe: every write refused during a pause was
    /// logged as "lost").
    #[error("replica lease {object} paused: {reason}")]
    LeasePaused { object: String, reason: String },
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
            hint: sqlite_hint(&source),
            source,
        }
    }

    pub fn store(key: impl std::fmt::Display, source: object_store::Error) -> Self {
        let key = key.to_string();
        Error::Store {
            // The empty object path is the replica's (or bucket's) root: a
            // blank name read "replica : ..." (black-box probe).
            key: if key.is_empty() {
                "(its root)".to_string()
            } else {
                key
            },
            hint: store_hint(&source),
            source,
        }
    }

    /// SQLite found the database locked by another connection
    /// (`SQLITE_BUSY`, `SQLITE_LOCKED`).
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            Error::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
        )
    }

    /// Whether a write that failed with this error may still have been
    /// applied by the store, now or later: anything but a store that
    /// answered the only attempt with an error status, or could not be
    /// connected to (nothing was sent). A request the client gave up on
    /// (a timeout, a connection lost after sending), or one retried after
    /// such an attempt, may land after a later write of the same object.
    pub fn may_have_landed(&self) -> bool {
        let Error::Store { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cause {
            // object_store's retry error is not public: what it says of the
            // attempts is in its message (0.14: "after N retries,
            // max_retries: ..", then the last attempt's error).
            let text = e.to_string();
            if text.contains(" retries, max_retries: ") {
                return true;
            }
            if text.contains("Server returned non-2xx status code")
                || text.contains("Server returned error response")
            {
                return false;
            }
            if let Some(h) = e.downcast_ref::<object_store::client::HttpError>() {
                return h.kind() != object_store::client::HttpErrorKind::Connect;
            }
            cause = e.source();
        }
        true
    }

    /// Whether this is a store request that got no (complete) answer
    /// within `replica.timeout`.
    pub fn timed_out(&self) -> bool {
        let Error::Store { source, .. } = self else {
            return false;
        };
        let first: &(dyn std::error::Error + 'static) = source;
        std::iter::successors(Some(first), |e| e.source()).any(is_timeout)
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

/// Without credentials in the config or the environment, the S3 client asks
/// the EC2 instance metadata service for them (at `169.254.169.254`, or
/// `AWS_METADATA_ENDPOINT`), under these fixed paths; a failure there means
/// no credentials were found, whatever the request said.
const INSTANCE_METADATA_PATHS: [&str; 2] = ["/latest/api/token", "/latest/meta-data/iam/"];

/// Plain words for SQLite errors whose own text misleads (empty for the
/// rest). A read-only connection that meets a hot rollback journal (a
/// writer stopped mid-transaction, `-journal` left behind) must roll it back
/// before it may read, and cannot: SQLite says "attempt to write a readonly
/// database", which reads as if litefleet tried to write the database. The
/// same words come when SQLite must create a WAL database's side files in
/// a directory the user may not write.
pub fn sqlite_hint(e: &rusqlite::Error) -> &'static str {
    match e.sqlite_error().map(|e| e.extended_code) {
        Some(rusqlite::ffi::SQLITE_READONLY_ROLLBACK) => {
            "a hot rollback journal (-journal) left by a writer that stopped mid-transaction \
             must be rolled back by a read-write open of the database (the application's next \
             one does it); litefleet only reads, and retries every cycle: "
        }
        Some(rusqlite::ffi::SQLITE_READONLY_DIRECTORY) => {
            "a WAL database with no -wal and -shm beside it needs them created for any reader, \
             and this user may not create files in its directory (litefleet does not write the \
             database itself; give the user write access to the directory): "
        }
        _ => "",
    }
}

/// What the object store's own message does not say plainly: that no
/// credentials were found (its message is a failed request to an address the
/// user never configured), or that the endpoint refused the connection (its
/// message ends at "error sending request"; the cause is deeper in the chain).
/// Credentials [`store_text`] masks (see the module docs).
static MASKED: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Masks `secret` (an access key id, a secret key, a session token) in
/// every object store error shown from now on.
pub fn mask_in_errors(secret: &str) {
    // Shorter ones could mask unrelated text, and are no credential.
    if secret.len() < 8 {
        return;
    }
    let mut masked = MASKED.write().unwrap_or_else(|e| e.into_inner());
    if !masked.iter().any(|m| m == secret) {
        masked.push(secret.to_string());
    }
}

/// Elements of an S3 error body that echo the request: its credential,
/// what was signed and the signature.
const ECHOED_ELEMENTS: [&str; 6] = [
    "AWSAccessKeyId",
    "StringToSign",
    "StringToSignBytes",
    "CanonicalRequest",
    "CanonicalRequestBytes",
    "SignatureProvided",
];

/// The text of an object store error with the elements of
/// `ECHOED_ELEMENTS` emptied and every credential of [`mask_in_errors`]
/// replaced by `(masked)`.
pub fn store_text(source: &object_store::Error) -> String {
    let mut text = source.to_string();
    for name in ECHOED_ELEMENTS {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        let mut from = 0;
        while let Some(i) = text[from..].find(&open).map(|i| from + i + open.len()) {
            let Some(j) = text[i..].find(&close).map(|j| i + j) else {
                // Cut off: mask to the end.
                text.replace_range(i.., "(masked)");
                break;
            };
            text.replace_range(i..j, "(masked)");
            from = i + "(masked)".len() + close.len();
        }
    }
    for secret in MASKED.read().unwrap_or_else(|e| e.into_inner()).iter() {
        text = text.replace(secret.as_str(), "(masked)");
    }
    text
}

pub fn store_hint(source: &object_store::Error) -> &'static str {
    let text = source.to_string();
    if INSTANCE_METADATA_PATHS.iter().any(|p| text.contains(p)) {
        return "no S3 credentials found: set access-key-id and secret-access-key in \
                multi-db.replica, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the \
                environment (or AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, or \
                AWS_CONTAINER_CREDENTIALS_RELATIVE_URI); without them the instance metadata \
                service is asked, and it gave none: ";
    }
    if let object_store::Error::InvalidPath { .. } = source {
        return "the replica holds an object whose name is no valid object path (an empty, \
                `.` or `..` part, a control character, or a file name that is not UTF-8: \
                litefleet never writes one, and the \
                S3 client cannot list past it, so every listing that meets it fails): delete or \
                rename that object: ";
    }
    if text.contains("<Code>NoSuchBucket</Code>") {
        return "the bucket does not exist (create it, or correct multi-db.replica.url): ";
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return "connection refused (is the endpoint right and its server running?): ";
        }
        if is_timeout(e) {
            return TIMED_OUT;
        }
        cause = e.source();
    }
    ""
}

/// Whether `e` itself (not its sources) says a request timed out: an I/O
/// timeout, or the S3 client's own, whose message ends at "error sending
/// request" (black-box probe M21).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        || e.downcast_ref::<object_store::client::HttpError>()
            .is_some_and(|h| h.kind() == object_store::client::HttpErrorKind::Timeout)
}

/// [`store_hint`] for a request that got no answer in time.
/// A write gets the timeout once per part (`UPLOAD_PART`, 10 MiB) it sends,
/// so on a slow uplink the timeout must allow for sending that much; a read
/// gets it between any two pieces of its answer. The message says so,
/// since a request timed out is not retried (the timeout bounds a request
/// and its retries together) and the upload starts again next cycle.
const TIMED_OUT: &str = "the request timed out: no answer within multi-db.replica.timeout \
                         (the store is slow or unreachable, or the timeout too short for it: \
                         a write gets the timeout once per 10 MiB it sends, which a slow \
                         uplink must fit, and a download gets it between any two pieces of \
                         its answer): ";

/// Adds the path to `std::io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

/// What a file that is not a regular file is, for an error message.
pub fn not_regular(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_symlink() {
        "is a symbolic link, which litefleet never follows (a link could pull a file from outside the pattern root into the replica)"
    } else if t.is_fifo() {
        "is a FIFO (named pipe), not a regular file: opening it would block"
    } else if t.is_dir() {
        "is a directory, not a regular file"
    } else if t.is_socket() {
        "is a socket, not a regular file"
    } else if t.is_block_device() || t.is_char_device() {
        "is a device, not a regular file"
    } else {
        "is not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store answers whose own text hides what to do get plain words: a
    /// foreign object whose name the S3 client cannot parse fails every
    /// listing of its prefix (probe G: one `pfx//x` object broke `list`,
    /// bulk restore, `verify` and retention), and a missing bucket showed
    /// up as "lease.json not found".
    #[test]
    fn store_errors_say_what_to_do() {
        let bad = object_store::path::Path::parse("pfx//x/x.db.lz4").unwrap_err();
        let e = Error::store("pfx", object_store::Error::InvalidPath { source: bad });
        let msg = e.to_string();
        assert!(msg.contains("delete or rename that object"), "{msg}");
        assert!(msg.contains("pfx//x/x.db.lz4"), "{msg}");
        let gone = object_store::Error::NotFound {
            path: "pfx/.litefleet/lease.json".into(),
            source: "404 Not Found: <Error><Code>NoSuchBucket</Code></Error>".into(),
        };
        let msg = Error::store("pfx/.litefleet/lease.json", gone).to_string();
        assert!(msg.contains("the bucket does not exist"), "{msg}");
        // The replica's root has a name too (it read "replica : ...").
        let unsupported = object_store::Error::NotSupported { source: "x".into() };
        let msg = Error::store("", unsupported).to_string();
        assert!(msg.starts_with("replica (its root): "), "{msg}");
        // A request without an answer in time says so (black-box probe
        // M21: "HTTP error: error sending request").
        use object_store::client::{HttpError, HttpErrorKind};
        let late = HttpError::new(
            HttpErrorKind::Timeout,
            std::io::Error::other("error sending request"),
        );
        let e = object_store::Error::Generic {
            store: "S3",
            source: Box::new(late),
        };
        let msg = Error::store("k/x.db.lz4", e).to_string();
        assert!(
            msg.contains("timed out") && msg.contains("replica.timeout"),
            "{msg}"
        );
        let sent = HttpError::new(HttpErrorKind::Request, std::io::Error::other("reset"));
        let e = object_store::Error::Generic {
            store: "S3",
            source: Box::new(sent),
        };
        assert!(!Error::store("k", e).to_string().contains("timed out"));
    }

    /// What S3 echoes of a request in an error body, and the credentials
    /// the client was given, never reach a message (black-box probe: AWS's
    /// SignatureDoesNotMatch body quoted the access key id in `replicate`,
    /// `restore` and `list` errors).
    #[test]
    fn store_errors_mask_credentials() {
        mask_in_errors("AKIAEXAMPLEKEYID0001");
        mask_in_errors("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        let body =
            "403 Forbidden: <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
            <AWSAccessKeyId>AKIAOTHERKEYID000002</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256\n\
            20261206T000000Z</StringToSign><SignatureProvided>abc123</SignatureProvided>\
            <CanonicalRequest>PUT /b/k</CanonicalRequest><Message>key AKIAEXAMPLEKEYID0001 \
            secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY</Message><StringToSignBytes>41 57";
        let e = object_store::Error::Generic {
            store: "S3",
            source: body.into(),
        };
        let msg = Error::store("pfx/k", e).to_string();
        for secret in [
            "AKIAEXAMPLEKEYID0001",
            "AKIAOTHERKEYID000002",
            "wJalrXUtnFEMI",
            "20261206T000000Z",
            "abc123",
            "PUT /b/k",
            "41 57",
        ] {
            assert!(!msg.contains(secret), "{secret} in {msg}");
        }
        assert!(msg.contains("SignatureDoesNotMatch"), "{msg}");
        assert!(
            msg.contains("<AWSAccessKeyId>(masked)</AWSAccessKeyId>"),
            "{msg}"
        );
    }
}
