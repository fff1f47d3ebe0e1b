//! The `ringkv-ecs` binary's code: `serve` runs the service; the other subcommands are the
//! operator's client for it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringkv_certs::Identity;
use ringkv_ecs::EcsConfig;
use ringkv_transport::Transport;
use ringkv_wire::{AdminReply, AdminRequest, Limits, NodeReport, RangeReport, RingMetadata};

use super::serve_limits::ServeLimitsArgs;

/// ringkv External Configuration Service and its operator commands.
#[derive(Debug, Parser)]
#[command(
    name = "ringkv-ecs",
    version,
    about = "ringkv External Configuration Service"
)]
pub struct Cli {
    /// Directory holding ca.pem and the admin certificate.
    #[arg(long, env = "RINGKV_CERTS", default_value = "certs", global = true)]
    pub certs: PathBuf,
    /// Name of the admin certificate in --certs (<name>.pem/.key).
    #[arg(long, env = "RINGKV_IDENTITY", default_value = "admin", global = true)]
    pub identity: String,
    /// Address of the ECS service, or of the members of an ECS group, comma-separated (for
    /// the operator commands): any member will do, a follower names the leader.
    #[arg(
        long,
        env = "RINGKV_ECS",
        default_value = "127.0.0.1:7000",
        global = true
    )]
    pub ecs: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A `ringkv-ecs` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the ECS service (long-running; SIGINT/SIGTERM stop it).
    Serve {
        /// TOML file of defaults for the flags of `serve` and the global ones: keys are the
        /// long flag names (`listen`, `state-dir`, `certs`, ...); a flag given on the command
        /// line (or its environment variable) wins.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// Directory of the persisted ring.
        #[arg(long, default_value = "ecs-state")]
        state_dir: PathBuf,
        /// Seconds allowed for one short request to a node (lock, install, start, status).
        #[arg(long, default_value_t = 5)]
        node_timeout: u64,
        /// Seconds allowed for one whole range copy from one node to another during a join
        /// or a leave; set it above the largest range's size divided by the transfer rate.
        #[arg(long, default_value_t = ringkv_ecs::config::DEFAULT_TRANSFER_TIMEOUT.as_secs())]
        transfer_timeout: u64,
        /// Milliseconds `status` waits for each node (all are asked at once); a node that has
        /// not answered by then is reported from its peers' gossip views.
        #[arg(long, default_value_t = 2000)]
        status_timeout_ms: u64,
        /// Copies of every key in a ring this ECS creates (1..=7; 1: no replication, no
        /// failover). An existing ring keeps the factor it was created with.
        #[arg(long, default_value_t = ringkv_ecs::config::DEFAULT_REPLICATION,
              value_parser = clap::value_parser!(u8).range(1..=7))]
        replication_factor: u8,
        /// With replication, fail over a node that has answered no probe for this long
        /// (e.g. `3s`, `1500ms`). Shorter fails over sooner; too short fails over nodes that
        /// were only slow or paused. A node stops serving after half of it without a probe.
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        failover_after: Duration,
        /// How often the ECS probes (and renews the lease of) every node, e.g. `250ms`.
        #[arg(long, default_value = "250ms", value_parser = parse_duration)]
        probe_interval: Duration,
        /// The most probes per second the leader sends. In a ring of more live nodes than
        /// this times --probe-interval, the interval stretches to keep to it, up to a quarter
        /// of --failover-after; past that the rate grows with the ring.
        #[arg(long, default_value_t = ringkv_ecs::config::DEFAULT_MAX_PROBE_RATE,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_probe_rate: u32,
        /// The most steps of a membership change one node takes part in at once: range
        /// copies it sends or receives, locks, installs. A change runs its copies in
        /// parallel, this many per node; 1 runs each node's one after another.
        #[arg(long, default_value_t = ringkv_ecs::config::DEFAULT_STEPS_PER_NODE as u64,
              value_parser = clap::value_parser!(u64).range(1..=64))]
        steps_per_node: u64,
        /// The founding members of a replicated ECS group, `name@host:port` (certificate
        /// name and ECS address), comma-separated, the same list in the same order on every
        /// member; this member is the one named like its certificate. Without it (and
        /// without --raft-id): a single ECS.
        #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
        peers: Vec<(String, String)>,
        /// This member's Raft id (default: its place in --peers, from 1). Alone, without
        /// --peers: a new member that waits to be added with `add-ecs-member`.
        #[arg(long)]
        raft_id: Option<u64>,
        /// What peers may make the ECS hold (it admits `admin` certificates, and in a
        /// group the other members' `ecs` certificates for Raft messages only).
        #[command(flatten)]
        serve: ServeLimitsArgs,
    },
    /// Show the ring and every node's state (reachability, version, keys, locks).
    Status,
    /// Show the ECS's ring metadata.
    Ring,
    /// Show how far the membership change under way has come (stage, copies sent, bytes
    /// moved, rate); `add-node` and `remove-node` print it every second while they wait.
    Progress,
    /// Add a running node (started without --start) to the ring; it takes an even share of
    /// the partitions from the most loaded nodes.
    AddNode {
        /// The node's name (its certificate name).
        #[arg(long)]
        name: String,
        /// The node's advertised host:port.
        #[arg(long)]
        addr: String,
        /// The node's failure domain (a rack, a host, an availability zone): no two copies
        /// of a partition are placed in one zone while the ring has enough zones.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Remove a node from the ring, live or dead. With replication its copies are rebuilt
    /// on the nodes that take its places (a dead node is failed over); without, its
    /// partitions move to them (it must be live).
    RemoveNode {
        /// The node's name.
        #[arg(long)]
        name: String,
    },
    /// Add a member to the ECS group (running `serve --raft-id ID` with the group's CA and
    /// an ecs certificate called NAME); it votes once it has caught up.
    AddEcsMember {
        /// Its Raft id, never used before in this group.
        #[arg(long)]
        id: u64,
        /// Its certificate's name.
        #[arg(long)]
        name: String,
        /// Its ECS address, host:port.
        #[arg(long)]
        addr: String,
    },
    /// Remove a member from the ECS group.
    RemoveEcsMember {
        /// Its Raft id (see `status`).
        #[arg(long)]
        id: u64,
    },
    /// Make every node of the ring serve clients.
    Start,
    /// Make every node of the ring answer STOPPED to clients.
    Stop,
}

