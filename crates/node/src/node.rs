//! [`Node`]: the state of a storage node and the dispatch of requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use ringkv_certs::{PeerIdentity, Role};
use ringkv_transport::{RingAuthority, Transport};
use ringkv_wire::{
    ErrorKind, KeyRange, NodeEntry, PeerLiveness, Position, Reply, ReplyBody, Request, RequestBody,
    RingMetadata, SignedMetadata,
};

use crate::gossip::{self, GossipState, Membership};
use crate::lease::{Clocks, Lease};
use crate::moves::{MoveError, MoveState};
use crate::request;
use crate::storage::Store;
use crate::{NodeConfig, NodeError};

/// Proof that a write was admitted (see [`Node`]'s invariant); dropped once it is durable.
pub type WriteAdmission = tokio::sync::OwnedRwLockReadGuard<()>;

/// The metadata a node routes with, and the ranges it holds under it (derived once per
/// version).
#[derive(Debug, Clone)]
pub struct RingView {
    /// The metadata.
    pub metadata: Arc<RingMetadata>,
    /// The metadata as the ECS signed it (`None` while the node holds none): what the node
    /// hands out in `NotResponsible`, `GetMetadata` and gossip.
    pub signed: Option<SignedMetadata>,
    /// The ranges whose chain holds this node, adjacent ones merged: the data it must
    /// hold.
    pub held: Vec<KeyRange>,
    /// Every run of partitions with one chain, in ring order (what a scan page serves).
    pub runs: Vec<KeyRange>,
}

impl RingView {
    /// The run of partitions with one chain that holds `pos` ([`RingMetadata::run_at`]),
    /// found by binary search. `None` on an empty ring.
    pub fn run_at(&self, pos: &Position) -> Option<KeyRange> {
        // The runs' ends increase, but for a last run that wraps past the top of the ring.
        let (last, ordered) = self.runs.split_last()?;
        let i = ordered.partition_point(|r| r.end < *pos);
        match ordered.get(i) {
            Some(r) if r.contains(pos) => Some(*r),
            _ => last.contains(pos).then_some(*last),
        }
    }

    /// Whether the node holds (replicates) any position of `range`.
    pub fn holds_any(&self, range: &KeyRange) -> bool {
        self.held.iter().any(|h| h.intersects(range))
    }

    /// Where node `name` stands in the chain of `pos`: `None` if it is not in it, else its
    /// predecessor (`None` at the head) and successor (`None` at the tail).
    pub fn neighbours(
        &self,
        name: &str,
        pos: &Position,
    ) -> Option<(Option<&NodeEntry>, Option<&NodeEntry>)> {
        let chain = self.metadata.chain(pos);
        let me = chain.iter().position(|n| n.name == name)?;
        let before = me.checked_sub(1).map(|i| chain[i]);
        Some((before, chain.get(me + 1).copied()))
    }
}

/// Stripes of the per-key write order at a chain head: two writes of one key never travel
/// down a chain at the same time (ARCHITECTURE.md §11).
const WRITE_STRIPES: usize = 4096;

/// The chain writes a head has admitted and not yet finished (their positions), so that
/// `LockRange` can wait until none in its range is still on its way down the chain.
#[derive(Default)]
pub(crate) struct InFlight {
    writes: std::sync::Mutex<HashMap<u64, Position>>,
    next: AtomicU64,
    finished: tokio::sync::Notify,
}

/// One chain write in flight; finished when dropped.
pub(crate) struct InFlightWrite {
    owner: Arc<Node>,
    id: u64,
}

