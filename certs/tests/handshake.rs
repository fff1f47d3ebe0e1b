//! Real QUIC + mutual TLS handshakes over 127.0.0.1 with the configs this crate builds.
//!
//! A TLS 1.3 server validates the client certificate *after* the client considers the
//! handshake complete, so a refused client may see `connect` succeed and only fail on its
//! first request. Every refusal test therefore asserts that the client's whole exchange
//! (connect + one request round trip) fails, and that the server never accepts the connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::Endpoint;
use ringkv_certs::{
    client_config, init_ca, issue, peer_role, server_config, Identity, IssueOptions, Role, ALPN,
};
use time::OffsetDateTime;

const TIMEOUT: Duration = Duration::from_secs(10);

/// What happened on each side of one attempted exchange.
struct Outcome {
    /// Ok(server's role as seen by the client) if the request round trip succeeded.
    client: Result<Role, String>,
    /// Ok(client's role as seen by the server) if the server accepted and answered.
    server: Result<Role, String>,
}

impl Outcome {
    /// Both sides failed, and the server's error mentions `reason` (rustls' wording, so the
    /// test proves the refusal happened for the intended reason).
    fn assert_refused(&self, what: &str, reason: &str) {
        assert!(
            self.client.is_err(),
            "{what}: client exchange succeeded: {:?}",
            self.client
        );
        assert!(
            self.server.is_err(),
            "{what}: server accepted: {:?}",
            self.server
        );
        let server_error = self.server.as_ref().unwrap_err();
        assert!(
            server_error.contains(reason),
            "{what}: server error {server_error:?} does not mention {reason:?}"
        );
    }
}

/// A CA in its own temp dir that can issue identities.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), false).unwrap();
        TestCa { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn identity(&self, opts: IssueOptions) -> Identity {
        issue(self.path(), &opts).unwrap();
        Identity::from_dir(self.path(), &opts.name).unwrap()
    }

    fn node(&self, name: &str, san: &str) -> Identity {
        let mut opts = IssueOptions::new(Role::Node, name);
        opts.sans = vec![san.to_owned()];
        self.identity(opts)
    }

    fn client(&self, name: &str) -> Identity {
        self.identity(IssueOptions::new(Role::Client, name))
    }
}

async fn serve_one(server: Endpoint) -> Result<Role, String> {
    let incoming = server.accept().await.ok_or("endpoint closed")?;
    let conn = incoming.await.map_err(|e| format!("accept: {e}"))?;
    let role = peer_role(&conn).map_err(|e| format!("peer_role: {e}"))?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| format!("accept_bi: {e}"))?;
    let request = recv
        .read_to_end(1024)
        .await
        .map_err(|e| format!("read: {e}"))?;
    send.write_all(&request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    send.finish().map_err(|e| format!("finish: {e}"))?;
    // Keep the connection until the client closes it after reading the reply.
    conn.closed().await;
    Ok(role)
}

