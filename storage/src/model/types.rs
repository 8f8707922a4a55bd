//! The objects of the replicated model and the commands that change them.
//!
//! State names are PVC's (`daemon_state`, `domain_state`, `router_state`), so that PVC users
//! read `herd` output without a glossary. Every type here is versioned by serde defaults:
//! new fields get `#[serde(default)]` so that older entries and snapshots still decode.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Raft's numeric node id, allocated by the leader from [`ClusterMeta::next_node_id`].
pub type NodeId = u64;

/// What a node does in the cluster. It comes from the node's own config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A Raft voter (up to five); runs the heartbeat agent; the leader is the primary.
    Coordinator,
    /// A Raft learner: receives all state, runs VMs, never votes.
    Hypervisor,
}

macro_rules! state_names {
    ($ty:ident { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The PVC-compatible name of this state.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?}; expected one of: {}",
                        stringify!($ty),
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}

state_names!(Role { Coordinator = "coordinator", Hypervisor = "hypervisor" });

/// The node daemon's lifecycle (PVC `daemonstate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DaemonState {
    Init,
    Run,
    Shutdown,
    /// The service stopped (not the host): VMs keep running, the node returns by `return_by_ms`.
    Stop,
    Dead,
    Fenced,
}
state_names!(DaemonState { Init = "init", Run = "run", Shutdown = "shutdown", Stop = "stop", Dead = "dead", Fenced = "fenced" });

/// Whether a node takes VMs (PVC `domainstate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    Ready,
    Flush,
    Flushed,
    Unflush,
    FenceFlush,
}
state_names!(DomainState { Ready = "ready", Flush = "flush", Flushed = "flushed", Unflush = "unflush", FenceFlush = "fence-flush" });

/// The coordinator role (PVC `routerstate`); hypervisors are `client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterState {
    Primary,
    Secondary,
    Takeover,
    Relinquish,
    Client,
}
state_names!(RouterState { Primary = "primary", Secondary = "secondary", Takeover = "takeover", Relinquish = "relinquish", Client = "client" });

impl DomainState {
    /// The flush/unflush state machine: `ready → flush → flushed → unflush → ready`; a flush
    /// or unflush under way can be turned round.
    pub fn may_become(self, to: DomainState) -> bool {
        use DomainState::*;
        matches!(
            (self, to),
            (Ready, Flush)
                | (Flush, Flushed)
                | (Flushed, Unflush)
                | (Unflush, Ready)
                | (Flush, Unflush)
                | (Unflush, Flush)
        ) || self == to
    }
}

impl RouterState {
    /// Whether a coordinator may move from `self` to `to` on its own.
    pub fn may_become(self, to: RouterState) -> bool {
        use RouterState::*;
        matches!(
            (self, to),
            (Takeover, Primary)
                | (Primary, Relinquish)
                | (Takeover, Relinquish)
                | (Relinquish, Secondary)
                | (Secondary, Secondary)
        )
    }

    /// The router state a node of `role` starts with.
    pub fn initial(role: Role) -> Self {
        match role {
            Role::Coordinator => RouterState::Secondary,
            Role::Hypervisor => RouterState::Client,
        }
    }
}

/// What a VM should be doing (PVC's VM states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Start,
    Restart,
    Shutdown,
    Stop,
    Disable,
    Fail,
    Migrate,
    MigrateLive,
    Unmigrate,
}
state_names!(VmState {
    Start = "start", Restart = "restart", Shutdown = "shutdown", Stop = "stop", Disable = "disable",
    Fail = "fail", Migrate = "migrate", MigrateLive = "migrate-live", Unmigrate = "unmigrate"
});

impl VmState {
    /// States in which the VM should be running (or about to run) on its node.
    pub fn wants_running(self) -> bool {
        matches!(self, VmState::Start | VmState::Restart | VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate)
    }
}

/// How a VM moves (`none`: live where possible, else shut down and start elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMethod {
    Live,
    Shutdown,
    #[default]
    None,
}
state_names!(MigrationMethod { Live = "live", Shutdown = "shutdown", None = "none" });

/// How a target node is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    /// Most free memory.
    #[default]
    Mem,
    /// Most memory left after everything assigned to the node (running or not).
    Memprov,
    /// Lowest load.
    Load,
    /// Fewest allocated vCPUs.
    Vcpus,
    /// Fewest running VMs.
    Vms,
}
state_names!(Selector { Mem = "mem", Memprov = "memprov", Load = "load", Vcpus = "vcpus", Vms = "vms" });

