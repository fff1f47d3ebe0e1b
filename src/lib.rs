//! ringkv umbrella package: the binaries (`ringkv`, `ringkv-node`, `ringkv-ecs`,
//! `ringkv-certs`, `ringkv-bench`), the end-to-end tests and the examples.
//!
//! # Layout
//! - [`cli`]: the code of every binary (argument parsing, config files, tracing and runtime
//!   setup); `src/bin/*` are one-line wrappers around it.
//! - [`local`]: a whole cluster in one process (ECS and nodes each on their own thread and
//!   current-thread runtime, as the binaries run them), for `examples/local_cluster.rs` and
//!   the benchmarks.
//! - [`rebalance`]: the rebalance benchmark (`ringkv-bench rebalance`).
#![warn(missing_docs)]

pub mod cli;
pub mod lease_scale;
pub mod local;
pub mod rebalance;
