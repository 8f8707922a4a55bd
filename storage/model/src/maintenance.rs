//! Maintenance: while `cluster maintenance on`, herd takes no automatic action on VMs.
//!
//! A reconciler leaves a VM as it finds it ([`left_alone`]) unless an operator (or a
//! placement an operator's command caused: a manual fence's recovery, a flush) changed what
//! it should be or where since maintenance began (`VmRecord::desired_at`), or a command is
//! still being carried out (a move, restart or graceful shutdown in flight completes). What
//! it finds is still reported; a report that shows a VM left alone out of its desired state
//! is recorded as a `vm-drift` event, once per change. Strays are only reported too
//! (`stray.rs`), VMs waiting for a node are not placed (`fence::place_waiting`); when
//! maintenance ends, strays are resolved, waiting VMs placed, and reconcilers act on the
//! state of record again.

use crate::apply::push_event;
use crate::types::*;

/// Whether reconcilers must leave VM `vm` as it is: the cluster is in maintenance, nothing
/// changed what it should be since maintenance began, and no command on it is in flight.
pub fn left_alone(meta: Option<&ClusterMeta>, vm: &VmRecord) -> bool {
    let Some(meta) = meta.filter(|m| m.maintenance) else { return false };
    let in_flight = vm.migrating_from.is_some()
        || matches!(
            vm.state,
            VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate | VmState::Restart | VmState::Shutdown
        );
    vm.desired_at <= meta.maintenance_at && !in_flight
}

/// After a report of VM `name`: in maintenance, a VM left alone whose reported state is not
/// the one it should have is recorded as drift (the report itself comes once per change).
pub(crate) fn note_drift(state: &mut State, index: u64, now: u64, name: &str) {
    let Some(vm) = state.vms.get(name) else { return };
    if !left_alone(state.meta.as_ref(), vm) {
        return;
    }
    let runs = matches!(vm.actual, ActualState::Running | ActualState::Paused);
    let off = matches!(vm.actual, ActualState::Shutoff | ActualState::Crashed | ActualState::Missing);
    let drifted = match vm.state {
        VmState::Start => off,
        VmState::Stop | VmState::Disable => runs,
        _ => false,
    };
    if drifted {
        let (node, actual, desired) = (vm.node.clone(), vm.actual, vm.state);
        let msg = format!("{name} on {node} is {actual}, should be {desired}: left as it is (maintenance)");
        push_event(state, index, now, "vm-drift", Some(&node), msg);
    }
}
