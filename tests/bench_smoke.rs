//! `ringkv-bench` against one in-process node: it runs, reports JSON, and every request
//! succeeds. Speed is not asserted.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Certs, TestNode};

/// Runs `ringkv-bench --json` with `args` against `node` for a second; its report.
async fn bench(certs: &Certs, node: &TestNode, args: &[&str]) -> serde_json::Value {
    // The node is a task of this runtime: wait for the child without blocking it.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
        .args(["--seed", &node.addr, "--identity", "client"])
        .arg("--certs")
        .arg(certs.path())
        .args(["--json", "--clients", "4"])
        .args(["--duration", "1", "--warmup", "0.2", "--keyspace", "500"])
        .args(["--seed-rng", "7"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("ringkv-bench finishes")
        .expect("ringkv-bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ringkv-bench failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "ringkv-bench printed no JSON ({e}): {}\nstderr: {stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test]
async fn bench_reports_gets_and_puts_without_errors() {
    let certs = Certs::new();
    let node = TestNode::start(&certs, "n1", true).await;
    let report = bench(&certs, &node, &["--ratio", "1:1"]).await;

    let count = |path: &str| {
        report
            .pointer(path)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("{path} missing in {report}"))
    };
    assert!(count("/get/requests") > 0, "{report}");
    assert!(count("/put/requests") > 0, "{report}");
    assert_eq!(
        count("/total/requests"),
        count("/get/requests") + count("/put/requests")
    );
    assert_eq!(count("/get/misses"), 0, "the preload makes every get hit");
    assert_eq!(count("/config/nodes"), 1);
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    for op in ["get", "put"] {
        let latency = &report[op]["latency_us"];
        assert!(latency["p50"].as_u64().unwrap_or(0) > 0, "{report}");
        assert!(
            latency["p50"].as_u64() <= latency["max"].as_u64(),
            "{report}"
        );
    }

    // Batches of 10 keys, and compare-and-set puts: no error, every get hits, no conflict.
    for (args, keys_per_op) in [
        (&["--ratio", "1:1", "--batch", "10"][..], 10.0),
        (&["--ratio", "0:1", "--cas"][..], 1.0),
    ] {
        let report = bench(&certs, &node, args).await;
        assert_eq!(
            report["errors"],
            serde_json::json!({}),
            "{args:?}: {report}"
        );
        for op in ["get", "put"] {
            assert_eq!(report[op]["misses"].as_u64(), Some(0), "{args:?}: {report}");
        }
        let ops = report["total"]["ops_per_sec"].as_f64().unwrap();
        let keys = report["keys_per_sec"].as_f64().unwrap();
        assert!(
            ops > 0.0 && (keys - ops * keys_per_op).abs() < 1.0,
            "{args:?}: {report}"
        );
    }

    // `ringkv-bench scan`: loads 3,000 keys, scans every key of the node twice (those the
    // runs above wrote too).
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
        .args(["scan", "--seed", &node.addr, "--identity", "client"])
        .arg("--certs")
        .arg(certs.path())
        .args(["--load", "3000", "--page", "256", "--rounds", "2"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("ringkv-bench scan finishes")
        .expect("ringkv-bench scan runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ringkv-bench scan failed: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let stored = node.node.store().len().unwrap();
    assert!(stored >= 3000);
    assert_eq!(report["keys"].as_u64(), Some(2 * stored), "{report}");
    assert!(report["keys_per_sec"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["pages"].as_u64().unwrap() >= 2 * stored / 256,
        "{report}"
    );

    node.stop().await;
}

/// `ringkv-bench lease-scale` with 20 stand-in nodes: a real `ringkv-ecs serve` leases them
/// all, and the report has a row with probes counted and the ECS's CPU per probe. Speed is
/// not asserted.
#[test]
fn lease_scale_reports_a_row_per_size() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
        // A budget of 40 probes/s for 20 nodes: the ECS stretches its 250 ms interval to
        // 500 ms (80 probes/s otherwise).
        .args([
            "lease-scale",
            "--nodes",
            "20",
            "--seconds",
            "2",
            "--max-probe-rate",
            "40",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("ringkv-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ringkv-bench failed: {stderr}");
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("20 nodes"))
        .unwrap_or_else(|| panic!("no row for 20 nodes:\n{stdout}\n{stderr}"));
    // "20 nodes every 500ms (warm after 1.0s): 40 probes/s of 40 wanted ...".
    assert!(row.contains("every 500ms"), "{row}");
    let probes: f64 = row
        .split("):")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no probe rate in {row}"));
    // Some probes were counted, and the ECS kept to its budget, not to 250 ms.
    assert!(probes > 0.0 && probes < 60.0, "{row}");
    assert!(stdout.contains("one ECS core:"), "{stdout}");
}

/// `ringkv-bench rebalance` (an in-process cluster at R = 3): a join into 3 nodes takes its
/// share from several nodes, a leave of one of 4 rebuilds its copies on several; both report
/// the same run's disk rate, the lock time and the load's throughput.
#[test]
fn rebalance_reports_a_join_from_many_nodes_and_a_leave_to_many() {
    for (nodes, leave) in [("3", false), ("4", true)] {
        let dir = tempfile::tempdir().unwrap();
        // The ECS at the port, node i at port + i: a free port with room after it.
        let port = (0..50)
            .map(|_| common::free_port())
            .find(|p| *p < 60_000)
            .expect("a free port below 60000");
        let mut args = vec![
            "rebalance".to_string(),
            "--keys=3000".into(),
            "--value-size=256".into(),
            format!("--nodes={nodes}"),
            "--disk-mib=8".into(),
            "--load-clients=2".into(),
            format!("--port={port}"),
        ];
        if leave {
            args.push("--leave".into());
        }
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
            .args(&args)
            .arg("--dir")
            .arg(dir.path())
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .output()
            .expect("ringkv-bench rebalance runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stdout}\n{stderr}");
        // "moved K keys (M MB) in C range copies from A, B to C in S s: R MB/s"
        let moved = stdout
            .lines()
            .find(|l| l.starts_with("moved "))
            .unwrap_or_else(|| panic!("no move reported: {stdout}"));
        let words: Vec<&str> = moved.split_whitespace().collect();
        let keys: u64 = words[1].parse().unwrap();
        let copies: u32 = words[6].parse().unwrap();
        let (from, to) = moved
            .split_once(" from ")
            .and_then(|(_, rest)| rest.split_once(" to "))
            .unwrap();
        let (to, _) = to.split_once(" in ").unwrap();
        let (senders, receivers) = (from.split(", ").count(), to.split(", ").count());
        assert!(keys > 0 && copies >= 2, "{moved}");
        if leave {
            assert!(receivers >= 2, "a leave rebuilds on several nodes: {moved}");
        } else {
            assert!(senders >= 2, "a join takes from several nodes: {moved}");
            assert_eq!(receivers, 1, "{moved}");
        }
        for line in [
            "disk in the same run: ",
            "ranges write-locked for ",
            "load: ",
        ] {
            assert!(stdout.contains(line), "{line:?} missing: {stdout}");
        }
    }
}
