//! The cluster protocol on the wire: length-prefixed rmp-serde frames.
//!
//! ```text
//!   ┌──────────────┬────────────────────────────────────┐
//!   │ u32 BE length│ rmp-serde body (≤ max_frame bytes) │
//!   └──────────────┴────────────────────────────────────┘
//!   request body:  RequestFrame { version, cluster_id, to, body: Rpc }
//!   response body: Result<RpcReply, RpcError>
//! ```
//!
//! Reading never trusts the peer: the length is checked against the limit before any
//! allocation, every read has a deadline, and a body that does not decode is an error value.

use std::io;
use std::time::Duration;

use herd_storage::model::{NodeId, Request, Response, Role};
use herd_storage::types::{SnapshotMeta, TypeConfig, Vote};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bumped on any incompatible change of the frames below.
pub const PROTOCOL_VERSION: u16 = 2;

/// Default bound on one frame (a whole snapshot travels in one frame).
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024 * 1024;

/// What a request frame carries.
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestFrame {
    pub version: u16,
    /// Empty only before the sender belongs to a cluster (a join's first phase).
    pub cluster_id: String,
    /// The node the sender means to reach, when it knows its id.
    pub to: Option<NodeId>,
    /// The sender's node id, when it has one.
    pub from: Option<NodeId>,
    /// How long the sender will wait for the reply: the receiver bounds its work by it.
    pub timeout_ms: u64,
    pub body: Rpc,
}

/// A join, phase one: the leader checks the token and allocates an id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub name: String,
    pub role: Role,
    pub cluster_addr: String,
    /// Request id for deduplication of retries.
    pub request_id: String,
    /// PEM certificate signing request for the joiner's own key (TLS clusters).
    pub csr: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub node_id: NodeId,
    pub cluster_id: String,
    /// The signed certificate (and, for a coordinator, the CA key), over TLS only.
    pub enrolment: Option<crate::tls::Enrolment>,
    /// The coordinators (id, cluster address) at the join: where a client (a hypervisor outside
    /// Raft) starts following the cluster.
    #[serde(default)]
    pub coordinators: Vec<(NodeId, String)>,
}

/// A join, phase two: the joiner runs Raft under its new id; the leader adds it as a learner,
/// waits for it to catch up and promotes a coordinator to voter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddMemberRequest {
    pub token: String,
    pub node_id: NodeId,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddMemberReply {
    pub voter: bool,
}

/// Every request on the cluster port.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// Work only the leader does; a follower that receives it answers `NotLeader`.
    Leader(LeaderOp),
    /// The leader tells a removed node to stop participating.
    Removed,
    /// The leader tells a node that its log went backwards (it lost entries it acknowledged):
    /// it must stop taking part under its id.
    LogReverted {
        reason: String,
    },
    /// A node asks the leader (directly, never forwarded) to sign a new certificate for the
    /// id its current certificate names.
    RenewCert {
        csr: String,
    },
    /// The primary tells a node about a cluster change (its notify hooks run); the reply is
    /// the acknowledgement.
    Notify {
        kind: String,
        args: Vec<String>,
    },
    /// A follower outside Raft asks for the committed changes from index `from` on (`None`:
    /// the whole state); with none yet, the answer waits up to `wait_ms` for one (a long poll,
    /// bounded by the frame's timeout). `follow.rs` is the asking side.
    Changes {
        from: Option<u64>,
        wait_ms: u64,
        /// A client's latest statistics: the coordinator that hears it writes them, with the
        /// client's keepalive, in its aggregate for all the clients it serves.
        #[serde(default)]
        stats: Option<herd_storage::model::NodeStats>,
    },
    /// A coordinator (the primary) asks another when it last heard the sessions of clients
    /// `ids` (their long polls for changes): the fence rule's evidence that a client outside
    /// Raft lives. At most [`MAX_SESSIONS_ASKED`] ids.
    SessionsHeard {
        ids: Vec<NodeId>,
    },
    /// As `Changes`, answered with deltas (`RpcReply::Steps`): the records each entry changed,
    /// for a node asking as itself without the figures other nodes' keepalives write. What
    /// followers of this version ask; `Changes` stays for those of the previous one.
    Follow {
        from: Option<u64>,
        wait_ms: u64,
        #[serde(default)]
        stats: Option<herd_storage::model::NodeStats>,
    },
    /// A member asks the leader (directly, never forwarded) to confirm it, every quarter of the
    /// serving window: the answer (`Done`, given only by a leader its quorum acknowledged
    /// lately) dates this member's contact with the leader from when it sent the ask, and the
    /// leader notes when it received it. A member serves sessions only within that contact
    /// (`node/contact.rs`). It carries the asker's serving window: the leader's bound on when a
    /// member stops serving holds only for its own window, so it refuses a member whose window
    /// differs (coordinators must share `[raft] election_timeout_ms`).
    Contact {
        window_ms: u64,
    },
    /// The primary asks a coordinator, for clients `ids`, when it last heard each (absent:
    /// not since it started) and how long it has served at all (`RpcReply::SessionsQuiet`):
    /// the evidence that no coordinator can have acknowledged a client's session lately. At
    /// most [`MAX_SESSIONS_ASKED`] ids.
    SessionsQuiet {
        ids: Vec<NodeId>,
    },
    /// A member tells the leader (directly, once per leader and term) what it knows beyond
    /// [`PROTOCOL_VERSION`]: [`LEVEL`]. A leader of a version before it cannot decode this and
    /// answers `BadRequest`. The leader keeps a record only every member can decode
    /// (`NodeStats::session_only` needs every member at level 1).
    Level {
        level: u32,
    },
    /// As `Follow`, and other nodes' VMs as outlines (`VmRecord::outline`): a client gets whole
    /// only the VMs that are its business, and of the others only a change of where they
    /// belong. What clients of this version ask; a coordinator of a version before it answers
    /// `BadRequest` and the client asks `Follow` for a while (`follow::REQUESTS_FOR`).
    Outlined {
        from: Option<u64>,
        wait_ms: u64,
        #[serde(default)]
        stats: Option<herd_storage::model::NodeStats>,
    },
}

