//! VM commands of the replicated model. Pure, like the rest of the model; placement is in
//! `place.rs`.

use crate::apply::{check_revision, push_event, validate_name, At};
use crate::types::*;

/// The domain XML of record is bounded: it lives in the replicated state.
pub const MAX_XML_BYTES: usize = 256 * 1024;

/// Whether `node` may be given a VM by an operator (define on it, migrate to it): not a
/// fenced node, nor one being flushed or flushed (an `unflush` brings its VMs back).
fn accepts_vms(state: &State, node: &str) -> Result<(), ApplyError> {
    let n = state.nodes.get(node).ok_or_else(|| ApplyError::NoSuchNode(node.to_string()))?;
    if n.daemon_state == DaemonState::Fenced
        || matches!(n.domain_state, DomainState::Flush | DomainState::Flushed | DomainState::FenceFlush)
    {
        return Err(ApplyError::Invalid(format!(
            "{node} takes no VMs now (daemon_state {}, domain_state {}): `herd node ready {node}` first",
            n.daemon_state, n.domain_state
        )));
    }
    Ok(())
}

fn validate_spec(state: &State, spec: &VmSpec) -> Result<(), ApplyError> {
    validate_name(&spec.name).map_err(|_| ApplyError::Invalid(format!("VM name {:?}", spec.name)))?;
    let uuid_ok = spec.uuid.len() == 36
        && spec.uuid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    if !uuid_ok {
        return Err(ApplyError::Invalid(format!("uuid {:?} is not a UUID", spec.uuid)));
    }
    if spec.xml.is_empty() || spec.xml.len() > MAX_XML_BYTES {
        return Err(ApplyError::Invalid(format!("domain XML must be 1 to {MAX_XML_BYTES} bytes")));
    }
    if spec.memory_mib == 0 || spec.vcpus == 0 {
        return Err(ApplyError::Invalid("a VM needs memory and at least one vCPU".into()));
    }
    if let Some(unknown) = spec.node_limit.iter().find(|n| !state.nodes.contains_key(*n)) {
        return Err(ApplyError::NoSuchNode(unknown.clone()));
    }
    Ok(())
}

fn vm_mut<'a>(state: &'a mut State, name: &str, op: &Op) -> Result<&'a mut VmRecord, ApplyError> {
    let vm = state.vms.get_mut(name).ok_or_else(|| ApplyError::NoSuchVm(name.to_string()))?;
    check_revision(format!("vm {name}"), vm.revision, op)?;
    Ok(vm)
}

/// Applies one VM command: a dispatch to the function of each.
pub(crate) fn apply_vm_op(state: &mut State, index: u64, now: u64, op: &Op) -> Result<Reply, ApplyError> {
    let at = At { index, now, op };
    match &op.cmd {
        Command::DefineVm { spec, node } => define_vm(state, at, spec, node),
        Command::ModifyVm { name, xml, memory_mib, vcpus } => modify_vm(state, at, name, xml, memory_mib, vcpus),
        Command::SetVmState { name, state: to } => set_vm_state(state, at, name, to),
        Command::MigrateVm { name, to, state: how, permanent } => migrate_vm(state, at, name, to, how, permanent),
        Command::ReleaseVm { name, node } => release_vm(state, at, name, node),
        Command::AbortMigration { name, node, reason } => abort_migration(state, at, name, node, reason),
        Command::UndefineVm { name } => undefine_vm(state, at, name),
        Command::ReportVm { name, node, actual, failure, moved } => {
            report_vm(state, at, name, node, actual, failure, moved)
        }
        other => Err(ApplyError::Invalid(format!("{} is not a VM command", other.name()))),
    }
}

