//! Fuzzing the frame decoder and the node's request handlers with proptest (cargo-fuzz needs
//! nightly and network; this runs offline on stable, in CI, through the same code the node runs).
//!
//! Targets:
//! - [`decoder`]: `codec::decode` and `codec::decode_frame` of [`Request`], [`Reply`],
//!   [`AdminRequest`] and [`AdminReply`], and [`RingMetadata::from_frame`], on arbitrary bytes
//!   and on mutated valid frames (bits flipped, bytes set, inserted, deleted, the frame cut,
//!   a huge varint written where a length may be, the frame header overwritten). Each case
//!   asserts: no panic; while decoding, neither the largest single allocation nor the peak of
//!   live bytes exceeds [`alloc_bound`] of the input length, whatever lengths the bytes claim
//!   (measured by the counting [`global_allocator`](alloc_meter::CountingAlloc), on the
//!   decoding thread only); whatever decodes re-encodes and decodes to itself; decoded ring
//!   metadata is valid.
//! - [`handlers`]: a real node (fjall storage in a temp dir, QUIC endpoint on loopback) fed
//!   sequences of requests decoded from generated, mutated and arbitrary bytes, every request
//!   kind from every certificate role, straight into `Node::handle`. Each answer must come
//!   within a deadline, be of a kind that request may get (ARCHITECTURE.md §3), be
//!   `Forbidden` exactly when the role may not send the request, never be a storage error,
//!   carry valid metadata, and fit in a frame.
//!
//! Case counts come from the environment: `RINGKV_FUZZ_CASES` per decoder target (default
//! 4,000) and `RINGKV_FUZZ_HANDLER_CASES` request sequences for the handlers (default 100).
//! CI runs the defaults, `cargo test --test fuzz` (about 5 s in a debug build on 2 cores).
//!
//! The long run, outside CI, 1 M cases per decoder target (measured on 2 cores: 36 s for the
//! six decoder targets and 11 s for 500 handler sequences in a release build, 1 min 40 s with
//! the build):
//!
//! ```text
//! RINGKV_FUZZ_CASES=1000000 RINGKV_FUZZ_HANDLER_CASES=500 \
//!     cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! With `--nocapture` every target prints its case count, time and the worst allocation it
//! saw relative to the input length.

mod common;

use std::fmt::Debug;
use std::time::Instant;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use serde::de::DeserializeOwned;
use serde::Serialize;

use ringkv_wire::codec;
use ringkv_wire::{
    AdminReply, AdminRequest, ErrorKind, GossipDigest, Heartbeat, KeyRange, Limits, Liveness,
    MoveId, MoveReport, NodeEntry, NodeReport, NodeStatus, PeerLiveness, Position, RaftRpc,
    RaftRpcKind, Reply, ReplyBody, Request, RequestBody, RingMetadata, SignedMetadata,
    StorageEntry, TransferStats,
};

#[global_allocator]
static ALLOCATOR: alloc_meter::CountingAlloc = alloc_meter::CountingAlloc;

/// A global allocator that, on threads that ask for it ([`alloc_meter::measure`]), records
/// the largest single allocation and the peak of live bytes.
mod alloc_meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// `System`, counting on the threads inside [`measure`].
    pub struct CountingAlloc;

    thread_local! {
        static ACTIVE: Cell<bool> = const { Cell::new(false) };
        /// Bytes allocated minus bytes freed since `measure` began (frees of older blocks
        /// make it negative).
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn active() -> bool {
        ACTIVE.try_with(Cell::get).unwrap_or(false)
    }

    fn grow(requested: usize, delta: isize) {
        if !active() {
            return;
        }
        LARGEST.set(LARGEST.get().max(requested));
        let live = LIVE.get() + delta;
        LIVE.set(live);
        PEAK.set(PEAK.get().max(live));
    }

    fn shrink(freed: usize) {
        if active() {
            LIVE.set(LIVE.get() - freed as isize);
        }
    }

    unsafe impl GlobalAlloc for CountingAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grow(layout.size(), layout.size() as isize);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grow(layout.size(), layout.size() as isize);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            shrink(layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                // While it copies, a moving realloc holds both blocks.
                grow(new_size, new_size as isize);
                shrink(layout.size());
            }
            p
        }
    }

    /// What one measured call allocated on its own thread.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AllocStats {
        /// The largest single allocation (or reallocation) requested, in bytes.
        pub largest: usize,
        /// The most bytes the call held at once, beyond what it started with.
        pub peak: usize,
    }

    /// Runs `f`, counting the allocations of this thread meanwhile. Other threads (other
    /// tests, the proptest runner's own bookkeeping outside `f`) do not count.
    pub fn measure<R>(f: impl FnOnce() -> R) -> (R, AllocStats) {
        /// Stops counting even if `f` panics (proptest catches the panic and goes on).
        struct Stop;
        impl Drop for Stop {
            fn drop(&mut self) {
                ACTIVE.set(false);
            }
        }
        LIVE.set(0);
        PEAK.set(0);
        LARGEST.set(0);
        ACTIVE.set(true);
        let stop = Stop;
        let result = f();
        drop(stop);
        let stats = AllocStats {
            largest: LARGEST.get(),
            peak: PEAK.get().max(0) as usize,
        };
        (result, stats)
    }
}

use alloc_meter::{measure, AllocStats};

/// The frame limit the decoder targets use: the default one (4 MiB + 65 KiB).
fn max_frame() -> usize {
    Limits::default().max_frame
}

/// Cases per decoder target.
fn decoder_cases() -> u32 {
    env_cases("RINGKV_FUZZ_CASES", 4_000)
}

/// Request sequences for the handler target.
fn handler_cases() -> u32 {
    env_cases("RINGKV_FUZZ_HANDLER_CASES", 100)
}

