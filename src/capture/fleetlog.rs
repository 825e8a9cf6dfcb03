//! The fleet log: every hot database's frames of one sync tick in **one**
//! object, and their consolidation into per-database packs (the layout and
//! its guarantees are [`crate::replica::pack`]'s).
//!
//! * [`LogWriter`] owns the tick. Every `sync-interval` it tells every
//!   registered stream to sync ([`FleetLog::ticks`]), gathers the parts they
//!   append until each has answered (or [`gather_window`] passed), and writes
//!   them with one PUT. Only then does each [`FleetLog::append`] return: a
//!   part is shipped once the object holding it is durable. A failed PUT
//!   fails every append of that batch; the streams keep their frames and
//!   retry at the next tick, exactly as with a failed segment upload.
//! * Each stream keeps what it shipped since its last consolidation in a
//!   [`Spool`] file under the temp directory (written after the append
//!   returned, so it never holds a part the log lacks). At the
//!   consolidation interval, at a new generation and when the stream ends, the
//!   spool is written as one pack of the database's own and the stream tells
//!   the writer ([`FleetLog::consolidated`]); a log object is deleted once
//!   every stream with parts in it has consolidated them.
//! * A log object holds only frames the streams kept in memory, which share
//!   one budget ([`crate::capture::work::frames_budget`], 128 MiB): larger
//!   backlogs ship from the WAL files as segment objects, so no tick's object
//!   grows with the number of streams behind (after a store outage it did:
//!   579 MB with 100 databases behind, where S3 takes at most 5 GB in one
//!   PUT).
//! * After a crash, log objects hold parts no running stream will
//!   consolidate: [`recover`] rewrites them as per-database packs before the
//!   first stream starts, then deletes them. Until then (or if that fails)
//!   restore reads them where they are.
//!
//! Cost: one PUT per tick with changes for the whole fleet, plus one PUT per
//! database per consolidation interval: for the product description's 250
//! always-hot databases at the 1 s default, 2.6 M + 0.18 M PUTs a month,
//! about $14, against $3,240 with one object per database per sync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::ObjectMeta;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::IoContext;
use crate::replica::hot::{self, GenerationId, Position};
use crate::replica::pack::{self, Part};
use crate::replica::storage::Replica;
use crate::stats::Stats;
use crate::{Error, Result};

/// After a tick, how long the writer waits for streams that have not
/// answered: a quarter of the interval, so a slow stream (one uploading a
/// new generation's snapshot) delays the others' parts by at most that.
pub fn gather_window(sync_interval: Duration) -> Duration {
    sync_interval / 4
}
/// A part appended outside a tick's gathering (a stream's last sync at
/// shutdown, a late one) waits this long for company before its PUT.
const LATE_WINDOW: Duration = Duration::from_millis(20);
/// Largest consolidated pack: a restore holds one pack in memory at a time.
/// 64 MiB is ~16,000 pages of 4 KiB compressed; a busier hour gets several.
const PACK_MAX: u64 = 64 << 20;
/// Memory a spooled part takes in a consolidation besides its bytes, as a
/// round upper figure: its [`Part`] (key and generation strings, positions)
/// and its handle in the chunk, and its record in the pack's JSON index
/// (~130-200 bytes).
const PART_MEMORY: u64 = 512;
/// Memory the consolidations of all streams hold at once, together (one
/// permit is one byte; see [`consolidation_budget`]): two of the largest
/// packs. Each stream's consolidation used to hold its pack, with a joined
/// copy, whatever the others held, up to `max-concurrent` (100) at once:
/// streams started together consolidate together, and 11 busy ones took a
/// daemon from 38 MB to 248 MB for the seconds of their hourly
/// consolidation (black-box probe O30); 100 could take 12 GB.
const CONSOLIDATION_IN_MEMORY: u64 = 2 * PACK_MAX;

/// The budget of memory that consolidations share; see
/// `CONSOLIDATION_IN_MEMORY` (128 MiB). A consolidation takes
/// [`Spool::memory`] of it before it reads the spool: one due by the clock
/// waits for the next tick when it finds too little free (its stream goes
/// on syncing meanwhile), one at a stream's end waits for it.
pub fn consolidation_budget() -> Arc<Semaphore> {
    static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();
    BUDGET
        .get_or_init(|| Arc::new(Semaphore::new(CONSOLIDATION_IN_MEMORY as usize)))
        .clone()
}

