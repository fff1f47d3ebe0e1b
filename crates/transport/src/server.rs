//! The serving side of the connection layer: accept mutually authenticated QUIC
//! connections, read one request frame per bidirectional stream, answer with one reply
//! frame. Nodes and the ECS both serve through [`serve`], so framing, limits and the
//! handling of bad frames exist once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use ringkv_certs::{PeerIdentity, Role};
use ringkv_wire::{codec, WireError};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::frame::{read_frame_until, FrameError};
use crate::limits::{
    ConnectionLimiter, ConnectionSlot, ServeLimits, CLOSE_DRAINED, CLOSE_IDLE, CLOSE_NO_ROLE,
    CLOSE_ROLE_NOT_ADMITTED, SMALL_REPLY, STREAM_READ_TIMEOUT,
};

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
    /// The limits [`serve`] enforces (connections, streams, windows, deadlines). The
    /// endpoint's server configuration should be made with the same value
    /// ([`ServeLimits::apply`]), so that a peer gets no more before its role is known.
    fn serve_limits(&self) -> ServeLimits {
        ServeLimits::default()
    }
    /// Whether a peer whose certificate carries `role` may connect at all. A connection of a
    /// role not admitted is closed ([`CLOSE_ROLE_NOT_ADMITTED`]) right after the handshake,
    /// before any stream is accepted, so none of its frames is read. Every role by default.
    fn admits(&self, role: Role) -> bool {
        let _ = role;
        true
    }
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
    /// The short reply sent instead of one that would exceed the unsent reply budgets
    /// ([`WireError::ReplyBudget`]).
    fn unsent(&self, error: WireError) -> Self::Reply {
        self.unencodable(error)
    }
}

/// Serves `service` on `endpoint` until `shutdown` completes, then closes connections
/// gracefully (bounded wait). A handler still running when its connection closes (the
/// caller went away, or the endpoint shut down) is cancelled.
///
/// Enforces [`Service::serve_limits`]: a connection over the total or per-address limit is
/// refused before its handshake; after the handshake the connection gets the stream count
/// and receive window of its peer's role, or is closed if the service does not admit the
/// role; a connection without request streams for the idle timeout is closed; a request
/// frame not whole within the read deadline is dropped and its stream reset.
pub async fn serve<S: Service>(
    endpoint: Endpoint,
    service: Arc<S>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = service.serve_limits();
    let limiter = ConnectionLimiter::new(limits.max_connections, limits.max_connections_per_ip);
    tracing::info!(service = service.name(), addr = ?endpoint.local_addr().ok(), ?limits, "serving");
    let (drain, draining) = tokio::sync::watch::channel(false);
    let unsent_total = Arc::new(Semaphore::new(limits.max_unsent_reply_bytes_total));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let remote = incoming.remote_address();
                    match limiter.admit(remote.ip()) {
                        Ok(slot) => {
                            connections.spawn(serve_connection(
                                service.clone(),
                                limits,
                                incoming,
                                slot,
                                draining.clone(),
                                unsent_total.clone(),
                            ));
                        }
                        Err(refusal) => {
                            // Debug only: a flood of refusals must not become a flood of logs.
                            tracing::debug!(service = service.name(), %remote, %refusal, "connection refused");
                            incoming.refuse();
                        }
                    }
                }
                None => break,
            },
        }
    }
    // Drain: every connection stops taking requests, answers those it took, and closes
    // with CLOSE_DRAINED, so that a caller without a reply knows its request was not taken.
    // Whatever is not drained in time is closed with code 0 (its requests may have run).
    tracing::info!(service = service.name(), "shutting down");
    let _ = drain.send(true);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// One connection, holding its place (`_slot`) until it ends: handshake, role, admission,
