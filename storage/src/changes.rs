//! The recent committed changes in log order, for nodes that follow the replicated state
//! without being Raft members (hypervisors as clients, issue 22; `docs/design/
//! hypervisors-as-clients.md`): a bounded ring the state machine keeps beside the applied
//! state. Each applied entry is held twice over: its request, which a follower of the previous
//! version applies with the same pure `herd_model::apply` (`Rpc::Changes`), and its
//! [`Delta`] — the records it changed —, which a follower takes as they are and, as a node,
//! without the statistics of other nodes (`Rpc::Follow`). One further behind than the ring
//! gets the whole state.
//!
//! Positions are "the next index wanted": a follower that applied everything up to index `i`
//! asks from `i + 1`; one with nothing asks for the whole state.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::{Delta, Reader, Request};
use crate::types::LogId;

/// Most changes the ring holds.
pub const MAX_CHANGES: usize = 4096;
/// Most bytes (encoded) of requests and deltas the ring holds.
pub const MAX_CHANGE_BYTES: usize = 16 << 20;

/// One applied log entry: its log id and, for a normal entry, the request (blank and
/// membership entries carry none and only advance the index). What `Rpc::Changes` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub log_id: LogId,
    pub request: Option<Request>,
}

impl Change {
    pub fn index(&self) -> u64 {
        self.log_id.index
    }
}

/// One applied log entry as the records it changed (`None`: a blank or membership entry,
/// which only advances the index). What `Rpc::Follow` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub log_id: LogId,
    pub delta: Option<Delta>,
}

impl Step {
    pub fn index(&self) -> u64 {
        self.log_id.index
    }
}

/// One entry held: both forms, with their encoded sizes.
#[derive(Clone, Debug)]
struct Entry {
    log_id: LogId,
    request: Option<Request>,
    delta: Option<Delta>,
    request_size: usize,
    delta_size: usize,
}

/// The ring: every applied index in `[start, next)`, oldest first.
#[derive(Clone, Debug, Default)]
pub struct ChangeRing {
    start: u64,
    next: u64,
    held: VecDeque<Entry>,
    bytes: usize,
}

/// What the ring can answer for a follower at `from`.
#[derive(Debug, PartialEq, Eq)]
pub enum Since<T> {
    /// The changes from `from` on (empty when the follower is up to date or ahead), at most
    /// about `max_bytes` of them but always at least one.
    Changes(Vec<T>),
    /// `from` is older than the oldest change held: the follower needs the whole state.
    TooOld,
}

impl ChangeRing {
    /// An empty ring whose next change is `next` (one past the applied state it starts beside).
    pub fn starting_at(next: u64) -> ChangeRing {
        ChangeRing { start: next, next, held: VecDeque::new(), bytes: 0 }
    }

    /// One past the last index applied.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The oldest index held (`next` when empty).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Records the entry applied at `log_id`: its request and the delta it made. An index that
    /// does not follow the last one (a snapshot installed meanwhile) starts the ring afresh
    /// there: nothing older is served.
    pub fn push(&mut self, log_id: LogId, request: Option<Request>, delta: Option<Delta>) {
        let index = log_id.index;
        #[cfg(feature = "breakage")]
        let (request, delta) =
            if BROKEN.with(std::cell::Cell::get) && index.is_multiple_of(5) { (None, None) } else { (request, delta) };
        if index != self.next {
            *self = ChangeRing::starting_at(index);
        }
        let request_size = request.as_ref().map_or(16, encoded_len);
        let delta_size = delta.as_ref().map_or(16, encoded_len);
        self.held.push_back(Entry { log_id, request, delta, request_size, delta_size });
        self.bytes += request_size + delta_size;
        self.next = index + 1;
        while self.held.len() > MAX_CHANGES || (self.bytes > MAX_CHANGE_BYTES && self.held.len() > 1) {
            if let Some(e) = self.held.pop_front() {
                self.bytes -= e.request_size + e.delta_size;
                self.start = e.log_id.index + 1;
            }
        }
    }

    /// The changes (requests) from `from` on, up to about `max_bytes` (at least one when there
    /// is one).
    pub fn since(&self, from: u64, max_bytes: usize) -> Since<Change> {
        self.collect(from, max_bytes, |e| (Change { log_id: e.log_id, request: e.request.clone() }, e.request_size))
    }

