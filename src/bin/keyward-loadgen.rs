//! `keyward-loadgen`: a gRPC load generator for Envoy ext_authz servers.
//!
//! It opens `--connections` separate HTTP/2 connections and keeps up to
//! `--streams` Check calls in flight on each, the way Envoy multiplexes many
//! requests over few connections. Requests look like what Envoy 1.40 sends
//! (see `tests/data/envoy-1.40-check-request.bin`).
//!
//! The client has to be cheaper than the servers it measures, or it measures
//! itself: on a small machine it shares the CPUs with the server. So it
//! speaks HTTP/2 through `h2` directly, encodes each request by patching a
//! pre-encoded template (a fresh request id, and a fresh random key for
//! invalid ones), and reads only the response fields it verifies.
//!
//! Two modes:
//!
//! * closed loop (default): every stream sends its next request as soon as the
//!   previous one is answered; this measures maximum throughput.
//! * open loop (`--rate R`): requests are scheduled at fixed intervals by a
//!   pacing thread, whatever the server does, and latency is measured from
//!   each request's *scheduled* send time, so a stalled server cannot hide its
//!   stall by slowing the client down (no coordinated omission). `--streams`
//!   bounds the calls in flight per connection; a request that waits for a
//!   free stream is charged that wait.
//!
//! Only requests started (closed loop) or scheduled (open loop) after
//! `--warmup` are counted. With `--verify` every response is checked: gRPC
//! status OK, allowed for a valid key, denied with HTTP 401 for an invalid one.
//! Exit status: 0 fine, 1 a decision mismatched, 2 errors under `--verify` or
//! not a single successful call, 3 bad arguments or setup failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use hyper::header::{CONTENT_TYPE, HeaderValue, TE};
use keyward::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use prost::Message as _;

/// Load generator for gRPC ext_authz (envoy.service.auth.v3.Authorization/Check) servers.
#[derive(Debug, Parser)]
#[command(name = "keyward-loadgen", version)]
struct Args {
    /// Server address: http://HOST:PORT or unix:PATH.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Separate HTTP/2 connections to open.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Concurrent in-flight calls per connection.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// How long to measure, after the warmup.
    #[arg(long, default_value = "10s", value_parser = keyward::keyfile::parse_duration)]
    duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "2s", value_parser = keyward::keyfile::parse_duration)]
    warmup: Duration,
    /// Open loop: send this many requests per second in total, on a fixed
    /// schedule. Without it, run closed loop at maximum throughput.
    #[arg(long, value_name = "REQ_PER_SEC")]
    rate: Option<f64>,
    /// File of valid secrets, one per line (blank lines and `#` comments ignored).
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// A valid secret (repeatable); added to those from --keys.
    #[arg(long = "key", value_name = "SECRET")]
    key: Vec<String>,
    /// Fraction of requests carrying a random, invalid key instead.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    invalid_fraction: f64,
    /// Check every response: gRPC OK; allowed for valid keys; denied with 401
    /// for invalid ones. Mismatches make the exit status 1.
    #[arg(long, alias = "expect-allowed")]
    verify: bool,
    /// The route's `required_scopes` context extension (empty: none).
    #[arg(long, default_value = "trade")]
    required_scopes: String,
    /// Request path (and `:path`) of the simulated HTTP request.
    #[arg(long, default_value = "/trade/orders?side=buy")]
    path: String,
    /// Deadline of each call; a call that misses it counts as an error.
    #[arg(long, default_value = "5s", value_parser = keyward::keyfile::parse_duration)]
    timeout: Duration,
    /// Also report this process's CPU time (from /proc/PID/stat) over the
    /// measured window, per request: the server's cost per check.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Runtime worker threads (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one line of JSON instead of the human-readable report.
    #[arg(long)]
    json: bool,
    /// Also write every measured call to FILE, one line each, in order of
    /// its scheduled (open loop) or send (closed loop) time; that time in
    /// nanoseconds of CLOCK_MONOTONIC, its latency in microseconds, and
    /// `A` (allowed), `D` (denied) or `E` (error). Other programs' clocks
    /// (Python's `time.monotonic_ns()`, for one) read the same clock, so
    /// calls can be matched with what happened meanwhile.
    #[arg(long, value_name = "FILE")]
    timeline: Option<PathBuf>,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyward-loadgen: runtime: {e}");
            return std::process::ExitCode::from(3);
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("keyward-loadgen: {e:#}");
            std::process::ExitCode::from(3)
        }
    }
}

/// A small, fast PRNG (SplitMix64); statistical quality is plenty for
/// picking keys and making request ids.
struct Rng(u64);

