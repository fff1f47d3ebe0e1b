//! The one test harness: certificates, in-process nodes and node processes over real QUIC
//! with real certificates on loopback, each with its own storage in a temp dir.
#![allow(dead_code)] // each test binary uses part of it

pub mod history;
pub mod load;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore::{ClientConfig, KvStore};
use ringkv_certs::{Identity, IssueOptions, Role};
use ringkv_ecs::{Ecs, EcsConfig};
use ringkv_node::{Node, NodeConfig};
use ringkv_transport::{RingSigner, Transport};
use ringkv_wire::{AdminReply, AdminRequest, Limits, NodeStatus, ReplyBody, Request, RequestBody};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Aborts the test binary if the test that holds it is still running after its limit
/// (`RINGKV_TEST_WATCHDOG_SECS` overrides every limit): a test that hangs (a wait with no
/// deadline, a scoped thread that outlives a failed assertion) then fails CI at once, with
/// its name on stderr, instead of holding it until CI's own time limit with no name at all.
/// Dropped (the test ended, passed or failed): the watchdog stands down.
pub struct Watchdog {
    _done: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    /// Starts watching test `name` for `limit`.
    pub fn start(name: &str, limit: Duration) -> Watchdog {
        let limit = std::env::var("RINGKV_TEST_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(limit, Duration::from_secs);
        let (done, ended) = std::sync::mpsc::channel::<()>();
        let name = name.to_string();
        std::thread::Builder::new()
            .name(format!("watchdog-{name}"))
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(limit) {
                    eprintln!(
                        "WATCHDOG: test {name} still running after {limit:?}: it hangs; \
                         aborting the test binary (RINGKV_TEST_WATCHDOG_SECS sets the limit)"
                    );
                    std::process::abort();
                }
            })
            .expect("spawn watchdog thread");
        Watchdog { _done: done }
    }
}

/// A cluster CA with certificates: node certs carry SANs 127.0.0.1 and localhost.
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    /// A CA plus `client` (client role), `admin` (admin role) and `ecs` (ecs role, valid for
    /// loopback: it also serves) certificates.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        ringkv_certs::init_ca(dir.path(), false).expect("init CA");
        let certs = Self { dir };
        certs.issue(Role::Client, "client");
        certs.issue(Role::Admin, "admin");
        certs.issue(Role::Ecs, "ecs");
        certs
    }

    /// Issues a certificate of `role` called `name` (node certs valid for loopback).
    pub fn issue(&self, role: Role, name: &str) {
        let mut opts = IssueOptions::new(role, name);
        if matches!(role, Role::Node | Role::Ecs) {
            opts.sans = vec!["127.0.0.1".into(), "localhost".into()];
        }
        ringkv_certs::issue(self.dir.path(), &opts).expect("issue certificate");
    }

    /// The ECS's identity (ecs role).
    pub fn ecs_identity(&self) -> Identity {
        Identity::from_dir(self.dir.path(), "ecs").expect("load ECS identity")
    }

    /// The ECS's metadata signer, for nodes in standalone mode.
    pub fn ecs_signer(&self) -> Arc<RingSigner> {
        Arc::new(RingSigner::new(&self.ecs_identity()).expect("ECS signer"))
    }

    /// An operator's transport (admin certificate).
    pub fn admin(&self) -> Transport {
        Transport::bind_client(
            &self.identity("admin"),
            Limits::default(),
            Duration::from_secs(3),
            Duration::from_secs(10),
        )
        .expect("admin transport")
    }

    /// The identity called `name`, issuing a node certificate for it first if missing.
    pub fn identity(&self, name: &str) -> Identity {
        if !self.dir.path().join(format!("{name}.pem")).exists() {
            self.issue(Role::Node, name);
        }
        Identity::from_dir(self.dir.path(), name).expect("load identity")
    }

    /// The certificate directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A client configuration for `seeds` with a short retry deadline.
    pub fn client_config(&self, seeds: Vec<String>) -> ClientConfig {
        let mut config = ClientConfig::new(seeds, self.identity("client"));
        config.retry.deadline = Duration::from_secs(20);
        config
    }

    /// A connected client.
    pub async fn client(&self, seeds: Vec<String>) -> KvStore {
        KvStore::connect(self.client_config(seeds))
            .await
            .expect("client connects")
    }
}

