//! The rebalance benchmark behind `ringkv-bench rebalance`: load a local cluster of
//! `--nodes` nodes with many keys, then join one more node (or, with `--leave`, remove the
//! first) through the ECS while a get/put load and one probing writer run; report how fast
//! the copies moved beside the same run's disk write rate, how long writes were blocked by
//! the handover locks, and how much of its throughput the load lost while data moved.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use kvstore::{ClientConfig, ClientStats, KvStore};
use ringkv_certs::Identity;
use ringkv_wire::{AdminReply, AdminRequest, MoveReport};

use crate::local::LocalCluster;

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct RebalanceArgs {
    /// Keys loaded before the change.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub value_size: usize,
    /// Nodes in the cluster before the change (at the ECS's default R = 3).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Remove the first node (its copies are rebuilt on the others) instead of adding one.
    #[arg(long)]
    pub leave: bool,
    /// The ECS's `--steps-per-node`: copies one node sends or receives at once.
    #[arg(long, default_value_t = ringkv_ecs::config::DEFAULT_STEPS_PER_NODE)]
    pub steps_per_node: usize,
    /// Clients of the concurrent load, each doing a get and a put in turn.
    #[arg(long, default_value_t = 4)]
    pub load_clients: usize,
    /// MiB written (then one fdatasync) to measure the disk in the same run.
    #[arg(long, default_value_t = 512)]
    pub disk_mib: usize,
    /// Where the cluster keeps certificates and data (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// ECS port; node i listens on port + i.
    #[arg(long, default_value_t = 19000)]
    pub port: u16,
}

/// The figures of one run.
#[derive(Debug)]
pub struct RebalanceReport {
    /// What changed: `join n4` or `leave n1`, and the cluster size before.
    pub change: String,
    /// The ECS's report of the move.
    pub moved: MoveReport,
    /// Keys loaded, and the load rate.
    pub loaded: u64,
    /// Load throughput in puts/s.
    pub load_rate: f64,
    /// The disk's write rate in the same run: MiB written, then one fdatasync (as
    /// `dd bs=1M conv=fdatasync`), MB/s.
    pub disk_mb_s: f64,
    /// Operations per second of the concurrent load in the second before the change, and
    /// while it ran.
    pub load_before: f64,
    /// See `load_before`.
    pub load_during: f64,
    /// Writes the probing writer completed while the change ran.
    pub writes_during_move: u64,
    /// Writes that met `WRITE_LOCKED` at least once.
    pub blocked_writes: u64,
    /// Longest latency of a write that met `WRITE_LOCKED`, µs.
    pub blocked_max_us: u64,
    /// p99 latency of the writes that met `WRITE_LOCKED`, µs.
    pub blocked_p99_us: u64,
    /// p99 latency of all the probing writer's writes during the move, µs.
    pub write_p99_us: u64,
    /// Max latency of all writes during the move, µs.
    pub write_max_us: u64,
    /// What the slowest of them met (retried replies, refreshed rings).
    pub slowest_met: ClientStats,
}

impl std::fmt::Display for RebalanceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.moved;
        let mb = m.bytes as f64 / 1e6;
        let secs = (m.total_ms as f64 / 1000.0).max(0.001);
        writeln!(
            f,
            "loaded {} keys at {:.0} puts/s; {}",
            self.loaded, self.load_rate, self.change
        )?;
        writeln!(
            f,
            "moved {} keys ({mb:.1} MB) in {} range copies from {} to {} in {secs:.2} s: {:.0} MB/s",
            m.entries,
            m.copies,
            m.from.join(", "),
            m.to.join(", "),
            mb / secs
        )?;
        writeln!(
            f,
            "disk in the same run: {:.0} MB/s written with one fdatasync; the move ran at {:.2}x that",
            self.disk_mb_s,
            mb / secs / self.disk_mb_s.max(1e-9)
        )?;
        writeln!(
            f,
            "ranges write-locked for {} ms (from the first lock to the last holder's install)",
            m.locked_ms
        )?;
        writeln!(
            f,
            "load: {:.0} ops/s before, {:.0} ops/s during the change ({:+.0}%)",
            self.load_before,
            self.load_during,
            (self.load_during / self.load_before.max(1e-9) - 1.0) * 100.0
        )?;
        writeln!(
            f,
            "writer during the move: {} writes, p99 {} µs, max {} µs; {} met WRITE_LOCKED (blocked p99 {} µs, longest {} µs)",
            self.writes_during_move,
            self.write_p99_us,
            self.write_max_us,
            self.blocked_writes,
            self.blocked_p99_us,
            self.blocked_max_us
        )?;
        let m = &self.slowest_met;
        writeln!(
            f,
            "the slowest write met {} WRITE_LOCKED, {} NOT_RESPONSIBLE, {} STOPPED, {} unreachable; adopted {} rings",
            m.write_locked, m.not_responsible, m.stopped, m.unreachable, m.metadata_adopted
        )
    }
}

/// The disk's write rate under `dir`: `mib` MiB in 1 MiB writes, then one fdatasync, MB/s.
pub fn disk_write_rate(dir: &std::path::Path, mib: usize) -> anyhow::Result<f64> {
    let path = dir.join("disk-rate.tmp");
    let block = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..mib {
        file.write_all(&block)?;
    }
    file.sync_data()?;
    let secs = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok((mib << 20) as f64 / 1e6 / secs)
}

