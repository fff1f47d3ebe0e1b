//! [`Node`]: the state of a storage node and the dispatch of requests.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use ringkv_certs::Role;
use ringkv_transport::Transport;
use ringkv_wire::{
    EncodedMetadata, ErrorKind, HashedKey, KeyRange, PeerLiveness, Position, Reply, ReplyBody,
    Request, RequestBody, RingMetadata,
};

use crate::gossip::{self, GossipState, Membership};
use crate::request;
use crate::storage::Store;
use crate::{NodeConfig, NodeError};

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
/// Invariant (zero loss on moves): a write checks ownership and the write locks while
/// holding `locks` for reading, and keeps holding it until the write is durable. Taking a
/// write lock needs `locks` for writing, so once [`Node::lock_range`] returns, no write into
/// the range is in flight and every acknowledged one is in the store.
pub struct Node {
    pub(crate) config: NodeConfig,
    pub(crate) store: Store,
    view: RwLock<RingView>,
    running: AtomicBool,
    pub(crate) locks: tokio::sync::RwLock<Vec<KeyRange>>,
    /// Ranges being transferred, with the user keys written in them since the transfer's
    /// snapshot (sent again, locked, by `TransferDelta`).
    tracked: std::sync::Mutex<Vec<(KeyRange, HashSet<Vec<u8>>)>>,
    pub(crate) peers: Transport,
    /// The gossip state machine; held only for synchronous steps, never across an await.
    pub(crate) gossip: std::sync::Mutex<GossipState>,
}

impl Node {
    /// Opens the node's store and restores its persisted metadata. With `config.start` and
    /// no metadata, bootstraps a one-node ring (version 1) and serves at once; otherwise the
    /// node serves if its persisted ring contains it, and waits for the ECS if not.
    pub async fn open(config: NodeConfig, peers: Transport) -> Result<Arc<Node>, NodeError> {
        let store = Store::open(&config.data_dir)?;
        let mut metadata = store.load_metadata()?.unwrap_or_default();
        if config.start && metadata.nodes.is_empty() {
            let me = ringkv_wire::NodeEntry::new(config.name.clone(), config.advertise.clone());
            metadata = RingMetadata::new(1, vec![me])?;
            store.save_metadata(&metadata).await?;
            tracing::info!(node = %config.name, "bootstrapped a one-node ring");
        }
        let member = metadata.node(&config.name).is_some();
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
            locks: tokio::sync::RwLock::new(Vec::new()),
            tracked: std::sync::Mutex::new(Vec::new()),
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

    /// Write-locks `range`, waiting for writes in flight to finish (see the type's invariant).
    pub async fn lock_range(&self, range: KeyRange) {
        let mut locks = self.locks.write().await;
        if !locks.contains(&range) {
            locks.push(range);
        }
        tracing::info!(node = %self.config.name, range = ?range, "range write-locked");
    }

    /// Releases the write lock on `range` and ends any tracking of it (the move is over,
    /// done or aborted). Returns whether the lock was held.
    pub async fn unlock_range(&self, range: KeyRange) -> bool {
        let mut locks = self.locks.write().await;
        self.stop_tracking(&range);
        let before = locks.len();
        locks.retain(|r| *r != range);
        tracing::info!(node = %self.config.name, range = ?range, "range unlocked");
        locks.len() != before
    }

    /// Whether `range` is write-locked right now.
    pub async fn is_locked(&self, range: &KeyRange) -> bool {
        self.locks.read().await.contains(range)
    }

    /// Starts remembering which keys of `range` are written, before a transfer snapshot is
    /// taken, so that every write the snapshot misses is remembered.
    ///
    /// Takes the lock table for writing meanwhile, which waits for writes in flight: a
    /// write that checked for tracking before this call has committed (and is in the
    /// snapshot taken after it), every later write sees the tracking.
    pub(crate) async fn start_tracking(&self, range: KeyRange) {
        let _no_writes_in_flight = self.locks.write().await;
        let mut tracked = self.tracked.lock().expect("tracked lock");
        tracked.retain(|(r, _)| *r != range);
        tracked.push((range, HashSet::new()));
    }

    /// Stops tracking `range`, returning the keys written in it meanwhile.
    pub(crate) fn stop_tracking(&self, range: &KeyRange) -> Option<HashSet<Vec<u8>>> {
        let mut tracked = self.tracked.lock().expect("tracked lock");
        let idx = tracked.iter().position(|(r, _)| r == range)?;
        Some(tracked.swap_remove(idx).1)
    }

    /// Records a write of `key` in every tracked range holding it. Called by every write
    /// before it commits, under the lock table's read guard.
    pub(crate) fn track_write(&self, key: &HashedKey<'_>) {
        let mut tracked = self.tracked.lock().expect("tracked lock");
        for (range, keys) in tracked.iter_mut() {
            if range.contains(&key.position) {
                keys.insert(key.key.to_vec());
            }
        }
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
            RequestBody::LockRange { range } => range::lock(self, range).await,
            RequestBody::UnlockRange { range } => range::unlock(self, range).await,
            RequestBody::TransferRange { range, to } => range::transfer(self, range, to).await,
            RequestBody::TransferDelta { range, to } => {
                range::transfer_delta(self, range, to).await
            }
            RequestBody::PutBatch { entries } => range::put_batch(self, entries).await,
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
