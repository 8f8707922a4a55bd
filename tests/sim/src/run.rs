//! One seed, start to verdict: five nodes (three coordinators, two hypervisors; every node
//! hosts VMs), the client's setup, a seeded fault schedule, the invariants after every step,
//! healing, convergence, and the client history at the end.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use herd::breakage::{self, Breakage};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::client::{self, History};
use crate::faults::{self, Fault, Scheduled, LATENCY};
use crate::invariants::{converge, Checker, Violation};
use crate::world::{PowerRequest, World};

/// The simulated wall clock starts here (2027-01-15): herd's leader stamps are this plus
/// simulated time.
pub const EPOCH_MS: u64 = 1_800_000_000_000;

/// The cluster: three coordinators and two hypervisors.
pub const NODES: [(&str, bool); 5] = [("c1", true), ("c2", true), ("c3", true), ("h1", false), ("h2", false)];

/// How long after the heal the cluster has to converge.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Options {
    /// One mechanism deliberately broken (to show an invariant can fail).
    pub breakage: Option<Breakage>,
    /// How long faults are injected, after the setup.
    pub fault_window: Duration,
    /// Hypervisors join as clients outside Raft (the default `[cluster] membership`);
    /// `false`: as Raft learners (`membership = "learner"`, clusters made before clients).
    pub clients: bool,
    /// Instead of the seeded schedule, one fault: this node isolated (cut from every other,
    /// its BMC silent) for [`ISOLATION`] from a second after the setup — the self-fence
    /// scenario (`HERD_SIM_SCENARIO=isolate-h2`).
    pub isolate: Option<usize>,
    /// Instead of the seeded schedule, one fault: the coordinator the follower outside Raft
    /// follows cut from the other coordinators for [`CUT`] (`HERD_SIM_SCENARIO=cut-followed`):
    /// its session must move, within the serving window (`served-in-contact`).
    pub cut_followed: bool,
}

/// How long the cut of the followed coordinator lasts.
pub const CUT: Duration = Duration::from_secs(8);

/// How long the isolation scenario lasts: past h2's self-fence (8 s), its watchdog (5 s) and
/// the margin (5 s), with the failed fence's retry on top.
pub const ISOLATION: Duration = Duration::from_secs(26);

