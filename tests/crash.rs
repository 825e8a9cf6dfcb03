//! Crash consistency: the real `litefleet replicate` binary is SIGKILLed and
//! restarted at random moments while writers commit numbered rows into many
//! databases, and the store fails for windows of time. Afterwards every
//! database is restored, latest and at random points in time, and checked
//! against the writers' commit log.
//!
//! The databases cover what the replicator must follow: WAL and
//! rollback-journal modes, page sizes 1024 to 65536, application PASSIVE and
//! TRUNCATE checkpoints, a VACUUM, and a file replaced by rename.
//!
//! Each row records `t0`, the time just before its transaction began (in
//! the commit log also `t1`, when its COMMIT returned), so a state holding
//! it cannot be from before `t0`. What is checked, for every database:
//!
//! * after the writers stop and the replicator is stopped gracefully
//!   (SIGTERM, exit 0), the latest restore equals the source exactly;
//! * every point-in-time restore at `T` holds exactly rows `1..=n` of the
//!   commit log (a state the database really had), none with `t0 > T`;
//! * a hot restore at `T` holds every row committed (`t1`) more than
//!   [`lag`] before `T`, unless `T` falls in a crash window (from a kill to
//!   the restart plus [`lag`], and for each hot database until the restarted
//!   replicator's new generation of it has its snapshot, plus [`lag`]) or a
//!   store fault window: those restores are
//!   counted as "within a window", never as mismatches. A restore that
//!   fails because nothing is old enough is counted too; one that returns
//!   wrong data is a mismatch.
//!
//! Sizing comes from the environment: `LITEFLEET_CRASH_SECS` (writing time
//! per backend, default 20), `LITEFLEET_CRASH_DBS` (default 12),
//! `LITEFLEET_CRASH_SEED` (default: from the clock; printed), and
//! `LITEFLEET_CRASH_POINTS` (point-in-time restores per database, default 8),
//! `LITEFLEET_CRASH_BACKENDS` (`file`, `s3`, default both) and
//! `LITEFLEET_CRASH_KEEP_LOG` (set: the replicator's log is copied to the
//! temp directory) and `LITEFLEET_CRASH_DEBUG` (set: on a mismatch, every
//! object of the replica, with the parts each pack holds, is listed in a
//! file in the temp directory, and the replicator's log copied there).
//! The README's figures come from a 10-minute run in release mode.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::fleet::{Backend, Fleet};
use common::s3::Fault;
use litefleet::restore::{RestoreOptions, RestoreOutcome, Tier};
use rusqlite::Connection;

/// Replicator settings: short, so a short run sees many scans and syncs.
const SCAN_INTERVAL: &str = "500ms";
const SYNC_INTERVAL_MS: i64 = 250;
const SCAN_INTERVAL_MS: i64 = 500;
/// Extra allowance for a loaded 2-core machine (a scan, a snapshot and an
/// upload queued behind others).
const MARGIN_MS: i64 = 4000;

/// What a start that takes over a deleted lease waits before it writes:
/// the harness's `lease-ttl` (6 s) less its margin (a quarter).
const TAKEOVER_WAIT_MS: i64 = 4_500;

