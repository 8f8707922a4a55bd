//! The seeded fault schedule, and how each fault is applied to the simulation.
//!
//! A schedule is a list of faults, each starting at a simulated time and lasting a while,
//! drawn from the seed. To add a fault: a variant of [`Fault`], a way to draw it in
//! [`schedule`], its start and end in [`apply`] / [`undo`] (undo must restore exactly what
//! apply changed; [`heal`] then clears anything left).

use std::time::Duration;

use herd_storage::identity::{Identity, IdentityStore};
use herd_storage::mem_store::MemLogCopy;
use herd_storage::sm::StoredSnapshot;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use turmoil::Sim;

use crate::links::{cut, cut_oneway, hold, mend, mend_oneway, release};
use crate::net::NETWORKS;
use crate::world::{BmcMode, World};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The daemon process dies (its VMs keep running) and is restarted when the fault ends.
    Crash(usize),
    /// The machines split into two groups that cannot reach each other.
    Partition(Vec<usize>),
    /// Coordinator `c` cannot reach the other coordinators (nor they it); every hypervisor still
    /// reaches every coordinator — a client following `c` must move on, not self-fence.
    CoordinatorCut(usize),
    /// `from` cannot reach `to`; the other way works.
    OneWay { from: usize, to: usize },
    /// One heartbeat network of one machine is cut both ways (Raft and the other network work).
    NetCut { net: usize, node: usize },
    /// Heartbeat datagrams are lost at random.
    Loss { pct: u32 },
    /// Every message may be delayed up to this long.
    Delay { max_ms: u64 },
    /// Everything to and from the machine is held, then delivered at once: a paused process.
    Pause(usize),
    /// The machine's BMC does not answer.
    BmcSilent(usize),
    /// The machine is cut from every other one and its BMC does not answer (a host whose
    /// switch died with its BMC's): its fence fails, and only a self-fence lets its VMs be
    /// recovered — h2's policy (`host::SELF_FENCING`).
    Isolated(usize),
    /// The machine's BMC answers late.
    BmcLate { node: usize, ms: u64 },
    /// The client hands the primary role to another coordinator.
    Handover,
    /// `node` hangs (its links held, as `Pause`) long enough to be fenced; as soon as the fence
    /// is decided, the primary's daemon is crashed (restarted when the fault ends) and the
    /// victim's BMC carries the power-off out `bmc_ms` late — a new primary inherits a pending
    /// fence whose power-off may be on its way.
    PrimaryCrashInFence { node: usize, bmc_ms: u64 },
    /// `node`'s store refuses every write (a full disk) until the fault ends.
    StoreFails(usize),
    /// A copy of `node`'s store (log, snapshot, identity) is taken when the fault starts; when
    /// it ends the daemon is stopped, the copy put back in place of the store, and the daemon
    /// started again: an operator restoring a backup. Its log went backwards.
    Restore(usize),
}

#[derive(Clone, Debug)]
pub struct Scheduled {
    pub at: Duration,
    pub lasts: Duration,
    pub fault: Fault,
}

/// The youngest copy a `Restore` puts back.
const MIN_COPY_AGE: Duration = Duration::from_secs(3);

