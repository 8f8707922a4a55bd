//! The leader's duty over its followers' Raft health: what its appends found (see
//! `herd_raft::watch`) goes into the members' replicated records — so `node list` on every node
//! shows a member whose store cannot write or whose log went backwards — and a member whose log
//! went backwards is told to stop taking part under its id. It also records, every few
//! seconds, the committed index each follower holds (`RecordAcked`), so that a later leader
//! (and every voter) can still tell a log gone backwards.

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
/// The committed index each follower holds is recorded at most this often (`RecordAcked`), and
/// only when one advanced by more than the record itself (an idle cluster writes none).
const MARK_EVERY: Duration = Duration::from_secs(2);

/// Runs on every coordinator; acts while it leads.
pub async fn run(node: Arc<ClusterNode<LogStore>>, mut shutdown: watch::Receiver<bool>) {
    let mut told: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut marked: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        round(&node, &mut told).await;
        if marked.is_none_or(|t| t.elapsed() >= MARK_EVERY) && record_marks(&node).await {
            marked = Some(Instant::now());
        }
    }
}

/// While leading: what each follower acknowledged, up to the commit index, goes into the
/// replicated record (`State::acked`), so any later leader or voter can tell a follower whose
/// log went backwards (see `herd_raft::watch`). Returns whether it wrote.
async fn record_marks(node: &ClusterNode<LogStore>) -> bool {
    let Some(member) = node.member() else { return false };
    let committed = {
        let m = member.raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return false;
        }
        m.cluster_committed.map_or(0, |c| c.index)
    };
    let watch = node.replication_watch();
    let recorded = member.view.read().state.acked.clone();
    // A new boot's first mark, or one that moved by more than the record itself.
    let marks: BTreeMap<NodeId, (u64, u64)> = watch
        .marks(committed)
        .into_iter()
        .filter(|(id, (boot, m))| recorded.get(id).is_none_or(|h| h.boot != *boot || *m > h.index + 1))
        .collect();
    if marks.is_empty() {
        return false;
    }
    match node.write_local(vec![Command::RecordAcked { marks }.into()], WRITE_TIMEOUT).await {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("acknowledged-log marks not recorded: {e}");
            false
        }
    }
}

async fn round(node: &ClusterNode<LogStore>, told: &mut BTreeMap<NodeId, Instant>) {
    let Some(member) = node.member() else { return };
    let watch = node.replication_watch();
    // On every coordinator, leading or not: a new leader's first appends (when a restored
    // follower answers its search for a match) come before its first tick as leader.
    watch.set_floors(&member.view.read().state.acked);
    if member.raft.metrics().borrow_watched().state != ServerState::Leader {
        return;
    }
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
