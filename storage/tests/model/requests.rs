//! `apply` beyond single commands: deduplication of retries, the monotonic clock, the memory
//! bounds, writes naming a node id, router states, and join tokens.

#![allow(clippy::unwrap_used)]

use herd_storage::model::*;

use crate::common::*;

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

#[test]
fn a_request_of_keepalives_is_all_or_nothing() {
    let (mut state, last) = build(&[op(init()), op(register("n2")), op(register("n3"))]);
    let before = state.clone();
    // n2 twice, n3, then a node that does not exist: refused, and every record as it was.
    let ops = vec![op(keepalive("n2")), op(keepalive("n3")), op(keepalive("n2")), op(keepalive("ghost"))];
    let refused = apply(&mut state, last + 1, &request("k1", 90_000, ops));
    assert!(refused.response.result.is_err());
    assert_eq!(state.nodes, before.nodes);
    assert_eq!((&state.vms, &state.events, &state.meta), (&before.vms, &before.events, &before.meta));
    // A refusal in the middle puts back what the ops before it changed.
    let stale = vec![op(keepalive("n3")), op_rev(keepalive("n2"), 999), op(keepalive("n3"))];
    assert!(apply(&mut state, last + 2, &request("k2", 91_000, stale)).response.result.is_err());
    assert_eq!(state.nodes, before.nodes);
    // Accepted together: each named record moves, nothing else.
    let ok = apply(&mut state, last + 3, &request("k3", 92_000, vec![op(keepalive("n2")), op(keepalive("n3"))]));
    assert_eq!(ok.response.result, Ok(Reply::Done));
    assert_eq!(node(&state, "n2").last_keepalive_ms, Some(92_000));
    assert_eq!(node(&state, "n3").revision, last + 3);
    assert_eq!(state.requests.len(), before.requests.len() + 3);
    // Keepalives alone may go beyond MAX_OPS (a coordinator's clients in one request); mixed
    // requests may not, nor keepalives beyond MAX_KEEPALIVE_OPS.
    let many = |n: usize| (0..n).map(|k| op(keepalive(if k % 2 == 0 { "n2" } else { "n3" }))).collect::<Vec<_>>();
    let big = apply(&mut state, last + 4, &request("k4", 93_000, many(MAX_OPS + 1)));
    assert_eq!(big.response.result, Ok(Reply::Done));
    let mut mixed = many(MAX_OPS);
    mixed.push(op(maintenance(true)));
    assert!(matches!(
        apply(&mut state, last + 5, &request("k5", 94_000, mixed)).response.result,
        Err(ApplyError::Invalid(_))
    ));
    let too_many = apply(&mut state, last + 6, &request("k6", 95_000, many(MAX_KEEPALIVE_OPS + 1)));
    assert!(matches!(too_many.response.result, Err(ApplyError::Invalid(_))));
    assert_eq!(node(&state, "n2").last_keepalive_ms, Some(93_000));
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

/// Issue 17: what the leaders saw each member hold, by boot. A later boot whose log began
/// before an earlier boot's mark lost what it acknowledged; one that began at or after it did
/// not; a removed node's record goes with it.
#[test]
fn the_acknowledged_log_record_tells_a_log_gone_backwards() {
    let mut state = State::default();
    assert!(apply(&mut state, 1, &request("a", 1, vec![op(init())])).response.result.is_ok());
    assert!(apply(&mut state, 2, &request("b", 2, vec![op(register("n2"))])).response.result.is_ok());
    let id = state.nodes["n2"].id;
    let record = |boot: u64, index: u64| Command::RecordAcked { marks: [(id, (boot, index)), (999, (1, 5))].into() };
    assert!(apply(&mut state, 3, &request("c", 3, vec![op(record(7, 40))])).response.result.is_ok());
    assert!(!state.acked.contains_key(&999), "no record for a non-member");
    assert!(apply(&mut state, 4, &request("d", 4, vec![op(record(7, 30))])).response.result.is_ok());
    let held = state.acked[&id];
    assert_eq!((held.boot, held.index, held.floor()), (7, 40, 40), "only ever raised");
    assert_eq!(held.lost(7, 0), None, "boot 7's own marks say nothing of boot 7's start");
    // Boot 8 began with its log at 35: it lost 36..=40, which boot 7 held.
    assert!(held.lost(8, 35).is_some_and(|w| w.contains("went backwards")));
    assert_eq!(held.lost(8, 40), None);
    // Boot 8's own marks are recorded; boot 7's stay what boot 8 is judged by.
    assert!(apply(&mut state, 5, &request("e", 5, vec![op(record(8, 50))])).response.result.is_ok());
    let held = state.acked[&id];
    assert_eq!((held.boot, held.index, held.before), (8, 50, 40));
    assert!(held.lost(8, 35).is_some() && held.lost(8, 45).is_none());
    assert!(apply(&mut state, 6, &request("f", 6, vec![op(remove("n2"))])).response.result.is_ok());
    assert!(state.acked.is_empty(), "removed with the node");
}
