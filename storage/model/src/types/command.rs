//! `Command`: every change to cluster state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// Every change to cluster state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create the cluster and register its first node (id 1).
    InitCluster {
        cluster_id: String,
        token_hash: String,
        node: NewNode,
    },
    /// Admit a node presenting a join token; allocates its id.
    RegisterNode {
        node: NewNode,
        token_hash: String,
    },
    /// A new join token (`herd token create`): valid for `ttl_ms` from now, for `uses` joins.
    CreateJoinToken {
        token_hash: String,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        uses: Option<u32>,
    },
    /// Revoke the join token whose hash starts with `id` (at least 8 hex digits, unique).
    RevokeJoinToken {
        id: String,
    },
    /// Forget a node (after it left the Raft membership).
    RemoveNode {
        name: String,
    },
    /// A node's periodic report; also proves it can get writes committed. With `node_id`, it is
    /// refused unless the record under `name` has that id: the daemon of a removed node cannot
    /// write over the record of a new node that took its name.
    Keepalive {
        name: String,
        stats: NodeStats,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// A node's own lifecycle state; `node_id` as for `Keepalive`.
    SetDaemonState {
        name: String,
        state: DaemonState,
        return_by_ms: Option<u64>,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    SetMaintenance {
        on: bool,
    },
    /// A node's `domain_state`: an operator asks for `flush` or `unflush`; the node records
    /// `flushed` or `ready` when it is done (`node_id` as for `Keepalive` on those).
    SetDomainState {
        name: String,
        state: DomainState,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// A node publishes its heartbeat addresses (`node_id` as for `Keepalive`).
    SetHeartbeatAddrs {
        name: String,
        addrs: BTreeMap<String, String>,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// The new leader takes the primary role: it becomes `takeover`, and every other
    /// coordinator that held (or was taking or leaving) the role becomes `secondary` — a deposed
    /// leader cannot commit its own relinquish, so the new one does it for it.
    Takeover {
        name: String,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// A coordinator's own step: `takeover → primary`, `primary → relinquish`,
    /// `relinquish → secondary` (also `takeover → relinquish` when taking over fails).
    SetRouterState {
        name: String,
        state: RouterState,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// The leader's finding about a member's Raft health (None: it replicates again).
    SetNodeHealth {
        name: String,
        #[serde(default)]
        problem: Option<String>,
    },
    /// The leader's record of the committed log index each member holds, by member id: (the
    /// member's boot, index) — see `State::acked`.
    RecordAcked {
        marks: std::collections::BTreeMap<NodeId, (u64, u64)>,
    },
    /// Define a VM on `node` (chosen by the leader's placement, or given by the operator).
    DefineVm {
        spec: VmSpec,
        node: String,
    },
    /// Replace a VM's domain XML of record (takes effect at its next start).
    /// A new domain XML of record (same name and uuid; the daemon checks); the resources read
    /// from it replace the old ones. It takes effect at the VM's next start.
    ModifyVm {
        name: String,
        xml: String,
        #[serde(default)]
        memory_mib: Option<u64>,
        #[serde(default)]
        vcpus: Option<u32>,
    },
    /// An operator's state change: start, stop, shutdown, restart, disable.
    SetVmState {
        name: String,
        state: VmState,
    },
    /// Move a VM: `migrate`/`migrate-live` (temporary: remember `last_node`), `unmigrate` (back
    /// to `last_node`), or a permanent move (`permanent`: forget `last_node`).
    MigrateVm {
        name: String,
        to: String,
        state: VmState,
        #[serde(default)]
        permanent: bool,
    },
    /// The source of a move reports the VM stopped there: the target may start it.
    ReleaseVm {
        name: String,
        node: String,
    },
    /// The source of a live-only move (`migrate-live`, or `migration_method = live`) reports
    /// that libvirt refused it: the VM stays on the source, in `fail` with the reason.
    AbortMigration {
        name: String,
        node: String,
        reason: String,
    },
    /// Forget a VM (it must be stopped, disabled or failed).
    UndefineVm {
        name: String,
    },
    /// A node reports what libvirt says of a VM assigned to it; `failure` puts it in `fail`.
    ReportVm {
        name: String,
        node: String,
        actual: ActualState,
        #[serde(default)]
        failure: Option<String>,
        /// With a report that finishes a move: how the VM arrived.
        #[serde(default)]
        moved: Option<Arrival>,
    },
    /// A node publishes how it is fenced (`node_id` as for `Keepalive`).
    SetFencePolicy {
        name: String,
        policy: Option<crate::fence::FencePolicy>,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// The primary's last BMC check of a node (written when it changes).
    SetFenceReady {
        name: String,
        ready: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    /// The primary (or an operator, `manual`) decides to fence a node; one executor acts.
    DecideFence {
        name: String,
        reason: String,
        #[serde(default)]
        manual: bool,
    },
    /// The fencing token: the executor of the decision made at `decided_ms` is about to send
    /// the power-off. Refused unless that decision still stands (not cancelled, not done, not
    /// superseded), and proposed only by the leader itself, so a deposed executor cannot
    /// commit it; the power-off is sent only once it is committed.
    ExecuteFence {
        name: String,
        decided_ms: u64,
        /// The executor's node (the leader proposing it).
        by: NodeId,
    },
    /// The node was heard again before the fence ran (the saving throw).
    CancelFence {
        name: String,
        reason: String,
    },
    /// The outcome of a fence; a confirmed one recovers the node's VMs per its policy.
    FenceDone {
        name: String,
        outcome: crate::fence::FenceOutcome,
    },
    /// The power-on after a confirmed fence of a `fence_action = reboot` node: done (`error`
    /// None) or failed (the next primary round tries again until the node is back or
    /// `POWER_ON_GIVE_UP_MS` has passed since the fence).
    FencePowerOn {
        name: String,
        #[serde(default)]
        error: Option<String>,
    },
    /// Something the cluster's event log should show (MNFA entry and exit, ...).
    RecordEvent {
        kind: String,
        #[serde(default)]
        node: Option<String>,
        message: String,
    },
    /// `node` finds VM `name`, assigned elsewhere and not leaving `node`, running there
    /// (`running`) or no longer running there.
    ReportStray {
        name: String,
        node: String,
        running: bool,
    },
}

impl Command {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::InitCluster { .. } => "init-cluster",
            Command::RegisterNode { .. } => "register-node",
            Command::RemoveNode { .. } => "remove-node",
            Command::CreateJoinToken { .. } => "create-join-token",
            Command::RevokeJoinToken { .. } => "revoke-join-token",
            Command::Keepalive { .. } => "keepalive",
            Command::SetDaemonState { .. } => "set-daemon-state",
            Command::SetMaintenance { .. } => "set-maintenance",
            Command::SetHeartbeatAddrs { .. } => "set-heartbeat-addrs",
            Command::SetDomainState { .. } => "set-domain-state",
            Command::RecordEvent { .. } => "record-event",
            Command::Takeover { .. } => "takeover",
            Command::DefineVm { .. } => "define-vm",
            Command::ModifyVm { .. } => "modify-vm",
            Command::SetVmState { .. } => "set-vm-state",
            Command::MigrateVm { .. } => "migrate-vm",
            Command::UndefineVm { .. } => "undefine-vm",
            Command::ReleaseVm { .. } => "release-vm",
            Command::AbortMigration { .. } => "abort-migration",
            Command::ReportVm { .. } => "report-vm",
            Command::ReportStray { .. } => "report-stray",
            Command::SetRouterState { .. } => "set-router-state",
            Command::SetNodeHealth { .. } => "set-node-health",
            Command::RecordAcked { .. } => "record-acked",
            Command::SetFencePolicy { .. } => "set-fence-policy",
            Command::SetFenceReady { .. } => "set-fence-ready",
            Command::DecideFence { .. } => "decide-fence",
            Command::ExecuteFence { .. } => "execute-fence",
            Command::CancelFence { .. } => "cancel-fence",
            Command::FenceDone { .. } => "fence-done",
            Command::FencePowerOn { .. } => "fence-power-on",
        }
    }
}
