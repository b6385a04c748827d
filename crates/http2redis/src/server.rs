//! Accepting clients: TCP or unix listener (through TLS when configured,
//! [`crate::tls`]), HTTP/1.1 and h2c (h2 by ALPN over TLS) on the same
//! port, bounded request heads, upgrades handed over to [`crate::tunnel`],
//! and a graceful drain on shutdown (open tunnels included).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use thr_broker::{Broker, Daemon};
use thr_core::config::ListenAddr;
use thr_daemon::log_every::LogEvery;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::Service;

use crate::conn;
use crate::front::{Front, Peer, ViaTls};
use crate::lenient::{Lenient, OriginalTarget, Originals};
use crate::replies;
use crate::tls::Tls;

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket; the file is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file left by a crash is replaced.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr).await?)),
            ListenAddr::Unix(path) => {
                if std::fs::metadata(path).is_ok()
                    && std::os::unix::net::UnixStream::connect(path).is_err()
                {
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    /// Where it listens (with the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            Listener::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Conn::Tcp(stream, peer))
            }
            Listener::Unix(l, _) => Ok(Conn::Unix(l.accept().await?.0)),
        }
    }
}

/// Serves `front` on `listener` (through TLS when `tls` is given) until
/// `shutdown`, then drains.
pub async fn serve<B: Broker>(
    front: Front<B>,
    listener: Listener,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let settings = front.config().front.clone();
    let (stop_replies, stop_rx) = watch::channel(false);
    let orphan = {
        let front = front.clone();
        move |id: String| {
            let front = front.clone();
            tokio::spawn(async move {
                if let Err(err) = front.broker().cancel_stream(&id).await {
                    tracing::debug!(job = %id, %err, "could not cancel an orphan stream (its worker gives up by itself)");
                }
            });
        }
    };
    let reply_loop = tokio::spawn(replies::run_loop(
        front.broker().replies(front.id()),
        front.router().clone(),
        orphan,
        front.broker().recovery(),
        stop_rx.clone(),
    ));
    let (beats_tx, beats) = tokio::sync::mpsc::channel(4);
    let audits = tokio::spawn({
        let front = front.clone();
        let stop = stop_rx.clone();
        async move { crate::audit::run(front.broker(), front.router(), beats, stop).await }
    });
    // Known alive before taking requests: a front that never beat is
    // taken for alive, but one whose beats lag is not.
    let _ = front
        .broker()
        .heartbeat(Daemon::Front, front.id(), "{}")
        .await;
    let presence = tokio::spawn({
        let front = front.clone();
        let started = thr_broker::presence::unix_now();
        let listen = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        async move {
            let info = || {
                metrics::gauge!("thr_requests_waiting").set(front.router().len() as f64);
                serde_json::json!({
                    "kind": "http2redis",
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "started": started,
                    "listen": listen,
                    "waiting": front.router().len(),
                })
                .to_string()
            };
            thr_broker::presence::keep_alive(
                front.broker(),
                Daemon::Front,
                front.id(),
                info,
                move |beat| {
                    // A full channel means an audit is under way already.
                    let _ = beats_tx.try_send(beat);
                },
                stop_rx,
            )
            .await;
        }
    });

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A proxy passes the origin's Date on; it does not invent one.
        .auto_date_header(false)
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .max_headers(settings.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .auto_date_header(false)
        .max_header_list_size(settings.max_header_bytes as u32);

    let builder = Arc::new(builder);
    let max_connections = max_connections(&settings);
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stop_conns, stopping) = watch::channel(false);
    let mut accept_errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    // The listener is bound and the loops that answer clients run.
    thr_daemon::notify_ready();
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = &mut shutdown => break,
        };
        let conn = match conn {
            Ok(conn) => {
                accept_errors.recovered();
                conn
            }
            Err(err) => {
                // Out of descriptors and the like: back off (the idle
                // connections' bounds free some), and say so once in a while.
                let pause = accept_errors.failed(&err);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = &mut shutdown => break,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // A TLS client could not read a plain answer: it is just closed.
            if tls.is_none() {
                refuse(conn);
            } else {
                metrics::counter!("thr_connections_refused_total").increment(1);
            }
            continue;
        };
        // Bounds as configured now (a reload applies to new connections).
        let config = front.config();
        let limits = conn::Limits::of(&config.front);
        let pace = conn::Pace::of(&config.front);
        let watch = Arc::new(conn::Watch::default());
        let originals = Arc::new(Originals::default());
        let via_tls = tls.is_some();
        let tls = tls.as_deref();
        let within = limits.first_request;
        let (io, peer) = match conn {
            Conn::Tcp(stream, peer) => (
                client_io(stream, tls, within, &originals, &watch),
                Some(peer),
            ),
            Conn::Unix(stream) => (client_io(stream, tls, within, &originals, &watch), None),
        };
        let app = front.clone();
        let service = {
            let watch = watch.clone();
            let originals = originals.clone();
            hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let open = watch.open();
                let mut req = req.map(|body| conn::Paced::new(body, pace));
                req.extensions_mut().insert(Peer(peer));
                if via_tls {
                    req.extensions_mut().insert(ViaTls);
                }
                // HTTP/1 requests come through the lenient follower, in order.
                if req.version() < http::Version::HTTP_2
                    && let Some(original) = originals.next()
                {
                    req.extensions_mut().insert(OriginalTarget(original));
                }
                let mut app = app.clone();
                async move {
                    let response = app.call(req).await?;
                    Ok::<_, Infallible>(response.map(|body| conn::Tracked::new(body, open)))
                }
            })
        };
        let mut stopping = stopping.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            // (A TLS handshake first: in this task, under the connection's
            // slot, within its first-request bound, and given up when the
            // server stops: nothing was asked of it yet.)
            let io = tokio::select! {
                io = io => io,
                _ = stopping.wait_for(|stop| *stop) => None,
            };
            let Some(io) = io else { return };
            let conn = builder
                .serve_connection_with_upgrades(io, service)
                .into_owned();
            drive(
                conn,
                |c: Pin<&mut _>| c.graceful_shutdown(),
                watch,
                limits,
                stopping,
                slot,
            )
            .await
        });
    }

    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    thr_daemon::notify_stopping();
    tracing::info!(
        waiting = front.router().len(),
        "stopped accepting; draining"
    );
    // An upgraded connection has left hyper (and `graceful`): its tunnel
    // gets the same grace, then is closed.
    let _ = stop_conns.send(true);
    let drained = async {
        let _ = slots.acquire_many(max_connections as u32).await;
        front.tunnels().drained().await;
    };
    tokio::select! {
        _ = drained => {}
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!(waiting = front.router().len(), "shutdown grace elapsed; closing remaining connections");
        }
    }
    front.tunnels().close();
    let _ = stop_replies.send(true);
    let _ = reply_loop.await;
    let _ = presence.await;
    let _ = audits.await;
    front.finish_withdrawals().await;
    tracing::info!("http2redis stopped");
    Ok(())
}

