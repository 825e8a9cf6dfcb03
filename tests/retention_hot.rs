//! Retention of WAL generations (hot tier) beside cold snapshots, against the
//! in-process S3 server and file://.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::fleet::Fleet;
use common::generations::GenWriter;
use futures::TryStreamExt;
use litefleet::capture::wal::Position;
use litefleet::replica::hot::{self, GenerationId, Metadata};
use litefleet::replica::retention::{enforce, RetentionReport};
use litefleet::replica::storage::Replica;
use object_store::ObjectStoreExt;

const KEY: &str = "p/d/a";
const MONTH: Duration = Duration::from_secs(30 * 86400);

/// A `now` that makes every upload of the test older than a month's cutoff.
fn far_future() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::days(365)
}

/// `now` whose cutoff under [`MONTH`] is exactly `cutoff`.
fn now_for_cutoff(cutoff: DateTime<Utc>) -> DateTime<Utc> {
    cutoff + chrono::Duration::from_std(MONTH).unwrap()
}

fn gen_at(minutes_ago: i64) -> GenerationId {
    hot::new_generation_id(Utc::now() - chrono::Duration::minutes(minutes_ago))
}

/// Generation objects that only need their names: arbitrary bytes.
struct Names<'a> {
    r: &'a Replica,
    tmp: PathBuf,
}

impl<'a> Names<'a> {
    fn new(r: &'a Replica, tmp: &Path) -> Names<'a> {
        let tmp = tmp.join("names");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("db"), b"not really a database").unwrap();
        Names { r, tmp }
    }

    async fn snapshot(&self, gen: &GenerationId, index: u64) -> String {
        self.snapshot_committed(gen, index, Utc::now()).await
    }

    /// A snapshot whose name records `now` as its commit time.
    async fn snapshot_committed(
        &self,
        gen: &GenerationId,
        index: u64,
        now: DateTime<Utc>,
    ) -> String {
        litefleet::capture::upload::upload_snapshot(
            self.r,
            KEY,
            gen,
            index,
            now,
            &self.tmp.join("db"),
            &self.tmp,
        )
        .await
        .unwrap();
        hot::snapshot_path(&self.r.prefix, KEY, gen, index, now).to_string()
    }

    async fn segment(&self, gen: &GenerationId, index: u64, offset: u64) -> String {
        let pos = Position { index, offset };
        let now = Utc::now();
        litefleet::capture::upload::upload_segment(self.r, KEY, gen, pos, now, &[7u8; 100])
            .await
            .unwrap();
        hot::segment_path(&self.r.prefix, KEY, gen, pos, now).to_string()
    }

    async fn metadata(&self, gen: &GenerationId) -> String {
        let meta = Metadata {
            generation: gen.clone(),
            page_size: 4096,
            created: gen.created(),
            first: Position::start(0),
            last: Position::start(0),
            snapshots: vec![],
            wal_ends: vec![],
            logged: false,
            wal_starts: None,
            written: None,
            key: None,
        };
        hot::write_metadata(self.r, KEY, &meta).await.unwrap();
        hot::metadata_path(&self.r.prefix, KEY, gen).to_string()
    }

    /// Any object at `<key>/generations/<rel>`.
    async fn raw(&self, rel: &str) -> String {
        let dir = hot::generations_dir(&self.r.prefix, KEY);
        let loc = object_store::path::Path::from(format!("{dir}/{rel}"));
        self.r
            .store
            .put(&loc, bytes::Bytes::from_static(b"?").into())
            .await
            .unwrap();
        loc.to_string()
    }
}

