//! The primary manager: every coordinator runs it; the leader takes the duties.
//!
//! Two tasks:
//! ```text
//!  guard (every 20 ms, never waits on anything slow): observe Raft ─▶ gate.step
//!     TakeOver ─▶ wake the actor          Drop ─▶ addresses off at once, then wake the actor
//!     not holding but addresses up ─▶ take them off (reconcile: a failed or cancelled removal)
//!  actor: takeover sequence — Takeover proposed locally (never forwarded) ─▶ survivors notified
//!         (acknowledged, with a deadline) ─▶ addresses ─▶ hooks start ─▶ router_state primary;
//!         every slow step races the guard's drop signal and is abandoned (hook children killed)
//!         when the lease goes; after a drop: hooks stop, relinquish recorded when possible;
//!         `status` hooks while holding, and `router_state primary` recorded again if the
//!         record lost it (a write refused in passing is retried, never left standing).
//! ```
//! Addresses are added and removed under one lock, and added only while the gate holds: the
//! guard can always take them off within one `ip` command of losing the lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use herd_raft::node::{ClusterNode, Extension, NodeError};
use herd_storage::log_store::LogStore;
use herd_storage::model::{Command, DaemonState, NodeId, Role, RouterState};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::duties::Duties;
use super::gate::{self, Decision, Gate, GateParams, Observation};

const TICK: Duration = Duration::from_millis(20);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a takeover keeps trying to record `router_state primary`, and how often.
const RECORD_PRIMARY_FOR: Duration = Duration::from_secs(10);
const RECORD_RETRY: Duration = Duration::from_millis(100);

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

#[derive(Default)]
struct Pending {
    takeover: bool,
    dropped: Option<String>,
}

pub struct Manager {
    settings: Settings,
    node: Arc<ClusterNode<LogStore>>,
    duties: Duties,
    gate: Mutex<Gate>,
    started: Instant,
    /// The floating addresses are (believed) present on this node.
    ips_up: AtomicBool,
    /// The service hooks were started and not stopped.
    hooks_up: AtomicBool,
    /// Serialises adding and removing addresses.
    ips_lock: tokio::sync::Mutex<()>,
    /// Serialises the actor's sequences (takeover, release, hand-over).
    act: tokio::sync::Mutex<()>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// Bumped by every drop: slow steps race it.
    drops: watch::Sender<u64>,
}

impl Manager {
    pub fn new(settings: Settings, node: Arc<ClusterNode<LogStore>>, duties: Duties) -> Arc<Manager> {
        let gate = Gate::new(GateParams::new(settings.lease_ms, settings.takeover_delay_ms));
        Arc::new(Manager {
            settings,
            node,
            duties,
            gate: Mutex::new(gate),
            started: Instant::now(),
            ips_up: AtomicBool::new(false),
            hooks_up: AtomicBool::new(false),
            ips_lock: tokio::sync::Mutex::new(()),
            act: tokio::sync::Mutex::new(()),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            drops: watch::Sender::new(0),
        })
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        herd_raft::clock::ms_since(self.started)
    }

