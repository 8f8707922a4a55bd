//! herd on a busy host (issue 19), as root:
//! - its runtime threads run with real-time scheduling (SCHED_RR 10, by the kernel's own
//!   account in `/proc`), its memory is locked, `herd status` says so, and what it starts (a
//!   primary hook) runs at normal priority;
//! - 3 coordinators + 1 hypervisor in network namespaces with a floating address (their store
//!   threads already in real time before the load starts), while the
//!   host runs 16 CPU hogs per core, 32 guest-like workers per core (10 ms on, 5 ms asleep) and
//!   2 synchronous disk writers, all at normal priority, for `HERD_T96_SECS` (60) seconds: no
//!   primary drop, no floating-address move, no `lost` verdict, no fence decision, and
//!   `status` answers within 100 ms (p99; the slowest is reported).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{wait_until, Cluster};
use crate::netns::{self, Topology};

const FLOATING: &str = "10.210.0.96";
const NAMES: [&str; 4] = ["c1", "c2", "c3", "hv"];

/// The scheduling policy of every thread of process `pid`: (thread name, policy number).
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        // Fields after the ")" that closes the name: state is field 3; policy is field 41.
        let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or_default();
        if let Some(p) = after.split_whitespace().nth(38).and_then(|p| p.parse().ok()) {
            out.push((comm, p));
        }
    }
    out
}

fn hook(dir: &Path, name: &str, body: &str) {
    std::fs::create_dir_all(dir).expect("hooks dir");
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("hook");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
}

#[test]
fn the_runtime_runs_in_real_time_and_what_it_starts_does_not() {
    let test = "the_runtime_runs_in_real_time_and_what_it_starts_does_not";
    if !nix::unistd::Uid::effective().is_root() {
        crate::harness::skip(test, "real-time scheduling needs root (CAP_SYS_NICE)");
        return;
    }
    let mut c = Cluster::new(&[("r1", "coordinator", "127.0.34.1:7400")], "");
    let hooks = c.node("r1").dir.join("hooks");
    let seen = c.node("r1").dir.join("hook-policy");
    // The hook records its own scheduling policy (field 41 of /proc/self/stat).
    hook(&hooks, "10-policy", &format!("awk '{{print $41}}' /proc/$$/stat > {}", seen.display()));
    c.node("r1").extra_config = format!("[primary]\nhooks_dir = \"{}\"\n", hooks.display());
    c.node("r1").start();
    c.node("r1").admin(json!({"op": "init-cluster"}));
    let s = wait_until("r1 primary", Duration::from_secs(20), || {
        let s = c.node("r1").try_admin(&json!({"op": "status"})).ok()?;
        (s["holding_duties"] == true).then_some(s)
    });
    assert_eq!(s["scheduling"]["policy"], "rr", "{}", s["scheduling"]);
    assert_eq!(s["scheduling"]["priority"], 10);
    assert_eq!(s["scheduling"]["memory_locked"], true, "{}", s["scheduling"]);
    let out = c.node("r1").cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("scheduling rr/10, memory locked"), "{text}");
    let pid = c.node("r1").child.as_ref().expect("running").id();
    let threads = thread_policies(pid);
    let rr: Vec<&(String, u32)> = threads.iter().filter(|(_, p)| *p == 2).collect();
    assert!(rr.len() >= 2, "the runtime's workers run SCHED_RR: {threads:?}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let locked = status.lines().find(|l| l.starts_with("VmLck:")).unwrap_or_default().to_string();
    assert!(!locked.ends_with(" 0 kB"), "memory locked: {locked}");
    let policy = wait_until("the hook ran", Duration::from_secs(10), || {
        std::fs::read_to_string(&seen).ok().filter(|s| !s.trim().is_empty())
    });
    assert_eq!(policy.trim(), "0", "a hook runs at normal priority (SCHED_OTHER)");
    eprintln!("r1: {} of {} threads SCHED_RR, {locked}, its hook SCHED_OTHER", rr.len(), threads.len());

    // Off in config: normal priority, said so.
    c.node("r1").terminate(Duration::from_secs(10));
    c.node("r1").extra_config.push_str("[scheduling]\nrealtime = false\nlock_memory = false\n");
    c.node("r1").start();
    let s = c.node("r1").status();
    assert_eq!(
        (s["scheduling"]["policy"].as_str(), s["scheduling"]["memory_locked"].as_bool()),
        (Some("other"), Some(false))
    );
    let pid = c.node("r1").child.as_ref().expect("running").id();
    assert!(thread_policies(pid).iter().all(|(_, p)| *p == 0), "{:?}", thread_policies(pid));
}

