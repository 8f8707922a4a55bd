//! The simulation's test entry points.
//!
//! - `ci_seeds`: a fixed set of seeds, each in its own process (nothing thread-local carries
//!   over between seeds), two at a time; part of `make test`.
//! - `same_seed_same_trace`: one seed twice, in two processes; the trace hashes must match.
//! - `broken_*`: each invariant's broken variant must be caught within the CI seed set.
//! - `soak` (ignored): `HERD_SIM_SEEDS=1000 cargo test --release --test seeds soak -- --ignored`.
//! - `one_seed` (ignored): runs `HERD_SIM_SEED` in this process and prints its verdict — the
//!   command a failing seed prints to replay it.

use std::process::Command;
use std::time::Instant;

use herd::breakage::Breakage;
use herd_sim::run::{run, Options};

/// Seeds `make test` runs.
const CI_SEEDS: std::ops::Range<u64> = 1..33;

fn breakage_from_env() -> Option<Breakage> {
    match std::env::var("HERD_SIM_BREAK").ok()?.as_str() {
        "primary-ignores-lease" => Some(Breakage::PrimaryIgnoresLease),
        "start-before-release" => Some(Breakage::StartBeforeRelease),
        "fence-on-own-view" => Some(Breakage::FenceOnOwnView),
        "stale-reads" => Some(Breakage::StaleReads),
        "no-starts" => Some(Breakage::NoStarts),
        "ack-without-commit" => Some(Breakage::AckWithoutCommit),
        "fence-without-token" => Some(Breakage::FenceWithoutToken),
        "changes-without-requests" => Some(Breakage::ChangesWithoutRequests),
        "stale-outlines" => Some(Breakage::StaleOutlines),
        "self-fenced-without-evidence" => Some(Breakage::SelfFencedWithoutEvidence),
        "serve-without-contact" => Some(Breakage::ServeWithoutContact),
        other => panic!("unknown HERD_SIM_BREAK {other:?}"),
    }
}

fn replay_command(seed: u64, brk: Option<&str>, clients: bool) -> String {
    format!(
        "cd tests/sim && {}{}HERD_SIM_SEED={seed} cargo test --test seeds one_seed -- --ignored --nocapture",
        brk.map(|b| format!("HERD_SIM_BREAK={b} ")).unwrap_or_default(),
        if clients { "" } else { "HERD_SIM_LEARNERS=1 " }
    )
}

/// The hypervisors are clients outside Raft (the default) unless `HERD_SIM_LEARNERS` is set
/// (then Raft learners, as in clusters made before clients; for `soak` and replays).
fn clients_from_env() -> bool {
    std::env::var_os("HERD_SIM_LEARNERS").is_none()
}

/// Runs `HERD_SIM_SEED` here and prints one verdict line the parent parses.
#[test]
#[ignore = "runs one seed from HERD_SIM_SEED; used by the other tests and to replay"]
fn one_seed() {
    let seed: u64 = std::env::var("HERD_SIM_SEED").ok().and_then(|s| s.parse().ok()).expect("HERD_SIM_SEED=<u64>");
    if std::env::var_os("HERD_SIM_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("HERD_SIM_LOG"))
            .with_timer(SimTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let started = Instant::now();
    let (isolate, cut_followed) = match std::env::var("HERD_SIM_SCENARIO").ok().as_deref() {
        None => (None, false),
        Some("isolate-h2") => (Some(4), false),
        Some("cut-followed") => (None, true),
        Some(other) => panic!("unknown HERD_SIM_SCENARIO {other:?}"),
    };
    let opts = Options {
        breakage: breakage_from_env(),
        clients: clients_from_env(),
        isolate,
        cut_followed,
        ..Options::default()
    };
    let out = run(seed, &opts);
    if std::env::var_os("HERD_SIM_TRACE").is_some() || !out.violations.is_empty() {
        for line in &out.trace {
            eprintln!("{line}");
        }
    }
    println!(
        "VERDICT seed={seed} hash={} violations={} faults={} simulated_s={:.1} wall_s={:.1} converged_ms={} self_fenced={} follower_moves={} isolated_alone={}",
        out.trace_hash,
        out.violations.len(),
        out.faults,
        out.simulated.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        out.converged_after.map_or(-1, |d| d.as_millis() as i64),
        if out.self_fenced.is_empty() { "-".to_string() } else { out.self_fenced.join(",") },
        out.follower_moves,
        out.isolated_alone,
    );
    for v in &out.violations {
        println!("VIOLATION {v}");
    }
}

/// Log lines stamped with simulated time (as the trace is), not the wall clock.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{:>8.3}", herd_sim::world::now().as_secs_f64())
    }
}

#[derive(Debug)]
struct Verdict {
    seed: u64,
    hash: String,
    violations: Vec<String>,
    line: String,
}

