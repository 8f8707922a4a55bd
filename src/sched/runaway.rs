//! The runaway watchdog: a real-time thread of herd that spins (a bug) would take a core from
//! the host's VMs. The kernel's real-time throttling still leaves normal threads 5 % of each
//! second, so such a thread starves nothing for long; it shows in what it costs instead.
//!
//! A thread of its own, real time one step *above* the workers (so no worker can keep it off
//! the CPU), wakes every 250 ms, reads the process's CPU time (one `getrusage`) and — only when
//! the whole process spent the share of the last window on the CPU, which any runaway thread
//! makes it do ([`Gate`]) — every thread's policy and CPU time from `/proc/self/task`. A real-time thread that was on the CPU for [`Limits::share_percent`] of
//! the last [`Limits::window`] is a runaway — herd's real-time threads mostly wait on
//! sockets, timers and the disk — and every thread of the process goes back to SCHED_OTHER:
//! the VMs get their core back, herd carries on at normal priority, and says so at ERROR and
//! in `status` (`scheduling.refused`).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// When a real-time thread is a runaway.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How often the watchdog looks.
    pub tick: Duration,
    /// Over how long a thread's CPU time is judged.
    pub window: Duration,
    /// The share of `window` a real-time thread may spend on the CPU.
    pub share_percent: u64,
}

impl Limits {
    /// Production: 90 % of 3 s (herd's busiest thread, a leader's worker under a storm of
    /// writes, spends well under half of it).
    pub const DEFAULT: Limits =
        Limits { tick: Duration::from_millis(250), window: Duration::from_secs(3), share_percent: 90 };
}

/// One look at one thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadCpu {
    pub tid: libc::pid_t,
    pub name: String,
    /// SCHED_FIFO or SCHED_RR.
    pub realtime: bool,
    /// CPU time so far (user + system).
    pub cpu: Duration,
}

/// Judges the threads' CPU time look by look; pure (the clock and `/proc` come from outside).
#[derive(Debug)]
pub struct Judge {
    limits: Limits,
    /// Per real-time thread: (when, its CPU time then), oldest first.
    seen: BTreeMap<libc::pid_t, VecDeque<(Instant, Duration)>>,
}

impl Judge {
    pub fn new(limits: Limits) -> Judge {
        Judge { limits, seen: BTreeMap::new() }
    }

    /// Takes one look at `threads` made at `now`: why a real-time thread is a runaway, if one
    /// spent at least the allowed share of a whole window on the CPU.
    pub fn look(&mut self, now: Instant, threads: &[ThreadCpu]) -> Option<String> {
        self.seen.retain(|tid, _| threads.iter().any(|t| t.tid == *tid && t.realtime));
        let mut verdict = None;
        for t in threads.iter().filter(|t| t.realtime) {
            let h = self.seen.entry(t.tid).or_default();
            h.push_back((now, t.cpu));
            // Keep one look at least a window old, so the share covers a whole window.
            while h.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= self.limits.window) {
                h.pop_front();
            }
            let Some(&(since, cpu_then)) = h.front() else { continue };
            let span = now.duration_since(since);
            if span < self.limits.window || verdict.is_some() {
                continue;
            }
            let used = t.cpu.saturating_sub(cpu_then);
            let percent = used.as_millis().saturating_mul(100) / span.as_millis().max(1);
            if percent >= u128::from(self.limits.share_percent) {
                verdict = Some(format!(
                    "thread {} ({}) ran {percent} % of the last {} ms in real time",
                    t.name,
                    t.tid,
                    span.as_millis()
                ));
            }
        }
        verdict
    }
}

/// Whether a look at every thread is worth it: no thread can have been on the CPU for the
/// share of a window unless the whole process was. Fed the process's CPU time at each tick;
/// pure. When it opens after an idle spell, the [`Judge`] judges a window later (its history
/// restarts), so a runaway is found within two windows rather than one, and an idle process
/// reads `/proc` for none of its threads (a tenth of an idle hypervisor's CPU, looking at
/// every thread 4 times a second).
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    seen: VecDeque<(Instant, Duration)>,
}

impl Gate {
    pub fn new(limits: Limits) -> Gate {
        Gate { limits, seen: VecDeque::new() }
    }

    /// The process's CPU time `cpu` at `now`: whether the threads must be looked at.
    pub fn open(&mut self, now: Instant, cpu: Duration) -> bool {
        self.seen.push_back((now, cpu));
        while self.seen.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= self.limits.window) {
            self.seen.pop_front();
        }
        let Some(&(since, then)) = self.seen.front() else { return true };
        let span = now.duration_since(since);
        // Less than a window known yet: look, as before.
        if span < self.limits.window {
            return true;
        }
        let used = cpu.saturating_sub(then).as_millis().saturating_mul(100);
        used >= u128::from(self.limits.share_percent).saturating_mul(span.as_millis())
    }
}