impl Rng {
    fn seeded(stream: u64) -> Rng {
        let mut seed = [0u8; 8];
        // A fixed seed is an acceptable fallback: only key choice depends on it.
        let _ = getrandom::fill(&mut seed);
        Rng(u64::from_le_bytes(seed) ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Writes a version-4-shaped UUID, like Envoy's `x-request-id`, into
    /// `out` (36 bytes).
    fn uuid_into(&mut self, out: &mut [u8]) {
        use std::io::Write as _;
        let (a, b) = (self.next(), self.next());
        let mut out = &mut out[..UUID_LEN];
        // Exactly 36 bytes, written into a 36-byte slice: it cannot fail.
        let _ = write!(
            out,
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        );
    }

    /// Writes a random key that no ring holds into `out` (44 bytes): 40
    /// alphanumerics after a prefix that is not keyward's `kw_`, so a server
    /// has to look it up to reject it.
    fn invalid_key_into(&mut self, out: &mut [u8]) {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        out[..4].copy_from_slice(b"bad_");
        for byte in &mut out[4..INVALID_KEY_LEN] {
            *byte = ALPHABET[self.below(ALPHABET.len())];
        }
    }
}

const UUID_LEN: usize = 36;
const INVALID_KEY_LEN: usize = 44;
/// Stand-ins written into templates, then found and overwritten per request.
const UUID_PLACEHOLDER: &str = "ffffffff-ffff-4fff-bfff-ffffffffffff";
const KEY_PLACEHOLDER: &str = "bad_PLACEHOLDERPLACEHOLDERPLACEHOLDERPLACEHO";

/// A pre-encoded request (a whole gRPC frame) and where to patch it.
struct Template {
    frame: Vec<u8>,
    /// Offsets of the request id (the `x-request-id` header and `id`).
    ids: Vec<usize>,
    /// Offset of the invalid key, for the keyless template.
    key: Option<usize>,
}

impl Template {
    fn new(req: &CheckRequest, random_key: bool) -> anyhow::Result<Template> {
        let message = req.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + message.len());
        frame.push(0);
        frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
        frame.extend_from_slice(&message);
        let find = |needle: &str| -> Vec<usize> {
            memchr::memmem::find_iter(&frame, needle.as_bytes()).collect()
        };
        let ids = find(UUID_PLACEHOLDER);
        anyhow::ensure!(
            ids.len() == 2,
            "the request template holds its id {} times, not twice (does --path contain it?)",
            ids.len()
        );
        let key = if random_key {
            let at = find(KEY_PLACEHOLDER);
            anyhow::ensure!(
                at.len() == 1,
                "the request template's key placeholder is ambiguous"
            );
            Some(at[0])
        } else {
            None
        };
        Ok(Template { frame, ids, key })
    }

    /// A fresh copy with a new request id (and a new random key).
    fn fill(&self, rng: &mut Rng) -> Bytes {
        let mut buf = BytesMut::from(&self.frame[..]);
        let mut id = [0u8; UUID_LEN];
        rng.uuid_into(&mut id);
        for &at in &self.ids {
            buf[at..at + UUID_LEN].copy_from_slice(&id);
        }
        if let Some(at) = self.key {
            rng.invalid_key_into(&mut buf[at..at + INVALID_KEY_LEN]);
        }
        buf.freeze()
    }
}

/// Everything the workers share: request templates and what to expect.
struct Plan {
    /// One request per valid key.
    valid: Vec<Template>,
    /// The request with a random invalid key.
    invalid: Template,
    invalid_fraction: f64,
    verify: bool,
    timeout: Duration,
    /// Keep every call for `--timeline`.
    timeline: bool,
}

/// A request shaped like the one Envoy 1.40 sends for a downstream
/// `POST /trade/orders?side=buy` over HTTP/1.1 (see the captured fixture).
fn template(key: &str, path: &str, scopes: &str) -> CheckRequest {
    let authority = "127.0.0.1:10000";
    let mut headers = HashMap::new();
    for (k, v) in [
        (":authority", authority),
        (":method", "POST"),
        (":path", path),
        (":scheme", "http"),
        ("accept", "*/*"),
        ("content-length", "2"),
        ("user-agent", "keyward-loadgen/1"),
        ("x-forwarded-proto", "http"),
    ] {
        headers.insert(k.to_owned(), v.to_owned());
    }
    headers.insert("x-api-key".to_owned(), key.to_owned());
    headers.insert("x-request-id".to_owned(), UUID_PLACEHOLDER.to_owned());
    let peer = |port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".to_owned(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            })),
        }),
        ..Default::default()
    };
    let mut context_extensions = HashMap::new();
    if !scopes.is_empty() {
        context_extensions.insert("required_scopes".to_owned(), scopes.to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(47_062)),
            destination: Some(peer(10_000)),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: UUID_PLACEHOLDER.to_owned(),
                    method: "POST".to_owned(),
                    headers,
                    path: path.to_owned(),
                    host: authority.to_owned(),
                    scheme: "http".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    ..Default::default()
                }),
            }),
            context_extensions,
        }),
    }
}

