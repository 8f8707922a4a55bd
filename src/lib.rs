//! The `herd` node: daemon, CLI, admin socket and the node-side subsystems.
//!
//! ```text
//!   cli.rs     clap definitions, admin-socket client, tables      (used by main.rs)
//!   config.rs  strict TOML config, validated once
//!   daemon.rs  node lifecycle: stores, ports, membership, keepalive, SIGTERM
//!   admin.rs   the admin socket (JSON lines), bounded
//!   stats.rs   host figures with a deadline
//!   heartbeat/ the active-active heartbeat: pulses, views, criss-cross, verdicts, MNFA
//!   primary/   primary duties: lease gate, floating addresses, hooks, hand-over
//!   service.rs systemd readiness, status, stopping and watchdog
//!   metrics.rs Prometheus text endpoint
//!   flush.rs   node flush / ready, carried out by the node itself
//!   reconcile.rs converges the hypervisor to the VMs of record, reports back
//!   hypervisor/ the libvirt seam (virt crate; in-memory twin for the simulation)
//!   boundary.rs third-party calls: blocking thread, deadline, panic turned into an error
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
pub mod service;
pub mod stats;
