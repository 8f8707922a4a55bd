//! Tests of the VM commands and of placement: table tests and proptest properties.

use herd_storage::model::*;
use proptest::prelude::*;

fn node(name: &str, state: DaemonState, domain: DomainState, stats: NodeStats) -> NodeRecord {
    NodeRecord {
        id: 1,
        name: name.into(),
        role: Role::Hypervisor,
        cluster_addr: format!("{name}:1"),
        daemon_state: state,
        domain_state: domain,
        router_state: RouterState::Client,
        return_by_ms: None,
        stats,
        last_keepalive_ms: None,
        heartbeat: Default::default(),
        fencing: None,
        fence: Default::default(),
        health: None,
        joined_ms: 0,
        revision: 1,
    }
}

fn stats(free: u64, prov: u64, load: u64, vcpus: u32, vms: u32) -> NodeStats {
    NodeStats {
        cpu_count: 8,
        load_milli: load,
        mem_total_mib: 64_000,
        mem_used_mib: 64_000 - free,
        vms_running: vms,
        mem_allocated_mib: 0,
        mem_provisioned_mib: prov,
        vcpus_allocated: vcpus,
        stale: false,
        unmanaged_domains: vec![],
        session_self_fence: false,
        session_only: false,
    }
}

pub(crate) fn three() -> State {
    let mut s = State::default();
    s.nodes.insert("a".into(), node("a", DaemonState::Run, DomainState::Ready, stats(10_000, 30_000, 500, 4, 3)));
    s.nodes.insert("b".into(), node("b", DaemonState::Run, DomainState::Ready, stats(20_000, 50_000, 900, 2, 5)));
    s.nodes.insert("c".into(), node("c", DaemonState::Run, DomainState::Ready, stats(5_000, 10_000, 100, 8, 1)));
    s
}

#[test]
fn each_selector_picks_its_best_node() {
    let s = three();
    for (sel, want) in [
        (Selector::Mem, "b"),
        (Selector::Memprov, "c"),
        (Selector::Load, "c"),
        (Selector::Vcpus, "b"),
        (Selector::Vms, "c"),
    ] {
        assert_eq!(place(&s, sel, &[], None), Ok(want.to_string()), "{sel}");
    }
}

#[test]
fn placement_honours_state_limit_and_exclusion() {
    let mut s = three();
    assert_eq!(place(&s, Selector::Mem, &["a".into(), "c".into()], None), Ok("a".into()));
    assert_eq!(place(&s, Selector::Mem, &[], Some("b")), Ok("a".into()));
    if let Some(n) = s.nodes.get_mut("b") {
        n.domain_state = DomainState::Flushed;
    }
    if let Some(n) = s.nodes.get_mut("a") {
        n.daemon_state = DaemonState::Dead;
    }
    assert_eq!(place(&s, Selector::Mem, &[], None), Ok("c".into()));
    let e = place(&s, Selector::Mem, &[], Some("c"));
    assert!(matches!(e, Err(ApplyError::NoNodeFits(ref m)) if m.contains("run/ready: [c]")), "{e:?}");
}

#[test]
fn placements_not_yet_reported_count_against_a_node() {
    let mut s = State::default();
    for n in ["a", "b"] {
        s.nodes.insert(n.into(), node(n, DaemonState::Run, DomainState::Ready, stats(8_000, 0, 0, 0, 0)));
    }
    let mut first = spec("one", 1);
    first.memory_mib = 4_000;
    s.vms.insert(
        "one".into(),
        VmRecord {
            last_move: None,
            spec: first,
            state: VmState::Start,
            node: "a".into(),
            last_node: None,
            failure_reason: None,
            actual: ActualState::Unknown,
            migrating_from: None,
            waiting: None,
            seen_on: Default::default(),
            desired_at: 0,
            revision: 1,
        },
    );
    assert_eq!(place(&s, Selector::Mem, &[], None), Ok("b".into()));
    assert_eq!(place(&s, Selector::Vms, &[], None), Ok("b".into()));
    assert_eq!(place(&s, Selector::Memprov, &[], None), Ok("b".into()));
}

#[test]
fn ties_go_to_the_smallest_name() {
    let mut s = State::default();
    for n in ["z", "m", "b"] {
        s.nodes.insert(n.into(), node(n, DaemonState::Run, DomainState::Ready, stats(1, 1, 1, 1, 1)));
    }
    assert_eq!(place(&s, Selector::Vms, &[], None), Ok("b".into()));
}

