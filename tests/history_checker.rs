//! Self-tests of the history recorder and linearizability checker of `tests/common/history.rs`
//! (no network): hand-built histories that are and are not linearizable, a simulated atomic
//! register whose random concurrent histories must pass (and fail once a read is corrupted),
//! and a performance case.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::history::*;
use kvstore::KvError;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use ringkv_wire::{ErrorKind, WireError};

const K: &[u8] = b"k";

const STRATEGIES: [Strategy; 3] = [Strategy::Auto, Strategy::DepthFirst, Strategy::Phased];

fn us(micros: u64) -> Duration {
    Duration::from_micros(micros)
}

fn ok_get(value: Option<&[u8]>) -> OpResult {
    OpResult::Ok(OpOutcome::GetValue(value.map(<[u8]>::to_vec)))
}

fn ok_put() -> OpResult {
    OpResult::Ok(OpOutcome::PutDone)
}

fn ok_delete(existed: bool) -> OpResult {
    OpResult::Ok(OpOutcome::DeleteDone(existed))
}

/// Records `op` of `client` over [start, end] µs.
fn rec(h: &History, client: usize, op: Op, start: u64, end: u64, result: OpResult) -> OpId {
    h.record(client, op, us(start), us(end), result)
}

fn finals(pairs: &[(&[u8], Option<&[u8]>)]) -> Values {
    pairs
        .iter()
        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
        .collect()
}

fn expect_ok(h: &History) -> Report {
    match check(h) {
        Ok(report) => report,
        Err(v) => panic!("expected linearizable, got:\n{v}"),
    }
}

fn expect_violation(h: &History) -> Box<Violation> {
    match check(h) {
        Ok(report) => panic!("expected a violation, got {report}"),
        Err(v) => {
            println!("{v}");
            v
        }
    }
}

// ---------------------------------------------------------------- linearizable histories

#[test]
fn empty_history_is_linearizable() {
    let report = expect_ok(&History::new());
    assert_eq!((report.keys, report.ops), (0, 0));
}

#[test]
fn concurrent_overlapping_puts_and_gets() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 100, ok_put());
    rec(&h, 1, put(K, b"b"), 10, 50, ok_put());
    rec(&h, 2, get(K), 5, 15, ok_get(None)); // before both puts took effect
    rec(&h, 2, get(K), 20, 30, ok_get(Some(b"a"))); // a, then b later
    rec(&h, 3, get(K), 25, 60, ok_get(Some(b"b")));
    rec(&h, 2, get(K), 110, 120, ok_get(Some(b"b")));
    let report = expect_ok(&h);
    assert_eq!((report.keys, report.ops, report.ok), (1, 6, 6));
}

#[test]
fn reads_may_see_either_order_of_concurrent_puts() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 100, ok_put());
    rec(&h, 1, put(K, b"b"), 0, 100, ok_put());
    rec(&h, 2, get(K), 110, 120, ok_get(Some(b"a")));
    expect_ok(&h);
}

#[test]
fn touching_intervals_are_concurrent() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 1, get(K), 10, 20, ok_get(None));
    expect_ok(&h);
}

#[test]
fn unknown_put_whose_effect_shows_up_later() {
    let h = History::new();
    rec(&h, 0, put(K, b"x"), 0, 10, OpResult::Unknown); // timed out
    rec(&h, 1, get(K), 20, 30, ok_get(None));
    rec(&h, 1, put(K, b"y"), 40, 50, ok_put());
    rec(&h, 1, get(K), 60, 70, ok_get(Some(b"y")));
    // The lost request finally lands, long after the client gave up.
    rec(&h, 2, get(K), 80, 90, ok_get(Some(b"x")));
    let report = expect_ok(&h);
    assert_eq!((report.ok, report.unknown), (4, 1));
    check_with_final(&h, &finals(&[(K, Some(b"x"))])).expect("x may be the final value");
}

#[test]
fn unknown_put_that_never_shows_up() {
    let h = History::new();
    rec(&h, 0, put(K, b"x"), 0, 10, OpResult::Unknown);
    rec(&h, 1, get(K), 20, 30, ok_get(None));
    rec(&h, 1, put(K, b"y"), 40, 50, ok_put());
    rec(&h, 1, get(K), 60, 70, ok_get(Some(b"y")));
    expect_ok(&h);
    check_with_final(&h, &finals(&[(K, Some(b"y"))])).expect("x may never take effect");
    // ... or it may take effect after the last read of the run.
    check_with_final(&h, &finals(&[(K, Some(b"x"))])).expect("x may land last");
}

