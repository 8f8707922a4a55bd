//! Leader operations: `leader_call` runs a `LeaderOp` here when this node leads, else forwards
//! it to the leader over the cluster transport (a pool of idle connections), retrying
//! retryable errors with backoff inside the deadline; a forwarded op is never forwarded again.

use std::sync::Arc;
use std::time::Duration;

use herd_storage::model::NodeId;
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use openraft::ReadPolicy;
use tokio::time::Instant;

use super::{not_leader, ClusterNode, Member, NodeError, LEADER_POOL};
use crate::clock;
use crate::network::{CallError, PeerClient};
use crate::wire::{LeaderOp, Rpc, RpcError, RpcReply};

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Calls a peer (which forwards to the leader), retrying retryable errors and transport
    /// failures with backoff until `deadline`.
    pub(super) async fn call_with_retry(
        &self,
        client: &mut PeerClient,
        op: LeaderOp,
        deadline: Instant,
    ) -> Result<RpcReply, NodeError> {
        let mut pause = Duration::from_millis(50);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let err = match client.call(Rpc::Leader(op.clone()), remaining).await {
                Ok(r) => return Ok(r),
                Err(CallError::Remote(e)) if e.is_retryable() => e.to_string(),
                Err(e @ CallError::Transport { .. }) => e.to_string(),
                Err(CallError::Remote(e)) => return Err(e.into()),
                Err(e) => return Err(e.into()),
            };
            if Instant::now() + pause >= deadline {
                return Err(NodeError::NoLeader(deadline.saturating_duration_since(Instant::now()), err));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs `op` on the leader: locally if this node leads, else forwarded; retries while no
    /// leader is known, the leader is not ready or cannot be reached, until `timeout`.
    pub async fn leader_call(&self, op: LeaderOp, timeout: Duration) -> Result<RpcReply, NodeError> {
        // A client (outside Raft) asks the coordinators its followed state names.
        if let (None, Some(c), false) = (self.member(), self.session(), self.is_removed()) {
            return c.link.call(op, timeout).await;
        }
        let member = self.require_member()?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let why = match self.leader_attempt(&member, &op, deadline).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() => e.to_string(),
                Err(e) => return Err(e.into()),
            };
            if Instant::now() + pause >= deadline {
                return Err(NodeError::NoLeader(timeout, why));
            }
            tracing::debug!(op = op.name(), "retrying: {why}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    }

    async fn leader_attempt(
        &self,
        member: &Arc<Member>,
        op: &LeaderOp,
        deadline: Instant,
    ) -> Result<RpcReply, RpcError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let leader = member.raft.metrics().borrow_watched().current_leader;
        match leader {
            Some(l) if l == member.id => tokio::time::timeout(remaining, self.execute(member, op.clone(), remaining))
                .await
                .unwrap_or_else(|_| Err(RpcError::Unavailable(format!("no result within {remaining:?}")))),
            Some(l) => self.forward(member, l, op.clone(), remaining).await,
            None => Err(RpcError::NotLeader { leader_id: None, leader_addr: None }),
        }
    }

    pub(super) async fn forward(
        &self,
        member: &Member,
        leader: NodeId,
        op: LeaderOp,
        timeout: Duration,
    ) -> Result<RpcReply, RpcError> {
        let addr = {
            let m = member.raft.metrics().borrow_watched().membership_config.clone();
            m.get_node(&leader).map(|n| n.addr.clone())
        };
        let Some(addr) = addr else {
            return Err(RpcError::NotLeader { leader_id: Some(leader), leader_addr: None });
        };
        // An idle connection to this leader from the pool, or a new one.
        let pooled = {
            let mut pool = self.leader_pool.lock().unwrap_or_else(|p| p.into_inner());
            // Connections to a former leader are of no use any more.
            pool.retain(|c| c.addr() == addr && c.target() == Some(leader));
            pool.pop()
        };
        let mut client = pooled.unwrap_or_else(|| self.client(addr.clone(), Some(leader), member.cluster_id.clone()));
        let mut op = op;
        if let LeaderOp::Write(req) = &mut op {
            let term = member.raft.metrics().borrow_watched().current_term;
            self.readable_by_leader((leader, term), req);
        }
        let result = client.call(Rpc::Leader(op), timeout).await;
        let keep = match &result {
            Ok(_) => true,
            // The peer answered: the connection is fine, unless it is the wrong node.
            Err(CallError::Remote(e)) => !matches!(e, RpcError::WrongNode { .. }),
            Err(_) => false,
        };
        if keep {
            let mut pool = self.leader_pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < LEADER_POOL {
                pool.push(client);
            }
        }
        match result {
            Ok(r) => Ok(r),
            Err(CallError::Remote(e)) => Err(e),
            Err(e) => Err(RpcError::Unavailable(e.to_string())),
        }
    }

    /// Executes a leader operation on this node, which believes it leads.
    pub(super) async fn execute(&self, member: &Member, op: LeaderOp, timeout: Duration) -> Result<RpcReply, RpcError> {
        match op {
            LeaderOp::Write(mut req) => {
                req.time_ms = clock::wall_ms();
                self.keep_readable(member, &mut req);
                Ok(RpcReply::Written(self.propose(member, req).await?))
            }
            LeaderOp::ReadIndex => {
                let read = member.raft.ensure_linearizable(ReadPolicy::ReadIndex).await.map_err(|e| {
                    match e.forward_to_leader() {
                        Some(f) => not_leader(f),
                        None => RpcError::Raft(e.to_string()),
                    }
                })?;
                Ok(RpcReply::ReadIndex(read.index()))
            }
            LeaderOp::Join(j) => self.register_joiner(member, j).await,
            LeaderOp::AddMember(a) => self.add_member(member, a, timeout).await,
            LeaderOp::RemoveNode { name, force } => self.remove_member(member, &name, force).await,
            LeaderOp::MovePrimary { to } => self.move_primary(member, to).await,
            LeaderOp::State => {
                let (last_applied, state) = {
                    let g = member.view.read();
                    (g.last_applied, g.state.clone())
                };
                // Encoded outside the lock: applying waits for readers.
                let state = herd_storage::sm::encode_state(&state).map_err(|e| RpcError::Refused(e.to_string()))?;
                Ok(RpcReply::State { last_applied, state })
            }
            LeaderOp::Figures(figures) => self.keep_figures(member, figures),
        }
    }

    /// Moves the primary role to the voter named `to` (another voter if `None`).
    async fn move_primary(&self, member: &Member, to: Option<String>) -> Result<RpcReply, RpcError> {
        let to_id = match to {
            None => None,
            Some(name) => {
                let id = member.view.read().state.nodes.get(&name).map(|n| n.id);
                let id = id.ok_or_else(|| RpcError::Refused(format!("no node named {name:?}")))?;
                let voters: Vec<NodeId> =
                    member.raft.metrics().borrow_watched().membership_config.voter_ids().collect();
                if !voters.contains(&id) {
                    return Err(RpcError::Refused(format!("{name} is not a voting coordinator: it cannot be primary")));
                }
                Some(id)
            }
        };
        let ext =
            self.extension.get().ok_or_else(|| RpcError::Refused("primary duties are not available here".into()))?;
        ext.move_primary(to_id).await.map_err(RpcError::Refused)?;
        Ok(RpcReply::Done)
    }
}
