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
use thr_broker::backoff::backoff;
use thr_broker::{Broker, Claimed, Delivery, Lease};
use thr_core::envelope::{Job, Reply, ReplyMeta};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument;

use crate::queue::QueueRunner;

/// Runs `claimed` on `runner`'s backend; `permit` is its slot.
pub async fn run<B: Broker>(
    runner: Arc<QueueRunner<B>>,
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
) {
    let id = claimed.lease.id.clone();
    let running = metrics::gauge!("thr_jobs_running", "queue" => runner.name.clone());
    running.increment(1.0);
    execute(&runner, claimed, permit).await;
    running.decrement(1.0);
    runner.finished(&id);
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
            _ = tokio::time::sleep_until(next) => match broker.renew(lease, duration).await {
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
                    tracing::warn!(%err, "could not renew the lease");
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
    async {
        let (timeout, duration, safe) = {
            let q = runner.queue.load();
            (
                q.backend_timeout,
                q.lease,
                q.retry_methods.contains(&job.meta.method),
            )
        };
        let clock = LeaseClock::new(duration);
        // A request that must not be answered "try again" once it may have
        // run tells its front that it started (see `Broker::started`).
        let notice = async {
            if !safe && let Err(err) = runner.broker.started(&lease).await {
                tracing::debug!(%err, "could not send the started notice");
            }
        };
        // The call is not cut when the client gives up: a legacy backend
        // keeps working on a request whose connection closed, so the slot
        // must stay taken until it answers, or max_inflight would not
        // protect it. Clients that gave up before the claim never get here.
        let forwarder = runner.forwarder.load_full();
        let call = async {
            let (outcome, ()) = tokio::join!(forwarder.forward(&job, timeout), notice);
            outcome
        };
        let outcome = renewing(&*runner.broker, &lease, duration, &clock, call).await;
        drop(permit);
        let backend_ms = outcome.elapsed.as_millis() as u64;
        metrics::counter!("thr_jobs_total", "queue" => queue.clone(), "status" => outcome.status.as_u16().to_string()).increment(1);
        tracing::info!(
            method = %job.meta.method,
            target = %job.meta.target,
            status = outcome.status.as_u16(),
            backend_ms,
            "forwarded"
        );
        let frame = Reply::encode(
            &ReplyMeta {
                id: job.meta.id.clone(),
                status: outcome.status.as_u16(),
                headers: outcome.headers,
                worker: runner.worker_id.clone(),
                backend_ms,
                chunked: outcome.chunked,
            },
            &outcome.body,
        );
        let delivery = deliver(&*runner.broker, &lease, frame, backend_ms, &clock);
        renewing(&*runner.broker, &lease, duration, &clock, delivery).await;
    }
    .instrument(span)
    .await
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
                tracing::warn!(%err, attempt = failures, "could not push the reply, asking again");
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}
