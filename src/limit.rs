//! Per-key rate limits: GCRA (the generic cell rate algorithm) kept in a
//! single atomic word per key, so enforcing a limit is one load and one
//! compare-and-swap — no lock, no allocation.
//!
//! The word holds the *theoretical arrival time* (TAT) in nanoseconds since
//! the Unix epoch: the time at which the key's budget would be full again if
//! no further request came. A request at `t` is allowed when
//! `max(TAT, t) - t <= tolerance`, where `tolerance = (burst - 1) × interval`
//! and `interval = per / requests`; allowing it advances TAT by `interval`.
//!
//! Checks are decided on the wall clock (the time the validity windows are
//! judged by), which can step back when it is corrected. A backlog longer
//! than `tolerance + interval` cannot arise from requests alone, so one
//! longer by more than [`crate::clock::STEP_NS`] (checks a moment apart read
//! times a little out of order) is what a backward step left: it is cut to
//! that bound, and a key whose clock went back by an hour waits at most one
//! interval, not an hour.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::keyfile::RateLimitSpec;

/// A key's limiter state; lives in [`crate::ring::KeyUsage`] so it survives
/// reloads that keep the key's limit.
#[derive(Debug, Default)]
pub struct Limiter {
    tat_ns: AtomicU64,
}

/// What a client may know about its budget (for the `RateLimit` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests allowed in a burst (the policy's quota).
    pub limit: u64,
    /// The policy window, in whole seconds (at least 1).
    pub window_secs: u64,
    /// Requests that could be made right now.
    pub remaining: u64,
    /// Seconds until the budget is full again.
    pub reset_secs: u64,
    /// When denied: seconds until the next request would be allowed.
    pub retry_after_secs: u64,
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

/// Derived GCRA parameters of a spec, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Params {
    interval: u64,
    tolerance: u64,
}

impl Params {
    /// The longest backlog requests can leave: a full burst just taken.
    fn most(self) -> u64 {
        self.tolerance.saturating_add(self.interval)
    }
}

fn params(spec: &RateLimitSpec) -> Params {
    let per = u64::try_from(spec.per.as_nanos()).unwrap_or(u64::MAX);
    let interval = (per / spec.requests.max(1)).max(1);
    let tolerance = interval.saturating_mul(spec.burst.max(1) - 1);
    Params {
        interval,
        tolerance,
    }
}

impl Limiter {
    /// Forgets all past requests (a full budget).
    pub fn reset(&self) {
        self.tat_ns.store(0, Ordering::Relaxed);
    }

