//! Tests of fencing in the model: decision, cancel, outcomes, self-fence, recovery of VMs.

use herd_storage::model::*;

fn policy() -> FencePolicy {
    FencePolicy::ipmi("127.0.0.1:9631", "admin", "pw1")
}

fn node(id: NodeId, name: &str) -> NodeRecord {
    NodeRecord {
        id,
        name: name.into(),
        role: Role::Hypervisor,
        cluster_addr: format!("{name}:1"),
        daemon_state: DaemonState::Run,
        domain_state: DomainState::Ready,
        router_state: RouterState::Client,
        return_by_ms: None,
        stats: NodeStats { mem_total_mib: 8192, ..Default::default() },
        last_keepalive_ms: Some(1),
        heartbeat: Default::default(),
        fencing: Some(policy()),
        fence: Default::default(),
        health: None,
        joined_ms: 0,
        revision: 1,
    }
}

fn vm(name: &str, node: &str, state: VmState) -> VmRecord {
    VmRecord {
        last_move: None,
        spec: VmSpec {
            uuid: format!("uuid-{name}"),
            name: name.into(),
            xml: "<domain/>".into(),
            memory_mib: 256,
            vcpus: 1,
            selector: Some(Selector::Vms),
            node_limit: vec![],
            autostart: false,
            migration_method: MigrationMethod::None,
        },
        state,
        node: node.into(),
        last_node: None,
        failure_reason: None,
        actual: ActualState::Running,
        migrating_from: None,
        waiting: None,
        seen_on: Default::default(),
        desired_at: 0,
        revision: 1,
    }
}

fn cluster() -> State {
    let mut s = State {
        meta: Some(ClusterMeta {
            cluster_id: "c".into(),
            created_ms: 0,
            maintenance: false,
            maintenance_at: 0,
            join_token_hashes: Default::default(),
            join_tokens: Default::default(),
            next_node_id: 10,
            revision: 1,
        }),
        ..Default::default()
    };
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        s.nodes.insert(n.to_string(), node(i as u64 + 1, n));
    }
    s.vms.insert("v1".into(), vm("v1", "a", VmState::Start));
    s.vms.insert("v2".into(), vm("v2", "a", VmState::Start));
    s.vms.insert("off".into(), vm("off", "a", VmState::Stop));
    s.vms.insert("elsewhere".into(), vm("elsewhere", "b", VmState::Start));
    s
}

fn at(s: &mut State, index: u64, time_ms: u64, cmd: Command) -> Result<Reply, ApplyError> {
    let r = apply(s, index, &Request { id: format!("r{index}"), time_ms, ops: vec![cmd.into()] }).response.result;
    s.check_invariants().expect("invariants");
    r
}

fn decide(manual: bool) -> Command {
    Command::DecideFence { name: "a".into(), reason: "lost".into(), manual }
}

fn done(outcome: FenceOutcome) -> Command {
    Command::FenceDone { name: "a".into(), outcome }
}

fn kinds(s: &State) -> Vec<&str> {
    s.events.iter().map(|e| e.kind.as_str()).collect()
}

