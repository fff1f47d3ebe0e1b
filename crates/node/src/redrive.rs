//! Re-driving unconfirmed chain writes (ARCHITECTURE.md §11, "Unconfirmed writes").
//!
//! A head applies a write and carries it down its chain at the same time. If the head is
//! killed before its successors have the write, or gives the write up (its lease lapsed for
//! good, or the chain deadline passed), the head holds a write its chain may lack: the
//! client was told the outcome is unknown, but the copies differ, and a later change of
//! chains could let a read see the write and a later read not. The same holds for a member
//! that becomes the head when its predecessor is failed over. So every chain write at a head
//! marks its key unconfirmed in the same commit ([`crate::storage::Store::submit_head`]), as
//! does every write a member passes on, the mark goes once the rest of the chain has it, and
//! the keys still marked are re-driven by whichever node heads them: at start (loaded from
//! the store), after a write is given up, and at every install of a new ring, every
//! [`REDRIVE_EVERY`] until the chain has the head's current value
//! ([`crate::request::data::redrive`]).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use crate::request::data::{redrive, Redriven};
use crate::Node;

/// How often keys still unconfirmed are tried again.
pub const REDRIVE_EVERY: Duration = Duration::from_secs(1);

/// Most keys re-driven at once.
const CONCURRENCY: usize = 64;

/// The keys a head is to re-drive.
#[derive(Default)]
pub struct Redrive {
    keys: Mutex<BTreeSet<Vec<u8>>>,
    /// The store's marks are to be read again (a new ring was installed).
    rescan: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Redrive {
    /// Starts with `keys` (the unconfirmed keys found in the store at start).
    pub(crate) fn new(keys: Vec<Vec<u8>>) -> Self {
        Self {
            keys: Mutex::new(keys.into_iter().collect()),
            rescan: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// `key` is to be re-driven (a write of it was given up).
    pub(crate) fn later(&self, key: Vec<u8>) {
        self.keys.lock().expect("redrive lock").insert(key);
        self.wake.notify_one();
    }

    /// Every key marked unconfirmed in the store is to be re-driven (a new ring may have
    /// made this node the head of keys it took as a member; those it does not head stay
    /// marked). The marks are read by the re-drive task, on a blocking thread: the
    /// keyspace of marks holds a removed mark for every chain write since its last
    /// compaction, and reading past them took 100 ms after 100,000 writes, time an install
    /// (which releases the write locks of a move) must not wait for, nor the runtime.
    pub(crate) fn rescan(&self) {
        self.rescan.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn take(&self) -> BTreeSet<Vec<u8>> {
        std::mem::take(&mut *self.keys.lock().expect("redrive lock"))
    }
}

/// Re-drives `node`'s unconfirmed keys until it stops (aborted with the server).
pub async fn run(node: Arc<Node>) {
    loop {
        if node.redrive.rescan.swap(false, Ordering::SeqCst) {
            let store = node.store.clone();
            match tokio::task::spawn_blocking(move || store.unconfirmed()).await {
                Ok(Ok(keys)) => node.redrive.keys.lock().expect("redrive lock").extend(keys),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading the unconfirmed chain writes failed")
                }
                Err(e) => tracing::warn!(error = %e, "reading the unconfirmed chain writes failed"),
            }
        }
        let keys = node.redrive.take();
        if keys.is_empty() {
            node.redrive.wake.notified().await;
            continue;
        }
        let count = keys.len();
        let mut outcomes = futures::stream::iter(keys)
            .map(|key| {
                let node = node.clone();
                async move {
                    let outcome = redrive(&node, &key).await;
                    (key, outcome)
                }
            })
            .buffer_unordered(CONCURRENCY);
        let (mut confirmed, mut later) = (0, 0);
        let mut why = None;
        while let Some((key, outcome)) = outcomes.next().await {
            match outcome {
                Redriven::Confirmed => confirmed += 1,
                Redriven::Forgotten | Redriven::NotHead => {}
                Redriven::Later(reason) => {
                    later += 1;
                    why = Some(reason);
                    node.redrive.keys.lock().expect("redrive lock").insert(key);
                }
            }
        }
        if confirmed > 0 {
            tracing::info!(node = %node.config().name, keys = count, confirmed, "re-drove unconfirmed chain writes");
        }
        if later > 0 {
            tracing::debug!(node = %node.config().name, later, why = ?why, "unconfirmed chain writes wait to be re-driven");
            tokio::time::sleep(REDRIVE_EVERY).await;
        }
    }
}
