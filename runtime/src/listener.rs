//! The accept side of a gRPC server, before HTTP/2 sees a byte:
//!
//! - at most `max_connections` open at once; one more is accepted and closed
//!   at once (counted), so a flood of sockets cannot exhaust file
//!   descriptors or memory while served clients keep their connections;
//! - TCP nodelay and keepalive (a peer that vanished is found by the kernel);
//! - a handshake deadline: a connection must have sent the 24-byte HTTP/2
//!   preface (or, with TLS, as much of its handshake) within
//!   `handshake_timeout`, or it is closed: idle and half-open sockets do not
//!   stay forever (hyper itself waits for a preface without limit);
//! - a hard end at `max_connection_age + grace`: tonic sends GOAWAY at the
//!   age (clients reconnect, possibly to another replica), and what still
//!   runs after the grace is cut, as grpc-go's MaxConnectionAgeGrace does.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Length of the HTTP/2 client connection preface (RFC 9113, 3.4).
const PREFACE_LEN: usize = 24;

/// How connections are accepted and bounded.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub tcp_keepalive: Option<Duration>,
    /// When a connection is cut regardless of what runs on it.
    pub hard_close_after: Option<Duration>,
}

/// Connection metrics, registered by [`crate::metrics::Metrics`].
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    /// Closed by us, by reason: `over_limit`, `handshake_timeout`, `max_age`.
    pub closed: Family<ClosedLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ClosedLabels {
    pub reason: &'static str,
}

impl ConnectionMetrics {
    fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ClosedLabels { reason }).inc();
    }
}

/// The accepted connections of `listener`, bounded as [`ConnectionLimits`] says.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
) -> impl Stream<Item = io::Result<GuardedStream>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    futures::stream::unfold(
        (listener, limits, metrics, permits),
        |(listener, limits, metrics, permits)| async move {
            let accepted = loop {
                match listener.accept().await {
                    Ok((stream, _peer)) => match permits.clone().try_acquire_owned() {
                        Ok(permit) => break Ok((stream, permit)),
                        Err(_) => {
                            // Dropping the socket closes it: the client sees a
                            // reset and may retry elsewhere.
                            metrics.closed("over_limit");
                            tracing::debug!("connection refused: MAX_CONNECTIONS reached");
                        }
                    },
                    Err(error) => {
                        // Out of file descriptors and the like: do not spin.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break Err(error);
                    }
                }
            };
            let item = accepted.map(|(stream, permit)| {
                GuardedStream::new(stream, permit, &limits, metrics.clone())
            });
            Some((item, (listener, limits, metrics, permits)))
        },
    )
}

/// A TCP connection that holds its slot under `max_connections` and is cut
/// when its handshake or its life runs over time.
pub struct GuardedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    metrics: ConnectionMetrics,
    /// Until the preface has arrived.
    handshake_deadline: Option<Pin<Box<Sleep>>>,
    handshake_read: usize,
    hard_close: Option<Pin<Box<Sleep>>>,
}

impl GuardedStream {
    fn new(
        inner: TcpStream,
        permit: OwnedSemaphorePermit,
        limits: &ConnectionLimits,
        metrics: ConnectionMetrics,
    ) -> Self {
        let _ = inner.set_nodelay(true);
        if let Some(time) = limits.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(time)
                .with_interval(time.min(Duration::from_secs(10)));
            let _ = socket2::SockRef::from(&inner).set_tcp_keepalive(&keepalive);
        }
        metrics.open.inc();
        Self {
            inner,
            _permit: permit,
            metrics,
            handshake_deadline: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
            handshake_read: 0,
            hard_close: limits
                .hard_close_after
                .map(|after| Box::pin(tokio::time::sleep(after))),
        }
    }

    /// An error when a deadline has passed; registers for wake-up otherwise,
    /// so a peer that sends nothing is still cut on time.
    fn check_deadlines(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = &mut self.handshake_deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.handshake_deadline = None;
            self.metrics.closed("handshake_timeout");
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within HANDSHAKE_TIMEOUT",
            ));
        }
        if let Some(deadline) = &mut self.hard_close
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.hard_close = None;
            self.metrics.closed("max_age");
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "MAX_CONNECTION_AGE plus its grace passed",
            ));
        }
        Ok(())
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.check_deadlines(cx)?;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.handshake_deadline.is_some() {
            this.handshake_read += buf.filled().len() - before;
            if this.handshake_read >= PREFACE_LEN {
                this.handshake_deadline = None;
            }
        }
        result
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
