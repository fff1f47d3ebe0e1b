//! The rebalance benchmark behind `ringkv-bench rebalance`: load one node of a local
//! cluster with many keys, add a second node through the ECS while a writer runs, and
//! report how fast the range moved and how long client writes were blocked by the
//! handover lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use kvstore::{ClientConfig, KvStore};
use ringkv_certs::Identity;
use ringkv_wire::{AdminReply, MoveReport};

use crate::local::LocalCluster;

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct RebalanceArgs {
    /// Keys loaded into the first node before the second joins.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub value_size: usize,
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
    /// The ECS's report of the move.
    pub moved: MoveReport,
    /// Keys loaded, and the load rate.
    pub loaded: u64,
    /// Load throughput in puts/s.
    pub load_rate: f64,
    /// Writes completed by the writer while the node joined.
    pub writes_during_move: u64,
    /// Writes that met `WRITE_LOCKED` at least once.
    pub blocked_writes: u64,
    /// Longest latency of a write that met `WRITE_LOCKED`, µs.
    pub blocked_max_us: u64,
    /// p99 latency of the writes that met `WRITE_LOCKED`, µs.
    pub blocked_p99_us: u64,
    /// p99 and max latency of all writes during the move, µs.
    pub write_p99_us: u64,
    /// Max latency of all writes during the move, µs.
    pub write_max_us: u64,
}

impl std::fmt::Display for RebalanceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.moved;
        let mb = m.bytes as f64 / 1e6;
        let secs = (m.total_ms as f64 / 1000.0).max(0.001);
        writeln!(
            f,
            "loaded {} keys at {:.0} puts/s",
            self.loaded, self.load_rate
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
            "ranges write-locked for {} ms (last round and handover only)",
            m.locked_ms
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
        )
    }
}

/// Runs the benchmark on the current (tokio) runtime.
pub async fn run(args: &RebalanceArgs) -> anyhow::Result<RebalanceReport> {
    let temp = tempfile::tempdir()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let mut cluster = LocalCluster::start(&dir, args.port, 2).await?;
    cluster.add_node(1).await?;
    let seeds = vec![cluster.nodes[0].1.to_string()];
    let identity = Identity::from_dir(&cluster.certs(), "client")?;
    let store = Arc::new(KvStore::connect(ClientConfig::new(seeds, identity)).await?);

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
    let writer = {
        let (store, stop, value, keys) = (store.clone(), stop.clone(), value.clone(), args.keys);
        tokio::spawn(async move {
            let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut blocked = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let locked_before = store.stats().write_locked;
                let t = Instant::now();
                store
                    .put(format!("key-{:010}", (i * 7919) % keys).as_bytes(), &value)
                    .await?;
                let us = (t.elapsed().as_micros() as u64).clamp(1, 60_000_000);
                all.record(us)?;
                if store.stats().write_locked > locked_before {
                    blocked.record(us)?;
                }
                i += 1;
            }
            anyhow::Ok((all, blocked))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = cluster.add_node(2).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (all, blocked) = writer.await??;
    store.disconnect().await;
    cluster.shutdown();
    let AdminReply::Changed {
        moved: Some(moved), ..
    } = reply
    else {
        bail!("the join moved nothing: {reply:?}");
    };
    Ok(RebalanceReport {
        moved,
        loaded: args.keys,
        load_rate: args.keys as f64 / load_secs,
        writes_during_move: all.len(),
        blocked_writes: blocked.len(),
        blocked_max_us: blocked.max(),
        blocked_p99_us: blocked.value_at_quantile(0.99),
        write_p99_us: all.value_at_quantile(0.99),
        write_max_us: all.max(),
    })
}
