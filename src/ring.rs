//! The key ring: an immutable index from SHA-256 digest to key, and the single
//! point where a new ring is published.
//!
//! A [`KeyRing`] is built completely off the hot path from a validated
//! [`KeyFile`], then published with one atomic store through a [`RingHandle`].
//! Readers do one `ArcSwap::load` per request and never see a half-built ring.
//!
//! Per-key usage counters ([`KeyUsage`]) live in a [`UsageRegistry`] outside the
//! ring, keyed by key id, so they survive reloads; each ring entry holds an
//! `Arc` to its counters, so the hot path bumps relaxed atomics it already has
//! and never touches the registry.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, Guard};
use dashmap::DashMap;
use jiff::Timestamp;

use crate::keyfile::{KeyFile, KeySpec, KeyState, RateLimitSpec};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// Map key wrapping a digest so it hashes to its own first eight bytes.
///
/// SHA-256 output is already uniformly distributed, so hashing it again is
/// wasted work. Flooding is not a concern: an attacker chooses only the keys
/// that are *looked up*, never the ones stored, so crafted digests cannot
/// lengthen the probe sequences of the table.
#[derive(Clone, Copy, PartialEq, Eq)]
struct DigestKey(Digest);

impl Hash for DigestKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_ne_bytes(first));
    }
}

/// Hasher that passes through the single `u64` a [`DigestKey`] writes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `DigestKey` is hashed; fold the
        // bytes in rather than lose them.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Denial reasons counted per key in [`KeyUsage::denied`].
pub const KEY_DENIAL_REASONS: usize = 6;

/// Live usage of one key; shared between rings by key id.
#[derive(Debug, Default)]
pub struct KeyUsage {
    /// Allowed requests.
    pub requests: AtomicU64,
    /// Unix seconds of the last allowed request (0 = never).
    pub last_used: AtomicU64,
    /// Denials that matched this key, by [`crate::decide::DenyReason::key_index`].
    pub denied: [AtomicU64; KEY_DENIAL_REASONS],
    /// The key's rate-limit budget.
    pub limiter: crate::limit::Limiter,
    /// The limit the budget was kept for; a reload that changes it resets the
    /// budget, any other reload keeps it. Only ring builds take this lock.
    limit_spec: std::sync::Mutex<Option<RateLimitSpec>>,
}

impl KeyUsage {
    /// Keeps the budget if `spec` is the limit it was kept for, else resets it.
    pub fn sync_limit(&self, spec: Option<RateLimitSpec>) {
        let mut current = self.limit_spec.lock().unwrap_or_else(|e| e.into_inner());
        if *current != spec {
            self.limiter.reset();
            *current = spec;
        }
    }
}

impl KeyUsage {
    /// Records one allowed request at `now_secs`.
    #[inline]
    pub fn record_use(&self, now_secs: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        // A plain store: concurrent users race only to write nearly the same second.
        self.last_used.store(now_secs, Ordering::Relaxed);
    }
}

/// Usage counters by key id; touched only when a ring is built and at scrape time.
#[derive(Debug, Default)]
pub struct UsageRegistry {
    by_id: DashMap<Arc<str>, Arc<KeyUsage>, ahash::RandomState>,
}

impl UsageRegistry {
    /// The counters for `id`, created on first sight.
    pub fn usage(&self, id: &str) -> Arc<KeyUsage> {
        if let Some(u) = self.by_id.get(id) {
            return Arc::clone(u.value());
        }
        Arc::clone(
            self.by_id
                .entry(Arc::from(id))
                .or_insert_with(|| Arc::new(KeyUsage::default()))
                .value(),
        )
    }

    /// Drops the counters of keys that `ring` no longer holds.
    pub fn retain_ring(&self, ring: &KeyRing) {
        self.by_id.retain(|id, _| ring.by_id(id).is_some());
    }

