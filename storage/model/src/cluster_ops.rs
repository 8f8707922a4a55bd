//! Cluster-wide commands: creating the cluster, admitting and removing nodes, join tokens,
//! maintenance, and events worth recording. Pure, like the rest of the model.

use std::collections::BTreeSet;

use crate::apply::{check_revision, push_event, validate_name, At, MAX_NAME_LEN};
use crate::types::*;

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
        health: None,
        joined_ms: now,
        revision: index,
    }
}

/// `InitCluster`: the cluster and its first node (id 1).
pub(crate) fn init_cluster(
    state: &mut State,
    at: At<'_>,
    cluster_id: &str,
    token_hash: &str,
    node: &NewNode,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    check_revision("cluster".into(), state.meta.as_ref().map_or(0, |m| m.revision), op)?;
    if state.meta.is_some() {
        return Err(ApplyError::AlreadyInitialized);
    }
    // Nodes are only admitted into an initialised cluster: id 1 is free.
    debug_assert!(state.nodes.is_empty(), "nodes exist before init-cluster");
    if cluster_id.is_empty() || cluster_id.len() > MAX_NAME_LEN {
        return Err(ApplyError::Invalid("cluster id must be 1 to 253 bytes".into()));
    }
    validate_new_node(state, node)?;
    let id = 1;
    state.meta = Some(ClusterMeta {
        cluster_id: cluster_id.to_string(),
        created_ms: now,
        maintenance: false,
        maintenance_at: 0,
        join_token_hashes: BTreeSet::from([token_hash.to_string()]),
        join_tokens: Default::default(),
        next_node_id: id + 1,
        revision: index,
    });
    state.nodes.insert(node.name.clone(), new_record(node, id, index, now));
    push_event(state, index, now, "cluster-init", Some(&node.name), format!("cluster {cluster_id} created"));
    Ok(Reply::NodeRegistered { id })
}

/// `RegisterNode`: a node admitted by a join token gets the next id.
pub(crate) fn register_node(
    state: &mut State,
    at: At<'_>,
    node: &NewNode,
    token_hash: &str,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    check_revision(format!("node {}", node.name), node_revision(state, &node.name), op)?;
    let meta = state.meta.as_ref().ok_or(ApplyError::NotInitialized)?;
    if !meta.token_usable(token_hash, now) {
        return Err(ApplyError::BadToken);
    }
    let id = meta.next_node_id;
    validate_new_node(state, node)?;
    // Ids are never reused: the next one is above every id handed out.
    debug_assert!(state.nodes.values().all(|n| n.id < id), "next_node_id {id} is not above every node's id");
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

/// `CreateJoinToken`: a token made by `herd token create`.
pub(crate) fn create_join_token(
    state: &mut State,
    at: At<'_>,
    token_hash: &str,
    ttl_ms: &Option<u64>,
    uses: &Option<u32>,
) -> Result<Reply, ApplyError> {
    let At { index, now, .. } = at;
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
        token_hash.to_string(),
        JoinToken { created_ms: now, expires_ms: ttl_ms.map(|t| now.saturating_add(t)), uses_left: *uses },
    );
    meta.revision = index;
    let id: String = token_hash.chars().take(12).collect();
    push_event(state, index, now, "token-create", None, format!("join token {id} created"));
    Ok(Reply::Done)
}

/// `RevokeJoinToken`: by a unique hash prefix.
pub(crate) fn revoke_join_token(state: &mut State, at: At<'_>, id: &str) -> Result<Reply, ApplyError> {
    let At { index, now, .. } = at;
    let meta = state.meta.as_mut().ok_or(ApplyError::NotInitialized)?;
    if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApplyError::Invalid("a token id is at least 8 hex digits (`herd token list`)".into()));
    }
    let id = id.to_ascii_lowercase();
    let matching: Vec<String> =
        meta.join_token_hashes.iter().chain(meta.join_tokens.keys()).filter(|h| h.starts_with(&id)).cloned().collect();
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

/// `RemoveNode`: only a node with no VMs.
pub(crate) fn remove_node(state: &mut State, at: At<'_>, name: &String) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let node = state.nodes.get(name).ok_or_else(|| ApplyError::NoSuchNode(name.clone()))?;
    check_revision(format!("node {name}"), node.revision, op)?;
    let assigned: Vec<&str> = state.vms.values().filter(|v| v.node == *name).map(|v| v.spec.name.as_str()).collect();
    if !assigned.is_empty() {
        return Err(ApplyError::Invalid(format!("{name} still has VMs ({}): move them first", assigned.join(", "))));
    }
    // A fence under way may still send its power-off: the token names a decision on this
    // record, which must stand until the fence is done or cancelled.
    if node.fence.pending.is_some() {
        return Err(ApplyError::Invalid(format!(
            "a fence of {name} is under way: wait until it is done (or cancel it) before removing it"
        )));
    }
    // A move away from it waits for it to stop the VM; once removed it never will. Only a
    // fenced node (its power-off proved the VM off, as `FenceDone` assumes) lets them go.
    let fenced = node.daemon_state == DaemonState::Fenced;
    let leaving: Vec<&str> =
        state.vms.values().filter(|v| v.migrating_from.as_ref() == Some(name)).map(|v| v.spec.name.as_str()).collect();
    if !leaving.is_empty() && !fenced {
        return Err(ApplyError::Invalid(format!(
            "VMs are still moving away from {name} ({}): wait until it stopped them, or fence it first",
            leaving.join(", ")
        )));
    }
    let id = node.id;
    state.nodes.remove(name);
    for vm in state.vms.values_mut() {
        vm.seen_on.remove(name);
        if vm.migrating_from.as_ref() == Some(name) {
            vm.migrating_from = None;
            vm.revision = index;
        }
    }
    state.removed.insert(id);
    state.acked.remove(&id);
    push_event(state, index, now, "node-remove", Some(name), format!("{name} (id {id}) removed"));
    Ok(Reply::Done)
}

/// `SetMaintenance`.
pub(crate) fn set_maintenance(state: &mut State, at: At<'_>, on: &bool) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let meta = state.meta.as_mut().ok_or(ApplyError::NotInitialized)?;
    check_revision("cluster".into(), meta.revision, op)?;
    let was = meta.maintenance;
    meta.maintenance = *on;
    meta.revision = index;
    if was != *on {
        let word = if *on { "on" } else { "off" };
        if *on {
            meta.maintenance_at = index;
        }
        push_event(state, index, now, "maintenance", None, format!("maintenance {word}"));
        if !*on {
            // Drift reported during maintenance is acted on now: strays adopted or failed,
            // VMs waiting for a node placed where one fits.
            crate::stray::resolve_all(state, index, now);
            crate::fence::place_waiting(state, index, now);
        }
    }
    Ok(Reply::Done)
}

/// `RecordEvent`: something the event log should show.
pub(crate) fn record_event(
    state: &mut State,
    at: At<'_>,
    kind: &str,
    node: &Option<String>,
    message: &str,
) -> Result<Reply, ApplyError> {
    let At { index, now, .. } = at;
    if kind.is_empty()
        || kind.len() > 64
        || message.len() > 1024
        || node.as_ref().is_some_and(|n| n.len() > MAX_NAME_LEN)
    {
        return Err(ApplyError::Invalid("event: kind 1 to 64 bytes, message up to 1024".into()));
    }
    push_event(state, index, now, kind, node.as_ref(), message.to_string());
    Ok(Reply::Done)
}
