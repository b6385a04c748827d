//! The request handler: one client request in, one response out, as named
//! phases over one [`RequestCx`] (see [`Front::serve`]): admit (target,
//! declared size, proxy headers, edge limit), read the body (bounded by
//! `max_body`), apply the rules (which may answer it, rewrite it, pick its
//! queue and priority, or let it bypass the queue), authorize (an auth
//! service, when a rule says so), dispatch (queue it and wait for the reply,
//! [`crate::queueing`]; or forward it directly for `bypass`; or, for an
//! upgrade request, tunnel it to the backend, [`crate::tunnel`]), respond, log.
//! If the client is answered any other way or goes away (hyper drops the
//! handler's future), a guard withdraws the job from Redis, so the backend
//! never works for nobody.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use thr_backend::{Failure, Forwarder};
use thr_broker::Broker;
use thr_broker::protocol::records::FlowDef;
use thr_core::config::{Config, QueueConfig};
use thr_core::envelope::{HeaderList, JobMeta, Reply, ReplyMeta};
use thr_core::quota::Flow;
use thr_core::rules::{self, Answer, Decision, RuleRequest};
use tracing::Instrument;

use crate::auth::{AuthClient, Verdict};
use crate::body::ReplyBody;
use crate::edge::EdgeLimiter;
use crate::error::FrontError;
use crate::forwarded;
use crate::lenient::OriginalTarget;
use crate::pieces;
use crate::queueing::{self, QueueRules, Withdrawals};
use crate::replies::ReplyRouter;
use crate::tunnel::{Tunnels, Upgrade};
use crate::upload::{self, Stored};

/// The client's address, put in request extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<SocketAddr>);

/// Marks a request that came over TLS terminated by this front
/// (`X-Forwarded-Proto: https`).
#[derive(Debug, Clone, Copy)]
pub struct ViaTls;

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
    /// Background withdrawals of jobs whose clients went away.
    withdrawals: Arc<Withdrawals>,
    /// Open upgrade tunnels, counted per queue.
    tunnels: Tunnels,
}

/// One request's context through its phases: what the summary log line
/// and the queueing phase need to know about it.
pub struct RequestCx {
    /// When it arrived.
    pub started: Instant,
    /// When its client stops waiting (`reply_timeout` after arrival).
    pub deadline: Instant,
    /// `reply_timeout`.
    pub timeout: Duration,
    /// Its job id (also its request id when the client sent none).
    pub job_id: String,
    /// X-Request-Id as received, or the job id.
    pub request_id: String,
    /// When it arrived, on the wall clock (`X-Request-Start`).
    pub received: std::time::SystemTime,
    /// Its span: every log line about it carries its ids.
    pub span: tracing::Span,
    method: Method,
    target: Option<String>,
    queue: Option<String>,
    priority: Option<u8>,
    /// Time at the backend, when a backend answered.
    backend_ms: Option<u64>,
    /// The target as hyper saw it and as the client sent it, when the
    /// lenient follower had to encode its query ([`crate::lenient`]).
    original_target: Option<(String, String)>,
}

impl RequestCx {
    fn new<Bd>(req: &Request<Bd>, timeout: Duration) -> RequestCx {
        let job_id = uuid::Uuid::new_v4().simple().to_string();
        RequestCx {
            started: Instant::now(),
            received: std::time::SystemTime::now(),
            deadline: Instant::now() + timeout,
            timeout,
            span: tracing::Span::none(),
            request_id: String::new(),
            method: req.method().clone(),
            target: req.uri().path_and_query().map(|p| p.as_str().to_string()),
            job_id,
            queue: None,
            priority: None,
            backend_ms: None,
            original_target: None,
        }
    }

