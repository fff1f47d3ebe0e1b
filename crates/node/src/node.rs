//! [`Node`]: the state of a storage node and the dispatch of requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use ringkv_certs::Role;
use ringkv_transport::Transport;
use ringkv_wire::{
    EncodedMetadata, ErrorKind, KeyRange, PeerLiveness, Position, Reply, ReplyBody, Request,
    RequestBody, RingMetadata,
};

use crate::gossip::{self, GossipState, Membership};
use crate::moves::{MoveError, MoveState};
use crate::request;
use crate::storage::Store;
use crate::{NodeConfig, NodeError};

/// Proof that a write was admitted (see [`Node`]'s invariant); dropped once it is durable.
pub type WriteAdmission = tokio::sync::OwnedRwLockReadGuard<()>;

/// The metadata a node routes with, and its own range under it (derived once per version).
#[derive(Debug, Clone)]
pub struct RingView {
    /// The metadata.
    pub metadata: Arc<RingMetadata>,
    /// This node's range, `None` if the node is not in the ring.
    pub own_range: Option<KeyRange>,
}

/// A storage node.
///
/// Invariant (zero loss on moves): a write checks ownership and the move state's locks while
/// holding the write gate for reading, and keeps holding it until the write is durable.
/// Every move transition (lock, tracking rounds, abort, prepare) and every metadata install
/// takes the gate for writing, so when one returns no write is in flight: a lock leaves every
/// acknowledged write of the range in the store, a tracking round swap misses none, and a
/// write never commits under an ownership the node has just given up.
pub struct Node {
    pub(crate) config: NodeConfig,
    pub(crate) store: Store,
    view: RwLock<RingView>,
    running: AtomicBool,
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Locks, tracking and receiving of range moves ([`MoveState`]).
    moves: std::sync::Mutex<MoveState>,
    pub(crate) peers: Transport,
    /// The gossip state machine; held only for synchronous steps, never across an await.
    pub(crate) gossip: std::sync::Mutex<GossipState>,
}

