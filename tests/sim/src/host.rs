//! One simulated node: its config (parsed and validated like a real one), its `Env` of
//! simulated IO, `herd::daemon::start`, and an inbox through which the client's admin
//! requests are answered on this host (so their network traffic is this host's).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use herd::config::Config;
use herd::daemon::{self, Env, HypervisorOpener};
use herd::hypervisor::Hypervisor;
use herd::primary::duties::{Addresses, FloatingIp};
use herd::stats::FixedStats;
use herd_storage::model::NodeStats;
use openraft_rt::deterministic_rng::DeterministicRng;
use tokio::sync::mpsc;

use crate::bmc::{bmc_addr, SimFencer};
use crate::net::{SimConnector, SimListener, SimSocket, CLUSTER_PORT, NETWORKS};
use crate::world::World;

/// Every simulated host's figures: room for all the simulation's VMs on any one host.
fn stats() -> NodeStats {
    NodeStats { cpu_count: 16, load_milli: 100, mem_total_mib: 65_536, mem_used_mib: 2_048, ..NodeStats::default() }
}

/// The nodes whose policy self-fences (`recover-after-self-fence`, by index: h2), and how.
pub const SELF_FENCING: [usize; 1] = [4];
const SELF_FENCE: &str = "failed_fence = \"recover-after-self-fence\"\nself_fence_after_ms = 8000\n\
                          watchdog = \"/dev/watchdog\"\nwatchdog_timeout_ms = 5000\n";
/// Its watchdog's timeout, as `SELF_FENCE` arms it.
pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(5);

/// The cluster's floating address (only ever held in the world's record).
pub const FLOATING_IP: &str = "192.0.2.10/24 dev sim0";

/// The primary's floating addresses on machine `machine`: recorded in the world, the ground
/// truth of "at most one primary" (what the duties did, not what herd thinks it holds).
pub struct SimAddresses {
    pub world: World,
    pub machine: usize,
}

impl Addresses for SimAddresses {
    fn add<'a>(&'a self, _f: &'a FloatingIp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if self.world.lock().address_holders.insert(self.machine) {
                self.world.trace(format!("{}: floating address up", self.world.name(self.machine)));
            }
            Ok(())
        })
    }

    fn remove<'a>(&'a self, _f: &'a FloatingIp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if self.world.lock().address_holders.remove(&self.machine) {
                self.world.trace(format!("{}: floating address down", self.world.name(self.machine)));
            }
            Ok(())
        })
    }
}

/// Node `i`'s config: production defaults except where the simulation must be quicker
/// (keepalive, reconcile interval, BMC checks) — the values the cluster tests use.
pub fn config(world: &World, i: usize, dir: &Path) -> Result<Config, String> {
    let (name, coordinator, clients) = {
        let w = world.lock();
        (w.machines[i].name.clone(), w.machines[i].coordinator, w.clients)
    };
    // Hypervisors are clients by default; learners are written out (clusters made before).
    let membership = if coordinator || clients { "" } else { "membership = \"learner\"\n" };
    let ip = turmoil::lookup(name.as_str());
    let role = if coordinator { "coordinator" } else { "hypervisor" };
    let nets: String = NETWORKS.iter().map(|(n, p)| format!("{n} = \"{ip}:{p}\"\n")).collect();
    let text = format!(
        "name = \"{name}\"\nrole = \"{role}\"\ndata_dir = \"{data}\"\nadmin_socket = \"{sock}\"\n\
         [cluster]\nlisten = \"0.0.0.0:{CLUSTER_PORT}\"\nadvertise = \"{ip}:{CLUSTER_PORT}\"\n{membership}\
         [heartbeat.networks]\n{nets}\
         [keepalive]\ninterval_ms = 1000\n\
         [hypervisor]\nuri = \"test:///sim\"\nshutdown_timeout_ms = 2000\nreconcile_interval_ms = 500\n\
         [fence]\ncheck_interval_ms = 1000\ncall_timeout_ms = 1000\nconfirm_timeout_ms = 3000\nretry_after_ms = 10000\n\
         [primary]\nfloating_ips = [\"{FLOATING_IP}\"]\n\
         [fencing]\nbmc = \"{bmc}\"\nuser = \"admin\"\npassword_file = \"{pw}\"\n{self_fence}",
        self_fence = if SELF_FENCING.contains(&i) { SELF_FENCE } else { "" },
        data = dir.join(&name).display(),
        sock = dir.join(format!("{name}.sock")).display(),
        bmc = bmc_addr(i),
        pw = dir.join("bmc-password").display(),
    );
    Config::from_toml(&format!("{name} (simulated)"), &text).map_err(|e| e.to_string())
}

