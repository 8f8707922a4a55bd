//! The log mark: the highest log index this node has applied, kept **outside** `data_dir`.
//!
//! Raft assumes a node never forgets what it wrote. A `data_dir` restored from an earlier copy
//! breaks that silently: the node's log ends before entries it acknowledged, and with the vote
//! of such a node a leader missing committed entries can be elected. The cluster's record of
//! what each member held (`State::acked`) catches it only when a peer that knew is reachable;
//! the mark catches it at start, alone: a log that ends before the mark went backwards.
//!
//! The mark is small and written at most once a second (an `fsync` of a few bytes), so a
//! restore of a copy taken within the last second before the stop may go unnoticed; a restore
//! of a whole machine image (mark included) is left to the cluster's record.
//!
//! File format (one line, for operators to read): `cluster=<id> node=<id> index=<n>`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use crate::model::NodeId;

/// What the mark says: in cluster `cluster_id`, node `node_id` had applied entry `index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogMark {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub index: u64,
}

impl LogMark {
    fn to_line(&self) -> String {
        format!("cluster={} node={} index={}\n", self.cluster_id, self.node_id, self.index)
    }

    fn parse(text: &str) -> Option<LogMark> {
        let mut cluster_id = None;
        let (mut node_id, mut index) = (None, None);
        for field in text.split_whitespace() {
            match field.split_once('=')? {
                ("cluster", v) if !v.is_empty() => cluster_id = Some(v.to_string()),
                ("node", v) => node_id = Some(v.parse().ok()?),
                ("index", v) => index = Some(v.parse().ok()?),
                _ => return None,
            }
        }
        Some(LogMark { cluster_id: cluster_id?, node_id: node_id?, index: index? })
    }
}

/// Where the mark rests.
pub trait MarkStore: Send + Sync + 'static {
    fn load(&self) -> io::Result<Option<LogMark>>;
    /// Saves durably before the future completes.
    fn save(&self, mark: &LogMark) -> BoxFuture<'_, io::Result<()>>;
    /// Where it is, for messages.
    fn place(&self) -> String;
}

/// The mark in a file (written to a temporary file, synced, renamed, the directory synced).
pub struct FileMark {
    path: PathBuf,
}

impl FileMark {
    /// A mark at `path`; its directory is created (0700) if missing.
    pub fn open(path: &Path) -> io::Result<FileMark> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        Ok(FileMark { path: path.to_path_buf() })
    }

    fn write(path: &Path, line: &str) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("new");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(line.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl MarkStore for FileMark {
    fn load(&self) -> io::Result<Option<LogMark>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => LogMark::parse(&text).map(Some).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "log mark {}: not `cluster=<id> node=<id> index=<n>`: {:?} (remove it only if this \
                         node's data_dir is known to be the one it last ran with)",
                        self.path.display(),
                        text.trim()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("log mark {}: {e}", self.path.display()))),
        }
    }

    fn save(&self, mark: &LogMark) -> BoxFuture<'_, io::Result<()>> {
        let (path, line) = (self.path.clone(), mark.to_line());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || FileMark::write(&path, &line))
                .await
                .map_err(|e| io::Error::other(format!("log mark writer: {e}")))?
        })
    }

    fn place(&self) -> String {
        self.path.display().to_string()
    }
}

/// The mark in memory (the simulation keeps it beside, not inside, a machine's store).
#[derive(Clone, Default)]
pub struct MemMark(Arc<Mutex<Option<LogMark>>>);

impl MarkStore for MemMark {
    fn load(&self) -> io::Result<Option<LogMark>> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn save(&self, mark: &LogMark) -> BoxFuture<'_, io::Result<()>> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(mark.clone());
        Box::pin(async { Ok(()) })
    }

    fn place(&self) -> String {
        "memory".into()
    }
}

/// Why a log that ends at `log_end` must not be trusted under `mark`, if so: the mark is this
/// node's, in this cluster, and beyond the log's end.
pub fn went_backwards(mark: Option<&LogMark>, cluster_id: &str, node_id: NodeId, log_end: Option<u64>) -> Option<u64> {
    let m = mark.filter(|m| m.cluster_id == cluster_id && m.node_id == node_id)?;
    (m.index > log_end.unwrap_or(0)).then_some(m.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_mark_round_trips_through_its_file_and_bad_text_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m").join("log-mark");
        let store = FileMark::open(&path).expect("open");
        assert_eq!(store.load().expect("load"), None, "no file yet");
        let mark = LogMark { cluster_id: "abc".into(), node_id: 3, index: 41 };
        store.save(&mark).await.expect("save");
        assert_eq!(store.load().expect("load"), Some(mark));
        std::fs::write(&path, "cluster=abc node=x index=1").expect("write");
        assert!(store.load().is_err());
        std::fs::write(&path, "").expect("write");
        assert!(store.load().is_err());
    }

    #[test]
    fn only_this_nodes_mark_beyond_the_log_counts() {
        let m = LogMark { cluster_id: "c".into(), node_id: 2, index: 40 };
        assert_eq!(went_backwards(Some(&m), "c", 2, Some(39)), Some(40));
        assert_eq!(went_backwards(Some(&m), "c", 2, None), Some(40));
        assert_eq!(went_backwards(Some(&m), "c", 2, Some(40)), None);
        assert_eq!(went_backwards(Some(&m), "c", 3, Some(1)), None, "another node id (a re-join)");
        assert_eq!(went_backwards(Some(&m), "d", 2, Some(1)), None, "another cluster");
        assert_eq!(went_backwards(None, "c", 2, Some(1)), None);
    }
}
