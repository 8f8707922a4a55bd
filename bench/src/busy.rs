//! `herd-bench busy [SECONDS]`: herd on a busy host (issue 19), on the failover benchmark's
//! cluster (3 coordinators + 2 hypervisors in namespaces, simulated BMCs, a floating address).
//! The host runs, at normal priority, 16 CPU hogs per core, 32 guest-like workers per core
//! (10 ms of CPU, then 5 ms asleep) and 2 synchronous disk writers. For SECONDS (default 600):
//! primary drops and takeovers (from the daemons' logs), `lost` verdicts (every coordinator's
//! `status`, polled every 250 ms from a real-time thread, which also times the answers), fence
//! decisions (the event log). Then, with the load still on, `h1` is hung (SIGSTOP) 5 times: how
//! long until its VMs run elsewhere (the simulated BMCs run in real time: a real BMC is
//! hardware of its own, not a process beside the VMs). The whole run twice: with real-time scheduling (herd's
//! default) and at normal priority (`[scheduling] realtime = false`), for comparison.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::failover::{admin, elapsed_ms, summary, wait, Bench};

/// The load, in this process's threads at normal priority, until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(dir: &Path) -> Load {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let spin = |x: u64| std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        for k in 0..48 * cores {
            let stop = stop.clone();
            // The first 16 per core never sleep; the other 32 per core behave like guest vCPUs.
            let guest = k >= 16 * cores;
            threads.push(std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let busy = Instant::now();
                    while !guest || busy.elapsed() < Duration::from_millis(10) {
                        x = spin(x);
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
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

const NAMES: [&str; 5] = ["c1", "c2", "c3", "h1", "h2"];

/// Network counters that explain a lost lease without a paused process: TCP retransmissions and
/// timeouts in every node's namespace (a retransmission waits at least 200 ms, most of a
/// 300 ms lease), and packets the kernel's per-CPU backlogs dropped or squeezed.
#[derive(Clone, Copy, Debug, Default)]
struct Net {
    retrans: u64,
    timeouts: u64,
    backlog_drops: u64,
    squeezed: u64,
}

/// The value of `field` in the `prefix` section of a `/proc/net/snmp`-style text (a header
/// line of names followed by a line of values).
fn snmp_field(text: &str, prefix: &str, field: &str) -> u64 {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(k) = names.split_whitespace().position(|n| n == field) {
            return values.split_whitespace().nth(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    0
}

fn net(b: &Bench) -> Net {
    let mut n = Net::default();
    for i in 1..=NAMES.len() {
        let read = |f: &str| {
            std::process::Command::new("ip")
                .args(["netns", "exec", &b.ns(i), "cat", f])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        n.retrans += snmp_field(&read("/proc/net/snmp"), "Tcp:", "RetransSegs");
        n.timeouts += snmp_field(&read("/proc/net/netstat"), "TcpExt:", "TCPTimeouts");
    }
    let softnet = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    for line in softnet.lines() {
        let col = |k: usize| line.split_whitespace().nth(k).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
        n.backlog_drops += col(1);
        n.squeezed += col(2);
    }
    n
}

/// One run: `realtime` or at normal priority.
pub fn one(secs: u64, realtime: bool) -> Result<Value> {
    let extra = if realtime { "" } else { "[scheduling]\nrealtime = false\nlock_memory = false\n" };
    let b = Bench::setup(crate::herd_binary()?, extra)?;
    let logs: Vec<std::path::PathBuf> = NAMES.iter().map(|n| b.node_dir(n).join("herd.log")).collect();
    let from: Vec<usize> =
        logs.iter().map(|p| std::fs::metadata(p).map_or(0, |m| usize::try_from(m.len()).unwrap_or(0))).collect();
    let events_before = admin(&b.socket("c1"), &json!({"op": "events"}))?["events"].as_array().map_or(0, Vec::len);
    // A BMC is hardware of its own, not a process competing with the host's VMs: the
    // simulated ones run in real time, their chassis scripts too (ipmi_sim answers nothing while
    // one runs); the script boots a host at normal priority.
    for n in NAMES {
        let pid = std::fs::read_to_string(b.node_dir(n).join("bmc/ipmi_sim.pid")).unwrap_or_default();
        let _ = std::process::Command::new("chrt").args(["-a", "-r", "-p", "30", pid.trim()]).output();
    }
    let net0 = net(&b);
    let load = Load::start(&b.node_dir("c1"));
    // This thread asks in real time: a client at normal priority would time its own wait. Only
    // after the load started: threads it created would inherit real time.
    let tid = std::fs::read_link("/proc/thread-self").ok().and_then(|p| p.file_name().map(|n| n.to_owned()));
    let tid = tid.and_then(|t| t.into_string().ok()).context("this thread's id")?;
    let _ = std::process::Command::new("chrt").args(["-r", "-p", "20", &tid]).output();
    let started = Instant::now();
    let (mut asks, mut slowest, mut lost) = (0u64, 0f64, 0u64);
    while started.elapsed() < Duration::from_secs(secs) {
        for n in ["c1", "c2", "c3"] {
            let t0 = Instant::now();
            let s = admin(&b.socket(n), &json!({"op": "status"}));
            slowest = slowest.max(elapsed_ms(t0));
            asks += 1;
            let members = s.ok().and_then(|s| s["members"].as_array().cloned()).unwrap_or_default();
            lost += members.iter().filter(|m| m["heartbeat"].as_str().is_some_and(|h| h.starts_with("lost"))).count()
                as u64;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (mut drops, mut takeovers) = (0usize, 0usize);
    for (k, p) in logs.iter().enumerate() {
        let log = std::fs::read_to_string(p).unwrap_or_default();
        let new = log.get(from[k]..).unwrap_or_default();
        drops += new.lines().filter(|l| l.contains("dropping the primary duties")).count();
        takeovers += new.lines().filter(|l| l.contains("taking over the primary role")).count();
    }
    let events = admin(&b.socket("c1"), &json!({"op": "events"}))?;
    let fences = events["events"]
        .as_array()
        .map_or(0, |e| e.iter().skip(events_before).filter(|e| e["kind"] == "fence-decided").count());
    let pauses = admin(&b.socket("c1"), &json!({"op": "status"}))?["pauses"].clone();
    let net1 = net(&b);
    let netv = json!({
        "tcp_retransmissions": net1.retrans.saturating_sub(net0.retrans),
        "tcp_timeouts": net1.timeouts.saturating_sub(net0.timeouts),
        "backlog_drops": net1.backlog_drops.saturating_sub(net0.backlog_drops),
        "softirq_squeezed": net1.squeezed.saturating_sub(net0.squeezed),
    });
    eprintln!(
        "busy ({}) {secs} s: {drops} primary drops, {takeovers} takeovers, {lost} lost verdicts, {fences} fence \
         decisions, status slowest {slowest:.0} ms over {asks}; c1 pauses {pauses}; network {netv}",
        if realtime { "real time" } else { "normal" }
    );
    // Failover under the same load; a repetition that does not recover within 60 s is
    // recorded as such and ends the series (the cluster is not brought back from it).
    let mut hang = Vec::new();
    let mut hang_failed = None;
    for rep in 0..5 {
        let t0 = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(b.pid("h1")?), nix::sys::signal::Signal::SIGSTOP)?;
        let r = wait("h1's VMs running elsewhere", Duration::from_secs(60), || b.all_running_elsewhere("h1")).and_then(
            |()| {
                hang.push(elapsed_ms(t0));
                eprintln!(
                    "busy ({}) hang {}: {:.0} ms",
                    if realtime { "real time" } else { "normal" },
                    rep + 1,
                    hang[rep]
                );
                b.restore_h1()
            },
        );
        if let Err(e) = r {
            eprintln!("busy: hang {} failed: {e:#}", rep + 1);
            hang_failed = Some(format!("repetition {}: {e:#}", rep + 1));
            break;
        }
    }
    let _ = std::process::Command::new("chrt").args(["-o", "-p", "0", &tid]).output();
    drop(load);
    let r = json!({
        "realtime": realtime, "seconds": secs, "primary_drops": drops, "takeovers": takeovers,
        "lost_verdicts": lost, "fence_decisions": fences, "status_asks": asks, "status_slowest_ms": slowest,
        "pauses": pauses, "network": netv, "hypervisor_hang": summary(hang), "hypervisor_hang_failed": hang_failed,
    });
    eprintln!("busy: {r}");
    Ok(r)
}

pub fn run(secs: u64) -> Result<Value> {
    let rt = one(secs, true)?;
    let normal = one(secs, false)?;
    let table = |r: &Value| {
        println!(
            "{:<10} {:>6} {:>9} {:>5} {:>6} {:>10} {:>14}",
            if r["realtime"] == true { "real time" } else { "normal" },
            r["primary_drops"],
            r["takeovers"],
            r["lost_verdicts"],
            r["fence_decisions"],
            format!("{:.0}", r["status_slowest_ms"].as_f64().unwrap_or(0.0)),
            format!("{:.0}", r["hypervisor_hang"]["median_ms"].as_f64().unwrap_or(0.0)),
        )
    };
    println!("busy host, {secs} s: 16 hogs + 32 guest-like workers per core + 2 sync writers");
    println!(
        "{:<10} {:>6} {:>9} {:>5} {:>6} {:>10} {:>14}",
        "scheduling", "drops", "takeovers", "lost", "fences", "status ms", "hang median ms"
    );
    table(&rt);
    table(&normal);
    let v = json!({"realtime": rt, "normal": normal});
    crate::write_json("busy", &v)?;
    Ok(v)
}