#[test]
fn a_confirmed_fence_recovers_running_vms_elsewhere_keeping_their_home() {
    let mut s = cluster();
    assert_eq!(at(&mut s, 2, 100, decide(false)), Ok(Reply::Done));
    assert!(at(&mut s, 3, 110, decide(false)).is_err(), "one fence per node at a time");
    assert_eq!(at(&mut s, 4, 200, done(FenceOutcome::Fenced)), Ok(Reply::Done));
    let a = &s.nodes["a"];
    assert_eq!(
        (a.daemon_state, a.domain_state, a.fence.fenced_ms),
        (DaemonState::Fenced, DomainState::Flushed, Some(200))
    );
    assert!(a.fence.pending.is_none());
    for name in ["v1", "v2"] {
        let v = &s.vms[name];
        assert_ne!(v.node, "a", "{name} recovered elsewhere");
        assert_eq!((v.last_node.as_deref(), v.state), (Some("a"), VmState::Migrate));
    }
    // The VMs spread by their selector (fewest VMs): one goes to c before b gets a second.
    assert_eq!(s.vms["v1"].node, "c");
    assert_eq!(s.vms["off"].node, "a", "a stopped VM stays where it is");
    assert_eq!(s.vms["elsewhere"].node, "b");
    assert_eq!(kinds(&s), ["fence-decided", "fenced", "fence-recovery"]);
    // A fenced node's restart does not make it `run`; `ready` does, once it is back.
    let unflush = Command::SetDomainState { name: "a".into(), state: DomainState::Unflush, node_id: None };
    assert!(at(&mut s, 5, 300, unflush.clone()).is_err(), "not back yet");
    let run = Command::SetDaemonState { name: "a".into(), state: DaemonState::Run, return_by_ms: None, node_id: None };
    assert_eq!(at(&mut s, 6, 400, run), Ok(Reply::Done));
    assert_eq!(s.nodes["a"].daemon_state, DaemonState::Fenced);
    assert_eq!(at(&mut s, 7, 500, unflush), Ok(Reply::Done));
    assert_eq!((s.nodes["a"].daemon_state, s.nodes["a"].domain_state), (DaemonState::Run, DomainState::Unflush));
}

#[test]
fn cancel_and_failure_start_nothing() {
    let mut s = cluster();
    let before = s.vms.clone();
    at(&mut s, 2, 100, decide(false)).expect("decide");
    let cancel = Command::CancelFence { name: "a".into(), reason: "heard again".into() };
    assert_eq!(at(&mut s, 3, 150, cancel.clone()), Ok(Reply::Done));
    assert!(at(&mut s, 4, 160, cancel).is_err(), "nothing left to cancel");
    assert!(at(&mut s, 5, 170, done(FenceOutcome::Fenced)).is_err(), "an outcome needs a pending fence");
    at(&mut s, 6, 200, decide(false)).expect("decide again");
    let failed = done(FenceOutcome::Failed { reason: "BMC 10.0.0.1:623: no answer".into() });
    assert_eq!(at(&mut s, 7, 300, failed), Ok(Reply::Done));
    let a = &s.nodes["a"];
    assert_eq!((a.daemon_state, a.fence.failed_ms), (DaemonState::Run, Some(300)));
    assert!(a.fence.failure.as_deref().is_some_and(|f| f.contains("no answer")));
    assert_eq!(s.vms, before, "no VM moved after a failed fence");
    assert_eq!(kinds(&s), ["fence-decided", "fence-cancelled", "fence-decided", "fence-failed"]);
    // With failed_fence = none, no amount of silence lets the VMs be started elsewhere.
    assert!(at(&mut s, 8, 10_000_000, done(FenceOutcome::SelfFenced)).is_err());
}

#[test]
fn self_fenced_recovery_waits_for_the_keepalive_age_its_policy_names() {
    let mut s = cluster();
    let p = s.nodes.get_mut("a").and_then(|n| n.fencing.as_mut()).expect("policy");
    p.failed_fence = FailedFence::RecoverAfterSelfFence;
    p.watchdog_timeout_ms = 10_000;
    s.nodes.get_mut("a").expect("a").last_keepalive_ms = Some(1_000);
    // 30 000 + 10 000 + 5 000 after the last committed keepalive at 1 000.
    assert!(at(&mut s, 2, 45_999, done(FenceOutcome::SelfFenced)).is_err());
    assert_eq!(at(&mut s, 3, 46_000, done(FenceOutcome::SelfFenced)), Ok(Reply::Done));
    assert_eq!(s.nodes["a"].daemon_state, DaemonState::Fenced);
    assert_ne!(s.vms["v1"].node, "a");
}

