//! This node's standing with its cluster, as its own committed writes show it: when a write
//! of its own last committed (quorum contact) and whether it has self-fenced. The reconciler
//! starts VMs only with recent quorum contact; the self-fence guard fires without it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Shared by the member tasks (which record commits), the reconcile loop and the self-fence
/// guard.
pub struct Standing {
    started: tokio::time::Instant,
    /// When a write of this node's own was last committed (ms since start; 0: never).
    last_commit_ms: AtomicU64,
    /// The log index of that write: VMs are started only from a local view that has applied it
    /// (a node back from a long absence must not act on its stale view of where VMs run).
    last_commit_index: AtomicU64,
    /// How recent the last commit must be to count as quorum contact.
    contact_window_ms: u64,
    /// Set when this node self-fenced: it starts nothing any more.
    self_fenced: AtomicBool,
    /// Set once the self-fence guard armed the watchdog on a client: only then does it
    /// self-fence on its session (and say so in its reports).
    session_guard: AtomicBool,
    /// Set once this node's `run` committed and its duties after it were taken (the guard
    /// spawned, when its policy self-fences — then `self_fences` too).
    ran: AtomicBool,
    self_fences: AtomicBool,
}

impl Standing {
    /// Quorum contact lasts three keepalive intervals (at least three seconds).
    pub fn new(keepalive_interval_ms: u64) -> Standing {
        Standing {
            started: tokio::time::Instant::now(),
            last_commit_ms: AtomicU64::new(0),
            last_commit_index: AtomicU64::new(0),
            contact_window_ms: 3 * keepalive_interval_ms.max(1000),
            self_fenced: AtomicBool::new(false),
            session_guard: AtomicBool::new(false),
            ran: AtomicBool::new(false),
            self_fences: AtomicBool::new(false),
        }
    }

    /// Milliseconds since this process started (at least 1, so 0 can mean "never").
    pub fn now_ms(&self) -> u64 {
        herd_raft::clock::ms_since(self.started).max(1)
    }

    /// A write of this node's own committed at log `index`.
    pub fn committed(&self, index: u64) {
        self.last_commit_index.fetch_max(index, Ordering::AcqRel);
        self.last_commit_ms.store(self.now_ms(), Ordering::Release);
    }

    /// A keepalive of this node's committed at log `index`, `age_ms` before now (a client
    /// outside Raft: the coordinator that heard its session wrote it, stamped on the leader's
    /// clock; the age is counted from that stamp, so a slow session makes it older, never
    /// younger). Never moves the last commit back.
    /// One older than this process is no contact at all.
    pub fn committed_at(&self, index: u64, age_ms: u64) {
        let now = self.now_ms();
        if age_ms >= now {
            return;
        }
        self.last_commit_index.fetch_max(index, Ordering::AcqRel);
        self.last_commit_ms.fetch_max(now - age_ms, Ordering::AcqRel);
    }

    /// The log index of the last own write committed (0: none yet).
    pub fn last_commit_index(&self) -> u64 {
        self.last_commit_index.load(Ordering::Acquire)
    }

    /// How long ago the last own write committed (since start when none has).
    pub fn commit_age_ms(&self) -> u64 {
        self.now_ms().saturating_sub(self.last_commit_ms.load(Ordering::Acquire))
    }

    /// Whether a write of this node's own was committed lately and the local view at `applied`
    /// includes it: only then may this node start VMs from that view. (A node back after its
    /// VMs were recovered elsewhere replays old entries first; in those the VMs are still its
    /// own.)
    pub fn quorum_contact(&self, applied: u64) -> bool {
        let last = self.last_commit_ms.load(Ordering::Acquire);
        last != 0
            && self.now_ms().saturating_sub(last) < self.contact_window_ms
            && applied >= self.last_commit_index.load(Ordering::Acquire)
    }

    /// Whether a write of its own committed lately that the view at `applied` has not applied
    /// yet: contact comes once it has (no need to write another).
    pub fn awaiting_apply(&self, applied: u64) -> bool {
        let last = self.last_commit_ms.load(Ordering::Acquire);
        last != 0
            && self.now_ms().saturating_sub(last) < self.contact_window_ms
            && applied < self.last_commit_index.load(Ordering::Acquire)
    }

    /// This node's `run` committed and the duties after it were taken; `self_fences`: its
    /// policy self-fences (a guard was spawned).
    pub fn set_ran(&self, self_fences: bool) {
        self.self_fences.store(self_fences, Ordering::Release);
        self.ran.store(true, Ordering::Release);
    }

    /// Whether a client may write its own keepalive for quorum contact: only after its `run`
    /// (a restarted node's first contact is its `run`, after which its duties start) and, when
    /// it self-fences, once its guard armed (else it could start VMs with no guard to stop
    /// them when cut off, while the primary counts on one).
    pub fn may_write_contact(&self) -> bool {
        self.ran.load(Ordering::Acquire) && (!self.self_fences.load(Ordering::Acquire) || self.session_guard())
    }

    pub fn set_session_guard(&self) {
        self.session_guard.store(true, Ordering::Release);
    }

    /// Whether a guard with an armed watchdog self-fences this client on its session.
    pub fn session_guard(&self) -> bool {
        self.session_guard.load(Ordering::Acquire)
    }

    pub fn set_self_fenced(&self) {
        self.self_fenced.store(true, Ordering::Release);
    }

    pub fn self_fenced(&self) -> bool {
        self.self_fenced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn contact_needs_a_recent_commit_that_the_view_has_applied() {
        let s = Standing::new(1000);
        assert!(!s.quorum_contact(10), "never committed");
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
        s.committed(7);
        assert!(!s.quorum_contact(6), "the view has not applied the write");
        assert!(s.quorum_contact(7));
        tokio::time::advance(std::time::Duration::from_millis(3000)).await;
        assert!(!s.quorum_contact(7), "older than three intervals");
        assert_eq!(s.commit_age_ms(), 3000);
    }

    #[test]
    fn a_client_writes_for_contact_only_after_its_run_and_its_guard() {
        let s = Standing::new(1000);
        assert!(!s.may_write_contact(), "before its run");
        s.set_ran(true);
        assert!(!s.may_write_contact(), "it self-fences: not before its guard armed");
        s.set_session_guard();
        assert!(s.may_write_contact());
        let t = Standing::new(1000);
        t.set_ran(false);
        assert!(t.may_write_contact(), "no self-fence: once its run committed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_keepalive_seen_late_counts_from_its_stamp() {
        let s = Standing::new(1000);
        tokio::time::advance(std::time::Duration::from_millis(10_000)).await;
        s.committed_at(9, 20_000);
        assert!(!s.quorum_contact(9), "a keepalive older than this process is no contact");
        s.committed_at(9, 2_500);
        assert!(s.quorum_contact(9));
        assert_eq!(s.commit_age_ms(), 2_500, "aged from the stamp, not from when it was seen");
        s.committed_at(10, 4_000);
        assert_eq!(s.commit_age_ms(), 2_500, "an older stamp seen later does not move it back");
        tokio::time::advance(std::time::Duration::from_millis(600)).await;
        assert!(!s.quorum_contact(10), "3.1 s: older than three intervals");
    }
}
