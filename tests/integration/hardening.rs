//! Hostile input, faults, and rotation under load.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use keyward::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyward::service::AuthzService;
use prost::Message;

use crate::util::{
    ChildGuard, Envoy, KeyDir, Running, Secrets, Upstream, eventually, repo, sha, standard_ring,
};

/// A tiny deterministic generator for the mutation smoke run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(seed: &[u8], rng: &mut XorShift) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..=rng.below(8) {
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 if !b.is_empty() => {
                let i = rng.below(b.len());
                let n = rng.below(16).min(b.len() - i);
                b.drain(i..i + n);
            }
            3 => {
                let i = rng.below(b.len() + 1);
                let chunk: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(i..i, chunk);
            }
            _ => {
                let i = rng.below(b.len() + 1);
                b.truncate(i);
            }
        }
    }
    b
}

fn service() -> (KeyDir, AuthzService) {
    let keys = KeyDir::new(&standard_ring());
    let server = keyward::server::Server::load(keyward::server::Config::new(&keys.path)).unwrap();
    (keys, AuthzService::new(server.shared()))
}

/// Fuzz smoke run: mutations of real inputs (the captured Envoy request and
/// the corpus in tests/corpus) never make the decoder, the service or the
/// key file parser panic.
#[test]
fn mutated_inputs_never_panic() {
    let (_keys, svc) = service();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut seeds =
        vec![std::fs::read(repo().join("tests/data/envoy-1.40-check-request.bin")).unwrap()];
    let mut toml_seeds = Vec::new();
    for entry in std::fs::read_dir(repo().join("tests/corpus")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("bin") => seeds.push(bytes),
            Some("toml") => toml_seeds.push(bytes),
            _ => {}
        }
    }
    assert!(!toml_seeds.is_empty() && seeds.len() > 1, "corpus present");
    let now = Timestamp::now();
    let mut decoded = 0;
    for i in 0..20_000 {
        let input = mutate(&seeds[i % seeds.len()], &mut rng);
        if let Ok(req) = CheckRequest::decode(input.as_slice()) {
            decoded += 1;
            let resp = svc.check_at(&req, now);
            assert!(resp.http_response.is_some());
        }
    }
    assert!(
        decoded > 1000,
        "mutations should often stay decodable ({decoded})"
    );
    for i in 0..5_000 {
        let input = mutate(&toml_seeds[i % toml_seeds.len()], &mut rng);
        let _ = keyward::keyfile::parse_bytes(
            std::path::Path::new("fuzz.toml"),
            &input,
            Default::default(),
        );
    }
}

fn request(headers: Vec<(String, String)>) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    headers: headers.into_iter().collect(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

fn outcome(resp: &keyward::pb::envoy::service::auth::v3::CheckResponse) -> Result<(), String> {
    match &resp.http_response {
        Some(HttpResponse::OkResponse(_)) => Ok(()),
        Some(HttpResponse::DeniedResponse(d)) => Err(d.body.clone()),
        None => panic!("no http_response"),
    }
}

#[tokio::test]
async fn hostile_requests_get_clear_denials() {
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    let malformed = Err(r#"{"error":"malformed_key"}"#.to_owned());
    let unknown = Err(r#"{"error":"unknown_key"}"#.to_owned());
    let missing = Err(r#"{"error":"missing_key"}"#.to_owned());
    type Case = (Vec<(String, String)>, Result<(), String>);
    let cases: Vec<Case> = vec![
        (vec![("x-api-key".into(), String::new())], malformed.clone()),
        (vec![("x-api-key".into(), "k".into())], unknown.clone()),
        (
            vec![("x-api-key".into(), "k".repeat(513))],
            malformed.clone(),
        ),
        (
            vec![("x-api-key".into(), "k".repeat(64 * 1024))],
            malformed.clone(),
        ),
        (vec![("x-api-key".into(), "clé".into())], malformed.clone()),
        (
            vec![("x-api-key".into(), "a\u{0}b".into())],
            malformed.clone(),
        ),
        (
            vec![("x-api-key".into(), "a\u{7f}b".into())],
            malformed.clone(),
        ),
        // Envoy joins repeated headers with a comma: never a valid key.
        (
            vec![(
                "x-api-key".into(),
                format!("{},{}", Secrets::ACTIVE, Secrets::READER),
            )],
            unknown.clone(),
        ),
        (
            vec![("authorization".into(), "Basic dXNlcjpwYXNz".into())],
            missing.clone(),
        ),
        (
            vec![("authorization".into(), "Digest username=x".into())],
            missing.clone(),
        ),
        (
            vec![(
                "authorization".into(),
                format!("Bearer {}", "k".repeat(64 * 1024)),
            )],
            malformed.clone(),
        ),
    ];
    for (headers, want) in cases {
        let label = format!(
            "{:?}",
            headers
                .iter()
                .map(|(k, v)| (k, v.len()))
                .collect::<Vec<_>>()
        );
        let resp = c
            .check(request(headers))
            .await
            .expect("a response, not an RPC error")
            .into_inner();
        assert_eq!(outcome(&resp), want, "{label}");
    }
    // Hundreds of headers around a valid key.
    let mut many: Vec<(String, String)> = (0..500)
        .map(|i| (format!("x-filler-{i}"), "v".repeat(100)))
        .collect();
    many.push(("x-api-key".into(), Secrets::ACTIVE.into()));
    let resp = c.check(request(many)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), Ok(()));
    // Raw header maps with bytes that are not UTF-8.
    let mut raw = request(vec![]);
    raw.attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
        .header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "x-api-key".into(),
            value: String::new(),
            raw_value: vec![0xff, 0x00, 0x80],
        }],
    });
    let resp = c.check(raw).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), malformed);
    server.stop().await;
}