/// A node running as a task of the test's runtime.
pub struct TestNode {
    /// The node's state.
    pub node: Arc<Node>,
    /// The advertised address.
    pub addr: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The data dir (kept alive with the node).
    pub data: TempDir,
}

impl TestNode {
    /// Starts node `name` on a free loopback port; `start` bootstraps a one-node ring.
    pub async fn start(certs: &Certs, name: &str, start: bool) -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        Self::start_in(certs, name, start, data).await
    }

    /// Starts node `name` with the given data dir.
    pub async fn start_in(certs: &Certs, name: &str, start: bool, data: TempDir) -> Self {
        Self::start_with(certs, name, start, data, |_| {}).await
    }

    /// Starts node `name` with the given data dir and `configure` applied to its
    /// configuration (e.g. its gossip timing).
    pub async fn start_with(
        certs: &Certs,
        name: &str,
        start: bool,
        data: TempDir,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> Self {
        let mut config = NodeConfig::new(name, "127.0.0.1:0".parse().unwrap(), data.path());
        config.start = start;
        if start {
            config.standalone_signer = Some(certs.ecs_signer());
        }
        configure(&mut config);
        let (endpoint, node) = ringkv_node::bind(config, &certs.identity(name))
            .await
            .expect("bind node");
        let addr = node.config().advertise.clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(ringkv_node::run(endpoint, node.clone(), async {
            let _ = rx.await;
        }));
        Self {
            node,
            addr,
            shutdown: Some(tx),
            task: Some(task),
            data,
        }
    }

    /// Stops the node gracefully and returns its data dir.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let Self { data, .. } = self;
        data
    }
}

/// A free UDP port on loopback (bound then released).
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Path of a binary of the umbrella package.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "ringkv-node" => PathBuf::from(env!("CARGO_BIN_EXE_ringkv-node")),
        "ringkv" => PathBuf::from(env!("CARGO_BIN_EXE_ringkv")),
        "ringkv-certs" => PathBuf::from(env!("CARGO_BIN_EXE_ringkv-certs")),
        "ringkv-ecs" => PathBuf::from(env!("CARGO_BIN_EXE_ringkv-ecs")),
        other => panic!("unknown binary {other}"),
    }
}

/// A `ringkv-node` process; killed on drop.
pub struct NodeProcess {
    child: Child,
    /// Its address.
    pub addr: String,
    /// Its data dir.
    pub data_dir: PathBuf,
}

impl NodeProcess {
    /// Spawns `ringkv-node --start` called `name` on `addr` with `data_dir`, and waits until
    /// it answers.
    pub async fn spawn(certs: &Certs, name: &str, addr: SocketAddr, data_dir: &Path) -> Self {
        let proc = Self::spawn_with(certs, name, addr, data_dir, &["--start"]);
        proc.wait_ready(certs).await;
        proc
    }

    /// Spawns `ringkv-node` with extra arguments, without waiting for it.
    pub fn spawn_with(
        certs: &Certs,
        name: &str,
        addr: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
    ) -> Self {
        Self::spawn_with_env(certs, name, addr, data_dir, extra, &[])
    }

