//! Real guests (issue 20): 3 coordinators + 2 hypervisors in network namespaces, each node with
//! its own qemu libvirtd (`qemud.rs`) and its own `ipmi_sim`, herd's `[hypervisor] uri` and
//! `migrate_uri` pointing at them as on real hosts. A sampler reads every node's libvirt all
//! along: no guest may run on two hosts. In one run, in order:
//! (a) `vm migrate g1 --to hv2 --force-live`: the same guest runs on hv2 (its qemu there was
//!     started as a migration target, `-incoming`; the source's qemu is gone);
//! (b) g1's qemu killed on hv2: restarted by hv2 within `reconcile_interval_ms` + 2 s;
//! (c) `vm migrate g1 --to hv1` with method `shutdown`: the guest ignores the ACPI request
//!     (its firmware halts the vCPU) and is destroyed after `shutdown_timeout_ms`, then runs on hv1;
//! (d) `node flush hv1 --wait` with 4 guests (`parallel_migrations` = 2) moves them all live,
//!     `node ready hv1 --wait` brings them back (live again), g1 too (its home is hv1);
//! (f) a live move to a destination whose libvirtd is frozen past `migration_timeout_ms`: the
//!     source restarts a killed guest of its own meanwhile; after the thaw the moved guest runs
//!     exactly once and the record says where;
//! (e) hv1 hangs: fenced through its BMC (the power-off kills its herd, libvirtd and qemus),
//!     its guests running elsewhere within 4 s of the hang.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bmc::{self, Bmc};
use crate::fencelab::{self, events, vms};
use crate::harness::{wait_until, Cluster};
use crate::libvirtd::{Domains, DoubleSampler};
use crate::netns::{self, Topology};
use crate::qemud::{self, Qemud};

const NETS: [&str; 3] = ["mgmt", "storage", "bmc"];
const NAMES: [&str; 5] = ["c1", "c2", "c3", "hv1", "hv2"];
const RECONCILE_MS: u64 = 500;
/// How much slower than the promised figure a step may be before the test fails: the figures
/// are printed, and measured on a quiet machine by `herd-bench migration`.
const SLACK: u32 = 2;

fn idx(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).expect("known node")
}

/// Where each guest runs, by each node's own libvirt.
fn observed(hosts: &[Arc<Qemud>]) -> BTreeMap<String, Vec<&'static str>> {
    let mut out: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        for (name, _) in h.running() {
            out.entry(name).or_default().push(NAMES[i]);
        }
    }
    out
}

/// `name` runs on `node` alone, and the cluster's record says so.
fn runs_only_on(c: &mut Cluster, hosts: &[Arc<Qemud>], name: &str, node: &str) -> bool {
    let seen = observed(hosts);
    let record = vms(c.node("c1")).into_iter().find(|v| v["name"] == name);
    seen.get(name).is_some_and(|on| on == &vec![node])
        && record.is_some_and(|v| v["node"] == node && v["actual"] == "running")
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{what}: {said}{}", String::from_utf8_lossy(&out.stderr));
    said
}

/// BMC calls get 3 s (each reply up to 3 s / 7): with guests starting and a libvirtd thawing,
/// the machine stalls for a moment, and at 1 s a BMC that missed 142 ms replies four times in a
/// row used up the fence's session budget (seen once: "power-off not confirmed within 15s").
fn node_config(topo: &Topology, k: usize, b: &Bmc, uri: &str) -> String {
    format!(
        "[heartbeat.networks]\nmgmt = \"{}:7401\"\nstorage = \"{}:7401\"\n\
         [hypervisor]\nuri = \"{uri}\"\nmigrate_uri = \"qemu+tcp://{{node}}/system\"\n\
         shutdown_timeout_ms = 3000\nreconcile_interval_ms = {RECONCILE_MS}\n\
         parallel_migrations = 2\nmigration_timeout_ms = 15000\n\
         [fence]\ncheck_interval_ms = 1000\ncall_timeout_ms = 3000\n\
         [fencing]\nbmc = \"{}\"\nuser = \"{}\"\npassword_file = \"{}\"\n",
        topo.addr(k + 1, 0),
        topo.addr(k + 1, 1),
        b.addr,
        bmc::USER,
        b.password_file().display()
    )
}

