//! herd-raft: consensus plumbing around openraft.
//!
//! ```text
//!   node.rs       ClusterNode: init/join/remove, leader ops with forwarding, quorum
//!   network.rs    PeerClient (deadlines, reconnect) + openraft RaftNetworkV2 (pre-vote too)
//!   server.rs     accept loop: connection limit, idle timeout, frame deadline
//!   wire.rs       frames: u32 length + rmp-serde body, bounded
//!   transport.rs  Connector/Listener seam (TCP; turmoil's TCP in the simulation)
//!   tls.rs        cluster CA, node certificates, enrolment, mutual TLS 1.3 over the seam
//!   clock.rs      the leader's time stamp
//! ```
//!
//! **Architecture invariant:** no code here decides cluster policy; it moves bytes, runs
//! openraft, and proposes commands the model (`herd-storage`) decides on.

pub mod clock;
pub mod network;
pub mod node;
pub mod server;
pub mod tls;
pub mod transport;
pub mod wire;

pub use herd_storage::types::TypeConfig;
pub use node::{ClusterNode, Member, NodeError, NodeSettings, Raft};
