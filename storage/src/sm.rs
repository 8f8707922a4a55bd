//! The openraft state machine, shared by the sled and in-memory stores.
//!
//! It decodes each committed entry, hands it to the pure [`model::apply`] and answers the
//! waiting client. The applied state lives in memory and is published as a [`StateView`]: the
//! daemon's local reads and watches are fed from it, never by polling the store.
//!
//! Durability comes from the log and snapshots, not from writes per apply: a [`Backend`] keeps
//! the latest snapshot (made durable before openraft may purge the log it covers), and a
//! restarted node opens with that snapshot's state while openraft re-applies the committed
//! entries after it from the log. Applying writes nothing to disk.

use std::io;
use std::io::Cursor;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::changes::ChangeRing;
use crate::model::{self, Reply, Response, State};
use crate::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};

/// The applied state and where it stands in the log.
#[derive(Clone, Debug, Default)]
pub struct SmState {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// The membership configurations this node applied from its log, oldest first (bounded,
    /// not persisted): `[[1,2],[1,2,3]]` is a joint configuration. For diagnosis and tests.
    pub membership_history: std::collections::VecDeque<MembershipChange>,
    /// The recent applied entries, for followers outside Raft (`changes.rs`; not persisted:
    /// after a restart it starts at the snapshot's state).
    pub changes: ChangeRing,
}

impl SmState {
    /// One past the last applied index: where a follower of this state continues.
    pub fn next_index(&self) -> u64 {
        self.last_applied.as_ref().map_or(0, |l| l.index + 1)
    }
}

/// One applied membership entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub index: u64,
    pub configs: Vec<Vec<u64>>,
    pub learners: Vec<u64>,
}

const MAX_MEMBERSHIP_HISTORY: usize = 64;

/// A snapshot as it rests in the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// Where a state machine keeps its snapshots. Implementations do plain IO, no decisions.
pub trait Backend: Send + Sync + 'static {
    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> io::Result<()>;
    fn load_snapshot(&self) -> io::Result<Option<StoredSnapshot>>;
    /// Makes everything written so far durable.
    fn flush(&self) -> BoxFuture<'static, io::Result<()>>;
}

/// A cheap, cloneable read handle on the applied state, with a notification per applied batch.
#[derive(Clone)]
pub struct StateView {
    inner: Arc<RwLock<SmState>>,
    applied: watch::Sender<u64>,
}

impl StateView {
    fn new(sm: SmState) -> Self {
        let index = sm.last_applied.as_ref().map_or(0, |l| l.index);
        StateView { inner: Arc::new(RwLock::new(sm)), applied: watch::Sender::new(index) }
    }

    /// Reads the applied state. Never hold the guard across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, SmState> {
        // A panic while holding the lock aborts the daemon (panic = abort policy), so a poisoned
        // lock can only be seen in tests; the data is still consistent per apply batch.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, SmState> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Watch the last applied log index (a local watch, fed by this node's own apply).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn publish(&self, index: u64) {
        self.applied.send_replace(index);
    }

    /// A view with no state machine behind it, and its only writer: the state of a node that
    /// follows a coordinator's changes instead of applying a Raft log (`herd_raft::follow`).
    pub fn standalone() -> (StateView, ViewWriter) {
        let view = StateView::new(SmState::default());
        (view.clone(), ViewWriter { view })
    }
}

/// Writes a standalone [`StateView`] (see [`StateView::standalone`]).
pub struct ViewWriter {
    view: StateView,
}

impl ViewWriter {
    /// Changes the state under the write lock, then publishes its last applied index.
    pub fn update<R>(&self, f: impl FnOnce(&mut SmState) -> R) -> R {
        let (r, index) = {
            let mut g = self.view.write();
            let r = f(&mut g);
            (r, g.last_applied.as_ref().map_or(0, |l| l.index))
        };
        self.view.publish(index);
        r
    }
}

/// herd's openraft state machine over a [`Backend`].
pub struct StateMachine {
    backend: Arc<dyn Backend>,
    view: StateView,
    saved: SavedAt,
}

/// Where the stored snapshot stands; held while a snapshot is saved, so an older one never
/// replaces a newer (a build and an install may run at once).
type SavedAt = Arc<std::sync::Mutex<Option<LogId>>>;

/// Saves `snapshot` unless the stored one is at least as new.
fn save_if_newer(backend: &dyn Backend, saved: &SavedAt, snapshot: &StoredSnapshot) -> io::Result<()> {
    let mut at = saved.lock().unwrap_or_else(|p| p.into_inner());
    if at.is_some() && *at >= snapshot.meta.last_log_id {
        return Ok(());
    }
    backend.save_snapshot(snapshot)?;
    *at = snapshot.meta.last_log_id;
    Ok(())
}

impl StateMachine {
    /// Opens the state machine at the backend's latest snapshot (empty without one); openraft
    /// re-applies the committed entries after it.
    pub fn open(backend: Arc<dyn Backend>) -> io::Result<Self> {
        let mut sm = match backend.load_snapshot()? {
            Some(s) => SmState {
                state: decode_snapshot_state(&s.data)?,
                last_applied: s.meta.last_log_id,
                membership: s.meta.last_membership,
                ..SmState::default()
            },
            None => SmState::default(),
        };
        sm.changes = ChangeRing::starting_at(sm.next_index());
        let saved = Arc::new(std::sync::Mutex::new(sm.last_applied));
        Ok(StateMachine { backend, view: StateView::new(sm), saved })
    }

    /// The read handle the daemon serves local reads from.
    pub fn view(&self) -> StateView {
        self.view.clone()
    }
}

