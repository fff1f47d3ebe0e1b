//! A history recorder and a per-key linearizability checker for the key-value store seen as a
//! set of independent registers (one per key).
//!
//! # Recording
//!
//! A [`History`] is shared by every client task of an end-to-end test (it is an
//! `Arc<Mutex<..>>`, cheap to clone). Each operation is bracketed by
//! [`History::invoke`] (before the request is sent: records the start [`Instant`] and the
//! [`Op`]) and [`History::complete`] (after the answer: records the end `Instant` and the
//! [`OpResult`]). [`record_get`], [`record_put`] and [`record_delete`] do both around a
//! [`KvStore`] call and classify its error with [`classify_error`].
//!
//! # What an outcome means
//!
//! - [`OpResult::Ok`]: the operation took effect exactly once, at some instant between its
//!   start and its end, and the outcome is what it observed.
//! - [`OpResult::Unknown`] (timeout, broken connection, ...): the operation may or may not have
//!   taken effect, at any instant after its start, possibly long after the client gave up.
//!   For linearizability its end is +infinity and it may also be omitted altogether. An
//!   unknown get observed nothing, so it is dropped. An operation that was invoked but never
//!   completed (its future was dropped, e.g. by `tokio::time::timeout`) counts as unknown.
//! - [`OpResult::Failed`]: a definite refusal (an error reply from the server, or a request
//!   rejected locally): the operation did NOT take effect and is dropped. A read that returns
//!   a value only a failed put wrote is therefore a violation.
//!
//! # Checking
//!
//! Linearizability is local (Herlihy & Wing) and keys are independent registers, so the
//! history is split by key (P-compositionality) and each key is checked alone, as a register
//! whose initial value is `None` (or the value given in [`CheckOptions::initial`]):
//! `put(v)` sets `Some(v)`; `delete` sets `None` and must report `existed` exactly when the
//! value was `Some`; `get` must return the current value.
//!
//! **Conditional writes.** `put_if(v)` / `delete_if(v)` (and `put_if_absent`) change the
//! register only in the state they expect: an applied one is linearized where the state is
//! the one that had version `v` (absent), a conflict where it is not (and, if the conflict
//! reported the current version, is that one). Versions are mapped to states through what
//! the history shows: every get with a version ([`OpOutcome::GetVersioned`]) and every
//! applied conditional put tie a version to a value, so **each write must write a distinct
//! value** (as [`super::load::CasCounter`] does) and a conditional write must expect a version
//! some get or applied conditional put of the history returned; one version seen with two
//! values is a violation of its own. Unknown conditional writes are tried only where their
//! condition holds, and are never interchangeable with one another.
//!
//! Each key is checked with the Wing–Gong search with Lowe's memoization, as in porcupine:
//! the call and return events of the key's operations are sorted by time (a call before a
//! return at the same instant, so touching intervals count as concurrent) into a doubly
//! linked list. A depth-first search walks the list from its head: every call met before the
//! first return is an operation that may be linearized next; if the register accepts it, the
//! operation's call and return are unlinked ("lifted") and the search restarts from the head.
//! Meeting a return means the operation it belongs to cannot be linearized before it
//! returned, so the search backtracks (re-linking the last lifted operation and trying the
//! next candidate). A cache of visited configurations (set of linearized operations,
//! register state) prunes everything already explored; sets are kept as 128-bit Zobrist
//! fingerprints and values are interned, so the state is a `u32`. The search succeeds once
//! every operation with a definite outcome is linearized: the unknown operations left are
//! linearized "after the end", which is the same as omitting them.
//!
//! A candidate that never changes the state and accepts the current one (a get of the
//! current value, a delete reporting a missing value as missing) is linearized at once, with
//! no alternative tried: moving it to the front of any linearization from there keeps the
//! linearization valid. This keeps many concurrent reads of the same value from multiplying
//! the configurations.
//!
//! Unknown writes are concurrent with everything after their start, so a naive search tries
//! every subset of them, at every point. They get special treatment, each step justified by
//! showing that some linearization of the restricted form exists whenever any does:
//!
//! - Only useful ones: in any linearization, an unknown write followed by another write (or
//!   by nothing), or by an observation that would have accepted the previous state as well,
//!   can be removed without changing what anybody observed. So an unknown write is only
//!   linearized when it changes the state and is followed at once by an observation (a
//!   definite get or delete) that accepts the new state but not the old one.
//! - An unknown put that alone wrote a value some get returned is in every linearization,
//!   before those gets: it is searched like a definite operation ending when the first of
//!   them returns.
//! - Interchangeable ones: two pending unknown deletes have the same future, and so do two
//!   pending unknown puts of values nobody read (only whether the value is `Some` can be
//!   observed). Within each such class only the earliest-invoked unused one is tried, and a
//!   configuration records how many of each class are used. A configuration with fewer used
//!   dominates one with more (an unused write may stay unused), and the cache prunes
//!   dominated configurations.
//!
//! Unknown writes are tried after the definite candidates. Even so, the depth-first order
//! often reaches a configuration first through a path that used unknown writes and later
//! through one that did not, re-exploring everything after it: harmless when the history is
//! linearizable (the search goes straight to a linearization), costly when the search must
//! be exhausted to prove a violation. A phased search, which defers every configuration
//! reached through an unknown write until all those with fewer unknown writes used are
//! explored, is the other way round. So when there are unknown writes, the two run in turns
//! with doubling budgets until one concludes. A check that visits
//! [`CheckOptions::max_configurations`] gives up with an inconclusive [`Violation`].
//!
//! Checking linearizability is NP-complete, and the cost grows quickly with the number of
//! operations concurrent on one key. In a debug build, 2,000 operations of 8 clients on one
//! key take some 15 ms when linearizable and under a second to prove a violation; with 16
//! clients on one key, up to a few seconds. Spread heavier load over more keys.
//!
//! # Reports
//!
//! A [`Violation`] names the key and explains where the search failed, as porcupine does with
//! the longest linearizable prefix: the deepest configuration reached (most operations that
//! must take effect linearized), the register's value there, the operation that cannot be
//! linearized before it returned, the operations pending at that point, the last operations
//! of the prefix, who wrote the value a failing read returned, and the last acknowledged
//! writes before the failing operation. Times are in µs since the history was created.
//!
//! [`check_with_final`] appends, per key, the value read after the run as a get that starts
//! after every other operation on the key ended: a lost acknowledged write then shows up as a
//! violation on that read. [`lost_acknowledged_writes`] reports every such key.
//!
//! # Caveat: retries inside the client
//!
//! `KvStore` retries by itself after an unreachable node. A write whose first attempt was
//! applied but whose reply was lost may thus end with a server error (recorded as
//! [`OpResult::Failed`]), and a retried delete reports `existed == false` although its first
//! attempt deleted the value. Both are real deviations from linearizability of the client
//! API; a test that provokes lost replies should expect them or record such operations as
//! unknown.
#![allow(dead_code)] // each test binary uses part of it

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvstore::{Conditional, KvError, KvStore, PutOutcome, Versioned};
use ringkv_wire::ErrorKind;

/// The client id of the final reads appended by [`check_with_final`].
pub const FINAL_READ_CLIENT: usize = usize::MAX;

/// How many unknown operations a violation lists among the pending ones.
const MAX_UNKNOWN_SHOWN: usize = 10;
/// How many operations of the longest linearizable prefix a violation lists.
const PREFIX_SHOWN: usize = 8;

/// An operation on the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read `key`.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Write `value` under `key`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Write `value` under `key` if its version is `expected` (`None`: if it is absent).
    PutIf {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The version the key must have, or `None` for "absent".
        expected: Option<u64>,
    },
    /// Delete `key` if its version is `version`.
    DeleteIf {
        /// The key.
        key: Vec<u8>,
        /// The version the key must have.
        version: u64,
    },
}

