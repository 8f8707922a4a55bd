//! `herd-bench SCENARIO`: benchmarks measure, tests assert. Each scenario prints a table and
//! writes `target/bench/<scenario>-<unix time>.json` with the machine, the commit and every
//! figure.
//!
//! Scenarios:
//! - `heartbeat`: CPU time one coordinator spends per second on pulses and answers for 10, 100
//!   and 1000 simulated hosts × 2 networks, at the default 100 ms interval. The hosts are real
//!   heartbeat agents (the responder code of every node) in a child process, on loopback; the
//!   coordinator's process CPU time is measured with getrusage over a steady window.
//! - `failover [REPS]`: see [`failover`] — primary kill, hypervisor hang, hypervisor power-off,
//!   graceful hand-over, each REPS times (default 10), in network namespaces (root).
//! - `writes [SECONDS]`: see `writes.rs` — replicated writes, herd beside a 3-member etcd, at 1,
//!   16 and 64 clients (needs the `etcd` feature, Debian's etcd-server and protoc).
//! - `connections [HYPERVISORS] [SECONDS]`: see `connections.rs` — new cluster connections per
//!   second at the leader of 3 coordinators + 64 hypervisors in the steady state.
//! - `migration [REPS]`: see `migration.rs` — live moves of real QEMU guests (time, libvirt's
//!   job time, downtime; default 10), a flush of 4 guests by live migration and 3 hangs of a
//!   hypervisor with 5 guests (the time until all run elsewhere), on the demo cluster (root,
//!   QEMU).
//! - `hypervisors [N] [SECONDS] [learner|client]`: see `hypervisors.rs` — N real hypervisor
//!   daemons beside 3 coordinators, as Raft learners or as clients (issue 22).
//! - `follow [FOLLOWERS] [SECONDS]`: see `follow.rs` — 3 coordinators serving the state to 1000
//!   followers outside Raft (issue 22): bootstrap, write fan-out, coordinator CPU, a
//!   coordinator's death.
//! - `clients [N] [SECONDS] [HEARTBEAT_MS] [maintenance|vms]`: see `clients.rs` — the scale step of issue 22: 3 coordinators and
//!   N (default 1000) simulated hypervisors outside Raft (the real client code and heartbeat
//!   responders, in this process): coordinator CPU, joins, writes.
//! - `all`: every scenario; also writes `docs/bench/latest.json` in the shape the docs use.

mod busy;
mod clients;
mod connections;
mod failover;
mod follow;
mod hypervisors;
mod migration;
mod procs;
#[cfg(feature = "etcd")]
mod writes;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use herd::heartbeat::agent::{Agent, Target};
use herd::heartbeat::Params;
use herd_storage::model::Role;
use serde_json::{json, Value};

const CLUSTER: &str = "bench";
const NETS: [&str; 2] = ["mgmt", "storage"];
/// Coordinator id; hosts are 100.. so they never collide.
const COORDINATOR: u64 = 1;

fn host_addr(h: usize, net: usize, base_port: u16) -> SocketAddr {
    // One loopback address per host (127.77.x.y), one port per network.
    let ip = Ipv4Addr::new(127, 77, u8::try_from(h / 250).unwrap_or(255), u8::try_from(h % 250 + 1).unwrap_or(255));
    SocketAddr::new(IpAddr::V4(ip), base_port + u16::try_from(net).unwrap_or(0))
}

/// The coordinator's address on each network.
fn coordinator_addrs(base_port: u16) -> BTreeMap<String, SocketAddr> {
    NETS.iter()
        .enumerate()
        .map(|(k, n)| (n.to_string(), SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 78, 0, 1)), base_port + k as u16)))
        .collect()
}

pub(crate) fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard).context("raising the open-file limit")?;
    Ok(())
}

/// Datagrams are tagged as in a real (TLS) cluster: the HMAC is part of the cost measured.
const HEARTBEAT_KEY: [u8; 32] = [7; 32];

