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

use jiff::Timestamp;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic_health::ServingStatus;

use crate::grpc::{CHECK_SERVICE, GrpcService};
use crate::keyfile::{self, KeyFileError, ParseOptions};
use crate::reload::{self, ReloadSettings, Reloader, Watch};
use crate::ring::{KeyRing, UsageRegistry};
use crate::service::{AuthzService, Shared};

/// How long in-flight checks may take to drain after shutdown is requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `grpc.health.v1` request accepted: a service name, with room.
pub const HEALTH_MESSAGE_BYTES: usize = 4096;

/// What `serve` needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// The key file.
    pub keys: PathBuf,
    /// Accept a key file with no keys.
    pub allow_empty: bool,
    /// Watch the key file's directory with inotify.
    pub watch: bool,
    /// Poll the key file's metadata this often (`None`: no polling unless
    /// the watch cannot be set up).
    pub poll_interval: Option<Duration>,
    /// Reload on SIGHUP.
    pub sighup: bool,
    /// Log one decision in this many (0: none).
    pub decision_log_every: u64,
    /// Brute-force lockout settings.
    pub lockout: crate::lockout::LockoutConfig,
    /// Trusted `x-forwarded-for` hops for the client address (0: peer address).
    pub xff_trusted_hops: usize,
    /// Threads a reload of a large file may keep busy (start-up uses every
    /// CPU); see [`keyfile::Threads`].
    pub reload_threads: keyfile::Threads,
}

impl Config {
    /// A config with the defaults `keyward serve` uses.
    pub fn new(keys: impl Into<PathBuf>) -> Config {
        Config {
            keys: keys.into(),
            allow_empty: false,
            watch: true,
            poll_interval: Some(DEFAULT_POLL_INTERVAL),
            sighup: true,
            decision_log_every: 0,
            lockout: crate::lockout::LockoutConfig::default(),
            xff_trusted_hops: 0,
            reload_threads: keyfile::Threads::spare_one(),
        }
    }
}

/// Default polling fallback interval.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Polling interval used when inotify is unavailable and polling was off.
pub const FALLBACK_POLL_INTERVAL: Duration = Duration::from_secs(1);

impl Config {
    /// Parse options implied by this config, for the first load: with
    /// nothing to serve yet, it uses every CPU.
    pub fn parse_options(&self) -> ParseOptions {
        ParseOptions {
            allow_empty: self.allow_empty,
            threads: keyfile::Threads::all(),
        }
    }