/// What this version knows beyond [`PROTOCOL_VERSION`], told the leader by [`Rpc::Level`]:
/// 1 — a client that self-fences on its session alone (`NodeStats::session_only`).
pub const LEVEL: u32 = 1;

/// Ids one `SessionsHeard` may ask about.
pub const MAX_SESSIONS_ASKED: usize = 4096;

/// Operations executed by the leader, forwarded from any node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LeaderOp {
    /// A replicated write; the leader stamps its time.
    Write(Request),
    /// The leader's read index for a linearizable follower read.
    ReadIndex,
    Join(JoinRequest),
    AddMember(AddMemberRequest),
    RemoveNode {
        name: String,
        force: bool,
    },
    /// Move the primary role to `to` (any other voter if `None`): the primary relinquishes its
    /// duties first, then hands leadership over.
    MovePrimary {
        to: Option<String>,
    },
    /// The leader's whole applied state (`RpcReply::State`): for a client's reads that need
    /// every node's figures — its own copy leaves other nodes' keepalives out.
    State,
    /// The figures of the clients a coordinator heard this interval, relayed to the leader:
    /// it keeps the latest per client and writes those worth a log entry with its own in one
    /// request at its next keepalive interval (`node::figures`). Only from a Raft member; at
    /// most `MAX_KEEPALIVE_OPS` clients a call. A leader of a version before it answers
    /// `BadRequest` (the sender writes them itself).
    Figures(Vec<ClientFigures>),
}

/// A client's figures as a coordinator heard them on its session's last poll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFigures {
    pub id: NodeId,
    /// How long ago the poll that carried them came, when they were taken or sent.
    pub age_ms: u64,
    pub stats: herd_storage::model::NodeStats,
}

impl LeaderOp {
    pub fn name(&self) -> &'static str {
        match self {
            LeaderOp::Write(_) => "write",
            LeaderOp::ReadIndex => "read-index",
            LeaderOp::Join(_) => "join",
            LeaderOp::AddMember(_) => "add-member",
            LeaderOp::RemoveNode { .. } => "remove-node",
            LeaderOp::MovePrimary { .. } => "move-primary",
            LeaderOp::State => "state",
            LeaderOp::Figures(_) => "figures",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    /// The answer, and the boot of the follower's Raft that gave it (`Member::boot`).
    AppendEntries(AppendEntriesResponse<TypeConfig>, u64),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    Written(Response),
    ReadIndex(u64),
    Joined(JoinReply),
    MemberAdded(AddMemberReply),
    /// A renewed certificate (PEM).
    Renewed(String),
    Done,
    /// The changes asked for, in log order (empty: none came within the wait).
    Changes(Vec<herd_storage::changes::Change>),
    /// The whole applied state (the snapshot's encoding) and where it stands in the log.
    State {
        last_applied: Option<herd_storage::types::LogId>,
        state: Vec<u8>,
    },
    /// How many milliseconds ago each client asked was heard (those never heard left out).
    SessionsHeard(Vec<(NodeId, u64)>),
    /// How many milliseconds ago this coordinator last heard each client asked about (those
    /// not heard since it started left out), and how long it has been up to hear any.
    SessionsQuiet {
        heard: Vec<(NodeId, u64)>,
        serving_ms: u64,
    },
    /// The deltas asked for (`Rpc::Follow`), in log order (empty: none came within the wait).
    Steps(Vec<herd_storage::changes::Step>),
    /// An answer already encoded — the frame body of `Ok(Changes(..))` or `Ok(Steps(..))` —,
    /// shared by every session that asks for the same changes (`follow::Answers`). The server
    /// writes its bytes as they are: on the wire it is that answer, and nothing ever decodes
    /// into it. Last: a skipped variant before one that travels could give decoders other
    /// variant indexes than encoders.
    #[serde(skip)]
    Encoded(std::sync::Arc<Vec<u8>>),
}

/// Errors that travel back to the caller. Plain data, so any version can read them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RpcError {
    #[error("this is node {actual:?}, not node {expected}")]
    WrongNode { expected: NodeId, actual: Option<NodeId> },
    #[error("this node belongs to cluster {actual:?}, not {expected:?}")]
    WrongCluster { expected: String, actual: String },
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("this node is not a cluster member")]
    NotMember,
    #[error("not the leader (leader: {leader_addr:?})")]
    NotLeader { leader_id: Option<NodeId>, leader_addr: Option<String> },
    #[error("join token refused")]
    BadToken,
    #[error("{0}")]
    Refused(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The leader could not be reached from the forwarding node, or did not answer in time:
    /// worth retrying until the caller's deadline.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl RpcError {
    /// Whether a caller should retry (elsewhere or later) within its deadline.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RpcError::NotLeader { .. } | RpcError::Unavailable(_) | RpcError::WrongNode { .. })
    }
}

