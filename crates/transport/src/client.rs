//! The connection layer: one reused QUIC connection per peer, one bidirectional stream per
//! request (ARCHITECTURE.md §3). Clients, nodes (for range transfers) and the ECS all use it, so there
//! is one framing loop on the calling side.
//!
//! Invariant: at most one connection attempt per peer is in flight; concurrent callers for
//! the same peer wait for it and then share the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, Endpoint};
use ringkv_certs::Identity;
use ringkv_wire::{codec, Limits, Reply, Request};
use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{read_frame, FrameError};
use crate::TransportError;

type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;

/// Sends requests to peers over mutually authenticated QUIC connections.
pub struct Transport {
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    limits: Limits,
    connect_timeout: Duration,
    request_timeout: Duration,
    conns: Mutex<HashMap<String, Slot>>,
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
            endpoint,
            client_config,
            limits,
            connect_timeout,
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

    /// Sends any request message to `addr` and waits up to `timeout` for its reply (the ECS
    /// protocol and long range transfers use this).
    pub async fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        addr: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<A, TransportError> {
        let frame =
            codec::encode(request, self.limits.max_frame).map_err(TransportError::Encode)?;
        let conn = self.connection(addr).await?;
        let exchange = exchange(&conn, &frame, self.limits.max_frame);
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                // Close the connection rather than leave the request queued in it: QUIC
                // would deliver it once the path heals, long after the caller gave up (a
                // late unlock or range delete could then undo newer work). The next
                // request dials afresh, which also avoids a connection stuck after a
                // partition.
                conn.close(2u32.into(), b"request timed out");
                Err(FrameError::Stream(format!("no reply within {timeout:?}")))
            }
        };
        result.map_err(|e| {
            if conn.close_reason().is_some() {
                self.forget(addr);
            }
            match e {
                FrameError::Stream(reason) => TransportError::Stream {
                    addr: addr.to_string(),
                    reason,
                },
                FrameError::Protocol(source) => TransportError::Protocol {
                    addr: addr.to_string(),
                    source,
                },
            }
        })
    }

    /// The cached connection to `addr`, or a new one.
    ///
    /// The fast path (an open connection exists) is one uncontended lock and a lookup
    /// without allocating; only dialing goes through the per-peer async lock.
    async fn connection(&self, addr: &str) -> Result<Connection, TransportError> {
        let slot = {
            let mut conns = self.conns.lock().expect("conns lock");
            match conns.get(addr) {
                Some(slot) => {
                    if let Ok(guard) = slot.try_lock() {
                        if let Some(conn) = guard.as_ref().filter(|c| c.close_reason().is_none()) {
                            return Ok(conn.clone());
                        }
                    }
                    slot.clone()
                }
                None => conns.entry(addr.to_string()).or_default().clone(),
            }
        };
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let conn = self.dial(addr).await?;
        *guard = Some(conn.clone());
        Ok(conn)
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

    /// Drops the cached connection to `addr` (the next request dials again).
    pub fn forget(&self, addr: &str) {
        self.conns.lock().expect("conns lock").remove(addr);
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
        self.endpoint.close(0u32.into(), b"disconnect");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
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
