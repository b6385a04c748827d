//! The queueing phase of a request: put its job on its queue, then wait for
//! the reply, within the client's deadline.
//!
//! A slow Redis is not a failed one (ARCHITECTURE.md decision 13). An enqueue
//! whose answer was lost may still have queued the job, so the front asks
//! again (enqueue is idempotent by job id) until it learns what happened or
//! the client's deadline comes. It answers "try again" (503) only when the
//! job is certain never to run: Redis refused it, never received it, or a
//! withdrawal confirmed it gone (or made sure a late enqueue of it is
//! refused). When it cannot know, the client gets 504, and a guard keeps
//! withdrawing the job in the background so that nobody runs it for no one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use thr_broker::backoff::backoff;
use thr_broker::{Admission, Broker, NewJob, Withdrawal};
use thr_core::envelope::{Job, JobMeta, Reply};
use thr_core::quota::Flow;
use thr_daemon::log_every::LogEvery;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::FrontError;
use crate::front::{Front, RequestCx};
use crate::replies::Answer;

/// Enqueues that failed, logged once per period.
static ENQUEUE_FAILURES: LogEvery = LogEvery::failures();

/// What the queue needs to admit a job.
pub(crate) struct QueueRules {
    pub max_waiting: Option<u32>,
    pub max_wait_boost: Option<Duration>,
    /// How long a Redis outage holds a request before it is refused.
    pub redis_down_grace: Duration,
}

/// The background withdrawals of jobs whose clients went away; tracked so
/// that a stopping front waits for them (bounded by their deadlines).
#[derive(Default)]
pub(crate) struct Withdrawals(Mutex<JoinSet<()>>);

impl Withdrawals {
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    /// Waits for the withdrawals under way (each gives up at its job's
    /// deadline).
    pub(crate) async fn finish(&self) {
        let mut set = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        while set.join_next().await.is_some() {}
    }
}

/// Queues `meta`'s job and waits for its answer.
pub(crate) async fn enqueue_and_wait<B: Broker>(
    front: &Front<B>,
    cx: &RequestCx,
    meta: JobMeta,
    body: Bytes,
    flow: &Flow,
    rules: QueueRules,
) -> Result<Reply, FrontError> {
    let frame = Job::encode(&meta, &body);
    drop(body);
    let answer = front.router().register(&meta.id, &meta.queue);
    let mut pending = Pending {
        front: front.clone(),
        queue: meta.queue.clone(),
        id: meta.id.clone(),
        deadline: cx.deadline,
        armed: true,
        upload: meta.body_chunks > 0,
    };
    enqueue(front, cx, &meta, frame, flow, &rules, &mut pending).await?;
    front.router().confirm(&meta.id);
    let left = cx.deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, answer).await {
        Ok(Ok(Answer::Reply(reply))) => {
            pending.disarm();
            let backend = Duration::from_millis(reply.meta.backend_ms);
            metrics::histogram!("thr_backend_seconds", "queue" => meta.queue.clone())
                .record(backend.as_secs_f64());
            metrics::histogram!("thr_queue_wait_seconds", "queue" => meta.queue.clone())
                .record(cx.started.elapsed().saturating_sub(backend).as_secs_f64());
            Ok(reply)
        }
        Ok(Ok(Answer::Lost)) => {
            // The broker does not know the job: it never ran and never will.
            pending.never_runs();
            Err(FrontError::JobLost)
        }
        // The router was dropped: the front is going away.
        Ok(Err(_)) => Err(FrontError::ShuttingDown),
        // `pending` withdraws the job on drop.
        Err(_) => {
            metrics::counter!("thr_replies_timed_out_total", "queue" => meta.queue.clone())
                .increment(1);
            Err(FrontError::ReplyTimeout)
        }
    }
}

