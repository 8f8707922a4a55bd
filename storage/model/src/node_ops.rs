//! Commands a node writes about itself (keepalive, its daemon, domain and router states, its
//! heartbeat addresses) and the primary's takeover. Pure, like the rest of the model.

use std::collections::BTreeMap;

use crate::apply::{check_revision, own_record, push_event, validate_name, At, MAX_NAME_LEN, MAX_NETWORKS};
use crate::types::*;

/// `Keepalive`: the node's report, on the leader's clock.
pub(crate) fn keepalive(
    state: &mut State,
    at: At<'_>,
    name: &str,
    stats: &NodeStats,
    node_id: &Option<NodeId>,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    if stats.unmanaged_domains.len() > MAX_UNMANAGED
        || stats.unmanaged_domains.iter().any(|d| d.is_empty() || d.len() > MAX_DOMAIN_NAME)
    {
        return Err(ApplyError::Invalid(format!(
            "a keepalive names at most {MAX_UNMANAGED} unmanaged domains of 1 to {MAX_DOMAIN_NAME} bytes"
        )));
    }
    if stats.session_only && !stats.session_self_fence {
        // The flags' encoding needs both (`NodeStats::session_only`).
        return Err(ApplyError::Invalid("a keepalive self-fences on its session alone only with its session".into()));
    }
    let node = own_record(state, name, *node_id)?;
    check_revision(format!("node {name}"), node.revision, op)?;
    node.stats = stats.clone();
    node.last_keepalive_ms = Some(now);
    node.revision = index;
    Ok(Reply::Done)
}

/// `SetDaemonState`: a fenced node stays fenced.
pub(crate) fn set_daemon_state(
    state: &mut State,
    at: At<'_>,
    name: &String,
    new: &DaemonState,
    return_by_ms: &Option<u64>,
    node_id: &Option<NodeId>,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let node = own_record(state, name, *node_id)?;
    check_revision(format!("node {name}"), node.revision, op)?;
    if *new == DaemonState::Stop && return_by_ms.is_none() {
        return Err(ApplyError::Invalid("daemon_state stop needs a return_by deadline".into()));
    }
    let old = node.daemon_state;
    if old == DaemonState::Fenced && *new != DaemonState::Fenced {
        // A fenced node that comes back stays fenced until `herd node ready` (or its
        // auto_ready): its start is recorded as a sign of life, nothing more.
        node.last_keepalive_ms = Some(now);
        node.fence.power_on_due_ms = None;
        node.revision = index;
        let msg = format!("{name} is back ({new}) and stays fenced until `herd node ready`");
        push_event(state, index, now, "daemon-state", Some(name), msg);
        return Ok(Reply::Done);
    }
    node.daemon_state = *new;
    node.return_by_ms = if *new == DaemonState::Stop { *return_by_ms } else { None };
    // Its own word, as a keepalive is: a client back from a reset writes `run` before its first
    // keepalive, and may start VMs on that commit — a self-fence record asked before must fail.
    node.last_keepalive_ms = Some(now);
    node.revision = index;
    if old != *new {
        push_event(state, index, now, "daemon-state", Some(name), format!("{name}: {old} -> {new}"));
        crate::fence::place_waiting(state, index, now);
    }
    Ok(Reply::Done)
}

/// `SetDomainState`: flush and unflush; only `ready` leaves the fenced state.
pub(crate) fn set_domain_state(
    state: &mut State,
    at: At<'_>,
    name: &String,
    to: &DomainState,
    node_id: &Option<NodeId>,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let node = own_record(state, name, *node_id)?;
    check_revision(format!("node {name}"), node.revision, op)?;
    let from = node.domain_state;
    if !from.may_become(*to) {
        return Err(ApplyError::Invalid(format!("{name}: domain state {from} cannot become {to}")));
    }
    if node.daemon_state == DaemonState::Fenced {
        // Only `ready` (unflush) leaves the fenced state, and only once the node's
        // daemon has been heard since the fence: a powered-off node is not made `run`.
        let back = matches!((node.last_keepalive_ms, node.fence.fenced_ms), (Some(k), Some(f)) if k > f);
        if *to != DomainState::Unflush || !back {
            return Err(ApplyError::Invalid(format!(
                "{name} is fenced: it must be back (its daemon running) before `herd node ready`"
            )));
        }
        node.daemon_state = DaemonState::Run;
    }
    node.domain_state = *to;
    node.revision = index;
    if from != *to {
        push_event(state, index, now, "domain-state", Some(name), format!("{name}: {from} -> {to}"));
        crate::fence::place_waiting(state, index, now);
    }
    Ok(Reply::Done)
}

