//! The executor of a [`Plan`], as a synchronous state machine (ARCHITECTURE.md §5): every
//! decision (which step next, repeat a delta round, roll back, retry, finish) is made here,
//! from the outcome of the previous action; the ECS's tokio code only performs the actions
//! (persist the intent, run a step against a node, wait) and feeds their outcomes back. So
//! every fault can be injected deterministically (`tests/move_sim.rs`).
//!
//! The executor's [`Intent`] is the ECS's intent log: it is persisted before the first step,
//! when the change commits (that write *is* the commit point) and when a rollback starts,
//! and cleared when the change is over. An ECS that restarts with an intent on disk resumes
//! it with [`Executor::resume`]: a committed change is driven to its end, any other is
//! rolled back. No change needs a person to finish it.
//!
//! Rules:
//! - Before the commit, a failed step rolls the change back: `Abort` at every lock holder,
//!   retried (with backoff) until acknowledged if a `Lock` may have been sent (a lock is
//!   durable and only an abort or the commit releases it; [`Intent::lock_sent`] is persisted
//!   before the first lock is sent), tried once otherwise; then `Abort` at every receiver,
//!   tried once (`Plan::best_effort`).
//! - After the commit, every step is retried until it succeeds; an `Install` succeeds only
//!   when the node reports holding the new version. There is no unlock step: a node's lock
//!   ends when it adopts the new version.
//! - An **unknown** outcome of the ECS's own durable writes ([`Outcome::Unknown`]: a Raft
//!   proposal that timed out, or whose leader lost the lead before it heard, may still
//!   commit) is never taken for a failure. A `Commit` whose outcome is unknown is proposed
//!   again (after a backoff) until it is known: the state machine refuses a ring that is not
//!   newer, so a second proposal cannot commit the change twice, and the driver reports `Ok`
//!   when the group's state already holds the committed ring. Only a `Commit` that
//!   certainly did not commit ([`Outcome::Failed`]) rolls the change back.
//! - Every `Persist` after the first must land before the next action runs: one that failed
//!   or whose outcome is unknown is retried (after a backoff). So no `Lock` is sent before
//!   `lock_sent` is durable, and no rollback's `Abort` before `RollingBack` is: a member that
//!   takes over reads the same phase the nodes were driven by. The first `Persist` of a new
//!   change that does not land ends it (nothing ran; if the intent lands after all, it is
//!   resumed as a rollback of nothing).
//! - A step against a node whose outcome is unknown (a timeout) is handled as a failure:
//!   before the commit the rollback sends `Abort` to every lock holder, which undoes a lock
//!   that was or was not taken alike; after the commit the step is retried, and every step
//!   is idempotent.
//! - A delta round with writes open is repeated while it carried at least
//!   [`PRECOPY_DONE_BELOW`] keys (at most [`MAX_PRECOPY_ROUNDS`] times), so the locked last
//!   round is short whatever the write rate.

use std::time::Duration;

use ringkv_wire::{MoveId, TransferStats};
use serde::{Deserialize, Serialize};

use crate::plan::{Plan, Step};
use crate::raft::RaftError;

/// A delta round with writes open that carried fewer keys than this ends the pre-copy.
pub const PRECOPY_DONE_BELOW: u64 = 256;
/// Most delta rounds with writes open.
pub const MAX_PRECOPY_ROUNDS: u32 = 8;
/// The reason of the [`Outcome::Unknown`] a driver reports for a step it abandoned because
/// another step of its stage failed first (before the commit, one failure decides): the
/// rollback names the step that failed, not an abandoned one.
pub const ABANDONED: &str = "not finished: another step of its stage failed first";
/// Longest failure reason kept in the intent log (bytes).
pub const MAX_REASON: usize = 1024;
/// First delay before retrying a step that must eventually succeed.
pub const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// Where a change stands, as persisted in the intent log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Before the commit: a crash rolls it back.
    Forward,
    /// Committed: a crash resumes it.
    Committed,
    /// Being rolled back: a crash goes on rolling it back.
    RollingBack,
}

/// The intent log entry of a change in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The change's unique number (the `change` of its [`MoveId`]).
    pub change: u64,
    /// What it does.
    pub plan: Plan,
    /// Where it stands.
    pub phase: Phase,
    /// Why it is being rolled back: the step that failed, and the reason.
    pub failure: Option<(String, String)>,
    /// Whether a `Lock` may have been sent (persisted before the first is): only then must a
    /// rollback's aborts reach the lock holders, whose locks are durable.
    pub lock_sent: bool,
}

impl Intent {
    /// The id every request of the change carries.
    pub fn move_id(&self) -> MoveId {
        MoveId {
            change: self.change,
            target_version: self.plan.metadata.version,
        }
    }
}

