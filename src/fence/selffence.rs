//! The opt-in self-fence (DESIGN §6), symmetric with the primary's recovery rule.
//!
//! Only a node whose policy is `failed_fence = recover-after-self-fence` runs this, and config
//! validation refuses that policy without a watchdog device. The watchdog is fed every second
//! while this node's own keepalive has been committed within `self_fence_after_ms`; past that,
//! the node destroys the domains it runs for the cluster, says why in its log, and stops feeding
//! the watchdog (never writing the magic close character), so the host resets even if herd
//! itself is dead or stuck. The primary recovers the VMs only once the same committed keepalive
//! is older than `self_fence_after_ms` + the watchdog timeout + a margin: both sides measure from
//! one committed fact, so asymmetric loss cannot make them disagree.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Whether this node must self-fence: its last committed keepalive is `age_ms` old (None:
/// none since this process started, counted from the start).
pub fn must_self_fence(age_ms: u64, self_fence_after_ms: u64) -> bool {
    age_ms >= self_fence_after_ms
}

/// An open watchdog device.
pub struct Watchdog {
    path: PathBuf,
    file: std::fs::File,
}

impl Watchdog {
    /// Opens (and so arms) the device.
    pub fn open(path: &str) -> std::io::Result<Watchdog> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Watchdog { path: PathBuf::from(path), file })
    }

    /// Feeds it (one byte that is not `V`, the magic close).
    pub async fn feed(&mut self, deadline: Duration) -> Result<(), String> {
        let mut f = self.file.try_clone().map_err(|e| format!("{}: {e}", self.path.display()))?;
        let path = self.path.display().to_string();
        crate::boundary::run("watchdog", deadline, move || f.write_all(b"\0").and_then(|_| f.flush()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{path}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_fence_deadline() {
        assert!(!must_self_fence(29_999, 30_000));
        assert!(must_self_fence(30_000, 30_000));
    }

    #[tokio::test]
    async fn feeding_writes_a_non_magic_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wd");
        std::fs::write(&path, b"").expect("create");
        let mut w = Watchdog::open(path.to_str().expect("utf-8")).expect("open");
        w.feed(Duration::from_secs(1)).await.expect("feed");
        w.feed(Duration::from_secs(1)).await.expect("feed");
        assert_eq!(std::fs::read(&path).expect("read"), vec![0, 0]);
        assert!(Watchdog::open("/nonexistent/watchdog").is_err());
    }
}
