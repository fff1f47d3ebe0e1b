//! One command for a local ringkv cluster: fresh certificates, the ECS and N storage nodes
//! on loopback (each on its own thread and current-thread runtime, as the binaries run),
//! the nodes added to the ring through the ECS, and the commands to use it, grow it and
//! shrink it. Runs until Ctrl-C.
//!
//! ```text
//! cargo run --release --example local_cluster [-- --nodes 3 --dir ./local --port 7000]
//! ```

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;
use ringkv::local::LocalCluster;
use ringkv_wire::AdminRequest;

#[derive(Parser)]
#[command(about = "Start a local ringkv cluster (ECS + N nodes) with fresh certificates")]
struct Args {
    /// Number of storage nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Where certificates and data go (default: a new temporary directory, removed on exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// UDP port of the ECS; node i listens on port + i.
    #[arg(long, default_value_t = 7000)]
    port: u16,
}

/// Node certificates are made for this many nodes beyond --nodes, so that nodes can be
/// added while the cluster runs.
const SPARE_NODES: usize = 3;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let (_temp, dir) = match &args.dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cluster = runtime.block_on(async {
        let mut cluster = LocalCluster::start(&dir, args.port, args.nodes + SPARE_NODES).await?;
        for i in 1..=args.nodes {
            cluster.add_node(i).await?;
        }
        let status = cluster.ask(AdminRequest::Status).await?;
        print!("{}", ringkv::cli::ecs::reply_text(&status).1);
        let (ecs, certs) = (cluster.ecs_addr, cluster.certs());
        let certs = certs.display();
        let seed = cluster.nodes[0].1;
        let next = args.nodes + 1;
        let next_port = args.port + next as u16;
        println!();
        println!("ECS on {ecs}; certificates and data in {}", dir.display());
        println!();
        println!("use it:");
        for cmd in ["put hello world", "get hello", "shell"] {
            println!("  cargo run --release --bin ringkv -- --seed {seed} --certs {certs} {cmd}");
        }
        println!("watch it:");
        println!("  cargo run --release --bin ringkv-ecs -- --ecs {ecs} --certs {certs} status");
        println!(
            "grow it (start a node, then add it; certificates exist up to n{}):",
            args.nodes + SPARE_NODES
        );
        println!(
            "  cargo run --release --bin ringkv-node -- --name n{next} --listen 127.0.0.1:{next_port} --data-dir {}/data/n{next} --certs {certs} &",
            dir.display()
        );
        println!("  cargo run --release --bin ringkv-ecs -- --ecs {ecs} --certs {certs} add-node --name n{next} --addr 127.0.0.1:{next_port}");
        println!("shrink it:");
        println!("  cargo run --release --bin ringkv-ecs -- --ecs {ecs} --certs {certs} remove-node --name n1");
        println!();
        println!("Ctrl-C stops the cluster.");
        ringkv_transport::shutdown_signal().await;
        anyhow::Ok(cluster)
    })?;
    cluster.shutdown();
    Ok(())
}
