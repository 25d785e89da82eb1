//! Helpers shared by the integration tests: key files, the real server on
//! port 0, an echoing upstream, and a real Envoy.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use keyward::server::{Config, GrpcListener, Server};
use keyward::service::Shared;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// SHA-256 hex of a secret.
pub fn sha(secret: &str) -> String {
    hex::encode(keyward::decide::digest(secret))
}

/// Polls `f` until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Secrets of the standard test ring, one per row of the decision table.
pub struct Secrets;

impl Secrets {
    pub const ACTIVE: &'static str = "test-active-key-0001";
    pub const READER: &'static str = "test-reader-key-0002";
    pub const DEPRECATED: &'static str = "test-deprecated-key-0003";
    pub const REVOKED: &'static str = "test-revoked-key-0004";
    pub const EXPIRED: &'static str = "test-expired-key-0005";
    pub const FUTURE: &'static str = "test-future-key-0006";
}

/// The standard test ring, with validity windows relative to now.
pub fn standard_ring() -> String {
    let now = Timestamp::now();
    let hour = SignedDuration::from_hours(1);
    let sunset = now + SignedDuration::from_hours(24 * 30);
    format!(
        r#"# standard test ring
[[keys]]
id = "acme-new"
client = "acme"
sha256 = "{active}"
scopes = ["read", "trade"]

[[keys]]
id = "globex-reader"
client = "globex"
sha256 = "{reader}"
scopes = ["read"]

[[keys]]
id = "acme-old"
client = "acme"
sha256 = "{deprecated}"
scopes = ["read", "trade"]
state = "deprecated"
deprecated_at = "{dep_at}"
expires_at = "{sunset}"

[[keys]]
id = "initech-leaked"
client = "initech"
sha256 = "{revoked}"
state = "revoked"

[[keys]]
id = "hooli-expired"
client = "hooli"
sha256 = "{expired}"
scopes = ["read"]
expires_at = "{expired_at}"

[[keys]]
id = "umbrella-future"
client = "umbrella"
sha256 = "{future}"
scopes = ["read"]
not_before = "{not_before}"
"#,
        active = sha(Secrets::ACTIVE),
        reader = sha(Secrets::READER),
        deprecated = sha(Secrets::DEPRECATED),
        revoked = sha(Secrets::REVOKED),
        expired = sha(Secrets::EXPIRED),
        future = sha(Secrets::FUTURE),
        dep_at = now - hour,
        sunset = sunset.round(jiff::Unit::Second).unwrap(),
        expired_at = now - hour,
        not_before = now + SignedDuration::from_hours(24),
    )
}

/// A key file in its own temporary directory.
pub struct KeyDir {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl KeyDir {
    pub fn new(contents: &str) -> KeyDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, contents).expect("write key file");
        KeyDir { dir, path }
    }
}

/// A keyward server running in the current runtime on port 0.
pub struct Running {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub async fn start(keys: &Path) -> Running {
        Running::start_with(Config::new(keys)).await
    }

    pub async fn start_with(config: Config) -> Running {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Running::start_on(config, GrpcListener::Tcp(grpc)).await
    }

    /// Serves gRPC on `listener` (TCP, Unix socket or TLS).
    pub async fn start_on(config: Config, listener: GrpcListener) -> Running {
        let server = Server::load(config).expect("key file loads");
        let shared = server.shared();
        let grpc_addr = match &listener {
            GrpcListener::Tcp(l) | GrpcListener::Tls(l, _) => l.local_addr().unwrap(),
            GrpcListener::Unix(_) => "0.0.0.0:0".parse().unwrap(),
        };
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(listener, Some(admin), async move {
            let _ = stopped.await;
        }));
        Running {
            grpc: grpc_addr,
            admin: admin_addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Requests shutdown and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("server stops within 15s")
                .expect("server task")
                .expect("server result");
        }
    }
}

/// An HTTP/1.1 upstream that answers every request with its headers as JSON.
pub struct Upstream {
    pub addr: SocketAddr,
}

impl Upstream {
    pub async fn start() -> Upstream {
        use axum::http::HeaderMap;
        async fn echo(headers: HeaderMap) -> axum::Json<serde_json::Value> {
            let mut map = serde_json::Map::new();
            for (name, value) in &headers {
                let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
                match map.get_mut(name.as_str()) {
                    Some(serde_json::Value::String(prev)) => {
                        prev.push_str(", ");
                        prev.push_str(&v);
                    }
                    _ => {
                        map.insert(name.as_str().to_owned(), serde_json::Value::String(v));
                    }
                }
            }
            axum::Json(serde_json::json!({ "headers": map }))
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(echo);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Upstream { addr }
    }
}

/// The Envoy binary: `$KEYWARD_ENVOY`, else `envoy` on PATH. Missing Envoy is a
/// test failure, never a skip.
pub fn envoy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARD_ENVOY") {
        return PathBuf::from(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("envoy");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "Envoy is required for this test and was not found: set KEYWARD_ENVOY or run the \
         test suite with scripts/test.sh, which installs Envoy 1.40"
    );
}