/// What libvirt last reported for a VM on its node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActualState {
    Running,
    Paused,
    Shutoff,
    Crashed,
    Missing,
    #[default]
    Unknown,
}
state_names!(ActualState { Running = "running", Paused = "paused", Shutoff = "shutoff", Crashed = "crashed", Missing = "missing", Unknown = "unknown" });

/// What `vm define` asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub uuid: String,
    pub name: String,
    /// The domain XML of record.
    pub xml: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Nodes the VM may run on (empty: any).
    #[serde(default)]
    pub node_limit: Vec<String>,
    #[serde(default)]
    pub autostart: bool,
    #[serde(default)]
    pub migration_method: MigrationMethod,
}

/// A VM as the cluster records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub state: VmState,
    /// The node it is assigned to.
    pub node: String,
    /// Where it lived before a temporary migration (`unmigrate` goes back there).
    #[serde(default)]
    pub last_node: Option<String>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub actual: ActualState,
    /// While a running VM moves: the node it must stop on first. The target starts it only once
    /// the source has released it (`ReleaseVm`): a VM never runs on two nodes.
    #[serde(default)]
    pub migrating_from: Option<String>,
    pub revision: u64,
}

/// Resource figures a node reports in its keepalive. Fixed-point integers, not floats, so the
/// model stays `Eq` and bit-for-bit deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStats {
    pub cpu_count: u32,
    /// 1-minute load average × 1000.
    pub load_milli: u64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub vms_running: u32,
    /// Memory of the running VMs on the node.
    pub mem_allocated_mib: u64,
    /// Memory of every VM assigned to the node, running or not.
    pub mem_provisioned_mib: u64,
    /// vCPUs of the running VMs on the node.
    pub vcpus_allocated: u32,
    /// Set when a collector missed its deadline and these figures are the last known ones.
    pub stale: bool,
    /// Domains the node's hypervisor runs or knows that the cluster does not manage: reported,
    /// never touched. At most [`MAX_UNMANAGED`] names.
    pub unmanaged_domains: Vec<String>,
}

/// Bound on the unmanaged domain names one keepalive carries.
pub const MAX_UNMANAGED: usize = 64;

/// What a node tells the leader about itself when it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewNode {
    pub name: String,
    pub role: Role,
    /// Address the cluster transport reaches this node on (`host:port`).
    pub cluster_addr: String,
}

/// A node as the cluster records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub role: Role,
    pub cluster_addr: String,
    pub daemon_state: DaemonState,
    pub domain_state: DomainState,
    pub router_state: RouterState,
    /// With `daemon_state = stop`: the leader time by which the daemon promised to be back.
    #[serde(default)]
    pub return_by_ms: Option<u64>,
    #[serde(default)]
    pub stats: NodeStats,
    /// Leader time of the last committed keepalive.
    #[serde(default)]
    pub last_keepalive_ms: Option<u64>,
    /// This node's heartbeat address (`ip:port`) on each heartbeat network, by network name.
    #[serde(default)]
    pub heartbeat: BTreeMap<String, String>,
    /// How this node is fenced, as it published it (None: it cannot be fenced).
    #[serde(default)]
    pub fencing: Option<super::fence::FencePolicy>,
    /// Its BMC's readiness and the fences of it.
    #[serde(default)]
    pub fence: super::fence::FenceStatus,
    pub joined_ms: u64,
    /// Log index of the command that last changed this record.
    pub revision: u64,
}

/// Cluster-wide metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub created_ms: u64,
    /// While on: no automatic fencing and no recovery (`DecideFence` refuses all but manual ones).
    pub maintenance: bool,
    /// SHA-256 (hex) of the cluster's first join token (unlimited until revoked); the tokens
    /// themselves are never stored.
    pub join_token_hashes: BTreeSet<String>,
    /// Tokens made by `herd token create`, by SHA-256 (hex): expiry and uses left.
    #[serde(default)]
    pub join_tokens: BTreeMap<String, JoinToken>,
    /// The next Raft node id to hand out. Ids are never reused.
    pub next_node_id: NodeId,
    pub revision: u64,
}

impl ClusterMeta {
    /// Whether the token with this SHA-256 (hex) admits a node at `now_ms` (leader time).
    pub fn token_usable(&self, token_hash: &str, now_ms: u64) -> bool {
        self.join_token_hashes.contains(token_hash)
            || self
                .join_tokens
                .get(token_hash)
                .is_some_and(|t| t.expires_ms.is_none_or(|e| now_ms < e) && t.uses_left != Some(0))
    }
}