    /// The summary line and counter of a finished request.
    fn log(&self, status: StatusCode) {
        metrics::counter!(
            "thr_requests_total",
            "queue" => self.queue.clone().unwrap_or_else(|| "-".into()),
            "status" => status.as_u16().to_string()
        )
        .increment(1);
        let ms = self.started.elapsed().as_millis() as u64;
        // Inside the request's span, so that the line carries its ids like
        // every other line about it; a request answered before it had one
        // (a 400, a 429 at the edge) is named by its job id.
        let early;
        let span = if self.span.is_none() {
            early = tracing::info_span!("job", request_id = %self.job_id, job = %self.job_id);
            &early
        } else {
            &self.span
        };
        let _in_span = span.enter();
        // `path`, not `target`: JSON lines carry the module as `target`.
        tracing::info!(
            method = %self.method,
            path = self.target.as_deref().unwrap_or("-"),
            status = status.as_u16(),
            queue = self.queue.as_deref().unwrap_or("-"),
            priority = self.priority.unwrap_or(0),
            ms,
            wait_ms = self.backend_ms.map_or(0, |b| ms.saturating_sub(b)),
            backend_ms = self.backend_ms.unwrap_or(0),
            "request"
        );
    }
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
                withdrawals: Arc::default(),
                tunnels: Tunnels::default(),
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

    /// The background withdrawals of jobs whose clients went away.
    pub(crate) fn withdrawals(&self) -> Arc<Withdrawals> {
        self.inner.withdrawals.clone()
    }

    /// The open upgrade tunnels.
    pub fn tunnels(&self) -> &Tunnels {
        &self.inner.tunnels
    }

    /// Waits for the withdrawals under way (shutdown).
    pub async fn finish_withdrawals(&self) {
        self.inner.withdrawals.finish().await;
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
        Bd: Body<Data = Bytes> + Send + 'static,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let config = self.config();
        let mut cx = RequestCx::new(&req, config.front.reply_timeout);
        let response = match self.serve(req, &config, &mut cx).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
        cx.log(response.status());
        response
    }

