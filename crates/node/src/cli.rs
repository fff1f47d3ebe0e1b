//! The `ringkv-node` binary's code.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ringkv_certs::Identity;
use ringkv_wire::Limits;

use crate::NodeConfig;

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
    /// Directory holding ca.pem and <cert-name>.pem/.key.
    #[arg(long, default_value = "certs")]
    pub certs: PathBuf,
    /// Certificate name in --certs (default: --name).
    #[arg(long)]
    pub cert_name: Option<String>,
    /// Serve at once; with no persisted ring, bootstrap a one-node ring (standalone mode).
    #[arg(long)]
    pub start: bool,
    /// Maximum key length in bytes.
    #[arg(long, default_value_t = ringkv_wire::limits::DEFAULT_MAX_KEY)]
    pub max_key: usize,
    /// Maximum value length in bytes.
    #[arg(long, default_value_t = ringkv_wire::limits::DEFAULT_MAX_VALUE)]
    pub max_value: usize,
    /// Gossip and failure detection.
    #[command(flatten)]
    pub gossip: crate::gossip::GossipArgs,
}

impl Args {
    /// The node configuration these arguments describe.
    pub fn config(&self) -> NodeConfig {
        let mut config = NodeConfig::new(self.name.clone(), self.listen, self.data_dir.clone());
        if let Some(a) = &self.advertise {
            config.advertise = a.clone();
        }
        config.start = self.start;
        config.limits = Limits::new(self.max_key, self.max_value);
        config.gossip = self.gossip.config();
        config
    }
}

/// Parses arguments and runs the node on a current-thread runtime until SIGINT/SIGTERM.
pub fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let args: Args = kvstore::config_file::parse()?;
    // One thread serves the endpoint: measured ~3x faster than a multi-threaded runtime
    // on 2 cores (DESIGN §9); storage writes have their own thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let cert_name = args.cert_name.clone().unwrap_or_else(|| args.name.clone());
        let identity = Identity::from_dir(&args.certs, &cert_name).with_context(|| {
            format!(
                "loading node identity '{cert_name}' from {}",
                args.certs.display()
            )
        })?;
        let (endpoint, node) = crate::bind(args.config(), &identity)
            .await
            .context("starting the node")?;
        crate::run(endpoint, node, kvstore::server::shutdown_signal()).await;
        Ok(())
    })
}
