//! The real server on port 0, called with a tonic client.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use prost_types::value::Kind;

use crate::util::{KeyDir, Running, Secrets, eventually, standard_ring};

fn request(headers: &[(&str, &str)], required_scopes: Option<&str>) -> CheckRequest {
    let mut ctx = HashMap::new();
    if let Some(s) = required_scopes {
        ctx.insert("required_scopes".to_owned(), s.to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/v1/orders".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    ..Default::default()
                }),
            }),
            context_extensions: ctx,
            ..Default::default()
        }),
    }
}

fn denial(resp: &CheckResponse) -> (i32, u16, String, HashMap<String, String>) {
    let Some(HttpResponse::DeniedResponse(d)) = &resp.http_response else {
        panic!("expected a denial, got {resp:?}");
    };
    let headers = d
        .headers
        .iter()
        .map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.clone(), h.value.clone())
        })
        .collect();
    (
        resp.status.as_ref().unwrap().code,
        u16::try_from(d.status.as_ref().unwrap().code).unwrap(),
        d.body.clone(),
        headers,
    )
}

#[tokio::test]
async fn every_decision_over_grpc() {
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let mut client = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();

    let long = "k".repeat(513);
    type Case<'a> = (Vec<(&'a str, &'a str)>, Option<&'a str>, i32, u16, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], None, 16, 401, "missing_key"),
        (
            vec![("authorization", "Basic dXNlcjpwYXNz")],
            None,
            16,
            401,
            "missing_key",
        ),
        (
            vec![("x-api-key", long.as_str())],
            None,
            16,
            401,
            "malformed_key",
        ),
        (
            vec![("x-api-key", "with space")],
            None,
            16,
            401,
            "malformed_key",
        ),
        (
            vec![("x-api-key", "not-a-key")],
            None,
            16,
            401,
            "unknown_key",
        ),
        (
            vec![("x-api-key", Secrets::REVOKED)],
            None,
            16,
            401,
            "revoked_key",
        ),
        (
            vec![("x-api-key", Secrets::EXPIRED)],
            None,
            16,
            401,
            "expired_key",
        ),
        (
            vec![("x-api-key", Secrets::FUTURE)],
            None,
            16,
            401,
            "key_not_yet_valid",
        ),
        (
            vec![("x-api-key", Secrets::READER)],
            Some("trade"),
            7,
            403,
            "insufficient_scope",
        ),
        (
            vec![("authorization", "Bearer nope")],
            None,
            16,
            401,
            "unknown_key",
        ),
    ];
    for (headers, scopes, grpc_code, http, error) in cases {
        let resp = client
            .check(request(&headers, scopes))
            .await
            .expect("denials are responses, not RPC errors")
            .into_inner();
        let (code, status, body, hdrs) = denial(&resp);
        assert_eq!((code, status), (grpc_code, http), "{error}");
        assert_eq!(body, format!("{{\"error\":\"{error}\"}}"));
        assert_eq!(hdrs["content-type"], "application/json");
        assert_eq!(
            hdrs.contains_key("www-authenticate"),
            http == 401,
            "{error}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn allowed_requests_carry_identity_and_strip_credentials() {
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let mut client = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();

    let bearer = format!("bearer {}", Secrets::ACTIVE);
    let resp = client
        .check(request(
            &[
                ("authorization", bearer.as_str()),
                ("x-keyward-client", "spoofed"),
                ("x-keyward-admin", "true"),
                ("user-agent", "test"),
            ],
            Some("read trade"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status.as_ref().unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = &resp.http_response else {
        panic!("expected OK, got {resp:?}");
    };
    let set: HashMap<_, _> = ok
        .headers
        .iter()
        .map(|h| {
            let v = h.header.as_ref().unwrap();
            assert_eq!(
                h.append_action, 2,
                "identity headers overwrite, never append"
            );
            (v.key.as_str(), v.value.as_str())
        })
        .collect();
    assert_eq!(set["x-keyward-client"], "acme");
    assert_eq!(set["x-keyward-key-id"], "acme-new");
    assert_eq!(set["x-keyward-scopes"], "read trade");
    let mut removed = ok.headers_to_remove.clone();
    removed.sort();
    assert_eq!(removed, vec!["authorization", "x-keyward-admin"]);
    assert!(
        ok.response_headers_to_add.is_empty(),
        "active keys get no deprecation headers"
    );
    let md = &resp.dynamic_metadata.as_ref().unwrap().fields;
    let s = |k: &str| match &md[k].kind {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (s("client"), s("key_id"), s("scopes")),
        ("acme".into(), "acme-new".into(), "read trade".into())
    );

    // A deprecated key still works and tells the client it must switch.
    let resp = client
        .check(request(&[("x-api-key", Secrets::DEPRECATED)], Some("read")))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = &resp.http_response else {
        panic!("deprecated keys are allowed: {resp:?}");
    };
    assert_eq!(ok.headers_to_remove, vec!["x-api-key"]);
    let added: HashMap<_, _> = ok
        .response_headers_to_add
        .iter()
        .map(|h| {
            let v = h.header.as_ref().unwrap();
            (v.key.as_str(), v.value.as_str())
        })
        .collect();
    assert!(added["deprecation"].starts_with('@'), "{added:?}");
    assert!(added["sunset"].ends_with(" GMT"), "{added:?}");
    server.stop().await;
}

#[tokio::test]
async fn health_and_admin_endpoints() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, 1, "SERVING for {service:?}");
    }
    // A health request is a service name: one of 8 KiB is refused (tonic's
    // OUT_OF_RANGE for a message over the limit), and the channel goes on.
    let err = health
        .check(HealthCheckRequest {
            service: "x".repeat(8192),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    let again = health.check(HealthCheckRequest::default()).await.unwrap();
    assert_eq!(again.into_inner().status, 1);
    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{}/healthz", server.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("http://{}/readyz", server.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("generation 1 with 6 keys"));
    server.stop().await;
}

#[tokio::test]
async fn shutdown_drains_and_closes_listeners() {
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let addr = server.grpc;
    let mut client = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    client.check(request(&[], None)).await.unwrap();
    server.stop().await;
    eventually(Duration::from_secs(5), "listener closed", || async move {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_health_watcher_learns_of_shutdown_before_the_connections_close() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(server.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.stop());
    let next = tokio::time::timeout(Duration::from_secs(2), watch.message())
        .await
        .expect("NOT_SERVING within 2 s of the shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The watcher goes away; the drain ends with it, well before its limit.
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stopped within 5 s")
        .unwrap();
}

fn keyward() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
}

#[test]
fn serve_refuses_a_missing_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = keyward()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--keys",
        ])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: cannot read key file", missing.display())),
        "{err}"
    );
}

#[test]
fn serve_refuses_an_invalid_key_file_naming_file_and_line() {
    let keys = KeyDir::new("[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"xyz\"\n");
    let out = keyward()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--keys",
        ])
        .arg(&keys.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:4:10: `sha256` must be 64 hexadecimal digits",
            keys.path.display()
        )),
        "{err}"
    );
}

