//! The request handler: one client request in, one response out.
//!
//! The request is read whole (bounded by `max_body`), goes through the
//! rules (which may answer it, rewrite it, send it to an auth service, pick
//! its queue and priority, or let it bypass the queue), becomes a job
//! envelope and goes on its queue; the handler then waits on its reply
//! channel until the reply timeout. If the client is answered any other way — timeout,
//! Redis error — or goes away (hyper drops the handler's future), a guard
//! withdraws the job from Redis, so the backend never works for nobody.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use thr_backend::Forwarder;
use thr_broker::{Broker, NewJob};
use thr_core::config::{Config, QueueConfig};
use thr_core::envelope::{HeaderList, Job, JobMeta, Reply, ReplyMeta};
use thr_core::quota::Flow;
use thr_core::rules::{self, Answer, Decision, RuleRequest};
use tracing::Instrument;

use crate::auth::{AuthClient, Verdict};
use crate::body::ReplyBody;
use crate::edge::EdgeLimiter;
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
    /// Swapped whole on reload; each request keeps the snapshot it began with.
    config: ArcSwap<Config>,
    broker: B,
    id: String,
    router: ReplyRouter,
    auth: AuthClient,
    /// Clients for `bypass` rules, per queue (rebuilt when its backend changes).
    bypass: Mutex<HashMap<String, Arc<(QueueConfig, Forwarder)>>>,
    /// The edge limit in force (rebuilt when its configuration changes).
    edge: ArcSwapOption<EdgeLimiter>,
}

/// How a request ends, for the summary log line.
struct Done {
    response: Response<ReplyBody>,
    queue: Option<String>,
    priority: Option<u8>,
    /// Time at the backend, when a backend answered.
    backend_ms: Option<u64>,
}

