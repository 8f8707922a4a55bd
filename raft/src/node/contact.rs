//! Round-trip contact with the leader: what lets a coordinator serve sessions, and what lets
//! the primary tell how long ago a coordinator can last have served one.
//!
//! ```text
//!  member (not leading), every window/4:  sent = now ── Rpc::Contact ──▶ leader
//!                                                            leader: answers only while its
//!                                                            quorum acknowledged it within the
//!                                                            window; notes received[member] = now
//!  answered ◀── Done ──┘  contact dated from `sent`: serves sessions until sent + window
//! ```
//!
//! So every poll a member answered, it answered before `received + window` on the leader's
//! clock (its ask was sent before the leader received it). Appends it accepted are not enough
//! on their own: a member that hears the leader but cannot reach it would serve sessions the
//! leader cannot vouch for. The primary's `SessionsQuiet` evidence for a client combines, per
//! coordinator, its own word (when it last heard the client) or, when it does not answer, this
//! bound (`ClusterNode::sessions_quiet`).

use std::collections::BTreeMap;
use std::time::Duration;

use herd_storage::model::{NodeId, Role};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use openraft::ServerState;
use tokio::time::Instant;

use super::{ClusterNode, Member};
use crate::clock;
use crate::network::{CallError, PeerClient};
use crate::wire::{Rpc, RpcError, RpcReply};

/// How often a leader of the previous version is asked again (it may have been upgraded).
const OLD_LEADER_ASK: Duration = Duration::from_secs(10);

/// How often a member tells a leader that takes it its level again.
const LEVEL_AGAIN: Duration = Duration::from_secs(5);

/// What this node knows of round trips with the leader, both ends.
#[derive(Default)]
pub(super) struct RoundTrips {
    /// When this member sent the last ask the leader answered.
    pub(super) answered_sent: Option<Instant>,
    /// A leader (id, term) of the previous version, which does not know the ask: while it
    /// leads, this member serves on its appends alone, as that version did (its primary
    /// records no self-fence on sessions' evidence).
    pub(super) old_leader: Option<(NodeId, u64)>,
    /// On the leader: the term of its office and when it first noted it (no earlier than the
    /// office began, so a bound counted from it errs on the safe side).
    office: Option<(u64, Instant)>,
    /// On the leader: when it received each member's last ask in this office.
    received: BTreeMap<NodeId, Instant>,
    /// On the leader: the boot of each member's Raft (as its answers to this leader's appends
    /// said) when it last asked in this office: an ask speaks for that boot only.
    asked_boot: BTreeMap<NodeId, u64>,
    /// On the leader: the level each member told this office (`Rpc::Level`), and the boot of its
    /// Raft then: a member restarted since (perhaps as an older version) must tell it again.
    levels: BTreeMap<NodeId, (u32, u64)>,
    /// The leader (id, term) this member told its level to (or found of an older version), and
    /// when (told again every [`LEVEL_AGAIN`]).
    pub(super) level_told: Option<((NodeId, u64), Instant)>,
    /// The leader (id, term) that took this member's level: it knows `session_only`.
    pub(super) leader_knows_level: Option<(NodeId, u64)>,
}

impl RoundTrips {
    /// The office of `term` (a new one forgets the previous office's asks).
    fn office(&mut self, term: u64) -> Instant {
        match self.office {
            Some((t, since)) if t == term => since,
            _ => {
                let now = Instant::now();
                self.office = Some((term, now));
                self.received.clear();
                self.asked_boot.clear();
                self.levels.clear();
                now
            }
        }
    }

    /// On the leader of `term`: the longest any coordinator no longer in `members` can have
    /// gone without serving — those that asked this office and then left (removed: their
    /// asks are refused since) by their last ask, and any other (one removed before this
    /// office, which the leader never heard) by the office's start: a previous leader
    /// answered asks until at most a window into it, and an answer lasts a window more.
    fn others_served_ago(&mut self, term: u64, members: &[NodeId], window: Duration) -> Duration {
        let office = self.office(term);
        let gone: Vec<NodeId> = self.received.keys().filter(|id| !members.contains(id)).copied().collect();
        let since_office = Instant::now().saturating_duration_since(office + 2 * window);
        gone.into_iter().filter_map(|id| self.served_ago(term, id, window)).fold(since_office, Duration::min)
    }

