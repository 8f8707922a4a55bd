//! openraft's storage conformance suite on both stores, and a restart test for sled.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use herd_storage::mem_store::{MemBackend, MemLogStore};
use herd_storage::model::{Command, NewNode, Op, Request, Role};
use herd_storage::sled_store::{self, SledLogStore};
use herd_storage::sm::{SmState, StateMachine};
use herd_storage::types::{Entry, LogId, TypeConfig};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{BasicNode, EntryPayload, Membership, RaftLogReader, StorageError};

fn read_err(e: &io::Error) -> StorageError<TypeConfig> {
    StorageError::read(openraft::errors::ErrorSource::from_error(e))
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, MemLogStore, StateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), MemLogStore, StateMachine), StorageError<TypeConfig>> {
        let sm = StateMachine::open(std::sync::Arc::new(MemBackend::new())).map_err(|e| read_err(&e))?;
        Ok(((), MemLogStore::new(), sm))
    }
}

struct SledBuilder;

impl StoreBuilder<TypeConfig, SledLogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, SledLogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().map_err(|e| read_err(&e))?;
        let stores = sled_store::open(dir.path()).map_err(|e| read_err(&io::Error::other(e)))?;
        let sm = StateMachine::open(std::sync::Arc::new(stores.sm)).map_err(|e| read_err(&e))?;
        Ok((dir, stores.log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_store_passes_openraft_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(MemBuilder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_passes_openraft_suite() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(SledBuilder).await
}

fn log_id(term: u64, index: u64) -> LogId {
    openraft::testing::log_id::<TypeConfig>(term, 1, index)
}

fn entry(term: u64, index: u64, payload: EntryPayload<herd_storage::Request, u64, BasicNode>) -> Entry {
    Entry::new(log_id(term, index), payload)
}

fn node(name: &str) -> NewNode {
    NewNode { name: name.into(), role: Role::Coordinator, cluster_addr: format!("{name}:7400") }
}

fn req(id: &str, cmd: Command) -> EntryPayload<Request, u64, BasicNode> {
    EntryPayload::Normal(Request { id: id.into(), time_ms: 1_000, ops: vec![Op::from(cmd)] })
}

async fn append(log: &mut SledLogStore, entries: Vec<Entry>) -> io::Result<()> {
    use openraft::async_runtime::Oneshot;
    let (tx, rx) = <openraft::type_config::alias::OneshotOf<TypeConfig> as Oneshot>::channel();
    log.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.map_err(io::Error::other)?
}

/// Vote, log and snapshot survive a reopen (the log purged before the snapshot), and the
/// snapshot plus the log's remaining entries give back the state as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_state_vote_and_log_survive_reopen() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let members = Membership::new(vec![BTreeSet::from([1u64])], BTreeMap::from([(1u64, BasicNode::new("a:7400"))]))
        .map_err(io::Error::other)?;
    let vote = openraft::type_config::alias::VoteOf::<TypeConfig>::new(3, 1);
    let before: SmState;
    {
        let stores = sled_store::open(dir.path()).map_err(io::Error::other)?;
        let mut log = stores.log;
        let mut sm = StateMachine::open(std::sync::Arc::new(stores.sm))?;
        log.save_vote(&vote).await?;
        let entries = vec![
            entry(1, 1, EntryPayload::Membership(members.clone())),
            entry(
                1,
                2,
                req("r1", Command::InitCluster { cluster_id: "c1".into(), token_hash: "h".into(), node: node("a") }),
            ),
            entry(1, 3, req("r2", Command::RegisterNode { node: node("b"), token_hash: "h".into() })),
            entry(2, 4, req("r3", Command::SetMaintenance { on: true })),
            entry(2, 5, req("r4", Command::RegisterNode { node: node("c"), token_hash: "h".into() })),
        ];
        append(&mut log, entries.clone()).await?;
        log.save_committed(Some(log_id(2, 5))).await?;
        // Apply the first four, snapshot, purge them, then apply the fifth.
        let stream = futures::stream::iter(entries[..4].iter().cloned().map(|e| Ok((e, None))));
        sm.apply(stream).await?;
        let mut builder = sm.get_snapshot_builder().await;
        let snap = builder.build_snapshot().await?;
        assert_eq!(snap.meta.last_log_id, Some(log_id(2, 4)));
        log.purge(log_id(2, 4)).await?;
        log.settle().await;
        sm.apply(futures::stream::iter(vec![Ok((entries[4].clone(), None))])).await?;
        before = sm.view().read().clone();
        assert_eq!(before.state.nodes.len(), 3);
        assert!(before.state.meta.as_ref().is_some_and(|m| m.maintenance));
    }
    // Reopen: everything as it was.
    let stores = sled_store::open(dir.path()).map_err(io::Error::other)?;
    let mut log = stores.log;
    let mut sm = StateMachine::open(std::sync::Arc::new(stores.sm))?;
    assert_eq!(log.read_vote().await?, Some(vote));
    assert_eq!(log.read_committed().await?, Some(log_id(2, 5)));
    let state = log.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 4)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    let remaining = log.try_get_log_entries(0..100).await?;
    assert_eq!(remaining.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![5]);
    // The state machine opens at the snapshot; openraft re-applies what follows from the log.
    let (applied, membership) = sm.applied_state().await?;
    assert_eq!(applied, Some(log_id(2, 4)));
    assert_eq!(membership.membership(), &members);
    assert_eq!(sm.view().read().state.nodes.len(), 2);
    let snap = sm.get_current_snapshot().await?.ok_or_else(|| io::Error::other("snapshot lost"))?;
    assert_eq!(snap.meta.last_log_id, Some(log_id(2, 4)));
    sm.apply(futures::stream::iter(remaining.into_iter().map(|e| Ok((e, None))))).await?;
    assert_eq!(sm.applied_state().await?.0, Some(log_id(2, 5)));
    assert_eq!(sm.view().read().state, before.state);
    // A snapshot installed over it replaces the state exactly.
    let mut fresh_dir_sm = {
        let d2 = tempfile::tempdir()?;
        let s2 = sled_store::open(d2.path()).map_err(io::Error::other)?;
        (d2, StateMachine::open(std::sync::Arc::new(s2.sm))?)
    };
    fresh_dir_sm.1.install_snapshot(&snap.meta, snap.snapshot).await?;
    let installed = fresh_dir_sm.1.view().read().state.clone();
    assert_eq!(installed.nodes.len(), 2, "the snapshot holds the state as of index 4");
    Ok(())
}

