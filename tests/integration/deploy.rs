//! The operator-facing files in `deploy/` and `envoy/` are valid for the real tools.

use std::path::PathBuf;
use std::process::Command;

use crate::util::repo;

fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARD_PROMTOOL") {
        return PathBuf::from(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("promtool");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "promtool is required for this test: run the suite with scripts/test.sh, which installs it"
    );
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    let text = run_ok(
        Command::new(promtool())
            .arg("check")
            .arg("rules")
            .arg(dir.join("keyward-alerts.yml")),
    );
    assert!(text.contains("SUCCESS"), "{text}");
    let text = run_ok(Command::new(promtool()).current_dir(&dir).args([
        "test",
        "rules",
        "keyward-alerts.test.yml",
    ]));
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_grafana_dashboard_is_valid_json() {
    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/keyward-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(v["panels"].as_array().is_some_and(|p| !p.is_empty()));
}

/// Every metric the alert rules and the dashboard use is one keyward exports.
#[tokio::test]
async fn rules_and_dashboard_only_use_exported_metrics() {
    use std::collections::BTreeSet;

    let text = crate::util::sha("s-1");
    let ring = format!(
        "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{text}\"\nstate = \"deprecated\"\n\
         expires_at = 2099-01-01T00:00:00Z\nrate_limit = {{ requests = 1, per = \"1h\" }}\n"
    );
    let keys = crate::util::KeyDir::new(&ring);
    let server = crate::util::Running::start(&keys.path).await;
    let mut c =
        keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(
            server.endpoint(),
        )
        .await
        .unwrap();
    let req = || keyward::pb::envoy::service::auth::v3::CheckRequest {
        attributes: Some(keyward::pb::envoy::service::auth::v3::AttributeContext {
            request: Some(
                keyward::pb::envoy::service::auth::v3::attribute_context::Request {
                    http: Some(
                        keyward::pb::envoy::service::auth::v3::attribute_context::HttpRequest {
                            headers: [("x-api-key".to_owned(), "s-1".to_owned())].into(),
                            ..Default::default()
                        },
                    ),
                },
            ),
            ..Default::default()
        }),
    };
    c.check(req()).await.unwrap();
    c.check(req()).await.unwrap(); // rate limited: a per-key denial
    let mut exported: BTreeSet<String> = reqwest::get(format!("http://{}/metrics", server.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    server.stop().await;
    // A histogram is also known by its family name.
    let families: Vec<String> = exported
        .iter()
        .filter_map(|n| n.strip_suffix("_bucket").map(str::to_owned))
        .collect();
    exported.extend(families);

    for file in [
        "deploy/prometheus/keyward-alerts.yml",
        "deploy/grafana/keyward-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("keyward_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            // Rule and alert names such as `keyward_alerts` are not metrics.
            if name.ends_with('_') || !name.contains("keyward_") {
                continue;
            }
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which keyward does not export (exported: {exported:?})"
            );
        }
    }
}

fn yaml_docs(dir: &str) -> Vec<(String, yaml_rust2::Yaml)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("subPath:"),
            "{}: a subPath mount never sees Secret updates",
            path.display()
        );
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for doc in
            yaml_rust2::YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
        {
            out.push((name.clone(), doc));
        }
    }
    out
}

/// The Kubernetes and Istio manifests parse, and keyward's container is
/// locked down and probed the way the docs say.
#[test]
fn kubernetes_and_istio_manifests_are_sound() {
    let mut keyward_containers = 0;
    let mut docs = yaml_docs("deploy/kubernetes");
    docs.extend(yaml_docs("deploy/istio"));
    for (name, doc) in &docs {
        if doc["kind"].as_str() != Some("Deployment") {
            continue;
        }
        let pod = &doc["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{name}"
        );
        for c in pod["containers"].as_vec().unwrap() {
            if c["name"].as_str() != Some("keyward") {
                continue;
            }
            keyward_containers += 1;
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
            assert_eq!(
                sc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{name}"
            );
            assert!(
                !c["readinessProbe"].is_badvalue(),
                "{name}: readiness probe"
            );
            assert!(!c["livenessProbe"].is_badvalue(), "{name}: liveness probe");
            assert!(
                !c["resources"]["requests"].is_badvalue(),
                "{name}: resource requests"
            );
            let args: Vec<&str> = c["args"]
                .as_vec()
                .unwrap()
                .iter()
                .filter_map(|a| a.as_str())
                .collect();
            assert!(
                args.iter()
                    .any(|a| a.starts_with("--keys=/etc/keyward/keys/")),
                "{name}: {args:?}"
            );
            assert!(
                args.contains(&"--admin=127.0.0.1:9911"),
                "{name}: admin stays on loopback"
            );
        }
    }
    assert_eq!(
        keyward_containers, 2,
        "the sidecar and the shared-service deployments"
    );
    let policy = docs
        .iter()
        .find(|(_, d)| d["metadata"]["name"].as_str() == Some("exchange-api-keys"))
        .expect("the AuthorizationPolicy sending requests through keyward");
    // The shared service is in the mesh and takes mutual TLS only.
    let kind_in = |kind: &str, namespace: &str| {
        docs.iter().find(|(_, d)| {
            d["kind"].as_str() == Some(kind)
                && (d["metadata"]["namespace"].as_str() == Some(namespace)
                    || d["metadata"]["name"].as_str() == Some(namespace))
        })
    };
    let ns = kind_in("Namespace", "keyward").expect("the keyward namespace");
    assert_eq!(
        ns.1["metadata"]["labels"]["istio-injection"].as_str(),
        Some("enabled")
    );
    let peer = kind_in("PeerAuthentication", "keyward").expect("a PeerAuthentication");
    assert_eq!(peer.1["spec"]["mtls"]["mode"].as_str(), Some("STRICT"));
    assert_eq!(policy.1["spec"]["action"].as_str(), Some("CUSTOM"));
    assert_eq!(
        policy.1["spec"]["provider"]["name"].as_str(),
        Some("keyward")
    );
    let mesh = docs
        .iter()
        .find(|(n, _)| n == "mesh-config.yaml")
        .expect("mesh config");
    let provider = &mesh.1["extensionProviders"][0];
    assert_eq!(provider["name"].as_str(), Some("keyward"));
    assert_eq!(
        provider["envoyExtAuthzGrpc"]["failOpen"].as_bool(),
        Some(false)
    );
}

/// `keyward probe` is what the exec probes run.
#[tokio::test]
async fn probe_command_reports_readiness() {
    let keys = crate::util::KeyDir::new(&crate::util::standard_ring());
    let server = crate::util::Running::start(&keys.path).await;
    let admin = server.admin.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_keyward"))
                .args(args)
                .status()
                .unwrap()
                .success()
        };
        (
            run(&["probe", "--admin", &admin, "readyz"]),
            run(&["probe", "--admin", &admin, "healthz"]),
            run(&["probe", "--admin", "127.0.0.1:1", "readyz"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(ok, (true, true, false));
    server.stop().await;
}

/// The newcomer's demo runs to completion.
#[test]
fn the_demo_runs_to_completion() {
    let out = Command::new("bash")
        .arg(repo().join("scripts/demo.sh"))
        .env("KEYWARD_BIN", env!("CARGO_BIN_EXE_keyward"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "demo failed:\n{text}");
    assert!(text.contains(r#"401 {"error":"revoked_key"}"#), "{text}");
    assert!(text.contains("deprecation: @"), "{text}");
}
