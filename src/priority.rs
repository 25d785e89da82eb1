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
            return Lowered::Idle;
        }
        // On Linux the nice value is per thread, and `who = 0` names the
        // calling thread.
        // SAFETY: setpriority takes plain integers and touches no memory of
        // ours; failure is reported through the return value.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICENESS) };
        if rc == 0 {
            return Lowered::Nice;
        }
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower a background thread's priority"
        );
    }
    Lowered::No
}

/// Raises every thread of the process running under `SCHED_IDLE` back to
/// normal priority; returns how many were raised. Called when a reload runs
/// too long, so that it finishes even when checks keep both cores busy.
pub fn raise_background() -> usize {
    let mut raised = 0;
    #[cfg(target_os = "linux")]
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: sched_getscheduler takes a thread id and returns an
            // integer; a thread that exited meanwhile gives an error.
            let policy = unsafe { libc::sched_getscheduler(tid) };
            if policy == libc::SCHED_IDLE && set_policy(tid, libc::SCHED_OTHER) {
                raised += 1;
            }
        }
    }
    raised
}

/// Sets the scheduling policy of thread `tid` (0: the calling thread), at
/// static priority 0 (the only one these policies have).
#[cfg(target_os = "linux")]
fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> bool {
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
mod tests {
    use super::*;

    fn policy_of_current() -> libc::c_int {
        // SAFETY: as in `raise_background`; 0 names the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn background_threads_are_lowered_and_raised_back() {
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