/// The CPU time (user + system) of every thread of this process so far.
pub fn process_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::from_secs(u64::try_from(tv.tv_sec()).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(tv.tv_usec()).unwrap_or(0))
            };
            t(u.user_time()) + t(u.system_time())
        }
        // Unknown: counts as busy (the threads are looked at, as before the gate).
        Err(_) => Duration::MAX,
    }
}

/// Every thread of this process, from `/proc/self/task`.
pub fn threads() -> Vec<ThreadCpu> {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        // The name sits in parentheses and may hold anything; the fields follow the last ")".
        let Some((head, after)) = stat.rsplit_once(')') else { continue };
        let name = head.split_once('(').map_or("", |(_, n)| n).to_string();
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime, in clock ticks) and 41 (policy); field 3 is f[0].
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let policy = num(38);
        let cpu = Duration::from_millis((num(11) + num(12)).saturating_mul(1000) / ticks);
        let realtime = policy == libc::SCHED_FIFO as u64 || policy == libc::SCHED_RR as u64;
        out.push(ThreadCpu { tid, name, realtime, cpu });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn thread(tid: libc::pid_t, realtime: bool, cpu_ms: u64) -> ThreadCpu {
        ThreadCpu { tid, name: format!("t{tid}"), realtime, cpu: Duration::from_millis(cpu_ms) }
    }

    const LIMITS: Limits =
        Limits { tick: Duration::from_millis(250), window: Duration::from_secs(3), share_percent: 90 };

    #[test]
    fn a_real_time_thread_on_the_cpu_for_a_whole_window_is_a_runaway() {
        let t0 = Instant::now();
        let mut j = Judge::new(LIMITS);
        // Thread 1 spins from 0; thread 2 works a quarter of the time.
        for step in 0..12u64 {
            let ms = step * 250;
            let v = j.look(at(t0, ms), &[thread(1, true, ms), thread(2, true, ms / 4)]);
            assert_eq!(v, None, "judged before a whole window at {ms} ms");
        }
        let v = j.look(at(t0, 3000), &[thread(1, true, 2990), thread(2, true, 750)]);
        assert!(v.as_deref().is_some_and(|w| w.contains("t1 (1)") && w.contains("99 %")), "{v:?}");
    }

    #[test]
    fn busy_but_not_spinning_normal_or_short_lived_threads_are_not() {
        let t0 = Instant::now();
        let mut j = Judge::new(LIMITS);
        for step in 0..=40u64 {
            let ms = step * 250;
            let threads = [
                thread(1, true, ms * 85 / 100),                         // busy, below 90 %
                thread(2, false, ms),                                   // spins, but not real time
                thread(3, step % 8 < 4, ms),                            // real time for 1 s at a time
                thread(4 + i32::try_from(step).unwrap_or(0), true, ms), // a new thread each look
            ];
            assert_eq!(j.look(at(t0, ms), &threads), None, "at {ms} ms");
        }
    }

    #[test]
    fn the_gate_opens_only_when_the_process_spent_the_share_of_a_window() {
        let t0 = Instant::now();
        let mut g = Gate::new(LIMITS);
        // The first window: open (nothing known yet).
        for step in 0..12u64 {
            assert!(g.open(at(t0, step * 250), Duration::from_millis(step * 10)), "step {step}");
        }
        // An idle process (4 % of a core): shut from a whole window on.
        for step in 12..24u64 {
            assert!(!g.open(at(t0, step * 250), Duration::from_millis(step * 10)), "step {step}");
        }
        // Busy (one thread spinning, another idle): open once a window's share is spent.
        let base = 240;
        let mut opened = None;
        for step in 24..40u64 {
            let cpu = base + (step - 23) * 250;
            if g.open(at(t0, step * 250), Duration::from_millis(cpu)) {
                opened.get_or_insert(step);
            }
        }
        assert!(opened.is_some_and(|s| s <= 36), "opened at step {opened:?}");
        // Two cores' worth over a window is open too.
        assert!(g.open(at(t0, 40 * 250), Duration::from_secs(100)));
    }

    #[test]
    fn this_process_threads_are_read_from_proc() {
        let all = threads();
        let me = super::super::this_thread();
        let mine = all.iter().find(|t| t.tid == me).expect("this thread is listed");
        assert!(!mine.realtime, "{mine:?}");
        assert!(all.len() >= 2, "{all:?}");
    }
}
