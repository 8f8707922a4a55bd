//! An executor that loses the primary role between the decision and the power-off sends none
//! (issue 16): 3 coordinators + 2 hypervisors in network namespaces, one `ipmi_sim` per node;
//! `hv`'s BMC is traced, so every packet and every power-off it gets is attributed to its
//! sender's address. The primary runs one fence at a time (`max_parallel = 1`): an operator
//! fences `hv2`, whose BMC takes 8 s to carry the power-off out, so that executor holds the one
//! slot while it confirms. Then the operator fences `hv` too: the decision is committed and its
//! executor waits for the slot — and right then the primary is cut from the other coordinators
//! on the Raft network (heartbeat and BMC networks stay up: it could still reach `hv`'s BMC).
//! Then:
//! - exactly one power-off reaches `hv`'s BMC, and it comes from the new primary;
//! - from one lease plus one call timeout after the cut until the cut heals, no packet at all
//!   from the deposed primary reaches `hv`'s BMC (its duties dropped: executors and checks
//!   stop, the waiting executor included);
//! - the majority records `hv` fenced and, after the cut heals, its VMs run elsewhere, by each
//!   node's own libvirtd, never on two nodes.
//!
//! `HERD_T95_RUNS=10 cargo test --test cluster t95` repeats it on fresh clusters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::bmc;
use crate::fencelab::{self, events, vms};
use crate::harness::wait_until;
use crate::libvirtd::{self, DoubleSampler};
use crate::netns::{self, Topology};

const NETS: [&str; 3] = ["mgmt", "storage", "bmc"];
const NAMES: [&str; 5] = ["c1", "c2", "c3", "hv", "hv2"];
const HV: usize = 3;
const HV2: usize = 4;
/// `hv2`'s BMC carries a power-off out this long after acknowledging it.
const HV2_OFF_DELAY_S: u64 = 8;
const VMS: usize = 2;
/// openraft's election_timeout max (herd's default): the primary lease.
const LEASE_S: f64 = 0.3;
/// `[fence] call_timeout_ms` below: a call in flight when the duties dropped ends by then.
const CALL_TIMEOUT_S: f64 = 1.0;

fn wall() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[test]
fn a_deposed_executor_sends_no_power_off() {
    let test = "a_deposed_executor_sends_no_power_off";
    if !netns::available(test) || !libvirtd::available(test) || !bmc::available(test) {
        return;
    }
    let runs: usize = std::env::var("HERD_T95_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    for run in 1..=runs {
        let secs = one_run();
        eprintln!("t95 run {run}/{runs}: hv's one power-off came from the new primary, {secs:.3} s after the cut");
    }
}

/// One scenario on a fresh cluster; when hv's power-off came, in seconds after the cut.
fn one_run() -> f64 {
    let topo = Topology::new("de", NAMES.len(), &NETS);
    let mut c = fencelab::cluster_on(&topo, &NAMES);
    let (bmcs, daemons) = fencelab::start_nodes(
        &mut c,
        &topo,
        &NAMES,
        Some(HV),
        "check_interval_ms = 1000\ncall_timeout_ms = 1000\nconfirm_timeout_ms = 12000\nmax_parallel = 1\n",
    );
    let sampler = DoubleSampler::start(daemons.clone());
    fencelab::form(&mut c, &NAMES, &format!("{}:7400", topo.addr(1, 0)));
    fencelab::define_vms(&mut c, "c2", VMS, "005", &["--node", "hv"]);
    wait_until("every VM running on hv", Duration::from_secs(30), || {
        let on_hv = daemons[HV].try_running().unwrap_or_default();
        (on_hv.iter().filter(|(n, _)| n != "test").count() == VMS).then_some(())
    });

    // hv2's fence holds the primary's one slot for 8 s.
    std::fs::write(bmcs[HV2].dir.join("off_delay"), format!("{HV2_OFF_DELAY_S}\n")).expect("off_delay");
    let out = c.node("c3").cli(&["node", "fence", "hv2", "--yes"]);
    assert!(out.status.success(), "node fence hv2: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("hv2's BMC acknowledged the power-off", Duration::from_secs(10), || {
        bmcs[HV2].chassis_log().contains("set power 0").then_some(())
    });

    // An operator fences hv too: the decision is committed at once (no saving throw for a
    // manual fence) and its executor waits for the slot — and right then the primary is cut
    // off Raft.
    let out = c.node("c3").cli(&["node", "fence", "hv", "--yes"]);
    assert!(out.status.success(), "node fence hv: {}", String::from_utf8_lossy(&out.stderr));
    let primary = wait_until("the fence of hv decided", Duration::from_secs(20), || {
        let ev = events(c.node("c3"));
        ev.iter().any(|e| e["kind"] == "fence-decided" && e["node"] == "hv").then_some(())?;
        c.node("c3").try_admin(&json!({"op": "status"})).ok()?["primary"].as_str().map(str::to_string)
    });
    assert!(bmcs[HV2].power_on(), "hv2's power-off is still due when hv's fence is decided: the slot is taken");
    let p = NAMES.iter().position(|n| *n == primary).expect("a coordinator") + 1;
    let others: Vec<usize> = (1..=3).filter(|i| *i != p).collect();
    for &o in &others {
        topo.cut_between_on(p, o, &[0], true);
    }
    let cut_at = wall();
    let witness = NAMES[others[0] - 1];

    wait_until("the majority records hv fenced", Duration::from_secs(30), || {
        let n = c.node(witness).try_admin(&json!({"op": "node-info", "name": "hv", "local": true})).ok()?;
        (n["daemon_state"] == "fenced").then_some(())
    });
    let healed_at = wall();
    for &o in &others {
        topo.cut_between_on(p, o, &[0], false);
    }
    wait_until("hv's VMs running elsewhere", Duration::from_secs(30), || {
        let list = vms(c.node(witness));
        let elsewhere: usize = daemons[..3]
            .iter()
            .map(|d| d.try_running().unwrap_or_default().iter().filter(|(n, _)| n != "test").count())
            .sum();
        (list.len() == VMS && list.iter().all(|v| v["node"] != "hv") && elsewhere == VMS).then_some(())
    });

    let hv_bmc = &bmcs[HV];
    let deposed = topo.addr(p, 2);
    let offs = hv_bmc.power_offs_by();
    let late: Vec<f64> = hv_bmc
        .received()
        .into_iter()
        .filter(|(at, from)| *from == deposed && *at > cut_at + LEASE_S + CALL_TIMEOUT_S && *at < healed_at)
        .map(|(at, _)| at - cut_at)
        .collect();
    let shown: Vec<(String, String)> =
        offs.iter().map(|(at, from)| (format!("{:.3}", at - cut_at), from.clone())).collect();
    eprintln!("  primary {primary} ({deposed}) cut; power-offs at hv's BMC (s after the cut, from): {shown:?}");
    assert_eq!(offs.len(), 1, "exactly one power-off reached hv's BMC: {shown:?}");
    assert!(offs[0].1.starts_with("10.210.2."), "the power-off's sender is known: {shown:?}");
    assert_ne!(offs[0].1, deposed, "the deposed primary sent hv's power-off: {shown:?}");
    assert!(late.is_empty(), "the deposed primary still talked to hv's BMC (s after the cut): {late:?}");
    let (samples, doubles) = sampler.finish();
    assert!(samples > 10, "the sampler ran ({samples} samples)");
    assert!(doubles.is_empty(), "a VM ran on two nodes: {doubles:?}");
    offs[0].0 - cut_at
}
