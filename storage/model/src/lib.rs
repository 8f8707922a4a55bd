//! herd-model: the replicated model — cluster state, the commands that change it, and the pure
//! `apply`.
//!
//! ```text
//!   client ──Request{id, ops}──▶ leader stamps time_ms ──▶ Raft log ──▶ apply(&mut State, index, &Request)
//!                                                                        │
//!                                                        Applied { response } ◀──┘
//! ```
//!
//! **Architecture invariant:** this crate does no IO and reads no clock. Time comes only from
//! the leader-stamped `Request::time_ms` (made monotonic by `State::clock_ms`), every map is a
//! `BTreeMap`, so the same log always yields the same state on every node. It is a crate of its
//! own so that this is checked, not a convention: it depends on `serde` alone (no runtime, no
//! store, no `rand`), and its `clippy.toml` refuses clock reads, processes, files, sockets and
//! hash-ordered maps. `herd-storage` re-exports it as `herd_storage::model`.
//!
//! ```text
//!   types/        the objects (names, node, cluster + State, vm, command, request)
//!   apply.rs      apply(): dedup, the clock, all-or-nothing requests; the dispatch per command
//!   delta.rs      what a request changed, as records: the stream followers outside Raft take
//!   cluster_ops   init, join/remove, join tokens, maintenance, events
//!   maintenance   what reconcilers leave alone in maintenance; drift events
//!   node_ops      what a node writes about itself; takeover
//!   vm.rs         VM commands          place.rs  placement     stray.rs  VMs out of place
//!   fence.rs      fencing: policy, decision, outcome, recovery of a fenced node's VMs
//! ```
//!
//! `State::check_invariants` states what must always hold; herd-storage's state machine runs it
//! after every apply in debug builds and after decoding a snapshot.

#[macro_use]
mod types;
mod apply;
mod cluster_ops;
mod delta;
mod fence;
mod maintenance;
mod node_ops;
mod place;
mod self_fence;
mod stray;
mod vm;

pub use apply::{
    apply, validate_name as validate_node_name, validate_new_name as validate_new_node_name, Applied, MAX_EVENTS,
    MAX_KEEPALIVE_OPS, MAX_OPS, MAX_REMEMBERED_REQUESTS,
};
pub use delta::{Delta, Reader, VmWas};
pub use fence::*;
pub use maintenance::left_alone;
pub use place::place;
pub use types::*;
pub use vm::MAX_XML_BYTES;