/// `DefineVm`: a new VM on a node that takes VMs, inside its `node_limit`.
fn define_vm(state: &mut State, at: At<'_>, spec: &VmSpec, node: &String) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    check_revision(format!("vm {}", spec.name), state.vms.get(&spec.name).map_or(0, |v| v.revision), op)?;
    validate_spec(state, spec)?;
    if state.vms.values().any(|v| v.spec.name == spec.name || v.spec.uuid == spec.uuid) {
        return Err(ApplyError::VmExists { name: spec.name.clone(), uuid: spec.uuid.clone() });
    }
    accepts_vms(state, node)?;
    if !spec.node_limit.is_empty() && !spec.node_limit.contains(node) {
        return Err(ApplyError::Invalid(format!("{node} is outside the VM's node_limit")));
    }
    let vm = VmRecord {
        last_move: None,
        spec: spec.clone(),
        state: VmState::Start,
        node: node.clone(),
        last_node: None,
        failure_reason: None,
        actual: ActualState::Unknown,
        migrating_from: None,
        waiting: None,
        seen_on: Default::default(),
        desired_at: index,
        revision: index,
    };
    state.vms.insert(spec.name.clone(), vm);
    push_event(state, index, now, "vm-define", Some(node), format!("{} defined on {node}", spec.name));
    Ok(Reply::Done)
}

/// `ModifyVm`: a new domain XML of record and the resources read from it.
fn modify_vm(
    state: &mut State,
    at: At<'_>,
    name: &str,
    xml: &str,
    memory_mib: &Option<u64>,
    vcpus: &Option<u32>,
) -> Result<Reply, ApplyError> {
    let At { index, op, .. } = at;
    if xml.is_empty() || xml.len() > MAX_XML_BYTES {
        return Err(ApplyError::Invalid(format!("domain XML must be 1 to {MAX_XML_BYTES} bytes")));
    }
    if *memory_mib == Some(0) || *vcpus == Some(0) {
        return Err(ApplyError::Invalid("a VM needs memory and at least one vCPU".into()));
    }
    let vm = vm_mut(state, name, op)?;
    vm.spec.xml = xml.to_string();
    if let Some(m) = memory_mib {
        vm.spec.memory_mib = *m;
    }
    if let Some(v) = vcpus {
        vm.spec.vcpus = *v;
    }
    vm.desired_at = index;
    vm.revision = index;
    Ok(Reply::Done)
}

/// `SetVmState`: an operator's state change.
fn set_vm_state(state: &mut State, at: At<'_>, name: &str, to: &VmState) -> Result<Reply, ApplyError> {
    let At { index, op, .. } = at;
    if !matches!(to, VmState::Start | VmState::Stop | VmState::Shutdown | VmState::Restart | VmState::Disable) {
        return Err(ApplyError::Invalid(format!("{to} is not an operator state (use migrate/unmigrate/move)")));
    }
    if to.wants_running() {
        // A fenced node is dead: nothing is started there until it is ready again.
        let on = state.vms.get(name).map(|v| v.node.clone());
        if let Some(node) = on.filter(|n| state.nodes.get(n).is_some_and(|n| n.daemon_state == DaemonState::Fenced)) {
            return Err(ApplyError::Invalid(format!(
                "{name} is on {node}, which is fenced: `herd vm move {name} --to NODE` or `herd node ready {node}` first"
            )));
        }
    }
    let vm = vm_mut(state, name, op)?;
    if *to == VmState::Restart && !vm.state.wants_running() {
        return Err(ApplyError::Invalid(format!("{name} is not running ({}): start it", vm.state)));
    }
    vm.state = *to;
    if *to == VmState::Start {
        vm.failure_reason = None;
    }
    if !to.wants_running() {
        vm.waiting = None;
    }
    vm.desired_at = index;
    vm.revision = index;
    Ok(Reply::Done)
}

