//! After the faults stop, the cluster converges within 30 s of simulated time: one primary,
//! every VM in its desired state on exactly one live node, and the follower outside Raft
//! caught up with the primary's state.
//!
//! Why: safety alone is easy (do nothing). HA means the VMs come back: once the network is
//! whole, BMCs answer and the operator has readied fenced nodes, every VM that should run runs
//! on the node the cluster assigned it, and nothing runs that should not.

use herd_storage::model::ActualState;

use super::no_double_run::runners;
use crate::world::World;

/// `Ok` when converged; else what is still off.
pub fn converged(world: &World, primaries: usize) -> Result<(), String> {
    if primaries != 1 {
        return Err(format!("{primaries} primaries"));
    }
    let vms = {
        let w = world.lock();
        if let Some(m) = w.machines.iter().find(|m| m.powered && m.daemon.is_none()) {
            return Err(format!("{} is powered but its daemon is not running", m.name));
        }
        let holder = w.machines.iter().filter_map(|m| m.daemon.as_ref()).find(|d| d.primary.holding());
        let Some(member) = holder.and_then(|d| d.node.member()) else {
            return Err("no primary state".into());
        };
        let g = member.view.read();
        // The follower outside Raft has caught up with the primary.
        if let Some((view, _)) = &w.follower {
            let (mine, primary) = (view.read().last_applied.map(|l| l.index), g.last_applied.map(|l| l.index));
            if mine < primary {
                return Err(format!("the follower outside Raft is at index {mine:?}, the primary at {primary:?}"));
            }
        }
        g.state.vms.clone()
    };
    let running = runners(world);
    for (name, vm) in &vms {
        let on: Vec<String> = running.get(name).map(|v| v.iter().map(|i| world.name(*i)).collect()).unwrap_or_default();
        if vm.state.wants_running() {
            if on != [vm.node.clone()] || vm.migrating_from.is_some() || vm.actual != ActualState::Running {
                return Err(format!("{name} ({:?} on {}) runs on {on:?}", vm.state, vm.node));
            }
        } else if !on.is_empty() {
            return Err(format!("{name} ({:?}) still runs on {on:?}", vm.state));
        }
    }
    Ok(())
}
