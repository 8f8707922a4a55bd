//! The fence manager: every coordinator runs it; only the one holding the primary duties acts.
//!
//! ```text
//!  every 100 ms (at once when a lost node's fence_after_ms runs out), while primary:
//!    facts (applied node records, heartbeat verdicts, Raft acks, BMC readings) ─▶ decide()
//!      Fence ─▶ DecideFence (proposed locally: a deposed primary's decision fails)
//!    every pending fence without an executor here ─▶ executor (≤ fence.max_parallel at once)
//!    BMC checks (chassis status, every check_interval; every second for a Raft-silent node)
//!      ─▶ SetFenceReady when readiness changes (and one log line per change)
//!    a failed fence whose victim self-fences by policy ─▶ FenceDone SelfFenced once old enough
//!  executor: saving throw (heard again? CancelFence) ─▶ power off ─▶ poll status until off or
//!    the deadline ─▶ FenceDone Fenced | Failed ─▶ (fence_action reboot) power on again
//!  a power-on still due after a fence (power_on_due_ms: its primary went away) ─▶ power on again
//! ```
//! Decisions and outcomes are Raft commands; the model recovers the VMs when `FenceDone Fenced`
//! applies. A new primary finds pending fences in the state and executes them again: a
//! power-off is idempotent and a second outcome is refused by the model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;
use herd_storage::model::{
    Command, DaemonState, FenceAction, FenceOutcome, FencePolicy, NodeId, NodeRecord, PendingFence, Role,
};
use openraft::async_runtime::watch::WatchReceiver;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::agent::{Action, FenceAgent, Fencer, Power, Purpose};
use super::decide::{decide, due_in_ms, heard_again, Context, Decision, Facts, SinceDecision};
use crate::heartbeat::agent::Agent;
use crate::heartbeat::verdict::Verdict;
use crate::primary::manager::Manager;
use crate::tasks::Tasks;
use herd_raft::clock::ms;

const TICK: Duration = Duration::from_millis(100);
/// The shortest wait between two rounds (a fence due now is decided in the next round).
const MIN_TICK: Duration = Duration::from_millis(5);
/// How long the primary waits for another coordinator to say when it heard a client's session.
pub(super) const SESSIONS_ASK_TIMEOUT: Duration = Duration::from_millis(200);
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// A Raft-silent node's BMC is read this often (a powered-off node is dead, even under MNFA).
const SILENT_CHECK: Duration = Duration::from_secs(1);
const CONFIRM_POLL: Duration = Duration::from_millis(200);
/// A due power-on after a fence (one an earlier primary did not finish) is tried this often.
const POWER_ON_RETRY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub role: Role,
    pub max_parallel: usize,
    pub check_interval: Duration,
    pub call_timeout: Duration,
    pub confirm_timeout: Duration,
    pub retry_after_ms: u64,
}

/// The last BMC reading of a node, as this coordinator saw it.
#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    power: Option<Power>,
}

#[derive(Default)]
struct Local {
    /// When this node took the primary office (None while it does not hold the duties).
    took_office: Option<Instant>,
    /// Per node, the pending decision (its `decided_ms`) and when this primary first saw it
    /// standing: evidence of life counts in the saving throw only from then on.
    seen: BTreeMap<String, (u64, Instant)>,
    /// Nodes whose fence runs in this process.
    executing: BTreeSet<String>,
    /// Nodes whose BMC check runs now.
    checking: BTreeSet<String>,
    readings: BTreeMap<String, Reading>,
    /// Readiness last logged per node (one line per change).
    logged: BTreeMap<String, bool>,
    /// Last attempt to record a node as self-fenced (at most one a second: each is a log entry).
    self_fenced_tried: BTreeMap<String, Instant>,
    /// Last attempt to power a fenced node on again (`power_on_due_ms`), at most one per
    /// `POWER_ON_RETRY`.
    power_on_tried: BTreeMap<String, Instant>,
}

pub struct FenceManager {
    settings: Settings,
    pub(super) node: Arc<ClusterNode<LogStore>>,
    heartbeat: Arc<Agent>,
    primary: Arc<Manager>,
    fencer: Arc<dyn Fencer>,
    slots: Arc<Semaphore>,
    local: Mutex<Local>,
    /// The executors and BMC checks this manager started: aborted when the duties drop and
    /// when it stops.
    tasks: Tasks,
    /// After confirmed power-offs: the outcome's record and the power-on; aborted when it stops.
    aftercare: Tasks,
}

