//! VM lifecycle in network namespaces (issue 21), judged by each node's own libvirtd: 3
//! coordinators + 2 hypervisors, one `ipmi_sim` and one libvirtd per node, a sampler checking
//! all along that no VM runs on two nodes. In one run, in order:
//! (a) a foreign domain named like a managed VM (another uuid) runs on `hv2`: it is listed as
//!     unmanaged and left running; the VM's define clash fails it with a reason naming `hv2`;
//! (b) a live-only move the driver refuses leaves `live` in `fail`, still running on `hv`
//!     (same libvirt id); a plain `vm migrate` then runs it on `hv2`, and nowhere else;
//! (c) `hv` fenced by hand: `pinned` (`--limit hv`) waits, running nowhere, with the reason;
//!     `hv` boots again and is made ready: `pinned` is placed and runs there;
//! (d) `herd node shutdown hv2 --timeout 60s` with 3 VMs: all run elsewhere before herd exits
//!     (0), `shutdown`/`flushed` recorded;
//! (e) `cluster maintenance on`: a VM destroyed by hand is not started again (a `vm-drift`
//!     event says so), one destroyed and started by hand on another node is left there,
//!     an operator's `vm stop`/`vm start` still works; maintenance off → the first runs again,
//!     the second is adopted where it runs;
//! (f) a VM started by hand on a second node while it runs: `fail` within 5 s naming both
//!     nodes, both copies left running (the only double the sampler may see).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bmc;
use crate::fencelab::{self, events, vms};
use crate::harness::{wait_until, Cluster};
use crate::libvirtd::{self, DoubleSampler, Libvirtd};
use crate::netns::{self, Topology};

const NETS: [&str; 3] = ["mgmt", "storage", "bmc"];
const NAMES: [&str; 5] = ["c1", "c2", "c3", "hv", "hv2"];
const HV: usize = 3;
const HV2: usize = 4;
/// `hv`'s libvirtd after its reboot: `daemons[BOOT]`, watched by the sampler from the start.
const BOOT: usize = 5;

fn xml(name: &str, uuid_tail: u32) -> String {
    format!(
        "<domain type='test'><name>{name}</name><uuid>00000000-0000-4000-8000-000000086{uuid_tail:03}</uuid>\
         <memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
    )
}

