//! At most one node performs primary duties at any instant: the floating address is up on at
//! most one machine.
//!
//! Why: the primary holds the floating addresses, runs the fence manager and decides
//! placement. Two at once means two hosts answering on one address and two fence managers
//! racing; PVC and Pacemaker users expect exactly the opposite. herd's gate (src/primary/
//! gate.rs) takes the duties only under a quorum-confirmed lease and drops them before the
//! lease can lapse, and a new leader waits out the old lease before taking over.
//!
//! Ground truth: what the duties did — the address seam (`SimAddresses`) records every add and
//! remove in the world — never herd's own flag. (Who holds the duties by herd's flag is still
//! tracked, for the fence invariant's "who decided" and the trace.)

use std::time::Duration;

use super::Violation;
use crate::world::World;

#[derive(Default)]
pub struct OnePrimary {
    holders: Vec<usize>,
    last: Option<usize>,
}

impl OnePrimary {
    pub fn check(&mut self, world: &World, now: Duration) -> Vec<Violation> {
        let holders: Vec<usize> = {
            let w = world.lock();
            (0..w.machines.len())
                .filter(|i| w.machines[*i].daemon.as_ref().is_some_and(|d| d.primary.holding()))
                .collect()
        };
        if holders != self.holders {
            let names: Vec<String> = holders.iter().map(|i| world.name(*i)).collect();
            world.trace(format!("primary: [{}]", names.join(", ")));
            if let Some(h) = holders.first() {
                self.last = Some(*h);
            }
            self.holders = holders.clone();
        }
        let up: Vec<usize> = world.lock().address_holders.iter().copied().collect();
        if up.len() > 1 {
            let names: Vec<String> = up.iter().map(|i| world.name(*i)).collect();
            return vec![Violation {
                invariant: "one-primary",
                at: now,
                detail: format!("the floating address is up on {} machines: {}", up.len(), names.join(", ")),
            }];
        }
        Vec::new()
    }

    /// The node that holds (or last held) the duties.
    pub fn last_holder(&self) -> Option<usize> {
        self.last
    }

    /// How many hold the duties now.
    pub fn holding(&self) -> usize {
        self.holders.len()
    }
}
