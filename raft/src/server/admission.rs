//! Who gets a connection on the cluster port, and what is counted when one is turned away.
//!
//! Capacity is split before the handshake by the source address: hosts that the membership
//! names (members' advertised addresses) draw on the member pool, every other host on a small
//! stranger pool with its own per-host cap. Strangers (joiners, scanners, attackers) can
//! therefore never take a member's capacity. A stranger that proves itself a member with its
//! certificate moves to the member pool; one without a certificate may send one join request
//! and is then closed. Hosts that keep presenting wrong join tokens are refused for a while.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Why the cluster port turned a connection or a request away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Members' connections at their cap (in all, or from this host).
    MemberCapacity,
    /// Strangers' connections at their cap (in all, or from this host).
    StrangerCapacity,
    /// A host refused for a while after repeated wrong join tokens.
    Throttled,
    /// The TLS handshake failed (another cluster's CA, a wrong name, not TLS at all).
    Handshake,
    /// No handshake, or no request from a stranger, within its deadline.
    Timeout,
    /// A removed node's certificate.
    Revoked,
    /// A request the peer may not send (anything but a join without a certificate, a
    /// certificate speaking for another node).
    Unauthenticated,
    /// A join with a wrong token.
    BadToken,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::MemberCapacity,
        Refusal::StrangerCapacity,
        Refusal::Throttled,
        Refusal::Handshake,
        Refusal::Timeout,
        Refusal::Revoked,
        Refusal::Unauthenticated,
        Refusal::BadToken,
    ];

    /// The metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MemberCapacity => "member-capacity",
            Refusal::StrangerCapacity => "stranger-capacity",
            Refusal::Throttled => "throttled",
            Refusal::Handshake => "tls-handshake",
            Refusal::Timeout => "timeout",
            Refusal::Revoked => "revoked",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::BadToken => "bad-token",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Refusals are logged at most this often per kind, with the count since the last line.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the cluster port counts; read by the metrics endpoint.
#[derive(Default)]
pub struct PortStats {
    refused: [AtomicU64; 8],
    members: AtomicU64,
    strangers: AtomicU64,
    /// Per kind: when it was last logged and how many since.
    log: Mutex<[(Option<Instant>, u64); 8]>,
}

impl PortStats {
    /// Refusals of `reason` since start.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    /// Connections admitted since start: (members, anonymous strangers).
    pub fn admitted(&self) -> (u64, u64) {
        (self.members.load(Ordering::Relaxed), self.strangers.load(Ordering::Relaxed))
    }

    pub(crate) fn admit(&self, member: bool) {
        let c = if member { &self.members } else { &self.strangers };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal and logs it, at most one line per kind every [`WARN_EVERY`].
    pub(crate) fn refuse(&self, reason: Refusal, peer: &str, detail: &str) {
        let i = reason.index();
        self.refused[i].fetch_add(1, Ordering::Relaxed);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let (last, since) = &mut log[i];
        *since += 1;
        if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(%peer, refused = *since, reason = reason.as_str(), "cluster port: refused: {detail}");
            *last = Some(Instant::now());
            *since = 0;
        }
    }
}

/// Connections in one class: a cap in all and one per source host.
pub(crate) struct Pool {
    max: usize,
    max_per_host: usize,
    counts: Mutex<(usize, BTreeMap<String, usize>)>,
}

/// One connection's place in a pool, given back on drop.
pub(crate) struct Slot {
    pool: Arc<Pool>,
    host: String,
}

impl Pool {
    pub(crate) fn new(max: usize, max_per_host: usize) -> Arc<Pool> {
        Arc::new(Pool { max, max_per_host, counts: Mutex::new((0, BTreeMap::new())) })
    }

