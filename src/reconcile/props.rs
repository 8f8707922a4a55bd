//! Property test (issue 21): the model and the reconcilers together. Random sequences of
//! operator commands (define, state changes, migrate/move/unmigrate, live-only moves) and
//! crashes are applied to a three-node cluster whose nodes each run a [`Reconciler`] on an
//! in-memory hypervisor that behaves like libvirt's test driver (it refuses live migration).
//! After every command the reconcilers run until nothing changes, and then:
//! - no VM ever runs on two nodes (checked after every round);
//! - every VM whose record says it should run runs on its node, once;
//! - a VM that ran before an accepted command that does not stop it still runs (a refused
//!   live-only move leaves it running, in `fail`);
//! - a VM that should not run runs nowhere.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use herd_storage::model::*;
use proptest::prelude::*;

use super::Reconciler;
use crate::hypervisor::memory::MemoryHypervisor;
use crate::hypervisor::Hypervisor;

const NODES: [&str; 3] = ["a", "b", "c"];
const VMS: [&str; 3] = ["v0", "v1", "v2"];

#[derive(Clone, Debug)]
enum Step {
    Define {
        vm: usize,
        node: usize,
    },
    State {
        vm: usize,
        to: VmState,
    },
    Migrate {
        vm: usize,
        to: usize,
        how: VmState,
        permanent: bool,
    },
    Unmigrate {
        vm: usize,
    },
    /// The domain dies behind herd's back (a crash, or an operator's `virsh destroy`).
    Crash {
        vm: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let state = prop_oneof![
        Just(VmState::Start),
        Just(VmState::Stop),
        Just(VmState::Shutdown),
        Just(VmState::Restart),
        Just(VmState::Disable)
    ];
    let how = prop_oneof![Just(VmState::Migrate), Just(VmState::MigrateLive)];
    prop_oneof![
        (0..3usize, 0..3usize).prop_map(|(vm, node)| Step::Define { vm, node }),
        (0..3usize, state).prop_map(|(vm, to)| Step::State { vm, to }),
        (0..3usize, 0..3usize, how, any::<bool>()).prop_map(|(vm, to, how, permanent)| Step::Migrate {
            vm,
            to,
            how,
            permanent
        }),
        (0..3usize).prop_map(|vm| Step::Unmigrate { vm }),
        (0..3usize).prop_map(|vm| Step::Crash { vm }),
    ]
}

fn node(name: &str) -> NodeRecord {
    NodeRecord {
        id: 1,
        name: name.into(),
        role: Role::Hypervisor,
        cluster_addr: format!("{name}:1"),
        daemon_state: DaemonState::Run,
        domain_state: DomainState::Ready,
        router_state: RouterState::Client,
        return_by_ms: None,
        stats: NodeStats { cpu_count: 8, mem_total_mib: 64_000, ..Default::default() },
        last_keepalive_ms: None,
        heartbeat: Default::default(),
        fencing: None,
        fence: Default::default(),
        health: None,
        joined_ms: 0,
        revision: 1,
    }
}

fn spec(vm: usize) -> VmSpec {
    let name = VMS[vm];
    let uuid = format!("00000000-0000-4000-8000-0000000000{vm:02}");
    VmSpec {
        xml: format!("<domain type='test'><name>{name}</name><uuid>{uuid}</uuid></domain>"),
        uuid,
        name: name.into(),
        memory_mib: 256,
        vcpus: 1,
        selector: None,
        node_limit: vec![],
        autostart: false,
        migration_method: MigrationMethod::None,
    }
}

/// The cluster: the model's state, and per node a hypervisor and its reconciler.
struct World {
    state: State,
    index: u64,
    hosts: Vec<MemoryHypervisor>,
    reconcilers: Vec<Reconciler>,
}

impl World {
    fn new() -> World {
        let mut state = State::default();
        for n in NODES {
            state.nodes.insert(n.into(), node(n));
        }
        state.meta = Some(ClusterMeta {
            cluster_id: "c".into(),
            created_ms: 0,
            maintenance: false,
            maintenance_at: 0,
            join_token_hashes: Default::default(),
            join_tokens: Default::default(),
            next_node_id: 4,
            revision: 1,
        });
        let hosts: Vec<MemoryHypervisor> = NODES.iter().map(|_| MemoryHypervisor::new()).collect();
        let reconcilers = NODES
            .iter()
            .zip(&hosts)
            .map(|(n, h)| {
                let h: Arc<dyn Hypervisor> = Arc::new(h.clone());
                Reconciler::new(n.to_string(), h, Duration::ZERO)
            })
            .collect();
        World { state, index: 1, hosts, reconcilers }
    }

