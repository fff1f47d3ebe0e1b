//! The `ringkv` command-line client: one-shot commands and an interactive shell.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ringkv_certs::Identity;

use kvstore::{ClientConfig, Conditional, KvStore, PutOutcome};

/// ringkv command-line client.
#[derive(Debug, Parser)]
#[command(name = "ringkv", version, about = "ringkv command-line client")]
pub struct Cli {
    /// Seed node address (host:port); repeat or comma-separate for several.
    #[arg(
        long = "seed",
        env = "RINGKV_SEEDS",
        value_delimiter = ',',
        global = true
    )]
    pub seeds: Vec<String>,
    /// Directory holding ca.pem and the client certificate.
    #[arg(long, env = "RINGKV_CERTS", default_value = "certs", global = true)]
    pub certs: PathBuf,
    /// Name of the client certificate in the certs directory (<name>.pem, <name>.key).
    #[arg(long, env = "RINGKV_IDENTITY", default_value = "client", global = true)]
    pub identity: String,
    /// Give up on a request after this many seconds of retries.
    #[arg(long, default_value_t = 10, global = true)]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A `ringkv` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the value of KEY (exit code 1 if it does not exist).
    Get {
        /// The key.
        key: String,
        /// Print the key's version and a space before the value.
        #[arg(long, conflicts_with = "out")]
        with_version: bool,
        /// Write the value, byte for byte, to this file instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Store VALUE under KEY; with a condition, only if it holds (exit code 2 if not).
    Put {
        /// The key.
        key: String,
        /// The value; `-` reads it from stdin (binary-safe).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        /// Read the value, byte for byte, from this file.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Only if the key's version is this one (compare-and-set).
        #[arg(long, value_name = "VERSION", conflicts_with = "if_absent")]
        if_version: Option<u64>,
        /// Only if the key does not exist.
        #[arg(long)]
        if_absent: bool,
        /// Expire the key after this long (e.g. 30s, 500ms, 2m), counted by the clock of
        /// the key's head from when it takes the write.
        #[arg(long, value_name = "DURATION", value_parser = super::ecs::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Delete KEY (exit code 1 if it did not exist; 2 if its version is not --if-version).
    Delete {
        /// The key.
        key: String,
        /// Only if the key's version is this one.
        #[arg(long, value_name = "VERSION")]
        if_version: Option<u64>,
    },
    /// Print the values of several keys, one line each (`(nil)` if a key does not exist),
    /// read in one request per node.
    Mget {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List the keys beginning with PREFIX (every key without one), one per line, in hash
    /// order (not key order); every key present for the whole scan is listed.
    Scan {
        /// Only keys beginning with this.
        prefix: Option<String>,
        /// Print each key's value after it (KEY VALUE).
        #[arg(long)]
        values: bool,
        /// Keys per request (1 to 1024).
        #[arg(long, default_value_t = 256)]
        count: usize,
        /// Print one page only, from this cursor (0: the start), and the next cursor on
        /// stderr ("next cursor: C", or "end of scan").
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<kvstore::ScanCursor>,
    },
    /// Store several values (KEY VALUE KEY VALUE ...), one request per node; one line per
    /// key. Not a transaction: exit code 1 if any key failed (its error is printed).
    Mput {
        /// Keys and values, alternating.
        #[arg(required = true, num_args = 2.., value_name = "KEY VALUE")]
        pairs: Vec<String>,
    },
    /// Delete several keys, one request per node; one line per key ("deleted" or "not
    /// found").
    Mdelete {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Print the client's view of the ring: version, nodes, positions, ranges.
    Ring,
    /// Interactive shell (connect, put, get, delete, ring, disconnect, help, quit).
    Shell,
}

/// Parses the command line and runs it on a current-thread runtime. Returns the process
/// exit code.
pub fn main() -> anyhow::Result<i32> {
    super::init_tracing("warn");
    let cli = Cli::parse();
    super::runtime()?.block_on(run(cli))
}

fn config(cli: &Cli, seeds: Vec<String>) -> anyhow::Result<ClientConfig> {
    if seeds.is_empty() {
        bail!("no seed node given: use --seed host:port or RINGKV_SEEDS");
    }
    let identity = Identity::from_dir(&cli.certs, &cli.identity).with_context(|| {
        format!(
            "loading client identity '{}' from {}",
            cli.identity,
            cli.certs.display()
        )
    })?;
    let mut config = ClientConfig::new(seeds, identity);
    config.retry.deadline = Duration::from_secs(cli.timeout);
    // No single connection attempt or request may outlast the whole deadline: with one
    // node unreachable, `--timeout 2` must not mean "3 s per connection attempt". (At
    // least 1 s each, so that `--timeout 0`, "do not retry", can still connect.)
    let cap = config.retry.deadline.max(Duration::from_secs(1));
    config.connect_timeout = config.connect_timeout.min(cap);
    config.request_timeout = config.request_timeout.min(cap);
    Ok(config)
}

/// Runs one parsed command line. Returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    if matches!(cli.command, Command::Shell) {
        return shell(&cli).await;
    }
    let store = KvStore::connect(config(&cli, cli.seeds.clone())?).await?;
    let mut out = std::io::stdout().lock();
    let code = match &cli.command {
        Command::Get {
            key,
            with_version,
            out: file,
        } => match store.get_versioned(key.as_bytes()).await? {
            Some(v) => {
                if let Some(file) = file {
                    std::fs::write(file, &v.value)
                        .with_context(|| format!("writing {}", file.display()))?;
                    return finish(store, 0).await;
                }
                if *with_version {
                    write!(out, "{} ", v.version)?;
                }
                out.write_all(&v.value)?;
                writeln!(out)?;
                0
            }
            None => {
                eprintln!("not found: {key}");
                1
            }
        },
        Command::Put {
            key,
            value,
            file,
            if_version,
            if_absent,
            ttl,
        } => {
            let value = match (value.as_deref(), file) {
                (_, Some(file)) => {
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?
                }
                (Some("-"), None) => {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes)
                        .context("reading the value from stdin")?;
                    bytes
                }
                (Some(value), None) => value.as_bytes().to_vec(),
                (None, None) => bail!("give a VALUE, - (stdin) or --file FILE"),
            };
            let (key, value) = (key.as_bytes(), &value[..]);
            let outcome = match (if_version, if_absent, ttl) {
                (Some(version), _, None) => store.put_if_version(key, value, *version).await?,
                (Some(version), _, Some(ttl)) => {
                    store
                        .put_if_version_with_ttl(key, value, *version, *ttl)
                        .await?
                }
                (None, true, None) => store.put_if_absent(key, value).await?,
                (None, true, Some(ttl)) => store.put_if_absent_with_ttl(key, value, *ttl).await?,
                (None, false, ttl) => {
                    let outcome = match ttl {
                        Some(ttl) => store.put_with_ttl(key, value, *ttl).await?,
                        None => store.put(key, value).await?,
                    };
                    writeln!(out, "{}", put_text(outcome))?;
                    return finish(store, 0).await;
                }
            };
            conditional_text(&mut out, outcome)?
        }
        Command::Delete { key, if_version } => match if_version {
            Some(version) => {
                let outcome = store.delete_if_version(key.as_bytes(), *version).await?;
                conditional_text(&mut out, outcome)?
            }
            None if store.delete(key.as_bytes()).await? => {
                writeln!(out, "OK deleted")?;
                0
            }
            None => {
                eprintln!("not found: {key}");
                1
            }
        },
        Command::Mget { keys } => {
            let mut code = 0;
            for (key, value) in keys.iter().zip(store.get_many(keys).await) {
                match value {
                    Ok(Some(v)) => {
                        out.write_all(&v.value)?;
                        writeln!(out)?;
                    }
                    Ok(None) => writeln!(out, "(nil)")?,
                    Err(e) => {
                        writeln!(out, "(error)")?;
                        eprintln!("{key}: {e}");
                        code = 1;
                    }
                }
            }
            code
        }
        Command::Scan {
            prefix,
            values,
            count,
            cursor,
        } => {
            let prefix = prefix.as_deref().unwrap_or("").as_bytes();
            let one_page = cursor.is_some();
            let mut cursor = cursor.clone().unwrap_or_default();
            loop {
                let page = if *values {
                    store.scan_values(prefix, *count, &cursor).await?
                } else {
                    store.scan(prefix, *count, &cursor).await?
                };
                for entry in &page.entries {
                    out.write_all(&entry.key)?;
                    if let Some(value) = &entry.value {
                        out.write_all(b" ")?;
                        out.write_all(value)?;
                    }
                    writeln!(out)?;
                }
                match page.next {
                    Some(next) if one_page => {
                        eprintln!("next cursor: {next}");
                        break;
                    }
                    Some(next) => cursor = next,
                    None => {
                        if one_page {
                            eprintln!("end of scan");
                        }
                        break;
                    }
                }
            }
            0
        }
        Command::Mput { pairs } => {
            if !pairs.len().is_multiple_of(2) {
                bail!(
                    "mput takes KEY VALUE pairs: {} arguments given",
                    pairs.len()
                );
            }
            let entries: Vec<(&str, &str)> = pairs
                .chunks(2)
                .map(|pair| (pair[0].as_str(), pair[1].as_str()))
                .collect();
            let mut code = 0;
            for ((key, _), result) in entries.iter().zip(store.put_many(&entries).await) {
                match result {
                    Ok(outcome) => writeln!(out, "{key}: {}", put_text(outcome))?,
                    Err(e) => {
                        eprintln!("{key}: {e}");
                        code = 1;
                    }
                }
            }
            code
        }
        Command::Mdelete { keys } => {
            let mut code = 0;
            for (key, result) in keys.iter().zip(store.delete_many(keys).await) {
                match result {
                    Ok(true) => writeln!(out, "{key}: deleted")?,
                    Ok(false) => writeln!(out, "{key}: not found")?,
                    Err(e) => {
                        eprintln!("{key}: {e}");
                        code = 1;
                    }
                }
            }
            code
        }
        Command::Ring => {
            write!(out, "{}", ring_text(&store))?;
            0
        }
        Command::Shell => unreachable!("handled above"),
    };
    finish(store, code).await
}