/// A client socket of either kind, as hyper serves it (one code path for
/// TCP and unix clients; a call through the box costs nothing next to the
/// system call behind it).
trait ClientIo: hyper::rt::Read + hyper::rt::Write + Unpin + Send {}

impl<T: hyper::rt::Read + hyper::rt::Write + Unpin + Send> ClientIo for T {}

/// A client socket as hyper gets it: its request lines made acceptable
/// ([`Lenient`]) and its writes watched ([`conn::Watched`]).
fn watched<S>(
    stream: S,
    originals: &Arc<Originals>,
    watch: &Arc<conn::Watch>,
) -> conn::Watched<TokioIo<Lenient<S>>> {
    conn::Watched::new(
        TokioIo::new(Lenient::new(stream, originals.clone())),
        watch.clone(),
    )
}

/// A client's socket, ready for hyper once its TLS handshake (if any) is
/// done; None when the handshake failed.
type ClientIoReady = Pin<Box<dyn Future<Output = Option<Box<dyn ClientIo>>> + Send>>;

/// A client socket for hyper: as it is, or after a TLS handshake bounded
/// like the connection's first request (`within`).
fn client_io<S>(
    stream: S,
    tls: Option<&Tls>,
    within: Duration,
    originals: &Arc<Originals>,
    watch: &Arc<conn::Watch>,
) -> ClientIoReady
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(tls) = tls else {
        let io: Box<dyn ClientIo> = Box::new(watched(stream, originals, watch));
        return Box::pin(std::future::ready(Some(io)));
    };
    let acceptor = tls.acceptor();
    let (originals, watch) = (originals.clone(), watch.clone());
    Box::pin(async move {
        match tokio::time::timeout(within, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                Some(Box::new(watched(stream, &originals, &watch)) as Box<dyn ClientIo>)
            }
            Ok(Err(err)) => {
                metrics::counter!("thr_tls_handshake_failures_total").increment(1);
                tracing::debug!(%err, "TLS handshake failed");
                None
            }
            Err(_) => {
                metrics::counter!("thr_tls_handshake_failures_total").increment(1);
                tracing::debug!("TLS handshake not done within {within:?}");
                None
            }
        }
    })
}

