//! Clients' figures as one aggregate per interval (issue 22, design doc slice 14). A coordinator
//! that does not lead sends the leader the keepalives of its clients that are worth a log
//! entry but not urgent (`LeaderOp::Figures`); the leader keeps them here, the latest per node,
//! and writes them with its own clients' in one request at its next keepalive interval — one
//! entry of statistics per interval for the whole cluster, not one per coordinator.
//!
//! ```text
//!  coordinator ──Figures(keepalives)──▶ leader: Pending (latest per node, bounded, aged)
//!                                          │ each interval: take ─▶ one request with its own
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use herd_storage::model::{Command, Op, MAX_KEEPALIVE_OPS};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use tokio::time::Instant;

use super::{ClusterNode, NodeError};
use crate::wire::{LeaderOp, RpcError, RpcReply};

/// Keepalives held for the next aggregate, at most (one per node: the cluster's clients).
pub const MAX_PENDING: usize = 65_536;

/// Keepalives other coordinators sent this node for its next aggregate, the latest per node,
/// and how many it sent and took (for operators: `status`'s `followers`).
#[derive(Default)]
pub struct Pending {
    held: BTreeMap<String, (Instant, Op)>,
    /// Keepalives this node sent a leader.
    pub sent: u64,
    /// Keepalives this node took from other coordinators.
    pub taken: u64,
}

impl Pending {
    /// Takes `ops` (each a client's keepalive naming its id) from another coordinator: the
    /// latest per node replaces an earlier one. Refuses anything else, more than
    /// [`MAX_KEEPALIVE_OPS`] at once, or more nodes than [`MAX_PENDING`] held.
    pub fn add(&mut self, ops: Vec<Op>, now: Instant) -> Result<(), RpcError> {
        if ops.len() > MAX_KEEPALIVE_OPS {
            return Err(RpcError::BadRequest(format!("at most {MAX_KEEPALIVE_OPS} keepalives at once")));
        }
        let mut named = Vec::with_capacity(ops.len());
        for op in ops {
            match &op.cmd {
                Command::Keepalive { name, node_id: Some(_), .. } if op.expect_revision.is_none() => {
                    named.push((name.clone(), op));
                }
                other => {
                    return Err(RpcError::BadRequest(format!(
                        "figures carry clients' keepalives (naming their id) only, not {other:?}"
                    )))
                }
            }
        }
        let new = named.iter().filter(|(name, _)| !self.held.contains_key(name)).count();
        if self.held.len() + new > MAX_PENDING {
            return Err(RpcError::Refused(format!("{MAX_PENDING} keepalives already held for the next aggregate")));
        }
        self.taken += named.len() as u64;
        self.held.extend(named.into_iter().map(|(name, op)| (name, (now, op))));
        Ok(())
    }

