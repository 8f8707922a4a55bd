//! Keepalives of clients outside Raft (issue 22): a client's statistics ride on its session's
//! polls and it writes no keepalive of its own. Every keepalive interval, each coordinator
//! looks at the clients whose sessions it heard; only keepalives worth a log entry are written
//! ([`worth_writing`]): liveness is not in the log (the heartbeat decides a node's death, the
//! sessions show who is heard), so a client's keepalive is written when its figures moved
//! enough to matter to placement, and at least every [`REFRESH_INTERVALS`] intervals — those go
//! with the cluster's **aggregate** (design doc slice 14): a coordinator that does not lead
//! relays every client's figures to the leader (`LeaderOp::Figures`, in memory), and the leader
//! writes those worth it, its own clients' and the relayed, in one request an interval (and
//! holds every client's current figures: `status` shows them). Urgent ones the coordinator that
//! heard the client writes itself, at once: a client that self-fences on its committed
//! keepalive (its guard, and any primary's keepalive rule, count on it) and one with a VM of
//! record to start (it needs quorum contact: a client of the previous version gets it only so).
//! A request holds up to [`MAX_KEEPALIVE_OPS`]; one refused is halved until the refused
//! keepalive is alone.
//! A client takes each keepalive of its own that it sees committed in its followed state as its
//! quorum contact, aged from the leader's stamp; one that must start VMs without it writes one
//! itself (`reconcile::Looper`).
//!
//! ```text
//!  client ──poll (stats)──▶ coordinator ─each interval─┬─ urgent: Keepalive × n ──────────────▶ leader
//!                                                      └─ Figures (all) ─▶ leader: kept; worth it? ─┘ one request
//!    ▲                                                                                 │ committed
//!    └── its followed state: own last_keepalive_ms moved ─▶ Standing::committed_at ◀───┘
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use herd_raft::node::NodeError;
use herd_raft::wire::ClientFigures;
use herd_storage::model::{Command, FailedFence, NodeRecord, NodeStats, Op, Role, State, MAX_KEEPALIVE_OPS};
use openraft::async_runtime::watch::WatchReceiver;
use tokio::time::Instant;

use super::Daemon;

impl Daemon {
    /// On a coordinator: every interval, writes the urgent keepalives of the clients it heard
    /// and relays all their figures to the leader; on the leader, writes those worth it of its
    /// own clients and of those relayed in one request — the cluster's aggregate.
    pub(super) async fn client_keepalives(self: Arc<Self>) {
        let (interval, mut ticker) = self.keepalive_ticker();
        // When this coordinator last wrote each client's keepalive (on its own clock); a new
        // leader starts afresh (while it did not lead, it wrote only when the leader did not).
        let (mut written, mut led) = (HashMap::new(), false);
        loop {
            ticker.tick().await;
            let Some(member) = self.node.member() else { continue };
            let reports = self.node.client_reports(interval);
            // What other coordinators relayed while this one led (two intervals old at most).
            let relayed = self.node.relayed_figures(interval.saturating_mul(2));
            let leads = self.node.leads();
            if leads && !led {
                written.clear();
            }
            led = leads;
            if reports.is_empty() && (relayed.is_empty() || !leads) {
                continue;
            }
            let (mut now, mut aggregate) = {
                let g = member.view.read();
                let (now, mut aggregate) = keepalives_worth_writing(&g.state, &reports, &mut written, interval, true);
                if leads {
                    // Urgent ones their own coordinator writes; a client heard here too, as here.
                    let own: BTreeSet<u64> = reports.iter().map(|c| c.id).collect();
                    let theirs: Vec<_> = relayed.into_iter().filter(|c| !own.contains(&c.id)).collect();
                    aggregate.extend(keepalives_worth_writing(&g.state, &theirs, &mut written, interval, false).1);
                }
                (now, aggregate)
            };
            if leads {
                now.append(&mut aggregate);
            }
            for chunk in now.chunks(MAX_KEEPALIVE_OPS) {
                self.write_keepalives(chunk, interval).await;
            }
            if !leads {
                if let Err(e) = self.node.relay_figures(reports, interval).await {
                    tracing::debug!(clients = aggregate.len(), "figures not taken by the leader ({e}): written here");
                    for chunk in aggregate.chunks(MAX_KEEPALIVE_OPS) {
                        self.write_keepalives(chunk, interval).await;
                    }
                }
            }
        }
    }

