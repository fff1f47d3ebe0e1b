//! `kvstore`: the ringkv client library.
//!
//! An application talks to "the store"; this crate talks to single nodes. It caches the
//! versioned ring metadata, sends each request straight to the node responsible for the key,
//! and recovers by itself when that guess is wrong: `NotResponsible` carries newer metadata
//! which is adopted before retrying, `WriteLocked`/`Stopped` are retried with jittered
//! backoff until a deadline, and an unreachable node makes it refresh metadata from others.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvstore::KvError> {
//! use kvstore::{ClientConfig, KvStore};
//! let identity = ringkv_certs::Identity::from_dir("certs".as_ref(), "client")?;
//! let store = KvStore::connect(ClientConfig::new(vec!["127.0.0.1:7001".into()], identity)).await?;
//! store.put(b"greeting", b"hello").await?;
//! assert_eq!(store.get(b"greeting").await?, Some(b"hello".to_vec()));
//! store.delete(b"greeting").await?;
//! store.disconnect().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`client`]: [`KvStore`], routing and the retry loop.
//! - [`batch`]: `get_many`, `put_many`, `delete_many`: many keys per request, grouped by node.
//! - [`scan`]: `scan`, `scan_values`: the keys page by page, in hash order, with a cursor.
//! - [`config`]: [`ClientConfig`] and its defaults.
//! - [`retry`]: [`RetryPolicy`] and [`Backoff`], pure delay computation (the one retry policy
//!   of the workspace).
//! - [`error`]: the error type, [`KvError`].
//!
//! Connections come from `ringkv-transport` (one reused QUIC connection per node, one stream
//! per request). The `ringkv` command-line client lives with the binaries (the umbrella
//! package's `src/cli/client.rs`), so an application embedding this crate compiles the client
//! and nothing else.
#![warn(missing_docs)]

pub mod batch;
pub mod client;
pub mod config;
pub mod error;
pub mod retry;
pub mod scan;

pub use client::{ClientStats, Conditional, KvStore, PutOutcome, Versioned};
pub use config::ClientConfig;
pub use error::KvError;
pub use retry::{Backoff, RetryPolicy};
/// The transport error inside [`KvError::Transport`], re-exported so applications need not
/// depend on `ringkv-transport`.
pub use ringkv_transport::TransportError;
pub use ringkv_wire::ScanEntry;
pub use scan::{ScanCursor, ScanPage};
