//! `vm define|list|info|start|stop|shutdown|restart|disable|undefine|modify|migrate|unmigrate|move`.
//! Handlers write commands; the nodes' reconcilers act on them.

use serde_json::{json, Value};

use herd_storage::model::{place, Command, MigrationMethod, Op, Selector, VmRecord, VmState};

use super::dto::{VmDetail, VmSummary};
use super::{full_view, full_view_at, member, read_index, write, write_one, AdminError};
use crate::daemon::Daemon;

/// `vm define`'s arguments.
pub(super) struct Define {
    pub xml: String,
    pub node: Option<String>,
    pub selector: Option<Selector>,
    pub limit: Vec<String>,
    pub autostart: bool,
    pub method: Option<MigrationMethod>,
}

/// `vm migrate`'s arguments.
pub(super) struct Migrate {
    pub to: Option<String>,
    pub live: bool,
    pub permanent: bool,
    pub unmigrate: bool,
}

fn no_vm(name: &str) -> AdminError {
    herd_storage::model::ApplyError::NoSuchVm(name.to_string()).into()
}

/// Defines a VM from its domain XML, on `node` or where its selector places it.
pub(super) async fn define(d: &Daemon, a: Define) -> Result<Value, AdminError> {
    let mut spec = crate::reconcile::spec_from_xml(&a.xml).map_err(AdminError::invalid)?;
    spec.selector = a.selector;
    spec.node_limit = a.limit;
    spec.autostart = a.autostart;
    spec.migration_method = a.method.unwrap_or_default();
    // Place on an up-to-date view of the cluster (a linearizable read first; on a client, the
    // leader's state: its own copy lacks other nodes' figures).
    read_index(d, false).await?;
    let member = full_view(d, super::READ_TIMEOUT).await?;
    let target = match a.node {
        Some(n) => n,
        None => {
            let g = member.view.read();
            place(&g.state, spec.selector.unwrap_or_default(), &spec.node_limit, None)?
        }
    };
    let name = spec.name.clone();
    write_one(d, Command::DefineVm { spec, node: target.clone() }).await?;
    Ok(json!({ "name": name, "node": target, "message": format!("{name} defined on {target}") }))
}

/// The VMs as a read of them needs them: this node's copy (after a read barrier unless
/// `local`) on a Raft member; on a client, whose copy holds only outlines of other nodes' VMs
/// (`VmRecord::outline`), unless `local`, the leader's state once it applied the read index
/// (still a linearizable read).
async fn vm_view(d: &Daemon, local: bool) -> Result<herd_raft::node::Local, AdminError> {
    let at = read_index(d, local).await?;
    if local || d.node.session().is_none() {
        return member(d);
    }
    full_view_at(d, at, super::READ_TIMEOUT).await
}

/// The record of VM `name` in `state`; an outline (a client's `--local` read of another
/// node's VM) is refused rather than shown as if it were the record.
fn record<'a>(state: &'a herd_storage::model::State, name: &str) -> Result<&'a VmRecord, AdminError> {
    let vm = state.vms.get(name).ok_or_else(|| no_vm(name))?;
    if vm.is_outline() {
        return Err(AdminError::invalid(format!(
            "this client holds only an outline of {name} (it belongs to {}): ask without --local",
            vm.node
        )));
    }
    Ok(vm)
}

/// Every VM (this node's copy; on a client, the leader's state).
pub(super) async fn list(d: &Daemon) -> Result<Value, AdminError> {
    let member = if d.node.session().is_some() { full_view(d, super::READ_TIMEOUT).await? } else { member(d)? };
    let g = member.view.read();
    let vms: Vec<VmSummary> = g.state.vms.values().map(VmSummary::of).collect();
    Ok(json!(vms))
}

/// One VM (linearizable unless `local`).
pub(super) async fn info(d: &Daemon, name: String, local: bool) -> Result<Value, AdminError> {
    let member = vm_view(d, local).await?;
    let g = member.view.read();
    Ok(json!(VmDetail::of(record(&g.state, &name)?)))
}

/// start, stop, shutdown, restart or disable.
pub(super) async fn set_state(d: &Daemon, name: String, state: VmState) -> Result<Value, AdminError> {
    write_one(d, Command::SetVmState { name: name.clone(), state }).await?;
    Ok(json!({ "name": name, "state": state, "message": format!("{name}: {state}") }))
}

pub(super) async fn undefine(d: &Daemon, name: String) -> Result<Value, AdminError> {
    write_one(d, Command::UndefineVm { name: name.clone() }).await?;
    Ok(json!({ "name": name, "message": format!("{name} undefined") }))
}

/// Replaces a VM's domain XML of record (same name and uuid); used at its next start.
pub(super) async fn modify(d: &Daemon, name: String, xml: String) -> Result<Value, AdminError> {
    let spec = crate::reconcile::spec_from_xml(&xml).map_err(AdminError::invalid)?;
    if spec.name != name {
        return Err(AdminError::invalid(format!(
            "the XML names {:?}, not {name:?}: a VM cannot be renamed",
            spec.name
        )));
    }
    let member = vm_view(d, false).await?;
    let revision = {
        let g = member.view.read();
        let vm = record(&g.state, &name)?;
        if vm.spec.uuid != spec.uuid {
            return Err(AdminError::invalid(format!(
                "the XML has uuid {}, {name} has {}: a VM keeps its uuid",
                spec.uuid, vm.spec.uuid
            )));
        }
        vm.revision
    };
    let cmd = Command::ModifyVm { name: name.clone(), xml, memory_mib: Some(spec.memory_mib), vcpus: Some(spec.vcpus) };
    // Compare-and-set: a change in between (another modify, a move) is not overwritten.
    let op = Op { cmd, expect_revision: Some(revision) };
    if !crate::breakage::is(crate::breakage::Breakage::AckWithoutCommit) {
        write(d, vec![op]).await?;
    }
    Ok(
        json!({ "name": name, "message": format!("{name} modified: the new XML is used at its next start (herd vm restart {name})") }),
    )
}

/// Moves a VM: `to` (or where its selector places it, away from its node); `permanent` forgets
/// its home (`vm move`); `unmigrate` sends it back to its `last_node`.
pub(super) async fn migrate(d: &Daemon, name: String, a: Migrate) -> Result<Value, AdminError> {
    if a.live && a.unmigrate {
        return Err(AdminError::invalid("--force-live is for vm migrate"));
    }
    // On a client, the leader's state: its own copy has outlines of other nodes' VMs and no
    // figures of other nodes to place by.
    let member = vm_view(d, false).await?;
    let (target, how) = {
        let g = member.view.read();
        let vm = record(&g.state, &name)?;
        if a.unmigrate {
            let home = vm
                .last_node
                .clone()
                .ok_or_else(|| AdminError::invalid(format!("{name} was not migrated: it is home on {}", vm.node)))?;
            (home, VmState::Unmigrate)
        } else {
            let target = match a.to {
                Some(t) => t,
                None => place(&g.state, vm.spec.selector.unwrap_or_default(), &vm.spec.node_limit, Some(&vm.node))?,
            };
            (target, if a.live { VmState::MigrateLive } else { VmState::Migrate })
        }
    };
    let cmd = Command::MigrateVm { name: name.clone(), to: target.clone(), state: how, permanent: a.permanent };
    write_one(d, cmd).await?;
    Ok(json!({ "name": name, "node": target, "message": format!("{name} moving to {target}") }))
}
