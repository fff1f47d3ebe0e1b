//! A local cluster in one process: certificates, the ECS and storage nodes on loopback, each
//! service on its own thread with its own current-thread runtime (as `ringkv-node` and
//! `ringkv-ecs` run), driven through the ECS like a real deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use ringkv_certs::{Identity, IssueOptions, Role};
use ringkv_ecs::EcsConfig;
use ringkv_node::NodeConfig;
use ringkv_transport::Transport;
use ringkv_wire::{AdminReply, AdminRequest, Limits};
use tokio::sync::watch;

/// A running local cluster. Dropping it does not stop it; call [`LocalCluster::shutdown`].
pub struct LocalCluster {
    /// Directory of certificates (`certs/`), node data (`data/<name>`) and ECS state.
    pub dir: PathBuf,
    /// The ECS's address.
    pub ecs_addr: SocketAddr,
    /// Started nodes: name and address.
    pub nodes: Vec<(String, SocketAddr)>,
    base_port: u16,
    admin: Transport,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

/// Issues a certificate unless it exists; `loopback` adds SANs 127.0.0.1 and localhost.
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
fn spawn_service<F, Fut>(name: String, stop: watch::Receiver<bool>, serve: F) -> JoinHandle<()>
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

impl LocalCluster {
    /// Makes certificates in `dir/certs` (CA, `ecs`, `admin`, `client`, and nodes `n1` to
    /// `n<cert_nodes>`), starts the ECS on `127.0.0.1:<port>`; call from a tokio runtime.
    pub async fn start(dir: &Path, port: u16, cert_nodes: usize) -> anyhow::Result<Self> {
        Self::start_with(dir, port, cert_nodes, |_| {}).await
    }

    /// [`LocalCluster::start`] with the ECS's configuration adjusted by `configure`.
    pub async fn start_with(
        dir: &Path,
        port: u16,
        cert_nodes: usize,
        configure: impl FnOnce(&mut EcsConfig),
    ) -> anyhow::Result<Self> {
        let certs = dir.join("certs");
        if !certs.join("ca.pem").exists() {
            ringkv_certs::init_ca(&certs, false)?;
        }
        issue(&certs, Role::Ecs, "ecs", true)?;
        issue(&certs, Role::Admin, "admin", false)?;
        issue(&certs, Role::Client, "client", false)?;
        for i in 1..=cert_nodes {
            issue(&certs, Role::Node, &format!("n{i}"), true)?;
        }
        let ecs_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let (stop, stop_rx) = watch::channel(false);
        let mut config = EcsConfig::new(ecs_addr, dir.join("ecs-state"));
        configure(&mut config);
        let identity = Identity::from_dir(&certs, "ecs")?;
        let ecs = spawn_service("ecs".into(), stop_rx, move |stop| async move {
            let (endpoint, ecs) = ringkv_ecs::bind(config, &identity)
                .await
                .with_context(|| format!("starting the ECS on {ecs_addr}"))?;
            ringkv_ecs::run(endpoint, ecs, stopped(stop)).await;
            Ok(())
        });
        let admin = Transport::bind_client(
            &Identity::from_dir(&certs, "admin")?,
            Limits::default(),
            Duration::from_secs(3),
            Duration::from_secs(3600),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ecs_addr,
            nodes: Vec::new(),
            base_port: port,
            admin,
            stop,
            threads: vec![ecs],
        })
    }

    /// The certificate directory.
    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// Asks the ECS, retrying for a few seconds while it is still starting.
    pub async fn ask(&self, request: AdminRequest) -> anyhow::Result<AdminReply> {
        let mut last = None;
        for _ in 0..50 {
            match self
                .admin
                .call::<_, AdminReply>(
                    &self.ecs_addr.to_string(),
                    &request,
                    Duration::from_secs(3600),
                )
                .await
            {
                Ok(reply) => return Ok(reply),
                Err(e) if e.is_unreachable() => last = Some(e),
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the ECS does not answer: {}", last.expect("tried"))
    }

    /// Starts node `n<i>` on `127.0.0.1:<port + i>` (waiting for the ECS) and returns its
    /// address. Its certificate must exist (see [`LocalCluster::start`]).
    pub fn spawn_node(&mut self, i: usize) -> anyhow::Result<SocketAddr> {
        let name = format!("n{i}");
        let listen: SocketAddr = format!("127.0.0.1:{}", self.base_port + i as u16).parse()?;
        let config = NodeConfig::new(name.clone(), listen, self.dir.join("data").join(&name));
        let identity = Identity::from_dir(&self.certs(), &name)
            .with_context(|| format!("no certificate for {name}"))?;
        let thread_name = name.clone();
        self.threads.push(spawn_service(
            thread_name,
            self.stop.subscribe(),
            move |stop| async move {
                let (endpoint, node) = ringkv_node::bind(config, &identity)
                    .await
                    .with_context(|| format!("starting node {name} on {listen}"))?;
                ringkv_node::run(endpoint, node, stopped(stop)).await;
                Ok(())
            },
        ));
        self.nodes.push((format!("n{i}"), listen));
        Ok(listen)
    }

    /// Starts node `n<i>` and adds it to the ring (unless the ECS already has it, as after a
    /// restart on the same directory). Returns the ECS's answer.
    pub async fn add_node(&mut self, i: usize) -> anyhow::Result<AdminReply> {
        let addr = self.spawn_node(i)?;
        let name = format!("n{i}");
        self.wait_ready(&addr.to_string()).await?;
        if let AdminReply::Ring(ring) = self.ask(AdminRequest::Ring).await? {
            if ring.node(&name).is_some() {
                return Ok(AdminReply::Ring(ring));
            }
        }
        match self
            .ask(AdminRequest::AddNode {
                name: name.clone(),
                addr: addr.to_string(),
                zone: None,
            })
            .await?
        {
            reply @ AdminReply::Changed { .. } => Ok(reply),
            other => bail!("adding {name}: {other:?}"),
        }
    }

    /// Waits until the node at `addr` answers a status request.
    async fn wait_ready(&self, addr: &str) -> anyhow::Result<()> {
        let status = ringkv_wire::Request::new(0, ringkv_wire::RequestBody::Status);
        for _ in 0..100 {
            if self.admin.request(addr, &status).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("node at {addr} did not start")
    }

    /// Stops every service and waits for their threads.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
