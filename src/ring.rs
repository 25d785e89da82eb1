//! The key ring: an immutable index from SHA-256 digest to key, and the single
//! point where a new ring is published.
//!
//! A [`KeyRing`] is built completely off the hot path from a validated file
//! (any [`KeySource`]: a [`KeyFile`], or the fast parser's compact form),
//! then published with one atomic store through a [`RingHandle`].
//! Readers do one `ArcSwap::load` per request and never see a half-built ring.
//!
//! # Layout
//!
//! A ring holds a million keys in well under a hundred bytes each, so it is
//! laid out in columns rather than as one struct per key:
//!
//! - one fixed-size slot per key (file order, 28 bytes) with what the
//!   verify path reads: the first 128 bits of the digest (see
//!   [`DigestPrefix`]), the offset of the id in a shared string
//!   arena (without the client's name when the id starts with it; see
//!   [`KeyId`]), the interned (client, scope set) profile, the state, the
//!   expiry in whole seconds, and flags saying which rare fields the key has;
//! - the rare fields (not-before, sub-second or out-of-range times, rate
//!   limit, description, deprecation time) in sparse columns of entry
//!   indices and values, searched only when a flag says they exist;
//! - two open-addressing tables of entry indices, one by digest (the verify
//!   path; 32-bit cells holding an index and a few digest bits) and one by
//!   id (reload diffs, admin, tests).
//!
//! [`KeyRef`] is a view of one entry with accessor methods.
//!
//! # Usage counters
//!
//! What the allow path counts for every key, its allowed requests and the
//! second of its last use, the ring holds in two arrays indexed like the
//! slots: a first sight of a key fetches its counters in parallel with its
//! slot, where counters reached through a pointer cost two more dependent
//! cache misses. A ring starts them at zero; when a [`RingHandle`] replaces
//! a ring, the replaced ring's counts are folded into the new one by id
//! once checks have let go of it, and until then a [`UsageView`] adds them
//! in, so the counts survive reloads and a key's count never goes down
//! while it stays in the ring (a check still counting into a replaced ring
//! after [`RELEASE_WAIT`] would have its count lost).
//!
//! What only some keys need, the denials by reason and the rate-limit
//! budget ([`KeyUsage`]), lives in a [`UsageRegistry`] outside the ring,
//! keyed by key id. Those counters are created lazily: the first denial of a
//! key, or the first use of a rate-limited key, in a ring fetches (or
//! creates) them from the registry and links them into the ring, once per
//! key and ring. Counters of keys used under earlier rings are linked at
//! build time, taken from the previous ring in file order rather than looked
//! up by id, so a rebuild costs little more with every key in use than with
//! none.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};
use dashmap::DashMap;
use jiff::Timestamp;

use crate::keyfile::{KeyFile, KeySource, KeyState, KeyView, Parsed, RateLimitSpec, Threads};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// What a ring keeps of a key's digest: its first 128 bits.
///
/// A ring is looked up by the SHA-256 of the presented secret, and a key
/// matches when the first 128 bits agree. To be let in with a secret that is
/// not the key's, an attacker must find a second preimage for those 128 bits
/// (2^128 SHA-256 computations for one chosen key, 2^108 for any one of a
/// million), and the chance that a random guess matches any of a million
/// keys is 2^-108. The other 128 bits would add strength nobody can use
/// while costing 16 bytes per key: 16 MB of a million-key ring. The key
/// file keeps the whole digest; the validator refuses two keys whose
/// digests share their first 128 bits.
pub type DigestPrefix = [u8; 16];

/// The part of `digest` a ring keeps.
#[inline]
pub fn digest_prefix(digest: &Digest) -> DigestPrefix {
    let mut prefix = [0u8; 16];
    prefix.copy_from_slice(&digest[..16]);
    prefix
}

/// Denial reasons counted per key in [`KeyUsage::denied`].
pub const KEY_DENIAL_REASONS: usize = 6;

/// Live counters of one key that only some keys need; shared between rings
/// by key id. (Allowed requests and the last use are counted in the ring:
/// see [`UsageView`].)
#[derive(Debug, Default)]
pub struct KeyUsage {
    /// Denials that matched this key, by [`crate::decide::DenyReason::key_index`].
    pub denied: [AtomicU64; KEY_DENIAL_REASONS],
    /// The key's rate-limit budget.
    pub limiter: crate::limit::Limiter,
    /// The limit the budget was kept for; a reload that changes it resets the
    /// budget, any other reload keeps it. Read only when counters are linked
    /// into a ring; one pointer, where a lock and the spec beside it took
    /// forty bytes of every used key.
    limit_spec: arc_swap::ArcSwapOption<RateLimitSpec>,
}

impl KeyUsage {
    /// Keeps the budget if `spec` is the limit it was kept for, else resets it.
    ///
    /// Two rings that link the same counters at once with different limits
    /// both reset the budget, and the limit of the later store is kept: the
    /// outcome a lock would give with the rings in the other order.
    pub fn sync_limit(&self, spec: Option<RateLimitSpec>) {
        if self.limit_spec.load().as_deref() == spec.as_ref() {
            return;
        }
        self.limit_spec.store(spec.map(Arc::new));
        self.limiter.reset();
    }
}

/// What a presented secret finds in a ring ([`KeyRing::find`]).
#[derive(Debug, Clone, Copy)]
pub enum Found<'r> {
    /// The key whose secret it is.
    Key(KeyRef<'r>),
    /// No key: the ring does not hold the secret. A secret that claims
    /// keyward's format and fails its checksum is one, found without a
    /// lookup.
    Unknown,
}

impl<'r> Found<'r> {
    /// The key, if one was found.
    pub fn key(self) -> Option<KeyRef<'r>> {
        match self {
            Found::Key(k) => Some(k),
            Found::Unknown => None,
        }
    }
}

/// Denial counters and budgets by key id; touched when a key first needs
/// them (its first denial, or a rate-limited key's first use), when a ring
/// is built without a previous ring to link from, and when keys are
/// removed.
///
/// Cloning shares the same registry (rings keep a clone to link counters
/// lazily).
#[derive(Debug, Clone)]
pub struct UsageRegistry {
    inner: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    by_id: DashMap<Arc<str>, Arc<KeyUsage>, ahash::RandomState>,
    /// The process-unique id (`uid`) of the ring last published with this
    /// registry.
    latest: AtomicU64,
    /// Ids whose counters were created where a build reading rings' pages
    /// might not see them: by a check on a ring that is no longer the latest
    /// or whose pages a build has already read past, or directly. A ring
    /// built from the previous one links the previous ring's counters by
    /// position and these by id, so it misses none the registry holds.
    fresh: std::sync::Mutex<Vec<Arc<str>>>,
}

/// Shards of the registry. A check that meets a key without counters (its
/// first denial ever, or a rate-limited key's first use) must hold its
/// shard for writing, and a full pass over the
/// registry (a ring built without a previous one, or a sweep of removed
/// keys) holds each shard for reading or writing in turn. DashMap's
/// default, four per CPU, put 125,000 keys in a shard with a million keys
/// registered on 2 CPUs, a wait of 125–192 ms (`bench-ring`, when builds
/// still linked by a full pass); 1,024 shards (128 KiB of cache-line-padded
/// locks) make it about a thousand keys and 0.5 ms.
const REGISTRY_SHARDS: usize = 1024;