/// What happened to the last action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded; `node_version` is the version the node's reply carried (0 for actions
    /// that do not involve a node), `stats` what a transfer moved.
    Ok {
        /// What a transfer step moved.
        stats: Option<TransferStats>,
        /// The metadata version the node reported.
        node_version: u64,
    },
    /// It failed (refused, unreachable, timed out). For the ECS's own durable writes: it
    /// certainly did not take effect.
    Failed(String),
    /// The ECS's own durable write (a `Persist` or the `Commit`) may or may not have taken
    /// effect: a Raft proposal timed out, or the member lost the lead before it heard. The
    /// executor resolves it (see the module docs); it is never taken for a failure.
    Unknown(String),
    /// The outcomes of the steps of an [`Action::Run`], in the order of its steps.
    Ran(Vec<Outcome>),
}

impl Outcome {
    /// Success of an action that involves no node or carries nothing.
    pub fn ok() -> Self {
        Outcome::Ok {
            stats: None,
            node_version: 0,
        }
    }

    /// The outcome of a Raft proposal (a `Persist` or `Commit` of a replicated ECS):
    /// `Failed` only when it certainly did not commit (the state machine refused it, or it
    /// was too large to propose), `Unknown` when it may still commit (a timeout; the member
    /// lost the lead or stopped while it waited, and another leader may commit the entry).
    pub fn of_proposal<T>(result: &Result<T, RaftError>) -> Self {
        match result {
            Ok(_) => Outcome::ok(),
            Err(e @ (RaftError::Refused(_) | RaftError::TooLarge { .. })) => {
                Outcome::Failed(e.to_string())
            }
            Err(e) => Outcome::Unknown(e.to_string()),
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Persist this intent (replacing the previous one), then report `Outcome::ok()`
    /// (`Failed` if it certainly was not persisted, `Unknown` if it may have been).
    Persist(Intent),
    /// Persist this (committed) intent, then the new ring, and adopt it: the commit point.
    /// Report `Ok` if the intent was persisted (a failed ring write is repaired on resume),
    /// also when an earlier attempt of this commit is found to have committed; `Failed` if it
    /// certainly did not commit; `Unknown` if it may have.
    Commit(Intent),
    /// Run these steps of the change against their nodes, all at once (they belong to one
    /// stage, [`Plan::stages`]), then report [`Outcome::Ran`] with each one's outcome.
    Run(Vec<Step>),
    /// Wait this long, then report `Outcome::ok()` (the step is then retried).
    Wait(Duration),
    /// The change is over: clear the intent log. `Ok` with what the transfers moved, or the
    /// step that failed and why (the change was rolled back and the ring is unchanged).
    Finish(Result<TransferStats, (String, String)>),
}

/// What the executor waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    Persisted,
    /// The outcomes of the steps `running` of the current stage.
    StepResults,
    CommitResult,
    /// A backoff; then the current step (or the commit) is tried again.
    Waited,
    /// A backoff; then the intent is persisted again.
    WaitedToPersist,
    Finished,
}

/// A plan being executed. See the module docs.
#[derive(Debug, Clone)]
pub struct Executor {
    intent: Intent,
    /// Index into the stages of the current phase (the plan's stages when forward or
    /// committed; the rollback's when rolling back).
    cursor: usize,
    /// The steps of the current stage (indices into it) still to run: all of a stage that
    /// has not run yet; then those to repeat (an open delta round that carried much) or
    /// retry (a step that must eventually succeed).
    todo: Option<Vec<usize>>,
    /// The steps of the current stage whose outcomes are awaited, in the order sent.
    running: Vec<usize>,
    awaiting: Awaiting,
    attempts: u32,
    /// Open delta rounds the current stage has run.
    precopy_rounds: u32,
    moved: TransferStats,
}

impl Executor {
    /// A new change numbered `change`. Its first action persists the intent.
    pub fn new(plan: Plan, change: u64) -> (Self, Action) {
        Self::start(
            Intent {
                change,
                plan,
                phase: Phase::Forward,
                failure: None,
                lock_sent: false,
            },
            0,
        )
    }

    /// A change found in the intent log after a restart: a committed one resumes after its
    /// commit (every step from there on is idempotent), any other is rolled back.
    pub fn resume(mut intent: Intent) -> (Self, Action) {
        let cursor = match intent.phase {
            Phase::Committed => intent.plan.commit_stage() + 1,
            Phase::Forward | Phase::RollingBack => {
                intent.phase = Phase::RollingBack;
                intent.failure.get_or_insert_with(|| {
                    (
                        "the change".into(),
                        "the ECS restarted before it committed".into(),
                    )
                });
                0
            }
        };
        Self::start(intent, cursor)
    }

