//! One queue served by this worker: its configuration (swapped on reload),
//! the room for running jobs, and the running jobs themselves, tracked so
//! that shutdown waits for them, sees a panicking one, and hands back the
//! leases of those it cannot wait for.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use thr_backend::Forwarder;
use thr_broker::{Broker, Lease};
use thr_core::config::{QueueConfig, Scheduling};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{AbortHandle, JoinSet};

/// The shared state of one queue.
pub struct QueueRunner<B> {
    /// Queue name.
    pub name: String,
    /// Its configuration; swapped whole on reload.
    pub queue: ArcSwap<QueueConfig>,
    /// `[scheduling]`, swapped on reload.
    pub scheduling: ArcSwap<Scheduling>,
    /// The backend client (rebuilt when the backend changes).
    pub forwarder: ArcSwap<Forwarder>,
    /// Room for running jobs; resized on reload.
    pub room: Arc<Semaphore>,
    /// The running jobs' tasks.
    tasks: Mutex<JoinSet<()>>,
    /// Lease and task of each running job, to hand back those a shutdown
    /// cannot wait for.
    running: Mutex<HashMap<String, (Lease, AbortHandle)>>,
    /// The broker.
    pub broker: Arc<B>,
    /// This worker's id.
    pub worker_id: String,
    /// Jobs running in this process, all queues (for the heartbeat).
    pub inflight: Arc<AtomicUsize>,
    /// How long jobs hold a slot, lately.
    pub slot_times: Arc<SlotTimes>,
    /// True while no claim loop runs for this queue (none started yet, or
    /// it ended): a drain waits for it, since a stopping loop may still
    /// start the jobs its last claim returns.
    pub claim_loop_done: watch::Sender<bool>,
}

/// How long jobs of a queue hold their slot, lately: a moving average over
/// about the last eight jobs (whole responses: until the backend is done).
/// The claim loop holds the next job in hand only when slots free often.
#[derive(Debug)]
pub struct SlotTimes {
    /// Microseconds; `u64::MAX` until a job has ended.
    average_us: AtomicU64,
}

impl Default for SlotTimes {
    fn default() -> SlotTimes {
        SlotTimes {
            average_us: AtomicU64::new(u64::MAX),
        }
    }
}

impl SlotTimes {
    /// A job held its slot for `took`.
    pub fn record(&self, took: Duration) {
        let x = took.as_micros().min(u128::from(u64::MAX - 1)) as u64;
        let _ = self
            .average_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == u64::MAX {
                    x
                } else {
                    // avg + (x - avg) / 8, in integers.
                    (avg * 7 + x) / 8
                })
            });
    }

    /// The average, once a job has ended.
    pub fn average(&self) -> Option<Duration> {
        match self.average_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// A running job's slot: gives its room back when dropped (the backend is
/// done) and records how long the job held it.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    taken: std::time::Instant,
    times: Arc<SlotTimes>,
}

impl Slot {
    /// `permit`, taken now by a job of the queue whose times are `times`.
    pub fn new(permit: OwnedSemaphorePermit, times: Arc<SlotTimes>) -> Slot {
        Slot {
            _permit: permit,
            taken: std::time::Instant::now(),
            times,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.times.record(self.taken.elapsed());
    }
}

impl<B: Broker> QueueRunner<B> {
    /// The state of a queue about to be served.
    pub fn new(
        queue: &QueueConfig,
        scheduling: &Scheduling,
        broker: Arc<B>,
        worker_id: String,
        inflight: Arc<AtomicUsize>,
    ) -> QueueRunner<B> {
        QueueRunner {
            name: queue.name.clone(),
            queue: ArcSwap::from_pointee(queue.clone()),
            scheduling: ArcSwap::from_pointee(scheduling.clone()),
            forwarder: ArcSwap::from_pointee(Forwarder::new(queue)),
            room: Arc::new(Semaphore::new(queue.max_inflight.get())),
            tasks: Mutex::new(JoinSet::new()),
            running: Mutex::new(HashMap::new()),
            broker,
            worker_id,
            inflight,
            slot_times: Arc::default(),
            claim_loop_done: watch::Sender::new(true),
        }
    }

