//! The gRPC listener: HTTP/2 connections served by hyper.
//!
//! `Authorization/Check` is answered right here, in the connection's task
//! (see [`crate::conn`]: the answers to one read leave in one write): the
//! request body is the one gRPC message (usually one DATA frame, used without
//! a copy), [`AuthzService::check_message`] turns it into the encoded
//! response, and the reply is that frame plus `grpc-status: 0` trailers.
//! There is no framework between the socket and the decision: no codec, no
//! per-request routing table, no boxed bodies.
//!
//! Every other path (`grpc.health.v1.Health`, and UNIMPLEMENTED for the rest)
//! goes to tonic's router, which is not on the hot path.
//!
//! Connections come from any stream of sockets (TCP, Unix, TLS), so one
//! server loop serves all three; on shutdown it stops accepting, sends every
//! connection a GOAWAY, and waits (bounded) for in-flight checks to finish.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt as _};
use tonic::codegen::Service as _;

use crate::conn::{Streams, Unvectored};
use crate::service::AuthzService;

/// The one method keyward serves itself.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
/// The service name reported by `grpc.health.v1`.
pub const CHECK_SERVICE: &str = "envoy.service.auth.v3.Authorization";
/// Largest CheckRequest accepted (gRPC's customary default). Envoy's are
/// well under a kilobyte unless it is configured to send request bodies.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Concurrent streams allowed per connection. Envoy multiplexes every check
/// of a worker over one connection, so this is generous.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest request header block accepted (Envoy's gRPC headers are small).
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Most bytes that unfinished CheckRequests (bodies still waiting for
/// their last DATA frame) may hold at once, reserved memory included, over
/// every stream of every connection of a server. Envoy sends a CheckRequest
/// of ordinary size in one frame, which never counts; without this, streams
/// that each sent part of a message and never finished could make the
/// process hold any amount of memory. A split body holds only what has
/// arrived (as its buffer grows), never the length its prefix declares, so
/// filling the budget takes sending 64 MiB, not a few prefixes.
pub const MAX_SPLIT_BYTES: usize = 64 << 20;
/// How long a split CheckRequest may take to arrive in full, from its first
/// frame; after that it is refused with DEADLINE_EXCEEDED and what it held
/// is given back. Envoy's whole check times out after 200 ms by default, so
/// a body still unfinished after this is stalled, or held on purpose.
pub const SPLIT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The bytes of split bodies held at once, against a limit.
#[derive(Debug)]
pub struct Budget {
    held: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub const fn new(max: usize) -> Budget {
        Budget {
            held: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What one stream holds of a [`Budget`], given back when it is dropped,
/// and when it must have finished.
#[derive(Debug)]
struct Held {
    budget: Arc<Budget>,
    bytes: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Held {
    fn new(budget: Arc<Budget>, timeout: Duration) -> Held {
        Held {
            budget,
            bytes: 0,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Counts `n` more bytes; false, counting nothing, if the budget has
    /// not that much left.
    fn take(&mut self, n: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let before = self.budget.held.fetch_add(n, Relaxed);
        if before.saturating_add(n) > self.budget.max {
            self.budget.held.fetch_sub(n, Relaxed);
            return false;
        }
        self.bytes += n;
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget
                .held
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

// Header names parsed once: a `&str` name is parsed and validated per use.
static GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// gRPC status codes used here.
mod code {
    pub const INVALID_ARGUMENT: u16 = 3;
    pub const DEADLINE_EXCEEDED: u16 = 4;
    pub const RESOURCE_EXHAUSTED: u16 = 8;
    pub const UNIMPLEMENTED: u16 = 12;
    pub const INTERNAL: u16 = 13;
}

/// A unary gRPC reply body: the response message, then the trailers.
///
/// The trailers are built when they are sent: a `HeaderMap` would make the
/// reply three times larger, and hyper moves a response several times.
#[derive(Debug)]
pub struct Reply {
    data: Option<Bytes>,
    /// `grpc-status: 0` is still to be sent.
    ok_trailers: bool,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if !std::mem::take(&mut self.ok_trailers) {
            return Poll::Ready(None);
        }
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert(GRPC_STATUS.clone(), HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.ok_trailers
    }

    // No `size_hint`: an exact one makes hyper add `content-length` to every
    // response, which gRPC peers do not read, and which costs an allocation
    // (the value's text), its HPACK encoding and h2's length accounting per
    // answer: about 1,600 instructions per allowed check when measured,
    // out of about 39,000 then (`scripts/bench-instructions.sh`).
}

/// The response body type: a Check reply, or whatever tonic's router answers.
pub type ResponseBody = http_body_util::Either<Reply, tonic::body::Body>;

fn grpc_response(body: Reply) -> Response<ResponseBody> {
    let mut resp = Response::new(http_body_util::Either::Left(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

impl Reply {
    /// A successful reply: `message` (one gRPC frame), then `grpc-status: 0`.
    pub fn ok(message: Bytes) -> Reply {
        Reply {
            data: Some(message),
            ok_trailers: true,
        }
    }

    /// No body at all (the status and headers say everything).
    pub fn empty() -> Reply {
        Reply {
            data: None,
            ok_trailers: false,
        }
    }
}

/// A successful unary reply carrying `message` (a framed CheckResponse).
fn ok(message: Bytes) -> Response<ResponseBody> {
    grpc_response(Reply::ok(message))
}

/// A trailers-only error reply.
fn error(code: u16, message: &'static str) -> Response<ResponseBody> {
    let mut resp = grpc_response(Reply::empty());
    let headers = resp.headers_mut();
    headers.insert(GRPC_STATUS.clone(), HeaderValue::from(code));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    resp
}

/// Serves one HTTP/2 request.
#[derive(Clone)]
pub struct GrpcService {
    authz: AuthzService,
    other: tonic::service::Routes,
    /// The bytes split bodies may hold ([`MAX_SPLIT_BYTES`]).
    split: Arc<Budget>,
    /// How long a split body may take ([`SPLIT_BODY_TIMEOUT`]).
    split_timeout: Duration,
}

impl std::fmt::Debug for GrpcService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcService")
            .field("authz", &self.authz)
            .finish_non_exhaustive()
    }
}

impl GrpcService {
    /// Check answered by `authz`; every other path by `other`.
    pub fn new(authz: AuthzService, other: tonic::service::Routes) -> GrpcService {
        GrpcService {
            authz,
            other,
            split: Arc::new(Budget::new(MAX_SPLIT_BYTES)),
            split_timeout: SPLIT_BODY_TIMEOUT,
        }
    }

    /// Split bodies must arrive in full within `timeout` of their first frame.
    pub fn with_split_timeout(mut self, timeout: Duration) -> GrpcService {
        self.split_timeout = timeout;
        self
    }

    /// Answers one request.
    pub fn answer(self: &Arc<Self>, req: Request<Incoming>) -> Answer {
        let state = if req.uri().path() != CHECK_PATH {
            let mut other = self.other.clone();
            // tonic's router (an axum Router) is always ready.
            State::Other(Box::pin(other.call(req.map(tonic::body::Body::new))))
        } else if req.method() != Method::POST {
            State::MethodNotAllowed
        } else {
            // `grpc-encoding` is not looked at: it names the algorithm of
            // messages whose compressed flag is set, and only such a message
            // is refused (see `finish`).
            State::Check {
                service: Arc::clone(self),
                body: req.into_body(),
                first: None,
                joined: None,
                held: None,
            }
        };
        Answer { state }
    }
}

/// The future of one request's response.
///
/// Written out by hand rather than as an `async fn`: hyper moves a stream's
/// service future several times (into the stream's state, then into its
/// task), and an `async fn` taking the request kept all 264 bytes of it,
/// twice, beside the body reader's own state (712 bytes in all). A Check
/// keeps only what reading its body needs.
pub struct Answer {
    state: State,
}

type OtherFuture =
    Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, Infallible>> + Send + 'static>>;

enum State {
    /// Reading a Check's body. A body in one DATA frame (Envoy's usual) is
    /// used as is; only a split body is copied together.
    Check {
        service: Arc<GrpcService>,
        body: Incoming,
        first: Option<Bytes>,
        joined: Option<BytesMut>,
        /// What `joined` holds of the server's budget for split bodies
        /// (taken at the first split).
        held: Option<Held>,
    },
    /// Any other path, answered by tonic's router. Boxed: inline, its size
    /// would be part of every Check's future.
    Other(OtherFuture),
    /// Not a POST: refused with HTTP 405 before its body is read.
    MethodNotAllowed,
    /// The response has been returned.
    Done,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Check { .. } => "check",
            State::Other(_) => "other",
            State::MethodNotAllowed => "method not allowed",
            State::Done => "done",
        };
        f.debug_struct("Answer").field("state", &state).finish()
    }
}

impl Future for Answer {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = match &mut this.state {
            State::Check {
                service,
                body,
                first,
                joined,
                held,
            } => loop {
                let frame = match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        // Only a split body has a deadline.
                        if let Some(held) = held
                            && held.deadline.as_mut().poll(cx).is_ready()
                        {
                            break error(
                                code::DEADLINE_EXCEEDED,
                                "the CheckRequest did not arrive in time",
                            );
                        }
                        return Poll::Pending;
                    }
                };
                let data = match frame {
                    None => break finish(service, first.take(), joined.take()),
                    Some(Err(_)) => break error(code::INTERNAL, "request body failed"),
                    // Trailers on a request carry nothing for us.
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => data,
                        Err(_) => continue,
                    },
                };
                let total = first.as_ref().map_or(0, Bytes::len)
                    + joined.as_ref().map_or(0, BytesMut::len)
                    + data.len();
                if total > MAX_MESSAGE_BYTES + crate::wire::FRAME_PREFIX {
                    break error(code::RESOURCE_EXHAUSTED, "CheckRequest too large");
                }
                // A body that ended with this frame (Envoy's do) is
                // complete: asking h2 once whether the stream is closed
                // costs less than polling it for the end of the data and
                // then for trailers.
                let complete = body.is_end_stream();
                match (&mut *joined, first.take()) {
                    (Some(buf), _) => buf.extend_from_slice(&data),
                    (None, None) => *first = Some(data),
                    (None, Some(head)) => {
                        // Room for what has come, growing as more does:
                        // reserving the declared length would let a few
                        // prefixes, each followed by nothing, fill the
                        // budget.
                        let mut buf = BytesMut::with_capacity(head.len() + data.len());
                        buf.extend_from_slice(&head);
                        buf.extend_from_slice(&data);
                        *joined = Some(buf);
                    }
                }
                if complete {
                    break finish(service, first.take(), joined.take());
                }
                // A body that declares more than is accepted is refused as
                // soon as its prefix has come, not once it has.
                let head = joined.as_deref().or(first.as_deref()).unwrap_or_default();
                if crate::wire::declared_len(head).is_some_and(|n| n > MAX_MESSAGE_BYTES) {
                    break error(code::RESOURCE_EXHAUSTED, "CheckRequest too large");
                }
                // Everything an unfinished body holds counts against the
                // server's budget: the memory reserved for it, not only the
                // bytes received.
                let holding = first.as_ref().map_or(0, Bytes::len)
                    + joined.as_ref().map_or(0, BytesMut::capacity);
                let held = held.get_or_insert_with(|| {
                    Held::new(Arc::clone(&service.split), service.split_timeout)
                });
                if holding > held.bytes && !held.take(holding - held.bytes) {
                    break error(
                        code::RESOURCE_EXHAUSTED,
                        "too many unfinished CheckRequests in progress",
                    );
                }
            },
            State::Other(future) => match std::task::ready!(future.as_mut().poll(cx)) {
                Ok(resp) => resp.map(http_body_util::Either::Right),
                Err(never) => match never {},
            },
            State::MethodNotAllowed => {
                let mut resp = Response::new(http_body_util::Either::Left(Reply::empty()));
                *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                resp
            }
            State::Done => panic!("Answer polled after it completed"),
        };
        this.state = State::Done;
        Poll::Ready(Ok(response))
    }
}

/// Answers a Check whose whole body has been read.
fn finish(
    service: &GrpcService,
    first: Option<Bytes>,
    joined: Option<BytesMut>,
) -> Response<ResponseBody> {
    let body = match joined {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    };
    let message = match crate::wire::unframe(&body) {
        Ok(m) => m,
        Err(crate::wire::COMPRESSED) => {
            // UNIMPLEMENTED, naming what is accepted.
            let mut resp = error(code::UNIMPLEMENTED, "compressed requests are not accepted");
            resp.headers_mut()
                .insert(&GRPC_ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            return resp;
        }
        Err(_) => return error(code::INVALID_ARGUMENT, "the body is not one gRPC message"),
    };
    match service.authz.check_message(message, crate::clock::now()) {
        Ok(reply) => ok(reply),
        Err(e) => {
            tracing::debug!(error = %e, "undecodable CheckRequest");
            error(code::INVALID_ARGUMENT, "malformed CheckRequest")
        }
    }
}

/// One connection as keyward serves it: HTTP/2 with [`http2`]'s settings
/// over an [`Unvectored`] socket, its streams run by the returned
/// [`Streams`], whose [`Streams::drive`] (around the connection, or around
/// a graceful-shutdown watch of it) is the future to spawn.
pub fn serve_connection<IO, S, B>(
    io: IO,
    service: S,
) -> (
    Streams,
    hyper::server::conn::http2::Connection<TokioIo<Unvectored<IO>>, S, Streams>,
)
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Streams: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    let streams = Streams::default();
    let conn = http2(streams.clone()).serve_connection(TokioIo::new(Unvectored(io)), service);
    (streams, conn)
}

/// The HTTP/2 settings for ext_authz traffic: few connections, many streams.
/// `streams` runs the connection's streams (one [`Streams`] per connection;
/// see [`crate::conn`]).
fn http2(streams: Streams) -> hyper::server::conn::http2::Builder<Streams> {
    let mut b = hyper::server::conn::http2::Builder::new(streams);
    b.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        // gRPC peers do not read `date`; formatting it is wasted work.
        .auto_date_header(false);
    b
}

/// Serves connections from `incoming` until `stop` turns true, then stops
/// accepting and drains open connections for at most `drain`; those still
/// open then are closed (their tasks aborted), so nothing is answered after
/// this returns.
pub async fn serve<S, IO>(
    mut incoming: S,
    service: GrpcService,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) where
    S: Stream<Item = std::io::Result<IO>> + Unpin,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let service = Arc::new(service);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Forget the connections that ended.
        while connections.try_join_next().is_some() {}
        let conn = tokio::select! {
            conn = incoming.next() => conn,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let io = match conn {
            Some(Ok(io)) => io,
            Some(Err(e)) => {
                // Transient (e.g. EMFILE): back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            None => break,
        };
        let service = Arc::clone(&service);
        let (streams, conn) = serve_connection(
            io,
            hyper::service::service_fn(move |req| service.answer(req)),
        );
        let conn = streams.drive(graceful.watch(conn));
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "gRPC connection ended with an error");
            }
        });
    }
    drop(incoming);
    tracing::info!("shutting down: draining in-flight checks");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => {
            tracing::warn!("drain timed out after {drain:?}; closing remaining connections");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server of `service` on one end of a pipe, an h2 client on the other.
    async fn client_of(service: GrpcService) -> h2::client::SendRequest<Bytes> {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let service = Arc::new(service);
        let (streams, conn) = serve_connection(
            server_io,
            hyper::service::service_fn(move |req| service.answer(req)),
        );
        tokio::spawn(streams.drive(conn));
        let (client, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    fn empty_service() -> GrpcService {
        let source = crate::ring::RingSource {
            generation: 1,
            sha256: [0; 32],
            loaded_at: jiff::Timestamp::now(),
        };
        let shared = crate::service::Shared::new(
            crate::ring::KeyRing::empty(source),
            crate::ring::UsageRegistry::default(),
            Default::default(),
        );
        GrpcService::new(
            AuthzService::new(Arc::new(shared)),
            tonic::service::Routes::default(),
        )
    }

    fn check_request() -> Request<()> {
        Request::post(format!("http://test{CHECK_PATH}"))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    }

    /// The grpc-status of `response`, from its headers or trailers.
    async fn grpc_status(response: h2::client::ResponseFuture) -> String {
        let response = response.await.unwrap();
        if let Some(status) = response.headers().get("grpc-status") {
            return status.to_str().unwrap().to_owned();
        }
        let mut body = response.into_body();
        while body.data().await.is_some() {}
        let trailers = body.trailers().await.unwrap().unwrap();
        trailers["grpc-status"].to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_split_body_that_stalls_is_refused_and_gives_its_bytes_back() {
        let service = empty_service().with_split_timeout(Duration::from_millis(200));
        let budget = Arc::clone(&service.split);
        let mut client = client_of(service).await;
        let (response, mut send) = client.send_request(check_request(), false).unwrap();
        // A prefix declaring 4 MiB - 1, then 10 bytes, then nothing.
        let mut start = vec![0u8];
        start.extend_from_slice(&((4u32 << 20) - 1).to_be_bytes());
        start.extend_from_slice(&[0; 10]);
        send.send_data(Bytes::from(start), false).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
            .await
            .expect("refused long before 10 s");
        assert_eq!(status, "4", "DEADLINE_EXCEEDED");
        assert_eq!(budget.held(), 0);
        // The connection goes on serving: a whole request (an empty
        // CheckRequest, denied) is answered.
        let mut client = client.ready().await.unwrap();
        let (response, mut send) = client.send_request(check_request(), false).unwrap();
        send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        assert_eq!(grpc_status(response).await, "0");
        drop(send);
    }

    #[tokio::test]
    async fn a_split_body_holds_what_arrived_not_what_it_declared() {
        let service = empty_service();
        let budget = Arc::clone(&service.split);
        let client = client_of(service).await;
        let mut sends = Vec::new();
        let mut responses = Vec::new();
        for _ in 0..32 {
            let mut ready = client.clone().ready().await.unwrap();
            let (response, mut send) = ready.send_request(check_request(), false).unwrap();
            // A prefix declaring 4 MiB - 1, then one byte of it.
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&((4u32 << 20) - 1).to_be_bytes());
            send.send_data(Bytes::from(prefix), false).unwrap();
            send.send_data(Bytes::from_static(&[0]), false).unwrap();
            sends.push(send);
            responses.push(response);
        }
        // Each stream holds about its 6 bytes; 32 declared 4 MiB messages
        // would be 128 MiB, twice the budget.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while budget.held() < 32 * 6 {
            assert!(tokio::time::Instant::now() < deadline, "{}", budget.held());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(budget.held() < 32 * 1024, "{}", budget.held());
        // A message declared over the limit is refused at once.
        let mut ready = client.ready().await.unwrap();
        let (response, mut send) = ready.send_request(check_request(), false).unwrap();
        let mut start = vec![0u8];
        start.extend_from_slice(&((4u32 << 20) + 1).to_be_bytes());
        send.send_data(Bytes::from(start), false).unwrap();
        assert_eq!(grpc_status(response).await, "8", "RESOURCE_EXHAUSTED");
        drop((sends, responses));
    }

    #[tokio::test]
    async fn split_bodies_share_one_budget() {
        let budget = Arc::new(Budget::new(100));
        let mut a = Held::new(Arc::clone(&budget), SPLIT_BODY_TIMEOUT);
        let mut b = Held::new(Arc::clone(&budget), SPLIT_BODY_TIMEOUT);
        assert!(a.take(60));
        assert!(!b.take(41), "over the budget: refused, nothing counted");
        assert_eq!(budget.held(), 60);
        assert!(b.take(40));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40, "a finished stream gives its bytes back");
        assert!(b.take(60));
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
