//! The lease-scale benchmark behind `ringkv-bench lease-scale`: how many nodes one ECS
//! process can probe and lease (ARCHITECTURE.md §11, "Scale of the leader's liveness work").
//!
//! It starts `nodes` stand-in nodes in this process, each a real QUIC + mTLS endpoint of its
//! own on 127.0.0.1 (one shared `node` certificate; the ECS checks the address SAN) that
//! answers `Lease` with `Leased`, `InstallMetadata` with `Installed` and anything else with
//! `Ok`, writes a ring of all of them into a fresh state directory, and runs a real
//! `ringkv-ecs serve` process on it (the binary next to this one). After a warm-up (the
//! ECS dials and installs the ring at every node; until the probe rate is reached) it counts,
//! for `seconds`, the probes the nodes receive and the longest gap between two probes of one
//! node, and reads the ECS process's CPU time from `/proc`. The stand-ins share the machine
//! with the ECS, so the figure that carries over is the ECS's CPU time per probe (a round
//! trip: request out, answer in), from which the largest cluster one ECS core can lease at a
//! probe interval follows.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ringkv_certs::{Identity, IssueOptions, PeerIdentity, Role};
use ringkv_transport::{ServeLimits, Service};
use ringkv_wire::{NodeEntry, Reply, ReplyBody, Request, RequestBody, WireError};
use tokio::sync::watch;

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseScaleArgs {
    /// Cluster sizes to measure, comma-separated.
    #[arg(long, default_value = "250,500,1000,2000")]
    pub nodes: String,
    /// How long to count, per size, after the warm-up (until the probe rate is reached).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// The ECS's `--probe-interval` in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub probe_interval_ms: u64,
    /// The ECS's `--max-probe-rate`: past it the interval stretches.
    #[arg(long, default_value_t = ringkv_ecs::config::DEFAULT_MAX_PROBE_RATE)]
    pub max_probe_rate: u32,
}

/// The ECS's `--failover-after` here: long, so that a stand-in slow to answer under the
/// load is never failed over (and the interval's cap, a quarter of it, never binds).
const FAILOVER_AFTER: Duration = Duration::from_secs(3600);

/// What one stand-in node saw.
#[derive(Default)]
struct Seen {
    probes: AtomicU64,
    /// The last probe and the longest gap between two probes since the count began.
    last: Mutex<Option<Instant>>,
    max_gap_us: AtomicU64,
}

/// A stand-in node: answers what the ECS sends, counting probes.
struct StandIn {
    seen: Arc<Seen>,
    stamp: AtomicU64,
}

impl Service for StandIn {
    type Request = Request;
    type Reply = Reply;

    fn name(&self) -> &str {
        "stand-in node"
    }

    fn max_frame(&self) -> usize {
        ringkv_wire::Limits::default().max_frame
    }

    fn serve_limits(&self) -> ServeLimits {
        ServeLimits::default()
    }

    async fn handle(&self, _peer: &PeerIdentity, request: Request) -> Reply {
        let body = match request.body {
            RequestBody::Fenced { body, .. } => *body,
            body => body,
        };
        let answer = match body {
            RequestBody::Lease { .. } => {
                let now = Instant::now();
                self.seen.probes.fetch_add(1, Ordering::Relaxed);
                let mut last = self.seen.last.lock().expect("last lock");
                if let Some(before) = last.replace(now) {
                    let gap = now.duration_since(before).as_micros() as u64;
                    self.seen.max_gap_us.fetch_max(gap, Ordering::Relaxed);
                }
                ReplyBody::Leased {
                    stamp: self.stamp.fetch_add(1, Ordering::Relaxed),
                }
            }
            RequestBody::InstallMetadata { .. } => ReplyBody::Installed { adopted: true },
            _ => ReplyBody::Ok,
        };
        Reply::new(1, answer)
    }

    fn bad_frame(&self, error: WireError) -> Reply {
        Reply::new(
            0,
            ReplyBody::Error {
                kind: error.kind(),
                message: error.to_string(),
            },
        )
    }

    fn unencodable(&self, error: WireError) -> Reply {
        self.bad_frame(error)
    }
}