    /// A follower's contact with the leader `leader` (id, term), `appended` being when it last
    /// took its appends: how long ago the older of those and the sending of its last answered
    /// ask — or of the appends alone, under a leader of the previous version (`old_leader`).
    pub(super) fn follower_contact(
        &self,
        appended: Option<Instant>,
        leader: Option<(NodeId, u64)>,
        now: Instant,
    ) -> Option<Duration> {
        let old = leader.is_some_and(|l| self.old_leader == Some(l));
        let asked = if old { appended } else { self.answered_sent };
        appended.zip(asked).map(|(a, r)| now.duration_since(a.min(r)))
    }

    /// On the leader of `term`: `from`, whose Raft runs boot `boot` (`None`: no answer of it
    /// to this leader's appends yet), asked for contact just now.
    fn note(&mut self, term: u64, from: NodeId, boot: Option<u64>) {
        self.office(term);
        self.received.insert(from, Instant::now());
        match boot {
            Some(b) => self.asked_boot.insert(from, b),
            None => self.asked_boot.remove(&from),
        };
    }

    /// On the leader of `term`: whether every one of `members` asked this office from the boot
    /// it runs now (`boot_of`, from its answers to this leader's appends).
    fn all_asked(&mut self, term: u64, members: &[NodeId], boot_of: impl Fn(NodeId) -> Option<u64>) -> bool {
        self.office(term);
        members.iter().all(|id| self.asked_boot.get(id).is_some_and(|b| Some(*b) == boot_of(*id)))
    }

    /// On the leader of `term`: how long ago a member that asked nothing this office — and runs
    /// a version that asks (one that knows `NodeStats::session_only`: no older member can
    /// apply a record that has it) — certainly stopped serving: a previous leader answered its
    /// asks until a window into this office at most, and an answer lasts a window more.
    fn unasked_served_ago(&mut self, term: u64, window: Duration) -> Duration {
        let office = self.office(term);
        Instant::now().saturating_duration_since(office + 2 * window)
    }

    /// On the leader of `term`: member `from`, whose Raft runs boot `boot`, runs at `level`.
    fn note_level(&mut self, term: u64, from: NodeId, level: u32, boot: Option<u64>) {
        self.office(term);
        match boot {
            Some(b) => self.levels.insert(from, (level, b)),
            None => self.levels.remove(&from),
        };
    }

    /// On the leader of `term`: whether every one of `members` told this office a level of at
    /// least `level`, from the boot it runs now (`boot_of`).
    fn all_at(&mut self, term: u64, members: &[NodeId], level: u32, boot_of: impl Fn(NodeId) -> Option<u64>) -> bool {
        self.office(term);
        members.iter().all(|id| self.levels.get(id).is_some_and(|(l, b)| *l >= level && Some(*b) == boot_of(*id)))
    }