impl Op {
    /// The key the operation is about.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Get { key }
            | Op::Put { key, .. }
            | Op::Delete { key }
            | Op::PutIf { key, .. }
            | Op::DeleteIf { key, .. } => key,
        }
    }

    /// The value the operation writes, if it writes one.
    fn written(&self) -> Option<&[u8]> {
        match self {
            Op::Put { value, .. } | Op::PutIf { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// What a successful operation observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// A get's answer.
    GetValue(Option<Vec<u8>>),
    /// A put was applied.
    PutDone,
    /// A delete was applied; whether the key existed.
    DeleteDone(bool),
    /// A get's answer with the key's version.
    GetVersioned(Option<(Vec<u8>, u64)>),
    /// A conditional write's condition held and it was applied: the key's new version (a
    /// put) or the version it had (a delete).
    Applied(u64),
    /// A conditional write's condition did not hold (nothing written): the key's version.
    Conflict(Option<u64>),
}

/// How an operation ended (see the module documentation for the semantics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// It took effect, once, between its start and its end.
    Ok(OpOutcome),
    /// It may or may not take effect, at any time after its start.
    Unknown,
    /// It definitely did not take effect.
    Failed,
}

/// The result of an operation that never completed.
static PENDING: OpResult = OpResult::Unknown;

/// The handle of a recorded operation (its index in the history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub usize);

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its handle ([`OpId`]`(usize::MAX)` for a final read).
    pub id: OpId,
    /// The client (task) that issued it ([`FINAL_READ_CLIENT`] for a final read).
    pub client: usize,
    /// The operation.
    pub op: Op,
    /// When it was invoked.
    pub start: Instant,
    /// When it completed; `None` while pending.
    pub end: Option<Instant>,
    /// How it completed; `None` while pending.
    pub result: Option<OpResult>,
}

impl Entry {
    /// How the operation ended, a pending one counting as [`OpResult::Unknown`].
    pub fn status(&self) -> &OpResult {
        self.result.as_ref().unwrap_or(&PENDING)
    }

    /// Whether it took effect with a known outcome.
    pub fn is_ok(&self) -> bool {
        matches!(self.result, Some(OpResult::Ok(_)))
    }

    /// Renders the entry on one line, with times in µs since `origin`.
    pub fn describe(&self, origin: Instant) -> String {
        let who = if self.client == FINAL_READ_CLIENT {
            "final read".to_string()
        } else {
            format!("#{} client {}", self.id.0, self.client)
        };
        let op = match &self.op {
            Op::Get { .. } => "get".to_string(),
            Op::Put { value, .. } => format!("put({})", show(value)),
            Op::Delete { .. } => "delete".to_string(),
            Op::PutIf {
                value,
                expected: Some(v),
                ..
            } => format!("put_if_version({}, v{v})", show(value)),
            Op::PutIf {
                value,
                expected: None,
                ..
            } => format!("put_if_absent({})", show(value)),
            Op::DeleteIf { version, .. } => format!("delete_if_version(v{version})"),
        };
        let result = match self.status() {
            OpResult::Ok(OpOutcome::GetValue(v)) => show_opt(v.as_deref()),
            OpResult::Ok(OpOutcome::GetVersioned(Some((v, version)))) => {
                format!("{} v{version}", show(v))
            }
            OpResult::Ok(OpOutcome::GetVersioned(None)) => "None".to_string(),
            OpResult::Ok(OpOutcome::Applied(v)) => format!("applied v{v}"),
            OpResult::Ok(OpOutcome::Conflict(Some(v))) => format!("conflict (v{v})"),
            OpResult::Ok(OpOutcome::Conflict(None)) => "conflict (absent)".to_string(),
            OpResult::Ok(OpOutcome::PutDone) => "ok".to_string(),
            OpResult::Ok(OpOutcome::DeleteDone(true)) => "existed".to_string(),
            OpResult::Ok(OpOutcome::DeleteDone(false)) => "did not exist".to_string(),
            OpResult::Unknown => "unknown".to_string(),
            OpResult::Failed => "failed".to_string(),
        };
        let start = micros(self.start, origin);
        let interval = match (self.status(), self.end) {
            (OpResult::Unknown, Some(end)) => {
                format!("[{start}µs, ∞) (gave up at {}µs)", micros(end, origin))
            }
            (_, Some(end)) => format!("[{start}µs, {}µs]", micros(end, origin)),
            (_, None) => format!("[{start}µs, ∞) (never completed)"),
        };
        format!("{who}: {op} -> {result} {interval}")
    }
}

/// Shorthand for hand-built histories: `get(key)`.
pub fn get(key: &[u8]) -> Op {
    Op::Get { key: key.to_vec() }
}

/// Shorthand for hand-built histories: `put(key, value)`.
pub fn put(key: &[u8], value: &[u8]) -> Op {
    Op::Put {
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

/// Shorthand for hand-built histories: `delete(key)`.
pub fn delete(key: &[u8]) -> Op {
    Op::Delete { key: key.to_vec() }
}

/// Shorthand for hand-built histories: `put_if_version(key, value, version)`, or
/// `put_if_absent(key, value)` with `None`.
pub fn put_if(key: &[u8], value: &[u8], expected: Option<u64>) -> Op {
    Op::PutIf {
        key: key.to_vec(),
        value: value.to_vec(),
        expected,
    }
}

/// Shorthand for hand-built histories: `delete_if_version(key, version)`.
pub fn delete_if(key: &[u8], version: u64) -> Op {
    Op::DeleteIf {
        key: key.to_vec(),
        version,
    }
}

/// The operations of a test run, shared by all its client tasks.
#[derive(Clone)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    origin: Instant,
    entries: Vec<Entry>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("ops", &self.len()).finish()
    }
}

impl History {
    /// An empty history; its creation instant is the origin of the reported times.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                origin: Instant::now(),
                entries: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking client task must not hide the history from the checker.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instant reported times are relative to.
    pub fn origin(&self) -> Instant {
        self.lock().origin
    }

    /// Records that `client` starts `op` now.
    pub fn invoke(&self, client: usize, op: Op) -> OpId {
        let mut inner = self.lock();
        let id = OpId(inner.entries.len());
        inner.entries.push(Entry {
            id,
            client,
            op,
            start: Instant::now(),
            end: None,
            result: None,
        });
        id
    }

    /// Records that operation `id` ended now with `result`.
    ///
    /// Panics if it was already completed or if `result` does not fit the operation.
    pub fn complete(&self, id: OpId, result: OpResult) {
        let end = Instant::now();
        let problem = {
            let mut inner = self.lock();
            let entry = inner.entries.get_mut(id.0).expect("unknown OpId");
            if entry.result.is_some() {
                Some(format!("{id:?} completed twice"))
            } else if !fits(&entry.op, &result) {
                Some(format!("{result:?} does not fit {:?}", entry.op))
            } else {
                entry.end = Some(end);
                entry.result = Some(result);
                None
            }
        };
        if let Some(problem) = problem {
            panic!("History::complete: {problem}");
        }
    }

    /// Records a whole operation with explicit times since [`History::origin`] (for
    /// hand-built and simulated histories).
    pub fn record(
        &self,
        client: usize,
        op: Op,
        start: Duration,
        end: Duration,
        result: OpResult,
    ) -> OpId {
        assert!(start <= end, "operation ends before it starts");
        assert!(fits(&op, &result), "{result:?} does not fit {op:?}");
        let mut inner = self.lock();
        let id = OpId(inner.entries.len());
        let origin = inner.origin;
        inner.entries.push(Entry {
            id,
            client,
            op,
            start: origin + start,
            end: Some(origin + end),
            result: Some(result),
        });
        id
    }

    /// A snapshot of the recorded operations, in invocation order.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }

    /// The number of recorded operations.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `result` is a possible result of `op`.
fn fits(op: &Op, result: &OpResult) -> bool {
    match result {
        OpResult::Unknown | OpResult::Failed => true,
        OpResult::Ok(outcome) => matches!(
            (op, outcome),
            (
                Op::Get { .. },
                OpOutcome::GetValue(_) | OpOutcome::GetVersioned(_)
            ) | (Op::Put { .. }, OpOutcome::PutDone)
                | (Op::Delete { .. }, OpOutcome::DeleteDone(_))
                | (
                    Op::PutIf { .. } | Op::DeleteIf { .. },
                    OpOutcome::Applied(_) | OpOutcome::Conflict(_)
                )
        ),
    }
}

/// How a client error counts: a server's error reply and a locally rejected request
/// ([`KvError::Server`], [`KvError::Invalid`]) are [`OpResult::Failed`], except a chain
/// write the head could not confirm ([`ErrorKind::Indeterminate`]); that one and everything
/// else (timeouts, transport and connection errors, ...) is [`OpResult::Unknown`].
pub fn classify_error(error: &KvError) -> OpResult {
    match error {
        KvError::Server {
            kind: ErrorKind::Indeterminate,
            ..
        } => OpResult::Unknown,
        KvError::Server { .. } | KvError::Invalid(_) => OpResult::Failed,
        _ => OpResult::Unknown,
    }
}

/// `store.get(key)`, recorded in `history` as an operation of `client`.
pub async fn record_get(
    history: &History,
    client: usize,
    store: &KvStore,
    key: &[u8],
) -> Result<Option<Vec<u8>>, KvError> {
    let id = history.invoke(client, get(key));
    let answer = store.get(key).await;
    history.complete(
        id,
        match &answer {
            Ok(value) => OpResult::Ok(OpOutcome::GetValue(value.clone())),
            Err(e) => classify_error(e),
        },
    );
    answer
}

/// `store.put(key, value)`, recorded in `history` as an operation of `client`.
pub async fn record_put(
    history: &History,
    client: usize,
    store: &KvStore,
    key: &[u8],
    value: &[u8],
) -> Result<PutOutcome, KvError> {
    let id = history.invoke(client, put(key, value));
    let answer = store.put(key, value).await;
    history.complete(
        id,
        match &answer {
            Ok(_) => OpResult::Ok(OpOutcome::PutDone),
            Err(e) => classify_error(e),
        },
    );
    answer
}

/// `store.delete(key)`, recorded in `history` as an operation of `client`.
pub async fn record_delete(
    history: &History,
    client: usize,
    store: &KvStore,
    key: &[u8],
) -> Result<bool, KvError> {
    let id = history.invoke(client, delete(key));
    let answer = store.delete(key).await;
    history.complete(
        id,
        match &answer {
            Ok(existed) => OpResult::Ok(OpOutcome::DeleteDone(*existed)),
            Err(e) => classify_error(e),
        },
    );
    answer
}

/// `store.get_versioned(key)`, recorded in `history` as an operation of `client`.
pub async fn record_get_versioned(
    history: &History,
    client: usize,
    store: &KvStore,
    key: &[u8],
) -> Result<Option<Versioned>, KvError> {
    let id = history.invoke(client, get(key));
    let answer = store.get_versioned(key).await;
    history.complete(
        id,
        match &answer {
            Ok(v) => OpResult::Ok(OpOutcome::GetVersioned(
                v.as_ref().map(|v| (v.value.clone(), v.version)),
            )),
            Err(e) => classify_error(e),
        },
    );
    answer
}

/// `store.put_if_version(key, value, version)` (or `put_if_absent` for `None`), recorded
/// in `history` as an operation of `client`.
pub async fn record_put_if(
    history: &History,
    client: usize,
    store: &KvStore,
    key: &[u8],
    value: &[u8],
    expected: Option<u64>,
) -> Result<Conditional, KvError> {
    let id = history.invoke(client, put_if(key, value, expected));
    let answer = match expected {
        Some(version) => store.put_if_version(key, value, version).await,
        None => store.put_if_absent(key, value).await,
    };
    history.complete(id, conditional_result(&answer));
    answer
}

/// `store.delete_if_version(key, version)`, recorded in `history` as an operation of
/// `client`.
pub async fn record_delete_if(
    history: &History,
    client: usize,
    store: &KvStore,
    key: &[u8],
    version: u64,
) -> Result<Conditional, KvError> {
    let id = history.invoke(client, delete_if(key, version));
    let answer = store.delete_if_version(key, version).await;
    history.complete(id, conditional_result(&answer));
    answer
}

fn conditional_result(answer: &Result<Conditional, KvError>) -> OpResult {
    match answer {
        Ok(Conditional::Applied { version }) => OpResult::Ok(OpOutcome::Applied(*version)),
        Ok(Conditional::Conflict { current }) => OpResult::Ok(OpOutcome::Conflict(*current)),
        Err(e) => classify_error(e),
    }
}

/// A value (or `None`: absent) per key: initial values, or values read after a run.
pub type Values = HashMap<Vec<u8>, Option<Vec<u8>>>;

/// The default of [`CheckOptions::max_configurations`].
pub const DEFAULT_MAX_CONFIGURATIONS: usize = 3_000_000;

/// Optional inputs of the check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The value of a key before the history (missing keys start as `None`).
    pub initial: Values,
    /// The value of a key read after the run, once every operation had ended; checked as a
    /// get that starts after every other operation on the key ended.
    pub final_reads: Values,
    /// The search of one key gives up after visiting this many configurations (a few
    /// seconds and a few hundred MB) and reports an inconclusive [`Violation`]. A history of
    /// a correct store passes long before; exhausting the search to prove a violation is
    /// what can take long, with many unknown operations.
    pub max_configurations: usize,
    /// How the search explores (the default is the right choice; the others are for
    /// testing the checker).
    pub strategy: Strategy,
}

/// How the search of a key explores (see `search` in the source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Depth-first and phased in turns, the first to conclude wins.
    #[default]
    Auto,
    /// Depth-first only: fastest to find a linearization.
    DepthFirst,
    /// Phased only: fastest to prove a violation when there are unknown writes.
    Phased,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            initial: HashMap::new(),
            final_reads: HashMap::new(),
            max_configurations: DEFAULT_MAX_CONFIGURATIONS,
            strategy: Strategy::Auto,
        }
    }
}

/// What a successful check covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Keys checked.
    pub keys: usize,
    /// Operations in the history (final reads not included).
    pub ops: usize,
    /// Operations that completed with an outcome.
    pub ok: usize,
    /// Operations with an unknown outcome (including never completed ones).
    pub unknown: usize,
    /// Operations definitely refused.
    pub failed: usize,
    /// Final reads checked.
    pub final_reads: usize,
    /// The most operations one key's search considered.
    pub max_key_ops: usize,
    /// The most configurations one key's search visited (its cache size).
    pub max_search_nodes: usize,
    /// Time the check took.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "linearizable: {} ops on {} keys ({} ok, {} unknown, {} failed), {} final reads; \
             largest key {} ops, largest search {} configurations; checked in {:?}",
            self.ops,
            self.keys,
            self.ok,
            self.unknown,
            self.failed,
            self.final_reads,
            self.max_key_ops,
            self.max_search_nodes,
            self.elapsed
        )
    }
}