/// How long a commit may take to reach the replica outside crash and fault
/// windows: a scan to notice the database, a sync to ship it, and a margin.
fn lag() -> i64 {
    SCAN_INTERVAL_MS + SYNC_INTERVAL_MS + MARGIN_MS
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// xorshift64*: a seeded generator, so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// One committed row: id, before BEGIN, after COMMIT (ms since the epoch).
#[derive(Debug, Clone, Copy)]
struct Commit {
    id: i64,
    t0: i64,
    t1: i64,
}

/// A database under test.
struct Db {
    path: PathBuf,
    key: String,
    wal: bool,
    page_size: u32,
    log: Mutex<Vec<Commit>>,
}

fn open(db: &Db) -> Connection {
    let c = Connection::open(&db.path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.pragma_update(None, "journal_mode", if db.wal { "WAL" } else { "DELETE" })
        .unwrap();
    c
}

fn create(db: &Db) {
    std::fs::create_dir_all(db.path.parent().unwrap()).unwrap();
    let c = Connection::open(&db.path).unwrap();
    c.pragma_update(None, "page_size", db.page_size).unwrap();
    c.execute_batch("CREATE TABLE log(id INTEGER PRIMARY KEY, t0 INTEGER NOT NULL, pad BLOB)")
        .unwrap();
    drop(c);
    drop(open(db));
}

/// Commits one row into `db` through `c`.
fn commit(db: &Db, c: &Connection, rng: &mut Rng) {
    let id = db.log.lock().unwrap().last().map_or(1, |r| r.id + 1);
    let pad = vec![(id % 251) as u8; 50 + rng.below(3000) as usize];
    let t0 = now_ms();
    c.execute(
        "INSERT INTO log(id, t0, pad) VALUES (?1, ?2, ?3)",
        rusqlite::params![id, t0, pad],
    )
    .unwrap();
    let t1 = now_ms();
    db.log.lock().unwrap().push(Commit { id, t0, t1 });
}

/// A writer thread: round-robin over its databases, one row per commit,
/// with the occasional checkpoint, VACUUM and replacement by rename.
fn writer(dbs: Vec<Arc<Db>>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut conns: Vec<Connection> = dbs.iter().map(|d| open(d)).collect();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let i = rng.below(dbs.len() as u64) as usize;
        let db = &dbs[i];
        commit(db, &conns[i], &mut rng);
        n += 1;
        match rng.below(400) {
            0..=3 if db.wal => {
                let mode = if rng.below(2) == 0 {
                    "PASSIVE"
                } else {
                    "TRUNCATE"
                };
                // Busy while the replicator reads is fine (SQLITE_BUSY row).
                let _ =
                    conns[i].query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()));
            }
            4 => conns[i].execute_batch("VACUUM").unwrap(),
            5 if n > 200 => {
                // Replaced by rename: same rows, a new file (new inode).
                let tmp = db.path.with_extension("tmp");
                let _ = std::fs::remove_file(&tmp);
                conns[i]
                    .execute("VACUUM INTO ?1", [tmp.to_str().unwrap()])
                    .unwrap();
                let old = std::mem::replace(&mut conns[i], Connection::open_in_memory().unwrap());
                drop(old);
                std::fs::rename(&tmp, &db.path).unwrap();
                conns[i] = open(db);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(rng.below(8)));
    }
}

/// The replicator process, restarted after every kill.
struct Replicator {
    config: PathBuf,
    work: PathBuf,
    child: Option<Child>,
}

impl Replicator {
    /// Starts it and waits until it holds the lease (a restart right after a
    /// kill is refused until the dead holder's short lease expires).
    async fn start(&mut self) {
        for _ in 0..200 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.work.join("replicate.log"))
                .unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_litefleet"))
                .current_dir(&self.work)
                .args(["-c", self.config.to_str().unwrap(), "replicate"])
                .env_remove("LITEFLEET_CONFIG")
                .env("LITEFLEET_LOG", "info")
                .env("XDG_STATE_HOME", self.work.join("state"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            // Refused quickly when the lease is still held; else it runs.
            let mut refused = false;
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(!status.success());
                    refused = true;
                    break;
                }
            }
            if !refused {
                self.child = Some(child);
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "the replicator never started; see {}",
            self.work.join("replicate.log").display()
        );
    }

    fn kill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    /// Whether it ended by itself (as it must when its lease could not be
    /// renewed during a long store fault): a supervisor restarts it then.
    fn exited(&mut self) -> bool {
        let c = self.child.as_mut().expect("running");
        if c.try_wait().unwrap().is_some() {
            self.child = None;
            return true;
        }
        false
    }

    async fn terminate(&mut self) {
        let mut c = self.child.take().expect("running");
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = tokio::task::spawn_blocking(move || c.wait().unwrap())
            .await
            .unwrap();
        assert!(
            status.success(),
            "graceful stop failed ({status}); see {}",
            self.work.join("replicate.log").display()
        );
    }
}