fn define(c: &mut Cluster, name: &str, uuid_tail: u32, args: &[&str]) {
    let path = c.node("c2").dir.join(format!("{name}.xml"));
    std::fs::write(&path, xml(name, uuid_tail)).expect("xml");
    let mut all = vec!["vm", "define", path.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    let out = c.node("c2").cli(&all);
    assert!(out.status.success(), "define {name}: {}", String::from_utf8_lossy(&out.stderr));
}

fn vm(c: &mut Cluster, name: &str) -> Value {
    vms(c.node("c1")).into_iter().find(|v| v["name"] == name).unwrap_or(Value::Null)
}

/// The nodes (indexes into `daemons`) whose libvirtd runs `name`; a dead libvirtd runs nothing.
fn running_on(daemons: &[Arc<Libvirtd>], name: &str) -> Vec<usize> {
    (0..daemons.len())
        .filter(|i| daemons[*i].try_running().unwrap_or_default().iter().any(|(n, _)| n == name))
        .collect()
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{what}: {said}{}", String::from_utf8_lossy(&out.stderr));
    said
}

#[test]
fn vm_lifecycle_in_namespaces() {
    let test = "vm_lifecycle_in_namespaces";
    if !netns::available(test) || !libvirtd::available(test) || !bmc::available(test) {
        return;
    }
    let topo = Topology::new("lc", NAMES.len(), &NETS);
    let mut c = fencelab::cluster_on(&topo, &NAMES);
    let (bmcs, mut daemons) =
        fencelab::start_nodes(&mut c, &topo, &NAMES, None, "check_interval_ms = 1000\ncall_timeout_ms = 1000\n");
    daemons.push(Arc::new(Libvirtd::start(&c.node("hv").dir.join("lvd-boot2"))));
    let sampler = DoubleSampler::start(daemons.clone());
    fencelab::form(&mut c, &NAMES, &format!("{}:7400", topo.addr(1, 0)));

    foreign_domain(&mut c, &daemons);
    failed_move(&mut c, &daemons);
    waiting_vm(&mut c, &daemons, &bmcs);
    host_shutdown(&mut c, &daemons);
    maintenance(&mut c, &daemons);
    split(&mut c, &daemons);

    let (samples, doubles) = sampler.finish();
    assert!(samples > 20, "the sampler ran ({samples} samples)");
    // The one double the test made by hand (f) is the only one allowed.
    let doubles: Vec<&String> = doubles.iter().filter(|d| !d.starts_with("s2 ")).collect();
    assert!(doubles.is_empty(), "a VM ran on two nodes: {doubles:?}");
}

/// (a) A domain named `foreign` with another uuid, started by hand on hv2, then the VM
/// `foreign` defined there.
fn foreign_domain(c: &mut Cluster, daemons: &[Arc<Libvirtd>]) {
    let other_uuid = xml("foreign", 1).replace("000000086001", "0000000869ff");
    daemons[HV2].start_by_hand(&other_uuid);
    define(c, "foreign", 1, &["--node", "hv2"]);
    let failed = wait_until("foreign failed on its define clash", Duration::from_secs(20), || {
        Some(vm(c, "foreign")).filter(|v| v["state"] == "fail")
    });
    let reason = failed["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("on hv2: "), "the reason names the node: {failed}");
    wait_until("the foreign domain listed as unmanaged on hv2", Duration::from_secs(10), || {
        let s = c.node("hv2").try_admin(&json!({"op": "status"})).ok()?;
        s["unmanaged_domains"].as_array()?.contains(&json!("foreign")).then_some(())
    });
    assert_eq!(running_on(daemons, "foreign"), vec![HV2], "the foreign domain is left running");
    // The operator removes it; the VM is started.
    daemons[HV2].destroy_by_hand("foreign");
    ok(&c.node("c1").cli(&["vm", "start", "foreign"]), "vm start foreign");
    wait_until("foreign running on hv2", Duration::from_secs(20), || {
        (running_on(daemons, "foreign") == vec![HV2] && vm(c, "foreign")["state"] == "start").then_some(())
    });
    eprintln!("(a) foreign domain: unmanaged and left alone; define clash failed with \"{reason}\"");
}

/// (b) `live` on hv: a refused live-only move, then a plain one.
fn failed_move(c: &mut Cluster, daemons: &[Arc<Libvirtd>]) {
    define(c, "live", 2, &["--node", "hv"]);
    let id = wait_until("live running on hv", Duration::from_secs(20), || {
        daemons[HV].try_running().ok()?.into_iter().find(|(n, _)| n == "live").map(|(_, id)| id)
    });
    ok(&c.node("c1").cli(&["vm", "migrate", "live", "--to", "hv2", "--force-live"]), "migrate --force-live");
    wait_until("live failed its live-only move, still on hv", Duration::from_secs(20), || {
        let v = vm(c, "live");
        (v["state"] == "fail" && v["node"] == "hv").then_some(())
    });
    let still = daemons[HV].try_running().unwrap_or_default().into_iter().find(|(n, _)| n == "live");
    assert_eq!(still, Some(("live".to_string(), id)), "live untouched by the refused move");
    ok(&c.node("c1").cli(&["vm", "migrate", "live", "--to", "hv2"]), "migrate");
    wait_until("live running on hv2 only", Duration::from_secs(20), || {
        let v = vm(c, "live");
        (running_on(daemons, "live") == vec![HV2] && v["state"] == "start" && v["node"] == "hv2").then_some(())
    });
    eprintln!("(b) a failed VM still running moved by a plain migrate: running on hv2");
}

/// (c) `pinned` may run on hv only; hv is fenced, then boots again and is made ready.
fn waiting_vm(c: &mut Cluster, daemons: &[Arc<Libvirtd>], bmcs: &[bmc::Bmc]) {
    define(c, "pinned", 3, &["--node", "hv", "--limit", "hv"]);
    wait_until("pinned running on hv", Duration::from_secs(20), || {
        (running_on(daemons, "pinned") == vec![HV]).then_some(())
    });
    ok(&c.node("c3").cli(&["node", "fence", "hv", "--yes"]), "node fence hv");
    let waiting = wait_until("hv fenced, pinned waiting", Duration::from_secs(30), || {
        let info = c.node("c2").try_admin(&json!({"op": "node-info", "name": "hv"})).ok()?;
        let v = vm(c, "pinned");
        (info["daemon_state"] == "fenced" && v["waiting"].is_string()).then_some(v)
    });
    assert_eq!((waiting["state"].as_str(), waiting["node"].as_str()), (Some("start"), Some("hv")), "{waiting}");
    let why = waiting["waiting"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("no node in node_limit is ready"), "{waiting}");
    assert!(c.node("hv").wait_exit(Duration::from_secs(5)).is_some(), "the power-off killed hv's herd");
    // It runs nowhere while it waits (hv's libvirtd died with the power-off).
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(running_on(daemons, "pinned").is_empty(), "pinned runs while it waits");
    }
    // hv boots again with a fresh libvirtd: fenced until `node ready`, then pinned runs there.
    let (old_uri, new_uri) = (daemons[HV].uri(), daemons[BOOT].uri());
    let hv = c.node("hv");
    hv.extra_config = hv.extra_config.replace(&old_uri, &new_uri);
    hv.start();
    bmcs[HV].kill_on_power_off("herd", c.node("hv").child.as_ref().expect("running").id());
    wait_until("hv back, still fenced", Duration::from_secs(30), || {
        let ev = events(c.node("c1"));
        ev.iter()
            .any(|e| {
                e["kind"] == "daemon-state"
                    && e["node"] == "hv"
                    && e["message"].as_str().is_some_and(|m| m.contains("stays fenced"))
            })
            .then_some(())
    });
    ok(&c.node("c1").cli(&["node", "ready", "hv", "--wait"]), "node ready hv");
    wait_until("pinned placed and running on hv", Duration::from_secs(20), || {
        let v = vm(c, "pinned");
        (running_on(daemons, "pinned") == vec![BOOT] && v["waiting"].is_null() && v["state"] == "start").then_some(())
    });
    assert!(events(c.node("c1")).iter().any(|e| e["kind"] == "vm-placed"), "a vm-placed event");
    eprintln!("(c) pinned waited (\"{why}\") and runs on hv again once it is ready");
}

/// (d) `herd node shutdown hv2 --timeout 60s` with 3 VMs on hv2.
fn host_shutdown(c: &mut Cluster, daemons: &[Arc<Libvirtd>]) {
    // (`live` went home to hv with `node ready hv`: its move was temporary.)
    define(c, "s1", 4, &["--node", "hv2"]);
    define(c, "s2", 5, &["--node", "hv2"]);
    let three = ["foreign", "s1", "s2"];
    wait_until("three VMs running on hv2", Duration::from_secs(20), || {
        three.iter().all(|n| running_on(daemons, n) == vec![HV2]).then_some(())
    });
    let said = ok(&c.node("hv2").cli(&["node", "shutdown", "hv2", "--timeout", "60s"]), "node shutdown hv2");
    // Answered once the VMs run elsewhere, before herd exits.
    for n in three {
        let on = running_on(daemons, n);
        assert!(on.len() == 1 && on[0] != HV2, "{n} runs elsewhere when node shutdown answers: {on:?}");
    }
    let status = c.node("hv2").wait_exit(Duration::from_secs(30)).expect("herd on hv2 exits");
    assert!(status.success(), "{status:?}");
    let left: Vec<String> = daemons[HV2].running().into_iter().map(|(n, _)| n).filter(|n| n != "test").collect();
    assert!(left.is_empty(), "hv2 still runs {left:?}");
    let info = c.node("c1").admin(json!({"op": "node-info", "name": "hv2"}));
    assert_eq!((info["daemon_state"].as_str(), info["domain_state"].as_str()), (Some("shutdown"), Some("flushed")));
    eprintln!("(d) node shutdown hv2: {}", said.trim());
}

/// (e) Maintenance: drift reported, not acted on; operator commands work; acted on after.
fn maintenance(c: &mut Cluster, daemons: &[Arc<Libvirtd>]) {
    ok(&c.node("c1").cli(&["cluster", "maintenance", "on"]), "maintenance on");
    let on = running_on(daemons, "s1");
    assert_eq!(on.len(), 1, "s1 runs once: {on:?}");
    daemons[on[0]].destroy_by_hand("s1");
    wait_until("a vm-drift event for s1", Duration::from_secs(10), || {
        let ev = events(c.node("c1"));
        ev.iter()
            .any(|e| e["kind"] == "vm-drift" && e["message"].as_str().is_some_and(|m| m.starts_with("s1 ")))
            .then_some(())
    });
    // Several reconcile rounds (500 ms): never started again, whatever node looks.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(running_on(daemons, "s1").is_empty(), "s1 restarted in maintenance");
    }
    assert_eq!(vm(c, "s1")["state"], "start", "the state of record is kept");
    // s2 destroyed on its node and started by hand on another: neither copy is touched.
    let home = running_on(daemons, "s2");
    assert_eq!(home.len(), 1, "s2 runs once: {home:?}");
    let moved_to = another(home[0]);
    daemons[home[0]].destroy_by_hand("s2");
    daemons[moved_to].start_by_hand(&xml("s2", 5));
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(running_on(daemons, "s2"), vec![moved_to], "s2 moved by hand is left alone in maintenance");
    }
    assert_ne!(vm(c, "s2")["node"], node_name(moved_to), "not adopted in maintenance");
    // Operator commands still work.
    ok(&c.node("c1").cli(&["vm", "stop", "live"]), "vm stop live");
    wait_until("live stopped", Duration::from_secs(20), || running_on(daemons, "live").is_empty().then_some(()));
    ok(&c.node("c1").cli(&["vm", "start", "live"]), "vm start live");
    wait_until("live started", Duration::from_secs(20), || (running_on(daemons, "live").len() == 1).then_some(()));
    ok(&c.node("c1").cli(&["cluster", "maintenance", "off"]), "maintenance off");
    wait_until("s1 running again", Duration::from_secs(20), || (running_on(daemons, "s1").len() == 1).then_some(()));
    let there = node_name(moved_to);
    wait_until("s2 adopted where the operator runs it", Duration::from_secs(20), || {
        let v = vm(c, "s2");
        (v["node"] == there && v["state"] == "start" && running_on(daemons, "s2") == vec![moved_to]).then_some(())
    });
    assert!(events(c.node("c1")).iter().any(|e| e["kind"] == "vm-adopted"), "a vm-adopted event");
    eprintln!(
        "(e) maintenance: s1's crash and s2's move by hand reported, left alone; operator commands carried \
         out; after it s1 restarted, s2 adopted on {there}"
    );
}

