//! The pure, deterministic transition function of the replicated model.

use std::collections::BTreeSet;

use super::types::*;

/// The event log keeps this many entries; older ones are dropped.
pub const MAX_EVENTS: usize = 512;
/// Request ids remembered for deduplication. A retry arrives within seconds; 4096 writes at
/// the cluster's write rate (a keepalive per node every few seconds) covers minutes.
pub const MAX_REMEMBERED_REQUESTS: usize = 4096;
/// Bound on request ids (they are kept in the state for deduplication).
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// Bound on names and addresses, so a bad client cannot bloat the state.
const MAX_NAME_LEN: usize = 253;
const MAX_OPS: usize = 64;
/// Heartbeat networks per node.
const MAX_NETWORKS: usize = 8;

/// What one applied entry produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub response: Response,
}

/// Applies the request at log `index` to `state`.
///
/// Deterministic: the result depends only on `state`, `index` and `req`. All operations of the
/// request take effect, or none (the state is left untouched on any refusal). A request id
/// seen before returns the remembered result and changes nothing.
pub fn apply(state: &mut State, index: u64, req: &Request) -> Applied {
    if req.id.is_empty() || req.id.len() > MAX_REQUEST_ID_LEN {
        // Not remembered: an id that cannot be stored cannot deduplicate anything.
        let result = Err(ApplyError::Invalid(format!("a request id is 1 to {MAX_REQUEST_ID_LEN} bytes")));
        return Applied { response: Response { index, result } };
    }
    if let Some(seen) = state.requests.get(&req.id) {
        return Applied { response: Response { index, result: seen.result.clone() } };
    }

    let now = state.clock_ms.max(req.time_ms);
    if now != state.clock_ms {
        state.clock_ms = now;
    }

    let result = apply_ops(state, index, now, &req.ops);

    remember(state, index, now, req, &result);
    Applied { response: Response { index, result } }
}

fn apply_ops(state: &mut State, index: u64, now: u64, ops: &[Op]) -> Result<Reply, ApplyError> {
    if ops.is_empty() || ops.len() > MAX_OPS {
        return Err(ApplyError::Invalid(format!("a request carries 1 to {MAX_OPS} operations")));
    }
    if let [op] = ops {
        // One operation validates fully before it mutates: no copy needed.
        return apply_op(state, index, now, op);
    }
    let backup = state.clone();
    let mut reply = Reply::Done;
    for op in ops {
        match apply_op(state, index, now, op) {
            Ok(r) => reply = r,
            Err(e) => {
                *state = backup;
                return Err(e);
            }
        }
    }
    Ok(reply)
}

pub(crate) fn check_revision(object: String, actual: u64, op: &Op) -> Result<(), ApplyError> {
    match op.expect_revision {
        Some(expected) if expected != actual => Err(ApplyError::RevisionMismatch { object, expected, actual }),
        _ => Ok(()),
    }
}

fn node_revision(state: &State, name: &str) -> u64 {
    state.nodes.get(name).map_or(0, |n| n.revision)
}

fn validate_new_node(state: &State, node: &NewNode) -> Result<(), ApplyError> {
    validate_name(&node.name)?;
    if node.cluster_addr.is_empty() || node.cluster_addr.len() > MAX_NAME_LEN {
        return Err(ApplyError::Invalid("cluster address must be 1 to 253 bytes".into()));
    }
    if let Some(existing) = state.nodes.get(&node.name) {
        return Err(ApplyError::NodeExists { name: existing.name.clone(), id: existing.id });
    }
    if let Some(other) = state.nodes.values().find(|n| n.cluster_addr == node.cluster_addr) {
        return Err(ApplyError::AddressInUse { addr: node.cluster_addr.clone(), name: other.name.clone() });
    }
    Ok(())
}

/// Node names: 1–253 bytes of ASCII letters, digits, `-`, `_` and `.` (host-name-like).
pub fn validate_name(name: &str) -> Result<(), ApplyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApplyError::Invalid(format!("node name {name:?}: use 1 to 253 letters, digits, '-', '_' or '.'")))
    }
}

fn new_record(node: &NewNode, id: NodeId, index: u64, now: u64) -> NodeRecord {
    NodeRecord {
        id,
        name: node.name.clone(),
        role: node.role,
        cluster_addr: node.cluster_addr.clone(),
        daemon_state: DaemonState::Init,
        domain_state: DomainState::Ready,
        router_state: RouterState::initial(node.role),
        return_by_ms: None,
        stats: NodeStats::default(),
        last_keepalive_ms: None,
        heartbeat: Default::default(),
        fencing: None,
        fence: Default::default(),
        joined_ms: now,
        revision: index,
    }
}

