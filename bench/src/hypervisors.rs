//! `herd-bench hypervisors [N] [SECONDS] [learner|client]`: what N real hypervisor daemons cost
//! the coordinators, as Raft learners or as clients outside Raft (issue 22).
//!
//! 3 coordinators (127.0.16.1-3) and N hypervisors (127.0.19.1 on; default 64), all release
//! daemons on loopback without libvirt, each hypervisor with `[cluster] membership` as given
//! (default `client`). Each join's time is measured (one after another, through c1). Then, over
//! SECONDS (default 60) of 10 writes per second through the leader's admin socket (maintenance
//! on, off, …): each write's time, the coordinators' CPU, the hypervisors' CPU, elections
//! (term changes) and the oldest hypervisor keepalive the leader shows (sampled every second);
//! before that, 30 s without writes measure what the daemons cost idle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::failover::{admin, admin_within, wait};
use crate::follow::{cluster, percentile, socket, ten_writes_a_second};
use crate::procs::CpuMark;

/// The quiet phase before the writes: what the daemons cost doing nothing but their own work.
const IDLE: Duration = Duration::from_secs(30);

fn hv_addr(k: usize) -> String {
    format!("127.0.19.{k}")
}

fn hv_config(d: &Path, k: usize, membership: &str) -> String {
    format!(
        "name = \"h{k}\"\nrole = \"hypervisor\"\ndata_dir = \"{d}/data\"\nadmin_socket = \"{d}/admin.sock\"\n\
         [cluster]\nlisten = \"{a}:7400\"\nmembership = \"{membership}\"\n",
        d = d.display(),
        a = hv_addr(k),
    )
}

/// What the leader's status says of the hypervisors.
pub struct Sample {
    /// How many are in `run`.
    pub running: usize,
    /// The oldest keepalive of record among them.
    pub keepalive_ms: u64,
    /// The longest any went unheard: a client's, since any coordinator last heard its
    /// session; a learner's, its keepalive.
    pub heard_ms: u64,
    /// The oldest figures the leader holds of any (`stats_age_ms`: a client's ride on its
    /// session and are relayed to the leader).
    pub stats_ms: u64,
    /// The leader's term.
    pub term: u64,
}

/// Samples the status of the leader at `sock`.
pub fn sample(sock: &Path) -> Result<Sample> {
    let s = admin(sock, &json!({"op": "status"}))?;
    let members = s["members"].as_array().cloned().unwrap_or_default();
    let hvs: Vec<&Value> = members.iter().filter(|m| m["role"] == "hypervisor").collect();
    let oldest = |f: &dyn Fn(&Value) -> Option<u64>| hvs.iter().filter_map(|m| f(m)).max().unwrap_or(0);
    Ok(Sample {
        running: hvs.iter().filter(|m| m["daemon_state"] == "run").count(),
        keepalive_ms: oldest(&|m| m["last_keepalive_age_ms"].as_u64()),
        heard_ms: oldest(&|m| m["last_heard_age_ms"].as_u64().or_else(|| m["last_keepalive_age_ms"].as_u64())),
        stats_ms: oldest(&|m| m["stats_age_ms"].as_u64()),
        term: s["term"].as_u64().unwrap_or(0),
    })
}

pub fn run(herd: PathBuf, n: usize, seconds: u64, membership: &str) -> Result<Value> {
    anyhow::ensure!(matches!(membership, "learner" | "client"), "membership: learner or client");
    anyhow::ensure!((1..=250).contains(&n), "1 to 250 hypervisors");
    let (mut p, _cluster_id, _ids, li) = cluster(&herd, &format!("hypervisors-{membership}"))?;
    let c1 = socket(&p.dir, 1);
    let created = admin(&c1, &json!({"op": "token-create", "uses": n}))?;
    let token = created["token"].as_str().context("a join token")?.to_string();
    let mut joins = Vec::new();
    for k in 1..=n {
        let d = p.dir.join(format!("h{k}"));
        std::fs::create_dir_all(&d)?;
        p.start_herd(&herd, &d, &hv_config(&d, k, membership))?;
        let req = json!({"op": "join-cluster", "peer": "127.0.16.1:7400", "token": token});
        let t = Instant::now();
        admin_within(&d.join("admin.sock"), &req, Duration::from_secs(120)).with_context(|| format!("h{k} joins"))?;
        joins.push(t.elapsed());
    }
    let leader_sock = socket(&p.dir, li);
    wait("every hypervisor in run", Duration::from_secs(120), || Ok(sample(&leader_sock)?.running == n))?;
    eprintln!("{n} hypervisors ({membership}) joined; last join {} ms", joins.last().map_or(0, Duration::as_millis));

    let pids: Vec<u32> = p.children.iter().map(std::process::Child::id).collect();
    // Idle first: no writes but the daemons' own (keepalives), for IDLE.
    let quiet = CpuMark::now(&pids)?;
    std::thread::sleep(IDLE);
    let (idle, idle_window) = quiet.percent()?;
    let busy = CpuMark::now(&pids)?;
    let (mut oldest, mut unheard, mut stats, mut terms, mut next_sample) =
        (0u64, 0u64, 0u64, Vec::new(), Instant::now());
    let mut writes = ten_writes_a_second(&leader_sock, seconds, |_| {
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            let s = sample(&leader_sock)?;
            oldest = oldest.max(s.keepalive_ms);
            unheard = unheard.max(s.heard_ms);
            stats = stats.max(s.stats_ms);
            terms.push(s.term);
        }
        Ok(())
    })?;
    let (cpu, window) = busy.percent()?;
    admin(&leader_sock, &json!({"op": "maintenance", "on": false}))?;
    writes.sort();
    let mut sorted_joins = joins.clone();
    sorted_joins.sort();
    let hv_cpu = &cpu[3..];
    let elections = terms.windows(2).filter(|w| w[1] != w[0]).count();
    let out = json!({
        "scenario": "hypervisors",
        "membership": membership,
        "hypervisors": n,
        "window_s": window,
        "join_ms": {"p50": percentile(&sorted_joins, 50), "max": percentile(&sorted_joins, 100),
                    "last": joins.last().map_or(0, Duration::as_millis)},
        "writes_per_s": writes.len() as f64 / window,
        "write_ms": {"p50": percentile(&writes, 50), "p99": percentile(&writes, 99), "max": percentile(&writes, 100)},
        "leader": format!("c{li}"),
        "coordinator_cpu_percent_of_one_core": &cpu[..3],
        "hypervisor_cpu_percent_each": {"mean": hv_cpu.iter().sum::<f64>() / n as f64,
                                        "max": hv_cpu.iter().copied().fold(0.0, f64::max)},
        "elections_in_window": elections,
        "idle": {"seconds": idle_window, "coordinator_cpu_percent_of_one_core": &idle[..3],
                 "hypervisor_cpu_percent_each": {"mean": idle[3..].iter().sum::<f64>() / n as f64,
                                                 "max": idle[3..].iter().copied().fold(0.0, f64::max)}},
        "oldest_keepalive_ms": oldest,
        "oldest_heard_ms": unheard,
        "oldest_stats_ms": stats,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(out)
}
