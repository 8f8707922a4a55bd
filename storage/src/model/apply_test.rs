//! Tests of the pure replicated model: table-driven cases for every command and refusal,
//! deduplication, the monotonic clock, the memory bounds, and proptest properties over random
//! command sequences (determinism, invariants, atomicity, id allocation, revisions).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The token hash the test cluster is created with; "bad" is any other.
const GOOD: &str = "good";
const BAD: &str = "bad";

fn new_node(name: &str, role: Role, addr: &str) -> NewNode {
    NewNode { name: name.into(), role, cluster_addr: addr.into() }
}

fn init_as(name: &str, role: Role) -> Command {
    Command::InitCluster {
        cluster_id: "c1".into(),
        token_hash: GOOD.into(),
        node: new_node(name, role, &format!("{name}.addr:7000")),
    }
}

fn init() -> Command {
    init_as("n1", Role::Coordinator)
}

fn register_with(name: &str, addr: &str, token: &str) -> Command {
    Command::RegisterNode { node: new_node(name, Role::Hypervisor, addr), token_hash: token.into() }
}

fn register(name: &str) -> Command {
    register_with(name, &format!("{name}.addr:7000"), GOOD)
}

fn remove(name: &str) -> Command {
    Command::RemoveNode { name: name.into() }
}

fn keepalive(name: &str) -> Command {
    Command::Keepalive { name: name.into(), stats: sample_stats(), node_id: None }
}

fn sample_stats() -> NodeStats {
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

fn set_daemon(name: &str, state: DaemonState, return_by_ms: Option<u64>) -> Command {
    Command::SetDaemonState { name: name.into(), state, return_by_ms, node_id: None }
}

fn maintenance(on: bool) -> Command {
    Command::SetMaintenance { on }
}

fn op(cmd: Command) -> Op {
    Op::from(cmd)
}

fn op_rev(cmd: Command, rev: u64) -> Op {
    Op { cmd, expect_revision: Some(rev) }
}

fn request(id: &str, time_ms: u64, ops: Vec<Op>) -> Request {
    Request { id: id.into(), time_ms, ops }
}

/// Applies each op as its own request at indexes 1, 2, ... (time 1000 × index) and asserts that
/// every one succeeds. Returns the state and the last index used.
fn build(setup: &[Op]) -> (State, u64) {
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
fn after_refusal(before: &State, index: u64, req: &Request, err: &ApplyError) -> State {
    let mut expected = before.clone();
    expected.clock_ms = before.clock_ms.max(req.time_ms);
    expected
        .requests
        .insert(req.id.clone(), RequestRecord { index, time_ms: expected.clock_ms, result: Err(err.clone()) });
    expected
}

/// The state without what every applied request records (its id and the clock).
fn without_bookkeeping(state: &State) -> State {
    State { requests: Default::default(), clock_ms: 0, ..state.clone() }
}

fn node<'a>(state: &'a State, name: &str) -> &'a NodeRecord {
    state.nodes.get(name).unwrap_or_else(|| panic!("node {name} missing"))
}

fn meta(state: &State) -> &ClusterMeta {
    state.meta.as_ref().expect("cluster initialised")
}

fn last_event(state: &State) -> &Event {
    state.events.back().expect("an event")
}

// ---------------------------------------------------------------------------------------------
// 1. Table-driven cases
// ---------------------------------------------------------------------------------------------

/// Leader time of the request under test in every table case (later than all setup times).
const T: u64 = 500_000;

enum Expect {
    Reply(Reply),
    Err(ApplyError),
    /// `ApplyError::Invalid` with any message.
    Invalid,
}

struct Case {
    name: &'static str,
    setup: Vec<Op>,
    ops: Vec<Op>,
    expect: Expect,
    /// Checks `(before, after, index)` after a success; refusals are checked generically.
    check: fn(&State, &State, u64),
}

fn no_check(_: &State, _: &State, _: u64) {}

fn refused(name: &'static str, setup: Vec<Op>, ops: Vec<Op>, err: ApplyError) -> Case {
    Case { name, setup, ops, expect: Expect::Err(err), check: no_check }
}

