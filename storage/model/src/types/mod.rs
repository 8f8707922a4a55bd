//! The objects of the replicated model and the commands that change them.
//!
//! State names are PVC's (`daemon_state`, `domain_state`, `router_state`), so that PVC users
//! read `herd` output without a glossary. Every type here is versioned by serde defaults:
//! new fields get `#[serde(default)]` so that older entries and snapshots still decode.

#[macro_use]
mod names;
mod cluster;
mod command;
mod node;
mod request;
mod vm;

pub use cluster::*;
pub use command::*;
pub use names::*;
pub use node::*;
pub use request::*;
pub use vm::*;