    fn start(intent: Intent, cursor: usize) -> (Self, Action) {
        let exec = Self {
            intent,
            cursor,
            todo: None,
            running: Vec::new(),
            awaiting: Awaiting::Persisted,
            attempts: 0,
            precopy_rounds: 0,
            moved: TransferStats::default(),
        };
        let action = Action::Persist(exec.intent.clone());
        (exec, action)
    }

    /// The intent as it stands.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }

    /// The id every request of the change carries.
    pub fn move_id(&self) -> MoveId {
        self.intent.move_id()
    }

    /// The stage to run next (from 0) of the current phase, and how many it has.
    pub fn stage(&self) -> (usize, usize) {
        (self.cursor, self.stages().len())
    }

    /// Whether the change has committed.
    pub fn committed(&self) -> bool {
        self.intent.phase == Phase::Committed
    }

    /// The stages of the current phase.
    fn stages(&self) -> Vec<Vec<Step>> {
        match self.intent.phase {
            Phase::RollingBack => self.intent.plan.rollback_stages(),
            Phase::Forward | Phase::Committed => self.intent.plan.stages(),
        }
    }

    /// The next action, given the outcome of the previous one.
    pub fn next(&mut self, outcome: Outcome) -> Action {
        match self.awaiting {
            Awaiting::Finished => panic!("the change is over"),
            Awaiting::Persisted => match outcome {
                Outcome::Ok { .. } => {
                    self.attempts = 0;
                    self.run_current()
                }
                // The first intent write of a change, before anything ran: nothing happened,
                // give up (an intent that lands after all is resumed as a rollback of nothing).
                Outcome::Failed(reason) | Outcome::Unknown(reason)
                    if self.cursor == 0
                        && self.intent.phase == Phase::Forward
                        && !self.intent.lock_sent =>
                {
                    self.finish(Err(("persist the intent".into(), reason)))
                }
                // Any later one must land before the next action runs.
                Outcome::Failed(_) | Outcome::Unknown(_) => {
                    self.attempts += 1;
                    self.awaiting = Awaiting::WaitedToPersist;
                    Action::Wait(backoff(self.attempts))
                }
                Outcome::Ran(_) => panic!("the outcome of a Persist is not Ran"),
            },
            Awaiting::WaitedToPersist => {
                self.awaiting = Awaiting::Persisted;
                Action::Persist(self.intent.clone())
            }
            Awaiting::Waited => self.run_current(),
            Awaiting::CommitResult => self.on_commit(outcome),
            Awaiting::StepResults => {
                let Outcome::Ran(outcomes) = outcome else {
                    panic!("the outcome of a Run must be Ran, not {outcome:?}")
                };
                assert_eq!(
                    outcomes.len(),
                    self.running.len(),
                    "one outcome per step run"
                );
                self.on_results(outcomes)
            }
        }
    }

    /// Whether the outcome of the commit is being resolved: it was unknown, and the commit
    /// is proposed again until it is known.
    pub fn resolving_commit(&self) -> bool {
        self.intent.phase == Phase::Forward
            && self.awaiting == Awaiting::Waited
            && self.stages().get(self.cursor) == Some(&vec![Step::Commit])
    }

    fn run_current(&mut self) -> Action {
        let stages = self.stages();
        let Some(stage) = stages.get(self.cursor) else {
            return match self.intent.phase {
                Phase::RollingBack => {
                    let failure = self.intent.failure.clone().unwrap_or_default();
                    self.finish(Err(failure))
                }
                Phase::Forward | Phase::Committed => self.finish(Ok(self.moved)),
            };
        };
        if stage.iter().any(|s| matches!(s, Step::Lock { .. })) && !self.intent.lock_sent {
            // Recorded before the lock can exist, so that a rollback (even by a restarted
            // ECS) knows it must release it.
            self.intent.lock_sent = true;
            self.awaiting = Awaiting::Persisted;
            return Action::Persist(self.intent.clone());
        }
        if stage == &[Step::Commit] {
            self.awaiting = Awaiting::CommitResult;
            let mut committed = self.intent.clone();
            committed.phase = Phase::Committed;
            return Action::Commit(committed);
        }
        self.running = self
            .todo
            .take()
            .unwrap_or_else(|| (0..stage.len()).collect());
        self.awaiting = Awaiting::StepResults;
        Action::Run(self.running.iter().map(|&i| stage[i].clone()).collect())
    }

