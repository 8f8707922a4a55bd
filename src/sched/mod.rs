//! Real-time scheduling for herd's own runtime (issue 19): a hypervisor's cores are busy with
//! its VMs, and herd's timing-critical work — Raft's core and transport, the heartbeat, the
//! primary gate and its lease — must still run on time, or a busy host costs it its roles.
//!
//! ```text
//!   runtime worker threads  SCHED_RR (or FIFO) at a modest priority, SCHED_RESET_ON_FORK:
//!                           every thread or process they create starts as SCHED_OTHER
//!                           (promoted at their first park: tokio's blocking pool never is)
//!   store IO threads        sled's own (`sled-io-*`, `log flusher`): real time too, the log's
//!                           appends wait on them
//!   blocking calls          libvirt, IPMI, stats, probes: on tokio's blocking pool (never a
//!                           worker), real time one step below the workers (a fence's IPMI
//!                           exchange must not starve either)
//!   memory                  mlockall(CURRENT | FUTURE | ONFAULT): nothing herd touched is
//!                           swapped out, nothing is populated ahead of use
//!   runaway watchdog        a thread real time above the workers (`runaway`): a real-time
//!                           thread on the CPU for 90 % of 3 s (a bug spinning there would take
//!                           a core from the VMs) puts every thread back to SCHED_OTHER, at ERROR
//!   pause monitor           a task on the runtime measuring its own lateness: pauses longer
//!                           than a third of the lease, counted (metrics, `status`)
//! ```
//!
//! The kernel may refuse (no CAP_SYS_NICE, RLIMIT_RTPRIO, a cgroup without real-time budget):
//! then herd runs as before, says so once at WARN and in `status`. This is the only module with
//! `unsafe` outside the hypervisor binding: plain syscalls, each with its SAFETY note.

#![allow(unsafe_code)]

pub mod runaway;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Linux's `SCHED_RESET_ON_FORK` (uapi `sched.h`; the `libc` crate has it for Android only).
const SCHED_RESET_ON_FORK: libc::c_int = 0x4000_0000;
/// How often the pause monitor looks at the clock: 20 a second. Pauses that count are longer
/// than a third of the lease (100 ms by default), so a pause is measured up to a tick short;
/// at 50 a second the monitor was a third of an idle hypervisor's wake-ups.
pub const MONITOR_TICK: Duration = Duration::from_millis(50);
/// The monitor's tick on a client outside Raft (`[cluster] membership = "client"`): it holds no
/// lease and has no Raft log whose IO threads must be promoted soon after they start, and the
/// monitor was a fifth of an idle client's wake-ups.
pub const CLIENT_MONITOR_TICK: Duration = Duration::from_millis(100);
/// Lateness from this much on is kept for `longest_last_minute_ms`.
const KEEP_LATENESS: Duration = Duration::from_millis(20);

/// Which real-time policy (`[scheduling] policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Rr,
    Fifo,
}

/// `[scheduling]`: what herd asks of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Real-time scheduling for the runtime's worker threads (off: SCHED_OTHER as any daemon).
    pub realtime: bool,
    pub policy: Policy,
    /// 1..=99; corosync's default is 99, herd's a modest 10 (above nothing but other RT work).
    pub priority: i32,
    pub lock_memory: bool,
}

/// What herd got from the kernel, for `status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Got {
    /// `rr`, `fifo`, or `other` (not real time).
    pub policy: String,
    pub priority: i32,
    pub memory_locked: bool,
    /// Why something asked for was refused (the kernel's words), or why the runaway watchdog
    /// put every thread back to normal scheduling.
    pub refused: Vec<String>,
}

/// Pauses of the runtime, as the monitor measured them.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Pauses {
    /// Pauses longer than a third of the lease since the start.
    pub total: u64,
    /// The longest pause (any length) in the last minute, in milliseconds.
    pub longest_last_minute_ms: u64,
}

struct Shared {
    settings: Option<Settings>,
    got: Got,
    /// Threads promoted so far: put back if a later promotion is refused; the store's threads
    /// are promoted once.
    workers: Vec<libc::pid_t>,
    /// (when, length) of recent pauses, for the last minute's longest.
    recent: VecDeque<(Instant, Duration)>,
}

