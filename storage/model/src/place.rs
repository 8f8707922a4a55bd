//! Placement: which node a VM goes to. Pure, like the rest of the model.

use crate::types::*;

/// Picks the node a VM goes to: candidates are nodes in `daemon_state run` and `domain_state
/// ready`, inside `limit` (when not empty), other than `exclude`; the best by `selector` wins
/// (keepalive figures corrected by the VMs of record), ties go to the smallest name.
pub fn place(state: &State, selector: Selector, limit: &[String], exclude: Option<&str>) -> Result<String, ApplyError> {
    let candidates: Vec<&NodeRecord> = state
        .nodes
        .values()
        .filter(|n| n.daemon_state == DaemonState::Run && n.domain_state == DomainState::Ready)
        .filter(|n| limit.is_empty() || limit.contains(&n.name))
        .filter(|n| Some(n.name.as_str()) != exclude)
        .collect();
    // Keepalive figures lag behind placements made since; the VMs of record do not. So the
    // assignments in the state count too: memory of VMs placed but not yet running is taken
    // from the free memory, and provisioned memory, vCPUs and VM counts come from the records.
    let score = |n: &NodeRecord| -> i128 {
        let s = &n.stats;
        let assigned = || state.vms.values().filter(|v| v.node == n.name);
        let pending: u64 = assigned()
            .filter(|v| v.actual != ActualState::Running && v.state.wants_running())
            .map(|v| v.spec.memory_mib)
            .sum();
        let provisioned: u64 = assigned().map(|v| v.spec.memory_mib).sum();
        let vcpus: u32 = assigned().filter(|v| v.state.wants_running()).map(|v| v.spec.vcpus).sum();
        let vms = assigned().filter(|v| v.state.wants_running()).count();
        match selector {
            Selector::Mem => i128::from(s.mem_total_mib) - i128::from(s.mem_used_mib) - i128::from(pending),
            Selector::Memprov => i128::from(s.mem_total_mib) - i128::from(s.mem_provisioned_mib.max(provisioned)),
            Selector::Load => -i128::from(s.load_milli),
            Selector::Vcpus => -i128::from(s.vcpus_allocated.max(vcpus)),
            Selector::Vms => -i128::from(s.vms_running.max(u32::try_from(vms).unwrap_or(u32::MAX))),
        }
    };
    // max_by keeps the last of equal elements: iterate names in reverse so ties go to the smallest.
    candidates.iter().rev().max_by_key(|n| score(n)).map(|n| n.name.clone()).ok_or_else(|| {
        let running: Vec<&str> = state
            .nodes
            .values()
            .filter(|n| n.daemon_state == DaemonState::Run && n.domain_state == DomainState::Ready)
            .map(|n| n.name.as_str())
            .collect();
        ApplyError::NoNodeFits(format!(
            "nodes in run/ready: [{}]; node_limit: [{}]; excluded: {}",
            running.join(", "),
            limit.join(", "),
            exclude.unwrap_or("-")
        ))
    })
}
