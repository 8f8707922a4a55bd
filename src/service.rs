//! systemd integration: readiness, status lines, stopping, and the watchdog.
//!
//! `READY=1` goes out once the node has recovered its local state and its heartbeat responder
//! and admin socket are up — not when quorum is reached, or a cold start of the whole cluster
//! would be killed by `TimeoutStartSec`. `WATCHDOG=1` goes out only while the daemon's main
//! loops (keepalive, heartbeat pulses, or the wait for membership) make progress, so a daemon
//! whose loops are stuck is restarted by systemd (`WatchdogSec=` in the unit). Outside systemd
//! (no `NOTIFY_SOCKET`) every call is a no-op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::time::Instant;

fn send(states: &[NotifyState<'_>]) {
    // One datagram to systemd's socket: it does not block in practice.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// When the daemon's main loops last made progress.
pub struct Progress {
    started: Instant,
    last_ms: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress { started: Instant::now(), last_ms: AtomicU64::new(0) })
    }

    fn now_ms(&self) -> u64 {
        herd_raft::clock::ms_since(self.started)
    }

    /// A main loop went round once.
    pub fn mark(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Feeds systemd's watchdog at half its interval while the loops make progress (a no-op when
/// the unit has no `WatchdogSec=`).
pub async fn watchdog(progress: Arc<Progress>, mut shutdown: watch::Receiver<bool>) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let limit = Duration::from_micros(usec);
    let mut ticker = tokio::time::interval(limit / 2);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        let age = progress.age();
        if age < limit {
            send(&[NotifyState::Watchdog]);
        } else {
            tracing::error!("main loops made no progress for {age:?}: not feeding the watchdog");
        }
    }
}
