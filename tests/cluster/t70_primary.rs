//! Never two primaries: 3 coordinators in network namespaces on one bridge, a floating address.
//! An observer records which namespaces hold the address from timestamped netlink events
//! (`ip -ts -n NS monitor address`, started before anything else) while the test kills the
//! primary (-9, then the unit's stop-post step), partitions it, moves the role gracefully, and
//! SIGSTOPs it for 3 s.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::harness::{wait_until, Cluster, Node, HERD};
use crate::netns::{self, Topology};

const FLOATING: &str = "10.210.0.100";
const NAMES: [&str; 3] = ["c1", "c2", "c3"];

/// One netlink address event for the floating address.
#[derive(Clone, Debug)]
struct AddrEvent {
    /// Seconds since midnight, from `ip -ts` (all namespaces share the clock).
    at: f64,
    node: usize,
    added: bool,
}

/// `[2026-11-23T15:32:23.774901]` → seconds since midnight.
fn parse_stamp(s: &str) -> Option<f64> {
    let t = s.split('T').nth(1)?.trim_end_matches(']');
    let mut parts = t.split(':');
    let (h, m, sec) =
        (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    Some(h * 3600.0 + m * 60.0 + sec)
}

/// The same clock, now (through `date`, as `ip -ts` formats it).
fn now_stamp() -> f64 {
    let out = Command::new("date").arg("+[%Y-%m-%dT%H:%M:%S.%6N]").output().expect("date");
    parse_stamp(String::from_utf8_lossy(&out.stdout).trim()).expect("date stamp")
}

/// Address monitors, one per namespace; killed on drop.
struct Monitor {
    children: Vec<Child>,
    events: Arc<Mutex<Vec<AddrEvent>>>,
}

impl Monitor {
    fn start(topo: &Topology, nodes: usize) -> Monitor {
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut children = Vec::new();
        for i in 1..=nodes {
            let mut child = Command::new("ip")
                .args(["-ts", "-n", &topo.ns(i), "monitor", "address"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("ip monitor");
            let out = child.stdout.take().expect("monitor stdout");
            let events = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if !line.contains(&format!("inet {FLOATING}/")) {
                        continue;
                    }
                    let Some(at) = line.split_whitespace().next().and_then(parse_stamp) else { continue };
                    let added = !line.contains("Deleted");
                    events.lock().unwrap_or_else(|p| p.into_inner()).push(AddrEvent { at, node: i, added });
                }
            });
            children.push(child);
        }
        Monitor { children, events }
    }

    fn events(&self) -> Vec<AddrEvent> {
        let mut e = self.events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        e.sort_by(|a, b| a.at.total_cmp(&b.at));
        e
    }

    /// Holders after every event from `since` on: (time, holders).
    fn timeline(&self) -> Vec<(f64, Vec<usize>)> {
        let mut held = [false; 8];
        let mut out = Vec::new();
        for e in self.events() {
            held[e.node] = e.added;
            out.push((e.at, (1..8).filter(|i| held[*i]).collect()));
        }
        out
    }

    fn holders_now(&self) -> Vec<usize> {
        self.timeline().last().map(|(_, h)| h.clone()).unwrap_or_default()
    }

    /// The first time after `since` that a single node other than `old` holds the address.
    fn new_holder_after(&self, since: f64, old: usize) -> Option<(usize, f64)> {
        self.timeline().into_iter().find(|(t, h)| *t >= since && h.len() == 1 && h[0] != old).map(|(t, h)| (h[0], t))
    }

    /// The first time after `since` that a node other than `old` holds the address (with `old`
    /// possibly still holding it too).
    fn other_holder_after(&self, since: f64, old: usize) -> Option<(usize, f64)> {
        self.timeline()
            .into_iter()
            .find_map(|(t, h)| (t >= since).then(|| h.iter().copied().find(|n| *n != old).map(|n| (n, t))).flatten())
    }

    /// Samples (from `since` on) that show two holders.
    fn overlaps(&self, since: f64) -> Vec<(f64, Vec<usize>)> {
        self.timeline().into_iter().filter(|(t, h)| *t >= since && h.len() > 1).collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn primary_of(node: &Node) -> Option<String> {
    let s = node.try_admin(&json!({"op": "status"})).ok()?;
    s["primary"].as_str().map(str::to_string)
}

fn index_of(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).map(|p| p + 1).expect("node name")
}

/// Waits until exactly one node holds the address and the cluster names it primary.
fn settled(c: &mut Cluster, mon: &Monitor, ask: &str) -> (String, usize) {
    wait_until("exactly one holder, recorded as primary", Duration::from_secs(20), || {
        let p = primary_of(c.node(ask))?;
        let h = mon.holders_now();
        (h == vec![index_of(&p)]).then_some((p.clone(), index_of(&p)))
    })
}

#[test]
fn never_two_primaries_in_namespaces() {
    if !netns::available("never_two_primaries_in_namespaces") {
        return;
    }
    let topo = Topology::new("pr", NAMES.len(), &["mgmt"]);
    let mon = Monitor::start(&topo, NAMES.len());
    let specs: Vec<(String, String)> =
        NAMES.iter().enumerate().map(|(k, n)| (n.to_string(), format!("{}:7400", topo.addr(k + 1, 0)))).collect();
    let refs: Vec<(&str, &str, &str)> = specs.iter().map(|(n, a)| (n.as_str(), "coordinator", a.as_str())).collect();
    let mut c = Cluster::new(&refs, "");
    let test_start = now_stamp();
    for (k, name) in NAMES.iter().enumerate() {
        let i = k + 1;
        let node = c.node(name);
        // A primary-only service and a notify hook, each logging what it is asked to do.
        let hooks = node.dir.join("hooks");
        std::fs::create_dir_all(&hooks).expect("hooks dir");
        for (hook, log) in [("10-svc", "svc.log"), ("20-tell.notify", "notify.log")] {
            let path = hooks.join(hook);
            std::fs::write(&path, format!("#!/bin/sh\necho \"$*\" >> {}\n", node.dir.join(log).display()))
                .expect("hook");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        }
        node.netns = Some(topo.ns(i));
        node.extra_config = format!(
            "[primary]\nfloating_ips = [\"{FLOATING}/24 dev {}\"]\nnotify_timeout_ms = 500\nhooks_dir = \"{}\"\nstatus_interval_ms = 500\n[heartbeat.networks]\nmgmt = \"{}:7401\"\n",
            topo.ifname(i, 0),
            hooks.display(),
            topo.addr(i, 0)
        );
        node.start();
    }
    let token = c.node("c1").admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for name in &NAMES[1..] {
        c.node(name).admin(json!({"op": "join-cluster", "peer": format!("{}:7400", topo.addr(1, 0)), "token": token}));
    }
    let (mut primary, mut holder) = settled(&mut c, &mon, "c2");
    let other = |p: &str| NAMES.iter().copied().find(|n| *n != p).expect("another node");

    // (a) kill -9 the primary daemon; the harness runs the unit's stop-post step.
    let fault = now_stamp();
    c.node(&primary).kill9();
    let ns = topo.ns(holder);
    let release = Command::new("ip")
        .args(["netns", "exec", &ns, HERD, "release", "--config"])
        .arg(c.node(&primary).config_path())
        .output()
        .expect("herd release");
    assert!(release.status.success(), "{}", String::from_utf8_lossy(&release.stderr));
    let (new, at) =
        wait_until("a new holder after kill -9", Duration::from_secs(15), || mon.new_holder_after(fault, holder));
    eprintln!("(a) kill -9 {primary}: node {new} holds the address after {:.0} ms", (at - fault) * 1000.0);
    assert!(mon.overlaps(fault).is_empty(), "(a) two holders: {:?}", mon.overlaps(fault));
    c.node(&primary).start();
    (primary, holder) = settled(&mut c, &mon, other(&primary));

    // (b) partition the primary from the other two.
    let fault = now_stamp();
    let others: Vec<usize> = (1..=3).filter(|i| *i != holder).collect();
    for o in &others {
        topo.cut_between(holder, *o, true);
    }
    let (new, at) =
        wait_until("a new holder after the partition", Duration::from_secs(15), || mon.new_holder_after(fault, holder));
    eprintln!("(b) partition {primary}: node {new} holds the address after {:.0} ms", (at - fault) * 1000.0);
    assert!(mon.overlaps(fault).is_empty(), "(b) two holders: {:?}", mon.overlaps(fault));
    for o in &others {
        topo.cut_between(holder, *o, false);
    }
    (primary, holder) = settled(&mut c, &mon, NAMES[new - 1]);

    // (c) graceful hand-over through the CLI, with --wait.
    let to = other(&primary).to_string();
    let fault = now_stamp();
    let out = c.node(&to).cli(&["node", "primary", &to, "--wait", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let moved: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(moved["primary"], to.as_str());
    let (new, at) =
        wait_until("the address on the new primary", Duration::from_secs(15), || mon.new_holder_after(fault, holder));
    assert_eq!(new, index_of(&to));
    eprintln!(
        "(c) hand-over {primary} -> {to}: took {} ms by --wait, address after {:.0} ms",
        moved["took_ms"],
        (at - fault) * 1000.0
    );
    assert!(mon.overlaps(fault).is_empty(), "(c) two holders: {:?}", mon.overlaps(fault));
    (primary, holder) = settled(&mut c, &mon, &to);

    // (d) SIGSTOP the primary for 3 s: two holders only while it is stopped; on resume it drops
    // the address before anything else it does.
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(c.node(&primary).child.as_ref().expect("running").id()).expect("pid"));
    let stopped = now_stamp();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let (new, at) = wait_until("a new holder while the primary is stopped", Duration::from_secs(15), || {
        mon.other_holder_after(stopped, holder)
    });
    eprintln!("(d) SIGSTOP {primary}: node {new} holds the address after {:.0} ms", (at - stopped) * 1000.0);
    // The fault lasts 3 s (a stimulus, not a synchronisation).
    std::thread::sleep(
        Duration::from_secs(3).saturating_sub(Duration::from_secs_f64((now_stamp() - stopped).max(0.0))),
    );
    let resumed = now_stamp();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let dropped = wait_until("the resumed node drops the address", Duration::from_secs(10), || {
        mon.events().into_iter().find(|e| e.node == holder && !e.added && e.at >= resumed).map(|e| e.at)
    });
    eprintln!("(d) resumed {primary} dropped the address {:.0} ms after SIGCONT", (dropped - resumed) * 1000.0);
    for (t, h) in mon.overlaps(stopped) {
        assert!(t >= stopped && t < dropped, "(d) two holders {h:?} at {t} outside the stop ({stopped}..{dropped})");
    }
    let first_after =
        mon.events().into_iter().find(|e| e.node == holder && e.at >= resumed).expect("an event of the resumed node");
    assert!(!first_after.added, "(d) the resumed node's first address action must be the removal");
    let (p, _) = settled(&mut c, &mon, NAMES[new - 1]);
    assert_ne!(p, primary, "the stopped node must not take the role back at once");

    // Over the whole run (restarts and heals included): two holders only during the SIGSTOP.
    for (t, h) in mon.overlaps(test_start) {
        assert!(t >= stopped && t < dropped, "two holders {h:?} at {t}, outside the SIGSTOP window");
    }
    // The service hook runs on the primary only: its last start/stop is `start` there and
    // `stop` (or nothing) elsewhere; survivors were told of every change.
    let dirs: std::collections::BTreeMap<&str, std::path::PathBuf> =
        NAMES.iter().map(|n| (*n, c.node(n).dir.clone())).collect();
    wait_until("the service hook ran `start` on the primary", Duration::from_secs(10), || {
        let last = |n: &str| {
            let log = std::fs::read_to_string(dirs[n].join("svc.log")).unwrap_or_default();
            log.lines().rev().find(|l| *l == "start" || *l == "stop").map(str::to_string)
        };
        NAMES
            .iter()
            .all(|n| if *n == p { last(n).as_deref() == Some("start") } else { last(n).as_deref() != Some("start") })
            .then_some(())
    });
    let told: usize = NAMES
        .iter()
        .map(|n| {
            std::fs::read_to_string(c.node(n).dir.join("notify.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("primary-change"))
                .count()
        })
        .sum();
    assert!(told >= 4, "survivors were notified {told} times");
}