impl<B: Broker> Front<B> {
    /// A front with a fresh id, talking to `broker`.
    pub fn new(config: Arc<Config>, broker: B) -> Front<B> {
        Front {
            inner: Arc::new(Inner {
                config: ArcSwap::new(config),
                broker,
                id: uuid::Uuid::new_v4().simple().to_string(),
                router: ReplyRouter::default(),
                auth: AuthClient::default(),
                bypass: Mutex::new(HashMap::new()),
                edge: ArcSwapOption::empty(),
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

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// Puts a new configuration in force for requests that start from now.
    pub fn reload(&self, config: Arc<Config>) {
        self.inner.config.store(config);
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
        let done = match self.forward(req, &job_id, started).await {
            Ok(done) => done,
            Err((err, queue)) => Done {
                response: err.into_response(),
                queue,
                priority: None,
                backend_ms: None,
            },
        };
        metrics::counter!(
            "thr_requests_total",
            "queue" => done.queue.clone().unwrap_or_else(|| "-".into()),
            "status" => done.response.status().as_u16().to_string()
        )
        .increment(1);
        tracing::info!(
            method = %method,
            target = target.as_deref().unwrap_or("-"),
            status = done.response.status().as_u16(),
            queue = done.queue.as_deref().unwrap_or("-"),
            priority = done.priority.unwrap_or(0),
            ms = started.elapsed().as_millis() as u64,
            wait_ms = done
                .backend_ms
                .map_or(0, |b| (started.elapsed().as_millis() as u64).saturating_sub(b)),
            backend_ms = done.backend_ms.unwrap_or(0),
            "request"
        );
        done.response
    }

    async fn forward<Bd>(
        &self,
        req: Request<Bd>,
        job_id: &str,
        started: Instant,
    ) -> Result<Done, (FrontError, Option<String>)>
    where
        Bd: Body<Data = Bytes>,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let config = self.config();
        let (parts, body) = req.into_parts();

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
        let peer = parts
            .extensions
            .get::<Peer>()
            .and_then(|p| p.0)
            .map(|a| a.ip());
        let mut headers = parts.headers;
        let real_ip = forwarded::real_ip(&headers, peer, &config.front.trusted_proxies);
        let authority = parts.uri.authority().map(|a| a.as_str().to_string());
        let request_id = forwarded::prepare(&mut headers, authority.as_deref(), peer, job_id);
        let span = tracing::info_span!("job", request_id = %request_id, job = %job_id);
        let mut rreq = RuleRequest {
            method: parts.method,
            target,
            headers,
            remote_ip: peer,
            real_ip,
        };

        // Shed an abusive client before reading its body or asking Redis.
        if let Some(edge) = self.edge_limiter(&config)
            && let Err(wait) = edge.check(&rreq)
        {
            metrics::counter!("thr_refused_total", "queue" => "-", "reason" => "edge_limit")
                .increment(1);
            let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err((
                FrontError::TooManyRequests {
                    retry_after: retry_after.max(1),
                },
                None,
            ));
        }

        let body = match Limited::new(body, config.front.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
                return Err((FrontError::BodyTooLarge, None));
            }
            Err(_) => return Err((FrontError::BadBody, None)),
        };
        let decision = rules::evaluate(&config.rules, &mut rreq);
        let is_head = rreq.method == Method::HEAD;
        if let Some(answer) = &decision.answer {
            let mut response = direct_answer(answer);
            rules::edit_response_headers(response.headers_mut(), &decision.response_headers);
            return Ok(Done {
                response,
                queue: None,
                priority: None,
                backend_ms: None,
            });
        }

        if let Some(spec) = &decision.auth {
            match self
                .inner
                .auth
                .check(spec, &rreq)
                .instrument(span.clone())
                .await
            {
                Ok(Verdict::Allow(fields)) => {
                    for (name, _) in &fields {
                        rreq.headers.remove(name);
                    }
                    for (name, value) in fields {
                        rreq.headers.append(name, value);
                    }
                }
                Ok(Verdict::Deny {
                    status,
                    headers,
                    body,
                }) => {
                    let mut response = Response::new(ReplyBody::sized(body));
                    *response.status_mut() = status;
                    *response.headers_mut() = headers;
                    return Ok(Done {
                        response,
                        queue: None,
                        priority: None,
                        backend_ms: None,
                    });
                }
                Err(err) => {
                    span.in_scope(|| tracing::warn!(%err, "auth service unavailable"));
                    return Err((FrontError::AuthUnavailable, None));
                }
            }
        }

        let queue = &config.queues[decision.queue];
        let queue_name = Some(queue.name.clone());
        let timeout = config.front.reply_timeout;
        let flow = Flow::of(&config.limits, decision.queue, &rreq);
        let meta = JobMeta {
            id: job_id.to_string(),
            request_id,
            queue: queue.name.clone(),
            priority: decision.priority,
            front: self.inner.id.clone(),
            method: rreq.method.as_str().to_string(),
            target: rreq.target,
            headers: HeaderList::from_map(&rreq.headers),
            timeout_ms: timeout.as_millis() as u64,
            flow: flow.id(),
            semaphores: flow
                .quotas
                .iter()
                .filter(|q| q.max_concurrent > 0)
                .map(|q| q.token.clone())
                .collect(),
            flow_def: flow.definition(),
        };

        let reply = if decision.bypass {
            let forwarder = self.bypass_forwarder(queue);
            let left = timeout
                .saturating_sub(started.elapsed())
                .min(queue.backend_timeout);
            let job = Job { meta, body };
            let outcome = forwarder.1.forward(&job, left).instrument(span).await;
            Reply {
                meta: ReplyMeta {
                    id: job.meta.id,
                    status: outcome.status.as_u16(),
                    headers: outcome.headers,
                    worker: String::new(),
                    backend_ms: outcome.elapsed.as_millis() as u64,
                    chunked: outcome.chunked,
                },
                body: outcome.body,
            }
        } else {
            self.enqueue_and_wait(
                meta,
                body,
                Admission {
                    max_waiting: queue.max_waiting,
                    max_wait_boost: config.scheduling.max_wait_boost,
                    redis_down_grace: config.front.redis_down_grace,
                },
                started,
                timeout,
                span,
            )
            .await
            .map_err(|e| (e, queue_name.clone()))?
        };
        let backend_ms = reply.meta.backend_ms;
        let mut response =
            to_response(reply, &decision, is_head).map_err(|e| (e, queue_name.clone()))?;
        rules::edit_response_headers(response.headers_mut(), &decision.response_headers);
        Ok(Done {
            response,
            queue: queue_name,
            priority: Some(decision.priority),
            backend_ms: Some(backend_ms),
        })
    }

    async fn enqueue_and_wait(
        &self,
        meta: JobMeta,
        body: Bytes,
        admission: Admission,
        started: Instant,
        timeout: std::time::Duration,
        span: tracing::Span,
    ) -> Result<Reply, FrontError> {
        let inner = &self.inner;
        let frame = Job::encode(&meta, &body);
        drop(body);
        let reply = inner.router.register(&meta.id);
        let mut pending = Pending {
            front: self.clone(),
            queue: meta.queue.clone(),
            id: meta.id.clone(),
            flow: meta.flow.clone(),
            settled: false,
        };
        // With a `redis_down_grace`, a Redis outage holds the request (and
        // retries) instead of failing it at once.
        let hold_until = started + admission.redis_down_grace.min(timeout);
        let enqueued = loop {
            let attempt = inner
                .broker
                .enqueue(NewJob {
                    queue: &meta.queue,
                    id: &meta.id,
                    priority: meta.priority,
                    frame: frame.clone(),
                    timeout: timeout.saturating_sub(started.elapsed()),
                    flow: &meta.flow,
                    flow_definition: &meta.flow_def,
                    max_waiting: admission.max_waiting,
                    max_wait_boost: admission.max_wait_boost,
                    front: &meta.front,
                })
                .instrument(span.clone())
                .await;
            match attempt {
                Err(err) if err.is_unavailable() && Instant::now() + RETRY_PAUSE < hold_until => {
                    span.in_scope(
                        || tracing::debug!(%err, "redis unavailable, holding the request"),
                    );
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => break other,
            }
        };
        match enqueued {
            Ok(thr_broker::Admission::Queued) => {}
            Ok(thr_broker::Admission::Refused {
                what,
                waiting,
                drain_rate,
            }) => {
                // Nothing reached Redis that could run; no cancel needed.
                pending.settled = true;
                inner.router.forget(&meta.id);
                let retry_after = retry_after(waiting, drain_rate, timeout);
                metrics::counter!("thr_refused_total", "queue" => meta.queue.clone(), "reason" => "max_waiting").increment(1);
                span.in_scope(|| {
                    tracing::info!(full = %what, waiting, drain_rate, retry_after, "refused: too many waiting")
                });
                return Err(FrontError::QueueFull { retry_after });
            }
            Err(err) => {
                metrics::counter!("thr_redis_errors_total", "daemon" => "http2redis").increment(1);
                span.in_scope(|| tracing::warn!(%err, "enqueue failed"));
                // Nothing reached Redis that could run; no cancel needed.
                pending.settled = true;
                inner.router.forget(&meta.id);
                return Err(FrontError::BrokerDown);
            }
        }
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, reply).await {
            Ok(Ok(reply)) => {
                pending.settled = true;
                let backend = std::time::Duration::from_millis(reply.meta.backend_ms);
                let queue = meta.queue.clone();
                metrics::histogram!("thr_backend_seconds", "queue" => queue.clone())
                    .record(backend.as_secs_f64());
                metrics::histogram!("thr_queue_wait_seconds", "queue" => queue)
                    .record(started.elapsed().saturating_sub(backend).as_secs_f64());
                Ok(reply)
            }
            // The router was dropped: the front is going away.
            Ok(Err(_)) => Err(FrontError::ShuttingDown),
            // `pending` cancels the job on drop.
            Err(_) => {
                metrics::counter!("thr_replies_timed_out_total", "queue" => meta.queue.clone())
                    .increment(1);
                Err(FrontError::ReplyTimeout)
            }
        }
    }

    fn edge_limiter(&self, config: &Config) -> Option<Arc<EdgeLimiter>> {
        let Some(wanted) = &config.front.edge_limit else {
            if self.inner.edge.load().is_some() {
                self.inner.edge.store(None);
            }
            return None;
        };
        if let Some(current) = self.inner.edge.load_full()
            && current.config() == wanted
        {
            return Some(current);
        }
        let fresh = Arc::new(EdgeLimiter::new(wanted));
        self.inner.edge.store(Some(fresh.clone()));
        Some(fresh)
    }

    fn bypass_forwarder(&self, queue: &QueueConfig) -> Arc<(QueueConfig, Forwarder)> {
        let mut clients = self.inner.bypass.lock().unwrap_or_else(|p| p.into_inner());
        match clients.get(&queue.name) {
            Some(c) if c.0 == *queue => c.clone(),
            _ => {
                let c = Arc::new((queue.clone(), Forwarder::new(queue)));
                clients.insert(queue.name.clone(), c.clone());
                c
            }
        }
    }
}

/// Pause between two enqueue attempts while Redis is down.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// What the queue needs to admit a job.
struct Admission {
    max_waiting: Option<u32>,
    max_wait_boost: Option<std::time::Duration>,
    redis_down_grace: std::time::Duration,
}

/// Seconds until a refused client may find room: the jobs waiting ahead of
/// it divided by the rate the queue drained at over the last minute. With no
/// drain measured yet, the reply timeout (a full wait) is the honest guess.
fn retry_after(waiting: u64, drain_rate: f64, reply_timeout: std::time::Duration) -> u64 {
    let seconds = if drain_rate > 0.0 {
        (waiting as f64 / drain_rate).ceil() as u64
    } else {
        reply_timeout.as_secs()
    };
    seconds.clamp(1, 3600)
}

fn direct_answer(answer: &Answer) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::sized(answer.body.clone()));
    *response.status_mut() = answer.status;
    for (name, value) in &answer.headers {
        response.headers_mut().append(name.clone(), value.clone());
    }
    response
}