    /// Takes one request at `now_ns` from the budget; `Ok` if allowed.
    #[inline]
    pub fn acquire(&self, spec: &RateLimitSpec, now_ns: u64) -> Result<Quota, Quota> {
        let p = params(spec);
        let quota = |backlog: u64, retry: u64| Quota {
            limit: spec.burst,
            window_secs: ceil_secs(u64::try_from(spec.per.as_nanos()).unwrap_or(u64::MAX)).max(1),
            remaining: p.most().saturating_sub(backlog) / p.interval,
            reset_secs: ceil_secs(backlog),
            retry_after_secs: retry,
        };
        let mut current = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let ceiling = now_ns.saturating_add(p.most());
            if current > ceiling.saturating_add(crate::clock::STEP_NS) {
                // The clock stepped back (see the module documentation):
                // keep the bound, so that time passing from here counts.
                match self.tat_ns.compare_exchange_weak(
                    current,
                    ceiling,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => current = ceiling,
                    Err(actual) => {
                        current = actual;
                        continue;
                    }
                }
            }
            let tat = current.max(now_ns);
            let backlog = tat - now_ns;
            if backlog > p.tolerance {
                let wait = backlog - p.tolerance;
                return Err(quota(backlog, ceil_secs(wait).max(1)));
            }
            let next = tat.saturating_add(p.interval);
            match self.tat_ns.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(quota(next - now_ns, 0)),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1_000_000_000;

    fn spec(requests: u64, per: Duration, burst: u64) -> RateLimitSpec {
        RateLimitSpec {
            requests,
            per,
            burst,
        }
    }

    #[test]
    fn allows_a_burst_then_the_rate() {
        let l = Limiter::default();
        let s = spec(10, Duration::from_secs(1), 20);
        let t0 = 1_000 * S;
        for i in 0..20 {
            let q = l
                .acquire(&s, t0)
                .unwrap_or_else(|q| panic!("request {i} denied: {q:?}"));
            assert_eq!(q.remaining, 19 - i);
        }
        let denied = l.acquire(&s, t0).unwrap_err();
        assert_eq!(denied.remaining, 0);
        assert_eq!(denied.retry_after_secs, 1, "0.1 s rounds up to 1 s");
        assert_eq!(denied.reset_secs, 2, "2 s of backlog");
        // After 100 ms one more request fits; then none.
        assert!(l.acquire(&s, t0 + S / 10).is_ok());
        assert!(l.acquire(&s, t0 + S / 10).is_err());
        // After 2 s the whole burst is back.
        let later = t0 + 3 * S;
        for _ in 0..20 {
            assert!(l.acquire(&s, later).is_ok());
        }
        assert!(l.acquire(&s, later).is_err());
    }

    #[test]
    fn steady_rate_is_never_limited() {
        let l = Limiter::default();
        let s = spec(100, Duration::from_secs(1), 1);
        for i in 0..1000 {
            assert!(l.acquire(&s, 50 * S + i * S / 100).is_ok(), "request {i}");
        }
        assert!(
            l.acquire(&s, 50 * S + 999 * S / 100).is_err(),
            "twice in one interval"
        );
    }

    #[test]
    fn policy_fields() {
        let l = Limiter::default();
        let s = spec(5, Duration::from_secs(60), 5);
        let q = l.acquire(&s, 10 * S).unwrap();
        assert_eq!(
            (q.limit, q.window_secs, q.remaining, q.reset_secs),
            (5, 60, 4, 12)
        );
        let s = spec(2, Duration::from_millis(500), 2);
        assert_eq!(
            Limiter::default().acquire(&s, 0).map(|q| q.window_secs),
            Ok(1)
        );
    }

    #[test]
    fn a_burst_near_the_largest_tolerance_does_not_overflow() {
        // interval × (burst − 1) is over u64::MAX nanoseconds: the tolerance
        // saturates, and so must everything derived from it.
        let s = spec(1, Duration::from_secs(7 * 86_400), 40_000);
        let l = Limiter::default();
        let q = l.acquire(&s, 5 * S).unwrap();
        // The saturated tolerance holds about 30,500 weeks' worth of
        // intervals: fewer than the burst, still a burst no client reaches.
        assert!((30_000..40_000).contains(&q.remaining), "{q:?}");
        assert!(l.acquire(&s, 5 * S).is_ok());
    }

    #[test]
    fn a_clock_stepping_back_costs_at_most_one_interval() {
        let l = Limiter::default();
        let s = spec(100, Duration::from_secs(1), 200);
        let t = 10_000 * S;
        for _ in 0..200 {
            assert!(l.acquire(&s, t).is_ok());
        }
        assert!(l.acquire(&s, t).is_err(), "the burst is spent");
        // The clock goes back ten seconds: without the bound, the key would
        // be denied for those ten seconds.
        let back = t - 10 * S;
        let denied = l.acquire(&s, back).unwrap_err();
        assert_eq!(denied.retry_after_secs, 1, "one interval, rounded up");
        assert!(l.acquire(&s, back + S / 100).is_ok(), "after one interval");
        // The clock going forward still refills the budget as time passes.
        let later = t + 10 * S;
        for _ in 0..200 {
            assert!(l.acquire(&s, later).is_ok());
        }
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_burst() {
        let l = std::sync::Arc::new(Limiter::default());
        let s = spec(1, Duration::from_secs(3600), 1000);
        let allowed = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (l, allowed) = (l.clone(), allowed.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if l.acquire(&s, 7 * S).is_ok() {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(allowed.load(Ordering::Relaxed), 1000);
    }
}