#[test]
fn sessions_quiet_needs_a_session_self_fence_the_full_wait_and_no_keepalive_since_asked() {
    let mut s = cluster();
    let p = s.nodes.get_mut("a").and_then(|n| n.fencing.as_mut()).expect("policy");
    p.failed_fence = FailedFence::RecoverAfterSelfFence;
    p.watchdog_timeout_ms = 10_000;
    s.nodes.get_mut("a").expect("a").last_keepalive_ms = Some(40_000);
    let quiet = |quiet_ms, asked_ms| done(FenceOutcome::SessionsQuiet { quiet_ms, asked_ms });
    // The node does not say it self-fences on its session (a learner, an older client).
    let refused = at(&mut s, 2, 50_000, quiet(60_000, 49_000));
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains("does not self-fence on its session")),
        "{refused:?}"
    );
    s.nodes.get_mut("a").expect("a").stats.session_self_fence = true;
    // 30 000 + 10 000 + 5 000: quieter for less is not enough, whatever the keepalive's age.
    let refused = at(&mut s, 3, 50_000, quiet(44_999, 49_000));
    assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("only after 45000 ms")), "{refused:?}");
    // A keepalive committed at or after the question: the node is back; so is a question
    // from the future.
    assert!(at(&mut s, 4, 50_000, quiet(45_000, 40_000)).is_err(), "a keepalive stamped when asked");
    assert!(at(&mut s, 5, 50_000, quiet(45_000, 50_001)).is_err(), "asked after now");
    // The keepalive rule would wait until 85 000; the session's evidence needs no more.
    assert_eq!(at(&mut s, 6, 50_000, quiet(45_000, 40_001)), Ok(Reply::Done));
    assert_eq!(s.nodes["a"].daemon_state, DaemonState::Fenced);
    assert_ne!(s.vms["v1"].node, "a");
    assert!(s.events.iter().any(|e| e.message.contains("no coordinator acknowledged its session for 45000 ms")));
    assert!(at(&mut s, 7, 90_000, quiet(90_000, 89_000)).is_err(), "already fenced");
}

#[test]
fn a_node_that_self_fences_on_its_session_alone_is_never_recorded_self_fenced_on_its_keepalive() {
    let mut s = cluster();
    let p = s.nodes.get_mut("a").and_then(|n| n.fencing.as_mut()).expect("policy");
    p.failed_fence = FailedFence::RecoverAfterSelfFence;
    p.watchdog_timeout_ms = 10_000;
    let a = s.nodes.get_mut("a").expect("a");
    a.last_keepalive_ms = Some(1_000);
    a.stats = std::mem::take(&mut a.stats).with_session_guard(true);
    // Its keepalive is written only when its figures move: its age says nothing.
    let refused = at(&mut s, 2, 500_000, done(FenceOutcome::SelfFenced));
    assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("session alone")), "{refused:?}");
    assert_eq!(s.nodes["a"].daemon_state, DaemonState::Run);
    // The sessions' evidence still can.
    let quiet = FenceOutcome::SessionsQuiet { quiet_ms: 45_000, asked_ms: 499_000 };
    assert_eq!(at(&mut s, 3, 500_000, done(quiet)), Ok(Reply::Done));
    assert_eq!(s.nodes["a"].daemon_state, DaemonState::Fenced);
}

#[test]
fn a_keepalive_on_the_session_alone_needs_the_session_flag_too() {
    let mut s = cluster();
    let stats = NodeStats { session_only: true, ..Default::default() };
    let ka = |stats: NodeStats| Command::Keepalive { name: "a".into(), stats, node_id: None };
    assert!(at(&mut s, 2, 100, ka(stats.clone())).is_err(), "one flag without the other cannot be encoded");
    assert_eq!(at(&mut s, 3, 100, ka(stats.with_session_guard(true))), Ok(Reply::Done));
    assert!(s.nodes["a"].stats.session_only);
}

