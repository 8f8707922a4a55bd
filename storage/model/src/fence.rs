//! Fencing in the replicated model: each node's published policy, the fence decision, its
//! outcome, and the recovery of a fenced node's VMs. Pure, like the rest of `model`.
//!
//! ```text
//!  DecideFence ─▶ pending ─┬─ CancelFence (heard again: the saving throw)
//!                          ├─ FenceDone Failed ─▶ failure recorded, nothing started
//!                          └─ FenceDone Fenced ─▶ daemon_state fenced, domain_state fence-flush
//!                                ─▶ (successful_fence = migrate) every VM that should run placed
//!                                   elsewhere, keeping last_node ─▶ domain_state flushed
//!  FenceDone Fenced with fence_action = reboot ─▶ power_on_due until FencePowerOn (done), the
//!  node is back, or POWER_ON_GIVE_UP_MS have passed.
//!  FenceDone SelfFenced: after a failed fence, only with failed_fence = recover-after-self-fence
//!  and the node's last committed keepalive older than self_fence_after + watchdog + margin;
//!  FenceDone SessionsQuiet: the same for a client that self-fences on its session, with the
//!  primary's evidence that no coordinator can have acknowledged it for as long.
//! ```
//! The executor (the primary) acts outside the log; this module only records and checks.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::apply::{check_revision, own_record, push_event};
use crate::place::place;
use crate::self_fence::certainly_self_fenced;
use crate::types::*;

/// Added to a self-fencing node's deadlines before its VMs may be recovered: the slack for
/// the watchdog's own tick and the host's reset.
pub const SELF_FENCE_MARGIN_MS: u64 = 5_000;

/// How long after a fence its power-on (`fence_action = reboot`) is retried: after that, a node
/// still off is the operator's (it may have been switched off on purpose).
pub const POWER_ON_GIVE_UP_MS: u64 = 10 * 60_000;

/// Bounds on the published policy (it lives in the replicated state).
const MAX_POLICY_FIELD: usize = 1024;
/// The password field: a sealed one (see herd-raft's `tls/pki.rs`) is hex, twice as long plus 106.
const MAX_POLICY_SECRET: usize = 4096;
const MAX_AGENT_OPTIONS: usize = 32;

/// Which fence agent fences a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceAgentKind {
    /// Built-in IPMI over LAN (RMCP+, cipher suite 3, Administrator).
    #[default]
    Ipmi,
    /// An executable speaking the fence-agents stdin protocol (`fence_ipmilan`, `fence_redfish`…).
    External,
}

/// What a fence does to the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceAction {
    /// Power off, confirm, recover the VMs, then power on again.
    #[default]
    Reboot,
    /// Power off and leave it off.
    Off,
}

/// What follows a confirmed fence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuccessfulFence {
    /// Start the node's VMs elsewhere.
    #[default]
    Migrate,
    /// Leave them to the operator.
    None,
}

/// What follows a fence that could not be confirmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailedFence {
    /// Nothing is started elsewhere: a VM must never run twice.
    #[default]
    None,
    /// The node self-fences (watchdog armed); its VMs are recovered once its last committed
    /// keepalive is old enough that it has certainly done so.
    RecoverAfterSelfFence,
}

state_names!(FenceAgentKind { Ipmi = "ipmi", External = "external" });
state_names!(FenceAction { Reboot = "reboot", Off = "off" });
state_names!(SuccessfulFence { Migrate = "migrate", None = "none" });
state_names!(FailedFence { None = "none", RecoverAfterSelfFence = "recover-after-self-fence" });

