//! Runs one claimed job: the backend call, the lease kept alive while it
//! lasts, and the reply delivered to the waiting front.
//!
//! Delivery is retried for as long as the lease lasts (renewing it all the
//! while), because a reply is guarded by its lease: Redis pushes it at most
//! once, however often it is asked, and never after the job was taken back.
//! A worker still trying to deliver keeps renewing, so it is never reaped
//! while alive; one that cannot reach Redis for a whole lease gives up, and
//! the reaper answers the client as for a lost worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use thr_backend::Failure;
use thr_broker::backoff::backoff;
use thr_broker::{Broker, Claimed, Delivery, Lease};
use thr_core::envelope::{CHUNK, Job, Reply, ReplyMeta};
use thr_daemon::log_every::LogEvery;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument;

use crate::queue::QueueRunner;
use crate::stream::{self, BodyEnd, FirstPart};

/// Failed attempts to renew a lease or deliver a reply, in every job of
/// the process: while Redis is down, each running job retries every
/// backoff, and a line for each attempt of each job would flood the log.
static JOB_RETRIES: LogEvery = LogEvery::failures();

/// Logs a failed attempt of a job's retry loop at warn once per period
/// (with how many went unlogged), at debug otherwise.
fn log_retry(err: &thr_broker::BrokerError, attempt: u32, what: &str) {
    match JOB_RETRIES.admit() {
        Some(unlogged) => tracing::warn!(%err, attempt, unlogged, "{what}, asking again"),
        None => tracing::debug!(%err, attempt, "{what}, asking again"),
    }
}

/// Runs `claimed` on `runner`'s backend; `permit` is its slot.
pub async fn run<B: Broker>(
    runner: Arc<QueueRunner<B>>,
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
) {
    // Ends the job's bookkeeping however its task ends: returning,
    // panicking, or aborted.
    let _ending = Ending::new(runner.clone(), claimed.lease.id.clone());
    // Boxed: executing a job is a large future (~10 KB: the backend call,
    // lease renewal, delivery). Behind a box, this one stays small, so
    // moving it into its task copies a few hundred bytes, and the large one
    // is copied once, into the heap (perf showed memcpy of the job future
    // at ~2.5 % of the worker's CPU when it was moved whole twice).
    Box::pin(execute(&runner, claimed, permit)).await;
}

/// A running job's place in the `thr_jobs_running` gauge and among its
/// queue's running jobs, given up when dropped: a job that panics does not
/// count as running forever (nor is announced again after a data loss).
struct Ending<B: Broker> {
    runner: Arc<QueueRunner<B>>,
    id: String,
    gauge: metrics::Gauge,
}

impl<B: Broker> Ending<B> {
    fn new(runner: Arc<QueueRunner<B>>, id: String) -> Ending<B> {
        let gauge = metrics::gauge!("thr_jobs_running", "queue" => runner.name.clone());
        gauge.increment(1.0);
        Ending { runner, id, gauge }
    }
}

impl<B: Broker> Drop for Ending<B> {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        self.runner.finished(&self.id);
    }
}

/// How long the lease is known to hold: until the last successful renewal
/// (or the claim) plus the lease time.
struct LeaseClock {
    start: Instant,
    valid_ms: AtomicU64,
}

impl LeaseClock {
    fn new(lease: Duration) -> LeaseClock {
        LeaseClock {
            start: Instant::now(),
            valid_ms: AtomicU64::new(lease.as_millis() as u64),
        }
    }

    fn renewed(&self, lease: Duration) {
        let until = self.start.elapsed() + lease;
        self.valid_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }

    fn expired(&self) -> bool {
        self.start.elapsed().as_millis() as u64 >= self.valid_ms.load(Ordering::Relaxed)
    }
}

