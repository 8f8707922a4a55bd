//! The fence-agent seam: one trait, the built-in IPMI agent and the external fence-agents
//! protocol behind it, and the registry that keeps one agent (one IPMI session) per BMC.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::{FenceAgentKind, FencePolicy};
use serde::Serialize;

use super::external::ExternalAgent;
use super::ipmi::IpmiBmc;

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
    #[error("BMC {bmc}: {count} new sessions in the last {window:?} (the most herd opens); retry later")]
    RateLimited { bmc: String, count: usize, window: Duration },
    #[error("fence agent {command}: {message}")]
    Agent { command: String, message: String },
    #[error("{0}")]
    Boundary(String),
}

/// A fence agent for one BMC. Every call finishes (with an error at worst) within `deadline`.
pub trait FenceAgent: Send + Sync {
    fn call(&self, action: Action, deadline: Duration) -> BoxFuture<'_, Result<Power, FenceError>>;
}

/// Where fence agents come from: production builds them from a node's published policy; the
/// simulation gives simulated BMCs.
pub trait Fencer: Send + Sync {
    fn agent(&self, policy: &FencePolicy) -> Arc<dyn FenceAgent>;
}

/// The production fencer: one agent per (kind, BMC, user, command), reused, so that there is
/// at most one IPMI session per BMC in this process.
/// An agent and the policy it was built from.
type Entry = (FencePolicy, Arc<dyn FenceAgent>);

/// Opens a sealed secret (the coordinator key's holder) or says why it cannot.
pub type Unsealer = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

#[derive(Default)]
pub struct AgentRegistry {
    agents: Mutex<BTreeMap<String, Entry>>,
    unseal: Option<Unsealer>,
}

impl AgentRegistry {
    pub fn new() -> AgentRegistry {
        AgentRegistry::default()
    }

    /// Opens sealed BMC passwords (published sealed to the coordinators) with `unseal`.
    pub fn unsealing_with(mut self, unseal: Unsealer) -> AgentRegistry {
        self.unseal = Some(unseal);
        self
    }
}

/// The agent for a policy whose password this node cannot open: every call fails, saying why.
struct Unusable {
    bmc: String,
    reason: String,
}

impl FenceAgent for Unusable {
    fn call(&self, _action: Action, _deadline: Duration) -> BoxFuture<'_, Result<Power, FenceError>> {
        let e =
            FenceError::Bmc { bmc: self.bmc.clone(), message: format!("BMC password unavailable: {}", self.reason) };
        Box::pin(async move { Err(e) })
    }
}

impl Fencer for AgentRegistry {
    fn agent(&self, policy: &FencePolicy) -> Arc<dyn FenceAgent> {
        let key =
            format!("{}|{}|{}|{}", policy.agent, policy.bmc, policy.user, policy.command.as_deref().unwrap_or(""));
        let mut g = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, a)) = g.get(&key) {
            // A changed password or option set gets a new agent (and session).
            if p == policy {
                return a.clone();
            }
        }
        let opened = if herd_raft::tls::is_sealed(&policy.password) {
            match self.unseal.as_ref().map(|f| f(&policy.password)) {
                Some(Ok(password)) => Ok(FencePolicy { password, ..policy.clone() }),
                Some(Err(reason)) => Err(reason),
                None => Err("sealed for the coordinators, and this node opens no sealed secrets".to_string()),
            }
        } else {
            Ok(policy.clone())
        };
        let agent: Arc<dyn FenceAgent> = match opened {
            Err(reason) => Arc::new(Unusable { bmc: policy.bmc.clone(), reason }),
            Ok(p) => match p.agent {
                FenceAgentKind::Ipmi => Arc::new(IpmiBmc::new(&p.bmc, &p.user, &p.password)),
                FenceAgentKind::External => Arc::new(ExternalAgent::from_policy(&p)),
            },
        };
        g.insert(key, (policy.clone(), agent.clone()));
        agent
    }
}