/// The figures of one cluster size.
#[derive(Debug)]
pub struct ScaleRow {
    /// How long until the probes reached their rate (dials and ring installs first).
    pub warm_up: Duration,
    /// Stand-in nodes in the ring.
    pub nodes: usize,
    /// The probe interval the ECS keeps to for that many nodes.
    pub interval: Duration,
    /// Probes answered per second (all nodes).
    pub probes_per_s: f64,
    /// What the probe interval asks for: nodes / interval.
    pub wanted_per_s: f64,
    /// The ECS process's CPU time over the count, as a share of one core.
    pub ecs_cpu: f64,
    /// This process's (the stand-ins') CPU time over the count, in cores.
    pub stand_ins_cpu: f64,
    /// ECS CPU µs per probe round trip.
    pub us_per_probe: f64,
    /// The longest gap between two probes of one node (ms).
    pub max_gap_ms: f64,
}

impl std::fmt::Display for ScaleRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>6} nodes every {:>5.0?} (warm after {:>4.1?}): {:>8.0} probes/s of {:>8.0} wanted; ECS CPU {:>5.1}% of a core, {:>5.1} µs per probe (stand-ins {:>5.1}%); longest gap between two probes of a node {:>6.0} ms",
            self.nodes,
            self.interval,
            self.warm_up,
            self.probes_per_s,
            self.wanted_per_s,
            self.ecs_cpu * 100.0,
            self.us_per_probe,
            self.stand_ins_cpu * 100.0,
            self.max_gap_ms
        )
    }
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// Issues what the benchmark needs in `certs`: a CA, the `ecs` and one shared `node`
/// certificate for 127.0.0.1.
fn make_certs(certs: &Path) -> anyhow::Result<()> {
    ringkv_certs::init_ca(certs, false)?;
    for (role, name) in [(Role::Ecs, "ecs"), (Role::Node, "node")] {
        let mut options = IssueOptions::new(role, name);
        options.sans = vec!["127.0.0.1".into()];
        ringkv_certs::issue(certs, &options)?;
    }
    Ok(())
}

