//! herd-storage: the replicated model and where it lives.
//!
//! ```text
//!   model       the crate herd-model (storage/model/), re-exported: pure State + Command +
//!               apply; no IO, no clock, serde its only dependency
//!   types.rs    the openraft type config (declared here: the stores implement against it)
//!   sm.rs       the openraft state machine: decode, apply, persist through a Backend, respond
//!   changes.rs  the ring of recent applied requests, for followers outside Raft
//!   sled_store  log store + state-machine backend + node-local identity on sled 0.34.7
//!   mem_store   the same behaviour in memory, for the deterministic simulation
//!   mark        the log mark: what this node applied, kept outside data_dir
//!   log_store   one type for either log store (the daemon is not generic over it)
//! ```
//!
//! **Architecture invariant:** only this crate imports `sled`; only `model` decides.

pub mod changes;
pub mod identity;
pub mod log_store;
pub mod mark;
pub mod mem_store;
pub mod sled_store;
pub mod sm;
pub mod types;

/// The replicated model (crate `herd-model`): `herd_storage::model::…` paths stay as they were.
pub use herd_model as model;

pub use model::{NodeId, Request, Response, State};
pub use types::TypeConfig;
