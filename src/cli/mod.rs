//! The command-line programs of ringkv: each binary in `src/bin/` is a one-line wrapper
//! around one module here, so the libraries (`kvstore`, `ringkv-node`, `ringkv-ecs`,
//! `ringkv-certs`) carry no command-line parsing, no config-file loader and no logging setup.
//!
//! # Layout
//! - [`client`]: `ringkv`, the command-line client (one-shot commands and a shell).
//! - [`node`]: `ringkv-node`, the storage node.
//! - [`ecs`]: `ringkv-ecs`, the ECS service and the operator's commands.
//! - [`certs`]: `ringkv-certs`, the certificate tool.
//! - [`config_file`]: `--config FILE` of the server binaries: TOML defaults for their flags.
//! - [`serve_limits`]: the serving-limit flags of both servers.
//! - this module: the tracing and runtime setup every binary shares.

pub mod certs;
pub mod client;
pub mod config_file;
pub mod ecs;
pub mod node;
pub mod serve_limits;

/// Logs to stderr through `tracing`, at `default_level` unless `RUST_LOG` says otherwise.
/// Idempotent: a second call (tests running several commands in one process) is a no-op.
pub fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The runtime every binary runs on: one thread. Serving the QUIC endpoint from a
/// current-thread runtime measured ~3x faster than a multi-threaded one on 2 cores
/// (ARCHITECTURE.md §9); a node's storage writes have their own thread.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
