//! The `envoy.service.auth.v3.Authorization/Check` logic, from request bytes
//! to response bytes.
//!
//! Glue only: read the headers and route context out of the CheckRequest
//! ([`CheckView`]), [`extract_bytes`] the credential, [`decide`] against the current
//! ring, and turn the [`Decision`] into an encoded CheckResponse in exactly one
//! place ([`respond`]). A denial is a normal response; a gRPC error status is
//! reserved for requests that are not a CheckRequest at all. The HTTP/2 side
//! is in [`crate::grpc`].

use std::io::Write as _;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use jiff::Timestamp;

use crate::decide::{CredentialHeader, Decision, DenyReason, decide, extract_bytes};
use crate::limit::Quota;
use crate::ring::{HttpDate, KeyRef, RingHandle};
use crate::stats::CheckStats;
use crate::wire::{self, CheckView, DecodeError, DeniedResponse, Header, OkResponse, Source};

/// Identity headers keyward sets on allowed requests.
pub const CLIENT_HEADER: &str = "x-keyward-client";
/// See [`CLIENT_HEADER`].
pub const KEY_ID_HEADER: &str = "x-keyward-key-id";
/// See [`CLIENT_HEADER`].
pub const SCOPES_HEADER: &str = "x-keyward-scopes";
/// Prefix of every header keyward owns; client-sent ones are stripped.
pub const OWN_PREFIX: &str = "x-keyward-";
/// The per-route `context_extensions` key naming required scopes.
pub const REQUIRED_SCOPES: &str = "required_scopes";

/// State shared by the gRPC service, the admin API and the reloader.
#[derive(Debug)]
pub struct Shared {
    /// The published ring.
    pub ring: RingHandle,
    /// Per-key counters, shared across rings.
    pub usage: crate::ring::UsageRegistry,
    /// Decision counters.
    pub stats: CheckStats,
    /// Reload counters and the last reload error.
    pub reloads: crate::reload::ReloadStats,
    /// Brute-force lockout state.
    pub lockout: crate::lockout::Lockout,
    /// Since when `usage` counts: a key unused since then may have been
    /// used before (by an earlier process).
    pub counting_since: jiff::Timestamp,
}

impl Shared {
    /// State serving `ring` (built with `usage`), with fresh decision and
    /// reload counters and brute-force lockout set up by `lockout`.
    pub fn new(
        ring: crate::ring::KeyRing,
        usage: crate::ring::UsageRegistry,
        lockout: crate::lockout::LockoutConfig,
    ) -> Shared {
        Shared {
            ring: RingHandle::new(ring),
            usage,
            stats: CheckStats::default(),
            reloads: crate::reload::ReloadStats::default(),
            lockout: crate::lockout::Lockout::new(lockout),
            counting_since: jiff::Timestamp::now(),
        }
    }
}

/// The Check service.
#[derive(Debug, Clone)]
pub struct AuthzService {
    shared: Arc<Shared>,
    log_every: u64,
    xff_hops: usize,
}

/// One decision in how many to log for a sampling fraction (0 for none).
pub fn sample_every(fraction: f64) -> u64 {
    if fraction <= 0.0 || fraction.is_nan() {
        0
    } else {
        (1.0 / fraction.min(1.0)).round().max(1.0) as u64
    }
}