impl Plan {
    /// The next request to send and whether its key is valid.
    fn request(&self, rng: &mut Rng) -> (Bytes, bool) {
        let valid = !self.valid.is_empty() && rng.unit() >= self.invalid_fraction;
        let template = if valid {
            &self.valid[rng.below(self.valid.len())]
        } else {
            &self.invalid
        };
        (template.fill(rng), valid)
    }
}

/// What one call came back with.
enum Outcome {
    Allowed,
    Denied(i32),
    Error(String),
}

/// One protobuf field: number, varint value (or 0), bytes (if length-delimited).
type Field<'a> = (u64, u64, &'a [u8]);

/// A protobuf cursor, just enough to classify a CheckResponse.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Some(v);
            }
        }
        None
    }

    /// The next field, or `Some(Err(()))` when the bytes are not protobuf.
    fn next(&mut self) -> Option<Result<Field<'a>, ()>> {
        if self.0.is_empty() {
            return None;
        }
        let field = (|| {
            let tag = self.varint()?;
            let (mut value, mut bytes): (u64, &[u8]) = (0, &[]);
            match tag & 7 {
                0 => value = self.varint()?,
                1 => self.0 = self.0.get(8..)?,
                2 => {
                    let n = usize::try_from(self.varint()?).ok()?;
                    bytes = self.0.get(..n)?;
                    self.0 = &self.0[n..];
                }
                5 => self.0 = self.0.get(4..)?,
                _ => return None,
            }
            Some((tag >> 3, value, bytes))
        })();
        Some(field.ok_or(()))
    }
}

/// Classifies a serialized CheckResponse the way Envoy acts on it: a
/// `denied_response` denies with its HTTP status (403 when it names none);
/// otherwise gRPC status OK allows and anything else denies with 403.
/// Repeated fields merge as protobuf says (last value wins).
fn classify(message: &[u8]) -> Result<Outcome, &'static str> {
    const BAD: &str = "undecodable CheckResponse";
    // The last varint of field 1 in a message, if any.
    let field_one = |bytes: &[u8]| -> Result<Option<u64>, &'static str> {
        let mut last = None;
        let mut f = Fields(bytes);
        while let Some(x) = f.next() {
            if let (1, v, _) = x.map_err(|()| BAD)? {
                last = Some(v);
            }
        }
        Ok(last)
    };
    let mut code = 0;
    // Some(http status, if named) while the oneof holds a denied_response.
    let mut denied: Option<Option<u64>> = None;
    let mut fields = Fields(message);
    while let Some(field) = fields.next() {
        match field.map_err(|()| BAD)? {
            // status: google.rpc.Status { code = 1 }
            (1, _, status) => code = field_one(status)?.unwrap_or(code),
            // denied_response: DeniedHttpResponse { status = 1: HttpStatus { code = 1 } }
            (2, _, d) => {
                let mut status = denied.flatten();
                let mut f = Fields(d);
                while let Some(x) = f.next() {
                    if let (1, _, http_status) = x.map_err(|()| BAD)? {
                        status = Some(field_one(http_status)?.or(status).unwrap_or(0));
                    }
                }
                denied = Some(status);
            }
            // ok_response: the other side of the oneof.
            (3, _, _) => denied = None,
            _ => {}
        }
    }
    Ok(match denied {
        Some(status) => Outcome::Denied(status.map_or(403, |s| s as i32)),
        None if code == 0 => Outcome::Allowed,
        None => Outcome::Denied(403),
    })
}

/// Counters and histograms of one worker (merged at the end).
struct Stats {
    latency: Histogram<u64>,
    /// Open loop only: how late each call left relative to its schedule.
    lag: Histogram<u64>,
    requests: u64,
    errors: u64,
    mismatches: u64,
    allowed: u64,
    denied: u64,
    samples: Vec<String>,
    /// With `--timeline`: (scheduled or sent, latency in µs, outcome letter).
    timeline: Option<Vec<(Instant, u64, u8)>>,
}

impl Stats {
    fn new(timeline: bool) -> Stats {
        Stats {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            lag: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            requests: 0,
            errors: 0,
            mismatches: 0,
            allowed: 0,
            denied: 0,
            samples: Vec::new(),
            timeline: timeline.then(Vec::new),
        }
    }

    fn sample(&mut self, what: String) {
        if self.samples.len() < 5 {
            self.samples.push(what);
        }
    }

