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
//!
//! A client outside Raft also self-fences when no coordinator acknowledged its session (answered
//! a poll) for `self_fence_after_ms`, counted from when it *sent* the last poll answered; it says
//! so in its reports (`NodeStats::session_self_fence`). A coordinator serves polls only within a
//! round trip with the leader, so the primary can bound, on its own clock, when any coordinator
//! last can have acknowledged it, and records it self-fenced on that evidence
//! (`FenceOutcome::SessionsQuiet`) without waiting for the keepalive's age. Both rules hold at
//! once: the node fences itself at the earlier, so either record is safe — until a keepalive
//! of it saying it self-fences on its session *alone* (`NodeStats::session_only`, kept by the
//! leader only once every member knows it) committed: from then on the model refuses the
//! keepalive's rule for it, so its guard counts the session alone and the coordinators write
//! its keepalive only when its figures move.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;

use crate::hypervisor::Hypervisor;
use crate::standing::Standing;

/// Whether this node must self-fence: its last committed keepalive is `age_ms` old (None:
/// none since this process started, counted from the start).
pub fn must_self_fence(age_ms: u64, self_fence_after_ms: u64) -> bool {
    age_ms >= self_fence_after_ms
}

/// Where a watchdog is armed: the device in production, the simulated machine's in the
/// simulation (which resets the machine when it goes unfed).
pub trait WatchdogDevice: Send + Sync {
    /// Opens (and so arms) the watchdog at `path`.
    fn open(&self, path: &str) -> Result<Box<dyn Feed>, String>;
}

/// An armed watchdog.
pub trait Feed: Send {
    /// Feeds it once, within `deadline`.
    fn feed(&mut self, deadline: Duration) -> BoxFuture<'_, Result<(), String>>;
}

/// The hardware watchdog: a device file.
pub struct DeviceFile;

impl WatchdogDevice for DeviceFile {
    fn open(&self, path: &str) -> Result<Box<dyn Feed>, String> {
        Watchdog::open(path).map(|w| Box::new(w) as Box<dyn Feed>).map_err(|e| e.to_string())
    }
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
}

impl Feed for Watchdog {
    /// Feeds it (one byte that is not `V`, the magic close).
    fn feed(&mut self, deadline: Duration) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut f = self.file.try_clone().map_err(|e| format!("{}: {e}", self.path.display()))?;
            let path = self.path.display().to_string();
            crate::boundary::run(crate::boundary::Library::Watchdog, "watchdog", deadline, move || {
                f.write_all(b"\0").and_then(|_| f.flush())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{path}: {e}"))
        })
    }
}

/// The self-fence guard of a node whose policy is `recover-after-self-fence`.
pub struct Guard {
    pub standing: Arc<Standing>,
    pub node: Arc<ClusterNode<LogStore>>,
    /// This node's hypervisor (none on a coordinator without one).
    pub hypervisor: Option<Arc<dyn Hypervisor>>,
    /// The watchdog device, and where it is opened.
    pub device: String,
    pub watchdogs: Arc<dyn WatchdogDevice>,
    pub after_ms: u64,
}

impl Guard {
    /// How long ago a client's session was last acknowledged, counted from the sending of the
    /// poll answered (since this process started when none was); `None` on a Raft member.
    fn session_age_ms(&self) -> Option<u64> {
        let c = self.node.session()?;
        let acknowledged = c.status().acknowledged;
        Some(acknowledged.map_or(self.standing.now_ms(), |t| herd_raft::clock::ms(t.elapsed())))
    }

    /// Whether this client's record, as it applied it, says it self-fences on its session
    /// alone (`NodeStats::session_only`): from that commit on, the model records it
    /// self-fenced only on the sessions' evidence, never on its keepalive's age, and its
    /// keepalive is written only when its figures move.
    fn on_session_alone(&self) -> bool {
        let Some(local) = self.node.local() else { return false };
        let g = local.view.read();
        g.state.node_by_id(local.id).is_some_and(|n| n.stats.session_only)
    }

    /// The age this node self-fences on: its last own keepalive committed and, for a client,
    /// its session's last acknowledgement — the older; the acknowledgement alone for a client
    /// whose record says it self-fences on its session alone.
    fn contact_age_ms(&self) -> u64 {
        match self.session_age_ms() {
            Some(session) if self.on_session_alone() => session,
            session => self.standing.commit_age_ms().max(session.unwrap_or(0)),
        }
    }

    /// Feeds the watchdog while this node's own writes commit; past `after_ms` without one,
    /// destroys its VMs and stops feeding (the host resets).
    pub async fn run(self) {
        let (device, after_ms) = (self.device.clone(), self.after_ms);
        let mut wd = match self.watchdogs.open(&device) {
            Ok(w) => w,
            Err(e) => {
                // Validation required the device; failing to open it is loud, not silent.
                tracing::error!(device = %device, "cannot open the watchdog: {e}; self-fence is NOT armed");
                return;
            }
        };
        tracing::info!(device = %device, after_ms, "self-fence armed: watchdog fed while keepalives commit");
        if self.node.session().is_some() {
            // From now on this client self-fences on its session too, and may say so.
            self.standing.set_session_guard();
        }
        loop {
            if must_self_fence(self.contact_age_ms(), after_ms) {
                break;
            }
            if let Err(e) = wd.feed(Duration::from_secs(1)).await {
                tracing::error!("watchdog feed failed: {e}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.standing.set_self_fenced();
        tracing::error!(
            keepalive_age_ms = self.standing.commit_age_ms(),
            session_age_ms = self.session_age_ms(),
            "SELF-FENCE: no keepalive of this node committed, or no coordinator acknowledged its session, \
             for {after_ms} ms; destroying its VMs and letting the watchdog reset the host"
        );
        if let (Some(hypervisor), Some(member)) = (&self.hypervisor, self.node.local()) {
            let managed: Vec<String> = member.view.read().state.vms.keys().cloned().collect();
            // Until none of the cluster's domains runs here (the watchdog resets the host
            // meanwhile anyway): a failed list or destroy is retried, never given up on.
            loop {
                match hypervisor.list().await {
                    Ok(domains) => {
                        let running: Vec<&crate::hypervisor::Domain> = domains
                            .iter()
                            .filter(|d| {
                                use herd_storage::model::ActualState::{Paused, Running};
                                managed.contains(&d.name) && matches!(d.state, Running | Paused)
                            })
                            .collect();
                        if running.is_empty() {
                            tracing::error!("self-fence: none of the cluster's VMs runs here any more");
                            break;
                        }
                        for d in running {
                            match hypervisor.destroy(&d.name).await {
                                Ok(()) => tracing::error!(vm = %d.name, "self-fence: destroyed"),
                                Err(e) => tracing::error!(vm = %d.name, "self-fence: destroy failed: {e}"),
                            }
                        }
                    }
                    Err(e) => tracing::error!("self-fence: cannot list domains: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // The device stays open and unfed: the watchdog fires.
        std::future::pending::<()>().await;
        drop(wd);
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
