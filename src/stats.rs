//! Decision counters and the check-latency histogram: relaxed atomics bumped
//! on the verify path, read only at scrape time.
//!
//! Every decision is counted; the latency of one check in
//! [`TIMED_ONE_IN`] on each thread is measured. Two clock readings cost as
//! much as a sixth of the decision itself (24 ns each on a virtual machine's
//! TSC clock), and a regular sample of a steady stream of checks has the
//! same distribution as the stream.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::decide::{Decision, DenyReason};
use crate::keyfile::KeyState;

/// Upper bounds of the latency buckets, in nanoseconds.
pub const LATENCY_BUCKETS_NS: [u64; 15] = [
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// One check in this many, on each serving thread, is timed for the latency
/// histogram (the first check of a thread among them).
pub const TIMED_ONE_IN: u32 = 16;

thread_local! {
    /// Checks on this thread until the next timed one.
    static UNTIL_TIMED: Cell<u32> = const { Cell::new(0) };
}

/// Whether the check about to run is one to time (see [`TIMED_ONE_IN`]).
#[inline]
pub fn time_this_check() -> bool {
    UNTIL_TIMED.with(|left| {
        let n = left.get();
        left.set(n.checked_sub(1).unwrap_or(TIMED_ONE_IN - 1));
        n == 0
    })
}

/// Counter stripes. Each thread bumps the stripe it was assigned, so the
/// serving threads never write to the same cache line; a scrape sums them.
/// The first `STRIPES - 1` threads that record own a stripe each; any later
/// thread shares the last one.
const STRIPES: usize = 16;

/// One thread's share of the counters, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    allowed: AtomicU64,
    allowed_deprecated: AtomicU64,
    denied: [AtomicU64; DenyReason::ALL.len()],
    /// Non-cumulative latency counts per bucket; the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A thread's stripe, and whether it is the stripe's only writer.
#[derive(Clone, Copy)]
struct Mine {
    index: usize,
    owned: bool,
}

thread_local! {
    static STRIPE: Mine = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        if n < STRIPES - 1 {
            Mine { index: n, owned: true }
        } else {
            Mine { index: STRIPES - 1, owned: false }
        }
    };
}

/// Adds `n` to a stripe's counter. The only writer of a stripe may load and
/// store (a plain add, not a locked read-modify-write, which costs about 20
/// cycles on x86); readers still see whole values. A shared stripe adds
/// atomically.
#[inline]
fn bump(counter: &AtomicU64, n: u64, owned: bool) {
    if owned {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    } else {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counts of decisions by outcome, and the check-latency histogram
/// (lock-free, striped per thread).
#[derive(Debug, Default)]
pub struct CheckStats {
    stripes: Box<[Stripe; STRIPES]>,
}

impl CheckStats {
    #[inline]
    fn mine(&self) -> (&Stripe, bool) {
        let mine = STRIPE.with(|s| *s);
        (&self.stripes[mine.index], mine.owned)
    }

    fn sum(&self, f: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Records a decision, and the key's usage when one matched.
    #[inline]
    pub fn record(&self, decision: &Decision<'_>, now_secs: u64) {
        let (stripe, owned) = self.mine();
        match decision {
            Decision::Allow { key, .. } => {
                if key.state() == KeyState::Deprecated {
                    bump(&stripe.allowed_deprecated, 1, owned);
                } else {
                    bump(&stripe.allowed, 1, owned);
                }
                key.record_use(now_secs);
            }
            Decision::Deny { reason, key, .. } => {
                bump(&stripe.denied[reason.index()], 1, owned);
                if let (Some(key), Some(i)) = (key, reason.key_index()) {
                    key.usage().denied[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Records how long one check took.
    #[inline]
    pub fn observe_latency(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NS.partition_point(|&b| b < ns);
        let (stripe, owned) = self.mine();
        bump(&stripe.buckets[i], 1, owned);
        bump(&stripe.sum_ns, ns, owned);
    }

    /// The latency histogram as (sum in seconds, count, per-bucket (upper
    /// bound in seconds, count)) for exposition. Counts are per bucket, not
    /// cumulative (the encoder accumulates); the last bound is `f64::MAX`,
    /// which it writes as `+Inf`.
    pub fn latency_snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0u64;
        let mut out = Vec::with_capacity(LATENCY_BUCKETS_NS.len() + 1);
        for i in 0..=LATENCY_BUCKETS_NS.len() {
            let n = self.sum(|s| &s.buckets[i]);
            total = total.wrapping_add(n);
            let le = LATENCY_BUCKETS_NS
                .get(i)
                .map_or(f64::MAX, |&ns| ns as f64 / 1e9);
            out.push((le, n));
        }
        (self.sum(|s| &s.sum_ns) as f64 / 1e9, total, out)
    }

    /// Allowed checks with an active key.
    pub fn allowed(&self) -> u64 {
        self.sum(|s| &s.allowed)
    }

    /// Allowed checks with a deprecated key.
    pub fn allowed_deprecated(&self) -> u64 {
        self.sum(|s| &s.allowed_deprecated)
    }

    /// Denied checks for `reason`.
    pub fn denied(&self, reason: DenyReason) -> u64 {
        self.sum(|s| &s.denied[reason.index()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = CheckStats::default();
        h.observe_latency(Duration::from_nanos(1_000));
        h.observe_latency(Duration::from_nanos(2_500));
        // From another thread: another stripe, the same totals.
        std::thread::scope(|s| {
            s.spawn(|| h.observe_latency(Duration::from_micros(7)));
        });
        h.observe_latency(Duration::from_secs(1));
        let (sum, count, buckets) = h.latency_snapshot();
        assert_eq!(count, 4);
        assert!((sum - 1.0000105).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (2.5e-6, 2), "le is inclusive");
        assert_eq!(buckets[1], (5e-6, 0));
        assert_eq!(buckets[2], (1e-5, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::MAX, 1));
    }

    #[test]
    fn one_check_in_sixteen_is_timed_starting_with_the_first() {
        std::thread::spawn(|| {
            let timed: Vec<usize> = (0..64).filter(|_| time_this_check()).collect();
            assert_eq!(timed, [0, 16, 32, 48]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn many_threads_lose_no_counts() {
        // More threads than stripes: the late ones share a stripe and must
        // add atomically.
        let h = CheckStats::default();
        let threads = STRIPES * 2;
        let per_thread = 10_000u64;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..per_thread {
                        h.observe_latency(Duration::from_nanos(100));
                    }
                });
            }
        });
        let (_, count, buckets) = h.latency_snapshot();
        assert_eq!(count, threads as u64 * per_thread);
        assert_eq!(buckets[0].1, threads as u64 * per_thread);
    }
}
