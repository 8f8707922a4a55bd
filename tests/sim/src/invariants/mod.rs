//! The properties every run must keep, each in its own module with why it must hold.
//!
//! Safety invariants are checked after every simulation step ([`Checker::step`]); liveness
//! (convergence) once the faults have stopped; the client history at the end. To add an
//! invariant: a module with a `check`, a field in [`Checker`], a call in `step` or `finish`,
//! and a broken variant in `herd::breakage` that the CI seed set catches (`tests/seeds.rs`).

pub mod acknowledged;
pub mod converge;
pub mod fence_authorised;
pub mod fence_justified;
pub mod follower;
pub mod no_double_run;
pub mod one_primary;
pub mod served_in_contact;

use std::time::Duration;

use crate::client::History;
use crate::world::World;

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub at: Duration,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] at {:.3} s: {}", self.invariant, self.at.as_secs_f64(), self.detail)
    }
}

#[derive(Default)]
pub struct Checker {
    pub one_primary: one_primary::OnePrimary,
    pub fence: fence_justified::FenceJustified,
    pub fence_token: fence_authorised::FenceAuthorised,
    pub follower: follower::FollowerAgrees,
    pub served: served_in_contact::ServedInContact,
}

impl Checker {
    /// The safety invariants, after one step.
    pub fn step(&mut self, world: &World, now: Duration) -> Vec<Violation> {
        let mut out = Vec::new();
        out.extend(self.one_primary.check(world, now));
        out.extend(no_double_run::check(world, now));
        out.extend(self.fence.check(world, now, self.one_primary.last_holder()));
        out.extend(self.fence_token.check(world, now));
        out.extend(self.follower.check(world, now));
        out.extend(self.served.check(world, now));
        out
    }

    /// The client's history, once the run is over.
    pub fn finish(&self, history: &History, now: Duration) -> Vec<Violation> {
        acknowledged::check(history, now)
    }
}