    pub(crate) fn try_take(self: &Arc<Self>, host: &str) -> Option<Slot> {
        let mut g = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, hosts) = &mut *g;
        let n = hosts.get(host).copied().unwrap_or(0);
        if *total >= self.max || n >= self.max_per_host {
            return None;
        }
        *total += 1;
        hosts.insert(host.to_string(), n + 1);
        Some(Slot { pool: self.clone(), host: host.to_string() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.pool.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (total, hosts) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = hosts.get_mut(&self.host) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                hosts.remove(&self.host);
            }
        }
    }
}

/// Wrong join tokens from one host within [`Throttle::WINDOW`] before the host is refused.
const MAX_BAD_TOKENS: usize = 5;
/// Hosts remembered at most (the oldest entries are forgotten first).
const MAX_HOSTS: usize = 4096;

/// Per-host memory of wrong join tokens.
#[derive(Default)]
pub(crate) struct Throttle(Mutex<BTreeMap<String, VecDeque<Instant>>>);

impl Throttle {
    pub(crate) const WINDOW: Duration = Duration::from_secs(60);

    /// Whether `host` is refused now.
    pub(crate) fn blocked(&self, host: &str, now: Instant) -> bool {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(host)
            .is_some_and(|f| f.iter().filter(|t| now.duration_since(**t) < Self::WINDOW).count() >= MAX_BAD_TOKENS)
    }

    pub(crate) fn bad_token(&self, host: &str, now: Instant) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() >= MAX_HOSTS && !g.contains_key(host) {
            g.retain(|_, f| f.back().is_some_and(|t| now.duration_since(*t) < Self::WINDOW));
            if g.len() >= MAX_HOSTS {
                let oldest = g.iter().min_by_key(|(_, f)| f.back().copied()).map(|(h, _)| h.clone());
                if let Some(h) = oldest {
                    g.remove(&h);
                }
            }
        }
        let f = g.entry(host.to_string()).or_default();
        while f.front().is_some_and(|t| now.duration_since(*t) >= Self::WINDOW) {
            f.pop_front();
        }
        f.push_back(now);
        while f.len() > MAX_BAD_TOKENS {
            f.pop_front();
        }
    }
}

/// The host part of `host:port` (the whole string if it has no port).
pub fn peer_host(peer: &str) -> &str {
    match peer.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_counted_by_host_not_by_port() {
        assert_eq!(peer_host("127.0.0.1:4000"), "127.0.0.1");
        assert_eq!(peer_host("[::1]:4000"), "[::1]");
        assert_eq!(peer_host("sim-node"), "sim-node");
    }

    #[test]
    fn a_pool_caps_per_host_and_in_all_and_gives_slots_back() {
        let p = Pool::new(3, 2);
        let a1 = p.try_take("a");
        let a2 = p.try_take("a");
        assert!(a1.is_some() && a2.is_some());
        assert!(p.try_take("a").is_none(), "per-host cap");
        let b1 = p.try_take("b");
        assert!(b1.is_some());
        assert!(p.try_take("c").is_none(), "total cap");
        drop(a1);
        assert!(p.try_take("c").is_some(), "a dropped slot is free again");
    }

    #[test]
    fn wrong_tokens_block_a_host_for_the_window_only() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for _ in 0..MAX_BAD_TOKENS - 1 {
            t.bad_token("x", t0);
        }
        assert!(!t.blocked("x", t0));
        t.bad_token("x", t0);
        assert!(t.blocked("x", t0));
        assert!(!t.blocked("y", t0), "other hosts are not affected");
        assert!(!t.blocked("x", t0 + Throttle::WINDOW), "forgiven after the window");
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let s = PortStats::default();
        s.refuse(Refusal::BadToken, "p", "wrong token");
        s.refuse(Refusal::BadToken, "p", "wrong token");
        s.refuse(Refusal::Handshake, "p", "bad ca");
        assert_eq!(s.refused(Refusal::BadToken), 2);
        assert_eq!(s.refused(Refusal::Handshake), 1);
        assert_eq!(s.refused(Refusal::Throttled), 0);
    }
}
