//! The serving side's resource limits ([`ServeLimits`]) and the admission of connections
//! ([`ConnectionLimiter`]), ARCHITECTURE.md §3.
//!
//! What a peer can make a server hold, and what bounds it:
//! - **Connections**: at most [`ServeLimits::max_connections`] in total and
//!   [`ServeLimits::max_connections_per_ip`] from one address, counted from the first packet
//!   (before the handshake) until the connection ends; one over either limit is refused
//!   before any handshake work.
//! - **Streams**: a connection may have at most `max_streams` request streams open at once,
//!   by the role of its certificate ([`RoleLimits`]); before the role is known (during and
//!   right after the handshake) it gets the smallest value of all roles.
//! - **Bytes buffered by QUIC**: at most the connection receive window of its role (data
//!   received but not yet read by the server), again the smallest of all roles until the role
//!   is known.
//! - **Bytes buffered by the framing loop**: a request frame's buffer grows with the bytes
//!   that arrived (at most about twice them, never past the frame limit; `read_frame`), and a
//!   frame not whole within [`ServeLimits::request_read_timeout`] of its stream being
//!   accepted is dropped and the stream stopped. So a stream holds at most one frame
//!   (≤ `max_frame`), and only as much of it as its peer really sent, for at most the
//!   deadline.
//! - **Time**: a connection with no request stream for [`ServeLimits::idle_timeout`] is
//!   closed.
//!
//! Memory bound per connection, worst case (a peer that really sends every byte it may):
//! `receive_window + max_streams × max_frame`; for a client with the defaults
//! 8 MiB + 256 × 4.06 MiB ≈ 1.05 GiB, held for at most the read deadline (10 s) unless the
//! frames are whole requests being handled; a reply the peer does not read is dropped (its
//! stream reset) after the same deadline. A peer that only *claims* large frames or
//! trickles them costs ≈ 16 KiB per stream (the first chunk) plus the QUIC stream state, i.e.
//! ≈ 4 MiB for 256 streams, and is cut off at the deadline. The totals multiply by the
//! connection limits; those are there to bound the *number* of peers' states, the
//! per-connection bounds the size of each.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{TransportConfig, VarInt};
use ringkv_certs::Role;

