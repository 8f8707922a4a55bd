//! The node's reconcile loop: a round on every applied change (a local watch), every landed
//! live migration and every interval; the round's reports go through Raft.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;

use super::Reconciler;
use crate::standing::Standing;
use crate::WRITE_TIMEOUT;

/// One node's reconcile loop and what it needs.
pub struct Looper {
    pub node: Arc<ClusterNode<LogStore>>,
    pub reconciler: Arc<Reconciler>,
    /// Quorum contact (no starts without it) and the self-fence flag (nothing at all after it).
    pub standing: Arc<Standing>,
    /// How many of its VMs run here, as the last round saw (for the keepalive).
    pub vms_running: Arc<AtomicU32>,
    pub interval: Duration,
}

impl Looper {
    /// One reconcile round; its reports go through Raft. `None` when no round ran.
    pub async fn once(&self) -> Option<u32> {
        if self.standing.self_fenced() {
            return None;
        }
        let member = self.node.local()?;
        let (vms, meta, applied) = {
            let g = member.view.read();
            (g.state.vms.clone(), g.state.meta.clone(), g.last_applied.map_or(0, |l| l.index))
        };
        match self.reconciler.round(&vms, meta.as_ref(), self.standing.quorum_contact(applied)).await {
            Ok(out) => {
                if !out.commands.is_empty() {
                    let ops = out.commands.into_iter().map(Into::into).collect();
                    if let Err(e) = self.node.write(ops, WRITE_TIMEOUT).await {
                        tracing::warn!("VM reports not committed: {e}");
                    }
                }
                Some(out.running)
            }
            Err(e) => {
                tracing::warn!("reconcile: {e}");
                None
            }
        }
    }

    /// Reconciles on every applied change and every interval, until the node is removed.
    pub async fn run(self: Arc<Self>) {
        loop {
            let Some(member) = self.node.local() else {
                tokio::time::sleep(self.interval).await;
                continue;
            };
            let mut applied = member.view.subscribe();
            let running = self.once().await;
            self.vms_running.store(running.unwrap_or(0), Ordering::Release);
            let landing = self.reconciler.migrations.landing.clone();
            let _ = tokio::time::timeout(self.interval, async {
                tokio::select! {
                    _ = applied.changed() => {}
                    () = landing.notified() => {}
                }
            })
            .await;
            if self.node.is_removed() {
                return;
            }
        }
    }
}
