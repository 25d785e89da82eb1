//! The deployment shapes users run: every Envoy bootstrap validates; the
//! sidecar over a Unix socket and the central service over mutual TLS work
//! end to end; route rules stand in for Istio's missing per-route config.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyward::server::{Config, GrpcListener};
use keyward::tls::{TlsFiles, TlsReloader};

use crate::envoy_e2e::decision_suite;
use crate::util::{
    Envoy, KeyDir, Running, Secrets, Upstream, envoy_binary, eventually, repo, sha, standard_ring,
};

/// A test PKI: a CA, keyward's server certificate for `keyward.internal`, and
/// a client certificate for Envoy.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "keyward test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose, file: &str| {
            let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{file}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        leaf(
            "keyward.internal",
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            "envoy.internal",
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.path("server.crt"),
            key: self.path("server.key"),
            client_ca: Some(self.path("ca.crt")),
        }
    }
}

fn central_tls_config(
    pki: &Pki,
    keyward_port: u16,
    app_port: u16,
    with_client_cert: bool,
) -> String {
    let mut text = std::fs::read_to_string(repo().join("envoy/central-tls.yaml"))
        .unwrap()
        .replace("/etc/envoy/tls/", &format!("{}/", pki.dir.path().display()))
        .replace("port_value: 10000", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace("port_value: 50051", &format!("port_value: {keyward_port}"))
        .replace("port_value: 8080", &format!("port_value: {app_port}"));
    if !with_client_cert {
        let start = text.find("            tls_certificates:").unwrap();
        let end = text.find("            validation_context:").unwrap();
        text.replace_range(start..end, "");
    }
    text
}

fn validate(config: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, config).unwrap();
    let out = Command::new(envoy_binary())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "error",
            "-c",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} does not validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_envoy_bootstrap_validates() {
    let mut seen = 0;
    let pki = Pki::new();
    for entry in std::fs::read_dir(repo().join("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // Certificates are referenced by path; point them at a test PKI.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/etc/envoy/tls/", &format!("{}/", pki.dir.path().display()));
        validate(&text, &name);
        seen += 1;
    }
    assert!(
        seen >= 3,
        "expected the front-proxy, sidecar and central-tls bootstraps"
    );
}

