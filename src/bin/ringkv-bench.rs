//! `ringkv-bench`: a load generator for a ringkv cluster, built on the `kvstore` client.
//!
//! `--clients` logical clients run as tasks on one current-thread runtime (ARCHITECTURE.md §9: a
//! multi-thread runtime was 3x slower on 2 cores). They share `--connections` [`KvStore`]s
//! round-robin; each store holds one QUIC connection per node, so 50 clients on one store
//! multiplex 50 requests in flight over one connection. Each client has one request in flight
//! at a time, picks get or put by `--ratio` and a key uniformly from `--keyspace`.
//!
//! `--batch N` makes each request a `get_many`/`put_many` of N keys; `--cas` makes each put a
//! compare-and-set increment of the client's own key.
//!
//! Latencies of requests *started* after `--warmup` go into HDR histograms (µs), one per
//! operation; errors are counted by [`KvError`] variant. A run with gets first puts every key
//! of the keyspace, so that gets hit. A progress line goes to stderr every second; the
//! report goes to stdout, as text or (`--json`) as one JSON object.
//!
//! ```text
//! ringkv-bench --seed 127.0.0.1:7001 --certs certs --clients 50 --ratio 9:1 --duration 10
//! ringkv-bench --seed 127.0.0.1:7001 --requests 100000 --value-size 4096 --ratio 0:1 --json
//! ```

/// mimalloc: glibc's allocator took about a tenth of a node's CPU under write load
/// (ARCHITECTURE.md §9).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::rc::Rc;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use kvstore::{ClientConfig, KvError, KvStore};
use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};
use ringkv_certs::Identity;
use serde_json::json;
use tokio::task::JoinHandle;

/// Highest latency the histograms resolve (60 s, above the client's retry deadline); slower
/// requests are recorded as this value.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Concurrent puts while preloading the keyspace (not measured).
const PRELOAD_CONCURRENCY: usize = 64;
/// Measured seconds when neither --duration nor --requests is given.
const DEFAULT_DURATION_S: f64 = 10.0;

/// ringkv load generator: throughput and latency of gets and puts.
#[derive(Debug, Parser)]
#[command(
    name = "ringkv-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// `rebalance`: the range-move benchmark instead of the load benchmark.
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Where the cluster is and who the client is.
    #[command(flatten)]
    client: ClientArgs,
    /// Concurrent logical clients, each with one request in flight.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// KvStore instances (= QUIC connections per node) shared round-robin by the clients.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Stop after this many measured requests (all clients together).
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Measure for this many seconds [default: 10 unless --requests is given].
    #[arg(long, value_parser = positive_seconds)]
    duration: Option<f64>,
    /// Relative weights of gets and puts, GET:PUT (1:1, 9:1, 0:1 = puts only, 1:0 = gets only).
    #[arg(long, default_value = "1:1")]
    ratio: Ratio,
    /// Value size of puts, in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Keys per request: each get is a `get_many` and each put a `put_many` of this many
    /// random keys (latencies are per batch; keys/s = ops/s x batch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,
    /// Puts are compare-and-set increments instead: each client writes its own key
    /// (`cas:<client>`) with `put_if_version`, expecting the version its last write returned
    /// (one round trip each; a conflict, never expected, counts as a miss).
    #[arg(long, conflicts_with = "batch")]
    cas: bool,
    /// Number of distinct keys (key:000000000000 .. key:<K-1>, as redis-benchmark -r).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    keyspace: u64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    warmup: f64,
    /// Seed of the random key/operation/value choices [default: from the clock, reported].
    #[arg(long)]
    seed_rng: Option<u64>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The cluster's seeds and the client's identity, shared by the load, failover and scan
/// benchmarks.
#[derive(Debug, Clone, clap::Args)]
struct ClientArgs {
    /// Seed node address (host:port); repeat or comma-separate for several.
    #[arg(
        long = "seed",
        env = "RINGKV_SEEDS",
        value_delimiter = ',',
        required = true
    )]
    seeds: Vec<String>,
    /// Directory holding ca.pem and the client certificate.
    #[arg(long, env = "RINGKV_CERTS", default_value = "certs")]
    certs: PathBuf,
    /// Name of the client certificate in the certs directory (<name>.pem, <name>.key).
    #[arg(long, env = "RINGKV_IDENTITY", default_value = "client")]
    identity: String,
}

impl ClientArgs {
    /// The client configuration: the seeds and the identity loaded from --certs.
    fn config(&self) -> anyhow::Result<ClientConfig> {
        let identity = Identity::from_dir(&self.certs, &self.identity).with_context(|| {
            format!(
                "loading client identity '{}' from {}",
                self.identity,
                self.certs.display()
            )
        })?;
        Ok(ClientConfig::new(self.seeds.clone(), identity))
    }

    /// A store connected with [`ClientArgs::config`].
    async fn connect(&self) -> anyhow::Result<KvStore> {
        KvStore::connect(self.config()?)
            .await
            .with_context(|| format!("connecting to {}", self.seeds.join(",")))
    }
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds >= 0")),
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match seconds(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err("must be > 0".into()),
    }
}

