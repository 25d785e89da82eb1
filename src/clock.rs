//! The time checks are decided at: one clock reading per batch of checks.
//!
//! A check needs the wall-clock time (validity windows, rate limits, lockout
//! windows, last use), and a reading costs about 30 ns on a virtual machine's
//! TSC clock, a tenth of the check itself. The checks that one read of a
//! connection brings in are decided together, in one pass of the task that
//! drives the connection ([`crate::conn`]), which takes microseconds, so
//! they share one reading, as every handler of an iteration of Envoy's event
//! loop shares its "approximate time". The first [`now`] of a [`batch`]
//! reads the clock; the others in it reuse the reading. Outside a batch,
//! every call reads the clock.

use std::cell::Cell;
use std::marker::PhantomData;

use jiff::Timestamp;

/// How far back a reading must be, against one another check already
/// used, to count as the wall clock stepping back: checks decided a moment
/// apart on different threads routinely read times a few microseconds out
/// of order, which is not a step.
pub const STEP_NS: u64 = 1_000_000_000;

#[derive(Clone, Copy)]
enum State {
    /// No batch on this thread: read the clock every time.
    Outside,
    /// In a batch whose clock has not been read yet.
    Unread,
    /// In a batch, with its reading.
    Read(Timestamp),
}

thread_local! {
    static STATE: Cell<State> = const { Cell::new(State::Outside) };
}

/// The current time: the batch's reading inside a [`batch`], a new reading
/// outside one.
#[inline]
pub fn now() -> Timestamp {
    STATE.with(|state| match state.get() {
        State::Read(t) => t,
        State::Unread => {
            let t = Timestamp::now();
            state.set(State::Read(t));
            t
        }
        State::Outside => Timestamp::now(),
    })
}

/// A batch on this thread, until the returned guard is dropped: [`now`]
/// reads the clock once in it. Keep a batch short (one pass over work that
/// is ready, never across an `.await`): its checks are decided at its start.
pub fn batch() -> Batch {
    let outer = STATE.with(|state| state.replace(State::Unread));
    Batch {
        outer,
        _this_thread: PhantomData,
    }
}

/// A batch in progress (see [`batch`]); it ends when dropped, on the thread
/// that began it.
#[must_use = "the batch ends when this is dropped"]
pub struct Batch {
    /// What the thread was in before, restored at the end.
    outer: State,
    /// Neither `Send` nor `Sync`: the batch belongs to this thread.
    _this_thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        STATE.with(|state| state.set(self.outer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Waits until the wall clock has visibly moved past `t`.
    fn after(t: Timestamp) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Timestamp::now() <= t {
            assert!(Instant::now() < deadline, "the clock does not move");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn outside_a_batch_every_call_reads_the_clock() {
        let first = now();
        after(first);
        assert!(now() > first);
    }

    #[test]
    fn a_batch_reads_the_clock_once_and_ends_when_dropped() {
        let before = now();
        after(before);
        let batch = batch();
        let first = now();
        assert!(
            first > before,
            "read when first asked, not reused from before"
        );
        after(first);
        assert_eq!(now(), first);
        drop(batch);
        assert!(now() > first);
    }

    #[test]
    fn batches_nest_and_each_has_its_own_reading() {
        let outer = batch();
        let t_outer = now();
        after(t_outer);
        {
            let _inner = batch();
            let t_inner = now();
            assert!(t_inner > t_outer);
            after(t_inner);
            assert_eq!(now(), t_inner);
        }
        assert_eq!(now(), t_outer, "the outer batch's reading is back");
        drop(outer);
        assert!(now() > t_outer);
    }

    #[test]
    fn a_batch_is_per_thread() {
        let _batch = batch();
        let here = now();
        after(here);
        let there = std::thread::spawn(now).join().unwrap();
        assert!(there > here);
        assert_eq!(now(), here);
    }
}
