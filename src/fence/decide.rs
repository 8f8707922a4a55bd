//! The fence decision, pure (DESIGN §6): given what the primary knows of a node now, fence it,
//! wait, or leave it alone. No IO, no clock: every time is an input.

use herd_storage::model::{DaemonState, NodeRecord};

use crate::heartbeat::verdict::{HostVerdict, Verdict};

use super::agent::Power;

/// What the primary knows, cluster-wide, at this instant.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// Leader wall-clock time (compared with `return_by_ms`, which the leader stamped).
    pub now_ms: u64,
    /// How long this node has held the primary duties.
    pub primary_for_ms: u64,
    /// MNFA is active on some network in some fresh view.
    pub mnfa: bool,
    pub maintenance: bool,
    /// Fences running now, and the bound.
    pub running: usize,
    pub max_parallel: usize,
    pub retry_after_ms: u64,
}

/// What the primary knows of one node.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub record: &'a NodeRecord,
    /// Whether it is this coordinator itself.
    pub is_self: bool,
    /// The heartbeat verdict (None: not a heartbeat target).
    pub verdict: Option<&'a HostVerdict>,
    /// Time since the node last acknowledged Raft traffic from this leader — for a client
    /// outside Raft, since any coordinator last heard its session — (since the leader started,
    /// if it never did).
    pub raft_silent_ms: u64,
    /// The last chassis power its BMC reported, if any.
    pub power: Option<Power>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Fence {
        reason: String,
    },
    /// It may come to a fence; not yet.
    Wait {
        why: String,
    },
    /// Nothing to do.
    Spare,
}

/// DESIGN §6: fence when the heartbeat verdict is `lost` for `fence_after_ms`, the node has not
/// answered Raft traffic in that time either, MNFA is off, maintenance is off and no fence of it
/// is running — or, even under MNFA, when its BMC reports the power off (a confirmed power-off
/// is proof, not suspicion). Never a node in `stop` before its deadline, nor in an orderly
/// `shutdown`; never before this primary has held the role for `fence_after_ms`.
pub fn decide(ctx: &Context, f: &Facts<'_>) -> Decision {
    assert!(ctx.max_parallel >= 1, "fence.max_parallel is validated to be at least 1");
    let d = decide_unchecked(ctx, f);
    if let Decision::Fence { reason } = &d {
        // The negative space, asserted: a fence is never decided against these (a bug here
        // powers a live host off; crash rather than act on it).
        let n = f.record;
        let after = n.fencing.as_ref().map_or(u64::MAX, |p| p.fence_after_ms);
        assert!(!f.is_self, "fence decided against this coordinator itself: {reason}");
        assert!(n.fence.pending.is_none(), "fence decided while one is pending: {reason}");
        assert!(!ctx.maintenance, "fence decided in maintenance: {reason}");
        assert!(f.raft_silent_ms >= after, "fence decided against a node heard on Raft: {reason}");
        assert!(ctx.primary_for_ms >= after, "fence decided by a new primary: {reason}");
        assert!(ctx.running < ctx.max_parallel, "fence decided beyond max_parallel: {reason}");
    }
    d
}

