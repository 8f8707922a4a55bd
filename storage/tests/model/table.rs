//! Table-driven cases for every command and refusal of `apply`.

use std::collections::BTreeSet;

use herd_storage::model::*;

use crate::common::*;

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
    let mut all = init_and_register_cases();
    all.extend(register_and_remove_cases());
    all.extend(node_and_revision_cases());
    all.extend(batch_cases());
    all
}

/// `init-cluster`, and the first `register-node` cases.
fn init_and_register_cases() -> Vec<Case> {
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
    ]
}

/// Id allocation, names and addresses of `register-node`; `remove-node`; keepalives of unknown nodes.
fn register_and_remove_cases() -> Vec<Case> {
    vec![
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
    ]
}

/// Keepalives, daemon states, maintenance, and compare-and-set on revisions.
fn node_and_revision_cases() -> Vec<Case> {
    vec![
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
    ]
}

/// Requests of several operations: all or nothing; empty and oversized requests.
fn batch_cases() -> Vec<Case> {
    vec![
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
        invalid("more than 64 ops", vec![op(init())], vec![op(maintenance(true)); 65]),
        invalid("more than 1024 keepalives", vec![op(init())], vec![op(keepalive("n1")); 1025]),
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