/// Parses the command line and runs it on a current-thread runtime. Returns the exit code.
pub fn main() -> anyhow::Result<i32> {
    let cli: Cli = super::config_file::parse()?;
    super::init_tracing(if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    });
    super::runtime()?.block_on(run(cli))
}

/// Runs one parsed command line. Returns the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let identity = Identity::from_dir(&cli.certs, &cli.identity).with_context(|| {
        format!(
            "loading admin identity '{}' from {}",
            cli.identity,
            cli.certs.display()
        )
    })?;
    let request = match cli.command {
        Command::Serve {
            listen,
            state_dir,
            node_timeout,
            transfer_timeout,
            status_timeout_ms,
            replication_factor,
            failover_after,
            probe_interval,
            max_probe_rate,
            steps_per_node,
            peers,
            raft_id,
            serve,
            config: _, // already applied by the parser
        } => {
            if probe_interval.is_zero() || failover_after < probe_interval * 4 {
                // The lease (half of it) must outlast two probe rounds.
                anyhow::bail!(
                    "--failover-after ({failover_after:?}) must be at least four times --probe-interval ({probe_interval:?})"
                );
            }
            let mut config = EcsConfig::new(listen, state_dir);
            config.replication = replication_factor;
            config.failover_after = failover_after;
            config.probe_interval = probe_interval;
            config.max_probe_rate = max_probe_rate;
            config.steps_per_node = steps_per_node as usize;
            config.node_timeout = Duration::from_secs(node_timeout);
            config.transfer_timeout = Duration::from_secs(transfer_timeout);
            config.status_timeout = Duration::from_millis(status_timeout_ms);
            config.serve = serve.limits(Limits::default().max_frame)?;
            config.peers = peers;
            config.raft_id = raft_id;
            let (endpoint, ecs) = ringkv_ecs::bind(config, &identity)
                .await
                .context("starting the ECS")?;
            ringkv_ecs::run(endpoint, ecs, ringkv_transport::shutdown_signal()).await;
            return Ok(0);
        }
        Command::Status => AdminRequest::Status,
        Command::Ring => AdminRequest::Ring,
        Command::Progress => AdminRequest::Progress,
        Command::AddNode { name, addr, zone } => AdminRequest::AddNode { name, addr, zone },
        Command::RemoveNode { name } => AdminRequest::RemoveNode { name },
        Command::AddEcsMember { id, name, addr } => AdminRequest::AddEcsMember { id, name, addr },
        Command::RemoveEcsMember { id } => AdminRequest::RemoveEcsMember { id },
        Command::Start => AdminRequest::Start,
        Command::Stop => AdminRequest::Stop,
    };
    let transport = Transport::bind_client(
        &identity,
        Limits::default(),
        Duration::from_secs(5),
        Duration::from_secs(5),
    )?;
    let members = ringkv_ecs::client::members(&cli.ecs);
    // A short request beside the operator's (the group, the progress of a change).
    let (t, m) = (&transport, &members);
    let aside = |request: AdminRequest| async move {
        ringkv_ecs::client::ask(t, m, &request, Duration::from_secs(5))
            .await
            .ok()
    };
    let status = matches!(request, AdminRequest::Status);
    // The group first, for `status` (a single ECS has none).
    let group = if status {
        aside(AdminRequest::Group).await
    } else {
        None
    };
    // Membership changes move data: allow them as long as the ECS's own transfer timeout,
    // and say how far they have come every second meanwhile.
    let changes = matches!(
        request,
        AdminRequest::AddNode { .. } | AdminRequest::RemoveNode { .. }
    );
    let asked = ringkv_ecs::client::ask(&transport, &members, &request, Duration::from_secs(3600));
    let reply = if changes {
        // Polled beside the request, never in its way: an ECS that does not answer delays
        // only the progress lines, not the request's own error.
        let report_progress = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(AdminReply::Progress(Some(report))) =
                    aside(AdminRequest::Progress).await
                {
                    eprint!("{}", progress_text(&report));
                }
            }
        };
        tokio::select! {
            reply = asked => reply,
            never = report_progress => never,
        }
    } else {
        asked.await
    }
    .with_context(|| format!("asking the ECS at {}", cli.ecs))?;
    // `status` also shows the change under way.
    let progress = if status {
        aside(AdminRequest::Progress).await
    } else {
        None
    };
    transport.close().await;
    let (code, mut text) = reply_text(&reply);
    if let Some(AdminReply::Group(Some(group))) = &group {
        text.insert_str(0, &group_text(group));
    }
    if let Some(AdminReply::Progress(Some(report))) = &progress {
        text.push_str(&progress_text(report));
    }
    if code == 0 {
        print!("{text}");
    } else {
        eprint!("{text}");
    }
    Ok(code)
}

