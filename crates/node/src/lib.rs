//! `ringkv-node`: the ringkv storage node.
//!
//! A node serves the keys of its ring range `(predecessor, self]` durably over QUIC with
//! mutual TLS. It answers `NotResponsible` (with its metadata) for keys outside that range,
//! `WriteLocked` for writes into a range being moved, and `Stopped` while it is not serving.
//! What each certificate role may send is decided in one place, [`request::allowed`]
//! (ARCHITECTURE.md §4): clients the data path; nodes also transfer batches, metadata,
//! gossip and status; admins everything, including locks, transfers and range deletion.
//!
//! # Layout
//! - [`config`]: the configuration, [`NodeConfig`].
//! - [`node`]: [`Node`], the node's state (metadata view, write locks, running flag) and the
//!   dispatch of a request to its handler.
//! - [`lease`]: [`lease::Lease`], the node's lease from the ECS as a synchronous state
//!   machine over two clocks (the clock model).
//! - [`moves`]: [`moves::MoveState`], the node's part in range moves (durable write locks,
//!   tracking rounds, the moves it receives) as a synchronous state machine.
//! - [`request`]: one module per kind of request (data, metadata, admin, gossip, range).
//! - [`gossip`]: metadata dissemination and failure detection: the state machine, its
//!   tokio driver and its configuration.
//! - [`server`]: binding the endpoint and serving the node through `ringkv-transport`;
//!   [`server::bind`] and [`server::run`].
//! - [`storage`]: [`storage::Store`], fjall with a group-commit writer thread.
//! - [`record`]: what a key holds ([`record::Record`]: value, version, expiry) and how the
//!   head decides a write ([`record::decide`], versions, compare-and-set), as pure code.
//! - [`hops`]: chain writes to a successor, batched.
//! - [`redrive`]: a head's writes its chain may lack, sent again after a restart or a
//!   give-up.
//! - [`error`]: the error type, [`NodeError`].
//!
//! The `ringkv-node` command line lives with the binaries (the umbrella package's
//! `src/cli/node.rs`).
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod expiry;
pub mod gossip;
pub mod hops;
pub mod lease;
pub mod moves;
pub mod node;
pub mod record;
pub mod redrive;
pub mod request;
pub mod server;
pub mod storage;

pub use config::NodeConfig;
pub use error::NodeError;
pub use node::Node;
pub use server::{bind, run};
