//! `ClusterNode`: this node's membership in the Raft group, and the leader-side operations.
//!
//! ```text
//!   admin socket / daemon ──▶ ClusterNode::leader_call(op) ──▶ leader? execute locally
//!                                                      └──▶ else forward to the leader over
//!                                                           the cluster transport; retry
//!                                                           NotLeader with backoff until
//!                                                           the deadline
//! ```
//!
//! A fresh node has no Raft instance: openraft needs the node id at construction and ids are
//! allocated by the leader. `init_cluster` takes id 1; `join_cluster` gets its id from the
//! leader (phase 1), starts Raft under it, then asks to be added (phase 2).
//!
//! ```text
//!   mod.rs         ClusterNode: construction, accessors, the write and read paths, quorum
//!   membership.rs  resume, init, join (both phases), add/remove members, leave
//!   forward.rs     leader_call: run a LeaderOp here if leading, else forward (pooled
//!                  connections), retry with backoff inside the deadline
//!   handler.rs     NodeHandler: the cluster port's request handler (auth rules, dispatch)
//!   sessions.rs    followers outside Raft as heard here, and asked of every coordinator
//!   figures.rs     clients' figures other coordinators relay the leader for its aggregate
//!   cert.rs        certificate renewal (both ends) and a joiner's enrolment
//!   policy.rs      JoinPolicy: what the leader writes for an admitted join (the caller's)
//!   tokens.rs      join tokens, request ids, the (replaceable) random source
//! ```

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::identity::IdentityStore;
use herd_storage::model::{ApplyError, NodeId, Op, Reply, Request, Response, Role};
use herd_storage::sm::{Backend, StateMachine, StateView};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use openraft::ServerState;
use tokio::time::Instant;

use crate::clock;
use crate::follow::Client;
use crate::network::{CallError, Limits, PeerClient};
use crate::tls::Pki;
use crate::transport::Connector;
use crate::wire::{LeaderOp, Rpc, RpcError, RpcReply};

mod cert;
mod contact;
pub mod figures;
mod forward;
mod handler;
mod log_mark;
mod membership;
mod policy;
mod refuse;
mod sessions;
pub(crate) mod tokens;

pub use handler::NodeHandler;
pub use policy::{JoinPolicy, RegisterJoiner};
pub use refuse::advice as refusal_advice;
pub use tokens::{new_join_token, request_id, set_thread_random_source, split_token, token_hash};

/// herd's Raft handle.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// At most this many voters; further coordinators stay learners (standbys).
pub const MAX_VOTERS: usize = 5;
/// Fewer voters than this lose fault tolerance; `node remove` refuses without `--force`.
pub const MIN_SAFE_VOTERS: usize = 3;

/// How this node takes part in the cluster.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub name: String,
    pub role: Role,
    /// The cluster address peers reach this node on.
    pub advertise: String,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    pub limits: Limits,
    /// A hypervisor that joins as a client (outside Raft, following the state through a
    /// session) rather than as a Raft learner (`[cluster] membership`).
    pub client: bool,
}

/// Errors of cluster operations, as the admin socket reports them.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("this node is not a cluster member yet (run init-cluster or join-cluster)")]
    NotMember,
    #[error("this node was removed from the cluster; wipe its data_dir and join again")]
    Removed,
    #[error("this node already belongs to cluster {0}")]
    AlreadyMember(String),
    #[error("no leader reachable within {0:?}: {1}")]
    NoLeader(Duration, String),
    #[error("join token refused")]
    BadToken,
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

impl From<RpcError> for NodeError {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::BadToken => NodeError::BadToken,
            RpcError::Refused(m) => NodeError::Refused(m),
            other => NodeError::Call(CallError::Remote(other)),
        }
    }
}

/// A running Raft member.
pub struct Member {
    pub id: NodeId,
    pub cluster_id: String,
    pub raft: Raft,
    pub view: StateView,
    /// This start of Raft, drawn at random: every append answer carries it, so the leaders'
    /// record of what this node holds (`State::acked`) is by boot.
    pub boot: u64,
    /// The last log index in the store when Raft started (`None`: empty or unreadable).
    pub log_end_at_start: Option<u64>,
}

/// This node's copy of the replicated state, whichever way it arrives: applied by its own
/// Raft (a member) or followed through a session (a client outside Raft).
#[derive(Clone)]
pub struct Local {
    pub id: NodeId,
    pub cluster_id: String,
    pub view: StateView,
}

