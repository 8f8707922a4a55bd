//! A node whose log went backwards is refused: the leader found it (see [`crate::watch`]) and
//! tells it; it stops Raft, records why in its identity (a restart stays refused) and says
//! what to do. Recovery is remove + re-join: its id is never used again.

use std::time::Duration;

use herd_storage::identity::Identity;
use herd_storage::model::{NodeId, State};
use herd_storage::types::{LogId, TypeConfig};
use openraft::storage::RaftLogStorage;

use super::ClusterNode;
use crate::wire::{Rpc, RpcError};

/// The log line and status text of a refused node: why, and the way back.
pub fn advice(why: &str, name: &str) -> String {
    format!(
        "this node takes no part in Raft: {why}. Its data_dir is older than what it acknowledged \
         (restored from a copy?) and cannot be trusted. Recovery: `herd node remove {name} --force` \
         on another node, empty this node's data_dir, and `herd join-cluster` again"
    )
}

/// Why a vote request from `candidate`, whose log ends at `last`, must be refused: the
/// cluster recorded it holding a committed entry beyond that (`State::acked`), so its log went
/// backwards — with the entries it lost, its vote count could elect a leader without them.
pub fn vote_refusal(state: &State, candidate: NodeId, last: Option<LogId>) -> Option<String> {
    let mark = state.acked.get(&candidate)?.floor();
    let ends = last.map_or(0, |l| l.index);
    (ends < mark).then(|| {
        format!("vote refused: node {candidate}'s log ends at entry {ends}, but it held entry {mark} (its log went backwards)")
    })
}

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Whether this node's log went backwards, judged by the cluster's record of what its
    /// earlier boots held (`State::acked`) against where its log ended when Raft started: a
    /// leader that never saw it acknowledge anything (a leader change while it was down) may
    /// repair its log without a conflict, but the record tells. Refuses this node if so;
    /// returns whether it did. Run on every tick of the member duties.
    pub async fn check_log_held(&self) -> bool {
        let Some(m) = self.member() else { return false };
        let held = m.view.read().state.acked.get(&m.id).copied();
        let Some(why) = held.and_then(|h| h.lost(m.boot, m.log_end_at_start.unwrap_or(0))) else { return false };
        self.refuse(why).await;
        true
    }

    /// Refuses a vote (or pre-vote) request whose candidate lost committed entries it held
    /// (see [`vote_refusal`]); logged at most once per 10 s.
    pub(super) fn check_vote(
        &self,
        member: &super::Member,
        candidate: Option<NodeId>,
        last: Option<LogId>,
    ) -> Result<(), RpcError> {
        let Some(candidate) = candidate else { return Ok(()) };
        let refusal = vote_refusal(&member.view.read().state, candidate, last);
        let Some(why) = refusal else { return Ok(()) };
        let mut logged = self.vote_refused_logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *logged = Some(tokio::time::Instant::now());
            tracing::error!("{why}");
        }
        Err(RpcError::Refused(why))
    }

    /// Why this node takes no part in Raft any more (its log went backwards), if so.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops Raft on this node for good under its id, told by the leader that its log went
    /// backwards; the reason is kept in its identity.
    pub(super) async fn refuse(&self, reason: String) {
        let member = self.member.write().unwrap_or_else(|p| p.into_inner()).take();
        let Some(m) = member else {
            tracing::error!("{}", advice(&reason, &self.settings.name));
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            return;
        };
        self.record_refusal(m.id, &m.cluster_id, reason).await;
        if let Err(e) = m.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
    }

    /// Says why this node is refused (ERROR, status) and keeps it in its identity, so that a
    /// restart stays refused.
    pub(super) async fn record_refusal(&self, node_id: NodeId, cluster_id: &str, reason: String) {
        tracing::error!("{}", advice(&reason, &self.settings.name));
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        let identity = Identity {
            node_id,
            cluster_id: cluster_id.to_string(),
            name: self.settings.name.clone(),
            role: Some(self.settings.role),
            removed: false,
            refused: Some(reason),
            pending_join: false,
            client: false,
            seeds: Vec::new(),
        };
        if let Err(e) = self.identity.save(&identity).await {
            tracing::error!("could not record the refusal in data_dir: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_whose_log_ends_below_its_recorded_mark_gets_no_vote() {
        let mut s = State::default();
        s.acked.entry(3).or_default().record(7, 40);
        let at = |i: u64| Some(openraft::testing::log_id::<TypeConfig>(2, 1, i));
        assert!(vote_refusal(&s, 3, at(39)).is_some_and(|w| w.contains("went backwards")));
        assert!(vote_refusal(&s, 3, None).is_some(), "an empty log");
        assert!(vote_refusal(&s, 3, at(40)).is_none());
        assert!(vote_refusal(&s, 2, at(1)).is_none(), "no mark: nothing known");
    }
}
