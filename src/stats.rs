//! Decision counters: relaxed atomics bumped on the verify path, read at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::decide::{Decision, DenyReason};
use crate::keyfile::KeyState;

/// Counts of decisions by outcome.
#[derive(Debug, Default)]
pub struct CheckStats {
    allowed: AtomicU64,
    allowed_deprecated: AtomicU64,
    denied: [AtomicU64; DenyReason::ALL.len()],
}

impl CheckStats {
    /// Records a decision, and the key's usage when one matched.
    #[inline]
    pub fn record(&self, decision: &Decision<'_>, now_secs: u64) {
        match decision {
            Decision::Allow(key) => {
                if key.state == KeyState::Deprecated {
                    self.allowed_deprecated.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.allowed.fetch_add(1, Ordering::Relaxed);
                }
                key.usage.record_use(now_secs);
            }
            Decision::Deny { reason, key } => {
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
