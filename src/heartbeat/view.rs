//! One coordinator's own view: per (host, network) consecutive misses and state, the cluster
//! history ring (which hosts answered in each period, per network), isolation and MNFA.
//!
//! Pure: the agent feeds it answers and period ticks with `now_ms`; it returns the events to log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use herd_storage::model::NodeId;
use serde::Serialize;

use super::wire::{Missing, NetSummary, Summary, MAX_MISSING};
use super::{LinkState, NetName, Params};

/// One (host, network) link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Link {
    pub misses: u32,
    pub state: LinkState,
    pub last_heard_ms: Option<u64>,
    pub state_since_ms: u64,
}

/// One closed period of the history ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Period {
    pub seq: u64,
    pub at_ms: u64,
    /// Per network: how many hosts were pulsed, and which answered.
    pub nets: BTreeMap<NetName, PeriodNet>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeriodNet {
    pub enabled: u32,
    pub responding: Vec<NodeId>,
}

/// Something worth one log line (state changes only, never per pulse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Link { host: NodeId, net: NetName, from: LinkState, to: LinkState },
    Isolated { net: NetName, isolated: bool },
    Mnfa { net: NetName, active: bool, hosts: usize, threshold: usize },
}

#[derive(Clone, Debug, Default)]
struct Mnfa {
    active: bool,
    since_ms: u64,
    /// When hosts left `ok` on this network, within the window.
    went_bad: VecDeque<(u64, NodeId)>,
}

/// A coordinator's own view.
#[derive(Clone, Debug)]
pub struct OwnView {
    me: NodeId,
    params: Params,
    links: BTreeMap<(NodeId, NetName), Link>,
    answered: BTreeSet<(NodeId, NetName)>,
    seq: u64,
    started: bool,
    history: VecDeque<Period>,
    isolated: BTreeSet<NetName>,
    mnfa: BTreeMap<NetName, Mnfa>,
    /// Answers for another period than the current one.
    pub late: u64,
    /// Answers from a (host, network) this view does not pulse.
    pub unexpected: u64,
}

impl OwnView {
    pub fn new(me: NodeId, params: Params) -> Self {
        OwnView {
            me,
            params,
            links: BTreeMap::new(),
            answered: BTreeSet::new(),
            seq: 0,
            started: false,
            history: VecDeque::new(),
            isolated: BTreeSet::new(),
            mnfa: BTreeMap::new(),
            late: 0,
            unexpected: 0,
        }
    }

    /// Starts counting periods at `seq` instead of 0. The agent starts from its wall clock in
    /// periods, so that a coordinator's counter keeps growing across restarts: its peers order
    /// its summaries by it (`ViewCache::store`), and a summary from before a restart, delivered
    /// late, must not pass for newer than the first ones after it. Only this node's own clock
    /// is involved: peers compare its counters with each other, never with their own.
    pub fn starting_at(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The current period's sequence number (what pulses carry).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn links(&self) -> &BTreeMap<(NodeId, NetName), Link> {
        &self.links
    }

    pub fn history(&self) -> &VecDeque<Period> {
        &self.history
    }

    pub fn is_isolated(&self, net: &str) -> bool {
        self.isolated.contains(net)
    }

    pub fn mnfa_active(&self, net: &str) -> bool {
        self.mnfa.get(net).is_some_and(|m| m.active)
    }

    /// Sets which (host, network) pairs to pulse. New pairs start `ok`; dropped pairs are forgotten.
    pub fn set_targets(&mut self, targets: &BTreeSet<(NodeId, NetName)>, now_ms: u64) {
        self.links.retain(|k, _| targets.contains(k));
        self.answered.retain(|k| targets.contains(k));
        for k in targets {
            if k.0 == self.me {
                continue;
            }
            self.links.entry(k.clone()).or_insert(Link {
                misses: 0,
                state: LinkState::Ok,
                last_heard_ms: None,
                state_since_ms: now_ms,
            });
        }
        let nets: BTreeSet<&NetName> = self.links.keys().map(|(_, n)| n).collect();
        self.mnfa.retain(|n, _| nets.contains(n));
        self.isolated.retain(|n| nets.contains(n));
        for m in self.mnfa.values_mut() {
            m.went_bad.retain(|(_, h)| targets.iter().any(|(th, _)| th == h));
        }
    }

