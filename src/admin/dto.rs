//! What the admin protocol shows of the model: response types of their own, so that no model
//! struct reaches the wire unreviewed. A field added to a model struct appears here only when
//! someone adds it on purpose — a new secret cannot leak by being serialised along.
//!
//! Enums of state names (`DaemonState`, `VmState`, …) are shown as their names; they carry
//! nothing else.

use std::collections::BTreeMap;

use herd_storage::model::{
    ActualState, DaemonState, DomainState, Event, FailedFence, FenceAction, FenceAgentKind, FenceStatus,
    MigrationMethod, NodeRecord, NodeStats, PendingFence, Role, RouterState, Selector, SuccessfulFence, VmRecord,
    VmState,
};
use serde::Serialize;

/// A node's fencing as operators see it: the policy without its password, and the status.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum FencingView {
    None { configured: bool, can_fence: bool },
    Configured(Box<FencingConfigured>),
}

#[derive(Debug, Serialize)]
pub struct FencingConfigured {
    configured: bool,
    can_fence: bool,
    ready: Option<bool>,
    ready_reason: Option<String>,
    state: &'static str,
    pending: Option<PendingView>,
    fenced_ms: Option<u64>,
    failed_ms: Option<u64>,
    failure: Option<String>,
    agent: FenceAgentKind,
    bmc: String,
    user: String,
    command: Option<String>,
    fence_after_ms: u64,
    fence_action: FenceAction,
    successful_fence: SuccessfulFence,
    failed_fence: FailedFence,
    self_fence_after_ms: u64,
    watchdog_armed: bool,
    auto_ready: bool,
}

impl FencingView {
    pub fn of(n: &NodeRecord) -> FencingView {
        let Some(p) = &n.fencing else {
            return FencingView::None { configured: false, can_fence: false };
        };
        let f = &n.fence;
        FencingView::Configured(Box::new(FencingConfigured {
            configured: true,
            can_fence: f.ready == Some(true),
            ready: f.ready,
            ready_reason: f.ready_reason.clone(),
            state: n.fence_state(),
            pending: f.pending.as_ref().map(PendingView::of),
            fenced_ms: f.fenced_ms,
            failed_ms: f.failed_ms,
            failure: f.failure.clone(),
            agent: p.agent,
            bmc: p.bmc.clone(),
            user: p.user.clone(),
            command: p.command.clone(),
            fence_after_ms: p.fence_after_ms,
            fence_action: p.fence_action,
            successful_fence: p.successful_fence,
            failed_fence: p.failed_fence,
            self_fence_after_ms: p.self_fence_after_ms,
            watchdog_armed: p.watchdog_timeout_ms > 0,
            auto_ready: p.auto_ready,
        }))
    }
}

/// A decided fence not yet carried out.
#[derive(Debug, Serialize)]
pub struct PendingView {
    decided_ms: u64,
    reason: String,
    manual: bool,
}

impl PendingView {
    fn of(p: &PendingFence) -> PendingView {
        PendingView { decided_ms: p.decided_ms, reason: p.reason.clone(), manual: p.manual }
    }
}

/// The fence status of `node info` (`fence`), beside the operator's view (`fencing`).
#[derive(Debug, Serialize)]
pub struct FenceStatusView {
    ready: Option<bool>,
    ready_reason: Option<String>,
    pending: Option<PendingView>,
    fenced_ms: Option<u64>,
    failed_ms: Option<u64>,
    failure: Option<String>,
}

impl FenceStatusView {
    fn of(f: &FenceStatus) -> FenceStatusView {
        FenceStatusView {
            ready: f.ready,
            ready_reason: f.ready_reason.clone(),
            pending: f.pending.as_ref().map(PendingView::of),
            fenced_ms: f.fenced_ms,
            failed_ms: f.failed_ms,
            failure: f.failure.clone(),
        }
    }
}

/// A node's keepalive figures.
#[derive(Debug, Serialize)]
pub struct StatsView {
    cpu_count: u32,
    load_milli: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    vms_running: u32,
    mem_allocated_mib: u64,
    mem_provisioned_mib: u64,
    vcpus_allocated: u32,
    stale: bool,
    unmanaged_domains: Vec<String>,
    /// The node self-fences when no coordinator acknowledged its session lately.
    session_self_fence: bool,
    /// … and on that alone: its keepalive is written only when its figures move.
    session_only: bool,
}

impl StatsView {
    pub fn of(s: &NodeStats) -> StatsView {
        StatsView {
            cpu_count: s.cpu_count,
            load_milli: s.load_milli,
            mem_total_mib: s.mem_total_mib,
            mem_used_mib: s.mem_used_mib,
            vms_running: s.vms_running,
            mem_allocated_mib: s.mem_allocated_mib,
            mem_provisioned_mib: s.mem_provisioned_mib,
            vcpus_allocated: s.vcpus_allocated,
            stale: s.stale,
            unmanaged_domains: s.unmanaged_domains.clone(),
            session_self_fence: s.session_self_fence,
            session_only: s.session_only,
        }
    }
}