/// `MigrateVm`: migrate, unmigrate or move; never to the current node.
fn migrate_vm(
    state: &mut State,
    at: At<'_>,
    name: &str,
    to: &String,
    how: &VmState,
    permanent: &bool,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    if !matches!(how, VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate) {
        return Err(ApplyError::Invalid(format!("{how} is not a migration")));
    }
    accepts_vms(state, to)?;
    let vm = vm_mut(state, name, op)?;
    // PVC once migrated a VM "to itself": never.
    if vm.node == *to {
        return Err(ApplyError::Invalid(format!("{name} is already on {to}")));
    }
    if !vm.spec.node_limit.is_empty() && !vm.spec.node_limit.contains(to) {
        return Err(ApplyError::Invalid(format!("{to} is outside {name}'s node_limit")));
    }
    if *how == VmState::Unmigrate && vm.last_node.as_deref() != Some(to.as_str()) {
        return Err(ApplyError::Invalid(format!("{name} was not migrated away from {to}")));
    }
    if vm.migrating_from.is_some() {
        return Err(ApplyError::Invalid(format!("{name} is still moving: wait until it runs on {}", vm.node)));
    }
    let maybe_running = !matches!(vm.actual, ActualState::Shutoff | ActualState::Crashed | ActualState::Missing);
    // A failed VM still running (a refused live-only move leaves it so) moves as a VM that
    // should run: stopped here, started there. One known to be off is not moved by a
    // migration, which promises a running VM on the target: refused with what to do.
    let revive = vm.state == VmState::Fail && maybe_running;
    if vm.state == VmState::Fail && !revive {
        return Err(ApplyError::Invalid(format!(
            "{name} is in fail and not running: start it (`herd vm start {name}`), then migrate it"
        )));
    }
    let from = std::mem::replace(&mut vm.node, to.clone());
    // Moved by hand to a node that accepts VMs: it waits for nothing any more, and a copy
    // seen running there is now its own.
    vm.waiting = None;
    vm.seen_on.remove(to);
    vm.last_node = match (how, permanent) {
        (_, true) | (VmState::Unmigrate, _) => None,
        // A temporary move keeps the first home; moving back there is arriving home.
        _ => vm.last_node.take().or(Some(from.clone())).filter(|home| home != to),
    };
    // A VM that should run moves, and must first stop where it was. So must one that
    // should not run but may still run there: a stopped VM whose old node has not yet
    // reported it off (that node's daemon may be down while the domain runs on) —
    // without the release, `vm start` would run it on two nodes (found by the
    // simulation, seed 1347). Only a VM last seen off just changes node.
    if vm.state.wants_running() || revive {
        vm.state = *how;
        vm.failure_reason = None;
    }
    if vm.state.wants_running() || maybe_running {
        vm.migrating_from = Some(from.clone());
        vm.last_move = Some(LastMove {
            from: from.clone(),
            to: to.clone(),
            began_ms: now,
            ended_ms: None,
            live: None,
            downtime_ms: None,
            job_ms: None,
        });
    }
    // What the old node reported says nothing about the new one.
    vm.actual = ActualState::Unknown;
    vm.desired_at = index;
    vm.revision = index;
    push_event(state, index, now, "vm-migrate", Some(to), format!("{name}: {from} -> {to} ({how})"));
    Ok(Reply::Done)
}

/// `ReleaseVm`: the source of a move reports the VM stopped there.
fn release_vm(state: &mut State, at: At<'_>, name: &str, node: &String) -> Result<Reply, ApplyError> {
    let At { index, op, .. } = at;
    let vm = vm_mut(state, name, op)?;
    if vm.migrating_from.as_deref() != Some(node.as_str()) {
        return Err(ApplyError::Invalid(format!("{name} is not moving away from {node}")));
    }
    vm.migrating_from = None;
    vm.desired_at = index;
    vm.revision = index;
    Ok(Reply::Done)
}

/// `AbortMigration`: libvirt refused a live-only move; the VM stays on its source, failed.
fn abort_migration(
    state: &mut State,
    at: At<'_>,
    name: &str,
    node: &String,
    reason: &str,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let vm = vm_mut(state, name, op)?;
    if vm.migrating_from.as_deref() != Some(node.as_str()) {
        return Err(ApplyError::Invalid(format!("{name} is not moving away from {node}")));
    }
    // Back on the node it never left; its home is what it was before this move.
    let target = std::mem::replace(&mut vm.node, node.clone());
    vm.last_node = match vm.state {
        VmState::Unmigrate => Some(target.clone()),
        _ if vm.last_node.as_deref() == Some(node.as_str()) => None,
        _ => vm.last_node.take(),
    };
    vm.migrating_from = None;
    vm.state = VmState::Fail;
    let reason: String = reason.chars().take(1024).collect();
    vm.failure_reason = Some(format!("live migration to {target} failed: {reason}"));
    vm.actual = ActualState::Unknown;
    vm.revision = index;
    push_event(state, index, now, "vm-migrate-failed", Some(node), format!("{name}: {node} -> {target}: {reason}"));
    Ok(Reply::Done)
}