/// The operator's view of a reply, and the exit code it means.
pub fn reply_text(reply: &AdminReply) -> (i32, String) {
    match reply {
        AdminReply::Ring(metadata) => (0, ring_text(metadata)),
        AdminReply::Status {
            metadata,
            nodes,
            ranges,
        } => {
            let mut text = status_text(metadata, nodes);
            text.push_str(&ranges_text(metadata, ranges));
            (0, text)
        }
        AdminReply::Changed { metadata, moved } => {
            let mut s = format!(
                "ring is now at version {} with {} nodes\n",
                metadata.version,
                metadata.nodes.len()
            );
            if let Some(m) = moved {
                let mb = m.bytes as f64 / 1e6;
                let secs = (m.total_ms as f64 / 1000.0).max(0.001);
                let _ = writeln!(
                    s,
                    "moved {} keys ({mb:.1} MB) in {} range copies from {} to {} in {:.2} s ({:.1} MB/s); ranges write-locked for {} ms",
                    m.entries,
                    m.copies,
                    m.from.join(", "),
                    m.to.join(", "),
                    secs,
                    mb / secs,
                    m.locked_ms
                );
            }
            (0, s)
        }
        AdminReply::Done(message) => (0, format!("{message}\n")),
        AdminReply::Progress(Some(report)) => (0, progress_text(report)),
        AdminReply::Progress(None) => (0, "no membership change under way\n".into()),
        AdminReply::Error(message) => (1, format!("error: {message}\n")),
        AdminReply::Group(Some(group)) => (0, group_text(group)),
        AdminReply::Group(None) => (0, "a single ECS (no group)\n".into()),
        AdminReply::NotLeader { leader } => (
            1,
            format!(
                "error: this ECS member does not lead its group; the leader is {}\n",
                leader
                    .as_deref()
                    .unwrap_or("not known (an election is under way?)")
            ),
        ),
        // Only ECS members exchange Raft messages; an operator never asks for one.
        AdminReply::Raft(bytes) => (
            1,
            format!("error: unexpected Raft reply ({} bytes)\n", bytes.len()),
        ),
    }
}