/// Child mode: `hosts` responders, until stdin closes.
async fn responders(hosts: usize, base_port: u16) -> Result<()> {
    raise_fd_limit()?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut agents = Vec::new();
    for h in 0..hosts {
        let nets: BTreeMap<String, SocketAddr> =
            NETS.iter().enumerate().map(|(k, n)| (n.to_string(), host_addr(h, k, base_port))).collect();
        let (agent, _notices) = Agent::bind(&format!("host{h}"), Role::Hypervisor, Params::default(), &nets).await?;
        agent.set_key(Some(HEARTBEAT_KEY));
        agent.set_identity(100 + h as u64, CLUSTER);
        // Nodes answer only the coordinators of their cluster's records.
        agent.set_targets(vec![Target {
            id: COORDINATOR,
            name: "coordinator".into(),
            role: Role::Coordinator,
            addrs: coordinator_addrs(base_port),
        }]);
        agent.spawn(rx.clone());
        agents.push(agent);
    }
    println!("ready");
    // Parent closes our stdin to stop us.
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    let _ = tx.send(true);
    Ok(())
}

fn cpu_seconds() -> Result<f64> {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    Ok(t(u.user_time()) + t(u.system_time()))
}

/// One measurement: a coordinator pulsing `hosts` hosts.
async fn heartbeat_run(hosts: usize, warmup: Duration, window: Duration) -> Result<Value> {
    let base_port = 17_000;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["responders", &hosts.to_string(), &base_port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the responders")?;
    let stdout = child.stdout.take().context("responder stdout")?;
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await??;
    if ready.trim() != "ready" {
        bail!("responders did not start");
    }
    let nets = coordinator_addrs(base_port);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (agent, _notices) = Agent::bind("coordinator", Role::Coordinator, Params::default(), &nets).await?;
    agent.set_key(Some(HEARTBEAT_KEY));
    agent.set_identity(COORDINATOR, CLUSTER);
    agent.set_targets(
        (0..hosts)
            .map(|h| Target {
                id: 100 + h as u64,
                name: format!("host{h}"),
                role: Role::Hypervisor,
                addrs: NETS.iter().enumerate().map(|(k, n)| (n.to_string(), host_addr(h, k, base_port))).collect(),
            })
            .collect(),
    );
    // Pulse round trips (pulse sent → answer received), collected during the window only.
    let rtts: std::sync::Arc<std::sync::Mutex<Vec<Duration>>> = std::sync::Arc::default();
    let recording = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (rtts, recording) = (rtts.clone(), recording.clone());
        agent.set_rtt_observer(std::sync::Arc::new(move |d| {
            if recording.load(std::sync::atomic::Ordering::Relaxed) {
                rtts.lock().unwrap_or_else(|p| p.into_inner()).push(d);
            }
        }));
    }
    agent.spawn(rx);
    tokio::time::sleep(warmup).await;
    recording.store(true, std::sync::atomic::Ordering::Relaxed);
    let before = agent.report()["counters"].clone();
    let (cpu0, t0) = (cpu_seconds()?, Instant::now());
    tokio::time::sleep(window).await;
    let (cpu1, elapsed) = (cpu_seconds()?, t0.elapsed());
    recording.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut rtt: Vec<Duration> = std::mem::take(&mut *rtts.lock().unwrap_or_else(|p| p.into_inner()));
    rtt.sort();
    let rtt_ms = |p: f64| {
        rtt.get(((p * rtt.len() as f64).ceil() as usize).clamp(1, rtt.len().max(1)) - 1)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let report = agent.report();
    let delta = |k: &str| report["counters"][k].as_u64().unwrap_or(0).saturating_sub(before[k].as_u64().unwrap_or(0));
    let per_s = |k: &str| delta(k) as f64 / elapsed.as_secs_f64();
    let _ = tx.send(true);
    drop(child.stdin.take());
    let _ = child.wait();
    let lost = report["verdicts"].as_object().map_or(0, |m| m.values().filter(|v| v["verdict"] == "lost").count());
    let ok_links = report["own_view"]["nets"].as_array().map_or(0, |n| {
        n.iter().flat_map(|n| n["hosts"].as_array().cloned().unwrap_or_default()).filter(|h| h["state"] == "ok").count()
    });
    let cpu_per_s = (cpu1 - cpu0) / elapsed.as_secs_f64();
    if ok_links < hosts * NETS.len() {
        // A coordinator that hears nobody does less work: the figure would flatter us.
        eprintln!("WARNING: only {ok_links} of {} links ok: this measurement is not valid", hosts * NETS.len());
    }
    Ok(json!({
        "hosts": hosts,
        "networks": NETS.len(),
        "interval_ms": Params::default().interval_ms,
        "window_s": elapsed.as_secs_f64(),
        "cpu_s_per_s": cpu_per_s,
        "cpu_percent_of_one_core": cpu_per_s * 100.0,
        "pulses_per_s": per_s("pulses_sent"),
        "answers_per_s": per_s("answers_received"),
        "links_ok": ok_links,
        "links_total": hosts * NETS.len(),
        "hosts_lost": lost,
        "pulse_rtt_p50_ms": rtt_ms(0.50),
        "pulse_rtt_p99_ms": rtt_ms(0.99),
        "pulse_rtt_samples": rtt.len(),
        "valid": ok_links == hosts * NETS.len(),
    }))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "commit": commit,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

fn write_json(scenario: &str, v: &Value) -> Result<String> {
    let dir = std::path::Path::new("target/bench");
    std::fs::create_dir_all(dir)?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let path = dir.join(format!("{scenario}-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(v)?)?;
    Ok(path.display().to_string())
}

async fn heartbeat(sizes: &[usize]) -> Result<Vec<Value>> {
    raise_fd_limit()?;
    let mut rows = Vec::new();
    println!(
        "{:>6} {:>9} {:>14} {:>10} {:>10} {:>10} {:>6} {:>10} {:>10}",
        "hosts", "networks", "coord CPU %", "pulses/s", "answers/s", "links ok", "lost", "rtt p50", "rtt p99"
    );
    for &hosts in sizes {
        let r = heartbeat_run(hosts, Duration::from_secs(2), Duration::from_secs(5)).await?;
        println!(
            "{:>6} {:>9} {:>13.2}% {:>10.0} {:>10.0} {:>10} {:>6} {:>10} {:>10}",
            hosts,
            NETS.len(),
            r["cpu_percent_of_one_core"].as_f64().unwrap_or(0.0),
            r["pulses_per_s"].as_f64().unwrap_or(0.0),
            r["answers_per_s"].as_f64().unwrap_or(0.0),
            format!("{}/{}", r["links_ok"], r["links_total"]),
            r["hosts_lost"],
            format!("{:.2}ms", r["pulse_rtt_p50_ms"].as_f64().unwrap_or(0.0)),
            format!("{:.2}ms", r["pulse_rtt_p99_ms"].as_f64().unwrap_or(0.0)),
        );
        rows.push(r);
    }
    let out = json!({ "scenario": "heartbeat", "machine": machine(), "results": rows, "target": "1000 hosts x 2 networks at 100 ms within 15 % of one core" });
    println!("wrote {}", write_json("heartbeat", &out)?);
    Ok(rows)
}

/// Targets from DESIGN §10, beside the figures.
const FAILOVER_TARGETS: [(&str, &str); 4] = [
    ("primary_kill", "median <= 1 s, p99 <= 2 s (etcd 100/1000 ms timers: ~1.45 s)"),
    ("hypervisor_hang", "median <= 3 s, p99 <= 5 s (Pacemaker tuned ~5 s, stock 13.1 s)"),
    ("hypervisor_poweroff", "median <= 3 s, p99 <= 5 s"),
    ("primary_handover", "no DESIGN target (graceful: expected well below primary_kill)"),
];

fn failover_table(r: &Value) {
    println!("{:<22} {:>4} {:>10} {:>10} {:>10}  target", "scenario", "n", "median ms", "p99 ms", "max ms");
    for (k, target) in FAILOVER_TARGETS {
        let v = &r[k];
        println!(
            "{:<22} {:>4} {:>10.0} {:>10.0} {:>10.0}  {target}",
            k,
            v["n"],
            v["median_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
}

fn failover(reps: usize) -> Result<Value> {
    let r = failover::run(reps)?;
    failover_table(&r);
    let out = json!({ "scenario": "failover", "machine": machine(), "results": r, "targets": FAILOVER_TARGETS.iter().map(|(k, t)| (k.to_string(), json!(t))).collect::<serde_json::Map<_, _>>() });
    println!("wrote {}", write_json("failover", &out)?);
    Ok(r)
}

/// The release `herd` binary the cluster scenarios run.
fn herd_binary() -> Result<std::path::PathBuf> {
    let herd = std::env::var_os("HERD_BIN").map_or_else(|| std::path::PathBuf::from("target/release/herd"), Into::into);
    std::fs::canonicalize(&herd)
        .with_context(|| format!("herd binary {} (cargo build --release --bin herd)", herd.display()))
}

#[cfg(feature = "etcd")]
async fn writes_scenario(seconds: u64) -> Result<Vec<Value>> {
    let rows = writes::run(herd_binary()?, seconds).await?;
    let out = json!({ "scenario": "writes", "machine": machine(), "window_s": seconds, "results": rows,
        "target": "p99 latency and throughput at least etcd's (DESIGN §10)" });
    println!("wrote {}", write_json("writes", &out)?);
    Ok(rows)
}

#[cfg(not(feature = "etcd"))]
async fn writes_scenario(_seconds: u64) -> Result<Vec<Value>> {
    bail!("herd-bench was built without etcd support: `make bench` builds it with `--features etcd`")
}

fn migration_scenario(reps: usize) -> Result<Value> {
    let r = migration::run(reps)?;
    println!("{:<18} {:>4} {:>10} {:>10} {:>10}", "live migration", "n", "median ms", "p99 ms", "max ms");
    for k in ["live_move_ms", "live_job_ms", "live_downtime_ms"] {
        let v = &r[k];
        println!(
            "{:<18} {:>4} {:>10.0} {:>10.0} {:>10.0}",
            k.trim_end_matches("_ms"),
            v["n"],
            v["median_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
    let ms = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "flush of 4 guests (live): {:.0} ms; ready, all 4 home: {:.0} ms",
        ms("flush_4_live_ms"),
        ms("ready_4_live_ms")
    );
    let h = &r["hang_ms"];
    println!(
        "hv4 hung with {} guests → all running elsewhere: median {:.0} ms, max {:.0} ms ({} hangs)",
        r["hang_guests"],
        h["median_ms"].as_f64().unwrap_or(f64::NAN),
        h["max_ms"].as_f64().unwrap_or(f64::NAN),
        h["n"]
    );
    let out = json!({ "scenario": "migration", "machine": machine(), "results": r });
    println!("wrote {}", write_json("migration", &out)?);
    Ok(r)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["failover"] => failover(10).map(|_| ()),
        ["failover", reps] => failover(reps.parse().context("repetitions")?).map(|_| ()),
        ["writes"] => rt.block_on(writes_scenario(5)).map(|_| ()),
        ["writes", secs] => rt.block_on(writes_scenario(secs.parse().context("seconds")?)).map(|_| ()),
        ["all"] => {
            let writes = rt.block_on(writes_scenario(5))?;
            let hb = rt.block_on(heartbeat(&[10, 100, 1000]))?;
            let fo = failover(10)?;
            let conns = connections::run(herd_binary()?, 64, 60)?;
            let heartbeat: Vec<Value> = hb
                .iter()
                .map(|r| json!({"hosts": r["hosts"], "networks": r["networks"], "coordinator_cpu_percent": r["cpu_percent_of_one_core"], "pulse_rtt_p50_ms": r["pulse_rtt_p50_ms"], "pulse_rtt_p99_ms": r["pulse_rtt_p99_ms"]}))
                .collect();
            let failover: serde_json::Map<String, Value> = FAILOVER_TARGETS
                .iter()
                .map(|(k, _)| {
                    let v = &fo[*k];
                    (
                        k.to_string(),
                        json!({"n": v["n"], "median_ms": v["median_ms"], "p99_ms": v["p99_ms"], "max_ms": v["max_ms"]}),
                    )
                })
                .collect();
            let writes: Vec<Value> = writes
                .iter()
                .map(|r| {
                    json!({"clients": r["clients"], "herd_writes_per_s": r["herd_writes_per_s"], "etcd_writes_per_s": r["etcd_writes_per_s"],
                        "herd_p99_ms": r["herd_p99_ms"], "etcd_p99_ms": r["etcd_p99_ms"], "herd_p50_ms": r["herd_p50_ms"], "etcd_p50_ms": r["etcd_p50_ms"],
                        "ratio_writes_per_s": r["ratio_writes_per_s"]})
                })
                .collect();
            let mig = migration_scenario(10)?;
            let migration = json!({"live_move_median_ms": mig["live_move_ms"]["median_ms"],
                "live_job_median_ms": mig["live_job_ms"]["median_ms"], "live_downtime_median_ms": mig["live_downtime_ms"]["median_ms"],
                "flush_4_live_ms": mig["flush_4_live_ms"], "ready_4_live_ms": mig["ready_4_live_ms"],
                "hang_guests": mig["hang_guests"], "hang_median_ms": mig["hang_ms"]["median_ms"], "hang_max_ms": mig["hang_ms"]["max_ms"]});
            let busy = busy::run(600)?;
            let pick = |r: &Value| {
                json!({"primary_drops": r["primary_drops"], "takeovers": r["takeovers"], "lost_verdicts": r["lost_verdicts"],
                    "fence_decisions": r["fence_decisions"], "status_slowest_ms": r["status_slowest_ms"],
                    "hypervisor_hang_median_ms": r["hypervisor_hang"]["median_ms"]})
            };
            let busy = json!({"seconds": 600, "realtime": pick(&busy["realtime"]), "normal": pick(&busy["normal"])});
            let follow = follow::run(herd_binary()?, 1000, 60)?;
            let hypervisors = json!({
                "scale": clients::run(herd_binary()?, 1000, 60, clients::HEARTBEAT_MS, clients::Writes::Maintenance)?,
                "client": hypervisors::run(herd_binary()?, 64, 600, "client")?, // issue 22: ten minutes
                "learner": hypervisors::run(herd_binary()?, 64, 60, "learner")?,
            });
            let latest = json!({ "machine": machine(), "writes": writes, "failover": failover, "heartbeat": heartbeat,
                "connections": conns, "busy": busy, "migration": migration, "follow": follow, "hypervisors": hypervisors });
            std::fs::create_dir_all("docs/bench")?;
            std::fs::write("docs/bench/latest.json", serde_json::to_string_pretty(&latest)?)?;
            println!("wrote docs/bench/latest.json");
            Ok(())
        }
        ["heartbeat"] => rt.block_on(heartbeat(&[10, 100, 1000])).map(|_| ()),
        ["heartbeat", sizes @ ..] => {
            let sizes: Vec<usize> = sizes.iter().map(|s| s.parse()).collect::<Result<_, _>>().context("host counts")?;
            rt.block_on(heartbeat(&sizes)).map(|_| ())
        }
        ["connections"] => connections::run(herd_binary()?, 64, 60).map(|_| ()),
        ["connections", n] => connections::run(herd_binary()?, n.parse().context("hypervisors")?, 60).map(|_| ()),
        ["connections", n, secs] => {
            connections::run(herd_binary()?, n.parse().context("hypervisors")?, secs.parse().context("seconds")?)
                .map(|_| ())
        }
        ["hypervisors"] => hypervisors::run(herd_binary()?, 64, 60, "client").map(|_| ()),
        ["hypervisors", n] => hypervisors::run(herd_binary()?, n.parse().context("hypervisors")?, 60, "client").map(|_| ()),
        ["hypervisors", n, secs] => {
            hypervisors::run(herd_binary()?, n.parse().context("hypervisors")?, secs.parse().context("seconds")?, "client")
                .map(|_| ())
        }
        ["hypervisors", n, secs, membership] => {
            hypervisors::run(herd_binary()?, n.parse().context("hypervisors")?, secs.parse().context("seconds")?, membership)
                .map(|_| ())
        }
        ["clients", rest @ ..] => clients::cli(herd_binary()?, rest).map(|_| ()),
        ["follow"] => follow::run(herd_binary()?, 1000, 60).map(|_| ()),
        ["follow", n] => follow::run(herd_binary()?, n.parse().context("followers")?, 60).map(|_| ()),
        ["follow", n, secs] => {
            follow::run(herd_binary()?, n.parse().context("followers")?, secs.parse().context("seconds")?).map(|_| ())
        }
        ["migration"] => migration_scenario(10).map(|_| ()),
        ["migration", reps] => migration_scenario(reps.parse().context("repetitions")?).map(|_| ()),
        ["busy"] => busy::run(600).map(|_| ()),
        ["busy", secs] => busy::run(secs.parse().context("seconds")?).map(|_| ()),
        // One variant alone, for looking into it (its figures are printed, not recorded).
        ["busy", secs, "rt"] => busy::one(secs.parse().context("seconds")?, true).map(|_| ()),
        ["busy", secs, "normal"] => busy::one(secs.parse().context("seconds")?, false).map(|_| ()),
        ["responders", hosts, port] => rt.block_on(responders(hosts.parse()?, port.parse()?)),
        _ => bail!(
            "usage: herd-bench heartbeat [HOSTS...] | failover [REPS] | writes [SECONDS] | connections [N] [SECONDS] | busy [SECONDS [rt|normal]] | migration [REPS] | follow [FOLLOWERS] [SECONDS] | clients [N] [SECONDS] [HEARTBEAT_MS] [maintenance|vms] | hypervisors [N] [SECONDS] [learner|client] | all"
        ),
    }
}