impl Default for UsageRegistry {
    fn default() -> UsageRegistry {
        UsageRegistry {
            inner: Arc::new(Registry {
                by_id: DashMap::with_hasher_and_shard_amount(
                    ahash::RandomState::new(),
                    REGISTRY_SHARDS,
                ),
                latest: AtomicU64::new(0),
                fresh: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }
}

impl UsageRegistry {
    /// The counters for `id`, created on first sight.
    pub fn usage(&self, id: &str) -> Arc<KeyUsage> {
        let (usage, created) = self.find_or_create(id);
        // Not through a ring, so no build will find them in a ring's pages.
        if let Some(id) = created {
            self.list(id);
        }
        usage
    }

    /// The counters for `id`, and the registry's copy of the id if this
    /// call created them.
    fn find_or_create(&self, id: &str) -> (Arc<KeyUsage>, Option<Arc<str>>) {
        let by_id = &self.inner.by_id;
        if let Some(u) = by_id.get(id) {
            return (Arc::clone(u.value()), None);
        }
        match by_id.entry(Arc::from(id)) {
            dashmap::Entry::Occupied(e) => (Arc::clone(e.get()), None),
            dashmap::Entry::Vacant(e) => {
                let id = Arc::clone(e.key());
                (Arc::clone(e.insert(Arc::default()).value()), Some(id))
            }
        }
    }

    /// Lists `id` for the next builds to link by id.
    fn list(&self, id: Arc<str>) {
        self.listed().push(id);
    }

    /// The listed ids (see `Registry::fresh`), locked.
    fn listed(&self) -> std::sync::MutexGuard<'_, Vec<Arc<str>>> {
        self.inner.fresh.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ring` is the one last published with this registry.
    fn is_latest(&self, ring: &KeyRing) -> bool {
        self.inner.latest.load(Ordering::Acquire) == ring.uid
    }

    /// Records that `ring` is the one being served, and unlists the ids
    /// its build linked (ids are only ever appended, and only this removes
    /// them, so they are still the list's first). A ring published again
    /// unlists nothing more.
    fn published(&self, ring: &KeyRing) {
        self.inner.latest.store(ring.uid, Ordering::Release);
        let linked = ring.fresh_linked.swap(0, Ordering::Relaxed);
        if linked > 0 {
            let mut listed = self.listed();
            let linked = linked.min(listed.len());
            listed.drain(..linked);
        }
    }

    /// Whether `other` is this registry (not a copy of its contents).
    fn same(&self, other: &UsageRegistry) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A copy of the listed ids. They stay listed until a ring that linked
    /// them is published: a ring may be built and then not published (its
    /// file turned out to be the serving one).
    fn fresh(&self) -> Vec<Arc<str>> {
        self.listed().clone()
    }

    /// Drops the counters of keys that `ring` no longer holds.
    ///
    /// This visits every counter with its shard of the registry locked for
    /// writing, and serving threads read the registry when a key first needs
    /// its counters in a ring: a reload uses [`UsageRegistry::forget`] with the ids it
    /// removed instead, and this only when it cannot tell which ids those are.
    pub fn retain_ring(&self, ring: &KeyRing) {
        self.inner.by_id.retain(|id, _| ring.by_id(id).is_some());
    }

    /// Drops the counters of `ids` that `ring` does not hold: the keys a
    /// reload removed. Each id locks its shard for one removal, so a serving
    /// thread that needs the registry meanwhile waits for at most that.
    pub fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a str>, ring: &KeyRing) {
        for id in ids {
            // Between removals, never while a shard is locked.
            crate::priority::pace();
            self.inner
                .by_id
                .remove_if(id, |id, _| ring.by_id(id).is_none());
        }
    }

    /// Number of keys with counters (keys used at least once, or linked).
    pub fn len(&self) -> usize {
        self.inner.by_id.len()
    }

    /// Whether no key has counters.
    pub fn is_empty(&self) -> bool {
        self.inner.by_id.is_empty()
    }
}

/// Flag: the key has a not-before time (in `Rare::not_before`).
const F_NOT_BEFORE: u8 = 1;
/// Flag: the expiry is not a whole second in `1..=u32::MAX` (exact value in
/// `Rare::expires_at`).
const F_EXPIRES_EXACT: u8 = 2;
/// Flag: the key has a rate limit (in `Rare::rate_limit`).
const F_RATE_LIMIT: u8 = 4;
/// Flag: the key has a description (in `Rare::description`).
const F_DESCRIPTION: u8 = 8;
/// Flag: the key has a deprecation time (in `Rare::deprecated_at`).
const F_DEPRECATED_AT: u8 = 16;
/// Flag: the id starts with the client's name, which the arena leaves out
/// (see [`KeyId`]).
const F_ID_AFTER_CLIENT: u8 = 32;

/// What the arena keeps of an id that starts with its (non-empty)
/// client's name: the rest ([`F_ID_AFTER_CLIENT`]).
fn id_after_client<'a>(id: &'a str, client: &str) -> Option<&'a str> {
    id.strip_prefix(client).filter(|_| !client.is_empty())
}
/// Bits of [`Slot::meta`] that hold the flags; the state sits above them and
/// the profile index above that.
const FLAG_BITS: u32 = 6;
const STATE_BITS: u32 = 2;
const PROFILE_SHIFT: u32 = FLAG_BITS + STATE_BITS;
/// Profiles a ring can index: 2^24, more than [`crate::keyfile::MAX_KEYS`].
const MAX_PROFILES: usize = 1 << (u32::BITS - PROFILE_SHIFT);

/// What the ring keeps of every key: 28 bytes.
#[derive(Debug, Clone, Copy)]
struct Slot {
    digest: DigestPrefix,
    /// Start of the id in the arena; it ends where the next id starts.
    id_start: u32,
    /// Unix seconds of the expiry (0: none, or see [`F_EXPIRES_EXACT`]).
    expires_at: u32,
    /// The index into `profiles` (the client and scope set), the state and
    /// the flags, packed: `profile << 8 | state << 6 | flags`.
    meta: u32,
}

impl Slot {
    #[inline]
    fn flags(&self) -> u8 {
        (self.meta & ((1 << FLAG_BITS) - 1)) as u8
    }

    #[inline]
    fn state(&self) -> usize {
        ((self.meta >> FLAG_BITS) & ((1 << STATE_BITS) - 1)) as usize
    }

    #[inline]
    fn profile(&self) -> usize {
        (self.meta >> PROFILE_SHIFT) as usize
    }
}

/// A client and a scope set, interned: keys of one client mostly share their
/// scopes, so there are about as many profiles as clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Profile {
    /// Index into `client_starts`.
    client: u32,
    /// Index into `scope_sets`.
    scopes: u32,
}

const STATES: [KeyState; 3] = [KeyState::Active, KeyState::Deprecated, KeyState::Revoked];

fn state_code(s: KeyState) -> u8 {
    match s {
        KeyState::Active => 0,
        KeyState::Deprecated => 1,
        KeyState::Revoked => 2,
    }
}

/// One field few keys have: the entries that have it, ascending, and their
/// values. Looked up (by binary search) only when the key's flag says so.
#[derive(Debug)]
struct Sparse<T> {
    entries: Box<[u32]>,
    values: Box<[T]>,
}

impl<T> Sparse<T> {
    fn position(&self, index: u32) -> Option<usize> {
        self.entries.binary_search(&index).ok()
    }

    fn get(&self, index: u32) -> Option<&T> {
        self.values.get(self.position(index)?)
    }
}

/// Collects a [`Sparse`] column in entry order.
#[derive(Debug)]
struct SparseBuilder<T> {
    entries: Vec<u32>,
    values: Vec<T>,
}

impl<T> SparseBuilder<T> {
    fn new() -> Self {
        SparseBuilder {
            entries: Vec::new(),
            values: Vec::new(),
        }
    }

    fn push(&mut self, index: u32, value: T) {
        self.entries.push(index);
        self.values.push(value);
    }

    fn finish(self) -> Sparse<T> {
        Sparse {
            entries: self.entries.into_boxed_slice(),
            values: self.values.into_boxed_slice(),
        }
    }
}

/// The fields few keys have, in columns. Deprecation times and descriptions
/// are interned: keys deprecated together share a time, and descriptions
/// are mostly written from a few templates. Each distinct description is a
/// range of one shared text (each ends where the next starts), so no key
/// costs an allocation of its own.
#[derive(Debug)]
struct Rare {
    not_before: Sparse<Timestamp>,
    expires_at: Sparse<Timestamp>,
    rate_limit: Sparse<RateLimitSpec>,
    /// Indices into `deprecation_times`.
    deprecated_at: Sparse<u32>,
    deprecation_times: Box<[Timestamp]>,
    /// Indices into `description_starts`.
    description: Sparse<u32>,
    description_starts: Box<[u32]>,
    descriptions: Box<str>,
}

/// An interned scope set.
#[derive(Debug)]
struct ScopeSet {
    /// Deduplicated, file order.
    list: Box<[Box<str>]>,
    /// Joined by single spaces, as sent in `x-keyward-scopes`.
    joined: Box<str>,
}

/// Where a ring came from, as given to [`KeyRing::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSource {
    /// Publication number, starting at 1 for the first ring of the process.
    pub generation: u64,
    /// SHA-256 of the file bytes the ring was built from.
    pub sha256: Digest,
    /// When the ring was built.
    pub loaded_at: Timestamp,
}

/// The SHA-256 of the file a ring was built from: known when the ring is
/// built, or filled in a moment after the ring is published.
///
/// Hashing a large key file costs about as much as parsing it and building
/// its ring together, so for large files the hash is finished after the ring
/// is already serving (see [`crate::reload`]). Until then the digest is
/// pending: the admin API shows `null` and the `keyward_ring_info` series is
/// absent. Cloning shares the same cell, so the thread computing the hash can
/// fill it in while readers hold the ring.
#[derive(Debug, Clone, Default)]
pub struct FileDigest(Arc<OnceLock<Digest>>);

impl FileDigest {
    /// A digest to be filled in later with [`FileDigest::set`].
    pub fn pending() -> FileDigest {
        FileDigest::default()
    }

    /// A digest known already.
    pub fn known(digest: Digest) -> FileDigest {
        FileDigest(Arc::new(OnceLock::from(digest)))
    }

    /// The digest, or `None` while it is being computed.
    pub fn get(&self) -> Option<Digest> {
        self.0.get().copied()
    }

    /// Fills in the digest; the first value set stays. Returns whether this
    /// call set it.
    pub fn set(&self, digest: Digest) -> bool {
        self.0.set(digest).is_ok()
    }

    /// Blocks until the digest is known.
    pub fn wait(&self) -> Digest {
        *self.0.wait()
    }
}

/// `path` as a normalising upstream sees it (RFC 3986 sections 5.2.4 and
/// 6, then merged slashes, as Envoy's `normalize_path` and `merge_slashes`
/// do, in that order): the query and fragment cut off, percent-encoded
/// unreserved characters decoded (`%74` is `t`; an encoded `/` stays
/// encoded), `.` and `..` segments resolved (a `..` after `//` removes the
/// empty segment), then runs of `/` merged. Borrowed, with no work beyond
/// three scans, when the path is already normal, as nearly every path is.
pub fn normalized_path(path: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if !path.contains('%') && !path.contains("//") && !path.contains("/.") {
        return Cow::Borrowed(path);
    }
    let mut decoded = Vec::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(b) = u8::from_str_radix(hex, 16)
            && (b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            decoded.push(b);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    // Only ASCII bytes were decoded, each in place of three ASCII bytes.
    let decoded = String::from_utf8_lossy(&decoded);
    // Dot segments first, empty segments counting as segments.
    let mut segments: Vec<&str> = Vec::new();
    let mut dot_last = false;
    for segment in decoded.strip_prefix('/').unwrap_or(&decoded).split('/') {
        dot_last = matches!(segment, "." | "..");
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    // Then runs of `/` merged: empty segments dropped, a trailing `/` kept.
    let trailing = dot_last || segments.last().is_some_and(|s| s.is_empty());
    let mut out = String::with_capacity(decoded.len());
    for s in segments.iter().filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// `n` zeroed counters, in memory asked for zeroed: a large array's pages
/// come from the kernel already zero, not cleared a second time.
fn zeroed<T: bytemuck::Zeroable>(n: usize) -> Box<[T]> {
    bytemuck::allocation::zeroed_slice_box(n)
}

/// Counters with every page written once, so that the page faults (a
/// large ring's counters sit in huge pages: 2 MiB cleared by the kernel at
/// the first write) are taken by the thread building the ring, not by the
/// checks that count first on each page.
fn faulted_in<T: Counter>(mut counters: Box<[T]>) -> Box<[T]> {
    const PAGE: usize = 4096;
    let step = (PAGE / std::mem::size_of::<T>()).max(1);
    // `black_box`: the compiler knows the memory is zero and would leave
    // out a plain store of zero.
    for counter in counters.iter_mut().step_by(step) {
        counter.set(std::hint::black_box(0));
    }
    // The last page, if the array does not start on a page boundary.
    if let Some(last) = counters.last_mut() {
        last.set(std::hint::black_box(0));
    }
    counters
}

/// An atomic counter of a ring's arrays, set through `&mut`.
trait Counter {
    fn set(&mut self, value: u32);
}

impl Counter for AtomicU64 {
    fn set(&mut self, value: u32) {
        *self.get_mut() = u64::from(value);
    }
}

impl Counter for AtomicU32 {
    fn set(&mut self, value: u32) {
        *self.get_mut() = value;
    }
}

/// Keys per page of lazily linked usage counters.
const USAGE_PAGE: usize = 64;

type UsagePage = [OnceLock<Arc<KeyUsage>>; USAGE_PAGE];

/// An immutable set of keys indexed by digest.
pub struct KeyRing {
    slots: Box<[Slot]>,
    /// Every id, concatenated in file order.
    ids: Box<str>,
    /// Every distinct client name, concatenated; each ends where the next
    /// starts. One allocation rather than one per client: small allocations
    /// that outlive a reload would pin the pages of the parser's garbage
    /// around them.
    clients: Box<str>,
    client_starts: Box<[u32]>,
    scope_sets: Box<[ScopeSet]>,
    profiles: Box<[Profile]>,
    rare: Rare,
    /// Open addressing by the digest's first eight bytes: each cell holds an
    /// entry index plus one in its low `digest_index_bits` bits (0: empty)
    /// and as many bits of bytes 8..12 of the digest as fit above them (12
    /// bits for a million keys), so a miss scans only this table.
    by_digest: Box<[u32]>,
    digest_index_bits: u32,
    /// Open addressing by a hash of the id, in cells laid out as
    /// `by_digest`'s: an entry index plus one in the low `digest_index_bits`
    /// bits (0: empty) and low bits of the id's hash above them, so a probe
    /// builds and compares an id only when those bits agree.
    by_id: Box<[u32]>,
    id_hasher: ahash::RandomState,
    /// Allowed requests per key, by index (see [`UsageView`]).
    requests: Box<[AtomicU64]>,
    /// Unix second of each key's last allowed request (0: none), by index.
    /// Thirty-two bits last until 2106.
    last_used: Box<[AtomicU32]>,
    /// Set once [`RingHandle::retire`] has folded this ring's counts into
    /// another.
    folded: std::sync::atomic::AtomicBool,
    /// Denial counters and rate-limit budgets, linked on first need; pages
    /// are allocated on first need too.
    usage: Box<[OnceLock<Box<UsagePage>>]>,
    registry: UsageRegistry,
    routes: Box<[Route]>,
    generation: u64,
    loaded_at: Timestamp,
    file_digest: FileDigest,
    /// Process-unique id, for the per-thread lookup memo.
    uid: u64,
    /// How many of the registry's listed ids the build linked (see
    /// [`KeyRing::link_counters`]).
    fresh_linked: std::sync::atomic::AtomicUsize,
    /// How many pages of `usage` a build has read, linking their counters
    /// into a new ring; counters first needed in a page read already list
    /// their id in the registry (see `KeyRef::first_use`).
    pages_read: std::sync::atomic::AtomicU32,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Digests of secrets are not secrets, but keep them out of debug dumps anyway.
        f.debug_struct("KeyRing")
            .field("keys", &self.slots.len())
            .field("routes", &self.routes)
            .field("generation", &self.generation)
            .field("file_digest", &self.file_digest.get().map(hex::encode))
            .finish_non_exhaustive()
    }
}

/// A route rule: the scopes required for requests under a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Path prefix.
    pub prefix: Box<str>,
    /// Methods matched (empty: all).
    pub methods: Box<[Box<str>]>,
    /// Required scopes joined by spaces (the form `has_scopes` takes).
    pub scopes: Box<str>,
}

const EMPTY: u32 = u32::MAX;
/// An empty cell of the digest table.
const EMPTY_CELL: u32 = 0;

/// Bits of a digest-table cell that hold an entry index (plus one) for `n`
/// entries; the others hold a tag.
fn index_bits(n: usize) -> u32 {
    // n < u32::MAX (checked by the caller), so n itself fits.
    u32::BITS - (n as u32).leading_zeros()
}

/// The tag bits of a digest-table cell for `digest` (the bits above
/// `index_bits`).
#[inline]
fn cell_tag(digest: &DigestPrefix, index_bits: u32) -> u32 {
    above_index(digest_tag(digest), index_bits)
}

/// As many low bits of `tag` as fit above `index_bits`, moved up there.
#[inline]
fn above_index(tag: u32, index_bits: u32) -> u32 {
    // A shift of a u64 by at most 32, truncated.
    (u64::from(tag) << index_bits) as u32
}

/// The mask of the index bits of a digest-table cell.
#[inline]
fn index_mask(index_bits: u32) -> u32 {
    ((1u64 << index_bits) - 1) as u32
}

/// Cells for `n` entries: a load of at most 0.8.
fn table_len(n: usize) -> usize {
    if n == 0 { 0 } else { n + n / 4 + 1 }
}

/// Maps a uniformly distributed `hash` onto `0..len` (multiply-shift; the
/// table need not be a power of two).
#[inline]
fn home(hash: u64, len: usize) -> usize {
    ((u128::from(hash) * len as u128) >> 64) as usize
}

#[inline]
fn digest_hash(d: &DigestPrefix) -> u64 {
    // SHA-256 output is already uniformly distributed, so hashing it again is
    // wasted work. Flooding is not a concern: an attacker chooses only the
    // digests that are *looked up*, never the ones stored, so crafted digests
    // cannot lengthen the probe sequences of the table.
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_le_bytes(first)
}

#[inline]
fn digest_tag(d: &DigestPrefix) -> u32 {
    let mut t = [0u8; 4];
    t.copy_from_slice(&d[8..12]);
    u32::from_le_bytes(t)
}

/// Unix seconds as stored inline, when `t` is a whole second in `1..=u32::MAX`.
fn inline_secs(t: Timestamp) -> Option<u32> {
    if t.subsec_nanosecond() != 0 {
        return None;
    }
    u32::try_from(t.as_second()).ok().filter(|&s| s != 0)
}

impl KeyRing {
    /// Builds a ring from a validated file.
    ///
    /// `previous` (the ring being replaced, if any) carries over the time a key
    /// was first seen deprecated when the file does not say. Counters that
    /// `usage` already holds are linked now; the others on first need.
    ///
    /// # Panics
    ///
    /// With more than four billion keys, or ids longer than four GiB together.
    pub fn build(
        file: &(impl KeySource + ?Sized),
        source: RingSource,
        usage: &UsageRegistry,
        previous: Option<&KeyRing>,
    ) -> KeyRing {
        KeyRing::build_with_digest(
            file,
            source.generation,
            source.loaded_at,
            FileDigest::known(source.sha256),
            usage,
            previous,
            Threads::all(),
        )
    }

    /// [`KeyRing::build`] for a ring whose file digest may still be being
    /// computed: `file_digest` is shared with whoever fills it in. A large
    /// ring's id index is built on a second thread if `threads` allows.
    ///
    /// # Panics
    ///
    /// With more than 2^24 distinct pairs of client and scopes (a file
    /// within [`crate::keyfile::MAX_KEYS`] has fewer), or ids (or
    /// descriptions, or client names) longer than four GiB together.
    pub fn build_with_digest(
        file: &(impl KeySource + ?Sized),
        generation: u64,
        loaded_at: Timestamp,
        file_digest: FileDigest,
        usage: &UsageRegistry,
        previous: Option<&KeyRing>,
        threads: Threads,
    ) -> KeyRing {
        let n = file.key_count();
        assert!(
            u32::try_from(n).is_ok_and(|n| n < EMPTY),
            "more than 4 billion keys"
        );
        // Exactly this much, so that the string is never grown or shrunk:
        // ids that start with their client's name are stored without it.
        let id_bytes: usize = (0..n)
            .map(|i| {
                crate::priority::pace();
                let id = file.key_id(i);
                id_after_client(id, file.key_client(i)).unwrap_or(id).len()
            })
            .sum();
        assert!(
            u32::try_from(id_bytes).is_ok(),
            "ids longer than 4 GiB together"
        );

        let digest_index_bits = index_bits(n);
        let id_hasher = ahash::RandomState::new();
        let mut ids = String::with_capacity(id_bytes);
        let mut slots = Vec::with_capacity(n);
        let mut client_index: ahash::AHashMap<&str, u32> = ahash::AHashMap::new();
        let mut last_client: Option<(&str, u32)> = None;
        let mut clients = String::new();
        let mut client_starts: Vec<u32> = Vec::new();
        let mut scope_index: ahash::AHashMap<&[String], u32> = ahash::AHashMap::new();
        // The ring's scope set for each of the source's numbered sets.
        let mut numbered_scopes: Vec<u32> = Vec::new();
        let mut last_scopes: Option<(&[String], u32)> = None;
        let mut scope_sets: Vec<ScopeSet> = Vec::new();
        let mut profile_index: ahash::AHashMap<Profile, u32> = ahash::AHashMap::new();
        let mut profiles: Vec<Profile> = Vec::new();
        let mut not_before = SparseBuilder::new();
        let mut expires_exact = SparseBuilder::new();
        let mut rate_limit = SparseBuilder::new();
        let mut deprecated_at = SparseBuilder::new();
        let mut deprecation_index: ahash::AHashMap<Timestamp, u32> = ahash::AHashMap::new();
        let mut deprecation_times: Vec<Timestamp> = Vec::new();
        let mut description = SparseBuilder::new();
        let mut description_index: ahash::AHashMap<&str, u32> = ahash::AHashMap::new();
        let mut description_starts: Vec<u32> = Vec::new();
        let mut descriptions = String::new();
        let mut last_profile: Option<(Profile, u32)> = None;
        // The id index needs only the file: a large ring builds it on a
        // second thread (which inherits this one's priority) while this one
        // lays out the keys and builds the digest index.
        let (by_digest, by_id) = std::thread::scope(|s| {
            let id_job = (n >= PARALLEL_INDEX_MIN && threads.two()).then(|| {
                std::thread::Builder::new()
                    .name("keyward-index".into())
                    .spawn_scoped(s, || id_table(file, &id_hasher, digest_index_bits))
            });

            for i in 0..n {
                crate::priority::pace();
                let spec = file.key(i);
                // Both bounds checked above.
                let index = i as u32;
                let id_start = ids.len() as u32;
                let mut flags = 0;
                // Most ids begin with their client's name (`keyward keys new`
                // makes them so); the client is stored once, not once per key.
                match id_after_client(spec.id, spec.client) {
                    Some(rest) => {
                        flags |= F_ID_AFTER_CLIENT;
                        ids.push_str(rest);
                    }
                    None => ids.push_str(spec.id),
                }
                // A client's keys mostly follow one another.
                let client = match last_client {
                    Some((name, client)) if name == spec.client => client,
                    _ => {
                        let client = *client_index.entry(spec.client).or_insert_with(|| {
                            // Checked after the loop, like the descriptions.
                            client_starts.push(clients.len() as u32);
                            clients.push_str(spec.client);
                            (client_starts.len() - 1) as u32
                        });
                        last_client = Some((spec.client, client));
                        client
                    }
                };
                let scopes = match spec.scope_set {
                    // Numbered sets are interned once per number.
                    Some(number) => {
                        let number = number as usize;
                        if number >= numbered_scopes.len() {
                            numbered_scopes.resize(number + 1, EMPTY);
                        }
                        if numbered_scopes[number] == EMPTY {
                            numbered_scopes[number] =
                                intern_scopes(&mut scope_index, &mut scope_sets, spec.scopes);
                        }
                        numbered_scopes[number]
                    }
                    None => match last_scopes {
                        Some((list, scopes)) if list == spec.scopes => scopes,
                        _ => {
                            let scopes =
                                intern_scopes(&mut scope_index, &mut scope_sets, spec.scopes);
                            last_scopes = Some((spec.scopes, scopes));
                            scopes
                        }
                    },
                };
                let pair = Profile { client, scopes };
                let profile = match last_profile {
                    Some((last, profile)) if last == pair => profile,
                    _ => {
                        // At most one profile per key, so the count fits like the keys'.
                        let profile = *profile_index.entry(pair).or_insert_with(|| {
                            profiles.push(pair);
                            (profiles.len() - 1) as u32
                        });
                        assert!(
                            profiles.len() <= MAX_PROFILES,
                            "more than 2^24 distinct pairs of client and scopes"
                        );
                        last_profile = Some((pair, profile));
                        profile
                    }
                };
                let expires_at = match spec.expires_at {
                    None => 0,
                    Some(t) => inline_secs(t).unwrap_or_else(|| {
                        flags |= F_EXPIRES_EXACT;
                        expires_exact.push(index, t);
                        0
                    }),
                };
                if let Some(nb) = spec.not_before {
                    flags |= F_NOT_BEFORE;
                    not_before.push(index, nb);
                }
                if let Some(limit) = spec.rate_limit {
                    flags |= F_RATE_LIMIT;
                    rate_limit.push(index, limit);
                }
                if let Some(d) = spec.description {
                    flags |= F_DESCRIPTION;
                    let distinct = *description_index.entry(d).or_insert_with(|| {
                        // Checked after the loop, like the ids.
                        description_starts.push(descriptions.len() as u32);
                        descriptions.push_str(d);
                        // At most one per key, so fewer than 2^32.
                        (description_starts.len() - 1) as u32
                    });
                    description.push(index, distinct);
                }
                if let Some(at) = deprecation_time(&spec, previous, loaded_at) {
                    flags |= F_DEPRECATED_AT;
                    let distinct = *deprecation_index.entry(at).or_insert_with(|| {
                        deprecation_times.push(at);
                        (deprecation_times.len() - 1) as u32
                    });
                    deprecated_at.push(index, distinct);
                }
                slots.push(Slot {
                    digest: spec.digest_prefix,
                    id_start,
                    expires_at,
                    meta: profile << PROFILE_SHIFT
                        | u32::from(state_code(spec.state)) << FLAG_BITS
                        | u32::from(flags),
                });
            }
            drop((client_index, scope_index, profile_index, numbered_scopes));
            drop((description_index, deprecation_index));
            assert!(
                u32::try_from(descriptions.len()).is_ok() && u32::try_from(clients.len()).is_ok(),
                "descriptions or client names longer than 4 GiB together"
            );

            let by_digest = digest_table(&slots, digest_index_bits);
            let by_id = match id_job {
                Some(Ok(t)) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                _ => id_table(file, &id_hasher, digest_index_bits),
            };
            (by_digest, by_id)
        });

        // Longest prefix first, so the most specific rule wins; file order
        // breaks ties (the sort is stable).
        let mut routes: Vec<Route> = file
            .route_specs()
            .iter()
            .map(|r| Route {
                prefix: normalized_path(&r.path_prefix).into(),
                methods: r.methods.iter().map(|m| m.as_str().into()).collect(),
                scopes: r.required_scopes.join(" ").into_boxed_str(),
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));

        let mut ring = KeyRing {
            slots: slots.into_boxed_slice(),
            ids: ids.into_boxed_str(),
            clients: clients.into_boxed_str(),
            client_starts: client_starts.into_boxed_slice(),
            scope_sets: scope_sets.into_boxed_slice(),
            profiles: profiles.into_boxed_slice(),
            rare: Rare {
                not_before: not_before.finish(),
                expires_at: expires_exact.finish(),
                rate_limit: rate_limit.finish(),
                deprecated_at: deprecated_at.finish(),
                deprecation_times: deprecation_times.into_boxed_slice(),
                description: description.finish(),
                description_starts: description_starts.into_boxed_slice(),
                descriptions: descriptions.into_boxed_str(),
            },
            by_digest,
            digest_index_bits,
            by_id,
            id_hasher,
            requests: faulted_in(zeroed(n)),
            last_used: faulted_in(zeroed(n)),
            folded: std::sync::atomic::AtomicBool::new(false),
            usage: (0..n.div_ceil(USAGE_PAGE))
                .map(|_| OnceLock::new())
                .collect(),
            registry: usage.clone(),
            routes: routes.into_boxed_slice(),
            generation,
            loaded_at,
            file_digest,
            uid: crate::verified::next_ring_id(),
            fresh_linked: std::sync::atomic::AtomicUsize::new(0),
            pages_read: std::sync::atomic::AtomicU32::new(0),
        };
        ring.fresh_linked = ring.link_counters(usage, previous).into();
        ring
    }

    /// Links the denial counters and budgets of keys that needed them under
    /// earlier rings into this one.
    ///
    /// From `previous`, when it shares `usage`: its linked counters, in file
    /// order, each to the key with its id here ([`KeyRing::follow`]). Reading the two
    /// rings in order, the pass costs a million-key ring with every key in
    /// use a fraction of what a lookup by id per key costs; see BENCHMARKS.
    /// Then the counters the registry lists (those a build may not find in
    /// a ring's pages; see `Registry::fresh`), by id. Without `previous`,
    /// one pass over the whole registry.
    ///
    /// Returns how many listed ids the ring has seen to, for
    /// [`UsageRegistry::published`] to unlist.
    fn link_counters(&self, usage: &UsageRegistry, previous: Option<&KeyRing>) -> usize {
        let Some(previous) = previous.filter(|p| p.registry.same(usage)) else {
            // Everything listed now is in the registry for the pass to find.
            let listed = usage.listed().len();
            // No yield point here: the iterator holds a shard of the
            // registry locked.
            for item in usage.inner.by_id.iter() {
                if let Some(key) = self.by_id(item.key()) {
                    key.link(Arc::clone(item.value()));
                }
            }
            return listed;
        };
        // Where the last key found here sits, less where it sat before.
        let mut shift = 0i64;
        for (page_no, page) in previous.usage.iter().enumerate() {
            // Counters first needed in this page from now on are listed. Paired with
            // the fence in `KeyRef::first_use`: either that check sees this
            // count, or the read below sees its counters.
            previous.pages_read.fetch_max(
                u32::try_from(page_no + 1).unwrap_or(u32::MAX),
                Ordering::Relaxed,
            );
            std::sync::atomic::fence(Ordering::SeqCst);
            let Some(page) = page.get() else { continue };
            for (offset, counters) in page.iter().enumerate() {
                crate::priority::pace();
                let Some(counters) = counters.get() else {
                    continue;
                };
                let old = u32::try_from(page_no * USAGE_PAGE + offset)
                    .ok()
                    .and_then(|i| previous.key(i));
                if let Some(key) = old.and_then(|old| self.follow(old, &mut shift)) {
                    key.link(Arc::clone(counters));
                }
            }
        }
        let fresh = usage.fresh();
        for id in &fresh {
            crate::priority::pace();
            if let Some(key) = self.by_id(id)
                && let Some(counters) = usage.inner.by_id.get(id)
            {
                key.link(Arc::clone(counters.value()));
            }
        }
        fresh.len()
    }

    /// The key of this ring with the id of `old`, a key of an earlier ring,
    /// for passes over the earlier ring in file order. Keys mostly keep their
    /// places, or move by as much as their neighbours (a block of keys added
    /// or removed above them), so it is looked for where the last key
    /// followed moved to (`shift`, updated), and by id only when that guess
    /// misses.
    fn follow(&self, old: KeyRef<'_>, shift: &mut i64) -> Option<KeyRef<'_>> {
        let id = old.id();
        let guess = u32::try_from(i64::from(old.index) + *shift)
            .ok()
            .and_then(|i| self.key(i))
            .filter(|key| key.id() == id);
        let key = guess.or_else(|| id.with_str(|id| self.by_id(id)))?;
        *shift = i64::from(key.index) - i64::from(old.index);
        Some(key)
    }

    /// Adds the allowed requests counted in `from`, a ring this one replaced,
    /// to the same keys here, and takes their later last uses. Keys this ring
    /// does not hold lose theirs, as their other counters are dropped.
    fn fold_counts(&self, from: &KeyRing) {
        let mut shift = 0i64;
        for (i, (requests, last)) in from.requests.iter().zip(&from.last_used).enumerate() {
            let (requests, last) = (
                requests.load(Ordering::Relaxed),
                last.load(Ordering::Relaxed),
            );
            if requests == 0 && last == 0 {
                continue;
            }
            crate::priority::pace();
            let old = u32::try_from(i).ok().and_then(|i| from.key(i));
            if let Some(key) = old.and_then(|old| self.follow(old, &mut shift)) {
                let i = key.index as usize;
                self.requests[i].fetch_add(requests, Ordering::Relaxed);
                self.last_used[i].fetch_max(last, Ordering::Relaxed);
            }
        }
    }

    /// [`KeyRing::build_with_digest`] from a file as the parser gives it.
    pub fn build_parsed(
        file: &Parsed<'_>,
        generation: u64,
        loaded_at: Timestamp,
        file_digest: FileDigest,
        usage: &UsageRegistry,
        previous: Option<&KeyRing>,
        threads: Threads,
    ) -> KeyRing {
        // One build for each kind of source, each compiled for it.
        macro_rules! build {
            ($source:expr) => {
                KeyRing::build_with_digest(
                    $source,
                    generation,
                    loaded_at,
                    file_digest,
                    usage,
                    previous,
                    threads,
                )
            };
        }
        match file {
            Parsed::Fast(f) => build!(f),
            Parsed::Full(f) => build!(f),
        }
    }

    /// The scopes the route rules require for `method` and `path` (the query
    /// string is ignored), or `None` when no rule matches. A path is matched
    /// both as it is and as an upstream that normalises it would route it
    /// ([`normalized_path`]), and needs the scopes of both: `//trade`,
    /// `/%74rade` and `/x/../trade` need what `/trade` needs, and
    /// normalising can only add to what a path needs, whatever an upstream
    /// does. A path not starting with `/` (`*` of `OPTIONS *`) is matched
    /// as `/`.
    #[inline]
    pub fn route_scopes(&self, method: &str, path: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        if self.routes.is_empty() {
            return None;
        }
        let raw = path.split(['?', '#']).next().unwrap_or(path);
        let raw = if raw.starts_with('/') { raw } else { "/" };
        let normal = normalized_path(raw);
        let as_is = self.route_for(method, raw);
        if *normal == *raw {
            return as_is.map(Cow::Borrowed);
        }
        match (as_is, self.route_for(method, &normal)) {
            (Some(a), Some(b)) if a == b || b.is_empty() => Some(Cow::Borrowed(a)),
            (Some(""), Some(b)) => Some(Cow::Borrowed(b)),
            (Some(a), Some(b)) => Some(Cow::Owned(format!("{a} {b}"))),
            (a, b) => a.or(b).map(Cow::Borrowed),
        }
    }

    /// The scopes of the most specific rule matching `method` and `path`.
    /// A rule for GET also covers HEAD: a HEAD request is a GET without the
    /// body (RFC 9110, 9.3.2), and upstreams answer it with their GET
    /// handlers. A rule of the same prefix that lists HEAD itself still
    /// comes first.
    fn route_for(&self, method: &str, path: &str) -> Option<&str> {
        let lists = |r: &Route, m: &str| r.methods.iter().any(|l| **l == *m);
        for r in self.routes.iter().filter(|r| path.starts_with(&*r.prefix)) {
            if r.methods.is_empty() || lists(r, method) {
                return Some(&r.scopes);
            }
            if method == "HEAD" && lists(r, "GET") {
                let own = self
                    .routes
                    .iter()
                    .find(|o| o.prefix == r.prefix && lists(o, "HEAD"));
                return Some(&own.unwrap_or(r).scopes);
            }
        }
        None
    }

    /// The route rules, most specific first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// An empty ring (used before the first load in tests).
    pub fn empty(source: RingSource) -> KeyRing {
        KeyRing::build(&KeyFile::default(), source, &UsageRegistry::default(), None)
    }

    #[inline]
    fn key(&self, index: u32) -> Option<KeyRef<'_>> {
        ((index as usize) < self.slots.len()).then_some(KeyRef { ring: self, index })
    }

    #[inline]
    fn index_of(&self, digest: &Digest) -> u32 {
        let digest = &digest_prefix(digest);
        let bits = self.digest_index_bits;
        probe(
            &self.by_digest,
            home(digest_hash(digest), self.by_digest.len()),
            cell_tag(digest, bits),
            bits,
            |index| {
                self.slots
                    .get(index as usize)
                    .is_some_and(|slot| slot.digest == *digest)
            },
        )
    }

    /// The key at `index` (file order).
    pub fn key_at(&self, index: u32) -> Option<KeyRef<'_>> {
        self.key(index)
    }

    /// The key whose secret hashes to `digest`.
    #[inline]
    pub fn lookup(&self, digest: &Digest) -> Option<KeyRef<'_>> {
        self.key(self.index_of(digest))
    }

    /// What `secret` finds: SHA-256 and [`KeyRing::lookup`] the first time
    /// this thread sees it in this ring, a keyed tag and one slot of the
    /// thread's memo after that (see [`crate::verified`]). While the memo
    /// answers too few of the thread's lookups to pay, most lookups skip
    /// it and go straight to SHA-256.
    ///
    /// A secret not in the memo must first be [`crate::secret::plausible`]:
    /// one that claims keyward's format and fails its checksum is
    /// [`Found::Unknown`] (no key can have it), with no digest work and no
    /// memo slot taken.
    /// Only plausible secrets enter the memo, so a repeat skips the check.
    #[inline]
    pub fn find(&self, secret: &[u8]) -> Found<'_> {
        let index = if crate::verified::consult() {
            let tag = crate::verified::tag(secret);
            match crate::verified::get(tag, self.uid) {
                Some(index) => index,
                None => {
                    let Some(index) = self.digest_lookup(secret) else {
                        return Found::Unknown;
                    };
                    crate::verified::put(tag, self.uid, index);
                    index
                }
            }
        } else {
            match self.digest_lookup(secret) {
                Some(index) => index,
                None => return Found::Unknown,
            }
        };
        self.key(index).map_or(Found::Unknown, Found::Key)
    }

    /// The index of the key `secret`'s SHA-256 finds ([`EMPTY`] for none),
    /// or `None` for a secret no key can have.
    #[inline(always)]
    fn digest_lookup(&self, secret: &[u8]) -> Option<u32> {
        if !crate::secret::plausible(secret) {
            return None;
        }
        Some(self.index_of(&crate::decide::digest_bytes(secret)))
    }

    /// The key with id `id`.
    pub fn by_id(&self, id: &str) -> Option<KeyRef<'_>> {
        let hash = self.id_hasher.hash_one(id);
        let bits = self.digest_index_bits;
        let index = probe(
            &self.by_id,
            home(hash, self.by_id.len()),
            id_tag(hash, bits),
            bits,
            |index| self.key(index).is_some_and(|key| key.id() == *id),
        );
        self.key(index)
    }

    /// All keys, in file order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = KeyRef<'_>> + '_ {
        (0..self.slots.len() as u32).map(move |index| KeyRef { ring: self, index })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Publication number (1 for the first ring of the process; 0 for an
    /// empty placeholder).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When the ring was built.
    pub fn loaded_at(&self) -> Timestamp {
        self.loaded_at
    }

    /// SHA-256 of the file the ring was built from, or `None` while it is
    /// still being computed (large files are hashed after the ring is
    /// published; see [`FileDigest`]).
    pub fn file_sha256(&self) -> Option<Digest> {
        self.file_digest.get()
    }

    /// The cell holding the file digest.
    pub fn file_digest(&self) -> &FileDigest {
        &self.file_digest
    }
}

/// Rings of at least this many keys build their two indexes in parallel.
const PARALLEL_INDEX_MIN: usize = 1 << 16;

/// How many keys ahead the table builds fetch the cells they will fill.
const FETCH_AHEAD: usize = 16;

/// Fills a linear-probing table with `n` entries: entry `i`, whose home and
/// cell are `entry(i)`, goes at the first free cell from its home. A large table is far
/// bigger than the caches and the homes are random, so the cell of the
/// entry [`FETCH_AHEAD`] places ahead is fetched while this one is placed:
/// the misses overlap instead of following one another.
fn fill_table(table: &mut [u32], empty: u32, n: usize, entry: impl Fn(usize) -> (usize, u32)) {
    let mut pending = [(0usize, 0u32); FETCH_AHEAD];
    for i in 0..n + FETCH_AHEAD {
        crate::priority::pace();
        // Entry i - FETCH_AHEAD's home and cell sit where entry i's go next.
        let slot = i % FETCH_AHEAD;
        if i >= FETCH_AHEAD {
            let (mut at, cell) = pending[slot];
            while table[at] != empty {
                at = if at + 1 == table.len() { 0 } else { at + 1 };
            }
            table[at] = cell;
        }
        if i < n {
            let (home, cell) = entry(i);
            prefetch(&table[home]);
            pending[slot] = (home, cell);
        }
    }
}

/// Looks up a table filled by [`fill_table`] whose cells hold an index plus
/// one in their low `index_bits` bits (0: empty) and a tag above them:
/// probes from `home` for the first cell with `tag` whose index `is` the
/// one sought. [`EMPTY`] when none is, or the table is empty.
#[inline(always)]
fn probe(table: &[u32], home: usize, tag: u32, index_bits: u32, is: impl Fn(u32) -> bool) -> u32 {
    if table.is_empty() {
        return EMPTY;
    }
    let mask = index_mask(index_bits);
    let mut at = home;
    loop {
        let cell = table[at];
        if cell == EMPTY_CELL {
            return EMPTY;
        }
        if cell & !mask == tag {
            let index = (cell & mask).wrapping_sub(1);
            if is(index) {
                return index;
            }
        }
        at = if at + 1 == table.len() { 0 } else { at + 1 };
    }
}

/// Asks the CPU to bring the cache line holding `value` closer.
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint to the cache: it changes no memory,
    // cannot fault, and the address comes from a live reference.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// The digest table for `slots` (see `KeyRing::by_digest`).
fn digest_table(slots: &[Slot], index_bits: u32) -> Box<[u32]> {
    let mut table = vec![EMPTY_CELL; table_len(slots.len())].into_boxed_slice();
    let len = table.len();
    fill_table(&mut table, EMPTY_CELL, slots.len(), |i| {
        let digest = &slots[i].digest;
        // i + 1 <= n < 2^index_bits.
        let cell = cell_tag(digest, index_bits) | (i as u32 + 1);
        (home(digest_hash(digest), len), cell)
    });
    table
}

/// The id table for the keys of `file` (see `KeyRing::by_id`).
fn id_table(
    file: &(impl KeySource + ?Sized),
    hasher: &ahash::RandomState,
    index_bits: u32,
) -> Box<[u32]> {
    let n = file.key_count();
    let mut table = vec![EMPTY_CELL; table_len(n)].into_boxed_slice();
    let len = table.len();
    fill_table(&mut table, EMPTY_CELL, n, |i| {
        let hash = hasher.hash_one(file.key_id(i));
        // i + 1 <= n < 2^index_bits.
        (home(hash, len), id_tag(hash, index_bits) | (i as u32 + 1))
    });
    table
}

/// The tag bits of an id-table cell for an id whose hash is `hash`: its low
/// bits, above `index_bits` (the table's slot comes from its high bits).
#[inline]
fn id_tag(hash: u64, index_bits: u32) -> u32 {
    above_index(hash as u32, index_bits)
}

/// The ring's number for the scope set `scopes`, added if new.
fn intern_scopes<'f>(
    index: &mut ahash::AHashMap<&'f [String], u32>,
    sets: &mut Vec<ScopeSet>,
    scopes: &'f [String],
) -> u32 {
    // At most one set per key, so the count fits like the keys'.
    *index.entry(scopes).or_insert_with(|| {
        sets.push(scope_set(scopes));
        (sets.len() - 1) as u32
    })
}

fn scope_set(scopes: &[String]) -> ScopeSet {
    let mut list: Vec<Box<str>> = Vec::with_capacity(scopes.len());
    for s in scopes {
        if !list.iter().any(|have| **have == **s) {
            list.push(s.as_str().into());
        }
    }
    let joined = list.join(" ").into_boxed_str();
    ScopeSet {
        list: list.into_boxed_slice(),
        joined,
    }
}

/// When the key was deprecated: from the file, else (for deprecated keys) when
/// this process first saw it deprecated.
fn deprecation_time(
    spec: &KeyView<'_>,
    previous: Option<&KeyRing>,
    loaded_at: Timestamp,
) -> Option<Timestamp> {
    if spec.state != KeyState::Deprecated {
        return spec.deprecated_at;
    }
    spec.deprecated_at.or_else(|| {
        let prev = previous
            .and_then(|p| p.by_id(spec.id))
            .filter(|k| k.state() == KeyState::Deprecated)
            .and_then(|k| k.deprecated_at());
        Some(prev.unwrap_or(loaded_at))
    })
}

/// Compares the keys two rings hold at the same positions, straight from
/// their slots: successive versions of a key file mostly hold the same keys
/// in the same order, and the audit diff of a reload (`reload::Diff`) asks
/// about every one of them. Building each id and field value instead costs
/// a few hundred milliseconds for a million keys.
///
/// Clients and profiles are numbered per ring; which numbers of the old ring
/// stand for the same client (or client and scope set) in the new one is
/// learnt as positions pair them up, so each matching pair's names are
/// compared once.
pub struct InPlace<'a> {
    old: &'a KeyRing,
    new: &'a KeyRing,
    /// For each client of `old`, the client of `new` known to have its
    /// name (`EMPTY`: none known yet).
    clients: Vec<u32>,
    /// For each profile of `old`, the profile of `new` known to have the
    /// same client name and scope set (`EMPTY`: none known yet).
    profiles: Vec<u32>,
}