fn env_cases(var: &str, default: u32) -> u32 {
    match std::env::var(var) {
        Ok(v) => v
            .replace(['_', ','], "")
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Runs `test` on `cases` inputs of `strategy`; on a failure, panics with the (shrunk)
/// input. Prints the count and time.
fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: Debug,
{
    let config = Config {
        cases,
        // A failing input is printed; persisting it would need a source file path.
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    };
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    match runner.run(&strategy, test) {
        Ok(()) => eprintln!(
            "fuzz {name}: {cases} cases passed in {:.1?}",
            started.elapsed()
        ),
        Err(TestError::Fail(why, input)) => {
            panic!("fuzz {name} failed: {why}\nminimal input: {input:#?}")
        }
        Err(TestError::Abort(why)) => panic!("fuzz {name} aborted: {why}"),
    }
}

/// Strategies for every wire type, covering every variant (the `*_variant` functions match
/// without a wildcard, so a new variant does not compile until it is generated).
mod strategies {
    use super::*;

    /// Bytes of length `0..max`.
    pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> + Clone {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    pub fn position() -> impl Strategy<Value = Position> + Clone {
        prop_oneof![
            any::<[u8; 20]>().prop_map(Position),
            Just(Position::MIN),
            Just(Position::MAX),
        ]
    }

    pub fn range() -> impl Strategy<Value = KeyRange> + Clone {
        (position(), position()).prop_map(|(a, b)| KeyRange::new(a, b))
    }

    /// A node entry, usually valid (name, address and zone as the ring requires),
    /// sometimes not.
    pub fn node() -> impl Strategy<Value = NodeEntry> + Clone {
        prop_oneof![
            4 => ("[a-z][a-z0-9]{0,7}", 1u16..=u16::MAX)
                .prop_map(|(name, port)| NodeEntry::new(name, format!("127.0.0.1:{port}"))),
            1 => (".{0,10}", ".{0,12}", proptest::option::of(".{0,6}")).prop_map(
                |(name, addr, zone)| NodeEntry { name, addr, zone }
            ),
        ]
    }

    /// Metadata: usually valid ([`RingMetadata::new`]), sometimes whatever a peer may send.
    pub fn metadata() -> impl Strategy<Value = RingMetadata> + Clone {
        prop_oneof![
            4 => (any::<u64>(), proptest::collection::vec(node(), 0..5)).prop_map(
                |(version, nodes)| RingMetadata::new(version, nodes).unwrap_or(RingMetadata {
                    version,
                    ..RingMetadata::default()
                })
            ),
            1 => (
                any::<u64>(),
                proptest::collection::vec(node(), 0..4),
                any::<u8>(),
                proptest::collection::vec("[a-z]{1,3}", 0..2),
                proptest::collection::vec(any::<u16>(), 0..40),
            )
                .prop_map(|(version, nodes, replication, failed, chains)| RingMetadata {
                    version,
                    nodes,
                    replication,
                    failed,
                    chains,
                }),
        ]
    }

    /// Metadata as a peer without the ECS's key can send it: an encoded ring (or any bytes)
    /// with a junk signature.
    pub fn signed_metadata() -> impl Strategy<Value = SignedMetadata> + Clone {
        let signature = (
            any::<u16>(),
            bytes(16),
            proptest::collection::vec(bytes(16), 0..2),
        )
            .prop_map(
                |(scheme, signature, signer)| ringkv_wire::MetadataSignature {
                    scheme,
                    signature,
                    signer: signer.into_iter().map(serde_bytes::ByteBuf::from).collect(),
                },
            );
        prop_oneof![
            (metadata(), signature.clone()).prop_map(|(md, signature)| SignedMetadata {
                version: md.version,
                ring: std::sync::Arc::new(md.to_frame().expect("encodable")),
                signature: std::sync::Arc::new(signature),
            }),
            (any::<u64>(), bytes(64), signature).prop_map(|(version, bytes, signature)| {
                SignedMetadata {
                    version,
                    ring: std::sync::Arc::new(bytes),
                    signature: std::sync::Arc::new(signature),
                }
            }),
        ]
    }

    pub fn digest() -> impl Strategy<Value = GossipDigest> + Clone {
        let heartbeat =
            (0u32..8, any::<u64>()).prop_map(|(node, counter)| Heartbeat { node, counter });
        // Half the time a name a caller's certificate may carry, so digests are also served.
        let from = prop_oneof![".{0,10}", sender()];
        (
            from,
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(heartbeat, 0..6),
        )
            .prop_map(
                |(from, metadata_version, heartbeat, heartbeats)| GossipDigest {
                    from,
                    metadata_version,
                    heartbeat,
                    heartbeats,
                },
            )
    }

    pub fn move_id() -> impl Strategy<Value = MoveId> + Clone {
        (any::<u64>(), any::<u64>()).prop_map(|(change, target_version)| MoveId {
            change,
            target_version,
        })
    }

    pub fn entry(key: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = StorageEntry> + Clone {
        (
            key,
            proptest::option::of(bytes(48)),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(key, value, version, expires_at)| StorageEntry {
                key,
                value,
                version,
                expires_at,
            })
    }

    /// The parts a request body is made of, so the handler target can bias them.
    #[derive(Clone)]
    pub struct Parts {
        pub key: BoxedStrategy<Vec<u8>>,
        pub value: BoxedStrategy<Vec<u8>>,
        pub range: BoxedStrategy<KeyRange>,
        pub node: BoxedStrategy<NodeEntry>,
        pub metadata: BoxedStrategy<SignedMetadata>,
        pub move_id: BoxedStrategy<MoveId>,
        /// The Raft term of a `Fenced` request.
        pub term: BoxedStrategy<u64>,
    }

    impl Parts {
        /// Anything of each.
        pub fn any() -> Self {
            Self {
                key: bytes(40).boxed(),
                value: bytes(64).boxed(),
                range: range().boxed(),
                node: node().boxed(),
                metadata: signed_metadata().boxed(),
                move_id: move_id().boxed(),
                term: any::<u64>().boxed(),
            }
        }
    }

    /// Any request: now and then one of [`plain_body`] wrapped in a `Fenced` envelope (never
    /// two: the nested envelope does not decode, `ringkv_wire`'s unit tests).
    pub fn request_body(p: Parts) -> BoxedStrategy<RequestBody> {
        let term = p.term.clone();
        let plain = plain_body(p);
        prop_oneof![
            20 => plain.clone(),
            1 => (term, plain).prop_map(|(term, body)| RequestBody::Fenced {
                term,
                body: Box::new(body)
            }),
        ]
        .boxed()
    }

    /// Any request but `Fenced`.
    pub fn plain_body(p: Parts) -> BoxedStrategy<RequestBody> {
        prop_oneof![
            p.key.clone().prop_map(|key| RequestBody::Get { key }),
            (p.key.clone(), p.value.clone())
                .prop_map(|(key, value)| RequestBody::Put { key, value }),
            p.key.clone().prop_map(|key| RequestBody::Delete { key }),
            (p.key.clone(), p.value.clone(), expected()).prop_map(|(key, value, expected)| {
                RequestBody::PutIf {
                    key,
                    value,
                    expected,
                }
            }),
            (p.key.clone(), any::<u64>())
                .prop_map(|(key, version)| RequestBody::DeleteIf { key, version }),
            batch_keys(&p).prop_map(|keys| RequestBody::GetMany { keys }),
            proptest::collection::vec((p.key.clone(), p.value.clone()), 0..4).prop_map(|entries| {
                RequestBody::PutMany {
                    entries: entries
                        .into_iter()
                        .map(|(key, value)| ringkv_wire::KeyValue { key, value })
                        .collect(),
                }
            }),
            batch_keys(&p).prop_map(|keys| RequestBody::DeleteMany { keys }),
            (
                p.key.clone(),
                p.value.clone(),
                prop_oneof![0u64..3, any::<u64>()],
                proptest::option::of(expected())
            )
                .prop_map(|(key, value, ttl_ms, expected)| RequestBody::PutTtl {
                    key,
                    value,
                    ttl_ms,
                    expected,
                }),
            (p.key.clone(), prop_oneof![0u64..4, any::<u64>()])
                .prop_map(|(key, version)| RequestBody::Expire { key, version }),
            (
                prop_oneof![Just(Vec::new()), p.key.clone()],
                prop_oneof![Just(Vec::new()), p.key.clone()],
                prop_oneof![0u32..4, 1000u32..1100, any::<u32>()],
                any::<bool>()
            )
                .prop_map(|(from, prefix, limit, values)| RequestBody::Scan {
                    from,
                    prefix,
                    limit,
                    values
                }),
            Just(RequestBody::GetMetadata),
            Just(RequestBody::Status),
            Just(RequestBody::Start),
            Just(RequestBody::Stop),
            p.metadata
                .clone()
                .prop_map(|metadata| RequestBody::InstallMetadata { metadata }),
            (p.move_id.clone(), p.range.clone())
                .prop_map(|(id, range)| RequestBody::LockRange { id, range }),
            (p.move_id.clone(), p.range.clone())
                .prop_map(|(id, range)| RequestBody::AbortMove { id, range }),
            (p.move_id.clone(), p.range.clone(), sender())
                .prop_map(|(id, range, from)| RequestBody::PrepareReceive { id, range, from }),
            (p.move_id.clone(), p.range.clone(), p.node.clone())
                .prop_map(|(id, range, to)| RequestBody::TransferRange { id, range, to }),
            (
                p.move_id.clone(),
                p.range.clone(),
                p.node.clone(),
                any::<bool>()
            )
                .prop_map(|(id, range, to, last)| RequestBody::TransferDelta {
                    id,
                    range,
                    to,
                    last
                }),
            (
                p.move_id.clone(),
                proptest::collection::vec(entry(p.key.clone()), 0..5)
            )
                .prop_map(|(id, entries)| RequestBody::PutBatch { id, entries }),
            p.range
                .clone()
                .prop_map(|range| RequestBody::DeleteRange { range }),
            digest().prop_map(|digest| RequestBody::Gossip { digest }),
            prop_oneof![signed_metadata(), p.metadata.clone()]
                .prop_map(|metadata| RequestBody::GossipPush { metadata }),
            chain_write(&p).prop_map(|write| RequestBody::Replicate { write }),
            (any::<u32>(), proptest::option::of(any::<u64>()))
                .prop_map(|(millis, echo)| RequestBody::Lease { millis, echo }),
            proptest::collection::vec(chain_write(&p), 0..3)
                .prop_map(|writes| RequestBody::ReplicateBatch { writes }),
        ]
        .boxed()
    }

    /// The keys of a client batch.
    pub fn batch_keys(p: &Parts) -> impl Strategy<Value = Vec<serde_bytes::ByteBuf>> + Clone {
        proptest::collection::vec(p.key.clone().prop_map(serde_bytes::ByteBuf::from), 0..4)
    }

    /// A condition of a `PutIf`: absent, or a version (small ones too, so that some hold).
    pub fn expected() -> impl Strategy<Value = ringkv_wire::Expected> + Clone {
        prop_oneof![
            Just(ringkv_wire::Expected::Absent),
            prop_oneof![0u64..4, any::<u64>()].prop_map(ringkv_wire::Expected::Version),
        ]
    }

    /// A chain write of the parts' keys and values.
    pub fn chain_write(p: &Parts) -> impl Strategy<Value = ringkv_wire::ChainWrite> + Clone {
        (
            p.key.clone(),
            proptest::option::of(p.value.clone()),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(key, value, version, expires_at, origin, seq)| {
                ringkv_wire::ChainWrite {
                    key,
                    value,
                    version,
                    expires_at,
                    origin,
                    seq,
                }
            })
    }

    /// Names a move's sender (and a peer's certificate) may have.
    pub fn sender() -> impl Strategy<Value = String> + Clone {
        proptest::sample::select(vec!["p1", "p2", "mallory"]).prop_map(String::from)
    }

    pub fn request() -> impl Strategy<Value = Request> {
        (any::<u64>(), request_body(Parts::any())).prop_map(|(v, body)| Request::new(v, body))
    }

    /// Index of `body`'s variant (the strategy above generates each).
    pub fn request_variant(body: &RequestBody) -> usize {
        match body {
            RequestBody::Get { .. } => 0,
            RequestBody::Put { .. } => 1,
            RequestBody::Delete { .. } => 2,
            RequestBody::GetMetadata => 3,
            RequestBody::Status => 4,
            RequestBody::Start => 5,
            RequestBody::Stop => 6,
            RequestBody::InstallMetadata { .. } => 7,
            RequestBody::LockRange { .. } => 8,
            RequestBody::AbortMove { .. } => 9,
            RequestBody::PrepareReceive { .. } => 10,
            RequestBody::TransferRange { .. } => 11,
            RequestBody::TransferDelta { .. } => 12,
            RequestBody::PutBatch { .. } => 13,
            RequestBody::DeleteRange { .. } => 14,
            RequestBody::Gossip { .. } => 15,
            RequestBody::GossipPush { .. } => 16,
            RequestBody::Replicate { .. } => 17,
            RequestBody::Lease { .. } => 18,
            RequestBody::ReplicateBatch { .. } => 19,
            RequestBody::Fenced { .. } => 20,
            RequestBody::PutIf { .. } => 21,
            RequestBody::DeleteIf { .. } => 22,
            RequestBody::GetMany { .. } => 23,
            RequestBody::PutMany { .. } => 24,
            RequestBody::DeleteMany { .. } => 25,
            RequestBody::PutTtl { .. } => 26,
            RequestBody::Expire { .. } => 27,
            RequestBody::Scan { .. } => 28,
        }
    }
    pub const REQUEST_VARIANTS: usize = 29;

    pub fn error_kind() -> impl Strategy<Value = ErrorKind> + Clone {
        prop_oneof![
            Just(ErrorKind::Malformed),
            Just(ErrorKind::FrameTooLarge),
            Just(ErrorKind::EmptyKey),
            Just(ErrorKind::KeyTooLarge),
            Just(ErrorKind::ValueTooLarge),
            Just(ErrorKind::Forbidden),
            Just(ErrorKind::Storage),
            Just(ErrorKind::Peer),
            Just(ErrorKind::InvalidState),
            Just(ErrorKind::Unauthenticated),
            Just(ErrorKind::Indeterminate),
            Just(ErrorKind::StaleTerm),
            Just(ErrorKind::BatchTooLarge),
            Just(ErrorKind::InvalidTtl),
        ]
    }

    pub fn liveness() -> impl Strategy<Value = Liveness> + Clone {
        prop_oneof![
            Just(Liveness::Alive),
            Just(Liveness::Suspected),
            Just(Liveness::Dead)
        ]
    }

    pub fn node_status() -> impl Strategy<Value = NodeStatus> + Clone {
        let peer = (".{0,8}", liveness(), any::<u64>(), any::<u64>()).prop_map(
            |(name, liveness, heartbeat, silent_ms)| PeerLiveness {
                name,
                liveness,
                heartbeat,
                silent_ms,
            },
        );
        (
            (".{0,8}", ".{0,12}", any::<bool>()),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            ),
            proptest::collection::vec(range(), 0..3),
            proptest::collection::vec(peer, 0..3),
        )
            .prop_map(
                |(
                    (name, addr, running),
                    (metadata_version, keys, writes, write_commits, metadata_refused),
                    locked,
                    peers,
                )| NodeStatus {
                    name,
                    addr,
                    running,
                    metadata_version,
                    keys,
                    writes,
                    write_commits,
                    hop_batches: writes / 3,
                    hop_writes: writes / 2,
                    metadata_refused,
                    locked,
                    peers,
                    ecs_term: keys / 3,
                },
            )
    }

    pub fn reply() -> impl Strategy<Value = Reply> {
        let body = prop_oneof![
            (bytes(64), any::<u64>())
                .prop_map(|(value, version)| ReplyBody::Value { value, version }),
            any::<u64>().prop_map(|version| ReplyBody::Applied { version }),
            proptest::option::of(any::<u64>()).prop_map(|current| ReplyBody::Conflict { current }),
            (
                proptest::collection::vec(
                    prop_oneof![
                        Just(ringkv_wire::KeyReply::NotFound),
                        Just(ringkv_wire::KeyReply::Deferred),
                        any::<bool>().prop_map(|created| ringkv_wire::KeyReply::PutOk { created }),
                    ],
                    0..3
                ),
                proptest::option::of(signed_metadata())
            )
                .prop_map(|(answers, metadata)| ReplyBody::Many { answers, metadata }),
            Just(ReplyBody::NotFound),
            any::<bool>().prop_map(|created| ReplyBody::PutOk { created }),
            Just(ReplyBody::Deleted),
            proptest::option::of(signed_metadata())
                .prop_map(|metadata| ReplyBody::NotResponsible { metadata }),
            Just(ReplyBody::WriteLocked),
            Just(ReplyBody::Stopped),
            (error_kind(), ".{0,16}")
                .prop_map(|(kind, message)| ReplyBody::Error { kind, message }),
            proptest::option::of(signed_metadata()).prop_map(ReplyBody::Metadata),
            node_status().prop_map(|s| ReplyBody::Status(Box::new(s))),
            Just(ReplyBody::Ok),
            any::<bool>().prop_map(|adopted| ReplyBody::Installed { adopted }),
            (any::<u64>(), any::<u64>()).prop_map(|(entries, bytes)| ReplyBody::Transferred(
                TransferStats { entries, bytes }
            )),
            any::<u64>().prop_map(ReplyBody::Count),
            any::<u64>().prop_map(|stamp| ReplyBody::Leased { stamp }),
            Just(ReplyBody::Leaving),
            proptest::collection::vec(Just(ReplyBody::Ok), 0..3).prop_map(ReplyBody::Replicated),
            (digest(), proptest::option::of(signed_metadata()))
                .prop_map(|(digest, metadata)| ReplyBody::Gossip { digest, metadata }),
        ];
        (any::<u64>(), body).prop_map(|(v, body)| Reply::new(v, body))
    }

    pub fn admin_request() -> impl Strategy<Value = AdminRequest> {
        prop_oneof![
            (".{0,10}", ".{0,16}").prop_map(|(name, addr)| AdminRequest::AddNode {
                name,
                addr,
                zone: None
            }),
            ".{0,10}".prop_map(|name| AdminRequest::RemoveNode { name }),
            Just(AdminRequest::Ring),
            Just(AdminRequest::Status),
            Just(AdminRequest::Start),
            Just(AdminRequest::Stop),
            (
                prop_oneof![
                    Just(RaftRpcKind::AppendEntries),
                    Just(RaftRpcKind::Vote),
                    Just(RaftRpcKind::InstallSnapshot),
                ],
                proptest::collection::vec(any::<u8>(), 0..64),
            )
                .prop_map(|(kind, payload)| AdminRequest::Raft(RaftRpc { kind, payload })),
            Just(AdminRequest::Group),
            (any::<u64>(), ".{0,10}", ".{0,12}")
                .prop_map(|(id, name, addr)| AdminRequest::AddEcsMember { id, name, addr }),
            any::<u64>().prop_map(|id| AdminRequest::RemoveEcsMember { id }),
        ]
    }

    pub fn admin_reply() -> impl Strategy<Value = AdminReply> {
        let report = (
            (".{0,8}", ".{0,12}"),
            (any::<u32>(), any::<u32>(), any::<u32>()),
            proptest::option::of(node_status()),
            proptest::option::of(".{0,12}"),
            proptest::option::of(liveness()),
        )
            .prop_map(
                |((name, addr), (heads, tails, copies), status, error, liveness)| NodeReport {
                    name,
                    addr,
                    share: ringkv_wire::NodeShare {
                        heads,
                        tails,
                        copies,
                    },
                    status,
                    error,
                    liveness,
                },
            );
        let moved = (
            (
                proptest::collection::vec(".{0,8}", 0..3),
                proptest::collection::vec(".{0,8}", 0..3),
            ),
            any::<u32>(),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        )
            .prop_map(
                |((from, to), copies, (entries, bytes, locked_ms, total_ms))| MoveReport {
                    from,
                    to,
                    copies,
                    entries,
                    bytes,
                    locked_ms,
                    total_ms,
                },
            );
        prop_oneof![
            metadata().prop_map(AdminReply::Ring),
            (metadata(), proptest::option::of(moved))
                .prop_map(|(metadata, moved)| AdminReply::Changed { metadata, moved }),
            (metadata(), proptest::collection::vec(report, 0..3)).prop_map(|(metadata, nodes)| {
                AdminReply::Status {
                    metadata,
                    nodes,
                    ranges: vec![],
                }
            }),
            ".{0,16}".prop_map(AdminReply::Done),
            ".{0,16}".prop_map(AdminReply::Error),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(AdminReply::Raft),
            proptest::option::of(".{0,12}").prop_map(|leader| AdminReply::NotLeader { leader }),
            Just(AdminReply::Group(None)),
            (any::<u64>(), any::<u64>(), ".{0,8}", ".{0,12}").prop_map(
                |(term, applied, name, addr)| AdminReply::Group(Some(ringkv_wire::GroupReport {
                    this: 1,
                    leader: Some(1),
                    term,
                    applied,
                    members: vec![ringkv_wire::GroupMember {
                        id: 1,
                        name,
                        addr,
                        voter: true,
                    }],
                    failover_after_ms: applied / 2,
                }))
            ),
        ]
    }

    /// One change to a frame.
    #[derive(Debug, Clone)]
    pub enum Mutation {
        /// Flip one bit.
        Flip { at: Index, bit: u8 },
        /// Set one byte.
        Set { at: Index, byte: u8 },
        /// Insert bytes.
        Insert { at: Index, bytes: Vec<u8> },
        /// Delete up to `len` bytes.
        Delete { at: Index, len: usize },
        /// Cut the frame.
        Truncate { at: Index },
        /// Replace one byte with the postcard varint of `value`: where that byte was a
        /// length (of a byte string, a string or a sequence), the frame now claims `value`.
        Length { at: Index, value: u64 },
        /// Overwrite the frame header (the payload length).
        Header { value: u32 },
    }

    fn huge() -> impl Strategy<Value = u64> + Clone {
        prop_oneof![
            Just(u64::MAX),
            Just(u64::from(u32::MAX)),
            Just(1 << 31),
            Just(1 << 24),
            Just(1 << 20),
            0u64..4096,
            any::<u64>(),
        ]
    }

    pub fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
            2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
            1 => (any::<Index>(), bytes(8)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
            1 => (any::<Index>(), 1usize..8).prop_map(|(at, len)| Mutation::Delete { at, len }),
            1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
            3 => (any::<Index>(), huge()).prop_map(|(at, value)| Mutation::Length { at, value }),
            1 => prop_oneof![any::<u32>(), Just(u32::MAX), 0u32..256]
                .prop_map(|value| Mutation::Header { value }),
        ]
    }

    /// The postcard (LEB128) varint of `value`.
    pub fn varint(mut value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    pub fn apply(frame: &mut Vec<u8>, mutation: &Mutation) {
        let len = frame.len();
        // An index into the frame, or its end for an empty frame.
        let at = |i: &Index| if len == 0 { 0 } else { i.index(len) };
        match mutation {
            Mutation::Flip { at: i, bit } if len > 0 => frame[at(i)] ^= 1 << bit,
            Mutation::Set { at: i, byte } if len > 0 => frame[at(i)] = *byte,
            Mutation::Insert { at: i, bytes } => {
                let at = at(i);
                frame.splice(at..at, bytes.iter().copied());
            }
            Mutation::Delete { at: i, len: n } if len > 0 => {
                let at = at(i);
                frame.drain(at..(at + n).min(len));
            }
            Mutation::Truncate { at: i } => frame.truncate(at(i)),
            Mutation::Length { at: i, value } => {
                let at = at(i);
                frame.splice(at..(at + 1).min(len), varint(*value));
            }
            Mutation::Header { value } if len >= codec::FRAME_HEADER_LEN => {
                frame[..codec::FRAME_HEADER_LEN].copy_from_slice(&value.to_le_bytes())
            }
            _ => {}
        }
    }

    /// A valid frame of a message from `message`, changed by 1..=4 mutations.
    pub fn mutated<T: Serialize + Debug>(
        message: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = Vec<u8>> {
        (message, proptest::collection::vec(mutation(), 1..=4)).prop_map(|(msg, mutations)| {
            let mut frame = codec::encode(&msg, usize::MAX >> 1).expect("encodable");
            for m in &mutations {
                apply(&mut frame, m);
            }
            frame
        })
    }

    /// Arbitrary bytes, mostly short, sometimes behind a header that matches their length.
    pub fn arbitrary_frame() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            bytes(64),
            bytes(1024),
            bytes(1024).prop_map(|payload| {
                let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
                frame.extend(payload);
                frame
            }),
        ]
    }
}

/// Room for what decoding allocates besides the message: the error message of a failure, a
/// small string or two.
const ALLOC_SLACK: usize = 4096;

/// Bytes the decoder may allocate per input byte. serde preallocates a sequence's buffer
/// from its claimed length, which postcard passes on only when at least that many bytes are
/// left (`SeqAccess::size_hint`), so a claimed length costs at most one element per input
/// byte: `size_of` of the largest sequence element, [`NodeReport`] (under 512 bytes, checked
/// in `element_sizes_fit_the_bound`). A sequence that really holds its elements grows by
/// doubling, with both buffers live during a moving realloc.
const ALLOC_PER_BYTE: usize = 512;

/// Most a decode of `n` input bytes may allocate: [`ALLOC_PER_BYTE`] per byte plus
/// [`ALLOC_SLACK`], whatever lengths the bytes claim.
fn alloc_bound(n: usize) -> usize {
    ALLOC_PER_BYTE * n + ALLOC_SLACK
}

/// The worst ratio of allocation to input a target saw (for the printed report).
#[derive(Default)]
struct Worst(std::sync::Mutex<(f64, usize, AllocStats)>);

impl Worst {
    fn record(&self, n: usize, stats: AllocStats) {
        let ratio = stats.peak.max(stats.largest) as f64 / n.max(1) as f64;
        let mut worst = self.0.lock().expect("worst");
        if ratio > worst.0 {
            *worst = (ratio, n, stats);
        }
    }

    fn report(&self, name: &str) {
        let (ratio, n, stats) = *self.0.lock().expect("worst");
        eprintln!(
            "fuzz {name}: worst allocation {ratio:.1} bytes per input byte \
             ({n}-byte input: largest single {} B, peak live {} B)",
            stats.largest, stats.peak
        );
    }
}

/// Checks one measured decode of `n` bytes against [`alloc_bound`].
fn check_alloc(
    what: &str,
    n: usize,
    stats: AllocStats,
    worst: &Worst,
) -> Result<(), TestCaseError> {
    worst.record(n, stats);
    let bound = alloc_bound(n);
    prop_assert!(
        stats.largest <= bound && stats.peak <= bound,
        "decoding {what} from {n} bytes allocated {stats:?}, over the bound of {bound} bytes"
    );
    Ok(())
}

/// The decoder targets.
mod decoder {
    use super::*;

    /// Decodes `bytes` as a payload and as a frame of `T`, under the allocation meter; what
    /// decodes must re-encode and decode to itself.
    pub fn check<T>(what: &str, bytes: &[u8], worst: &Worst) -> Result<(), TestCaseError>
    where
        T: DeserializeOwned + Serialize + PartialEq + Debug,
    {
        let (payload, stats) = measure(|| codec::decode::<T>(bytes));
        check_alloc(what, bytes.len(), stats, worst)?;
        if let Ok(msg) = payload {
            round_trips(&msg)?;
        }
        let (frame, stats) = measure(|| codec::decode_frame::<T>(bytes, max_frame()));
        check_alloc(what, bytes.len(), stats, worst)?;
        match frame {
            Ok(Some((msg, used))) => {
                prop_assert!(used <= bytes.len() && used >= codec::FRAME_HEADER_LEN);
                round_trips(&msg)?;
            }
            Ok(None) => {
                // Incomplete: only if the header's length is more than the bytes hold.
                if let Some(header) = bytes.get(..codec::FRAME_HEADER_LEN) {
                    let len = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
                    prop_assert!(codec::FRAME_HEADER_LEN + len > bytes.len());
                }
            }
            Err(_) => {}
        }
        Ok(())
    }

    fn round_trips<T>(msg: &T) -> Result<(), TestCaseError>
    where
        T: DeserializeOwned + Serialize + PartialEq + Debug,
    {
        let frame = codec::encode(msg, usize::MAX >> 1)
            .map_err(|e| TestCaseError::fail(format!("decoded {msg:?} does not encode: {e}")))?;
        let back: T = codec::decode(&frame[codec::FRAME_HEADER_LEN..])
            .map_err(|e| TestCaseError::fail(format!("re-encoded {msg:?} does not decode: {e}")))?;
        prop_assert_eq!(&back, msg);
        Ok(())
    }

    /// [`RingMetadata::from_frame`] on `bytes`: no panic, bounded allocation, and what it
    /// accepts is valid and round-trips.
    pub fn check_metadata(bytes: &[u8], worst: &Worst) -> Result<(), TestCaseError> {
        let (decoded, stats) = measure(|| RingMetadata::from_frame(bytes));
        check_alloc("RingMetadata", bytes.len(), stats, worst)?;
        if let Ok(md) = decoded {
            prop_assert!(md.validate().is_ok());
            let frame = md.to_frame().expect("valid metadata encodes");
            prop_assert_eq!(RingMetadata::from_frame(&frame), Ok(md));
        }
        Ok(())
    }

    /// Every decoder on the same bytes.
    pub fn check_all(bytes: &[u8], worst: &Worst) -> Result<(), TestCaseError> {
        check::<Request>("Request", bytes, worst)?;
        check::<Reply>("Reply", bytes, worst)?;
        check::<AdminRequest>("AdminRequest", bytes, worst)?;
        check::<AdminReply>("AdminReply", bytes, worst)?;
        check_metadata(bytes, worst)
    }
}

#[test]
fn decoders_survive_arbitrary_bytes() {
    let worst = Worst::default();
    run(
        "arbitrary bytes",
        decoder_cases(),
        strategies::arbitrary_frame(),
        |bytes| decoder::check_all(&bytes, &worst),
    );
    worst.report("arbitrary bytes");
}

#[test]
fn request_decoder_survives_mutated_frames() {
    let worst = Worst::default();
    run(
        "mutated Request",
        decoder_cases(),
        strategies::mutated(strategies::request()),
        |frame| decoder::check::<Request>("Request", &frame, &worst),
    );
    worst.report("mutated Request");
}

#[test]
fn reply_decoder_survives_mutated_frames() {
    let worst = Worst::default();
    run(
        "mutated Reply",
        decoder_cases(),
        strategies::mutated(strategies::reply()),
        |frame| decoder::check::<Reply>("Reply", &frame, &worst),
    );
    worst.report("mutated Reply");
}

#[test]
fn admin_decoders_survive_mutated_frames() {
    let worst = Worst::default();
    let frames = prop_oneof![
        strategies::mutated(strategies::admin_request()),
        strategies::mutated(strategies::admin_reply()),
    ];
    run(
        "mutated AdminRequest/AdminReply",
        decoder_cases(),
        frames,
        |frame| {
            decoder::check::<AdminRequest>("AdminRequest", &frame, &worst)?;
            decoder::check::<AdminReply>("AdminReply", &frame, &worst)
        },
    );
    worst.report("mutated AdminRequest/AdminReply");
}

#[test]
fn metadata_decoder_survives_mutated_frames() {
    let worst = Worst::default();
    let frames = (
        strategies::metadata(),
        proptest::collection::vec(strategies::mutation(), 1..=4),
    )
        .prop_map(|(md, mutations)| {
            let mut frame = md.to_frame().expect("encodable");
            for m in &mutations {
                strategies::apply(&mut frame, m);
            }
            frame
        });
    run("mutated RingMetadata", decoder_cases(), frames, |frame| {
        decoder::check_metadata(&frame, &worst)
    });
    worst.report("mutated RingMetadata");
}

#[test]
fn element_sizes_fit_the_bound() {
    use std::mem::size_of;
    for (name, size) in [
        ("NodeReport", size_of::<NodeReport>()),
        ("NodeEntry", size_of::<NodeEntry>()),
        ("StorageEntry", size_of::<StorageEntry>()),
        ("PeerLiveness", size_of::<PeerLiveness>()),
        ("Heartbeat", size_of::<Heartbeat>()),
        ("KeyRange", size_of::<KeyRange>()),
    ] {
        assert!(size <= ALLOC_PER_BYTE, "{name} is {size} bytes");
    }
}

#[test]
fn request_strategy_covers_every_variant() {
    let mut runner = TestRunner::deterministic();
    let strategy = strategies::request();
    let mut seen = [false; strategies::REQUEST_VARIANTS];
    for _ in 0..2_000 {
        let request =
            proptest::strategy::ValueTree::current(&strategy.new_tree(&mut runner).expect("value"));
        seen[strategies::request_variant(&request.body)] = true;
    }
    assert!(seen.iter().all(|s| *s), "variants not generated: {seen:?}");
}

/// The handler target. Everything that touches the node's API is in this module (and
/// [`handlers::handle`] is the one call into `Node::handle`), so that a change of that API
/// (a peer identity instead of a role, signed metadata) is adapted here alone.
mod handlers {
    use std::time::Duration;

    use std::sync::Arc;

    use ringkv_certs::{PeerIdentity, Role};
    use ringkv_node::Node;
    use ringkv_transport::RingSigner;

    use super::common::{free_port, Certs, TestNode};
    use super::strategies::{self, Parts};
    use super::*;

    /// The node's limits: small, so that oversized keys and values are cheap to generate.
    fn limits() -> Limits {
        Limits::new(32, 256)
    }

    /// Longest a handler may take. Transfers go to addresses that fail at once, so nothing
    /// legitimately waits on a timeout.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// The one call into the node: `request` from a peer whose certificate has `role`.
    pub async fn handle(node: &Node, peer: &PeerIdentity, request: Request) -> Reply {
        node.handle(peer, request).await
    }

    /// Any role, the admin (who may send everything) most often.
    fn peer() -> impl Strategy<Value = PeerIdentity> {
        let role = prop_oneof![
            1 => Just(Role::Client),
            2 => Just(Role::Node),
            1 => Just(Role::Admin),
            2 => Just(Role::Ecs),
        ];
        (role, strategies::sender()).prop_map(|(role, name)| PeerIdentity { role, name })
    }

    /// Two peers that never answer (nothing listens on ports 1 and 2).
    fn peers() -> [NodeEntry; 2] {
        [
            NodeEntry::new("p1", "127.0.0.1:1"),
            NodeEntry::new("p2", "127.0.0.1:2"),
        ]
    }

    /// Version 2 of a ring of this node and [`peers`]: their ranges are ones this node may
    /// prepare to receive, receive batches for and delete.
    fn trio(me: &NodeEntry) -> RingMetadata {
        let [p1, p2] = peers();
        RingMetadata::new(2, vec![me.clone(), p1, p2]).expect("valid ring")
    }

    /// Parts biased towards what this node has: a few keys (so that puts, gets, deletes and
    /// transfers meet), its own range and position, metadata that includes it, transfer
    /// targets that answer or fail at once.
    fn parts(me: NodeEntry, signer: Arc<RingSigner>) -> Parts {
        let key = prop_oneof![
            6 => "[a-d]{1,2}".prop_map(String::into_bytes),
            1 => Just(Vec::new()),
            1 => strategies::bytes(40),
        ]
        .boxed();
        let value = prop_oneof![
            6 => strategies::bytes(16),
            1 => strategies::bytes(300),
        ]
        .boxed();
        let trio = trio(&me);
        let own = trio.held_by(&me.name);
        let mine = own[0].end;
        let foreign: Vec<KeyRange> = peers().iter().flat_map(|p| trio.held_by(&p.name)).collect();
        let range = prop_oneof![
            2 => strategies::range(),
            1 => Just(KeyRange::new(mine, mine)),
            1 => strategies::position().prop_map(move |p| KeyRange::new(p, mine)),
            2 => proptest::sample::select(own),
            3 => proptest::sample::select(foreign),
        ]
        .boxed();
        // Transfer targets fail at once (port 0 cannot be dialled, "noport" is no address):
        // a transfer scans, batches and fails to send without waiting on a timeout. A
        // transfer to a live node is covered by tests/moves.rs; one to this node itself
        // would leave a connection that delays every shutdown by seconds.
        let to = prop_oneof![
            Just(NodeEntry::new("zero", "127.0.0.1:0")),
            Just(NodeEntry {
                name: "noport".into(),
                addr: "noport".into(),
                zone: None,
            }),
        ]
        .boxed();
        let with_me = (
            0u64..10,
            proptest::collection::vec(strategies::node(), 0..3),
        )
            .prop_map(move |(version, mut nodes)| {
                nodes.push(me.clone());
                RingMetadata::new(version, nodes.clone()).unwrap_or(RingMetadata {
                    version,
                    ..RingMetadata::default()
                })
            });
        // Mostly signed by the ECS (so installs and gossip do adopt), sometimes forged.
        let ring = prop_oneof![
            2 => with_me,
            2 => (0u64..10).prop_map(move |version| RingMetadata { version, ..trio.clone() }),
            1 => strategies::metadata(),
        ];
        let metadata = prop_oneof![
            4 => ring.prop_filter_map("not a valid ring", move |md| signer.sign(&md).ok()),
            1 => strategies::signed_metadata(),
        ]
        .boxed();
        let move_id = (0u64..2, 0u64..6)
            .prop_map(|(change, target_version)| MoveId {
                change,
                target_version,
            })
            .boxed();
        // Terms that meet: older, equal and newer than the node's (0 is an unfenced one's).
        let term = (0u64..4).boxed();
        Parts {
            key,
            value,
            range,
            node: to,
            metadata,
            move_id,
            term,
        }
    }

    /// A request's bytes: usually a valid frame, sometimes a mutated one, sometimes noise.
    fn request_bytes(me: NodeEntry, signer: Arc<RingSigner>) -> impl Strategy<Value = Vec<u8>> {
        let parts = parts(me, signer);
        let data = prop_oneof![
            parts.key.clone().prop_map(|key| RequestBody::Get { key }),
            (parts.key.clone(), parts.value.clone())
                .prop_map(|(key, value)| RequestBody::Put { key, value }),
            parts
                .key
                .clone()
                .prop_map(|key| RequestBody::Delete { key }),
        ];
        let body = prop_oneof![1 => data, 2 => strategies::request_body(parts)];
        let request = (0u64..10, body).prop_map(|(v, body)| Request::new(v, body));
        prop_oneof![
            8 => request.clone().prop_map(|r| codec::encode(&r, usize::MAX >> 1).expect("encodable")),
            2 => strategies::mutated(request),
            1 => strategies::arbitrary_frame(),
        ]
    }

    /// Whether `reply` is an answer `body` may get (ARCHITECTURE.md §3) from a node whose
    /// disk works.
    fn fits(body: &RequestBody, reply: &ReplyBody) -> bool {
        use ReplyBody as R;
        let refusal = |kind: ErrorKind| kind != ErrorKind::Storage && kind != ErrorKind::Forbidden;
        let refused = matches!(reply, R::Error { kind, .. } if refusal(*kind));
        let client =
            |ok: bool| ok || refused || matches!(reply, R::NotResponsible { .. } | R::Stopped);
        // A batch: one answer per key, each one the key alone may get, and the node's ring
        // only when some key is not the node's.
        use ringkv_wire::KeyReply as K;
        let batch = |n: usize, ok: &dyn Fn(&K) -> bool| match reply {
            R::Many { answers, metadata } => {
                answers.len() == n
                    && answers.iter().all(|a| {
                        ok(a)
                            || matches!(a, K::NotResponsible | K::Stopped)
                            || matches!(a, K::Error { kind, .. } if refusal(*kind))
                    })
                    && (metadata.is_none() || answers.contains(&K::NotResponsible))
            }
            _ => false,
        };
        match body {
            RequestBody::Get { .. } => client(matches!(reply, R::Value { .. } | R::NotFound)),
            RequestBody::GetMany { keys } => batch(keys.len(), &|a| {
                matches!(a, K::Value { .. } | K::NotFound | K::Deferred)
            }),
            RequestBody::PutMany { entries } => batch(entries.len(), &|a| {
                matches!(a, K::PutOk { .. } | K::WriteLocked)
            }),
            RequestBody::DeleteMany { keys } => batch(keys.len(), &|a| {
                matches!(a, K::Deleted | K::NotFound | K::WriteLocked)
            }),
            RequestBody::PutIf { .. } | RequestBody::DeleteIf { .. } => client(matches!(
                reply,
                R::Applied { .. } | R::Conflict { .. } | R::WriteLocked
            )),
            RequestBody::Put { .. } | RequestBody::PutTtl { expected: None, .. } => {
                client(matches!(reply, R::PutOk { .. } | R::WriteLocked))
            }
            RequestBody::PutTtl { .. } => client(matches!(
                reply,
                R::Applied { .. } | R::Conflict { .. } | R::WriteLocked
            )),
            RequestBody::Scan { limit, .. } => client(
                matches!(reply, R::ScanPage { entries, .. } if entries.len() <= *limit as usize)
                    || matches!(reply, R::WriteLocked),
            ),
            RequestBody::Expire { .. } => client(matches!(
                reply,
                R::Deleted | R::Applied { .. } | R::Conflict { .. } | R::WriteLocked
            )),
            RequestBody::Delete { .. } => {
                client(matches!(reply, R::Deleted | R::NotFound | R::WriteLocked))
            }
            RequestBody::GetMetadata => matches!(reply, R::Metadata(_)),
            RequestBody::Status => matches!(reply, R::Status(_)),
            RequestBody::Start | RequestBody::Stop => matches!(reply, R::Ok),
            RequestBody::InstallMetadata { .. } => refused || matches!(reply, R::Installed { .. }),
            RequestBody::LockRange { .. }
            | RequestBody::AbortMove { .. }
            | RequestBody::PrepareReceive { .. }
            | RequestBody::PutBatch { .. }
            | RequestBody::GossipPush { .. } => refused || matches!(reply, R::Ok),
            RequestBody::Lease { .. } => refused || matches!(reply, R::Leased { .. } | R::Leaving),
            RequestBody::ReplicateBatch { writes } => {
                // One answer per write, each one a Replicate may get (a refusal included),
                // or a refusal of the whole batch (another version, no lease).
                refused
                    || matches!(reply, R::NotResponsible { .. } | R::Stopped)
                    || matches!(reply, R::Replicated(answers) if answers.len() == writes.len()
                        && answers.iter().all(|a| matches!(a,
                            R::Ok | R::NotResponsible { .. } | R::Stopped | R::Error { .. })))
            }
            RequestBody::Replicate { .. } => {
                refused || matches!(reply, R::Ok | R::NotResponsible { .. } | R::Stopped)
            }
            RequestBody::TransferRange { .. } | RequestBody::TransferDelta { .. } => {
                refused || matches!(reply, R::Transferred(_))
            }
            RequestBody::DeleteRange { .. } => refused || matches!(reply, R::Count(_)),
            RequestBody::Gossip { .. } => refused || matches!(reply, R::Gossip { .. }),
            // Whatever its body may get (a stale term is checked by `check_reply`).
            RequestBody::Fenced { body, .. } => fits(body, reply),
        }
    }

    /// Checks one answer; `seen` is the ECS term the node had seen before the request.
    fn check_reply(
        node: &Node,
        peer: &PeerIdentity,
        request: &Request,
        reply: &Reply,
        seen: u64,
    ) -> Result<(), TestCaseError> {
        let role = &peer.role;
        let allowed = ringkv_node::request::allowed(peer.role, &request.body);
        let forbidden = matches!(
            reply.body,
            ReplyBody::Error {
                kind: ErrorKind::Forbidden,
                ..
            }
        );
        // Forbidden exactly when the role may not send the request, or (for the requests
        // checked against the caller's name) the certificate name does not fit.
        let checks_name = matches!(
            request.body,
            RequestBody::PutBatch { .. }
                | RequestBody::Gossip { .. }
                | RequestBody::Replicate { .. }
        );
        prop_assert!(
            forbidden != allowed || (allowed && checks_name),
            "{:?} from {:?}: {:?}",
            request,
            peer,
            reply
        );
        // Term fencing: a request of the ECS (term 0 unless fenced) older than the highest
        // term the node had seen is refused, and a fenced one of term 0 (no leader has it),
        // and only those; an admitted newer term becomes the highest seen, and nothing else
        // moves it.
        let stale = matches!(
            reply.body,
            ReplyBody::Error {
                kind: ErrorKind::StaleTerm,
                ..
            }
        );
        let from_ecs = allowed && peer.role == Role::Ecs;
        let term = request.body.term().unwrap_or(0);
        let fenced_zero = matches!(request.body, RequestBody::Fenced { term: 0, .. });
        prop_assert_eq!(
            stale,
            from_ecs && (term < seen || fenced_zero),
            "{:?} from {:?} at term {}: {:?}",
            request,
            peer,
            seen,
            reply
        );
        let raised = if from_ecs && !stale {
            seen.max(term)
        } else {
            seen
        };
        prop_assert_eq!(node.ecs_term(), raised, "{:?} from {:?}", request, peer);
        prop_assert!(
            forbidden || stale || fits(&request.body, &reply.body),
            "{:?} from {} got {:?}",
            request,
            role,
            reply
        );
        prop_assert_eq!(reply.metadata_version, node.metadata_version());
        // The node hands out only the signed metadata it adopted (its authority verified it).
        let held = node.view().signed.clone();
        match &reply.body {
            ReplyBody::Metadata(md) | ReplyBody::NotResponsible { metadata: md } => {
                prop_assert_eq!(md, &held, "metadata sent is not the node's")
            }
            ReplyBody::Gossip {
                metadata: Some(md), ..
            } => prop_assert_eq!(
                Some(md),
                held.as_ref(),
                "gossiped metadata is not the node's"
            ),
            ReplyBody::Value { value, .. } => prop_assert!(value.len() <= limits().max_value),
            _ => {}
        }
        let frame = codec::encode(reply, limits().max_frame)
            .map_err(|e| TestCaseError::fail(format!("reply {reply:?} does not fit: {e}")))?;
        let back: Reply = codec::decode(&frame[codec::FRAME_HEADER_LEN..])
            .map_err(|e| TestCaseError::fail(format!("reply does not decode: {e}")))?;
        prop_assert_eq!(&back, reply);
        Ok(())
    }

    /// Runs one sequence against a fresh node, checking every answer. Returns the request
    /// kind and whether it was served (not refused) of each request handled.
    async fn run_sequence(
        node: &Node,
        sequence: Vec<(PeerIdentity, Vec<u8>)>,
    ) -> Result<Vec<(usize, bool)>, TestCaseError> {
        let mut handled = Vec::new();
        for (peer, bytes) in sequence {
            let Ok(Some((request, _))) = codec::decode_frame::<Request>(&bytes, limits().max_frame)
            else {
                continue;
            };
            let seen = node.ecs_term();
            let reply = tokio::time::timeout(DEADLINE, handle(node, &peer, request.clone()))
                .await
                .map_err(|_| {
                    TestCaseError::fail(format!(
                        "{request:?} from {peer:?}: no answer in {DEADLINE:?}"
                    ))
                })?;
            check_reply(node, &peer, &request, &reply, seen)?;
            let served = !matches!(
                reply.body,
                ReplyBody::Error { .. }
                    | ReplyBody::NotResponsible { .. }
                    | ReplyBody::Stopped
                    | ReplyBody::WriteLocked
            );
            handled.push((strategies::request_variant(&request.body), served));
        }
        Ok(handled)
    }

    /// Feeds fresh nodes sequences of 1..16 requests from random roles (one node per
    /// sequence, so that a failure shrinks and replays); every request that decodes is
    /// handled and its answer checked.
    pub fn fuzz(cases: u32) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let certs = Certs::new();
        // Every node of the run listens on the same address, so requests can name it.
        let addr = format!("127.0.0.1:{}", free_port());
        let me = NodeEntry::new("n1", addr.clone());
        // Per request kind: handled, and served (not refused).
        let tally = std::sync::Mutex::new([(0u64, 0u64); strategies::REQUEST_VARIANTS]);
        let trio = trio(&me);
        let signer = certs.ecs_signer();
        let signed_trio = signer.sign(&trio).expect("a valid ring");
        // Whether the node starts in `trio` (else alone, owning the whole ring), and the
        // requests.
        let sequences = (
            any::<bool>(),
            proptest::collection::vec((peer(), request_bytes(me, signer)), 1..16),
        );
        run("handlers", cases, sequences, |(in_trio, sequence)| {
            let handled = rt.block_on(async {
                let data = tempfile::tempdir().expect("tempdir");
                let node = TestNode::start_with(&certs, "n1", true, data, |c| {
                    c.listen = addr.parse().expect("address");
                    c.advertise = addr.clone();
                    c.limits = limits();
                    c.transfer_batch_bytes = 512;
                    // No gossip rounds: they would dial the peers that never answer, and
                    // shutting down waits for those dials.
                    c.gossip.interval = Duration::from_secs(3600);
                })
                .await;
                let install = Request::new(
                    0,
                    RequestBody::InstallMetadata {
                        metadata: signed_trio.clone(),
                    },
                );
                if in_trio {
                    // Let the gossip driver take its first tick (at once, on its own
                    // one-node ring) first, so that it never dials the silent peers.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let ecs = PeerIdentity {
                        role: Role::Ecs,
                        name: "ecs".into(),
                    };
                    let reply = handle(&node.node, &ecs, install).await;
                    assert_eq!(
                        reply.body,
                        ReplyBody::Installed { adopted: true },
                        "installing {trio:?}"
                    );
                }
                let handled = run_sequence(&node.node, sequence).await;
                node.stop().await;
                // The endpoint's driver lets go of the port once the runtime polls it.
                while std::net::UdpSocket::bind(&addr).is_err() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                handled
            })?;
            let mut tally = tally.lock().expect("tally");
            for (kind, served) in handled {
                tally[kind].0 += 1;
                tally[kind].1 += u64::from(served);
            }
            Ok(())
        });
        let tally = tally.into_inner().expect("tally");
        let total: u64 = tally.iter().map(|t| t.0).sum();
        eprintln!("fuzz handlers: {total} requests handled; per kind (handled, served): {tally:?}");
    }
}

