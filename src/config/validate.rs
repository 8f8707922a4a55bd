//! Validation of a parsed config: every value checked once at start, errors naming the key.

use herd_storage::model::{FailedFence, Role};

use super::Config;

/// A refusal: the key's path and why.
type Check = Result<(), (String, String)>;

fn err(key: &str, msg: impl Into<String>) -> Check {
    Err((key.to_string(), msg.into()))
}

/// `value` must lie in `lo..=hi`.
fn between(key: &str, value: u64, lo: u64, hi: u64) -> Check {
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        err(key, format!("must be between {lo} and {hi}"))
    }
}

impl Config {
    /// Checks every value, section by section, in the order of the example config.
    pub(super) fn validate(&self) -> Check {
        self.validate_node()?;
        self.validate_cluster()?;
        self.validate_raft()?;
        self.validate_limits()?;
        self.validate_heartbeat()?;
        self.validate_hypervisor()?;
        if let Err(e) = self.metrics.addr() {
            return err("metrics.listen", e);
        }
        between("scheduling.priority", u64::from(self.scheduling.priority), 1, 99)?;
        between("scheduling.workers", u64::from(self.scheduling.workers), 1, 16)?;
        self.validate_fencing()?;
        self.validate_admin()?;
        self.validate_primary()?;
        between("lifecycle.return_by_ms", self.lifecycle.return_by_ms, 1_000, 3_600_000)
    }