/// One line on a membership change under way.
pub fn progress_text(r: &ringkv_wire::ChangeReport) -> String {
    let secs = (r.elapsed_ms as f64 / 1000.0).max(0.001);
    let mb = r.bytes as f64 / 1e6;
    format!(
        "change {} (to ring v{}), {}: stage {}/{} ({}); {}/{} range copies sent, {} keys ({mb:.1} MB) moved in {secs:.1} s ({:.1} MB/s)\n",
        r.change,
        r.version,
        r.phase,
        r.stage,
        r.stages,
        r.doing,
        r.copies_sent,
        r.copies,
        r.entries,
        mb / secs
    )
}

/// The ECS group, as `status` prints it above the ring.
pub fn group_text(group: &ringkv_wire::GroupReport) -> String {
    let leader = group
        .leader
        .and_then(|id| group.members.iter().find(|m| m.id == id))
        .map_or("none known".to_string(), |m| {
            format!("{} ({}, id {})", m.name, m.addr, m.id)
        });
    let failover_after = match group.failover_after_ms {
        0 => "not fixed yet".to_string(),
        ms => format!("{:?}", Duration::from_millis(ms)),
    };
    let mut text = format!(
        "ECS group: leader {leader}, term {}, applied index {}, failover after {failover_after} (as member {} sees it)\n",
        group.term, group.applied, group.this
    );
    for m in &group.members {
        let _ = writeln!(
            text,
            "  ecs member {} {} {}{}",
            m.id,
            m.name,
            m.addr,
            if m.voter { "" } else { " (learner)" }
        );
    }
    text
}

/// Parses an ECS group member, `name@host:port`.
pub fn parse_peer(text: &str) -> Result<(String, String), String> {
    match text.trim().split_once('@') {
        Some((name, addr)) if !name.is_empty() && !addr.is_empty() => {
            Ok((name.to_string(), addr.to_string()))
        }
        _ => Err(format!(
            "'{text}' is not name@host:port (the member's certificate name and ECS address)"
        )),
    }
}

/// Parses a duration: `1500ms`, `3s`, `2.5s`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60.0)
    } else if let Some(h) = text.strip_suffix('h') {
        (h, 3600.0)
    } else {
        (text, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!(
            "bad duration {text:?}: expected e.g. 3s, 1500ms, 2m, 1h or 2.5"
        )),
    }
}

/// The replication summary: copies per key, failed nodes, and the ranges short of copies
/// (head first, tail last; the ECS sends only those), at most [`SHORT_RANGES_SHOWN`] of
/// them.
pub fn ranges_text(metadata: &RingMetadata, ranges: &[RangeReport]) -> String {
    let mut s = format!(
        "\nreplicas: {} copies of every key in {} partitions{}\n",
        metadata.chain_len(),
        metadata.partition_count(),
        if metadata.failed.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", metadata.failed.join(", "))
        }
    );
    let short_of: Vec<&RangeReport> = ranges.iter().filter(|r| r.missing > 0).collect();
    if short_of.is_empty() {
        s.push_str("every range has all its copies\n");
        return s;
    }
    let _ = writeln!(
        s,
        "{} range(s) below the replication factor:",
        short_of.len()
    );
    for r in short_of.iter().take(SHORT_RANGES_SHOWN) {
        let _ = writeln!(
            s,
            "  ({}…, {}…]  {:<32} {} copy(ies) missing",
            short(r.range.start.to_hex()),
            short(r.range.end.to_hex()),
            r.chain.join(" -> "),
            r.missing
        );
    }
    if short_of.len() > SHORT_RANGES_SHOWN {
        let _ = writeln!(s, "  … and {} more", short_of.len() - SHORT_RANGES_SHOWN);
    }
    s
}

