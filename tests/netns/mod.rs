//! The multi-host harness: test hosts as Linux network namespaces, ringkv binaries running
//! in them as real processes, fault injection, and a teardown that leaves nothing behind.
//!
//! - [`Lab`]: one test's private network: a bridge with no address and no uplink, and one
//!   namespace per [`Host`], joined to the bridge by a veth pair and holding one address of
//!   `10.77.0.0/24`. Every lab has its own bridge, so parallel tests may use the same
//!   addresses; names carry the test process's pid and a counter (`rk<pid>t<n>`), so parallel
//!   test processes do not collide either, and the leftovers of a test process that was
//!   killed (SIGKILL leaves no chance to clean up) are swept by the next lab.
//! - [`Proc`]: a `ringkv-*` process started with `ip netns exec` inside a host, logging to
//!   a file of the lab; killed when dropped (and by the kernel if the test process dies).
//! - Faults: [`Lab::cut`] / [`Lab::heal`] take a host's link down / up (its cable pulled:
//!   everything it sends or is sent is lost, traffic inside the host still works);
//!   [`Lab::cut_between`] / [`Lab::heal_between`] partition two hosts from each other only
//!   (a `prohibit` route to the other in each), both still reaching everyone else;
//!   [`Proc::kill`], [`Proc::pause`] / [`Proc::resume`] (SIGKILL, SIGSTOP / SIGCONT).
//! - Test code that talks to the cluster runs inside a host too: [`Host::run`] runs a future
//!   on a thread that entered the host's namespace (`setns`) before building its tokio
//!   runtime, so the real `KvStore` library is used as an application would use it, and
//!   the test keeps its typed errors and can track acknowledged writes. Sockets belong to
//!   the namespace of the thread that creates them, and threads a tokio runtime starts
//!   inherit it. [`Lab::exec`] runs a command-line tool (`ringkv`, `ringkv-ecs`) in a host,
//!   with a deadline: a tool that hangs fails the test.
//! - [`HostCluster`]: an ECS host, node hosts and a client host, started from TOML config
//!   files, each node with a certificate whose IP SAN is its host's address; or, from
//!   [`HostCluster::start_group`], three ECS hosts running an ECS group (`ecs1..ecs3`, each
//!   with an ecs certificate for its host's address and the group's `peers`). Certificates
//!   come from `common::Certs`; each host gets its own directory with `ca.pem` and only its
//!   own certificates and keys, as a real deployment would.
//!
//! Needs root and iproute2. Where namespaces cannot be created, [`Lab::new`] panics with the
//! reason: these tests fail rather than pass without having run.
#![allow(dead_code)] // each test binary uses part of it

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kvstore::{ClientConfig, KvError};
use ringkv_certs::{Identity, IssueOptions, Role};
use ringkv_transport::Transport;
use ringkv_wire::{
    AdminReply, AdminRequest, GroupReport, Limits, NodeStatus, ReplyBody, Request, RequestBody,
    RingMetadata,
};
use tempfile::TempDir;

use crate::common::{bin, Certs};

