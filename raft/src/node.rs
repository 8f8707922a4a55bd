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
use crate::transport::Connector;
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

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(buf.as_mut_slice());
    hex::encode(buf)
}

/// A fresh request id for a write.
pub fn request_id() -> String {
    random_hex(16)
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
    /// A cached connection to the leader for forwarding.
    leader_client: tokio::sync::Mutex<Option<PeerClient>>,
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
            leader_client: tokio::sync::Mutex::new(None),
        })
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

    /// Restarts Raft from disk if this node already has an identity. Returns whether it did.
    pub async fn resume(&self) -> Result<bool, NodeError> {
        match self.identity.load()? {
            None => Ok(false),
            Some(id) if id.removed => {
                *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = true;
                Ok(false)
            }
            Some(id) => {
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
            ..Default::default()
        };
        Ok(Arc::new(config.validate().map_err(|e| NodeError::Raft(e.to_string()))?))
    }

    async fn start_raft(&self, id: NodeId, cluster_id: String) -> Result<Arc<Member>, NodeError> {
        let config = self.raft_config()?;
        let network = NetworkFactory {
            connector: self.connector.clone(),
            limits: self.settings.limits.clone(),
            cluster_id: cluster_id.clone(),
        };
        let sm = StateMachine::open(self.backend.clone())?;
        let view = sm.view();
        let raft =
            Raft::new(id, config, network, self.log.clone(), sm).await.map_err(|e| NodeError::Raft(e.to_string()))?;
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
        self.ensure_fresh()?;
        let cluster_id = random_hex(8);
        let token = format!("herd-{}", random_hex(24));
        self.identity
            .save(&Identity {
                node_id: 1,
                cluster_id: cluster_id.clone(),
                name: self.settings.name.clone(),
                removed: false,
            })
            .await?;
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
        Ok(InitOutcome { cluster_id, token })
    }

    fn ensure_fresh(&self) -> Result<(), NodeError> {
        if self.is_removed() {
            return Err(NodeError::Removed);
        }
        if let Some(m) = self.member() {
            return Err(NodeError::AlreadyMember(m.cluster_id.clone()));
        }
        if let Some(id) = self.identity.load()? {
            return Err(NodeError::AlreadyMember(id.cluster_id));
        }
        Ok(())
    }

    /// Joins the cluster that `peer` belongs to.
    pub async fn join_cluster(&self, peer: &str, token: &str, timeout: Duration) -> Result<JoinOutcome, NodeError> {
        self.ensure_fresh()?;
        let deadline = Instant::now() + timeout;
        let mut client = PeerClient::new(
            self.connector.clone(),
            peer.to_string(),
            None,
            String::new(),
            self.settings.limits.clone(),
        );
        let join = JoinRequest {
            token: token.to_string(),
            name: self.settings.name.clone(),
            role: self.settings.role,
            cluster_addr: self.settings.advertise.clone(),
            request_id: request_id(),
        };
        let joined = match self.call_with_retry(&mut client, LeaderOp::Join(join), deadline).await? {
            RpcReply::Joined(j) => j,
            other => return Err(NodeError::Refused(format!("unexpected join reply {other:?}"))),
        };
        tracing::info!(node_id = joined.node_id, cluster = %joined.cluster_id, "admitted; starting raft");
        self.identity
            .save(&Identity {
                node_id: joined.node_id,
                cluster_id: joined.cluster_id.clone(),
                name: self.settings.name.clone(),
                removed: false,
            })
            .await?;
        self.start_raft(joined.node_id, joined.cluster_id.clone()).await?;
        let add = AddMemberRequest { token: token.to_string(), node_id: joined.node_id };
        let voter = match self.call_with_retry(&mut client, LeaderOp::AddMember(add), deadline).await? {
            RpcReply::MemberAdded(AddMemberReply { voter }) => voter,
            other => return Err(NodeError::Refused(format!("unexpected add-member reply {other:?}"))),
        };
        Ok(JoinOutcome { node_id: joined.node_id, cluster_id: joined.cluster_id, voter })
    }

    /// Calls a peer (which forwards to the leader), retrying `NotLeader` and transport errors.
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
                Err(CallError::Remote(RpcError::NotLeader { .. })) => "no leader yet".to_string(),
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
        let req = Request { id: request_id(), time_ms: 0, ops };
        match self.leader_call(LeaderOp::Write(req), timeout).await? {
            RpcReply::Written(Response { result, .. }) => Ok(result?),
            other => Err(NodeError::Refused(format!("unexpected write reply {other:?}"))),
        }
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
    /// leader is known or the leader is not ready, until `timeout`.
    pub async fn leader_call(&self, op: LeaderOp, timeout: Duration) -> Result<RpcReply, NodeError> {
        let member = self.require_member()?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let attempt = self.leader_attempt(&member, &op, deadline).await;
            let why = match attempt {
                Ok(r) => return Ok(r),
                Err(RpcError::NotLeader { leader_addr, .. }) => {
                    format!("not leader (leader: {leader_addr:?})")
                }
                Err(RpcError::Refused(m)) if m.starts_with("transport:") => m,
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
                .unwrap_or_else(|_| Err(RpcError::Refused(format!("transport: timed out after {remaining:?}")))),
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
        let mut cached = self.leader_client.lock().await;
        if cached.as_ref().is_none_or(|c| c.addr() != addr) {
            *cached = Some(PeerClient::new(
                self.connector.clone(),
                addr.clone(),
                Some(leader),
                member.cluster_id.clone(),
                self.settings.limits.clone(),
            ));
        }
        let client = cached.as_mut().ok_or(RpcError::NotLeader { leader_id: Some(leader), leader_addr: Some(addr) })?;
        match client.call(Rpc::Leader(op), timeout).await {
            Ok(r) => Ok(r),
            Err(CallError::Remote(e)) => Err(e),
            Err(e) => Err(RpcError::Refused(format!("transport: {e}"))),
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
                        Some(f) => RpcError::NotLeader {
                            leader_id: f.leader_id,
                            leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
                        },
                        None => RpcError::Raft(e.to_string()),
                    }
                })?;
                Ok(RpcReply::ReadIndex(read.index()))
            }
            LeaderOp::Join(j) => {
                let node = NewNode { name: j.name.clone(), role: j.role, cluster_addr: j.cluster_addr.clone() };
                let req = Request {
                    id: j.request_id,
                    time_ms: clock::wall_ms(),
                    ops: vec![Command::RegisterNode { node, token_hash: token_hash(&j.token) }.into()],
                };
                match self.propose(member, req).await?.result {
                    Ok(Reply::NodeRegistered { id }) => {
                        Ok(RpcReply::Joined(JoinReply { node_id: id, cluster_id: member.cluster_id.clone() }))
                    }
                    Ok(other) => Err(RpcError::Refused(format!("unexpected reply {other:?}"))),
                    Err(ApplyError::BadToken) => Err(RpcError::BadToken),
                    Err(e) => Err(RpcError::Refused(e.to_string())),
                }
            }
            LeaderOp::AddMember(a) => self.add_member(member, a, timeout).await,
            LeaderOp::RemoveNode { name, force } => self.remove_member(member, &name, force).await,
        }
    }

    async fn propose(&self, member: &Member, req: Request) -> Result<Response, RpcError> {
        member.raft.client_write(req).await.map(|r| r.data).map_err(|e| match e.forward_to_leader() {
            Some(f) => RpcError::NotLeader {
                leader_id: f.leader_id,
                leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
            },
            None => RpcError::Raft(e.to_string()),
        })
    }

    async fn add_member(&self, member: &Member, a: AddMemberRequest, timeout: Duration) -> Result<RpcReply, RpcError> {
        let record = {
            let g = member.view.read();
            let meta = g.state.meta.as_ref().ok_or_else(|| RpcError::Refused("cluster not initialised".into()))?;
            if !meta.join_token_hashes.contains(&token_hash(&a.token)) {
                return Err(RpcError::BadToken);
            }
            g.state
                .node_by_id(a.node_id)
                .cloned()
                .ok_or_else(|| RpcError::Refused(format!("no registered node has id {}", a.node_id)))?
        };
        let _guard = self.membership_lock.lock().await;
        let raft_err =
            |e: openraft::errors::RaftError<TypeConfig, openraft::errors::ClientWriteError<TypeConfig>>| match e
                .forward_to_leader()
            {
                Some(f) => RpcError::NotLeader {
                    leader_id: f.leader_id,
                    leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
                },
                None => RpcError::Raft(e.to_string()),
            };
        let membership = member.raft.metrics().borrow_watched().membership_config.clone();
        if membership.get_node(&a.node_id).is_none() {
            tracing::info!(node = %record.name, id = a.node_id, "adding learner; waiting for it to catch up");
            let add = member.raft.add_learner(a.node_id, BasicNode::new(&record.cluster_addr), true);
            tokio::time::timeout(timeout, add)
                .await
                .map_err(|_| {
                    RpcError::Refused(format!("transport: {} did not catch up within {timeout:?}", record.name))
                })?
                .map_err(raft_err)?;
        }
        let voters: BTreeSet<NodeId> = member.raft.metrics().borrow_watched().membership_config.voter_ids().collect();
        let voter = if record.role == Role::Coordinator && !voters.contains(&a.node_id) && voters.len() < MAX_VOTERS {
            tracing::info!(node = %record.name, id = a.node_id, "promoting to voter");
            member
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([a.node_id])), false)
                .await
                .map_err(raft_err)?;
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
        let raft_err =
            |e: openraft::errors::RaftError<TypeConfig, openraft::errors::ClientWriteError<TypeConfig>>| match e
                .forward_to_leader()
            {
                Some(f) => RpcError::NotLeader {
                    leader_id: f.leader_id,
                    leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
                },
                None => RpcError::Raft(e.to_string()),
            };
        let membership = member.raft.metrics().borrow_watched().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&record.id) {
            let left = voters.len() - 1;
            if left < MIN_SAFE_VOTERS && !force {
                return Err(RpcError::Refused(format!(
                    "removing {name} would leave {left} voter(s); a cluster needs {MIN_SAFE_VOTERS} to survive a failure (use --force)"
                )));
            }
            if left == 0 {
                return Err(RpcError::Refused(format!("{name} is the last voter; it cannot be removed")));
            }
            member
                .raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([record.id])), false)
                .await
                .map_err(raft_err)?;
        } else if membership.get_node(&record.id).is_some() {
            member
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([record.id])), false)
                .await
                .map_err(raft_err)?;
        }
        let req = Request {
            id: request_id(),
            time_ms: clock::wall_ms(),
            ops: vec![Command::RemoveNode { name: name.to_string() }.into()],
        };
        self.propose(member, req).await?.result.map_err(|e| RpcError::Refused(e.to_string()))?;
        // Tell the removed node to stop taking part (best effort: it may be down).
        if record.id != member.id {
            let mut c = PeerClient::new(
                self.connector.clone(),
                record.cluster_addr.clone(),
                Some(record.id),
                member.cluster_id.clone(),
                self.settings.limits.clone(),
            );
            if let Err(e) = c.call(Rpc::Removed, Duration::from_secs(2)).await {
                tracing::warn!(node = %name, "could not tell the removed node to stop: {e}");
            }
        }
        tracing::info!(node = %name, id = record.id, "node removed");
        Ok(RpcReply::Done)
    }

    /// Stops Raft for good on this node after the cluster removed it.
    pub async fn leave(&self) -> Result<(), NodeError> {
        let member = self.member.write().unwrap_or_else(|p| p.into_inner()).take();
        *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        if let Some(m) = member {
            let name = self.settings.name.clone();
            self.identity
                .save(&Identity { node_id: m.id, cluster_id: m.cluster_id.clone(), name, removed: true })
                .await?;
            if let Err(e) = m.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
            tracing::warn!(node_id = m.id, "removed from the cluster: raft stopped");
        }
        Ok(())
    }

    /// Whether this node is in contact with a quorum: the leader checks its lease; a follower
    /// whether it accepted AppendEntries from a leader within two election timeouts.
    pub async fn quorum(&self) -> bool {
        let Some(member) = self.member() else {
            return false;
        };
        let state = member.raft.metrics().borrow_watched().state;
        match state {
            ServerState::Leader => member.raft.ensure_linearizable(ReadPolicy::LeaseRead).await.is_ok(),
            _ => self
                .leader_contact
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < Duration::from_millis(2 * self.settings.election_timeout_ms.1)),
        }
    }

    /// Orderly stop of Raft (daemon exit).
    pub async fn shutdown(&self) {
        if let Some(m) = self.member() {
            if let Err(e) = m.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
        }
    }

    async fn handle_frame(self: Arc<Self>, frame: RequestFrame) -> Result<RpcReply, RpcError> {
        let member = match (self.member(), &frame.body) {
            (Some(m), _) => m,
            (None, _) => return Err(RpcError::NotMember),
        };
        if !frame.cluster_id.is_empty() && frame.cluster_id != member.cluster_id {
            return Err(RpcError::WrongCluster { expected: frame.cluster_id, actual: member.cluster_id.clone() });
        }
        if let Some(to) = frame.to {
            if to != member.id {
                return Err(RpcError::WrongNode { expected: to, actual: Some(member.id) });
            }
        }
        let raft = &member.raft;
        let fatal = |e: openraft::errors::Fatal<TypeConfig>| RpcError::Raft(e.to_string());
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
            Rpc::Removed => {
                let node = self.clone();
                // Reply first; stopping Raft must not wait on this very connection.
                tokio::spawn(async move {
                    if let Err(e) = node.leave().await {
                        tracing::error!("leaving the cluster: {e}");
                    }
                });
                Ok(RpcReply::Done)
            }
            Rpc::Leader(op) => {
                let is_leader = raft.metrics().borrow_watched().current_leader == Some(member.id);
                if is_leader {
                    let timeout = Duration::from_secs(60);
                    self.execute(&member, op, timeout).await
                } else if frame.to.is_some() {
                    // Already forwarded once: do not forward again (no loops).
                    let leader = raft.metrics().borrow_watched().current_leader;
                    Err(RpcError::NotLeader { leader_id: leader, leader_addr: None })
                } else {
                    let leader = raft.metrics().borrow_watched().current_leader;
                    match leader {
                        Some(l) => self.forward(&member, l, op, Duration::from_secs(60)).await,
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
    fn handle(&self, frame: RequestFrame) -> BoxFuture<'_, Result<RpcReply, RpcError>> {
        Box::pin(self.0.clone().handle_frame(frame))
    }
}