fn invalid(name: &'static str, setup: Vec<Op>, ops: Vec<Op>) -> Case {
    Case { name, setup, ops, expect: Expect::Invalid, check: no_check }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "init-cluster creates meta and coordinator node 1",
            setup: vec![],
            ops: vec![op(init())],
            expect: Expect::Reply(Reply::NodeRegistered { id: 1 }),
            check: |_, s, i| {
                let m = meta(s);
                assert_eq!(m.cluster_id, "c1");
                assert_eq!(m.next_node_id, 2);
                assert_eq!(m.created_ms, T);
                assert_eq!(m.revision, i);
                assert!(!m.maintenance);
                assert_eq!(m.join_token_hashes, BTreeSet::from([GOOD.to_string()]));
                assert_eq!(s.nodes.len(), 1);
                let n = node(s, "n1");
                assert_eq!(n.id, 1);
                assert_eq!(n.role, Role::Coordinator);
                assert_eq!(n.daemon_state, DaemonState::Init);
                assert_eq!(n.domain_state, DomainState::Ready);
                assert_eq!(n.router_state, RouterState::Secondary);
                assert_eq!(n.cluster_addr, "n1.addr:7000");
                assert_eq!(n.joined_ms, T);
                assert_eq!(n.revision, i);
                assert_eq!(n.last_keepalive_ms, None);
                assert_eq!(n.return_by_ms, None);
                assert_eq!(s.clock_ms, T);
                let e = last_event(s);
                assert_eq!((e.kind.as_str(), e.index, e.time_ms), ("cluster-init", i, T));
                assert_eq!(e.node.as_deref(), Some("n1"));
            },
        },
        Case {
            name: "init-cluster with a hypervisor first node makes it a client",
            setup: vec![],
            ops: vec![op(init_as("h1", Role::Hypervisor))],
            expect: Expect::Reply(Reply::NodeRegistered { id: 1 }),
            check: |_, s, _| {
                let n = node(s, "h1");
                assert_eq!(n.id, 1);
                assert_eq!(n.role, Role::Hypervisor);
                assert_eq!(n.daemon_state, DaemonState::Init);
                assert_eq!(n.router_state, RouterState::Client);
                assert_eq!(meta(s).next_node_id, 2);
            },
        },
        refused(
            "init-cluster twice",
            vec![op(init())],
            vec![op(init_as("other", Role::Coordinator))],
            ApplyError::AlreadyInitialized,
        ),
        invalid("init-cluster with an empty cluster id", vec![], {
            vec![op(Command::InitCluster {
                cluster_id: String::new(),
                token_hash: GOOD.into(),
                node: new_node("n1", Role::Coordinator, "a:1"),
            })]
        }),
        invalid("init-cluster with an invalid node name", vec![], vec![op(init_as("bad name", Role::Coordinator))]),
        refused(
            "register-node with a wrong token hash",
            vec![op(init())],
            vec![op(register_with("n2", "n2.addr:7000", BAD))],
            ApplyError::BadToken,
        ),
        refused("register-node before init", vec![], vec![op(register("n2"))], ApplyError::NotInitialized),
        Case {
            name: "register-node allocates id 2 after init",
            setup: vec![op(init())],
            ops: vec![op(register("n2"))],
            expect: Expect::Reply(Reply::NodeRegistered { id: 2 }),
            check: |before, s, i| {
                assert_eq!(meta(s).next_node_id, 3);
                assert_eq!(meta(s).revision, i);
                let n = node(s, "n2");
                assert_eq!(n.id, 2);
                assert_eq!(n.role, Role::Hypervisor);
                assert_eq!(n.router_state, RouterState::Client);
                assert_eq!(n.daemon_state, DaemonState::Init);
                assert_eq!(n.domain_state, DomainState::Ready);
                assert_eq!((n.revision, n.joined_ms), (i, T));
                assert_eq!(node(s, "n1"), node(before, "n1"), "n1 untouched");
                let e = last_event(s);
                assert_eq!((e.kind.as_str(), e.node.as_deref()), ("node-join", Some("n2")));
            },
        },
        Case {
            name: "register-node allocates increasing ids",
            setup: vec![op(init()), op(register("n2")), op(register("n3"))],
            ops: vec![op(register("n4"))],
            expect: Expect::Reply(Reply::NodeRegistered { id: 4 }),
            check: |_, s, _| {
                let ids: Vec<_> = ["n1", "n2", "n3", "n4"].iter().map(|n| node(s, n).id).collect();
                assert_eq!(ids, vec![1, 2, 3, 4]);
                assert_eq!(meta(s).next_node_id, 5);
            },
        },
        refused(
            "register-node with an existing name",
            vec![op(init())],
            vec![op(register_with("n1", "elsewhere:7000", GOOD))],
            ApplyError::NodeExists { name: "n1".into(), id: 1 },
        ),
        refused(
            "register-node with an address already in use",
            vec![op(init()), op(register("n2"))],
            vec![op(register_with("n3", "n2.addr:7000", GOOD))],
            ApplyError::AddressInUse { addr: "n2.addr:7000".into(), name: "n2".into() },
        ),
        invalid("register-node with an empty name", vec![op(init())], vec![op(register(""))]),
        invalid(
            "register-node with a name containing spaces",
            vec![op(init())],
            vec![op(register_with("my node", "x:1", GOOD))],
        ),
        invalid(
            "register-node with a 300-character name",
            vec![op(init())],
            vec![op(register_with(&"a".repeat(300), "x:1", GOOD))],
        ),
        invalid(
            "register-node with a 254-character name",
            vec![op(init())],
            vec![op(register_with(&"a".repeat(254), "x:1", GOOD))],
        ),
        invalid("register-node with an empty address", vec![op(init())], vec![op(register_with("n2", "", GOOD))]),
        Case {
            name: "register-node accepts a 253-character name",
            setup: vec![op(init())],
            ops: vec![op(register_with(&"a".repeat(253), "x:1", GOOD))],
            expect: Expect::Reply(Reply::NodeRegistered { id: 2 }),
            check: |_, s, _| assert_eq!(node(s, &"a".repeat(253)).id, 2),
        },
        Case {
            name: "remove-node then register-node with the same name gets a new, larger id",
            setup: vec![op(init()), op(register("n2")), op(remove("n2"))],
            ops: vec![op(register("n2"))],
            expect: Expect::Reply(Reply::NodeRegistered { id: 3 }),
            check: |_, s, _| {
                assert_eq!(node(s, "n2").id, 3);
                assert_eq!(meta(s).next_node_id, 4);
            },
        },
        Case {
            name: "remove-node forgets the node and logs an event",
            setup: vec![op(init()), op(register("n2"))],
            ops: vec![op(remove("n2"))],
            expect: Expect::Reply(Reply::Done),
            check: |before, s, i| {
                assert!(!s.nodes.contains_key("n2"));
                assert_eq!(s.meta, before.meta, "next_node_id is kept");
                let e = last_event(s);
                assert_eq!((e.kind.as_str(), e.index), ("node-remove", i));
            },
        },
        refused(
            "remove-node of an unknown node",
            vec![op(init())],
            vec![op(remove("ghost"))],
            ApplyError::NoSuchNode("ghost".into()),
        ),
        refused(
            "keepalive from an unknown node",
            vec![op(init())],
            vec![op(keepalive("ghost"))],
            ApplyError::NoSuchNode("ghost".into()),
        ),
        Case {
            name: "keepalive records stats, leader time and revision",
            setup: vec![op(init()), op(register("n2"))],
            ops: vec![op(keepalive("n2"))],
            expect: Expect::Reply(Reply::Done),
            check: |before, s, i| {
                let n = node(s, "n2");
                assert_eq!(n.last_keepalive_ms, Some(T));
                assert_eq!(n.revision, i);
                assert_eq!(n.stats, sample_stats());
                assert_eq!(s.events, before.events, "keepalives are not events");
                assert_eq!(s.meta, before.meta);
            },
        },
        invalid(
            "set-daemon-state stop without return_by",
            vec![op(init())],
            vec![op(set_daemon("n1", DaemonState::Stop, None))],
        ),
        Case {
            name: "set-daemon-state stop with return_by",
            setup: vec![op(init())],
            ops: vec![op(set_daemon("n1", DaemonState::Stop, Some(T + 60_000)))],
            expect: Expect::Reply(Reply::Done),
            check: |_, s, i| {
                let n = node(s, "n1");
                assert_eq!(n.daemon_state, DaemonState::Stop);
                assert_eq!(n.return_by_ms, Some(T + 60_000));
                assert_eq!(n.revision, i);
                assert_eq!(last_event(s).kind, "daemon-state");
            },
        },
        Case {
            name: "set-daemon-state run clears return_by",
            setup: vec![op(init()), op(set_daemon("n1", DaemonState::Stop, Some(99)))],
            ops: vec![op(set_daemon("n1", DaemonState::Run, Some(77)))],
            expect: Expect::Reply(Reply::Done),
            check: |_, s, _| {
                let n = node(s, "n1");
                assert_eq!(n.daemon_state, DaemonState::Run);
                assert_eq!(n.return_by_ms, None);
            },
        },
        refused(
            "set-daemon-state of an unknown node",
            vec![op(init())],
            vec![op(set_daemon("ghost", DaemonState::Run, None))],
            ApplyError::NoSuchNode("ghost".into()),
        ),
        refused("set-maintenance before init", vec![], vec![op(maintenance(true))], ApplyError::NotInitialized),
        Case {
            name: "set-maintenance on",
            setup: vec![op(init())],
            ops: vec![op(maintenance(true))],
            expect: Expect::Reply(Reply::Done),
            check: |_, s, i| {
                assert!(meta(s).maintenance);
                assert_eq!(meta(s).revision, i);
                let e = last_event(s);
                assert_eq!((e.kind.as_str(), e.node.as_deref()), ("maintenance", None));
            },
        },
        refused(
            "expect_revision mismatch on keepalive",
            vec![op(init())],
            vec![op_rev(keepalive("n1"), 99)],
            ApplyError::RevisionMismatch { object: "node n1".into(), expected: 99, actual: 1 },
        ),
        refused(
            "expect_revision mismatch on set-maintenance",
            vec![op(init()), op(register("n2"))],
            vec![op_rev(maintenance(true), 1)],
            ApplyError::RevisionMismatch { object: "cluster".into(), expected: 1, actual: 2 },
        ),
        Case {
            name: "expect_revision matching the node's revision succeeds",
            setup: vec![op(init()), op(register("n2"))],
            ops: vec![op_rev(keepalive("n2"), 2)],
            expect: Expect::Reply(Reply::Done),
            check: |_, s, i| assert_eq!(node(s, "n2").revision, i),
        },
        Case {
            name: "expect_revision Some(0) on register-node of a new name",
            setup: vec![op(init())],
            ops: vec![op_rev(register("n2"), 0)],
            expect: Expect::Reply(Reply::NodeRegistered { id: 2 }),
            check: |_, s, _| assert_eq!(node(s, "n2").id, 2),
        },
        refused(
            "expect_revision Some(0) on register-node of an existing name",
            vec![op(init()), op(register("n2"))],
            vec![op_rev(register_with("n2", "new.addr:1", GOOD), 0)],
            ApplyError::RevisionMismatch { object: "node n2".into(), expected: 0, actual: 2 },
        ),
        refused(
            "several ops where the last fails change nothing",
            vec![op(init())],
            vec![
                op(register("n2")),
                op(keepalive("n2")),
                op(maintenance(true)),
                op(set_daemon("n1", DaemonState::Run, None)),
                op(remove("n1")),
                op(keepalive("ghost")),
            ],
            ApplyError::NoSuchNode("ghost".into()),
        ),
        refused(
            "several ops where a revision check fails change nothing",
            vec![op(init())],
            vec![op(register("n2")), op_rev(keepalive("n2"), 1)],
            ApplyError::RevisionMismatch { object: "node n2".into(), expected: 1, actual: 2 },
        ),
        Case {
            name: "several ops apply together and reply with the last reply",
            setup: vec![op(init())],
            ops: vec![op(register("n2")), op(keepalive("n2")), op(register("n3"))],
            expect: Expect::Reply(Reply::NodeRegistered { id: 3 }),
            check: |_, s, i| {
                assert_eq!(node(s, "n2").last_keepalive_ms, Some(T));
                assert_eq!(node(s, "n2").revision, i);
                assert_eq!(node(s, "n3").id, 3);
                assert_eq!(meta(s).next_node_id, 4);
            },
        },
        invalid("empty ops", vec![op(init())], vec![]),
        invalid("empty ops before init", vec![], vec![]),
        invalid("more than 64 ops", vec![op(init())], vec![op(keepalive("n1")); 65]),
    ]
}

