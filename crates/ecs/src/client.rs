//! Asking "the ECS" when it is a group: [`ask`] sends an operator request to the members it
//! is given, follows a follower's `NotLeader` to the leader it names, and waits out an
//! election, so callers (the CLI, the bench, tests) need not know which member leads.

use std::time::Duration;

use ringkv_transport::{Transport, TransportError};
use ringkv_wire::{AdminReply, AdminRequest, RingMetadata};

/// How long [`ask`] keeps trying while no member leads (an election takes about 1–1.5 s,
/// ARCHITECTURE.md §12).
pub const ELECTION_WAIT: Duration = Duration::from_secs(10);

/// Pause between two rounds over the members while no leader answers.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// Why [`ask`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// No member address was given.
    #[error("no ECS address given")]
    NoAddress,
    /// No member led within [`ELECTION_WAIT`]; the last thing a member said.
    #[error("no ECS member answered as the leader within {wait:?} (last: {last})")]
    NoLeader {
        /// How long it tried.
        wait: Duration,
        /// The last error or redirect seen.
        last: String,
    },
}

/// Sends `request` to the ECS whose members are at `members` (one address for a single
/// ECS), each exchange bounded by `timeout`, and returns the first answer that is not a
/// redirect. A member that names a leader is followed there; one that names none (an
/// election) or does not answer is passed over for the next, round after round, for up to
/// [`ELECTION_WAIT`].
///
/// A request that fails in transport after it was sent may have been carried out. So before
/// `add-node` or `remove-node` is sent to another member after the one running it was lost,
/// the leader is asked for its ring: if the ring already shows the change ([`already_done`]:
/// the change in flight had committed, and the new leader, whose ring holds every committed
/// change, finishes it), the answer is `Done` and nothing is sent again; otherwise it had not
/// committed, the new leader rolls it back, and the request is sent again as a fresh change.
/// Even sent again while the change still runs, it is harmless: the ECS answers a join of
/// a node already in the ring, or the removal of one it removed, with `Done`.
/// Other requests are idempotent or reads, and are sent again as they are.
pub async fn ask(
    transport: &Transport,
    members: &[String],
    request: &AdminRequest,
    timeout: Duration,
) -> Result<AdminReply, AskError> {
    if members.is_empty() {
        return Err(AskError::NoAddress);
    }
    let deadline = tokio::time::Instant::now() + ELECTION_WAIT;
    let mut last = String::new();
    // Whether a member may have taken the request and been lost before it answered.
    let mut maybe_taken = false;
    loop {
        for start in members {
            let mut addr = start.clone();
            // A redirect is followed a few times at most (a leader change while we follow).
            for _ in 0..3 {
                if maybe_taken && changes_membership(request) {
                    match call_watching(transport, &addr, &AdminRequest::Ring, timeout).await {
                        Ok(AdminReply::Ring(ring)) if already_done(request, &ring) => {
                            return Ok(AdminReply::Done(format!(
                                "done: the ring (v{}) shows it (the change was in flight when the member running it was lost: {last})",
                                ring.version
                            )));
                        }
                        Ok(AdminReply::Ring(_)) => {}
                        // Not the leader (or no answer): go on as for the request itself.
                        _ => {}
                    }
                }
                match call_watching(transport, &addr, request, timeout).await {
                    Ok(AdminReply::NotLeader {
                        leader: Some(leader),
                    }) if leader != addr => {
                        last = format!("{addr} is not the leader; it named {leader}");
                        addr = leader;
                    }
                    Ok(AdminReply::NotLeader { .. }) => {
                        last = format!("{addr} is not the leader and knows none");
                        break;
                    }
                    Ok(reply) => return Ok(reply),
                    Err((e, sent)) => {
                        maybe_taken |= sent;
                        last = format!("{addr}: {e}");
                        break;
                    }
                }
            }
        }
        if tokio::time::Instant::now() + ROUND_PAUSE >= deadline {
            return Err(AskError::NoLeader {
                wait: ELECTION_WAIT,
                last,
            });
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

/// Whether `request` changes the ring's membership (and so must not run twice).
fn changes_membership(request: &AdminRequest) -> bool {
    matches!(
        request,
        AdminRequest::AddNode { .. } | AdminRequest::RemoveNode { .. }
    )
}

/// Whether `ring` already shows the effect of the membership change `request`: the node
/// added at that address and not failed, or the node gone.
pub fn already_done(request: &AdminRequest, ring: &RingMetadata) -> bool {
    match request {
        AdminRequest::AddNode { name, addr, zone } => ring
            .node(name)
            .is_some_and(|n| &n.addr == addr && &n.zone == zone && !ring.is_failed(name)),
        AdminRequest::RemoveNode { name } => ring.node(name).is_none(),
        _ => false,
    }
}

/// How often a long request's member is checked for life ([`call_watching`]).
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How long such a check may take before the member is taken for dead.
const WATCH_TIMEOUT: Duration = Duration::from_secs(3);

/// `transport.call` of `request` at `addr`, giving up early if the member dies meanwhile (the
/// error says whether the request may have been taken: it was sent and the member was lost
/// before it answered): a
/// membership change may rightly take long (its timeout is an hour), but a member SIGKILLed
/// during it would otherwise be noticed only at the connection's idle timeout (30 s). So
/// while the request runs, the member is asked for `Group` every [`WATCH_EVERY`]; one that
/// does not answer within [`WATCH_TIMEOUT`] is given up (the next member is tried, and a new
/// leader will have resumed the change).
async fn call_watching(
    transport: &Transport,
    addr: &str,
    request: &AdminRequest,
    timeout: Duration,
) -> Result<AdminReply, (String, bool)> {
    let call = transport.call::<_, AdminReply>(addr, request, timeout);
    let watch = async {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let alive = transport
                .call::<_, AdminReply>(addr, &AdminRequest::Group, WATCH_TIMEOUT)
                .await;
            if alive.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        // The call first: when its dial fails, the check queued behind that dial fails with
        // it, and the call's error (not sent) is the true one, not "stopped answering".
        biased;
        reply = call => reply.map_err(|e| {
            // Only an error before the request left (or one the server vouches it did not
            // take) says it was not carried out.
            let sent = !matches!(
                e,
                TransportError::Connect { .. }
                    | TransportError::NotTaken { .. }
                    | TransportError::Address { .. }
            );
            (e.to_string(), sent)
        }),
        () = watch => Err((format!("stopped answering (no answer to a check within {WATCH_TIMEOUT:?}) while the request ran; it may or may not have been carried out"), true)),
    }
}

/// Splits a comma-separated list of ECS addresses (`--ecs a:7000,b:7000,c:7000`).
pub fn members(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv_wire::NodeEntry;

    #[test]
    fn a_change_is_done_when_the_ring_shows_it() {
        let ring = RingMetadata::new(
            4,
            vec![NodeEntry::new("a", "h:1"), NodeEntry::new("b", "h:2")],
        )
        .unwrap()
        .with_replication(2)
        .unwrap();
        let add = |name: &str, addr: &str| AdminRequest::AddNode {
            name: name.into(),
            addr: addr.into(),
            zone: None,
        };
        let remove = |name: &str| AdminRequest::RemoveNode { name: name.into() };
        assert!(already_done(&add("b", "h:2"), &ring));
        assert!(!already_done(&add("b", "h:9"), &ring), "another address");
        assert!(!already_done(&add("c", "h:3"), &ring));
        assert!(already_done(&remove("c"), &ring));
        assert!(!already_done(&remove("b"), &ring));
        let failed = ring.with_failed("b").unwrap();
        assert!(
            !already_done(&add("b", "h:2"), &failed),
            "failed, not added"
        );
        assert!(!already_done(&AdminRequest::Stop, &ring));
        assert!(changes_membership(&remove("b")) && !changes_membership(&AdminRequest::Ring));
    }
}
