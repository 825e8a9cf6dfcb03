//! Packaging conventions of the binary: systemd readiness (`Type=notify`),
//! JSON logs, shell completions, `--config` only where it is read, and
//! HTTPS through rustls on `ring`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{create_db, Backend, Fleet};
use common::{litefleet, stderr};
use litefleet::replica::storage::{Replica, ReplicaUrl, Secret, StoreOptions};

/// Receives one datagram from `socket`, failing the test after `within`.
fn recv_within(socket: &UnixDatagram, within: Duration, what: &str) -> String {
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no {what} notification within {within:?}: {e}"),
    }
}

/// `replicate` under a `Type=notify` service manager: `READY=1` once the
/// lease is held and the operations port listens, `STOPPING=1` at SIGTERM,
/// then a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_notifies_ready_and_stopping() {
    let mut f = Fleet::new(Backend::File).await;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    f.top_yaml = format!("addr: {addr}\n");
    drop(create_db(&f.db_path("p", "d", "t1"), 3));
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).unwrap();
    let cfg = f.config_path();
    let child = Command::new(env!("CARGO_BIN_EXE_litefleet"))
        .args(["--config", cfg.to_str().unwrap(), "replicate"])
        .env("LITEFLEET_LOG", "info")
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let ready = recv_within(&socket, Duration::from_secs(60), "READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means: the lease is held and the operations endpoint answers.
    let lease = litefleet::replica::lease::Lease::current(&f.replica())
        .await
        .unwrap();
    assert!(lease.is_some(), "READY=1 before the lease was taken");
    assert!(
        std::net::TcpStream::connect(addr).is_ok(),
        "READY=1 before the operations endpoint listened"
    );
    // SAFETY: kill(2) on the pid of our own child, which has not been
    // waited for yet, so the pid cannot have been reused.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let stopping = recv_within(&socket, Duration::from_secs(60), "STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("shut down cleanly"),
        "{}",
        stderr(&out)
    );
}

/// Every stderr line is one JSON object with `level` and `fields.message`.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{log}"));
            assert!(v["level"].is_string(), "no level: {line}");
            assert!(v["fields"]["message"].is_string(), "no message: {line}");
            v
        })
        .collect()
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = rt.block_on(Fleet::new(Backend::File));
    drop(create_db(&f.db_path("p", "d", "t1"), 3));
    let cfg = f.config_path();
    let out = litefleet(
        f.work.path(),
        &[
            "--log-format",
            "json",
            "--config",
            cfg.to_str().unwrap(),
            "replicate",
            "--once",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = json_lines(&stderr(&out));
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "single cycle done" && v["level"] == "INFO"),
        "{}",
        stderr(&out)
    );

    // The environment variable does the same, and the final error of a
    // failing command is a JSON line too.
    let out = Command::new(env!("CARGO_BIN_EXE_litefleet"))
        .current_dir(f.work.path())
        .args(["--config", "missing.yml", "list"])
        .env("LITEFLEET_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&stderr(&out));
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("missing.yml"),
        "{last}"
    );

    // Text stays the default.
    let t = tempfile::tempdir().unwrap();
    let out = litefleet(t.path(), &["--config", "missing.yml", "list"]);
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}

#[test]
fn completions_cover_the_subcommands() {
    let t = tempfile::tempdir().unwrap();
    let out = litefleet(t.path(), &["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("replicate"), "{script}");
    assert!(script.contains("restore"), "{script}");
    assert!(
        script.contains("complete -F"),
        "not a bash script: {script}"
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = litefleet(t.path(), &["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("replicate"),
            "{shell}"
        );
    }
    let out = litefleet(t.path(), &["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// `--config` is shown where it is read and hidden where it is not; an
/// ignored `--config` is still accepted there.
#[test]
fn config_flag_only_where_it_is_read() {
    let t = tempfile::tempdir().unwrap();
    let help = |args: &[&str]| String::from_utf8(litefleet(t.path(), args).stdout).unwrap();
    for cmd in ["demo", "bench", "completions"] {
        let h = help(&[cmd, "--help"]);
        assert!(h.contains("Usage: litefleet"), "{h}");
        assert!(!h.contains("--config"), "{cmd} --help lists --config:\n{h}");
    }
    for cmd in ["replicate", "restore", "list"] {
        let h = help(&[cmd, "--help"]);
        assert!(h.contains("--config"), "{cmd} --help lacks --config:\n{h}");
    }
    // The completion scripts agree (black-box probe: bash and fish offered
    // it for demo, bench and completions).
    let bash = help(&["completions", "bash"]);
    let fish = help(&["completions", "fish"]);
    let bash_opts = |cmd: &str| {
        let at = bash.find(&format!("litefleet__subcmd__{cmd})")).unwrap();
        bash[at..].lines().nth(1).unwrap().to_string()
    };
    for cmd in ["demo", "bench", "completions"] {
        assert!(
            !bash_opts(cmd).contains("--config"),
            "{cmd}: {}",
            bash_opts(cmd)
        );
        let using = format!("using_subcommand {cmd}\"");
        assert!(
            !fish
                .lines()
                .any(|l| l.contains(&using) && l.contains("-l config")),
            "fish offers --config for {cmd}"
        );
    }
    for cmd in ["replicate", "restore", "verify"] {
        assert!(
            bash_opts(cmd).contains("--config"),
            "{cmd}: {}",
            bash_opts(cmd)
        );
    }
    let out = litefleet(
        t.path(),
        &[
            "demo",
            "--config",
            "ignored.yml",
            "--databases",
            "1",
            "--dir",
            "d",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(t.path().join("d").is_dir());
}

/// HTTPS without network: the S3 client for an https endpoint builds (its
/// TLS configuration comes from rustls' `ring` provider), and a request
/// starts a TLS handshake: the first bytes on the wire are a ClientHello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoint_speaks_tls() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_bytes = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut conn, &mut buf).unwrap();
        buf
    });
    let opts = StoreOptions {
        region: Some("us-east-1".into()),
        endpoint: Some(format!("https://127.0.0.1:{port}")),
        force_path_style: true,
        access_key_id: Some(Secret::new("AKIDEXAMPLE")),
        secret_access_key: Some(Secret::new("wJalrXUtnFEMI")),
        retries: 0,
        timeout: Duration::from_secs(5),
    };
    let replica = Replica::open(
        &ReplicaUrl::S3 {
            bucket: "b".into(),
            prefix: "p".into(),
        },
        &opts,
    )
    .expect("the S3 client builds for an https endpoint");
    let started = Instant::now();
    let got = replica.get_bytes(&"x".into()).await;
    assert!(got.is_err(), "no server answered, yet: {got:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let hello = first_bytes.join().unwrap();
    // A TLS record: type 22 (handshake), version 3.x, then a ClientHello.
    assert_eq!(hello[0], 0x16, "not a TLS handshake: {hello:?}");
    assert_eq!(hello[1], 0x03, "not a TLS handshake: {hello:?}");
}
