//! Our trimmed protos decode what a real Envoy 1.40 sends.

use std::time::Duration;

use keyward::pb::envoy::config::core::v3::address;
use keyward::pb::envoy::service::auth::v3::CheckRequest;
use prost::Message;

use crate::util::{CaptureServer, Envoy, Upstream, repo};

const FIXTURE: &str = "tests/data/envoy-1.40-check-request.bin";

fn assert_is_the_captured_request(req: &CheckRequest) {
    let attrs = req.attributes.as_ref().expect("attributes");
    let http = attrs
        .request
        .as_ref()
        .and_then(|r| r.http.as_ref())
        .expect("http request");
    assert_eq!(http.method, "POST");
    assert_eq!(http.path, "/trade/orders?side=buy");
    assert_eq!(http.protocol, "HTTP/1.1");
    assert_eq!(
        http.headers.get("x-api-key").map(String::as_str),
        Some("captured-key-0123")
    );
    assert_eq!(
        http.headers.get("user-agent").map(String::as_str),
        Some("keyward-capture/1")
    );
    assert_eq!(
        http.headers.get(":method").map(String::as_str),
        Some("POST")
    );
    assert_eq!(
        http.headers.get(":path").map(String::as_str),
        Some("/trade/orders?side=buy")
    );
    assert!(
        http.headers.contains_key("x-request-id"),
        "{:?}",
        http.headers.keys()
    );
    // Repeated headers arrive joined with a comma.
    assert_eq!(
        http.headers.get("x-repeated").map(String::as_str),
        Some("one,two")
    );
    assert_eq!(
        attrs
            .context_extensions
            .get("required_scopes")
            .map(String::as_str),
        Some("trade")
    );
    let source = attrs
        .source
        .as_ref()
        .and_then(|p| p.address.as_ref())
        .and_then(|a| a.address.as_ref());
    match source {
        Some(address::Address::SocketAddress(s)) => assert_eq!(s.address, "127.0.0.1"),
        other => panic!("source address: {other:?}"),
    }
}

/// The committed capture (from Envoy 1.40) decodes with our protos.
#[test]
fn committed_envoy_capture_decodes() {
    let bytes = std::fs::read(repo().join(FIXTURE)).expect("fixture");
    let req = CheckRequest::decode(bytes.as_slice()).expect("decodes");
    assert_is_the_captured_request(&req);
}

/// A fresh capture from the Envoy under test decodes the same way. Set
/// KEYWARD_UPDATE_FIXTURES=1 to refresh the committed capture.
#[tokio::test]
async fn live_envoy_check_request_decodes() {
    let mut capture = CaptureServer::start().await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("envoy.yaml", capture.addr.port(), upstream.addr.port()).await;
    let resp = reqwest::Client::new()
        .post(envoy.url("/trade/orders?side=buy"))
        .header("x-api-key", "captured-key-0123")
        .header("user-agent", "keyward-capture/1")
        .header("x-repeated", "one")
        .header("x-repeated", "two")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", envoy.log());
    let (path, bytes) = tokio::time::timeout(Duration::from_secs(10), capture.captured.recv())
        .await
        .expect("captured a Check call")
        .unwrap();
    assert_eq!(path, "/envoy.service.auth.v3.Authorization/Check");
    let req = CheckRequest::decode(bytes.as_slice()).expect("decodes");
    assert_is_the_captured_request(&req);
    if std::env::var_os("KEYWARD_UPDATE_FIXTURES").is_some() {
        std::fs::write(repo().join(FIXTURE), &bytes).unwrap();
    }
}
