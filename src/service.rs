//! The `envoy.service.auth.v3.Authorization` gRPC service.
//!
//! Glue only: read the headers and route context out of the CheckRequest,
//! [`extract`] the credential, [`decide`] against the current ring, and turn the
//! [`Decision`] into a CheckResponse in exactly one place ([`respond`]).
//! A denial is a normal response; `Err(Status)` is never returned for one.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use prost_types::{Struct, Value, value::Kind};
use tonic::{Request, Response, Status};

use crate::decide::{
    API_KEY_HEADER, AUTHORIZATION_HEADER, CredentialHeader, Decision, DenyReason, decide, extract,
};
use crate::limit::Quota;
use crate::pb::envoy::config::core::v3::address::Address;
use crate::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use crate::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    attribute_context::HttpRequest, authorization_server::Authorization,
    check_response::HttpResponse,
};
use crate::pb::envoy::r#type::v3::HttpStatus;
use crate::pb::google::rpc;
use crate::ring::RingHandle;
use crate::stats::CheckStats;

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

    fn log_decision(&self, decision: &Decision<'_>, attrs: Option<&AttributeContext>) {
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
        let source = source_address(attrs)
            .map(|a| match a {
                Address::SocketAddress(s) => s.address.as_str(),
                Address::Pipe(p) => p.path.as_str(),
            })
            .unwrap_or("");
        match decision {
            Decision::Allow { key: k, .. } => tracing::info!(
                target: "keyward::decision",
                decision = "allowed",
                key_id = &*k.id,
                client = &*k.client,
                state = k.state.as_str(),
                source,
            ),
            Decision::Deny { reason, key, .. } => tracing::info!(
                target: "keyward::decision",
                decision = "denied",
                reason = reason.code(),
                key_id = key.map(|k| &*k.id),
                client = key.map(|k| &*k.client),
                source,
            ),
        }
    }

    /// Decides one request at `now` and builds its response (no network involved).
    pub fn check_at(&self, req: &CheckRequest, now: Timestamp) -> CheckResponse {
        let started = std::time::Instant::now();
        let attrs = req.attributes.as_ref();
        let http = attrs
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let headers = Headers(http);

        let lockout = &self.shared.lockout;
        let now_ns = u64::try_from(now.as_nanosecond()).unwrap_or(0);
        let source = || {
            let peer = source_address(attrs).and_then(|a| match a {
                Address::SocketAddress(s) => Some(s.address.as_str()),
                Address::Pipe(_) => None,
            });
            crate::lockout::client_address(peer, headers.get("x-forwarded-for"), self.xff_hops)
        };
        // A locked-out source is denied before any digest work. While no
        // source is locked out this is a single atomic load.
        let locked_for = if lockout.any_locked() {
            source().and_then(|ip| lockout.locked_for(ip, now_ns))
        } else {
            None
        };
        let cred = extract(
            headers.get(API_KEY_HEADER),
            headers.get(AUTHORIZATION_HEADER),
        );
        let ring = self.shared.ring.load();
        // Envoy's per-route `required_scopes` wins; the key file's route rules
        // apply when Envoy sends none (Istio cannot send any).
        let required = match attrs.and_then(|a| a.context_extensions.get(REQUIRED_SCOPES)) {
            Some(s) => s.as_str(),
            None => http
                .and_then(|h| ring.route_scopes(&h.method, &h.path))
                .unwrap_or(""),
        };
        let decision = match (&cred, locked_for) {
            (_, Some(retry_after)) => Decision::Deny {
                reason: DenyReason::TooManyFailures,
                key: None,
                quota: None,
                retry_after,
            },
            (Ok(c), None) => decide(&ring, c, now, required),
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
        self.log_decision(&decision, attrs);
        let response = respond(&decision, cred.ok().map(|c| c.header), &headers);
        self.shared.stats.latency.observe(started.elapsed());
        response
    }
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(
            self.check_at(request.get_ref(), Timestamp::now()),
        ))
    }
}

/// The downstream peer's address as Envoy reports it.
fn source_address(attrs: Option<&AttributeContext>) -> Option<&Address> {
    attrs?.source.as_ref()?.address.as_ref()?.address.as_ref()
}

/// Read access to the request headers, whichever way Envoy encoded them.
#[derive(Clone, Copy)]
pub struct Headers<'a>(pub Option<&'a HttpRequest>);

impl<'a> Headers<'a> {
    /// The value of header `name` (lower-case).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        let http = self.0?;
        if let Some(v) = http.headers.get(name) {
            return Some(v.as_str());
        }
        let map = http.header_map.as_ref()?;
        map.headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name))
            .map(raw_header_value)
    }

    /// Every header name.
    pub fn names(&self) -> impl Iterator<Item = &'a str> + 'a {
        let http = self.0;
        let plain = http
            .into_iter()
            .flat_map(|h| h.headers.keys().map(String::as_str));
        let raw = http
            .and_then(|h| h.header_map.as_ref())
            .into_iter()
            .flat_map(|m| m.headers.iter().map(|h| h.key.as_str()));
        plain.chain(raw)
    }
}

/// A raw header's value: `raw_value` when set (Envoy's raw encoding), else `value`.
/// Invalid UTF-8 yields a value that `extract` rejects as malformed.
fn raw_header_value(h: &HeaderValue) -> &str {
    if h.raw_value.is_empty() {
        h.value.as_str()
    } else {
        std::str::from_utf8(&h.raw_value).unwrap_or("\u{fffd}")
    }
}