/// How many ranges short of copies [`ranges_text`] lists.
pub const SHORT_RANGES_SHOWN: usize = 20;

fn short(hex: String) -> String {
    hex[..10].to_string()
}

/// A node's share as `count (percent of the partitions)`.
fn share_cell(count: u32, partitions: usize) -> String {
    format!(
        "{count} ({:.0}%)",
        100.0 * f64::from(count) / partitions.max(1) as f64
    )
}

/// The ring as a table: every node with its zone and its share of the partitions (heads
/// take writes, tails serve reads, copies are what it stores). Shared by `ringkv-ecs ring`
/// and the client's `ringkv ring`.
pub fn ring_text(metadata: &RingMetadata) -> String {
    let partitions = metadata.partition_count();
    let mut s = format!(
        "ring version {}, {} nodes, {} partitions, {} copies of every key\n",
        metadata.version,
        metadata.nodes.len(),
        partitions,
        metadata.chain_len(),
    );
    let _ = writeln!(
        s,
        "{:<10} {:<22} {:<10} {:>11} {:>11} {:>11}",
        "NAME", "ADDRESS", "ZONE", "HEADS", "TAILS", "COPIES"
    );
    for (node, share) in metadata.nodes.iter().zip(metadata.shares()) {
        let failed = if metadata.is_failed(&node.name) {
            "  (failed)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{:<10} {:<22} {:<10} {:>11} {:>11} {:>11}{failed}",
            node.name,
            node.addr,
            node.zone.as_deref().unwrap_or("-"),
            share_cell(share.heads, partitions),
            share_cell(share.tails, partitions),
            share_cell(share.copies, partitions),
        );
    }
    s
}

/// The ring with every node's report as a table. LIVENESS is `alive` for a node that
/// answered the ECS, otherwise what the other nodes' gossip sees of it (`alive`,
/// `suspected` or `dead`; `unknown` if nobody knows); VERSION is the metadata version the
/// node reported (`-` if it did not answer).
pub fn status_text(metadata: &RingMetadata, nodes: &[NodeReport]) -> String {
    let mut s = format!(
        "ring version {}, {} nodes\n",
        metadata.version,
        metadata.nodes.len()
    );
    let _ = writeln!(
        s,
        "{:<10} {:<22} {:>11} {:>9} {:>8} {:<10} STATE",
        "NAME", "ADDRESS", "COPIES", "KEYS", "VERSION", "LIVENESS"
    );
    let partitions = metadata.partition_count();
    for n in nodes {
        let range = share_cell(n.share.copies, partitions);
        let liveness = n.liveness.map_or("unknown", |l| l.as_str());
        match (&n.status, &n.error) {
            (Some(st), _) => {
                let mut state = if st.running {
                    "running".to_string()
                } else {
                    "stopped".to_string()
                };
                if !st.locked.is_empty() {
                    let _ = write!(state, ", {} range(s) write-locked", st.locked.len());
                }
                if st.metadata_refused > 0 {
                    // Forged or corrupt ring metadata reached this node (README "Security model").
                    let _ = write!(state, ", {} unsigned ring(s) refused", st.metadata_refused);
                }
                if st.ecs_term > 0 {
                    // It refuses ECS requests of older Raft terms (ARCHITECTURE.md §12).
                    let _ = write!(state, ", ECS term {}", st.ecs_term);
                }
                let _ = writeln!(
                    s,
                    "{:<10} {:<22} {:>11} {:>9} {:>8} {:<10} {}",
                    n.name, n.addr, range, st.keys, st.metadata_version, liveness, state
                );
            }
            (None, error) => {
                let _ = writeln!(
                    s,
                    "{:<10} {:<22} {:>11} {:>9} {:>8} {:<10} unreachable: {}",
                    n.name,
                    n.addr,
                    range,
                    "-",
                    "-",
                    liveness,
                    error.as_deref().unwrap_or("no answer")
                );
            }
        }
    }
    s
}