    /// Starts `job` as a tracked task running under `lease`.
    pub fn spawn_job(&self, lease: Lease, job: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Collect finished tasks, so the set stays as small as the running
        // jobs, and say so when one panicked.
        while let Some(done) = tasks.try_join_next() {
            if let Err(err) = done
                && err.is_panic()
            {
                tracing::error!(queue = %self.name, %err, "a job task panicked");
            }
        }
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let id = lease.id.clone();
        // Registered before it runs, so it is always found to remove.
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        // A job's future is small: `job::run` keeps the large part behind
        // a box.
        let handle = tasks.spawn(job);
        running.insert(id, (lease, handle));
    }

    /// Tells the fronts again that this queue's running jobs started: when
    /// Redis lost its data, it lost the notices still on their way too,
    /// and a front would tell those jobs' clients to try again although
    /// their requests run (see `thr_broker::LOST_DATA_GRACE`).
    pub async fn announce_running(&self) {
        let leases: Vec<Lease> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(lease, _)| lease.clone())
            .collect();
        if leases.is_empty() {
            return;
        }
        let mut failed = 0;
        for lease in &leases {
            if let Err(err) = self.broker.started(lease).await {
                failed += 1;
                tracing::debug!(queue = %self.name, job = %lease.id, %err, "could not announce a running job again");
            }
        }
        tracing::warn!(queue = %self.name, running = leases.len(), failed, "Redis lost its data: running jobs announced to their fronts again");
    }

    /// A job's task is ending.
    pub fn finished(&self, id: &str) {
        if self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
        {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Puts a reloaded queue configuration in force.
    pub fn update(&self, new: &QueueConfig, scheduling: &Scheduling) {
        self.scheduling.store(Arc::new(scheduling.clone()));
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
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .spawn(async move {
                    if let Ok(permits) = room.acquire_many_owned((was - now) as u32).await {
                        permits.forget();
                    }
                });
        }
        tracing::info!(queue = %self.name, backend = %new.backend.display, max_inflight = now, "queue configuration updated");
        self.queue.store(Arc::new(new.clone()));
    }

    /// Waits until every job of this queue has ended, or `grace` has passed;
    /// then hands the leases of the rest back (another worker takes them at
    /// once rather than after their lease) and stops them.
    pub async fn drain(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        // The claim loop's last claim may return jobs (a claim whose answer
        // was lost, a job handed to its offer): they run here too.
        let mut done = self.claim_loop_done.subscribe();
        let _ = tokio::time::timeout_at(deadline, done.wait_for(|done| *done)).await;
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let busy = self.running.lock().unwrap_or_else(|p| p.into_inner()).len();
        if busy > 0 {
            tracing::info!(queue = %self.name, running = busy, "waiting for running requests");
        }
        let all_done = async {
            while let Some(done) = tasks.join_next().await {
                if let Err(err) = done
                    && err.is_panic()
                {
                    tracing::error!(queue = %self.name, %err, "a job task panicked");
                }
            }
        };
        if tokio::time::timeout_at(deadline, all_done).await.is_ok() {
            return;
        }
        let left: Vec<(String, (Lease, AbortHandle))> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        tracing::warn!(queue = %self.name, handed_back = left.len(), "shutdown grace elapsed; handing running requests back");
        for (id, (lease, task)) in left {
            task.abort();
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            if let Err(err) = self.broker.hand_back(&lease).await {
                tracing::warn!(queue = %self.name, job = %id, %err, "could not hand the job back; its lease will expire");
            }
        }
        tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_times_average_the_last_jobs() {
        let t = SlotTimes::default();
        assert_eq!(t.average(), None, "no job has ended");
        t.record(Duration::from_millis(8));
        assert_eq!(t.average(), Some(Duration::from_millis(8)));
        for _ in 0..40 {
            t.record(Duration::from_millis(800));
        }
        let avg = t.average().unwrap();
        assert!(
            avg > Duration::from_millis(790) && avg <= Duration::from_millis(800),
            "{avg:?}"
        );
    }
}
