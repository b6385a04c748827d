//! One backend call: a request head and a body stream in, the response
//! head and its body stream out (ARCHITECTURE.md decision 12). Nothing is
//! collected here: the worker decides whether a response is small enough
//! to travel whole or streams in pieces, and a bypassed request streams
//! straight through the front. A call that fails before a response head
//! becomes a [`Failure`] (502 when the backend cannot be reached, 504 when
//! it is too slow), so the client is always answered. A call that failed
//! before its request reached the backend (no connection, or a kept-alive
//! connection the backend had closed, [`crate::reuse`]) is made once more
//! on a fresh connection, whatever the method.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use thr_core::config::{BackendAddress, QueueConfig};
use thr_core::envelope::{HeaderList, JobMeta};
use thr_core::headers::strip_hop_by_hop;
use thr_core::target;

use crate::connector::UnixConnector;
use crate::replay::Replay;
use crate::reuse::{ProbedConnector, StaleConnection};

/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether `err`, or one of its causes, is an `E` (looking inside
/// `io::Error`s too, whose `source()` skips the error they wrap).
pub fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err.is::<E>()
            || err
                .downcast_ref::<std::io::Error>()
                .and_then(|e| e.get_ref())
                .is_some_and(|inner| inner.is::<E>())
        {
            return true;
        }
        cause = err.source();
    }
    false
}

/// A request body on its way to the backend: in memory, read from Redis
/// chunk by chunk, or the client's own stream (bypass).
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// A request body held in memory.
pub fn full_body(data: Bytes) -> RequestBody {
    Full::new(data)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A call that produced no response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Status for the client.
    pub status: StatusCode,
    /// Why, in a few words (the body of thr's answer).
    pub reason: &'static str,
}

