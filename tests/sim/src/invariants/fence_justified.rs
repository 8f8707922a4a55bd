//! A node is fenced only if, at the decision time, no coordinator whose view was fresh had
//! heard it on any network within `lost_after` pulses plus `fence_after_ms`.
//!
//! Why: fencing powers a machine off. herd's rule (DESIGN §5) is that every coordinator with a
//! fresh view must agree the node is lost, for long enough; one coordinator still hearing it
//! means the failure is partial (a link, a switch port), and fencing would turn it into an
//! outage.
//!
//! Ground truth, not herd's own bookkeeping: the simulated network records, for each node and
//! each other node, when the newest datagram it received *in time* (within one heartbeat
//! interval of being sent) was sent — "heard at H" means the node was alive at H — and, for
//! every pulse a coordinator C sends, what C had heard by then. At decision time T (the leader's stamp on `DecideFence`)
//! by the primary P on victim V, a coordinator C counts as "fresh and hearing V" when P had
//! received, before T, a pulse from C sent within `history_ms` of T in which C had heard V at
//! H with T − H < lost_after × interval + fence_after_ms − 2 intervals (the slack absorbs the
//! period boundaries). Only what reached P strictly before T's millisecond counts. P's own view counts the same way from P's receive record. Summaries
//! relayed through answers are not tracked: the check may miss a violation that only a
//! relayed view could have shown, but never reports one that did not happen. Manual fences
//! (`herd node fence`) are exempt, and so is a victim already powered off through its BMC
//! before the decision (then it is dead, and herd's dead-on-BMC path decides on that reading),
//! or powered on again less than a BMC reading's lifetime (3 s) before it.

use std::collections::BTreeSet;
use std::time::Duration;

use herd::heartbeat::Params;

use super::Violation;
use crate::run::EPOCH_MS;
use crate::world::World;

#[derive(Default)]
pub struct FenceJustified {
    seen: BTreeSet<(String, u64)>,
}

impl FenceJustified {
    pub fn check(&mut self, world: &World, now: Duration, decider: Option<usize>) -> Vec<Violation> {
        // Pending fences in any running daemon's applied state.
        let pending: Vec<(String, u64, u64)> = {
            let w = world.lock();
            let mut out = Vec::new();
            for m in w.machines.iter().filter_map(|m| m.daemon.as_ref()) {
                if let Some(member) = m.node.member() {
                    let g = member.view.read();
                    for n in g.state.nodes.values() {
                        if let Some(p) = n.fence.pending.as_ref().filter(|p| !p.manual) {
                            let after = n.fencing.as_ref().map_or(0, |f| f.fence_after_ms);
                            out.push((n.name.clone(), p.decided_ms, after));
                        }
                    }
                }
            }
            out
        };
        let mut violations = Vec::new();
        for (victim, decided_ms, fence_after_ms) in pending {
            if !self.seen.insert((victim.clone(), decided_ms)) {
                continue;
            }
            let t = Duration::from_millis(decided_ms.saturating_sub(EPOCH_MS));
            world.trace(format!("fence decided: {victim} at {:.3}", t.as_secs_f64()));
            let (Some(v), Some(p)) = (world.index_of(&victim), decider) else { continue };
            if let Some(detail) = heard_by_fresh_view(world, p, v, t, fence_after_ms) {
                violations.push(Violation {
                    invariant: "fence-justified",
                    at: now,
                    detail: format!(
                        "{victim} fenced (decided at {:.3} s by {}): {detail}",
                        t.as_secs_f64(),
                        world.name(p)
                    ),
                });
            }
        }
        violations
    }
}

/// How long the fence manager takes a BMC's power reading as current (`3 × SILENT_CHECK`).
const BMC_READING_FRESH: Duration = Duration::from_secs(3);

/// Which coordinator with a fresh view at `p` had heard `v` too recently at time `t`.
fn heard_by_fresh_view(world: &World, p: usize, v: usize, t: Duration, fence_after_ms: u64) -> Option<String> {
    let params = Params::default();
    let window = Duration::from_millis(
        (u64::from(params.lost_after) * params.interval_ms + fence_after_ms).saturating_sub(2 * params.interval_ms),
    );
    let fresh = Duration::from_millis(params.history_ms);
    let w = world.lock();
    // A machine powered off through its BMC before the decision is dead, whatever was heard
    // of it earlier: herd's dead-on-BMC path fences it on that reading (seed 5400: a late
    // power-off of a cancelled fence, then the new primary's decision 1.6 s later).
    if w.machines[v].powered_off_at.is_some_and(|off| off < t) {
        return None;
    }
    // Nor is a decision on a reading of the power off taken while it was off (a watchdog's
    // reset: off, then on again 2 s later): herd takes a BMC reading as current for 3 s
    // (seed 1119 with h2's watchdog).
    if w.machines[v].was_off.is_some_and(|(off, on)| off < t && t < on + BMC_READING_FRESH) {
        return None;
    }
    let recent = |h: Duration| h <= t && t < h + window;
    // P's own view: what had reached P strictly before T (a datagram processed in the same
    // simulated millisecond as the decision may have come after it).
    let own = w.heard[p][v].iter().filter(|(_, received)| *received < t).map(|(sent, _)| *sent).max();
    if let Some(h) = own.filter(|h| recent(*h)) {
        return Some(format!("{} itself heard it (sent) {} ms before", w.machines[p].name, (t - h).as_millis()));
    }
    for c in (0..w.machines.len()).filter(|c| *c != p && *c != v && w.machines[*c].coordinator) {
        let proof = w.received[p][c].iter().rev().find(|(received, _)| *received < t).map(|(_, proof)| proof);
        let Some(proof) = proof.filter(|pr| pr.sent + fresh >= t) else { continue };
        if let Some(h) = proof.heard[v].filter(|h| recent(*h)) {
            return Some(format!(
                "{}'s view (pulse sent {} ms before) had heard it {} ms before the decision",
                w.machines[c].name,
                (t - proof.sent).as_millis(),
                (t - h).as_millis()
            ));
        }
    }
    None
}
