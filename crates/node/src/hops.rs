//! Chain writes to a successor, batched (ARCHITECTURE.md §11): every write a node sends down
//! a chain goes through [`Hops::send`], which queues it per (successor, metadata version).
//! One task per queue takes whatever is waiting, sends it as one `ReplicateBatch` (in a task
//! of its own: the batch's answer is not awaited here), yields once so that the writes made
//! meanwhile can join the next batch, and stops when the queue is empty. A hop thus costs one
//! exchange for many writes under load and adds nothing when idle (a lone write leaves at
//! once in a batch of one). Each write gets the answer the successor gave to it
//! (`Replicated`), or the batch's failure.
//!
//! Nothing here waits for a batch's answer before sending the next one: batches wait on the
//! successors' own hops (a middle member answers once the tail did), and with every node the
//! head of one chain and a middle member of another, a cap on batches in flight per successor
//! would close a cycle of queues waiting on each other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ringkv_wire::{ChainWrite, Reply, ReplyBody, Request, RequestBody, MAX_BATCH_ENTRIES};
use tokio::sync::oneshot;

use crate::Node;

/// Most writes per batch (also bounded by the entry cap of the wire).
pub const MAX_WRITES_PER_BATCH: usize = 512;

/// What a write's hop ended with: the successor's answer to it, or why the batch failed.
pub type HopResult = Result<ReplyBody, String>;

type Waiting = (ChainWrite, oneshot::Sender<HopResult>);

#[derive(Default)]
struct Queue {
    pending: Vec<Waiting>,
    /// Whether a task is taking this queue's writes.
    flushing: bool,
}

/// The queues of a node's chain writes, by successor address and metadata version.
#[derive(Default)]
pub struct Hops {
    queues: std::sync::Mutex<HashMap<(String, u64), Queue>>,
}

impl Hops {
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
        let start_sender = {
            let mut queues = node.hops.queues.lock().expect("hops lock");
            let queue = queues.entry(key.clone()).or_default();
            queue.pending.push((write, tx));
            !std::mem::replace(&mut queue.flushing, true)
        };
        if start_sender {
            tokio::spawn(flush(node.clone(), key, timeout));
        }
        rx.await
            .unwrap_or_else(|_| Err("the batch carrying the write was dropped".into()))
    }
}

/// Sends the batches of one queue until it is empty.
async fn flush(node: Arc<Node>, key: (String, u64), timeout: Duration) {
    loop {
        let batch: Vec<Waiting> = {
            let mut queues = node.hops.queues.lock().expect("hops lock");
            let queue = queues.get_mut(&key).expect("a flushing queue exists");
            if queue.pending.is_empty() {
                queues.remove(&key);
                return;
            }
            let n = queue
                .pending
                .len()
                .min(MAX_WRITES_PER_BATCH)
                .min(MAX_BATCH_ENTRIES);
            queue.pending.drain(..n).collect()
        };
        tokio::spawn(send_batch(node.clone(), key.clone(), batch, timeout));
        // Let the writes made meanwhile gather for the next batch.
        tokio::task::yield_now().await;
    }
}

/// Sends one batch and hands each write its answer.
async fn send_batch(node: Arc<Node>, key: (String, u64), batch: Vec<Waiting>, timeout: Duration) {
    let (writes, waiting): (Vec<ChainWrite>, Vec<oneshot::Sender<HopResult>>) =
        batch.into_iter().unzip();
    let count = writes.len();
    let request = Request::new(key.1, RequestBody::ReplicateBatch { writes });
    let answer = node.peers.call::<_, Reply>(&key.0, &request, timeout).await;
    match answer {
        Ok(Reply {
            body: ReplyBody::Replicated(answers),
            ..
        }) if answers.len() == count => {
            for (tx, answer) in waiting.into_iter().zip(answers) {
                let _ = tx.send(Ok(answer));
            }
        }
        // A refusal of the whole batch (not the successor's version, stopped, an error) is
        // every write's answer.
        Ok(reply) => {
            let answer = match reply.body {
                ReplyBody::Replicated(answers) => Err(format!(
                    "{} answered {} of {count} chain writes",
                    key.0,
                    answers.len()
                )),
                body => Ok(body),
            };
            for tx in waiting {
                let _ = tx.send(answer.clone());
            }
        }
        Err(e) => {
            let why = e.to_string();
            for tx in waiting {
                let _ = tx.send(Err(why.clone()));
            }
        }
    }
}