/// A real Envoy running a bootstrap from `envoy/` with ports rewritten.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts `envoy/<name>` ([`Envoy::bootstrap`]).
    pub async fn start(name: &str, keyward_port: u16, app_port: u16) -> Envoy {
        Envoy::start_config(&Envoy::bootstrap(name, keyward_port, app_port)).await
    }

    /// `envoy/<name>` with its keyward and app ports pointed at ours. The
    /// listener and admin ports become 0 and are discovered.
    pub fn bootstrap(name: &str, keyward_port: u16, app_port: u16) -> String {
        let template = std::fs::read_to_string(repo().join("envoy").join(name)).expect("bootstrap");
        template
            .replace("port_value: 10000", "port_value: 0")
            .replace("port_value: 9901", "port_value: 0")
            .replace("port_value: 50051", &format!("port_value: {keyward_port}"))
            .replace("port_value: 8080", &format!("port_value: {app_port}"))
    }

    /// Starts Envoy with a complete bootstrap.
    pub async fn start_config(config: &str) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, config).unwrap();
        let admin_file = dir.path().join("admin-address");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&cfg)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ])
            // Access logs reach the log file quickly enough to assert on.
            .args(["--file-flush-interval-msec", "50"])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Envoy {
            child,
            port: 0,
            admin: "127.0.0.1:0".parse().unwrap(),
            dir,
        };
        let admin: SocketAddr = {
            let admin_file = admin_file.clone();
            let log_dir = envoy.dir.path().to_owned();
            let child = &mut envoy.child;
            let start = Instant::now();
            loop {
                if let Ok(s) = std::fs::read_to_string(&admin_file)
                    && let Ok(a) = s.trim().parse()
                {
                    break a;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "envoy exited with {status}:\n{}",
                        std::fs::read_to_string(log_dir.join("envoy.log")).unwrap_or_default()
                    );
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "envoy did not start in 30s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        envoy.admin = admin;
        let client = reqwest::Client::new();
        // Listeners accept only once Envoy has initialised (clusters with
        // active health checks wait for their first round).
        eventually(Duration::from_secs(30), "envoy to be LIVE", || {
            let client = client.clone();
            async move {
                let r = client
                    .get(format!("http://{admin}/ready"))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
        envoy.port = eventually(Duration::from_secs(30), "envoy listener", || {
            let client = client.clone();
            async move {
                let body = client
                    .get(format!("http://{admin}/listeners?format=json"))
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                let port =
                    v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        .as_u64()?;
                u16::try_from(port).ok().filter(|p| *p != 0)
            }
        })
        .await;
        envoy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Envoy's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare HTTP/2 gRPC endpoint that records each request message's bytes and
/// answers every call with an OK CheckResponse. Used to capture exactly what
/// Envoy sends.
pub struct CaptureServer {
    pub addr: SocketAddr,
    pub captured: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl CaptureServer {
    pub async fn start() -> CaptureServer {
        use bytes::Bytes;
        use http_body_util::{BodyExt, StreamBody};
        use hyper::body::Frame;
        use prost::Message;

        let ok = keyward::pb::envoy::service::auth::v3::CheckResponse {
            status: Some(keyward::pb::google::rpc::Status::default()),
            ..Default::default()
        }
        .encode_to_vec();
        let framed = keyward::wire::frame_message(&ok);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, captured) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let framed = framed.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let tx = tx.clone();
                            let framed = framed.clone();
                            async move {
                                let path = req.uri().path().to_owned();
                                let body = req.into_body().collect().await?.to_bytes();
                                // Envoy's active health check: answer SERVING.
                                let framed = if path == "/grpc.health.v1.Health/Check" {
                                    Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01])
                                } else {
                                    if body.len() >= 5 {
                                        let _ = tx.send((path, body[5..].to_vec()));
                                    }
                                    framed
                                };
                                let mut trailers = hyper::HeaderMap::new();
                                trailers.insert(
                                    "grpc-status",
                                    hyper::header::HeaderValue::from_static("0"),
                                );
                                let frames: Vec<Result<Frame<Bytes>, hyper::Error>> =
                                    vec![Ok(Frame::data(framed)), Ok(Frame::trailers(trailers))];
                                let body = StreamBody::new(futures_stream(frames));
                                Ok::<_, hyper::Error>(
                                    hyper::Response::builder()
                                        .header("content-type", "application/grpc")
                                        .body(body)
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        CaptureServer { addr, captured }
    }
}

fn futures_stream<T: Send + 'static>(items: Vec<T>) -> tokio_stream::Iter<std::vec::IntoIter<T>> {
    tokio_stream::iter(items)
}

/// Kills a child process when dropped, so a failing test leaves nothing behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
