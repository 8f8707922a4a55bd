//! The cluster core end to end: 3 coordinators + 1 hypervisor as separate processes.
//! Writes and reads go through the hypervisor's admin socket (so forwarding is exercised)
//! except where a test needs another node's view.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster, Node};

const SPECS: &[(&str, &str, &str)] = &[
    ("hv1", "coordinator", "127.0.1.1:7400"),
    ("hv2", "coordinator", "127.0.1.2:7400"),
    ("hv3", "coordinator", "127.0.1.3:7400"),
    ("hv4", "hypervisor", "127.0.1.4:7400"),
    ("hv5", "coordinator", "127.0.1.5:7400"),
];

/// A long keepalive interval keeps the cluster quiescent between steps, so the durability
/// check can compare exact applied indexes.
const EXTRA: &str = "[keepalive]\ninterval_ms = 600000\n";

fn members(status: &Value) -> Vec<Value> {
    status["members"].as_array().cloned().unwrap_or_default()
}

fn ids(v: &Value) -> BTreeSet<u64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// The cluster seen from `node` is formed: 4 members in `run`, 3 voters, 1 learner, a leader.
fn formed(node: &Node) -> Option<Value> {
    let s = node.try_admin(&json!({"op": "status"})).ok()?;
    let ms = members(&s);
    let all_run = ms.len() == 4 && ms.iter().all(|m| m["daemon_state"] == "run");
    let shape = ids(&s["raft"]["voters"]).len() == 3 && ids(&s["raft"]["learners"]).len() == 1;
    (all_run && shape && s["leader"].is_string() && s["quorum"] == true).then_some(s)
}

