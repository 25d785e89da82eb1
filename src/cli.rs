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
    /// Manage the keys in a key file.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Probe a running server's admin endpoint (for exec probes in images
    /// without curl): exits 0 if it answers 200.
    Probe {
        /// The server's admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9911")]
        admin: String,
        /// `readyz` or `healthz`.
        #[arg(value_parser = ["readyz", "healthz"], default_value = "readyz")]
        endpoint: String,
    },
    /// Show per-key usage from a running server and which old keys are safe to retire.
    Status {
        /// The server's admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9911")]
        admin: String,
        /// A deprecated or superseded key unused for this long is safe to retire.
        #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_duration_arg)]
        idle: Duration,
    },
}

/// `keyward keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Add a key for a client; prints the new secret, alone, on stdout.
    New {
        /// The key file (created if missing).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// The client the key authenticates.
        #[arg(long, value_name = "NAME")]
        client: String,
        /// Key id (default: <client>-<yyyymmdd>-<random>).
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Scopes to grant, comma-separated.
        #[arg(long, value_name = "A,B", value_parser = crate::keys::parse_scope_list)]
        scopes: Option<crate::keys::ScopeList>,
        /// Expire this long after it becomes valid (e.g. 90d; at least 1s).
        #[arg(long, value_name = "DURATION", value_parser = parse_lifetime)]
        expires_in: Option<Duration>,
        /// Not valid before this time (RFC 3339).
        #[arg(long, value_name = "TIME", value_parser = crate::keyfile::parse_time)]
        not_before: Option<jiff::Timestamp>,
        /// Free text stored with the key.
        #[arg(long)]
        description: Option<String>,
    },
    /// Add a new key for a client and deprecate its active keys after a grace window.
    Rotate {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// The client whose keys rotate.
        #[arg(long, value_name = "NAME")]
        client: String,
        /// Id of the new key.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// How long the old keys keep working.
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration_arg)]
        grace: Duration,
        /// Scopes of the new key (default: the scopes of the client's newest
        /// active key valid now, else of its newest active key, else of its
        /// newest key; the new key also takes that key's rate limit).
        #[arg(long, value_name = "A,B", value_parser = crate::keys::parse_scope_list)]
        scopes: Option<crate::keys::ScopeList>,
    },
    /// Mark a key revoked (denied from the next reload).
    Revoke {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// The key to revoke.
        #[arg(long, value_name = "ID")]
        id: String,
    },
    /// Restore the file as it was before the last keyward edit.
    Rollback {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Show the keys (no digests).
    List {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Validate a key file; prints file:line:column: message for each problem.
    Check {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Accept a file with no keys.
        #[arg(long)]
        allow_empty: bool,
    },
    /// Read a secret on stdin and print its SHA-256 (hex).
    Hash,
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
    /// The key file (TOML; JSON when its name ends in `.json`).
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
    /// Do not watch the key file's directory with inotify (poll only; with
    /// `--poll-interval 0s`, reload only on SIGHUP).
    #[arg(long)]
    pub no_watch: bool,
    /// Threads a reload of a large key file may keep busy at once (reading,
    /// parsing, hashing, indexing). 0: one per CPU but one, at least one,
    /// so that with two CPUs or more checks always find one free. Start-up
    /// uses every CPU.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub reload_threads: usize,
    /// Log this fraction of decisions (0 to 1) with key id, client, decision
    /// and reason, never the secret.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0, value_parser = parse_fraction)]
    pub decision_log_sample: f64,
    /// Failed checks (unknown or malformed key) from one source within the
    /// window that lock it out; 0 turns lockout off.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub lockout_threshold: u32,
    /// The window in which failures are counted.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_positive_duration)]
    pub lockout_window: Duration,
    /// How long a locked-out source is denied.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_positive_duration)]
    pub lockout_duration: Duration,
    /// Most sources tracked for lockout at once (memory bound).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub lockout_max_sources: usize,
    /// Count an IPv6 client by its network of this many bits (64: a host's
    /// /64; 128: each address).
    #[arg(long, value_name = "BITS", default_value_t = 64,
          value_parser = clap::value_parser!(u8).range(0..=128))]
    pub lockout_ipv6_prefix: u8,
    /// Take the client address from the N-th x-forwarded-for entry from the
    /// right (the proxies in front of Envoy that you trust); 0 uses the peer
    /// address Envoy reports.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub xff_trusted_hops: usize,
    /// Serve gRPC over TLS with this PEM certificate chain (reloaded when it changes).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates chaining to this PEM CA bundle (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Permissions of the socket for --listen unix:PATH (octal). The default
    /// lets the owner and group connect: run Envoy in keyward's group.
    #[arg(long, value_name = "MODE", default_value = "660", value_parser = parse_mode)]
    pub socket_mode: u32,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode such as 660"))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::keyfile::parse_duration(s)
}

