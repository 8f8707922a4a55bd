//! The primary manager: every coordinator runs it; the leader takes the duties.
//!
//! ```text
//!  every 20 ms: observe Raft ─▶ gate.step ─▶ TakeOver: Takeover in the log ─▶ notify survivors
//!                                                   (acknowledged, with a deadline) ─▶ addresses
//!                                                   ─▶ hooks start ─▶ router_state primary
//!                                        └▶ Drop: addresses off first ─▶ hooks stop ─▶
//!                                                   relinquish/secondary (best effort)
//! ```
//! Between the steps of a takeover the gate is asked again: a lease lost halfway stops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use herd_raft::node::{ClusterNode, Extension, NodeError};
use herd_storage::model::{Command, NodeId, Role, RouterState};
use herd_storage::sled_store::SledLogStore;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use tokio::sync::watch;
use tokio::time::Instant;

use super::duties::Duties;
use super::gate::{Decision, Gate, GateParams, Observation};

const TICK: Duration = Duration::from_millis(20);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Manager settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub role: Role,
    pub lease_ms: u64,
    pub takeover_delay_ms: u64,
    pub notify_timeout: Duration,
    pub status_interval: Duration,
}

pub struct Manager {
    settings: Settings,
    node: Arc<ClusterNode<SledLogStore>>,
    duties: Duties,
    gate: Mutex<Gate>,
    started: Instant,
    /// Whether this node holds the duties now.
    holding: AtomicBool,
    /// Serialises acquiring and releasing.
    act: tokio::sync::Mutex<()>,
}