pub(crate) fn spec(name: &str, uuid_tail: u8) -> VmSpec {
    VmSpec {
        uuid: format!("00000000-0000-0000-0000-0000000000{uuid_tail:02x}"),
        name: name.into(),
        xml: "<domain type='test'/>".into(),
        memory_mib: 512,
        vcpus: 1,
        selector: None,
        node_limit: vec![],
        autostart: false,
        migration_method: MigrationMethod::None,
    }
}

pub(crate) fn run(s: &mut State, index: u64, cmd: Command) -> Result<Reply, ApplyError> {
    apply(s, index, &Request { id: format!("r{index}"), time_ms: index, ops: vec![cmd.into()] }).response.result
}

#[test]
fn an_aborted_live_migration_leaves_the_vm_failed_on_its_source() {
    let mut s = three();
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    let live = Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::MigrateLive, permanent: false };
    assert_eq!(run(&mut s, 2, live), Ok(Reply::Done));
    let abort = |node: &str| Command::AbortMigration { name: "web".into(), node: node.into(), reason: "no".into() };
    // Only the source can abort.
    assert!(matches!(run(&mut s, 3, abort("b")), Err(ApplyError::Invalid(_))));
    assert_eq!(run(&mut s, 4, abort("a")), Ok(Reply::Done));
    let vm = &s.vms["web"];
    assert_eq!((vm.node.as_str(), vm.last_node.as_deref(), vm.state), ("a", None, VmState::Fail));
    assert_eq!(vm.migrating_from, None);
    assert!(vm.failure_reason.as_deref().is_some_and(|r| r.contains("to b failed: no")), "{vm:?}");
    // Nothing moving any more: a second abort is refused.
    assert!(run(&mut s, 5, abort("a")).is_err());
    // An aborted unmigrate keeps the home it was going back to.
    assert_eq!(run(&mut s, 6, Command::SetVmState { name: "web".into(), state: VmState::Start }), Ok(Reply::Done));
    let away = Command::MigrateVm { name: "web".into(), to: "c".into(), state: VmState::Migrate, permanent: false };
    assert_eq!(run(&mut s, 7, away), Ok(Reply::Done));
    let release = Command::ReleaseVm { name: "web".into(), node: "a".into() };
    assert_eq!(run(&mut s, 8, release), Ok(Reply::Done));
    let back = Command::MigrateVm { name: "web".into(), to: "a".into(), state: VmState::Unmigrate, permanent: false };
    assert_eq!(run(&mut s, 9, back), Ok(Reply::Done));
    assert_eq!(run(&mut s, 10, abort("c")), Ok(Reply::Done));
    let vm = &s.vms["web"];
    assert_eq!((vm.node.as_str(), vm.last_node.as_deref(), vm.state), ("c", Some("a"), VmState::Fail));
}

/// Issue 21: `vm migrate` of a VM that a refused live-only move left in `fail`, still running
/// on its source, is a move of a VM that should run (stopped there, started on the target);
/// a failed VM known to be off is refused, with what to do, and nothing changes.
#[test]
fn migrating_a_failed_vm_that_still_runs_starts_it_on_the_target() {
    let mut s = three();
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    let live = Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::MigrateLive, permanent: false };
    assert_eq!(run(&mut s, 2, live), Ok(Reply::Done));
    let abort = Command::AbortMigration { name: "web".into(), node: "a".into(), reason: "no".into() };
    assert_eq!(run(&mut s, 3, abort), Ok(Reply::Done));
    let running = Command::ReportVm {
        name: "web".into(),
        node: "a".into(),
        actual: ActualState::Running,
        failure: None,
        moved: None,
    };
    assert_eq!(run(&mut s, 4, running), Ok(Reply::Done));
    assert_eq!(s.vms["web"].state, VmState::Fail);
    let plain = Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::Migrate, permanent: false };
    assert_eq!(run(&mut s, 5, plain.clone()), Ok(Reply::Done));
    let vm = &s.vms["web"];
    assert_eq!((vm.node.as_str(), vm.state, vm.migrating_from.as_deref()), ("b", VmState::Migrate, Some("a")));
    assert!(vm.state.wants_running(), "the target starts it once the source released it");
    assert_eq!(vm.failure_reason, None);

    // Failed and off: refused, unchanged.
    let mut s = three();
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    let live = Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::MigrateLive, permanent: false };
    assert_eq!(run(&mut s, 2, live), Ok(Reply::Done));
    let abort = Command::AbortMigration { name: "web".into(), node: "a".into(), reason: "no".into() };
    assert_eq!(run(&mut s, 3, abort), Ok(Reply::Done));
    let off = Command::ReportVm {
        name: "web".into(),
        node: "a".into(),
        actual: ActualState::Shutoff,
        failure: None,
        moved: None,
    };
    assert_eq!(run(&mut s, 4, off), Ok(Reply::Done));
    let before = s.vms["web"].clone();
    let refused = run(&mut s, 5, plain);
    assert!(matches!(&refused, Err(ApplyError::Invalid(m)) if m.contains("vm start web")), "{refused:?}");
    assert_eq!(s.vms["web"], before);
}

