//! The QUIC side of a node: binding the endpoint, accepting connections, and framing one
//! request and one reply per bidirectional stream.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kvstore::Transport;
use quinn::{Endpoint, RecvStream, SendStream};
use ringkv_certs::{Identity, Role};
use ringkv_wire::{codec, ErrorKind, Reply, ReplyBody, Request, WireError, FRAME_HEADER_LEN};

use crate::{Node, NodeConfig, NodeError};

/// Binds the node's QUIC endpoint (server and, for transfers, client) and opens the node.
///
/// Listening on port 0 picks a free port; if the advertised address was the listen address,
/// it becomes the bound one (tests rely on this).
pub async fn bind(
    mut config: NodeConfig,
    identity: &Identity,
) -> Result<(Endpoint, Arc<Node>), NodeError> {
    ringkv_certs::install_crypto_provider();
    let server_config = ringkv_certs::server_config(identity)?;
    let client_config = ringkv_certs::client_config(identity)?;
    let endpoint = Endpoint::server(server_config, config.listen)?;
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
    let node = Node::open(config, peers).await?;
    Ok((endpoint, node))
}

/// Serves `node` on `endpoint` until `shutdown` completes, then closes connections
/// gracefully (bounded wait). Every acknowledged write is already durable, so shutdown
/// loses nothing.
pub async fn run(endpoint: Endpoint, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    tracing::info!(node = %node.config.name, addr = %node.config.advertise, "serving");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(serve_connection(node.clone(), incoming));
                }
                None => break,
            },
        }
    }
    tracing::info!(node = %node.config.name, "shutting down");
    endpoint.close(0u32.into(), b"node shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn serve_connection(node: Arc<Node>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::info!(%remote, error = %e, "handshake refused");
            return;
        }
    };
    let role = match ringkv_certs::peer_role(&conn) {
        Ok(role) => role,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "peer certificate has no usable role");
            conn.close(1u32.into(), b"certificate carries no ringkv role");
            return;
        }
    };
    tracing::debug!(%remote, ?role, "peer connected");
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(node.clone(), role, send, recv));
    }
}

/// Why a request could not be read from a stream.
enum ReadFailure {
    /// The stream ended or was reset: nobody to answer.
    Gone,
    /// The frame was bad: answer with this error.
    Bad(ErrorKind, WireError),
}

async fn read_request(recv: &mut RecvStream, max_frame: usize) -> Result<Request, ReadFailure> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|_| ReadFailure::Gone)?;
    let len = codec::frame_len(header, max_frame)
        .map_err(|e| ReadFailure::Bad(ErrorKind::FrameTooLarge, e))?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|_| ReadFailure::Gone)?;
    codec::decode(&payload).map_err(|e| ReadFailure::Bad(ErrorKind::Malformed, e))
}

async fn serve_stream(node: Arc<Node>, role: Role, mut send: SendStream, mut recv: RecvStream) {
    let max_frame = node.config.limits.max_frame;
    let reply = match read_request(&mut recv, max_frame).await {
        Ok(request) => node.handle(role, request).await,
        Err(ReadFailure::Gone) => return,
        Err(ReadFailure::Bad(kind, e)) => {
            tracing::warn!(node = %node.config.name, ?role, error = %e, "bad request frame");
            // Do not read the rest of an oversized or broken frame.
            let _ = recv.stop(0u32.into());
            Reply::new(
                node.metadata_version(),
                ReplyBody::Error {
                    kind,
                    message: e.to_string(),
                },
            )
        }
    };
    let frame = match codec::encode(&reply, max_frame) {
        Ok(frame) => frame,
        Err(e) => {
            let fallback = Reply::new(
                reply.metadata_version,
                ReplyBody::Error {
                    kind: ErrorKind::InvalidState,
                    message: format!("reply too large: {e}"),
                },
            );
            codec::encode(&fallback, max_frame).expect("a short error reply always fits")
        }
    };
    // Never wait for the peer's ACK here (DESIGN §9): write, finish, done.
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
    }
}
