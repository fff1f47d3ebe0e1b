//! [`Node`]: the state of a storage node and the dispatch of requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use kvstore::Transport;
use ringkv_certs::Role;
use ringkv_wire::{
    key_position, ErrorKind, KeyRange, Reply, ReplyBody, Request, RequestBody, RingMetadata,
};

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
    pub(crate) peers: Transport,
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
        let node = Node {
            view: RwLock::new(view_of(&config.name, metadata)),
            running: AtomicBool::new(config.start || member),
            locks: tokio::sync::RwLock::new(Vec::new()),
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
        if metadata.version <= self.metadata_version() {
            return Ok(false);
        }
        self.store.save_metadata(&metadata).await?;
        let mut view = self.view.write().expect("view lock");
        // Another install may have raced us while we persisted.
        if metadata.version <= view.metadata.version {
            return Ok(false);
        }
        tracing::info!(node = %self.config.name, version = metadata.version, "installed ring metadata");
        *view = view_of(&self.config.name, metadata);
        Ok(true)
    }

    /// Write-locks `range`, waiting for writes in flight to finish (see the type's invariant).
    pub async fn lock_range(&self, range: KeyRange) {
        let mut locks = self.locks.write().await;
        if !locks.contains(&range) {
            locks.push(range);
        }
        tracing::info!(node = %self.config.name, range = ?range, "range write-locked");
    }

    /// Releases the write lock on `range`. Returns whether it was held.
    pub async fn unlock_range(&self, range: KeyRange) -> bool {
        let mut locks = self.locks.write().await;
        let before = locks.len();
        locks.retain(|r| *r != range);
        tracing::info!(node = %self.config.name, range = ?range, "range unlocked");
        locks.len() != before
    }

    /// `Ok(())` if this node owns `key` under its metadata, else the `NotResponsible` reply.
    pub(crate) fn check_owner(&self, key: &[u8]) -> Result<(), ReplyBody> {
        let view = self.view.read().expect("view lock");
        match view.own_range {
            Some(range) if range.contains(&key_position(key)) => Ok(()),
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
        use request::{admin, data, metadata, range};
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
            RequestBody::PutBatch { entries } => range::put_batch(self, entries).await,
            RequestBody::DeleteRange { range } => range::delete(self, range).await,
        }
    }
}

fn view_of(name: &str, metadata: RingMetadata) -> RingView {
    RingView {
        own_range: metadata.range_of(name),
        metadata: Arc::new(metadata),
    }
}
