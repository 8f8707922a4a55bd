//! Properties of `apply` over random command sequences (determinism, snapshot round trip,
//! invariants, atomicity of refusals, ids never reused, revisions track the log index).

use std::collections::BTreeSet;

use herd_storage::model::*;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// 5. Properties over random command sequences
// ---------------------------------------------------------------------------------------------

fn config() -> ProptestConfig {
    // No failure persistence: it would write a regressions file next to this one.
    ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => (0..4u8).prop_map(|i| format!("n{i}")),
        1 => Just("bad name".to_string()),
    ]
}

fn addr_strategy() -> impl Strategy<Value = String> {
    (0..4u8).prop_map(|i| format!("n{i}.addr:7000"))
}

fn token_strategy() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just(GOOD.to_string()), 1 => Just(BAD.to_string())]
}

fn role_strategy() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Coordinator), Just(Role::Hypervisor)]
}

fn new_node_strategy() -> impl Strategy<Value = NewNode> {
    // Usually an address of the node's own; sometimes one that another node may hold.
    let addr = prop_oneof![4 => Just(None), 1 => addr_strategy().prop_map(Some)];
    (name_strategy(), role_strategy(), addr).prop_map(|(name, role, addr)| NewNode {
        cluster_addr: addr.unwrap_or_else(|| format!("{name}.addr:7000")),
        name,
        role,
    })
}

fn stats_strategy() -> impl Strategy<Value = NodeStats> {
    (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>()).prop_map(
        |(cpu_count, load_milli, mem_total_mib, mem_used_mib, vms_running, stale)| NodeStats {
            cpu_count,
            load_milli,
            mem_total_mib,
            mem_used_mib,
            vms_running,
            stale,
            ..NodeStats::default()
        },
    )
}

fn daemon_state_strategy() -> impl Strategy<Value = DaemonState> {
    prop_oneof![
        Just(DaemonState::Init),
        Just(DaemonState::Run),
        Just(DaemonState::Shutdown),
        Just(DaemonState::Stop),
        Just(DaemonState::Dead),
        Just(DaemonState::Fenced),
    ]
}

fn command_strategy() -> impl Strategy<Value = Command> {
    prop_oneof![
        1 => (token_strategy(), new_node_strategy()).prop_map(|(token_hash, node)| {
            Command::InitCluster { cluster_id: "c1".into(), token_hash, node }
        }),
        6 => (new_node_strategy(), token_strategy())
            .prop_map(|(node, token_hash)| Command::RegisterNode { node, token_hash }),
        1 => name_strategy().prop_map(|name| Command::RemoveNode { name }),
        4 => (name_strategy(), stats_strategy())
            .prop_map(|(name, stats)| Command::Keepalive { name, stats, node_id: None }),
        3 => (name_strategy(), daemon_state_strategy(), proptest::option::of(0..1_000_000u64))
            .prop_map(|(name, state, return_by_ms)| Command::SetDaemonState {
                name,
                state,
                return_by_ms,
                node_id: None
            }),
        1 => any::<bool>().prop_map(|on| Command::SetMaintenance { on }),
        8 => vm_command_strategy(),
    ]
}

fn vm_name_strategy() -> impl Strategy<Value = String> {
    (0..3u8).prop_map(|i| format!("v{i}"))
}

fn vm_state_strategy() -> impl Strategy<Value = VmState> {
    use VmState::*;
    proptest::sample::select(vec![Start, Restart, Shutdown, Stop, Disable, Fail, Migrate, MigrateLive, Unmigrate])
}

