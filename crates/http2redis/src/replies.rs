//! Reply routing (ARCHITECTURE.md decision 1): every request waiting at this front
//! registers a oneshot channel under its job id; a single loop pops this
//! front's list in batches and completes the matching channel. A thousand
//! waiting clients cost one Redis connection, not a thousand. Messages
//! nobody waits for any more (timed out, duplicates) are dropped.
//!
//! The router also knows, per waiting request, whether its job is known to
//! be queued and whether a worker said it started: that is what an audit
//! ([`crate::audit`]) needs to tell clients whose jobs were lost (and never
//! ran) from those that must wait for their reply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thr_broker::ReplyStream;
use thr_broker::backoff::{Recovery, backoff};
use thr_core::envelope::{FrontMessage, Reply};
use thr_daemon::log_every::LogEvery;
use tokio::sync::{Notify, oneshot, watch};

/// How a waiting request ends.
#[derive(Debug)]
pub enum Answer {
    /// Its reply.
    Reply(Reply),
    /// Its job is gone from the broker and never ran (Redis lost its data,
    /// or the job was dropped while this front looked dead).
    Lost,
}

struct Waiter {
    tx: oneshot::Sender<Answer>,
    queue: String,
    /// The broker confirmed the job is queued.
    queued: bool,
    /// A worker said it started.
    started: bool,
}

/// Job id → the request waiting for its reply; and job id → the reader
/// of its streamed response, woken by data notices.
#[derive(Default, Clone)]
pub struct ReplyRouter {
    waiting: Arc<Mutex<HashMap<String, Waiter>>>,
    streams: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Told of every new waiter and stream reader: what wakes a reply loop
    /// that stopped popping because nobody waited.
    arrivals: Arc<Notify>,
}

impl std::fmt::Debug for ReplyRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyRouter")
            .field("waiting", &self.len())
            .finish()
    }
}