/// What `init_cluster` hands back.
#[derive(Clone, Debug)]
pub struct InitOutcome {
    pub cluster_id: String,
    pub token: String,
}

/// What `join_cluster` hands back.
#[derive(Clone, Debug)]
pub struct JoinOutcome {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub voter: bool,
}

/// What the daemon adds to the cluster protocol: the primary's hand-over and notifications.
pub trait Extension: Send + Sync + 'static {
    /// On the leader: move the primary role to `to` (another voter if `None`) — relinquish this
    /// node's duties, then transfer leadership.
    fn move_primary(&self, to: Option<NodeId>) -> BoxFuture<'_, Result<(), String>>;
    /// On any node: a notification from the primary; `Ok` is the acknowledgement.
    fn notify(&self, kind: String, args: Vec<String>) -> BoxFuture<'_, Result<(), String>>;
}

/// This node's place in the cluster.
pub struct ClusterNode<LS> {
    settings: NodeSettings,
    connector: Arc<dyn Connector>,
    log: LS,
    backend: Arc<dyn Backend>,
    identity: Arc<dyn IdentityStore>,
    member: RwLock<Option<Arc<Member>>>,
    /// The session of a client (a node outside Raft): set instead of `member`.
    session: RwLock<Option<Arc<Client>>>,
    removed: Mutex<bool>,
    /// Serialises membership changes on the leader.
    membership_lock: tokio::sync::Mutex<()>,
    /// When this node last accepted AppendEntries from a leader.
    leader_contact: Mutex<Option<Instant>>,
    /// Round trips with the leader: this member's last answered ask, and on the leader, the
    /// asks it received (`contact.rs`).
    round_trips: Arc<Mutex<contact::RoundTrips>>,
    /// When this node was made: it heard no session before.
    born: Instant,
    /// The most recent contact of a follower forgotten (the map of them is bounded).
    forgotten: Mutex<Option<Instant>>,
    /// Idle connections to the leader for forwarding, reused (at most [`LEADER_POOL`] kept):
    /// concurrent forwarded calls each take one, so none waits behind another (a minute-long
    /// join, say) and none pays a TCP connect while the pool has one.
    leader_pool: Mutex<Vec<PeerClient>>,
    /// Idle connections to the other coordinators for `SessionsHeard`, one each, reused: the
    /// primary asks every fence round while a client is lost (no handshake per question).
    sessions_pool: Mutex<Vec<PeerClient>>,
    /// On a coordinator: when each client was last heard by any coordinator, as last gathered
    /// ([`ClusterNode::gather_clients_heard`]): ms ago at the instant of asking.
    clients_heard: Mutex<(Option<Instant>, std::collections::BTreeMap<NodeId, u64>)>,
    /// Held by every save of a client's identity (its removal, its seeds kept current).
    identity_lock: Arc<tokio::sync::Mutex<()>>,
    extension: std::sync::OnceLock<Arc<dyn Extension>>,
    /// Told how long each successful write took (metrics).
    write_observer: std::sync::OnceLock<Arc<dyn Fn(Duration) + Send + Sync>>,
    /// The cluster PKI (mutual TLS). Unset only in the simulation, whose transport is plain.
    pki: std::sync::OnceLock<Arc<Pki>>,
    /// What a join writes (the caller's policy); [`RegisterJoiner`] while none is set.
    join_policy: std::sync::OnceLock<Arc<dyn JoinPolicy>>,
    /// Why this node takes no part in Raft any more (its log went backwards), if so.
    refused: Mutex<Option<String>>,
    /// What this node, while it leads, learns of each follower from its appends.
    watch: Arc<crate::watch::ReplicationWatch>,
    /// When a refused vote request was last logged.
    vote_refused_logged: Mutex<Option<Instant>>,
    /// The log mark, kept outside `data_dir` (see [`herd_storage::mark`]); unset: none kept.
    mark: std::sync::OnceLock<Arc<dyn herd_storage::mark::MarkStore>>,
    /// When each follower outside Raft last asked this node for changes (`crate::follow`): the
    /// evidence that its session lives, for the fence rule of a later slice of issue 22.
    followers: Mutex<std::collections::HashMap<NodeId, sessions::Heard>>,
    /// The last answer of changes to the followers, encoded once for all of them.
    answers: crate::follow::Answers,
    /// The clients' figures other coordinators relayed this node (while it leads), and how
    /// many it relayed and took.
    figures: Mutex<figures::Relayed>,
}

/// Idle forwarding connections kept per node (the leader's server allows 32 per peer host).
const LEADER_POOL: usize = 16;