#[test]
fn a_stopped_vm_that_may_still_run_moves_only_once_released() {
    // Found by the simulation (seed 1347): the old node's daemon was down while the domain
    // ran on; `vm stop`, `vm migrate`, `vm start` started it on the new node as well.
    let mut s = three();
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    let report =
        |actual| Command::ReportVm { name: "web".into(), node: "a".into(), actual, failure: None, moved: None };
    assert_eq!(run(&mut s, 2, report(ActualState::Running)), Ok(Reply::Done));
    assert_eq!(run(&mut s, 3, Command::SetVmState { name: "web".into(), state: VmState::Stop }), Ok(Reply::Done));
    let to =
        |n: &str| Command::MigrateVm { name: "web".into(), to: n.into(), state: VmState::Migrate, permanent: false };
    assert_eq!(run(&mut s, 4, to("b")), Ok(Reply::Done));
    let vm = &s.vms["web"];
    assert_eq!((vm.node.as_str(), vm.migrating_from.as_deref(), vm.state), ("b", Some("a"), VmState::Stop));
    // Started again, it still waits for a's release (the reconciler starts none before).
    assert_eq!(run(&mut s, 5, Command::SetVmState { name: "web".into(), state: VmState::Start }), Ok(Reply::Done));
    assert_eq!(s.vms["web"].migrating_from.as_deref(), Some("a"));
    assert_eq!(run(&mut s, 6, Command::ReleaseVm { name: "web".into(), node: "a".into() }), Ok(Reply::Done));
    assert_eq!(s.vms["web"].migrating_from, None);
    // One last seen off just changes node.
    let report_b = Command::ReportVm {
        name: "web".into(),
        node: "b".into(),
        actual: ActualState::Shutoff,
        failure: None,
        moved: None,
    };
    assert_eq!(run(&mut s, 7, Command::SetVmState { name: "web".into(), state: VmState::Stop }), Ok(Reply::Done));
    assert_eq!(run(&mut s, 8, report_b), Ok(Reply::Done));
    assert_eq!(run(&mut s, 9, to("c")), Ok(Reply::Done));
    assert_eq!((s.vms["web"].node.as_str(), s.vms["web"].migrating_from.as_deref()), ("c", None));
}

#[test]
fn modify_replaces_xml_and_resources_under_compare_and_set() {
    let mut s = three();
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    let modify = |m: u64| Command::ModifyVm {
        name: "web".into(),
        xml: "<domain type='test'><name>web</name></domain>".into(),
        memory_mib: Some(m),
        vcpus: Some(2),
    };
    // A stale revision, zero memory, an unknown VM: refused, nothing changed.
    let before = s.vms.clone();
    let stale = Op { cmd: modify(1024), expect_revision: Some(7) };
    let run_op = |s: &mut State, index: u64, op: Op| {
        apply(s, index, &Request { id: format!("r{index}"), time_ms: index, ops: vec![op] }).response.result
    };
    assert!(matches!(run_op(&mut s, 2, stale), Err(ApplyError::RevisionMismatch { .. })));
    assert!(matches!(run(&mut s, 3, modify(0)), Err(ApplyError::Invalid(_))));
    let ghost = Command::ModifyVm { name: "db".into(), xml: "<domain/>".into(), memory_mib: None, vcpus: None };
    assert!(matches!(run(&mut s, 4, ghost), Err(ApplyError::NoSuchVm(_))));
    assert_eq!(s.vms, before);
    let fresh = Op { cmd: modify(1024), expect_revision: Some(1) };
    assert_eq!(run_op(&mut s, 5, fresh), Ok(Reply::Done));
    let vm = &s.vms["web"];
    assert_eq!((vm.spec.memory_mib, vm.spec.vcpus, vm.revision), (1024, 2, 5));
    assert!(vm.spec.xml.contains("<name>web</name>"));
    assert_eq!(vm.state, VmState::Start, "a modify does not change the operator state");
}