/// A key whose operations are not linearizable, with the context where the search failed.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The key, lossily decoded as UTF-8.
    pub key: String,
    /// The key.
    pub key_bytes: Vec<u8>,
    /// True if the search gave up ([`CheckOptions::max_configurations`]) rather than
    /// proved that no linearization exists: the history may be linearizable after all.
    pub inconclusive: bool,
    /// Operations every linearization of the key holds: those with a definite outcome
    /// (including the final read) and unknown puts whose value was read.
    pub required_ops: usize,
    /// How many of them the longest linearizable prefix holds.
    pub prefix_len: usize,
    /// Configurations the search visited.
    pub configurations: usize,
    /// The register's value after that prefix.
    pub value_after_prefix: Option<Vec<u8>>,
    /// The operation that cannot be linearized after the prefix before it returned.
    pub failing_op: Entry,
    /// The acknowledged writes on the key that completed before the failing operation
    /// started and that no other such write follows in real time: the candidates for "the
    /// last acknowledged write" (for a final read: among all writes).
    pub last_acknowledged_writes: Vec<Entry>,
    /// Human-readable explanation, one line each.
    pub context: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.inconclusive {
            write!(
                f,
                "key {:?}: linearizability undecided, the search gave up (the longest \
                 linearizable prefix found has {} of the {} operations that must take effect)",
                self.key, self.prefix_len, self.required_ops
            )?;
        } else {
            write!(
                f,
                "key {:?} is not linearizable (the longest linearizable prefix has {} of the {} \
                 operations that must take effect)",
                self.key, self.prefix_len, self.required_ops
            )?;
        }
        for line in &self.context {
            write!(f, "\n  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Checks that `history` is linearizable, every key starting as `None`.
pub fn check(history: &History) -> Result<Report, Box<Violation>> {
    check_with(history, &CheckOptions::default())
}

/// Checks `history` plus, for every key of `final_reads`, the value read after the run (see
/// [`CheckOptions::final_reads`]): a lost acknowledged write is a violation.
pub fn check_with_final(history: &History, final_reads: &Values) -> Result<Report, Box<Violation>> {
    check_with(
        history,
        &CheckOptions {
            final_reads: final_reads.clone(),
            ..CheckOptions::default()
        },
    )
}

/// Checks `history` with `options`; the first violation (in key order) is returned.
pub fn check_with(history: &History, options: &CheckOptions) -> Result<Report, Box<Violation>> {
    let (report, mut violations) = check_all(history, options);
    if violations.is_empty() {
        Ok(report)
    } else {
        Err(Box::new(violations.swap_remove(0)))
    }
}

/// Checks every key of `history` with `options`; returns the report and every violation, in
/// key order.
pub fn check_all(history: &History, options: &CheckOptions) -> (Report, Vec<Violation>) {
    let began = Instant::now();
    let (origin, entries) = {
        let inner = history.lock();
        (inner.origin, inner.entries.clone())
    };
    let mut report = Report {
        ops: entries.len(),
        final_reads: options.final_reads.len(),
        ..Report::default()
    };
    let mut by_key: BTreeMap<Vec<u8>, Vec<Entry>> = BTreeMap::new();
    for entry in entries {
        match entry.status() {
            OpResult::Ok(_) => report.ok += 1,
            OpResult::Unknown => report.unknown += 1,
            OpResult::Failed => report.failed += 1,
        }
        by_key
            .entry(entry.op.key().to_vec())
            .or_default()
            .push(entry);
    }
    for key in options.final_reads.keys() {
        by_key.entry(key.clone()).or_default();
    }
    report.keys = by_key.len();
    let mut violations = Vec::new();
    for (key, mut entries) in by_key {
        if let Some(value) = options.final_reads.get(&key) {
            entries.push(final_read(&key, value.clone(), &entries, origin));
        }
        let initial = options.initial.get(&key).cloned().flatten();
        let register = Register::new(entries, initial, origin);
        report.max_key_ops = report.max_key_ops.max(register.ops.len());
        if let Some(clash) = register.clash(&key) {
            violations.push(clash);
            continue;
        }
        match search(
            &register.ops,
            register.initial,
            options.max_configurations,
            options.strategy,
        ) {
            Ok(nodes) => report.max_search_nodes = report.max_search_nodes.max(nodes),
            Err(stuck) => violations.push(register.violation(&key, &stuck)),
        }
    }
    report.elapsed = began.elapsed();
    (report, violations)
}

/// The keys whose value read after the run (`final_reads`) no linearization of `history`
/// allows, each with its explanation (which names the last acknowledged writes). A key
/// whose history is not linearizable anyway is reported too.
pub fn lost_acknowledged_writes(history: &History, final_reads: &Values) -> Vec<String> {
    let options = CheckOptions {
        final_reads: final_reads.clone(),
        ..CheckOptions::default()
    };
    check_all(history, &options)
        .1
        .iter()
        .map(Violation::to_string)
        .collect()
}

/// A get of `key` returning `value` that starts after every operation in `entries` started
/// and ended.
fn final_read(key: &[u8], value: Option<Vec<u8>>, entries: &[Entry], origin: Instant) -> Entry {
    let last = entries
        .iter()
        .flat_map(|e| [Some(e.start), e.end])
        .flatten()
        .max()
        .unwrap_or(origin);
    let start = last + Duration::from_nanos(1);
    Entry {
        id: OpId(usize::MAX),
        client: FINAL_READ_CLIENT,
        op: get(key),
        start,
        end: Some(start + Duration::from_nanos(1)),
        result: Some(OpResult::Ok(OpOutcome::GetValue(value))),
    }
}

/// The interned value `None`.
const NONE: u32 = 0;
/// A state no register is ever in: what a condition on a version nobody saw expects.
const NO_STATE: u32 = u32::MAX - 1;
/// "Some state other than `None`": the current version a conflict reported, when that
/// version's value is unknown.
const SOME_STATE: u32 = u32::MAX - 2;

/// An operation as the search sees it; values are interned. A state is the interned value
/// of the register; versions are mapped to the values they were seen with (each write
/// writes a distinct value, [`Register::new`]).
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A get that returned the value.
    Get(u32),
    /// A put of the value.
    Put(u32),
    /// A delete; whether the key existed if known.
    Delete(Option<bool>),
    /// A conditional write whose condition held (or, unknown, may hold): the state it
    /// expects, and the state it leaves (a value, or `NONE` for a delete).
    Cas { expect: u32, new: u32 },
    /// A conditional write whose condition did not hold: the state it expected, and the
    /// state it reported instead (`NONE`, a value, or [`SOME_STATE`]).
    Conflict { expect: u32, current: u32 },
}

#[derive(Debug, Clone, Copy)]
struct KeyOp {
    /// Index in [`Register::entries`].
    entry: usize,
    kind: Kind,
    /// Whether the outcome is known (otherwise it is an unknown write).
    definite: bool,
    /// Call time, ns since the origin.
    call: u64,
    /// Return time, ns since the origin; `u64::MAX` for unknown writes.
    ret: u64,
}

impl KeyOp {
    /// Whether the register in `state` gives the observed outcome.
    fn accepts(&self, state: u32) -> bool {
        match self.kind {
            Kind::Get(value) => state == value,
            Kind::Delete(Some(existed)) => (state != NONE) == existed,
            Kind::Put(_) | Kind::Delete(None) => true,
            Kind::Cas { expect, .. } => state == expect,
            Kind::Conflict { expect, current } => {
                state != expect
                    && match current {
                        SOME_STATE => state != NONE,
                        current => state == current,
                    }
            }
        }
    }

    /// The register's state after the operation.
    fn apply(&self, state: u32) -> u32 {
        match self.kind {
            Kind::Get(_) | Kind::Conflict { .. } => state,
            Kind::Put(value) => value,
            Kind::Delete(_) => NONE,
            Kind::Cas { new, .. } => new,
        }
    }

    /// Whether it is a definite operation whose outcome depends on the state.
    fn observes(&self) -> bool {
        self.definite
            && matches!(
                self.kind,
                Kind::Get(_) | Kind::Delete(Some(_)) | Kind::Cas { .. } | Kind::Conflict { .. }
            )
    }
}

/// One key's history, ready for the search.
struct Register {
    origin: Instant,
    /// Every operation on the key, including failed ones and the final read.
    entries: Vec<Entry>,
    /// The operations the search linearizes.
    ops: Vec<KeyOp>,
    /// Interned values: index 0 is `None`.
    values: Vec<Option<Vec<u8>>>,
    initial: u32,
    /// Two values seen with one version (a version names one write): the entries that show
    /// it.
    version_clash: Option<(usize, usize)>,
}

impl Register {
    fn new(entries: Vec<Entry>, initial: Option<Vec<u8>>, origin: Instant) -> Self {
        let mut ids: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut values: Vec<Option<Vec<u8>>> = vec![None];
        let mut intern = |value: Option<&Vec<u8>>| -> u32 {
            let Some(value) = value else { return NONE };
            *ids.entry(value.clone()).or_insert_with(|| {
                values.push(Some(value.clone()));
                u32::try_from(values.len() - 1).expect("too many values")
            })
        };
        let initial = intern(initial.as_ref());
        // Which value each version was seen with: a get's answer, an applied put's.
        let mut versions: HashMap<u64, (u32, usize)> = HashMap::new();
        let mut version_clash = None;
        for (i, e) in entries.iter().enumerate() {
            let seen = match (&e.op, e.status()) {
                (_, OpResult::Ok(OpOutcome::GetVersioned(Some((value, version))))) => {
                    Some((*version, intern(Some(value))))
                }
                (Op::PutIf { value, .. }, OpResult::Ok(OpOutcome::Applied(version))) => {
                    Some((*version, intern(Some(value))))
                }
                _ => None,
            };
            if let Some((version, value)) = seen {
                let (known, by) = *versions.entry(version).or_insert((value, i));
                if known != value && version_clash.is_none() {
                    version_clash = Some((by, i));
                }
            }
        }
        let state_of = |version: Option<u64>, unseen: u32| match version {
            None => NONE,
            Some(v) => versions.get(&v).map_or(unseen, |&(value, _)| value),
        };
        let mut ops = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let kind = match (&e.op, e.status()) {
                (_, OpResult::Failed) | (Op::Get { .. }, OpResult::Unknown) => continue,
                (Op::Get { .. }, OpResult::Ok(OpOutcome::GetValue(v))) => {
                    Kind::Get(intern(v.as_ref()))
                }
                (Op::Get { .. }, OpResult::Ok(OpOutcome::GetVersioned(v))) => {
                    Kind::Get(intern(v.as_ref().map(|(value, _)| value)))
                }
                (Op::Put { value, .. }, _) => Kind::Put(intern(Some(value))),
                (Op::Delete { .. }, OpResult::Ok(OpOutcome::DeleteDone(existed))) => {
                    Kind::Delete(Some(*existed))
                }
                (Op::Delete { .. }, _) => Kind::Delete(None),
                (op @ (Op::PutIf { .. } | Op::DeleteIf { .. }), result) => {
                    let (expected, new) = match op {
                        Op::PutIf {
                            value, expected, ..
                        } => (*expected, intern(Some(value))),
                        Op::DeleteIf { version, .. } => (Some(*version), NONE),
                        _ => unreachable!(),
                    };
                    let expect = state_of(expected, NO_STATE);
                    match result {
                        OpResult::Ok(OpOutcome::Conflict(current)) => Kind::Conflict {
                            expect,
                            current: state_of(*current, SOME_STATE),
                        },
                        _ => Kind::Cas { expect, new },
                    }
                }
                (op, result) => unreachable!("{result:?} does not fit {op:?}"),
            };
            let definite = e.is_ok();
            let call = nanos(e.start, origin);
            let ret = match e.end {
                Some(end) if definite => nanos(end, origin).max(call),
                _ => u64::MAX,
            };
            ops.push(KeyOp {
                entry: i,
                kind,
                definite,
                call,
                ret,
            });
        }
        Self {
            origin,
            entries,
            ops,
            values,
            initial,
            version_clash,
        }
    }

    /// The violation of two values seen with one version, if any.
    fn clash(&self, key: &[u8]) -> Option<Violation> {
        let (first, second) = self.version_clash?;
        let (first, second) = (&self.entries[first], &self.entries[second]);
        Some(Violation {
            key: String::from_utf8_lossy(key).into_owned(),
            key_bytes: key.to_vec(),
            inconclusive: false,
            required_ops: 0,
            prefix_len: 0,
            configurations: 0,
            value_after_prefix: None,
            failing_op: second.clone(),
            last_acknowledged_writes: vec![first.clone()],
            context: vec![
                "one version was seen with two values (a version names one write):".into(),
                format!("    {}", first.describe(self.origin)),
                format!("    {}", second.describe(self.origin)),
            ],
        })
    }

    fn value(&self, state: u32) -> Option<&[u8]> {
        self.values[state as usize].as_deref()
    }

    fn describe_op(&self, op: u32) -> String {
        self.entries[self.ops[op as usize].entry].describe(self.origin)
    }

    /// Explains where the search for this key failed.
    fn violation(&self, key: &[u8], stuck: &Stuck) -> Violation {
        let failing = self.ops[stuck.op as usize];
        let failing_op = self.entries[failing.entry].clone();
        let mut context = Vec::new();
        if stuck.gave_up {
            context.push(format!(
                "the search gave up after {} configurations (CheckOptions::max_configurations); \
                 this is the deepest point it reached",
                stuck.visited
            ));
        }
        context.push(format!(
            "value after that prefix: {}",
            show_opt(self.value(stuck.state))
        ));
        context.push(format!(
            "{}: {}",
            if stuck.gave_up {
                "the next operation that must be linearized before it returns"
            } else {
                "cannot be linearized before it returned"
            },
            failing_op.describe(self.origin)
        ));
        match failing.kind {
            Kind::Get(value) => context.push(self.writers_of(value)),
            Kind::Delete(Some(existed)) => context.push(format!(
                "the delete reported existed={existed}, which needs the value to be {}",
                if existed { "Some" } else { "None" }
            )),
            _ => {}
        }

        // The acknowledged writes that completed before the failing operation started, and
        // among them those that no other one follows in real time.
        let before: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.is_ok() && !matches!(e.op, Op::Get { .. }))
            .filter(|e| e.end.is_some_and(|end| end < failing_op.start))
            .collect();
        let last_start = before.iter().map(|e| e.start).max();
        let last_writes: Vec<Entry> = before
            .iter()
            .filter(|e| last_start.is_some_and(|last| e.end.is_some_and(|end| end >= last)))
            .map(|&e| e.clone())
            .collect();
        if last_writes.is_empty() {
            context.push("no acknowledged write completed before it started".to_string());
        } else {
            context.push("last acknowledged write(s) completed before it started:".to_string());
            for e in &last_writes {
                context.push(format!("    {}", e.describe(self.origin)));
            }
        }

        if stuck.prefix_tail.is_empty() {
            context.push("the linearizable prefix is empty".to_string());
        } else {
            context.push(format!(
                "last {} ops of the prefix, in linearization order:",
                stuck.prefix_tail.len()
            ));
            for &op in &stuck.prefix_tail {
                context.push(format!("    {}", self.describe_op(op)));
            }
        }

        let mut pending = stuck.window.clone();
        pending.sort_by_key(|&op| (self.ops[op as usize].call, op));
        let unknown = pending
            .iter()
            .filter(|&&op| !self.ops[op as usize].definite)
            .count();
        context.push(format!(
            "ops that could be linearized next{}, {} definite and {} unknown:",
            if stuck.gave_up {
                ""
            } else {
                " (none leads to a linearization)"
            },
            pending.len() - unknown,
            unknown
        ));
        let mut shown_unknown = 0;
        for &op in &pending {
            if !self.ops[op as usize].definite {
                shown_unknown += 1;
                if shown_unknown > MAX_UNKNOWN_SHOWN {
                    continue;
                }
            }
            context.push(format!("    {}", self.describe_op(op)));
        }
        if shown_unknown > MAX_UNKNOWN_SHOWN {
            context.push(format!(
                "    ... and {} more unknown ops",
                shown_unknown - MAX_UNKNOWN_SHOWN
            ));
        }

        Violation {
            key: String::from_utf8_lossy(key).into_owned(),
            key_bytes: key.to_vec(),
            inconclusive: stuck.gave_up,
            required_ops: stuck.required,
            prefix_len: stuck.done,
            configurations: stuck.visited,
            value_after_prefix: self.value(stuck.state).map(<[u8]>::to_vec),
            failing_op,
            last_acknowledged_writes: last_writes,
            context,
        }
    }

    /// Who wrote the value `value` (interned) that a failing get returned.
    fn writers_of(&self, value: u32) -> String {
        let Some(bytes) = self.value(value) else {
            return if self.initial == NONE {
                "None is the value initially and after a delete".to_string()
            } else {
                "None is the value after a delete".to_string()
            };
        };
        let writers: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.op.written() == Some(bytes))
            .map(|e| e.describe(self.origin))
            .collect();
        let initial = if value == self.initial {
            " (it is the initial value)"
        } else {
            ""
        };
        if writers.is_empty() {
            format!("{} was never written{initial}", show(bytes))
        } else {
            format!(
                "{} was written by{initial}: {}",
                show(bytes),
                writers.join("; ")
            )
        }
    }
}

