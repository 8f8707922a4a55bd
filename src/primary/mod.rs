//! Primary coordinator duties: the Raft leader holds floating addresses and runs primary-only
//! services (hook executables), only while its leader lease is valid.
//!
//! ```text
//!  gate.rs     pure: when to take over and when to drop duties (lease, guard, pauses, hand-over)
//!  duties.rs   IO: floating addresses (`ip`, gratuitous ARP) and hook executables
//!  manager.rs  the loop: observe Raft, ask the gate, act; takeover/relinquish in the log;
//!              hand-over (`herd node primary`) and notifications to survivors
//! ```
//!
//! Exclusivity: decisions go through the log (a deposed leader cannot commit); side effects
//! outside it (addresses, hooks) are held only while the lease is valid — see ARCHITECTURE.md
//! "Primary exclusivity" for the timing argument.

pub mod duties;
pub mod gate;
pub mod manager;
