//! herd-raft: consensus plumbing around openraft.
//!
//! ```text
//!   node/         ClusterNode and the cluster port's handler
//!     mod.rs        construction, accessors, write/read paths, quorum
//!     membership.rs resume, init, join (both phases), add/remove members, leave
//!     forward.rs    leader ops: run here when leading, else forward (pooled), retry with backoff
//!     handler.rs    NodeHandler: auth rules and dispatch of each Rpc
//!     cert.rs       certificate renewal (both ends), a joiner's enrolment
//!     policy.rs     JoinPolicy: what an admitted join writes (set by the caller)
//!     tokens.rs     join tokens, request ids, the replaceable random source
//!   follow/       following the state outside Raft: serve a member's changes, Follower (mod.rs),
//!                 Session (session.rs), LeaderLink: writes and read barriers (link.rs)
//!   network.rs    PeerClient (deadlines, reconnect) + openraft RaftNetworkV2 (pre-vote too)
//!   server.rs     accept loop: connection limit, idle timeout, frame deadline
//!   wire.rs       frames: u32 length + rmp-serde body, bounded
//!   transport.rs  Connector/Listener seam (TCP; turmoil's TCP in the simulation)
//!   tls/          cluster CA, node certificates, enrolment, mutual TLS 1.3 over the seam
//!     mod.rs        TlsError, CertInfo, Enrolment
//!     cert.rs       certificate names, reading, key + request, CA signing
//!     pki.rs        Pki: the files in data_dir/tls/, keys, sealing, rustls configurations
//!     verify.rs     server verifiers (member, pinned CA), TlsConnector, TlsListener
//!   clock.rs      the leader's time stamp
//! ```
//!
//! **Architecture invariant:** no code here decides cluster policy; it moves bytes, runs
//! openraft, and proposes commands the model (`herd-storage`) decides on. What a join writes is
//! the caller's [`node::JoinPolicy`].

pub mod clock;
pub mod follow;
pub mod network;
pub mod node;
pub mod server;
pub mod tls;
pub mod transport;
pub mod watch;
pub mod wire;

pub use herd_storage::types::TypeConfig;
pub use node::{ClusterNode, Local, Member, NodeError, NodeSettings, Raft};