#[test]
fn maintenance_policy_and_validation_refusals() {
    let mut s = cluster();
    s.meta.as_mut().expect("meta").maintenance = true;
    assert!(at(&mut s, 2, 100, decide(false)).is_err(), "maintenance: no automatic fence");
    assert_eq!(at(&mut s, 3, 100, decide(true)), Ok(Reply::Done), "an operator may fence by hand");
    let mut s = cluster();
    s.nodes.get_mut("a").expect("a").fencing = None;
    assert!(at(&mut s, 2, 100, decide(true)).is_err(), "no policy, no fence");
    let mut bad = policy();
    bad.failed_fence = FailedFence::RecoverAfterSelfFence;
    let set = |p| Command::SetFencePolicy { name: "a".into(), policy: Some(p), node_id: None };
    assert!(at(&mut s, 3, 100, set(bad)).is_err(), "self-fence needs a watchdog");
    let mut ext = policy();
    ext.agent = FenceAgentKind::External;
    assert!(at(&mut s, 4, 100, set(ext)).is_err(), "external needs a command");
    assert_eq!(at(&mut s, 5, 100, set(policy())), Ok(Reply::Done));
    assert!(!format!("{:?}", s.nodes["a"].fencing).contains("pw1"), "Debug redacts the password");
}

#[test]
fn a_vm_caught_mid_move_is_released_or_rerouted() {
    let mut s = cluster();
    // "out" was moving from a to b (not released yet); "in" from b to a.
    let mut out = vm("out", "b", VmState::Migrate);
    out.migrating_from = Some("a".into());
    out.last_node = Some("a".into());
    let mut inc = vm("in", "a", VmState::Migrate);
    inc.migrating_from = Some("b".into());
    inc.last_node = Some("b".into());
    s.vms.insert("out".into(), out);
    s.vms.insert("in".into(), inc);
    at(&mut s, 2, 100, decide(false)).expect("decide");
    at(&mut s, 3, 200, done(FenceOutcome::Fenced)).expect("fenced");
    assert_eq!(s.vms["out"].migrating_from, None, "its source is dead: released");
    let inc = &s.vms["in"];
    // Placed again; it still waits for b's release unless it landed on b itself.
    assert_ne!(inc.node, "a");
    assert_eq!(inc.migrating_from.is_some(), inc.node != "b");
    assert_ne!(inc.last_node.as_deref(), Some(inc.node.as_str()));
}

/// The fencing token: `ExecuteFence` names the decision it executes and is refused once that
/// decision no longer stands (cancelled, done, or superseded by a later decision).
#[test]
fn the_fencing_token_names_a_decision_that_still_stands() {
    let mut s = cluster();
    let exec = |decided_ms| Command::ExecuteFence { name: "a".into(), decided_ms, by: 2 };
    assert!(at(&mut s, 2, 50, exec(50)).is_err(), "no decision yet");
    at(&mut s, 3, 100, decide(false)).expect("decide");
    assert!(at(&mut s, 4, 110, exec(99)).is_err(), "not the decision made at 100");
    assert_eq!(at(&mut s, 5, 120, exec(100)), Ok(Reply::Done));
    assert_eq!(s.nodes["a"].fence.pending.as_ref().and_then(|p| p.executing_ms), Some(120));
    assert_eq!(s.nodes["a"].fence.pending.as_ref().and_then(|p| p.executing_by), Some(2));
    // A second executor (a new primary) may take the token again; the first time stays.
    assert_eq!(at(&mut s, 6, 130, exec(100)), Ok(Reply::Done));
    assert_eq!(s.nodes["a"].fence.pending.as_ref().and_then(|p| p.executing_ms), Some(120));
    // A cancel after the token was taken says a power-off may still come.
    let cancel = Command::CancelFence { name: "a".into(), reason: "heard again".into() };
    at(&mut s, 7, 140, cancel).expect("cancel");
    let last = s.events.back().expect("an event");
    assert!(last.message.contains("a power-off may have been sent"), "{}", last.message);
    assert!(at(&mut s, 8, 150, exec(100)).is_err(), "a cancelled decision gives no token");
    // A new decision supersedes the old one: the old executor's token is refused.
    at(&mut s, 9, 200, decide(false)).expect("decide again");
    assert!(at(&mut s, 10, 210, exec(100)).is_err(), "superseded");
    at(&mut s, 11, 220, done(FenceOutcome::Fenced)).expect("done");
    assert!(at(&mut s, 12, 230, exec(200)).is_err(), "a done fence gives no token");
}

