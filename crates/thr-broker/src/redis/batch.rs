//! Natural batching: calls of one kind (releases, enqueues) to one queue
//! go through a task that sends them as one script call. While a slot is
//! free a call goes at once, alone; while every slot (a few calls in
//! flight) is taken, what arrives meanwhile is gathered and goes as the
//! next call. So a quiet system pays no added latency, and a busy one pays
//! Redis's fixed cost per script call (and per shared command inside it)
//! once per batch instead of once per job.
//!
//! Each caller still waits at most the command timeout: one that gives up
//! gets [`BrokerError::Timeout`] (its item may still go out in a later
//! batch), which is what any call that timed out reports, and every batched
//! script is safe to call again.

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::BrokerError;

/// What a caller gets back: its own result.
type Answer<R> = oneshot::Sender<Result<R, BrokerError>>;

/// How much one call may carry.
pub(crate) struct Limits<T> {
    /// Most items.
    pub items: usize,
    /// Most bytes (by `size`) in one call, unless its first item is bigger.
    pub bytes: usize,
    /// An item's size in bytes.
    pub size: fn(&T) -> usize,
    /// Most calls out at once.
    pub in_flight: usize,
}

/// Sends items of type `T` in batches, answering each with an `R`.
pub(crate) struct Batcher<T, R> {
    tx: mpsc::UnboundedSender<(T, Answer<R>)>,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batching task (on the current Tokio runtime). `send`
    /// makes one call for a batch and returns one result per item, in
    /// order, or one error for the whole call. A call carries at most
    /// `limits.items` items and at most `limits.bytes` (by `size`) in all,
    /// its first item whatever its size: big payloads never make one long
    /// call. At most `limits.in_flight` calls are out at once; what
    /// arrives meanwhile waits for the next free one, gathered.
    pub(crate) fn start<F, Fut>(limits: Limits<T>, mut send: F) -> Batcher<T, R>
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<R>, BrokerError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(T, Answer<R>)>();
        let max = limits.items.max(1);
        let slots = Arc::new(Semaphore::new(limits.in_flight.max(1)));
        tokio::spawn(async move {
            // An item that did not fit in the previous batch.
            let mut held: Option<(T, Answer<R>)> = None;
            loop {
                let Some((item, answer)) = (match held.take() {
                    Some(next) => Some(next),
                    None => rx.recv().await,
                }) else {
                    break;
                };
                // Items arriving while every slot is taken are gathered
                // into this batch.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let mut items = Vec::with_capacity(max);
                let mut answers = Vec::with_capacity(max);
                let mut bytes = (limits.size)(&item);
                items.push(item);
                answers.push(answer);
                while items.len() < max {
                    let Ok((item, answer)) = rx.try_recv() else {
                        break;
                    };
                    bytes += (limits.size)(&item);
                    if bytes > limits.bytes {
                        held = Some((item, answer));
                        break;
                    }
                    items.push(item);
                    answers.push(answer);
                }
                let call = send(items);
                tokio::spawn(async move {
                    let count = answers.len();
                    let outcome = call.await;
                    drop(slot);
                    match outcome {
                        Ok(results) if results.len() == count => {
                            for (answer, result) in answers.into_iter().zip(results) {
                                let _ = answer.send(Ok(result));
                            }
                        }
                        Ok(results) => {
                            let err = BrokerError::Protocol(format!(
                                "{} answers to a batch of {count}",
                                results.len()
                            ));
                            for answer in answers {
                                let _ = answer.send(Err(err.share()));
                            }
                        }
                        Err(err) => {
                            for answer in answers {
                                let _ = answer.send(Err(err.share()));
                            }
                        }
                    }
                });
            }
        });
        Batcher { tx }
    }

    /// Sends `item` with the next batch and waits for its result, at most
    /// `timeout` (then the outcome is unknown: [`BrokerError::Timeout`]).
    pub(crate) async fn call(
        &self,
        item: T,
        timeout: Duration,
        what: impl FnOnce() -> String,
    ) -> Result<R, BrokerError> {
        let (answer, result) = oneshot::channel();
        if self.tx.send((item, answer)).is_err() {
            return Err(BrokerError::failed("the batching task has stopped"));
        }
        match tokio::time::timeout(timeout, result).await {
            Ok(Ok(result)) => result,
            // The task dropped the answer: it stopped mid-call.
            Ok(Err(_)) => Err(BrokerError::Timeout {
                what: format!("{}: the batching task stopped", what()),
                source: None,
            }),
            Err(_) => Err(BrokerError::Timeout {
                what: what(),
                source: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const LIMITS: Limits<u32> = Limits {
        items: 8,
        bytes: 1 << 20,
        size: |_| 4,
        in_flight: 1,
    };

    #[tokio::test]
    async fn a_lone_call_goes_alone_and_calls_made_meanwhile_go_together() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::<Vec<u32>>::new()));
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let seen = calls.clone();
        let batcher = Arc::new(Batcher::start(LIMITS, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.clone());
            let mut gate = gate_rx.clone();
            async move {
                // The first call is held until the test lets it go.
                if items == [0] {
                    let _ = gate.wait_for(|open| *open).await;
                }
                Ok(items.iter().map(|i| i * 10).collect())
            }
        }));
        let first = {
            let b = batcher.clone();
            tokio::spawn(async move { b.call(0, Duration::from_secs(5), String::new).await })
        };
        // Let the first call go out before the others arrive.
        while calls.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let later: Vec<_> = (1..=3)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i, Duration::from_secs(5), String::new).await })
            })
            .collect();
        tokio::task::yield_now().await;
        gate_tx.send(true).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        let mut answers = Vec::new();
        for h in later {
            answers.push(h.await.unwrap().unwrap());
        }
        assert_eq!(answers, [10, 20, 30]);
        assert_eq!(*calls.lock().unwrap(), [vec![0], vec![1, 2, 3]]);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_caller_alike() {
        let batcher = Batcher::<u32, u32>::start(LIMITS, |_| async {
            Err(BrokerError::Timeout {
                what: "slow".into(),
                source: None,
            })
        });
        let err = batcher
            .call(1, Duration::from_secs(5), String::new)
            .await
            .unwrap_err();
        assert!(err.outcome_unknown(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_at_most_its_timeout() {
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = sent.clone();
        let batcher = Batcher::<u32, u32>::start(LIMITS, move |items| {
            counter.fetch_add(items.len(), Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(items)
            }
        });
        let err = batcher
            .call(1, Duration::from_millis(400), || "waited".into())
            .await
            .unwrap_err();
        assert!(err.outcome_unknown(), "a caller that gave up cannot know");
        assert_eq!(sent.load(Ordering::Relaxed), 1);
    }
}
