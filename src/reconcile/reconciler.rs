//! [`Reconciler`]: runs the plan of one node against its hypervisor and returns the reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use herd_storage::model::{ActualState, Arrival, ClusterMeta, Command, VmRecord, VmState};
use tokio::time::Instant;

use super::migrations::Migrations;
use super::plan::{live_policy, plan, Action, Memory, Round};
use crate::hypervisor::{Hypervisor, HypervisorError};

/// VMs one reconcile round acts on at once (libvirt's own bound is in `boundary`).
const PARALLEL_VMS: usize = 8;

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
    /// Live migrations away from here, each on a task of its own.
    pub migrations: Migrations,
}

/// What one executed round produced, for the caller to write through Raft.
#[derive(Debug, Default)]
pub struct Outcome {
    pub commands: Vec<Command>,
    /// Running VMs and their footprint, for the keepalive.
    pub running: u32,
    /// Starts held back for want of quorum contact (see `Plan::held_back`).
    pub held_back: usize,
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
            migrations: Migrations::new(2, Duration::from_secs(120)),
        }
    }

    /// Where live migrations go, how many at once and how long before an abort is asked
    /// (`[hypervisor] migrate_uri`, `parallel_migrations`, `migration_timeout_ms`).
    pub fn with_migration(mut self, migrate_uri: &str, parallel: usize, timeout: Duration) -> Reconciler {
        self.migrate_uri = migrate_uri.to_string();
        self.migrations = Migrations::new(parallel, timeout);
        self
    }

    /// Reads the live migrations that landed since the last round. Done: the VM is gone from
    /// here (the round releases it). Refused or aborted: it shuts down instead where its policy
    /// allows, else the move is aborted through Raft. Outcome unknown (libvirt's call gave no
    /// answer): tried again while the VM still runs here and still moves away.
    /// Returns whether it asked a guest to shut down (the round lists the domains again).
    async fn land(&self, vms: &BTreeMap<String, VmRecord>, now_ms: u64, commands: &mut Vec<Command>) -> bool {
        let mut shut_down = false;
        for l in self.migrations.landed() {
            let (name, to, ms) = (l.vm.as_str(), l.to.as_str(), l.took.as_millis());
            let e = match l.result {
                Ok(()) => {
                    tracing::info!(vm = %name, "hypervisor: live-migrated to {to} in {ms} ms");
                    continue;
                }
                Err(e @ HypervisorError::Unavailable(_)) => {
                    tracing::warn!(vm = %name, "live migration to {to}: outcome unknown after {ms} ms: {e}");
                    self.memory.lock().unwrap_or_else(|p| p.into_inner()).live_tried.remove(name);
                    continue;
                }
                Err(e) => e,
            };
            let Some(vm) = vms.get(name).filter(|v| v.node != self.me && v.migrating_from.as_ref() == Some(&self.me))
            else {
                continue;
            };
            let reason = if l.aborted {
                format!("live migration to {to} not done within migration_timeout_ms, aborted after {ms} ms: {e}")
            } else {
                e.to_string()
            };
            if live_policy(vm).1 {
                tracing::warn!(vm = %name, "live migration to {to} failed ({reason}): shutting it down instead");
                {
                    let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
                    m.live_failed.insert(name.to_string());
                    m.shutdown_asked.insert(name.to_string(), now_ms);
                }
                if let Err(e) = self.hypervisor.shutdown(name).await {
                    tracing::warn!(vm = %name, "{e}");
                }
                shut_down = true;
            } else {
                tracing::warn!(vm = %name, "live migration to {to} failed ({reason}): the move is aborted");
                commands.push(Command::AbortMigration { name: name.to_string(), node: self.me.clone(), reason });
            }
        }
        for (vm, to, took) in self.migrations.overdue() {
            tracing::warn!(
                vm = %vm,
                "live migration to {to} not done after {} ms: asking libvirt to abort it",
                took.as_millis()
            );
            if let Err(e) = self.hypervisor.abort_job(&vm).await {
                tracing::warn!(vm = %vm, "abort of the live migration to {to}: {e}");
            }
        }
        shut_down
    }

    /// How a VM that finished a move here arrived: live (libvirt's incoming migration, with
    /// its downtime) or started here.
    async fn arrival(&self, name: &str) -> Arrival {
        match self.hypervisor.arrival(name).await {
            Ok(Some(a)) => a,
            Ok(None) => Arrival { live: false, downtime_ms: None, job_ms: None },
            Err(e) => {
                tracing::debug!(vm = %name, "how it arrived: {e}");
                Arrival { live: false, downtime_ms: None, job_ms: None }
            }
        }
    }

    pub fn unmanaged(&self) -> Vec<String> {
        self.unmanaged.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One round: observe, plan, act, and return the reports to write.
    pub async fn round(
        &self,
        vms: &BTreeMap<String, VmRecord>,
        meta: Option<&ClusterMeta>,
        can_start: bool,
    ) -> Result<Outcome, HypervisorError> {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let domains = self.hypervisor.list().await?;
        // After the list: a round that fails there must not lose what a landing decided.
        let mut commands = Vec::new();
        let shut_down = self.land(vms, now_ms, &mut commands).await;
        let timeout_ms = u64::try_from(self.shutdown_timeout.as_millis()).unwrap_or(u64::MAX);
        let p = {
            let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
            let r = Round { me: &self.me, can_start, now_ms, shutdown_timeout_ms: timeout_ms, meta };
            plan(&r, vms, &domains, &mut m)
        };
        *self.unmanaged.lock().unwrap_or_else(|p| p.into_inner()) = p.unmanaged.clone();
        let mut failures = self.act(&p.actions).await;
        // Report what the hypervisor shows now (after the actions), plus refusals as failures.
        let after = if p.actions.is_empty() && !shut_down { domains } else { self.hypervisor.list().await? };
        let state_of = |n: &str| {
            let vm = vms.get(n);
            after
                .iter()
                .find(|d| vm.is_some_and(|v| super::plan::is_ours(d, v)))
                .map_or(ActualState::Missing, |d| d.state)
        };
        for (name, vm) in vms.iter().filter(|(_, v)| v.node == self.me) {
            let observed = state_of(name);
            let failure = failures.remove(name);
            // A live migration's copy runs here before its source released it (libvirt's job
            // may still be finishing, its statistics not kept yet): reported once released,
            // with how it arrived.
            if vm.migrating_from.is_some() && observed == ActualState::Running && failure.is_none() {
                continue;
            }
            // A finished restart, move or shutdown is reported even when the observed state
            // equals the last report, so the record leaves its transitional state.
            let finished = matches!(
                (vm.state, observed),
                (VmState::Restart | VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate, ActualState::Running)
                    | (VmState::Shutdown, ActualState::Shutoff | ActualState::Missing)
            );
            if observed != vm.actual || failure.is_some() || finished {
                let moved =
                    if finished && vm.state != VmState::Restart { Some(self.arrival(name).await) } else { None };
                commands.push(Command::ReportVm {
                    name: name.clone(),
                    node: self.me.clone(),
                    actual: observed,
                    failure,
                    moved,
                });
            }
        }
        for (name, running) in &p.strays {
            commands.push(Command::ReportStray { name: name.clone(), node: self.me.clone(), running: *running });
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
        Ok(Outcome { commands, running: u32::try_from(running).unwrap_or(u32::MAX), held_back: p.held_back })
    }

    /// Carries out a round's actions; returns the refusals, by VM, as failures to report. Each
    /// VM's actions run in the plan's order; different VMs run side by side (at most
    /// [`PARALLEL_VMS`]), so a host taking over a fenced node's guests starts them together
    /// rather than one qemu after another.
    async fn act(&self, actions: &[Action]) -> BTreeMap<String, String> {
        let mut groups: Vec<Vec<&Action>> = Vec::new();
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for a in actions {
            let k = *index.entry(a.vm()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[k].push(a);
        }
        // The futures made first: a closure inside the stream would keep the round's future
        // from being Send (a higher-ranked lifetime the compiler cannot prove).
        let each: Vec<_> = groups.into_iter().map(|g| self.act_on_vm(g)).collect();
        let failures: Vec<Option<(String, String)>> =
            futures::stream::iter(each).buffer_unordered(PARALLEL_VMS).collect().await;
        failures.into_iter().flatten().collect()
    }

    /// One VM's actions, in order; a failed define skips its start. Returns its last refusal.
    async fn act_on_vm(&self, actions: Vec<&Action>) -> Option<(String, String)> {
        let mut failure = None;
        for a in actions {
            let (vm, r) = match a {
                Action::MigrateLive { vm, to } => {
                    let uri = self.migrate_uri.replace("{node}", to);
                    if self.migrations.launch(self.hypervisor.clone(), vm, to, uri.clone()) {
                        tracing::info!(vm = %vm, "hypervisor: live migration to {to} ({uri}) started");
                    } else {
                        // parallel_migrations in the air: the next round tries again.
                        self.memory.lock().unwrap_or_else(|p| p.into_inner()).live_tried.remove(vm);
                    }
                    continue;
                }
                Action::Define { vm, xml } => (vm, self.hypervisor.define(xml).await),
                Action::Start { .. } if failure.is_some() => continue,
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
                    failure = Some((vm.clone(), format!("on {}: {e}", self.me)));
                }
            }
        }
        failure
    }
}
