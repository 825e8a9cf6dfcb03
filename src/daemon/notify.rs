//! Readiness notification for systemd (`Type=notify`): the `sd_notify`
//! protocol, by hand.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket named
//! by `$NOTIFY_SOCKET`: a path, or `@name` for a socket in the abstract
//! namespace. That is a dozen lines with [`UnixDatagram`], so no crate
//! (libsystemd is not linked either). Without `$NOTIFY_SOCKET` (not under
//! systemd, or a unit that is not `Type=notify`) nothing is sent.
//!
//! `replicate` says `READY=1` once it holds the replica lease, its
//! operations endpoint listens, and the first scan has begun (not finished:
//! a first scan of a large fleet uploads everything and may take longer
//! than any start timeout); `STOPPING=1` when a signal starts the drain of
//! in-flight uploads. [`spawn`] ties both to the [`Replicator`].
//!
//! A failed send is logged at debug and otherwise ignored: a daemon must not
//! stop replicating because its service manager went away.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::daemon::scheduler::Replicator;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go: the socket named by `$NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notifier {
    /// A socket file.
    Path(PathBuf),
    /// A socket in Linux's abstract namespace (`@name`, name without `@`).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `None` when unset or empty.
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os(NOTIFY_SOCKET)?;
        Notifier::parse(std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()))
    }

    /// The socket a `$NOTIFY_SOCKET` value names; `None` for an empty one.
    pub fn parse(value: &[u8]) -> Option<Notifier> {
        match value {
            [] => None,
            [b'@', name @ ..] => Some(Notifier::Abstract(name.to_vec())),
            path => Some(Notifier::Path(PathBuf::from(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path),
            ))),
        }
    }

    /// Sends one notification (`KEY=VALUE` lines) as a single datagram.
    pub fn send(&self, state: &str) -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        match self {
            Notifier::Path(path) => socket.send_to(state.as_bytes(), path)?,
            Notifier::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?
            }
        };
        Ok(())
    }

    /// [`Notifier::send`], with a failure logged at debug (see the module docs).
    fn tell(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::debug!(error = %e, socket = ?self, state, "cannot notify the service manager");
        }
    }
}

/// Tells the service manager (if any) `READY=1` when `replicator` begins its
/// first scan, and `STOPPING=1` when `shutdown` is cancelled. `None` when
/// `$NOTIFY_SOCKET` is not set. Call it once the lease is held and the
/// operations endpoint listens; abort the task when the loop has returned.
pub fn spawn(replicator: &Replicator, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    let notifier = Notifier::from_env()?;
    let mut scans = replicator.scans_started();
    Some(tokio::spawn(async move {
        tokio::select! {
            started = scans.wait_for(|n| *n > 0) => {
                if started.is_ok() {
                    notifier.tell("READY=1\nSTATUS=replicating");
                    tracing::debug!("told the service manager: ready");
                }
            }
            _ = shutdown.cancelled() => {}
        }
        shutdown.cancelled().await;
        notifier.tell("STOPPING=1\nSTATUS=finishing in-flight uploads");
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_abstract_names() {
        assert_eq!(Notifier::parse(b""), None);
        assert_eq!(
            Notifier::parse(b"/run/systemd/notify"),
            Some(Notifier::Path(PathBuf::from("/run/systemd/notify")))
        );
        assert_eq!(
            Notifier::parse(b"@/org/freedesktop/systemd1/notify/42"),
            Some(Notifier::Abstract(
                b"/org/freedesktop/systemd1/notify/42".to_vec()
            ))
        );
    }

    #[test]
    fn sends_one_datagram_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        Notifier::Path(path).send("READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("litefleet-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::parse(format!("@{name}").as_bytes()).unwrap();
        notifier.send("STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let gone = Notifier::Path(dir.path().join("nobody-listens"));
        assert!(gone.send("READY=1").is_err());
        gone.tell("READY=1");
    }
}
