//! The active-active heartbeat across real network namespaces: 3 coordinators + 2 hypervisors,
//! two heartbeat networks (each a bridge). All faults in one run, so a verdict function that
//! never says `lost` cannot pass.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster, Node};
use crate::netns::{self, Topology};

const NETS: [&str; 2] = ["mgmt", "storage"];
const NAMES: [&str; 5] = ["c1", "c2", "c3", "h1", "h2"];

fn hb(node: &Node) -> Option<Value> {
    node.try_admin(&json!({"op": "heartbeat"})).ok()
}

fn verdict(v: &Value, host: &str) -> Option<String> {
    v["verdicts"][host]["verdict"].as_str().map(str::to_string)
}

/// A host's link state on `net` in this coordinator's own view.
fn own_state(v: &Value, net: &str, host: &str) -> Option<String> {
    let nets = v["own_view"]["nets"].as_array()?;
    let n = nets.iter().find(|n| n["net"] == net)?;
    let h = n["hosts"].as_array()?.iter().find(|h| h["host"] == host)?;
    h["state"].as_str().map(str::to_string)
}

fn peer_view<'a>(v: &'a Value, coordinator: &str) -> Option<&'a Value> {
    v["peer_views"].as_array()?.iter().find(|p| p["coordinator"] == coordinator)
}