/// First three octets of every lab's subnet (a /24).
pub const SUBNET: &str = "10.77.0";
/// Port of every node (each node has a host, hence an address, of its own).
pub const NODE_PORT: u16 = 7001;
/// Port of the ECS.
pub const ECS_PORT: u16 = 7000;
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// Prefix of every namespace a lab creates.
const NS_PREFIX: &str = "ringkv-";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`; the error is its stderr.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (is iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must_ip(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// One test's network of hosts. Dropping it kills every process still running in its hosts
/// and deletes the namespaces, veth pairs and bridge.
pub struct Lab {
    /// `rk<pid hex>t<n>`: prefix of the lab's interface names (at most 11 characters, so
    /// `<id>h<host>` stays within the 15 that Linux allows).
    id: String,
    bridge: String,
    hosts: Vec<Host>,
    /// Logs, config files, data and per-host certificate directories.
    dir: TempDir,
    /// The cluster CA and the certificates issued so far (the "operator's workstation").
    pub certs: Certs,
    started: Instant,
    next_output: AtomicU32,
}

/// A test host: a network namespace with one address on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name (`ecs`, `n1`, `client`, ...).
    pub name: String,
    /// The namespace's name.
    pub ns: String,
    /// The host's address.
    pub ip: Ipv4Addr,
    /// The root-namespace end of its veth pair (the one plugged into the bridge).
    veth: String,
    /// The host's own directory (certificates, config, data).
    pub dir: PathBuf,
}

impl Lab {
    /// Creates the lab's bridge. Panics with an explanation if this machine cannot create
    /// network namespaces (not root, no iproute2).
    pub fn new() -> Lab {
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "multi-host tests create network namespaces (`ip netns add`) and need root; \
                 run them as root (CI does). They fail rather than skip so that a green run \
                 means they ran."
            );
        }
        if let Err(e) = ip(&["-V"]) {
            panic!("multi-host tests need iproute2 (`apt-get install -y iproute2`): {e}");
        }
        sweep_dead_labs();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed) % 100;
        let id = format!("rk{:x}t{n}", std::process::id());
        let bridge = format!("{id}br");
        if let Err(e) = ip(&["link", "add", &bridge, "type", "bridge"]) {
            panic!(
                "cannot create the test bridge {bridge}: {e}. Multi-host tests need root \
                 with CAP_NET_ADMIN (a container without it cannot run them)."
            );
        }
        let lab = Lab {
            id,
            bridge,
            hosts: Vec::new(),
            dir: tempfile::tempdir().expect("lab dir"),
            certs: Certs::new(),
            started: Instant::now(),
            next_output: AtomicU32::new(0),
        };
        must_ip(&["link", "set", &lab.bridge, "up"]);
        std::fs::create_dir_all(lab.dir.path().join("logs")).expect("logs dir");
        lab
    }

    /// The lab's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds host `name` with the next free address (`10.77.0.10`, `.11`, ...) and gives it
    /// a certificate directory holding the cluster's `ca.pem`.
    pub fn add_host(&mut self, name: &str) -> Host {
        let idx = self.hosts.len();
        assert!(idx < 90, "too many hosts");
        let ns = format!("{NS_PREFIX}{}-{name}", self.id);
        let veth = format!("{}h{idx}", self.id);
        let ip_addr = Ipv4Addr::new(10, 77, 0, 10 + idx as u8);
        let dir = self.dir.path().join(name);
        let host = Host {
            name: name.to_string(),
            ns: ns.clone(),
            ip: ip_addr,
            veth: veth.clone(),
            dir: dir.clone(),
        };
        if let Err(e) = ip(&["netns", "add", &ns]) {
            panic!("cannot create network namespace {ns} (multi-host tests need root): {e}");
        }
        // Registered at once, so that a failure below still tears down what exists.
        self.hosts.push(host.clone());
        must_ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        must_ip(&["link", "set", &veth, "master", &self.bridge, "up"]);
        let cidr = format!("{ip_addr}/24");
        must_ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        must_ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        must_ip(&["-n", &ns, "link", "set", "lo", "up"]);
        std::fs::create_dir_all(host.certs_dir()).expect("host certs dir");
        let ca = ringkv_certs::ca_paths(self.certs.path());
        std::fs::copy(&ca.cert, host.certs_dir().join("ca.pem")).expect("copy ca.pem");
        host
    }

    /// Issues a certificate of `role` called `name` with `sans`, and installs it (certificate
    /// and key) in `host`'s certificate directory.
    pub fn issue(&self, host: &Host, role: Role, name: &str, sans: &[String]) {
        let mut opts = IssueOptions::new(role, name);
        opts.sans = sans.to_vec();
        // For this host's address (the shared `Certs` may hold one of that name already).
        opts.force = true;
        ringkv_certs::issue(self.certs.path(), &opts).expect("issue certificate");
        self.install(host, name);
    }

    /// Copies the existing certificate and key `name` into `host`'s certificate directory.
    pub fn install(&self, host: &Host, name: &str) {
        let from = ringkv_certs::leaf_paths(self.certs.path(), name);
        let to = ringkv_certs::leaf_paths(&host.certs_dir(), name);
        std::fs::copy(&from.cert, &to.cert).expect("copy certificate");
        std::fs::copy(&from.key, &to.key).expect("copy key"); // keeps mode 0600
    }

    /// Cuts `host` off the network: its link goes down, so everything it sends and
    /// everything sent to it is lost (nothing is refused: peers see silence, as with a
    /// pulled cable or a partition). Processes keep running; traffic inside the host works.
    pub fn cut(&self, host: &Host) {
        must_ip(&["link", "set", &host.veth, "down"]);
    }

    /// Undoes [`Lab::cut`].
    pub fn heal(&self, host: &Host) {
        must_ip(&["link", "set", &host.veth, "up"]);
    }

    /// Cuts the path between `a` and `b` only, both ways: each drops, unsent, whatever it
    /// would send the other, so each sees silence from the other while both still reach
    /// every other host (a partition between two hosts, not a pulled cable). It is a
    /// `prohibit` route to the other's address in each namespace: the send fails locally
    /// with EACCES, as with a firewall rule, and QUIC takes the datagram for lost. (Not
    /// `blackhole`: its EINVAL makes quinn turn off segmentation offload and ancillary data
    /// on the socket for good.) No iptables or tc filters needed, only iproute2.
    pub fn cut_between(&self, a: &Host, b: &Host) {
        for (from, to) in [(a, b), (b, a)] {
            let route = format!("{}/32", to.ip);
            must_ip(&["-n", &from.ns, "route", "add", "prohibit", &route]);
        }
    }

    /// Undoes [`Lab::cut_between`].
    pub fn heal_between(&self, a: &Host, b: &Host) {
        for (from, to) in [(a, b), (b, a)] {
            let route = format!("{}/32", to.ip);
            must_ip(&["-n", &from.ns, "route", "del", "prohibit", &route]);
        }
    }

    /// Starts `program args` in `host` as a long-running process; its output goes to
    /// `logs/<name>.log` in the lab directory.
    pub fn spawn(&self, host: &Host, name: &str, program: &Path, args: &[String]) -> Proc {
        let log = self.dir.path().join("logs").join(format!("{name}.log"));
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = host
            .command(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} in {}: {e}", host.name));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Runs `program args` in `host` to completion and returns what it printed. Panics if
    /// it does not finish within `limit` (it is killed first): a hanging tool fails the test.
    pub fn exec(&self, host: &Host, program: &Path, args: &[String], limit: Duration) -> Output {
        let started = Instant::now();
        let mut child = host
            .command(program)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {} in {}: {e}", program.display(), host.name));
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
        let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`{} {}` in {} did not finish within {limit:?}: it hangs",
                    program.display(),
                    args.join(" "),
                    host.name
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let output = Output {
            code: status.code(),
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            elapsed: started.elapsed(),
        };
        let n = self.next_output.fetch_add(1, Ordering::Relaxed);
        let _ = std::fs::write(
            self.dir
                .path()
                .join("logs")
                .join(format!("exec-{n:03}.txt")),
            format!(
                "{} {}\nin {} -> {:?} after {:?}\n--- stdout\n{}--- stderr\n{}",
                program.display(),
                args.join(" "),
                host.name,
                output.code,
                output.elapsed,
                output.stdout,
                output.stderr
            ),
        );
        output
    }

    /// Prints the last lines of every log (called when a test fails).
    fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!(
                "----- {} (last {} lines)\n{}",
                path.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for host in &self.hosts {
            kill_all_in(&host.ns);
        }
        for host in &self.hosts {
            // Deleting one end deletes the pair at once; deleting the namespace alone would
            // leave its veth behind until the kernel's asynchronous cleanup.
            let _ = ip(&["link", "del", &host.veth]);
            if let Err(e) = ip(&["netns", "del", &host.ns]) {
                eprintln!("teardown: {e}");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("teardown: {e}");
        }
        eprintln!(
            "lab {} ({} hosts) torn down after {:.1?}",
            self.id,
            self.hosts.len(),
            self.started.elapsed()
        );
    }
}

/// SIGKILLs every process in namespace `ns` and waits (bounded) until none is left.
fn kill_all_in(ns: &str) {
    let me = std::process::id() as i32;
    for _ in 0..100 {
        let pids: Vec<i32> = ip(&["netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("teardown: processes still running in {ns}");
}

/// The pid encoded in a lab id prefix `rk<pid hex>t<n>...`, if `name` has one.
fn lab_pid(name: &str) -> Option<(u32, String)> {
    let rest = name.strip_prefix("rk")?;
    let (pid_hex, after) = rest.split_once('t')?;
    let pid = u32::from_str_radix(pid_hex, 16).ok()?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    Some((pid, format!("rk{pid_hex}t{digits}")))
}

/// Removes namespaces, veths and bridges of labs whose test process is gone (killed before
/// its `Drop` ran).
fn sweep_dead_labs() {
    let dead = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    for ns in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let ns = ns.split_whitespace().next().unwrap_or_default();
        let Some(rest) = ns.strip_prefix(NS_PREFIX) else {
            continue;
        };
        if let Some((pid, _)) = lab_pid(rest) {
            if dead(pid) {
                eprintln!("sweeping namespace {ns} left by dead test process {pid}");
                kill_all_in(ns);
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }
    for line in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
        // "12: rk1a2bt0h3@if11: <...>" -> "rk1a2bt0h3"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or_default();
        if let Some((pid, id)) = lab_pid(name) {
            let suffix = &name[id.len()..];
            let ours = suffix == "br"
                || suffix
                    .strip_prefix('h')
                    .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
            if ours && dead(pid) {
                eprintln!("sweeping interface {name} left by dead test process {pid}");
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}

impl Host {
    /// `ip:port` of this host.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    /// The host's certificate directory (`ca.pem` and its own certificates).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// A command that runs `program` inside this host (`ip netns exec`). The process gets
    /// SIGKILL if the test thread that started it dies.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        // `ip netns exec` execs the program in place, so the setting reaches it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd
    }

    /// Runs `make()`'s future to completion on a thread inside this host, on a
    /// current-thread tokio runtime (built after entering the namespace, so every socket
    /// it opens is the host's). Panics in it propagate.
    pub fn run<F, Fut, T>(&self, make: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("host-{}", self.name))
                .spawn_scoped(scope, || {
                    enter_netns(&self.ns);
                    runtime().block_on(make())
                })
                .expect("spawn host thread");
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Host::run`], in the background: join the handle for the result.
    pub fn spawn<F, Fut, T>(&self, make: F) -> std::thread::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let ns = self.ns.clone();
        std::thread::Builder::new()
            .name(format!("host-{}", self.name))
            .spawn(move || {
                enter_netns(&ns);
                runtime().block_on(make())
            })
            .expect("spawn host thread")
    }
}