/// How a node is to be fenced; each node publishes its own, and the victim's applies.
///
/// The BMC password travels in the replicated log (coordinators need it to fence); it is
/// redacted from `Debug` and never rendered by the daemon's output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencePolicy {
    pub agent: FenceAgentKind,
    /// `host:port` of this node's BMC, as the coordinators reach it.
    pub bmc: String,
    pub user: String,
    pub password: String,
    /// The executable, for `agent = external`.
    #[serde(default)]
    pub command: Option<String>,
    /// Extra `key=value` lines for an external agent (`lanplus=1`, …).
    #[serde(default)]
    pub options: Vec<String>,
    pub fence_after_ms: u64,
    pub fence_action: FenceAction,
    pub successful_fence: SuccessfulFence,
    pub failed_fence: FailedFence,
    pub self_fence_after_ms: u64,
    /// The armed hardware watchdog's timeout (0: none).
    #[serde(default)]
    pub watchdog_timeout_ms: u64,
    #[serde(default)]
    pub auto_ready: bool,
}

impl fmt::Debug for FencePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencePolicy")
            .field("agent", &self.agent)
            .field("bmc", &self.bmc)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("command", &self.command)
            .field("fence_after_ms", &self.fence_after_ms)
            .field("fence_action", &self.fence_action)
            .field("successful_fence", &self.successful_fence)
            .field("failed_fence", &self.failed_fence)
            .finish_non_exhaustive()
    }
}

impl FencePolicy {
    /// The built-in IPMI agent for `bmc` with the documented defaults (`fence_after_ms` 1500,
    /// `reboot`, `migrate`, `failed_fence = none`, self-fence after 30 s, no watchdog).
    pub fn ipmi(bmc: &str, user: &str, password: &str) -> FencePolicy {
        FencePolicy {
            agent: FenceAgentKind::Ipmi,
            bmc: bmc.into(),
            user: user.into(),
            password: password.into(),
            command: None,
            options: Vec::new(),
            fence_after_ms: 1500,
            fence_action: FenceAction::Reboot,
            successful_fence: SuccessfulFence::Migrate,
            failed_fence: FailedFence::None,
            self_fence_after_ms: 30_000,
            watchdog_timeout_ms: 0,
            auto_ready: false,
        }
    }

    fn validate(&self) -> Result<(), ApplyError> {
        let long = |s: &str| s.len() > MAX_POLICY_FIELD;
        if self.bmc.is_empty() || long(&self.bmc) || long(&self.user) || self.password.len() > MAX_POLICY_SECRET {
            return Err(ApplyError::Invalid(
                "fence policy: bmc 1 to 1024 bytes, user up to 1024, password up to 4096 (sealed)".into(),
            ));
        }
        let control = |v: &str| v.chars().any(char::is_control);
        if control(&self.bmc)
            || control(&self.user)
            || control(&self.password)
            || self.command.as_deref().is_some_and(control)
        {
            return Err(ApplyError::Invalid(
                "fence policy: no control characters (they would break the agent protocol)".into(),
            ));
        }
        if self.options.len() > MAX_AGENT_OPTIONS
            || self.options.iter().any(|o| long(o) || !o.contains('=') || control(o))
        {
            return Err(ApplyError::Invalid(format!("fence policy: up to {MAX_AGENT_OPTIONS} key=value options")));
        }
        if self.agent == FenceAgentKind::External && self.command.as_deref().is_none_or(|c| c.is_empty() || long(c)) {
            return Err(ApplyError::Invalid("fence policy: agent external needs a command".into()));
        }
        if self.failed_fence == FailedFence::RecoverAfterSelfFence && self.watchdog_timeout_ms == 0 {
            return Err(ApplyError::Invalid("fence policy: recover-after-self-fence needs an armed watchdog".into()));
        }
        Ok(())
    }
}

/// A fence decided and not yet done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFence {
    pub decided_ms: u64,
    pub reason: String,
    /// Asked for by an operator (`herd node fence`): no saving throw.
    #[serde(default)]
    pub manual: bool,
    /// When an executor committed its fencing token (`ExecuteFence`): from then on a
    /// power-off may have been sent, even if the fence is cancelled later.
    #[serde(default)]
    pub executing_ms: Option<u64>,
    /// The node whose executor holds the token now (the latest to take it).
    #[serde(default)]
    pub executing_by: Option<NodeId>,
}

