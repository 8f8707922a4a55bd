//! Fencing: the agents that power a host off through its BMC, the pure decision, and the
//! manager that runs on the primary (DESIGN §6).
//!
//! - `agent` — the [`agent::FenceAgent`] and [`agent::Fencer`] seams and their errors.
//! - `registry` — the production `Fencer`: one agent (one IPMI session) per BMC, sealed
//!   passwords opened.
//! - `ipmi` — the built-in IPMI-over-LAN agent on `ipmi-rs`, with its traps handled.
//! - `external` — the fence-agents stdin protocol (`fence_ipmilan`, `fence_redfish`, …).
//! - `decide` — pure: fence, wait or spare, from the facts the primary holds.
//! - `manager` — the primary's loop: decisions, executors, BMC readiness checks.
//! - `selffence` — the opt-in self-fence: the guard that feeds the watchdog only while this
//!   node's keepalives commit, and destroys its VMs when they stop.
//!
//! **Invariant:** only `ipmi` talks to ipmi-rs, on blocking threads behind the panic boundary;
//! only `manager` writes fence commands; `decide` does no IO and reads no clock.

pub mod agent;
pub mod decide;
pub mod external;
pub mod ipmi;
pub mod manager;
pub mod registry;
mod self_fenced;
pub mod selffence;
