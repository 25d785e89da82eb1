//! Credential extraction and the decision: pure functions of their inputs.
//!
//! [`extract`] finds the presented key in the request headers; [`decide`] maps
//! (ring, credential, now, required scopes) to a [`Decision`]. A denial is a
//! value ([`DenyReason`]); nothing here fails, allocates or does I/O.

use jiff::Timestamp;

use crate::keyfile::KeyState;
use crate::limit::Quota;
use crate::ring::{Found, KeyRef, KeyRing};

/// Longest credential accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// The header that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The standard credentials header (`Bearer <key>`).
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// Which header carried the credential (removed before the request goes upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `x-api-key: <key>`.
    ApiKey,
    /// `authorization: Bearer <key>`.
    Authorization,
}

impl CredentialHeader {
    /// The header's (lower-case) name.
    pub fn name(self) -> &'static str {
        match self {
            CredentialHeader::ApiKey => API_KEY_HEADER,
            CredentialHeader::Authorization => AUTHORIZATION_HEADER,
        }
    }
}

/// A presented API key, borrowed from the request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Credential<'a> {
    /// The secret as presented. Never log it.
    pub secret: &'a str,
    /// Where it came from.
    pub header: CredentialHeader,
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("secret", &"<redacted>")
            .field("header", &self.header)
            .finish()
    }
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No credential was presented.
    MissingKey,
    /// The credential is too long or not visible ASCII.
    MalformedKey,
    /// No key in the ring has this digest.
    UnknownKey,
    /// The key is revoked.
    RevokedKey,
    /// The key's `expires_at` has passed.
    ExpiredKey,
    /// The key's `not_before` is still ahead.
    KeyNotYetValid,
    /// The key lacks a scope the route requires.
    InsufficientScope,
    /// The key is over its rate limit.
    RateLimited,
    /// The source is locked out after repeated failures.
    TooManyFailures,
}

impl DenyReason {
    /// Every reason, in table order.
    pub const ALL: [DenyReason; 9] = [
        DenyReason::MissingKey,
        DenyReason::MalformedKey,
        DenyReason::UnknownKey,
        DenyReason::RevokedKey,
        DenyReason::ExpiredKey,
        DenyReason::KeyNotYetValid,
        DenyReason::InsufficientScope,
        DenyReason::RateLimited,
        DenyReason::TooManyFailures,
    ];

    /// The `error` code in the JSON body and the metrics `reason` label.
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::MissingKey => "missing_key",
            DenyReason::MalformedKey => "malformed_key",
            DenyReason::UnknownKey => "unknown_key",
            DenyReason::RevokedKey => "revoked_key",
            DenyReason::ExpiredKey => "expired_key",
            DenyReason::KeyNotYetValid => "key_not_yet_valid",
            DenyReason::InsufficientScope => "insufficient_scope",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::TooManyFailures => "too_many_failures",
        }
    }

    /// The HTTP status returned to the client.
    pub fn http_status(self) -> u16 {
        match self {
            DenyReason::InsufficientScope => 403,
            DenyReason::RateLimited | DenyReason::TooManyFailures => 429,
            _ => 401,
        }
    }

    /// The `google.rpc.Code` carried in the CheckResponse status.
    pub fn grpc_code(self) -> i32 {
        match self.http_status() {
            401 => 16, // UNAUTHENTICATED
            403 => 7,  // PERMISSION_DENIED
            _ => 8,    // RESOURCE_EXHAUSTED
        }
    }

    /// Index into [`crate::ring::KeyUsage::denied`] for denials that matched a key.
    pub fn key_index(self) -> Option<usize> {
        match self {
            DenyReason::RevokedKey => Some(0),
            DenyReason::ExpiredKey => Some(1),
            DenyReason::KeyNotYetValid => Some(2),
            DenyReason::InsufficientScope => Some(3),
            DenyReason::RateLimited => Some(4),
            DenyReason::TooManyFailures => Some(5),
            _ => None,
        }
    }

    /// Whether this denial counts as a failed guess for brute-force lockout.
    pub fn is_failure(self) -> bool {
        matches!(self, DenyReason::UnknownKey | DenyReason::MalformedKey)
    }

    /// Position in [`DenyReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'r> {
    /// Let the request through as `key`.
    Allow {
        /// The matched key.
        key: KeyRef<'r>,
        /// The key's remaining budget, when it has a rate limit.
        quota: Option<Quota>,
    },
    /// Deny it; `key` is the matched key when the denial is about a known key.
    Deny {
        /// Why.
        reason: DenyReason,
        /// The matched key, if any.
        key: Option<KeyRef<'r>>,
        /// The key's budget, for `rate_limited`.
        quota: Option<Quota>,
        /// Seconds the client should wait (`retry-after`), 0 for none.
        retry_after: u64,
    },
}

