//! `init-cluster`, `join-cluster`, `cluster info`, `cluster maintenance`, `events`,
//! `cert rotate`.

use serde_json::{json, Value};

use herd_storage::model::{ApplyError, Command, Role};

use super::dto::EventView;
use super::{member, read_index, write_one, AdminError, JOIN_TIMEOUT, WRITE_TIMEOUT};
use crate::daemon::Daemon;

/// How many events `events` shows unless asked otherwise.
const DEFAULT_EVENTS: usize = 100;

pub(super) async fn init(d: &Daemon) -> Result<Value, AdminError> {
    let out = d.node.init_cluster(WRITE_TIMEOUT).await?;
    d.member_started();
    Ok(json!({ "cluster_id": out.cluster_id, "token": out.token }))
}

pub(super) async fn join(d: &Daemon, peer: String, token: String, role: Option<Role>) -> Result<Value, AdminError> {
    if let Some(r) = role {
        if r != d.config.role {
            return Err(AdminError::invalid(format!(
                "--role {r} disagrees with this node's configured role {}",
                d.config.role
            )));
        }
    }
    let out = d.node.join_cluster(&peer, token.trim(), JOIN_TIMEOUT).await?;
    d.member_started();
    let client = d.node.session().is_some();
    Ok(json!({ "node_id": out.node_id, "cluster_id": out.cluster_id, "voter": out.voter, "client": client }))
}

pub(super) async fn info(d: &Daemon, local: bool) -> Result<Value, AdminError> {
    let index = read_index(d, local).await?;
    let member = member(d)?;
    let g = member.view.read();
    let meta = g.state.meta.as_ref().ok_or(ApplyError::NotInitialized)?;
    Ok(json!({
        "cluster_id": meta.cluster_id,
        "created_ms": meta.created_ms,
        "maintenance": meta.maintenance,
        "next_node_id": meta.next_node_id,
        "revision": meta.revision,
        "nodes": g.state.nodes.len(),
        "applied_index": g.last_applied.as_ref().map_or(0, |l| l.index),
        "read_index": index,
        "linearizable": !local,
    }))
}

pub(super) async fn maintenance(d: &Daemon, on: bool) -> Result<Value, AdminError> {
    write_one(d, Command::SetMaintenance { on }).await?;
    Ok(json!({ "maintenance": on }))
}

/// The newest entries of the replicated event log (local read).
pub(super) fn events(d: &Daemon, limit: Option<usize>) -> Result<Value, AdminError> {
    let member = member(d)?;
    let g = member.view.read();
    let skip = g.state.events.len().saturating_sub(limit.unwrap_or(DEFAULT_EVENTS));
    let events: Vec<EventView> = g.state.events.iter().skip(skip).map(EventView::of).collect();
    Ok(json!({ "applied_index": g.last_applied.as_ref().map_or(0, |l| l.index), "events": events }))
}

/// Renews this node's certificate now (a new key; the leader signs it).
pub(super) async fn cert_rotate(d: &Daemon) -> Result<Value, AdminError> {
    let info = d.node.renew_certificate(WRITE_TIMEOUT).await?;
    tracing::info!(expires_ms = info.not_after_ms, "certificate renewed");
    Ok(json!({
        "node_id": info.node_id,
        "cert_expires_ms": info.not_after_ms,
        "message": format!("certificate renewed: valid {} more days", herd_raft::tls::NODE_CERT_DAYS),
    }))
}
