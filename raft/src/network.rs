//! The client side of the cluster protocol: one connection per peer, every call bounded by a
//! deadline, reconnection on failure (openraft backs off on `Unreachable`).

use std::sync::Arc;
use std::time::Duration;

use herd_storage::model::NodeId;
use herd_storage::types::{Snapshot, SnapshotData, TypeConfig, Vote};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetworkV2};
use tokio::time::Instant;

use crate::transport::{BoxStream, Connector};
use crate::wire::{self, FrameError, RequestFrame, Rpc, RpcError, RpcReply, PROTOCOL_VERSION};

/// Bounds of the cluster transport, shared by client and server.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_frame: u32,
    pub connect_timeout: Duration,
    /// A server closes a connection idle this long.
    pub idle_timeout: Duration,
    /// Once a frame has started, the rest must arrive within this.
    pub frame_timeout: Duration,
    pub max_connections: usize,
    /// Connections from one peer address; a flood from one host cannot lock the others out.
    pub max_per_peer: usize,
    /// All frame bodies being read at once, across connections.
    pub max_buffered_bytes: u64,
    /// A request is never worked on longer than this, whatever timeout its sender gave.
    pub max_request_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: wire::DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_millis(1000),
            idle_timeout: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_per_peer: 32,
            max_buffered_bytes: 256 * 1024 * 1024,
            max_request_time: Duration::from_secs(120),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The peer could not be reached or the exchange broke: safe to retry elsewhere.
    #[error("{addr}: {source}")]
    Transport { addr: String, source: FrameError },
    /// The peer answered with an error.
    #[error(transparent)]
    Remote(#[from] RpcError),
    /// The peer's certificate is not one to trust (a wrong CA hash at a join, another
    /// cluster's CA): retrying cannot help.
    #[error("{addr}: {reason}")]
    Untrusted { addr: String, reason: String },
    #[error("{addr}: unexpected reply {reply}")]
    Unexpected { addr: String, reply: String },
}

/// A connection to one peer, reopened on demand.
pub struct PeerClient {
    connector: Arc<dyn Connector>,
    addr: String,
    target: Option<NodeId>,
    cluster_id: String,
    from: Option<NodeId>,
    limits: Limits,
    conn: Option<BoxStream>,
}

impl PeerClient {
    pub fn new(
        connector: Arc<dyn Connector>,
        addr: String,
        target: Option<NodeId>,
        cluster_id: String,
        limits: Limits,
    ) -> Self {
        PeerClient { connector, addr, target, cluster_id, from: None, limits, conn: None }
    }

    /// Names the sending node in every frame.
    pub fn from(mut self, from: Option<NodeId>) -> Self {
        self.from = from;
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn target(&self) -> Option<NodeId> {
        self.target
    }

    /// Sends `body` and waits for the reply, all within `timeout`. A failure on a reused
    /// connection (the peer may have closed it while idle) is retried once on a fresh one.
    pub async fn call(&mut self, body: Rpc, timeout: Duration) -> Result<RpcReply, CallError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let frame = RequestFrame {
            version: PROTOCOL_VERSION,
            cluster_id: self.cluster_id.clone(),
            to: self.target,
            from: self.from,
            timeout_ms,
            body,
        };
        let transport = |addr: &str, source| CallError::Transport { addr: addr.to_string(), source };
        let bytes = wire::encode(&frame, self.limits.max_frame).map_err(|e| transport(&self.addr, e))?;
        let deadline = Instant::now() + timeout;
        for attempt in 0..2 {
            let reused = self.conn.is_some();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let result = tokio::time::timeout(remaining, self.exchange(&bytes, remaining)).await;
            let err = match result {
                Ok(Ok(reply)) => {
                    return match wire::decode::<Result<RpcReply, RpcError>>(&reply) {
                        Ok(Ok(r)) => Ok(r),
                        Ok(Err(e)) => Err(CallError::Remote(e)),
                        Err(e) => {
                            self.conn = None;
                            Err(transport(&self.addr, e))
                        }
                    }
                }
                Ok(Err(e)) => e,
                Err(_) => FrameError::Timeout(timeout),
            };
            self.conn = None;
            if let FrameError::Io(e) = &err {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    return Err(CallError::Untrusted { addr: self.addr.clone(), reason: e.to_string() });
                }
            }
            let retry = reused && attempt == 0 && matches!(err, FrameError::Closed | FrameError::Io(_));
            if !retry {
                return Err(transport(&self.addr, err));
            }
        }
        Err(transport(&self.addr, FrameError::Closed))
    }

    async fn exchange(&mut self, bytes: &[u8], remaining: Duration) -> Result<Vec<u8>, FrameError> {
        if self.conn.is_none() {
            let t = self.limits.connect_timeout.min(remaining);
            let s = tokio::time::timeout(t, self.connector.connect(&self.addr, self.target))
                .await
                .map_err(|_| FrameError::Timeout(t))??;
            self.conn = Some(s);
        }
        let conn = self.conn.as_mut().ok_or(FrameError::Closed)?;
        wire::write_frame(conn, bytes, remaining).await?;
        wire::read_frame(conn, self.limits.max_frame, remaining, remaining).await
    }
}

