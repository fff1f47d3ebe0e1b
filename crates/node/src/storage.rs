//! Durable storage on fjall (an LSM tree with a checksummed journal), with group commit.
//!
//! Reads run on the caller's thread. Every write goes to one writer thread which takes
//! everything that queued up meanwhile, folds it into one atomic batch and commits it with
//! `PersistMode::SyncAll` (one fsync of the journal for the batch), then answers each caller.
//! So a write is acknowledged only once it is on disk, and N concurrent writers cost about
//! one fsync per batch rather than N.
//!
//! The queue to the writer is bounded ([`DEFAULT_MAX_QUEUED_WRITES`] jobs by default): a write
//! takes a place in it before it is queued and gives it back once its group is committed. When
//! the queue is full a write **waits for room**, so a flood of writes is pushed back to its
//! callers (whose request timeout bounds the wait) instead of growing memory without bound.
//! What the queue holds is at most `max_queued × ` the largest write (one frame's worth).
//!
//! Storage keys are `SHA-1(key) ++ key` ([`ringkv_wire::storage_key`]), so a ring range is
//! one or two contiguous key spans. Stored values are [`Record`]s: the value followed by its
//! expiry and version (16 bytes). A data directory written before records existed (raw
//! values, no `data-format` in `meta`) is converted when it is opened: each value becomes a
//! record of version 1 that never expires.
//!
//! **Expiry index.** Every record written with an expiry also gets an entry in the `expiry`
//! keyspace, in the same commit: `expires_at` (ms, 8 bytes big-endian) followed by the
//! storage key, so the records due by a time are one span from the start. A head's write
//! removes the entry of the record it replaces in the same commit (the head read that
//! record's expiry to decide); other writes (a member's chain writes, moves, range
//! deletions) leave it, and the sweep ([`crate::expiry`]) finds such an entry stale and
//! removes it ([`Store::unindex`]). Every removal checks the record again in the writer, so
//! it never removes the entry of a record that has it.
//!
//! **Unconfirmed writes.** A chain write at its head ([`Store::submit_head`]) also marks its
//! key in the `unconfirmed` keyspace, in the same atomic batch; [`Store::confirm`] removes the
//! mark once the chain has it. Removals cost no commit of their own: they wait in memory for
//! the next group, whose fsync they share (a removal lost in a crash only makes the key be
//! sent down its chain once more). A node that restarts, or gives a write up, re-drives the
//! marked keys ([`Store::unconfirmed`], ARCHITECTURE.md §11).

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use ringkv_wire::{storage_key, HashedKey, KeyRange, SignedMetadata, StorageEntry, StorageSpan};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::NodeError;
use crate::moves::SendLock;
use crate::node::WriteAdmission;
use crate::record::{Record, RECORD_SUFFIX};

const RING_KEY: &[u8] = b"ring";
/// Key of the sender write locks of unfinished moves ([`crate::moves::SendLock`]).
const LOCKS_KEY: &[u8] = b"move-locks";
/// Key of the highest ECS Raft term the node has seen in a `Fenced` request.
const ECS_TERM_KEY: &[u8] = b"ecs-term";
/// Key of the format of the `data` keyspace's values: [`DATA_FORMAT`].
const FORMAT_KEY: &[u8] = b"data-format";
/// Values are [`Record`]s (format 1, never written down, held raw values).
const DATA_FORMAT: u8 = 2;
/// Key of the last key converted by an unfinished [`upgrade`].
const PROGRESS_KEY: &[u8] = b"data-format-progress";

/// Most writes folded into one commit; bounds the latency of the first writer of a batch.
const MAX_BATCH: usize = 4096;

/// Default bound of the writer queue: write jobs queued or being committed at once.
pub const DEFAULT_MAX_QUEUED_WRITES: usize = 4096;

/// Keys removed per commit by [`Store::delete_range`].
const DELETE_CHUNK: usize = 4096;

/// A write for the writer thread. Values are encoded [`Record`]s.
enum WriteOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    PutBatch(Vec<StorageEntry>),
    /// Storage keys with their values (`None` deletes), applied blindly: chain writes at a
    /// member, whose outcome nobody asks for; the keys of `marks` are marked unconfirmed
    /// (those passed on to a successor).
    Entries {
        entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        marks: Vec<Vec<u8>>,
    },
    DeleteKeys(Vec<Vec<u8>>),
    /// A write the head decided (`None` deletes), applied blindly; with `mark`, its key is
    /// marked unconfirmed (a chain write, until the chain has it); `replaces`: the expiry of
    /// the record it replaces, whose index entry goes (see [`WriteOp::Unindex`]).
    Head {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        mark: bool,
        replaces: Option<u64>,
    },
    /// Marks of unconfirmed writes removed (the keys' range was deleted).
    Unmark(Vec<Vec<u8>>),
    /// Entries of the expiry index removed, each unless its record (after this group's
    /// writes) still expires at the entry's time.
    Unindex(Vec<Vec<u8>>),
    /// A value of the `meta` keyspace (the ring, the move locks, the ECS term).
    SetMeta(&'static [u8], Vec<u8>),
}

impl WriteOp {
    /// How many writes this counts as in [`WriteStats::writes`]: the entries of a batch of
    /// chain writes, one for anything else.
    fn writes(&self) -> usize {
        match self {
            WriteOp::Entries { entries, .. } => entries.len(),
            _ => 1,
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteOutcome {
    Put { created: bool },
    Delete { existed: bool },
    Done,
}

struct WriteJob {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome, String>>,
    /// Dropped by the writer once the job's group is committed (or failed), whether or not
    /// anyone still waits for the reply: a write admission guard.
    hold: Option<WriteAdmission>,
    /// The job's place in the bounded queue, given back by the writer with `hold`.
    place: OwnedSemaphorePermit,
}

/// Counts of the writer thread since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Writes committed: puts, deletes, chain writes, transfer batches, ring updates, ...
    /// (a batch of chain writes counts each; a transfer batch counts once).
    pub writes: u64,
    /// Commits, each one atomic batch and one fsync: `writes / commits` is the mean group.
    pub commits: u64,
}

#[derive(Debug, Default)]
struct WriteCounters {
    writes: AtomicU64,
    commits: AtomicU64,
}

/// A place in the writer queue ([`Store::reserve`]).
pub(crate) struct Place(OwnedSemaphorePermit);

/// A queued write ([`Store::submit_entries`]); await [`Pending::done`] for its commit.
pub(crate) struct Pending(oneshot::Receiver<Result<WriteOutcome, String>>);

impl Pending {
    async fn outcome(self) -> Result<WriteOutcome, NodeError> {
        match self.0.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(message)) => Err(NodeError::WriteFailed(message)),
            Err(_) => Err(NodeError::StoreClosed),
        }
    }

