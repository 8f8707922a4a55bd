//! What one applied request changed, as the resulting records: the stream a node outside Raft
//! follows (issue 22). A follower that applied requests itself would need every node's
//! statistics — `apply` places VMs from them — so it could skip none; a follower of deltas
//! takes records as the leader made them and skips what it does not need: the statistics
//! other nodes report (a request of keepalives only changes nothing else, and such requests are
//! most of the log).
//!
//! ```text
//!   before ─apply(index, request)─▶ after        Delta::between(before, after, index)
//!   follower's copy ─Delta::apply_to─▶ the leader's state at index, as projected for the follower
//! ```
//!
//! What a follower speaking as node id `me` holds equals [`State::projected_for`]`(me)` of the leader's
//! state at the same index: everything but the request log (deduplication is the leader's)
//! and, for other nodes, the figures a keepalive writes (statistics, keepalive time and the
//! revision it bumps) — the simulation's `follower` invariant checks exactly that.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::apply::MAX_EVENTS;
use crate::types::*;

/// The records one request changed (all of them, as they are after it), and what it removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Delta {
    /// The leader clock after the request.
    pub clock_ms: u64,
    /// A request of keepalives only: the node records below changed only their figures.
    pub stats_only: bool,
    /// The cluster's meta, when it changed.
    pub meta: Option<ClusterMeta>,
    /// Node records changed or added.
    pub nodes: Vec<NodeRecord>,
    /// Node records gone (by name).
    pub nodes_gone: Vec<String>,
    /// VM records changed or added.
    pub vms: Vec<VmRecord>,
    /// VM records gone (by name).
    pub vms_gone: Vec<String>,
    /// Events recorded by the request (appended in order; the log stays bounded).
    pub events: Vec<Event>,
    /// Removed node ids added (tombstones only grow).
    pub removed: Vec<NodeId>,
    /// `acked` entries changed or added; and gone.
    pub acked: Vec<(NodeId, Held)>,
    pub acked_gone: Vec<NodeId>,
}

impl Delta {
    /// What the request applied at `index` changed from `before` to `after`.
    pub fn between(before: &State, after: &State, index: u64) -> Delta {
        let meta = if before.meta != after.meta { after.meta.clone() } else { None };
        let changed = |old: Option<&NodeRecord>, new: &NodeRecord| old != Some(new);
        Delta {
            clock_ms: after.clock_ms,
            stats_only: false,
            meta,
            nodes: after
                .nodes
                .iter()
                .filter(|(k, v)| changed(before.nodes.get(*k), v))
                .map(|(_, v)| v.clone())
                .collect(),
            nodes_gone: before.nodes.keys().filter(|k| !after.nodes.contains_key(*k)).cloned().collect(),
            vms: after.vms.iter().filter(|(k, v)| before.vms.get(*k) != Some(*v)).map(|(_, v)| v.clone()).collect(),
            vms_gone: before.vms.keys().filter(|k| !after.vms.contains_key(*k)).cloned().collect(),
            events: after.events.iter().filter(|e| e.index == index).cloned().collect(),
            removed: after.removed.difference(&before.removed).copied().collect(),
            acked: after
                .acked
                .iter()
                .filter(|(k, v)| before.acked.get(*k) != Some(*v))
                .map(|(k, v)| (*k, *v))
                .collect(),
            acked_gone: before.acked.keys().filter(|k| !after.acked.contains_key(*k)).copied().collect(),
        }
    }

