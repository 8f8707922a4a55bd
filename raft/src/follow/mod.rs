//! Following the replicated state from outside Raft (issue 22; the plan is
//! `docs/design/hypervisors-as-clients.md`): a coordinator serves the committed changes from
//! its state machine's ring (`herd_storage::changes`) as a long poll on the cluster port, and a
//! [`Follower`] takes them in log order: as deltas (`Rpc::Follow` — the records each entry
//! changed; a node asking as itself gets the other nodes' keepalives left out), or, from a
//! follower of the previous version, as requests it applies with the model (`Rpc::Changes`).
//! Its state is the leader's at that index as projected for it (`State::projected_for`). A
//! follower further behind than the ring, or with nothing yet, takes the whole state. Its
//! state is a standalone `StateView`, read like a member's. A [`Session`]
//! keeps a follower fed from one coordinator at a time and moves to the next when it fails.
//! A [`Client`] is a node outside Raft: its session's copy of the state and a [`LeaderLink`]
//! for its writes (a hypervisor with `[cluster] membership = "client"`).
//!
//! ```text
//!   Session ─ Follower ──Rpc::Follow{from, wait_ms, stats}──▶ any member's handler ──▶ serve(view)
//!                      ◀── Steps([log id, delta?]…) | State{last applied, whole state} ─┘
//! ```

use std::time::Duration;

use herd_storage::model;
use herd_storage::sm::{StateView, ViewWriter};

use crate::network::{CallError, PeerClient};
use crate::wire::{Rpc, RpcError, RpcReply};

mod client;
mod link;
pub mod seeds;
mod serve;
mod session;

pub use client::{Client, CLIENT_WAIT};
pub use link::LeaderLink;
pub use serve::{serve, Answers, Want, LINGER, LINGER_GRID, MAX_REPLY_BYTES};
pub use session::{Session, SessionSettings, SessionStatus};

/// Why a follower could not take an answer.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("changes from index {got}, expected {expected}: asking again")]
    Gap { expected: u64, got: u64 },
    #[error("changes before any state")]
    NoState,
    #[error("the whole state does not decode: {0}")]
    Decode(String),
    #[error("unexpected answer {0}")]
    Unexpected(String),
}

/// What one answer did to a follower's copy.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// This many changes applied (0: none came within the wait).
    Changes(usize),
    /// The whole state taken.
    Whole,
    /// A whole state older than the copy (a lagging coordinator's): kept ours.
    Stale,
}

/// How long a follower asks a coordinator that did not know what it asked — one of a
/// previous version, which answers it `BadRequest` — for the next older kind instead
/// ([`Asks`]), before it tries its own again. Coordinators are upgraded first; a hypervisor
/// upgraded before them must still follow (a client that cannot follow stops seeing its
/// keepalives and self-fences).
pub const REQUESTS_FOR: Duration = Duration::from_secs(60);

/// What a follower asks for, oldest first: requests (`Rpc::Changes`), deltas (`Rpc::Follow`),
/// deltas with other nodes' VMs as outlines (`Rpc::Outlined`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Asks {
    Requests,
    Deltas,
    Outlined,
}

impl Asks {
    /// What a coordinator that did not know this kind may know.
    fn older(self) -> Option<Asks> {
        match self {
            Asks::Outlined => Some(Asks::Deltas),
            Asks::Deltas => Some(Asks::Requests),
            Asks::Requests => None,
        }
    }
}

/// A copy of the replicated state in a standalone [`StateView`], kept by applying a
/// coordinator's changes in log order.
pub struct Follower {
    view: StateView,
    writer: ViewWriter,
    /// The next log index to apply; `None` before any state was taken.
    next: Option<u64>,
    /// Statistics sent with each ask (a client's report; `None`: a reader only).
    report: Option<model::NodeStats>,
    /// What it asks for.
    asks: Asks,
    /// An older kind to ask for until then: a coordinator of a previous version answered (see
    /// [`REQUESTS_FOR`]).
    older: Option<(Asks, tokio::time::Instant)>,
    /// What it asked last.
    asked: Option<Asks>,
    /// Ask for the whole state (the kind asked changed), still never older than the copy.
    rebase: bool,
}

