//! [`Session`]: a [`Follower`] kept fed by one coordinator at a time, moving to the next when
//! it fails.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_storage::model::{NodeId, NodeStats, Role};
use herd_storage::sm::StateView;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{FollowError, Follower};
use crate::network::{Limits, PeerClient};
use crate::transport::Connector;

/// How a [`Session`] waits and retries.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// A long poll's wait (the coordinator answers sooner when a change comes).
    pub wait: Duration,
    /// The pause after a failure, doubling per failure in a row up to `backoff_max`, with up
    /// to half again of random jitter (so a coordinator's restart does not send all its
    /// followers to the next one at the same moment).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub limits: Limits,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            wait: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            limits: Limits::default(),
        }
    }
}

/// Where a session stands, published on every answer and every move.
#[derive(Clone, Debug, Default)]
pub struct SessionStatus {
    /// The coordinator followed now (id, cluster address).
    pub coordinator: Option<(NodeId, String)>,
    /// When a coordinator last answered (its answer is the session's acknowledgement).
    pub answered: Option<Instant>,
    /// When the last poll a coordinator answered was sent: the acknowledgement dated the way
    /// the primary can bound it (the coordinator heard the poll after it was sent, and serves
    /// only within its round trip with the leader) — what a client self-fences on.
    pub acknowledged: Option<Instant>,
    /// Moves to another coordinator after a failure.
    pub moves: u64,
    /// The last failure, if the last exchange failed.
    pub failing: Option<String>,
}

/// The coordinators `view` names (id, cluster address), by id.
pub(super) fn coordinators(view: &StateView) -> Vec<(NodeId, String)> {
    let g = view.read();
    g.state.nodes.values().filter(|n| n.role == Role::Coordinator).map(|n| (n.id, n.cluster_addr.clone())).collect()
}

/// A follower kept fed by one coordinator at a time: the coordinators the followed state
/// names (or the seeds, before it names any), tried in turn from a random one.
pub struct Session {
    follower: Follower,
    connector: Arc<dyn Connector>,
    cluster_id: String,
    me: NodeId,
    seeds: Vec<(NodeId, String)>,
    settings: SessionSettings,
    status: watch::Sender<SessionStatus>,
    /// Statistics to send with every poll, as the client last set them.
    report: Option<Arc<Mutex<Option<NodeStats>>>>,
}

impl Session {
    /// A session for node `me` of `cluster_id`, starting at one of `seeds` (id, address).
    pub fn new(
        connector: Arc<dyn Connector>,
        cluster_id: String,
        me: NodeId,
        seeds: Vec<(NodeId, String)>,
        settings: SessionSettings,
    ) -> Session {
        let follower = Follower::new();
        let status = watch::Sender::new(SessionStatus::default());
        Session { follower, connector, cluster_id, me, seeds, settings, status, report: None }
    }

    /// Asks for `asks` rather than outlines (a reader that keeps every VM whole).
    pub fn asking(mut self, asks: super::Asks) -> Session {
        self.follower = Follower::asking(asks);
        self
    }

    /// Sends what `report` holds with every poll (a client's statistics).
    pub fn with_report(mut self, report: Arc<Mutex<Option<NodeStats>>>) -> Session {
        self.report = Some(report);
        self
    }

    /// The followed state.
    pub fn view(&self) -> StateView {
        self.follower.view().clone()
    }

    pub fn status(&self) -> watch::Receiver<SessionStatus> {
        self.status.subscribe()
    }

    /// The coordinators to follow: those the state names, else the seeds.
    fn coordinators(&self) -> Vec<(NodeId, String)> {
        let named = coordinators(self.follower.view());
        if named.is_empty() {
            self.seeds.clone()
        } else {
            named
        }
    }

    /// Follows until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut turn = usize::try_from(crate::node::tokens::random_u64() % 1024).unwrap_or(0);
        let mut failures = 0u32;
        let mut client: Option<PeerClient> = None;
        loop {
            let c = match client.as_mut() {
                Some(c) => c,
                None => {
                    let all = self.coordinators();
                    let Some((id, addr)) = all.get(turn % all.len().max(1)).cloned() else {
                        failures = failures.saturating_add(1);
                        if self.pause(failures, &mut shutdown).await {
                            return;
                        }
                        continue;
                    };
                    self.status.send_modify(|s| s.coordinator = Some((id, addr.clone())));
                    let c = PeerClient::new(
                        self.connector.clone(),
                        addr,
                        Some(id),
                        self.cluster_id.clone(),
                        self.settings.limits.clone(),
                    );
                    client.insert(c.from(Some(self.me)))
                }
            };
            if let Some(r) = &self.report {
                self.follower.set_report(r.lock().unwrap_or_else(|p| p.into_inner()).clone());
            }
            let sent = Instant::now();
            let polled = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                r = self.follower.poll(c, self.settings.wait) => r,
            };
            match polled {
                Ok(_) => {
                    failures = 0;
                    self.status.send_modify(|s| {
                        s.answered = Some(Instant::now());
                        s.acknowledged = s.acknowledged.max(Some(sent));
                        s.failing = None;
                    });
                }
                // Asks again from the first index missing, same coordinator.
                Err(e @ FollowError::Gap { .. }) => tracing::warn!("session: {e}"),
                Err(e) => {
                    let was = c.addr().to_string();
                    tracing::debug!("session with {was}: {e}; trying the next coordinator");
                    self.status.send_modify(|s| {
                        s.failing = Some(format!("{was}: {e}"));
                        s.moves += 1;
                    });
                    client = None;
                    turn = turn.wrapping_add(1);
                    failures = failures.saturating_add(1);
                    if self.pause(failures, &mut shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits the backoff for `failures` in a row; true when shut down meanwhile.
    async fn pause(&self, failures: u32, shutdown: &mut watch::Receiver<bool>) -> bool {
        let s = &self.settings;
        let base = s.backoff_min.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(s.backoff_max);
        let jitter_ms = u64::try_from(base.as_millis() / 2).unwrap_or(0).max(1);
        let pause = base + Duration::from_millis(crate::node::tokens::random_u64() % jitter_ms);
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => true,
            _ = tokio::time::sleep(pause) => false,
        }
    }
}
