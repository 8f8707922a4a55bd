//! The node's own identity: its Raft id and cluster, kept locally (never replicated).

use std::io;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::model::NodeId;

/// Who this node is in its cluster, written once it has an id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub name: String,
    /// The role it joined with (None: written by a version that did not record it).
    #[serde(default)]
    pub role: Option<crate::model::Role>,
    /// Set when the cluster removed this node: it must not take part again under this id.
    #[serde(default)]
    pub removed: bool,
    /// Set when the leader found this node's log went backwards (its `data_dir` restored from
    /// an older copy): it takes no part in Raft again under this id (the reason).
    #[serde(default)]
    pub refused: Option<String>,
    /// Set between a join's two phases: the id is allocated, the node not yet a Raft member.
    /// A repeated `join-cluster` resumes the second phase under the same id.
    #[serde(default)]
    pub pending_join: bool,
    /// Set for a hypervisor outside Raft (issue 22): it follows the replicated state through a
    /// session to a coordinator instead of running Raft.
    #[serde(default)]
    pub client: bool,
    /// The coordinators (id, cluster address) a client asks first at start, before its
    /// followed state names them: those of the cluster it joined.
    #[serde(default)]
    pub seeds: Vec<(NodeId, String)>,
}

/// Where the identity rests.
pub trait IdentityStore: Send + Sync + 'static {
    fn load(&self) -> io::Result<Option<Identity>>;
    /// Saves durably before returning.
    fn save(&self, id: &Identity) -> BoxFuture<'_, io::Result<()>>;
}

/// An in-memory identity store for the simulation.
#[derive(Clone, Default)]
pub struct MemIdentity(Arc<Mutex<Option<Identity>>>);

impl MemIdentity {
    /// Puts a copied identity back (the simulation's restore of an earlier copy).
    pub fn restore(&self, copy: Option<Identity>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = copy;
    }
}

impl IdentityStore for MemIdentity {
    fn load(&self) -> io::Result<Option<Identity>> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn save(&self, id: &Identity) -> BoxFuture<'_, io::Result<()>> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
        Box::pin(async { Ok(()) })
    }
}
