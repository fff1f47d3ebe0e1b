//! The connection layer: one reused QUIC connection per peer, one bidirectional stream per
//! request (ARCHITECTURE.md §3). Clients, nodes (for range transfers) and the ECS all use it, so there
//! is one framing loop on the calling side.
//!
//! Invariant: at most one connection attempt per peer is in flight; concurrent callers for
//! the same peer wait for it and then share the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, VarInt};
use ringkv_certs::Identity;
use ringkv_wire::{codec, Limits, Reply, Request};
use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{read_frame, FrameError};
use crate::limits::{CLOSE_DRAINED, CLOSE_IDLE};
use crate::TransportError;

type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;

/// Sends requests to peers over mutually authenticated QUIC connections.
pub struct Transport {
    /// The endpoint and what dialling needs, cloned into each dial's task.
    dialer: Dialer,
    limits: Limits,
    request_timeout: Duration,
    conns: Mutex<HashMap<String, Slot>>,
}

/// What a dial needs, owned, so that it can run in a task of its own ([`Transport::connection`]).
#[derive(Clone)]
struct Dialer {
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    connect_timeout: Duration,
    /// The last failed dial per address (when it ended, and why): callers that queued
    /// behind a dial share its failure instead of each dialing (and timing out) in turn.
    dial_failures: Arc<Mutex<HashMap<String, (Instant, String)>>>,
}

impl Dialer {
    /// The open connection in `slot`, or a new one to `addr` stored there, and whether it
    /// was already open. Callers queued on the slot since `queued` share a failed dial
    /// instead of each dialling (and timing out) in turn.
    async fn connect(
        &self,
        slot: Slot,
        addr: &str,
        queued: Instant,
    ) -> Result<(Connection, bool), TransportError> {
        let mut guard = slot.lock_owned().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok((conn.clone(), true));
            }
        }
        let failed_meanwhile = self
            .dial_failures
            .lock()
            .expect("dial failures lock")
            .get(addr)
            .filter(|(at, _)| *at >= queued)
            .map(|(_, reason)| reason.clone());
        if let Some(reason) = failed_meanwhile {
            return Err(TransportError::Connect {
                addr: addr.to_string(),
                reason: format!("{reason} (a dial that was under way when this request came)"),
            });
        }
        let dialed = self.dial(addr).await;
        let mut failures = self.dial_failures.lock().expect("dial failures lock");
        match dialed {
            Ok(conn) => {
                failures.remove(addr);
                *guard = Some(conn.clone());
                Ok((conn, false))
            }
            Err(e) => {
                failures.insert(addr.to_string(), (Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    async fn dial(&self, addr: &str) -> Result<Connection, TransportError> {
        let bad = |reason: String| TransportError::Address {
            addr: addr.to_string(),
            reason,
        };
        let (host, _) = addr
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port".into()))?;
        let server_name = host.trim_start_matches('[').trim_end_matches(']');
        let socket = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| bad(e.to_string()))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| bad("no IPv4 address".into()))?;
        let fail = |reason: String| TransportError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), socket, server_name)
            .map_err(|e| fail(e.to_string()))?;
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(conn)) => {
                tracing::debug!(peer = addr, "connected");
                Ok(conn)
            }
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail(format!("timed out after {:?}", self.connect_timeout))),
        }
    }
}