fn shared() -> std::sync::MutexGuard<'static, Shared> {
    static S: OnceLock<Mutex<Shared>> = OnceLock::new();
    S.get_or_init(|| {
        Mutex::new(Shared { settings: None, got: Got::default(), workers: Vec::new(), recent: VecDeque::new() })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

static REALTIME: AtomicBool = AtomicBool::new(false);
static PAUSES: AtomicU64 = AtomicU64::new(0);
/// The runaway watchdog demoted every thread: nothing is promoted again.
static RUNAWAY: AtomicBool = AtomicBool::new(false);

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

fn this_thread() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    libc::pid_t::try_from(tid).unwrap_or(0)
}

/// `sched_setscheduler` on thread `tid` (0: the calling thread).
fn set_scheduler(tid: libc::pid_t, policy: libc::c_int, priority: i32) -> Result<(), String> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: `param` is a valid sched_param that outlives the call; the kernel only reads it.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Locks the process's memory (once, before the runtime starts) and records what is asked.
pub fn init(settings: Settings) {
    let mut s = shared();
    s.settings = Some(settings);
    s.got.policy = "other".into();
    if settings.lock_memory {
        // SAFETY: mlockall takes flags only.
        let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
        if rc == 0 {
            s.got.memory_locked = true;
        } else {
            let e = format!("mlockall: {}", errno());
            tracing::warn!("memory not locked ({e}): herd's pages may be swapped out under pressure");
            s.got.refused.push(e);
        }
    }
}

thread_local! {
    static PROMOTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The runtime's `on_thread_park` hook, which tokio calls on its worker threads only (never on
/// its blocking pool): a worker becomes real time the first time it goes idle, before it is
/// woken for anything. One thread-local check after that.
pub fn on_worker_park() {
    if !PROMOTED.with(std::cell::Cell::get) {
        PROMOTED.with(|p| p.set(true));
        promote_this_worker();
    }
}

/// This worker thread: real time, if asked for and allowed.
fn promote_this_worker() {
    let mut s = shared();
    let Some(settings) = s.settings.filter(|s| s.realtime) else { return };
    if RUNAWAY.load(Ordering::Acquire) || s.got.refused.iter().any(|r| r.starts_with("sched_setscheduler")) {
        return; // refused once (or a runaway): the same answer for every thread
    }
    let (policy, name) = match settings.policy {
        Policy::Rr => (libc::SCHED_RR, "rr"),
        Policy::Fifo => (libc::SCHED_FIFO, "fifo"),
    };
    match set_scheduler(0, policy | SCHED_RESET_ON_FORK, settings.priority) {
        Ok(()) => {
            s.workers.push(this_thread());
            s.got.policy = name.into();
            s.got.priority = settings.priority;
            REALTIME.store(true, Ordering::Release);
        }
        Err(e) => {
            tracing::warn!(
                "real-time scheduling refused ({e}): herd runs at normal priority and may lose its \
                 roles on a busy host (see [scheduling] in the example config)"
            );
            s.got.refused.push(format!("sched_setscheduler: {e}"));
            for tid in std::mem::take(&mut s.workers) {
                let _ = set_scheduler(tid, libc::SCHED_OTHER, 0);
            }
            s.got.policy = "other".into();
            s.got.priority = 0;
            REALTIME.store(false, Ordering::Release);
        }
    }
}

/// At the start of every blocking call (libvirt, IPMI, stats, the storage probe), on a thread
/// of tokio's blocking pool — never a worker: real time one step below the workers, so a
/// fence's IPMI exchange or a recovery's libvirt start is not starved by the VMs either, while
/// a slow or hung call holds its own thread, never the runtime's. These calls block on IO; a
/// runaway among them is the watchdog's like any other. No-op unless the workers got real time.
pub fn enter_blocking_call() {
    if !REALTIME.load(Ordering::Acquire) {
        return;
    }
    let Some(settings) = shared().settings else { return };
    let policy = match settings.policy {
        Policy::Rr => libc::SCHED_RR,
        Policy::Fifo => libc::SCHED_FIFO,
    };
    let _ = set_scheduler(0, policy | SCHED_RESET_ON_FORK, (settings.priority - 1).max(1));
}

/// What herd got, for `status`.
pub fn got() -> Got {
    let mut g = shared().got.clone();
    if g.policy.is_empty() {
        g.policy = "other".into(); // never initialised (the simulation)
    }
    g
}

/// The pause figures, for `status` and the metrics.
pub fn pauses() -> Pauses {
    let mut s = shared();
    let now = Instant::now();
    while s.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(60)) {
        s.recent.pop_front();
    }
    let longest = s.recent.iter().map(|(_, d)| *d).max().unwrap_or_default();
    Pauses {
        total: PAUSES.load(Ordering::Relaxed),
        longest_last_minute_ms: u64::try_from(longest.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Records one monitor tick that came `late` after it was due; a pause longer than `third`
/// (a third of the lease) is counted.
fn record(late: Duration, third: Duration) {
    let mut s = shared();
    if late > third {
        PAUSES.fetch_add(1, Ordering::Relaxed);
    }
    if late >= KEEP_LATENESS {
        s.recent.push_back((Instant::now(), late));
        if s.recent.len() > 4096 {
            s.recent.pop_front();
        }
    }
}

/// Threads the store (sled) starts for its own IO, by name: the Raft log's appends wait on
/// them, so they run in real time too (a real-time worker waiting on a starved IO thread would
/// be no better off than a starved worker). sled starts them lazily — at Raft's start or a
/// join, and more when its queue grows — so the pause monitor looks for new threads every tick:
/// left at normal priority for the 5 s an earlier version waited, a busy host starved them and
/// a follower's log flush took 0.2–0.6 s, longer than the lease (t96, in the load's first
/// second).
const STORE_THREADS: [&str; 2] = ["sled-io", "log flusher"];

/// Promotes the store's IO threads not yet promoted (see [`STORE_THREADS`]); they start
/// lazily, so this runs now and then.
fn promote_store_threads() {
    let mut s = shared();
    let Some(settings) = s.settings.filter(|s| s.realtime) else { return };
    if !REALTIME.load(Ordering::Acquire) {
        return;
    }
    let policy = match settings.policy {
        Policy::Rr => libc::SCHED_RR,
        Policy::Fifo => libc::SCHED_FIFO,
    };
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else { continue };
        if s.workers.contains(&tid) {
            continue;
        }
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if STORE_THREADS.iter().any(|p| name.starts_with(p))
            && set_scheduler(tid, policy | SCHED_RESET_ON_FORK, settings.priority).is_ok()
        {
            s.workers.push(tid);
        }
    }
}

/// The number of threads of this process (`/proc/self/stat`, field 20): one `pread` of a file
/// kept open (procfs makes the line afresh at offset 0). `read_to_string` was nine syscalls a
/// look — open, statx, six reads of growing size, close —, 90 a second on an idle client.
fn thread_count() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    static STAT: OnceLock<Option<std::fs::File>> = OnceLock::new();
    let file = STAT.get_or_init(|| std::fs::File::open("/proc/self/stat").ok()).as_ref()?;
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0).ok()?;
    let stat = std::str::from_utf8(buf.get(..n)?).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(17)?.parse().ok()
}

/// Ticks between two looks at the thread count: 100 ms (a read of `/proc/self/stat` on every
/// tick, 50 a second, was a tenth of an idle hypervisor's CPU).
const THREAD_LOOK_TICKS: u32 = 2;

/// The pause monitor: a task on the runtime that ticks every `tick` ([`MONITOR_TICK`], or
/// [`CLIENT_MONITOR_TICK`]) and measures how late each tick came, and promotes the store's IO
/// threads soon after the process has new threads (a read of `/proc/self/stat` every
/// `THREAD_LOOK_TICKS` ticks; then a pass over the threads on the next 5 ticks, since a new
/// thread names itself only once it runs; a pass every 100 ticks besides). Runs until the
/// runtime ends.
pub async fn monitor(lease: Duration, tick: Duration) {
    let third = lease / 3;
    let mut last = tokio::time::Instant::now();
    let (mut ticks, mut threads, mut rescan) = (0u32, None, 0u8);
    loop {
        let now_threads = if ticks.is_multiple_of(THREAD_LOOK_TICKS) { thread_count() } else { threads };
        if now_threads != threads {
            threads = now_threads;
            // A new thread names itself once it runs: look again for a few ticks.
            rescan = 5;
        }
        if ticks.is_multiple_of(100) || rescan > 0 {
            promote_store_threads();
            rescan = rescan.saturating_sub(1);
        }
        ticks = ticks.wrapping_add(1);
        tokio::time::sleep(tick).await;
        let now = tokio::time::Instant::now();
        let late = now.duration_since(last).saturating_sub(tick);
        last = now;
        record(late, third);
    }
}

/// Starts the runaway watchdog ([`runaway`]), where real time was asked for.
pub fn start_watchdog() {
    let Some(settings) = shared().settings.filter(|s| s.realtime) else { return };
    if let Err(e) = spawn_watchdog(runaway::Limits::DEFAULT, (settings.priority + 1).min(99)) {
        tracing::warn!("real-time watchdog not started ({e}): real time stays on without it");
    }
}

/// The watchdog's thread: real time at `priority` (above the workers, so none of them keeps it
/// off the CPU; it sleeps almost always), a look at the process's CPU time every tick and at every
/// thread when that shows enough use ([`runaway::Gate`]), until it finds a runaway — then
/// every thread goes back to normal scheduling, and the thread ends with the reason.
fn spawn_watchdog(limits: runaway::Limits, priority: i32) -> std::io::Result<std::thread::JoinHandle<String>> {
    std::thread::Builder::new().name("herd-rt-watchdog".into()).spawn(move || {
        if let Err(e) = set_scheduler(0, libc::SCHED_FIFO | SCHED_RESET_ON_FORK, priority) {
            // Then no thread of herd got real time either (the same refusal): nothing to judge
            // that could starve it.
            tracing::debug!("the real-time watchdog runs at normal priority ({e})");
        }
        let (mut gate, mut judge) = (runaway::Gate::new(limits), runaway::Judge::new(limits));
        loop {
            std::thread::sleep(limits.tick);
            let now = Instant::now();
            if !gate.open(now, runaway::process_cpu()) {
                continue;
            }
            if let Some(why) = judge.look(now, &runaway::threads()) {
                demote_all(&why);
                return why;
            }
        }
    })
}

/// Every thread of the process back to SCHED_OTHER, for good, said at ERROR and in `status`.
fn demote_all(why: &str) {
    let mut s = shared();
    RUNAWAY.store(true, Ordering::Release);
    REALTIME.store(false, Ordering::Release);
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) {
            let _ = set_scheduler(tid, libc::SCHED_OTHER, 0);
        }
    }
    let why = format!(
        "runaway: {why}; every thread of herd was put back to normal scheduling (a bug: please \
         report it with this log)"
    );
    tracing::error!("{why}");
    s.got.policy = "other".into();
    s.got.priority = 0;
    s.got.refused.push(why);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_over_a_third_of_the_lease_are_counted_and_the_longest_kept() {
        let before = pauses().total;
        record(Duration::from_millis(5), Duration::from_millis(100));
        record(Duration::from_millis(150), Duration::from_millis(100));
        record(Duration::from_millis(40), Duration::from_millis(100));
        let p = pauses();
        assert_eq!(p.total, before + 1);
        assert!(p.longest_last_minute_ms >= 150, "{p:?}");
    }

    /// The thread count comes from the kept file, afresh at every look: 64 threads started
    /// after the first look are counted by the next.
    #[test]
    fn the_thread_count_is_read_afresh_from_the_kept_file() {
        let first = thread_count().expect("a thread count");
        let release = std::sync::Arc::new(std::sync::Barrier::new(65));
        let held: Vec<_> = (0..64)
            .map(|_| {
                let release = release.clone();
                std::thread::spawn(move || {
                    release.wait();
                })
            })
            .collect();
        let now = thread_count().expect("a thread count");
        release.wait();
        for t in held {
            t.join().expect("joined");
        }
        assert!(now >= 65 && now > first, "{first} threads, then {now} with 64 more held");
    }

    /// A real-time thread that spins is put back to normal scheduling by the watchdog, which
    /// names it (root: SCHED_FIFO needs CAP_SYS_NICE; skipped loudly otherwise, failed under CI).
    #[test]
    fn a_spinning_real_time_thread_is_put_back_to_normal_scheduling() {
        // SAFETY: geteuid takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI runs the tests as root");
            eprintln!("SKIPPED a_spinning_real_time_thread_is_put_back_to_normal_scheduling: needs root");
            return;
        }
        let limits =
            runaway::Limits { tick: Duration::from_millis(100), window: Duration::from_secs(1), share_percent: 90 };
        let watchdog = spawn_watchdog(limits, 20).expect("watchdog thread");
        let spinner = std::thread::Builder::new()
            .name("herd-test-spin".into())
            .spawn(|| {
                set_scheduler(0, libc::SCHED_FIFO | SCHED_RESET_ON_FORK, 10).expect("SCHED_FIFO as root");
                let t0 = Instant::now();
                // Spins until it is put back (at most 20 s: then the test fails rather than hang).
                while t0.elapsed() < Duration::from_secs(20) {
                    // SAFETY: sched_getscheduler takes a pid only (0: this thread).
                    if unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER {
                        return Some(t0.elapsed());
                    }
                }
                None
            })
            .expect("spinner thread");
        let demoted_after = spinner.join().expect("the spinner got SCHED_FIFO");
        assert!(demoted_after.is_some_and(|d| d < Duration::from_secs(5)), "demoted after {demoted_after:?}");
        let why = watchdog.join().expect("the watchdog");
        assert!(why.contains("herd-test-spin"), "the runaway is named: {why}");
        let g = got();
        assert_eq!(g.policy, "other");
        assert!(g.refused.iter().any(|r| r.starts_with("runaway: thread herd-test-spin")), "{g:?}");
        eprintln!("spinner demoted after {demoted_after:?}: {why}");
    }
}
