//! The replicated model: cluster state, the commands that change it, and the pure `apply`.
//!
//! ```text
//!   client ──Request{id, ops}──▶ leader stamps time_ms ──▶ Raft log ──▶ apply(&mut State, index, &Request)
//!                                                                        │
//!                                                        Applied { response } ◀──┘
//! ```
//!
//! **Architecture invariant:** this module does no IO and reads no clock. Time comes only from
//! the leader-stamped `Request::time_ms` (made monotonic by `State::clock_ms`), every map is a
//! `BTreeMap`, so the same log always yields the same state on every node.

#[macro_use]
mod types;
mod apply;
mod fence;
mod vm;

#[cfg(test)]
mod apply_test;

pub use apply::{apply, validate_name as validate_node_name, Applied, MAX_EVENTS, MAX_REMEMBERED_REQUESTS};
pub use fence::*;
pub use types::*;
pub use vm::{place, MAX_XML_BYTES};
