//! Persistence on sled 0.34.7: the Raft log store, the state-machine snapshots and the node's
//! local identity, all in one `sled::Db` per process.
//!
//! Trees and keys (every value rmp-serde with field names, so fields can be added):
//!
//! | tree       | keys                                                        |
//! |------------|-------------------------------------------------------------|
//! | `local`    | `format` (u32), `identity` ([`Identity`])                   |
//! | `raft_log` | log index, big-endian u64 → `Entry`                         |
//! | `raft_meta`| `vote`, `committed`, `last_purged`                           |
//! | `sm_meta`  | `snapshot` (the latest [`StoredSnapshot`])                   |
//!
//! Durability: `append` and `save_vote` flush before they report; `purge` records
//! `last_purged` before deleting (never a hole); a snapshot is flushed before `build_snapshot`
//! returns. The applied state is not written per apply: a restarted node opens at its latest
//! snapshot and openraft re-applies the committed entries after it (see `sm.rs`).
//!
//! sled seals and writes its IO buffer around every batch and transaction (a `pwrite` and a
//! `sync_file_range` each), so single writes use plain inserts: a lone log entry is one insert.
//!
//! Format 1 (before 2026-11) also kept every object of the state in `sm_data` with its applied
//! position in `sm_meta`, written per apply; opening such a store turns that state into the
//! snapshot (when newer than the stored one) and drops `sm_data`.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::{Identity, IdentityStore};
use crate::model::State;
use crate::sm::{Backend, StoredSnapshot};
use crate::types::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig, Vote};

/// The on-disk format this build reads and writes. Bump it with a migration.
pub const FORMAT_VERSION: u32 = 2;
/// sled's page cache bound (bytes).
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the database in {path}: {source}")]
    Sled { path: String, source: sled::Error },
    #[error("the database in {path} has format {found}; this herd reads format {FORMAT_VERSION}")]
    Format { path: String, found: u32 },
    #[error("the database in {path} is unreadable: {source}")]
    Io { path: String, source: io::Error },
}

fn sled_err(e: sled::Error) -> io::Error {
    io::Error::other(e)
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    rmp_serde::to_vec_named(v).map_err(io::Error::other)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> io::Result<Option<T>> {
    tree.get(key).map_err(sled_err)?.map(|v| decode(&v)).transpose()
}

/// Everything a node keeps on disk.
pub struct SledStores {
    pub log: SledLogStore,
    pub sm: SledBackend,
    pub local: LocalStore,
}

/// Opens (or creates) the node's database under `dir` and checks its format.
pub fn open(dir: &Path) -> Result<SledStores, OpenError> {
    let path = dir.display().to_string();
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_CAPACITY)
        .mode(sled::Mode::LowSpace)
        .open()
        .map_err(|source| OpenError::Sled { path: path.clone(), source })?;
    let sled_open = |source| OpenError::Sled { path: path.clone(), source };
    let tree = |name: &str| db.open_tree(name).map_err(sled_open);
    let local = LocalStore { db: db.clone(), tree: tree("local")? };
    let io_err = |source| OpenError::Io { path: path.clone(), source };
    let sm_meta = tree("sm_meta")?;
    match get::<u32>(&local.tree, b"format").map_err(io_err)? {
        Some(FORMAT_VERSION) => {}
        Some(1) => {
            migrate_from_1(&db, &sm_meta).map_err(io_err)?;
            local.tree.insert(b"format", encode(&FORMAT_VERSION).map_err(io_err)?).map_err(sled_open)?;
            db.flush().map_err(sled_open)?;
            db.drop_tree("sm_data").map_err(sled_open)?;
            tracing::info!(%path, "store migrated from format 1 to {FORMAT_VERSION}: the applied state is now a snapshot");
        }
        Some(found) => return Err(OpenError::Format { path, found }),
        None => {
            local.tree.insert(b"format", encode(&FORMAT_VERSION).map_err(io_err)?).map_err(sled_open)?;
        }
    }
    Ok(SledStores {
        log: SledLogStore {
            db: db.clone(),
            log: tree("raft_log")?,
            meta: tree("raft_meta")?,
            deleting: Arc::default(),
            slow: Arc::default(),
        },
        sm: SledBackend { db: db.clone(), meta: sm_meta },
        local,
    })
}

