//! A per-thread memo of recent lookups, so a key seen again skips SHA-256.
//!
//! Without SHA instructions a SHA-256 of a presented key costs a few hundred
//! nanoseconds, most of the verify path. API traffic repeats the same keys
//! all the time, so each thread keeps a small direct-mapped table from a
//! *tag* of the presented secret to the result of the ring lookup (the
//! entry's index, or "not in the ring").
//!
//! The tag is SipHash-1-3 with a 128-bit output under a 128-bit key drawn
//! from the OS CSPRNG at startup. SipHash is a keyed pseudorandom function:
//! without the key, the tag of a secret cannot be predicted, so a presented
//! key that differs from a verified one matches its slot with probability
//! about 2^-128 — far below a guess of the 256-bit secret itself. Tags never
//! leave the process, so an attacker cannot even observe them. Secrets are
//! never stored, only tags, and a tag is worthless without the process's key.
//!
//! SipHash-1-3 rather than SipHash-2-4: it is the variant Rust's and
//! Python's hash tables use against adversarial inputs, no attack on it is
//! known, and it costs 23 ns instead of 40 ns for a 52-byte key on the
//! machine in BENCHMARKS.md, a sixth of the whole repeat lookup.
//!
//! Each slot remembers which ring produced it (a process-unique ring id), so
//! publishing a new ring invalidates every slot at once, without touching
//! them: a revoked or removed key is looked up afresh in the new ring. The
//! table is thread-local, so it takes no lock and shares no cache line.

use std::cell::Cell;
use std::hash::Hasher as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use siphasher::sip128::{Hasher128 as _, SipHasher13};

/// Slots per thread (a power of two). 32 bytes each: 32 KiB per thread.
const SLOTS: usize = 1024;

/// What a slot remembers.
#[derive(Clone, Copy)]
struct Slot {
    tag: u128,
    ring: u64,
    /// Index of the entry in the ring, or [`ABSENT`].
    index: u32,
}

/// The lookup found no key.
pub const ABSENT: u32 = u32::MAX;

const EMPTY: Slot = Slot {
    tag: 0,
    // No ring has id 0.
    ring: 0,
    index: ABSENT,
};

thread_local! {
    static TABLE: [Cell<Slot>; SLOTS] = const { [const { Cell::new(EMPTY) }; SLOTS] };
}

/// A new process-unique ring id (never 0).
pub fn next_ring_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn key() -> (u64, u64) {
    static KEY: OnceLock<(u64, u64)> = OnceLock::new();
    *KEY.get_or_init(|| {
        let mut bytes = [0u8; 16];
        if let Err(e) = getrandom::fill(&mut bytes) {
            // Without randomness the tags would be predictable; refuse to
            // run rather than weaken verification.
            panic!("the OS random number generator failed: {e}");
        }
        let (a, b) = bytes.split_at(8);
        let word = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(s);
            u64::from_le_bytes(w)
        };
        (word(a), word(b))
    })
}

/// The keyed tag of a presented secret.
#[inline]
pub fn tag(secret: &[u8]) -> u128 {
    let (k0, k1) = key();
    let mut h = SipHasher13::new_with_keys(k0, k1);
    h.write(secret);
    h.finish128().as_u128()
}

/// The remembered lookup result of `tag` in ring `ring`, if any.
#[inline]
pub fn get(tag: u128, ring: u64) -> Option<u32> {
    TABLE.with(|t| {
        let slot = t[tag as usize & (SLOTS - 1)].get();
        (slot.tag == tag && slot.ring == ring).then_some(slot.index)
    })
}

/// Remembers that `tag` looked up `index` ([`ABSENT`] for none) in `ring`.
#[inline]
pub fn put(tag: u128, ring: u64, index: u32) {
    TABLE.with(|t| t[tag as usize & (SLOTS - 1)].set(Slot { tag, ring, index }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_per_ring() {
        let ring = next_ring_id();
        let t = tag(b"some secret");
        assert_eq!(get(t, ring), None);
        put(t, ring, 7);
        assert_eq!(get(t, ring), Some(7));
        assert_eq!(get(t, next_ring_id()), None, "another ring");
        assert_eq!(get(tag(b"some secreT"), ring), None, "another secret");
        put(t, ring, ABSENT);
        assert_eq!(get(t, ring), Some(ABSENT));
    }

    #[test]
    fn tags_differ_and_are_stable() {
        assert_eq!(tag(b"a"), tag(b"a"));
        assert_ne!(tag(b"a"), tag(b"b"));
        assert_ne!(tag(b""), tag(b"\0"));
    }
}