impl Node {
    /// Opens the node's store and restores its persisted metadata. With `config.start` and
    /// no metadata, bootstraps a one-node ring (version 1) and serves at once; otherwise the
    /// node serves if its persisted ring contains it, and waits for the ECS if not.
    pub async fn open(config: NodeConfig, peers: Transport) -> Result<Arc<Node>, NodeError> {
        let store = Store::open_with_queue(&config.data_dir, config.max_queued_writes)?;
        let mut metadata = store.load_metadata()?.unwrap_or_default();
        if config.start && metadata.nodes.is_empty() {
            let me = ringkv_wire::NodeEntry::new(config.name.clone(), config.advertise.clone());
            metadata = RingMetadata::new(1, vec![me])?;
            store.save_metadata(&metadata).await?;
            tracing::info!(node = %config.name, "bootstrapped a one-node ring");
        }
        let member = metadata.node(&config.name).is_some();
        let moves = MoveState::restore(store.load_locks()?, metadata.version);
        if !moves.persisted().is_empty() {
            tracing::warn!(node = %config.name, locked = ?moves.locked_ranges(), "restarted in the middle of a move: ranges stay write-locked until the move commits or is aborted");
        }
        let view = view_of(&config.name, metadata);
        let gossip = GossipState::new(
            config.name.clone(),
            config.gossip.clone(),
            Arc::new(Membership::new(view.metadata.clone())?),
            gossip::first_heartbeat(),
            Instant::now(),
        );
        let node = Node {
            view: RwLock::new(view),
            gossip: std::sync::Mutex::new(gossip),
            running: AtomicBool::new(config.start || member),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            moves: std::sync::Mutex::new(moves),
            config,
            store,
            peers,
        };
        Ok(Arc::new(node))
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The node's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The current ring view.
    pub fn view(&self) -> RingView {
        self.view.read().expect("view lock").clone()
    }

    /// The current metadata version.
    pub fn metadata_version(&self) -> u64 {
        self.view.read().expect("view lock").metadata.version
    }

    /// Whether the node serves clients.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Starts or stops serving clients.
    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::SeqCst);
        tracing::info!(node = %self.config.name, running, "serving state changed");
    }

    /// Adopts `metadata` if it is newer than the node's, persisting it first. Returns
    /// whether it was adopted.
    pub async fn install_metadata(&self, metadata: RingMetadata) -> Result<bool, NodeError> {
        self.install(metadata, None, "ecs").await
    }

    /// Adopts metadata a peer gossiped (already decoded from `encoded`), like
    /// [`Node::install_metadata`].
    pub(crate) async fn install_gossiped(
        &self,
        metadata: RingMetadata,
        encoded: EncodedMetadata,
    ) -> Result<bool, NodeError> {
        self.install(metadata, Some(encoded), "gossip").await
    }

    async fn install(
        &self,
        metadata: RingMetadata,
        encoded: Option<EncodedMetadata>,
        source: &'static str,
    ) -> Result<bool, NodeError> {
        if metadata.version <= self.metadata_version() {
            return Ok(false);
        }
        self.store.save_metadata(&metadata).await?;
        // No write in flight across the change of ownership, and the moves this version
        // commits end here (their locks are released: the range is no longer ours).
        let _no_writes_in_flight = self.gate.write().await;
        let installed = {
            let mut view = self.view.write().expect("view lock");
            // Another install may have raced us while we persisted.
            if metadata.version <= view.metadata.version {
                return Ok(false);
            }
            tracing::info!(node = %self.config.name, version = metadata.version, source, "installed ring metadata");
            *view = view_of(&self.config.name, metadata);
            view.metadata.clone()
        };
        let released = {
            let mut moves = self.moves();
            moves
                .adopt(installed.version)
                .then(|| moves.persisted().to_vec())
        };
        if let Some(locks) = released {
            // A crash before this lands is harmless: a restart drops the locks of every
            // move its persisted metadata version commits.
            self.store.save_locks(&locks).await?;
        }
        // Gossip follows (it ignores a version older than the one it holds, should two
        // installs finish out of order).
        let previous = self
            .gossip
            .lock()
            .expect("gossip lock")
            .membership()
            .clone();
        let membership = match encoded {
            Some(encoded) => Ok(Membership::with_encoded(installed, encoded)),
            None => Membership::new(installed),
        };
        match membership {
            Ok(m) => self
                .gossip
                .lock()
                .expect("gossip lock")
                .set_membership(Arc::new(m.succeeding(&previous)), Instant::now()),
            Err(e) => {
                tracing::error!(node = %self.config.name, error = %e, "cannot encode metadata for gossip")
            }
        }
        Ok(true)
    }

    /// This node's gossip view of every other node of its ring.
    pub fn peer_liveness(&self) -> Vec<PeerLiveness> {
        self.gossip
            .lock()
            .expect("gossip lock")
            .peers(Instant::now())
    }

    /// The move state, for a synchronous look or transition (never held across an await).
    pub(crate) fn moves(&self) -> std::sync::MutexGuard<'_, MoveState> {
        self.moves.lock().expect("moves lock")
    }

    /// Runs a move transition with no write in flight (under the write gate), persisting the
    /// sender locks first if it changed them, so that what was acknowledged survives a
    /// restart. `Err` from the transition is returned as is; a persistence failure as
    /// `Ok(Err(..))`.
    pub(crate) async fn transition<T>(
        &self,
        f: impl FnOnce(&mut MoveState, u64) -> Result<(T, bool), MoveError>,
    ) -> Result<Result<T, NodeError>, MoveError> {
        let _no_writes_in_flight = self.gate.write().await;
        let (value, locks) = {
            let mut moves = self.moves();
            let (value, changed) = f(&mut moves, self.metadata_version())?;
            (value, changed.then(|| moves.persisted().to_vec()))
        };
        if let Some(locks) = locks {
            if let Err(e) = self.store.save_locks(&locks).await {
                return Ok(Err(e));
            }
            tracing::info!(node = %self.config.name, locked = ?locks.iter().map(|l| l.range).collect::<Vec<_>>(), "write locks persisted");
        }
        Ok(Ok(value))
    }

    /// Waits until no write is in flight, and keeps new ones out while the guard lives.
    pub(crate) async fn quiesce(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().await
    }

    /// Admits a write; the guard is held from the ownership and lock checks until the write
    /// is durable. It is owned so that it can travel with the write to the storage writer
    /// ([`crate::storage::Store::put_hashed`] and friends take it): a handler cancelled
    /// because its caller went away must not release the gate before its queued write
    /// commits.
    pub(crate) async fn admit_write(&self) -> WriteAdmission {
        self.gate.clone().read_owned().await
    }

    /// `Ok(())` if this node owns `position` under its metadata, else the `NotResponsible`
    /// reply.
    pub(crate) fn check_owner(&self, position: &Position) -> Result<(), ReplyBody> {
        let view = self.view.read().expect("view lock");
        match view.own_range {
            Some(range) if range.contains(position) => Ok(()),
            _ => Err(ReplyBody::NotResponsible {
                metadata: (*view.metadata).clone(),
            }),
        }
    }

    /// Handles one request from a peer whose certificate has role `role`.
    pub async fn handle(&self, role: Role, request: Request) -> Reply {
        let body = if request::allowed(role, &request.body) {
            self.dispatch(request.body).await
        } else {
            tracing::warn!(node = %self.config.name, ?role, request = request.body.name(), "forbidden request");
            request::error(
                ErrorKind::Forbidden,
                format!("a {role} certificate may not send {}", request.body.name()),
            )
        };
        Reply::new(self.metadata_version(), body)
    }

    async fn dispatch(&self, body: RequestBody) -> ReplyBody {
        use request::{admin, data, gossip, metadata, range};
        match body {
            RequestBody::Get { key } => data::get(self, &key),
            RequestBody::Put { key, value } => data::put(self, &key, &value).await,
            RequestBody::Delete { key } => data::delete(self, &key).await,
            RequestBody::GetMetadata => metadata::get(self),
            RequestBody::InstallMetadata { metadata } => metadata::install(self, metadata).await,
            RequestBody::Status => admin::status(self).await,
            RequestBody::Start => admin::set_running(self, true),
            RequestBody::Stop => admin::set_running(self, false),
            RequestBody::LockRange { id, range } => range::lock(self, id, range).await,
            RequestBody::AbortMove { id, range } => range::abort(self, id, range).await,
            RequestBody::PrepareReceive { id, range } => {
                range::prepare_receive(self, id, range).await
            }
            RequestBody::TransferRange { id, range, to } => {
                range::transfer(self, id, range, to).await
            }
            RequestBody::TransferDelta {
                id,
                range,
                to,
                last,
            } => range::transfer_delta(self, id, range, to, last).await,
            RequestBody::PutBatch { id, entries } => range::put_batch(self, id, entries).await,
            RequestBody::DeleteRange { range } => range::delete(self, range).await,
            RequestBody::Gossip { digest } => gossip::exchange(self, digest),
            RequestBody::GossipPush { metadata } => gossip::push(self, metadata).await,
        }
    }
}

fn view_of(name: &str, metadata: RingMetadata) -> RingView {
    RingView {
        own_range: metadata.range_of(name),
        metadata: Arc::new(metadata),
    }
}