fn decide_unchecked(ctx: &Context, f: &Facts<'_>) -> Decision {
    let n = f.record;
    let wait = |why: &str| Decision::Wait { why: why.to_string() };
    let Some(policy) = &n.fencing else { return Decision::Spare };
    if f.is_self || n.fence.pending.is_some() {
        return Decision::Spare;
    }
    match n.daemon_state {
        DaemonState::Fenced | DaemonState::Shutdown => return Decision::Spare,
        DaemonState::Stop if n.return_by_ms.is_some_and(|by| ctx.now_ms < by) => return Decision::Spare,
        _ => {}
    }
    if ctx.maintenance {
        return Decision::Spare;
    }
    let after = policy.fence_after_ms;
    if f.raft_silent_ms < after {
        // A node that still talks Raft (or, outside Raft, polls on its session) is alive,
        // whatever the heartbeat says.
        return Decision::Spare;
    }
    if ctx.primary_for_ms < after {
        return wait("this coordinator has just become primary (no Raft-contact history yet)");
    }
    if n.fence.failed_ms.is_some_and(|t| ctx.now_ms.saturating_sub(t) < ctx.retry_after_ms) {
        return wait("its last fence failed; retrying later");
    }
    if ctx.running >= ctx.max_parallel {
        return wait("too many fences running");
    }
    if f.power == Some(Power::Off) {
        return Decision::Fence {
            reason: format!(
                "its BMC reports the power off and it has not answered Raft (nor its session) for {} ms",
                f.raft_silent_ms
            ),
        };
    }
    if ctx.mnfa {
        return wait("MNFA is active: no fence on suspicion");
    }
    match f.verdict {
        Some(v) if v.verdict == Verdict::Lost && v.lost_for_ms >= after => Decision::Fence {
            reason: format!(
                "lost on every network for {} ms ({}) and silent on Raft (and its session) for {} ms",
                v.lost_for_ms, v.reason, f.raft_silent_ms
            ),
        },
        Some(v) if v.verdict == Verdict::Lost => wait("lost, not yet for fence_after_ms"),
        _ => Decision::Spare,
    }
}

/// How long until a node the heartbeat holds lost has been lost, and silent on Raft (or its
/// session), for its `fence_after_ms` — the moment [`decide`] may turn from waiting to fencing,
/// so the primary looks again then rather than at its next tick. `None` for a node that is not
/// lost, has no fence policy, has a fence pending or is due already (whatever keeps its fence
/// waiting then — MNFA, the parallel bound — is not a matter of milliseconds).
pub fn due_in_ms(f: &Facts<'_>) -> Option<u64> {
    let after = f.record.fencing.as_ref()?.fence_after_ms;
    let v = f.verdict.filter(|v| v.verdict == Verdict::Lost)?;
    if f.record.fence.pending.is_some() {
        return None;
    }
    Some(after.saturating_sub(v.lost_for_ms).max(after.saturating_sub(f.raft_silent_ms))).filter(|ms| *ms > 0)
}

/// What the executor knows, just before the power-off, of a node's life since the decision it
/// executes: only evidence the node produced after that evidence of death counts.
#[derive(Clone, Debug, Default)]
pub struct SinceDecision {
    /// The victim is the primary executing the fence, running (a decision inherited from a
    /// primary that made it while this node was away).
    pub is_self: bool,
    /// A Raft response this leader received after it took office and after the decision
    /// (ms ago) — never a progress instant openraft sets at election.
    pub raft_heard_ago_ms: Option<u64>,
    /// Heartbeat evidence from after the decision: an answer to this coordinator's pulse, or
    /// another coordinator's view that hears it.
    pub heartbeat: Option<String>,
    pub mnfa: bool,
}