#[test]
fn unknown_get_and_pending_ops_are_harmless() {
    let h = History::new();
    rec(&h, 0, get(K), 0, 10, OpResult::Unknown);
    rec(&h, 1, put(K, b"a"), 0, 5, ok_put());
    // Invoked for real but never completed (its future was dropped).
    h.invoke(2, put(K, b"p"));
    h.invoke(3, get(K));
    let report = check_with_final(&h, &finals(&[(K, Some(b"p"))])).expect("linearizable");
    assert_eq!((report.ok, report.unknown, report.final_reads), (1, 3, 1));
    check_with_final(&h, &finals(&[(K, Some(b"a"))])).expect("linearizable");
}

#[test]
fn unknown_delete_may_or_may_not_take_effect() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 1, delete(K), 20, 30, OpResult::Unknown);
    rec(&h, 2, get(K), 40, 50, ok_get(Some(b"a")));
    expect_ok(&h);
    check_with_final(&h, &finals(&[(K, Some(b"a"))])).expect("the delete lands never");
    check_with_final(&h, &finals(&[(K, None)])).expect("the delete lands after the get");
    // It lands now...
    rec(&h, 2, get(K), 60, 70, ok_get(None));
    expect_ok(&h);
    // ... and only once: it cannot also explain a value vanishing later.
    rec(&h, 0, put(K, b"b"), 80, 90, ok_put());
    rec(&h, 2, get(K), 100, 110, ok_get(None));
    let v = expect_violation(&h);
    assert_eq!(v.value_after_prefix.as_deref(), Some(&b"b"[..]));
}

#[test]
fn delete_existed_semantics() {
    let h = History::new();
    rec(&h, 0, delete(K), 0, 10, ok_delete(false));
    rec(&h, 0, put(K, b"a"), 20, 30, ok_put());
    rec(&h, 0, delete(K), 40, 50, ok_delete(true));
    rec(&h, 0, delete(K), 60, 70, ok_delete(false));
    rec(&h, 0, get(K), 80, 90, ok_get(None));
    // Two concurrent deletes of an existing value: exactly one saw it.
    rec(&h, 0, put(K, b"b"), 100, 110, ok_put());
    rec(&h, 1, delete(K), 120, 140, ok_delete(false));
    rec(&h, 2, delete(K), 125, 130, ok_delete(true));
    expect_ok(&h);
}

#[test]
fn failed_ops_did_not_happen() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 1, put(K, b"f"), 20, 30, OpResult::Failed);
    rec(&h, 1, delete(K), 35, 38, OpResult::Failed);
    rec(&h, 2, get(K), 40, 50, ok_get(Some(b"a")));
    let report = check_with_final(&h, &finals(&[(K, Some(b"a"))])).expect("linearizable");
    assert_eq!((report.ok, report.failed), (2, 2));
}

#[test]
fn initial_values() {
    let h = History::new();
    rec(&h, 0, get(K), 0, 10, ok_get(Some(b"seed")));
    rec(&h, 0, delete(K), 20, 30, ok_delete(true));
    let options = CheckOptions {
        initial: finals(&[(K, Some(b"seed"))]),
        ..CheckOptions::default()
    };
    check_with(&h, &options).expect("linearizable from the initial value");
    expect_violation(&h); // but not from None
}

#[test]
fn keys_are_independent() {
    let h = History::new();
    // Concurrent at the level of the store, sequential per key.
    rec(&h, 0, put(b"k1", b"a"), 0, 10, ok_put());
    rec(&h, 1, put(b"k2", b"b"), 0, 10, ok_put());
    rec(&h, 0, get(b"k1"), 20, 30, ok_get(Some(b"a")));
    rec(&h, 1, get(b"k2"), 20, 30, ok_get(Some(b"b")));
    rec(&h, 2, get(b"k3"), 20, 30, ok_get(None));
    let report = expect_ok(&h);
    assert_eq!(report.keys, 3);
}

// ------------------------------------------------------------ non-linearizable histories

