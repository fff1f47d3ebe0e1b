//! In-process tests of the connection layer over real QUIC and mutual TLS on loopback: a
//! restarted server resets its old connections and `Transport::call` retries on a new one;
//! a handler is cancelled when its caller goes away; the serving limits (connections refused
//! over the limits, idle connections closed, read deadline, roles not admitted).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::Endpoint;
use ringkv_certs::{Identity, IssueOptions, Role};
use ringkv_wire::{Limits, WireError};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::endpoint::tests::TempDir;
use crate::limits::{CLOSE_IDLE, CLOSE_ROLE_NOT_ADMITTED, STREAM_READ_TIMEOUT};
use crate::{bind_endpoint, serve, ServeLimits, Service, Transport, TransportError};

/// Echoes its request; `"hang"` never answers and sets `dropped` when its handler is dropped;
/// `"slow"` answers after 800 ms.
struct Echo {
    dropped: Arc<AtomicBool>,
    limits: ServeLimits,
    admit_clients: bool,
    handled: Arc<AtomicUsize>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Service for Echo {
    type Request = String;
    type Reply = String;

    fn name(&self) -> &str {
        "echo"
    }

    fn max_frame(&self) -> usize {
        1 << 16
    }

    fn serve_limits(&self) -> ServeLimits {
        self.limits
    }

    fn admits(&self, role: Role) -> bool {
        self.admit_clients || role != Role::Client
    }

    fn handle(
        &self,
        _peer: &ringkv_certs::PeerIdentity,
        request: String,
    ) -> impl Future<Output = String> + Send {
        let dropped = self.dropped.clone();
        self.handled.fetch_add(1, Ordering::SeqCst);
        async move {
            if request == "hang" {
                let _guard = SetOnDrop(dropped);
                std::future::pending::<()>().await;
            }
            if request == "slow" {
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            request
        }
    }

    fn bad_frame(&self, error: WireError) -> String {
        format!("bad frame: {error}")
    }

    fn unencodable(&self, error: WireError) -> String {
        format!("unencodable: {error}")
    }
}

struct Setup {
    dir: TempDir,
}

impl Setup {
    fn new() -> Self {
        ringkv_certs::install_crypto_provider();
        let dir = TempDir::new("certs");
        ringkv_certs::init_ca(&dir.0, false).unwrap();
        let mut server = IssueOptions::new(Role::Node, "server");
        server.sans = vec!["127.0.0.1".into()];
        ringkv_certs::issue(&dir.0, &server).unwrap();
        ringkv_certs::issue(&dir.0, &IssueOptions::new(Role::Client, "client")).unwrap();
        Self { dir }
    }

    fn identity(&self, name: &str) -> Identity {
        Identity::from_dir(&self.dir.0, name).unwrap()
    }

    /// A server endpoint on a free port serving [`Echo`]; stops when the sender is dropped.
    fn server(
        &self,
        secret: Option<&[u8; 32]>,
        dropped: Arc<AtomicBool>,
    ) -> (Endpoint, oneshot::Sender<()>) {
        let echo = Echo {
            dropped,
            limits: ServeLimits::default(),
            admit_clients: true,
            handled: Arc::default(),
        };
        self.serve(secret, echo)
    }

    fn serve(&self, secret: Option<&[u8; 32]>, echo: Echo) -> (Endpoint, oneshot::Sender<()>) {
        let mut config = ringkv_certs::server_config(&self.identity("server")).unwrap();
        echo.limits.apply(&mut config);
        let endpoint = bind_endpoint("127.0.0.1:0".parse().unwrap(), config, secret).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(serve(endpoint.clone(), Arc::new(echo), async {
            let _ = rx.await;
        }));
        (endpoint, tx)
    }

    /// A server with `limits`, admitting clients or not; returns its address and the count
    /// of requests its handler was called for.
    fn limited(
        &self,
        limits: ServeLimits,
        admit_clients: bool,
    ) -> (String, Arc<AtomicUsize>, oneshot::Sender<()>) {
        let handled = Arc::new(AtomicUsize::new(0));
        let echo = Echo {
            dropped: Arc::default(),
            limits,
            admit_clients,
            handled: handled.clone(),
        };
        let (endpoint, stop) = self.serve(None, echo);
        (endpoint.local_addr().unwrap().to_string(), handled, stop)
    }

    /// A raw client endpoint with the client certificate, to hold connections and streams.
    fn raw_client(&self) -> Endpoint {
        let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(
            ringkv_certs::client_config(&self.identity("client")).unwrap(),
        );
        endpoint
    }

    fn client(&self) -> Transport {
        Transport::bind_client(
            &self.identity("client"),
            Limits::default(),
            Duration::from_secs(3),
            Duration::from_secs(10),
        )
        .unwrap()
    }
}

/// A UDP relay standing for "the server's address": clients talk to its front socket, it
/// talks to the current upstream from one back socket and drops whatever comes from any
/// other address. Switching the upstream is a crash and restart on the same address: the
/// old server never hears from its clients again, and they never hear from it.
struct Relay {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream));
        let current = upstream.clone();
        tokio::spawn(async move {
            let mut client = None;
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let to = *current.lock().unwrap();
                        let _ = back.send_to(&up[..n], to).await;
                    }
                    Ok((n, from)) = back.recv_from(&mut down) => {
                        let to = *current.lock().unwrap();
                        if let (true, Some(client)) = (from == to, client) {
                            let _ = front.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        });
        Self { addr, upstream }
    }