async fn finish(store: KvStore, code: i32) -> anyhow::Result<i32> {
    store.disconnect().await;
    Ok(code)
}

/// Prints a conditional write's outcome: "OK version N" on stdout (exit code 0), or
/// "conflict: …" on stderr (exit code 2).
fn conditional_text(out: &mut impl Write, outcome: Conditional) -> anyhow::Result<i32> {
    match outcome {
        Conditional::Applied { version } => {
            writeln!(out, "OK version {version}")?;
            Ok(0)
        }
        Conditional::Conflict { current } => {
            eprintln!("{}", conflict_text(current));
            Ok(2)
        }
    }
}

fn conflict_text(current: Option<u64>) -> String {
    match current {
        Some(version) => format!("conflict: the key's version is {version}; nothing written"),
        None => "conflict: the key does not exist; nothing written".to_string(),
    }
}

fn put_text(outcome: PutOutcome) -> &'static str {
    match outcome {
        PutOutcome::Created => "OK created",
        PutOutcome::Updated => "OK updated",
    }
}

/// The client's ring view as a table (the same table as `ringkv-ecs ring`).
pub fn ring_text(store: &KvStore) -> String {
    super::ecs::ring_text(&store.metadata())
}

const SHELL_HELP: &str = "\
commands:
  connect [host:port ...]   connect (to the given seeds, or those of the command line)
  put <key> <value...>      store a value (the rest of the line)
  setex <key> <ttl> <value...>
                            store a value that expires after <ttl> (e.g. 30s, 500ms)
  cas <key> <version|absent> <value...>
                            store a value if the key has that version (or does not exist)
  get <key>                 print a value
  version <key>             print the key's version
  delete <key>              delete a key
  mget <key> ...            print several values, one request per node
  mput <key> <value> ...    store several one-word values
  mdelete <key> ...         delete several keys
  scan [prefix]             list the keys (beginning with prefix), in hash order
  ring                      show the ring metadata this client routes with
  stats                     show redirect/retry counters
  disconnect                close all connections
  help                      this text
  quit                      leave";

