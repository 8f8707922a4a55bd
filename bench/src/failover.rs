//! `herd-bench failover [REPS]`: failover and recovery timings on the cluster tests' setup —
//! 3 coordinators + 2 hypervisors, each `herd daemon` in a network namespace of its own on one
//! bridge (inside namespaces this benchmark creates and deletes), a simulated BMC (`ipmi_sim`)
//! per node, libvirt's test driver in each daemon, a floating address on the coordinators.
//! Needs root, iproute2, ipmi_sim and ipmitool; the release `herd` binary (`HERD_BIN` or
//! `target/release/herd`).
//!
//! Scenarios, each repeated REPS times (default 10):
//! - `primary_kill`: the primary's herd killed (-9) → another coordinator holds the floating
//!   address (polled every 10 ms in every namespace);
//! - `hypervisor_hang`: h1 (running 4 VMs) SIGSTOPped → fenced through its BMC → all 4 running
//!   elsewhere (polled every 20 ms through the admin socket);
//! - `hypervisor_poweroff`: h1 powered off by hand (`ipmitool chassis power off`) → all its VMs
//!   running elsewhere;
//! - `primary_handover`: `herd node primary` with `wait` → the new primary holds its duties (the
//!   daemon's own `took_ms`).
//!
//! The hand-over runs right after the kill's recovery and long before the next kill: a
//! coordinator that has just handed the role over does not take it back for 3 leases + 1 s
//! (the gate's hysteresis), so a kill right after a hand-over measures that hysteresis instead
//! (seen: ≈1.8 s instead of ≈0.6 s).
//!
//! Between repetitions the cluster is brought back: a killed coordinator is started again; a
//! fenced hypervisor is powered on by the fence (`fence_action = reboot`), boots (its BMC's
//! `boot.sh` starts herd again) and `node ready` brings its VMs home.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

const NODES: [(&str, &str); 5] =
    [("c1", "coordinator"), ("c2", "coordinator"), ("c3", "coordinator"), ("h1", "hypervisor"), ("h2", "hypervisor")];
const FLOAT: &str = "10.212.0.200";
const VMS: usize = 4;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Everything the benchmark started; torn down on drop, even after an error.
pub(crate) struct Bench {
    dir: PathBuf,
    /// The simulated BMCs' directories, on a tmpfs where there is one: a BMC is hardware of its
    /// own, its state never waits on the host's disk (which the busy benchmark saturates).
    bmcs: PathBuf,
    herd: PathBuf,
    prefix: String,
}

