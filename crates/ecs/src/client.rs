//! Asking "the ECS" when it is a group: [`ask`] sends an operator request to the members it
//! is given, follows a follower's `NotLeader` to the leader it names, and waits out an
//! election, so callers (the CLI, the bench, tests) need not know which member leads.

use std::time::Duration;

use ringkv_transport::Transport;
use ringkv_wire::{AdminReply, AdminRequest};

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
/// A request that fails in transport after it was sent may have been carried out; only
/// idempotent ones (reads) are safe to ask again blindly. A membership change that got a
/// transport error shows its outcome in the ring (`Ring`).
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
    loop {
        for start in members {
            let mut addr = start.clone();
            // A redirect is followed a few times at most (a leader change while we follow).
            for _ in 0..3 {
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
                    Err(e) => {
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

/// How often a long request's member is checked for life ([`call_watching`]).
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How long such a check may take before the member is taken for dead.
const WATCH_TIMEOUT: Duration = Duration::from_secs(3);

/// `transport.call` of `request` at `addr`, giving up early if the member dies meanwhile: a
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
) -> Result<AdminReply, String> {
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
        reply = call => reply.map_err(|e| e.to_string()),
        () = watch => Err(format!("stopped answering (no answer to a check within {WATCH_TIMEOUT:?}) while the request ran; it may or may not have been carried out")),
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
