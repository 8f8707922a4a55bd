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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::identity::{Identity, IdentityStore};
use herd_storage::model::{ApplyError, Command, NewNode, NodeId, Op, Reply, Request, Response, Role};
use herd_storage::sm::{Backend, StateMachine, StateView};
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, ChangeMembers, ReadPolicy, ServerState};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::clock;
use crate::network::{CallError, Limits, NetworkFactory, PeerClient};
use crate::server::Handler;
use crate::tls::{self, Pki};
use crate::transport::Connector;
use crate::transport::Peer;
use crate::wire::{
    AddMemberReply, AddMemberRequest, JoinReply, JoinRequest, LeaderOp, RequestFrame, Rpc, RpcError, RpcReply,
};

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

/// SHA-256 of a join token, hex: the only form in which tokens are stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Fills a buffer with random bytes.
type RandomSource = fn(&mut [u8]);

thread_local! {
    /// The simulation's replacement for the OS random source on its thread (see
    /// [`set_thread_random_source`]).
    static RANDOM_SOURCE: std::cell::Cell<Option<RandomSource>> = const { std::cell::Cell::new(None) };
}

/// Makes ids (cluster id, tokens, request ids) on this thread come from `f`: the simulation's
/// seeded generator, so a seed replays with the same ids. `None` restores the OS source.
pub fn set_thread_random_source(f: Option<RandomSource>) {
    RANDOM_SOURCE.with(|s| s.set(f));
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    match RANDOM_SOURCE.with(std::cell::Cell::get) {
        Some(f) => f(buf.as_mut_slice()),
        None => rand::rng().fill(buf.as_mut_slice()),
    }
    hex::encode(buf)
}

/// A fresh join token (`herd-` and 48 hex digits); the cluster keeps only its hash.
pub fn new_join_token() -> String {
    format!("herd-{}", random_hex(24))
}

/// Splits an operator's join token into the secret and the CA hash it pins. With TLS the hash
/// is required: without it the joiner could not tell the cluster from an impostor.
pub fn split_token(token: &str, tls: bool) -> Result<(&str, Option<[u8; 32]>), NodeError> {
    let token = token.trim();
    let Some((secret, hash)) = token.split_once('.') else {
        if tls {
            return Err(NodeError::Tls(
                "the join token has no CA hash: use the whole token `herd init-cluster` or `herd token create` printed (<secret>.<64 hex digits>)".into(),
            ));
        }
        return Ok((token, None));
    };
    let mut pin = [0u8; 32];
    hex::decode_to_slice(hash, &mut pin).map_err(|_| {
        NodeError::Tls("the join token's CA hash is not 64 hex digits: copy the whole token again".into())
    })?;
    Ok((secret, Some(pin)))
}

