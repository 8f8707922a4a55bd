//! The daemon's TOML configuration: parsed strictly (unknown keys refused), validated once,
//! and every error names the key it is about.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use herd_storage::model::Role;
use serde::Deserialize;

use crate::heartbeat::Params;
use crate::primary::duties::{Duties, FloatingIp};

mod fencing;
mod validate;

pub use fencing::{FenceSection, FencingSection};

/// A configuration error: one line naming the file, the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: key `{key}`: {message}")]
    Invalid { path: String, key: String, message: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unique node name.
    pub name: String,
    pub role: Role,
    pub data_dir: PathBuf,
    /// The log mark: the highest entry this node applied, kept outside `data_dir` so that a
    /// `data_dir` restored from an earlier copy is refused at start. Default: `log-mark` in
    /// the directory beside `data_dir` named after it with `-mark` (`/var/lib/herd-mark/`).
    #[serde(default)]
    pub log_mark: Option<PathBuf>,
    pub admin_socket: PathBuf,
    pub cluster: ClusterSection,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub keepalive: KeepaliveSection,
    #[serde(default)]
    pub lifecycle: LifecycleSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub heartbeat: HeartbeatSection,
    #[serde(default)]
    pub primary: PrimarySection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub scheduling: SchedulingSection,
    #[serde(default)]
    pub hypervisor: HypervisorSection,
    /// How this node is fenced (its BMC), published in its record; absent: it cannot be fenced.
    #[serde(default)]
    pub fencing: Option<FencingSection>,
    /// How this node fences others, when it is the primary.
    #[serde(default)]
    pub fence: FenceSection,
    /// Log lines as `text` (default) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Group that may use the admin socket (mode 0660); unset: root only (0600).
    #[serde(default)]
    pub admin_socket_group: Option<String>,
    /// What members of `admin_socket_group` may do: `read` (default: status, lists, info,
    /// events, heartbeat) or `full`. Root and the daemon's own user always have full access.
    #[serde(default)]
    pub admin_group_access: Option<GroupAccess>,
}

/// What members of the admin group may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupAccess {
    /// Requests that change nothing.
    #[default]
    Read,
    Full,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorSection {
    /// libvirt URI of this node's hypervisor (`qemu:///system`; tests and the demo use
    /// `test:///<absolute path>/node.xml`). Unset: this node runs no VMs.
    pub uri: Option<String>,
    /// Live-migration target URI (`{node}` is replaced by the target node's name).
    pub migrate_uri: String,
    /// A graceful shutdown that has not finished by then is followed by a destroy.
    pub shutdown_timeout_ms: u64,
    /// The reconciler also runs this often without any change (a crashed VM is restarted).
    pub reconcile_interval_ms: u64,
    /// VMs a flush or unflush moves at once.
    pub parallel_migrations: usize,
    /// A flush move not finished by then is recorded as stuck (the flush goes on); also the
    /// deadline of one live migration.
    pub migration_timeout_ms: u64,
}

