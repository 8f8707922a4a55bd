//! The PVC state names (`daemon_state`, `domain_state`, `router_state`, VM states) and the
//! small enums of the model, each with its name for output and parsing (`state_names!`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a node does in the cluster. It comes from the node's own config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A Raft voter (up to five); runs the heartbeat agent; the leader is the primary.
    Coordinator,
    /// A Raft learner: receives all state, runs VMs, never votes.
    Hypervisor,
}

macro_rules! state_names {
    ($ty:ident { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $ty {
            /// The PVC-compatible name of this state.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?}; expected one of: {}",
                        stringify!($ty),
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}

state_names!(Role { Coordinator = "coordinator", Hypervisor = "hypervisor" });

/// The node daemon's lifecycle (PVC `daemonstate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DaemonState {
    Init,
    Run,
    Shutdown,
    /// The service stopped (not the host): VMs keep running, the node returns by `return_by_ms`.
    Stop,
    Dead,
    Fenced,
}
state_names!(DaemonState { Init = "init", Run = "run", Shutdown = "shutdown", Stop = "stop", Dead = "dead", Fenced = "fenced" });

/// Whether a node takes VMs (PVC `domainstate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    Ready,
    Flush,
    Flushed,
    Unflush,
    FenceFlush,
}
state_names!(DomainState { Ready = "ready", Flush = "flush", Flushed = "flushed", Unflush = "unflush", FenceFlush = "fence-flush" });

/// The coordinator role (PVC `routerstate`); hypervisors are `client`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterState {
    Primary,
    Secondary,
    Takeover,
    Relinquish,
    Client,
}
state_names!(RouterState { Primary = "primary", Secondary = "secondary", Takeover = "takeover", Relinquish = "relinquish", Client = "client" });

impl DomainState {
    /// The flush/unflush state machine: `ready → flush → flushed → unflush → ready`; a flush
    /// or unflush under way can be turned round.
    pub fn may_become(self, to: DomainState) -> bool {
        use DomainState::*;
        matches!(
            (self, to),
            (Ready, Flush)
                | (Flush, Flushed)
                | (Flushed, Unflush)
                | (Unflush, Ready)
                | (Flush, Unflush)
                | (Unflush, Flush)
        ) || self == to
    }
}

impl RouterState {
    /// Whether a coordinator may move from `self` to `to` on its own.
    pub fn may_become(self, to: RouterState) -> bool {
        use RouterState::*;
        matches!(
            (self, to),
            (Takeover, Primary)
                | (Primary, Relinquish)
                | (Takeover, Relinquish)
                | (Relinquish, Secondary)
                | (Secondary, Secondary)
        )
    }

    /// The router state a node of `role` starts with.
    pub fn initial(role: Role) -> Self {
        match role {
            Role::Coordinator => RouterState::Secondary,
            Role::Hypervisor => RouterState::Client,
        }
    }
}

/// What a VM should be doing (PVC's VM states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Start,
    Restart,
    Shutdown,
    Stop,
    Disable,
    Fail,
    Migrate,
    MigrateLive,
    Unmigrate,
}
state_names!(VmState {
    Start = "start", Restart = "restart", Shutdown = "shutdown", Stop = "stop", Disable = "disable",
    Fail = "fail", Migrate = "migrate", MigrateLive = "migrate-live", Unmigrate = "unmigrate"
});

impl VmState {
    /// States in which the VM should be running (or about to run) on its node.
    pub fn wants_running(self) -> bool {
        matches!(self, VmState::Start | VmState::Restart | VmState::Migrate | VmState::MigrateLive | VmState::Unmigrate)
    }
}

/// How a VM moves (`none`: live where possible, else shut down and start elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMethod {
    Live,
    Shutdown,
    #[default]
    None,
}
state_names!(MigrationMethod { Live = "live", Shutdown = "shutdown", None = "none" });

/// How a target node is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    /// Most free memory.
    #[default]
    Mem,
    /// Most memory left after everything assigned to the node (running or not).
    Memprov,
    /// Lowest load.
    Load,
    /// Fewest allocated vCPUs.
    Vcpus,
    /// Fewest running VMs.
    Vms,
}
state_names!(Selector { Mem = "mem", Memprov = "memprov", Load = "load", Vcpus = "vcpus", Vms = "vms" });

/// What libvirt last reported for a VM on its node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActualState {
    Running,
    Paused,
    Shutoff,
    Crashed,
    Missing,
    #[default]
    Unknown,
}
state_names!(ActualState { Running = "running", Paused = "paused", Shutoff = "shutoff", Crashed = "crashed", Missing = "missing", Unknown = "unknown" });
