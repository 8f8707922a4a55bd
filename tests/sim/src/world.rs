//! What outlives a crashed daemon, and what the invariants read.
//!
//! Every simulated host runs on the one simulation thread, so a plain `Mutex` is never
//! contended; it is there because herd's seams (`Hypervisor`, `Fencer`) are `Send + Sync`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herd::admin::{AdminError, AdminRequest, ErrorCode};
use herd::daemon::Daemon;
use herd::hypervisor::memory::MemoryHypervisor;
use herd_storage::identity::MemIdentity;
use herd_storage::mark::MemMark;
use herd_storage::mem_store::{MemBackend, MemLogStore};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// The simulation's answer when a node's daemon is not running.
pub const NODE_DOWN: &str = "node down";

/// One admin request for a node, answered on its own host.
pub struct AdminCall {
    pub req: AdminRequest,
    pub reply: oneshot::Sender<Result<Value, AdminError>>,
}

/// How a node's BMC answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BmcMode {
    Normal,
    /// Never answers (the caller's deadline ends the call).
    Silent,
    /// Answers after this long.
    Late(Duration),
    /// Answers at once, but carries a power-off out this long after acknowledging it (as real
    /// BMCs do).
    SlowOff(Duration),
}

/// A power-off request that reached a BMC: when, from which machine's fence executor, for
/// which machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerOffSent {
    pub at: Duration,
    pub from: usize,
    pub victim: usize,
}

/// A request from a BMC to the driver: power this host off (crash it) or on (restart it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerRequest {
    Off(usize),
    On(usize),
}

/// One simulated machine.
pub struct Machine {
    pub name: String,
    pub coordinator: bool,
    pub log: MemLogStore,
    pub backend: MemBackend,
    pub identity: MemIdentity,
    /// The log mark: outside the store, so a `Restore` fault does not take it back.
    pub mark: MemMark,
    pub hv: MemoryHypervisor,
    pub powered: bool,
    /// Since when it has been powered off through its BMC (`None` while powered).
    pub powered_off_at: Option<Duration>,
    /// Its last time off, once powered on again: (off, on).
    pub was_off: Option<(Duration, Duration)>,
    pub bmc: BmcMode,
    /// The running daemon (None while crashed or powered off).
    pub daemon: Option<Arc<Daemon>>,
    pub inbox: Option<mpsc::Sender<AdminCall>>,
    /// Daemon starts so far (each boot gets its own seed).
    pub boots: u64,
    /// A copy of the store, taken by a `Restore` fault and put back when it ends.
    pub backup: Option<crate::faults::Backup>,
    /// Its watchdog, once a self-fence guard armed it: when it was last fed, and how long it
    /// waits unfed before it resets the machine. A crashed daemon leaves it armed (as an
    /// unexpected close does); a power-off disarms it.
    pub watchdog: Option<crate::watchdog::Armed>,
}

/// A pulse as the invariants see it: sent by coordinator `from` at `sent`, carrying `from`'s
/// view, in which every node was last heard at these times.
#[derive(Clone, Debug)]
pub struct SummaryProof {
    pub sent: Duration,
    pub heard: Vec<Option<Duration>>,
}

/// Timely datagrams remembered per (receiver, sender).
pub const KEEP_HEARD: usize = 16;

/// Pulses kept per (receiver, coordinator): 8 s at the default 100 ms interval.
pub const KEEP_PROOFS: usize = 80;

pub struct Inner {
    pub seed: u64,
    /// Hypervisors run as clients outside Raft.
    pub clients: bool,
    pub machines: Vec<Machine>,
    pub by_ip: BTreeMap<IpAddr, usize>,
    /// Heartbeat datagrams on (network, from, to) are dropped.
    pub cuts: BTreeSet<(String, usize, usize)>,
    /// Probability in percent that a heartbeat datagram is lost.
    pub udp_loss_pct: u32,
    /// The newest heartbeat datagrams `to` received in time (within a heartbeat interval, any
    /// network) from `from`, as (sent, received), oldest first: `heard[to][from]` (at most
    /// [`KEEP_HEARD`]).
    pub heard: Vec<Vec<VecDeque<(Duration, Duration)>>>,
    /// Datagrams in flight, by (from, to, hash of the bytes): when they were sent, and (for
    /// pulses) what `from` had heard by then.
    pub in_flight: BTreeMap<(usize, usize, [u8; 32]), SummaryProof>,
    /// When each coordinator sent its pulse of period `seq` on a network: an answer is evidence
    /// only as a timely round trip (an answer to an old pulse, released late from a held link,
    /// may have been sent long ago for all its receiver can tell).
    pub pulses_sent: BTreeMap<(usize, String, u64), Duration>,
    /// The pulses each node received lately from each coordinator, oldest first, with when
    /// each arrived: `received[to][from]` (at most [`KEEP_PROOFS`]).
    pub received: Vec<Vec<VecDeque<(Duration, SummaryProof)>>>,
    pub power_requests: Vec<PowerRequest>,
    /// Daemons that ended and must start again, as systemd would restart them (`Restart=always`):
    /// one that recovered from a storage error (it `exec`s itself in production), or one whose
    /// start failed.
    pub restart_requests: Vec<usize>,
    /// Every power-off request that reached a BMC, in order (ground truth for the fencing
    /// token invariant).
    pub power_offs: Vec<PowerOffSent>,
    /// Power-offs acknowledged by a slow BMC and due at these times.
    pub delayed_offs: Vec<(Duration, usize)>,
    /// Armed by the schedule: crash the primary as soon as a fence is decided, and make the
    /// victim's BMC carry its power-off out this long later.
    pub crash_primary_on_fence: Option<Duration>,
    /// The machines on which the floating address is up now (what the primary duties did;
    /// a crashed daemon's are taken off as the unit's `herd release` would).
    pub address_holders: BTreeSet<usize>,
    /// Machines that fault crashed (restarted when it ends).
    pub fence_crashed: Vec<usize>,
    /// Machines a watchdog reset, and when each boots again.
    pub reboots: Vec<(Duration, usize)>,
    pub trace: Vec<String>,
    pub rng: StdRng,
    /// Set by the client once the cluster is set up (the faults start a second later).
    pub setup_done: bool,
    /// Where the setup defines the VMs (`None`: placed by herd) — the isolation scenario puts
    /// them all on the node it isolates.
    pub place_on: Option<String>,
    /// Set by the driver once the faults have stopped and the network is healed.
    pub healed: bool,
    /// Set by the client once it has readied fenced nodes and restarted VMs after the heal.
    pub settled: bool,
    /// Set by the driver when the run is over (the client finishes).
    pub finished: bool,
    /// Primary hand-overs the schedule asks the client for.
    pub handover_requests: u32,
    /// The follower outside Raft (`follower.rs`) once it runs: its state and session.
    pub follower: Option<(herd_storage::sm::StateView, tokio::sync::watch::Receiver<herd_raft::follow::SessionStatus>)>,
    /// The follower's last acknowledgement as it saw it: the coordinator (machine) that
    /// answered and when the poll answered was sent (simulated time), with how often it moved.
    pub follower_acked: Option<(usize, Duration, u64)>,
    /// The faults in force on the cluster links (Raft, sessions), composed (`links.rs`).
    pub links: crate::links::Links,
}