thread_local! {
    /// Per-thread decision counter for log sampling (no shared cache line).
    static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Header bytes as text (required scopes, the method, the peer address in
/// decision logs); bytes that are not UTF-8 become U+FFFD, which no scope
/// or method matches.
fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or("\u{fffd}")
}

impl AuthzService {
    /// A service answering from `shared.ring`.
    pub fn new(shared: Arc<Shared>) -> AuthzService {
        AuthzService {
            shared,
            log_every: 0,
            xff_hops: 0,
        }
    }

    /// Takes the client address for lockout from the `hops`-th
    /// `x-forwarded-for` entry from the right (0: the peer address Envoy reports).
    pub fn with_xff_trusted_hops(mut self, hops: usize) -> AuthzService {
        self.xff_hops = hops;
        self
    }

    /// Logs one decision in `every` (0: none) to target `keyward::decision`.
    pub fn with_decision_log(mut self, every: u64) -> AuthzService {
        self.log_every = every;
        self
    }

    /// State shared with the admin API and the reloader.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn log_decision(&self, decision: &Decision<'_>, source: Option<Source<'_>>) {
        if self.log_every == 0 {
            return;
        }
        let n = SEEN.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        if !n.is_multiple_of(self.log_every) {
            return;
        }
        let source = match source {
            Some(Source::Socket(a) | Source::Pipe(a)) => text(a),
            None => "",
        };
        match decision {
            Decision::Allow { key: k, .. } => tracing::info!(
                target: "keyward::decision",
                decision = "allowed",
                key_id = %k.id(),
                client = k.client(),
                state = k.state().as_str(),
                source,
            ),
            Decision::Deny { reason, key, .. } => tracing::info!(
                target: "keyward::decision",
                decision = "denied",
                reason = reason.code(),
                key_id = key.map(|k| tracing::field::display(k.id())),
                client = key.map(|k| k.client()),
                source,
            ),
        }
    }

    /// Checks one serialized CheckRequest at `now`; returns the CheckResponse
    /// as a gRPC frame (prefix included), ready for the wire.
    pub fn check_message(&self, message: &[u8], now: Timestamp) -> Result<Bytes, DecodeError> {
        let view = CheckView::decode(message)?;
        Ok(self.check_view(&view, now))
    }

    /// Decides one decoded request at `now` and encodes its response.
    pub fn check_view(&self, view: &CheckView<'_>, now: Timestamp) -> Bytes {
        let started = crate::stats::time_this_check().then(std::time::Instant::now);
        let lockout = &self.shared.lockout;
        let now_ns = u64::try_from(now.as_nanosecond()).unwrap_or(0);
        let source = || {
            let peer = match view.source {
                Some(Source::Socket(a)) => std::str::from_utf8(a).ok(),
                _ => None,
            };
            let xff = view
                .forwarded_for()
                .and_then(|x| std::str::from_utf8(x).ok());
            crate::lockout::client_address(peer, xff, self.xff_hops)
        };
        // A locked-out source is denied before any digest work. While no
        // source is locked out this is a single atomic load.
        let locked_for = if lockout.any_locked() {
            source().and_then(|ip| lockout.locked_for(ip, now_ns))
        } else {
            None
        };
        let cred = extract_bytes(view.api_key(), view.authorization());
        let ring = self.shared.ring.load();
        // Envoy's per-route `required_scopes` wins; the key file's route rules
        // apply when Envoy sends none (Istio cannot send any).
        let required = match view.required_scopes {
            Some(s) => std::borrow::Cow::Borrowed(text(s)),
            // A path that is not UTF-8 keeps its valid part (`/trade\xff`
            // is under `/trade`), so no rule is dodged by a stray byte.
            None => ring
                .route_scopes(text(view.method), &String::from_utf8_lossy(view.path))
                .unwrap_or_default(),
        };
        let decision = match (&cred, locked_for) {
            (_, Some(retry_after)) => Decision::Deny {
                reason: DenyReason::TooManyFailures,
                key: None,
                quota: None,
                retry_after,
            },
            (Ok(c), None) => decide(&ring, c, now, &required),
            (Err(reason), None) => Decision::deny(*reason),
        };
        if decision.reason().is_some_and(DenyReason::is_failure)
            && lockout.enabled()
            && let Some(ip) = source()
        {
            lockout.record_failure(ip, now_ns);
        }
        let now_secs = u64::try_from(now.as_second()).unwrap_or(0);
        self.shared.stats.record(&decision, now_secs);
        self.log_decision(&decision, view.source);
        let response = respond(&decision, cred.ok().map(|c| c.header), &view.own_headers);
        if let Some(started) = started {
            self.shared.stats.observe_latency(started.elapsed());
        }
        response
    }

    /// Checks a prost-built request and decodes the response: a convenience
    /// for tests and embedding, going through the same bytes as the server.
    pub fn check_at(
        &self,
        request: &crate::pb::envoy::service::auth::v3::CheckRequest,
        now: Timestamp,
    ) -> crate::pb::envoy::service::auth::v3::CheckResponse {
        use prost::Message as _;
        let bytes = request.encode_to_vec();
        let framed = match self.check_message(&bytes, now) {
            Ok(f) => f,
            Err(e) => unreachable!("prost wrote a request keyward cannot read: {e}"),
        };
        let message = wire::unframe(&framed).unwrap_or_default();
        crate::pb::envoy::service::auth::v3::CheckResponse::decode(message).unwrap_or_default()
    }
}

