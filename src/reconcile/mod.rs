//! The reconciler: every node converges its hypervisor to the replicated desired state of the
//! VMs assigned to it, and writes what it sees back.
//!
//! ```text
//!  plan(round, VMs of record, domains) ─▶ actions (define, start, shutdown, destroy)
//!                                              └▶ reports (actual state), unmanaged domains
//! ```
//! `plan` is pure and unit-tested; [`Reconciler`] runs it on every applied change (a local
//! watch) and every `interval` (a crashed VM is restarted), executes the actions one by one,
//! and reports through Raft. Rules: a domain that is running is adopted, never restarted; a
//! domain the cluster does not know is reported and never touched; a node without recent quorum
//! contact only stops VMs and never starts one; in maintenance a VM no one commanded since it
//! began is left as found (`model::left_alone`) and only reported.
//!
//! ```text
//!   plan.rs        pure: the actions and reports of one round
//!   reconciler.rs  executes a plan against the hypervisor (libvirt or its in-memory twin)
//!   migrations.rs  live migrations away from here, each on a task of its own, bounded
//!   looper.rs      the node's loop: a round on every applied change and every interval
//!   xml.rs         what `vm define` reads from a domain XML
//! ```

mod looper;
mod migrations;
mod plan;
mod reconciler;
mod xml;

pub use looper::Looper;
pub use plan::{live_policy, plan, Action, Memory, Plan, Round};
pub use reconciler::{Outcome, Reconciler};
pub use xml::spec_from_xml;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