    /// The steps (deltas) from `from` on, up to about `max_bytes` (at least one when there is
    /// one); for node id `me`, as it follows them ([`Delta::for_node`]; `None`: every record).
    pub fn steps_since(&self, from: u64, max_bytes: usize, reader: Reader<'_>) -> Since<Step> {
        self.collect(from, max_bytes, |e| {
            let delta = e.delta.as_ref().map(|d| d.kept_for(reader));
            #[cfg(feature = "breakage")]
            let delta = delta.map(|mut d| {
                if BROKEN_OUTLINES.with(std::cell::Cell::get) {
                    d.vms.retain(|v| !v.is_outline());
                }
                d
            });
            (Step { log_id: e.log_id, delta }, e.delta_size)
        })
    }

    /// Whether node `me` (named `name`) follows the steps from `from` on with outlines
    /// otherwise than a node they do not concern ([`Delta::outlined_differs_for`]): if not, one
    /// answer serves it and every such node.
    pub fn outlined_steps_differ_for(&self, from: u64, me: crate::model::NodeId, name: Option<&str>) -> bool {
        self.deltas_since(from).is_none_or(|mut d| d.any(|d| d.outlined_differs_for(me, name)))
    }

    /// Whether the steps from `from` on are the same for every node (none is a request of
    /// keepalives naming some node): one answer serves every session asking them.
    pub fn steps_same_for_all(&self, from: u64) -> bool {
        let skip = usize::try_from(from.saturating_sub(self.start)).unwrap_or(usize::MAX);
        self.held.iter().skip(skip).all(|e| e.delta.as_ref().is_none_or(Delta::same_for_all))
    }

    /// The deltas of the entries from `from` on, without copies (`None`: `from` is older than
    /// the ring; blank and membership entries have none).
    pub fn deltas_since(&self, from: u64) -> Option<impl Iterator<Item = &Delta>> {
        let skip = usize::try_from(from.checked_sub(self.start)?).unwrap_or(usize::MAX);
        Some(self.held.iter().skip(skip).filter_map(|e| e.delta.as_ref()))
    }

    fn collect<T>(&self, from: u64, max_bytes: usize, each: impl Fn(&Entry) -> (T, usize)) -> Since<T> {
        if from < self.start {
            return Since::TooOld;
        }
        let skip = usize::try_from(from - self.start).unwrap_or(usize::MAX);
        let (mut out, mut bytes) = (Vec::new(), 0);
        for e in self.held.iter().skip(skip) {
            let (item, size) = each(e);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            out.push(item);
        }
        Since::Changes(out)
    }
}