/// Where a failed search got furthest (or where it stood when it gave up).
#[derive(Debug, Clone)]
struct Stuck {
    /// Whether the search gave up (configuration budget) instead of exhausting every
    /// possibility.
    gave_up: bool,
    /// Configurations visited.
    visited: usize,
    /// Operations every linearization must hold.
    required: usize,
    /// How many of them the deepest configuration held.
    done: usize,
    /// The register's state there.
    state: u32,
    /// The operation whose return the search could not pass.
    op: u32,
    /// The last operations of the prefix, in linearization order.
    prefix_tail: Vec<u32>,
    /// The operations that could be linearized next.
    window: Vec<u32>,
}

/// How the search uses an operation (see [`roles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Every linearization holds it: an operation with a known outcome, or an unknown put
    /// whose value was read (see [`roles`]).
    Required,
    /// An unknown write interchangeable with the others of its class ([`UNREAD_PUTS`] or
    /// [`DELETES`]).
    Class(usize),
    /// Another unknown write.
    Other,
}

/// The class of unknown puts of values no get returned.
const UNREAD_PUTS: usize = 0;
/// The class of unknown deletes.
const DELETES: usize = 1;

/// The operations as the search sees them, and the [`Role`] of each.
///
/// - An unknown put that is the only writer of a value some get returned (and not the
///   initial value) is in every linearization, before those gets: it becomes a required
///   operation that returns when the first of them returns.
/// - Unknown writes that were both invoked (so both are pending forever) and have the same
///   effect on everything observable are interchangeable: if a linearization uses one invoked
///   later, swapping in an unused one invoked earlier gives a linearization too. So within a
///   class the used ones can be taken to be the first ones by call time: the search only
///   tries the first unused one, and a configuration only needs how many are used. Unknown
///   deletes form a class, and so do unknown puts of values that no get returned (only
///   whether the value is `Some` is observable, by a delete).
fn roles(ops: &[KeyOp], initial: u32) -> (Vec<KeyOp>, Vec<Role>) {
    let values = ops
        .iter()
        .map(|op| match op.kind {
            Kind::Get(v) | Kind::Put(v) | Kind::Cas { new: v, .. } => v as usize + 1,
            Kind::Delete(_) | Kind::Conflict { .. } => 0,
        })
        .max()
        .unwrap_or(0)
        .max(initial as usize + 1);
    let mut first_read_return: Vec<Option<u64>> = vec![None; values];
    let mut writers = vec![0u32; values];
    for op in ops {
        match op.kind {
            Kind::Get(v) if op.definite => {
                let first = &mut first_read_return[v as usize];
                *first = Some(first.map_or(op.ret, |r| r.min(op.ret)));
            }
            Kind::Put(v) | Kind::Cas { new: v, .. } if v != NONE => writers[v as usize] += 1,
            _ => {}
        }
    }
    let mut effective = ops.to_vec();
    let roles = effective
        .iter_mut()
        .map(|op| match op.kind {
            _ if op.definite => Role::Required,
            Kind::Delete(_) => Role::Class(DELETES),
            Kind::Put(v) => match first_read_return[v as usize] {
                None => Role::Class(UNREAD_PUTS),
                Some(read) if writers[v as usize] == 1 && v != initial => {
                    op.ret = read.max(op.call);
                    Role::Required
                }
                Some(_) => Role::Other,
            },
            // Conditional writes are not interchangeable: each expects its own state.
            Kind::Cas { new, .. } => match first_read_return.get(new as usize).copied().flatten() {
                Some(read) if new != NONE && writers[new as usize] == 1 && new != initial => {
                    op.ret = read.max(op.call);
                    Role::Required
                }
                _ => Role::Other,
            },
            Kind::Get(_) => unreachable!("unknown gets are dropped"),
            Kind::Conflict { .. } => unreachable!("a conflict is a definite outcome"),
        })
        .collect();
    (effective, roles)
}

