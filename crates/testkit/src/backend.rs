//! A legacy app in a box: an HTTP/1.1 server with N synchronous "workers"
//! (at most N requests handled at once, the rest wait in its accept queue)
//! and a delay per request. It records every request it handles, so tests can
//! check exactly what reached the backend, and it answers according to the
//! query string, so one server covers every status, header and body shape:
//!
//! | query        | effect                                                       |
//! |--------------|--------------------------------------------------------------|
//! | `status=N`   | answer with status N                                         |
//! | `reason=1`   | with the reason phrase `Custom Reason`, not the usual one    |
//! | `delay=MS`   | take MS milliseconds instead of the configured delay         |
//! | `cookies=N`  | add N `Set-Cookie` fields                                    |
//! | `bytes=N`    | body of N deterministic binary bytes (else: echo the body)   |
//! | `chunked=N`  | stream the body in N chunks (Transfer-Encoding: chunked)     |
//! | `stream=N`   | N pattern bytes made as they are sent, in 64 KiB frames      |
//! | `length=1`   | with `stream`: declare Content-Length (else chunked)         |
//! | `cut=N`      | with `stream`: close the connection after N bytes            |
//! | `events=K`   | server-sent events: K events `data: I`, `every=MS` apart     |
//!
//! Every response carries `X-Echo-Method` and `X-Echo-Target` (the raw
//! request target as received).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Raw request target (path and query).
    pub target: String,
    /// Header fields in received order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Bytes,
    /// When handling began (after waiting for a worker slot).
    pub started: Instant,
    /// When handling ended.
    pub finished: Instant,
}

impl Recorded {
    /// First value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Settings of a [`SlowBackend`].
#[derive(Debug, Clone)]
pub struct BackendBuilder {
    workers: usize,
    delay: Duration,
    unix: Option<PathBuf>,
    listen: Option<SocketAddr>,
    record: bool,
}

impl Default for BackendBuilder {
    fn default() -> Self {
        BackendBuilder {
            workers: 1024,
            delay: Duration::ZERO,
            unix: None,
            listen: None,
            record: true,
        }
    }
}

impl BackendBuilder {
    /// Requests handled at once (like N sync worker processes).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Time each request takes.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// Listen on a unix socket instead of TCP.
    pub fn unix(mut self, path: PathBuf) -> Self {
        self.unix = Some(path);
        self
    }

    /// Listen on this TCP address (default: 127.0.0.1 on a free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Whether to keep every request for inspection (default true; a
    /// long-running demo turns it off to keep its memory flat).
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// Starts the server on the current tokio runtime.
    pub async fn start(self) -> SlowBackend {
        let state = Arc::new(State {
            slots: Semaphore::new(self.workers),
            delay: self.delay,
            recorded: Mutex::new(Vec::new()),
            record: self.record,
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            streams: Arc::new(AtomicUsize::new(0)),
        });
        let (addr, task) = match &self.unix {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path).expect("bind backend unix socket");
                let state = state.clone();
                let task = tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        serve(TokioIo::new(stream), state.clone());
                    }
                });
                (None, task)
            }
            None => {
                let bind = self
                    .listen
                    .unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
                let listener = TcpListener::bind(bind).await.expect("bind backend");
                let addr = listener.local_addr().expect("backend address");
                let state = state.clone();
                let task = tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        let _ = stream.set_nodelay(true);
                        serve(TokioIo::new(stream), state.clone());
                    }
                });
                (Some(addr), task)
            }
        };
        SlowBackend {
            addr,
            unix: self.unix,
            state,
            task,
        }
    }
}

fn serve<I>(io: I, state: Arc<State>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
        let _ = hyper::server::conn::http1::Builder::new()
            // Responses must be identical when fetched twice a second apart.
            .auto_date_header(false)
            .serve_connection(io, service)
            .await;
    });
}

struct State {
    slots: Semaphore,
    delay: Duration,
    recorded: Mutex<Vec<Recorded>>,
    record: bool,
    active: AtomicUsize,
    peak: AtomicUsize,
    /// Streamed bodies still being sent (`stream`, `events`).
    streams: Arc<AtomicUsize>,
}

/// A running backend; stops when dropped.
pub struct SlowBackend {
    addr: Option<SocketAddr>,
    unix: Option<PathBuf>,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl SlowBackend {
    /// A builder with defaults: effectively unlimited workers, no delay.
    pub fn builder() -> BackendBuilder {
        BackendBuilder::default()
    }

    /// TCP address (None on a unix socket).
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("backend listens on TCP")
    }

    /// `http://127.0.0.1:PORT` or `unix:/path`: what a `[[queues]] backend` takes.
    pub fn url(&self) -> String {
        match (&self.unix, self.addr) {
            (Some(path), _) => format!("unix:{}", path.display()),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => unreachable!("a backend listens somewhere"),
        }
    }