impl<'r> Decision<'r> {
    /// A denial that matched no key.
    pub fn deny(reason: DenyReason) -> Decision<'r> {
        Decision::Deny {
            reason,
            key: None,
            quota: None,
            retry_after: 0,
        }
    }

    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The denial reason, if denied.
    pub fn reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Allow { .. } => None,
            Decision::Deny { reason, .. } => Some(*reason),
        }
    }
}

/// Finds the credential: `x-api-key` first, then `authorization: Bearer <key>`.
///
/// A header that is present but empty counts as a malformed key (the client
/// tried to authenticate), except an empty `x-api-key` beside a Bearer
/// token (clients that always send the header, empty when unset), which
/// yields to the token; an `authorization` header with another scheme is
/// not ours and counts as no credential.
pub fn extract<'a>(
    api_key: Option<&'a str>,
    authorization: Option<&'a str>,
) -> Result<Credential<'a>, DenyReason> {
    extract_bytes(api_key.map(str::as_bytes), authorization.map(str::as_bytes))
}

/// [`extract`] from header values as they arrive, which need not be UTF-8:
/// a secret with a byte that is not visible ASCII is malformed, whatever
/// the byte.
pub fn extract_bytes<'a>(
    api_key: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
) -> Result<Credential<'a>, DenyReason> {
    let (secret, header) = match (api_key, authorization.and_then(bearer_token)) {
        (Some(secret), _) if !secret.is_empty() => (secret, CredentialHeader::ApiKey),
        (_, Some(secret)) => (secret, CredentialHeader::Authorization),
        (Some(empty), None) => (empty, CredentialHeader::ApiKey),
        (None, None) => return Err(DenyReason::MissingKey),
    };
    // A key with the shape of keyward's that fails its checksum is refused
    // by the lookup (`KeyRing::find`), before any digest work and only when
    // the key is not remembered from an earlier check.
    if !is_well_formed(secret) {
        return Err(DenyReason::MalformedKey);
    }
    debug_assert!(secret.is_ascii());
    // SAFETY: every byte of a well-formed secret is visible ASCII
    // (0x21..=0x7e, checked just above), and ASCII is UTF-8. `from_utf8`
    // would walk the key a second time, byte by byte for a short one: about
    // 100 of a check's 35,000 instructions (`scripts/bench-instructions.sh`).
    let secret = unsafe { std::str::from_utf8_unchecked(secret) };
    Ok(Credential { secret, header })
}

/// The token of a `Bearer` authorization value (scheme case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim_blanks_start(value);
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    match rest {
        [] => Some(rest),
        // The scheme must be followed by whitespace ("Bearerx" is another scheme).
        [b' ' | b'\t', ..] => Some(trim_blanks_end(trim_blanks_start(rest))),
        _ => None,
    }
}

/// `value` without its leading spaces and tabs.
fn trim_blanks_start(value: &[u8]) -> &[u8] {
    let blanks = value
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(value.len());
    &value[blanks..]
}

/// `value` without its trailing spaces and tabs.
fn trim_blanks_end(value: &[u8]) -> &[u8] {
    let end = value
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(0, |last| last + 1);
    &value[..end]
}