#[tokio::test]
async fn hostile_requests_through_envoy() {
    let keys = KeyDir::new(&standard_ring());
    let server = Running::start(&keys.path).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("envoy.yaml", server.grpc.port(), upstream.addr.port()).await;
    let http = reqwest::Client::new();
    // Two x-api-key headers, one of them valid: denied, never the first or last wins.
    let r = http
        .get(envoy.url("/v1/prices"))
        .header("x-api-key", Secrets::ACTIVE)
        .header("x-api-key", "other")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A 50 KiB key: denied as malformed by keyward (or refused by Envoy
    // itself for oversized headers) — never allowed, never a 5xx.
    let r = http
        .get(envoy.url("/v1/prices"))
        .header("x-api-key", "k".repeat(50 * 1024))
        .send()
        .await
        .unwrap();
    assert!(matches!(r.status().as_u16(), 401 | 431), "{}", r.status());
    server.stop().await;
}

#[test]
fn hostile_key_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, contents: &[u8]| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        match keyward::keyfile::load(&path, Default::default()) {
            Ok(_) => panic!("{name} was accepted"),
            Err(e) => e.to_string(),
        }
    };
    // 100 MB that are not TOML: one clear diagnostic, memory bounded by the file.
    let big = vec![b'x'; 100 * 1024 * 1024];
    let e = check("big.toml", &big);
    assert!(
        e.starts_with(&format!("{}:1:", dir.path().join("big.toml").display())),
        "{}",
        &e[..200.min(e.len())]
    );
    drop(big);
    // Deep nesting: rejected without overflowing the stack.
    let deep = format!("x = {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let e = check("deep.toml", deep.as_bytes());
    assert!(e.contains("deep.toml:1:"), "{e}");
    let deep_tables = format!("x = {}1{}", "{ a = ".repeat(10_000), " }".repeat(10_000));
    assert!(check("deep2.toml", deep_tables.as_bytes()).contains("deep2.toml:1:"));
    // Binary garbage.
    let e = check("bin.toml", &[0xff, 0xfe, 0x00, 0x01]);
    assert!(e.contains("not valid UTF-8"), "{e}");

    // A symlink loop and a directory: I/O errors naming the file.
    #[cfg(unix)]
    {
        let a = dir.path().join("loop-a.toml");
        let b = dir.path().join("loop-b.toml");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = keyward::keyfile::load(&a, Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}: cannot read key file", a.display())),
            "{e}"
        );
    }
    let e = keyward::keyfile::load(dir.path(), Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read key file"), "{e}");
}

