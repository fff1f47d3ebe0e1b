//! The `ringkv-certs` command line: create a cluster CA and issue leaf certificates.
//!
//! ```text
//! ringkv-certs init  --dir certs [--force]
//! ringkv-certs issue --dir certs --role node --name node1 --san 127.0.0.1 --san node1.local [--days 365] [--force]
//! ringkv-certs issue --dir certs --role client --name app
//! ```
//!
//! This module is the whole binary (the `ringkv-certs` bin is a one-line wrapper): it prints
//! the paths it wrote to stdout.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use time::{Duration, OffsetDateTime};

use ringkv_certs::{init_ca, issue, CertPaths, IssueOptions, Role};

/// ringkv certificate tool: cluster CA and node/client/admin certificates.
#[derive(Debug, Parser)]
#[command(name = "ringkv-certs", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of [`Cli`].
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the cluster CA (ca.pem, ca.key) in DIR.
    Init {
        /// Cert directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Overwrite an existing CA. Every certificate issued by the old CA stops working.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate (NAME.pem, NAME.key) signed by the CA in DIR.
    Issue {
        /// Role granted by the certificate.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Common name and file stem: [A-Za-z0-9._-], not starting with '.', not "ca".
        #[arg(long)]
        name: String,
        /// DNS name or IP address this peer is reached at (repeatable; needed for nodes).
        #[arg(long = "san", value_name = "SAN")]
        sans: Vec<String>,
        /// Validity in days, starting one hour ago.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Cert directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Overwrite existing NAME.pem / NAME.key.
        #[arg(long)]
        force: bool,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse().map_err(|_| {
        let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
        format!("unknown role {s:?}; expected one of: {}", names.join(", "))
    })
}

/// Runs a parsed command line, printing the paths it wrote.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, force } => {
            let paths = init_ca(&dir, force)?;
            print_written("cluster CA", &paths);
        }
        Command::Issue {
            role,
            name,
            sans,
            days,
            dir,
            force,
        } => {
            let mut opts = IssueOptions::new(role, name);
            opts.not_after = OffsetDateTime::now_utc() + Duration::days(i64::from(days));
            opts.sans = sans;
            opts.force = force;
            let paths = issue(&dir, &opts)?;
            print_written(&format!("{role} certificate {:?}", opts.name), &paths);
        }
    }
    Ok(())
}

fn print_written(what: &str, paths: &CertPaths) {
    println!("wrote {what}:");
    println!("  cert {}", paths.cert.display());
    println!("  key  {} (mode 0600)", paths.key.display());
}

/// Entry point of the `ringkv-certs` binary: parses `std::env::args` and runs.
pub fn main() -> anyhow::Result<()> {
    run(Cli::parse())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_issue() {
        let cli = Cli::try_parse_from([
            "ringkv-certs",
            "issue",
            "--role",
            "node",
            "--name",
            "n1",
            "--san",
            "127.0.0.1",
            "--san",
            "n1.local",
            "--dir",
            "/tmp/x",
        ])
        .unwrap();
        match cli.command {
            Command::Issue {
                role,
                name,
                sans,
                days,
                force,
                ..
            } => {
                assert_eq!(role, Role::Node);
                assert_eq!(name, "n1");
                assert_eq!(sans, ["127.0.0.1", "n1.local"]);
                assert_eq!(days, 365);
                assert!(!force);
            }
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn rejects_unknown_role_and_zero_days() {
        let base = ["ringkv-certs", "issue", "--name", "n", "--dir", "d"];
        let with = |extra: &[&'static str]| {
            Cli::try_parse_from(base.iter().copied().chain(extra.iter().copied()))
        };
        assert!(with(&["--role", "root"]).is_err());
        assert!(with(&["--role", "client", "--days", "0"]).is_err());
        assert!(with(&["--role", "client"]).is_ok());
    }

    #[test]
    fn run_init_and_issue() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("certs");
        let d = d.to_str().unwrap();
        run(Cli::try_parse_from(["ringkv-certs", "init", "--dir", d]).unwrap()).unwrap();
        run(Cli::try_parse_from([
            "ringkv-certs",
            "issue",
            "--role",
            "ecs",
            "--name",
            "ecs",
            "--days",
            "2",
            "--dir",
            d,
        ])
        .unwrap())
        .unwrap();
        let id =
            ringkv_certs::Identity::from_dir(dir.path().join("certs").as_path(), "ecs").unwrap();
        assert_eq!(id.role().unwrap(), Role::Ecs);
        // A second init without --force is refused.
        assert!(run(Cli::try_parse_from(["ringkv-certs", "init", "--dir", d]).unwrap()).is_err());
    }
}
