//! Which deltas concern a node at once (`Delta::concerns`): what a coordinator never holds back
//! from that node's session (`herd_raft::follow::LINGER`).

use herd_storage::model::*;

use crate::vm::{run, spec, three};

/// Nodes a, b, c with ids 1, 2, 3.
fn nodes() -> State {
    let mut s = three();
    for (id, n) in (1..).zip(["a", "b", "c"]) {
        if let Some(r) = s.nodes.get_mut(n) {
            r.id = id;
        }
    }
    s
}

/// Applies `cmd` at `index` and says which of a, b, c its delta concerns.
fn concerned(s: &mut State, index: u64, cmd: Command) -> Vec<&'static str> {
    let before = s.clone();
    assert_eq!(run(s, index, cmd), Ok(Reply::Done));
    let d = Delta::between(&before, s, index);
    ["a", "b", "c"].into_iter().filter(|n| d.concerns(s.nodes.get(*n).map_or(0, |r| r.id), Some(n))).collect()
}

#[test]
fn a_delta_concerns_the_nodes_its_records_name() {
    let mut s = nodes();
    let define = Command::DefineVm { spec: spec("web", 1), node: "a".into() };
    assert_eq!(concerned(&mut s, 1, define), ["a"], "a VM assigned to a");
    let report = |node: &str| Command::ReportVm {
        name: "web".into(),
        node: node.into(),
        actual: ActualState::Running,
        failure: None,
        moved: None,
    };
    assert_eq!(concerned(&mut s, 2, report("a")), ["a"]);
    let away = Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::Migrate, permanent: false };
    assert_eq!(concerned(&mut s, 3, away), ["a", "b"], "the source and the target of a move");
    let daemon = Command::SetDaemonState {
        name: "c".into(),
        state: DaemonState::Stop,
        return_by_ms: Some(60_000),
        node_id: None,
    };
    assert_eq!(concerned(&mut s, 4, daemon), ["c"], "a node's own record");
    let stray = Command::ReportStray { name: "web".into(), node: "c".into(), running: true };
    assert_eq!(concerned(&mut s, 5, stray), ["a", "b", "c"], "seen on c, still a's, moving to b");
}

#[test]
fn a_removal_concerns_everyone_and_meta_or_events_nobody() {
    let gone = [
        Delta { vms_gone: vec!["web".into()], ..Delta::default() },
        Delta { nodes_gone: vec!["c".into()], ..Delta::default() },
        Delta { removed: vec![3], ..Delta::default() },
    ];
    assert!(gone.iter().all(|d| d.concerns(2, Some("b")) && d.concerns(9, None)), "whose it was is not in the delta");
    let (mut s, index) = crate::common::build(&[crate::common::op(crate::common::init())]);
    let before = s.clone();
    assert_eq!(run(&mut s, index + 1, Command::SetMaintenance { on: true }), Ok(Reply::Done));
    let meta = Delta::between(&before, &s, index + 1);
    assert!(meta.meta.is_some() && !meta.events.is_empty(), "{meta:?}");
    assert!(!meta.concerns(2, Some("b")), "meta (maintenance, tokens) and events can wait out a linger");
    assert!(!Delta::default().concerns(2, None));
}

/// A node's flags of how it self-fences reach that node only: a client of the previous
/// version cannot decode the newest (`NodeStats::session_only`), so no other node gets them —
/// in a delta or in a whole state — and a delta that carries them is made per node.
#[test]
fn a_nodes_self_fence_flags_reach_only_that_node() {
    let mut s = nodes();
    let flagged = NodeStats::default().with_session_guard(true);
    s.nodes.get_mut("a").expect("a").stats = flagged.clone();
    let before = s.clone();
    let cordon = Command::SetDomainState { name: "a".into(), state: DomainState::Flush, node_id: None };
    assert_eq!(run(&mut s, 5, cordon), Ok(Reply::Done));
    let d = Delta::between(&before, &s, 5);
    assert!(!d.same_for_all(), "a's flags: one delta per node");
    let stats_of = |d: Delta| d.nodes.into_iter().find(|n| n.name == "a").map(|n| n.stats);
    assert_eq!(stats_of(d.for_node(1)), Some(flagged.clone()), "a's own");
    let to_b = stats_of(d.for_node(2)).expect("a's record");
    assert!(!to_b.session_self_fence && !to_b.session_only, "b gets a's record without them");
    let whole = s.clone().without_others_flags(2);
    assert!(!whole.nodes["a"].stats.session_only, "nor in a whole state");
    assert!(s.clone().without_others_flags(1).nodes["a"].stats.session_only, "a's own whole state keeps them");
    // Without flags, one delta serves all.
    s.nodes.get_mut("a").expect("a").stats = NodeStats::default();
    let before = s.clone();
    let back = Command::SetDomainState { name: "a".into(), state: DomainState::Unflush, node_id: None };
    assert_eq!(run(&mut s, 6, back), Ok(Reply::Done));
    assert!(Delta::between(&before, &s, 6).same_for_all());
}

/// With outlines (`Rpc::Outlined`), a VM reaches a node it does not concern as its outline,
/// and only when that changes: a state change of another node's VM reaches no other client;
/// a move does, as where the VM now belongs.
#[test]
fn other_nodes_vms_reach_a_client_as_outlines_and_only_when_they_move() {
    let mut s = nodes();
    let outsider = Reader::Outlined { me: None, name: None };
    let step = |s: &mut State, index: u64, cmd: Command| {
        let before = s.clone();
        assert_eq!(run(s, index, cmd), Ok(Reply::Done));
        Delta::between(&before, s, index)
    };
    let define = step(&mut s, 1, Command::DefineVm { spec: spec("web", 1), node: "a".into() });
    assert!(define.outlined_differs_for(1, Some("a")) && !define.outlined_differs_for(3, Some("c")));
    let to_c = define.kept_for(outsider);
    assert_eq!(to_c.vms, vec![s.vms["web"].outline()], "c learns the VM's name, uuid and node");
    assert!(to_c.vms[0].is_outline() && to_c.vms[0].spec.xml.is_empty());
    assert_eq!(define.kept_for(Reader::Outlined { me: Some(1), name: Some("a") }).vms, vec![s.vms["web"].clone()]);
    let stop = step(&mut s, 2, Command::SetVmState { name: "web".into(), state: VmState::Stop });
    assert!(!stop.outlined_differs_for(3, Some("c")));
    assert!(stop.kept_for(outsider).vms.is_empty(), "another node's VM stopping is not c's business");
    assert_eq!(stop.kept_for(Reader::Node(3)).vms.len(), 1, "a follower of every VM gets it");
    let away = step(
        &mut s,
        3,
        Command::MigrateVm { name: "web".into(), to: "b".into(), state: VmState::Migrate, permanent: true },
    );
    assert_eq!(away.kept_for(outsider).vms, vec![s.vms["web"].outline()], "where it belongs changed");
    assert_eq!(away.kept_for(outsider).vms[0].node, "b");
    let whole = s.clone().outlined_whole_for(3);
    assert!(whole.vms["web"].is_outline(), "c's whole state: an outline");
    assert!(!s.clone().outlined_whole_for(2).vms["web"].is_outline(), "b's: the record");
}