    /// The delta of a request of keepalives only, which changes nothing but the records it
    /// names (`apply`'s own rule, see its `Backup`): those records as they are in `after`.
    pub fn of_keepalives<'a>(after: &State, names: impl IntoIterator<Item = &'a String>) -> Delta {
        let names: BTreeSet<&String> = names.into_iter().collect();
        Delta {
            clock_ms: after.clock_ms,
            stats_only: true,
            nodes: names.into_iter().filter_map(|n| after.nodes.get(n).cloned()).collect(),
            ..Delta::default()
        }
    }

    /// Whether this delta concerns node `me` (named `name`, when it has a record) at once:
    /// its own record, a VM assigned to it, coming from it, leaving it or seen on it, or a
    /// removal (of a node or VM: rare, and whose it was is not in the delta). Anything else —
    /// another node's record, meta, events, `acked` — a follower needs, but not within
    /// milliseconds (a coordinator may batch it: `herd_raft::follow::LINGER`).
    pub fn concerns(&self, me: NodeId, name: Option<&str>) -> bool {
        let named = |n: &Option<String>| n.is_some() && n.as_deref() == name;
        let vm = |v: &VmRecord| {
            Some(v.node.as_str()) == name
                || named(&v.last_node)
                || named(&v.migrating_from)
                || name.is_some_and(|n| v.seen_on.contains(n))
        };
        !self.nodes_gone.is_empty()
            || !self.vms_gone.is_empty()
            || !self.removed.is_empty()
            || self.nodes.iter().any(|n| n.id == me)
            || self.vms.iter().any(vm)
    }

    /// The names a request of keepalives only names (`None` for any other request): its delta
    /// is [`Delta::of_keepalives`], no copy of the state before it needed.
    pub fn keepalives(req: &Request) -> Option<Vec<&String>> {
        req.ops
            .iter()
            .map(|op| match &op.cmd {
                Command::Keepalive { name, .. } => Some(name),
                _ => None,
            })
            .collect()
    }

    /// The delta as node id `me` follows it: of a request of keepalives, only its own record
    /// (by id: a coordinator serving a session knows the id its certificate names, no lookup).
    pub fn for_node(&self, me: NodeId) -> Delta {
        if !self.stats_only {
            let mut d = self.clone();
            // Other nodes' flags of how they self-fence are theirs alone, and a client of the
            // previous version cannot decode the newest (`NodeStats::session_only`).
            for n in d.nodes.iter_mut().filter(|n| n.id != me && flagged(n)) {
                n.stats = std::mem::take(&mut n.stats).without_session_flags();
            }
            return d;
        }
        Delta {
            clock_ms: self.clock_ms,
            stats_only: true,
            nodes: self.nodes.iter().filter(|n| n.id == me).cloned().collect(),
            ..Delta::default()
        }
    }

    /// Whether [`Delta::for_node`] gives every node the same delta.
    pub fn same_for_all(&self) -> bool {
        self.nodes.is_empty() || (!self.stats_only && !self.nodes.iter().any(flagged))
    }

    /// Makes `state` what the request made it (as far as this delta was kept for a follower).
    pub fn apply_to(self, state: &mut State) {
        state.clock_ms = state.clock_ms.max(self.clock_ms);
        if let Some(meta) = self.meta {
            state.meta = Some(meta);
        }
        for name in &self.nodes_gone {
            state.nodes.remove(name);
        }
        for n in self.nodes {
            state.nodes.insert(n.name.clone(), n);
        }
        for name in &self.vms_gone {
            state.vms.remove(name);
        }
        for v in self.vms {
            state.vms.insert(v.spec.name.clone(), v);
        }
        for e in self.events {
            while state.events.len() >= MAX_EVENTS {
                state.events.pop_front();
            }
            state.events.push_back(e);
        }
        state.removed.extend(self.removed);
        for id in &self.acked_gone {
            state.acked.remove(id);
        }
        state.acked.extend(self.acked);
    }
}

impl State {
    /// This state as a follower asking as node `me` receives it whole: other nodes' flags of
    /// how they self-fence left out (as [`Delta::for_node`] leaves them out).
    pub fn without_others_flags(mut self, me: NodeId) -> State {
        for n in self.nodes.values_mut().filter(|n| n.id != me && flagged(n)) {
            n.stats = std::mem::take(&mut n.stats).without_session_flags();
        }
        self
    }

    /// What a follower speaking as node id `me` holds of this state (see the module doc): no
    /// request log, and other nodes' records without the figures their keepalives write.
    pub fn projected_for(&self, me: NodeId) -> State {
        let mut s = self.clone();
        s.requests = RequestLog::default();
        for n in s.nodes.values_mut().filter(|n| n.id != me) {
            n.stats = NodeStats::default();
            n.last_keepalive_ms = None;
            n.revision = 0;
        }
        s
    }
}

/// Whether a record carries a flag of how its node self-fences.
fn flagged(n: &NodeRecord) -> bool {
    n.stats.session_self_fence || n.stats.session_only
}