/// A node's fencing status in the replicated record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FenceStatus {
    /// Whether its BMC answered the last check (None: not checked yet, or no policy).
    pub ready: Option<bool>,
    /// Why not, when it did not.
    pub ready_reason: Option<String>,
    pub pending: Option<PendingFence>,
    /// Leader time of the last confirmed fence.
    pub fenced_ms: Option<u64>,
    /// Leader time and reason of the last failed fence (cleared by a confirmed one).
    pub failed_ms: Option<u64>,
    pub failure: Option<String>,
    /// `fence_action = reboot`: leader time of the fence whose power-on is not done yet. Any
    /// primary powers the node on while this is set (a primary that crashed between the fence
    /// and the power-on leaves it to the next).
    pub power_on_due_ms: Option<u64>,
}

/// How a fence ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceOutcome {
    /// Power-off confirmed by the BMC.
    Fenced,
    /// Not confirmed; nothing is started elsewhere.
    Failed { reason: String },
    /// The node has self-fenced by now (its policy and its keepalive age say so).
    SelfFenced,
    /// The node, a client outside Raft that self-fences on its session
    /// (`NodeStats::session_self_fence`), has self-fenced by now: the primary asked at leader
    /// time `asked_ms`, and no coordinator can have acknowledged its session for `quiet_ms`
    /// (each said when it last heard it, or has been out of contact with the leader that
    /// long). Refused unless `quiet_ms` covers the self-fence deadline, the watchdog and the
    /// margin, and unless no keepalive of the node committed since `asked_ms` (a node back
    /// meanwhile).
    SessionsQuiet { quiet_ms: u64, asked_ms: u64 },
}

impl NodeRecord {
    /// Where fencing stands for this node: `none`, `fencing` (decided, not done), `fenced`, or
    /// `fence-failed` (the last fence could not be confirmed).
    pub fn fence_state(&self) -> &'static str {
        if self.fence.pending.is_some() {
            "fencing"
        } else if self.daemon_state == DaemonState::Fenced {
            "fenced"
        } else if self.fence.failure.is_some() {
            "fence-failed"
        } else {
            "none"
        }
    }
}

fn bounded(s: &str) -> String {
    s.chars().take(1024).collect()
}

fn node_mut<'a>(state: &'a mut State, name: &str, op: &Op) -> Result<&'a mut NodeRecord, ApplyError> {
    let node = state.nodes.get_mut(name).ok_or_else(|| ApplyError::NoSuchNode(name.to_string()))?;
    check_revision(format!("node {name}"), node.revision, op)?;
    Ok(node)
}

/// `ExecuteFence`: the fencing token for `name`'s decision made at `decided_ms`, taken by
/// node `by` — only while that decision still stands.
fn execute_fence(
    state: &mut State,
    index: u64,
    now: u64,
    op: &Op,
    (name, decided_ms, by): (&str, u64, NodeId),
) -> Result<Reply, ApplyError> {
    let node = node_mut(state, name, op)?;
    let pending =
        node.fence.pending.as_mut().filter(|p| p.decided_ms == decided_ms).ok_or_else(|| {
            ApplyError::Invalid(format!("the fence of {name} decided at {decided_ms} no longer stands"))
        })?;
    pending.executing_ms.get_or_insert(now);
    pending.executing_by = Some(by);
    node.revision = index;
    Ok(Reply::Done)
}

