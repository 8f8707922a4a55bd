//! What a leader learns about each follower from the answers to its replication requests:
//! whether the follower's Raft is running (or stopped on a fatal error, such as a store that
//! cannot write), and whether its log went backwards — it lost entries it acknowledged to this
//! very leader (a `data_dir` restored from an older copy). Pure bookkeeping; the daemon turns
//! the findings into the members' replicated health.
//!
//! openraft cannot recover from the second (a follower whose log reverted is never appended to
//! again while this leader leads), and Raft's safety rests on it never happening: such a node
//! may also have promised votes it no longer remembers. It is named here and refused.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use herd_storage::model::{Held, NodeId};
use herd_storage::types::{LogId, TypeConfig, Vote};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use tokio::time::Instant;

/// A follower whose requests fail this long, with no success since, is reported.
const FAILING_FOR: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Target {
    /// The leader vote the acknowledgements below were made to.
    vote: Option<Vote>,
    /// The highest log id the follower acknowledged to that vote.
    acked: Option<LogId>,
    reverted: Option<String>,
    /// The committed index it held as the cluster recorded it (`State::acked`): kept across
    /// leader changes, when `acked` starts afresh.
    floor: u64,
    /// The boot of the follower's Raft that gave the latest acknowledgement, and the highest
    /// entry that boot acknowledged (to any leader vote of this node): what is recorded.
    boot: u64,
    boot_acked: Option<u64>,
    /// Since when its requests fail with an error from its Raft, and the latest error.
    failing: Option<(Instant, String)>,
}

/// Per replication target, what its answers said. Shared by the network clients of one node.
#[derive(Default)]
pub struct ReplicationWatch {
    targets: Mutex<BTreeMap<NodeId, Target>>,
}

/// One append request's facts, taken before it is sent.
pub struct Sent {
    vote: Vote,
    prev: Option<LogId>,
    last: Option<LogId>,
}

impl Sent {
    pub fn of(req: &AppendEntriesRequest<TypeConfig>) -> Sent {
        let last = req.entries.last().map(|e| e.log_id).or(req.prev_log_id);
        Sent { vote: req.vote, prev: req.prev_log_id, last }
    }
}