fn apply_op(state: &mut State, index: u64, now: u64, op: &Op) -> Result<Reply, ApplyError> {
    match &op.cmd {
        Command::InitCluster { cluster_id, token_hash, node } => {
            check_revision("cluster".into(), state.meta.as_ref().map_or(0, |m| m.revision), op)?;
            if state.meta.is_some() {
                return Err(ApplyError::AlreadyInitialized);
            }
            if cluster_id.is_empty() || cluster_id.len() > MAX_NAME_LEN {
                return Err(ApplyError::Invalid("cluster id must be 1 to 253 bytes".into()));
            }
            validate_new_node(state, node)?;
            let id = 1;
            state.meta = Some(ClusterMeta {
                cluster_id: cluster_id.clone(),
                created_ms: now,
                maintenance: false,
                join_token_hashes: BTreeSet::from([token_hash.clone()]),
                join_tokens: Default::default(),
                next_node_id: id + 1,
                revision: index,
            });
            state.nodes.insert(node.name.clone(), new_record(node, id, index, now));
            push_event(state, index, now, "cluster-init", Some(&node.name), format!("cluster {cluster_id} created"));
            Ok(Reply::NodeRegistered { id })
        }
        Command::RegisterNode { node, token_hash } => {
            check_revision(format!("node {}", node.name), node_revision(state, &node.name), op)?;
            let meta = state.meta.as_ref().ok_or(ApplyError::NotInitialized)?;
            if !meta.token_usable(token_hash, now) {
                return Err(ApplyError::BadToken);
            }
            let id = meta.next_node_id;
            validate_new_node(state, node)?;
            if let Some(meta) = state.meta.as_mut() {
                meta.next_node_id = id + 1;
                meta.revision = index;
                if let Some(t) = meta.join_tokens.get_mut(token_hash) {
                    t.uses_left = t.uses_left.map(|u| u.saturating_sub(1));
                }
            }
            state.nodes.insert(node.name.clone(), new_record(node, id, index, now));
            push_event(
                state,
                index,
                now,
                "node-join",
                Some(&node.name),
                format!("{} joined as {} with id {id}", node.name, node.role),
            );
            Ok(Reply::NodeRegistered { id })
        }
        Command::CreateJoinToken { token_hash, ttl_ms, uses } => {
            let meta = state.meta.as_mut().ok_or(ApplyError::NotInitialized)?;
            if token_hash.len() != 64 || !token_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApplyError::Invalid("a token hash is 64 hex digits".into()));
            }
            if ttl_ms.is_some_and(|t| !(1_000..=366 * 86_400_000).contains(&t)) {
                return Err(ApplyError::Invalid("a token's lifetime is between 1 s and 366 days".into()));
            }
            if uses.is_some_and(|u| !(1..=10_000).contains(&u)) {
                return Err(ApplyError::Invalid("a token admits between 1 and 10000 joins".into()));
            }
            // Tokens that can admit no one any more are forgotten an hour after they expired
            // (used up: an hour after they were made), so that a join that passed its first
            // phase just before still finishes its second.
            meta.join_tokens.retain(|_, t| {
                let dead_since = match (t.expires_ms, t.uses_left) {
                    (Some(e), _) if e <= now => Some(e),
                    (_, Some(0)) => Some(t.created_ms),
                    _ => None,
                };
                dead_since.is_none_or(|d| now.saturating_sub(d) < 3_600_000)
            });
            if meta.join_tokens.len() >= MAX_JOIN_TOKENS {
                return Err(ApplyError::Invalid(format!(
                    "{MAX_JOIN_TOKENS} join tokens exist: revoke some (`herd token list`, `herd token revoke ID`)"
                )));
            }
            if meta.join_tokens.contains_key(token_hash) || meta.join_token_hashes.contains(token_hash) {
                return Err(ApplyError::Invalid("that token exists already".into()));
            }
            meta.join_tokens.insert(
                token_hash.clone(),
                JoinToken { created_ms: now, expires_ms: ttl_ms.map(|t| now.saturating_add(t)), uses_left: *uses },
            );
            meta.revision = index;
            let id: String = token_hash.chars().take(12).collect();
            push_event(state, index, now, "token-create", None, format!("join token {id} created"));
            Ok(Reply::Done)
        }
        Command::RevokeJoinToken { id } => {
            let meta = state.meta.as_mut().ok_or(ApplyError::NotInitialized)?;
            if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApplyError::Invalid("a token id is at least 8 hex digits (`herd token list`)".into()));
            }
            let id = id.to_ascii_lowercase();
            let matching: Vec<String> = meta
                .join_token_hashes
                .iter()
                .chain(meta.join_tokens.keys())
                .filter(|h| h.starts_with(&id))
                .cloned()
                .collect();
            let hash = match matching.as_slice() {
                [one] => one.clone(),
                [] => return Err(ApplyError::Invalid(format!("no join token {id}"))),
                _ => return Err(ApplyError::Invalid(format!("{id} names more than one token: give more digits"))),
            };
            meta.join_token_hashes.remove(&hash);
            meta.join_tokens.remove(&hash);
            meta.revision = index;
            push_event(state, index, now, "token-revoke", None, format!("join token {id} revoked"));
            Ok(Reply::Done)
        }
        Command::RemoveNode { name } => {
            let node = state.nodes.get(name).ok_or_else(|| ApplyError::NoSuchNode(name.clone()))?;
            check_revision(format!("node {name}"), node.revision, op)?;
            let assigned: Vec<&str> =
                state.vms.values().filter(|v| v.node == *name).map(|v| v.spec.name.as_str()).collect();
            if !assigned.is_empty() {
                return Err(ApplyError::Invalid(format!(
                    "{name} still has VMs ({}): move them first",
                    assigned.join(", ")
                )));
            }
            let id = node.id;
            state.nodes.remove(name);
            push_event(state, index, now, "node-remove", Some(name), format!("{name} (id {id}) removed"));
            Ok(Reply::Done)
        }
        Command::Keepalive { name, stats, node_id } => {
            if stats.unmanaged_domains.len() > MAX_UNMANAGED
                || stats.unmanaged_domains.iter().any(|d| d.is_empty() || d.len() > 256)
            {
                return Err(ApplyError::Invalid(format!(
                    "a keepalive names at most {MAX_UNMANAGED} unmanaged domains of 1 to 256 bytes"
                )));
            }
            let node = own_record(state, name, *node_id)?;
            check_revision(format!("node {name}"), node.revision, op)?;
            node.stats = stats.clone();
            node.last_keepalive_ms = Some(now);
            node.revision = index;
            Ok(Reply::Done)
        }
        Command::SetDaemonState { name, state: new, return_by_ms, node_id } => {
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
                node.revision = index;
                let msg = format!("{name} is back ({new}) and stays fenced until `herd node ready`");
                push_event(state, index, now, "daemon-state", Some(name), msg);
                return Ok(Reply::Done);
            }
            node.daemon_state = *new;
            node.return_by_ms = if *new == DaemonState::Stop { *return_by_ms } else { None };
            node.revision = index;
            if old != *new {
                push_event(state, index, now, "daemon-state", Some(name), format!("{name}: {old} -> {new}"));
            }
            Ok(Reply::Done)
        }
        Command::SetDomainState { name, state: to, node_id } => {
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
            }
            Ok(Reply::Done)
        }
        Command::SetHeartbeatAddrs { name, addrs, node_id } => {
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
        Command::Takeover { name, node_id } => {
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
            let was =
                if deposed.is_empty() { String::new() } else { format!("; set to secondary: {}", deposed.join(", ")) };
            push_event(
                state,
                index,
                now,
                "primary-takeover",
                Some(name),
                format!("{name} takes over the primary role{was}"),
            );
            Ok(Reply::Done)
        }
        Command::SetRouterState { name, state: to, node_id } => {
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
        Command::DefineVm { .. }
        | Command::ModifyVm { .. }
        | Command::SetVmState { .. }
        | Command::MigrateVm { .. }
        | Command::UndefineVm { .. }
        | Command::ReleaseVm { .. }
        | Command::AbortMigration { .. }
        | Command::ReportVm { .. } => super::vm::apply_vm_op(state, index, now, op),
        Command::SetFencePolicy { .. }
        | Command::SetFenceReady { .. }
        | Command::DecideFence { .. }
        | Command::CancelFence { .. }
        | Command::FenceDone { .. } => super::fence::apply_fence_op(state, index, now, op),
        Command::RecordEvent { kind, node, message } => {
            if kind.is_empty()
                || kind.len() > 64
                || message.len() > 1024
                || node.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN)
            {
                return Err(ApplyError::Invalid("event: kind 1 to 64 bytes, message up to 1024".into()));
            }
            push_event(state, index, now, kind, node.as_ref(), message.clone());
            Ok(Reply::Done)
        }
        Command::SetMaintenance { on } => {
            let meta = state.meta.as_mut().ok_or(ApplyError::NotInitialized)?;
            check_revision("cluster".into(), meta.revision, op)?;
            let was = meta.maintenance;
            meta.maintenance = *on;
            meta.revision = index;
            if was != *on {
                let word = if *on { "on" } else { "off" };
                push_event(state, index, now, "maintenance", None, format!("maintenance {word}"));
            }
            Ok(Reply::Done)
        }
    }
}

/// The record a node writes about itself: it must exist and, when the writer names its id,
/// carry that id.
pub(crate) fn own_record<'a>(
    state: &'a mut State,
    name: &str,
    node_id: Option<NodeId>,
) -> Result<&'a mut NodeRecord, ApplyError> {
    match state.nodes.get_mut(name) {
        Some(node) if node_id.is_none_or(|id| id == node.id) => Ok(node),
        _ => Err(ApplyError::NoSuchNode(name.to_string())),
    }
}

pub(crate) fn push_event(state: &mut State, index: u64, now: u64, kind: &str, node: Option<&String>, message: String) {
    while state.events.len() >= MAX_EVENTS {
        state.events.pop_front();
    }
    state.events.push_back(Event { index, time_ms: now, kind: kind.into(), node: node.cloned(), message });
}

fn remember(state: &mut State, index: u64, now: u64, req: &Request, result: &Result<Reply, ApplyError>) {
    if state.requests.len() >= MAX_REMEMBERED_REQUESTS {
        // Forget the oldest (smallest index); ties cannot happen, one entry per index.
        state.requests.pop_oldest();
    }
    state.requests.insert(req.id.clone(), RequestRecord { index, time_ms: now, result: result.clone() });
}