/// Rows of a restored database (`id`, `t0`), in id order.
fn rows(path: &Path) -> Vec<(i64, i64)> {
    let c = Connection::open(path).unwrap();
    let mut s = c.prepare("SELECT id, t0 FROM log ORDER BY id").unwrap();
    let v = s
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    v
}

async fn restore(f: &Fleet, key: &str, out: &Path, at: Option<i64>) -> litefleet::Result<Tier> {
    let _ = std::fs::remove_file(out);
    let opts = RestoreOptions {
        target: key.to_string(),
        output: out.to_path_buf(),
        timestamp: at.map(|t| DateTime::from_timestamp_millis(t).unwrap()),
        if_replica_exists: false,
        if_db_not_exists: false,
        allow_older: false,
    };
    match litefleet::restore::restore(&f.loaded(), &f.replica(), &opts).await? {
        RestoreOutcome::Restored { tier, .. } => Ok(tier),
        other => panic!("{other:?}"),
    }
}

#[derive(Debug, Default)]
struct Tally {
    commits: usize,
    kills: usize,
    /// Times the replicator exited by itself (a lease it could not renew).
    self_exits: usize,
    faults: usize,
    restores: usize,
    hot_checked: usize,
    in_window: usize,
    none_old_enough: usize,
    mismatches: Vec<String>,
}

