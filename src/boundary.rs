//! The panic boundary for third-party calls.
//!
//! `virt` (and later `ipmi-rs`) can panic on an IO error (`Connect`'s drop panics when
//! virConnectClose fails; ipmi-rs unwraps a socket send). Their calls run here: on a blocking
//! thread (they block), with a deadline, and a panic there is that call's failure. Everywhere
//! else a panic aborts the daemon (the hook in `main.rs` consults [`inside`]).
//!
//! A call past its deadline keeps its thread until the library returns (a blocking call cannot
//! be cancelled), so each library has a bound on the threads its calls hold: a call that finds
//! its library's slots all taken fails at once and says so, instead of piling up threads
//! behind a hung libvirtd or a silent BMC.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;

/// A library whose calls run behind the boundary, each with its own bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// libvirt (`virt`): the reconciler's calls, flushes' migrations, stats.
    Libvirt,
    /// ipmi-rs: fences and BMC readiness checks.
    Ipmi,
    /// The self-fence watchdog device.
    Watchdog,
}

impl Library {
    /// At most this many calls of the library hold a thread at once.
    pub const fn max_calls(self) -> usize {
        match self {
            // parallel_migrations (≤ 64) moves plus the reconcile round and stats.
            Library::Libvirt => 96,
            // max_parallel (≤ 64) fences plus readiness checks.
            Library::Ipmi => 96,
            Library::Watchdog => 2,
        }
    }

    fn slots(self) -> &'static Arc<Semaphore> {
        static LIBVIRT: OnceLock<Arc<Semaphore>> = OnceLock::new();
        static IPMI: OnceLock<Arc<Semaphore>> = OnceLock::new();
        static WATCHDOG: OnceLock<Arc<Semaphore>> = OnceLock::new();
        let cell = match self {
            Library::Libvirt => &LIBVIRT,
            Library::Ipmi => &IPMI,
            Library::Watchdog => &WATCHDOG,
        };
        cell.get_or_init(|| Arc::new(Semaphore::new(self.max_calls())))
    }
}

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is running a call behind the boundary.
pub fn inside() -> bool {
    INSIDE.with(Cell::get)
}

/// Why a bounded call failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BoundaryError {
    #[error("{0}: no result within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("{0}: the library panicked: {1}")]
    Panicked(&'static str, String),
    #[error("{0}: {1} calls of this library are still running (the most at once): refused")]
    Busy(&'static str, usize),
}

/// Runs `f`, a call of `library`, on a blocking thread with a deadline, turning a panic into
/// an error. The call holds one of the library's slots until it returns, past its deadline
/// too; with none free it is refused at once.
pub async fn run<T, F>(library: Library, what: &'static str, deadline: Duration, f: F) -> Result<T, BoundaryError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Ok(slot) = library.slots().clone().try_acquire_owned() else {
        return Err(BoundaryError::Busy(what, library.max_calls()));
    };
    let task = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        crate::sched::enter_blocking_call();
        INSIDE.with(|i| i.set(true));
        let r = catch_unwind(AssertUnwindSafe(f));
        INSIDE.with(|i| i.set(false));
        r.map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    match tokio::time::timeout(deadline, task).await {
        Err(_) => Err(BoundaryError::Timeout(what, deadline)),
        Ok(Err(join)) => Err(BoundaryError::Panicked(what, join.to_string())),
        Ok(Ok(Err(message))) => Err(BoundaryError::Panicked(what, message)),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_an_error_and_a_hang_a_timeout() {
        let lib = Library::Libvirt;
        assert_eq!(run(lib, "ok", Duration::from_secs(5), || 7).await, Ok(7));
        let p = run(lib, "boom", Duration::from_secs(5), || -> u8 { panic!("socket send failed") }).await;
        assert_eq!(p, Err(BoundaryError::Panicked("boom", "socket send failed".into())));
        let t = run(lib, "slow", Duration::from_millis(50), || std::thread::sleep(Duration::from_millis(500))).await;
        assert_eq!(t, Err(BoundaryError::Timeout("slow", Duration::from_millis(50))));
        assert!(!inside());
    }

    /// Hung calls hold their slots past their deadlines; once all are taken the next call is
    /// refused at once, and a slot comes back when its call returns.
    #[tokio::test]
    async fn a_library_with_every_slot_hung_refuses_at_once() {
        let lib = Library::Watchdog;
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        for _ in 0..lib.max_calls() {
            let rx = release_rx.clone();
            let hung = run(lib, "hung", Duration::from_millis(10), move || {
                let _ = rx.lock().map(|r| r.recv());
            });
            assert_eq!(hung.await, Err(BoundaryError::Timeout("hung", Duration::from_millis(10))));
        }
        assert_eq!(run(lib, "next", Duration::from_secs(5), || 1).await, Err(BoundaryError::Busy("next", 2)));
        for _ in 0..lib.max_calls() {
            release_tx.send(()).expect("a hung call waits");
        }
        // The slots return as the hung calls finish: wait for that, with a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match run(lib, "after", Duration::from_secs(5), || 2).await {
                Ok(v) => break assert_eq!(v, 2),
                Err(BoundaryError::Busy(..)) if tokio::time::Instant::now() < deadline => {
                    tokio::task::yield_now().await
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
