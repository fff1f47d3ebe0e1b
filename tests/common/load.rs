//! A recorded client workload for fault tests: clients putting unique values and reading
//! them back while something breaks, every operation recorded in a [`History`] and the whole
//! checked at the end for per-key linearizability and lost acknowledged writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvstore::KvStore;
use ringkv_wire::{HashedKey, KeyRange};
use tokio::task::JoinHandle;

use super::history::{check_with_final, record_get, record_put, History, Report, Values};
use super::Certs;

/// `n` keys in `range` and `outside` keys elsewhere.
pub fn keys_for(range: &KeyRange, n: usize, outside: usize) -> Vec<Vec<u8>> {
    let (mut inside_keys, mut outside_keys) = (Vec::new(), Vec::new());
    for i in 0u32.. {
        let key = format!("key-{i}").into_bytes();
        if range.contains(&HashedKey::new(&key).position) {
            if inside_keys.len() < n {
                inside_keys.push(key);
            }
        } else if outside_keys.len() < outside {
            outside_keys.push(key);
        }
        if inside_keys.len() == n && outside_keys.len() == outside {
            break;
        }
    }
    inside_keys.extend(outside_keys);
    inside_keys
}

/// Clients putting unique values and reading them back, every operation recorded.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    /// Every operation of the clients.
    pub history: History,
    keys: Arc<Vec<Vec<u8>>>,
}

impl Load {
    pub fn start(store: Arc<KvStore>, keys: Vec<Vec<u8>>, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let history = History::new();
        let keys = Arc::new(keys);
        let tasks = (0..clients)
            .map(|c| {
                let (store, stop, history, keys) =
                    (store.clone(), stop.clone(), history.clone(), keys.clone());
                tokio::spawn(async move {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let key = &keys[(i * 7 + c * 3) % keys.len()];
                        if i % 3 == 2 {
                            let _ = record_get(&history, c, &store, key).await;
                        } else {
                            let value = format!("c{c}-{i}");
                            let _ = record_put(&history, c, &store, key, value.as_bytes()).await;
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            tasks,
            history,
            keys,
        }
    }

    /// Stops the clients and checks their history, with a final read of every key from a
    /// fresh client: linearizable per key, no acknowledged write lost. Returns the final
    /// reads.
    pub async fn stop_and_check(self, certs: &Certs, seeds: Vec<String>) -> Values {
        self.stop_and_report(certs, seeds).await.0
    }

    /// [`Load::stop_and_check`], also returning the checker's report (how many operations
    /// completed, failed or ended unknown).
    pub async fn stop_and_report(self, certs: &Certs, seeds: Vec<String>) -> (Values, Report) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let finals = final_values(certs, seeds, &self.keys).await;
        let report = check_with_final(&self.history, &finals).unwrap_or_else(|v| panic!("{v}"));
        println!("history: {report}");
        assert!(
            report.ok > 50,
            "too few operations completed to mean anything: {report}"
        );
        (finals, report)
    }
}

/// Reads every key of `keys` through a fresh client (the final reads of a history).
pub async fn final_values(certs: &Certs, seeds: Vec<String>, keys: &[Vec<u8>]) -> Values {
    let reader = certs.client(seeds).await;
    let mut finals = HashMap::new();
    for key in keys {
        let value = reader
            .get(key)
            .await
            .unwrap_or_else(|e| panic!("final read of {}: {e}", String::from_utf8_lossy(key)));
        finals.insert(key.clone(), value);
    }
    reader.disconnect().await;
    finals
}
