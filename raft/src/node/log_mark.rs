//! The log mark at work (see [`herd_storage::mark`]): checked when Raft resumes — a log that
//! ends before it went backwards, and the node is refused before it can vote — and kept at the
//! applied index, once a second, while Raft runs.

use std::sync::Arc;
use std::time::Duration;

use herd_storage::identity::Identity;
use herd_storage::mark::{went_backwards, LogMark, MarkStore};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;

use super::{ClusterNode, Member, NodeError};

/// How often the mark follows the applied index (one small fsync when it moved).
const EVERY: Duration = Duration::from_secs(1);

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Keeps the log mark in `store` (set once, before the node resumes).
    pub fn set_mark_store(&self, store: Arc<dyn MarkStore>) {
        let _ = self.mark.set(store);
    }

    /// Before Raft resumes under `id`: refuses this node (and returns true) when its log ends
    /// before its mark — `data_dir` was restored from an earlier copy. An unreadable mark is
    /// an error: the node does not start rather than guess.
    pub(super) async fn log_behind_mark(&self, id: &Identity) -> Result<bool, NodeError> {
        let Some(store) = self.mark.get() else { return Ok(false) };
        let mark = store.load()?;
        let end = self.log.clone().get_log_state().await?.last_log_id.map(|l| l.index);
        let Some(index) = went_backwards(mark.as_ref(), &id.cluster_id, id.node_id, end) else { return Ok(false) };
        let why = format!(
            "log went backwards: its log mark ({}) says it applied entry {index}, but its log ends at entry {}",
            store.place(),
            end.unwrap_or(0)
        );
        self.record_refusal(id.node_id, &id.cluster_id, why).await;
        Ok(true)
    }

    /// Keeps the mark at `member`'s applied index until its Raft stops.
    pub(super) fn keep_mark(&self, member: &Member) {
        let Some(store) = self.mark.get().cloned() else { return };
        let (cluster_id, node_id) = (member.cluster_id.clone(), member.id);
        let metrics = member.raft.metrics();
        herd_storage::types::spawn(async move {
            let mut saved = store.load().ok().flatten().filter(|m| m.cluster_id == cluster_id && m.node_id == node_id);
            let mut warned: Option<tokio::time::Instant> = None;
            loop {
                tokio::time::sleep(EVERY).await;
                let (running, applied) = {
                    let m = metrics.borrow_watched();
                    (m.running_state.is_ok(), m.last_applied.map_or(0, |l| l.index))
                };
                if !running {
                    return; // Raft stopped
                }
                if saved.as_ref().is_some_and(|m| m.index >= applied) {
                    continue;
                }
                let mark = LogMark { cluster_id: cluster_id.clone(), node_id, index: applied };
                match store.save(&mark).await {
                    Ok(()) => saved = Some(mark),
                    Err(e) => {
                        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            warned = Some(tokio::time::Instant::now());
                            tracing::warn!("cannot write the log mark ({}): {e}", store.place());
                        }
                    }
                }
            }
        });
    }
}