fn header(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: action as i32,
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// Turns a decision into the CheckResponse Envoy acts on. The only place
/// responses are made.
pub fn respond(
    decision: &Decision<'_>,
    carrier: Option<CredentialHeader>,
    headers: &Headers<'_>,
) -> CheckResponse {
    match decision {
        Decision::Allow { key, quota } => {
            let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd;
            let mut headers_to_remove: Vec<String> = Vec::with_capacity(1);
            if let Some(c) = carrier {
                headers_to_remove.push(c.name().to_owned());
            }
            // Envoy applies removals after it sets `headers`, so list only the
            // client-sent x-keyward-* names that we do not set ourselves.
            for name in headers.names() {
                if name.len() > OWN_PREFIX.len()
                    && name[..OWN_PREFIX.len()].eq_ignore_ascii_case(OWN_PREFIX)
                    && ![CLIENT_HEADER, KEY_ID_HEADER, SCOPES_HEADER]
                        .iter()
                        .any(|own| own.eq_ignore_ascii_case(name))
                {
                    let lower = name.to_ascii_lowercase();
                    if !headers_to_remove.contains(&lower) {
                        headers_to_remove.push(lower);
                    }
                }
            }
            let mut response_headers_to_add = Vec::new();
            if let Some(q) = quota {
                push_quota(&mut response_headers_to_add, q);
            }
            if let Some(dep) = &key.deprecation_header {
                response_headers_to_add.push(header("deprecation", dep, overwrite));
                if let Some(sunset) = &key.sunset_header {
                    response_headers_to_add.push(header("sunset", sunset, overwrite));
                }
            }
            let mut metadata = BTreeMap::new();
            metadata.insert("client".to_owned(), string_value(&key.client));
            metadata.insert("key_id".to_owned(), string_value(&key.id));
            metadata.insert("scopes".to_owned(), string_value(&key.scopes_joined));
            CheckResponse {
                status: Some(rpc::Status {
                    code: 0,
                    message: String::new(),
                }),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![
                        header(CLIENT_HEADER, &key.client, overwrite),
                        header(KEY_ID_HEADER, &key.id, overwrite),
                        header(SCOPES_HEADER, &key.scopes_joined, overwrite),
                    ],
                    headers_to_remove,
                    response_headers_to_add,
                })),
                dynamic_metadata: Some(Struct { fields: metadata }),
            }
        }
        Decision::Deny {
            reason,
            quota,
            retry_after,
            ..
        } => denied(*reason, quota.as_ref(), *retry_after),
    }
}

/// The IETF `RateLimit-Policy` and `RateLimit` headers (structured fields,
/// draft-ietf-httpapi-ratelimit-headers): quota `q` per window `w` seconds,
/// `r` requests remaining, `t` seconds until the budget is full again.
fn push_quota(headers: &mut Vec<HeaderValueOption>, q: &Quota) {
    let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd;
    headers.push(header(
        "ratelimit-policy",
        &format!("\"key\";q={};w={}", q.limit, q.window_secs),
        overwrite,
    ));
    headers.push(header(
        "ratelimit",
        &format!("\"key\";r={};t={}", q.remaining, q.reset_secs),
        overwrite,
    ));
}

/// The response for a denial; `quota` and `retry_after` (seconds, 0 for none)
/// add the rate-limit headers.
pub fn denied(reason: DenyReason, quota: Option<&Quota>, retry_after: u64) -> CheckResponse {
    let status = reason.http_status();
    let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd;
    let mut headers = vec![header("content-type", "application/json", overwrite)];
    if let Some(q) = quota {
        push_quota(&mut headers, q);
    }
    if retry_after > 0 {
        headers.push(header("retry-after", &retry_after.to_string(), overwrite));
    }
    if status == 401 {
        let challenge = if reason == DenyReason::MissingKey {
            r#"Bearer realm="keyward""#
        } else {
            r#"Bearer realm="keyward", error="invalid_token""#
        };
        headers.push(header("www-authenticate", challenge, overwrite));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: reason.grpc_code(),
            message: reason.code().to_owned(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body: format!("{{\"error\":\"{}\"}}", reason.code()),
        })),
        dynamic_metadata: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::{ParseOptions, parse_str};
    use crate::pb::envoy::config::core::v3::HeaderMap;
    use crate::pb::envoy::service::auth::v3::attribute_context::Request as AttrRequest;
    use crate::ring::{KeyRing, RingSource, UsageRegistry};
    use std::sync::atomic::Ordering;

    fn service() -> AuthzService {
        let text = format!(
            "[[keys]]\nid = \"k1\"\nclient = \"acme\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
            hex::encode(crate::decide::digest("secret-1"))
        );
        let file = parse_str(&text, ParseOptions::default()).unwrap();
        let usage = UsageRegistry::default();
        let source = RingSource {
            generation: 1,
            sha256: [0; 32],
            loaded_at: Timestamp::now(),
        };
        let ring = KeyRing::build(&file, source, &usage, None);
        AuthzService::new(Arc::new(Shared {
            ring: RingHandle::new(ring),
            usage,
            stats: CheckStats::default(),
            reloads: Default::default(),
            lockout: Default::default(),
        }))
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
        let ring = svc.shared.ring.load();
        let usage = &ring.by_id("k1").unwrap().usage;
        assert_eq!(usage.requests.load(Ordering::Relaxed), 3);
        assert_eq!(
            usage.last_used.load(Ordering::Relaxed),
            now.as_second() as u64
        );
        assert_eq!(
            usage.denied[DenyReason::InsufficientScope.key_index().unwrap()]
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn denials_have_the_contract_shape() {
        for reason in DenyReason::ALL {
            let resp = denied(reason, None, 0);
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
