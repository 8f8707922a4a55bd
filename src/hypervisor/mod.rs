//! The hypervisor seam: what the reconciler needs from libvirt, behind a trait, so the same
//! daemon logic runs against libvirt ([`libvirt::Libvirt`]) and in the simulation
//! ([`memory::MemoryHypervisor`]).
//!
//! **Architecture invariant:** only this module talks to libvirt; every libvirt call runs behind
//! the panic boundary on a blocking thread with a deadline.

pub mod libvirt;
pub mod memory;

use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::{ActualState, Arrival};
use serde::Serialize;

/// A domain as the hypervisor reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Domain {
    pub name: String,
    pub uuid: String,
    pub state: ActualState,
    /// The hypervisor's id of a running domain (stable while it runs: adoption keeps it).
    pub id: Option<u32>,
}

/// Why a hypervisor call failed: a plain value, recorded as the VM's `failure_reason`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HypervisorError {
    #[error("no domain named {0:?}")]
    NoDomain(String),
    #[error("{op} {name}: {message}")]
    Refused { op: &'static str, name: String, message: String },
    #[error("hypervisor unavailable: {0}")]
    Unavailable(String),
}

/// What the reconciler does to a node's hypervisor.
pub trait Hypervisor: Send + Sync + 'static {
    /// Every domain the hypervisor knows (managed by herd or not).
    fn list(&self) -> BoxFuture<'_, Result<Vec<Domain>, HypervisorError>>;
    /// Defines (or redefines) a persistent domain from `xml`.
    fn define<'a>(&'a self, xml: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;
    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;
    /// Asks the guest to shut down (ACPI); the reconciler destroys after its timeout.
    fn shutdown<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;
    /// Pulls the plug.
    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;
    fn undefine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;
    /// Whether domain `name` arrived here by a live migration that completed (libvirt's
    /// statistics of its last completed job: an incoming migration, with its downtime); `None`
    /// when it was started here or the hypervisor keeps no such statistics.
    fn arrival<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Arrival>, HypervisorError>>;
    /// Asks the hypervisor to abort the job (a live migration) running on domain `name`.
    fn abort_job<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>>;
    /// Live-migrates a running domain to the hypervisor at `dest_uri` (peer to peer, persistent
    /// there, undefined here). On `Ok` it runs there and no longer here; on `Refused` it still
    /// runs here; `Unavailable` (e.g. past `deadline`) means the outcome is unknown.
    fn migrate_live<'a>(
        &'a self,
        name: &'a str,
        dest_uri: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), HypervisorError>>;
}