/// Relative weights of gets and puts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ratio {
    get: u32,
    put: u32,
}

impl FromStr for Ratio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected GET:PUT weights such as 1:1, 9:1 or 0:1");
        let (get, put) = s.split_once(':').ok_or_else(bad)?;
        let ratio = Self {
            get: get.trim().parse().map_err(|_| bad())?,
            put: put.trim().parse().map_err(|_| bad())?,
        };
        if ratio.get == 0 && ratio.put == 0 {
            return Err(format!("{s:?}: at least one weight must be > 0"));
        }
        Ok(ratio)
    }
}

impl Ratio {
    fn pick(self, rng: &mut SmallRng) -> Op {
        if self.put == 0 || (self.get > 0 && rng.random_ratio(self.get, self.get + self.put)) {
            Op::Get
        } else {
            Op::Put
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Get,
    Put,
}

/// Measurements of one operation type.
struct OpTally {
    /// Latencies of successful measured requests, µs.
    latency: Histogram<u64>,
    /// Exact maximum (the histogram's is rounded to its precision).
    max_us: u64,
    /// Gets that found no value (should be 0 after the preload).
    misses: u64,
    /// All requests completed so far, warmup included (for the progress line).
    completed: u64,
}

impl OpTally {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("constant histogram bounds are valid"),
            max_us: 0,
            misses: 0,
            completed: 0,
        }
    }

    /// The latency at `q`, µs. The histogram reports the top of the value's bucket, which may
    /// exceed the exact maximum.
    fn quantile(&self, q: f64) -> u64 {
        self.latency.value_at_quantile(q).min(self.max_us)
    }

    fn json(&self, elapsed: f64) -> serde_json::Value {
        let h = &self.latency;
        let latency = (!h.is_empty()).then(|| {
            json!({
                "p50": self.quantile(0.50),
                "p99": self.quantile(0.99),
                "p999": self.quantile(0.999),
                "max": self.max_us,
                "mean": round2(h.mean()),
            })
        });
        json!({
            "requests": h.len(),
            "ops_per_sec": round2(rate(h.len(), elapsed)),
            "misses": self.misses,
            "latency_us": latency,
        })
    }
}

/// An error kind's count and its first message.
struct ErrorTally {
    count: u64,
    first: String,
}

/// What the clients measured; shared by all client tasks (one thread, so a `RefCell`).
struct Tally {
    get: OpTally,
    put: OpTally,
    /// Errors of measured requests, by `KvError` variant name.
    errors: BTreeMap<String, ErrorTally>,
    /// All errors, warmup included (for the progress line).
    errors_seen: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            get: OpTally::new(),
            put: OpTally::new(),
            errors: BTreeMap::new(),
            errors_seen: 0,
        }
    }

    fn op(&mut self, op: Op) -> &mut OpTally {
        match op {
            Op::Get => &mut self.get,
            Op::Put => &mut self.put,
        }
    }

    fn record(&mut self, op: Op, measured: bool, latency: Duration, result: Result<bool, KvError>) {
        let t = self.op(op);
        t.completed += 1;
        match result {
            Ok(found) => {
                if measured {
                    let us = u64::try_from(latency.as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1);
                    t.latency.saturating_record(us);
                    t.max_us = t.max_us.max(us);
                    t.misses += u64::from(!found);
                }
            }
            Err(e) => {
                self.errors_seen += 1;
                if measured {
                    let entry = self.errors.entry(error_kind(&e)).or_insert(ErrorTally {
                        count: 0,
                        first: e.to_string(),
                    });
                    entry.count += 1;
                }
            }
        }
    }
}

/// The variant name of `e` (its `Debug` form up to the first non-identifier character), so
/// that variants added to `KvError` later are named without a change here.
fn error_kind(e: &KvError) -> String {
    format!("{e:?}")
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The values puts send: random bytes, each put takes `size` of them at a random offset, so
/// that values differ without an allocation per request.
struct Values {
    pool: Vec<u8>,
    size: usize,
}

impl Values {
    fn new(size: usize, rng: &mut SmallRng) -> Self {
        let mut pool = vec![0u8; size + 4096];
        rng.fill(&mut pool[..]);
        Self { pool, size }
    }

    fn pick<'a>(&'a self, rng: &mut SmallRng) -> &'a [u8] {
        let offset = rng.random_range(0..=self.pool.len() - self.size);
        &self.pool[offset..offset + self.size]
    }
}

/// One benchmark run's parameters and shared state.
struct Run {
    ratio: Ratio,
    /// Keys per request (`--batch`).
    batch: u32,
    /// Puts are compare-and-set (`--cas`).
    cas: bool,
    keyspace: u64,
    values: Rc<Values>,
    started: Instant,
    /// Requests started from here on are measured.
    measure_from: Instant,
    /// Duration mode: no request starts after this.
    end: Option<Instant>,
    /// Requests mode: measured requests not yet started.
    budget: RefCell<Option<u64>>,
    tally: RefCell<Tally>,
}

