//! One HTTP/2 connection, with its streams run in the connection's own task.
//!
//! hyper hands every request stream of an HTTP/2 connection to an executor,
//! and the usual one (`TokioExecutor`) spawns a task per stream. On tokio's
//! multi-threaded runtime that costs a write per answer: a stream task that
//! finishes wakes the connection task, the wakeup lands in the worker's LIFO
//! slot, and the connection runs at once and writes that one answer. Envoy
//! sends its checks many at a time over one connection, so under load a
//! single read holds a dozen requests and the server made a dozen `writev`
//! calls, each a trip through the loopback TCP stack and a wakeup of Envoy.
//!
//! Here the executor ([`Streams`]) only queues each stream, and the task
//! that drives the connection ([`Driven`]) polls the queued streams itself:
//! after the connection has read everything the socket holds and handed out
//! its requests, every check is answered in the same task, and the next poll
//! of the connection writes all of those answers with one write. A stream
//! that cannot finish at once (a request body still arriving, a health
//! watch) stays in the set and is polled when it is woken, like any future.
//!
//! One answer does not wait: when a round has several requests, its first
//! answer leaves on its own as soon as it is ready, and the rest follow
//! together. Envoy sends a worker's checks over one connection in bursts
//! (more than a dozen at a time under load), and while they are all at
//! keyward that worker has nothing to do: through one Envoy worker, holding
//! every answer back for the last one left the worker idle about one part
//! in seven. With the first answer on its way at once, Envoy works on it
//! while keyward answers the others, which are waiting in its socket when
//! it looks again; the same load ran 5–9 % faster than the minimal tonic
//! server instead of 7–11 % slower. A client that spends little on each
//! answer pays for it: a closed-loop load generator that answers each reply
//! with a request at once breaks its bursts up, and ran about 13 % slower
//! (BENCHMARKS.md).
//!
//! Answers share a write only if h2 may put several frames in one write.
//! h2 copies a DATA frame into its write buffer when it is small and
//! otherwise "chains" it, writing the buffer and the payload with one
//! vectored write before it will buffer anything else; "small" is under 256
//! bytes on a socket with vectored writes and under 1 KiB on one without.
//! An answer with `Deprecation` and `Sunset` headers, or with rate-limit
//! headers, is over 256 bytes, and so would cost a write of its own again.
//! [`Unvectored`] hides vectored writes from h2, so every answer up to 1 KiB
//! shares the connection's next write.
//!
//! Each round of [`Driven`] (read, answer what is ready, write) is a
//! [`crate::clock::batch`]: its checks are decided at one clock reading.
//!
//! The price: one connection's checks run on one thread. They did already in
//! practice (the connection task itself, the framing and the system calls, is
//! most of the work and was always serial), and with many connections the
//! runtime spreads the connection tasks across its workers.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::FutureExt as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor hyper gives a connection's streams to: it queues them for
/// the connection's [`Driven`] task. One per connection.
#[derive(Clone, Default)]
pub struct Streams {
    queue: Arc<Mutex<Vec<Stream>>>,
    /// The driving task's waker: a queued stream wakes it (or, during its
    /// poll, sends it round again), wherever it was queued from.
    gate: Arc<Gate>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").finish_non_exhaustive()
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        // A panic in one stream ends that stream only, as it would in a task
        // of its own; hyper resets it.
        let stream = AssertUnwindSafe(stream).catch_unwind().map(|outcome| {
            if outcome.is_err() {
                tracing::error!("a gRPC stream panicked; its request was reset");
            }
        });
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(stream));
        Wake::wake_by_ref(&self.gate);
    }
}

impl Streams {
    /// The future that drives `conn` (a hyper connection built with this
    /// executor) and its streams. It completes with the connection's result
    /// once the connection has ended and its last stream has finished.
    pub fn drive<C>(self, conn: C) -> Driven<C>
    where
        C: Future,
    {
        Driven {
            waker: Waker::from(Arc::clone(&self.gate)),
            gate: self.gate,
            conn: Some(Box::pin(conn)),
            outcome: None,
            queue: self.queue,
            taken: Vec::new(),
            streams: FuturesUnordered::new(),
        }
    }
}

/// A connection and the streams it has handed out, driven in one task.
pub struct Driven<C: Future> {
    conn: Option<Pin<Box<C>>>,
    outcome: Option<C::Output>,
    queue: Arc<Mutex<Vec<Stream>>>,
    /// The queue's contents, swapped out under the lock (kept to reuse its
    /// allocation).
    taken: Vec<Stream>,
    streams: FuturesUnordered<Stream>,
    /// The waker the connection and the streams are polled with.
    gate: Arc<Gate>,
    waker: Waker,
}

