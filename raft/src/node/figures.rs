//! Clients' figures as one aggregate an interval (issue 22, design doc slice 14). A client's
//! figures ride on its session's polls; every keepalive interval, a coordinator that does not
//! lead relays the figures of every client it heard to the leader (`LeaderOp::Figures`, in
//! memory, not the log). The leader keeps the latest per client here, so it holds every
//! client's figures no older than about an interval (`status` shows them, with their age), and
//! writes those worth a log entry — its own clients' and the relayed — in one request at its
//! next interval: one entry of statistics an interval for the whole cluster.
//!
//! ```text
//!  coordinator ──Figures(id, age, stats)×n──▶ leader: Relayed (latest per client, bounded, aged)
//!                                           │ each interval: worth writing? ─▶ one request
//!                                           └ status rows: the freshest figures, their age
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use herd_storage::model::{NodeId, NodeStats, Role, MAX_KEEPALIVE_OPS};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use tokio::time::Instant;

use super::{ClusterNode, Member, NodeError};
use crate::clock;
use crate::wire::{ClientFigures, LeaderOp, RpcError, RpcReply};

/// Clients whose relayed figures are kept, at most (one entry per client).
pub const MAX_RELAYED: usize = 65_536;

/// The latest figures other coordinators relayed this node for each client, and how many it
/// sent and took (for operators: `status`'s `followers`).
#[derive(Default)]
pub struct Relayed {
    latest: BTreeMap<NodeId, (Instant, NodeStats)>,
    /// Figures this node relayed a leader.
    pub sent: u64,
    /// Clients' keepalives this node wrote (the leader's aggregate, or urgent ones).
    pub written: u64,
    /// Figures this node took from other coordinators.
    pub taken: u64,
}

impl Relayed {
    /// Takes `figures` relayed by another coordinator, dated by their age: a client's replace
    /// those kept unless older. Refuses more than [`MAX_KEEPALIVE_OPS`] at once, or more
    /// clients than [`MAX_RELAYED`] kept (those older than two intervals are forgotten each
    /// interval).
    pub fn add(&mut self, figures: Vec<ClientFigures>, now: Instant) -> Result<(), RpcError> {
        if figures.len() > MAX_KEEPALIVE_OPS {
            return Err(RpcError::BadRequest(format!("at most {MAX_KEEPALIVE_OPS} clients' figures at once")));
        }
        let new = figures.iter().filter(|f| !self.latest.contains_key(&f.id)).count();
        if self.latest.len() + new > MAX_RELAYED {
            return Err(RpcError::Refused(format!("figures of {MAX_RELAYED} clients already kept")));
        }
        self.taken += figures.len() as u64;
        for f in figures {
            // Older than this clock can tell: of no use (and never as new).
            let Some(at) = now.checked_sub(Duration::from_millis(f.age_ms)) else { continue };
            if self.latest.get(&f.id).is_none_or(|(kept, _)| *kept <= at) {
                self.latest.insert(f.id, (at, f.stats.within_limits()));
            }
        }
        Ok(())
    }

    /// Every client's latest figures no older than `max_age`, aged at `now` (older ones are
    /// forgotten: their client is no longer heard, or not by a coordinator that relays).
    pub fn fresh(&mut self, now: Instant, max_age: Duration) -> Vec<ClientFigures> {
        self.forget(now, max_age);
        let figures = |(id, (at, stats)): (&NodeId, &(Instant, NodeStats))| ClientFigures {
            id: *id,
            age_ms: clock::ms(now.saturating_duration_since(*at)),
            stats: stats.clone(),
        };
        self.latest.iter().map(figures).collect()
    }

    /// Client `id`'s latest relayed figures, and how old they are.
    pub fn of(&self, id: NodeId, now: Instant) -> Option<(Duration, NodeStats)> {
        self.latest.get(&id).map(|(at, stats)| (now.saturating_duration_since(*at), stats.clone()))
    }