impl Run {
    /// Whether a client may start one more request at `now`; claims it in requests mode.
    fn may_start(&self, now: Instant) -> bool {
        if let Some(end) = self.end {
            return now < end;
        }
        if now < self.measure_from {
            return true; // warmup requests do not count against --requests
        }
        match &mut *self.budget.borrow_mut() {
            Some(0) => false,
            Some(left) => {
                *left -= 1;
                true
            }
            None => true,
        }
    }
}

/// `key:` and `k` in 12 digits, as redis-benchmark's `key:__rand_int__` with `-r`.
fn write_key(key: &mut Vec<u8>, k: u64) {
    key.clear();
    write!(key, "key:{k:012}").expect("writing to a Vec cannot fail");
}

/// One logical client: one request at a time until the run ends.
async fn client(store: Rc<KvStore>, run: Rc<Run>, id: usize, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut key = Vec::with_capacity(32);
    let mut keys: Vec<Vec<u8>> = vec![Vec::with_capacity(32); run.batch as usize];
    // --cas: this client's key and the version its last write returned.
    let cas_key = format!("cas:{id}").into_bytes();
    let mut version: Option<u64> = None;
    loop {
        let started = Instant::now();
        if !run.may_start(started) {
            return;
        }
        let measured = started >= run.measure_from;
        let op = run.ratio.pick(&mut rng);
        let result = if run.batch > 1 {
            for key in &mut keys {
                write_key(key, rng.random_range(0..run.keyspace));
            }
            match op {
                Op::Get => all_ok(store.get_many(&keys).await, |v| v.is_some()),
                Op::Put => {
                    let entries: Vec<(&[u8], &[u8])> = keys
                        .iter()
                        .map(|k| (k.as_slice(), run.values.pick(&mut rng)))
                        .collect();
                    all_ok(store.put_many(&entries).await, |_| true)
                }
            }
        } else if run.cas && matches!(op, Op::Put) {
            let value = run.values.pick(&mut rng);
            let outcome = match version {
                Some(v) => store.put_if_version(&cas_key, value, v).await,
                None => store.put_if_absent(&cas_key, value).await,
            };
            outcome.map(|outcome| match outcome {
                kvstore::Conditional::Applied { version: v } => {
                    version = Some(v);
                    true
                }
                kvstore::Conditional::Conflict { current } => {
                    version = current;
                    false
                }
            })
        } else {
            write_key(&mut key, rng.random_range(0..run.keyspace));
            match op {
                Op::Get => store.get(&key).await.map(|v| v.is_some()),
                Op::Put => store
                    .put(&key, run.values.pick(&mut rng))
                    .await
                    .map(|_| true),
            }
        };
        let latency = started.elapsed();
        run.tally.borrow_mut().record(op, measured, latency, result);
    }
}

/// A batch's result as one: the first error if any key failed, else whether every key
/// `hit`.
fn all_ok<T>(results: Vec<Result<T, KvError>>, hit: impl Fn(&T) -> bool) -> Result<bool, KvError> {
    let mut all = true;
    for result in results {
        all &= hit(&result?);
    }
    Ok(all)
}

