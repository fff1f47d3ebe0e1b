//! A member's durable Raft state: its log, its vote and its state machine, on fjall in
//! `<state dir>/raft`, implementing openraft's `RaftLogStorage` ([`LogStore`]) and
//! `RaftStateMachine` ([`StateMachine`]).
//!
//! Keyspaces (values postcard-encoded):
//! - `raft_log`: the entry of index `i` under the 8-byte big-endian `i`, so key order is log
//!   order and the last key is the last entry;
//! - `raft_meta`: `vote` (the vote last granted or held), `committed` (the last log id known
//!   committed, so a restart re-applies up to it at once), `purged` (the last log id deleted
//!   after a snapshot: the log starts after it);
//! - `raft_sm`: `state` ([`EcsState`]), `applied` (the last applied log id and the last
//!   applied membership) and `snapshot` (the last snapshot: its metadata and data).
//!
//! Durability: every write is one fjall batch committed with `PersistMode::SyncAll` (one
//! fsync), and openraft hears that a write is done only when that commit returned: a vote
//! before the member answers the candidate, log entries before the member acknowledges the
//! append (the `LogFlushed` callback). Applying entries writes the new state together with
//! the log id it reached and the membership, in one batch, so after a crash the state machine
//! is exactly at its persisted log id and openraft re-applies the committed entries after it.
//! The commits run on tokio's blocking threads: the ECS runs a current-thread runtime
//! (ARCHITECTURE.md §9), where an fsync on the runtime thread would delay every heartbeat.
//! openraft issues the log writes one at a time, so they reach the disk in its order.
//!
//! Snapshots: the state is small (a ring and an intent log), so a snapshot is the
//! postcard-encoded [`EcsState`] with its metadata, built from the state in memory, persisted,
//! and sent whole in one or a few chunks; installing one replaces the state durably.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    EcsResponse, EcsState, Entry, LogId, Member, MemberId, RaftError, StorageError,
    StoredMembership, TypeConfig,
};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const STATE: &[u8] = b"state";
const APPLIED: &[u8] = b"applied";
const SNAPSHOT: &[u8] = b"snapshot";

/// The subdirectory of the state directory holding the Raft store.
pub const STORE_DIR: &str = "raft";

/// The fjall database of one member. Cloning shares it; the log store, the state machine and
/// snapshot builders each hold a clone, and the database closes when the last one is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    sm: Keyspace,
    path: PathBuf,
}

/// Which keyspace a write goes to.
#[derive(Debug, Clone, Copy)]
enum Space {
    Log,
    Meta,
    Sm,
}

/// One write of a batch.
enum Write {
    Put(Space, Vec<u8>, Vec<u8>),
    Remove(Space, Vec<u8>),
}

/// Tells when every clone of a [`Store`] is gone, i.e. its database is closed and the
/// directory may be opened again (by a restarted member in the same process).
pub struct StoreClosed(Weak<Inner>);

