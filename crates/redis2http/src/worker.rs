//! The claim loops: one per queue, each keeping up to `max_inflight` jobs
//! running. A loop claims while it has room; when the queue is empty it
//! waits on the queue's doorbell (with a one-second fallback poll), and when
//! Redis fails it backs off with jitter and tries again, forever.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use thr_broker::{Broker, Claimed, Doorbell};
use thr_core::config::{Config, QueueConfig};
use thr_core::envelope::{Job, Reply, ReplyMeta};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument;

use crate::forward::Forwarder;

/// Longest wait on the doorbell before looking at the queue anyway.
const POLL: Duration = Duration::from_secs(1);
/// Most attempts to deliver a reply while Redis hiccups.
const REPLY_ATTEMPTS: u32 = 8;

/// A worker process's state: its id, its broker and its queues.
pub struct Worker<B> {
    config: Arc<Config>,
    broker: Arc<B>,
    id: String,
}

struct QueueRunner<B> {
    queue: QueueConfig,
    broker: Arc<B>,
    forwarder: Forwarder,
    worker_id: String,
}

impl<B: Broker> Worker<B> {
    /// A worker with a fresh id.
    pub fn new(config: Arc<Config>, broker: B) -> Worker<B> {
        Worker {
            config,
            broker: Arc::new(broker),
            id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// This worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serves every queue until `shutdown`, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop, stopped) = watch::channel(false);
        let grace = self.config.worker.shutdown_grace;
        let loops: Vec<_> = self
            .config
            .queues
            .iter()
            .map(|queue| {
                let runner = Arc::new(QueueRunner {
                    queue: queue.clone(),
                    broker: self.broker.clone(),
                    forwarder: Forwarder::new(queue),
                    worker_id: self.id.clone(),
                });
                tokio::spawn(runner.run(stopped.clone(), grace))
            })
            .collect();
        tracing::info!(worker = %self.id, "redis2http ready");
        shutdown.await;
        let _ = stop.send(true);
        for handle in loops {
            let _ = handle.await;
        }
        tracing::info!(worker = %self.id, "redis2http stopped");
    }
}

impl<B: Broker> QueueRunner<B> {
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>, grace: Duration) {
        let name = self.queue.name.clone();
        let slots = self.queue.max_inflight.get();
        let running = Arc::new(Semaphore::new(slots));
        let mut doorbell = self.broker.doorbell(&name);
        let mut failures = 0u32;
        tracing::info!(queue = %name, backend = %self.queue.backend.display, max_inflight = slots, "serving queue");
        loop {
            let permit = tokio::select! {
                permit = running.clone().acquire_owned() => permit.expect("semaphore never closed"),
                _ = stop.changed() => break,
            };
            if *stop.borrow() {
                break;
            }
            match self.broker.claim(&name, self.queue.lease).await {
                Ok(Some(claimed)) => {
                    failures = 0;
                    tokio::spawn(self.clone().run_job(claimed, permit));
                }
                Ok(None) => {
                    failures = 0;
                    drop(permit);
                    let rang = tokio::select! {
                        rang = doorbell.wait(POLL) => rang,
                        _ = stop.changed() => break,
                    };
                    if let Err(err) = rang {
                        failures += 1;
                        tracing::warn!(queue = %name, %err, "waiting for work failed");
                        if sleep_or_stop(backoff(failures), &mut stop).await {
                            break;
                        }
                    }
                }
                Err(err) => {
                    drop(permit);
                    failures += 1;
                    tracing::warn!(queue = %name, %err, "claim failed");
                    if sleep_or_stop(backoff(failures), &mut stop).await {
                        break;
                    }
                }
            }
        }
        // Let running jobs finish: they hold the permits.
        let busy = slots - running.available_permits();
        if busy > 0 {
            tracing::info!(queue = %name, running = busy, "waiting for running requests");
        }
        if tokio::time::timeout(grace, running.acquire_many(slots as u32))
            .await
            .is_err()
        {
            tracing::warn!(queue = %name, "shutdown grace elapsed with requests still running");
        }
    }

    async fn run_job(self: Arc<Self>, claimed: Claimed, permit: OwnedSemaphorePermit) {
        let queue = &self.queue.name;
        let job = match Job::decode(claimed.frame.clone()) {
            Ok(job) => job,
            Err(err) => {
                tracing::error!(queue = %queue, job = %claimed.id, %err, "undecodable job set aside");
                let reason = format!("undecodable: {err}");
                if let Err(err) = self
                    .broker
                    .dead_letter(queue, &claimed.id, claimed.frame, &reason)
                    .await
                {
                    tracing::warn!(queue = %queue, job = %claimed.id, %err, "could not set the job aside");
                }
                return;
            }
        };
        let span =
            tracing::info_span!("job", request_id = %job.meta.request_id, job = %job.meta.id);
        async {
            let timeout = self.queue.backend_timeout.min(claimed.remaining);
            let outcome = self.forwarder.forward(&job, timeout).await;
            drop(permit);
            let backend_ms = outcome.elapsed.as_millis() as u64;
            tracing::info!(
                method = %job.meta.method,
                target = %job.meta.target,
                status = outcome.status.as_u16(),
                backend_ms,
                "forwarded"
            );
            let meta = ReplyMeta {
                id: job.meta.id.clone(),
                status: outcome.status.as_u16(),
                headers: outcome.headers,
                worker: self.worker_id.clone(),
                backend_ms,
                chunked: outcome.chunked,
            };
            let frame = Reply::encode(&meta, &outcome.body);
            for attempt in 1..=REPLY_ATTEMPTS {
                match self
                    .broker
                    .reply(queue, &job.meta.front, &job.meta.id, frame.clone())
                    .await
                {
                    Ok(()) => return,
                    Err(err) if attempt < REPLY_ATTEMPTS => {
                        tracing::warn!(%err, attempt, "could not push the reply, retrying");
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                    Err(err) => tracing::error!(%err, "reply lost: Redis unreachable"),
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Exponential backoff from 50 ms to 2 s, with full jitter so that many
/// workers do not hammer a recovering Redis in step.
fn backoff(failures: u32) -> Duration {
    let cap = Duration::from_millis(50) * 2u32.saturating_pow(failures.min(6));
    let cap = cap.min(Duration::from_secs(2));
    let ms = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(ms)
}

/// Sleeps for `d`; true when asked to stop meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
