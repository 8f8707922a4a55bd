//! Log flushes off the Raft core's path.
//!
//! openraft awaits `RaftLogStorage::append` inside its core task: while an append waits for
//! the disk, that node sends no heartbeat and answers none. A flush that waits behind other
//! writers on a busy host (hundreds of milliseconds, seen with two synchronous writers beside
//! herd) was enough for a leader's lease to lapse with no process paused. So `append` returns
//! as soon as the entries are readable and hands its report here: one task flushes and reports
//! in the order the jobs came, and every job that arrived during a flush rides on the next one
//! (group commit). Operations that must be durable when they return (the vote, a truncation, a
//! purge point) wait for a barrier behind every append before them, so the reports keep the
//! order in which openraft submitted the IO.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use openraft::storage::IOFlushed;
use tokio::sync::{mpsc, oneshot};

use crate::types::TypeConfig;

/// Jobs queued and not yet flushed, at most: an append beyond them waits for room.
const QUEUE: usize = 1024;
/// Jobs one flush may report, at most.
const BATCH: usize = 256;
/// A flush longer than this is slow: a third of the default leader lease (300 ms). openraft's
/// followers answer even a heartbeat only once their log is flushed, so flushes this slow on a
/// quorum of nodes cost the leader its lease (seen: 540–640 ms with two synchronous writers on
/// the same disk).
const SLOW: Duration = Duration::from_millis(100);
/// Slow flushes are said at WARN at most this often (with how many and the longest).
const SAY_EVERY: Duration = Duration::from_secs(10);

/// A flush of the whole store (each job brings one; a batch runs only its last).
pub type Flush = BoxFuture<'static, io::Result<()>>;

/// Whom to tell when a job's flush is done.
enum Done {
    /// An append's report to openraft.
    Appended(IOFlushed<TypeConfig>),
    /// Someone waiting for everything before it to be on disk.
    Barrier(oneshot::Sender<io::Result<()>>),
}

struct Job {
    flush: Flush,
    done: Done,
}

/// The queue to the flushing task (started at the first job, inside the runtime). Clones
/// share it; the task ends when the last clone is gone and the queue is empty, and holds
/// nothing of the store meanwhile (each job carries its own flush).
#[derive(Clone, Default)]
pub struct Flusher {
    tx: Arc<OnceLock<mpsc::Sender<Job>>>,
}

impl Flusher {
    fn queue(&self) -> &mpsc::Sender<Job> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            crate::types::spawn(run(rx));
            tx
        })
    }

    /// Reports `callback` to openraft once `flush` (or a later one) is done.
    pub async fn appended(&self, flush: Flush, callback: IOFlushed<TypeConfig>) -> io::Result<()> {
        self.queue()
            .send(Job { flush, done: Done::Appended(callback) })
            .await
            .map_err(|_| io::Error::other("the log flusher stopped"))
    }

    /// Returns once everything queued before, and whatever `flush` covers, is on disk.
    pub async fn barrier(&self, flush: Flush) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.queue()
            .send(Job { flush, done: Done::Barrier(tx) })
            .await
            .map_err(|_| io::Error::other("the log flusher stopped"))?;
        rx.await.map_err(|_| io::Error::other("the log flusher stopped"))?
    }
}

fn copy(r: &io::Result<()>) -> io::Result<()> {
    r.as_ref().map(|_| ()).map_err(|e| io::Error::new(e.kind(), e.to_string()))
}

/// The flushing task: takes every job queued, runs the newest job's flush (a flush writes
/// everything inserted before it started, so it covers the older jobs too), reports them all
/// in order, and again.
// The clock times flushes for a log line only; the simulation's stores have no flusher.
#[allow(clippy::disallowed_methods)]
async fn run(mut rx: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(BATCH);
    let mut slow = Slow::default();
    while rx.recv_many(&mut jobs, BATCH).await > 0 {
        let Some(last) = jobs.last_mut() else { continue };
        let flush = std::mem::replace(&mut last.flush, Box::pin(async { Ok(()) }));
        let began = Instant::now();
        let result = flush.await;
        slow.note(began.elapsed());
        for job in jobs.drain(..) {
            match job.done {
                Done::Appended(callback) => callback.io_completed(copy(&result)),
                Done::Barrier(tx) => {
                    let _ = tx.send(copy(&result));
                }
            }
        }
    }
}

