//! herd under turmoil: N real daemons (Raft, model, heartbeat, primary gate, fencing decision,
//! reconciler) in one process, on simulated time and a simulated network, with an in-memory
//! store, an in-memory hypervisor and a simulated BMC per node. Only the IO seams differ from
//! production (`herd::daemon::Env`).
//!
//! ```text
//!   world.rs       what outlives a crash: each node's "disk", hypervisor and BMC; the trace;
//!                  the ground truth the invariants read (who heard whom, when)
//!   net.rs         turmoil TCP behind herd's Connector/Listener; UDP behind DatagramSocket,
//!                  with per-network cuts and loss, recording deliveries
//!   bmc.rs         the simulated BMC behind herd's Fencer/FenceAgent (off = host powered off)
//!   host.rs        one node: its config, its Env, `herd::daemon::start`, its admin inbox
//!   faults.rs      the seeded fault schedule and how each fault is applied
//!   client.rs      the operator: sets the cluster up, random VM commands, register history
//!   follower.rs    a follower outside Raft (issue 22): a Session on a host of its own
//!   invariants/    one module per safety/liveness property, checked every step
//!   linearizable.rs  a small WGL checker for the VM register histories
//!   run.rs         one seed from start to verdict: the driver loop and the trace hash
//! ```
//!
//! Determinism: openraft's `DeterministicRng` (task-local seed per host), turmoil's seeded
//! network and tokio RNG (`--cfg tokio_unstable`), herd's wall clock and random ids replaced
//! on the simulation thread. Each seed runs in a fresh process (`run_one_seed`), so nothing
//! thread-local carries over from another seed.

pub mod bmc;
pub mod client;
pub mod faults;
pub mod follower;
pub mod host;
pub mod invariants;
pub mod linearizable;
pub mod links;
pub mod net;
pub mod run;
pub mod watchdog;
pub mod world;