#[test]
fn stale_read_after_completed_put() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 0, put(K, b"b"), 20, 30, ok_put());
    rec(&h, 1, get(K), 40, 50, ok_get(Some(b"a")));
    let v = expect_violation(&h);
    assert_eq!(v.key, "k");
    assert_eq!(v.failing_op.op, get(K));
    assert_eq!(v.value_after_prefix.as_deref(), Some(&b"b"[..]));
    assert_eq!(v.prefix_len, 2);
    let text = v.to_string();
    assert!(text.contains("key \"k\""), "{text}");
    assert!(text.contains("\"a\" was written by"), "{text}");
    assert!(text.contains("[40µs, 50µs]"), "{text}");
}

#[test]
fn read_of_a_value_never_written() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 1, get(K), 0, 50, ok_get(Some(b"zzz")));
    let v = expect_violation(&h);
    assert!(v.to_string().contains("\"zzz\" was never written"), "{v}");
}

#[test]
fn read_of_a_failed_put() {
    let h = History::new();
    rec(&h, 0, put(K, b"f"), 0, 10, OpResult::Failed);
    rec(&h, 1, get(K), 20, 30, ok_get(Some(b"f")));
    let v = expect_violation(&h);
    assert!(v.to_string().contains("put(\"f\") -> failed"), "{v}");
}

#[test]
fn delete_reporting_a_missing_value_as_existing() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 0, delete(K), 20, 30, ok_delete(true));
    rec(&h, 1, delete(K), 40, 50, ok_delete(true));
    let v = expect_violation(&h);
    assert_eq!(v.failing_op.op, delete(K));
    assert!(v.to_string().contains("existed=true"), "{v}");

    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 1, delete(K), 20, 30, ok_delete(false));
    expect_violation(&h);
}

#[test]
fn lost_acknowledged_write_detected_by_final_read() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 1, get(K), 12, 18, ok_get(Some(b"a")));
    rec(&h, 0, put(K, b"b"), 20, 30, ok_put());
    rec(&h, 1, put(b"other", b"o"), 20, 30, ok_put());
    expect_ok(&h);
    let reads = finals(&[(K, Some(b"a")), (b"other", Some(b"o"))]);
    let v = match check_with_final(&h, &reads) {
        Ok(report) => panic!("lost write not detected: {report}"),
        Err(v) => v,
    };
    println!("{v}");
    assert_eq!(v.key, "k");
    assert_eq!(v.failing_op.client, FINAL_READ_CLIENT);
    assert_eq!(v.last_acknowledged_writes.len(), 1);
    assert_eq!(v.last_acknowledged_writes[0].op, put(K, b"b"));
    assert!(v.to_string().contains("final read: get -> \"a\""), "{v}");

    let lost = lost_acknowledged_writes(&h, &reads);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(lost[0].contains("key \"k\""), "{}", lost[0]);
    assert!(lost[0].contains("put(\"b\") -> ok"), "{}", lost[0]);

    // A key that was written but reads back as missing, and one never written that has a
    // value, are lost/phantom too.
    let lost = lost_acknowledged_writes(&h, &finals(&[(b"other", None), (b"new", Some(b"z"))]));
    assert_eq!(lost.len(), 2, "{lost:?}");
    assert!(lost_acknowledged_writes(&h, &finals(&[(K, Some(b"b"))])).is_empty());
}

#[test]
fn sequential_gets_going_back_in_time() {
    let h = History::new();
    rec(&h, 0, put(K, b"a"), 0, 10, ok_put());
    rec(&h, 1, put(K, b"b"), 5, 100, ok_put());
    rec(&h, 2, get(K), 20, 30, ok_get(Some(b"b")));
    rec(&h, 2, get(K), 40, 50, ok_get(Some(b"a")));
    let v = expect_violation(&h);
    assert_eq!(v.failing_op.op, get(K));
    assert_eq!(
        v.failing_op.result,
        Some(ok_get(Some(b"a"))),
        "the second read is the culprit"
    );
}

#[test]
fn violation_names_the_right_key() {
    let h = History::new();
    for (i, key) in [&b"k1"[..], b"k2", b"k\xff3"].into_iter().enumerate() {
        rec(&h, i, put(key, b"a"), 0, 10, ok_put());
        rec(&h, i, get(key), 20, 30, ok_get(Some(b"a")));
    }
    rec(&h, 5, get(b"k\xff3"), 40, 50, ok_get(None));
    let v = expect_violation(&h);
    assert_eq!(v.key, "k\u{fffd}3");
    assert_eq!(v.key_bytes, b"k\xff3");
}