impl Drop for InFlightWrite {
    fn drop(&mut self) {
        let inflight = &self.owner.inflight;
        inflight
            .writes
            .lock()
            .expect("in-flight lock")
            .remove(&self.id);
        inflight.finished.notify_waiters();
    }
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
    view: RwLock<Arc<RingView>>,
    running: AtomicBool,
    /// Serialises metadata installs, so the persisted ring is always the newest adopted (two
    /// racing installs could otherwise persist out of order).
    installing: tokio::sync::Mutex<()>,
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Locks, tracking and receiving of range moves ([`MoveState`]).
    moves: std::sync::Mutex<MoveState>,
    pub(crate) peers: Transport,
    /// Opens ring metadata only if the ECS signed it, counting refusals.
    pub(crate) authority: RingAuthority,
    /// The gossip state machine; held only for synchronous steps, never across an await.
    pub(crate) gossip: std::sync::Mutex<GossipState>,
    /// Per-key write order at a chain head (see [`WRITE_STRIPES`]).
    stripes: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Chain writes on their way down from this head.
    pub(crate) inflight: InFlight,
    /// The held metadata version, for chain writes waiting for a new chain.
    version_tx: tokio::sync::watch::Sender<u64>,
    /// The lease the ECS grants ([`Lease`]). With replication the node serves nothing
    /// outside it.
    lease: std::sync::Mutex<Lease>,
    /// Set when the node stops on purpose ([`Node::leave`]): probes get `Leaving`.
    leaving: AtomicBool,
    /// Whether the ECS has been answered `Leaving`.
    told_leaving: tokio::sync::watch::Sender<bool>,
    /// When this process started: the origin of its lease stamps.
    started: Instant,
    /// A random offset added to every stamp, so that a stamp of an earlier process of this
    /// node (echoed by a probe sent before the restart) cannot equal one of this process.
    stamp_origin: Duration,
    /// This process's name as a chain head (`Replicate::origin`), random per start.
    pub(crate) origin: u64,
    /// The next write's place in this head's order (`Replicate::seq`).
    next_seq: AtomicU64,
    /// As a chain member: per (head, stripe), the newest write applied since the last
    /// metadata install (older copies delivered late are ignored). Also the member's order
    /// lock: a batch is checked and queued for storage under it, as one step.
    pub(crate) applied_seq: std::sync::Mutex<HashMap<(u64, u16), u64>>,
    /// The versions this node hands out as a chain head ([`crate::record::Versions`]).
    pub(crate) versions: crate::record::Versions,
    /// Chain writes on their way to successors, batched per successor.
    pub(crate) hops: crate::hops::Hops,
    /// Unconfirmed chain writes to re-drive ([`crate::redrive`]).
    pub(crate) redrive: crate::redrive::Redrive,
    /// The ring's replication factor, readable without the view lock.
    replication: std::sync::atomic::AtomicU8,
    /// The highest Raft term of an ECS leader seen in a `Fenced` request (0: never fenced);
    /// ECS requests of an older term are refused. Raised only after the new value is
    /// persisted, so a request is never admitted under a term a restart would forget.
    ecs_term: AtomicU64,
    /// Serialises raising `ecs_term` (check, persist, raise): two newer terms arriving
    /// together must not persist out of order. Held only for that, never while the request
    /// runs.
    raising_term: tokio::sync::Mutex<()>,
    /// This node, for the tasks that finish chain writes after their handler returned.
    me: Weak<Node>,
}