/// The waker of a connection's own poll. A stream that answers wakes the
/// connection so that it writes, but [`Driven`] polls the connection again
/// anyway right after its streams; passed on to tokio, that wakeup would
/// schedule the task once more and rouse an idle worker thread to look for
/// work, every time a lone request is answered (about 10 µs of CPU per check
/// at low rates). So while [`Driven::poll`] runs, a wakeup only notes that
/// it happened and `poll` goes round again; at other times it is passed on.
#[derive(Default)]
struct Gate {
    polling: AtomicBool,
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

/// Rounds of one [`Driven::poll`] at most: tokio's cooperative budget is
/// renewed only between polls of the task (a connection out of budget
/// answers `Pending` until then), and other tasks wait their turn.
const MAX_ROUNDS: usize = 32;

impl<C: Future> std::fmt::Debug for Driven<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driven")
            .field("open", &self.conn.is_some())
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl<C> Future for Driven<C>
where
    C: Future,
    C::Output: Unpin,
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        this.gate.task.register(cx.waker());
        this.gate.polling.store(true, Ordering::SeqCst);
        let mut rounds = 0;
        let outcome = loop {
            this.gate.woken.store(false, Ordering::SeqCst);
            if let Poll::Ready(outcome) = this.round() {
                break Poll::Ready(outcome);
            }
            rounds += 1;
            if this.gate.woken.load(Ordering::SeqCst) && rounds < MAX_ROUNDS {
                // Streams answered (or were handed out, or data arrived):
                // go round again, so the connection writes every answer of
                // this round at once and reads whatever came meanwhile.
                continue;
            }
            break Poll::Pending;
        };
        this.gate.polling.store(false, Ordering::SeqCst);
        // A wakeup noted since the last round (or after the last allowed
        // one) is passed on, so that none is lost.
        if outcome.is_pending() && this.gate.woken.swap(false, Ordering::SeqCst) {
            cx.waker().wake_by_ref();
        }
        outcome
    }
}

impl<C> Driven<C>
where
    C: Future,
    C::Output: Unpin,
{
    /// Polls the connection, takes the streams it handed out, and polls
    /// every stream that is ready; `Ready` once the connection and all its
    /// streams have finished.
    fn round(&mut self) -> Poll<C::Output> {
        // The checks answered in this round share one clock reading.
        let _batch = crate::clock::batch();
        let mut cx = Context::from_waker(&self.waker);
        Self::poll_conn(&mut self.conn, &mut self.outcome, &mut cx);
        std::mem::swap(
            &mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner),
            &mut self.taken,
        );
        let arrived = self.taken.len();
        let mut first = true;
        // A stream of the round has been answered.
        let (conn, outcome) = (&mut self.conn, &mut self.outcome);
        let mut answered =
            |cx: &mut Context<'_>| Self::answered(conn, outcome, &mut first, arrived, cx);
        // A new stream is polled here first: a check whose body came with
        // its headers (nearly all) is answered on that poll and never needs
        // a place in `streams`, whose node for it would be an allocation and
        // a few atomic operations. One that cannot finish yet goes there, to
        // be polled when it is woken.
        for mut stream in self.taken.drain(..) {
            if stream.as_mut().poll(&mut cx).is_pending() {
                self.streams.push(stream);
            } else {
                answered(&mut cx);
            }
        }
        while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(&mut cx) {
            answered(&mut cx);
        }
        if self.conn.is_none()
            && self.streams.is_empty()
            && let Some(outcome) = self.outcome.take()
        {
            return Poll::Ready(outcome);
        }
        Poll::Pending
    }

    /// A stream of the round has been answered. The first answer of
    /// several (`arrived` this round) leaves at once (see the module's
    /// documentation); the rest leave together.
    fn answered(
        conn: &mut Option<Pin<Box<C>>>,
        outcome: &mut Option<C::Output>,
        first: &mut bool,
        arrived: usize,
        cx: &mut Context<'_>,
    ) {
        if std::mem::take(first) && arrived > 1 {
            Self::poll_conn(conn, outcome, cx);
        }
    }

    /// Polls the connection (it reads what the socket holds, hands out new
    /// streams and writes the answers ready so far), keeping its outcome
    /// once it has ended.
    fn poll_conn(
        conn: &mut Option<Pin<Box<C>>>,
        outcome: &mut Option<C::Output>,
        cx: &mut Context<'_>,
    ) {
        if let Some(c) = conn
            && let Poll::Ready(out) = c.as_mut().poll(cx)
        {
            *conn = None;
            *outcome = Some(out);
        }
    }
}