impl<'a> InPlace<'a> {
    /// Compares `old` with `new`.
    pub fn new(old: &'a KeyRing, new: &'a KeyRing) -> InPlace<'a> {
        InPlace {
            old,
            new,
            clients: vec![EMPTY; old.client_starts.len()],
            profiles: vec![EMPTY; old.profiles.len()],
        }
    }

    fn same_client(&mut self, old: u32, new: u32) -> bool {
        let Some(known) = self.clients.get_mut(old as usize) else {
            return false;
        };
        if *known == new {
            return true;
        }
        let same = client_name(self.old, old) == client_name(self.new, new);
        if same {
            *known = new;
        }
        same
    }

    fn same_profile(&mut self, old: usize, new: usize) -> bool {
        if self.profiles.get(old) == Some(&(new as u32)) {
            return true;
        }
        let (Some(o), Some(n)) = (self.old.profiles.get(old), self.new.profiles.get(new)) else {
            return false;
        };
        fn scopes(ring: &KeyRing, i: u32) -> Option<&[Box<str>]> {
            ring.scope_sets.get(i as usize).map(|s| &*s.list)
        }
        let same = scopes(self.old, o.scopes) == scopes(self.new, n.scopes)
            && self.same_client(o.client, n.client);
        if same {
            self.profiles[old] = new as u32;
        }
        same
    }

    /// Whether both rings hold a key with the same id at `index`.
    pub fn same_id(&mut self, index: u32) -> bool {
        let (Some(o), Some(n)) = (self.old.key_at(index), self.new.key_at(index)) else {
            return false;
        };
        let after_client = o.has(F_ID_AFTER_CLIENT);
        if after_client != n.has(F_ID_AFTER_CLIENT) || o.id_tail() != n.id_tail() {
            return false;
        }
        !after_client || self.same_client(o.profile().client, n.profile().client)
    }

    /// Whether the keys at `index`, known to have the same id, also have the
    /// same client, scopes, state, secret, expiry, not-before time and rate
    /// limit. `false` only says that something may differ.
    pub fn same_fields(&mut self, index: u32) -> bool {
        let (Some(o), Some(n)) = (self.old.key_at(index), self.new.key_at(index)) else {
            return false;
        };
        let (so, sn) = (o.slot(), n.slot());
        // Flags that say where a field is kept must agree; then the inline
        // fields, and the rare ones they point to.
        const WHERE: u8 =
            F_NOT_BEFORE | F_EXPIRES_EXACT | F_RATE_LIMIT | F_DEPRECATED_AT | F_DESCRIPTION;
        so.digest == sn.digest
            && so.expires_at == sn.expires_at
            && so.state() == sn.state()
            && so.flags() & WHERE == sn.flags() & WHERE
            && (so.flags() & F_EXPIRES_EXACT == 0 || o.expires_at() == n.expires_at())
            && (so.flags() & F_NOT_BEFORE == 0 || o.not_before() == n.not_before())
            && (so.flags() & F_RATE_LIMIT == 0 || o.rate_limit() == n.rate_limit())
            && (so.flags() & F_DEPRECATED_AT == 0 || o.deprecated_at() == n.deprecated_at())
            && (so.flags() & F_DESCRIPTION == 0 || o.description() == n.description())
            && self.same_profile(so.profile(), sn.profile())
    }
}