impl Default for Follower {
    fn default() -> Self {
        Follower::new()
    }
}

impl Follower {
    /// A follower with nothing yet: its first answer is the whole state. It asks with
    /// outlines (a client: other nodes' VMs are not its business).
    pub fn new() -> Follower {
        Follower::asking(Asks::Outlined)
    }

    /// A follower with nothing yet that asks for `asks` (and older kinds of a coordinator of a
    /// previous version).
    pub fn asking(asks: Asks) -> Follower {
        let (view, writer) = StateView::standalone();
        Follower { view, writer, next: None, report: None, asks, older: None, asked: None, rebase: false }
    }

    /// The followed state, read like a member's (and its applied-index watch).
    pub fn view(&self) -> &StateView {
        &self.view
    }

    /// The next index to apply (`None`: nothing yet).
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// Statistics to send with each ask from now on.
    pub fn set_report(&mut self, report: Option<model::NodeStats>) {
        self.report = report;
    }

    /// The request that asks for what comes next, waiting up to `wait` for it.
    pub fn ask(&self, wait: Duration) -> Rpc {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let from = if self.rebase { None } else { self.next };
        let stats = self.report.clone();
        match self.asks_now() {
            Asks::Requests => {
                // A coordinator of a previous version cannot decode the flags (nor would it keep them).
                let stats = stats.map(herd_storage::model::NodeStats::without_session_flags);
                Rpc::Changes { from, wait_ms, stats }
            }
            Asks::Deltas => Rpc::Follow { from, wait_ms, stats },
            Asks::Outlined => Rpc::Outlined { from, wait_ms, stats },
        }
    }

    /// What it asks for now, noted as asked. Each kind keeps a copy of its own (outlines,
    /// every VM whole, or requests applied with the model, which needs every record whole):
    /// a change of kind asks for a whole state, still never taking one older than the copy.
    fn asking_now(&mut self) -> Asks {
        let asks = self.asks_now();
        if self.asked.replace(asks).is_some_and(|was| was != asks) {
            self.rebase = true;
        }
        asks
    }

    /// What it asks for now (an older kind for a while after a coordinator did not know its own).
    pub fn asks_now(&self) -> Asks {
        match self.older {
            Some((older, until)) if tokio::time::Instant::now() < until => older,
            _ => self.asks,
        }
    }

    /// Takes one answer to [`Follower::ask`]. Steps apply in order, each exactly at the next
    /// index; a gap stops the batch (the next ask starts at the first index missing). Changes
    /// (requests, as `Rpc::Changes` is answered) apply the same way, with the model.
    pub fn take(&mut self, reply: RpcReply) -> Result<Taken, FollowError> {
        match reply {
            RpcReply::Steps(steps) => {
                self.in_order(steps.into_iter().map(|s| (s.log_id, s.delta)), |state, _, d| d.apply_to(state))
            }
            RpcReply::Changes(changes) => {
                self.in_order(changes.into_iter().map(|c| (c.log_id, c.request)), |state, index, req| {
                    model::apply(state, index, &req);
                })
            }
            RpcReply::State { last_applied, state } => {
                let next = last_applied.as_ref().map_or(0, |l| l.index + 1);
                if self.next.is_some_and(|mine| next < mine) {
                    return Ok(Taken::Stale);
                }
                let state =
                    herd_storage::sm::decode_snapshot_state(&state).map_err(|e| FollowError::Decode(e.to_string()))?;
                self.writer.update(|sm| {
                    sm.state = state;
                    sm.last_applied = last_applied;
                });
                self.next = Some(next);
                self.rebase = false;
                Ok(Taken::Whole)
            }
            other => Err(FollowError::Unexpected(format!("{other:?}").chars().take(120).collect())),
        }
    }

