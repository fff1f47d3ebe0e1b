//! Client configuration.

use std::time::Duration;

use ringkv_certs::Identity;
use ringkv_wire::Limits;

use crate::retry::RetryPolicy;

/// How a [`crate::KvStore`] connects and retries.
#[derive(Clone)]
pub struct ClientConfig {
    /// `host:port` of nodes to fetch the ring metadata from; any one reachable is enough.
    pub seeds: Vec<String>,
    /// The client identity: cluster CA, certificate chain and key.
    pub identity: Identity,
    /// Key/value/frame limits (must match the nodes').
    pub limits: Limits,
    /// Time allowed for one connection attempt, handshake included.
    pub connect_timeout: Duration,
    /// Time allowed for one request on an established connection.
    pub request_timeout: Duration,
    /// How long and how often to retry.
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// A configuration with default limits and timeouts.
    pub fn new(seeds: Vec<String>, identity: Identity) -> Self {
        Self {
            seeds,
            identity,
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}
