//! One command for a local ringkv cluster: fresh certificates, the ECS and N storage nodes
//! on loopback (each node on its own thread and current-thread runtime, as `ringkv-node`
//! runs), the nodes added to the ring through the ECS, and the commands to use it, grow it
//! and shrink it. Runs until Ctrl-C.
//!
//! ```text
//! cargo run --release --example local_cluster [-- --nodes 3 --dir ./local --port 7000]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kvstore::Transport;
use ringkv_certs::{Identity, IssueOptions, Role};
use ringkv_ecs::EcsConfig;
use ringkv_node::NodeConfig;
use ringkv_wire::{AdminReply, AdminRequest, Limits};
use tokio::sync::watch;

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

fn issue(certs: &Path, role: Role, name: &str, loopback: bool) -> anyhow::Result<()> {
    if certs.join(format!("{name}.pem")).exists() {
        return Ok(());
    }
    let mut opts = IssueOptions::new(role, name);
    if loopback {
        opts.sans = vec!["127.0.0.1".into(), "localhost".into()];
    }
    ringkv_certs::issue(certs, &opts)?;
    Ok(())
}

/// Runs `serve` on its own thread with its own current-thread runtime until `stop` fires.
fn spawn_service<F, Fut>(
    name: String,
    stop: watch::Receiver<bool>,
    serve: F,
) -> std::thread::JoinHandle<()>
where
    F: FnOnce(watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            if let Err(e) = runtime.block_on(serve(stop)) {
                eprintln!("{name} failed: {e:#}");
                std::process::exit(1);
            }
        })
        .expect("spawn thread")
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

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
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        ringkv_certs::init_ca(&certs, false)?;
    }
    issue(&certs, Role::Admin, "ecs", true)?;
    issue(&certs, Role::Admin, "admin", false)?;
    issue(&certs, Role::Client, "client", false)?;
    for i in 1..=args.nodes + SPARE_NODES {
        issue(&certs, Role::Node, &format!("n{i}"), true)?;
    }

    let ecs_addr: SocketAddr = format!("127.0.0.1:{}", args.port).parse()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut threads = Vec::new();
    {
        let config = EcsConfig::new(ecs_addr, dir.join("ecs-state"));
        let identity = Identity::from_dir(&certs, "ecs")?;
        threads.push(spawn_service(
            "ecs".into(),
            stop_rx.clone(),
            move |stop| async move {
                let (endpoint, ecs) = ringkv_ecs::bind(config, &identity)
                    .await
                    .with_context(|| format!("starting the ECS on {ecs_addr}"))?;
                ringkv_ecs::run(endpoint, ecs, stopped(stop)).await;
                Ok(())
            },
        ));
    }
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        let name = format!("n{i}");
        let listen: SocketAddr = format!("127.0.0.1:{}", args.port + i as u16).parse()?;
        let config = NodeConfig::new(name.clone(), listen, dir.join("data").join(&name));
        let identity = Identity::from_dir(&certs, &name)?;
        nodes.push((name.clone(), listen));
        threads.push(spawn_service(
            name.clone(),
            stop_rx.clone(),
            move |stop| async move {
                let (endpoint, node) = ringkv_node::bind(config, &identity)
                    .await
                    .with_context(|| format!("starting node {name} on {listen}"))?;
                ringkv_node::run(endpoint, node, stopped(stop)).await;
                Ok(())
            },
        ));
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let admin = Transport::bind_client(
            &Identity::from_dir(&certs, "admin")?,
            Limits::default(),
            Duration::from_secs(3),
            Duration::from_secs(600),
        )?;
        let ask = |request: AdminRequest| {
            let admin = &admin;
            async move {
                // The ECS may still be binding: retry briefly.
                let mut last = None;
                for _ in 0..50 {
                    match admin
                        .call::<_, AdminReply>(&ecs_addr.to_string(), &request, Duration::from_secs(600))
                        .await
                    {
                        Ok(reply) => return Ok(reply),
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(anyhow::anyhow!("the ECS does not answer: {}", last.expect("tried")))
            }
        };
        let ring = match ask(AdminRequest::Ring).await? {
            AdminReply::Ring(ring) => ring,
            other => bail!("unexpected ECS reply {other:?}"),
        };
        for (name, listen) in &nodes {
            if ring.node(name).is_some() {
                continue; // restarted on an existing --dir: already a member
            }
            match ask(AdminRequest::AddNode { name: name.clone(), addr: listen.to_string() }).await? {
                AdminReply::Changed { .. } => {}
                other => bail!("adding {name}: {other:?}"),
            }
        }
        if let AdminReply::Status { metadata, nodes } = ask(AdminRequest::Status).await? {
            print!("{}", ringkv_ecs::cli::status_text(&metadata, &nodes));
        }
        let certs = certs.display();
        let seed = nodes[0].1;
        let next = args.nodes + 1;
        let next_port = args.port + next as u16;
        println!();
        println!("ECS on {ecs_addr}; certificates and data in {}", dir.display());
        println!();
        println!("use it:");
        println!("  cargo run --release --bin ringkv -- --seed {seed} --certs {certs} put hello world");
        println!("  cargo run --release --bin ringkv -- --seed {seed} --certs {certs} get hello");
        println!("  cargo run --release --bin ringkv -- --seed {seed} --certs {certs} shell");
        println!("watch it:");
        println!("  cargo run --release --bin ringkv-ecs -- --ecs {ecs_addr} --certs {certs} status");
        println!("grow it (start a node, then add it; certificates exist up to n{}):", args.nodes + SPARE_NODES);
        println!(
            "  cargo run --release --bin ringkv-node -- --name n{next} --listen 127.0.0.1:{next_port} --data-dir {}/data/n{next} --certs {certs} &",
            dir.display()
        );
        println!("  cargo run --release --bin ringkv-ecs -- --ecs {ecs_addr} --certs {certs} add-node --name n{next} --addr 127.0.0.1:{next_port}");
        println!("shrink it:");
        println!("  cargo run --release --bin ringkv-ecs -- --ecs {ecs_addr} --certs {certs} remove-node --name n1");
        println!();
        println!("Ctrl-C stops the cluster.");
        kvstore::server::shutdown_signal().await;
        anyhow::Ok(())
    })?;
    let _ = stop_tx.send(true);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
