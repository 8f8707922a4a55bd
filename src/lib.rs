//! The `herd` node: daemon, CLI, admin socket and the node-side subsystems.
//!
//! ```text
//!   cli/       clap definitions, admin-socket client, tables      (used by main.rs)
//!   config/    strict TOML config, validated once
//!   run.rs     the production process: Env, daemon, admin socket, metrics, signals
//!   admin/     the admin socket and protocol: typed requests, handlers per family, codes
//!   daemon/    node lifecycle over an Env: start/stop, task ownership, member duties
//!   standing.rs this node's own committed writes (quorum contact) and self-fence flag
//!   tasks.rs   task ownership: every spawned task belongs to a set that stops it
//!   stats.rs   host figures with a deadline
//!   heartbeat/ the active-active heartbeat: pulses, views, criss-cross, verdicts, MNFA
//!   primary/   primary duties: lease gate, floating addresses, hooks, hand-over
//!   service.rs systemd readiness, status, stopping and watchdog
//!   metrics.rs Prometheus text endpoint
//!   flush.rs   node flush / ready, carried out by the node itself
//!   reconcile/ converges the hypervisor to the VMs of record, reports back
//!   hypervisor/ the libvirt seam (virt crate; in-memory twin for the simulation)
//!   boundary.rs third-party calls: blocking thread, deadline, panic turned into an error
//!   sched.rs   real-time scheduling and locked memory for the runtime, runaway watchdog, pauses
//!   breakage.rs test-only switches that break one mechanism each (feature `breakage`)
//! ```
//!
//! A library (not only a binary) so that the deterministic simulation can run the same daemon
//! logic.

pub mod admin;
pub mod boundary;
pub mod breakage;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fence;
pub mod flush;
pub mod heartbeat;
pub mod hypervisor;
pub mod metrics;
pub mod primary;
pub mod reconcile;
pub mod run;
pub mod sched;
pub mod service;
pub mod standing;
pub mod stats;
pub mod tasks;

/// How long an ordinary write of the daemon (admin commands, reports, events) waits for its
/// commit.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
