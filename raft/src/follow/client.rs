//! [`Client`]: a node outside Raft (a hypervisor, issue 22): its copy of the replicated state
//! kept by a [`Session`], and its leader operations through a [`LeaderLink`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_storage::model::{NodeId, NodeStats};
use herd_storage::sm::StateView;
use tokio::sync::watch;

use super::{LeaderLink, Session, SessionSettings, SessionStatus};
use crate::transport::Connector;

/// The session's long poll for a client: a live session is heard at least this often, which
/// bounds how long a live client can look silent to the coordinators.
pub const CLIENT_WAIT: Duration = Duration::from_secs(1);

/// A node following the cluster from outside Raft. Dropped (or [`Client::stop`]): its session
/// ends.
pub struct Client {
    pub id: NodeId,
    pub cluster_id: String,
    /// The followed state, read like a member's.
    pub view: StateView,
    /// Writes, read barriers and other leader operations.
    pub link: LeaderLink,
    status: watch::Receiver<SessionStatus>,
    stop: watch::Sender<bool>,
    /// Statistics sent with every poll (the coordinator writes them with the keepalive).
    report: Arc<Mutex<Option<NodeStats>>>,
}

impl Client {
    /// Starts following cluster `cluster_id` as node `id`, asking `seeds` (id, address) first.
    pub fn start(
        connector: Arc<dyn Connector>,
        cluster_id: String,
        id: NodeId,
        seeds: Vec<(NodeId, String)>,
        settings: SessionSettings,
    ) -> Arc<Client> {
        let limits = settings.limits.clone();
        let report = Arc::new(Mutex::new(None));
        let session =
            Session::new(connector.clone(), cluster_id.clone(), id, seeds, settings).with_report(report.clone());
        let view = session.view();
        let status = session.status();
        let (stop, stopped) = watch::channel(false);
        herd_storage::types::spawn(session.run(stopped));
        let link = LeaderLink::new(view.clone(), connector, cluster_id.clone(), id, limits);
        Arc::new(Client { id, cluster_id, view, link, status, stop, report })
    }

    /// The statistics the next polls carry.
    pub fn report(&self, stats: NodeStats) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// Where the session stands now.
    pub fn status(&self) -> SessionStatus {
        self.status.borrow().clone()
    }

    /// Turns true when the session ends.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Ends the session.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop();
    }
}
