//! `--config FILE` for the ringkv binaries: a TOML file of defaults for their flags.
//!
//! The file's keys are the long names of the flags of the (sub)command that has the
//! `--config` option: `listen = "10.0.0.11:7001"` stands for `--listen 10.0.0.11:7001`, and
//! `data-dir` and `data_dir` are the same key. Precedence, highest first: the flag on the
//! command line, its environment variable (where the flag has one), the file, the built-in
//! default. Values are strings, integers or floats (passed as the flag's text), `true`/`false`
//! for switches (`start = true` is `--start`; `false` leaves it off), and arrays for flags
//! that may be repeated. An unknown key is an error, so a typo is never silently ignored.
//!
//! Because the keys are derived from the flags, every flag a binary gains (flattened argument
//! groups included) is configurable by file without further code. This is binary-side code:
//! like the rest of the CLI modules it reports errors with `anyhow`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, Parser};

/// Id (and long name) of the option that names the file.
pub const CONFIG_ARG: &str = "config";

/// Parses the process's command line into `C`, taking defaults from the TOML file named by
/// its `--config` option if given. Like [`Parser::parse`], prints the usage and exits on
/// `--help` and on command line errors (with a note naming the file if one was read).
/// Errors of the file itself (unreadable, not TOML, unknown key) are returned.
pub fn parse<C: Parser>() -> anyhow::Result<C> {
    parse_from(std::env::args_os())
}

/// [`parse`] for an explicit argument list (the first item is the program name).
pub fn parse_from<C, I, T>(args: I) -> anyhow::Result<C>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    match try_parse_from(args) {
        Ok(parsed) => Ok(parsed),
        Err(Failure::File(e)) => Err(e),
        Err(Failure::CommandLine { error, file }) => {
            if let Some(file) = file {
                eprintln!(
                    "note: flags missing from the command line were taken from config file {}",
                    file.display()
                );
            }
            error.exit()
        }
    }
}

/// Why [`try_parse_from`] failed.
#[derive(Debug)]
enum Failure {
    /// The command line, completed by the file's flags, does not parse (or asks for help).
    CommandLine {
        error: clap::Error,
        file: Option<PathBuf>,
    },
    /// The file could not be read or has a bad key or value.
    File(anyhow::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::CommandLine { error, .. } => write!(f, "{}", error.render()),
            Failure::File(e) => write!(f, "{e:#}"),
        }
    }
}

fn try_parse_from<C, I, T>(args: I) -> Result<C, Failure>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let strict = |args: &[OsString], file: Option<&Path>| {
        C::try_parse_from(args).map_err(|error| Failure::CommandLine {
            error,
            file: file.map(Path::to_path_buf),
        })
    };
    // A first, lenient pass only finds the file: flags it provides (required ones too) may
    // be missing from the command line.
    let mut lenient = C::command().ignore_errors(true);
    lenient.build(); // propagates global flags into subcommands
    let Ok(matches) = lenient.clone().try_get_matches_from(&args) else {
        return strict(&args, None);
    };
    let Some((level, level_matches)) = config_level(&lenient, &matches) else {
        return strict(&args, None);
    };
    let Some(path) = level_matches.get_one::<PathBuf>(CONFIG_ARG).cloned() else {
        return strict(&args, None);
    };
    let extra = file_args(level, level_matches, &path).map_err(Failure::File)?;
    // Appended after everything: arguments after a subcommand belong to it, and the file
    // only names flags the command line left unset, so nothing is given twice.
    args.extend(extra);
    strict(&args, Some(&path))
}

/// The deepest (sub)command on the matched path that has a `--config` option.
fn config_level<'a>(
    command: &'a Command,
    matches: &'a ArgMatches,
) -> Option<(&'a Command, &'a ArgMatches)> {
    let here = command
        .get_arguments()
        .any(|a| a.get_id() == CONFIG_ARG)
        .then_some((command, matches));
    match matches.subcommand() {
        Some((name, sub_matches)) => command
            .find_subcommand(name)
            .and_then(|sub| config_level(sub, sub_matches))
            .or(here),
        None => here,
    }
}