    /// Waits until the write is durable (or failed).
    pub(crate) async fn done(self) -> Result<(), NodeError> {
        self.outcome().await.map(|_| ())
    }
}

/// The node's durable store. Cloning shares it.
#[derive(Clone)]
pub struct Store {
    db: Database,
    data: Keyspace,
    meta: Keyspace,
    unconfirmed: Keyspace,
    expiry: Keyspace,
    writer: mpsc::Sender<WriteJob>,
    /// Places in the writer queue ([`Store::open_with_queue`]).
    queue: Arc<Semaphore>,
    counters: Arc<WriteCounters>,
    /// Confirmed keys whose marks the next commit removes ([`Store::confirm`]).
    confirmed: Arc<std::sync::Mutex<HashSet<Vec<u8>>>>,
}

/// The keyspaces the writer thread commits to.
struct Keyspaces {
    data: Keyspace,
    meta: Keyspace,
    unconfirmed: Keyspace,
    expiry: Keyspace,
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovering its journal, and starts the writer
    /// thread, with a queue of [`DEFAULT_MAX_QUEUED_WRITES`].
    pub fn open(dir: &Path) -> Result<Self, NodeError> {
        Self::open_with_queue(dir, DEFAULT_MAX_QUEUED_WRITES)
    }

    /// [`Store::open`] with at most `max_queued` write jobs queued or being committed at once
    /// (at least 1); a write waits for room beyond that.
    pub fn open_with_queue(dir: &Path, max_queued: usize) -> Result<Self, NodeError> {
        std::fs::create_dir_all(dir)?;
        let db = Database::builder(dir.join("fjall")).open()?;
        let data = db.keyspace("data", KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let unconfirmed = db.keyspace("unconfirmed", KeyspaceCreateOptions::default)?;
        let expiry = db.keyspace("expiry", KeyspaceCreateOptions::default)?;
        upgrade(&db, &data, &meta)?;
        let (writer, jobs) = mpsc::channel();
        let counters = Arc::new(WriteCounters::default());
        let confirmed = Arc::new(std::sync::Mutex::new(HashSet::new()));
        let keyspaces = Keyspaces {
            data: data.clone(),
            meta: meta.clone(),
            unconfirmed: unconfirmed.clone(),
            expiry: expiry.clone(),
        };
        let (w_db, w_counters, w_confirmed) = (db.clone(), counters.clone(), confirmed.clone());
        thread::Builder::new()
            .name("ringkv-writer".into())
            .spawn(move || write_loop(&w_db, &keyspaces, &w_counters, &w_confirmed, jobs))?;
        Ok(Self {
            db,
            data,
            meta,
            unconfirmed,
            expiry,
            writer,
            queue: Arc::new(Semaphore::new(max_queued.clamp(1, Semaphore::MAX_PERMITS))),
            counters,
            confirmed,
        })
    }

    /// How many writes and commits (fsyncs) the writer has made.
    pub fn write_stats(&self) -> WriteStats {
        WriteStats {
            writes: self.counters.writes.load(Ordering::Relaxed),
            commits: self.counters.commits.load(Ordering::Relaxed),
        }
    }

    /// The value of a user key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        Ok(self.get_record(&HashedKey::new(key))?.map(|r| r.value))
    }

    /// The record (value, version, expiry) of a user key whose position is already known.
    pub fn get_record(&self, key: &HashedKey<'_>) -> Result<Option<Record>, NodeError> {
        self.data
            .get(key.storage_key())?
            .map(|bytes| Record::decode(&bytes))
            .transpose()
    }

    /// The version and expiry of a user key, if it exists.
    pub fn get_meta(&self, key: &HashedKey<'_>) -> Result<Option<(u64, Option<u64>)>, NodeError> {
        self.data
            .get(key.storage_key())?
            .map(|bytes| Record::meta(&bytes))
            .transpose()
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, NodeError> {
        self.write_holding(op, None).await
    }

    async fn write_holding(
        &self,
        op: WriteOp,
        hold: Option<WriteAdmission>,
    ) -> Result<WriteOutcome, NodeError> {
        let place = self.reserve().await?;
        self.submit(place, op, hold)?.outcome().await
    }

    /// Waits for a place in the writer queue (fair: first come, first served). Cancelling
    /// the wait (the caller went away) queues nothing.
    pub(crate) async fn reserve(&self) -> Result<Place, NodeError> {
        self.queue
            .clone()
            .acquire_owned()
            .await
            .map(Place)
            .map_err(|_| NodeError::StoreClosed)
    }

    /// Queues `op` in the place taken by [`Store::reserve`], without waiting: writes
    /// submitted one after the other commit in that order (the writer is first in, first
    /// out).
    fn submit(
        &self,
        place: Place,
        op: WriteOp,
        hold: Option<WriteAdmission>,
    ) -> Result<Pending, NodeError> {
        let (reply, done) = oneshot::channel();
        self.writer
            .send(WriteJob {
                op,
                reply,
                hold,
                place: place.0,
            })
            .map_err(|_| NodeError::StoreClosed)?;
        Ok(Pending(done))
    }

    /// Queues storage keys with their values (`None` deletes) as one write in the place
    /// taken by [`Store::reserve`], without waiting (see [`Store::submit`]), marking the keys
    /// of `marks` unconfirmed in the same commit (a member's chain writes passed on to a
    /// successor; [`Store::confirm`] once it answered); `hold` as for [`Store::put_hashed`].
    /// The writes are applied blindly: nothing says whether a key existed.
    pub(crate) fn submit_entries(
        &self,
        place: Place,
        entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        marks: Vec<Vec<u8>>,
        hold: Option<WriteAdmission>,
    ) -> Result<Pending, NodeError> {
        self.submit(place, WriteOp::Entries { entries, marks }, hold)
    }

    /// Queues a write the head decided (`record` `None` deletes) in the place taken by
    /// [`Store::reserve`], without waiting (see [`Store::submit`]). With `mark` (a chain
    /// write) the key is also marked unconfirmed in the same atomic batch;
    /// [`Store::confirm`] removes the mark. `replaces` is the expiry of the record the write
    /// replaces (the head read it to decide): its expiry index entry goes in the same commit
    /// unless the new record keeps it. `hold` (a write admission) is released only once the
    /// write is committed, even if nobody waits for it any more.
    pub(crate) fn submit_head(
        &self,
        place: Place,
        key: &HashedKey<'_>,
        record: Option<Record>,
        mark: bool,
        replaces: Option<u64>,
        hold: Option<WriteAdmission>,
    ) -> Result<Pending, NodeError> {
        let op = WriteOp::Head {
            key: key.storage_key(),
            value: record.map(Record::encode),
            mark,
            replaces,
        };
        self.submit(place, op, hold)
    }

    /// The chain of the key with storage key `storage_key` has the head's write: its mark
    /// goes with the next commit (none is made for it alone). Call it before the next write
    /// of the key is submitted (the key's stripe held), so that this removal cannot remove
    /// that write's mark.
    pub(crate) fn confirm(&self, storage_key: Vec<u8>) {
        self.confirmed
            .lock()
            .expect("confirmed lock")
            .insert(storage_key);
    }

    /// The user keys marked unconfirmed: written at this node as their chain's head, and not
    /// (known to be) at the rest of the chain.
    pub fn unconfirmed(&self) -> Result<Vec<Vec<u8>>, NodeError> {
        let mut keys = Vec::new();
        for guard in self.unconfirmed.iter() {
            let key = guard.key()?;
            keys.push(key[20.min(key.len())..].to_vec()); // after SHA-1(key)
        }
        Ok(keys)
    }

    /// Whether `key` is marked unconfirmed (and no confirmation of it is waiting for the
    /// next commit).
    pub fn is_unconfirmed(&self, key: &HashedKey<'_>) -> Result<bool, NodeError> {
        let storage_key = key.storage_key();
        if !self.unconfirmed.contains_key(&storage_key)? {
            return Ok(false);
        }
        let confirmed = self.confirmed.lock().expect("confirmed lock");
        Ok(!confirmed.contains(&storage_key))
    }

    /// Stores `record` under a user key durably, as it is (no version is assigned here: the
    /// data path writes what the head decided, [`crate::record::decide`]). Returns whether
    /// the key was new.
    pub async fn put(&self, key: &[u8], record: Record) -> Result<bool, NodeError> {
        let op = WriteOp::Put {
            key: storage_key(key),
            value: record.encode(),
        };
        match self.write(op).await? {
            WriteOutcome::Put { created } => Ok(created),
            other => unreachable!("put answered {other:?}"),
        }
    }

    /// Deletes a user key durably. Returns whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, NodeError> {
        let op = WriteOp::Delete {
            key: storage_key(key),
        };
        match self.write(op).await? {
            WriteOutcome::Delete { existed } => Ok(existed),
            other => unreachable!("delete answered {other:?}"),
        }
    }