    fn record(
        &mut self,
        at: Instant,
        outcome: Outcome,
        valid: bool,
        verify: bool,
        latency: Duration,
    ) {
        self.requests += 1;
        self.latency.saturating_record(micros(latency));
        if let Some(t) = &mut self.timeline {
            let letter = match outcome {
                Outcome::Allowed => b'A',
                Outcome::Denied(_) => b'D',
                Outcome::Error(_) => b'E',
            };
            t.push((at, micros(latency), letter));
        }
        match outcome {
            Outcome::Error(e) => {
                self.errors += 1;
                self.sample(format!("error: {e}"));
            }
            Outcome::Allowed => {
                self.allowed += 1;
                if verify && !valid {
                    self.mismatches += 1;
                    self.sample("mismatch: an invalid key was allowed".to_owned());
                }
            }
            Outcome::Denied(status) => {
                self.denied += 1;
                if verify && valid {
                    self.mismatches += 1;
                    self.sample(format!("mismatch: a valid key was denied with {status}"));
                } else if verify && status != 401 {
                    self.mismatches += 1;
                    self.sample(format!(
                        "mismatch: an invalid key was denied with {status}, not 401"
                    ));
                }
            }
        }
    }

    fn merge(&mut self, other: &Stats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.lag.add(&other.lag);
        self.requests += other.requests;
        self.errors += other.errors;
        self.mismatches += other.mismatches;
        self.allowed += other.allowed;
        self.denied += other.denied;
        for s in &other.samples {
            self.sample(s.clone());
        }
        if let (Some(all), Some(theirs)) = (&mut self.timeline, &other.timeline) {
            all.extend_from_slice(theirs);
        }
    }
}

/// Nanoseconds of CLOCK_MONOTONIC now, the clock `Instant` reads on Linux.
fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Writes `--timeline`: calls in time order, times as CLOCK_MONOTONIC ns.
fn write_timeline(path: &std::path::Path, calls: &mut [(Instant, u64, u8)]) -> std::io::Result<()> {
    use std::io::Write as _;
    calls.sort_unstable_by_key(|c| c.0);
    // Every call happened before this pair of readings.
    let (now, now_ns) = (Instant::now(), monotonic_ns());
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "# monotonic_ns latency_us outcome")?;
    for &(at, latency, letter) in calls.iter() {
        let ns = now_ns.saturating_sub(now.saturating_duration_since(at).as_nanos());
        writeln!(out, "{ns} {latency} {}", char::from(letter))?;
    }
    out.flush()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// The future that runs one HTTP/2 connection (reads, writes, flow control).
type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One HTTP/2 connection to the server.
#[derive(Clone)]
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    uri: hyper::Uri,
}

/// Where the server listens.
enum Target {
    Tcp(String),
    Unix(PathBuf),
}

fn parse_target(target: &str) -> anyhow::Result<Target> {
    if let Some(path) = target.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        anyhow::ensure!(!path.is_empty(), "--target unix: needs a socket path");
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let Some(rest) = target.strip_prefix("http://") else {
        anyhow::bail!("--target {target:?}: expected http://HOST:PORT or unix:PATH");
    };
    let authority = rest.trim_end_matches('/');
    anyhow::ensure!(
        !authority.is_empty() && !authority.contains('/'),
        "--target {target:?}: expected http://HOST:PORT"
    );
    Ok(Target::Tcp(authority.to_owned()))
}

/// A connection, and the future that runs it (to be spawned or driven).
async fn connect(target: &Target) -> anyhow::Result<(Conn, Driver)> {
    async fn handshake<T>(io: T, authority: &str) -> anyhow::Result<(Conn, Driver)>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, connection) = h2::client::Builder::new()
            // Large windows: flow control must never be what limits a run.
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            // Requests of up to 1 KiB share writes (see keyward::conn::Unvectored).
            .handshake::<_, Bytes>(keyward::conn::Unvectored(io))
            .await?;
        let driver = Box::pin(async move {
            if let Err(e) = connection.await {
                eprintln!("keyward-loadgen: connection ended: {e}");
            }
        });
        let uri =
            format!("http://{authority}/envoy.service.auth.v3.Authorization/Check").parse()?;
        Ok((Conn { send, uri }, driver))
    }
    match target {
        Target::Tcp(authority) => {
            let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            handshake(tcp, authority).await
        }
        Target::Unix(path) => {
            let unix = tokio::net::UnixStream::connect(path).await?;
            handshake(unix, "localhost").await
        }
    }
}

/// One Check call. The error says whether the connection is gone.
async fn call(conn: &Conn, body: Bytes, timeout: Duration) -> Result<Outcome, Gone> {
    match tokio::time::timeout(timeout, exchange(conn, body)).await {
        Ok(result) => result,
        Err(_) => Ok(Outcome::Error(format!("no answer within {timeout:?}"))),
    }
}

/// The connection closed: no call on it can succeed any more.
struct Gone(String);