/// Puts every key of the keyspace once, so that gets hit.
async fn preload(
    stores: &[Rc<KvStore>],
    keyspace: u64,
    values: &Rc<Values>,
    rng: &mut SmallRng,
) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("ringkv-bench: preloading {keyspace} keys");
    let workers = PRELOAD_CONCURRENCY as u64;
    let tasks: Vec<JoinHandle<Result<(), KvError>>> = (0..workers.min(keyspace))
        .map(|w| {
            let store = stores[w as usize % stores.len()].clone();
            let values = values.clone();
            let mut rng = SmallRng::seed_from_u64(rng.next_u64());
            tokio::task::spawn_local(async move {
                let mut key = Vec::with_capacity(32);
                for k in (w..keyspace).step_by(PRELOAD_CONCURRENCY) {
                    write_key(&mut key, k);
                    store.put(&key, values.pick(&mut rng)).await?;
                }
                Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await
            .context("preload task")?
            .context("preloading the keyspace")?;
    }
    eprintln!(
        "ringkv-bench: preloaded {keyspace} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints a progress line to stderr every second until aborted.
async fn progress(run: Rc<Run>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await; // the first tick is immediate
    let (mut gets, mut puts, mut errors) = (0, 0, 0);
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        // The phase the past second began in.
        let started_in = std::mem::replace(&mut last, now);
        let phase = if started_in < run.measure_from {
            "warmup"
        } else {
            "measuring"
        };
        let t = run.tally.borrow();
        eprintln!(
            "ringkv-bench [{:6.1}s] {phase:9} get {:>8}/s  put {:>8}/s  errors {:>6}/s",
            now.duration_since(run.started).as_secs_f64(),
            t.get.completed - gets,
            t.put.completed - puts,
            t.errors_seen - errors,
        );
        (gets, puts, errors) = (t.get.completed, t.put.completed, t.errors_seen);
    }
}

/// The outcome of a run.
struct Report {
    nodes: usize,
    seed_rng: u64,
    /// Measured time: from the end of the warmup until the last client finished.
    elapsed: f64,
    tally: Tally,
}

async fn bench(args: &Args) -> anyhow::Result<Report> {
    let mut stores = Vec::new();
    for _ in 0..args.connections {
        stores.push(Rc::new(args.client.connect().await?));
    }
    let nodes = stores[0].metadata().nodes.len();

    // A default seed below 2^53 survives JSON tools that read numbers as doubles (jq).
    let seed_rng = args.seed_rng.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            & ((1 << 53) - 1)
    });
    let mut rng = SmallRng::seed_from_u64(seed_rng);
    let values = Rc::new(Values::new(args.value_size, &mut rng));
    if args.ratio.get > 0 {
        preload(&stores, args.keyspace, &values, &mut rng).await?;
    }

    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup);
    let end = args.requests.is_none().then(|| {
        measure_from + Duration::from_secs_f64(args.duration.unwrap_or(DEFAULT_DURATION_S))
    });
    let run = Rc::new(Run {
        ratio: args.ratio,
        batch: args.batch,
        cas: args.cas,
        keyspace: args.keyspace,
        values,
        started,
        measure_from,
        end,
        budget: RefCell::new(args.requests),
        tally: RefCell::new(Tally::new()),
    });
    let reporter = tokio::task::spawn_local(progress(run.clone()));
    let clients: Vec<JoinHandle<()>> = (0..args.clients as usize)
        .map(|c| {
            let store = stores[c % stores.len()].clone();
            tokio::task::spawn_local(client(store, run.clone(), c, rng.next_u64()))
        })
        .collect();
    for c in clients {
        c.await.context("client task")?;
    }
    let elapsed = Instant::now()
        .saturating_duration_since(run.measure_from)
        .as_secs_f64();
    reporter.abort();
    let _ = reporter.await;
    for store in &stores {
        store.disconnect().await;
    }
    Ok(Report {
        nodes,
        seed_rng,
        elapsed,
        tally: run.tally.replace(Tally::new()),
    })
}

fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn report_json(args: &Args, r: &Report) -> serde_json::Value {
    let t = &r.tally;
    let total = t.get.latency.len() + t.put.latency.len();
    let errors: serde_json::Map<String, serde_json::Value> = t
        .errors
        .iter()
        .map(|(kind, e)| (kind.clone(), json!({ "count": e.count, "first": e.first })))
        .collect();
    json!({
        "config": {
            "seeds": args.client.seeds,
            "nodes": r.nodes,
            "clients": args.clients,
            "connections": args.connections,
            "ratio": { "get": args.ratio.get, "put": args.ratio.put },
            "value_size": args.value_size,
            "batch": args.batch,
            "cas": args.cas,
            "keyspace": args.keyspace,
            "warmup_s": args.warmup,
            "duration_s": args.requests.is_none().then(|| args.duration.unwrap_or(DEFAULT_DURATION_S)),
            "requests": args.requests,
            "seed_rng": r.seed_rng,
        },
        "elapsed_s": round2(r.elapsed),
        "total": { "requests": total, "ops_per_sec": round2(rate(total, r.elapsed)) },
        "keys_per_sec": round2(rate(total, r.elapsed) * f64::from(args.batch)),
        "get": t.get.json(r.elapsed),
        "put": t.put.json(r.elapsed),
        "errors": errors,
    })
}

fn print_text(args: &Args, r: &Report) {
    let t = &r.tally;
    println!(
        "ringkv-bench: {} clients over {} connection(s) to {} node(s); get:put {}:{}; {} B values; \
         keyspace {}; seed-rng {}",
        args.clients,
        args.connections,
        r.nodes,
        args.ratio.get,
        args.ratio.put,
        args.value_size,
        args.keyspace,
        r.seed_rng
    );
    if args.batch > 1 {
        println!(
            "{} keys per request: {:.0} keys/s",
            args.batch,
            rate(t.get.latency.len() + t.put.latency.len(), r.elapsed) * f64::from(args.batch)
        );
    }
    if args.cas {
        println!("puts are compare-and-set increments of one key per client (misses: conflicts)");
    }
    println!(
        "measured {:.2} s after {:.1} s warmup\n",
        r.elapsed, args.warmup
    );
    println!(
        "{:<6} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "op", "requests", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    for (name, op) in [("get", &t.get), ("put", &t.put)] {
        let h = &op.latency;
        if h.is_empty() {
            println!("{name:<6} {:>10}", 0);
            continue;
        }
        println!(
            "{name:<6} {:>10} {:>11.0} {:>9} {:>9} {:>9} {:>9}",
            h.len(),
            rate(h.len(), r.elapsed),
            op.quantile(0.50),
            op.quantile(0.99),
            op.quantile(0.999),
            op.max_us
        );
    }
    let total = t.get.latency.len() + t.put.latency.len();
    println!(
        "{:<6} {:>10} {:>11.0}",
        "total",
        total,
        rate(total, r.elapsed)
    );
    if t.get.misses > 0 {
        println!("\nget misses: {}", t.get.misses);
    }
    if t.errors.is_empty() {
        println!("\nerrors: none");
    } else {
        println!("\nerrors:");
        for (kind, e) in &t.errors {
            println!("  {kind:<16} {:>8}  first: {}", e.count, e.first);
        }
    }
}