/// role limits, then one task per request stream until the connection closes or is idle.
async fn serve_connection<S: Service>(
    service: Arc<S>,
    limits: ServeLimits,
    incoming: quinn::Incoming,
    _slot: ConnectionSlot,
    mut draining: tokio::sync::watch::Receiver<bool>,
    unsent_total: Arc<Semaphore>,
) {
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
            tracing::warn!(service = service.name(), %remote, error = %e, "peer certificate has no usable role or name");
            conn.close(
                CLOSE_NO_ROLE.into(),
                b"certificate carries no ringkv role or name",
            );
            return;
        }
    };
    let role = peer.role;
    if !service.admits(role) {
        tracing::info!(service = service.name(), %remote, ?role, "role not admitted; connection closed");
        let reason = format!("{} does not admit {role} certificates", service.name());
        conn.close(CLOSE_ROLE_NOT_ADMITTED.into(), reason.as_bytes());
        return;
    }
    let granted = limits.for_role(role);
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(granted.max_streams));
    conn.set_receive_window(VarInt::from_u32(granted.receive_window));
    tracing::debug!(service = service.name(), %remote, %role, name = %peer.name, "peer connected");
    let mut streams = JoinSet::new();
    let replies = Arc::new(Replies::default());
    let budgets = ReplyBudgets {
        connection: Arc::new(Semaphore::new(limits.max_unsent_reply_bytes)),
        total: unsent_total,
        limits,
    };
    loop {
        // The idle clock runs only while no request stream is open, and restarts at every
        // event (a stream accepted or finished).
        let idle_for = streams.is_empty().then_some(limits.idle_timeout);
        let idle = async move {
            match idle_for {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(
                        service.clone(),
                        peer.clone(),
                        conn.clone(),
                        send,
                        recv,
                        replies.clone(),
                        budgets.clone(),
                    ));
                }
                // Closed by either side, lost or timed out: the stream tasks race the same
                // closing and are dropped with the set.
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            () = idle => {
                tracing::debug!(service = service.name(), %remote, ?role, timeout = ?limits.idle_timeout, "idle connection closed");
                // CLOSE_IDLE tells the peer that a request without a reply was not taken:
                // true only if every earlier reply arrived.
                let deadline = Instant::now() + Duration::from_millis(100);
                let code = if replies.all_delivered(deadline).await { CLOSE_IDLE } else { 0 };
                conn.close(code.into(), b"idle");
                break;
            }
            _ = draining.changed() => {
                if !*draining.borrow_and_update() {
                    continue;
                }
                // Shutting down: no new request; answer the ones taken, then close.
                while streams.join_next().await.is_some() {}
                // The replies were written but maybe not delivered yet, and a close drops
                // unsent data: wait for their acknowledgements before vouching for the drain.
                let deadline = Instant::now() + DRAIN_TIMEOUT;
                if replies.all_delivered(deadline).await {
                    conn.close(CLOSE_DRAINED.into(), b"shutting down");
                } else {
                    conn.close(0u32.into(), b"shutting down");
                }
                break;
            }
        }
    }
}

/// Longest a shutdown waits for the requests in progress to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads one request from the stream (within the request read deadline of its acceptance), runs the
/// handler and writes its reply. The handler is dropped (cancelled at its next await) as
/// soon as the connection closes: the caller is gone (it closed the connection, e.g. on its
/// timeout, or it died and its connection timed out or was reset), so nobody can receive
/// the reply, and work such as streaming a range transfer would go on for nothing.
async fn serve_stream<S: Service>(
    service: Arc<S>,
    peer: Arc<PeerIdentity>,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    replies: Arc<Replies>,
    budgets: ReplyBudgets,
) {
    let read_timeout = budgets.limits.request_read_timeout;
    let max_frame = service.max_frame();
    let role = peer.role;
    let deadline = Instant::now() + read_timeout;
    let reply = match read_frame_until(&mut recv, max_frame, deadline).await {
        Ok(Some(request)) => tokio::select! {
            reply = service.handle(&peer, request) => reply,
            reason = conn.closed() => {
                tracing::debug!(service = service.name(), ?role, remote = %conn.remote_address(), %reason, "connection closed; handler cancelled");
                return;
            }
        },
        Ok(None) => {
            // Silent or trickling: drop what arrived, tell the peer to stop, answer nothing.
            tracing::debug!(service = service.name(), ?role, remote = %conn.remote_address(), ?read_timeout, "no whole request frame in time; stream reset");
            let _ = recv.stop(STREAM_READ_TIMEOUT.into());
            let _ = send.reset(STREAM_READ_TIMEOUT.into());
            return;
        }
        // The stream ended or was reset: nobody to answer.
        Err(FrameError::Stream(_)) => return,
        Err(FrameError::Protocol(e)) => {
            tracing::warn!(service = service.name(), ?role, name = %peer.name, error = %e, "bad request frame");
            // Do not read the rest of an oversized or broken frame.
            let _ = recv.stop(0u32.into());
            service.bad_frame(e)
        }
    };
    let mut frame = match codec::encode(&reply, max_frame) {
        Ok(frame) => frame,
        Err(e) => codec::encode(&service.unencodable(e), max_frame)
            .expect("a short error reply always fits"),
    };
    // Only the encoded frame waits for the peer to read it, not the decoded reply too (a
    // value is otherwise held twice while a slow reader takes its reply).
    drop(reply);
    // A large reply holds its bytes against the connection's and the server's budgets
    // until it is written; one that would exceed them is dropped at once for a short error,
    // so a peer that never reads cannot make the server hold replies without bound.
    let held = match budgets.reserve(frame.len()) {
        Ok(held) => held,
        Err(error) => {
            tracing::debug!(service = service.name(), ?role, remote = %conn.remote_address(), %error, "reply over the unsent budget; replaced by an error");
            frame = codec::encode(&service.unsent(error), max_frame)
                .expect("a short error reply always fits");
            None
        }
    };
    // Never wait for the peer's ACK here (ARCHITECTURE.md §9): write, finish, done. A peer
    // that does not read its reply holds it for at most the read deadline again.
    match tokio::time::timeout(read_timeout, send.write_all(&frame)).await {
        Ok(Ok(())) => {
            let _ = send.finish();
            // Kept until the peer acknowledged it, so that a drain knows every reply arrived.
            replies.keep(send);
        }
        Ok(Err(_)) => replies.lost(),
        Err(_) => {
            tracing::debug!(service = service.name(), ?role, remote = %conn.remote_address(), "reply not read in time; stream reset");
            let _ = send.reset(STREAM_READ_TIMEOUT.into());
            replies.lost();
        }
    }
    // Written (or given up): its bytes are quinn's now, within the connection's send window.
    drop(held);
}