async fn exchange(conn: &Conn, body: Bytes) -> Result<Outcome, Gone> {
    let mut send = conn
        .send
        .clone()
        .ready()
        .await
        .map_err(|e| Gone(format!("connection: {e}")))?;
    let mut request = hyper::Request::post(conn.uri.clone());
    if let Some(headers) = request.headers_mut() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    let Ok(request) = request.body(()) else {
        return Ok(Outcome::Error("cannot build the request".to_owned()));
    };
    let (response, mut stream) = match send.send_request(request, false) {
        Ok(r) => r,
        Err(e) if e.is_go_away() || e.is_io() => return Err(Gone(format!("send: {e}"))),
        Err(e) => return Ok(Outcome::Error(format!("send: {e}"))),
    };
    if let Err(e) = stream.send_data(body, true) {
        return Ok(Outcome::Error(format!("send: {e}")));
    }
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return Ok(Outcome::Error(format!("response: {e}"))),
    };
    let (parts, mut body) = response.into_parts();
    if parts.status != hyper::StatusCode::OK {
        return Ok(Outcome::Error(format!("HTTP status {}", parts.status)));
    }
    let mut message: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Ok(Outcome::Error(format!("response body: {e}"))),
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        match message.take() {
            None if joined.is_empty() => message = Some(chunk),
            first => {
                joined.extend_from_slice(&first.unwrap_or_default());
                joined.extend_from_slice(&chunk);
            }
        }
    }
    let trailers = match body.trailers().await {
        Ok(t) => t,
        Err(e) => return Ok(Outcome::Error(format!("trailers: {e}"))),
    };
    // grpc-status is in the trailers, or in the headers of a trailers-only reply.
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"));
    match status.map(HeaderValue::as_bytes) {
        Some(b"0") => {}
        Some(code) => {
            let message = trailers
                .as_ref()
                .and_then(|t| t.get("grpc-message"))
                .or_else(|| parts.headers.get("grpc-message"))
                .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                .unwrap_or_default();
            return Ok(Outcome::Error(format!(
                "gRPC status {}: {message}",
                String::from_utf8_lossy(code)
            )));
        }
        None => return Ok(Outcome::Error("no grpc-status".to_owned())),
    }
    let frame = message.unwrap_or_else(|| joined.freeze());
    let Some(message) = frame.get(5..).filter(|m| {
        frame[0] == 0
            && m.len() == u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize
    }) else {
        return Ok(Outcome::Error(
            "the reply is not one uncompressed gRPC message".to_owned(),
        ));
    };
    Ok(classify(message).unwrap_or_else(|e| Outcome::Error(e.to_owned())))
}

/// CPU time (user + system) a process has used, from /proc/PID/stat.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // utime and stime are fields 14 and 15 overall, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

struct Window {
    /// Requests before this instant are warmup.
    measure_from: Instant,
    /// No request starts (closed) or is scheduled (open) at or after this.
    end: Instant,
}