impl Bench {
    pub(crate) fn ns(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    fn addr(i: usize) -> String {
        format!("10.212.0.{i}")
    }

    pub(crate) fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(crate) fn socket(&self, name: &str) -> PathBuf {
        self.node_dir(name).join("admin.sock")
    }

    fn index(name: &str) -> usize {
        NODES.iter().position(|(n, _)| *n == name).map_or(0, |k| k + 1)
    }

    /// Starts `name`'s daemon through its BMC's boot script (the same way a power-on does).
    fn boot(&self, name: &str) -> Result<()> {
        let _ = std::fs::remove_file(self.socket(name));
        let boot = self.node_dir(name).join("bmc/boot.sh");
        let status = Command::new("setsid")
            .arg(&boot)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("boot.sh")?;
        drop(status);
        wait("admin socket of a booting node", Duration::from_secs(30), || {
            Ok(admin(&self.socket(name), &json!({"op": "status"})).is_ok())
        })
    }

    pub(crate) fn pid(&self, name: &str) -> Result<i32> {
        let text = std::fs::read_to_string(self.node_dir(name).join("herd.pid"))?;
        text.trim().parse().context("pid file")
    }

    /// Forms the cluster; `extra` is appended to every node's config.
    pub(crate) fn setup(herd: PathBuf, extra: &str) -> Result<Bench> {
        let prefix = format!("hbf{}n", std::process::id() % 100_000);
        // One directory per cluster: a run may set up several, and a kept one stays.
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = format!("{}-{}", std::process::id(), CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let dir = std::env::temp_dir().join(format!("herd-bench-failover-{run}"));
        std::fs::create_dir_all(&dir)?;
        let shm = Path::new("/dev/shm");
        let bmcs = if shm.is_dir() { shm.to_path_buf() } else { dir.clone() }.join(format!("herd-bench-bmc-{run}"));
        std::fs::create_dir_all(&bmcs)?;
        let b = Bench { dir, bmcs, herd, prefix };
        let sw = format!("{}sw", b.prefix);
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let root = std::env::current_dir()?;
        for (k, (name, role)) in NODES.iter().enumerate() {
            let i = k + 1;
            let ns = b.ns(i);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &sw, "link", "add", &format!("s{i}"), "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &sw, "link", "set", &format!("s{i}"), "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &format!("s{i}"), "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", Self::addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            let d = b.node_dir(name);
            std::fs::create_dir_all(&d)?;
            std::fs::create_dir_all(b.bmcs.join(name))?;
            std::os::unix::fs::symlink(b.bmcs.join(name), d.join("bmc"))?;
            let st = Command::new(root.join("deploy/bmc-sim/start.sh"))
                .arg(d.join("bmc"))
                .args([&Self::addr(i), "623", &format!("bench-pw-{i}"), &ns])
                .status()
                .context("deploy/bmc-sim/start.sh")?;
            if !st.success() {
                bail!("the simulated BMC of {name} did not start");
            }
            std::fs::write(
                d.join("node.xml"),
                "<?xml version=\"1.0\"?>\n<node><cpu><mhz>2400</mhz><model>x86_64</model><active>8</active><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads></cpu><memory>16777216</memory></node>\n",
            )?;
            let primary = if *role == "coordinator" {
                format!("[primary]\nfloating_ips = [\"{FLOAT}/24 dev eth0\"]\nnotify_timeout_ms = 500\n")
            } else {
                String::new()
            };
            let config = format!(
                "name = \"{name}\"\nrole = \"{role}\"\ndata_dir = \"{d}/data\"\nadmin_socket = \"{d}/admin.sock\"\n\
                 [cluster]\nlisten = \"{addr}:7400\"\n[keepalive]\ninterval_ms = 1000\n\
                 [hypervisor]\nuri = \"test://{d}/node.xml\"\nshutdown_timeout_ms = 2000\nreconcile_interval_ms = 500\n\
                 [fence]\ncheck_interval_ms = 1000\n\
                 [fencing]\nbmc = \"{addr}:623\"\nuser = \"admin\"\npassword_file = \"{d}/bmc/bmc.pass\"\n{primary}{extra}",
                d = d.display(),
                addr = Self::addr(i),
            );
            std::fs::write(d.join("herd.toml"), config)?;
            let boot = format!(
                "#!/bin/bash\necho $$ >\"{d}/herd.pid\"; echo $$ >\"{d}/bmc/kill.herd.pid\"\n\
                 exec ip netns exec {ns} \"{herd}\" daemon --config \"{d}/herd.toml\" >>\"{d}/herd.log\" 2>&1\n",
                d = d.display(),
                herd = b.herd.display(),
            );
            let path = d.join("bmc/boot.sh");
            std::fs::write(&path, boot)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            b.boot(name)?;
        }
        let init = admin(&b.socket("c1"), &json!({"op": "init-cluster"}))?;
        let token = init["token"].as_str().context("token")?.to_string();
        for (name, role) in &NODES[1..] {
            admin(
                &b.socket(name),
                &json!({"op": "join-cluster", "peer": format!("{}:7400", Self::addr(1)), "token": token, "role": role}),
            )?;
        }
        wait("every node run and fenceable", Duration::from_secs(60), || {
            let s = admin(&b.socket("c2"), &json!({"op": "status"}))?;
            let m = s["members"].as_array().cloned().unwrap_or_default();
            Ok(m.len() == NODES.len()
                && m.iter().all(|x| x["daemon_state"] == "run" && x["fencing"]["can_fence"] == true))
        })?;
        for n in 1..=VMS {
            let xml = format!(
                "<domain type='test'><name>bvm{n}</name><uuid>00000000-0000-4000-8000-0000000003{n:02}</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"
            );
            admin(&b.socket("c2"), &json!({"op": "vm-define", "xml": xml, "node": "h1", "selector": "vms"}))?;
        }
        b.vms_home()?;
        Ok(b)
    }

    fn vm_list(&self) -> Result<Vec<Value>> {
        Ok(admin(&self.socket("c2"), &json!({"op": "vm-list"}))?.as_array().cloned().unwrap_or_default())
    }

    /// Every VM running, none on `not_on`.
    pub(crate) fn all_running_elsewhere(&self, not_on: &str) -> Result<bool> {
        let l = self.vm_list()?;
        Ok(l.len() == VMS && l.iter().all(|v| v["actual"] == "running" && v["node"] != not_on))
    }

    /// Waits until every VM runs on h1 again.
    fn vms_home(&self) -> Result<()> {
        wait("the VMs running on h1", Duration::from_secs(60), || {
            let l = self.vm_list()?;
            Ok(l.len() == VMS && l.iter().all(|v| v["actual"] == "running" && v["node"] == "h1"))
        })
    }

    /// After a fence of h1: it is powered on again by the fence, boots, and is made ready.
    pub(crate) fn restore_h1(&self) -> Result<()> {
        wait("h1 back (fenced, its daemon running)", Duration::from_secs(60), || {
            let i = admin(&self.socket("c2"), &json!({"op": "node-info", "name": "h1", "local": true}))?;
            let back = i["daemon_state"] == "fenced"
                && i["domain_state"] == "flushed"
                && admin(&self.socket("h1"), &json!({"op": "status"}))
                    .is_ok_and(|s| s["state"] == "client" || s["state"] == "learner");
            Ok(back && i["last_keepalive_ms"].as_u64() > i["fence"]["fenced_ms"].as_u64())
        })?;
        admin(&self.socket("c2"), &json!({"op": "node-flush", "name": "h1", "ready": true, "wait": true}))?;
        self.vms_home()
    }

    fn float_holder(&self) -> Option<usize> {
        (1..=3).find(|i| {
            Command::new("ip")
                .args(["-n", &self.ns(*i), "-br", "addr", "show", "dev", "eth0"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{FLOAT}/")))
        })
    }

    pub(crate) fn primary(&self) -> Result<String> {
        let s = admin(&self.socket("c2"), &json!({"op": "status"}))?;
        s["primary"].as_str().map(str::to_string).context("no primary")
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for (name, _) in NODES {
            if let Ok(pid) = self.pid(name) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            if let Ok(p) = std::fs::read_to_string(self.node_dir(name).join("bmc/ipmi_sim.pid")) {
                if let Ok(pid) = p.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        for i in 1..=NODES.len() {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &format!("{}sw", self.prefix)]).output();
        if std::env::var_os("HERD_BENCH_KEEP").is_some() {
            eprintln!("kept {} and {} (HERD_BENCH_KEEP)", self.dir.display(), self.bmcs.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_dir_all(&self.bmcs);
        }
    }
}

/// One admin request; the result or the daemon's error.
pub(crate) fn admin(socket: &Path, req: &Value) -> Result<Value> {
    admin_within(socket, req, Duration::from_secs(30))
}

/// [`admin`], waiting up to `timeout` for the answer.
pub(crate) fn admin_within(socket: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("{}", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .with_context(|| format!("{} on {}: no answer within {timeout:?}", req["op"], socket.display()))?;
    let v: Value = serde_json::from_str(&line).context("admin response")?;
    if v["ok"] == true {
        Ok(v["result"].clone())
    } else {
        bail!("{}: {}", req["op"], v["error"])
    }
}

/// Polls `cond` every 20 ms until true or `timeout`.
pub(crate) fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `{n, median_ms, p99_ms, max_ms, samples_ms}` (p99 by nearest rank).
pub fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let rank = |p: f64| ms.get(((p * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1).copied().unwrap_or(0.0);
    let median = if n == 0 {
        0.0
    } else if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    json!({ "n": n, "median_ms": median, "p99_ms": rank(0.99), "max_ms": ms.last().copied().unwrap_or(0.0), "samples_ms": ms })
}

pub(crate) fn elapsed_ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

pub fn run(reps: usize) -> Result<Value> {
    let root = nix::unistd::Uid::effective().is_root();
    let have = |c: &str| Command::new(c).arg("-V").output().is_ok() || Command::new(c).arg("-h").output().is_ok();
    if !root || !have("ip") || !have("ipmi_sim") || !have("ipmitool") {
        bail!("the failover benchmark needs root, iproute2, ipmi_sim and ipmitool (make deps installs them)");
    }
    let b = Bench::setup(crate::herd_binary()?, "")?;
    let mut kill = Vec::new();
    let mut hang = Vec::new();
    let mut off = Vec::new();
    let mut handover = Vec::new();
    for rep in 0..reps {
        // primary_kill
        wait("a primary holding the address", Duration::from_secs(30), || Ok(b.float_holder().is_some()))?;
        let primary = b.primary()?;
        let old = Bench::index(&primary);
        let pid = b.pid(&primary)?;
        let t0 = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
        // The unit's ExecStopPost: the killed node's addresses come off.
        let _ =
            Command::new("ip").args(["-n", &b.ns(old), "addr", "del", &format!("{FLOAT}/24"), "dev", "eth0"]).output();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(b.float_holder(), Some(i) if i != old) {
                break;
            }
            if Instant::now() > deadline {
                bail!("no new holder of {FLOAT}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        kill.push(elapsed_ms(t0));
        b.boot(&primary)?;
        wait("the killed primary back in run", Duration::from_secs(30), || {
            let s = admin(&b.socket(&primary), &json!({"op": "status"}))?;
            Ok(s["quorum"] == true)
        })?;

        // primary_handover
        let current = b.primary()?;
        let to = ["c1", "c2", "c3"].into_iter().find(|c| *c != current).unwrap_or("c1");
        let r = admin(&b.socket("c2"), &json!({"op": "node-primary", "name": to, "wait": true}))?;
        handover.push(r["took_ms"].as_f64().unwrap_or(0.0));
        // hypervisor_hang
        let t0 = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(b.pid("h1")?), nix::sys::signal::Signal::SIGSTOP)?;
        wait("h1's VMs running elsewhere", Duration::from_secs(60), || b.all_running_elsewhere("h1"))?;
        hang.push(elapsed_ms(t0));
        b.restore_h1()?;

        // hypervisor_poweroff
        let i = Bench::index("h1");
        let t0 = Instant::now();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &b.ns(i),
                "ipmitool",
                "-I",
                "lanplus",
                "-C",
                "3",
                "-H",
                &Bench::addr(i),
                "-U",
                "admin",
            ])
            .args(["-P", &format!("bench-pw-{i}"), "chassis", "power", "off"])
            .output()?;
        if !out.status.success() {
            bail!("ipmitool power off: {}", String::from_utf8_lossy(&out.stderr));
        }
        wait("h1's VMs running elsewhere", Duration::from_secs(60), || b.all_running_elsewhere("h1"))?;
        off.push(elapsed_ms(t0));
        b.restore_h1()?;

        eprintln!(
            "rep {}/{reps}: kill {:.0} ms, hang {:.0} ms, poweroff {:.0} ms, handover {:.0} ms",
            rep + 1,
            kill[rep],
            hang[rep],
            off[rep],
            handover[rep]
        );
    }
    Ok(json!({
        "primary_kill": summary(kill),
        "hypervisor_hang": summary(hang),
        "hypervisor_poweroff": summary(off),
        "primary_handover": summary(handover),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_by_nearest_rank() {
        let s = summary(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s["n"].as_u64(), s["median_ms"].as_f64(), s["max_ms"].as_f64()), (Some(5), Some(3.0), Some(5.0)));
        assert_eq!(s["p99_ms"].as_f64(), Some(5.0));
        let s = summary(vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(s["median_ms"].as_f64(), Some(2.5));
    }
}
