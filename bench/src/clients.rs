//! `herd-bench clients [N] [SECONDS]`: the scale step of issue 22 — 3 coordinator daemons and N
//! (default 1000) hypervisors outside Raft.
//!
//! The coordinators are release daemons on loopback (127.0.16.1-3). The hypervisors are the
//! real client code, all in this process on a 2-thread runtime: each a `ClusterNode` (in-memory
//! store) that joins with the token (its key made here, its certificate signed by the leader),
//! follows the state through its session, writes its heartbeat addresses and `run` through the
//! leader as a hypervisor daemon does, reports figures on its polls (the coordinators write its
//! keepalives), and answers the coordinators' heartbeat pulses with the real heartbeat agent,
//! each from an address of its own (127.0.20.1 on). Measured: each join's time; then over
//! SECONDS (default 60) of 10 writes per second through the leader's admin socket, each write's
//! time and how long until every hypervisor's state held it (a change that does not concern a
//! session may wait out `follow::LINGER`), the coordinators' CPU, this process's CPU, the bytes
//! the coordinators served the sessions, elections, the oldest keepalive and how many
//! hypervisors the coordinators' heartbeat lost; then the join of one more hypervisor, a
//! real daemon process, at N.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use herd::heartbeat::agent::{Agent, Target};
use herd::heartbeat::Params;
use herd_raft::network::Limits;
use herd_raft::tls::{Pki, TlsConnector};
use herd_raft::transport::TcpFromConnector;
use herd_raft::{ClusterNode, NodeSettings};
use herd_storage::identity::MemIdentity;
use herd_storage::mem_store::{MemBackend, MemLogStore};
use herd_storage::model::{Command, DaemonState, NodeStats, Op, Role};
use herd_storage::sm::StateView;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::failover::{admin, admin_within, wait};
use crate::follow::{cluster_with, percentile, socket, ten_writes_a_second_of};
use crate::hypervisors::sample;
use crate::procs::{cpu_seconds, CpuMark};

/// The heartbeat interval the scale step runs at by default (`[heartbeat] interval_ms`; the
/// product's default is 100). 1000 hosts answering 3 coordinators every 100 ms are 30 000
/// answers a second, which the responders in this process cannot send on the same 2 cores as
/// the coordinators: tried, the heartbeat collapsed (hundreds of hosts lost, MNFA entered and
/// left every few hundred ms) and what was measured was the machine. At 500 ms the
/// coordinators still pulse 2 000 hosts a second each.
pub const HEARTBEAT_MS: u64 = 500;

/// The simulated hypervisors' addresses: 127.0.20.1 on, 250 per /24.
fn sim_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, u8::try_from(20 + k / 250).unwrap_or(255), 1 + (k % 250) as u8)
}

/// One simulated hypervisor: its node (session and leader link) and its heartbeat responder.
struct SimHypervisor {
    _node: Arc<ClusterNode<MemLogStore>>,
    _agent: Arc<Agent>,
    /// Its followed state.
    view: StateView,
}