impl StoreClosed {
    /// Waits up to `timeout` for the store to close; whether it did.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.0.strong_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// What the state machine persists next to its state: how far it applied the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedMarker {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// A persisted snapshot: its metadata and the encoded [`EcsState`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<MemberId, Member>,
    data: Vec<u8>,
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, AnyError> {
    postcard::to_stdvec(value).map_err(|e| AnyError::new(&e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AnyError> {
    postcard::from_bytes(bytes).map_err(|e| AnyError::new(&e))
}

/// Decodes a persisted [`EcsState`], also one of a store written before it kept settings.
fn decode_state(bytes: &[u8]) -> Result<EcsState, AnyError> {
    EcsState::decode(bytes).map_err(|e| AnyError::new(&e))
}

impl Store {
    /// Opens (or creates) the store in `state_dir`/[`STORE_DIR`], recovering its journal.
    pub fn open(state_dir: &Path) -> Result<Self, RaftError> {
        let path = state_dir.join(STORE_DIR);
        let failed = |e: &dyn std::fmt::Display| RaftError::Store {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&path).map_err(|e| failed(&e))?;
        let db = Database::builder(&path).open().map_err(|e| failed(&e))?;
        let space = |name| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| failed(&e))
        };
        let (log, meta, sm) = (space("raft_log")?, space("raft_meta")?, space("raft_sm")?);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                log,
                meta,
                sm,
                path,
            }),
        })
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A way to wait for this store (every clone) to close.
    pub fn closed(&self) -> StoreClosed {
        StoreClosed(Arc::downgrade(&self.inner))
    }

    /// Commits `writes` as one atomic, fsynced batch, on a blocking thread.
    async fn commit(&self, writes: Vec<Write>) -> Result<(), AnyError> {
        let inner = self.inner.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let mut batch = inner.db.batch().durability(Some(PersistMode::SyncAll));
            for write in writes {
                match write {
                    Write::Put(space, key, value) => batch.insert(inner.space(space), key, value),
                    Write::Remove(space, key) => batch.remove(inner.space(space), key),
                }
            }
            batch.commit()
        })
        .await;
        match committed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AnyError::new(&e)),
            Err(e) => Err(AnyError::new(&e)),
        }
    }

    /// The value under `key` in `space`, decoded.
    fn get<T: DeserializeOwned>(&self, space: Space, key: &[u8]) -> Result<Option<T>, AnyError> {
        self.get_with(space, key, decode)
    }

    /// The value of `key` in `space`, decoded by `decode`.
    fn get_with<T>(
        &self,
        space: Space,
        key: &[u8],
        decode: impl FnOnce(&[u8]) -> Result<T, AnyError>,
    ) -> Result<Option<T>, AnyError> {
        match self.inner.space(space).get(key) {
            Ok(Some(bytes)) => decode(&bytes).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(AnyError::new(&e)),
        }
    }

    /// The keys of the log entries in `range` of indexes.
    fn log_keys(&self, range: (Bound<[u8; 8]>, Bound<[u8; 8]>)) -> Result<Vec<Vec<u8>>, AnyError> {
        self.inner
            .log
            .range(range)
            .map(|guard| {
                guard
                    .key()
                    .map(|k| k.to_vec())
                    .map_err(|e| AnyError::new(&e))
            })
            .collect()
    }
}

impl Inner {
    fn space(&self, space: Space) -> &Keyspace {
        match space {
            Space::Log => &self.log,
            Space::Meta => &self.meta,
            Space::Sm => &self.sm,
        }
    }
}

