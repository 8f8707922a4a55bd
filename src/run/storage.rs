//! A store that cannot write (a full disk, an IO error) stops Raft on this node for good — it
//! must not acknowledge what it did not write, and openraft does not recover from a storage
//! error. The leader marks the node unhealthy on every node (`daemon::health`); this guard says
//! so here, probes `data_dir` every second, and once writes succeed again returns, so that
//! the process restarts itself in place and recovers from disk as after a crash — no operator
//! restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;
use openraft::async_runtime::watch::WatchReceiver;

const PROBE_EVERY: Duration = Duration::from_secs(1);
/// What the probe writes (and syncs): room for more than one log entry.
const PROBE_BYTES: usize = 256 * 1024;

/// Returns once this node's Raft has stopped on a storage error and `data_dir` takes writes
/// again; pending forever otherwise.
pub async fn recovered(node: Arc<ClusterNode<LogStore>>, data_dir: PathBuf) {
    let error = loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(member) = node.member() else { continue };
        let metrics = member.raft.metrics().borrow_watched().clone();
        if let Err(openraft::errors::Fatal::StorageError(e)) = &metrics.running_state {
            break e.to_string();
        }
    };
    tracing::error!(
        "storage error: {error}; Raft stopped on this node (it acknowledges nothing) — it restarts \
         itself once {} takes writes again",
        data_dir.display()
    );
    let mut last = String::new();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || probe(&dir)).await {
            Ok(Ok(())) => {
                tracing::warn!("data_dir takes writes again: restarting this process to recover from disk");
                return;
            }
            Ok(Err(e)) if e.to_string() != last => {
                tracing::warn!("data_dir still refuses writes: {e}");
                last = e.to_string();
            }
            _ => {}
        }
    }
}

/// Writes, syncs and removes a probe file in `dir`.
fn probe(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(".write-probe");
    let result = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result
}
