//! The pure, deterministic transition function of the replicated model.

use crate::types::*;
use crate::{cluster_ops, node_ops};

/// The event log keeps this many entries; older ones are dropped.
pub const MAX_EVENTS: usize = 512;
/// Request ids remembered for deduplication. A retry arrives within seconds; 4096 writes at
/// the cluster's write rate (a keepalive per node every few seconds) covers minutes.
pub const MAX_REMEMBERED_REQUESTS: usize = 4096;
/// Bound on request ids (they are kept in the state for deduplication).
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// Bound on names and addresses, so a bad client cannot bloat the state.
pub(crate) const MAX_NAME_LEN: usize = 253;
/// Operations one request may carry.
pub const MAX_OPS: usize = 64;
/// Operations a request of keepalives only may carry: a coordinator writes those of all the
/// clients it heard in one request per interval (each is small, its statistics bounded, and
/// only the records they name are backed up), so 1000 clients cost the log a few changes per
/// interval rather than one per 64 of them.
pub const MAX_KEEPALIVE_OPS: usize = 1024;
/// Heartbeat networks per node.
pub(crate) const MAX_NETWORKS: usize = 8;

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
    let keepalives = ops.iter().all(|op| matches!(op.cmd, Command::Keepalive { .. }));
    if ops.is_empty() || ops.len() > MAX_OPS && !(keepalives && ops.len() <= MAX_KEEPALIVE_OPS) {
        return Err(ApplyError::Invalid(format!(
            "a request carries 1 to {MAX_OPS} operations (1 to {MAX_KEEPALIVE_OPS} keepalives)"
        )));
    }
    if let [op] = ops {
        // One operation validates fully before it mutates: no copy needed.
        return apply_op(state, index, now, op);
    }
    let backup = Backup::take(state, ops);
    let mut reply = Reply::Done;
    for op in ops {
        match apply_op(state, index, now, op) {
            Ok(r) => reply = r,
            Err(e) => {
                backup.restore(state);
                return Err(e);
            }
        }
    }
    Ok(reply)
}

/// A copy of what a multi-op request may change, put back when one of its ops is refused. A
/// copy of the whole state costs its size on every node (and every client following the
/// state) for every such request; the requests that grow with the cluster — the keepalives a
/// coordinator writes for its clients, up to [`MAX_KEEPALIVE_OPS`] at once — touch only the records
/// they name, so only those are copied.
enum Backup {
    /// The named node records as they were (`None`: absent).
    Nodes(Vec<(String, Option<NodeRecord>)>),
    /// Everything but the request log, which no operation touches (`remember` writes it
    /// after the operations).
    All(Box<State>),
}

impl Backup {
    fn take(state: &mut State, ops: &[Op]) -> Backup {
        let keepalives: Option<Vec<&String>> = ops
            .iter()
            .map(|op| match &op.cmd {
                // `node_ops::keepalive` changes its own record only.
                Command::Keepalive { name, .. } => Some(name),
                _ => None,
            })
            .collect();
        match keepalives {
            Some(names) => Backup::Nodes(names.into_iter().map(|n| (n.clone(), state.nodes.get(n).cloned())).collect()),
            None => {
                let requests = std::mem::take(&mut state.requests);
                let copy = state.clone();
                state.requests = requests;
                Backup::All(Box::new(copy))
            }
        }
    }

    fn restore(self, state: &mut State) {
        match self {
            // In reverse: a name given twice ends as it was before the first.
            Backup::Nodes(records) => {
                for (name, record) in records.into_iter().rev() {
                    match record {
                        Some(r) => state.nodes.insert(name, r),
                        None => state.nodes.remove(&name),
                    };
                }
            }
            Backup::All(copy) => {
                let requests = std::mem::take(&mut state.requests);
                *state = *copy;
                state.requests = requests;
            }
        }
    }
}

pub(crate) fn check_revision(object: String, actual: u64, op: &Op) -> Result<(), ApplyError> {
    match op.expect_revision {
        Some(expected) if expected != actual => Err(ApplyError::RevisionMismatch { object, expected, actual }),
        _ => Ok(()),
    }
}

/// Where an operation applies: its log index, the leader time, and the operation itself (for
/// its compare-and-set).
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    pub index: u64,
    pub now: u64,
    pub op: &'a Op,
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