/// Runs one seed in a child process (this test binary, `one_seed`).
fn child(seed: u64, brk: Option<&str>, clients: bool, scenario: Option<&str>) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("test binary"));
    c.args(["one_seed", "--exact", "--ignored", "--nocapture", "--test-threads=1"]);
    c.env("HERD_SIM_SEED", seed.to_string());
    c.env_remove("HERD_SIM_TRACE");
    match scenario {
        Some(s) => c.env("HERD_SIM_SCENARIO", s),
        None => c.env_remove("HERD_SIM_SCENARIO"),
    };
    if clients {
        c.env_remove("HERD_SIM_LEARNERS");
    } else {
        c.env("HERD_SIM_LEARNERS", "1");
    }
    match brk {
        Some(b) => c.env("HERD_SIM_BREAK", b),
        None => c.env_remove("HERD_SIM_BREAK"),
    };
    c.stderr(std::process::Stdio::null());
    c
}

fn verdict_of(seed: u64, out: std::process::Output) -> Verdict {
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The harness may have printed "test one_seed ... " on the same line.
    let line = stdout.lines().find_map(|l| l.find("VERDICT").map(|k| l[k..].to_string())).unwrap_or_default();
    assert!(!line.is_empty(), "seed {seed}: the child printed no verdict (status {:?}):\n{stdout}", out.status);
    let hash = line.split_whitespace().find_map(|w| w.strip_prefix("hash=")).unwrap_or_default().to_string();
    let violations = stdout.lines().filter(|l| l.starts_with("VIOLATION")).map(str::to_string).collect();
    Verdict { seed, hash, violations, line }
}

/// Runs `seeds`, `parallel` children at a time, the hypervisors clients outside Raft.
fn run_seeds(seeds: impl Iterator<Item = u64>, brk: Option<&str>, parallel: usize) -> Vec<Verdict> {
    run_seeds_as(seeds, brk, parallel, true, None)
}

/// [`run_seeds`], with the hypervisors as Raft learners unless `clients`.
fn run_seeds_as(
    seeds: impl Iterator<Item = u64>,
    brk: Option<&str>,
    parallel: usize,
    clients: bool,
    scenario: Option<&str>,
) -> Vec<Verdict> {
    let seeds: Vec<u64> = seeds.collect();
    let mut out = Vec::new();
    for chunk in seeds.chunks(parallel.max(1)) {
        let children: Vec<(u64, std::process::Child)> = chunk
            .iter()
            .map(|s| {
                (
                    *s,
                    child(*s, brk, clients, scenario)
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .expect("spawn a seed"),
                )
            })
            .collect();
        for (seed, c) in children {
            let v = verdict_of(seed, c.wait_with_output().expect("seed child"));
            println!("{}", v.line);
            out.push(v);
        }
    }
    out
}

fn assert_clean(verdicts: &[Verdict], brk: Option<&str>, clients: bool) {
    let bad: Vec<String> = verdicts
        .iter()
        .filter(|v| !v.violations.is_empty())
        .map(|v| {
            format!(
                "seed {}: {}\n  replay: {}",
                v.seed,
                v.violations.join("\n  "),
                replay_command(v.seed, brk, clients)
            )
        })
        .collect();
    assert!(bad.is_empty(), "{} of {} seeds broke an invariant:\n{}", bad.len(), verdicts.len(), bad.join("\n"));
}

#[test]
fn ci_seeds() {
    let started = Instant::now();
    let verdicts = run_seeds(CI_SEEDS, None, 2);
    println!("{} seeds in {:.1} s", verdicts.len(), started.elapsed().as_secs_f64());
    assert_clean(&verdicts, None, true);
}

/// The CI seeds' first half again, with the hypervisors as Raft learners (clusters made
/// before clients were the default).
#[test]
fn ci_seeds_with_learners() {
    let started = Instant::now();
    let verdicts = run_seeds_as(CI_SEEDS.start..CI_SEEDS.start + 16, None, 2, false, None);
    println!("{} seeds with learners in {:.1} s", verdicts.len(), started.elapsed().as_secs_f64());
    assert_clean(&verdicts, None, false);
}

#[test]
fn same_seed_same_trace() {
    let a = run_seeds(std::iter::once(3), None, 1);
    let b = run_seeds(std::iter::once(3), None, 1);
    assert_eq!(a[0].hash, b[0].hash, "seed 3 gave two different traces: the simulation is not deterministic");
    // And another seed is another run.
    let c = run_seeds(std::iter::once(4), None, 1);
    assert_ne!(a[0].hash, c[0].hash, "seeds 3 and 4 gave the same trace: the seed is not used");
}