/// Transport failures while framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("unencodable frame: {0}")]
    Encode(String),
}

impl FrameError {
    /// Whether the stream is still in a usable state (only a bad body leaves it in sync).
    pub fn stream_usable(&self) -> bool {
        matches!(self, FrameError::Decode(_))
    }
}

/// Encodes a value as one frame body (compact rmp-serde: both ends ship together).
pub fn encode<T: Serialize>(v: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let body = rmp_serde::to_vec(v).map_err(|e| FrameError::Encode(e.to_string()))?;
    match u32::try_from(body.len()) {
        Ok(len) if len <= max => Ok(body),
        _ => Err(FrameError::TooLarge { len: u32::try_from(body.len()).unwrap_or(u32::MAX), max }),
    }
}

/// Frames up to this size go out in one write (length and body copied together).
const COALESCE_BELOW: usize = 64 * 1024;

/// Writes one frame within `deadline`.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8], deadline: Duration) -> Result<(), FrameError> {
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge { len: u32::MAX, max: u32::MAX })?;
    let fut = async {
        if body.len() <= COALESCE_BELOW {
            // One write: over TLS each write is a record and a syscall of its own.
            let mut frame = Vec::with_capacity(4 + body.len());
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(body);
            w.write_all(&frame).await?;
        } else {
            w.write_all(&len.to_be_bytes()).await?;
            w.write_all(body).await?;
        }
        w.flush().await
    };
    tokio::time::timeout(deadline, fut).await.map_err(|_| FrameError::Timeout(deadline))??;
    Ok(())
}

/// Reads a frame's length: waits up to `idle` for it to start, then `deadline` for the rest of
/// the four bytes; refuses a length over `max` before anything is allocated.
pub async fn read_len<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    idle: Duration,
    deadline: Duration,
) -> Result<u32, FrameError> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(idle, r.read(&mut first)).await.map_err(|_| FrameError::Timeout(idle))??;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    let mut more = [0u8; 3];
    match tokio::time::timeout(deadline, r.read_exact(&mut more)).await {
        Err(_) => return Err(FrameError::Timeout(deadline)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let len = u32::from_be_bytes([first[0], more[0], more[1], more[2]]);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Reads a body of `len` bytes within `deadline`.
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: u32, deadline: Duration) -> Result<Vec<u8>, FrameError> {
    let mut body = vec![0u8; len as usize];
    match tokio::time::timeout(deadline, r.read_exact(&mut body)).await {
        Err(_) => Err(FrameError::Timeout(deadline)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) => Ok(body),
    }
}

/// Reads one frame: waits up to `idle` for it to start, then up to `deadline` for the rest.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    idle: Duration,
    deadline: Duration,
) -> Result<Vec<u8>, FrameError> {
    let len = read_len(r, max, idle, deadline).await?;
    read_body(r, len, deadline).await
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let write = async move {
            let _ = a.write_all(&u32::MAX.to_be_bytes()).await;
            a
        };
        let (_a, res) = tokio::join!(write, read_frame(&mut b, 1024, Duration::from_secs(1), Duration::from_secs(1)));
        assert!(matches!(res, Err(FrameError::TooLarge { len: u32::MAX, max: 1024 })), "{res:?}");
    }

    #[tokio::test]
    async fn truncated_body_times_out_or_closes() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.expect("write");
        a.write_all(b"abc").await.expect("write");
        drop(a);
        let res = read_frame(&mut b, 1024, Duration::from_secs(1), Duration::from_secs(1)).await;
        assert!(matches!(res, Err(FrameError::Closed)), "{res:?}");
    }

    #[tokio::test]
    async fn a_frame_round_trips() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let body = encode(&RpcError::NotMember, 1024).expect("encode");
        write_frame(&mut a, &body, Duration::from_secs(1)).await.expect("write");
        let got = read_frame(&mut b, 1024, Duration::from_secs(1), Duration::from_secs(1)).await.expect("read");
        assert_eq!(decode::<RpcError>(&got).expect("decode"), RpcError::NotMember);
    }

    #[test]
    fn garbage_does_not_decode_into_a_request() {
        assert!(decode::<RequestFrame>(&[0xc1, 0xff, 0x00, 0x13]).is_err());
    }
}
