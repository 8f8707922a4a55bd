//! One authority per VM: copies running where a VM is not assigned.
//!
//! A node that finds a managed VM running on it while the VM is assigned elsewhere (and not
//! moving away from it) reports it (`ReportStray`) and never destroys it on its own. The
//! record keeps who saw it (`VmRecord::seen_on`), and while anyone did no node starts the VM.
//! Then, unless the cluster is in maintenance (drift is only reported):
//! - it runs in exactly one place — the stray node, its assigned node having reported it off —
//!   so it is adopted there: the record follows the VM (`vm-adopted`);
//! - it runs in two or more places: the VM goes to `fail` naming every node (`vm-split`),
//!   and nothing is destroyed: which copy is the right one is the operator's call.
//!
//! Its assigned node not having reported yet, it waits for that report.

use crate::apply::{push_event, At};
use crate::types::*;

/// `ReportStray`: `node` reports that VM `name`, assigned elsewhere, runs there (or no longer).
pub(crate) fn report_stray(
    state: &mut State,
    at: At<'_>,
    name: &str,
    node: &String,
    running: bool,
) -> Result<Reply, ApplyError> {
    let At { index, now, .. } = at;
    if !state.nodes.contains_key(node) {
        return Err(ApplyError::NoSuchNode(node.clone()));
    }
    let maintenance = state.meta.as_ref().is_some_and(|m| m.maintenance);
    let vm = state.vms.get_mut(name).ok_or_else(|| ApplyError::NoSuchVm(name.to_string()))?;
    // Its own node, or the node it is leaving: not a stray (a stale or racing report).
    if vm.node == *node || vm.migrating_from.as_deref() == Some(node.as_str()) {
        return Ok(Reply::Done);
    }
    let changed = if running { vm.seen_on.insert(node.clone()) } else { vm.seen_on.remove(node) };
    if !changed {
        return Ok(Reply::Done);
    }
    vm.revision = index;
    if running {
        let msg = format!("{name} runs on {node}, where it is not assigned (assigned to {})", vm.node);
        push_event(state, index, now, "vm-drift", Some(node), msg);
    }
    if !maintenance {
        resolve(state, index, now, name);
    }
    Ok(Reply::Done)
}

/// Adopts or fails VM `name` from what its record says of where it runs; see the module.
pub(crate) fn resolve(state: &mut State, index: u64, now: u64, name: &str) {
    let Some(vm) = state.vms.get_mut(name) else { return };
    if vm.seen_on.is_empty() {
        return;
    }
    let home_runs = matches!(vm.actual, ActualState::Running | ActualState::Paused);
    let home_off = matches!(vm.actual, ActualState::Shutoff | ActualState::Crashed | ActualState::Missing);
    let copies = vm.seen_on.len() + usize::from(home_runs);
    if copies >= 2 {
        if vm.state == VmState::Fail && vm.failure_reason.as_deref().is_some_and(|r| r.starts_with("running on ")) {
            return; // already split, already said
        }
        let mut nodes: Vec<String> = vm.seen_on.iter().cloned().collect();
        if home_runs {
            nodes.insert(0, vm.node.clone());
        }
        let where_ = nodes.join(" and ");
        vm.state = VmState::Fail;
        vm.failure_reason = Some(format!("running on {where_}: stop all but one copy, then start or move it"));
        vm.revision = index;
        let msg = format!("{name} runs on {where_} at once: failed, nothing destroyed");
        push_event(state, index, now, "vm-split", Some(&nodes[0]), msg);
    } else if home_off {
        let Some(there) = vm.seen_on.pop_first() else { return };
        let from = std::mem::replace(&mut vm.node, there.clone());
        if vm.last_node.as_deref() == Some(there.as_str()) {
            vm.last_node = None;
        }
        if vm.migrating_from.as_deref() == Some(there.as_str()) {
            vm.migrating_from = None;
        }
        vm.actual = ActualState::Running;
        vm.waiting = None;
        if !vm.state.wants_running() {
            vm.state = VmState::Start;
            vm.failure_reason = None;
        }
        vm.desired_at = index;
        vm.revision = index;
        let msg = format!("{name} runs on {there}, not on {from}: adopted there");
        push_event(state, index, now, "vm-adopted", Some(&there), msg);
    }
}

/// After maintenance ends: every VM with copies out of place is adopted or failed.
pub(crate) fn resolve_all(state: &mut State, index: u64, now: u64) {
    let names: Vec<String> = state.vms.iter().filter(|(_, v)| !v.seen_on.is_empty()).map(|(n, _)| n.clone()).collect();
    for name in names {
        resolve(state, index, now, &name);
    }
}
