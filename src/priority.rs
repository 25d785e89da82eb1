//! Scheduling priority of background work: reloads (the reload thread, the
//! parse threads it starts, the hash thread) and the startup hash.
//!
//! Background threads run under `SCHED_IDLE`: a check that becomes runnable
//! always preempts them at once, so a reload of a large ring costs the
//! serving threads no waiting behind it, only the CPU they leave idle. A
//! `SCHED_IDLE` thread can starve under full load, so it is used only where
//! the process may undo it (`CAP_SYS_NICE`, or an `RLIMIT_NICE` allowing
//! nice 0); the reloader raises every idle thread back to normal priority
//! ([`raise_background`]) when a reload runs past a deadline, so that a
//! revocation always lands. Where that is not allowed, background threads
//! get nice [`BACKGROUND_NICENESS`] instead, which they keep.
//!
//! Lowering alone does not keep background work out of the checks' way:
//! a thread that keeps a CPU busy, even under `SCHED_IDLE`, delays the
//! wakeups of other threads by milliseconds on some kernels (see
//! BENCHMARKS.md: a busy loop under `SCHED_IDLE` took a bare HTTP/2
//! server's p99 from about 0.11 to 1.7–2.1 ms, the same loop calling
//! `sched_yield` every 100 µs left it at 0.10–0.11 ms). So the loops of a
//! reload call [`pace`] (or [`pace_chunk`]), which offers the CPU to
//! whatever waits for it every [`YIELD_EVERY`] on a lowered thread, and
//! does nothing on any other.

/// Niceness of background threads where `SCHED_IDLE` cannot be undone.
pub const BACKGROUND_NICENESS: i32 = 10;

/// Longest stretch a lowered thread works in [`pace`]d loops before it
/// offers the CPU to whatever waits for it.
pub const YIELD_EVERY: std::time::Duration = std::time::Duration::from_micros(100);

/// [`pace`] calls between two looks at the clock: a look costs about as
/// much as a few dozen steps of the cheapest paced loops.
const PACE_CALLS_PER_LOOK: u32 = 64;

/// Changes whenever some thread's priority may have changed: each thread's
/// pacing asks again whether it runs lowered.
static PRIORITY_EPOCH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// One thread's pacing.
struct Pace {
    calls: std::cell::Cell<u32>,
    /// [`PRIORITY_EPOCH`] when `lowered` was last found out (`u32::MAX`:
    /// never).
    epoch: std::cell::Cell<u32>,
    lowered: std::cell::Cell<bool>,
    /// When this thread last offered the CPU (or started pacing).
    since: std::cell::Cell<Option<std::time::Instant>>,
}

thread_local! {
    static PACE: Pace = const {
        Pace {
            calls: std::cell::Cell::new(0),
            epoch: std::cell::Cell::new(u32::MAX),
            lowered: std::cell::Cell::new(false),
            since: std::cell::Cell::new(None),
        }
    };
}

#[cfg(test)]
thread_local! {
    /// How many times this thread offered the CPU in [`Pace::look`].
    static YIELDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A yield point for a loop whose steps take well under a microsecond or
/// two (a key parsed, a slot laid out): every [`PACE_CALLS_PER_LOOK`] calls
/// it looks at the clock, and on a lowered thread that has worked for
/// [`YIELD_EVERY`] since it last did, it offers the CPU (`sched_yield`).
#[inline]
pub fn pace() {
    PACE.with(|p| {
        let calls = p.calls.get().wrapping_add(1);
        p.calls.set(calls);
        if calls % PACE_CALLS_PER_LOOK == 0 {
            p.look();
        }
    });
}

/// [`pace`] for a loop whose steps take ten microseconds or more (a chunk
/// of a file read or hashed): looks at the clock at every call.
pub fn pace_chunk() {
    PACE.with(Pace::look);
}

impl Pace {
    #[inline(never)]
    fn look(&self) {
        let epoch = PRIORITY_EPOCH.load(std::sync::atomic::Ordering::Relaxed);
        if self.epoch.get() != epoch {
            self.epoch.set(epoch);
            self.lowered.set(runs_lowered());
            self.since.set(None);
        }
        if !self.lowered.get() {
            return;
        }
        let now = std::time::Instant::now();
        match self.since.get() {
            Some(since) if now.duration_since(since) < YIELD_EVERY => {}
            Some(_) => {
                #[cfg(target_os = "linux")]
                yield_now();
                #[cfg(test)]
                YIELDS.with(|n| n.set(n.get() + 1));
                self.since.set(Some(std::time::Instant::now()));
            }
            None => self.since.set(Some(now)),
        }
    }
}

/// Whether the calling thread runs below normal priority: under
/// `SCHED_IDLE`, or with a positive nice value.
fn runs_lowered() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: both take plain integers (0: the calling thread) and
        // touch no memory of ours.
        let policy = unsafe { libc::sched_getscheduler(0) };
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        policy == libc::SCHED_IDLE || nice > 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// How the calling thread was lowered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lowered {
    /// `SCHED_IDLE`, undone by [`raise_background`].
    Idle,
    /// Nice [`BACKGROUND_NICENESS`], for good.
    Nice,
    /// Not lowered (not Linux, or the kernel refused).
    No,
}

