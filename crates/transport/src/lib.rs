//! `ringkv-transport`: the connection layer every ringkv part speaks through
//! (ARCHITECTURE.md §3).
//!
//! Every link is QUIC with mutual TLS (the configs come from `ringkv-certs`). One connection
//! per peer is opened once and reused; every request is one bidirectional stream carrying one
//! request frame and one reply frame (`ringkv-wire`'s codec). Clients, nodes (range transfers,
//! gossip) and the ECS all call through [`Transport`]; nodes and the ECS all serve through
//! [`serve`], so framing, frame limits and the handling of bad frames exist once.
//!
//! # Layout
//! - [`client`]: [`Transport`], the calling side: connection cache, dialing, one exchange per
//!   stream, timeouts that close the connection.
//! - [`server`]: the serving side: [`serve`] and the [`Service`] trait a request handler
//!   implements; [`shutdown_signal`] for the binaries.
//! - [`endpoint`]: [`bind_endpoint`], a serving endpoint whose stateless-reset key is derived
//!   from a secret kept across restarts ([`reset_secret`]), so that peers of a restarted node
//!   learn at their first packet that their old connections are dead.
//! - [`authority`]: [`RingSigner`] (the ECS signs each metadata version) and
//!   [`RingAuthority`] (everyone else opens metadata only through a signature check).
//! - [`limits`]: [`ServeLimits`], the serving side's resource limits (connections in total
//!   and per address, streams and receive window by role, request read deadline, idle
//!   timeout), and the connection admission that enforces the connection limits.
//! - [`error`]: the error type, [`TransportError`].
//! - `frame`: [`read_frame`], the one framing loop for both sides of a stream, whose buffer
//!   grows with the bytes that arrived; [`read_frame_until`], the same with a deadline.
#![warn(missing_docs)]

pub mod authority;
pub mod client;
pub mod endpoint;
pub mod error;
mod frame;
pub mod limits;
pub mod server;
#[cfg(test)]
mod tests;

pub use authority::{RingAuthority, RingSigner};
pub use client::Transport;
pub use endpoint::{bind_endpoint, reset_secret};
pub use error::TransportError;
pub use frame::{read_frame, read_frame_until, FrameError, FIRST_CHUNK};
pub use limits::{RoleLimits, ServeLimits};
pub use server::{serve, shutdown_signal, Service};
