//! Reusing a kept-alive backend connection safely. A backend may close an
//! idle connection at any moment (gunicorn after 2 s, many apps after a few
//! hundred ms); a request written into a connection its backend has already
//! closed is never read by it, yet the client pool only learns of the close
//! when its connection task next runs, and the call fails as if the request
//! had been sent.
//!
//! So before the first byte of a new request goes into a connection (one
//! that served others, or one the pool opened and kept), [`Probed`] asks the kernel (a non-blocking one-byte
//! peek) whether the backend has closed it. If so, the write fails with
//! [`StaleConnection`] and nothing is written: the forwarder then knows the
//! request never reached the backend and sends it again on a fresh
//! connection, whatever its method.
//!
//! The backend may also close the connection as the request is on its way
//! (its idle timer fires as the request arrives, unread). Its kernel then
//! resets the connection: a close with unread data, or data for a closed
//! socket, is answered with a reset, never a plain end of stream. So a
//! reset before any byte of the response and
//! within [`RACE`] of the request's first byte, is taken for that race and
//! also becomes a [`StaleConnection`]. When the backend's close crossed the
//! request, the end of the stream comes first and the reset just after:
//! an end of stream in that state is held for [`SETTLE`] to see whether
//! a reset follows. A backend that read the whole request and then closed
//! ends the stream without a reset, and a backend that takes longer than
//! [`RACE`] to fail was working on it: both stay a 502, since the request
//! may have run.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use thr_core::target::RAW_TARGET;

/// The field a request's original target travels in from the request
/// builder to its connection: [`RAW_TARGET`] with a suffix random per
/// process, so that no body and no client can name it.
pub fn raw_target_field() -> &'static http::HeaderName {
    static FIELD: std::sync::LazyLock<http::HeaderName> = std::sync::LazyLock::new(|| {
        use std::hash::{BuildHasher, Hasher};
        let secret = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        http::HeaderName::try_from(format!("{RAW_TARGET}-{secret:016x}"))
            .expect("a valid field name")
    });
    &FIELD
}
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The backend closed a kept-alive connection before thr wrote a request
/// into it: the request did not reach the backend.
#[derive(Debug)]
pub struct StaleConnection;

impl std::fmt::Display for StaleConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the backend had closed this kept-alive connection")
    }
}

impl std::error::Error for StaleConnection {}

/// A socket whose peer's close can be seen without reading.
pub trait Peek {
    /// True when the peer has closed (or reset) the connection.
    fn peer_closed(&self) -> bool;
    /// True when the peer has reset the connection (its pending error).
    fn was_reset(&self) -> bool;
}

fn reset(sock: socket2::SockRef<'_>) -> bool {
    matches!(
        sock.take_error(),
        Ok(Some(err)) if matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
    )
}

fn closed(sock: socket2::SockRef<'_>) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    match sock.peek(&mut byte) {
        // End of stream: the backend closed it.
        Ok(0) => true,
        // Bytes nobody asked for yet: left to the HTTP client to judge.
        Ok(_) => false,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => false,
        Err(err) if err.kind() == io::ErrorKind::Interrupted => false,
        // Reset and the like.
        Err(_) => true,
    }
}

impl Peek for tokio::net::TcpStream {
    fn peer_closed(&self) -> bool {
        closed(socket2::SockRef::from(self))
    }

    fn was_reset(&self) -> bool {
        reset(socket2::SockRef::from(self))
    }
}

impl Peek for tokio::net::UnixStream {
    fn peer_closed(&self) -> bool {
        closed(socket2::SockRef::from(self))
    }

    fn was_reset(&self) -> bool {
        reset(socket2::SockRef::from(self))
    }
}

/// How soon after a request's first byte a reset of a reused connection
/// is taken for the idle-close race (see the module's doc): far more than
/// a reset takes to come back, far less than any request takes to run.
pub const RACE: Duration = Duration::from_millis(250);

