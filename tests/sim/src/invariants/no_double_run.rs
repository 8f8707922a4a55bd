//! No VM runs on two hosts at once.
//!
//! Why: two copies of one VM write to the same disks and corrupt them; it is the failure HA
//! exists to prevent. herd starts a moving VM only after its old node released it, recovers
//! a failed node's VMs only after its BMC confirmed power off, and a node back from an absence
//! starts nothing until it has applied its own latest write. Checked on the ground truth: the
//! simulated hypervisors of the powered machines.

use std::collections::BTreeMap;
use std::time::Duration;

use herd_storage::model::ActualState;

use super::Violation;
use crate::world::World;

/// Which powered machines run each domain now.
pub fn runners(world: &World) -> BTreeMap<String, Vec<usize>> {
    let w = world.lock();
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, m) in w.machines.iter().enumerate().filter(|(_, m)| m.powered) {
        for d in m.hv.domains() {
            if matches!(d.state, ActualState::Running | ActualState::Paused) {
                out.entry(d.name).or_default().push(i);
            }
        }
    }
    out
}

pub fn check(world: &World, now: Duration) -> Vec<Violation> {
    runners(world)
        .into_iter()
        .filter(|(_, on)| on.len() > 1)
        .map(|(vm, on)| {
            let names: Vec<String> = on.iter().map(|i| world.name(*i)).collect();
            Violation { invariant: "no-double-run", at: now, detail: format!("{vm} runs on {}", names.join(" and ")) }
        })
        .collect()
}
