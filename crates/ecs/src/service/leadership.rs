//! Leadership in an ECS group: taking the lead, confirming it with a majority, and the term
//! this member may act in ([`crate::leadership::LeadGate`]).

use std::sync::Arc;
use std::time::Instant;

use ringkv_wire::{GroupMember, GroupReport};

use super::{Ecs, CONFIRM_EVERY, CONFIRM_TIMEOUT};
use crate::liveness::Probes;
use crate::raft::{EcsCommand, EcsRaft, LeaseSettings, RaftError};
use crate::EcsError;

impl Ecs {
    /// The term this member may act in now, if it acts at all: a single ECS always acts
    /// (`Some(0)`); a group member while it leads (`Some(term)`: it took the lead in
    /// [`Ecs::leadership_loop`], has heard of no newer term since, and a majority confirmed
    /// its lead in a round that started less than the Raft timings' `act_for` ago,
    /// [`LeadGate`]). A leader cut off from the majority thus stops answering operators,
    /// leasing nodes and failing them over before the others can have elected a new leader.
    ///
    /// What is decided now is sent
    /// stamped with this term ([`Ecs::stamp`]), never with whatever the term is when it is
    /// sent.
    pub(super) fn acting_term(&self) -> Option<u64> {
        if self.stopping() {
            return None;
        }
        if self.raft.is_none() {
            return Some(0);
        }
        if self.deposed() {
            return None;
        }
        let gate = self.gate.lock().expect("gate lock");
        gate.may_act(Instant::now()).then(|| gate.term())
    }

    /// Whether this group member has stopped leading (a newer term, or it never led). A
    /// running change stops only then: a confirmation that is merely late does not cut it
    /// short (its proposals need a majority anyway).
    pub(super) fn deposed(&self) -> bool {
        match &self.raft {
            None => false,
            Some(raft) => self.leading_term() == 0 || !raft.is_leader(),
        }
    }

    /// Confirms with a majority, now, that this member leads (a group member; a single ECS
    /// always does): called before a change touches any node. The term to stamp what the
    /// change sends with (0 for a single ECS).
    pub(super) async fn confirm_lead(&self) -> Result<u64, EcsError> {
        let Some(raft) = &self.raft else {
            return Ok(0);
        };
        // The gate counts from before the heartbeats go out ([`LeadGate`]).
        let round = Instant::now();
        let lead = tokio::time::timeout(CONFIRM_TIMEOUT, raft.ensure_leader())
            .await
            .map_err(|_| {
                RaftError::NoQuorum(format!("no majority within {CONFIRM_TIMEOUT:?}"))
            })??;
        if !self
            .gate
            .lock()
            .expect("gate lock")
            .confirmed(lead.term, round)
        {
            return Err(RaftError::ForwardToLeader { leader: None }.into());
        }
        Ok(lead.term)
    }

    /// The Raft term this member leads in (0: a single ECS, or not leading).
    pub fn leading_term(&self) -> u64 {
        self.gate.lock().expect("gate lock").term()
    }

    /// The address of the group's leader as this member knows it.
    pub(super) fn leader_addr(&self) -> Option<String> {
        let raft = self.raft.as_ref()?;
        // A leader whose lead is not confirmed does not name itself.
        raft.leader()
            .filter(|(id, _)| *id != raft.id())
            .map(|(_, member)| member.addr)
    }

    /// The ECS group as this member sees it (`None` for a single ECS).
    pub fn group(&self) -> Option<GroupReport> {
        let status = self.raft.as_ref()?.status();
        Some(GroupReport {
            this: status.id,
            leader: status.leader.as_ref().map(|(id, _)| *id),
            term: status.term,
            applied: status.last_applied.unwrap_or(0),
            failover_after_ms: self
                .raft
                .as_ref()
                .and_then(|raft| raft.state().settings)
                .map_or(0, |s| s.failover_after_ms),
            members: status
                .members
                .iter()
                .map(|(id, member)| GroupMember {
                    id: *id,
                    name: member.name.clone(),
                    addr: member.addr.clone(),
                    voter: status.voters.contains(id),
                })
                .collect(),
        })
    }