/// A removed node leaves a tombstone: removal is known by id, never guessed from a missing
/// record, and the id is never used again.
#[test]
fn removal_leaves_a_tombstone() {
    let mut s = cluster();
    s.vms.retain(|_, v| v.node != "c");
    assert!(!s.was_removed(3));
    at(&mut s, 2, 100, Command::RemoveNode { name: "c".into() }).expect("remove c");
    assert!(s.was_removed(3));
    assert!(!s.was_removed(1) && !s.was_removed(99), "only the removed id");
    let bytes = rmp_serde::to_vec_named(&s).expect("encode");
    let back: State = rmp_serde::from_slice(&bytes).expect("decode");
    assert!(back.was_removed(3), "the tombstone survives a snapshot");
}

/// A move away from a node waits for that node to stop the VM: removing it would leave the
/// move waiting for ever, so removal is refused — unless the node is fenced (its power-off
/// proved the VM off), when removal lets the move go.
#[test]
fn removal_lets_moves_away_go_only_from_a_fenced_node() {
    let mut s = cluster();
    s.vms.retain(|_, v| v.node != "c");
    let mut moving = vm("m", "a", VmState::Migrate);
    moving.migrating_from = Some("c".into());
    s.vms.insert("m".into(), moving);
    let err = at(&mut s, 2, 100, Command::RemoveNode { name: "c".into() }).expect_err("refused");
    assert!(err.to_string().contains("still moving away from c (m)"), "{err}");
    assert_eq!(s.vms["m"].migrating_from.as_deref(), Some("c"), "a refusal changes nothing");
    s.nodes.get_mut("c").expect("c").daemon_state = DaemonState::Fenced;
    at(&mut s, 5, 200, Command::RemoveNode { name: "c".into() }).expect("remove fenced c");
    assert_eq!(s.vms["m"].migrating_from, None, "the move no longer waits for c");
}

/// A node whose fence is under way is not removed: the executor's token names the decision
/// on its record, which must stand until the fence is done or cancelled.
#[test]
fn a_node_with_a_fence_under_way_is_not_removed() {
    let mut s = cluster();
    s.vms.retain(|_, v| v.node != "a");
    at(&mut s, 2, 100, decide(false)).expect("decided");
    let err = at(&mut s, 3, 150, Command::RemoveNode { name: "a".into() }).expect_err("a fence under way");
    assert!(err.to_string().contains("fence of a is under way"), "{err}");
    at(&mut s, 4, 200, done(FenceOutcome::Fenced)).expect("done");
    at(&mut s, 5, 300, Command::RemoveNode { name: "a".into() }).expect("removed once the fence is done");
}

