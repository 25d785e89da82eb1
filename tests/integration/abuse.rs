//! Rate limits and brute-force lockout against the real server, and through Envoy.

use std::collections::HashMap;
use std::time::Duration;

use keyward::lockout::LockoutConfig;
use keyward::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyward::server::Config;
use tonic::transport::Channel;

use crate::util::{Envoy, KeyDir, Running, Upstream, eventually, sha};

fn key(id: &str, secret: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nclient = \"c-{id}\"\nsha256 = \"{}\"\n{extra}\n",
        sha(secret)
    )
}

#[derive(Debug)]
struct Reply {
    status: u16,
    error: Option<String>,
    headers: HashMap<String, String>,
}

async fn check(c: &mut AuthorizationClient<Channel>, secret: &str, source: &str) -> Reply {
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: source.to_owned(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    headers: HashMap::from([("x-api-key".to_owned(), secret.to_owned())]),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    };
    let resp = c.check(req).await.unwrap().into_inner();
    let pairs =
        |v: &[keyward::pb::envoy::config::core::v3::HeaderValueOption]| -> HashMap<String, String> {
            v.iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect()
        };
    match resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => Reply {
            status: 200,
            error: None,
            headers: pairs(&ok.response_headers_to_add),
        },
        Some(HttpResponse::DeniedResponse(d)) => Reply {
            status: u16::try_from(d.status.unwrap().code).unwrap(),
            error: Some(d.body),
            headers: pairs(&d.headers),
        },
        None => panic!("empty response"),
    }
}

