//! The [`Broker`] trait: the operations a front and a worker need, and the
//! contract every implementation keeps (checked by [`crate::conformance`]).
//!
//! The contract, in short (ARCHITECTURE.md, "The broker protocol"):
//! - Every state-changing call is safe to repeat: `enqueue` is idempotent by
//!   job id, `claim` by claim token, `reply`/`renew`/`hand_back` are guarded
//!   by the lease they were given. A call whose answer was lost (a timeout)
//!   is asked again with the same arguments, never assumed to have failed.
//! - A job id, once settled (answered, withdrawn, purged), never runs again:
//!   a late `enqueue` of it is refused with [`Admission::Settled`].
//! - Nothing here names Redis: records are typed, quotas are a
//!   [`thr_core::quota::Flow`], leases are handed back as received.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use thr_core::envelope::Piece;
use thr_core::quota::Flow;

use crate::BrokerError;

/// A job a front puts on a queue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// Queue name.
    pub queue: &'a str,
    /// Job id (unique); enqueueing the same id again is a no-op.
    pub id: &'a str,
    /// 1 (most urgent) … 99.
    pub priority: u8,
    /// The encoded job ([`thr_core::envelope::Job::encode`]), opaque here.
    pub frame: Bytes,
    /// How long the client will wait; the job is dropped unclaimed after it.
    pub timeout: Duration,
    /// The quotas the job needs.
    pub flow: &'a Flow,
    /// The queue's `max_waiting`.
    pub max_waiting: Option<u32>,
    /// Aging: `[scheduling] max_wait_boost`.
    pub max_wait_boost: Option<Duration>,
    /// The front waiting for the reply.
    pub front: &'a str,
    /// The request method (the reaper decides by it whether a job whose
    /// worker was lost may run again).
    pub method: &'a str,
}

/// What became of an enqueue.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// It waits in its queue (or was already there: a repeated enqueue).
    Queued,
    /// The id is settled: it ran and was answered, or it was withdrawn
    /// before it could run. It will not run (again).
    Settled,
    /// Refused: too many are waiting already. Nothing was queued.
    Refused {
        /// `queue`, or the quota token whose `max_waiting` is reached.
        what: String,
        /// How many wait there.
        waiting: u64,
        /// Jobs the queue started per second over the last minute.
        drain_rate: f64,
    },
}

/// What a withdrawal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// The job will never run: it was waiting and is gone, or it was not
    /// there yet and a late enqueue of it will be refused.
    Withdrawn,
    /// A worker holds it: it may be running or done; its reply will come.
    Started,
    /// It was settled already (answered, withdrawn or purged).
    Settled,
}

/// Where a job is, as a front asks after a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in its queue.
    Waiting,
    /// Held by a worker.
    Running,
    /// Answered, withdrawn or purged.
    Settled,
    /// Unknown to the broker: dropped (its front was taken for dead, its
    /// deadline passed) or lost with the broker's data. It will not run.
    Unknown,
}

/// How a worker claims.
#[derive(Debug, Clone, Copy)]
pub struct ClaimOptions<'a> {
    /// Names this claim: a claim repeated with the same token (its answer was
    /// lost) returns the jobs the first one leased, instead of new ones.
    pub token: &'a str,
    /// The job's lease.
    pub lease: Duration,
    /// The queue's `max_inflight_total`.
    pub max_inflight_total: Option<u32>,
    /// Aging: `[scheduling] max_wait_boost`.
    pub max_wait_boost: Option<Duration>,
    /// The claiming worker (its heartbeat vouches for the lease).
    pub worker: &'a str,
    /// Most jobs to start in this call (the worker's free slots). One call
    /// for many jobs saves round trips under a backlog. 0 starts nothing: it
    /// returns what an earlier call with this token leased, and no later
    /// call with it leases anything (a worker giving up on a claim it may
    /// have sent, e.g. when it stops while [`Broker::wait_and_claim`] waits).
    pub max_jobs: usize,
    /// The queue's `retry_methods`. While [`Broker::wait_and_claim`] waits,
    /// an enqueue may hand this worker a job directly, but only one of these
    /// methods: a worker that dies while it waits takes that job with it
    /// unseen, and it must be able to run again elsewhere.
    pub retry_methods: &'a [String],
    /// A claim for one job to hold in hand until a slot frees (ARCHITECTURE.md
    /// decision 30). Such a job is leased before it runs: a worker that dies
    /// meanwhile takes it along unseen, and only a job of `retry_methods`
    /// may then run again. So the claim starts only such a job; when the
    /// next job in order is of another method it starts nothing and answers
    /// [`ClaimOutcome::Unheld`] (that job waits for a free slot, and nothing
    /// is taken from behind it).
    pub ahead: bool,
}