    /// The phases of a request, in order: admit, apply the rules,
    /// authorize, read the body (into Redis when big), dispatch (queue or
    /// bypass), respond.
    async fn serve<Bd>(
        &self,
        mut req: Request<Bd>,
        config: &Config,
        cx: &mut RequestCx,
    ) -> Result<Response<ReplyBody>, FrontError>
    where
        Bd: Body<Data = Bytes> + Send + 'static,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let upgrade = Upgrade::take(&mut req);
        let (parts, body) = req.into_parts();
        let mut rreq = self.admit(parts, config, cx)?;
        if let Some(upgrade) = &upgrade {
            upgrade.restore(&mut rreq.headers);
        }
        let decision = rules::evaluate(&config.rules, &mut rreq);
        if let Some(answer) = &decision.answer {
            let mut response = direct_answer(answer);
            rules::edit_response_headers(response.headers_mut(), &decision.response_headers);
            return Ok(response);
        }
        if let Some(timeout) = decision.reply_timeout {
            cx.timeout = timeout;
            cx.deadline = cx.started + timeout;
        }
        if let Some(denied) = self.authorize(&decision, &mut rreq, cx).await? {
            return Ok(denied);
        }
        let queue = &config.queues[decision.queue];
        cx.queue = Some(queue.name.clone());
        if let Some(upgrade) = upgrade {
            // A handshake's body (none, for WebSocket) goes with it.
            let body = match Limited::new(body, config.front.max_body).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(FrontError::BodyTooLarge);
                }
                Err(e) => return Err(FrontError::of_body(e)),
            };
            let tunnel = self
                .inner
                .tunnels
                .open(upgrade, queue, rreq, body, &cx.span);
            let mut response = tunnel.await?;
            rules::edit_response_headers(response.headers_mut(), &decision.response_headers);
            return Ok(response);
        }
        cx.priority = Some(decision.priority);
        let is_head = rreq.method == Method::HEAD;
        if decision.bypass {
            let mut response = self.bypass(config, &decision, rreq, body, cx).await?;
            rules::edit_response_headers(response.headers_mut(), &decision.response_headers);
            return Ok(response);
        }
        // A body kept in Redis lives as long as its job may wait and run.
        let keep = cx.timeout + queue.backend_timeout + queue.lease;
        let body = upload::store(
            body,
            config.front.max_body,
            &self.inner.broker,
            &cx.job_id,
            keep,
        )
        .instrument(cx.span.clone())
        .await?;
        let reply = self.dispatch(config, &decision, rreq, body, cx).await?;
        cx.backend_ms = Some(reply.meta.backend_ms);
        let body = if reply.meta.stream {
            // Silence from a live worker is bounded by backend_timeout; a
            // lost one's stream is aborted by the reaper within its lease.
            let idle = queue.backend_timeout + queue.lease + Duration::from_secs(10);
            Some(pieces::stream(
                self,
                &reply.meta.id,
                idle,
                config.front.client_write_timeout,
                cx.span.clone(),
            ))
        } else {
            None
        };
        let mut response = to_response(reply, body, &decision, is_head)?;
        rules::edit_response_headers(response.headers_mut(), &decision.response_headers);
        Ok(response)
    }

    /// Admission: a target thr can forward, a declared body within bounds,
    /// the proxy headers written, and the edge limit (an abusive client is
    /// shed before its body is read or Redis is asked anything).
    fn admit(
        &self,
        parts: http::request::Parts,
        config: &Config,
        cx: &mut RequestCx,
    ) -> Result<RuleRequest, FrontError> {
        // Absolute-form targets are reduced to their path: the backend is
        // fixed per queue and never chosen by the request.
        let target = match parts.uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.as_str().to_string(),
            _ => return Err(FrontError::BadTarget),
        };
        // Kept only if it is this request's: encoded, it must be what hyper
        // parsed (a follower out of step with hyper is then harmless).
        if let Some(OriginalTarget(original)) = parts.extensions.get::<OriginalTarget>()
            && thr_core::target::encode_query(original.as_bytes()).as_deref()
                == Some(target.as_bytes())
        {
            cx.original_target = Some((target.clone(), original.clone()));
        }
        check_host(&parts)?;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > config.front.max_body as u64) {
            return Err(FrontError::BodyTooLarge);
        }
        let peer = parts
            .extensions
            .get::<Peer>()
            .and_then(|p| p.0)
            .map(|a| a.ip());
        let mut headers = parts.headers;
        if parts.version == Version::HTTP_2 {
            join_cookies(&mut headers);
        }
        let real_ip = forwarded::real_ip(&headers, peer, &config.front.trusted_proxies);
        let authority = parts.uri.authority().map(|a| a.as_str().to_string());
        let arrival = forwarded::Arrival {
            peer,
            received: cx.received,
            via_tls: parts.extensions.get::<ViaTls>().is_some(),
            trusted: forwarded::is_trusted(peer, &config.front.trusted_proxies),
        };
        let request_id = forwarded::prepare(
            &mut headers,
            authority.as_deref(),
            &cx.job_id,
            &arrival,
            config.front.add_headers,
        );
        cx.span = tracing::info_span!("job", request_id = %request_id, job = %cx.job_id);
        cx.request_id = request_id;
        let rreq = RuleRequest {
            method: parts.method,
            target,
            headers,
            remote_ip: peer,
            real_ip,
        };
        if let Some(edge) = self.edge_limiter(config)
            && let Err(wait) = edge.check(&rreq)
        {
            metrics::counter!("thr_refused_total", "queue" => "-", "reason" => "edge_limit")
                .increment(1);
            let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(FrontError::TooManyRequests {
                retry_after: retry_after.max(1),
            });
        }
        Ok(rreq)
    }

    /// Authorization by the auth service a rule names: Ok(Some) is the
    /// service's refusal, to be sent as it is; allowed requests get the
    /// fields it asked to add.
    async fn authorize(
        &self,
        decision: &Decision,
        rreq: &mut RuleRequest,
        cx: &RequestCx,
    ) -> Result<Option<Response<ReplyBody>>, FrontError> {
        let Some(spec) = &decision.auth else {
            return Ok(None);
        };
        match self
            .inner
            .auth
            .check(spec, rreq)
            .instrument(cx.span.clone())
            .await
        {
            Ok(Verdict::Allow(fields)) => {
                for (name, _) in &fields {
                    rreq.headers.remove(name);
                }
                for (name, value) in fields {
                    rreq.headers.append(name, value);
                }
                Ok(None)
            }
            Ok(Verdict::Deny {
                status,
                headers,
                body,
            }) => {
                let mut response = Response::new(ReplyBody::sized(body));
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                Ok(Some(response))
            }
            Err(err) => {
                cx.span
                    .in_scope(|| tracing::warn!(%err, "auth service unavailable"));
                Err(FrontError::AuthUnavailable)
            }
        }
    }

    /// Dispatch: the job goes on its queue and its reply (or the head of
    /// its streamed reply) comes back.
    async fn dispatch(
        &self,
        config: &Config,
        decision: &Decision,
        rreq: RuleRequest,
        body: Stored,
        cx: &RequestCx,
    ) -> Result<Reply, FrontError> {
        let queue = &config.queues[decision.queue];
        let flow = Flow::of(&config.limits, decision.queue, &rreq);
        let (inline, body_chunks, body_len) = match body {
            Stored::Inline(data) => (data, 0, 0),
            Stored::InRedis { chunks, len } => (Bytes::new(), chunks, len),
        };
        let meta = JobMeta {
            flow: flow.id(),
            flow_def: FlowDef::encode(&flow),
            body_chunks,
            body_len,
            ..self.job_meta(&queue.name, decision, rreq, cx)
        };
        queueing::enqueue_and_wait(
            self,
            cx,
            meta,
            inline,
            &flow,
            QueueRules {
                max_waiting: queue.max_waiting,
                max_wait_boost: config.scheduling.max_wait_boost,
                redis_down_grace: config.front.redis_down_grace.min(cx.timeout),
            },
        )
        .await
    }

    /// What a request becomes as a job of `queue` (no quotas, body inline:
    /// queueing fills those in).
    fn job_meta(
        &self,
        queue: &str,
        decision: &Decision,
        rreq: RuleRequest,
        cx: &RequestCx,
    ) -> JobMeta {
        JobMeta {
            id: cx.job_id.clone(),
            request_id: cx.request_id.clone(),
            queue: queue.to_string(),
            priority: decision.priority,
            front: self.inner.id.clone(),
            method: rreq.method.as_str().to_string(),
            // The backend gets the bytes the client sent, unless a rule
            // rewrote the target.
            target: match &cx.original_target {
                Some((seen, original)) if *seen == rreq.target => original.clone(),
                _ => rreq.target,
            },
            headers: HeaderList::from_map(&rreq.headers),
            timeout_ms: cx.timeout.as_millis() as u64,
            flow: String::new(),
            flow_def: String::new(),
            body_chunks: 0,
            body_len: 0,
        }
    }

    /// `bypass`: straight to the queue's backend, both bodies streamed
    /// through (the request body bounded by `max_body`).
    async fn bypass<Bd>(
        &self,
        config: &Config,
        decision: &Decision,
        rreq: RuleRequest,
        body: Bd,
        cx: &mut RequestCx,
    ) -> Result<Response<ReplyBody>, FrontError>
    where
        Bd: Body<Data = Bytes> + Send + 'static,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let queue = &config.queues[decision.queue];
        let forwarder = self.bypass_forwarder(queue);
        let left = cx
            .timeout
            .saturating_sub(cx.started.elapsed())
            .min(queue.backend_timeout);
        let is_head = rreq.method == Method::HEAD;
        let meta = self.job_meta(&queue.name, decision, rreq, cx);
        let body = Limited::new(body, config.front.max_body)
            .map_err(|e| -> thr_backend::BoxError { e })
            .boxed_unsync();
        let started = Instant::now();
        let sent = forwarder
            .1
            .send(&meta, body, left)
            .instrument(cx.span.clone())
            .await;
        cx.backend_ms = Some(started.elapsed().as_millis() as u64);
        let (head, incoming) = match sent {
            Ok(sent) => sent,
            Err(failure) => {
                let reply = Reply {
                    meta: ReplyMeta {
                        id: meta.id,
                        status: failure.status.as_u16(),
                        headers: Failure::headers(),
                        worker: String::new(),
                        backend_ms: 0,
                        chunked: false,
                        stream: false,
                        reason: None,
                    },
                    body: failure.body(),
                };
                return to_response(reply, None, decision, is_head);
            }
        };
        let reply = Reply {
            meta: ReplyMeta {
                id: meta.id,
                status: head.status.as_u16(),
                headers: head.headers,
                worker: String::new(),
                backend_ms: 0,
                chunked: head.chunked,
                stream: head.length != Some(0),
                reason: head.reason,
            },
            body: Bytes::new(),
        };
        let direct = reply.meta.stream.then(|| {
            ReplyBody::direct(
                incoming
                    .map_err(|e| -> thr_backend::BoxError { Box::new(e) })
                    .boxed_unsync(),
            )
        });
        to_response(reply, direct, decision, is_head)
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

