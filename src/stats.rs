//! Host figures for the keepalive, read from /proc on a blocking thread with a deadline, so a
//! slow source never delays a keepalive: a late read yields the last known figures, marked stale.
//! Behind the [`HostStats`] seam.

use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::NodeStats;

/// Reads the host's figures now (blocking: call on a blocking thread).
fn read_now() -> NodeStats {
    let cpu_count = std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    let load_milli = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()))
        .map_or(0, |l| (l * 1000.0).round() as u64);
    let (mut total_kib, mut avail_kib) = (0u64, 0u64);
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        for line in meminfo.lines() {
            let mut parts = line.split_whitespace();
            let (key, value) = (parts.next(), parts.next().and_then(|v| v.parse::<u64>().ok()));
            match (key, value) {
                (Some("MemTotal:"), Some(v)) => total_kib = v,
                (Some("MemAvailable:"), Some(v)) => avail_kib = v,
                _ => {}
            }
        }
    }
    NodeStats {
        cpu_count,
        load_milli,
        mem_total_mib: total_kib / 1024,
        mem_used_mib: total_kib.saturating_sub(avail_kib) / 1024,
        // VM figures and unmanaged domains are filled in by the daemon (`vm_figures`).
        vms_running: 0,
        stale: false,
        ..NodeStats::default()
    }
}

/// Where the keepalive's host figures come from (`/proc` in production, fixed figures in the
/// simulation).
pub trait HostStats: Send + Sync + 'static {
    /// Figures within `deadline`; on a miss, `last` marked stale.
    fn collect<'a>(&'a self, last: &'a NodeStats, deadline: Duration) -> BoxFuture<'a, NodeStats>;
}

/// The host's own figures from `/proc`.
pub struct ProcStats;

impl HostStats for ProcStats {
    fn collect<'a>(&'a self, last: &'a NodeStats, deadline: Duration) -> BoxFuture<'a, NodeStats> {
        Box::pin(async move {
            match tokio::time::timeout(
                deadline,
                tokio::task::spawn_blocking(|| {
                    crate::sched::enter_blocking_call();
                    read_now()
                }),
            )
            .await
            {
                Ok(Ok(stats)) => stats,
                _ => NodeStats { stale: true, ..last.clone() },
            }
        })
    }
}

/// The same figures every time (the simulation's hosts).
pub struct FixedStats(pub NodeStats);

impl HostStats for FixedStats {
    fn collect<'a>(&'a self, _last: &'a NodeStats, _deadline: Duration) -> BoxFuture<'a, NodeStats> {
        let s = self.0.clone();
        Box::pin(async move { s })
    }
}
