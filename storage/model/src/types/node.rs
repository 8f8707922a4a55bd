//! A node as the cluster records it, and what it reports and tells the leader when it joins.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// A node's Raft health problem and since when (leader time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub problem: String,
    pub since_ms: u64,
}

/// Raft's numeric node id, allocated by the leader from [`ClusterMeta::next_node_id`].
pub type NodeId = u64;

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
    /// The node self-fences when no coordinator acknowledged its session (a poll answered)
    /// within `self_fence_after_ms`, as well as when no keepalive of its own committed: a
    /// client outside Raft of this version says so with every report. Only then may the
    /// primary record it self-fenced on its sessions' silence (`FenceOutcome::SessionsQuiet`);
    /// a node that does not say so (a learner, a client of the previous version) is recorded
    /// self-fenced on its keepalive's age alone. Not encoded while false, so that a record
    /// without it is byte for byte what the previous version wrote and reads (the wire encodes
    /// structs as arrays: a node of that version refuses one longer than it knows).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub session_self_fence: bool,
    /// The node self-fences on its session *alone* once a keepalive of it carrying this flag
    /// committed: its keepalive is then written only when its figures move, and its age shows
    /// nothing — the model refuses to record it self-fenced on that age (only the sessions'
    /// evidence, `SessionsQuiet`, can). Set only with [`NodeStats::session_self_fence`] (the
    /// wire encodes structs as arrays: this is the field after it, encoded only when set, so
    /// the previous version — which would judge the node on its keepalive's age — cannot
    /// decode a record that has it; the leader keeps it only once every member runs a
    /// version that knows it). Use [`NodeStats::with_session_guard`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub session_only: bool,
}

impl NodeStats {
    /// These figures as a client reports them: `armed` — its guard armed the watchdog, so it
    /// self-fences on its session's acknowledgements, and (once its record says so) on them
    /// alone. Sets both flags together, as their encoding needs.
    pub fn with_session_guard(self, armed: bool) -> NodeStats {
        NodeStats { session_self_fence: armed, session_only: armed, ..self }
    }

    /// These figures without either flag (toward a node that cannot decode them).
    pub fn without_session_flags(self) -> NodeStats {
        NodeStats { session_self_fence: false, session_only: false, ..self }
    }

    /// These figures as a keepalive may carry them: at most [`MAX_UNMANAGED`] unmanaged
    /// domains, each of 1 to [`MAX_DOMAIN_NAME`] bytes (one client's bad figures must not get a
    /// whole request of keepalives refused).
    pub fn within_limits(mut self) -> NodeStats {
        self.unmanaged_domains.retain(|d| !d.is_empty() && d.len() <= MAX_DOMAIN_NAME);
        self.unmanaged_domains.truncate(MAX_UNMANAGED);
        self
    }
}

/// Bound on the unmanaged domain names one keepalive carries.
pub const MAX_UNMANAGED: usize = 64;

/// Bound on the length of an unmanaged domain name, in bytes.
pub const MAX_DOMAIN_NAME: usize = 256;

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
    pub fencing: Option<crate::fence::FencePolicy>,
    /// Its BMC's readiness and the fences of it.
    #[serde(default)]
    pub fence: crate::fence::FenceStatus,
    /// What keeps it from taking part in Raft, as the leader saw it (its store cannot write, its
    /// log went backwards); None while it replicates.
    #[serde(default)]
    pub health: Option<NodeHealth>,
    pub joined_ms: u64,
    /// Log index of the command that last changed this record.
    pub revision: u64,
}