/// Slow flushes since the last time they were said.
#[derive(Default)]
struct Slow {
    count: u32,
    longest: Duration,
    said: Option<Instant>,
}

impl Slow {
    #[allow(clippy::disallowed_methods)] // as in `run`: for a log line only
    fn note(&mut self, took: Duration) {
        if took <= SLOW {
            return;
        }
        self.count += 1;
        self.longest = self.longest.max(took);
        if self.said.is_some_and(|at| at.elapsed() < SAY_EVERY) {
            return;
        }
        tracing::warn!(
            count = self.count,
            longest_ms = self.longest.as_millis(),
            "slow Raft log flushes (the disk is busy with other writers?): over ~270 ms on a quorum of \
             nodes the leader loses its lease; put data_dir on a quieter disk or raise [raft] \
             election_timeout_ms"
        );
        *self = Slow { said: Some(Instant::now()), ..Slow::default() };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openraft::type_config::TypeConfigExt;

    use super::*;

    /// A report openraft would receive, and where it arrives.
    fn report() -> (IOFlushed<TypeConfig>, openraft::type_config::alias::OneshotReceiverOf<TypeConfig, io::Result<()>>)
    {
        let (tx, rx) = TypeConfig::oneshot();
        (IOFlushed::signal(tx), rx)
    }

    fn counting(n: &Arc<AtomicUsize>) -> Flush {
        let n = n.clone();
        Box::pin(async move {
            n.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    #[tokio::test]
    async fn appends_return_before_a_slow_flush_and_are_reported_in_order_after_it() {
        let f = Flusher::default();
        let flushes = Arc::new(AtomicUsize::new(0));
        // The first flush waits for the gate: a disk busy with other writers.
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let n = flushes.clone();
        let slow: Flush = Box::pin(async move {
            let _ = started_tx.send(());
            let _ = gate_rx.await;
            n.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let (cb, mut first) = report();
        f.appended(slow, cb).await.expect("queued");
        started_rx.await.expect("the flush started");
        // Three more while it runs, then a barrier: they return at once too.
        let mut later = Vec::new();
        for _ in 0..3 {
            let (cb, rx) = report();
            f.appended(counting(&flushes), cb).await.expect("queued");
            later.push(rx);
        }
        let barrier = tokio::spawn({
            let f = f.clone();
            let flush = counting(&flushes);
            async move { f.barrier(flush).await }
        });
        tokio::task::yield_now().await;
        assert!(first.try_recv().is_err(), "reported before its flush was done");
        assert!(!barrier.is_finished(), "a barrier passed an append not yet on disk");
        gate_tx.send(()).expect("gate");
        first.await.expect("reported").expect("flushed");
        for rx in later {
            rx.await.expect("reported").expect("flushed");
        }
        barrier.await.expect("barrier task").expect("barrier flushed");
        assert_eq!(flushes.load(Ordering::SeqCst), 2, "what queued during the slow flush rode on one flush");
    }

    #[tokio::test]
    async fn a_failed_flush_is_reported_to_every_job_it_covered() {
        let f = Flusher::default();
        let failing: Flush = Box::pin(async { Err(io::Error::other("disk gone")) });
        let (cb, rx) = report();
        f.appended(failing, cb).await.expect("queued");
        let e = rx.await.expect("reported").expect_err("the flush failed");
        assert!(e.to_string().contains("disk gone"), "{e}");
        let failing: Flush = Box::pin(async { Err(io::Error::other("still gone")) });
        assert!(f.barrier(failing).await.is_err());
    }
}