// ------------------------------------------------------------------------ recording

// ---------------------------------------------------------------- compare-and-set

fn ok_vget(value: Option<(&[u8], u64)>) -> OpResult {
    OpResult::Ok(OpOutcome::GetVersioned(value.map(|(v, n)| (v.to_vec(), n))))
}

fn applied(version: u64) -> OpResult {
    OpResult::Ok(OpOutcome::Applied(version))
}

fn conflict(current: Option<u64>) -> OpResult {
    OpResult::Ok(OpOutcome::Conflict(current))
}

#[test]
fn a_cas_counter_with_one_winner_per_version_is_linearizable() {
    let h = History::new();
    rec(&h, 0, put_if(K, b"1:a", None), 0, 10, applied(100));
    rec(&h, 1, put_if(K, b"1:b", None), 5, 15, conflict(Some(100)));
    rec(&h, 0, get(K), 20, 30, ok_vget(Some((b"1:a", 100))));
    rec(&h, 1, get(K), 20, 30, ok_vget(Some((b"1:a", 100))));
    // Both try version 100 at once: one wins, the other sees the winner's version.
    rec(&h, 0, put_if(K, b"2:a", Some(100)), 40, 60, applied(101));
    rec(
        &h,
        1,
        put_if(K, b"2:b", Some(100)),
        40,
        60,
        conflict(Some(101)),
    );
    rec(&h, 1, delete_if(K, 100), 70, 80, conflict(Some(101)));
    rec(&h, 1, delete_if(K, 101), 90, 100, applied(101));
    rec(&h, 0, get(K), 110, 120, ok_vget(None));
    expect_ok(&h);
}

#[test]
fn two_winners_of_one_version_are_a_violation() {
    let h = History::new();
    rec(&h, 0, put_if(K, b"1:a", None), 0, 10, applied(100));
    rec(&h, 0, put_if(K, b"2:a", Some(100)), 20, 30, applied(101));
    // One after the other, both expecting 100: the second cannot have held.
    rec(&h, 1, put_if(K, b"2:b", Some(100)), 40, 50, applied(102));
    let v = expect_violation(&h);
    assert_eq!(v.failing_op.op, put_if(K, b"2:b", Some(100)));
}

#[test]
fn a_conflict_while_the_condition_held_is_a_violation() {
    let h = History::new();
    rec(&h, 0, put_if(K, b"1:a", None), 0, 10, applied(100));
    // Nothing else ran: version 100 was current.
    rec(
        &h,
        1,
        put_if(K, b"2:b", Some(100)),
        20,
        30,
        conflict(Some(100)),
    );
    expect_violation(&h);
    let h = History::new();
    rec(&h, 1, put_if(K, b"1:b", None), 20, 30, conflict(None));
    expect_violation(&h);
}

#[test]
fn one_version_seen_with_two_values_is_a_violation() {
    let h = History::new();
    rec(&h, 0, put_if(K, b"1:a", None), 0, 10, applied(100));
    rec(&h, 1, get(K), 20, 30, ok_vget(Some((b"other", 100))));
    let v = expect_violation(&h);
    assert!(v.to_string().contains("two values"), "{v}");
}

#[test]
fn an_unknown_cas_counts_only_where_its_condition_held() {
    // The unknown increment took effect: its value is read later.
    let h = History::new();
    rec(&h, 0, put_if(K, b"1:a", None), 0, 10, applied(100));
    rec(
        &h,
        1,
        put_if(K, b"2:b", Some(100)),
        20,
        30,
        OpResult::Unknown,
    );
    rec(&h, 0, get(K), 40, 50, ok_vget(Some((b"2:b", 101))));
    rec(&h, 0, put_if(K, b"3:a", Some(101)), 60, 70, applied(102));
    expect_ok(&h);
    // An unknown one whose condition never held cannot be what a read returns.
    let h = History::new();
    rec(&h, 0, put_if(K, b"1:a", None), 0, 10, applied(100));
    rec(&h, 0, put_if(K, b"2:a", Some(100)), 20, 30, applied(101));
    rec(
        &h,
        1,
        put_if(K, b"2:b", Some(100)),
        40,
        50,
        OpResult::Unknown,
    );
    rec(&h, 0, get(K), 60, 70, ok_vget(Some((b"2:b", 102))));
    expect_violation(&h);
}