/// A report of one key's generations, without cold snapshots.
fn hot(generations: usize, deleted: usize, snapshots: usize, wal: usize) -> RetentionReport {
    RetentionReport {
        generation_keys: 1,
        generations,
        generations_deleted: deleted,
        generation_snapshots_deleted: snapshots,
        wal_deleted: wal,
        ..RetentionReport::default()
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Requests the S3 server saw while `f` ran (`None` on file://).
async fn counting<T>(fleet: &Fleet, f: impl std::future::Future<Output = T>) -> (T, Option<u64>) {
    let before = fleet.s3.as_ref().map(|s| s.request_count());
    let out = f.await;
    let used = fleet
        .s3
        .as_ref()
        .map(|s| s.request_count() - before.unwrap());
    (out, used)
}

both_backends!(old_generation_deleted_entirely, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    let n = Names::new(&r, f.work.path());
    let (old, new) = (gen_at(120), gen_at(60));
    let gone = [
        n.snapshot(&old, 0).await,
        n.segment(&old, 0, 32).await,
        n.segment(&old, 0, 132).await,
        n.segment(&old, 1, 32).await,
        n.metadata(&old).await,
    ];
    let kept = vec![
        n.snapshot(&new, 0).await,
        n.segment(&new, 0, 32).await,
        n.metadata(&new).await,
    ];
    let (report, requests) = counting(&f, enforce(&r, MONTH, far_future())).await;
    let report = report.unwrap();
    assert_eq!(report, hot(2, 1, 1, 3));
    // The prefix LIST (which sees every generation), then for the old
    // generation only: one sweep and one DeleteObjects.
    if let Some(n) = requests {
        assert_eq!(n, 3);
    }
    assert_eq!(f.objects().await, sorted(kept.clone()));
    assert_eq!(
        hot::list_generation_ids(&r, KEY).await.unwrap(),
        vec![new.clone()]
    );
    // A second pass finds nothing more to do.
    let again = enforce(&r, MONTH, far_future()).await.unwrap();
    assert_eq!((again.generations, again.generations_deleted), (1, 0));
    let left = f.objects().await;
    assert_eq!(left, sorted(kept));
    assert!(gone.iter().all(|g| !left.contains(g)));
});

both_backends!(
    newest_generation_kept_entirely_when_expired,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let n = Names::new(&r, f.work.path());
        let g = gen_at(60);
        let all = vec![
            n.snapshot(&g, 3).await,
            n.segment(&g, 3, 32).await,
            n.segment(&g, 3, 132).await,
            n.segment(&g, 4, 32).await,
            n.metadata(&g).await,
        ];
        let (report, requests) = counting(&f, enforce(&r, MONTH, far_future())).await;
        assert_eq!(report.unwrap(), hot(1, 0, 0, 0));
        // Nothing to delete: the prefix LIST only, however long the
        // generation lives (no LIST of its own every pass).
        if let Some(n) = requests {
            assert_eq!(n, 1);
        }
        assert_eq!(f.objects().await, sorted(all));
    }
);

both_backends!(
    superseded_generation_kept_until_a_newer_one_covers_the_cutoff,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let n = Names::new(&r, f.work.path());
        let (old, new) = (gen_at(120), gen_at(60));
        let old_objects = vec![
            n.snapshot(&old, 0).await,
            n.segment(&old, 0, 32).await,
            n.metadata(&old).await,
        ];
        // The newest generation has no snapshot yet: the old one is all there is
        // to restore, however old.
        let new_meta = n.metadata(&new).await;
        let report = enforce(&r, MONTH, far_future()).await.unwrap();
        assert_eq!((report.generations, report.generations_deleted), (2, 0));
        let mut all = old_objects.clone();
        all.push(new_meta.clone());
        assert_eq!(f.objects().await, sorted(all.clone()));

        // Its first snapshot arrives after every object of the old generation.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let new_snap = n.snapshot(&new, 0).await;
        all.push(new_snap.clone());
        let listed = hot::list_snapshots(&r, KEY, &new).await.unwrap();
        // Uploaded and committed (the base is chosen by both).
        let snap_time = listed[0].uploaded.max(listed[0].time);
        let old_dir = hot::generation_dir(&r.prefix, KEY, &old);
        let old_newest = r
            .list_all(&old_dir)
            .try_fold(DateTime::<Utc>::MIN_UTC, |t, m| async move {
                Ok(t.max(m.last_modified))
            })
            .await
            .unwrap();
        assert!(old_newest < snap_time - chrono::Duration::milliseconds(5));

        // Cutoff just before that snapshot: a restore at the cutoff still needs
        // the old generation.
        let just_before = snap_time - chrono::Duration::milliseconds(1);
        let report = enforce(&r, MONTH, now_for_cutoff(just_before))
            .await
            .unwrap();
        assert_eq!(report.generations_deleted, 0);
        assert_eq!(f.objects().await, sorted(all));

        // Cutoff at the snapshot's upload: the new generation covers it.
        let report = enforce(&r, MONTH, now_for_cutoff(snap_time)).await.unwrap();
        assert_eq!(
            (
                report.generations_deleted,
                report.generation_snapshots_deleted,
                report.wal_deleted
            ),
            (1, 1, 1)
        );
        assert_eq!(f.objects().await, sorted(vec![new_meta, new_snap]));
    }
);