/// How long a worker may stay silent before it counts as dead and its
/// leases are taken back.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often workers say they are alive. Often, so that beats (of anyone)
/// never pause for long while some daemon lives: a pause in all beats is
/// how a paused Redis is told from dead daemons (see ARCHITECTURE.md).
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// How often fronts say they are alive: often, because a dead front's
/// waiting jobs must stop reaching the backend within a second.
pub const FRONT_HEARTBEAT_EVERY: Duration = Duration::from_millis(200);

/// How long a front may stay silent before its waiting jobs are dropped at
/// claim time. Beat period plus this stays under one second. A front that
/// finds it was silent this long audits its waiting jobs (see
/// [`Broker::job_states`]) and answers those that were dropped.
pub const FRONT_TIMEOUT: Duration = Duration::from_millis(750);

/// How long a front waits, after Redis lost its data, before telling the
/// clients whose jobs Redis no longer knows to try again. Workers announce
/// again the jobs that ran when they see the data lost (a started notice
/// or reply still on its way to a front was lost with the rest), from
/// their next beat on: four worker beats leave them room on a loaded
/// machine.
pub const LOST_DATA_GRACE: Duration = HEARTBEAT_EVERY.saturating_mul(4);

/// Which kind of daemon a heartbeat is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// http2redis.
    Front,
    /// redis2http.
    Worker,
}

impl Daemon {
    /// How long this kind may stay silent before it counts as dead.
    pub fn timeout(self) -> Duration {
        match self {
            Daemon::Front => FRONT_TIMEOUT,
            Daemon::Worker => HEARTBEAT_TIMEOUT,
        }
    }

    /// How often this kind beats.
    pub fn period(self) -> Duration {
        match self {
            Daemon::Front => FRONT_HEARTBEAT_EVERY,
            Daemon::Worker => HEARTBEAT_EVERY,
        }
    }
}

/// What a heartbeat learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The broker's data generation: it changes when the broker lost its
    /// data (restarted empty, flushed). Jobs of an older generation are gone.
    pub generation: String,
    /// Time since this daemon's previous beat on the broker's clock (None:
    /// the broker did not know it). Longer than [`Daemon::timeout`] means it
    /// may have been taken for dead meanwhile.
    pub since_last: Option<Duration>,
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
    /// A claim ahead ([`ClaimOptions::ahead`]) met a job it may not hold:
    /// that job waits for the next claim into a free slot.
    Unheld,
}

/// A job a worker took off a queue.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The encoded job, as enqueued.
    pub frame: Bytes,
    /// Time left before the client gives up (measured on the broker's clock).
    pub remaining: Duration,
    /// The lease: what renew, reply, hand_back and dead_letter need.
    pub lease: Lease,
    /// Handed by its enqueue to the worker's offer ([`Broker::wait_and_claim`]),
    /// which happens only when nothing else waited: a worker that gets such
    /// a job has no reason to claim before it waits on its doorbell again.
    pub handed: bool,
}

impl Claimed {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.lease.id
    }
}

/// A worker's hold on a running job. Made by the broker at claim time and
/// handed back untouched: a call with a lease that is no longer the job's
/// (reaped, handed back) does nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Queue name.
    pub queue: String,
    /// Job id.
    pub id: String,
    /// The claim token it was leased under.
    pub token: String,
    /// The front waiting for the reply.
    pub front: String,
    /// Concurrency quota tokens the job holds while it runs.
    pub holds: Vec<String>,
    /// The broker's data generation at claim time.
    pub generation: String,
}

/// A job that ran, to be announced again to its front after Redis lost its
/// data ([`Broker::started_again`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// Job id.
    pub id: String,
    /// The front waiting for the reply.
    pub front: String,
}

impl From<&Lease> for Announced {
    fn from(lease: &Lease) -> Announced {
        Announced {
            id: lease.id.clone(),
            front: lease.front.clone(),
        }
    }
}

/// What became of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Pushed to the front (now or by an earlier attempt whose answer was
    /// lost); the job is settled and its quota slots are free.
    Delivered,
    /// The lease was no longer the job's (reaped, handed back): nothing was
    /// pushed; whoever took the job answers it.
    LeaseLost,
}

/// What became of pieces pushed to a streamed response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// How many of the pieces are in the stream now (fewer than given when
    /// the window is full: push the rest later).
    Taken(usize),
    /// Its client went away (or the stream is gone): stop.
    Cancelled,
}

/// How long a streamed response's pieces and state, or a request body's
/// chunks beyond its job's wait, outlive the last call that touched them:
/// what is left when a daemon dies mid-stream goes away by itself.
pub const STREAM_TTL: Duration = Duration::from_secs(600);

