//! One command for a local ringkv: fresh certificates, a storage node on loopback, and the
//! commands to reach it. Runs until Ctrl-C.
//!
//! ```text
//! cargo run --release --example local_cluster [-- --dir ./local --port 7001]
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ringkv_certs::{IssueOptions, Role};
use ringkv_node::NodeConfig;

#[derive(Parser)]
#[command(about = "Start a local ringkv node with fresh certificates")]
struct Args {
    /// Where certificates and data go (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// UDP port of the node.
    #[arg(long, default_value_t = 7001)]
    port: u16,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let (_temp, dir) = match &args.dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        ringkv_certs::init_ca(&certs, false)?;
        let mut node = IssueOptions::new(Role::Node, "n1");
        node.sans = vec!["127.0.0.1".into(), "localhost".into()];
        ringkv_certs::issue(&certs, &node)?;
        ringkv_certs::issue(&certs, &IssueOptions::new(Role::Client, "client"))?;
        ringkv_certs::issue(&certs, &IssueOptions::new(Role::Admin, "admin"))?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let identity = ringkv_certs::Identity::from_dir(&certs, "n1")?;
        let mut config = NodeConfig::new(
            "n1",
            format!("127.0.0.1:{}", args.port).parse()?,
            dir.join("data/n1"),
        );
        config.start = true;
        let (endpoint, node) = ringkv_node::bind(config, &identity)
            .await
            .context("starting node n1")?;
        let addr = node.config().advertise.clone();
        println!("ringkv node n1 listening on {addr}");
        println!("certificates and data in {}", dir.display());
        println!();
        println!("try:");
        let cli = format!(
            "cargo run --release --bin ringkv -- --seed {addr} --certs {}",
            certs.display()
        );
        println!("  {cli} put hello world");
        println!("  {cli} get hello");
        println!("  {cli} shell");
        println!();
        println!("Ctrl-C stops it.");
        ringkv_node::run(endpoint, node, kvstore::server::shutdown_signal()).await;
        anyhow::Ok(())
    })
}
