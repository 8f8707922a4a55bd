//! The cluster links between machines as the faults left them, composed.
//!
//! turmoil keeps one state per link and each call replaces it: a `release` (the end of a
//! pause) makes a link healthy even while a partition that began meanwhile is still on, and a
//! `hold` turns a cut link into a held one. Overlapping faults then did less than they said
//! (an isolated node reachable again, seed 5 of the CI set: `Isolated(c3)` undone by the end
//! of an earlier pause of c3). Here each directed link counts the faults cutting it and each
//! pair the faults holding it, and turmoil is told the state they compose to after every
//! change: cut wins over held, held over healthy; a link that becomes healthy delivers what
//! was held (as the end of a pause does). The `served-in-contact` invariant reads the cuts.

use std::collections::BTreeMap;

use turmoil::Sim;

use crate::world::World;

/// Faults in force on the links.
#[derive(Clone, Debug, Default)]
pub struct Links {
    /// Per directed link (from, to): the faults cutting it.
    cut: BTreeMap<(usize, usize), u32>,
    /// Per pair (lower index first): the faults holding it.
    held: BTreeMap<(usize, usize), u32>,
}

impl Links {
    /// Whether `from` cannot reach `to` now.
    pub fn is_cut(&self, from: usize, to: usize) -> bool {
        self.cut.get(&(from, to)).is_some_and(|n| *n > 0)
    }

    fn is_held(&self, a: usize, b: usize) -> bool {
        self.held.get(&pair(a, b)).is_some_and(|n| *n > 0)
    }

    /// What the faults on `a` ↔ `b` compose to.
    pub fn state(&self, a: usize, b: usize) -> Link {
        match (self.is_cut(a, b), self.is_cut(b, a)) {
            (true, true) => Link::Cut,
            (true, false) => Link::OneWay { from: a, to: b, held: self.is_held(a, b) },
            (false, true) => Link::OneWay { from: b, to: a, held: self.is_held(a, b) },
            (false, false) if self.is_held(a, b) => Link::Held,
            (false, false) => Link::Healthy,
        }
    }
}

/// A link's composed state, as turmoil is told it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Healthy,
    Held,
    /// `from` cannot reach `to`; the other way healthy, or held.
    OneWay {
        from: usize,
        to: usize,
        held: bool,
    },
    Cut,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn bump(map: &mut BTreeMap<(usize, usize), u32>, key: (usize, usize), up: bool) {
    let n = map.entry(key).or_insert(0);
    *n = if up { n.saturating_add(1) } else { n.saturating_sub(1) };
    if *n == 0 {
        map.remove(&key);
    }
}

/// Cuts `from` → `to` (one more fault cutting it).
pub fn cut_oneway(sim: &mut Sim<'_>, world: &World, from: usize, to: usize) {
    bump(&mut world.lock().links.cut, (from, to), true);
    settle(sim, world, from, to);
}

/// Ends one fault cutting `from` → `to`.
pub fn mend_oneway(sim: &mut Sim<'_>, world: &World, from: usize, to: usize) {
    bump(&mut world.lock().links.cut, (from, to), false);
    settle(sim, world, from, to);
}

/// Cuts `a` ↔ `b` both ways.
pub fn cut(sim: &mut Sim<'_>, world: &World, a: usize, b: usize) {
    {
        let mut w = world.lock();
        bump(&mut w.links.cut, (a, b), true);
        bump(&mut w.links.cut, (b, a), true);
    }
    settle(sim, world, a, b);
}

/// Ends one fault cutting `a` ↔ `b`.
pub fn mend(sim: &mut Sim<'_>, world: &World, a: usize, b: usize) {
    {
        let mut w = world.lock();
        bump(&mut w.links.cut, (a, b), false);
        bump(&mut w.links.cut, (b, a), false);
    }
    settle(sim, world, a, b);
}

/// Holds `a` ↔ `b` (messages kept, delivered when it is healthy again).
pub fn hold(sim: &mut Sim<'_>, world: &World, a: usize, b: usize) {
    bump(&mut world.lock().links.held, pair(a, b), true);
    settle(sim, world, a, b);
}

/// Ends one fault holding `a` ↔ `b`.
pub fn release(sim: &mut Sim<'_>, world: &World, a: usize, b: usize) {
    bump(&mut world.lock().links.held, pair(a, b), false);
    settle(sim, world, a, b);
}

/// Every fault on every link over: all healthy, what was held delivered.
pub fn clear(sim: &mut Sim<'_>, world: &World) {
    let n = world.len();
    world.lock().links = Links::default();
    for a in 0..n {
        for b in (a + 1)..n {
            settle(sim, world, a, b);
        }
    }
}

/// Tells turmoil the state the faults on `a` ↔ `b` compose to.
fn settle(sim: &mut Sim<'_>, world: &World, a: usize, b: usize) {
    let state = world.lock().links.state(a, b);
    let name = |i: usize| world.name(i);
    match state {
        Link::Cut => sim.partition(name(a).as_str(), name(b).as_str()),
        Link::Held => sim.hold(name(a).as_str(), name(b).as_str()),
        Link::Healthy => sim.release(name(a).as_str(), name(b).as_str()),
        Link::OneWay { from, to, held } => {
            if held {
                sim.hold(name(a).as_str(), name(b).as_str());
            } else {
                sim.release(name(a).as_str(), name(b).as_str());
            }
            sim.partition_oneway(name(from).as_str(), name(to).as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_on_a_link_compose_cut_over_held_over_healthy() {
        let mut l = Links::default();
        assert_eq!(l.state(0, 2), Link::Healthy);
        bump(&mut l.held, pair(2, 0), true);
        assert_eq!(l.state(0, 2), Link::Held);
        bump(&mut l.cut, (0, 2), true);
        bump(&mut l.cut, (2, 0), true);
        assert_eq!(l.state(2, 0), Link::Cut, "a cut during a pause cuts");
        bump(&mut l.held, pair(0, 2), false);
        assert_eq!(l.state(0, 2), Link::Cut, "the pause's end leaves the cut on (turmoil's release would not)");
        bump(&mut l.cut, (0, 2), true);
        bump(&mut l.cut, (0, 2), false);
        bump(&mut l.cut, (2, 0), false);
        assert_eq!(l.state(0, 2), Link::OneWay { from: 0, to: 2, held: false }, "two faults cut 0 → 2, one ended");
        bump(&mut l.cut, (0, 2), false);
        assert_eq!(l.state(0, 2), Link::Healthy);
        assert!(!l.is_cut(0, 2) && !l.is_cut(2, 0));
    }
}