impl Default for Options {
    fn default() -> Self {
        Options {
            breakage: None,
            fault_window: Duration::from_secs(20),
            clients: true,
            isolate: None,
            cut_followed: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub trace: Vec<String>,
    /// SHA-256 of the trace: equal for two runs of one seed.
    pub trace_hash: String,
    pub simulated: Duration,
    pub faults: usize,
    pub converged_after: Option<Duration>,
    /// The nodes recorded self-fenced (from the committed events), each as `name:how` — `how`
    /// being `session` (the coordinators' evidence) or `keepalive` (its age).
    pub self_fenced: Vec<String>,
    /// How often the follower outside Raft moved to another coordinator after a failure, from
    /// the start of the faults.
    pub follower_moves: u64,
    /// The isolation scenario: its node's committed record said it self-fences on its session
    /// alone when the isolation began.
    pub isolated_alone: bool,
}

thread_local! {
    static IDS: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

fn sim_clock() -> u64 {
    EPOCH_MS + u64::try_from(crate::world::now().as_millis()).unwrap_or(u64::MAX)
}

fn sim_random(buf: &mut [u8]) {
    IDS.with(|r| match r.borrow_mut().as_mut() {
        Some(rng) => rng.fill_bytes(buf),
        None => buf.fill(0),
    });
}

/// Restores the thread's clock, id source and breakage when a run ends (even by a panic).
struct ThreadSeams;

impl ThreadSeams {
    fn install(seed: u64, b: Option<Breakage>) -> ThreadSeams {
        IDS.with(|r| *r.borrow_mut() = Some(StdRng::seed_from_u64(seed ^ 0x1d5)));
        herd_raft::clock::set_thread_source(Some(sim_clock));
        herd_raft::node::set_thread_random_source(Some(sim_random));
        breakage::set(b);
        ThreadSeams
    }
}

impl Drop for ThreadSeams {
    fn drop(&mut self) {
        IDS.with(|r| *r.borrow_mut() = None);
        herd_raft::clock::set_thread_source(None);
        herd_raft::node::set_thread_random_source(None);
        breakage::set(None);
    }
}

/// Where the run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Setup,
    Faults,
    Healed(Duration),
}

pub fn run(seed: u64, opts: &Options) -> Outcome {
    let _seams = ThreadSeams::install(seed, opts.breakage);
    let dir = Arc::new(tempfile::tempdir().expect("temporary directory"));
    {
        use std::os::unix::fs::PermissionsExt;
        let pw = dir.path().join("bmc-password");
        std::fs::write(&pw, "simulated\n").expect("password file");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let world = World::new(seed, &NODES);
    world.lock().clients = opts.clients;
    world.lock().place_on = opts.isolate.map(|i| NODES[i].0.to_string());
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .simulation_duration(Duration::from_secs(600))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_micros(100))
        .max_message_latency(LATENCY)
        .tcp_capacity(65_536)
        .udp_capacity(65_536)
        .build();
    for (i, (name, _)) in NODES.iter().enumerate() {
        let (w, d) = (world.clone(), dir.clone());
        sim.host(*name, move || crate::host::run(w.clone(), i, d.clone()));
        world.lock().by_ip.insert(sim.lookup(*name), i);
    }
    let history = Arc::new(Mutex::new(History::default()));
    {
        let (world, history) = (world.clone(), history.clone());
        sim.client("operator", async move {
            let mut h = History::default();
            client::setup(&world, &mut h).await?;
            world.lock().setup_done = true;
            let workers: Vec<_> = (0..3).map(|id| tokio::spawn(client::worker(world.clone(), id))).collect();
            for w in workers {
                for (vm, op) in w.await? {
                    h.ops.entry(vm).or_default().push(op);
                }
            }
            client::finish(&world, &mut h).await;
            *history.lock().unwrap_or_else(|p| p.into_inner()) = h;
            Ok(())
        });
    }

    {
        let world = world.clone();
        sim.client("follower", async move { crate::follower::run(world).await });
    }
    let mut checker = Checker::default();
    let mut violations = Vec::new();
    let mut phase = Phase::Setup;
    let mut schedule: Vec<Scheduled> = Vec::new();
    // The follower's moves before the faults (a first poll refused during the setup moves it).
    let mut moves_before = 0;
    let mut isolated_on_session_alone = false;
    let mut active: Vec<(Duration, Fault)> = Vec::new();
    let mut next = 0;
    let mut converged_after = None;
    let mut last_reason = String::new();
    loop {
        let now = sim.elapsed();
        crate::world::set_driver_now(now);
        // Power-offs a slow BMC acknowledged earlier and carries out now.
        let due: Vec<usize> = {
            let mut w = world.lock();
            let (due, later): (Vec<_>, Vec<_>) = w.delayed_offs.drain(..).partition(|(at, _)| *at <= now);
            w.delayed_offs = later;
            due.into_iter().map(|(_, i)| i).collect()
        };
        for i in due {
            crate::bmc::power_off(&world, i);
        }
        // Watchdogs of self-fencing machines left unfed reset them.
        crate::watchdog::step(&world, now);
        // Daemons to start again (after a storage error, or a failed start), unless crashed or
        // powered off meanwhile.
        let restarts = std::mem::take(&mut world.lock().restart_requests);
        for i in restarts {
            let powered = world.lock().machines[i].powered;
            if powered && sim.is_host_running(world.name(i).as_str()) {
                faults::crash(&mut sim, &world, i);
                faults::restart(&mut sim, &world, i);
            }
        }
        // BMC power actions from the last step.
        let requests = std::mem::take(&mut world.lock().power_requests);
        for r in requests {
            match r {
                PowerRequest::Off(i) => faults::crash(&mut sim, &world, i),
                PowerRequest::On(i) => {
                    if !sim.is_host_running(world.name(i).as_str()) {
                        faults::restart(&mut sim, &world, i);
                    }
                }
            }
        }
        match phase {
            Phase::Setup if world.lock().setup_done && isolation_ready(&world, opts, now) => {
                let start = now + Duration::from_secs(1);
                isolated_on_session_alone = isolated_alone(&world, opts);
                let followed = world.lock().follower_acked.map(|(m, _, _)| m);
                moves_before = world.lock().follower_acked.map_or(0, |(_, _, moves)| moves);
                schedule = match (opts.isolate, followed) {
                    (Some(i), _) => vec![Scheduled { at: start, lasts: ISOLATION, fault: Fault::Isolated(i) }],
                    (None, Some(c)) if opts.cut_followed => {
                        vec![Scheduled { at: start, lasts: CUT, fault: Fault::CoordinatorCut(c) }]
                    }
                    _ => faults::schedule(seed, NODES.len(), start, opts.fault_window),
                };
                world.trace(format!("faults: {} scheduled", schedule.len()));
                phase = Phase::Faults;
            }
            Phase::Faults => {
                faults::primary_crash_in_fence(&mut sim, &world);
                while next < schedule.len() && schedule[next].at <= now {
                    let s = &schedule[next];
                    next += 1;
                    if let Fault::Handover = s.fault {
                        world.lock().handover_requests += 1;
                    }
                    if faults::apply(&mut sim, &world, &s.fault) {
                        world.trace(format!("fault start: {:?} for {} ms", s.fault, s.lasts.as_millis()));
                        active.push((s.at + s.lasts, s.fault.clone()));
                    }
                }
                let (ended, still): (Vec<_>, Vec<_>) = active.drain(..).partition(|(end, _)| *end <= now);
                active = still;
                for (_, f) in ended {
                    faults::undo(&mut sim, &world, &f);
                    world.trace(format!("fault end: {f:?}"));
                }
                if next >= schedule.len() && active.is_empty() {
                    faults::heal(&mut sim, &world);
                    world.lock().healed = true;
                    world.trace("healed");
                    phase = Phase::Healed(now);
                }
            }
            Phase::Healed(at) => {
                let (settled, finished) = {
                    let w = world.lock();
                    (w.settled, w.finished)
                };
                if settled && !finished {
                    match converge::converged(&world, checker.one_primary.holding()) {
                        Ok(()) => {
                            converged_after = Some(now - at);
                            world.trace(format!("converged {} ms after the heal", (now - at).as_millis()));
                            world.lock().finished = true;
                        }
                        Err(reason) if now - at > CONVERGE_WITHIN => {
                            violations.push(Violation {
                                invariant: "converge",
                                at: now,
                                detail: format!(
                                    "not converged {} s after the heal: {reason}",
                                    CONVERGE_WITHIN.as_secs()
                                ),
                            });
                            world.lock().finished = true;
                        }
                        Err(reason) => {
                            if reason != last_reason {
                                world.trace(format!("not converged: {reason}"));
                                last_reason = reason;
                            }
                        }
                    }
                }
            }
            Phase::Setup => {}
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                violations.push(Violation { invariant: "run", at: now, detail: format!("a host failed: {e}") });
                break;
            }
        }
        crate::world::set_driver_now(sim.elapsed());
        let found = checker.step(&world, sim.elapsed());
        if !found.is_empty() {
            violations.extend(found);
            break;
        }
        if phase == Phase::Setup && now > Duration::from_secs(120) {
            violations.push(Violation { invariant: "run", at: now, detail: "setup did not finish in 120 s".into() });
            break;
        }
    }
    let simulated = sim.elapsed();
    if violations.is_empty() {
        let h = history.lock().unwrap_or_else(|p| p.into_inner()).clone();
        violations.extend(checker.finish(&h, simulated));
    }
    for v in &violations {
        world.trace(format!("VIOLATION {v}"));
    }
    let self_fenced = self_fence_records(&world);
    let follower_moves = world.lock().follower_acked.map_or(0, |(_, _, moves)| moves).saturating_sub(moves_before);
    let trace = std::mem::take(&mut world.lock().trace);
    let mut hasher = Sha256::new();
    for line in &trace {
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
    }
    // The hosts' tasks hold the world; drop the simulation first.
    drop(sim);
    Outcome {
        seed,
        violations,
        trace,
        trace_hash: hex::encode(hasher.finalize()),
        simulated,
        faults: schedule.len(),
        converged_after,
        self_fenced,
        follower_moves,
        isolated_alone: isolated_on_session_alone,
    }
}

/// Whether the isolation scenario may start: once the node it isolates says, in a committed
/// report, that it self-fences on its session alone (its guard armed the watchdog and the
/// leader kept the flag: every member told it their level) — else the primary could only judge
/// it by its keepalive. At most 20 s after the
/// start; the scenario's test then sees the keepalive record and says so. Always, without it.
fn isolation_ready(world: &World, opts: &Options, now: Duration) -> bool {
    if opts.cut_followed {
        return world.lock().follower_acked.is_some();
    }
    if opts.isolate.is_none() || !opts.clients || now > Duration::from_secs(20) {
        return true;
    }
    isolated_alone(world, opts)
}

/// Whether the node the isolation scenario isolates has a committed report saying it
/// self-fences on its session alone.
fn isolated_alone(world: &World, opts: &Options) -> bool {
    let Some(i) = opts.isolate else { return false };
    let w = world.lock();
    let name = &w.machines[i].name;
    w.machines
        .iter()
        .filter_map(|m| m.daemon.as_ref()?.node.member())
        .any(|m| m.view.read().state.nodes.get(name).is_some_and(|n| n.stats.session_only))
}

/// The self-fence records in the most advanced state any running daemon applied.
fn self_fence_records(world: &World) -> Vec<String> {
    let w = world.lock();
    let records = |l: herd_raft::node::Local| {
        let g = l.view.read();
        let found: Vec<String> = g
            .state
            .events
            .iter()
            .filter(|e| e.kind == "fenced" && e.message.contains("self-fenced"))
            .map(|e| {
                let how = if e.message.contains("acknowledged its session") { "session" } else { "keepalive" };
                format!("{}:{how}", e.node.as_deref().unwrap_or("?"))
            })
            .collect();
        (g.last_applied.map_or(0, |l| l.index), found)
    };
    let newest = w.machines.iter().filter_map(|m| m.daemon.as_ref()?.node.local()).map(records).max_by_key(|(i, _)| *i);
    newest.map(|(_, found)| found).unwrap_or_default()
}