    fn forget(&mut self, now: Instant, max_age: Duration) {
        self.latest.retain(|_, (at, _)| now.saturating_duration_since(*at) <= max_age);
    }
}

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Whether this node is a member that believes it leads.
    pub fn leads(&self) -> bool {
        self.member().is_some_and(|m| m.raft.metrics().borrow_watched().current_leader == Some(m.id))
    }

    /// Relays `figures` (clients heard here) to the leader (if this node leads, keeps them
    /// itself), at most [`MAX_KEEPALIVE_OPS`] a call. A leader of a version before this
    /// answers `BadRequest`: the caller writes what is worth writing itself then.
    pub async fn relay_figures(&self, figures: Vec<ClientFigures>, timeout: Duration) -> Result<(), NodeError> {
        let deadline = Instant::now() + timeout;
        for chunk in figures.chunks(MAX_KEEPALIVE_OPS) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.leader_call(LeaderOp::Figures(chunk.to_vec()), left).await? {
                RpcReply::Done => self.figures.lock().unwrap_or_else(|p| p.into_inner()).sent += chunk.len() as u64,
                other => return Err(NodeError::Refused(format!("unexpected figures reply {other:?}"))),
            }
        }
        Ok(())
    }

    /// The figures other coordinators relayed this node (while it led), the latest per client,
    /// none older than `max_age` (older ones forgotten).
    pub fn relayed_figures(&self, max_age: Duration) -> Vec<ClientFigures> {
        self.figures.lock().unwrap_or_else(|p| p.into_inner()).fresh(Instant::now(), max_age)
    }

    /// The freshest figures this node holds of client `id` — from its own session's polls or
    /// relayed to it — and their age in milliseconds.
    pub fn client_figures(&self, id: NodeId) -> Option<(u64, NodeStats)> {
        let now = Instant::now();
        let relayed = self.figures.lock().unwrap_or_else(|p| p.into_inner()).of(id, now);
        let own = self.polled_figures(id).map(|(at, stats)| (now.saturating_duration_since(at), stats));
        let freshest = match (own, relayed) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        freshest.map(|(age, stats)| (clock::ms(age), stats))
    }

    /// Figures this node relayed a leader, took from other coordinators, and clients'
    /// keepalives it wrote, since it started.
    pub fn figures_counts(&self) -> (u64, u64, u64) {
        let f = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        (f.sent, f.taken, f.written)
    }

    /// Counts `n` clients' keepalives this node wrote.
    pub fn count_keepalives_written(&self, n: usize) {
        self.figures.lock().unwrap_or_else(|p| p.into_inner()).written += n as u64;
    }

    /// On the leader: `figures` relayed by another coordinator, kept until its next interval
    /// takes them — those of hypervisors of record (this node's applied state).
    pub(super) fn keep_figures(&self, member: &Member, mut figures: Vec<ClientFigures>) -> Result<RpcReply, RpcError> {
        {
            let g = member.view.read();
            let hypervisors: std::collections::HashSet<NodeId> =
                g.state.nodes.values().filter(|n| n.role == Role::Hypervisor).map(|n| n.id).collect();
            figures.retain(|f| hypervisors.contains(&f.id));
        }
        self.figures.lock().unwrap_or_else(|p| p.into_inner()).add(figures, Instant::now())?;
        Ok(RpcReply::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(id: NodeId, load: u64) -> ClientFigures {
        aged(id, load, 0)
    }

    fn aged(id: NodeId, load: u64, age_ms: u64) -> ClientFigures {
        ClientFigures { id, age_ms, stats: NodeStats { load_milli: load, ..NodeStats::default() } }
    }

    fn loads(f: &[ClientFigures]) -> Vec<(NodeId, u64)> {
        f.iter().map(|c| (c.id, c.stats.load_milli)).collect()
    }

    #[test]
    fn the_latest_figures_per_client_are_kept_until_too_old() {
        let mut r = Relayed::default();
        let t = Instant::now();
        let second = Duration::from_secs(1);
        r.add(vec![figures(1, 10), figures(2, 20)], t).expect("kept");
        r.add(vec![figures(1, 11)], t + second).expect("kept");
        assert_eq!(loads(&r.fresh(t + second, second * 2)), vec![(1, 11), (2, 20)], "the latest of 1");
        assert_eq!(r.of(2, t + second).map(|(age, s)| (age, s.load_milli)), Some((second, 20)));
        assert_eq!(loads(&r.fresh(t + second * 3, second * 2)), vec![(1, 11)], "2 not relayed for 3 s");
        assert_eq!(r.of(2, t + second * 3), None, "forgotten");
        assert_eq!(r.taken, 3);
    }

    #[test]
    fn relayed_figures_are_dated_by_their_age_and_older_ones_do_not_replace_newer() {
        let mut r = Relayed::default();
        let t = Instant::now() + Duration::from_secs(10);
        r.add(vec![aged(1, 10, 400)], t).expect("kept");
        r.add(vec![aged(1, 11, 900)], t).expect("kept");
        assert_eq!(r.of(1, t).map(|(age, s)| (age.as_millis(), s.load_milli)), Some((400, 10)), "the newer kept");
        let fresh = r.fresh(t + Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(fresh.iter().map(|c| (c.age_ms, c.stats.load_milli)).collect::<Vec<_>>(), vec![(500, 10)]);
    }

    #[test]
    fn too_many_figures_are_refused() {
        let mut r = Relayed::default();
        let t = Instant::now();
        let many: Vec<_> = (0..=MAX_KEEPALIVE_OPS as u64).map(|i| figures(i, 1)).collect();
        assert!(matches!(r.add(many, t), Err(RpcError::BadRequest(_))));
        assert_eq!(r.taken, 0, "nothing of a refused batch kept");
        let ids: Vec<NodeId> = (0..MAX_RELAYED as u64).collect();
        for chunk in ids.chunks(MAX_KEEPALIVE_OPS) {
            r.add(chunk.iter().map(|i| figures(*i, 1)).collect(), t).expect("kept");
        }
        assert!(matches!(r.add(vec![figures(u64::MAX, 1)], t), Err(RpcError::Refused(_))));
        r.add(vec![figures(0, 2)], t).expect("a client already kept is replaced");
        assert_eq!(r.fresh(t, Duration::from_secs(1)).len(), MAX_RELAYED);
    }

    #[test]
    fn relayed_figures_are_kept_within_the_models_limits() {
        let mut r = Relayed::default();
        let t = Instant::now();
        let mut f = figures(1, 1);
        f.stats.unmanaged_domains = vec![String::new(), "x".repeat(300)];
        f.stats.unmanaged_domains.extend((0..100).map(|i| format!("d{i}")));
        r.add(vec![f], t).expect("kept");
        let kept = r.of(1, t).expect("figures of 1").1.unmanaged_domains;
        assert_eq!(kept.len(), herd_storage::model::MAX_UNMANAGED, "{kept:?}");
        assert!(kept.iter().all(|d| d.starts_with('d')), "no empty or overlong name: {kept:?}");
    }
}
