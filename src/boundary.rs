//! The panic boundary for third-party calls.
//!
//! `virt` (and later `ipmi-rs`) can panic on an IO error (`Connect`'s drop panics when
//! virConnectClose fails; ipmi-rs unwraps a socket send). Their calls run here: on a blocking
//! thread (they block), with a deadline, and a panic there is that call's failure. Everywhere
//! else a panic aborts the daemon (the hook in `main.rs` consults [`inside`]).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

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
}

/// Runs `f` on a blocking thread with a deadline, turning a panic into an error. (A call past
/// its deadline keeps its thread until it returns: blocking calls cannot be cancelled.)
pub async fn run<T, F>(what: &'static str, deadline: Duration, f: F) -> Result<T, BoundaryError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let task = tokio::task::spawn_blocking(move || {
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
        assert_eq!(run("ok", Duration::from_secs(5), || 7).await, Ok(7));
        let p = run("boom", Duration::from_secs(5), || -> u8 { panic!("socket send failed") }).await;
        assert_eq!(p, Err(BoundaryError::Panicked("boom", "socket send failed".into())));
        let t = run("slow", Duration::from_millis(50), || std::thread::sleep(Duration::from_millis(500))).await;
        assert_eq!(t, Err(BoundaryError::Timeout("slow", Duration::from_millis(50))));
        assert!(!inside());
    }
}