    fn on_commit(&mut self, outcome: Outcome) -> Action {
        match outcome {
            Outcome::Ok { .. } => {
                self.intent.phase = Phase::Committed;
                self.next_stage()
            }
            // It may have committed: never roll back; propose it again once it is known.
            Outcome::Unknown(_) => {
                self.attempts += 1;
                self.awaiting = Awaiting::Waited;
                Action::Wait(backoff(self.attempts))
            }
            // It certainly was not written: the change is still before its commit.
            Outcome::Failed(reason) => self.roll_back(Step::Commit.describe(), reason),
            Outcome::Ran(_) => panic!("the outcome of a Commit is not Ran"),
        }
    }

    fn on_results(&mut self, outcomes: Vec<Outcome>) -> Action {
        let stage = self.stages()[self.cursor].clone();
        let running = std::mem::take(&mut self.running);
        let open_round = stage
            .iter()
            .any(|s| matches!(s, Step::TransferDelta { last: false, .. }));
        if open_round {
            self.precopy_rounds += 1;
        }
        let mut failed: Vec<(usize, String)> = Vec::new();
        let mut again: Vec<usize> = Vec::new();
        for (i, outcome) in running.into_iter().zip(outcomes) {
            let step = &stage[i];
            let failure = match (&outcome, step) {
                // A node step whose outcome is unknown is handled as a failure (module docs).
                (Outcome::Failed(reason) | Outcome::Unknown(reason), _) => Some(reason.clone()),
                (Outcome::Ok { node_version, .. }, Step::Install { node })
                    if *node_version < self.intent.plan.metadata.version =>
                {
                    Some(format!(
                        "{} still holds v{node_version} after the install of v{}",
                        node.name, self.intent.plan.metadata.version
                    ))
                }
                (Outcome::Ran(_), _) => panic!("a step's outcome is not Ran"),
                _ => None,
            };
            if let Some(reason) = failure {
                failed.push((i, reason));
                continue;
            }
            if let Outcome::Ok {
                stats: Some(stats), ..
            } = &outcome
            {
                self.moved.entries += stats.entries;
                self.moved.bytes += stats.bytes;
                // Another round with writes open while this copy's still carries much.
                if matches!(step, Step::TransferDelta { last: false, .. })
                    && stats.entries >= PRECOPY_DONE_BELOW
                    && self.precopy_rounds < MAX_PRECOPY_ROUNDS
                {
                    again.push(i);
                }
            }
        }
        if self.intent.phase == Phase::Forward {
            // The step that failed, not one abandoned because of it.
            if let Some((i, reason)) = failed
                .iter()
                .find(|(_, reason)| reason != ABANDONED)
                .or(failed.first())
                .cloned()
            {
                return self.roll_back(stage[i].describe(), reason);
            }
            if !again.is_empty() {
                self.todo = Some(again);
                return self.run_current();
            }
            return self.next_stage();
        }
        // Committed, or rolling back: what must eventually succeed is retried after a
        // backoff; a rollback's best-effort steps are tried once.
        failed.retain(|(i, _)| !self.best_effort(&stage[*i]));
        if failed.is_empty() {
            return self.next_stage();
        }
        self.todo = Some(failed.into_iter().map(|(i, _)| i).collect());
        self.attempts += 1;
        self.awaiting = Awaiting::Waited;
        Action::Wait(backoff(self.attempts))
    }

    /// The current stage is over: on to the next one.
    fn next_stage(&mut self) -> Action {
        self.cursor += 1;
        self.todo = None;
        self.attempts = 0;
        self.precopy_rounds = 0;
        self.run_current()
    }

    /// Whether a rollback step's failure is accepted rather than retried: a receiver's
    /// abort always ([`Plan::best_effort`]), a lock holder's while no lock was sent (it then
    /// only drops tracking, which a restart drops too).
    fn best_effort(&self, step: &Step) -> bool {
        self.intent.plan.best_effort(step)
            || (!self.intent.lock_sent && matches!(step, Step::Abort { .. }))
    }

    fn roll_back(&mut self, step: String, mut reason: String) -> Action {
        // The reason is persisted with the intent: bounded, so that a long error text can
        // never make the rollback's intent too large to persist (it is retried until it is).
        if reason.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push('…');
        }
        self.intent.phase = Phase::RollingBack;
        self.intent.failure = Some((step, reason));
        self.cursor = 0;
        self.todo = None;
        self.running.clear();
        self.precopy_rounds = 0;
        self.attempts = 0;
        self.awaiting = Awaiting::Persisted;
        Action::Persist(self.intent.clone())
    }

    fn finish(&mut self, result: Result<TransferStats, (String, String)>) -> Action {
        self.awaiting = Awaiting::Finished;
        Action::Finish(result)
    }
}

