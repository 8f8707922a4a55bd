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
    /// What each VM of `vms` was before the request (same order), for outlines
    /// ([`Delta::outlined_for`]): kept beside the delta where it was made, never sent.
    #[serde(skip)]
    pub vms_was: Vec<Option<VmWas>>,
}

/// What a changed VM was before the request, as far as outlines go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmWas {
    /// The nodes whose business it was ([`VmRecord::concerns`]).
    pub concerned: Vec<String>,
    /// Whether its outline is what it was ([`VmRecord::outline`]).
    pub same_outline: bool,
}

/// Whom a delta is kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader<'a> {
    /// Everything (a peer that does not follow as a node).
    All,
    /// Node `me`, without other nodes' keepalives and self-fence flags (`Rpc::Follow`).
    Node(NodeId),
    /// As `Node`, and other nodes' VMs as outlines (`Rpc::Outlined`): `me` and its name;
    /// `None` and `None` for any node the delta does not concern.
    Outlined { me: Option<NodeId>, name: Option<&'a str> },
}

impl Delta {
    /// What the request applied at `index` changed from `before` to `after`.
    pub fn between(before: &State, after: &State, index: u64) -> Delta {
        let meta = if before.meta != after.meta { after.meta.clone() } else { None };
        let changed = |old: Option<&NodeRecord>, new: &NodeRecord| old != Some(new);
        let changed_vms: Vec<(&String, &VmRecord)> =
            after.vms.iter().filter(|(k, v)| before.vms.get(*k) != Some(*v)).collect();
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
            vms: changed_vms.iter().map(|(_, v)| (*v).clone()).collect(),
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
            vms_was: changed_vms
                .iter()
                .map(|(k, v)| {
                    before
                        .vms
                        .get(*k)
                        .map(|b| VmWas { concerned: concerned_by(b), same_outline: b.outline() == v.outline() })
                })
                .collect(),
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
    /// its own record, a VM that is or was its business (assigned to it, at home there, coming
    /// from it, leaving it or seen on it), or a
    /// removal (of a node or VM: rare, and whose it was is not in the delta). Anything else —
    /// another node's record, meta, events, `acked` — a follower needs, but not within
    /// milliseconds (a coordinator may batch it: `herd_raft::follow::LINGER`).
    pub fn concerns(&self, me: NodeId, name: Option<&str>) -> bool {
        !self.nodes_gone.is_empty()
            || !self.vms_gone.is_empty()
            || !self.removed.is_empty()
            || self.nodes.iter().any(|n| n.id == me)
            || name.is_some_and(|n| self.vms.iter().any(|v| v.concerns(n)))
            || self.vms_was.iter().flatten().any(|w| was_mine(w, name))
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
        self.kept_for(Reader::Node(me))
    }

    /// The delta as `reader` follows it (see [`Reader`]).
    pub fn kept_for(&self, reader: Reader<'_>) -> Delta {
        let me = match reader {
            Reader::All => return self.clone(),
            Reader::Node(me) => Some(me),
            Reader::Outlined { me, .. } => me,
        };
        if self.stats_only {
            return Delta {
                clock_ms: self.clock_ms,
                stats_only: true,
                nodes: self.nodes.iter().filter(|n| Some(n.id) == me).cloned().collect(),
                ..Delta::default()
            };
        }
        let mut d = Delta { vms_was: Vec::new(), ..self.clone() };
        // Other nodes' flags of how they self-fence are theirs alone, and a client of the
        // previous version cannot decode the newest (`NodeStats::session_only`).
        for n in d.nodes.iter_mut().filter(|n| Some(n.id) != me && flagged(n)) {
            n.stats = std::mem::take(&mut n.stats).without_session_flags();
        }
        if let Reader::Outlined { name, .. } = reader {
            d.vms = self.outlined_vms(name);
        }
        d
    }

    /// The VMs of this delta as node `name` follows them with outlines: its own business
    /// whole; another's as its outline, and only when that changed or the VM was its business
    /// before the request (an outline then replaces the whole record it held). A delta not
    /// made here (`vms_was` unknown) sends every outline.
    fn outlined_vms(&self, name: Option<&str>) -> Vec<VmRecord> {
        let mine = |v: &VmRecord| name.is_some_and(|n| v.concerns(n));
        self.vms
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match self.vms_was.get(i) {
                _ if mine(v) => Some(v.clone()),
                Some(Some(was)) if was.same_outline && !was_mine(was, name) => None,
                _ => Some(v.outline()),
            })
            .collect()
    }

    /// Whether node `me` (named `name`) follows this delta with outlines otherwise than a node
    /// it does not concern ([`Reader::Outlined`] with `None`, `None`): its own record in a
    /// request of keepalives or with its flags, or a VM that is or was its business.
    pub fn outlined_differs_for(&self, me: NodeId, name: Option<&str>) -> bool {
        self.nodes.iter().any(|n| n.id == me && (self.stats_only || flagged(n)))
            || name.is_some_and(|n| self.vms.iter().any(|v| v.concerns(n)))
            || self.vms_was.iter().flatten().any(|w| was_mine(w, name))
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

    /// This state as a follower asking as node `me` with outlines receives it whole
    /// ([`State::without_others_flags`], and VMs not its business as outlines).
    pub fn outlined_whole_for(self, me: NodeId) -> State {
        let mut s = self.without_others_flags(me);
        s.outline_others(me);
        s
    }

    /// What a follower with outlines as node `me` holds of this state: as
    /// [`State::projected_for`], and VMs not its business as outlines.
    pub fn outlined_for(&self, me: NodeId) -> State {
        let mut s = self.projected_for(me);
        s.outline_others(me);
        s
    }

    fn outline_others(&mut self, me: NodeId) {
        let name = self.node_by_id(me).map(|n| n.name.clone());
        for v in self.vms.values_mut().filter(|v| !name.as_deref().is_some_and(|n| v.concerns(n))) {
            *v = v.outline();
        }
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

/// The nodes whose business VM `v` is ([`VmRecord::concerns`]).
fn concerned_by(v: &VmRecord) -> Vec<String> {
    let mut names: Vec<String> = [Some(&v.node), v.last_node.as_ref(), v.migrating_from.as_ref()]
        .into_iter()
        .flatten()
        .chain(&v.seen_on)
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether the VM `was` describes was node `name`'s business before.
fn was_mine(was: &VmWas, name: Option<&str>) -> bool {
    name.is_some_and(|n| was.concerned.iter().any(|c| c == n))
}