/// A join token made by `herd token create`; only its hash is kept (the map's key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub created_ms: u64,
    /// Leader time from which it is refused (None: never expires).
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// Joins it may still admit (None: unlimited).
    #[serde(default)]
    pub uses_left: Option<u32>,
}

/// At most this many tokens made by `herd token create` exist at once.
pub const MAX_JOIN_TOKENS: usize = 64;

/// One line of the bounded cluster event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    pub time_ms: u64,
    pub kind: String,
    #[serde(default)]
    pub node: Option<String>,
    pub message: String,
}

/// The outcome of a request, remembered for deduplication of retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: u64,
    pub time_ms: u64,
    pub result: Result<Reply, ApplyError>,
}

/// Recently applied request ids and their outcomes, with the oldest found in O(log n).
///
/// Serialized as the plain map `id → record` (snapshots and stores keep that shape); the
/// order by log index is derived from it and rebuilt on decoding. One request per log index,
/// so the index names one id.
#[derive(Clone, Debug, Default)]
pub struct RequestLog {
    by_id: BTreeMap<String, RequestRecord>,
    /// Derived from `by_id`: each id under the index that applied it.
    by_index: BTreeMap<u64, String>,
}

impl RequestLog {
    pub fn get(&self, id: &str) -> Option<&RequestRecord> {
        self.by_id.get(id)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_id.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &RequestRecord)> {
        self.by_id.iter()
    }

    /// Remembers `record` under `id`, replacing what `id` or `record.index` held before.
    pub fn insert(&mut self, id: String, record: RequestRecord) {
        if let Some(old) = self.by_id.remove(&id) {
            self.by_index.remove(&old.index);
        }
        if let Some(other) = self.by_index.insert(record.index, id.clone()) {
            self.by_id.remove(&other);
        }
        self.by_id.insert(id, record);
    }

    /// Forgets the request applied at the smallest index and returns its id.
    pub fn pop_oldest(&mut self) -> Option<String> {
        let (_, id) = self.by_index.pop_first()?;
        self.by_id.remove(&id);
        Some(id)
    }
}

impl PartialEq for RequestLog {
    fn eq(&self, other: &Self) -> bool {
        self.by_id == other.by_id
    }
}

impl Eq for RequestLog {}

impl std::ops::Index<&str> for RequestLog {
    type Output = RequestRecord;

    fn index(&self, id: &str) -> &RequestRecord {
        &self.by_id[id]
    }
}

impl FromIterator<(String, RequestRecord)> for RequestLog {
    fn from_iter<I: IntoIterator<Item = (String, RequestRecord)>>(iter: I) -> Self {
        let mut log = RequestLog::default();
        for (id, record) in iter {
            log.insert(id, record);
        }
        log
    }
}

impl Serialize for RequestLog {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.by_id.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RequestLog {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<String, RequestRecord>::deserialize(d)?.into_iter().collect())
    }
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// `None` until `init-cluster`.
    pub meta: Option<ClusterMeta>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Monotonic leader time: the largest `time_ms` applied so far.
    pub clock_ms: u64,
    pub events: VecDeque<Event>,
    /// Recently applied request ids and their results (bounded).
    pub requests: RequestLog,
    /// VMs by name.
    pub vms: BTreeMap<String, VmRecord>,
}

impl State {
    /// The node with Raft id `id`, if any.
    pub fn node_by_id(&self, id: NodeId) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.id == id)
    }

    /// Checks the structural invariants of the model. Used after every apply in tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut ids = BTreeSet::new();
        for (name, node) in &self.nodes {
            if name != &node.name {
                return Err(format!("node keyed {name} is named {}", node.name));
            }
            if !ids.insert(node.id) {
                return Err(format!("node id {} used twice", node.id));
            }
            match &self.meta {
                Some(meta) if node.id < meta.next_node_id => {}
                _ => return Err(format!("node {name} has id {} not below next_node_id", node.id)),
            }
            if node.revision == 0 {
                return Err(format!("node {name} has revision 0"));
            }
        }
        for (name, vm) in &self.vms {
            if name != &vm.spec.name {
                return Err(format!("VM keyed {name} is named {}", vm.spec.name));
            }
            if !self.nodes.contains_key(&vm.node) {
                return Err(format!("VM {name} is assigned to unknown node {}", vm.node));
            }
            if vm.last_node.as_ref() == Some(&vm.node) {
                return Err(format!("VM {name}'s last_node is its node"));
            }
        }
        if self.events.len() > super::MAX_EVENTS {
            return Err("event log over its bound".into());
        }
        if self.requests.len() > super::MAX_REMEMBERED_REQUESTS {
            return Err("request memory over its bound".into());
        }
        Ok(())
    }
}

