//! The recent committed requests in log order, for nodes that follow the replicated state
//! without being Raft members (hypervisors as clients, issue 22; `docs/design/
//! hypervisors-as-clients.md`): a bounded ring the state machine keeps beside the applied
//! state. A follower applies each request with the same pure `herd_model::apply`, so its state
//! is the leader's at that index; one further behind than the ring gets the whole state.
//!
//! Positions are "the next index wanted": a follower that applied everything up to index `i`
//! asks from `i + 1`; one with nothing asks for the whole state.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::Request;
use crate::types::LogId;

/// Most changes the ring holds.
pub const MAX_CHANGES: usize = 4096;
/// Most bytes (encoded) of requests the ring holds.
pub const MAX_CHANGE_BYTES: usize = 16 << 20;

/// One applied log entry: its log id and, for a normal entry, the request (blank and
/// membership entries carry none and only advance the index).
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

/// The ring: every applied index in `[start, next)`, oldest first.
#[derive(Clone, Debug, Default)]
pub struct ChangeRing {
    start: u64,
    next: u64,
    /// Each change with its encoded size.
    held: VecDeque<(Change, usize)>,
    bytes: usize,
}

/// What the ring can answer for a follower at `from`.
#[derive(Debug, PartialEq, Eq)]
pub enum Since {
    /// The changes from `from` on (empty when the follower is up to date or ahead), at most
    /// about `max_bytes` of them but always at least one.
    Changes(Vec<Change>),
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

    /// Records the entry applied at `log_id`. An index that does not follow the last one (a
    /// snapshot installed meanwhile) starts the ring afresh there: nothing older is served.
    pub fn push(&mut self, log_id: LogId, request: Option<Request>) {
        let index = log_id.index;
        #[cfg(feature = "breakage")]
        let request = if BROKEN.with(std::cell::Cell::get) && index.is_multiple_of(5) { None } else { request };
        if index != self.next {
            *self = ChangeRing::starting_at(index);
        }
        let size = request.as_ref().map_or(16, encoded_len);
        self.held.push_back((Change { log_id, request }, size));
        self.bytes += size;
        self.next = index + 1;
        while self.held.len() > MAX_CHANGES || (self.bytes > MAX_CHANGE_BYTES && self.held.len() > 1) {
            if let Some((c, s)) = self.held.pop_front() {
                self.bytes -= s;
                self.start = c.index() + 1;
            }
        }
    }

    /// The changes from `from` on, up to about `max_bytes` (at least one when there is one).
    pub fn since(&self, from: u64, max_bytes: usize) -> Since {
        if from < self.start {
            return Since::TooOld;
        }
        let skip = usize::try_from(from - self.start).unwrap_or(usize::MAX);
        let (mut out, mut bytes) = (Vec::new(), 0);
        for (c, s) in self.held.iter().skip(skip) {
            if !out.is_empty() && bytes + s > max_bytes {
                break;
            }
            bytes += s;
            out.push(c.clone());
        }
        Since::Changes(out)
    }
}

#[cfg(feature = "breakage")]
thread_local! {
    static BROKEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Test-only (the simulation's `herd::breakage`): every fifth change is held without its
/// request, so followers skip it (the simulation shows its follower invariant catches that).
#[cfg(feature = "breakage")]
pub fn break_changes(on: bool) {
    BROKEN.with(|b| b.set(on));
}

/// The size of `request` encoded (counted, not kept).
fn encoded_len(request: &Request) -> usize {
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
    match rmp_serde::encode::write(&mut c, request) {
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

    fn indexes(s: Since) -> Vec<u64> {
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
            r.push(id(i), if i == 7 { None } else { req(&format!("r{i}")) });
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
        r.push(id(0), None);
        r.push(id(1), req("a"));
        // A snapshot installed up to 9: the next applied index is 10.
        r.push(id(10), req("b"));
        assert_eq!(r.since(1, usize::MAX), Since::TooOld);
        assert_eq!(indexes(r.since(10, usize::MAX)), vec![10]);
        assert_eq!((r.start(), r.next()), (10, 11));
    }

    #[test]
    fn the_ring_is_bounded_by_count_and_bytes() {
        let mut r = ChangeRing::starting_at(0);
        for i in 0..(MAX_CHANGES as u64 + 10) {
            r.push(id(i), req("x"));
        }
        assert_eq!(r.start(), 10);
        assert_eq!(r.since(9, usize::MAX), Since::TooOld);
        let big = "y".repeat(MAX_CHANGE_BYTES / 3);
        let mut r = ChangeRing::starting_at(0);
        for i in 0..4 {
            r.push(id(i), req(&big));
        }
        assert!(r.bytes <= MAX_CHANGE_BYTES, "{} bytes held", r.bytes);
        assert_eq!((r.start(), r.next()), (2, 4));
        // A budget of one request's size gives one at a time.
        assert_eq!(indexes(r.since(2, big.len() + 64)), vec![2]);
    }
}