#[test]
fn table() {
    for case in cases() {
        let (before, last) = build(&case.setup);
        let index = last + 1;
        let req = request(&format!("case-{index}"), T, case.ops.clone());
        let mut state = before.clone();
        let applied = apply(&mut state, index, &req);
        let name = case.name;

        assert_eq!(applied.response.index, index, "{name}: response index");
        state.check_invariants().unwrap_or_else(|e| panic!("{name}: invariant broken: {e}"));
        let result = &applied.response.result;
        match (&case.expect, result) {
            (Expect::Reply(want), Ok(got)) => assert_eq!(got, want, "{name}: reply"),
            (Expect::Err(want), Err(got)) => assert_eq!(got, want, "{name}: error"),
            (Expect::Invalid, Err(ApplyError::Invalid(_))) => {}
            (_, got) => panic!("{name}: unexpected result {got:?}"),
        }
        // The outcome is remembered in every case.
        let record = state.requests.get(&req.id).unwrap_or_else(|| panic!("{name}: no record"));
        assert_eq!((record.index, record.time_ms, &record.result), (index, T, result), "{name}: request record");
        match result {
            Ok(_) => (case.check)(&before, &state, index),
            Err(err) => {
                assert_eq!(
                    state,
                    after_refusal(&before, index, &req, err),
                    "{name}: a refusal must change nothing but the clock and the request record"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Deduplication
// ---------------------------------------------------------------------------------------------

#[test]
fn retry_of_a_successful_request_returns_the_same_result_and_changes_nothing() {
    let (mut state, last) = build(&[op(init())]);
    let req = request("join-n2", 5_000, vec![op(register("n2"))]);
    let first = apply(&mut state, last + 1, &req);
    assert_eq!(first.response.result, Ok(Reply::NodeRegistered { id: 2 }));

    let before = state.clone();
    // Same id, later index and time: without dedup this would be NodeExists.
    let retry = request("join-n2", 9_000, vec![op(register("n2"))]);
    let second = apply(&mut state, last + 7, &retry);
    assert_eq!(second.response.result, first.response.result);
    assert_eq!(second.response.index, last + 7);
    assert_eq!(state, before);
}

#[test]
fn retry_of_a_refused_request_returns_the_same_refusal_and_changes_nothing() {
    let (mut state, last) = build(&[op(init())]);
    let req = request("join-n2", 5_000, vec![op(register_with("n2", "a:1", BAD))]);
    let first = apply(&mut state, last + 1, &req);
    assert_eq!(first.response.result, Err(ApplyError::BadToken));

    let before = state.clone();
    // Even a retry that would now succeed gets the remembered answer.
    let retry = request("join-n2", 9_000, vec![op(register_with("n2", "a:1", GOOD))]);
    let second = apply(&mut state, last + 2, &retry);
    assert_eq!(second.response.result, Err(ApplyError::BadToken));
    assert_eq!(state, before);
}

// ---------------------------------------------------------------------------------------------
// 3. Time
// ---------------------------------------------------------------------------------------------

#[test]
fn the_clock_never_moves_back() {
    let mut state = State::default();
    let a = apply(&mut state, 1, &request("a", 5_000, vec![op(init())]));
    assert!(a.response.result.is_ok());
    assert_eq!(state.clock_ms, 5_000);

    // An older leader time (e.g. a new leader with a slower clock).
    let b = apply(&mut state, 2, &request("b", 3_000, vec![op(register("n2"))]));
    assert_eq!(b.response.result, Ok(Reply::NodeRegistered { id: 2 }));
    assert_eq!(state.clock_ms, 5_000);
    assert_eq!(state.requests["b"].time_ms, 5_000);
    assert_eq!(node(&state, "n2").joined_ms, 5_000);
    assert_eq!(last_event(&state).time_ms, 5_000);

    let c = apply(&mut state, 3, &request("c", 1, vec![op(keepalive("n2"))]));
    assert_eq!(c.response.result, Ok(Reply::Done));
    assert_eq!(node(&state, "n2").last_keepalive_ms, Some(5_000));
    assert_eq!(state.requests["c"].time_ms, 5_000);

    // A refused request with an older time does not move it back either.
    let d = apply(&mut state, 4, &request("d", 2, vec![op(keepalive("ghost"))]));
    assert!(d.response.result.is_err());
    assert_eq!(state.clock_ms, 5_000);
    assert_eq!(state.requests["d"].time_ms, 5_000);

    // A newer time moves it forward.
    let e = apply(&mut state, 5, &request("e", 8_000, vec![op(keepalive("n2"))]));
    assert_eq!(e.response.result, Ok(Reply::Done));
    assert_eq!(state.clock_ms, 8_000);
    assert_eq!(node(&state, "n2").last_keepalive_ms, Some(8_000));
}

// ---------------------------------------------------------------------------------------------
// 4. Bounds
// ---------------------------------------------------------------------------------------------

#[test]
fn request_memory_and_event_log_stay_bounded() {
    let extra = 10;
    let total = MAX_REMEMBERED_REQUESTS as u64 + extra;
    let id = |i: u64| format!("req-{i:06}");
    let mut state = State::default();
    let first = apply(&mut state, 1, &request(&id(1), 1, vec![op(init())]));
    assert!(first.response.result.is_ok());
    for i in 2..=total {
        // Toggling maintenance logs one event per request.
        let applied = apply(&mut state, i, &request(&id(i), i, vec![op(maintenance(i % 2 == 0))]));
        assert_eq!(applied.response.result, Ok(Reply::Done), "step {i}");
        assert!(state.events.len() <= MAX_EVENTS, "step {i}: {} events", state.events.len());
        assert!(state.requests.len() <= MAX_REMEMBERED_REQUESTS, "step {i}");
        if i > MAX_REMEMBERED_REQUESTS as u64 {
            let forgotten = id(i - MAX_REMEMBERED_REQUESTS as u64);
            assert!(!state.requests.contains_key(&forgotten), "step {i}: {forgotten} remembered");
        }
    }
    state.check_invariants().expect("invariants");

    assert_eq!(state.requests.len(), MAX_REMEMBERED_REQUESTS);
    for i in 1..=extra {
        assert!(!state.requests.contains_key(&id(i)), "{} should be forgotten", id(i));
    }
    for i in extra + 1..=total {
        assert_eq!(state.requests.get(&id(i)).map(|r| r.index), Some(i), "{}", id(i));
    }

    assert_eq!(state.events.len(), MAX_EVENTS);
    let indexes: Vec<u64> = state.events.iter().map(|e| e.index).collect();
    let newest: Vec<u64> = (total - MAX_EVENTS as u64 + 1..=total).collect();
    assert_eq!(indexes, newest, "the event log keeps the newest events, in order");
}

#[test]
fn the_oldest_request_is_forgotten_by_index_also_after_decoding() {
    // Ids sort opposite to their indexes, so an eviction by id order would forget the newest.
    let id = |i: u64| format!("req-{:06}", 1_000_000 - i);
    let mut state = State::default();
    assert!(apply(&mut state, 1, &request(&id(1), 1, vec![op(init())])).response.result.is_ok());
    for i in 2..=MAX_REMEMBERED_REQUESTS as u64 {
        apply(&mut state, i, &request(&id(i), i, vec![op(maintenance(false))]));
    }
    // A snapshot's state decodes with the order rebuilt from the records.
    let bytes = rmp_serde::to_vec_named(&state).unwrap();
    let mut decoded: State = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(decoded, state);
    for s in [&mut state, &mut decoded] {
        let next = MAX_REMEMBERED_REQUESTS as u64 + 1;
        let applied = apply(s, next, &request(&id(next), next, vec![op(maintenance(false))]));
        assert_eq!(applied.response.result, Ok(Reply::Done));
        assert!(!s.requests.contains_key(&id(1)));
        assert!(s.requests.contains_key(&id(2)) && s.requests.contains_key(&id(next)));
        assert_eq!(s.requests.len(), MAX_REMEMBERED_REQUESTS);
    }
    assert_eq!(decoded, state);
}

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
    ]
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
    /// revision i.
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
            Ok(())
        })?;
    }
}

