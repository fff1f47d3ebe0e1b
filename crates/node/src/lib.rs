//! `ringkv-node`: the ringkv storage node.
//!
//! A node serves the keys of its ring range `(predecessor, self]` durably over QUIC with
//! mutual TLS. It answers `NotResponsible` (with its metadata) for keys outside that range,
//! `WriteLocked` for writes into a range being moved, and `Stopped` while it is not serving.
//! Internal requests (range locks and transfers, metadata installation, status) are accepted
//! only from `node` and `admin` certificates.
//!
//! # Layout
//! - [`config`]: the configuration, [`NodeConfig`].
//! - [`node`]: [`Node`], the node's state (metadata view, write locks, running flag) and the
//!   dispatch of a request to its handler.
//! - [`request`]: one module per kind of request (data, metadata, admin, range).
//! - [`gossip`]: metadata dissemination and failure detection: the state machine, its
//!   tokio driver and its configuration.
//! - [`server`]: the QUIC accept loop and per-stream framing; [`server::run`].
//! - [`storage`]: [`storage::Store`], redb with a group-commit writer thread.
//! - [`error`]: the error type, [`NodeError`].
//! - [`cli`]: the `ringkv-node` binary's code.
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod error;
pub mod gossip;
pub mod node;
pub mod request;
pub mod server;
pub mod storage;

pub use config::NodeConfig;
pub use error::NodeError;
pub use node::Node;
pub use server::{bind, run};