#[test]
fn a_million_tiny_keys_load() {
    let mut text = String::with_capacity(1_000_000 * 110);
    for i in 0..1_000_000u32 {
        text.push_str(&format!(
            "[[keys]]\nid = \"k{i}\"\nclient = \"c\"\nsha256 = \"{:032x}00000000000000000000000000000000\"\n",
            u128::from(i) * 0x9e37_79b9_7f4a_7c15 + 1
        ));
    }
    let file = keyward::keyfile::parse_str(&text, Default::default()).unwrap();
    assert_eq!(file.keys.len(), 1_000_000);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_keyward(keys: &std::path::Path, port: u16) -> ChildGuard {
    ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["serve", "--admin", "127.0.0.1:0", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--keys")
            .arg(keys)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// keyward killed under load: Envoy fails closed (503); restarted: serving again.
#[tokio::test]
async fn killed_under_load_fails_closed_and_recovers() {
    let keys = KeyDir::new(&standard_ring());
    let port = free_port();
    let mut child = spawn_keyward(&keys.path, port);
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("envoy.yaml", port, upstream.addr.port()).await;
    let http = reqwest::Client::new();
    let status = || {
        let req = http
            .get(envoy.url("/v1/prices"))
            .header("x-api-key", Secrets::ACTIVE);
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    eventually(Duration::from_secs(10), "keyward serving", || async {
        (status().await == 200).then_some(())
    })
    .await;

    // Load while the process is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<std::sync::Mutex<Vec<u16>>> = Arc::default();
    let load = {
        let (stop, seen, http, url) = (
            stop.clone(),
            seen.clone(),
            http.clone(),
            envoy.url("/v1/prices"),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = http
                    .get(&url)
                    .header("x-api-key", Secrets::ACTIVE)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                seen.lock().unwrap().push(s);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    eventually(Duration::from_secs(10), "503 after the kill", || async {
        (status().await == 503).then_some(())
    })
    .await;
    let _child = spawn_keyward(&keys.path, port);
    eventually(Duration::from_secs(20), "serving after restart", || async {
        (status().await == 200).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().all(|s| *s == 200 || *s == 503),
        "only allowed or fail-closed: {seen:?}"
    );
}

#[test]
fn an_admin_port_in_use_is_a_clear_startup_error() {
    let keys = KeyDir::new(&standard_ring());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            &addr,
            "--keys",
        ])
        .arg(&keys.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot bind the admin listener on {addr}")),
        "{err}"
    );
}

/// The central promise: a rotation under load never drops a request on a
/// valid key, and the revoked key is denied within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_through_envoy_drops_nothing() {
    let old_secret = "rotation-old-key-0001";
    let new_secret = "rotation-new-key-0002";
    let key = |id: &str, secret: &str, extra: &str| {
        format!(
            "[[keys]]\nid = \"{id}\"\nclient = \"acme\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n{extra}\n",
            sha(secret)
        )
    };
    let keys = KeyDir::new(&key("old", old_secret, ""));
    let server = Running::start(&keys.path).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start("envoy.yaml", server.grpc.port(), upstream.addr.port()).await;
    let http = reqwest::Client::new();
    let url = envoy.url("/v1/prices");

    // Traffic on a key: counts each status.
    let stop = Arc::new(AtomicBool::new(false));
    let run = |secret: &'static str, tasks: usize| {
        let counts: Arc<std::sync::Mutex<HashMap<u16, u64>>> = Arc::default();
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (stop, counts, http, url) =
                    (stop.clone(), counts.clone(), http.clone(), url.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let s = http
                            .get(&url)
                            .header("x-api-key", secret)
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                            .unwrap_or(0);
                        *counts.lock().unwrap().entry(s).or_default() += 1;
                    }
                })
            })
            .collect();
        (counts, handles)
    };
    let generation = || {
        let admin = server.admin;
        async move {
            let v: serde_json::Value = reqwest::get(format!("http://{admin}/ring"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["generation"].as_u64()
        }
    };
    let publish = |text: String, generation_wanted: u64| {
        std::fs::write(&keys.path, text).unwrap();
        async move {
            eventually(Duration::from_secs(5), "ring published", || async {
                (generation().await? >= generation_wanted).then_some(())
            })
            .await;
        }
    };

    let (old_counts, old_tasks) = run(old_secret, 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Introduce the new key; start traffic on it.
    publish(key("old", old_secret, "") + &key("new", new_secret, ""), 2).await;
    let (new_counts, new_tasks) = run(new_secret, 3);
    // 40 more rings while both keys are in use.
    let rings = AtomicU64::new(2);
    for i in 0..40 {
        let g = rings.fetch_add(1, Ordering::Relaxed) + 1;
        publish(
            key("old", old_secret, &format!("description = \"churn {i}\""))
                + &key("new", new_secret, ""),
            g,
        )
        .await;
    }
    // Deprecate the old key: still allowed.
    let g = rings.fetch_add(1, Ordering::Relaxed) + 1;
    publish(
        key(
            "old",
            old_secret,
            "state = \"deprecated\"\nexpires_at = 2099-01-01T00:00:00Z",
        ) + &key("new", new_secret, ""),
        g,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before_revoke: HashMap<u16, u64> = old_counts.lock().unwrap().clone();

    // Revoke: denied within a second.
    let revoked_at = Instant::now();
    std::fs::write(
        &keys.path,
        key("old", old_secret, "state = \"revoked\"") + &key("new", new_secret, ""),
    )
    .unwrap();
    eventually(
        Duration::from_secs(1),
        "old key denied within a second",
        || {
            let req = http.get(&url).header("x-api-key", old_secret);
            async move { (req.send().await.ok()?.status() == 401).then_some(()) }
        },
    )
    .await;
    eprintln!(
        "revoked key denied {:?} after the write",
        revoked_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for h in old_tasks.into_iter().chain(new_tasks) {
        h.await.unwrap();
    }
    let new_counts = new_counts.lock().unwrap().clone();
    eprintln!("old key before revocation: {before_revoke:?}; new key: {new_counts:?}");
    assert_eq!(
        before_revoke.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "old key failed before revocation: {before_revoke:?}"
    );
    assert!(before_revoke[&200] > 100, "{before_revoke:?}");
    assert_eq!(
        new_counts.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "new key failed: {new_counts:?}"
    );
    assert!(generation().await.unwrap() >= 44);
    server.stop().await;
}
