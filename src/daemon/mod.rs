//! `herd daemon`'s logic: brings a node up over an [`Env`], owns every task it starts, and on
//! a service stop records `stop` with a `return_by` deadline.
//!
//! ```text
//!  start: heartbeat responder (first: a restarted daemon answers pulses at once) ─▶ cluster
//!         port ─▶ resume Raft (if joined) ─▶ member duties (member.rs): publish heartbeat
//!         addresses + daemon_state run, keepalive, heartbeat targets from the replicated node
//!         records (a local watch), MNFA notices into the event log ─▶ primary duties, fencing
//!  stop:  tasks aborted ─▶ duties dropped ─▶ daemon_state stop ─▶ Raft shut down
//! ```
//!
//! The admin socket, metrics and signals are the production process's (`crate::run`); the
//! simulation drives `start` directly.

mod clients;
mod env;
mod health;
mod member;
pub mod storage;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herd_raft::network::Limits;
use herd_raft::node::{ClusterNode, NodeError, NodeSettings};
use herd_raft::server::{self, Handler};
use herd_storage::log_store::LogStore;
use herd_storage::model::{Command, DaemonState, FencePolicy, Role};
use tokio::sync::{mpsc, watch, Notify};

pub use env::{Env, HypervisorOpener};

use crate::config::Config;
use crate::fence::agent::Fencer;
use crate::fence::manager::FenceManager;
use crate::heartbeat::agent::{Agent, Notice};
use crate::primary::manager::{self as primary, Manager, ManagerExtension};
use crate::reconcile::Reconciler;
use crate::service::{self, Progress};
use crate::standing::Standing;
use crate::stats::HostStats;
use crate::tasks::Tasks;

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] herd_storage::sled_store::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot resume cluster membership: {0}")]
    Resume(NodeError),
    #[error("config: {0}")]
    Config(String),
    #[error("heartbeat: {0}")]
    Heartbeat(std::io::Error),
    #[error(transparent)]
    Identity(std::io::Error),
    /// `data_dir` belongs to another node (or role) than the config names.
    #[error("{0}")]
    NotThisNode(String),
    #[error("cluster TLS: {0}")]
    Tls(#[from] herd_raft::tls::TlsError),
}

/// The running daemon: its parts, shared by its tasks and read by the admin socket.
pub struct Daemon {
    pub config: Config,
    pub node: Arc<ClusterNode<LogStore>>,
    pub agent: Arc<Agent>,
    pub primary: Arc<Manager>,
    /// The main loops' heartbeat for systemd's watchdog.
    progress: Arc<Progress>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This node's reconciler (when it has a hypervisor).
    pub reconciler: Option<Arc<Reconciler>>,
    /// This node's own committed writes (quorum contact) and whether it self-fenced.
    standing: Arc<Standing>,
    /// How many of its VMs run here, as the last reconcile round saw.
    vms_running: Arc<AtomicU32>,
    /// Woken when this node becomes a member (init, join or resume).
    member_started: Notify,
    /// `herd node shutdown` finished: the process exits without recording `stop`.
    host_shutdown: Notify,
    /// Set once the node has resumed (or found no) membership from disk.
    resumed: AtomicBool,
    /// How this node is fenced (from `[fencing]`), published in its record.
    fencing: Option<FencePolicy>,
    host_stats: Arc<dyn HostStats>,
    /// Where the self-fence guard arms its watchdog.
    watchdogs: Arc<dyn crate::fence::selffence::WatchdogDevice>,
    /// What the cluster port counts (refusals by reason, connections admitted).
    pub cluster_port: Arc<herd_raft::server::PortStats>,
    /// The tasks the member duties start (targets, reconcile, flush, self-fence guard).
    tasks: Tasks,
}

impl Daemon {
    /// Whether the node has resumed (or found no) membership from disk yet.
    pub fn resumed(&self) -> bool {
        self.resumed.load(Ordering::Acquire)
    }

    /// Wakes the member duties: this node just became a member (init or join).
    pub fn member_started(&self) {
        self.member_started.notify_one();
    }

    /// `herd node shutdown`, once flushed: records `daemon_state shutdown` and makes the
    /// process exit (without recording `stop`).
    pub async fn host_shutdown(&self) -> Result<(), NodeError> {
        let shutdown = |name, node_id| {
            vec![Command::SetDaemonState { name, state: DaemonState::Shutdown, return_by_ms: None, node_id }]
        };
        self.own_write(shutdown, Duration::from_secs(5)).await?;
        self.host_shutdown.notify_one();
        Ok(())
    }
}

