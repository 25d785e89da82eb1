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
//! The table is two-way set-associative, with sets of two slots on one
//! cache line each: 2,048 sets (128 KiB per serving thread, allocated on
//! the thread's first check) to begin with. Traffic from many clients
//! interleaves: with a thousand keys in use at once and taken in turn, a
//! direct-mapped table of 1,024 slots would put about six in ten of them in
//! a slot shared with another key, and those would evict each other and pay
//! a SHA-256 on every request. Two least-recently-used slots in each of
//! 2,048 sets leave about one key in eleven without a place (three or more
//! keys in its set).
//!
//! When more keys are in use than that, the table grows ([`Growth`]):
//! fourfold, up to [`MAX_SETS`] (32,768 keys, 1 MiB), when more than one
//! lookup in sixteen over a window made a known key push out another one,
//! and back if that did not help. So memory follows the number of
//! keys a thread actually sees, not the size of the ring. A flood of
//! unknown keys does not make it grow: only keys the ring holds count.
//!
//! A lookup the memo cannot answer costs the tag and a set on top of the
//! SHA-256: 125 ns instead of 108 ns for a first sight at 100k keys on the
//! machine in BENCHMARKS.md, where an answer saves 37 ns (35 ns instead of
//! 72 ns). So the memo pays only when more than about three lookups in ten
//! are repeats; without SHA instructions, where an answer saves several
//! hundred nanoseconds, one in twenty is enough. Most traffic repeats its
//! keys all the time, but a stream of distinct keys does not: guessed keys
//! in a brute-force flood, or more keys in turn than the table can hold.
//! Each thread therefore judges its memo ([`Worth`]) and, while it answers
//! too few lookups, skips it for all but one lookup in [`SAMPLE`], which
//! keeps judging it.

use std::cell::{Cell, RefCell};
use std::hash::Hasher as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use siphasher::sip128::{Hasher128 as _, SipHasher13};

/// Sets per thread to begin with (a power of two), of [`WAYS`] slots each.
const MIN_SETS: usize = 2048;
/// The most sets a thread's table grows to: 32,768 slots, 1 MiB.
pub(crate) const MAX_SETS: usize = 16 * 1024;
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
    /// This thread's sets (a power of two of them).
    static TABLE: RefCell<Box<[Set]>> = RefCell::new(sets(MIN_SETS));
    /// When to grow [`TABLE`].
    static GROWTH: Growth = const { Growth::new() };
    /// Whether [`TABLE`] is worth consulting.
    static WORTH: Worth = const { Worth::new() };
}

/// Lookups through the memo over which a thread judges whether it pays.
const WINDOW: u32 = 1024;
/// While the memo does not pay, one lookup in this many (on average) still
/// goes through it, to judge whether it would again.
const SAMPLE: u32 = 16;

/// Whether a thread's memo answers enough lookups to pay for itself.
///
/// Over each [`WINDOW`] of lookups through the memo it counts the answers.
/// The memo is skipped from the end of a window with fewer than one answer
/// in [`Worth::needed`] until the end of one with at least that many;
/// meanwhile one lookup in [`SAMPLE`] goes through it. Those sampled
/// lookups put fewer keys in the table, which then keeps each one longer,
/// so they judge the memo a little more kindly than a full stream would:
/// in doubt it comes back.
///
/// The gaps between samples are random (0 to `2 × (SAMPLE - 1)` skipped
/// lookups). With a fixed gap, traffic that cycles through a multiple of
/// [`SAMPLE`] keys would sample the same few keys every time round; they
/// fit in the table, so the memo would look worth consulting for the whole
/// stream, which it is not.
struct Worth {
    lookups: Cell<u32>,
    answers: Cell<u32>,
    /// While `skipping`: lookups that skip the memo before the next
    /// sampled one.
    skip: Cell<u32>,
    /// Whether the last window judged the memo not worth consulting.
    skipping: Cell<bool>,
    /// State of the xorshift generator that draws the gaps between samples.
    gaps: Cell<u32>,
}

impl Worth {
    const fn new() -> Worth {
        Worth {
            lookups: Cell::new(0),
            answers: Cell::new(0),
            skip: Cell::new(0),
            skipping: Cell::new(false),
            gaps: Cell::new(0x9E37_79B9),
        }
    }

