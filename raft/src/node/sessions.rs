//! Followers outside Raft (clients) as this node hears them — each poll for changes, and each
//! leader op of their own — and the fence rule's question to every coordinator: when did any of
//! you last hear these clients.

use std::collections::BTreeMap;
use std::time::Duration;

use herd_storage::model::{NodeId, NodeStats, Role};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use openraft::ServerState;
use tokio::time::Instant;

use super::ClusterNode;
use crate::clock;
use crate::network::{CallError, PeerClient};
use crate::wire::{ClientFigures, Rpc, RpcError, RpcReply};

/// When a follower last asked for changes, when it was last heard at all (a poll or a leader
/// op of its own), and the statistics it sent last.
pub(super) struct Heard {
    polled: Option<Instant>,
    contact: Instant,
    stats: Option<NodeStats>,
}

/// Followers remembered per node; the longest silent is forgotten first.
const MAX_FOLLOWERS: usize = 65_536;

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Records that follower `id` asked this node for changes just now.
    pub(crate) fn heard_follower(&self, id: NodeId, stats: Option<NodeStats>) {
        self.heard(id, true, stats);
    }

    /// Records a leader op from `id`, a node outside the Raft membership: evidence that it
    /// lives (the fence rule), not a poll — no keepalive is written for it here.
    pub(crate) fn heard_request(&self, id: NodeId) {
        self.heard(id, false, None);
    }

    fn heard(&self, id: NodeId, poll: bool, stats: Option<NodeStats>) {
        let mut f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= MAX_FOLLOWERS && !f.contains_key(&id) {
            if let Some((oldest, h)) = f.iter().min_by_key(|(_, h)| h.contact).map(|(id, h)| (*id, h.contact)) {
                f.remove(&oldest);
                let mut e = self.forgotten.lock().unwrap_or_else(|p| p.into_inner());
                *e = (*e).max(Some(h));
            }
        }
        let now = Instant::now();
        let h = f.entry(id).or_insert(Heard { polled: None, contact: now, stats: None });
        h.contact = now;
        if poll {
            h.polled = Some(now);
        }
        if stats.is_some() {
            h.stats = stats;
        }
    }

    /// The clients that polled within `within` and the statistics each sent last: what this
    /// coordinator writes as their keepalives, or relays to the leader.
    pub fn client_reports(&self, within: Duration) -> Vec<ClientFigures> {
        let f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ClientFigures> = f
            .iter()
            .filter_map(|(id, h)| {
                let age = h.polled?.elapsed();
                let stats = h.stats.clone().filter(|_| age < within)?;
                Some(ClientFigures { id: *id, age_ms: clock::ms(age), stats })
            })
            .collect();
        out.sort_unstable_by_key(|c| c.id);
        out
    }

    /// Client `id`'s figures as its last poll here carried them, and when that poll came.
    pub(crate) fn polled_figures(&self, id: NodeId) -> Option<(Instant, NodeStats)> {
        let f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let h = f.get(&id)?;
        Some((h.polled?, h.stats.clone()?))
    }

    /// Answers (changes, steps, whole states) this node served its followers since it
    /// started, and their bytes.
    pub fn followers_served(&self) -> (u64, u64) {
        self.answers.served()
    }

    /// How long ago each follower outside Raft last asked this node for changes, by id.
    pub fn followers_heard(&self) -> Vec<(NodeId, Duration)> {
        let f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(NodeId, Duration)> =
            f.iter().filter_map(|(id, h)| Some((*id, h.polled?.elapsed()))).collect();
        out.sort_unstable();
        out
    }

    /// How many milliseconds ago each of `ids` was last heard here — a poll or a leader op of
    /// its own (those never heard left out).
    pub fn sessions_heard(&self, ids: &[NodeId]) -> Vec<(NodeId, u64)> {
        let f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().filter_map(|id| Some((*id, clock::ms(f.get(id)?.contact.elapsed())))).collect()
    }

    /// How many milliseconds ago each of `ids` was last heard here (those not heard since this
    /// node started, or forgotten, left out), and since when this node could have heard any:
    /// its start, or the last contact it forgot (the map is bounded).
    pub(crate) fn sessions_quiet_here(&self, ids: &[NodeId]) -> (Vec<(NodeId, u64)>, u64) {
        let forgotten = *self.forgotten.lock().unwrap_or_else(|p| p.into_inner());
        let since = forgotten.map_or(self.born, |f| f.max(self.born));
        (self.sessions_heard(ids), clock::ms(since.elapsed()))
    }

    /// For each of `ids` (clients outside Raft), the shortest time since any coordinator of the
    /// Raft membership, this one included, heard its session; asked in parallel within
    /// `timeout` — one that does not answer in time vouches for nothing.
    pub async fn sessions_heard_everywhere(
        &self,
        ids: &[NodeId],
        timeout: Duration,
    ) -> std::collections::BTreeMap<NodeId, u64> {
        let mut heard: std::collections::BTreeMap<NodeId, u64> = self.sessions_heard(ids).into_iter().collect();
        if ids.is_empty() {
            return heard;
        }
        for (_, answer) in self.ask_coordinators(|| Rpc::SessionsHeard { ids: ids.to_vec() }, timeout).await {
            match answer {
                Ok(RpcReply::SessionsHeard(ages)) => {
                    for (id, ago) in ages.into_iter().filter(|(id, _)| ids.contains(id)) {
                        heard.entry(id).and_modify(|a| *a = (*a).min(ago)).or_insert(ago);
                    }
                }
                Ok(other) => tracing::debug!("unexpected answer to sessions-heard: {other:?}"),
                Err(e) => tracing::debug!("sessions-heard not answered: {e}"),
            }
        }
        heard
    }

    /// Gathers [`ClusterNode::sessions_heard_everywhere`] for `ids` (the clients outside
    /// Raft) and keeps it: their liveness, in memory rather than in the log.
    pub async fn gather_clients_heard(&self, ids: &[NodeId], timeout: Duration) {
        let asked = Instant::now();
        let heard = self.sessions_heard_everywhere(ids, timeout).await;
        *self.clients_heard.lock().unwrap_or_else(|p| p.into_inner()) = (Some(asked), heard);
    }

    /// How long ago any coordinator last heard client `id`'s session, as last gathered here
    /// (None: not gathered on this node, or never heard).
    pub fn client_heard_ms(&self, id: NodeId) -> Option<u64> {
        let g = self.clients_heard.lock().unwrap_or_else(|p| p.into_inner());
        Some(g.1.get(&id)?.saturating_add(clock::ms(g.0?.elapsed())))
    }

    /// On the leader: for each of `ids` (clients outside Raft), how many milliseconds no
    /// coordinator can have acknowledged its session — the least, over every coordinator of
    /// the Raft membership, of its own word (when it last heard the client, or how long it has
    /// been up) or, when it does not answer within `timeout`, how long ago it stopped serving
    /// on a round trip with this leader (`contact.rs`). A coordinator that neither answers
    /// nor asked this office for contact leaves no evidence (0) — it may run a version that
    /// serves on appends alone — except about a client whose record says it self-fences on
    /// its session alone: no member of such a version can apply that record, so that
    /// coordinator served on round trips, the last with a previous leader at most two windows
    /// into this office (without this, a coordinator dead since the office began would keep
    /// such a client's VMs from ever being recovered: its keepalive's age counts for nothing).
    /// Empty when this node does not lead.
    pub async fn sessions_quiet(&self, ids: &[NodeId], timeout: Duration) -> BTreeMap<NodeId, u64> {
        let Some(member) = self.member() else { return BTreeMap::new() };
        let (leading, term) = {
            let m = member.raft.metrics();
            let m = m.borrow_watched();
            (m.state == ServerState::Leader, m.current_term)
        };
        if !leading || ids.is_empty() {
            return BTreeMap::new();
        }
        if self.leader_contact_until().is_none() {
            return BTreeMap::new(); // a leader its quorum stopped acknowledging vouches for nothing
        }
        let (heard, serving_ms) = self.sessions_quiet_here(ids);
        let alone: Vec<NodeId> = {
            let g = member.view.read();
            ids.iter().copied().filter(|id| g.state.node_by_id(*id).is_some_and(|n| n.stats.session_only)).collect()
        };
        let members: Vec<NodeId> =
            member.raft.metrics().borrow_watched().membership_config.nodes().map(|(id, _)| *id).collect();
        // Coordinators that left, and any the leader cannot know of from before its office.
        let gone_ms = clock::ms(self.others_served_ago(term, &members));
        let mut quiet: BTreeMap<NodeId, u64> = ids.iter().map(|id| (*id, serving_ms.min(gone_ms))).collect();
        let lower = |quiet: &mut BTreeMap<NodeId, u64>, id: NodeId, ms: u64| {
            if let Some(q) = quiet.get_mut(&id) {
                *q = (*q).min(ms);
            }
        };
        for (id, ago) in heard {
            lower(&mut quiet, id, ago);
        }
        for (peer, answer) in self.ask_coordinators(|| Rpc::SessionsQuiet { ids: ids.to_vec() }, timeout).await {
            match answer {
                Ok(RpcReply::SessionsQuiet { heard, serving_ms }) => {
                    let heard: BTreeMap<NodeId, u64> = heard.into_iter().collect();
                    for id in ids {
                        lower(&mut quiet, *id, heard.get(id).copied().unwrap_or(serving_ms));
                    }
                }
                other => {
                    if let Err(e) = &other {
                        tracing::debug!(peer, "sessions-quiet not answered: {e}");
                    }
                    let bound = self.served_ago(term, peer).map(clock::ms);
                    let unasked = clock::ms(self.unasked_served_ago(term));
                    for id in ids {
                        let b = bound.unwrap_or(if alone.contains(id) { unasked } else { 0 });
                        lower(&mut quiet, *id, b);
                    }
                }
            }
        }
        quiet
    }

    /// Asks every other coordinator of the Raft membership `rpc()` in parallel within
    /// `timeout` (one pooled connection each): each one's id and answer.
    async fn ask_coordinators(
        &self,
        rpc: impl Fn() -> Rpc,
        timeout: Duration,
    ) -> Vec<(NodeId, Result<RpcReply, CallError>)> {
        let Some(member) = self.member() else { return Vec::new() };
        let peers: Vec<(NodeId, String)> = {
            let raft_members: Vec<NodeId> =
                member.raft.metrics().borrow_watched().membership_config.nodes().map(|(id, _)| *id).collect();
            let g = member.view.read();
            let coordinator = |id: &NodeId| g.state.node_by_id(*id).filter(|n| n.role == Role::Coordinator);
            raft_members
                .iter()
                .filter(|id| **id != member.id)
                .filter_map(coordinator)
                .map(|n| (n.id, n.cluster_addr.clone()))
                .collect()
        };
        // Connections to coordinators no longer asked (replaced, moved) are dropped.
        let current = |c: &PeerClient| peers.iter().any(|(id, addr)| c.target() == Some(*id) && c.addr() == addr);
        self.sessions_pool.lock().unwrap_or_else(|p| p.into_inner()).retain(current);
        let asks = peers.iter().map(|(id, addr)| {
            let pooled = {
                let mut pool = self.sessions_pool.lock().unwrap_or_else(|p| p.into_inner());
                pool.iter().position(|c| c.target() == Some(*id) && c.addr() == addr).map(|k| pool.swap_remove(k))
            };
            let mut c = pooled.unwrap_or_else(|| self.client(addr.clone(), Some(*id), member.cluster_id.clone()));
            let rpc = rpc();
            async move {
                let answer = c.call(rpc, timeout).await;
                // Kept unless the peer is not the node asked for (an address reused); a call
                // that timed out keeps its connection too (the late reply is dropped by position).
                if !matches!(answer, Err(CallError::Remote(RpcError::WrongNode { .. }))) {
                    let mut pool = self.sessions_pool.lock().unwrap_or_else(|p| p.into_inner());
                    // One each: a second (two questions at once) is closed.
                    if !pool.iter().any(|p| p.target() == c.target()) {
                        pool.push(c);
                    }
                }
                (*id, answer)
            }
        });
        futures::future::join_all(asks).await
    }
}