async fn run(args: Args) -> anyhow::Result<u8> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.streams > 0, "--streams must be at least 1");
    if let Some(r) = args.rate {
        anyhow::ensure!(r > 0.0 && r.is_finite(), "--rate must be positive");
    }
    let mut secrets = args.key.clone();
    if let Some(path) = &args.keys {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        secrets.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    anyhow::ensure!(
        !secrets.is_empty() || args.invalid_fraction >= 1.0,
        "no valid keys: give --keys FILE or --key SECRET (or --invalid-fraction 1)"
    );
    let plan = Arc::new(Plan {
        valid: secrets
            .iter()
            .map(|k| Template::new(&template(k, &args.path, &args.required_scopes), false))
            .collect::<anyhow::Result<_>>()?,
        invalid: Template::new(
            &template(KEY_PLACEHOLDER, &args.path, &args.required_scopes),
            true,
        )?,
        invalid_fraction: args.invalid_fraction,
        verify: args.verify,
        timeline: args.timeline.is_some(),
        timeout: args.timeout,
    });

    // Separate TCP (or Unix) connections, each with its own HTTP/2 session.
    let target = parse_target(&args.target)?;
    let mut clients = Vec::with_capacity(args.connections);
    let mut drivers = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let (conn, driver) = connect(&target)
            .await
            .map_err(|e| anyhow::anyhow!("connection {i} to {}: {e:#}", args.target))?;
        clients.push(conn);
        drivers.push(driver);
    }

    let start = Instant::now();
    let window = Arc::new(Window {
        measure_from: start + args.warmup,
        end: start + args.warmup + args.duration,
    });

    // CPU time of the server and of this process over the measured window.
    let pid = args.server_pid.map(|p| p.to_string());
    let cpu_at_start = {
        let window = Arc::clone(&window);
        let pid = pid.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(window.measure_from.into()).await;
            (
                pid.as_deref().and_then(cpu_time),
                cpu_time("self"),
                Instant::now(),
            )
        })
    };

    let mut stats = match args.rate {
        None => closed_loop(clients, drivers, args.streams, &plan, &window).await,
        Some(rate) => {
            for driver in drivers {
                tokio::spawn(driver);
            }
            open_loop(&clients, args.streams, &plan, &window, rate).await
        }
    };
    let finished = Instant::now();
    let server_cpu_end = pid.as_deref().and_then(cpu_time);
    let self_cpu_end = cpu_time("self");
    let (server_cpu_start, self_cpu_start, measured_at) = cpu_at_start.await?;
    let elapsed = finished.saturating_duration_since(measured_at.max(window.measure_from));
    let secs = elapsed.as_secs_f64().max(1e-9);

    let per_req = |a: Option<Duration>, b: Option<Duration>| -> Option<(f64, f64)> {
        let used = b?.checked_sub(a?)?;
        let us = used.as_secs_f64() * 1e6;
        Some((us / stats.requests.max(1) as f64, used.as_secs_f64() / secs))
    };
    let server = per_req(server_cpu_start, server_cpu_end);
    let own = per_req(self_cpu_start, self_cpu_end);
    let throughput = stats.requests as f64 / secs;
    let q = |h: &Histogram<u64>, p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    if let (Some(path), Some(calls)) = (&args.timeline, &mut stats.timeline) {
        write_timeline(path, calls)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    let l = &stats.latency;

    if args.json {
        let mut v = serde_json::json!({
            "target": args.target,
            "mode": if args.rate.is_some() { "open" } else { "closed" },
            "connections": args.connections,
            "streams": args.streams,
            "rate": args.rate,
            "duration_s": secs,
            "requests": stats.requests,
            "errors": stats.errors,
            "mismatches": stats.mismatches,
            "allowed": stats.allowed,
            "denied": stats.denied,
            "throughput_rps": throughput,
            "latency_us": {
                "p50": q(l, 0.50), "p90": q(l, 0.90), "p99": q(l, 0.99),
                "p999": q(l, 0.999), "max": l.max(), "mean": l.mean(),
            },
        });
        if args.rate.is_some() {
            v["send_lag_us"] =
                serde_json::json!({ "p50": q(&stats.lag, 0.5), "p99": q(&stats.lag, 0.99) });
        }
        if let Some((per, util)) = server {
            v["server_cpu_us_per_req"] = per.into();
            v["server_cpu_cores"] = util.into();
        }
        if let Some((per, util)) = own {
            v["loadgen_cpu_us_per_req"] = per.into();
            v["loadgen_cpu_cores"] = util.into();
        }
        println!("{v}");
    } else {
        let mode = match args.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_owned(),
        };
        println!(
            "target {}  {mode}  {} connections x {} streams  {:.1}s measured after {:?} warmup",
            args.target, args.connections, args.streams, secs, args.warmup
        );
        println!(
            "requests {}  errors {}  mismatches {}{}  (allowed {}, denied {})",
            stats.requests,
            stats.errors,
            stats.mismatches,
            if args.verify { "" } else { " (not verified)" },
            stats.allowed,
            stats.denied
        );
        println!("throughput {throughput:.0} req/s");
        println!(
            "latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            q(l, 0.50),
            q(l, 0.90),
            q(l, 0.99),
            q(l, 0.999),
            l.max()
        );
        if args.rate.is_some() {
            println!(
                "send lag µs (included in latency)  p50 {}  p99 {}",
                q(&stats.lag, 0.5),
                q(&stats.lag, 0.99)
            );
        }
        if let Some((per, util)) = server {
            println!("server cpu {per:.1} µs/req ({util:.2} cores)");
        }
        if let Some((per, util)) = own {
            println!("loadgen cpu {per:.1} µs/req ({util:.2} cores)");
        }
    }
    for s in &stats.samples {
        eprintln!("keyward-loadgen: {s}");
    }
    if let Some(r) = args.rate
        && throughput < 0.95 * r
    {
        eprintln!(
            "keyward-loadgen: warning: achieved {throughput:.0} req/s of the {r} asked for; \
             the server (or --streams) cannot keep up, latency includes the backlog"
        );
    }
    Ok(if args.verify && stats.mismatches > 0 {
        1
    } else if stats.requests == stats.errors || (args.verify && stats.errors > 0) {
        2
    } else {
        0
    })
}

