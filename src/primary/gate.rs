//! The lease/duty gate, pure: given what Raft says now, take over, keep, or drop the duties.
//!
//! Rules:
//! - Hold duties only while this node leads and a quorum acknowledged it within 90 % of the
//!   lease (the 10 % absorbs clock-rate drift between nodes, see ARCHITECTURE.md).
//! - A newly elected leader waits `guard_ms` before taking over: the previous leader's lease
//!   has expired by the time a quorum voted (voters refuse votes inside a lease); the guard
//!   covers drift plus the configured `takeover_delay_ms`.
//! - A gap in this node's own execution longer than a third of the lease (SIGSTOP, a stalled
//!   runtime) drops the duties at once: the lease may have lapsed while nobody was looking.
//! - After handing the role over, do not take it back for a while (`suppress_until`).

/// Why duties are dropped when a quorum's acknowledgements grew too old.
pub const LEASE_LOST: &str = "leader lease not confirmed by a quorum";

/// Timing of the gate, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateParams {
    /// openraft's leader lease: `election_timeout_max`.
    pub lease_ms: u64,
    /// Wait after becoming leader before taking over.
    pub guard_ms: u64,
}

impl GateParams {
    pub fn new(lease_ms: u64, takeover_delay_ms: u64) -> Self {
        GateParams { lease_ms, guard_ms: lease_ms / 10 + 20 + takeover_delay_ms }
    }

    /// Duties are held only while the last quorum acknowledgement is younger than this.
    pub fn hold_ms(&self) -> u64 {
        self.lease_ms * 9 / 10
    }
}

/// What Raft says at `now_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub now_ms: u64,
    pub is_leader: bool,
    /// Age of the last quorum acknowledgement (`Some(0)` for a sole voter).
    pub quorum_ack_age_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not leading (or not yet allowed to act): nothing held.
    Idle,
    /// Start taking over the duties now.
    TakeOver,
    /// Keep holding them.
    Keep,
    /// Drop them at once.
    Drop(&'static str),
}

#[derive(Clone, Debug)]
pub struct Gate {
    params: GateParams,
    holding: bool,
    leader_since_ms: Option<u64>,
    last_step_ms: Option<u64>,
    suppress_until_ms: u64,
}

impl Gate {
    pub fn new(params: GateParams) -> Self {
        Gate { params, holding: false, leader_since_ms: None, last_step_ms: None, suppress_until_ms: 0 }
    }

    pub fn params(&self) -> GateParams {
        self.params
    }

    pub fn holding(&self) -> bool {
        self.holding
    }

    fn lease_valid(&self, o: &Observation) -> bool {
        o.is_leader && o.quorum_ack_age_ms.is_some_and(|a| a < self.params.hold_ms())
    }

    /// Decides for observation `o`.
    pub fn step(&mut self, o: Observation) -> Decision {
        let gap = self.last_step_ms.map(|t| o.now_ms.saturating_sub(t));
        self.last_step_ms = Some(o.now_ms);
        if !o.is_leader {
            self.leader_since_ms = None;
        } else if self.leader_since_ms.is_none() {
            self.leader_since_ms = Some(o.now_ms);
        }
        if self.holding && crate::breakage::is(crate::breakage::Breakage::PrimaryIgnoresLease) {
            return Decision::Keep;
        }
        if self.holding {
            if gap.is_some_and(|g| g > self.params.lease_ms / 3) {
                self.holding = false;
                return Decision::Drop("this process was paused longer than a third of the lease");
            }
            if !o.is_leader {
                self.holding = false;
                return Decision::Drop("no longer the leader");
            }
            if !self.lease_valid(&o) {
                self.holding = false;
                return Decision::Drop(LEASE_LOST);
            }
            return Decision::Keep;
        }
        let leading_for = self.leader_since_ms.map(|t| o.now_ms.saturating_sub(t));
        if o.now_ms < self.suppress_until_ms
            || leading_for.is_none_or(|d| d < self.params.guard_ms)
            || !self.lease_valid(&o)
        {
            return Decision::Idle;
        }
        self.holding = true;
        Decision::TakeOver
    }

    /// Between the steps of a takeover: still holding, and is the lease still valid? (No pause
    /// bookkeeping: only the guard's own ticks measure pauses.)
    pub fn confirm(&self, o: Observation) -> bool {
        self.holding && self.lease_valid(&o)
    }

    /// Gives the duties up now (a hand-over, a notification naming another primary); returns
    /// whether they were held.
    pub fn force_release(&mut self) -> bool {
        std::mem::replace(&mut self.holding, false)
    }