/// `UndefineVm`: only a stopped, disabled or failed VM.
fn undefine_vm(state: &mut State, at: At<'_>, name: &str) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let vm = vm_mut(state, name, op)?;
    if !matches!(vm.state, VmState::Stop | VmState::Disable | VmState::Fail) {
        return Err(ApplyError::Invalid(format!("{name} is {}: stop it first", vm.state)));
    }
    state.vms.remove(name);
    push_event(state, index, now, "vm-undefine", None, format!("{name} undefined"));
    Ok(Reply::Done)
}

/// `ReportVm`: what libvirt says of a VM, from its assigned node only.
fn report_vm(
    state: &mut State,
    at: At<'_>,
    name: &str,
    node: &String,
    actual: &ActualState,
    failure: &Option<String>,
    moved: &Option<Arrival>,
) -> Result<Reply, ApplyError> {
    let At { index, now, op } = at;
    let vm = vm_mut(state, name, op)?;
    if vm.node != *node {
        // A report from a node the VM has left: stale, ignored by refusal.
        return Err(ApplyError::Invalid(format!("{name} is assigned to {}, not {node}", vm.node)));
    }
    vm.actual = *actual;
    vm.seen_on.remove(node);
    let before = vm.state;
    match (failure, vm.state, actual) {
        (Some(reason), _, _) => {
            vm.state = VmState::Fail;
            vm.failure_reason = Some(reason.clone());
        }
        // A finished move or restart is a running VM again.
        (
            None,
            VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate | VmState::Restart,
            ActualState::Running,
        ) => vm.state = VmState::Start,
        (None, VmState::Shutdown, ActualState::Shutoff | ActualState::Missing) => vm.state = VmState::Stop,
        _ => {}
    }
    let after = vm.state;
    vm.revision = index;
    let arrived =
        matches!(before, VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate) && after == VmState::Start;
    let finished = match vm.last_move.as_mut() {
        Some(m) if arrived && m.to == *node && m.ended_ms.is_none() => {
            m.ended_ms = Some(now);
            m.live = Some(moved.is_some_and(|a| a.live));
            m.downtime_ms = moved.and_then(|a| a.downtime_ms);
            m.job_ms = moved.and_then(|a| a.job_ms);
            Some(m.clone())
        }
        _ => None,
    };
    if let Some(m) = finished {
        let took = now.saturating_sub(m.began_ms);
        let job = m.job_ms.map(|j| format!(", libvirt's job {j} ms")).unwrap_or_default();
        let text = match (m.live, m.downtime_ms) {
            (Some(true), Some(d)) => {
                format!("{name} moved live {} -> {} in {took} ms (downtime {d} ms{job})", m.from, m.to)
            }
            (Some(true), None) => format!("{name} moved live {} -> {} in {took} ms{job}", m.from, m.to),
            _ => format!("{name} moved by shutdown {} -> {} in {took} ms (stopped there, started here)", m.from, m.to),
        };
        push_event(state, index, now, "vm-moved", Some(node), text);
    }
    if after == VmState::Fail && before != VmState::Fail {
        let reason = failure.clone().unwrap_or_default();
        push_event(state, index, now, "vm-fail", Some(node), format!("{name} failed on {node}: {reason}"));
    }
    // Copies seen elsewhere wait for this report: adopted there or failed.
    if state.meta.as_ref().is_some_and(|m| m.maintenance) {
        crate::maintenance::note_drift(state, index, now, name);
    } else {
        crate::stray::resolve(state, index, now, name);
    }
    Ok(Reply::Done)
}