/// The saving throw, just before the power-off: a node heard since the decision is spared.
/// Under MNFA the heartbeat is no evidence (only a powered-off node is fenced then): Raft
/// decides.
pub fn heard_again(e: &SinceDecision) -> Option<String> {
    if e.is_self {
        return Some("it is this primary itself, running".into());
    }
    if let Some(ago) = e.raft_heard_ago_ms {
        return Some(format!("it answered Raft {ago} ms ago, after the decision"));
    }
    match &e.heartbeat {
        Some(why) if !e.mnfa => Some(format!("the heartbeat heard it after the decision: {why}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use herd_storage::model::*;

    use super::*;

    fn record(state: DaemonState) -> NodeRecord {
        NodeRecord {
            id: 2,
            name: "h1".into(),
            role: Role::Hypervisor,
            cluster_addr: "h1:1".into(),
            daemon_state: state,
            domain_state: DomainState::Ready,
            router_state: RouterState::Client,
            return_by_ms: None,
            stats: Default::default(),
            last_keepalive_ms: None,
            heartbeat: Default::default(),
            fencing: Some(FencePolicy::ipmi("b:623", "u", "p")),
            fence: Default::default(),
            health: None,
            joined_ms: 0,
            revision: 1,
        }
    }

    fn verdict(lost_for_ms: Option<u64>) -> HostVerdict {
        match lost_for_ms {
            Some(ms) => HostVerdict { verdict: Verdict::Lost, lost_for_ms: ms, reason: "r".into() },
            None => HostVerdict { verdict: Verdict::Alive, lost_for_ms: 0, reason: "r".into() },
        }
    }

    fn ctx() -> Context {
        Context {
            now_ms: 1_000_000,
            primary_for_ms: 60_000,
            mnfa: false,
            maintenance: false,
            running: 0,
            max_parallel: 4,
            retry_after_ms: 30_000,
        }
    }

    fn is_fence(d: &Decision) -> bool {
        matches!(d, Decision::Fence { .. })
    }

    /// The table: heartbeat verdict × Raft contact × MNFA × maintenance × a fence in progress ×
    /// daemon state × how long this node has been primary × power reading.
    #[test]
    fn decision_table() {
        struct Row {
            lost_for: Option<u64>,
            raft_silent: u64,
            mnfa: bool,
            maintenance: bool,
            pending: bool,
            state: DaemonState,
            primary_for: u64,
            power: Option<Power>,
            fence: bool,
        }
        let base = Row {
            lost_for: Some(2_000),
            raft_silent: 3_000,
            mnfa: false,
            maintenance: false,
            pending: false,
            state: DaemonState::Run,
            primary_for: 60_000,
            power: None,
            fence: true,
        };
        let rows = [
            Row { ..base },
            Row { lost_for: None, fence: false, ..base },
            Row { lost_for: Some(1_499), fence: false, ..base },
            Row { lost_for: Some(1_500), fence: true, ..base },
            Row { raft_silent: 1_000, fence: false, ..base },
            Row { mnfa: true, fence: false, ..base },
            Row { mnfa: true, power: Some(Power::Off), fence: true, ..base },
            Row { mnfa: true, power: Some(Power::On), fence: false, ..base },
            Row { mnfa: true, power: Some(Power::Off), raft_silent: 100, fence: false, ..base },
            Row { lost_for: None, power: Some(Power::Off), fence: true, ..base },
            Row { maintenance: true, fence: false, ..base },
            Row { maintenance: true, power: Some(Power::Off), fence: false, ..base },
            Row { pending: true, fence: false, ..base },
            Row { state: DaemonState::Fenced, fence: false, ..base },
            Row { state: DaemonState::Shutdown, fence: false, ..base },
            Row { state: DaemonState::Init, fence: true, ..base },
            Row { primary_for: 1_000, fence: false, ..base },
            Row { primary_for: 1_000, power: Some(Power::Off), fence: false, ..base },
        ];
        for (i, r) in rows.iter().enumerate() {
            let mut rec = record(r.state);
            if r.pending {
                rec.fence.pending = Some(PendingFence {
                    decided_ms: 1,
                    reason: "x".into(),
                    manual: false,
                    executing_ms: None,
                    executing_by: None,
                });
            }
            let v = verdict(r.lost_for);
            let c = Context { mnfa: r.mnfa, maintenance: r.maintenance, primary_for_ms: r.primary_for, ..ctx() };
            let f = Facts {
                record: &rec,
                is_self: false,
                verdict: Some(&v),
                raft_silent_ms: r.raft_silent,
                power: r.power,
            };
            let d = decide(&c, &f);
            assert_eq!(is_fence(&d), r.fence, "row {i}: {d:?}");
        }
    }

    #[test]
    fn stop_before_its_deadline_self_no_policy_retry_and_parallel_bound() {
        let v = verdict(Some(5_000));
        let check = |c: &Context, rec: &NodeRecord, is_self: bool| {
            decide(c, &Facts { record: rec, is_self, verdict: Some(&v), raft_silent_ms: 9_000, power: None })
        };
        let mut stop = record(DaemonState::Stop);
        stop.return_by_ms = Some(ctx().now_ms + 1);
        assert_eq!(check(&ctx(), &stop, false), Decision::Spare, "stop before return_by");
        stop.return_by_ms = Some(ctx().now_ms);
        assert!(is_fence(&check(&ctx(), &stop, false)), "stop past return_by");
        let run = record(DaemonState::Run);
        assert_eq!(check(&ctx(), &run, true), Decision::Spare);
        let mut none = record(DaemonState::Run);
        none.fencing = None;
        assert_eq!(check(&ctx(), &none, false), Decision::Spare);
        let mut failed = record(DaemonState::Run);
        failed.fence.failed_ms = Some(ctx().now_ms - 10_000);
        assert!(matches!(check(&ctx(), &failed, false), Decision::Wait { .. }));
        failed.fence.failed_ms = Some(ctx().now_ms - 30_000);
        assert!(is_fence(&check(&ctx(), &failed, false)));
        let busy = Context { running: 4, ..ctx() };
        assert!(matches!(check(&busy, &run, false), Decision::Wait { .. }));
    }

    /// The moment a lost node's fence falls due: the later of the two clocks reaching
    /// fence_after_ms (1 500 ms here); none for a node not lost, due already or with a fence
    /// pending.
    #[test]
    fn a_fence_falls_due_when_both_clocks_reach_fence_after() {
        let rec = record(DaemonState::Run);
        let due = |lost: Option<u64>, silent: u64| {
            let v = verdict(lost);
            due_in_ms(&Facts { record: &rec, is_self: false, verdict: Some(&v), raft_silent_ms: silent, power: None })
        };
        assert_eq!(due(Some(1_000), 2_000), Some(500), "the heartbeat's clock is the later");
        assert_eq!(due(Some(1_400), 1_200), Some(300), "Raft's silence is the later");
        assert_eq!(due(Some(1_499), 1_500), Some(1));
        assert_eq!(due(Some(1_500), 1_500), None, "due already: decide() says what now");
        assert_eq!(due(Some(9_000), 9_000), None);
        assert_eq!(due(None, 9_000), None, "alive");
        let mut pending = record(DaemonState::Run);
        pending.fence.pending = Some(PendingFence {
            decided_ms: 1,
            reason: "x".into(),
            manual: false,
            executing_ms: None,
            executing_by: None,
        });
        let v = verdict(Some(100));
        let f = Facts { record: &pending, is_self: false, verdict: Some(&v), raft_silent_ms: 100, power: None };
        assert_eq!(due_in_ms(&f), None, "its fence is already pending");
    }

    #[test]
    fn the_saving_throw() {
        let e = |raft: Option<u64>, hb: bool, mnfa: bool| SinceDecision {
            is_self: false,
            raft_heard_ago_ms: raft,
            heartbeat: hb.then(|| "it answered this coordinator's pulse sent 80 ms ago".to_string()),
            mnfa,
        };
        assert!(heard_again(&e(Some(200), false, false)).is_some(), "answered Raft after the decision");
        assert!(heard_again(&e(None, true, false)).is_some(), "heard by the heartbeat after the decision");
        assert!(heard_again(&e(None, true, true)).is_none(), "MNFA: the heartbeat is no evidence");
        assert!(heard_again(&e(Some(200), false, true)).is_some(), "MNFA: Raft still counts");
        assert!(heard_again(&e(None, false, false)).is_none(), "no evidence since the decision: fence");
        let itself = SinceDecision { is_self: true, mnfa: true, ..Default::default() };
        assert!(heard_again(&itself).is_some(), "a running primary never fences itself on an inherited decision");
    }
}