    /// On the leader of `term`: how long ago member `id` certainly stopped serving sessions on
    /// a round trip answered by this leader or an earlier one, each round trip lasting
    /// `window` — `None` when this office has no ask of it (it may run a version that asks
    /// none, and serve on appends alone).
    fn served_ago(&mut self, term: u64, id: NodeId, window: Duration) -> Option<Duration> {
        let office = self.office(term);
        let received = *self.received.get(&id)?;
        // A previous leader answered asks until at most a window into this office (it needs
        // its quorum's acknowledgement within the window, and that quorum had moved on).
        let last = received.max(office + window);
        Some(Instant::now().saturating_duration_since(last + window))
    }
}

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// The leader's answer to a member's `Rpc::Contact`.
    pub(super) fn answer_contact(
        &self,
        member: &Member,
        from: Option<NodeId>,
        window_ms: u64,
    ) -> Result<RpcReply, RpcError> {
        let (term, from) = leading_for_member(member, from, "asks for contact")?;
        let mine = clock::ms(self.serve_contact_window());
        if window_ms != mine {
            return Err(RpcError::Refused(format!(
                "serving window {window_ms} ms, the leader's is {mine} ms: coordinators must share [raft] election_timeout_ms"
            )));
        }
        if self.leader_contact_until().is_none() {
            return Err(RpcError::Unavailable("this leader's quorum has not acknowledged it lately".into()));
        }
        let boot = self.replication_watch().boot_of(from);
        let mut rt = self.round_trips.lock().unwrap_or_else(|p| p.into_inner());
        rt.note(term, from, boot);
        Ok(RpcReply::Done)
    }

    /// On the leader: makes `req` readable by every member. A client's flags that it
    /// self-fences on its session (`NodeStats::session_self_fence`), and on it alone
    /// (`session_only`), are each encoded only when set, and a member of a version before
    /// cannot decode them: the first is kept only while every other member asked this office
    /// for contact (so runs a version that knows it), the second only while every other
    /// member also told this office its level is at least 1 (`Rpc::Level`); else they are
    /// dropped, and the primary records such a client self-fenced on its keepalive's age, as
    /// before — safe, since without `session_only` in its record the client self-fences on
    /// that too.
    pub(super) fn keep_readable(&self, member: &Member, req: &mut herd_storage::model::Request) {
        use herd_storage::model::Command;
        let flagged = |c: &Command| matches!(c, Command::Keepalive { stats, .. } if stats.session_self_fence || stats.session_only);
        if !req.ops.iter().any(|o| flagged(&o.cmd)) {
            return;
        }
        let (term, others): (u64, Vec<NodeId>) = {
            let m = member.raft.metrics();
            let m = m.borrow_watched();
            (m.current_term, m.membership_config.nodes().map(|(id, _)| *id).filter(|id| *id != member.id).collect())
        };
        // Each member's word speaks for the boot of its Raft that gave it: one restarted since
        // (perhaps as a previous version, which cannot decode the flags) must give it again.
        let watch = self.replication_watch();
        let boot_of = |id: NodeId| watch.boot_of(id);
        let (all_asked, all_level) = {
            let mut rt = self.round_trips.lock().unwrap_or_else(|p| p.into_inner());
            (rt.all_asked(term, &others, boot_of), rt.all_at(term, &others, 1, boot_of))
        };
        if !all_asked {
            strip_flags(req, true);
        } else if !all_level {
            strip_flags(req, false);
        }
    }

    /// On a member forwarding `req` to `leader` (id, term): what that leader can decode of a
    /// client's flags — neither under a leader of the version before `Rpc::Contact`, not
    /// `session_only` under one that did not take this member's level (a previous version: it
    /// would refuse the whole request, and with it every keepalive this coordinator writes).
    pub(super) fn readable_by_leader(&self, leader: (NodeId, u64), req: &mut herd_storage::model::Request) {
        let (old, knows_level) = {
            let rt = self.round_trips.lock().unwrap_or_else(|p| p.into_inner());
            (rt.old_leader == Some(leader), rt.leader_knows_level == Some(leader))
        };
        if !knows_level {
            strip_flags(req, old);
        }
    }

    /// The leader's answer to a member's `Rpc::Level`.
    pub(super) fn answer_level(&self, member: &Member, from: Option<NodeId>, level: u32) -> Result<RpcReply, RpcError> {
        let (term, from) = leading_for_member(member, from, "tells its level")?;
        let boot = self.replication_watch().boot_of(from);
        self.round_trips.lock().unwrap_or_else(|p| p.into_inner()).note_level(term, from, level, boot);
        Ok(RpcReply::Done)
    }

    /// On the leader (office `term`): how long ago member `id` certainly stopped serving
    /// sessions on a round trip with this leader or an earlier one — `None` when this office
    /// has no ask of it (it may run a version that asks none, and serve on appends alone).
    pub(super) fn served_ago(&self, term: u64, id: NodeId) -> Option<Duration> {
        let window = self.serve_contact_window();
        self.round_trips.lock().unwrap_or_else(|p| p.into_inner()).served_ago(term, id, window)
    }

    /// On the leader (office `term`): [`RoundTrips::unasked_served_ago`].
    pub(super) fn unasked_served_ago(&self, term: u64) -> Duration {
        let window = self.serve_contact_window();
        self.round_trips.lock().unwrap_or_else(|p| p.into_inner()).unasked_served_ago(term, window)
    }

    /// On the leader (office `term`): [`RoundTrips::others_served_ago`] for the coordinators
    /// outside `members`.
    pub(super) fn others_served_ago(&self, term: u64, members: &[NodeId]) -> Duration {
        let window = self.serve_contact_window();
        self.round_trips.lock().unwrap_or_else(|p| p.into_inner()).others_served_ago(term, members, window)
    }

    /// Asks the leader for a round trip every quarter of the serving window, while `member`'s
    /// Raft runs and its record names it a coordinator (a hypervisor that is a Raft learner
    /// serves no session: clients ask only coordinators).
    pub(super) fn keep_contact(&self, member: &Member) {
        let round_trips = self.round_trips.clone();
        let (me, cluster_id, metrics) = (member.id, member.cluster_id.clone(), member.raft.metrics());
        let view = member.view.clone();
        let (connector, limits) = (self.connector.clone(), self.settings.limits.clone());
        let every = (self.serve_contact_window() / 4).max(Duration::from_millis(100));
        let window_ms = clock::ms(self.serve_contact_window());
        let timeout = self.serve_contact_window() / 2;
        herd_storage::types::spawn(async move {
            let mut client: Option<PeerClient> = None;
            let mut warned: Option<Instant> = None;
            let mut last_ask: Option<Instant> = None;
            loop {
                tokio::time::sleep(every).await;
                let target = {
                    let m = metrics.borrow_watched();
                    if m.running_state.is_err() {
                        return; // Raft stopped
                    }
                    let leader = m.current_leader.filter(|l| *l != me);
                    let term = m.current_term;
                    leader.and_then(|l| Some((l, term, m.membership_config.membership().get_node(&l)?.addr.clone())))
                };
                let Some((leader, term, addr)) = target else { continue };
                if client.as_ref().is_none_or(|c| c.target() != Some(leader) || c.addr() != addr) {
                    let c = PeerClient::new(connector.clone(), addr, Some(leader), cluster_id.clone(), limits.clone());
                    client = Some(c.from(Some(me)));
                }
                // Every member (a hypervisor learner too: it decodes every entry) tells each
                // leader its level, in each term and again every LEVEL_AGAIN while that leader
                // takes it (the leader keeps a level only for the boot that told it, and may
                // have seen this boot's first append answer only after the level).
                let told = {
                    let rt = round_trips.lock().unwrap_or_else(|p| p.into_inner());
                    rt.level_told.is_some_and(|(l, at)| {
                        l == (leader, term) && (at.elapsed() < LEVEL_AGAIN || rt.leader_knows_level != Some(l))
                    })
                };
                if !told {
                    if let Some(c) = client.as_mut() {
                        if tell_level(c, &round_trips, (leader, term), timeout).await {
                            client = None;
                        }
                    }
                }
                let coordinator = view.read().state.node_by_id(me).is_some_and(|n| n.role == Role::Coordinator);
                if !coordinator {
                    continue;
                }
                if client.is_none() {
                    continue; // made again next time
                }
                // Under a leader of the previous version, ask again only now and then (it
                // closes the connection on every ask it cannot decode).
                let old = round_trips.lock().unwrap_or_else(|p| p.into_inner()).old_leader == Some((leader, term));
                if old && last_ask.is_some_and(|t: Instant| t.elapsed() < OLD_LEADER_ASK) {
                    continue;
                }
                let Some(c) = client.as_mut() else { continue };
                let sent = Instant::now();
                last_ask = Some(sent);
                match c.call(Rpc::Contact { window_ms }, timeout).await {
                    Ok(RpcReply::Done) => {
                        let mut rt = round_trips.lock().unwrap_or_else(|p| p.into_inner());
                        rt.answered_sent = rt.answered_sent.max(Some(sent));
                        rt.old_leader = None;
                    }
                    // Only a frame it cannot decode is a bad request to a leader.
                    Err(CallError::Remote(RpcError::BadRequest(why))) => {
                        let mut rt = round_trips.lock().unwrap_or_else(|p| p.into_inner());
                        if rt.old_leader != Some((leader, term)) {
                            tracing::info!(leader, %why, "the leader does not know contact asks (an older version): serving on its appends alone while it leads");
                        }
                        rt.old_leader = Some((leader, term));
                        client = None;
                    }
                    Ok(other) => tracing::debug!("unexpected answer to a contact ask: {other:?}"),
                    // Refused (a window that differs): loud, since this coordinator then
                    // serves no session; the connection stays.
                    Err(CallError::Remote(RpcError::Refused(why))) => {
                        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            warned = Some(Instant::now());
                            tracing::warn!(
                                leader,
                                "the leader refuses this coordinator's contact asks, so it serves no session: {why}"
                            );
                        }
                    }
                    // The leader answered (no quorum yet, not the leader any more): the
                    // connection is fine.
                    Err(CallError::Remote(e)) => tracing::debug!(leader, "contact ask not answered: {e}"),
                    Err(e) => {
                        tracing::debug!(leader, "contact ask not answered: {e}");
                        client = None;
                    }
                }
            }
        });
    }
}