/// The rule for a name herd gives something new (a node in its config, a joiner): the log's
/// rule ([`validate_name`]) and a letter or digit first — `-rf`, `.` or `..` would reach hook
/// executables as options or paths. Not applied to log entries (an entry an older version
/// accepted must apply the same everywhere).
pub fn validate_new_name(name: &str) -> Result<(), ApplyError> {
    validate_name(name)?;
    if name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(ApplyError::Invalid(format!("node name {name:?}: must start with a letter or a digit")))
    }
}

/// One operation: a dispatch to the function of its command (or of its command family).
fn apply_op(state: &mut State, index: u64, now: u64, op: &Op) -> Result<Reply, ApplyError> {
    let at = At { index, now, op };
    match &op.cmd {
        Command::InitCluster { cluster_id, token_hash, node } => {
            cluster_ops::init_cluster(state, at, cluster_id, token_hash, node)
        }
        Command::RegisterNode { node, token_hash } => cluster_ops::register_node(state, at, node, token_hash),
        Command::CreateJoinToken { token_hash, ttl_ms, uses } => {
            cluster_ops::create_join_token(state, at, token_hash, ttl_ms, uses)
        }
        Command::RevokeJoinToken { id } => cluster_ops::revoke_join_token(state, at, id),
        Command::RemoveNode { name } => cluster_ops::remove_node(state, at, name),
        Command::Keepalive { name, stats, node_id } => node_ops::keepalive(state, at, name, stats, node_id),
        Command::SetDaemonState { name, state: new, return_by_ms, node_id } => {
            node_ops::set_daemon_state(state, at, name, new, return_by_ms, node_id)
        }
        Command::SetDomainState { name, state: to, node_id } => {
            node_ops::set_domain_state(state, at, name, to, node_id)
        }
        Command::SetHeartbeatAddrs { name, addrs, node_id } => {
            node_ops::set_heartbeat_addrs(state, at, name, addrs, node_id)
        }
        Command::Takeover { name, node_id } => node_ops::takeover(state, at, name, node_id),
        Command::SetNodeHealth { name, problem } => node_ops::set_node_health(state, at, name, problem.as_deref()),
        Command::RecordAcked { marks } => node_ops::record_acked(state, marks),
        Command::SetRouterState { name, state: to, node_id } => {
            node_ops::set_router_state(state, at, name, to, node_id)
        }
        Command::DefineVm { .. }
        | Command::ModifyVm { .. }
        | Command::SetVmState { .. }
        | Command::MigrateVm { .. }
        | Command::UndefineVm { .. }
        | Command::ReleaseVm { .. }
        | Command::AbortMigration { .. }
        | Command::ReportVm { .. } => crate::vm::apply_vm_op(state, index, now, op),
        Command::SetFencePolicy { .. }
        | Command::SetFenceReady { .. }
        | Command::DecideFence { .. }
        | Command::ExecuteFence { .. }
        | Command::CancelFence { .. }
        | Command::FenceDone { .. }
        | Command::FencePowerOn { .. } => crate::fence::apply_fence_op(state, index, now, op),
        Command::RecordEvent { kind, node, message } => cluster_ops::record_event(state, at, kind, node, message),
        Command::SetMaintenance { on } => cluster_ops::set_maintenance(state, at, on),
        Command::ReportStray { name, node, running } => crate::stray::report_stray(state, at, name, node, *running),
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
    // Leader time only moves forward (`State::clock_ms`): the log's events are in time order.
    debug_assert!(state.events.back().is_none_or(|e| e.time_ms <= now), "event at {now} ms after a later one");
    while state.events.len() >= MAX_EVENTS {
        state.events.pop_front();
    }
    state.events.push_back(Event { index, time_ms: now, kind: kind.into(), node: node.cloned(), message });
}

fn remember(state: &mut State, index: u64, now: u64, req: &Request, result: &Result<Reply, ApplyError>) {
    // A request seen before returned its remembered result without coming here.
    debug_assert!(!state.requests.contains_key(&req.id), "request {} remembered twice", req.id);
    if state.requests.len() >= MAX_REMEMBERED_REQUESTS {
        // Forget the oldest (smallest index); ties cannot happen, one entry per index.
        state.requests.pop_oldest();
    }
    state.requests.insert(req.id.clone(), RequestRecord { index, time_ms: now, result: result.clone() });
}
