//! Batches: `get_many`, `put_many`, `delete_many` (ARCHITECTURE.md §7 "Batches").
//!
//! A batch is many single-key requests sent together, not a transaction: each key is read or
//! written exactly as `get`/`put`/`delete` would, and gets its own result. The client groups
//! the keys by the node that serves them (a read's tail, a write's head), cuts each group
//! into requests of at most [`MAX_BATCH_KEYS`] keys and one frame of bytes, and sends all of
//! them at once. A key answered "not here", "write-locked", "stopped" or "deferred" (a reply
//! full of values) is routed again with the newest metadata and sent again, after the same
//! backoff as a single request's (at once after a redirect to newer metadata or a deferral),
//! as soon as its own request answered: a slow or dead node holds up its own keys only. A
//! key is done once it has a final answer, or the retry deadline passes (it gets
//! [`KvError::Timeout`]).
//!
//! Failures name their keys: a per-key error is that key's alone. A whole request that may
//! have reached its node and got no answer (`TransportError::Stream`) fails each of its
//! write keys as unknown, exactly like a single write whose reply was lost, and is never
//! sent again; a read request is simply retried.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ringkv_transport::TransportError;
use ringkv_wire::{KeyReply, KeyValue, ReplyBody, Request, RequestBody, MAX_BATCH_KEYS};
use serde_bytes::ByteBuf;

use crate::client::{KvStore, PutOutcome, Versioned};
use crate::{Backoff, KvError};

/// What a batch does to each of its keys.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Get,
    Put,
    Delete,
}

impl Kind {
    fn writes(self) -> bool {
        self != Kind::Get
    }
}

/// A batch on its way: what it does, its keys and values, when it started, and the backoff
/// of the keys' next attempt.
struct Round<'a> {
    kind: Kind,
    keys: &'a [&'a [u8]],
    values: &'a [&'a [u8]],
    started: Instant,
    backoff: Backoff,
}

/// One request of a batch: the node's address and name, and the indexes of its keys.
struct Part {
    addr: String,
    name: String,
    keys: Vec<usize>,
}