/// "No constraint" on the next operation of a configuration.
const FREE: u32 = u32::MAX;

/// The part of a search configuration that is not the linearized set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Config {
    /// The register's state.
    state: u32,
    /// [`FREE`], or right after an unknown write, the state before it: the next operation
    /// must then be an observation that accepts the current state and not that one
    /// (otherwise the unknown write was useless).
    constraint: u32,
    /// How many unknown writes of each class are used.
    used: [u32; 2],
}

impl Config {
    /// Whether everything that can be linearized from `other` (with the same linearized
    /// set) can be from `self`: the same state and constraint, and no more unknown writes
    /// used (an unused one may always stay unused).
    fn dominates(&self, other: &Config) -> bool {
        self.state == other.state
            && self.constraint == other.constraint
            && self.used[0] <= other.used[0]
            && self.used[1] <= other.used[1]
    }
}

/// Whether `op` can be linearized next from `config`, and the state and constraint after
/// it. For an unknown write, `observed_next` tells whether some observation that accepts
/// the new state but not the old one can be linearized right after it.
fn step(
    op: &KeyOp,
    required: bool,
    config: &Config,
    observed_next: impl FnOnce(u32) -> bool,
) -> Option<(u32, u32)> {
    let Config {
        state, constraint, ..
    } = *config;
    if required {
        let allowed = constraint == FREE || (op.observes() && !op.accepts(constraint));
        (allowed && op.accepts(state)).then(|| (op.apply(state), FREE))
    } else {
        let new_state = op.apply(state);
        (constraint == FREE && op.accepts(state) && new_state != state && observed_next(new_state))
            .then_some((new_state, state))
    }
}

/// A configuration in the cache: the second half of the linearized set's fingerprint (the
/// first half is in the cache key), and the rest.
struct Visited {
    fingerprint: u64,
    config: Config,
    /// The next configuration with the same key, or `u32::MAX`.
    next: u32,
}

/// A hasher for keys that are already hashes.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Visited configurations: chains of entries by hash of (linearized set, state), all in one
/// vector (a few dozen bytes per configuration).
#[derive(Default)]
struct Cache {
    heads: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    entries: Vec<Visited>,
}

impl Cache {
    /// Adds the configuration; false if it, or one that dominates it, was there.
    fn remember(&mut self, fingerprint: [u64; 2], config: Config) -> bool {
        let key = fingerprint[0] ^ splitmix64(u64::from(config.state));
        let head = self.heads.entry(key).or_insert(u32::MAX);
        let mut at = *head;
        while at != u32::MAX {
            let v = &self.entries[at as usize];
            if v.fingerprint == fingerprint[1] && v.config.dominates(&config) {
                return false;
            }
            at = v.next;
        }
        self.entries.push(Visited {
            fingerprint: fingerprint[1],
            config,
            next: *head,
        });
        *head = u32::try_from(self.entries.len() - 1).expect("too many configurations");
        true
    }
}

/// Where the search is in the candidates of a configuration.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// At this node of the list of required operations.
    Required(usize),
    /// At the unknown writes invoked before `limit`, the time of the first return in the
    /// list: `index` 0 and 1 are the first unused writes of the classes, the others index
    /// the other unknown writes.
    Unknown { index: usize, limit: u64 },
}

/// A frame of the search: the choice made, and the configuration before it.
struct Frame {
    choice: Cursor,
    op: u32,
    config: Config,
    max_node: usize,
    /// Whether it was the only choice tried (see [`Search::forced`]).
    forced: bool,
}

/// What [`Search::try_linearize`] did.
enum Tried {
    /// The operation cannot come next (or that configuration was explored): try the next
    /// candidate.
    Rejected,
    /// The search moved on to the new configuration.
    Moved,
    /// Every required operation is linearized.
    Complete,
}

/// A configuration reached by using an unknown write, explored later (phased search).
struct Deferred {
    linearized: Vec<u64>,
    /// The first node of the list, and the last node of a linearized operation.
    frontier: usize,
    max_node: usize,
    fingerprint: [u64; 2],
    config: Config,
    done: usize,
    prefix_tail: Vec<u32>,
}

/// The search over one key's operations (see [`search`]).
struct Search {
    ops: Vec<KeyOp>,
    roles: Vec<Role>,
    required_total: usize,
    /// The class writes by call time.
    classes: [Vec<u32>; 2],
    /// The other unknown writes by call time.
    others: Vec<u32>,
    /// Whether configurations reached by an unknown write are deferred (see [`search`]).
    phased: bool,

    // The doubly linked list of required events: node 0 is the head, then the events sorted
    // by time (calls before returns at the same instant), then the tail.
    node_op: Vec<u32>,
    node_time: Vec<u64>,
    is_call: Vec<bool>,
    /// The return node of a call node.
    partner: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,

    /// Zobrist values of the operations.
    zobrist: Vec<[u64; 2]>,
    /// The linearized operations (a bitset).
    linearized: Vec<u64>,
    /// The last node (in time order) of a linearized required operation: the list is
    /// untouched after it.
    max_node: usize,
    /// The fingerprint of the linearized set, without the class writes.
    fingerprint: [u64; 2],
    config: Config,
    /// Required operations linearized.
    done: usize,
    cursor: Cursor,
    /// Whether the configuration was just reached (and not yet checked for a forced move).
    fresh: bool,
    stack: Vec<Frame>,
    /// The linearization before the root of the current depth-first search.
    base_prefix: Vec<u32>,
    cache: Cache,
    visited: usize,
    /// Deferred configurations, by the number of unknown writes they used.
    deferred: Vec<Vec<Deferred>>,
    best: Option<Stuck>,
}

const HEAD: usize = 0;