/// A started daemon and the handles to stop it.
pub struct Running {
    pub daemon: Arc<Daemon>,
    shutdown_tx: watch::Sender<bool>,
    duty_stop_tx: watch::Sender<bool>,
    duty_task: tokio::task::JoinHandle<()>,
    cluster_server: tokio::task::JoinHandle<()>,
    /// Aborted first at stop.
    tasks: Tasks,
    /// Turns true when Raft stopped on a storage error and the store takes writes again.
    restart: watch::Receiver<bool>,
}

/// Starts the daemon's logic over `env`: the heartbeat responder first (a daemon restarted
/// after a crash answers pulses before anything else, so it is not taken for dead while it
/// recovers), the cluster port, Raft resumed from the stores, then the member tasks, the
/// primary's duties and the fence manager.
pub async fn start(config: Config, env: Env) -> Result<Running, StartError> {
    let identity = env.identity.load().map_err(StartError::Identity)?;
    check_identity(&config, identity.as_ref())?;
    let client = config.is_client(identity.as_ref().map(|i| i.client));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (agent, notices) = heartbeat_agent(&config, &env, shutdown_rx.clone())?;
    let limits = limits(&config);
    let settings = node_settings(&config, client, &limits);
    let node = raft_node(settings, env.connector, env.log, env.backend, env.identity, env.pki);
    node.set_mark_store(env.mark.clone());
    let mut duties = config.primary.duties().map_err(|(k, e)| StartError::Config(format!("{k}: {e}")))?;
    duties.addresses = env.addresses.clone();
    let manager = Manager::new(primary_settings(&config), node.clone(), duties);
    node.set_extension(Arc::new(ManagerExtension(manager.clone())));
    let reconciler = match env.hypervisor {
        None => None,
        Some(open) => Some(reconciler(&config, open.await?)),
    };
    let fencing = match &config.fencing {
        Some(f) => Some(f.policy().map_err(|(k, e)| StartError::Config(format!("{k}: {e}")))?),
        None => None,
    };
    let fence =
        FenceManager::new(fence_settings(&config), node.clone(), agent.clone(), manager.clone(), env.fencer.clone());
    let tasks = Tasks::new();
    check_own_bmc(&tasks, fencing.as_ref(), &*env.fencer);
    let daemon = Arc::new(Daemon {
        config: config.clone(),
        node: node.clone(),
        agent: agent.clone(),
        primary: manager.clone(),
        progress: Progress::new(),
        metrics: crate::metrics::Metrics::new(),
        reconciler,
        standing: Arc::new(Standing::new(config.keepalive.interval_ms)),
        vms_running: Arc::new(AtomicU32::new(0)),
        member_started: Notify::new(),
        host_shutdown: Notify::new(),
        resumed: AtomicBool::new(false),
        fencing,
        host_stats: env.host_stats,
        watchdogs: env.watchdogs,
        cluster_port: Arc::new(herd_raft::server::PortStats::default()),
        tasks: Tasks::new(),
    });
    let handler: Arc<dyn Handler> = Arc::new(herd_raft::node::NodeHandler(node.clone()));
    let cluster_server = herd_storage::types::spawn(server::serve(
        env.listener,
        handler,
        limits,
        daemon.cluster_port.clone(),
        shutdown_rx.clone(),
    ));
    tracing::info!(name = %config.name, role = %config.role, "herd daemon started");

    let resumed = resume(&daemon).await?;
    tasks.spawn(daemon.clone().member_tasks());
    // Local state recovered, heartbeat responder and admin socket up: ready (quorum or not).
    service::ready(&daemon.service_status());
    tasks.spawn(daemon.clone().report_status());
    tasks.spawn(daemon.clone().renew_certificates());
    tasks.spawn(service::watchdog(daemon.progress.clone(), shutdown_rx.clone()));
    tasks.spawn(daemon.clone().record_notices(notices));
    if resumed {
        daemon.member_started.notify_one();
    }
    observe(&daemon);
    let (duty_stop_tx, duty_stop_rx) = watch::channel(false);
    let duty_task = herd_storage::types::spawn(manager.clone().run(duty_stop_rx));
    // No new fence decisions from a stopping primary (a pending fence is executed again by
    // the next primary).
    tasks.spawn(fence.run(shutdown_rx.clone()));
    if config.role == Role::Coordinator {
        tasks.spawn(health::run(node.clone(), shutdown_rx.clone()));
        tasks.spawn(daemon.clone().client_keepalives());
        tasks.spawn(daemon.clone().gather_clients_heard());
    }
    let (restart_tx, restart) = watch::channel(false);
    tasks.spawn(storage::guard(node.clone(), env.storage_probe.clone(), restart_tx));
    Ok(Running { daemon, shutdown_tx, duty_stop_tx, duty_task, cluster_server, tasks, restart })
}