    /// Follows this member's leadership (a group member only): when it becomes the leader,
    /// it confirms the lead with a majority, reloads the ring and intent log from the
    /// group's state, forgets what it knew of the nodes' liveness (a node gets a whole
    /// `failover_after` under the new leader before it can be failed over, which also
    /// outlasts any lease the old leader granted), then resumes the change in flight and
    /// republishes the ring. When it stops leading, it stops acting at once ([`Ecs::acting_term`]).
    pub(super) async fn leadership_loop(self: Arc<Self>) {
        let Some(raft) = self.raft.as_ref() else {
            return;
        };
        let mut metrics = raft.metrics();
        loop {
            let leader = raft.is_leader();
            let leading = self.leading_term();
            if leader && leading == 0 {
                self.take_lead(raft).await;
            } else if !leader && leading != 0 {
                self.gate.lock().expect("gate lock").depose();
                tracing::warn!(term = raft.term(), "no longer the ECS group's leader");
            } else if leader {
                // Leading: renew the majority's confirmation ([`Ecs::acting_term`]); a newer term
                // means this member is leading afresh and takes the lead again.
                match self.confirm_lead().await {
                    Ok(_) => {}
                    Err(EcsError::Raft(RaftError::ForwardToLeader { .. })) => {
                        self.gate.lock().expect("gate lock").depose();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "lead not confirmed by a majority");
                    }
                }
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(CONFIRM_EVERY) => {}
            }
        }
    }

    /// The group's lease settings, which this leader acts on: fixed by proposing this
    /// member's own if the group has none yet (its first leader, or a group that ran before
    /// it kept them). `None` if they could not be fixed now (no majority, an unknown
    /// outcome): the member does not act until they are.
    async fn fix_lease_settings(&self, raft: &EcsRaft) -> Option<LeaseSettings> {
        let own = LeaseSettings::new(self.config.failover_after);
        if raft.state().settings.is_none() {
            match raft.propose(EcsCommand::SetLeaseSettings(own)).await {
                Ok(_) | Err(RaftError::Refused(_)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the group's failover_after not fixed yet; not acting yet");
                    return None;
                }
            }
        }
        // Applied here once proposed by this leader (openraft answers after applying).
        let settings = raft.state().settings?;
        if settings != own {
            tracing::warn!(
                group = ?settings.failover_after(),
                configured = ?self.config.failover_after,
                "this member's --failover-after differs from the group's; using the group's (fixed by its first leader)"
            );
        }
        Some(settings)
    }

    /// Takes the lead (see [`Ecs::leadership_loop`]).
    pub(super) async fn take_lead(self: &Arc<Self>, raft: &EcsRaft) {
        // The gate counts from before the heartbeats go out, not from when the change
        // mutex below is had ([`LeadGate`]).
        let round = Instant::now();
        let term = match raft.ensure_leader().await {
            Ok(lead) => lead.term,
            Err(e) => {
                tracing::warn!(error = %e, "leadership not confirmed; not acting yet");
                return;
            }
        };
        let no_change = self.change.lock().await;
        let Some(settings) = self.fix_lease_settings(raft).await else {
            return; // not acting yet: the leadership loop tries again
        };
        let state = raft.state();
        self.set_ring(state.ring.clone());
        *self.log.lock().expect("log lock") = state.log.clone();
        *self.probes.lock().expect("probes lock") = Probes::new();
        self.owed.lock().expect("owed lock").clear();
        self.planned.lock().expect("planned lock").clear();
        // The group's intent log is the record now: whatever this member parked under an
        // earlier lead is resumed from there.
        *self.parked.lock().expect("parked lock") = None;
        self.gate.lock().expect("gate lock").take(term, round);
        tracing::warn!(
            term,
            failover_after = ?settings.failover_after(),
            version = state.ring.version,
            pending = state.log.pending.is_some(),
            "leading the ECS group"
        );
        // The nodes' leases from the previous leader run out about a lease after its last
        // probe: lease them now, not a probe interval from now (a first answer is followed
        // by a second probe at once, [`Probes::follow_up`]).
        self.probe_now.notify_one();
        // Released before the spawned task tries for it (on a multi-thread runtime it could
        // run at once and find it held).
        drop(no_change);
        let ecs = self.clone();
        tokio::spawn(async move {
            ecs.resume_pending().await;
            ecs.republish().await;
        });
    }
}