impl Transport {
    /// A transport that dials from `endpoint` with `client_config`.
    pub fn new(
        endpoint: Endpoint,
        client_config: quinn::ClientConfig,
        limits: Limits,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Self {
        Self {
            dialer: Dialer {
                endpoint,
                client_config,
                connect_timeout,
                dial_failures: Arc::new(Mutex::new(HashMap::new())),
            },
            limits,
            request_timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// A client-only transport on a fresh UDP socket, authenticating as `identity`.
    pub fn bind_client(
        identity: &Identity,
        limits: Limits,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, TransportError> {
        ringkv_certs::install_crypto_provider();
        let client_config = ringkv_certs::client_config(identity)?;
        let endpoint =
            Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))).map_err(TransportError::Bind)?;
        Ok(Self::new(
            endpoint,
            client_config,
            limits,
            connect_timeout,
            request_timeout,
        ))
    }

    /// The limits frames are checked against.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Sends `request` to `addr` and waits for the reply, reusing (or opening) the connection.
    pub async fn request(&self, addr: &str, request: &Request) -> Result<Reply, TransportError> {
        self.call(addr, request, self.request_timeout).await
    }

    /// [`Transport::request`] without the resend on a connection found dead: for a client's
    /// write, whose first attempt may have been applied by a peer that died before it
    /// answered. Sent again to the restarted peer, it would be applied a second time and
    /// answered as if it were the first (a delete that "did not exist", a put that "created"
    /// the key), and could undo a write made in between. A failure after the request may
    /// have left is [`TransportError::Stream`]: the outcome is unknown.
    pub async fn request_once(
        &self,
        addr: &str,
        request: &Request,
    ) -> Result<Reply, TransportError> {
        self.call_inner(addr, request, self.request_timeout, false)
            .await
    }

    /// Sends any request message to `addr` and waits up to `timeout` for its reply (the ECS
    /// protocol and long range transfers use this).
    ///
    /// If the exchange fails because a connection that was already open before this call
    /// turns out to be dead (closed or reset by the peer, e.g. by the stateless reset of a
    /// peer that restarted, ARCHITECTURE.md §3), the request is sent **once more** on a new
    /// connection, within what is left of `timeout` and only if that is at least a quarter
    /// of it: the whole call never takes longer than `timeout` (plus the dial, if it had to
    /// dial first). A request on a connection dialled by this very call is not retried.
    /// Nor is one that timed out: it used the whole of `timeout`, and cutting it shorter to
    /// make room for a retry would abandon slow but live requests (a long `TransferRange`).
    ///
    /// The retry can deliver a request twice (the first attempt may have reached the peer
    /// before the connection died; ARCHITECTURE.md §3). A failed retry is reported as
    /// [`TransportError::Stream`] even if it could not connect, because the first attempt may
    /// have been applied — unless the peer had closed the connection saying it took no
    /// request without answering it ([`TransportError::NotTaken`], ARCHITECTURE.md §11).
    pub async fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        addr: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<A, TransportError> {
        self.call_inner(addr, request, timeout, true).await
    }

    /// [`Transport::call`], sending once more on a new connection only if `resend`.
    async fn call_inner<Q: Serialize, A: DeserializeOwned>(
        &self,
        addr: &str,
        request: &Q,
        timeout: Duration,
        resend: bool,
    ) -> Result<A, TransportError> {
        let frame =
            codec::encode(request, self.limits.max_frame).map_err(TransportError::Encode)?;
        let (conn, reused) = self.connection(addr).await?;
        let started = Instant::now();
        let first = match self.attempt(addr, &conn, &frame, timeout).await {
            Ok(reply) => return Ok(reply),
            Err(failure) => failure,
        };
        let deadline = started + timeout;
        let left = deadline.saturating_duration_since(Instant::now());
        let not_taken = first.not_taken;
        let first_reason = match first {
            Failure {
                error: FrameError::Stream(reason),
                dead: true,
                ..
            } if resend && reused && left >= timeout / 4 => reason,
            Failure {
                error: FrameError::Stream(reason),
                not_taken: true,
                ..
            } => {
                return Err(TransportError::NotTaken {
                    addr: addr.to_string(),
                    reason,
                })
            }
            Failure { error, .. } => return Err(error.into_transport(addr)),
        };
        tracing::debug!(peer = addr, reason = %first_reason, ?left, "connection found dead; sending again on a new connection");
        let retried = |reason: &dyn std::fmt::Display| TransportError::Stream {
            addr: addr.to_string(),
            reason: format!("{first_reason}; again on a new connection: {reason}"),
        };
        // A request the peer did not take, that cannot be sent again, was not applied.
        let unsent = |reason: &dyn std::fmt::Display| {
            if not_taken {
                TransportError::NotTaken {
                    addr: addr.to_string(),
                    reason: format!("{first_reason}; again on a new connection: {reason}"),
                }
            } else {
                retried(reason)
            }
        };
        let conn = match tokio::time::timeout_at(deadline.into(), self.connection(addr)).await {
            Ok(Ok((conn, _))) => conn,
            Ok(Err(e)) => return Err(unsent(&e)),
            Err(_) => return Err(unsent(&format!("no connection within {left:?}"))),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match self.attempt(addr, &conn, &frame, left).await {
            Ok(reply) => Ok(reply),
            Err(Failure {
                error: FrameError::Stream(reason),
                not_taken: again_not_taken,
                ..
            }) => Err(if again_not_taken {
                unsent(&reason)
            } else {
                retried(&reason)
            }),
            Err(Failure { error, .. }) => Err(error.into_transport(addr)),
        }
    }

    /// One exchange on `conn` within `timeout`. On timeout the connection is **closed** and
    /// forgotten rather than left with the request queued in it: QUIC would deliver it once
    /// the path heals, long after the caller gave up (a late unlock or range delete could
    /// then undo newer work). The next request dials afresh, which also avoids a connection
    /// stuck after a partition. A connection found closed is forgotten too.
    async fn attempt<A: DeserializeOwned>(
        &self,
        addr: &str,
        conn: &Connection,
        frame: &[u8],
        timeout: Duration,
    ) -> Result<A, Failure> {
        match tokio::time::timeout(timeout, exchange(conn, frame, self.limits.max_frame)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => {
                let Some(closed) = conn.close_reason() else {
                    return Err(Failure {
                        error,
                        dead: false,
                        not_taken: false,
                    });
                };
                self.forget_connection(addr, conn);
                // Closed by a peer that answers every request it took before it closes
                // this way: ours was not taken.
                let not_taken = matches!(
                    &closed,
                    quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == VarInt::from_u32(CLOSE_DRAINED)
                            || c.error_code == VarInt::from_u32(CLOSE_IDLE)
                );
                match error {
                    // Say why ("connection lost" alone does not).
                    FrameError::Stream(reason) => {
                        let closed = closed.to_string();
                        Err(Failure {
                            error: FrameError::Stream(if reason.contains(&closed) {
                                reason
                            } else {
                                format!("{reason}: {closed}")
                            }),
                            dead: true,
                            not_taken,
                        })
                    }
                    error => Err(Failure {
                        error,
                        dead: false,
                        not_taken: false,
                    }),
                }
            }
            Err(_) => {
                conn.close(2u32.into(), b"request timed out");
                self.forget_connection(addr, conn);
                Err(Failure {
                    error: FrameError::Stream(format!("no reply within {timeout:?}")),
                    dead: false,
                    not_taken: false,
                })
            }
        }
    }

    /// The cached connection to `addr`, or a new one, and whether it was already open
    /// (`true`) rather than dialled now.
    ///
    /// The fast path (an open connection exists) is one uncontended lock and a lookup
    /// without allocating; only dialing goes through the per-peer async lock.
    async fn connection(&self, addr: &str) -> Result<(Connection, bool), TransportError> {
        let slot = {
            let mut conns = self.conns.lock().expect("conns lock");
            match conns.get(addr) {
                Some(slot) => {
                    if let Ok(guard) = slot.try_lock() {
                        if let Some(conn) = guard.as_ref().filter(|c| c.close_reason().is_none()) {
                            return Ok((conn.clone(), true));
                        }
                    }
                    slot.clone()
                }
                None => conns.entry(addr.to_string()).or_default().clone(),
            }
        };
        let queued = Instant::now();
        // The dial runs in a task of its own that holds the peer's slot: a caller that gives
        // up (its own timeout, e.g. a probe's) does not cut the handshake short, and the
        // connection is kept for the next caller. Dropping a handshake half way throws its
        // work away, and when many peers are dialled at once (an ECS leasing thousands of
        // nodes: `ringkv-bench lease-scale`) every caller giving up and dialling again
        // keeps the endpoint doing handshakes that never finish. Bounded by the connect
        // timeout.
        let dialer = self.dialer.clone();
        let peer = addr.to_string();
        let dialing = tokio::spawn(async move { dialer.connect(slot, &peer, queued).await });
        match dialing.await {
            Ok(result) => result,
            Err(e) => Err(TransportError::Connect {
                addr: addr.to_string(),
                reason: format!("the dial task failed: {e}"),
            }),
        }
    }

    /// Drops `conn` from the cache if it is still the cached connection to `addr` (a
    /// concurrent caller may already have replaced it with a new one, which stays).
    fn forget_connection(&self, addr: &str, conn: &Connection) {
        let mut conns = self.conns.lock().expect("conns lock");
        let cached = conns.get(addr).is_some_and(|slot| {
            slot.try_lock().is_ok_and(|guard| {
                guard
                    .as_ref()
                    .is_some_and(|c| c.stable_id() == conn.stable_id())
            })
        });
        if cached {
            conns.remove(addr);
        }
    }

    /// Closes every connection gracefully and waits (bounded) for the peers to learn it.
    pub async fn close(&self) {
        let slots: Vec<Slot> = self
            .conns
            .lock()
            .expect("conns lock")
            .drain()
            .map(|(_, s)| s)
            .collect();
        for slot in slots {
            if let Some(conn) = slot.lock().await.take() {
                conn.close(0u32.into(), b"disconnect");
            }
        }
    }

    /// Closes the endpoint itself (after [`Transport::close`]); used by clients that own it.
    pub async fn shutdown_endpoint(&self) {
        self.dialer.endpoint.close(0u32.into(), b"disconnect");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.dialer.endpoint.wait_idle()).await;
    }
}

/// Why one exchange failed, and whether its connection was found dead (closed by either
/// side or reset; not closed by this exchange's own timeout).
struct Failure {
    error: FrameError,
    dead: bool,
    /// The peer closed the connection without taking the request ([`CLOSE_DRAINED`],
    /// [`CLOSE_IDLE`]).
    not_taken: bool,
}

impl FrameError {
    fn into_transport(self, addr: &str) -> TransportError {
        match self {
            FrameError::Stream(reason) => TransportError::Stream {
                addr: addr.to_string(),
                reason,
            },
            FrameError::Protocol(source) => TransportError::Protocol {
                addr: addr.to_string(),
                source,
            },
        }
    }
}

/// One request/reply on a fresh stream. Never waits for the peer's ACK of our finished send:
/// the reply itself proves receipt (ARCHITECTURE.md §9).
async fn exchange<A: DeserializeOwned>(
    conn: &Connection,
    frame: &[u8],
    max_frame: usize,
) -> Result<A, FrameError> {
    let t = |e: &dyn std::fmt::Display| FrameError::Stream(e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| t(&e))?;
    send.write_all(frame).await.map_err(|e| t(&e))?;
    send.finish().map_err(|e| t(&e))?;
    read_frame(&mut recv, max_frame).await
}