impl Manager {
    pub fn new(settings: Settings, node: Arc<ClusterNode<SledLogStore>>, duties: Duties) -> Arc<Manager> {
        let gate = Gate::new(GateParams::new(settings.lease_ms, settings.takeover_delay_ms));
        Arc::new(Manager {
            settings,
            node,
            duties,
            gate: Mutex::new(gate),
            started: Instant::now(),
            holding: AtomicBool::new(false),
            act: tokio::sync::Mutex::new(()),
        })
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    fn observe(&self) -> Observation {
        let now_ms = self.now_ms();
        let Some(member) = self.node.member() else {
            return Observation { now_ms, is_leader: false, quorum_ack_age_ms: None };
        };
        let metrics = member.raft.metrics();
        let m = metrics.borrow_watched();
        let is_leader = m.state == ServerState::Leader && m.current_leader == Some(member.id);
        let alone = m.membership_config.voter_ids().eq([member.id]);
        let age = if alone {
            Some(0)
        } else {
            m.last_quorum_acked
                .as_ref()
                .map(|t| u64::try_from(openraft::Instant::elapsed(&**t).as_millis()).unwrap_or(u64::MAX))
        };
        Observation { now_ms, is_leader, quorum_ack_age_ms: age }
    }

    /// Asks the gate between takeover steps; `false` means stop and drop the duties.
    fn still_allowed(&self) -> bool {
        let o = self.observe();
        self.gate().confirm(o)
    }

    /// The loop; coordinators only. Drops addresses left over from an earlier life first.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.settings.role != Role::Coordinator {
            return;
        }
        for e in self.duties.remove_ips().await {
            tracing::warn!("removing leftover floating addresses: {e}");
        }
        let mut status_at = Instant::now() + self.settings.status_interval;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(TICK) => {}
            }
            let o = self.observe();
            let decision = self.gate().step(o);
            match decision {
                Decision::TakeOver => self.take_over().await,
                Decision::Drop(why) => self.release(why, false).await,
                Decision::Keep if Instant::now() >= status_at => {
                    status_at = Instant::now() + self.settings.status_interval;
                    for e in self.duties.run_hooks("status").await {
                        self.record("hook-status", e).await;
                    }
                }
                Decision::Keep | Decision::Idle => {}
            }
        }
        if self.holding() {
            self.release("the daemon is stopping", true).await;
        }
    }

    async fn own_write(&self, cmd: Command, timeout: Duration) -> Result<(), NodeError> {
        self.node.write(vec![cmd.into()], timeout).await.map(|_| ())
    }

    fn my_id(&self) -> Option<NodeId> {
        self.node.member().map(|m| m.id)
    }

    async fn record(&self, kind: &str, message: String) {
        let cmd = Command::RecordEvent { kind: kind.into(), node: Some(self.settings.name.clone()), message };
        if let Err(e) = self.own_write(cmd, WRITE_TIMEOUT).await {
            tracing::warn!("could not record a {kind} event: {e}");
        }
    }

    async fn take_over(&self) {
        let _act = self.act.lock().await;
        let name = self.settings.name.clone();
        let started = Instant::now();
        let previous = self.node.member().and_then(|m| {
            let g = m.view.read();
            g.state
                .nodes
                .values()
                .find(|n| n.router_state == RouterState::Primary && n.name != name)
                .map(|n| n.name.clone())
        });
        tracing::info!("leader with a valid lease: taking over the primary role");
        // The takeover is a decision: it goes through the log (a deposed leader cannot commit it).
        if let Err(e) =
            self.own_write(Command::Takeover { name: name.clone(), node_id: self.my_id() }, WRITE_TIMEOUT).await
        {
            tracing::warn!("takeover not committed: {e}");
            self.gate().released();
            return;
        }
        // Survivors are told first; the addresses move last.
        self.notify_survivors("primary-change", vec![previous.unwrap_or_else(|| "-".into()), name.clone()]).await;
        if !self.still_allowed() {
            return self.abort_takeover("the lease was lost while notifying").await;
        }
        self.holding.store(true, Ordering::Release);
        for e in self.duties.add_ips().await {
            self.record("floating-ip-failed", e).await;
        }
        if !self.still_allowed() {
            return self.abort_takeover("the lease was lost while adding addresses").await;
        }
        for e in self.duties.run_hooks("start").await {
            self.record("hook-failed", e).await;
        }
        if !self.still_allowed() {
            return self.abort_takeover("the lease was lost while starting hooks").await;
        }
        let primary = Command::SetRouterState { name, state: RouterState::Primary, node_id: self.my_id() };
        match self.own_write(primary, WRITE_TIMEOUT).await {
            Ok(()) => tracing::info!(took_ms = started.elapsed().as_millis() as u64, "primary: holding the duties"),
            Err(e) => tracing::warn!("router_state primary not recorded: {e}"),
        }
    }

    async fn abort_takeover(&self, why: &'static str) {
        self.gate().released();
        self.release_now(why).await;
    }

    /// Drops the duties: addresses first (what another node will take), then hooks.
    async fn release_now(&self, why: &str) {
        let held = self.holding.swap(false, Ordering::AcqRel);
        tracing::warn!("dropping the primary duties: {why}");
        for e in self.duties.remove_ips().await {
            tracing::error!("floating address not removed: {e}");
        }
        if held {
            for e in self.duties.run_hooks("stop").await {
                tracing::warn!("{e}");
            }
        }
    }

    /// Drops the duties and records the relinquish if this node can still write.
    async fn release(&self, why: &str, leaving: bool) {
        let _act = self.act.lock().await;
        self.release_now(why).await;
        let id = self.my_id();
        let name = self.settings.name.clone();
        let timeout = if leaving { Duration::from_millis(500) } else { WRITE_TIMEOUT };
        // Best effort: a deposed leader cannot commit; the next takeover sets us secondary anyway.
        let relinquish = Command::SetRouterState { name: name.clone(), state: RouterState::Relinquish, node_id: id };
        if self.own_write(relinquish, timeout).await.is_ok() {
            let secondary = Command::SetRouterState { name, state: RouterState::Secondary, node_id: id };
            let _ = self.own_write(secondary, timeout).await;
        }
    }

    /// Tells every other node and waits (with a deadline) for their acknowledgements; the
    /// missing ones are recorded, and the takeover goes on (the fence made it safe).
    async fn notify_survivors(&self, kind: &str, args: Vec<String>) {
        let Some(member) = self.node.member() else { return };
        // Every Raft member (a node registered but not yet added has nothing to be told).
        let members: Vec<NodeId> =
            member.raft.metrics().borrow_watched().membership_config.nodes().map(|(id, _)| *id).collect();
        let peers: Vec<(NodeId, String, String)> = {
            let g = member.view.read();
            g.state
                .nodes
                .values()
                .filter(|n| n.id != member.id && members.contains(&n.id))
                .map(|n| (n.id, n.name.clone(), n.cluster_addr.clone()))
                .collect()
        };
        let timeout = self.settings.notify_timeout;
        let calls = peers.iter().map(|(id, name, addr)| {
            let (kind, args) = (kind.to_string(), args.clone());
            async move { (name.clone(), self.node.notify(*id, addr, &kind, &args, timeout).await) }
        });
        let results = futures::future::join_all(calls).await;
        let missing: Vec<String> =
            results.into_iter().filter_map(|(name, r)| r.err().map(|e| format!("{name} ({e})"))).collect();
        if !missing.is_empty() {
            let message = format!("{kind}: not acknowledged within {timeout:?} by {}", missing.join(", "));
            tracing::warn!("{message}");
            self.record("notify-unacknowledged", message).await;
        }
    }

    /// Hands the role to `to` (or any other voter): relinquish first, then transfer leadership
    /// (openraft grants transfer votes even inside a valid lease, so the lease alone would not
    /// protect a hand-over).
    async fn hand_over(&self, to: Option<NodeId>) -> Result<(), String> {
        let member = self.node.member().ok_or("not a member")?;
        let voters: Vec<NodeId> = member.raft.metrics().borrow_watched().membership_config.voter_ids().collect();
        let target = match to {
            Some(t) => t,
            None => *voters.iter().find(|v| **v != member.id).ok_or("there is no other voter to hand the role to")?,
        };
        if target == member.id {
            return Ok(());
        }
        let suppress = self.now_ms() + 3 * self.settings.lease_ms + 1000;
        {
            let mut g = self.gate();
            g.released();
            g.suppress_until(suppress);
        }
        tracing::info!(to = target, "handing the primary role over");
        self.release("handing the primary role over", false).await;
        self.node.transfer_leader(target).await.map_err(|e| e.to_string())
    }
}

/// The manager answers the cluster protocol's extension points.
pub struct ManagerExtension(pub Arc<Manager>);

impl Extension for ManagerExtension {
    fn move_primary(&self, to: Option<NodeId>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.0.hand_over(to))
    }

    fn notify(&self, kind: String, args: Vec<String>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            tracing::info!("notified: {kind} {}", args.join(" "));
            self.0.duties.run_notify(&kind, &args).await
        })
    }
}