#[test]
fn plain_writes_and_conditional_ones_mix() {
    let h = History::new();
    rec(&h, 0, put(K, b"p"), 0, 10, ok_put());
    rec(&h, 1, get(K), 20, 30, ok_vget(Some((b"p", 7))));
    rec(&h, 0, put(K, b"q"), 40, 50, ok_put());
    // The plain put came between the read and the conditional write: a conflict.
    rec(&h, 1, put_if(K, b"r", Some(7)), 60, 70, conflict(Some(8)));
    rec(&h, 1, get(K), 80, 90, ok_vget(Some((b"q", 8))));
    expect_ok(&h);
    // Had it been applied, the plain put would have been lost.
    let h = History::new();
    rec(&h, 0, put(K, b"p"), 0, 10, ok_put());
    rec(&h, 1, get(K), 20, 30, ok_vget(Some((b"p", 7))));
    rec(&h, 0, put(K, b"q"), 40, 50, ok_put());
    rec(&h, 1, put_if(K, b"r", Some(7)), 60, 70, applied(9));
    expect_violation(&h);
}

#[test]
fn recording_from_many_tasks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let h = History::new();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for client in 0..8 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let key = format!("k{}", i % 3).into_bytes();
                    let value = format!("{client}-{i}").into_bytes();
                    let id = h.invoke(client, put(&key, &value));
                    tokio::task::yield_now().await;
                    h.complete(id, OpResult::Unknown);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    assert_eq!(h.len(), 400);
    let entries = h.entries();
    assert!(entries
        .iter()
        .all(|e| e.end.is_some_and(|end| end >= e.start)));
    assert!(entries.iter().enumerate().all(|(i, e)| e.id == OpId(i)));
    let report = expect_ok(&h);
    assert_eq!((report.ops, report.unknown, report.keys), (400, 400, 3));
}

#[test]
#[should_panic(expected = "does not fit")]
fn completing_with_a_mismatched_outcome_panics() {
    let h = History::new();
    let id = h.invoke(0, get(K));
    h.complete(id, ok_put());
}

#[test]
fn error_classification() {
    let server = KvError::Server {
        kind: ErrorKind::Storage,
        message: "disk on fire".into(),
    };
    assert_eq!(classify_error(&server), OpResult::Failed);
    assert_eq!(
        classify_error(&KvError::Invalid(WireError::EmptyKey)),
        OpResult::Failed
    );
    let timeout = KvError::Timeout {
        elapsed: Duration::from_secs(5),
        attempts: 3,
        last: "write-locked".into(),
    };
    assert_eq!(classify_error(&timeout), OpResult::Unknown);
    let transport = KvError::Transport(ringkv_transport::TransportError::Stream {
        addr: "127.0.0.1:1".into(),
        reason: "reset".into(),
    });
    assert_eq!(classify_error(&transport), OpResult::Unknown);
    assert_eq!(classify_error(&KvError::Disconnected), OpResult::Unknown);
}

// --------------------------------------------------------- simulated atomic register

/// One operation of a simulated run, before it is recorded.
#[derive(Clone)]
struct SimOp {
    client: usize,
    op: Op,
    start: u64,
    end: u64,
    result: OpResult,
}

/// Parameters of a simulated run.
struct Sim {
    clients: usize,
    ops_per_client: usize,
    keys: usize,
    /// Percent of operations that end unknown (half of them take effect, possibly long
    /// after the client gave up).
    unknown_pct: u32,
    /// Percent of operations that fail (and take no effect).
    failed_pct: u32,
}