impl ReplyRouter {
    /// Registers a waiter for job `id` of `queue`.
    pub fn register(&self, id: &str, queue: &str) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(
            id.to_string(),
            Waiter {
                tx,
                queue: queue.to_string(),
                queued: false,
                started: false,
            },
        );
        self.arrivals.notify_one();
        rx
    }

    /// The broker confirmed that job `id` is queued.
    pub fn confirm(&self, id: &str) {
        if let Some(w) = self.lock().get_mut(id) {
            w.queued = true;
        }
    }

    /// Forgets job `id` (its client was answered some other way).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Registers the reader of job `id`'s streamed response.
    pub fn watch_stream(&self, id: &str) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.lock_streams().insert(id.to_string(), notify.clone());
        self.arrivals.notify_one();
        notify
    }

    /// Forgets the reader of job `id`'s streamed response.
    pub fn unwatch_stream(&self, id: &str) {
        self.lock_streams().remove(id);
    }

    /// Streamed responses being read now.
    pub fn streams(&self) -> usize {
        self.lock_streams().len()
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes one message; false when nobody waits for it.
    pub fn deliver(&self, message: FrontMessage) -> bool {
        match message {
            FrontMessage::Data(d) => match self.lock_streams().get(&d.id) {
                Some(n) => {
                    n.notify_one();
                    true
                }
                None => false,
            },
            FrontMessage::Started(s) => match self.lock().get_mut(&s.id) {
                Some(w) => {
                    w.started = true;
                    true
                }
                None => false,
            },
            FrontMessage::Reply(reply) => self.answer(&reply.meta.id.clone(), Answer::Reply(reply)),
        }
    }

    /// Completes job `id`'s wait with `answer`; false when nobody waits.
    pub fn answer(&self, id: &str, answer: Answer) -> bool {
        let waiter = self.lock().remove(id);
        match waiter {
            Some(w) => w.tx.send(answer).is_ok(),
            None => false,
        }
    }

    /// Queue → ids of the jobs known to be queued that no worker said it
    /// started: those an audit asks the broker about.
    pub fn auditable(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for (id, w) in self.lock().iter() {
            if w.queued && !w.started {
                out.entry(w.queue.clone()).or_default().push(id.clone());
            }
        }
        out
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no request waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when no request waits and no streamed response is read: no
    /// message this front pops has anyone to go to.
    pub fn is_idle(&self) -> bool {
        self.is_empty() && self.streams() == 0
    }

    /// Returns once a request or stream reader registers (at once if one
    /// did since the last call).
    pub async fn arrival(&self) {
        self.arrivals.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Pops messages until `stop` turns true. Each pop is allowed to finish (a
/// popped message must not be dropped half-way), so stopping takes up to
/// `block` seconds.
/// `orphan` is told of a streamed response whose head came for nobody
/// (its client went away first): its stream must be cancelled.
///
/// While nobody waits for a message, the loop sends no pop until a request
/// registers, or for at most a second. A pop sent at once after the last
/// reply reached Redis on its own, a moment before the next request's
/// enqueue: an extra wake of Redis per request on an idle system. Sent
/// when a request registers, no reply can come before it. It then yields
/// once, so that the request's enqueue is usually written first: tokio
/// (1.x, current-thread runtime) wakes a yielded task only after the other
/// ready tasks have run and the I/O driver has been polled, and the
/// enqueue's batcher, its call and the connection's driver are woken in
/// that time. The pop then reaches Redis while it runs the enqueue and is
/// served in the same wake. Written before the enqueue, it woke Redis on
/// its own a few µs earlier (`thr-bench --scenarios single`: Redis slept
/// 3.84–3.93 times per request before, 2.97–2.99 after). Tokio does not
/// promise that order: it is a matter of speed, never of correctness. What
/// arrives for nobody (an orphan stream's head) is still taken within
/// about a second.
///
/// After a Redis error the loop backs off, until `recovery` says Redis
/// answers again.
pub async fn run_loop<R: ReplyStream>(
    mut stream: R,
    router: ReplyRouter,
    orphan: impl Fn(String) + Send,
    recovery: Recovery,
    mut stop: watch::Receiver<bool>,
) {
    const BLOCK: Duration = Duration::from_secs(1);
    let mut failures = 0;
    let failure_log = LogEvery::failures();
    while !*stop.borrow_and_update() {
        if router.is_idle() {
            tokio::select! {
                _ = router.arrival() => {
                    // Usually a request sending its enqueue: let it go
                    // first (see above).
                    tokio::task::yield_now().await;
                }
                _ = tokio::time::sleep(BLOCK) => {}
                changed = stop.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => break,
                },
            }
        }
        match stream.next_batch(BLOCK).await {
            Ok(batch) => {
                failures = 0;
                for frame in batch {
                    match FrontMessage::decode(frame) {
                        Ok(message) => {
                            let id = message.id().to_string();
                            let head = matches!(&message, FrontMessage::Reply(r) if r.meta.stream);
                            if !router.deliver(message) {
                                tracing::debug!(job = %id, "message for a request no longer waiting");
                                if head {
                                    orphan(id);
                                }
                            }
                        }
                        Err(err) => tracing::warn!(%err, "undecodable reply dropped"),
                    }
                }
            }
            Err(err) => {
                failures += 1;
                let pause = backoff(failures);
                // Redis down: one line per 10 s, not one per attempt.
                match failure_log.admit() {
                    Some(unlogged) => {
                        tracing::warn!(%err, unlogged, "reply loop: redis error, retrying in {pause:?} or once Redis answers again")
                    }
                    None => tracing::debug!(%err, "reply loop: redis error"),
                }
                tokio::select! {
                    _ = recovery.sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use thr_broker::BrokerError;

    /// A stream that counts its pops and answers each with nothing at
    /// once (as a pop that found nothing), at its block time.
    struct Counting(Arc<AtomicUsize>);

    impl ReplyStream for Counting {
        async fn next_batch(&mut self, max: Duration) -> Result<Vec<Bytes>, BrokerError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(max).await;
            Ok(Vec::new())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_pops_only_for_someone_or_once_a_second() {
        let pops = Arc::new(AtomicUsize::new(0));
        let router = ReplyRouter::default();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run_loop(
            Counting(pops.clone()),
            router.clone(),
            |_| {},
            Recovery::default(),
            stop,
        ));
        // Nobody waits: no pop for a second, then one (it blocks a second).
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(pops.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(pops.load(Ordering::SeqCst), 1);
        // That pop ends at 2 s; the next would come at 3 s, but a request
        // registers at 2.5 s: the loop pops at once.
        tokio::time::sleep(Duration::from_millis(1400)).await;
        assert_eq!(pops.load(Ordering::SeqCst), 1);
        let _rx = router.register("job", "q");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(pops.load(Ordering::SeqCst), 2);
        // While someone waits, pops follow one another.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert_eq!(pops.load(Ordering::SeqCst), 4);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop stops")
            .unwrap();
    }
}
