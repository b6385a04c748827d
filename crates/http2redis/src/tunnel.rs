//! Upgrade requests (WebSocket and any other HTTP/1.1 `Upgrade`) become
//! tunnels (ARCHITECTURE.md decision 17). [`Upgrade::take`] recognises one
//! before the hop-by-hop fields are removed and keeps the client's upgrade
//! handle; the request then goes through admission, the rules and the auth
//! service like any other, and instead of being dispatched it comes here:
//! [`Tunnels::open`] takes a slot of its queue's `max_tunnels`, opens a fresh
//! connection to the queue's backend (like `bypass`: no queue, no quota),
//! sends it the handshake and, when the backend switches protocols, answers
//! the client 101 and copies bytes both ways until the tunnel closes. A
//! backend that does not switch is answered as an ordinary response, so a
//! 101 only ever reaches a client that asked to upgrade.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderValue, TRANSFER_ENCODING, UPGRADE,
};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use thr_core::config::{BackendAddress, QueueConfig};
use thr_core::headers::strip_hop_by_hop;
use thr_core::rules::RuleRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::body::ReplyBody;
use crate::error::FrontError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a client asked to upgrade to, taken from its request before the
/// hop-by-hop fields are removed.
pub struct Upgrade {
    /// The protocols asked for: the `Upgrade` field, `h2c` left out.
    protocols: HeaderValue,
    /// The client's connection, once hyper has sent it the 101.
    client: OnUpgrade,
}

impl Upgrade {
    /// The upgrade `req` asks for, if any: an HTTP/1.1 request whose
    /// `Connection` field names `upgrade` and whose `Upgrade` field names a
    /// protocol. Takes the client's upgrade handle out of the request.
    ///
    /// `h2c` does not count: the front speaks HTTP/2 by prior knowledge, and
    /// a client offering h2c (`curl --http2`) must not skip the queue; its
    /// request is queued as HTTP/1.1, the offer dropped like any hop-by-hop
    /// field.
    pub fn take<B>(req: &mut Request<B>) -> Option<Upgrade> {
        if req.version() != Version::HTTP_11 || !names_upgrade(req.headers()) {
            return None;
        }
        let protocols = protocols(req.headers())?;
        let client = req.extensions_mut().remove::<OnUpgrade>()?;
        Some(Upgrade { protocols, client })
    }

    /// Puts the `Upgrade` field back (admission removed it with the other
    /// hop-by-hop fields), so that rules can match on it.
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(UPGRADE, self.protocols.clone());
    }
}

/// True when a `Connection` field holds the token `upgrade`.
fn names_upgrade(headers: &HeaderMap) -> bool {
    tokens(headers, &CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The protocols of the `Upgrade` fields, `h2c` left out; None if none is left.
fn protocols(headers: &HeaderMap) -> Option<HeaderValue> {
    let wanted: Vec<&str> = tokens(headers, &UPGRADE)
        .filter(|t| !t.eq_ignore_ascii_case("h2c"))
        .collect();
    if wanted.is_empty() {
        return None;
    }
    HeaderValue::from_str(&wanted.join(", ")).ok()
}

fn tokens<'h>(
    headers: &'h HeaderMap,
    name: &'h http::HeaderName,
) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The front's tunnels: how many are open per queue, and the tasks that
/// copy their bytes (owned here, so that shutdown can wait for them and
/// then close them).
#[derive(Default)]
pub struct Tunnels {
    /// Open tunnels per queue name. Counted rather than a semaphore so that
    /// a reload changing `max_tunnels` takes effect at once, both ways,
    /// without rebuilding anything.
    open: Mutex<HashMap<String, Arc<AtomicU32>>>,
    /// One task per open tunnel.
    tasks: Mutex<JoinSet<()>>,
}

/// One open tunnel's place in its queue's cap, given back when dropped.
struct Slot {
    queue: String,
    open: Arc<AtomicU32>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now = self.open.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!("thr_tunnels_open", "queue" => self.queue.clone()).set(now);
    }
}

impl Tunnels {
    /// Tunnels an upgrade request to `queue`'s backend. `rreq` is the
    /// request as the rules left it (proxy headers included) and `body` what
    /// the client sent with it (nothing, for a WebSocket handshake). The
    /// answer is the backend's: a 101 (the tunnel then runs on a task of its
    /// own until either side closes it) or any other response, relayed.
    pub async fn open(
        &self,
        upgrade: Upgrade,
        queue: &QueueConfig,
        rreq: RuleRequest,
        body: Bytes,
        span: &tracing::Span,
    ) -> Result<Response<ReplyBody>, FrontError> {
        let result = self
            .try_open(upgrade, queue, rreq, body)
            .instrument(span.clone())
            .await;
        let status = match &result {
            Ok(response) => response.status(),
            Err(err) => err.status().0,
        };
        metrics::counter!(
            "thr_tunnels_total",
            "queue" => queue.name.clone(),
            "status" => status.as_u16().to_string()
        )
        .increment(1);
        result
    }