    /// Parse options for reloads, which share the CPUs with the checks.
    pub fn reload_options(&self) -> ParseOptions {
        ParseOptions {
            threads: self.reload_threads,
            ..self.parse_options()
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
    /// A TCP socket speaking TLS (mutual TLS when the files name a client CA).
    Tls(TcpListener, Arc<crate::tls::TlsReloader>),
}

/// A loaded, ready-to-run sidecar.
#[derive(Debug)]
pub struct Server {
    config: Config,
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
    signal: Arc<reload::Signal>,
    watch: Option<Arc<Watch>>,
}

impl Server {
    /// Reads and validates the key file and builds the first ring.
    pub fn load(mut config: Config) -> Result<Server, KeyFileError> {
        // The watch is set up before the first read, so a change racing with
        // startup is not missed.
        let signal = Arc::new(reload::Signal::new());
        let watch = if config.watch {
            match Watch::start(&config.keys, Arc::clone(&signal)) {
                Ok(w) => Some(Arc::new(w)),
                Err(e) => {
                    let every = config.poll_interval.unwrap_or(FALLBACK_POLL_INTERVAL);
                    config.poll_interval = Some(every);
                    tracing::warn!(
                        error = %e,
                        "cannot watch the key file's directory (inotify unavailable or exhausted); \
                         falling back to polling every {every:?}"
                    );
                    None
                }
            }
        } else {
            None
        };
        let started = std::time::Instant::now();
        let options = config.parse_options();
        // Before the read: a change written while the ring is read and built
        // (seconds, for a large file) must look like a change to the poll.
        let read_stamp = crate::reload::stamp(&config.keys);
        let bytes = keyfile::read_on(&config.keys, options.threads)?;
        let read = started.elapsed();
        let fingerprint = keyfile::fingerprint(&bytes);
        let lockout = config.lockout;
        let usage = UsageRegistry::default();
        // A large file is hashed on a thread of its own at a low priority,
        // beside the parse where CPUs are to spare, else once the ring
        // serves; the ring never waits for the hash, which is filled in (and
        // logged) when it finishes.
        let bytes = Arc::new(bytes);
        let mut hashing = keyfile::Hashing::start(
            &bytes,
            keyfile::DEFER_DIGEST_MIN_BYTES,
            options.threads,
            || {
                crate::priority::lower_current();
            },
        );
        let file = keyfile::parse_bytes_for_ring(&config.keys, &bytes, options)?;
        let parsed = started.elapsed();
        let ring = KeyRing::build_parsed(
            &file,
            1,
            Timestamp::now(),
            hashing.cell().clone(),
            &usage,
            None,
            options.threads,
        );
        hashing.resume();
        let sha256 = ring.file_sha256();
        tracing::info!(
            target: "keyward::audit",
            generation = 1,
            sha256 = %sha256.map_or_else(|| "pending".to_string(), hex::encode),
            keys = ring.len(),
            path = %config.keys.display(),
            read_ms = read.as_millis(),
            parse_ms = (parsed - read).as_millis(),
            build_ms = (started.elapsed() - parsed).as_millis(),
            "key ring loaded"
        );
        let shared = Arc::new(Shared::new(ring, usage, lockout));
        let reloader = Arc::new(Reloader::new(
            config.keys.clone(),
            config.reload_options(),
            Arc::clone(&shared),
        ));
        reloader.note_read_stamp(read_stamp);
        reloader.note_serving(1, fingerprint);
        // The parsed file is garbage now. It borrows the file's bytes, so it
        // is freed here: quickly for the fast path's compact form (a few
        // large allocations); a file the full validator read costs a free
        // per key. The pages go back to the OS off the critical path when
        // the hash is still running, so the resident set starts at its
        // steady state.
        drop(file);
        drop(bytes);
        let mut cleanup = move || {
            hashing.finish(1, sha256.is_none());
            crate::ring::release_free_memory();
        };
        if sha256.is_none() {
            let spawned = std::thread::Builder::new()
                .name("keyward-load".into())
                .spawn(cleanup);
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to finish loading");
            }
        } else {
            cleanup();
        }
        Ok(Server {
            config,
            shared,
            reloader,
            signal,
            watch,
        })
    }

    /// State shared with the service (for tests and embedding).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// The reloader following the key file.
    pub fn reloader(&self) -> Arc<Reloader> {
        Arc::clone(&self.reloader)
    }

    /// Directories watched for changes (empty when polling only).
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        self.watch.as_ref().map_or_else(Vec::new, |w| w.dirs())
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

        let reload_task = tokio::spawn(reload::run(
            Arc::clone(&self.reloader),
            Arc::clone(&self.signal),
            ReloadSettings {
                watch: self.watch.clone(),
                poll_interval: self.config.poll_interval,
                #[cfg(unix)]
                sighup: if self.config.sighup {
                    reload::listen_sighup()
                } else {
                    None
                },
            },
            stop_rx.clone(),
        ));

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(CHECK_SERVICE, ServingStatus::Serving)
            .await;
        let authz = AuthzService::new(Arc::clone(&self.shared))
            .with_decision_log(self.config.decision_log_every)
            .with_xff_trusted_hops(self.config.xff_trusted_hops);
        // A HealthCheckRequest is a service name: tonic would otherwise
        // reserve up to its 4 MiB default for each one a prefix declares.
        let health_service = health_service.max_decoding_message_size(HEALTH_MESSAGE_BYTES);
        let service = GrpcService::new(authz, tonic::service::Routes::new(health_service));

        let admin_addr = admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into());
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

        let grpc_addr = match &grpc {
            GrpcListener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            GrpcListener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_default(),
            GrpcListener::Tls(l, _) => l
                .local_addr()
                .map(|a| format!("{a} (TLS)"))
                .unwrap_or_default(),
        };
        tracing::info!(
            grpc = %grpc_addr,
            admin = %admin_addr,
            keys = %self.config.keys.display(),
            watching = ?self.watched_dirs(),
            poll_interval = ?self.config.poll_interval,
            "keyward serving"
        );

        // Health turns NOT_SERVING as soon as shutdown begins, while the
        // connections drain: a client watching it learns before they close.
        {
            let health = health.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                if stop.wait_for(|stop| *stop).await.is_ok() {
                    health
                        .set_service_status(CHECK_SERVICE, ServingStatus::NotServing)
                        .await;
                }
            });
        }
        match grpc {
            GrpcListener::Tcp(l) => {
                let incoming = TcpListenerStream::new(l).map(|conn| {
                    conn.inspect(|s| {
                        let _ = s.set_nodelay(true);
                    })
                });
                crate::grpc::serve(incoming, service, stop_rx.clone(), DRAIN_TIMEOUT).await;
            }
            GrpcListener::Unix(l) => {
                let incoming = UnixListenerStream::new(l);
                crate::grpc::serve(incoming, service, stop_rx.clone(), DRAIN_TIMEOUT).await;
            }
            GrpcListener::Tls(l, tls) => {
                tokio::spawn(Arc::clone(&tls).follow(
                    self.config.poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL),
                    stop_rx.clone(),
                ));
                let incoming = crate::tls::incoming(l, tls);
                crate::grpc::serve(incoming, service, stop_rx.clone(), DRAIN_TIMEOUT).await;
            }
        }
        reload_task.abort();
        drop(self.watch);
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
