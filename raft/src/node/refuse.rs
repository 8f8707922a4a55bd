//! A node whose log went backwards is refused: the leader found it (see [`crate::watch`]) and
//! tells it; it stops Raft, records why in its identity (a restart stays refused) and says
//! what to do. Recovery is remove + re-join: its id is never used again.

use std::time::Duration;

use herd_storage::identity::Identity;
use herd_storage::model::NodeId;
use herd_storage::types::TypeConfig;
use openraft::storage::RaftLogStorage;

use super::ClusterNode;
use crate::wire::Rpc;

/// The log line and status text of a refused node: why, and the way back.
pub fn advice(why: &str, name: &str) -> String {
    format!(
        "this node takes no part in Raft: {why}. Its data_dir is older than what it acknowledged \
         (restored from a copy?) and cannot be trusted. Recovery: `herd node remove {name} --force` \
         on another node, empty this node's data_dir, and `herd join-cluster` again"
    )
}

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Why this node takes no part in Raft any more (its log went backwards), if so.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops Raft on this node for good under its id, told by the leader that its log went
    /// backwards; the reason is kept in its identity.
    pub(super) async fn refuse(&self, reason: String) {
        let member = self.member.write().unwrap_or_else(|p| p.into_inner()).take();
        tracing::error!("{}", advice(&reason, &self.settings.name));
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        let Some(m) = member else { return };
        let identity = Identity {
            node_id: m.id,
            cluster_id: m.cluster_id.clone(),
            name: self.settings.name.clone(),
            role: Some(self.settings.role),
            removed: false,
            refused: Some(reason),
            pending_join: false,
        };
        if let Err(e) = self.identity.save(&identity).await {
            tracing::error!("could not record the refusal in data_dir: {e}");
        }
        if let Err(e) = m.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    /// The leader tells follower `id` (at `addr`) that its log went backwards.
    pub async fn tell_log_reverted(&self, id: NodeId, addr: &str, reason: &str) {
        let Some(member) = self.member() else { return };
        let mut c = self.client(addr.to_string(), Some(id), member.cluster_id.clone());
        if let Err(e) = c.call(Rpc::LogReverted { reason: reason.to_string() }, Duration::from_secs(2)).await {
            tracing::warn!(id, "could not tell the node its log went backwards: {e}");
        }
    }
}
