//! `herd-bench migration [REPS]`: live migration of real QEMU guests on the demo's cluster
//! (`deploy/demo.sh`, root, with QEMU: 4 nodes in network namespaces, each with its own qemu
//! libvirtd, 64 MiB diskless guests), in its own directory, stopped afterwards.
//!
//! - `live_move`: `vm migrate vm1 --to NODE --force-live`, REPS times between two nodes:
//!   the time from the command to the target's report (the cluster's record, `last_move`),
//!   libvirt's own job time and the guest's downtime (libvirt's completed-job statistics);
//! - `flush_4`: 4 guests gathered on one node, `node flush NODE --wait` (live, at most
//!   `parallel_migrations` = 2 at once), then `node ready NODE --wait` bringing them home;
//! - `hang`: the 5 guests gathered on the hypervisor hv4, its herd hung (SIGSTOP): the time from
//!   the hang to all of them running elsewhere by the cluster's record (their new node's report of
//!   libvirt's state), through the fence by its simulated BMC, whose power-off kills hv4's
//!   qemus as a real one would. Then hv4 boots again (`fence_action = reboot`) and is made
//!   ready, and the next repetition begins.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::failover::{admin, admin_within, elapsed_ms, summary, wait};

const DIR: &str = "/tmp/herd-bench-migration";
/// Hangs of hv4 with 4 guests.
const HANGS: usize = 3;

/// The demo cluster; stopped on drop, even after an error.
struct Demo;

impl Drop for Demo {
    fn drop(&mut self) {
        if std::env::var_os("HERD_BENCH_KEEP").is_some() {
            eprintln!("kept the demo cluster in {DIR} (HERD_BENCH_KEEP): HERD_DEMO_DIR={DIR} deploy/demo.sh stop");
            return;
        }
        let _ = Command::new("deploy/demo.sh").arg("stop").env("HERD_DEMO_DIR", DIR).status();
    }
}

fn socket() -> PathBuf {
    Path::new(DIR).join("hv2/admin.sock")
}

fn vm(name: &str) -> Result<Value> {
    admin(&socket(), &json!({"op": "vm-info", "name": name}))
}

/// Hangs hv4 with `gather` and whatever else it runs; returns (the ms from the hang until all
/// of its guests run elsewhere, how many it ran).
fn hang(gather: &[&str]) -> Result<(f64, usize)> {
    let hv4 = Path::new(DIR).join("hv4");
    for name in gather {
        if vm(name)?["node"] != "hv4" {
            move_live(name, "hv4")?;
        }
    }
    let list = admin(&socket(), &json!({"op": "vm-list"}))?;
    let guests: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["node"] == "hv4")
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    // The BMC's power-off kills what `kill.*.pid` names: the node's qemus too (the demo names
    // its herd and libvirtd).
    for name in &guests {
        let pid = std::fs::read_to_string(hv4.join(format!("qemu/run/qemu/{name}.pid")))
            .with_context(|| format!("{name}'s qemu pid on hv4"))?;
        std::fs::write(hv4.join(format!("bmc/kill.qemu-{name}.pid")), pid.trim())?;
    }
    let herd = std::fs::read_to_string(hv4.join("herd.pid")).context("hv4's herd pid")?;
    let t0 = Instant::now();
    let status = Command::new("kill").args(["-STOP", herd.trim()]).status()?;
    if !status.success() {
        bail!("could not hang hv4 (pid {})", herd.trim());
    }
    wait("hv4's guests running elsewhere", Duration::from_secs(60), || {
        let list = admin(&socket(), &json!({"op": "vm-list"}))?;
        let all = list.as_array().cloned().unwrap_or_default();
        Ok(guests
            .iter()
            .all(|g| all.iter().any(|v| v["name"] == g.as_str() && v["node"] != "hv4" && v["actual"] == "running")))
    })?;
    let took = elapsed_ms(t0);
    // fence_action = reboot: the BMC powers hv4 on again and it boots (the demo's boot.sh);
    // `node ready` is refused until its daemon has been heard after the fence.
    let mut refused = String::new();
    let ready = json!({"op": "node-flush", "name": "hv4", "ready": true, "wait": true});
    wait("hv4 back and ready after its fence", Duration::from_secs(120), || {
        match admin_within(&socket(), &ready, Duration::from_secs(300)) {
            Ok(_) => Ok(true),
            Err(e) => {
                refused = e.to_string();
                Ok(false)
            }
        }
    })
    .with_context(|| format!("the last refusal: {refused}"))?;
    Ok((took, guests.len()))
}

