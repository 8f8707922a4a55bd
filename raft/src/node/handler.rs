//! `NodeHandler`: the cluster port's request handler. It applies the auth rules — Raft
//! traffic must name this cluster and this node, only a join's first phase may come without
//! the cluster id (and, with TLS, without a certificate), a certificate speaks only for the node
//! it names, a removed node's certificate is refused at once — then dispatches each `Rpc`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::NodeId;
use herd_storage::types::TypeConfig;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::storage::RaftLogStorage;
use tokio::time::Instant;

use super::{ClusterNode, Member};
use crate::follow::{Client, Want};
use crate::server::Handler;
use crate::transport::Peer;
use crate::wire::{LeaderOp, RequestFrame, Rpc, RpcError, RpcReply};

/// A long poll for changes answers this long before the asker's timeout.
const CHANGES_MARGIN: Duration = Duration::from_millis(250);

/// A Raft error as the leader's health duty shows it: `storage error: …` when this node's Raft
/// stopped on its store, `raft stopped: …` for another fatal error.
fn stopped<E: std::fmt::Display>(e: &openraft::errors::RaftError<TypeConfig, E>) -> String {
    match e {
        openraft::errors::RaftError::Fatal(openraft::errors::Fatal::StorageError(s)) => format!("storage error: {s}"),
        openraft::errors::RaftError::Fatal(f) => format!("raft stopped: {f}"),
        other => other.to_string(),
    }
}

/// Whether `frame`, from `peer`, may be handled here at all: who may send it, and whether it
/// names this cluster and this node.
fn check_frame(me: NodeId, cluster_id: &str, frame: &RequestFrame, peer: Peer) -> Result<(), RpcError> {
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
    if !first_join && frame.cluster_id != cluster_id {
        return Err(RpcError::WrongCluster { expected: frame.cluster_id.clone(), actual: cluster_id.to_string() });
    }
    let raft_rpc = !matches!(frame.body, Rpc::Leader(_));
    match frame.to {
        Some(to) if to != me => Err(RpcError::WrongNode { expected: to, actual: Some(me) }),
        None if raft_rpc => Err(RpcError::BadRequest("raft traffic must name its target node".into())),
        _ => Ok(()),
    }
}

