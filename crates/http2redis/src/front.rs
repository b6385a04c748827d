//! The request handler: one client request in, one response out.
//!
//! The request is read whole (bounded by `max_body`), becomes a job envelope
//! and goes on its queue; the handler then waits on its reply channel until
//! the reply timeout. If the client is answered any other way — timeout,
//! Redis error — or goes away (hyper drops the handler's future), a guard
//! withdraws the job from Redis, so the backend never works for nobody.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use thr_broker::{Broker, NewJob};
use thr_core::config::Config;
use thr_core::envelope::{HeaderList, Job, JobMeta, Reply};
use thr_core::priority;
use tracing::Instrument;

use crate::body::ReplyBody;
use crate::error::FrontError;
use crate::forwarded;
use crate::replies::ReplyRouter;

/// The client's address, put in request extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<SocketAddr>);

/// The front application: a cheap-to-clone `tower::Service`.
pub struct Front<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for Front<B> {
    fn clone(&self) -> Self {
        Front {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<B> {
    config: Arc<Config>,
    broker: B,
    id: String,
    router: ReplyRouter,
}

impl<B: Broker> Front<B> {
    /// A front with a fresh id, talking to `broker`.
    pub fn new(config: Arc<Config>, broker: B) -> Front<B> {
        Front {
            inner: Arc::new(Inner {
                config,
                broker,
                id: uuid::Uuid::new_v4().simple().to_string(),
                router: ReplyRouter::default(),
            }),
        }
    }

    /// This front's id (its reply list is named after it).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The waiting requests.
    pub fn router(&self) -> &ReplyRouter {
        &self.inner.router
    }

    /// The broker.
    pub fn broker(&self) -> &B {
        &self.inner.broker
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    /// Answers one request.
    pub async fn handle<Bd>(&self, req: Request<Bd>) -> Response<ReplyBody>
    where
        Bd: Body<Data = Bytes>,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let job_id = uuid::Uuid::new_v4().simple().to_string();
        let method = req.method().clone();
        let target = req.uri().path_and_query().map(|p| p.as_str().to_string());
        let result = self.forward(req, &job_id, started).await;
        let (response, queue) = match result {
            Ok(ok) => ok,
            Err((err, queue)) => (err.into_response(), queue),
        };
        tracing::info!(
            method = %method,
            target = target.as_deref().unwrap_or("-"),
            status = response.status().as_u16(),
            queue = queue.as_deref().unwrap_or("-"),
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }

    async fn forward<Bd>(
        &self,
        req: Request<Bd>,
        job_id: &str,
        started: Instant,
    ) -> Result<(Response<ReplyBody>, Option<String>), (FrontError, Option<String>)>
    where
        Bd: Body<Data = Bytes>,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &self.inner;
        let config = inner.config.clone();
        let (mut parts, body) = req.into_parts();

        // Absolute-form targets are reduced to their path: the backend is
        // fixed per queue and never chosen by the request.
        let target = match parts.uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.as_str().to_string(),
            _ => return Err((FrontError::BadTarget, None)),
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > config.front.max_body as u64) {
            return Err((FrontError::BodyTooLarge, None));
        }
        let body = match Limited::new(body, config.front.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
                return Err((FrontError::BodyTooLarge, None));
            }
            Err(_) => return Err((FrontError::BadBody, None)),
        };

        let queue = config.default_queue();
        let queue_name = Some(queue.name.clone());
        let peer = parts
            .extensions
            .get::<Peer>()
            .and_then(|p| p.0)
            .map(|a| a.ip());
        let authority = parts.uri.authority().map(|a| a.as_str().to_string());
        let request_id = forwarded::prepare(&mut parts.headers, authority.as_deref(), peer, job_id);
        let span = tracing::info_span!("job", request_id = %request_id, job = %job_id);

        let timeout = config.front.reply_timeout;
        let meta = JobMeta {
            id: job_id.to_string(),
            request_id,
            queue: queue.name.clone(),
            priority: priority::DEFAULT,
            front: inner.id.clone(),
            method: parts.method.as_str().to_string(),
            target,
            headers: HeaderList::from_map(&parts.headers),
            timeout_ms: timeout.as_millis() as u64,
        };
        let frame = Job::encode(&meta, &body);
        drop(body);

        let reply = inner.router.register(job_id);
        let mut pending = Pending {
            front: self.clone(),
            queue: queue.name.clone(),
            id: job_id.to_string(),
            settled: false,
        };
        let enqueued = inner
            .broker
            .enqueue(NewJob {
                queue: &queue.name,
                id: job_id,
                priority: meta.priority,
                frame,
                timeout: timeout.saturating_sub(started.elapsed()),
            })
            .instrument(span.clone())
            .await;
        if let Err(err) = enqueued {
            span.in_scope(|| tracing::warn!(%err, "enqueue failed"));
            // Nothing reached Redis that could run; no cancel needed.
            pending.settled = true;
            inner.router.forget(job_id);
            return Err((FrontError::BrokerDown, queue_name));
        }

        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, reply).await {
            Ok(Ok(reply)) => {
                pending.settled = true;
                let response = to_response(reply).map_err(|e| (e, queue_name.clone()))?;
                Ok((response, queue_name))
            }
            // The router was dropped: the front is going away.
            Ok(Err(_)) => Err((FrontError::ShuttingDown, queue_name)),
            // `pending` cancels the job on drop.
            Err(_) => Err((FrontError::ReplyTimeout, queue_name)),
        }
    }
}

fn to_response(reply: Reply) -> Result<Response<ReplyBody>, FrontError> {
    let status = StatusCode::from_u16(reply.meta.status).map_err(|_| FrontError::BadReply)?;
    let body = if reply.meta.chunked {
        ReplyBody::streamed(reply.body)
    } else {
        ReplyBody::sized(reply.body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = reply.meta.headers.to_map();
    Ok(response)
}

/// A job on a queue whose client has not been answered with its reply yet.
/// Dropped unsettled (timeout, client gone), it withdraws the job.
struct Pending<B: Broker> {
    front: Front<B>,
    queue: String,
    id: String,
    settled: bool,
}

impl<B: Broker> Drop for Pending<B> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.front.inner.router.forget(&self.id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let front = self.front.clone();
        let queue = std::mem::take(&mut self.queue);
        let id = std::mem::take(&mut self.id);
        runtime.spawn(async move {
            match front.inner.broker.cancel(&queue, &id).await {
                Ok(true) => tracing::debug!(job = %id, "waiting job cancelled"),
                Ok(false) => tracing::debug!(job = %id, "job already running, its reply will be dropped"),
                Err(err) => tracing::warn!(job = %id, %err, "could not cancel job; its deadline will drop it"),
            }
        });
    }
}

impl<B, Bd> tower::Service<Request<Bd>> for Front<B>
where
    B: Broker,
    Bd: Body<Data = Bytes> + Send + 'static,
    Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<ReplyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bd>) -> Self::Future {
        let front = self.clone();
        Box::pin(async move { Ok(front.handle(req).await) })
    }
}
