//! [`LeaderLink`]: leader operations (writes, read indexes) for a node outside Raft. It asks a
//! coordinator its followed state names; one that does not lead answers `NotLeader` with the
//! leader's id (it never forwards a request that named it), and the link asks that one next.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_storage::model::{NodeId, Op, Reply, Request, Response};
use herd_storage::sm::StateView;
use tokio::time::Instant;

use super::session::coordinators;
use crate::network::{CallError, Limits, PeerClient};
use crate::node::NodeError;
use crate::transport::Connector;
use crate::wire::{LeaderOp, Rpc, RpcError, RpcReply};

/// Idle connections kept (one per call in flight; the first is usually the leader's).
const POOL: usize = 4;

/// Leader operations for the node `me` of a cluster, addressed by the coordinators `view` names.
pub struct LeaderLink {
    view: StateView,
    connector: Arc<dyn Connector>,
    cluster_id: String,
    me: NodeId,
    limits: Limits,
    /// The leader as last seen (the first to ask).
    leader: Mutex<Option<NodeId>>,
    pool: Mutex<Vec<PeerClient>>,
}

impl LeaderLink {
    pub fn new(view: StateView, connector: Arc<dyn Connector>, cluster_id: String, me: NodeId, limits: Limits) -> Self {
        LeaderLink { view, connector, cluster_id, me, limits, leader: Mutex::new(None), pool: Mutex::new(Vec::new()) }
    }

    /// The leader as the last call found it (`None`: not known, or it stopped answering).
    pub fn leader(&self) -> Option<NodeId> {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replicates `ops` as one request; the log index it was applied at and its result.
    pub async fn write(&self, ops: Vec<Op>, timeout: Duration) -> Result<(u64, Reply), NodeError> {
        let req = Request { id: crate::node::tokens::request_id(), time_ms: 0, ops };
        match self.call(LeaderOp::Write(req), timeout).await? {
            RpcReply::Written(Response { index, result }) => Ok((index, result?)),
            other => Err(NodeError::Refused(format!("unexpected write reply {other:?}"))),
        }
    }

    /// Waits until the followed view reflects every write acknowledged before the call (the
    /// leader's read index, then the view's apply); the index.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<u64, NodeError> {
        let deadline = Instant::now() + timeout;
        let index = match self.call(LeaderOp::ReadIndex, timeout).await? {
            RpcReply::ReadIndex(i) => i,
            other => return Err(NodeError::Refused(format!("unexpected read-index reply {other:?}"))),
        };
        let mut applied = self.view.subscribe();
        let reached = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index)).await;
        match reached {
            Ok(Ok(_)) => Ok(index),
            _ => Err(NodeError::Refused(format!("the followed state did not reach index {index} in time"))),
        }
    }

    /// The leader's whole applied state and where it stands in the log: for reads that need
    /// every node's figures, which this node's followed copy leaves out.
    pub async fn leader_state(
        &self,
        timeout: Duration,
    ) -> Result<(Option<herd_storage::types::LogId>, herd_storage::model::State), NodeError> {
        match self.call(LeaderOp::State, timeout).await? {
            RpcReply::State { last_applied, state } => {
                let state = herd_storage::sm::decode_snapshot_state(&state)
                    .map_err(|e| NodeError::Refused(format!("the leader's state does not decode: {e}")))?;
                Ok((last_applied, state))
            }
            other => Err(NodeError::Refused(format!("unexpected state reply {other:?}"))),
        }
    }

    /// Runs `op` at the leader within `timeout`: asks the leader last seen (else a coordinator),
    /// follows `NotLeader` to the one named, moves on from one that cannot be reached, with
    /// backoff when no leader is known.
    pub async fn call(&self, op: LeaderOp, timeout: Duration) -> Result<RpcReply, NodeError> {
        let deadline = Instant::now() + timeout;
        let (mut pause, mut turn, mut redirects) = (Duration::from_millis(20), 0usize, 0u32);
        loop {
            let all = coordinators(&self.view);
            let hint = *self.leader.lock().unwrap_or_else(|p| p.into_inner());
            let target =
                hint.and_then(|l| all.iter().find(|(id, _)| *id == l)).or_else(|| all.get(turn % all.len().max(1)));
            let why = match target.cloned() {
                None => "the followed state names no coordinator yet".to_string(),
                Some((id, addr)) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match self.ask(id, addr, op.clone(), remaining).await {
                        Ok(reply) => {
                            *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
                            return Ok(reply);
                        }
                        // Straight to the leader named; two that name each other (a leader
                        // change under way) get the pause below after a few rounds.
                        Err(CallError::Remote(RpcError::NotLeader { leader_id: Some(l), .. })) if l != id => {
                            *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
                            redirects += 1;
                            if redirects % 4 != 0 {
                                continue;
                            }
                            format!("node {id} names node {l} as the leader")
                        }
                        Err(CallError::Remote(e)) if !e.is_retryable() => return Err(e.into()),
                        Err(e) => {
                            *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            turn = turn.wrapping_add(1);
                            e.to_string()
                        }
                    }
                }
            };
            if Instant::now() + pause >= deadline {
                return Err(NodeError::NoLeader(timeout, why));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    }

    /// One call to coordinator `id`, on a pooled connection when one is idle.
    async fn ask(&self, id: NodeId, addr: String, op: LeaderOp, timeout: Duration) -> Result<RpcReply, CallError> {
        let pooled = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.iter().position(|c| c.target() == Some(id) && c.addr() == addr).map(|k| pool.swap_remove(k))
        };
        let mut client = pooled.unwrap_or_else(|| {
            PeerClient::new(self.connector.clone(), addr, Some(id), self.cluster_id.clone(), self.limits.clone())
                .from(Some(self.me))
        });
        let result = client.call(Rpc::Leader(op), timeout).await;
        // Kept when the peer answered, unless it is not the node asked for (an address reused).
        let keep = match &result {
            Ok(_) => true,
            Err(CallError::Remote(e)) => !matches!(e, RpcError::WrongNode { .. }),
            Err(_) => false,
        };
        if keep {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() >= POOL {
                pool.remove(0);
            }
            pool.push(client);
        }
        result
    }
}
