//! The pure plan of one reconcile round: what to define, start, stop, destroy, migrate and
//! report on one node, from the VMs of record and the domains libvirt shows.

use std::collections::{BTreeMap, BTreeSet};

use herd_storage::model::{left_alone, ActualState, ClusterMeta, VmRecord, VmState};

use crate::hypervisor::Domain;

/// One step on the hypervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Define from the XML of record (also refreshes a changed XML before a start).
    Define {
        vm: String,
        xml: String,
    },
    Start {
        vm: String,
    },
    /// Ask the guest to shut down (`graceful`), or pull the plug.
    Shutdown {
        vm: String,
    },
    Destroy {
        vm: String,
    },
    /// Live-migrate to node `to` (the VM is moving away from here).
    MigrateLive {
        vm: String,
        to: String,
    },
}

impl Action {
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Define { .. } => "define",
            Action::Start { .. } => "start",
            Action::Shutdown { .. } => "shutdown",
            Action::Destroy { .. } => "destroy",
            Action::MigrateLive { .. } => "migrate live",
        }
    }

    /// The VM it acts on.
    pub fn vm(&self) -> &str {
        match self {
            Action::Define { vm, .. }
            | Action::Start { vm }
            | Action::Shutdown { vm }
            | Action::Destroy { vm }
            | Action::MigrateLive { vm, .. } => vm,
        }
    }
}

/// What one round decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// VMs whose observed state differs from the one on record.
    pub reports: Vec<(String, ActualState)>,
    /// Domains the cluster does not know: reported, never touched.
    pub unmanaged: Vec<String>,
    /// Managed VMs assigned elsewhere that run here (`true`), or no longer do (`false`), where
    /// the record does not say so yet: reported (`ReportStray`), never destroyed.
    pub strays: Vec<(String, bool)>,
    /// Starts this round would have made but for quorum contact: a client without a recent
    /// write of its own committed asks for one (`Looper`), then starts them.
    pub held_back: usize,
}

/// Local memory of the reconciler between rounds.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// (VM, revision) whose restart was carried out.
    pub restarted: BTreeSet<(String, u64)>,
    /// When a graceful shutdown was asked for, by VM.
    pub shutdown_asked: BTreeMap<String, u64>,
    /// VMs moving away whose live migration was tried / refused (then: shutdown, if allowed).
    pub live_tried: BTreeSet<String>,
    pub live_failed: BTreeSet<String>,
}

/// Whether a move away tries live migration first, and whether it may fall back to a shutdown.
/// PVC's methods: `none` (default) live, else shutdown; `live` live only; `shutdown` never
/// live. `migrate-live` (`vm migrate --force-live`) is live only whatever the method.
pub fn live_policy(vm: &VmRecord) -> (bool, bool) {
    use herd_storage::model::MigrationMethod;
    match (vm.state, vm.spec.migration_method) {
        (VmState::MigrateLive, _) | (_, MigrationMethod::Live) => (true, false),
        (_, MigrationMethod::Shutdown) => (false, true),
        (_, MigrationMethod::None) => (true, true),
    }
}

/// What one round is decided for, besides the VMs of record and the domains.
#[derive(Clone, Copy, Debug)]
pub struct Round<'a> {
    /// This node.
    pub me: &'a str,
    /// Whether it may start VMs (it has quorum contact).
    pub can_start: bool,
    /// The reconciler's own clock and the graceful-shutdown timeout (then destroy).
    pub now_ms: u64,
    pub shutdown_timeout_ms: u64,
    /// The cluster's metadata (maintenance: VMs left alone, see `model::left_alone`).
    pub meta: Option<&'a ClusterMeta>,
}

