//! The reconciler: every node converges its hypervisor to the replicated desired state of the
//! VMs assigned to it, and writes what it sees back.
//!
//! ```text
//!  plan(me, VMs of record, domains, can_start) ─▶ actions (define, start, shutdown, destroy)
//!                                              └▶ reports (actual state), unmanaged domains
//! ```
//! `plan` is pure and unit-tested; [`Reconciler`] runs it on every applied change (a local
//! watch) and every `interval` (a crashed VM is restarted), executes the actions one by one,
//! and reports through Raft. Rules: a domain that is running is adopted, never restarted; a
//! domain the cluster does not know is reported and never touched; a node without recent quorum
//! contact only stops VMs and never starts one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_storage::model::{ActualState, Command, VmRecord, VmSpec, VmState};
use tokio::time::Instant;

use crate::hypervisor::{Domain, Hypervisor, HypervisorError};

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
}

/// What one round decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// VMs whose observed state differs from the one on record.
    pub reports: Vec<(String, ActualState)>,
    /// Domains the cluster does not know: reported, never touched.
    pub unmanaged: Vec<String>,
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

/// Decides one round for node `me`. `now_ms` and `shutdown_timeout_ms` bound graceful
/// shutdowns (then destroy).
pub fn plan(
    me: &str,
    vms: &BTreeMap<String, VmRecord>,
    domains: &[Domain],
    can_start: bool,
    memory: &mut Memory,
    now_ms: u64,
    shutdown_timeout_ms: u64,
) -> Plan {
    let mut p = Plan::default();
    let by_name: BTreeMap<&str, &Domain> = domains.iter().map(|d| (d.name.as_str(), d)).collect();
    for (name, vm) in vms.iter().filter(|(_, v)| v.node == me) {
        let d = by_name.get(name.as_str());
        let observed = d.map_or(ActualState::Missing, |d| d.state);
        let running = matches!(observed, ActualState::Running | ActualState::Paused);
        match vm.state {
            VmState::Restart if running && !memory.restarted.contains(&(name.clone(), vm.revision)) => {
                memory.restarted.insert((name.clone(), vm.revision));
                p.actions.push(Action::Destroy { vm: name.clone() });
                if can_start {
                    p.actions.push(Action::Define { vm: name.clone(), xml: vm.spec.xml.clone() });
                    p.actions.push(Action::Start { vm: name.clone() });
                }
            }
            // Moving here: wait until the source has released it (never two running copies).
            s if s.wants_running()
                && !running
                && can_start
                && !crate::breakage::is(crate::breakage::Breakage::NoStarts)
                && (vm.migrating_from.is_none()
                    || crate::breakage::is(crate::breakage::Breakage::StartBeforeRelease)) =>
            {
                p.actions.push(Action::Define { vm: name.clone(), xml: vm.spec.xml.clone() });
                p.actions.push(Action::Start { vm: name.clone() });
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
    for (name, vm) in vms.iter().filter(|(_, v)| moving_away(v)) {
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
    for d in domains {
        match vms.get(&d.name) {
            // Assigned elsewhere (and not being moved away from here) but running here: it must
            // not run in two places.
            Some(vm)
                if vm.node != me
                    && vm.migrating_from.as_deref() != Some(me)
                    && matches!(d.state, ActualState::Running | ActualState::Paused) =>
            {
                p.actions.push(Action::Destroy { vm: d.name.clone() })
            }
            Some(_) => {}
            None => p.unmanaged.push(d.name.clone()),
        }
    }
    memory.restarted.retain(|(n, rev)| vms.get(n).is_some_and(|v| v.revision == *rev && v.state == VmState::Restart));
    p
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

/// Reads what `vm define` needs from a libvirt domain XML.
pub fn spec_from_xml(xml: &str) -> Result<VmSpec, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid domain XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("invalid domain XML: the root element is <{}>, not <domain>", root.tag_name().name()));
    }
    let child = |tag: &str| root.children().find(|n| n.has_tag_name(tag));
    let text = |tag: &str| child(tag).and_then(|n| n.text()).map(str::trim).filter(|t| !t.is_empty());
    let name = text("name").ok_or("invalid domain XML: no <name>")?.to_string();
    let uuid = text("uuid").ok_or("invalid domain XML: no <uuid> (herd keeps VMs by uuid)")?.to_lowercase();
    let memory = child("memory").ok_or("invalid domain XML: no <memory>")?;
    let amount: u64 = memory
        .text()
        .map(str::trim)
        .unwrap_or("")
        .parse()
        .map_err(|_| "invalid domain XML: <memory> is not a number")?;
    let memory_mib = match memory.attribute("unit").unwrap_or("KiB") {
        "b" | "bytes" => amount / (1024 * 1024),
        "KiB" | "k" => amount / 1024,
        "MiB" | "M" => amount,
        "GiB" | "G" => amount * 1024,
        other => return Err(format!("invalid domain XML: memory unit {other:?}")),
    };
    let vcpus: u32 = text("vcpu").unwrap_or("1").parse().map_err(|_| "invalid domain XML: <vcpu> is not a number")?;
    Ok(VmSpec {
        uuid,
        name,
        xml: xml.to_string(),
        memory_mib,
        vcpus,
        selector: None,
        node_limit: vec![],
        autostart: false,
        migration_method: Default::default(),
    })
}

/// Runs the reconciler of one node.
pub struct Reconciler {
    pub me: String,
    pub hypervisor: Arc<dyn Hypervisor>,
    pub shutdown_timeout: Duration,
    memory: Mutex<Memory>,
    /// Domains the cluster does not know, as last seen (for `node info`).
    unmanaged: Mutex<Vec<String>>,
    started: Instant,
    /// Live-migration target URI, `{node}` replaced by the target's name.
    pub migrate_uri: String,
    /// Deadline of one live migration.
    pub migration_timeout: Duration,
}

/// What one executed round produced, for the caller to write through Raft.
#[derive(Debug, Default)]
pub struct Outcome {
    pub commands: Vec<Command>,
    /// Running VMs and their footprint, for the keepalive.
    pub running: u32,
}

impl Reconciler {
    pub fn new(me: String, hypervisor: Arc<dyn Hypervisor>, shutdown_timeout: Duration) -> Reconciler {
        Reconciler {
            me,
            hypervisor,
            shutdown_timeout,
            memory: Mutex::new(Memory::default()),
            unmanaged: Mutex::new(Vec::new()),
            started: Instant::now(),
            migrate_uri: "qemu+tcp://{node}/system".into(),
            migration_timeout: Duration::from_secs(120),
        }
    }

    /// Where and how long live migrations go (`[hypervisor] migrate_uri`, `migration_timeout_ms`).
    pub fn with_migration(mut self, migrate_uri: &str, timeout: Duration) -> Reconciler {
        self.migrate_uri = migrate_uri.to_string();
        self.migration_timeout = timeout;
        self
    }

    /// A live migration was tried: on success the VM is gone from here (the round releases it);
    /// refused, it shuts down instead where its policy allows, else the move is aborted through
    /// Raft; an unknown outcome (deadline, libvirt gone) is left for the next rounds to see.
    async fn migrate_live(&self, vm: &VmRecord, to: &str, now_ms: u64, commands: &mut Vec<Command>) {
        let name = vm.spec.name.as_str();
        let uri = self.migrate_uri.replace("{node}", to);
        match self.hypervisor.migrate_live(name, &uri, self.migration_timeout).await {
            Ok(()) => tracing::info!(vm = %name, "hypervisor: live-migrated to {to} ({uri})"),
            Err(e @ HypervisorError::Unavailable(_)) => {
                tracing::warn!(vm = %name, "live migration to {to}: outcome unknown: {e}")
            }
            Err(e) => {
                let (_, fallback) = live_policy(vm);
                if fallback {
                    tracing::warn!(vm = %name, "live migration to {to} refused ({e}): shutting it down instead");
                    {
                        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
                        m.live_failed.insert(name.to_string());
                        m.shutdown_asked.insert(name.to_string(), now_ms);
                    }
                    if let Err(e) = self.hypervisor.shutdown(name).await {
                        tracing::warn!(vm = %name, "{e}");
                    }
                } else {
                    tracing::warn!(vm = %name, "live migration to {to} refused ({e}): the move is aborted");
                    commands.push(Command::AbortMigration {
                        name: name.to_string(),
                        node: self.me.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    pub fn unmanaged(&self) -> Vec<String> {
        self.unmanaged.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One round: observe, plan, act, and return the reports to write.
    pub async fn round(&self, vms: &BTreeMap<String, VmRecord>, can_start: bool) -> Result<Outcome, HypervisorError> {
        let domains = self.hypervisor.list().await?;
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let timeout_ms = u64::try_from(self.shutdown_timeout.as_millis()).unwrap_or(u64::MAX);
        let p = {
            let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
            plan(&self.me, vms, &domains, can_start, &mut m, now_ms, timeout_ms)
        };
        *self.unmanaged.lock().unwrap_or_else(|p| p.into_inner()) = p.unmanaged.clone();
        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        let mut commands = Vec::new();
        for a in &p.actions {
            let (vm, r) = match a {
                Action::MigrateLive { vm, to } => {
                    if let Some(record) = vms.get(vm) {
                        self.migrate_live(record, to, now_ms, &mut commands).await;
                    }
                    continue;
                }
                Action::Define { vm, xml } => (vm, self.hypervisor.define(xml).await),
                Action::Start { vm } if failures.contains_key(vm) => continue,
                Action::Start { vm } => (vm, self.hypervisor.start(vm).await),
                Action::Shutdown { vm } => (vm, self.hypervisor.shutdown(vm).await),
                Action::Destroy { vm } => (vm, self.hypervisor.destroy(vm).await),
            };
            match r {
                Ok(()) => {
                    tracing::info!(vm = %vm, "hypervisor: {}", a.verb())
                }
                Err(e) => {
                    tracing::warn!(vm = %vm, "{e}");
                    failures.insert(vm.clone(), e.to_string());
                }
            }
        }
        // Report what the hypervisor shows now (after the actions), plus refusals as failures.
        let after = if p.actions.is_empty() { domains } else { self.hypervisor.list().await? };
        let state_of = |n: &str| after.iter().find(|d| d.name == n).map_or(ActualState::Missing, |d| d.state);
        for (name, vm) in vms.iter().filter(|(_, v)| v.node == self.me) {
            let observed = state_of(name);
            let failure = failures.remove(name);
            // A finished restart, move or shutdown is reported even when the observed state
            // equals the last report, so the record leaves its transitional state.
            let finished = matches!(
                (vm.state, observed),
                (VmState::Restart | VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate, ActualState::Running)
                    | (VmState::Shutdown, ActualState::Shutoff | ActualState::Missing)
            );
            if observed != vm.actual || failure.is_some() || finished {
                commands.push(Command::ReportVm {
                    name: name.clone(),
                    node: self.me.clone(),
                    actual: observed,
                    failure,
                });
            }
        }
        // Moves away from here that no longer run here: released, the target may start them.
        for (name, _) in
            vms.iter().filter(|(_, v)| v.node != self.me && v.migrating_from.as_deref() == Some(self.me.as_str()))
        {
            if !matches!(state_of(name), ActualState::Running | ActualState::Paused) {
                commands.push(Command::ReleaseVm { name: name.clone(), node: self.me.clone() });
            }
        }
        let running = after
            .iter()
            .filter(|d| d.state == ActualState::Running && vms.get(&d.name).is_some_and(|v| v.node == self.me))
            .count();
        Ok(Outcome { commands, running: u32::try_from(running).unwrap_or(u32::MAX) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, node: &str, state: VmState, actual: ActualState) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                uuid: "00000000-0000-0000-0000-000000000001".into(),
                name: name.into(),
                xml: format!("<domain><name>{name}</name></domain>"),
                memory_mib: 256,
                vcpus: 1,
                selector: None,
                node_limit: vec![],
                autostart: false,
                migration_method: Default::default(),
            },
            state,
            node: node.into(),
            last_node: None,
            failure_reason: None,
            actual,
            migrating_from: None,
            revision: 7,
        }
    }

    fn dom(name: &str, state: ActualState) -> Domain {
        Domain { name: name.into(), uuid: String::new(), state, id: (state == ActualState::Running).then_some(3) }
    }

    fn vms(list: Vec<VmRecord>) -> BTreeMap<String, VmRecord> {
        list.into_iter().map(|v| (v.spec.name.clone(), v)).collect()
    }

    #[test]
    fn starts_what_should_run_and_adopts_what_runs() {
        let v = vms(vec![
            vm("a", "me", VmState::Start, ActualState::Unknown),
            vm("b", "me", VmState::Start, ActualState::Unknown),
        ]);
        let p = plan("me", &v, &[dom("b", ActualState::Running)], true, &mut Memory::default(), 0, 1000);
        assert_eq!(
            p.actions,
            vec![Action::Define { vm: "a".into(), xml: v["a"].spec.xml.clone() }, Action::Start { vm: "a".into() }]
        );
        assert_eq!(p.reports, vec![("a".into(), ActualState::Missing), ("b".into(), ActualState::Running)]);
    }

    #[test]
    fn without_quorum_contact_it_stops_but_never_starts() {
        let v = vms(vec![
            vm("a", "me", VmState::Start, ActualState::Shutoff),
            vm("b", "me", VmState::Stop, ActualState::Running),
        ]);
        let p = plan(
            "me",
            &v,
            &[dom("a", ActualState::Shutoff), dom("b", ActualState::Running)],
            false,
            &mut Memory::default(),
            0,
            1000,
        );
        assert_eq!(p.actions, vec![Action::Destroy { vm: "b".into() }]);
    }

    #[test]
    fn a_crashed_vm_that_should_run_is_restarted() {
        let v = vms(vec![vm("a", "me", VmState::Start, ActualState::Running)]);
        let p = plan("me", &v, &[dom("a", ActualState::Crashed)], true, &mut Memory::default(), 0, 1000);
        assert!(p.actions.contains(&Action::Start { vm: "a".into() }));
        assert_eq!(p.reports, vec![("a".into(), ActualState::Crashed)]);
    }

    #[test]
    fn unknown_domains_are_reported_and_left_alone() {
        let p =
            plan("me", &BTreeMap::new(), &[dom("test", ActualState::Running)], true, &mut Memory::default(), 0, 1000);
        assert!(p.actions.is_empty());
        assert_eq!(p.unmanaged, vec!["test".to_string()]);
    }

    #[test]
    fn graceful_shutdown_then_destroy_after_the_timeout() {
        let v = vms(vec![vm("a", "me", VmState::Shutdown, ActualState::Running)]);
        let mut m = Memory::default();
        let running = [dom("a", ActualState::Running)];
        assert_eq!(plan("me", &v, &running, true, &mut m, 0, 1000).actions, vec![Action::Shutdown { vm: "a".into() }]);
        assert!(plan("me", &v, &running, true, &mut m, 500, 1000).actions.is_empty(), "waits for the guest");
        assert_eq!(
            plan("me", &v, &running, true, &mut m, 1000, 1000).actions,
            vec![Action::Destroy { vm: "a".into() }]
        );
    }

    #[test]
    fn a_restart_happens_once_per_request() {
        let v = vms(vec![vm("a", "me", VmState::Restart, ActualState::Running)]);
        let mut m = Memory::default();
        let running = [dom("a", ActualState::Running)];
        let first = plan("me", &v, &running, true, &mut m, 0, 1000);
        assert_eq!(first.actions.first(), Some(&Action::Destroy { vm: "a".into() }));
        assert!(plan("me", &v, &running, true, &mut m, 10, 1000).actions.is_empty(), "not again for the same request");
    }

    #[test]
    fn a_vm_assigned_elsewhere_is_not_left_running_here() {
        let v = vms(vec![vm("a", "other", VmState::Start, ActualState::Running)]);
        let p = plan("me", &v, &[dom("a", ActualState::Running)], true, &mut Memory::default(), 0, 1000);
        assert_eq!(p.actions, vec![Action::Destroy { vm: "a".into() }]);
        assert!(p.reports.is_empty(), "only the assigned node reports");
    }

    #[test]
    fn a_move_stops_on_the_source_before_the_target_starts() {
        let mut moving = vm("a", "target", VmState::Migrate, ActualState::Unknown);
        moving.migrating_from = Some("source".into());
        let v = vms(vec![moving.clone()]);
        // The target waits while the source has not released it.
        assert!(plan("target", &v, &[], true, &mut Memory::default(), 0, 1000).actions.is_empty());
        // The source tries a live migration once (method `none`: live first)...
        let mut m = Memory::default();
        let running = [dom("a", ActualState::Running)];
        assert_eq!(
            plan("source", &v, &running, true, &mut m, 0, 1000).actions,
            vec![Action::MigrateLive { vm: "a".into(), to: "target".into() }]
        );
        assert!(plan("source", &v, &running, true, &mut m, 0, 1000).actions.is_empty(), "tried once");
        // ... refused (as on the test driver), it shuts it down gracefully, then destroys.
        m.live_failed.insert("a".into());
        assert_eq!(
            plan("source", &v, &running, true, &mut m, 0, 1000).actions,
            vec![Action::Shutdown { vm: "a".into() }]
        );
        assert_eq!(
            plan("source", &v, &running, true, &mut m, 1000, 1000).actions,
            vec![Action::Destroy { vm: "a".into() }]
        );
        // Released: the target starts it.
        moving.migrating_from = None;
        let v = vms(vec![moving]);
        assert!(plan("target", &v, &[], true, &mut Memory::default(), 0, 1000)
            .actions
            .contains(&Action::Start { vm: "a".into() }));
    }

    #[test]
    fn the_migration_method_decides_live_and_fallback() {
        use herd_storage::model::MigrationMethod;
        let running = [dom("a", ActualState::Running)];
        let actions = |state: VmState, method: MigrationMethod, failed: bool| {
            let mut v = vm("a", "target", state, ActualState::Unknown);
            v.migrating_from = Some("source".into());
            v.spec.migration_method = method;
            let mut m = Memory::default();
            if failed {
                m.live_tried.insert("a".into());
                m.live_failed.insert("a".into());
            }
            plan("source", &vms(vec![v]), &running, true, &mut m, 0, 1000).actions
        };
        let live = vec![Action::MigrateLive { vm: "a".into(), to: "target".into() }];
        let shut = vec![Action::Shutdown { vm: "a".into() }];
        assert_eq!(actions(VmState::Migrate, MigrationMethod::Shutdown, false), shut, "shutdown: never live");
        assert_eq!(actions(VmState::Migrate, MigrationMethod::Live, false), live);
        assert_eq!(actions(VmState::Migrate, MigrationMethod::Live, true), vec![], "live: never shut down");
        assert_eq!(actions(VmState::MigrateLive, MigrationMethod::Shutdown, false), live, "forced live");
        assert_eq!(actions(VmState::MigrateLive, MigrationMethod::None, true), vec![], "forced live: no fallback");
        assert_eq!(actions(VmState::Unmigrate, MigrationMethod::None, true), shut, "none: falls back");
    }

    #[tokio::test]
    async fn a_refused_live_migration_aborts_or_falls_back_by_policy() {
        use crate::hypervisor::memory::MemoryHypervisor;
        let hv = MemoryHypervisor::new();
        let xml = "<domain><name>a</name><uuid>00000000-0000-0000-0000-000000000001</uuid></domain>";
        hv.define(xml).await.expect("define");
        hv.start("a").await.expect("start");
        let r = Reconciler::new("source".into(), Arc::new(hv.clone()), Duration::from_secs(60));
        let mut forced = vm("a", "target", VmState::MigrateLive, ActualState::Unknown);
        forced.migrating_from = Some("source".into());
        // Live only: refused (the memory hypervisor, like the test driver, has no migration),
        // the move is aborted through Raft and the domain keeps running here.
        let out = r.round(&vms(vec![forced.clone()]), true).await.expect("round");
        assert!(
            matches!(out.commands.as_slice(), [Command::AbortMigration { name, node, .. }] if name == "a" && node == "source"),
            "{:?}",
            out.commands
        );
        let still = hv.list().await.expect("list");
        assert_eq!(still.first().map(|d| d.state), Some(ActualState::Running));
        // Live first (method `none`): refused, it shuts down instead and is released.
        let mut fallback = forced;
        fallback.state = VmState::Migrate;
        let r = Reconciler::new("source".into(), Arc::new(hv.clone()), Duration::from_secs(60));
        let out = r.round(&vms(vec![fallback]), true).await.expect("round");
        assert!(
            matches!(out.commands.as_slice(), [Command::ReleaseVm { name, node }] if name == "a" && node == "source"),
            "{:?}",
            out.commands
        );
        assert_eq!(hv.list().await.expect("list").first().map(|d| d.state), Some(ActualState::Shutoff));
    }

    #[test]
    fn domain_xml_is_read_or_refused_clearly() {
        let s = spec_from_xml("<domain type='test'><name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid><memory unit='MiB'>256</memory><vcpu>2</vcpu></domain>").expect("parses");
        assert_eq!((s.name.as_str(), s.memory_mib, s.vcpus), ("web", 256, 2));
        let kib = spec_from_xml(
            "<domain><name>x</name><uuid>11111111-2222-3333-4444-555555555555</uuid><memory>524288</memory></domain>",
        )
        .expect("parses");
        assert_eq!(kib.memory_mib, 512);
        for (bad, why) in [
            ("<domain", "invalid domain XML"),
            ("<vm/>", "<vm>"),
            ("<domain><uuid>u</uuid><memory>1</memory></domain>", "<name>"),
            ("<domain><name>x</name><memory>1</memory></domain>", "<uuid>"),
        ] {
            let e = spec_from_xml(bad).expect_err("refused");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
