//! Bounded resources on the serving side (ARCHITECTURE.md §3, "Serving limits"): a hostile
//! peer with a real `client` certificate opens every request stream it may, each claiming a
//! maximal frame and trickling it, and holds many idle connections, while a normal client
//! works. The node (a separate process, so its RSS is its own) stays small, the normal
//! client stays fast, the trickling streams are cut at the read deadline, the idle
//! connections are closed, and connections over the per-address limit are refused. The ECS
//! closes a `client` connection before it reads any frame.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, Certs, NodeProcess, TestEcs};
use ringkv_transport::limits::{
    CLOSE_IDLE, CLOSE_ROLE_NOT_ADMITTED, DEFAULT_CLIENT, STREAM_READ_TIMEOUT,
};
use ringkv_wire::Limits;

/// The node's request read deadline in this test.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The node's idle-connection timeout in this test.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections the hostile peer holds.
const IDLE_CONNECTIONS: usize = 200;
/// The node's per-address connection limit in this test: the idle connections, the
/// streaming one, the normal client's, and a little room.
const PER_IP: usize = 210;
/// Bound on the node's RSS growth under the attack: the normal client's one maximal put
/// (frame buffer, decoded request, storage: ≈ 12 MiB), 256 streams × one 16 KiB first
/// chunk (4 MiB), quinn's state of ~210 connections and 256 streams, and the trickled bytes.
/// Measured ≈ 20 MiB; with a read_frame that allocates the claimed length it was ≈ 1.06 GiB
/// (256 × 4.06 MiB).
const RSS_GROWTH_BOUND_KIB: u64 = 48 * 1024;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn raw_endpoint(certs: &Certs) -> quinn::Endpoint {
    raw_endpoint_with(certs, None)
}

/// A bare `client` endpoint, with `transport` instead of the default transport settings.
fn raw_endpoint_with(certs: &Certs, transport: Option<quinn::TransportConfig>) -> quinn::Endpoint {
    ringkv_certs::install_crypto_provider();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut config = ringkv_certs::client_config(&certs.identity("client")).unwrap();
    if let Some(transport) = transport {
        config.transport_config(Arc::new(transport));
    }
    endpoint.set_default_client_config(config);
    endpoint
}