    /// Number of keys with counters.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no key has counters.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// One key as the verify path sees it.
#[derive(Debug)]
pub struct KeyEntry {
    /// Unique id.
    pub id: Arc<str>,
    /// The principal the key authenticates.
    pub client: Arc<str>,
    /// SHA-256 of the secret (not secret itself, but never exposed by the admin API).
    pub digest: Digest,
    /// Granted scopes (deduplicated, file order).
    pub scopes: Box<[Box<str>]>,
    /// Scopes joined by single spaces, as sent in `x-keyward-scopes`.
    pub scopes_joined: Box<str>,
    /// Lifecycle state.
    pub state: KeyState,
    /// Not valid before this instant.
    pub not_before: Option<Timestamp>,
    /// Not valid at or after this instant.
    pub expires_at: Option<Timestamp>,
    /// When the key was deprecated: from the file, or when this process first
    /// saw it deprecated.
    pub deprecated_at: Option<Timestamp>,
    /// Operator's description.
    pub description: Option<Box<str>>,
    /// Optional request budget.
    pub rate_limit: Option<RateLimitSpec>,
    /// `Deprecation` response header value (RFC 9745), for deprecated keys.
    pub deprecation_header: Option<Box<str>>,
    /// `Sunset` response header value (RFC 8594), for deprecated keys with an expiry.
    pub sunset_header: Option<Box<str>>,
    /// Live counters (shared across rings).
    pub usage: Arc<KeyUsage>,
}

impl KeyEntry {
    /// Whether the key grants every scope in `required` (space- or
    /// comma-separated). Allocation-free.
    #[inline]
    pub fn has_scopes(&self, required: &str) -> bool {
        required
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .all(|need| self.scopes.iter().any(|have| **have == *need))
    }
}

/// Where a ring came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSource {
    /// Publication number, starting at 1 for the first ring of the process.
    pub generation: u64,
    /// SHA-256 of the file bytes the ring was built from.
    pub sha256: Digest,
    /// When the ring was built.
    pub loaded_at: Timestamp,
}

/// An immutable set of keys indexed by digest.
#[derive(Debug)]
pub struct KeyRing {
    entries: Box<[KeyEntry]>,
    by_digest: HashMap<DigestKey, u32, BuildHasherDefault<PassThrough>>,
    by_id: ahash::AHashMap<Arc<str>, u32>,
    routes: Box<[Route]>,
    source: RingSource,
    /// Process-unique id, for the per-thread lookup memo.
    uid: u64,
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

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests of secrets are not secrets, but keep them out of debug dumps anyway.
        f.write_str("DigestKey(..)")
    }
}

