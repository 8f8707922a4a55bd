//! Keepalives of clients outside Raft (issue 22): a client's statistics ride on its session's
//! polls and it writes no keepalive of its own; every coordinator writes, each keepalive
//! interval, the keepalives of the clients whose sessions it heard in that interval, in one
//! request (up to [`MAX_KEEPALIVE_OPS`]; halved on a refusal until the refused one is alone).
//! A client takes each keepalive of its own that it sees committed
//! in its followed state as its quorum contact, aged from the leader's stamp.
//!
//! ```text
//!  client ──poll (stats)──▶ coordinator: heard_follower ─every interval─▶ Keepalive × n ─▶ leader
//!    ▲                                                                            │ committed
//!    └── its followed state: own last_keepalive_ms moved ─▶ Standing::committed_at ◀┘
//! ```

use std::sync::Arc;
use std::time::Duration;

use herd_raft::node::NodeError;
use herd_storage::model::{Command, NodeStats, Op, Role, MAX_KEEPALIVE_OPS, MAX_UNMANAGED};

use super::Daemon;

impl Daemon {
    /// On a coordinator: writes the keepalives of the clients it heard, every interval.
    pub(super) async fn client_keepalives(self: Arc<Self>) {
        let interval = Duration::from_millis(self.config.keepalive.interval_ms);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(member) = self.node.member() else { continue };
            let reports = self.node.client_reports(interval);
            if reports.is_empty() {
                continue;
            }
            let ops: Vec<Op> = {
                let g = member.view.read();
                reports
                    .into_iter()
                    .filter_map(|(id, stats)| {
                        let n = g.state.node_by_id(id).filter(|n| n.role == Role::Hypervisor)?;
                        let stats = sanitized(stats);
                        Some(Command::Keepalive { name: n.name.clone(), stats, node_id: Some(id) }.into())
                    })
                    .collect()
            };
            for chunk in ops.chunks(MAX_KEEPALIVE_OPS) {
                self.write_keepalives(chunk, interval).await;
            }
        }
    }

    /// One request of keepalives. Refused as a whole (a client removed meanwhile), it is split
    /// in halves and each half written again, so one refused keepalive costs a few more
    /// requests rather than one per client.
    async fn write_keepalives(&self, ops: &[Op], timeout: Duration) {
        let mut pending = vec![ops];
        while let Some(ops) = pending.pop() {
            match self.node.write(ops.to_vec(), timeout).await {
                Ok(_) => {}
                Err(NodeError::Apply(e)) if ops.len() > 1 => {
                    tracing::debug!(clients = ops.len(), "client keepalives refused together ({e}): in halves");
                    let (a, b) = ops.split_at(ops.len() / 2);
                    pending.extend([b, a]);
                }
                Err(NodeError::Apply(e)) => tracing::debug!("a client keepalive refused: {e}"),
                Err(e) => tracing::warn!(clients = ops.len(), "client keepalives not committed: {e}"),
            }
        }
    }

    /// On a client: its standing from its own keepalives committed (seen in its followed
    /// state), and its leaving once that state shows its id tombstoned.
    pub(super) async fn follow_own_keepalive(self: Arc<Self>, me: herd_raft::Local) {
        let mut applied = me.view.subscribe();
        let mut last = None;
        loop {
            let (index, stamp, removed) = {
                let g = me.view.read();
                let own = g.state.nodes.get(&self.config.name).filter(|n| n.id == me.id);
                let index = g.last_applied.as_ref().map_or(0, |l| l.index);
                (index, own.and_then(|n| n.last_keepalive_ms), g.state.was_removed(me.id))
            };
            if removed {
                tracing::warn!(node_id = me.id, "this node was removed from the cluster (its id is tombstoned)");
                if let Err(e) = self.node.leave().await {
                    tracing::error!("leaving the cluster: {e}");
                }
                return;
            }
            if let Some(stamp) = stamp.filter(|s| Some(*s) != last) {
                last = Some(stamp);
                self.standing.committed_at(index, herd_raft::clock::wall_ms().saturating_sub(stamp));
            }
            if applied.changed().await.is_err() || self.node.is_removed() {
                return;
            }
        }
    }
}

/// `stats` as the model accepts them: at most [`MAX_UNMANAGED`] unmanaged domains, each of 1
/// to 256 bytes (one client's bad figures must not get the whole request refused).
fn sanitized(mut stats: NodeStats) -> NodeStats {
    stats.unmanaged_domains.retain(|d| !d.is_empty() && d.len() <= 256);
    stats.unmanaged_domains.truncate(MAX_UNMANAGED);
    stats
}
