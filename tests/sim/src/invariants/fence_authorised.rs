//! Every power-off a BMC receives is sent under a fencing token: at that moment the committed
//! history holds a decision to fence that machine which still stands (not cancelled, not done),
//! and whose token (`ExecuteFence`) was last taken by the sender's own node.
//!
//! Why: a power-off is the one action herd cannot take back. A primary killed or deposed
//! between its decision and its power-off, a new primary that cancelled the decision on
//! evidence that was none, or an executor that outlived its duties must not send one (issue
//! 16). The token is committed only by a leader proposing it itself, for a decision that still
//! stands, so a stale executor cannot hold it.
//!
//! Ground truth: the BMCs record every power-off request with its sender (`World::power_offs`);
//! the committed history is read from the most advanced applied state among the running
//! daemons (applied entries are committed; the sender, which just took its token, is running).
//! Checked in the step the request was made.

use std::time::Duration;

use super::Violation;
use crate::world::World;

#[derive(Default)]
pub struct FenceAuthorised {
    /// Power-off requests already judged.
    judged: usize,
}

impl FenceAuthorised {
    pub fn check(&mut self, world: &World, now: Duration) -> Vec<Violation> {
        let w = world.lock();
        let new: Vec<_> = w.power_offs.iter().skip(self.judged).copied().collect();
        self.judged = w.power_offs.len();
        if new.is_empty() {
            return Vec::new();
        }
        // The most advanced applied state: the committed history as far as anyone has it.
        let members: Vec<_> = w.machines.iter().filter_map(|m| m.daemon.as_ref()?.node.member()).collect();
        let newest = members.iter().max_by_key(|m| m.view.read().last_applied.map_or(0, |l| l.index));
        let mut out = Vec::new();
        for p in new {
            let (sender, victim) = (&w.machines[p.from].name, &w.machines[p.victim].name);
            let verdict = match newest {
                None => Err("no running daemon holds any history".to_string()),
                Some(m) => {
                    let g = m.view.read();
                    let sender_id = g.state.nodes.get(sender).map(|n| n.id);
                    let pending = g.state.nodes.get(victim).and_then(|n| n.fence.pending.clone());
                    match (&pending, sender_id) {
                        (Some(d), Some(id)) if d.executing_by == Some(id) => Ok(()),
                        _ => Err(format!(
                            "the committed history (applied to {}) has for {victim}: {pending:?}; {sender} is id {sender_id:?}",
                            g.last_applied.map_or(0, |l| l.index)
                        )),
                    }
                }
            };
            if let Err(why) = verdict {
                out.push(Violation {
                    invariant: "fence-authorised",
                    at: now,
                    detail: format!(
                        "{sender} sent a power-off to {victim}'s BMC at {:.3} s without a standing decision whose token it holds: {why}",
                        p.at.as_secs_f64()
                    ),
                });
            }
        }
        out
    }
}
