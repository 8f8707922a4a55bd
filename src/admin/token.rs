//! `token create|list|revoke`: join tokens (the cluster keeps only their hashes).

use serde_json::{json, Value};

use herd_storage::model::Command;

use super::{member, read_index, write_one, AdminError};
use crate::daemon::Daemon;

/// How many hex digits of a token's hash name it.
const ID_DIGITS: usize = 12;

/// Makes a join token: valid `ttl_ms` (default: until revoked), for `uses` joins.
pub(super) async fn create(d: &Daemon, ttl_ms: Option<u64>, uses: Option<u32>) -> Result<Value, AdminError> {
    let token = herd_raft::node::new_join_token();
    let hash = herd_raft::node::token_hash(&token);
    write_one(d, Command::CreateJoinToken { token_hash: hash.clone(), ttl_ms, uses }).await?;
    let token = d.node.printable_token(&token);
    let id: String = hash.chars().take(ID_DIGITS).collect();
    Ok(json!({ "token": token, "id": id, "ttl_ms": ttl_ms, "uses": uses }))
}

/// The join tokens: ids (hash prefixes), lifetimes, uses left; a linearizable read.
pub(super) async fn list(d: &Daemon) -> Result<Value, AdminError> {
    read_index(d, false).await?;
    let member = member(d)?;
    let g = member.view.read();
    let meta = g.state.meta.as_ref().ok_or(herd_storage::model::ApplyError::NotInitialized)?;
    let now = g.state.clock_ms;
    let id = |h: &str| h.chars().take(ID_DIGITS).collect::<String>();
    let first = meta.join_token_hashes.iter().map(|h| {
        json!({ "id": id(h), "first": true, "created_ms": meta.created_ms,
                "expires_ms": null, "uses_left": null, "usable": true })
    });
    let made = meta.join_tokens.iter().map(|(h, t)| {
        let usable = meta.token_usable(h, now);
        json!({ "id": id(h), "first": false, "created_ms": t.created_ms,
                "expires_ms": t.expires_ms, "uses_left": t.uses_left, "usable": usable })
    });
    Ok(Value::Array(first.chain(made).collect()))
}

/// Revokes the join token `id` (a hash prefix, at least 8 hex digits).
pub(super) async fn revoke(d: &Daemon, id: String) -> Result<Value, AdminError> {
    write_one(d, Command::RevokeJoinToken { id: id.clone() }).await?;
    Ok(json!({ "id": id, "message": format!("join token {id} revoked") }))
}