/// Runs a correct atomic register (one per key): every operation takes effect at a random
/// instant inside its interval; returns the operations and the final value of every key.
fn simulate(sim: &Sim, seed: u64) -> (Vec<SimOp>, Values) {
    let mut rng = SmallRng::seed_from_u64(seed);
    // (linearization point, tie-breaker, index in ops) of the operations that take effect.
    let mut effects: Vec<(u64, u64, usize)> = Vec::new();
    let mut ops: Vec<SimOp> = Vec::new();
    for client in 0..sim.clients {
        let mut t = rng.random_range(0..50u64);
        for n in 0..sim.ops_per_client {
            let key = format!("key{}", rng.random_range(0..sim.keys)).into_bytes();
            let op = match rng.random_range(0..10) {
                0..=3 => get(&key),
                4..=7 => put(&key, format!("v{client}-{n}").as_bytes()),
                _ => delete(&key),
            };
            let start = t + rng.random_range(0..30u64);
            let end = start + rng.random_range(1..200u64);
            t = end;
            let roll = rng.random_range(0..100u32);
            let (result, effect_at) = if roll < sim.unknown_pct {
                let lands = rng.random_bool(0.5);
                let at = start + rng.random_range(0..(end - start) * 5 + 1);
                (OpResult::Unknown, lands.then_some(at))
            } else if roll < sim.unknown_pct + sim.failed_pct {
                (OpResult::Failed, None)
            } else {
                // Filled in below, once the register ran.
                (
                    OpResult::Ok(OpOutcome::PutDone),
                    Some(rng.random_range(start..=end)),
                )
            };
            if let Some(at) = effect_at {
                effects.push((at, rng.random(), ops.len()));
            }
            ops.push(SimOp {
                client,
                op,
                start,
                end,
                result,
            });
        }
    }
    effects.sort_unstable();
    let mut register: Values = HashMap::new();
    for (_, _, i) in effects {
        let sim_op = &mut ops[i];
        let value = register.entry(sim_op.op.key().to_vec()).or_default();
        let outcome = match &sim_op.op {
            Op::Get { .. } => OpOutcome::GetValue(value.clone()),
            Op::Put { value: v, .. } => {
                *value = Some(v.clone());
                OpOutcome::PutDone
            }
            Op::Delete { .. } => OpOutcome::DeleteDone(value.take().is_some()),
            Op::PutIf { .. } | Op::DeleteIf { .. } => unreachable!("not simulated"),
        };
        if sim_op.result != OpResult::Unknown {
            sim_op.result = OpResult::Ok(outcome);
        }
    }
    (ops, register)
}

/// Records the simulated operations in invocation order.
fn to_history(ops: &[SimOp]) -> History {
    let mut sorted: Vec<&SimOp> = ops.iter().collect();
    sorted.sort_by_key(|o| o.start);
    let h = History::new();
    for o in sorted {
        rec(&h, o.client, o.op.clone(), o.start, o.end, o.result.clone());
    }
    h
}

#[test]
fn random_correct_histories_are_accepted() {
    let sim = Sim {
        clients: 6,
        ops_per_client: 60,
        keys: 3,
        unknown_pct: 8,
        failed_pct: 4,
    };
    for seed in 0..40 {
        let (ops, final_values) = simulate(&sim, seed);
        let h = to_history(&ops);
        for strategy in STRATEGIES {
            let options = CheckOptions {
                final_reads: final_values.clone(),
                strategy,
                ..CheckOptions::default()
            };
            match check_with(&h, &options) {
                Ok(report) => assert_eq!(report.ops, 360),
                Err(v) => panic!("seed {seed}, {strategy:?}: correct history rejected:\n{v}"),
            }
        }
    }
}

#[test]
fn random_histories_with_a_corrupted_read_are_rejected() {
    let sim = Sim {
        clients: 6,
        ops_per_client: 60,
        keys: 3,
        unknown_pct: 8,
        failed_pct: 4,
    };
    let mut rng = SmallRng::seed_from_u64(99);
    for seed in 0..40 {
        let (mut ops, _) = simulate(&sim, seed);
        let reads: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i].result, OpResult::Ok(OpOutcome::GetValue(_))))
            .collect();
        let victim = reads[rng.random_range(0..reads.len())];
        let key = ops[victim].op.key().to_vec();
        // A value that was never current: never written, or written only by a failed put.
        let failed_value = ops.iter().find_map(|o| match (&o.op, &o.result) {
            (Op::Put { key: k, value }, OpResult::Failed) if *k == key => Some(value.clone()),
            _ => None,
        });
        let bogus = if seed % 2 == 0 {
            failed_value.unwrap_or_else(|| b"never-written".to_vec())
        } else {
            b"never-written".to_vec()
        };
        ops[victim].result = ok_get(Some(&bogus));
        let h = to_history(&ops);
        for strategy in STRATEGIES {
            let options = CheckOptions {
                strategy,
                ..CheckOptions::default()
            };
            match check_with(&h, &options) {
                Ok(report) => panic!(
                    "seed {seed}, {strategy:?}: corrupted read of op {victim} accepted: {report}"
                ),
                Err(v) => {
                    assert!(!v.inconclusive, "seed {seed}, {strategy:?}");
                    assert_eq!(v.key_bytes, key, "seed {seed}");
                    assert_eq!(
                        v.failing_op.result,
                        Some(ok_get(Some(&bogus))),
                        "seed {seed}"
                    );
                }
            }
        }
    }
}