    /// The lookups to skip before the next sampled one: on average
    /// `SAMPLE - 1`, drawn afresh each time by xorshift32 (whose state
    /// never becomes 0).
    #[inline]
    fn gap(&self) -> u32 {
        let mut x = self.gaps.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.gaps.set(x);
        x % (2 * SAMPLE - 1)
    }

    /// Whether this lookup goes through the memo.
    #[inline]
    fn consult(&self) -> bool {
        if !self.skipping.get() {
            return true;
        }
        let skip = self.skip.get();
        if skip > 0 {
            self.skip.set(skip - 1);
            return false;
        }
        self.skip.set(self.gap());
        true
    }

    /// Counts a lookup through the memo, answered or not, and judges the
    /// memo at the end of a window.
    #[inline]
    fn counted(&self, answered: bool) {
        let lookups = self.lookups.get() + 1;
        let answers = self.answers.get() + u32::from(answered);
        if lookups < WINDOW {
            self.lookups.set(lookups);
            self.answers.set(answers);
            return;
        }
        self.lookups.set(0);
        self.answers.set(0);
        let skipping = answers.saturating_mul(Self::needed()) < lookups;
        if skipping && !self.skipping.get() {
            self.skip.set(self.gap());
        }
        self.skipping.set(skipping);
    }

    /// One lookup in this many must be answered for the memo to pay: a
    /// quarter with SHA instructions (the break-even is about three in
    /// ten; in doubt the memo stays), a thirty-second without.
    fn needed() -> u32 {
        static NEEDED: OnceLock<u32> = OnceLock::new();
        *NEEDED.get_or_init(|| {
            if crate::decide::sha_in_hardware() {
                4
            } else {
                32
            }
        })
    }
}

/// Whether this thread's next lookup should go through the memo ([`tag`],
/// [`get`], and [`put`] after a miss) rather than straight to SHA-256.
#[inline]
pub fn consult() -> bool {
    WORTH.with(Worth::consult)
}

/// A per-thread table of `n` entries made by `make` (the memo's sets, the
/// OK cache's), built on the heap: made once per thread and at each resize.
#[cold]
pub(crate) fn table<T>(n: usize, make: impl FnMut() -> T) -> Box<[T]> {
    std::iter::repeat_with(make).take(n).collect()
}