/// At most one Host, and none that disagrees with an absolute-form target
/// or an h2 `:authority` (both are where hyper puts the URI's authority).
fn check_host(parts: &http::request::Parts) -> Result<(), FrontError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(FrontError::BadHost);
    }
    if let (Some(host), Some(authority)) = (host, parts.uri.authority())
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    {
        return Err(FrontError::BadHost);
    }
    Ok(())
}

/// An h2 client may send each cookie as a field of its own (browsers do, so
/// that HPACK can index them one by one); RFC 9113 §8.2.3 has them joined
/// with "; " before they go on as HTTP/1.1. Sent as separate lines, they
/// reach a WSGI app joined with "," (gunicorn), and it reads the first cookie with
/// the others in its value (a Django session is lost). Joined here, before
/// the rules, auth, bypass and the queue see the request.
fn join_cookies(headers: &mut HeaderMap) {
    let fields: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if fields.len() < 2 {
        return;
    }
    // Fields that were valid are valid joined by "; ".
    if let Ok(value) = HeaderValue::from_bytes(&fields.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

fn direct_answer(answer: &Answer) -> Response<ReplyBody> {
    let mut response = Response::new(ReplyBody::sized(answer.body.clone()));
    *response.status_mut() = answer.status;
    for (name, value) in &answer.headers {
        response.headers_mut().append(name.clone(), value.clone());
    }
    response
}

/// The client's response to `reply`; `streamed` is its body when it does
/// not travel in the reply (a streamed or bypassed response).
fn to_response(
    reply: Reply,
    streamed: Option<ReplyBody>,
    decision: &Decision,
    is_head: bool,
) -> Result<Response<ReplyBody>, FrontError> {
    let status = StatusCode::from_u16(reply.meta.status).map_err(|_| FrontError::BadReply)?;
    // A 101 goes only to a client that asked to upgrade (crate::tunnel).
    if status.is_informational() {
        return Err(FrontError::BadReply);
    }
    let mut headers = reply.meta.headers.to_map();
    let mut data = reply.body;
    let may_have_body = !is_head
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    if streamed.is_none()
        && data.is_empty()
        && may_have_body
        && let Some(default) = &decision.default_body
    {
        data = default.clone();
        headers.remove(header::CONTENT_LENGTH);
    }
    let body = if let Some(body) = streamed {
        body
    } else if reply.meta.chunked {
        ReplyBody::streamed(data)
    } else {
        ReplyBody::sized(data)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    // hyper writes it on HTTP/1 (HTTP/2 has no reason phrases); one that
    // is not a valid phrase is left out, and the client gets the usual one.
    if let Some(reason) = reply
        .meta
        .reason
        .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.into_bytes()).ok())
    {
        response.extensions_mut().insert(reason);
    }
    Ok(response)
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