/// What happens to VMs: defined, commanded, moved, reported, released, seen elsewhere, gone;
/// and the domain states that let nodes take them.
fn vm_command_strategy() -> impl Strategy<Value = Command> {
    let actual = proptest::sample::select(vec![ActualState::Running, ActualState::Shutoff, ActualState::Missing]);
    prop_oneof![
        3 => (vm_name_strategy(), name_strategy()).prop_map(|(name, node)| {
            let uuid = format!("00000000-0000-4000-8000-00000000000{}", &name[1..]);
            let xml = format!("<domain><name>{name}</name><uuid>{uuid}</uuid></domain>");
            let spec = VmSpec {
                uuid,
                name,
                xml,
                memory_mib: 512,
                vcpus: 1,
                selector: None,
                node_limit: Vec::new(),
                autostart: false,
                migration_method: MigrationMethod::None,
            };
            Command::DefineVm { spec, node }
        }),
        2 => (vm_name_strategy(), vm_state_strategy()).prop_map(|(name, state)| Command::SetVmState { name, state }),
        2 => (vm_name_strategy(), name_strategy(), vm_state_strategy(), any::<bool>())
            .prop_map(|(name, to, state, permanent)| Command::MigrateVm { name, to, state, permanent }),
        2 => (vm_name_strategy(), name_strategy(), actual)
            .prop_map(|(name, node, actual)| Command::ReportVm { name, node, actual, failure: None, moved: None }),
        2 => (vm_name_strategy(), name_strategy()).prop_map(|(name, node)| Command::ReleaseVm { name, node }),
        1 => (vm_name_strategy(), name_strategy(), any::<bool>())
            .prop_map(|(name, node, running)| Command::ReportStray { name, node, running }),
        1 => vm_name_strategy().prop_map(|name| Command::UndefineVm { name }),
        2 => (name_strategy(), proptest::sample::select(vec![DomainState::Ready, DomainState::Flush, DomainState::Unflush]))
            .prop_map(|(name, state)| Command::SetDomainState { name, state, node_id: None }),
    ]
}