impl Search {
    fn new(ops: Vec<KeyOp>, roles: Vec<Role>, initial: u32, phased: bool) -> Self {
        let n = ops.len();
        let required_total = roles.iter().filter(|&&r| r == Role::Required).count();
        let mut events: Vec<(u64, bool, u32)> = Vec::with_capacity(2 * required_total);
        let mut classes: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        let mut others: Vec<u32> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let i = u32::try_from(i).expect("too many operations");
            match roles[i as usize] {
                Role::Required => {
                    events.push((op.call, false, i));
                    events.push((op.ret, true, i));
                }
                Role::Class(class) => classes[class].push(i),
                Role::Other => others.push(i),
            }
        }
        events.sort_unstable();
        for list in classes.iter_mut().chain([&mut others]) {
            list.sort_by_key(|&i| (ops[i as usize].call, i));
        }
        let m = events.len();
        let mut node_op = vec![u32::MAX; m + 2];
        let mut node_time = vec![u64::MAX; m + 2];
        let mut is_call = vec![false; m + 2];
        let mut partner = vec![0usize; m + 2];
        let mut call_node = vec![0usize; n];
        for (pos, &(time, is_return, op)) in events.iter().enumerate() {
            let node = pos + 1;
            node_op[node] = op;
            node_time[node] = time;
            if is_return {
                partner[call_node[op as usize]] = node;
            } else {
                is_call[node] = true;
                call_node[op as usize] = node;
            }
        }
        let tail = m + 1;
        let mut search = Self {
            ops,
            roles,
            required_total,
            classes,
            others,
            phased,
            node_op,
            node_time,
            is_call,
            partner,
            next: (1..=tail + 1).collect(),
            prev: (0..=tail).map(|i| i.saturating_sub(1)).collect(),
            zobrist: (0..n as u64)
                .map(|i| [splitmix64(2 * i + 1), splitmix64(2 * i + 2)])
                .collect(),
            linearized: vec![0; n.div_ceil(64)],
            max_node: 0,
            fingerprint: [0, 0],
            config: Config {
                state: initial,
                constraint: FREE,
                used: [0, 0],
            },
            done: 0,
            cursor: Cursor::Required(1),
            fresh: true,
            stack: Vec::new(),
            base_prefix: Vec::new(),
            cache: Cache::default(),
            visited: 0,
            deferred: Vec::new(),
            best: None,
        };
        search.cursor = Cursor::Required(search.next[HEAD]);
        search
    }

    /// Whether operation `i` is linearized.
    fn is_linearized(&self, i: usize) -> bool {
        self.linearized[i / 64] & (1 << (i % 64)) != 0
    }

    /// Adds `i` to the linearized set, or removes it.
    fn toggle(&mut self, i: usize) {
        self.linearized[i / 64] ^= 1 << (i % 64);
        if !matches!(self.roles[i], Role::Class(_)) {
            self.fingerprint[0] ^= self.zobrist[i][0];
            self.fingerprint[1] ^= self.zobrist[i][1];
        }
    }

    /// Unlinks the call `node` and its return.
    fn lift(&mut self, node: usize) {
        for lifted in [node, self.partner[node]] {
            self.next[self.prev[lifted]] = self.next[lifted];
            self.prev[self.next[lifted]] = self.prev[lifted];
        }
    }

    /// Relinks the call `node` and its return (the reverse of [`Search::lift`]).
    fn unlift(&mut self, node: usize) {
        for lifted in [self.partner[node], node] {
            self.next[self.prev[lifted]] = lifted;
            self.prev[self.next[lifted]] = lifted;
        }
    }

    /// The first return in the list (there is one while required operations are left).
    fn first_return(&self) -> usize {
        let mut node = self.next[HEAD];
        while self.is_call[node] {
            node = self.next[node];
        }
        node
    }

    /// Whether some required call before the first return accepts `new_state` but not the
    /// current state: it can observe an unknown write that makes the state `new_state`.
    fn observed_next(&self, new_state: u32) -> bool {
        let mut node = self.next[HEAD];
        while self.is_call[node] {
            let other = &self.ops[self.node_op[node] as usize];
            if other.observes() && other.accepts(new_state) && !other.accepts(self.config.state) {
                return true;
            }
            node = self.next[node];
        }
        false
    }

    /// A candidate that accepts the current state and never changes any state (a get of the
    /// current value, a delete that reports a missing value as missing): it may as well be
    /// linearized right now, and nothing else needs to be tried here. Indeed, in a
    /// linearization from here that puts it later, moving it to the front keeps every
    /// outcome (no state changes) and real-time order (it is a candidate); the unknown
    /// writes can be normalized again afterwards. (A put of the current value does not
    /// qualify: where it was, it may have changed the state.)
    fn forced(&self) -> Option<usize> {
        if self.config.constraint != FREE {
            return None;
        }
        let state = self.config.state;
        let mut node = self.next[HEAD];
        while self.is_call[node] {
            let op = &self.ops[self.node_op[node] as usize];
            let read_only = matches!(
                op.kind,
                Kind::Get(_) | Kind::Delete(Some(false)) | Kind::Conflict { .. }
            );
            if op.definite && read_only && op.accepts(state) {
                return Some(node);
            }
            node = self.next[node];
        }
        None
    }

    /// The last operations of the current linearization.
    fn prefix_tail(&self) -> Vec<u32> {
        let mut tail: Vec<u32> = self.base_prefix.clone();
        tail.extend(self.stack.iter().map(|f| f.op));
        let from = tail.len().saturating_sub(PREFIX_SHOWN);
        tail.split_off(from)
    }

    /// Where the search stands: the first return cannot be passed.
    fn snapshot(&self, gave_up: bool) -> Stuck {
        let first_return = self.first_return();
        let limit = self.node_time[first_return];
        let mut window = Vec::new();
        let mut node = self.next[HEAD];
        while node != first_return {
            window.push(self.node_op[node]);
            node = self.next[node];
        }
        for (c, class) in self.classes.iter().enumerate() {
            window.extend(class.get(self.config.used[c] as usize));
        }
        window.extend(
            self.others
                .iter()
                .filter(|&&o| !self.is_linearized(o as usize)),
        );
        window.retain(|&o| self.ops[o as usize].call <= limit);
        Stuck {
            gave_up,
            visited: self.visited,
            required: self.required_total,
            done: self.done,
            state: self.config.state,
            op: self.node_op[first_return],
            prefix_tail: self.prefix_tail(),
            window,
        }
    }

    /// Starts a depth-first search from the deferred configuration with the fewest unknown
    /// writes used; false if there is none.
    fn resume_deferred(&mut self) -> bool {
        let Some(d) = self.deferred.iter_mut().find_map(Vec::pop) else {
            return false;
        };
        // Rebuild the list without the linearized required operations. Before the frontier
        // every operation is linearized; after both lists' last linearized node, the current
        // list and the new one are the same.
        let end = self.max_node.max(d.max_node) + 1;
        self.linearized = d.linearized;
        self.max_node = d.max_node;
        let mut last = HEAD;
        for node in d.frontier..end {
            if !self.is_linearized(self.node_op[node] as usize) {
                self.next[last] = node;
                self.prev[node] = last;
                last = node;
            }
        }
        self.next[last] = end;
        self.prev[end] = last;
        self.fingerprint = d.fingerprint;
        self.config = d.config;
        self.done = d.done;
        self.base_prefix = d.prefix_tail;
        self.cursor = Cursor::Required(self.next[HEAD]);
        self.fresh = true;
        true
    }

    /// Runs until a linearization is found (`Ok` with the configurations visited), the
    /// search is exhausted, or `budget` configurations were visited (`Err`). Can be called
    /// again after giving up, with a larger budget.
    fn run(&mut self, budget: usize) -> Result<usize, Stuck> {
        if self.required_total == 0 {
            return Ok(0);
        }
        loop {
            if self.visited >= budget {
                let mut stuck = match &self.best {
                    Some(best) => best.clone(),
                    None => self.snapshot(true),
                };
                stuck.gave_up = true;
                stuck.visited = self.visited;
                return Err(stuck);
            }
            if std::mem::take(&mut self.fresh) {
                if let Some(node) = self.forced() {
                    self.cursor = Cursor::Required(node);
                    match self.try_linearize(self.node_op[node] as usize) {
                        Tried::Complete => return Ok(self.visited),
                        Tried::Moved => {
                            self.stack.last_mut().expect("just pushed").forced = true;
                        }
                        // Explored already: so is this configuration.
                        Tried::Rejected => self.backtrack()?,
                    }
                    continue;
                }
            }
            // The candidate to try, or `None` when every candidate was tried.
            let candidate = match self.cursor {
                Cursor::Required(node) if self.is_call[node] => Some(self.node_op[node] as usize),
                Cursor::Required(node) => {
                    // The first return: on to the unknown writes invoked before it.
                    self.cursor = Cursor::Unknown {
                        index: 0,
                        limit: self.node_time[node],
                    };
                    continue;
                }
                Cursor::Unknown { index, limit } if index < 2 => {
                    let first_unused = self.classes[index].get(self.config.used[index] as usize);
                    match first_unused {
                        Some(&i) if self.ops[i as usize].call <= limit => Some(i as usize),
                        _ => {
                            self.cursor = Cursor::Unknown {
                                index: index + 1,
                                limit,
                            };
                            continue;
                        }
                    }
                }
                Cursor::Unknown { index, limit } => self
                    .others
                    .get(index - 2)
                    .map(|&i| i as usize)
                    .filter(|&i| self.ops[i].call <= limit),
            };
            let Some(i) = candidate else {
                self.backtrack()?;
                continue;
            };
            match self.try_linearize(i) {
                Tried::Complete => return Ok(self.visited),
                Tried::Moved => {}
                Tried::Rejected => {
                    self.cursor = match self.cursor {
                        Cursor::Required(node) => Cursor::Required(self.next[node]),
                        Cursor::Unknown { index, limit } => Cursor::Unknown {
                            index: index + 1,
                            limit,
                        },
                    }
                }
            }
        }
    }

    /// Tries to linearize operation `i` (the candidate at the cursor) next.
    fn try_linearize(&mut self, i: usize) -> Tried {
        let op = self.ops[i];
        let role = self.roles[i];
        if self.is_linearized(i) {
            return Tried::Rejected;
        }
        let Some((state, constraint)) = step(&op, role == Role::Required, &self.config, |s| {
            self.observed_next(s)
        }) else {
            return Tried::Rejected;
        };
        let mut new_config = Config {
            state,
            constraint,
            used: self.config.used,
        };
        if let Role::Class(class) = role {
            new_config.used[class] += 1;
        }
        self.toggle(i);
        if !self.cache.remember(self.fingerprint, new_config) {
            self.toggle(i);
            return Tried::Rejected;
        }
        self.visited += 1;
        match self.cursor {
            Cursor::Unknown { .. } if self.phased => {
                // Explored once every configuration with fewer unknown writes used is.
                let level = (new_config.used[0] + new_config.used[1]) as usize
                    + usize::from(role == Role::Other);
                if self.deferred.len() <= level {
                    self.deferred.resize_with(level + 1, Vec::new);
                }
                let mut prefix_tail = self.prefix_tail();
                prefix_tail.push(i as u32);
                self.deferred[level].push(Deferred {
                    linearized: self.linearized.clone(),
                    frontier: self.next[HEAD],
                    max_node: self.max_node,
                    fingerprint: self.fingerprint,
                    config: new_config,
                    done: self.done,
                    prefix_tail,
                });
                self.toggle(i);
                Tried::Rejected
            }
            cursor => {
                self.stack.push(Frame {
                    choice: cursor,
                    op: i as u32,
                    config: self.config,
                    max_node: self.max_node,
                    forced: false,
                });
                self.config = new_config;
                if let Cursor::Required(node) = cursor {
                    self.done += 1;
                    if self.done == self.required_total {
                        return Tried::Complete;
                    }
                    self.lift(node);
                    self.max_node = self.max_node.max(self.partner[node]);
                }
                self.cursor = Cursor::Required(self.next[HEAD]);
                self.fresh = true;
                Tried::Moved
            }
        }
    }

    /// Nothing can be linearized before the first return: undoes the last choice and moves
    /// to the next candidate, or resumes a deferred configuration; `Err` when everything
    /// was explored.
    fn backtrack(&mut self) -> Result<(), Stuck> {
        if self.best.as_ref().is_none_or(|b| self.done > b.done) {
            self.best = Some(self.snapshot(false));
        }
        loop {
            let Some(frame) = self.stack.pop() else {
                if self.resume_deferred() {
                    return Ok(());
                }
                let mut best = self.best.clone().expect("recorded above");
                best.visited = self.visited;
                return Err(best);
            };
            self.toggle(frame.op as usize);
            self.config = frame.config;
            self.max_node = frame.max_node;
            self.cursor = match frame.choice {
                Cursor::Required(node) => {
                    self.done -= 1;
                    self.unlift(node);
                    Cursor::Required(self.next[node])
                }
                Cursor::Unknown { index, limit } => Cursor::Unknown {
                    index: index + 1,
                    limit,
                },
            };
            if !frame.forced {
                return Ok(());
            }
            // A forced move failed: so did the configuration before it.
        }
    }
}