/// A duration that must not be zero: a lockout window or a lockout that
/// lasts no time (`--lockout-threshold 0` turns lockout off).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration_arg(s)? {
        d if d.is_zero() => Err(format!("{s:?} is no time at all; give a longer duration")),
        d => Ok(d),
    }
}

/// A key's lifetime: at least a second, since expiry times are kept in
/// whole seconds (a shorter one could end before the key is written).
fn parse_lifetime(s: &str) -> Result<Duration, String> {
    match parse_duration_arg(s)? {
        d if d < Duration::from_secs(1) => Err(format!(
            "{s:?} is shorter than a second, and expiry times are whole seconds"
        )),
        d => Ok(d),
    }
}

/// Writes `text` to standard output and flushes it.
fn emit(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// [`emit`]; the exit code: a failure is reported (a closed pipe, as in
/// `keyward keys list | head -1`, only in the code).
fn emit_or_fail(text: &str, code: ExitCode) -> ExitCode {
    match emit(text) {
        Ok(()) => code,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("keyward: cannot write to standard output: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs a `keys new` or `keys rotate` edit, printing the new key's secret
/// once the edit has validated and before it is written
/// ([`crate::keys::edit_when`]), so a secret that cannot be handed over (a
/// full disk behind `> acme.secret`) is never a key. A failure is reported
/// here, with a word on a secret already printed; the exit code.
fn issue(
    file: &std::path::Path,
    change: impl FnOnce(
        &mut toml_edit::DocumentMut,
    ) -> Result<crate::keys::Added, crate::edit::EditError>,
) -> Result<crate::keys::Added, ExitCode> {
    let mut printed = false;
    let result = crate::keys::edit_when(file, change, |added| {
        emit(&format!("{}\n", added.secret)).map_err(|e| {
            crate::edit::EditError::Refused(format!(
                "cannot write the new secret to standard output ({e}); the key file was not changed"
            ))
        })?;
        printed = true;
        Ok(())
    });
    result.map_err(|e| {
        eprintln!("keyward: {e}");
        if printed {
            eprintln!(
                "keyward: the key was not saved: the secret printed above works nowhere; discard it"
            );
        }
        ExitCode::FAILURE
    })
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keys(cmd) => keys_command(cmd),
        Command::Probe { admin, endpoint } => {
            let url = format!("http://{admin}/{endpoint}");
            let answer = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        let client = reqwest::Client::builder()
                            .timeout(Duration::from_secs(2))
                            .build()?;
                        Ok(client.get(&url).send().await?.status())
                    })
                });
            match answer {
                Ok(s) if s.is_success() => ExitCode::SUCCESS,
                Ok(s) => {
                    eprintln!("keyward: {url} answered {s}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("keyward: {url}: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { admin, idle } => {
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(crate::status::fetch(&admin)));
            match report {
                Ok(r) => emit_or_fail(
                    &crate::status::render(&r, jiff::Timestamp::now(), idle),
                    ExitCode::SUCCESS,
                ),
                Err(e) => {
                    eprintln!("keyward: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
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

fn keys_command(cmd: KeysCommand) -> ExitCode {
    use crate::keys;
    let now = jiff::Timestamp::now();
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("keyward: {e}");
        ExitCode::FAILURE
    };
    let fmt_expiry =
        |t: Option<jiff::Timestamp>| t.map_or_else(|| "never".to_owned(), |t| t.to_string());
    match cmd {
        KeysCommand::New {
            file,
            client,
            id,
            scopes,
            expires_in,
            not_before,
            description,
        } => {
            let spec = keys::NewKey {
                id,
                client,
                scopes: scopes.map(|s| s.0).unwrap_or_default(),
                expires_in,
                not_before,
                description,
            };
            match issue(&file, |doc| keys::new_key(doc, &spec, now)) {
                Ok(added) => {
                    eprintln!(
                        "keyward: added key {} for client {} to {} (scopes: {}; expires: {})",
                        added.id,
                        spec.client,
                        file.display(),
                        if spec.scopes.is_empty() {
                            "none".into()
                        } else {
                            spec.scopes.join(",")
                        },
                        fmt_expiry(added.expires_at),
                    );
                    eprintln!(
                        "keyward: the secret above is shown only once; hand it to the client now"
                    );
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        KeysCommand::Rotate {
            file,
            client,
            id,
            grace,
            scopes,
        } => {
            match issue(&file, |doc| {
                keys::rotate(doc, &client, id, scopes.map(|s| s.0), grace, now)
            }) {
                Ok(added) => {
                    eprintln!(
                        "keyward: added key {} for client {client} to {}",
                        added.id,
                        file.display()
                    );
                    for (id, until) in &added.deprecated {
                        eprintln!("keyward: deprecated {id}; it keeps working until {until}");
                    }
                    for id in &added.scheduled {
                        eprintln!(
                            "keyward: left {id} as it is: it is not valid yet, so it does not rotate"
                        );
                    }
                    eprintln!(
                        "keyward: the secret above is shown only once; hand it to the client now"
                    );
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        KeysCommand::Revoke { file, id } => match keys::edit(&file, |doc| keys::revoke(doc, &id)) {
            Ok(true) => {
                eprintln!("keyward: revoked {id} in {}", file.display());
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("keyward: {id} was already revoked; nothing changed");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        KeysCommand::Rollback { file } => match keys::rollback(&file) {
            Ok(done) => {
                eprintln!(
                    "keyward: restored {} from history entry {}",
                    file.display(),
                    done.entry
                );
                if let Some(undone) = done.undone {
                    eprintln!(
                        "keyward: the version it replaced is kept as {}",
                        undone.display()
                    );
                }
                for id in &done.revived {
                    eprintln!(
                        "keyward: warning: {id} works again (it was revoked or absent before the rollback)"
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        KeysCommand::List { file } => match keys::list(&file, now) {
            Ok(table) => emit_or_fail(&table, ExitCode::SUCCESS),
            Err(e) => fail(&e),
        },
        KeysCommand::Check { file, allow_empty } => {
            match crate::keyfile::load(
                &file,
                crate::keyfile::ParseOptions {
                    allow_empty,
                    ..Default::default()
                },
            ) {
                Ok((f, _)) => {
                    let count = |s| f.keys.iter().filter(|k| k.state == s).count();
                    let report = format!(
                        "{}: OK, {} key{} ({} active, {} deprecated, {} revoked)\n",
                        file.display(),
                        f.keys.len(),
                        if f.keys.len() == 1 { "" } else { "s" },
                        count(crate::keyfile::KeyState::Active),
                        count(crate::keyfile::KeyState::Deprecated),
                        count(crate::keyfile::KeyState::Revoked),
                    );
                    emit_or_fail(&report, ExitCode::SUCCESS)
                }
                Err(e) => emit_or_fail(&format!("{e}\n"), ExitCode::FAILURE),
            }
        }
        KeysCommand::Hash => match keys::hash(keys::stdin()) {
            Ok(h) => emit_or_fail(&format!("{h}\n"), ExitCode::SUCCESS),
            Err(e) => fail(&e),
        },
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
    crate::ring::configure_allocator();
    let mut config = Config::new(args.keys.clone());
    config.allow_empty = args.allow_empty;
    config.reload_threads = match args.reload_threads {
        0 => crate::keyfile::Threads::spare_one(),
        n => crate::keyfile::Threads::new(n),
    };
    config.watch = !args.no_watch;
    config.decision_log_every = crate::service::sample_every(args.decision_log_sample);
    config.lockout = crate::lockout::LockoutConfig {
        threshold: args.lockout_threshold,
        window: args.lockout_window,
        duration: args.lockout_duration,
        max_sources: args.lockout_max_sources.max(1),
        ipv6_prefix: args.lockout_ipv6_prefix,
    };
    config.xff_trusted_hops = args.xff_trusted_hops;
    config.poll_interval = (!args.poll_interval.is_zero()).then_some(args.poll_interval);
    if !config.watch && config.poll_interval.is_none() {
        tracing::info!(
            "--no-watch with --poll-interval 0s: the key file is reloaded only on SIGHUP"
        );
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
        let mut grpc = bind_grpc(&args.listen, args.socket_mode).await?;
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            let GrpcListener::Tcp(l) = grpc else {
                anyhow::bail!("TLS needs a TCP --listen address, not a Unix socket");
            };
            let files = crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.client_ca.clone(),
            };
            let tls = crate::tls::TlsReloader::new(files)
                .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
            grpc = GrpcListener::Tls(l, std::sync::Arc::new(tls));
        }
        let admin = tokio::net::TcpListener::bind(&args.admin)
            .await
            .with_context(|| format!("cannot bind the admin listener on {}", args.admin))?;
        server.run(grpc, Some(admin), shutdown_signal()).await
    })
}

async fn bind_grpc(addr: &str, socket_mode: u32) -> anyhow::Result<GrpcListener> {
    if let Some(path) = addr.strip_prefix("unix:") {
        // A stale socket from a previous run would make bind fail.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove stale socket {path}")),
        }
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot bind the gRPC listener on unix:{path}"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))
                .with_context(|| format!("cannot set the permissions of unix:{path}"))?;
        }
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