#[test]
fn performance_one_key_2000_ops_8_clients() {
    let sim = Sim {
        clients: 8,
        ops_per_client: 250,
        keys: 1,
        unknown_pct: 2,
        failed_pct: 1,
    };
    let (ops, final_values) = simulate(&sim, 7);
    let h = to_history(&ops);
    let began = Instant::now();
    let report = check_with_final(&h, &final_values).unwrap_or_else(|v| panic!("{v}"));
    let took = began.elapsed();
    println!("{report}");
    println!("perf: 2,000 ops on one key from 8 clients checked in {took:?}");
    assert_eq!((report.keys, report.ops), (1, 2000));
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // And a rejection of the same size is found as fast.
    let mut ops = ops;
    let last_read = (0..ops.len())
        .rev()
        .find(|&i| matches!(ops[i].result, OpResult::Ok(OpOutcome::GetValue(_))))
        .unwrap();
    ops[last_read].result = ok_get(Some(b"never-written"));
    let h = to_history(&ops);
    let began = Instant::now();
    let v = check(&h).expect_err("corrupted read accepted");
    let took = began.elapsed();
    println!("{v}");
    println!(
        "perf: violation in 2,000 ops found in {took:?} (prefix {})",
        v.prefix_len
    );
    assert!(!v.inconclusive);
    assert_eq!(v.failing_op.result, Some(ok_get(Some(b"never-written"))));
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn performance_many_unknown_writes() {
    // A long fault: a fifth of the operations time out, half of those land at some point.
    let sim = Sim {
        clients: 8,
        ops_per_client: 250,
        keys: 1,
        unknown_pct: 20,
        failed_pct: 0,
    };
    let (ops, final_values) = simulate(&sim, 11);
    let h = to_history(&ops);
    let began = Instant::now();
    let report = check_with_final(&h, &final_values).unwrap_or_else(|v| panic!("{v}"));
    let took = began.elapsed();
    println!("{report}");
    println!(
        "perf: 2,000 ops with {} unknown checked in {took:?}",
        report.unknown
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn a_search_that_gives_up_says_so() {
    let sim = Sim {
        clients: 8,
        ops_per_client: 50,
        keys: 1,
        unknown_pct: 10,
        failed_pct: 0,
    };
    let (ops, _) = simulate(&sim, 3);
    let h = to_history(&ops);
    let options = CheckOptions {
        max_configurations: 20,
        ..CheckOptions::default()
    };
    let v = check_with(&h, &options).expect_err("cannot conclude in 20 configurations");
    println!("{v}");
    assert!(v.inconclusive);
    assert!(v.to_string().contains("undecided"), "{v}");
    check(&h).expect("linearizable with the default budget");
}

// ------------------------------------------------------ cross-check with brute force

/// Whether `ops` (small) are linearizable, by trying every subset of the unknown writes and
/// every order that respects real time. Independent of the checker's pruning.
fn brute_force(ops: &[SimOp]) -> bool {
    // The operations a linearization may hold; `true` = must hold.
    let candidates: Vec<(&SimOp, bool)> = ops
        .iter()
        .filter_map(|o| match (&o.op, &o.result) {
            (_, OpResult::Failed) | (Op::Get { .. }, OpResult::Unknown) => None,
            (_, OpResult::Unknown) => Some((o, false)),
            _ => Some((o, true)),
        })
        .collect();
    let ret = |o: &SimOp| match o.result {
        OpResult::Unknown => u64::MAX,
        _ => o.end,
    };
    fn extend(
        candidates: &[(&SimOp, bool)],
        placed: &mut Vec<bool>,
        state: Option<Vec<u8>>,
        ret: &dyn Fn(&SimOp) -> u64,
    ) -> bool {
        if candidates
            .iter()
            .zip(placed.iter())
            .all(|((_, must), &p)| p || !must)
        {
            return true;
        }
        for j in 0..candidates.len() {
            if placed[j] {
                continue;
            }
            let (o, _) = candidates[j];
            // Every unplaced operation that must hold and returned before `o` was called
            // has to come first. (Unplaced unknown writes are simply never placed.)
            let blocked = candidates
                .iter()
                .zip(placed.iter())
                .any(|((other, must), &p)| !p && *must && ret(other) < o.start);
            if blocked {
                continue;
            }
            let next_state = match (&o.op, &o.result) {
                (Op::Get { .. }, OpResult::Ok(OpOutcome::GetValue(v))) if *v == state => {
                    state.clone()
                }
                (Op::Get { .. }, _) => continue,
                (Op::Put { value, .. }, _) => Some(value.clone()),
                (Op::Delete { .. }, OpResult::Ok(OpOutcome::DeleteDone(existed)))
                    if *existed != state.is_some() =>
                {
                    continue
                }
                (Op::Delete { .. }, _) => None,
                (Op::PutIf { .. } | Op::DeleteIf { .. }, _) => unreachable!("not simulated"),
            };
            placed[j] = true;
            if extend(candidates, placed, next_state, ret) {
                return true;
            }
            placed[j] = false;
        }
        false
    }
    let mut placed = vec![false; candidates.len()];
    extend(&candidates, &mut placed, None, &ret)
}

/// A random small history of one key: few values (so values repeat), small times (so
/// intervals touch), random results (mostly not linearizable).
fn random_small_history(rng: &mut SmallRng, unique: bool) -> Vec<SimOp> {
    let len = rng.random_range(1..=8);
    // With `unique`, every put writes its own value and reads return one of them.
    let values: Vec<Vec<u8>> = if unique {
        (0..len).map(|i| format!("v{i}").into_bytes()).collect()
    } else {
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    };
    (0..len)
        .map(|i| {
            let kind = rng.random_range(0..3);
            let op = match kind {
                0 => get(K),
                1 if unique => put(K, &values[i]),
                1 => put(K, &values[rng.random_range(0..values.len())]),
                _ => delete(K),
            };
            let start = rng.random_range(0..12u64);
            let end = start + rng.random_range(0..8u64);
            let result = match rng.random_range(0..10) {
                0..=1 => OpResult::Unknown,
                2 => OpResult::Failed,
                _ => OpResult::Ok(match kind {
                    0 => OpOutcome::GetValue(
                        (rng.random_range(0..4) > 0)
                            .then(|| values[rng.random_range(0..values.len())].clone()),
                    ),
                    1 => OpOutcome::PutDone,
                    _ => OpOutcome::DeleteDone(rng.random_bool(0.5)),
                }),
            };
            SimOp {
                client: 0,
                op,
                start,
                end,
                result,
            }
        })
        .collect()
}

#[test]
fn agrees_with_brute_force_on_small_histories() {
    const ROUNDS: usize = 20_000;
    let mut rng = SmallRng::seed_from_u64(2024);
    let mut linearizable = 0;
    for round in 0..ROUNDS {
        let ops = random_small_history(&mut rng, round % 2 == 0);
        let expected = brute_force(&ops);
        let h = to_history(&ops);
        for strategy in STRATEGIES {
            let options = CheckOptions {
                strategy,
                ..CheckOptions::default()
            };
            let got = check_with(&h, &options);
            if let Err(v) = &got {
                assert!(!v.inconclusive);
            }
            assert_eq!(
                got.is_ok(),
                expected,
                "round {round}, {strategy:?}: checker says {got:?}, brute force says \
                 {expected} for\n{}",
                describe_all(&ops)
            );
        }
        linearizable += usize::from(expected);
    }
    println!("{linearizable} of {ROUNDS} random small histories are linearizable");
    assert!(
        linearizable > ROUNDS / 10,
        "too few linearizable cases to mean much"
    );
}

fn describe_all(ops: &[SimOp]) -> String {
    let h = to_history(ops);
    h.entries()
        .iter()
        .map(|e| e.describe(h.origin()))
        .collect::<Vec<_>>()
        .join("\n")
}
