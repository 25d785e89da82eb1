//! The `keyward` command line: argument definitions and the `serve` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::server::{Config, GrpcListener, Server};

/// Envoy ext_authz sidecar that verifies API keys and makes rotation a non-event.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the ext_authz gRPC API from a key file.
    Serve(ServeArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// `keyward serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The key file (TOML).
    #[arg(long, value_name = "FILE")]
    pub keys: PathBuf,
    /// gRPC listen address: HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Admin HTTP listen address (keep it on loopback).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9911")]
    pub admin: String,
    /// Accept a key file with no keys (normally refused as a likely truncated write).
    #[arg(long)]
    pub allow_empty: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Fallback check of the key file for changes inotify may miss (network or
    /// overlay filesystems); `0s` turns polling off.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration_arg)]
    pub poll_interval: Duration,
    /// Do not watch the key file's directory with inotify (poll only).
    #[arg(long)]
    pub no_watch: bool,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::keyfile::parse_duration(s)
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            match serve(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("keyward: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KEYWARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::new(args.keys.clone());
    config.allow_empty = args.allow_empty;
    config.watch = !args.no_watch;
    config.poll_interval = (!args.poll_interval.is_zero()).then_some(args.poll_interval);
    if !config.watch && config.poll_interval.is_none() {
        anyhow::bail!("--no-watch with --poll-interval 0s would never reload: allow one of them");
    }
    // Everything that depends on the key file happens before any listener is
    // bound, so a bad file is a startup error, not a server with no keys.
    let server = Server::load(config).map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyward")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let grpc = bind_grpc(&args.listen).await?;
        let admin = tokio::net::TcpListener::bind(&args.admin)
            .await
            .with_context(|| format!("cannot bind the admin listener on {}", args.admin))?;
        server.run(grpc, Some(admin), shutdown_signal()).await
    })
}

async fn bind_grpc(addr: &str) -> anyhow::Result<GrpcListener> {
    if let Some(path) = addr.strip_prefix("unix:") {
        // A stale socket from a previous run would make bind fail.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove stale socket {path}")),
        }
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot bind the gRPC listener on unix:{path}"))?;
        return Ok(GrpcListener::Unix(l));
    }
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the gRPC listener on {addr}"))?;
    Ok(GrpcListener::Tcp(l))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