/// Every stream sends its next call as soon as the last one is answered.
///
/// A connection's streams run in one task with the connection itself, so the
/// calls that one read of answers sets off leave in one write: with a task
/// per stream, each call's send woke the connection's task at once and cost
/// a write of its own, and the load generator needed as much CPU per call as
/// the server it measured.
async fn closed_loop(
    clients: Vec<Conn>,
    drivers: Vec<Driver>,
    streams: usize,
    plan: &Arc<Plan>,
    window: &Arc<Window>,
) -> Stats {
    let mut tasks = tokio::task::JoinSet::new();
    for (c, (client, driver)) in clients.into_iter().zip(drivers).enumerate() {
        let calls: futures_util::stream::FuturesUnordered<_> = (0..streams)
            .map(|s| {
                let client = client.clone();
                let plan = Arc::clone(plan);
                let window = Arc::clone(window);
                async move {
                    let mut rng = Rng::seeded((c * streams + s) as u64);
                    let mut stats = Stats::new(plan.timeline);
                    loop {
                        if Instant::now() >= window.end {
                            break;
                        }
                        let (req, valid) = plan.request(&mut rng);
                        let sent = Instant::now();
                        let (outcome, gone) = match call(&client, req, plan.timeout).await {
                            Ok(outcome) => (outcome, false),
                            Err(Gone(e)) => (Outcome::Error(e), true),
                        };
                        if sent >= window.measure_from || gone {
                            stats.record(sent, outcome, valid, plan.verify, sent.elapsed());
                        }
                        if gone {
                            // Every later call on this connection would fail at once.
                            break;
                        }
                    }
                    stats
                }
            })
            .collect();
        drop(client);
        let timeline = plan.timeline;
        tasks.spawn(async move {
            let mut calls = std::pin::pin!(async move {
                let mut calls = calls;
                let mut total = Stats::new(timeline);
                while let Some(s) = futures_util::StreamExt::next(&mut calls).await {
                    total.merge(&s);
                }
                total
            });
            // The connection first (it reads the answers and wakes their
            // streams), then the streams (whose next calls it writes on its
            // next poll, all at once). Once every stream has finished, the
            // connection is dropped, which closes it.
            let mut driver = Some(driver);
            std::future::poll_fn(|cx| {
                if let Some(d) = driver.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    driver = None;
                }
                calls.as_mut().poll(cx)
            })
            .await
        });
    }
    let mut total = Stats::new(plan.timeline);
    while let Some(res) = tasks.join_next().await {
        if let Ok(s) = res {
            total.merge(&s);
        }
    }
    total
}