impl Node {
    /// Opens the node's store and restores its persisted metadata. With `config.start` and
    /// no metadata, bootstraps a one-node ring (version 1) and serves at once; otherwise the
    /// node serves if its persisted ring contains it, and waits for the ECS if not.
    ///
    /// Persisted metadata is opened through `authority` like metadata from anywhere else;
    /// if it does not verify (e.g. the cluster CA changed), the node logs why and starts
    /// without a ring, waiting for the ECS to install one.
    pub async fn open(
        config: NodeConfig,
        peers: Transport,
        authority: RingAuthority,
    ) -> Result<Arc<Node>, NodeError> {
        let store = Store::open_with_queue(&config.data_dir, config.max_queued_writes)?;
        let mut signed = store.load_metadata()?;
        let mut metadata = match signed.as_ref().map(|s| authority.open(s, "store")) {
            None => RingMetadata::default(),
            Some(Ok(metadata)) => metadata,
            Some(Err(e)) => {
                tracing::error!(node = %config.name, error = %e, "persisted ring metadata does not verify; waiting for the ECS to install a ring");
                signed = None;
                RingMetadata::default()
            }
        };
        if config.start && metadata.nodes.is_empty() {
            let signer = config.standalone_signer.as_ref().ok_or_else(|| {
                NodeError::Config(
                    "standalone mode (start with no ring) needs an ecs-role certificate to sign \
                     its one-node ring (ringkv-node --standalone-cert, default ecs)"
                        .into(),
                )
            })?;
            let me = ringkv_wire::NodeEntry::new(config.name.clone(), config.advertise.clone());
            metadata = RingMetadata::new(1, vec![me])?;
            let bootstrap = signer.sign(&metadata)?;
            store.save_metadata(&bootstrap).await?;
            signed = Some(bootstrap);
            tracing::info!(node = %config.name, "bootstrapped a one-node ring");
        }
        let member = metadata.node(&config.name).is_some();
        let ecs_term = store.load_ecs_term()?;
        let unconfirmed = store.unconfirmed()?;
        if !unconfirmed.is_empty() {
            tracing::info!(node = %config.name, keys = unconfirmed.len(), "chain writes this node headed may be missing down their chains: re-driving them once leased");
        }
        let moves = MoveState::restore(store.load_locks()?, metadata.version);
        if !moves.persisted().is_empty() {
            tracing::warn!(node = %config.name, locked = ?moves.locked_ranges(), "restarted in the middle of a move: ranges stay write-locked until the move commits or is aborted");
        }
        let view = view_of(&config.name, metadata, signed);
        let gossip = GossipState::new(
            config.name.clone(),
            config.gossip.clone(),
            Arc::new(Membership::new(view.metadata.clone(), view.signed.clone())),
            gossip::first_heartbeat(),
            Instant::now(),
        );
        let version = view.metadata.version;
        let node = Arc::new_cyclic(|me| Node {
            stripes: (0..WRITE_STRIPES)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            inflight: InFlight::default(),
            version_tx: tokio::sync::watch::Sender::new(version),
            lease: std::sync::Mutex::new(Lease::new()),
            leaving: AtomicBool::new(false),
            told_leaving: tokio::sync::watch::channel(false).0,
            started: Instant::now(),
            stamp_origin: Duration::from_micros(rand::random::<u64>() >> 24),
            origin: rand::random(),
            next_seq: AtomicU64::new(1),
            applied_seq: std::sync::Mutex::new(HashMap::new()),
            versions: crate::record::Versions::default(),
            hops: Default::default(),
            redrive: crate::redrive::Redrive::new(unconfirmed),
            replication: std::sync::atomic::AtomicU8::new(view.metadata.replication),
            me: me.clone(),
            ecs_term: AtomicU64::new(ecs_term),
            raising_term: tokio::sync::Mutex::new(()),
            view: RwLock::new(Arc::new(view)),
            gossip: std::sync::Mutex::new(gossip),
            running: AtomicBool::new(config.start || member),
            installing: tokio::sync::Mutex::new(()),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            moves: std::sync::Mutex::new(moves),
            config,
            store,
            peers,
            authority,
        });
        Ok(node)
    }

    /// This node as an `Arc` (it always lives in one).
    pub(crate) fn arc(&self) -> Arc<Node> {
        self.me.upgrade().expect("a node lives in an Arc")
    }

    /// `Lease`: extends the lease to `echo + millis` (the echo is one of this node's own
    /// stamps, so the lease is measured from a moment before an answer the ECS received) and
    /// answers with a new stamp ([`Lease`]). An echo that is not a stamp this process
    /// issued grants nothing.
    fn lease(&self, millis: u32, echo: Option<u64>) -> ReplyBody {
        let mut lease = self.lease.lock().expect("lease lock");
        if self.leaving.load(Ordering::SeqCst) {
            // Stopping on purpose: give the lease up before the ECS hears so, which lets it
            // take this node out of its chains without waiting out a lease ([`Node::leave`]).
            lease.retire();
            self.told_leaving.send_replace(true);
            return ReplyBody::Leaving;
        }
        lease.grant(echo, millis);
        let stamp = lease.stamp(self.clocks());
        ReplyBody::Leased { stamp }
    }