/// The name of client `i` of `ring`.
fn client_name(ring: &KeyRing, i: u32) -> &str {
    let i = i as usize;
    let start = ring.client_starts.get(i).map_or(0, |&s| s as usize);
    let end = ring
        .client_starts
        .get(i + 1)
        .map_or(ring.clients.len(), |&next| next as usize);
    ring.clients.get(start..end).unwrap_or("")
}

/// A key's id, as the ring stores it: most ids start with their client's name
/// (`acme-20261127-3f9a0c`), and the ring keeps that name once per client
/// rather than once per key, so an id is the client's name (`head`, possibly
/// empty) followed by the rest (`tail`). Compares equal to the `&str` it
/// spells and displays as it.
#[derive(Clone, Copy)]
pub struct KeyId<'r> {
    head: &'r str,
    tail: &'r str,
}

/// Ids up to this long are joined on the stack by [`KeyId::with_str`]; valid
/// ids have at most 128 bytes.
const ID_STACK: usize = 256;

impl<'r> KeyId<'r> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether the id is empty (never, for a validated file).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id as one `&str`, written into `buf` (cleared first): no
    /// allocation once `buf` has grown, for loops over many keys.
    pub fn joined<'b>(&self, buf: &'b mut String) -> &'b str {
        buf.clear();
        buf.push_str(self.head);
        buf.push_str(self.tail);
        buf
    }

    /// Calls `f` with the id as one `&str`: joined in a stack buffer when it
    /// has two parts, so valid ids never allocate.
    #[inline]
    pub fn with_str<T>(&self, f: impl FnOnce(&str) -> T) -> T {
        if self.head.is_empty() {
            return f(self.tail);
        }
        let len = self.len();
        if len > ID_STACK {
            return f(&self.to_string());
        }
        let mut buf = [0u8; ID_STACK];
        buf[..self.head.len()].copy_from_slice(self.head.as_bytes());
        buf[self.head.len()..len].copy_from_slice(self.tail.as_bytes());
        // Two whole strings, one after the other, are UTF-8.
        match std::str::from_utf8(&buf[..len]) {
            Ok(id) => f(id),
            Err(_) => f(&self.to_string()),
        }
    }
}

impl PartialEq<str> for KeyId<'_> {
    fn eq(&self, other: &str) -> bool {
        let other = other.as_bytes();
        other.len() == self.len()
            && other.starts_with(self.head.as_bytes())
            && other[self.head.len()..] == *self.tail.as_bytes()
    }
}

impl PartialEq<&str> for KeyId<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq<String> for KeyId<'_> {
    fn eq(&self, other: &String) -> bool {
        *self == **other
    }
}

