//! Chain writes to a successor, batched (ARCHITECTURE.md §11).
//!
//! A head sends every write it takes down its chain through [`Hops::send`], which queues it
//! per (successor, metadata version). At most [`MAX_BATCHES_IN_FLIGHT`] batches of a queue
//! travel at once: a write that finds them all on their way waits in the queue, and leaves
//! with everything that gathered meanwhile as one `ReplicateBatch` when one of them is
//! answered. A hop thus costs one exchange for many writes under load and adds nothing when
//! idle (a lone write leaves at once in a batch of one). Each write gets the answer the
//! successor gave to it (`Replicated`), or the batch's failure.
//!
//! A member passes a batch it received on at once ([`Hops::call`], no queue, one batch per
//! successor). That is what makes the cap safe: a batch in flight waits only on members'
//! direct hops and the tail's storage, never on another queue. (With every node the head of
//! one chain and a member of others, members queueing behind capped queues closed a cycle of
//! queues waiting on each other.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringkv_wire::{ChainWrite, Reply, ReplyBody, Request, RequestBody, MAX_BATCH_ENTRIES};
use tokio::sync::oneshot;

use crate::Node;

/// Most writes per batch (also bounded by the entry cap of the wire).
pub const MAX_WRITES_PER_BATCH: usize = 512;

/// Most batches of one queue on their way at once.
pub const MAX_BATCHES_IN_FLIGHT: usize = 1;

/// What a write's hop ended with: the successor's answer to it, or why the batch failed.
pub type HopResult = Result<ReplyBody, String>;

type Waiting = (ChainWrite, oneshot::Sender<HopResult>);

#[derive(Default)]
struct Queue {
    pending: Vec<Waiting>,
    /// Batches of this queue on their way.
    in_flight: usize,
}

impl Queue {
    /// The next batch: up to [`MAX_WRITES_PER_BATCH`] writes, oldest first.
    fn take(&mut self) -> Vec<Waiting> {
        let n = self
            .pending
            .len()
            .min(MAX_WRITES_PER_BATCH)
            .min(MAX_BATCH_ENTRIES);
        self.pending.drain(..n).collect()
    }
}

/// The queues of a head's chain writes, by successor address and metadata version.
#[derive(Default)]
pub struct Hops {
    queues: std::sync::Mutex<HashMap<(String, u64), Queue>>,
    batches: AtomicU64,
    writes: AtomicU64,
}

/// What a node has sent down chains since it started ([`Hops::sent`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HopStats {
    /// `ReplicateBatch`es sent (as head or member).
    pub batches: u64,
    /// Chain writes in them.
    pub writes: u64,
}

impl Hops {
    /// What this node has sent down chains since it started.
    pub fn sent(&self) -> HopStats {
        HopStats {
            batches: self.batches.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }

    /// Sends `write` to the successor at `addr` as part of a `ReplicateBatch` at metadata
    /// `version`, waiting at most `timeout` for the batch's answer.
    pub async fn send(
        node: &Arc<Node>,
        addr: &str,
        version: u64,
        write: ChainWrite,
        timeout: Duration,
    ) -> HopResult {
        let (tx, rx) = oneshot::channel();
        let key = (addr.to_string(), version);
        let batch = {
            let mut queues = node.hops.queues.lock().expect("hops lock");
            let queue = queues.entry(key.clone()).or_default();
            queue.pending.push((write, tx));
            (queue.in_flight < MAX_BATCHES_IN_FLIGHT).then(|| {
                queue.in_flight += 1;
                queue.take()
            })
        };
        if let Some(batch) = batch {
            tokio::spawn(carry(node.clone(), key, batch, timeout));
        }
        rx.await
            .unwrap_or_else(|_| Err("the batch carrying the write was dropped".into()))
    }
}

/// Sends `batch`, then the batches that gathered in its queue while it was on its way, until
/// the queue is empty.
async fn carry(node: Arc<Node>, key: (String, u64), mut batch: Vec<Waiting>, timeout: Duration) {
    loop {
        send_batch(&node, &key, batch, timeout).await;
        let mut queues = node.hops.queues.lock().expect("hops lock");
        let queue = queues
            .get_mut(&key)
            .expect("a queue with a batch in flight exists");
        if queue.pending.is_empty() {
            queue.in_flight -= 1;
            if queue.in_flight == 0 {
                queues.remove(&key);
            }
            return;
        }
        batch = queue.take();
    }
}

/// Sends one batch and hands each write its answer.
async fn send_batch(node: &Node, key: &(String, u64), batch: Vec<Waiting>, timeout: Duration) {
    let (writes, waiting): (Vec<ChainWrite>, Vec<oneshot::Sender<HopResult>>) =
        batch.into_iter().unzip();
    let answers = Hops::call(node, &key.0, key.1, writes, timeout).await;
    for (tx, answer) in waiting.into_iter().zip(answers) {
        let _ = tx.send(answer);
    }
}

impl Hops {
    /// Sends `writes` to the successor at `addr` as one `ReplicateBatch` at metadata `version`
    /// at once (no queue: the caller already holds a batch), waiting at most `timeout`; returns
    /// one answer per write, in order.
    pub async fn call(
        node: &Node,
        addr: &str,
        version: u64,
        writes: Vec<ChainWrite>,
        timeout: Duration,
    ) -> Vec<HopResult> {
        let count = writes.len();
        node.hops.batches.fetch_add(1, Ordering::Relaxed);
        node.hops.writes.fetch_add(count as u64, Ordering::Relaxed);
        let request = Request::new(version, RequestBody::ReplicateBatch { writes });
        match node.peers.call::<_, Reply>(addr, &request, timeout).await {
            Ok(Reply {
                body: ReplyBody::Replicated(answers),
                ..
            }) if answers.len() == count => answers.into_iter().map(Ok).collect(),
            // A refusal of the whole batch (not the successor's version, stopped, an error) is
            // every write's answer.
            Ok(reply) => {
                let answer = match reply.body {
                    ReplyBody::Replicated(answers) => Err(format!(
                        "{addr} answered {} of {count} chain writes",
                        answers.len()
                    )),
                    body => Ok(body),
                };
                vec![answer; count]
            }
            Err(e) => vec![Err(e.to_string()); count],
        }
    }
}