    /// Every request handled so far, in the order handling began.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().expect("lock").clone()
    }

    /// The targets of [`SlowBackend::requests`], in the same order.
    pub fn targets(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.target).collect()
    }

    /// Requests handled (or being handled) so far.
    pub fn count(&self) -> usize {
        self.state.recorded.lock().expect("lock").len()
    }

    /// Requests being handled right now (past the worker limit, inside the delay).
    pub fn active(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }

    /// Most requests ever handled at once.
    pub fn peak_concurrency(&self) -> usize {
        self.state.peak.load(Ordering::SeqCst)
    }

    /// Forgets recorded requests.
    /// Streamed bodies (`stream`, `events`) still being sent: a stream
    /// whose reader went away is dropped, and stops counting.
    pub fn open_streams(&self) -> usize {
        self.state.streams.load(Ordering::SeqCst)
    }

    /// Forgets the requests recorded so far.
    pub fn clear(&self) {
        self.state.recorded.lock().expect("lock").clear();
    }
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(path) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn query_param(target: &str, name: &str) -> Option<u64> {
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Deterministic binary content: every byte value appears.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 256) as u8).collect()
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Out>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let _slot = state.slots.acquire().await.expect("semaphore open");
    let now_active = state.active.fetch_add(1, Ordering::SeqCst) + 1;
    state.peak.fetch_max(now_active, Ordering::SeqCst);
    let started = Instant::now();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let index = if !state.record {
        usize::MAX
    } else {
        let mut recorded = state.recorded.lock().expect("lock");
        recorded.push(Recorded {
            method: parts.method.to_string(),
            target: target.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: body.clone(),
            started,
            finished: started,
        });
        recorded.len() - 1
    };
    let delay = query_param(&target, "delay")
        .map(Duration::from_millis)
        .unwrap_or(state.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    state.active.fetch_sub(1, Ordering::SeqCst);
    if let Some(r) = state.recorded.lock().expect("lock").get_mut(index) {
        r.finished = Instant::now();
    }

    let status = query_param(&target, "status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    let payload = match query_param(&target, "bytes") {
        Some(n) => Bytes::from(pattern(n as usize)),
        None => body,
    };
    let mut builder = Response::builder()
        .status(status)
        .header("x-echo-method", parts.method.as_str())
        .header(
            "x-echo-target",
            HeaderValue::from_str(&target).unwrap_or(HeaderValue::from_static("?")),
        )
        .header("content-type", "application/octet-stream");
    for i in 0..query_param(&target, "cookies").unwrap_or(0) {
        builder = builder.header("set-cookie", format!("c{i}=v{i}; Path=/"));
    }
    if query_param(&target, "reason") == Some(1) {
        builder = builder.extension(hyper::ext::ReasonPhrase::from_static(b"Custom Reason"));
    }
    if let Some(total) = query_param(&target, "stream") {
        let cut = query_param(&target, "cut");
        if query_param(&target, "length") == Some(1) {
            builder = builder.header("content-length", total.to_string());
        }
        let body = lazy_pattern(total, cut, state.streams.clone());
        return Ok(builder.body(body).expect("valid response"));
    }
    if let Some(events) = query_param(&target, "events") {
        let every = Duration::from_millis(query_param(&target, "every").unwrap_or(100));
        let mut builder = builder;
        if let Some(h) = builder.headers_mut() {
            h.insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
        }
        let body = event_stream(events, every, state.streams.clone());
        return Ok(builder.body(body).expect("valid response"));
    }
    let response = match query_param(&target, "chunked") {
        Some(chunks) if chunks > 0 => {
            let size = payload.len().div_ceil(chunks as usize).max(1);
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = payload
                .chunks(size)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let stream = futures_util::stream::iter(frames);
            builder.body(StreamBody::new(stream).map_err(|n| match n {}).boxed())
        }
        _ => builder.body(Full::new(payload).map_err(|n| match n {}).boxed()),
    };
    Ok(response.expect("valid response"))
}

/// Counts a streamed body while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: Arc<AtomicUsize>) -> Open {
        count.fetch_add(1, Ordering::SeqCst);
        Open(count)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body; an error mid-way makes hyper drop the connection, so
/// the reader sees the body cut.
type Out = BoxBody<Bytes, std::io::Error>;

fn cut_here() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "cut on purpose")
}

/// `total` bytes of [`pattern`], made 64 KiB at a time as the reader takes
/// them; after `cut` bytes, an error (hyper closes the connection).
fn lazy_pattern(total: u64, cut: Option<u64>, streams: Arc<AtomicUsize>) -> Out {
    const FRAME: u64 = 64 * 1024;
    let state = (0u64, Open::new(streams));
    let stream = futures_util::stream::unfold(state, move |(sent, open)| async move {
        let end = cut.unwrap_or(total).min(total);
        if sent >= end {
            if sent != u64::MAX && cut.is_some_and(|c| c < total) {
                return Some((Err(cut_here()), (u64::MAX, open)));
            }
            return None;
        }
        let n = FRAME.min(end - sent);
        let data: Vec<u8> = (sent..sent + n).map(|i| (i * 7 % 256) as u8).collect();
        Some((Ok(Frame::data(Bytes::from(data))), (sent + n, open)))
    });
    StreamBody::new(stream).boxed()
}

/// Server-sent events: `data: I` every `every`, the first at once.
fn event_stream(events: u64, every: Duration, streams: Arc<AtomicUsize>) -> Out {
    let state = (0u64, Open::new(streams));
    let stream = futures_util::stream::unfold(state, move |(i, open)| async move {
        if i >= events {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        let event = Bytes::from(format!("data: {i}\n\n"));
        Some((Ok(Frame::data(event)), (i + 1, open)))
    });
    StreamBody::new(stream).boxed()
}
