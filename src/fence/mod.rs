//! Fencing: the agents that power a host off through its BMC, the pure decision, and the
//! manager that runs on the primary (DESIGN §6).
//!
//! - `agent` — the [`agent::FenceAgent`] seam, errors, and the registry (one agent, one IPMI
//!   session, per BMC).
//! - `ipmi` — the built-in IPMI-over-LAN agent on `ipmi-rs`, with its traps handled.
//! - `external` — the fence-agents stdin protocol (`fence_ipmilan`, `fence_redfish`, …).
//! - `decide` — pure: fence, wait or spare, from the facts the primary holds.
//! - `manager` — the primary's loop: decisions, executors, BMC readiness checks.
//! - `selffence` — the opt-in self-fence: the watchdog fed only while this node's keepalives
//!   commit.
//!
//! **Invariant:** only `ipmi` talks to ipmi-rs, on blocking threads behind the panic boundary;
//! only `manager` writes fence commands; `decide` does no IO and reads no clock.

pub mod agent;
pub mod decide;
pub mod external;
pub mod ipmi;
pub mod manager;
pub mod selffence;