impl ReplicationWatch {
    fn targets(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Target>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the answer to an append request (`Err`: the follower's Raft refused with this
    /// error; transport failures are not recorded — a node that is down is the heartbeat's).
    pub fn on_append(
        &self,
        target: NodeId,
        sent: &Sent,
        answer: Result<(&AppendEntriesResponse<TypeConfig>, u64), &str>,
    ) {
        let mut targets = self.targets();
        let t = targets.entry(target).or_default();
        if t.vote != Some(sent.vote) {
            *t = Target {
                vote: Some(sent.vote),
                reverted: t.reverted.take(),
                floor: t.floor,
                // Nothing of an earlier term is recorded: an answer of this term says which
                // boot holds what (a stale boot recorded after a newer one would make the
                // newer boot look as if it lost entries).
                ..Target::default()
            };
        }
        let answer = answer.map(|(r, boot)| {
            if boot != t.boot {
                t.boot = boot;
                t.boot_acked = None;
            }
            r
        });
        let ack = |t: &mut Target, upto: Option<LogId>| {
            t.acked = t.acked.max(upto);
            t.boot_acked = t.boot_acked.max(upto.map(|l| l.index));
            t.failing = None;
        };
        match answer {
            Ok(AppendEntriesResponse::Success) => ack(t, sent.last),
            Ok(AppendEntriesResponse::PartialSuccess(upto)) => ack(t, *upto),
            Ok(AppendEntriesResponse::Conflict) => {
                // It does not hold `prev`: fine for a follower that never acknowledged it, a
                // lost acknowledgement for one that did — to this leader, or (committed
                // entries, which are never truncated) as the cluster recorded.
                let acked = t.acked.map(|a| a.index);
                let held = acked.max(Some(t.floor).filter(|f| *f > 0));
                if let (Some(prev), Some(held)) = (sent.prev, held) {
                    if prev.index <= held && t.reverted.is_none() {
                        let to = if acked == Some(held) { "to this leader" } else { "(as the cluster recorded)" };
                        let why = format!(
                            "log went backwards: it acknowledged entry {held} {to}, and no longer holds entry {}",
                            prev.index
                        );
                        tracing::error!(node_id = target, "{why}");
                        t.reverted = Some(why);
                    }
                }
                t.failing = None;
            }
            Ok(AppendEntriesResponse::HigherVote(_)) => t.failing = None,
            Err(e) => {
                let since = t.failing.as_ref().map_or(Instant::now(), |f| f.0);
                t.failing = Some((since, e.chars().take(300).collect()));
            }
        }
    }

    /// Whether `target` replicates: it acknowledged appends of this leader's vote and neither
    /// its log went backwards nor its Raft refuses since.
    pub fn replicating(&self, target: NodeId) -> bool {
        self.targets().get(&target).is_some_and(|t| t.acked.is_some() && t.failing.is_none() && t.reverted.is_none())
    }

    /// Whether `target`'s log went backwards (the reason).
    pub fn reverted(&self, target: NodeId) -> Option<String> {
        self.targets().get(&target).and_then(|t| t.reverted.clone())
    }

    /// What keeps each follower out of Raft now: its log went backwards, or its Raft has been
    /// refusing this leader's requests for a while (with its error).
    pub fn problems(&self) -> BTreeMap<NodeId, String> {
        self.targets()
            .iter()
            .filter_map(|(id, t)| {
                let problem = t.reverted.clone().or_else(|| {
                    t.failing.as_ref().filter(|(since, _)| since.elapsed() >= FAILING_FOR).map(|(_, e)| e.clone())
                })?;
                Some((*id, problem))
            })
            .collect()
    }

    /// What each follower held as the cluster recorded it (`State::acked`).
    pub fn set_floors(&self, held: &BTreeMap<NodeId, Held>) {
        let mut targets = self.targets();
        for (id, h) in held {
            let t = targets.entry(*id).or_default();
            t.floor = t.floor.max(h.floor());
        }
    }

    /// What each follower's current boot acknowledged, capped at `committed`, as (boot,
    /// index): the marks to record in the cluster (committed entries only — an uncommitted
    /// one may be truncated legitimately by a later leader).
    pub fn marks(&self, committed: u64) -> BTreeMap<NodeId, (u64, u64)> {
        self.targets().iter().filter_map(|(id, t)| Some((*id, (t.boot, t.boot_acked?.min(committed))))).collect()
    }

    /// The boot of follower `id`'s Raft, as its latest answer to this node's appends in this
    /// term said (`None`: no answer yet).
    pub fn boot_of(&self, id: NodeId) -> Option<u64> {
        self.targets().get(&id).map(|t| t.boot).filter(|b| *b != 0)
    }

    /// Forgets every target but the members in `keep` (a removed node's id is never used again).
    pub fn retain(&self, keep: &std::collections::BTreeSet<NodeId>) {
        self.targets().retain(|id, _| keep.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(1, 1, index)
    }

    fn sent(prev: Option<u64>, last: Option<u64>) -> Sent {
        Sent { vote: Vote::new_committed(1, 1), prev: prev.map(log_id), last: last.map(log_id) }
    }

    #[test]
    fn a_conflict_below_what_was_acknowledged_is_a_log_gone_backwards() {
        let w = ReplicationWatch::default();
        // A lagging follower's conflicts are the normal search for a match.
        w.on_append(2, &sent(Some(10), Some(10)), Ok((&AppendEntriesResponse::Conflict, 1)));
        w.on_append(2, &sent(Some(5), Some(12)), Ok((&AppendEntriesResponse::Success, 1)));
        assert!(w.problems().is_empty());
        // It acknowledged 12; now it lacks 11.
        w.on_append(2, &sent(Some(11), Some(13)), Ok((&AppendEntriesResponse::Conflict, 1)));
        assert!(w.problems()[&2].starts_with("log went backwards"), "{:?}", w.problems());
        // Another follower, another story; forgetting clears it.
        assert!(w.reverted(3).is_none());
        w.retain(&[3].into());
        assert!(w.problems().is_empty(), "a removed node is forgotten");
    }

    /// A new leader knows nothing of what a follower acknowledged to the last one; the mark
    /// the cluster recorded (committed entries only) tells it.
    #[test]
    fn after_a_leader_change_the_recorded_mark_finds_a_log_gone_backwards() {
        let w = ReplicationWatch::default();
        w.on_append(2, &sent(Some(5), Some(40)), Ok((&AppendEntriesResponse::Success, 1)));
        assert_eq!(w.marks(30), BTreeMap::from([(2, (1, 30))]), "capped at what is committed");
        w.set_floors(&BTreeMap::from([(2, Held { boot: 1, index: 30, before: 0 })]));
        // A new vote: this leader's memory starts afresh, the floor stays.
        let new_vote = |prev: u64| Sent { vote: Vote::new_committed(2, 1), prev: Some(log_id(prev)), last: None };
        w.on_append(2, &new_vote(45), Ok((&AppendEntriesResponse::Conflict, 1)));
        assert!(w.problems().is_empty(), "above the mark: the normal search for a match");
        w.on_append(2, &new_vote(31), Ok((&AppendEntriesResponse::Conflict, 1)));
        assert!(w.problems().is_empty(), "above the mark");
        assert!(w.marks(50).is_empty(), "nothing acknowledged in this term yet: nothing to record");
        w.on_append(2, &new_vote(30), Ok((&AppendEntriesResponse::Conflict, 1)));
        let p = &w.problems()[&2];
        assert!(p.starts_with("log went backwards") && p.contains("as the cluster recorded"), "{p}");
    }

    #[tokio::test(start_paused = true)]
    async fn errors_from_the_followers_raft_are_reported_once_they_last() {
        let w = ReplicationWatch::default();
        w.on_append(2, &sent(Some(1), Some(1)), Err("storage error: No space left on device"));
        assert!(w.problems().is_empty(), "not at once");
        tokio::time::advance(FAILING_FOR).await;
        w.on_append(2, &sent(Some(1), Some(1)), Err("storage error: No space left on device"));
        assert!(w.problems()[&2].contains("No space left"), "{:?}", w.problems());
        w.on_append(2, &sent(Some(1), Some(2)), Ok((&AppendEntriesResponse::Success, 1)));
        assert!(w.problems().is_empty(), "a success clears it");
    }
}
