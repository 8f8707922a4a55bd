//! The leader's duty over its followers' Raft health: what its appends found (see
//! `herd_raft::watch`) goes into the members' replicated records — so `node list` on every node
//! shows a member whose store cannot write or whose log went backwards — and a member whose log
//! went backwards is told to stop taking part under its id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;
use herd_storage::model::{Command, NodeId};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use tokio::sync::watch;
use tokio::time::Instant;

const TICK: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// A refused node that did not hear it is told again this often.
const TELL_AGAIN: Duration = Duration::from_secs(10);

/// Runs on every coordinator; acts while it leads.
pub async fn run(node: Arc<ClusterNode<LogStore>>, mut shutdown: watch::Receiver<bool>) {
    let mut told: BTreeMap<NodeId, Instant> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        round(&node, &mut told).await;
    }
}

async fn round(node: &ClusterNode<LogStore>, told: &mut BTreeMap<NodeId, Instant>) {
    let Some(member) = node.member() else { return };
    if member.raft.metrics().borrow_watched().state != ServerState::Leader {
        return;
    }
    let watch = node.replication_watch();
    let problems = watch.problems();
    let records: Vec<(String, NodeId, String, Option<String>)> = {
        let g = member.view.read();
        g.state
            .nodes
            .values()
            .filter(|n| n.id != member.id)
            .map(|n| (n.name.clone(), n.id, n.cluster_addr.clone(), n.health.as_ref().map(|h| h.problem.clone())))
            .collect()
    };
    watch.retain(&records.iter().map(|r| r.1).collect());
    told.retain(|id, _| records.iter().any(|r| r.1 == *id));
    for (name, id, addr, recorded) in records {
        let found = problems.get(&id);
        let write = match (found, &recorded) {
            (Some(p), r) if r.as_ref() != Some(p) => Some(Some(p.clone())),
            (None, Some(_)) if watch.replicating(id) => Some(None),
            _ => None,
        };
        if let Some(problem) = write {
            match &problem {
                Some(p) => tracing::error!(node = %name, "member unhealthy: {p}"),
                None => tracing::info!(node = %name, "member replicates again"),
            }
            let cmd = Command::SetNodeHealth { name: name.clone(), problem };
            if let Err(e) = node.write_local(vec![cmd.into()], WRITE_TIMEOUT).await {
                tracing::warn!(node = %name, "member health not recorded: {e}");
            }
        }
        if let Some(why) = watch.reverted(id) {
            if told.get(&id).is_none_or(|t| t.elapsed() >= TELL_AGAIN) {
                told.insert(id, Instant::now());
                node.tell_log_reverted(id, &addr, &why).await;
            }
        }
    }
}
