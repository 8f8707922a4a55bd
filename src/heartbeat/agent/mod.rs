//! The heartbeat's IO: one UDP socket per heartbeat network, answering pulses (every node) and
//! sending them each period and collecting answers (coordinators).
//!
//! Sockets sit behind [`DatagramSocket`] so the simulation can swap in turmoil's UDP. Time is a
//! `tokio::time::Instant` turned into milliseconds since the agent started. The state lock is
//! a short synchronous section: no IO and no `.await` while it is held.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herd_storage::model::{NodeId, Role};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::relay::ViewCache;
use super::verdict::{self, HostVerdict, ViewInput};
use super::view::{Event, OwnView};
use super::wire::{self, Body, Datagram, DropReason, Key, Summary, MAGIC, MAX_DATAGRAM, VERSION};
use super::{LinkState, NetName, Params};

pub use super::socket::{bind_udp, DatagramSocket};

mod report;

/// Datagrams handled per wake-up at most, so one busy socket cannot starve the others.
const BURST: usize = 256;
/// Link transitions of one tick logged a line each; the rest are counted in one line.
const LINKS_NAMED_PER_TICK: usize = 16;

/// A node the agent pulses (coordinators) and names in reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub id: NodeId,
    pub name: String,
    pub role: Role,
    pub addrs: BTreeMap<NetName, SocketAddr>,
}

impl Target {
    /// The target a replicated node record describes (addresses that do not parse are left out).
    pub fn of(n: &herd_storage::model::NodeRecord) -> Target {
        Target {
            id: n.id,
            name: n.name.clone(),
            role: n.role,
            addrs: n.heartbeat.iter().filter_map(|(net, a)| Some((net.clone(), a.parse().ok()?))).collect(),
        }
    }
}

/// What arrived and what was dropped, for `herd heartbeat`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub pulses_sent: u64,
    pub pulses_received: u64,
    pub answers_sent: u64,
    pub answers_received: u64,
    pub malformed: u64,
    pub foreign: u64,
    /// Dropped for a missing or wrong authentication tag (spoofed or altered).
    pub unauthenticated: u64,
    /// Dropped as replays: a sequence number not above the last one accepted from that sender
    /// on that network (authenticated clusters only).
    pub replayed: u64,
    pub send_errors: u64,
}

/// A notable change, for the daemon to record in the cluster's event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub kind: &'static str,
    pub message: String,
}

#[derive(Clone)]
struct Inner {
    me: Option<(NodeId, String)>,
    view: Option<OwnView>,
    cache: ViewCache,
    targets: BTreeMap<NodeId, Target>,
    /// Coordinators that are not watched (fenced, awaiting `node ready`) but whose views still
    /// count: running again, they see the network as well as any other coordinator.
    view_sources: BTreeSet<NodeId>,
    counters: Counters,
    /// When the current period's pulses went out.
    period_started: Option<Instant>,
    /// The cluster's heartbeat key: with it every datagram is tagged and checked.
    key: Option<Key>,
    /// The highest sequence number accepted per (answer?, sender, network), and when: the
    /// replay window (authenticated clusters only; senders are known coordinators or targets).
    last_seq: BTreeMap<(bool, NodeId, NetName), (u64, u64)>,
    /// Set for good when this node was refused (its log went backwards): it answers and sends
    /// nothing, so the cluster finds it dead, fences it and runs its VMs elsewhere.
    silent: bool,
}

/// The heartbeat agent of one node.
pub struct Agent {
    name: String,
    role: Role,
    params: Params,
    sockets: BTreeMap<NetName, Arc<dyn DatagramSocket>>,
    addrs: BTreeMap<NetName, SocketAddr>,
    started: Instant,
    inner: Mutex<Inner>,
    notices: mpsc::Sender<Notice>,
    rtt_observer: std::sync::OnceLock<Arc<dyn Fn(Duration) + Send + Sync>>,
}

impl Agent {
    /// Installs the observer of pulse round trips (metrics; once).
    pub fn set_rtt_observer(&self, f: Arc<dyn Fn(Duration) + Send + Sync>) {
        let _ = self.rtt_observer.set(f);
    }

