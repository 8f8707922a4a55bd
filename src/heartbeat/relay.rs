//! Every node's cache of coordinator views: filled from pulses (direct) and from answers
//! (relayed), rotated into answers, and read by the verdict. This is the criss-cross: a
//! coordinator learns each peer's view through every node, even with the direct link cut.

use std::collections::BTreeMap;

use herd_storage::model::NodeId;

use super::wire::{Relayed, Summary};

/// Coordinators whose views are kept (voters are at most 5; standbys add a few).
pub const MAX_VIEWS: usize = 16;

#[derive(Clone, Debug)]
struct Entry {
    summary: Summary,
    /// Local time the summary was made, as far as we can tell (receipt time minus its age).
    made_ms: u64,
}

/// The latest summary of each coordinator.
#[derive(Clone, Debug, Default)]
pub struct ViewCache {
    me: Option<NodeId>,
    entries: BTreeMap<NodeId, Entry>,
}

impl ViewCache {
    pub fn new(me: Option<NodeId>) -> Self {
        ViewCache { me, entries: BTreeMap::new() }
    }

    pub fn set_me(&mut self, me: NodeId) {
        self.me = Some(me);
        self.entries.remove(&me);
    }

    /// Stores a summary that was `age_ms` old when it arrived at `now_ms`, if it is newer than
    /// what is held for that coordinator. Never stores this node's own view.
    ///
    /// "Newer" is by the coordinator's own period counter, not by arrival: an answer held up in
    /// transit (a paused relay, a held link) carries a summary whose age was measured when it
    /// was *sent*, so it arrives looking fresh. Ordered by arrival, such a summary replaced a
    /// newer one (found by the simulation, seed 2214: a released burst put a coordinator's
    /// 1.7 s old "isolated" view in place of its current one, and a fence was decided on the
    /// remaining view alone). A lower counter is taken only once the held view is older than
    /// `fresh_ms` (the coordinator restarted and counts from 1 again). For the same summary
    /// the earliest creation estimate is kept (transit only ever makes it later).
    pub fn store(&mut self, summary: Summary, age_ms: u64, now_ms: u64, fresh_ms: u64) {
        if Some(summary.coordinator) == self.me {
            return;
        }
        let made_ms = now_ms.saturating_sub(age_ms);
        if let Some(e) = self.entries.get_mut(&summary.coordinator) {
            let held_fresh = now_ms.saturating_sub(e.made_ms) < fresh_ms;
            if summary.seq == e.summary.seq {
                e.made_ms = e.made_ms.min(made_ms);
                return;
            }
            if summary.seq < e.summary.seq && held_fresh {
                return;
            }
        }
        self.entries.insert(summary.coordinator, Entry { summary, made_ms });
        while self.entries.len() > MAX_VIEWS {
            let oldest = self.entries.iter().min_by_key(|(_, e)| e.made_ms).map(|(c, _)| *c);
            match oldest {
                Some(c) => self.entries.remove(&c),
                None => break,
            };
        }
    }

    /// Every held view with its age at `now_ms`.
    pub fn views(&self, now_ms: u64) -> Vec<(&Summary, u64)> {
        self.entries.values().map(|e| (&e.summary, now_ms.saturating_sub(e.made_ms))).collect()
    }

    /// The view to relay in an answer to coordinator `to` for period `seq`: one of the *other*
    /// coordinators' fresh views, rotating with `seq` so each travels in turn.
    pub fn pick_for(&self, to: NodeId, seq: u64, fresh_ms: u64, now_ms: u64) -> Option<Relayed> {
        let candidates: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| e.summary.coordinator != to && now_ms.saturating_sub(e.made_ms) < fresh_ms)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let pick = candidates[usize::try_from(seq % candidates.len() as u64).unwrap_or(0)];
        Some(Relayed { summary: pick.summary.clone(), age_ms: now_ms.saturating_sub(pick.made_ms) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(c: NodeId, seq: u64) -> Summary {
        Summary { coordinator: c, seq, nets: vec![] }
    }

    #[test]
    fn the_newest_view_wins_whatever_path_it_took() {
        let mut c = ViewCache::new(Some(9));
        c.store(s(1, 10), 0, 1000, 5000);
        c.store(s(1, 8), 300, 1100, 5000); // relayed, made at 800: older
        assert_eq!(c.views(1100)[0].0.seq, 10);
        c.store(s(1, 11), 50, 1200, 5000); // made at 1150: newer
        assert_eq!(c.views(1200)[0], (&s(1, 11), 50));
        c.store(s(9, 1), 0, 1200, 5000);
        assert_eq!(c.views(1200).len(), 1, "never its own view");
    }

    #[test]
    fn a_summary_late_in_transit_never_replaces_a_newer_one() {
        let mut c = ViewCache::new(Some(9));
        c.store(s(1, 135), 0, 13_500, 5000); // the direct pulse of period 135
                                             // A relayed answer held up 1.7 s: its age was measured when it was sent (20 ms), so it
                                             // looks made at 13 533 — later than the pulse. Its counter says otherwise.
        c.store(s(1, 119), 20, 13_553, 5000);
        assert_eq!(c.views(13_600)[0].0.seq, 135);
        // The same summary relayed: the earliest creation estimate stays.
        c.store(s(1, 135), 10, 13_560, 5000);
        assert_eq!(c.views(13_600)[0], (&s(1, 135), 100));
        // A restarted coordinator counts from 1 again: taken once the held view is stale.
        c.store(s(1, 2), 0, 14_000, 5000);
        assert_eq!(c.views(14_000)[0].0.seq, 135);
        c.store(s(1, 50), 0, 18_600, 5000);
        assert_eq!(c.views(18_600)[0].0.seq, 50);
    }

    #[test]
    fn answers_relay_other_coordinators_in_turn_and_never_stale_ones() {
        let mut c = ViewCache::new(Some(7));
        c.store(s(1, 1), 0, 1000, 5000);
        c.store(s(2, 1), 0, 1000, 5000);
        c.store(s(3, 1), 0, 0, 5000);
        let to_1: Vec<NodeId> =
            (0..4).filter_map(|seq| c.pick_for(1, seq, 5000, 1000)).map(|r| r.summary.coordinator).collect();
        assert!(!to_1.contains(&1));
        assert!(to_1.contains(&2) && to_1.contains(&3));
        // At 6000, 3's view (made at 0) is stale; 2's (made at 1000) is not.
        let late: Vec<NodeId> =
            (0..4).filter_map(|seq| c.pick_for(1, seq, 5000, 5500)).map(|r| r.summary.coordinator).collect();
        assert_eq!(late, vec![2, 2, 2, 2]);
        assert_eq!(c.pick_for(1, 0, 5000, 5500).map(|r| r.age_ms), Some(4500));
        assert!(c.pick_for(2, 0, 5000, 7000).is_none());
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = ViewCache::new(None);
        for i in 0..100 {
            c.store(s(i, 1), 0, i, 5000);
        }
        assert_eq!(c.views(100).len(), MAX_VIEWS);
        assert!(c.views(100).iter().all(|(v, _)| v.coordinator >= 100 - MAX_VIEWS as u64));
    }
}
