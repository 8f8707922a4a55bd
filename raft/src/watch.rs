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

use herd_storage::model::NodeId;
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
    pub fn on_append(&self, target: NodeId, sent: &Sent, answer: Result<&AppendEntriesResponse<TypeConfig>, &str>) {
        let mut targets = self.targets();
        let t = targets.entry(target).or_default();
        if t.vote != Some(sent.vote) {
            *t = Target { vote: Some(sent.vote), reverted: t.reverted.take(), ..Target::default() };
        }
        match answer {
            Ok(AppendEntriesResponse::Success) => {
                t.acked = t.acked.max(sent.last);
                t.failing = None;
            }
            Ok(AppendEntriesResponse::PartialSuccess(upto)) => {
                t.acked = t.acked.max(*upto);
                t.failing = None;
            }
            Ok(AppendEntriesResponse::Conflict) => {
                // It does not hold `prev`: fine for a follower that never acknowledged it, a
                // lost acknowledgement for one that did.
                if let (Some(prev), Some(acked)) = (sent.prev, t.acked) {
                    if prev.index <= acked.index && t.reverted.is_none() {
                        let why = format!(
                            "log went backwards: it acknowledged entry {} to this leader, and no longer holds entry {}",
                            acked.index, prev.index
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
        w.on_append(2, &sent(Some(10), Some(10)), Ok(&AppendEntriesResponse::Conflict));
        w.on_append(2, &sent(Some(5), Some(12)), Ok(&AppendEntriesResponse::Success));
        assert!(w.problems().is_empty());
        // It acknowledged 12; now it lacks 11.
        w.on_append(2, &sent(Some(11), Some(13)), Ok(&AppendEntriesResponse::Conflict));
        assert!(w.problems()[&2].starts_with("log went backwards"), "{:?}", w.problems());
        // Another follower, another story; forgetting clears it.
        assert!(w.reverted(3).is_none());
        w.retain(&[3].into());
        assert!(w.problems().is_empty(), "a removed node is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn errors_from_the_followers_raft_are_reported_once_they_last() {
        let w = ReplicationWatch::default();
        w.on_append(2, &sent(Some(1), Some(1)), Err("storage error: No space left on device"));
        assert!(w.problems().is_empty(), "not at once");
        tokio::time::advance(FAILING_FOR).await;
        w.on_append(2, &sent(Some(1), Some(1)), Err("storage error: No space left on device"));
        assert!(w.problems()[&2].contains("No space left"), "{:?}", w.problems());
        w.on_append(2, &sent(Some(1), Some(2)), Ok(&AppendEntriesResponse::Success));
        assert!(w.problems().is_empty(), "a success clears it");
    }
}