/// At most [`MAX_KEY_LEN`] bytes, all visible ASCII (0x21..=0x7e), non-empty.
///
/// [`extract_bytes`] relies on this accepting ASCII only: it turns an
/// accepted secret into text without checking the bytes again.
#[inline]
pub fn is_well_formed(secret: impl AsRef<[u8]>) -> bool {
    let secret = secret.as_ref();
    // Every byte is looked at, without an early exit, so that the loop is
    // vectorised: about 3x faster than `all` for a 52-byte key.
    !secret.is_empty()
        && secret.len() <= MAX_KEY_LEN
        && secret
            .iter()
            .fold(true, |ok, &b| ok & (b.wrapping_sub(0x21) < 0x7f - 0x21))
}

/// SHA-256 of the secret's bytes.
#[inline]
pub fn digest(secret: &str) -> crate::ring::Digest {
    digest_bytes(secret.as_bytes())
}

/// SHA-256 of arbitrary bytes (key file contents, secrets).
///
/// Where the CPU has the SHA extensions (x86 since AMD Zen and Intel Ice
/// Lake), the `sha2` crate's, which uses them directly: 48 ns for a 52-byte
/// key against `ring`'s 64 ns on an AMD EPYC (`verify/sha256_only`), the
/// same 2 GB/s for a key file. Elsewhere `ring`'s assembly, about 1.6x as fast as the portable
/// `sha2` code for a key and 2x for a key file. A test checks all of them
/// agree.
#[inline]
pub fn digest_bytes(bytes: &[u8]) -> crate::ring::Digest {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    if sha_in_hardware() {
        return digest_sha_extensions(bytes);
    }
    digest_ring(bytes)
}

/// Whether this CPU computes SHA-256 with its own instructions (x86's SHA
/// extensions, the ARMv8 cryptography extension), several times as fast as
/// without.
pub fn sha_in_hardware() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    return std::is_x86_feature_detected!("sha");
    #[cfg(target_arch = "aarch64")]
    return std::arch::is_aarch64_feature_detected!("sha2");
    #[allow(unreachable_code)]
    false
}

/// SHA-256 through `sha2`, which picks its SHA-extensions code at run time.
#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
#[inline]
fn digest_sha_extensions(bytes: &[u8]) -> crate::ring::Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// SHA-256 through `ring`'s assembly.
#[inline]
fn digest_ring(bytes: &[u8]) -> crate::ring::Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Decides a check. `required` is the route's `required_scopes` (space- or
/// comma-separated, all required; empty for none).
#[inline]
pub fn decide<'r>(
    ring: &'r KeyRing,
    cred: &Credential<'_>,
    now: Timestamp,
    required: &str,
) -> Decision<'r> {
    match ring.find(cred.secret.as_bytes()) {
        Found::Key(key) => decide_key(key, now, required),
        Found::Unknown => Decision::deny(DenyReason::UnknownKey),
    }
}

