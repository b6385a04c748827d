//! The [`Broker`] trait: the operations a front and a worker need.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::BrokerError;

/// A job a front puts on a queue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// Queue name.
    pub queue: &'a str,
    /// Job id (unique).
    pub id: &'a str,
    /// 1 (most urgent) … 99.
    pub priority: u8,
    /// The encoded job ([`thr_core::envelope::Job::encode`]).
    pub frame: Bytes,
    /// How long the client will wait; the job is dropped unclaimed after it.
    pub timeout: Duration,
    /// The job's flow id ([`thr_core::quota::Flow::id`]).
    pub flow: &'a str,
    /// The flow's definition ([`thr_core::quota::Flow::definition`]).
    pub flow_definition: &'a str,
    /// The queue's `max_waiting`.
    pub max_waiting: Option<u32>,
    /// Aging: `[scheduling] max_wait_boost`.
    pub max_wait_boost: Option<Duration>,
    /// The front waiting for the reply.
    pub front: &'a str,
}

/// Whether a job was taken.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// It waits in its queue.
    Queued,
    /// Refused: too many are waiting already.
    Refused {
        /// `queue`, or the quota token whose `max_waiting` is reached.
        what: String,
        /// How many wait there.
        waiting: u64,
        /// Jobs the queue started per second over the last minute.
        drain_rate: f64,
    },
}

/// How a worker claims.
#[derive(Debug, Clone, Copy)]
pub struct ClaimOptions<'a> {
    /// The job's lease.
    pub lease: Duration,
    /// The queue's `max_inflight_total`.
    pub max_inflight_total: Option<u32>,
    /// Aging: `[scheduling] max_wait_boost`.
    pub max_wait_boost: Option<Duration>,
    /// The claiming worker (its heartbeat vouches for the lease); "" for none.
    pub worker: &'a str,
    /// Most jobs to start in this call (the worker's free slots; 0 counts
    /// as 1). One call for many jobs saves round trips under a backlog.
    pub max_jobs: usize,
}

/// How long a daemon may stay silent before it counts as dead: a lease of
/// a silent worker is taken back, a job of a silent front is dropped.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often daemons say they are alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Which kind of daemon a heartbeat is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// http2redis.
    Front,
    /// redis2http.
    Worker,
}

/// What to do with the jobs of a lost worker.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Methods safe to run again (the others are answered 502).
    pub methods: Vec<String>,
    /// Runs before a job is set aside in the dead letters.
    pub max_attempts: u32,
}

/// What a reaper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Jobs put back in their place.
    pub requeued: u64,
    /// Clients answered 502 (not safe to retry, or out of attempts).
    pub answered: u64,
    /// Jobs set aside in the dead letters.
    pub dead_lettered: u64,
}

/// What a claim found.
#[derive(Debug, Clone)]
pub enum ClaimOutcome {
    /// Jobs to run (at least one, at most `max_jobs`), in dispatch order.
    Jobs(Vec<Claimed>),
    /// Nothing can run now; a rate quota may allow something after `retry_in`.
    Idle {
        /// When a rate-limited flow may run (None: wait for the doorbell).
        retry_in: Option<Duration>,
    },
}

/// A job a worker took off a queue.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Job id.
    pub id: String,
    /// The encoded job, as enqueued.
    pub frame: Bytes,
    /// Time left before the client gives up (measured on the broker's clock).
    pub remaining: Duration,
    /// The job's flow.
    pub flow: String,
}

/// The shared engine between fronts and workers.
pub trait Broker: Send + Sync + 'static {
    /// What a worker waits on for new work.
    type Doorbell: Doorbell;
    /// What a front reads its replies from.
    type Replies: ReplyStream;

    /// Puts a job on its queue, unless too many wait already.
    fn enqueue(
        &self,
        job: NewJob<'_>,
    ) -> impl Future<Output = Result<Admission, BrokerError>> + Send;

    /// Withdraws a waiting job; true when it was still waiting (it will
    /// never reach the backend), false when already running or gone.
    fn cancel(
        &self,
        queue: &str,
        id: &str,
        flow: &str,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Starts the most urgent job of `queue` whose quotas all have room.
    fn claim(
        &self,
        queue: &str,
        options: ClaimOptions<'_>,
    ) -> impl Future<Output = Result<ClaimOutcome, BrokerError>> + Send;

    /// Extends a running job's lease and quota slots; false when the job
    /// holds no lease any more.
    fn renew(
        &self,
        queue: &str,
        id: &str,
        lease: Duration,
        semaphores: &[String],
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Sends a reply to the front that waits for job `id`, then releases the
    /// job and its quota slots (`semaphores`: the tokens it holds), and
    /// records its latency (`backend_ms`: time spent at the backend).
    fn reply(
        &self,
        queue: &str,
        front: &str,
        id: &str,
        frame: Bytes,
        backend_ms: u64,
        semaphores: &[String],
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Sets aside a claimed job that cannot be run (an undecodable payload),
    /// with the reason, so that it is never claimed again.
    fn dead_letter(
        &self,
        queue: &str,
        id: &str,
        frame: Bytes,
        reason: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Takes back the jobs of lost workers of `queue` (expired lease, silent
    /// heartbeat): safe ones go back in their place, others are answered.
    fn reap(
        &self,
        queue: &str,
        policy: &RetryPolicy,
    ) -> impl Future<Output = Result<Reaped, BrokerError>> + Send;

    /// Gives a running job back (a stopping worker that cannot finish it):
    /// the next reap treats it as lost.
    fn hand_back(
        &self,
        queue: &str,
        id: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Says that daemon `id` is alive, with a JSON description of itself.
    fn heartbeat(
        &self,
        kind: Daemon,
        id: &str,
        info: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Says that daemon `id` stopped cleanly.
    fn retire(
        &self,
        kind: Daemon,
        id: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// A doorbell for `queue` (one per waiting loop: it may hold a connection).
    fn doorbell(&self, queue: &str) -> Self::Doorbell;

    /// The reply stream of front `front` (one per front process).
    fn replies(&self, front: &str) -> Self::Replies;

    /// Checks that the broker answers.
    fn ping(&self) -> impl Future<Output = Result<(), BrokerError>> + Send;
}

/// Wakes a worker when work may be waiting.
pub trait Doorbell: Send + 'static {
    /// Waits until a job is announced (true) or `max` has passed (false).
    fn wait(&mut self, max: Duration) -> impl Future<Output = Result<bool, BrokerError>> + Send;
}

/// Delivers the replies meant for one front.
pub trait ReplyStream: Send + 'static {
    /// Waits up to `max` for replies and returns those available (maybe none).
    /// Not cancel-safe: a reply popped by a dropped call is lost, so callers
    /// let each call finish.
    fn next_batch(
        &mut self,
        max: Duration,
    ) -> impl Future<Output = Result<Vec<Bytes>, BrokerError>> + Send;
}