/// A snapshot whose state breaks the model's invariants is refused like one that does not
/// decode; the state machine keeps what it had, and the sound snapshot installs.
#[tokio::test]
async fn a_snapshot_that_breaks_an_invariant_is_refused() -> io::Result<()> {
    let members = Membership::new(vec![BTreeSet::from([1u64])], BTreeMap::from([(1u64, BasicNode::new("a:7400"))]))
        .map_err(io::Error::other)?;
    let mut sm = StateMachine::open(std::sync::Arc::new(MemBackend::new()))?;
    let init = Command::InitCluster { cluster_id: "c1".into(), token_hash: "h".into(), node: node("a") };
    let entries = vec![entry(1, 1, EntryPayload::Membership(members)), entry(1, 2, req("r1", init))];
    sm.apply(futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))))).await?;
    let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
    // The same state with a node filed under another name.
    let mut bad = sm.view().read().state.clone();
    let a = bad.nodes.remove("a").ok_or_else(|| io::Error::other("no node a"))?;
    bad.nodes.insert("b".into(), a);
    let data = rmp_serde::to_vec_named(&bad).map_err(io::Error::other)?;
    let mut other = StateMachine::open(std::sync::Arc::new(MemBackend::new()))?;
    let refused = other.install_snapshot(&snap.meta, io::Cursor::new(data)).await;
    let err = refused.err().ok_or_else(|| io::Error::other("a broken snapshot was installed"))?;
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("breaks an invariant: node keyed b is named a"), "{err}");
    assert_eq!(other.applied_state().await?.0, None);
    assert!(other.view().read().state.nodes.is_empty());
    other.install_snapshot(&snap.meta, snap.snapshot).await?;
    assert_eq!(other.applied_state().await?.0, Some(log_id(1, 2)));
    Ok(())
}