/// Format 1 → 2: the state kept object by object in `sm_data` (with `last_applied` and
/// `membership` in `sm_meta`) becomes the snapshot, unless the stored snapshot is as new.
fn migrate_from_1(db: &sled::Db, sm_meta: &sled::Tree) -> io::Result<()> {
    let data = db.open_tree("sm_data").map_err(sled_err)?;
    let mut state = State::default();
    for item in data.iter() {
        let (k, v) = item.map_err(sled_err)?;
        match &*k {
            b"meta" => state.meta = Some(decode(&v)?),
            b"clock" => state.clock_ms = decode(&v)?,
            b"events" => state.events = decode(&v)?,
            k if k.starts_with(b"node/") => {
                let rec: crate::model::NodeRecord = decode(&v)?;
                state.nodes.insert(rec.name.clone(), rec);
            }
            k if k.starts_with(b"vm/") => {
                let vm: crate::model::VmRecord = decode(&v)?;
                state.vms.insert(vm.spec.name.clone(), vm);
            }
            k if k.starts_with(b"req/") => {
                let id = String::from_utf8_lossy(&k[4..]).into_owned();
                state.requests.insert(id, decode(&v)?);
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown state-machine key {:?}", String::from_utf8_lossy(other)),
                ))
            }
        }
    }
    let last_applied: Option<LogId> = get::<Option<LogId>>(sm_meta, b"last_applied")?.flatten();
    let membership: StoredMembership = get(sm_meta, b"membership")?.unwrap_or_default();
    let stored: Option<StoredSnapshot> = get(sm_meta, b"snapshot")?;
    if last_applied.is_some() && stored.as_ref().is_none_or(|s| s.meta.last_log_id < last_applied) {
        let snapshot = StoredSnapshot {
            meta: SnapshotMeta { last_log_id: last_applied, last_membership: membership },
            data: encode(&state)?,
        };
        sm_meta.insert(b"snapshot", encode(&snapshot)?).map_err(sled_err)?;
    }
    sm_meta.remove(b"last_applied").map_err(sled_err)?;
    sm_meta.remove(b"membership").map_err(sled_err)?;
    Ok(())
}

/// The node's own identity (not replicated).
#[derive(Clone)]
pub struct LocalStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl IdentityStore for LocalStore {
    fn load(&self) -> io::Result<Option<Identity>> {
        get(&self.tree, b"identity")
    }

    fn save(&self, id: &Identity) -> BoxFuture<'_, io::Result<()>> {
        let bytes = encode(id);
        Box::pin(async move {
            self.tree.insert(b"identity", bytes?).map_err(sled_err)?;
            self.db.flush_async().await.map_err(sled_err)?;
            Ok(())
        })
    }
}

/// The Raft log, vote and committed index on sled.
#[derive(Clone)]
pub struct SledLogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// The deletion of purged entries, while one runs.
    deleting: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Slow flushes of appends, said at WARN now and then.
    slow: Arc<std::sync::Mutex<SlowFlushes>>,
}

/// A flush of an append longer than this is slow: a third of the default leader lease (300 ms).
/// openraft's followers answer even a heartbeat only once their log is flushed, so flushes this
/// slow on a quorum of nodes cost the leader its lease (seen: 540–640 ms with two synchronous
/// writers on the same disk).
const SLOW_FLUSH: Duration = Duration::from_millis(100);
/// Slow flushes are said at WARN at most this often (with how many, and the longest).
const SAY_SLOW_EVERY: Duration = Duration::from_secs(10);

/// Slow flushes since they were last said.
#[derive(Default)]
struct SlowFlushes {
    count: u32,
    longest: Duration,
    said: Option<Instant>,
}