/// A small stack buffer for formatted header values.
struct Scratch {
    buf: [u8; 64],
    len: usize,
}

impl Scratch {
    fn format(args: std::fmt::Arguments<'_>) -> Scratch {
        let mut buf = [0u8; 64];
        let mut cursor = &mut buf[..];
        // 64 bytes hold every value formatted here (two u64s and a few
        // characters); a longer one would be cut, never overflow.
        let _ = cursor.write_fmt(args);
        let len = 64 - cursor.len();
        Scratch { buf, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The IETF `RateLimit-Policy` and `RateLimit` header values (structured
/// fields, draft-ietf-httpapi-ratelimit-headers): quota `q` per window `w`
/// seconds, `r` requests remaining, `t` seconds until the budget is full again.
fn quota_values(q: &Quota) -> (Scratch, Scratch) {
    (
        Scratch::format(format_args!("\"key\";q={};w={}", q.limit, q.window_secs)),
        Scratch::format(format_args!("\"key\";r={};t={}", q.remaining, q.reset_secs)),
    )
}

const OWN: [&str; 3] = [CLIENT_HEADER, KEY_ID_HEADER, SCOPES_HEADER];

/// Encodes the CheckResponse Envoy acts on. The only place responses are made.
///
/// `carrier` is the header that carried the key (removed before the request
/// goes upstream); `own_headers` are the client-sent `x-keyward-*` names.
pub fn respond(
    decision: &Decision<'_>,
    carrier: Option<CredentialHeader>,
    own_headers: &[&[u8]],
) -> Bytes {
    match decision {
        // The common case is the same answer for the same key every time:
        // no quota headers, no client-sent x-keyward-* headers to remove.
        Decision::Allow { key, quota: None } if own_headers.is_empty() => {
            allowed_cached(*key, carrier)
        }
        Decision::Allow { key, quota } => allowed(*key, quota.as_ref(), carrier, own_headers),
        Decision::Deny {
            reason,
            quota,
            retry_after,
            ..
        } => denied(*reason, quota.as_ref(), *retry_after),
    }
}

/// Sets of the per-thread cache of encoded OK responses to begin with (a
/// power of two), of two slots each: 4,096 responses, about 200 KiB of
/// slots per serving thread plus the responses themselves (a few hundred
/// bytes each). It grows as the memo does ([`crate::verified::Growth`]),
/// up to as many sets as the memo may have (32,768 responses, 1.5 MiB of
/// slots), when the keys a thread answers for no longer fit.
const OK_SETS: usize = 2048;

/// One encoded OK response, and whose it is.
struct OkSlot {
    ring: u64,
    index: u32,
    carrier: Option<CredentialHeader>,
    frame: Bytes,
}

impl OkSlot {
    const VACANT: OkSlot = OkSlot {
        ring: 0, // no ring has uid 0
        index: 0,
        carrier: None,
        frame: Bytes::new(),
    };

    fn is(&self, index: u32, carrier: Option<CredentialHeader>) -> bool {
        self.index == index && self.carrier == carrier
    }
}

/// The responses a key and carrier may be cached in, most recently used
/// first.
type OkSet = [OkSlot; 2];

thread_local! {
    /// Recently sent OK responses, two-way set-associative by key and
    /// carrier. An allowed request without quota or client-sent
    /// `x-keyward-*` headers gets exactly the response of the previous one
    /// with the same key and carrier, so it is encoded once per ring and
    /// shared (a reference count, no copy). A new ring has a new uid, so
    /// nothing of an older ring is ever reused. Allocated on the thread's
    /// first allowed check.
    static OK_CACHE: std::cell::RefCell<Box<[OkSet]>> = std::cell::RefCell::new(ok_sets(OK_SETS));
    /// When to grow [`OK_CACHE`].
    static OK_GROWTH: crate::verified::Growth = const { crate::verified::Growth::new() };
}

#[cold]
fn ok_sets(n: usize) -> Box<[OkSet]> {
    crate::verified::table(n, || [OkSlot::VACANT, OkSlot::VACANT])
}

fn allowed_cached(key: KeyRef<'_>, carrier: Option<CredentialHeader>) -> Bytes {
    let (ring, index) = (key.ring_uid(), key.index());
    OK_GROWTH.with(crate::verified::Growth::lookup);
    OK_CACHE.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            // Only reachable if encoding re-entered this function.
            return allowed(key, None, carrier, &[]);
        };
        // Fibonacci hashing: the top bits of the product, so that keys
        // taken at any stride through the file (every client's newest key,
        // say) spread over all the sets. The number of sets is a power of
        // two, at least 2.
        let sets = cache.len();
        let at = ((u64::from(index) << 1
            | u64::from(carrier == Some(CredentialHeader::Authorization)))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            >> (64 - sets.trailing_zeros())) as usize;
        let set = &mut cache[at & (sets - 1)];
        if set[0].ring == ring && set[0].is(index, carrier) {
            return set[0].frame.clone();
        }
        if set[1].ring == ring && set[1].is(index, carrier) {
            set.swap(0, 1);
            return set[0].frame.clone();
        }
        // The new response replaces this key's response of an older ring
        // if the set has one in front, else the least recently used.
        let mut pushed_out_live = false;
        if !set[0].is(index, carrier) {
            set.swap(0, 1);
            pushed_out_live = set[0].ring == ring;
        }
        let frame = allowed(key, None, carrier, &[]);
        set[0] = OkSlot {
            ring,
            index,
            carrier,
            frame: frame.clone(),
        };
        if pushed_out_live
            && let Some(n) = OK_GROWTH.with(|g| g.evicted(sets, crate::verified::MAX_SETS))
        {
            // Every cached response goes; each is encoded again once.
            *cache = ok_sets(n);
        }
        frame
    })
}

fn allowed(
    key: KeyRef<'_>,
    quota: Option<&Quota>,
    carrier: Option<CredentialHeader>,
    own_headers: &[&[u8]],
) -> Bytes {
    let carrier_name = carrier.map(|c| c.name().as_bytes());
    // Envoy applies removals after it sets `headers`, so list only the
    // client-sent x-keyward-* names that we do not set ourselves. Envoy
    // sends names in lower case; anything else is lowered (and allocates,
    // which only such a request pays for).
    // Sorted to drop repeats: a request sent past Envoy may carry any
    // number of names, and comparing each with every other would take
    // quadratic time.
    let mut lowered: Vec<Vec<u8>> = own_headers
        .iter()
        .filter(|name| {
            !OWN.iter()
                .any(|own| own.as_bytes().eq_ignore_ascii_case(name))
        })
        .map(|name| name.to_ascii_lowercase())
        .collect();
    lowered.sort_unstable();
    lowered.dedup();
    let mut all: Vec<&[u8]> = Vec::new();
    let remove: &[&[u8]] = if lowered.is_empty() {
        carrier_name.as_slice()
    } else {
        all.extend(carrier_name);
        all.extend(lowered.iter().map(Vec::as_slice));
        &all
    };

    let quota = quota.map(quota_values);
    let mut response_headers: [Header<'_>; 4] = [(&[], &[]); 4];
    let mut n = 0;
    if let Some((policy, remaining)) = &quota {
        response_headers[0] = (b"ratelimit-policy", policy.bytes());
        response_headers[1] = (b"ratelimit", remaining.bytes());
        n = 2;
    }
    // `Deprecation` (RFC 9745) and `Sunset` (RFC 8594), formatted on the
    // stack: only deprecated keys pay for it.
    let deprecation = key.deprecation().map(|(since, sunset)| {
        (
            Scratch::format(format_args!("@{since}")),
            sunset.map(|t| Scratch::format(format_args!("{}", HttpDate(t)))),
        )
    });
    if let Some((dep, sunset)) = &deprecation {
        response_headers[n] = (b"deprecation", dep.bytes());
        n += 1;
        if let Some(sunset) = sunset {
            response_headers[n] = (b"sunset", sunset.bytes());
            n += 1;
        }
    }
    key.id().with_str(|id| {
        OkResponse {
            headers: &[
                (CLIENT_HEADER.as_bytes(), key.client().as_bytes()),
                (KEY_ID_HEADER.as_bytes(), id.as_bytes()),
                (SCOPES_HEADER.as_bytes(), key.scopes_joined().as_bytes()),
            ],
            remove,
            response_headers: &response_headers[..n],
            metadata: &[
                (b"client", key.client().as_bytes()),
                (b"key_id", id.as_bytes()),
                (b"scopes", key.scopes_joined().as_bytes()),
            ],
        }
        .to_frame()
    })
}

/// The response for a denial; `quota` and `retry_after` (seconds, 0 for none)
/// add the rate-limit headers. Denials without either are encoded once per
/// process and shared.
pub fn denied(reason: DenyReason, quota: Option<&Quota>, retry_after: u64) -> Bytes {
    static PLAIN: OnceLock<[Bytes; DenyReason::ALL.len()]> = OnceLock::new();
    if quota.is_none() && retry_after == 0 {
        let plain = PLAIN.get_or_init(|| DenyReason::ALL.map(|r| encode_denied(r, None, 0)));
        return plain[reason.index()].clone();
    }
    encode_denied(reason, quota, retry_after)
}

fn encode_denied(reason: DenyReason, quota: Option<&Quota>, retry_after: u64) -> Bytes {
    let status = reason.http_status();
    let mut headers: [Header<'_>; 5] = [(&[], &[]); 5];
    headers[0] = (b"content-type", b"application/json");
    let mut n = 1;
    let quota = quota.map(quota_values);
    if let Some((policy, remaining)) = &quota {
        headers[1] = (b"ratelimit-policy", policy.bytes());
        headers[2] = (b"ratelimit", remaining.bytes());
        n = 3;
    }
    let retry = Scratch::format(format_args!("{retry_after}"));
    if retry_after > 0 {
        headers[n] = (b"retry-after", retry.bytes());
        n += 1;
    }
    if status == 401 {
        let challenge: &[u8] = if reason == DenyReason::MissingKey {
            br#"Bearer realm="keyward""#
        } else {
            br#"Bearer realm="keyward", error="invalid_token""#
        };
        headers[n] = (b"www-authenticate", challenge);
        n += 1;
    }
    let body = Scratch::format(format_args!("{{\"error\":\"{}\"}}", reason.code()));
    let d = DeniedResponse {
        grpc_code: reason.grpc_code().unsigned_abs(),
        message: reason.code().as_bytes(),
        http_status: status,
        headers: &headers[..n],
        body: body.bytes(),
    };
    d.to_frame()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::{ParseOptions, parse_str};
    use crate::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use crate::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
    use crate::pb::envoy::service::auth::v3::attribute_context::Request as AttrRequest;
    use crate::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use crate::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
    use crate::ring::{KeyRing, RingSource, UsageRegistry};
    use std::sync::atomic::Ordering;

    fn service() -> AuthzService {
        let text = format!(
            "[[keys]]\nid = \"k1\"\nclient = \"acme\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
            hex::encode(crate::decide::digest("secret-1"))
        );
        let usage = UsageRegistry::default();
        let ring = first_ring(&text, &usage);
        AuthzService::new(Arc::new(Shared::new(ring, usage, Default::default())))
    }

    /// Generation 1 of the ring `text` describes.
    fn first_ring(text: &str, usage: &UsageRegistry) -> KeyRing {
        let file = parse_str(text, ParseOptions::default()).unwrap();
        let source = RingSource {
            generation: 1,
            sha256: [0; 32],
            loaded_at: Timestamp::now(),
        };
        KeyRing::build(&file, source, usage, None)
    }

    #[test]
    fn the_ok_cache_holds_a_thousand_interleaved_keys() {
        let ring = ring_of(2000);
        // Every other key (a stride through the file), taken in turn.
        let keys: Vec<KeyRef<'_>> = (0..1000).filter_map(|i| ring.key_at(i * 2)).collect();
        assert_eq!(keys.len(), 1000);
        let again = reused(&keys);
        // About 97 % expected; a set index that ignored the key would reuse
        // none.
        assert!(again > 900, "only {again} of 1000 responses reused");
    }

    /// Answers the keys in turn twice; how many second answers were the
    /// first one's bytes again, from the cache. Checks on the way that a
    /// cached answer is the one an uncached encode gives.
    fn reused(keys: &[KeyRef<'_>]) -> usize {
        let carrier = Some(CredentialHeader::ApiKey);
        let first: Vec<Bytes> = keys.iter().map(|k| allowed_cached(*k, carrier)).collect();
        let again = keys
            .iter()
            .zip(&first)
            .filter(|(k, f)| allowed_cached(**k, carrier).as_ptr() == f.as_ptr())
            .count();
        for (k, f) in keys.iter().zip(&first).step_by(keys.len() / 50 + 1) {
            assert_eq!(allowed(*k, None, carrier, &[]), *f);
        }
        again
    }

    fn ok_sets_now() -> usize {
        OK_CACHE.with_borrow(|c| c.len())
    }

    /// A ring of `n` keys, `secret-0` to `secret-{n-1}`.
    fn ring_of(n: usize) -> KeyRing {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "[[keys]]\nid = \"k{i}\"\nclient = \"c{}\"\nsha256 = \"{}\"\n",
                i % 7,
                hex::encode(crate::decide::digest(&format!("secret-{i}")))
            ));
        }
        first_ring(&text, &UsageRegistry::default())
    }

    /// Answers the keys in turn, `passes` times over.
    fn answer_in_turn(keys: &[KeyRef<'_>], passes: usize) {
        for _ in 0..passes {
            for k in keys {
                allowed_cached(*k, Some(CredentialHeader::ApiKey));
            }
        }
    }

    #[test]
    fn the_ok_cache_grows_to_hold_more_interleaved_keys() {
        let ring = ring_of(6000);
        let keys: Vec<KeyRef<'_>> = ring.keys().collect();
        assert_eq!(ok_sets_now(), OK_SETS);
        // 6,000 keys taken in turn do not fit 4,096 slots: the cache
        // grows until nearly all of them do.
        answer_in_turn(&keys, 20);
        assert!(ok_sets_now() > OK_SETS, "still {} sets", ok_sets_now());
        let again = reused(&keys);
        // About 95 % once grown to its cap.
        assert!(again > 5400, "only {again} of 6000 responses reused");
    }

    #[test]
    fn the_ok_cache_stays_small_while_the_keys_fit() {
        let ring = ring_of(500);
        let keys: Vec<KeyRef<'_>> = ring.keys().collect();
        answer_in_turn(&keys, 40);
        assert_eq!(ok_sets_now(), OK_SETS);
    }

    #[test]
    fn the_ok_cache_stops_growing_at_its_cap() {
        let ring = ring_of(16_000);
        let keys: Vec<KeyRef<'_>> = ring.keys().collect();
        answer_in_turn(&keys, 12);
        assert_eq!(ok_sets_now(), crate::verified::MAX_SETS);
    }

    #[test]
    fn the_ok_cache_stays_small_when_the_keys_would_not_fit_at_its_cap() {
        let ring = ring_of(64_000);
        let keys: Vec<KeyRef<'_>> = ring.keys().collect();
        answer_in_turn(&keys, 4);
        // Back at its size after each trial, or in the middle of one.
        assert!(
            ok_sets_now() < crate::verified::MAX_SETS,
            "{} sets",
            ok_sets_now()
        );
    }

    fn with_http(http: HttpRequest, scopes: Option<&str>) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest { http: Some(http) }),
                context_extensions: scopes
                    .map(|s| [(REQUIRED_SCOPES.to_owned(), s.to_owned())].into())
                    .unwrap_or_default(),
                ..Default::default()
            }),
        }
    }

    fn outcome(resp: &CheckResponse) -> (i32, Option<String>) {
        let code = resp.status.as_ref().unwrap().code;
        match &resp.http_response {
            Some(HttpResponse::DeniedResponse(d)) => (code, Some(d.body.clone())),
            Some(HttpResponse::OkResponse(_)) => (code, None),
            None => panic!("no http_response"),
        }
    }

    #[test]
    fn cached_ok_responses_follow_the_carrier_and_the_ring() {
        let svc = service();
        let ok = |svc: &AuthzService, header: &str, value: &str| {
            let http = HttpRequest {
                headers: [(header.to_owned(), value.to_owned())].into(),
                ..Default::default()
            };
            let resp = svc.check_at(&with_http(http, Some("read")), Timestamp::now());
            let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
                panic!("not allowed: {resp:?}")
            };
            let scopes = ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-keyward-scopes")
                .map(|h| h.value.clone());
            (ok.headers_to_remove, scopes)
        };
        for _ in 0..2 {
            assert_eq!(
                ok(&svc, "x-api-key", "secret-1"),
                (vec!["x-api-key".to_owned()], Some("read".to_owned()))
            );
            assert_eq!(
                ok(&svc, "authorization", "Bearer secret-1"),
                (vec!["authorization".to_owned()], Some("read".to_owned()))
            );
        }
        // The same key, in the same position, with other scopes in a new ring.
        let text = format!(
            "[[keys]]\nid = \"k1\"\nclient = \"acme\"\nsha256 = \"{}\"\nscopes = [\"read\", \"trade\"]\n",
            hex::encode(crate::decide::digest("secret-1"))
        );
        let file = parse_str(&text, ParseOptions::default()).unwrap();
        let current = svc.shared.ring.load_full();
        let source = RingSource {
            generation: current.generation() + 1,
            sha256: [0; 32],
            loaded_at: Timestamp::now(),
        };
        let ring = KeyRing::build(&file, source, &svc.shared.usage, Some(&current));
        // Held here, the replaced ring would be waited for.
        drop(current);
        svc.shared.ring.publish(ring);
        assert_eq!(
            ok(&svc, "x-api-key", "secret-1"),
            (vec!["x-api-key".to_owned()], Some("read trade".to_owned()))
        );
    }

    #[test]
    fn an_empty_request_is_denied_not_an_error() {
        let svc = service();
        let resp = svc.check_at(&CheckRequest::default(), Timestamp::now());
        assert_eq!(
            outcome(&resp),
            (16, Some(r#"{"error":"missing_key"}"#.into()))
        );
    }

    #[test]
    fn raw_header_maps_are_read() {
        let svc = service();
        let raw = |k: &str, v: &[u8]| HeaderValue {
            key: k.into(),
            value: String::new(),
            raw_value: v.to_vec(),
        };
        let http = HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![raw("X-Api-Key", b"secret-1"), raw("x-keyward-debug", b"1")],
            }),
            ..Default::default()
        };
        let resp = svc.check_at(&with_http(http, Some("read")), Timestamp::now());
        assert_eq!(outcome(&resp), (0, None));
        let Some(HttpResponse::OkResponse(ok)) = &resp.http_response else {
            unreachable!()
        };
        assert_eq!(ok.headers_to_remove, vec!["x-api-key", "x-keyward-debug"]);

        // Bytes that are not UTF-8 are malformed, not a crash.
        let http = HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![raw("x-api-key", b"\xff\xfe")],
            }),
            ..Default::default()
        };
        let resp = svc.check_at(&with_http(http, None), Timestamp::now());
        assert_eq!(
            outcome(&resp),
            (16, Some(r#"{"error":"malformed_key"}"#.into()))
        );
    }

    #[test]
    fn decisions_are_counted() {
        let svc = service();
        let http = |key: &str| HttpRequest {
            headers: [("x-api-key".to_owned(), key.to_owned())].into(),
            ..Default::default()
        };
        let now = Timestamp::now();
        for _ in 0..3 {
            svc.check_at(&with_http(http("secret-1"), None), now);
        }
        svc.check_at(&with_http(http("secret-1"), Some("admin")), now);
        svc.check_at(&with_http(http("nope"), None), now);
        let stats = &svc.shared.stats;
        assert_eq!(stats.allowed(), 3);
        assert_eq!(stats.denied(DenyReason::InsufficientScope), 1);
        assert_eq!(stats.denied(DenyReason::UnknownKey), 1);
        let view = svc.shared.ring.usage_view();
        let key = view.ring().by_id("k1").unwrap();
        assert_eq!(view.requests(key), 3);
        assert_eq!(view.last_used(key), Some(now.as_second() as u64));
        let usage = key.usage();
        assert_eq!(
            usage.denied[DenyReason::InsufficientScope.key_index().unwrap()]
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn denials_have_the_contract_shape() {
        use prost::Message as _;
        for reason in DenyReason::ALL {
            let framed = denied(reason, None, 0);
            let resp = CheckResponse::decode(wire::unframe(&framed).unwrap()).unwrap();
            let Some(HttpResponse::DeniedResponse(d)) = &resp.http_response else {
                unreachable!()
            };
            assert_eq!(
                d.status.as_ref().unwrap().code,
                i32::from(reason.http_status())
            );
            assert_eq!(d.body, format!("{{\"error\":\"{}\"}}", reason.code()));
            assert_ne!(resp.status.as_ref().unwrap().code, 0);
            let has_challenge = d
                .headers
                .iter()
                .any(|h| h.header.as_ref().unwrap().key == "www-authenticate");
            assert_eq!(has_challenge, reason.http_status() == 401);
        }
    }
}