/// A fresh request id for a write.
pub fn request_id() -> String {
    random_hex(16)
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
    removed: Mutex<bool>,
    /// Serialises membership changes on the leader.
    membership_lock: tokio::sync::Mutex<()>,
    /// When this node last accepted AppendEntries from a leader.
    leader_contact: Mutex<Option<Instant>>,
    /// Idle connections to the leader for forwarding, reused (at most [`LEADER_POOL`] kept):
    /// concurrent forwarded calls each take one, so none waits behind another (a minute-long
    /// join, say) and none pays a TCP connect while the pool has one.
    leader_pool: Mutex<Vec<PeerClient>>,
    extension: std::sync::OnceLock<Arc<dyn Extension>>,
    /// Told how long each successful write took (metrics).
    write_observer: std::sync::OnceLock<Arc<dyn Fn(Duration) + Send + Sync>>,
    /// The cluster PKI (mutual TLS). Unset only in the simulation, whose transport is plain.
    pki: std::sync::OnceLock<Arc<Pki>>,
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
            removed: Mutex::new(false),
            membership_lock: tokio::sync::Mutex::new(()),
            leader_contact: Mutex::new(None),
            leader_pool: Mutex::new(Vec::new()),
            extension: std::sync::OnceLock::new(),
            write_observer: std::sync::OnceLock::new(),
            pki: std::sync::OnceLock::new(),
        })
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
        let me = self.member().map(|m| m.id);
        PeerClient::new(self.connector.clone(), addr, target, cluster_id, self.settings.limits.clone()).from(me)
    }

    /// Restarts Raft from disk if this node already has an identity. Returns whether it did.
    pub async fn resume(&self) -> Result<bool, NodeError> {
        match self.identity.load()? {
            None => Ok(false),
            Some(id) if id.removed => {
                *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = true;
                Ok(false)
            }
            Some(id) => {
                // With a join pending, Raft runs so that the leader can still add this node; a
                // repeated `join-cluster` finishes the second phase.
                self.start_raft(id.node_id, id.cluster_id).await?;
                Ok(true)
            }
        }
    }

    fn raft_config(&self) -> Result<Arc<openraft::Config>, NodeError> {
        let (min, max) = self.settings.election_timeout_ms;
        let config = openraft::Config {
            cluster_name: "herd".into(),
            heartbeat_interval: self.settings.heartbeat_ms,
            election_timeout_min: min,
            election_timeout_max: max,
            enable_pre_vote: Some(true),
            // A whole snapshot travels in one frame and is installed and flushed inside the RPC.
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        Ok(Arc::new(config.validate().map_err(|e| NodeError::Raft(e.to_string()))?))
    }

    async fn start_raft(&self, id: NodeId, cluster_id: String) -> Result<Arc<Member>, NodeError> {
        if let Some(m) = self.member() {
            return Ok(m);
        }
        let config = self.raft_config()?;
        let network = NetworkFactory {
            connector: self.connector.clone(),
            limits: self.settings.limits.clone(),
            cluster_id: cluster_id.clone(),
            me: id,
        };
        let sm = StateMachine::open(self.backend.clone())?;
        let view = sm.view();
        let raft =
            Raft::new(id, config, network, self.log.clone(), sm).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        // Until Raft's core reports for the first time its metrics are the empty initial ones
        // (no voters, no log): wait for that report so nothing reads a membership of nobody.
        let mut metrics = raft.metrics();
        if tokio::time::timeout(Duration::from_secs(5), metrics.changed()).await.is_err() {
            tracing::warn!("raft reported no metrics within 5 s of starting");
        }
        let member = Arc::new(Member { id, cluster_id, raft, view });
        *self.member.write().unwrap_or_else(|p| p.into_inner()) = Some(member.clone());
        tracing::info!(node_id = id, cluster = %member.cluster_id, "raft started");
        Ok(member)
    }

    /// Bootstraps a one-voter cluster on this fresh node and returns its join token.
    pub async fn init_cluster(&self, timeout: Duration) -> Result<InitOutcome, NodeError> {
        if self.settings.role != Role::Coordinator {
            return Err(NodeError::Refused(
                "init-cluster runs on a coordinator (this node is a hypervisor: join it to a cluster instead)".into(),
            ));
        }
        self.ensure_fresh(false)?;
        let cluster_id = random_hex(8);
        let token = new_join_token();
        let identity = Identity {
            node_id: 1,
            cluster_id: cluster_id.clone(),
            name: self.settings.name.clone(),
            removed: false,
            pending_join: false,
        };
        if let Some(pki) = self.pki.get().cloned() {
            let (id, name) = (cluster_id.clone(), self.settings.name.clone());
            tokio::task::spawn_blocking(move || pki.create_cluster(&id, 1, &name))
                .await
                .map_err(|e| NodeError::Tls(e.to_string()))?
                .map_err(|e| NodeError::Tls(e.to_string()))?;
        }
        self.identity.save(&identity).await?;
        let member = self.start_raft(1, cluster_id.clone()).await?;
        let nodes = BTreeMap::from([(1, BasicNode::new(&self.settings.advertise))]);
        member.raft.initialize(nodes).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        let node = NewNode {
            name: self.settings.name.clone(),
            role: self.settings.role,
            cluster_addr: self.settings.advertise.clone(),
        };
        let cmd = Command::InitCluster { cluster_id: cluster_id.clone(), token_hash: token_hash(&token), node };
        self.write(vec![cmd.into()], timeout).await?;
        tracing::info!(cluster = %cluster_id, "cluster initialised");
        let token = self.printable_token(&token);
        Ok(InitOutcome { cluster_id, token })
    }

    /// Refuses unless this node has no cluster (or, with `resume_join`, only a pending join).
    fn ensure_fresh(&self, resume_join: bool) -> Result<Option<Identity>, NodeError> {
        if self.is_removed() {
            return Err(NodeError::Removed);
        }
        match self.identity.load()? {
            None => Ok(None),
            Some(id) if resume_join && id.pending_join => Ok(Some(id)),
            Some(id) => Err(NodeError::AlreadyMember(id.cluster_id)),
        }
    }

    /// Joins the cluster that `peer` belongs to.
    pub async fn join_cluster(&self, peer: &str, token: &str, timeout: Duration) -> Result<JoinOutcome, NodeError> {
        let pending = self.ensure_fresh(true)?;
        let deadline = Instant::now() + timeout;
        let (token, pin) = split_token(token, self.pki.get().is_some())?;
        let (node_id, cluster_id) = match pending {
            Some(id) => {
                tracing::info!(node_id = id.node_id, "resuming an unfinished join");
                (id.node_id, id.cluster_id)
            }
            None => {
                // The key is made here and never leaves this node; the leader signs the request.
                let request = match self.pki.get() {
                    Some(_) => Some(tls::new_request(&self.settings.name).map_err(|e| NodeError::Tls(e.to_string()))?),
                    None => None,
                };
                if let Some(pki) = self.pki.get() {
                    pki.set_enrol_pin(pin);
                }
                let mut client = self.client(peer.to_string(), None, String::new());
                let join = JoinRequest {
                    token: token.to_string(),
                    name: self.settings.name.clone(),
                    role: self.settings.role,
                    cluster_addr: self.settings.advertise.clone(),
                    request_id: request_id(),
                    csr: request.as_ref().map(|(_, csr)| csr.clone()),
                };
                let result = self.call_with_retry(&mut client, LeaderOp::Join(join), deadline).await;
                if let Some(pki) = self.pki.get() {
                    pki.set_enrol_pin(None);
                }
                let joined = match result? {
                    RpcReply::Joined(j) => j,
                    other => return Err(NodeError::Refused(format!("unexpected join reply {other:?}"))),
                };
                if let (Some(pki), Some((key, _))) = (self.pki.get().cloned(), request) {
                    let e = joined.enrolment.clone().ok_or_else(|| {
                        NodeError::Refused("the leader sent no certificate (does it run without TLS?)".into())
                    })?;
                    // Saved before the identity: a join resumed after a crash has its certificate.
                    tokio::task::spawn_blocking(move || pki.install(&e, &key))
                        .await
                        .map_err(|e| NodeError::Tls(e.to_string()))?
                        .map_err(|e| NodeError::Tls(e.to_string()))?;
                }
                tracing::info!(node_id = joined.node_id, cluster = %joined.cluster_id, "admitted; starting raft");
                let identity = Identity {
                    node_id: joined.node_id,
                    cluster_id: joined.cluster_id.clone(),
                    name: self.settings.name.clone(),
                    removed: false,
                    pending_join: true,
                };
                self.identity.save(&identity).await?;
                (joined.node_id, joined.cluster_id)
            }
        };
        self.start_raft(node_id, cluster_id.clone()).await?;
        let mut client = self.client(peer.to_string(), None, cluster_id.clone());
        if self.pki.get().is_some_and(|p| p.info().is_none()) {
            return Err(NodeError::Tls(
                "this unfinished join has no certificate: wipe the data_dir and join again".into(),
            ));
        }
        let add = AddMemberRequest { token: token.to_string(), node_id };
        let voter = match self.call_with_retry(&mut client, LeaderOp::AddMember(add), deadline).await? {
            RpcReply::MemberAdded(AddMemberReply { voter }) => voter,
            other => return Err(NodeError::Refused(format!("unexpected add-member reply {other:?}"))),
        };
        let identity = Identity {
            node_id,
            cluster_id: cluster_id.clone(),
            name: self.settings.name.clone(),
            removed: false,
            pending_join: false,
        };
        self.identity.save(&identity).await?;
        Ok(JoinOutcome { node_id, cluster_id, voter })
    }

    /// Renews this node's certificate: a new key made here, the leader signs a request for it
    /// (asked directly, over the current certificate), and both replace the old ones.
    pub async fn renew_certificate(&self, timeout: Duration) -> Result<tls::CertInfo, NodeError> {
        let member = self.member().ok_or(NodeError::NotMember)?;
        let pki = self.pki.get().cloned().ok_or_else(|| NodeError::Tls("this node runs without TLS".into()))?;
        let (key, csr) = tls::new_request(&self.settings.name).map_err(|e| NodeError::Tls(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        let cert = loop {
            let m = member.raft.metrics().borrow_watched().clone();
            let leader = m
                .current_leader
                .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| (l, n.addr.clone())));
            let err = match leader {
                None => "no leader known".to_string(),
                Some((l, addr)) => {
                    let mut client = self.client(addr, Some(l), member.cluster_id.clone());
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match client.call(Rpc::RenewCert { csr: csr.clone() }, remaining).await {
                        Ok(RpcReply::Renewed(cert)) => break cert,
                        Ok(other) => return Err(NodeError::Refused(format!("unexpected renewal reply {other:?}"))),
                        Err(CallError::Remote(e)) if e.is_retryable() => e.to_string(),
                        Err(e @ CallError::Transport { .. }) => e.to_string(),
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if Instant::now() + pause >= deadline {
                return Err(NodeError::NoLeader(timeout, err));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        };
        tokio::task::spawn_blocking(move || pki.renew(&cert, &key))
            .await
            .map_err(|e| NodeError::Tls(e.to_string()))?
            .map_err(|e| NodeError::Tls(e.to_string()))
    }

    /// Calls a peer (which forwards to the leader), retrying retryable errors and transport
    /// failures with backoff until `deadline`.
    async fn call_with_retry(
        &self,
        client: &mut PeerClient,
        op: LeaderOp,
        deadline: Instant,
    ) -> Result<RpcReply, NodeError> {
        let mut pause = Duration::from_millis(50);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let err = match client.call(Rpc::Leader(op.clone()), remaining).await {
                Ok(r) => return Ok(r),
                Err(CallError::Remote(e)) if e.is_retryable() => e.to_string(),
                Err(e @ CallError::Transport { .. }) => e.to_string(),
                Err(CallError::Remote(e)) => return Err(e.into()),
                Err(e) => return Err(e.into()),
            };
            if Instant::now() + pause >= deadline {
                return Err(NodeError::NoLeader(deadline.saturating_duration_since(Instant::now()), err));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
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

    /// Removes a node from the Raft membership and the model.
    pub async fn remove_node(&self, name: &str, force: bool, timeout: Duration) -> Result<(), NodeError> {
        match self.leader_call(LeaderOp::RemoveNode { name: name.to_string(), force }, timeout).await? {
            RpcReply::Done => Ok(()),
            other => Err(NodeError::Refused(format!("unexpected remove reply {other:?}"))),
        }
    }

    /// Runs `op` on the leader: locally if this node leads, else forwarded; retries while no
    /// leader is known, the leader is not ready or cannot be reached, until `timeout`.
    pub async fn leader_call(&self, op: LeaderOp, timeout: Duration) -> Result<RpcReply, NodeError> {
        let member = self.require_member()?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let why = match self.leader_attempt(&member, &op, deadline).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() => e.to_string(),
                Err(e) => return Err(e.into()),
            };
            if Instant::now() + pause >= deadline {
                return Err(NodeError::NoLeader(timeout, why));
            }
            tracing::debug!(op = op.name(), "retrying: {why}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    }

    async fn leader_attempt(
        &self,
        member: &Arc<Member>,
        op: &LeaderOp,
        deadline: Instant,
    ) -> Result<RpcReply, RpcError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let leader = member.raft.metrics().borrow_watched().current_leader;
        match leader {
            Some(l) if l == member.id => tokio::time::timeout(remaining, self.execute(member, op.clone(), remaining))
                .await
                .unwrap_or_else(|_| Err(RpcError::Unavailable(format!("no result within {remaining:?}")))),
            Some(l) => self.forward(member, l, op.clone(), remaining).await,
            None => Err(RpcError::NotLeader { leader_id: None, leader_addr: None }),
        }
    }

    async fn forward(
        &self,
        member: &Member,
        leader: NodeId,
        op: LeaderOp,
        timeout: Duration,
    ) -> Result<RpcReply, RpcError> {
        let addr = {
            let m = member.raft.metrics().borrow_watched().membership_config.clone();
            m.get_node(&leader).map(|n| n.addr.clone())
        };
        let Some(addr) = addr else {
            return Err(RpcError::NotLeader { leader_id: Some(leader), leader_addr: None });
        };
        // An idle connection to this leader from the pool, or a new one.
        let pooled = {
            let mut pool = self.leader_pool.lock().unwrap_or_else(|p| p.into_inner());
            // Connections to a former leader are of no use any more.
            pool.retain(|c| c.addr() == addr && c.target() == Some(leader));
            pool.pop()
        };
        let mut client = pooled.unwrap_or_else(|| self.client(addr.clone(), Some(leader), member.cluster_id.clone()));
        let result = client.call(Rpc::Leader(op), timeout).await;
        let keep = match &result {
            Ok(_) => true,
            // The peer answered: the connection is fine, unless it is the wrong node.
            Err(CallError::Remote(e)) => !matches!(e, RpcError::WrongNode { .. }),
            Err(_) => false,
        };
        if keep {
            let mut pool = self.leader_pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < LEADER_POOL {
                pool.push(client);
            }
        }
        match result {
            Ok(r) => Ok(r),
            Err(CallError::Remote(e)) => Err(e),
            Err(e) => Err(RpcError::Unavailable(e.to_string())),
        }
    }

    /// Executes a leader operation on this node, which believes it leads.
    async fn execute(&self, member: &Member, op: LeaderOp, timeout: Duration) -> Result<RpcReply, RpcError> {
        match op {
            LeaderOp::Write(mut req) => {
                req.time_ms = clock::wall_ms();
                Ok(RpcReply::Written(self.propose(member, req).await?))
            }
            LeaderOp::ReadIndex => {
                let read = member.raft.ensure_linearizable(ReadPolicy::ReadIndex).await.map_err(|e| {
                    match e.forward_to_leader() {
                        Some(f) => not_leader(f),
                        None => RpcError::Raft(e.to_string()),
                    }
                })?;
                Ok(RpcReply::ReadIndex(read.index()))
            }
            LeaderOp::Join(j) => {
                // A token this leader already knows to be bad is refused without a log entry:
                // a stream of wrong joins (anyone may send one) must not grow the log. The
                // model still decides every join that gets past this.
                // A retry of a join already decided (its reply lost) goes through: the model
                // answers it from its record, even for a single-use token now spent.
                let hash = token_hash(&j.token);
                let usable = {
                    let g = member.view.read();
                    g.state.requests.contains_key(&j.request_id)
                        || g.state.meta.as_ref().is_some_and(|m| m.token_usable(&hash, clock::wall_ms()))
                };
                if !usable {
                    return Err(RpcError::BadToken);
                }
                let node = NewNode { name: j.name.clone(), role: j.role, cluster_addr: j.cluster_addr.clone() };
                let req = Request {
                    id: j.request_id,
                    time_ms: clock::wall_ms(),
                    ops: vec![Command::RegisterNode { node, token_hash: hash }.into()],
                };
                match self.propose(member, req).await?.result {
                    Ok(Reply::NodeRegistered { id }) => {
                        // Signed only now: the token was accepted and the id allocated.
                        let enrolment = match (self.pki.get(), &j.csr) {
                            (None, _) => None,
                            (Some(_), None) => {
                                return Err(RpcError::Refused("a join without a certificate request".into()))
                            }
                            (Some(pki), Some(csr)) => {
                                let mut e = pki
                                    .sign(csr, &member.cluster_id, id, &j.name)
                                    .map_err(|e| RpcError::Refused(format!("cannot sign the certificate: {e}")))?;
                                if j.role != Role::Coordinator {
                                    e.ca_key_pem = None;
                                    e.coordinator_key = None;
                                }
                                Some(e)
                            }
                        };
                        Ok(RpcReply::Joined(JoinReply {
                            node_id: id,
                            cluster_id: member.cluster_id.clone(),
                            enrolment,
                        }))
                    }
                    Ok(other) => Err(RpcError::Refused(format!("unexpected reply {other:?}"))),
                    Err(ApplyError::BadToken) => Err(RpcError::BadToken),
                    Err(e) => Err(RpcError::Refused(e.to_string())),
                }
            }
            LeaderOp::AddMember(a) => self.add_member(member, a, timeout).await,
            LeaderOp::RemoveNode { name, force } => self.remove_member(member, &name, force).await,
            LeaderOp::MovePrimary { to } => {
                let to_id = match to {
                    None => None,
                    Some(name) => {
                        let id = member.view.read().state.nodes.get(&name).map(|n| n.id);
                        let id = id.ok_or_else(|| RpcError::Refused(format!("no node named {name:?}")))?;
                        let voters: Vec<NodeId> =
                            member.raft.metrics().borrow_watched().membership_config.voter_ids().collect();
                        if !voters.contains(&id) {
                            return Err(RpcError::Refused(format!(
                                "{name} is not a voting coordinator: it cannot be primary"
                            )));
                        }
                        Some(id)
                    }
                };
                let ext = self
                    .extension
                    .get()
                    .ok_or_else(|| RpcError::Refused("primary duties are not available here".into()))?;
                ext.move_primary(to_id).await.map_err(RpcError::Refused)?;
                Ok(RpcReply::Done)
            }
        }
    }

    async fn propose(&self, member: &Member, req: Request) -> Result<Response, RpcError> {
        member.raft.client_write(req).await.map(|r| r.data).map_err(write_err)
    }

    async fn add_member(&self, member: &Member, a: AddMemberRequest, timeout: Duration) -> Result<RpcReply, RpcError> {
        let record = {
            let g = member.view.read();
            let meta = g.state.meta.as_ref().ok_or_else(|| RpcError::Refused("cluster not initialised".into()))?;
            // The second phase of a join its first phase admitted: the token must still exist
            // (not revoked), though that join may have used its last use up or outlived it.
            let hash = token_hash(&a.token);
            if !meta.join_token_hashes.contains(&hash) && !meta.join_tokens.contains_key(&hash) {
                return Err(RpcError::BadToken);
            }
            g.state
                .node_by_id(a.node_id)
                .cloned()
                .ok_or_else(|| RpcError::Refused(format!("no registered node has id {}", a.node_id)))?
        };
        let _guard = self.membership_lock.lock().await;
        let membership = member.raft.metrics().borrow_watched().membership_config.clone();
        if membership.get_node(&a.node_id).is_none() {
            tracing::info!(node = %record.name, id = a.node_id, "adding learner; waiting for it to catch up");
            let add = member.raft.add_learner(a.node_id, BasicNode::new(&record.cluster_addr), true);
            tokio::time::timeout(timeout, add)
                .await
                .map_err(|_| RpcError::Unavailable(format!("{} did not catch up within {timeout:?}", record.name)))?
                .map_err(write_err)?;
        }
        let voters: BTreeSet<NodeId> = member.raft.metrics().borrow_watched().membership_config.voter_ids().collect();
        let voter = if record.role == Role::Coordinator && !voters.contains(&a.node_id) && voters.len() < MAX_VOTERS {
            tracing::info!(node = %record.name, id = a.node_id, "promoting to voter");
            member
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([a.node_id])), false)
                .await
                .map_err(write_err)?;
            true
        } else {
            voters.contains(&a.node_id)
        };
        Ok(RpcReply::MemberAdded(AddMemberReply { voter }))
    }

    async fn remove_member(&self, member: &Member, name: &str, force: bool) -> Result<RpcReply, RpcError> {
        let record = member
            .view
            .read()
            .state
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| RpcError::Refused(format!("no node named {name:?}")))?;
        let _guard = self.membership_lock.lock().await;
        let membership = member.raft.metrics().borrow_watched().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&record.id) {
            let left = voters.len().saturating_sub(1);
            if left < MIN_SAFE_VOTERS && !force {
                return Err(RpcError::Refused(format!(
                    "removing {name} would leave {left} voter(s); a cluster needs {MIN_SAFE_VOTERS} to survive a failure (use --force)"
                )));
            }
            if left == 0 {
                return Err(RpcError::Refused(format!("{name} is the last voter; it cannot be removed")));
            }
            if record.id == member.id {
                // A leader removing itself could not finish (it steps down halfway): hand the
                // leadership to another voter and let the caller retry there. Through the
                // daemon's hand-over, so the primary duties are given up first.
                if let Some(to) = voters.iter().copied().find(|v| *v != member.id) {
                    tracing::info!(to, "removing the leader itself: handing leadership over first");
                    match self.extension.get() {
                        Some(ext) => ext.move_primary(Some(to)).await.map_err(RpcError::Refused)?,
                        None => member
                            .raft
                            .trigger()
                            .transfer_leader(to)
                            .await
                            .map_err(|e| RpcError::Raft(e.to_string()))?,
                    }
                }
                return Err(RpcError::NotLeader { leader_id: None, leader_addr: None });
            }
            member
                .raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([record.id])), false)
                .await
                .map_err(write_err)?;
        } else if membership.get_node(&record.id).is_some() {
            member
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([record.id])), false)
                .await
                .map_err(write_err)?;
        }
        let req = Request {
            id: request_id(),
            time_ms: clock::wall_ms(),
            ops: vec![Command::RemoveNode { name: name.to_string() }.into()],
        };
        self.propose(member, req).await?.result.map_err(|e| RpcError::Refused(e.to_string()))?;
        self.promote_standby(member).await;
        // Tell the removed node to stop taking part (best effort: it may be down; if it comes
        // back, its first own write finds no record and it leaves then).
        let mut c = self.client(record.cluster_addr.clone(), Some(record.id), member.cluster_id.clone());
        if let Err(e) = c.call(Rpc::Removed, Duration::from_secs(2)).await {
            tracing::warn!(node = %name, "could not tell the removed node to stop: {e}");
        }
        tracing::info!(node = %name, id = record.id, "node removed");
        Ok(RpcReply::Done)
    }

    /// Promotes a standby coordinator (a learner) while there are fewer than five voters.
    async fn promote_standby(&self, member: &Member) {
        let membership = member.raft.metrics().borrow_watched().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.len() >= MAX_VOTERS {
            return;
        }
        let standby = {
            let g = member.view.read();
            membership
                .membership()
                .learner_ids()
                .find(|id| g.state.node_by_id(*id).is_some_and(|n| n.role == Role::Coordinator))
        };
        if let Some(id) = standby {
            tracing::info!(id, "promoting a standby coordinator to voter");
            if let Err(e) = member.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await
            {
                tracing::warn!(id, "standby promotion failed: {e}");
            }
        }
    }

    /// Stops Raft for good on this node after the cluster removed it.
    pub async fn leave(&self) -> Result<(), NodeError> {
        let member = self.member.write().unwrap_or_else(|p| p.into_inner()).take();
        *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        if let Some(m) = member {
            let identity = Identity {
                node_id: m.id,
                cluster_id: m.cluster_id.clone(),
                name: self.settings.name.clone(),
                removed: true,
                pending_join: false,
            };
            self.identity.save(&identity).await?;
            if let Err(e) = m.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
            tracing::warn!(node_id = m.id, "removed from the cluster: raft stopped");
        }
        Ok(())
    }

    /// Whether this node is in contact with a quorum: a leader whose quorum acknowledged it
    /// within the lease; a follower that accepted AppendEntries within two election timeouts.
    /// Answers from local metrics at once (never waits on Raft).
    pub fn quorum(&self) -> bool {
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

    /// Orderly stop of Raft (daemon exit), then everything made durable.
    pub async fn shutdown(&self) {
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

    async fn handle_frame(self: Arc<Self>, frame: RequestFrame, peer: Peer) -> Result<RpcReply, RpcError> {
        let Some(member) = self.member() else { return Err(RpcError::NotMember) };
        // Only a join's first phase may come without the cluster id (the joiner does not know
        // it yet); everything else must name this cluster, and Raft traffic this very node.
        let first_join = matches!(&frame.body, Rpc::Leader(LeaderOp::Join(_))) && frame.cluster_id.is_empty();
        // With TLS, only that first phase may come without a certificate, and a certificate
        // speaks only for the node it names.
        match peer {
            Peer::Plain => {}
            Peer::Anonymous if first_join && frame.from.is_none() => {}
            Peer::Anonymous => {
                return Err(RpcError::Unauthenticated("a certificate signed by the cluster CA is required".into()))
            }
            Peer::Node(id) if frame.from == Some(id) => {}
            Peer::Node(id) => {
                return Err(RpcError::Unauthenticated(format!(
                    "the certificate is node {id}'s, the request claims to come from {:?}",
                    frame.from
                )))
            }
        }
        if !first_join && frame.cluster_id != member.cluster_id {
            return Err(RpcError::WrongCluster { expected: frame.cluster_id, actual: member.cluster_id.clone() });
        }
        let raft_rpc = !matches!(frame.body, Rpc::Leader(_));
        match frame.to {
            Some(to) if to != member.id => return Err(RpcError::WrongNode { expected: to, actual: Some(member.id) }),
            None if raft_rpc => return Err(RpcError::BadRequest("raft traffic must name its target node".into())),
            _ => {}
        }
        let raft = &member.raft;
        let fatal = |e: openraft::errors::Fatal<TypeConfig>| RpcError::Raft(e.to_string());
        let timeout = Duration::from_millis(frame.timeout_ms).min(self.settings.limits.max_request_time);
        match frame.body {
            Rpc::AppendEntries(req) => {
                let resp = raft.append_entries(req).await.map_err(|e| RpcError::Raft(e.to_string()))?;
                *self.leader_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Ok(RpcReply::AppendEntries(resp))
            }
            Rpc::Vote(req) => Ok(RpcReply::Vote(raft.vote(req).await.map_err(|e| RpcError::Raft(e.to_string()))?)),
            Rpc::PreVote(req) => {
                Ok(RpcReply::Vote(raft.pre_vote(req).await.map_err(|e| RpcError::Raft(e.to_string()))?))
            }
            Rpc::Snapshot { vote, meta, data } => {
                let snapshot = herd_storage::types::Snapshot { meta, snapshot: std::io::Cursor::new(data) };
                Ok(RpcReply::Snapshot(raft.install_full_snapshot(vote, snapshot).await.map_err(fatal)?))
            }
            Rpc::TransferLeader(req) => {
                Ok(RpcReply::TransferLeader(raft.handle_transfer_leader(req).await.map_err(fatal)?))
            }
            Rpc::RenewCert { csr } => {
                // Only the leader signs, only for the node whose certificate carried the
                // request, and only while that node is still one of the cluster's.
                let (Some(id), Peer::Node(certified)) = (frame.from, peer) else {
                    return Err(RpcError::Unauthenticated("a renewal needs the node's current certificate".into()));
                };
                if id != certified {
                    return Err(RpcError::Unauthenticated("a renewal for another node".into()));
                }
                let m = raft.metrics().borrow_watched().clone();
                if m.current_leader != Some(member.id) {
                    let addr = m
                        .current_leader
                        .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
                    return Err(RpcError::NotLeader { leader_id: m.current_leader, leader_addr: addr });
                }
                let name = member.view.read().state.node_by_id(id).map(|n| n.name.clone());
                let name = name.ok_or_else(|| RpcError::Refused(format!("node {id} is not a node of this cluster")))?;
                let pki = self.pki.get().ok_or_else(|| RpcError::Refused("this node runs without TLS".into()))?;
                let e = pki
                    .sign(&csr, &member.cluster_id, id, &name)
                    .map_err(|e| RpcError::Refused(format!("cannot sign the certificate: {e}")))?;
                tracing::info!(node = %name, "renewed a node certificate");
                Ok(RpcReply::Renewed(e.cert_pem))
            }
            Rpc::Removed => {
                let leader = raft.metrics().borrow_watched().current_leader;
                if frame.from.is_none() || frame.from != leader {
                    return Err(RpcError::Refused("only the current leader may retire a node".into()));
                }
                let node = self.clone();
                // Reply first; stopping Raft must not wait on this very connection.
                herd_storage::types::spawn(async move {
                    if let Err(e) = node.leave().await {
                        tracing::error!("leaving the cluster: {e}");
                    }
                });
                Ok(RpcReply::Done)
            }
            Rpc::Notify { kind, args } => {
                let leader = raft.metrics().borrow_watched().current_leader;
                if frame.from.is_none() || frame.from != leader {
                    return Err(RpcError::Refused("only the current leader sends notifications".into()));
                }
                let ext = self.extension.get().ok_or_else(|| RpcError::Refused("no notify handler".into()))?;
                ext.notify(kind, args).await.map_err(RpcError::Refused)?;
                Ok(RpcReply::Done)
            }
            Rpc::Leader(op) => {
                let leader = raft.metrics().borrow_watched().current_leader;
                if leader == Some(member.id) {
                    self.execute(&member, op, timeout).await
                } else if frame.to.is_some() {
                    // Already forwarded once: do not forward again (no loops).
                    Err(RpcError::NotLeader { leader_id: leader, leader_addr: None })
                } else {
                    match leader {
                        Some(l) => self.forward(&member, l, op, timeout).await,
                        None => Err(RpcError::NotLeader { leader_id: None, leader_addr: None }),
                    }
                }
            }
        }
    }
}

/// The cluster port's handler.
pub struct NodeHandler<LS>(pub Arc<ClusterNode<LS>>);

impl<LS> Handler for NodeHandler<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    fn admit(&self, peer: Peer) -> Result<(), String> {
        let Peer::Node(id) = peer else { return Ok(()) };
        let Some(member) = self.0.member() else { return Ok(()) };
        let g = member.view.read();
        // Ids are never reused: one below the next id to allocate that no node holds any more
        // belongs to a removed node, whose certificate is thereby revoked.
        let next = g.state.meta.as_ref().map_or(0, |m| m.next_node_id);
        if id < next && g.state.node_by_id(id).is_none() {
            return Err(format!("node {id} was removed from the cluster: its certificate is revoked"));
        }
        Ok(())
    }

    fn handle(&self, frame: RequestFrame, peer: Peer) -> BoxFuture<'_, Result<RpcReply, RpcError>> {
        Box::pin(self.0.clone().handle_frame(frame, peer))
    }
}
