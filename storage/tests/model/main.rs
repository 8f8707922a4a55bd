//! Tests of the replicated model (crate `herd-model`), through its public API as herd-storage
//! re-exports it (`herd_storage::model`). They live here because they use proptest and
//! rmp-serde, and herd-model depends on serde alone — dev-dependencies included.
//!
//! ```text
//!   table       table-driven cases for every command and refusal
//!   requests    deduplication, the monotonic clock, memory bounds, node ids, router states, tokens
//!   properties  proptest properties over random command sequences
//!   vm          VM commands and placement
//!   fence       fencing: decision, outcomes, recovery
//!   moves       how a finished move went (live with its downtime, or by shutdown)
//!   concerns    which deltas concern a node at once (what its session is never made to wait for)
//! ```

mod common;
mod concerns;
mod fence;
mod moves;
mod properties;
mod requests;
mod table;
mod vm;