    /// Stops on purpose (the process got SIGTERM): from the next probe of the ECS on, the
    /// node gives up its lease and answers `Leaving`, so the ECS takes it out of its chains
    /// without waiting for its silence (half a `failover_after` later; a planned stop is not
    /// a failure, and the ECS adds it again when it is back, ARCHITECTURE.md §11).
    /// Waits up to `within` for that probe; returns at once without replication or a lease
    /// (nothing to hand over). Returns whether the ECS was told.
    pub async fn leave(&self, within: Duration) -> bool {
        if self.replication() <= 1 || !self.leased() {
            return false;
        }
        self.leaving.store(true, Ordering::SeqCst);
        let mut told = self.told_leaving.subscribe();
        let told = tokio::time::timeout(within, told.wait_for(|told| *told))
            .await
            .is_ok_and(|r| r.is_ok());
        if told {
            tracing::info!("told the ECS this node is stopping on purpose; its lease is given up");
        } else {
            tracing::warn!(
                ?within,
                "no probe from the ECS to tell it this node is stopping"
            );
        }
        told
    }

    /// Lets the lease read the clocks now (the gossip loop calls it every interval): its
    /// lease clock advances at readings.
    pub(crate) fn observe_clocks(&self) {
        let clocks = self.clocks();
        self.lease.lock().expect("lease lock").holds(clocks);
    }