/// The host future for node `i`: starts its daemon over simulated IO and serves its inbox
/// until the host is crashed.
pub async fn run(world: World, i: usize, dir: Arc<tempfile::TempDir>) -> turmoil::Result {
    let (seed, name) = {
        let mut w = world.lock();
        w.machines[i].boots += 1;
        let m = &w.machines[i];
        (w.seed ^ ((i as u64 + 1) << 40) ^ (m.boots << 20), m.name.clone())
    };
    DeterministicRng::<openraft::TokioRuntime>::scope(seed, async move {
        let config = config(&world, i, dir.path())?;
        let mut heartbeat = std::collections::BTreeMap::new();
        let ip = turmoil::lookup(name.as_str());
        for (net, port) in NETWORKS {
            let s = SimSocket::bind(world.clone(), i, net, port).await?;
            heartbeat.insert(
                net.to_string(),
                (Arc::new(s) as Arc<dyn herd::heartbeat::agent::DatagramSocket>, (ip, port).into()),
            );
        }
        let (log, backend, identity, mark, hv) = {
            let w = world.lock();
            let m = &w.machines[i];
            (m.log.clone(), m.backend.clone(), m.identity.clone(), m.mark.clone(), m.hv.clone())
        };
        let log_probe = log.clone();
        let hv: Arc<dyn Hypervisor> = Arc::new(hv);
        let opener: HypervisorOpener = Box::pin(async move { Ok(hv) });
        let env = Env {
            log: log.into(),
            backend: Arc::new(backend),
            identity: Arc::new(identity),
            mark: Arc::new(mark),
            connector: Arc::new(SimConnector),
            listener: Arc::new(SimListener::bind(CLUSTER_PORT).await?),
            // Plain simulated TCP: the simulation does not model TLS (see README).
            pki: None,
            heartbeat,
            hypervisor: Some(opener),
            fencer: Arc::new(SimFencer { world: world.clone(), from: i }),
            addresses: Arc::new(SimAddresses { world: world.clone(), machine: i }),
            host_stats: Arc::new(FixedStats(stats())),
            storage_probe: Arc::new(SimProbe(log_probe)),
            watchdogs: Arc::new(crate::watchdog::SimWatchdog {
                world: world.clone(),
                machine: i,
                timeout: WATCHDOG_TIMEOUT,
            }),
        };
        let running = match daemon::start(config, env).await {
            Ok(r) => r,
            Err(e) => {
                // The process exits; systemd starts it again after RestartSec.
                world.trace(format!("{name}: daemon start failed: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                world.lock().restart_requests.push(i);
                std::future::pending::<()>().await;
                return Ok(());
            }
        };
        let (tx, mut rx) = mpsc::channel::<crate::world::AdminCall>(16);
        {
            let mut w = world.lock();
            w.machines[i].daemon = Some(running.daemon.clone());
            w.machines[i].inbox = Some(tx);
        }
        world.trace(format!("{name}: daemon started"));
        let serve = async {
            while let Some(call) = rx.recv().await {
                let d = running.daemon.clone();
                herd_storage::types::spawn(async move {
                    let out = herd::admin::handle(&d, call.req).await;
                    let _ = call.reply.send(out);
                });
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = running.restart_needed() => {
                // Production `exec`s itself here; the driver restarts the host.
                world.trace(format!("{name}: restarting after a storage error"));
                world.lock().restart_requests.push(i);
            }
        }
        // The inbox closes only when the world drops it: stay up until crashed.
        std::future::pending::<()>().await;
        Ok(())
    })
    .await
}

/// The simulated store's probe: it takes writes unless the storage fault is on.
struct SimProbe(herd_storage::mem_store::MemLogStore);

impl herd::daemon::storage::StorageProbe for SimProbe {
    fn probe(&self) -> BoxFuture<'_, std::io::Result<()>> {
        let failing = self.0.failing();
        Box::pin(async move {
            if failing {
                Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device (simulated)"))
            } else {
                Ok(())
            }
        })
    }
}

/// How long the client waits for one admin answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