/// What `ringkv-bench failover` measures.
#[derive(Debug, Clone, clap::Args)]
struct FailoverArgs {
    /// Where the cluster is and who the client is.
    #[command(flatten)]
    client: ClientArgs,
    /// Ring name of the node to kill.
    #[arg(long)]
    victim: String,
    /// Process id of that node: it gets SIGKILL.
    #[arg(long)]
    kill_pid: i32,
    /// Writes started per second, whatever their completion (open loop: a write stuck on
    /// the dead node does not hold back the next ones).
    #[arg(long, default_value_t = 200.0, value_parser = positive_seconds)]
    rate: f64,
    /// Most writes in flight at once; a start beyond it is skipped (and counted).
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// Number of distinct keys written.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    keyspace: u64,
    /// Value size of the writes, in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Seconds of load before the kill.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    before: f64,
    /// Seconds of load after every role (head, middle, tail) of the victim has seen a write
    /// succeed again.
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    after: f64,
    /// Give up this many seconds after the kill.
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    timeout: f64,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also write every write as a CSV line (started and done in ms since the kill, the
    /// victim's role in the key's chain, the error if any) to this file.
    #[arg(long)]
    records: Option<PathBuf>,
}

/// The victim's place in a key's chain under the ring before the kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Head,
    Middle,
    Tail,
    /// Not in the chain.
    None,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Head => "head",
            Role::Middle => "middle",
            Role::Tail => "tail",
            Role::None => "unaffected",
        }
    }
}

/// One write of the failover run.
struct WriteRecord {
    started: Instant,
    done: Instant,
    role: Role,
    error: Option<String>,
}

/// Milliseconds from `from` to `to` (negative if `to` is earlier).
fn ms_between(from: Instant, to: Instant) -> f64 {
    if to >= from {
        to.duration_since(from).as_secs_f64() * 1e3
    } else {
        -(from.duration_since(to).as_secs_f64() * 1e3)
    }
}