/// A node process on `addr` that bootstraps a one-node ring, with `extra` flags, its RSS
/// measured honestly: glibc hands out fresh pages for large allocations and knows they are
/// zero, so a buffer that is allocated but never written costs no RSS until the allocator
/// reuses memory (then it must zero it, which is how the probe saw 4.2 MB per claimed
/// frame). MALLOC_PERTURB_ makes glibc write every allocation, so the RSS measured is what
/// the node allocates, whatever the allocator's luck.
async fn measured_node(
    certs: &Certs,
    addr: &str,
    data: &std::path::Path,
    extra: &[&str],
) -> NodeProcess {
    let args: Vec<&str> = std::iter::once("--start")
        .chain(extra.iter().copied())
        .collect();
    let node = NodeProcess::spawn_with_env(
        certs,
        "n1",
        addr.parse().unwrap(),
        data,
        &args,
        &[("MALLOC_PERTURB_", "85")],
    );
    node.wait_ready(certs).await;
    node
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    endpoint
        .connect(addr.parse().unwrap(), "127.0.0.1")
        .unwrap()
        .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_cannot_grow_the_node_or_slow_other_clients() {
    let started = Instant::now();
    let certs = Certs::new();
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let read_ms = READ_TIMEOUT.as_millis().to_string();
    let idle_ms = IDLE_TIMEOUT.as_millis().to_string();
    let per_ip = PER_IP.to_string();
    let node = measured_node(
        &certs,
        &addr,
        data.path(),
        &[
            "--request-read-timeout-ms",
            &read_ms,
            "--idle-connection-timeout-ms",
            &idle_ms,
            "--max-connections-per-ip",
            &per_ip,
        ],
    )
    .await;
    let pid = node.pid();
    // Let the ready-check's connection end (it holds a place until the node sees it close).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(rss_before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The idle connections, a few handshakes at a time.
    let hostile = raw_endpoint(&certs);
    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS / 10 {
        let batch: Vec<_> = (0..10).map(|_| connect(&hostile, &addr)).collect();
        for conn in futures::future::join_all(batch).await {
            idle.push((
                conn.expect("an idle connection within the limit"),
                Instant::now(),
            ));
        }
    }

    // The normal client, measured from here on. It first stores one maximal value, as any
    // node that serves large values has done: that frame's buffer is allocated and freed
    // (with the old pre-allocating read_frame, glibc then serves later 4 MiB buffers from
    // its heap and must zero them, so every claimed frame became resident).
    let normal = certs.client(vec![addr.clone()]).await;
    normal
        .put(b"large", &vec![7u8; Limits::default().max_value])
        .await
        .unwrap();
    let workload = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u32;
            while !done.load(Ordering::Relaxed) {
                let key = format!("k{}", i % 100);
                let t = Instant::now();
                normal.put(key.as_bytes(), &i.to_le_bytes()).await.unwrap();
                latencies.push(t.elapsed());
                let t = Instant::now();
                assert!(normal.get(key.as_bytes()).await.unwrap().is_some());
                latencies.push(t.elapsed());
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            normal.disconnect().await;
            latencies
        })
    };

    // Every stream a client may open, each claiming a maximal frame, then trickling.
    let streams_allowed = DEFAULT_CLIENT.max_streams as usize;
    let conn = connect(&hostile, &addr).await.unwrap();
    // One more than allowed: the last one cannot be opened.
    let first_wave = trickling_streams(&conn, streams_allowed + 1).await;
    assert_eq!(first_wave.len(), streams_allowed, "streams opened at once");

    // Over the per-address limit: refused before the handshake.
    let mut extra = Vec::new();
    let refused = loop {
        match connect(&hostile, &addr).await {
            Ok(conn) => extra.push(conn),
            Err(e) => break e,
        }
        assert!(
            extra.len() <= PER_IP,
            "no refusal after {} more",
            extra.len()
        );
    };
    assert!(
        matches!(&refused, quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{refused}"
    );
    let held = IDLE_CONNECTIONS + 2 + extra.len();
    println!("connections: {held} held from 127.0.0.1 (limit {PER_IP}), then refused: {refused}");
    assert!(held <= PER_IP + 1, "{held} connections held");
    drop(extra);

    // The trickling streams are cut at the read deadline; then the peer does it all again
    // (a second wave reuses whatever memory the first one freed).
    check_cut_at_deadline(first_wave).await;
    let second_wave = trickling_streams(&conn, streams_allowed).await;
    assert!(
        second_wave.len() > streams_allowed * 7 / 8,
        "{}",
        second_wave.len()
    );
    check_cut_at_deadline(second_wave).await;

    // The idle connections are closed after the idle timeout.
    for (conn, since) in idle {
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, CLOSE_IDLE.into());
                assert_eq!(&close.reason[..], b"idle");
            }
            other => panic!("idle connection: {other}"),
        }
        let after = since.elapsed();
        assert!(
            after >= IDLE_TIMEOUT - Duration::from_millis(100)
                && after < IDLE_TIMEOUT + Duration::from_secs(3),
            "idle connection closed after {after:?}"
        );
    }
    println!("{IDLE_CONNECTIONS} idle connections closed by the node after {IDLE_TIMEOUT:?}");

    done.store(true, Ordering::Relaxed);
    let mut latencies = workload.await.unwrap();
    sampler.await.unwrap();
    latencies.sort();
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let growth = peak.load(Ordering::Relaxed).saturating_sub(rss_before);
    println!(
        "node RSS: {rss_before} KiB before, peak {} KiB, growth {growth} KiB (bound {RSS_GROWTH_BOUND_KIB} KiB)",
        peak.load(Ordering::Relaxed)
    );
    println!(
        "normal client: {} requests, p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() - 1]
    );
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "node RSS grew by {growth} KiB"
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    drop(node);
    println!("test took {:?}", started.elapsed());
}

/// One trickling stream's task: the stop code the node sent and when (after opening).
type Trickle =
    tokio::task::JoinHandle<(Result<Option<quinn::VarInt>, quinn::StoppedError>, Duration)>;

/// Opens up to `n` streams on `conn` (as many as it may), each with a header claiming a
/// maximal frame and one payload byte, then trickling a byte every 100 ms until the node stops it; each task returns the
/// stop code and when it came (from the opening of the streams).
async fn trickling_streams(conn: &quinn::Connection, n: usize) -> Vec<Trickle> {
    let max_frame = Limits::default().max_frame as u32;
    let opened = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..n {
        // No more credit for now: quinn announces freed streams in batches of 1/8 of the
        // limit, so a second wave may get a few less than the limit.
        let Ok(opened) = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await
        else {
            break;
        };
        let (mut send, recv) = opened.unwrap();
        send.write_all(&max_frame.to_le_bytes()).await.unwrap();
        send.write_all(&[0]).await.unwrap();
        streams.push((send, recv));
    }
    streams
        .into_iter()
        .map(|(mut send, _recv)| {
            tokio::spawn(async move {
                while send.write_all(&[1]).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (send.stopped().await, opened.elapsed())
            })
        })
        .collect()
}

/// Every stream of a wave was stopped by the node's read deadline, and about at it.
async fn check_cut_at_deadline(wave: Vec<Trickle>) {
    let mut cut_after = Vec::new();
    for t in wave {
        let (code, elapsed) = tokio::time::timeout(READ_TIMEOUT + Duration::from_secs(5), t)
            .await
            .expect("the node never cut a trickling stream")
            .unwrap();
        assert_eq!(code.unwrap(), Some(STREAM_READ_TIMEOUT.into()));
        cut_after.push(elapsed);
    }
    cut_after.sort();
    let (first, last) = (cut_after[0], cut_after[cut_after.len() - 1]);
    println!(
        "{} trickling streams cut after {first:?} .. {last:?} (deadline {READ_TIMEOUT:?})",
        cut_after.len()
    );
    assert!(
        first >= READ_TIMEOUT - Duration::from_millis(100),
        "{first:?}"
    );
    assert!(last < READ_TIMEOUT + Duration::from_secs(2), "{last:?}");
}

