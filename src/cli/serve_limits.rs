//! The serving-limit flags shared by `ringkv-node` and `ringkv-ecs serve`
//! (`ringkv_transport::ServeLimits`, ARCHITECTURE.md §3). Like every flag, each is also a key
//! of `--config FILE`.

use std::time::Duration;

use ringkv_transport::limits::{
    DEFAULT_ADMIN, DEFAULT_CLIENT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_MAX_UNSENT_REPLY_BYTES,
    DEFAULT_MAX_UNSENT_REPLY_BYTES_TOTAL, DEFAULT_NODE, DEFAULT_REQUEST_READ_TIMEOUT,
};
use ringkv_transport::{RoleLimits, ServeLimits};

/// What peers may make the server hold.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeLimitsArgs {
    /// Milliseconds from the moment a request stream is accepted until its whole request
    /// frame must have arrived; a stream that is silent or trickles its frame is reset then.
    #[arg(long, default_value_t = DEFAULT_REQUEST_READ_TIMEOUT.as_millis() as u64)]
    pub request_read_timeout_ms: u64,
    /// Milliseconds a connection may go without any request stream before the server closes
    /// it (clients reconnect on their next request).
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT.as_millis() as u64)]
    pub idle_connection_timeout_ms: u64,
    /// Connections open at once, in total; more are refused before their handshake.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections open at once from one IP address (IPv6: one /64); more are refused
    /// before their handshake. Clients behind one NAT share it.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// Request streams open at once on a connection with a `client` certificate.
    #[arg(long, default_value_t = DEFAULT_CLIENT.max_streams)]
    pub client_max_streams: u32,
    /// Receive window in bytes of a `client` connection (at least one maximal frame).
    #[arg(long, default_value_t = DEFAULT_CLIENT.receive_window)]
    pub client_receive_window: u32,
    /// Request streams open at once on a connection with a `node` certificate.
    #[arg(long, default_value_t = DEFAULT_NODE.max_streams)]
    pub node_max_streams: u32,
    /// Receive window in bytes of a `node` connection (range transfers).
    #[arg(long, default_value_t = DEFAULT_NODE.receive_window)]
    pub node_receive_window: u32,
    /// Request streams open at once on a connection with an `admin` certificate.
    #[arg(long, default_value_t = DEFAULT_ADMIN.max_streams)]
    pub admin_max_streams: u32,
    /// Receive window in bytes of an `admin` connection.
    #[arg(long, default_value_t = DEFAULT_ADMIN.receive_window)]
    pub admin_receive_window: u32,
    /// Bytes of large replies one connection may hold unread by its peer; a reply past it
    /// is replaced by a short error (at least one maximal frame).
    #[arg(long, default_value_t = DEFAULT_MAX_UNSENT_REPLY_BYTES)]
    pub max_unsent_reply_bytes: usize,
    /// The same over all connections.
    #[arg(long, default_value_t = DEFAULT_MAX_UNSENT_REPLY_BYTES_TOTAL)]
    pub max_unsent_reply_bytes_total: usize,
}

impl ServeLimitsArgs {
    /// The limits these flags describe, checked against the frame limit `max_frame`.
    pub fn limits(&self, max_frame: usize) -> anyhow::Result<ServeLimits> {
        let limits = ServeLimits {
            request_read_timeout: Duration::from_millis(self.request_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_connection_timeout_ms),
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            client: RoleLimits {
                max_streams: self.client_max_streams,
                receive_window: self.client_receive_window,
            },
            node: RoleLimits {
                max_streams: self.node_max_streams,
                receive_window: self.node_receive_window,
            },
            admin: RoleLimits {
                max_streams: self.admin_max_streams,
                receive_window: self.admin_receive_window,
            },
            max_unsent_reply_bytes: self.max_unsent_reply_bytes,
            max_unsent_reply_bytes_total: self.max_unsent_reply_bytes_total,
        };
        limits
            .check(max_frame)
            .map_err(|e| anyhow::anyhow!("serving limits: {e}"))?;
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        limits: ServeLimitsArgs,
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        let max_frame = ringkv_wire::Limits::default().max_frame;
        let cli = Cli::parse_from(["x"]);
        assert_eq!(
            cli.limits.limits(max_frame).unwrap(),
            ServeLimits::default()
        );
    }

    #[test]
    fn flags_set_every_limit_and_bad_values_are_refused() {
        let max_frame = ringkv_wire::Limits::default().max_frame;
        let cli = Cli::parse_from([
            "x",
            "--request-read-timeout-ms=1500",
            "--idle-connection-timeout-ms=2500",
            "--max-connections=10",
            "--max-connections-per-ip=5",
            "--client-max-streams=8",
            "--node-max-streams=9",
            "--admin-max-streams=7",
        ]);
        let limits = cli.limits.limits(max_frame).unwrap();
        assert_eq!(limits.request_read_timeout, Duration::from_millis(1500));
        assert_eq!(limits.idle_timeout, Duration::from_millis(2500));
        assert_eq!(
            (limits.max_connections, limits.max_connections_per_ip),
            (10, 5)
        );
        assert_eq!(
            (
                limits.client.max_streams,
                limits.node.max_streams,
                limits.admin.max_streams
            ),
            (8, 9, 7)
        );
        let cli = Cli::parse_from(["x", "--client-receive-window=1000"]);
        let e = cli.limits.limits(max_frame).unwrap_err().to_string();
        assert!(e.contains("client receive window"), "{e}");
    }
}