impl<LS> ClusterNode<LS>
where
    LS: RaftLogStorage<TypeConfig> + Clone,
{
    async fn handle_frame(self: Arc<Self>, frame: RequestFrame, peer: Peer) -> Result<RpcReply, RpcError> {
        let Some(member) = self.member() else {
            if let Some(c) = self.session() {
                return self.client_frame(&c, frame, peer).await;
            }
            // A refused node says so to Raft traffic: the leader's health duty shows why.
            if let (Some(why), false) = (self.refused(), matches!(frame.body, Rpc::Leader(_))) {
                return Err(RpcError::Raft(format!("refused: {why}")));
            }
            return Err(RpcError::NotMember);
        };
        check_frame(member.id, &member.cluster_id, &frame, peer)?;
        let raft = &member.raft;
        let fatal = |e: openraft::errors::Fatal<TypeConfig>| RpcError::Raft(e.to_string());
        let timeout = Duration::from_millis(frame.timeout_ms).min(self.settings.limits.max_request_time);
        match frame.body {
            Rpc::AppendEntries(req) => self.append_entries(&member, req).await,
            Rpc::Vote(req) => {
                self.check_vote(&member, frame.from, req.last_log_id)?;
                Ok(RpcReply::Vote(raft.vote(req).await.map_err(|e| RpcError::Raft(e.to_string()))?))
            }
            Rpc::PreVote(req) => {
                self.check_vote(&member, frame.from, req.last_log_id)?;
                Ok(RpcReply::Vote(raft.pre_vote(req).await.map_err(|e| RpcError::Raft(e.to_string()))?))
            }
            Rpc::Snapshot { vote, meta, data } => {
                let snapshot = herd_storage::types::Snapshot { meta, snapshot: std::io::Cursor::new(data) };
                Ok(RpcReply::Snapshot(raft.install_full_snapshot(vote, snapshot).await.map_err(fatal)?))
            }
            Rpc::TransferLeader(req) => {
                Ok(RpcReply::TransferLeader(raft.handle_transfer_leader(req).await.map_err(fatal)?))
            }
            Rpc::RenewCert { csr } => self.sign_renewal(&member, frame.from, peer, &csr),
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
            Rpc::LogReverted { reason } => {
                let leader = raft.metrics().borrow_watched().current_leader;
                if frame.from.is_none() || frame.from != leader {
                    return Err(RpcError::Refused("only the current leader may refuse a node".into()));
                }
                let node = self.clone();
                herd_storage::types::spawn(async move { node.refuse(reason).await });
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
            Rpc::Leader(op) => self.leader_op(&member, op, (frame.from, frame.to), timeout).await,
            Rpc::Changes { from, wait_ms, stats } => {
                self.follow(&member, frame.from, (from, wait_ms, stats), timeout, Want::Requests).await
            }
            Rpc::Follow { from, wait_ms, stats } => {
                let want = Want::Deltas { me: frame.from };
                self.follow(&member, frame.from, (from, wait_ms, stats), timeout, want).await
            }
            Rpc::Outlined { from, wait_ms, stats } => {
                let want = frame.from.map_or(Want::Deltas { me: None }, |me| Want::Outlined { me });
                self.follow(&member, frame.from, (from, wait_ms, stats), timeout, want).await
            }
            Rpc::SessionsHeard { ids } | Rpc::SessionsQuiet { ids } if ids.len() > crate::wire::MAX_SESSIONS_ASKED => {
                Err(RpcError::BadRequest(format!("at most {} ids per question", crate::wire::MAX_SESSIONS_ASKED)))
            }
            Rpc::SessionsHeard { ids } => Ok(RpcReply::SessionsHeard(self.sessions_heard(&ids))),
            Rpc::SessionsQuiet { ids } => {
                let (heard, serving_ms) = self.sessions_quiet_here(&ids);
                Ok(RpcReply::SessionsQuiet { heard, serving_ms })
            }
            Rpc::Contact { window_ms } => self.answer_contact(&member, frame.from, window_ms),
            Rpc::Level { level } => self.answer_level(&member, frame.from, level),
        }
    }

    /// The leader's appends. Each one taken is contact with the leader; one refused for a
    /// higher vote is not (a deposed leader cut off with a minority keeps sending them).
    async fn append_entries(
        &self,
        member: &Member,
        req: openraft::raft::AppendEntriesRequest<TypeConfig>,
    ) -> Result<RpcReply, RpcError> {
        let resp = member.raft.append_entries(req).await.map_err(|e| RpcError::Raft(stopped(&e)))?;
        if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
            *self.leader_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        Ok(RpcReply::AppendEntries(resp, member.boot))
    }

    /// A follower's long poll (`Rpc::Changes` or `Rpc::Follow`: `from`, its wait, its
    /// statistics): noted as heard, answered before the asker gives up (the wait ends a margin
    /// before its timeout). `Rpc::Follow`'s asker follows as the id its certificate names:
    /// without other nodes' keepalive figures.
    async fn follow(
        &self,
        member: &Member,
        asker: Option<NodeId>,
        (from, wait_ms, stats): (Option<u64>, u64, Option<herd_storage::model::NodeStats>),
        timeout: Duration,
        want: Want,
    ) -> Result<RpcReply, RpcError> {
        if let Some(id) = asker {
            self.heard_follower(id, stats);
        }
        let wait = Duration::from_millis(wait_ms).min(timeout.saturating_sub(CHANGES_MARGIN));
        let deadline = Instant::now() + wait;
        // Served only while in contact with the leader, and ended the moment that contact is
        // older than its window (the serve starts again if it was renewed meanwhile).
        loop {
            let Some(lost_at) = self.leader_contact_until().or_else(super::broken_contact) else {
                return Err(RpcError::Unavailable(format!(
                    "no contact with the leader for {:?}: follow another coordinator",
                    self.serve_contact_window()
                )));
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                r = crate::follow::serve(&member.view, from, remaining, &self.answers, want) => return r,
                () = tokio::time::sleep_until(lost_at) => {}
            }
        }
    }

    /// A frame that reached a client (outside Raft): it answers only its removal and the
    /// primary's notifications, and only from a coordinator its followed state names.
    async fn client_frame(self: Arc<Self>, c: &Client, frame: RequestFrame, peer: Peer) -> Result<RpcReply, RpcError> {
        check_frame(c.id, &c.cluster_id, &frame, peer)?;
        let coordinator = frame.from.is_some_and(|f| {
            c.view.read().state.node_by_id(f).is_some_and(|n| n.role == herd_storage::model::Role::Coordinator)
        });
        match frame.body {
            Rpc::Removed | Rpc::Notify { .. } if !coordinator => {
                Err(RpcError::Refused("only a coordinator may retire or notify a client".into()))
            }
            Rpc::Removed => {
                let node = self.clone();
                // Concluded only from a tombstone in a linearizable read (the coordinator's word
                // alone does not retire a node), after the reply.
                herd_storage::types::spawn(async move { node.leave_if_tombstoned().await });
                Ok(RpcReply::Done)
            }
            Rpc::Notify { kind, args } => {
                let ext = self.extension.get().ok_or_else(|| RpcError::Refused("no notify handler".into()))?;
                ext.notify(kind, args).await.map_err(RpcError::Refused)?;
                Ok(RpcReply::Done)
            }
            _ => Err(RpcError::NotMember),
        }
    }

    /// A client told it was removed: leaves if a read barrier shows its id tombstoned.
    async fn leave_if_tombstoned(&self) {
        let Some(c) = self.session() else { return };
        if let Err(e) = self.read_barrier(Duration::from_secs(5)).await {
            tracing::warn!("told this node was removed, but cannot check: {e}");
            return;
        }
        if c.view.read().state.was_removed(c.id) {
            if let Err(e) = self.leave().await {
                tracing::error!("leaving the cluster: {e}");
            }
        }
    }

    /// A leader operation that reached this node, `from` the node its certificate names: run
    /// here if it leads, else forwarded once (`to` set: it was forwarded already).
    async fn leader_op(
        &self,
        member: &Arc<Member>,
        op: LeaderOp,
        (from, to): (Option<NodeId>, Option<NodeId>),
        timeout: Duration,
    ) -> Result<RpcReply, RpcError> {
        let from_member = from
            .filter(|id| member.raft.metrics().borrow_watched().membership_config.membership().get_node(id).is_some());
        match from {
            // A client's own request (its writes, read barriers) is word from it as much as a
            // poll: a client back from a power cycle writes `run` before its session's first
            // poll may have arrived, and must not look silent then (t94: fenced again at once,
            // on a power-off reading from before its boot).
            Some(id) if from_member.is_none() => self.heard_request(id),
            _ => {}
        }
        // Clients' figures come from the coordinators that heard them (members of role
        // coordinator: voters or standby), never from a client or a hypervisor learner.
        let coordinator = |id: NodeId| {
            member.view.read().state.node_by_id(id).is_some_and(|n| n.role == herd_storage::model::Role::Coordinator)
        };
        if matches!(op, LeaderOp::Figures(_)) && !from_member.is_some_and(coordinator) {
            return Err(RpcError::Refused("only a coordinator relays clients' figures".into()));
        }
        let leader = member.raft.metrics().borrow_watched().current_leader;
        if leader == Some(member.id) {
            self.execute(member, op, timeout).await
        } else if to.is_some() {
            // Already forwarded once: do not forward again (no loops).
            Err(RpcError::NotLeader { leader_id: leader, leader_addr: None })
        } else {
            match leader {
                Some(l) => self.forward(member, l, op, timeout).await,
                None => Err(RpcError::NotLeader { leader_id: None, leader_addr: None }),
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
        let Some(local) = self.0.local() else { return Ok(()) };
        let g = local.view.read();
        // Ids are never reused: one below the next id to allocate that no node holds any more
        // belongs to a removed node, whose certificate is thereby revoked.
        let next = g.state.meta.as_ref().map_or(0, |m| m.next_node_id);
        if id < next && g.state.node_by_id(id).is_none() {
            return Err(format!("node {id} was removed from the cluster: its certificate is revoked"));
        }
        Ok(())
    }

    /// Hosts of the Raft membership and of every registered node (a follower outside Raft
    /// is no Raft member, and a coordinator's restart must not send a thousand of them to the
    /// small stranger pool at once).
    fn member_host(&self, host: &str) -> bool {
        let Some(member) = self.0.member() else {
            let Some(local) = self.0.local() else { return false };
            let g = local.view.read();
            return g.state.nodes.values().any(|n| crate::server::peer_host(&n.cluster_addr) == host);
        };
        let in_raft = {
            let metrics = member.raft.metrics();
            let m = metrics.borrow_watched();
            let found =
                m.membership_config.membership().nodes().any(|(_, n)| crate::server::peer_host(&n.addr) == host);
            found
        };
        in_raft || member.view.read().state.nodes.values().any(|n| crate::server::peer_host(&n.cluster_addr) == host)
    }

    fn handle(&self, frame: RequestFrame, peer: Peer) -> BoxFuture<'_, Result<RpcReply, RpcError>> {
        Box::pin(self.0.clone().handle_frame(frame, peer))
    }
}