/// A broken variant must be caught by at least one CI seed, by the named invariant.
fn caught(brk: &str, invariant: &str) {
    let verdicts = run_seeds(CI_SEEDS, Some(brk), 2);
    let hit = verdicts.iter().find(|v| v.violations.iter().any(|l| l.contains(&format!("[{invariant}]"))));
    assert!(
        hit.is_some(),
        "breaking {brk} went unnoticed by [{invariant}] in seeds {CI_SEEDS:?}:\n{}",
        verdicts.iter().map(|v| format!("{} {:?}", v.line, v.violations)).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn broken_lease_is_caught() {
    caught("primary-ignores-lease", "one-primary");
}

#[test]
fn broken_release_is_caught() {
    caught("start-before-release", "no-double-run");
}

#[test]
fn broken_fence_view_is_caught() {
    caught("fence-on-own-view", "fence-justified");
}

#[test]
fn broken_reads_are_caught() {
    caught("stale-reads", "linearizable");
}

#[test]
fn broken_acks_are_caught() {
    // A lost acknowledged write: the final reads cannot be linearized after it.
    caught("ack-without-commit", "linearizable");
}

#[test]
fn broken_fence_token_is_caught() {
    caught("fence-without-token", "fence-authorised");
}

#[test]
fn broken_changes_are_caught() {
    caught("changes-without-requests", "follower");
}

#[test]
fn broken_outlines_are_caught() {
    caught("stale-outlines", "follower");
}

#[test]
fn broken_starts_are_caught() {
    caught("no-starts", "converge");
}

#[test]
#[ignore = "soak: HERD_SIM_SEEDS=1000 (default 100), HERD_SIM_FROM=<first seed>"]
fn soak() {
    let n: u64 = std::env::var("HERD_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let from: u64 = std::env::var("HERD_SIM_FROM").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let started = Instant::now();
    let verdicts = run_seeds_as(from..from + n, None, 2, clients_from_env(), None);
    println!("soak: {} seeds in {:.0} s", verdicts.len(), started.elapsed().as_secs_f64());
    assert_clean(&verdicts, None, clients_from_env());
}

/// Seeds of the isolation scenario (`HERD_SIM_SCENARIO=isolate-h2`): h2 cut from every other
/// node with its BMC silent for `run::ISOLATION`, nothing else.
const ISOLATION_SEEDS: std::ops::Range<u64> = 1..9;

/// h2, isolated with a silent BMC, self-fences (its watchdog resets the machine); its fence
/// fails, and the primary records it self-fenced on the coordinators' evidence that none can
/// have acknowledged its session — every invariant holding, in every seed.
#[test]
fn an_isolated_self_fencing_client_is_recorded_self_fenced_on_its_sessions_evidence() {
    let verdicts = run_seeds_as(ISOLATION_SEEDS, None, 2, true, Some("isolate-h2"));
    assert_clean(&verdicts, None, true);
    for v in &verdicts {
        assert!(
            v.line.contains("self_fenced=h2:session"),
            "seed {}: h2 not recorded self-fenced on its sessions' evidence: {}",
            v.seed,
            v.line
        );
        assert!(v.line.contains("isolated_alone=true"), "seed {}: h2 not on its session alone: {}", v.seed, v.line);
    }
}

/// The same scenario with the primary skipping the evidence: the record comes as soon as the
/// fence failed, while h2 still runs its VMs (it self-fences only after 8 s), and they start
/// elsewhere — `no-double-run` must see it.
#[test]
fn broken_self_fence_evidence_is_caught() {
    let brk = "self-fenced-without-evidence";
    let verdicts = run_seeds_as(ISOLATION_SEEDS, Some(brk), 2, true, Some("isolate-h2"));
    let hit = verdicts.iter().any(|v| v.violations.iter().any(|l| l.contains("[no-double-run]")));
    assert!(
        hit,
        "breaking {brk} went unnoticed by [no-double-run] in seeds {ISOLATION_SEEDS:?}:\n{}",
        verdicts.iter().map(|v| format!("{} {:?}", v.line, v.violations)).collect::<Vec<_>>().join("\n")
    );
}

/// Seeds of the cut scenario (`HERD_SIM_SCENARIO=cut-followed`): the coordinator the follower
/// outside Raft follows is cut from the other coordinators for `run::CUT`, nothing else.
const CUT_SEEDS: std::ops::Range<u64> = 1..5;

/// The cut-off coordinator stops acknowledging the follower's session within its serving
/// window (`served-in-contact`), and the session moves to another coordinator — every
/// invariant holding, in every seed.
#[test]
fn a_cut_off_coordinator_serves_no_session_and_its_session_moves() {
    let verdicts = run_seeds_as(CUT_SEEDS, None, 2, true, Some("cut-followed"));
    assert_clean(&verdicts, None, true);
    for v in &verdicts {
        let moves: u64 = v
            .line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("follower_moves=")?.parse().ok())
            .expect("follower_moves in the verdict");
        assert!(moves >= 1, "seed {}: the follower's session never moved: {}", v.seed, v.line);
    }
}

/// The same scenario with coordinators serving as if always in contact with the leader: the
/// cut-off coordinator goes on answering, and `served-in-contact` must see it.
#[test]
fn broken_contact_is_caught() {
    let brk = "serve-without-contact";
    let verdicts = run_seeds_as(CUT_SEEDS, Some(brk), 2, true, Some("cut-followed"));
    let hit = verdicts.iter().any(|v| v.violations.iter().any(|l| l.contains("[served-in-contact]")));
    assert!(
        hit,
        "breaking {brk} went unnoticed by [served-in-contact] in seeds {CUT_SEEDS:?}:\n{}",
        verdicts.iter().map(|v| format!("{} {:?}", v.line, v.violations)).collect::<Vec<_>>().join("\n")
    );
}