/// Joins simulated hypervisor `k` with `token`, as a daemon would: join, heartbeat agent, `run`.
async fn join(dir: &Path, k: usize, token: &str, hb: &Params, stop: watch::Receiver<bool>) -> Result<SimHypervisor> {
    let name = format!("s{k}");
    let ip = sim_ip(k);
    let tls = dir.join(&name);
    std::fs::create_dir_all(&tls)?;
    std::fs::set_permissions(&tls, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let pki = Arc::new(Pki::open(tls).context("a fresh PKI directory")?);
    let connector = Arc::new(TlsConnector { inner: Arc::new(TcpFromConnector(ip.into())), pki: pki.clone() });
    let raft = herd::config::RaftSection::default();
    let settings = NodeSettings {
        name: name.clone(),
        role: Role::Hypervisor,
        advertise: format!("{ip}:7400"),
        heartbeat_ms: raft.heartbeat_ms,
        election_timeout_ms: (raft.election_timeout_ms[0], raft.election_timeout_ms[1]),
        limits: Limits::default(),
        client: true,
    };
    let node = ClusterNode::new(
        settings,
        connector,
        MemLogStore::new(),
        Arc::new(MemBackend::new()),
        Arc::new(MemIdentity::default()),
    );
    node.set_pki(pki.clone());
    node.join_cluster("127.0.16.1:7400", token, Duration::from_secs(30))
        .await
        .with_context(|| format!("{name} joins"))?;
    let local = node.local().context("a client after its join")?;
    let nets: BTreeMap<String, SocketAddr> = [("mgmt".to_string(), SocketAddr::new(ip.into(), 7401))].into();
    let (agent, _notices) = Agent::bind(&name, Role::Hypervisor, hb.clone(), &nets).await?;
    agent.set_key(pki.heartbeat_key());
    agent.set_identity(local.id, &local.cluster_id);
    agent.spawn(stop);
    if let Some(client) = node.session() {
        client.report(NodeStats { cpu_count: 32, mem_total_mib: 65_536, mem_used_mib: 4_096, ..NodeStats::default() });
    }
    let id = Some(local.id);
    let addrs: BTreeMap<String, String> = nets.iter().map(|(n, a)| (n.clone(), a.to_string())).collect();
    // A daemon writes these in one request (with its fence policy). Here they go one by one:
    // a request of several ops makes every copy of the state (each of the N here) back up its
    // node records before it applies — O(N) each, O(N²) in this process per join, which
    // would measure this process rather than the coordinators.
    let writes: [Op; 2] = [
        Command::SetHeartbeatAddrs { name: name.clone(), addrs, node_id: id }.into(),
        Command::SetDaemonState { name: name.clone(), state: DaemonState::Run, return_by_ms: None, node_id: id }.into(),
    ];
    let mut index = 0;
    for w in writes {
        index =
            node.write_indexed(vec![w], Duration::from_secs(30)).await.with_context(|| format!("{name} writes run"))?.0;
    }
    // The coordinators to answer, from the followed state once it holds this write.
    let mut applied = local.view.subscribe();
    tokio::time::timeout(Duration::from_secs(30), applied.wait_for(|i| *i >= index))
        .await
        .with_context(|| format!("{name}'s state reaches its own run"))??;
    let coordinators: Vec<Target> = {
        let g = local.view.read();
        g.state.nodes.values().filter(|n| n.role == Role::Coordinator).map(Target::of).collect()
    };
    agent.set_targets(coordinators);
    Ok(SimHypervisor { _node: node, _agent: agent, view: local.view.clone() })
}

/// Per coordinator: answers and bytes it served its followers so far, clients' figures it took
/// from the others for the leader's aggregate (`status.followers`).
type Served = Vec<(u64, u64, u64)>;

/// [`Served`], and the highest applied index.
fn served(dir: &Path) -> Result<(Served, u64)> {
    let mut index = 0;
    let counts = (1..=3)
        .map(|i| {
            let s = admin(&socket(dir, i), &json!({"op": "status"}))?;
            index = index.max(s["applied_index"].as_u64().unwrap_or(0));
            let f = &s["followers"];
            let count = |k: &str| f[k].as_u64().unwrap_or(0);
            Ok((count("served_answers"), count("served_bytes"), count("figures_taken")))
        })
        .collect::<Result<_>>()?;
    Ok((counts, index))
}

/// Links a coordinator's own heartbeat view shows lost.
fn lost_links(sock: &Path) -> Result<usize> {
    let h = admin(sock, &json!({"op": "heartbeat"}))?;
    let nets = h["own_view"]["nets"].as_array().cloned().unwrap_or_default();
    Ok(nets
        .iter()
        .flat_map(|n| n["hosts"].as_array().cloned().unwrap_or_default())
        .filter(|x| x["state"] == "lost")
        .count())
}

/// Samples every 5 ms, on a thread of its own, the lowest applied index of `views` until `stop`:
/// each rise, with when it was seen.
fn lowest_applied(views: Vec<StateView>, stop: watch::Receiver<bool>) -> std::thread::JoinHandle<Vec<(u64, Instant)>> {
    std::thread::spawn(move || {
        let mut rises: Vec<(u64, Instant)> = Vec::new();
        while !*stop.borrow() {
            let low = views.iter().map(|v| *v.subscribe().borrow()).min().unwrap_or(0);
            if rises.last().is_none_or(|(l, _)| low > *l) {
                rises.push((low, Instant::now()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        rises
    })
}

/// For each write (the leader's applied index once it returned, and when): how long until
/// every simulated hypervisor had applied it, sorted (writes never seen by all are left out).
fn seen_by_all(writes: &[(u64, Instant)], rises: &[(u64, Instant)]) -> Vec<Duration> {
    let mut out: Vec<Duration> = writes
        .iter()
        .filter_map(|(index, done)| {
            rises.iter().find(|(low, _)| low >= index).map(|(_, at)| at.saturating_duration_since(*done))
        })
        .collect();
    out.sort();
    out
}

/// One more hypervisor, a real daemon process, joins the cluster: how long its join took.
fn join_daemon(p: &mut crate::procs::Procs, herd: &Path, extra: &str, token: &str) -> Result<Duration> {
    let d = p.dir.join("last");
    std::fs::create_dir_all(&d)?;
    let config = format!(
        "name = \"last\"\nrole = \"hypervisor\"\ndata_dir = \"{d}/data\"\nadmin_socket = \"{d}/admin.sock\"\n\
         [cluster]\nlisten = \"127.0.24.1:7400\"\nmembership = \"client\"\n{extra}",
        d = d.display()
    );
    p.start_herd(herd, &d, &config)?;
    let req = json!({"op": "join-cluster", "peer": "127.0.16.1:7400", "token": token});
    let t = Instant::now();
    admin_within(&d.join("admin.sock"), &req, Duration::from_secs(60)).context("the last hypervisor joins")?;
    Ok(t.elapsed())
}

/// `n` simulated hypervisors join one after the other: each, and how long its join took.
fn join_all(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    n: usize,
    token: &str,
    hb: &Params,
    stopped: &watch::Receiver<bool>,
) -> Result<(Vec<SimHypervisor>, Vec<Duration>)> {
    let (mut sims, mut joins) = (Vec::new(), Vec::new());
    for k in 0..n {
        let t = Instant::now();
        sims.push(rt.block_on(join(dir, k, token, hb, stopped.clone()))?);
        joins.push(t.elapsed());
        if (k + 1) % 100 == 0 {
            eprintln!("{} joined; the last in {} ms", k + 1, t.elapsed().as_millis());
        }
    }
    Ok((sims, joins))
}

/// `clients [N] [SECONDS] [HEARTBEAT_MS]`, with defaults 1000, 60 and [`HEARTBEAT_MS`].
pub fn cli(herd: PathBuf, args: &[&str]) -> Result<Value> {
    const USAGE: &str = "usage: clients [N] [SECONDS] [HEARTBEAT_MS] [maintenance|vms]";
    anyhow::ensure!(args.len() <= 4, USAGE);
    let arg = |k: usize, default: u64, what: &str| -> Result<u64> {
        args.get(k).map_or(Ok(default), |a| a.parse().with_context(|| what.to_string()))
    };
    let n = usize::try_from(arg(0, 1000, "hypervisors")?)?;
    let writes = match args.get(3).copied() {
        None | Some("maintenance") => Writes::Maintenance,
        Some("vms") => Writes::VmStates,
        Some(other) => anyhow::bail!("{other:?}: {USAGE}"),
    };
    run(herd, n, arg(1, 60, "seconds")?, arg(2, HEARTBEAT_MS, "heartbeat interval (ms)")?, writes)
}

/// What the window's writes change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    /// The maintenance flag, on and off: the cluster's meta, every client's business a
    /// moment later.
    Maintenance,
    /// A VM's state, stop and start, over [`VMS`] VMs each on a hypervisor of its own: one
    /// hypervisor's business (the others get an outline only when a VM changes node).
    VmStates,
}

/// VMs defined for [`Writes::VmStates`], `b0` on `s0` and on.
const VMS: usize = 100;

/// A domain XML of the size a real one has (some 1.5 KB: disk, network, console, devices).
fn domain_xml(k: usize) -> String {
    format!(
        "<domain type='kvm'><name>b{k}</name><uuid>00000000-0000-4000-8000-{k:012}</uuid>\
         <memory unit='MiB'>512</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type>\
         <boot dev='hd'/></os><features><acpi/><apic/></features><cpu mode='host-passthrough'/>\
         <clock offset='utc'/><on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>\
         <on_crash>destroy</on_crash><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none' io='native'/>\
         <source file='/var/lib/herd/images/b{k}.qcow2'/><target dev='vda' bus='virtio'/></disk>\
         <interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>\
         <serial type='pty'><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>\
         <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
         <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/><video><model type='virtio'/></video>\
         <memballoon model='virtio'/><rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\
         </devices></domain>"
    )
}

/// What the window writes, as the admin request of the `i`th write; for [`Writes::VmStates`]
/// its VMs defined first (how many).
fn writes(sock: &Path, what: Writes, n: usize) -> Result<(usize, impl Fn(usize) -> Value)> {
    let vms = if what == Writes::VmStates { VMS.min(n) } else { 0 };
    for k in 0..vms {
        admin(sock, &json!({"op": "vm-define", "xml": domain_xml(k), "node": format!("s{k}")}))
            .with_context(|| format!("vm b{k} defined on s{k}"))?;
    }
    let write = move |i: usize| match what {
        Writes::Maintenance => json!({"op": "maintenance", "on": i.is_multiple_of(2)}),
        // b0 stop, b0 start, b1 stop, b1 start, …
        Writes::VmStates => {
            let state = if i.is_multiple_of(2) { "stop" } else { "start" };
            json!({"op": "vm-state", "name": format!("b{}", (i / 2) % vms.max(1)), "state": state})
        }
    };
    Ok((vms, write))
}

pub fn run(herd: PathBuf, n: usize, seconds: u64, heartbeat_ms: u64, what: Writes) -> Result<Value> {
    anyhow::ensure!((1..=2000).contains(&n), "1 to 2000 hypervisors");
    anyhow::ensure!((100..=1000).contains(&heartbeat_ms), "a heartbeat interval of 100 to 1000 ms");
    crate::raise_fd_limit()?;
    let hb = Params { interval_ms: heartbeat_ms, history_ms: (heartbeat_ms * 50).max(5000), ..Params::default() };
    let extra = format!("[heartbeat]\ninterval_ms = {}\nhistory_ms = {}\n", hb.interval_ms, hb.history_ms);
    let (mut p, _cluster_id, _ids, li) = cluster_with(&herd, "clients", &extra)?;
    let c1 = socket(&p.dir, 1);
    let created = admin(&c1, &json!({"op": "token-create", "uses": n + 1}))?;
    let token = created["token"].as_str().context("a join token")?.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (stop, stopped) = watch::channel(false);
    let (sims, joins) = join_all(&rt, &p.dir.join("sims"), n, &token, &hb, &stopped)?;
    let leader_sock = socket(&p.dir, li);
    wait("every hypervisor in run", Duration::from_secs(120), || Ok(sample(&leader_sock)?.running == n))?;

    let (vms, write) = writes(&leader_sock, what, n)?;

    let pids: Vec<u32> = p.children.iter().map(std::process::Child::id).collect();
    let (served0, index0) = served(&p.dir)?;
    let mark = CpuMark::now(&pids)?;
    let me0 = cpu_seconds(None)?;
    let (mut oldest, mut unheard, mut stats, mut terms, mut lost, mut next_sample) =
        (0u64, 0u64, 0u64, Vec::new(), 0usize, Instant::now());
    let (sampling, sampler_stop) = watch::channel(false);
    let sampler = lowest_applied(sims.iter().map(|s| s.view.clone()).collect(), sampler_stop);
    let mut written: Vec<(u64, Instant)> = Vec::new();
    let mut writes = ten_writes_a_second_of(&leader_sock, seconds, write, |_| {
        let done = Instant::now();
        let info = admin(&leader_sock, &json!({"op": "cluster-info", "local": true}))?;
        written.push((info["applied_index"].as_u64().context("applied_index")?, done));
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(5);
            let s = sample(&leader_sock)?;
            oldest = oldest.max(s.keepalive_ms);
            unheard = unheard.max(s.heard_ms);
            stats = stats.max(s.stats_ms);
            terms.push(s.term);
            lost = lost.max(lost_links(&leader_sock)?);
        }
        Ok(())
    })?;
    let (cpu, window) = mark.percent()?;
    // The last writes get a moment to reach every hypervisor.
    std::thread::sleep(Duration::from_secs(1));
    sampling.send_replace(true);
    let fanout = seen_by_all(&written, &sampler.join().map_err(|_| anyhow::anyhow!("the sampler panicked"))?);
    let per_s = |x: u64, y: u64| (x.saturating_sub(y) as f64 / window) as u64;
    let (served1, index1) = served(&p.dir)?;
    let answers_per_s: Vec<u64> = served1.iter().zip(&served0).map(|(b, a)| per_s(b.0, a.0)).collect();
    let served_per_s: Vec<u64> = served1.iter().zip(&served0).map(|(b, a)| per_s(b.1, a.1)).collect();
    let relayed: u64 = served1.iter().zip(&served0).map(|(b, a)| b.2.saturating_sub(a.2)).sum();
    let entries_per_s = index1.saturating_sub(index0) as f64 / window;
    let me = 100.0 * (cpu_seconds(None)? - me0) / window;
    admin(&leader_sock, &json!({"op": "maintenance", "on": false}))?;
    writes.sort();

    let last_join = join_daemon(&mut p, &herd, &extra, &token)?;
    stop.send_replace(true);
    drop(sims);
    rt.shutdown_timeout(Duration::from_secs(5));

    let elections = terms.windows(2).filter(|w| w[1] != w[0]).count();
    let tail: Vec<Duration> = {
        let mut t = joins[joins.len().saturating_sub(100)..].to_vec();
        t.sort();
        t
    };
    let out = json!({
        "scenario": "clients",
        "hypervisors": n,
        "heartbeat_interval_ms": heartbeat_ms,
        "writes": if what == Writes::VmStates { format!("vm-state of {vms} VMs on as many hypervisors") } else { "maintenance".into() },
        "window_s": window,
        "join_ms": {"last_100_p50": percentile(&tail, 50), "last_100_max": percentile(&tail, 100),
                    "daemon_at_n": last_join.as_millis()},
        "writes_per_s": writes.len() as f64 / window,
        "write_ms": {"p50": percentile(&writes, 50), "p99": percentile(&writes, 99), "max": percentile(&writes, 100)},
        "write_seen_by_all_ms": {"p50": percentile(&fanout, 50), "p99": percentile(&fanout, 99),
                                 "max": percentile(&fanout, 100), "writes": fanout.len(), "of": written.len()},
        "leader": format!("c{li}"),
        "coordinator_cpu_percent_of_one_core": cpu,
        "simulated_hypervisors_process_cpu_percent": me,
        "stream_answers_per_s_per_coordinator": answers_per_s,
        "stream_bytes_per_s_per_coordinator": served_per_s,
        "stream_bytes_per_s_per_hypervisor": served_per_s.iter().sum::<u64>() / n as u64,
        "log_entries_per_s": (entries_per_s * 10.0).round() / 10.0,
        "figures_relayed_to_leader_per_s": relayed as f64 / window,
        "elections_in_window": elections,
        "oldest_keepalive_ms": oldest,
        "oldest_heard_ms": unheard,
        "oldest_stats_ms": stats,
        "heartbeat_links_lost_max": lost,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(out)
}
