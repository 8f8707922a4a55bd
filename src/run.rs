//! The production daemon process: the production `Env`, the daemon's logic (`daemon::start`),
//! the admin socket, metrics and signals, until SIGTERM or SIGINT (a service stop) or
//! `herd node shutdown` (a host shutdown).

use std::sync::Arc;
use std::time::Duration;

use crate::admin;
use crate::config::Config;
use crate::daemon::{self, Env, StartError};
use crate::heartbeat::agent::Agent;

/// Why the daemon process could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Admin(#[from] admin::BindError),
}

/// How the daemon process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT.
    Stopped,
    /// `herd node shutdown`: flushed, `daemon_state shutdown` recorded.
    HostShutdown,
    /// Raft stopped on a storage error and `data_dir` takes writes again: the process starts
    /// afresh in place (`exec`, same pid), recovering from disk as after a crash.
    Restart,
}

/// Descriptors beyond the cluster port's connections: the admin socket, sled's files, the
/// heartbeat sockets, libvirt and IPMI.
const OTHER_FILES: u64 = 1024;

/// Raises this process's soft limit on open files towards the hard one, so the cluster port can
/// hold `max_cluster_connections` (each hypervisor outside Raft holds a session and leader
/// connections; the usual soft limit of 1024 is below a few hundred of them). A refusal is said
/// at WARN and the daemon runs on: the port's own cap then meets EMFILE first.
fn raise_open_files(max_cluster_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = u64::try_from(max_cluster_connections).unwrap_or(u64::MAX).saturating_add(OTHER_FILES);
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < want => {
            let to = want.min(hard);
            match setrlimit(Resource::RLIMIT_NOFILE, to, hard) {
                Ok(()) if to < want => tracing::warn!(
                    "open files limited to {to} (hard limit), below the {want} that max_cluster_connections needs"
                ),
                Ok(()) => tracing::debug!("open-file limit raised from {soft} to {to}"),
                Err(e) => tracing::warn!("open-file limit stays {soft} ({e}); max_cluster_connections needs {want}"),
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("open-file limit unknown: {e}"),
    }
}

/// Runs the daemon until SIGTERM or SIGINT, or until it must restart itself.
pub async fn run(config: Config) -> Result<Exit, RunError> {
    let listen = config.listen_addr().map_err(StartError::Config)?;
    raise_open_files(config.limits.max_cluster_connections);
    let env = Env::production(&config).await?;
    let admin_listener = admin::bind(&config.admin_socket, config.admin_socket_group.as_deref())?;
    let access = admin::AccessPolicy::new(config.admin_socket_group.as_deref(), config.admin_group_access)
        .map_err(StartError::Config)?;
    let metrics_addr = config.metrics.addr().map_err(StartError::Config)?;
    // The runtime's own lateness (pauses), and the watchdog against a runaway real-time thread.
    let lease = Duration::from_millis(config.raft.election_timeout_ms[1]);
    let joined_as_client = env.identity.load().map_err(StartError::Identity)?.map(|i| i.client);
    let tick =
        if config.is_client(joined_as_client) { crate::sched::CLIENT_MONITOR_TICK } else { crate::sched::MONITOR_TICK };
    let pause_monitor = herd_storage::types::spawn(crate::sched::monitor(lease, tick));
    crate::sched::start_watchdog();
    let running = daemon::start(config.clone(), env).await?;
    let daemon = running.daemon.clone();
    tracing::info!(listen = %listen, socket = %config.admin_socket.display(), "serving");
    let admin_server = herd_storage::types::spawn(admin::serve(
        admin_listener,
        Arc::new(admin::DaemonHandler(daemon.clone())),
        access,
        Duration::from_millis(config.limits.admin_idle_timeout_ms),
        running.shutdown_signal(),
    ));
    if let Some(addr) = metrics_addr {
        let listener =
            crate::metrics::bind(addr).await.map_err(|source| StartError::Listen { addr: addr.to_string(), source })?;
        let scrape = Arc::new(crate::metrics::Scrape {
            metrics: daemon.metrics.clone(),
            node: daemon.node.clone(),
            agent: daemon.agent.clone(),
            primary: daemon.primary.clone(),
            cluster_port: daemon.cluster_port.clone(),
        });
        herd_storage::types::spawn(crate::metrics::serve(listener, scrape, running.shutdown_signal()));
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    // SIGUSR2 writes the heartbeat picture (as `herd heartbeat --json` shows it) to the log.
    let dump_task = herd_storage::types::spawn(dump_heartbeat_on_sigusr2(daemon.agent.clone()));
    let exit = tokio::select! {
        _ = wait_for_signal() => Exit::Stopped,
        _ = running.restart_needed() => Exit::Restart,
        _ = running.host_shutdown() => Exit::HostShutdown,
    };
    dump_task.abort();
    pause_monitor.abort();
    running.stop(exit == Exit::HostShutdown).await;
    let _ = admin_server.await;
    let _ = std::fs::remove_file(&config.admin_socket);
    Ok(exit)
}

async fn dump_heartbeat_on_sigusr2(agent: Arc<Agent>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        tracing::warn!("cannot install the SIGUSR2 handler");
        return;
    };
    while usr2.recv().await.is_some() {
        tracing::info!(heartbeat = %agent.report(), "heartbeat picture (SIGUSR2)");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