/// Kills `--victim` under an open-loop write load and reports when writes to keys whose
/// chain held it succeeded again.
async fn failover(args: &FailoverArgs) -> anyhow::Result<serde_json::Value> {
    let store = Rc::new(args.client.connect().await?);
    let before = store.refresh_metadata().await?;
    if before.node(&args.victim).is_none() || before.is_failed(&args.victim) {
        anyhow::bail!(
            "{} is not a live node of ring version {}",
            args.victim,
            before.version
        );
    }
    // Every key's role for the victim, under the ring before the kill.
    let mut key = Vec::with_capacity(32);
    let roles: Rc<Vec<Role>> = Rc::new(
        (0..args.keyspace)
            .map(|k| {
                write_key(&mut key, k);
                let chain = before.chain_for_key(&key);
                match chain.iter().position(|n| n.name == args.victim) {
                    None => Role::None,
                    Some(0) => Role::Head,
                    Some(i) if i + 1 == chain.len() => Role::Tail,
                    Some(_) => Role::Middle,
                }
            })
            .collect(),
    );
    let mut rng = SmallRng::seed_from_u64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let values = Rc::new(Values::new(args.value_size, &mut rng));
    let records: Rc<RefCell<Vec<WriteRecord>>> = Rc::default();
    let in_flight = Rc::new(std::cell::Cell::new(0usize));
    let mut skipped = 0u64;
    let mut tasks = Vec::new();

    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let kill_due = started + Duration::from_secs_f64(args.before);
    let mut killed_at: Option<Instant> = None;
    let mut killed_at_unix = 0.0;
    let mut client_saw_failover: Option<Instant> = None;
    let mut stop_at: Option<Instant> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        if killed_at.is_none() && now >= kill_due {
            // SAFETY: kill(2) with a pid given by the operator; no memory is involved.
            if unsafe { libc::kill(args.kill_pid, libc::SIGKILL) } != 0 {
                anyhow::bail!(
                    "kill -9 {}: {}",
                    args.kill_pid,
                    std::io::Error::last_os_error()
                );
            }
            killed_at = Some(Instant::now());
            killed_at_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            eprintln!(
                "ringkv-bench: killed {} (pid {})",
                args.victim, args.kill_pid
            );
        }
        if let Some(k) = killed_at {
            if client_saw_failover.is_none() {
                let m = store.metadata();
                if m.version > before.version
                    && (m.is_failed(&args.victim) || m.node(&args.victim).is_none())
                {
                    client_saw_failover = Some(now);
                }
            }
            if stop_at.is_none() {
                let recs = records.borrow();
                let recovered = [Role::Head, Role::Middle, Role::Tail]
                    .iter()
                    .filter(|role| roles.contains(role))
                    .all(|role| {
                        recs.iter()
                            .any(|r| r.role == *role && r.error.is_none() && r.started >= k)
                    });
                if recovered {
                    stop_at = Some(now + Duration::from_secs_f64(args.after));
                }
            }
            if now.duration_since(k).as_secs_f64() > args.timeout
                || stop_at.is_some_and(|s| now >= s)
            {
                break;
            }
        }
        if in_flight.get() >= args.max_in_flight {
            skipped += 1;
            continue;
        }
        let k = rng.random_range(0..args.keyspace);
        let role = roles[k as usize];
        let value = values.pick(&mut rng).to_vec();
        let (store, records, in_flight) = (store.clone(), records.clone(), in_flight.clone());
        in_flight.set(in_flight.get() + 1);
        tasks.push(tokio::task::spawn_local(async move {
            let mut key = Vec::with_capacity(32);
            write_key(&mut key, k);
            let started = Instant::now();
            let result = store.put(&key, &value).await;
            records.borrow_mut().push(WriteRecord {
                started,
                done: Instant::now(),
                role,
                error: result.err().map(|e| format!("{}: {e}", error_kind(&e))),
            });
            in_flight.set(in_flight.get() - 1);
        }));
    }
    // Writes still in flight get a moment, then are dropped (and reported as such).
    let grace = Instant::now() + Duration::from_secs(2);
    while in_flight.get() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unfinished = in_flight.get();
    for t in tasks {
        t.abort();
    }
    let after = store.metadata();
    store.disconnect().await;

    let killed_at = killed_at.context("the run ended before the kill")?;
    let recs = records.borrow();
    if let Some(path) = &args.records {
        let mut csv = String::from("started_ms,done_ms,role,error\n");
        for r in recs.iter() {
            let _ = writeln!(
                csv,
                "{:.2},{:.2},{},{}",
                ms_between(killed_at, r.started),
                ms_between(killed_at, r.done),
                r.role.name(),
                r.error.as_deref().unwrap_or("").replace(',', ";")
            );
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut by_role = serde_json::Map::new();
    for role in [Role::Head, Role::Middle, Role::Tail, Role::None] {
        let mine = || recs.iter().filter(move |r| r.role == role);
        // Writes started after the kill: the first to succeed, and the slowest.
        let first_ok = mine()
            .filter(|r| r.started >= killed_at && r.error.is_none())
            .map(|r| r.done)
            .min();
        let first_ok_start = mine()
            .filter(|r| r.started >= killed_at && r.error.is_none())
            .min_by_key(|r| r.done)
            .map(|r| r.started);
        let max_latency = mine()
            .filter(|r| r.started >= killed_at)
            .map(|r| r.done.duration_since(r.started))
            .max();
        // Writes started before the kill that finished after it: the last to finish.
        let stalled_until = mine()
            .filter(|r| r.started < killed_at && r.done >= killed_at)
            .map(|r| r.done)
            .max();
        let errors = mine().filter(|r| r.error.is_some()).count();
        by_role.insert(
            role.name().into(),
            json!({
                "writes": mine().count(),
                "started_after_kill": mine().filter(|r| r.started >= killed_at).count(),
                "first_ok_after_kill_ms": first_ok.map(|t| round2(ms_between(killed_at, t))),
                "that_write_started_ms": first_ok_start.map(|t| round2(ms_between(killed_at, t))),
                "max_latency_after_kill_ms": max_latency.map(|d| round2(d.as_secs_f64() * 1e3)),
                "in_flight_at_kill_done_by_ms": stalled_until.map(|t| round2(ms_between(killed_at, t))),
                "errors": errors,
            }),
        );
    }
    let affected_first_ok = recs
        .iter()
        .filter(|r| r.role != Role::None && r.started >= killed_at && r.error.is_none())
        .map(|r| r.done)
        .min();
    let mut errors: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for r in recs.iter() {
        if let Some(e) = &r.error {
            let kind = e.split(':').next().unwrap_or_default().to_string();
            errors.entry(kind).or_insert((0, e.clone())).0 += 1;
        }
    }
    let errors: serde_json::Map<String, serde_json::Value> = errors
        .into_iter()
        .map(|(k, (count, first))| (k, json!({ "count": count, "first": first })))
        .collect();
    Ok(json!({
        "victim": args.victim,
        "killed_at_unix": killed_at_unix,
        "rate_per_s": args.rate,
        "keyspace": args.keyspace,
        "value_size": args.value_size,
        "ring_version_before": before.version,
        "ring_version_after": after.version,
        "victim_failed_or_gone_after": after.is_failed(&args.victim) || after.node(&args.victim).is_none(),
        "failover_ms": affected_first_ok.map(|t| round2(ms_between(killed_at, t))),
        "client_saw_failover_ms": client_saw_failover.map(|t| round2(ms_between(killed_at, t))),
        "by_role": by_role,
        "writes": recs.len(),
        "skipped_starts": skipped,
        "unfinished": unfinished,
        "errors": errors,
    }))
}

fn print_failover_text(r: &serde_json::Value) {
    let ms = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |m| format!("{m:.0}"));
    println!(
        "killed {} (ring version {} -> {}; client saw it failed after {} ms)",
        r["victim"].as_str().unwrap_or_default(),
        r["ring_version_before"],
        r["ring_version_after"],
        ms(&r["client_saw_failover_ms"])
    );
    println!(
        "first successful write to a key whose chain held it, started after the kill: {} ms after the kill",
        ms(&r["failover_ms"])
    );
    println!(
        "{:<11} {:>7} {:>12} {:>14} {:>14} {:>16} {:>7}",
        "victim was",
        "writes",
        "after kill",
        "first ok ms",
        "max lat ms",
        "stalled done ms",
        "errors"
    );
    for role in ["head", "middle", "tail", "unaffected"] {
        let x = &r["by_role"][role];
        println!(
            "{role:<11} {:>7} {:>12} {:>14} {:>14} {:>16} {:>7}",
            x["writes"],
            x["started_after_kill"],
            ms(&x["first_ok_after_kill_ms"]),
            ms(&x["max_latency_after_kill_ms"]),
            ms(&x["in_flight_at_kill_done_by_ms"]),
            x["errors"]
        );
    }
    println!(
        "writes {}, skipped starts {}, unfinished {}, errors {}",
        r["writes"], r["skipped_starts"], r["unfinished"], r["errors"]
    );
}