/// Delay before the `attempt`-th retry: doubling from [`RETRY_INITIAL`] to [`RETRY_MAX`].
pub fn backoff(attempt: u32) -> Duration {
    RETRY_INITIAL
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;
    use ringkv_wire::{KeyRange, NodeEntry, RingMetadata};

    /// The second node joining: one copy, from the first node to it.
    fn join_plan() -> Plan {
        let ring = RingMetadata::new(3, vec![NodeEntry::new("a", "127.0.0.1:7001")]).unwrap();
        let plan = plan::join(&ring, NodeEntry::new("c", "127.0.0.1:7003")).unwrap();
        assert_eq!(plan.copies.len(), 1, "{:#?}", plan.copies);
        plan
    }

    /// The third node joining (replication 1): two copies, one from each old node.
    fn two_copy_join_plan() -> Plan {
        let ring = RingMetadata::new(
            3,
            vec![
                NodeEntry::new("a", "127.0.0.1:7001"),
                NodeEntry::new("b", "127.0.0.1:7002"),
            ],
        )
        .unwrap();
        plan::join(&ring, NodeEntry::new("c", "127.0.0.1:7003")).unwrap()
    }

    /// A sixth node joining a ring of five at R = 3: many copies, locks and installs.
    fn replicated_join_plan() -> Plan {
        let nodes = (1..=5)
            .map(|i| NodeEntry::new(format!("n{i}"), format!("127.0.0.1:{}", 7000 + i)))
            .collect();
        let ring = RingMetadata::new(3, nodes)
            .unwrap()
            .with_replication(3)
            .unwrap();
        plan::join(&ring, NodeEntry::new("new", "127.0.0.1:7100")).unwrap()
    }

    fn ok_at(version: u64, entries: u64) -> Outcome {
        Outcome::Ok {
            stats: Some(TransferStats { entries, bytes: 0 }),
            node_version: version,
        }
    }

    /// An action as the tests see it: the steps of a stage one by one.
    #[derive(Debug, Clone)]
    enum Seen {
        Persist(Intent),
        Commit(Intent),
        Run(Step),
        Wait,
        Finish(Result<TransferStats, (String, String)>),
    }

    /// The steps `actions` ran, in order.
    fn steps_run(actions: &[Seen]) -> Vec<Step> {
        actions
            .iter()
            .filter_map(|a| match a {
                Seen::Run(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Runs `exec` from `first` answering every action, and every step of a stage, with
    /// `answer`; returns what it saw.
    fn run(
        mut exec: Executor,
        first: Action,
        mut answer: impl FnMut(&Seen) -> Outcome,
    ) -> Vec<Seen> {
        let mut seen = Vec::new();
        let mut action = first;
        loop {
            assert!(seen.len() < 5000, "runaway: {seen:?}");
            let mut ask = |s: Seen| {
                let outcome = answer(&s);
                seen.push(s);
                outcome
            };
            let outcome = match action {
                Action::Run(steps) => {
                    Outcome::Ran(steps.into_iter().map(|s| ask(Seen::Run(s))).collect())
                }
                Action::Persist(i) => ask(Seen::Persist(i)),
                Action::Commit(i) => ask(Seen::Commit(i)),
                Action::Wait(_) => ask(Seen::Wait),
                Action::Finish(result) => {
                    seen.push(Seen::Finish(result));
                    return seen;
                }
            };
            action = exec.next(outcome);
        }
    }

    #[test]
    fn a_clean_join_persists_commits_and_finishes() {
        let plan = join_plan();
        let target = plan.metadata.version;
        let (exec, first) = Executor::new(plan.clone(), 7);
        assert_eq!(exec.move_id().change, 7);
        let actions = run(exec, first, |_| ok_at(target, 0));
        assert!(matches!(&actions[0], Seen::Persist(i) if i.phase == Phase::Forward));
        assert_eq!(
            steps_run(&actions).len(),
            plan.steps.len() - 1,
            "every step once, Commit apart"
        );
        assert!(actions
            .iter()
            .any(|a| matches!(a, Seen::Commit(i) if i.phase == Phase::Committed)));
        assert!(matches!(actions.last(), Some(Seen::Finish(Ok(_)))));
    }

    #[test]
    fn delta_rounds_repeat_while_they_carry_much() {
        let plan = join_plan();
        let target = plan.metadata.version;
        let (exec, first) = Executor::new(plan, 1);
        let mut rounds = 0;
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::TransferDelta { last: false, .. }) => {
                rounds += 1;
                ok_at(0, if rounds < 3 { 10_000 } else { 10 })
            }
            _ => ok_at(target, 0),
        });
        assert_eq!(rounds, 3);
        assert!(matches!(actions.last(), Some(Seen::Finish(Ok(_)))));
        // Bounded even if writes never slow down.
        let (exec, first) = Executor::new(join_plan(), 1);
        let mut rounds = 0;
        run(exec, first, |a| match a {
            Seen::Run(Step::TransferDelta { last: false, .. }) => {
                rounds += 1;
                ok_at(0, 1_000_000)
            }
            _ => ok_at(target, 0),
        });
        assert_eq!(rounds, MAX_PRECOPY_ROUNDS);
    }

    /// Every copy of a change gets its own pre-copy rounds (the count was once kept for the
    /// whole change, so with many copies only the first could repeat its round).
    #[test]
    fn each_copy_gets_its_own_delta_rounds() {
        let plan = two_copy_join_plan();
        assert_eq!(plan.copies.len(), 2, "{:#?}", plan.copies);
        let target = plan.metadata.version;
        let (exec, first) = Executor::new(plan.clone(), 1);
        let mut rounds: std::collections::BTreeMap<String, u32> = Default::default();
        run(exec, first, |a| match a {
            Seen::Run(Step::TransferDelta {
                last: false, from, ..
            }) => {
                *rounds.entry(from.name.clone()).or_default() += 1;
                ok_at(0, 1_000_000)
            }
            _ => ok_at(target, 0),
        });
        assert_eq!(rounds.len(), 2, "{rounds:?}");
        assert!(
            rounds.values().all(|r| *r == MAX_PRECOPY_ROUNDS),
            "{rounds:?}"
        );
    }

    /// A stage repeats only what must be repeated: the open round of the copy that still
    /// carried much (not the quiet one), and after the commit only the install that failed.
    #[test]
    fn a_stage_runs_again_only_the_steps_that_need_it() {
        let plan = replicated_join_plan();
        let target = plan.metadata.version;
        let busy = plan.copies[0].clone();
        let installs = plan.installed_at();
        assert!(installs.len() >= 3, "{installs:?}");
        let flaky = installs[1].clone();
        let (exec, first) = Executor::new(plan.clone(), 1);
        let mut failed_install = false;
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::TransferDelta {
                last: false, range, ..
            }) if *range == busy.range => ok_at(0, 10_000),
            Seen::Run(Step::Install { node }) if node.name == flaky && !failed_install => {
                failed_install = true;
                Outcome::Failed("no reply within 5s".into())
            }
            _ => ok_at(target, 0),
        });
        assert!(matches!(actions.last(), Some(Seen::Finish(Ok(_)))));
        let steps = steps_run(&actions);
        let open_rounds = |range: &KeyRange| {
            steps
                .iter()
                .filter(|s| matches!(s, Step::TransferDelta { last: false, range: r, .. } if r == range))
                .count() as u32
        };
        assert_eq!(open_rounds(&busy.range), MAX_PRECOPY_ROUNDS);
        for c in &plan.copies[1..] {
            if c.range != busy.range {
                assert_eq!(open_rounds(&c.range), 1, "{c:?}");
            }
        }
        for name in &installs {
            let times = steps
                .iter()
                .filter(|s| matches!(s, Step::Install { node } if node.name == *name))
                .count();
            assert_eq!(times, if *name == flaky { 2 } else { 1 }, "{name}");
        }
    }

    /// A rollback names the step that failed, not one abandoned because of it.
    #[test]
    fn a_rollback_blames_the_failed_step_not_an_abandoned_one() {
        let plan = two_copy_join_plan();
        assert_eq!(plan.copies.len(), 2);
        let failing = plan.copies[1].range;
        let (exec, first) = Executor::new(plan, 1);
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::Transfer { range, .. }) if *range == failing => {
                Outcome::Failed("disk full".into())
            }
            Seen::Run(Step::Transfer { .. }) => Outcome::Unknown(ABANDONED.into()),
            _ => Outcome::ok(),
        });
        match actions.last() {
            Some(Seen::Finish(Err((step, reason)))) => {
                assert_eq!(reason, "disk full");
                assert!(step.contains(&format!("{failing:?}")), "{step}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failure_before_the_commit_rolls_back_until_both_aborts_land() {
        let plan = join_plan();
        let receiver = plan.copies[0].to.clone();
        let (exec, first) = Executor::new(plan.clone(), 1);
        let mut abort_failures = 2;
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::Lock { .. }) => Outcome::Failed("timeout".into()),
            Seen::Run(Step::Abort { node, .. }) if abort_failures > 0 || *node == receiver => {
                abort_failures -= 1;
                Outcome::Failed("unreachable".into())
            }
            _ => Outcome::ok(),
        });
        assert!(!actions.iter().any(|a| matches!(a, Seen::Commit(_))));
        assert!(actions
            .iter()
            .any(|a| matches!(a, Seen::Persist(i) if i.phase == Phase::RollingBack)));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Seen::Persist(i) if i.lock_sent && i.phase == Phase::Forward)),
            "the lock is recorded before it is sent"
        );
        let aborts = actions
            .iter()
            .filter(|a| matches!(a, Seen::Run(Step::Abort { .. })))
            .count();
        assert_eq!(
            aborts, 4,
            "the sender's twice retried until delivered, the receiver's tried once"
        );
        assert_eq!(
            actions.iter().filter(|a| matches!(a, Seen::Wait)).count(),
            2
        );
        match actions.last() {
            Some(Seen::Finish(Err((step, reason)))) => {
                assert!(step.contains("write-lock"), "{step}");
                assert_eq!(reason, "timeout");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_replicated_rollback_retries_every_lock_holder_and_tries_receivers_once() {
        let plan = replicated_join_plan();
        assert!(plan.copies.len() >= 3, "{:#?}", plan.copies);
        let rollback = plan.rollback();
        let locks = plan.locks().len();
        assert!(locks >= 3);
        let (exec, first) = Executor::new(plan.clone(), 1);
        // Fail the last round; every abort fails once.
        let mut failed_once = Vec::new();
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::TransferDelta { last: true, .. }) => Outcome::Failed("boom".into()),
            Seen::Run(step @ Step::Abort { .. }) if !failed_once.contains(step) => {
                failed_once.push(step.clone());
                Outcome::Failed("unreachable".into())
            }
            _ => Outcome::ok(),
        });
        let aborts = steps_run(&actions)
            .into_iter()
            .filter(|s| matches!(s, Step::Abort { .. }))
            .collect::<Vec<_>>();
        // Every lock holder's abort at once, then again those that failed (all of them),
        // then every receiver's once.
        let (holders, receivers) = rollback.split_at(locks);
        let want: Vec<Step> = [holders, holders, receivers].concat();
        assert_eq!(aborts, want);
        assert!(matches!(actions.last(), Some(Seen::Finish(Err(_)))));
    }

    #[test]
    fn a_failure_before_the_lock_does_not_wait_for_an_unreachable_sender() {
        let (exec, first) = Executor::new(join_plan(), 1);
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::Transfer { .. } | Step::Abort { .. }) => {
                Outcome::Failed("cannot connect".into())
            }
            _ => Outcome::ok(),
        });
        assert!(!actions.iter().any(|a| matches!(a, Seen::Wait)));
        assert!(matches!(actions.last(), Some(Seen::Finish(Err(_)))));
    }

    #[test]
    fn after_the_commit_an_install_is_retried_until_the_node_holds_the_version() {
        let plan = join_plan();
        let target = plan.metadata.version;
        let sender = plan.copies[0].from.clone();
        let (exec, first) = Executor::new(plan, 1);
        let mut tries = 0;
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::Install { node }) if *node == sender => {
                tries += 1;
                match tries {
                    1 => Outcome::Failed("no reply within 5s".into()),
                    2 => ok_at(target - 1, 0), // answered, but did not adopt
                    _ => ok_at(target, 0),
                }
            }
            _ => ok_at(target, 0),
        });
        assert_eq!(tries, 3);
        // Nothing was run at the receiver before the sender held the version.
        let first_sender_ok = actions
            .iter()
            .rposition(|a| matches!(a, Seen::Run(Step::Install { node }) if *node == sender))
            .unwrap();
        assert!(!actions[..first_sender_ok]
            .iter()
            .any(|a| matches!(a, Seen::Run(Step::Install { node }) if *node != sender)));
        assert!(matches!(actions.last(), Some(Seen::Finish(Ok(_)))));
    }

    #[test]
    fn resume_finishes_a_committed_change_and_rolls_back_any_other() {
        let plan = join_plan();
        let target = plan.metadata.version;
        let committed = Intent {
            change: 4,
            plan: plan.clone(),
            phase: Phase::Committed,
            failure: None,
            lock_sent: true,
        };
        let (exec, first) = Executor::resume(committed);
        let actions = run(exec, first, |_| ok_at(target, 0));
        assert_eq!(steps_run(&actions), plan.steps[plan.commit_index() + 1..]);
        let forward = Intent {
            change: 4,
            plan: plan.clone(),
            phase: Phase::Forward,
            failure: None,
            lock_sent: true,
        };
        let (exec, first) = Executor::resume(forward);
        let actions = run(exec, first, |_| Outcome::ok());
        assert_eq!(steps_run(&actions), plan.rollback());
        assert!(matches!(actions.last(), Some(Seen::Finish(Err(_)))));
    }

    #[test]
    fn an_unknown_commit_is_proposed_again_and_never_rolled_back() {
        let plan = join_plan();
        let target = plan.metadata.version;
        let (exec, first) = Executor::new(plan, 1);
        let mut commits = 0;
        let actions = run(exec, first, |a| match a {
            Seen::Commit(_) => {
                commits += 1;
                if commits < 3 {
                    Outcome::Unknown("not committed within 5s".into())
                } else {
                    Outcome::ok()
                }
            }
            _ => ok_at(target, 0),
        });
        assert_eq!(commits, 3, "proposed again until the outcome is known");
        assert!(!steps_run(&actions)
            .iter()
            .any(|s| matches!(s, Step::Abort { .. })));
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Seen::Persist(i) if i.phase == Phase::RollingBack)));
        assert!(matches!(actions.last(), Some(Seen::Finish(Ok(_)))));
        // Step by step: after the unknown outcome it waits, says so, and proposes again.
        let (mut exec, mut action) = Executor::new(join_plan(), 1);
        while !matches!(action, Action::Commit(_)) {
            action = exec.next(match &action {
                Action::Run(steps) => Outcome::Ran(vec![ok_at(target, 0); steps.len()]),
                _ => ok_at(target, 0),
            });
        }
        assert!(matches!(
            exec.next(Outcome::Unknown("t".into())),
            Action::Wait(_)
        ));
        assert!(exec.resolving_commit() && !exec.committed());
        assert!(matches!(exec.next(Outcome::ok()), Action::Commit(_)));
        // A commit that certainly failed still rolls back.
        let (exec, first) = Executor::new(join_plan(), 1);
        let actions = run(exec, first, |a| match a {
            Seen::Commit(_) => Outcome::Failed("refused by the state machine".into()),
            _ => Outcome::ok(),
        });
        assert!(matches!(actions.last(), Some(Seen::Finish(Err(_)))));
    }

    #[test]
    fn no_abort_goes_out_before_the_rollback_is_persisted() {
        let (exec, first) = Executor::new(join_plan(), 1);
        let mut rollback_persists = 0;
        let actions = run(exec, first, |a| match a {
            Seen::Run(Step::TransferDelta { last: true, .. }) => Outcome::Failed("boom".into()),
            Seen::Persist(i) if i.phase == Phase::RollingBack => {
                rollback_persists += 1;
                match rollback_persists {
                    1 => Outcome::Failed("no majority".into()),
                    2 => Outcome::Unknown("not committed within 5s".into()),
                    _ => Outcome::ok(),
                }
            }
            _ => Outcome::ok(),
        });
        let landed = actions
            .iter()
            .enumerate()
            .filter(|(_, a)| matches!(a, Seen::Persist(i) if i.phase == Phase::RollingBack))
            .map(|(i, _)| i)
            .nth(2)
            .expect("the rollback persisted a third time");
        let first_abort = actions
            .iter()
            .position(|a| matches!(a, Seen::Run(Step::Abort { .. })))
            .unwrap();
        assert!(
            first_abort > landed,
            "an abort went out before the rollback was persisted: {actions:?}"
        );
    }

    #[test]
    fn no_lock_goes_out_before_lock_sent_is_persisted() {
        let plan = join_plan();
        let target = plan.metadata.version;
        let (exec, first) = Executor::new(plan, 1);
        let mut failed = false;
        let actions = run(exec, first, |a| match a {
            Seen::Persist(i) if i.lock_sent && !failed => {
                failed = true;
                Outcome::Failed("disk full".into())
            }
            _ => ok_at(target, 0),
        });
        let lock = actions
            .iter()
            .position(|a| matches!(a, Seen::Run(Step::Lock { .. })))
            .unwrap();
        assert!(
            matches!(&actions[lock - 1], Seen::Persist(i) if i.lock_sent),
            "the lock follows a persist of lock_sent that landed: {actions:?}"
        );
    }

    #[test]
    fn a_proposal_failed_only_when_it_certainly_did_not_commit() {
        use crate::raft::Refusal;
        let failed =
            |e: RaftError| matches!(Outcome::of_proposal(&Err::<(), _>(e)), Outcome::Failed(_));
        assert!(failed(RaftError::Refused(Refusal::StaleRing {
            current: 3,
            proposed: 3
        })));
        assert!(failed(RaftError::TooLarge { bytes: 2, max: 1 }));
        assert!(!failed(RaftError::Timeout(Duration::from_secs(5))));
        assert!(!failed(RaftError::ForwardToLeader { leader: None }));
        assert!(!failed(RaftError::NoQuorum("x".into())));
        assert!(!failed(RaftError::Stopped("x".into())));
        assert_eq!(
            Outcome::of_proposal(&Ok::<(), RaftError>(())),
            Outcome::ok()
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), RETRY_INITIAL);
        assert_eq!(backoff(2), RETRY_INITIAL * 2);
        assert_eq!(backoff(30), RETRY_MAX);
    }
}
