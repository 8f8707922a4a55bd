//! Helpers shared by the tests of the model: commands, requests, and building a state step by
//! step.

use herd_storage::model::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The token hash the test cluster is created with; "bad" is any other.
pub(crate) const GOOD: &str = "good";
pub(crate) const BAD: &str = "bad";

pub(crate) fn new_node(name: &str, role: Role, addr: &str) -> NewNode {
    NewNode { name: name.into(), role, cluster_addr: addr.into() }
}

pub(crate) fn init_as(name: &str, role: Role) -> Command {
    Command::InitCluster {
        cluster_id: "c1".into(),
        token_hash: GOOD.into(),
        node: new_node(name, role, &format!("{name}.addr:7000")),
    }
}

pub(crate) fn init() -> Command {
    init_as("n1", Role::Coordinator)
}

pub(crate) fn register_with(name: &str, addr: &str, token: &str) -> Command {
    Command::RegisterNode { node: new_node(name, Role::Hypervisor, addr), token_hash: token.into() }
}

pub(crate) fn register(name: &str) -> Command {
    register_with(name, &format!("{name}.addr:7000"), GOOD)
}

pub(crate) fn remove(name: &str) -> Command {
    Command::RemoveNode { name: name.into() }
}

pub(crate) fn keepalive(name: &str) -> Command {
    Command::Keepalive { name: name.into(), stats: sample_stats(), node_id: None }
}

pub(crate) fn sample_stats() -> NodeStats {
    NodeStats {
        cpu_count: 8,
        load_milli: 1250,
        mem_total_mib: 32768,
        mem_used_mib: 4096,
        vms_running: 3,
        stale: false,
        ..NodeStats::default()
    }
}

pub(crate) fn set_daemon(name: &str, state: DaemonState, return_by_ms: Option<u64>) -> Command {
    Command::SetDaemonState { name: name.into(), state, return_by_ms, node_id: None }
}

pub(crate) fn maintenance(on: bool) -> Command {
    Command::SetMaintenance { on }
}

pub(crate) fn op(cmd: Command) -> Op {
    Op::from(cmd)
}

pub(crate) fn op_rev(cmd: Command, rev: u64) -> Op {
    Op { cmd, expect_revision: Some(rev) }
}

pub(crate) fn request(id: &str, time_ms: u64, ops: Vec<Op>) -> Request {
    Request { id: id.into(), time_ms, ops }
}

/// Applies each op as its own request at indexes 1, 2, ... (time 1000 × index) and asserts that
/// every one succeeds. Returns the state and the last index used.
pub(crate) fn build(setup: &[Op]) -> (State, u64) {
    let mut state = State::default();
    let mut index = 0;
    for o in setup {
        index += 1;
        let req = request(&format!("setup-{index}"), 1000 * index, vec![o.clone()]);
        let applied = apply(&mut state, index, &req);
        assert!(applied.response.result.is_ok(), "setup step {index} ({req}) refused: {:?}", applied.response.result);
        state.check_invariants().expect("invariants after setup step");
    }
    (state, index)
}

/// What a refused request must leave behind: the state as before, except that the clock moved
/// to the request's time (if later) and the outcome is remembered under the request id.
pub(crate) fn after_refusal(before: &State, index: u64, req: &Request, err: &ApplyError) -> State {
    let mut expected = before.clone();
    expected.clock_ms = before.clock_ms.max(req.time_ms);
    expected
        .requests
        .insert(req.id.clone(), RequestRecord { index, time_ms: expected.clock_ms, result: Err(err.clone()) });
    expected
}

/// The state without what every applied request records (its id and the clock).
pub(crate) fn without_bookkeeping(state: &State) -> State {
    State { requests: Default::default(), clock_ms: 0, ..state.clone() }
}

pub(crate) fn node<'a>(state: &'a State, name: &str) -> &'a NodeRecord {
    state.nodes.get(name).unwrap_or_else(|| panic!("node {name} missing"))
}

pub(crate) fn meta(state: &State) -> &ClusterMeta {
    state.meta.as_ref().expect("cluster initialised")
}

pub(crate) fn last_event(state: &State) -> &Event {
    state.events.back().expect("an event")
}