/// On the leader: the term it leads in and `from`, a member of its Raft membership — else why
/// not (`what` the member does, for the refusal).
fn leading_for_member(member: &Member, from: Option<NodeId>, what: &str) -> Result<(u64, NodeId), RpcError> {
    let m = member.raft.metrics();
    let m = m.borrow_watched();
    if m.state != ServerState::Leader {
        return Err(RpcError::NotLeader { leader_id: m.current_leader, leader_addr: None });
    }
    let is_member = |f: &NodeId| m.membership_config.membership().get_node(f).is_some();
    match from.filter(is_member) {
        Some(from) => Ok((m.current_term, from)),
        None => Err(RpcError::Refused(format!("only a member of the Raft membership {what}"))),
    }
}

/// Drops the clients' self-fence flags from the keepalives in `req`: `session_only` alone, or
/// `both`.
fn strip_flags(req: &mut herd_storage::model::Request, both: bool) {
    use herd_storage::model::Command;
    for op in &mut req.ops {
        if let Command::Keepalive { stats, .. } = &mut op.cmd {
            if both {
                *stats = std::mem::take(stats).without_session_flags();
            } else {
                stats.session_only = false;
            }
        }
    }
}

/// Tells `leader` (id, term) this member's level; whether the connection is to be dropped (the
/// leader could not decode the frame, or it failed).
async fn tell_level(
    c: &mut PeerClient,
    round_trips: &std::sync::Mutex<RoundTrips>,
    leader: (NodeId, u64),
    timeout: Duration,
) -> bool {
    let (drop, told) = match c.call(Rpc::Level { level: crate::wire::LEVEL }, timeout).await {
        Ok(RpcReply::Done) => (false, true),
        Err(CallError::Remote(RpcError::BadRequest(why))) => {
            tracing::info!(leader = leader.0, %why, "the leader does not know levels (an older version)");
            (true, true)
        }
        Ok(other) => {
            tracing::debug!("unexpected answer to a level: {other:?}");
            (false, false)
        }
        Err(CallError::Remote(e)) => {
            tracing::debug!(leader = leader.0, "level not taken: {e}");
            (false, false)
        }
        Err(e) => {
            tracing::debug!(leader = leader.0, "level not told: {e}");
            (true, false)
        }
    };
    if told {
        let mut rt = round_trips.lock().unwrap_or_else(|p| p.into_inner());
        rt.level_told = Some((leader, Instant::now()));
        if !drop {
            rt.leader_knows_level = Some(leader);
        }
    }
    drop
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_member_stops_serving_a_window_after_its_last_ask_and_never_before_the_office_plus_one() {
        let mut rt = RoundTrips::default();
        assert_eq!(rt.served_ago(3, 2, WINDOW), None, "no ask this office: no evidence");
        rt.note(3, 2, None);
        // Received at the office's start: the previous leader may have answered until a
        // window into the office, and that answer lasts a window more.
        assert_eq!(rt.served_ago(3, 2, WINDOW), Some(Duration::ZERO));
        tokio::time::advance(Duration::from_millis(2_500)).await;
        assert_eq!(rt.served_ago(3, 2, WINDOW), Some(Duration::from_millis(500)));
        rt.note(3, 2, None);
        assert_eq!(rt.served_ago(3, 2, WINDOW), Some(Duration::ZERO), "a fresh ask: serving now");
        tokio::time::advance(Duration::from_millis(4_000)).await;
        assert_eq!(rt.served_ago(3, 2, WINDOW), Some(Duration::from_millis(3_000)));
        assert_eq!(rt.served_ago(3, 5, WINDOW), None, "another member, never asked");
        // A new office forgets the asks of the last one.
        assert_eq!(rt.served_ago(4, 2, WINDOW), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_that_never_asked_counts_from_two_windows_into_the_office() {
        let mut rt = RoundTrips::default();
        assert_eq!(rt.unasked_served_ago(3, WINDOW), Duration::ZERO, "the office just began");
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(rt.unasked_served_ago(3, WINDOW), Duration::ZERO, "a previous leader's answer may still last");
        tokio::time::advance(Duration::from_millis(3_000)).await;
        assert_eq!(rt.unasked_served_ago(3, WINDOW), Duration::from_millis(2_500));
        assert_eq!(rt.unasked_served_ago(4, WINDOW), Duration::ZERO, "a new office starts again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_tells_its_level_to_each_office() {
        let mut rt = RoundTrips::default();
        // Members 2 and 4 run boots 20 and 40 (as their append answers say).
        let boots = |id: NodeId| Some(id * 10);
        assert!(!rt.all_at(3, &[2, 4], 1, boots), "no one told");
        rt.note_level(3, 2, 1, Some(20));
        assert!(!rt.all_at(3, &[2, 4], 1, boots), "4 did not");
        rt.note_level(3, 4, 0, Some(40));
        assert!(!rt.all_at(3, &[2, 4], 1, boots), "4 is below");
        rt.note_level(3, 4, 2, Some(40));
        assert!(rt.all_at(3, &[2, 4], 1, boots));
        assert!(rt.all_at(3, &[], 1, boots), "a leader alone");
        // 4 restarted (boot 41), perhaps as a previous version: its level went with its boot.
        let restarted = |id: NodeId| Some(if id == 4 { 41 } else { id * 10 });
        assert!(!rt.all_at(3, &[2, 4], 1, restarted), "told by a boot that no longer runs");
        rt.note_level(3, 4, 1, None);
        assert!(!rt.all_at(3, &[2, 4], 1, restarted), "told before any answer of its boot: not yet");
        rt.note_level(3, 4, 1, Some(41));
        assert!(rt.all_at(3, &[2, 4], 1, restarted), "told again by the boot that runs");
        assert!(!rt.all_at(4, &[2, 4], 1, restarted), "a new office forgets them");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ask_speaks_for_the_boot_that_made_it() {
        let mut rt = RoundTrips::default();
        let boots = |id: NodeId| Some(id * 10);
        assert!(!rt.all_asked(3, &[2], boots));
        rt.note(3, 2, Some(20));
        assert!(rt.all_asked(3, &[2], boots));
        assert!(!rt.all_asked(3, &[2], |_| Some(21)), "restarted since, and asked nothing");
        assert!(!rt.all_asked(3, &[2], |_| None), "no answer of a boot this term");
    }

    #[tokio::test(start_paused = true)]
    async fn a_coordinator_gone_counts_from_its_last_ask_any_other_from_the_office() {
        let mut rt = RoundTrips::default();
        rt.note(3, 2, None);
        tokio::time::advance(Duration::from_millis(1_000)).await;
        rt.note(3, 4, None);
        tokio::time::advance(Duration::from_millis(4_000)).await;
        // No one gone: a coordinator removed before this office is bounded by its start.
        assert_eq!(rt.others_served_ago(3, &[1, 2, 4], WINDOW), Duration::from_millis(3_000));
        // 4 asked at 1 s and left: it served until 2 s at most.
        assert_eq!(rt.others_served_ago(3, &[1, 2], WINDOW), Duration::from_millis(3_000));
        tokio::time::advance(Duration::from_millis(1_000)).await;
        rt.note(3, 4, None);
        assert_eq!(rt.others_served_ago(3, &[1, 2], WINDOW), Duration::ZERO, "it asked just now, then left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_counts_the_older_of_appends_and_round_trip_unless_the_leader_is_old() {
        let mut rt = RoundTrips::default();
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        let leader = Some((1, 7));
        assert_eq!(rt.follower_contact(Some(now), leader, now), None, "appends without a round trip");
        rt.answered_sent = Some(t0);
        assert_eq!(rt.follower_contact(Some(now), leader, now), Some(Duration::from_millis(500)), "the older");
        assert_eq!(rt.follower_contact(None, leader, now), None, "a round trip without appends");
        // A leader of the previous version answers no ask: its appends alone count, for that
        // leader and term only.
        rt.answered_sent = None;
        rt.old_leader = Some((1, 7));
        assert_eq!(rt.follower_contact(Some(now), leader, now), Some(Duration::ZERO));
        assert_eq!(rt.follower_contact(Some(now), Some((1, 8)), now), None, "re-elected: it may be new now");
        assert_eq!(rt.follower_contact(Some(now), Some((2, 8)), now), None, "another leader");
    }
}