/// The Wing–Gong/Lowe search (see the module documentation) over one key's operations,
/// starting from `initial`: the number of configurations visited, or where the search got
/// furthest.
///
/// Required operations form the linked list of call and return events. Unknown writes are
/// kept out of it (their returns would all sit at its end): the candidates of a
/// configuration are the required calls before the first return, tried first, then the
/// unknown writes invoked before that return.
///
/// The cache stores, per 128-bit Zobrist fingerprint of the linearized set (the class
/// writes are counted in the configuration instead) and state, the configurations visited;
/// one that dominates the new one ([`Config::dominates`]) prunes it. A fingerprint
/// collision, which would wrongly prune a configuration, has a probability around 2^-128
/// per pair.
///
/// A plain depth-first search visits configurations in an order where dominance prunes
/// badly: a configuration is often first reached by a path that used an unknown write, and
/// later by one that did not, so everything after it is explored again. That costs little
/// when the history is linearizable (the search goes straight to a linearization) but a
/// lot when the search must be exhausted to prove a violation. A phased search defers the
/// configurations reached by using an unknown write until all those with fewer unknown
/// writes used were explored, so each is first visited with a minimal use of unknown
/// writes: it proves violations much faster, but goes less straight to a linearization.
/// With unknown writes, both run in turns with doubling budgets, and the first to conclude
/// wins: never more than about twice the work of the better one.
fn search(ops: &[KeyOp], initial: u32, budget: usize, strategy: Strategy) -> Result<usize, Stuck> {
    let (ops, roles) = roles(ops, initial);
    let jokers = roles.iter().any(|&r| r != Role::Required);
    match strategy {
        Strategy::Auto if jokers => {}
        Strategy::Auto | Strategy::DepthFirst => {
            return Search::new(ops, roles, initial, false).run(budget)
        }
        Strategy::Phased => return Search::new(ops, roles, initial, true).run(budget),
    }
    let mut searches = [
        Search::new(ops.clone(), roles.clone(), initial, false),
        Search::new(ops, roles, initial, true),
    ];
    let mut slice = 20_000;
    loop {
        let mut stuck: Vec<Stuck> = Vec::new();
        for i in 0..searches.len() {
            let spent: usize = searches.iter().map(|s| s.visited).sum();
            let search = &mut searches[i];
            let until = search.visited + slice.min(budget.saturating_sub(spent));
            match search.run(until) {
                Err(s) if s.gave_up => stuck.push(s),
                result => {
                    let others: usize =
                        searches.iter().map(|s| s.visited).sum::<usize>() - searches[i].visited;
                    return match result {
                        Ok(visited) => Ok(visited + others),
                        Err(mut s) => {
                            s.visited += others;
                            Err(s)
                        }
                    };
                }
            }
        }
        let spent: usize = searches.iter().map(|s| s.visited).sum();
        if spent >= budget {
            let mut deepest = stuck
                .into_iter()
                .max_by_key(|s| s.done)
                .expect("two searches");
            deepest.visited = spent;
            return Err(deepest);
        }
        slice *= 2;
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn nanos(t: Instant, origin: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX - 1)
}

fn micros(t: Instant, origin: Instant) -> u128 {
    t.saturating_duration_since(origin).as_micros()
}

/// A value for humans: lossy UTF-8, quoted, shortened.
fn show(value: &[u8]) -> String {
    const MAX: usize = 40;
    let text = String::from_utf8_lossy(value);
    if text.chars().count() > MAX {
        let short: String = text.chars().take(MAX).collect();
        format!("{short:?}... ({} bytes)", value.len())
    } else {
        format!("{text:?}")
    }
}

fn show_opt(value: Option<&[u8]>) -> String {
    value.map_or_else(|| "None".to_string(), show)
}
