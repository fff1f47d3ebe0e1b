//! [`KvStore`]: the store as an application sees it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use ringkv_transport::{RingAuthority, Transport};
use ringkv_wire::{Expected, ReplyBody, Request, RequestBody, RingMetadata, SignedMetadata};

use crate::{Backoff, ClientConfig, KvError};

/// Whether a put created the key or replaced an existing value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The key did not exist.
    Created,
    /// The key existed and its value was replaced.
    Updated,
}

/// A value with the key's version ([`KvStore::get_versioned`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub value: Vec<u8>,
    /// The key's version: it grows with every write of the key, and is what
    /// [`KvStore::put_if_version`] and [`KvStore::delete_if_version`] compare with.
    pub version: u64,
}

/// The outcome of a conditional write (compare-and-set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conditional {
    /// The condition held and the write is durable: the key's new version (a put), or the
    /// version the key had (a delete).
    Applied {
        /// The version.
        version: u64,
    },
    /// The condition did not hold: nothing was written. `current` is the key's version
    /// when the head decided (`None`: the key did not exist).
    Conflict {
        /// The key's version then.
        current: Option<u64>,
    },
}

impl Conditional {
    /// Whether the write was applied.
    pub fn is_applied(&self) -> bool {
        matches!(self, Conditional::Applied { .. })
    }
}

/// Counters of what the client had to recover from, since connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// `NotResponsible` replies (requests redirected by newer metadata).
    pub not_responsible: u64,
    /// `WriteLocked` replies (writes retried after a backoff).
    pub write_locked: u64,
    /// `Stopped` replies.
    pub stopped: u64,
    /// Requests that failed to reach their node.
    pub unreachable: u64,
    /// Times newer metadata was adopted.
    pub metadata_adopted: u64,
    /// Metadata refused because the ECS had not signed it (or it was not a valid ring).
    pub metadata_refused: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) not_responsible: AtomicU64,
    pub(crate) write_locked: AtomicU64,
    pub(crate) stopped: AtomicU64,
    pub(crate) unreachable: AtomicU64,
    metadata_adopted: AtomicU64,
}

/// A connection to a ringkv cluster. Cheap to share (`Arc<KvStore>`); every method takes
/// `&self` and many requests may run concurrently over the same connections.
pub struct KvStore {
    transport: Transport,
    pub(crate) config: ClientConfig,
    /// Opens metadata only if the ECS signed it.
    authority: RingAuthority,
    metadata: RwLock<Arc<RingMetadata>>,
    pub(crate) counters: Counters,
    pub(crate) disconnected: AtomicBool,
    refresh: tokio::sync::Mutex<()>,
    /// Refreshes completed, so that callers queued behind one do not each start another.
    refreshes: AtomicU64,
}

impl KvStore {
    /// Connects to the cluster: fetches the ring metadata from the first seed that answers
    /// (keeping the newest version seen).
    pub async fn connect(config: ClientConfig) -> Result<Self, KvError> {
        let transport = Transport::bind_client(
            &config.identity,
            config.limits,
            config.connect_timeout,
            config.request_timeout,
        )?;
        let authority =
            RingAuthority::new(&config.identity).map_err(ringkv_transport::TransportError::from)?;
        let store = Self {
            transport,
            authority,
            config,
            metadata: RwLock::new(Arc::new(RingMetadata::default())),
            counters: Counters::default(),
            disconnected: AtomicBool::new(false),
            refresh: tokio::sync::Mutex::new(()),
            refreshes: AtomicU64::new(0),
        };
        let metadata = store.refresh_metadata().await?;
        if metadata.nodes.is_empty() {
            return Err(KvError::NoRing);
        }
        Ok(store)
    }

    /// Closes every connection gracefully. Later requests fail with
    /// [`KvError::Disconnected`].
    pub async fn disconnect(&self) {
        self.disconnected.store(true, Ordering::SeqCst);
        self.transport.close().await;
        self.transport.shutdown_endpoint().await;
    }

