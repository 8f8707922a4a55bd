//! Hypervisors outside Raft (issue 22, slice 2): 3 coordinators + 2 hypervisors with
//! `[cluster] membership = "client"` in network namespaces, each with its own libvirtd (test
//! driver) and `ipmi_sim`, a sampler checking all along that no VM runs on two nodes. In order:
//! the Raft group is the coordinators only and the hypervisors follow it through sessions;
//! VMs defined on h1 run there; h1's herd killed (-9) and started again resumes as a client
//! and adopts its domains; `node flush h1 --wait` and `node ready h1 --wait` (their progress
//! written through the session); h1 hangs (SIGSTOP) → fenced through its BMC, its VMs running
//! elsewhere.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bmc;
use crate::fencelab::{self, events, signal, vms};
use crate::harness::{wait_until, Cluster};
use crate::libvirtd::{self, DoubleSampler, Libvirtd};
use crate::netns::{self, Topology};

/// The cluster port on its own network: a client's heartbeat can be cut while its session lives.
const NETS: [&str; 4] = ["cluster", "mgmt", "storage", "bmc"];
const LAYOUT: fencelab::Layout = fencelab::Layout { heartbeat: [1, 2], bmc: 3 };
const NAMES: [&str; 5] = ["c1", "c2", "c3", "h1", "h2"];
const VMS: usize = 4;

fn idx(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).expect("known node")
}

/// Where each managed VM runs, by each node's own libvirt.
fn observed(daemons: &[Arc<Libvirtd>]) -> BTreeMap<String, Vec<&'static str>> {
    let mut out: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for (i, d) in daemons.iter().enumerate() {
        for (name, _) in d.running() {
            if name != "test" {
                out.entry(name).or_default().push(NAMES[i]);
            }
        }
    }
    out
}

