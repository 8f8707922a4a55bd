//! A store that cannot write (a full disk, an IO error) stops Raft on this node for good: it
//! must not acknowledge what it did not write, and openraft does not recover from a storage
//! error. The leader marks the node unhealthy on every node (`health.rs`); this guard says so
//! here, probes the store every second (`Env::storage_probe`) and, once it takes writes again,
//! asks for a restart (`Running::restart_needed`): production `exec`s itself in place, the
//! simulation restarts the host — either way the node recovers from disk as after a crash,
//! with no operator.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use herd_raft::node::ClusterNode;
use herd_storage::log_store::LogStore;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::sync::watch;

const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Whether the store takes writes now.
pub trait StorageProbe: Send + Sync + 'static {
    fn probe(&self) -> BoxFuture<'_, std::io::Result<()>>;
}

/// Production: writes, syncs and removes a file in `data_dir` (on a blocking thread).
pub struct DirProbe(pub PathBuf);

/// What the probe writes (and syncs): room for more than one log entry.
const PROBE_BYTES: usize = 256 * 1024;

impl StorageProbe for DirProbe {
    fn probe(&self) -> BoxFuture<'_, std::io::Result<()>> {
        let path = self.0.join(".write-probe");
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                crate::sched::enter_blocking_call();
                let result = (|| {
                    let mut f = std::fs::File::create(&path)?;
                    f.write_all(&vec![0u8; PROBE_BYTES])?;
                    f.sync_all()
                })();
                let _ = std::fs::remove_file(&path);
                result
            })
            .await
            .map_err(std::io::Error::other)?
        })
    }
}

/// Waits until this node's Raft stops on a storage error and the store takes writes again,
/// then says a restart is needed.
pub async fn guard(node: Arc<ClusterNode<LogStore>>, probe: Arc<dyn StorageProbe>, restart: watch::Sender<bool>) {
    let error = loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(member) = node.member() else { continue };
        let state = member.raft.metrics().borrow_watched().running_state.clone();
        if let Err(openraft::errors::Fatal::StorageError(e)) = state {
            break e.to_string();
        }
    };
    tracing::error!(
        "storage error: {error}; Raft stopped on this node (it acknowledges nothing) — it restarts \
         itself once its store takes writes again"
    );
    let mut last = String::new();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        match probe.probe().await {
            Ok(()) => {
                tracing::warn!("the store takes writes again: restarting to recover from disk");
                let _ = restart.send(true);
                return;
            }
            Err(e) if e.to_string() != last => {
                tracing::warn!("the store still refuses writes: {e}");
                last = e.to_string();
            }
            Err(_) => {}
        }
    }
}
