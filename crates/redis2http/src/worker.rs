//! The claim loops: one per queue, each keeping up to `max_inflight` jobs
//! running. A loop claims while it has room; when the queue is empty it
//! waits on the queue's doorbell (with a one-second fallback poll), and when
//! Redis fails it backs off with jitter and tries again, forever.
//!
//! A configuration reload is applied queue by queue without stopping work:
//! a new queue gets a loop, a removed one is drained, and a changed one is
//! updated in place — a new backend gets a new client, and the room for
//! running jobs grows or shrinks (shrinking waits for running jobs to end,
//! so the backend never sees more than the new limit for long).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use thr_backend::Forwarder;
use thr_broker::{Broker, ClaimOptions, ClaimOutcome, Claimed, Daemon, Doorbell, RetryPolicy};
use thr_core::config::{Config, QueueConfig, Scheduling};
use thr_core::envelope::{Job, Reply, ReplyMeta};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Longest wait on the doorbell before looking at the queue anyway.
const POLL: Duration = Duration::from_secs(1);
/// Most attempts to deliver a reply while Redis hiccups.
const REPLY_ATTEMPTS: u32 = 8;
/// Most jobs one claim call starts. Bounds the time one script holds Redis
/// (each start is a walk over flows).
const CLAIM_BATCH: usize = 16;

/// A worker process's state: its id, its broker and its queues.
pub struct Worker<B> {
    broker: Arc<B>,
    id: String,
    /// Jobs running in this process, all queues (for the heartbeat).
    inflight: Option<Arc<AtomicUsize>>,
}

/// One queue served by this worker.
struct QueueRunner<B> {
    name: String,
    queue: ArcSwap<QueueConfig>,
    scheduling: ArcSwap<Scheduling>,
    forwarder: ArcSwap<Forwarder>,
    /// Room for running jobs; resized on reload.
    room: Arc<Semaphore>,
    /// Jobs running now (for the drain on shutdown).
    busy: AtomicUsize,
    /// The running jobs, to hand back those a shutdown cannot wait for.
    jobs: std::sync::Mutex<HashMap<String, tokio::task::AbortHandle>>,
    idle: Notify,
    broker: Arc<B>,
    worker_id: String,
    inflight: Arc<AtomicUsize>,
}

