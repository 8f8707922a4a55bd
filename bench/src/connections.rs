//! `herd-bench connections [HYPERVISORS] [SECONDS]`: new cluster connections per second at the
//! leader in the steady state of a large cluster.
//!
//! 3 coordinators (127.0.13.1-3) and HYPERVISORS (default 64) hypervisors (127.0.14.x, 127.0.15.x,
//! libvirt's test driver), release daemons on loopback, all of them Raft members, so the
//! leader replicates (and heartbeats) to every one. Once every member is `run`, the leader's
//! `herd_cluster_connections_total{peer="member"}` is read before and after a window of
//! SECONDS (default 60): every late heartbeat that tore its connection down used to cost a new
//! TCP and TLS handshake here. Also reported: the leader's CPU over the window.
//! `HERD_BENCH_KEEP=1` keeps the nodes' directories (logs) in the temporary directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::failover::{admin, admin_within, wait};
use crate::procs::{cpu_seconds, Procs};

fn addr(i: usize) -> String {
    if i <= 3 {
        format!("127.0.13.{i}")
    } else {
        format!("127.0.{}.{}", 14 + (i - 4) / 200, 1 + (i - 4) % 200)
    }
}

fn name(i: usize) -> String {
    if i <= 3 {
        format!("c{i}")
    } else {
        format!("hv{}", i - 3)
    }
}

fn socket(dir: &Path, i: usize) -> PathBuf {
    dir.join(name(i)).join("admin.sock")
}

fn start(p: &mut Procs, herd: &Path, i: usize) -> Result<()> {
    let d = p.dir.join(name(i));
    std::fs::create_dir_all(&d)?;
    let role = if i <= 3 { "coordinator" } else { "hypervisor" };
    let metrics = if i <= 3 { format!("[metrics]\nlisten = \"{}:9400\"\n", addr(i)) } else { String::new() };
    std::fs::write(
        d.join("node.xml"),
        "<?xml version=\"1.0\"?>\n<node><cpu><mhz>2400</mhz><model>x86_64</model><active>8</active><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads></cpu><memory>16777216</memory></node>\n",
    )?;
    let config = format!(
        "name = \"{n}\"\nrole = \"{role}\"\ndata_dir = \"{d}/data\"\nadmin_socket = \"{d}/admin.sock\"\n\
         [cluster]\nlisten = \"{a}:7400\"\n[hypervisor]\nuri = \"test://{d}/node.xml\"\n{metrics}",
        n = name(i),
        d = d.display(),
        a = addr(i),
    );
    p.start_herd(herd, &d, &config)
}

/// `GET /metrics` from `addr`.
fn scrape(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: herd\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn member_connections(addr: &str) -> Result<f64> {
    let m = scrape(addr)?;
    m.lines()
        .find_map(|l| {
            l.strip_prefix("herd_cluster_connections_total{peer=\"member\"} ").and_then(|v| v.trim().parse().ok())
        })
        .context("no herd_cluster_connections_total in the scrape")
}

pub fn run(herd: PathBuf, hypervisors: usize, seconds: u64) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("herd-bench-conns-{}", std::process::id()));
    let mut p = Procs { dir, children: Vec::new() };
    let total = 3 + hypervisors;
    for i in 1..=3 {
        start(&mut p, &herd, i)?;
    }
    let init = admin(&socket(&p.dir, 1), &json!({"op": "init-cluster"}))?;
    let token = init["token"].as_str().context("token")?.to_string();
    let peer = format!("{}:7400", addr(1));
    for i in 2..=total {
        if i > 3 {
            start(&mut p, &herd, i)?;
        }
        let req = json!({"op": "join-cluster", "peer": peer, "token": token});
        let t = Instant::now();
        admin_within(&socket(&p.dir, i), &req, Duration::from_secs(120))
            .with_context(|| format!("{} joins", name(i)))?;
        eprintln!("{} joined in {} ms", name(i), t.elapsed().as_millis());
    }
    let sock = socket(&p.dir, 1);
    wait("every member in run", Duration::from_secs(300), || {
        let s = admin(&sock, &json!({"op": "status"}))?;
        let m = s["members"].as_array().cloned().unwrap_or_default();
        Ok(m.len() == total && m.iter().all(|x| x["daemon_state"] == "run"))
    })?;
    let status = admin(&sock, &json!({"op": "status"}))?;
    let leader = status["leader"].as_str().context("a leader")?.to_string();
    let li = (1..=3).find(|i| name(*i) == leader).context("the leader is a coordinator")?;
    let metrics = format!("{}:9400", addr(li));
    let pid = p.children[li - 1].id();
    // Settle: the joins' own connections are not the steady state.
    std::thread::sleep(Duration::from_secs(10));
    let (c0, cpu0, t0) = (member_connections(&metrics)?, cpu_seconds(Some(pid))?, Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (c1, cpu1, window) = (member_connections(&metrics)?, cpu_seconds(Some(pid))?, t0.elapsed().as_secs_f64());
    let out = json!({
        "scenario": "connections",
        "hypervisors": hypervisors,
        "window_s": window,
        "new_member_connections_per_s_at_leader": (c1 - c0) / window,
        "leader_cpu_percent_of_one_core": 100.0 * (cpu1 - cpu0) / window,
        "target": "new cluster connections per second at the leader below 1 (issue 18)",
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(out)
}