impl KvStore {
    /// Reads every key of `keys`: one result per key, in order (`Ok(None)`: the key does not
    /// exist). The keys are read from their chains' tails, one request per node (more for
    /// more than 1024 keys or one frame of values), all at once.
    pub async fn get_many<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
    ) -> Vec<Result<Option<Versioned>, KvError>> {
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        self.batch(Kind::Get, &keys, &[])
            .await
            .into_iter()
            .map(|answer| match answer? {
                KeyReply::Value { value, version } => Ok(Some(Versioned { value, version })),
                KeyReply::NotFound => Ok(None),
                other => Err(unexpected_answer("get_many", other)),
            })
            .collect()
    }

    /// Writes every entry of `entries`: one result per entry, in order, each `Ok` once that
    /// write is durable on every copy of its key. Not a transaction: some keys may be written
    /// and others fail (each failure is that key's; one that may or may not have been
    /// applied says so, as for [`KvStore::put`]).
    pub async fn put_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        entries: &[(K, V)],
    ) -> Vec<Result<PutOutcome, KvError>> {
        let keys: Vec<&[u8]> = entries.iter().map(|(k, _)| k.as_ref()).collect();
        let values: Vec<&[u8]> = entries.iter().map(|(_, v)| v.as_ref()).collect();
        self.batch(Kind::Put, &keys, &values)
            .await
            .into_iter()
            .map(|answer| match answer? {
                KeyReply::PutOk { created: true } => Ok(PutOutcome::Created),
                KeyReply::PutOk { created: false } => Ok(PutOutcome::Updated),
                other => Err(unexpected_answer("put_many", other)),
            })
            .collect()
    }

    /// Deletes every key of `keys`: one result per key, in order (`Ok(true)`: it existed).
    pub async fn delete_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<Result<bool, KvError>> {
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        self.batch(Kind::Delete, &keys, &[])
            .await
            .into_iter()
            .map(|answer| match answer? {
                KeyReply::Deleted => Ok(true),
                KeyReply::NotFound => Ok(false),
                other => Err(unexpected_answer("delete_many", other)),
            })
            .collect()
    }

    /// Runs a batch of `kind` over `keys` (with `values` for puts) until every key has its
    /// final answer.
    async fn batch(
        &self,
        kind: Kind,
        keys: &[&[u8]],
        values: &[&[u8]],
    ) -> Vec<Result<KeyReply, KvError>> {
        let mut results: Vec<Option<Result<KeyReply, KvError>>> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let checked = match kind {
                    Kind::Put => self.config.limits.check_put(key, values[i]),
                    _ => self.config.limits.check_key(key),
                };
                checked.err().map(|e| Err(KvError::Invalid(e)))
            })
            .collect();
        let pending: Vec<usize> = (0..keys.len()).filter(|&i| results[i].is_none()).collect();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let round = Round {
            kind,
            keys,
            values,
            started: Instant::now(),
            backoff: Backoff::new(self.config.retry, seed ^ keys.len() as u64),
        };
        for (i, result) in self.drive(&round, pending).await {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.expect("every key of a batch gets a result"))
            .collect()
    }

    /// Routes `pending` with the newest metadata and sends one request per node (and per
    /// [`MAX_BATCH_KEYS`] keys or frame of bytes), all at once. Each request goes its own
    /// way: the keys it must ask again are routed afresh and sent again without waiting for
    /// the other requests (a dead node's timeout holds up its own keys only).
    fn drive<'a>(
        &'a self,
        round: &'a Round<'a>,
        pending: Vec<usize>,
    ) -> futures::future::BoxFuture<'a, Vec<(usize, Result<KeyReply, KvError>)>> {
        Box::pin(async move {
            if self.disconnected.load(Ordering::SeqCst) {
                return pending
                    .into_iter()
                    .map(|i| (i, Err(KvError::Disconnected)))
                    .collect();
            }
            let mut done = Vec::new();
            let metadata = self.metadata();
            let mut parts: Vec<Part> = Vec::new();
            for i in pending {
                let position = ringkv_wire::key_position(round.keys[i]);
                let target = if round.kind.writes() {
                    metadata.head(&position)
                } else {
                    metadata.tail(&position)
                };
                let Some(node) = target else {
                    done.push((i, Err(KvError::NoRing)));
                    continue;
                };
                match parts.iter_mut().find(|r| r.name == node.name) {
                    Some(part) => part.keys.push(i),
                    None => parts.push(Part {
                        addr: node.addr.clone(),
                        name: node.name.clone(),
                        keys: vec![i],
                    }),
                }
            }
            let parts = self.cut(round, parts);
            let sent = parts
                .into_iter()
                .map(|part| self.send_part(round, metadata.version, part));
            done.extend(futures::future::join_all(sent).await.into_iter().flatten());
            done
        })
    }

    /// Sends one request and takes its answers; the keys to ask again go back to
    /// [`KvStore::drive`] after a backoff (at once when newer metadata redirected them or the
    /// node only deferred them), or time out at the retry deadline.
    async fn send_part(
        &self,
        round: &Round<'_>,
        version: u64,
        part: Part,
    ) -> Vec<(usize, Result<KeyReply, KvError>)> {
        let (kind, keys, values) = (round.kind, round.keys, round.values);
        let body = match kind {
            Kind::Get => RequestBody::GetMany {
                keys: part.keys.iter().map(|&i| ByteBuf::from(keys[i])).collect(),
            },
            Kind::Put => RequestBody::PutMany {
                entries: part
                    .keys
                    .iter()
                    .map(|&i| KeyValue {
                        key: keys[i].to_vec(),
                        value: values[i].to_vec(),
                    })
                    .collect(),
            },
            Kind::Delete => RequestBody::DeleteMany {
                keys: part.keys.iter().map(|&i| ByteBuf::from(keys[i])).collect(),
            },
        };
        let request = Request::new(version, body);
        let answer = self
            .send_watching(&part.addr, &request, kind.writes())
            .await;
        let mut done = Vec::new();
        let mut again = Vec::new();
        // Whether the keys asked again may go at once: newer metadata redirected them, or
        // the node deferred them; nothing needs time to change.
        let mut at_once = true;
        let mut refresh = false;
        let mut last = String::new();
        match answer.map(|reply| reply.body) {
            Ok(ReplyBody::Many { answers, metadata }) if answers.len() == part.keys.len() => {
                let adopted = metadata.is_some_and(|m| self.adopt_metadata(&m));
                for (&i, answer) in part.keys.iter().zip(answers) {
                    match answer {
                        KeyReply::NotResponsible => {
                            self.counters
                                .not_responsible
                                .fetch_add(1, Ordering::Relaxed);
                            at_once &= adopted;
                            last = format!("{} is not responsible", part.name);
                            again.push(i);
                        }
                        KeyReply::WriteLocked => {
                            self.counters.write_locked.fetch_add(1, Ordering::Relaxed);
                            at_once = false;
                            last = format!("{} is write-locked (range being moved)", part.name);
                            again.push(i);
                        }
                        KeyReply::Stopped => {
                            self.counters.stopped.fetch_add(1, Ordering::Relaxed);
                            (at_once, refresh) = (false, true);
                            last = format!("{} is stopped", part.name);
                            again.push(i);
                        }
                        KeyReply::Deferred => {
                            last = format!("{} deferred it (its reply was full)", part.name);
                            again.push(i);
                        }
                        KeyReply::Error { kind, message } => {
                            done.push((i, Err(KvError::Server { kind, message })));
                        }
                        answer => done.push((i, Ok(answer))),
                    }
                }
            }
            Ok(ReplyBody::Error { kind, message }) => {
                for &i in &part.keys {
                    let message = message.clone();
                    done.push((i, Err(KvError::Server { kind, message })));
                }
            }
            Ok(other) => {
                let reply = format!("{other:?}");
                for &i in &part.keys {
                    let reply = reply.clone();
                    done.push((
                        i,
                        Err(KvError::UnexpectedReply {
                            request: "batch",
                            reply,
                        }),
                    ));
                }
            }
            // Writes that may have been applied are not sent again (see
            // `KvStore::execute`): each key's outcome is unknown.
            Err(e @ TransportError::Stream { .. }) if kind.writes() => {
                self.counters.unreachable.fetch_add(1, Ordering::Relaxed);
                refresh = true;
                for &i in &part.keys {
                    done.push((i, Err(KvError::Transport(copy(&e)))));
                }
            }
            Err(e) if e.is_unreachable() => {
                self.counters.unreachable.fetch_add(1, Ordering::Relaxed);
                (at_once, refresh) = (false, true);
                last = e.to_string();
                again = part.keys;
            }
            Err(e) => {
                for &i in &part.keys {
                    done.push((i, Err(KvError::from(copy(&e)))));
                }
            }
        }
        if refresh {
            let _ = self.refresh_metadata().await;
        }
        if again.is_empty() {
            return done;
        }
        let mut backoff = round.backoff.clone();
        // At once costs no wait, yet is bounded by the deadline too (a node that kept
        // redirecting or deferring would otherwise be asked forever).
        let delay = if at_once {
            std::time::Duration::ZERO
        } else {
            backoff.next_delay()
        };
        if round.started.elapsed() + delay > self.config.retry.deadline {
            let attempts = backoff.attempts();
            for i in again {
                let last = last.clone();
                let elapsed = round.started.elapsed();
                done.push((
                    i,
                    Err(KvError::Timeout {
                        elapsed,
                        attempts,
                        last,
                    }),
                ));
            }
            return done;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let next = Round { backoff, ..*round };
        done.extend(self.drive(&next, again).await);
        done
    }

    /// Cuts each node's keys into requests of at most [`MAX_BATCH_KEYS`] keys and, for
    /// puts, one frame of keys and values.
    fn cut(&self, round: &Round<'_>, requests: Vec<Part>) -> Vec<Part> {
        let (kind, keys, values) = (round.kind, round.keys, round.values);
        let room = self
            .config
            .limits
            .max_frame
            .saturating_sub(ringkv_wire::limits::FRAME_OVERHEAD);
        let mut cut = Vec::new();
        for request in requests {
            let mut part: Vec<usize> = Vec::new();
            let mut bytes = 0;
            for i in request.keys {
                // 16: room for the lengths of key and value.
                let size = keys[i].len()
                    + if kind == Kind::Put {
                        values[i].len()
                    } else {
                        0
                    }
                    + 16;
                if !part.is_empty() && (part.len() == MAX_BATCH_KEYS || bytes + size > room) {
                    cut.push(Part {
                        addr: request.addr.clone(),
                        name: request.name.clone(),
                        keys: std::mem::take(&mut part),
                    });
                    bytes = 0;
                }
                bytes += size;
                part.push(i);
            }
            if !part.is_empty() {
                cut.push(Part {
                    addr: request.addr,
                    name: request.name,
                    keys: part,
                });
            }
        }
        cut
    }
}

