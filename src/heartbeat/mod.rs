//! The active-active heartbeat (StarlingX hbsAgent/hbsClient, improved).
//!
//! ```text
//!  coordinator C ──Pulse{seq, C's summary}──▶ every node, every network, every interval
//!  node H        ──Answer{seq, one *other* coordinator's summary}──▶ C      (the criss-cross)
//!
//!  view.rs     C's own view: per (host, network) misses/state, the history ring, isolation, MNFA
//!  verdict.rs  pure verdict over every fresh view: alive / lost (+ lost_for_ms, reason)
//!  relay.rs    every node's cache of coordinator summaries, rotated into answers
//!  wire.rs     versioned, size-bounded datagrams
//!  socket.rs   the datagram seam and the production UDP socket
//!  agent.rs    the IO: receive loops, the pulse loop, queries
//! ```
//!
//! **Architecture invariants:** `view`, `verdict`, `relay` and `wire` do no IO and read no
//! clock: time is a `now_ms` argument (monotonic ms since the agent started; peer ages are
//! relative, so no two clocks are ever compared). Only `agent` touches sockets.

pub mod agent;
pub mod relay;
pub mod socket;
pub mod verdict;
pub mod view;
pub mod wire;

use serde::{Deserialize, Serialize};

/// A heartbeat network's name (`mgmt`, `storage`, ...).
pub type NetName = String;

/// The timing and thresholds of the heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub interval_ms: u64,
    /// Consecutive misses before a link is `degraded`.
    pub degraded_after: u32,
    /// Consecutive misses before a link is `lost`.
    pub lost_after: u32,
    /// Length of the history window; also how long a peer view stays fresh.
    pub history_ms: u64,
    /// MNFA threshold in hosts; the effective one is max(this, a third of the hosts).
    pub mnfa_threshold: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params { interval_ms: 100, degraded_after: 6, lost_after: 10, history_ms: 5000, mnfa_threshold: 2 }
    }
}

impl Params {
    /// Periods kept in the history ring.
    pub fn history_periods(&self) -> usize {
        usize::try_from(self.history_ms.div_ceil(self.interval_ms.max(1))).unwrap_or(usize::MAX).clamp(1, 10_000)
    }

    /// The effective MNFA threshold for `hosts` hosts (coordinators included).
    pub fn mnfa_effective(&self, hosts: usize) -> usize {
        self.mnfa_threshold.max(hosts.div_ceil(3)).max(1)
    }
}

/// The state of one (host, network) link in one coordinator's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    Ok,
    Degraded,
    Lost,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Ok => "ok",
            LinkState::Degraded => "degraded",
            LinkState::Lost => "lost",
        }
    }
}
