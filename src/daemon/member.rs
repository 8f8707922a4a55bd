//! The member duties of every node: publish its addresses and `run`, keepalives, heartbeat
//! targets from the replicated node records, MNFA notices and certificate renewal into the
//! cluster, systemd's status line, and `stop` on a service stop.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use herd_raft::node::NodeError;
use herd_storage::model::{
    ApplyError, Command, DaemonState, DomainState, FailedFence, NodeId, NodeRecord, NodeStats, Role,
};
use openraft::async_runtime::watch::WatchReceiver;
use tokio::sync::mpsc;

use super::Daemon;
use crate::heartbeat::agent::{Notice, Target};
use crate::service;
use crate::WRITE_TIMEOUT;

/// How long a member waits for its own record (or its own write) to be applied locally.
const OWN_RECORD_WAIT: Duration = Duration::from_secs(10);
/// A node renews its certificate when fewer days than this are left.
const RENEW_BEFORE_DAYS: u64 = 30;

impl Daemon {
    /// The VM side of the keepalive: what runs here and what is assigned here.
    fn vm_figures(&self, stats: &mut NodeStats) {
        let Some(local) = self.node.local() else { return };
        let g = local.view.read();
        let mine = || g.state.vms.values().filter(|v| v.node == self.config.name);
        let running = || mine().filter(|v| v.actual == herd_storage::model::ActualState::Running);
        stats.vms_running = self.vms_running.load(Ordering::Acquire);
        stats.mem_allocated_mib = running().map(|v| v.spec.memory_mib).sum();
        stats.mem_provisioned_mib = mine().map(|v| v.spec.memory_mib).sum();
        stats.vcpus_allocated = running().map(|v| v.spec.vcpus).sum();
        if let Some(r) = &self.reconciler {
            let mut unmanaged = r.unmanaged();
            unmanaged.retain(|d| !d.is_empty() && d.len() <= 256);
            unmanaged.truncate(herd_storage::model::MAX_UNMANAGED);
            stats.unmanaged_domains = unmanaged;
        }
    }