/// The part of [`decide`] after the lookup: state, validity window, scopes,
/// and the key's rate limit (the only step with a side effect: it takes one
/// request from the key's budget, with one atomic compare-and-swap).
#[inline]
pub fn decide_key<'r>(key: KeyRef<'r>, now: Timestamp, required: &str) -> Decision<'r> {
    let deny = |reason| Decision::Deny {
        reason,
        key: Some(key),
        quota: None,
        retry_after: 0,
    };
    if key.state() == KeyState::Revoked {
        return deny(DenyReason::RevokedKey);
    }
    if key.is_expired(now) {
        return deny(DenyReason::ExpiredKey);
    }
    if key.is_not_yet_valid(now) {
        return deny(DenyReason::KeyNotYetValid);
    }
    if !key.has_scopes(required) {
        return deny(DenyReason::InsufficientScope);
    }
    let quota = match key.rate_limit() {
        None => None,
        Some(spec) => {
            let now_ns = u64::try_from(now.as_nanosecond()).unwrap_or(0);
            match key.usage().limiter.acquire(&spec, now_ns) {
                Ok(q) => Some(q),
                Err(q) => {
                    return Decision::Deny {
                        reason: DenyReason::RateLimited,
                        key: Some(key),
                        quota: Some(q),
                        retry_after: q.retry_after_secs,
                    };
                }
            }
        }
    };
    Decision::Allow { key, quota }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::{ParseOptions, parse_str};
    use crate::ring::{RingSource, UsageRegistry};

    fn ring() -> KeyRing {
        let keys = [
            (
                "active",
                "s-active",
                "state = \"active\"\nscopes = [\"read\", \"trade\"]",
            ),
            (
                "deprecated",
                "s-deprecated",
                "state = \"deprecated\"\nexpires_at = 2027-01-01T00:00:00Z",
            ),
            (
                "revoked",
                "s-revoked",
                "state = \"revoked\"\nexpires_at = 2020-01-01T00:00:00Z",
            ),
            ("expired", "s-expired", "expires_at = 2026-01-01T00:00:00Z"),
            ("future", "s-future", "not_before = 2026-12-01T00:00:00Z"),
        ];
        let mut text = String::new();
        for (id, secret, extra) in keys {
            text.push_str(&format!(
                "[[keys]]\nid = \"{id}\"\nclient = \"acme\"\nsha256 = \"{}\"\n{extra}\n",
                hex::encode(digest(secret))
            ));
        }
        ring_of(&text)
    }

    fn ring_of(text: &str) -> KeyRing {
        let file = parse_str(text, ParseOptions::default()).unwrap();
        let source = RingSource {
            generation: 1,
            sha256: [0; 32],
            loaded_at: now(),
        };
        KeyRing::build(&file, source, &UsageRegistry::default(), None)
    }

    fn now() -> Timestamp {
        "2026-11-27T12:00:00Z".parse().unwrap()
    }

    fn check(
        ring: &KeyRing,
        api_key: Option<&str>,
        auth: Option<&str>,
        required: &str,
    ) -> Result<String, DenyReason> {
        let cred = extract(api_key, auth)?;
        match decide(ring, &cred, now(), required) {
            Decision::Allow { key, .. } => Ok(key.id().to_string()),
            Decision::Deny { reason, .. } => Err(reason),
        }
    }

    #[test]
    fn digests_agree_whichever_implementation_computes_them() {
        // Around the block and padding boundaries, and a key file's size.
        for len in [
            0,
            1,
            20,
            52,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            128,
            1000,
            1 << 20,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let want = digest_ring(&bytes);
            assert_eq!(digest_bytes(&bytes), want, "{len} bytes");
            #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
            assert_eq!(digest_sha_extensions(&bytes), want, "{len} bytes");
        }
        // Known answers (FIPS 180-2's "abc", and "test").
        assert_eq!(
            hex::encode(digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex::encode(digest("test")),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn every_row_of_the_table() {
        let r = ring();
        use DenyReason::*;
        assert_eq!(check(&r, None, None, ""), Err(MissingKey));
        assert_eq!(
            check(&r, Some(&"x".repeat(513)), None, ""),
            Err(MalformedKey)
        );
        assert_eq!(check(&r, Some("has space"), None, ""), Err(MalformedKey));
        assert_eq!(check(&r, Some("caf\u{e9}"), None, ""), Err(MalformedKey));
        assert_eq!(check(&r, Some("tab\there"), None, ""), Err(MalformedKey));
        assert_eq!(check(&r, Some("nope"), None, ""), Err(UnknownKey));
        assert_eq!(check(&r, Some("s-revoked"), None, ""), Err(RevokedKey));
        assert_eq!(check(&r, Some("s-expired"), None, ""), Err(ExpiredKey));
        assert_eq!(check(&r, Some("s-future"), None, ""), Err(KeyNotYetValid));
        assert_eq!(
            check(&r, Some("s-active"), None, "read admin"),
            Err(InsufficientScope)
        );
        assert_eq!(
            check(&r, Some("s-active"), None, "read,trade"),
            Ok("active".into())
        );
        assert_eq!(
            check(&r, Some("s-deprecated"), None, ""),
            Ok("deprecated".into())
        );
    }

    #[test]
    fn expiry_and_not_before_boundaries() {
        let r = ring();
        let k = r.by_id("expired").unwrap();
        let exp: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert!(matches!(
            decide_key(k, exp, ""),
            Decision::Deny {
                reason: DenyReason::ExpiredKey,
                ..
            }
        ));
        let just_before = exp - jiff::SignedDuration::from_nanos(1);
        assert!(decide_key(k, just_before, "").is_allowed());
        let f = r.by_id("future").unwrap();
        let nb: Timestamp = "2026-12-01T00:00:00Z".parse().unwrap();
        assert!(decide_key(f, nb, "").is_allowed());
        assert!(matches!(
            decide_key(f, just_before, ""),
            Decision::Deny {
                reason: DenyReason::KeyNotYetValid,
                ..
            }
        ));
    }

    #[test]
    fn length_limit_is_512_bytes() {
        assert!(is_well_formed("k".repeat(512)));
        assert!(!is_well_formed("k".repeat(513)));
        assert!(!is_well_formed(""));
    }

    #[test]
    fn only_visible_ascii_is_well_formed() {
        for c in (0u8..=0x7f).map(char::from).chain(['é', '\u{a0}', '€']) {
            let key = format!("abc{c}def");
            assert_eq!(is_well_formed(&key), ('!'..='~').contains(&c), "{:?}", c);
        }
        // Every byte, whether or not it could start a character.
        for b in 0..=u8::MAX {
            let key = [b'a', b, b'z'];
            assert_eq!(is_well_formed(key), (0x21..=0x7e).contains(&b), "{b:#04x}");
        }
    }

    #[test]
    fn keyward_shaped_keys_must_pass_their_checksum() {
        let good = crate::secret::generate().unwrap();
        let mut bad = good.clone().into_bytes();
        bad[10] = if bad[10] == b'a' { b'b' } else { b'a' };
        let bad = String::from_utf8(bad).unwrap();
        // The ring even holds the look-alike's digest: it is still refused,
        // the first time and every time after.
        let text = format!(
            "[[keys]]\nid = \"good\"\nclient = \"c\"\nsha256 = \"{}\"\n\
             [[keys]]\nid = \"bad\"\nclient = \"c\"\nsha256 = \"{}\"\n\
             [[keys]]\nid = \"legacy\"\nclient = \"c\"\nsha256 = \"{}\"\n\
             [[keys]]\nid = \"imported\"\nclient = \"c\"\nsha256 = \"{}\"\n",
            hex::encode(digest(&good)),
            hex::encode(digest(&bad)),
            hex::encode(digest("legacy-0123456789")),
            hex::encode(digest("kw_legacy-0123456789")),
        );
        let ring = ring_of(&text);
        for _ in 0..3 {
            assert_eq!(check(&ring, Some(&good), None, ""), Ok("good".into()));
            assert_eq!(
                check(&ring, Some(&bad), None, ""),
                Err(DenyReason::UnknownKey),
                "the contract's malformed is about length and characters"
            );
            assert_eq!(
                check(&ring, Some("kw_short"), None, ""),
                Err(DenyReason::UnknownKey)
            );
            // Not our shape, though it starts with our prefix: looked up.
            assert_eq!(
                check(&ring, Some("kw_legacy-0123456789"), None, ""),
                Ok("imported".into())
            );
            // Keys issued elsewhere are looked up whatever their shape.
            assert_eq!(
                check(&ring, Some("legacy-0123456789"), None, ""),
                Ok("legacy".into())
            );
            assert_eq!(
                check(&ring, Some("legacy-9876543210"), None, ""),
                Err(DenyReason::UnknownKey)
            );
        }
    }

    #[test]
    fn x_api_key_wins_over_authorization() {
        let c = extract(Some("a"), Some("Bearer b")).unwrap();
        assert_eq!((c.secret, c.header), ("a", CredentialHeader::ApiKey));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer tok", "bearer tok", "BEARER   tok ", "\tBeArEr\ttok"] {
            let c = extract(None, Some(v)).unwrap();
            assert_eq!(
                (c.secret, c.header),
                ("tok", CredentialHeader::Authorization),
                "{v:?}"
            );
        }
    }

    #[test]
    fn other_schemes_are_not_credentials() {
        for v in ["Basic dXNlcjpwYXNz", "Bearertok", "Token tok", ""] {
            assert_eq!(extract(None, Some(v)), Err(DenyReason::MissingKey), "{v:?}");
        }
    }

    #[test]
    fn empty_credentials_are_malformed() {
        assert_eq!(extract(Some(""), None), Err(DenyReason::MalformedKey));
        assert_eq!(extract(None, Some("Bearer")), Err(DenyReason::MalformedKey));
        assert_eq!(
            extract(None, Some("Bearer   ")),
            Err(DenyReason::MalformedKey)
        );
        assert_eq!(
            extract(None, Some("Bearer a b")),
            Err(DenyReason::MalformedKey)
        );
        // An empty x-api-key yields to a Bearer token, and only to one.
        let c = extract(Some(""), Some("Bearer k1")).unwrap();
        assert_eq!(
            (c.secret, c.header),
            ("k1", CredentialHeader::Authorization)
        );
        assert_eq!(
            extract(Some(""), Some("Basic dXNlcg==")),
            Err(DenyReason::MalformedKey)
        );
        assert_eq!(
            extract(Some(""), Some("Bearer ")),
            Err(DenyReason::MalformedKey)
        );
        let c = extract(Some("k2"), Some("Bearer k1")).unwrap();
        assert_eq!(c.secret, "k2", "x-api-key first");
    }

    #[test]
    fn statuses_and_codes() {
        for r in DenyReason::ALL {
            let expected = match r {
                DenyReason::InsufficientScope => 403,
                DenyReason::RateLimited | DenyReason::TooManyFailures => 429,
                _ => 401,
            };
            assert_eq!(r.http_status(), expected);
            assert_eq!(DenyReason::ALL[r.index()], r);
        }
        assert_eq!(DenyReason::KeyNotYetValid.code(), "key_not_yet_valid");
    }

    #[test]
    fn header_bytes_that_are_not_text_are_a_malformed_key() {
        for bad in [&b"caf\xe9"[..], b"\xff\xfe", b"key\x80"] {
            assert_eq!(
                extract_bytes(Some(bad), None),
                Err(DenyReason::MalformedKey)
            );
            let mut bearer = b"Bearer ".to_vec();
            bearer.extend_from_slice(bad);
            assert_eq!(
                extract_bytes(None, Some(&bearer)),
                Err(DenyReason::MalformedKey)
            );
        }
        // A scheme that is not text is not ours: no credential at all.
        assert_eq!(
            extract_bytes(None, Some(b"Bear\xe9r abc")),
            Err(DenyReason::MissingKey)
        );
        let c = extract_bytes(None, Some(b" \tbearer\t abc-123 \t")).unwrap();
        assert_eq!(c.secret, "abc-123");
        assert_eq!(c.header, CredentialHeader::Authorization);
    }

    #[test]
    fn credential_debug_hides_the_secret() {
        let c = extract(Some("supersecret"), None).unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::keyfile::{KeyFile, KeySpec};
    use crate::ring::{RingSource, UsageRegistry};
    use proptest::prelude::*;

    const SCOPES: [&str; 4] = ["read", "trade", "admin", "withdraw"];

    fn state() -> impl Strategy<Value = KeyState> {
        prop_oneof![
            Just(KeyState::Active),
            Just(KeyState::Deprecated),
            Just(KeyState::Revoked)
        ]
    }

    /// An `authorization` value that is mostly a Bearer token: blanks, the
    /// scheme in any case (or something else now and then), a separator,
    /// then any bytes, some of them not text.
    fn bearer() -> impl Strategy<Value = Vec<u8>> {
        (
            "[ \t]{0,2}",
            prop_oneof![4 => "[bB][eE][aA][rR][eE][rR]", 1 => "[a-zA-Z]{0,8}"],
            "[ \t]{0,2}",
            proptest::collection::vec(prop_oneof![4 => 0x21u8..=0x7e, 1 => any::<u8>()], 0..40),
            "[ \t]{0,2}",
        )
            .prop_map(|(lead, scheme, sep, token, trail)| {
                let mut v = Vec::new();
                v.extend_from_slice(lead.as_bytes());
                v.extend_from_slice(scheme.as_bytes());
                v.extend_from_slice(sep.as_bytes());
                v.extend(token);
                v.extend_from_slice(trail.as_bytes());
                v
            })
    }

    proptest! {
        /// Whatever else is true, a revoked, expired, not-yet-valid or
        /// under-scoped key is never allowed, and a key that is none of
        /// those always is.
        #[test]
        fn decisions_follow_the_table(
            st in state(),
            nb in proptest::option::of(-1000i64..1000),
            exp in proptest::option::of(-1000i64..1000),
            granted in proptest::sample::subsequence(SCOPES.to_vec(), 0..=4),
            required in proptest::sample::subsequence(SCOPES.to_vec(), 0..=4),
            sep in prop_oneof![Just(" "), Just(","), Just(" , ")],
            now in -1000i64..1000,
        ) {
            let base = 1_800_000_000i64;
            let t = |s: i64| Timestamp::from_second(base + s).unwrap();
            let spec = KeySpec {
                id: "k".into(),
                client: "c".into(),
                digest: digest("secret"),
                scopes: granted.iter().map(|s| s.to_string()).collect(),
                state: st,
                not_before: nb.map(t),
                expires_at: exp.map(t),
                deprecated_at: None,
                description: None,
                rate_limit: None,
                line: 1,
            };
            let file = KeyFile { keys: vec![spec], routes: Vec::new() };
            let source = RingSource { generation: 1, sha256: [0; 32], loaded_at: t(0) };
            let ring = KeyRing::build(&file, source, &UsageRegistry::default(), None);
            let cred = extract(Some("secret"), None).unwrap();
            let required_text = required.join(sep);
            let d = decide(&ring, &cred, t(now), &required_text);
            let should_allow = st != KeyState::Revoked
                && exp.is_none_or(|e| now < e)
                && nb.is_none_or(|n| now >= n)
                && required.iter().all(|r| granted.contains(r));
            prop_assert_eq!(d.is_allowed(), should_allow, "{:?}", d.reason());
            if st == KeyState::Revoked {
                prop_assert_eq!(d.reason(), Some(DenyReason::RevokedKey));
            }
        }

        /// Extraction never panics, and whatever it accepts is well formed.
        #[test]
        fn extraction_accepts_only_well_formed_keys(
            api in proptest::option::of(any::<String>()),
            auth in proptest::option::of(any::<String>()),
        ) {
            if let Ok(c) = extract(api.as_deref(), auth.as_deref()) {
                prop_assert!(is_well_formed(c.secret));
                prop_assert!(c.secret.len() <= MAX_KEY_LEN);
            }
        }

        /// From raw header bytes too, which may not be UTF-8: what is
        /// accepted is visible ASCII and is the bytes of the header it came
        /// from, and a token with any other byte is a malformed key.
        #[test]
        fn extraction_from_bytes_accepts_only_well_formed_keys(
            api in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)),
            auth in proptest::option::of(bearer()),
        ) {
            if let Ok(c) = extract_bytes(api.as_deref(), auth.as_deref()) {
                prop_assert!(is_well_formed(c.secret));
                let from = match c.header {
                    CredentialHeader::ApiKey => api.as_deref(),
                    CredentialHeader::Authorization => auth.as_deref(),
                };
                let from = from.unwrap_or_default();
                prop_assert!(c.secret.bytes().all(|b| (0x21..=0x7e).contains(&b)));
                prop_assert!(from.windows(c.secret.len()).any(|w| w == c.secret.as_bytes()));
            }
            if let (None, Some(auth)) = (&api, &auth) {
                let token = auth.trim_ascii();
                if token.len() > 6
                    && token[..6].eq_ignore_ascii_case(b"bearer")
                    && matches!(token[6], b' ' | b'\t')
                    && token[7..].trim_ascii().iter().any(|b| !(0x21..=0x7e).contains(b))
                    && auth.iter().all(|b| !matches!(b, b'\n' | b'\r' | b'\x0c'))
                {
                    prop_assert_eq!(
                        extract_bytes(None, Some(auth)),
                        Err(DenyReason::MalformedKey)
                    );
                }
            }
        }
    }
}