    /// Applies a batch of user entries durably (a range transfer batch; `None` deletes);
    /// `hold` as for [`Store::submit_head`].
    pub async fn put_batch(
        &self,
        entries: Vec<StorageEntry>,
        hold: Option<WriteAdmission>,
    ) -> Result<(), NodeError> {
        self.write_holding(WriteOp::PutBatch(entries), hold)
            .await
            .map(|_| ())
    }

    /// Deletes every key of `range` durably, [`DELETE_CHUNK`] keys per commit so that
    /// writes queued behind a large range wait for one chunk, not for all of it. Not atomic:
    /// a crash midway leaves part of the range, which is harmless because this is only used
    /// on ranges the node does not own (and clears again before receiving them). Returns how
    /// many keys were removed.
    pub async fn delete_range(&self, range: KeyRange) -> Result<u64, NodeError> {
        let (data, unconfirmed) = (self.data.clone(), self.unconfirmed.clone());
        type Keys = (Vec<Vec<u8>>, Vec<Vec<u8>>);
        let (keys, marks) = tokio::task::spawn_blocking(move || -> Result<Keys, NodeError> {
            let (mut keys, mut marks) = (Vec::new(), Vec::new());
            for span in range.storage_spans() {
                for guard in data.range::<&[u8], _>(span_bounds(&span)) {
                    keys.push(guard.key()?.to_vec());
                }
                for guard in unconfirmed.range::<&[u8], _>(span_bounds(&span)) {
                    marks.push(guard.key()?.to_vec());
                }
            }
            Ok((keys, marks))
        })
        .await
        .map_err(|e| NodeError::WriteFailed(format!("range scan task failed: {e}")))??;
        let removed = keys.len() as u64;
        for chunk in keys.chunks(DELETE_CHUNK) {
            self.write(WriteOp::DeleteKeys(chunk.to_vec())).await?;
        }
        // Writes of a range the node no longer holds are not its to re-drive.
        for chunk in marks.chunks(DELETE_CHUNK) {
            self.write(WriteOp::Unmark(chunk.to_vec())).await?;
        }
        Ok(removed)
    }

    /// One page of a scan ([`ScanRead`]): the keys beginning with `prefix` from storage key
    /// `from` (inclusive) up to `to` (exclusive; `None`: the end), at most `limit` of them,
    /// examining at most `examine` keys, holding at most `max_bytes` of keys (and values, with
    /// `values`), and stopping before the first key of a position `stop` says is not to be
    /// read. Expired records are returned with their expiry, for the caller to judge. Reads
    /// the disk: call it off the async runtime.
    pub fn scan_page(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        prefix: &[u8],
        page: ScanBounds,
        stop: impl Fn(&[u8]) -> bool,
    ) -> Result<ScanRead, NodeError> {
        let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
        let mut entries = Vec::new();
        let (mut examined, mut bytes) = (0, 0);
        for guard in self.data.range::<&[u8], _>((Bound::Included(from), upper)) {
            let (storage_key, value) = guard.into_inner()?;
            if examined == page.examine || stop(&storage_key) {
                return Ok(ScanRead {
                    entries,
                    next: Some(storage_key.to_vec()),
                });
            }
            examined += 1;
            let key = &storage_key[20.min(storage_key.len())..];
            if !key.starts_with(prefix) {
                continue;
            }
            let (version, expires_at) = Record::meta(&value)?;
            let value = page
                .values
                .then(|| value[..value.len() - RECORD_SUFFIX].to_vec());
            // Room for the encoded lengths and options of key and value.
            let size = key.len() + value.as_ref().map_or(0, Vec::len) + 16;
            if entries.len() == page.limit || (!entries.is_empty() && bytes + size > page.max_bytes)
            {
                return Ok(ScanRead {
                    entries,
                    next: Some(storage_key.to_vec()),
                });
            }
            bytes += size;
            entries.push(Scanned {
                key: key.to_vec(),
                value,
                version,
                expires_at,
            });
        }
        Ok(ScanRead {
            entries,
            next: None,
        })
    }