#[test]
fn a_write_naming_another_id_is_refused() {
    let mut state = State::default();
    let init = Command::InitCluster {
        cluster_id: "c".into(),
        token_hash: "h".into(),
        node: NewNode { name: "a".into(), role: Role::Coordinator, cluster_addr: "a:1".into() },
    };
    apply(&mut state, 1, &Request { id: "r1".into(), time_ms: 1, ops: vec![init.into()] });
    let before = state.clone();
    let stale = Command::Keepalive { name: "a".into(), stats: NodeStats::default(), node_id: Some(7) };
    let out = apply(&mut state, 2, &Request { id: "r2".into(), time_ms: 2, ops: vec![stale.into()] });
    assert_eq!(out.response.result, Err(ApplyError::NoSuchNode("a".into())));
    assert_eq!(state.nodes, before.nodes);
    let own =
        Command::SetDaemonState { name: "a".into(), state: DaemonState::Run, return_by_ms: None, node_id: Some(1) };
    let out = apply(&mut state, 3, &Request { id: "r3".into(), time_ms: 3, ops: vec![own.into()] });
    assert_eq!(out.response.result, Ok(Reply::Done));
    assert_eq!(state.nodes["a"].daemon_state, DaemonState::Run);
}

fn cluster_of(nodes: &[(&str, Role)]) -> State {
    let mut state = State::default();
    let (first, rest) = nodes.split_first().expect("a node");
    let init = Command::InitCluster {
        cluster_id: "c".into(),
        token_hash: "h".into(),
        node: NewNode { name: first.0.into(), role: first.1, cluster_addr: format!("{}:1", first.0) },
    };
    apply(&mut state, 1, &Request { id: "init".into(), time_ms: 1, ops: vec![init.into()] });
    for (i, (name, role)) in rest.iter().enumerate() {
        let reg = Command::RegisterNode {
            node: NewNode { name: (*name).into(), role: *role, cluster_addr: format!("{name}:1") },
            token_hash: "h".into(),
        };
        apply(&mut state, 2 + i as u64, &Request { id: format!("reg-{name}"), time_ms: 2, ops: vec![reg.into()] });
    }
    state
}

