//! Decision counters and the check-latency histogram: relaxed atomics bumped
//! on the verify path, read only at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// A fixed-bucket histogram of check latencies (lock-free).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket (upper bound in seconds, count))
    /// for exposition. Counts are per bucket, not cumulative (the encoder
    /// accumulates); the last bound is `f64::MAX`, which it writes as `+Inf`.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            total += n;
            let le = LATENCY_BUCKETS_NS
                .get(i)
                .map_or(f64::MAX, |&ns| ns as f64 / 1e9);
            out.push((le, n));
        }
        (self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9, total, out)
    }
}

/// Counts of decisions by outcome.
#[derive(Debug, Default)]
pub struct CheckStats {
    allowed: AtomicU64,
    allowed_deprecated: AtomicU64,
    denied: [AtomicU64; DenyReason::ALL.len()],
    /// Time spent deciding each check, measured inside the service.
    pub latency: LatencyHistogram,
}

impl CheckStats {
    /// Records a decision, and the key's usage when one matched.
    #[inline]
    pub fn record(&self, decision: &Decision<'_>, now_secs: u64) {
        match decision {
            Decision::Allow { key, .. } => {
                if key.state == KeyState::Deprecated {
                    self.allowed_deprecated.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.allowed.fetch_add(1, Ordering::Relaxed);
                }
                key.usage.record_use(now_secs);
            }
            Decision::Deny { reason, key, .. } => {
                self.denied[reason.index()].fetch_add(1, Ordering::Relaxed);
                if let (Some(key), Some(i)) = (key, reason.key_index()) {
                    key.usage.denied[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Allowed checks with an active key.
    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Allowed checks with a deprecated key.
    pub fn allowed_deprecated(&self) -> u64 {
        self.allowed_deprecated.load(Ordering::Relaxed)
    }

    /// Denied checks for `reason`.
    pub fn denied(&self, reason: DenyReason) -> u64 {
        self.denied[reason.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_nanos(1_000));
        h.observe(Duration::from_nanos(2_500));
        h.observe(Duration::from_micros(7));
        h.observe(Duration::from_secs(1));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 1.0000105).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (2.5e-6, 2), "le is inclusive");
        assert_eq!(buckets[1], (5e-6, 0));
        assert_eq!(buckets[2], (1e-5, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::MAX, 1));
    }
}