impl Failure {
    /// The header fields of thr's own answer.
    pub fn headers() -> HeaderList {
        HeaderList(vec![(
            "content-type".into(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
    }

    /// The body of thr's own answer.
    pub fn body(&self) -> Bytes {
        Bytes::from(format!("{}\n", self.reason))
    }
}

/// A response head from the backend, hop-by-hop fields removed.
#[derive(Debug, Clone)]
pub struct Head {
    /// Status for the client.
    pub status: StatusCode,
    /// Header fields for the client.
    pub headers: HeaderList,
    /// The declared body length (Content-Length), if any.
    pub length: Option<u64>,
    /// The backend sent its body without a length (chunked).
    pub chunked: bool,
    /// Its reason phrase, when not the status code's usual one (hyper
    /// reports only those).
    pub reason: Option<String>,
}

enum Pool {
    Http(Client<ProbedConnector<HttpConnector>, RequestBody>),
    Unix(Client<ProbedConnector<UnixConnector>, RequestBody>),
}

impl Pool {
    async fn request(
        &self,
        req: Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        match self {
            Pool::Http(client) => client.request(req).await,
            Pool::Unix(client) => client.request(req).await,
        }
    }
}

/// A pooled keep-alive client bound to one queue's backend.
pub struct Forwarder {
    pool: Pool,
    /// The same backend without kept-alive connections: a second attempt
    /// must not find another stale one.
    fresh: Pool,
    /// `http://authority/base` that targets are appended to.
    prefix: String,
    /// The base path alone (the start of every request line's target).
    base_path: String,
}

/// The 502 reason for a response head over the queue's limits.
const HEAD_TOO_LARGE: &str =
    "backend response head too large (max_response_headers, max_response_header_size)";

impl Forwarder {
    /// A client for `queue`'s backend, keeping up to `max_inflight`
    /// connections alive.
    pub fn new(queue: &QueueConfig) -> Forwarder {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(queue.max_inflight.get())
            .http1_max_headers(queue.max_response_headers)
            .http1_max_buf_size(queue.max_response_header_size);
        let mut once = builder.clone();
        once.pool_max_idle_per_host(0);
        let backend = &queue.backend;
        match &backend.address {
            BackendAddress::Http { authority } => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(Duration::from_secs(5)));
                Forwarder {
                    pool: Pool::Http(builder.build(ProbedConnector(connector.clone()))),
                    fresh: Pool::Http(once.build(ProbedConnector(connector))),
                    prefix: format!("http://{authority}{}", backend.base_path),
                    base_path: backend.base_path.clone(),
                }
            }
            BackendAddress::Unix(path) => {
                let connector = UnixConnector::new(path.clone());
                Forwarder {
                    pool: Pool::Unix(builder.build(ProbedConnector(connector.clone()))),
                    fresh: Pool::Unix(once.build(ProbedConnector(connector))),
                    prefix: format!("http://localhost{}", backend.base_path),
                    base_path: backend.base_path.clone(),
                }
            }
        }
    }

    /// Sends a request to the backend and waits up to `timeout` for the
    /// response head; the body is left to the caller to read.
    pub async fn send(
        &self,
        meta: &JobMeta,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<(Head, Incoming), Failure> {
        let response = match tokio::time::timeout(timeout, self.call(meta, body)).await {
            Ok(Ok(response)) => response,
            Ok(Err(failure)) => return Err(failure),
            Err(_) => {
                return Err(Failure {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    reason: "backend timed out",
                });
            }
        };
        let (parts, body) = response.into_parts();
        // thr never asks a backend to switch protocols on a queued request
        // (Upgrade is stripped; upgrades are tunnelled by the front).
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Failure {
                status: StatusCode::BAD_GATEWAY,
                reason: "backend switched protocols without being asked to",
            });
        }
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
        Ok((head_of(parts.status, parts.headers, reason), body))
    }

    /// The call, made a second time on a fresh connection when the first
    /// did not reach the backend.
    async fn call(
        &self,
        meta: &JobMeta,
        body: RequestBody,
    ) -> Result<http::Response<Incoming>, Failure> {
        // An empty body needs no copy to be sent again.
        let (body, back) = if body.is_end_stream() {
            (body, None)
        } else {
            let (replay, back) = Replay::new(body);
            (replay.boxed_unsync(), Some(back))
        };
        let err = match self.pool.request(self.request(meta, body)?).await {
            Ok(response) => return Ok(response),
            Err(err) => err,
        };
        if !(err.is_connect() || caused_by::<StaleConnection>(&err)) {
            return Err(failed(err));
        }
        let again = match back {
            None => Some(full_body(Bytes::new())),
            // The client drops the body as its call ends; the copy comes
            // back then.
            Some(back) => back
                .await
                .ok()
                .and_then(|left| left.replay())
                .map(|(replay, _)| replay.boxed_unsync()),
        };
        let Some(again) = again else {
            return Err(failed(err));
        };
        tracing::debug!(error = %err, "backend call did not reach the backend; once more on a fresh connection");
        self.fresh
            .request(self.request(meta, again)?)
            .await
            .map_err(failed)
    }

    fn request(&self, meta: &JobMeta, body: RequestBody) -> Result<Request<RequestBody>, Failure> {
        let bad = |reason| Failure {
            status: StatusCode::BAD_REQUEST,
            reason,
        };
        let method =
            Method::from_bytes(meta.method.as_bytes()).map_err(|_| bad("invalid method"))?;
        // A query the URI type refuses (raw `"`, `<`, `>`) goes encoded
        // into the URI and as sent into the request line (see reuse.rs).
        let encoded = target::encode_query(meta.target.as_bytes())
            .map(|e| String::from_utf8(e).expect("encoding keeps UTF-8"));
        let uri = format!(
            "{}{}",
            self.prefix,
            encoded.as_deref().unwrap_or(&meta.target)
        );
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .map_err(|_| bad("invalid request target"))?;
        *req.headers_mut() = meta.headers.to_map();
        // The front has the whole body and answered the client's Expect:
        // the backend is not asked to say 100 Continue (a response before
        // the body is written would only complicate the connection).
        req.headers_mut().remove(http::header::EXPECT);
        if encoded.is_some() {
            let raw = format!("{}{}", self.base_path, meta.target);
            let value =
                http::HeaderValue::from_str(&raw).map_err(|_| bad("invalid request target"))?;
            req.headers_mut()
                .insert(crate::reuse::raw_target_field().clone(), value);
        }
        Ok(req)
    }
}

/// The failure a client is told of for a call that produced no response.
fn failed(err: hyper_util::client::legacy::Error) -> Failure {
    let too_large = std::error::Error::source(&err)
        .and_then(|e| e.downcast_ref::<hyper::Error>())
        .is_some_and(|e| e.is_parse_too_large());
    if too_large {
        tracing::warn!(error = %err, "backend response head over the queue's limits");
        return Failure {
            status: StatusCode::BAD_GATEWAY,
            reason: HEAD_TOO_LARGE,
        };
    }
    tracing::warn!(error = %err, cause = ?std::error::Error::source(&err), "backend call failed");
    Failure {
        status: StatusCode::BAD_GATEWAY,
        reason: "backend unavailable",
    }
}

/// The head a client is given for a backend's `status`, `headers` and
/// unusual reason phrase, if any (hyper reports a phrase holding obs-text
/// bytes as an empty one, which is passed on as such; one that is not
/// UTF-8 would be left out, the client getting the usual one).
pub fn head_of(
    status: StatusCode,
    mut headers: HeaderMap,
    reason: Option<&hyper::ext::ReasonPhrase>,
) -> Head {
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let chunked = headers.contains_key(http::header::TRANSFER_ENCODING) && length.is_none();
    strip_hop_by_hop(&mut headers);
    Head {
        status,
        headers: HeaderList::from_map(&headers),
        length,
        chunked,
        reason: reason.and_then(|r| std::str::from_utf8(r.as_bytes()).ok().map(str::to_owned)),
    }
}
