//! The one wall-clock read in the consensus layer: the leader's time stamp on each request.
//! `apply` never reads a clock; it takes this stamp from the log entry.
//!
//! The simulation replaces the clock of its thread (every simulated host runs on that one
//! thread) with simulated time, so a seed replays with the same stamps.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

thread_local! {
    static SOURCE: Cell<Option<fn() -> u64>> = const { Cell::new(None) };
}

/// Milliseconds since the Unix epoch on this node's clock (0 if the clock is before 1970).
pub fn wall_ms() -> u64 {
    if let Some(f) = SOURCE.with(Cell::get) {
        return f();
    }
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Makes `wall_ms` on this thread return `f()` (the simulation's clock); `None` restores the
/// system clock.
pub fn set_thread_source(f: Option<fn() -> u64>) {
    SOURCE.with(|s| s.set(f));
}

/// A duration in whole milliseconds (saturating at `u64::MAX`).
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since `t` on the monotonic clock (tokio's: simulated time in the simulation).
pub fn ms_since(t: tokio::time::Instant) -> u64 {
    ms(t.elapsed())
}