enum Msg {
    Register(u64),
    Unregister(u64),
    Append {
        stream: u64,
        tick: u64,
        part: Part,
        bytes: Bytes,
        done: oneshot::Sender<Result<u64>>,
    },
    Synced {
        stream: u64,
        tick: u64,
    },
    Consolidated {
        stream: u64,
        upto: u64,
    },
    Held {
        from: u64,
        upto: u64,
        reply: oneshot::Sender<Vec<ObjPath>>,
    },
}

/// The streams' side of the fleet log; see the module docs.
pub struct FleetLog {
    tx: mpsc::UnboundedSender<Msg>,
    ticks: watch::Receiver<u64>,
    ids: AtomicU64,
}

/// The writer task's side; run it with [`LogWriter::run`].
pub struct LogWriter {
    rx: mpsc::UnboundedReceiver<Msg>,
    ticks: watch::Sender<u64>,
    replica: Replica,
    every: Duration,
    stats: Arc<Stats>,
}

impl FleetLog {
    pub fn new(
        replica: Replica,
        sync_interval: Duration,
        stats: Arc<Stats>,
    ) -> (Arc<FleetLog>, LogWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ticks_tx, ticks) = watch::channel(0);
        (
            Arc::new(FleetLog {
                tx,
                ticks,
                ids: AtomicU64::new(1),
            }),
            LogWriter {
                rx,
                ticks: ticks_tx,
                replica,
                every: sync_interval,
                stats,
            },
        )
    }

    /// A new stream: the writer waits for it at each tick. Returns its id.
    pub fn register(&self) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Msg::Register(id));
        id
    }

    pub fn unregister(&self, stream: u64) {
        let _ = self.tx.send(Msg::Unregister(stream));
    }

    /// The tick counter: a stream syncs each time it changes.
    pub fn ticks(&self) -> watch::Receiver<u64> {
        self.ticks.clone()
    }

    /// Appends one part (an LZ4 segment frame) to the next log object and
    /// waits until that object is durable. Returns the object's sequence
    /// number (for [`FleetLog::consolidated`]).
    pub async fn append(&self, stream: u64, tick: u64, part: Part, bytes: Bytes) -> Result<u64> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Append {
                stream,
                tick,
                part,
                bytes,
                done,
            })
            .map_err(|_| Error::invalid("fleet log", "the log writer has stopped"))?;
        wait.await
            .map_err(|_| Error::invalid("fleet log", "the log writer has stopped"))?
    }

    /// The stream's sync for `tick` is done (whether or not it appended).
    pub fn synced(&self, stream: u64, tick: u64) {
        let _ = self.tx.send(Msg::Synced { stream, tick });
    }

    /// Every part the stream appended to log objects up to sequence `upto`
    /// is in a consolidated pack now.
    pub fn consolidated(&self, stream: u64, upto: u64) {
        let _ = self.tx.send(Msg::Consolidated { stream, upto });
    }

    /// The log objects from sequence `from` to `upto` that are still kept
    /// (each holds a part some stream has not consolidated), in order: where
    /// a broken spool's parts are ([`Spool::rebuild`]).
    pub async fn held(&self, from: u64, upto: u64) -> Result<Vec<ObjPath>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Msg::Held { from, upto, reply })
            .map_err(|_| Error::invalid("fleet log", "the log writer has stopped"))?;
        answer
            .await
            .map_err(|_| Error::invalid("fleet log", "the log writer has stopped"))
    }
}

/// What [`LogWriter::run`] keeps between messages.
#[derive(Default)]
struct WriterState {
    tick: u64,
    registered: HashSet<u64>,
    /// Streams that appended or synced since the last tick.
    answered: HashSet<u64>,
    batch: Vec<Waiting>,
    /// When the batch is written, if it is being gathered.
    deadline: Option<Instant>,
    seq: u64,
    /// Log objects by sequence: path and the streams with parts in it that
    /// have not consolidated them yet.
    objects: BTreeMap<u64, (ObjPath, HashSet<u64>)>,
}

struct Waiting {
    stream: u64,
    part: Part,
    bytes: Bytes,
    done: oneshot::Sender<Result<u64>>,
}