fn to_response(
    reply: Reply,
    decision: &Decision,
    is_head: bool,
) -> Result<Response<ReplyBody>, FrontError> {
    let status = StatusCode::from_u16(reply.meta.status).map_err(|_| FrontError::BadReply)?;
    let mut headers = reply.meta.headers.to_map();
    let mut data = reply.body;
    let may_have_body = !is_head
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    if data.is_empty()
        && may_have_body
        && let Some(default) = &decision.default_body
    {
        data = default.clone();
        headers.remove(header::CONTENT_LENGTH);
    }
    let body = if reply.meta.chunked {
        ReplyBody::streamed(data)
    } else {
        ReplyBody::sized(data)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// A job on a queue whose client has not been answered with its reply yet.
/// Dropped unsettled (timeout, client gone), it withdraws the job.
struct Pending<B: Broker> {
    front: Front<B>,
    queue: String,
    id: String,
    flow: String,
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
        let flow = std::mem::take(&mut self.flow);
        runtime.spawn(async move {
            match front.inner.broker.cancel(&queue, &id, &flow).await {
                Ok(true) => {
                    metrics::counter!("thr_jobs_cancelled_total", "queue" => queue.clone()).increment(1);
                    tracing::debug!(job = %id, "waiting job cancelled")
                }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::retry_after;

    #[test]
    fn retry_after_follows_the_drain_rate() {
        let t = Duration::from_secs(30);
        assert_eq!(retry_after(100, 10.0, t), 10);
        assert_eq!(retry_after(5, 10.0, t), 1);
        assert_eq!(retry_after(1_000_000, 0.5, t), 3600);
        assert_eq!(
            retry_after(10, 0.0, t),
            30,
            "no drain measured: a full wait"
        );
    }
}
