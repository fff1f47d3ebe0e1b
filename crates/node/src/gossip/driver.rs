//! The tokio side of gossip: every interval, tick the node's [`super::GossipState`] and run
//! the exchanges it asks for over the node's transport. All decisions are the state
//! machine's; this only moves bytes and runs the timer.

use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;
use ringkv_wire::{GossipDigest, NodeEntry, Reply, ReplyBody, Request, RequestBody};
use tokio::task::JoinSet;

use crate::Node;

/// Runs gossip for `node` until the returned future is dropped (the server drops it at
/// shutdown). Exchanges run as tasks of their own, each bounded by
/// [`super::GossipConfig::exchange_timeout`], so a dead peer never delays the next round;
/// dropping this future aborts them.
pub async fn run(node: Arc<Node>) {
    let config = node.config.gossip.clone();
    let mut rng: SmallRng = rand::make_rng();
    let mut timer = tokio::time::interval(config.interval);
    // After a pause (SIGSTOP, a stalled runtime) go on at the normal pace, no burst.
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut exchanges = JoinSet::new();
    loop {
        timer.tick().await;
        // The lease clock advances at readings of the clocks: reading them every interval
        // catches the jump a machine pause leaves on the wall clock, before a later step
        // back could cancel it (crate::lease).
        node.observe_clocks();
        while exchanges.try_join_next().is_some() {}
        let outgoing: Vec<(NodeEntry, GossipDigest)> = {
            let mut state = node.gossip.lock().expect("gossip lock");
            let out = state.tick(Instant::now(), &mut rng);
            let nodes = &state.membership().metadata().nodes;
            out.into_iter()
                .map(|(peer, digest)| (nodes[peer as usize].clone(), digest))
                .collect()
        };
        for (peer, digest) in outgoing {
            exchanges.spawn(exchange(node.clone(), peer, digest));
        }
    }
}

/// One exchange as its initiator: send the digest; merge the reply; adopt newer metadata
/// from it, or push ours if the peer is behind.
async fn exchange(node: Arc<Node>, peer: NodeEntry, digest: GossipDigest) {
    let addr = peer.addr;
    let timeout = node.config.gossip.exchange_timeout();
    let request = Request::new(node.metadata_version(), RequestBody::Gossip { digest });
    let reply: Reply = match tokio::time::timeout(
        timeout,
        node.peers.call(&addr, &request, transport_timeout(&node)),
    )
    .await
    {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => {
            tracing::debug!(node = %node.config.name, peer = %addr, error = %e, "gossip exchange failed");
            return;
        }
        Err(_) => {
            tracing::debug!(node = %node.config.name, peer = %addr, "gossip exchange timed out");
            return;
        }
    };
    let ReplyBody::Gossip { digest, metadata } = reply.body else {
        tracing::warn!(node = %node.config.name, peer = %addr, reply = ?reply.body, "unexpected gossip reply");
        return;
    };
    // The responder speaks for itself only: its digest must name the node we dialed (whose
    // certificate TLS checked against that address).
    if digest.from != peer.name {
        tracing::warn!(node = %node.config.name, peer = %addr, claimed = %digest.from, "ignored a gossip reply sent in another node's name");
        return;
    }
    let outcome =
        node.gossip
            .lock()
            .expect("gossip lock")
            .on_reply(&digest, metadata, Instant::now());
    if let Some(metadata) = outcome.adopt {
        // Verified against the ECS's signature and counted if refused.
        if let Err(e) = node.install_metadata(metadata, "gossip").await {
            tracing::warn!(node = %node.config.name, peer = %addr, error = %e, "did not install gossiped metadata");
        }
    }
    if let Some(metadata) = outcome.push {
        let version = metadata.version;
        let push = Request::new(version, RequestBody::GossipPush { metadata });
        match tokio::time::timeout(
            timeout,
            node.peers.call(&addr, &push, transport_timeout(&node)),
        )
        .await
        {
            Ok(Ok(Reply {
                body: ReplyBody::Ok,
                ..
            })) => {
                tracing::debug!(node = %node.config.name, peer = %addr, version, "pushed metadata")
            }
            Ok(Ok(reply)) => {
                tracing::warn!(node = %node.config.name, peer = %addr, reply = ?reply.body, "metadata push refused")
            }
            Ok(Err(e)) => {
                tracing::debug!(node = %node.config.name, peer = %addr, error = %e, "metadata push failed")
            }
            Err(_) => {
                tracing::debug!(node = %node.config.name, peer = %addr, "metadata push timed out")
            }
        }
    }
}

/// The transport's own timeout for gossip calls, longer than the exchange's: a slow
/// exchange is abandoned by the driver's timeout (dropping its stream; gossip is harmless
/// if it arrives late), never by the transport's, which closes the connection it shares
/// with range transfers to the same peer.
fn transport_timeout(node: &Node) -> std::time::Duration {
    node.config
        .gossip
        .dead_after
        .max(node.config.gossip.exchange_timeout() * 10)
}