both_backends!(
    unknown_objects_under_generations_untouched,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let n = Names::new(&r, f.work.path());
        let (old, new) = (gen_at(120), gen_at(60));
        n.snapshot(&old, 0).await;
        n.segment(&old, 0, 32).await;
        n.metadata(&old).await;
        n.snapshot(&new, 0).await;
        n.segment(&new, 0, 32).await;
        n.segment(&new, 1, 32).await;
        let mut kept = vec![
            n.snapshot(&new, 2).await,
            n.segment(&new, 2, 32).await,
            n.metadata(&new).await,
        ];
        let upper = old.as_str().to_uppercase();
        for rel in [
            format!("{old}/notes.txt"),
            format!("{old}/snapshots/garbage.snapshot.lz4"),
            format!("{old}/snapshots/0000000000000000.snapshot.lz4.tmp"),
            format!("{old}/wal/0000000000000000_0000000000000000.wal.lz4"),
            format!("{old}/wal/extra/0000000000000000_0000000000000020.wal.lz4"),
            format!("{new}/wal/zz.wal.lz4"),
            format!("{new}/SNAPSHOTS/0000000000000000.snapshot.lz4"),
            format!("{new}/metadata.json.bak"),
            format!("{upper}/snapshots/0000000000000000.snapshot.lz4"),
            "not-a-generation/snapshots/0000000000000000.snapshot.lz4".to_string(),
            // Cold-snapshot names inside a generation are not cold snapshots.
            format!("{old}/snapshots/a-20000101-000000.db.lz4"),
            format!("{old}/a-20000101-000000.db.lz4"),
        ] {
            kept.push(n.raw(&rel).await);
        }
        let report = enforce(&r, MONTH, far_future()).await.unwrap();
        assert_eq!(report, hot(2, 1, 2, 3));
        assert_eq!(f.objects().await, sorted(kept));
    }
);

both_backends!(
    cold_snapshots_unchanged_beside_generations,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let now = Utc::now();
        let days = |d: i64| now - chrono::Duration::days(d);
        let put = |key, stem, t| f.put_cold_snapshot(key, stem, t);
        let a_old1 = put(KEY, "a", days(40)).await;
        let a_old2 = put(KEY, "a", days(35)).await;
        let a_new = put(KEY, "a", days(1)).await;
        let b_old = put("p/d/b", "b", days(45)).await;
        let b_newest_but_expired = put("p/d/b", "b", days(39)).await;
        let n = Names::new(&r, f.work.path());
        let g = gen_at(1);
        let generation_objects = [
            n.snapshot(&g, 0).await,
            n.segment(&g, 0, 32).await,
            n.snapshot(&g, 1).await,
            n.segment(&g, 1, 32).await,
        ];
        let report = enforce(&r, MONTH, now).await.unwrap();
        assert_eq!(
            report,
            RetentionReport {
                examined: 5,
                deleted: 2,
                kept_newest_expired: 1,
                ..hot(1, 0, 0, 0)
            }
        );
        let mut want = vec![a_old2, a_new, b_newest_but_expired];
        want.extend(generation_objects);
        let left = f.objects().await;
        assert_eq!(left, sorted(want));
        for gone in [a_old1, b_old] {
            assert!(!left.contains(&gone));
        }
    }
);

