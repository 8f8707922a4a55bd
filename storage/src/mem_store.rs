//! In-memory log store and state-machine backend, for the deterministic simulation.
//!
//! Behaviour matches the sled store (both pass openraft's storage suite). A handle is `Clone`
//! and shares its data, so a simulation can keep the "disk" outside a crashed node and give it
//! to the restarted one. The state-machine backend is volatile like a cache: after a restart
//! openraft rebuilds the applied state from the kept snapshot and the committed log.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;

use crate::sm::{Backend, StoredSnapshot};
use crate::types::{Entry, LogId, TypeConfig, Vote};

#[derive(Clone, Default)]
struct MemLog {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    log: BTreeMap<u64, Entry>,
}

/// What a [`MemLogStore`] held at one moment.
#[derive(Clone)]
pub struct MemLogCopy(MemLog);

/// The Raft log, vote and committed index, in memory.
#[derive(Clone, Default)]
pub struct MemLogStore {
    inner: Arc<Mutex<MemLog>>,
    /// While set, every write fails as a full disk would (the simulation's storage fault).
    failing: Arc<AtomicBool>,
}

impl MemLogStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every write fail (or succeed again), shared by every handle.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// A copy of what the store holds now, as a backup of the disk taken at this moment would
    /// (the simulation's "restore from an earlier copy" fault).
    pub fn copy(&self) -> MemLogCopy {
        MemLogCopy(self.lock().clone())
    }

    /// Puts `copy` back in place of what the store holds, for every handle (only while no
    /// daemon runs on it, as an operator restoring a backup would).
    pub fn restore(&self, copy: &MemLogCopy) {
        *self.lock() = copy.0.clone();
    }

    /// Whether writes fail now.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    fn writable(&self) -> Result<(), io::Error> {
        if self.failing() {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "No space left on device (simulated)"));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, MemLog> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self.lock().log.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for MemLogStore {
    type LogReader = MemLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let g = self.lock();
        // A purge may reach past the last entry (after a snapshot install): the purge point then
        // is the last log id.
        let last = g.log.values().next_back().map(|e| e.log_id).max(g.last_purged);
        Ok(LogState { last_purged_log_id: g.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.writable()?;
        self.lock().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.writable()?;
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        self.writable()?;
        {
            let mut g = self.lock();
            for e in entries {
                g.log.insert(e.log_id.index, e);
            }
        }
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.writable()?;
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.lock().log.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.writable()?;
        let mut g = self.lock();
        let keep = g.log.split_off(&(log_id.index + 1));
        g.log = keep;
        g.last_purged = Some(log_id);
        Ok(())
    }
}

/// A state-machine backend in memory: the latest snapshot (the simulation keeps one per
/// machine across its daemon's restarts, as a disk would).
#[derive(Clone, Default)]
pub struct MemBackend {
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
}

impl MemBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The snapshot it holds now (see [`MemLogStore::copy`]).
    pub fn copy(&self) -> Option<StoredSnapshot> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts a copied snapshot back (see [`MemLogStore::restore`]).
    pub fn restore(&self, copy: Option<StoredSnapshot>) {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = copy;
    }
}

impl Backend for MemBackend {
    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> io::Result<()> {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot.clone());
        Ok(())
    }

    fn load_snapshot(&self) -> io::Result<Option<StoredSnapshot>> {
        Ok(self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn flush(&self) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