#[test]
fn heartbeat_verdicts_criss_cross_and_mnfa_in_namespaces() {
    if !netns::available("heartbeat_verdicts_criss_cross_and_mnfa_in_namespaces") {
        return;
    }
    // Declared first, dropped last: the processes die before their namespaces go.
    let topo = Topology::new("hb", NAMES.len(), &NETS);
    let specs: Vec<(String, &str, String)> = NAMES
        .iter()
        .enumerate()
        .map(|(k, n)| {
            (
                n.to_string(),
                if n.starts_with('c') { "coordinator" } else { "hypervisor" },
                format!("{}:7400", topo.addr(k + 1, 0)),
            )
        })
        .collect();
    let spec_refs: Vec<(&str, &str, &str)> = specs.iter().map(|(n, r, a)| (n.as_str(), *r, a.as_str())).collect();
    let mut c = Cluster::new(&spec_refs, "");
    for (k, name) in NAMES.iter().enumerate() {
        let i = k + 1;
        let node = c.node(name);
        node.netns = Some(topo.ns(i));
        node.extra_config = format!(
            "[heartbeat.networks]\nmgmt = \"{}:7401\"\nstorage = \"{}:7401\"\n",
            topo.addr(i, 0),
            topo.addr(i, 1)
        );
        node.start();
    }
    let token = c.node("c1").admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for name in &NAMES[1..] {
        c.node(name).admin(json!({"op": "join-cluster", "peer": format!("{}:7400", topo.addr(1, 0)), "token": token}));
    }
    // Every coordinator hears every host on both networks; all verdicts alive.
    wait_until("all alive in every coordinator's verdicts", Duration::from_secs(30), || {
        ["c1", "c2", "c3"]
            .iter()
            .all(|c_| {
                hb(c.node(c_)).is_some_and(|v| {
                    NAMES.iter().filter(|h| *h != c_).all(|h| verdict(&v, h).as_deref() == Some("alive"))
                        && NAMES
                            .iter()
                            .filter(|h| *h != c_)
                            .all(|h| NETS.iter().all(|n| own_state(&v, n, h).as_deref() == Some("ok")))
                })
            })
            .then_some(())
    });

    // (1) One network of h1 cut: lost on that network, alive overall.
    topo.link(4, 1, false);
    let v = wait_until("h1 lost on storage in c1's view", Duration::from_secs(10), || {
        hb(c.node("c1")).filter(|v| own_state(v, "storage", "h1").as_deref() == Some("lost"))
    });
    assert_eq!(own_state(&v, "mgmt", "h1").as_deref(), Some("ok"));
    assert_eq!(verdict(&v, "h1").as_deref(), Some("alive"), "{}", v["verdicts"]);

    // (2) Both networks cut: lost, in every coordinator's verdict.
    topo.link(4, 0, false);
    for coord in ["c1", "c2", "c3"] {
        let v = wait_until(&format!("h1 lost in {coord}'s verdict"), Duration::from_secs(10), || {
            hb(c.node(coord)).filter(|v| verdict(v, "h1").as_deref() == Some("lost"))
        });
        assert!(v["verdicts"]["h1"]["lost_for_ms"].as_u64().is_some(), "{}", v["verdicts"]["h1"]);
    }
    topo.link(4, 0, true);
    topo.link(4, 1, true);
    wait_until("h1 alive again", Duration::from_secs(10), || {
        hb(c.node("c1")).filter(|v| {
            verdict(v, "h1").as_deref() == Some("alive") && own_state(v, "storage", "h1").as_deref() == Some("ok")
        })
    });

    // (3) The direct link between c1 and c2 cut: each still holds the other's view, fresh and
    // advancing, through the criss-cross; each still judges the other alive (c3 hears it).
    topo.cut_between(1, 2, true);
    for (a, b) in [("c1", "c2"), ("c2", "c1")] {
        let first = wait_until(&format!("{a} misses {b} directly"), Duration::from_secs(10), || {
            hb(c.node(a)).filter(|v| {
                own_state(v, "mgmt", b).as_deref() == Some("lost")
                    && own_state(v, "storage", b).as_deref() == Some("lost")
            })
        });
        let seq0 = peer_view(&first, b).and_then(|p| p["seq"].as_u64()).expect("peer view held");
        let later =
            wait_until(&format!("{b}'s view reaches {a} through third parties"), Duration::from_secs(10), || {
                hb(c.node(a)).filter(|v| peer_view(v, b).and_then(|p| p["seq"].as_u64()).is_some_and(|s| s > seq0 + 5))
            });
        let p = peer_view(&later, b).expect("peer view");
        assert_eq!(p["stale"], false, "{p}");
        assert!(p["age_ms"].as_u64().is_some_and(|a| a < 2000), "{p}");
        assert_eq!(verdict(&later, b).as_deref(), Some("alive"), "{}", later["verdicts"]);
    }
    topo.cut_between(1, 2, false);

    // (4) One network of three hosts at once: MNFA on that network, no loss verdict even for a
    // host that then loses its other network too; healing leaves MNFA.
    for i in [3, 4, 5] {
        topo.link(i, 1, false);
    }
    let v = wait_until("MNFA on storage", Duration::from_secs(10), || {
        hb(c.node("c1")).filter(|v| v["mnfa"]["storage"] == true)
    });
    assert_eq!(v["mnfa"]["mgmt"], false);
    topo.link(4, 0, false);
    wait_until("h1 lost on both networks in c1's own view", Duration::from_secs(10), || {
        hb(c.node("c1")).filter(|v| own_state(v, "mgmt", "h1").as_deref() == Some("lost"))
    });
    for coord in ["c1", "c2"] {
        let v = hb(c.node(coord)).expect("heartbeat");
        assert_eq!(verdict(&v, "h1").as_deref(), Some("alive"), "{coord}: {}", v["verdicts"]["h1"]);
        let reason = v["verdicts"]["h1"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("MNFA"), "{coord}: {reason}");
        assert!(v["verdicts"].as_object().is_some_and(|m| m.values().all(|x| x["verdict"] == "alive")));
    }
    topo.link(4, 0, true);
    for i in [3, 4, 5] {
        topo.link(i, 1, true);
    }
    wait_until("MNFA left on storage", Duration::from_secs(10), || {
        hb(c.node("c1")).filter(|v| v["mnfa"]["storage"] == false && verdict(v, "h1").as_deref() == Some("alive"))
    });
    // SIGUSR2 writes the same picture to the log.
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(c.node("c2").child.as_ref().expect("running").id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2).expect("SIGUSR2");
    wait_until("the heartbeat picture in c2's log", Duration::from_secs(10), || {
        std::fs::read_to_string(c.node("c2").log_path())
            .ok()
            .filter(|l| l.contains("heartbeat picture (SIGUSR2)") && l.contains("\"verdicts\""))
            .map(|_| ())
    });
    let events = c.node("h2").admin(json!({"op": "events"}));
    let kinds: Vec<&str> =
        events["events"].as_array().into_iter().flatten().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"mnfa-enter") && kinds.contains(&"mnfa-exit"), "{kinds:?}");
}