/// Load at normal priority, in this process's threads, until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(dir: &Path) -> Load {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..16 * cores {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            }));
        }
        for _ in 0..32 * cores {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let busy = Instant::now();
                    while busy.elapsed() < Duration::from_millis(10) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        for k in 0..2 {
            let (stop, path) = (stop.clone(), dir.join(format!("writer{k}")));
            threads.push(std::thread::spawn(move || {
                let Ok(mut f) = std::fs::File::create(&path) else { return };
                let block = vec![7u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if f.write_all(&block).and_then(|()| f.sync_data()).is_err() {
                        return;
                    }
                    if f.metadata().is_ok_and(|m| m.len() > 64 << 20) {
                        let _ = f.set_len(0);
                    }
                }
            }));
        }
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the logs say since `from` (a byte offset per node): primary drops, takeovers begun
/// (each one moves the floating address), and what the nodes said about slow log flushes and
/// pauses (shown beside a drop).
fn log_counts(c: &mut Cluster, from: &[usize]) -> (Vec<String>, usize, Vec<String>) {
    let (mut drops, mut takeovers, mut said) = (Vec::new(), 0, Vec::new());
    for (k, name) in NAMES.iter().enumerate() {
        let log = std::fs::read_to_string(c.node(name).log_path()).unwrap_or_default();
        let new = log.get(from[k]..).unwrap_or_default();
        drops.extend(new.lines().filter(|l| l.contains("dropping the primary duties")).map(str::to_string));
        takeovers += new.lines().filter(|l| l.contains("taking over the primary role")).count();
        let slow = |l: &&str| l.contains("slow Raft log flushes") || l.contains("paused");
        said.extend(new.lines().filter(slow).map(|l| format!("{name}: {l}")));
    }
    (drops, takeovers, said)
}

/// Before the load starts, every daemon's store threads (sled's IO threads, started lazily at
/// Raft's start or a join) already run in real time: left at normal priority for the 5 s an
/// earlier version waited before promoting them, they starved as the load began and a
/// follower's log flush took 0.2–0.6 s, longer than the 300 ms lease — a primary drop in the
/// load's first second, about one run in ten. `HERD_T96_SECS=15`: a short run.
#[test]
fn a_busy_host_costs_herd_nothing() {
    let test = "a_busy_host_costs_herd_nothing";
    if !netns::available(test) {
        return;
    }
    // Its load would slow every other test beside it: it runs alone.
    let _alone = crate::harness::alone();
    let secs: u64 = std::env::var("HERD_T96_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    // HERD_T96_NORMAL=1: the same run at normal priority, for comparison (reported, not judged).
    let normal = std::env::var("HERD_T96_NORMAL").is_ok_and(|v| v == "1");
    let topo = Topology::new("bz", NAMES.len(), &["mgmt"]);
    let specs: Vec<(String, &str, String)> = NAMES
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let role = if n.starts_with('c') { "coordinator" } else { "hypervisor" };
            (n.to_string(), role, format!("{}:7400", topo.addr(k + 1, 0)))
        })
        .collect();
    let refs: Vec<(&str, &str, &str)> = specs.iter().map(|(n, r, a)| (n.as_str(), *r, a.as_str())).collect();
    let mut c = Cluster::new(&refs, "[keepalive]\ninterval_ms = 1000\n");
    for (k, name) in NAMES.iter().enumerate() {
        let i = k + 1;
        let node = c.node(name);
        node.netns = Some(topo.ns(i));
        let mut extra = format!("[heartbeat.networks]\nmgmt = \"{}:7401\"\n", topo.addr(i, 0));
        if normal {
            extra.push_str("[scheduling]\nrealtime = false\nlock_memory = false\n");
        }
        if name.starts_with('c') {
            extra.push_str(&format!("[primary]\nfloating_ips = [\"{FLOATING}/24 dev {}\"]\n", topo.ifname(i, 0)));
        } else {
            extra.push_str("[hypervisor]\nuri = \"test:///default\"\n");
        }
        node.extra_config = extra;
        node.start();
    }
    let token = c.node("c1").admin(json!({"op": "init-cluster"}))["token"].as_str().expect("token").to_string();
    for name in &NAMES[1..] {
        c.node(name).admin(json!({"op": "join-cluster", "peer": format!("{}:7400", topo.addr(1, 0)), "token": token}));
    }
    wait_until("4 nodes run, a primary holds its duties", Duration::from_secs(30), || {
        let s = c.node("c2").try_admin(&json!({"op": "status"})).ok()?;
        let m = s["members"].as_array()?;
        let all_run = m.len() == 4 && m.iter().all(|x| x["daemon_state"] == "run" && x["heartbeat"] == "alive");
        (all_run && s["primary"].is_string()).then_some(())
    });
    let want = if normal { "other" } else { "rr" };
    for name in NAMES {
        assert_eq!(c.node(name).status()["scheduling"]["policy"], want, "{name}'s scheduling");
    }
    let from: Vec<usize> = NAMES
        .iter()
        .map(|n| std::fs::metadata(c.node(n).log_path()).map_or(0, |m| usize::try_from(m.len()).unwrap_or(0)))
        .collect();
    let events_before = c.node("c1").admin(json!({"op": "events"}))["events"].as_array().map_or(0, Vec::len);

    if !normal {
        for name in NAMES {
            let pid = c.node(name).child.as_ref().expect("running").id();
            // Promoted within a tick of their start: half a second is ample (it was 5 s).
            wait_until(&format!("{name}'s store threads in real time"), Duration::from_millis(500), || {
                let threads = thread_policies(pid);
                let store: Vec<&(String, u32)> =
                    threads.iter().filter(|(n, _)| n.starts_with("sled-io") || n.starts_with("log flusher")).collect();
                (!store.is_empty() && store.iter().all(|(_, p)| *p == 2)).then_some(())
            });
        }
    }
    let load = Load::start(c.dir.path());
    let started = Instant::now();
    let (mut took_all, mut lost) = (Vec::new(), Vec::new());
    // This asking thread runs in real time itself: a client at normal priority among ~100
    // runnable threads per core would measure its own wait for a CPU, not herd's answer. Only
    // after the load started: threads it created would inherit real time.
    let tid = std::fs::read_link("/proc/thread-self").ok().and_then(|p| p.file_name().map(|n| n.to_owned()));
    let tid = tid.and_then(|t| t.into_string().ok()).expect("this thread's id");
    let chrt = std::process::Command::new("chrt").args(["-r", "-p", "20", &tid]).output();
    assert!(chrt.as_ref().is_ok_and(|o| o.status.success()), "chrt: {chrt:?}");
    while started.elapsed() < Duration::from_secs(secs) {
        for name in ["c1", "c2", "c3"] {
            let asked = Instant::now();
            let s = c.node(name).try_admin(&json!({"op": "status"}));
            took_all.push(asked.elapsed());
            let Ok(s) = s else { continue };
            for m in s["members"].as_array().into_iter().flatten() {
                if m["heartbeat"].as_str().is_some_and(|h| h.starts_with("lost")) {
                    lost.push(format!("{name} sees {} {}", m["name"], m["heartbeat"]));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = std::process::Command::new("chrt").args(["-o", "-p", "0", &tid]).output();
    drop(load);
    let (drops, takeovers, said) = log_counts(&mut c, &from);
    let events = c.node("c1").admin(json!({"op": "events"}));
    let fences: Vec<&Value> = events["events"]
        .as_array()
        .map(|e| e.iter().skip(events_before).filter(|e| e["kind"] == "fence-decided").collect())
        .unwrap_or_default();
    let p = c.node("c1").status()["pauses"].clone();
    took_all.sort();
    let samples = took_all.len();
    let p99 = took_all.get((samples * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or_default();
    let slowest = took_all.last().copied().unwrap_or_default();
    eprintln!(
        "{secs} s busy: {} primary drops, {takeovers} takeovers, {} lost verdicts, {} fence decisions; \
         status answered in {} ms at p99, {} ms at the slowest ({samples} asks); c1 pauses {p}",
        drops.len(),
        lost.len(),
        fences.len(),
        p99.as_millis(),
        slowest.as_millis()
    );
    if normal {
        return;
    }
    assert!(drops.is_empty(), "primary drops: {drops:?}; the nodes said: {said:?}");
    assert_eq!(takeovers, 0, "a takeover began: the floating address moved");
    assert!(lost.is_empty(), "lost verdicts: {lost:?}");
    assert!(fences.is_empty(), "fence decisions: {fences:?}");
    // p99, not the slowest: a rare outlier of a few hundred ms was seen in full-suite runs
    // (suspected: a log line written on a worker while the writers fill the page cache).
    assert!(p99 < Duration::from_millis(100), "status took {p99:?} at p99");
}
