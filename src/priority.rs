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

/// Niceness of background threads where `SCHED_IDLE` cannot be undone.
pub const BACKGROUND_NICENESS: i32 = 10;

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
        idle_threads()
            .filter(|&(tid, _)| set_policy(tid, libc::SCHED_OTHER))
            .count()
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