/// Serves one connection until it ends, outlives a bound of [`conn::Limits`]
/// (then it is wound down, and dropped if that takes over a second; a
/// client that reads nothing is dropped at once), or the
/// server stops (wound down; the server's grace bounds the rest). `slot` is
/// its place under `max_connections`.
async fn drive<C>(
    conn: C,
    wind_down: impl Fn(Pin<&mut C>),
    watch: Arc<conn::Watch>,
    limits: conn::Limits,
    mut stopping: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) where
    C: Future<Output = Result<(), AutoError>>,
{
    let _slot = slot;
    let open = metrics::gauge!("thr_connections_open");
    open.increment(1.0);
    let _open = Defer(move || open.decrement(1.0));
    tokio::pin!(conn);
    let mut winding = false;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(err) = ended {
                    tracing::debug!(%err, "connection ended with an error");
                }
                return;
            }
            changed = stopping.changed(), if !winding => {
                if changed.is_err() || *stopping.borrow() {
                    winding = true;
                    wind_down(conn.as_mut());
                }
            }
            _ = tokio::time::sleep_until(next) => match watch.check(&limits) {
                Ok(at) => next = at,
                Err(expired) => {
                    metrics::counter!("thr_connections_closed_total", "reason" => expired.as_str())
                        .increment(1);
                    tracing::debug!(reason = expired.as_str(), "closing a connection");
                    // An idle connection is told (h2 GOAWAY); one whose
                    // client reads nothing could never take it.
                    if expired != conn::Expired::NotReading {
                        if !winding {
                            wind_down(conn.as_mut());
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                    }
                    return;
                }
            },
        }
    }
}

type AutoError = Box<dyn std::error::Error + Send + Sync>;

/// Runs its function when dropped (however the connection's task ends).
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The `max_connections` in force: the configured one, or what the
/// descriptor limit leaves after room for Redis, backends and tunnels.
fn max_connections(settings: &thr_core::config::FrontSettings) -> usize {
    let derived = || {
        let files = thr_daemon::limits::open_files().unwrap_or(1024) as usize;
        (files.saturating_sub(64) * 9 / 10).max(16)
    };
    let chosen = settings
        .max_connections
        .map_or_else(derived, |n| n as usize);
    tracing::debug!(max_connections = chosen, "client connections bounded");
    chosen.min(Semaphore::MAX_PERMITS)
}

/// Answers a connection beyond `max_connections` with a 503 (if its socket
/// takes it at once) and closes it: the client learns why, and nothing
/// waits on it.
fn refuse(conn: Conn) {
    const BODY: &str = "too many connections, try again later\n";
    static RESPONSE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
            BODY.len()
        )
    });
    metrics::counter!("thr_connections_refused_total").increment(1);
    let _ = match &conn {
        Conn::Tcp(stream, _) => stream.try_write(RESPONSE.as_bytes()),
        Conn::Unix(stream) => stream.try_write(RESPONSE.as_bytes()),
    };
}

/// Accept failures in a row: how long to pause, and log lines kept to one
/// per 10 s (out of descriptors, accept fails for every pending client).
struct AcceptErrors {
    failures: u32,
    log: LogEvery,
}

impl Default for AcceptErrors {
    fn default() -> AcceptErrors {
        AcceptErrors {
            failures: 0,
            log: LogEvery::failures(),
        }
    }
}

impl AcceptErrors {
    fn failed(&mut self, err: &io::Error) -> Duration {
        self.failures += 1;
        metrics::counter!("thr_accept_errors_total").increment(1);
        if let Some(unlogged) = self.log.admit() {
            tracing::warn!(%err, unlogged, "accept failed; pausing accepts (idle connections are closed by their timeouts)");
        }
        // 50 ms doubling to 1 s: a full descriptor table frees up as idle
        // connections reach their bounds.
        thr_broker::backoff::backoff(self.failures).min(Duration::from_secs(1))
    }

    fn recovered(&mut self) {
        self.failures = 0;
    }
}