    /// Records an answer to the pulse of period `seq`.
    pub fn on_answer(&mut self, host: NodeId, net: &str, seq: u64, now_ms: u64) -> Option<Event> {
        if seq != self.seq || !self.started {
            self.late += 1;
            return None;
        }
        let key = (host, net.to_string());
        let Some(link) = self.links.get_mut(&key) else {
            self.unexpected += 1;
            return None;
        };
        self.answered.insert(key);
        link.misses = 0;
        link.last_heard_ms = Some(now_ms);
        if link.state != LinkState::Ok {
            let from = link.state;
            link.state = LinkState::Ok;
            link.state_since_ms = now_ms;
            return Some(Event::Link { host, net: net.to_string(), from, to: LinkState::Ok });
        }
        None
    }

    /// Records a pulse from coordinator `host` on `net`: it is heard on that network in this
    /// period, as if it had answered (a coordinator whose own pulses arrive is alive even when
    /// this coordinator's pulses do not reach it — a one-way cut; found by the simulation,
    /// seed 1909, where such a coordinator was fenced by the one that kept hearing it).
    pub fn on_pulse(&mut self, host: NodeId, net: &str, now_ms: u64) -> Option<Event> {
        let seq = self.seq;
        self.on_answer(host, net, seq, now_ms)
    }

    fn state_for(&self, misses: u32) -> LinkState {
        if misses >= self.params.lost_after {
            LinkState::Lost
        } else if misses >= self.params.degraded_after {
            LinkState::Degraded
        } else {
            LinkState::Ok
        }
    }

