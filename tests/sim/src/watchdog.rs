//! The simulated hardware watchdog of a self-fencing node (`[fencing] watchdog`): the daemon's
//! self-fence guard arms and feeds it through `herd::fence::selffence::WatchdogDevice`; left
//! unfed past its timeout it resets the machine — power off (its domains stop), then on again
//! [`REBOOT`] later. This is what makes a self-fence real in the simulation: the guard destroys
//! the VMs and stops feeding, and whatever it failed to stop dies with the machine, so the
//! `no-double-run` invariant judges the primary's self-fence records on the ground truth.

use std::time::Duration;

use futures::future::BoxFuture;
use herd::fence::selffence::{Feed, WatchdogDevice};

use crate::world::{now, World};

/// How long a reset machine stays off before it boots again.
pub const REBOOT: Duration = Duration::from_secs(2);

/// An armed watchdog.
#[derive(Clone, Copy, Debug)]
pub struct Armed {
    pub fed_at: Duration,
    pub timeout: Duration,
}

/// Machine `machine`'s watchdog device, armed with `timeout`.
pub struct SimWatchdog {
    pub world: World,
    pub machine: usize,
    pub timeout: Duration,
}

impl WatchdogDevice for SimWatchdog {
    fn open(&self, _path: &str) -> Result<Box<dyn Feed>, String> {
        // Opened again by a restarted daemon, an armed watchdog is only fed.
        let was =
            self.world.lock().machines[self.machine].watchdog.replace(Armed { fed_at: now(), timeout: self.timeout });
        if was.is_none() {
            self.world.trace(format!("{}: watchdog armed", self.world.name(self.machine)));
        }
        Ok(Box::new(SimFeed { world: self.world.clone(), machine: self.machine }))
    }
}

struct SimFeed {
    world: World,
    machine: usize,
}

impl Feed for SimFeed {
    fn feed(&mut self, _deadline: Duration) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if let Some(a) = self.world.lock().machines[self.machine].watchdog.as_mut() {
                a.fed_at = now();
            }
            Ok(())
        })
    }
}

/// The driver's step: resets the machines whose watchdog went unfed past its timeout, and
/// boots those whose reset is over.
pub fn step(world: &World, now: Duration) {
    let fired: Vec<usize> = {
        let w = world.lock();
        w.machines
            .iter()
            .enumerate()
            .filter(|(_, m)| m.powered && m.watchdog.is_some_and(|a| now.saturating_sub(a.fed_at) > a.timeout))
            .map(|(i, _)| i)
            .collect()
    };
    for i in fired {
        world.trace(format!("{}: watchdog unfed: the machine resets", world.name(i)));
        crate::bmc::power_off(world, i);
        world.lock().reboots.push((now + REBOOT, i));
    }
    let due: Vec<usize> = {
        let mut w = world.lock();
        let (due, later): (Vec<_>, Vec<_>) = w.reboots.drain(..).partition(|(at, _)| *at <= now);
        w.reboots = later;
        due.into_iter().map(|(_, i)| i).collect()
    };
    for i in due {
        // Unless its BMC powered it on meanwhile (a fence with `fence_action = reboot`).
        if !world.lock().machines[i].powered {
            world.trace(format!("{}: boots after its watchdog reset", world.name(i)));
            crate::bmc::power_on(world, i);
        }
    }
}