    fn switch_to(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }
}

async fn echo(transport: &Transport, addr: &str, text: &str, timeout: Duration) -> String {
    let reply: String = transport
        .call(addr, &text.to_string(), timeout)
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    reply
}

/// Restarts the server behind the relay (a new endpoint with `new_secret`) after one
/// exchange, and returns the outcome and duration of the next call on the old connection.
async fn call_across_restart(
    new_secret: Option<&[u8; 32]>,
    timeout: Duration,
) -> (Result<String, TransportError>, Duration, Endpoint) {
    let setup = Setup::new();
    let secret = [7u8; 32];
    let flag = Arc::new(AtomicBool::new(false));
    let (old, _old_stop) = setup.server(Some(&secret), flag.clone());
    let relay = Relay::start(old.local_addr().unwrap()).await;
    let addr = relay.addr.to_string();
    let transport = setup.client();
    assert_eq!(echo(&transport, &addr, "one", timeout).await, "one");

    let (new, _new_stop) = setup.server(new_secret, flag);
    relay.switch_to(new.local_addr().unwrap());
    let started = Instant::now();
    let result = transport.call(&addr, &"two".to_string(), timeout).await;
    (result, started.elapsed(), new)
}

#[tokio::test]
async fn restarted_server_resets_old_connection_and_the_call_is_retried() {
    let (result, elapsed, new) =
        call_across_restart(Some(&[7u8; 32]), Duration::from_secs(5)).await;
    println!("call across a restart with the same reset secret: {elapsed:?}");
    assert_eq!(result.unwrap(), "two");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    // It was answered on a new connection to the new server.
    assert_eq!(new.stats().accepted_handshakes, 1);
}

/// The control: a restarted server with another reset key cannot reset the old connection
/// (its packets are dropped without an answer), so the call waits its whole timeout.
#[tokio::test]
async fn restarted_server_without_the_secret_stays_silent() {
    let timeout = Duration::from_millis(1500);
    let (result, elapsed, new) = call_across_restart(None, timeout).await;
    println!("call across a restart with a new reset key: {elapsed:?}");
    match result {
        Err(TransportError::Stream { reason, .. }) => {
            assert!(reason.contains("no reply within"), "{reason}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(elapsed >= timeout);
    assert_eq!(new.stats().accepted_handshakes, 0);
}

#[tokio::test]
async fn handler_is_cancelled_when_the_caller_goes_away() {
    let setup = Setup::new();
    let dropped = Arc::new(AtomicBool::new(false));
    let (server, _stop) = setup.server(None, dropped.clone());
    let addr = server.local_addr().unwrap().to_string();
    let transport = setup.client();
    // Gives up after 300 ms and closes the connection.
    let e = transport
        .call::<_, String>(&addr, &"hang".to_string(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Stream { .. }), "{e}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the handler outlived its connection"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The server still serves (a new connection).
    assert_eq!(
        echo(&transport, &addr, "after", Duration::from_secs(5)).await,
        "after"
    );
}

async fn connect(
    endpoint: &Endpoint,
    addr: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    endpoint
        .connect(addr.parse().unwrap(), "127.0.0.1")
        .unwrap()
        .await
}

fn is_refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn_proto::TransportErrorCode::CONNECTION_REFUSED)
}

#[tokio::test]
async fn connections_over_the_limits_are_refused_before_the_handshake() {
    let setup = Setup::new();
    let raw = setup.raw_client();
    for (total, per_ip) in [(100, 3), (3, 100)] {
        let limits = ServeLimits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            ..ServeLimits::default()
        };
        let (addr, _, _stop) = setup.limited(limits, true);
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(connect(&raw, &addr).await.unwrap());
        }
        let e = connect(&raw, &addr).await.unwrap_err();
        assert!(is_refused(&e), "limits {total}/{per_ip}: {e}");
        // A place comes back when a connection ends.
        let first = open.remove(0);
        first.close(0u32.into(), b"bye");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match connect(&raw, &addr).await {
                Ok(conn) => break open.push(conn),
                Err(e) if is_refused(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("no place came back: {e}"),
            }
        }
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_the_transport_dials_again() {
    let setup = Setup::new();
    let limits = ServeLimits {
        idle_timeout: Duration::from_millis(300),
        ..ServeLimits::default()
    };
    let (addr, _, _stop) = setup.limited(limits, true);
    let raw = setup.raw_client();
    let conn = connect(&raw, &addr).await.unwrap();
    let started = Instant::now();
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_IDLE.into());
            assert_eq!(&close.reason[..], b"idle");
        }
        other => panic!("expected an application close, got {other}"),
    }
    let idle = started.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed after {idle:?}");

    // A request in flight longer than the idle timeout keeps its connection; a client whose
    // connection was closed while idle simply dials again.
    let transport = setup.client();
    let timeout = Duration::from_secs(5);
    assert_eq!(echo(&transport, &addr, "slow", timeout).await, "slow");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(echo(&transport, &addr, "again", timeout).await, "again");
}

