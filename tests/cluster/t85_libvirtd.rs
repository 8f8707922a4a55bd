//! VMs checked against each node's own libvirt: one unprivileged libvirtd per node holding the
//! test driver, watched by the test through connections of its own. Six VMs run where the
//! cluster says; no VM is ever seen running on two nodes (sampled all along); the driver's own
//! `test` domain is reported as unmanaged and left alone; a restarted herd adopts its running
//! domains (same libvirt ids).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster, Node};
use crate::libvirtd::{self, DoubleSampler, Libvirtd};

const NAMES: [&str; 3] = ["l1", "l2", "l3"];

fn vms(node: &Node) -> Vec<Value> {
    node.try_admin(&json!({"op": "vm-list"})).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// Where each managed VM runs, by each node's own libvirt. The test driver's
/// built-in `test` domain runs on every node and is not herd's: it is left out.
fn observed(daemons: &[Arc<Libvirtd>]) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, d) in daemons.iter().enumerate() {
        for (name, _) in d.running() {
            if name == "test" {
                continue;
            }
            out.entry(name).or_default().push(i);
        }
    }
    out
}

#[test]
fn vms_against_each_nodes_own_libvirt() {
    if !libvirtd::available("vms_against_each_nodes_own_libvirt") {
        return;
    }
    let specs: Vec<(&str, &str, String)> =
        NAMES.iter().enumerate().map(|(i, n)| (*n, "coordinator", format!("127.0.8.{}:7400", i + 1))).collect();
    let refs: Vec<(&str, &str, &str)> = specs.iter().map(|(n, r, a)| (*n, *r, a.as_str())).collect();
    let mut c = Cluster::new(&refs, "[keepalive]\ninterval_ms = 1000\n");
    libvirtd::open_path_for_nobody(c.dir.path());
    let daemons: Vec<Arc<Libvirtd>> =
        NAMES.iter().map(|n| Arc::new(Libvirtd::start(&c.node(n).dir.join("lvd")))).collect();
    for (i, name) in NAMES.iter().enumerate() {
        let uri = daemons[i].uri();
        c.node(name).extra_config.push_str(&format!(
            "[hypervisor]\nuri = \"{uri}\"\nshutdown_timeout_ms = 2000\nreconcile_interval_ms = 500\n"
        ));
        c.node(name).start();
    }
    // Sample every node's libvirt all along: a VM must never run on two nodes.
    let sampler = DoubleSampler::start(daemons.clone());

    let token = c.node("l1").admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for name in ["l2", "l3"] {
        c.node(name).admin(json!({"op": "join-cluster", "peer": "127.0.8.1:7400", "token": token}));
    }
    wait_until("three nodes in run", Duration::from_secs(30), || {
        let s = c.node("l2").try_admin(&json!({"op": "status"})).ok()?;
        let m = s["members"].as_array()?;
        (m.len() == 3 && m.iter().all(|x| x["daemon_state"] == "run")).then_some(())
    });
    let dir = c.node("l1").dir.clone();
    for n in 1..=6u32 {
        let path = dir.join(format!("vm{n}.xml"));
        std::fs::write(
            &path,
            format!("<domain type='test'><name>vm{n}</name><uuid>00000000-0000-4000-8000-0000000001{n:02}</uuid><memory unit='MiB'>256</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"),
        )
        .expect("xml");
        let out = c.node("l2").cli(&["vm", "define", path.to_str().expect("utf-8"), "--selector", "vms"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Each VM runs on the node the cluster says, by that node's own libvirt, and nowhere else.
    let check_placement = |c: &mut Cluster| {
        wait_until("every VM running where the cluster says, per each node's libvirt", Duration::from_secs(30), || {
            let list = vms(c.node("l3"));
            let seen = observed(&daemons);
            let ok = list.len() == 6
                && list.iter().all(|v| {
                    let name = v["name"].as_str().unwrap_or("");
                    let node = NAMES.iter().position(|n| v["node"] == *n);
                    v["state"] == "start" && node.is_some_and(|i| seen.get(name) == Some(&vec![i]))
                });
            ok.then_some(())
        })
    };
    check_placement(&mut c);
    // The driver's own `test` domain: reported as unmanaged, still running, on every node.
    for (i, name) in NAMES.iter().enumerate() {
        let s = c.node(name).status();
        assert!(s["unmanaged_domains"].as_array().is_some_and(|u| u.contains(&json!("test"))), "{name}: {s}");
        assert!(daemons[i].running().iter().any(|(n, _)| n == "test"), "{name}: test domain touched");
        // ... and in `node info` on any node, through the keepalive.
        wait_until("unmanaged domains in node info", Duration::from_secs(10), || {
            let info = c.node("l1").try_admin(&json!({"op": "node-info", "name": name})).ok()?;
            info["stats"]["unmanaged_domains"].as_array()?.contains(&json!("test")).then_some(())
        });
    }

    // Stop, start and restart one VM, seen in its node's own libvirt.
    let where_is = |c: &mut Cluster, vm: &str| -> usize {
        let list = vms(c.node("l1"));
        let node = list.iter().find(|v| v["name"] == vm).and_then(|v| v["node"].as_str().map(str::to_string));
        NAMES.iter().position(|n| Some(*n) == node.as_deref()).expect("vm assigned to a node")
    };
    let home = where_is(&mut c, "vm3");
    let id_of = |vm: &str| daemons[home].running().into_iter().find(|(n, _)| n == vm).map(|(_, id)| id);
    let first_id = id_of("vm3").expect("vm3 runs on its node");
    assert!(c.node("l2").cli(&["vm", "stop", "vm3"]).status.success());
    wait_until("vm3 stopped in libvirt", Duration::from_secs(20), || id_of("vm3").is_none().then_some(()));
    assert!(c.node("l2").cli(&["vm", "start", "vm3"]).status.success());
    let second_id = wait_until("vm3 started again", Duration::from_secs(20), || id_of("vm3"));
    assert_ne!(second_id, first_id, "a start after a stop is a new run");
    assert!(c.node("l3").cli(&["vm", "restart", "vm3"]).status.success());
    wait_until("vm3 restarted (a new libvirt id, state back to start)", Duration::from_secs(20), || {
        let back = vms(c.node("l1")).iter().any(|v| v["name"] == "vm3" && v["state"] == "start");
        id_of("vm3").filter(|id| *id != second_id && back).map(|_| ())
    });

    // An invalid XML: one clear error line, nothing changed anywhere.
    let summary = |c: &mut Cluster| -> Vec<(Value, Value, Value)> {
        vms(c.node("l1")).iter().map(|v| (v["name"].clone(), v["state"].clone(), v["node"].clone())).collect()
    };
    let before_list = summary(&mut c);
    let before_domains: Vec<Vec<(String, u32)>> = daemons.iter().map(|d| d.running()).collect();
    let bad = dir.join("bad.xml");
    std::fs::write(&bad, "<domain type='test'><name>vm9</name>").expect("xml");
    let out = c.node("l1").cli(&["vm", "define", bad.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("invalid domain XML") && err.trim().lines().count() == 1, "{err}");
    // A modify to another uuid is refused too.
    let other = dir.join("other.xml");
    std::fs::write(&other, "<domain type='test'><name>vm1</name><uuid>00000000-0000-4000-8000-0000000009ff</uuid><memory unit='MiB'>512</memory><vcpu>2</vcpu><os><type arch='x86_64'>hvm</type></os></domain>").expect("xml");
    let out = c.node("l1").cli(&["vm", "modify", "vm1", other.to_str().expect("utf-8")]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("keeps its uuid"), "{out:?}");
    assert_eq!(summary(&mut c), before_list, "refusals change nothing");
    assert_eq!(daemons.iter().map(|d| d.running()).collect::<Vec<_>>(), before_domains);
    // A valid modify: the new resources are on record at once.
    let grown = dir.join("vm1-grown.xml");
    std::fs::write(&grown, "<domain type='test'><name>vm1</name><uuid>00000000-0000-4000-8000-000000000101</uuid><memory unit='MiB'>512</memory><vcpu>2</vcpu><os><type arch='x86_64'>hvm</type></os></domain>").expect("xml");
    let out = c.node("l1").cli(&["vm", "modify", "vm1", grown.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out:?}");
    let info = c.node("l3").admin(json!({"op": "vm-info", "name": "vm1"}));
    assert_eq!((info["memory_mib"].as_u64(), info["vcpus"].as_u64()), (Some(512), Some(2)), "{info}");

    // A migration and a flush/ready, watched by the sampler.
    let v1_node = vms(c.node("l1"))
        .iter()
        .find(|v| v["name"] == "vm1")
        .and_then(|v| v["node"].as_str().map(str::to_string))
        .expect("vm1");
    let to = NAMES.iter().find(|n| **n != v1_node).expect("target");
    let out = c.node("l1").cli(&["vm", "migrate", "vm1", "--to", to]);
    assert!(out.status.success(), "{out:?}");
    wait_until("vm1 running on its new node per libvirt", Duration::from_secs(20), || {
        let i = NAMES.iter().position(|n| n == to)?;
        (observed(&daemons).get("vm1") == Some(&vec![i])).then_some(())
    });
    // Live only, against a libvirtd whose test driver cannot migrate: the move is aborted and
    // vm2 keeps running on its node with the same libvirt id, in `fail` with the reason.
    let v2_home = where_is(&mut c, "vm2");
    let v2_id = daemons[v2_home].running().into_iter().find(|(n, _)| n == "vm2").map(|(_, id)| id);
    let other = NAMES[(v2_home + 1) % 3];
    let out = c.node("l1").cli(&["vm", "migrate", "vm2", "--to", other, "--force-live"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("vm2 failed its live migration, still home", Duration::from_secs(20), || {
        let l = vms(c.node("l1"));
        l.iter()
            .find(|v| v["name"] == "vm2" && v["state"] == "fail" && v["node"] == NAMES[v2_home])
            .and_then(|v| v["failure_reason"].as_str().filter(|r| r.contains("live migration")).map(|_| ()))
    });
    let now_id = daemons[v2_home].running().into_iter().find(|(n, _)| n == "vm2").map(|(_, id)| id);
    assert!(v2_id.is_some() && now_id == v2_id, "vm2 untouched: {v2_id:?} -> {now_id:?}");
    assert!(c.node("l1").cli(&["vm", "start", "vm2"]).status.success());
    wait_until("vm2 back in start", Duration::from_secs(20), || {
        vms(c.node("l1"))
            .iter()
            .any(|v| v["name"] == "vm2" && v["state"] == "start" && v["actual"] == "running")
            .then_some(())
    });
    // The VMs whose home is l2 (not those only visiting it after a migration).
    let homed_on_l2: Vec<String> = vms(c.node("l1"))
        .iter()
        .filter(|v| v["node"] == "l2" && v["last_node"].is_null())
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    assert!(!homed_on_l2.is_empty(), "l2 is home to VMs before its flush");
    let every_vm_placed_apart = |c: &mut Cluster| {
        for v in vms(c.node("l3")) {
            assert!(v["node"] != v["last_node"], "a VM's node is never its last_node: {v}");
        }
    };
    let out = c.node("l1").cli(&["node", "flush", "l2", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let on_l2: Vec<String> = daemons[1].running().into_iter().map(|(n, _)| n).filter(|n| n != "test").collect();
    assert!(on_l2.is_empty(), "flushed l2 still runs {on_l2:?}");
    // Its VMs run elsewhere, where the cluster says, remembering l2 as their home.
    check_placement(&mut c);
    every_vm_placed_apart(&mut c);
    for v in vms(c.node("l3")).iter().filter(|v| homed_on_l2.iter().any(|n| v["name"] == n.as_str())) {
        assert!(v["node"] != "l2" && v["last_node"] == "l2", "{v}");
    }
    let out = c.node("l1").cli(&["node", "ready", "l2", "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Back on their last_node, l2, by l2's own libvirt.
    check_placement(&mut c);
    every_vm_placed_apart(&mut c);
    for name in &homed_on_l2 {
        assert_eq!(observed(&daemons).get(name), Some(&vec![1]), "{name} back on l2");
    }

    // Restarting one node's herd leaves its domains running, with the same libvirt ids.
    let before: Vec<(String, u32)> = daemons[2].running();
    assert!(before.iter().any(|(n, _)| n.starts_with("vm")), "l3 runs VMs: {before:?}");
    let exit = c.node("l3").terminate(Duration::from_secs(15)).expect("exits");
    assert!(exit.success());
    assert_eq!(daemons[2].running(), before, "stopping herd must not touch its VMs");
    c.node("l3").start();
    wait_until("l3 back in run", Duration::from_secs(30), || {
        let s = c.node("l1").try_admin(&json!({"op": "node-info", "name": "l3"})).ok()?;
        (s["daemon_state"] == "run").then_some(())
    });
    check_placement(&mut c);
    assert_eq!(daemons[2].running(), before, "the restarted daemon adopted its domains (same ids)");

    // One authority per VM: vm4 started by hand on a second node while it runs on its own.
    // Nobody destroys either copy; within 5 s the VM is `fail` naming both nodes.
    let v4_home = where_is(&mut c, "vm4");
    let other = (v4_home + 1) % 3;
    let xml = std::fs::read_to_string(dir.join("vm4.xml")).expect("xml");
    daemons[other].start_by_hand(&xml);
    let split = wait_until("vm4 failed, both nodes named", Duration::from_secs(5), || {
        let l = vms(c.node("l1"));
        l.iter().find(|v| v["name"] == "vm4" && v["state"] == "fail").cloned()
    });
    let reason = split["failure_reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains(NAMES[v4_home]) && reason.contains(NAMES[other]), "{split}");
    // Both copies keep running over several reconcile rounds (interval 500 ms): checked at
    // every sample, not once after a sleep.
    let watch_until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < watch_until {
        let both = observed(&daemons).get("vm4").cloned().unwrap_or_default();
        assert_eq!(both.len(), 2, "both copies still run: {both:?}");
    }
    // The operator removes the copy on the home node: the one left is adopted where it runs.
    daemons[v4_home].destroy_by_hand("vm4");
    wait_until("vm4 adopted where it runs", Duration::from_secs(10), || {
        let l = vms(c.node("l1"));
        l.iter().find(|v| v["name"] == "vm4" && v["node"] == NAMES[other] && v["actual"] == "running").map(|_| ())
    });
    assert!(c.node("l1").cli(&["vm", "start", "vm4"]).status.success());

    let (samples, doubles) = sampler.finish();
    // The one double the test made by hand is the only one allowed.
    let doubles: Vec<String> = doubles.into_iter().filter(|d| !d.contains("vm4")).collect();
    assert!(doubles.is_empty(), "VMs seen running on two nodes: {doubles:?}");
    assert!(samples > 20, "the sampler ran");
    drop(c);
    drop(daemons);
}