/// Lowers the calling thread to background priority (see the module
/// documentation). Threads it starts afterwards inherit the priority.
pub fn lower_current() -> Lowered {
    PRIORITY_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    #[cfg(target_os = "linux")]
    {
        if idle_is_reversible() && set_policy(0, libc::SCHED_IDLE) {
            yield_now();
            return Lowered::Idle;
        }
        // On Linux the nice value is per thread, and `who = 0` names the
        // calling thread.
        // SAFETY: setpriority takes plain integers and touches no memory of
        // ours; failure is reported through the return value.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICENESS) };
        if rc == 0 {
            yield_now();
            return Lowered::Nice;
        }
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower a background thread's priority"
        );
    }
    Lowered::No
}

/// Gives the CPU to whatever is queued on it. Lowering a running thread
/// does not make the kernel look at its queue again (the thread's
/// priority number stays the same, only its weight drops): a check woken
/// onto this CPU just before would otherwise wait behind the lowered
/// thread until the next scheduler tick, up to 4 ms at 250 Hz.
#[cfg(target_os = "linux")]
fn yield_now() {
    // SAFETY: sched_yield takes no arguments and touches no memory.
    unsafe { libc::sched_yield() };
}

/// Raises every thread of the process running under `SCHED_IDLE` back to
/// normal priority; returns how many were raised. Called when a reload runs
/// too long, so that it finishes even when checks keep both cores busy.
pub fn raise_background() -> usize {
    #[cfg(target_os = "linux")]
    {
        let raised = idle_threads()
            .filter(|&(tid, _)| set_policy(tid, libc::SCHED_OTHER))
            .count();
        // Raised threads stop pacing themselves.
        PRIORITY_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        raised
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// The threads of this process now under `SCHED_IDLE`: their ids and their
/// `/proc` directories. An empty list if `/proc` cannot be read.
#[cfg(target_os = "linux")]
fn idle_threads() -> impl Iterator<Item = (libc::pid_t, std::path::PathBuf)> {
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    tasks.flatten().filter_map(|task| {
        let tid = task.file_name().to_str()?.parse::<libc::pid_t>().ok()?;
        // SAFETY: sched_getscheduler takes a thread id and returns an
        // integer; a thread that exited meanwhile gives an error.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        (policy == libc::SCHED_IDLE).then(|| (tid, task.path()))
    })
}

/// Watches how much CPU the process's `SCHED_IDLE` threads get, so that a
/// long reload is raised to normal priority only when it is starved, not
/// merely because it is large: a million-key reload beside busy serving
/// threads takes over a second while progressing well on the spare CPU,
/// and raising it then only makes it compete with the checks.
#[derive(Debug, Default)]
pub struct BackgroundProgress {
    /// CPU nanoseconds of each background thread at the last look.
    seen: std::collections::HashMap<i64, u64>,
}

#[cfg(test)]
thread_local! {
    /// How many times [`BackgroundProgress::start`] ran on this thread.
    pub(crate) static STARTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl BackgroundProgress {
    /// Starts watching from now.
    pub fn start() -> BackgroundProgress {
        #[cfg(test)]
        STARTS.with(|n| n.set(n.get() + 1));
        let mut p = BackgroundProgress::default();
        let _ = p.advance();
        p
    }

    /// CPU time the background threads used since the last call (a thread
    /// started meanwhile counts with all of its time; one that exited
    /// meanwhile, with nothing since the last call, so look often). `None`
    /// where the kernel does not say: not Linux, `/proc` unreadable, or no
    /// `schedstat` for any background thread (or no background thread).
    pub fn advance(&mut self) -> Option<std::time::Duration> {
        #[cfg(target_os = "linux")]
        {
            let mut used = 0u64;
            let mut now = std::collections::HashMap::with_capacity(self.seen.len());
            for (tid, dir) in idle_threads() {
                // A thread that exited meanwhile has no file: skip it.
                let Ok(text) = std::fs::read_to_string(dir.join("schedstat")) else {
                    continue;
                };
                let Some(ns) = text
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                used += ns.saturating_sub(self.seen.get(&i64::from(tid)).copied().unwrap_or(0));
                now.insert(i64::from(tid), ns);
            }
            let known = !now.is_empty();
            self.seen = now;
            known.then(|| std::time::Duration::from_nanos(used))
        }
        #[cfg(not(target_os = "linux"))]
        None
    }
}

/// Sets the scheduling policy of thread `tid` (0: the calling thread), at
/// static priority 0 (the only one these policies have).
#[cfg(target_os = "linux")]
pub(crate) fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, which
    // only reads it; the rest are plain integers.
    unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 }
}

/// Whether a thread of this process may leave `SCHED_IDLE` again, found out
/// once by trying it on a short-lived thread.
#[cfg(target_os = "linux")]
fn idle_is_reversible() -> bool {
    static REVERSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REVERSIBLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("keyward-probe".into())
            .spawn(|| set_policy(0, libc::SCHED_IDLE) && set_policy(0, libc::SCHED_OTHER))
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(false)
    })
}

