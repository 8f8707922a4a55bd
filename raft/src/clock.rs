//! The one wall-clock read in the consensus layer: the leader's time stamp on each request.
//! `apply` never reads a clock; it takes this stamp from the log entry.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch on this node's clock (0 if the clock is before 1970).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