/// `CancelFence`: the saving throw; says so when a power-off may already have been sent.
fn cancel_fence(
    state: &mut State,
    index: u64,
    now: u64,
    op: &Op,
    name: &str,
    reason: &str,
) -> Result<Reply, ApplyError> {
    let node = node_mut(state, name, op)?;
    let Some(pending) = node.fence.pending.take() else {
        return Err(ApplyError::Invalid(format!("no fence of {name} is in progress")));
    };
    node.revision = index;
    // A power-off already sent may still be carried out by a slow BMC: say so.
    let late = match pending.executing_ms {
        Some(t) => format!(" (a power-off may have been sent at {t}: its BMC may still carry it out)"),
        None => String::new(),
    };
    let message = format!("fence of {name} cancelled: {}{late}", bounded(reason));
    push_event(state, index, now, "fence-cancelled", Some(&name.to_string()), message);
    Ok(Reply::Done)
}

pub(crate) fn apply_fence_op(state: &mut State, index: u64, now: u64, op: &Op) -> Result<Reply, ApplyError> {
    match &op.cmd {
        Command::SetFencePolicy { name, policy, node_id } => {
            if let Some(p) = policy {
                p.validate()?;
            }
            let node = own_record(state, name, *node_id)?;
            check_revision(format!("node {name}"), node.revision, op)?;
            if node.fencing != *policy {
                node.fencing = policy.clone();
                node.fence.ready = None;
                node.fence.ready_reason = None;
            }
            node.revision = index;
            Ok(Reply::Done)
        }
        Command::SetFenceReady { name, ready, reason } => {
            let node = node_mut(state, name, op)?;
            let was = node.fence.ready;
            node.fence.ready = Some(*ready);
            node.fence.ready_reason = if *ready { None } else { reason.as_deref().map(bounded) };
            node.revision = index;
            if was != Some(*ready) {
                let msg = match (ready, reason) {
                    (true, _) => format!("{name} can be fenced: its BMC answers"),
                    (false, r) => {
                        format!("{name} cannot be fenced: {}", bounded(r.as_deref().unwrap_or("BMC check failed")))
                    }
                };
                push_event(state, index, now, "fence-readiness", Some(name), msg);
            }
            Ok(Reply::Done)
        }
        Command::DecideFence { name, reason, manual } => {
            let maintenance = state.meta.as_ref().is_some_and(|m| m.maintenance);
            let node = node_mut(state, name, op)?;
            if node.fencing.is_none() {
                return Err(ApplyError::Invalid(format!("{name} has no fencing configured")));
            }
            if node.fence.pending.is_some() {
                return Err(ApplyError::Invalid(format!("a fence of {name} is already in progress")));
            }
            if !manual && maintenance {
                return Err(ApplyError::Invalid("the cluster is in maintenance: no fencing".into()));
            }
            if !manual && node.daemon_state == DaemonState::Fenced {
                return Err(ApplyError::Invalid(format!("{name} is already fenced")));
            }
            node.fence.pending = Some(PendingFence {
                decided_ms: now,
                reason: bounded(reason),
                manual: *manual,
                executing_ms: None,
                executing_by: None,
            });
            node.revision = index;
            let who = if *manual { "by an operator" } else { "by the primary" };
            push_event(
                state,
                index,
                now,
                "fence-decided",
                Some(name),
                format!("fence of {name} decided {who}: {}", bounded(reason)),
            );
            Ok(Reply::Done)
        }
        Command::ExecuteFence { name, decided_ms, by } => {
            execute_fence(state, index, now, op, (name, *decided_ms, *by))
        }
        Command::CancelFence { name, reason } => cancel_fence(state, index, now, op, name, reason),
        Command::FenceDone { name, outcome } => fence_done(state, index, now, op, name, outcome),
        Command::FencePowerOn { name, error } => fence_power_on(state, index, now, op, name, error.as_deref()),
        _ => Err(ApplyError::Invalid("not a fence command".into())),
    }
}