#[test]
fn vm_lifecycle_and_migrations() {
    let s = lifecycle_define(three());
    let s = lifecycle_migrate(s);
    lifecycle_fail_and_undefine(s);
}

/// `vm_lifecycle_and_migrations`, part 1: define, and the refused definitions.
fn lifecycle_define(mut s: State) -> State {
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    assert_eq!(s.vms["web"].state, VmState::Start);
    // Name or uuid clash; unknown node; bad uuid; empty XML: refused, nothing changed.
    let before = s.vms.clone();
    assert!(matches!(
        run(&mut s, 2, Command::DefineVm { spec: spec("web", 9), node: "b".into() }),
        Err(ApplyError::VmExists { .. })
    ));
    assert!(matches!(
        run(&mut s, 3, Command::DefineVm { spec: spec("db", 1), node: "b".into() }),
        Err(ApplyError::VmExists { .. })
    ));
    assert!(matches!(
        run(&mut s, 4, Command::DefineVm { spec: spec("db", 2), node: "x".into() }),
        Err(ApplyError::NoSuchNode(_))
    ));
    let mut bad = spec("db", 2);
    bad.uuid = "not-a-uuid".into();
    assert!(matches!(run(&mut s, 5, Command::DefineVm { spec: bad, node: "b".into() }), Err(ApplyError::Invalid(_))));
    let mut empty = spec("db", 2);
    empty.xml.clear();
    assert!(matches!(run(&mut s, 6, Command::DefineVm { spec: empty, node: "b".into() }), Err(ApplyError::Invalid(_))));
    assert_eq!(s.vms, before);
    s
}

/// Part 2: migrations, releases, reports from the nodes, unmigrate, a permanent move.
fn lifecycle_migrate(mut s: State) -> State {
    // Migrate: never to its own node; remembers home; unmigrate goes back and forgets it.
    assert!(matches!(
        run(
            &mut s,
            7,
            Command::MigrateVm { name: "web".into(), to: "a".into(), state: VmState::Migrate, permanent: false }
        ),
        Err(ApplyError::Invalid(_))
    ));
    assert_eq!(
        run(
            &mut s,
            8,
            Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::Migrate, permanent: false }
        ),
        Ok(Reply::Done)
    );
    assert_eq!(
        (s.vms["web"].node.as_str(), s.vms["web"].last_node.as_deref(), s.vms["web"].state),
        ("b", Some("a"), VmState::Migrate)
    );
    // Moving on before the source released it is refused; only the source can release it.
    assert_eq!(s.vms["web"].migrating_from.as_deref(), Some("a"));
    let again = Command::MigrateVm { name: "web".into(), to: "c".into(), state: VmState::Migrate, permanent: false };
    assert!(run(&mut s, 80, again).is_err());
    assert!(run(&mut s, 81, Command::ReleaseVm { name: "web".into(), node: "b".into() }).is_err());
    assert_eq!(run(&mut s, 82, Command::ReleaseVm { name: "web".into(), node: "a".into() }), Ok(Reply::Done));
    assert_eq!(s.vms["web"].migrating_from, None);
    // A second temporary migration keeps the original home.
    assert_eq!(
        run(
            &mut s,
            9,
            Command::MigrateVm { name: "web".into(), to: "c".into(), state: VmState::Migrate, permanent: false }
        ),
        Ok(Reply::Done)
    );
    assert_eq!(s.vms["web"].last_node.as_deref(), Some("a"));
    assert_eq!(run(&mut s, 90, Command::ReleaseVm { name: "web".into(), node: "b".into() }), Ok(Reply::Done));
    // A stale report from the node it left is refused; the new node's report ends the move.
    assert!(run(
        &mut s,
        10,
        Command::ReportVm {
            name: "web".into(),
            node: "b".into(),
            actual: ActualState::Running,
            failure: None,
            moved: None
        }
    )
    .is_err());
    assert_eq!(
        run(
            &mut s,
            11,
            Command::ReportVm {
                name: "web".into(),
                node: "c".into(),
                actual: ActualState::Running,
                failure: None,
                moved: None
            }
        ),
        Ok(Reply::Done)
    );
    assert_eq!(s.vms["web"].state, VmState::Start);
    // A temporary move back to the home is arriving home: never node == last_node.
    let home = Command::MigrateVm { name: "web".into(), to: "a".into(), state: VmState::Migrate, permanent: false };
    let mut probe = s.clone();
    assert_eq!(run(&mut probe, 500, home), Ok(Reply::Done));
    assert_eq!((probe.vms["web"].node.as_str(), probe.vms["web"].last_node.as_deref()), ("a", None));
    assert!(
        run(
            &mut s,
            12,
            Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::Unmigrate, permanent: false }
        )
        .is_err(),
        "unmigrate only to last_node"
    );
    assert_eq!(
        run(
            &mut s,
            13,
            Command::MigrateVm { name: "web".into(), to: "a".into(), state: VmState::Unmigrate, permanent: false }
        ),
        Ok(Reply::Done)
    );
    assert_eq!((s.vms["web"].node.as_str(), s.vms["web"].last_node.as_deref()), ("a", None));
    assert_eq!(run(&mut s, 91, Command::ReleaseVm { name: "web".into(), node: "c".into() }), Ok(Reply::Done));
    // A permanent move forgets the home.
    assert_eq!(
        run(
            &mut s,
            14,
            Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::Migrate, permanent: true }
        ),
        Ok(Reply::Done)
    );
    assert_eq!(s.vms["web"].last_node, None);
    assert_eq!(run(&mut s, 92, Command::ReleaseVm { name: "web".into(), node: "a".into() }), Ok(Reply::Done));
    s
}