#[test]
fn serve_refuses_an_empty_ring_unless_allowed() {
    let keys = KeyDir::new("# all keys were removed\n");
    let out = keyward()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--keys",
        ])
        .arg(&keys.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-empty"));
}

#[test]
fn serve_exits_cleanly_on_sigterm() {
    let keys = KeyDir::new(&standard_ring());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("keyward.sock");
    let child = keyward()
        .args(["serve", "--admin", "127.0.0.1:0", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--keys")
        .arg(&keys.path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = crate::util::ChildGuard(child);
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "socket never appeared"
        );
        if let Ok(Some(s)) = child.0.try_wait() {
            panic!("keyward exited early: {s}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let start = std::time::Instant::now();
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "keyward did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit}");
}

/// What one raw HTTP/2 call to the gRPC port got back.
#[derive(Debug)]
struct RawReply {
    http_status: u16,
    /// `grpc-status`, from the headers (trailers-only) or the trailers.
    grpc_status: Option<String>,
    /// `grpc-accept-encoding`, from the headers.
    accept_encoding: Option<String>,
    /// `content-length`, from the headers.
    content_length: Option<String>,
    body: Vec<u8>,
}

/// One Check call over a bare HTTP/2 connection, its body sent as the given
/// DATA frames: the edges a gRPC client library never produces.
async fn raw_check(
    addr: std::net::SocketAddr,
    method: &str,
    headers: &[(&str, &str)],
    frames: Vec<bytes::Bytes>,
) -> RawReply {
    raw_check_with_trailers(addr, method, headers, frames, None).await
}

/// [`raw_check`], the request ending with `trailers` (a HEADERS frame after
/// the DATA frames) when given.
async fn raw_check_with_trailers(
    addr: std::net::SocketAddr,
    method: &str,
    headers: &[(&str, &str)],
    frames: Vec<bytes::Bytes>,
    trailers: Option<hyper::HeaderMap>,
) -> RawReply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!(
            "http://{addr}/envoy.service.auth.v3.Authorization/Check"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut send) = client
        .send_request(
            request.body(()).unwrap(),
            frames.is_empty() && trailers.is_none(),
        )
        .unwrap();
    let last = frames.len();
    for (i, frame) in frames.into_iter().enumerate() {
        // The server may answer (and reset the stream) before taking all of
        // an oversized body: a refused send is not this test's concern.
        if send
            .send_data(frame, i + 1 == last && trailers.is_none())
            .is_err()
        {
            break;
        }
    }
    if let Some(trailers) = trailers {
        let _ = send.send_trailers(trailers);
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("no response within 10 s")
        .unwrap();
    let http_status = response.status().as_u16();
    let mut grpc_status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let accept_encoding = response
        .headers()
        .get("grpc-accept-encoding")
        .map(|v| v.to_str().unwrap().to_owned());
    let content_length = response
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut stream = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk.unwrap();
        let _ = stream.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    if let Some(trailers) = stream.trailers().await.unwrap() {
        grpc_status = trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
    }
    RawReply {
        http_status,
        grpc_status,
        accept_encoding,
        content_length,
        body,
    }
}

#[tokio::test]
async fn raw_http2_edges_get_grpc_errors_or_answers() {
    use prost::Message as _;
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let framed = keyward::wire::frame_message(
        &request(&[("x-api-key", Secrets::ACTIVE)], None).encode_to_vec(),
    );
    let answer = |reply: &RawReply| {
        assert_eq!(reply.http_status, 200, "{reply:?}");
        assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
        let message = keyward::wire::unframe(&reply.body).expect("one gRPC message");
        CheckResponse::decode(message).expect("a CheckResponse")
    };

    // The body in one DATA frame, then split over three (at the prefix and
    // mid-message): the same allowed answer.
    let reply = raw_check(server.grpc, "POST", &[], vec![framed.clone()]).await;
    // gRPC frames its messages itself: an answer carries no `content-length`
    // (hyper would add one, at a cost to every answer, if `Reply` told it the
    // body's size).
    assert_eq!(reply.content_length, None, "{reply:?}");
    let whole = answer(&reply);
    assert!(matches!(
        whole.http_response,
        Some(HttpResponse::OkResponse(_))
    ));
    let pieces = vec![
        framed.slice(..3),
        framed.slice(3..framed.len() / 2),
        framed.slice(framed.len() / 2..),
    ];
    let split = answer(&raw_check(server.grpc, "POST", &[], pieces).await);
    assert_eq!(split, whole);
    // The body, then trailers: the stream ends with them, not with the data.
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("x-trailer", hyper::header::HeaderValue::from_static("1"));
    let trailed = raw_check_with_trailers(
        server.grpc,
        "POST",
        &[],
        vec![framed.clone()],
        Some(trailers),
    )
    .await;
    assert_eq!(answer(&trailed), whole);

    // A message with its compressed flag set (whatever it holds).
    let mut compressed = framed.to_vec();
    compressed[0] = 1;
    let compressed = bytes::Bytes::from(compressed);

    // gRPC errors, trailers-only: status and code.
    // What is sent, its extra headers, its DATA frames, the grpc-status wanted.
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, &'a str)],
        Vec<bytes::Bytes>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "compressed",
            &[("grpc-encoding", "gzip")],
            vec![compressed.clone()],
            "12",
        ),
        (
            "a truncated compressed frame",
            &[("grpc-encoding", "gzip")],
            vec![compressed.slice(..compressed.len() - 1)],
            "3",
        ),
        (
            "a compressed flag of 2",
            &[],
            vec![{
                let mut two = framed.to_vec();
                two[0] = 2;
                bytes::Bytes::from(two)
            }],
            "3",
        ),
        ("no body", &[], vec![], "3"),
        (
            "a truncated frame",
            &[],
            vec![framed.slice(..framed.len() - 1)],
            "3",
        ),
        (
            "not protobuf",
            &[],
            vec![keyward::wire::frame_message(&[0xff, 0xff, 0xff])],
            "3",
        ),
        (
            "over 4 MiB",
            &[],
            vec![bytes::Bytes::from(vec![0u8; (4 << 20) + 64])],
            "8",
        ),
    ];
    for (what, headers, frames, code) in cases {
        let reply = raw_check(server.grpc, "POST", headers, frames).await;
        assert_eq!(reply.http_status, 200, "{what}: {reply:?}");
        assert_eq!(
            reply.grpc_status.as_deref(),
            Some(code),
            "{what}: {reply:?}"
        );
        // UNIMPLEMENTED for a compressed message names what is accepted.
        let accepted = (code == "12").then_some("identity");
        assert_eq!(
            reply.accept_encoding.as_deref(),
            accepted,
            "{what}: {reply:?}"
        );
    }
    // `grpc-encoding` names the algorithm of compressed messages only: an
    // uncompressed message is answered whatever the header says.
    for encoding in ["identity", "gzip"] {
        let reply = raw_check(
            server.grpc,
            "POST",
            &[("grpc-encoding", encoding)],
            vec![framed.clone()],
        )
        .await;
        assert_eq!(answer(&reply), whole, "grpc-encoding: {encoding}");
    }

    // Not a POST: HTTP 405, no gRPC status.
    let get = raw_check(server.grpc, "GET", &[], vec![]).await;
    assert_eq!(get.http_status, 405, "{get:?}");
    assert_eq!(get.grpc_status, None);

    // The server still answers normally afterwards.
    let again = answer(&raw_check(server.grpc, "POST", &[], vec![framed]).await);
    assert_eq!(again, whole);
}

#[tokio::test]
async fn unfinished_split_bodies_cannot_hold_unbounded_memory() {
    // Twenty streams each send most of a 4 MiB CheckRequest in pieces and
    // never finish: 78 MiB, over the 64 MiB that split bodies may hold.
    // Some are refused with RESOURCE_EXHAUSTED; checks in one frame (as
    // Envoy sends them) go on being answered meanwhile.
    static PIECE: [u8; 256 * 1024] = [0; 256 * 1024];
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut responses = tokio::task::JoinSet::new();
    let mut senders = Vec::new();
    for _ in 0..20 {
        let mut client = client.clone().ready().await.unwrap();
        let request = hyper::Request::builder()
            .method("POST")
            .uri(format!(
                "http://{}/envoy.service.auth.v3.Authorization/Check",
                server.grpc
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut send) = client.send_request(request, false).unwrap();
        // A message of 4 MiB - 1 declared; 15 pieces of 256 KiB sent.
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&((4u32 << 20) - 1).to_be_bytes());
        send.send_data(bytes::Bytes::from(prefix), false).unwrap();
        for _ in 0..15 {
            send.send_data(bytes::Bytes::from_static(&PIECE), false)
                .unwrap();
        }
        senders.push(send);
        responses.spawn(async move {
            let response = response.await.ok()?;
            response
                .headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_owned())
        });
    }
    let refused = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(status) = responses.join_next().await {
            if status.unwrap().as_deref() == Some("8") {
                return true;
            }
        }
        false
    })
    .await
    .expect("a stream refused within 20 s");
    assert!(refused, "a stream past the budget gets RESOURCE_EXHAUSTED");
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    let resp = c
        .check(request(&[("x-api-key", Secrets::ACTIVE)], None))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        resp.http_response,
        Some(HttpResponse::OkResponse(_))
    ));
    drop(senders);
    server.stop().await;
}