impl SlowFlushes {
    // The clock times a flush for a log line only: the simulation's stores are in memory.
    #[allow(clippy::disallowed_methods)]
    fn note(&mut self, took: Duration) {
        if took <= SLOW_FLUSH {
            return;
        }
        self.count += 1;
        self.longest = self.longest.max(took);
        if self.said.is_some_and(|at| at.elapsed() < SAY_SLOW_EVERY) {
            return;
        }
        tracing::warn!(
            count = self.count,
            longest_ms = self.longest.as_millis(),
            "slow Raft log flushes (a disk busy with other writers?): over ~270 ms on a quorum of nodes \
             the leader loses its lease; put data_dir on a quieter disk or raise [raft] election_timeout_ms"
        );
        *self = SlowFlushes { said: Some(Instant::now()), ..SlowFlushes::default() };
    }
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn map_bound(b: Bound<&u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl SledLogStore {
    async fn flush(&self) -> io::Result<()> {
        self.db.flush_async().await.map_err(sled_err)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let r = (map_bound(range.start_bound()), map_bound(range.end_bound()));
        let mut out = Vec::new();
        for item in self.log.range(r) {
            let (_, v) = item.map_err(sled_err)?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        get(&self.meta, b"vote")
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = SledLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = get(&self.meta, b"last_purged")?;
        let last_entry = match self.log.last().map_err(sled_err)? {
            Some((_, v)) => Some(decode::<Entry>(&v)?.log_id),
            None => None,
        };
        // A purge may reach past the last entry (a follower purging up to an installed snapshot;
        // a crash between recording the purge point and deleting leaves entries below it).
        let last = last_entry.max(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.meta.insert(b"vote", encode(vote)?).map_err(sled_err)?;
        self.flush().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.meta.insert(b"committed", encode(&committed)?).map_err(sled_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(get::<Option<LogId>>(&self.meta, b"committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<(u64, Vec<u8>)> =
            entries.into_iter().map(|e| Ok((e.log_id.index, encode(&e)?))).collect::<io::Result<_>>()?;
        // A lone entry is one insert (atomic by itself); a batch costs sled two buffer writes.
        match <[_; 1]>::try_from(entries) {
            Ok([(i, v)]) => {
                self.log.insert(index_key(i), v).map_err(sled_err)?;
            }
            Err(entries) => {
                let mut batch = sled::Batch::default();
                for (i, v) in entries {
                    batch.insert(&index_key(i), v);
                }
                self.log.apply_batch(batch).map_err(sled_err)?;
            }
        }
        // Inline on purpose: overlapping the flush with replication cost throughput in every
        // variant measured (docs/benchmarks.md), and a follower's answers wait for it anyway.
        #[allow(clippy::disallowed_methods)] // timed for the slow-flush log line only
        let began = Instant::now();
        let result = self.flush().await;
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).note(began.elapsed());
        let report = result.as_ref().map(|_| ()).map_err(|e| io::Error::new(e.kind(), e.to_string()));
        callback.io_completed(report);
        result
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        // Delete from the end backwards, so a crash midway leaves no hole.
        let keys: Vec<_> = self.log.range(index_key(from)..).keys().collect::<Result<_, _>>().map_err(sled_err)?;
        for k in keys.iter().rev() {
            self.log.remove(k).map_err(sled_err)?;
        }
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first (durably); from then on nothing below it is read, so the
        // entries are deleted off the Raft core's path: thousands of sled removals would hold
        // it up for tens of milliseconds (the p99 of every write in flight). At most one
        // deletion runs; one skipped is covered by the next, which deletes everything below
        // its own point. Deleted from the front: never a hole.
        self.meta.insert(b"last_purged", encode(&log_id)?).map_err(sled_err)?;
        self.flush().await?;
        let mut deleting = self.deleting.lock().unwrap_or_else(|p| p.into_inner());
        if deleting.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        let log = self.log.clone();
        *deleting = Some(tokio::task::spawn_blocking(move || {
            let deleted = (|| -> sled::Result<()> {
                for k in log.range(..=index_key(log_id.index)).keys() {
                    log.remove(k?)?;
                }
                Ok(())
            })();
            if let Err(e) = deleted {
                tracing::warn!(index = log_id.index, "deleting purged log entries: {e} (the next purge retries)");
            }
        }));
        Ok(())
    }
}

impl SledLogStore {
    /// Waits for the deletion of purged entries, if one runs (it holds the database open).
    pub async fn settle(&self) {
        let handle = self.deleting.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

/// The state-machine backend on sled: the latest snapshot.
pub struct SledBackend {
    db: sled::Db,
    meta: sled::Tree,
}

impl Backend for SledBackend {
    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> io::Result<()> {
        self.meta.insert(b"snapshot", encode(snapshot)?).map_err(sled_err)?;
        Ok(())
    }

    fn load_snapshot(&self) -> io::Result<Option<StoredSnapshot>> {
        get(&self.meta, b"snapshot")
    }

    fn flush(&self) -> BoxFuture<'static, io::Result<()>> {
        let db = self.db.clone();
        Box::pin(async move {
            db.flush_async().await.map_err(sled_err)?;
            Ok(())
        })
    }
}
