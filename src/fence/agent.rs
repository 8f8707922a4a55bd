//! The fence-agent seam: one trait, the built-in IPMI agent and the external fence-agents
//! protocol behind it, and the registry that keeps one agent (one IPMI session) per BMC.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::FencePolicy;
use serde::Serialize;

/// A host's chassis power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Power {
    On,
    Off,
}

/// What a fence agent is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Power off (hard).
    Off,
    On,
    /// Read the chassis power.
    Status,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Off => "off",
            Action::On => "on",
            Action::Status => "status",
        }
    }
}

/// Why a fence-agent call failed. Never carries the password.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    #[error("BMC {bmc}: authentication refused (wrong user or password, or the user is not an Administrator; herd's IPMI speaks cipher suite 3 only — use agent = \"external\" otherwise)")]
    Auth { bmc: String },
    #[error("BMC {bmc}: no answer within {timeout:?}")]
    Timeout { bmc: String, timeout: Duration },
    #[error("BMC {bmc}: connection refused (nothing listens there)")]
    Refused { bmc: String },
    #[error("BMC {bmc}: {message}")]
    Bmc { bmc: String, message: String },
    #[error("BMC {bmc}: {count} new sessions in the last {window:?} (the most herd opens {purpose}); the last attempt failed: {last}")]
    RateLimited { bmc: String, count: usize, window: Duration, purpose: Purpose, last: String },
    #[error("fence agent {command}: {message}")]
    Agent { command: String, message: String },
    #[error("{0}")]
    Boundary(String),
}

/// Why a BMC is called: a fence has priority over a readiness check for whatever the BMC
/// rations (IPMI sessions), so checks can never use up what a fence needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Fence,
    Check,
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Purpose::Fence => "for a fence",
            Purpose::Check => "for readiness checks",
        })
    }
}

/// A fence agent for one BMC. Every call finishes (with an error at worst) within `deadline`.
pub trait FenceAgent: Send + Sync {
    /// A call on behalf of a fence.
    fn call(&self, action: Action, deadline: Duration) -> BoxFuture<'_, Result<Power, FenceError>>;

    /// A call for `purpose`; agents that ration nothing treat every purpose alike.
    fn call_for(
        &self,
        action: Action,
        deadline: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'_, Result<Power, FenceError>> {
        let _ = purpose;
        self.call(action, deadline)
    }
}

/// Where fence agents come from: production builds them from a node's published policy; the
/// simulation gives simulated BMCs.
pub trait Fencer: Send + Sync {
    fn agent(&self, policy: &FencePolicy) -> Arc<dyn FenceAgent>;
}

/// The production fencer: one agent per (kind, BMC, user, command), reused, so that there is
/// at most one IPMI session per BMC in this process.
/// An agent and the policy it was built from.
/// Opens a sealed secret (the coordinator key's holder) or says why it cannot.
pub type Unsealer = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;
