//! Task ownership: every task the daemon spawns belongs to a [`Tasks`] set that stops it.
//! A task nobody owns outlives the thing it worked for (a fence executor after the duties
//! dropped, a reconcile loop after the daemon stopped); here each is aborted with its owner.

use std::future::Future;
use std::sync::Mutex;

use tokio::task::JoinHandle;

/// A set of spawned tasks, aborted together by [`Tasks::abort_all`] or when dropped.
#[derive(Default)]
pub struct Tasks {
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns `task` (through the seeded runtime under the simulation) and keeps its handle;
    /// finished tasks are forgotten as new ones come, so the set stays as small as what runs.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = herd_storage::types::spawn(task);
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles.retain(|h| !h.is_finished());
        handles.push(handle);
    }

    /// How many tasks still run.
    pub fn running(&self) -> usize {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles.iter().filter(|h| !h.is_finished()).count()
    }

    /// A guard that aborts every task of the set when it is dropped (however the owner's
    /// future ends: returned, or itself aborted).
    pub fn abort_on_drop(&self) -> AbortOnDrop<'_> {
        AbortOnDrop(self)
    }

    /// Aborts every task of the set.
    pub fn abort_all(&self) {
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            h.abort();
        }
    }
}

/// See [`Tasks::abort_on_drop`].
pub struct AbortOnDrop<'a>(&'a Tasks);

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        self.0.abort_all();
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abort_all_stops_every_task() {
        let tasks = Tasks::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        for _ in 0..3 {
            let tx = tx.clone();
            tasks.spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await;
            });
        }
        drop(tx);
        assert_eq!(tasks.running(), 3);
        tasks.abort_all();
        // Every sender is dropped once its task is aborted: the channel closes.
        assert!(rx.recv().await.is_none());
        assert_eq!(tasks.running(), 0);
    }
}
