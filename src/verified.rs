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
//!
//! The table is two-way set-associative, with 2,048 sets of two slots on one
//! cache line each (128 KiB per serving thread, allocated on the thread's
//! first check). Traffic from many clients interleaves: with a thousand
//! keys in use at once and taken in turn, a direct-mapped table of 1,024
//! slots would put about six in ten of them in a slot shared with another
//! key, and those would evict each other and pay a SHA-256 on every request.
//! Two least-recently-used slots in each of 2,048 sets leave about one key
//! in eleven without a place (three or more keys in its set).

use std::cell::Cell;
use std::hash::Hasher as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use siphasher::sip128::{Hasher128 as _, SipHasher13};

/// Sets per thread (a power of two), of [`WAYS`] slots each.
const SETS: usize = 2048;
/// Slots per set.
const WAYS: usize = 2;

/// What a slot remembers. All zeros is an empty slot: no ring has id 0.
#[derive(Clone, Copy, Default)]
struct Slot {
    tag: u128,
    ring: u64,
    /// Index of the entry in the ring, or [`ABSENT`].
    index: u32,
}

/// The slots a tag may occupy, most recently used first, on one cache line.
#[derive(Default)]
#[repr(align(64))]
struct Set([Cell<Slot>; WAYS]);

/// The lookup found no key.
pub const ABSENT: u32 = u32::MAX;

thread_local! {
    static TABLE: Box<[Set; SETS]> = table(Set::default);
}

/// A per-thread table of `N` entries made by `make`, built in place on the
/// heap (one too large for a thread's stack to build it there first).
pub(crate) fn table<T, const N: usize>(make: impl FnMut() -> T) -> Box<[T; N]> {
    let entries: Box<[T]> = std::iter::repeat_with(make).take(N).collect();
    match entries.try_into() {
        Ok(table) => table,
        Err(_) => unreachable!("the iterator yields exactly N entries"),
    }
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

/// The set `tag` belongs to.
#[inline]
fn set_of(table: &[Set; SETS], tag: u128) -> &[Cell<Slot>; WAYS] {
    &table[tag as usize & (SETS - 1)].0
}

/// The remembered lookup result of `tag` in ring `ring`, if any.
#[inline]
pub fn get(tag: u128, ring: u64) -> Option<u32> {
    TABLE.with(|t| {
        let [first, second] = set_of(t, tag);
        let slot = first.get();
        if slot.tag == tag && slot.ring == ring {
            return Some(slot.index);
        }
        let other = second.get();
        if other.tag == tag && other.ring == ring {
            // Now the most recently used of the two.
            first.set(other);
            second.set(slot);
            return Some(other.index);
        }
        None
    })
}

/// Remembers that `tag` looked up `index` ([`ABSENT`] for none) in `ring`,
/// in place of what `tag` remembered of an older ring, else of the set's
/// least recently used slot.
#[inline]
pub fn put(tag: u128, ring: u64, index: u32) {
    TABLE.with(|t| {
        let [first, second] = set_of(t, tag);
        let slot = first.get();
        if slot.tag != tag {
            // Either the least recently used slot goes, or (same tag) the
            // result of an older ring.
            second.set(slot);
        }
        first.set(Slot { tag, ring, index });
    })
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

    /// Tags that land in the same set as `t`, made by hand (the set is the
    /// low bits of the tag).
    fn same_set(t: u128, n: u128) -> u128 {
        t.wrapping_add(n << 64)
    }

    #[test]
    fn two_tags_share_a_set_and_the_least_recently_used_goes() {
        let ring = next_ring_id();
        let a = tag(b"first");
        let (b, c) = (same_set(a, 1), same_set(a, 2));
        put(a, ring, 1);
        put(b, ring, 2);
        assert_eq!((get(a, ring), get(b, ring)), (Some(1), Some(2)));
        // b was used last, so a goes.
        put(c, ring, 3);
        assert_eq!(
            (get(a, ring), get(b, ring), get(c, ring)),
            (None, Some(2), Some(3))
        );
        // Using b makes c the least recently used.
        assert_eq!(get(b, ring), Some(2));
        put(a, ring, 1);
        assert_eq!(
            (get(a, ring), get(b, ring), get(c, ring)),
            (Some(1), Some(2), None)
        );
    }

    #[test]
    fn a_new_ring_replaces_the_tags_old_result_in_place() {
        let (old, new) = (next_ring_id(), next_ring_id());
        let a = tag(b"rotated");
        let b = same_set(a, 1);
        put(b, old, 2);
        put(a, old, 1);
        // a's result in the new ring takes the place of its old one, so b
        // stays.
        put(a, new, 5);
        assert_eq!(
            (get(a, new), get(a, old), get(b, old)),
            (Some(5), None, Some(2))
        );
        // The same when a's old result is the second slot.
        put(b, new, 6);
        assert_eq!((get(b, new), get(a, new)), (Some(6), Some(5)));
    }

    #[test]
    fn a_thousand_interleaved_keys_stay_remembered() {
        let ring = next_ring_id();
        let tags: Vec<u128> = (0..1000u32).map(|i| tag(&i.to_le_bytes())).collect();
        for (i, t) in (0u32..).zip(&tags) {
            put(*t, ring, i);
        }
        let kept = (0u32..)
            .zip(&tags)
            .filter(|(i, t)| get(**t, ring) == Some(*i))
            .count();
        // About 96 % expected (a direct-mapped table of 1,024 would keep
        // about 60 %); a set index that ignored the tag would keep 2.
        assert!(kept > 900, "only {kept} of 1000 kept");
    }

    #[test]
    fn tags_differ_and_are_stable() {
        assert_eq!(tag(b"a"), tag(b"a"));
        assert_ne!(tag(b"a"), tag(b"b"));
        assert_ne!(tag(b""), tag(b"\0"));
    }
}
