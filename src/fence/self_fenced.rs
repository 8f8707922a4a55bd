//! The primary's side of the self-fence: when a failed fence's victim, whose policy is
//! `recover-after-self-fence`, is recorded self-fenced (`FenceDone`) so that its VMs are
//! recovered — on the coordinators' evidence that none can have acknowledged its session
//! (`SessionsQuiet`, a client that self-fences on its session), or on its last committed
//! keepalive's age (`SelfFenced`). The node's side is `selffence.rs`; the model checks either.

use herd_storage::model::{Command, FailedFence, FenceOutcome, FencePolicy, NodeRecord, SELF_FENCE_MARGIN_MS};

use super::manager::{FenceManager, SESSIONS_ASK_TIMEOUT, WRITE_TIMEOUT};

impl FenceManager {
    /// After a failed fence, a node whose policy self-fences is recovered once its last
    /// committed keepalive is older than its self-fence deadline plus its watchdog plus a margin
    /// (the model checks the same arithmetic on the leader's clock) — or, for a client that
    /// self-fences on its session, once no coordinator can have acknowledged that session for
    /// as long (`ClusterNode::sessions_quiet`, the evidence the model checks).
    pub(super) async fn maybe_self_fenced(&self, rec: &NodeRecord, policy: &FencePolicy, now_ms: u64) {
        if policy.failed_fence != FailedFence::RecoverAfterSelfFence
            || rec.fence.failure.is_none()
            || rec.fence.pending.is_some()
            || rec.daemon_state == herd_storage::model::DaemonState::Fenced
        {
            return;
        }
        let wait = policy.self_fence_after_ms + policy.watchdog_timeout_ms + SELF_FENCE_MARGIN_MS;
        // A client on its session alone: its keepalive is written on change only (the model
        // refuses this rule for it).
        let by_keepalive =
            !rec.stats.session_only && rec.last_keepalive_ms.is_none_or(|k| now_ms.saturating_sub(k) >= wait);
        let on_session = rec.stats.session_self_fence && !self.clients([rec.id]).is_empty();
        if !by_keepalive && !on_session {
            return;
        }
        if !self.self_fenced_try(&rec.name) {
            return;
        }
        // The session's evidence first (sooner: the keepalive is written up to an interval after
        // the session was last heard), the keepalive's age when the evidence falls short.
        let mut outcome = by_keepalive.then_some(FenceOutcome::SelfFenced);
        if on_session {
            let asked_ms = herd_raft::clock::wall_ms();
            let quiet = self.node.sessions_quiet(&[rec.id], SESSIONS_ASK_TIMEOUT).await;
            let mut quiet_ms = quiet.get(&rec.id).copied().unwrap_or(0);
            if crate::breakage::is(crate::breakage::Breakage::SelfFencedWithoutEvidence) {
                quiet_ms = quiet_ms.max(wait);
            }
            if quiet_ms >= wait {
                outcome = Some(FenceOutcome::SessionsQuiet { quiet_ms, asked_ms });
            } else {
                tracing::debug!(node = %rec.name, quiet_ms, wait, "self-fence: its session may have been acknowledged");
            }
        }
        let Some(outcome) = outcome else { return };
        let cmd = Command::FenceDone { name: rec.name.clone(), outcome };
        match self.node.write_local(vec![cmd.into()], WRITE_TIMEOUT).await {
            Ok(_) => tracing::warn!(node = %rec.name, "recorded as self-fenced by its policy; its VMs are recovered"),
            Err(e) => tracing::debug!(node = %rec.name, "self-fenced recovery not recorded: {e}"),
        }
    }
}