/// How long a connection must have been quiet before a request for a
/// reset to be taken for the idle-close race: a backend's idle timer
/// cannot fire on a connection in use, nor on one just opened.
pub const QUIET: Duration = Duration::from_millis(50);

/// How long an end of stream in the race is held to see whether the reset
/// that proves the request unread follows (a round trip, with room).
pub const SETTLE: Duration = Duration::from_millis(10);

/// A backend connection that checks it is still open before writing a
/// request into it after a response came out of it, and that writes a
/// request's original target into its request line when the request
/// names one ([`raw_target_field`]: a query the URI type could
/// not hold as sent).
pub struct Probed<T> {
    inner: T,
    /// Nothing was written since the connection opened or a response was
    /// read: the next write starts a new request. A connection may wait in
    /// the pool before its first request too (the pool connects ahead and
    /// keeps a connection it did not need), so the first request is
    /// checked like the others.
    reused: bool,
    /// When the current request began, if it could be in the idle-close
    /// race (the connection had been quiet for [`QUIET`]), until a byte
    /// (or the end) of its response is read.
    racing_since: Option<Instant>,
    /// The last read or write that moved bytes.
    quiet_since: Instant,
    /// An end of stream in the race, held until a reset can have followed.
    settling: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A rewritten request head not yet written, from `sent` on.
    pending: Vec<u8>,
    sent: usize,
}

impl<T> Probed<T> {
    /// `inner`, fresh.
    pub fn new(inner: T) -> Probed<T> {
        Probed {
            inner,
            reused: true,
            racing_since: None,
            quiet_since: Instant::now(),
            settling: None,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// `err`, or a [`StaleConnection`] when it is the reset of the race.
    fn judge(&self, err: io::Error) -> io::Error {
        let reset = matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        );
        if reset && self.racing_since.is_some_and(|at| at.elapsed() <= RACE) {
            return io::Error::new(io::ErrorKind::ConnectionReset, StaleConnection);
        }
        err
    }

    fn written<R>(&mut self, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(Err(err)) => Poll::Ready(Err(self.judge(err))),
            Poll::Ready(Ok(n)) => {
                self.quiet_since = Instant::now();
                Poll::Ready(Ok(n))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Peek + AsyncWrite + Unpin> Probed<T> {
    /// Before a write: a stale connection fails it. Returns whether this
    /// write starts a request.
    fn check(&mut self) -> io::Result<bool> {
        if std::mem::take(&mut self.reused) {
            if self.inner.peer_closed() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    StaleConnection,
                ));
            }
            // Only a connection that sat quiet can have been closed by its
            // backend's idle timer as this request arrived.
            self.racing_since = (self.quiet_since.elapsed() >= QUIET).then(Instant::now);
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes what is pending of a rewritten head.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let poll = Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]);
            match self.written(poll) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// At the start of a request written from `first`: when its head names
    /// an original target, takes the head (rewritten) into `pending` and
    /// returns how many bytes of `first` that was.
    fn restore(&mut self, cx: &mut Context<'_>, first: &[u8]) -> Option<io::Result<usize>> {
        let (head, taken) = restore_target(first)?;
        self.pending = head;
        self.sent = 0;
        match self.drain(cx) {
            Poll::Ready(Err(err)) => Some(Err(err)),
            _ => Some(Ok(taken)),
        }
    }
}

/// A request head with its request line's target replaced by the value of
/// its [`raw_target_field`], and that field removed; and how many bytes of
/// `bytes` the original head took. None when `bytes` does not start with
/// a whole head naming one.
pub fn restore_target(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    // Every request written to a backend passes here, and nearly none
    // names an original target: memchr's searches, and the marker built
    // once, keep that cheap (a scan of each position against the marker
    // was 9k instructions per request, by callgrind).
    static MARKER: std::sync::LazyLock<Vec<u8>> =
        std::sync::LazyLock::new(|| format!("\r\n{}:", raw_target_field()).into_bytes());
    let marker = MARKER.as_slice();
    let end = memchr::memmem::find(bytes, b"\r\n\r\n")? + 4;
    let head = &bytes[..end];
    // The marker starts a line, so only a line's CRLF can start it.
    let at = memchr::memmem::find_iter(head, b"\r\n").find(|&at| {
        head.get(at..at + marker.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(marker))
    })?;
    let value_start = at + marker.len();
    let value_end = value_start + memchr::memmem::find(&head[value_start..], b"\r\n")?;
    let raw = head[value_start..value_end].trim_ascii();
    let line_end = memchr::memmem::find(head, b"\r\n")?;
    let line = &head[..line_end];
    let method_end = memchr::memchr(b' ', line)?;
    let version_start = memchr::memrchr(b' ', line)?;
    let mut out = Vec::with_capacity(head.len());
    out.extend_from_slice(&line[..method_end + 1]);
    out.extend_from_slice(raw);
    out.extend_from_slice(&line[version_start..]);
    // The fields, without the raw target's line (its CRLF before it stays).
    out.extend_from_slice(&head[line_end..at]);
    out.extend_from_slice(&head[value_end..]);
    Some((out, end))
}

impl<T: Peek + AsyncRead + Unpin> AsyncRead for Probed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(settling) = &mut self.settling {
            std::task::ready!(settling.as_mut().poll(cx));
            self.settling = None;
            let unread = self.inner.was_reset();
            self.racing_since = None;
            if unread {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    StaleConnection,
                )));
            }
            // A plain end of stream: reported as such.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let ended = buf.filled().len() == before;
                if ended && self.racing_since.is_some_and(|at| at.elapsed() <= RACE) {
                    let mut settling = Box::pin(tokio::time::sleep(SETTLE));
                    if settling.as_mut().poll(cx).is_pending() {
                        self.settling = Some(settling);
                        return Poll::Pending;
                    }
                }
                // Bytes read (or the end of the stream, after which
                // nothing is written anyway): what is written next is a
                // new request.
                self.reused = true;
                self.racing_since = None;
                self.quiet_since = Instant::now();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(self.judge(err))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Peek + AsyncWrite + Unpin> AsyncWrite for Probed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if self.check()?
            && let Some(taken) = self.restore(cx, buf)
        {
            return Poll::Ready(taken);
        }
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.written(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.drain(cx))?;
        if self.check()?
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(taken) = self.restore(cx, first)
        {
            return Poll::Ready(taken);
        }
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for Probed<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