/// Faults for a run whose fault window is `[start, start + window)`; every fault has ended by
/// the window's end.
pub fn schedule(seed: u64, n: usize, start: Duration, window: Duration) -> Vec<Scheduled> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa01_75ed);
    let mut out = Vec::new();
    let mut t = start;
    let end = start + window;
    // One restored store per run: two restored coordinators of three leave no quorum that can
    // be trusted (the cluster must then be rebuilt — outside what the invariants judge).
    let mut restored = false;
    loop {
        t += Duration::from_millis(rng.random_range(300..2500));
        if t >= end {
            break;
        }
        let lasts = Duration::from_millis(rng.random_range(200..6000)).min(end - t);
        let node = rng.random_range(0..n);
        let fault = match rng.random_range(0..13) {
            0 => Fault::Crash(node),
            1 if rng.random_bool(0.3) => {
                let c = coordinators();
                Fault::CoordinatorCut(c[node % c.len()])
            }
            1 => {
                let mut group: Vec<usize> = (0..n).filter(|_| rng.random_bool(0.4)).collect();
                if group.is_empty() {
                    group.push(node);
                }
                Fault::Partition(group)
            }
            2 => {
                let to = (node + rng.random_range(1..n)) % n;
                Fault::OneWay { from: node, to }
            }
            3 => Fault::NetCut { net: rng.random_range(0..NETWORKS.len()), node },
            4 => Fault::Loss { pct: rng.random_range(5..40) },
            5 => Fault::Delay { max_ms: rng.random_range(5..120) },
            6 => Fault::Pause(node),
            7 if rng.random_bool(0.4) => Fault::Isolated(node),
            7 => Fault::BmcSilent(node),
            8 => Fault::BmcLate { node, ms: rng.random_range(100..3000) },
            9 => Fault::PrimaryCrashInFence { node, bmc_ms: rng.random_range(500..3000) },
            10 => Fault::StoreFails(node),
            // The copy must be older than what herd promises to notice: the log mark is kept
            // once a second, and the README warns a copy from a second or two before the
            // stop may go unnoticed. Too near the window's end, a crash instead.
            11 if !restored && end - t >= MIN_COPY_AGE => {
                restored = true;
                Fault::Restore(node)
            }
            11 => Fault::Crash(node),
            _ => Fault::Handover,
        };
        // A hang must outlast the loss and fence_after times for the fence to be decided.
        let lasts = match fault {
            Fault::PrimaryCrashInFence { .. } => lasts.max(Duration::from_millis(4500)).min(end - t),
            // Long enough, often, for a self-fence to be recorded (its deadline, the watchdog
            // and the margin: 18 s for h2; the isolation scenario is what reaches it).
            Fault::Isolated(_) => Duration::from_millis(rng.random_range(3000..18_000)).min(end - t),
            // The copy's age: long enough for the cluster to have recorded more than it holds.
            Fault::Restore(_) => Duration::from_millis(rng.random_range(3000..15_000)).min(end - t),
            _ => lasts,
        };
        out.push(Scheduled { at: t, lasts, fault });
    }
    out
}

/// The coordinators' indexes.
fn coordinators() -> Vec<usize> {
    crate::run::NODES.iter().enumerate().filter(|(_, (_, coordinator))| *coordinator).map(|(i, _)| i).collect()
}

fn others(n: usize, group: &[usize]) -> Vec<usize> {
    (0..n).filter(|i| !group.contains(i)).collect()
}

/// Starts `f`. Returns whether it did something (a crash of a powered-off host does nothing).
pub fn apply(sim: &mut Sim<'_>, world: &World, f: &Fault) -> bool {
    let n = world.len();
    match f {
        Fault::Crash(i) => {
            let powered = world.lock().machines[*i].powered;
            if !powered {
                return false;
            }
            crash(sim, world, *i);
        }
        Fault::Partition(group) => {
            for a in group {
                for b in others(n, group) {
                    cut(sim, world, *a, b);
                }
            }
        }
        Fault::CoordinatorCut(c) => {
            for o in coordinators().into_iter().filter(|o| o != c) {
                cut(sim, world, *c, o);
            }
        }
        Fault::OneWay { from, to } => cut_oneway(sim, world, *from, *to),
        Fault::NetCut { net, node } => {
            let mut w = world.lock();
            for other in (0..n).filter(|o| o != node) {
                w.cuts.insert((NETWORKS[*net].0.to_string(), *node, other));
                w.cuts.insert((NETWORKS[*net].0.to_string(), other, *node));
            }
        }
        Fault::Loss { pct } => world.lock().udp_loss_pct = *pct,
        Fault::Delay { max_ms } => sim.set_max_message_latency(Duration::from_millis(*max_ms)),
        Fault::Pause(i) => {
            for o in (0..n).filter(|o| o != i) {
                hold(sim, world, *i, o);
            }
        }
        Fault::BmcSilent(i) => world.lock().machines[*i].bmc = BmcMode::Silent,
        Fault::Isolated(i) => {
            for o in (0..n).filter(|o| o != i) {
                cut(sim, world, *i, o);
            }
            world.lock().machines[*i].bmc = BmcMode::Silent;
        }
        Fault::BmcLate { node, ms } => world.lock().machines[*node].bmc = BmcMode::Late(Duration::from_millis(*ms)),
        Fault::PrimaryCrashInFence { node, bmc_ms } => {
            world.lock().crash_primary_on_fence = Some(Duration::from_millis(*bmc_ms));
            for o in (0..n).filter(|o| o != node) {
                hold(sim, world, *node, o);
            }
        }
        Fault::StoreFails(i) => world.lock().machines[*i].log.set_failing(true),
        Fault::Restore(i) => {
            let mut w = world.lock();
            let m = &mut w.machines[*i];
            if m.backup.is_some() {
                return false;
            }
            m.backup = Some(Backup {
                log: m.log.copy(),
                snapshot: m.backend.copy(),
                identity: m.identity.load().ok().flatten(),
            });
        }
        Fault::Handover => {}
    }
    true
}