fn define(c: &mut Cluster, name: &str, tail: u64, args: &[&str]) {
    let path = c.node("c2").dir.join(format!("{name}.xml"));
    let rom = qemud::firmware(c.dir.path());
    std::fs::write(&path, qemud::guest_xml(name, 0x97_0000 + tail, &rom)).expect("xml");
    let mut all = vec!["vm", "define", path.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    ok(&c.node("c2").cli(&all), &format!("define {name}"));
}

/// The qemu of `name` on `host` was started as a migration target (not booted afresh).
fn incoming(host: &Qemud, name: &str) -> bool {
    host.qemu_pid(name)
        .and_then(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
        .is_some_and(|c| String::from_utf8_lossy(&c).split('\0').any(|a| a == "-incoming"))
}

#[test]
fn real_guests_in_namespaces() {
    let test = "real_guests_in_namespaces";
    if !netns::available(test) || !qemud::available(test) || !bmc::available(test) {
        return;
    }
    // Timed steps (a restart within reconcile_interval_ms + 2 s, moves within
    // migration_timeout_ms) on a 2-core machine: the other cluster tests wait meanwhile.
    let _alone = crate::harness::alone();
    // Declared first, dropped last: processes die before their namespaces go.
    let topo = Topology::new("qm", NAMES.len(), &NETS);
    let mut c = fencelab::cluster_on(&topo, &NAMES);
    let etc_hosts: Vec<(String, String)> =
        NAMES.iter().enumerate().map(|(k, n)| (n.to_string(), topo.addr(k + 1, 0))).collect();
    let mut bmcs: Vec<Bmc> = Vec::new();
    let dirs: Vec<std::path::PathBuf> = NAMES.iter().map(|n| c.node(n).dir.clone()).collect();
    for (k, dir) in dirs.iter().enumerate() {
        bmcs.push(Bmc::start(&dir.join("bmc"), &topo.addr(k + 1, 2), 623, Some(&topo.ns(k + 1))));
    }
    // Side by side: each probes QEMU's capabilities (seconds) unless libvirt's cache serves.
    let hosts: Vec<Arc<Qemud>> = std::thread::scope(|s| {
        let started: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(k, dir)| {
                let (topo, etc_hosts) = (&topo, &etc_hosts);
                s.spawn(move || {
                    Qemud::start(&dir.join("qemud"), &topo.ns(k + 1), &topo.addr(k + 1, 0), k + 1, etc_hosts)
                })
            })
            .collect();
        started.into_iter().map(|h| Arc::new(h.join().expect("a qemu libvirtd started"))).collect()
    });
    for (k, name) in NAMES.iter().enumerate() {
        let config = node_config(&topo, k, &bmcs[k], &hosts[k].uri());
        let node = c.node(name);
        node.netns = Some(topo.ns(k + 1));
        node.extra_config.push_str(&config);
        node.start();
        bmcs[k].kill_on_power_off("herd", node.child.as_ref().expect("running").id());
        bmcs[k].kill_on_power_off("libvirtd", hosts[k].pid());
    }
    let sampler = DoubleSampler::start(hosts.clone());
    fencelab::form(&mut c, &NAMES, &format!("{}:7400", topo.addr(1, 0)));

    // (a) A live move by request: the same guest, now on hv2.
    define(&mut c, "g1", 1, &["--node", "hv1"]);
    wait_until("g1 running on hv1", Duration::from_secs(30), || {
        runs_only_on(&mut c, &hosts, "g1", "hv1").then_some(())
    });
    let src_pid = hosts[idx("hv1")].qemu_pid("g1").expect("g1's qemu on hv1");
    let t0 = Instant::now();
    ok(&c.node("c1").cli(&["vm", "migrate", "g1", "--to", "hv2", "--force-live"]), "migrate --force-live");
    wait_until("g1 running on hv2", Duration::from_secs(30), || {
        runs_only_on(&mut c, &hosts, "g1", "hv2").then_some(())
    });
    let took = t0.elapsed();
    assert!(incoming(&hosts[idx("hv2")], "g1"), "g1's qemu on hv2 was started as a migration target");
    wait_until("g1's qemu on hv1 gone", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{src_pid}")).exists()).then_some(())
    });
    let m = wait_until("g1's move recorded", Duration::from_secs(10), || {
        let info = c.node("c2").try_admin(&serde_json::json!({"op": "vm-info", "name": "g1"})).ok()?;
        let m = info["last_move"].clone();
        (m["ended_ms"].is_u64()).then_some(m)
    });
    assert_eq!(
        (m["from"].as_str(), m["to"].as_str(), m["live"].as_bool()),
        (Some("hv1"), Some("hv2"), Some(true)),
        "{m}"
    );
    let downtime = m["downtime_ms"].as_u64().expect("libvirt's downtime");
    let record_ms = m["ended_ms"].as_u64().unwrap_or(0) - m["began_ms"].as_u64().unwrap_or(0);
    let job_ms = m["job_ms"].as_u64().expect("libvirt's job time");
    assert!(
        events(c.node("c1")).iter().any(|e| e["kind"] == "vm-moved"
            && e["message"].as_str().is_some_and(|t| t.starts_with("g1 moved live hv1 -> hv2"))),
        "a vm-moved event says it went live"
    );
    eprintln!(
        "(a) vm migrate g1 --to hv2 --force-live: the same guest runs on hv2 after {} ms; recorded: live, {record_ms} ms from the command to the report, libvirt's job {job_ms} ms, downtime {downtime} ms",
        took.as_millis()
    );

    // (b) Its qemu killed: hv2 starts it again.
    let pid = hosts[idx("hv2")].qemu_pid("g1").expect("g1's qemu on hv2");
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill qemu");
    let again = wait_until("g1 restarted on hv2", Duration::from_secs(20), || {
        hosts[idx("hv2")].qemu_pid("g1").filter(|p| *p != pid)
    });
    let took = t0.elapsed();
    assert!(!incoming(&hosts[idx("hv2")], "g1"), "restarted afresh (pid {again})");
    // The promise is reconcile_interval_ms + 2 s (met in quiet runs: 1.9–2.1 s); the test
    // allows twice that, so a slow CI machine's qemu start does not fail the landing.
    assert!(took < SLACK * Duration::from_millis(RECONCILE_MS + 2000), "restarted after {took:?}");
    eprintln!("(b) g1's qemu killed on hv2: running again after {} ms", took.as_millis());

    // (c) A shutdown migration of a guest that ignores ACPI: destroyed after the timeout.
    define(&mut c, "g2", 2, &["--node", "hv2", "--method", "shutdown"]);
    wait_until("g2 running on hv2", Duration::from_secs(30), || {
        runs_only_on(&mut c, &hosts, "g2", "hv2").then_some(())
    });
    let t0 = Instant::now();
    ok(&c.node("c1").cli(&["vm", "migrate", "g2", "--to", "hv1"]), "migrate g2 (shutdown)");
    wait_until("g2 running on hv1", Duration::from_secs(30), || {
        runs_only_on(&mut c, &hosts, "g2", "hv1").then_some(())
    });
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(3000), "destroyed only after shutdown_timeout_ms: {took:?}");
    assert!(!incoming(&hosts[idx("hv1")], "g2"), "a shutdown migration boots it afresh");
    let m = wait_until("g2's move recorded", Duration::from_secs(10), || {
        let info = c.node("c2").try_admin(&serde_json::json!({"op": "vm-info", "name": "g2"})).ok()?;
        let m = info["last_move"].clone();
        (m["ended_ms"].is_u64()).then_some(m)
    });
    assert_eq!(m["live"].as_bool(), Some(false), "recorded as a move by shutdown: {m}");
    eprintln!(
        "(c) shutdown migration of a guest ignoring ACPI: destroyed after the timeout, on hv1 after {} ms",
        took.as_millis()
    );
    ok(&c.node("c1").cli(&["vm", "stop", "g2"]), "stop g2");
    wait_until("g2 stopped", Duration::from_secs(20), || (!observed(&hosts).contains_key("g2")).then_some(()));
    ok(&c.node("c1").cli(&["vm", "undefine", "g2"]), "undefine g2");

    // (d) A flush of 4 guests, two at a time, live; then back home, live again.
    let four = ["g3", "g4", "g5", "g6"];
    for (k, g) in four.iter().enumerate() {
        define(&mut c, g, 3 + k as u64, &["--node", "hv1"]);
    }
    wait_until("4 guests running on hv1", Duration::from_secs(60), || {
        four.iter().all(|g| runs_only_on(&mut c, &hosts, g, "hv1")).then_some(())
    });
    let t0 = Instant::now();
    ok(&c.node("c1").cli(&["node", "flush", "hv1", "--wait"]), "flush hv1");
    let flushed = t0.elapsed();
    let seen = observed(&hosts);
    for g in four {
        let on = seen.get(g).cloned().unwrap_or_default();
        assert!(on.len() == 1 && on[0] != "hv1", "{g} runs once, off hv1: {on:?}");
        assert!(incoming(&hosts[idx(on[0])], g), "{g} moved live to {}", on[0]);
    }
    let t0 = Instant::now();
    ok(&c.node("c1").cli(&["node", "ready", "hv1", "--wait"]), "ready hv1");
    let readied = t0.elapsed();
    wait_until("4 guests home on hv1", Duration::from_secs(30), || {
        four.iter().all(|g| runs_only_on(&mut c, &hosts, g, "hv1")).then_some(())
    });
    for g in four {
        assert!(incoming(&hosts[idx("hv1")], g), "{g} came home live");
    }
    eprintln!(
        "(d) node flush hv1 --wait, 4 guests live: {} ms; node ready hv1 --wait, all 4 back live: {} ms",
        flushed.as_millis(),
        readied.as_millis()
    );

    // (f) A live move to a frozen destination (c3's libvirtd SIGSTOPped past the migration
    // timeout): the source, hv1, keeps reconciling its other guests meanwhile (a killed one is
    // started again); afterwards g3 runs exactly once and the record says where.
    hosts[idx("c3")].freeze(true);
    let t0 = Instant::now();
    ok(&c.node("c1").cli(&["vm", "migrate", "g3", "--to", "c3", "--force-live"]), "migrate g3 to a frozen c3");
    wait_until("g3's move under way", Duration::from_secs(10), || {
        vms(c.node("c1")).iter().any(|v| v["name"] == "g3" && v["migrating_from"] == "hv1").then_some(())
    });
    let pid = hosts[idx("hv1")].qemu_pid("g4").expect("g4's qemu");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill qemu");
    let restarted = wait_until("g4 restarted on hv1 during the hung move", Duration::from_secs(10), || {
        hosts[idx("hv1")].qemu_pid("g4").filter(|p| *p != pid).map(|_| t0.elapsed())
    });
    // Frozen past migration_timeout_ms (15 s): a window in which the move cannot finish.
    std::thread::sleep(Duration::from_secs(20).saturating_sub(t0.elapsed()));
    hosts[idx("c3")].freeze(false);
    let (on, record) = wait_until("g3 settled after the thaw", Duration::from_secs(60), || {
        let seen = observed(&hosts).get("g3").cloned().unwrap_or_default();
        let v = vms(c.node("c1")).into_iter().find(|v| v["name"] == "g3")?;
        (seen.len() == 1 && v["node"] == seen[0] && v["migrating_from"].is_null()).then(|| (seen[0], v))
    });
    eprintln!(
        "(f) move to a frozen destination: g4 restarted on the source meanwhile ({} ms); after the thaw g3 runs on {on} only \
         and the record agrees (state {}, reason {})",
        restarted.as_millis(),
        record["state"],
        record["failure_reason"]
    );
    if record["state"] == "fail" {
        // The operator's answer to a failed live-only move: start it, where it runs (adopted).
        let pid = hosts[idx(on)].qemu_pid("g3");
        ok(&c.node("c1").cli(&["vm", "start", "g3"]), "start g3 after its failed move");
        wait_until("g3 in start again", Duration::from_secs(10), || {
            vms(c.node("c1")).iter().any(|v| v["name"] == "g3" && v["state"] == "start").then_some(())
        });
        assert_eq!(hosts[idx(on)].qemu_pid("g3"), pid, "g3 kept running (adopted, not restarted)");
    }

    // (e) hv1 hangs: fenced through its BMC (which kills its qemus with it), its guests run
    // elsewhere.
    let b = &bmcs[idx("hv1")];
    let on_hv1: Vec<String> =
        observed(&hosts).into_iter().filter(|(_, on)| on == &vec!["hv1"]).map(|(g, _)| g).collect();
    assert!(on_hv1.len() >= 3, "hv1 runs guests: {on_hv1:?}");
    for g in &on_hv1 {
        let pid = hosts[idx("hv1")].qemu_pid(g).expect("qemu on hv1");
        b.kill_on_power_off(&format!("qemu-{g}"), u32::try_from(pid).expect("pid"));
    }
    let t0 = Instant::now();
    fencelab::signal(c.node("hv1"), nix::sys::signal::Signal::SIGSTOP);
    let fenced_at = wait_until("hv1 fenced", Duration::from_secs(30), || {
        events(c.node("c1")).iter().any(|e| e["kind"] == "fenced" && e["node"] == "hv1").then(|| t0.elapsed())
    });
    // When each guest was first seen running elsewhere, counted from the hang.
    let mut each: BTreeMap<String, Duration> = BTreeMap::new();
    wait_until("hv1's guests running elsewhere", Duration::from_secs(30), || {
        let seen = observed(&hosts);
        let now = t0.elapsed();
        let elsewhere = |g: &String| seen.get(g).is_some_and(|on| on.len() == 1 && on[0] != "hv1");
        for g in on_hv1.iter().filter(|g| elsewhere(g)) {
            each.entry(g.clone()).or_insert(now);
        }
        // Done when all of them run elsewhere at once (not merely each at some moment).
        on_hv1.iter().all(elsewhere).then_some(())
    });
    let recovered = t0.elapsed();
    let mut times: Vec<u128> = each.values().map(Duration::as_millis).collect();
    times.sort_unstable();
    assert!(b.chassis_log().contains("set power 0"), "the BMC powered hv1 off");
    assert!(
        // The promise is 4 s from the hang (`herd-bench migration`'s `hang_4`, release build);
        // twice that here, as above.
        recovered < SLACK * Duration::from_secs(4),
        "guests running elsewhere {recovered:?} after the hang ({:?} after the fence)",
        recovered - fenced_at
    );
    eprintln!(
        "(e) hv1 hung: fenced after {} ms, its {} guests running elsewhere after {} ms ({} ms after the fence; \
         each guest, from the hang: {times:?} ms, median {} ms)",
        fenced_at.as_millis(),
        on_hv1.len(),
        recovered.as_millis(),
        (recovered - fenced_at).as_millis(),
        times.get(times.len() / 2).copied().unwrap_or_default()
    );

    let (samples, doubles) = sampler.finish();
    assert!(doubles.is_empty(), "a guest ran on two hosts: {doubles:?}");
    eprintln!("sampler: {samples} samples, no guest on two hosts");
}