/// A daemon's node name (`BOOT` is hv's libvirtd after its reboot).
fn node_name(i: usize) -> &'static str {
    if i == BOOT {
        "hv"
    } else {
        NAMES[i]
    }
}

/// The live nodes' libvirtds, besides `not`: c1, c2, c3 and hv (rebooted); hv2 is down.
fn another(not: usize) -> usize {
    [0, 1, 2, BOOT].into_iter().find(|i| *i != not).expect("another node")
}

/// (f) One authority per VM: s2 started by hand on a second node while it runs: `fail` within
/// 5 s naming both nodes, both copies still running; the operator removes one and starts it.
fn split(c: &mut Cluster, daemons: &[Arc<Libvirtd>]) {
    let home = running_on(daemons, "s2");
    assert_eq!(home.len(), 1, "{home:?}");
    let second = another(home[0]);
    let started = Instant::now();
    daemons[second].start_by_hand(&xml("s2", 5));
    let failed = wait_until("s2 failed, both nodes named", Duration::from_secs(5), || {
        Some(vm(c, "s2")).filter(|v| v["state"] == "fail")
    });
    let took = started.elapsed();
    let reason = failed["failure_reason"].as_str().unwrap_or_default().to_string();
    let (a, b) = (node_name(home[0]), node_name(second));
    assert!(reason.contains(a) && reason.contains(b), "{failed}");
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(running_on(daemons, "s2").len(), 2, "both copies still run");
    }
    daemons[second].destroy_by_hand("s2");
    ok(&c.node("c1").cli(&["vm", "start", "s2"]), "vm start s2");
    wait_until("s2 running once, in start", Duration::from_secs(20), || {
        (vm(c, "s2")["state"] == "start" && running_on(daemons, "s2") == home).then_some(())
    });
    eprintln!("(f) s2 started by hand on {b} beside {a}: fail in {} ms: \"{reason}\"", took.as_millis());
}