#[test]
fn handlers_answer_every_request_from_every_role() {
    handlers::fuzz(handler_cases());
}

/// A frame of the maximum size filled with the smallest sequence elements a message can
/// hold (a `PutBatch` of empty entries: 72-byte `StorageEntry`s from 4 bytes each; gossip
/// heartbeats; at the cap also a `ReplicateBatch` of empty chain writes). Before the element counts were capped (`ringkv_wire::bounded`) these decoded
/// into 128 MiB (largest allocation) / 192 MiB (peak) and 64 / 96 MiB; now they are refused
/// once the announced count passes the cap, and the largest frames under the caps decode
/// within the frame limit.
#[test]
fn largest_frames_of_smallest_elements() {
    use strategies::varint;
    let max = max_frame();
    let fill = |prefix: Vec<u8>, element: &[u8]| {
        let count = (max - prefix.len() - 8) / element.len();
        let mut payload = prefix;
        payload.extend(varint(count as u64));
        for _ in 0..count {
            payload.extend_from_slice(element);
        }
        payload
    };
    // Request { metadata_version: 0, body: PutBatch { id: (0, 0), entries: [empty; n] } }
    // (an empty entry: key, value None, version 0, expires_at None)
    let put_batch = fill(vec![0, 13, 0, 0], &[0, 0, 0, 0]);
    // Request { 0, Gossip { digest: { from: "", 0, 0, heartbeats: [(0, 0); n] } } }
    let heartbeats = fill(vec![0, 15, 0, 0, 0], &[0, 0]);
    for (name, payload) in [("PutBatch", &put_batch), ("Gossip", &heartbeats)] {
        let (decoded, stats) = measure(|| codec::decode::<Request>(payload));
        assert!(
            decoded.is_err(),
            "{name}: over the element cap, yet decoded"
        );
        eprintln!(
            "{name}: {} B payload over the cap refused with largest allocation {} B, peak {} B",
            payload.len(),
            stats.largest,
            stats.peak
        );
        assert!(stats.peak <= 64 * 1024, "{name}: {stats:?}");
    }
    // At the caps, the most a frame can expand to stays within one frame's size.
    let put_batch = {
        let mut p = vec![0, 13, 0, 0];
        p.extend(varint(ringkv_wire::MAX_BATCH_ENTRIES as u64));
        p.extend(std::iter::repeat_n([0u8; 4], ringkv_wire::MAX_BATCH_ENTRIES).flatten());
        p
    };
    // Request { 0, ReplicateBatch { writes: [empty chain write; n] } } (key, value None,
    // version, expires_at None, origin, seq)
    let replicate_batch = {
        let mut p = vec![0, 17];
        p.extend(varint(ringkv_wire::MAX_BATCH_ENTRIES as u64));
        p.extend(std::iter::repeat_n([0u8; 6], ringkv_wire::MAX_BATCH_ENTRIES).flatten());
        p
    };
    let heartbeats = {
        let mut p = vec![0, 15, 0, 0, 0];
        p.extend(varint(ringkv_wire::ring::MAX_RING_NODES as u64));
        p.extend(std::iter::repeat_n([0u8, 0], ringkv_wire::ring::MAX_RING_NODES).flatten());
        p
    };
    for (name, payload) in [
        ("PutBatch", &put_batch),
        ("ReplicateBatch", &replicate_batch),
        ("Gossip", &heartbeats),
    ] {
        let (decoded, stats) = measure(|| codec::decode::<Request>(payload));
        assert!(decoded.is_ok(), "{name}: {decoded:?}");
        eprintln!(
            "{name}: {} B payload at the cap decodes with largest allocation {} B, peak {} B",
            payload.len(),
            stats.largest,
            stats.peak
        );
        assert!(stats.peak <= max, "{name}: {stats:?} (max_frame {max})");
    }
}