async fn request_once(
    client: &Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Role, String> {
    let conn = client
        .connect_with(config, addr, server_name)
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open_bi: {e}"))?;
    send.write_all(b"ping")
        .await
        .map_err(|e| format!("write: {e}"))?;
    send.finish().map_err(|e| format!("finish: {e}"))?;
    let reply = recv
        .read_to_end(1024)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if reply != b"ping" {
        return Err(format!("unexpected reply {reply:?}"));
    }
    let role = peer_role(&conn).map_err(|e| format!("peer_role: {e}"))?;
    conn.close(0u32.into(), b"done");
    Ok(role)
}

/// Runs one server accepting one connection, and one client making one request to it.
async fn exchange(server: &Identity, client: quinn::ClientConfig, server_name: &str) -> Outcome {
    let endpoint = Endpoint::server(
        server_config(server).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server_task = tokio::spawn(serve_one(endpoint.clone()));

    let client_endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = tokio::time::timeout(
        TIMEOUT,
        request_once(&client_endpoint, client, addr, server_name),
    )
    .await
    .unwrap_or_else(|_| Err("client timed out".into()));
    let server = tokio::time::timeout(TIMEOUT, server_task)
        .await
        .map_err(|_| "server timed out".to_owned())
        .and_then(|joined| joined.map_err(|e| format!("server task: {e}")))
        .and_then(|r| r);
    let _ = tokio::time::timeout(TIMEOUT, client_endpoint.wait_idle()).await;
    endpoint.close(0u32.into(), b"");
    eprintln!("client: {client:?}\nserver: {server:?}");
    Outcome { client, server }
}

#[tokio::test]
async fn client_cert_accepted_and_role_visible_to_server() {
    let ca = TestCa::new();
    let node = ca.node("node1", "127.0.0.1");
    let app = ca.client("app");
    let outcome = exchange(&node, client_config(&app).unwrap(), "127.0.0.1").await;
    assert_eq!(outcome.server, Ok(Role::Client));
    assert_eq!(outcome.client, Ok(Role::Node));
}

#[tokio::test]
async fn node_and_admin_certs_work_as_clients() {
    let ca = TestCa::new();
    let node = ca.node("node1", "localhost");
    let peer = ca.node("node2", "127.0.0.2");
    let admin = ca.identity(IssueOptions::new(Role::Admin, "ecs"));
    for (id, role) in [(&peer, Role::Node), (&admin, Role::Admin)] {
        let outcome = exchange(&node, client_config(id).unwrap(), "localhost").await;
        assert_eq!(outcome.server, Ok(role));
        assert_eq!(outcome.client, Ok(Role::Node));
    }
}

#[tokio::test]
async fn client_cert_from_another_ca_refused() {
    let ca = TestCa::new();
    let rogue_ca = TestCa::new();
    let node = ca.node("node1", "127.0.0.1");
    // Trusts the real CA (so it accepts the server), but presents a rogue client cert.
    let rogue = rogue_ca.client("app");
    let id = Identity {
        ca: node.ca.clone(),
        ..rogue
    };
    let outcome = exchange(&node, client_config(&id).unwrap(), "127.0.0.1").await;
    outcome.assert_refused("foreign CA", "UnknownIssuer");
}

#[tokio::test]
async fn expired_client_cert_refused() {
    let ca = TestCa::new();
    let node = ca.node("node1", "127.0.0.1");
    let mut opts = IssueOptions::new(Role::Client, "old");
    let now = OffsetDateTime::now_utc();
    opts.not_before = now - time::Duration::days(30);
    opts.not_after = now - time::Duration::days(1);
    let expired = ca.identity(opts);
    let outcome = exchange(&node, client_config(&expired).unwrap(), "127.0.0.1").await;
    outcome.assert_refused("expired", "certificate expired");
}

#[tokio::test]
async fn client_without_cert_refused() {
    let ca = TestCa::new();
    let node = ca.node("node1", "127.0.0.1");
    let mut roots = rustls::RootCertStore::empty();
    for cert in &node.ca {
        roots.add(cert.clone()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let outcome = exchange(&node, config, "127.0.0.1").await;
    outcome.assert_refused("anonymous client", "peer sent no certificates");
}

#[tokio::test]
async fn server_name_mismatch_refused() {
    let ca = TestCa::new();
    let node = ca.node("node1", "10.9.9.9");
    let app = ca.client("app");
    let outcome = exchange(&node, client_config(&app).unwrap(), "127.0.0.1").await;
    outcome.assert_refused("name mismatch", "certificate not valid for name");
}

#[tokio::test]
async fn server_from_another_ca_refused() {
    let ca = TestCa::new();
    let rogue_ca = TestCa::new();
    let rogue_node = rogue_ca.node("node1", "127.0.0.1");
    // The rogue server trusts our CA, so only the client's check can stop this.
    let rogue_node = Identity {
        ca: ca.client("unused").ca,
        ..rogue_node
    };
    let app = ca.client("app");
    let outcome = exchange(&rogue_node, client_config(&app).unwrap(), "127.0.0.1").await;
    outcome.assert_refused("rogue server", "UnknownIssuer");
}

#[tokio::test]
async fn client_without_alpn_refused() {
    let ca = TestCa::new();
    let node = ca.node("node1", "127.0.0.1");
    let app = ca.client("app");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(app.ca[0].clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(app.chain.clone(), app.key.clone_key())
    .unwrap();
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let outcome = exchange(&node, config, "127.0.0.1").await;
    outcome.assert_refused("no ALPN", "peer doesn't support any known protocol");
}
