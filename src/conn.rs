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
//! The price: one connection's checks run on one thread. They did already in
//! practice (the connection task itself, the framing and the system calls, is
//! most of the work and was always serial), and with many connections the
//! runtime spreads the connection tasks across its workers.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::FutureExt as _;
use futures_util::stream::{FuturesUnordered, StreamExt as _};

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor hyper gives a connection's streams to: it queues them for
/// the connection's [`Driven`] task. One per connection.
#[derive(Clone, Default)]
pub struct Streams {
    queue: Arc<Mutex<Vec<Stream>>>,
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
}

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
        loop {
            if let Some(conn) = &mut this.conn
                && let Poll::Ready(outcome) = conn.as_mut().poll(cx)
            {
                this.conn = None;
                this.outcome = Some(outcome);
            }
            std::mem::swap(
                &mut *this.queue.lock().unwrap_or_else(PoisonError::into_inner),
                &mut this.taken,
            );
            let mut progress = !this.taken.is_empty();
            for stream in this.taken.drain(..) {
                this.streams.push(stream);
            }
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {
                progress = true;
            }
            if this.conn.is_none() {
                if this.streams.is_empty()
                    && let Some(outcome) = this.outcome.take()
                {
                    return Poll::Ready(outcome);
                }
                // The remaining streams are registered for their wakeups.
                return Poll::Pending;
            }
            if !progress {
                return Poll::Pending;
            }
            // Streams were handed out or answered: poll the connection again,
            // which writes every answer of this round at once and reads
            // whatever has arrived meanwhile.
        }
    }
}
