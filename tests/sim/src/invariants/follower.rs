//! A follower outside Raft holds, at each index it has applied, the state every member holds
//! at that index, as projected for the node id it follows as (`State::projected_for`: no
//! request log, no figures other nodes' keepalives write; a client: `State::outlined_for`,
//! other nodes' VMs as outlines too).
//!
//! Why: hypervisors follow the cluster's state without being Raft members (issue 22), and
//! every decision they take (which VMs to run) reads that state. A follower takes the records
//! each committed entry changed (deltas) from a member, or a member's whole state, so equal
//! indexes must mean equal states — through crashes, restarts, moves from one coordinator to
//! another and snapshots. A skipped, duplicated or reordered change, a record a delta left
//! out, or a whole state labelled with the wrong index, breaks it.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Violation;
use crate::world::World;

/// What a follower holds of the state, as node id `.0`.
#[derive(Clone, Copy)]
enum Projection {
    /// Every VM whole (`State::projected_for`).
    Whole(u64),
    /// Other nodes' VMs as outlines (`State::outlined_for`): a client.
    Outlined(u64),
}

impl Projection {
    fn of(self, s: &herd_storage::model::State) -> herd_storage::model::State {
        match self {
            Projection::Whole(me) => s.projected_for(me),
            Projection::Outlined(me) => s.outlined_for(me),
        }
    }
}

/// Compares each follower (the simulation's own, and every hypervisor that runs as a client)
/// with each member once per index they share.
#[derive(Default)]
pub struct FollowerAgrees {
    /// Per (follower, member machine), the last index compared.
    compared: BTreeMap<(String, usize), u64>,
}

impl FollowerAgrees {
    pub fn check(&mut self, world: &World, now: Duration) -> Vec<Violation> {
        let w = world.lock();
        // Who, and the node id it follows as (the simulation's own follower: one no node holds).
        let mut followers: Vec<(String, Projection, herd_storage::sm::StateView)> = w
            .follower
            .iter()
            .map(|(v, _)| ("the follower".to_string(), Projection::Whole(crate::follower::FOLLOWER_ID), v.clone()))
            .collect();
        for m in &w.machines {
            if let Some(c) = m.daemon.as_ref().and_then(|d| d.node.session()) {
                followers.push((format!("client {}", m.name), Projection::Outlined(c.id), c.view.clone()));
            }
        }
        let mut out = Vec::new();
        for (who, p, view) in followers {
            out.extend(self.compare(&w, &who, p, &view, now));
        }
        out
    }

    fn compare(
        &mut self,
        w: &crate::world::Inner,
        who: &str,
        p: Projection,
        view: &herd_storage::sm::StateView,
        now: Duration,
    ) -> Vec<Violation> {
        let f = view.read();
        let Some(at) = f.last_applied else { return Vec::new() };
        let mut out = Vec::new();
        for (i, m) in w.machines.iter().enumerate() {
            let Some(member) = m.daemon.as_ref().and_then(|d| d.node.member()) else { continue };
            let g = member.view.read();
            let key = (who.to_string(), i);
            if g.last_applied != Some(at) || self.compared.get(&key) == Some(&at.index) {
                continue;
            }
            self.compared.insert(key, at.index);
            let (theirs, mine) = (p.of(&g.state), p.of(&f.state));
            if theirs != mine {
                let differs = [
                    ("vms", theirs.vms != mine.vms),
                    ("nodes", theirs.nodes != mine.nodes),
                    ("meta", theirs.meta != mine.meta),
                    ("events", theirs.events != mine.events),
                    (
                        "removed/acked/clock",
                        (&theirs.removed, &theirs.acked, theirs.clock_ms)
                            != (&mine.removed, &mine.acked, mine.clock_ms),
                    ),
                ];
                let which: Vec<&str> = differs.iter().filter(|(_, d)| *d).map(|(n, _)| *n).collect();
                out.push(Violation {
                    invariant: "follower",
                    at: now,
                    detail: format!("at index {}, {who}'s state differs from {}'s ({which:?})", at.index, m.name),
                });
            }
        }
        out
    }
}