/// The unsent reply budgets of one connection: its own and the server's
/// ([`ServeLimits::max_unsent_reply_bytes`] and `_total`), with the limits they come from
/// (a stream also takes its read deadline from them).
#[derive(Clone)]
struct ReplyBudgets {
    connection: Arc<Semaphore>,
    total: Arc<Semaphore>,
    limits: ServeLimits,
}

impl ReplyBudgets {
    /// Reserves `bytes` of both budgets for a reply being written (`None` for a small reply,
    /// which is not counted), or says which budget it would exceed.
    fn reserve(
        &self,
        bytes: usize,
    ) -> Result<Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>, WireError> {
        if bytes <= SMALL_REPLY {
            return Ok(None);
        }
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        let connection = self
            .connection
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| WireError::ReplyBudget {
                bytes,
                budget: self.limits.max_unsent_reply_bytes,
            })?;
        let total =
            self.total
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| WireError::ReplyBudget {
                    bytes,
                    budget: self.limits.max_unsent_reply_bytes_total,
                })?;
        Ok(Some((connection, total)))
    }
}

/// The replies of one connection that were written but maybe not yet acknowledged by the
/// peer: a drain closes the connection with [`CLOSE_DRAINED`] ("no reply missing means the
/// request was not taken") only once all of them are, since closing drops unsent data.
/// Bounded: acknowledged ones are pruned as more are kept, and past the bound the connection
/// simply loses its claim to a clean drain.
#[derive(Default)]
struct Replies {
    unconfirmed: std::sync::Mutex<Vec<SendStream>>,
    /// A reply was lost, reset or dropped unconfirmed: the drain cannot vouch for this
    /// connection.
    doubtful: std::sync::atomic::AtomicBool,
}

/// Most replies a connection keeps waiting for their acknowledgement.
const MAX_UNCONFIRMED_REPLIES: usize = 1024;

impl Replies {
    fn keep(&self, send: SendStream) {
        let mut unconfirmed = self.unconfirmed.lock().expect("replies lock");
        if unconfirmed.len() >= MAX_UNCONFIRMED_REPLIES {
            unconfirmed.retain(|s| {
                use futures::FutureExt;
                s.stopped().now_or_never().is_none()
            });
            if unconfirmed.len() >= MAX_UNCONFIRMED_REPLIES {
                unconfirmed.clear();
                self.lost();
            }
        }
        unconfirmed.push(send);
    }

    fn lost(&self) {
        self.doubtful
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits (until `deadline`) for every kept reply to be acknowledged; whether all were,
    /// and none was lost before.
    async fn all_delivered(&self, deadline: Instant) -> bool {
        let kept = std::mem::take(&mut *self.unconfirmed.lock().expect("replies lock"));
        for send in &kept {
            match tokio::time::timeout_at(deadline, send.stopped()).await {
                Ok(Ok(None)) => {}
                _ => self.lost(),
            }
        }
        !self.doubtful.load(std::sync::atomic::Ordering::Relaxed)
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