/// `data_dir` records which node of which cluster it belongs to: a config naming another node
/// (a rename, a copied config) or another role is refused before anything starts — the node
/// must never act, or conclude anything about its membership, under a name that is not its own.
fn check_identity(config: &Config, id: Option<&herd_storage::identity::Identity>) -> Result<(), StartError> {
    let Some(id) = id else { return Ok(()) };
    let dir = config.data_dir.display();
    if id.name != config.name {
        return Err(StartError::NotThisNode(format!(
            "data_dir {dir} belongs to node {:?} (id {}, cluster {}), but the config names this node {:?}. \
             To run it as before, put name = {:?} back in the config. To rename it: `herd node remove {}` \
             on another node, empty {dir}, and join again under the new name (README: Renaming a node).",
            id.name, id.node_id, id.cluster_id, config.name, id.name, id.name
        )));
    }
    if let Some(role) = id.role.filter(|r| *r != config.role) {
        return Err(StartError::NotThisNode(format!(
            "data_dir {dir} belongs to node {:?} which joined as a {role}, but the config says role = {:?}. \
             To change a node's role: `herd node remove {}` on another node, empty {dir}, and join again.",
            id.name,
            config.role.to_string(),
            id.name
        )));
    }
    if config.cluster.membership.is_some() && id.client != config.is_client(Some(id.client)) {
        let (was, now) = if id.client { ("client", "learner") } else { ("learner", "client") };
        return Err(StartError::NotThisNode(format!(
            "data_dir {dir} belongs to node {:?} which joined as a {was}, but the config says [cluster] membership = {now:?}. \
             To change it: `herd node remove {}` on another node, empty {dir}, and join again.",
            id.name, id.name
        )));
    }
    Ok(())
}

/// The heartbeat agent over the env's sockets, answering pulses at once (under the stored
/// identity's key when this node is a member already).
fn heartbeat_agent(
    config: &Config,
    env: &Env,
    shutdown: watch::Receiver<bool>,
) -> Result<(Arc<Agent>, mpsc::Receiver<Notice>), StartError> {
    let addrs = env.heartbeat.iter().map(|(n, (_, a))| (n.clone(), *a)).collect();
    let sockets = env.heartbeat.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
    let (agent, notices) = Agent::with_sockets(&config.name, config.role, config.heartbeat.params(), sockets, addrs);
    match env.identity.load().map_err(StartError::Identity)? {
        Some(id) if !id.removed => {
            agent.set_key(env.pki.as_ref().and_then(|p| p.heartbeat_key()));
            agent.set_identity(id.node_id, &id.cluster_id);
        }
        _ => {}
    }
    agent.spawn(shutdown);
    Ok((agent, notices))
}

fn limits(config: &Config) -> Limits {
    Limits {
        max_frame: config.limits.max_frame_bytes,
        idle_timeout: Duration::from_millis(config.limits.cluster_idle_timeout_ms),
        max_connections: config.limits.max_cluster_connections,
        frame_timeout: Duration::from_millis(config.limits.cluster_frame_timeout_ms),
        ..Limits::default()
    }
}

/// The cluster node's settings; `client`: it runs outside Raft ([`Config::is_client`]).
fn node_settings(config: &Config, client: bool, limits: &Limits) -> NodeSettings {
    NodeSettings {
        name: config.name.clone(),
        role: config.role,
        advertise: config.advertise().to_string(),
        heartbeat_ms: config.raft.heartbeat_ms,
        election_timeout_ms: (config.raft.election_timeout_ms[0], config.raft.election_timeout_ms[1]),
        limits: limits.clone(),
        client,
    }
}

fn raft_node(
    settings: NodeSettings,
    connector: Arc<dyn herd_raft::transport::Connector>,
    log: LogStore,
    backend: Arc<dyn herd_storage::sm::Backend>,
    identity: Arc<dyn herd_storage::identity::IdentityStore>,
    pki: Option<Arc<herd_raft::tls::Pki>>,
) -> Arc<ClusterNode<LogStore>> {
    let node = ClusterNode::new(settings, connector, log, backend, identity);
    // What an admitted join writes: the node registered as it describes itself.
    node.set_join_policy(Arc::new(herd_raft::node::RegisterJoiner));
    if let Some(pki) = pki {
        node.set_pki(pki);
    }
    node
}

fn primary_settings(config: &Config) -> primary::Settings {
    primary::Settings {
        name: config.name.clone(),
        role: config.role,
        lease_ms: config.raft.election_timeout_ms[1],
        takeover_delay_ms: config.primary.takeover_delay_ms,
        notify_timeout: Duration::from_millis(config.primary.notify_timeout_ms),
        status_interval: Duration::from_millis(config.primary.status_interval_ms),
    }
}

