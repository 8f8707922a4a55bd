//! The node's reconcile loop: a round on every applied change (a local watch), every landed
//! live migration and every interval; the round's reports go through Raft.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;

use herd_storage::model::Command;

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
    /// This node's name (its contact write names it).
    pub name: String,
    /// When a client last asked for contact (at most one ask a second).
    pub contact_asked: std::sync::Mutex<Option<tokio::time::Instant>>,
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
                if out.held_back > 0 {
                    self.ask_contact(&member, applied).await;
                }
                Some(out.running)
            }
            Err(e) => {
                tracing::warn!("reconcile: {e}");
                None
            }
        }
    }

    /// A client with starts to make but no recent write of its own committed (its coordinators
    /// write its keepalive only when its figures change: `daemon::clients`) writes its
    /// keepalive again — the figures of record, newly stamped — and starts once its view has
    /// applied it (the next round, on that change). A write, not a read barrier: the log orders
    /// it against a fence or self-fence record of this node, so its view then shows that record
    /// or the record is refused (`model::self_fence`). At most one ask a second, none while
    /// the last one waits to be applied, and only once this node's `run` committed and (if it
    /// self-fences) its guard armed (`Standing::may_write_contact`).
    async fn ask_contact(&self, member: &herd_raft::Local, applied: u64) {
        let s = &self.standing;
        if self.node.session().is_none()
            || s.quorum_contact(applied)
            || s.awaiting_apply(applied)
            || !s.may_write_contact()
        {
            return;
        }
        let now = tokio::time::Instant::now();
        {
            let mut asked = self.contact_asked.lock().unwrap_or_else(|p| p.into_inner());
            if asked.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
                return;
            }
            *asked = Some(now);
        }
        let stats = {
            let g = member.view.read();
            let Some(own) = g.state.nodes.get(&self.name).filter(|n| n.id == member.id) else { return };
            // Its own word on the flag: the record's may be a previous incarnation's.
            own.stats.clone().with_session_guard(s.session_guard())
        };
        tracing::info!("no recent quorum contact: writing this node's keepalive to start VMs");
        let cmd = Command::Keepalive { name: self.name.clone(), stats, node_id: Some(member.id) };
        match self.node.write_indexed(vec![cmd.into()], WRITE_TIMEOUT).await {
            Ok((index, _)) => self.standing.committed_at(index, herd_raft::clock::ms(now.elapsed())),
            Err(e) => tracing::warn!("no quorum contact to start VMs: this node's keepalive not committed: {e}"),
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