/// `fence_action = reboot`: the power-on stays due after a confirmed fence until it is done, the
/// node is back, or `POWER_ON_GIVE_UP_MS` has passed (a primary that crashed in between leaves
/// it to the next).
#[test]
fn a_reboot_fence_leaves_its_power_on_due_until_done_back_or_given_up() {
    let power_on = |error: Option<&str>| Command::FencePowerOn { name: "a".into(), error: error.map(Into::into) };
    let mut s = cluster();
    assert!(at(&mut s, 2, 50, power_on(None)).is_err(), "nothing due before a fence");
    at(&mut s, 3, 100, decide(false)).expect("decided");
    at(&mut s, 4, 200, done(FenceOutcome::Fenced)).expect("fenced");
    assert_eq!(s.nodes["a"].fence.power_on_due_ms, Some(200));
    at(&mut s, 5, 300, power_on(Some("timeout"))).expect("a failure is recorded");
    assert_eq!(s.nodes["a"].fence.power_on_due_ms, Some(200), "still due after a failure");
    at(&mut s, 6, 400, power_on(None)).expect("done");
    assert_eq!(s.nodes["a"].fence.power_on_due_ms, None);
    assert!(at(&mut s, 7, 500, power_on(None)).is_err(), "done once");
    assert!(kinds(&s).ends_with(&["fence-power-on-failed", "fence-power-on"]));

    // Failures past the give-up time end it; the node coming back ends it too.
    let mut s = cluster();
    at(&mut s, 2, 100, decide(false)).expect("decided");
    at(&mut s, 3, 200, done(FenceOutcome::Fenced)).expect("fenced");
    at(&mut s, 4, 200 + POWER_ON_GIVE_UP_MS, power_on(Some("no answer"))).expect("recorded");
    assert_eq!(s.nodes["a"].fence.power_on_due_ms, None, "given up");
    let mut s = cluster();
    at(&mut s, 2, 100, decide(false)).expect("decided");
    at(&mut s, 3, 200, done(FenceOutcome::Fenced)).expect("fenced");
    let run = Command::SetDaemonState { name: "a".into(), state: DaemonState::Run, return_by_ms: None, node_id: None };
    at(&mut s, 4, 300, run).expect("back");
    assert_eq!(s.nodes["a"].fence.power_on_due_ms, None, "back: on by itself");

    // fence_action = off: nothing is due.
    let mut s = cluster();
    s.nodes.get_mut("a").and_then(|a| a.fencing.as_mut()).expect("policy").fence_action = FenceAction::Off;
    at(&mut s, 2, 100, decide(false)).expect("decided");
    at(&mut s, 3, 200, done(FenceOutcome::Fenced)).expect("fenced");
    assert_eq!(s.nodes["a"].fence.power_on_due_ms, None);
}

/// Issue 21: a VM whose `node_limit` allows only the fenced node does not go to `fail`: it
/// waits (state unchanged, a visible reason, started by no one), a node outside its limit
/// becoming ready does not place it, and it is placed when a node inside the limit is ready
/// (in maintenance: when maintenance ends).
#[test]
fn a_vm_with_no_node_that_fits_waits_and_is_placed_when_one_is_ready() {
    let mut s = cluster();
    if let Some(v) = s.vms.get_mut("v1") {
        v.spec.node_limit = vec!["a".into()];
    }
    assert_eq!(at(&mut s, 2, 100, decide(false)), Ok(Reply::Done));
    assert_eq!(at(&mut s, 3, 200, done(FenceOutcome::Fenced)), Ok(Reply::Done));
    let v1 = &s.vms["v1"];
    assert_eq!((v1.node.as_str(), v1.state), ("a", VmState::Start), "not failed, not moved outside its limit");
    assert!(v1.waiting.as_deref().is_some_and(|w| w.contains("no node in node_limit is ready")), "{v1:?}");
    assert_ne!(s.vms["v2"].node, "a", "v2 has no limit: recovered");
    // b flushed and made ready again: outside v1's limit, nothing changes.
    for (i, st) in
        [DomainState::Flush, DomainState::Flushed, DomainState::Unflush, DomainState::Ready].iter().enumerate()
    {
        let cmd = Command::SetDomainState { name: "b".into(), state: *st, node_id: None };
        let _ = at(&mut s, 4 + i as u64, 300, cmd);
    }
    assert_eq!(s.vms["v1"].node, "a");
    assert!(s.vms["v1"].waiting.is_some());
    // a comes back and is made ready: v1 is placed there and no longer waits.
    let run = Command::SetDaemonState { name: "a".into(), state: DaemonState::Run, return_by_ms: None, node_id: None };
    assert_eq!(at(&mut s, 10, 400, run), Ok(Reply::Done));
    assert!(s.vms["v1"].waiting.is_some(), "a is back but still fenced");
    let unflush = Command::SetDomainState { name: "a".into(), state: DomainState::Unflush, node_id: None };
    assert_eq!(at(&mut s, 11, 500, unflush), Ok(Reply::Done));
    assert!(s.vms["v1"].waiting.is_some(), "unflushing is not ready");
    // In maintenance a ready node places nothing: the VM is placed once maintenance ends.
    assert_eq!(at(&mut s, 12, 550, Command::SetMaintenance { on: true }), Ok(Reply::Done));
    let ready = Command::SetDomainState { name: "a".into(), state: DomainState::Ready, node_id: None };
    assert_eq!(at(&mut s, 13, 600, ready), Ok(Reply::Done));
    assert!(s.vms["v1"].waiting.is_some(), "maintenance: no automatic placement");
    assert_eq!(at(&mut s, 14, 650, Command::SetMaintenance { on: false }), Ok(Reply::Done));
    let v1 = &s.vms["v1"];
    assert_eq!((v1.node.as_str(), v1.state, v1.waiting.as_deref()), ("a", VmState::Start, None));
    assert!(kinds(&s).contains(&"vm-placed"), "{:?}", kinds(&s));
}