struct Running<B> {
    runner: Arc<QueueRunner<B>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl<B: Broker> Worker<B> {
    /// A worker with a fresh id.
    pub fn new(broker: B) -> Worker<B> {
        Worker {
            broker: Arc::new(broker),
            id: uuid::Uuid::new_v4().simple().to_string(),
            inflight: None,
        }
    }

    /// This worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serves the queues of `config` (following its reloads) until
    /// `shutdown`, then drains.
    pub async fn run(
        mut self,
        mut config: watch::Receiver<Arc<Config>>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut running: HashMap<String, Running<B>> = HashMap::new();
        let mut current = config.borrow_and_update().clone();
        // Be known alive before holding any lease.
        let started = thr_broker::presence::unix_now();
        let inflight = Arc::new(AtomicUsize::new(0));
        let describe = {
            let inflight = inflight.clone();
            let id = self.id.clone();
            move || {
                format!(
                    r#"{{"kind":"redis2http","version":"{}","pid":{},"started":{},"inflight":{},"id":"{}"}}"#,
                    env!("CARGO_PKG_VERSION"),
                    std::process::id(),
                    started,
                    inflight.load(Ordering::Relaxed),
                    id
                )
            }
        };
        if let Err(err) = self
            .broker
            .heartbeat(Daemon::Worker, &self.id, &describe())
            .await
        {
            tracing::warn!(%err, "first heartbeat failed; retrying in the background");
        }
        let (stop_presence, presence_stopped) = watch::channel(false);
        let presence = tokio::spawn({
            let broker = self.broker.clone();
            let id = self.id.clone();
            async move {
                thr_broker::presence::keep_alive(
                    &*broker,
                    Daemon::Worker,
                    &id,
                    describe,
                    presence_stopped,
                )
                .await
            }
        });
        self.inflight = Some(inflight);
        self.apply(&mut running, &current);
        tracing::info!(worker = %self.id, "redis2http ready");
        tokio::pin!(shutdown);
        let mut follow = true;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                changed = config.changed(), if follow => match changed {
                    Ok(()) => {
                        current = config.borrow_and_update().clone();
                        self.apply(&mut running, &current);
                    }
                    // Nobody will send new configurations; keep serving.
                    Err(_) => follow = false,
                },
            }
        }
        let grace = current.worker.shutdown_grace;
        for r in running.values() {
            let _ = r.stop.send(true);
        }
        for (_, r) in running.drain() {
            r.runner.drain(grace).await;
            let _ = r.task.await;
        }
        let _ = stop_presence.send(true);
        let _ = presence.await;
        tracing::info!(worker = %self.id, "redis2http stopped");
    }

    fn apply(&self, running: &mut HashMap<String, Running<B>>, config: &Config) {
        let grace = config.worker.shutdown_grace;
        running.retain(|name, r| {
            let keep = config.queue(name).is_some();
            if !keep {
                tracing::info!(queue = %name, "queue removed from the configuration; draining it");
                let _ = r.stop.send(true);
                let runner = r.runner.clone();
                tokio::spawn(async move { runner.drain(grace).await });
            }
            keep
        });
        for queue in &config.queues {
            match running.get(&queue.name) {
                Some(r) => {
                    r.runner
                        .scheduling
                        .store(Arc::new(config.scheduling.clone()));
                    r.runner.update(queue);
                }
                None => {
                    let runner = Arc::new(QueueRunner {
                        name: queue.name.clone(),
                        queue: ArcSwap::from_pointee(queue.clone()),
                        scheduling: ArcSwap::from_pointee(config.scheduling.clone()),
                        forwarder: ArcSwap::from_pointee(Forwarder::new(queue)),
                        room: Arc::new(Semaphore::new(queue.max_inflight.get())),
                        busy: AtomicUsize::new(0),
                        jobs: std::sync::Mutex::new(HashMap::new()),
                        idle: Notify::new(),
                        broker: self.broker.clone(),
                        worker_id: self.id.clone(),
                        inflight: self.inflight.clone().unwrap_or_default(),
                    });
                    let (stop, stopped) = watch::channel(false);
                    tokio::spawn(runner.clone().reap(stopped.clone()));
                    let task = tokio::spawn(runner.clone().run(stopped));
                    running.insert(queue.name.clone(), Running { runner, stop, task });
                }
            }
        }
    }
}