#[test]
fn a_database_of_another_format_is_refused() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    {
        let db = sled::open(dir.path())?;
        db.open_tree("local")?.insert(b"format", rmp_serde::to_vec_named(&99u32)?)?;
        db.flush()?;
    }
    match sled_store::open(dir.path()) {
        Err(e) => assert!(e.to_string().contains("format 99"), "{e}"),
        Ok(_) => panic!("format 99 accepted"),
    }
    Ok(())
}

const CRASH_DIR: &str = "HERD_TEST_CRASH_CHILD_DIR";

/// The child half of `sled_log_vote_and_purge_survive_an_abort`: write, then die without any
/// destructor running (no drop-time flush can help).
async fn crash_child(dir: &std::path::Path) -> io::Result<()> {
    let stores = sled_store::open(dir).map_err(io::Error::other)?;
    let mut log = stores.log;
    log.save_vote(&openraft::type_config::alias::VoteOf::<TypeConfig>::new(7, 1)).await?;
    let entries: Vec<Entry> = (1..=5).map(|i| entry(7, i, EntryPayload::Blank)).collect();
    append(&mut log, entries).await?;
    log.purge(log_id(7, 2)).await?;
    std::fs::write(dir.join("reached-abort"), b"")?;
    std::process::abort();
}

/// Vote, appended entries and the purge point are durable when their calls return: a process
/// that aborts right after finds them on reopen.
#[test]
fn sled_log_vote_and_purge_survive_an_abort() -> io::Result<()> {
    if let Some(dir) = std::env::var_os(CRASH_DIR) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return rt.block_on(crash_child(std::path::Path::new(&dir)));
    }
    let dir = tempfile::tempdir()?;
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "sled_log_vote_and_purge_survive_an_abort", "--test-threads=1"])
        .env(CRASH_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .status()?;
    assert!(!status.success(), "the child must die by abort");
    assert!(dir.path().join("reached-abort").exists(), "the child failed before its abort");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let stores = sled_store::open(dir.path()).map_err(io::Error::other)?;
        let mut log = stores.log;
        assert_eq!(log.read_vote().await?, Some(openraft::type_config::alias::VoteOf::<TypeConfig>::new(7, 1)));
        let state = log.get_log_state().await?;
        assert_eq!(state.last_purged_log_id, Some(log_id(7, 2)));
        assert_eq!(state.last_log_id, Some(log_id(7, 5)));
        let left: Vec<u64> = log.try_get_log_entries(0..100).await?.iter().map(|e| e.log_id.index).collect();
        assert!(left.ends_with(&[3, 4, 5]) && left.iter().all(|i| *i >= 1), "{left:?}");
        Ok(())
    })
}

/// A follower that installs a snapshot purges up to it, past its last entry; the log state
/// must then report the purge point as the last log id (else the next start fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_past_the_last_entry_leaves_a_consistent_log_state() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let stores = sled_store::open(dir.path()).map_err(io::Error::other)?;
    let mut sled_log = stores.log;
    append(&mut sled_log, (1..=3).map(|i| entry(1, i, EntryPayload::Blank)).collect()).await?;
    sled_log.purge(log_id(2, 9)).await?;
    let state = sled_log.get_log_state().await?;
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(2, 9)), Some(log_id(2, 9))));

    let mut mem_log = MemLogStore::new();
    use openraft::async_runtime::Oneshot;
    let (tx, rx) = <openraft::type_config::alias::OneshotOf<TypeConfig> as Oneshot>::channel();
    mem_log
        .append((1..=3).map(|i| entry(1, i, EntryPayload::Blank)).collect::<Vec<_>>(), IOFlushed::signal(tx))
        .await?;
    rx.await.map_err(io::Error::other)??;
    mem_log.purge(log_id(2, 9)).await?;
    let state = mem_log.get_log_state().await?;
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(2, 9)), Some(log_id(2, 9))));
    Ok(())
}

