//! Child processes a scenario starts, and their directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

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
}
