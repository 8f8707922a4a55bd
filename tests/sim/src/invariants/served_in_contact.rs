//! A coordinator cut off from every other coordinator acknowledges no session more than its
//! serving window after the cut began: the follower outside Raft gets no answer to a poll it
//! sent later from that coordinator.
//!
//! Why: a coordinator serves sessions only within a round trip with a leader whose quorum
//! acknowledged it (`ClusterNode::leader_contact_until`, `contact.rs`); a client self-fences
//! when no coordinator acknowledged it for `self_fence_after_ms`, and the primary records it
//! self-fenced on the coordinators' word and their round trips (`SessionsQuiet`). Both rest on
//! this bound: a cut-off coordinator that went on answering would keep a client alive (and
//! running its VMs) that the primary may judge self-fenced — and its sessions would never move
//! to a coordinator that can still write for them. Cut off here means no two-way link to any
//! other coordinator, so no round trip is possible (nor, alone, a quorum).

use std::collections::BTreeMap;
use std::time::Duration;

use super::Violation;
use crate::world::World;

/// The coordinators' serving window in the simulation, as `ClusterNode::serve_contact_window`
/// computes it: max(1 s, 2 × the election timeout's maximum) — the simulation's hosts keep
/// `[raft]`'s default.
fn window() -> Duration {
    let max = herd::config::RaftSection::default().election_timeout_ms[1];
    Duration::from_secs(1).max(Duration::from_millis(2 * max))
}

#[derive(Default)]
pub struct ServedInContact {
    /// Coordinator machines cut off from every other, since when (as first seen).
    cut_since: BTreeMap<usize, Duration>,
}

impl ServedInContact {
    pub fn check(&mut self, world: &World, now: Duration) -> Vec<Violation> {
        let w = world.lock();
        let coordinators: Vec<usize> =
            crate::run::NODES.iter().enumerate().filter(|(_, (_, c))| *c).map(|(i, _)| i).collect();
        let two_way = |a: usize, b: usize| !w.links.is_cut(a, b) && !w.links.is_cut(b, a);
        for &c in &coordinators {
            let alone = coordinators.iter().filter(|o| **o != c).all(|o| !two_way(c, *o));
            if alone {
                self.cut_since.entry(c).or_insert(now);
            } else {
                self.cut_since.remove(&c);
            }
        }
        let Some((by, sent, _)) = w.follower_acked else { return Vec::new() };
        match self.cut_since.get(&by) {
            Some(since) if sent > *since + window() => vec![Violation {
                invariant: "served-in-contact",
                at: now,
                detail: format!(
                    "{} answered a poll sent at {:.3} s, cut off from every other coordinator since {:.3} s",
                    w.machines[by].name,
                    sent.as_secs_f64(),
                    since.as_secs_f64()
                ),
            }],
            _ => Vec::new(),
        }
    }
}