    /// The duties were given up outside `step` (a failed takeover, a hand-over).
    pub fn released(&mut self) {
        self.holding = false;
    }

    /// Do not take over before `until_ms` (after handing the role to another node).
    pub fn suppress_until(&mut self, until_ms: u64) {
        self.suppress_until_ms = until_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: GateParams = GateParams { lease_ms: 300, guard_ms: 50 };

    fn leader(now_ms: u64, ack: u64) -> Observation {
        Observation { now_ms, is_leader: true, quorum_ack_age_ms: Some(ack) }
    }

    fn follower(now_ms: u64) -> Observation {
        Observation { now_ms, is_leader: false, quorum_ack_age_ms: None }
    }

    #[test]
    fn the_default_guard_covers_drift_and_the_delay() {
        assert_eq!(GateParams::new(300, 0), GateParams { lease_ms: 300, guard_ms: 50 });
        assert_eq!(GateParams::new(300, 1000).guard_ms, 1050);
        assert_eq!(P.hold_ms(), 270);
    }

    #[test]
    fn a_new_leader_waits_the_guard_and_a_quorum_ack() {
        let mut g = Gate::new(P);
        assert_eq!(g.step(follower(0)), Decision::Idle);
        // Elected at 100, but no quorum ack yet (a fresh openraft leader has none).
        assert_eq!(g.step(Observation { now_ms: 100, is_leader: true, quorum_ack_age_ms: None }), Decision::Idle);
        assert_eq!(g.step(leader(120, 5)), Decision::Idle, "inside the guard");
        assert_eq!(g.step(leader(149, 5)), Decision::Idle, "inside the guard");
        assert_eq!(g.step(leader(150, 5)), Decision::TakeOver);
        assert!(g.holding());
        assert_eq!(g.step(leader(170, 20)), Decision::Keep);
    }

    #[test]
    fn duties_drop_as_soon_as_the_lease_is_not_confirmed() {
        let mut g = Gate::new(P);
        g.step(leader(0, 0));
        assert_eq!(g.step(leader(60, 10)), Decision::TakeOver);
        assert_eq!(g.step(leader(80, 269)), Decision::Keep);
        assert!(matches!(g.step(leader(100, 270)), Decision::Drop(_)), "at 90 % of the lease");
        assert!(!g.holding());
        // Still leader with a stale lease: no takeover until a quorum acknowledges again.
        assert_eq!(g.step(leader(120, 300)), Decision::Idle);
        assert_eq!(g.step(leader(140, 5)), Decision::TakeOver);
    }

    #[test]
    fn losing_leadership_drops_duties() {
        let mut g = Gate::new(P);
        g.step(leader(0, 0));
        g.step(leader(60, 0));
        assert!(matches!(g.step(follower(80)), Decision::Drop(_)));
        assert_eq!(g.step(leader(100, 0)), Decision::Idle, "a new leadership restarts the guard");
        assert_eq!(g.step(leader(150, 0)), Decision::TakeOver);
    }

    #[test]
    fn a_pause_longer_than_a_third_of_the_lease_drops_duties_first() {
        let mut g = Gate::new(P);
        g.step(leader(0, 0));
        assert_eq!(g.step(leader(60, 0)), Decision::TakeOver);
        // SIGSTOP for 3 s; on resume the metrics may not have caught up yet: drop anyway.
        assert!(matches!(g.step(leader(3060, 0)), Decision::Drop(_)));
    }

    #[test]
    fn a_long_takeover_step_is_not_a_pause_but_a_lost_lease_stops_it() {
        let mut g = Gate::new(P);
        g.step(leader(0, 0));
        assert_eq!(g.step(leader(60, 0)), Decision::TakeOver);
        // The guard ticks on while the takeover's steps run; a 500 ms step is no pause.
        for t in (80..=600).step_by(20) {
            assert_eq!(g.step(leader(t, 10)), Decision::Keep, "at {t}");
        }
        assert!(g.confirm(leader(600, 10)));
        assert!(!g.confirm(leader(700, 280)));
        assert!(g.force_release());
        assert!(!g.confirm(leader(710, 10)), "released: no more steps");
    }

    #[test]
    fn after_a_hand_over_the_role_is_not_taken_back_at_once() {
        let mut g = Gate::new(P);
        g.step(leader(0, 0));
        g.step(leader(60, 0));
        g.released();
        g.suppress_until(1000);
        assert_eq!(g.step(leader(100, 0)), Decision::Idle);
        assert_eq!(g.step(leader(999, 0)), Decision::Idle);
        assert_eq!(g.step(leader(1000, 0)), Decision::TakeOver);
    }
}
