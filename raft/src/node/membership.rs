//! Membership: resuming from disk, `init-cluster`, `join-cluster` (both phases, and a join
//! interrupted between them), the leader's side of a join (register, add, promote), removing
//! a node, and leaving the cluster for good once removed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use herd_storage::identity::Identity;
use herd_storage::model::{ApplyError, Command, NewNode, NodeId, Reply, Request, Role};
use herd_storage::sm::StateMachine;
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, ChangeMembers};
use tokio::time::Instant;

use super::tokens::random_hex;
use super::{
    new_join_token, request_id, split_token, token_hash, write_err, ClusterNode, InitOutcome, JoinOutcome, JoinPolicy,
    Member, NodeError, Raft, RegisterJoiner, MAX_VOTERS, MIN_SAFE_VOTERS,
};
use crate::clock;
use crate::follow::{Client, SessionSettings, CLIENT_WAIT};
use crate::network::{CallError, NetworkFactory};
use crate::tls;
use crate::wire::{AddMemberReply, AddMemberRequest, JoinReply, JoinRequest, LeaderOp, Rpc, RpcError, RpcReply};

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    /// Restarts Raft from disk if this node already has an identity. Returns whether it did.
    pub async fn resume(&self) -> Result<bool, NodeError> {
        match self.identity.load()? {
            None => Ok(false),
            Some(id) if id.removed => {
                *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = true;
                Ok(false)
            }
            Some(Identity { refused: Some(why), .. }) => {
                tracing::error!("{}", super::refuse::advice(&why, &self.settings.name));
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                Ok(false)
            }
            Some(id) if id.client => {
                self.start_client(id.node_id, id.cluster_id, id.seeds);
                Ok(true)
            }
            Some(id) if self.log_behind_mark(&id).await? => Ok(false),
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
            // A follower whose log went backwards (a restored data_dir) must neither stall
            // replication for good nor (in a debug build) panic the leader: openraft starts that
            // follower over, and herd refuses it (`crate::watch`, the daemon's health duty).
            allow_log_reversion: Some(true),
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
            watch: self.watch.clone(),
        };
        let sm = StateMachine::open(self.backend.clone())?;
        let view = sm.view();
        let mut log = self.log.clone();
        let log_end_at_start = match log.get_log_state().await {
            Ok(s) => s.last_log_id.map(|l| l.index),
            Err(e) => {
                tracing::warn!("cannot read the log's end before starting Raft: {e}");
                None
            }
        };
        let raft =
            Raft::new(id, config, network, self.log.clone(), sm).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        // Until Raft's core reports for the first time its metrics are the empty initial ones
        // (no voters, no log): wait for that report so nothing reads a membership of nobody.
        let mut metrics = raft.metrics();
        if tokio::time::timeout(Duration::from_secs(5), metrics.changed()).await.is_err() {
            tracing::warn!("raft reported no metrics within 5 s of starting");
        }
        let boot = super::tokens::random_u64();
        let member = Arc::new(Member { id, cluster_id, raft, view, boot, log_end_at_start });
        *self.member.write().unwrap_or_else(|p| p.into_inner()) = Some(member.clone());
        self.keep_mark(&member);
        self.keep_contact(&member);
        tracing::info!(node_id = id, cluster = %member.cluster_id, "raft started");
        Ok(member)
    }

    /// Starts following the cluster as a client (outside Raft), asking `seeds` first.
    fn start_client(&self, id: NodeId, cluster_id: String, seeds: Vec<(NodeId, String)>) -> Arc<Client> {
        if let Some(c) = self.session() {
            return c;
        }
        let settings =
            SessionSettings { wait: CLIENT_WAIT, limits: self.settings.limits.clone(), ..Default::default() };
        let client = Client::start(self.connector.clone(), cluster_id, id, seeds, settings);
        *self.session.write().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        let (store, lock) = (self.identity.clone(), self.identity_lock.clone());
        herd_storage::types::spawn(crate::follow::seeds::keep(store, lock, client.view.clone(), client.stopped()));
        tracing::info!(node_id = id, cluster = %client.cluster_id, "following the cluster as a client (outside Raft)");
        client
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
            role: Some(self.settings.role),
            removed: false,
            refused: None,
            pending_join: false,
            client: false,
            seeds: Vec::new(),
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
                let client = self.settings.client && self.settings.role == Role::Hypervisor;
                if client && joined.coordinators.is_empty() {
                    return Err(no_coordinators(joined.node_id, &self.settings.name));
                }
                let identity = Identity {
                    node_id: joined.node_id,
                    cluster_id: joined.cluster_id.clone(),
                    name: self.settings.name.clone(),
                    role: Some(self.settings.role),
                    removed: false,
                    refused: None,
                    // A client's join is done once registered: it never joins Raft.
                    pending_join: !client,
                    client,
                    seeds: joined.coordinators.clone(),
                };
                self.identity.save(&identity).await?;
                if client {
                    tracing::info!(node_id = joined.node_id, cluster = %joined.cluster_id, "admitted as a client");
                    self.start_client(joined.node_id, joined.cluster_id.clone(), joined.coordinators);
                    return Ok(JoinOutcome { node_id: joined.node_id, cluster_id: joined.cluster_id, voter: false });
                }
                tracing::info!(node_id = joined.node_id, cluster = %joined.cluster_id, "admitted; starting raft");
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
            role: Some(self.settings.role),
            removed: false,
            refused: None,
            pending_join: false,
            client: false,
            seeds: Vec::new(),
        };
        self.identity.save(&identity).await?;
        Ok(JoinOutcome { node_id, cluster_id, voter })
    }

    /// A join's first phase, on the leader: checks the token, writes what the join policy
    /// makes of the request, and signs the joiner's certificate for the id it got.
    pub(super) async fn register_joiner(&self, member: &Member, j: JoinRequest) -> Result<RpcReply, RpcError> {
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
        // What would refuse the join after the model decided it is checked first: a refused
        // join leaves no record and spends no token.
        if !member.view.read().state.requests.contains_key(&j.request_id) {
            herd_storage::model::validate_new_node_name(&j.name).map_err(|e| RpcError::Refused(e.to_string()))?;
            self.check_enrolment(member, &j)?;
        }
        let ops = match self.join_policy.get() {
            Some(policy) => policy.join_ops(&j, &hash),
            None => RegisterJoiner.join_ops(&j, &hash),
        };
        let req = Request { id: j.request_id.clone(), time_ms: clock::wall_ms(), ops };
        match self.propose(member, req).await?.result {
            Ok(Reply::NodeRegistered { id }) => {
                // Signed only now: the token was accepted and the id allocated.
                let enrolment = self.enrol(member, &j, id)?;
                let coordinators = {
                    let g = member.view.read();
                    let c = g.state.nodes.values().filter(|n| n.role == Role::Coordinator);
                    c.map(|n| (n.id, n.cluster_addr.clone())).collect()
                };
                let cluster_id = member.cluster_id.clone();
                Ok(RpcReply::Joined(JoinReply { node_id: id, cluster_id, enrolment, coordinators }))
            }
            Ok(other) => Err(RpcError::Refused(format!("unexpected reply {other:?}"))),
            Err(ApplyError::BadToken) => Err(RpcError::BadToken),
            Err(e) => Err(RpcError::Refused(e.to_string())),
        }
    }

    /// Removes a node from the Raft membership and the model.
    pub async fn remove_node(&self, name: &str, force: bool, timeout: Duration) -> Result<(), NodeError> {
        match self.leader_call(LeaderOp::RemoveNode { name: name.to_string(), force }, timeout).await? {
            RpcReply::Done => Ok(()),
            other => Err(NodeError::Refused(format!("unexpected remove reply {other:?}"))),
        }
    }

    pub(super) async fn add_member(
        &self,
        member: &Member,
        a: AddMemberRequest,
        timeout: Duration,
    ) -> Result<RpcReply, RpcError> {
        let (record, alone) = {
            let g = member.view.read();
            let meta = g.state.meta.as_ref().ok_or_else(|| RpcError::Refused("cluster not initialised".into()))?;
            // The second phase of a join its first phase admitted: the token must still exist
            // (not revoked), though that join may have used its last use up or outlived it.
            let hash = token_hash(&a.token);
            if !meta.join_token_hashes.contains(&hash) && !meta.join_tokens.contains_key(&hash) {
                return Err(RpcError::BadToken);
            }
            let record = g
                .state
                .node_by_id(a.node_id)
                .cloned()
                .ok_or_else(|| RpcError::Refused(format!("no registered node has id {}", a.node_id)))?;
            (record, g.state.nodes.values().any(|n| n.stats.session_only))
        };
        if alone {
            self.knows_levels(member, &record.name, a.node_id, &record.cluster_addr, timeout).await?;
        }
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

    /// Refuses a member that does not know `Rpc::Level` once a client self-fences on its
    /// session alone (`NodeStats::session_only`): a version before it cannot apply that
    /// record, and one before `Rpc::Contact` would serve sessions on appends alone, which the
    /// sessions' evidence for such a client rules out. Asked at its cluster address; any
    /// answer but `BadRequest` (it could not decode the question) shows it knows levels.
    async fn knows_levels(
        &self,
        member: &Member,
        name: &str,
        id: NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let mut c = self.client(addr.to_string(), Some(id), member.cluster_id.clone());
        let ask = timeout.min(Duration::from_secs(5));
        match c.call(Rpc::Level { level: crate::wire::LEVEL }, ask).await {
            Err(CallError::Remote(RpcError::BadRequest(_))) => Err(RpcError::Refused(format!(
                "{name} runs a version before this one's levels, and a client here self-fences on its \
                 session alone (a record that version cannot apply): upgrade {name} first"
            ))),
            Ok(_) | Err(CallError::Remote(_)) => Ok(()),
            Err(e) => Err(RpcError::Unavailable(format!("{name} did not say which version it runs: {e}"))),
        }
    }

    pub(super) async fn remove_member(&self, member: &Member, name: &str, force: bool) -> Result<RpcReply, RpcError> {
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
        let session = self.session.write().unwrap_or_else(|p| p.into_inner()).take();
        *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        if let Some(c) = session {
            c.stop();
            let identity = Identity {
                node_id: c.id,
                cluster_id: c.cluster_id.clone(),
                name: self.settings.name.clone(),
                role: Some(self.settings.role),
                removed: true,
                refused: None,
                pending_join: false,
                client: true,
                seeds: Vec::new(),
            };
            let _held = self.identity_lock.lock().await;
            self.identity.save(&identity).await?;
            tracing::warn!(node_id = c.id, "removed from the cluster: session ended");
        }
        if let Some(m) = member {
            let identity = Identity {
                node_id: m.id,
                cluster_id: m.cluster_id.clone(),
                name: self.settings.name.clone(),
                role: Some(self.settings.role),
                removed: true,
                refused: None,
                pending_join: false,
                client: false,
                seeds: Vec::new(),
            };
            self.identity.save(&identity).await?;
            if let Err(e) = m.raft.shutdown().await {
                tracing::warn!("raft shutdown: {e}");
            }
            tracing::warn!(node_id = m.id, "removed from the cluster: raft stopped");
        }
        Ok(())
    }
}

/// A client's join answered by a leader that named no coordinators (an older version, which
/// knows no clients): there is nothing to follow.
fn no_coordinators(id: NodeId, name: &str) -> NodeError {
    NodeError::Refused(format!(
        "registered as node {id}, but the leader named no coordinators to follow (an older version?): \
         upgrade the coordinators, `herd node remove {name}`, and join again"
    ))
}