/// Runs `work` while renewing `lease` every third of its time.
async fn renewing<B: Broker, T>(
    broker: &B,
    lease: &Lease,
    duration: Duration,
    clock: &LeaseClock,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let period = duration / 3;
    let mut next = Instant::now() + period;
    let mut failures = 0;
    loop {
        tokio::select! {
            out = &mut work => return out,
            // Ended early too when Redis answers again after failing.
            _ = broker.recovery().sleep(next.saturating_duration_since(Instant::now())) => match broker.renew(lease, duration).await {
                Ok(renewed) => {
                    failures = 0;
                    next = Instant::now() + period;
                    if renewed {
                        clock.renewed(duration);
                    } else {
                        tracing::warn!("lease lost while the job runs");
                    }
                }
                Err(err) => {
                    // Ask again soon: after a Redis pause, the lease must be
                    // renewed before the reaper's grace runs out.
                    failures += 1;
                    next = Instant::now() + backoff(failures).min(period);
                    log_retry(&err, failures, "could not renew the lease");
                }
            },
        }
    }
}

async fn execute<B: Broker>(
    runner: &QueueRunner<B>,
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
) {
    let queue = &runner.name;
    let lease = claimed.lease;
    let job = match Job::decode(claimed.frame) {
        Ok(job) => job,
        Err(err) => {
            tracing::error!(queue = %queue, job = %lease.id, %err, "undecodable job set aside");
            metrics::counter!("thr_jobs_dead_lettered_total", "queue" => queue.clone())
                .increment(1);
            let reason = format!("undecodable: {err}");
            let answer = Reply::plain(
                &lease.id,
                502,
                "thr: this request could not be read by the worker; it was set aside\n",
                &runner.worker_id,
                &[],
            );
            if let Err(err) = runner.broker.dead_letter(&lease, &reason, answer).await {
                tracing::warn!(queue = %queue, job = %lease.id, %err, "could not set the job aside; its lease will expire");
            }
            return;
        }
    };
    let span = tracing::info_span!("job", request_id = %job.meta.request_id, job = %job.meta.id);
    run_job(runner, job, lease, permit).instrument(span).await
}