/// A connector whose connections are [`Probed`].
#[derive(Debug, Clone)]
pub struct ProbedConnector<C>(pub C);

impl<C, T> tower::Service<http::Uri> for ProbedConnector<C>
where
    C: tower::Service<http::Uri, Response = TokioIo<T>>,
    C::Future: Send + 'static,
    T: 'static,
{
    type Response = TokioIo<Probed<T>>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Probed<T>>, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            connecting
                .await
                .map(|io| TokioIo::new(Probed::new(io.into_inner())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_target_goes_back_into_the_request_line() {
        let head = format!(
            "GET /app/s?q=%22a%22 HTTP/1.1\r\nhost: x\r\n{}: /app/s?q=\"a\"\r\naccept: */*\r\n\r\nBODY",
            raw_target_field()
        );
        let head = head.as_bytes();
        let (out, taken) = restore_target(head).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /app/s?q=\"a\" HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n"
        );
        assert_eq!(&head[taken..], b"BODY");
        // Named in any case, and as the last field.
        let upper = format!(
            "GET /s?q=%3C HTTP/1.1\r\nhost: x\r\n{}: /s?q=<\r\n\r\n",
            raw_target_field().as_str().to_ascii_uppercase()
        );
        let (out, _) = restore_target(upper.as_bytes()).unwrap();
        assert_eq!(out, b"GET /s?q=< HTTP/1.1\r\nhost: x\r\n\r\n");
        assert!(restore_target(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").is_none());
        // The base name alone (which a body or a client could write) is
        // not the field.
        assert!(restore_target(b"GET / HTTP/1.1\r\nx-thr-raw-target: /x\r\n\r\n").is_none());
    }
}