    fn validate_node(&self) -> Check {
        if let Err(e) = herd_storage::model::validate_new_node_name(&self.name) {
            return err("name", e.to_string());
        }
        if self.data_dir.as_os_str().is_empty() {
            return err("data_dir", "must not be empty");
        }
        if self.admin_socket.as_os_str().is_empty() {
            return err("admin_socket", "must not be empty");
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Check {
        if let Err(e) = self.listen_addr() {
            return err("cluster.listen", e);
        }
        if let Some(a) = &self.cluster.advertise {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
                _ => return err("cluster.advertise", format!("{a:?} is not a host:port address")),
            }
        }
        if self.cluster.membership == Some(super::Membership::Client) && self.role != Role::Hypervisor {
            return err("cluster.membership", "`client` is for hypervisors: coordinators are Raft members");
        }
        let listen = self.listen_addr().map_err(|e| ("cluster.listen".to_string(), e))?;
        if listen.port() == 0 {
            return err("cluster.listen", "port 0 is not allowed: peers must know the port");
        }
        if self.cluster.advertise.is_none() && listen.ip().is_unspecified() {
            return err("cluster.advertise", format!("required when listen is the wildcard address {listen}"));
        }
        Ok(())
    }

    fn validate_raft(&self) -> Check {
        let [min, max] = self.raft.election_timeout_ms;
        if self.raft.heartbeat_ms == 0 {
            return err("raft.heartbeat_ms", "must be > 0");
        }
        if !(min > self.raft.heartbeat_ms && max > min) {
            return err(
                "raft.election_timeout_ms",
                format!("needs heartbeat_ms ({}) < min ({min}) < max ({max})", self.raft.heartbeat_ms),
            );
        }
        if max > 60_000 {
            return err("raft.election_timeout_ms", "max above 60000 ms makes failover take minutes");
        }
        between("keepalive.interval_ms", self.keepalive.interval_ms, 100, 3_600_000)
    }

    fn validate_limits(&self) -> Check {
        let l = &self.limits;
        between("limits.max_frame_bytes", u64::from(l.max_frame_bytes), 64 * 1024, 1024 * 1024 * 1024)?;
        between("limits.cluster_idle_timeout_ms", l.cluster_idle_timeout_ms, 100, 3_600_000)?;
        between("limits.cluster_frame_timeout_ms", l.cluster_frame_timeout_ms, 100, 600_000)?;
        between("limits.admin_idle_timeout_ms", l.admin_idle_timeout_ms, 100, 3_600_000)?;
        between("limits.max_cluster_connections", l.max_cluster_connections as u64, 8, 65_536)
    }

    fn validate_heartbeat(&self) -> Check {
        let hb = &self.heartbeat;
        between("heartbeat.interval_ms", hb.interval_ms, 10, 10_000)?;
        if !(1 <= hb.degraded_after && hb.degraded_after < hb.lost_after && hb.lost_after <= 1000) {
            return err(
                "heartbeat.lost_after",
                format!("needs 1 <= degraded_after ({}) < lost_after ({}) <= 1000", hb.degraded_after, hb.lost_after),
            );
        }
        if hb.history_ms < hb.interval_ms * u64::from(hb.lost_after) || hb.history_ms > 600_000 {
            return err(
                "heartbeat.history_ms",
                format!(
                    "must cover lost_after pulses ({} ms) and be at most 600000",
                    hb.interval_ms * u64::from(hb.lost_after)
                ),
            );
        }
        if hb.mnfa_threshold == 0 {
            return err("heartbeat.mnfa_threshold", "must be at least 1");
        }
        if hb.networks.len() > 8 {
            return err("heartbeat.networks", "at most 8 networks");
        }
        self.heartbeat_networks()?;
        Ok(())
    }

    fn validate_hypervisor(&self) -> Check {
        let h = &self.hypervisor;
        if h.uri.as_ref().is_some_and(|u| u.is_empty() || u.len() > 1024) {
            return err("hypervisor.uri", "must be 1 to 1024 bytes");
        }
        between("hypervisor.shutdown_timeout_ms", h.shutdown_timeout_ms, 1_000, 3_600_000)?;
        between("hypervisor.reconcile_interval_ms", h.reconcile_interval_ms, 100, 600_000)?;
        between("hypervisor.parallel_migrations", h.parallel_migrations as u64, 1, 64)?;
        between("hypervisor.migration_timeout_ms", h.migration_timeout_ms, 1_000, 3_600_000)
    }

    fn validate_fencing(&self) -> Check {
        if let Some(f) = &self.fencing {
            f.validate()?;
            if f.failed_fence == FailedFence::RecoverAfterSelfFence
                && f.self_fence_after_ms < 3 * self.keepalive.interval_ms
            {
                return err(
                    "fencing.self_fence_after_ms",
                    format!(
                        "must be at least 3 keepalive intervals ({} ms): a late keepalive must not self-fence a healthy node",
                        3 * self.keepalive.interval_ms
                    ),
                );
            }
        }
        let fe = &self.fence;
        between("fence.max_parallel", fe.max_parallel as u64, 1, 64)?;
        between("fence.check_interval_ms", fe.check_interval_ms, 500, 600_000)?;
        between("fence.call_timeout_ms", fe.call_timeout_ms, 100, 120_000)?;
        between("fence.confirm_timeout_ms", fe.confirm_timeout_ms, 100, 600_000)?;
        between("fence.retry_after_ms", fe.retry_after_ms, 1_000, 3_600_000)
    }

    fn validate_admin(&self) -> Check {
        if self.admin_group_access.is_some() && self.admin_socket_group.is_none() {
            return err("admin_group_access", "needs admin_socket_group (the group it applies to)");
        }
        if let Some(g) = &self.admin_socket_group {
            if g.is_empty() || g.len() > 64 || !g.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                return err("admin_socket_group", format!("{g:?} is not a group name"));
            }
        }
        Ok(())
    }

    fn validate_primary(&self) -> Check {
        let p = &self.primary;
        if p.floating_ips.len() > 64 {
            return err("primary.floating_ips", "at most 64 addresses");
        }
        p.duties()?;
        if p.takeover_delay_ms > 600_000 {
            return err("primary.takeover_delay_ms", "at most 600000");
        }
        between("primary.hook_timeout_ms", p.hook_timeout_ms, 100, 3_600_000)?;
        between("primary.notify_timeout_ms", p.notify_timeout_ms, 10, 600_000)?;
        between("primary.status_interval_ms", p.status_interval_ms, 100, 3_600_000)
    }
}