/// `SetHeartbeatAddrs`.
pub(crate) fn set_heartbeat_addrs(
    state: &mut State,
    at: At<'_>,
    name: &str,
    addrs: &BTreeMap<String, String>,
    node_id: &Option<NodeId>,
) -> Result<Reply, ApplyError> {
    let At { index, op, .. } = at;
    if addrs.len() > MAX_NETWORKS {
        return Err(ApplyError::Invalid(format!("at most {MAX_NETWORKS} heartbeat networks")));
    }
    for (net, addr) in addrs {
        validate_name(net).map_err(|_| ApplyError::Invalid(format!("heartbeat network name {net:?}")))?;
        if addr.is_empty() || addr.len() > MAX_NAME_LEN {
            return Err(ApplyError::Invalid(format!("heartbeat address for {net}: 1 to 253 bytes")));
        }
    }
    let node = own_record(state, name, *node_id)?;
    check_revision(format!("node {name}"), node.revision, op)?;
    node.heartbeat = addrs.clone();
    node.revision = index;
    Ok(Reply::Done)
}

/// `Takeover`: the new leader takes the primary role; every other coordinator holding it is
/// set to secondary.
pub(crate) fn takeover(
    state: &mut State,
    at: At<'_>,
    name: &String,
    node_id: &Option<NodeId>,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let node = own_record(state, name, *node_id)?;
    check_revision(format!("node {name}"), node.revision, op)?;
    if node.role != Role::Coordinator {
        return Err(ApplyError::Invalid(format!("{name} is not a coordinator")));
    }
    node.router_state = RouterState::Takeover;
    node.revision = index;
    let mut deposed = Vec::new();
    for other in state.nodes.values_mut().filter(|n| n.name != *name && n.role == Role::Coordinator) {
        if other.router_state != RouterState::Secondary {
            deposed.push(format!("{} ({})", other.name, other.router_state));
            other.router_state = RouterState::Secondary;
            other.revision = index;
        }
    }
    let was = if deposed.is_empty() { String::new() } else { format!("; set to secondary: {}", deposed.join(", ")) };
    push_event(state, index, now, "primary-takeover", Some(name), format!("{name} takes over the primary role{was}"));
    Ok(Reply::Done)
}

/// `SetRouterState`: a coordinator's own step.
pub(crate) fn set_router_state(
    state: &mut State,
    at: At<'_>,
    name: &String,
    to: &RouterState,
    node_id: &Option<NodeId>,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let node = own_record(state, name, *node_id)?;
    check_revision(format!("node {name}"), node.revision, op)?;
    if node.role != Role::Coordinator {
        return Err(ApplyError::Invalid(format!("{name} is a hypervisor: its router state is client")));
    }
    let from = node.router_state;
    if !from.may_become(*to) {
        return Err(ApplyError::Invalid(format!("router state {from} cannot become {to}")));
    }
    node.router_state = *to;
    node.revision = index;
    if from != *to && matches!(to, RouterState::Primary | RouterState::Secondary) {
        push_event(state, index, now, "router-state", Some(name), format!("{name}: {from} -> {to}"));
    }
    Ok(Reply::Done)
}

/// `SetNodeHealth`: the leader's finding about a member's Raft health; an event when it changes.
pub(crate) fn set_node_health(
    state: &mut State,
    at: At<'_>,
    name: &String,
    problem: Option<&str>,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let node = state.nodes.get_mut(name).ok_or_else(|| ApplyError::NoSuchNode(name.clone()))?;
    check_revision(format!("node {name}"), node.revision, op)?;
    let problem: Option<String> = problem.map(|p| p.chars().take(512).collect());
    if node.health.as_ref().map(|h| &h.problem) == problem.as_ref() {
        return Ok(Reply::Done);
    }
    node.health = problem.clone().map(|problem| NodeHealth { problem, since_ms: now });
    node.revision = index;
    let msg = match problem {
        Some(p) => format!("{name} is unhealthy: {p}"),
        None => format!("{name} replicates again"),
    };
    push_event(state, index, now, "node-health", Some(name), msg);
    Ok(Reply::Done)
}

/// `RecordAcked`: raises each member's mark (see `State::acked`); ids that are not members
/// (removed, or never were) are ignored. No event: this is bookkeeping, written often.
pub(crate) fn record_acked(state: &mut State, marks: &BTreeMap<NodeId, (u64, u64)>) -> Result<Reply, ApplyError> {
    for (id, (boot, index)) in marks {
        if state.node_by_id(*id).is_some() {
            state.acked.entry(*id).or_default().record(*boot, *index);
        }
    }
    Ok(Reply::Done)
}
