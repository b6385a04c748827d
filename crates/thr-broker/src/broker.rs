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
}

/// The shared engine between fronts and workers.
pub trait Broker: Send + Sync + 'static {
    /// What a worker waits on for new work.
    type Doorbell: Doorbell;
    /// What a front reads its replies from.
    type Replies: ReplyStream;

    /// Puts a job on its queue.
    fn enqueue(&self, job: NewJob<'_>) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Withdraws a waiting job; true when it was still waiting (it will
    /// never reach the backend), false when already running or gone.
    fn cancel(
        &self,
        queue: &str,
        id: &str,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Takes the most urgent job of `queue` and leases it for `lease`.
    fn claim(
        &self,
        queue: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<Claimed>, BrokerError>> + Send;

    /// Sends a reply to the front that waits for job `id` and releases the job.
    fn reply(
        &self,
        queue: &str,
        front: &str,
        id: &str,
        frame: Bytes,
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