async fn metrics(server: &Running) -> String {
    reqwest::get(format!("http://{}/metrics", server.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_key_at_its_limit_gets_429_and_recovers() {
    let keys = KeyDir::new(
        &(key(
            "limited",
            "s-limited",
            "rate_limit = { requests = 2, per = \"1s\", burst = 3 }",
        ) + &key("free", "s-free", "")),
    );
    let server = Running::start(&keys.path).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();

    for remaining in [2, 1, 0] {
        let r = check(&mut c, "s-limited", "192.0.2.10").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.headers["ratelimit-policy"], r#""key";q=3;w=1"#);
        assert!(
            r.headers["ratelimit"].starts_with(&format!(r#""key";r={remaining};t="#)),
            "{r:?}"
        );
    }
    let r = check(&mut c, "s-limited", "192.0.2.10").await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.error.as_deref(), Some(r#"{"error":"rate_limited"}"#));
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        r.headers["ratelimit"].starts_with(r#""key";r=0;t="#),
        "{r:?}"
    );
    assert_eq!(r.headers["ratelimit-policy"], r#""key";q=3;w=1"#);

    // Keys without a limit are untouched and carry no rate-limit headers.
    let r = check(&mut c, "s-free", "192.0.2.10").await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("ratelimit"));

    // The budget refills at 2 per second.
    eventually(Duration::from_secs(3), "budget to refill", || {
        let mut c = c.clone();
        async move { (check(&mut c, "s-limited", "192.0.2.10").await.status == 200).then_some(()) }
    })
    .await;
    let m = metrics(&server).await;
    assert!(
        m.lines().any(|l| l
            .starts_with(r#"keyward_rate_limited_total{key_id="limited",client="c-limited"} "#)
            && !l.ends_with(" 0")),
        "{m}"
    );
    server.stop().await;
}

#[tokio::test]
async fn budgets_survive_unrelated_reloads_and_reset_when_the_limit_changes() {
    let limited = |per: &str| {
        key(
            "limited",
            "s-limited",
            &format!("rate_limit = {{ requests = 1, per = \"{per}\" }}"),
        )
    };
    let keys = KeyDir::new(&limited("1h"));
    let server = Running::start(&keys.path).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    assert_eq!(check(&mut c, "s-limited", "192.0.2.10").await.status, 200);
    assert_eq!(check(&mut c, "s-limited", "192.0.2.10").await.status, 429);

    let generation = |n: u64| {
        let admin = server.admin;
        move || async move {
            let v: serde_json::Value = reqwest::get(format!("http://{admin}/ring"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["generation"] == n).then_some(())
        }
    };
    std::fs::write(&keys.path, limited("1h") + &key("other", "s-other", "")).unwrap();
    eventually(Duration::from_secs(5), "generation 2", generation(2)).await;
    assert_eq!(
        check(&mut c, "s-limited", "192.0.2.10").await.status,
        429,
        "budget kept"
    );

    std::fs::write(&keys.path, limited("2h") + &key("other", "s-other", "")).unwrap();
    eventually(Duration::from_secs(5), "generation 3", generation(3)).await;
    assert_eq!(
        check(&mut c, "s-limited", "192.0.2.10").await.status,
        200,
        "new limit, new budget"
    );
    server.stop().await;
}

#[tokio::test]
async fn lockout_triggers_at_the_threshold_and_expires() {
    let keys = KeyDir::new(&key("good", "s-good", ""));
    let mut config = Config::new(&keys.path);
    config.lockout = LockoutConfig {
        threshold: 5,
        window: Duration::from_secs(60),
        duration: Duration::from_secs(2),
        max_sources: 1000,
        ipv6_prefix: 64,
    };
    let server = Running::start_with(config).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    let attacker = "198.51.100.66";

    for i in 0..4 {
        let r = check(&mut c, &format!("guess-{i}"), attacker).await;
        assert_eq!(r.error.as_deref(), Some(r#"{"error":"unknown_key"}"#));
    }
    assert_eq!(
        check(&mut c, "s-good", attacker).await.status,
        200,
        "below the threshold"
    );
    let r = check(&mut c, "with space", attacker).await;
    assert_eq!(
        r.error.as_deref(),
        Some(r#"{"error":"malformed_key"}"#),
        "the 5th failure"
    );

    // Locked out: even a valid key is refused, before any lookup.
    let r = check(&mut c, "s-good", attacker).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.error.as_deref(), Some(r#"{"error":"too_many_failures"}"#));
    let retry: u64 = r.headers["retry-after"].parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Other sources are untouched.
    assert_eq!(check(&mut c, "s-good", "198.51.100.67").await.status, 200);

    let v: serde_json::Value = reqwest::get(format!("http://{}/lockouts", server.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["lockouts"][0]["source"], attacker, "{v}");
    let m = metrics(&server).await;
    assert!(m.lines().any(|l| l == "keyward_lockouts_total 1"), "{m}");
    assert!(m.lines().any(|l| l == "keyward_lockouts_active 1"), "{m}");

    // After the cool-down the valid key works again from that source.
    eventually(Duration::from_secs(5), "lockout to expire", || {
        let mut c = c.clone();
        async move { (check(&mut c, "s-good", attacker).await.status == 200).then_some(()) }
    })
    .await;
    assert!(
        metrics(&server)
            .await
            .lines()
            .any(|l| l == "keyward_lockouts_active 0")
    );
    server.stop().await;
}

#[tokio::test]
async fn an_operator_can_lift_a_lockout() {
    let keys = KeyDir::new(&key("good", "s-good", ""));
    let mut config = Config::new(&keys.path);
    config.lockout = LockoutConfig {
        threshold: 2,
        window: Duration::from_secs(60),
        duration: Duration::from_secs(3600),
        max_sources: 1000,
        ipv6_prefix: 64,
    };
    let server = Running::start_with(config).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    check(&mut c, "x", "2001:db8::7").await;
    check(&mut c, "y", "2001:db8::7").await;
    assert_eq!(check(&mut c, "s-good", "2001:db8::7").await.status, 429);
    let http = reqwest::Client::new();
    let url = |s: &str| format!("http://{}/lockouts/{s}", server.admin);
    assert_eq!(
        http.delete(url("2001:db8::7"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(check(&mut c, "s-good", "2001:db8::7").await.status, 200);
    assert_eq!(
        http.delete(url("2001:db8::7"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        http.delete(url("not-an-ip")).send().await.unwrap().status(),
        400
    );
    server.stop().await;
}

/// The two 429 rows of the decision table, as the client sees them through Envoy.
#[tokio::test]
async fn rate_limited_and_too_many_failures_through_envoy() {
    let keys = KeyDir::new(
        &(key(
            "limited",
            "s-limited",
            "scopes = [\"read\"]\nrate_limit = { requests = 1, per = \"1h\" }",
        ) + &key("good", "s-good", "scopes = [\"read\"]")),
    );
    let mut config = Config::new(&keys.path);
    config.lockout.threshold = 3;
    let server = Running::start_with(config).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("envoy.yaml", server.grpc.port(), upstream.addr.port()).await;
    let http = reqwest::Client::new();
    let get = |secret: &'static str| {
        let req = http
            .get(envoy.url("/v1/prices"))
            .header("x-api-key", secret);
        async move { req.send().await.unwrap() }
    };

    let ok = get("s-limited").await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["ratelimit-policy"], r#""key";q=1;w=3600"#);
    let limited = get("s-limited").await;
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    assert!(
        limited.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with(r#""key";r=0;"#)
    );
    assert_eq!(limited.text().await.unwrap(), r#"{"error":"rate_limited"}"#);

    for _ in 0..3 {
        assert_eq!(get("wrong").await.status(), 401);
    }
    let locked = get("s-good").await;
    assert_eq!(locked.status(), 429);
    assert!(locked.headers().contains_key("retry-after"));
    assert_eq!(
        locked.text().await.unwrap(),
        r#"{"error":"too_many_failures"}"#
    );
    server.stop().await;
}