/// Creates one [`PeerNetwork`] per replication target.
pub struct NetworkFactory {
    pub connector: Arc<dyn Connector>,
    pub limits: Limits,
    pub cluster_id: String,
    /// This node's id.
    pub me: NodeId,
    /// Where the answers to appends are recorded.
    pub watch: Arc<crate::watch::ReplicationWatch>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork {
            client: PeerClient::new(
                self.connector.clone(),
                node.addr.clone(),
                Some(target),
                self.cluster_id.clone(),
                self.limits.clone(),
            )
            .from(Some(self.me)),
            target,
            watch: self.watch.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerNetwork {
    client: PeerClient,
    target: NodeId,
    watch: Arc<crate::watch::ReplicationWatch>,
}

fn to_rpc_error(e: CallError) -> RPCError<TypeConfig> {
    match e {
        CallError::Transport { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        other => RPCError::Network(NetworkError::new(&other)),
    }
}

fn unexpected(addr: &str, reply: RpcReply) -> CallError {
    CallError::Unexpected { addr: addr.to_string(), reply: format!("{reply:?}").chars().take(120).collect() }
}

impl PeerNetwork {
    async fn call(&mut self, rpc: Rpc, option: &RPCOption) -> Result<RpcReply, RPCError<TypeConfig>> {
        self.client.call(rpc, option.soft_ttl()).await.map_err(to_rpc_error)
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let sent = crate::watch::Sent::of(&rpc);
        match self.client.call(Rpc::AppendEntries(rpc), option.soft_ttl()).await {
            Ok(RpcReply::AppendEntries(r)) => {
                self.watch.on_append(self.target, &sent, Ok(&r));
                Ok(r)
            }
            Ok(other) => Err(to_rpc_error(unexpected(self.client.addr(), other))),
            Err(CallError::Remote(RpcError::Raft(e))) => {
                self.watch.on_append(self.target, &sent, Err(&e));
                // Its Raft stopped (a storage error): unreachable for Raft, so openraft backs
                // off instead of retrying every few milliseconds.
                Err(RPCError::Unreachable(Unreachable::new(&CallError::Remote(RpcError::Raft(e)))))
            }
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(Rpc::Vote(rpc), &option).await? {
            RpcReply::Vote(r) => Ok(r),
            other => Err(to_rpc_error(unexpected(self.client.addr(), other))),
        }
    }

    /// Implemented (openraft's default grants every pre-vote, which protects nothing): the
    /// target answers whether it would grant, so a node that cannot win does not bump terms.
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(Rpc::PreVote(rpc), &option).await? {
            RpcReply::Vote(r) => Ok(r),
            other => Err(to_rpc_error(unexpected(self.client.addr(), other))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = Rpc::Snapshot { vote, meta: snapshot.meta, data: snapshot.snapshot.into_inner() };
        let addr = self.client.addr().to_string();
        let call = self.client.call(rpc, option.soft_ttl());
        tokio::select! {
            biased;
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = call => match reply {
                Ok(RpcReply::Snapshot(r)) => Ok(r),
                Ok(other) => Err(StreamingError::Network(NetworkError::new(&unexpected(&addr, other)))),
                Err(e @ CallError::Transport { .. }) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
                Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
            },
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(Rpc::TransferLeader(req), &option).await? {
            RpcReply::TransferLeader(r) => Ok(r),
            other => Err(to_rpc_error(unexpected(self.client.addr(), other))),
        }
    }

    /// Reconnect with exponential backoff: 50 ms doubling to 1 s.
    fn backoff(&self) -> Option<Backoff> {
        Some(Backoff::new((0..).map(|i: u32| Duration::from_millis(50u64 << i.min(4)).min(Duration::from_secs(1)))))
    }
}
