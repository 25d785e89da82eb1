//! The running sidecar: loads the first ring, then serves the Check service
//! (plus `grpc.health.v1`) and the admin HTTP listener until shutdown.
//!
//! `Server::load` does everything that can fail because of the key file, so
//! `keyward serve` refuses to start on a bad file; `Server::run` takes
//! listeners that are already bound, so tests run the real server on port 0.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jiff::Timestamp;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::keyfile::{self, KeyFileError, ParseOptions};
use crate::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use crate::ring::{KeyRing, RingHandle, RingSource, UsageRegistry};
use crate::service::{AuthzService, Shared};
use crate::stats::CheckStats;

/// How long in-flight checks may take to drain after shutdown is requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `serve` needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// The key file.
    pub keys: PathBuf,
    /// Accept a key file with no keys.
    pub allow_empty: bool,
}

impl Config {
    /// Parse options implied by this config.
    pub fn parse_options(&self) -> ParseOptions {
        ParseOptions {
            allow_empty: self.allow_empty,
        }
    }
}

/// Where the gRPC service listens.
#[derive(Debug)]
pub enum GrpcListener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix domain socket.
    Unix(UnixListener),
}

/// A loaded, ready-to-run sidecar.
#[derive(Debug)]
pub struct Server {
    config: Config,
    shared: Arc<Shared>,
}

impl Server {
    /// Reads and validates the key file and builds the first ring.
    pub fn load(config: Config) -> Result<Server, KeyFileError> {
        let (file, bytes) = keyfile::load(&config.keys, config.parse_options())?;
        let usage = UsageRegistry::default();
        let source = RingSource {
            generation: 1,
            sha256: crate::decide::digest_bytes(&bytes),
            loaded_at: Timestamp::now(),
        };
        let ring = KeyRing::build(&file, source, &usage, None);
        tracing::info!(
            target: "keyward::audit",
            generation = 1,
            sha256 = %hex::encode(source.sha256),
            keys = ring.len(),
            path = %config.keys.display(),
            "key ring loaded"
        );
        Ok(Server {
            config,
            shared: Arc::new(Shared {
                ring: RingHandle::new(ring),
                usage,
                stats: CheckStats::default(),
            }),
        })
    }

    /// State shared with the service (for tests and embedding).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// The configuration the server was loaded with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` resolves, then drains in-flight checks (bounded
    /// by [`DRAIN_TIMEOUT`]) and returns.
    pub async fn run(
        self,
        grpc: GrpcListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<AuthorizationServer<AuthzService>>()
            .await;

        let authz = AuthorizationServer::new(AuthzService::new(Arc::clone(&self.shared)));
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(authz);

        let admin_task = admin.map(|listener| {
            let app = crate::admin::router(Arc::clone(&self.shared));
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    })
                    .await
            })
        });

        let mut rx = stop_rx.clone();
        let signal = async move {
            let _ = rx.wait_for(|stop| *stop).await;
            tracing::info!("shutting down: draining in-flight checks");
        };
        let serve: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match grpc {
            GrpcListener::Tcp(l) => {
                let incoming = TcpListenerStream::new(l).map(|conn| {
                    conn.inspect(|s| {
                        let _ = s.set_nodelay(true);
                    })
                });
                Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
            }
            GrpcListener::Unix(l) => {
                Box::pin(router.serve_with_incoming_shutdown(UnixListenerStream::new(l), signal))
            }
        };

        let mut rx = stop_rx.clone();
        let deadline = async move {
            let _ = rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        tokio::select! {
            res = serve => res.context("gRPC server failed")?,
            () = deadline => tracing::warn!("drain timed out after {DRAIN_TIMEOUT:?}; closing remaining connections"),
        }
        health
            .set_not_serving::<AuthorizationServer<AuthzService>>()
            .await;
        if let Some(task) = admin_task {
            match tokio::time::timeout(Duration::from_secs(2), task).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin listener failed"),
                Ok(_) => {}
                Err(_) => tracing::warn!("admin listener did not stop in time"),
            }
        }
        Ok(())
    }
}
