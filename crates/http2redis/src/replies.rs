//! Reply routing (DESIGN.md decision 1): every request waiting at this front
//! registers a oneshot channel under its job id; a single loop pops this
//! front's reply list in batches and completes the matching channel. A
//! thousand waiting clients cost one Redis connection, not a thousand.
//! Replies nobody waits for any more (timed out, duplicates) are dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thr_broker::ReplyStream;
use thr_core::envelope::Reply;
use tokio::sync::{oneshot, watch};

/// Job id → the request waiting for its reply.
#[derive(Debug, Default, Clone)]
pub struct ReplyRouter {
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>,
}

impl ReplyRouter {
    /// Registers a waiter for job `id`.
    pub fn register(&self, id: &str) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id.to_string(), tx);
        rx
    }

    /// Forgets job `id` (its client was answered some other way).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Hands a reply to its waiter; false when nobody waits for it.
    pub fn deliver(&self, reply: Reply) -> bool {
        let waiter = self.lock().remove(&reply.meta.id);
        match waiter {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no request waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Reply>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Pops replies until `stop` turns true. Each pop is allowed to finish (a
/// popped reply must not be dropped half-way), so stopping takes up to
/// `block` seconds.
pub async fn run_loop<R: ReplyStream>(
    mut stream: R,
    router: ReplyRouter,
    mut stop: watch::Receiver<bool>,
) {
    const BLOCK: Duration = Duration::from_secs(1);
    let mut backoff = Duration::from_millis(50);
    while !*stop.borrow_and_update() {
        match stream.next_batch(BLOCK).await {
            Ok(batch) => {
                backoff = Duration::from_millis(50);
                for frame in batch {
                    match Reply::decode(frame) {
                        Ok(reply) => {
                            let id = reply.meta.id.clone();
                            if !router.deliver(reply) {
                                tracing::debug!(job = %id, "reply for a request no longer waiting");
                            }
                        }
                        Err(err) => tracing::warn!(%err, "undecodable reply dropped"),
                    }
                }
            }
            Err(err) => {
                tracing::warn!(%err, "reply loop: redis error, retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
