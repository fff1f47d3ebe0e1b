//! The `ringkv-node` binary's code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ringkv_certs::Identity;
use ringkv_wire::Limits;

use ringkv_node::gossip::{
    GossipConfig, DEFAULT_DEAD_MS, DEFAULT_FANOUT, DEFAULT_INTERVAL_MS, DEFAULT_MAX_HEARTBEATS,
    DEFAULT_SUSPECT_MS,
};
use ringkv_node::NodeConfig;

use super::serve_limits::ServeLimitsArgs;

/// ringkv storage node.
#[derive(Debug, Parser)]
#[command(name = "ringkv-node", version, about = "ringkv storage node")]
pub struct Args {
    /// TOML file of defaults for these flags: keys are the long flag names (`listen`,
    /// `advertise`, `data-dir`, ...); a flag given on the command line wins.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node name: its name in the ring and the name of its certificate in --certs.
    #[arg(long)]
    pub name: String,
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// host:port that clients and peers dial (default: --listen). Must be a SAN of the
    /// node certificate; the node's ring position is SHA-1 of this string.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Directory of the node's data.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Directory holding ca.pem and <name>.pem/.key (a node's certificate is issued to its
    /// name).
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    /// Serve at once; with no persisted ring, bootstrap a one-node ring (standalone mode),
    /// signed with the ecs-role certificate --standalone-cert.
    #[arg(long)]
    pub start: bool,
    /// Standalone mode: the ecs-role certificate in --certs that signs the one-node ring
    /// (clients accept no ring the ECS did not sign).
    #[arg(long, default_value = "ecs")]
    pub standalone_cert: String,
    /// Maximum key length in bytes.
    #[arg(long, default_value_t = ringkv_wire::limits::DEFAULT_MAX_KEY)]
    pub max_key: usize,
    /// Maximum value length in bytes.
    #[arg(long, default_value_t = ringkv_wire::limits::DEFAULT_MAX_VALUE)]
    pub max_value: usize,
    /// Most bytes per second a range snapshot sends to a joining or receiving node, so that
    /// moves do not starve client traffic (0: unlimited). The short delta sent while the
    /// range is write-locked is never throttled.
    #[arg(long, default_value_t = 0)]
    pub transfer_rate_limit: u64,
    /// Write jobs queued to the storage writer at once; beyond that a write waits for room
    /// (its client's request timeout bounds the wait).
    #[arg(long, default_value_t = ringkv_node::storage::DEFAULT_MAX_QUEUED_WRITES)]
    pub max_queued_writes: usize,
    /// The fewest live copies a key's range must have for this node to take a write of it
    /// as its head (like Kafka's min.insync.replicas); below it writes are refused with
    /// NOT_ENOUGH_COPIES and nothing is applied. 1: take writes while any copy is live.
    #[arg(long, default_value_t = 1)]
    pub min_copies: u8,
    /// The most this host's wall clock may be off from any other node's (e.g. 500ms, 2s).
    /// Expiry is decided by the clock of a key's head: a node serving a read of a key
    /// within this of its expiry by its own clock asks the head first.
    #[arg(long, default_value = "500ms", value_parser = super::ecs::parse_duration)]
    pub max_clock_offset: Duration,
    /// Gossip and failure detection.
    #[command(flatten)]
    pub gossip: GossipArgs,
    /// What peers may make the node hold.
    #[command(flatten)]
    pub serve: ServeLimitsArgs,
}

impl Args {
    /// The node configuration these arguments describe; fails on serving limits that
    /// cannot work.
    pub fn config(&self) -> anyhow::Result<NodeConfig> {
        let mut config = NodeConfig::new(self.name.clone(), self.listen, self.data_dir.clone());
        if let Some(a) = &self.advertise {
            config.advertise = a.clone();
        }
        config.start = self.start;
        config.limits = Limits::new(self.max_key, self.max_value);
        config.gossip = self.gossip.config();
        config.transfer_rate_limit = Some(self.transfer_rate_limit).filter(|r| *r > 0);
        config.max_queued_writes = self.max_queued_writes.max(1);
        config.min_copies = self.min_copies.max(1);
        config.max_clock_offset = self.max_clock_offset;
        config.serve = self.serve.limits(config.limits.max_frame)?;
        Ok(config)
    }
}

/// Parses arguments and runs the node on a current-thread runtime until SIGINT/SIGTERM.
pub fn main() -> anyhow::Result<()> {
    super::init_tracing("info");
    let args: Args = super::config_file::parse()?;
    super::runtime()?.block_on(async {
        let identity = Identity::from_dir(&args.certs, &args.name).with_context(|| {
            format!(
                "loading node identity '{}' from {}",
                args.name,
                args.certs.display()
            )
        })?;
        let mut config = args.config()?;
        if args.start
            && args
                .certs
                .join(format!("{}.pem", args.standalone_cert))
                .exists()
        {
            let signer = Identity::from_dir(&args.certs, &args.standalone_cert)
                .map_err(anyhow::Error::from)
                .and_then(|id| Ok(ringkv_transport::RingSigner::new(&id)?))
                .with_context(|| {
                    format!(
                        "loading the standalone signer '{}' from {}",
                        args.standalone_cert,
                        args.certs.display()
                    )
                })?;
            config.standalone_signer = Some(std::sync::Arc::new(signer));
        }
        let (endpoint, node) = ringkv_node::bind(config, &identity)
            .await
            .context("starting the node")?;
        ringkv_node::run(endpoint, node, ringkv_transport::shutdown_signal()).await;
        Ok(())
    })
}

/// The gossip flags of `ringkv-node`.
#[derive(Debug, Clone, clap::Args)]
pub struct GossipArgs {
    /// Gossip interval T in milliseconds: every T the node advances its heartbeat and
    /// exchanges digests with --gossip-fanout random peers.
    #[arg(long, default_value_t = DEFAULT_INTERVAL_MS)]
    pub gossip_interval_ms: u64,
    /// Gossip fanout k: peers contacted per interval.
    #[arg(long, default_value_t = DEFAULT_FANOUT)]
    pub gossip_fanout: usize,
    /// A peer whose heartbeat has not advanced for this many milliseconds is suspected.
    #[arg(long, default_value_t = DEFAULT_SUSPECT_MS)]
    pub suspect_after_ms: u64,
    /// A peer whose heartbeat has not advanced for this many milliseconds is dead.
    #[arg(long, default_value_t = DEFAULT_DEAD_MS)]
    pub dead_after_ms: u64,
    /// Most other nodes' heartbeats carried in one gossip digest (bounds its size).
    #[arg(long, default_value_t = DEFAULT_MAX_HEARTBEATS)]
    pub gossip_max_heartbeats: usize,
}

impl GossipArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> GossipConfig {
        GossipConfig {
            interval: Duration::from_millis(self.gossip_interval_ms.max(1)),
            fanout: self.gossip_fanout,
            suspect_after: Duration::from_millis(self.suspect_after_ms),
            dead_after: Duration::from_millis(self.dead_after_ms.max(self.suspect_after_ms)),
            max_heartbeats: self.gossip_max_heartbeats,
        }
    }
}