/// Runs the benchmark on the current (tokio) runtime.
pub async fn run(args: &RebalanceArgs) -> anyhow::Result<RebalanceReport> {
    let temp = tempfile::tempdir()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    if args.nodes == 0 || (args.leave && args.nodes < 2) {
        bail!("--nodes must be at least 1 (2 with --leave)");
    }
    let mut cluster = LocalCluster::start_with(&dir, args.port, args.nodes + 1, |config| {
        config.steps_per_node = args.steps_per_node;
    })
    .await?;
    for i in 1..=args.nodes {
        cluster.add_node(i).await?;
    }
    let seeds: Vec<String> = cluster.nodes.iter().map(|(_, a)| a.to_string()).collect();
    let identity = Identity::from_dir(&cluster.certs(), "client")?;
    let store =
        Arc::new(KvStore::connect(ClientConfig::new(seeds.clone(), identity.clone())).await?);

    // Load with many puts in flight (group commit makes that cheap).
    let value = vec![0x5au8; args.value_size];
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let loaders: Vec<_> = (0..64)
        .map(|_| {
            let (store, next, value, keys) =
                (store.clone(), next.clone(), value.clone(), args.keys);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= keys {
                        return anyhow::Ok(());
                    }
                    store.put(format!("key-{i:010}").as_bytes(), &value).await?;
                }
            })
        })
        .collect();
    for l in loaders {
        l.await??;
    }
    let load_secs = started.elapsed().as_secs_f64();

    // One writer, one write at a time, so every WRITE_LOCKED it meets belongs to one write.
    let stop = Arc::new(AtomicBool::new(false));
    // It has a client of its own, so the replies it counts are its own.
    let probe = KvStore::connect(ClientConfig::new(seeds.clone(), identity.clone())).await?;
    let writer = {
        let (stop, value, keys) = (stop.clone(), value.clone(), args.keys);
        tokio::spawn(async move {
            let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut blocked = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut slowest = (0u64, ClientStats::default());
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let before = probe.stats();
                let t = Instant::now();
                probe
                    .put(format!("key-{:010}", (i * 7919) % keys).as_bytes(), &value)
                    .await?;
                let us = (t.elapsed().as_micros() as u64).clamp(1, 60_000_000);
                all.record(us)?;
                let after = probe.stats();
                if after.write_locked > before.write_locked {
                    blocked.record(us)?;
                }
                if us > slowest.0 {
                    slowest = (us, stats_diff(&after, &before));
                }
                i += 1;
            }
            probe.disconnect().await;
            anyhow::Ok((all, blocked, slowest))
        })
    };
    // The concurrent load: closed-loop clients, a get then a put, counted per operation.
    let ops = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..args.load_clients)
        .map(|c| {
            let (store, stop, ops, value, keys) = (
                store.clone(),
                stop.clone(),
                ops.clone(),
                value.clone(),
                args.keys,
            );
            tokio::spawn(async move {
                let mut i = c as u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("key-{:010}", (i * 104_729) % keys);
                    store.get(key.as_bytes()).await?;
                    store.put(key.as_bytes(), &value).await?;
                    ops.fetch_add(2, Ordering::Relaxed);
                    i += stride(c);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let disk_mb_s = disk_write_rate(&dir, args.disk_mib)?;
    // The load's operations per second from a mark (`ops` done then, and when) to now.
    let mark = || (ops.load(Ordering::Relaxed), Instant::now());
    let rate_since = |(done, at): (u64, Instant)| {
        (ops.load(Ordering::Relaxed) - done) as f64 / at.elapsed().as_secs_f64()
    };
    let before = mark();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let load_before = rate_since(before);
    let during = mark();
    let (change, reply) = if args.leave {
        let reply = cluster
            .ask(AdminRequest::RemoveNode { name: "n1".into() })
            .await?;
        (format!("n1 leaves a ring of {} nodes", args.nodes), reply)
    } else {
        let joiner = args.nodes + 1;
        let reply = cluster.add_node(joiner).await?;
        (
            format!("n{joiner} joins a ring of {} nodes", args.nodes),
            reply,
        )
    };
    let load_during = rate_since(during);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (all, blocked, (_, slowest_met)) = writer.await??;
    for l in load {
        l.await??;
    }
    store.disconnect().await;
    cluster.shutdown();
    let AdminReply::Changed {
        moved: Some(moved), ..
    } = reply
    else {
        bail!("the join moved nothing: {reply:?}");
    };
    Ok(RebalanceReport {
        change,
        moved,
        disk_mb_s,
        load_before,
        load_during,
        loaded: args.keys,
        load_rate: args.keys as f64 / load_secs,
        writes_during_move: all.len(),
        blocked_writes: blocked.len(),
        blocked_max_us: blocked.max(),
        blocked_p99_us: blocked.value_at_quantile(0.99),
        write_p99_us: all.value_at_quantile(0.99),
        write_max_us: all.max(),
        slowest_met,
    })
}

/// The counters that grew from `before` to `after`.
fn stats_diff(after: &ClientStats, before: &ClientStats) -> ClientStats {
    ClientStats {
        not_responsible: after.not_responsible - before.not_responsible,
        write_locked: after.write_locked - before.write_locked,
        stopped: after.stopped - before.stopped,
        unreachable: after.unreachable - before.unreachable,
        metadata_adopted: after.metadata_adopted - before.metadata_adopted,
        metadata_refused: after.metadata_refused - before.metadata_refused,
    }
}

/// Each load client walks the keys with its own stride (so they rarely meet).
fn stride(client: usize) -> u64 {
    7_919 + 2 * client as u64
}