impl FenceManager {
    pub fn new(
        settings: Settings,
        node: Arc<ClusterNode<LogStore>>,
        heartbeat: Arc<Agent>,
        primary: Arc<Manager>,
        fencer: Arc<dyn Fencer>,
    ) -> Arc<FenceManager> {
        let slots = Arc::new(Semaphore::new(settings.max_parallel));
        Arc::new(FenceManager {
            settings,
            node,
            heartbeat,
            primary,
            fencer,
            slots,
            local: Mutex::default(),
            tasks: Tasks::new(),
            aftercare: Tasks::new(),
        })
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until shutdown (or until aborted); acts only while this node holds the primary
    /// duties. Its executors and checks stop with it.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        if self.settings.role != Role::Coordinator {
            return;
        }
        // The manager's tasks stop however `run` ends (returned or aborted).
        let (_stop, _stop_aftercare) = (self.tasks.abort_on_drop(), self.aftercare.abort_on_drop());
        self.decide_until(shutdown).await;
    }

    async fn decide_until(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let (mut primary_since, mut next): (Option<Instant>, _) = (None, TICK);
        let mut last_check = BTreeMap::<String, Instant>::new();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(next) => {}
            }
            next = TICK;
            if !self.primary.holding() {
                if primary_since.take().is_some() {
                    self.drop_duties();
                }
                continue;
            }
            let since = *primary_since.get_or_insert_with(|| {
                let now = Instant::now();
                self.local().took_office = Some(now);
                now
            });
            next = self.round(since, &mut last_check).await.clamp(MIN_TICK, TICK);
        }
    }

    /// The duties dropped: the executors and checks stop (an executor that lost the role must
    /// not send a power-off; a pending fence is the next primary's to execute).
    fn drop_duties(&self) {
        self.tasks.abort_all();
        let mut l = self.local();
        let stopped = std::mem::take(&mut l.executing);
        l.checking.clear();
        l.seen.clear();
        l.took_office = None;
        if !stopped.is_empty() {
            tracing::warn!(nodes = ?stopped, "primary duties dropped: fence executors stopped");
        }
    }

    /// The Raft responses this leader received since it took office at `office`: node → ms
    /// ago. openraft gives every follower a progress instant when it becomes leader; those are
    /// not answers, and they are older than the office, so they are left out.
    /// A client outside Raft (issue 22): the most recent time any coordinator heard its session.
    async fn raft_heard_ago(&self, office: Instant, clients: &[NodeId]) -> BTreeMap<NodeId, u64> {
        let Some(member) = self.node.member() else { return BTreeMap::new() };
        let acks = member.raft.metrics().borrow_watched().heartbeat.clone();
        let office_ago = ms(office.elapsed());
        let mut heard: BTreeMap<NodeId, u64> = acks
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, t)| Some((id, ms(openraft::Instant::elapsed(&*t?)))))
            .collect();
        for (id, ago) in self.node.sessions_heard_everywhere(clients, SESSIONS_ASK_TIMEOUT).await {
            heard.entry(id).and_modify(|a| *a = (*a).min(ago)).or_insert(ago);
        }
        heard.retain(|_, ago| *ago < office_ago);
        heard
    }

    /// The chassis power `name`'s BMC last reported, if that reading is recent.
    fn power(&self, name: &str) -> Option<Power> {
        self.local().readings.get(name).filter(|r| r.at.elapsed() < 3 * SILENT_CHECK).and_then(|r| r.power)
    }

    /// Which of `ids` are clients outside Raft (registered, not in the Raft membership).
    pub(super) fn clients(&self, ids: impl IntoIterator<Item = NodeId>) -> Vec<NodeId> {
        let m = self.node.member().map(|m| m.raft.metrics().borrow_watched().membership_config.clone());
        m.map_or(Vec::new(), |m| ids.into_iter().filter(|id| m.membership().get_node(id).is_none()).collect())
    }

    /// One look at every node; returns how soon a waiting fence falls due (at most [`TICK`]).
    async fn round(self: &Arc<Self>, since: Instant, last_check: &mut BTreeMap<String, Instant>) -> Duration {
        let Some(member) = self.node.member() else { return TICK };
        let (nodes, maintenance) = {
            let g = member.view.read();
            (g.state.nodes.clone(), g.state.meta.as_ref().is_some_and(|m| m.maintenance))
        };
        // Silent since the last response this leader received, or since it took office; only
        // the clients the heartbeat lost or whose BMC reports the power off asked about.
        let v = self.heartbeat.verdicts();
        let lost = |id: &NodeId| v.get(id).is_some_and(|v| v.verdict == Verdict::Lost);
        let off = |r: &&NodeRecord| self.power(&r.name) == Some(Power::Off) || lost(&r.id);
        let asked = self.clients(nodes.values().filter(off).map(|r| r.id));
        let silence = self.raft_heard_ago(since, &asked).await;
        // The question may take 200 ms: decide on the verdicts as they are then (sim seed 2632);
        // a client not asked was neither lost nor off: heard, this round (t94).
        let verdicts = self.heartbeat.verdicts();
        let mnfa = self.heartbeat.mnfa_active();
        let unasked = self.clients(nodes.values().map(|r| r.id).filter(|id| !asked.contains(id)));
        let now_ms = herd_raft::clock::wall_ms();
        let primary_for_ms = ms(since.elapsed());
        let running = self.local().executing.len();
        let ctx = Context {
            now_ms,
            primary_for_ms,
            mnfa,
            maintenance,
            running,
            max_parallel: self.settings.max_parallel,
            retry_after_ms: self.settings.retry_after_ms,
        };
        let mut soonest = TICK;
        for rec in nodes.values() {
            let Some(policy) = rec.fencing.clone() else { continue };
            let silent =
                if unasked.contains(&rec.id) { 0 } else { silence.get(&rec.id).copied().unwrap_or(primary_for_ms) };
            let is_self = rec.name == self.settings.name;
            // BMC readiness: every check_interval; every second for a node silent on Raft.
            let due = if silent >= policy.fence_after_ms { SILENT_CHECK } else { self.settings.check_interval };
            // No readiness check while its fence is pending: the executor has the BMC.
            if rec.fence.pending.is_none() && last_check.get(&rec.name).is_none_or(|t| t.elapsed() >= due) {
                last_check.insert(rec.name.clone(), Instant::now());
                self.spawn_check(rec, policy.clone());
            }
            if let Some(p) = &rec.fence.pending {
                self.spawn_execute(rec, p.decided_ms, policy.clone());
                continue;
            }
            if rec.fence.power_on_due_ms.is_some() && rec.daemon_state == DaemonState::Fenced {
                self.spawn_power_on(&rec.name, policy.clone());
            }
            let power = self.power(&rec.name);
            let facts = Facts { record: rec, is_self, verdict: verdicts.get(&rec.id), raft_silent_ms: silent, power };
            soonest = due_in_ms(&facts).map_or(soonest, |ms| soonest.min(Duration::from_millis(ms)));
            match decide(&ctx, &facts) {
                Decision::Fence { reason } => {
                    tracing::warn!(node = %rec.name, %reason, "fence decided");
                    let cmd = Command::DecideFence { name: rec.name.clone(), reason, manual: false };
                    match self.node.write_local(vec![cmd.into()], WRITE_TIMEOUT).await {
                        // Applied here before the write returns: the decision's stamp is read
                        // back, and its executor starts at once.
                        Ok(_) => match self.pending(&rec.name) {
                            Some(p) => self.spawn_execute(rec, p.decided_ms, policy.clone()),
                            None => tracing::warn!(node = %rec.name, "fence decided, but no longer pending here"),
                        },
                        Err(e) => tracing::warn!(node = %rec.name, "fence decision not committed: {e}"),
                    }
                }
                Decision::Wait { why } => tracing::debug!(node = %rec.name, %why, "fence: waiting"),
                Decision::Spare => {}
            }
            self.maybe_self_fenced(rec, &policy, now_ms).await;
        }
        soonest
    }

    /// Whether to try recording `name` self-fenced now: at most once a second (each try is a
    /// log entry).
    pub(super) fn self_fenced_try(&self, name: &str) -> bool {
        let mut l = self.local();
        if l.self_fenced_tried.get(name).is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return false;
        }
        l.self_fenced_tried.insert(name.to_string(), Instant::now());
        true
    }

    fn spawn_check(self: &Arc<Self>, rec: &NodeRecord, policy: FencePolicy) {
        if !self.local().checking.insert(rec.name.clone()) {
            return;
        }
        let (me, name, was) = (self.clone(), rec.name.clone(), rec.fence.ready);
        self.tasks.spawn(async move {
            let agent = me.fencer.agent(&policy);
            let result = agent.call_for(Action::Status, me.settings.call_timeout, Purpose::Check).await;
            let (ready, reason, power) = match &result {
                Ok(p) => (true, None, Some(*p)),
                Err(e) => (false, Some(e.to_string()), None),
            };
            {
                let mut l = me.local();
                l.checking.remove(&name);
                l.readings.insert(name.clone(), Reading { at: Instant::now(), power });
                if l.logged.insert(name.clone(), ready) != Some(ready) {
                    match &reason {
                        None => tracing::info!(node = %name, power = ?power, "fencing ready: BMC answers"),
                        Some(r) => tracing::warn!(node = %name, reason = %r, "node cannot be fenced: BMC check failed"),
                    }
                }
            }
            if was != Some(ready) {
                let cmd = Command::SetFenceReady { name: name.clone(), ready, reason };
                if let Err(e) = me.node.write_local(vec![cmd.into()], WRITE_TIMEOUT).await {
                    tracing::debug!(node = %name, "fence readiness not recorded: {e}");
                }
            }
        });
    }

    /// The decision pending for `name` in this node's applied state.
    fn pending(&self, name: &str) -> Option<PendingFence> {
        let member = self.node.member()?;
        let g = member.view.read();
        g.state.nodes.get(name).and_then(|n| n.fence.pending.clone())
    }

    /// Starts the executor of the decision made at `decided_ms` (one per node at a time).
    fn spawn_execute(self: &Arc<Self>, rec: &NodeRecord, decided_ms: u64, policy: FencePolicy) {
        let (name, id) = (rec.name.clone(), rec.id);
        let seen = {
            let mut l = self.local();
            let seen = l.seen.entry(name.clone()).or_insert((decided_ms, Instant::now()));
            if seen.0 != decided_ms {
                *seen = (decided_ms, Instant::now());
            }
            let seen = seen.1;
            if !l.executing.insert(name.clone()) {
                return;
            }
            seen
        };
        let me = self.clone();
        self.tasks.spawn(async move {
            let permit = me.slots.clone().acquire_owned().await;
            let handed_over = me.execute(&name, &policy, id, decided_ms, seen).await;
            drop(permit);
            if !handed_over {
                me.local().executing.remove(&name);
            }
        });
    }

    /// What this primary knows of `id`'s life since the decision made at `decided_ms` (and at
    /// least since `seen`, when it first saw it standing): Raft responses this leader received
    /// in that time and since it took office, answers to this coordinator's pulses and other
    /// coordinators' views from that time.
    async fn evidence_since(&self, id: NodeId, decided_ms: u64, seen: Instant) -> SinceDecision {
        if self.node.member().is_some_and(|m| m.id == id) {
            // The victim is this very primary, running: alive beyond doubt (a decision inherited
            // from a primary that lost it while this node was away).
            return SinceDecision { is_self: true, ..Default::default() };
        }
        // Since the decision: on the leader's stamp against this node's clock (clocks agree to
        // NTP precision; a clock ahead can only admit a little older evidence — a cancel, the
        // safe direction), and at least since this primary first saw it standing.
        let within = ms(seen.elapsed()).max(herd_raft::clock::wall_ms().saturating_sub(decided_ms));
        let office = self.local().took_office;
        let heard = match office {
            Some(o) => self.raft_heard_ago(o, &self.clients([id])).await.get(&id).copied(),
            None => None,
        };
        let raft_heard_ago_ms = heard.filter(|ago| *ago < within);
        SinceDecision {
            is_self: false,
            raft_heard_ago_ms,
            heartbeat: self.heartbeat.heard_within(id, within),
            mnfa: self.heartbeat.mnfa_active(),
        }
    }

    /// The fencing token: this node holds the primary role (its lease confirmed) now, and the
    /// decision made at `decided_ms` still stands — checked by committing `ExecuteFence`,
    /// proposed locally only (a deposed leader cannot commit it); the role is checked again
    /// once it is committed. Only then may the power-off go out.
    async fn fencing_token(&self, name: &str, decided_ms: u64) -> bool {
        if crate::breakage::is(crate::breakage::Breakage::FenceWithoutToken) {
            return true;
        }
        let Some(by) = self.node.member().map(|m| m.id) else { return false };
        if !self.primary.holding() {
            tracing::warn!(node = %name, "not the primary any more: power-off not sent");
            return false;
        }
        let cmd = Command::ExecuteFence { name: name.into(), decided_ms, by };
        if let Err(e) = self.node.write_local(vec![cmd.into()], WRITE_TIMEOUT).await {
            tracing::warn!(node = %name, "fencing token refused ({e}): power-off not sent");
            return false;
        }
        if !self.primary.holding() {
            tracing::warn!(node = %name, "lost the primary role while taking the fencing token: power-off not sent");
            return false;
        }
        true
    }

    /// Executes the decision made at `decided_ms`. True when the power is off and the rest
    /// (recording it, powering on again) was handed to an aftercare task.
    async fn execute(
        self: &Arc<Self>,
        name: &str,
        policy: &FencePolicy,
        id: NodeId,
        decided_ms: u64,
        seen: Instant,
    ) -> bool {
        // Re-validated after the slot: the decision this executor was started for must stand.
        let Some(pending) = self.pending(name).filter(|p| p.decided_ms == decided_ms) else {
            tracing::info!(node = %name, "the fence decision no longer stands: not executed");
            return false;
        };
        let started = Instant::now();
        let agent = self.fencer.agent(policy);
        // An earlier executor (a primary since gone) took the token: its power-off may still be
        // carried out by the BMC. Confirm the power state before anything else.
        let done_earlier = pending.executing_ms.is_some()
            && {
                tracing::warn!(node = %name, bmc = %policy.bmc, "fencing: a power-off was sent before; confirming it first");
                self.confirm_off(&*agent).await.is_ok()
            };
        if !done_earlier {
            // The saving throw and the token come right before the power-off, on what is known
            // then (a confirmation wait may have taken seconds).
            if self.pending(name).is_none_or(|p| p.decided_ms != decided_ms) {
                tracing::info!(node = %name, "the fence decision no longer stands: not executed");
                return false;
            }
            if !pending.manual {
                if let Some(why) = heard_again(&self.evidence_since(id, decided_ms, seen).await) {
                    tracing::warn!(node = %name, %why, "fence cancelled: the node was heard again");
                    let reason = format!("heard again before the power-off: {why}");
                    self.record(name, Command::CancelFence { name: name.into(), reason }).await;
                    return false;
                }
            }
            if !self.fencing_token(name, decided_ms).await {
                return false;
            }
            if let Err(reason) = self.send_off(name, &policy.bmc, &*agent).await {
                tracing::error!(node = %name, %reason, "fence failed");
                let outcome = FenceOutcome::Failed { reason };
                self.record(name, Command::FenceDone { name: name.into(), outcome }).await;
                return false;
            }
        }
        tracing::warn!(node = %name, elapsed_ms = ms(started.elapsed()), "fenced: power-off confirmed");
        self.local().readings.insert(name.into(), Reading { at: Instant::now(), power: Some(Power::Off) });
        // The power is off: recording it and powering the node on again are not stopped when
        // the duties drop (they send no power-off); they end with the manager.
        let (me, name, policy) = (self.clone(), name.to_string(), policy.clone());
        self.aftercare.spawn(async move {
            me.after_power_off(&name, &policy, &*agent).await;
            me.local().executing.remove(&name);
        });
        true
    }

    /// Records a confirmed fence and, with `fence_action = reboot`, powers the node on again.
    async fn after_power_off(&self, name: &str, policy: &FencePolicy, agent: &dyn FenceAgent) {
        if !self.record(name, Command::FenceDone { name: name.into(), outcome: FenceOutcome::Fenced }).await {
            return;
        }
        if policy.fence_action == FenceAction::Reboot {
            self.local().power_on_tried.insert(name.into(), Instant::now());
            self.power_on(name, agent).await;
        }
    }

    /// A power-on after a fence that is still due (its executor's primary went away before it,
    /// or it failed): tried again by this primary, unless this process's aftercare has it.
    fn spawn_power_on(self: &Arc<Self>, name: &str, policy: FencePolicy) {
        {
            let mut l = self.local();
            if l.executing.contains(name) || l.power_on_tried.get(name).is_some_and(|t| t.elapsed() < POWER_ON_RETRY) {
                return;
            }
            l.power_on_tried.insert(name.into(), Instant::now());
        }
        tracing::warn!(node = %name, "the power-on after its fence is still due: powering on");
        let (me, name) = (self.clone(), name.to_string());
        self.tasks.spawn(async move {
            let agent = me.fencer.agent(&policy);
            me.power_on(&name, &*agent).await;
        });
    }

    /// Powers a fenced node on again (`fence_action = reboot`) and records how it went.
    async fn power_on(&self, name: &str, agent: &dyn FenceAgent) {
        let error = agent.call(Action::On, self.settings.call_timeout).await.err().map(|e| e.to_string());
        // The reading taken while it was off is stale now: the dead-on-BMC path must not act on
        // it (soak seed 60170: a node fenced again 0.8 s after its power-on, on the old "off").
        {
            let mut l = self.local();
            match error {
                None => l.readings.insert(name.into(), Reading { at: Instant::now(), power: Some(Power::On) }),
                Some(_) => l.readings.remove(name),
            };
        }
        match &error {
            None => tracing::info!(node = %name, "powered on again after its fence (fence_action = reboot)"),
            Some(e) => tracing::warn!(node = %name, "power on after the fence failed: {e}"),
        }
        self.record(name, Command::FencePowerOn { name: name.into(), error }).await;
    }

    /// Powers the node off through `agent` and confirms it (chassis status polled until off,
    /// up to `confirm_timeout`). Err: what failed.
    async fn send_off(&self, name: &str, bmc: &str, agent: &dyn FenceAgent) -> Result<(), String> {
        tracing::warn!(node = %name, %bmc, "fencing: power off");
        let off = agent.call(Action::Off, self.settings.call_timeout).await;
        if let Err(e) = &off {
            tracing::warn!(node = %name, "power off: {e}; polling the power state anyway");
        }
        self.confirm_off(agent).await.map_err(|last| {
            let sent = off.err().map_or(String::new(), |e| format!(" (the power-off itself: {e})"));
            format!("power-off not confirmed within {:?}: {last}{sent}", self.settings.confirm_timeout)
        })
    }

    /// Polls chassis status until it reads off or `confirm_timeout` passes; Err: the last
    /// thing that was wrong.
    async fn confirm_off(&self, agent: &dyn FenceAgent) -> Result<(), String> {
        let deadline = Instant::now() + self.settings.confirm_timeout;
        loop {
            let budget =
                self.settings.call_timeout.min(deadline.saturating_duration_since(Instant::now()).max(CONFIRM_POLL));
            let last_error = match agent.call(Action::Status, budget).await {
                Ok(Power::Off) => return Ok(()),
                Ok(Power::On) => "the BMC still reports the power on".to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() + CONFIRM_POLL >= deadline {
                return Err(last_error);
            }
            tokio::time::sleep(CONFIRM_POLL).await;
        }
    }

    /// Writes a fence outcome from this executor; true when committed.
    async fn record(&self, name: &str, cmd: Command) -> bool {
        for attempt in 0..3 {
            match self.node.write(vec![cmd.clone().into()], WRITE_TIMEOUT).await {
                Ok(_) => return true,
                Err(herd_raft::node::NodeError::Apply(e)) => {
                    tracing::warn!(node = %name, "fence record refused: {e}");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(node = %name, attempt, "fence record not committed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        false
    }

    /// For `herd status`: the readings this coordinator holds (when it is the primary).
    pub fn readings(&self) -> BTreeMap<String, (Option<Power>, u64)> {
        self.local().readings.iter().map(|(n, r)| (n.clone(), (r.power, ms(r.at.elapsed())))).collect()
    }
}
