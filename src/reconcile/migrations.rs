//! Live migrations away from this node, each on a task of its own: a move that hangs (a frozen
//! destination libvirtd makes `virDomainMigrateToURI` wait with no timeout of its own) never
//! holds the node's reconcile round, so its other VMs keep being reconciled.
//!
//! At most `parallel_migrations` are in the air at once. A flight stays until libvirt's call
//! returns — only then is the outcome known (a job past a client's timeout may still complete)
//! — and past `migration_timeout_ms` the reconciler asks libvirt once to abort the job. While
//! a VM has a flight, the round does nothing else to it; when it lands, the round reads the
//! outcome ([`Landed`]) and where the guest really is from its own libvirt: gone from here, it
//! is released to the target; still here, the move failed (aborted through Raft, or a
//! shutdown migration where its policy allows). A second copy is never started: the target
//! starts a VM only once the source released it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::hypervisor::{Hypervisor, HypervisorError};

/// The bound on libvirt's migration call itself: far past any `migration_timeout_ms` (whose
/// abort normally ends it); a call still blocked then is given up (its outcome unknown).
const CALL_LIMIT: Duration = Duration::from_secs(3600);

type Slot = Arc<Mutex<Option<Result<(), HypervisorError>>>>;

struct Flight {
    to: String,
    started: Instant,
    abort_asked: bool,
    /// Filled by the flight's task when libvirt's call returned.
    result: Slot,
}

/// A flight whose call returned.
#[derive(Debug)]
pub struct Landed {
    pub vm: String,
    pub to: String,
    pub took: Duration,
    pub result: Result<(), HypervisorError>,
    /// Whether its abort had been asked for (it was overdue).
    pub aborted: bool,
}

/// The live migrations in the air from this node.
pub struct Migrations {
    limit: usize,
    timeout: Duration,
    flights: Mutex<BTreeMap<String, Flight>>,
    /// Woken when a flight lands: the loop runs a round at once.
    pub landing: Arc<Notify>,
}

impl Migrations {
    /// At most `limit` at once (at least one); `timeout` before an abort is asked.
    pub fn new(limit: usize, timeout: Duration) -> Migrations {
        Migrations { limit: limit.max(1), timeout, flights: Mutex::default(), landing: Arc::new(Notify::new()) }
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Flight>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_flight(&self, vm: &str) -> bool {
        self.flights().contains_key(vm)
    }

    /// VMs in the air, with their target and how long they have been.
    pub fn list(&self) -> Vec<(String, String, Duration)> {
        self.flights().iter().map(|(vm, f)| (vm.clone(), f.to.clone(), f.started.elapsed())).collect()
    }

    /// Launches the live migration of `vm` to node `to` at `uri`, unless `limit` are in the air
    /// (then `false`: the round tries again later).
    pub fn launch(&self, hypervisor: Arc<dyn Hypervisor>, vm: &str, to: &str, uri: String) -> bool {
        let mut flights = self.flights();
        if flights.contains_key(vm) {
            return true;
        }
        if flights.len() >= self.limit {
            return false;
        }
        let result: Slot = Arc::default();
        let (slot, landing, name) = (result.clone(), self.landing.clone(), vm.to_string());
        tokio::spawn(async move {
            let r = hypervisor.migrate_live(&name, &uri, CALL_LIMIT).await;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            landing.notify_one();
        });
        flights
            .insert(vm.to_string(), Flight { to: to.to_string(), started: Instant::now(), abort_asked: false, result });
        true
    }

    /// The flights whose call returned, taken out.
    pub fn landed(&self) -> Vec<Landed> {
        let mut flights = self.flights();
        let done: Vec<String> = flights
            .iter()
            .filter(|(_, f)| f.result.lock().unwrap_or_else(|p| p.into_inner()).is_some())
            .map(|(vm, _)| vm.clone())
            .collect();
        done.into_iter()
            .filter_map(|vm| {
                let f = flights.remove(&vm)?;
                let result = f.result.lock().unwrap_or_else(|p| p.into_inner()).take()?;
                Some(Landed { vm, to: f.to, took: f.started.elapsed(), result, aborted: f.abort_asked })
            })
            .collect()
    }

    /// Flights past the timeout whose abort was not asked for yet; marked asked.
    pub fn overdue(&self) -> Vec<(String, String, Duration)> {
        let timeout = self.timeout;
        self.flights()
            .iter_mut()
            .filter(|(_, f)| !f.abort_asked && f.started.elapsed() >= timeout)
            .map(|(vm, f)| {
                f.abort_asked = true;
                (vm.clone(), f.to.clone(), f.started.elapsed())
            })
            .collect()
    }
}