async fn shell(cli: &Cli) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    let mut store: Option<KvStore> = None;
    println!("ringkv shell; type 'help' for commands");
    loop {
        print!("ringkv> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        // Ok(None) means "leave the shell".
        let result: anyhow::Result<Option<String>> = async {
            let connected = || store.as_ref().context("not connected: use 'connect'");
            Ok(Some(match cmd {
                "" => String::new(),
                "help" => SHELL_HELP.to_string(),
                "quit" | "exit" => {
                    if let Some(s) = store.take() {
                        s.disconnect().await;
                    }
                    return Ok(None);
                }
                "connect" => {
                    let seeds = if rest.is_empty() {
                        cli.seeds.clone()
                    } else {
                        rest.split_whitespace().map(str::to_string).collect()
                    };
                    if let Some(old) = store.take() {
                        old.disconnect().await;
                    }
                    let s = KvStore::connect(config(cli, seeds)?).await?;
                    let v = s.metadata().version;
                    let n = s.metadata().nodes.len();
                    store = Some(s);
                    format!("connected: ring version {v}, {n} nodes")
                }
                "disconnect" => match store.take() {
                    Some(s) => {
                        s.disconnect().await;
                        "disconnected".to_string()
                    }
                    None => "not connected".to_string(),
                },
                "put" => {
                    let (key, value) = rest.split_once(' ').context("usage: put <key> <value>")?;
                    put_text(connected()?.put(key.as_bytes(), value.as_bytes()).await?).to_string()
                }
                "setex" => {
                    let usage = "usage: setex <key> <ttl> <value>";
                    let (key, rest) = rest.split_once(' ').context(usage)?;
                    let (ttl, value) = rest.trim().split_once(' ').context(usage)?;
                    let ttl = super::ecs::parse_duration(ttl)
                        .map_err(|e| anyhow::anyhow!("{e}; {usage}"))?;
                    let outcome = connected()?
                        .put_with_ttl(key.as_bytes(), value.as_bytes(), ttl)
                        .await?;
                    put_text(outcome).to_string()
                }
                "cas" => {
                    let usage = "usage: cas <key> <version|absent> <value>";
                    let (key, rest) = rest.split_once(' ').context(usage)?;
                    let (expected, value) = rest.trim().split_once(' ').context(usage)?;
                    let (key, value) = (key.as_bytes(), value.as_bytes());
                    let outcome = if expected == "absent" {
                        connected()?.put_if_absent(key, value).await?
                    } else {
                        let version = expected.parse().context(usage)?;
                        connected()?.put_if_version(key, value, version).await?
                    };
                    match outcome {
                        Conditional::Applied { version } => format!("OK version {version}"),
                        Conditional::Conflict { current } => conflict_text(current),
                    }
                }
                "scan" => {
                    let store = connected()?;
                    let (mut keys, mut cursor) = (Vec::new(), kvstore::ScanCursor::start());
                    loop {
                        let page = store.scan(rest.as_bytes(), 256, &cursor).await?;
                        keys.extend(
                            page.entries
                                .iter()
                                .map(|e| String::from_utf8_lossy(&e.key).into_owned()),
                        );
                        match page.next {
                            Some(next) => cursor = next,
                            None => break,
                        }
                    }
                    format!(
                        "{}({} keys)",
                        keys.iter().map(|k| format!("{k}\n")).collect::<String>(),
                        keys.len()
                    )
                }
                "version" => {
                    if rest.is_empty() {
                        bail!("usage: version <key>");
                    }
                    match connected()?.get_versioned(rest.as_bytes()).await? {
                        Some(v) => v.version.to_string(),
                        None => format!("not found: {rest}"),
                    }
                }
                "get" => {
                    if rest.is_empty() {
                        bail!("usage: get <key>");
                    }
                    match connected()?.get(rest.as_bytes()).await? {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None => format!("not found: {rest}"),
                    }
                }
                "delete" => {
                    if rest.is_empty() {
                        bail!("usage: delete <key>");
                    }
                    if connected()?.delete(rest.as_bytes()).await? {
                        "OK deleted".to_string()
                    } else {
                        format!("not found: {rest}")
                    }
                }
                "mget" => {
                    let keys: Vec<&str> = rest.split_whitespace().collect();
                    if keys.is_empty() {
                        bail!("usage: mget <key> ...");
                    }
                    let values = connected()?.get_many(&keys).await;
                    let lines: Vec<String> = values
                        .into_iter()
                        .map(|value| match value {
                            Ok(Some(v)) => String::from_utf8_lossy(&v.value).into_owned(),
                            Ok(None) => "(nil)".to_string(),
                            Err(e) => format!("(error) {e}"),
                        })
                        .collect();
                    lines.join("\n")
                }
                "mput" => {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    if words.is_empty() || !words.len().is_multiple_of(2) {
                        bail!("usage: mput <key> <value> [<key> <value> ...]");
                    }
                    let entries: Vec<(&str, &str)> =
                        words.chunks(2).map(|p| (p[0], p[1])).collect();
                    let results = connected()?.put_many(&entries).await;
                    let lines: Vec<String> = entries
                        .iter()
                        .zip(results)
                        .map(|((key, _), result)| match result {
                            Ok(outcome) => format!("{key}: {}", put_text(outcome)),
                            Err(e) => format!("{key}: error: {e}"),
                        })
                        .collect();
                    lines.join("\n")
                }
                "mdelete" => {
                    let keys: Vec<&str> = rest.split_whitespace().collect();
                    if keys.is_empty() {
                        bail!("usage: mdelete <key> ...");
                    }
                    let results = connected()?.delete_many(&keys).await;
                    let lines: Vec<String> = keys
                        .iter()
                        .zip(results)
                        .map(|(key, result)| match result {
                            Ok(true) => format!("{key}: deleted"),
                            Ok(false) => format!("{key}: not found"),
                            Err(e) => format!("{key}: error: {e}"),
                        })
                        .collect();
                    lines.join("\n")
                }
                "ring" => ring_text(connected()?).trim_end().to_string(),
                "stats" => format!("{:?}", connected()?.stats()),
                other => bail!("unknown command '{other}'; type 'help'"),
            }))
        }
        .await;
        match result {
            Ok(None) => {
                println!("bye");
                break;
            }
            Ok(Some(text)) if text.is_empty() => {}
            Ok(Some(text)) => println!("{text}"),
            Err(e) => println!("error: {e:#}"),
        }
    }
    Ok(0)
}