async fn run_job<B: Broker>(
    runner: &QueueRunner<B>,
    job: Job,
    lease: Lease,
    permit: OwnedSemaphorePermit,
) {
    // Dropped below as soon as the backend is done, recording its time.
    let permit = crate::queue::Slot::new(permit, runner.slot_times.clone());
    let q = runner.queue.load_full();
    let (timeout, duration) = (q.backend_timeout, q.lease);
    let safe = q.retry_methods.contains(&job.meta.method);
    if !safe {
        runner.not_retry_safe(&lease.id);
    }
    let clock = LeaseClock::new(duration);
    let broker = &*runner.broker;
    // A request that must not be answered "try again" once it may have
    // run tells its front that it started (see `Broker::started`).
    let notice = async {
        if !safe && let Err(err) = broker.started(&lease).await {
            tracing::debug!(%err, "could not send the started notice");
        }
    };
    let body = if job.meta.body_chunks > 0 {
        stream::upload_body(
            runner.broker.clone(),
            job.meta.id.clone(),
            job.meta.body_chunks,
            job.meta.body_len,
        )
    } else {
        thr_backend::full_body(job.body.clone())
    };
    // The call is not cut when the client gives up: a legacy backend
    // keeps working on a request whose connection closed, so the slot
    // must stay taken until it answers, or max_inflight would not
    // protect it. Clients that gave up before the claim never get here.
    let forwarder = runner.forwarder.load_full();
    let started = std::time::Instant::now();
    let call = async {
        let (sent, ()) = tokio::join!(forwarder.send(&job.meta, body, timeout), notice);
        match sent {
            Ok((head, mut body)) => {
                if let Some(max) = q.max_response
                    && head.length.is_some_and(|n| n > max)
                {
                    return Err(Failure {
                        status: http::StatusCode::BAD_GATEWAY,
                        reason: "response larger than max_response",
                    });
                }
                let first = stream::first_part(&mut body, head.length, timeout).await;
                Ok((head, body, first))
            }
            Err(failure) => Err(failure),
        }
    };
    let outcome = renewing(broker, &lease, duration, &clock, call).await;
    let (head, body, first) = match outcome {
        Ok((head, _, FirstPart::Whole(data))) => {
            drop(permit);
            let backend_ms = started.elapsed().as_millis() as u64;
            log_forwarded(runner, &job, head.status.as_u16(), backend_ms);
            let meta = reply_meta(runner, &job, &head, backend_ms, false);
            finish(
                runner,
                &job,
                &lease,
                Reply::encode(&meta, &data),
                backend_ms,
                &clock,
            )
            .await;
            return;
        }
        Ok((_, _, FirstPart::Failed(reason))) => {
            drop(permit);
            let failure = Failure {
                status: http::StatusCode::BAD_GATEWAY,
                reason,
            };
            answer_failure(runner, &job, &lease, &failure, started, &clock).await;
            return;
        }
        Err(failure) => {
            drop(permit);
            answer_failure(runner, &job, &lease, &failure, started, &clock).await;
            return;
        }
        Ok((head, body, FirstPart::Stream(first))) => (head, body, first),
    };

    // A streamed response: the head goes now, the body in pieces.
    let head_ms = started.elapsed().as_millis() as u64;
    let meta = reply_meta(runner, &job, &head, head_ms, true);
    let head_frame = Reply::encode(&meta, b"");
    let sent = renewing(
        broker,
        &lease,
        duration,
        &clock,
        deliver_head(broker, &lease, head_frame, &clock),
    )
    .await;
    if !sent {
        drop(permit);
        drop_upload(runner, &job).await;
        return;
    }
    let buffer = (q.response_buffer / CHUNK).max(1);
    let (tx, rx) = tokio::sync::mpsc::channel(buffer);
    let read = async {
        let end = renewing(
            broker,
            &lease,
            duration,
            &clock,
            stream::read_body(body, first, tx, timeout, q.max_response),
        )
        .await;
        // The backend is done: its slot and the job's quota slots are free
        // for the next job while the rest of the response still flows.
        drop(permit);
        let backend_ms = started.elapsed().as_millis() as u64;
        match &end {
            BodyEnd::Complete => log_forwarded(runner, &job, head.status.as_u16(), backend_ms),
            BodyEnd::Cut(why) => {
                tracing::warn!(reason = %why, status = head.status.as_u16(), backend_ms, "response cut")
            }
            BodyEnd::Unread => tracing::info!(
                status = head.status.as_u16(),
                backend_ms,
                "client went away mid-response"
            ),
        }
        let delivery = deliver(broker, &lease, Bytes::new(), backend_ms, &clock);
        renewing(broker, &lease, duration, &clock, delivery).await;
    };
    let push = stream::push_pieces(broker, &lease, rx);
    let ((), _complete) = tokio::join!(read, push);
    drop_upload(runner, &job).await;
}

fn reply_meta<B: Broker>(
    runner: &QueueRunner<B>,
    job: &Job,
    head: &thr_backend::Head,
    backend_ms: u64,
    stream: bool,
) -> ReplyMeta {
    ReplyMeta {
        id: job.meta.id.clone(),
        status: head.status.as_u16(),
        headers: head.headers.clone(),
        worker: runner.worker_id.clone(),
        backend_ms,
        chunked: head.chunked,
        stream,
        reason: head.reason.clone(),
    }
}

fn log_forwarded<B: Broker>(runner: &QueueRunner<B>, job: &Job, status: u16, backend_ms: u64) {
    metrics::counter!("thr_jobs_total", "queue" => runner.name.clone(), "status" => status.to_string()).increment(1);
    // At debug: the front's summary line (info) already says how each
    // request went, with its backend time, so the default level writes
    // one line per request, not two.
    tracing::debug!(
        method = %job.meta.method,
        path = %job.meta.target,
        status,
        backend_ms,
        "forwarded"
    );
}