impl LogWriter {
    /// Runs until `stop` is cancelled (after the streams ended), then writes
    /// what they sent last and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut st = WriterState::default();
        loop {
            let deadline = st.deadline;
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let mut flush = false;
            tokio::select! {
                _ = stop.cancelled() => {
                    while let Ok(m) = self.rx.try_recv() {
                        self.handle(&mut st, m).await;
                    }
                    self.flush(&mut st).await;
                    return;
                }
                _ = tick.tick(), if st.deadline.is_none() => {
                    st.tick += 1;
                    self.ticks.send_replace(st.tick);
                    st.answered.clear();
                    if !st.registered.is_empty() {
                        st.deadline = Some(Instant::now() + gather_window(self.every));
                    }
                }
                _ = sleep => flush = true,
                msg = self.rx.recv() => match msg {
                    Some(m) => self.handle(&mut st, m).await,
                    None => {
                        self.flush(&mut st).await;
                        return;
                    }
                },
            }
            if st.deadline.is_some() && st.registered.iter().all(|s| st.answered.contains(s)) {
                flush = true;
            }
            if flush {
                self.flush(&mut st).await;
            }
        }
    }

    async fn handle(&self, st: &mut WriterState, m: Msg) {
        match m {
            Msg::Register(id) => {
                st.registered.insert(id);
            }
            Msg::Unregister(id) => {
                st.registered.remove(&id);
            }
            Msg::Synced { stream, tick } => {
                if tick == st.tick {
                    st.answered.insert(stream);
                }
            }
            Msg::Append {
                stream,
                tick,
                part,
                bytes,
                done,
            } => {
                if tick == st.tick {
                    st.answered.insert(stream);
                }
                st.batch.push(Waiting {
                    stream,
                    part,
                    bytes,
                    done,
                });
                st.deadline
                    .get_or_insert_with(|| Instant::now() + LATE_WINDOW);
            }
            Msg::Consolidated { stream, upto } => {
                let mut free = Vec::new();
                for (s, (path, streams)) in st.objects.range_mut(..=upto) {
                    streams.remove(&stream);
                    if streams.is_empty() {
                        free.push((*s, path.clone()));
                    }
                }
                self.delete(&mut st.objects, free).await;
            }
            Msg::Held { from, upto, reply } => {
                let held = if from <= upto {
                    st.objects
                        .range(from..=upto)
                        .map(|(_, (path, _))| path.clone())
                        .collect()
                } else {
                    Vec::new()
                };
                let _ = reply.send(held);
            }
        }
    }

    async fn flush(&self, st: &mut WriterState) {
        st.deadline = None;
        if st.batch.is_empty() {
            return;
        }
        st.seq += 1;
        let batch = std::mem::take(&mut st.batch);
        if let Some(entry) = self.write(st.seq, batch).await {
            st.objects.insert(st.seq, entry);
        }
    }

    /// Writes one log object; answers every append. `None` on failure.
    async fn write(&self, seq: u64, batch: Vec<Waiting>) -> Option<(ObjPath, HashSet<u64>)> {
        let streams: HashSet<u64> = batch.iter().map(|w| w.stream).collect();
        let mut parts = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        for w in batch {
            parts.push((w.part, w.bytes));
            waiters.push(w.done);
        }
        let location = pack::log_path(&self.replica.prefix, chrono::Utc::now());
        let r = match pack::encode_pieces(parts) {
            Ok(pieces) => {
                let n = pieces.iter().map(|b| b.len() as u64).sum();
                self.replica.put_pieces(&location, pieces).await.map(|()| n)
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(n) => {
                self.stats.log_objects.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
                for w in waiters {
                    let _ = w.send(Ok(seq));
                }
                Some((location, streams))
            }
            Err(e) => {
                let msg = e.to_string();
                for w in waiters {
                    let _ = w.send(Err(Error::invalid("fleet log", msg.clone())));
                }
                None
            }
        }
    }

    async fn delete(
        &self,
        objects: &mut BTreeMap<u64, (ObjPath, HashSet<u64>)>,
        free: Vec<(u64, ObjPath)>,
    ) {
        if free.is_empty() {
            return;
        }
        let paths: Vec<ObjPath> = free.iter().map(|(_, p)| p.clone()).collect();
        match self.replica.delete_many(paths).await {
            Ok(()) => {
                self.stats
                    .log_deleted
                    .fetch_add(free.len() as u64, Ordering::Relaxed);
                for (s, _) in free {
                    objects.remove(&s);
                }
            }
            // Kept in the table: the next consolidation (of any stream in
            // an older object) tries again; a restart recovers them.
            Err(e) => tracing::warn!(error = %e, "cannot delete consolidated fleet log objects"),
        }
    }
}

/// What one stream (or [`recover`], for one generation) shipped through the
/// log since its last consolidation: the parts, on local disk, in order.
pub struct Spool {
    path: PathBuf,
    key: String,
    generation: Option<String>,
    parts: u64,
    /// Bytes of the spooled parts.
    bytes: u64,
    /// Newest log object sequence holding a spooled part.
    upto: u64,
    /// Oldest log object sequence holding a part added since the last
    /// consolidation (spooled or not).
    from: Option<u64>,
    /// When the first part since the last consolidation was added.
    since: Option<Instant>,
    /// A part is in the log but not in the spool (a local write failed):
    /// the spool is rebuilt from the log objects before it is consolidated
    /// ([`Spool::rebuild`]).
    broken: bool,
}