    /// Whether this node holds the duties now.
    pub fn holding(&self) -> bool {
        self.gate().holding()
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

    /// When each member last acknowledged this leader, for the log line of a lost lease (a
    /// slow follower, or all of them: the network or this node's sending).
    fn acks(&self) -> String {
        let Some(member) = self.node.member() else { return "not a member".into() };
        let metrics = member.raft.metrics();
        let m = metrics.borrow_watched();
        let age =
            |t: &openraft::metrics::SerdeInstant<_>| format!("{} ms ago", openraft::Instant::elapsed(&**t).as_millis());
        let quorum = m.last_quorum_acked.as_ref().map_or("never".into(), age);
        let each: Vec<String> = m
            .heartbeat
            .iter()
            .flatten()
            .filter(|(id, _)| **id != member.id)
            .map(|(id, t)| format!("{id}: {}", t.as_ref().map_or("never".into(), age)))
            .collect();
        format!("quorum acknowledged {quorum}; by member id {}", each.join(", "))
    }

    /// Starts the guard and the actor; coordinators only. Addresses left over from an earlier
    /// life go first.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.settings.role != Role::Coordinator {
            return;
        }
        self.ips_up.store(true, Ordering::Release);
        self.remove_ips("removing addresses left from an earlier run").await;
        let actor = herd_storage::types::spawn(self.clone().actor());
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(TICK) => {}
            }
            self.guard_tick().await;
        }
        // Stopping: off with the duties, whatever the lease says.
        self.drop_duties("the daemon is stopping").await;
        actor.abort();
        let _act = self.act.lock().await;
        self.finish_release("the daemon is stopping", Duration::from_millis(500)).await;
    }

    async fn guard_tick(&self) {
        let o = self.observe();
        let decision = self.gate().step(o);
        match decision {
            Decision::TakeOver => {
                self.pending().takeover = true;
                self.wake.notify_one();
            }
            Decision::Drop(why) if why == gate::LEASE_LOST => {
                self.drop_duties(&format!("{why} ({})", self.acks())).await;
            }
            Decision::Drop(why) => self.drop_duties(why).await,
            Decision::Keep => {}
            Decision::Idle => {
                if self.ips_up.load(Ordering::Acquire) {
                    self.remove_ips("not the primary, but addresses are up").await;
                }
            }
        }
    }

    /// Takes the addresses off now and leaves the rest (hooks, log) to the actor.
    async fn drop_duties(&self, why: &str) {
        self.gate().force_release();
        self.drops.send_modify(|n| *n += 1);
        tracing::warn!("dropping the primary duties: {why}");
        self.remove_ips(why).await;
        self.pending().dropped = Some(why.to_string());
        self.wake.notify_one();
    }

    async fn remove_ips(&self, why: &str) {
        let _ips = self.ips_lock.lock().await;
        let errors = self.duties.remove_ips().await;
        if errors.is_empty() {
            self.ips_up.store(false, Ordering::Release);
        } else {
            for e in errors {
                tracing::error!("floating address not removed ({why}): {e}");
            }
        }
    }

    /// Adds the addresses, only while the gate holds (checked under the address lock).
    async fn add_ips(&self) -> bool {
        let _ips = self.ips_lock.lock().await;
        if !self.gate().holding() {
            return false;
        }
        self.ips_up.store(true, Ordering::Release);
        for e in self.duties.add_ips().await {
            self.record("floating-ip-failed", e).await;
        }
        true
    }

    async fn actor(self: Arc<Self>) {
        let mut status_at = Instant::now() + self.settings.status_interval;
        loop {
            let _ = tokio::time::timeout_at(status_at, self.wake.notified()).await;
            let (takeover, dropped) = {
                let mut p = self.pending();
                (std::mem::take(&mut p.takeover), p.dropped.take())
            };
            if let Some(why) = dropped {
                let _act = self.act.lock().await;
                self.finish_release(&why, WRITE_TIMEOUT).await;
            }
            if takeover {
                self.take_over().await;
            }
            if Instant::now() >= status_at {
                status_at = Instant::now() + self.settings.status_interval;
                if self.gate().holding() && self.hooks_up.load(Ordering::Acquire) {
                    {
                        let _act = self.act.lock().await;
                        self.record_primary().await;
                    }
                    if let Some(errors) = self.unless_dropped(self.duties.run_hooks("status")).await {
                        for e in errors {
                            self.record("hook-status", e).await;
                        }
                    }
                }
            }
        }
    }

    /// Runs `fut` unless (or until) the duties are dropped; `None` if they were (the future is
    /// dropped, which kills any hook child it ran).
    async fn unless_dropped<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        let mut drops = self.drops.subscribe();
        let seen = *drops.borrow_and_update();
        if !self.gate().holding() {
            return None;
        }
        tokio::select! {
            biased;
            _ = drops.wait_for(|n| *n != seen) => None,
            r = fut => Some(r),
        }
    }

    /// A write about this node's own role: proposed here only, never forwarded (a deposed
    /// leader's takeover must fail, not be committed by the new leader on its behalf).
    async fn own_write(&self, cmd: Command, timeout: Duration) -> Result<(), NodeError> {
        self.node.write_local(vec![cmd.into()], timeout).await.map(|_| ())
    }

    fn my_id(&self) -> Option<NodeId> {
        self.node.member().map(|m| m.id)
    }

    async fn record(&self, kind: &str, message: String) {
        let cmd = Command::RecordEvent { kind: kind.into(), node: Some(self.settings.name.clone()), message };
        if let Err(e) = self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await {
            tracing::warn!("could not record a {kind} event: {e}");
        }
    }

    async fn take_over(&self) {
        let _act = self.act.lock().await;
        if !self.gate().holding() {
            return;
        }
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
        let takeover = self.own_write(Command::Takeover { name: name.clone(), node_id: self.my_id() }, WRITE_TIMEOUT);
        match self.unless_dropped(takeover).await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::warn!("takeover not committed: {e}");
                self.gate().force_release();
                return;
            }
            None => return,
        }
        // Survivors are told first; the addresses move last.
        let notify =
            self.notify_survivors("primary-change", vec![previous.unwrap_or_else(|| "-".into()), name.clone()]);
        if self.unless_dropped(notify).await.is_none() || !self.add_ips().await {
            return;
        }
        self.hooks_up.store(true, Ordering::Release);
        match self.unless_dropped(self.duties.run_hooks("start")).await {
            Some(errors) => {
                for e in errors {
                    self.record("hook-failed", e).await;
                }
            }
            None => return,
        }
        if self.record_primary().await {
            tracing::info!(took_ms = started.elapsed().as_millis() as u64, "primary: holding the duties");
        }
    }

    /// Whether the replicated record names this node primary.
    fn recorded_primary(&self) -> bool {
        self.node.member().is_some_and(|m| {
            let g = m.view.read();
            g.state.nodes.values().any(|n| n.name == self.settings.name && n.router_state == RouterState::Primary)
        })
    }

    /// Records `router_state primary` for this node, retrying while it holds the duties: a
    /// write refused in passing (a membership change under way) must not leave the record
    /// saying secondary for as long as this node holds the role. Whether it was recorded.
    async fn record_primary(&self) -> bool {
        let deadline = Instant::now() + RECORD_PRIMARY_FOR;
        loop {
            if self.recorded_primary() {
                return true;
            }
            let primary = Command::SetRouterState {
                name: self.settings.name.clone(),
                state: RouterState::Primary,
                node_id: self.my_id(),
            };
            match self.unless_dropped(self.own_write(primary, WRITE_TIMEOUT)).await {
                Some(Ok(())) => return true,
                Some(Err(e)) if Instant::now() >= deadline => {
                    tracing::warn!("router_state primary not recorded: {e}");
                    return false;
                }
                Some(Err(e)) => tracing::debug!("router_state primary not recorded yet: {e}"),
                None => return false,
            }
            if self.unless_dropped(tokio::time::sleep(RECORD_RETRY)).await.is_none() {
                return false;
            }
        }
    }

    /// After a drop: stop the hooks, record the relinquish if this node can still write.
    async fn finish_release(&self, why: &str, timeout: Duration) {
        if self.gate().holding() {
            return; // taken over again meanwhile
        }
        if self.hooks_up.swap(false, Ordering::AcqRel) {
            for e in self.duties.run_hooks("stop").await {
                tracing::warn!("{e}");
            }
        }
        // Best effort: a deposed leader cannot commit; the next takeover sets us secondary anyway.
        let id = self.my_id();
        let name = self.settings.name.clone();
        let relinquish = Command::SetRouterState { name: name.clone(), state: RouterState::Relinquish, node_id: id };
        if self.own_write(relinquish, timeout).await.is_ok() {
            let secondary = Command::SetRouterState { name, state: RouterState::Secondary, node_id: id };
            let _ = self.own_write(secondary, timeout).await;
            tracing::info!("relinquished the primary role ({why})");
        }
    }

    /// Tells every other member and waits (with a deadline) for their acknowledgements; the
    /// missing ones are recorded, and the takeover goes on (the fence made it safe).
    async fn notify_survivors(&self, kind: &str, args: Vec<String>) {
        let Some(member) = self.node.member() else { return };
        // Every Raft member, and every client outside Raft that runs (a learner registered but
        // not yet added has nothing to be told: it is not `run` yet).
        let members: Vec<NodeId> =
            member.raft.metrics().borrow_watched().membership_config.nodes().map(|(id, _)| *id).collect();
        let peers: Vec<(NodeId, String, String)> = {
            let g = member.view.read();
            g.state
                .nodes
                .values()
                .filter(|n| n.id != member.id && (members.contains(&n.id) || n.daemon_state == DaemonState::Run))
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
    /// protect a hand-over). Safe to cancel: the gate is released first and the guard takes off
    /// any address a cancelled removal left.
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
        self.gate().suppress_until(self.now_ms() + 3 * self.settings.lease_ms + 1000);
        tracing::info!(to = target, "handing the primary role over");
        self.drop_duties("handing the primary role over").await;
        {
            let _act = self.act.lock().await;
            self.finish_release("handing the primary role over", WRITE_TIMEOUT).await;
        }
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
            // A barrier: a node told that another node takes the role holds nothing once it
            // acknowledges.
            if kind == "primary-change" && args.get(1) != Some(&self.0.settings.name) && self.0.holding() {
                self.0.drop_duties("another node is taking over the primary role").await;
            }
            self.0.duties.run_notify(&kind, &args).await
        })
    }
}
