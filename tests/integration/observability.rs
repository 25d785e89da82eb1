//! Metrics, `/keys`, `/ring`, `/readyz` and `keyward status` against the real server.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tonic::transport::Channel;

use crate::util::{KeyDir, Running, eventually, sha};

fn key(id: &str, client: &str, secret: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nclient = \"{client}\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n{extra}\n",
        sha(secret)
    )
}

fn ring() -> String {
    key("acme-new", "acme", "s-new", "")
        + &key(
            "acme-old",
            "acme",
            "s-old",
            "state = \"deprecated\"\nexpires_at = 2099-01-01T00:00:00Z",
        )
        + &key("globex-1", "globex", "s-globex", "")
}

async fn call(c: &mut AuthorizationClient<Channel>, secret: Option<&str>, scopes: Option<&str>) {
    let mut headers = HashMap::new();
    if let Some(s) = secret {
        headers.insert("x-api-key".to_owned(), s.to_owned());
    }
    let mut ctx = HashMap::new();
    if let Some(s) = scopes {
        ctx.insert("required_scopes".to_owned(), s.to_owned());
    }
    c.check(CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    headers,
                    ..Default::default()
                }),
            }),
            context_extensions: ctx,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

async fn get(server: &Running, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{}{path}", server.admin))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

#[tokio::test]
async fn metrics_and_keys_count_exactly_and_survive_reloads() {
    let keys = KeyDir::new(&ring());
    let server = Running::start(&keys.path).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    for _ in 0..7 {
        call(&mut c, Some("s-new"), Some("read")).await;
    }
    for _ in 0..3 {
        call(&mut c, Some("s-old"), None).await;
    }
    call(&mut c, Some("s-new"), Some("admin")).await;
    for _ in 0..2 {
        call(&mut c, Some("nope"), None).await;
    }
    call(&mut c, None, None).await;

    // Prometheus asks for OpenMetrics; anyone else gets the classic format,
    // whose `# TYPE` lines name counters with their `_total` suffix.
    let openmetrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", server.admin))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3",
        )
        .send()
        .await
        .unwrap();
    assert!(
        openmetrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let openmetrics = openmetrics.text().await.unwrap();
    assert!(has_line(&openmetrics, "# TYPE keyward_checks counter"));
    assert!(has_line(&openmetrics, "# EOF"));
    let (status, m) = get(&server, "/metrics").await;
    assert_eq!(status, 200);
    assert!(!has_line(&m, "# EOF"));
    for line in [
        "# TYPE keyward_checks_total counter",
        r#"keyward_checks_total{result="allowed",reason="active_key"} 7"#,
        r#"keyward_checks_total{result="allowed",reason="deprecated_key"} 3"#,
        r#"keyward_checks_total{result="denied",reason="insufficient_scope"} 1"#,
        r#"keyward_checks_total{result="denied",reason="unknown_key"} 2"#,
        r#"keyward_checks_total{result="denied",reason="missing_key"} 1"#,
        r#"keyward_checks_total{result="denied",reason="revoked_key"} 0"#,
        r#"keyward_key_requests_total{key_id="acme-new",client="acme"} 7"#,
        r#"keyward_key_requests_total{key_id="acme-old",client="acme"} 3"#,
        r#"keyward_key_requests_total{key_id="globex-1",client="globex"} 0"#,
        r#"keyward_key_denials_total{key_id="acme-new",client="acme",reason="insufficient_scope"} 1"#,
        r#"keyward_key_info{key_id="acme-old",client="acme",state="deprecated"} 1"#,
        r#"keyward_key_expires_timestamp_seconds{key_id="acme-old",client="acme"} 4070908800"#,
        "keyward_ring_keys 3",
        "keyward_ring_generation 1",
        r#"keyward_reloads_total{result="success"} 0"#,
        r#"keyward_reloads_total{result="failure"} 0"#,
        "keyward_reload_failing 0",
    ] {
        assert!(has_line(&m, line), "missing {line:?} in:\n{m}");
    }
    // One check in 16 of each serving thread is timed, the first included.
    // This test's runtime has one thread (a new one: libtest runs each test
    // on a thread of its own), which served all 14: exactly one is timed.
    let value = |name: &str| -> u64 {
        let line = m
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{m}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let timed = value("keyward_check_duration_seconds_count ");
    assert_eq!(timed, 1, "one check of 14 on one thread is timed");
    assert_eq!(
        value(r#"keyward_check_duration_seconds_bucket{le="+Inf"} "#),
        timed
    );
    let sha_line = format!(
        r#"keyward_ring_info{{sha256="{}"}} 1"#,
        hex::encode(keyward::decide::digest_bytes(
            &std::fs::read(&keys.path).unwrap()
        ))
    );
    assert!(has_line(&m, &sha_line), "{m}");
    assert!(m.lines().any(|l| l.starts_with(
        r#"keyward_key_last_used_timestamp_seconds{key_id="acme-new",client="acme"} "#
    )));
    assert!(
        !m.contains(r#"keyward_key_last_used_timestamp_seconds{key_id="globex-1""#),
        "never used"
    );

    let (_, body) = get(&server, "/keys").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 1);
    let by_id = |id: &str| {
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id("acme-new")["requests"], 7);
    assert_eq!(by_id("acme-new")["denials"]["insufficient_scope"], 1);
    assert_eq!(by_id("acme-old")["requests"], 3);
    assert_eq!(by_id("acme-old")["state"], "deprecated");
    assert_eq!(by_id("acme-old")["expires_at"], "2099-01-01T00:00:00Z");
    assert!(by_id("acme-new")["last_used"].is_string());
    assert!(by_id("globex-1")["last_used"].is_null());
    assert_eq!(by_id("globex-1")["scopes"], serde_json::json!(["read"]));

    // A reload that drops globex-1 and adds a key keeps acme's counts.
    std::fs::write(
        &keys.path,
        key("acme-new", "acme", "s-new", "")
            + &key("acme-old", "acme", "s-old", "")
            + &key("hooli-1", "hooli", "s-hooli", ""),
    )
    .unwrap();
    let m = eventually(Duration::from_secs(5), "generation 2", || async {
        let (_, m) = get(&server, "/metrics").await;
        has_line(&m, "keyward_ring_generation 2").then_some(m)
    })
    .await;
    assert!(
        has_line(
            &m,
            r#"keyward_key_requests_total{key_id="acme-new",client="acme"} 7"#
        ),
        "{m}"
    );
    assert!(
        has_line(
            &m,
            r#"keyward_key_requests_total{key_id="hooli-1",client="hooli"} 0"#
        ),
        "{m}"
    );
    assert!(
        !m.contains("globex-1"),
        "counters of removed keys are dropped:\n{m}"
    );
    assert!(has_line(&m, r#"keyward_reloads_total{result="success"} 1"#));
    // Denial counters exist for the key denied and still in the ring
    // (acme-new); allowed requests are counted in the ring itself.
    assert_eq!(server.shared.usage.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_failed_reload_is_visible_while_readyz_stays_200() {
    let keys = KeyDir::new(&ring());
    let server = Running::start(&keys.path).await;
    std::fs::write(&keys.path, ring() + "bogus = 1\n").unwrap();
    let m = eventually(Duration::from_secs(5), "failure counted", || async {
        let (_, m) = get(&server, "/metrics").await;
        has_line(&m, r#"keyward_reloads_total{result="failure"} 1"#).then_some(m)
    })
    .await;
    assert!(has_line(&m, "keyward_reload_failing 1"), "{m}");
    let (_, ring_json) = get(&server, "/ring").await;
    let v: serde_json::Value = serde_json::from_str(&ring_json).unwrap();
    let msg = v["last_reload_error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "{}:20:1: unknown field `bogus` in [[keys]]",
            keys.path.display()
        )),
        "{msg}"
    );
    assert_eq!(v["generation"], 1);
    assert_eq!(v["keys"], 3);
    let (status, _) = get(&server, "/readyz").await;
    assert_eq!(status, 200, "the last good ring still serves");
    server.stop().await;
}

#[tokio::test]
async fn the_admin_api_never_exposes_digests_or_secrets() {
    let keys = KeyDir::new(&ring());
    let server = Running::start(&keys.path).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    call(&mut c, Some("s-new"), None).await;
    for path in ["/healthz", "/readyz", "/ring", "/keys", "/metrics"] {
        let (status, body) = get(&server, path).await;
        assert_eq!(status, 200, "{path}");
        for secret in ["s-new", "s-old", "s-globex"] {
            assert!(!body.contains(&sha(secret)), "{path} exposes a digest");
            assert!(
                !body.contains(&format!("\"{secret}\"")),
                "{path} exposes a secret"
            );
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn status_shows_which_old_keys_are_safe_to_retire() {
    let text = ring() + &key("globex-2", "globex", "s-globex-2", "");
    let keys = KeyDir::new(&text);
    let server = Running::start(&keys.path).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    call(&mut c, Some("s-new"), None).await;
    call(&mut c, Some("s-old"), None).await;
    let admin = server.admin.to_string();
    let status = |idle: &'static str| {
        let admin = admin.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_keyward"))
                    .args(["status", "--admin", &admin, "--idle", idle])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let row = |table: &str, id: &str| {
        table
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id}:\n{table}"))
            .to_owned()
    };
    let table = status("10m").await;
    assert!(row(&table, "acme-new").ends_with("in service"), "{table}");
    assert!(
        row(&table, "acme-old").contains("still in use"),
        "used just now:\n{table}"
    );
    assert!(
        row(&table, "globex-1").contains("not yet: unused in the"),
        "superseded and unused, but only since the server started:\n{table}"
    );
    assert!(row(&table, "globex-2").ends_with("in service"), "{table}");
    assert!(
        row(&table, "acme-new").contains(" 1 "),
        "request count shown:\n{table}"
    );
    // Once the server has counted for the whole idle time, unused is unused.
    eventually(
        Duration::from_secs(10),
        "globex-1 safe to retire",
        || async {
            let table = status("1s").await;
            row(&table, "globex-1")
                .ends_with("SAFE TO RETIRE")
                .then_some(())
        },
    )
    .await;
    server.stop().await;
}