fn reconciler(config: &Config, hypervisor: Arc<dyn crate::hypervisor::Hypervisor>) -> Arc<Reconciler> {
    let timeout = Duration::from_millis(config.hypervisor.shutdown_timeout_ms);
    let migration = Duration::from_millis(config.hypervisor.migration_timeout_ms);
    Arc::new(Reconciler::new(config.name.clone(), hypervisor, timeout).with_migration(
        &config.hypervisor.migrate_uri,
        config.hypervisor.parallel_migrations,
        migration,
    ))
}

fn fence_settings(config: &Config) -> crate::fence::manager::Settings {
    crate::fence::manager::Settings {
        name: config.name.clone(),
        role: config.role,
        max_parallel: config.fence.max_parallel,
        check_interval: Duration::from_millis(config.fence.check_interval_ms),
        call_timeout: Duration::from_millis(config.fence.call_timeout_ms),
        confirm_timeout: Duration::from_millis(config.fence.confirm_timeout_ms),
        retry_after_ms: config.fence.retry_after_ms,
    }
}

/// Readiness at startup: this node's own BMC, as far as it can reach it.
fn check_own_bmc(tasks: &Tasks, fencing: Option<&FencePolicy>, fencer: &dyn Fencer) {
    let Some(p) = fencing else {
        tracing::warn!("no [fencing] section: this node cannot be fenced, and its VMs are not recovered if it fails");
        return;
    };
    let (agent, bmc) = (fencer.agent(p), p.bmc.clone());
    tasks.spawn(async move {
        let (status, check) = (crate::fence::agent::Action::Status, crate::fence::agent::Purpose::Check);
        match agent.call_for(status, Duration::from_secs(5), check).await {
            Ok(power) => tracing::info!(%bmc, ?power, "own BMC answers: this node can be fenced"),
            Err(e) => tracing::warn!(%bmc, "own BMC check failed (the primary checks it too): {e}"),
        }
    });
}

/// Resumes membership from disk; whether this node is a member.
async fn resume(daemon: &Daemon) -> Result<bool, StartError> {
    let resumed = daemon.node.resume().await.map_err(StartError::Resume)?;
    daemon.resumed.store(true, Ordering::Release);
    if resumed {
        tracing::info!("resumed cluster membership from disk");
    } else if daemon.node.is_removed() {
        tracing::warn!(
            "this node was removed from its cluster; wipe {} to join again",
            daemon.config.data_dir.display()
        );
    } else {
        tracing::info!("not a cluster member yet: run `herd init-cluster` or `herd join-cluster`");
    }
    Ok(resumed)
}

/// Latency histograms fed by the write path and the heartbeat.
fn observe(daemon: &Daemon) {
    let m = daemon.metrics.clone();
    daemon.node.set_write_observer(Arc::new(move |d| m.proposal_seconds.observe(d.as_secs_f64())));
    let m = daemon.metrics.clone();
    daemon.agent.set_rtt_observer(Arc::new(move |d| m.pulse_rtt_seconds.observe(d.as_secs_f64())));
}

impl Running {
    /// A service stop (not a host shutdown: VMs keep running): duties off, `daemon_state
    /// stop` recorded with its `return_by`, Raft shut down. After `herd node shutdown`
    /// (`host_shutdown`: the node is flushed and `shutdown` recorded), nothing is recorded.
    pub async fn stop(self, host_shutdown: bool) {
        service::stopping();
        if host_shutdown {
            tracing::info!("stopping for a host shutdown (flushed, daemon_state shutdown recorded)");
        } else {
            tracing::info!("stopping (service stop, not a host shutdown: VMs keep running)");
        }
        self.tasks.abort_all();
        self.daemon.tasks.abort_all();
        // Duties go first: the addresses must be off before this node stops being able to act.
        let _ = self.duty_stop_tx.send(true);
        let _ = self.duty_task.await;
        if !host_shutdown {
            self.daemon.record_stop().await;
        }
        let _ = self.shutdown_tx.send(true);
        self.daemon.node.shutdown().await;
        let _ = self.cluster_server.await;
        let applied = self.daemon.node.local().map(|m| m.view.read().last_applied.map_or(0, |l| l.index));
        tracing::info!(applied_index = applied.unwrap_or(0), "stopped");
    }

    /// Returns once `herd node shutdown` has flushed this node and recorded `shutdown`.
    pub async fn host_shutdown(&self) {
        self.daemon.host_shutdown.notified().await
    }

    /// Stops the daemon when this is sent `true` (the admin socket's and metrics' servers).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Returns once this node must restart to recover from a storage error (see `storage`);
    /// pending forever otherwise.
    pub async fn restart_needed(&self) {
        let mut r = self.restart.clone();
        if r.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