/// A socket whose vectored writes h2 does not see (`is_write_vectored` is
/// false), so h2 copies DATA frames of up to 1 KiB into its write buffer,
/// where they share a write with the frames around them, instead of
/// flushing each on its own. Everything else passes through.
#[derive(Debug)]
pub struct Unvectored<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
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

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::io::DuplexStream;
    use tokio::sync::mpsc;

    use super::*;

    /// The bytes of each write the server made, in order.
    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    /// The server's end of the pipe, keeping the writes that carried bytes.
    /// It says it has vectored writes, as a TCP socket does. The pipe takes
    /// every write whole, so no HTTP/2 frame spans two of them.
    struct Counted {
        io: DuplexStream,
        writes: Writes,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl Counted {
        /// Writes `buf` with `write`, keeping what it wrote. The lock is held
        /// across the write, so the test cannot read the bytes of a write
        /// and then look at the list before it holds that write.
        fn keep(
            &mut self,
            buf: &[u8],
            write: impl FnOnce(Pin<&mut DuplexStream>) -> Poll<std::io::Result<usize>>,
        ) -> Poll<std::io::Result<usize>> {
            let mut writes = self.writes.lock().unwrap();
            let r = write(Pin::new(&mut self.io));
            if let Poll::Ready(Ok(n)) = r
                && n > 0
            {
                writes.push(buf[..n].to_vec());
            }
            r
        }
    }

    /// How many answers a write carries: the HTTP/2 frames in it that end
    /// their stream (a DATA frame, or HEADERS carrying trailers).
    fn answers_in(mut write: &[u8]) -> usize {
        let mut answers = 0;
        while let [a, b, c, kind, flags, ..] = *write {
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            const DATA: u8 = 0;
            const HEADERS: u8 = 1;
            const END_STREAM: u8 = 1;
            if (kind == DATA || kind == HEADERS) && flags & END_STREAM != 0 {
                answers += 1;
            }
            write = write.get(9 + len..).unwrap_or_default();
        }
        answers
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.keep(buf, |io| io.poll_write(cx, buf))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.keep(&all, |io| io.poll_write_vectored(cx, bufs))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// What the test server's requests do, by path.
    async fn answer(
        req: Request<hyper::body::Incoming>,
        called: mpsc::UnboundedSender<()>,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        let path = req.uri().path().to_owned();
        let _ = called.send(());
        if path == "/panic" {
            panic!("a stream's service panicked");
        }
        // The whole body, however many reads it takes to arrive.
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let len = body.map_or(0, |b| b.len());
        let mut answer = format!("{path} {len}");
        if path.starts_with("/big") {
            // Over h2's 256-byte threshold for copying a frame on a socket
            // with vectored writes, and under its 1 KiB one without.
            answer.push_str(&".".repeat(600));
        }
        Ok(Response::new(Full::new(Bytes::from(answer))))
    }

    /// The client's connection future, driven by the test.
    type ClientConn = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// The client, the server's writes, a channel that yields once per
    /// request the service sees, the server's task, and the client's
    /// connection (not yet running).
    type Pair = (
        h2::client::SendRequest<Bytes>,
        Writes,
        mpsc::UnboundedReceiver<()>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
        ClientConn,
    );

    /// A server connection driven by [`Streams`] on one end of a pipe (its
    /// socket [`Unvectored`]), and an h2 client on the other.
    async fn pair() -> Pair {
        pair_on(Unvectored).await
    }

    /// [`pair`], with the server's socket wrapped by `wrap`.
    async fn pair_on<T>(wrap: impl FnOnce(Counted) -> T) -> Pair
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Writes::default();
        let (called_tx, called) = mpsc::unbounded_channel();
        let streams = Streams::default();
        let mut builder = hyper::server::conn::http2::Builder::new(streams.clone());
        builder.timer(TokioTimer::new());
        let conn = builder.serve_connection(
            TokioIo::new(wrap(Counted {
                io: server_io,
                writes: Arc::clone(&writes),
            })),
            hyper::service::service_fn(move |req| answer(req, called_tx.clone())),
        );
        let server = tokio::spawn(streams.drive(conn));
        let (client, connection) = h2::client::handshake(client_io).await.unwrap();
        let client_conn: ClientConn = Box::pin(async move {
            let _ = connection.await;
        });
        (client, writes, called, server, client_conn)
    }

    fn post(path: &str) -> Request<()> {
        Request::post(format!("http://test{path}"))
            .body(())
            .unwrap()
    }

    async fn text(response: h2::client::ResponseFuture) -> Result<String, h2::Error> {
        let mut body = response.await?.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8(out).unwrap())
    }

    /// Runs `f` while driving the client's connection, so that whatever was
    /// queued before leaves in one write.
    async fn driven<F: Future>(conn: &mut ClientConn, f: F) -> F::Output {
        tokio::select! {
            biased;
            out = f => out,
            () = conn => panic!("the client's connection ended"),
        }
    }

    /// Sends 64 requests for `/{prefix}{i}` in one write and returns the
    /// writes the server made to answer them.
    async fn writes_for_64(pair: Pair, prefix: &str) -> Vec<Vec<u8>> {
        let (mut client, writes, _called, _server, mut conn) = pair;
        // Settle the connection's preface and settings first.
        let warm = client.send_request(post("/warm"), true).unwrap().0;
        driven(&mut conn, text(warm)).await.unwrap();
        let before = writes.lock().unwrap().len();
        let pending: Vec<_> = (0..64)
            .map(|i| {
                let path = format!("/{prefix}{i}");
                (client.send_request(post(&path), true).unwrap().0, path)
            })
            .collect();
        driven(&mut conn, async {
            for (response, path) in pending {
                let answer = text(response).await.unwrap();
                assert!(answer.starts_with(&format!("{path} 0")), "{path}: {answer}");
            }
        })
        .await;
        writes.lock().unwrap().split_off(before)
    }

    /// Requests that arrive together are answered together: on tokio's
    /// multi-threaded runtime, where a task per stream made one write per
    /// answer, 64 requests read at once get their answers in a few writes.
    /// The first answer leaves alone, before the others are ready.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn answers_to_one_read_leave_together_after_the_first() {
        let writes = writes_for_64(pair().await, "").await;
        assert!(writes.len() <= 8, "64 answers took {} writes", writes.len());
        let answers: Vec<usize> = writes.iter().map(|w| answers_in(w)).collect();
        assert_eq!(answers.iter().sum::<usize>(), 64, "{answers:?}");
        assert_eq!(answers[0], 1, "the first write carried {answers:?}");
    }

    /// Answers too large for h2 to copy on a socket with vectored writes
    /// (600 bytes) still share writes on one that hides them, and take about
    /// a write each on one that does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn answers_over_256_bytes_share_writes_only_without_vectored_writes() {
        let unvectored = writes_for_64(pair().await, "big").await.len();
        assert!(unvectored <= 8, "64 answers took {unvectored} writes");
        let vectored = writes_for_64(pair_on(|c| c).await, "big").await.len();
        assert!(vectored >= 32, "64 answers took only {vectored} writes");
    }

    /// A stream whose body comes in a later read waits for it in the set,
    /// and is answered when it arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_waiting_for_its_body_is_answered_when_it_arrives() {
        let (mut client, _writes, mut called, _server, client_conn) = pair().await;
        tokio::spawn(client_conn);
        let (response, mut body) = client.send_request(post("/slow"), false).unwrap();
        // The service has the request and is waiting for the body.
        called.recv().await.unwrap();
        // Meanwhile the connection serves others.
        let other = client.send_request(post("/other"), true).unwrap().0;
        assert_eq!(text(other).await.unwrap(), "/other 0");
        body.send_data(Bytes::from_static(b"12345"), true).unwrap();
        assert_eq!(text(response).await.unwrap(), "/slow 5");
    }

    /// A panic in one stream resets that stream; the connection and its
    /// other streams carry on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_stream_resets_only_itself() {
        let (mut client, _writes, _called, server, client_conn) = pair().await;
        tokio::spawn(client_conn);
        let boom = client.send_request(post("/panic"), true).unwrap().0;
        let fine = client.send_request(post("/fine"), true).unwrap().0;
        assert!(text(boom).await.is_err(), "the panicked stream was reset");
        assert_eq!(text(fine).await.unwrap(), "/fine 0");
        let again = client.send_request(post("/again"), true).unwrap().0;
        assert_eq!(text(again).await.unwrap(), "/again 0");
        assert!(!server.is_finished());
    }

    /// When the client goes away with a stream still open, the driven
    /// connection ends, and so does the stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_connection_ends_when_the_client_goes_away() {
        let (mut client, _writes, mut called, server, client_conn) = pair().await;
        let client_conn = tokio::spawn(client_conn);
        let (_response, _body) = client.send_request(post("/open"), false).unwrap();
        called.recv().await.unwrap();
        client_conn.abort();
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(10), server).await;
        assert!(ended.is_ok(), "the server's connection did not end");
    }
}
