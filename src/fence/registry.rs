//! The registry of fence agents: one agent per BMC (so one IPMI session per BMC in the
//! process), built from a node's published policy, with sealed passwords opened on the way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use herd_storage::model::{FenceAgentKind, FencePolicy};

use super::agent::{Action, FenceAgent, FenceError, Fencer, Power, Unsealer};
use super::external::ExternalAgent;
use super::ipmi::IpmiBmc;

type Entry = (FencePolicy, Arc<dyn FenceAgent>);

/// The production [`Fencer`].
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