/// Default [`ServeLimits::request_read_timeout`].
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServeLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default [`ServeLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default [`ServeLimits::max_connections_per_ip`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1024;
/// Default bound on the encoded replies one connection holds while its peer has not read
/// them (16 maximal frames): beyond it a large reply is replaced by a short error.
pub const DEFAULT_MAX_UNSENT_REPLY_BYTES: usize = 64 << 20;
/// Default bound on such replies over all connections of a server.
pub const DEFAULT_MAX_UNSENT_REPLY_BYTES_TOTAL: usize = 512 << 20;
/// Replies up to this size are not counted against the reply budgets (the stream count
/// bounds them: 256 × 64 KiB).
pub const SMALL_REPLY: usize = 64 << 10;

/// Default limits of a `client` connection: 256 streams, an 8 MiB window (room for one
/// maximal request frame, 4,260,864 B with the default limits, and then some).
pub const DEFAULT_CLIENT: RoleLimits = RoleLimits {
    max_streams: 256,
    receive_window: 8 * 1024 * 1024,
};
/// Default limits of a `node` connection: range transfers send four 1 MiB batches at once and
/// should not wait for window updates, so the 64 MiB window every endpoint had before.
pub const DEFAULT_NODE: RoleLimits = RoleLimits {
    max_streams: 1024,
    receive_window: 64 * 1024 * 1024,
};
/// Default limits of an `admin` or `ecs` connection (operators and the ECS: few, short
/// requests).
pub const DEFAULT_ADMIN: RoleLimits = RoleLimits {
    max_streams: 256,
    receive_window: 16 * 1024 * 1024,
};

/// Application close code: the certificate carries no usable role.
pub const CLOSE_NO_ROLE: u32 = 1;
/// Application close code: the service does not admit the certificate's role
/// ([`crate::Service::admits`]).
pub const CLOSE_ROLE_NOT_ADMITTED: u32 = 3;
/// Application close code: no request stream for [`ServeLimits::idle_timeout`] (a request
/// without a reply was never taken, as with [`CLOSE_DRAINED`]).
pub const CLOSE_IDLE: u32 = 4;
/// Application close code: the service shut down after answering every request it had
/// taken on this connection; a request without a reply was never taken (so it was not
/// applied, and may be sent again anywhere).
pub const CLOSE_DRAINED: u32 = 5;
/// Stream error code (`STOP_SENDING` and `RESET_STREAM`): no whole request frame within
/// [`ServeLimits::request_read_timeout`].
pub const STREAM_READ_TIMEOUT: u32 = 1;

/// What one connection of a given role may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleLimits {
    /// Request streams (bidirectional) open at once.
    pub max_streams: u32,
    /// Connection receive window in bytes: data received but not yet read by the server.
    /// Should be at least one maximal frame, so that one maximal request flows without
    /// waiting for window updates.
    pub receive_window: u32,
}

/// The serving side's resource limits, one value per server (node or ECS). See the module
/// documentation for what each bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// From the moment a request stream is accepted until its whole request frame has
    /// arrived. On expiry the stream is stopped and reset, and what arrived is dropped.
    pub request_read_timeout: Duration,
    /// A connection with no request stream (none open, none accepted) for this long is
    /// closed by the server ([`CLOSE_IDLE`], reason "idle"). Clients dial again on their
    /// next request.
    pub idle_timeout: Duration,
    /// Connections open at once, in total (handshakes included).
    pub max_connections: usize,
    /// Connections open at once from one peer address (handshakes included). An IPv6
    /// address counts by its /64 prefix, which one host usually controls whole.
    ///
    /// Keyed by address rather than by certificate identity because the address is known
    /// from the first packet: a connection over the limit is refused before the handshake,
    /// so it costs no TLS work and no connection state, and the limit also bounds peers
    /// without a valid certificate. The price is that clients behind one NAT share the
    /// limit, hence a generous default.
    pub max_connections_per_ip: usize,
    /// Limits of connections whose certificate has the `client` role.
    pub client: RoleLimits,
    /// Limits of connections whose certificate has the `node` role.
    pub node: RoleLimits,
    /// Limits of connections whose certificate has the `admin` or the `ecs` role.
    pub admin: RoleLimits,
    /// Encoded replies (over [`SMALL_REPLY`]) one connection may hold unread by its peer; a
    /// reply that would exceed it is replaced by a short error ([`WireError::ReplyBudget`]).
    pub max_unsent_reply_bytes: usize,
    /// The same over all connections of the server.
    pub max_unsent_reply_bytes_total: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            request_read_timeout: DEFAULT_REQUEST_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            client: DEFAULT_CLIENT,
            node: DEFAULT_NODE,
            admin: DEFAULT_ADMIN,
            max_unsent_reply_bytes: DEFAULT_MAX_UNSENT_REPLY_BYTES,
            max_unsent_reply_bytes_total: DEFAULT_MAX_UNSENT_REPLY_BYTES_TOTAL,
        }
    }
}

impl ServeLimits {
    /// The limits of a connection of `role`.
    pub fn for_role(&self, role: Role) -> RoleLimits {
        match role {
            Role::Client => self.client,
            Role::Node => self.node,
            // The ECS, like an operator, sends few, short requests (a move's bulk data flows
            // between nodes).
            Role::Admin | Role::Ecs => self.admin,
        }
    }

    /// What a connection gets before its role is known: the smallest value of every role,
    /// so that no peer can use more than its role allows while the handshake completes.
    pub fn before_role(&self) -> RoleLimits {
        let all = [self.client, self.node, self.admin];
        RoleLimits {
            max_streams: all.iter().map(|r| r.max_streams).min().unwrap_or(0),
            receive_window: all.iter().map(|r| r.receive_window).min().unwrap_or(0),
        }
    }

    /// The QUIC transport settings of a serving endpoint: the shared ones
    /// (`ringkv_certs::base_transport_config`) with the stream count and connection window
    /// of [`ServeLimits::before_role`], no unidirectional streams and no datagrams (ringkv
    /// uses neither, and either would be memory a peer could fill unread).
    pub fn transport_config(&self) -> Arc<TransportConfig> {
        let first = self.before_role();
        let mut config = ringkv_certs::base_transport_config();
        config
            .max_concurrent_bidi_streams(VarInt::from_u32(first.max_streams))
            .receive_window(VarInt::from_u32(first.receive_window))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None);
        Arc::new(config)
    }

    /// Makes `config` (a `ringkv_certs::server_config`) use [`ServeLimits::transport_config`].
    pub fn apply(&self, config: &mut quinn::ServerConfig) {
        config.transport_config(self.transport_config());
    }

    /// Checks the limits for values that cannot work: zero counts or timeouts, or a receive
    /// window smaller than one frame of `max_frame` bytes.
    pub fn check(&self, max_frame: usize) -> Result<(), String> {
        let positive = [
            ("request read timeout", !self.request_read_timeout.is_zero()),
            ("idle timeout", !self.idle_timeout.is_zero()),
            ("max connections", self.max_connections > 0),
            ("max connections per ip", self.max_connections_per_ip > 0),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(format!("{name} must be positive"));
        }
        let budget = self
            .max_unsent_reply_bytes
            .min(self.max_unsent_reply_bytes_total);
        if budget < max_frame || budget > u32::MAX as usize {
            return Err(format!(
                "the unsent reply budgets must hold one maximal frame ({max_frame} bytes) and fit 32 bits"
            ));
        }
        for role in Role::ALL {
            let limits = self.for_role(role);
            if limits.max_streams == 0 {
                return Err(format!("{role} max streams must be positive"));
            }
            if (limits.receive_window as usize) < max_frame {
                return Err(format!(
                    "{role} receive window {} is smaller than one frame ({max_frame} bytes)",
                    limits.receive_window
                ));
            }
        }
        Ok(())
    }
}

/// The key a peer's connections are counted under: its IPv4 address, or the /64 prefix of
/// its IPv6 address (IPv4-mapped IPv6 addresses count as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey(IpAddr);

impl PeerKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                PeerKey(IpAddr::V6(prefix.into()))
            }
            v4 => PeerKey(v4),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// [`ServeLimits::max_connections`] connections are open.
    #[error("{0} connections open in total")]
    Total(usize),
    /// [`ServeLimits::max_connections_per_ip`] connections are open from this peer.
    #[error("{0} connections open from this address")]
    PerPeer(usize),
}

/// Counts open connections, in total and per [`PeerKey`], against the limits. A synchronous
/// decision: [`ConnectionLimiter::admit`] either hands out a [`ConnectionSlot`], which gives
/// its place back when dropped, or refuses.
///
/// Invariant: `total` is the sum of `per_peer`, and no entry of `per_peer` is zero.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_peer: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
}

impl ConnectionLimiter {
    /// A limiter for at most `max_total` connections, `max_per_peer` from one peer.
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_peer,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// A place for one more connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let peer = PeerKey::of(ip);
        let mut counts = self.counts.lock().expect("connection counts");
        if counts.total >= self.max_total {
            return Err(Refusal::Total(counts.total));
        }
        let from_peer = counts.per_peer.entry(peer).or_insert(0);
        if *from_peer >= self.max_per_peer {
            return Err(Refusal::PerPeer(*from_peer));
        }
        *from_peer += 1;
        counts.total += 1;
        Ok(ConnectionSlot {
            limiter: self.clone(),
            peer,
        })
    }

    /// Connections open in total, and from `ip`'s peer key.
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let counts = self.counts.lock().expect("connection counts");
        let from_peer = counts.per_peer.get(&PeerKey::of(ip)).copied();
        (counts.total, from_peer.unwrap_or(0))
    }

    fn release(&self, peer: PeerKey) {
        let mut counts = self.counts.lock().expect("connection counts");
        counts.total -= 1;
        if let Some(n) = counts.per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&peer);
            }
        }
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    peer: PeerKey,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limiter.release(self.peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_peer_and_total_limits_and_slots_give_back_their_place() {
        let limiter = ConnectionLimiter::new(3, 2);
        let a1 = limiter.admit(ip("10.0.0.1")).unwrap();
        let _a2 = limiter.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limiter.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::PerPeer(2)
        );
        let _b1 = limiter.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            limiter.admit(ip("10.0.0.3")).unwrap_err(),
            Refusal::Total(3)
        );
        assert_eq!(limiter.open(ip("10.0.0.1")), (3, 2));
        drop(a1);
        assert_eq!(limiter.open(ip("10.0.0.1")), (2, 1));
        let _a3 = limiter.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limiter.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::Total(3)
        );
    }

    #[test]
    fn empty_peers_are_forgotten() {
        let limiter = ConnectionLimiter::new(10, 10);
        for n in 0..100u8 {
            drop(limiter.admit(IpAddr::from([10, 0, 0, n])).unwrap());
        }
        let counts = limiter.counts.lock().unwrap();
        assert_eq!(counts.total, 0);
        assert!(counts.per_peer.is_empty());
    }

    #[test]
    fn ipv6_counts_by_its_64_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            PeerKey::of(ip("2001:db8:1:2:aaaa::1")),
            PeerKey::of(ip("2001:db8:1:2:bbbb::7"))
        );
        assert_ne!(
            PeerKey::of(ip("2001:db8:1:2::1")),
            PeerKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            PeerKey::of(ip("::ffff:10.0.0.1")),
            PeerKey::of(ip("10.0.0.1"))
        );
    }

    #[test]
    fn before_the_role_is_known_a_peer_gets_the_least_of_every_role() {
        let limits = ServeLimits::default();
        assert_eq!(limits.before_role(), DEFAULT_CLIENT);
        let mut odd = limits;
        odd.admin.max_streams = 7;
        odd.node.receive_window = 5 << 20;
        assert_eq!(
            odd.before_role(),
            RoleLimits {
                max_streams: 7,
                receive_window: 5 << 20
            }
        );
        let debug = format!("{:?}", limits.transport_config());
        for needle in [
            "max_concurrent_bidi_streams: 256",
            "max_concurrent_uni_streams: 0",
            "receive_window: 8388608",
            "datagram_receive_buffer_size: None",
        ] {
            assert!(debug.contains(needle), "{needle} missing from {debug}");
        }
    }

    #[test]
    fn defaults_pass_their_own_check_and_bad_values_do_not() {
        let max_frame = ringkv_wire::Limits::default().max_frame;
        ServeLimits::default().check(max_frame).unwrap();
        let mut small = ServeLimits::default();
        small.client.receive_window = 1 << 20;
        assert!(small.check(max_frame).unwrap_err().contains("client"));
        let zero = ServeLimits {
            idle_timeout: Duration::ZERO,
            ..ServeLimits::default()
        };
        assert!(zero.check(max_frame).unwrap_err().contains("idle"));
    }
}
