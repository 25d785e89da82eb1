//! End to end through a real Envoy running the shipped `envoy/envoy.yaml`.

use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::util::{Envoy, KeyDir, Running, Secrets, Upstream, eventually, sha, standard_ring};

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
}

async fn get(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = reqwest::Client::new().get(envoy.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request through envoy");
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap(),
    }
}

#[tokio::test]
async fn every_decision_through_envoy() {
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("envoy.yaml", server.grpc.port(), upstream.addr.port()).await;
    decision_suite(&envoy).await;
    server.stop().await;
}

/// Every row of the decision table (but the 429s, see `abuse`), identity
/// headers, credential stripping, spoofing, Deprecation/Sunset and the
/// access log, through an Envoy running one of the shipped bootstraps in
/// front of keyward serving `standard_ring()`.
pub async fn decision_suite(envoy: &Envoy) {
    let long = "k".repeat(513);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let denials: Vec<Case> = vec![
        ("/v1/prices", vec![], 401, "missing_key"),
        (
            "/v1/prices",
            vec![("authorization", "Basic dXNlcjpwYXNz")],
            401,
            "missing_key",
        ),
        (
            "/v1/prices",
            vec![("x-api-key", long.as_str())],
            401,
            "malformed_key",
        ),
        (
            "/v1/prices",
            vec![("x-api-key", "two words")],
            401,
            "malformed_key",
        ),
        (
            "/v1/prices",
            vec![(
                "x-api-key",
                "kw_notAValidChecksum000000000000000000000000000000",
            )],
            401,
            "unknown_key",
        ),
        (
            "/v1/prices",
            vec![("x-api-key", "no-such-key")],
            401,
            "unknown_key",
        ),
        (
            "/v1/prices",
            vec![("authorization", "Bearer no-such-key")],
            401,
            "unknown_key",
        ),
        (
            "/v1/prices",
            vec![("x-api-key", Secrets::REVOKED)],
            401,
            "revoked_key",
        ),
        (
            "/v1/prices",
            vec![("x-api-key", Secrets::EXPIRED)],
            401,
            "expired_key",
        ),
        (
            "/v1/prices",
            vec![("x-api-key", Secrets::FUTURE)],
            401,
            "key_not_yet_valid",
        ),
        (
            "/trade/orders",
            vec![("x-api-key", Secrets::READER)],
            403,
            "insufficient_scope",
        ),
        // The bootstraps normalise paths, so a route cannot be dodged by
        // spelling its path differently.
        (
            "//trade/orders",
            vec![("x-api-key", Secrets::READER)],
            403,
            "insufficient_scope",
        ),
        (
            "/%74rade/orders",
            vec![("x-api-key", Secrets::READER)],
            403,
            "insufficient_scope",
        ),
    ];
    for (path, headers, status, error) in denials {
        let r = get(envoy, path, &headers).await;
        assert_eq!(r.status, status, "{error}: {}", r.body);
        assert_eq!(r.json(), serde_json::json!({ "error": error }));
        assert_eq!(r.headers["content-type"], "application/json", "{error}");
        assert_eq!(
            r.headers.contains_key("www-authenticate"),
            status == 401,
            "{error}"
        );
        assert!(!r.headers.contains_key("deprecation"));
    }

    // Allowed: the upstream sees keyward's identity headers, never the key,
    // and never a client's attempt to set x-keyward-* itself.
    let r = get(
        envoy,
        "/trade/orders",
        &[
            ("x-api-key", Secrets::ACTIVE),
            ("x-keyward-client", "mallory"),
            ("x-keyward-key-id", "forged"),
            ("x-keyward-role", "admin"),
            // Upstreams behind CGI, WSGI or Rack read this as x-keyward-client.
            ("x_keyward_client", "mallory"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.upstream_header("x_keyward_client"),
        None,
        "spoofed header removed, underscores and all"
    );
    assert_eq!(
        r.upstream_header("x-keyward-client").as_deref(),
        Some("acme")
    );
    assert_eq!(
        r.upstream_header("x-keyward-key-id").as_deref(),
        Some("acme-new")
    );
    assert_eq!(
        r.upstream_header("x-keyward-scopes").as_deref(),
        Some("read trade")
    );
    assert_eq!(r.upstream_header("x-api-key"), None, "credential stripped");
    assert_eq!(
        r.upstream_header("x-keyward-role"),
        None,
        "spoofed header removed"
    );
    assert!(!r.headers.contains_key("deprecation"));

    // Bearer credentials are stripped too.
    let bearer = format!("Bearer {}", Secrets::READER);
    let r = get(envoy, "/v1/prices", &[("authorization", bearer.as_str())]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.upstream_header("x-keyward-client").as_deref(),
        Some("globex")
    );
    assert_eq!(r.upstream_header("authorization"), None);

    // A deprecated key works and the client is told, in-band, to switch.
    let r = get(
        envoy,
        "/trade/orders",
        &[("x-api-key", Secrets::DEPRECATED)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.upstream_header("x-keyward-key-id").as_deref(),
        Some("acme-old")
    );
    let deprecation = r.headers["deprecation"].to_str().unwrap();
    assert!(
        deprecation.starts_with('@') && deprecation[1..].parse::<i64>().is_ok(),
        "{deprecation}"
    );
    let sunset = r.headers["sunset"].to_str().unwrap();
    assert!(sunset.ends_with(" GMT"), "{sunset}");

    // The health route needs no key.
    let r = get(envoy, "/healthz", &[]).await;
    assert_eq!(r.status, 200);

    // The access log carries keyward's dynamic metadata.
    eventually(
        Duration::from_secs(10),
        "access log with keyward metadata",
        || async {
            let log = envoy.log();
            (log.contains("client=acme key_id=acme-new")
                || log.contains(r#""key_id":"acme-new""#) && log.contains(r#""client":"acme""#))
            .then_some(())
        },
    )
    .await;
}

/// A key without scopes, on a route that requires none: keyward sets
/// `x-keyward-scopes` to the empty value, and that must still replace the
/// value a client sent, not leave it in place.
#[tokio::test]
async fn an_empty_scopes_header_replaces_a_spoofed_one() {
    let secret = "test-scopeless-key-0007";
    let ring = format!(
        "{}\n[[keys]]\nid = \"wayne-bot\"\nclient = \"wayne\"\nsha256 = \"{}\"\n",
        standard_ring(),
        sha(secret)
    );
    let keys = KeyDir::new(&ring);
    let server = Running::start(&keys.path).await;
    let upstream = Upstream::start().await;
    let bootstrap = Envoy::bootstrap("envoy.yaml", server.grpc.port(), upstream.addr.port());
    // Everything but /trade requires no scope.
    let config = bootstrap.replace("required_scopes: \"read\"", "required_scopes: \"\"");
    assert_ne!(config, bootstrap);
    let envoy = Envoy::start_config(&config).await;
    let r = get(
        &envoy,
        "/v1/prices",
        &[("x-api-key", secret), ("x-keyward-scopes", "admin trade")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.upstream_header("x-keyward-client").as_deref(),
        Some("wayne")
    );
    assert_eq!(r.upstream_header("x-keyward-scopes").as_deref(), Some(""));
    server.stop().await;
}

#[tokio::test]
async fn envoy_fails_closed_when_keyward_is_down() {
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("envoy.yaml", server.grpc.port(), upstream.addr.port()).await;

    let r = get(&envoy, "/v1/prices", &[("x-api-key", Secrets::ACTIVE)]).await;
    assert_eq!(r.status, 200);
    server.stop().await;

    let r = eventually(Duration::from_secs(10), "503 from envoy", || async {
        let r = get(&envoy, "/v1/prices", &[("x-api-key", Secrets::ACTIVE)]).await;
        (r.status != 200).then_some(r)
    })
    .await;
    assert_eq!(r.status, 503, "fail closed: {}", r.body);
    assert!(r.upstream_header_absent(), "no request reached the app");
}

impl Reply {
    fn upstream_header_absent(&self) -> bool {
        !self.body.contains("\"headers\"")
    }
}