/// Part 3: failure reports, shutdown, undefine.
fn lifecycle_fail_and_undefine(mut s: State) {
    // Undefine only when stopped; a failure report puts it in fail with the reason.
    assert!(run(&mut s, 15, Command::UndefineVm { name: "web".into() }).is_err());
    assert_eq!(
        run(
            &mut s,
            16,
            Command::ReportVm {
                name: "web".into(),
                node: "b".into(),
                actual: ActualState::Shutoff,
                failure: Some("libvirt: no such disk".into()),
                moved: None
            }
        ),
        Ok(Reply::Done)
    );
    assert_eq!(
        (s.vms["web"].state, s.vms["web"].failure_reason.as_deref()),
        (VmState::Fail, Some("libvirt: no such disk"))
    );
    assert!(s.events.iter().any(|e| e.kind == "vm-fail"));
    assert_eq!(run(&mut s, 17, Command::SetVmState { name: "web".into(), state: VmState::Start }), Ok(Reply::Done));
    assert_eq!(s.vms["web"].failure_reason, None);
    assert_eq!(run(&mut s, 18, Command::SetVmState { name: "web".into(), state: VmState::Shutdown }), Ok(Reply::Done));
    assert_eq!(
        run(
            &mut s,
            19,
            Command::ReportVm {
                name: "web".into(),
                node: "b".into(),
                actual: ActualState::Shutoff,
                failure: None,
                moved: None
            }
        ),
        Ok(Reply::Done)
    );
    assert_eq!(s.vms["web"].state, VmState::Stop);
    assert!(matches!(
        run(&mut s, 20, Command::SetVmState { name: "web".into(), state: VmState::Migrate }),
        Err(ApplyError::Invalid(_))
    ));
    assert_eq!(run(&mut s, 21, Command::UndefineVm { name: "web".into() }), Ok(Reply::Done));
    assert!(s.vms.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever VM commands arrive, in whatever order: a VM is always on a known node, never
    /// remembers its current node as its home or as the node it is leaving, and a refused
    /// command changes nothing; an accepted one reaches its promised end (a migrated running
    /// VM should run; a fence recovery keeps every VM that should run running or waiting).
    #[test]
    fn vm_transitions_keep_their_invariants(
        cmds in proptest::collection::vec((0u8..13, 0u8..2, 0u8..3, 0u8..6, any::<bool>()), 1..60),
    ) {
        let nodes = ["a", "b", "c"];
        let states = [VmState::Start, VmState::Stop, VmState::Shutdown, VmState::Restart, VmState::Disable, VmState::Fail];
        let mut s = three();
        for n in s.nodes.values_mut() {
            n.fencing = Some(FencePolicy { fence_action: FenceAction::Off, ..FencePolicy::ipmi("b:623", "u", "p") });
        }
        for (i, (kind, vm, node, st, flag)) in cmds.into_iter().enumerate() {
            let index = i as u64 + 1;
            let name = ["web", "db"][vm as usize].to_string();
            let n = nodes[node as usize].to_string();
            let cmd = match kind {
                0 => Command::DefineVm { spec: spec(&name, vm + 1), node: n },
                1 => Command::SetVmState { name, state: states[st as usize] },
                2 => Command::MigrateVm { name, to: n, state: VmState::Migrate, permanent: flag },
                3 => Command::MigrateVm { name, to: n, state: VmState::Unmigrate, permanent: false },
                4 => Command::MigrateVm { name, to: n, state: VmState::MigrateLive, permanent: false },
                5 => Command::ReleaseVm { name, node: n },
                6 => Command::AbortMigration { name, node: n, reason: "refused".into() },
                7 => Command::ReportVm { name, node: n, actual: if flag { ActualState::Running } else { ActualState::Shutoff }, failure: None, moved: None },
                8 => Command::UndefineVm { name },
                9 => Command::DecideFence { name: n, reason: "lost".into(), manual: flag },
                10 => Command::FenceDone {
                    name: n,
                    outcome: if flag { FenceOutcome::Fenced } else { FenceOutcome::Failed { reason: "no answer".into() } },
                },
                11 => Command::Keepalive { name: n, stats: NodeStats::default(), node_id: None },
                _ => Command::SetDomainState { name: n, state: DomainState::Unflush, node_id: None },
            };
            let before = s.vms.clone();
            let migration = matches!(cmd, Command::MigrateVm { .. });
            let fenced_now = matches!(cmd, Command::FenceDone { outcome: FenceOutcome::Fenced, .. });
            if run(&mut s, index, cmd).is_err() {
                prop_assert_eq!(&s.vms, &before, "a refusal changed VMs");
            } else {
                // Commands complete or are refused (issue 21): an accepted migration of a VM
                // that runs promises it runs on the target; a fence recovery never gives up
                // on a VM that should run (moved, or waiting for a node that fits).
                for (name, was) in &before {
                    let Some(now) = s.vms.get(name) else { continue };
                    // (One the operator stopped moves stopped.)
                    let should_run = was.state.wants_running() || was.state == VmState::Fail;
                    let maybe_running = !matches!(was.actual, ActualState::Shutoff | ActualState::Crashed | ActualState::Missing);
                    if migration && should_run && maybe_running && now.node != was.node {
                        prop_assert!(now.state.wants_running(), "a migrated running VM will not run: {:?}", now);
                    }
                    if fenced_now && was.state.wants_running() {
                        prop_assert!(now.state.wants_running(), "recovery gave up on {:?}", now);
                    }
                }
            }
            for vm in s.vms.values() {
                prop_assert!(s.nodes.contains_key(&vm.node), "{:?}", vm);
                // A fenced node runs nothing: its VMs were recovered (or wait for a node that
                // fits, started by no one) and none is placed or moved there until it is ready.
                let fenced = s.nodes.get(&vm.node).is_some_and(|n| n.daemon_state == DaemonState::Fenced);
                prop_assert!(
                    !(fenced && vm.state.wants_running() && vm.waiting.is_none()),
                    "a VM to run on fenced {}: {:?}", vm.node, vm
                );
                // A VM that waits is one that should run, on a node that takes no VMs.
                if vm.waiting.is_some() {
                    prop_assert!(vm.state.wants_running(), "waiting but not to run: {:?}", vm);
                }
                prop_assert!(vm.last_node.as_deref() != Some(vm.node.as_str()), "home is here: {:?}", vm);
                prop_assert!(vm.migrating_from.as_deref() != Some(vm.node.as_str()), "leaving here for here: {:?}", vm);
                prop_assert!(vm.revision <= index);
            }
        }
    }

    /// Whatever the nodes, placement returns an eligible node, the best by the selector, or
    /// fails exactly when no node is eligible.
    #[test]
    fn placement_is_eligible_and_best(
        nodes in proptest::collection::vec((0u8..3, 0u8..2, 0u64..64_000, 0u64..10_000, 0u32..16, 0u32..40), 0..8),
        sel in 0u8..5,
        limit_mask in 0u8..=255,
        exclude in proptest::option::of(0usize..8),
    ) {
        let mut s = State::default();
        for (i, (d, dom, free, load, vcpus, vms)) in nodes.iter().enumerate() {
            let d = [DaemonState::Run, DaemonState::Dead, DaemonState::Init][*d as usize];
            let dom = [DomainState::Ready, DomainState::Flushed][*dom as usize];
            let name = format!("n{i}");
            s.nodes.insert(name.clone(), node(&name, d, dom, stats(*free, *free / 2, *load, *vcpus, *vms)));
        }
        let selector = [Selector::Mem, Selector::Memprov, Selector::Load, Selector::Vcpus, Selector::Vms][sel as usize];
        let limit: Vec<String> = (0..8).filter(|i| limit_mask & (1 << i) != 0).map(|i| format!("n{i}")).collect();
        let exclude = exclude.map(|i| format!("n{i}"));
        let eligible: Vec<&NodeRecord> = s.nodes.values()
            .filter(|n| n.daemon_state == DaemonState::Run && n.domain_state == DomainState::Ready)
            .filter(|n| limit.is_empty() || limit.contains(&n.name))
            .filter(|n| Some(&n.name) != exclude.as_ref())
            .collect();
        match place(&s, selector, &limit, exclude.as_deref()) {
            Ok(chosen) => {
                let c = eligible.iter().find(|n| n.name == chosen);
                prop_assert!(c.is_some(), "chose an ineligible node {}", chosen);
                let key = |n: &NodeRecord| match selector {
                    Selector::Mem => i128::from(n.stats.mem_total_mib) - i128::from(n.stats.mem_used_mib),
                    Selector::Memprov => i128::from(n.stats.mem_total_mib) - i128::from(n.stats.mem_provisioned_mib),
                    Selector::Load => -i128::from(n.stats.load_milli),
                    Selector::Vcpus => -i128::from(n.stats.vcpus_allocated),
                    Selector::Vms => -i128::from(n.stats.vms_running),
                };
                let best = eligible.iter().map(|n| key(n)).max();
                prop_assert_eq!(c.map(|n| key(n)), best);
            }
            Err(_) => prop_assert!(eligible.is_empty()),
        }
    }
}

/// Issue 21, one authority per VM: a copy running where the VM is not assigned is adopted
/// there once its own node reports it off; a copy beside a running one fails the VM naming
/// both nodes; in maintenance drift is only reported, and acted on when maintenance ends.
#[test]
fn a_vm_running_out_of_place_is_adopted_or_failed_never_destroyed() {
    let mut s = three();
    s.meta = Some(ClusterMeta {
        cluster_id: "c".into(),
        created_ms: 0,
        maintenance: false,
        maintenance_at: 0,
        join_token_hashes: Default::default(),
        join_tokens: Default::default(),
        next_node_id: 10,
        revision: 0,
    });
    let report = |node: &str, actual| Command::ReportVm {
        name: "web".into(),
        node: node.into(),
        actual,
        failure: None,
        moved: None,
    };
    let stray = |node: &str, running| Command::ReportStray { name: "web".into(), node: node.into(), running };
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    assert_eq!(run(&mut s, 2, report("a", ActualState::Running)), Ok(Reply::Done));
    // Its own node's report of itself is not a stray; an unknown node is refused.
    assert_eq!(run(&mut s, 3, stray("a", true)), Ok(Reply::Done));
    assert!(s.vms["web"].seen_on.is_empty());
    assert!(run(&mut s, 4, stray("zz", true)).is_err());
    // Started by hand on b while it runs on a: split, failed, both named.
    assert_eq!(run(&mut s, 5, stray("b", true)), Ok(Reply::Done));
    let web = &s.vms["web"];
    assert_eq!((web.state, web.node.as_str()), (VmState::Fail, "a"));
    assert!(web.failure_reason.as_deref().is_some_and(|r| r.contains("running on a and b")), "{web:?}");
    assert!(s.events.iter().any(|e| e.kind == "vm-split"));
    // The operator destroys the copy on a: a reports it off, b's copy is adopted.
    assert_eq!(run(&mut s, 6, report("a", ActualState::Shutoff)), Ok(Reply::Done));
    let web = &s.vms["web"];
    assert_eq!((web.node.as_str(), web.state, web.actual), ("b", VmState::Start, ActualState::Running), "{web:?}");
    assert!(web.seen_on.is_empty());
    assert!(s.events.iter().any(|e| e.kind == "vm-adopted"));

    // In maintenance: drift is reported, nothing adopted, until maintenance ends.
    assert_eq!(run(&mut s, 7, Command::SetMaintenance { on: true }), Ok(Reply::Done));
    assert_eq!(run(&mut s, 8, report("b", ActualState::Shutoff)), Ok(Reply::Done));
    assert_eq!(run(&mut s, 9, stray("c", true)), Ok(Reply::Done));
    let web = &s.vms["web"];
    assert_eq!((web.node.as_str(), web.seen_on.len()), ("b", 1), "{web:?}");
    assert!(s.events.iter().any(|e| e.kind == "vm-drift"));
    assert_eq!(run(&mut s, 10, Command::SetMaintenance { on: false }), Ok(Reply::Done));
    assert_eq!(s.vms["web"].node, "c", "adopted once maintenance ends");
    assert!(s.vms["web"].seen_on.is_empty());
}

/// Issue 21, maintenance: a VM no one commanded since maintenance began is left alone — its
/// drift is an event, nothing more; a command in maintenance makes it the reconcilers' again;
/// a VM waiting for a node is placed only once maintenance ends.
#[test]
fn in_maintenance_drift_is_recorded_and_only_commands_are_acted_on() {
    let mut s = three();
    s.meta = Some(ClusterMeta {
        cluster_id: "c".into(),
        created_ms: 0,
        maintenance: false,
        maintenance_at: 0,
        join_token_hashes: Default::default(),
        join_tokens: Default::default(),
        next_node_id: 10,
        revision: 0,
    });
    let report = |name: &str, actual| Command::ReportVm {
        name: name.into(),
        node: "a".into(),
        actual,
        failure: None,
        moved: None,
    };
    assert_eq!(run(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() }), Ok(Reply::Done));
    assert_eq!(run(&mut s, 2, Command::DefineVm { spec: spec("db", 2), node: "a".into() }), Ok(Reply::Done));
    assert_eq!(run(&mut s, 3, report("web", ActualState::Running)), Ok(Reply::Done));
    assert!(!left_alone(s.meta.as_ref(), &s.vms["web"]), "out of maintenance nothing is left alone");
    assert_eq!(run(&mut s, 4, Command::SetMaintenance { on: true }), Ok(Reply::Done));
    assert_eq!(s.meta.as_ref().map(|m| m.maintenance_at), Some(4));
    assert!(left_alone(s.meta.as_ref(), &s.vms["web"]) && left_alone(s.meta.as_ref(), &s.vms["db"]));
    // web crashes: one drift event naming the node and both states, the state of record kept.
    let drifts = |s: &State| s.events.iter().filter(|e| e.kind == "vm-drift").count();
    assert_eq!(run(&mut s, 5, report("web", ActualState::Crashed)), Ok(Reply::Done));
    assert_eq!(drifts(&s), 1);
    let e = s.events.iter().rev().find(|e| e.kind == "vm-drift").map(|e| e.message.clone()).unwrap_or_default();
    assert!(e.contains("web on a is crashed, should be start"), "{e}");
    assert_eq!(s.vms["web"].state, VmState::Start);
    // The operator stops db and starts web: both are acted on again.
    assert_eq!(run(&mut s, 6, Command::SetVmState { name: "db".into(), state: VmState::Stop }), Ok(Reply::Done));
    assert_eq!(run(&mut s, 7, Command::SetVmState { name: "web".into(), state: VmState::Start }), Ok(Reply::Done));
    assert!(!left_alone(s.meta.as_ref(), &s.vms["web"]) && !left_alone(s.meta.as_ref(), &s.vms["db"]));
    // A report of a commanded VM's progress is no drift.
    assert_eq!(run(&mut s, 8, report("web", ActualState::Shutoff)), Ok(Reply::Done));
    assert_eq!(drifts(&s), 1);
    // Maintenance off: nothing is left alone.
    assert_eq!(run(&mut s, 9, Command::SetMaintenance { on: false }), Ok(Reply::Done));
    assert!(s.vms.values().all(|v| !left_alone(s.meta.as_ref(), v)));
}