/// A replicated write: one or more operations applied atomically, identified by a client
/// request id so that a retry applies once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unique per logical write; retries reuse it.
    pub id: String,
    /// Leader wall-clock time in ms since the Unix epoch, stamped when the leader proposes it.
    pub time_ms: u64,
    pub ops: Vec<Op>,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req {} @{}:", self.id, self.time_ms)?;
        for op in &self.ops {
            write!(f, " {}", op.cmd.name())?;
            if let Some(rev) = op.expect_revision {
                write!(f, "(rev={rev})")?;
            }
        }
        Ok(())
    }
}

/// One command with an optional compare-and-set on the revision of the object it targets.
/// `expect_revision = Some(0)` means "the object must not exist".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub cmd: Command,
    #[serde(default)]
    pub expect_revision: Option<u64>,
}

impl From<Command> for Op {
    fn from(cmd: Command) -> Self {
        Op { cmd, expect_revision: None }
    }
}

/// Every change to cluster state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create the cluster and register its first node (id 1).
    InitCluster {
        cluster_id: String,
        token_hash: String,
        node: NewNode,
    },
    /// Admit a node presenting a join token; allocates its id.
    RegisterNode {
        node: NewNode,
        token_hash: String,
    },
    /// A new join token (`herd token create`): valid for `ttl_ms` from now, for `uses` joins.
    CreateJoinToken {
        token_hash: String,
        #[serde(default)]
        ttl_ms: Option<u64>,
        #[serde(default)]
        uses: Option<u32>,
    },
    /// Revoke the join token whose hash starts with `id` (at least 8 hex digits, unique).
    RevokeJoinToken {
        id: String,
    },
    /// Forget a node (after it left the Raft membership).
    RemoveNode {
        name: String,
    },
    /// A node's periodic report; also proves it can get writes committed. With `node_id`, it is
    /// refused unless the record under `name` has that id: the daemon of a removed node cannot
    /// write over the record of a new node that took its name.
    Keepalive {
        name: String,
        stats: NodeStats,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// A node's own lifecycle state; `node_id` as for `Keepalive`.
    SetDaemonState {
        name: String,
        state: DaemonState,
        return_by_ms: Option<u64>,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    SetMaintenance {
        on: bool,
    },
    /// A node's `domain_state`: an operator asks for `flush` or `unflush`; the node records
    /// `flushed` or `ready` when it is done (`node_id` as for `Keepalive` on those).
    SetDomainState {
        name: String,
        state: DomainState,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// A node publishes its heartbeat addresses (`node_id` as for `Keepalive`).
    SetHeartbeatAddrs {
        name: String,
        addrs: BTreeMap<String, String>,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// The new leader takes the primary role: it becomes `takeover`, and every other
    /// coordinator that held (or was taking or leaving) the role becomes `secondary` — a deposed
    /// leader cannot commit its own relinquish, so the new one does it for it.
    Takeover {
        name: String,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// A coordinator's own step: `takeover → primary`, `primary → relinquish`,
    /// `relinquish → secondary` (also `takeover → relinquish` when taking over fails).
    SetRouterState {
        name: String,
        state: RouterState,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// Define a VM on `node` (chosen by the leader's placement, or given by the operator).
    DefineVm {
        spec: VmSpec,
        node: String,
    },
    /// Replace a VM's domain XML of record (takes effect at its next start).
    /// A new domain XML of record (same name and uuid; the daemon checks); the resources read
    /// from it replace the old ones. It takes effect at the VM's next start.
    ModifyVm {
        name: String,
        xml: String,
        #[serde(default)]
        memory_mib: Option<u64>,
        #[serde(default)]
        vcpus: Option<u32>,
    },
    /// An operator's state change: start, stop, shutdown, restart, disable.
    SetVmState {
        name: String,
        state: VmState,
    },
    /// Move a VM: `migrate`/`migrate-live` (temporary: remember `last_node`), `unmigrate` (back
    /// to `last_node`), or a permanent move (`permanent`: forget `last_node`).
    MigrateVm {
        name: String,
        to: String,
        state: VmState,
        #[serde(default)]
        permanent: bool,
    },
    /// The source of a move reports the VM stopped there: the target may start it.
    ReleaseVm {
        name: String,
        node: String,
    },
    /// The source of a live-only move (`migrate-live`, or `migration_method = live`) reports
    /// that libvirt refused it: the VM stays on the source, in `fail` with the reason.
    AbortMigration {
        name: String,
        node: String,
        reason: String,
    },
    /// Forget a VM (it must be stopped, disabled or failed).
    UndefineVm {
        name: String,
    },
    /// A node reports what libvirt says of a VM assigned to it; `failure` puts it in `fail`.
    ReportVm {
        name: String,
        node: String,
        actual: ActualState,
        #[serde(default)]
        failure: Option<String>,
    },
    /// A node publishes how it is fenced (`node_id` as for `Keepalive`).
    SetFencePolicy {
        name: String,
        policy: Option<super::fence::FencePolicy>,
        #[serde(default)]
        node_id: Option<NodeId>,
    },
    /// The primary's last BMC check of a node (written when it changes).
    SetFenceReady {
        name: String,
        ready: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    /// The primary (or an operator, `manual`) decides to fence a node; one executor acts.
    DecideFence {
        name: String,
        reason: String,
        #[serde(default)]
        manual: bool,
    },
    /// The node was heard again before the fence ran (the saving throw).
    CancelFence {
        name: String,
        reason: String,
    },
    /// The outcome of a fence; a confirmed one recovers the node's VMs per its policy.
    FenceDone {
        name: String,
        outcome: super::fence::FenceOutcome,
    },
    /// Something the cluster's event log should show (MNFA entry and exit, ...).
    RecordEvent {
        kind: String,
        #[serde(default)]
        node: Option<String>,
        message: String,
    },
}

impl Command {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::InitCluster { .. } => "init-cluster",
            Command::RegisterNode { .. } => "register-node",
            Command::RemoveNode { .. } => "remove-node",
            Command::CreateJoinToken { .. } => "create-join-token",
            Command::RevokeJoinToken { .. } => "revoke-join-token",
            Command::Keepalive { .. } => "keepalive",
            Command::SetDaemonState { .. } => "set-daemon-state",
            Command::SetMaintenance { .. } => "set-maintenance",
            Command::SetHeartbeatAddrs { .. } => "set-heartbeat-addrs",
            Command::SetDomainState { .. } => "set-domain-state",
            Command::RecordEvent { .. } => "record-event",
            Command::Takeover { .. } => "takeover",
            Command::DefineVm { .. } => "define-vm",
            Command::ModifyVm { .. } => "modify-vm",
            Command::SetVmState { .. } => "set-vm-state",
            Command::MigrateVm { .. } => "migrate-vm",
            Command::UndefineVm { .. } => "undefine-vm",
            Command::ReleaseVm { .. } => "release-vm",
            Command::AbortMigration { .. } => "abort-migration",
            Command::ReportVm { .. } => "report-vm",
            Command::SetRouterState { .. } => "set-router-state",
            Command::SetFencePolicy { .. } => "set-fence-policy",
            Command::SetFenceReady { .. } => "set-fence-ready",
            Command::DecideFence { .. } => "decide-fence",
            Command::CancelFence { .. } => "cancel-fence",
            Command::FenceDone { .. } => "fence-done",
        }
    }
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    NodeRegistered { id: NodeId },
}

/// Why `apply` refused a request. Refusals are values recorded in the log's outcome, never panics.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyError {
    #[error("revision mismatch on {object}: expected {expected}, found {actual}")]
    RevisionMismatch { object: String, expected: u64, actual: u64 },
    #[error("no node named {0:?}")]
    NoSuchNode(String),
    #[error("a node named {name:?} is already a member (id {id}); remove it first")]
    NodeExists { name: String, id: NodeId },
    #[error("the address {addr} is already used by node {name:?}")]
    AddressInUse { addr: String, name: String },
    #[error("the cluster is already initialised")]
    AlreadyInitialized,
    #[error("the cluster is not initialised")]
    NotInitialized,
    #[error("join token refused (unknown, expired, used up or revoked)")]
    BadToken,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no VM named {0:?}")]
    NoSuchVm(String),
    #[error("a VM named {name:?} or with uuid {uuid} already exists")]
    VmExists { name: String, uuid: String },
    #[error("no node fits: {0}")]
    NoNodeFits(String),
}

/// The state machine's answer to one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Log index of the entry.
    pub index: u64,
    pub result: Result<Reply, ApplyError>,
}