impl Spool {
    /// A spool at `path` (created on the first part) for `key`.
    pub fn new(path: PathBuf, key: &str) -> Spool {
        // A file left by an earlier process under the same name is stale.
        let _ = std::fs::remove_file(&path);
        Spool {
            path,
            key: key.to_string(),
            generation: None,
            parts: 0,
            bytes: 0,
            upto: 0,
            from: None,
            since: None,
            broken: false,
        }
    }

    /// The database whose parts it holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Nothing added since the last consolidation.
    pub fn is_empty(&self) -> bool {
        self.from.is_none()
    }

    /// A part is in the log but not here (see [`Spool::add`]): the spool
    /// must be rebuilt from the log before it is consolidated.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The log objects that may hold its parts: sequences `from..=upto`
    /// (see [`FleetLog::held`]).
    pub fn span(&self) -> Option<(u64, u64)> {
        self.from.map(|f| (f, self.upto))
    }

    /// The generation of the spooled parts, if any.
    pub fn generation(&self) -> Option<&str> {
        self.generation.as_deref().filter(|_| self.parts > 0)
    }

    /// Memory its consolidation holds at once, at most: one pack's worth of
    /// parts (all of them, or `PACK_MAX`, 64 MiB), with what each part
    /// takes besides its bytes. Never more than [`consolidation_budget`]
    /// holds in all.
    pub fn memory(&self) -> u32 {
        if self.broken {
            // Its size is not known until it is rebuilt, which holds one
            // log object (at most `RECOVERY_WHOLE`) at a time.
            return u32::try_from(CONSOLIDATION_IN_MEMORY).unwrap_or(u32::MAX);
        }
        let chunk = self.bytes.min(PACK_MAX);
        let n = (chunk + self.parts * PART_MEMORY).min(CONSOLIDATION_IN_MEMORY);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Due for consolidation: holds parts older than `every`.
    pub fn due(&self, every: Duration) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= every)
    }

    /// Adds a part that is durable in log object `seq`. A failure marks the
    /// spool broken (see [`Spool::rebuild`]); the part itself stays
    /// shipped, in the log.
    pub fn add(&mut self, part: &Part, bytes: &[u8], seq: u64) {
        self.upto = self.upto.max(seq);
        self.from.get_or_insert(seq);
        self.since.get_or_insert_with(Instant::now);
        self.generation = Some(part.generation.clone());
        if self.broken {
            return;
        }
        if let Err(e) = self.write(part, bytes) {
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot keep shipped WAL frames for consolidation; they stay in the fleet log, from which the spool is rebuilt at the next consolidation");
            self.broken = true;
        }
    }

    /// Appends one part's record to the spool file.
    fn write(&mut self, part: &Part, bytes: &[u8]) -> Result<()> {
        let r = (|| -> Result<()> {
            let json = serde_json::to_vec(part)
                .map_err(|e| Error::invalid("spool", format!("serializing: {e}")))?;
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .at(&self.path)?;
            let mut rec = Vec::with_capacity(4 + json.len() + bytes.len());
            rec.extend_from_slice(&(json.len() as u32).to_le_bytes());
            rec.extend_from_slice(&json);
            rec.extend_from_slice(bytes);
            f.write_all(&rec).at(&self.path)
        })();
        r?;
        self.parts += 1;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Makes a broken spool whole again from the log objects that hold its
    /// parts (`objects`, from [`FleetLog::held`] over [`Spool::span`], in
    /// order): its database's parts in them, read back from the store
    /// (`RECOVERY_READS`, 8, at a time) and written to the spool file anew.
    /// Before, a spool that once failed to write (a full temp-dir for a few
    /// seconds) never consolidated again, so no log object it had a part in
    /// was deleted for the rest of the process: one a second (black-box
    /// probe Y32). A log object deleted meanwhile (by hand) is passed over:
    /// what a restore can read is what the pack gets.
    ///
    /// When the spool cannot be written yet, it stays broken, and is not
    /// tried again (nor its objects read) for another consolidation
    /// interval ([`Spool::due`]); a store that fails a read fails the call.
    pub async fn rebuild(&mut self, replica: &Replica, objects: Vec<ObjPath>) -> Result<()> {
        use futures::StreamExt;
        let _ = std::fs::remove_file(&self.path);
        self.parts = 0;
        self.bytes = 0;
        // Nothing is read from the store while the spool's disk is full.
        let mut unwritable = probe_writable(&self.path).err().map(|e| e.to_string());
        let objects = if unwritable.is_some() {
            Vec::new()
        } else {
            objects
        };
        let reads = objects.into_iter().map(|location| {
            let replica = replica.clone();
            async move {
                let Some(meta) = replica.head(&location).await? else {
                    return Ok(None);
                };
                let read = read_log_object(&replica, &meta, RECOVERY_WHOLE).await?;
                Ok::<_, Error>(Some((meta, read)))
            }
        });
        let mut reads = futures::stream::iter(reads).buffered(RECOVERY_READS);
        let key = self.key.clone();
        while let Some(read) = reads.next().await {
            let Some((meta, read)) = read? else { continue };
            let mut add = |part: &Part, bytes: &[u8]| {
                if part.key != key {
                    return Ok(());
                }
                self.write(part, bytes)
                    .inspect_err(|e| unwritable = Some(e.to_string()))
            };
            match parts_of(replica, &meta, read, RECOVERY_WHOLE, &mut add).await {
                Ok(()) => {}
                Err(_) if unwritable.is_some() => break,
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = unwritable {
            let _ = std::fs::remove_file(&self.path);
            self.parts = 0;
            self.bytes = 0;
            self.since = Some(Instant::now());
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot rebuild a stream's consolidation spool yet; its parts stay in the fleet log, and it is tried again after log-consolidate-interval or when the stream ends");
            return Ok(());
        }
        self.broken = false;
        tracing::info!(path = %self.path.display(), parts = self.parts, "rebuilt a stream's consolidation spool from the fleet log");
        Ok(())
    }

    /// Writes the spooled parts as consolidated pack(s) of their generation.
    /// Returns the log sequence the parts came from up to (to release with
    /// [`FleetLog::consolidated`]), or `None` when nothing may be released
    /// (nothing spooled, or the spool is broken).
    pub async fn consolidate(&mut self, replica: &Replica) -> Result<Option<u64>> {
        if self.broken {
            return Ok(None);
        }
        if self.parts == 0 {
            // Nothing spooled (a rebuilt spool whose log objects were
            // deleted by hand): nothing to write, all to release.
            self.since = None;
            self.generation = None;
            return Ok(self.from.take().map(|_| self.upto));
        }
        // One pack's worth in memory at a time: a busy database's hour of
        // parts can be gigabytes.
        let mut reader = SpoolReader::open(&self.path)?;
        loop {
            let (back, chunk) = tokio::task::spawn_blocking(move || {
                let chunk = reader.chunk(PACK_MAX);
                (reader, chunk)
            })
            .await
            .map_err(|e| Error::invalid("spool", format!("task failed: {e}")))?;
            reader = back;
            let chunk = chunk?;
            if chunk.is_empty() {
                break;
            }
            // A pack per generation: a rebuilt spool can hold the parts of
            // two (its stream started a new one while it was broken).
            let mut chunk = chunk;
            while !chunk.is_empty() {
                let run = chunk
                    .iter()
                    .position(|(p, _)| p.generation != chunk[0].0.generation)
                    .unwrap_or(chunk.len());
                let rest = chunk.split_off(run);
                self.write_pack(replica, chunk).await?;
                chunk = rest;
            }
        }
        let _ = std::fs::remove_file(&self.path);
        self.parts = 0;
        self.bytes = 0;
        self.since = None;
        self.from = None;
        self.generation = None;
        Ok(Some(self.upto))
    }

    /// Writes `parts`, all of one generation, as one pack.
    async fn write_pack(&self, replica: &Replica, parts: Vec<(Part, Bytes)>) -> Result<()> {
        let gen = &parts[0].0.generation;
        let gen = GenerationId::parse(gen).ok_or_else(|| {
            Error::invalid(
                self.path.display(),
                format!("spool of an invalid generation {gen:?}"),
            )
        })?;
        let first = Position {
            index: parts[0].0.index,
            offset: parts[0].0.offset,
        };
        let newest = parts
            .iter()
            .map(|(p, _)| p.commit_time())
            .max()
            .expect("non-empty");
        let location = hot::pack_path(&replica.prefix, &self.key, &gen, first, newest);
        replica
            .put_pieces(&location, pack::encode_pieces(parts)?)
            .await
    }

    /// Forgets the spooled parts without consolidating them: they stay in
    /// the log objects, from which the next consolidation rebuilds them
    /// ([`Spool::rebuild`]).
    pub fn abandon(&mut self) {
        if self.from.is_some() {
            self.broken = true;
        }
        let _ = std::fs::remove_file(&self.path);
        self.parts = 0;
        self.bytes = 0;
    }
}

/// Reads a spool file ([`Spool::add`]'s records: a little-endian `u32`
/// length, the part's JSON, the part's bytes) in pack-sized chunks, so a
/// consolidation holds one pack in memory, never the whole spool (an hour
/// of a database writing 1 MB/s is 3.6 GB; it used to be read whole).
struct SpoolReader {
    file: std::io::BufReader<File>,
    path: PathBuf,
    /// Bytes of the file not read yet: no record may claim more.
    left: u64,
    /// A record read past the end of the previous chunk.
    next: Option<(Part, Bytes)>,
}

impl SpoolReader {
    fn open(path: &Path) -> Result<SpoolReader> {
        let file = File::open(path).at(path)?;
        let left = file.metadata().at(path)?.len();
        Ok(SpoolReader {
            file: std::io::BufReader::new(file),
            path: path.to_path_buf(),
            left,
            next: None,
        })
    }

    /// Exactly `n` bytes, within what the file has left.
    fn take(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.left {
            return Err(Error::invalid(
                self.path.display(),
                "spool file is truncated",
            ));
        }
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
        self.file.read_exact(&mut buf).at(&self.path)?;
        self.left -= n;
        Ok(buf)
    }

    /// The next record, `None` at the end of the file.
    fn record(&mut self) -> Result<Option<(Part, Bytes)>> {
        if self.left == 0 {
            return Ok(None);
        }
        let n = self.take(4)?;
        let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]);
        let json = self.take(u64::from(n))?;
        let part: Part = serde_json::from_slice(&json)
            .map_err(|e| Error::invalid(self.path.display(), format!("spool record: {e}")))?;
        let bytes = Bytes::from(self.take(part.len)?);
        Ok(Some((part, bytes)))
    }

    /// The next parts, in order, up to `max` bytes together (a single
    /// larger part alone); empty at the end of the file.
    fn chunk(&mut self, max: u64) -> Result<Vec<(Part, Bytes)>> {
        let mut out = Vec::new();
        let mut size = 0u64;
        loop {
            let rec = match self.next.take() {
                Some(rec) => rec,
                None => match self.record()? {
                    Some(rec) => rec,
                    None => return Ok(out),
                },
            };
            let len = rec.1.len() as u64;
            if !out.is_empty() && size + len > max {
                self.next = Some(rec);
                return Ok(out);
            }
            size += len;
            out.push(rec);
        }
    }
}