impl KeyRing {
    /// Builds a ring from a validated file.
    ///
    /// `previous` (the ring being replaced, if any) carries over the time a key
    /// was first seen deprecated when the file does not say.
    pub fn build(
        file: &KeyFile,
        source: RingSource,
        usage: &UsageRegistry,
        previous: Option<&KeyRing>,
    ) -> KeyRing {
        let mut by_digest = HashMap::with_capacity_and_hasher(file.keys.len(), Default::default());
        let mut by_id = ahash::AHashMap::with_capacity(file.keys.len());
        let mut clients: ahash::AHashMap<&str, Arc<str>> = ahash::AHashMap::new();
        let mut entries = Vec::with_capacity(file.keys.len());
        for (i, spec) in file.keys.iter().enumerate() {
            let client = Arc::clone(
                clients
                    .entry(spec.client.as_str())
                    .or_insert_with(|| Arc::from(spec.client.as_str())),
            );
            let prev_deprecated = previous
                .and_then(|p| p.by_id(&spec.id))
                .filter(|k| k.state == KeyState::Deprecated)
                .and_then(|k| k.deprecated_at);
            let key_usage = usage.usage(&spec.id);
            key_usage.sync_limit(spec.rate_limit);
            let entry = entry_from_spec(spec, client, key_usage, prev_deprecated, source.loaded_at);
            let index = u32::try_from(i).expect("more than 4 billion keys");
            by_digest.insert(DigestKey(spec.digest), index);
            by_id.insert(Arc::clone(&entry.id), index);
            entries.push(entry);
        }
        // Longest prefix first, so the most specific rule wins; file order
        // breaks ties (the sort is stable).
        let mut routes: Vec<Route> = file
            .routes
            .iter()
            .map(|r| Route {
                prefix: r.path_prefix.as_str().into(),
                methods: r.methods.iter().map(|m| m.as_str().into()).collect(),
                scopes: r.required_scopes.join(" ").into_boxed_str(),
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        KeyRing {
            entries: entries.into_boxed_slice(),
            by_digest,
            by_id,
            routes: routes.into_boxed_slice(),
            source,
            uid: crate::verified::next_ring_id(),
        }
    }

    /// The scopes the route rules require for `method` and `path` (the query
    /// string is ignored), or `None` when no rule matches.
    #[inline]
    pub fn route_scopes(&self, method: &str, path: &str) -> Option<&str> {
        if self.routes.is_empty() {
            return None;
        }
        let path = path.split(['?', '#']).next().unwrap_or(path);
        self.routes
            .iter()
            .find(|r| {
                path.starts_with(&*r.prefix)
                    && (r.methods.is_empty() || r.methods.iter().any(|m| **m == *method))
            })
            .map(|r| &*r.scopes)
    }

    /// The route rules, most specific first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// An empty ring (used before the first load in tests).
    pub fn empty(source: RingSource) -> KeyRing {
        KeyRing {
            entries: Box::new([]),
            by_digest: HashMap::default(),
            by_id: ahash::AHashMap::new(),
            routes: Box::new([]),
            source,
            uid: crate::verified::next_ring_id(),
        }
    }

    /// The key whose secret hashes to `digest`.
    #[inline]
    pub fn lookup(&self, digest: &Digest) -> Option<&KeyEntry> {
        let i = *self.by_digest.get(&DigestKey(*digest))?;
        self.entries.get(i as usize)
    }

    /// The key whose secret is `secret`: SHA-256 and [`KeyRing::lookup`] the
    /// first time this thread sees it in this ring, a keyed tag and one slot
    /// of the thread's memo after that (see [`crate::verified`]).
    #[inline]
    pub fn find(&self, secret: &[u8]) -> Option<&KeyEntry> {
        let tag = crate::verified::tag(secret);
        let index = match crate::verified::get(tag, self.uid) {
            Some(index) => index,
            None => {
                let digest = crate::decide::digest_bytes(secret);
                let index = self
                    .by_digest
                    .get(&DigestKey(digest))
                    .copied()
                    .unwrap_or(crate::verified::ABSENT);
                crate::verified::put(tag, self.uid, index);
                index
            }
        };
        self.entries.get(index as usize)
    }

    /// The key with id `id`.
    pub fn by_id(&self, id: &str) -> Option<&KeyEntry> {
        let i = *self.by_id.get(id)?;
        self.entries.get(i as usize)
    }

    /// All keys, in file order.
    pub fn keys(&self) -> &[KeyEntry] {
        &self.entries
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Generation, file digest and load time.
    pub fn source(&self) -> &RingSource {
        &self.source
    }
}

fn entry_from_spec(
    spec: &KeySpec,
    client: Arc<str>,
    usage: Arc<KeyUsage>,
    prev_deprecated: Option<Timestamp>,
    loaded_at: Timestamp,
) -> KeyEntry {
    let deprecated_at = match spec.state {
        KeyState::Deprecated => Some(spec.deprecated_at.or(prev_deprecated).unwrap_or(loaded_at)),
        _ => spec.deprecated_at,
    };
    let (deprecation_header, sunset_header) = if spec.state == KeyState::Deprecated {
        (
            deprecated_at.map(|t| format!("@{}", t.as_second()).into_boxed_str()),
            spec.expires_at.map(|t| http_date(t).into_boxed_str()),
        )
    } else {
        (None, None)
    };
    KeyEntry {
        id: Arc::from(spec.id.as_str()),
        client,
        digest: spec.digest,
        scopes: spec
            .scopes
            .iter()
            .map(|s| s.clone().into_boxed_str())
            .collect(),
        scopes_joined: spec.scopes.join(" ").into_boxed_str(),
        state: spec.state,
        not_before: spec.not_before,
        expires_at: spec.expires_at,
        deprecated_at,
        description: spec.description.as_deref().map(Box::from),
        rate_limit: spec.rate_limit,
        deprecation_header,
        sunset_header,
        usage,
    }
}

/// Formats an instant as an HTTP-date (RFC 9110 IMF-fixdate), as `Sunset` requires.
pub fn http_date(t: Timestamp) -> String {
    t.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// The publishing point: readers `load`, the reloader `publish`es.
///
/// Cloning shares the same slot.
#[derive(Debug, Clone)]
pub struct RingHandle {
    slot: Arc<ArcSwap<KeyRing>>,
}

impl RingHandle {
    /// A handle serving `ring`.
    pub fn new(ring: KeyRing) -> RingHandle {
        RingHandle {
            slot: Arc::new(ArcSwap::from_pointee(ring)),
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

    /// Replaces the ring with one atomic store; returns the ring it replaced.
    pub fn publish(&self, ring: KeyRing) -> Arc<KeyRing> {
        self.slot.swap(Arc::new(ring))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::{ParseOptions, parse_str};
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
        assert_eq!(&*ring.lookup(&sha("secret-a")).unwrap().id, "a");
        assert_eq!(&*ring.lookup(&sha("secret-b")).unwrap().id, "b");
        assert!(ring.lookup(&sha("secret-c")).is_none());
        assert_eq!(&*ring.by_id("b").unwrap().client, "acme");
        assert!(ring.by_id("c").is_none());
        // Clients are interned.
        assert!(Arc::ptr_eq(&ring.keys()[0].client, &ring.keys()[1].client));
    }

    #[test]
    fn scopes_match_space_or_comma_lists() {
        let reg = UsageRegistry::default();
        let ring = KeyRing::build(&file(&two_keys()), source(1), &reg, None);
        let a = ring.by_id("a").unwrap();
        assert_eq!(&*a.scopes_joined, "read trade");
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
        assert_eq!(b.deprecation_header.as_deref(), Some("@1795780800"));
        assert_eq!(
            b.sunset_header.as_deref(),
            Some("Sat, 27 Feb 2027 00:00:00 GMT")
        );
        assert!(ring.by_id("a").unwrap().deprecation_header.is_none());

        // A later ring keeps the first-seen deprecation time.
        let mut later = source(2);
        later.loaded_at = "2026-12-01T00:00:00Z".parse().unwrap();
        let ring2 = KeyRing::build(&file(&two_keys()), later, &reg, Some(&ring));
        assert_eq!(
            ring2.by_id("b").unwrap().deprecation_header.as_deref(),
            Some("@1795780800")
        );
    }

    #[test]
    fn usage_survives_rebuilds_and_is_pruned() {
        let reg = UsageRegistry::default();
        let ring = KeyRing::build(&file(&two_keys()), source(1), &reg, None);
        ring.by_id("a").unwrap().usage.record_use(42);
        let ring2 = KeyRing::build(&file(&two_keys()), source(2), &reg, Some(&ring));
        let a2 = ring2.by_id("a").unwrap();
        assert_eq!(a2.usage.requests.load(Ordering::Relaxed), 1);
        assert_eq!(a2.usage.last_used.load(Ordering::Relaxed), 42);

        let only_a = two_keys()
            .split("[[keys]]")
            .nth(1)
            .map(|s| format!("[[keys]]{s}"))
            .unwrap();
        let ring3 = KeyRing::build(&file(&only_a), source(3), &reg, Some(&ring2));
        reg.retain_ring(&ring3);
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn publish_swaps_atomically() {
        let reg = UsageRegistry::default();
        let handle = RingHandle::new(KeyRing::empty(source(0)));
        let reader = handle.clone();
        let held = reader.load();
        let old = handle.publish(KeyRing::build(&file(&two_keys()), source(1), &reg, None));
        assert_eq!(old.source().generation, 0);
        // A guard taken before the swap still sees the old ring.
        assert_eq!(held.source().generation, 0);
        assert_eq!(reader.load().source().generation, 1);
        assert_eq!(reader.load().len(), 2);
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
"#;
        let ring = KeyRing::build(&file(&text), source(1), &UsageRegistry::default(), None);
        assert_eq!(ring.route_scopes("GET", "/prices"), Some("read"));
        assert_eq!(
            ring.route_scopes("POST", "/trade/orders?x=1"),
            Some("trade")
        );
        assert_eq!(
            ring.route_scopes("GET", "/trade/orders"),
            Some("read"),
            "method not listed"
        );
        assert_eq!(
            ring.route_scopes("GET", "/trade/admin/x"),
            Some("trade admin")
        );
        assert_eq!(ring.route_scopes("GET", "/public/x"), Some(""));
        let no_routes = KeyRing::build(
            &file(&two_keys()),
            source(1),
            &UsageRegistry::default(),
            None,
        );
        assert_eq!(no_routes.route_scopes("GET", "/"), None);
    }

    #[test]
    fn http_dates() {
        let t: Timestamp = "2026-11-01T08:05:09Z".parse().unwrap();
        assert_eq!(http_date(t), "Sun, 01 Nov 2026 08:05:09 GMT");
    }
}