/// Measures one cluster size.
async fn measure(
    dir: &Path,
    n: usize,
    args: &LeaseScaleArgs,
    identity: &Identity,
) -> anyhow::Result<ScaleRow> {
    let (stop, stopped) = watch::channel(false);
    let mut seen = Vec::with_capacity(n);
    let mut entries = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    for i in 0..n {
        let mut server_config = ringkv_certs::server_config(identity)?;
        ServeLimits::default().apply(&mut server_config);
        let endpoint = ringkv_transport::bind_endpoint(
            "127.0.0.1:0".parse::<SocketAddr>()?,
            server_config,
            None,
        )?;
        let addr = endpoint.local_addr()?;
        let one = Arc::new(Seen::default());
        seen.push(one.clone());
        entries.push(NodeEntry::new(format!("s{i}"), addr.to_string()));
        let mut stopped = stopped.clone();
        servers.push(tokio::spawn(ringkv_transport::serve(
            endpoint,
            Arc::new(StandIn {
                seen: one,
                stamp: AtomicU64::new(1),
            }),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
    }
    let state = dir.join(format!("ecs-{n}"));
    let ring = ringkv_wire::RingMetadata::new(1, entries)?.with_replication(3)?;
    ringkv_ecs::state::RingFile::in_dir(&state)?.save(&ring)?;
    let ecs_port = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.local_addr()?.port()
    };
    let exe = std::env::current_exe()?;
    let ecs_bin = exe.with_file_name("ringkv-ecs");
    let mut ecs = std::process::Command::new(&ecs_bin)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{ecs_port}"),
            "--state-dir",
            &state.display().to_string(),
            "--certs",
            &dir.join("certs").display().to_string(),
            "--identity",
            "ecs",
            "--probe-interval",
            &format!("{}ms", args.probe_interval_ms),
            "--failover-after",
            &format!("{}s", FAILOVER_AFTER.as_secs()),
            "--max-probe-rate",
            &args.max_probe_rate.to_string(),
        ])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", ecs_bin.display()))?;
    // Warm-up: the ECS dials every node (a TLS handshake each) and installs the ring there
    // (a ring of n nodes, n times). Counting starts once a second of probes reaches 95% of
    // the interval's rate, or after 60 s if it never does (then the figures show it).
    let interval = ringkv_ecs::liveness::probe_interval(
        Duration::from_millis(args.probe_interval_ms),
        n,
        args.max_probe_rate,
        FAILOVER_AFTER,
    );
    let wanted = n as f64 / interval.as_secs_f64();
    let warm_up = Instant::now();
    loop {
        let before: u64 = seen.iter().map(|s| s.probes.load(Ordering::Relaxed)).sum();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(status) = ecs.try_wait()? {
            bail!("the ECS exited during the warm-up: {status}");
        }
        let rate = seen
            .iter()
            .map(|s| s.probes.load(Ordering::Relaxed))
            .sum::<u64>()
            - before;
        if rate as f64 >= 0.95 * wanted || warm_up.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let warm_up = warm_up.elapsed();
    for s in &seen {
        *s.last.lock().expect("last lock") = None;
        s.max_gap_us.store(0, Ordering::Relaxed);
    }
    let probes_before: u64 = seen.iter().map(|s| s.probes.load(Ordering::Relaxed)).sum();
    let cpu_before = cpu_time(ecs.id())?;
    let own_before = cpu_time(std::process::id())?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let cpu = cpu_time(ecs.id())?.saturating_sub(cpu_before);
    let own = cpu_time(std::process::id())?.saturating_sub(own_before);
    let elapsed = started.elapsed();
    let probes = seen
        .iter()
        .map(|s| s.probes.load(Ordering::Relaxed))
        .sum::<u64>()
        - probes_before;
    let max_gap_us = seen
        .iter()
        .map(|s| s.max_gap_us.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let _ = ecs.kill();
    let _ = ecs.wait();
    let _ = stop.send(true);
    for server in servers {
        let _ = server.await;
    }
    Ok(ScaleRow {
        warm_up,
        nodes: n,
        interval,
        probes_per_s: probes as f64 / elapsed.as_secs_f64(),
        wanted_per_s: wanted,
        ecs_cpu: cpu.as_secs_f64() / elapsed.as_secs_f64(),
        stand_ins_cpu: own.as_secs_f64() / elapsed.as_secs_f64(),
        us_per_probe: cpu.as_secs_f64() * 1e6 / (probes.max(1) as f64),
        max_gap_ms: max_gap_us as f64 / 1000.0,
    })
}

/// Runs the benchmark: one row per size, then the extrapolation.
pub async fn run(args: &LeaseScaleArgs) -> anyhow::Result<String> {
    ringkv_certs::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    make_certs(&dir.path().join("certs"))?;
    let identity = Identity::from_dir(&dir.path().join("certs"), "node")?;
    let mut out = String::new();
    let mut costs = Vec::new();
    for n in args.nodes.split(',').filter_map(|n| n.trim().parse().ok()) {
        let row = measure(dir.path(), n, args, &identity).await?;
        out.push_str(&format!("{row}\n"));
        costs.push(row.us_per_probe);
    }
    if let Some(cost) = costs.iter().cloned().reduce(f64::max) {
        let per_core = 1e6 / cost;
        out.push_str(&format!(
            "one ECS core: {per_core:.0} probes/s at the highest cost measured ({cost:.1} µs), so {:.0} nodes at a {} ms probe interval (at 100% of the core)\n",
            per_core * args.probe_interval_ms as f64 / 1000.0,
            args.probe_interval_ms
        ));
        // What the default failover_after (3 s) allows: the interval stretches up to 750 ms.
        let cap = ringkv_ecs::config::DEFAULT_FAILOVER_AFTER / 4;
        out.push_str(&format!(
            "the budget of {} probes/s takes {:.0}% of that core; with the default --failover-after the interval stretches up to {cap:?}, so the budget covers {:.0} nodes, and 10,000 nodes take {:.0} probes/s ({:.0}% of the core)\n",
            args.max_probe_rate,
            f64::from(args.max_probe_rate) * cost / 1e4,
            f64::from(args.max_probe_rate) * cap.as_secs_f64(),
            10_000.0 / cap.as_secs_f64(),
            10_000.0 / cap.as_secs_f64() * cost / 1e4,
        ));
    }
    Ok(out)
}
