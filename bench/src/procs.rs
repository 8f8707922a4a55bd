//! Child processes a scenario starts, and their directory.

use std::path::PathBuf;
use std::process::Child;

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