    /// Up to `limit` entries of the expiry index due by `now_ms` (expiring at or before it),
    /// in expiry order, after the entry `after` (from the first if `None`).
    pub fn due_expiries(
        &self,
        after: Option<&[u8]>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, NodeError> {
        let until = now_ms.saturating_add(1).to_be_bytes();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut due = Vec::new();
        for guard in self
            .expiry
            .range::<&[u8], _>((from, Bound::Excluded(&until[..])))
            .take(limit)
        {
            due.push(guard.key()?.to_vec());
        }
        Ok(due)
    }

    /// Removes stale entries of the expiry index (see [`WriteOp::Unindex`]).
    pub async fn unindex(&self, entries: Vec<Vec<u8>>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::Unindex(entries)).await.map(|_| ())
    }

    /// Number of entries in the expiry index (some may be stale).
    pub fn expiry_entries(&self) -> Result<u64, NodeError> {
        Ok(self.expiry.len()? as u64)
    }

    /// Persists the ring metadata, as the ECS signed it.
    pub async fn save_metadata(&self, metadata: &SignedMetadata) -> Result<(), NodeError> {
        let bytes = postcard::to_stdvec(metadata)
            .map_err(|e| NodeError::WriteFailed(format!("encoding ring metadata: {e}")))?;
        self.write(WriteOp::SetMeta(RING_KEY, bytes))
            .await
            .map(|_| ())
    }

    /// The persisted ring metadata, if any, still signed: the caller opens it through its
    /// ring authority like metadata from anywhere else.
    pub fn load_metadata(&self) -> Result<Option<SignedMetadata>, NodeError> {
        let Some(bytes) = self.meta.get(RING_KEY)? else {
            return Ok(None);
        };
        postcard::from_bytes(&bytes).map(Some).map_err(|e| {
            NodeError::CorruptMetadata(ringkv_wire::WireError::Malformed(format!(
                "persisted ring metadata: {e}"
            )))
        })
    }

    /// Persists the sender write locks of unfinished moves (replacing the previous set).
    pub async fn save_locks(&self, locks: &[SendLock]) -> Result<(), NodeError> {
        let bytes = postcard::to_stdvec(locks)
            .map_err(|e| NodeError::WriteFailed(format!("encoding move locks: {e}")))?;
        self.write(WriteOp::SetMeta(LOCKS_KEY, bytes))
            .await
            .map(|_| ())
    }

    /// The persisted sender write locks (none if never saved).
    pub fn load_locks(&self) -> Result<Vec<SendLock>, NodeError> {
        match self.meta.get(LOCKS_KEY)? {
            None => Ok(Vec::new()),
            Some(bytes) => postcard::from_bytes(&bytes).map_err(|e| {
                NodeError::CorruptMetadata(ringkv_wire::WireError::Malformed(format!(
                    "persisted move locks: {e}"
                )))
            }),
        }
    }

    /// Persists the highest ECS Raft term the node has seen (replacing the previous one;
    /// the caller only ever raises it). Durable when it returns, like every write.
    pub async fn save_ecs_term(&self, term: u64) -> Result<(), NodeError> {
        self.write(WriteOp::SetMeta(ECS_TERM_KEY, term.to_be_bytes().to_vec()))
            .await
            .map(|_| ())
    }

    /// The persisted highest ECS term (0 if never saved).
    pub fn load_ecs_term(&self) -> Result<u64, NodeError> {
        match self.meta.get(ECS_TERM_KEY)? {
            None => Ok(0),
            Some(bytes) => <[u8; 8]>::try_from(&bytes[..])
                .map(u64::from_be_bytes)
                .map_err(|_| {
                    NodeError::CorruptMetadata(ringkv_wire::WireError::Malformed(format!(
                        "persisted ECS term: {} bytes, not 8",
                        bytes.len()
                    )))
                }),
        }
    }

