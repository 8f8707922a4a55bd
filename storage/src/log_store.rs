//! The daemon's log store: sled in production, memory in the simulation.
//!
//! One concrete type so the daemon, the primary and the fence manager are not generic over the
//! store; each call is a `match` that forwards to the store inside.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;

use crate::mem_store::MemLogStore;
use crate::sled_store::SledLogStore;
use crate::types::{Entry, LogId, TypeConfig, Vote};

#[derive(Clone)]
pub enum LogStore {
    Sled(SledLogStore),
    Mem(MemLogStore),
}

impl From<SledLogStore> for LogStore {
    fn from(s: SledLogStore) -> Self {
        LogStore::Sled(s)
    }
}

impl From<MemLogStore> for LogStore {
    fn from(s: MemLogStore) -> Self {
        LogStore::Mem(s)
    }
}

/// Forwards one call to whichever store is inside.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            LogStore::Sled($s) => $call,
            LogStore::Mem($s) => $call,
        }
    };
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        each!(self, s => s.try_get_log_entries(range).await)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        each!(self, s => s.read_vote().await)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        each!(self, s => s.get_log_state().await)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        each!(self, s => LogStore::from(s.get_log_reader().await))
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        each!(self, s => s.save_vote(vote).await)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        each!(self, s => s.save_committed(committed).await)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        each!(self, s => s.read_committed().await)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        each!(self, s => s.append(entries, callback).await)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        each!(self, s => s.truncate_after(last_log_id).await)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        each!(self, s => s.purge(log_id).await)
    }
}