#[derive(Clone)]
pub struct World(Arc<Mutex<Inner>>);

thread_local! {
    /// Simulated time as the driver last saw it (outside any host, turmoil has no clock).
    static DRIVER_NOW: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
}

/// Simulated time since the start, the same on every host and in the driver.
pub fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_else(|| DRIVER_NOW.with(std::cell::Cell::get))
}

/// The driver's clock, set before each step.
pub fn set_driver_now(t: Duration) {
    DRIVER_NOW.with(|c| c.set(t));
}

impl Inner {
    /// When `from` last sent something `to` has received in time by now.
    pub fn last_heard(&self, to: usize, from: usize) -> Option<Duration> {
        self.heard[to][from].iter().map(|(sent, _)| *sent).max()
    }
}

impl World {
    pub fn new(seed: u64, names: &[(&str, bool)]) -> World {
        let n = names.len();
        let machines = names
            .iter()
            .map(|(name, coordinator)| Machine {
                name: (*name).to_string(),
                coordinator: *coordinator,
                log: MemLogStore::new(),
                backend: MemBackend::new(),
                identity: MemIdentity::default(),
                mark: MemMark::default(),
                hv: MemoryHypervisor::new(),
                powered: true,
                powered_off_at: None,
                bmc: BmcMode::Normal,
                daemon: None,
                inbox: None,
                boots: 0,
                backup: None,
                watchdog: None,
                was_off: None,
            })
            .collect();
        World(Arc::new(Mutex::new(Inner {
            seed,
            clients: false,
            machines,
            by_ip: BTreeMap::new(),
            cuts: BTreeSet::new(),
            udp_loss_pct: 0,
            heard: vec![vec![VecDeque::new(); n]; n],
            in_flight: BTreeMap::new(),
            pulses_sent: BTreeMap::new(),
            received: vec![vec![VecDeque::new(); n]; n],
            power_requests: Vec::new(),
            restart_requests: Vec::new(),
            power_offs: Vec::new(),
            delayed_offs: Vec::new(),
            crash_primary_on_fence: None,
            address_holders: BTreeSet::new(),
            fence_crashed: Vec::new(),
            reboots: Vec::new(),
            trace: Vec::new(),
            rng: StdRng::seed_from_u64(seed ^ 0x005e_ed0f_c11e),
            setup_done: false,
            place_on: None,
            follower: None,
            follower_acked: None,
            links: Default::default(),
            healed: false,
            settled: false,
            finished: false,
            handover_requests: 0,
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a line to the trace, stamped with simulated time.
    pub fn trace(&self, line: impl AsRef<str>) {
        static LIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let t = now();
        let line = format!("{:>8.3} {}", t.as_secs_f64(), line.as_ref());
        // HERD_SIM_TRACE_LIVE=1 prints each line as it happens (a run that panics prints no trace).
        if *LIVE.get_or_init(|| std::env::var_os("HERD_SIM_TRACE_LIVE").is_some()) {
            eprintln!("{line}");
        }
        self.lock().trace.push(line);
    }

    pub fn len(&self) -> usize {
        self.lock().machines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn name(&self, i: usize) -> String {
        self.lock().machines[i].name.clone()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.lock().machines.iter().position(|m| m.name == name)
    }

    /// Sends `req` to node `i`'s daemon and waits up to `timeout` for its answer.
    /// The simulation's own failures (a node down, the client's timeout) come back as
    /// `unavailable` with a message of the simulation's.
    pub async fn call(&self, i: usize, req: AdminRequest, timeout: Duration) -> Result<Value, AdminError> {
        let down = |m: &str| AdminError::new(ErrorCode::Unavailable, m);
        let inbox = self.lock().machines[i].inbox.clone().ok_or_else(|| down(NODE_DOWN))?;
        let (tx, rx) = oneshot::channel();
        inbox.send(AdminCall { req, reply: tx }).await.map_err(|_| down(NODE_DOWN))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(down("node went down during the call")),
            Err(_) => Err(down("client timeout")),
        }
    }
}
