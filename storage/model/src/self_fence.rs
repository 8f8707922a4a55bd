//! When the model accepts that a node has certainly self-fenced (`FenceDone` with `SelfFenced`
//! or `SessionsQuiet`): the arithmetic both the node's guard and the primary's record rest on.
//! Pure, like the rest of `model`.

use crate::fence::{FailedFence, FenceOutcome, FencePolicy, SELF_FENCE_MARGIN_MS};
use crate::types::*;

/// Whether `node` has certainly self-fenced by leader time `now`, as `outcome` (a self-fence)
/// claims: its policy self-fences, it is not fenced already, and either its last committed
/// keepalive is older than the self-fence deadline + the watchdog + the margin (`SelfFenced`; not
/// for a node that self-fences on its session alone), or it self-fences on its session and the primary's evidence shows no coordinator can have
/// acknowledged that session for as long, with no keepalive of it committed since the primary
/// asked (`SessionsQuiet`).
pub(crate) fn certainly_self_fenced(
    name: &str,
    node: &NodeRecord,
    policy: &FencePolicy,
    outcome: &FenceOutcome,
    now: u64,
) -> Result<(), ApplyError> {
    if policy.failed_fence != FailedFence::RecoverAfterSelfFence {
        return Err(ApplyError::Invalid(format!("{name}'s policy does not self-fence")));
    }
    if node.daemon_state == DaemonState::Fenced {
        return Err(ApplyError::Invalid(format!("{name} is already fenced")));
    }
    let wait =
        policy.self_fence_after_ms.saturating_add(policy.watchdog_timeout_ms).saturating_add(SELF_FENCE_MARGIN_MS);
    match outcome {
        FenceOutcome::SessionsQuiet { quiet_ms, asked_ms } => {
            if !node.stats.session_self_fence {
                return Err(ApplyError::Invalid(format!(
                    "{name} does not self-fence on its session; only its keepalive's age can show it self-fenced"
                )));
            }
            if *quiet_ms < wait {
                return Err(ApplyError::Invalid(format!(
                    "{name}'s session may have been acknowledged {quiet_ms} ms ago; it has certainly self-fenced only after {wait} ms"
                )));
            }
            if *asked_ms > now || node.last_keepalive_ms.is_some_and(|k| k >= *asked_ms) {
                return Err(ApplyError::Invalid(format!(
                    "{name} was heard from after the primary asked about its session (a keepalive committed)"
                )));
            }
        }
        _ => {
            if node.stats.session_only {
                return Err(ApplyError::Invalid(format!(
                    "{name} self-fences on its session alone; its keepalive's age shows nothing, only the sessions' evidence can"
                )));
            }
            let age = node.last_keepalive_ms.map_or(u64::MAX, |k| now.saturating_sub(k));
            if age < wait {
                return Err(ApplyError::Invalid(format!(
                    "{name}'s last committed keepalive is {age} ms old; it has certainly self-fenced only after {wait} ms"
                )));
            }
        }
    }
    Ok(())
}