fn router(state: &State, name: &str) -> RouterState {
    state.nodes[name].router_state
}

#[test]
fn router_states_follow_takeover_and_relinquish() {
    let mut s = cluster_of(&[("a", Role::Coordinator), ("b", Role::Coordinator), ("h", Role::Hypervisor)]);
    assert_eq!((router(&s, "a"), router(&s, "h")), (RouterState::Secondary, RouterState::Client));
    let mut i = 10;
    let mut step = |s: &mut State, cmd: Command| {
        i += 1;
        apply(s, i, &Request { id: format!("r{i}"), time_ms: i, ops: vec![cmd.into()] }).response.result
    };
    let set = |name: &str, state| Command::SetRouterState { name: name.into(), state, node_id: None };
    // secondary cannot jump to primary on its own.
    assert!(matches!(step(&mut s, set("a", RouterState::Primary)), Err(ApplyError::Invalid(_))));
    assert_eq!(step(&mut s, Command::Takeover { name: "a".into(), node_id: None }), Ok(Reply::Done));
    assert_eq!(router(&s, "a"), RouterState::Takeover);
    assert_eq!(step(&mut s, set("a", RouterState::Primary)), Ok(Reply::Done));
    // A new leader's takeover sets the deposed primary to secondary in the same entry.
    assert_eq!(step(&mut s, Command::Takeover { name: "b".into(), node_id: None }), Ok(Reply::Done));
    assert_eq!((router(&s, "a"), router(&s, "b")), (RouterState::Secondary, RouterState::Takeover));
    assert!(s.events.iter().any(|e| e.kind == "primary-takeover" && e.message.contains("a (primary)")));
    assert_eq!(step(&mut s, set("b", RouterState::Primary)), Ok(Reply::Done));
    assert_eq!(step(&mut s, set("b", RouterState::Relinquish)), Ok(Reply::Done));
    assert_eq!(step(&mut s, set("b", RouterState::Secondary)), Ok(Reply::Done));
    // Hypervisors never take the role.
    assert!(matches!(step(&mut s, Command::Takeover { name: "h".into(), node_id: None }), Err(ApplyError::Invalid(_))));
    assert!(matches!(step(&mut s, set("h", RouterState::Secondary)), Err(ApplyError::Invalid(_))));
    assert_eq!(router(&s, "h"), RouterState::Client);
}