/// `GET /metrics` over a plain TCP connection.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("metrics {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: herd\r\nConnection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of an unlabelled series in a scrape.
fn value(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

fn leader_name(node: &Node) -> Option<String> {
    let s = node.try_admin(&json!({"op": "status"})).ok()?;
    (s["quorum"] == true).then(|| s["leader"].as_str().map(str::to_string)).flatten()
}

#[test]
fn cluster_lifecycle() {
    let mut c = Cluster::new(SPECS, EXTRA);
    for (name, _, addr) in SPECS {
        let ip = addr.split(':').next().expect("ip");
        c.node(name).extra_config.push_str(&format!("[metrics]\nlisten = \"{ip}:9464\"\n"));
    }
    // hv4 as a hypervisor of a cluster made before clients were the default: a Raft learner
    // (clients have t58, t59 and t59_convert; every fencing and VM test runs them).
    let hv4 = c.node("hv4");
    hv4.extra_config = format!("membership = \"learner\"\n{}", hv4.extra_config);
    for name in ["hv1", "hv2", "hv3", "hv4"] {
        c.node(name).start();
    }

    // --- Formation: init on hv1, hv4 joins through hv1, hv2 and hv3 join *through hv4*. ---
    let init = c.node("hv1").admin(json!({"op": "init-cluster"}));
    let token = init["token"].as_str().expect("token").to_string();
    let cluster_id = init["cluster_id"].clone();
    let joined = c.node("hv4").admin(json!({"op": "join-cluster", "peer": "127.0.1.1:7400", "token": token}));
    assert_eq!(joined["voter"], false, "a hypervisor stays a learner");
    // Through the CLI: hv2 with the token from a file, hv3 from standard input (and --json
    // after the subcommand).
    let token_file = c.token_file(&token);
    let out = c.node("hv2").cli(&[
        "join-cluster",
        "--peer",
        "127.0.1.4:7400",
        "--token-file",
        token_file.to_str().expect("utf-8 path"),
        "--role",
        "coordinator",
    ]);
    assert!(out.status.success(), "hv2 join: {}", String::from_utf8_lossy(&out.stderr));
    let out =
        c.node("hv3").cli_with_stdin(&["join-cluster", "--peer", "127.0.1.4:7400", "--json"], &format!("{token}\n"));
    assert!(out.status.success(), "hv3 join: {}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).expect("--json output");
    assert_eq!(reply["voter"], true, "{reply}");
    let status =
        wait_until("3 voters + 1 learner, all run, one leader", Duration::from_secs(30), || formed(c.node("hv4")));
    // Every node, asked through the CLI, names the same leader in the same term.
    let views: Vec<Value> = ["hv1", "hv2", "hv3", "hv4"]
        .iter()
        .map(|n| {
            let out = c.node(n).cli(&["status", "--json"]);
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{n} status --json: {e}"))
        })
        .collect();
    for v in &views {
        assert_eq!((&v["leader"], &v["term"]), (&status["leader"], &status["term"]), "{v}");
    }
    assert_eq!(views.iter().filter(|v| v["state"] == "leader").count(), 1);
    // Each node's Prometheus endpoint: one leader between them, the same term, a bounded apply
    // lag, heartbeat states for every other host on the coordinators, write latencies recorded.
    let scrapes: Vec<String> =
        SPECS[..4].iter().map(|(_, _, a)| scrape(&format!("{}:9464", a.split(':').next().unwrap_or("")))).collect();
    let leaders: i64 = scrapes.iter().map(|s| value(s, "herd_raft_is_leader").unwrap_or(0.0) as i64).sum();
    assert_eq!(leaders, 1, "{scrapes:?}");
    let terms: BTreeSet<i64> = scrapes.iter().filter_map(|s| value(s, "herd_raft_term")).map(|t| t as i64).collect();
    assert_eq!(terms.len(), 1, "{terms:?}");
    for s in &scrapes {
        assert!(value(s, "herd_raft_apply_lag_entries").is_some_and(|l| l < 100.0), "{s}");
        assert_eq!(value(s, "herd_raft_quorum"), Some(1.0));
    }
    for (i, name) in ["hv1", "hv2", "hv3"].iter().enumerate() {
        for other in ["hv1", "hv2", "hv3", "hv4"].iter().filter(|o| *o != name) {
            let series = format!("herd_heartbeat_link_state{{host=\"{other}\",network=\"mgmt\"}}");
            assert!(scrapes[i].contains(&series), "{name} lacks {series}");
        }
    }
    assert!(scrapes.iter().any(|s| value(s, "herd_raft_proposal_duration_seconds_count").is_some_and(|n| n > 0.0)));
    assert_eq!(status["cluster_id"], cluster_id);
    let by_name = |s: &Value, n: &str| members(s).into_iter().find(|m| m["name"] == n).expect("member");
    assert_eq!(by_name(&status, "hv4")["voter"], false);
    assert_eq!(by_name(&status, "hv4")["router_state"], "client");
    assert_eq!(by_name(&status, "hv2")["router_state"], "secondary");
    // openraft's own membership: 3 voters, reached through a joint configuration; 1 learner.
    let history = status["raft"]["membership_history"].as_array().cloned().unwrap_or_default();
    assert!(
        history.iter().any(|h| h["configs"].as_array().is_some_and(|c| c.len() == 2)),
        "no joint configuration among {history:?}"
    );
    let id_of = |n: &str| by_name(&status, n)["id"].as_u64().expect("id");
    let voter_ids = BTreeSet::from([id_of("hv1"), id_of("hv2"), id_of("hv3")]);
    let learner_ids = BTreeSet::from([id_of("hv4")]);
    let last = history.last().expect("membership history");
    assert_eq!(last["configs"].as_array().map(Vec::len), Some(1));
    assert_eq!(ids(&last["configs"][0]), voter_ids);
    assert_eq!(ids(&last["learners"]), learner_ids);
    // The CLI: a table by default; the same JSON whether --json comes before or after.
    let table = c.node("hv4").cli(&["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("hv3"), "{table:?}");
    for args in [&["--json", "node", "list"][..], &["node", "list", "--json"][..]] {
        let out = c.node("hv4").cli(args);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(list["members"].as_array().map(Vec::len), Some(4), "{args:?}");
        assert!(list["applied_index"].as_u64().is_some_and(|i| i > 0), "{list}");
    }
    let out = c.node("hv4").cli(&["node", "info", "nosuch"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end().lines().count(), 1, "{out:?}");

    // --- A wrong join token is refused and membership is unchanged. ---
    c.node("hv5").start();
    let ca_hash = token.split_once('.').map(|(_, h)| h).expect("the token carries the CA hash");
    let wrong = c
        .node("hv5")
        .try_admin(&json!({"op": "join-cluster", "peer": "127.0.1.4:7400", "token": format!("herd-wrong.{ca_hash}")}));
    assert!(wrong.as_ref().is_err_and(|e| e.contains("token refused")), "{wrong:?}");
    let role = c
        .node("hv5")
        .try_admin(&json!({"op": "join-cluster", "peer": "127.0.1.1:7400", "token": token, "role": "hypervisor"}));
    assert!(role.as_ref().is_err_and(|e| e.contains("disagrees")), "{role:?}");
    let after = c.node("hv4").status();
    assert_eq!(members(&after).len(), 4);
    assert_eq!(ids(&after["raft"]["voters"]), voter_ids);
    assert_eq!(ids(&after["raft"]["learners"]), learner_ids);
    c.node("hv5").kill9();

    // --- Read-your-writes across nodes: acknowledged through one, read on another. ---
    for i in 0..10 {
        let on = i % 2 == 0;
        let (writer, reader) = if i % 3 == 0 { ("hv2", "hv4") } else { ("hv4", ["hv2", "hv3"][i % 2]) };
        c.node(writer).admin(json!({"op": "maintenance", "on": on}));
        let info = c.node(reader).admin(json!({"op": "cluster-info"}));
        assert_eq!(info["maintenance"], on, "write {i} through {writer} not seen by {reader}");
        assert_eq!(info["linearizable"], true);
    }

    // --- Kill the leader; a new one is elected; the first write after goes through hv4. ---
    let old_leader = leader_name(c.node("hv4")).expect("a leader");
    c.node(&old_leader).kill9();
    let new_leader =
        wait_until("a new leader", Duration::from_secs(15), || leader_name(c.node("hv4")).filter(|l| *l != old_leader));
    // The loop above left maintenance off: this write must turn it on to be seen.
    c.node("hv4").admin(json!({"op": "maintenance", "on": true}));
    let info = c.node("hv4").admin(json!({"op": "cluster-info"}));
    assert_eq!(info["maintenance"], true);
    eprintln!("leader {old_leader} killed; new leader {new_leader}");

    // --- The killed node restarts from disk and catches up. ---
    c.node(&old_leader).start();
    let target = c.node("hv4").status()["applied_index"].as_u64().expect("applied");
    wait_until("restarted node catches up", Duration::from_secs(20), || {
        let s = c.node(&old_leader).try_admin(&json!({"op": "status"})).ok()?;
        (s["applied_index"].as_u64()? >= target && s["quorum"] == true).then_some(())
    });
    let seen = c.node(&old_leader).admin(json!({"op": "cluster-info"}));
    assert_eq!(seen["maintenance"], true);

    // --- SIGTERM is a service stop: the node records `stop` with a deadline, and exits 0. ---
    let follower = ["hv1", "hv2", "hv3"].into_iter().find(|n| *n != new_leader).expect("a follower").to_string();
    let exit = c.node(&follower).terminate(Duration::from_secs(10)).expect("exits on SIGTERM");
    assert!(exit.success(), "{follower} exit {exit}");
    let rec = c.node("hv4").admin(json!({"op": "node-info", "name": follower}));
    assert_eq!(rec["daemon_state"], "stop");
    assert!(rec["return_by_ms"].as_u64().is_some(), "{rec}");
    c.node(&follower).start();
    wait_until("restarted node back in run", Duration::from_secs(20), || {
        let r = c.node("hv4").try_admin(&json!({"op": "node-info", "name": follower})).ok()?;
        (r["daemon_state"] == "run").then_some(())
    });

    // --- Removal: a voter is protected; a learner is removed, wiped and rejoins with a new id. ---
    let refused = c.node("hv4").try_admin(&json!({"op": "node-remove", "name": "hv3"}));
    assert!(refused.as_ref().is_err_and(|e| e.contains("--force")), "{refused:?}");
    let old_id = c.node("hv2").admin(json!({"op": "node-info", "name": "hv4"}))["id"].as_u64().expect("id");
    c.node("hv2").admin(json!({"op": "node-remove", "name": "hv4"}));
    wait_until("hv4 learns it was removed", Duration::from_secs(10), || {
        (c.node("hv4").status()["state"] == "removed").then_some(())
    });
    let gone = c.node("hv2").try_admin(&json!({"op": "node-info", "name": "hv4"}));
    assert!(gone.as_ref().is_err_and(|e| e.contains("no node named")), "{gone:?}");
    wait_until("hv2 applied the removal", Duration::from_secs(10), || {
        let s = c.node("hv2").status();
        (members(&s).iter().all(|m| m["name"] != "hv4") && !ids(&s["raft"]["learners"]).contains(&old_id)).then_some(())
    });
    let again = c.node("hv4").try_admin(&json!({"op": "join-cluster", "peer": "127.0.1.2:7400", "token": token}));
    assert!(again.is_err(), "a removed node must not rejoin under its old identity");
    c.node("hv4").kill9();
    std::fs::remove_dir_all(c.node("hv4").data_dir()).expect("wipe hv4");
    c.node("hv4").start();
    let rejoined = c.node("hv4").admin(json!({"op": "join-cluster", "peer": "127.0.1.2:7400", "token": token}));
    let new_id = rejoined["node_id"].as_u64().expect("new id");
    assert!(new_id > old_id, "rejoined under id {new_id}, was {old_id}: ids are never reused");
    wait_until("cluster formed again", Duration::from_secs(30), || formed(c.node("hv4")));

    // --- Durability, not catch-up: stop all four, start each alone, compare with before. ---
    let names = ["hv1", "hv2", "hv3", "hv4"];
    let before: Vec<Value> = wait_until("all nodes applied the same index", Duration::from_secs(20), || {
        let all: Vec<Value> =
            names.iter().map(|n| c.node(n).try_admin(&json!({"op": "status"})).ok()).collect::<Option<_>>()?;
        let first = all[0]["applied_index"].clone();
        all.iter().all(|s| s["applied_index"] == first).then_some(all)
    });
    // Stop all four at once (SIGTERM: each tries to record `stop`, which may or may not commit
    // while the others go down too), and note the applied index each one stopped at.
    for n in names {
        c.node(n).signal_term();
    }
    let mut stopped_at = Vec::new();
    for n in names {
        let exit = c.node(n).wait_exit(Duration::from_secs(15)).expect("exits on SIGTERM");
        assert!(exit.success(), "{n}: {exit}");
        stopped_at.push(c.node(n).stopped_applied_index().expect("the daemon logs where it stopped"));
    }
    for ((n, was), at) in names.iter().zip(&before).zip(&stopped_at) {
        c.node(n).start();
        let now = c.node(n).status();
        // From its own disk only (it is alone): its snapshot plus the committed entries of its
        // log, re-applied at start — at least where it stopped (a commit recorded just before
        // the stop may not have been applied yet, and is now).
        let applied = now["applied_index"].as_u64().unwrap_or(0);
        assert!(applied >= *at, "{n}: applied index from disk {applied}, stopped at {at}");
        assert!(*at >= was["applied_index"].as_u64().unwrap_or(u64::MAX), "{n}: went back in time");
        assert_eq!(now["members"].as_array().map(Vec::len), was["members"].as_array().map(Vec::len), "{n}");
        for (a, b) in members(&now).iter().zip(members(was).iter()) {
            for key in ["name", "id", "role", "address", "domain_state"] {
                assert_eq!(a[key], b[key], "{n}: member field {key}");
            }
            // A stopping daemon may have recorded `stop`, and a stopping primary its relinquish.
            assert!(a["daemon_state"] == b["daemon_state"] || a["daemon_state"] == "stop", "{n}: {a}");
            let stepped_down = b["router_state"] == "primary"
                && (a["router_state"] == "relinquish" || a["router_state"] == "secondary");
            assert!(a["router_state"] == b["router_state"] || stepped_down, "{n}: {a}");
        }
        assert_eq!(ids(&now["raft"]["voters"]), ids(&was["raft"]["voters"]), "{n}: voters");
        assert_eq!(ids(&now["raft"]["learners"]), ids(&was["raft"]["learners"]), "{n}: learners");
        let info = c.node(n).admin(json!({"op": "cluster-info", "local": true}));
        assert_eq!(info["cluster_id"], cluster_id);
        assert_eq!(info["maintenance"], true);
        c.node(n).kill9();
    }
    for n in names {
        c.node(n).start();
    }
    let leader = wait_until("a leader after a full restart", Duration::from_secs(30), || leader_name(c.node("hv4")));
    c.node("hv4").admin(json!({"op": "maintenance", "on": true}));
    assert_eq!(c.node("hv1").admin(json!({"op": "cluster-info"}))["maintenance"], true);
    eprintln!("full restart: leader {leader}");
}
