//! A small Wing–Gong–Lowe linearizability checker for one read/write register.
//!
//! An operation has a call time and, if it completed, a return time. A write that failed or
//! timed out may still have taken effect: it has no return and may be linearized anywhere
//! after its call, or never. A history is linearizable when some order of the operations
//! (every completed one, and any subset of the pending ones) respects real time — an operation
//! that returned before another was called comes first — and every read returns the value of
//! the latest write before it.
//!
//! Search: depth-first over "which operation takes effect next", memoised on (set of
//! operations done, register value). Histories here are a few dozen operations per register.

use std::collections::BTreeSet;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Write(u64),
    /// The value read (`None`: the register held something unparseable).
    Read(Option<u64>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub call: Duration,
    /// `None`: no answer (pending: may or may not have taken effect).
    pub ret: Option<Duration>,
    pub kind: OpKind,
}

/// Upper bound on operations per register the checker accepts.
pub const MAX_OPS: usize = 128;

/// Whether `ops` on a register starting at `initial` is linearizable. `Err` if too long.
pub fn check(initial: Option<u64>, ops: &[Op]) -> Result<bool, String> {
    if ops.len() > MAX_OPS {
        return Err(format!("{} operations: more than the checker takes ({MAX_OPS})", ops.len()));
    }
    let mut seen = BTreeSet::new();
    Ok(search(ops, &mut vec![false; ops.len()], initial, &mut seen))
}

fn search(ops: &[Op], done: &mut Vec<bool>, value: Option<u64>, seen: &mut BTreeSet<(Vec<bool>, Option<u64>)>) -> bool {
    // Finished once every completed operation has taken effect (pending ones may never).
    if ops.iter().zip(done.iter()).all(|(o, d)| *d || o.ret.is_none()) {
        return true;
    }
    if !seen.insert((done.clone(), value)) {
        return false;
    }
    // The next operation must have been called before every remaining completed one returned.
    let horizon = ops.iter().zip(done.iter()).filter(|(o, d)| !**d && o.ret.is_some()).filter_map(|(o, _)| o.ret).min();
    for k in 0..ops.len() {
        if done[k] || horizon.is_some_and(|h| ops[k].call > h) {
            continue;
        }
        let next = match ops[k].kind {
            OpKind::Write(v) => Some(v),
            OpKind::Read(r) if r == value => value,
            OpKind::Read(_) => continue,
        };
        done[k] = true;
        if search(ops, done, next, seen) {
            return true;
        }
        done[k] = false;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, kind: OpKind) -> Op {
        Op { call: Duration::from_millis(call), ret: ret.map(Duration::from_millis), kind }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [op(0, Some(1), OpKind::Write(1)), op(2, Some(3), OpKind::Read(Some(1)))];
        assert_eq!(check(Some(0), &h), Ok(true));
    }

    #[test]
    fn stale_read_after_a_completed_write_is_not() {
        let h = [op(0, Some(1), OpKind::Write(1)), op(2, Some(3), OpKind::Read(Some(0)))];
        assert_eq!(check(Some(0), &h), Ok(false));
    }

    #[test]
    fn concurrent_write_may_be_seen_or_not() {
        let w = op(0, Some(10), OpKind::Write(1));
        assert_eq!(check(Some(0), &[w, op(2, Some(3), OpKind::Read(Some(0)))]), Ok(true));
        assert_eq!(check(Some(0), &[w, op(2, Some(3), OpKind::Read(Some(1)))]), Ok(true));
    }

    #[test]
    fn reads_cannot_go_back_in_time() {
        // Two sequential reads during a long write: new value then old value is impossible.
        let h = [
            op(0, Some(100), OpKind::Write(1)),
            op(10, Some(20), OpKind::Read(Some(1))),
            op(30, Some(40), OpKind::Read(Some(0))),
        ];
        assert_eq!(check(Some(0), &h), Ok(false));
    }

    #[test]
    fn a_pending_write_may_take_effect_late_or_never() {
        let pending = op(0, None, OpKind::Write(7));
        assert_eq!(check(Some(0), &[pending, op(50, Some(60), OpKind::Read(Some(0)))]), Ok(true));
        assert_eq!(check(Some(0), &[pending, op(50, Some(60), OpKind::Read(Some(7)))]), Ok(true));
        // But not before it was called.
        let early = op(0, Some(5), OpKind::Read(Some(7)));
        assert_eq!(check(Some(0), &[early, op(10, None, OpKind::Write(7))]), Ok(false));
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let h =
            [op(0, Some(1), OpKind::Write(1)), op(2, Some(3), OpKind::Write(2)), op(4, Some(5), OpKind::Read(Some(1)))];
        assert_eq!(check(Some(0), &h), Ok(false));
    }
}