    /// Publishes this node's heartbeat addresses and marks it `run`, then writes a keepalive
    /// every interval, forever. Also keeps the heartbeat agent's targets in step with the
    /// replicated node records.
    pub(super) async fn member_tasks(self: Arc<Self>) {
        let member = loop {
            self.progress.mark();
            if let Some(l) = self.node.local() {
                break l;
            }
            // Waiting for init/join is healthy: wake up now and then to say so.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.member_started.notified()).await;
        };
        self.agent.set_key(self.node.pki().and_then(|p| p.heartbeat_key()));
        self.agent.set_identity(member.id, &member.cluster_id);
        self.await_own_record(&member).await;
        self.tasks.spawn(self.clone().follow_targets(member.clone()));
        if self.node.session().is_some() {
            self.tasks.spawn(self.clone().follow_own_keepalive(member.clone()));
        }
        let interval = Duration::from_millis(self.config.keepalive.interval_ms);
        let addrs: BTreeMap<String, String> =
            self.agent.addrs().iter().map(|(n, a)| (n.clone(), a.to_string())).collect();
        // Reconcile before reporting `run`: domains already running are adopted, not restarted
        // (no starts yet: this node has not shown quorum contact).
        if let Some(r) = &self.reconciler {
            let looper = Arc::new(crate::reconcile::Looper {
                node: self.node.clone(),
                reconciler: r.clone(),
                standing: self.standing.clone(),
                vms_running: self.vms_running.clone(),
                interval: Duration::from_millis(self.config.hypervisor.reconcile_interval_ms),
                name: self.config.name.clone(),
                contact_asked: std::sync::Mutex::new(None),
            });
            looper.once().await;
            self.tasks.spawn(looper.run());
        }
        // Every node carries out its own flush and ready (one without a hypervisor has no VMs to
        // move, but still goes `flushed` → `ready`: a fenced coordinator made ready must too).
        let flush = crate::flush::Settings {
            name: self.config.name.clone(),
            parallel: self.config.hypervisor.parallel_migrations,
            migration_timeout: Duration::from_millis(self.config.hypervisor.migration_timeout_ms),
        };
        self.tasks.spawn(crate::flush::follow(self.node.clone(), flush));
        // `init` → `run` once this node can get a write of its own committed; the heartbeat
        // addresses go in the same atomic request.
        loop {
            let addrs = addrs.clone();
            // The BMC password goes into the log sealed to the coordinators: every node stores
            // the log, only coordinators fence.
            let policy = self.fencing.clone().map(|mut p| {
                if let Some(sealed) = self.node.pki().and_then(|k| k.seal(&p.password)) {
                    p.password = sealed;
                }
                p
            });
            let run = |name: String, node_id| {
                vec![
                    Command::SetHeartbeatAddrs { name: name.clone(), addrs, node_id },
                    Command::SetFencePolicy { name: name.clone(), policy, node_id },
                    Command::SetDaemonState { name, state: DaemonState::Run, return_by_ms: None, node_id },
                ]
            };
            self.progress.mark();
            match self.own_write(run, WRITE_TIMEOUT).await {
                Ok(()) => {
                    tracing::info!("daemon_state run");
                    self.after_run(&member).await;
                    break;
                }
                Err(NodeError::Removed) => return,
                Err(e) => {
                    tracing::warn!("cannot record daemon_state run yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.keepalives(interval).await;
    }

    /// A keepalive every interval, with this node's figures, until it is removed or refused.
    async fn keepalives(&self, interval: Duration) {
        let mut last = NodeStats::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.progress.mark();
            if self.node.check_log_held().await || self.node.refused().is_some() {
                // Refused: its log went backwards (said at ERROR, shown in status). Silent, it
                // is fenced and its VMs recovered elsewhere rather than run on unmanaged.
                self.agent.fall_silent();
                return;
            }
            last = self.host_stats.collect(&last, interval / 4).await;
            let mut stats = last.clone();
            self.vm_figures(&mut stats);
            if let Some(c) = self.node.session() {
                // A client's keepalive: its figures ride on its session's polls, and the
                // coordinator that hears it writes them (`clients.rs`). Once its guard armed
                // the watchdog it self-fences on its session's acknowledgements too — on them
                // alone once its record says so (`fence/selffence.rs`) — and says so.
                c.report(stats.with_session_guard(self.standing.session_guard()));
                continue;
            }
            match self.own_write(|name, node_id| vec![Command::Keepalive { name, stats, node_id }], interval).await {
                Ok(()) => {}
                Err(NodeError::Removed) => return,
                Err(e) => tracing::warn!("keepalive not committed: {e}"),
            }
        }
    }

    /// Waits (bounded) until this node's applied state holds its own record under its id: its
    /// first own write must not be ordered before the entry that created the record (an
    /// `init-cluster` or a join still being applied).
    async fn await_own_record(&self, member: &herd_raft::Local) {
        let deadline = tokio::time::Instant::now() + OWN_RECORD_WAIT;
        let mut applied = member.view.subscribe();
        loop {
            self.progress.mark();
            let mine = member.view.read().state.nodes.get(&self.config.name).is_some_and(|n| n.id == member.id);
            if mine {
                return;
            }
            let step = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            match tokio::time::timeout_at(step, applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(
                        node_id = member.id,
                        "no record of this node in its applied state after {OWN_RECORD_WAIT:?}: writing anyway"
                    );
                    return;
                }
                Err(_) => {}
            }
        }
    }

    /// Waits (bounded) until this node's view has applied log `index`.
    async fn await_applied(&self, member: &herd_raft::Local, index: u64) {
        let deadline = tokio::time::Instant::now() + OWN_RECORD_WAIT;
        let mut applied = member.view.subscribe();
        while member.view.read().last_applied.map_or(0, |l| l.index) < index {
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// Feeds the heartbeat agent the nodes to pulse, from the replicated records: a local watch
    /// on this node's applied state, never a poll of the store.
    async fn follow_targets(self: Arc<Self>, member: herd_raft::Local) {
        let mut applied = member.view.subscribe();
        // What the targets were made from: every applied change is looked at (a keepalive of
        // one of 1000 hypervisors among them), and comparing the records' fields costs no
        // allocation, where making 1000 targets (names, parsed addresses) on every change was
        // a coordinator's largest cost of its own at 500 clients.
        type Source = (NodeId, String, Role, BTreeMap<String, String>);
        let mut current: Vec<Source> = Vec::new();
        let mut current_sources = std::collections::BTreeSet::new();
        // A hypervisor pulses nobody and answers only coordinators: it needs their records
        // alone (with 1000 hypervisors, all of them on every change would cost it more than
        // its heartbeat).
        let coordinators_only = self.config.role != Role::Coordinator;
        let wanted = |n: &&NodeRecord| {
            (!coordinators_only || n.role == Role::Coordinator)
                // A fenced node is not pulsed until it is made ready again: it would keep
                // MNFA's count of bad hosts up for as long as it stays off.
                && n.daemon_state != DaemonState::Fenced
        };
        loop {
            let targets: Option<Vec<Target>> = {
                let g = member.view.read();
                let nodes = g.state.nodes.values().filter(wanted);
                let same = nodes
                    .clone()
                    .map(|n| (n.id, n.name.as_str(), n.role, &n.heartbeat))
                    .eq(current.iter().map(|(id, name, role, hb)| (*id, name.as_str(), *role, hb)));
                (!same).then(|| {
                    current = nodes.clone().map(|n| (n.id, n.name.clone(), n.role, n.heartbeat.clone())).collect();
                    nodes.map(Target::of).collect()
                })
            };
            if let Some(targets) = targets {
                self.agent.set_targets(targets);
            }
            // Fenced coordinators are not watched, but their views still count: one that runs
            // again sees the network as well as any other (found by the simulation, seed 2144:
            // a fenced-and-rebooted coordinator still heard a host the others had lost, and
            // that host was fenced without its view).
            let sources: std::collections::BTreeSet<herd_storage::model::NodeId> = {
                let g = member.view.read();
                g.state
                    .nodes
                    .values()
                    .filter(|n| {
                        n.daemon_state == DaemonState::Fenced && n.role == herd_storage::model::Role::Coordinator
                    })
                    .map(|n| n.id)
                    .collect()
            };
            if sources != current_sources {
                self.agent.set_view_sources(sources.clone());
                current_sources = sources;
            }
            if applied.changed().await.is_err() || self.node.is_removed() {
                return;
            }
        }
    }

    /// Once `run` is recorded: a node that comes back fenced says so (and readies itself with
    /// `auto_ready`); the self-fence guard starts when the policy asks for it.
    async fn after_run(self: &Arc<Self>, member: &herd_raft::Local) {
        // Judged on this node's own applied record, once its view includes the `run` just
        // committed (a fenced node that boots learns of its fence only by catching up).
        self.await_applied(member, self.standing.last_commit_index()).await;
        let fenced = member
            .view
            .read()
            .state
            .nodes
            .get(&self.config.name)
            .is_some_and(|n| n.daemon_state == DaemonState::Fenced);
        if fenced {
            let auto = self.fencing.as_ref().is_some_and(|p| p.auto_ready);
            if auto {
                let unflush =
                    |name, node_id| vec![Command::SetDomainState { name, state: DomainState::Unflush, node_id }];
                match self.own_write(unflush, WRITE_TIMEOUT).await {
                    Ok(()) => tracing::warn!("this node was fenced; auto_ready: made ready again"),
                    Err(e) => tracing::warn!("this node was fenced; auto_ready failed: {e}"),
                }
            } else {
                tracing::warn!("this node was fenced: it stays fenced/flushed until `herd node ready`");
            }
        }
        if let (Some(p), Some(f)) = (&self.fencing, &self.config.fencing) {
            if p.failed_fence == FailedFence::RecoverAfterSelfFence {
                let hypervisor = self.reconciler.as_ref().map(|r| r.hypervisor.clone());
                let guard = crate::fence::selffence::Guard {
                    standing: self.standing.clone(),
                    node: self.node.clone(),
                    hypervisor,
                    device: f.watchdog.clone(),
                    watchdogs: self.watchdogs.clone(),
                    after_ms: p.self_fence_after_ms,
                };
                self.tasks.spawn(guard.run());
            }
        }
        let self_fences = self.fencing.as_ref().is_some_and(|p| p.failed_fence == FailedFence::RecoverAfterSelfFence)
            && self.config.fencing.is_some();
        self.standing.set_ran(self_fences);
    }

    /// One line for systemd's STATUS=.
    pub(super) fn service_status(&self) -> String {
        if let (None, Some(c)) = (self.node.member(), self.node.session()) {
            let st = c.status();
            let name_of = |id| c.view.read().state.node_by_id(id).map(|n| n.name.clone());
            return match (self.node.quorum(), st.coordinator.and_then(|(id, _)| name_of(id))) {
                (true, Some(co)) => format!("client {}, following {co}", c.id),
                _ => format!("client {}, looking for a coordinator", c.id),
            };
        }
        match self.node.member() {
            None if self.node.is_removed() => "removed from the cluster: wipe data_dir to join again".into(),
            None => "not a cluster member: run herd init-cluster or herd join-cluster".into(),
            Some(m) => {
                let leader = m.raft.metrics().borrow_watched().current_leader;
                let name_of = |id| m.view.read().state.node_by_id(id).map(|n| n.name.clone());
                match (self.node.quorum(), leader.and_then(name_of)) {
                    (true, Some(l)) => {
                        format!("member {}, leader {l}{}", m.id, if self.primary.holding() { ", primary" } else { "" })
                    }
                    _ => format!("member {}, waiting for quorum", m.id),
                }
            }
        }
    }

    /// Sends STATUS= whenever the one-line status changes.
    pub(super) async fn report_status(self: Arc<Self>) {
        let mut last = String::new();
        loop {
            let now = self.service_status();
            if now != last {
                service::status(&now);
                tracing::info!(status = %now, "service status");
                last = now;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Renews this node's certificate once fewer than [`RENEW_BEFORE_DAYS`] days are left
    /// (checked hourly; a failure is retried at the next check and logged).
    pub(super) async fn renew_certificates(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            let Some(info) = self.node.pki().and_then(|p| p.info()) else { continue };
            let left_ms = info.not_after_ms.saturating_sub(herd_raft::clock::wall_ms());
            if left_ms >= RENEW_BEFORE_DAYS * 86_400_000 || self.node.local().is_none() {
                continue;
            }
            match self.node.renew_certificate(WRITE_TIMEOUT).await {
                Ok(i) => tracing::info!(expires_ms = i.not_after_ms, "certificate renewed before expiry"),
                Err(e) => tracing::warn!(days_left = left_ms / 86_400_000, "certificate renewal failed: {e}"),
            }
        }
    }

    /// Writes this coordinator's MNFA transitions into the cluster's event log.
    pub(super) async fn record_notices(self: Arc<Self>, mut notices: mpsc::Receiver<Notice>) {
        while let Some(n) = notices.recv().await {
            let cmd = Command::RecordEvent {
                kind: n.kind.to_string(),
                node: Some(self.config.name.clone()),
                message: n.message,
            };
            if let Err(e) = self.node.write(vec![cmd.into()], WRITE_TIMEOUT).await {
                tracing::warn!("could not record a heartbeat event: {e}");
            }
        }
    }

    /// Writes a command about this node itself, naming its id. If the cluster no longer has a
    /// record of this node under this id, it was removed while this daemon was away: leave.
    pub(super) async fn own_write(
        &self,
        cmds: impl FnOnce(String, Option<u64>) -> Vec<Command>,
        timeout: Duration,
    ) -> Result<(), NodeError> {
        let member =
            self.node.local().ok_or(if self.node.is_removed() { NodeError::Removed } else { NodeError::NotMember })?;
        let ops = cmds(self.config.name.clone(), Some(member.id)).into_iter().map(Into::into).collect();
        match self.node.write_indexed(ops, timeout).await {
            Ok((index, _)) => {
                self.standing.committed(index);
                Ok(())
            }
            Err(NodeError::Apply(ApplyError::NoSuchNode(n))) => {
                // Removed is concluded only from a committed removal of this id (a tombstone),
                // never from a missing record: a write ordered before the entry that creates
                // the record (init-cluster, a join) is refused the same way.
                if self.tombstoned(&member).await {
                    tracing::warn!(
                        node_id = member.id,
                        "this node was removed from the cluster (its id is tombstoned)"
                    );
                    self.node.leave().await?;
                    return Err(NodeError::Removed);
                }
                tracing::warn!(
                    node_id = member.id,
                    "the cluster has no record of this node yet, and no removal of it: still a member, retrying"
                );
                Err(NodeError::Apply(ApplyError::NoSuchNode(n)))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this node's id is tombstoned in a linearizable view of the cluster (a read
    /// barrier first: the local view may not have applied the removal yet). An unanswered
    /// barrier concludes nothing.
    async fn tombstoned(&self, member: &herd_raft::Local) -> bool {
        if let Err(e) = self.node.read_barrier(WRITE_TIMEOUT).await {
            tracing::warn!("cannot tell whether this node was removed: {e}");
            return false;
        }
        member.view.read().state.was_removed(member.id)
    }

    /// Records `daemon_state = stop` with a `return_by` deadline (a service stop, not a host
    /// shutdown: VMs keep running and the node must not be fenced before the deadline).
    pub(super) async fn record_stop(&self) {
        if self.node.local().is_none() {
            return;
        }
        let return_by = herd_raft::clock::wall_ms() + self.config.lifecycle.return_by_ms;
        let stop = |name, node_id| {
            vec![Command::SetDaemonState { name, state: DaemonState::Stop, return_by_ms: Some(return_by), node_id }]
        };
        match self.own_write(stop, Duration::from_secs(3)).await {
            Ok(_) => tracing::info!(return_by_ms = return_by, "daemon_state stop recorded"),
            Err(e) => tracing::warn!("could not record daemon_state stop: {e}"),
        }
    }
}