    async fn try_open(
        &self,
        upgrade: Upgrade,
        queue: &QueueConfig,
        rreq: RuleRequest,
        body: Bytes,
    ) -> Result<Response<ReplyBody>, FrontError> {
        let slot = self.take(queue)?;
        let request = backend_request(queue, &upgrade.protocols, rreq, body)?;
        let exchange = handshake(&queue.backend.address, request, &upgrade.protocols);
        let (response, backend) = match tokio::time::timeout(queue.backend_timeout, exchange).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, backend = %queue.backend.display, "upgrade: backend unavailable");
                return Err(FrontError::BackendUnavailable);
            }
            Err(_) => return Err(FrontError::BackendTimeout),
        };
        if let Some(backend) = backend {
            let splice = splice(upgrade.client, backend, slot);
            self.spawn(splice.instrument(tracing::Span::current()));
        }
        Ok(response)
    }

    /// A slot of `queue`'s cap of open tunnels.
    fn take(&self, queue: &QueueConfig) -> Result<Slot, FrontError> {
        let cap = queue.max_tunnels;
        if cap == 0 {
            return Err(FrontError::UpgradeRefused {
                queue: queue.name.clone(),
            });
        }
        let open = lock(&self.open)
            .entry(queue.name.clone())
            .or_default()
            .clone();
        match open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < cap).then_some(n + 1)
        }) {
            Ok(was) => {
                metrics::gauge!("thr_tunnels_open", "queue" => queue.name.clone()).set(was + 1);
                Ok(Slot {
                    queue: queue.name.clone(),
                    open,
                })
            }
            Err(_) => Err(FrontError::TunnelsFull {
                queue: queue.name.clone(),
            }),
        }
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        while let Some(ended) = tasks.try_join_next() {
            if let Err(err) = ended
                && err.is_panic()
            {
                tracing::error!(%err, "a tunnel task panicked");
            }
        }
        tasks.spawn(task);
    }

    /// Waits until every tunnel has closed (shutdown). Dropping this future
    /// closes the tunnels it was waiting for.
    pub async fn drained(&self) {
        loop {
            let mut tasks = std::mem::take(&mut *lock(&self.tasks));
            if tasks.is_empty() {
                return;
            }
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Closes every tunnel still open (the end of the shutdown grace).
    pub fn close(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        if !tasks.is_empty() {
            tracing::warn!(tunnels = tasks.len(), "closing open tunnels");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The handshake for the backend: the request as the rules left it, under
/// the backend's base path, asking for the client's protocols.
fn backend_request(
    queue: &QueueConfig,
    protocols: &HeaderValue,
    rreq: RuleRequest,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, FrontError> {
    // Origin form: this connection is the backend's alone.
    let target = format!("{}{}", queue.backend.base_path, rreq.target);
    let mut request = Request::builder()
        .method(rreq.method)
        .uri(target)
        .body(Full::new(body))
        .map_err(|_| FrontError::BadTarget)?;
    *request.headers_mut() = rreq.headers;
    let headers = request.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocols.clone());
    Ok(request)
}

/// Sends `request` on a fresh connection to the backend. Its answer is the
/// client's response; when it is a 101, the backend's side of the tunnel
/// comes with it.
async fn handshake(
    address: &BackendAddress,
    request: Request<Full<Bytes>>,
    protocols: &HeaderValue,
) -> Result<(Response<ReplyBody>, Option<Upgraded>), BoxError> {
    match address {
        BackendAddress::Http { authority } => {
            let stream = TcpStream::connect(authority.as_str()).await?;
            let _ = stream.set_nodelay(true);
            exchange(stream, request, protocols).await
        }
        BackendAddress::Unix(path) => {
            exchange(UnixStream::connect(path).await?, request, protocols).await
        }
    }
}

async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
    protocols: &HeaderValue,
) -> Result<(Response<ReplyBody>, Option<Upgraded>), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection runs beside us until it answers (and, for a 101, hands
    // its socket over); leaving this function ends it in any case.
    let mut connection = JoinSet::new();
    connection.spawn(conn.with_upgrades());
    let mut response = sender.send_request(request).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        return Ok((relayed(parts, body), None));
    }
    let backend = hyper::upgrade::on(&mut response).await?;
    let (parts, _) = response.into_parts();
    Ok((switched(parts, protocols), Some(backend)))
}

/// The backend's refusal (or any answer but a 101), as an ordinary response.
fn relayed(mut parts: http::response::Parts, body: Bytes) -> Response<ReplyBody> {
    let chunked = parts.headers.contains_key(TRANSFER_ENCODING)
        && !parts.headers.contains_key(CONTENT_LENGTH);
    strip_hop_by_hop(&mut parts.headers);
    let body = if chunked {
        ReplyBody::streamed(body)
    } else {
        ReplyBody::sized(body)
    };
    Response::from_parts(parts, body)
}

/// The backend's 101 for the client: its fields (Sec-WebSocket-Accept and
/// the like), with the upgrade it chose.
fn switched(mut parts: http::response::Parts, asked: &HeaderValue) -> Response<ReplyBody> {
    let chosen = parts.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    parts
        .headers
        .insert(UPGRADE, chosen.unwrap_or_else(|| asked.clone()));
    Response::from_parts(parts, ReplyBody::sized(Bytes::new()))
}

/// The open tunnel: waits for the client's side (hyper hands it over once
/// the 101 is sent), then copies bytes both ways until both directions
/// have ended. Holds its slot until then.
async fn splice(client: OnUpgrade, backend: Upgraded, slot: Slot) {
    let started = Instant::now();
    let client = match client.await {
        Ok(client) => client,
        Err(err) => {
            tracing::debug!(%err, "the client left before its tunnel opened");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    let copied = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
    let ms = started.elapsed().as_millis() as u64;
    match copied {
        Ok((up, down)) => {
            tracing::info!(queue = %slot.queue, up, down, ms, "tunnel closed");
        }
        Err(err) => {
            tracing::info!(queue = %slot.queue, %err, ms, "tunnel broken");
        }
    }
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, fields: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().version(version).uri("/chat");
        for (name, value) in fields {
            req = req.header(*name, *value);
        }
        let mut req = req.body(()).unwrap();
        // Where hyper keeps the client's connection (a handle that never
        // resolves stands in for it here).
        let on = hyper::upgrade::on(Request::new(()));
        req.extensions_mut().insert(on);
        req
    }

    #[test]
    fn an_upgrade_needs_both_fields_on_http_1_1() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        let got = Upgrade::take(&mut request(Version::HTTP_11, &ws)).expect("an upgrade");
        assert_eq!(got.protocols, "websocket");
        assert!(Upgrade::take(&mut request(Version::HTTP_10, &ws)).is_none());
        assert!(Upgrade::take(&mut request(Version::HTTP_2, &ws)).is_none());
        let no_connection = [("upgrade", "websocket")];
        assert!(Upgrade::take(&mut request(Version::HTTP_11, &no_connection)).is_none());
        let no_upgrade = [("connection", "upgrade")];
        assert!(Upgrade::take(&mut request(Version::HTTP_11, &no_upgrade)).is_none());
    }

    fn queue(max_tunnels: u32) -> QueueConfig {
        let text = format!(
            "[[queues]]\nname = \"ws\"\nbackend = \"http://127.0.0.1:1\"\nmax_tunnels = {max_tunnels}\n"
        );
        let config = thr_core::config::Config::parse(&text, "test.toml").unwrap();
        config.queues[0].clone()
    }

    #[test]
    fn the_cap_counts_open_tunnels_and_follows_reloads() {
        let tunnels = Tunnels::default();
        let two = queue(2);
        let (a, b) = (tunnels.take(&two).unwrap(), tunnels.take(&two).unwrap());
        assert!(matches!(
            tunnels.take(&two),
            Err(FrontError::TunnelsFull { queue }) if queue == "ws"
        ));
        drop(a);
        let c = tunnels
            .take(&two)
            .expect("a closed tunnel gives its slot back");
        // A reload lowering the cap: the open ones stay, and count.
        assert!(tunnels.take(&queue(1)).is_err());
        drop((b, c));
        let d = tunnels.take(&queue(1)).unwrap();
        assert!(tunnels.take(&queue(1)).is_err());
        assert!(matches!(
            tunnels.take(&queue(0)),
            Err(FrontError::UpgradeRefused { .. })
        ));
        drop(d);
        assert_eq!(lock(&tunnels.open)["ws"].load(Ordering::SeqCst), 0);
    }

    #[test]
    fn h2c_is_never_tunnelled() {
        let h2c = [
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ];
        assert!(Upgrade::take(&mut request(Version::HTTP_11, &h2c)).is_none());
        let both = [("connection", "upgrade"), ("upgrade", "H2C, websocket")];
        let got = Upgrade::take(&mut request(Version::HTTP_11, &both)).expect("an upgrade");
        assert_eq!(got.protocols, "websocket");
    }
}
