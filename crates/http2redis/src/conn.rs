//! One client connection's bounds in time, whatever state it is in
//! (ARCHITECTURE.md decision 18). hyper bounds a request head once it is
//! being read; this module bounds everything around it:
//!
//! - a new connection must bring its first request within
//!   `header_read_timeout`, whatever it sends meanwhile (nothing, half an
//!   h2 preface, a preface and SETTINGS and no stream);
//! - a connection with no request open (an idle keep-alive or h2
//!   connection) is closed after `idle_timeout`;
//! - a client that takes nothing of what is written to it for
//!   `client_write_timeout` is cut off;
//! - a request body is read within `body_read_timeout` of silence and at
//!   `min_body_rate` on average ([`Paced`]).
//!
//! A [`Watch`] per connection holds what the server needs to judge it: the
//! service wrapper counts the requests open ([`Open`], carried by the
//! response body until hyper is done with it) and the socket wrapper
//! ([`Watched`]) notes since when a write has been blocked.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::rt::{Read, ReadBufCursor, Write};
use thr_core::config::FrontSettings;
use tokio::time::{Instant, Sleep};

/// The time bounds of a connection, from `[http2redis]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept to the first request.
    pub first_request: Duration,
    /// With no request open, after the first.
    pub idle: Duration,
    /// A write blocked this long cuts the connection.
    pub write: Duration,
}

impl Limits {
    /// The bounds `settings` set.
    pub fn of(settings: &FrontSettings) -> Limits {
        Limits {
            first_request: settings.header_read_timeout,
            idle: settings.idle_timeout,
            write: settings.client_write_timeout,
        }
    }

    fn shortest(&self) -> Duration {
        self.first_request.min(self.idle).min(self.write)
    }
}

/// What a connection is doing, shared by its socket, its requests and the
/// server's watchdog. Instants are kept as milliseconds since it opened.
#[derive(Debug)]
pub struct Watch {
    opened: Instant,
    /// Requests whose response hyper is not done with.
    open: AtomicUsize,
    /// A request came (the idle bound replaces the first-request bound).
    served: AtomicBool,
    /// When `open` last fell to zero.
    idle_since: AtomicU64,
    /// 1 + when a write started being blocked; 0 while none is.
    blocked_since: AtomicU64,
}

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No request arrived within `header_read_timeout` of accepting it.
    NoRequest,
    /// No request open for `idle_timeout`.
    Idle,
    /// The client read nothing for `client_write_timeout`.
    NotReading,
}

impl Expired {
    /// A word for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Expired::NoRequest => "no_request",
            Expired::Idle => "idle",
            Expired::NotReading => "not_reading",
        }
    }
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            opened: Instant::now(),
            open: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            blocked_since: AtomicU64::new(0),
        }
    }
}

