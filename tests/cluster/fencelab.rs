//! What the namespace fencing tests (`t91`, `t92`) share: forming the cluster, defining test
//! VMs, signalling a node's daemon, reading events and VMs.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::bmc::{self, Bmc};
use crate::harness::{wait_until, Cluster, Node};
use crate::libvirtd::Libvirtd;
use crate::netns::Topology;

/// A cluster of `names` in `topo`'s namespaces (names starting with `c` are coordinators), each
/// listening on its management address; the test directory opened for libvirtd's `nobody`.
pub fn cluster_on(topo: &Topology, names: &[&str]) -> Cluster {
    let specs: Vec<(String, &str, String)> = names
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let role = if n.starts_with('c') { "coordinator" } else { "hypervisor" };
            (n.to_string(), role, format!("{}:7400", topo.addr(k + 1, 0)))
        })
        .collect();
    let refs: Vec<(&str, &str, &str)> = specs.iter().map(|(n, r, a)| (n.as_str(), *r, a.as_str())).collect();
    let c = Cluster::new(&refs, "[keepalive]\ninterval_ms = 1000\n");
    crate::libvirtd::open_path_for_nobody(c.dir.path());
    c
}

/// Which of a topology's networks carry what: the two heartbeat networks (`mgmt`, `storage`)
/// and the BMCs' (the cluster port is always on network 0).
#[derive(Clone, Copy)]
pub struct Layout {
    pub heartbeat: [usize; 2],
    pub bmc: usize,
}

/// Heartbeat on networks 0 and 1 (0 shared with the cluster port), BMCs on 2.
pub const SHARED: Layout = Layout { heartbeat: [0, 1], bmc: 2 };

/// For each of `names`: its BMC on the BMC network (traced for index `traced`) and its own
/// libvirtd, then its daemon started with `node_config(.., fence)`; a power-off kills both.
pub fn start_nodes(
    c: &mut Cluster,
    topo: &Topology,
    names: &[&str],
    traced: Option<usize>,
    fence: &str,
) -> (Vec<Bmc>, Vec<Arc<Libvirtd>>) {
    start_nodes_on(c, topo, SHARED, names, traced, fence, &[])
}

/// [`start_nodes`] with the networks laid out as `layout` says, and `tail` (node, keys)
/// appended to a node's `[fencing]` section.
pub fn start_nodes_on(
    c: &mut Cluster,
    topo: &Topology,
    layout: Layout,
    names: &[&str],
    traced: Option<usize>,
    fence: &str,
    tail: &[(&str, String)],
) -> (Vec<Bmc>, Vec<Arc<Libvirtd>>) {
    let mut bmcs: Vec<Bmc> = Vec::new();
    let mut daemons: Vec<Arc<Libvirtd>> = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let dir = c.node(name).dir.clone();
        let (ip, ns) = (topo.addr(k + 1, layout.bmc), topo.ns(k + 1));
        let start = if traced == Some(k) { Bmc::start_traced } else { Bmc::start };
        bmcs.push(start(&dir.join("bmc"), &ip, 623, Some(&ns)));
        daemons.push(Arc::new(Libvirtd::start(&dir.join("lvd"))));
    }
    for (k, name) in names.iter().enumerate() {
        let (b, uri) = (&bmcs[k], daemons[k].uri());
        let node = c.node(name);
        node.netns = Some(topo.ns(k + 1));
        node.extra_config.push_str(&node_config_on(topo, layout, k, b, &uri, fence));
        for (_, keys) in tail.iter().filter(|(n, _)| n == name) {
            node.extra_config.push_str(keys);
        }
        node.start();
        b.kill_on_power_off("herd", node.child.as_ref().expect("running").id());
        b.kill_on_power_off("libvirtd", daemons[k].pid());
    }
    (bmcs, daemons)
}

/// Node `k`'s (0-based) heartbeat, hypervisor and fencing sections: its libvirtd at `uri`, its
/// BMC `b`, and `fence` (the `[fence]` section's keys).
pub fn node_config(topo: &Topology, k: usize, b: &Bmc, uri: &str, fence: &str) -> String {
    node_config_on(topo, SHARED, k, b, uri, fence)
}

/// [`node_config`] with the heartbeat networks of `layout`.
pub fn node_config_on(topo: &Topology, layout: Layout, k: usize, b: &Bmc, uri: &str, fence: &str) -> String {
    format!(
        "[heartbeat.networks]\nmgmt = \"{}:7401\"\nstorage = \"{}:7401\"\n\
         [hypervisor]\nuri = \"{uri}\"\nshutdown_timeout_ms = 2000\nreconcile_interval_ms = 500\n\
         [fence]\n{fence}\
         [fencing]\nbmc = \"{}\"\nuser = \"{}\"\npassword_file = \"{}\"\n",
        topo.addr(k + 1, layout.heartbeat[0]),
        topo.addr(k + 1, layout.heartbeat[1]),
        b.addr,
        bmc::USER,
        b.password_file().display()
    )
}

/// `init-cluster` on `names[0]`, every other node joins through `peer`; returns once every node
/// runs and the primary has found every BMC ready (asked of `names[1]`).
pub fn form(c: &mut Cluster, names: &[&str], peer: &str) {
    let token = c.node(names[0]).admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for name in &names[1..] {
        c.node(name).admin(json!({"op": "join-cluster", "peer": peer, "token": token}));
    }
    wait_until("all nodes run and can be fenced", Duration::from_secs(60), || {
        let s = c.node(names[1]).try_admin(&json!({"op": "status"})).ok()?;
        let m = s["members"].as_array()?;
        (m.len() == names.len() && m.iter().all(|x| x["daemon_state"] == "run" && x["fencing"]["can_fence"] == true))
            .then_some(())
    });
}

/// Defines `vm1`..`vm{count}` (libvirt test-driver domains, uuids tagged with `tag`, two hex
/// digits) through `via`'s CLI, with `placement` (`--node X` or `--selector vms`).
pub fn define_vms(c: &mut Cluster, via: &str, count: usize, tag: &str, placement: &[&str]) {
    let dir = c.node(via).dir.clone();
    for n in 1..=count {
        let path = dir.join(format!("vm{n}.xml"));
        std::fs::write(
            &path,
            format!("<domain type='test'><name>vm{n}</name><uuid>00000000-0000-4000-8000-0000000{tag}{n:02}</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"),
        )
        .expect("xml");
        let mut args = vec!["vm", "define", path.to_str().expect("utf-8")];
        args.extend_from_slice(placement);
        let out = c.node(via).cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

pub fn signal(node: &Node, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(node.child.as_ref().expect("running").id()).expect("pid"));
    nix::sys::signal::kill(pid, sig).expect("signal");
}

pub fn events(node: &Node) -> Vec<Value> {
    node.try_admin(&json!({"op": "events"})).ok().and_then(|v| v["events"].as_array().cloned()).unwrap_or_default()
}

pub fn vms(node: &Node) -> Vec<Value> {
    node.try_admin(&json!({"op": "vm-list"})).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}