fn fence_done(
    state: &mut State,
    index: u64,
    now: u64,
    op: &Op,
    name: &String,
    outcome: &FenceOutcome,
) -> Result<Reply, ApplyError> {
    let node = node_mut(state, name, op)?;
    let policy =
        node.fencing.clone().ok_or_else(|| ApplyError::Invalid(format!("{name} has no fencing configured")))?;
    match outcome {
        FenceOutcome::Failed { reason } => {
            if node.fence.pending.take().is_none() {
                return Err(ApplyError::Invalid(format!("no fence of {name} is in progress")));
            }
            node.fence.failed_ms = Some(now);
            node.fence.failure = Some(bounded(reason));
            node.revision = index;
            let next = match policy.failed_fence {
                FailedFence::None => "its VMs are not started elsewhere (failed_fence = none)",
                FailedFence::RecoverAfterSelfFence => "its VMs are recovered once it has certainly self-fenced",
            };
            push_event(
                state,
                index,
                now,
                "fence-failed",
                Some(name),
                format!("fence of {name} failed: {}; {next}", bounded(reason)),
            );
            return Ok(Reply::Done);
        }
        FenceOutcome::Fenced => {
            if node.fence.pending.take().is_none() {
                return Err(ApplyError::Invalid(format!("no fence of {name} is in progress")));
            }
        }
        FenceOutcome::SelfFenced | FenceOutcome::SessionsQuiet { .. } => {
            certainly_self_fenced(name, node, &policy, outcome, now)?;
            node.fence.pending = None;
        }
    }
    let old = node.daemon_state;
    node.daemon_state = DaemonState::Fenced;
    node.domain_state = DomainState::FenceFlush;
    node.return_by_ms = None;
    node.fence.fenced_ms = Some(now);
    node.fence.power_on_due_ms =
        (matches!(outcome, FenceOutcome::Fenced) && policy.fence_action == FenceAction::Reboot).then_some(now);
    node.fence.failed_ms = None;
    node.fence.failure = None;
    node.revision = index;
    let how = match outcome {
        FenceOutcome::SelfFenced => "self-fenced (by its policy and keepalive age)".to_string(),
        FenceOutcome::SessionsQuiet { quiet_ms, .. } => {
            format!("self-fenced (by its policy; no coordinator acknowledged its session for {quiet_ms} ms)")
        }
        _ => "fenced: power-off confirmed".to_string(),
    };
    push_event(state, index, now, "fenced", Some(name), format!("{name} {how} (was {old})"));
    if policy.successful_fence == SuccessfulFence::Migrate {
        recover(state, index, now, name);
    }
    if let Some(node) = state.nodes.get_mut(name) {
        node.domain_state = DomainState::Flushed;
    }
    Ok(Reply::Done)
}

/// `FencePowerOn`: the power-on after a fence was done, or failed (then it stays due until
/// `POWER_ON_GIVE_UP_MS` after the fence).
fn fence_power_on(
    state: &mut State,
    index: u64,
    now: u64,
    op: &Op,
    name: &String,
    error: Option<&str>,
) -> Result<Reply, ApplyError> {
    let node = node_mut(state, name, op)?;
    let Some(due) = node.fence.power_on_due_ms else {
        return Err(ApplyError::Invalid(format!("no power-on of {name} is due")));
    };
    let gave_up = now.saturating_sub(due) >= POWER_ON_GIVE_UP_MS;
    if error.is_none() || gave_up {
        node.fence.power_on_due_ms = None;
    }
    node.revision = index;
    let (kind, msg) = match error {
        None => ("fence-power-on", format!("{name} powered on again after its fence (fence_action = reboot)")),
        Some(e) if gave_up => (
            "fence-power-on-failed",
            format!(
                "{name}: power on after the fence failed: {}; not tried again (it is the operator's now)",
                bounded(e)
            ),
        ),
        Some(e) => {
            ("fence-power-on-failed", format!("{name}: power on after the fence failed: {}; tried again", bounded(e)))
        }
    };
    push_event(state, index, now, kind, Some(name), msg);
    Ok(Reply::Done)
}