/// Every VM runs where the cluster says, by that node's own libvirt, on a node `here` accepts.
fn settled(list: &[Value], seen: &BTreeMap<String, Vec<&'static str>>, here: impl Fn(&str) -> bool) -> bool {
    list.len() == VMS
        && list.iter().all(|v| {
            let (name, node) = (v["name"].as_str().unwrap_or(""), v["node"].as_str().unwrap_or(""));
            here(node) && v["actual"] == "running" && seen.get(name).is_some_and(|n| n == &[node])
        })
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Statistics as one aggregate an interval (design doc slice 14): a coordinator that serves a
/// client's session but does not lead relays that client's figures to the leader every
/// interval, and the leader writes its keepalive (on change, or its refresh within 12
/// intervals: 12 s here) — that coordinator writes none (`followers.keepalives_written`). With
/// both sessions at the leader, the primary role and leadership move first. Then the leader's
/// status shows every client's figures fresh.
fn figures_go_with_the_leaders_aggregate(c: &mut Cluster) {
    let coordinators = ["c1", "c2", "c3"];
    // (leader, figures sent, taken, keepalives written) as coordinator `n` tells.
    let followers = |c: &mut Cluster, n: &str| -> Option<(String, u64, u64, u64)> {
        let s = c.node(n).try_admin(&json!({"op": "status"})).ok()?;
        let f = &s["followers"];
        let count = |k: &str| f[k].as_u64();
        Some((
            s["leader"].as_str()?.to_string(),
            count("figures_sent")?,
            count("figures_taken")?,
            count("keepalives_written")?,
        ))
    };
    let serving = |c: &mut Cluster| -> Vec<(&'static str, String)> {
        ["h1", "h2"]
            .into_iter()
            .filter_map(|h| Some((h, c.node(h).status()["session"]["coordinator"].as_str()?.to_string())))
            .collect()
    };
    let mut leader = followers(c, "c1").expect("c1's status").0;
    if serving(c).iter().all(|(_, s)| *s == leader) {
        let other = coordinators.into_iter().find(|n| *n != leader).expect("another coordinator");
        c.node("c1").admin(json!({"op": "node-primary", "name": other, "wait": true}));
        wait_until("leadership moved with the primary role", Duration::from_secs(10), || {
            coordinators.iter().all(|n| followers(c, n).is_some_and(|f| f.0 == other)).then_some(())
        });
        leader = other.to_string();
    }
    let sessions = serving(c);
    let (client, by) = sessions.iter().find(|(_, s)| *s != leader).cloned().expect("a session away from the leader");
    let before_by = followers(c, &by).expect("its coordinator's status");
    let before_leader = followers(c, &leader).expect("the leader's status");
    let start = Instant::now();
    let keepalive_age = |c: &mut Cluster| -> Option<u64> {
        let s = c.node(&leader).try_admin(&json!({"op": "status"})).ok()?;
        s["members"].as_array()?.iter().find(|m| m["name"] == client)?["last_keepalive_age_ms"].as_u64()
    };
    let (sent, taken) =
        wait_until("a client's keepalive written by the leader from relayed figures", Duration::from_secs(20), || {
            let (by_now, leader_now) = (followers(c, &by)?, followers(c, &leader)?);
            let committed_since = keepalive_age(c)? < start.elapsed().as_millis() as u64;
            let (sent, taken) = (by_now.1.saturating_sub(before_by.1), leader_now.2.saturating_sub(before_leader.2));
            (by_now.0 == leader && sent > 0 && taken > 0 && committed_since).then_some((sent, taken))
        });
    let written_by = followers(c, &by).expect("its coordinator's status").3.saturating_sub(before_by.3);
    assert_eq!(written_by, 0, "{by} serves {client} but does not lead: it writes no keepalive of it");
    // The leader holds every client's figures as they ride on its session, at most an
    // interval (the relay) and a poll's wait (1 s) old — though their record's may be a minute old.
    let (t, mut stats_age) = (Instant::now(), 0);
    while t.elapsed() < Duration::from_secs(3) {
        let s = c.node(&leader).status();
        for m in s["members"].as_array().expect("members").iter().filter(|m| m["role"] == "hypervisor") {
            stats_age = stats_age.max(m["stats_age_ms"].as_u64().expect("figures of every client"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stats_age <= 3000, "the leader's figures of a client {stats_age} ms old (interval 1000 ms)");
    eprintln!(
        "t59: sessions {sessions:?}, leader {leader}: {sent} clients' figures relayed to it by {by}, {taken} taken, \
         {client}'s keepalive written by the leader alone; its figures of every client at most {stats_age} ms old"
    );
}

#[test]
fn hypervisors_as_clients() {
    let test = "hypervisors_as_clients";
    if !netns::available(test) || !libvirtd::available(test) || !bmc::available(test) {
        return;
    }
    // Declared first, dropped last: processes die before their namespaces go.
    let topo = Topology::new("cl", NAMES.len(), &NETS);
    let mut c = fencelab::cluster_on(&topo, &NAMES);
    for h in ["h1", "h2"] {
        let node = c.node(h);
        node.extra_config = format!("membership = \"client\"\n{}", node.extra_config);
    }
    let fence =
        "check_interval_ms = 1000\ncall_timeout_ms = 1000\nconfirm_timeout_ms = 3000\nretry_after_ms = 600000\n";
    // h2 self-fences when it cannot get a keepalive committed for 4 s (a file as its watchdog).
    let wd = c.node("h2").dir.join("watchdog");
    std::fs::write(&wd, b"").expect("watchdog file");
    let self_fence = format!(
        "failed_fence = \"recover-after-self-fence\"\nself_fence_after_ms = 4000\nwatchdog = \"{}\"\nwatchdog_timeout_ms = 1000\n",
        wd.display()
    );
    let (bmcs, daemons) = fencelab::start_nodes_on(&mut c, &topo, LAYOUT, &NAMES, None, fence, &[("h2", self_fence)]);
    let sampler = DoubleSampler::start(daemons.clone());
    fencelab::form(&mut c, &NAMES, &format!("{}:7400", topo.addr(1, 0)));

    // The Raft group is the coordinators; the hypervisors follow it from outside.
    let s = c.node("c2").status();
    let ids = |names: &[&str]| -> Vec<u64> {
        let m = s["members"].as_array().expect("members");
        names.iter().filter_map(|n| m.iter().find(|x| x["name"] == *n)?["id"].as_u64()).collect()
    };
    let mut voters: Vec<u64> =
        s["raft"]["voters"].as_array().expect("voters").iter().filter_map(Value::as_u64).collect();
    voters.sort_unstable();
    assert_eq!(voters, ids(&["c1", "c2", "c3"]), "{s}");
    assert_eq!(s["raft"]["learners"], json!([]), "no hypervisor is a Raft learner: {s}");
    for h in ["h1", "h2"] {
        let row = s["members"].as_array().expect("members").iter().find(|x| x["name"] == h).cloned();
        assert_eq!(row.as_ref().map(|r| r["raft_member"].clone()), Some(json!(false)), "{h}: {row:?}");
        let hs = c.node(h).status();
        assert_eq!(hs["state"], "client", "{hs}");
        assert!(hs["session"]["coordinator"].is_string(), "{h} follows a coordinator: {hs}");
        assert!(hs["applied_index"].as_u64().is_some_and(|i| i > 0), "{hs}");
    }
    eprintln!("t59: Raft voters {voters:?}, no learners; h1 and h2 follow through sessions");

    // VMs defined on h1 run there.
    fencelab::define_vms(&mut c, "h2", VMS, "059", &["--node", "h1"]);
    let settle = |c: &mut Cluster, on_h1: bool, what: &str| {
        wait_until(what, Duration::from_secs(30), || {
            let list = vms(c.node("c1"));
            settled(&list, &observed(&daemons), |n| (n == "h1") == on_h1).then_some(list)
        })
    };
    settle(&mut c, true, "every VM running on h1");
    // h2 holds h1's VMs, none of its business, as outlines (name, uuid, where they belong):
    // `vm info` there answers from the leader's state, `--local` says it cannot.
    let name = vms(c.node("c1"))[0]["name"].clone();
    let info = c.node("h2").admin(json!({"op": "vm-info", "name": name}));
    assert!(info["node"] == "h1" && info["xml"].as_str().is_some_and(|x| x.contains("<domain")), "{info}");
    let local = c.node("h2").try_admin(&json!({"op": "vm-info", "name": name, "local": true}));
    assert!(local.as_ref().is_err_and(|e| e.contains("outline")), "h2's own copy: {local:?}");

    // h1's herd killed and started again: it resumes as a client and adopts its domains.
    let ours = |d: &Libvirtd| -> Vec<(String, u32)> { d.running().into_iter().filter(|(n, _)| n != "test").collect() };
    let mut before = ours(&daemons[idx("h1")]);
    c.node("h1").kill9();
    c.node("h1").start();
    bmcs[idx("h1")].kill_on_power_off("herd", c.node("h1").child.as_ref().expect("running").id());
    wait_until("h1 following again", Duration::from_secs(20), || {
        let hs = c.node("h1").try_admin(&json!({"op": "status"})).ok()?;
        (hs["state"] == "client" && hs["quorum"] == true).then_some(())
    });
    let mut after = ours(&daemons[idx("h1")]);
    before.sort();
    after.sort();
    assert_eq!(before, after, "h1's domains kept running with the same libvirt ids");
    eprintln!("t59: h1's herd killed and restarted: a client again, {} domains adopted", after.len());

    // Keepalives: a client writes none; its figures ride on its polls and the coordinator
    // that hears it writes them — only when its figures move or every 12 intervals (liveness
    // is not in the log), for h2 too once its record says it self-fences on its session alone
    // (every member told the leader it knows that). They arrive (h1's VM count, h2's flags);
    // every client is heard within two intervals (1 s here) — sampled for 4 s.
    // The first keepalive of a client comes at its coordinator's next interval: the sampling
    // starts once every client has one (a fast run got here within a second of the joins).
    wait_until("h1's figures through its session, a keepalive for each client", Duration::from_secs(10), || {
        let s = c.node("c1").try_admin(&json!({"op": "status"})).ok()?;
        let rows = s["members"].as_array()?;
        let h1 = rows.iter().find(|m| m["name"] == "h1")?;
        let all = rows
            .iter()
            .filter(|m| m["role"] == "hypervisor")
            .all(|m| m["last_keepalive_age_ms"].is_u64() && m["last_heard_age_ms"].is_u64());
        let h2 = rows.iter().find(|m| m["name"] == "h2")?;
        let alone = h2["stats"]["session_only"] == true && h2["stats"]["session_self_fence"] == true;
        (h1["stats"]["vms_running"] == VMS && all && alone).then_some(())
    });
    let (t, mut heard, mut h2_keepalive, mut h1_keepalive) = (Instant::now(), 0, 0, 0);
    while t.elapsed() < Duration::from_secs(4) {
        let s = c.node("c1").status();
        for m in s["members"].as_array().expect("members").iter().filter(|m| m["role"] == "hypervisor") {
            heard = heard.max(m["last_heard_age_ms"].as_u64().expect("heard"));
            let keepalive = m["last_keepalive_age_ms"].as_u64().expect("a keepalive");
            if m["name"] == "h2" {
                h2_keepalive = h2_keepalive.max(keepalive);
            } else {
                h1_keepalive = h1_keepalive.max(keepalive);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(heard <= 2000, "a client last heard {heard} ms ago (interval 1000 ms)");
    for (name, age) in [("h1", h1_keepalive), ("h2", h2_keepalive)] {
        assert!(age <= 14_000, "{name}'s keepalive {age} ms old: refreshed every 12 intervals at least");
    }
    eprintln!(
        "t59: clients heard within {heard} ms in 4 s (interval 1000 ms); keepalives written for them \
         on change: h2 (self-fences on its session alone) oldest {h2_keepalive} ms, h1 oldest {h1_keepalive} ms"
    );
    figures_go_with_the_leaders_aggregate(&mut c);
    // A VM that stops behind h1's back is started again though h1's last keepalive is older
    // than its quorum contact (3 intervals): h1 writes one itself first, then starts it.
    let h1_row = |c: &mut Cluster| -> Option<Value> {
        let s = c.node("c1").try_admin(&json!({"op": "status"})).ok()?;
        s["members"].as_array()?.iter().find(|m| m["name"] == "h1").cloned()
    };
    let before = wait_until("h1's keepalive older than its contact window", Duration::from_secs(20), || {
        h1_row(&mut c)?["last_keepalive_age_ms"].as_u64().filter(|a| *a > 3000)
    });
    let victim = "vm1";
    let asked = |c: &mut Cluster| {
        let log = std::fs::read_to_string(c.node("h1").log_path()).unwrap_or_default();
        log.matches("writing this node's keepalive to start VMs").count()
    };
    let asked_before = asked(&mut c);
    let t = Instant::now();
    daemons[idx("h1")].destroy_by_hand(victim);
    wait_until("the VM destroyed by hand running on h1 again", Duration::from_secs(10), || {
        observed(&daemons).get(victim).is_some_and(|on| on == &["h1"]).then_some(())
    });
    let restarted = t.elapsed();
    let after = h1_row(&mut c).and_then(|r| r["last_keepalive_age_ms"].as_u64());
    assert!(after.is_some_and(|a| a < before), "h1 wrote a keepalive to start it: {after:?} (was {before} ms)");
    assert!(asked(&mut c) > asked_before, "h1 asked for contact itself");
    eprintln!(
        "t59: {victim} destroyed behind h1's back, its keepalive {before} ms old: running again after {} ms",
        restarted.as_millis()
    );

    // A client's rows come from the leader: its own followed copy leaves other nodes' figures
    // out (deltas: a keepalive reaches only the node it is about).
    let hs = c.node("h2").status();
    assert_eq!(hs["members_from"], "leader", "{hs}");
    let leader = c.node("c1").status()["leader"].clone();
    assert!(leader.is_string() && hs["leader"] == leader, "a client names the leader that answered: {hs}");
    let rows = hs["members"].as_array().expect("members");
    let h1 = rows.iter().find(|m| m["name"] == "h1").cloned().expect("h1's row");
    assert_eq!(h1["stats"]["vms_running"], VMS, "h1's figures as h2 shows them: {h1}");
    assert!(h1["last_keepalive_age_ms"].as_u64().is_some_and(|a| a <= 14_000), "h1's keepalive on h2: {h1}");

    // Flush and ready: progress written through the session.
    let t = Instant::now();
    ok(&c.node("h1").cli(&["node", "flush", "h1", "--wait"]), "node flush h1");
    let flush_ms = t.elapsed().as_millis();
    settle(&mut c, false, "every VM moved away from h1");
    let t = Instant::now();
    ok(&c.node("c3").cli(&["node", "ready", "h1", "--wait"]), "node ready h1");
    let ready_ms = t.elapsed().as_millis();
    settle(&mut c, true, "every VM home on h1");
    eprintln!("t59: node flush h1 --wait {flush_ms} ms, node ready h1 --wait {ready_ms} ms");

    // h2's heartbeat cut on both networks, its session alive, following a coordinator that is
    // not the primary: lost to every coordinator, yet heard — not fenced. 6 s is the loss time
    // plus fence_after_ms with room (a window in which nothing may happen, not a wait).
    let follows = c.node("h2").status()["session"]["coordinator"].as_str().expect("h2 follows").to_string();
    // A coordinator that is neither the one h2 follows nor the primary now: the role moves.
    let now = c.node("c1").status()["primary"].as_str().expect("a primary").to_string();
    let primary = ["c1", "c2", "c3"].into_iter().find(|n| *n != follows && *n != now).expect("a third coordinator");
    c.node("c1").admin(json!({"op": "node-primary", "name": primary, "wait": true}));
    // The new primary tells the clients too (not only Raft members).
    wait_until("h1 and h2 told of the primary's change", Duration::from_secs(10), || {
        ["h1", "h2"]
            .iter()
            .all(|h| {
                let log = std::fs::read_to_string(c.node(h).log_path()).unwrap_or_default();
                log.lines().any(|l| l.contains("notified: primary-change") && l.contains(primary))
            })
            .then_some(())
    });
    for net in LAYOUT.heartbeat {
        topo.link(idx("h2") + 1, net, false);
    }
    wait_until("h2 lost to the heartbeat", Duration::from_secs(10), || {
        let hb = c.node(primary).try_admin(&json!({"op": "status"})).ok()?;
        let row = hb["members"].as_array()?.iter().find(|m| m["name"] == "h2")?.clone();
        row["heartbeat"].as_str().is_some_and(|h| h.starts_with("lost")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(6));
    let ev = events(c.node("c1"));
    let fences: Vec<&Value> = ev
        .iter()
        .filter(|e| e["node"] == "h2" && e["kind"] != "fence-readiness")
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("fence")))
        .collect();
    assert!(fences.is_empty(), "h2's session lives (it follows {follows}, the primary is {primary}): {fences:?}");
    for net in LAYOUT.heartbeat {
        topo.link(idx("h2") + 1, net, true);
    }
    eprintln!("t59: h2's heartbeat cut for 6 s, its session to {follows} alive (primary {primary}): not fenced");

    // The coordinator h2 follows cut off from the other two on the cluster network: it serves
    // sessions only while in contact with the leader, so h2's session moves on and the
    // coordinators it reaches keep committing its keepalives — h2 (self-fence after 4 s)
    // must not self-fence for its coordinator's partition. 8 s is twice that deadline.
    let cut_off = c.node("h2").status()["session"]["coordinator"].as_str().expect("h2 follows").to_string();
    if c.node("c1").status()["primary"] == cut_off.as_str() {
        let other = ["c1", "c2", "c3"].into_iter().find(|n| *n != cut_off).expect("another coordinator");
        c.node("c1").admin(json!({"op": "node-primary", "name": other, "wait": true}));
    }
    let others: Vec<&str> = ["c1", "c2", "c3"].into_iter().filter(|n| *n != cut_off).collect();
    for o in &others {
        topo.cut_between_on(idx(&cut_off) + 1, idx(o) + 1, &[0], true);
    }
    let t0 = Instant::now();
    let moved_to = wait_until("h2's session off its cut-off coordinator", Duration::from_secs(10), || {
        let now = c.node("h2").try_admin(&json!({"op": "status"})).ok()?["session"]["coordinator"].clone();
        now.as_str().filter(|n| *n != cut_off).map(str::to_string)
    });
    let moved = t0.elapsed();
    while t0.elapsed() < Duration::from_secs(8) {
        let log = std::fs::read_to_string(c.node("h2").log_path()).unwrap_or_default();
        assert!(!log.contains("SELF-FENCE"), "h2 self-fenced while {cut_off} was cut off from the leader");
        std::thread::sleep(Duration::from_millis(200));
    }
    let row =
        c.node(others[0]).status()["members"].as_array().expect("members").iter().find(|m| m["name"] == "h2").cloned();
    // Its keepalive is written on change only (it self-fences on its session alone): its
    // liveness is when a coordinator last heard it.
    let age = row.as_ref().and_then(|r| r["last_keepalive_age_ms"].as_u64());
    let heard = row.as_ref().and_then(|r| r["last_heard_age_ms"].as_u64());
    assert!(heard.is_some_and(|a| a <= 2000), "h2 heard while {cut_off} is cut off: {row:?}");
    for o in &others {
        topo.cut_between_on(idx(&cut_off) + 1, idx(o) + 1, &[0], false);
    }
    wait_until("the cut-off coordinator back in contact", Duration::from_secs(20), || {
        let s = c.node(&cut_off).try_admin(&json!({"op": "status"})).ok()?;
        (s["quorum"] == true).then_some(())
    });
    eprintln!(
        "t59: {cut_off} cut off from the other coordinators: h2's session moved to {moved_to} after {} ms, \
         heard {heard:?} ms ago after 8 s (its keepalive {age:?} ms old), no self-fence",
        moved.as_millis()
    );

    // h1 hangs: fenced through its BMC, its VMs run on h2.
    let t0 = Instant::now();
    signal(c.node("h1"), nix::sys::signal::Signal::SIGSTOP);
    settle(&mut c, false, "every VM running elsewhere after h1's fence");
    let took = t0.elapsed();
    assert!(c.node("h1").wait_exit(Duration::from_secs(5)).is_some(), "the power-off killed h1's herd");
    let ev = events(c.node("c1"));
    assert_eq!(ev.iter().filter(|e| e["kind"] == "fenced" && e["node"] == "h1").count(), 1, "{ev:?}");
    let info = c.node("c2").admin(json!({"op": "node-info", "name": "h1"}));
    assert_eq!(info["daemon_state"], "fenced", "{info}");
    eprintln!("t59: h1 hung → fenced, all {VMS} VMs running elsewhere after {} ms", took.as_millis());

    // The membership is fixed at the join: h1's data_dir started as a learner is refused at
    // once, saying how to change it (remove, empty data_dir, join again).
    let client_config = c.node("h1").extra_config.clone();
    c.node("h1").extra_config = client_config.replacen("membership = \"client\"", "membership = \"learner\"", 1);
    c.node("h1").spawn();
    let status = c.node("h1").wait_exit(Duration::from_secs(10));
    let log = std::fs::read_to_string(c.node("h1").log_path()).unwrap_or_default();
    assert!(status.and_then(|s| s.code()).is_some_and(|code| code != 0), "h1 as a learner: {status:?}");
    let line = log.lines().rev().find(|l| l.contains("joined as a client")).unwrap_or_default();
    assert!(line.contains("membership") && line.contains("node remove"), "says what to do: {line}");
    c.node("h1").extra_config = client_config;
    eprintln!("t59: h1's data_dir under membership = learner: refused at start");

    // h2, running every VM, isolated (cluster and heartbeat networks) with its BMC frozen: no
    // coordinator acknowledged its session for 4 s, it destroys its VMs and stops feeding its
    // watchdog; the fence fails, and once no coordinator can have acknowledged its session for
    // 4 s + the watchdog + the margin (each says when it last heard it) the primary records it
    // self-fenced on that evidence, and its VMs run elsewhere.
    for v in vms(c.node("c1")).iter().filter(|v| v["node"] != "h2") {
        c.node("c1").admin(json!({"op": "vm-migrate", "name": v["name"], "to": "h2"}));
    }
    wait_until("every VM on h2", Duration::from_secs(30), || {
        let list = vms(c.node("c1"));
        settled(&list, &observed(&daemons), |n| n == "h2").then_some(())
    });
    let t0 = Instant::now();
    bmcs[idx("h2")].pause();
    for net in [0, LAYOUT.heartbeat[0], LAYOUT.heartbeat[1]] {
        topo.link(idx("h2") + 1, net, false);
    }
    wait_until("h2 destroyed its VMs (self-fence)", Duration::from_secs(20), || {
        daemons[idx("h2")].try_running().ok()?.iter().all(|(n, _)| n == "test").then_some(())
    });
    let self_fenced = t0.elapsed();
    let log = std::fs::read_to_string(c.node("h2").log_path()).unwrap_or_default();
    assert!(log.contains("SELF-FENCE"), "h2 says why in its log");
    wait_until("h2's VMs recovered after its self-fence", Duration::from_secs(40), || {
        let ev = events(c.node("c1"));
        let recorded = ev.iter().any(|e| {
            e["kind"] == "fenced"
                && e["node"] == "h2"
                && e["message"].as_str().is_some_and(|m| m.contains("no coordinator acknowledged its session"))
        });
        let list = vms(c.node("c1"));
        (recorded && settled(&list, &observed(&daemons), |n| n != "h1" && n != "h2")).then_some(())
    });
    eprintln!(
        "t59: h2 isolated with a frozen BMC: self-fenced after {} ms, its VMs running elsewhere after {} ms",
        self_fenced.as_millis(),
        t0.elapsed().as_millis()
    );
    bmcs[idx("h2")].resume();
    let (samples, doubles) = sampler.finish();
    assert!(doubles.is_empty(), "a VM ran on two hosts: {doubles:?}");
    eprintln!("t59: {samples} samples, no VM on two hosts");
    drop(bmcs);
}