fn not_leader(f: &openraft::errors::ForwardToLeader<TypeConfig>) -> RpcError {
    RpcError::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()) }
}

fn write_err(e: openraft::errors::RaftError<TypeConfig, openraft::errors::ClientWriteError<TypeConfig>>) -> RpcError {
    match e.forward_to_leader() {
        Some(f) => not_leader(f),
        None => RpcError::Raft(e.to_string()),
    }
}

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    pub fn new(
        settings: NodeSettings,
        connector: Arc<dyn Connector>,
        log: LS,
        backend: Arc<dyn Backend>,
        identity: Arc<dyn IdentityStore>,
    ) -> Arc<Self> {
        Arc::new(ClusterNode {
            settings,
            connector,
            log,
            backend,
            identity,
            member: RwLock::new(None),
            session: RwLock::new(None),
            removed: Mutex::new(false),
            membership_lock: tokio::sync::Mutex::new(()),
            leader_contact: Mutex::new(None),
            round_trips: Arc::default(),
            born: Instant::now(),
            forgotten: Mutex::new(None),
            leader_pool: Mutex::new(Vec::new()),
            sessions_pool: Mutex::new(Vec::new()),
            clients_heard: Mutex::new((None, std::collections::BTreeMap::new())),
            identity_lock: Arc::default(),
            extension: std::sync::OnceLock::new(),
            write_observer: std::sync::OnceLock::new(),
            pki: std::sync::OnceLock::new(),
            join_policy: std::sync::OnceLock::new(),
            watch: Arc::default(),
            refused: Mutex::new(None),
            vote_refused_logged: Mutex::new(None),
            mark: std::sync::OnceLock::new(),
            followers: Mutex::new(std::collections::HashMap::new()),
            answers: crate::follow::Answers::default(),
            figures: Mutex::new(figures::Relayed::default()),
        })
    }

    /// What keeps each follower out of Raft, as this node saw while leading (see
    /// [`crate::watch`]).
    pub fn replication_watch(&self) -> &crate::watch::ReplicationWatch {
        &self.watch
    }

    /// Installs the cluster PKI (once, before the node is used): init creates the CA, joins
    /// enrol, and the leader signs joiners' certificates. The transport must be TLS over it.
    pub fn set_pki(&self, pki: Arc<Pki>) {
        let _ = self.pki.set(pki);
    }

    pub fn pki(&self) -> Option<&Arc<Pki>> {
        self.pki.get()
    }

    /// A join token as operators see it: the secret and, with TLS, the CA certificate's hash
    /// (`<secret>.<sha256 hex>`), so the joiner can check the cluster before it says anything.
    pub fn printable_token(&self, secret: &str) -> String {
        match self.pki.get().and_then(|p| p.info()) {
            Some(info) => format!("{secret}.{}", info.ca_hash),
            None => secret.to_string(),
        }
    }

    /// Installs the observer of write latencies (once).
    pub fn set_write_observer(&self, f: Arc<dyn Fn(Duration) + Send + Sync>) {
        let _ = self.write_observer.set(f);
    }

    /// Installs the policy that decides what an admitted join writes (once, before the node
    /// serves joins). Without one, a join registers the node as it describes itself
    /// ([`RegisterJoiner`]).
    pub fn set_join_policy(&self, policy: Arc<dyn JoinPolicy>) {
        let _ = self.join_policy.set(policy);
    }

    /// Installs the daemon's extension (once).
    pub fn set_extension(&self, ext: Arc<dyn Extension>) {
        let _ = self.extension.set(ext);
    }

    /// Hands leadership to `to` (openraft's TransferLeader).
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), NodeError> {
        let member = self.require_member()?;
        member.raft.trigger().transfer_leader(to).await.map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// Sends a notification to node `id` at `addr` and waits for its acknowledgement.
    pub async fn notify(
        &self,
        id: NodeId,
        addr: &str,
        kind: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<(), NodeError> {
        let member = self.require_member()?;
        let mut c = self.client(addr.to_string(), Some(id), member.cluster_id.clone());
        match c.call(Rpc::Notify { kind: kind.to_string(), args: args.to_vec() }, timeout).await? {
            RpcReply::Done => Ok(()),
            other => Err(NodeError::Refused(format!("unexpected notify reply {other:?}"))),
        }
    }

    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// The running member, if this node has joined.
    pub fn member(&self) -> Option<Arc<Member>> {
        self.member.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The session, if this node follows the cluster as a client (outside Raft).
    pub fn session(&self) -> Option<Arc<Client>> {
        self.session.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This node's id, cluster and copy of the state, whether it is a Raft member or a client.
    pub fn local(&self) -> Option<Local> {
        if let Some(m) = self.member() {
            return Some(Local { id: m.id, cluster_id: m.cluster_id.clone(), view: m.view.clone() });
        }
        self.session().map(|c| Local { id: c.id, cluster_id: c.cluster_id.clone(), view: c.view.clone() })
    }

    fn require_member(&self) -> Result<Arc<Member>, NodeError> {
        if self.is_removed() {
            return Err(NodeError::Removed);
        }
        self.member().ok_or(NodeError::NotMember)
    }

    pub fn is_removed(&self) -> bool {
        *self.removed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this node has an id but has not finished joining (a repeated join resumes it).
    pub fn join_pending(&self) -> bool {
        self.identity.load().ok().flatten().is_some_and(|id| id.pending_join)
    }

    fn client(&self, addr: String, target: Option<NodeId>, cluster_id: String) -> PeerClient {
        let me = self.local().map(|l| l.id);
        PeerClient::new(self.connector.clone(), addr, target, cluster_id, self.settings.limits.clone()).from(me)
    }

    /// Replicates `ops` as one atomic request; returns the applied result.
    pub async fn write(&self, ops: Vec<Op>, timeout: Duration) -> Result<Reply, NodeError> {
        self.write_indexed(ops, timeout).await.map(|(_, reply)| reply)
    }

    /// Like [`write`](Self::write), also returning the log index the request was applied at: a
    /// caller that acts on its local view afterwards waits until that view has applied it.
    pub async fn write_indexed(&self, ops: Vec<Op>, timeout: Duration) -> Result<(u64, Reply), NodeError> {
        let req = Request { id: request_id(), time_ms: 0, ops };
        let started = Instant::now();
        match self.leader_call(LeaderOp::Write(req), timeout).await? {
            RpcReply::Written(Response { index, result }) => {
                if let Some(f) = self.write_observer.get() {
                    f(started.elapsed());
                }
                Ok((index, result?))
            }
            other => Err(NodeError::Refused(format!("unexpected write reply {other:?}"))),
        }
    }

    /// Proposes `ops` only if this node leads right now: no forwarding, no retry. For decisions a
    /// leader takes about itself (taking over the primary role): if it was deposed meanwhile, the
    /// write must fail rather than be committed by someone else on its behalf.
    pub async fn write_local(&self, ops: Vec<Op>, timeout: Duration) -> Result<Reply, NodeError> {
        let member = self.require_member()?;
        if member.raft.metrics().borrow_watched().current_leader != Some(member.id) {
            return Err(RpcError::NotLeader { leader_id: None, leader_addr: None }.into());
        }
        let req = Request { id: request_id(), time_ms: clock::wall_ms(), ops };
        let response = tokio::time::timeout(timeout, self.propose(&member, req))
            .await
            .map_err(|_| NodeError::Refused(format!("not committed within {timeout:?}")))??;
        Ok(response.result?)
    }

    /// Waits until this node's state machine reflects every write acknowledged before the call
    /// (a linearizable read barrier, ReadIndex through the leader).
    pub async fn read_barrier(&self, timeout: Duration) -> Result<u64, NodeError> {
        if let (None, Some(c), false) = (self.member(), self.session(), self.is_removed()) {
            return c.link.read_barrier(timeout).await;
        }
        let member = self.require_member()?;
        let deadline = Instant::now() + timeout;
        let index = match self.leader_call(LeaderOp::ReadIndex, timeout).await? {
            RpcReply::ReadIndex(i) => i,
            other => return Err(NodeError::Refused(format!("unexpected read-index reply {other:?}"))),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        member
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| NodeError::Raft(format!("waiting to apply index {index}: {e}")))?;
        Ok(index)
    }

    async fn propose(&self, member: &Member, req: Request) -> Result<Response, RpcError> {
        member.raft.client_write(req).await.map(|r| r.data).map_err(write_err)
    }

    /// Whether this node is in contact with a quorum: a leader whose quorum acknowledged it
    /// within the lease; a follower that accepted AppendEntries within two election timeouts.
    /// Answers from local metrics at once (never waits on Raft). A client: its session's
    /// coordinator answered within a long poll and two election timeouts.
    pub fn quorum(&self) -> bool {
        let lease = Duration::from_millis(self.settings.election_timeout_ms.1);
        if let (None, Some(c)) = (self.member(), self.session()) {
            // A quiet long poll is answered once per CLIENT_WAIT.
            return c.status().answered.is_some_and(|t| t.elapsed() < crate::follow::CLIENT_WAIT + 2 * lease);
        }
        let Some(member) = self.member() else { return false };
        let metrics = member.raft.metrics();
        let (state, acked, alone) = {
            let m = metrics.borrow_watched();
            let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
            (m.state, m.last_quorum_acked.as_ref().map(|t| openraft::Instant::elapsed(&**t)), voters == [member.id])
        };
        let lease_ms = self.settings.election_timeout_ms.1;
        match state {
            // A sole voter is its own quorum (it sends no heartbeats to be acknowledged).
            ServerState::Leader if alone => true,
            ServerState::Leader => acked.is_some_and(|d| d < Duration::from_millis(lease_ms)),
            _ => self
                .leader_contact
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < Duration::from_millis(2 * lease_ms)),
        }
    }

    /// How long a member serves followers without contact with the leader
    /// ([`ClusterNode::leader_contact_until`]): longer than an election (so sessions do not
    /// move for one), short against a client's self-fence deadline (its keepalives are
    /// written by the coordinator it follows, which cannot commit them cut off).
    pub fn serve_contact_window(&self) -> Duration {
        (2 * Duration::from_millis(self.settings.election_timeout_ms.1)).max(Duration::from_secs(1))
    }

    /// Until when this member counts as in contact with the leader, from what it last saw
    /// (`None`: not now): a leader, from its quorum's last acknowledgement; a follower, from
    /// the older of the last AppendEntries it accepted and the sending of the last round trip
    /// the leader answered (`contact.rs`); a sole voter, always — each plus
    /// [`ClusterNode::serve_contact_window`]. A member cut off from the leader has a state
    /// that stops, and serving sessions from it would keep its clients on it.
    pub fn leader_contact_until(&self) -> Option<Instant> {
        let window = self.serve_contact_window();
        let member = self.member()?;
        let now = Instant::now();
        let age = {
            let m = member.raft.metrics();
            let m = m.borrow_watched();
            match m.state {
                ServerState::Leader if m.membership_config.voter_ids().eq([member.id]) => Some(Duration::ZERO),
                ServerState::Leader => m.last_quorum_acked.as_ref().map(|t| openraft::Instant::elapsed(&**t)),
                // A follower needs both: appends taken (its state moves on) and a round trip
                // the leader answered (the leader can vouch for it) — the older of the two.
                _ => {
                    let appended = *self.leader_contact.lock().unwrap_or_else(|p| p.into_inner());
                    let rt = self.round_trips.lock().unwrap_or_else(|p| p.into_inner());
                    rt.follower_contact(appended, m.current_leader.map(|l| (l, m.current_term)), now)
                }
            }
        };
        age.filter(|a| *a < window).map(|a| now + (window - a))
    }

    /// Orderly stop of Raft (daemon exit), then everything made durable.
    pub async fn shutdown(&self) {
        if let Some(c) = self.session() {
            c.stop();
        }
        if let Some(m) = self.member() {
            // Apply what is already committed first, so a restart from disk finds exactly the
            // state this process last showed.
            let committed = m.raft.metrics().borrow_watched().local_committed.map(|l| l.index);
            if let Err(e) = m.raft.wait(Some(Duration::from_secs(2))).applied_index_at_least(committed, "drain").await {
                tracing::warn!("stopping with committed entries not yet applied: {e}");
            }
            if let Err(e) = m.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
        }
        if let Err(e) = self.backend.flush().await {
            tracing::error!("final flush failed: {e}");
        }
    }
}

#[cfg(feature = "breakage")]
thread_local! {
    static SERVE_WITHOUT_CONTACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Test-only (the simulation's `herd::breakage`): a coordinator serves sessions as if always
/// in contact with the leader (the simulation shows its `served-in-contact` invariant catches
/// that).
#[cfg(feature = "breakage")]
pub fn break_contact(on: bool) {
    SERVE_WITHOUT_CONTACT.with(|b| b.set(on));
}

/// Serving contact the breakage grants: a window from now while on; never in other builds.
fn broken_contact() -> Option<Instant> {
    #[cfg(feature = "breakage")]
    if SERVE_WITHOUT_CONTACT.with(std::cell::Cell::get) {
        return Some(Instant::now() + Duration::from_secs(1));
    }
    None
}