/// `bench-floor --keyward-keys FILE --keyward-key SECRET` answers every call
/// with what keyward itself answers the request Envoy 1.40 sends carrying
/// that key, and refuses to start for a key keyward would deny.
#[tokio::test]
async fn the_floor_answering_as_keyward_gives_keywards_answer() {
    use prost::Message as _;
    use std::io::BufRead as _;

    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    // The deprecated key: its answer carries the most (Deprecation, Sunset).
    let secret = Secrets::DEPRECATED;
    let mut from_envoy =
        CheckRequest::decode(&include_bytes!("../data/envoy-1.40-check-request.bin")[..]).unwrap();
    from_envoy
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap()
        .headers
        .insert("x-api-key".into(), secret.into());
    let mut client = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    let want = client.check(from_envoy.clone()).await.unwrap().into_inner();
    assert!(
        matches!(want.http_response, Some(HttpResponse::OkResponse(_))),
        "{want:?}"
    );

    let floor = |secret: &str| {
        Command::new(env!("CARGO_BIN_EXE_bench-floor"))
            .args(["--listen", "127.0.0.1:0", "--keyward-keys"])
            .arg(&keys.path)
            .args(["--keyward-key", secret])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = floor(secret);
    let mut addr = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut addr)
        .unwrap();
    let mut floor_client = AuthorizationClient::connect(format!("http://{}", addr.trim()))
        .await
        .unwrap();
    // Whatever the request, even one without a key.
    for req in [from_envoy, request(&[], None)] {
        let got = floor_client.check(req).await.unwrap().into_inner();
        assert_eq!(got, want);
    }
    let _ = child.kill();
    let _ = child.wait();

    // Bounded: a floor that started anyway would serve forever.
    let mut refused = floor(Secrets::REVOKED);
    let status = eventually(Duration::from_secs(10), "bench-floor to exit", || {
        let exited = refused.try_wait().unwrap();
        async move { exited }
    })
    .await;
    let _ = refused.kill();
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("does not allow"), "{stderr}");
    server.stop().await;
}