/// The sidecar bootstrap, with keyward on a Unix socket, passes the same
/// decision suite as the front proxy.
#[tokio::test]
async fn sidecar_over_a_unix_socket_passes_the_decision_suite() {
    let keys = KeyDir::new(&standard_ring());
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("keyward.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = Running::start_on(Config::new(&keys.path), GrpcListener::Unix(listener)).await;
    let upstream = Upstream::start().await;
    let config = std::fs::read_to_string(repo().join("envoy/sidecar.yaml"))
        .unwrap()
        .replace("/run/keyward/keyward.sock", &sock.display().to_string())
        .replace("port_value: 10000", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace(
            "port_value: 8080",
            &format!("port_value: {}", upstream.addr.port()),
        );
    assert!(config.contains(&sock.display().to_string()));
    let envoy = Envoy::start_config(&config).await;
    decision_suite(&envoy).await;
    server.stop().await;
}

#[cfg(unix)]
#[test]
fn the_unix_socket_is_private_to_owner_and_group() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let keys = KeyDir::new(&standard_ring());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["serve", "--admin", "127.0.0.1:0", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--keys")
        .arg(&keys.path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = crate::util::ChildGuard(child);
    let start = std::time::Instant::now();
    let meta = loop {
        if let Ok(m) = std::fs::metadata(&sock)
            && m.permissions().mode() & 0o777 == 0o660
        {
            break m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "socket with mode 0660 never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(meta.file_type().is_socket());
}

/// keyward as a central service with mutual TLS: Envoy with a client
/// certificate gets decisions; Envoy without one is refused and fails closed.
#[tokio::test]
async fn central_service_over_mutual_tls() {
    let pki = Pki::new();
    let keys = KeyDir::new(&standard_ring());
    let tls = Arc::new(TlsReloader::new(pki.server_files()).expect("TLS files load"));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Running::start_on(Config::new(&keys.path), GrpcListener::Tls(tcp, tls)).await;
    let upstream = Upstream::start().await;
    let http = reqwest::Client::new();

    let envoy = Envoy::start_config(&central_tls_config(
        &pki,
        server.grpc.port(),
        upstream.addr.port(),
        true,
    ))
    .await;
    let r = http
        .get(envoy.url("/v1/prices"))
        .header("x-api-key", Secrets::ACTIVE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", envoy.log());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["headers"]["x-keyward-key-id"], "acme-new");
    let r = http
        .get(envoy.url("/v1/prices"))
        .header("x-api-key", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Without a client certificate the handshake fails: Envoy fails closed.
    let anonymous = Envoy::start_config(&central_tls_config(
        &pki,
        server.grpc.port(),
        upstream.addr.port(),
        false,
    ))
    .await;
    let r = http
        .get(anonymous.url("/v1/prices"))
        .header("x-api-key", Secrets::ACTIVE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let addr = server.grpc;
    server.stop().await;
    // Stopped: the TLS listener closes now, not at the next connection.
    crate::util::eventually(
        Duration::from_secs(2),
        "the TLS listener to close",
        || async {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn certificates_are_reloaded_and_bad_ones_are_kept_out() {
    let pki = Pki::new();
    let files = pki.server_files();
    let tls = Arc::new(TlsReloader::new(files.clone()).unwrap());
    let first = tls.current();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(Arc::clone(&tls).follow(Duration::from_millis(100), stop_rx));

    // A broken certificate never replaces the working configuration.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        Arc::ptr_eq(&first, &tls.current()),
        "a bad file was swapped in"
    );
    assert!(keyward::tls::load(&files).is_err());

    // A renewed certificate is.
    let renewed = Pki::new();
    std::fs::copy(renewed.path("server.key"), &files.key).unwrap();
    std::fs::copy(renewed.path("server.crt"), &files.cert).unwrap();
    std::fs::copy(renewed.path("ca.crt"), files.client_ca.as_ref().unwrap()).unwrap();
    eventually(Duration::from_secs(5), "renewed certificate in use", || {
        let tls = Arc::clone(&tls);
        let first = Arc::clone(&first);
        async move { (!Arc::ptr_eq(&first, &tls.current())).then_some(()) }
    })
    .await;
    let _ = stop_tx.send(true);
}

fn check_request(secret: &str, method: &str, path: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers: HashMap::from([("x-api-key".to_owned(), secret.to_owned())]),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

fn route_ring() -> String {
    format!(
        r#"[[keys]]
id = "reader"
client = "r"
sha256 = "{}"
scopes = ["read"]

[[keys]]
id = "trader"
client = "t"
sha256 = "{}"
scopes = ["read", "trade"]

[[routes]]
path_prefix = "/"
required_scopes = ["read"]

[[routes]]
path_prefix = "/trade"
methods = ["POST"]
required_scopes = ["trade"]
"#,
        sha("s-reader"),
        sha("s-trader")
    )
}

/// Route rules from the key file decide the scopes when Envoy sends no
/// `required_scopes`; a context extension, when present, wins.
#[tokio::test]
async fn route_rules_apply_without_context_extensions() {
    let keys = KeyDir::new(&route_ring());
    let server = Running::start(&keys.path).await;
    let mut c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    let mut allowed = async |secret: &str, method: &str, path: &str| {
        let r = c
            .check(check_request(secret, method, path))
            .await
            .unwrap()
            .into_inner();
        matches!(r.http_response, Some(HttpResponse::OkResponse(_)))
    };
    assert!(
        allowed("s-reader", "GET", "/trade/orders").await,
        "GET is not covered by the POST rule"
    );
    assert!(!allowed("s-reader", "POST", "/trade/orders?side=buy").await);
    assert!(allowed("s-trader", "POST", "/trade/orders").await);
    let mut req = check_request("s-reader", "POST", "/trade/orders");
    req.attributes
        .as_mut()
        .unwrap()
        .context_extensions
        .insert("required_scopes".into(), "read".into());
    let r = c.check(req).await.unwrap().into_inner();
    assert!(
        matches!(r.http_response, Some(HttpResponse::OkResponse(_))),
        "the context extension wins"
    );
    server.stop().await;
}

/// The same through an Envoy configured like Istio's CUSTOM provider: the
/// ext_authz filter with no per-route settings at all.
#[tokio::test]
async fn route_rules_through_an_envoy_without_per_route_settings() {
    let keys = KeyDir::new(&route_ring());
    let server = Running::start(&keys.path).await;
    let upstream = Upstream::start().await;
    let mut config = std::fs::read_to_string(repo().join("envoy/envoy.yaml"))
        .unwrap()
        .replace("port_value: 10000", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace(
            "port_value: 50051",
            &format!("port_value: {}", server.grpc.port()),
        )
        .replace(
            "port_value: 8080",
            &format!("port_value: {}", upstream.addr.port()),
        );
    // Drop every per-route block that sets check_settings (Istio has none).
    while let Some(settings) = config.find("check_settings:") {
        let start = config[..settings]
            .rfind("typed_per_filter_config:")
            .unwrap();
        let start = config[..start].rfind('\n').map_or(0, |i| i + 1);
        let scopes = settings + config[settings..].find("required_scopes:").unwrap();
        let end = config[scopes..]
            .find('\n')
            .map_or(config.len(), |i| scopes + i + 1);
        config.replace_range(start..end, "");
    }
    assert!(!config.contains("required_scopes"));
    let envoy = Envoy::start_config(&config).await;
    let http = reqwest::Client::new();
    let status = |method: reqwest::Method, secret: &'static str| {
        let req = http
            .request(method, envoy.url("/trade/orders"))
            .header("x-api-key", secret);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(reqwest::Method::GET, "s-reader").await, 200);
    assert_eq!(status(reqwest::Method::POST, "s-reader").await, 403);
    assert_eq!(status(reqwest::Method::POST, "s-trader").await, 200);
    server.stop().await;
}