/// Log objects [`recover`] reads at once. A crashed run leaves one per sync
/// since its last consolidation, hundreds after minutes of faults; read one
/// by one, 440 took over 3 minutes from a store answering slowly, and the
/// start waited for them (black-box probe D26). Each is one sync's frames,
/// so a few in memory at once are little.
const RECOVERY_READS: usize = 8;
/// Log objects up to this size are read whole by [`recover`]; larger ones
/// by range, one part at a time, so a start never holds more than
/// [`RECOVERY_READS`] of these in memory (black-box probe N29: a 5 GB log
/// object made every start abort on its allocation). A part is at most
/// [`crate::capture::ship::IN_MEMORY_SEGMENT_BYTES`] (32 MiB) of frames,
/// compressed (larger segments are objects of their own), so no part is
/// larger than this: one that is fails the recovery.
const RECOVERY_WHOLE: u64 = 64 << 20;

/// Rewrites the log objects a previous process left (it crashed before
/// consolidating) as per-database packs, then deletes them. Run with the
/// lease held and before any stream starts, so every log object is an
/// orphan. Returns how many objects were recovered.
pub async fn recover(replica: &Replica, tmp_dir: &Path) -> Result<usize> {
    recover_reading(replica, tmp_dir, RECOVERY_WHOLE).await
}