impl Watch {
    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// A request arrived; it counts as open until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> Open {
        self.served.store(true, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::AcqRel);
        Open(self.clone())
    }

    fn write_blocked(&self) {
        if self.blocked_since.load(Ordering::Relaxed) == 0 {
            self.blocked_since
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    fn write_moved(&self) {
        if self.blocked_since.load(Ordering::Relaxed) != 0 {
            self.blocked_since.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the connection has outlived a bound now; if not, when to ask
    /// again. Every bound starts from a change of state, so a state change
    /// after this call can only move the answer later: the watchdog never
    /// misses one, and wakes once per bound at most.
    pub fn check(&self, limits: &Limits) -> Result<Instant, Expired> {
        let now = self.now_ms();
        let mut next = now + limits.shortest().as_millis() as u64;
        if self.open.load(Ordering::Acquire) == 0 {
            let (limit, why) = if self.served.load(Ordering::Relaxed) {
                (limits.idle, Expired::Idle)
            } else {
                (limits.first_request, Expired::NoRequest)
            };
            let until = self.idle_since.load(Ordering::Relaxed) + limit.as_millis() as u64;
            if now >= until {
                return Err(why);
            }
            next = next.min(until);
        }
        let blocked = self.blocked_since.load(Ordering::Relaxed);
        if blocked != 0 {
            let until = blocked - 1 + limits.write.as_millis() as u64;
            if now >= until {
                return Err(Expired::NotReading);
            }
            next = next.min(until);
        }
        Ok(self.at(next))
    }
}

/// An open request of a connection (see [`Watch::open`]).
#[derive(Debug)]
pub struct Open(Arc<Watch>);

impl Drop for Open {
    fn drop(&mut self) {
        let watch = &self.0;
        watch.idle_since.store(watch.now_ms(), Ordering::Relaxed);
        watch.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request open until hyper drops it
/// (sent, or the client gone).
pub struct Tracked<B> {
    inner: B,
    _open: Open,
}

impl<B> Tracked<B> {
    /// `inner`, holding `open`.
    pub fn new(inner: B, open: Open) -> Tracked<B> {
        Tracked { inner, _open: open }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client socket that tells its [`Watch`] when writes are blocked.
pub struct Watched<T> {
    inner: T,
    watch: Arc<Watch>,
}

impl<T> Watched<T> {
    /// `inner`, reporting to `watch`.
    pub fn new(inner: T, watch: Arc<Watch>) -> Watched<T> {
        Watched { inner, watch }
    }

    fn note<R>(&self, poll: Poll<R>) -> Poll<R> {
        match &poll {
            Poll::Pending => self.watch.write_blocked(),
            Poll::Ready(_) => self.watch.write_moved(),
        }
        poll
    }
}

impl<T: Read + Unpin> Read for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body read too slowly (see [`Paced`]).
#[derive(Debug)]
pub struct BodyTooSlow;

impl std::fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body came too slowly")
    }
}

impl std::error::Error for BodyTooSlow {}

/// How fast a request body must come (`body_read_timeout`, `min_body_rate`).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Longest silence, and the grace before the rate counts.
    pub silence: Duration,
    /// Bytes per second on average after the grace (0: any).
    pub min_rate: u64,
}

impl Pace {
    /// The pace `settings` ask for.
    pub fn of(settings: &FrontSettings) -> Pace {
        Pace {
            silence: settings.body_read_timeout,
            min_rate: settings.min_body_rate,
        }
    }
}

/// A request body that fails with [`BodyTooSlow`] when its client says
/// nothing for `silence`, or when, past the first `silence`, it has sent
/// less than `min_rate` bytes per second: each byte received buys
/// `1/min_rate` s. Both bounds are needed: a trickle of a byte a second
/// never falls silent, and a fast start must not buy an endless stall.
/// Only time spent waiting for the client counts: while thr itself does
/// not ask for the body (rules, auth, a slow Redis or backend taking what
/// it was given), the client is not charged.
pub struct Paced<B> {
    inner: B,
    pace: Pace,
    received: u64,
    /// Time spent waiting for the client so far.
    waited: Duration,
    /// Since when it is being waited for now.
    waiting_since: Option<Instant>,
    /// Made at the first wait (most bodies never wait, or are empty).
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> Paced<B> {
    /// `inner` at `pace`.
    pub fn new(inner: B, pace: Pace) -> Paced<B> {
        Paced {
            inner,
            pace,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: None,
        }
    }

    /// When a wait that began at `since` is too long.
    fn deadline(&self, since: Instant) -> Instant {
        if self.pace.min_rate == 0 {
            return since + self.pace.silence;
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.pace.min_rate as f64);
        let left = (self.pace.silence + earned).saturating_sub(self.waited);
        since + left.min(self.pace.silence)
    }

    /// A wait ended (a frame, the end, or an error came).
    fn stop_waiting(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += since.elapsed();
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.stop_waiting();
                if let Some(data) = frame.data_ref() {
                    this.received += data.remaining() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.stop_waiting();
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(None) => {
                this.stop_waiting();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.waiting_since.is_none() {
                    let now = Instant::now();
                    this.waiting_since = Some(now);
                    let deadline = this.deadline(now);
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let timer = this.timer.as_mut().expect("set above");
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTooSlow)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn limits() -> Limits {
        Limits {
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            write: Duration::from_secs(30),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_new_connection_expires_after_the_first_request_bound() {
        let watch = Arc::new(Watch::default());
        let next = watch.check(&limits()).unwrap();
        assert_eq!(next - watch.opened, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(watch.check(&limits()), Err(Expired::NoRequest));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_request_holds_the_connection_and_its_end_starts_the_idle_bound() {
        let watch = Arc::new(Watch::default());
        let open = watch.open();
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(watch.check(&limits()).is_ok());
        drop(open);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(watch.check(&limits()).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(watch.check(&limits()), Err(Expired::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_too_long_expires_even_with_a_request_open() {
        let watch = Arc::new(Watch::default());
        let _open = watch.open();
        watch.write_blocked();
        tokio::time::advance(Duration::from_secs(20)).await;
        // Progress resets the bound.
        watch.write_moved();
        watch.write_blocked();
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(watch.check(&limits()).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(watch.check(&limits()), Err(Expired::NotReading));
    }

    /// A body sending `bytes` bytes every `every`, for ever.
    struct Trickle {
        every: Duration,
        bytes: usize,
        timer: Pin<Box<Sleep>>,
    }

    fn trickle(every: Duration, bytes: usize) -> Trickle {
        Trickle {
            every,
            bytes,
            timer: Box::pin(tokio::time::sleep(every)),
        }
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            std::task::ready!(self.timer.as_mut().poll(cx));
            let next = Instant::now() + self.every;
            self.timer.as_mut().reset(next);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.bytes])))))
        }
    }

    async fn read_until_cut(
        body: impl Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
    ) -> (u64, Duration) {
        let started = Instant::now();
        let mut body = body;
        let mut got = 0;
        loop {
            match body.frame().await {
                Some(Ok(frame)) => got += frame.into_data().map_or(0, |d| d.len() as u64),
                Some(Err(err)) => {
                    assert!(thr_backend::caused_by::<BodyTooSlow>(&*err));
                    return (got, started.elapsed());
                }
                None => panic!("the trickle never ends"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_a_second_is_cut_once_the_grace_is_spent() {
        let pace = Pace {
            silence: Duration::from_secs(10),
            min_rate: 1024,
        };
        let (got, after) =
            read_until_cut(Paced::new(trickle(Duration::from_secs(1), 1), pace)).await;
        assert!(
            after >= Duration::from_secs(10) && after < Duration::from_secs(11),
            "{after:?}"
        );
        assert!(got <= 10, "{got}");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_cut_whatever_came_before() {
        let pace = Pace {
            silence: Duration::from_secs(10),
            min_rate: 1024,
        };
        let (_, after) =
            read_until_cut(Paced::new(trickle(Duration::from_secs(15), 1 << 20), pace)).await;
        assert_eq!(after, Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_takes_is_not_charged_to_the_client() {
        let pace = Pace {
            silence: Duration::from_secs(10),
            min_rate: 1024,
        };
        // Just over 1 KiB/s from the client, but its reader stops for a
        // minute (a slow backend): the client is still on pace after it.
        let mut body = Paced::new(trickle(Duration::from_secs(1), 1100), pace);
        for _ in 0..2 {
            body.frame().await.unwrap().unwrap();
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        for _ in 0..20 {
            body.frame().await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_is_not_cut() {
        let pace = Pace {
            silence: Duration::from_secs(10),
            min_rate: 1024,
        };
        let mut body = Paced::new(trickle(Duration::from_secs(1), 1100), pace);
        // 100 s of a body just above the minimum: never cut.
        for _ in 0..100 {
            body.frame().await.unwrap().unwrap();
        }
    }
}