async fn run(backend: Backend, seed: u64) -> Tally {
    let secs = env_num("LITEFLEET_CRASH_SECS", 20);
    let n_dbs = env_num("LITEFLEET_CRASH_DBS", 12) as usize;
    let points = env_num("LITEFLEET_CRASH_POINTS", 8);
    let mut rng = Rng(seed);
    let mut f = Fleet::new(backend).await;
    f.scan_interval = SCAN_INTERVAL;
    f.extra_yaml = format!(
        "  sync-interval: {SYNC_INTERVAL_MS}ms\n  hot-duration: 30s\n  cold-after: 1h\n  max-hot-databases: 1000\n  checkpoint-pages: 200\n  truncate-pages: 1000\n"
    );
    // Inside `replica:`: a short lease, so a restart after SIGKILL waits
    // seconds, not a minute; longer than a store fault window, so a fault
    // alone does not cost the lease.
    f.top_yaml = "    lease-ttl: 6s\n".into();
    let config = f.config_path();
    let page_sizes = [1024u32, 4096, 8192, 16384, 65536];
    let dbs: Vec<Arc<Db>> = (0..n_dbs)
        .map(|i| {
            let tenant = format!("t{i:02}");
            Arc::new(Db {
                path: f.db_path("p", "d", &tenant),
                key: Fleet::key("p", "d", &tenant),
                wal: i % 4 != 3,
                page_size: page_sizes[i % page_sizes.len()],
                log: Mutex::new(Vec::new()),
            })
        })
        .collect();
    for db in &dbs {
        create(db);
    }
    let mut windows: Vec<(i64, i64)> = Vec::new();
    // When the replicator was started again after a kill or an exit.
    let mut restarts: Vec<i64> = Vec::new();
    let mut tally = Tally::default();
    let keep_log = std::env::var_os("LITEFLEET_CRASH_KEEP_LOG").is_some();
    let mut rep = Replicator {
        config,
        work: f.work.path().to_path_buf(),
        child: None,
    };
    rep.start().await;
    let start = now_ms();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let mine: Vec<Arc<Db>> = dbs.iter().skip(w).step_by(2).cloned().collect();
            let stop = stop.clone();
            let s = seed.wrapping_add(w as u64 + 1);
            std::thread::spawn(move || writer(mine, stop, s))
        })
        .collect();

    // Kills, restarts and store faults at random moments.
    let end = start + secs as i64 * 1000;
    let mut seen_alive = now_ms();
    while now_ms() < end {
        // Longer apart than a crash window, so that most points in time
        // fall outside one and get the completeness check.
        tokio::time::sleep(rng.range_ms(3000, 15000)).await;
        if rep.exited() {
            // Since the last time it was seen running: a crash window.
            tally.self_exits += 1;
            rep.start().await;
            restarts.push(now_ms());
            windows.push((seen_alive, now_ms() + lag()));
        }
        seen_alive = now_ms();
        if now_ms() >= end {
            break;
        }
        // The first event is always a kill: a short run with only store
        // faults would test no crash at all.
        match (backend, rng.below(3)) {
            (Backend::S3, 0) if tally.kills > 0 => {
                let from = now_ms();
                f.s3().set_fault(Fault::Unavailable);
                tokio::time::sleep(rng.range_ms(300, 2000)).await;
                f.s3().set_fault(Fault::None);
                windows.push((from, now_ms() + lag()));
                tally.faults += 1;
            }
            _ => {
                let from = now_ms();
                rep.kill();
                tally.kills += 1;
                // As an operator who knows the holder is dead may: delete
                // its lease instead of waiting for it to expire.
                f.replica()
                    .delete(&litefleet::replica::lease::lease_path(&f.replica()))
                    .await
                    .unwrap();
                tokio::time::sleep(rng.range_ms(0, 1000)).await;
                rep.start().await;
                restarts.push(now_ms());
                // A deleted lease may have had a live holder: the restart
                // writes nothing for `lease-ttl` less its margin.
                windows.push((from, now_ms() + TAKEOVER_WAIT_MS + lag()));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let written = now_ms();
    if rep.exited() {
        tally.self_exits += 1;
        rep.start().await;
    }

    // Catch up, then stop gracefully.
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.db");
    for db in &dbs {
        let want = db.log.lock().unwrap().len();
        let deadline = now_ms() + 120_000;
        loop {
            let (got, error) = match restore(&f, &db.key, &out, None).await {
                Ok(_) => (rows(&out).len(), None),
                Err(e) => (0, Some(e.to_string())),
            };
            if got == want {
                break;
            }
            if now_ms() >= deadline {
                // What a failure needs to be repeated and understood.
                let kept = std::env::temp_dir().join(format!("litefleet-crash-{backend:?}.log"));
                let _ = std::fs::copy(f.work.path().join("replicate.log"), &kept);
                panic!(
                    "seed {seed} ({backend:?}): {} never caught up: {got} of {want} rows \
                     (last restore error: {error:?}; replicator log kept at {})",
                    db.key,
                    kept.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    rep.terminate().await;

    for db in &dbs {
        // A restarted replicator recovers a hot database by starting a new
        // generation of it (a snapshot plus the WAL it finds): until that
        // snapshot, plus the lag, the database is still in its crash window.
        let mut started: Vec<i64> =
            litefleet::replica::hot::list_generations(&f.replica(), &db.key)
                .await
                .unwrap()
                .iter()
                .flat_map(|g| g.snapshots.iter().map(|s| s.time.timestamp_millis()))
                .collect();
        started.sort_unstable();
        let recovering: Vec<(i64, i64)> = restarts
            .iter()
            .map(|&r| {
                let done = started
                    .iter()
                    .copied()
                    .find(|&t| t >= r)
                    .unwrap_or(i64::MAX / 2);
                (r, done + lag())
            })
            .collect();
        let log = db.log.lock().unwrap().clone();
        tally.commits += log.len();
        let source: Vec<(i64, i64)> = rows(&db.path);
        let expected: Vec<(i64, i64)> = log.iter().map(|c| (c.id, c.t0)).collect();
        assert_eq!(source, expected, "{}: the source itself", db.key);
        restore(&f, &db.key, &out, None).await.unwrap();
        tally.restores += 1;
        if rows(&out) != expected {
            tally.mismatches.push(format!(
                "{}: latest restore differs from the source",
                db.key
            ));
        }
        for _ in 0..points {
            let t = start + rng.below((written - start) as u64) as i64;
            tally.restores += 1;
            let tier = match restore(&f, &db.key, &out, Some(t)).await {
                Ok(tier) => tier,
                Err(litefleet::Error::NotFound(_)) => {
                    tally.none_old_enough += 1;
                    continue;
                }
                Err(e) => {
                    tally
                        .mismatches
                        .push(format!("{} at {t}: restore failed: {e}", db.key));
                    continue;
                }
            };
            let got = rows(&out);
            let n = got.len();
            if got[..] != expected[..n.min(expected.len())] {
                tally.mismatches.push(format!(
                    "{} at {t}: {n} rows that are not rows 1..={n} of the log",
                    db.key
                ));
                continue;
            }
            if let Some(late) = got.iter().find(|(_, t0)| *t0 > t) {
                tally.mismatches.push(format!(
                    "{} at {t}: row {} began at {} (after T)",
                    db.key, late.0, late.1
                ));
                continue;
            }
            let due = log.iter().filter(|c| c.t1 < t - lag()).count();
            let windowed = windows
                .iter()
                .chain(&recovering)
                .any(|(a, b)| t >= *a && t <= *b);
            if tier == Tier::Hot && windowed {
                tally.in_window += 1;
            } else if tier == Tier::Hot {
                tally.hot_checked += 1;
                if n < due {
                    let since_window = windows
                        .iter()
                        .filter(|(_, b)| *b < t)
                        .map(|(_, b)| t - b)
                        .min();
                    let newest = n.checked_sub(1).map(|i| t - log[i].t1);
                    tally.mismatches.push(format!(
                        "{} at {t}: {n} rows, but {due} were committed more than {} ms before \
                         (the newest restored row committed {newest:?} ms before T; the last \
                         window ended {since_window:?} ms before T)",
                        db.key,
                        lag()
                    ));
                }
            }
        }
    }
    if !tally.mismatches.is_empty() && std::env::var_os("LITEFLEET_CRASH_DEBUG").is_some() {
        let dump = std::env::temp_dir().join(format!("litefleet-crash-{backend:?}-objects.txt"));
        let mut text = String::new();
        let r = f.replica();
        for o in f.objects().await {
            text.push_str(&o);
            text.push('\n');
            if o.ends_with(".pack") {
                let b = r
                    .get_bytes(&object_store::path::Path::from(o.as_str()))
                    .await
                    .unwrap()
                    .unwrap();
                let i = litefleet::replica::pack::decode_index(&b, &o).unwrap();
                for (p, range) in i.parts {
                    text.push_str(&format!(
                        "    {} {} {}:{} {:?} t={}\n",
                        p.key, p.generation, p.index, p.offset, range, p.time
                    ));
                }
            }
        }
        std::fs::write(&dump, text).unwrap();
        let kept = std::env::temp_dir().join(format!("litefleet-crash-{backend:?}.log"));
        std::fs::copy(f.work.path().join("replicate.log"), &kept).unwrap();
        println!("objects dumped to {}", dump.display());
    }
    if keep_log {
        let kept = std::env::temp_dir().join(format!("litefleet-crash-{backend:?}.log"));
        std::fs::copy(f.work.path().join("replicate.log"), &kept).unwrap();
        println!("replicator log kept at {}", kept.display());
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_faults_never_produce_a_wrong_restore() {
    let seed = std::env::var("LITEFLEET_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() as u64);
    let backends = match std::env::var("LITEFLEET_CRASH_BACKENDS").as_deref() {
        Ok("file") => vec![Backend::File],
        Ok("s3") => vec![Backend::S3],
        _ => vec![Backend::File, Backend::S3],
    };
    for backend in backends {
        let t = run(backend, seed).await;
        println!(
            "crash harness ({backend:?}, seed {seed}): databases {}, commits {}, kills {}, exits by itself {}, store faults {}, \
             restores checked {}, hot point-in-time restores checked for completeness {}, within a crash/fault window {}, \
             none old enough {}, mismatches {}",
            env_num("LITEFLEET_CRASH_DBS", 12),
            t.commits,
            t.kills,
            t.self_exits,
            t.faults,
            t.restores,
            t.hot_checked,
            t.in_window,
            t.none_old_enough,
            t.mismatches.len()
        );
        assert!(t.mismatches.is_empty(), "seed {seed}: {:#?}", t.mismatches);
        assert!(t.kills > 0, "seed {seed}: no kill happened");
    }
}