    /// The node's clocks now, for its lease: the monotonic clock since the process started,
    /// and the wall clock (see [`crate::lease`] for why both).
    fn clocks(&self) -> Clocks {
        Clocks {
            mono: self.stamp_origin + self.started.elapsed(),
            wall: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// The highest Raft term of an ECS leader this node has seen in a `Fenced` request
    /// (persisted; 0 if it was never fenced). ECS requests of an older term are refused.
    pub fn ecs_term(&self) -> u64 {
        self.ecs_term.load(Ordering::SeqCst)
    }

    /// Term fencing (ARCHITECTURE.md §12): `Ok(())` if a request from the ECS stamped with
    /// `term` (0 for an unfenced one) may run, else the `StaleTerm` reply. A term older than
    /// the highest seen is refused: a newer ECS leader exists, and the sender is a deposed
    /// leader that does not know it yet. A newer term is persisted, then becomes the
    /// highest seen, before this returns, so a crash cannot forget it once the request
    /// it came with has run.
    ///
    /// A request admitted just before a newer term arrives may still be running when the
    /// newer leader's first requests are admitted: fencing refuses what arrives later, it
    /// does not abort what has been admitted.
    pub(crate) async fn admit_term(&self, term: u64) -> Result<(), ReplyBody> {
        let seen = self.ecs_term();
        if term == seen {
            return Ok(());
        }
        if term < seen {
            return Err(stale_term(term, seen));
        }
        // Raised in a task of its own: a handler dropped (its caller went away) between the
        // commit and the raise in memory would leave the node holding a lower term than it
        // persisted.
        let node = self.arc();
        match tokio::spawn(async move { node.raise_term(term).await }).await {
            Ok(admitted) => admitted,
            Err(e) => Err(request::error(
                ErrorKind::Storage,
                format!("raising the ECS term to {term} failed: {e}"),
            )),
        }
    }

    /// Raises the highest ECS term seen to `term` (persisting it first), unless another
    /// request raised it past `term` meanwhile.
    async fn raise_term(&self, term: u64) -> Result<(), ReplyBody> {
        let _one_at_a_time = self.raising_term.lock().await;
        let seen = self.ecs_term();
        if term < seen {
            return Err(stale_term(term, seen));
        }
        if term > seen {
            self.store
                .save_ecs_term(term)
                .await
                .map_err(request::storage_error)?;
            self.ecs_term.store(term, Ordering::SeqCst);
            tracing::info!(node = %self.config.name, term, previous = seen, "a newer ECS leader: requests of older terms are refused from now on");
        }
        Ok(())
    }

    /// The replication factor of the ring the node holds.
    pub fn replication(&self) -> u8 {
        self.replication.load(Ordering::Relaxed)
    }

    /// Whether the node may serve: always without replication (nothing else can take over
    /// its range, so nothing needs fencing), else only within a lease from the ECS.
    pub fn leased(&self) -> bool {
        if self.replication() <= 1 {
            return true;
        }
        self.lease.lock().expect("lease lock").holds(self.clocks())
    }

    /// Whether a lease that does not hold now may still be renewed before the ECS can have
    /// failed this node over ([`crate::lease::Lease::may_return`]).
    pub fn lease_may_return(&self) -> bool {
        self.lease
            .lock()
            .expect("lease lock")
            .may_return(self.clocks())
    }

    /// The write-order stripe index of `pos` (the same on every node).
    pub(crate) fn stripe_of(pos: &Position) -> u16 {
        (u16::from_be_bytes([pos.0[0], pos.0[1]]) as usize % WRITE_STRIPES) as u16
    }

    /// The write-order stripe of `pos`, at a head.
    pub(crate) fn stripe(&self, pos: &Position) -> Arc<tokio::sync::Mutex<()>> {
        self.stripes[Self::stripe_of(pos) as usize].clone()
    }

    /// The next write's place in this head's order.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a chain write of `pos` in flight until the returned guard is dropped.
    pub(crate) fn enter_chain(&self, pos: Position) -> InFlightWrite {
        let id = self.inflight.next.fetch_add(1, Ordering::Relaxed);
        self.inflight
            .writes
            .lock()
            .expect("in-flight lock")
            .insert(id, pos);
        InFlightWrite {
            owner: self.arc(),
            id,
        }
    }

    /// Waits until no chain write into `range` is in flight.
    pub(crate) async fn chain_drained(&self, range: &KeyRange) {
        loop {
            let finished = self.inflight.finished.notified();
            let busy = self
                .inflight
                .writes
                .lock()
                .expect("in-flight lock")
                .values()
                .any(|p| range.contains(p));
            if !busy {
                return;
            }
            finished.await;
        }
    }

    /// Waits until the node holds a metadata version other than `version` (returns at once
    /// if it already does).
    pub(crate) async fn version_changed(&self, version: u64) {
        let mut rx = self.version_tx.subscribe();
        let _ = rx.wait_for(|v| *v != version).await;
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
    pub fn view(&self) -> Arc<RingView> {
        Arc::clone(&self.view.read().expect("view lock"))
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

    /// Adopts `signed` if the ECS signed it, it is a valid ring and it is newer than the
    /// node's, persisting it first. Returns whether it was adopted; `Err(Refused)` if it
    /// does not verify (counted by the authority). `source` names where it came from, for
    /// the logs. The version the node holds is left alone whatever its signature: only the
    /// ECS re-signs ([`Node::install_from_ecs`]).
    pub async fn install_metadata(
        &self,
        signed: SignedMetadata,
        source: &'static str,
    ) -> Result<bool, InstallError> {
        self.install(signed, source, false).await
    }

    /// `InstallMetadata` from the ECS: [`Node::install_metadata`], and also the ring the
    /// node holds with a fresh signature ([`Node::resign`]). Only the ECS's own requests
    /// re-sign: the held version relayed by gossip or piggybacked on a reply is ignored, so
    /// another node cannot swap the signature every node hands to clients.
    pub async fn install_from_ecs(&self, signed: SignedMetadata) -> Result<bool, InstallError> {
        self.install(signed, "ecs", true).await
    }

    async fn install(
        &self,
        signed: SignedMetadata,
        source: &'static str,
        resign: bool,
    ) -> Result<bool, InstallError> {
        let held = self.view();
        if signed.version < held.metadata.version {
            return Ok(false);
        }
        if signed.version == held.metadata.version {
            if resign {
                self.resign(held, signed, source).await?;
            }
            return Ok(false);
        }
        // Verified before queueing behind other installs: forged pushes cannot hold up the
        // ECS's.
        let metadata = self
            .authority
            .open(&signed, source)
            .map_err(InstallError::Refused)?;
        let _one_at_a_time = self.installing.lock().await;
        if signed.version <= self.metadata_version() {
            return Ok(false);
        }
        self.store
            .save_metadata(&signed)
            .await
            .map_err(InstallError::Storage)?;
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
            *view = Arc::new(view_of(&self.config.name, metadata, Some(signed.clone())));
            view.metadata.clone()
        };
        self.version_tx.send_replace(installed.version);
        // Writes of older versions are refused from now on anyway (same-version rule).
        self.applied_seq.lock().expect("applied seq lock").clear();
        self.replication
            .store(installed.replication, Ordering::Relaxed);
        // Chain writes this node took as a member and may now head (its predecessor was
        // failed over before the chain had them) go down the new chain.
        self.redrive.rescan();
        let released = {
            let mut moves = self.moves();
            moves
                .adopt(installed.version)
                .then(|| moves.persisted().to_vec())
        };
        if let Some(locks) = released {
            // A crash before this lands is harmless: a restart drops the locks of every
            // move its persisted metadata version commits.
            self.store
                .save_locks(&locks)
                .await
                .map_err(InstallError::Storage)?;
        }
        // Gossip follows (it ignores a version older than the one it holds, should two
        // installs finish out of order).
        let previous = self
            .gossip
            .lock()
            .expect("gossip lock")
            .membership()
            .clone();
        let membership = Membership::new(installed, Some(signed)).succeeding(&previous);
        self.gossip
            .lock()
            .expect("gossip lock")
            .set_membership(Arc::new(membership), Instant::now());
        Ok(true)
    }

    /// The ring the node holds, signed again (the ECS's certificate was renewed, and it
    /// republished the same version): the node hands out the fresh signature from now on, so
    /// clients keep accepting its metadata once the old certificate expires. Anything but
    /// the same ring bytes with another valid signature changes nothing.
    async fn resign(
        &self,
        held: Arc<RingView>,
        signed: SignedMetadata,
        source: &'static str,
    ) -> Result<(), InstallError> {
        let same_ring = held
            .signed
            .as_ref()
            .is_some_and(|h| h.ring == signed.ring && h.signature != signed.signature);
        if !same_ring {
            return Ok(());
        }
        self.authority
            .open(&signed, source)
            .map_err(InstallError::Refused)?;
        let _one_at_a_time = self.installing.lock().await;
        if self.metadata_version() != signed.version {
            return Ok(());
        }
        self.store
            .save_metadata(&signed)
            .await
            .map_err(InstallError::Storage)?;
        {
            let mut view = self.view.write().expect("view lock");
            let mut fresh = RingView::clone(&view);
            fresh.signed = Some(signed);
            *view = Arc::new(fresh);
        }
        tracing::info!(node = %self.config.name, source, "took a fresh signature of the ring it holds");
        Ok(())
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

    /// `Ok(())` if this node is the head of `position`'s chain (takes its writes) under its
    /// metadata, else the `NotResponsible` reply.
    pub(crate) fn check_head(&self, position: &Position) -> Result<(), ReplyBody> {
        self.check_role(position, RingMetadata::head)
    }

    /// `Ok(())` if `position`'s chain has at least `--min-copies` live members under this
    /// node's metadata, else the `NotEnoughCopies` refusal (checked at the head, before
    /// anything is applied).
    pub(crate) fn check_copies(&self, position: &Position) -> Result<(), ReplyBody> {
        let min = usize::from(self.config.min_copies);
        if min <= 1 {
            return Ok(());
        }
        let view = self.view.read().expect("view lock");
        let copies = view.metadata.chain(position).len();
        if copies >= min {
            return Ok(());
        }
        Err(request::error(
            ErrorKind::NotEnoughCopies,
            format!(
                "this key's range has {copies} live copies (ring v{}), fewer than --min-copies {min}: write refused, nothing applied; it is taken again once the ECS has rebuilt the range's copies",
                view.metadata.version
            ),
        ))
    }

    /// `Ok(())` if this node is the tail of `position`'s chain (serves its reads) under its
    /// metadata, else the `NotResponsible` reply.
    pub(crate) fn check_tail(&self, position: &Position) -> Result<(), ReplyBody> {
        self.check_role(position, RingMetadata::tail)
    }

    fn check_role(
        &self,
        position: &Position,
        pick: for<'a> fn(&'a RingMetadata, &Position) -> Option<&'a NodeEntry>,
    ) -> Result<(), ReplyBody> {
        let view = self.view.read().expect("view lock");
        if pick(&view.metadata, position).is_some_and(|n| n.name == self.config.name) {
            Ok(())
        } else {
            Err(ReplyBody::NotResponsible {
                metadata: view.signed.clone(),
            })
        }
    }

    /// Handles one request from `peer` (role and name from its verified certificate).
    ///
    /// A request from the ECS runs only if its Raft term (that of a `Fenced` request, 0 for
    /// any other) is not older than the highest this node has seen ([`Node::admit_term`]);
    /// the term of a `Fenced` request is checked, then its body runs like any request.
    pub async fn handle(&self, peer: &PeerIdentity, request: Request) -> Reply {
        let role = peer.role;
        let fenced = request.body.term().is_some();
        let body = if !request::allowed(role, &request.body) {
            let message = match request.body {
                RequestBody::Fenced { ref body, .. } if body.term().is_some() => {
                    "a fenced request may not carry another fenced request".to_string()
                }
                ref body => format!(
                    "a {role} certificate may not send {}{}",
                    if fenced { "fenced " } else { "" },
                    body.name()
                ),
            };
            tracing::warn!(node = %self.config.name, %role, peer = %peer.name, request = request.body.name(), fenced, %message, "forbidden request");
            request::error(ErrorKind::Forbidden, message)
        } else if let (Role::Ecs, RequestBody::Fenced { term: 0, body }) = (role, &request.body) {
            // A group member stamps what it sends with the term it leads in, never 0; one
            // that does not lead sends nothing. Taken as unfenced, it would run at a node
            // that never saw a term.
            tracing::warn!(node = %self.config.name, peer = %peer.name, request = body.name(), "fenced request of term 0 refused");
            request::error(
                ErrorKind::StaleTerm,
                "a fenced request of term 0: no ECS leader has term 0 (sent by a member that does not lead)",
            )
        } else if role == Role::Ecs {
            let (term, body) = match request.body {
                RequestBody::Fenced { term, body } => (term, *body),
                body => (0, body),
            };
            match self.admit_term(term).await {
                Ok(()) => self.dispatch(peer, request.metadata_version, body).await,
                Err(refused) => {
                    tracing::warn!(node = %self.config.name, peer = %peer.name, request = body.name(), term, seen = self.ecs_term(), "request of a stale ECS term refused");
                    refused
                }
            }
        } else {
            self.dispatch(peer, request.metadata_version, request.body)
                .await
        };
        Reply::new(self.metadata_version(), body)
    }

    async fn dispatch(&self, peer: &PeerIdentity, version: u64, body: RequestBody) -> ReplyBody {
        use request::{admin, data, gossip, metadata, range};
        match body {
            RequestBody::Get { key } => data::get(self, &key).await,
            RequestBody::Put { key, value } => data::put(self, &key, value).await,
            RequestBody::Delete { key } => data::delete(self, &key).await,
            RequestBody::PutIf {
                key,
                value,
                expected,
            } => data::put_if(self, &key, value, Some(expected), None).await,
            RequestBody::PutTtl {
                key,
                value,
                ttl_ms,
                expected,
            } => data::put_ttl(self, &key, value, ttl_ms, expected).await,
            RequestBody::Expire { key, version } => data::expire(self, &key, version).await,
            RequestBody::Scan {
                from,
                prefix,
                limit,
                values,
            } => request::scan::scan(self, from, prefix, limit, values).await,
            RequestBody::DeleteIf { key, version } => data::delete_if(self, &key, version).await,
            RequestBody::GetMany { keys } => data::get_many(self, keys).await,
            RequestBody::PutMany { entries } => data::put_many(self, entries).await,
            RequestBody::DeleteMany { keys } => data::delete_many(self, keys).await,
            RequestBody::Replicate { write } => data::replicate(self, peer, version, write).await,
            RequestBody::ReplicateBatch { writes } => {
                data::replicate_batch(self, peer, version, writes).await
            }
            RequestBody::Lease { millis, echo } => self.lease(millis, echo),
            RequestBody::GetMetadata => metadata::get(self),
            RequestBody::InstallMetadata { metadata } => metadata::install(self, metadata).await,
            RequestBody::Status => admin::status(self).await,
            RequestBody::Start => admin::set_running(self, true),
            RequestBody::Stop => admin::set_running(self, false),
            RequestBody::LockRange { id, range } => range::lock(self, id, range).await,
            RequestBody::AbortMove { id, range } => range::abort(self, id, range).await,
            RequestBody::PrepareReceive { id, range, from } => {
                range::prepare_receive(self, id, range, from).await
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
            RequestBody::PutBatch { id, entries } => {
                range::put_batch(self, peer, id, entries).await
            }
            RequestBody::DeleteRange { range } => range::delete(self, range).await,
            RequestBody::Gossip { digest } => gossip::exchange(self, peer, digest),
            RequestBody::GossipPush { metadata } => gossip::push(self, metadata).await,
            // Unwrapped by `handle` (after its term check); one inside another is refused
            // when decoded and by `request::allowed`.
            RequestBody::Fenced { .. } => request::error(
                ErrorKind::Malformed,
                "a fenced request may not carry another fenced request",
            ),
        }
    }
}

/// The `StaleTerm` reply to an ECS request of `term` at a node that has seen `seen`.
fn stale_term(term: u64, seen: u64) -> ReplyBody {
    let request = if term == 0 {
        "an unfenced ECS request (term 0)".to_string()
    } else {
        format!("a request of ECS term {term}")
    };
    request::error(
        ErrorKind::StaleTerm,
        format!(
            "{request}, but this node has seen ECS term {seen}: a newer ECS leader exists, \
             the request was not executed"
        ),
    )
}

fn view_of(name: &str, metadata: RingMetadata, signed: Option<SignedMetadata>) -> RingView {
    RingView {
        held: metadata.held_by(name),
        runs: metadata.run_ranges(),
        metadata: Arc::new(metadata),
        signed,
    }
}

/// Why metadata was not installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// It was not signed by the ECS, or is not a valid ring.
    #[error("{0}")]
    Refused(ringkv_wire::WireError),
    /// Persisting it failed; nothing changed.
    #[error("{0}")]
    Storage(NodeError),
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use ringkv_wire::NodeEntry;

    use super::*;

    proptest! {
        /// The view's binary search finds the same run as the metadata's scan, for rings
        /// whose runs wrap past the top or cover it whole.
        #[test]
        fn the_views_run_at_agrees_with_the_metadata(n in 1usize..9, r in 1u8..4, pos in any::<[u8; 20]>()) {
            let nodes = (0..n)
                .map(|i| NodeEntry::new(format!("n{i}"), format!("10.0.0.1:{}", 7000 + i)))
                .collect();
            let ring = RingMetadata::new(1, nodes).unwrap().with_replication(r).unwrap();
            let view = view_of("n0", ring.clone(), None);
            for p in [Position(pos), Position::MIN, Position::MAX] {
                prop_assert_eq!(view.run_at(&p), ring.run_at(&p));
            }
        }
    }
}