/// A format-1 store (the applied state object by object in `sm_data`, written per apply)
/// opens as format 2 with that state as its snapshot, and stays readable afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_store_is_migrated_to_a_snapshot() -> Result<(), Box<dyn std::error::Error>> {
    use herd_storage::model::{self, State};
    let dir = tempfile::tempdir()?;
    let mut state = State::default();
    let requests = [
        Request {
            id: "r1".into(),
            time_ms: 1_000,
            ops: vec![Op::from(Command::InitCluster {
                cluster_id: "c1".into(),
                token_hash: "h".into(),
                node: node("a"),
            })],
        },
        Request {
            id: "r2".into(),
            time_ms: 2_000,
            ops: vec![Op::from(Command::RegisterNode { node: node("b"), token_hash: "h".into() })],
        },
        Request { id: "r3".into(), time_ms: 3_000, ops: vec![Op::from(Command::SetMaintenance { on: true })] },
    ];
    for (i, r) in requests.iter().enumerate() {
        assert!(model::apply(&mut state, i as u64 + 2, r).response.result.is_ok());
    }
    let members = Membership::new(vec![BTreeSet::from([1u64])], BTreeMap::from([(1u64, BasicNode::new("a:7400"))]))?;
    let membership = openraft::StoredMembership::new(Some(log_id(1, 1)), members);
    {
        let db = sled::open(dir.path())?;
        db.open_tree("local")?.insert(b"format", rmp_serde::to_vec_named(&1u32)?)?;
        let data = db.open_tree("sm_data")?;
        // rmp-serde with field names, as format 1 wrote them.
        data.insert(b"meta", rmp_serde::to_vec_named(state.meta.as_ref().ok_or("no meta")?)?)?;
        data.insert(b"clock", rmp_serde::to_vec_named(&state.clock_ms)?)?;
        data.insert(b"events", rmp_serde::to_vec_named(&state.events)?)?;
        for (name, n) in &state.nodes {
            data.insert(format!("node/{name}"), rmp_serde::to_vec_named(n)?)?;
        }
        for (id, r) in state.requests.iter() {
            data.insert(format!("req/{id}"), rmp_serde::to_vec_named(r)?)?;
        }
        let meta = db.open_tree("sm_meta")?;
        meta.insert(b"last_applied", rmp_serde::to_vec_named(&Some(log_id(1, 4)))?)?;
        meta.insert(b"membership", rmp_serde::to_vec_named(&membership)?)?;
        db.flush()?;
    }
    for _ in 0..2 {
        let stores = sled_store::open(dir.path())?;
        let mut sm = StateMachine::open(std::sync::Arc::new(stores.sm))?;
        let (applied, m) = sm.applied_state().await?;
        assert_eq!(applied, Some(log_id(1, 4)));
        assert_eq!(m, membership);
        assert_eq!(sm.view().read().state, state);
        let snap = sm.get_current_snapshot().await?.ok_or("no snapshot")?;
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 4)));
    }
    let db = sled::open(dir.path())?;
    assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"sm_data"), "sm_data dropped");
    let format: u32 = rmp_serde::from_slice(&db.open_tree("local")?.get(b"format")?.ok_or("no format")?)?;
    assert_eq!(format, sled_store::FORMAT_VERSION);
    Ok(())
}