    /// Number of keys stored (a full scan of the key space).
    pub fn len(&self) -> Result<u64, NodeError> {
        Ok(self.data.len()? as u64)
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> Result<bool, NodeError> {
        Ok(self.data.is_empty()?)
    }

    /// Number of keys in `range`.
    pub fn count_range(&self, range: &KeyRange) -> Result<u64, NodeError> {
        let mut n = 0;
        for span in range.storage_spans() {
            for guard in self.data.range::<&[u8], _>(span_bounds(&span)) {
                guard.key()?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Streams every entry of `range` from one consistent snapshot, in batches of about
    /// `batch_bytes`, through a channel fed by a reader thread (so disk reads never block
    /// the async runtime). An error ends the stream.
    pub fn scan_range(
        &self,
        range: KeyRange,
        batch_bytes: usize,
    ) -> tokio::sync::mpsc::Receiver<Result<Vec<StorageEntry>, NodeError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let snapshot = self.db.snapshot();
        let data = self.data.clone();
        thread::spawn(move || {
            let scan = || -> Result<(), NodeError> {
                let mut batcher = Batcher::new(batch_bytes);
                for span in range.storage_spans() {
                    for guard in snapshot.range::<&[u8], _>(&data, span_bounds(&span)) {
                        let (k, v) = guard.into_inner()?;
                        let record = Record::decode(&v)?;
                        let entry = StorageEntry {
                            key: k[20..].to_vec(),
                            value: Some(record.value),
                            version: record.version,
                            expires_at: record.expires_at,
                        };
                        if let Some(full) = batcher.push(entry) {
                            if tx.blocking_send(Ok(full)).is_err() {
                                return Ok(()); // the receiver gave up
                            }
                        }
                    }
                }
                if let Some(last) = batcher.finish() {
                    let _ = tx.blocking_send(Ok(last));
                }
                Ok(())
            };
            if let Err(e) = scan() {
                let _ = tx.blocking_send(Err(e));
            }
        });
        rx
    }
}

/// Converts a data directory written before records existed (raw values; no
/// [`FORMAT_KEY`]): every value becomes a record of version 1 that never expires, in
/// batches of [`DELETE_CHUNK`] keys. Each batch also writes the last key it converted
/// ([`PROGRESS_KEY`]), so a crash midway resumes after it and never converts a value twice;
/// the format is written last. An empty directory just gets the format.
fn upgrade(db: &Database, data: &Keyspace, meta: &Keyspace) -> Result<(), NodeError> {
    match meta.get(FORMAT_KEY)? {
        Some(format) if format.as_ref() == [DATA_FORMAT] => return Ok(()),
        Some(format) => {
            return Err(NodeError::Config(format!(
                "the data directory holds data format {:?}, which this ringkv does not read \
                 (it reads {DATA_FORMAT})",
                format.as_ref()
            )))
        }
        None => {}
    }
    let mut converted = 0u64;
    loop {
        let from = meta.get(PROGRESS_KEY)?.map(|k| k.to_vec());
        let bounds = (
            from.as_ref()
                .map_or(Bound::Unbounded, |k| Bound::Excluded(&k[..])),
            Bound::Unbounded,
        );
        let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
        let mut last = None;
        let mut n = 0;
        for guard in data.range::<&[u8], _>(bounds).take(DELETE_CHUNK) {
            let (key, value) = guard.into_inner()?;
            let record = Record {
                value: value.to_vec(),
                version: 1,
                expires_at: None,
            };
            batch.insert(data, key.to_vec(), record.encode());
            last = Some(key.to_vec());
            n += 1;
        }
        let Some(last) = last else { break };
        batch.insert(meta, PROGRESS_KEY, last);
        batch.commit()?;
        converted += n;
    }
    let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
    batch.insert(meta, FORMAT_KEY, [DATA_FORMAT]);
    batch.remove(meta, PROGRESS_KEY);
    batch.commit()?;
    if converted > 0 {
        tracing::info!(
            keys = converted,
            "converted the data directory to records (version 1, no expiry)"
        );
    }
    Ok(())
}

/// Groups transfer entries into batches of at most `max_bytes`, or of one entry if that
/// entry alone is bigger; so a batch always fits in a frame when its entries do (a single
/// entry is at most a maximal key and value).
pub(crate) struct Batcher {
    max_bytes: usize,
    size: usize,
    batch: Vec<StorageEntry>,
}

impl Batcher {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            size: 0,
            batch: Vec::new(),
        }
    }

    /// Adds `entry`; returns the batch so far if `entry` would not fit in it (by bytes, or by
    /// count: a `PutBatch` holds at most [`ringkv_wire::MAX_BATCH_ENTRIES`]).
    pub(crate) fn push(&mut self, entry: StorageEntry) -> Option<Vec<StorageEntry>> {
        // 8: room for the encoded lengths of key and value; 20: version and expiry.
        let size = entry.key.len() + entry.value.as_ref().map_or(0, Vec::len) + 28;
        let full = (!self.batch.is_empty()
            && (self.size + size > self.max_bytes
                || self.batch.len() == ringkv_wire::MAX_BATCH_ENTRIES))
            .then(|| {
                self.size = 0;
                std::mem::take(&mut self.batch)
            });
        self.size += size;
        self.batch.push(entry);
        full
    }

    /// The last, partial batch, if any.
    pub(crate) fn finish(self) -> Option<Vec<StorageEntry>> {
        (!self.batch.is_empty()).then_some(self.batch)
    }
}

/// How much one scan page may hold and cost ([`Store::scan_page`]).
#[derive(Debug, Clone, Copy)]
pub struct ScanBounds {
    /// Most keys returned.
    pub limit: usize,
    /// Most keys examined (those the prefix filters out included).
    pub examine: usize,
    /// Most bytes of keys and values returned (one key always, however large).
    pub max_bytes: usize,
    /// Whether to return the values.
    pub values: bool,
}

/// A key a scan read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// The user key.
    pub key: Vec<u8>,
    /// Its value, if asked for.
    pub value: Option<Vec<u8>>,
    /// Its version.
    pub version: u64,
    /// Its expiry.
    pub expires_at: Option<u64>,
}

/// One page of a scan: the keys read, and the storage key the next page starts from
/// (`None`: the span was read to its end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRead {
    /// The keys, in storage-key order.
    pub entries: Vec<Scanned>,
    /// Where to go on.
    pub next: Option<Vec<u8>>,
}

/// The expiry index entry of the record of `storage_key` expiring at `expires_at`.
fn index_key(expires_at: u64, storage_key: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(8 + storage_key.len());
    entry.extend_from_slice(&expires_at.to_be_bytes());
    entry.extend_from_slice(storage_key);
    entry
}

/// The expiry time and storage key of an expiry index entry (`None`: not one).
pub fn parse_index(entry: &[u8]) -> Option<(u64, &[u8])> {
    let (at, key) = entry.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*at), key))
}

fn span_bounds(span: &StorageSpan) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (
        span.from
            .as_ref()
            .map_or(Bound::Unbounded, |f| Bound::Included(&f[..])),
        span.to
            .as_ref()
            .map_or(Bound::Unbounded, |t| Bound::Excluded(&t[..])),
    )
}