/// A copy of a machine's store (see [`Fault::Restore`]).
pub struct Backup {
    log: MemLogCopy,
    snapshot: Option<StoredSnapshot>,
    identity: Option<Identity>,
}

/// Ends a `Restore`: the daemon stopped (if it runs), the copy put back, the daemon started
/// again (if its machine is powered; a powered-off machine boots from the copy later).
fn restore(sim: &mut Sim<'_>, world: &World, i: usize) {
    let Some(b) = world.lock().machines[i].backup.take() else { return };
    let name = world.name(i);
    let running = sim.is_host_running(name.as_str());
    if running {
        crash(sim, world, i);
    }
    {
        let w = world.lock();
        let m = &w.machines[i];
        m.log.restore(&b.log);
        m.backend.restore(b.snapshot);
        m.identity.restore(b.identity);
    }
    world.trace(format!("{name}: store restored from the earlier copy"));
    let powered = world.lock().machines[i].powered;
    if powered {
        restart(sim, world, i);
    }
}

/// Fires an armed `PrimaryCrashInFence` once a non-manual fence is pending: the primary's
/// daemon is crashed, the victim's BMC made slow to act. Returns what it did (primary, victim).
pub fn primary_crash_in_fence(sim: &mut Sim<'_>, world: &World) -> Option<(usize, usize)> {
    let delay = world.lock().crash_primary_on_fence?;
    let (holder, victim) = {
        let w = world.lock();
        let holder =
            (0..w.machines.len()).find(|i| w.machines[*i].daemon.as_ref().is_some_and(|d| d.primary.holding()))?;
        let member = w.machines[holder].daemon.as_ref()?.node.member()?;
        let g = member.view.read();
        let victim = g.state.nodes.values().find(|n| n.fence.pending.as_ref().is_some_and(|p| !p.manual))?;
        (holder, w.machines.iter().position(|m| m.name == victim.name)?)
    };
    {
        let mut w = world.lock();
        w.crash_primary_on_fence = None;
        w.machines[victim].bmc = BmcMode::SlowOff(delay);
        w.fence_crashed.push(holder);
    }
    crash(sim, world, holder);
    world.trace(format!(
        "fault fired: primary {} crashed with a fence of {} pending",
        world.name(holder),
        world.name(victim)
    ));
    Some((holder, victim))
}