/// Starts every VM of the fenced node `name` that should run on another node, keeping
/// `last_node` so `herd node ready` brings them home. A VM that moved away from `name` and was
/// not released is released (its source is dead); one that fits nowhere is put in `fail`.
/// Places every VM that waits for a node (see [`VmRecord::waiting`]) where one now fits; run
/// whenever a node may have become eligible (its daemon or domain state changed).
pub(crate) fn place_waiting(state: &mut State, index: u64, now: u64) {
    if state.meta.as_ref().is_some_and(|m| m.maintenance) {
        return; // placed when maintenance ends
    }
    let waiting: Vec<String> = state.vms.iter().filter(|(_, v)| v.waiting.is_some()).map(|(n, _)| n.clone()).collect();
    for vm_name in waiting {
        let Some(vm) = state.vms.get(&vm_name) else { continue };
        if !vm.state.wants_running() {
            continue;
        }
        let Ok(target) = place(state, vm.spec.selector.unwrap_or_default(), &vm.spec.node_limit, None) else {
            continue;
        };
        let Some(vm) = state.vms.get_mut(&vm_name) else { continue };
        let from = std::mem::replace(&mut vm.node, target.clone());
        vm.seen_on.remove(&target);
        if from != target {
            let home = vm.last_node.take().unwrap_or(from);
            vm.last_node = (home != target).then_some(home);
            vm.state = if vm.last_node.is_some() { VmState::Migrate } else { VmState::Start };
        }
        vm.waiting = None;
        vm.actual = ActualState::Unknown;
        vm.desired_at = index;
        vm.revision = index;
        push_event(
            state,
            index,
            now,
            "vm-placed",
            Some(&target),
            format!("{vm_name}: {target} fits; starting it there"),
        );
    }
}

fn recover(state: &mut State, index: u64, now: u64, name: &str) {
    let names: Vec<String> = state.vms.keys().cloned().collect();
    let (mut moved, mut failed) = (Vec::new(), Vec::new());
    for vm_name in names {
        let Some(vm) = state.vms.get_mut(&vm_name) else { continue };
        if vm.node != name {
            if vm.migrating_from.as_deref() == Some(name) {
                vm.migrating_from = None;
                vm.revision = index;
            }
            continue;
        }
        if !vm.state.wants_running() {
            continue;
        }
        let (selector, limit) = (vm.spec.selector.unwrap_or_default(), vm.spec.node_limit.clone());
        let placed = place(state, selector, &limit, Some(name));
        let Some(vm) = state.vms.get_mut(&vm_name) else { continue };
        match placed {
            Ok(target) => {
                // Keep the first home: a VM already away from its home keeps that home.
                let home = vm.last_node.take().unwrap_or_else(|| name.to_string());
                vm.last_node = (home != target).then_some(home);
                if vm.migrating_from.as_deref() == Some(target.as_str()) {
                    vm.migrating_from = None;
                }
                vm.node = target.clone();
                vm.seen_on.remove(&target);
                vm.state = if vm.last_node.is_some() { VmState::Migrate } else { VmState::Start };
                vm.actual = ActualState::Unknown;
                vm.desired_at = index;
                moved.push(format!("{vm_name} -> {target}"));
            }
            Err(e) => {
                // It waits (state unchanged, started by no one) until a node fits.
                vm.waiting = Some(bounded(&format!("waiting: no node in node_limit is ready ({e})")));
                vm.actual = ActualState::Unknown;
                failed.push(vm_name.clone());
            }
        }
        vm.revision = index;
    }
    let mut msg = format!("{name}: {} VM(s) recovered", moved.len());
    if !moved.is_empty() {
        msg.push_str(&format!(" ({})", moved.join(", ")));
    }
    if !failed.is_empty() {
        msg.push_str(&format!("; no node fits {} (waiting for one)", failed.join(", ")));
    }
    let owner = name.to_string();
    push_event(state, index, now, "fence-recovery", Some(&owner), bounded(&msg));
}