/// Moves `name` live to `to`; returns (ms from the command to the record of its arrival,
/// libvirt's job ms, downtime ms).
fn move_live(name: &str, to: &str) -> Result<(f64, f64, f64)> {
    let before = vm(name)?["last_move"]["began_ms"].clone();
    let t0 = Instant::now();
    admin(&socket(), &json!({"op": "vm-migrate", "name": name, "to": to, "live": true}))?;
    let mut last = Value::Null;
    wait(&format!("{name} on {to}"), Duration::from_secs(60), || {
        let info = vm(name)?;
        last = info["last_move"].clone();
        // Arrived (the target's report) and released (the source's).
        Ok(last["began_ms"] != before
            && last["to"] == to
            && last["ended_ms"].is_u64()
            && info["migrating_from"].is_null())
    })?;
    let took = elapsed_ms(t0);
    if last["live"] != true {
        bail!("{name} did not move live: {last}");
    }
    let f = |k: &str| last[k].as_f64().unwrap_or(f64::NAN);
    Ok((took, f("job_ms"), f("downtime_ms")))
}

pub fn run(reps: usize) -> Result<Value> {
    let herd = crate::herd_binary()?;
    let out = Command::new("deploy/demo.sh")
        .env("HERD_DEMO_DIR", DIR)
        .env("HERD_BIN", &herd)
        .output()
        .context("running deploy/demo.sh")?;
    let _demo = Demo;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.contains("real guests") {
        bail!(
            "the demo cluster with real guests did not come up (needs root, network namespaces and QEMU): {}{}",
            said.lines().rev().take(5).collect::<Vec<_>>().join(" | "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait("every guest settled after the demo", Duration::from_secs(120), || {
        let list = admin(&socket(), &json!({"op": "vm-list"}))?;
        let all = list.as_array().cloned().unwrap_or_default();
        Ok(all.len() == 5 && all.iter().all(|v| v["migrating_from"].is_null() && v["actual"] == "running"))
    })?;
    let (mut total, mut job, mut downtime) = (Vec::new(), Vec::new(), Vec::new());
    let home = vm("vm1")?["node"].as_str().unwrap_or("hv1").to_string();
    let other = if home == "hv2" { "hv3" } else { "hv2" };
    for k in 0..reps {
        let to = if k % 2 == 0 { other } else { home.as_str() };
        let (t, j, d) = move_live("vm1", to)?;
        total.push(t);
        job.push(j);
        downtime.push(d);
    }
    // Four guests on hv3, then the flush and the way back.
    for name in ["vm1", "vm2", "vm4", "vm5"] {
        if vm(name)?["node"] != "hv3" {
            move_live(name, "hv3")?;
        }
    }
    let long = Duration::from_secs(300);
    let t0 = Instant::now();
    admin_within(&socket(), &json!({"op": "node-flush", "name": "hv3", "wait": true}), long)?;
    let flush = elapsed_ms(t0);
    let t0 = Instant::now();
    admin_within(&socket(), &json!({"op": "node-flush", "name": "hv3", "ready": true, "wait": true}), long)?;
    let ready = elapsed_ms(t0);
    let (mut hangs, mut guests) = (Vec::new(), 0);
    for _ in 0..HANGS {
        let (took, n) = hang(&["vm1", "vm2", "vm3", "vm4", "vm5"])?;
        hangs.push(took);
        guests = guests.max(n);
    }
    Ok(json!({
        "live_move_ms": summary(total),
        "live_job_ms": summary(job),
        "live_downtime_ms": summary(downtime),
        "flush_4_live_ms": flush,
        "ready_4_live_ms": ready,
        "hang_ms": summary(hangs),
        "hang_guests": guests,
    }))
}