impl PartialEq for KeyId<'_> {
    fn eq(&self, other: &KeyId<'_>) -> bool {
        if self.head.len() == other.head.len() {
            // Then the tails are as long as each other too, if the ids are.
            return self.head == other.head && self.tail == other.tail;
        }
        fn bytes<'a>(id: &KeyId<'a>) -> impl Iterator<Item = u8> + 'a {
            id.head.bytes().chain(id.tail.bytes())
        }
        self.len() == other.len() && bytes(self).eq(bytes(other))
    }
}

impl fmt::Display for KeyId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` honours width, alignment and precision, as for a `str`.
        if self.head.is_empty() {
            return f.pad(self.tail);
        }
        self.with_str(|id| f.pad(id))
    }
}

impl fmt::Debug for KeyId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl serde::Serialize for KeyId<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One key of a ring.
#[derive(Clone, Copy)]
pub struct KeyRef<'r> {
    ring: &'r KeyRing,
    index: u32,
}

impl fmt::Debug for KeyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRef")
            .field("id", &self.id())
            .field("client", &self.client())
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl<'r> KeyRef<'r> {
    #[inline]
    fn slot(&self) -> &'r Slot {
        &self.ring.slots[self.index as usize]
    }

    #[inline]
    fn has(&self, flag: u8) -> bool {
        self.slot().flags() & flag != 0
    }

    #[inline]
    fn profile(&self) -> &'r Profile {
        &self.ring.profiles[self.slot().profile()]
    }

    /// Position in the ring (file order).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The process-unique id of the ring this key belongs to: with
    /// [`KeyRef::index`], it names this key in this ring, for caches that a
    /// new ring must invalidate.
    pub fn ring_uid(&self) -> u64 {
        self.ring.uid
    }

    /// Unique id.
    #[inline]
    pub fn id(&self) -> KeyId<'r> {
        let head = if self.has(F_ID_AFTER_CLIENT) {
            self.client()
        } else {
            ""
        };
        KeyId {
            head,
            tail: self.id_tail(),
        }
    }

    /// The part of the id the arena holds (all of it, or what follows the
    /// client's name; see [`F_ID_AFTER_CLIENT`]).
    #[inline]
    fn id_tail(&self) -> &'r str {
        let start = self.slot().id_start as usize;
        let end = self
            .ring
            .slots
            .get(self.index as usize + 1)
            .map_or(self.ring.ids.len(), |next| next.id_start as usize);
        // Ids are ASCII, so every offset is a character boundary.
        self.ring.ids.get(start..end).unwrap_or("")
    }

    /// The principal the key authenticates.
    #[inline]
    pub fn client(&self) -> &'r str {
        client_name(self.ring, self.profile().client)
    }

    /// The first 128 bits of the SHA-256 of the secret, all the ring keeps
    /// (see [`DigestPrefix`]); not secret itself, but never exposed by the
    /// admin API.
    pub fn digest_prefix(&self) -> &'r DigestPrefix {
        &self.slot().digest
    }

    /// Granted scopes (deduplicated, file order).
    pub fn scopes(&self) -> &'r [Box<str>] {
        &self.ring.scope_sets[self.profile().scopes as usize].list
    }

    /// Scopes joined by single spaces, as sent in `x-keyward-scopes`.
    #[inline]
    pub fn scopes_joined(&self) -> &'r str {
        &self.ring.scope_sets[self.profile().scopes as usize].joined
    }

    /// Lifecycle state.
    #[inline]
    pub fn state(&self) -> KeyState {
        STATES[self.slot().state()]
    }

    /// Not valid before this instant.
    pub fn not_before(&self) -> Option<Timestamp> {
        if !self.has(F_NOT_BEFORE) {
            return None;
        }
        self.ring.rare.not_before.get(self.index).copied()
    }

    /// Not valid at or after this instant.
    pub fn expires_at(&self) -> Option<Timestamp> {
        if self.has(F_EXPIRES_EXACT) {
            return self.ring.rare.expires_at.get(self.index).copied();
        }
        match self.slot().expires_at {
            0 => None,
            s => Timestamp::from_second(i64::from(s)).ok(),
        }
    }

    /// Whether the key has expired at `now` (`now >= expires_at`).
    #[inline]
    pub fn is_expired(&self, now: Timestamp) -> bool {
        let slot = self.slot();
        if slot.flags() & F_EXPIRES_EXACT != 0 {
            return self.expires_at().is_some_and(|exp| now >= exp);
        }
        // A whole-second expiry E: now >= E exactly when now's whole seconds
        // (rounded down) are >= E.
        slot.expires_at != 0 && now.as_second() >= i64::from(slot.expires_at)
    }

    /// Whether the key is not valid yet at `now` (`now < not_before`).
    #[inline]
    pub fn is_not_yet_valid(&self, now: Timestamp) -> bool {
        self.slot().flags() & F_NOT_BEFORE != 0 && self.not_before().is_some_and(|nb| now < nb)
    }

    /// When the key was deprecated: from the file, or when this process first
    /// saw it deprecated.
    pub fn deprecated_at(&self) -> Option<Timestamp> {
        if !self.has(F_DEPRECATED_AT) {
            return None;
        }
        let rare = &self.ring.rare;
        let distinct = *rare.deprecated_at.get(self.index)? as usize;
        rare.deprecation_times.get(distinct).copied()
    }

    /// Operator's description.
    pub fn description(&self) -> Option<&'r str> {
        if !self.has(F_DESCRIPTION) {
            return None;
        }
        let rare = &self.ring.rare;
        let distinct = *rare.description.get(self.index)? as usize;
        let start = *rare.description_starts.get(distinct)? as usize;
        let end = rare
            .description_starts
            .get(distinct + 1)
            .map_or(rare.descriptions.len(), |&next| next as usize);
        rare.descriptions.get(start..end)
    }

    /// Optional request budget.
    #[inline]
    pub fn rate_limit(&self) -> Option<RateLimitSpec> {
        if !self.has(F_RATE_LIMIT) {
            return None;
        }
        self.ring.rare.rate_limit.get(self.index).copied()
    }

    /// For a deprecated key, the Unix seconds of its deprecation
    /// (`Deprecation: @<seconds>`, RFC 9745) and its expiry (`Sunset`,
    /// RFC 8594, formatted with [`HttpDate`]).
    #[inline]
    pub fn deprecation(&self) -> Option<(i64, Option<Timestamp>)> {
        if self.state() != KeyState::Deprecated {
            return None;
        }
        let at = self.deprecated_at()?;
        Some((at.as_second(), self.expires_at()))
    }

    /// Whether the key grants every scope in `required` (space- or
    /// comma-separated). Allocation-free.
    #[inline]
    pub fn has_scopes(&self, required: &str) -> bool {
        let have = self.scopes();
        // Split as bytes: a `char` pattern decodes UTF-8 as it goes, for
        // separators that are ASCII.
        required
            .as_bytes()
            .split(|&b| b == b' ' || b == b',')
            .filter(|s| !s.is_empty())
            .all(|need| have.iter().any(|h| h.as_bytes() == need))
    }

    /// Records one allowed request at `now_secs` (Unix seconds), in this
    /// ring's counters: lock-free, no allocation, no pointer to follow.
    #[inline]
    pub fn record_use(&self, now_secs: u64) {
        let i = self.index as usize;
        if let (Some(requests), Some(last)) =
            (self.ring.requests.get(i), self.ring.last_used.get(i))
        {
            requests.fetch_add(1, Ordering::Relaxed);
            // A plain store, and only when the second changed: concurrent
            // users race only to write nearly the same second, and a hot
            // key's cache line is not dirtied by it on every request.
            let now = u32::try_from(now_secs).unwrap_or(u32::MAX);
            if last.load(Ordering::Relaxed) != now {
                last.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Allowed requests counted in this ring alone (see [`UsageView`] for
    /// the key's total).
    fn requests_here(&self) -> u64 {
        self.ring.requests[self.index as usize].load(Ordering::Relaxed)
    }

    /// The last use counted in this ring alone (0: none).
    fn last_used_here(&self) -> u32 {
        self.ring.last_used[self.index as usize].load(Ordering::Relaxed)
    }

    /// The key's denial counters and rate-limit budget, linked from the
    /// registry on their first need in this ring (which allocates, once per
    /// key and ring, and takes a registry shard lock); lock-free after that.
    #[inline]
    pub fn usage(&self) -> &'r KeyUsage {
        let i = self.index as usize;
        let page = self.ring.usage[i / USAGE_PAGE]
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        let cell = &page[i % USAGE_PAGE];
        match cell.get() {
            Some(usage) => usage,
            None => self.first_use(cell),
        }
    }

    /// Links the key's counters into `cell`, creating them if it was never
    /// used. New counters are linked here, where the next ring's build
    /// finds them by position, unless that build has read this page already
    /// or this ring is no longer the one served: then the registry lists the
    /// id for the builds to come.
    #[cold]
    fn first_use(&self, cell: &'r OnceLock<Arc<KeyUsage>>) -> &'r KeyUsage {
        let registry = &self.ring.registry;
        let (usage, created) = self.id().with_str(|id| registry.find_or_create(id));
        usage.sync_limit(self.rate_limit());
        let linked = cell.get_or_init(|| usage);
        if let Some(id) = created {
            // Paired with the fence in `KeyRing::link_counters`.
            std::sync::atomic::fence(Ordering::SeqCst);
            let page = self.index as usize / USAGE_PAGE;
            let read = self.ring.pages_read.load(Ordering::Relaxed) as usize;
            if read > page || !registry.is_latest(self.ring) {
                registry.list(id);
            }
        }
        linked
    }

    /// The key's denial counters and budget if they were ever needed (or
    /// linked when the ring was built); never allocates. For scrapes.
    pub fn usage_if_used(&self) -> Option<&'r KeyUsage> {
        let i = self.index as usize;
        let page = self.ring.usage[i / USAGE_PAGE].get()?;
        page[i % USAGE_PAGE].get().map(|u| &**u)
    }

    fn link(&self, usage: Arc<KeyUsage>) {
        usage.sync_limit(self.rate_limit());
        let i = self.index as usize;
        let page = self.ring.usage[i / USAGE_PAGE]
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        let _ = page[i % USAGE_PAGE].set(usage);
    }
}

/// Formats an instant as an HTTP-date (RFC 9110 IMF-fixdate), as `Sunset`
/// requires, without allocating.
#[derive(Debug, Clone, Copy)]
pub struct HttpDate(pub Timestamp);

impl fmt::Display for HttpDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use jiff::civil::Weekday;
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let dt = jiff::tz::Offset::UTC.to_datetime(self.0);
        let day = match dt.weekday() {
            Weekday::Monday => "Mon",
            Weekday::Tuesday => "Tue",
            Weekday::Wednesday => "Wed",
            Weekday::Thursday => "Thu",
            Weekday::Friday => "Fri",
            Weekday::Saturday => "Sat",
            Weekday::Sunday => "Sun",
        };
        let month = MONTHS
            .get(usize::try_from(dt.month() - 1).unwrap_or(0))
            .copied()
            .unwrap_or("Jan");
        write!(
            f,
            "{day}, {:02} {month} {:04} {:02}:{:02}:{:02} GMT",
            dt.day(),
            dt.year(),
            dt.hour(),
            dt.minute(),
            dt.second()
        )
    }
}

/// Formats an instant as an HTTP-date (RFC 9110 IMF-fixdate), as `Sunset` requires.
pub fn http_date(t: Timestamp) -> String {
    HttpDate(t).to_string()
}

/// Allocations at least this large get pages of their own from the OS
/// (see [`configure_allocator`]).
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Sets the allocator up for large rings that are replaced wholesale, so the
/// resident set returns to its steady state after a reload. Call it at
/// startup, before any thread.
///
/// Every allocation of at least [`MMAP_THRESHOLD`] (a ring's columns and
/// tables, the file's bytes, the parser's vectors) is mapped on its own and
/// unmapped when freed, instead of coming from a heap where it would be
/// fragmented by the small allocations made around it. glibc does this for
/// allocations of 128 KiB and up only until the first such block is freed,
/// after which it raises its threshold to the size freed (up to 32 MiB), so
/// without this a reload's columns land in the heap.
///
/// glibc's fastbins stay on. Turning them off (`M_MXFAST` 0) once kept a
/// million-key reload's small allocations from staying resident; today
/// `scripts/bench-1m.sh` finds the resident set back at its steady state
/// after a swap with them on. Off, they cost every check about 600
/// instructions in `malloc` and `free` (`scripts/bench-instructions.sh`):
/// a burst of streams outruns the per-thread cache, and the blocks it frees
/// then go through the slow path, merged with their neighbours.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` sets a glibc tunable; it takes the allocator's own
    // locks, has no preconditions on the caller, and on failure returns 0
    // and changes nothing, which leaves the default behaviour.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

/// Gives memory freed by the allocator back to the OS, so the resident set
/// falls back after a reload drops the previous ring and the parsed file.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages of glibc's heaps to the
    // kernel; it takes the allocator's own locks, moves no live allocation,
    // and has no preconditions on the caller.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Longest [`RingHandle::retire`] waits, by default, for checks to let go of
/// the ring it retires, so that the ring is freed on the retiring thread.
pub const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The publishing point: readers `load`, the reloader `publish`es.
///
/// Cloning shares the same slot.
#[derive(Debug, Clone)]
pub struct RingHandle {
    slot: Arc<ArcSwap<KeyRing>>,
    /// Rings this handle replaced whose counts are not yet folded into the
    /// served ring, oldest first: every allowed request is counted in
    /// exactly one of the served ring and these (see [`UsageView`]).
    replaced: Arc<Mutex<Vec<Arc<KeyRing>>>>,
}

impl RingHandle {
    /// A handle serving `ring`.
    pub fn new(ring: KeyRing) -> RingHandle {
        ring.registry.published(&ring);
        RingHandle {
            slot: Arc::new(ArcSwap::from_pointee(ring)),
            replaced: Arc::default(),
        }
    }

    /// The current ring. Hold the guard for one unit of work, never across `.await`.
    #[inline]
    pub fn load(&self) -> Guard<Arc<KeyRing>> {
        self.slot.load()
    }

    /// The current ring as an owned `Arc` (for cold paths).
    pub fn load_full(&self) -> Arc<KeyRing> {
        self.slot.load_full()
    }

    fn replaced(&self) -> MutexGuard<'_, Vec<Arc<KeyRing>>> {
        self.replaced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `ring` with one atomic store, then retires the ring it
    /// replaced ([`RingHandle::retire`], waiting at most [`RELEASE_WAIT`]:
    /// the whole wait if the caller still holds the replaced ring).
    pub fn publish(&self, ring: KeyRing) {
        let old = self.publish_shared(Arc::new(ring));
        self.retire(old, RELEASE_WAIT);
    }