/// What `ringkv-bench scan` does.
#[derive(Debug, Clone, clap::Args)]
struct ScanArgs {
    /// Where the cluster is and who the client is.
    #[command(flatten)]
    client: ClientArgs,
    /// Put keys scan:000000000000 .. scan:<K-1> (--value-size bytes each) before scanning.
    #[arg(long)]
    load: Option<u64>,
    /// Value size of the loaded keys.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Keys per page (1 to 1024), as redis `SCAN ... COUNT`.
    #[arg(long, default_value_t = 1000)]
    page: usize,
    /// Fetch the values too.
    #[arg(long)]
    values: bool,
    /// Scan the whole store this many times.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// `ringkv-bench scan`: JSON with keys/s over whole scans, pages and page latencies (µs).
async fn scan_bench(args: &ScanArgs) -> anyhow::Result<serde_json::Value> {
    let store = args.client.connect().await?;
    if let Some(n) = args.load {
        let value = vec![b'x'; args.value_size];
        let load_started = Instant::now();
        let chunks: Vec<Vec<(Vec<u8>, &[u8])>> = (0..n)
            .collect::<Vec<u64>>()
            .chunks(1000)
            .map(|c| {
                c.iter()
                    .map(|i| (format!("scan:{i:012}").into_bytes(), &value[..]))
                    .collect()
            })
            .collect();
        let mut puts =
            futures::stream::iter(chunks.iter().map(|c| store.put_many(c))).buffer_unordered(8);
        while let Some(results) = puts.next().await {
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                anyhow::bail!("loading the keys: {e}");
            }
        }
        eprintln!(
            "loaded {n} keys in {:.1} s",
            load_started.elapsed().as_secs_f64()
        );
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let (mut keys, mut pages) = (0u64, 0u64);
    let started = Instant::now();
    for _ in 0..args.rounds {
        let mut cursor = kvstore::ScanCursor::start();
        loop {
            let asked = Instant::now();
            let page = if args.values {
                store.scan_values(b"", args.page, &cursor).await?
            } else {
                store.scan(b"", args.page, &cursor).await?
            };
            latency.saturating_record(asked.elapsed().as_micros() as u64);
            keys += page.entries.len() as u64;
            pages += 1;
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    store.disconnect().await;
    Ok(json!({
        "config": { "page": args.page, "values": args.values, "rounds": args.rounds },
        "keys": keys,
        "pages": pages,
        "seconds": round2(elapsed),
        "keys_per_sec": round2(keys as f64 / elapsed),
        "page_latency_us": {
            "p50": latency.value_at_quantile(0.5),
            "p99": latency.value_at_quantile(0.99),
            "max": latency.max(),
        },
    }))
}

/// What `ringkv-bench node-stats` asks.
#[derive(Debug, Clone, clap::Args)]
struct NodeStatsArgs {
    /// Address of the ECS, or of the members of an ECS group, comma-separated.
    #[arg(long, default_value = "127.0.0.1:7000")]
    ecs: String,
    /// Directory holding ca.pem and the admin certificate.
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// Name of the admin certificate in --certs.
    #[arg(long, default_value = "admin")]
    identity: String,
}

/// Every node's counters from the ECS's `status`, as one JSON object keyed by node name:
/// keys, writes and write_commits (`writes / write_commits` is the mean group commit).
async fn node_stats(args: &NodeStatsArgs) -> anyhow::Result<serde_json::Value> {
    let identity = Identity::from_dir(&args.certs, &args.identity)
        .with_context(|| format!("loading admin identity '{}'", args.identity))?;
    let transport = ringkv_transport::Transport::bind_client(
        &identity,
        ringkv_wire::Limits::default(),
        Duration::from_secs(5),
        Duration::from_secs(5),
    )?;
    let reply = ringkv_ecs::client::ask(
        &transport,
        &ringkv_ecs::client::members(&args.ecs),
        &ringkv_wire::AdminRequest::Status,
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("asking the ECS at {}", args.ecs))?;
    transport.close().await;
    let ringkv_wire::AdminReply::Status {
        metadata, nodes, ..
    } = reply
    else {
        anyhow::bail!("unexpected reply to status: {reply:?}");
    };
    let nodes: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let v = match &n.status {
                Some(s) => json!({
                    "keys": s.keys,
                    "writes": s.writes,
                    "write_commits": s.write_commits,
                    "hop_batches": s.hop_batches,
                    "hop_writes": s.hop_writes,
                    "failed": metadata.is_failed(&n.name),
                }),
                None => json!({ "error": n.error, "failed": metadata.is_failed(&n.name) }),
            };
            (n.name.clone(), v)
        })
        .collect();
    Ok(json!({
        "version": metadata.version,
        "replication": metadata.replication,
        "nodes": nodes,
    }))
}

/// Benchmarks other than the load benchmark.
#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Start a local cluster (ECS + one node), load it, add a second node while a writer
    /// runs; report MB/s moved, move time and how long writes were blocked by the handover.
    Rebalance(ringkv::rebalance::RebalanceArgs),
    /// Kill (SIGKILL) one node of a running replicated cluster under an open-loop write
    /// load; report when writes to keys whose chain held it succeeded again, by the node's
    /// role in the chain (head, middle, tail).
    Failover(FailoverArgs),
    /// Print every node's keys, writes and write_commits (from the ECS's status) as JSON.
    NodeStats(NodeStatsArgs),
    /// Full scans of the store, page by page: keys/s and page latency (loads the keys
    /// first with --load).
    Scan(ScanArgs),
    /// How many nodes one ECS process can probe and lease: stand-in nodes (real QUIC + mTLS
    /// endpoints in this process) and a real `ringkv-ecs serve`; per cluster size, probes/s,
    /// the ECS's CPU per probe and the longest gap between a node's probes.
    LeaseScale(ringkv::lease_scale::LeaseScaleArgs),
}