/// `node info`: one node's record as operators see it.
#[derive(Debug, Serialize)]
pub struct NodeDetail {
    id: u64,
    name: String,
    role: Role,
    cluster_addr: String,
    daemon_state: DaemonState,
    domain_state: DomainState,
    router_state: RouterState,
    return_by_ms: Option<u64>,
    stats: StatsView,
    last_keepalive_ms: Option<u64>,
    heartbeat: BTreeMap<String, String>,
    fencing: FencingView,
    fence: FenceStatusView,
    joined_ms: u64,
    revision: u64,
    voter: bool,
    last_keepalive_age_ms: Option<u64>,
    read_index: Option<u64>,
    linearizable: bool,
    /// The committed log index the cluster recorded this node holding (`State::acked`): a
    /// node whose log later ends before it lost what it acknowledged.
    log_held: Option<u64>,
}

impl NodeDetail {
    pub fn of(
        n: &NodeRecord,
        voter: bool,
        now_ms: u64,
        read_index: Option<u64>,
        linearizable: bool,
        log_held: Option<u64>,
    ) -> NodeDetail {
        NodeDetail {
            id: n.id,
            name: n.name.clone(),
            role: n.role,
            cluster_addr: n.cluster_addr.clone(),
            daemon_state: n.daemon_state,
            domain_state: n.domain_state,
            router_state: n.router_state,
            return_by_ms: n.return_by_ms,
            stats: StatsView::of(&n.stats),
            last_keepalive_ms: n.last_keepalive_ms,
            heartbeat: n.heartbeat.clone(),
            fencing: FencingView::of(n),
            fence: FenceStatusView::of(&n.fence),
            joined_ms: n.joined_ms,
            revision: n.revision,
            voter,
            last_keepalive_age_ms: n.last_keepalive_ms.map(|t| now_ms.saturating_sub(t)),
            read_index,
            linearizable,
            log_held,
        }
    }
}

/// A VM as `vm list` shows it.
#[derive(Debug, Serialize)]
pub struct VmSummary {
    name: String,
    uuid: String,
    state: VmState,
    node: String,
    last_node: Option<String>,
    actual: ActualState,
    failure_reason: Option<String>,
    migrating_from: Option<String>,
    /// Why it should run but no node runs it yet (no node in its `node_limit` is ready).
    waiting: Option<String>,
    /// Nodes other than `node` that report it running there (adopted or failed, see the
    /// model's `stray.rs`).
    seen_on: Vec<String>,
}

impl VmSummary {
    pub fn of(vm: &VmRecord) -> VmSummary {
        VmSummary {
            name: vm.spec.name.clone(),
            uuid: vm.spec.uuid.clone(),
            state: vm.state,
            node: vm.node.clone(),
            last_node: vm.last_node.clone(),
            actual: vm.actual,
            failure_reason: vm.failure_reason.clone(),
            migrating_from: vm.migrating_from.clone(),
            waiting: vm.waiting.clone(),
            seen_on: vm.seen_on.iter().cloned().collect(),
        }
    }
}

/// `vm info`: the summary and the spec of record.
#[derive(Debug, Serialize)]
pub struct VmDetail {
    #[serde(flatten)]
    summary: VmSummary,
    xml: String,
    memory_mib: u64,
    vcpus: u32,
    node_limit: Vec<String>,
    selector: Option<Selector>,
    autostart: bool,
    migration_method: MigrationMethod,
    /// Its last move: from, to, when, and once it ran there how (live or by shutdown), how
    /// long it took and, live, the guest's downtime.
    last_move: Option<herd_storage::model::LastMove>,
    revision: u64,
}

impl VmDetail {
    pub fn of(vm: &VmRecord) -> VmDetail {
        VmDetail {
            summary: VmSummary::of(vm),
            xml: vm.spec.xml.clone(),
            memory_mib: vm.spec.memory_mib,
            vcpus: vm.spec.vcpus,
            node_limit: vm.spec.node_limit.clone(),
            selector: vm.spec.selector,
            autostart: vm.spec.autostart,
            migration_method: vm.spec.migration_method,
            last_move: vm.last_move.clone(),
            revision: vm.revision,
        }
    }
}

/// One entry of the replicated event log.
#[derive(Debug, Serialize)]
pub struct EventView {
    index: u64,
    time_ms: u64,
    kind: String,
    node: Option<String>,
    message: String,
}

impl EventView {
    pub fn of(e: &Event) -> EventView {
        EventView {
            index: e.index,
            time_ms: e.time_ms,
            kind: e.kind.clone(),
            node: e.node.clone(),
            message: e.message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_storage::model::FencePolicy;

    /// The password never reaches the wire, whatever the policy holds.
    #[test]
    fn fencing_view_has_no_password() {
        let policy = FencePolicy::ipmi("10.0.0.9", "admin", "hunter2-secret");
        let node = NodeRecord {
            id: 3,
            name: "h1".into(),
            role: Role::Hypervisor,
            cluster_addr: "127.0.0.1:7000".into(),
            daemon_state: DaemonState::Run,
            domain_state: DomainState::Ready,
            router_state: RouterState::Client,
            return_by_ms: None,
            stats: NodeStats::default(),
            last_keepalive_ms: Some(5),
            heartbeat: BTreeMap::new(),
            fencing: Some(policy),
            fence: FenceStatus::default(),
            health: None,
            joined_ms: 1,
            revision: 2,
        };
        let json = serde_json::to_string(&NodeDetail::of(&node, false, 10, None, false, None)).expect("encodes");
        assert!(!json.contains("hunter2"), "{json}");
        assert!(json.contains("\"bmc\":\"10.0.0.9\""), "{json}");
        assert!(json.contains("\"last_keepalive_age_ms\":5"), "{json}");
    }
}