#[cold]
fn sets(n: usize) -> Box<[Set]> {
    table(n, Set::default)
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
fn set_of(table: &[Set], tag: u128) -> &[Cell<Slot>; WAYS] {
    // The table's length is a power of two.
    &table[tag as usize & (table.len() - 1)].0
}

/// The remembered lookup result of `tag` in ring `ring`, if any.
#[inline]
pub fn get(tag: u128, ring: u64) -> Option<u32> {
    GROWTH.with(Growth::lookup);
    let found = TABLE.with_borrow(|t| {
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
    });
    WORTH.with(|w| w.counted(found.is_some()));
    found
}

/// Remembers that `tag` looked up `index` ([`ABSENT`] for none) in `ring`,
/// in place of what `tag` remembered of an older ring, else of the set's
/// least recently used slot.
#[inline]
pub fn put(tag: u128, ring: u64, index: u32) {
    let resize = TABLE.with_borrow(|t| {
        let [first, second] = set_of(t, tag);
        let slot = first.get();
        let mut pushed_out = None;
        if slot.tag != tag {
            // Either the least recently used slot goes, or (same tag) the
            // result of an older ring.
            pushed_out = Some(second.replace(slot));
        }
        first.set(Slot { tag, ring, index });
        // A known key took the place of another one of the same ring.
        pushed_out
            .filter(|old| old.ring == ring && old.index != ABSENT && index != ABSENT)
            .and_then(|_| GROWTH.with(|g| g.evicted(t.len(), MAX_SETS)))
    });
    if let Some(n) = resize {
        // Everything remembered goes: each key pays one SHA-256 again.
        TABLE.with_borrow_mut(|t| *t = sets(n));
    }
}

/// Whether a two-way per-thread cache should change size.
///
/// It counts lookups, and insertions that pushed out a live entry for a
/// key of the ring being served. At the first such insertion after a
/// window of as many lookups as the cache has slots, it judges the window
/// (except the first two after the cache was made or resized, while it
/// fills up again): more than one lookup in sixteen pushing out a live key
/// means the keys in use do not fit, so the cache should grow, fourfold up
/// to its cap. A growth is a trial: unless the next judged window's rate is
/// at least a sixteenth lower than the rate that caused it, the keys in use
/// are so many that growing does not help (a stream of distinct keys, say),
/// so the cache goes back to its size and does not try again for a while
/// (1, 2, 4, … up to 1,024 windows). Only known keys count, so a flood of
/// unknown keys cannot make a cache grow.
pub(crate) struct Growth {
    lookups: Cell<u32>,
    evictions: Cell<u32>,
    /// The rate (per 65,536 lookups) that caused the growth on trial, or 0.
    trial: Cell<u32>,
    /// The number of sets before the growth on trial.
    before: Cell<usize>,
    /// Windows to wait before the next growth.
    cooldown: Cell<u32>,
    /// The wait after the next growth that does not help.
    backoff: Cell<u32>,
    /// Windows left before the cache is full again after it was made or
    /// resized; until then evictions are rarer than they will be.
    filling: Cell<u8>,
}

/// How much a growing cache grows at once. Doubling is not always enough to
/// see a difference: keys spread evenly over the sets (the OK cache's
/// Fibonacci hashing of positions does that) all collide until there are
/// about as many slots as keys.
const GROWTH_FACTOR: usize = 4;
/// The longest wait, in windows, after growths that did not help.
const MAX_BACKOFF: u32 = 1024;
/// Windows not judged after a cache is made or resized.
const FILLING: u8 = 2;

impl Growth {
    pub(crate) const fn new() -> Growth {
        Growth {
            lookups: Cell::new(0),
            evictions: Cell::new(0),
            trial: Cell::new(0),
            before: Cell::new(0),
            cooldown: Cell::new(0),
            backoff: Cell::new(1),
            filling: Cell::new(FILLING),
        }
    }

    /// Counts a lookup. After 2^32 lookups with no eviction the count wraps,
    /// which only delays the next judgement.
    #[inline]
    pub(crate) fn lookup(&self) {
        self.lookups.set(self.lookups.get().wrapping_add(1));
    }

    /// Counts an insertion that pushed out a live key, in a cache of `sets`
    /// sets of two slots that may grow to `max_sets`; the number of sets
    /// the cache should have from now on, if not `sets`. Out of line: only
    /// a miss gets here.
    #[cold]
    #[inline(never)]
    pub(crate) fn evicted(&self, sets: usize, max_sets: usize) -> Option<usize> {
        let evictions = self.evictions.get().saturating_add(1);
        let lookups = self.lookups.get();
        if (lookups as usize) < sets * 2 {
            self.evictions.set(evictions);
            return None;
        }
        self.lookups.set(0);
        self.evictions.set(0);
        if self.filling.get() > 0 {
            self.filling.set(self.filling.get() - 1);
            return None;
        }
        let rate = (u64::from(evictions) * 65_536 / u64::from(lookups.max(1))) as u32;
        let trial = self.trial.replace(0);
        if trial != 0 {
            if rate > trial - trial / 16 {
                self.cooldown.set(self.backoff.get());
                self.backoff.set((self.backoff.get() * 2).min(MAX_BACKOFF));
                self.filling.set(FILLING);
                return Some(self.before.get());
            }
            self.backoff.set(1);
        }
        if self.cooldown.get() > 0 {
            self.cooldown.set(self.cooldown.get() - 1);
            return None;
        }
        if sets < max_sets && rate > 65_536 / 16 {
            self.trial.set(rate);
            self.before.set(sets);
            self.filling.set(FILLING);
            return Some((sets * GROWTH_FACTOR).min(max_sets));
        }
        None
    }
}

/// This thread's number of memo sets.
#[cfg(test)]
fn sets_now() -> usize {
    TABLE.with_borrow(|t| t.len())
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

    /// Looks every tag up in turn, remembering index `i` for tag `i` (or
    /// [`ABSENT`] for all when `absent`) where the memo had forgotten it;
    /// how many it remembered.
    fn pass(tags: &[u128], ring: u64, absent: bool) -> usize {
        let mut hits = 0;
        for (i, t) in (0u32..).zip(tags) {
            let want = if absent { ABSENT } else { i };
            if get(*t, ring) == Some(want) {
                hits += 1;
            } else {
                put(*t, ring, want);
            }
        }
        hits
    }

    /// [`pass`] `times` times.
    fn in_turn(tags: &[u128], ring: u64, absent: bool, times: usize) {
        for _ in 0..times {
            pass(tags, ring, absent);
        }
    }

    fn tags(n: u32) -> Vec<u128> {
        (0..n).map(|i| tag(&i.to_le_bytes())).collect()
    }

    #[test]
    fn grows_when_more_known_keys_interleave_than_fit() {
        let ring = next_ring_id();
        let tags = tags(6000);
        assert_eq!(sets_now(), MIN_SETS);
        in_turn(&tags, ring, false, 20);
        assert!(sets_now() > MIN_SETS, "still {} sets", sets_now());
        let hits = pass(&tags, ring, false);
        // About 95 % once grown to its cap; 57 % at 4,096 sets.
        assert!(hits > 5400, "only {hits} of 6000 remembered");
    }

    #[test]
    fn unknown_keys_and_keys_that_fit_do_not_make_it_grow() {
        let ring = next_ring_id();
        // 500 known keys in turn, many times over: they fit.
        let known = tags(500);
        in_turn(&known, ring, false, 40);
        // A flood of distinct unknown keys.
        let unknown: Vec<u128> = (0..50_000u32)
            .map(|i| tag(format!("unknown-{i}").as_bytes()))
            .collect();
        in_turn(&unknown, ring, true, 2);
        assert_eq!(sets_now(), MIN_SETS);
    }

    #[test]
    fn growth_stops_at_the_cap() {
        let ring = next_ring_id();
        // Growing helps 16,000 keys taken in turn: about 99.7 %, 58 % and
        // 26 % of lookups miss at 2,048, 8,192 and 16,384 sets.
        let tags = tags(16_000);
        in_turn(&tags, ring, false, 12);
        assert_eq!(sets_now(), MAX_SETS);
    }

    #[test]
    fn more_keys_than_would_fit_at_the_cap_leave_it_small() {
        let ring = next_ring_id();
        // 64,000 keys in turn: nearly every lookup misses at 8,192 sets as
        // at 2,048, so a growth does not help and is undone.
        let tags = tags(64_000);
        in_turn(&tags, ring, false, 4);
        // Back at its size after each trial, or in the middle of one.
        assert!(
            sets_now() <= GROWTH_FACTOR * MIN_SETS,
            "{} sets",
            sets_now()
        );
        assert!(GROWTH.with(|g| g.backoff.get()) > 2, "trials undone");
    }

    /// A window of 100 lookups (a cache of 50 sets that may grow to 800)
    /// with `evictions` evictions, judged at the last.
    fn window(g: &Growth, evictions: u32) -> Option<usize> {
        window_up_to(g, evictions, 800)
    }

    /// [`window`] for a cache that may grow to `max_sets`.
    fn window_up_to(g: &Growth, evictions: u32, max_sets: usize) -> Option<usize> {
        for _ in 0..100 {
            g.lookup();
        }
        for _ in 1..evictions {
            assert_eq!(g.evicted(1_000_000, 1_000_000), None);
        }
        g.evicted(50, max_sets)
    }

    /// The windows after a cache was made or resized, never judged.
    fn fill(g: &Growth) {
        for _ in 0..FILLING {
            assert_eq!(window(g, 99), None, "filling");
        }
    }

    #[test]
    fn growth_is_judged_over_windows_of_lookups() {
        let g = Growth::new();
        fill(&g);
        // Before a window of 100 lookups is over, nothing.
        for _ in 0..99 {
            g.lookup();
        }
        assert_eq!(g.evicted(50, 800), None);
        // 100 lookups with 2 evictions: not more than one in sixteen.
        g.lookup();
        assert_eq!(g.evicted(50, 800), None);
        // 7 in 100 is.
        assert_eq!(window(&g, 7), Some(200));
        fill(&g);
        // The growth lowered the rate: it stays, and the next may follow.
        assert_eq!(window(&g, 6), None);
        assert_eq!(window(&g, 20), Some(200));
    }

    #[test]
    fn a_cache_at_its_cap_does_not_grow() {
        let g = Growth::new();
        fill(&g);
        // 99 in 100 would make it grow, but 50 sets is its cap.
        assert_eq!(window_up_to(&g, 99, 50), None);
        assert_eq!(window(&g, 99), Some(200), "below its cap it would");
    }

    #[test]
    fn a_growth_that_does_not_help_is_undone_and_tried_ever_less_often() {
        let g = Growth::new();
        fill(&g);
        let mut waits = Vec::new();
        for _ in 0..5 {
            let mut wait = 0;
            while window(&g, 90).is_none() {
                wait += 1;
            }
            waits.push(wait);
            fill(&g);
            // Nearly as bad after growing: back, and wait.
            assert_eq!(window(&g, 86), Some(50));
            fill(&g);
        }
        assert_eq!(waits, [0, 1, 2, 4, 8]);
    }

    #[test]
    fn tags_differ_and_are_stable() {
        assert_eq!(tag(b"a"), tag(b"a"));
        assert_ne!(tag(b"a"), tag(b"b"));
        assert_ne!(tag(b""), tag(b"\0"));
    }

    /// Runs `lookups` lookups through `w`, each going through the memo
    /// answered when `answered` says so; how many went through it.
    fn judge(w: &Worth, lookups: u32, answered: impl Fn(u32) -> bool) -> u32 {
        let mut consulted = 0;
        for i in 0..lookups {
            if w.consult() {
                w.counted(answered(i));
                consulted += 1;
            }
        }
        consulted
    }

    #[test]
    fn a_memo_that_answers_too_few_lookups_is_skipped_but_for_samples() {
        let w = Worth::new();
        assert_eq!(
            judge(&w, WINDOW, |_| false),
            WINDOW,
            "consulted to begin with"
        );
        let sampled = judge(&w, WINDOW * SAMPLE, |_| false);
        assert!(
            (WINDOW * 9 / 10..=WINDOW * 11 / 10).contains(&sampled),
            "then about one in SAMPLE: {sampled}"
        );
        // The sampled lookups find repeats again: after the window under
        // way and one more, every lookup goes through the memo.
        let mut lookups = 0;
        let mut consulted = 0;
        while w.skipping.get() {
            lookups += 1;
            if w.consult() {
                w.counted(true);
                consulted += 1;
            }
        }
        assert!(consulted <= 2 * WINDOW, "{consulted}");
        assert!(lookups <= 2 * WINDOW * SAMPLE * 11 / 10, "{lookups}");
        assert_eq!(judge(&w, 1000, |_| true), 1000);
    }

    #[test]
    fn samples_do_not_follow_the_rhythm_of_the_traffic() {
        // Traffic cycling through 64 keys: a fixed gap of SAMPLE would
        // sample the same 4 of them every time round.
        let w = Worth::new();
        judge(&w, WINDOW, |_| false);
        assert!(w.skipping.get());
        let mut seen = [false; 64];
        for i in 0..64 * SAMPLE as usize * 8 {
            if w.consult() {
                seen[i % 64] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "{seen:?}");
    }

    #[test]
    fn a_memo_that_answers_enough_lookups_is_kept() {
        let w = Worth::new();
        // One in three answered: above a quarter, and above a thirty-second.
        assert_eq!(judge(&w, WINDOW * 8, |i| i % 3 == 0), WINDOW * 8);
        // The share needed is judged per window, not per lookup.
        assert_eq!(
            judge(&w, WINDOW * 8, |i| i % WINDOW < WINDOW / 2),
            WINDOW * 8
        );
    }

    #[test]
    fn skipping_the_memo_finds_the_same_keys() {
        let text: String = (0..100)
            .map(|i| {
                let digest = hex::encode(crate::decide::digest(&format!("secret-{i}")));
                format!("[[keys]]\nid = \"k{i}\"\nclient = \"c\"\nsha256 = \"{digest}\"\n")
            })
            .collect();
        let file = crate::keyfile::parse_str(&text, Default::default()).unwrap();
        let ring = crate::ring::KeyRing::build(
            &file,
            crate::ring::RingSource {
                generation: 1,
                sha256: [0; 32],
                loaded_at: jiff::Timestamp::now(),
            },
            &crate::ring::UsageRegistry::default(),
            None,
        );
        let find = |s: &str| ring.find(s.as_bytes()).key().map(|k| k.index());
        let check = || {
            for i in 0..100u32 {
                assert_eq!(find(&format!("secret-{i}")), Some(i));
            }
            assert_eq!(find("secret-100"), None);
        };
        check();
        assert!(!WORTH.with(|w| w.skipping.get()));
        // A flood of distinct unknown keys: the memo answers none of them.
        for i in 0..WINDOW * 2 {
            assert_eq!(find(&format!("guess-{i}")), None);
        }
        assert!(WORTH.with(|w| w.skipping.get()));
        check();
        check();
    }
}
