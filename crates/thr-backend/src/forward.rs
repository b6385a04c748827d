//! One backend call: job in, reply out. Every outcome becomes a reply, so
//! the client is always answered: the backend's response, or 502 when it
//! cannot be reached, or 504 when it is too slow.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use thr_core::config::{BackendAddress, QueueConfig};
use thr_core::envelope::{HeaderList, Job};
use thr_core::headers::strip_hop_by_hop;

use crate::connector::UnixConnector;

/// What came back from the backend (or instead of it).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Status for the client.
    pub status: StatusCode,
    /// Headers for the client, hop-by-hop removed.
    pub headers: HeaderList,
    /// Body for the client.
    pub body: Bytes,
    /// Time spent on the backend call.
    pub elapsed: Duration,
    /// The backend gave no Content-Length (it streamed the body).
    pub chunked: bool,
}

enum Pool {
    Http(Client<HttpConnector, Full<Bytes>>),
    Unix(Client<UnixConnector, Full<Bytes>>),
}

/// A pooled keep-alive client bound to one queue's backend.
pub struct Forwarder {
    pool: Pool,
    /// `http://authority/base` that targets are appended to.
    prefix: String,
}

impl Forwarder {
    /// A client for `queue`'s backend, keeping up to `max_inflight`
    /// connections alive.
    pub fn new(queue: &QueueConfig) -> Forwarder {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(queue.max_inflight.get());
        let backend = &queue.backend;
        match &backend.address {
            BackendAddress::Http { authority } => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(Duration::from_secs(5)));
                Forwarder {
                    pool: Pool::Http(builder.build(connector)),
                    prefix: format!("http://{authority}{}", backend.base_path),
                }
            }
            BackendAddress::Unix(path) => Forwarder {
                pool: Pool::Unix(builder.build(UnixConnector::new(path.clone()))),
                prefix: format!("http://localhost{}", backend.base_path),
            },
        }
    }

    /// Sends `job` to the backend, giving up after `timeout`.
    pub async fn forward(&self, job: &Job, timeout: Duration) -> Outcome {
        let started = Instant::now();
        let outcome = match self.request(job) {
            Ok(req) => match tokio::time::timeout(timeout, self.send(req)).await {
                Ok(Ok((status, headers, body))) => Ok((status, headers, body)),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "backend call failed");
                    Err((StatusCode::BAD_GATEWAY, "backend unavailable"))
                }
                Err(_) => Err((StatusCode::GATEWAY_TIMEOUT, "backend timed out")),
            },
            Err(reason) => Err((StatusCode::BAD_REQUEST, reason)),
        };
        let elapsed = started.elapsed();
        match outcome {
            Ok((status, mut headers, body)) => {
                let chunked = headers.contains_key(http::header::TRANSFER_ENCODING)
                    && !headers.contains_key(http::header::CONTENT_LENGTH);
                strip_hop_by_hop(&mut headers);
                Outcome {
                    chunked,
                    status,
                    headers: HeaderList::from_map(&headers),
                    body,
                    elapsed,
                }
            }
            Err((status, reason)) => Outcome {
                status,
                headers: HeaderList(vec![(
                    "content-type".into(),
                    b"text/plain; charset=utf-8".to_vec(),
                )]),
                body: Bytes::from(format!("{reason}\n")),
                elapsed,
                chunked: false,
            },
        }
    }

    fn request(&self, job: &Job) -> Result<Request<Full<Bytes>>, &'static str> {
        let method =
            Method::from_bytes(job.meta.method.as_bytes()).map_err(|_| "invalid method")?;
        let uri = format!("{}{}", self.prefix, job.meta.target);
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(job.body.clone()))
            .map_err(|_| "invalid request target")?;
        *req.headers_mut() = job.meta.headers.to_map();
        Ok(req)
    }

    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        let response = match &self.pool {
            Pool::Http(client) => client.request(req).await?,
            Pool::Unix(client) => client.request(req).await?,
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}
