//! The client side of the cluster protocol: one connection per peer, every call bounded by a
//! deadline, a connection kept across a timed-out call (its late reply is dropped),
//! reconnection on failure (openraft backs off on `Unreachable`).

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
use tokio::io::{AsyncBufReadExt, BufReader};
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
    /// Connections from members' addresses, in all.
    pub max_connections: usize,
    /// Connections from one member's address; a flood from one host cannot lock the others out.
    pub max_per_peer: usize,
    /// Connections from any other address (joiners, strangers), in all and per host: they
    /// never take members' capacity.
    pub max_strangers: usize,
    pub max_strangers_per_host: usize,
    /// A stranger's handshake, and an anonymous peer's one request, must start within this.
    pub stranger_timeout: Duration,
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
            max_strangers: 64,
            max_strangers_per_host: 4,
            stranger_timeout: Duration::from_secs(5),
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

/// Replies a connection may owe (calls that timed out while their reply had not started to
/// arrive) before it is given up for a fresh one.
const MAX_OWED: usize = 4;

/// An open connection and what the calls on it left behind.
struct Conn {
    /// Buffered, so waiting for a reply's first byte can be abandoned without losing bytes.
    stream: BufReader<BoxStream>,
    /// Replies still to come, in order (the server answers one request after another): a
    /// call that timed out before its reply began leaves one, read and dropped by the next.
    owed: usize,
    /// A frame was being written or read when the call ended: where the next frame starts
    /// is unknown, so the connection is not used again.
    torn: bool,
}

/// A connection to one peer, reopened on demand. A call that times out keeps a healthy
/// connection: its late reply is matched by position and dropped (a late heartbeat must not
/// cost a new TCP and TLS handshake).
pub struct PeerClient {
    connector: Arc<dyn Connector>,
    addr: String,
    target: Option<NodeId>,
    cluster_id: String,
    from: Option<NodeId>,
    limits: Limits,
    conn: Option<Conn>,
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
            if self.conn.as_ref().is_some_and(|c| c.torn) {
                self.conn = None;
            }
            let reused = self.conn.is_some();
            let err = match self.exchange(&bytes, deadline).await {
                Ok(reply) => {
                    return match wire::decode::<Result<RpcReply, RpcError>>(&reply) {
                        Ok(Ok(r)) => Ok(r),
                        Ok(Err(e)) => Err(CallError::Remote(e)),
                        Err(e) => {
                            self.conn = None;
                            Err(transport(&self.addr, e))
                        }
                    }
                }
                // Timed out waiting for the reply to start: the connection stays.
                Err(e @ FrameError::Timeout(_)) if self.conn.as_ref().is_some_and(|c| !c.torn) => {
                    return Err(transport(&self.addr, e))
                }
                Err(e) => e,
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

    /// One request and its reply by `deadline`. Every wait is bounded; a future dropped
    /// mid-frame leaves the connection marked torn.
    async fn exchange(&mut self, bytes: &[u8], deadline: Instant) -> Result<Vec<u8>, FrameError> {
        let remaining = || deadline.saturating_duration_since(Instant::now());
        if self.conn.is_none() {
            let t = self.limits.connect_timeout.min(remaining());
            let s = tokio::time::timeout(t, self.connector.connect(&self.addr, self.target))
                .await
                .map_err(|_| FrameError::Timeout(t))??;
            self.conn = Some(Conn { stream: BufReader::new(s), owed: 0, torn: false });
        }
        let max = self.limits.max_frame;
        let conn = self.conn.as_mut().ok_or(FrameError::Closed)?;
        conn.torn = true;
        wire::write_frame(&mut conn.stream, bytes, remaining()).await?;
        conn.owed += 1;
        conn.torn = false;
        loop {
            let wait = remaining();
            match tokio::time::timeout(wait, conn.stream.fill_buf()).await {
                Err(_) => {
                    // Nothing of the reply yet: it is owed, and dropped when it comes.
                    conn.torn = conn.owed > MAX_OWED;
                    return Err(FrameError::Timeout(wait));
                }
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok([])) => return Err(FrameError::Closed),
                Ok(Ok(_)) => {}
            }
            conn.torn = true;
            let frame = wire::read_frame(&mut conn.stream, max, remaining(), remaining()).await?;
            conn.torn = false;
            conn.owed = conn.owed.saturating_sub(1);
            if conn.owed == 0 {
                return Ok(frame);
            }
            // A reply to an earlier call that gave up waiting: dropped.
        }
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
            Ok(RpcReply::AppendEntries(r, boot)) => {
                self.watch.on_append(self.target, &sent, Ok((&r, boot)));
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::transport::TcpConnector;

    /// A plain server that answers each request `Done`, the first one only after `first_delay`;
    /// counts the connections it accepts.
    async fn slow_first_server(first_delay: Duration) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let served = Arc::new(AtomicUsize::new(0));
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let served = served.clone();
                tokio::spawn(async move {
                    let limit = Duration::from_secs(5);
                    while let Ok(body) = wire::read_frame(&mut s, 1 << 20, limit, limit).await {
                        let frame: RequestFrame = wire::decode(&body).expect("request");
                        if served.fetch_add(1, Ordering::SeqCst) == 0 {
                            tokio::time::sleep(first_delay).await;
                        }
                        let reply: Result<RpcReply, RpcError> = Ok(RpcReply::ReadIndex(frame.timeout_ms));
                        let bytes = wire::encode(&reply, 1 << 20).expect("encode");
                        if wire::write_frame(&mut s, &bytes, limit).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_timed_out_call_keeps_the_connection_and_drops_its_late_reply() {
        let (addr, accepted) = slow_first_server(Duration::from_millis(300)).await;
        let mut c = PeerClient::new(Arc::new(TcpConnector), addr, None, "c".into(), Limits::default());
        let first = c.call(Rpc::Leader(crate::wire::LeaderOp::ReadIndex), Duration::from_millis(50)).await;
        assert!(matches!(first, Err(CallError::Transport { source: FrameError::Timeout(_), .. })), "{first:?}");
        // The next call's reply is its own (the server echoes the timeout it was given), not
        // the late one, and it travels on the same connection.
        let second = c.call(Rpc::Leader(crate::wire::LeaderOp::ReadIndex), Duration::from_millis(2000)).await;
        assert!(matches!(second, Ok(RpcReply::ReadIndex(2000))), "{second:?}");
        let third = c.call(Rpc::Leader(crate::wire::LeaderOp::ReadIndex), Duration::from_millis(1999)).await;
        assert!(matches!(third, Ok(RpcReply::ReadIndex(1999))), "{third:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "no new connection for a late reply");
    }

    #[tokio::test]
    async fn a_connection_owing_too_many_replies_is_replaced() {
        let (addr, accepted) = slow_first_server(Duration::from_secs(3)).await;
        let mut c = PeerClient::new(Arc::new(TcpConnector), addr, None, "c".into(), Limits::default());
        for _ in 0..=MAX_OWED {
            let r = c.call(Rpc::Leader(crate::wire::LeaderOp::ReadIndex), Duration::from_millis(20)).await;
            assert!(r.is_err());
        }
        let fresh = c.call(Rpc::Leader(crate::wire::LeaderOp::ReadIndex), Duration::from_millis(2000)).await;
        assert!(matches!(fresh, Ok(RpcReply::ReadIndex(2000))), "{fresh:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a second connection after {MAX_OWED} owed replies");
    }
}