/// Answers a call that produced no response head (502, 504, 400).
async fn answer_failure<B: Broker>(
    runner: &QueueRunner<B>,
    job: &Job,
    lease: &Lease,
    failure: &Failure,
    started: std::time::Instant,
    clock: &LeaseClock,
) {
    let backend_ms = started.elapsed().as_millis() as u64;
    log_forwarded(runner, job, failure.status.as_u16(), backend_ms);
    tracing::warn!(
        method = %job.meta.method,
        path = %job.meta.target,
        status = failure.status.as_u16(),
        reason = failure.reason,
        backend_ms,
        "backend call failed"
    );
    let meta = ReplyMeta {
        id: job.meta.id.clone(),
        status: failure.status.as_u16(),
        headers: Failure::headers(),
        worker: runner.worker_id.clone(),
        backend_ms,
        chunked: false,
        stream: false,
        reason: None,
    };
    let frame = Reply::encode(&meta, &failure.body());
    finish(runner, job, lease, frame, backend_ms, clock).await;
}

/// Delivers a whole reply (renewing the lease meanwhile) and drops the
/// job's request body.
async fn finish<B: Broker>(
    runner: &QueueRunner<B>,
    job: &Job,
    lease: &Lease,
    frame: Bytes,
    backend_ms: u64,
    clock: &LeaseClock,
) {
    let broker = &*runner.broker;
    let duration = runner.queue.load().lease;
    let delivery = deliver(broker, lease, frame, backend_ms, clock);
    renewing(broker, lease, duration, clock, delivery).await;
    drop_upload(runner, job).await;
}

async fn drop_upload<B: Broker>(runner: &QueueRunner<B>, job: &Job) {
    if job.meta.body_chunks > 0
        && let Err(err) = runner.broker.drop_upload(&job.meta.id).await
    {
        tracing::debug!(%err, "could not drop the request body (it expires by itself)");
    }
}

/// Sends a streamed response's head, asking again after every failure
/// until it is known to be delivered (true) or the lease is known to be
/// gone (false).
async fn deliver_head<B: Broker>(
    broker: &B,
    lease: &Lease,
    frame: Bytes,
    clock: &LeaseClock,
) -> bool {
    let mut failures = 0;
    loop {
        match broker.stream_head(lease, frame.clone()).await {
            Ok(Delivery::Delivered) => return true,
            Ok(Delivery::LeaseLost) => {
                tracing::warn!(
                    "response head not delivered: the job was taken back from this worker"
                );
                return false;
            }
            Err(err) if clock.expired() => {
                metrics::counter!("thr_redis_errors_total", "daemon" => "redis2http").increment(1);
                tracing::error!(%err, "response head not delivered within the lease; the reaper answers the client");
                return false;
            }
            Err(err) => {
                failures += 1;
                metrics::counter!("thr_redis_errors_total", "daemon" => "redis2http").increment(1);
                log_retry(&err, failures, "could not push the response head");
                broker.recovery().pause(failures).await;
            }
        }
    }
}

/// Pushes the reply, asking again after every failure until it is known to
/// be delivered or the lease is known to be gone.
async fn deliver<B: Broker>(
    broker: &B,
    lease: &Lease,
    frame: Bytes,
    backend_ms: u64,
    clock: &LeaseClock,
) {
    let mut failures = 0;
    loop {
        match broker.reply(lease, frame.clone(), backend_ms).await {
            Ok(Delivery::Delivered) => return,
            Ok(Delivery::LeaseLost) => {
                tracing::warn!(
                    "reply not delivered: the job was taken back from this worker (its client is answered by whoever took it)"
                );
                return;
            }
            Err(err) if clock.expired() => {
                metrics::counter!("thr_redis_errors_total", "daemon" => "redis2http").increment(1);
                tracing::error!(%err, "reply not delivered within the lease; the reaper answers the client");
                return;
            }
            Err(err) => {
                failures += 1;
                metrics::counter!("thr_redis_errors_total", "daemon" => "redis2http").increment(1);
                log_retry(&err, failures, "could not push the reply");
                broker.recovery().pause(failures).await;
            }
        }
    }
}