#[tokio::test]
async fn the_ecs_closes_a_client_connection_before_reading_a_frame() {
    let certs = Certs::new();
    let state = tempfile::tempdir().unwrap();
    let ecs = TestEcs::start(&certs, state.path()).await;
    let endpoint = raw_endpoint(&certs);
    let conn = connect(&endpoint, &ecs.addr).await.unwrap();
    // No stream is opened: the ECS closes the connection on the role alone.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the ECS closes a client connection at once");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_ROLE_NOT_ADMITTED.into());
            assert_eq!(&close.reason[..], b"ecs does not admit client certificates");
        }
        other => panic!("expected an application close, got {other}"),
    }
    // An administrator is still served.
    let admin = certs.admin();
    let reply: ringkv_wire::AdminReply = admin
        .call(
            &ecs.addr,
            &ringkv_wire::AdminRequest::Ring,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(
        matches!(reply, ringkv_wire::AdminReply::Ring(_)),
        "{reply:?}"
    );
    admin.close().await;
    ecs.stop().await;
}

/// Large replies a peer does not read are bounded by the reply budgets (issue #21: a
/// `client` certificate held ~1 GiB of a node's memory by putting one 4 MiB value and asking
/// for it on 160 streams whose window it never raised, each reply waiting for the write
/// deadline). Here 64 such streams meet a 16 MiB per-connection budget: a few replies wait,
/// the others are replaced at once by a short error, and the node's RSS stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_large_replies_are_bounded_by_the_reply_budget() {
    const STREAMS: usize = 64;
    const BUDGET: usize = 16 << 20;
    let certs = Certs::new();
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let budget = BUDGET.to_string();
    let node = measured_node(
        &certs,
        &addr,
        data.path(),
        &[
            // Replies wait for their reader up to this long: the whole test.
            "--request-read-timeout-ms",
            "60000",
            "--max-unsent-reply-bytes",
            &budget,
        ],
    )
    .await;
    let pid = node.pid();
    let store = certs.client(vec![addr.clone()]).await;
    let value = vec![7u8; Limits::default().max_value];
    store.put(b"big", &value).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);

    // A peer whose streams take 16 KiB of a reply and are never read.
    let mut transport = ringkv_certs::base_transport_config();
    transport.stream_receive_window(quinn::VarInt::from_u32(16 * 1024));
    let endpoint = raw_endpoint_with(&certs, Some(transport));
    let conn = connect(&endpoint, &addr).await.unwrap();
    let get = ringkv_wire::codec::encode(
        &ringkv_wire::Request::new(
            0,
            ringkv_wire::RequestBody::Get {
                key: b"big".to_vec(),
            },
        ),
        Limits::default().max_frame,
    )
    .unwrap();
    let mut replies = Vec::new();
    for _ in 0..STREAMS {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&get).await.unwrap();
        send.finish().unwrap();
        replies.push(recv);
    }
    // Every request is handled within a few seconds; sample the node meanwhile.
    let mut peak = rss_before;
    for _ in 0..60 {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A refused reply is short and arrives whole; a budgeted one (its header says 4 MiB)
    // waits for its reader, who reads only the header.
    let (mut refused, mut waiting) = (0, 0);
    for mut recv in replies {
        let mut header = [0u8; ringkv_wire::codec::FRAME_HEADER_LEN];
        tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut header))
            .await
            .expect("every reply starts within the window")
            .unwrap();
        let len = ringkv_wire::codec::frame_len(header, Limits::default().max_frame).unwrap();
        if len > 64 * 1024 {
            waiting += 1;
            continue;
        }
        let mut payload = vec![0u8; len];
        recv.read_exact(&mut payload).await.unwrap();
        match ringkv_wire::codec::decode::<ringkv_wire::Reply>(&payload)
            .unwrap()
            .body
        {
            ringkv_wire::ReplyBody::Error { message, .. } => {
                assert!(message.contains("not sent"), "{message}");
                refused += 1;
            }
            other => panic!("a short reply to a get of 4 MiB: {other:?}"),
        }
    }
    let growth = peak.saturating_sub(rss_before);
    println!(
        "{STREAMS} unread 4 MiB replies: {waiting} held within the {BUDGET} B budget, {refused} refused; node RSS growth {growth} KiB"
    );
    assert!(
        (1..=BUDGET / (4 << 20)).contains(&waiting),
        "{waiting} waiting"
    );
    assert_eq!(refused + waiting, STREAMS);
    // The budget, its frames' decoded values while they are encoded, and quinn's buffers;
    // without a budget this was 64 × 8 MiB.
    assert!(growth < 96 * 1024, "node RSS grew {growth} KiB");
    let _ = store;
}
