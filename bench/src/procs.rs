//! Child processes a scenario starts, and their directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use crate::failover::{admin, wait};

/// Child processes, killed on drop, and their directory, removed then (kept with
/// `HERD_BENCH_KEEP=1`, to read the logs).
pub(crate) struct Procs {
    pub dir: PathBuf,
    pub children: Vec<Child>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("HERD_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Procs {
    /// Starts `herd daemon --config DIR/herd.toml`, its output in `DIR/herd.log`, with
    /// `RUST_LOG` when given.
    pub fn spawn_herd(&mut self, herd: &Path, dir: &Path, rust_log: Option<&str>) -> Result<()> {
        let log = std::fs::File::create(dir.join("herd.log"))?;
        let mut c = Command::new(herd);
        c.args(["daemon", "--config"]).arg(dir.join("herd.toml"));
        if let Some(l) = rust_log {
            c.env("RUST_LOG", l);
        }
        let child = c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn().context("herd daemon")?;
        self.children.push(child);
        Ok(())
    }

    /// Writes `config` to `DIR/herd.toml`, starts the daemon (`RUST_LOG=warn`) and waits for
    /// its admin socket, `DIR/admin.sock`, to answer.
    pub fn start_herd(&mut self, herd: &Path, dir: &Path, config: &str) -> Result<()> {
        std::fs::write(dir.join("herd.toml"), config)?;
        self.spawn_herd(herd, dir, Some("warn"))?;
        let sock = dir.join("admin.sock");
        wait("an admin socket", Duration::from_secs(30), || Ok(admin(&sock, &json!({"op": "status"})).is_ok()))
    }
}

/// A start of measuring the CPU of some processes.
pub(crate) struct CpuMark {
    pids: Vec<u32>,
    seconds: Vec<f64>,
    at: std::time::Instant,
}

impl CpuMark {
    /// The CPU seconds each of `pids` has used, now.
    pub fn now(pids: &[u32]) -> Result<CpuMark> {
        let seconds = pids.iter().map(|pid| cpu_seconds(Some(*pid))).collect::<Result<_>>()?;
        Ok(CpuMark { pids: pids.to_vec(), seconds, at: std::time::Instant::now() })
    }

    /// Each process's CPU since the mark, in percent of one core; and the window in seconds.
    pub fn percent(&self) -> Result<(Vec<f64>, f64)> {
        let window = self.at.elapsed().as_secs_f64();
        let cpu = self
            .pids
            .iter()
            .zip(&self.seconds)
            .map(|(pid, c0)| Ok(100.0 * (cpu_seconds(Some(*pid))? - c0) / window))
            .collect::<Result<_>>()?;
        Ok((cpu, window))
    }
}

/// CPU seconds process `pid` has used (`None`: this process), from `/proc`.
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Result<f64> {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path)?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
}
