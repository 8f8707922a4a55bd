//! An in-memory hypervisor with the test driver's behaviour, for the simulation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use herd_storage::model::{ActualState, Arrival};

use super::{Domain, Hypervisor, HypervisorError};

#[derive(Default)]
struct Inner {
    domains: BTreeMap<String, Domain>,
    next_id: u32,
    /// The host is powered off: every call fails until it is powered on.
    off: bool,
}

/// A node's hypervisor in memory; clones share it (so a "host" outlives its daemon).
#[derive(Clone, Default)]
pub struct MemoryHypervisor(Arc<Mutex<Inner>>);

fn field<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].trim())
}

impl MemoryHypervisor {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, if the host is powered on.
    fn live(&self) -> Result<MutexGuard<'_, Inner>, HypervisorError> {
        let g = self.lock();
        if g.off {
            return Err(HypervisorError::Unavailable("host powered off".into()));
        }
        Ok(g)
    }

    fn with<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Domain, &mut u32) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        let mut g = self.live()?;
        let Inner { domains, next_id, .. } = &mut *g;
        let d = domains.get_mut(name).ok_or_else(|| HypervisorError::NoDomain(name.to_string()))?;
        f(d, next_id)
    }

    /// Every domain, at once (the simulation's ground truth).
    pub fn domains(&self) -> Vec<Domain> {
        self.lock().domains.values().cloned().collect()
    }

    /// Every domain stops (the host lost power) and every call fails until [`Self::power_on`]
    /// (a daemon that has not yet noticed the power loss cannot start anything).
    pub fn power_off(&self) {
        let mut g = self.lock();
        g.off = true;
        for d in g.domains.values_mut() {
            d.state = ActualState::Shutoff;
            d.id = None;
        }
    }

    /// The host has power again (its domains stay off until started).
    pub fn power_on(&self) {
        self.lock().off = false;
    }
}

impl Hypervisor for MemoryHypervisor {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Domain>, HypervisorError>> {
        let out = self.live().map(|g| g.domains.values().cloned().collect());
        Box::pin(async move { out })
    }

    fn define<'a>(&'a self, xml: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let r = (|| {
            let refused =
                |m: &str| HypervisorError::Refused { op: "define", name: String::new(), message: m.to_string() };
            let name = field(xml, "name").ok_or_else(|| refused("no <name>"))?.to_string();
            let uuid = field(xml, "uuid").ok_or_else(|| refused("no <uuid>"))?.to_string();
            let mut g = self.live()?;
            if g.domains.values().any(|d| d.uuid == uuid && d.name != name) {
                return Err(refused("uuid already used by another domain"));
            }
            g.domains.entry(name.clone()).or_insert(Domain { name, uuid, state: ActualState::Shutoff, id: None });
            Ok(())
        })();
        Box::pin(async move { r })
    }

    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let r = self.with(name, |d, next| {
            if d.state == ActualState::Running {
                return Err(HypervisorError::Refused {
                    op: "start",
                    name: d.name.clone(),
                    message: "domain is already running".into(),
                });
            }
            *next += 1;
            d.state = ActualState::Running;
            d.id = Some(*next);
            Ok(())
        });
        Box::pin(async move { r })
    }

    fn shutdown<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        self.destroy(name)
    }

    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let r = self.with(name, |d, _| {
            if d.state != ActualState::Running && d.state != ActualState::Paused {
                return Err(HypervisorError::Refused {
                    op: "destroy",
                    name: d.name.clone(),
                    message: "domain is not running".into(),
                });
            }
            d.state = ActualState::Shutoff;
            d.id = None;
            Ok(())
        });
        Box::pin(async move { r })
    }

    fn undefine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let r = self.live().and_then(|mut g| match g.domains.remove(name) {
            Some(_) => Ok(()),
            None => Err(HypervisorError::NoDomain(name.to_string())),
        });
        Box::pin(async move { r })
    }

    /// Like libvirt's test driver: no migration.
    /// The memory hypervisor has no migration: nothing arrives live.
    fn arrival<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Arrival>, HypervisorError>> {
        let r = self.with(name, |_, _| Ok(None));
        Box::pin(async move { r })
    }

    fn abort_job<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let r = self.with(name, |_, _| Ok(()));
        Box::pin(async move { r })
    }

    fn migrate_live<'a>(
        &'a self,
        name: &'a str,
        _dest_uri: &'a str,
        _deadline: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        let r = self.with(name, |d, _| {
            Err(HypervisorError::Refused {
                op: "migrate",
                name: d.name.clone(),
                message: "this hypervisor has no migration".into(),
            })
        });
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn behaves_like_the_test_driver() {
        let h = MemoryHypervisor::new();
        let xml = "<domain type='test'><name>vm1</name><uuid>11111111-2222-3333-4444-555555555555</uuid></domain>";
        h.define(xml).await.expect("define");
        assert_eq!(h.list().await.expect("list")[0].state, ActualState::Shutoff);
        h.start("vm1").await.expect("start");
        let id = h.list().await.expect("list")[0].id;
        assert!(id.is_some());
        assert!(h.start("vm1").await.is_err(), "already running");
        h.shutdown("vm1").await.expect("shutdown");
        assert_eq!(h.list().await.expect("list")[0].state, ActualState::Shutoff);
        h.start("vm1").await.expect("start");
        h.power_off();
        // Powered off: nothing answers, nothing starts.
        assert!(matches!(h.list().await, Err(HypervisorError::Unavailable(_))));
        assert!(matches!(h.start("vm1").await, Err(HypervisorError::Unavailable(_))));
        assert_eq!(h.domains()[0].state, ActualState::Shutoff);
        h.power_on();
        assert_eq!(
            h.list().await.expect("list")[0],
            Domain {
                name: "vm1".into(),
                uuid: "11111111-2222-3333-4444-555555555555".into(),
                state: ActualState::Shutoff,
                id: None
            }
        );
        h.undefine("vm1").await.expect("undefine");
        assert_eq!(h.start("vm1").await, Err(HypervisorError::NoDomain("vm1".into())));
        assert!(matches!(h.define("<domain/>").await, Err(HypervisorError::Refused { .. })));
    }
}
