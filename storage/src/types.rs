//! The openraft type configuration.
//!
//! It is declared here, not in `herd-raft`, because the storage traits are implemented against
//! it; `herd-raft` re-exports it. With the `detsim` feature the async runtime becomes openraft's
//! seeded `DeterministicRng<TokioRuntime>`, so the simulation replays a seed exactly.

use std::io::Cursor;

use crate::model::{Request, Response};

#[cfg(not(feature = "detsim"))]
type Runtime = openraft::TokioRuntime;
#[cfg(feature = "detsim")]
type Runtime = openraft_rt::deterministic_rng::DeterministicRng<openraft::TokioRuntime>;

openraft::declare_raft_types!(
    /// herd's Raft types: `Request` in the log, `Response` out of `apply`, `u64` node ids and
    /// a `BasicNode { addr }` (the cluster address) per member.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        AsyncRuntime = Runtime,
);

/// Snapshots travel and rest as one rmp-serde blob.
pub type SnapshotData = Cursor<Vec<u8>>;

pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Spawns a task on the Raft runtime: `tokio::spawn`, except that under `detsim` the task
/// inherits a seed derived from its parent's (openraft's seeded RNG is task-local, so every
/// task of the daemon must be spawned through here to stay inside the simulation's seed tree).
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(not(feature = "detsim"))]
    {
        tokio::spawn(future)
    }
    #[cfg(feature = "detsim")]
    {
        <Runtime as openraft::AsyncRuntime>::spawn(future)
    }
}
