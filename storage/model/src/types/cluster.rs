//! Cluster-wide metadata, join tokens, the event log, and the whole replicated `State`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::*;

/// Cluster-wide metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub created_ms: u64,
    /// While on: no automatic fencing and no recovery (`DecideFence` refuses all but manual
    /// ones), and no automatic action on VMs (`maintenance.rs`).
    pub maintenance: bool,
    /// Log index at which maintenance was last turned on (0: never).
    #[serde(default)]
    pub maintenance_at: u64,
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
    /// The ids of removed nodes (tombstones): a node concludes it was removed only from its id
    /// here, never from a record it cannot find (ids are never reused, so this only grows).
    pub removed: BTreeSet<NodeId>,
    /// By member id: the committed log entries the leaders saw that member hold
    /// (`RecordAcked`). Committed entries are never truncated, so a member that later lacks
    /// one it held lost what it acknowledged (a `data_dir` restored from an older copy): any
    /// leader refuses its appends' answers, any voter its vote requests, and the member itself
    /// finds out — across leader changes, which a leader's own memory does not survive.
    pub acked: BTreeMap<NodeId, Held>,
}

/// What a member was seen to hold, by boot (one start of its Raft) — see `State::acked`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The boot the latest record came from (a random id the member draws at each start).
    pub boot: u64,
    /// The highest committed index that boot acknowledged.
    pub index: u64,
    /// The highest committed index any earlier boot acknowledged.
    pub before: u64,
}

impl Held {
    /// Raises the record with what boot `boot` acknowledged.
    pub fn record(&mut self, boot: u64, index: u64) {
        if boot == self.boot {
            self.index = self.index.max(index);
        } else {
            self.before = self.before.max(self.index);
            self.boot = boot;
            self.index = index;
        }
    }

    /// The highest committed index the member ever held.
    pub fn floor(&self) -> u64 {
        self.index.max(self.before)
    }

    /// Why boot `boot` of the member, whose log ended at `end` when it started, lost entries an
    /// earlier boot held (a legitimate member still holds every committed entry it held).
    pub fn lost(&self, boot: u64, end: u64) -> Option<String> {
        let earlier = if self.boot == boot { self.before } else { self.floor() };
        (earlier > end).then(|| {
            format!("log went backwards: it held entry {earlier} before this start, and its log began this start at entry {end}")
        })
    }
}

impl State {
    /// Whether node id `id` was removed from the cluster (a committed `RemoveNode`).
    pub fn was_removed(&self, id: NodeId) -> bool {
        self.removed.contains(&id)
    }

    /// The node with Raft id `id`, if any.
    pub fn node_by_id(&self, id: NodeId) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.id == id)
    }

    /// Checks the structural invariants of the model: what must hold after every apply. The
    /// state machine runs it after every apply in debug builds (a violation is a bug: it
    /// panics) and after decoding a snapshot (a violation refuses the snapshot); the model's
    /// tests run it after every step.
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
            if self.removed.contains(&node.id) {
                return Err(format!("node {name} has id {}, which was removed", node.id));
            }
            if node.fence.pending.as_ref().is_some_and(|p| p.executing_ms.is_some_and(|t| t < p.decided_ms)) {
                return Err(format!("node {name}'s fence executes before it was decided"));
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
            if vm.seen_on.contains(&vm.node) || vm.seen_on.iter().any(|n| !self.nodes.contains_key(n)) {
                return Err(format!("VM {name} seen out of place on its own node or an unknown one"));
            }
        }
        if let Some(id) = self.acked.keys().find(|id| !ids.contains(*id)) {
            return Err(format!("an acknowledged-log mark for node id {id}, which is no member"));
        }
        if self.events.len() > crate::MAX_EVENTS {
            return Err("event log over its bound".into());
        }
        if self.requests.len() > crate::MAX_REMEMBERED_REQUESTS {
            return Err("request memory over its bound".into());
        }
        Ok(())
    }
}