/// A log object as [`recover_reading`] reads it.
enum LogRead {
    /// Deleted since it was listed.
    Gone,
    /// Read whole.
    Whole(Bytes),
    /// Too large to read whole: read by its index and part by part.
    ByPart,
}

/// Bytes [`probe_writable`] writes: a page, which a full filesystem
/// refuses where it may still take an empty file.
const PROBE_BYTES: usize = 4096;

/// Whether a file can be written at `path` now: creates it, writes
/// [`PROBE_BYTES`] and empties it again.
fn probe_writable(path: &Path) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .at(path)?;
    let r = f
        .write_all(&[0u8; PROBE_BYTES])
        .and_then(|()| f.sync_data())
        .and_then(|()| f.set_len(0))
        .at(path);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// A log object read whole when it is at most `whole` bytes (see
/// [`LogRead`]).
async fn read_log_object(replica: &Replica, meta: &ObjectMeta, whole: u64) -> Result<LogRead> {
    if meta.size > whole {
        return Ok(LogRead::ByPart);
    }
    Ok(replica
        .get_bytes(&meta.location)
        .await?
        .map_or(LogRead::Gone, LogRead::Whole))
}

/// Hands every part of the log object `meta`, as `read`, to `add`, in
/// order; a large object's parts are read one at a time by range, and a
/// part larger than `whole` (litefleet never writes one) fails.
async fn parts_of(
    replica: &Replica,
    meta: &ObjectMeta,
    read: LogRead,
    whole: u64,
    add: &mut impl FnMut(&Part, &[u8]) -> Result<()>,
) -> Result<()> {
    match read {
        LogRead::Gone => {}
        LogRead::Whole(bytes) => {
            let index = pack::decode_index(&bytes, meta.location.as_ref())?;
            for (part, range) in index.parts {
                add(&part, &bytes[range.start as usize..range.end as usize])?;
            }
        }
        LogRead::ByPart => {
            let Some(index) = pack::read_index(replica, meta).await? else {
                return Ok(());
            };
            for (part, range) in index.parts {
                if range.end - range.start > whole {
                    return Err(Error::invalid(
                        &meta.location,
                        format!(
                            "holds a part of {} bytes, more than litefleet ever writes in one",
                            range.end - range.start
                        ),
                    ));
                }
                let Some(bytes) = replica.get_range_bytes(&meta.location, range).await? else {
                    return Err(Error::invalid(
                        &meta.location,
                        "was deleted while it was read (another litefleet on this replica?)",
                    ));
                };
                add(&part, &bytes)?;
            }
        }
    }
    Ok(())
}