#[test]
fn a_takeover_naming_another_id_is_refused() {
    let mut s = cluster_of(&[("a", Role::Coordinator)]);
    let before = s.nodes.clone();
    let out = apply(
        &mut s,
        9,
        &Request {
            id: "x".into(),
            time_ms: 9,
            ops: vec![Command::Takeover { name: "a".into(), node_id: Some(5) }.into()],
        },
    );
    assert_eq!(out.response.result, Err(ApplyError::NoSuchNode("a".into())));
    assert_eq!(s.nodes, before);
}

// ---------------------------------------------------------------------------------------------
// Join tokens made by `herd token create`
// ---------------------------------------------------------------------------------------------

#[test]
fn made_tokens_expire_run_out_and_can_be_revoked() {
    let h = |c: char| c.to_string().repeat(64);
    let (mut s, mut index) = build(&[init().into()]);
    let mut at = |s: &mut State, time_ms: u64, cmd: Command| {
        index += 1;
        apply(s, index, &request(&format!("t{index}"), time_ms, vec![cmd.into()])).response.result
    };
    let create = |hash: String, ttl_ms: Option<u64>, uses: Option<u32>| Command::CreateJoinToken {
        token_hash: hash,
        ttl_ms,
        uses,
    };
    // Bad shapes are refused.
    assert!(matches!(at(&mut s, 2_000, create("abc".into(), None, None)), Err(ApplyError::Invalid(_))));
    assert!(matches!(at(&mut s, 2_000, create(h('a'), Some(10), None)), Err(ApplyError::Invalid(_))));
    assert!(matches!(at(&mut s, 2_000, create(h('a'), None, Some(0))), Err(ApplyError::Invalid(_))));
    // One use: the first join passes, the second is refused.
    assert_eq!(at(&mut s, 2_000, create(h('a'), None, Some(1))), Ok(Reply::Done));
    assert!(matches!(at(&mut s, 3_000, register_with("h1", "h1:7000", &h('a'))), Ok(Reply::NodeRegistered { .. })));
    assert_eq!(at(&mut s, 3_500, register_with("h2", "h2:7000", &h('a'))), Err(ApplyError::BadToken));
    // A lifetime: valid before, refused from its end on (the leader's clock).
    assert_eq!(at(&mut s, 4_000, create(h('b'), Some(10_000), None)), Ok(Reply::Done));
    assert!(matches!(at(&mut s, 13_999, register_with("h2", "h2:7000", &h('b'))), Ok(Reply::NodeRegistered { .. })));
    assert_eq!(at(&mut s, 14_000, register_with("h3", "h3:7000", &h('b'))), Err(ApplyError::BadToken));
    // Revoked by a unique prefix; the first token can be revoked too.
    assert_eq!(at(&mut s, 15_000, create(h('c'), None, None)), Ok(Reply::Done));
    assert!(matches!(at(&mut s, 15_000, Command::RevokeJoinToken { id: "ccc".into() }), Err(ApplyError::Invalid(_))));
    assert_eq!(at(&mut s, 15_000, Command::RevokeJoinToken { id: "cccccccc".into() }), Ok(Reply::Done));
    assert_eq!(at(&mut s, 16_000, register_with("h3", "h3:7000", &h('c'))), Err(ApplyError::BadToken));
    assert!(matches!(at(&mut s, 16_000, register_with("h3", "h3:7000", GOOD)), Ok(Reply::NodeRegistered { .. })));
    let good_id: String = GOOD.chars().take(8).collect();
    // "good" is too short to be an id: only hex prefixes of 8+ digits name a token.
    assert!(matches!(at(&mut s, 17_000, Command::RevokeJoinToken { id: good_id }), Err(ApplyError::Invalid(_))));
    assert!(meta(&s).join_tokens.get(&h('a')).is_some_and(|t| t.uses_left == Some(0)));
    // Dead tokens are forgotten an hour after they died, when the next one is made.
    assert_eq!(at(&mut s, 3_700_000, create(h('d'), None, None)), Ok(Reply::Done));
    let left: Vec<&String> = meta(&s).join_tokens.keys().collect();
    assert_eq!(left, vec![&h('d')], "a (used up at 2 s) and b (expired at 14 s) are gone");
    s.check_invariants().expect("invariants");
}
