//! ECS configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the ECS runs.
#[derive(Debug, Clone)]
pub struct EcsConfig {
    /// UDP address to listen on for operators.
    pub listen: SocketAddr,
    /// Directory of the ECS's persisted ring.
    pub state_dir: PathBuf,
    /// Timeout of a short request to a node (lock, install, status, ...).
    pub node_timeout: Duration,
    /// Timeout of a whole range transfer.
    pub transfer_timeout: Duration,
}

impl EcsConfig {
    /// A configuration with default timeouts (5 s per request, 1 h per transfer).
    pub fn new(listen: SocketAddr, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            state_dir: state_dir.into(),
            node_timeout: Duration::from_secs(5),
            transfer_timeout: Duration::from_secs(3600),
        }
    }
}