    /// On a coordinator: every keepalive interval, asks every other coordinator when it last
    /// heard each client's session and keeps the least (its own sessions included) — the
    /// clients' liveness, in memory (`status` shows it as `last_heard_age_ms`, the metrics as
    /// `herd_client_heard_age_seconds`).
    pub(super) async fn gather_clients_heard(self: Arc<Self>) {
        let (interval, mut ticker) = self.keepalive_ticker();
        loop {
            ticker.tick().await;
            let Some(member) = self.node.member() else { continue };
            let ids: Vec<u64> = {
                let raft_members = member.raft.metrics().borrow_watched().membership_config.clone();
                let g = member.view.read();
                let outside = |n: &&NodeRecord| raft_members.membership().get_node(&n.id).is_none();
                g.state.nodes.values().filter(|n| n.role == Role::Hypervisor).filter(outside).map(|n| n.id).collect()
            };
            self.node.gather_clients_heard(&ids, interval.min(HEARD_ASK_TIMEOUT)).await;
        }
    }

    /// The keepalive interval, and a ticker of it that never bursts to catch up.
    fn keepalive_ticker(&self) -> (Duration, tokio::time::Interval) {
        let interval = Duration::from_millis(self.config.keepalive.interval_ms);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (interval, ticker)
    }

    /// One request of keepalives. Refused as a whole (a client removed meanwhile), it is split
    /// in halves and each half written again, so one refused keepalive costs a few more
    /// requests rather than one per client.
    async fn write_keepalives(&self, ops: &[Op], timeout: Duration) {
        let mut pending = vec![ops];
        while let Some(ops) = pending.pop() {
            match self.node.write(ops.to_vec(), timeout).await {
                Ok(_) => self.node.count_keepalives_written(ops.len()),
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

/// How long gathering the clients' liveness waits for a coordinator.
const HEARD_ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// A coordinator writes a client's keepalive again at least every this many keepalive
/// intervals, its figures unchanged (so its statistics' age stays bounded for those who watch
/// it); counted on the coordinator's own clock.
pub const REFRESH_INTERVALS: u64 = 12;

/// Load (× 1000) and used memory moves below which a client's figures count as unchanged;
/// memory: the larger of this and 2 % of the host's.
const LOAD_STEP_MILLI: u64 = 500;
const MEM_STEP_MIB: u64 = 256;

/// Besides its figures, why a client's keepalive may be due.
#[derive(Clone, Copy, Debug, Default)]
pub struct Why {
    /// This coordinator wrote none for it within [`REFRESH_INTERVALS`] intervals.
    pub due: bool,
    /// A VM of record on it should run and does not (it needs quorum contact to start it: a
    /// client of the previous version gets it only from these keepalives).
    pub starting: bool,
}

/// Whether, and how soon, a client's report is worth a log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Worth {
    /// Its committed record will do.
    Nothing,
    /// This interval, written by the coordinator that heard it: it self-fences on its
    /// committed keepalive (its guard and any primary's keepalive rule count on it), or it has
    /// a VM to start (quorum contact).
    Now,
    /// Its figures moved enough to matter to placement, or its refresh is due: with the
    /// cluster's aggregate, the leader's next.
    WithAggregate,
}

/// Whether a client's `report` is worth a log entry over its committed `record`, and how soon:
/// every interval while it self-fences on its committed keepalive (unless its record says it
/// self-fences on its session alone, and its report still does) or has a VM to start; with the
/// aggregate when its figures moved enough to matter to placement or its refresh is due.
pub fn worth_writing(record: &NodeRecord, report: &NodeStats, why: Why) -> Worth {
    let self_fences = report.session_self_fence
        || record.fencing.as_ref().is_some_and(|p| p.failed_fence == FailedFence::RecoverAfterSelfFence);
    let on_session_alone = record.stats.session_only && report.session_only;
    if (self_fences && !on_session_alone) || why.starting {
        Worth::Now
    } else if why.due || moved(&record.stats, report) {
        Worth::WithAggregate
    } else {
        Worth::Nothing
    }
}

/// The keepalives worth writing of the clients `reports` name (hypervisors of record): those
/// due now (left out unless `urgent`: a relayed client's coordinator writes them), and those
/// for the aggregate — only from a poll after the record's last keepalive (relayed figures
/// are up to two intervals old), each against the record's revision. None from a poll before
/// the node's last fence. Each one counts as written for its refresh.
fn keepalives_worth_writing(
    state: &State,
    reports: &[ClientFigures],
    written: &mut HashMap<u64, Instant>,
    interval: Duration,
    urgent: bool,
) -> (Vec<Op>, Vec<Op>) {
    let refresh = interval.saturating_mul(u32::try_from(REFRESH_INTERVALS).unwrap_or(u32::MAX));
    let now = Instant::now();
    written.retain(|_, t| now.duration_since(*t) < refresh);
    let starting = nodes_starting_vms(state);
    let wall = herd_raft::clock::wall_ms();
    let hypervisors: HashMap<u64, &NodeRecord> =
        state.nodes.values().filter(|n| n.role == Role::Hypervisor).map(|n| (n.id, n)).collect();
    let (mut at_once, mut aggregate) = (Vec::new(), Vec::new());
    for ClientFigures { id, stats, age_ms } in reports {
        let Some(n) = hypervisors.get(id).copied() else { continue };
        let polled = wall.saturating_sub(*age_ms);
        let stats = stats.clone().within_limits();
        let why = Why { due: !written.contains_key(id), starting: starting.contains(n.name.as_str()) };
        let (to, op): (_, Op) = match worth_writing(n, &stats, why) {
            Worth::Now if urgent && !before_fence(n, polled) => {
                (&mut at_once, Command::Keepalive { name: n.name.clone(), stats, node_id: Some(*id) }.into())
            }
            Worth::Nothing | Worth::Now => continue,
            Worth::WithAggregate if before_fence(n, polled) || n.last_keepalive_ms.is_some_and(|k| polled <= k) => {
                continue
            }
            // Against the record as read: figures older than a write that lands meanwhile (its
            // coordinator's urgent one, say) are refused rather than put over it.
            Worth::WithAggregate => {
                let cmd = Command::Keepalive { name: n.name.clone(), stats, node_id: Some(*id) };
                (&mut aggregate, Op { cmd, expect_revision: Some(n.revision) })
            }
        };
        written.insert(*id, now);
        to.push(op);
    }
    (at_once, aggregate)
}

/// Whether figures from a poll at `polled` (wall ms) came before the node's last fence: written
/// after it, they would say a powered-off node is back (`herd node ready` takes it).
fn before_fence(n: &NodeRecord, polled: u64) -> bool {
    n.fence.fenced_ms.is_some_and(|f| polled <= f)
}

/// The nodes with a VM of record that should run there and does not run (yet).
fn nodes_starting_vms(state: &State) -> BTreeSet<&str> {
    use herd_storage::model::ActualState::{Paused, Running};
    state
        .vms
        .values()
        .filter(|v| v.state.wants_running() && !matches!(v.actual, Running | Paused) && v.waiting.is_none())
        .map(|v| v.node.as_str())
        .collect()
}

/// Whether figures moved enough to matter: any count, total, allocation, flag or unmanaged
/// domain changed, or the load or the used memory moved by a step.
fn moved(was: &NodeStats, now: &NodeStats) -> bool {
    let mem_step = MEM_STEP_MIB.max(now.mem_total_mib / 50);
    (was.cpu_count, was.mem_total_mib, was.vms_running, was.mem_allocated_mib, was.mem_provisioned_mib)
        != (now.cpu_count, now.mem_total_mib, now.vms_running, now.mem_allocated_mib, now.mem_provisioned_mib)
        || (was.vcpus_allocated, was.stale, was.session_self_fence, was.session_only)
            != (now.vcpus_allocated, now.stale, now.session_self_fence, now.session_only)
        || was.unmanaged_domains != now.unmanaged_domains
        || was.load_milli.abs_diff(now.load_milli) >= LOAD_STEP_MILLI
        || was.mem_used_mib.abs_diff(now.mem_used_mib) >= mem_step
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_storage::model::{DaemonState, DomainState, RouterState};

    fn record(stats: NodeStats, keepalive_ms: Option<u64>) -> NodeRecord {
        NodeRecord {
            id: 7,
            name: "hv1".into(),
            role: Role::Hypervisor,
            cluster_addr: "127.0.0.1:7400".into(),
            daemon_state: DaemonState::Run,
            domain_state: DomainState::Ready,
            router_state: RouterState::initial(Role::Hypervisor),
            return_by_ms: None,
            stats,
            last_keepalive_ms: keepalive_ms,
            heartbeat: Default::default(),
            fencing: None,
            fence: Default::default(),
            health: None,
            joined_ms: 0,
            revision: 1,
        }
    }

    #[test]
    fn a_client_keepalive_is_written_when_its_figures_move_or_it_is_due() {
        let base = NodeStats {
            cpu_count: 8,
            load_milli: 1000,
            mem_total_mib: 65536,
            mem_used_mib: 10000,
            ..NodeStats::default()
        };
        let rec = record(base.clone(), Some(100_000));
        let quiet = Why::default();
        assert_eq!(worth_writing(&rec, &base, quiet), Worth::Nothing, "unchanged, not due");
        assert_eq!(worth_writing(&rec, &base, Why { due: true, ..quiet }), Worth::WithAggregate, "due");
        assert_eq!(worth_writing(&rec, &base, Why { starting: true, ..quiet }), Worth::Now, "a VM to start");
        let small = NodeStats { load_milli: 1400, mem_used_mib: 11000, ..base.clone() };
        assert_eq!(worth_writing(&rec, &small, quiet), Worth::Nothing, "small moves wait for the refresh");
        for moved in [
            NodeStats { load_milli: 1500, ..base.clone() },
            NodeStats { mem_used_mib: 10000 + 1311, ..base.clone() },
            NodeStats { vms_running: 1, ..base.clone() },
            NodeStats { stale: true, ..base.clone() },
            NodeStats { unmanaged_domains: vec!["x".into()], ..base.clone() },
        ] {
            assert_eq!(worth_writing(&rec, &moved, quiet), Worth::WithAggregate, "{moved:?}");
        }
        let flagged = NodeStats { session_self_fence: true, ..base.clone() };
        let rec_flagged = record(flagged.clone(), Some(100_000));
        assert_eq!(worth_writing(&rec_flagged, &flagged, quiet), Worth::Now, "a self-fencing client: every interval");
        // On its session alone: its keepalive's age counts for nothing once its record says so.
        let alone = base.clone().with_session_guard(true);
        assert_eq!(worth_writing(&rec_flagged, &alone, quiet), Worth::Now, "its record does not say so yet");
        let rec_alone = record(alone.clone(), Some(100_000));
        assert_eq!(worth_writing(&rec_alone, &alone, quiet), Worth::Nothing, "on its session alone: on change");
        assert_eq!(worth_writing(&rec_alone, &flagged, quiet), Worth::Now, "its report no longer says so");
        let moved = NodeStats { vms_running: 1, ..alone.clone() };
        assert_eq!(worth_writing(&rec_alone, &moved, quiet), Worth::WithAggregate, "moved");
    }

    #[test]
    fn figures_older_than_the_record_or_the_fence_are_not_written() {
        let wall = herd_raft::clock::wall_ms();
        let base = NodeStats { cpu_count: 8, mem_total_mib: 65536, ..NodeStats::default() };
        let mut state = State::default();
        let moved = NodeStats { vms_running: 3, ..base.clone() };
        let report = |age_ms: u64| vec![ClientFigures { id: 7, age_ms, stats: moved.clone() }];
        let worth = |state: &State, age_ms: u64, urgent: bool| {
            keepalives_worth_writing(state, &report(age_ms), &mut HashMap::new(), Duration::from_secs(1), urgent)
        };
        // Its record's keepalive 2 s ago (revision 1).
        state.nodes.insert("hv1".into(), record(base.clone(), Some(wall - 2000)));
        let (now, aggregate) = worth(&state, 500, false);
        assert!(now.is_empty());
        assert_eq!(aggregate.len(), 1, "figures polled after the record's keepalive");
        assert_eq!(aggregate[0].expect_revision, Some(1), "written against the record as read");
        assert!(worth(&state, 3000, false).1.is_empty(), "polled before the record's keepalive: not over it");
        // Fenced 1 s ago: figures from before say nothing of it being back, even urgent ones.
        let fenced = |rec: &mut NodeRecord| rec.fence.fenced_ms = Some(wall - 1000);
        state.nodes.values_mut().for_each(fenced);
        assert!(worth(&state, 1500, false).1.is_empty(), "polled before the fence");
        assert_eq!(worth(&state, 500, false).1.len(), 1, "polled after the fence: it is back");
        let flagged = NodeStats { session_self_fence: true, ..moved.clone() };
        let urgent = |age_ms: u64| {
            let report = vec![ClientFigures { id: 7, age_ms, stats: flagged.clone() }];
            keepalives_worth_writing(&state, &report, &mut HashMap::new(), Duration::from_secs(1), true).0.len()
        };
        assert_eq!((urgent(1500), urgent(500)), (0, 1), "a self-fencing client's, only from after the fence");
    }
}
