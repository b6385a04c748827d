//! Accepting clients: TCP or unix listener, HTTP/1.1 and h2c on the same
//! port, bounded request heads, upgrades handed over to [`crate::tunnel`],
//! and a graceful drain on shutdown (open tunnels included).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use thr_broker::{Broker, Daemon};
use thr_core::config::ListenAddr;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tower::Service;

use crate::front::{Front, Peer};
use crate::replies;

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

/// Serves `front` on `listener` until `shutdown`, then drains.
pub async fn serve<B: Broker>(
    front: Front<B>,
    listener: Listener,
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

    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = &mut shutdown => break,
        };
        let (io, peer) = match conn {
            Ok(Conn::Tcp(stream, peer)) => (Io::Tcp(TokioIo::new(stream)), Some(peer)),
            Ok(Conn::Unix(stream)) => (Io::Unix(TokioIo::new(stream)), None),
            Err(err) => {
                // Out of file descriptors and the like: pause, do not spin.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = front.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            let mut app = app.clone();
            async move { app.call(req).await }
        });
        match io {
            Io::Tcp(io) => {
                let conn = graceful.watch(
                    builder
                        .serve_connection_with_upgrades(io, service)
                        .into_owned(),
                );
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                });
            }
            Io::Unix(io) => {
                let conn = graceful.watch(
                    builder
                        .serve_connection_with_upgrades(io, service)
                        .into_owned(),
                );
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(%err, "connection ended with an error");
                    }
                });
            }
        }
    }

    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    tracing::info!(
        waiting = front.router().len(),
        "stopped accepting; draining"
    );
    // An upgraded connection has left hyper (and `graceful`): its tunnel
    // gets the same grace, then is closed.
    let drained = async {
        graceful.shutdown().await;
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

enum Io {
    Tcp(TokioIo<tokio::net::TcpStream>),
    Unix(TokioIo<tokio::net::UnixStream>),
}