    /// Binds one UDP socket per network. Returns the agent and the receiver of its notices.
    pub async fn bind(
        name: &str,
        role: Role,
        params: Params,
        networks: &BTreeMap<NetName, SocketAddr>,
    ) -> io::Result<(Arc<Agent>, mpsc::Receiver<Notice>)> {
        let mut sockets: BTreeMap<NetName, Arc<dyn DatagramSocket>> = BTreeMap::new();
        for (net, addr) in networks {
            let s = bind_udp(*addr)
                .map_err(|e| io::Error::new(e.kind(), format!("heartbeat network {net} ({addr}): {e}")))?;
            sockets.insert(net.clone(), Arc::new(s));
        }
        Ok(Self::with_sockets(name, role, params, sockets, networks.clone()))
    }

    /// An agent over sockets the caller made (the simulation's).
    pub fn with_sockets(
        name: &str,
        role: Role,
        params: Params,
        sockets: BTreeMap<NetName, Arc<dyn DatagramSocket>>,
        addrs: BTreeMap<NetName, SocketAddr>,
    ) -> (Arc<Agent>, mpsc::Receiver<Notice>) {
        let (tx, rx) = mpsc::channel(64);
        let agent = Agent {
            name: name.to_string(),
            role,
            params,
            sockets,
            addrs,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                me: None,
                view: None,
                cache: ViewCache::new(None),
                targets: BTreeMap::new(),
                view_sources: BTreeSet::new(),
                counters: Counters::default(),
                period_started: None,
                key: None,
                last_seq: BTreeMap::new(),
                silent: false,
            }),
            notices: tx,
            rtt_observer: std::sync::OnceLock::new(),
        };
        (Arc::new(agent), rx)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        herd_raft::clock::ms_since(self.started)
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// This node's own heartbeat addresses (published in its replicated record).
    pub fn addrs(&self) -> &BTreeMap<NetName, SocketAddr> {
        &self.addrs
    }

    /// Sets this node's id and cluster (after init, join or resume): from then on it answers
    /// pulses of that cluster, and a coordinator starts its own view.
    pub fn set_identity(&self, node_id: NodeId, cluster_id: &str) {
        let mut g = self.lock();
        if g.silent {
            return;
        }
        g.me = Some((node_id, cluster_id.to_string()));
        g.cache.set_me(node_id);
        if self.role == Role::Coordinator && g.view.as_ref().is_none_or(|v| v.me() != node_id) {
            let first = herd_raft::clock::wall_ms() / self.params.interval_ms.max(1);
            g.view = Some(OwnView::new(node_id, self.params.clone()).starting_at(first));
        }
        let targets = g.targets.clone();
        drop(g);
        self.set_targets(targets.into_values().collect());
    }

    /// Falls silent for good: no pulse or answer leaves this node again. For a node the cluster
    /// refused (its log went backwards): it takes no part in Raft and runs its VMs unmanaged,
    /// so its peers must find it dead, fence it through its BMC and recover its VMs — as they
    /// would a hung host.
    pub fn fall_silent(&self) {
        let mut g = self.lock();
        if !g.silent {
            tracing::error!(
                "heartbeat: falling silent (this node is refused): the cluster will fence it and run its VMs elsewhere"
            );
        }
        g.silent = true;
        g.me = None;
        g.view = None;
    }

    /// Sets the cluster's heartbeat key (a TLS cluster's members receive it when they join):
    /// from then on datagrams are tagged, untagged or mis-tagged ones dropped, replays dropped.
    pub fn set_key(&self, key: Option<Key>) {
        let mut g = self.lock();
        g.key = key;
        g.last_seq.clear();
    }

    /// Sets the nodes to watch (from the replicated node records).
    pub fn set_targets(&self, targets: Vec<Target>) {
        let now = self.now_ms();
        let mut g = self.lock();
        let pairs: BTreeSet<(NodeId, NetName)> = targets
            .iter()
            .flat_map(|t| t.addrs.keys().filter(|n| self.sockets.contains_key(*n)).map(move |n| (t.id, n.clone())))
            .collect();
        if let Some(v) = g.view.as_mut() {
            v.set_targets(&pairs, now);
        }
        g.targets = targets.into_iter().map(|t| (t.id, t)).collect();
    }

    /// Sets the coordinators whose views count although they are not watched (fenced ones).
    pub fn set_view_sources(&self, ids: BTreeSet<NodeId>) {
        self.lock().view_sources = ids;
    }

    /// Starts the receive loops (every node) and the pulse loop (coordinators).
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) {
        for (net, socket) in &self.sockets {
            herd_storage::types::spawn(self.clone().receive(net.clone(), socket.clone(), shutdown.clone()));
        }
        if self.role == Role::Coordinator {
            herd_storage::types::spawn(self.clone().pulse(shutdown));
        }
    }

    async fn receive(
        self: Arc<Self>,
        net: NetName,
        socket: Arc<dyn DatagramSocket>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            let got = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                r = socket.recv_from(&mut buf) => r,
            };
            let (mut n, mut src) = match got {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors surface here on some systems; never spin on them.
                    tracing::debug!(%net, "heartbeat receive: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Handle this datagram and whatever else is already waiting, then sleep again.
            for _ in 0..BURST {
                let reply = self.handle(&net, &buf[..n], n > MAX_DATAGRAM);
                if let Some(bytes) = reply {
                    let sent = socket.send_to(&bytes, src).await;
                    let mut g = self.lock();
                    match sent {
                        Ok(_) => g.counters.answers_sent += 1,
                        Err(_) => g.counters.send_errors += 1,
                    }
                }
                match socket.try_recv_from(&mut buf) {
                    Ok((m, s)) => (n, src) = (m, s),
                    Err(_) => break,
                }
            }
        }
    }

    /// Handles one datagram; returns the answer to send back, if any.
    fn handle(&self, net: &str, bytes: &[u8], oversized: bool) -> Option<Vec<u8>> {
        let now = self.now_ms();
        let mut events = Vec::new();
        let mut rtt = None;
        let reply = {
            let mut g = self.lock();
            let Some((me, cluster_id)) = g.me.clone() else {
                g.counters.foreign += 1;
                return None;
            };
            let key = g.key;
            let d = if oversized { Err(DropReason::Malformed) } else { wire::decode(bytes, &cluster_id, key.as_ref()) };
            let d = match d {
                Ok(d) => d,
                Err(DropReason::Malformed) => {
                    g.counters.malformed += 1;
                    return None;
                }
                Err(DropReason::Foreign) => {
                    g.counters.foreign += 1;
                    return None;
                }
                Err(DropReason::Unauthenticated) => {
                    g.counters.unauthenticated += 1;
                    return None;
                }
            };
            match d.body {
                Body::Pulse { from, net: pulse_net, seq, summary } => {
                    if pulse_net != net || summary.coordinator != from {
                        g.counters.malformed += 1;
                        return None;
                    }
                    // Only coordinators of this cluster's records pulse: anything else is not
                    // answered (no reflection) and never enters the view cache.
                    let coordinator = g.targets.get(&from).is_some_and(|t| t.role == Role::Coordinator)
                        || g.view_sources.contains(&from);
                    if !coordinator {
                        g.counters.foreign += 1;
                        return None;
                    }
                    if !Self::fresh(&mut g, false, from, net, seq, now, self.params.history_ms) {
                        return None;
                    }
                    g.counters.pulses_received += 1;
                    let watched = g.targets.contains_key(&from);
                    if let (Some(v), true) = (g.view.as_mut(), watched) {
                        events.extend(v.on_pulse(from, net, now));
                    }
                    g.cache.store(summary, 0, now, self.params.history_ms);
                    let relayed = g.cache.pick_for(from, seq, self.params.history_ms, now);
                    let answer = Datagram {
                        magic: MAGIC,
                        version: VERSION,
                        cluster_id,
                        body: Body::Answer { from: me, to: from, net: net.to_string(), seq, relayed },
                    };
                    wire::encode(&answer, key.as_ref())
                }
                Body::Answer { from, to, net: answer_net, seq, relayed } => {
                    if to != me || answer_net != net || !g.targets.contains_key(&from) {
                        g.counters.foreign += 1;
                        return None;
                    }
                    if !Self::fresh(&mut g, true, from, net, seq, now, self.params.history_ms) {
                        return None;
                    }
                    g.counters.answers_received += 1;
                    let started = g.period_started;
                    if let Some(v) = g.view.as_mut() {
                        if seq == v.seq() {
                            rtt = started.map(|t| t.elapsed());
                        }
                        events.extend(v.on_answer(from, net, seq, now));
                    }
                    if let Some(r) = relayed {
                        let c = r.summary.coordinator;
                        if g.targets.get(&c).is_some_and(|t| t.role == Role::Coordinator) || g.view_sources.contains(&c)
                        {
                            g.cache.store(r.summary, r.age_ms, now, self.params.history_ms);
                        }
                    }
                    None
                }
            }
        };
        self.log_events(&events);
        if let (Some(d), Some(f)) = (rtt, self.rtt_observer.get()) {
            f(d);
        }
        reply
    }

    /// The replay check of an authenticated datagram: its sequence number must be above the
    /// last one accepted from that sender on that network. A sender silent for `history_ms`
    /// starts afresh (a coordinator restarted on a clock that went back must not stay deaf to
    /// us for ever; a replay then can at most make a silent node look alive for a moment,
    /// which delays a fence and never causes one). Without a key, every datagram is fresh.
    fn fresh(g: &mut Inner, answer: bool, from: NodeId, net: &str, seq: u64, now: u64, history_ms: u64) -> bool {
        if g.key.is_none() {
            return true;
        }
        let slot = (answer, from, net.to_string());
        if let Some(&(last, at)) = g.last_seq.get(&slot) {
            if seq <= last && now.saturating_sub(at) < history_ms {
                g.counters.replayed += 1;
                return false;
            }
        }
        g.last_seq.insert(slot, (seq, now));
        true
    }

    async fn pulse(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.params.interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                _ = ticker.tick() => {}
            }
            let now = self.now_ms();
            let (events, batches) = {
                let mut g = self.lock();
                let Some((me, cluster_id)) = g.me.clone() else { continue };
                let key = g.key;
                let Some(view) = g.view.as_mut() else { continue };
                let events = view.tick(now);
                let seq = view.seq();
                let summary = view.wire_summary(now);
                let mut batches = Vec::new();
                for net in self.sockets.keys() {
                    let pulse = Datagram {
                        magic: MAGIC,
                        version: VERSION,
                        cluster_id: cluster_id.clone(),
                        body: Body::Pulse { from: me, net: net.clone(), seq, summary: summary.clone() },
                    };
                    let Some(bytes) = wire::encode(&pulse, key.as_ref()) else { continue };
                    let to: Vec<SocketAddr> =
                        g.targets.values().filter(|t| t.id != me).filter_map(|t| t.addrs.get(net).copied()).collect();
                    batches.push((net.clone(), bytes, to));
                }
                (events, batches)
            };
            self.log_events(&events);
            self.lock().period_started = Some(Instant::now());
            let (mut sent, mut failed) = (0u64, 0u64);
            for (net, bytes, to) in &batches {
                let Some(socket) = self.sockets.get(net) else { continue };
                let n = socket.send_many(bytes, to).await;
                sent += n as u64;
                failed += (to.len() - n.min(to.len())) as u64;
            }
            let mut g = self.lock();
            g.counters.pulses_sent += sent;
            g.counters.send_errors += failed;
        }
    }

    fn name_of(&self, id: NodeId) -> String {
        self.lock().targets.get(&id).map_or_else(|| format!("node {id}"), |t| t.name.clone())
    }

    /// One log line per transition, never per pulse; MNFA changes also become notices.
    fn log_events(&self, events: &[Event]) {
        // A rack or a switch lost at 1000 hosts is 1000 transitions in one tick: the first
        // few are named, the rest counted in one line (a line per host flooded the log with
        // 36 000 lines a minute when the benchmark's heartbeat collapsed).
        let mut links = 0usize;
        let mut unnamed: BTreeMap<(NetName, LinkState, LinkState), usize> = BTreeMap::new();
        for e in events {
            match e {
                Event::Link { net, from, to, .. } if links >= LINKS_NAMED_PER_TICK => {
                    *unnamed.entry((net.clone(), *from, *to)).or_default() += 1;
                }
                Event::Link { host, net, from, to } => {
                    links += 1;
                    let host = self.name_of(*host);
                    if *to == LinkState::Ok {
                        tracing::info!("heartbeat: {host} on {net}: {} -> {}", from.as_str(), to.as_str());
                    } else {
                        tracing::warn!("heartbeat: {host} on {net}: {} -> {}", from.as_str(), to.as_str());
                    }
                }
                Event::Isolated { net, isolated } => {
                    if *isolated {
                        tracing::warn!("heartbeat: this coordinator hears no host on {net}: isolated there");
                    } else {
                        tracing::info!("heartbeat: this coordinator hears hosts on {net} again");
                    }
                }
                Event::Mnfa { net, active, hosts, threshold } => {
                    let message = if *active {
                        format!("MNFA entered on {net}: {hosts} hosts failed within one window (threshold {threshold}); failure verdicts suspended")
                    } else {
                        format!("MNFA left on {net}: {hosts} hosts still failing (threshold {threshold})")
                    };
                    tracing::warn!("heartbeat: {message}");
                    let kind = if *active { "mnfa-enter" } else { "mnfa-exit" };
                    if self.notices.try_send(Notice { kind, message }).is_err() {
                        tracing::warn!("heartbeat: notice queue full; an MNFA event was not recorded");
                    }
                }
            }
        }
        for ((net, from, to), n) in unnamed {
            if to == LinkState::Ok {
                tracing::info!("heartbeat: {n} more hosts on {net}: {} -> {}", from.as_str(), to.as_str());
            } else {
                tracing::warn!("heartbeat: {n} more hosts on {net}: {} -> {}", from.as_str(), to.as_str());
            }
        }
    }

    /// Every view this node holds, its own (if a coordinator) first.
    fn inputs(g: &Inner, now: u64) -> (Option<Summary>, Vec<(&Summary, u64)>) {
        let own = g.view.as_ref().map(|v| v.summary(now, usize::MAX));
        (own, g.cache.views(now))
    }

    /// The verdict for every known node (by id).
    pub fn verdicts(&self) -> BTreeMap<NodeId, HostVerdict> {
        let now = self.now_ms();
        let g = self.lock();
        let (own, peers) = Self::inputs(&g, now);
        let mut inputs: Vec<ViewInput<'_>> =
            peers.iter().map(|(s, age)| ViewInput { summary: s, age_ms: *age }).collect();
        if crate::breakage::is(crate::breakage::Breakage::FenceOnOwnView) {
            inputs.clear();
        }
        if let Some(o) = own.as_ref() {
            inputs.push(ViewInput { summary: o, age_ms: 0 });
        }
        let hosts: BTreeMap<NodeId, BTreeSet<NetName>> =
            g.targets.values().map(|t| (t.id, t.addrs.keys().cloned().collect())).collect();
        verdict::verdicts(&hosts, &inputs, &self.params)
    }

    /// Evidence that `host` ran within the last `within_ms`: an answer to one of this
    /// coordinator's pulses sent in that time, or another coordinator's view of that age which
    /// hears it (the criss-cross). Never this coordinator's own view: after a restart it has
    /// not yet counted the misses that make a host lost, which is no evidence of life.
    pub fn heard_within(&self, host: NodeId, within_ms: u64) -> Option<String> {
        let now = self.now_ms();
        let g = self.lock();
        // The view records an answer only to the current period's pulse (a late answer to an
        // older one is no evidence of when the host ran).
        let last = g.view.as_ref().and_then(|v| {
            v.links()
                .range((host, String::new())..)
                .take_while(|((h, _), _)| *h == host)
                .filter_map(|(_, l)| l.last_heard_ms)
                .max()
        });
        if let Some(ago) = last.map(|t| now.saturating_sub(t)).filter(|ago| *ago < within_ms) {
            return Some(format!("it answered this coordinator's pulse {ago} ms ago"));
        }
        let nets: BTreeSet<NetName> = g.targets.get(&host)?.addrs.keys().cloned().collect();
        let peers = g.cache.views(now);
        let inputs: Vec<ViewInput<'_>> = peers
            .iter()
            .filter(|(s, _)| g.me.as_ref().is_none_or(|(me, _)| s.coordinator != *me))
            .map(|(s, age)| ViewInput { summary: s, age_ms: *age })
            .collect();
        let within = within_ms.min(self.params.history_ms);
        let heard = verdict::heard_in_views(host, &nets, &inputs, within);
        heard.first().map(|(c, age)| format!("coordinator {c}'s view, {age} ms old, hears it"))
    }

    /// Whether MNFA is active on some network in some fresh view (no loss verdicts then).
    pub fn mnfa_active(&self) -> bool {
        let now = self.now_ms();
        let g = self.lock();
        let (own, peers) = Self::inputs(&g, now);
        let mut inputs: Vec<ViewInput<'_>> =
            peers.iter().map(|(s, age)| ViewInput { summary: s, age_ms: *age }).collect();
        if let Some(o) = own.as_ref() {
            inputs.push(ViewInput { summary: o, age_ms: 0 });
        }
        verdict::mnfa_networks(&inputs, &self.params).values().any(|on| *on)
    }
}
