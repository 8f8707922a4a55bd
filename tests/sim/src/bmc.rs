//! Simulated BMCs behind herd's `Fencer`/`FenceAgent` seam.
//!
//! Each machine's BMC address is `127.0.1.<n>:623` (never contacted: it only names the
//! machine). `off` powers the host off at once — its domains stop, and the driver crashes its
//! daemon after this step; `on` powers it on — the driver restarts the daemon from its kept
//! store. A BMC may be silent (the call runs into its deadline), late, or slow to act: it then
//! acknowledges a power-off at once and carries it out later (the driver does, when due).
//! Every power-off request is recorded with its sender: the fencing-token invariant's ground
//! truth.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use herd::fence::agent::{Action, FenceAgent, FenceError, Fencer, Power};
use herd_storage::model::FencePolicy;

use crate::world::{BmcMode, PowerOffSent, PowerRequest, World};

/// How long a BMC takes to answer when it answers normally.
const ANSWER: Duration = Duration::from_millis(20);

pub fn bmc_addr(i: usize) -> String {
    format!("127.0.1.{}:623", i + 1)
}

fn machine_of(bmc: &str) -> Option<usize> {
    let host = bmc.strip_prefix("127.0.1.")?.strip_suffix(":623")?;
    host.parse::<usize>().ok()?.checked_sub(1)
}

/// The simulated BMCs as machine `from`'s daemon reaches them.
pub struct SimFencer {
    pub world: World,
    pub from: usize,
}

impl Fencer for SimFencer {
    fn agent(&self, policy: &FencePolicy) -> Arc<dyn FenceAgent> {
        let (world, from) = (self.world.clone(), self.from);
        Arc::new(SimBmc { world, from, bmc: policy.bmc.clone(), machine: machine_of(&policy.bmc) })
    }
}

pub struct SimBmc {
    world: World,
    /// The machine whose daemon calls.
    from: usize,
    bmc: String,
    machine: Option<usize>,
}

/// Powers machine `i` off now: its domains stop, and the driver crashes its daemon.
pub fn power_off(world: &World, i: usize) {
    let name = world.name(i);
    let mut w = world.lock();
    let m = &mut w.machines[i];
    if !m.powered {
        return;
    }
    m.powered = false;
    m.powered_off_at = Some(crate::world::now());
    m.watchdog = None;
    m.hv.power_off();
    w.power_requests.push(PowerRequest::Off(i));
    drop(w);
    world.trace(format!("bmc {name}: power off"));
}

/// Powers machine `i` on by hand, as its BMC's power-on does (the operator's `ipmitool chassis
/// power on`); a machine that is on is left alone.
pub fn power_on(world: &World, i: usize) {
    let name = world.name(i);
    let mut w = world.lock();
    let m = &mut w.machines[i];
    if m.powered {
        return;
    }
    m.powered = true;
    m.was_off = m.powered_off_at.map(|off| (off, crate::world::now()));
    m.powered_off_at = None;
    m.hv.power_on();
    w.power_requests.push(PowerRequest::On(i));
    drop(w);
    world.trace(format!("operator: power {name} on"));
}

impl FenceAgent for SimBmc {
    fn call(&self, action: Action, deadline: Duration) -> BoxFuture<'_, Result<Power, FenceError>> {
        Box::pin(async move {
            let Some(i) = self.machine.filter(|i| *i < self.world.len()) else {
                return Err(FenceError::Refused { bmc: self.bmc.clone() });
            };
            let mode = self.world.lock().machines[i].bmc;
            let delay = match mode {
                BmcMode::Normal | BmcMode::SlowOff(_) => ANSWER,
                BmcMode::Late(d) => d,
                BmcMode::Silent => Duration::MAX,
            };
            if delay >= deadline {
                tokio::time::sleep(deadline).await;
                return Err(FenceError::Timeout { bmc: self.bmc.clone(), timeout: deadline });
            }
            tokio::time::sleep(delay).await;
            let name = self.world.name(i);
            let mut w = self.world.lock();
            let powered = w.machines[i].powered;
            let power = match action {
                Action::Status if powered => Power::On,
                Action::Status => Power::Off,
                Action::Off => {
                    w.power_offs.push(PowerOffSent { at: crate::world::now(), from: self.from, victim: i });
                    match mode {
                        BmcMode::SlowOff(d) if powered => {
                            w.delayed_offs.push((crate::world::now() + d, i));
                            drop(w);
                            self.world
                                .trace(format!("bmc {name}: power off acknowledged, due in {} ms", d.as_millis()));
                        }
                        _ => {
                            drop(w);
                            power_off(&self.world, i);
                        }
                    }
                    Power::Off
                }
                Action::On => {
                    if !powered {
                        let m = &mut w.machines[i];
                        m.powered = true;
                        m.was_off = m.powered_off_at.map(|off| (off, crate::world::now()));
                        m.powered_off_at = None;
                        m.hv.power_on();
                        w.power_requests.push(PowerRequest::On(i));
                        drop(w);
                        self.world.trace(format!("bmc {name}: power on"));
                    }
                    Power::On
                }
            };
            Ok(power)
        })
    }
}