/// A copy of `e` for each key of a request it failed (the error itself is not `Clone`).
fn copy(e: &TransportError) -> TransportError {
    match e {
        TransportError::Encode(w) => TransportError::Encode(w.clone()),
        TransportError::Address { addr, reason } => TransportError::Address {
            addr: addr.clone(),
            reason: reason.clone(),
        },
        TransportError::Stream { addr, reason } => TransportError::Stream {
            addr: addr.clone(),
            reason: reason.clone(),
        },
        TransportError::NotTaken { addr, reason } => TransportError::NotTaken {
            addr: addr.clone(),
            reason: reason.clone(),
        },
        TransportError::Protocol { addr, source } => TransportError::Protocol {
            addr: addr.clone(),
            source: source.clone(),
        },
        // Setup errors: nothing was sent.
        TransportError::Connect { addr, reason } => TransportError::Connect {
            addr: addr.clone(),
            reason: reason.clone(),
        },
        other @ (TransportError::Tls(_) | TransportError::Bind(_)) => TransportError::Connect {
            addr: String::new(),
            reason: other.to_string(),
        },
    }
}

fn unexpected_answer(request: &'static str, answer: KeyReply) -> KvError {
    KvError::UnexpectedReply {
        request,
        reply: format!("{answer:?}"),
    }
}