    /// Replaces the ring with one atomic store and returns the ring it
    /// replaced. Its counts stay with this handle, and [`UsageView`]s add
    /// them in, until it is passed to [`RingHandle::retire`]; a ring that
    /// is not is folded by the next retirement after it is dropped.
    ///
    /// A retired ring must not be published again: its counts are in the
    /// ring it was folded into, and would be counted twice.
    pub fn publish_shared(&self, ring: Arc<KeyRing>) -> Arc<KeyRing> {
        let mut replaced = self.replaced();
        debug_assert!(
            !ring.folded.load(Ordering::Relaxed),
            "a retired ring published again"
        );
        ring.registry.published(&ring);
        // A ring published again is the served one, not a replaced one.
        replaced.retain(|r| !Arc::ptr_eq(r, &ring));
        let new = Arc::clone(&ring);
        let old = self.slot.swap(ring);
        if !Arc::ptr_eq(&old, &new) {
            replaced.push(Arc::clone(&old));
        }
        old
    }

    /// Folds the counts of `old`, a ring this handle replaced, into the
    /// served ring, and frees `old` on this thread.
    ///
    /// Checks that loaded `old` before it was replaced count into it for
    /// their last microseconds (and whoever drops the last reference frees
    /// it: tens of megabytes for a large ring, which must not fall to a
    /// serving thread), so this first waits, up to `wait`, until no one else
    /// holds it. A holder that keeps it longer (a long scrape) frees it: the
    /// ring is then returned as a weak reference, to tell when it is gone.
    /// A check still counting into it after `wait` would have its count
    /// lost; a check holds a ring for microseconds.
    ///
    /// Replaced rings held by nothing but this handle (their caller dropped
    /// them instead of retiring them) are folded too.
    pub fn retire(&self, old: Arc<KeyRing>, wait: Duration) -> Option<Weak<KeyRing>> {
        // Not listed: folded already, or served again; nothing to wait for.
        if self.replaced().iter().any(|r| Arc::ptr_eq(r, &old)) {
            let deadline = Instant::now() + wait;
            // Held by `old` here and by the list alone.
            while Arc::strong_count(&old) > 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let folded = {
            let mut replaced = self.replaced();
            // No publication while the list is locked: this is the served ring.
            let served = self.slot.load_full();
            let (folded, kept): (Vec<_>, Vec<_>) = replaced
                .drain(..)
                .partition(|r| Arc::ptr_eq(r, &old) || Arc::strong_count(r) == 1);
            *replaced = kept;
            // The checks that let go of these rings counted before they
            // dropped their references (a release); as `Arc::try_unwrap`
            // does, acquire those counts before reading them.
            std::sync::atomic::fence(Ordering::Acquire);
            for ring in &folded {
                served.fold_counts(ring);
                ring.folded.store(true, Ordering::Relaxed);
            }
            folded
        };
        // Freed after the list is unlocked: freeing a large ring takes a while.
        drop(folded);
        match Arc::try_unwrap(old) {
            Ok(last) => {
                drop(last);
                None
            }
            Err(held) => Some(Arc::downgrade(&held)),
        }
    }

    /// The served ring with its keys' usage counts, for scrapes.
    ///
    /// While a replaced ring is not yet folded into the served one, the view
    /// adds its counts in and keeps the handle's list locked (no publication
    /// and no fold until it is dropped: keep it for one scrape's reading, and
    /// never across `.await`). Otherwise it holds no lock.
    pub fn usage_view(&self) -> UsageView<'_> {
        let replaced = self.replaced();
        let ring = self.slot.load_full();
        UsageView {
            ring,
            replaced: (!replaced.is_empty()).then_some(replaced),
        }
    }
}

/// The served ring and its keys' allowed requests and last uses, as a
/// scrape reports them: the served ring's counts plus those of replaced
/// rings not yet folded into it. From [`RingHandle::usage_view`].
///
/// The counts never go down from one view to the next: a request is counted
/// in exactly one ring of the view, and a fold moves counts between rings
/// only while no view is open.
pub struct UsageView<'h> {
    ring: Arc<KeyRing>,
    replaced: Option<MutexGuard<'h, Vec<Arc<KeyRing>>>>,
}

impl fmt::Debug for UsageView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageView")
            .field("generation", &self.ring.generation)
            .field("replaced", &self.others().len())
            .finish()
    }
}