/// `NodeStats` as the previous version knew it (the wire encodes structs as arrays, by
/// position; a node of that version refuses an array longer than it knows).
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct StatsBefore {
    cpu_count: u32,
    load_milli: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    vms_running: u32,
    mem_allocated_mib: u64,
    mem_provisioned_mib: u64,
    vcpus_allocated: u32,
    stale: bool,
    unmanaged_domains: Vec<String>,
}

/// `NodeStats` as the version before `session_only` knew it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Default, PartialEq)]
#[serde(default)]
struct StatsWithSessionFlag {
    cpu_count: u32,
    load_milli: u64,
    mem_total_mib: u64,
    mem_used_mib: u64,
    vms_running: u32,
    mem_allocated_mib: u64,
    mem_provisioned_mib: u64,
    vcpus_allocated: u32,
    stale: bool,
    unmanaged_domains: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    session_self_fence: bool,
}

#[test]
fn statistics_without_the_session_flag_are_what_the_previous_version_reads_and_writes() {
    let stats =
        NodeStats { cpu_count: 4, mem_total_mib: 8192, unmanaged_domains: vec!["x".into()], ..Default::default() };
    let bytes = rmp_serde::to_vec(&stats).expect("encode");
    let before: StatsBefore = rmp_serde::from_slice(&bytes).expect("the previous version reads it");
    assert_eq!((before.cpu_count, before.mem_total_mib), (4, 8192));
    assert_eq!(rmp_serde::to_vec(&before).expect("encode"), bytes, "byte for byte");
    let back: NodeStats = rmp_serde::from_slice(&bytes).expect("decode");
    assert_eq!(back, stats);
    // Set, it is one element more: only for a cluster whose members all run this version.
    let flagged = NodeStats { session_self_fence: true, ..stats.clone() };
    let bytes = rmp_serde::to_vec(&flagged).expect("encode");
    assert!(rmp_serde::from_slice::<StatsBefore>(&bytes).is_err(), "the previous version cannot read the flag");
    assert_eq!(rmp_serde::from_slice::<NodeStats>(&bytes).expect("decode"), flagged);
    // The session alone: one element more again, and the session flag read back too.
    let alone = stats.clone().with_session_guard(true);
    let bytes = rmp_serde::to_vec(&alone).expect("encode");
    assert!(rmp_serde::from_slice::<StatsWithSessionFlag>(&bytes).is_err(), "the version before cannot read it");
    assert_eq!(rmp_serde::from_slice::<NodeStats>(&bytes).expect("decode"), alone);
    let flagged_bytes = rmp_serde::to_vec(&flagged).expect("encode");
    let read: StatsWithSessionFlag =
        rmp_serde::from_slice(&flagged_bytes).expect("the version before reads the session flag");
    assert!(read.session_self_fence);
}