    /// Everything held, for this interval's aggregate; what waited longer than `max_age` is
    /// dropped (its coordinator sends figures that still matter again).
    pub fn take(&mut self, now: Instant, max_age: Duration) -> Vec<Op> {
        std::mem::take(&mut self.held)
            .into_values()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= max_age)
            .map(|(_, op)| op)
            .collect()
    }
}

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Whether this node is a member that believes it leads.
    pub fn leads(&self) -> bool {
        self.member().is_some_and(|m| m.raft.metrics().borrow_watched().current_leader == Some(m.id))
    }

    /// Sends the leader `ops` (clients' keepalives) for its next aggregate; if this node leads,
    /// holds them itself. A leader of a version before this answers `BadRequest`: the caller
    /// writes them itself then.
    pub async fn send_figures(&self, ops: Vec<Op>, timeout: Duration) -> Result<(), NodeError> {
        let n = ops.len() as u64;
        match self.leader_call(LeaderOp::Figures(ops), timeout).await? {
            RpcReply::Done => {
                self.figures.lock().unwrap_or_else(|p| p.into_inner()).sent += n;
                Ok(())
            }
            other => Err(NodeError::Refused(format!("unexpected figures reply {other:?}"))),
        }
    }

    /// The keepalives other coordinators sent this node, for this interval's aggregate (none
    /// older than `max_age`).
    pub fn take_figures(&self, max_age: Duration) -> Vec<Op> {
        self.figures.lock().unwrap_or_else(|p| p.into_inner()).take(Instant::now(), max_age)
    }

    /// Keepalives this node sent a leader, and took from other coordinators, since it started.
    pub fn figures_counts(&self) -> (u64, u64) {
        let f = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        (f.sent, f.taken)
    }

    /// On the leader: `ops` from another coordinator, held for the next aggregate.
    pub(super) fn hold_figures(&self, ops: Vec<Op>) -> Result<RpcReply, RpcError> {
        self.figures.lock().unwrap_or_else(|p| p.into_inner()).add(ops, Instant::now())?;
        Ok(RpcReply::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_storage::model::NodeStats;

    fn keepalive(name: &str, load: u64) -> Op {
        let stats = NodeStats { load_milli: load, ..NodeStats::default() };
        Command::Keepalive { name: name.into(), stats, node_id: Some(7) }.into()
    }

    fn load_of(op: &Op) -> u64 {
        match &op.cmd {
            Command::Keepalive { stats, .. } => stats.load_milli,
            _ => u64::MAX,
        }
    }

    #[test]
    fn the_latest_keepalive_per_node_is_held_until_taken() {
        let mut p = Pending::default();
        let t = Instant::now();
        p.add(vec![keepalive("h1", 1), keepalive("h2", 2)], t).expect("held");
        p.add(vec![keepalive("h1", 3)], t).expect("held");
        let taken = p.take(t, Duration::from_secs(1));
        assert_eq!(taken.iter().map(load_of).collect::<Vec<_>>(), vec![3, 2], "the latest of h1, then h2");
        assert_eq!(p.taken, 3);
        assert!(p.take(t, Duration::from_secs(1)).is_empty(), "taken once");
    }

    #[test]
    fn figures_held_too_long_are_dropped() {
        let mut p = Pending::default();
        let t = Instant::now();
        p.add(vec![keepalive("h1", 1)], t).expect("held");
        p.add(vec![keepalive("h2", 2)], t + Duration::from_secs(3)).expect("held");
        let taken = p.take(t + Duration::from_secs(4), Duration::from_secs(2));
        assert_eq!(taken.iter().map(load_of).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn anything_but_clients_keepalives_is_refused() {
        let mut p = Pending::default();
        let t = Instant::now();
        let no_id: Op = Command::Keepalive { name: "h1".into(), stats: NodeStats::default(), node_id: None }.into();
        let cas = Op { expect_revision: Some(3), ..keepalive("h1", 1) };
        let other: Op = Command::RemoveNode { name: "h1".into() }.into();
        for op in [no_id, cas, other] {
            assert!(matches!(p.add(vec![op.clone()], t), Err(RpcError::BadRequest(_))), "{op:?}");
        }
        let many = vec![keepalive("h1", 1); MAX_KEEPALIVE_OPS + 1];
        assert!(matches!(p.add(many, t), Err(RpcError::BadRequest(_))));
        assert_eq!((p.taken, p.take(t, Duration::from_secs(1)).len()), (0, 0), "nothing of a refused batch held");
    }

    #[test]
    fn at_most_max_pending_nodes_are_held() {
        let mut p = Pending::default();
        let t = Instant::now();
        for chunk in (0..MAX_PENDING).collect::<Vec<_>>().chunks(MAX_KEEPALIVE_OPS) {
            p.add(chunk.iter().map(|i| keepalive(&format!("h{i}"), 1)).collect(), t).expect("held");
        }
        assert!(matches!(p.add(vec![keepalive("one-more", 1)], t), Err(RpcError::Refused(_))));
        p.add(vec![keepalive("h0", 2)], t).expect("a node already held is replaced");
        assert_eq!(p.take(t, Duration::from_secs(1)).len(), MAX_PENDING);
    }
}