    fn apply(&mut self, cmd: Command) -> bool {
        self.index += 1;
        let req = Request { id: format!("r{}", self.index), time_ms: self.index, ops: vec![cmd.into()] };
        apply(&mut self.state, self.index, &req).response.result.is_ok()
    }

    /// The nodes whose hypervisor runs `vm`.
    fn running_on(&self, vm: &str) -> Vec<String> {
        NODES
            .iter()
            .zip(&self.hosts)
            .filter(|(_, h)| h.domains().iter().any(|d| d.name == vm && d.state == ActualState::Running))
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Reconcile rounds on every node until a round changes nothing (at most 12).
    async fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..12 {
            let before = self.index;
            let mut acted = false;
            for i in 0..NODES.len() {
                let domains = self.hosts[i].domains();
                let out = self.reconcilers[i]
                    .round(&self.state.vms, self.state.meta.as_ref(), true)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                acted |= self.hosts[i].domains() != domains;
                for cmd in out.commands {
                    self.apply(cmd);
                }
                for vm in VMS {
                    let on = self.running_on(vm);
                    prop_assert!(on.len() <= 1, "{vm} runs on {on:?}");
                }
            }
            // A live migration in the air lands on its own task: let it run, then go on.
            let flying = self.reconcilers.iter().any(|r| !r.migrations.list().is_empty());
            if flying {
                tokio::task::yield_now().await;
            }
            if !acted && !flying && self.index == before {
                return Ok(());
            }
        }
        Ok(())
    }
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut w = World::new();
    for s in steps {
        let ran_before: BTreeMap<&str, bool> = VMS.iter().map(|v| (*v, !w.running_on(v).is_empty())).collect();
        let (vm, stops) = match &s {
            Step::Define { vm, node } => {
                w.apply(Command::DefineVm { spec: spec(*vm), node: NODES[*node].into() });
                (*vm, false)
            }
            Step::State { vm, to } => {
                let accepted = w.apply(Command::SetVmState { name: VMS[*vm].into(), state: *to });
                (*vm, accepted && !to.wants_running())
            }
            Step::Migrate { vm, to, how, permanent } => {
                let cmd = Command::MigrateVm {
                    name: VMS[*vm].into(),
                    to: NODES[*to].into(),
                    state: *how,
                    permanent: *permanent,
                };
                w.apply(cmd);
                (*vm, false)
            }
            Step::Unmigrate { vm } => {
                let to = w.state.vms.get(VMS[*vm]).and_then(|v| v.last_node.clone()).unwrap_or_default();
                w.apply(Command::MigrateVm { name: VMS[*vm].into(), to, state: VmState::Unmigrate, permanent: false });
                (*vm, false)
            }
            Step::Crash { vm } => {
                for h in &w.hosts {
                    let _ = h.destroy(VMS[*vm]).await;
                }
                (*vm, false)
            }
        };
        w.settle().await?;
        for (name, rec) in &w.state.vms {
            let on = w.running_on(name);
            if rec.state.wants_running() {
                prop_assert_eq!(
                    &on,
                    &vec![rec.node.clone()],
                    "{} should run on {} ({:?}) after {:?}",
                    name,
                    rec.node,
                    rec,
                    s
                );
            } else if rec.state != VmState::Fail {
                prop_assert!(on.is_empty(), "{} should not run ({:?}) after {:?}", name, rec, s);
            }
            // No outage from a command that does not stop it (a crash is a fault, not a command).
            let touched = VMS[vm] == name.as_str();
            if ran_before[name.as_str()] && !(touched && (stops || matches!(s, Step::Crash { .. }))) {
                prop_assert_eq!(on.len(), 1, "{} ran before {:?} and no longer runs ({:?})", name, s, rec);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]
    #[test]
    fn accepted_commands_reach_their_end_and_never_cause_an_outage(steps in prop::collection::vec(step(), 1..14)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| TestCaseError::fail(e.to_string()))?;
        rt.block_on(run(steps))?;
    }
}