/// The Raft log and vote of a member (openraft's `RaftLogStorage`), and its log reader.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    /// The log in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let bound = |b: Bound<&u64>| match b {
            Bound::Included(i) => Bound::Included(log_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(log_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let keys = (bound(range.start_bound()), bound(range.end_bound()));
        let mut entries = Vec::new();
        for guard in self.store.inner.log.range(keys) {
            let bytes = guard.value().map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(decode(&bytes).map_err(StorageIOError::read_logs)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last = match self.store.inner.log.last_key_value() {
            Some(guard) => {
                let bytes = guard.value().map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry = decode(&bytes).map_err(StorageIOError::read_logs)?;
                Some(entry.log_id)
            }
            None => None,
        };
        let last_purged_log_id: Option<LogId> = self
            .store
            .get(Space::Meta, PURGED)
            .map_err(StorageIOError::read_logs)?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<MemberId>) -> Result<(), StorageError> {
        let bytes = encode(vote).map_err(StorageIOError::write_vote)?;
        self.store
            .commit(vec![Write::Put(Space::Meta, VOTE.to_vec(), bytes)])
            .await
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<MemberId>>, StorageError> {
        self.store
            .get(Space::Meta, VOTE)
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode(&committed).map_err(StorageIOError::write)?;
        self.store
            .commit(vec![Write::Put(Space::Meta, COMMITTED.to_vec(), bytes)])
            .await
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .store
            .get::<Option<LogId>>(Space::Meta, COMMITTED)
            .map_err(StorageIOError::read)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut writes = Vec::new();
        for entry in entries {
            let bytes = encode(&entry).map_err(StorageIOError::write_logs)?;
            writes.push(Write::Put(
                Space::Log,
                log_key(entry.log_id.index).to_vec(),
                bytes,
            ));
        }
        // Readable and durable once this returns: openraft is told at once.
        self.store
            .commit(writes)
            .await
            .map_err(StorageIOError::write_logs)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let keys = self
            .store
            .log_keys((Bound::Included(log_key(log_id.index)), Bound::Unbounded))
            .map_err(StorageIOError::write_logs)?;
        let writes = keys
            .into_iter()
            .map(|k| Write::Remove(Space::Log, k))
            .collect();
        self.store
            .commit(writes)
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let keys = self
            .store
            .log_keys((Bound::Unbounded, Bound::Included(log_key(log_id.index))))
            .map_err(StorageIOError::write_logs)?;
        // The marker and the deletion in one batch: the log never has a hole below its start.
        let mut writes = vec![Write::Put(
            Space::Meta,
            PURGED.to_vec(),
            encode(&log_id).map_err(StorageIOError::write_logs)?,
        )];
        writes.extend(keys.into_iter().map(|k| Write::Remove(Space::Log, k)));
        self.store
            .commit(writes)
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// The state machine of a member (openraft's `RaftStateMachine`): the applied [`EcsState`],
/// how far it applied the log, and the channel that publishes every new state.
pub struct StateMachine {
    store: Store,
    state: Arc<EcsState>,
    applied: AppliedMarker,
    published: watch::Sender<Arc<EcsState>>,
    /// Snapshots built by this process, to make snapshot ids unique.
    snapshots_built: u64,
}

impl StateMachine {
    /// The state machine persisted in `store` (empty if there is none), and a receiver of
    /// every state it applies from now on.
    pub fn open(store: Store) -> Result<(Self, watch::Receiver<Arc<EcsState>>), RaftError> {
        let corrupt = |what: &str, e: AnyError| RaftError::Store {
            path: store.path().to_path_buf(),
            reason: format!("cannot read the state machine's {what}: {e}"),
        };
        let state: EcsState = store
            .get_with(Space::Sm, STATE, decode_state)
            .map_err(|e| corrupt("state", e))?
            .unwrap_or_default();
        let applied: AppliedMarker = store
            .get(Space::Sm, APPLIED)
            .map_err(|e| corrupt("applied log id", e))?
            .unwrap_or_default();
        let state = Arc::new(state);
        let (published, receiver) = watch::channel(state.clone());
        Ok((
            Self {
                store,
                state,
                applied,
                published,
                snapshots_built: 0,
            },
            receiver,
        ))
    }

    /// Persists the state and how far it was applied (and `snapshot`, if given) in one batch,
    /// then publishes the state.
    async fn persist(&mut self, snapshot: Option<&StoredSnapshot>) -> Result<(), AnyError> {
        let mut writes = vec![
            Write::Put(Space::Sm, STATE.to_vec(), encode(&*self.state)?),
            Write::Put(Space::Sm, APPLIED.to_vec(), encode(&self.applied)?),
        ];
        if let Some(snapshot) = snapshot {
            writes.push(Write::Put(Space::Sm, SNAPSHOT.to_vec(), encode(snapshot)?));
        }
        self.store.commit(writes).await?;
        self.published.send_replace(self.state.clone());
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<EcsResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut state: Option<EcsState> = None;
        for entry in entries {
            let response = match entry.payload {
                EntryPayload::Normal(command) => state
                    .get_or_insert_with(|| (*self.state).clone())
                    .apply(command),
                EntryPayload::Membership(membership) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    EcsResponse::Applied {
                        ring_version: state.as_ref().unwrap_or(&self.state).ring.version,
                    }
                }
                EntryPayload::Blank => EcsResponse::Applied {
                    ring_version: state.as_ref().unwrap_or(&self.state).ring.version,
                },
            };
            self.applied.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        if let Some(state) = state {
            self.state = Arc::new(state);
        }
        self.persist(None)
            .await
            .map_err(StorageIOError::write_state_machine)?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            store: self.store.clone(),
            state: self.state.clone(),
            applied: self.applied.clone(),
            number: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<MemberId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: EcsState = decode_state(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), e))?;
        self.state = Arc::new(state);
        self.applied = AppliedMarker {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.persist(Some(&stored))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e).into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let stored: Option<StoredSnapshot> = self
            .store
            .get(Space::Sm, SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// Builds a snapshot of the state as it was when openraft asked for the builder.
pub struct SnapshotBuilder {
    store: Store,
    state: Arc<EcsState>,
    applied: AppliedMarker,
    number: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = encode(&*self.state).map_err(StorageIOError::read_state_machine)?;
        let snapshot_id = match &self.applied.last_applied {
            Some(last) => format!("{}-{}-{}", last.leader_id, last.index, self.number),
            None => format!("none-{}", self.number),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let bytes = encode(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        self.store
            .commit(vec![Write::Put(Space::Sm, SNAPSHOT.to_vec(), bytes)])
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::raft::EcsCommand;

    use crate::raft::tests::{intent_log, ring};

    /// An entry of `term` at `index` carrying `command`.
    fn entry(term: u64, index: u64, command: EcsCommand) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    #[tokio::test]
    async fn the_log_and_the_vote_persist_and_truncate_and_purge_without_holes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::new(Store::open(dir.path()).unwrap());
            log.save_vote(&Vote::new(3, 2)).await.unwrap();
            let entries = (1..=6).map(|i| entry(1, i, EcsCommand::SetRing(ring(i))));
            log.blocking_append(entries).await.unwrap();
            log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 5))
                .await
                .unwrap();
        }
        // Reopened: the vote and entries 1..=4 are there.
        let store = Store::open(dir.path()).unwrap();
        let mut log = LogStore::new(store.clone());
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(4));
        assert_eq!(state.last_purged_log_id, None);
        let read = log.try_get_log_entries(2..4).await.unwrap();
        assert_eq!(
            read.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [2, 3]
        );
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(4));
        assert_eq!(
            state.last_log_id.map(|l| l.index),
            Some(4),
            "empty log: purged"
        );
        assert!(log.try_get_log_entries(0..10).await.unwrap().is_empty());
        // Closed once every handle is gone, so the directory can be opened again.
        let closed = store.closed();
        drop((log, store));
        assert!(closed.wait(Duration::from_secs(1)).await);
        Store::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn the_state_machine_persists_what_it_applied_and_installs_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = {
            let (mut sm, mut states) =
                StateMachine::open(Store::open(dir.path()).unwrap()).unwrap();
            let responses = sm
                .apply([
                    entry(1, 1, EcsCommand::SetRing(ring(2))),
                    entry(1, 2, EcsCommand::SetRing(ring(1))),
                    entry(1, 3, EcsCommand::SetIntentLog(intent_log(5))),
                ])
                .await
                .unwrap();
            assert_eq!(responses[0], EcsResponse::Applied { ring_version: 2 });
            assert!(matches!(responses[1], EcsResponse::Refused(_)));
            assert!(states.has_changed().unwrap());
            assert_eq!(states.borrow_and_update().log, intent_log(5));
            let mut builder = sm.get_snapshot_builder().await;
            builder.build_snapshot().await.unwrap()
        };
        // Reopened: applied state and position, and the snapshot.
        let (mut sm, states) = StateMachine::open(Store::open(dir.path()).unwrap()).unwrap();
        assert_eq!(states.borrow().ring, ring(2));
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snapshot.meta);
        assert_eq!(
            current.snapshot.into_inner(),
            snapshot.snapshot.get_ref().clone()
        );

        // Another member installs it.
        let other = tempfile::tempdir().unwrap();
        let (mut fresh, fresh_states) =
            StateMachine::open(Store::open(other.path()).unwrap()).unwrap();
        fresh
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(fresh_states.borrow().ring, ring(2));
        assert_eq!(fresh_states.borrow().log, intent_log(5));
        let (applied, _) = fresh.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
    }
}