/// Ships a real WAL-mode database into one generation ([`GenWriter`]) and
/// uploads its snapshots after TRUNCATE checkpoints.
struct Writer {
    w: GenWriter,
    tmp: PathBuf,
}

impl std::ops::Deref for Writer {
    type Target = GenWriter;
    fn deref(&self) -> &GenWriter {
        &self.w
    }
}

impl std::ops::DerefMut for Writer {
    fn deref_mut(&mut self) -> &mut GenWriter {
        &mut self.w
    }
}

impl Writer {
    fn new(dir: &Path) -> Writer {
        Writer {
            w: GenWriter::create(dir.join("app.db"), KEY, 300),
            tmp: dir.to_path_buf(),
        }
    }

    /// Uploads the database file as the snapshot of the current WAL index;
    /// returns its listing time (retention decides by it) and a time at which
    /// it is both uploaded and committed (restore selects by commit time).
    async fn snapshot(&self, r: &Replica) -> (DateTime<Utc>, DateTime<Utc>) {
        let copy = self.tmp.join("copy.db");
        std::fs::copy(&self.db, &copy).unwrap();
        litefleet::capture::upload::upload_snapshot(
            r,
            KEY,
            &self.gen,
            self.index,
            Utc::now(),
            &copy,
            &self.tmp,
        )
        .await
        .unwrap();
        // Upload times are file mtimes or S3 times in milliseconds: keep the
        // next upload in a later tick so point-in-time restores are exact.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let listed = hot::list_snapshots(r, KEY, &self.gen).await.unwrap();
        let s = listed.iter().find(|s| s.index == self.index).unwrap();
        (s.uploaded, s.uploaded.max(s.time))
    }
}

/// Restores `KEY` at `at` and counts its rows.
async fn restore_rows(
    r: &Replica,
    at: Option<DateTime<Utc>>,
    dir: &Path,
) -> litefleet::Result<i64> {
    let out = tempfile::Builder::new()
        .suffix(".db")
        .tempfile_in(dir)
        .unwrap();
    let mut file = out.reopen().unwrap();
    litefleet::restore::replay::restore_generation(r, KEY, at, &mut file, out.path()).await?;
    drop(file);
    Ok(common::fleet::count_rows(out.path()))
}

fn segment_positions(l: &hot::GenerationListing) -> Vec<(u64, u64)> {
    l.segments
        .iter()
        .map(|s| (s.pos.index, s.pos.offset))
        .collect()
}