/// Encodes a state as snapshots hold it (also the whole state a follower outside Raft takes).
pub fn encode_state(state: &State) -> io::Result<Vec<u8>> {
    rmp_serde::to_vec_named(state).map_err(io::Error::other)
}

/// Decodes a snapshot's state and checks the model's invariants on it: a snapshot that breaks
/// them is refused like one that does not decode.
pub fn decode_snapshot_state(data: &[u8]) -> io::Result<State> {
    let state: State = rmp_serde::from_slice(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    state.check_invariants().map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("the snapshot's state breaks an invariant: {e}"))
    })?;
    Ok(state)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let g = self.view.read();
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.next().await {
            batch.push(item?);
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut logged = Vec::with_capacity(batch.len());
        let last_index;
        {
            let mut g = self.view.write();
            for (entry, responder) in batch {
                let index = entry.log_id.index;
                // openraft applies each index once, in order: revisions never go backwards.
                debug_assert!(
                    g.last_applied.as_ref().is_none_or(|l| l.index < index),
                    "log index {index} applied after {:?}",
                    g.last_applied
                );
                let response = match entry.payload {
                    EntryPayload::Blank => {
                        g.changes.push(entry.log_id, None, None);
                        Response { index, result: Ok(Reply::Done) }
                    }
                    EntryPayload::Normal(req) => {
                        // What changed, for followers outside Raft: a request of keepalives
                        // changes only the records it names; any other is compared with a copy
                        // of the state before it (the request log aside: no follower holds it).
                        let keepalives = model::Delta::keepalives(&req).is_some();
                        let before = (!keepalives).then(|| {
                            let requests = std::mem::take(&mut g.state.requests);
                            let before = g.state.clone();
                            g.state.requests = requests;
                            before
                        });
                        let applied = model::apply(&mut g.state, index, &req);
                        // A broken invariant is a bug in the model: crash, don't limp on.
                        #[cfg(debug_assertions)]
                        if let Err(e) = g.state.check_invariants() {
                            panic!("invariant broken by {req} at index {index}: {e}");
                        }
                        let refused = applied.response.result.as_ref().err().cloned();
                        let delta = match (&before, model::Delta::keepalives(&req)) {
                            (Some(before), _) => model::Delta::between(before, &g.state, index),
                            (None, names) => model::Delta::of_keepalives(&g.state, names.into_iter().flatten()),
                        };
                        g.changes.push(entry.log_id, Some(req.clone()), Some(delta));
                        logged.push((index, req, refused));
                        applied.response
                    }
                    EntryPayload::Membership(m) => {
                        tracing::info!(index, "membership {m}");
                        if g.membership_history.len() >= MAX_MEMBERSHIP_HISTORY {
                            g.membership_history.pop_front();
                        }
                        g.membership_history.push_back(MembershipChange {
                            index,
                            configs: m.get_joint_config().iter().map(|c| c.iter().copied().collect()).collect(),
                            learners: m.learner_ids().collect(),
                        });
                        g.membership = StoredMembership::new(Some(entry.log_id), m);
                        g.changes.push(entry.log_id, None, None);
                        Response { index, result: Ok(Reply::Done) }
                    }
                };
                g.last_applied = Some(entry.log_id);
                replies.push((responder, response));
            }
            last_index = g.last_applied.as_ref().map_or(0, |l| l.index);
        }
        self.view.publish(last_index);
        for (responder, response) in replies {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        // Logged once the clients have their answers (and outside the lock).
        for (index, req, refused) in logged {
            match refused {
                None if req.ops.iter().all(|o| matches!(o.cmd, model::Command::Keepalive { .. })) => {
                    tracing::debug!(index, "applied {req}")
                }
                None => tracing::info!(index, "applied {req}"),
                Some(e) => tracing::info!(index, "refused {req}: {e}"),
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { backend: self.backend.clone(), view: self.view.clone(), saved: self.saved.clone() }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let state = decode_snapshot_state(&data)?;
        let index;
        {
            let mut g = self.view.write();
            g.state = state;
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
            g.changes = ChangeRing::starting_at(g.next_index());
            save_if_newer(&*self.backend, &self.saved, &StoredSnapshot { meta: meta.clone(), data })?;
            index = g.last_applied.as_ref().map_or(0, |l| l.index);
        }
        self.backend.flush().await?;
        tracing::info!(index, "installed snapshot");
        self.view.publish(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.backend.load_snapshot()?.map(|s| Snapshot { meta: s.meta, snapshot: Cursor::new(s.data) }))
    }
}

/// Builds a snapshot from a point-in-time copy of the applied state (it runs concurrently
/// with `apply`), and makes it durable before returning, since openraft purges the log next.
/// When an installed snapshot is newer by then, that one stays stored.
pub struct SnapshotBuilder {
    backend: Arc<dyn Backend>,
    view: StateView,
    saved: SavedAt,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // Only a copy is taken under the read lock (applying waits for it); encoding and
        // saving happen outside it.
        let (state, meta) = {
            let g = self.view.read();
            (g.state.clone(), SnapshotMeta { last_log_id: g.last_applied, last_membership: g.membership.clone() })
        };
        let data = encode_state(&state)?;
        drop(state);
        save_if_newer(&*self.backend, &self.saved, &StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
        self.backend.flush().await?;
        tracing::info!(index = meta.last_log_id.as_ref().map_or(0, |l| l.index), bytes = data.len(), "built snapshot");
        Ok(Snapshot { meta, snapshot: Cursor::new(data) })
    }
}
