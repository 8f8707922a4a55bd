//! A node's hypervisor: herd's `MemoryHypervisor`, dead while the host is powered off.
//!
//! Power-off stops every domain at once (the BMC does that, `bmc.rs`); until the driver has
//! crashed the host's daemon, this wrapper refuses every call, so a daemon that has not yet
//! noticed it lost power cannot start anything.

use std::time::Duration;

use futures::future::BoxFuture;
use herd::hypervisor::memory::MemoryHypervisor;
use herd::hypervisor::{Domain, Hypervisor, HypervisorError};

use crate::world::World;

pub struct SimHypervisor {
    pub world: World,
    pub me: usize,
    pub inner: MemoryHypervisor,
}

impl SimHypervisor {
    fn check(&self) -> Result<(), HypervisorError> {
        if self.world.lock().machines[self.me].powered {
            Ok(())
        } else {
            Err(HypervisorError::Unavailable("host powered off".into()))
        }
    }
}

impl Hypervisor for SimHypervisor {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Domain>, HypervisorError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.list().await
        })
    }

    fn define<'a>(&'a self, xml: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.define(xml).await
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.start(name).await
        })
    }

    fn shutdown<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.shutdown(name).await
        })
    }

    fn destroy<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.destroy(name).await
        })
    }

    fn undefine<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.undefine(name).await
        })
    }

    fn migrate_live<'a>(
        &'a self,
        name: &'a str,
        dest_uri: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            self.check()?;
            self.inner.migrate_live(name, dest_uri, deadline).await
        })
    }
}
