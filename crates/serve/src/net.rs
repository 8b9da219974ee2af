//! The connection layer: a TCP listener whose connections drop a client that stops reading, and
//! [`serve`], which drains for at most the shutdown timeout.
//!
//! A client that stops reading a response (a stalled stream) would otherwise hold its connection, its
//! admission permit and its place in the batch for as long as it likes, and keep a graceful shutdown
//! waiting forever. [`WriteTimeout`] wraps each connection: once a write has waited `write_timeout` for the
//! client's socket to take more bytes, the write fails, hyper closes the connection, the response body is
//! dropped, and with it the request's permit and (through its closed event channel) its sequences in the
//! batch. A write that makes progress resets the clock, so a slow but reading client is never cut.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

use crate::error::Result;
use crate::server::Server;

/// A stream whose writes fail once they have waited `timeout` for the peer to read.
pub struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
    dropped: Counter,
}

impl<S> WriteTimeout<S> {
    /// `inner`, whose writes may wait at most `timeout`; each connection dropped for it counts in `dropped`.
    pub fn new(inner: S, timeout: Duration, dropped: Counter) -> Self {
        WriteTimeout { inner, timeout, waiting: None, dropped }
    }

    /// Called when a write is pending: arms the clock, or fails once it has run out.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let sleep = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.waiting = None;
                self.dropped.inc();
                tracing::info!(seconds = timeout.as_secs_f64(), "dropped a connection whose client stopped reading");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {} s (--write-timeout)", timeout.as_secs_f64()),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.pending(cx),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(r, cx)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(r, cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(r, cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(r, cx)
    }
}

/// A TCP listener handing out [`WriteTimeout`] connections.
struct Listener {
    inner: TcpListener,
    write_timeout: Duration,
    dropped: Counter,
}

impl axum::serve::Listener for Listener {
    type Io = WriteTimeout<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (WriteTimeout::new(stream, self.write_timeout, self.dropped.clone()), addr);
                }
                // The peer gave up before we accepted: take the next.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) => {}
                // Out of file descriptors or the like: wait for some to close rather than spin (as axum does).
                Err(e) => {
                    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// How a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every request in flight finished (or its client went away) within the shutdown timeout.
    Drained,
    /// The shutdown timeout ran out; this many admitted requests were still open and are dropped.
    TimedOut {
        /// Completions and predictions still open.
        open_requests: usize,
    },
}

/// Serves `server` on `listener` until `shutdown` completes; then stops taking connections, answers
/// `/health` with `draining` (503) and waits for the requests in flight (streams included) to finish, for
/// at most the server's shutdown timeout. Connections still open then are left to the runtime: drop it
/// (the `lora serve` binary shuts its runtime down right after) to close them.
pub async fn serve(server: Server, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<Stopped> {
    let state = server.state.clone();
    let (fired, fired_at) = tokio::sync::oneshot::channel::<Instant>();
    let signal = {
        let state = state.clone();
        async move {
            shutdown.await;
            state.draining.store(true, Ordering::Release);
            tracing::info!(open_requests = state.admission.in_flight(), "shutting down: draining the requests in flight");
            let _ = fired.send(Instant::now());
        }
    };
    let listener = Listener { inner: listener, write_timeout: state.timeouts.write, dropped: state.metrics.stalled_connections.clone() };
    let served = axum::serve(listener, server.router()).with_graceful_shutdown(signal);
    let limit = state.timeouts.shutdown;
    let deadline = async move {
        match fired_at.await {
            Ok(t) => tokio::time::sleep_until((t + limit).into()).await,
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = served => {
            r?;
            Ok(Stopped::Drained)
        }
        () = deadline => {
            let open_requests = state.admission.in_flight();
            tracing::warn!(open_requests, seconds = limit.as_secs_f64(), "the shutdown timeout ran out; dropping the requests still open");
            Ok(Stopped::TimedOut { open_requests })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout_and_counts_once() {
        // A pipe with a 64-byte buffer whose reading end is never read.
        let (a, _b) = tokio::io::duplex(64);
        let dropped = Counter::default();
        let mut w = WriteTimeout::new(a, Duration::from_millis(200), dropped.clone());
        let started = Instant::now();
        let mut written = 0;
        let err = loop {
            match w.write(&[0u8; 32]).await {
                Ok(n) => written += n,
                Err(e) => break e,
            }
        };
        assert_eq!(written, 64, "the pipe's buffer fills first");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("--write-timeout"), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(dropped.get(), 1);
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_never_cut() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(16);
        let mut w = WriteTimeout::new(a, Duration::from_secs(1), Counter::default());
        // The reader takes 16 bytes every 25 ms: each wait is far under the timeout, the whole write is not.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            while got.len() < 1024 {
                tokio::time::sleep(Duration::from_millis(25)).await;
                let n = b.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got.len()
        });
        let started = Instant::now();
        w.write_all(&[7u8; 1024]).await.expect("a reading client was cut");
        assert!(started.elapsed() > Duration::from_secs(1), "the test did not outlast the timeout");
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