fn main() -> anyhow::Result<()> {
    ringkv::cli::init_tracing("warn");
    let args = Args::parse();
    let runtime = ringkv::cli::runtime()?;
    match &args.command {
        Some(BenchCommand::Rebalance(rebalance)) => {
            print!("{}", runtime.block_on(ringkv::rebalance::run(rebalance))?);
            return Ok(());
        }
        Some(BenchCommand::Failover(failover_args)) => {
            let report =
                tokio::task::LocalSet::new().block_on(&runtime, failover(failover_args))?;
            if failover_args.json {
                println!("{report}");
            } else {
                print_failover_text(&report);
            }
            return Ok(());
        }
        Some(BenchCommand::LeaseScale(scale_args)) => {
            // Thousands of stand-in endpoints: not on the one thread the ECS would have.
            let stand_ins = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            print!(
                "{}",
                stand_ins.block_on(ringkv::lease_scale::run(scale_args))?
            );
            return Ok(());
        }
        Some(BenchCommand::Scan(scan_args)) => {
            let report = runtime.block_on(scan_bench(scan_args))?;
            println!("{report}");
            return Ok(());
        }
        Some(BenchCommand::NodeStats(stats_args)) => {
            println!("{}", runtime.block_on(node_stats(stats_args))?);
            return Ok(());
        }
        None => {}
    }
    let report = tokio::task::LocalSet::new().block_on(&runtime, bench(&args))?;
    if args.json {
        println!("{}", report_json(&args, &report));
    } else {
        print_text(&args, &report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn parses_ratios() {
        assert_eq!("9:1".parse(), Ok(Ratio { get: 9, put: 1 }));
        assert_eq!("0:1".parse(), Ok(Ratio { get: 0, put: 1 }));
        assert!("0:0".parse::<Ratio>().is_err());
        assert!("1".parse::<Ratio>().is_err());
        assert!("a:b".parse::<Ratio>().is_err());
    }

    #[test]
    fn ratio_extremes_pick_one_operation() {
        let mut rng = SmallRng::seed_from_u64(7);
        let gets_only = Ratio { get: 1, put: 0 };
        let puts_only = Ratio { get: 0, put: 1 };
        for _ in 0..100 {
            assert!(matches!(gets_only.pick(&mut rng), Op::Get));
            assert!(matches!(puts_only.pick(&mut rng), Op::Put));
        }
    }

    #[test]
    fn keys_look_like_redis_benchmark_keys() {
        let mut key = Vec::new();
        write_key(&mut key, 42);
        assert_eq!(key, b"key:000000000042");
    }

    #[test]
    fn error_kind_is_the_variant_name() {
        assert_eq!(error_kind(&KvError::Disconnected), "Disconnected");
        let e = KvError::Timeout {
            elapsed: Duration::from_secs(1),
            attempts: 3,
            last: "x".into(),
        };
        assert_eq!(error_kind(&e), "Timeout");
    }
}
