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
use thr_broker::backoff::backoff;
use thr_core::envelope::{FrontMessage, Reply};
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
pub async fn run_loop<R: ReplyStream>(
    mut stream: R,
    router: ReplyRouter,
    orphan: impl Fn(String) + Send,
    mut stop: watch::Receiver<bool>,
) {
    const BLOCK: Duration = Duration::from_secs(1);
    let mut failures = 0;
    while !*stop.borrow_and_update() {
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
                tracing::warn!(%err, "reply loop: redis error, retrying in {pause:?}");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}
