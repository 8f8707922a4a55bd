//! A VM as the cluster records it, and what `vm define` asks for.

use serde::{Deserialize, Serialize};

use super::*;

/// What `vm define` asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub uuid: String,
    pub name: String,
    /// The domain XML of record.
    pub xml: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Nodes the VM may run on (empty: any).
    #[serde(default)]
    pub node_limit: Vec<String>,
    #[serde(default)]
    pub autostart: bool,
    #[serde(default)]
    pub migration_method: MigrationMethod,
}

/// A VM as the cluster records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub state: VmState,
    /// The node it is assigned to.
    pub node: String,
    /// Where it lived before a temporary migration (`unmigrate` goes back there).
    #[serde(default)]
    pub last_node: Option<String>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub actual: ActualState,
    /// While a running VM moves: the node it must stop on first. The target starts it only once
    /// the source has released it (`ReleaseVm`): a VM never runs on two nodes.
    #[serde(default)]
    pub migrating_from: Option<String>,
    /// Why a VM that should run has no node that will run it yet (its fence recovery found
    /// no node in run/ready inside its `node_limit`). No reconciler starts it while this is
    /// set; it is placed, and this cleared, as soon as a node fits.
    #[serde(default)]
    pub waiting: Option<String>,
    /// Nodes other than `node` whose latest report (`ReportStray`) shows it running there.
    /// While any is named, no node starts it (see `stray.rs`: adopted or failed, never
    /// destroyed by herd on its own).
    #[serde(default)]
    pub seen_on: std::collections::BTreeSet<String>,
    /// Log index of the last change to what this VM should be or where (define, modify, an
    /// operator's state or move, a placement, an adoption); reports never touch it. In
    /// maintenance, reconcilers act only on VMs changed since it began (`maintenance.rs`).
    #[serde(default)]
    pub desired_at: u64,
    /// The last move of a VM that may have been running, for `vm info`.
    #[serde(default)]
    pub last_move: Option<LastMove>,
    pub revision: u64,
}

impl VmRecord {
    /// Whether this VM is node `name`'s business: assigned to it, at home there (`last_node`:
    /// its unflush brings it back), moving away from it, or seen running on it.
    pub fn concerns(&self, name: &str) -> bool {
        self.node == name
            || self.last_node.as_deref() == Some(name)
            || self.migrating_from.as_deref() == Some(name)
            || self.seen_on.contains(name)
    }

    /// What a client holds of a VM that is not its business (its stream carries outlines,
    /// `Rpc::Outlined`): the name and uuid that tell one of its domains as this VM, where the
    /// VM belongs and is moving from, and where it was seen running — all a reconciler reads of
    /// another node's VM (a domain of it running here is a stray) — and nothing else: no XML,
    /// no figures, state `stop`, revision 0 ([`VmRecord::is_outline`]). Other nodes' VMs change
    /// state far more often than place, and such changes no longer reach every client.
    pub fn outline(&self) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                uuid: self.spec.uuid.clone(),
                name: self.spec.name.clone(),
                xml: String::new(),
                memory_mib: 0,
                vcpus: 0,
                selector: None,
                node_limit: Vec::new(),
                autostart: false,
                migration_method: MigrationMethod::default(),
            },
            state: VmState::Stop,
            node: self.node.clone(),
            last_node: None,
            failure_reason: None,
            actual: ActualState::default(),
            migrating_from: self.migrating_from.clone(),
            waiting: None,
            seen_on: self.seen_on.clone(),
            desired_at: 0,
            last_move: None,
            revision: 0,
        }
    }

    /// Whether this is an outline ([`VmRecord::outline`]): a VM of record always has a
    /// revision (the index that defined it, at least 1).
    pub fn is_outline(&self) -> bool {
        self.revision == 0
    }
}

/// A move of a VM that may have been running: from where to where, since when, and — once
/// the target reports it running — how it went (live, or stopped there and started here),
/// how long it took and, live, the guest's downtime as libvirt measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastMove {
    pub from: String,
    pub to: String,
    pub began_ms: u64,
    #[serde(default)]
    pub ended_ms: Option<u64>,
    #[serde(default)]
    pub live: Option<bool>,
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Live: how long libvirt's migration job took.
    #[serde(default)]
    pub job_ms: Option<u64>,
}

/// How a moved VM arrived on the node that reports it running (`ReportVm`): by libvirt's
/// incoming live migration (with the downtime libvirt measured), or started there after it
/// stopped on the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    pub live: bool,
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Live: how long libvirt's migration job took.
    #[serde(default)]
    pub job_ms: Option<u64>,
}
