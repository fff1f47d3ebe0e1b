//! ringkv umbrella package: the binaries (`ringkv`, `ringkv-node`, `ringkv-ecs`,
//! `ringkv-certs`, `ringkv-bench`), the end-to-end tests and the examples.
//!
//! # Layout
//! - [`local`]: a whole cluster in one process (ECS and nodes each on their own thread and
//!   current-thread runtime, as the binaries run them), for `examples/local_cluster.rs` and
//!   the benchmarks.
//! - [`rebalance`]: the rebalance benchmark (`ringkv-bench rebalance`).
#![warn(missing_docs)]

pub mod local;
pub mod rebalance;