    /// Applies entries (a step's delta, or a request) exactly at the next index each, in order;
    /// a gap stops the batch. Entries without one (blank, membership) only advance the index.
    fn in_order<T>(
        &mut self,
        entries: impl ExactSizeIterator<Item = (herd_storage::types::LogId, Option<T>)>,
        apply: impl Fn(&mut model::State, u64, T),
    ) -> Result<Taken, FollowError> {
        let n = entries.len();
        let mut next = self.next;
        let done = self.writer.update(|sm| {
            for (log_id, entry) in entries {
                let expected = next.ok_or(FollowError::NoState)?;
                if log_id.index != expected {
                    return Err(FollowError::Gap { expected, got: log_id.index });
                }
                if let Some(e) = entry {
                    apply(&mut sm.state, log_id.index, e);
                }
                next = Some(log_id.index + 1);
                sm.last_applied = Some(log_id);
            }
            Ok(())
        });
        self.next = next;
        done.map(|()| Taken::Changes(n))
    }

    /// Asks `client`'s coordinator for what comes next (waiting up to `wait`) and takes it.
    pub async fn poll(&mut self, client: &mut PeerClient, wait: Duration) -> Result<Taken, FollowError> {
        // The coordinator answers a margin before this call's timeout.
        let timeout = wait + Duration::from_secs(2);
        let reply = loop {
            let asks = self.asking_now();
            match (client.call(self.ask(wait), timeout).await, asks.older()) {
                (Err(CallError::Remote(RpcError::BadRequest(why))), Some(older)) => {
                    tracing::warn!(%why, "a coordinator of a previous version: asking {older:?} for {REQUESTS_FOR:?}");
                    self.older = Some((older, tokio::time::Instant::now() + REQUESTS_FOR));
                }
                (r, _) => break r?,
            }
        };
        self.take(reply)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use herd_storage::changes::{Change, ChangeRing, Since, Step};
    use herd_storage::model::{Command, NewNode, Op, Request, Role, State};

    /// The request applied at `index` in these tests: the cluster's creation at 1 (index 0 is
    /// Raft's first membership entry), then tokens.
    fn request(index: u64) -> Request {
        let cmd = match index {
            1 => Command::InitCluster {
                cluster_id: "c".into(),
                token_hash: "0".repeat(64),
                node: NewNode { name: "c1".into(), role: Role::Coordinator, cluster_addr: "c1:7400".into() },
            },
            i => Command::CreateJoinToken { token_hash: format!("{i:064x}"), ttl_ms: None, uses: None },
        };
        Request { id: format!("r{index}"), time_ms: 1000 + index, ops: vec![Op::from(cmd)] }
    }

    fn id(index: u64) -> herd_storage::types::LogId {
        openraft::testing::log_id::<crate::TypeConfig>(1, 1, index)
    }

    /// A member's view with requests 1 to `upto` applied, each in its ring (requests only).
    fn with_requests(upto: u64) -> (StateView, ViewWriter) {
        let (view, writer) = StateView::standalone();
        writer.update(|sm| {
            sm.changes = ChangeRing::starting_at(1);
            for i in 1..=upto {
                model::apply(&mut sm.state, i, &request(i));
                sm.changes.push(id(i), Some(request(i)), None);
                sm.last_applied = Some(id(i));
            }
        });
        (view, writer)
    }

    /// Applies `req` at `index` as the state machine does: the request, its delta in the ring,
    /// the applied index.
    fn apply_with_delta(writer: &ViewWriter, index: u64, req: Request) {
        writer.update(|sm| {
            let before = sm.state.clone();
            model::apply(&mut sm.state, index, &req);
            let delta = match model::Delta::keepalives(&req) {
                Some(names) => model::Delta::of_keepalives(&sm.state, names),
                None => model::Delta::between(&before, &sm.state, index),
            };
            sm.changes.push(id(index), Some(req), Some(delta));
            sm.last_applied = Some(id(index));
        });
    }

    /// Sessions asking for the same changes at the same applied index get the same encoded
    /// answer (one encoding); it decodes, as a client reads a frame, to those changes; a new
    /// apply makes a new one.
    #[tokio::test]
    async fn the_same_changes_are_encoded_once() {
        let (view, writer) = StateView::standalone();
        let answers = Answers::default();
        let apply = |i: u64| {
            writer.update(|sm| {
                model::apply(&mut sm.state, i, &request(i));
                sm.changes.push(id(i), Some(request(i)), None);
                sm.last_applied = Some(id(i));
            })
        };
        writer.update(|sm| sm.changes = ChangeRing::starting_at(1));
        apply(1);
        apply(2);
        let ask = |from| serve(&view, Some(from), Duration::from_millis(10), &answers, Want::Requests);
        let (Ok(RpcReply::Encoded(a)), Ok(RpcReply::Encoded(b))) = (ask(2).await, ask(2).await) else {
            panic!("encoded answers")
        };
        assert!(Arc::ptr_eq(&a, &b), "the second session gets the first one's bytes");
        let read: Result<RpcReply, RpcError> = crate::wire::decode(&a).expect("a frame body");
        let Ok(RpcReply::Changes(c)) = read else { panic!("changes: {read:?}") };
        assert_eq!(c.iter().map(|c| c.log_id.index).collect::<Vec<_>>(), vec![2]);
        let Ok(RpcReply::Encoded(from1)) = ask(1).await else { panic!("encoded") };
        assert!(!Arc::ptr_eq(&a, &from1), "another from, another answer");
        apply(3);
        let Ok(RpcReply::Encoded(c)) = ask(2).await else { panic!("encoded") };
        let read: Result<RpcReply, RpcError> = crate::wire::decode(&c).expect("a frame body");
        assert!(matches!(read, Ok(RpcReply::Changes(ref c)) if c.len() == 2), "2 and 3 after the apply: {read:?}");
        assert!(matches!(ask(4).await, Ok(RpcReply::Changes(ref c)) if c.is_empty()), "nothing new within the wait");
    }

    /// A follower that takes the whole state midway, then changes, ends where the leader is
    /// (its view's applied index too); gaps and stale states leave its copy alone.
    #[test]
    fn a_follower_ends_with_the_leaders_state() {
        let (mut leader, mut ring) = (State::default(), ChangeRing::starting_at(1));
        let mut f = Follower::new();
        assert!(matches!(f.take(RpcReply::Changes(vec![])), Ok(Taken::Changes(0))));
        let change = |i: u64| Change { log_id: id(i), request: Some(request(i)) };
        assert!(matches!(f.take(RpcReply::Changes(vec![change(1)])), Err(FollowError::NoState)));
        for i in 1..7 {
            let c = change(i);
            if let Some(r) = &c.request {
                model::apply(&mut leader, i, r);
            }
            ring.push(c.log_id, c.request, None);
        }
        let whole = |s: &State, next: u64| RpcReply::State {
            last_applied: Some(id(next - 1)),
            state: herd_storage::sm::encode_state(s).expect("encode"),
        };
        let at3 = {
            let mut s = State::default();
            for i in 1..3 {
                model::apply(&mut s, i, &request(i));
            }
            s
        };
        assert_eq!(f.take(whole(&at3, 3)).expect("whole"), Taken::Whole);
        assert_eq!(f.next(), Some(3));
        // A gap is refused and changes nothing.
        assert!(matches!(f.take(RpcReply::Changes(vec![change(4)])), Err(FollowError::Gap { expected: 3, got: 4 })));
        assert_eq!(f.view().read().state, at3);
        let Since::Changes(rest) = ring.since(3, MAX_REPLY_BYTES) else { panic!("held") };
        assert_eq!(f.take(RpcReply::Changes(rest)).expect("changes"), Taken::Changes(4));
        assert_eq!((&f.view().read().state, f.next()), (&leader, Some(7)));
        assert_eq!(*f.view().subscribe().borrow(), 6, "the view's applied index");
        // An older whole state (a lagging coordinator's) is not taken.
        assert_eq!(f.take(whole(&at3, 3)).expect("stale"), Taken::Stale);
        assert_eq!(f.view().read().state, leader);
    }

    /// Deltas: a node following as itself gets another node's keepalive as nothing but the
    /// index, its own in full, and ends with the leader's state as projected for it; answers
    /// that hold a keepalive are encoded per session, the others shared.
    #[tokio::test]
    async fn a_node_follows_deltas_without_other_nodes_figures() {
        let (view, writer) = StateView::standalone();
        let answers = Answers::default();
        let keepalive = |i: u64| {
            let stats = model::NodeStats { load_milli: i, ..Default::default() };
            let cmd = Command::Keepalive { name: "c1".into(), stats, node_id: None };
            Request { id: format!("k{i}"), time_ms: 1000 + i, ops: vec![Op::from(cmd)] }
        };
        let apply = |i: u64, req: Request| apply_with_delta(&writer, i, req);
        writer.update(|sm| sm.changes = ChangeRing::starting_at(1));
        apply(1, request(1));
        apply(2, keepalive(2));
        apply(3, request(3));
        let ask = |me: u64| serve(&view, Some(1), Duration::from_millis(10), &answers, Want::Deltas { me: Some(me) });
        let decode = |r: Result<RpcReply, RpcError>| {
            let Ok(RpcReply::Encoded(b)) = r else { panic!("encoded") };
            let read: Result<RpcReply, RpcError> = crate::wire::decode(&b).expect("a frame body");
            (b, read)
        };
        let (h2a, read) = decode(ask(2).await);
        let (h2b, _) = decode(ask(2).await);
        assert!(!Arc::ptr_eq(&h2a, &h2b), "a keepalive among them: encoded per session");
        let Ok(RpcReply::Steps(steps)) = read else { panic!("steps: {read:?}") };
        assert_eq!(steps.iter().map(|s| s.log_id.index).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(steps[1].delta.as_ref().is_some_and(|d| d.nodes.is_empty()), "c1's figures left out for h2");
        let (_, own) = decode(ask(1).await);
        let Ok(RpcReply::Steps(own)) = own else { panic!("steps") };
        assert_eq!(own[1].delta.as_ref().map(|d| d.nodes.len()), Some(1), "c1 gets its own record");
        let shared = |from| serve(&view, Some(from), Duration::from_millis(10), &answers, Want::Deltas { me: Some(2) });
        let (Ok(RpcReply::Encoded(a)), Ok(RpcReply::Encoded(b))) = (shared(3).await, shared(3).await) else {
            panic!("encoded")
        };
        assert!(Arc::ptr_eq(&a, &b), "no keepalive among them: one answer for every session");
        let mut f = Follower::new();
        f.take(RpcReply::State {
            last_applied: None,
            state: herd_storage::sm::encode_state(&State::default()).expect("encode"),
        })
        .expect("empty whole state");
        assert_eq!(f.next(), Some(0));
        let mut all = vec![Step { log_id: id(0), delta: None }];
        all.extend(steps);
        assert_eq!(f.take(RpcReply::Steps(all)).expect("steps"), Taken::Changes(4));
        let leader = view.read().state.clone();
        assert_eq!(f.view().read().state.projected_for(2), leader.projected_for(2));
        assert_ne!(f.view().read().state.projected_for(1), leader.projected_for(1), "c1's figures never came");
    }

    /// A session answered changes a moment ago gets a change that does not concern it (a
    /// token) only once LINGER has passed since (on the next tick of the grid), one that does (its own keepalive) at once, and
    /// a backlog longer than MAX_HELD at once; a session never answered gets everything at once.
    #[tokio::test(start_paused = true)]
    async fn a_change_not_its_own_waits_out_the_linger() {
        let (view, writer) = StateView::standalone();
        let answers = Answers::default();
        let apply = |i: u64, req: Request| apply_with_delta(&writer, i, req);
        writer.update(|sm| sm.changes = ChangeRing::starting_at(1));
        apply(1, request(1));
        apply(2, request(2));
        let wait = Duration::from_secs(5);
        // Node `me` asks from `from` while `then` applies 10 ms later: how long the answer took
        // and the indexes it held.
        let ask_while = |me: u64, from: u64, then: Option<(u64, Request)>| {
            let (view, answers, apply) = (&view, &answers, &apply);
            async move {
                let t = tokio::time::Instant::now();
                let later = async {
                    if let Some((i, req)) = then {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        apply(i, req);
                    }
                };
                let (reply, ()) =
                    tokio::join!(serve(view, Some(from), wait, answers, Want::Deltas { me: Some(me) }), later);
                let Ok(RpcReply::Encoded(b)) = reply else { panic!("encoded") };
                let read: Result<RpcReply, RpcError> = crate::wire::decode(&b).expect("a frame body");
                let Ok(RpcReply::Steps(steps)) = read else { panic!("steps: {read:?}") };
                (t.elapsed(), steps.iter().map(Step::index).collect::<Vec<_>>())
            }
        };
        assert_eq!(ask_while(2, 1, None).await, (Duration::ZERO, vec![1, 2]), "never answered: at once");
        let (took, got) = ask_while(2, 3, Some((3, request(3)))).await;
        assert_eq!(got, vec![3], "a token, not h2's");
        assert!(took >= LINGER && took <= LINGER + serve::LINGER_GRID, "after the linger, on the grid: {took:?}");
        assert_eq!(ask_while(1, 3, None).await, (Duration::ZERO, vec![3]), "c1 never answered: at once");
        let keepalive = Request {
            id: "k4".into(),
            time_ms: 1004,
            ops: vec![Op::from(Command::Keepalive { name: "c1".into(), stats: Default::default(), node_id: None })],
        };
        let (took, got) = ask_while(1, 4, Some((4, keepalive))).await;
        assert_eq!((took, got), (Duration::from_millis(10), vec![4]), "c1's own keepalive: at once");
        // h2 still lingers, but a backlog of more than MAX_HELD entries goes at once.
        let held = serve::MAX_HELD;
        for i in 5..5 + held {
            apply(i, request(i));
        }
        let (took, got) = ask_while(2, 4, None).await;
        assert_eq!((took, got.len() as u64), (Duration::ZERO, held + 1), "a backlog: at once");
    }

    /// A follower whose kind of ask changes (a coordinator of a previous version answered)
    /// asks for a whole state, and takes none older than its copy.
    #[tokio::test]
    async fn a_change_of_kind_starts_from_a_whole_state_never_an_older_one() {
        let (view, _writer) = with_requests(3);
        let answers = Answers::default();
        let whole = |from| serve(&view, from, Duration::from_millis(10), &answers, Want::Deltas { me: Some(2) });
        let mut f = Follower::new();
        assert_eq!(f.asking_now(), Asks::Outlined);
        assert_eq!(f.take(whole(None).await.expect("whole")).expect("taken"), Taken::Whole);
        assert!(matches!(f.ask(Duration::ZERO), Rpc::Outlined { from: Some(4), .. }));
        assert_eq!(f.asking_now(), Asks::Outlined, "the same kind: on from where it stands");
        assert!(matches!(f.ask(Duration::ZERO), Rpc::Outlined { from: Some(4), .. }));
        f.older = Some((Asks::Deltas, tokio::time::Instant::now() + REQUESTS_FOR));
        assert_eq!(f.asking_now(), Asks::Deltas);
        assert!(matches!(f.ask(Duration::ZERO), Rpc::Follow { from: None, .. }), "another kind: a whole state");
        // A lagging coordinator's whole state, older than the copy, is not taken.
        let (old_view, _old_writer) = with_requests(1);
        let old = serve(&old_view, None, Duration::from_millis(10), &answers, Want::Deltas { me: Some(2) }).await;
        assert_eq!(f.take(old.expect("whole")).expect("answered"), Taken::Stale);
        assert!(matches!(f.ask(Duration::ZERO), Rpc::Follow { from: None, .. }), "still asks for a whole state");
        assert_eq!(f.take(whole(None).await.expect("whole")).expect("taken"), Taken::Whole);
        assert!(matches!(f.ask(Duration::ZERO), Rpc::Follow { from: Some(4), .. }), "then on from there");
    }

    /// With outlines, which VMs are a node's business goes by its name: a node whose record the
    /// member has not applied is refused (it asks again, or another), not sent outlines of all.
    #[tokio::test]
    async fn outlines_wait_for_the_askers_record() {
        let (view, _writer) = with_requests(1);
        let known = view.read().state.nodes.values().map(|n| n.id).next().expect("the first node");
        let answers = Answers::default();
        let ask = |me| serve(&view, None, Duration::from_millis(10), &answers, Want::Outlined { me });
        assert!(matches!(ask(known).await, Ok(RpcReply::State { .. })));
        assert!(matches!(ask(known + 40).await, Err(RpcError::Unavailable(_))), "no record of it here yet");
    }

    /// A coordinator of the previous version (it answers `Rpc::Follow` with `BadRequest`, as
    /// its decoder does, and serves requests): a follower falls back to requests and follows.
    #[tokio::test]
    async fn a_coordinator_of_the_previous_version_is_followed_through_requests() {
        use crate::server::Handler;
        use crate::wire::RequestFrame;
        struct Old(StateView, Answers);
        impl Handler for Old {
            fn admit(&self, _: crate::transport::Peer) -> Result<(), String> {
                Ok(())
            }
            fn member_host(&self, _: &str) -> bool {
                true
            }
            fn handle(
                &self,
                frame: RequestFrame,
                _: crate::transport::Peer,
            ) -> futures::future::BoxFuture<'_, Result<RpcReply, RpcError>> {
                Box::pin(async move {
                    match frame.body {
                        Rpc::Changes { from, .. } => {
                            serve(&self.0, from, Duration::from_millis(10), &self.1, Want::Requests).await
                        }
                        _ => Err(RpcError::BadRequest("unknown variant".into())),
                    }
                })
            }
        }
        let (view, writer) = with_requests(3);
        let listener =
            crate::transport::TcpListener::bind("127.0.0.1:0".parse().expect("an address")).await.expect("bind");
        let addr = crate::transport::Listener::local_addr(&listener).expect("its address");
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let old: Arc<dyn Handler> = Arc::new(Old(view.clone(), Answers::default()));
        let limits = crate::network::Limits::default();
        tokio::spawn(crate::server::serve(Arc::new(listener), old, limits.clone(), Arc::default(), stopped));
        let mut client = PeerClient::new(Arc::new(crate::transport::TcpConnector), addr, None, "c".into(), limits);
        let mut f = Follower::new();
        assert_eq!(f.poll(&mut client, Duration::ZERO).await.expect("the whole state"), Taken::Whole);
        assert!(matches!(f.ask(Duration::ZERO), Rpc::Changes { .. }), "requests from now on");
        assert_eq!(f.asks_now(), Asks::Requests, "outlines, then deltas, were refused");
        assert_eq!(f.view().read().state, view.read().state);
        writer.update(|sm| {
            model::apply(&mut sm.state, 4, &request(4));
            sm.changes.push(id(4), Some(request(4)), None);
            sm.last_applied = Some(id(4));
        });
        assert_eq!(f.poll(&mut client, Duration::from_millis(50)).await.expect("a change"), Taken::Changes(1));
        assert_eq!(f.view().read().state, view.read().state);
    }
}
