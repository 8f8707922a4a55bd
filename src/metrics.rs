//! Prometheus metrics: a text endpoint (`[metrics] listen`, off when unset) served by hyper.
//!
//! Gauges are refreshed from their sources at each scrape (Raft metrics, the heartbeat agent,
//! the primary manager, the replicated state); histograms are fed as events happen (proposal
//! latency by the cluster node's write path, pulse round trips by the heartbeat agent). Names
//! follow Prometheus conventions: `herd_` prefix, units in names.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::{watch, Notify};

use crate::heartbeat::agent::Agent;
use crate::primary::manager::Manager;

/// What a scrape reads: the metrics and the live sources their gauges are refreshed from.
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub node: Arc<herd_raft::node::ClusterNode<herd_storage::log_store::LogStore>>,
    pub agent: Arc<Agent>,
    pub primary: Arc<Manager>,
    pub cluster_port: Arc<herd_raft::server::PortStats>,
}
use crate::heartbeat::verdict::Verdict;
use crate::heartbeat::LinkState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostNet {
    host: String,
    network: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Host {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Network {
    network: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerKind {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostState {
    host: String,
    state: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric herd exports.
pub struct Metrics {
    registry: Registry,
    raft_term: Gauge,
    raft_is_leader: Gauge,
    raft_leader_id: Gauge,
    raft_commit_index: Gauge,
    raft_applied_index: Gauge,
    raft_apply_lag: Gauge,
    raft_quorum: Gauge,
    pub proposal_seconds: Histogram,
    heartbeat_link_state: Family<HostNet, Gauge>,
    heartbeat_lost: Family<Host, Gauge>,
    heartbeat_mnfa: Family<Network, Gauge>,
    pub pulse_rtt_seconds: Histogram,
    primary_holding: Gauge,
    nodes: Family<State, Gauge>,
    keepalive_age_seconds: Family<Host, FloatGauge>,
    client_heard_age_seconds: Family<Host, FloatGauge>,
    fence_ready: Family<Host, Gauge>,
    fence_state: Family<HostState, Gauge>,
    node_unhealthy: Family<Host, Gauge>,
    raft_stopped: Gauge,
    cluster_refused: Family<Reason, Counter>,
    cluster_connections: Family<PeerKind, Counter>,
    pauses: Counter,
    pause_longest_seconds: FloatGauge,
    realtime: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("herd");
        let m = Metrics {
            raft_term: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_leader_id: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_apply_lag: Gauge::default(),
            raft_quorum: Gauge::default(),
            proposal_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            heartbeat_link_state: Family::default(),
            heartbeat_lost: Family::default(),
            heartbeat_mnfa: Family::default(),
            pulse_rtt_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            primary_holding: Gauge::default(),
            nodes: Family::default(),
            keepalive_age_seconds: Family::default(),
            client_heard_age_seconds: Family::default(),
            fence_ready: Family::default(),
            fence_state: Family::default(),
            node_unhealthy: Family::default(),
            raft_stopped: Gauge::default(),
            cluster_refused: Family::default(),
            cluster_connections: Family::default(),
            pauses: Counter::default(),
            pause_longest_seconds: FloatGauge::default(),
            realtime: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("raft_term", "Current Raft term", m.raft_term.clone());
        registry.register("raft_is_leader", "1 if this node is the Raft leader", m.raft_is_leader.clone());
        registry.register("raft_leader_id", "Node id of the current leader (-1: none known)", m.raft_leader_id.clone());
        registry.register("raft_commit_index", "Last log index known committed", m.raft_commit_index.clone());
        registry.register(
            "raft_applied_index",
            "Last log index applied to the state machine",
            m.raft_applied_index.clone(),
        );
        registry.register("raft_apply_lag_entries", "Committed but not yet applied entries", m.raft_apply_lag.clone());
        registry.register("raft_quorum", "1 if this node is in contact with a quorum", m.raft_quorum.clone());
        registry.register(
            "raft_proposal_duration_seconds",
            "Time from proposing a write to its applied result",
            m.proposal_seconds.clone(),
        );
        registry.register(
            "heartbeat_link_state",
            "This coordinator's view of a host on a network: 0 ok, 1 degraded, 2 lost",
            m.heartbeat_link_state.clone(),
        );
        registry.register(
            "heartbeat_host_lost",
            "1 if the heartbeat verdict for the host is lost",
            m.heartbeat_lost.clone(),
        );
        registry.register("heartbeat_mnfa_active", "1 while MNFA is active on the network", m.heartbeat_mnfa.clone());
        registry.register("heartbeat_pulse_rtt_seconds", "Pulse to answer round trip", m.pulse_rtt_seconds.clone());
        registry.register(
            "primary_holding_duties",
            "1 while this node holds the primary duties",
            m.primary_holding.clone(),
        );
        registry.register("nodes", "Nodes by daemon_state", m.nodes.clone());
        registry.register(
            "keepalive_age_seconds",
            "Age of each node's last committed keepalive",
            m.keepalive_age_seconds.clone(),
        );
        registry.register(
            "client_heard_age_seconds",
            "A client outside Raft: since any coordinator last heard its session (coordinators only)",
            m.client_heard_age_seconds.clone(),
        );
        registry.register(
            "fence_ready",
            "1 if the host's BMC answered the primary's last check, 0 if not, -1 unchecked or no [fencing]",
            m.fence_ready.clone(),
        );
        registry.register(
            "fence_state",
            "1 for the host's fencing state: none, fencing, fenced or fence-failed",
            m.fence_state.clone(),
        );
        m.register_health(&mut registry);
        Arc::new(Metrics { registry, ..m })
    }

    /// The health, scheduling and cluster-port families (split from `new`).
    fn register_health(&self, registry: &mut Registry) {
        registry.register(
            "node_unhealthy",
            "1 if the leader found the host out of Raft (its store cannot write, its log went backwards)",
            self.node_unhealthy.clone(),
        );
        registry.register(
            "raft_stopped",
            "1 if Raft stopped on this node (a storage error, or refused: its log went backwards)",
            self.raft_stopped.clone(),
        );
        registry.register(
            "pauses",
            "Times the runtime ran later than a third of the Raft lease (the primary drops its duties at such a pause)",
            self.pauses.clone(),
        );
        registry.register(
            "pause_longest_seconds",
            "The runtime's longest pause in the last minute",
            self.pause_longest_seconds.clone(),
        );
        registry.register(
            "realtime",
            "1 if the runtime's threads run with real-time scheduling ([scheduling] realtime, granted)",
            self.realtime.clone(),
        );
        registry.register(
            "cluster_refused",
            "Connections and requests the cluster port turned away, by reason",
            self.cluster_refused.clone(),
        );
        registry.register(
            "cluster_connections",
            "Connections the cluster port admitted: peer=member (certified) or anonymous (a joiner)",
            self.cluster_connections.clone(),
        );
    }

    /// Brings the port's counters up to the source's counts.
    fn port_counters(&self, port: &herd_raft::server::PortStats) {
        let bump = |c: &Counter, to: u64| {
            c.inc_by(to.saturating_sub(c.get()));
        };
        for r in herd_raft::server::Refusal::ALL {
            bump(&self.cluster_refused.get_or_create(&Reason { reason: r.as_str().into() }), port.refused(r));
        }
        let (members, anonymous) = port.admitted();
        bump(&self.cluster_connections.get_or_create(&PeerKind { peer: "member".into() }), members);
        bump(&self.cluster_connections.get_or_create(&PeerKind { peer: "anonymous".into() }), anonymous);
    }

    /// Refreshes the gauges from their sources and renders the text format.
    fn render(&self, daemon: &Scrape) -> String {
        self.primary_holding.set(i64::from(daemon.primary.holding()));
        self.raft_quorum.set(i64::from(daemon.node.quorum()));
        let stopped = daemon.node.refused().is_some()
            || daemon.node.member().is_some_and(|m| m.raft.metrics().borrow_watched().running_state.is_err());
        self.raft_stopped.set(i64::from(stopped));
        self.port_counters(&daemon.cluster_port);
        let pauses = crate::sched::pauses();
        let seen = self.pauses.get();
        self.pauses.inc_by(pauses.total.saturating_sub(seen));
        self.pause_longest_seconds.set(pauses.longest_last_minute_ms as f64 / 1000.0);
        self.realtime.set(i64::from(crate::sched::got().policy != "other"));
        if let Some(member) = daemon.node.member() {
            let metrics = member.raft.metrics();
            let (term, leader, state, committed) = {
                let m = metrics.borrow_watched();
                (m.current_term, m.current_leader, m.state, m.local_committed.map(|l| l.index))
            };
            let applied = member.view.read().last_applied.map_or(0, |l| l.index);
            let committed = committed.unwrap_or(0);
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.raft_term.set(gauge(term));
            self.raft_is_leader.set(i64::from(state == ServerState::Leader));
            self.raft_leader_id.set(leader.map_or(-1, gauge));
            self.raft_commit_index.set(gauge(committed));
            self.raft_applied_index.set(gauge(applied));
            self.raft_apply_lag.set(gauge(committed.saturating_sub(applied)));
            let now = herd_raft::clock::wall_ms();
            let g = member.view.read();
            self.nodes.clear();
            self.keepalive_age_seconds.clear();
            self.client_heard_age_seconds.clear();
            self.fence_ready.clear();
            self.fence_state.clear();
            self.node_unhealthy.clear();
            for n in g.state.nodes.values() {
                let host = Host { host: n.name.clone() };
                self.node_unhealthy.get_or_create(&host).set(i64::from(n.health.is_some()));
                let ready = match (&n.fencing, n.fence.ready) {
                    (Some(_), Some(r)) => i64::from(r),
                    _ => -1,
                };
                self.fence_ready.get_or_create(&host).set(ready);
                let state = n.fence_state();
                self.fence_state.get_or_create(&HostState { host: n.name.clone(), state: state.into() }).set(1);
                self.nodes.get_or_create(&State { state: n.daemon_state.to_string() }).inc();
                if let Some(ms) = daemon.node.client_heard_ms(n.id) {
                    self.client_heard_age_seconds.get_or_create(&Host { host: n.name.clone() }).set(ms as f64 / 1000.0);
                }
                if let Some(t) = n.last_keepalive_ms {
                    self.keepalive_age_seconds
                        .get_or_create(&Host { host: n.name.clone() })
                        .set(now.saturating_sub(t) as f64 / 1000.0);
                }
            }
        }
        let report = daemon.agent.report();
        self.heartbeat_link_state.clear();
        for net in report["own_view"]["nets"].as_array().into_iter().flatten() {
            for h in net["hosts"].as_array().into_iter().flatten() {
                let state = match h["state"].as_str() {
                    Some(s) if s == LinkState::Lost.as_str() => 2,
                    Some(s) if s == LinkState::Degraded.as_str() => 1,
                    _ => 0,
                };
                let labels = HostNet {
                    host: h["host"].as_str().unwrap_or_default().to_string(),
                    network: net["net"].as_str().unwrap_or_default().to_string(),
                };
                self.heartbeat_link_state.get_or_create(&labels).set(state);
            }
        }
        self.heartbeat_mnfa.clear();
        for (net, on) in report["mnfa"].as_object().into_iter().flatten() {
            self.heartbeat_mnfa
                .get_or_create(&Network { network: net.clone() })
                .set(i64::from(on.as_bool() == Some(true)));
        }
        self.heartbeat_lost.clear();
        let names: std::collections::BTreeMap<u64, String> = daemon
            .node
            .member()
            .map(|m| m.view.read().state.nodes.values().map(|n| (n.id, n.name.clone())).collect())
            .unwrap_or_default();
        for (id, v) in daemon.agent.verdicts() {
            let host = names.get(&id).cloned().unwrap_or_else(|| format!("node {id}"));
            self.heartbeat_lost.get_or_create(&Host { host }).set(i64::from(v.verdict == Verdict::Lost));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("metrics encoding failed: {e}");
        }
        out
    }
}

/// At most this many connections are open at once. One that sends nothing within
/// [`FIRST_BYTE`] is closed, and when all are taken the oldest that has sent nothing yet makes
/// room: idle connections can never keep a scrape out. A request has [`HEADER_TIMEOUT`] to
/// arrive whole, and a connection serves one request.
const MAX_SCRAPES: usize = 16;
const FIRST_BYTE: Duration = Duration::from_secs(2);
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTION_TIME: Duration = Duration::from_secs(15);

/// One open connection, as the accept loop sees it.
struct Open {
    id: u64,
    /// It has sent its first byte: a scrape under way, not to be evicted.
    started: bool,
    evict: Arc<Notify>,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Conns(std::sync::Mutex<Vec<Open>>);

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Open>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for connection `id`: evicts the oldest idle one when full; `None` when every
    /// slot is a scrape under way.
    fn admit(&self, id: u64) -> Option<Arc<Notify>> {
        let mut g = self.lock();
        if g.len() >= MAX_SCRAPES {
            let idle = g.iter().position(|o| !o.started)?;
            g.remove(idle).evict.notify_one();
        }
        let evict = Arc::new(Notify::new());
        g.push(Open { id, started: false, evict: evict.clone() });
        Some(evict)
    }

    /// Marks `id` started; false if it was evicted meanwhile.
    fn start(&self, id: u64) -> bool {
        self.lock().iter_mut().find(|o| o.id == id).map(|o| o.started = true).is_some()
    }

    fn close(&self, id: u64) {
        self.lock().retain(|o| o.id != id);
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, daemon: Arc<Scrape>, mut shutdown: watch::Receiver<bool>) {
    let conns = Arc::new(Conns::default());
    for id in 0u64.. {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let Some(evict) = conns.admit(id) else { continue };
        let (daemon, conns) = (daemon.clone(), conns.clone());
        herd_storage::types::spawn(async move {
            // A byte actually there (`peek`), not readiness, which may be spurious.
            let mut byte = [0u8; 1];
            let first = tokio::select! {
                _ = evict.notified() => false,
                r = tokio::time::timeout(FIRST_BYTE, stream.peek(&mut byte)) => matches!(r, Ok(Ok(n)) if n > 0),
            };
            if first && conns.start(id) {
                let _ = tokio::time::timeout(MAX_CONNECTION_TIME, scrape(stream, daemon)).await;
            }
            conns.close(id);
        });
    }
}

/// Answers the one request on `stream`.
async fn scrape(stream: tokio::net::TcpStream, daemon: Arc<Scrape>) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let daemon = daemon.clone();
        async move { Ok::<_, Infallible>(answer(&req, &daemon)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = conn.await;
}

fn answer(req: &Request<hyper::body::Incoming>, daemon: &Scrape) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
        (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", daemon.metrics.render(daemon))
    } else {
        (StatusCode::NOT_FOUND, "text/plain", "not found: GET /metrics\n".to_string())
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Binds the endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