#[cfg(feature = "breakage")]
thread_local! {
    static BROKEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Test-only (the simulation's `herd::breakage`): every fifth change is held without its
/// request or delta, so followers skip it (the simulation shows its follower invariant catches that).
#[cfg(feature = "breakage")]
pub fn break_changes(on: bool) {
    BROKEN.with(|b| b.set(on));
}

#[cfg(feature = "breakage")]
thread_local! {
    static BROKEN_OUTLINES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Test-only (the simulation's `herd::breakage`): outlines of other nodes' VMs are never
/// sent, so clients keep stale ones (the simulation shows its follower invariant catches that).
#[cfg(feature = "breakage")]
pub fn break_outlines(on: bool) {
    BROKEN_OUTLINES.with(|b| b.set(on));
}

/// The size of `value` encoded (counted, not kept).
fn encoded_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Encoding into a counter cannot fail for these plain types; a failure counts as large.
    match rmp_serde::encode::write(&mut c, value) {
        Ok(()) => c.0,
        Err(_) => MAX_CHANGE_BYTES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u64) -> LogId {
        openraft::testing::log_id::<crate::types::TypeConfig>(1, 1, index)
    }

    fn req(id: &str) -> Option<Request> {
        Some(Request { id: id.into(), time_ms: 1, ops: vec![] })
    }

    fn indexes(s: Since<Change>) -> Vec<u64> {
        match s {
            Since::Changes(c) => c.iter().map(Change::index).collect(),
            Since::TooOld => panic!("too old"),
        }
    }

    #[test]
    fn serves_what_it_holds_and_says_when_a_follower_is_too_far_behind() {
        let mut r = ChangeRing::starting_at(5);
        assert_eq!(r.since(5, usize::MAX), Since::Changes(vec![]));
        assert_eq!(r.since(4, usize::MAX), Since::TooOld);
        for i in 5..10 {
            r.push(id(i), if i == 7 { None } else { req(&format!("r{i}")) }, None);
        }
        assert_eq!(indexes(r.since(5, usize::MAX)), vec![5, 6, 7, 8, 9]);
        assert_eq!(indexes(r.since(8, usize::MAX)), vec![8, 9]);
        // Ahead of the ring (this coordinator lags the follower): nothing yet.
        assert_eq!(indexes(r.since(12, usize::MAX)), Vec::<u64>::new());
        // At least one change however small the budget.
        assert_eq!(indexes(r.since(5, 1)), vec![5]);
    }

    #[test]
    fn a_gap_starts_the_ring_afresh() {
        let mut r = ChangeRing::starting_at(0);
        r.push(id(0), None, None);
        r.push(id(1), req("a"), None);
        // A snapshot installed up to 9: the next applied index is 10.
        r.push(id(10), req("b"), None);
        assert_eq!(r.since(1, usize::MAX), Since::TooOld);
        assert_eq!(indexes(r.since(10, usize::MAX)), vec![10]);
        assert_eq!((r.start(), r.next()), (10, 11));
    }

    #[test]
    fn the_ring_is_bounded_by_count_and_bytes() {
        let mut r = ChangeRing::starting_at(0);
        for i in 0..(MAX_CHANGES as u64 + 10) {
            r.push(id(i), req("x"), None);
        }
        assert_eq!(r.start(), 10);
        assert_eq!(r.since(9, usize::MAX), Since::TooOld);
        let big = "y".repeat(MAX_CHANGE_BYTES / 3);
        let mut r = ChangeRing::starting_at(0);
        for i in 0..4 {
            r.push(id(i), req(&big), None);
        }
        assert!(r.bytes <= MAX_CHANGE_BYTES, "{} bytes held", r.bytes);
        assert_eq!((r.start(), r.next()), (2, 4));
        // A budget of one request's size gives one at a time.
        assert_eq!(indexes(r.since(2, big.len() + 64)), vec![2]);
    }

    /// Steps carry deltas; a request of keepalives reaches a node as its own record only, and
    /// steps that hold one are not the same for every session.
    #[test]
    fn steps_are_deltas_filtered_for_the_node_asking() {
        use crate::model::{apply, Command, Delta, NewNode, Op, Role, State};
        let mut state = State::default();
        let init = Command::InitCluster {
            cluster_id: "c".into(),
            token_hash: "0".repeat(64),
            node: NewNode { name: "c1".into(), role: Role::Coordinator, cluster_addr: "c1:7400".into() },
        };
        let before = state.clone();
        let r1 = Request { id: "r1".into(), time_ms: 5, ops: vec![Op::from(init)] };
        apply(&mut state, 1, &r1);
        let d1 = Delta::between(&before, &state, 1);
        let stats = crate::model::NodeStats { cpu_count: 8, ..Default::default() };
        let ka = Command::Keepalive { name: "c1".into(), stats, node_id: None };
        let r2 = Request { id: "r2".into(), time_ms: 6, ops: vec![Op::from(ka)] };
        apply(&mut state, 2, &r2);
        let d2 = Delta::of_keepalives(&state, Delta::keepalives(&r2).expect("keepalives only"));
        let mut r = ChangeRing::starting_at(1);
        r.push(id(1), Some(r1), Some(d1.clone()));
        r.push(id(2), Some(r2), Some(d2.clone()));
        let steps = |me| match r.steps_since(1, usize::MAX, me) {
            Since::Changes(s) => s.into_iter().map(|s| s.delta.expect("a delta")).collect::<Vec<_>>(),
            Since::TooOld => panic!("too old"),
        };
        assert_eq!(steps(Reader::All), vec![d1.clone(), d2.clone()], "no node: everything");
        assert_eq!(steps(Reader::Node(1)), vec![d1.clone(), d2.clone()], "c1 (id 1): its own keepalive");
        let other = steps(Reader::Node(2));
        assert_eq!(other[0], d1);
        assert!(
            other[1].nodes.is_empty() && other[1].stats_only,
            "another node's figures are left out: {:?}",
            other[1]
        );
        assert!(!r.steps_same_for_all(1) && r.steps_same_for_all(3));
        let mut follower = State::default();
        for d in other {
            d.apply_to(&mut follower);
        }
        assert_eq!(follower.projected_for(2), state.projected_for(2));
        assert_ne!(follower.projected_for(1), state.projected_for(1), "c1's figures were not sent to node 2");
    }
}