/// A pacing thread hands out send times on a fixed schedule; each
/// connection's dispatcher starts a call per tick when one of its streams is
/// free. Latency runs from the scheduled time.
async fn open_loop(
    clients: &[Conn],
    streams: usize,
    plan: &Arc<Plan>,
    window: &Arc<Window>,
    rate: f64,
) -> Stats {
    let conns = clients.len();
    let mut senders = Vec::with_capacity(conns);
    let mut dispatchers = Vec::with_capacity(conns);
    let done = Arc::new(AtomicBool::new(false));
    for (c, client) in clients.iter().enumerate() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        let client = client.clone();
        let plan = Arc::clone(plan);
        let window = Arc::clone(window);
        dispatchers.push(tokio::spawn(async move {
            let stats = Arc::new(Mutex::new(Stats::new(plan.timeline)));
            let free = Arc::new(tokio::sync::Semaphore::new(streams));
            let mut rng = Rng::seeded(c as u64);
            while let Some(scheduled) = rx.recv().await {
                let Ok(permit) = Arc::clone(&free).acquire_owned().await else {
                    break;
                };
                let (req, valid) = plan.request(&mut rng);
                let client = client.clone();
                let plan = Arc::clone(&plan);
                let stats = Arc::clone(&stats);
                let measured = scheduled >= window.measure_from;
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let outcome = call(&client, req, plan.timeout)
                        .await
                        .unwrap_or_else(|Gone(e)| Outcome::Error(e));
                    let latency = scheduled.elapsed();
                    if measured {
                        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                        s.lag
                            .saturating_record(micros(sent.saturating_duration_since(scheduled)));
                        s.record(scheduled, outcome, valid, plan.verify, latency);
                    }
                    // Released only after recording, so the drain below sees every call.
                    drop(permit);
                });
            }
            // Wait for the calls still in flight (each is bounded by --timeout).
            let _ = free
                .acquire_many(u32::try_from(streams).unwrap_or(u32::MAX))
                .await;
            Arc::try_unwrap(stats)
                .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
                .unwrap_or_else(|shared| {
                    let mut s = Stats::new(plan.timeline);
                    s.merge(&shared.lock().unwrap_or_else(|e| e.into_inner()));
                    s
                })
        }));
    }

    let interval = Duration::from_secs_f64(1.0 / rate);
    let (start, end) = (Instant::now(), window.end);
    let stop = Arc::clone(&done);
    let pacer = std::thread::spawn(move || {
        // Ask for precise wakeups: the default 50 µs timer slack would add
        // that much lag to each tick.
        // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        }
        let mut i: u64 = 0;
        loop {
            let at = start + interval.mul_f64(i as f64);
            if at >= end || stop.load(Ordering::Relaxed) {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if senders[(i % conns as u64) as usize].send(at).is_err() {
                break;
            }
            i += 1;
        }
        // Dropping the senders ends the dispatchers once they drain.
    });

    let mut total = Stats::new(plan.timeline);
    for d in dispatchers {
        if let Ok(s) = d.await {
            total.merge(&s);
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use keyward::pb::envoy::service::auth::v3::{
        CheckResponse, DeniedHttpResponse, OkHttpResponse,
    };
    use keyward::pb::envoy::r#type::v3::HttpStatus;
    use keyward::pb::google::rpc;

    fn outcome(resp: &CheckResponse) -> String {
        match classify(&resp.encode_to_vec()) {
            Ok(Outcome::Allowed) => "allowed".to_owned(),
            Ok(Outcome::Denied(s)) => format!("denied {s}"),
            Ok(Outcome::Error(e)) => format!("error {e}"),
            Err(e) => format!("error {e}"),
        }
    }

    fn status(code: i32) -> Option<rpc::Status> {
        Some(rpc::Status {
            code,
            message: String::new(),
        })
    }

    #[test]
    fn classifies_like_envoy() {
        let ok = CheckResponse {
            status: status(0),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        };
        assert_eq!(outcome(&ok), "allowed");
        let denied = |http: Option<i32>| CheckResponse {
            status: status(16),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: http.map(|code| HttpStatus { code }),
                ..Default::default()
            })),
            dynamic_metadata: None,
        };
        assert_eq!(outcome(&denied(Some(401))), "denied 401");
        assert_eq!(outcome(&denied(Some(429))), "denied 429");
        assert_eq!(outcome(&denied(None)), "denied 403");
        let bare = |code| CheckResponse {
            status: status(code),
            ..Default::default()
        };
        assert_eq!(outcome(&bare(0)), "allowed");
        assert_eq!(outcome(&bare(7)), "denied 403");
        assert!(classify(&[0x0a, 5, 1]).is_err(), "truncated");
    }

    #[test]
    fn a_later_oneof_member_wins() {
        let mut bytes = CheckResponse {
            status: status(0),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                ..Default::default()
            })),
            dynamic_metadata: None,
        }
        .encode_to_vec();
        // An ok_response after the denied_response replaces it.
        bytes.extend_from_slice(&[0x1a, 0]);
        assert!(matches!(classify(&bytes), Ok(Outcome::Allowed)));
        let prost = CheckResponse::decode(&bytes[..]).unwrap();
        assert!(matches!(
            prost.http_response,
            Some(HttpResponse::OkResponse(_))
        ));
    }

    #[test]
    fn templates_get_fresh_ids_and_keys() {
        let mut rng = Rng::seeded(1);
        let valid = Template::new(&template("kw_secret", "/p", "read"), false).unwrap();
        let invalid = Template::new(&template(KEY_PLACEHOLDER, "/p", ""), true).unwrap();
        let read = |frame: &Bytes| {
            let req = CheckRequest::decode(&frame[5..]).unwrap();
            let http = req.attributes.unwrap().request.unwrap().http.unwrap();
            (http.id.clone(), http.headers)
        };
        let (id_a, headers_a) = read(&valid.fill(&mut rng));
        let (id_b, _) = read(&valid.fill(&mut rng));
        assert_ne!(id_a, id_b);
        assert_eq!(headers_a["x-request-id"], id_a);
        assert_eq!(headers_a["x-api-key"], "kw_secret");
        let uuid = id_a.as_bytes();
        assert_eq!(uuid.len(), 36);
        assert_eq!(
            (uuid[8], uuid[13], uuid[14], uuid[18], uuid[23]),
            (b'-', b'-', b'4', b'-', b'-')
        );
        assert!(matches!(uuid[19], b'8' | b'9' | b'a' | b'b'), "variant");
        let (_, headers_1) = read(&invalid.fill(&mut rng));
        let (_, headers_2) = read(&invalid.fill(&mut rng));
        let (k1, k2) = (&headers_1["x-api-key"], &headers_2["x-api-key"]);
        assert!(k1.starts_with("bad_") && k1.len() == 44);
        assert_ne!(k1, k2);
        assert!(Template::new(&template("k", UUID_PLACEHOLDER, ""), false).is_err());
    }

    #[test]
    fn targets() {
        assert!(
            matches!(parse_target("http://127.0.0.1:50051"), Ok(Target::Tcp(a)) if a == "127.0.0.1:50051")
        );
        assert!(
            matches!(parse_target("http://localhost:1/"), Ok(Target::Tcp(a)) if a == "localhost:1")
        );
        assert!(
            matches!(parse_target("unix:/run/kw.sock"), Ok(Target::Unix(p)) if p == std::path::Path::new("/run/kw.sock"))
        );
        assert!(parse_target("127.0.0.1:1").is_err());
        assert!(parse_target("http://a:1/x").is_err());
        assert!(parse_target("unix:").is_err());
    }
}
