//! A recorded client workload for fault tests: clients putting unique values and reading
//! them back while something breaks, every operation recorded in a [`History`] and the whole
//! checked at the end for per-key linearizability and lost acknowledged writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvstore::KvStore;
use ringkv_wire::{HashedKey, KeyRange};
use tokio::task::JoinHandle;

use super::history::{
    check_with_final, record_get, record_get_versioned, record_put, record_put_if, History,
    OpResult, Report, Values,
};
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

/// Writers incrementing one counter with compare-and-set, every operation recorded: each
/// reads the key with its version, then writes `count + 1` if the version is still the one
/// it read (or the key is still absent), and starts over on a conflict or an error. Every
/// value written is unique (`count:writer:attempt`), so the history checker can tell every
/// write apart.
pub struct CasCounter {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    /// Every operation of the writers.
    pub history: History,
    /// Increments acknowledged as applied.
    pub applied: Arc<AtomicU64>,
    key: Vec<u8>,
}

/// The count a counter value holds (`count:writer:attempt`; an absent key counts 0).
pub fn count_of(value: Option<&[u8]>) -> u64 {
    value.map_or(0, |v| {
        let text = String::from_utf8_lossy(v);
        let count = text.split(':').next().unwrap_or_default();
        count
            .parse()
            .unwrap_or_else(|_| panic!("not a counter value: {text}"))
    })
}

impl CasCounter {
    pub fn start(store: Arc<KvStore>, key: Vec<u8>, writers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let history = History::new();
        let applied = Arc::new(AtomicU64::new(0));
        let tasks = (0..writers)
            .map(|w| {
                let (store, stop, history, applied, key) = (
                    store.clone(),
                    stop.clone(),
                    history.clone(),
                    applied.clone(),
                    key.clone(),
                );
                tokio::spawn(async move {
                    let mut attempt = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        attempt += 1;
                        let current = match record_get_versioned(&history, w, &store, &key).await {
                            Ok(current) => current,
                            Err(_) => {
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                                continue;
                            }
                        };
                        let count = count_of(current.as_ref().map(|c| &c.value[..]));
                        let value = format!("{}:{w}:{attempt}", count + 1);
                        let expected = current.map(|c| c.version);
                        match record_put_if(&history, w, &store, &key, value.as_bytes(), expected)
                            .await
                        {
                            Ok(outcome) if outcome.is_applied() => {
                                applied.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {} // someone else's increment came first
                            Err(_) => {
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            tasks,
            history,
            applied,
            key,
        }
    }

    /// Stops the writers, reads the counter from a fresh client and checks the history
    /// (linearizable, nothing acknowledged lost). The final count is the number of applied
    /// increments plus those whose outcome was unknown and took effect: returns it with
    /// the applied and unknown conditional writes, and the report.
    pub async fn stop_and_check(
        self,
        certs: &Certs,
        seeds: Vec<String>,
    ) -> (u64, u64, u64, Report) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let finals = final_values(certs, seeds, std::slice::from_ref(&self.key)).await;
        let report = check_with_final(&self.history, &finals).unwrap_or_else(|v| panic!("{v}"));
        let applied = self.applied.load(Ordering::Relaxed);
        let unknown = self
            .history
            .entries()
            .iter()
            .filter(|e| {
                matches!(e.op, super::history::Op::PutIf { .. }) && *e.status() == OpResult::Unknown
            })
            .count() as u64;
        let count = count_of(finals[&self.key].as_deref());
        println!(
            "counter: {count} after {applied} applied increments and {unknown} of unknown outcome; history: {report}"
        );
        assert!(
            applied <= count && count <= applied + unknown,
            "the counter is {count}: {applied} increments were applied, {unknown} unknown"
        );
        (count, applied, unknown, report)
    }
}
