//! Reading a streamed response (ARCHITECTURE.md decision 12): once its head
//! arrived, a task takes the job's pieces from Redis as the client takes
//! them, a few at a time: what the front has not taken stays in Redis,
//! within the window, and the worker waits for room. A data notice on the
//! front's list (routed by [`crate::replies`]) wakes the task when pieces
//! arrive in an empty stream.
//!
//! Whatever ends the stream, its resources go: a complete one is closed, a
//! client that goes away or reads nothing for `client_write_timeout` has
//! the stream cancelled (the worker stops, the pieces are dropped), and a
//! stream cut at the worker or lost ends the client's response truncated.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use thr_broker::Broker;
use thr_core::envelope::Piece;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::body::{ReplyBody, StreamEnd};
use crate::front::Front;

/// Pieces taken from Redis in one call (4 × 128 KiB).
const TAKE: usize = 4;

/// How a stream ended at the front.
#[derive(Debug)]
enum Ending {
    Complete,
    ClientGone,
    ClientStalled,
    Cut(String),
}

/// The body of job `id`'s streamed response. `idle`: the longest silence
/// accepted from the worker before the stream counts as lost.
pub fn stream<B: Broker>(
    front: &Front<B>,
    id: &str,
    idle: Duration,
    write_timeout: Duration,
    span: tracing::Span,
) -> ReplyBody {
    let (tx, rx) = mpsc::channel(1);
    let end = Arc::new(StreamEnd::default());
    let notify = front.router().watch_stream(id);
    let (front, id, done) = (front.clone(), id.to_string(), end.clone());
    tokio::spawn(
        async move {
            let ending = read(&front, &id, &notify, tx, &done, idle, write_timeout).await;
            front.router().unwatch_stream(&id);
            let broker = front.broker();
            match &ending {
                Ending::Complete => {
                    let _ = broker.close_stream(&id).await;
                }
                Ending::ClientGone | Ending::ClientStalled | Ending::Cut(_) => {
                    match &ending {
                        Ending::Cut(why) => tracing::warn!(reason = %why, "response cut"),
                        Ending::ClientStalled => {
                            metrics::counter!("thr_clients_cut_total", "reason" => "write_timeout")
                                .increment(1);
                            tracing::info!(
                                "client read nothing for {write_timeout:?}; response cut"
                            )
                        }
                        _ => tracing::info!("client went away mid-response"),
                    }
                    cancel(broker, &id).await;
                }
            }
        }
        .instrument(span),
    );
    ReplyBody::pieces(rx, end)
}

/// Cancels a stream, asking again a few times when Redis does not answer.
async fn cancel<B: Broker>(broker: &B, id: &str) {
    for attempt in 1..=5 {
        match broker.cancel_stream(id).await {
            Ok(()) => return,
            Err(err) => {
                tracing::debug!(%err, "could not cancel the stream, asking again");
                broker.recovery().pause(attempt).await;
            }
        }
    }
}

async fn read<B: Broker>(
    front: &Front<B>,
    id: &str,
    notify: &tokio::sync::Notify,
    tx: mpsc::Sender<Bytes>,
    end: &StreamEnd,
    idle: Duration,
    write_timeout: Duration,
) -> Ending {
    let broker = front.broker();
    let mut from: u64 = 0;
    let mut quiet_since = Instant::now();
    let mut failures = 0;
    loop {
        let pieces = match broker.take_pieces(id, from, TAKE).await {
            Ok(Some(pieces)) => pieces,
            Ok(None) => return Ending::Cut("the stream is gone from Redis".into()),
            Err(err) if quiet_since.elapsed() < idle => {
                failures += 1;
                tracing::debug!(%err, "could not read the stream, asking again");
                broker.recovery().pause(failures).await;
                continue;
            }
            Err(err) => return Ending::Cut(format!("Redis unreachable mid-stream: {err}")),
        };
        failures = 0;
        if pieces.is_empty() {
            if tx.is_closed() {
                return Ending::ClientGone;
            }
            let left = idle.saturating_sub(quiet_since.elapsed());
            if left.is_zero() {
                return Ending::Cut(format!("nothing from the worker for {idle:?}"));
            }
            // Woken by a data notice; the timeout also covers a notice lost
            // with a Redis restart.
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                () = tx.closed() => return Ending::ClientGone,
            }
            continue;
        }
        quiet_since = Instant::now();
        for piece in pieces {
            match piece {
                Piece::Data(data) => {
                    match tokio::time::timeout(write_timeout, tx.send(data)).await {
                        Ok(Ok(())) => from += 1,
                        Ok(Err(_)) => return Ending::ClientGone,
                        Err(_) => return Ending::ClientStalled,
                    }
                }
                Piece::End => {
                    // Said before `tx` closes, so the body ends cleanly.
                    end.complete.store(true, Ordering::Release);
                    return Ending::Complete;
                }
                Piece::Abort(why) => return Ending::Cut(why),
            }
        }
    }
}
