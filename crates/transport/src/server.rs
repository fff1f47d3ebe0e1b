//! The serving side of the connection layer: accept mutually authenticated QUIC
//! connections, read one request frame per bidirectional stream, answer with one reply
//! frame. Nodes and the ECS both serve through [`serve`], so framing, limits and the
//! handling of bad frames exist once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use ringkv_certs::PeerIdentity;
use ringkv_wire::{codec, WireError};
use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{read_frame, FrameError};

/// A request handler served by [`serve`].
pub trait Service: Send + Sync + 'static {
    /// The request type read from each stream.
    type Request: DeserializeOwned + Send + 'static;
    /// The reply type written back.
    type Reply: Serialize + Send + 'static;

    /// A name for logs.
    fn name(&self) -> &str;
    /// Largest request frame accepted; a bigger header is refused before any buffering.
    fn max_frame(&self) -> usize;
    /// Answers one request from `peer` (its role and name, read from its verified
    /// certificate).
    fn handle(
        &self,
        peer: &PeerIdentity,
        request: Self::Request,
    ) -> impl Future<Output = Self::Reply> + Send;
    /// The reply to a frame that was oversized or did not decode.
    fn bad_frame(&self, error: WireError) -> Self::Reply;
    /// The reply when the real reply could not be encoded (e.g. over the frame limit).
    fn unencodable(&self, error: WireError) -> Self::Reply;
}

/// Serves `service` on `endpoint` until `shutdown` completes, then closes connections
/// gracefully (bounded wait). A handler still running when its connection closes (the
/// caller went away, or the endpoint shut down) is cancelled.
pub async fn serve<S: Service>(
    endpoint: Endpoint,
    service: Arc<S>,
    shutdown: impl Future<Output = ()>,
) {
    tracing::info!(service = service.name(), addr = ?endpoint.local_addr().ok(), "serving");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(serve_connection(service.clone(), incoming));
                }
                None => break,
            },
        }
    }
    tracing::info!(service = service.name(), "shutting down");
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

async fn serve_connection<S: Service>(service: Arc<S>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::info!(service = service.name(), %remote, error = %e, "handshake refused");
            return;
        }
    };
    let peer = match ringkv_certs::peer_identity(&conn) {
        Ok(peer) => Arc::new(peer),
        Err(e) => {
            tracing::warn!(service = service.name(), %remote, error = %e, "peer certificate has no usable role");
            conn.close(1u32.into(), b"certificate carries no ringkv role or name");
            return;
        }
    };
    tracing::debug!(service = service.name(), %remote, role = %peer.role, name = %peer.name, "peer connected");
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(
            service.clone(),
            peer.clone(),
            conn.clone(),
            send,
            recv,
        ));
    }
}

/// Reads one request from the stream, runs the handler and writes its reply. The handler
/// is dropped (cancelled at its next await) as soon as the connection closes: the caller
/// is gone (it closed the connection, e.g. on its timeout, or it died and its connection
/// timed out or was reset), so nobody can receive the reply, and work such as streaming a
/// range transfer would go on for nothing.
async fn serve_stream<S: Service>(
    service: Arc<S>,
    peer: Arc<PeerIdentity>,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let max_frame = service.max_frame();
    let reply = match read_frame(&mut recv, max_frame).await {
        Ok(request) => tokio::select! {
            reply = service.handle(&peer, request) => reply,
            reason = conn.closed() => {
                tracing::debug!(service = service.name(), role = %peer.role, remote = %conn.remote_address(), %reason, "connection closed; handler cancelled");
                return;
            }
        },
        // The stream ended or was reset: nobody to answer.
        Err(FrameError::Stream(_)) => return,
        Err(FrameError::Protocol(e)) => {
            tracing::warn!(service = service.name(), role = %peer.role, name = %peer.name, error = %e, "bad request frame");
            // Do not read the rest of an oversized or broken frame.
            let _ = recv.stop(0u32.into());
            service.bad_frame(e)
        }
    };
    let frame = match codec::encode(&reply, max_frame) {
        Ok(frame) => frame,
        Err(e) => codec::encode(&service.unencodable(e), max_frame)
            .expect("a short error reply always fits"),
    };
    // Never wait for the peer's ACK here (ARCHITECTURE.md §9): write, finish, done.
    if send.write_all(&frame).await.is_ok() {
        let _ = send.finish();
    }
}

/// Completes on SIGINT or SIGTERM: the shutdown future of the `ringkv-node` and
/// `ringkv-ecs` services.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops this");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
