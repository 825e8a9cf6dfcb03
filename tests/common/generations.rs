//! A real WAL-mode database shipped into one generation by hand, the way the
//! shipper does it (committed frames as segments, a new WAL index after a
//! TRUNCATE checkpoint), for tests that need a precise generation history
//! without a running stream.

use std::fs::File;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use litefleet::capture::wal::{self, Position, ReadOutcome, WalCursor};
use litefleet::replica::hot::{self, GenerationId, Metadata, WalStart};
use litefleet::replica::storage::Replica;
use rusqlite::Connection;

thread_local! {
    /// How far [`now`] is ahead of the real clock.
    static AHEAD: std::cell::Cell<chrono::Duration> = const { std::cell::Cell::new(chrono::Duration::zero()) };
}

/// The clock commit times are taken from: the real one, moved ahead by
/// [`move_clock_ahead`]. Per thread: a test's body runs on its own thread
/// (`block_on`), so each test has a clock of its own.
pub fn now() -> DateTime<Utc> {
    Utc::now() + clock_ahead()
}

/// How far [`now`] is ahead of the real clock.
pub fn clock_ahead() -> chrono::Duration {
    AHEAD.with(|a| a.get())
}

/// Moves [`now`] ahead by `d`: a test that needs cold snapshots in
/// several hours (each hour holds one per database) lets an hour pass.
pub fn move_clock_ahead(d: chrono::Duration) {
    AHEAD.with(|a| a.set(a.get() + d));
}

pub struct GenWriter {
    pub db: PathBuf,
    pub key: String,
    pub conn: Connection,
    /// Rows committed; ids are 1..=rows.
    pub rows: i64,
    /// WAL index of the current (or next) WAL.
    pub index: u64,
    /// Where the next segment starts; `None` before the current WAL's first.
    pub cursor: Option<WalCursor>,
    pub gen: GenerationId,
    /// Every segment shipped: where it starts and its commit time.
    pub shipped: Vec<(Position, DateTime<Utc>)>,
    /// Where each finished WAL ended, as the shipper records it in the
    /// generation's metadata.
    pub wal_ends: Vec<Position>,
    /// The header of each WAL, as the shipper records it before the WAL's
    /// first segment.
    pub wal_starts: Vec<WalStart>,
    /// Width of each row's text value (pads pages to the size a test needs).
    row_width: usize,
}

impl GenWriter {
    /// Creates `db` (1 KiB pages, WAL mode, no automatic checkpoints) with a
    /// table `t(id INTEGER PRIMARY KEY, v TEXT)`, in a new generation of `key`.
    pub fn create(db: PathBuf, key: &str, row_width: usize) -> GenWriter {
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "page_size", 1024).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        GenWriter {
            db,
            key: key.to_string(),
            conn,
            rows: 0,
            index: 0,
            cursor: None,
            gen: hot::new_generation_id(Utc::now()),
            shipped: Vec::new(),
            wal_ends: Vec::new(),
            wal_starts: Vec::new(),
            row_width,
        }
    }

    /// One transaction of `n` rows (ids stay 1..=rows).
    pub fn commit(&mut self, n: i64) {
        let tx = self.conn.unchecked_transaction().unwrap();
        for _ in 0..n {
            self.rows += 1;
            tx.execute(
                "INSERT INTO t(id, v) VALUES (?1, ?2)",
                rusqlite::params![self.rows, format!("{:>1$}", self.rows, self.row_width)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    /// Ships every committed frame not shipped yet as one segment; returns
    /// where it starts.
    pub async fn ship(&mut self, r: &Replica) -> Position {
        // As names record it: whole milliseconds, rounded up.
        let committed = DateTime::from_timestamp_millis(litefleet::replica::layout::commit_millis(
            now(),
        ) as i64)
        .unwrap();
        let wp = PathBuf::from(format!("{}-wal", self.db.display()));
        let f = File::open(&wp).unwrap();
        let cur = match self.cursor {
            Some(c) => c,
            None => {
                // As the shipper does: where the previous WAL ended and the
                // header of this one are recorded before its first segment.
                let c =
                    WalCursor::at_start(self.index, &wal::read_header(&f, &wp).unwrap().unwrap());
                self.wal_starts.push(c.wal_start());
                self.write_metadata(r).await;
                c
            }
        };
        let ReadOutcome::Frames { bytes, next, .. } =
            wal::read_committed(&f, &wp, &cur, u64::MAX).unwrap()
        else {
            panic!("WAL continuity lost")
        };
        let end = litefleet::capture::upload::upload_segment(
            r, &self.key, &self.gen, cur.pos, committed, &bytes,
        )
        .await
        .unwrap();
        assert_eq!(end, next.pos);
        self.cursor = Some(next);
        self.shipped.push((cur.pos, committed));
        cur.pos
    }

    /// The object of the segment shipped at `pos`.
    pub fn segment_path(&self, r: &Replica, pos: Position) -> object_store::path::Path {
        let (_, committed) = self
            .shipped
            .iter()
            .find(|(p, _)| *p == pos)
            .expect("a segment shipped at that position");
        hot::segment_path(&r.prefix, &self.key, &self.gen, pos, *committed)
    }

    /// Writes the generation's metadata as the shipper would now.
    pub async fn write_metadata(&self, r: &Replica) {
        self.write_metadata_logged(r, false).await;
    }

    /// [`GenWriter::write_metadata`], saying whether its frames go to the
    /// fleet log (`logged`).
    pub async fn write_metadata_logged(&self, r: &Replica, logged: bool) {
        let meta = Metadata {
            generation: self.gen.clone(),
            page_size: 1024,
            created: self.gen.created(),
            first: Position::start(0),
            last: self.cursor.map_or(Position::start(self.index), |c| c.pos),
            snapshots: Vec::new(),
            wal_ends: self.wal_ends.clone(),
            logged,
            wal_starts: Some(self.wal_starts.clone()),
            written: Some(now()),
            key: None,
        };
        hot::write_metadata(r, &self.key, &meta).await.unwrap();
    }

    /// TRUNCATE checkpoint (everything was shipped): the database file holds
    /// every commit, and SQLite starts a new WAL with the next one, numbered
    /// `index + 1` if `new_wal`.
    pub fn checkpoint(&mut self, new_wal: bool) {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 0);
        if new_wal {
            self.wal_ends
                .push(self.cursor.map_or(Position::start(self.index), |c| c.pos));
            self.index += 1;
        }
        self.cursor = None;
    }
}