    /// [`NodeProcess::spawn_with`] with extra environment variables.
    pub fn spawn_with_env(
        certs: &Certs,
        name: &str,
        addr: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        certs.identity(name); // make sure the certificate exists
        let child = Command::new(bin("ringkv-node"))
            .envs(env.iter().copied())
            .args(["--name", name, "--listen", &addr.to_string()])
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--certs")
            .arg(certs.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ringkv-node");
        Self {
            child,
            addr: addr.to_string(),
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Waits (up to 20 s) until the node answers a client.
    pub async fn wait_ready(&self, certs: &Certs) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut config = certs.client_config(vec![self.addr.clone()]);
            config.connect_timeout = Duration::from_millis(500);
            if let Ok(store) = KvStore::connect(config).await {
                store.disconnect().await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never became ready",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` to the process (e.g. `libc::SIGSTOP` to freeze it, `libc::SIGCONT` to
    /// let it go on).
    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait for a clean exit; returns its exit status success.
    pub fn terminate(&mut self) -> bool {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An ECS running as a task of the test's runtime, with its state in a temp dir.
pub struct TestEcs {
    /// The service.
    pub ecs: Arc<Ecs>,
    /// Its address.
    pub addr: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestEcs {
    /// Starts an ECS on a free loopback port with its state in `state_dir`.
    pub async fn start(certs: &Certs, state_dir: &Path) -> Self {
        Self::start_with(certs, state_dir, |_| {}).await
    }

    /// Starts an ECS with `configure` applied to its configuration.
    pub async fn start_with(
        certs: &Certs,
        state_dir: &Path,
        configure: impl FnOnce(&mut EcsConfig),
    ) -> Self {
        let mut config = EcsConfig::new("127.0.0.1:0".parse().unwrap(), state_dir);
        // Tests that want replication ask for it.
        config.replication = 1;
        configure(&mut config);
        let (endpoint, ecs) = ringkv_ecs::bind(config, &certs.ecs_identity())
            .await
            .expect("bind ECS");
        let addr = endpoint.local_addr().expect("ECS address").to_string();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(ringkv_ecs::run(endpoint, ecs.clone(), async {
            let _ = rx.await;
        }));
        Self {
            ecs,
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the ECS gracefully.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A `ringkv-ecs serve` process (with the `ecs` certificate); killed on drop.
pub struct EcsProcess {
    child: Child,
    /// Its address.
    pub addr: String,
}

impl EcsProcess {
    /// Spawns the ECS on `addr` with its state in `state_dir` and waits until it answers.
    /// Every step of a change it completes increments `steps` (read from its log).
    pub async fn spawn(
        certs: &Certs,
        addr: SocketAddr,
        state_dir: &Path,
        steps: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Self {
        Self::spawn_with_args(
            certs,
            addr,
            state_dir,
            steps,
            &["--replication-factor", "1"],
        )
        .await
    }

    /// [`EcsProcess::spawn`] with extra arguments for `serve` (no replication unless they
    /// ask for it: `--replication-factor` defaults to the CLI's default otherwise).
    pub async fn spawn_with_args(
        certs: &Certs,
        addr: SocketAddr,
        state_dir: &Path,
        steps: Arc<std::sync::atomic::AtomicUsize>,
        extra: &[&str],
    ) -> Self {
        certs.ecs_identity(); // make sure the certificate exists
        Self::spawn_as(certs, "ecs", addr, state_dir, steps, extra).await
    }

    /// [`EcsProcess::spawn_with_args`] with the `ecs` certificate called `identity` (a
    /// member of an ECS group; the caller issued it). It is ready when it answers, leader
    /// or not.
    pub async fn spawn_as(
        certs: &Certs,
        identity: &str,
        addr: SocketAddr,
        state_dir: &Path,
        steps: Arc<std::sync::atomic::AtomicUsize>,
        extra: &[&str],
    ) -> Self {
        let mut child = Command::new(bin("ringkv-ecs"))
            .arg("--certs")
            .arg(certs.path())
            .args([
                "--identity",
                identity,
                "serve",
                "--listen",
                &addr.to_string(),
            ])
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .env("RUST_LOG", "ringkv_ecs=info,warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringkv-ecs");
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                // The executor's one line per step: `step change=.. step=.. elapsed=.. ok=..`.
                if line.contains("step=") && line.contains("elapsed=") {
                    steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        let ecs = Self {
            child,
            addr: addr.to_string(),
        };
        // Short attempts: the first ones may reach it before it listens.
        let admin = Transport::bind_client(
            &certs.identity("admin"),
            Limits::default(),
            Duration::from_millis(200),
            Duration::from_secs(1),
        )
        .expect("admin transport");
        let deadline = Instant::now() + Duration::from_secs(20);
        while admin
            .call::<_, AdminReply>(&ecs.addr, &AdminRequest::Ring, Duration::from_secs(1))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the ECS never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin.close().await;
        ecs
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EcsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An ECS plus in-process nodes, all over real QUIC + mTLS on loopback.
pub struct TestCluster {
    /// Certificates of the cluster.
    pub certs: Arc<Certs>,
    /// The ECS.
    pub ecs: TestEcs,
    /// The ECS's state dir.
    pub ecs_state: TempDir,
    /// The nodes, in the order they were started.
    pub nodes: Vec<TestNode>,
    /// The operator's transport.
    pub admin: Transport,
}

impl TestCluster {
    /// An ECS and `n` nodes `n1..=n<n>`, each added through the ECS.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, |_| {}, |_| {}).await
    }

    /// [`TestCluster::start`] with `ecs` applied to the ECS's configuration (e.g. its
    /// replication) and `node` to every node's.
    pub async fn start_with(
        n: usize,
        ecs: impl FnOnce(&mut EcsConfig),
        node: impl Fn(&mut NodeConfig),
    ) -> Self {
        let certs = Arc::new(Certs::new());
        let ecs_state = tempfile::tempdir().expect("tempdir");
        let ecs = TestEcs::start_with(&certs, ecs_state.path(), ecs).await;
        let admin = certs.admin();
        let mut cluster = Self {
            certs,
            ecs,
            ecs_state,
            nodes: Vec::new(),
            admin,
        };
        for i in 1..=n {
            cluster.add_node_with(&format!("n{i}"), &node).await;
        }
        cluster
    }

    /// Asks the ECS.
    pub async fn ask(&self, request: AdminRequest) -> AdminReply {
        self.admin
            .call(&self.ecs.addr, &request, Duration::from_secs(600))
            .await
            .expect("ECS answers")
    }

    /// Starts node `name` (waiting for the ECS) and adds it; panics if the ECS refuses.
    pub async fn add_node(&mut self, name: &str) -> AdminReply {
        self.add_node_with(name, |_| {}).await
    }

    /// [`TestCluster::add_node`] with `configure` applied to the node's configuration.
    pub async fn add_node_with(
        &mut self,
        name: &str,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> AdminReply {
        let data = tempfile::tempdir().expect("tempdir");
        let node = TestNode::start_with(&self.certs, name, false, data, configure).await;
        let reply = self
            .ask(AdminRequest::AddNode {
                name: name.into(),
                addr: node.addr.clone(),
                zone: None,
            })
            .await;
        assert!(
            matches!(reply, AdminReply::Changed { .. }),
            "add {name}: {reply:?}"
        );
        self.nodes.push(node);
        reply
    }

    /// Removes node `name` through the ECS and stops it.
    pub async fn remove_node(&mut self, name: &str) -> AdminReply {
        let reply = self
            .ask(AdminRequest::RemoveNode { name: name.into() })
            .await;
        assert!(
            matches!(reply, AdminReply::Changed { .. }),
            "remove {name}: {reply:?}"
        );
        let idx = self
            .nodes
            .iter()
            .position(|n| n.node.config().name == name)
            .expect("known node");
        self.nodes.remove(idx).stop().await;
        reply
    }

    /// Seed addresses for clients.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// A connected client.
    pub async fn client(&self) -> KvStore {
        self.certs.client(self.seeds()).await
    }

    /// Waits (up to 10 s) until every in-process node holds the ECS's metadata version:
    /// the ECS seeds a new version at the nodes a change affects, gossip brings it to the
    /// others.
    pub async fn wait_converged(&self) {
        let version = self.ecs.ecs.metadata().version;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .nodes
            .iter()
            .any(|n| n.node.metadata_version() < version)
        {
            assert!(
                Instant::now() < deadline,
                "gossip did not bring version {version} to every node: {:?}",
                self.nodes
                    .iter()
                    .map(|n| (n.node.config().name.clone(), n.node.metadata_version()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The in-process node called `name`.
    pub fn node(&self, name: &str) -> &TestNode {
        self.nodes
            .iter()
            .find(|n| n.node.config().name == name)
            .expect("known node")
    }
}

/// Waits (up to 20 s) until the node at `addr` answers a `Status` on a new connection of a
/// new transport (so no connection to an earlier process of it is reused), and returns when
/// it did.
pub async fn wait_answers(certs: &Certs, addr: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = Transport::bind_client(
            &certs.identity("admin"),
            Limits::default(),
            Duration::from_millis(200),
            Duration::from_millis(500),
        )
        .expect("admin transport");
        let answered = fresh
            .request(addr, &Request::new(0, RequestBody::Status))
            .await
            .is_ok();
        fresh.close().await;
        if answered {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{addr} never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `request` to the ECS at `ecs` and waits (up to 60 s) for its answer.
pub async fn ask_ecs(admin: &Transport, ecs: &str, request: AdminRequest) -> AdminReply {
    admin
        .call(ecs, &request, Duration::from_secs(60))
        .await
        .expect("the ECS answers")
}

/// Adds node `name` at `addr` through the ECS at `ecs`; panics unless the ring changed.
pub async fn add_node_via(admin: &Transport, ecs: &str, name: &str, addr: &str) {
    add_node_in_zone_via(admin, ecs, name, addr, None).await
}

/// [`add_node_via`] with the node in failure domain `zone`.
pub async fn add_node_in_zone_via(
    admin: &Transport,
    ecs: &str,
    name: &str,
    addr: &str,
    zone: Option<&str>,
) {
    let request = AdminRequest::AddNode {
        name: name.into(),
        addr: addr.into(),
        zone: zone.map(str::to_string),
    };
    let reply = ask_ecs(admin, ecs, request).await;
    assert!(
        matches!(reply, AdminReply::Changed { .. }),
        "add {name}: {reply:?}"
    );
}

/// A node's status, asked over the network with the admin certificate.
pub async fn node_status(admin: &Transport, addr: &str) -> NodeStatus {
    let reply = admin
        .request(addr, &Request::new(0, RequestBody::Status))
        .await
        .expect("status reply");
    match reply.body {
        ReplyBody::Status(s) => *s,
        other => panic!("unexpected status reply {other:?}"),
    }
}

/// A writer for zero-loss tests: puts new keys `w<w>-<i>` (every fourth put rewrites an
/// earlier key) until `stop`, and returns the last value it saw acknowledged for each key.
/// Panics if a put fails: every write must eventually be acknowledged.
pub async fn write_until_stopped(
    store: &KvStore,
    w: u32,
    stop: &std::sync::atomic::AtomicBool,
) -> std::collections::HashMap<String, u32> {
    let mut acked = std::collections::HashMap::new();
    let mut i = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("w{w}-{}", if i % 4 == 3 { i / 2 } else { i });
        store
            .put(key.as_bytes(), &i.to_le_bytes())
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        acked.insert(key, i);
        i += 1;
    }
    acked
}

/// `metadata` encoded with no valid signature: what a peer without the ECS's key can send.
pub fn unsigned(metadata: &ringkv_wire::RingMetadata) -> ringkv_wire::SignedMetadata {
    ringkv_wire::SignedMetadata::sign(metadata, |_| Ok(Default::default()))
        .expect("a valid ring encodes")
}

/// Node `n2` in process, holding a signed two-node ring (version 5) with replication 2 where
/// `n1` (a certificate only, at an address nobody serves) is its neighbour: every chain is
/// `[n1, n2]` or `[n2, n1]`, and `n2` serves only under a lease.
pub async fn replicated_member(certs: &Certs) -> (TestNode, ringkv_wire::RingMetadata) {
    let node = TestNode::start(certs, "n2", false).await;
    let ring = ringkv_wire::RingMetadata::new(
        5,
        vec![
            ringkv_wire::NodeEntry::new("n1", "127.0.0.1:9"),
            ringkv_wire::NodeEntry::new("n2", node.addr.clone()),
        ],
    )
    .unwrap()
    .with_replication(2)
    .unwrap();
    let signed = certs.ecs_signer().sign(&ring).unwrap();
    assert!(node.node.install_metadata(signed, "test").await.unwrap());
    (node, ring)
}