impl UsageView<'_> {
    /// The served ring.
    pub fn ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }

    fn others(&self) -> &[Arc<KeyRing>] {
        self.replaced.as_deref().map_or(&[], |r| r.as_slice())
    }

    /// The same key in each replaced ring not yet folded (`key`'s own ring
    /// left out).
    fn elsewhere<'a>(&'a self, key: KeyRef<'a>) -> impl Iterator<Item = KeyRef<'a>> + 'a {
        self.others()
            .iter()
            .filter(move |r| !std::ptr::eq(&***r, key.ring))
            .filter_map(move |r| key.id().with_str(|id| r.by_id(id)))
    }

    /// Allowed requests of `key` (a key of [`UsageView::ring`]) since this
    /// process first loaded it.
    pub fn requests(&self, key: KeyRef<'_>) -> u64 {
        debug_assert!(
            std::ptr::eq(key.ring, &*self.ring),
            "a key of the view's ring"
        );
        self.elsewhere(key)
            .map(|k| k.requests_here())
            .fold(key.requests_here(), u64::wrapping_add)
    }

    /// Unix second of `key`'s last allowed request, if it had one.
    pub fn last_used(&self, key: KeyRef<'_>) -> Option<u64> {
        debug_assert!(
            std::ptr::eq(key.ring, &*self.ring),
            "a key of the view's ring"
        );
        let last = self
            .elsewhere(key)
            .map(|k| k.last_used_here())
            .fold(key.last_used_here(), u32::max);
        (last > 0).then_some(u64::from(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::{KeySpec, ParseOptions, parse_str};
    use sha2::{Digest as _, Sha256};

    fn source(generation: u64) -> RingSource {
        RingSource {
            generation,
            sha256: [0; 32],
            loaded_at: "2026-11-27T12:00:00Z".parse().unwrap(),
        }
    }

    fn file(text: &str) -> KeyFile {
        parse_str(text, ParseOptions::default()).unwrap()
    }

    fn sha(s: &str) -> Digest {
        Sha256::digest(s.as_bytes()).into()
    }

    fn two_keys() -> String {
        format!(
            r#"[[keys]]
id = "a"
client = "acme"
sha256 = "{}"
scopes = ["read", "trade"]
[[keys]]
id = "b"
client = "acme"
sha256 = "{}"
state = "deprecated"
expires_at = 2027-02-27T00:00:00Z
"#,
            hex::encode(sha("secret-a")),
            hex::encode(sha("secret-b"))
        )
    }

    #[test]
    fn lookup_by_digest_and_id() {
        let reg = UsageRegistry::default();
        let ring = KeyRing::build(&file(&two_keys()), source(1), &reg, None);
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.lookup(&sha("secret-a")).unwrap().id(), "a");
        assert_eq!(ring.lookup(&sha("secret-b")).unwrap().id(), "b");
        assert!(ring.lookup(&sha("secret-c")).is_none());
        assert_eq!(ring.by_id("b").unwrap().client(), "acme");
        assert!(ring.by_id("c").is_none());
        // Clients are interned.
        let keys: Vec<_> = ring.keys().collect();
        assert!(std::ptr::eq(keys[0].client(), keys[1].client()));
        assert_eq!(keys[1].id(), "b");
    }

    #[test]
    fn ids_that_start_with_their_client_are_stored_without_it() {
        let key = |id: &str, client: &str| {
            format!(
                "[[keys]]\nid = \"{id}\"\nclient = \"{client}\"\nsha256 = \"{}\"\n",
                hex::encode(sha(id))
            )
        };
        // After the client, equal to it, not after it, and after a client
        // that merely shares a prefix with another.
        let cases = [
            ("acme-20261127-3f9a0c", "acme"),
            ("acme", "acme"),
            ("legacy-1", "acme"),
            ("acme2-x", "acme2"),
            ("ac", "acme"),
        ];
        let text: String = cases.iter().map(|(id, c)| key(id, c)).collect();
        let ring = KeyRing::build(&file(&text), source(1), &UsageRegistry::default(), None);
        // The arena holds what the client names do not.
        assert_eq!(&*ring.ids, "-20261127-3f9a0clegacy-1-xac");
        let mut buf = String::new();
        for (id, client) in cases {
            let k = ring.by_id(id).unwrap_or_else(|| panic!("{id} by id"));
            assert_eq!(k.client(), client);
            assert_eq!(k.id(), id);
            assert_eq!(k.id().len(), id.len());
            assert_eq!(k.id().to_string(), id);
            assert_eq!(format!("{:?}", k.id()), format!("{id:?}"));
            assert_eq!(format!("{:>30.6}|", k.id()), format!("{id:>30.6}|"));
            assert_eq!(k.id().joined(&mut buf), id);
            assert!(k.id().with_str(|s| s == id));
            assert_eq!(ring.lookup(&sha(id)).map(|k| k.index()), Some(k.index()));
            assert_eq!(serde_json::to_string(&k.id()).unwrap(), format!("\"{id}\""));
        }
        assert_ne!(ring.by_id("acme2-x").unwrap().id(), "acme-x");
        // The same id split differently (another client) is still the same id.
        let other = KeyRing::build(
            &file(&key("acme-20261127-3f9a0c", "zzz")),
            source(2),
            &UsageRegistry::default(),
            None,
        );
        let (a, b) = (cases[0].0, other.by_id(cases[0].0).unwrap().id());
        assert_eq!(ring.by_id(a).unwrap().id(), b);
        assert_ne!(ring.by_id("acme2-x").unwrap().id(), b);
        assert!(ring.by_id("acme-").is_none());
        assert!(ring.by_id("-20261127-3f9a0c").is_none());
    }

    #[test]
    fn a_slot_is_28_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 28);
    }

    #[test]
    fn scopes_match_space_or_comma_lists() {
        let reg = UsageRegistry::default();
        let ring = KeyRing::build(&file(&two_keys()), source(1), &reg, None);
        let a = ring.by_id("a").unwrap();
        assert_eq!(a.scopes_joined(), "read trade");
        assert_eq!(a.scopes().len(), 2);
        assert!(a.has_scopes(""));
        assert!(a.has_scopes("read"));
        assert!(a.has_scopes("read trade"));
        assert!(a.has_scopes(" trade,read ,"));
        assert!(!a.has_scopes("read admin"));
        assert!(!a.has_scopes("rea"));
    }

    #[test]
    fn deprecated_keys_carry_headers() {
        let reg = UsageRegistry::default();
        let ring = KeyRing::build(&file(&two_keys()), source(1), &reg, None);
        let b = ring.by_id("b").unwrap();
        // No deprecated_at in the file: the load time stands in.
        let (since, sunset) = b.deprecation().unwrap();
        assert_eq!(since, 1795780800);
        assert_eq!(http_date(sunset.unwrap()), "Sat, 27 Feb 2027 00:00:00 GMT");
        assert!(ring.by_id("a").unwrap().deprecation().is_none());

        // A later ring keeps the first-seen deprecation time.
        let mut later = source(2);
        later.loaded_at = "2026-12-01T00:00:00Z".parse().unwrap();
        let ring2 = KeyRing::build(&file(&two_keys()), later, &reg, Some(&ring));
        assert_eq!(
            ring2.by_id("b").unwrap().deprecation().map(|d| d.0),
            Some(1795780800)
        );
    }

    #[test]
    fn a_large_ring_finds_every_key_by_digest_and_by_id() {
        // Large enough for the indexes to be built in parallel.
        let n = PARALLEL_INDEX_MIN + 3;
        let keys = (0..n)
            .map(|i| KeySpec {
                id: format!("c{}-{i}", i % 7),
                client: format!("c{}", i % 7),
                digest: sha(&i.to_string()),
                ..KeySpec::blank(1)
            })
            .collect();
        let file = KeyFile {
            keys,
            routes: vec![],
        };
        let ring = KeyRing::build(&file, source(1), &UsageRegistry::default(), None);
        for (i, spec) in file.keys.iter().enumerate() {
            let k = ring.lookup(&spec.digest).expect("found by digest");
            assert_eq!(k.index() as usize, i);
            assert_eq!(k.id(), spec.id);
            assert_eq!(ring.by_id(&spec.id).map(|k| k.index()), Some(i as u32));
        }
        assert!(ring.lookup(&sha("absent")).is_none());
        assert!(ring.by_id("c0-absent").is_none());
        // Ids like the ones present, each probing past cells of other ids.
        assert!((n..n + 5000).all(|i| ring.by_id(&format!("c{}-{i}", i % 7)).is_none()));
        // Built on one thread, the indexes find the same keys (the id
        // table's layout depends on the ring's own hash seed).
        let inline = KeyRing::build_with_digest(
            &file,
            1,
            Timestamp::now(),
            FileDigest::known([0; 32]),
            &UsageRegistry::default(),
            None,
            Threads::new(1),
        );
        assert_eq!(inline.by_digest, ring.by_digest);
        for (i, spec) in file.keys.iter().enumerate() {
            assert_eq!(inline.by_id(&spec.id).map(|k| k.index()), Some(i as u32));
        }
        assert!(inline.by_id("c0-absent").is_none());
    }

    #[test]
    fn a_key_is_found_by_the_first_128_bits_of_its_digest() {
        let digest = sha("the secret");
        let ring = KeyRing::build(
            &KeyFile {
                keys: vec![KeySpec {
                    id: "a".into(),
                    client: "c".into(),
                    digest,
                    ..KeySpec::blank(1)
                }],
                routes: vec![],
            },
            source(1),
            &UsageRegistry::default(),
            None,
        );
        assert_eq!(
            ring.lookup(&digest).map(|k| k.id().to_string()),
            Some("a".into())
        );
        assert_eq!(
            ring.by_id("a").map(|k| *k.digest_prefix()),
            Some(digest_prefix(&digest))
        );
        // What the ring does not keep does not take part in the match...
        let mut tail = digest;
        tail[31] ^= 1;
        assert!(ring.lookup(&tail).is_some());
        // ...and every bit it keeps does: one past the hash and the tag bits,
        // and each of the others.
        for byte in 0..16 {
            let mut other = digest;
            other[byte] ^= 0x80;
            assert!(ring.lookup(&other).is_none(), "byte {byte}");
        }
    }

    #[test]
    fn usage_survives_rebuilds_and_is_pruned() {
        let reg = UsageRegistry::default();
        let ring = KeyRing::build(&file(&two_keys()), source(1), &reg, None);
        ring.by_id("a").unwrap().usage().denied[0].fetch_add(42, Ordering::Relaxed);
        assert_eq!(reg.len(), 1, "counters are created on first need");
        let ring2 = KeyRing::build(&file(&two_keys()), source(2), &reg, Some(&ring));
        let a2 = ring2.by_id("a").unwrap();
        let linked = a2.usage_if_used().expect("linked at build");
        assert_eq!(linked.denied[0].load(Ordering::Relaxed), 42);
        assert!(ring2.by_id("b").unwrap().usage_if_used().is_none());
        let _ = ring2.by_id("b").unwrap().usage();
        assert_eq!(reg.len(), 2);

        let only_a = two_keys()
            .split("[[keys]]")
            .nth(1)
            .map(|s| format!("[[keys]]{s}"))
            .unwrap();
        let ring3 = KeyRing::build(&file(&only_a), source(3), &reg, Some(&ring2));
        // Forgetting an id the ring still holds, or one with no counters,
        // changes nothing.
        reg.forget(["a", "nope"], &ring3);
        assert_eq!(reg.len(), 2);
        reg.forget(["b"], &ring3);
        assert_eq!(reg.len(), 1);
        assert!(ring3.by_id("a").unwrap().usage_if_used().is_some());
        // The same as a full pass over the registry (b's counters made
        // again, as by a check on a ring that still holds b).
        let _ = reg.usage("b");
        assert_eq!(reg.len(), 2);
        reg.retain_ring(&ring3);
        assert_eq!(reg.len(), 1);
    }

    fn keys_named(ids: &[String]) -> KeyFile {
        KeyFile {
            keys: ids
                .iter()
                .map(|id| KeySpec {
                    id: id.clone(),
                    client: format!("c{}", id.len() % 3),
                    digest: sha(id),
                    ..KeySpec::blank(1)
                })
                .collect(),
            routes: vec![],
        }
    }

    #[test]
    fn counters_follow_keys_that_move_and_ones_first_used_under_a_replaced_ring() {
        let reg = UsageRegistry::default();
        let ids: Vec<String> = (0..300).map(|i| format!("c{}-key-{i}", i % 3)).collect();
        let handle = RingHandle::new(KeyRing::build(&keys_named(&ids), source(1), &reg, None));
        let first = handle.load_full();
        let used = [0usize, 5, 63, 64, 70, 200, 299];
        for &i in &used {
            first.by_id(&ids[i]).unwrap().usage().denied[0]
                .fetch_add(i as u64 + 1, Ordering::Relaxed);
        }

        // Ten keys added on top, 70 moved to the end, 200 removed: most keys
        // move by ten, one far away, one goes.
        let mut moved: Vec<String> = (0..10).map(|i| format!("c0-new-{i}")).collect();
        moved.extend(
            ids.iter()
                .enumerate()
                .filter(|&(i, _)| i != 70 && i != 200)
                .map(|(_, id)| id.clone()),
        );
        moved.push(ids[70].clone());
        let second = KeyRing::build(&keys_named(&moved), source(2), &reg, Some(&first));
        for &i in &used {
            let linked = second.by_id(&ids[i]).map(|k| k.usage_if_used());
            if i == 200 {
                assert!(linked.is_none(), "removed");
                continue;
            }
            let linked = linked
                .flatten()
                .unwrap_or_else(|| panic!("{} linked", ids[i]));
            assert!(std::ptr::eq(linked, &*reg.usage(&ids[i])), "{}", ids[i]);
            assert_eq!(linked.denied[0].load(Ordering::Relaxed), i as u64 + 1);
        }
        // Linked by position or by id, exactly the keys a pass over the
        // registry links.
        let by_registry = KeyRing::build(&keys_named(&moved), source(2), &reg, None);
        let linked = |ring: &KeyRing| -> Vec<bool> {
            ring.keys().map(|k| k.usage_if_used().is_some()).collect()
        };
        assert_eq!(linked(&second), linked(&by_registry));

        // A check still holding the first ring gives a key its first use
        // after the second is published: the second ring never had those
        // counters, and the third must link them anyway.
        publish_now(&handle, second);
        first.by_id(&ids[6]).unwrap().usage().denied[0].fetch_add(77, Ordering::Relaxed);
        let second = handle.load_full();
        assert!(second.by_id(&ids[6]).unwrap().usage_if_used().is_none());
        // A ring built and never published leaves the listing as it was.
        drop(KeyRing::build(
            &keys_named(&moved),
            source(3),
            &reg,
            Some(&second),
        ));
        let third = KeyRing::build(&keys_named(&moved), source(3), &reg, Some(&second));
        let counters = third.by_id(&ids[6]).unwrap().usage_if_used();
        assert_eq!(
            counters.map(|c| c.denied[0].load(Ordering::Relaxed)),
            Some(77)
        );
        assert_eq!(
            linked(&third),
            linked(&KeyRing::build(&keys_named(&moved), source(3), &reg, None))
        );
        assert_eq!(reg.fresh().len(), 1);
        publish_now(&handle, third);
        assert!(reg.fresh().is_empty(), "published, so unlisted");
    }

    #[test]
    fn every_counter_made_before_a_build_is_linked_by_it_while_checks_race_reloads() {
        let reg = UsageRegistry::default();
        let names = |generation: usize| -> Vec<String> {
            // Each generation drops one block of keys and adds another at
            // a place that moves, so keys shift by varying amounts.
            let gone = generation % 50 * 40;
            let mut ids: Vec<String> = (0..2000)
                .filter(|i| !(gone..gone + 40).contains(i))
                .map(|i| format!("c{}-k{i}", i % 3))
                .collect();
            let at = generation * 37 % ids.len();
            ids.splice(at..at, (0..25).map(|j| format!("c1-g{generation}-{j}")));
            ids
        };
        let handle = RingHandle::new(KeyRing::build(
            &keys_named(&names(0)),
            source(0),
            &reg,
            None,
        ));
        let stop = std::sync::atomic::AtomicBool::new(false);
        let uses = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            checkers(s, &stop, |n| {
                // Hold a ring across several first uses, so some land on a
                // ring already replaced.
                let ring = handle.load_full();
                for _ in 0..8 {
                    *n = lcg(*n);
                    if let Some(key) = ring.key_at((*n >> 33) as u32 % ring.len() as u32) {
                        let _ = key.usage();
                        uses.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::yield_now();
                }
            });
            for generation in 1..150 {
                let current = handle.load_full();
                let file = keys_named(&names(generation));
                let next = KeyRing::build(&file, source(generation as u64), &reg, Some(&current));
                let old = handle.publish_shared(Arc::new(next));
                // As a reload does: the counters of keys it removed go.
                let next = handle.load_full();
                let removed: Vec<String> = current
                    .keys()
                    .map(|k| k.id().to_string())
                    .filter(|id| next.by_id(id).is_none())
                    .collect();
                drop(current);
                handle.retire(old, RELEASE_WAIT);
                reg.forget(removed.iter().map(String::as_str), &next);
                // Let the checkers use some keys of every generation, however
                // the scheduler shares the CPUs out (bounded: on a stalled
                // machine the count below says so).
                let want = uses.load(Ordering::Relaxed) + 60;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while uses.load(Ordering::Relaxed) < want && std::time::Instant::now() < deadline {
                    std::thread::yield_now();
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let current = handle.load_full();
        let last = KeyRing::build(&keys_named(&names(150)), source(150), &reg, Some(&current));
        let mut linked = 0;
        for key in last.keys() {
            let registered = key
                .id()
                .with_str(|id| reg.inner.by_id.get(id).map(|c| Arc::clone(c.value())));
            match (registered, key.usage_if_used()) {
                (Some(registered), Some(counters)) => {
                    assert!(std::ptr::eq(&*registered, counters), "{}", key.id());
                    linked += 1;
                }
                (None, None) => {}
                (registered, counters) => panic!(
                    "{}: registered {} but linked {}",
                    key.id(),
                    registered.is_some(),
                    counters.is_some()
                ),
            }
        }
        assert!(linked > 500, "only {linked} keys used");
    }

    /// Publishes `ring` and retires the ring it replaces without waiting
    /// for the test's own references to it.
    fn publish_now(handle: &RingHandle, ring: KeyRing) {
        let old = handle.publish_shared(Arc::new(ring));
        handle.retire(old, Duration::ZERO);
    }

    /// Keys `stable` (ids `s0`..) with `fresh` new keys (ids `n{tag}-`..)
    /// inserted at `at`: the stable keys move.
    fn stable_with_inserted(stable: usize, fresh: usize, at: usize, tag: usize) -> KeyFile {
        let mut ids: Vec<String> = (0..stable).map(|i| format!("s{i}")).collect();
        let at = at.min(ids.len());
        ids.splice(at..at, (0..fresh).map(|j| format!("n{tag}-{j}")));
        keys_named(&ids)
    }

    /// Two threads standing in for checks: each runs `check` with its own
    /// random state (see [`lcg`]) until `stop`.
    fn checkers<'s>(
        s: &'s std::thread::Scope<'s, '_>,
        stop: &'s std::sync::atomic::AtomicBool,
        check: impl Fn(&mut u64) + Send + Sync + 's,
    ) {
        let check = Arc::new(check);
        for t in 0..2u64 {
            let check = Arc::clone(&check);
            s.spawn(move || {
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    check(&mut n);
                }
            });
        }
    }

    /// The next number of a linear congruential sequence (Knuth's MMIX).
    fn lcg(n: u64) -> u64 {
        n.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    }

    /// A ring of [`stable_with_inserted`], of generation `tag`.
    fn stable_ring(
        reg: &UsageRegistry,
        stable: usize,
        fresh: usize,
        at: usize,
        tag: usize,
    ) -> KeyRing {
        let file = stable_with_inserted(stable, fresh, at, tag);
        KeyRing::build(&file, source(tag as u64), reg, None)
    }

    #[test]
    fn allowed_requests_are_counted_in_the_ring_and_carried_to_the_next() {
        let reg = UsageRegistry::default();
        let handle = RingHandle::new(stable_ring(&reg, 100, 0, 0, 0));
        let first = handle.load_full();
        for (i, n, at) in [(3, 5u64, 1_000u64), (99, 1, 2_000), (50, 2, 3_000)] {
            let key = first.by_id(&format!("s{i}")).unwrap();
            for t in 0..n {
                key.record_use(at + t);
            }
        }
        assert_eq!(reg.len(), 0, "allowing needs no counters from the registry");
        let view = handle.usage_view();
        let s3 = view.ring().by_id("s3").unwrap();
        assert_eq!((view.requests(s3), view.last_used(s3)), (5, Some(1_004)));
        let s4 = view.ring().by_id("s4").unwrap();
        assert_eq!((view.requests(s4), view.last_used(s4)), (0, None));
        drop(view);

        // Ten keys inserted above s50: s50 and s99 move, s3 does not.
        let second = stable_ring(&reg, 100, 10, 40, 1);
        let old = handle.publish_shared(Arc::new(second));
        // Not folded yet: the view adds the replaced ring in, and a check
        // still holding it counts where the view sees it.
        first.by_id("s99").unwrap().record_use(2_500);
        handle.load().by_id("s99").unwrap().record_use(2_400);
        let totals = |handle: &RingHandle| -> Vec<(u64, Option<u64>)> {
            let view = handle.usage_view();
            ["s3", "s50", "s99", "n1-0"]
                .iter()
                .map(|id| {
                    let key = view.ring().by_id(id).unwrap();
                    (view.requests(key), view.last_used(key))
                })
                .collect()
        };
        let want = vec![
            (5, Some(1_004)),
            (2, Some(3_001)),
            (3, Some(2_500)),
            (0, None),
        ];
        assert_eq!(totals(&handle), want);
        drop(first);
        assert!(handle.retire(old, RELEASE_WAIT).is_none(), "freed here");
        assert!(handle.replaced().is_empty());
        assert_eq!(totals(&handle), want, "folded into the served ring");
        let served = handle.load_full();
        assert_eq!(served.by_id("s99").unwrap().requests_here(), 3);

        // A key the next ring drops loses its count; the others keep theirs.
        publish_now(
            &handle,
            KeyRing::build(&keys_named(&["s99".to_owned()]), source(3), &reg, None),
        );
        let view = handle.usage_view();
        let s99 = view.ring().by_id("s99").unwrap();
        assert_eq!(view.requests(s99), 3);
        assert_eq!(view.ring().len(), 1);
    }

    #[test]
    fn a_ring_held_past_the_wait_is_folded_and_left_to_its_holder() {
        let reg = UsageRegistry::default();
        let handle = RingHandle::new(stable_ring(&reg, 10, 0, 0, 0));
        let held = handle.load_full();
        held.by_id("s1").unwrap().record_use(7);
        let old = handle.publish_shared(Arc::new(stable_ring(&reg, 10, 1, 0, 1)));
        let weak = handle
            .retire(old, Duration::from_millis(20))
            .expect("still held");
        assert!(handle.replaced().is_empty());
        let view = handle.usage_view();
        assert_eq!(view.requests(view.ring().by_id("s1").unwrap()), 1);
        drop(view);
        drop(held);
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn a_replaced_ring_dropped_unretired_is_folded_by_the_next_retirement() {
        let reg = UsageRegistry::default();
        let build = |g: usize| stable_ring(&reg, 10, g, 0, g);
        let handle = RingHandle::new(build(1));
        handle.load().by_id("s2").unwrap().record_use(1);
        drop(handle.publish_shared(Arc::new(build(2))));
        handle.load().by_id("s2").unwrap().record_use(2);
        let view = handle.usage_view();
        assert_eq!(view.requests(view.ring().by_id("s2").unwrap()), 2);
        drop(view);
        handle.publish(build(3));
        assert!(handle.replaced().is_empty());
        let view = handle.usage_view();
        assert_eq!(view.requests(view.ring().by_id("s2").unwrap()), 2);
        assert_eq!(view.last_used(view.ring().by_id("s2").unwrap()), Some(2));
    }

    #[test]
    fn a_ring_published_again_is_counted_once() {
        let reg = UsageRegistry::default();
        let a = Arc::new(stable_ring(&reg, 5, 0, 0, 0));
        let handle = RingHandle::new(stable_ring(&reg, 5, 1, 0, 1));
        a.by_id("s0").unwrap().record_use(1);
        let old = handle.publish_shared(Arc::clone(&a));
        let replaced = handle.publish_shared(Arc::new(KeyRing::empty(source(3))));
        assert!(Arc::ptr_eq(&replaced, &a));
        drop(replaced);
        // `a` back, while it is still listed as replaced.
        let empty = handle.publish_shared(Arc::clone(&a));
        let view = handle.usage_view();
        assert_eq!(view.requests(view.ring().by_id("s0").unwrap()), 1);
        drop(view);
        handle.retire(empty, Duration::ZERO);
        handle.retire(old, Duration::ZERO);
        let view = handle.usage_view();
        assert_eq!(view.requests(view.ring().by_id("s0").unwrap()), 1);
    }

    #[test]
    fn counts_are_exact_and_never_go_down_while_rings_are_published() {
        const STABLE: usize = 400;
        let reg = UsageRegistry::default();
        let handle = RingHandle::new(stable_ring(&reg, STABLE, 0, 0, 0));
        let stop = std::sync::atomic::AtomicBool::new(false);
        let uses = AtomicU64::new(0);
        let counts = |view: &UsageView<'_>| -> Vec<u64> {
            (0..STABLE)
                .map(|i| view.requests(view.ring().by_id(&format!("s{i}")).unwrap()))
                .collect()
        };
        std::thread::scope(|s| {
            checkers(s, &stop, |n| {
                *n = lcg(*n);
                let id = format!("s{}", (*n >> 33) as usize % STABLE);
                handle.load().by_id(&id).unwrap().record_use(*n >> 60);
                uses.fetch_add(1, Ordering::Relaxed);
            });
            // Scrapes: no key's count ever goes down.
            let scraper = s.spawn(|| {
                let mut last = vec![0; STABLE];
                loop {
                    let now = counts(&handle.usage_view());
                    for (i, (then, now)) in last.iter().zip(&now).enumerate() {
                        assert!(now >= then, "s{i} went down from {then} to {now}");
                    }
                    last = now;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            });
            for generation in 1..120 {
                let ring = stable_ring(
                    &reg,
                    STABLE,
                    generation % 7,
                    generation * 13 % STABLE,
                    generation,
                );
                let old = handle.publish_shared(Arc::new(ring));
                // Some replaced rings wait for a later retirement.
                if generation % 3 != 0 {
                    handle.retire(old, RELEASE_WAIT);
                }
                // Let the checkers count on every generation, however the
                // scheduler shares the CPUs out (bounded).
                let want = uses.load(Ordering::Relaxed) + 20;
                let deadline = Instant::now() + Duration::from_secs(1);
                while uses.load(Ordering::Relaxed) < want && Instant::now() < deadline {
                    std::thread::yield_now();
                }
            }
            stop.store(true, Ordering::Relaxed);
            scraper.join().unwrap();
        });
        handle.publish(stable_ring(&reg, STABLE, 0, 0, 1000));
        assert!(handle.replaced().is_empty());
        let total: u64 = counts(&handle.usage_view()).iter().sum();
        assert_eq!(total, uses.load(Ordering::Relaxed));
    }

    #[test]
    fn publish_swaps_atomically() {
        let reg = UsageRegistry::default();
        let handle = RingHandle::new(KeyRing::empty(source(0)));
        let reader = handle.clone();
        let held = reader.load();
        let ring = KeyRing::build(&file(&two_keys()), source(1), &reg, None);
        let old = handle.publish_shared(Arc::new(ring));
        assert_eq!(old.generation(), 0);
        drop(old);
        // A guard taken before the swap still sees the old ring.
        assert_eq!(held.generation(), 0);
        assert_eq!(reader.load().generation(), 1);
        assert_eq!(reader.load().len(), 2);
    }

    #[test]
    fn paths_are_normalised_as_upstreams_do() {
        for (path, want) in [
            ("/", "/"),
            ("/v1/prices", "/v1/prices"),
            ("/v1/prices?x=1#f", "/v1/prices"),
            ("", ""),
            ("//", "/"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/", "/a/b/"),
            ("/a/./b/.", "/a/b/"),
            ("/a/../../b", "/b"),
            ("/a/..", "/"),
            ("/%41%7e%2D", "/A~-"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2", "/a%2"),
            ("/%zz/.", "/%zz/"),
            ("/caf%C3%A9/./x", "/caf%C3%A9/x"),
            ("/.hidden/x", "/.hidden/x"),
            // RFC order: the `..` removes the empty segment, not `admin`.
            ("/trade/admin//..", "/trade/admin/"),
            ("/a//../b", "/a/b"),
        ] {
            assert_eq!(normalized_path(path), want, "{path:?}");
        }
        assert!(matches!(
            normalized_path("/v1/orders/17?all"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn route_rules_pick_the_most_specific_prefix() {
        let text = two_keys()
            + r#"
[[routes]]
path_prefix = "/"
required_scopes = ["read"]

[[routes]]
path_prefix = "/trade"
methods = ["POST", "DELETE"]
required_scopes = ["trade"]

[[routes]]
path_prefix = "/trade/admin"
required_scopes = ["trade", "admin"]

[[routes]]
path_prefix = "/public"
required_scopes = []

[[routes]]
path_prefix = "/reports"
methods = ["GET"]
required_scopes = ["reports"]

[[routes]]
path_prefix = "/reports"
methods = ["HEAD"]
required_scopes = ["audit"]

[[routes]]
path_prefix = "/exports"
methods = ["GET"]
required_scopes = ["exports"]
"#;
        let ring = KeyRing::build(&file(&text), source(1), &UsageRegistry::default(), None);
        assert_eq!(ring.route_scopes("GET", "/prices").as_deref(), Some("read"));
        assert_eq!(
            ring.route_scopes("HEAD", "/exports/q3").as_deref(),
            Some("exports"),
            "a rule for GET covers HEAD"
        );
        assert_eq!(
            ring.route_scopes("HEAD", "/reports/q3").as_deref(),
            Some("audit"),
            "unless a rule of the same prefix lists HEAD, even after it"
        );
        assert_eq!(
            ring.route_scopes("GET", "/reports/q3").as_deref(),
            Some("reports")
        );
        assert_eq!(
            ring.route_scopes("HEAD", "/trade/orders").as_deref(),
            Some("read")
        );
        assert_eq!(
            ring.route_scopes("POST", "/trade/orders?x=1").as_deref(),
            Some("trade")
        );
        assert_eq!(
            ring.route_scopes("GET", "/trade/orders").as_deref(),
            Some("read"),
            "method not listed"
        );
        assert_eq!(
            ring.route_scopes("GET", "/trade/admin/x").as_deref(),
            Some("trade admin")
        );
        assert_eq!(ring.route_scopes("GET", "/public/x").as_deref(), Some(""));
        assert_eq!(
            ring.route_scopes("OPTIONS", "*").as_deref(),
            Some("read"),
            "as /"
        );
        // A path that normalises to a laxer rule still needs its own: an
        // upstream that does not decode `%2e` routes it under /trade/admin.
        assert_eq!(
            ring.route_scopes("GET", "/trade/admin/%2e%2e").as_deref(),
            Some("trade admin read")
        );
        assert_eq!(ring.route_scopes("GET", "").as_deref(), Some("read"));
        // Paths that a normalising upstream routes to /trade/admin need
        // what /trade/admin needs.
        for sneaky in [
            "//trade/admin/x",
            "/trade//admin",
            "/%74rade/admin",
            "/%74rade/%61dmin?q",
            "/public/../trade/admin/",
            "/./trade/./admin",
            "/public/%2e%2e/trade/admin",
            "/trade/admin\u{fffd}",
            "/trade/admin//..",
        ] {
            let need = ring.route_scopes("GET", sneaky).unwrap();
            let need: Vec<&str> = need.split(' ').collect();
            assert!(
                need.contains(&"trade") && need.contains(&"admin"),
                "{sneaky}: {need:?}"
            );
        }
        let no_routes = KeyRing::build(
            &file(&two_keys()),
            source(1),
            &UsageRegistry::default(),
            None,
        );
        assert_eq!(no_routes.route_scopes("GET", "/").as_deref(), None);
    }

    #[test]
    fn http_dates() {
        let t: Timestamp = "2026-11-01T08:05:09Z".parse().unwrap();
        assert_eq!(http_date(t), "Sun, 01 Nov 2026 08:05:09 GMT");
        for t in [
            "1970-01-01T00:00:00Z",
            "2000-02-29T23:59:59.5Z",
            "2106-02-07T06:28:16Z",
        ] {
            let t: Timestamp = t.parse().unwrap();
            let want = t.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string();
            assert_eq!(http_date(t), want);
        }
    }

    #[test]
    fn times_keep_exact_semantics() {
        let text = format!(
            r#"[[keys]]
id = "frac"
client = "c"
sha256 = "{}"
expires_at = 2027-01-01T00:00:00.5Z
not_before = 2026-01-01T00:00:00.25Z
[[keys]]
id = "whole"
client = "c"
sha256 = "{}"
expires_at = 2027-01-01T00:00:00Z
[[keys]]
id = "far"
client = "c"
sha256 = "{}"
expires_at = 2200-01-01T00:00:00Z
"#,
            hex::encode(sha("f")),
            hex::encode(sha("w")),
            hex::encode(sha("x"))
        );
        let ring = KeyRing::build(&file(&text), source(1), &UsageRegistry::default(), None);
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let frac = ring.by_id("frac").unwrap();
        assert_eq!(frac.expires_at(), Some(at("2027-01-01T00:00:00.5Z")));
        assert!(!frac.is_expired(at("2027-01-01T00:00:00.4Z")));
        assert!(frac.is_expired(at("2027-01-01T00:00:00.5Z")));
        assert!(frac.is_not_yet_valid(at("2026-01-01T00:00:00.2Z")));
        assert!(!frac.is_not_yet_valid(at("2026-01-01T00:00:00.25Z")));
        let whole = ring.by_id("whole").unwrap();
        assert_eq!(whole.expires_at(), Some(at("2027-01-01T00:00:00Z")));
        assert!(!whole.is_expired(at("2026-12-31T23:59:59.999Z")));
        assert!(whole.is_expired(at("2027-01-01T00:00:00Z")));
        assert!(!whole.is_not_yet_valid(at("2000-01-01T00:00:00Z")));
        let far = ring.by_id("far").unwrap();
        assert_eq!(far.expires_at(), Some(at("2200-01-01T00:00:00Z")));
        assert!(!far.is_expired(at("2199-12-31T23:59:59Z")));
        assert!(far.is_expired(at("2200-01-01T00:00:00Z")));
    }

    #[test]
    fn a_pending_file_digest_appears_on_the_ring() {
        let digest = FileDigest::pending();
        let ring = KeyRing::build_with_digest(
            &file(&two_keys()),
            7,
            "2026-11-27T12:00:00Z".parse().unwrap(),
            digest.clone(),
            &UsageRegistry::default(),
            None,
            crate::keyfile::Threads::all(),
        );
        assert_eq!(ring.generation(), 7);
        assert_eq!(ring.file_sha256(), None);
        let waiter = std::thread::spawn({
            let digest = digest.clone();
            move || digest.wait()
        });
        assert!(digest.set([9; 32]));
        assert!(!digest.set([8; 32]), "set once");
        assert_eq!(ring.file_sha256(), Some([9; 32]));
        assert_eq!(waiter.join().unwrap(), [9; 32]);
        let known = KeyRing::build(
            &file(&two_keys()),
            source(1),
            &UsageRegistry::default(),
            None,
        );
        assert_eq!(known.file_sha256(), Some([0; 32]));
    }

    #[test]
    fn rare_fields_live_in_sparse_columns() {
        let mut text = String::new();
        for i in 0..50 {
            text.push_str(&format!(
                "[[keys]]\nid = \"k{i}\"\nclient = \"c{}\"\nsha256 = \"{}\"\n",
                i % 3,
                hex::encode(sha(&format!("s{i}")))
            ));
            if i % 2 == 0 {
                text.push_str(&format!("scopes = [\"s{}\"]\n", i % 4));
            }
            if i % 7 == 0 {
                text.push_str(&format!("description = \"key {i}\"\n"));
            }
            if i % 7 == 1 {
                text.push_str("description = \"\"\n");
            }
            if i % 7 == 2 {
                text.push_str("description = \"shared\"\n");
            }
            match i % 11 {
                3 => {
                    text.push_str("state = \"deprecated\"\ndeprecated_at = 2026-11-20T09:30:00Z\n")
                }
                4 => text.push_str(&format!(
                    "state = \"deprecated\"\ndeprecated_at = 2026-11-{:02}T00:00:00Z\n",
                    i / 11 + 1
                )),
                5 => text.push_str("state = \"deprecated\"\n"),
                _ => {}
            }
            if i % 5 == 0 {
                text.push_str(&format!(
                    "rate_limit = {{ requests = {}, per = \"1s\" }}\n",
                    i + 1
                ));
            }
            if i % 9 == 0 {
                text.push_str("not_before = 2026-01-01T00:00:00Z\n");
            }
        }
        let ring = KeyRing::build(&file(&text), source(1), &UsageRegistry::default(), None);
        for i in 0..50 {
            let k = ring.by_id(&format!("k{i}")).unwrap();
            let want = match i % 7 {
                0 => Some(format!("key {i}")),
                1 => Some(String::new()),
                2 => Some("shared".to_string()),
                _ => None,
            };
            assert_eq!(k.description().map(str::to_string), want, "k{i}");
            let deprecated: Option<Timestamp> = match i % 11 {
                3 => Some("2026-11-20T09:30:00Z".parse().unwrap()),
                4 => Some(
                    format!("2026-11-{:02}T00:00:00Z", i / 11 + 1)
                        .parse()
                        .unwrap(),
                ),
                5 => Some(source(1).loaded_at),
                _ => None,
            };
            assert_eq!(k.deprecated_at(), deprecated, "k{i}");
            assert_eq!(
                k.rate_limit().map(|l| l.requests),
                (i % 5 == 0).then_some(i + 1)
            );
            assert_eq!(k.not_before().is_some(), i % 9 == 0);
            assert_eq!(k.client(), format!("c{}", i % 3));
            let scopes = if i % 2 == 0 {
                format!("s{}", i % 4)
            } else {
                String::new()
            };
            assert_eq!(k.scopes_joined(), scopes);
        }
        // Clients and scope sets are interned, and so are their pairs.
        assert_eq!(ring.client_starts.len(), 3);
        assert_eq!(ring.scope_sets.len(), 3);
        assert_eq!(ring.profiles.len(), 9);
        // So are descriptions (eight "key {i}", "" and "shared") and
        // deprecation times (one shared, five of their own, the load time).
        assert_eq!(ring.rare.description_starts.len(), 10);
        assert_eq!(ring.rare.deprecation_times.len(), 7);
    }

    #[test]
    fn digest_cells_hold_an_index_and_what_fits_of_a_tag() {
        assert_eq!(index_bits(1), 1);
        assert_eq!(index_bits(1_000_000), 20);
        assert_eq!(index_bits(u32::MAX as usize - 1), 32);
        let d = [0xff; 16];
        assert_eq!(cell_tag(&d, 20), 0xfff0_0000);
        assert_eq!(index_mask(20), 0x000f_ffff);
        // With every bit taken by the index there is no tag, and lookups
        // compare digests.
        assert_eq!(cell_tag(&d, 32), 0);
        assert_eq!(index_mask(32), u32::MAX);
    }

    #[test]
    fn many_keys_are_all_found() {
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!(
                "[[keys]]\nid = \"k{i}\"\nclient = \"c{}\"\nsha256 = \"{}\"\n",
                i % 7,
                hex::encode(sha(&format!("s{i}")))
            ));
        }
        let ring = KeyRing::build(&file(&text), source(1), &UsageRegistry::default(), None);
        for i in 0..2000 {
            let k = ring.lookup(&sha(&format!("s{i}"))).unwrap();
            assert_eq!(k.id(), format!("k{i}"));
            assert_eq!(ring.by_id(&format!("k{i}")).unwrap().index(), k.index());
            assert_eq!(
                ring.find(format!("s{i}").as_bytes()).key().unwrap().index(),
                k.index()
            );
        }
        assert!(ring.lookup(&sha("s2000")).is_none());
        assert!(ring.by_id("k2000").is_none());
        assert!(KeyRing::empty(source(0)).lookup(&sha("s1")).is_none());
    }
}