/// The flags the file at `path` sets that the command line (and environment) did not.
fn file_args(
    command: &Command,
    matches: &ArgMatches,
    path: &Path,
) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config file {}", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .filter(|a| configurable(a.get_action()) && a.get_id() != CONFIG_ARG)
            .find(|a| a.get_long() == Some(long.as_str()))
            .ok_or_else(|| {
                anyhow!(
                    "config file {}: unknown key '{key}'; the keys are the long flags of `{}`: {}",
                    path.display(),
                    command.get_name(),
                    known_keys(command)
                )
            })?;
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue; // the command line and the environment win
        }
        let bad = |why: &str| anyhow!("config file {}: key '{key}' {why}", path.display());
        if !arg.get_action().takes_values() {
            match value {
                toml::Value::Boolean(true) => out.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("is a switch: use true or false")),
            }
            continue;
        }
        let items: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        for item in items {
            let text = match item {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Datetime(d) => d.to_string(),
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    return Err(bad(
                        "must be a string, number, boolean or an array of those",
                    ))
                }
            };
            out.push(format!("--{long}={text}").into());
        }
    }
    Ok(out)
}

fn configurable(action: &ArgAction) -> bool {
    !matches!(
        action,
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
    )
}

fn known_keys(command: &Command) -> String {
    command
        .get_arguments()
        .filter(|a| configurable(a.get_action()) && a.get_id() != CONFIG_ARG)
        .filter_map(|a| a.get_long())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Subcommand;

    #[derive(Debug, Parser)]
    struct Flat {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:7001")]
        listen: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        start: bool,
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        #[arg(long, value_delimiter = ',')]
        seed: Vec<String>,
    }

    #[derive(Debug, Parser)]
    struct Required {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        name: String,
    }

    #[derive(Debug, Parser)]
    struct WithSub {
        #[arg(
            long,
            env = "RINGKV_CONFIG_FILE_TEST_CERTS",
            default_value = "certs",
            global = true
        )]
        certs: PathBuf,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, Subcommand)]
    enum Sub {
        Serve {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, default_value = "127.0.0.1:7000")]
            listen: String,
        },
        Status,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn args(extra: &[&str]) -> Vec<String> {
        std::iter::once("prog")
            .chain(extra.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn file_gives_defaults_and_flags_override() {
        let f = file(
            "listen = \"10.0.0.1:7001\"\ndata_dir = \"/data\"\nstart = true\ntimeout = 9\nseed = [\"a:1\", \"b:2\"]\n",
        );
        let path = f.path().to_str().unwrap();
        let a: Flat = try_parse_from(args(&["--config", path])).unwrap();
        assert_eq!(a.listen, "10.0.0.1:7001");
        assert_eq!(a.data_dir, Some(PathBuf::from("/data")));
        assert!(a.start);
        assert_eq!(a.timeout, 9);
        assert_eq!(a.seed, ["a:1", "b:2"]);

        let a: Flat = try_parse_from(args(&[
            "--listen",
            "0.0.0.0:1",
            "--config",
            path,
            "--seed",
            "c:3",
        ]))
        .unwrap();
        assert_eq!(a.listen, "0.0.0.0:1", "the flag wins");
        assert_eq!(a.seed, ["c:3"], "the flag wins for lists too");
        assert_eq!(a.timeout, 9);
    }

    #[test]
    fn the_node_serving_limits_come_from_the_file() {
        let f = file(
            "name = \"n1\"\ndata-dir = \"/d\"\nrequest-read-timeout-ms = 2000\nidle_connection_timeout_ms = 60000\nmax-connections-per-ip = 16\nclient-max-streams = 32\nmax-queued-writes = 100\n",
        );
        let path = f.path().to_str().unwrap();
        let a: crate::cli::node::Args =
            try_parse_from(args(&["--config", path, "--max-connections", "64"])).unwrap();
        let config = a.config().unwrap();
        assert_eq!(
            config.serve.request_read_timeout,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(
            config.serve.idle_timeout,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(config.serve.max_connections, 64);
        assert_eq!(config.serve.max_connections_per_ip, 16);
        assert_eq!(config.serve.client.max_streams, 32);
        assert_eq!(config.max_queued_writes, 100);
    }

    #[test]
    fn the_file_may_provide_required_flags() {
        let f = file("name = \"n1\"\n");
        let path = f.path().to_str().unwrap();
        let a: Required = try_parse_from(args(&["--config", path])).unwrap();
        assert_eq!(a.name, "n1");
        let a: Required = try_parse_from(args(&["--config", path, "--name", "n2"])).unwrap();
        assert_eq!(a.name, "n2");
        let e = try_parse_from::<Required, _, _>(args(&[])).unwrap_err();
        assert!(matches!(&e, Failure::CommandLine { file: None, .. }), "{e}");
        assert!(e.to_string().contains("--name"), "{e}");
    }

    #[test]
    fn without_a_file_nothing_changes() {
        let a: Flat = try_parse_from(args(&["--start"])).unwrap();
        assert_eq!(a.listen, "127.0.0.1:7001");
        assert!(a.start);
        let f = file("start = false\n");
        let a: Flat = try_parse_from(args(&["--config", f.path().to_str().unwrap()])).unwrap();
        assert!(!a.start);
    }

    #[test]
    fn mistakes_are_reported() {
        let f = file("listne = \"x\"\n");
        let e = try_parse_from::<Flat, _, _>(args(&["--config", f.path().to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key 'listne'"), "{e}");
        assert!(e.contains("listen, data-dir"), "{e}");

        let f = file("start = \"yes\"\n");
        let e = try_parse_from::<Flat, _, _>(args(&["--config", f.path().to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'start' is a switch"), "{e}");

        let f = file("timeout = \"soon\"\n");
        let e = try_parse_from::<Flat, _, _>(args(&["--config", f.path().to_str().unwrap()]))
            .unwrap_err();
        assert!(
            matches!(&e, Failure::CommandLine { file: Some(p), .. } if p == f.path()),
            "{e}"
        );
        assert!(e.to_string().contains("'soon' for '--timeout"), "{e}");

        let f = file("config = \"other.toml\"\n");
        let e = try_parse_from::<Flat, _, _>(args(&["--config", f.path().to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key 'config'"), "{e}");

        let e = try_parse_from::<Flat, _, _>(args(&["--config", "/nonexistent/ringkv.toml"]))
            .unwrap_err();
        assert!(format!("{e:#}").contains("reading config file"), "{e:#}");

        let f = file("listen = [\n");
        let e = try_parse_from::<Flat, _, _>(args(&["--config", f.path().to_str().unwrap()]))
            .unwrap_err();
        assert!(format!("{e:#}").contains("parsing config file"), "{e:#}");
    }

    #[test]
    fn subcommand_file_covers_its_flags_and_the_global_ones() {
        let f = file("listen = \"10.0.0.2:7000\"\ncerts = \"/etc/ringkv/certs\"\n");
        let path = f.path().to_str().unwrap();
        let a: WithSub = try_parse_from(args(&["serve", "--config", path])).unwrap();
        assert_eq!(a.certs, PathBuf::from("/etc/ringkv/certs"));
        let Sub::Serve { listen, .. } = a.command else {
            panic!("serve expected")
        };
        assert_eq!(listen, "10.0.0.2:7000");
        // A global flag given before the subcommand still wins over the file.
        let a: WithSub =
            try_parse_from(args(&["--certs", "mine", "serve", "--config", path])).unwrap();
        assert_eq!(a.certs, PathBuf::from("mine"));
        // Subcommands without --config are unaffected.
        let a: WithSub = try_parse_from(args(&["status"])).unwrap();
        assert!(matches!(a.command, Sub::Status));
    }
}
