//! One queue served by this worker: its configuration (swapped on reload),
//! the room for running jobs, and the running jobs themselves, tracked so
//! that shutdown waits for them, sees a panicking one, and hands back the
//! leases of those it cannot wait for.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use thr_backend::Forwarder;
use thr_broker::{Announced, Broker, Lease};
use thr_core::config::{QueueConfig, Scheduling};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

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
    /// Each running job, to hand back those a shutdown cannot wait for,
    /// and to announce again after Redis lost its data.
    running: Mutex<HashMap<String, Running>>,
    /// Jobs not safe to retry that ended lately (their reply may still be
    /// on its way to the front): announced again too.
    ended: Mutex<EndedJobs>,
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

/// A running job.
struct Running {
    lease: Lease,
    task: AbortHandle,
    /// Not of the queue's `retry_methods`: kept in `ended` once it ends.
    not_retry_safe: bool,
}

/// How long a job not safe to retry is announced again after it ended:
/// a generous bound on how late a front reads its replies (within
/// milliseconds, unless it stalls).
pub const ENDED_KEPT: Duration = thr_broker::HEARTBEAT_TIMEOUT;

/// Most ended jobs kept per queue (the oldest go first): bounds the memory
/// at thousands of POSTs a second.
const ENDED_MAX: usize = 10_000;

/// The jobs not safe to retry that ended within [`ENDED_KEPT`], oldest
/// first, with the data generation they were claimed in.
#[derive(Debug, Default)]
struct EndedJobs(VecDeque<(Instant, String, Announced)>);

impl EndedJobs {
    /// Records a job that ended now.
    fn push(&mut self, lease: Lease) {
        self.prune();
        if self.0.len() >= ENDED_MAX {
            self.0.pop_front();
        }
        let job = Announced {
            id: lease.id,
            front: lease.front,
        };
        self.0.push_back((Instant::now(), lease.generation, job));
    }

    /// The jobs kept that were claimed in another generation than
    /// `generation`.
    fn before(&mut self, generation: &str) -> impl Iterator<Item = &Announced> {
        self.prune();
        self.0
            .iter()
            .filter(move |(_, g, _)| g != generation)
            .map(|(_, _, job)| job)
    }

    fn prune(&mut self) {
        while self
            .0
            .front()
            .is_some_and(|(at, ..)| at.elapsed() > ENDED_KEPT)
        {
            self.0.pop_front();
        }
    }
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
            ended: Mutex::new(EndedJobs::default()),
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
        running.insert(
            id,
            Running {
                lease,
                task: handle,
                not_retry_safe: false,
            },
        );
    }

    /// Job `id` must not be answered "try again" once it may have run: it
    /// is kept a while after it ends, to be announced again if Redis loses
    /// its data meanwhile.
    pub fn not_retry_safe(&self, id: &str) {
        if let Some(r) = self.lock_running().get_mut(id) {
            r.not_retry_safe = true;
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The jobs to announce again now that Redis's data generation is
    /// `generation`: those running, and those not safe to retry that ended
    /// within [`ENDED_KEPT`], claimed in an earlier generation.
    pub fn jobs_before(&self, generation: &str) -> Vec<Announced> {
        let mut jobs: Vec<Announced> = self
            .lock_running()
            .values()
            .map(|r| &r.lease)
            .filter(|l| l.generation != generation)
            .map(Announced::from)
            .collect();
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        jobs.extend(ended.before(generation).cloned());
        jobs
    }

    /// A job's task is ending.
    pub fn finished(&self, id: &str) {
        let Some(r) = self.lock_running().remove(id) else {
            return;
        };
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        if r.not_retry_safe {
            let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            ended.push(r.lease);
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
        let busy = self.lock_running().len();
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
        let left: Vec<(String, Running)> = self.lock_running().drain().collect();
        tracing::warn!(queue = %self.name, handed_back = left.len(), "shutdown grace elapsed; handing running requests back");
        for (id, Running { lease, task, .. }) in left {
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

    fn lease(id: &str, generation: &str) -> Lease {
        Lease {
            queue: "q".into(),
            id: id.into(),
            token: "t".into(),
            front: "f".into(),
            holds: Vec::new(),
            generation: generation.into(),
        }
    }

    fn ids(ended: &mut EndedJobs, generation: &str) -> Vec<String> {
        ended.before(generation).map(|j| j.id.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn ended_jobs_are_kept_for_a_while_and_of_older_generations() {
        let mut ended = EndedJobs::default();
        ended.push(lease("old", "g1"));
        tokio::time::advance(ENDED_KEPT / 2).await;
        ended.push(lease("new", "g1"));
        ended.push(lease("current", "g2"));
        assert_eq!(ids(&mut ended, "g2"), ["old", "new"], "within ENDED_KEPT");
        tokio::time::advance(ENDED_KEPT / 2 + Duration::from_millis(1)).await;
        assert_eq!(ids(&mut ended, "g2"), ["new"]);
        assert_eq!(ids(&mut ended, "g3"), ["new", "current"]);
    }

    #[tokio::test(start_paused = true)]
    async fn ended_jobs_are_bounded() {
        let mut ended = EndedJobs::default();
        for i in 0..ENDED_MAX + 5 {
            ended.push(lease(&i.to_string(), "g1"));
        }
        let kept = ids(&mut ended, "g2");
        assert_eq!(kept.len(), ENDED_MAX);
        assert_eq!(kept[0], "5", "the oldest went first");
    }

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