    /// Closes the current period (every pair that did not answer gets a miss), records it in
    /// the history ring, updates isolation and MNFA, and opens the next period.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.started {
            // No pulse went out before the first tick: nothing to count.
            self.started = true;
            self.seq += 1;
            return events;
        }
        let mut period = Period { seq: self.seq, at_ms: now_ms, nets: BTreeMap::new() };
        let keys: Vec<(NodeId, NetName)> = self.links.keys().cloned().collect();
        for key in keys {
            let answered = self.answered.contains(&key);
            let new_state = match self.links.get(&key) {
                Some(l) if !answered => self.state_for(l.misses.saturating_add(1)),
                Some(l) => l.state,
                None => continue,
            };
            let Some(link) = self.links.get_mut(&key) else { continue };
            let entry = period.nets.entry(key.1.clone()).or_default();
            entry.enabled += 1;
            if answered {
                entry.responding.push(key.0);
                continue;
            }
            link.misses = link.misses.saturating_add(1);
            if new_state != link.state {
                let from = link.state;
                link.state = new_state;
                link.state_since_ms = now_ms;
                if from == LinkState::Ok {
                    self.mnfa.entry(key.1.clone()).or_default().went_bad.push_back((now_ms, key.0));
                }
                events.push(Event::Link { host: key.0, net: key.1.clone(), from, to: new_state });
            }
        }
        self.history.push_back(period);
        while self.history.len() > self.params.history_periods() {
            self.history.pop_front();
        }
        self.update_isolation(&mut events);
        self.update_mnfa(now_ms, &mut events);
        self.seq += 1;
        self.answered.clear();
        events
    }

    fn nets(&self) -> BTreeSet<NetName> {
        self.links.keys().map(|(_, n)| n.clone()).collect()
    }

    fn update_isolation(&mut self, events: &mut Vec<Event>) {
        for net in self.nets() {
            let on_net: Vec<&Link> = self.links.iter().filter(|((_, n), _)| *n == net).map(|(_, l)| l).collect();
            // With one host we cannot tell our own isolation from its death.
            let isolated = on_net.len() >= 2 && on_net.iter().all(|l| l.state == LinkState::Lost);
            let was = self.isolated.contains(&net);
            if isolated != was {
                if isolated {
                    self.isolated.insert(net.clone());
                } else {
                    self.isolated.remove(&net);
                }
                events.push(Event::Isolated { net, isolated });
            }
        }
    }

    fn update_mnfa(&mut self, now_ms: u64, events: &mut Vec<Event>) {
        let hosts: BTreeSet<NodeId> = self.links.keys().map(|(h, _)| *h).collect();
        // Coordinators count as hosts; this one too.
        let threshold = self.params.mnfa_effective(hosts.len() + 1);
        let window_start = now_ms.saturating_sub(self.params.history_ms);
        for net in self.nets() {
            let bad_now: BTreeSet<NodeId> = self
                .links
                .iter()
                .filter(|((_, n), l)| *n == net && l.state != LinkState::Ok)
                .map(|((h, _), _)| *h)
                .collect();
            let isolated = self.isolated.contains(&net);
            let m = self.mnfa.entry(net.clone()).or_default();
            while m.went_bad.front().is_some_and(|(t, _)| *t < window_start) {
                m.went_bad.pop_front();
            }
            // An observer that hears nobody on a network is the fault itself: it must not
            // suspend suspicion cluster-wide (one broken NIC would switch fencing off).
            if isolated {
                if m.active {
                    m.active = false;
                    events.push(Event::Mnfa { net, active: false, hosts: bad_now.len(), threshold });
                }
                continue;
            }
            let recent: BTreeSet<NodeId> = m.went_bad.iter().map(|(_, h)| *h).filter(|h| bad_now.contains(h)).collect();
            if !m.active && recent.len() >= threshold {
                m.active = true;
                m.since_ms = now_ms;
                events.push(Event::Mnfa { net, active: true, hosts: recent.len(), threshold });
            } else if m.active && bad_now.len() < threshold {
                m.active = false;
                events.push(Event::Mnfa { net, active: false, hosts: bad_now.len(), threshold });
            }
        }
    }

    /// The summary pulses carry: at most `cap` missing pairs (worst first).
    pub fn summary(&self, now_ms: u64, cap: usize) -> Summary {
        let last = self.history.back();
        let mut missing: Vec<(&NetName, Missing)> = self
            .links
            .iter()
            .filter(|(_, l)| l.misses >= 2)
            .map(|((h, n), l)| {
                (
                    n,
                    Missing {
                        host: *h,
                        state: l.state,
                        misses: l.misses,
                        last_heard_ago_ms: l.last_heard_ms.map(|t| now_ms.saturating_sub(t)),
                        state_for_ms: now_ms.saturating_sub(l.state_since_ms),
                    },
                )
            })
            .collect();
        // Worst first: lost before degraded; among the lost, the most recent failures first, so a
        // new failure is always reported even when long-dead hosts would fill the list.
        missing.sort_by(|a, b| {
            b.1.state
                .cmp(&a.1.state)
                .then_with(|| match a.1.state {
                    LinkState::Lost => a.1.state_for_ms.cmp(&b.1.state_for_ms),
                    _ => b.1.misses.cmp(&a.1.misses),
                })
                .then(a.1.host.cmp(&b.1.host))
        });
        let truncated_nets: BTreeSet<NetName> = missing.iter().skip(cap).map(|(n, _)| (*n).clone()).collect();
        missing.truncate(cap);
        let nets = self
            .nets()
            .into_iter()
            .map(|net| {
                let p = last.and_then(|p| p.nets.get(&net));
                NetSummary {
                    enabled: u32::try_from(self.links.keys().filter(|(_, n)| *n == net).count()).unwrap_or(u32::MAX),
                    responding: p.map_or(0, |p| u32::try_from(p.responding.len()).unwrap_or(u32::MAX)),
                    isolated: self.isolated.contains(&net),
                    mnfa: self.mnfa_active(&net),
                    missing: missing.iter().filter(|(n, _)| **n == net).map(|(_, m)| m.clone()).collect(),
                    truncated: truncated_nets.contains(&net),
                    net,
                }
            })
            .collect();
        Summary { coordinator: self.me, seq: self.seq, nets }
    }

    /// The summary that travels in pulses (bounded).
    pub fn wire_summary(&self, now_ms: u64) -> Summary {
        self.summary(now_ms, MAX_MISSING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(hosts: &[NodeId], nets: &[&str]) -> BTreeSet<(NodeId, NetName)> {
        hosts.iter().flat_map(|h| nets.iter().map(move |n| (*h, n.to_string()))).collect()
    }

    /// Runs `periods` periods in which `answering` answer on their networks.
    fn run(v: &mut OwnView, now: &mut u64, periods: u32, answering: &[(NodeId, &str)]) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..periods {
            let seq = v.seq();
            *now += 100;
            for (h, n) in answering {
                events.extend(v.on_answer(*h, n, seq, *now));
            }
            events.extend(v.tick(*now));
        }
        events
    }

    fn view(hosts: &[NodeId], nets: &[&str]) -> (OwnView, u64) {
        let mut v = OwnView::new(1, Params::default());
        v.set_targets(&targets(hosts, nets), 0);
        v.tick(0);
        (v, 0)
    }

    #[test]
    fn misses_walk_ok_degraded_lost_and_one_answer_clears() {
        let (mut v, mut now) = view(&[2, 3], &["mgmt"]);
        let both = [(2, "mgmt"), (3, "mgmt")];
        run(&mut v, &mut now, 3, &both);
        assert_eq!(v.links()[&(2, "mgmt".into())].state, LinkState::Ok);
        let ev = run(&mut v, &mut now, 6, &[(3, "mgmt")]);
        assert_eq!(ev, vec![Event::Link { host: 2, net: "mgmt".into(), from: LinkState::Ok, to: LinkState::Degraded }]);
        let ev = run(&mut v, &mut now, 4, &[(3, "mgmt")]);
        assert_eq!(
            ev,
            vec![Event::Link { host: 2, net: "mgmt".into(), from: LinkState::Degraded, to: LinkState::Lost }]
        );
        assert_eq!(v.links()[&(2, "mgmt".into())].misses, 10);
        let ev = run(&mut v, &mut now, 1, &both);
        assert_eq!(ev, vec![Event::Link { host: 2, net: "mgmt".into(), from: LinkState::Lost, to: LinkState::Ok }]);
    }

    #[test]
    fn a_coordinator_whose_pulses_arrive_is_heard_without_answering() {
        // 2 is a coordinator that cannot receive our pulses (a one-way cut) but whose own
        // pulses reach us every period: it is never lost; once they stop, it is.
        let (mut v, mut now) = view(&[2, 3], &["mgmt"]);
        for _ in 0..30 {
            now += 100;
            assert_eq!(v.on_pulse(2, "mgmt", now), None);
            let seq = v.seq();
            v.on_answer(3, "mgmt", seq, now);
            v.tick(now);
        }
        assert_eq!(v.links()[&(2, "mgmt".into())].state, LinkState::Ok);
        run(&mut v, &mut now, 10, &[(3, "mgmt")]);
        assert_eq!(v.links()[&(2, "mgmt".into())].state, LinkState::Lost);
        assert!(v.on_pulse(2, "mgmt", now).is_some(), "heard again: back to ok");
    }

    /// StarlingX decided from the newest sample alone; here one bad period never makes a host
    /// lost: only `lost_after` consecutive misses do.
    #[test]
    fn a_single_bad_period_is_not_a_loss() {
        let (mut v, mut now) = view(&[2, 3], &["mgmt"]);
        for i in 0..30 {
            let answering: &[(NodeId, &str)] = if i % 5 == 0 { &[(3, "mgmt")] } else { &[(2, "mgmt"), (3, "mgmt")] };
            run(&mut v, &mut now, 1, answering);
            assert_eq!(v.links()[&(2, "mgmt".into())].state, LinkState::Ok, "period {i}");
        }
    }

    #[test]
    fn late_answers_are_counted_not_credited() {
        let (mut v, mut now) = view(&[2, 3], &["mgmt"]);
        let old = v.seq();
        run(&mut v, &mut now, 1, &[(3, "mgmt")]);
        assert_eq!(v.on_answer(2, "mgmt", old, now), None);
        assert_eq!(v.late, 1);
        assert_eq!(v.links()[&(2, "mgmt".into())].misses, 1);
        assert_eq!(v.on_answer(9, "mgmt", v.seq(), now), None);
        assert_eq!(v.unexpected, 1);
    }

    /// StarlingX's ring index was "next write slot", read as "oldest" by SM. Here every period
    /// carries its own sequence number, and the ring keeps exactly the window, oldest first.
    #[test]
    fn the_history_ring_names_who_answered_in_order() {
        let (mut v, mut now) = view(&[2, 3], &["mgmt", "storage"]);
        run(&mut v, &mut now, 70, &[(2, "mgmt"), (3, "mgmt"), (3, "storage")]);
        let h = v.history();
        assert_eq!(h.len(), 50, "5000 ms / 100 ms");
        assert!(h.iter().zip(h.iter().skip(1)).all(|(a, b)| b.seq == a.seq + 1));
        assert_eq!(h.back().map(|p| p.seq), Some(v.seq() - 1));
        let last = h.back().expect("period");
        assert_eq!(last.nets["mgmt"].responding, vec![2, 3]);
        assert_eq!(last.nets["storage"].responding, vec![3]);
        assert_eq!(last.nets["storage"].enabled, 2);
    }

    #[test]
    fn a_coordinator_that_hears_nobody_on_a_network_is_isolated_there() {
        let (mut v, mut now) = view(&[2, 3, 4], &["mgmt", "storage"]);
        let mgmt_only = [(2, "mgmt"), (3, "mgmt"), (4, "mgmt")];
        let ev = run(&mut v, &mut now, 10, &mgmt_only);
        assert!(ev.contains(&Event::Isolated { net: "storage".into(), isolated: true }), "{ev:?}");
        assert!(v.is_isolated("storage") && !v.is_isolated("mgmt"));
        let s = v.wire_summary(now);
        assert!(s.net("storage").is_some_and(|n| n.isolated));
        let ev = run(&mut v, &mut now, 1, &[(2, "storage")]);
        assert!(ev.contains(&Event::Isolated { net: "storage".into(), isolated: false }));
    }

    #[test]
    fn mnfa_enters_when_enough_hosts_go_bad_in_one_window_and_exits_when_they_return() {
        // 6 hosts + me = 7: effective threshold max(2, ceil(7/3)) = 3.
        let hosts = [2, 3, 4, 5, 6, 7];
        let (mut v, mut now) = view(&hosts, &["mgmt", "storage"]);
        let all: Vec<(NodeId, &str)> = hosts.iter().flat_map(|h| [(*h, "mgmt"), (*h, "storage")]).collect();
        run(&mut v, &mut now, 5, &all);
        // Two hosts lose storage: under the threshold.
        let some: Vec<(NodeId, &str)> =
            all.iter().copied().filter(|(h, n)| !(*n == "storage" && (*h == 2 || *h == 3))).collect();
        run(&mut v, &mut now, 12, &some);
        assert!(!v.mnfa_active("storage"));
        // A third one within the window: MNFA on storage only.
        let fewer: Vec<(NodeId, &str)> = some.iter().copied().filter(|(h, n)| !(*n == "storage" && *h == 4)).collect();
        let ev = run(&mut v, &mut now, 7, &fewer);
        assert!(ev.iter().any(|e| matches!(e, Event::Mnfa { net, active: true, .. } if net == "storage")), "{ev:?}");
        assert!(v.mnfa_active("storage") && !v.mnfa_active("mgmt"));
        // Staying bad long after the window does not end MNFA (no "timer expired" exit).
        run(&mut v, &mut now, 100, &fewer);
        assert!(v.mnfa_active("storage"));
        assert!(v.wire_summary(now).net("storage").is_some_and(|n| n.mnfa));
        // Two of three return: the count drops below the threshold and MNFA ends.
        let back: Vec<(NodeId, &str)> = all.iter().copied().filter(|(h, n)| !(*n == "storage" && *h == 4)).collect();
        let ev = run(&mut v, &mut now, 1, &back);
        assert!(ev.iter().any(|e| matches!(e, Event::Mnfa { net, active: false, .. } if net == "storage")), "{ev:?}");
    }

    #[test]
    fn hosts_that_fail_far_apart_do_not_enter_mnfa() {
        let hosts = [2, 3, 4, 5, 6, 7];
        let (mut v, mut now) = view(&hosts, &["mgmt"]);
        let mut answering: Vec<(NodeId, &str)> = hosts.iter().map(|h| (*h, "mgmt")).collect();
        for dead in [2, 3, 4] {
            answering.retain(|(h, _)| *h != dead);
            run(&mut v, &mut now, 60, &answering); // 6 s apart: more than the 5 s window
            assert!(!v.mnfa_active("mgmt"), "after {dead}");
        }
    }

    #[test]
    fn the_summary_is_bounded_and_lists_the_worst_first() {
        let hosts: Vec<NodeId> = (2..300).collect();
        let (mut v, mut now) = view(&hosts, &["mgmt"]);
        let answering: Vec<(NodeId, &str)> = hosts.iter().filter(|h| **h >= 100).map(|h| (*h, "mgmt")).collect();
        run(&mut v, &mut now, 3, &answering);
        let s = v.wire_summary(now);
        let mgmt = s.net("mgmt").expect("mgmt");
        assert_eq!(mgmt.missing.len(), MAX_MISSING);
        assert!(mgmt.truncated);
        assert_eq!(mgmt.enabled, 298);
        assert_eq!(mgmt.responding, 200);
        assert!(mgmt.missing.iter().all(|m| m.misses == 3 && m.host < 100));
        assert_eq!(v.summary(now, usize::MAX).net("mgmt").map(|n| n.missing.len()), Some(98));
    }

    /// Long-dead hosts must not crowd a new failure out of the bounded summary.
    #[test]
    fn a_new_loss_is_listed_even_when_old_losses_fill_the_summary() {
        let hosts: Vec<NodeId> = (2..102).collect();
        let (mut v, mut now) = view(&hosts, &["mgmt"]);
        // 60 hosts dead long ago.
        let mut answering: Vec<(NodeId, &str)> = hosts.iter().filter(|h| **h >= 62).map(|h| (*h, "mgmt")).collect();
        run(&mut v, &mut now, 50, &answering);
        // Then host 90 dies.
        answering.retain(|(h, _)| *h != 90);
        run(&mut v, &mut now, 12, &answering);
        let s = v.wire_summary(now);
        let mgmt = s.net("mgmt").expect("mgmt");
        assert!(mgmt.truncated);
        assert_eq!(mgmt.missing.first().map(|m| (m.host, m.state)), Some((90, LinkState::Lost)));
    }

    #[test]
    fn an_isolated_coordinator_does_not_enter_mnfa() {
        let (mut v, mut now) = view(&[2, 3, 4, 5, 6, 7], &["mgmt", "storage"]);
        let mgmt_only: Vec<(NodeId, &str)> = (2..8).map(|h| (h, "mgmt")).collect();
        let ev = run(&mut v, &mut now, 15, &mgmt_only);
        assert!(v.is_isolated("storage"));
        assert!(!v.mnfa_active("storage"), "{ev:?}");
        assert!(v.wire_summary(now).net("storage").is_some_and(|n| !n.mnfa && n.isolated));
    }

    #[test]
    fn a_coordinator_never_pulses_itself() {
        let mut v = OwnView::new(1, Params::default());
        v.set_targets(&targets(&[1, 2], &["mgmt"]), 0);
        assert_eq!(v.links().len(), 1);
    }
}