/// [`recover`], reading log objects up to `whole` bytes whole and larger
/// ones part by part, refusing a part larger than `whole`.
async fn recover_reading(replica: &Replica, tmp_dir: &Path, whole: u64) -> Result<usize> {
    use futures::StreamExt;
    let log = pack::list_log(replica).await?;
    if log.is_empty() {
        return Ok(0);
    }
    let dir = tmp_dir.join(".litefleet-log-recovery");
    std::fs::create_dir_all(&dir).at(&dir)?;
    let mut spools: HashMap<(String, String), Spool> = HashMap::new();
    let mut add = |part: &Part, bytes: &[u8]| -> Result<()> {
        let n = spools.len();
        let spool = spools
            .entry((part.key.clone(), part.generation.clone()))
            .or_insert_with(|| Spool::new(dir.join(format!("{n}.spool")), &part.key));
        spool.add(part, bytes, 1);
        if spool.broken {
            return Err(Error::invalid(
                dir.display(),
                "cannot write the recovery spool",
            ));
        }
        Ok(())
    };
    // Read several at once, used in the log's order; larger ones by part.
    let reads: Vec<_> = log
        .iter()
        .map(|m| {
            let (replica, meta) = (replica.clone(), m.clone());
            async move {
                let read = read_log_object(&replica, &meta, whole).await;
                (meta, read)
            }
        })
        .collect();
    let mut reads = futures::stream::iter(reads).buffered(RECOVERY_READS);
    while let Some((meta, read)) = reads.next().await {
        parts_of(replica, &meta, read?, whole, &mut add).await?;
    }
    for spool in spools.values_mut() {
        spool.consolidate(replica).await?;
    }
    let n = log.len();
    replica
        .delete_many(log.into_iter().map(|m| m.location).collect())
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log object larger than the recovery reads whole is read by its
    /// index and one part at a time, and recovered the same: each part in
    /// its database's pack, the log object deleted. A part larger than
    /// that limit (litefleet never writes one) fails the recovery naming
    /// the object, and nothing is deleted.
    #[tokio::test]
    async fn a_large_log_object_is_recovered_part_by_part() {
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::open_dir(&dir.path().join("replica")).unwrap();
        let gen = "fffffe6b2f5c7e1f0123abcd";
        let now = chrono::Utc::now();
        let parts = vec![
            (
                Part::new("a", gen, 0, 32, now, 0),
                Bytes::from(vec![1u8; 40]),
            ),
            (
                Part::new("b", gen, 0, 32, now, 0),
                Bytes::from(vec![2u8; 50]),
            ),
            (
                Part::new("a", gen, 0, 72, now, 0),
                Bytes::from(vec![3u8; 30]),
            ),
        ];
        let log = pack::log_path(&r.prefix, now);
        r.put_bytes(&log, pack::encode(parts).unwrap())
            .await
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        // Every part is larger than 20 bytes: refused, nothing deleted.
        let e = recover_reading(&r, tmp.path(), 20).await.unwrap_err();
        assert!(
            e.to_string().contains("more than litefleet ever writes"),
            "{e}"
        );
        assert!(e.to_string().contains(".litefleet/log/"), "{e}");
        assert_eq!(pack::list_log(&r).await.unwrap().len(), 1);
        // The object (~350 bytes) is over the limit, each part under it.
        assert_eq!(recover_reading(&r, tmp.path(), 64).await.unwrap(), 1);
        assert!(pack::list_log(&r).await.unwrap().is_empty());
        let gid = GenerationId::parse(gen).unwrap();
        for (key, want) in [("a", vec![(32, 1u8), (72, 3)]), ("b", vec![(32, 2)])] {
            let listed = r
                .list_dir(&hot::generation_dir(&r.prefix, key, &gid).join("wal"))
                .await
                .unwrap();
            assert_eq!(listed.len(), 1, "{key}: {listed:?}");
            let bytes = r.get_bytes(&listed[0].location).await.unwrap().unwrap();
            let index = pack::decode_index(&bytes, "pack").unwrap();
            let got: Vec<(u64, u8)> = index
                .parts
                .iter()
                .map(|(p, range)| (p.offset, bytes[range.start as usize]))
                .collect();
            assert_eq!(got, want, "{key}");
        }
    }

    /// A spool is read a chunk at a time, in order, each chunk at most the
    /// limit (a larger part alone), and nothing beyond the chunk is read:
    /// damage after it fails only the chunk that reaches it.
    #[test]
    fn a_spool_is_read_one_pack_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.spool");
        let mut spool = Spool::new(path.clone(), "k");
        let gen = "fffffe6b2f5c7e1f0123abcd";
        let now = chrono::Utc::now();
        let sizes = [40u64, 50, 10, 150, 30];
        let mut offset = 32;
        for (i, n) in sizes.iter().enumerate() {
            let part = Part::new("k", gen, 0, offset, now, *n);
            spool.add(&part, &vec![i as u8; *n as usize], 1);
            offset += n;
        }
        assert!(!spool.is_broken());
        let mut r = SpoolReader::open(&path).unwrap();
        let mut chunks = Vec::new();
        loop {
            let c = r.chunk(100).unwrap();
            if c.is_empty() {
                break;
            }
            for (p, b) in &c {
                assert_eq!(p.len, b.len() as u64);
            }
            chunks.push(c.iter().map(|(p, b)| (p.len, b[0])).collect::<Vec<_>>());
        }
        assert_eq!(
            chunks,
            vec![
                vec![(40, 0), (50, 1), (10, 2)],
                vec![(150, 3)],
                vec![(30, 4)]
            ]
        );

        // Garbage after the last part: the chunks before the one reaching
        // it still read (the file is not read whole first), that one fails
        // naming the file.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0xff; 16]).unwrap();
        let mut r = SpoolReader::open(&path).unwrap();
        for _ in 0..2 {
            assert!(!r.chunk(100).unwrap().is_empty());
        }
        let e = r.chunk(100).unwrap_err();
        assert!(e.to_string().contains("0.spool"), "{e}");
    }

    /// A spool holding the parts of two generations (rebuilt from the log
    /// after its stream began a new one) is written as a pack in each.
    #[tokio::test]
    async fn each_generation_gets_its_own_pack() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::open_dir(&dir.path().join("replica")).unwrap();
        let mut spool = Spool::new(dir.path().join("0.spool"), "k");
        let (old, new) = ("fffffe6b2f5c7e1f0123abcd", "fffffe6b2f5c7e200123abcd");
        let now = chrono::Utc::now();
        for (gen, offset) in [(old, 32), (old, 72), (new, 32)] {
            spool.add(&Part::new("k", gen, 0, offset, now, 40), &[1u8; 40], 1);
        }
        assert_eq!(spool.consolidate(&r).await.unwrap(), Some(1));
        let mut packs: Vec<(String, usize)> = Vec::new();
        for gen in [old, new] {
            let id = GenerationId::parse(gen).unwrap();
            let listed = r
                .list_all(&hot::generation_dir(&r.prefix, "k", &id))
                .collect::<Vec<_>>()
                .await;
            for m in listed {
                let m = m.unwrap();
                let bytes = r.get_bytes(&m.location).await.unwrap().unwrap();
                let index = pack::decode_index(&bytes, m.location.as_ref()).unwrap();
                assert!(index.parts.iter().all(|(p, _)| p.generation == gen));
                packs.push((gen.to_string(), index.parts.len()));
            }
        }
        assert_eq!(packs, [(old.to_string(), 2), (new.to_string(), 1)]);
    }
}
