//! TLS (and optional mutual TLS) on the gRPC listener, for keyward run as a
//! shared service reached over the network.
//!
//! The rustls server configuration sits behind an `ArcSwap` and is read once
//! per accepted connection, so replacing the certificate, key or client CA on
//! disk takes effect for new connections without a restart — the same
//! watch → debounce → load → swap-or-keep pipeline as the key file. A broken
//! certificate file never replaces a working configuration.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files TLS is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    /// The offending file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

fn err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Builds a server configuration from the files (HTTP/2 only, as gRPC needs).
pub fn load(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| err(&files.cert, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&files.cert, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            &files.cert,
            "no certificate found (expected PEM CERTIFICATE blocks)",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| err(&files.key, format!("cannot read a private key: {e}")))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&files.cert, e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca)
                .map_err(|e| err(ca, format!("cannot read the client CA: {e}")))?;
            for c in cas {
                let c = c.map_err(|e| err(ca, format!("invalid PEM: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| err(ca, format!("unusable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(err(ca, "no CA certificate found"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        err(
            &files.key,
            format!("the key does not fit the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The live TLS configuration and the files it follows.
#[derive(Debug)]
pub struct TlsReloader {
    files: TlsFiles,
    config: ArcSwap<rustls::ServerConfig>,
}

impl TlsReloader {
    /// Loads the files (errors here are startup errors).
    pub fn new(files: TlsFiles) -> Result<TlsReloader, TlsError> {
        let config = load(&files)?;
        Ok(TlsReloader {
            files,
            config: ArcSwap::new(config),
        })
    }

    /// Reloads the files; on failure the current configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = load(&self.files)?;
        self.config.store(config);
        tracing::info!(target: "keyward::audit", cert = %self.files.cert.display(), "TLS configuration reloaded");
        Ok(())
    }

    /// The current configuration.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.config.load_full()
    }

    /// Follows the files until `stop`: filesystem events on their
    /// directories (debounced) and a metadata poll as a fallback.
    pub async fn follow(
        self: Arc<Self>,
        poll: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let signal = Arc::new(crate::reload::Signal::new());
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        let _watches: Vec<_> = paths
            .iter()
            .filter_map(|p| crate::reload::Watch::start(p, Arc::clone(&signal)).ok())
            .collect();
        let stamps = || {
            paths
                .iter()
                .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                .collect::<Vec<_>>()
        };
        let mut last = stamps();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        loop {
            let stopped = async {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                () = stopped => return,
                () = signal.notified() => {
                    tokio::time::sleep(crate::reload::DEBOUNCE).await;
                }
                _ = tick.tick() => {
                    if stamps() == last {
                        continue;
                    }
                }
            }
            last = stamps();
            let me = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || me.reload()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(
                    target: "keyward::audit",
                    error = %e,
                    "TLS files rejected; the previous TLS configuration keeps serving"
                ),
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    }
}

/// A TLS connection handed to the gRPC server.
#[derive(Debug)]
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<std::net::SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes off the accept loop
/// (a slow or hostile client cannot stall others); yields finished
/// connections. Failed handshakes are logged at debug level and dropped.
/// The listening socket closes as soon as the stream of connections is
/// dropped (the server stopped), not at the next connection attempt.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Transient (e.g. EMFILE): back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = conn_tx.send(Ok(TlsConn(stream))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