both_backends!(
    trims_history_before_the_snapshot_at_the_cutoff,
    |b| async move {
        let f = Fleet::new(b).await;
        let r = f.replica();
        let mut w = Writer::new(f.work.path());
        w.commit(10);
        w.checkpoint(false);
        let (_, snap0) = w.snapshot(&r).await;
        w.commit(5);
        w.ship(&r).await;
        w.commit(3);
        w.ship(&r).await;
        // WAL 1: segments but no snapshot of its own.
        w.checkpoint(true);
        w.commit(4);
        w.ship(&r).await;
        // WAL 2 starts with snapshot 2.
        w.checkpoint(true);
        let (snap2_up, snap2) = w.snapshot(&r).await;
        w.commit(6);
        let wal2_first = w.ship(&r).await;
        w.commit(2);
        let wal2_second = w.ship(&r).await;
        assert_eq!(w.rows, 30);
        assert!(snap0 < snap2_up - chrono::Duration::milliseconds(1));
        let before = hot::list_generation(&r, KEY, &w.gen).await.unwrap();
        assert_eq!(
            before.snapshots.iter().map(|s| s.index).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(segment_positions(&before).len(), 5);
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(restore_rows(&r, None, tmp.path()).await.unwrap(), 30);
        assert_eq!(restore_rows(&r, Some(snap0), tmp.path()).await.unwrap(), 10);

        // Cutoff just before snapshot 2: restores from there on may start at
        // snapshot 0, so nothing goes.
        let report = enforce(
            &r,
            MONTH,
            now_for_cutoff(snap2 - chrono::Duration::milliseconds(1)),
        )
        .await
        .unwrap();
        assert_eq!(
            (
                report.generations,
                report.generation_snapshots_deleted,
                report.wal_deleted
            ),
            (1, 0, 0)
        );
        assert_eq!(hot::list_generation(&r, KEY, &w.gen).await.unwrap(), before);

        // Cutoff at snapshot 2's upload: snapshot 0 and WALs 0 and 1 go.
        let report = enforce(&r, MONTH, now_for_cutoff(snap2)).await.unwrap();
        assert_eq!(report, hot(1, 0, 1, 3));
        let after = hot::list_generation(&r, KEY, &w.gen).await.unwrap();
        assert_eq!(
            after.snapshots.iter().map(|s| s.index).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(after.snapshots[0].uploaded, snap2_up);
        assert_eq!(
            segment_positions(&after),
            vec![
                (wal2_first.index, wal2_first.offset),
                (wal2_second.index, wal2_second.offset)
            ]
        );
        assert_eq!(wal2_first, Position::start(2));
        // The latest state and every point from the cutoff on still restore.
        assert_eq!(restore_rows(&r, None, tmp.path()).await.unwrap(), 30);
        assert_eq!(restore_rows(&r, Some(snap2), tmp.path()).await.unwrap(), 22);
        // Points before the cutoff are gone.
        let e = restore_rows(&r, Some(snap0), tmp.path()).await.unwrap_err();
        assert!(matches!(e, litefleet::Error::NotFound(_)), "{e}");

        // Everything expired: the newest generation keeps snapshot 2 and WAL 2.
        let report = enforce(&r, MONTH, far_future()).await.unwrap();
        assert_eq!(
            (report.generation_snapshots_deleted, report.wal_deleted),
            (0, 0)
        );
        assert_eq!(hot::list_generation(&r, KEY, &w.gen).await.unwrap(), after);
        assert_eq!(restore_rows(&r, None, tmp.path()).await.unwrap(), 30);
    }
);

// The base snapshot at the cutoff is chosen by the commit time in its name:
// a snapshot listed before the cutoff (whole-second listing times can show
// that) but committed after it cannot serve a restore at the cutoff, so the
// history before it must stay.
both_backends!(base_snapshot_is_chosen_by_commit_time, |b| async move {
    let f = Fleet::new(b).await;
    let r = f.replica();
    let names = Names::new(&r, f.work.path());
    let gen = gen_at(10);
    let s0 = names.snapshot(&gen, 0).await;
    let w0 = names.segment(&gen, 0, 32).await;
    let cutoff = Utc::now() + chrono::Duration::seconds(5);
    let s1 = names
        .snapshot_committed(&gen, 1, cutoff + chrono::Duration::seconds(5))
        .await;
    let report = enforce(&r, MONTH, now_for_cutoff(cutoff)).await.unwrap();
    assert_eq!(
        (report.generation_snapshots_deleted, report.wal_deleted),
        (0, 0),
        "{report:?}"
    );
    for kept in [s0, w0, s1] {
        assert!(
            r.get_bytes(&kept.as_str().into()).await.unwrap().is_some(),
            "{kept}"
        );
    }
});