/// A transport for operator requests (admin certificate), bound in the calling thread's
/// namespace.
fn admin_transport(identity: &Identity) -> Result<Transport, String> {
    Transport::bind_client(
        identity,
        Limits::default(),
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .map_err(|e| e.to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Moves the calling thread (only it) into network namespace `ns`.
fn enter_netns(ns: &str) {
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {ns}: {}",
        std::io::Error::last_os_error()
    );
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time from start to exit.
    pub elapsed: Duration,
}

impl Output {
    /// Panics unless it exited with 0.
    pub fn ok(self) -> Output {
        assert_eq!(self.code, Some(0), "command failed: {self:?}");
        self
    }
}

/// A process running in a host; SIGKILLed when dropped.
pub struct Proc {
    /// Its name in logs.
    pub name: String,
    child: Child,
    /// Its stderr log.
    pub log: PathBuf,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGKILL, and reap it: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process freezes; its peers see silence, its sockets stay open.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM, then waits for it to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        self.signal(libc::SIGTERM);
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node of a [`HostCluster`], alone on its host.
pub struct HostNode {
    /// Its name (and certificate name).
    pub name: String,
    /// Its host.
    pub host: Host,
    /// Its advertised address, `<host ip>:7001`.
    pub addr: String,
    /// The running process (`None` after [`HostCluster::kill_node`]).
    pub proc: Option<Proc>,
    /// Its config file.
    pub config: PathBuf,
}

/// An ECS process of a [`HostCluster`], alone on its host: the single ECS, or one member of
/// an ECS group.
pub struct HostEcs {
    /// Its certificate name (`ecs`, or `ecs1`.. in a group).
    pub name: String,
    /// Its Raft id in a group (its place in `--peers`, from 1); 0 for a single ECS.
    pub id: u64,
    /// Its host.
    pub host: Host,
    /// Its address, `<host ip>:7000`.
    pub addr: String,
    /// The running process.
    pub proc: Proc,
    /// Its config file.
    pub config: PathBuf,
}

/// An ECS host (or, from [`HostCluster::start_group`], three: an ECS group), node hosts and
/// a client host (where the operator's tools run too).
pub struct HostCluster {
    /// The network.
    pub lab: Lab,
    /// The ECS's host (in a group: the first member's).
    pub ecs_host: Host,
    /// The ECS processes: the single ECS, or every member of the group.
    pub ecs: Vec<HostEcs>,
    /// What operators give `--ecs`: the ECS's address, or every member's, comma-separated.
    pub ecs_addr: String,
    /// The host of clients and of the operator (client and admin certificates).
    pub client: Host,
    /// The nodes, in the order they were started.
    pub nodes: Vec<HostNode>,
}

/// Seconds the ECS allows one request to a node in these tests (default 5): a cut-off node
/// makes membership changes fail within this.
pub const ECS_NODE_TIMEOUT_S: u64 = 2;
/// Longest a command-line tool may run before the test calls it hung.
pub const TOOL_LIMIT: Duration = Duration::from_secs(60);

impl HostCluster {
    /// An ECS host (without replication), `n` node hosts `n1..=n<n>` whose nodes the ECS
    /// added, and a client host.
    pub fn start(n: usize) -> HostCluster {
        Self::start_with(n, "replication-factor = 1\n")
    }

    /// [`HostCluster::start`] with `extra` appended to the ECS's configuration file (TOML
    /// keys named like `serve`'s long flags).
    pub fn start_with(n: usize, extra: &str) -> HostCluster {
        let mut lab = Lab::new();
        let ecs_host = lab.add_host("ecs");
        let client = lab.add_host("client");
        // The ECS serves (and signs the ring) with an ecs certificate for its own address;
        // the operator's admin certificate (no SAN: it only dials) lives on the client and
        // ECS hosts.
        lab.install(&client, "admin");
        lab.install(&client, "client");
        let ecs = spawn_ecs(&lab, &ecs_host, "ecs", 0, extra);
        Self::assemble(lab, vec![ecs], client, n)
    }

    /// An ECS group of three members `ecs1..ecs3` on hosts `ecs1..ecs3`, each running
    /// `ringkv-ecs serve --config` with the group's `peers` (README "A highly available ECS:
    /// three members") and an ecs certificate for its host's address; `n` node hosts whose
    /// nodes were added through the group, and a client host. `extra` is appended to every
    /// member's configuration file.
    pub fn start_group(n: usize, extra: &str) -> HostCluster {
        let mut lab = Lab::new();
        let hosts: Vec<Host> = (1..=3).map(|i| lab.add_host(&format!("ecs{i}"))).collect();
        let client = lab.add_host("client");
        lab.install(&client, "admin");
        lab.install(&client, "client");
        let peers: Vec<String> = hosts
            .iter()
            .map(|h| format!("{}@{}", h.name, h.addr(ECS_PORT)))
            .collect();
        let extra = format!("peers = \"{}\"\n{extra}", peers.join(","));
        let members = hosts
            .iter()
            .zip(1..)
            .map(|(host, id)| spawn_ecs(&lab, host, &host.name, id, &extra))
            .collect();
        Self::assemble(lab, members, client, n)
    }

    /// Waits for the ECS (a leader, in a group), then starts and adds `n` nodes.
    fn assemble(lab: Lab, ecs: Vec<HostEcs>, client: Host, n: usize) -> HostCluster {
        let ecs_addr = ecs
            .iter()
            .map(|e| e.addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = HostCluster {
            lab,
            ecs_host: ecs[0].host.clone(),
            ecs,
            ecs_addr,
            client,
            nodes: Vec::new(),
        };
        cluster.wait_for_ecs();
        for i in 1..=n {
            let name = format!("n{i}");
            let host = cluster.lab.add_host(&name);
            cluster.start_node(&host, &name);
            cluster.add_node(&name);
        }
        cluster
    }

    /// Adds a host to the lab.
    pub fn add_host(&mut self, name: &str) -> Host {
        self.lab.add_host(name)
    }

    /// [`HostCluster::spawn_node`], then waits until the node answers.
    pub fn start_node(&mut self, host: &Host, name: &str) -> usize {
        let i = self.spawn_node(host, name);
        self.wait_answering(&self.nodes[i].addr);
        i
    }

    /// Issues node `name` a certificate for `host`'s address (unless it has one), writes its
    /// config file and starts `ringkv-node --config` on `host` (the node then waits for the
    /// ECS to add it). Returns its index in `nodes`.
    pub fn spawn_node(&mut self, host: &Host, name: &str) -> usize {
        if !ringkv_certs::leaf_paths(&host.certs_dir(), name)
            .cert
            .exists()
        {
            self.lab
                .issue(host, Role::Node, name, &[host.ip.to_string()]);
        }
        let addr = host.addr(NODE_PORT);
        let config = host.dir.join(format!("{name}.toml"));
        // Listening on every interface, advertising the host's address (the one in the
        // certificate, the one the ring position is computed from).
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\nlisten = \"0.0.0.0:{NODE_PORT}\"\nadvertise = \"{addr}\"\n\
                 data-dir = \"{}\"\ncerts = \"{}\"\n",
                host.dir.join(format!("{name}-data")).display(),
                host.certs_dir().display()
            ),
        )
        .expect("write node config");
        let proc = self.lab.spawn(
            host,
            name,
            &bin("ringkv-node"),
            &["--config".into(), config.display().to_string()],
        );
        self.nodes.push(HostNode {
            name: name.to_string(),
            host: host.clone(),
            addr: addr.clone(),
            proc: Some(proc),
            config,
        });
        self.nodes.len() - 1
    }

    /// SIGKILLs node `name`'s process (it stays in `nodes`, for [`HostCluster::restart_node`]).
    pub fn kill_node(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut proc) = self.nodes[i].proc.take() {
            proc.kill();
        }
    }

    /// Restarts the (killed) node `name` from its config file and data.
    pub fn restart_node(&mut self, name: &str) {
        let i = self.index(name);
        let node = &self.nodes[i];
        let proc = self.lab.spawn(
            &node.host,
            name,
            &bin("ringkv-node"),
            &["--config".into(), node.config.display().to_string()],
        );
        let addr = node.addr.clone();
        self.nodes[i].proc = Some(proc);
        self.wait_answering(&addr);
    }

    /// SIGKILLs ECS member `i` (its place in `ecs`) and starts it again from its config
    /// file and state directory, once `down` has passed.
    pub fn restart_ecs_after(&mut self, i: usize, down: Duration) {
        self.ecs[i].proc.kill();
        std::thread::sleep(down);
        let ecs = &self.ecs[i];
        self.ecs[i].proc = self.lab.spawn(
            &ecs.host,
            &ecs.name,
            &bin("ringkv-ecs"),
            &[
                "serve".into(),
                "--config".into(),
                ecs.config.display().to_string(),
            ],
        );
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &HostNode {
        &self.nodes[self.index(name)]
    }

    /// The operator's admin identity (on the client host).
    pub fn admin_identity(&self) -> Identity {
        Identity::from_dir(&self.client.certs_dir(), "admin").expect("admin identity")
    }

    /// A client configuration for the client host: every node a seed, the client
    /// certificate, short timeouts so that a cut-off node fails requests quickly.
    pub fn client_config(&self) -> ClientConfig {
        let identity = Identity::from_dir(&self.client.certs_dir(), "client").expect("client id");
        let mut config = ClientConfig::new(self.seeds(), identity);
        config.connect_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(2);
        config.retry.deadline = Duration::from_secs(20);
        config
    }

    /// Every node's address.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The answer of the node at `addr` to `body`, asked from the client host with the admin
    /// certificate.
    fn ask_node(&self, addr: &str, body: RequestBody) -> Result<ReplyBody, KvError> {
        let identity = self.admin_identity();
        self.client.run(|| async move {
            // Bound inside the host: a socket belongs to the namespace it was created in.
            let admin = Transport::bind_client(
                &identity,
                Limits::default(),
                Duration::from_secs(1),
                Duration::from_secs(2),
            )?;
            let reply = admin.request(addr, &Request::new(0, body)).await;
            admin.close().await;
            Ok(reply?.body)
        })
    }

    /// A node's status, asked from the client host with the admin certificate.
    pub fn node_status(&self, addr: &str) -> Result<NodeStatus, KvError> {
        match self.ask_node(addr, RequestBody::Status)? {
            ReplyBody::Status(s) => Ok(*s),
            other => panic!("unexpected status reply {other:?}"),
        }
    }

    /// The ring the node at `addr` holds (`GetMetadata`, asked from the client host; the
    /// signature is not checked here, nodes check it when they adopt a ring).
    pub fn node_ring(&self, addr: &str) -> Result<Option<RingMetadata>, KvError> {
        match self.ask_node(addr, RequestBody::GetMetadata)? {
            ReplyBody::Metadata(None) => Ok(None),
            ReplyBody::Metadata(Some(signed)) => Ok(Some(
                RingMetadata::from_frame(&signed.ring).expect("a node's ring decodes"),
            )),
            other => panic!("unexpected metadata reply {other:?}"),
        }
    }

    /// Waits until the node at `addr` answers a status request from the client host.
    pub fn wait_answering(&self, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.node_status(addr) {
                Ok(_) => return,
                Err(e) => assert!(Instant::now() < deadline, "node {addr} never answered: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_ecs(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.ecs_cmd(&self.client, &["ring"]);
            if out.code == Some(0) {
                return;
            }
            assert!(Instant::now() < deadline, "the ECS never answered: {out:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the operator tool `ringkv-ecs --ecs <ECS> ARGS` on `from` (client or ECS host).
    pub fn ecs_cmd(&self, from: &Host, args: &[&str]) -> Output {
        let mut all: Vec<String> = vec![
            "--ecs".into(),
            self.ecs_addr.clone(),
            "--certs".into(),
            from.certs_dir().display().to_string(),
            "--identity".into(),
            "admin".into(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        self.lab.exec(from, &bin("ringkv-ecs"), &all, TOOL_LIMIT)
    }

    /// The ECS group's member with Raft id `id`.
    pub fn ecs_member(&self, id: u64) -> &HostEcs {
        self.ecs
            .iter()
            .find(|e| e.id == id)
            .unwrap_or_else(|| panic!("no ECS member {id}"))
    }

    /// Sends `request` to the ECS (member) at `addr` alone, following no redirect, from host
    /// `from` with its admin certificate: the reply, or why there was none.
    pub fn ecs_call(
        &self,
        from: &Host,
        addr: &str,
        request: AdminRequest,
        timeout: Duration,
    ) -> Result<AdminReply, String> {
        let identity = Identity::from_dir(&from.certs_dir(), "admin").expect("admin identity");
        from.run(|| async move {
            let admin = admin_transport(&identity)?;
            let reply = admin.call::<_, AdminReply>(addr, &request, timeout).await;
            admin.close().await;
            reply.map_err(|e| e.to_string())
        })
    }

    /// Asks the ECS group at `members` (`ringkv_ecs::client::ask`: tries them in turn,
    /// follows redirects, waits out an election), from host `from` with its admin certificate.
    pub fn ecs_ask(
        &self,
        from: &Host,
        members: &[String],
        request: AdminRequest,
        timeout: Duration,
    ) -> Result<AdminReply, String> {
        let identity = Identity::from_dir(&from.certs_dir(), "admin").expect("admin identity");
        from.run(|| async move {
            let admin = admin_transport(&identity)?;
            let reply = ringkv_ecs::client::ask(&admin, members, &request, timeout).await;
            admin.close().await;
            reply.map_err(|e| e.to_string())
        })
    }

    /// The ECS group as the member at `addr` sees it (`Group`, asked from `from`).
    pub fn group_report(&self, from: &Host, addr: &str) -> Result<GroupReport, String> {
        match self.ecs_call(from, addr, AdminRequest::Group, Duration::from_secs(2))? {
            AdminReply::Group(Some(report)) => Ok(report),
            other => Err(format!("{addr} answered Group with {other:?}")),
        }
    }

    /// Adds the started node `name` through the ECS; panics if the ECS refuses.
    pub fn add_node(&self, name: &str) -> Output {
        let addr = self.node(name).addr.clone();
        self.ecs_cmd(&self.client, &["add-node", "--name", name, "--addr", &addr])
            .ok()
    }

    /// A final read of every key in `keys` from the client host (for the history checker).
    pub fn final_reads(
        &self,
        keys: &[Vec<u8>],
    ) -> std::collections::HashMap<Vec<u8>, Option<Vec<u8>>> {
        let config = self.client_config();
        self.client.run(|| async {
            let store = kvstore::KvStore::connect(config).await.expect("connect");
            let mut finals = std::collections::HashMap::new();
            for key in keys {
                finals.insert(key.clone(), store.get(key).await.expect("final read"));
            }
            store.disconnect().await;
            finals
        })
    }

    /// Runs the client tool `ringkv --seed <every node> ARGS` on the client host.
    pub fn ringkv(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = vec![
            "--seed".into(),
            self.seeds().join(","),
            "--certs".into(),
            self.client.certs_dir().display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        self.lab
            .exec(&self.client, &bin("ringkv"), &all, TOOL_LIMIT)
    }
}

/// Issues `name` an ecs certificate for `host`'s address, installs it and the admin
/// certificate in the host, writes `<name>.toml` (with `extra` appended) and starts
/// `ringkv-ecs serve --config` there, logging to `<name>.log`.
fn spawn_ecs(lab: &Lab, host: &Host, name: &str, id: u64, extra: &str) -> HostEcs {
    lab.issue(host, Role::Ecs, name, &[host.ip.to_string()]);
    lab.install(host, "admin");
    let addr = host.addr(ECS_PORT);
    let config = host.dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "# ringkv-ecs serve --config {}\nlisten = \"{addr}\"\nstate-dir = \"{}\"\n\
             certs = \"{}\"\nidentity = \"{name}\"\nnode-timeout = {ECS_NODE_TIMEOUT_S}\n{extra}",
            config.display(),
            host.dir.join("state").display(),
            host.certs_dir().display()
        ),
    )
    .expect("write ECS config");
    let proc = lab.spawn(
        host,
        name,
        &bin("ringkv-ecs"),
        &[
            "serve".into(),
            "--config".into(),
            config.display().to_string(),
        ],
    );
    HostEcs {
        name: name.to_string(),
        id,
        host: host.clone(),
        addr,
        proc,
        config,
    }
}

/// Prints how long a test took when dropped, also when it fails.
pub struct Stopwatch {
    name: &'static str,
    started: Instant,
    _watchdog: crate::common::Watchdog,
}

impl Stopwatch {
    /// How long a test of these may run before its [`crate::common::Watchdog`] aborts it.
    pub const LIMIT: Duration = Duration::from_secs(600);

    /// Starts timing `name`, watched for [`Stopwatch::LIMIT`].
    pub fn start(name: &'static str) -> Stopwatch {
        Self::start_with_limit(name, Self::LIMIT)
    }

    /// Starts timing `name`, watched for `limit`.
    pub fn start_with_limit(name: &'static str, limit: Duration) -> Stopwatch {
        Stopwatch {
            name,
            started: Instant::now(),
            _watchdog: crate::common::Watchdog::start(name, limit),
        }
    }
}

impl Drop for Stopwatch {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            "FAILED"
        } else {
            "passed"
        };
        eprintln!(
            "[multihost] {} {outcome} in {:.1?}",
            self.name,
            self.started.elapsed()
        );
    }
}