#[tokio::test]
async fn a_role_not_admitted_is_closed_before_any_frame_is_read() {
    let setup = Setup::new();
    let (addr, handled, _stop) = setup.limited(ServeLimits::default(), false);
    let raw = setup.raw_client();
    let conn = connect(&raw, &addr).await.unwrap();
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_ROLE_NOT_ADMITTED.into());
            assert_eq!(
                &close.reason[..],
                b"echo does not admit client certificates"
            );
        }
        other => panic!("expected an application close, got {other}"),
    }
    let e = setup
        .client()
        .call::<_, String>(&addr, &"hi".to_string(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not admit client"), "{e}");
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_silent_or_trickling_stream_is_reset_at_the_read_deadline() {
    let setup = Setup::new();
    let limits = ServeLimits {
        request_read_timeout: Duration::from_millis(300),
        ..ServeLimits::default()
    };
    let (addr, handled, _stop) = setup.limited(limits, true);
    let raw = setup.raw_client();
    let conn = connect(&raw, &addr).await.unwrap();
    let started = Instant::now();
    // One stream sends nothing (an empty write makes quinn open it), one a header and a byte.
    let (mut silent, mut silent_recv) = conn.open_bi().await.unwrap();
    silent.write_all(&[]).await.unwrap();
    let (mut trickle, mut trickle_recv) = conn.open_bi().await.unwrap();
    trickle.write_all(&1000u32.to_le_bytes()).await.unwrap();
    trickle.write_all(b"x").await.unwrap();
    for (send, recv) in [
        (&mut silent, &mut silent_recv),
        (&mut trickle, &mut trickle_recv),
    ] {
        assert_eq!(
            send.stopped().await.unwrap(),
            Some(STREAM_READ_TIMEOUT.into())
        );
        let e = recv.read_to_end(1024).await.unwrap_err();
        assert!(
            matches!(e, quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)) if code == STREAM_READ_TIMEOUT.into()),
            "{e}"
        );
    }
    let cut = started.elapsed();
    assert!(
        cut >= Duration::from_millis(300) && cut < Duration::from_secs(3),
        "{cut:?}"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    // The connection lives on.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let frame = ringkv_wire::codec::encode(&"fine".to_string(), 1 << 16).unwrap();
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();
    let reply: String = crate::read_frame(&mut recv, 1 << 16).await.unwrap();
    assert_eq!(reply, "fine");
}

/// A caller that gives up while its connection is still being dialled (a probe's timeout)
/// does not cut the handshake short: the dial goes on in its own task and the connection is
/// kept for the next caller. Before, the handshake was dropped with the caller, so when an
/// ECS dialled thousands of nodes at once every probe timed out half way through its
/// handshake and the next one started over (`ringkv-bench lease-scale`: 2,000 nodes never
/// came up).
#[tokio::test]
async fn a_caller_that_gives_up_does_not_cut_its_dial_short() {
    let setup = Setup::new();
    let (server, _stop) = setup.server(None, Arc::default());
    // The relay first leads nowhere: the client's first handshake packet is lost.
    let nowhere = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = Relay::start(nowhere.local_addr().unwrap()).await;
    let addr = relay.addr.to_string();
    let transport = Transport::bind_client(
        &setup.identity("client"),
        Limits::default(),
        Duration::from_secs(20),
        Duration::from_secs(20),
    )
    .unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        transport.call::<_, String>(&addr, &"one".to_string(), Duration::from_secs(20)),
    )
    .await;
    assert!(gave_up.is_err(), "answered through a relay to nowhere");
    // The server is reachable now: the abandoned call's dial, resending its first packet,
    // completes by itself.
    relay.switch_to(server.local_addr().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.stats().accepted_handshakes == 0 {
        assert!(Instant::now() < deadline, "no handshake reached the server");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next call uses that connection: no second handshake.
    assert_eq!(
        echo(&transport, &addr, "two", Duration::from_secs(5)).await,
        "two"
    );
    assert_eq!(
        server.stats().accepted_handshakes,
        1,
        "the handshake of the caller that gave up was thrown away and the next call dialled again"
    );
}