/// The writer thread: one atomic batch and one fsync per group of queued jobs.
fn write_loop(
    db: &Database,
    keyspaces: &Keyspaces,
    counters: &WriteCounters,
    confirmed: &std::sync::Mutex<HashSet<Vec<u8>>>,
    jobs: mpsc::Receiver<WriteJob>,
) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let writes: usize = group.iter().map(|job| job.op.writes()).sum();
        let mut ops = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut holds = Vec::new();
        let mut places = Vec::with_capacity(group.len());
        for job in group {
            ops.push(job.op);
            replies.push(job.reply);
            holds.extend(job.hold);
            places.push(job.place);
        }
        // Taken after the group: a confirmation made before a later write of its key was
        // queued is in this group or an earlier one, and removed before that write's mark.
        let confirmed = std::mem::take(&mut *confirmed.lock().expect("confirmed lock"));
        let applied = apply(db, keyspaces, confirmed, ops);
        // Durable (or failed as a whole): writes admitted under the gate may now let a move
        // transition through, and queued writes may take the places of this group.
        drop(holds);
        drop(places);
        match applied {
            Ok(outcomes) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters.writes.fetch_add(writes as u64, Ordering::Relaxed);
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = replies.len(), "write group failed; none of it was committed");
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Folds a group of writes into the final state of each key they touch (last write wins,
/// so every key appears once in the batch: a fjall batch gives all its items one sequence
/// number), commits it durably, and returns each write's outcome.
fn apply(
    db: &Database,
    keyspaces: &Keyspaces,
    confirmed: HashSet<Vec<u8>>,
    ops: Vec<WriteOp>,
) -> Result<Vec<WriteOutcome>, NodeError> {
    let Keyspaces {
        data,
        meta,
        unconfirmed,
        expiry,
    } = keyspaces;
    let mut unindex: Vec<Vec<u8>> = Vec::new();
    // key -> Some(value) to write, None to delete.
    let mut state: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let mut meta_values: Vec<(&'static [u8], Vec<u8>)> = Vec::new();
    // key -> marked (true) or unmarked: confirmations first, so a write of this group marks.
    let mut marks: HashMap<Vec<u8>, bool> = confirmed.into_iter().map(|k| (k, false)).collect();
    let exists =
        |state: &HashMap<Vec<u8>, Option<Vec<u8>>>, key: &[u8]| -> Result<bool, NodeError> {
            match state.get(key) {
                Some(v) => Ok(v.is_some()),
                None => Ok(data.contains_key(key)?),
            }
        };
    let mut outcomes = Vec::new();
    for op in ops {
        outcomes.push(match op {
            WriteOp::Put { key, value } => {
                let created = !exists(&state, &key)?;
                state.insert(key, Some(value));
                WriteOutcome::Put { created }
            }
            WriteOp::Delete { key } => {
                let existed = exists(&state, &key)?;
                state.insert(key, None);
                WriteOutcome::Delete { existed }
            }
            WriteOp::PutBatch(entries) => {
                for e in entries {
                    let value = e.value.map(|value| {
                        Record {
                            value,
                            version: e.version,
                            expires_at: e.expires_at,
                        }
                        .encode()
                    });
                    state.insert(storage_key(&e.key), value);
                }
                WriteOutcome::Done
            }
            WriteOp::Entries {
                entries,
                marks: marked,
            } => {
                for (key, value) in entries {
                    state.insert(key, value);
                }
                for key in marked {
                    marks.insert(key, true);
                }
                WriteOutcome::Done
            }
            WriteOp::DeleteKeys(keys) => {
                for key in keys {
                    state.insert(key, None);
                }
                WriteOutcome::Done
            }
            WriteOp::Head {
                key,
                value,
                mark,
                replaces,
            } => {
                if mark {
                    marks.insert(key.clone(), true);
                }
                if let Some(at) = replaces {
                    unindex.push(index_key(at, &key));
                }
                state.insert(key, value);
                WriteOutcome::Done
            }
            WriteOp::Unmark(keys) => {
                for key in keys {
                    marks.insert(key, false);
                }
                WriteOutcome::Done
            }
            WriteOp::Unindex(entries) => {
                unindex.extend(entries);
                WriteOutcome::Done
            }
            WriteOp::SetMeta(key, bytes) => {
                meta_values.retain(|(k, _)| *k != key);
                meta_values.push((key, bytes));
                WriteOutcome::Done
            }
        });
    }
    let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
    // An entry stays if its record, as this group leaves it, still expires at its time.
    for entry in unindex {
        let Some((at, key)) = parse_index(&entry) else {
            batch.remove(expiry, entry);
            continue;
        };
        let expiry_of = |v: &[u8]| Record::meta(v).ok().and_then(|(_, e)| e);
        let expires_at = match state.get(key) {
            Some(value) => value.as_deref().and_then(expiry_of),
            None => data.get(key)?.and_then(|v| expiry_of(&v)),
        };
        if expires_at != Some(at) {
            batch.remove(expiry, entry);
        }
    }
    for (key, value) in state {
        match value {
            Some(v) => {
                if let Ok((_, Some(at))) = Record::meta(&v) {
                    batch.insert(expiry, index_key(at, &key), []);
                }
                batch.insert(data, key, v)
            }
            None => batch.remove(data, key),
        }
    }
    for (key, bytes) in meta_values {
        batch.insert(meta, key, bytes);
    }
    for (key, marked) in marks {
        if marked {
            batch.insert(unconfirmed, key, []);
        } else {
            batch.remove(unconfirmed, key);
        }
    }
    batch.commit()?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_wire::{key_position, NodeEntry, Position, RingMetadata};

    /// A record of `value` at version 1 that never expires.
    fn v1(value: &[u8]) -> Record {
        Record {
            value: value.to_vec(),
            version: 1,
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn put_get_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.put(b"a", v1(b"1")).await.unwrap());
        assert!(!store.put(b"a", v1(b"2")).await.unwrap());
        assert_eq!(store.get(b"a").unwrap(), Some(b"2".to_vec()));
        assert!(store.delete(b"a").await.unwrap());
        assert!(!store.delete(b"a").await.unwrap());
        store.put(b"b", v1(b"3")).await.unwrap();
        let md = RingMetadata::new(4, vec![NodeEntry::new("n", "h:1")]).unwrap();
        let md = SignedMetadata::sign(&md, |_| Ok(Default::default())).unwrap();
        store.save_metadata(&md).await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get(b"b").unwrap(), Some(b"3".to_vec()));
        assert_eq!(store.get(b"a").unwrap(), None);
        assert_eq!(store.load_metadata().unwrap(), Some(md));
    }

    #[tokio::test]
    async fn a_full_writer_queue_makes_writes_wait_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with_queue(dir.path(), 2).unwrap();
        let full = store.queue.clone().acquire_many_owned(2).await.unwrap();
        let waiting = store.clone();
        let put = tokio::spawn(async move { waiting.put(b"k", v1(b"v")).await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!put.is_finished(), "a write went past a full queue");
        assert_eq!(store.write_stats().writes, 0);
        drop(full);
        assert!(put.await.unwrap().unwrap());

        // Many concurrent writers through a queue of two: all are committed, and every
        // place is given back.
        let puts: Vec<_> = (0..64u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.put(&i.to_le_bytes(), v1(b"x")).await })
            })
            .collect();
        for put in puts {
            assert!(put.await.unwrap().unwrap());
        }
        assert_eq!(store.write_stats().writes, 65);
        assert_eq!(store.queue.available_permits(), 2);
    }

    #[test]
    fn batches_never_exceed_the_limit_unless_one_entry_does() {
        let entry = |n: usize| StorageEntry {
            key: b"k".to_vec(),
            value: Some(vec![0; n]),
            version: 1,
            expires_at: None,
        };
        let mut b = Batcher::new(100);
        assert_eq!(b.push(entry(50)), None);
        // 59 + 59 > 100: the first goes out alone.
        assert_eq!(b.push(entry(50)).map(|v| v.len()), Some(1));
        // An entry bigger than the limit never joins others.
        assert_eq!(b.push(entry(1000)).map(|v| v.len()), Some(1));
        assert_eq!(b.push(entry(1)).map(|v| v.len()), Some(1));
        assert_eq!(b.finish().map(|v| v.len()), Some(1));
        assert_eq!(Batcher::new(10).finish(), None);

        // Tiny entries are cut by count, so a batch always decodes at the receiver.
        let mut b = Batcher::new(usize::MAX);
        let mut sizes = Vec::new();
        for _ in 0..ringkv_wire::MAX_BATCH_ENTRIES * 2 + 1 {
            sizes.extend(b.push(entry(0)).map(|v| v.len()));
        }
        sizes.extend(b.finish().map(|v| v.len()));
        let max = ringkv_wire::MAX_BATCH_ENTRIES;
        assert_eq!(sizes, vec![max, max, 1]);
    }

    #[tokio::test]
    async fn same_key_twice_in_one_group_keeps_the_last_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // One group, exactly as the writer thread commits it (calling it directly makes the
        // grouping certain instead of depending on thread timing).
        let key = storage_key(b"k");
        let ops = vec![
            WriteOp::Put {
                key: key.clone(),
                value: v1(b"1").encode(),
            },
            WriteOp::Put {
                key: key.clone(),
                value: v1(b"2").encode(),
            },
            WriteOp::Delete { key: key.clone() },
            WriteOp::Put {
                key: storage_key(b"other"),
                value: v1(b"x").encode(),
            },
            WriteOp::Delete {
                key: storage_key(b"other"),
            },
            WriteOp::Put {
                key: storage_key(b"other"),
                value: v1(b"y").encode(),
            },
        ];
        let keyspaces = Keyspaces {
            data: store.data.clone(),
            meta: store.meta.clone(),
            unconfirmed: store.unconfirmed.clone(),
            expiry: store.expiry.clone(),
        };
        let outcomes = apply(&store.db, &keyspaces, HashSet::new(), ops).unwrap();
        assert_eq!(
            outcomes,
            [
                WriteOutcome::Put { created: true },
                WriteOutcome::Put { created: false },
                WriteOutcome::Delete { existed: true },
                WriteOutcome::Put { created: true },
                WriteOutcome::Delete { existed: true },
                WriteOutcome::Put { created: true },
            ]
        );
        assert_eq!(store.get(b"k").unwrap(), None);
        assert_eq!(store.get(b"other").unwrap(), Some(b"y".to_vec()));
        store.put(b"k", v1(b"3")).await.unwrap();
        assert_eq!(store.get(b"k").unwrap(), Some(b"3".to_vec()));
        drop((keyspaces, store));
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.get(b"k").unwrap(),
            Some(b"3".to_vec()),
            "after reopen"
        );
        assert_eq!(
            store.get(b"other").unwrap(),
            Some(b"y".to_vec()),
            "after reopen"
        );
    }

    async fn head_write(store: &Store, key: &[u8], value: Option<&[u8]>) {
        let place = store.reserve().await.unwrap();
        store
            .submit_head(place, &HashedKey::new(key), value.map(v1), true, None, None)
            .unwrap()
            .done()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn head_writes_stay_unconfirmed_across_a_reopen_until_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            head_write(&store, b"a", Some(b"1")).await;
            head_write(&store, b"b", None).await;
            head_write(&store, b"c", Some(b"3")).await;
            assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
            store.confirm(storage_key(b"c"));
            // A confirmation makes no commit of its own: it goes with the next one. The key
            // counts as confirmed at once.
            let on_disk =
                |store: &Store| store.unconfirmed.contains_key(storage_key(b"c")).unwrap();
            assert!(on_disk(&store));
            assert!(!store.is_unconfirmed(&HashedKey::new(b"c")).unwrap());
            store.put(b"unrelated", v1(b"x")).await.unwrap();
            assert!(!on_disk(&store));
            assert!(store.is_unconfirmed(&HashedKey::new(b"a")).unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        let mut keys = store.unconfirmed().unwrap();
        keys.sort();
        assert_eq!(keys, [b"a".to_vec(), b"b".to_vec()]);
    }

    #[tokio::test]
    async fn a_confirmation_never_removes_the_mark_of_a_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        head_write(&store, b"k", Some(b"1")).await;
        // The first write's chain confirms it, then the next write of the key is queued
        // before any commit: both land in one group, and the later write keeps its mark.
        store.confirm(storage_key(b"k"));
        head_write(&store, b"k", Some(b"2")).await;
        assert_eq!(store.unconfirmed().unwrap(), [b"k".to_vec()]);
    }

    #[tokio::test]
    async fn a_members_writes_passed_on_are_marked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let place = store.reserve().await.unwrap();
        let entries = vec![
            (storage_key(b"on"), Some(v1(b"1").encode())),
            (storage_key(b"tail"), Some(v1(b"2").encode())),
        ];
        store
            .submit_entries(place, entries, vec![storage_key(b"on")], None)
            .unwrap()
            .done()
            .await
            .unwrap();
        assert_eq!(store.get(b"tail").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(store.unconfirmed().unwrap(), [b"on".to_vec()]);
    }

    #[tokio::test]
    async fn deleting_a_range_removes_its_marks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for key in [b"a", b"b", b"c", b"d"] {
            head_write(&store, key, Some(b"v")).await;
        }
        let pos = key_position(b"b");
        // The range (pos - 1, pos]: exactly b's position.
        let mut before = pos.0;
        let last = before.iter().rposition(|b| *b != 0).unwrap();
        before[last] -= 1;
        for b in &mut before[last + 1..] {
            *b = 0xff;
        }
        store
            .delete_range(KeyRange::new(Position(before), pos))
            .await
            .unwrap();
        let mut keys = store.unconfirmed().unwrap();
        keys.sort();
        assert_eq!(keys, [b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]);
    }

    /// A record with an expiry is indexed in its commit, by whichever path it is written
    /// (a put, a transfer batch); the index survives a reopen; an entry whose record was
    /// rewritten or deleted is stale and goes, one whose record still has it stays.
    #[tokio::test]
    async fn records_with_an_expiry_are_indexed_and_stale_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let expiring = |value: &[u8], at| Record {
            value: value.to_vec(),
            version: 1,
            expires_at: Some(at),
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(b"a", expiring(b"1", 100)).await.unwrap();
            store.put(b"forever", v1(b"x")).await.unwrap();
            let entry = StorageEntry {
                key: b"b".to_vec(),
                value: Some(b"2".to_vec()),
                version: 3,
                expires_at: Some(50),
            };
            store.put_batch(vec![entry], None).await.unwrap();
            store.put(b"c", expiring(b"3", 200)).await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.expiry_entries().unwrap(),
            3,
            "the index survives a reopen"
        );
        let due = store.due_expiries(None, 100, 10).unwrap();
        let keys: Vec<(u64, &[u8])> = due
            .iter()
            .map(|e| {
                let (at, key) = parse_index(e).unwrap();
                (at, &key[20..])
            })
            .collect();
        assert_eq!(
            keys,
            [(50, &b"b"[..]), (100, &b"a"[..])],
            "due by 100, in order"
        );
        assert_eq!(
            store.due_expiries(Some(&due[0]), 100, 10).unwrap(),
            due[1..]
        );
        assert_eq!(store.due_expiries(None, 100, 1).unwrap(), due[..1]);

        // "a" made permanent, "b" deleted: both entries stale. "c" untouched: kept.
        store.put(b"a", v1(b"1")).await.unwrap();
        store.delete(b"b").await.unwrap();
        let all = store.due_expiries(None, u64::MAX - 1, 10).unwrap();
        assert_eq!(all.len(), 3);
        store.unindex(all).await.unwrap();
        let left = store.due_expiries(None, u64::MAX - 1, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(&parse_index(&left[0]).unwrap().1[20..], b"c");
    }

    /// A head's write removes the index entry of the record it replaces in its own commit
    /// (before, it stayed until its time came): rewritten without an expiry, with another,
    /// or deleted.
    #[tokio::test]
    async fn a_heads_write_removes_the_entry_of_the_record_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = HashedKey::new(b"lease");
        let expiring = |at| Record {
            value: b"v".to_vec(),
            version: 1,
            expires_at: Some(at),
        };
        let head = |record: Option<Record>, replaces: Option<u64>| {
            let store = store.clone();
            async move {
                let place = store.reserve().await.unwrap();
                let key = HashedKey::new(b"lease");
                store
                    .submit_head(place, &key, record, false, replaces, None)
                    .unwrap()
                    .done()
                    .await
                    .unwrap();
            }
        };
        head(Some(expiring(1_000)), None).await;
        assert_eq!(store.expiry_entries().unwrap(), 1);
        // Renewed: the old entry goes, the new one stays.
        head(Some(expiring(2_000)), Some(1_000)).await;
        let all = store.due_expiries(None, u64::MAX - 1, 10).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(parse_index(&all[0]).unwrap().0, 2_000);
        // Written again with the same expiry: its entry stays.
        head(Some(expiring(2_000)), Some(2_000)).await;
        assert_eq!(store.expiry_entries().unwrap(), 1);
        // Deleted: no entry left.
        head(None, Some(2_000)).await;
        assert_eq!(store.expiry_entries().unwrap(), 0);
        assert_eq!(store.get_record(&key).unwrap(), None);
    }

    #[tokio::test]
    async fn the_ecs_term_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_ecs_term().unwrap(), 0, "never fenced");
        store.save_ecs_term(5).await.unwrap();
        store.save_ecs_term(1 << 40).await.unwrap();
        assert_eq!(store.load_ecs_term().unwrap(), 1 << 40);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_ecs_term().unwrap(), 1 << 40, "after reopen");
    }

    #[tokio::test]
    async fn concurrent_writers_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.write_stats(), WriteStats::default());
        store.put(b"first", v1(b"v")).await.unwrap();
        assert_eq!(
            store.write_stats(),
            WriteStats {
                writes: 1,
                commits: 1
            }
        );
        // 256 writers queue while the writer thread is busy with an fsync of ~100 µs or
        // more: they are committed in far fewer groups than writes.
        let keys: Vec<String> = (0..256u32).map(|i| format!("k{i}")).collect();
        let writes =
            futures::future::join_all(keys.iter().map(|k| store.put(k.as_bytes(), v1(b"v")))).await;
        assert!(writes.into_iter().all(|w| w.unwrap()));
        let stats = store.write_stats();
        assert_eq!(stats.writes, 257);
        assert!(
            stats.commits < stats.writes / 2,
            "group commit did not group: {stats:?}"
        );
    }

    #[tokio::test]
    async fn concurrent_writes_and_range_scan_count_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let handles: Vec<_> = (0..500u32)
            .map(|i| {
                let s = store.clone();
                tokio::spawn(async move { s.put(format!("k{i}").as_bytes(), v1(b"v")).await })
            })
            .collect();
        for h in handles {
            assert!(h.await.unwrap().unwrap());
        }
        assert_eq!(store.len().unwrap(), 500);

        // Half the ring: keys whose hash starts below 0x80.
        let mut mid = [0xffu8; 20];
        mid[0] = 0x7f;
        let range = KeyRange::new(Position::MAX, Position(mid));
        let expected = (0..500u32)
            .filter(|i| range.contains(&key_position(format!("k{i}").as_bytes())))
            .count() as u64;
        assert!(expected > 100 && expected < 400);
        assert_eq!(store.count_range(&range).unwrap(), expected);
        let mut rx = store.scan_range(range, 256);
        let mut scanned = 0;
        while let Some(batch) = rx.recv().await {
            for e in batch.unwrap() {
                assert!(range.contains(&key_position(&e.key)));
                scanned += 1;
            }
        }
        assert_eq!(scanned, expected);
        assert_eq!(store.delete_range(range).await.unwrap(), expected);
        assert_eq!(store.len().unwrap(), 500 - expected);
        assert_eq!(store.count_range(&range).unwrap(), 0);
    }

    /// A data directory of raw values (as written before records existed) is converted at
    /// open: each value reads back as a record of version 1 that never expires; a second
    /// open finds nothing to convert.
    #[tokio::test]
    async fn a_directory_of_raw_values_is_converted_to_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::builder(dir.path().join("fjall")).open().unwrap();
            let data = db.keyspace("data", KeyspaceCreateOptions::default).unwrap();
            db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
            for i in 0..(DELETE_CHUNK + 10) as u32 {
                data.insert(storage_key(&i.to_be_bytes()), format!("raw{i}"))
                    .unwrap();
            }
            db.persist(PersistMode::SyncAll).unwrap();
        }
        for _ in 0..2 {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.len().unwrap(), (DELETE_CHUNK + 10) as u64);
            for i in [0u32, 1, DELETE_CHUNK as u32 + 9] {
                let key = i.to_be_bytes();
                assert_eq!(
                    store.get_record(&HashedKey::new(&key)).unwrap(),
                    Some(Record {
                        value: format!("raw{i}").into_bytes(),
                        version: 1,
                        expires_at: None
                    })
                );
            }
        }
    }
}