impl Default for HypervisorSection {
    fn default() -> Self {
        HypervisorSection {
            uri: None,
            migrate_uri: "qemu+tcp://{node}/system".into(),
            shutdown_timeout_ms: 60_000,
            reconcile_interval_ms: 2_000,
            parallel_migrations: 2,
            migration_timeout_ms: 120_000,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// `IP:port` of the Prometheus text endpoint (`GET /metrics`); unset: off.
    pub listen: Option<String>,
}

impl MetricsSection {
    pub fn addr(&self) -> Result<Option<SocketAddr>, String> {
        self.listen
            .as_ref()
            .map(|a| a.parse().map_err(|e| format!("{a:?} is not an IP:port address ({e})")))
            .transpose()
    }
}

/// `[scheduling]`: real-time scheduling and locked memory for herd's runtime (see `sched`).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulingSection {
    /// Real-time scheduling for the runtime's threads (off: normal priority, as before).
    pub realtime: bool,
    /// `rr` (default) or `fifo`.
    pub policy: crate::sched::Policy,
    /// 1 to 99 (default 10).
    pub priority: u32,
    /// `mlockall`: herd's memory is never swapped out.
    pub lock_memory: bool,
    /// Threads of the async runtime (1 to 16, default 1). One does the work of a coordinator
    /// with 1000 clients at a fifth of a core; a second costs more than it gives: tokio wakes
    /// it for work the first would have done, and every wake-up of a real-time thread is a
    /// context switch (measured: `docs/benchmarks.md`, "runtime threads").
    pub workers: u32,
}

impl Default for SchedulingSection {
    fn default() -> Self {
        SchedulingSection {
            realtime: true,
            policy: crate::sched::Policy::Rr,
            priority: 10,
            lock_memory: true,
            workers: 1,
        }
    }
}

impl SchedulingSection {
    pub fn settings(&self) -> crate::sched::Settings {
        crate::sched::Settings {
            realtime: self.realtime,
            policy: self.policy,
            priority: i32::try_from(self.priority).unwrap_or(10),
            lock_memory: self.lock_memory,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrimarySection {
    /// `ADDRESS/PREFIX dev INTERFACE`, held by the primary only.
    pub floating_ips: Vec<String>,
    /// Executables run as `HOOK start|stop|status` (primary-only services) and `*.notify` hooks.
    pub hooks_dir: Option<PathBuf>,
    /// Extra delay before a new primary takes its duties.
    pub takeover_delay_ms: u64,
    pub hook_timeout_ms: u64,
    /// How long a new primary waits for survivors to acknowledge a notification.
    pub notify_timeout_ms: u64,
    pub status_interval_ms: u64,
}

impl Default for PrimarySection {
    fn default() -> Self {
        PrimarySection {
            floating_ips: Vec::new(),
            hooks_dir: None,
            takeover_delay_ms: 0,
            hook_timeout_ms: 30_000,
            notify_timeout_ms: 1_000,
            status_interval_ms: 10_000,
        }
    }
}

impl PrimarySection {
    /// The duties this config describes (the floating addresses validated).
    pub fn duties(&self) -> Result<Duties, (String, String)> {
        let ips = self
            .floating_ips
            .iter()
            .enumerate()
            .map(|(i, s)| FloatingIp::parse(s).map_err(|e| (format!("primary.floating_ips[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Duties {
            ips,
            hooks_dir: self.hooks_dir.clone(),
            hook_timeout: std::time::Duration::from_millis(self.hook_timeout_ms),
            addresses: std::sync::Arc::new(crate::primary::duties::IpCommand),
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSection {
    pub interval_ms: u64,
    /// Consecutive misses before a link is `degraded`.
    pub degraded_after: u32,
    /// Consecutive misses before a link is `lost`.
    pub lost_after: u32,
    /// Length of the cluster-history window; also how long a peer view stays fresh.
    pub history_ms: u64,
    /// Hosts; the effective threshold is max(this, a third of the hosts).
    pub mnfa_threshold: usize,
    /// Network name → this node's UDP address on it. Empty: one network `mgmt` on the cluster
    /// listen address, port + 1.
    pub networks: BTreeMap<String, String>,
}

impl Default for HeartbeatSection {
    fn default() -> Self {
        let p = Params::default();
        HeartbeatSection {
            interval_ms: p.interval_ms,
            degraded_after: p.degraded_after,
            lost_after: p.lost_after,
            history_ms: p.history_ms,
            mnfa_threshold: p.mnfa_threshold,
            networks: BTreeMap::new(),
        }
    }
}

impl HeartbeatSection {
    pub fn params(&self) -> Params {
        Params {
            interval_ms: self.interval_ms,
            degraded_after: self.degraded_after,
            lost_after: self.lost_after,
            history_ms: self.history_ms,
            mnfa_threshold: self.mnfa_threshold,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Address the cluster RPC port binds to.
    pub listen: String,
    /// Address peers reach this node on; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// How a hypervisor takes part: `client` (outside Raft: it follows the state through a
    /// session to one coordinator and writes through the leader) or `learner` (a Raft learner,
    /// as hypervisors of clusters made before clients were). Unset: as its `data_dir` joined,
    /// and `client` for a join still to come. Coordinators are always Raft members.
    #[serde(default)]
    pub membership: Option<Membership>,
}

/// How a hypervisor takes part in the cluster (`[cluster] membership`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    Learner,
    Client,
}

impl Config {
    /// Whether this node runs as a client outside Raft, given how its `data_dir` joined
    /// (`None`: not joined yet). Only a hypervisor can; an explicit `membership` is taken as
    /// it is (the start refuses one that disagrees with the `data_dir`).
    pub fn is_client(&self, joined_as_client: Option<bool>) -> bool {
        self.role == Role::Hypervisor
            && match self.cluster.membership {
                Some(m) => m == Membership::Client,
                None => joined_as_client.unwrap_or(true),
            }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    pub heartbeat_ms: u64,
    pub election_timeout_ms: [u64; 2],
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection { heartbeat_ms: 50, election_timeout_ms: [150, 300] }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveSection {
    pub interval_ms: u64,
}

impl Default for KeepaliveSection {
    fn default() -> Self {
        KeepaliveSection { interval_ms: 5000 }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSection {
    /// On a service stop (not a host shutdown) the node promises to be back within this.
    pub return_by_ms: u64,
}

impl Default for LifecycleSection {
    fn default() -> Self {
        LifecycleSection { return_by_ms: 60_000 }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest frame accepted on the cluster port (a whole snapshot travels in one frame).
    pub max_frame_bytes: u32,
    /// A cluster connection silent this long is closed.
    pub cluster_idle_timeout_ms: u64,
    /// Once a frame has started on the cluster port, the rest must arrive within this.
    pub cluster_frame_timeout_ms: u64,
    /// An admin connection silent this long is closed.
    pub admin_idle_timeout_ms: u64,
    /// Concurrent connections on the cluster port from members and registered nodes; more are
    /// refused. Each hypervisor outside Raft holds its session and a leader connection or two
    /// (1000 hypervisors over 3 coordinators: about 700 at the leader). The daemon raises its
    /// open-file limit to fit.
    pub max_cluster_connections: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_frame_bytes: 64 * 1024 * 1024,
            cluster_idle_timeout_ms: 30_000,
            cluster_frame_timeout_ms: 10_000,
            admin_idle_timeout_ms: 120_000,
            max_cluster_connections: 4096,
        }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse { path: p.clone(), message })?;
        config.validate().map_err(|(key, message)| ConfigError::Invalid { path: p, key, message })?;
        Ok(config)
    }

    /// Parses and validates a config given as text (`origin` names it in errors).
    pub fn from_toml(origin: &str, text: &str) -> Result<Config, ConfigError> {
        let p = origin.to_string();
        let config = Self::parse(text).map_err(|message| ConfigError::Parse { path: p.clone(), message })?;
        config.validate().map_err(|(key, message)| ConfigError::Invalid { path: p, key, message })?;
        Ok(config)
    }

    fn parse(text: &str) -> Result<Config, String> {
        let de = toml::Deserializer::parse(text).map_err(|e| one_line(&e.to_string()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = one_line(&e.into_inner().to_string());
            if path == "." {
                inner
            } else {
                format!("key `{path}`: {inner}")
            }
        })
    }

    /// Where the log mark is kept (see the `log_mark` key).
    pub fn log_mark_path(&self) -> PathBuf {
        if let Some(p) = &self.log_mark {
            return p.clone();
        }
        let name = self.data_dir.file_name().map_or_else(|| "herd".into(), |n| n.to_string_lossy().into_owned());
        let parent = self.data_dir.parent().unwrap_or_else(|| Path::new("/"));
        parent.join(format!("{name}-mark")).join("log-mark")
    }

    /// The cluster address peers use.
    pub fn advertise(&self) -> &str {
        self.cluster.advertise.as_deref().unwrap_or(&self.cluster.listen)
    }

    /// The heartbeat networks with their addresses (the default when none is configured).
    pub fn heartbeat_networks(&self) -> Result<BTreeMap<String, SocketAddr>, (String, String)> {
        if self.heartbeat.networks.is_empty() {
            let listen = self.listen_addr().map_err(|e| ("cluster.listen".to_string(), e))?;
            let port = listen.port().checked_add(1).ok_or_else(|| {
                (
                    "heartbeat.networks".to_string(),
                    "cannot default to the cluster port + 1 (65535): configure it".to_string(),
                )
            })?;
            return Ok(BTreeMap::from([("mgmt".to_string(), SocketAddr::new(listen.ip(), port))]));
        }
        let mut out = BTreeMap::new();
        for (net, addr) in &self.heartbeat.networks {
            let key = format!("heartbeat.networks.{net}");
            if herd_storage::model::validate_node_name(net).is_err() {
                return Err((key, "network names use letters, digits, '-', '_' and '.'".into()));
            }
            let a: SocketAddr =
                addr.parse().map_err(|e| (key.clone(), format!("{addr:?} is not an IP:port address ({e})")))?;
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err((key, format!("{a} must be a concrete address and port: other nodes send to it")));
            }
            out.insert(net.clone(), a);
        }
        Ok(out)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.cluster.listen.parse().map_err(|e| format!("{:?} is not an IP:port address ({e})", self.cluster.listen))
    }
}

fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
