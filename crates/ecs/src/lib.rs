//! `ringkv-ecs`: the External Configuration Service.
//!
//! An operator (with an `admin` certificate) asks the ECS to add or remove nodes; the ECS
//! plans the change, write-locks the affected range, has the data moved between neighbours,
//! persists and publishes the new metadata version, then releases the lock (ARCHITECTURE.md §5).
//! Its ring survives restarts in a state file.
//!
//! # Layout
//! - [`executor`]: the executor of a plan as a synchronous state machine, and the intent
//!   log entry it keeps ([`executor::Intent`]).
//! - [`plan`]: membership changes as pure step lists, with their rollback.
//! - [`liveness`]: when each node last answered a probe, whom to probe (lease) and whom to
//!   fail over ([`liveness::Probes`], [`liveness::FailoverDecision`]).
//! - [`leadership`]: the leader's "may I act" gate ([`leadership::LeadGate`]).
//! - [`service`]: [`Ecs`], which performs those decisions: operators' requests, leadership in
//!   a group, probes and failover, the change driver (one file each); [`bind`] and [`run`].
//! - [`state`]: the atomically replaced ring file.
//! - [`raft`]: the foundation of a replicated ECS: its state (ring and intent log) as the
//!   state machine of a Raft group of ECS members ([`raft::EcsRaft`]), with a durable log on
//!   fjall and Raft messages over the ECS protocol.
//! - [`config`]: the configuration, [`EcsConfig`].
//! - [`error`]: the error type, [`EcsError`].
//!
//! The `ringkv-ecs` command line (the service and the operator commands) lives with the
//! binaries (the umbrella package's `src/cli/ecs.rs`).
#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod error;
pub mod executor;
pub mod leadership;
pub mod liveness;
pub mod plan;
pub mod raft;
pub mod service;
pub mod state;

pub use config::EcsConfig;
pub use error::EcsError;
pub use service::{bind, run, Ecs};
