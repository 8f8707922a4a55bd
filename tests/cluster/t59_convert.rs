//! The upgrade issue 22 decided on. A hypervisor that joined as a Raft learner (a cluster made
//! before clients were the default) stays one after an upgrade: with `[cluster] membership`
//! unset it runs as its `data_dir` joined. It becomes a client outside Raft with no in-place
//! conversion — `herd node remove`, an empty `data_dir`, join again (README, "Many
//! hypervisors"). Checked on loopback: before, the hypervisor is a Raft learner, and still one
//! after a restart with the setting unset; after, Raft is the coordinators only, the hypervisor
//! follows as a client under a new id, is `run`, and its keepalives (written by the
//! coordinators) keep coming.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster};

const SPECS: &[(&str, &str, &str)] = &[
    ("u1", "coordinator", "127.0.61.1:7400"),
    ("u2", "coordinator", "127.0.61.2:7400"),
    ("u3", "coordinator", "127.0.61.3:7400"),
    ("uh", "hypervisor", "127.0.61.4:7400"),
];
const PEER: &str = "127.0.61.1:7400";

fn ids(v: &Value) -> BTreeSet<u64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// uh's record as u1 shows it, once u1 sees it in `run`.
fn uh_running(s: &Value) -> Option<Value> {
    let m = s["members"].as_array()?.iter().find(|m| m["name"] == "uh")?.clone();
    (m["daemon_state"] == "run").then_some(m)
}

#[test]
fn a_learner_hypervisor_becomes_a_client_by_rejoining() {
    let mut c = Cluster::new(SPECS, "[keepalive]\ninterval_ms = 1000\n");
    // As a node of an older cluster: a learner (the setting said so, or had no other value).
    let unset = c.node("uh").extra_config.clone();
    c.node("uh").extra_config = format!("membership = \"learner\"\n{unset}");
    for n in ["u1", "u2", "u3", "uh"] {
        c.node(n).start();
    }
    let init = c.node("u1").admin(json!({"op": "init-cluster"}));
    let token = init["token"].as_str().expect("token").to_string();
    for n in ["u2", "u3", "uh"] {
        c.node(n).admin(json!({"op": "join-cluster", "peer": PEER, "token": token}));
    }
    let old_id = wait_until("uh a Raft learner in run", Duration::from_secs(30), || {
        let s = c.node("u1").try_admin(&json!({"op": "status"})).ok()?;
        let id = uh_running(&s)?["id"].as_u64()?;
        ids(&s["raft"]["learners"]).contains(&id).then_some(id)
    });
    // The upgrade: the new version, the setting unset — uh runs as its data_dir joined.
    c.node("uh").kill9();
    c.node("uh").extra_config = unset;
    c.node("uh").start();
    let own = c.node("uh").status();
    assert_eq!(own["state"], "learner", "still a Raft learner after the restart: {own}");
    wait_until("uh, restarted, a Raft learner in run", Duration::from_secs(30), || {
        let s = c.node("u1").try_admin(&json!({"op": "status"})).ok()?;
        (uh_running(&s)?["id"] == old_id && ids(&s["raft"]["learners"]).contains(&old_id)).then_some(())
    });

    // The conversion: removed, wiped, started as a client, joined again.
    c.node("u1").admin(json!({"op": "node-remove", "name": "uh"}));
    wait_until("uh learns it was removed", Duration::from_secs(15), || {
        (c.node("uh").try_admin(&json!({"op": "status"})).ok()?["state"] == "removed").then_some(())
    });
    c.node("uh").kill9();
    std::fs::remove_dir_all(c.node("uh").data_dir()).expect("wipe uh");
    // A fresh data_dir joins as a client (the default).
    c.node("uh").start();
    let joined = c.node("uh").admin(json!({"op": "join-cluster", "peer": PEER, "token": token}));
    let new_id = joined["node_id"].as_u64().expect("a new id");
    assert!(new_id > old_id, "rejoined under id {new_id}, was {old_id}: ids are never reused");

    let s = wait_until("uh a client in run, Raft the coordinators only", Duration::from_secs(30), || {
        let s = c.node("u1").try_admin(&json!({"op": "status"})).ok()?;
        let m = uh_running(&s)?;
        (m["id"] == new_id && ids(&s["raft"]["learners"]).is_empty()).then_some(s)
    });
    assert_eq!(ids(&s["raft"]["voters"]).len(), 3, "the voters are the coordinators: {s}");
    let own = c.node("uh").status();
    assert_eq!(own["state"], "client", "{own}");
    assert!(own["session"]["coordinator"].is_string(), "follows a coordinator: {own}");
    // Its keepalives come from the coordinators now (the new record's first at once), and the
    // coordinators hear its session.
    let (first, heard) = wait_until("a keepalive of uh written for it, uh heard", Duration::from_secs(10), || {
        let s = c.node("u1").try_admin(&json!({"op": "status"})).ok()?;
        let m = uh_running(&s)?;
        Some((m["last_keepalive_age_ms"].as_u64().filter(|a| *a < 2000)?, m["last_heard_age_ms"].as_u64()?))
    });
    assert!(heard < 2000, "uh last heard {heard} ms ago");
    eprintln!("t59_convert: uh learner {old_id} → client {new_id}; keepalive age {first} ms, heard {heard} ms ago");
}