impl<B: Broker> QueueRunner<B> {
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let name = self.name.clone();
        let mut doorbell = self.broker.doorbell(&name);
        let mut failures = 0u32;
        {
            let q = self.queue.load();
            tracing::info!(queue = %name, backend = %q.backend.display, max_inflight = q.max_inflight.get(), "serving queue");
        }
        loop {
            let permit = tokio::select! {
                permit = self.room.clone().acquire_owned() => permit.expect("semaphore never closed"),
                _ = stop.changed() => break,
            };
            if *stop.borrow() {
                break;
            }
            // Every free slot at once: one claim fills them all when a
            // backlog waits, instead of one round trip per job.
            let mut permits = vec![permit];
            while permits.len() < CLAIM_BATCH {
                match self.room.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let options = {
                let q = self.queue.load();
                ClaimOptions {
                    lease: q.lease,
                    max_inflight_total: q.max_inflight_total,
                    max_wait_boost: self.scheduling.load().max_wait_boost,
                    worker: &self.worker_id,
                    max_jobs: permits.len(),
                }
            };
            match self.broker.claim(&name, options).await {
                Ok(ClaimOutcome::Jobs(claimed)) => {
                    failures = 0;
                    for claimed in claimed {
                        let Some(permit) = permits.pop() else {
                            // A broker never starts more than asked; if one
                            // did, another worker gets the job at once.
                            tracing::error!(queue = %name, job = %claimed.id, "claimed more jobs than free slots; handing one back");
                            let _ = self.broker.hand_back(&name, &claimed.id).await;
                            continue;
                        };
                        self.busy.fetch_add(1, Ordering::SeqCst);
                        self.inflight.fetch_add(1, Ordering::Relaxed);
                        let id = claimed.id.clone();
                        // Registered before it runs, so it is always found to remove.
                        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                        let task = tokio::spawn(self.clone().run_job(claimed, permit));
                        jobs.insert(id, task.abort_handle());
                    }
                }
                Ok(ClaimOutcome::Idle { retry_in }) => {
                    failures = 0;
                    drop(permits);
                    // A rate quota frees up on its own schedule, without a doorbell.
                    let wait = retry_in.map_or(POLL, |r| r.clamp(Duration::from_millis(1), POLL));
                    let rang = tokio::select! {
                        rang = doorbell.wait(wait) => rang,
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
                    drop(permits);
                    failures += 1;
                    metrics::counter!("thr_redis_errors_total", "daemon" => "redis2http")
                        .increment(1);
                    tracing::warn!(queue = %name, %err, "claim failed");
                    if sleep_or_stop(backoff(failures), &mut stop).await {
                        break;
                    }
                }
            }
        }
    }

    /// Puts a reloaded queue configuration in force.
    fn update(&self, new: &QueueConfig) {
        let old = self.queue.load_full();
        if *old == *new {
            return;
        }
        if old.backend != new.backend || old.max_inflight != new.max_inflight {
            self.forwarder.store(Arc::new(Forwarder::new(new)));
        }
        let (was, now) = (old.max_inflight.get(), new.max_inflight.get());
        if now > was {
            self.room.add_permits(now - was);
        } else if now < was {
            // Take the surplus room as running jobs give it back.
            let room = self.room.clone();
            tokio::spawn(async move {
                if let Ok(permits) = room.acquire_many_owned((was - now) as u32).await {
                    permits.forget();
                }
            });
        }
        tracing::info!(queue = %self.name, backend = %new.backend.display, max_inflight = now, "queue configuration updated");
        self.queue.store(Arc::new(new.clone()));
    }

    /// Waits until no job of this queue runs, or `grace` has passed.
    async fn drain(&self, grace: Duration) {
        let drained = async {
            loop {
                let notified = self.idle.notified();
                if self.busy.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let busy = self.busy.load(Ordering::SeqCst);
        if busy > 0 {
            tracing::info!(queue = %self.name, running = busy, "waiting for running requests");
        }
        if tokio::time::timeout(grace, drained).await.is_err() {
            // Give the rest back at once: another worker takes them now
            // rather than after their lease.
            let left: Vec<(String, tokio::task::AbortHandle)> = self
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            tracing::warn!(queue = %self.name, handed_back = left.len(), "shutdown grace elapsed; handing running requests back");
            for (id, task) in left {
                task.abort();
                if let Err(err) = self.broker.hand_back(&self.name, &id).await {
                    tracing::warn!(queue = %self.name, job = %id, %err, "could not hand the job back; its lease will expire");
                }
                self.inflight.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    async fn run_job(self: Arc<Self>, claimed: Claimed, permit: OwnedSemaphorePermit) {
        let id = claimed.id.clone();
        let running = metrics::gauge!("thr_jobs_running", "queue" => self.name.clone());
        running.increment(1.0);
        self.job(claimed, permit).await;
        running.decrement(1.0);
        self.finished(&id);
    }

    fn finished(&self, id: &str) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Exports the queue's waiting count and the quota waits (only a
    /// RedisBroker knows how; other brokers export nothing).
    async fn export_gauges(&self) {
        if let Some(redis) =
            (&*self.broker as &dyn std::any::Any).downcast_ref::<thr_broker::RedisBroker>()
            && let Ok((waiting, quotas)) = redis.gauges(&self.name).await
        {
            metrics::gauge!("thr_jobs_waiting", "queue" => self.name.clone()).set(waiting as f64);
            let mut per_limit: HashMap<String, (u64, u64)> = HashMap::new();
            for (token, n) in quotas {
                let limit = token
                    .split_once('=')
                    .map_or(token.as_str(), |(l, _)| l)
                    .to_string();
                let e = per_limit.entry(limit).or_default();
                e.0 += n;
                e.1 += 1;
            }
            for (limit, (waiting, saturated)) in per_limit {
                metrics::gauge!("thr_quota_waiting", "limit" => limit.clone()).set(waiting as f64);
                metrics::gauge!("thr_quota_saturated_keys", "limit" => limit).set(saturated as f64);
            }
        }
    }

    /// Takes back the jobs of lost workers, about once a second (any live
    /// worker does; the script is atomic).
    async fn reap(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let pause = Duration::from_millis(rand::rng().random_range(700..1300));
            if sleep_or_stop(pause, &mut stop).await {
                return;
            }
            let policy = {
                let q = self.queue.load();
                RetryPolicy {
                    methods: q.retry_methods.clone(),
                    max_attempts: q.max_attempts,
                }
            };
            self.export_gauges().await;
            match self.broker.reap(&self.name, &policy).await {
                Ok(r) if r.requeued + r.answered + r.dead_lettered > 0 => {
                    let q = self.name.clone();
                    metrics::counter!("thr_jobs_retried_total", "queue" => q.clone())
                        .increment(r.requeued);
                    metrics::counter!("thr_jobs_answered_by_reaper_total", "queue" => q.clone())
                        .increment(r.answered);
                    metrics::counter!("thr_jobs_dead_lettered_total", "queue" => q)
                        .increment(r.dead_lettered);
                    tracing::warn!(
                    queue = %self.name,
                    requeued = r.requeued,
                    answered_502 = r.answered,
                    dead_lettered = r.dead_lettered,
                    "took back the jobs of a lost worker"
                    )
                }
                Ok(_) => {}
                Err(err) => tracing::debug!(queue = %self.name, %err, "reap failed"),
            }
        }
    }

    async fn job(&self, claimed: Claimed, permit: OwnedSemaphorePermit) {
        let queue = &self.name;
        let job = match Job::decode(claimed.frame.clone()) {
            Ok(job) => job,
            Err(err) => {
                tracing::error!(queue = %queue, job = %claimed.id, %err, "undecodable job set aside");
                metrics::counter!("thr_jobs_dead_lettered_total", "queue" => queue.clone())
                    .increment(1);
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
            // The call is not cut when the client gives up: a legacy backend
            // keeps working on a request whose connection closed, so the slot
            // must stay taken until it answers, or max_inflight would not
            // protect it. Clients that gave up before the claim never get here.
            let (timeout, lease) = {
                let q = self.queue.load();
                (q.backend_timeout, q.lease)
            };
            let forwarder = self.forwarder.load_full();
            let outcome = {
                // Renew the lease (and the quota slots) while the backend works,
                // so a long request is never mistaken for a dead worker's.
                let forward = forwarder.forward(&job, timeout);
                tokio::pin!(forward);
                let period = lease / 3;
                let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                loop {
                    tokio::select! {
                        outcome = &mut forward => break outcome,
                        _ = renew.tick() => {
                            match self.broker.renew(queue, &job.meta.id, lease, &job.meta.semaphores).await {
                                Ok(true) => {}
                                Ok(false) => tracing::warn!("lease lost while the backend works"),
                                Err(err) => tracing::warn!(%err, "could not renew the lease"),
                            }
                        }
                    }
                }
            };
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
                    .reply(
                        queue,
                        &job.meta.front,
                        &job.meta.id,
                        frame.clone(),
                        backend_ms,
                        &job.meta.semaphores,
                    )
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
