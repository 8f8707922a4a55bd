//! `herd-bench follow [FOLLOWERS] [SECONDS]`: what following the state outside Raft costs the
//! coordinators (issue 22; `docs/design/hypervisors-as-clients.md`).
//!
//! 3 coordinators (127.0.16.1-3, release daemons on loopback) and FOLLOWERS (default 1000)
//! `Session`s — the real client code, all in this process on a 2-thread runtime, each with its
//! own mutual-TLS connection, from an address of its own (127.0.17.1 on), to a coordinator it
//! picks at random (they share one member's certificate). Measured: how long until every
//! session holds the whole state; then, over SECONDS (default 60) of 10 writes per second
//! through the leader's admin socket (maintenance on, off, …), each write's time and the time
//! until every session has applied it (fan-out), the coordinators' CPU and this process's CPU
//! per session; then one follower-serving coordinator is killed and the time until its
//! sessions moved on and caught up is measured. Not yet measured: heartbeat responders
//! beside the sessions, and sessions that write (both later slices of issue 22).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use herd_raft::follow::{Session, SessionSettings, SessionStatus};
use herd_raft::tls::{Pki, TlsConnector};
use herd_raft::transport::TcpFromConnector;
use herd_storage::sm::StateView;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::failover::{admin, admin_within, wait};
use crate::procs::{cpu_seconds, CpuMark, Procs};

fn addr(i: usize) -> String {
    format!("127.0.16.{i}")
}

pub(crate) fn socket(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("c{i}")).join("admin.sock")
}

fn start(p: &mut Procs, herd: &Path, i: usize, extra: &str) -> Result<()> {
    let d = p.dir.join(format!("c{i}"));
    std::fs::create_dir_all(&d)?;
    let config = format!(
        "name = \"c{i}\"\nrole = \"coordinator\"\ndata_dir = \"{d}/data\"\nadmin_socket = \"{d}/admin.sock\"\n\
         [cluster]\nlisten = \"{a}:7400\"\n[limits]\nmax_cluster_connections = 4096\n{extra}",
        d = d.display(),
        a = addr(i),
    );
    p.start_herd(herd, &d, &config)
}

pub(crate) fn percentile(sorted: &[Duration], p: usize) -> u128 {
    sorted.get((sorted.len() * p).div_ceil(100).saturating_sub(1)).map_or(0, Duration::as_millis)
}

/// The followers: their views and statuses, and what stops them.
struct Followers {
    views: Vec<StateView>,
    status: Vec<watch::Receiver<SessionStatus>>,
    stop: watch::Sender<bool>,
}

impl Followers {
    fn spawn(rt: &tokio::runtime::Runtime, n: usize, pki: Arc<Pki>, cluster_id: &str, ids: &[u64]) -> Followers {
        let (stop, stopped) = watch::channel(false);
        let seeds: Vec<(u64, String)> =
            ids.iter().enumerate().map(|(k, id)| (*id, format!("{}:7400", addr(k + 1)))).collect();
        let (mut views, mut status) = (Vec::new(), Vec::new());
        for k in 0..n {
            // Each from an address of its own, as hypervisors are (the port caps connections
            // per source host): 127.0.17.1 on.
            let from = std::net::Ipv4Addr::new(127, 0, u8::try_from(17 + k / 250).unwrap_or(255), 1 + (k % 250) as u8);
            let inner = Arc::new(TcpFromConnector(from.into()));
            let connector = Arc::new(TlsConnector { inner, pki: pki.clone() });
            let s = Session::new(connector, cluster_id.to_string(), ids[2], seeds.clone(), SessionSettings::default());
            views.push(s.view());
            status.push(s.status());
            rt.spawn(s.run(stopped.clone()));
        }
        Followers { views, status, stop }
    }

    /// How many have applied `index`.
    fn at(&self, index: u64) -> usize {
        self.views.iter().filter(|v| *v.subscribe().borrow() >= index).count()
    }

