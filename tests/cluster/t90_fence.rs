//! Fencing: the built-in IPMI agent against a live `ipmi_sim`, and (in `t91`) fencing and
//! recovery of a whole cluster in network namespaces.

use std::process::Command;
use std::time::{Duration, Instant};

use herd::fence::agent::{Action, FenceAgent, FenceError, Fencer, Power, Purpose};
use herd::fence::ipmi::{IpmiBmc, MAX_CHECK_SESSIONS};
use herd::fence::registry::AgentRegistry;
use herd_storage::model::{FenceAction, FenceAgentKind, FencePolicy};

use crate::bmc::{self, Bmc, USER};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn policy(addr: &str, password: &str) -> FencePolicy {
    FencePolicy { fence_action: FenceAction::Off, ..FencePolicy::ipmi(addr, USER, password) }
}

#[test]
fn ipmi_agent_against_a_live_ipmi_sim() {
    let _share = crate::harness::share();
    if !bmc::available("ipmi_agent_against_a_live_ipmi_sim") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = Bmc::start(&dir.path().join("bmc"), "127.0.0.1", bmc::free_udp_port(), None);
    // The "host": a process the power-off must kill.
    let mut host = Command::new("sleep").arg("600").spawn().expect("spawn host");
    b.kill_on_power_off("host", host.id());
    let rt = rt();
    let registry = AgentRegistry::new();
    let agent = registry.agent(&policy(&b.addr, &b.password));
    let call = |a: &dyn FenceAgent, action, ms| rt.block_on(a.call(action, Duration::from_millis(ms)));

    // status, off (the host dies), status, on.
    assert_eq!(call(&*agent, Action::Status, 3000), Ok(Power::On));
    assert_eq!(call(&*agent, Action::Off, 3000), Ok(Power::Off));
    assert_eq!(call(&*agent, Action::Status, 3000), Ok(Power::Off));
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the power-off did not kill the host");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!b.power_on());
    assert_eq!(call(&*agent, Action::On, 3000), Ok(Power::On));
    assert_eq!(call(&*agent, Action::Status, 3000), Ok(Power::On));
    assert!(b.chassis_log().contains("set power 0") && b.chassis_log().contains("set power 1"));

    // A wrong password: a clear error, quickly, and no password in it.
    let wrong = IpmiBmc::new(&b.addr, USER, "not-the-password");
    let t = Instant::now();
    let e = call(&wrong, Action::Status, 3000).expect_err("wrong password");
    assert!(matches!(e, FenceError::Auth { .. }), "{e:?}");
    assert!(e.to_string().contains("authentication refused") && !e.to_string().contains("not-the-password"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // 100 invocations as fence operations run them (a fresh lookup in the registry each time),
    // three of them hitting a frozen BMC: every call ends within its deadline, and afterwards
    // other clients can still open sessions (herd did not exhaust the BMC's slots).
    let mut errors = 0;
    for i in 0..100 {
        let a = registry.agent(&policy(&b.addr, &b.password));
        let frozen = i % 33 == 32;
        if frozen {
            b.pause();
        }
        let t = Instant::now();
        let r = call(&*a, Action::Status, 1000);
        assert!(t.elapsed() < Duration::from_millis(1300), "call {i} took {:?}", t.elapsed());
        if frozen {
            b.resume();
            assert!(r.is_err(), "call {i} on a frozen BMC: {r:?}");
            errors += 1;
        } else {
            assert_eq!(r, Ok(Power::On), "call {i}");
        }
    }
    assert_eq!(errors, 3);
    let out = b.ipmitool(&["chassis", "power", "status"]).expect("ipmitool still gets a session");
    assert!(out.contains("Chassis Power is on"), "{out}");

    // A stopped BMC: an error within the deadline, never a hang.
    b.kill();
    let t = Instant::now();
    let e = call(&*registry.agent(&policy(&b.addr, &b.password)), Action::Off, 1000).expect_err("dead BMC");
    assert!(t.elapsed() < Duration::from_millis(1300), "{:?}", t.elapsed());
    eprintln!("dead BMC: {e} after {:?}", t.elapsed());
}

/// Readiness checks never use up the IPMI sessions a fence needs (issue 16): checks against a
/// BMC that does not answer in time (frozen) open at most `MAX_CHECK_SESSIONS` new sessions in
/// the window, then are refused saying what failed; the fence asked for next still gets the
/// session kept for it, and the power-off goes through.
#[test]
fn readiness_checks_cannot_starve_a_fence() {
    let _share = crate::harness::share();
    if !bmc::available("readiness_checks_cannot_starve_a_fence") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Bmc::start(&dir.path().join("bmc"), "127.0.0.1", bmc::free_udp_port(), None);
    let mut host = Command::new("sleep").arg("600").spawn().expect("spawn host");
    b.kill_on_power_off("host", host.id());
    let rt = rt();
    let agent = IpmiBmc::new(&b.addr, USER, &b.password);
    b.pause();
    let mut last = None;
    for i in 0..8 {
        let r = rt.block_on(agent.call_for(Action::Status, Duration::from_millis(700), Purpose::Check));
        assert!(r.is_err(), "check {i} against a frozen BMC: {r:?}");
        last = r.err();
    }
    assert_eq!(agent.recent_sessions(), MAX_CHECK_SESSIONS, "checks opened no more than their share");
    let refusal = last.expect("a refusal").to_string();
    assert!(refusal.contains("readiness checks") && refusal.contains("no answer"), "says what failed: {refusal}");
    b.resume();
    assert_eq!(rt.block_on(agent.call(Action::Off, Duration::from_secs(3))), Ok(Power::Off), "the fence's session");
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the power-off did not kill the host");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The external agent driving the real `fence_ipmilan` (package fence-agents) against a live
/// `ipmi_sim`: the stdin protocol as the fence-agents project defines it.
#[test]
fn external_agent_drives_fence_ipmilan() {
    let _share = crate::harness::share();
    let test = "external_agent_drives_fence_ipmilan";
    if !bmc::available(test) {
        return;
    }
    let agent_path = "/usr/sbin/fence_ipmilan";
    if !std::path::Path::new(agent_path).exists() {
        crate::harness::skip(test, &format!("{agent_path} is missing (Debian package fence-agents)"));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Bmc::start(&dir.path().join("bmc"), "127.0.0.1", bmc::free_udp_port(), None);
    let mut host = Command::new("sleep").arg("600").spawn().expect("spawn host");
    b.kill_on_power_off("host", host.id());
    let external = |password: &str| {
        let mut p = policy(&b.addr, password);
        p.agent = FenceAgentKind::External;
        p.command = Some(agent_path.into());
        p.options = vec!["lanplus=1".into(), "cipher=3".into()];
        AgentRegistry::new().agent(&p)
    };
    let rt = rt();
    let agent = external(&b.password);
    let call = |action| rt.block_on(agent.call(action, Duration::from_secs(20)));
    assert_eq!(call(Action::Status), Ok(Power::On));
    assert_eq!(call(Action::Off), Ok(Power::Off));
    assert_eq!(call(Action::Status), Ok(Power::Off));
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the power-off did not kill the host");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(call(Action::On), Ok(Power::On));
    let wrong = external("wrong-password-xyz");
    let e = rt.block_on(wrong.call(Action::Status, Duration::from_secs(20))).expect_err("wrong password");
    assert!(matches!(e, FenceError::Agent { .. }), "{e:?}");
    assert!(!e.to_string().contains("wrong-password-xyz"), "{e}");
    eprintln!("fence_ipmilan with a wrong password: {e}");
}