/// A keepalive alone: requests of them only are what coordinators write for their clients,
/// and `apply` backs up only the records they name.
fn keepalive_op_strategy() -> impl Strategy<Value = Op> {
    let expect = prop_oneof![5 => Just(None), 1 => (0..12u64).prop_map(Some)];
    (name_strategy(), stats_strategy(), expect).prop_map(|(name, stats, expect_revision)| Op {
        cmd: Command::Keepalive { name, stats, node_id: None },
        expect_revision,
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let expect = prop_oneof![5 => Just(None), 1 => (0..12u64).prop_map(Some)];
    (command_strategy(), expect).prop_map(|(cmd, expect_revision)| Op { cmd, expect_revision })
}

/// A request id from a small pool, so that retries (dedup) happen too.
fn request_strategy() -> impl Strategy<Value = Request> {
    let ops = prop_oneof![
        8 => proptest::collection::vec(op_strategy(), 1..=1),
        2 => proptest::collection::vec(op_strategy(), 2..=4),
        1 => proptest::collection::vec(keepalive_op_strategy(), 2..=4),
        1 => Just(Vec::new()),
    ];
    (0..100u32, 0..100_000u64, ops).prop_map(|(id, time_ms, ops)| Request { id: format!("r{id}"), time_ms, ops })
}

/// Random requests, usually starting with a good init-cluster so that most steps do something.
fn sequence_strategy() -> impl Strategy<Value = Vec<Request>> {
    (proptest::bool::weighted(0.85), proptest::collection::vec(request_strategy(), 0..40)).prop_map(
        |(start_with_init, mut reqs)| {
            if start_with_init {
                let init = Command::InitCluster {
                    cluster_id: "c1".into(),
                    token_hash: GOOD.into(),
                    node: new_node("n0", Role::Coordinator, "n0.addr:7000"),
                };
                reqs.insert(0, request("init", 0, vec![op(init)]));
            }
            reqs
        },
    )
}

/// One step of a run: the state before and after the request applied at `index`.
struct Step<'a> {
    index: u64,
    req: &'a Request,
    before: State,
    after: State,
    applied: Applied,
}

/// The delta of a step, as a member's state machine makes it.
fn delta_of(s: &Step<'_>) -> Delta {
    match Delta::keepalives(s.req) {
        Some(names) => Delta::of_keepalives(&s.after, names),
        None => Delta::between(&s.before, &s.after, s.index),
    }
}

/// Applies `reqs` at indexes 1, 2, ... to a fresh state, calling `check` after every step.
fn run(
    reqs: &[Request],
    mut check: impl FnMut(&Step<'_>) -> Result<(), TestCaseError>,
) -> Result<(State, Vec<Applied>), TestCaseError> {
    let mut state = State::default();
    let mut outcomes = Vec::with_capacity(reqs.len());
    for (i, req) in reqs.iter().enumerate() {
        let index = i as u64 + 1;
        let before = state.clone();
        let applied = apply(&mut state, index, req);
        let step = Step { index, req, before, after: state.clone(), applied };
        check(&step)?;
        outcomes.push(step.applied);
    }
    Ok((state, outcomes))
}

proptest! {
    #![proptest_config(config())]

    /// a. The same log yields the same state and responses.
    #[test]
    fn prop_apply_is_deterministic(reqs in sequence_strategy()) {
        let (s1, o1) = run(&reqs, |_| Ok(()))?;
        let (s2, o2) = run(&reqs, |_| Ok(()))?;
        prop_assert_eq!(s1, s2);
        prop_assert_eq!(o1, o2);
    }

    /// a'. A state restored from a snapshot (as `build_snapshot` encodes it) continues exactly
    /// like the original.
    #[test]
    fn prop_snapshot_round_trip_continues_identically(
        reqs in sequence_strategy(),
        cut in 0..40usize,
    ) {
        let cut = cut.min(reqs.len());
        let (mut original, _) = run(&reqs[..cut], |_| Ok(()))?;
        let bytes = rmp_serde::to_vec_named(&original).expect("encode state");
        let mut restored: State = rmp_serde::from_slice(&bytes).expect("decode state");
        prop_assert_eq!(&restored, &original);
        for (i, req) in reqs.iter().enumerate().skip(cut) {
            let index = i as u64 + 1;
            let a = apply(&mut original, index, req);
            let b = apply(&mut restored, index, req);
            prop_assert_eq!(a, b, "step {}", index);
        }
        prop_assert_eq!(restored, original);
    }

    /// b. The structural invariants hold after every step.
    #[test]
    fn prop_invariants_hold_after_every_step(reqs in sequence_strategy()) {
        run(&reqs, |s| {
            s.after.check_invariants().map_err(|e| {
                TestCaseError::fail(format!("step {} ({}): {e}", s.index, s.req))
            })
        })?;
    }

    /// c. A refusal changes nothing except the clock and the remembered outcome; a retry
    /// changes nothing at all.
    #[test]
    fn prop_refusals_are_atomic(reqs in sequence_strategy()) {
        run(&reqs, |s| {
            let retry = s.before.requests.contains_key(&s.req.id);
            if retry {
                prop_assert_eq!(&s.after, &s.before, "step {}: retry changed the state", s.index);
            } else if let Err(e) = &s.applied.response.result {
                prop_assert_eq!(
                    without_bookkeeping(&s.after),
                    without_bookkeeping(&s.before),
                    "step {} ({}) refused with {:?} but changed the state", s.index, s.req, e
                );
                prop_assert_eq!(&s.after, &after_refusal(&s.before, s.index, s.req, e));
            }
            Ok(())
        })?;
    }

    /// d. Node ids are never handed out twice. A step hands out the ids in
    /// `[next_node_id before, next_node_id after)` (a request of several ops replies only with
    /// its last reply, so ids are also read off the nodes that appear); `next_node_id` never
    /// decreases, and every node present carries an id that was handed out.
    #[test]
    fn prop_node_ids_are_never_reused(reqs in sequence_strategy()) {
        let mut handed_out = BTreeSet::new();
        run(&reqs, |s| {
            let i = s.index;
            let next = |st: &State| st.meta.as_ref().map_or(1, |m| m.next_node_id);
            let (prev_next, new_next) = (next(&s.before), next(&s.after));
            prop_assert!(new_next >= prev_next, "step {}: next_node_id went back", i);
            let mut fresh = BTreeSet::new();
            let retry = s.before.requests.contains_key(&s.req.id);
            if let (false, Ok(Reply::NodeRegistered { id })) = (retry, &s.applied.response.result) {
                fresh.insert(*id);
            }
            for (name, n) in &s.after.nodes {
                if s.before.nodes.get(name).map(|old| old.id) != Some(n.id) {
                    fresh.insert(n.id);
                }
            }
            for id in fresh {
                prop_assert!(
                    (prev_next..new_next).contains(&id),
                    "step {} ({}): id {} outside [{}, {})", i, s.req, id, prev_next, new_next
                );
                prop_assert!(handed_out.insert(id), "step {} ({}): id {} handed out twice", i, s.req, id);
            }
            for n in s.after.nodes.values() {
                prop_assert!(handed_out.contains(&n.id), "step {}: unknown id {}", i, n.id);
            }
            Ok(())
        })?;
    }

    /// e. Revisions never exceed the applied index, and what changes at step i carries
    /// revision i (meta, nodes and VMs: a delta finds what changed by it, `Delta::of`).
    #[test]
    fn prop_revisions_track_the_log_index(reqs in sequence_strategy()) {
        run(&reqs, |s| {
            let i = s.index;
            if let Some(m) = &s.after.meta {
                prop_assert!(m.revision <= i, "step {}: meta revision {}", i, m.revision);
                if s.before.meta.as_ref() != Some(m) {
                    prop_assert_eq!(m.revision, i, "step {}: meta changed", i);
                }
            }
            for (name, n) in &s.after.nodes {
                prop_assert!(n.revision <= i, "step {}: {} has revision {}", i, name, n.revision);
                if s.before.nodes.get(name) != Some(n) {
                    prop_assert_eq!(n.revision, i, "step {}: {} changed", i, name);
                }
            }
            for (name, v) in &s.after.vms {
                prop_assert!(v.revision <= i, "step {}: VM {} has revision {}", i, name, v.revision);
                if s.before.vms.get(name) != Some(v) {
                    prop_assert_eq!(v.revision, i, "step {}: VM {} changed", i, name);
                }
            }
            Ok(())
        })?;
    }

    /// f. A follower of deltas (issue 22) holds the leader's state as projected for it, at
    /// every step: whether it follows as a node of the cluster or as an id no node holds.
    #[test]
    fn prop_deltas_follow_the_leader(reqs in sequence_strategy()) {
        // Node ids 1 to 3 and one no node holds.
        let mut followers: Vec<(NodeId, State)> = [1, 2, 3, 999].iter().map(|n| (*n, State::default())).collect();
        run(&reqs, |s| {
            let delta = delta_of(s);
            for (me, state) in followers.iter_mut() {
                delta.for_node(*me).apply_to(state);
                prop_assert_eq!(
                    state.projected_for(*me),
                    s.after.projected_for(*me),
                    "step {} ({}): follower {} differs", s.index, s.req, me
                );
            }
            Ok(())
        })?;
    }

    /// g. A follower with outlines (a client: other nodes' VMs as `VmRecord::outline`) holds
    /// the leader's state as outlined for it, at every step — taking what a node the deltas do
    /// not concern gets whenever its own would not differ, as a coordinator serves it.
    #[test]
    fn prop_outlined_deltas_follow_the_leader(reqs in sequence_strategy()) {
        let mut followers: Vec<(NodeId, State)> = [1, 2, 3, 999].iter().map(|n| (*n, State::default())).collect();
        run(&reqs, |s| {
            let delta = delta_of(s);
            for (me, state) in followers.iter_mut() {
                let name = s.after.node_by_id(*me).map(|n| n.name.clone());
                let reader = if delta.outlined_differs_for(*me, name.as_deref()) {
                    Reader::Outlined { me: Some(*me), name: name.as_deref() }
                } else {
                    Reader::Outlined { me: None, name: None }
                };
                delta.kept_for(reader).apply_to(state);
                prop_assert_eq!(
                    state.outlined_for(*me),
                    s.after.outlined_for(*me),
                    "step {} ({}): follower {} differs", s.index, s.req, me
                );
            }
            Ok(())
        })?;
    }
}