/// Decides one round for node `r.me`.
pub fn plan(r: &Round<'_>, vms: &BTreeMap<String, VmRecord>, domains: &[Domain], memory: &mut Memory) -> Plan {
    let Round { me, can_start, now_ms, shutdown_timeout_ms, meta } = *r;
    let mut p = Plan::default();
    // A domain is a managed VM's only if its uuid is the VM's too (libvirt may report none);
    // a foreign domain that happens to carry a managed VM's name is never touched.
    let ours = |d: &Domain| vms.get(&d.name).is_some_and(|v| is_ours(d, v));
    let by_name: BTreeMap<&str, &Domain> = domains.iter().filter(|d| ours(d)).map(|d| (d.name.as_str(), d)).collect();
    for (name, vm) in vms.iter().filter(|(_, v)| v.node == me) {
        let d = by_name.get(name.as_str());
        let observed = d.map_or(ActualState::Missing, |d| d.state);
        let running = matches!(observed, ActualState::Running | ActualState::Paused);
        // In maintenance a VM no one commanded since is only reported: drift, not acted on.
        let hands_off = left_alone(meta, vm);
        match vm.state {
            _ if hands_off => {}
            VmState::Restart if running && !memory.restarted.contains(&(name.clone(), vm.revision)) => {
                memory.restarted.insert((name.clone(), vm.revision));
                p.actions.push(Action::Destroy { vm: name.clone() });
                if can_start {
                    p.actions.push(Action::Define { vm: name.clone(), xml: vm.spec.xml.clone() });
                    p.actions.push(Action::Start { vm: name.clone() });
                } else {
                    p.held_back += 1;
                }
            }
            // Moving here: wait until the source has released it (never two running copies).
            // A VM waiting for a node that fits is started by no one until it is placed; one
            // seen running elsewhere neither (one authority per VM: adopted or failed first).
            s if s.wants_running()
                && !running
                && vm.waiting.is_none()
                && vm.seen_on.is_empty()
                && !crate::breakage::is(crate::breakage::Breakage::NoStarts)
                && (vm.migrating_from.is_none()
                    || crate::breakage::is(crate::breakage::Breakage::StartBeforeRelease)) =>
            {
                if can_start {
                    p.actions.push(Action::Define { vm: name.clone(), xml: vm.spec.xml.clone() });
                    p.actions.push(Action::Start { vm: name.clone() });
                } else {
                    p.held_back += 1;
                }
            }
            VmState::Stop | VmState::Disable if running => p.actions.push(Action::Destroy { vm: name.clone() }),
            VmState::Shutdown if running => stop_gracefully(name, memory, now_ms, shutdown_timeout_ms, &mut p),
            _ => {}
        }
        if !running {
            memory.shutdown_asked.remove(name);
        }
        if observed != vm.actual {
            p.reports.push((name.clone(), observed));
        }
    }
    // Moving away from here: live migration first where the policy says so (once), else shut
    // down (destroy after the timeout); the executor releases it once it no longer runs here.
    let moving_away = |v: &VmRecord| v.node != me && v.migrating_from.as_deref() == Some(me);
    memory.live_tried.retain(|n| vms.get(n).is_some_and(moving_away));
    memory.live_failed.retain(|n| vms.get(n).is_some_and(moving_away));
    for (name, vm) in vms.iter().filter(|(_, v)| moving_away(v) && !left_alone(meta, v)) {
        let running =
            by_name.get(name.as_str()).is_some_and(|d| matches!(d.state, ActualState::Running | ActualState::Paused));
        if !running {
            memory.shutdown_asked.remove(name);
            continue;
        }
        // One that should not run any more is just stopped; one that should is moved.
        let (live_first, fallback) = if vm.state.wants_running() { live_policy(vm) } else { (false, true) };
        if live_first && !memory.live_failed.contains(name) {
            if memory.live_tried.insert(name.clone()) {
                p.actions.push(Action::MigrateLive { vm: name.clone(), to: vm.node.clone() });
            }
            // Tried: it succeeds (gone from here: released), fails over to a shutdown, or is
            // aborted through Raft; until then nothing else is done to it here.
            continue;
        }
        if fallback {
            stop_gracefully(name, memory, now_ms, shutdown_timeout_ms, &mut p);
        }
    }
    out_of_place(me, vms, domains, &mut p);
    memory.restarted.retain(|(n, rev)| vms.get(n).is_some_and(|v| v.revision == *rev && v.state == VmState::Restart));
    p
}

/// Domains here that are not this node's VMs: unmanaged (unknown, or another uuid under a
/// managed name), or managed VMs assigned elsewhere that run here — reported as strays
/// (`true`, or `false` once gone), never destroyed on this node's own initiative: the record
/// adopts the VM here or fails it naming every node (model `stray.rs`).
fn out_of_place(me: &str, vms: &BTreeMap<String, VmRecord>, domains: &[Domain], p: &mut Plan) {
    for d in domains {
        let Some(vm) = vms.get(&d.name).filter(|v| is_ours(d, v)) else {
            p.unmanaged.push(d.name.clone());
            continue;
        };
        let running = matches!(d.state, ActualState::Running | ActualState::Paused);
        if vm.node != me && vm.migrating_from.as_deref() != Some(me) && running != vm.seen_on.contains(me) {
            p.strays.push((d.name.clone(), running));
        }
    }
    // Seen here before, and now gone from this node's libvirt altogether.
    for (name, vm) in vms.iter().filter(|(_, v)| v.node != me && v.seen_on.contains(me)) {
        if !domains.iter().any(|d| is_ours(d, vm)) {
            p.strays.push((name.clone(), false));
        }
    }
}

/// Whether domain `d` is VM `vm` (same name, and the same uuid where libvirt reports one).
pub fn is_ours(d: &Domain, vm: &VmRecord) -> bool {
    d.name == vm.spec.name && (d.uuid.is_empty() || d.uuid.eq_ignore_ascii_case(&vm.spec.uuid))
}

/// A graceful shutdown of a running domain: asked once, then a destroy once the timeout passed.
fn stop_gracefully(name: &str, memory: &mut Memory, now_ms: u64, timeout_ms: u64, p: &mut Plan) {
    match memory.shutdown_asked.get(name) {
        None => {
            memory.shutdown_asked.insert(name.to_string(), now_ms);
            p.actions.push(Action::Shutdown { vm: name.to_string() });
        }
        Some(asked) if now_ms.saturating_sub(*asked) >= timeout_ms => {
            p.actions.push(Action::Destroy { vm: name.to_string() })
        }
        Some(_) => {}
    }
}