#[cfg(all(test, target_os = "linux"))]
pub(crate) mod tests {
    use super::*;

    fn policy_of_current() -> libc::c_int {
        // SAFETY: as in `raise_background`; 0 names the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    /// `raise_background` raises every idle thread of the process, so the
    /// tests that lower threads run one at a time (those of other modules
    /// too).
    pub(crate) static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn background_progress_counts_idle_threads_only() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // Burns CPU until this thread has used `ms` of it (an idle-class
        // thread may wait long for a CPU on a loaded machine).
        let burn = |ms: u64| {
            let own = || {
                std::fs::read_to_string("/proc/thread-self/schedstat")
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
                    .expect("schedstat on Linux")
            };
            let until = own() + ms * 1_000_000;
            let mut x = 0u64;
            while own() < until {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
        };
        std::thread::spawn(move || {
            if lower_current() != Lowered::Idle {
                return;
            }
            let mut progress = BackgroundProgress::start();
            // This thread is idle-class: its own work is progress.
            burn(60);
            let used = progress.advance().expect("schedstat on Linux");
            assert!(used >= std::time::Duration::from_millis(50), "{used:?}");
            // Work of a normal thread is not.
            std::thread::spawn(move || {
                set_policy(0, libc::SCHED_OTHER);
                burn(60);
            })
            .join()
            .unwrap();
            let used = progress.advance().expect("schedstat on Linux");
            assert!(used < std::time::Duration::from_millis(30), "{used:?}");
        })
        .join()
        .unwrap();
    }

    /// CPU time of the calling thread.
    fn own_cpu() -> std::time::Duration {
        let ns = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            .expect("schedstat on Linux");
        std::time::Duration::from_nanos(ns)
    }

    /// Calls `pace` until the thread has used `cpu` of CPU time; the yields
    /// meanwhile, and the wall-clock time it took.
    fn paced_work(cpu: std::time::Duration) -> (usize, std::time::Duration) {
        YIELDS.with(|n| n.set(0));
        let started = std::time::Instant::now();
        let until = own_cpu() + cpu;
        while own_cpu() < until {
            for _ in 0..1_000 {
                pace();
            }
        }
        (YIELDS.with(std::cell::Cell::get), started.elapsed())
    }

    #[test]
    fn paced_loops_offer_the_cpu_on_lowered_threads_only() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let work = std::time::Duration::from_millis(10);
        std::thread::spawn(move || {
            let (yields, _) = paced_work(work);
            // Unless the tests themselves run niced.
            if !runs_lowered() {
                assert_eq!(yields, 0, "a thread at normal priority never yields");
            }
            let how = lower_current();
            if how == Lowered::No {
                return;
            }
            // At least one yield per YIELD_EVERY of work (wall time runs at
            // least as fast as CPU time), at most one per YIELD_EVERY of wall time.
            let (yields, took) = paced_work(work);
            let least = work.as_micros() / YIELD_EVERY.as_micros() / 2;
            let most = took.as_micros() / YIELD_EVERY.as_micros() + 1;
            assert!(
                (least..=most).contains(&(yields as u128)),
                "{yields} yields in {took:?} ({least}..={most} expected)"
            );
            if how == Lowered::Idle {
                assert!(raise_background() >= 1);
                let (yields, _) = paced_work(work);
                assert_eq!(yields, 0, "a raised thread stops yielding");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn background_threads_are_lowered_and_raised_back() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::spawn(|| {
            let how = lower_current();
            match how {
                Lowered::Idle => {
                    assert_eq!(policy_of_current(), libc::SCHED_IDLE);
                    // A thread started now inherits the policy, and the
                    // valve raises both.
                    let child = std::thread::spawn(policy_of_current);
                    assert_eq!(child.join().unwrap(), libc::SCHED_IDLE);
                    assert!(raise_background() >= 1);
                    assert_eq!(policy_of_current(), libc::SCHED_OTHER);
                }
                Lowered::Nice => {
                    // SAFETY: getpriority takes plain integers.
                    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                    assert_eq!(nice, BACKGROUND_NICENESS);
                }
                Lowered::No => {}
            }
        })
        .join()
        .unwrap();
    }
}