    /// The value of `key`, or `None` if it does not exist.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.get_versioned(key).await?.map(|v| v.value))
    }

    /// The value of `key` and its version, or `None` if it does not exist.
    pub async fn get_versioned(&self, key: &[u8]) -> Result<Option<Versioned>, KvError> {
        self.config.limits.check_key(key)?;
        let body = RequestBody::Get { key: key.to_vec() };
        match self.execute(key, body).await? {
            ReplyBody::Value { value, version } => Ok(Some(Versioned { value, version })),
            ReplyBody::NotFound => Ok(None),
            other => Err(unexpected("get", other)),
        }
    }

    /// Stores `value` under `key`. Returns once the node made the write durable.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<PutOutcome, KvError> {
        self.config.limits.check_put(key, value)?;
        let body = RequestBody::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        };
        match self.execute(key, body).await? {
            ReplyBody::PutOk { created: true } => Ok(PutOutcome::Created),
            ReplyBody::PutOk { created: false } => Ok(PutOutcome::Updated),
            other => Err(unexpected("put", other)),
        }
    }

    /// Stores `value` under `key` if the key's version is `version` (compare-and-set).
    /// Returns once the write is durable ([`Conditional::Applied`], with the new version),
    /// or at once if the key has another version or does not exist
    /// ([`Conditional::Conflict`], nothing written).
    pub async fn put_if_version(
        &self,
        key: &[u8],
        value: &[u8],
        version: u64,
    ) -> Result<Conditional, KvError> {
        self.put_if(key, value, Expected::Version(version)).await
    }

    /// Stores `value` under `key` if the key does not exist. [`Conditional::Applied`] with
    /// the new version once durable, or [`Conditional::Conflict`] with the existing
    /// version (nothing written).
    pub async fn put_if_absent(&self, key: &[u8], value: &[u8]) -> Result<Conditional, KvError> {
        self.put_if(key, value, Expected::Absent).await
    }

    async fn put_if(
        &self,
        key: &[u8],
        value: &[u8],
        expected: Expected,
    ) -> Result<Conditional, KvError> {
        self.config.limits.check_put(key, value)?;
        let body = RequestBody::PutIf {
            key: key.to_vec(),
            value: value.to_vec(),
            expected,
        };
        conditional("put_if", self.execute(key, body).await?)
    }

    /// Stores `value` under `key` until `ttl` has passed (rounded up to a millisecond),
    /// counted from when the head of the key's chain takes the write, by its clock
    /// (ARCHITECTURE.md §11 "Expiry"). After that the key is absent to every read, batch and
    /// condition. A later put without a TTL makes the key permanent again. A `ttl` of zero is
    /// refused (`InvalidTtl`), nothing written.
    pub async fn put_with_ttl(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> Result<PutOutcome, KvError> {
        match self.put_ttl(key, value, ttl, None).await? {
            ReplyBody::PutOk { created: true } => Ok(PutOutcome::Created),
            ReplyBody::PutOk { created: false } => Ok(PutOutcome::Updated),
            other => Err(unexpected("put_ttl", other)),
        }
    }

    /// [`KvStore::put_if_absent`] with a time to live (as [`KvStore::put_with_ttl`]): a lock
    /// or lease that goes away by itself if its holder does.
    pub async fn put_if_absent_with_ttl(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> Result<Conditional, KvError> {
        let reply = self
            .put_ttl(key, value, ttl, Some(Expected::Absent))
            .await?;
        conditional("put_ttl", reply)
    }

    /// [`KvStore::put_if_version`] with a time to live (as [`KvStore::put_with_ttl`]): e.g.
    /// renewing a lease held at `version`.
    pub async fn put_if_version_with_ttl(
        &self,
        key: &[u8],
        value: &[u8],
        version: u64,
        ttl: Duration,
    ) -> Result<Conditional, KvError> {
        let expected = Some(Expected::Version(version));
        conditional("put_ttl", self.put_ttl(key, value, ttl, expected).await?)
    }

    async fn put_ttl(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
        expected: Option<Expected>,
    ) -> Result<ReplyBody, KvError> {
        self.config.limits.check_put(key, value)?;
        // Rounded up: a TTL under a millisecond is one, not zero (which is refused).
        let ttl_ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        let body = RequestBody::PutTtl {
            key: key.to_vec(),
            value: value.to_vec(),
            ttl_ms,
            expected,
        };
        self.execute(key, body).await
    }

    /// Deletes `key` if its version is `version`: [`Conditional::Applied`] once durable, or
    /// [`Conditional::Conflict`] with the key's version (`None`: it does not exist), nothing
    /// deleted.
    pub async fn delete_if_version(
        &self,
        key: &[u8],
        version: u64,
    ) -> Result<Conditional, KvError> {
        self.config.limits.check_key(key)?;
        let body = RequestBody::DeleteIf {
            key: key.to_vec(),
            version,
        };
        conditional("delete_if", self.execute(key, body).await?)
    }

    /// Deletes `key`. Returns whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, KvError> {
        self.config.limits.check_key(key)?;
        let body = RequestBody::Delete { key: key.to_vec() };
        match self.execute(key, body).await? {
            ReplyBody::Deleted => Ok(true),
            ReplyBody::NotFound => Ok(false),
            other => Err(unexpected("delete", other)),
        }
    }

    /// The ring metadata this client routes with.
    pub fn metadata(&self) -> Arc<RingMetadata> {
        self.metadata.read().expect("metadata lock").clone()
    }

    /// Replaces the cached metadata with the one `signed` holds if it is newer, the ECS
    /// signed it and it is a valid ring. Returns whether it did. Metadata that does not verify
    /// is refused and counted ([`ClientStats::metadata_refused`]), whoever sent it.
    pub fn adopt_metadata(&self, signed: &SignedMetadata) -> bool {
        if signed.version <= self.metadata().version {
            return false;
        }
        let Ok(metadata) = self.authority.open(signed, "client") else {
            return false;
        };
        let mut current = self.metadata.write().expect("metadata lock");
        if metadata.is_newer_than(&current) {
            tracing::debug!(version = metadata.version, "adopted ring metadata");
            *current = Arc::new(metadata);
            self.counters
                .metadata_adopted
                .fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Asks every known node (ring members and seeds, concurrently) for its metadata and
    /// adopts the newest. Fails only if none answers. Concurrent callers share one refresh:
    /// whoever finds one under way waits for it instead of starting another.
    pub async fn refresh_metadata(&self) -> Result<Arc<RingMetadata>, KvError> {
        let before = self.metadata().version;
        let generation = self.refreshes.load(Ordering::SeqCst);
        let _refreshing = self.refresh.lock().await;
        if self.metadata().version > before || self.refreshes.load(Ordering::SeqCst) != generation {
            // Someone else refreshed while we waited: theirs is as fresh as ours would be.
            return Ok(self.metadata());
        }
        let mut candidates: Vec<String> = self
            .metadata()
            .nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect();
        for seed in &self.config.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let request = Request::new(self.metadata().version, RequestBody::GetMetadata);
        let mut asks: futures::stream::FuturesUnordered<_> = candidates
            .iter()
            .map(|addr| self.transport.request(addr, &request))
            .collect();
        let mut last = None;
        let mut answered = false;
        // Once someone answered, the others get a moment more: a dead node (a dial that
        // times out) must not hold up every refresh.
        let mut stragglers: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let result = match &mut stragglers {
                None => asks.next().await,
                Some(deadline) => tokio::select! {
                    next = asks.next() => next,
                    () = deadline.as_mut() => break,
                },
            };
            let Some(result) = result else { break };
            match result.map(|reply| reply.body) {
                Ok(ReplyBody::Metadata(m)) | Ok(ReplyBody::NotResponsible { metadata: m }) => {
                    answered = true;
                    stragglers.get_or_insert_with(|| Box::pin(tokio::time::sleep(STRAGGLERS)));
                    if let Some(m) = m {
                        self.adopt_metadata(&m);
                    }
                }
                Ok(other) => last = Some(unexpected("get_metadata", other)),
                Err(e) => last = Some(KvError::from(e)),
            }
        }
        drop(asks);
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        if !answered {
            return Err(KvError::NoNodeReachable {
                tried: candidates,
                last: last.map_or_else(|| "no seed configured".into(), |e| e.to_string()),
            });
        }
        Ok(self.metadata())
    }

    /// Counters of redirects and retries since connect.
    pub fn stats(&self) -> ClientStats {
        let c = &self.counters;
        ClientStats {
            not_responsible: c.not_responsible.load(Ordering::Relaxed),
            write_locked: c.write_locked.load(Ordering::Relaxed),
            stopped: c.stopped.load(Ordering::Relaxed),
            unreachable: c.unreachable.load(Ordering::Relaxed),
            metadata_adopted: c.metadata_adopted.load(Ordering::Relaxed),
            metadata_refused: self.authority.refused(),
        }
    }

    /// Sends `request` to `addr`; if it is not answered within [`SLOW_REQUEST`], refreshes
    /// the ring while still waiting for the answer (once), so that a dead node's replacement
    /// is known to the requests that come next. The answer is this request's in any case.
    pub(crate) async fn send_watching(
        &self,
        addr: &str,
        request: &Request,
        write: bool,
    ) -> Result<ringkv_wire::Reply, ringkv_transport::TransportError> {
        // A write is never sent twice by the transport: a node that took it and died before
        // answering may have applied it ([`Transport::request_once`]).
        let answer = async {
            if write {
                self.transport.request_once(addr, request).await
            } else {
                self.transport.request(addr, request).await
            }
        };
        tokio::pin!(answer);
        tokio::select! {
            biased;
            reply = &mut answer => return reply,
            () = tokio::time::sleep(SLOW_REQUEST) => {}
        }
        let refresh = self.refresh_metadata();
        tokio::pin!(refresh);
        let mut refreshing = true;
        loop {
            tokio::select! {
                biased;
                reply = &mut answer => return reply,
                _ = &mut refresh, if refreshing => refreshing = false,
            }
        }
    }

    /// Routes `body` for `key` to the responsible node and retries until it gets an answer
    /// that is not "try again", or the deadline passes.
    async fn execute(&self, key: &[u8], body: RequestBody) -> Result<ReplyBody, KvError> {
        self.execute_at(ringkv_wire::key_position(key), key.len() as u64, body)
            .await
    }

    /// [`KvStore::execute`] for ring position `position` (the key's, or a scan cursor's);
    /// `salt` varies the backoff's jitter.
    pub(crate) async fn execute_at(
        &self,
        position: ringkv_wire::Position,
        salt: u64,
        body: RequestBody,
    ) -> Result<ReplyBody, KvError> {
        let started = Instant::now();
        // Built on the first retry: most requests never need one.
        let mut backoff: Option<Backoff> = None;
        let mut attempts = 0u32;
        // One request for every attempt; only its metadata version changes.
        let write = !matches!(body, RequestBody::Get { .. } | RequestBody::Scan { .. });
        let mut request = Request::new(0, body);
        loop {
            if self.disconnected.load(Ordering::SeqCst) {
                return Err(KvError::Disconnected);
            }
            attempts += 1;
            let metadata = self.metadata();
            // Writes go to the head of the key's chain, reads to its tail (the same node
            // without replication).
            let target = if write {
                metadata.head(&position)
            } else {
                metadata.tail(&position)
            };
            let Some(owner) = target else {
                return Err(KvError::NoRing);
            };
            request.metadata_version = metadata.version;
            let last = match self.send_watching(&owner.addr, &request, write).await {
                Ok(reply) => match reply.body {
                    ReplyBody::NotResponsible { metadata: theirs } => {
                        self.counters
                            .not_responsible
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(node = %owner.name, theirs = reply.metadata_version, ours = metadata.version, "not responsible");
                        if theirs.is_some_and(|theirs| self.adopt_metadata(&theirs)) {
                            continue; // newer metadata: retry at once, maybe elsewhere
                        }
                        // The node is behind us; it will catch up. Back off.
                        format!(
                            "{} is not responsible (its metadata v{} is not newer than ours v{})",
                            owner.name, reply.metadata_version, metadata.version
                        )
                    }
                    ReplyBody::WriteLocked => {
                        self.counters.write_locked.fetch_add(1, Ordering::Relaxed);
                        format!("{} is write-locked (range being moved)", owner.name)
                    }
                    ReplyBody::Stopped => {
                        self.counters.stopped.fetch_add(1, Ordering::Relaxed);
                        // Maybe it was stopped because it left the ring: ask the others.
                        let _ = self.refresh_metadata().await;
                        format!("{} is stopped", owner.name)
                    }
                    ReplyBody::Error { kind, message } => {
                        return Err(KvError::Server { kind, message })
                    }
                    answer => return Ok(answer),
                },
                // A write that may have reached its node is not sent again: it may have
                // been applied, and applying it again after someone else's write would
                // undo theirs. The caller learns the outcome is unknown.
                Err(e @ ringkv_transport::TransportError::Stream { .. }) if write => {
                    self.counters.unreachable.fetch_add(1, Ordering::Relaxed);
                    let _ = self.refresh_metadata().await;
                    return Err(e.into());
                }
                Err(e) if e.is_unreachable() => {
                    self.counters.unreachable.fetch_add(1, Ordering::Relaxed);
                    // Maybe the ring changed and we were not told: ask the others.
                    let _ = self.refresh_metadata().await;
                    e.to_string()
                }
                Err(e) => return Err(e.into()),
            };
            let delay = backoff
                .get_or_insert_with(|| {
                    let seed = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(1, |d| d.as_nanos() as u64);
                    Backoff::new(self.config.retry, seed ^ salt)
                })
                .next_delay();
            if started.elapsed() + delay > self.config.retry.deadline {
                return Err(KvError::Timeout {
                    elapsed: started.elapsed(),
                    attempts,
                    last,
                });
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// A request unanswered for this long makes the client refresh its ring meanwhile (the node
/// may be dead and replaced: later requests then go to its successor at once).
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a metadata refresh waits for the other nodes once one has answered.
const STRAGGLERS: std::time::Duration = std::time::Duration::from_millis(100);

fn conditional(request: &'static str, reply: ReplyBody) -> Result<Conditional, KvError> {
    match reply {
        ReplyBody::Applied { version } => Ok(Conditional::Applied { version }),
        ReplyBody::Conflict { current } => Ok(Conditional::Conflict { current }),
        other => Err(unexpected(request, other)),
    }
}

fn unexpected(request: &'static str, reply: ReplyBody) -> KvError {
    KvError::UnexpectedReply {
        request,
        reply: format!("{reply:?}"),
    }
}
