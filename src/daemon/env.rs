//! `Env`: everything the daemon does IO through, and its production form.

use std::collections::BTreeMap;
use std::sync::Arc;

use herd_raft::tls::{Pki, TlsConnector, TlsListener};
use herd_raft::transport::{Connector, Listener, TcpConnector, TcpFromConnector, TcpListener};
use herd_storage::identity::IdentityStore;
use herd_storage::log_store::LogStore;
use herd_storage::sled_store;
use herd_storage::sm::Backend;

use super::StartError;
use crate::config::Config;
use crate::heartbeat::agent::DatagramSocket;
use crate::heartbeat::NetName;
use crate::hypervisor::Hypervisor;
use crate::stats::{self, HostStats};

/// Everything the daemon does IO through: production builds it from the config (sled, TCP,
/// UDP, libvirt, IPMI, /proc); the simulation from its simulated equivalents. The daemon's
/// logic is the same over either.
pub struct Env {
    pub log: LogStore,
    pub backend: Arc<dyn Backend>,
    pub identity: Arc<dyn IdentityStore>,
    /// The log mark, outside `data_dir` (see `herd_storage::mark`).
    pub mark: Arc<dyn herd_storage::mark::MarkStore>,
    /// Opens cluster connections (mutual TLS over TCP in production).
    pub connector: Arc<dyn Connector>,
    /// The cluster port, already bound (mutual TLS in production).
    pub listener: Arc<dyn Listener>,
    /// The cluster CA and this node's certificate, behind `connector` and `listener`. `None`
    /// only where the transport authenticates nobody (the simulation).
    pub pki: Option<Arc<Pki>>,
    /// One bound datagram socket per heartbeat network, and the address it is reached at.
    pub heartbeat: BTreeMap<NetName, (Arc<dyn DatagramSocket>, std::net::SocketAddr)>,
    /// Opens this node's hypervisor (none on a coordinator-only node).
    pub hypervisor: Option<HypervisorOpener>,
    pub fencer: Arc<dyn crate::fence::agent::Fencer>,
    /// How the primary's floating addresses go on and off this host.
    pub addresses: Arc<dyn crate::primary::duties::Addresses>,
    pub host_stats: Arc<dyn HostStats>,
    /// Whether the store takes writes (probed after Raft stopped on a storage error).
    pub storage_probe: Arc<dyn super::storage::StorageProbe>,
    /// Where the self-fence guard arms its watchdog (`[fencing] watchdog`).
    pub watchdogs: Arc<dyn crate::fence::selffence::WatchdogDevice>,
}

impl Env {
    /// The production environment: sled in `data_dir`, the heartbeat sockets and the cluster
    /// port bound, libvirt opened.
    pub async fn production(config: &Config) -> Result<Env, StartError> {
        let listen = config.listen_addr().map_err(StartError::Config)?;
        private_dir(&config.data_dir)
            .map_err(|e| StartError::Config(format!("data_dir {}: {e}", config.data_dir.display())))?;
        let stores = sled_store::open(&config.data_dir.join("db"))?;
        private_files(&config.data_dir.join("db"))
            .map_err(|e| StartError::Config(format!("data_dir {}: {e}", config.data_dir.display())))?;
        let mark_path = config.log_mark_path();
        let mark = herd_storage::mark::FileMark::open(&mark_path)
            .map_err(|e| StartError::Config(format!("log_mark {}: {e}", mark_path.display())))?;
        let networks = config.heartbeat_networks().map_err(|(k, e)| StartError::Config(format!("{k}: {e}")))?;
        let mut heartbeat = BTreeMap::new();
        for (net, addr) in &networks {
            let socket = crate::heartbeat::agent::bind_udp(*addr).map_err(|e| {
                StartError::Heartbeat(std::io::Error::new(e.kind(), format!("heartbeat network {net} ({addr}): {e}")))
            })?;
            heartbeat.insert(net.clone(), (Arc::new(socket) as Arc<dyn DatagramSocket>, *addr));
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen { addr: listen.to_string(), source })?;
        let pki = Arc::new(Pki::open(config.data_dir.join("tls"))?);
        let listener = TlsListener { inner: Box::new(listener), pki: pki.clone() };
        // Connections leave from the address this node listens on, when it names one.
        let tcp: Arc<dyn Connector> = match listen.ip() {
            ip if ip.is_unspecified() => Arc::new(TcpConnector),
            ip => Arc::new(TcpFromConnector(ip)),
        };
        let connector = TlsConnector { inner: tcp, pki: pki.clone() };
        let unseal_with = pki.clone();
        let fencer = crate::fence::registry::AgentRegistry::new()
            .unsealing_with(Arc::new(move |sealed: &str| unseal_with.unseal(sealed)));
        // Opened by `start` once the heartbeat responder answers (a slow libvirtd must not
        // make a restarted node look dead).
        let hypervisor: Option<HypervisorOpener> = config.hypervisor.uri.clone().map(|uri| {
            Box::pin(async move {
                let hv = crate::hypervisor::libvirt::Libvirt::open(&uri)
                    .await
                    .map_err(|e| StartError::Config(format!("hypervisor.uri: {e}")))?;
                Ok(Arc::new(hv) as Arc<dyn Hypervisor>)
            }) as HypervisorOpener
        });
        Ok(Env {
            log: stores.log.into(),
            backend: Arc::new(stores.sm),
            identity: Arc::new(stores.local),
            mark: Arc::new(mark),
            connector: Arc::new(connector),
            listener: Arc::new(listener),
            pki: Some(pki),
            heartbeat,
            hypervisor,
            fencer: Arc::new(fencer),
            addresses: Arc::new(crate::primary::duties::IpCommand),
            host_stats: Arc::new(stats::ProcStats),
            storage_probe: Arc::new(super::storage::DirProbe(config.data_dir.clone())),
            watchdogs: Arc::new(crate::fence::selffence::DeviceFile),
        })
    }
}

/// Opens a hypervisor connection when awaited.
pub type HypervisorOpener = futures::future::BoxFuture<'static, Result<Arc<dyn Hypervisor>, StartError>>;

/// Creates `dir` as 0700, or makes an existing one 0700: it holds the cluster's keys and the
/// replicated state (sealed BMC passwords included); nobody else may read it.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::metadata(dir) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            tracing::warn!(data_dir = %dir.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "data_dir was readable by others: made 0700");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Ok(_) => Ok(()),
        Err(_) => std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir),
    }
}

/// Makes what the store created under `dir` private: directories 0700, files 0600.
fn private_files(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?; // DirEntry::metadata does not follow symlinks
        let mode = if meta.is_dir() { 0o700 } else { 0o600 };
        if (meta.is_dir() || meta.is_file()) && meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
        }
        if meta.is_dir() {
            private_files(&entry.path())?;
        }
    }
    Ok(())
}
