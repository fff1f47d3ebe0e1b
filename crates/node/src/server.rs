//! The QUIC side of a node: binding the endpoint and serving requests through the shared
//! connection layer (`ringkv-transport`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quinn::Endpoint;
use ringkv_certs::{Identity, PeerIdentity};
use ringkv_transport::{RingAuthority, ServeLimits, Service, Transport};
use ringkv_wire::{ErrorKind, Reply, ReplyBody, Request, WireError};

use crate::{Node, NodeConfig, NodeError};

/// Binds the node's QUIC endpoint (server and, for transfers, client) and opens the node.
///
/// The endpoint's stateless-reset key comes from the secret in `<data-dir>/reset.key`
/// (created on first start), so after a crash and restart on the same address and data
/// directory the node answers its peers' packets on their old connections with a stateless
/// reset, and they learn at once that those connections are dead
/// (`ringkv_transport::endpoint`).
///
/// Listening on port 0 picks a free port; if the advertised address was the listen address,
/// it becomes the bound one (tests rely on this).
pub async fn bind(
    mut config: NodeConfig,
    identity: &Identity,
) -> Result<(Endpoint, Arc<Node>), NodeError> {
    ringkv_certs::install_crypto_provider();
    // Peers know a node by its certificate: the ECS names the sender of a move by its ring
    // name, and a receiver checks it against the caller's certificate name.
    let cert_name = identity.name()?;
    if cert_name != config.name {
        return Err(NodeError::Config(format!(
            "the node is called {:?} but its certificate is issued to {cert_name:?}: a node's \
             name in the ring is its certificate's name",
            config.name
        )));
    }
    let mut server_config = ringkv_certs::server_config(identity)?;
    config.serve.apply(&mut server_config);
    let client_config = ringkv_certs::client_config(identity)?;
    std::fs::create_dir_all(&config.data_dir)?;
    let reset_secret = ringkv_transport::reset_secret(&config.data_dir)?;
    let endpoint =
        ringkv_transport::bind_endpoint(config.listen, server_config, Some(&reset_secret))?;
    if config.listen.port() == 0 && config.advertise == config.listen.to_string() {
        config.advertise = endpoint.local_addr()?.to_string();
    }
    let peers = Transport::new(
        endpoint.clone(),
        client_config,
        config.limits,
        Duration::from_secs(3),
        Duration::from_secs(30),
    );
    let node = Node::open(config, peers, RingAuthority::new(identity)?).await?;
    Ok((endpoint, node))
}

/// How long a stopping node waits for a probe of the ECS to tell it that it stops on
/// purpose ([`Node::leave`]): several probe intervals (250 ms by default).
pub const LEAVING_NOTICE: Duration = Duration::from_secs(2);

/// Serves `node` on `endpoint`, and gossips with its peers, until `shutdown` completes,
/// then tells the ECS it stops on purpose ([`Node::leave`]) and closes connections
/// gracefully. Every acknowledged write is already durable, so
/// shutdown loses nothing.
pub async fn run(endpoint: Endpoint, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    let gossip = tokio::spawn(crate::gossip::driver::run(node.clone()));
    let redrive = tokio::spawn(crate::redrive::run(node.clone()));
    let sweep = tokio::spawn(crate::expiry::run(node.clone()));
    let leaving = node.clone();
    let shutdown = async move {
        shutdown.await;
        // Tell the ECS this is a planned stop (at its next probe) while still serving.
        leaving.leave(LEAVING_NOTICE).await;
    };
    ringkv_transport::serve(endpoint, node, shutdown).await;
    gossip.abort();
    redrive.abort();
    sweep.abort();
}

impl Service for Node {
    type Request = Request;
    type Reply = Reply;

    fn name(&self) -> &str {
        &self.config.name
    }

    fn max_frame(&self) -> usize {
        self.config.limits.max_frame
    }

    fn serve_limits(&self) -> ServeLimits {
        self.config.serve
    }

    fn handle(&self, peer: &PeerIdentity, request: Request) -> impl Future<Output = Reply> + Send {
        Node::handle(self, peer, request)
    }

    fn bad_frame(&self, error: WireError) -> Reply {
        self.error_reply(error.kind(), error.to_string())
    }

    fn unencodable(&self, error: WireError) -> Reply {
        self.error_reply(ErrorKind::InvalidState, format!("reply too large: {error}"))
    }

    fn unsent(&self, error: WireError) -> Reply {
        self.error_reply(error.kind(), error.to_string())
    }
}

impl Node {
    fn error_reply(&self, kind: ErrorKind, message: String) -> Reply {
        Reply::new(self.metadata_version(), ReplyBody::Error { kind, message })
    }
}
