//! Host figures for the keepalive, read from /proc on a blocking thread with a deadline, so a
//! slow source never delays a keepalive: a late read yields the last known figures, marked stale.

use std::time::Duration;

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

/// Collects figures within `deadline`; on a miss returns `last` marked stale.
pub async fn collect(last: &NodeStats, deadline: Duration) -> NodeStats {
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(read_now)).await {
        Ok(Ok(stats)) => stats,
        _ => NodeStats { stale: true, ..last.clone() },
    }
}