/// Puts the job on its queue; Ok once it is known to be there (or to have
/// run already).
async fn enqueue<B: Broker>(
    front: &Front<B>,
    cx: &RequestCx,
    meta: &JobMeta,
    frame: Bytes,
    flow: &Flow,
    rules: &QueueRules,
    pending: &mut Pending<B>,
) -> Result<(), FrontError> {
    let broker = front.broker();
    // With a `redis_down_grace`, a Redis outage holds the request (and
    // retries) instead of failing it at once.
    let hold_until = cx.started + rules.redis_down_grace;
    let mut unknown = false;
    let mut failures = 0;
    loop {
        let attempt = broker
            .enqueue(NewJob {
                queue: &meta.queue,
                id: &meta.id,
                priority: meta.priority,
                frame: frame.clone(),
                timeout: cx.deadline.saturating_duration_since(Instant::now()),
                flow,
                max_waiting: rules.max_waiting,
                max_wait_boost: rules.max_wait_boost,
                front: &meta.front,
                method: &meta.method,
            })
            .instrument(cx.span.clone())
            .await;
        let err = match attempt {
            // Settled: an earlier attempt queued it and it has run already;
            // its reply is on its way.
            Ok(Admission::Queued | Admission::Settled) => return Ok(()),
            Ok(Admission::Refused {
                what,
                waiting,
                drain_rate,
            }) => {
                // Nothing was queued; nothing to withdraw.
                pending.never_runs();
                let retry_after = retry_after(waiting, drain_rate, cx.timeout);
                metrics::counter!("thr_refused_total", "queue" => meta.queue.clone(), "reason" => "max_waiting").increment(1);
                cx.span.in_scope(|| {
                    tracing::info!(full = %what, waiting, drain_rate, retry_after, "refused: too many waiting")
                });
                return Err(FrontError::QueueFull { retry_after });
            }
            Err(err) => err,
        };
        metrics::counter!("thr_redis_errors_total", "daemon" => "http2redis").increment(1);
        unknown |= err.outcome_unknown();
        // Redis refusing connections is down, not slow: waiting for it to
        // say whether it took the job is waiting for its restart.
        let down = !err.outcome_unknown();
        failures += 1;
        let pause = backoff(failures);
        // Unsure whether it is queued on a Redis that answers slowly: keep
        // asking while the client waits. Otherwise: only within the grace.
        let limit = if unknown && !down {
            cx.deadline
        } else {
            hold_until
        };
        if Instant::now() + pause < limit {
            cx.span
                .in_scope(|| tracing::debug!(%err, unknown, "enqueue unanswered, asking again"));
            broker.recovery().sleep(pause).await;
            continue;
        }
        // While Redis is down every request fails here: one line per 10 s
        // (`thr_redis_errors_total` counts them all; each at debug).
        match ENQUEUE_FAILURES.admit() {
            Some(unlogged) => cx.span.in_scope(
                || tracing::warn!(%err, unknown, unlogged, "enqueue failed (unlogged: such failures since the last line)"),
            ),
            None => cx
                .span
                .in_scope(|| tracing::debug!(%err, unknown, "enqueue failed")),
        }
        if !unknown {
            // Redis never received it: nothing can run.
            pending.never_runs();
            return Err(FrontError::BrokerDown);
        }
        if down {
            // An earlier attempt may have reached Redis before it went
            // down. What it held in memory is gone; should it come back
            // with the job (persistence), `pending` withdraws it as soon as
            // Redis answers, within the job's deadline.
            return Err(FrontError::BrokerDown);
        }
        // The client's time is up and the job may be queued: answer "try
        // again" only once it is certain never to run.
        let remember = cx.timeout;
        return match broker.withdraw(&meta.queue, &meta.id, remember).await {
            Ok(Withdrawal::Withdrawn) => {
                pending.never_runs();
                Err(FrontError::BrokerDown)
            }
            // It runs or ran: its reply is what the client waits for, but
            // its time is up.
            Ok(Withdrawal::Started | Withdrawal::Settled) => Err(FrontError::ReplyTimeout),
            // Unknown still: `pending` keeps withdrawing in the background.
            Err(_) => Err(FrontError::BrokerTimeout),
        };
    }
}

/// Seconds until a refused client may find room: the jobs waiting ahead of
/// it divided by the rate the queue drained at over the last minute. With no
/// drain measured yet, the reply timeout (a full wait) is the honest guess.
pub(crate) fn retry_after(waiting: u64, drain_rate: f64, reply_timeout: Duration) -> u64 {
    let seconds = if drain_rate > 0.0 {
        (waiting as f64 / drain_rate).ceil() as u64
    } else {
        reply_timeout.as_secs()
    };
    seconds.clamp(1, 3600)
}

/// A job that may be on a queue while its client has not been answered with
/// its reply. Dropped armed (timeout, client gone, Redis unsure), it
/// withdraws the job in the background, asking again until it is sure or
/// the job's deadline passed (after which no worker takes it anyway).
struct Pending<B: Broker> {
    front: Front<B>,
    queue: String,
    id: String,
    deadline: Instant,
    armed: bool,
    /// Its body waits in Redis (chunks): dropped once the job is certain
    /// never to run (a job that ran has it dropped by its worker).
    upload: bool,
}

impl<B: Broker> Pending<B> {
    /// Nothing to withdraw any more: the job was answered, or is certain
    /// never to run.
    fn disarm(&mut self) {
        self.armed = false;
        self.front.router().forget(&self.id);
    }

    /// The job is certain never to run: nothing to withdraw, and its body
    /// (if it waits in Redis) can go.
    fn never_runs(&mut self) {
        self.disarm();
        if self.upload {
            drop_upload(&self.front, &self.id);
        }
    }
}

/// Drops job `id`'s stored request body in the background.
pub(crate) fn drop_upload<B: Broker>(front: &Front<B>, id: &str) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let (front, id) = (front.clone(), id.to_string());
    tokio::spawn(async move {
        if let Err(err) = front.broker().drop_upload(&id).await {
            tracing::debug!(job = %id, %err, "could not drop a request body (it expires by itself)");
        }
    });
}

impl<B: Broker> Drop for Pending<B> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.front.router().forget(&self.id);
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let front = self.front.clone();
        let queue = std::mem::take(&mut self.queue);
        let id = std::mem::take(&mut self.id);
        let deadline = self.deadline;
        let upload = self.upload;
        let withdrawals: Arc<Withdrawals> = front.withdrawals();
        withdrawals.spawn(async move {
            let mut failures = 0;
            loop {
                let remember = deadline.saturating_duration_since(Instant::now());
                match front.broker().withdraw(&queue, &id, remember).await {
                    Ok(Withdrawal::Withdrawn) => {
                        metrics::counter!("thr_jobs_cancelled_total", "queue" => queue.clone())
                            .increment(1);
                        tracing::debug!(job = %id, "waiting job withdrawn");
                        if upload {
                            let _ = front.broker().drop_upload(&id).await;
                        }
                        return;
                    }
                    Ok(_) => {
                        tracing::debug!(job = %id, "job already running or done; its reply will be dropped");
                        return;
                    }
                    Err(err) if Instant::now() >= deadline => {
                        tracing::warn!(job = %id, %err, "could not withdraw the job; its deadline has passed, so no worker takes it");
                        return;
                    }
                    Err(_) => {
                        failures += 1;
                        front.broker().recovery().pause(failures).await;
                    }
                }
            }
        });
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