/// Ends `f` (only if `apply` did something).
pub fn undo(sim: &mut Sim<'_>, world: &World, f: &Fault) {
    let n = world.len();
    let name = |i: usize| world.name(i);
    match f {
        Fault::Crash(i) => {
            let powered = world.lock().machines[*i].powered;
            if powered && !sim.is_host_running(name(*i).as_str()) {
                restart(sim, world, *i);
            }
        }
        Fault::Partition(group) => {
            for a in group {
                for b in others(n, group) {
                    mend(sim, world, *a, b);
                }
            }
        }
        Fault::CoordinatorCut(c) => {
            for o in coordinators().into_iter().filter(|o| o != c) {
                mend(sim, world, *c, o);
            }
        }
        Fault::OneWay { from, to } => mend_oneway(sim, world, *from, *to),
        Fault::NetCut { net, node } => {
            let mut w = world.lock();
            for other in (0..n).filter(|o| o != node) {
                w.cuts.remove(&(NETWORKS[*net].0.to_string(), *node, other));
                w.cuts.remove(&(NETWORKS[*net].0.to_string(), other, *node));
            }
        }
        Fault::Loss { .. } => world.lock().udp_loss_pct = 0,
        Fault::Delay { .. } => sim.set_max_message_latency(LATENCY),
        Fault::Pause(i) => {
            for o in (0..n).filter(|o| o != i) {
                release(sim, world, *i, o);
            }
        }
        Fault::BmcSilent(i) => world.lock().machines[*i].bmc = BmcMode::Normal,
        Fault::Isolated(i) => {
            for o in (0..n).filter(|o| o != i) {
                mend(sim, world, *i, o);
            }
            world.lock().machines[*i].bmc = BmcMode::Normal;
        }
        Fault::BmcLate { node, .. } => world.lock().machines[*node].bmc = BmcMode::Normal,
        Fault::PrimaryCrashInFence { node, .. } => {
            for o in (0..n).filter(|o| o != node) {
                release(sim, world, *node, o);
            }
            let crashed = {
                let mut w = world.lock();
                w.crash_primary_on_fence = None;
                for m in &mut w.machines {
                    if matches!(m.bmc, BmcMode::SlowOff(_)) {
                        m.bmc = BmcMode::Normal;
                    }
                }
                std::mem::take(&mut w.fence_crashed)
            };
            for i in crashed {
                let powered = world.lock().machines[i].powered;
                if powered && !sim.is_host_running(name(i).as_str()) {
                    restart(sim, world, i);
                }
            }
        }
        Fault::StoreFails(i) => world.lock().machines[*i].log.set_failing(false),
        Fault::Restore(i) => restore(sim, world, *i),
        Fault::Handover => {}
    }
}

/// The network's normal latency bound.
pub const LATENCY: Duration = Duration::from_millis(2);

/// Clears every fault: all links repaired and released, no cuts, no loss, normal latency and
/// BMCs, every powered host's daemon running.
pub fn heal(sim: &mut Sim<'_>, world: &World) {
    let n = world.len();
    crate::links::clear(sim, world);
    sim.set_max_message_latency(LATENCY);
    let mut w = world.lock();
    w.cuts.clear();
    w.udp_loss_pct = 0;
    w.crash_primary_on_fence = None;
    w.fence_crashed.clear();
    for m in &mut w.machines {
        m.bmc = BmcMode::Normal;
        m.log.set_failing(false);
    }
    drop(w);
    for i in 0..n {
        let powered = world.lock().machines[i].powered;
        if powered && !sim.is_host_running(world.name(i).as_str()) {
            restart(sim, world, i);
        }
    }
}

/// Crashes node `i`'s daemon (its machine keeps running unless the BMC powered it off).
pub fn crash(sim: &mut Sim<'_>, world: &World, i: usize) {
    let name = world.name(i);
    let released = {
        let mut w = world.lock();
        w.machines[i].daemon = None;
        w.machines[i].inbox = None;
        // systemd's ExecStopPost (`herd release`) takes the floating address off after any end
        // of the daemon; a powered-off host holds nothing either.
        w.address_holders.remove(&i)
    };
    sim.crash(name.as_str());
    world.trace(format!("{name}: crashed{}", if released { " (floating address released)" } else { "" }));
}

/// Starts node `i`'s daemon again from its kept store.
pub fn restart(sim: &mut Sim<'_>, world: &World, i: usize) {
    let name = world.name(i);
    sim.bounce(name.as_str());
    world.trace(format!("{name}: restarted"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The menu draws coordinator cuts, each of a coordinator (the run's first three nodes are
    /// not assumed: the cut names an index `NODES` marks as one).
    #[test]
    fn the_menu_draws_coordinator_cuts_of_coordinators() {
        let window = Duration::from_secs(20);
        let cuts: Vec<usize> = (0..200)
            .flat_map(|seed| schedule(seed, crate::run::NODES.len(), Duration::from_secs(1), window))
            .filter_map(|s| match s.fault {
                Fault::CoordinatorCut(c) => Some(c),
                _ => None,
            })
            .collect();
        assert!(cuts.len() > 20, "{} coordinator cuts in 200 runs", cuts.len());
        assert!(cuts.iter().all(|c| coordinators().contains(c)), "{cuts:?}");
    }
}