    /// Waits until every follower has applied `index`; the time it took.
    fn all_at(&self, index: u64, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        while self.at(index) < self.views.len() {
            if t.elapsed() > timeout {
                let behind: Vec<String> = (self.views.iter().zip(&self.status))
                    .filter(|(v, _)| *v.subscribe().borrow() < index)
                    .take(3)
                    .map(|(v, s)| format!("at {}: {:?}", *v.subscribe().borrow(), *s.borrow()))
                    .collect();
                anyhow::bail!(
                    "{} of {} followers at index {index} after {timeout:?}; behind: {behind:?}",
                    self.at(index),
                    self.views.len()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(t.elapsed())
    }

    /// How many follow coordinator `id` now.
    fn on(&self, id: u64) -> usize {
        self.status.iter().filter(|s| s.borrow().coordinator.as_ref().is_some_and(|(c, _)| *c == id)).count()
    }
}

/// Writes through the admin socket `sock` ten times a second for `seconds` (maintenance on,
/// off, …), calling `after` after each write with the moment it started; returns each write's
/// time.
pub(crate) fn ten_writes_a_second(
    sock: &Path,
    seconds: u64,
    after: impl FnMut(Instant) -> Result<()>,
) -> Result<Vec<Duration>> {
    ten_writes_a_second_of(sock, seconds, |i| json!({"op": "maintenance", "on": i % 2 == 0}), after)
}

/// [`ten_writes_a_second`], the `i`th write being the admin request `write(i)`.
pub(crate) fn ten_writes_a_second_of(
    sock: &Path,
    seconds: u64,
    write: impl Fn(usize) -> serde_json::Value,
    mut after: impl FnMut(Instant) -> Result<()>,
) -> Result<Vec<Duration>> {
    let t0 = Instant::now();
    let mut writes = Vec::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        let due = t0 + Duration::from_millis(100) * u32::try_from(writes.len()).unwrap_or(u32::MAX);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let w = Instant::now();
        admin(sock, &write(writes.len()))?;
        writes.push(w.elapsed());
        after(w)?;
    }
    Ok(writes)
}

pub(crate) fn applied(sock: &Path) -> Result<u64> {
    admin(sock, &json!({"op": "status"}))?["applied_index"].as_u64().context("applied_index")
}

/// The cluster of 3 coordinators, formed (in a directory named after `scenario`): (procs,
/// cluster id, ids of c1..c3, the leader's number).
pub(crate) fn cluster(herd: &Path, scenario: &str) -> Result<(Procs, String, Vec<u64>, usize)> {
    cluster_with(herd, scenario, "")
}

/// [`cluster`], with `extra` appended to each coordinator's config.
pub(crate) fn cluster_with(herd: &Path, scenario: &str, extra: &str) -> Result<(Procs, String, Vec<u64>, usize)> {
    let dir = std::env::temp_dir().join(format!("herd-bench-{scenario}-{}", std::process::id()));
    let mut p = Procs { dir, children: Vec::new() };
    for i in 1..=3 {
        start(&mut p, herd, i, extra)?;
    }
    let init = admin(&socket(&p.dir, 1), &json!({"op": "init-cluster"}))?;
    let token = init["token"].as_str().context("token")?.to_string();
    for i in 2..=3 {
        let req = json!({"op": "join-cluster", "peer": format!("{}:7400", addr(1)), "token": token});
        admin_within(&socket(&p.dir, i), &req, Duration::from_secs(60)).with_context(|| format!("c{i} joins"))?;
    }
    let sock = socket(&p.dir, 1);
    wait("3 coordinators in run", Duration::from_secs(60), || {
        let s = admin(&sock, &json!({"op": "status"}))?;
        let m = s["members"].as_array().cloned().unwrap_or_default();
        Ok(m.len() == 3 && m.iter().all(|x| x["daemon_state"] == "run"))
    })?;
    let s = admin(&sock, &json!({"op": "status"}))?;
    let id = |n: &str| {
        s["members"].as_array().and_then(|m| m.iter().find(|x| x["name"] == n)).and_then(|x| x["id"].as_u64())
    };
    let ids: Vec<u64> = (1..=3).map(|i| id(&format!("c{i}")).context("member id")).collect::<Result<_>>()?;
    let leader = s["leader"].as_str().context("a leader")?;
    let li = (1..=3).find(|i| format!("c{i}") == leader).context("the leader is a coordinator")?;
    Ok((p, s["cluster_id"].as_str().context("cluster id")?.to_string(), ids, li))
}

pub fn run(herd: PathBuf, followers: usize, seconds: u64) -> Result<Value> {
    let (p, cluster_id, ids, li) = cluster(&herd, "follow")?;
    let tls = p.dir.join("follower-tls");
    std::fs::create_dir_all(&tls)?;
    std::fs::set_permissions(&tls, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    for f in ["ca.crt", "node.crt", "node.key"] {
        std::fs::copy(p.dir.join("c3/data/tls").join(f), tls.join(f)).with_context(|| format!("copy {f}"))?;
    }
    let pki = Arc::new(Pki::open(tls).context("the followers' credentials")?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let leader_sock = socket(&p.dir, li);

    let t = Instant::now();
    let f = Followers::spawn(&rt, followers, pki, &cluster_id, &ids);
    f.all_at(applied(&leader_sock)?, Duration::from_secs(60))?;
    let bootstrap = t.elapsed();
    let spread: Vec<usize> = ids.iter().map(|id| f.on(*id)).collect();
    let moves = || f.status.iter().map(|s| s.borrow().moves).sum::<u64>();
    // Moves while 1000 sessions handshake at once (a coordinator slow to answer is left).
    let moves_at_bootstrap = moves();
    eprintln!("{followers} followers hold the state after {} ms; per coordinator {spread:?}", bootstrap.as_millis());

    let pids: Vec<u32> = p.children.iter().map(std::process::Child::id).collect();
    let mark = CpuMark::now(&pids)?;
    let me0 = cpu_seconds(None)?;
    let mut fanout = Vec::new();
    let mut writes = ten_writes_a_second(&leader_sock, seconds, |w| {
        let index = applied(&leader_sock)?;
        fanout.push(w.elapsed() + f.all_at(index, Duration::from_secs(30))?);
        Ok(())
    })?;
    let (cpu, window) = mark.percent()?;
    let me = 100.0 * (cpu_seconds(None)? - me0) / window;
    writes.sort();
    fanout.sort();
    let moves_before = moves();

    // One coordinator that is not the leader killed: its followers move on and catch up.
    let victim = (1..=3).find(|i| *i != li).context("a follower")?;
    let on_victim = f.on(ids[victim - 1]);
    let mut p = p;
    let _ = p.children[victim - 1].kill();
    let _ = p.children[victim - 1].wait();
    let k = Instant::now();
    admin(&leader_sock, &json!({"op": "maintenance", "on": false}))?;
    f.all_at(applied(&leader_sock)?, Duration::from_secs(120))?;
    let moved = k.elapsed();
    let moves_at_kill = moves() - moves_before;
    f.stop.send_replace(true);
    rt.shutdown_timeout(Duration::from_secs(5));

    let out = json!({
        "scenario": "follow",
        "followers": followers,
        "window_s": window,
        "bootstrap_ms": bootstrap.as_millis(),
        "followers_per_coordinator": spread,
        "writes_per_s": writes.len() as f64 / window,
        "write_ms": {"p50": percentile(&writes, 50), "p99": percentile(&writes, 99), "max": percentile(&writes, 100)},
        "fanout_ms": {"p50": percentile(&fanout, 50), "p99": percentile(&fanout, 99), "max": percentile(&fanout, 100)},
        "coordinator_cpu_percent_of_one_core": cpu,
        "leader": format!("c{li}"),
        "follower_process_cpu_percent": me,
        "follower_cpu_percent_each": me / followers as f64,
        "failover": {"killed": format!("c{victim}"), "its_followers": on_victim, "moves": moves_at_kill,
                     "all_caught_up_ms": moved.as_millis()},
        "session_moves_at_bootstrap": moves_at_bootstrap,
        "session_moves_in_the_window": moves_before - moves_at_bootstrap,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(out)
}