/// A queue's current load, for gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gauges {
    /// Jobs waiting in the queue.
    pub waiting: u64,
    /// Limit name → jobs waiting for one of its quotas (deployment-wide;
    /// limits with none are absent).
    pub quota_waiting: std::collections::BTreeMap<String, u64>,
    /// Limit name → its key values that have jobs waiting (saturated).
    pub saturated_keys: std::collections::BTreeMap<String, u64>,
}

/// The shared engine between fronts and workers.
pub trait Broker: Send + Sync + 'static {
    /// What a worker waits on for new work.
    type Doorbell: Doorbell;
    /// What a front reads its replies from.
    type Replies: ReplyStream;

    /// Puts a job on its queue, unless too many wait already. Idempotent by
    /// job id: after a lost answer, asking again tells what became of it.
    fn enqueue(
        &self,
        job: NewJob<'_>,
    ) -> impl Future<Output = Result<Admission, BrokerError>> + Send;

    /// Makes sure job `id` never runs if it has not started: a waiting job
    /// is removed; an unknown one is marked so that a late enqueue of it is
    /// refused (for `remember`, at least the client's remaining wait).
    fn withdraw(
        &self,
        queue: &str,
        id: &str,
        remember: Duration,
    ) -> impl Future<Output = Result<Withdrawal, BrokerError>> + Send;

    /// Where each of `ids` is (same order).
    fn job_states(
        &self,
        queue: &str,
        ids: &[&str],
    ) -> impl Future<Output = Result<Vec<JobState>, BrokerError>> + Send;

    /// Withdraws an offer a [`Broker::wait_and_claim`] under `token` may
    /// have left, without claiming: for a stopping worker whose last claim
    /// failed, where Redis still takes a plain delete (out of memory). Safe
    /// to repeat; a job already handed to the offer is leased to `token`
    /// and returns when its lease runs out.
    fn withdraw_offer(
        &self,
        queue: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        let _ = (queue, token);
        async { Ok(()) }
    }

    /// Starts the most urgent jobs of `queue` whose quotas all have room.
    fn claim(
        &self,
        queue: &str,
        options: ClaimOptions<'_>,
    ) -> impl Future<Output = Result<ClaimOutcome, BrokerError>> + Send;

    /// Waits on `doorbell` for at most `max`, then claims as
    /// [`Broker::claim`] does, whether it rang or not. A broker may instead
    /// have the job an enqueue hands off given to this wait under the
    /// claim's token, so that an idle worker gets a lone new job with no
    /// claim at all (Redis: an offer the enqueue takes, ARCHITECTURE.md
    /// decision 27). After any error ask again with the same token (a claim
    /// does): the claim's outcome may be unknown, and an offer made under
    /// the token may stand until a claim under it withdraws it (or
    /// [`Broker::withdraw_offer`], when no claim can be made). Not cancel-safe in that
    /// sense: a caller that drops the call settles its token (`max_jobs`
    /// 0), and drops `doorbell`, whose pop may take a ring meant for
    /// another worker (workers poll every second anyway).
    fn wait_and_claim(
        &self,
        doorbell: &mut Self::Doorbell,
        queue: &str,
        max: Duration,
        options: ClaimOptions<'_>,
    ) -> impl Future<Output = Result<ClaimOutcome, BrokerError>> + Send {
        async move {
            doorbell.wait(max).await?;
            self.claim(queue, options).await
        }
    }

    /// Extends a running job's lease and quota slots; false when the lease
    /// is no longer the job's.
    fn renew(
        &self,
        lease: &Lease,
        duration: Duration,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Tells the waiting front that the job has started (sent for requests
    /// that must not be answered "try again" once they may have run).
    fn started(&self, lease: &Lease) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Tells the fronts of `jobs` again that they started, after Redis lost
    /// its data (see [`LOST_DATA_GRACE`]): one call, one push per front, on
    /// the connection of bulk traffic, so that a burst of thousands does
    /// not hold up heartbeats and claims.
    fn started_again(
        &self,
        jobs: &[Announced],
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Sends a reply to the front that waits for the job, then settles the
    /// job and frees its quota slots; records its latency (`backend_ms`:
    /// time spent at the backend). Guarded by the lease: delivered at most
    /// once, however often it is called.
    fn reply(
        &self,
        lease: &Lease,
        frame: Bytes,
        backend_ms: u64,
    ) -> impl Future<Output = Result<Delivery, BrokerError>> + Send;

    /// Starts a streamed response: sends its head (a reply frame marked
    /// `stream`) to the waiting front; its body follows through
    /// [`Broker::push_pieces`]. Guarded by the lease and sent once; from
    /// then on the job cannot run again: if its worker is lost, the reaper
    /// aborts its stream (the client sees a truncated response). The job
    /// still ends with [`Broker::reply`] and an empty frame.
    fn stream_head(
        &self,
        lease: &Lease,
        frame: Bytes,
    ) -> impl Future<Output = Result<Delivery, BrokerError>> + Send;

    /// Appends pieces of a streamed response, numbered from `first` (a
    /// repeated call never appends a piece twice), as many as the window
    /// ([`thr_core::envelope::WINDOW`] pieces waiting) has room for. Works
    /// after the job ended ([`Broker::reply`]): the rest of a body read
    /// ahead is still delivered.
    fn push_pieces(
        &self,
        lease: &Lease,
        first: u64,
        pieces: &[Piece],
    ) -> impl Future<Output = Result<Pushed, BrokerError>> + Send;

    /// A front reads the pieces of job `id`'s response from number `from`
    /// on (at most `max`); the pieces before `from` are dropped. None: the
    /// stream is gone (cancelled, expired, or lost with the broker's data).
    fn take_pieces(
        &self,
        id: &str,
        from: u64,
        max: usize,
    ) -> impl Future<Output = Result<Option<Vec<Piece>>, BrokerError>> + Send;

    /// The client of job `id` went away: its pieces are dropped and its
    /// worker's next push is told to stop.
    fn cancel_stream(&self, id: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// The front read the whole response of job `id`: its state goes.
    fn close_stream(&self, id: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Stores chunk `index` (0, 1, … in order) of job `id`'s request body,
    /// kept for `ttl` unless dropped; a repeated call stores it once. False
    /// when earlier chunks are missing (expired or lost).
    fn put_upload_chunk(
        &self,
        id: &str,
        index: u32,
        chunk: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Chunk `index` of job `id`'s request body (None: missing).
    fn upload_chunk(
        &self,
        id: &str,
        index: u32,
    ) -> impl Future<Output = Result<Option<Bytes>, BrokerError>> + Send;

    /// Drops job `id`'s request body (its job ended or never will run).
    fn drop_upload(&self, id: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Sets aside a claimed job that cannot be run (an undecodable
    /// payload), with the reason, and answers its client `answer` (a reply
    /// frame) so that it is never claimed again and nobody waits for it.
    fn dead_letter(
        &self,
        lease: &Lease,
        reason: &str,
        answer: Bytes,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Takes back the jobs of lost workers of `queue` (expired lease, silent
    /// heartbeat): safe ones go back in their place, others are answered.
    /// Each call does a bounded amount of work (a slice of the running
    /// jobs); workers call it about once a second.
    fn reap(
        &self,
        queue: &str,
        policy: &RetryPolicy,
    ) -> impl Future<Output = Result<Reaped, BrokerError>> + Send;

    /// Gives a running job back (a stopping worker that cannot finish it):
    /// the next reap treats it as lost.
    fn hand_back(&self, lease: &Lease) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Gives back a claimed job that never started (a worker held it for a
    /// slot that did not free in time, or it is stopping): it waits again
    /// in its place as if never claimed, whatever its method: its quota
    /// slots (concurrency and rate) are given back and no attempt is
    /// counted. True when it waits again; false when the lease
    /// is no longer the job's or its client has given up meanwhile (it is
    /// gone). Safe to repeat.
    fn put_back(&self, lease: &Lease) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Says that daemon `id` is alive, with a JSON description of itself.
    fn heartbeat(
        &self,
        kind: Daemon,
        id: &str,
        info: &str,
    ) -> impl Future<Output = Result<Beat, BrokerError>> + Send;

    /// Says that daemon `id` stopped cleanly.
    fn retire(
        &self,
        kind: Daemon,
        id: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// What in the broker's own settings breaks thr's guarantees, each as
    /// a sentence for the daemons' log (empty when nothing does, or when
    /// the broker does not let thr look).
    fn setup_warnings(&self) -> impl Future<Output = Result<Vec<String>, BrokerError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// What tells this process's retry loops that the broker answers
    /// again after failing (see [`Recovery`](crate::backoff::Recovery)).
    /// A broker that never fails announces nothing.
    fn recovery(&self) -> crate::backoff::Recovery {
        crate::backoff::Recovery::default()
    }

    /// The waiting count and quota waits of `queue`.
    fn gauges(&self, queue: &str) -> impl Future<Output = Result<Gauges, BrokerError>> + Send;

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

/// Delivers the messages meant for one front: reply frames and started
/// notices ([`thr_core::envelope::FrontMessage`]).
pub trait ReplyStream: Send + 'static {
    /// Waits up to `max` for messages and returns those available (maybe
    /// none). Not cancel-safe: a message popped by a dropped call is lost,
    /// so callers let each call finish.
    fn next_batch(
        &mut self,
        max: Duration,
    ) -> impl Future<Output = Result<Vec<Bytes>, BrokerError>> + Send;
}
