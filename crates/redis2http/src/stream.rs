//! Bodies in pieces (ARCHITECTURE.md decision 12): a request body read from
//! Redis chunk by chunk on its way to the backend, and a response body read
//! from the backend as it comes and pushed to Redis in pieces, within the
//! window the front's reading opens.
//!
//! A response is read by two halves joined by a bounded channel: the
//! reader takes the backend's body as fast as the backend sends it, up to
//! `response_buffer` bytes ahead of the pusher, so that a response that
//! fits frees the backend (and the job's slots) at once, whatever the
//! client's pace; the pusher hands pieces to Redis as the window allows.
//! Past the buffer, backpressure reaches the backend.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use thr_backend::{BoxError, ChannelBody, RequestBody};
use thr_broker::{Broker, Lease, Pushed};
use thr_core::envelope::{CHUNK, Piece, WINDOW};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A stream whose window stays full this long (its front stopped reading
/// and did not say so: it died) is given up.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// Consecutive failed pushes (Redis unreachable) before a stream is given
/// up: about a minute of backoff.
const PUSH_ATTEMPTS: u32 = 60;

/// The request body of a job whose body waits in Redis as `chunks` chunks
/// of `len` bytes in all, read one chunk ahead of the backend.
pub fn upload_body<B: Broker>(broker: Arc<B>, id: String, chunks: u32, len: u64) -> RequestBody {
    let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(1);
    tokio::spawn(async move {
        for index in 0..chunks {
            let mut failures = 0;
            let chunk = loop {
                match broker.upload_chunk(&id, index).await {
                    Ok(chunk) => break chunk,
                    Err(err) if failures < 10 => {
                        failures += 1;
                        tracing::warn!(%err, index, "could not read a request body chunk, asking again");
                        broker.recovery().pause(failures).await;
                    }
                    Err(err) => {
                        let _ = tx
                            .send(Err(format!("request body unreadable: {err}").into()))
                            .await;
                        return;
                    }
                }
            };
            let Some(chunk) = chunk else {
                let _ = tx.send(Err("request body missing from Redis".into())).await;
                return;
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    BodyExt::boxed_unsync(ChannelBody::new(rx, Some(len)))
}

/// What the first look at a response body found.
pub enum FirstPart {
    /// The whole body (at most one chunk): it travels in the reply frame.
    Whole(Bytes),
    /// More is coming: stream it, starting with these bytes.
    Stream(Bytes),
    /// The backend failed before the body was complete; nothing was sent.
    Failed(&'static str),
}

/// Reads what a response body has ready now. A body that ends within one
/// chunk is returned whole (the common case: small responses arrive with
/// their head); one that declares a length of at most a chunk is awaited
/// (up to `timeout`); anything else streams from the first byte not yet
/// there, so a server-sent event is never held back.
pub async fn first_part(body: &mut Incoming, length: Option<u64>, timeout: Duration) -> FirstPart {
    let mut buf = BytesMut::new();
    let small = length.is_some_and(|n| n <= CHUNK as u64);
    loop {
        if body.is_end_stream() {
            return FirstPart::Whole(buf.freeze());
        }
        let frame = if small {
            match tokio::time::timeout(timeout, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => return FirstPart::Failed("backend timed out"),
            }
        } else {
            tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = std::future::ready(()) => return FirstPart::Stream(buf.freeze()),
            }
        };
        match frame {
            None => return FirstPart::Whole(buf.freeze()),
            Some(Err(err)) => {
                tracing::warn!(error = %err, "backend response body failed");
                return FirstPart::Failed("backend closed the connection mid-response");
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
                if buf.len() > CHUNK {
                    return FirstPart::Stream(buf.freeze());
                }
            }
        }
    }
}

/// How a response body ended at the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// Complete.
    Complete,
    /// Cut: why.
    Cut(String),
    /// Nobody reads it any more (its client went away).
    Unread,
}

/// Reads the rest of a response body into `tx` as pieces of at most one
/// chunk, `first` first. A piece is sent as soon as the backend pauses, so
/// streamed events keep their pace. A silence longer than `idle` cuts the
/// body, as does growing past `max`. Ends with [`Piece::End`] or
/// [`Piece::Abort`] unless nobody reads.
pub async fn read_body(
    mut body: Incoming,
    first: Bytes,
    tx: mpsc::Sender<Piece>,
    idle: Duration,
    max: Option<u64>,
) -> BodyEnd {
    let mut total = first.len() as u64;
    let mut buf = BytesMut::from(&first[..]);
    let end = loop {
        // Send what is gathered when the backend has nothing more ready.
        let frame = if buf.is_empty() {
            match tokio::time::timeout(idle, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => break BodyEnd::Cut("backend went silent mid-response".into()),
            }
        } else {
            tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = std::future::ready(()) => {
                    if tx.send(Piece::Data(buf.split().freeze())).await.is_err() {
                        return BodyEnd::Unread;
                    }
                    continue;
                }
            }
        };
        match frame {
            None => break BodyEnd::Complete,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "backend response body failed");
                break BodyEnd::Cut("backend closed the connection mid-response".into());
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len() as u64;
                if max.is_some_and(|m| total > m) {
                    break BodyEnd::Cut("response larger than max_response".into());
                }
                buf.extend_from_slice(&data);
                while buf.len() >= CHUNK {
                    let piece = buf.split_to(CHUNK).freeze();
                    if tx.send(Piece::Data(piece)).await.is_err() {
                        return BodyEnd::Unread;
                    }
                }
            }
        }
    };
    if !buf.is_empty()
        && end == BodyEnd::Complete
        && tx.send(Piece::Data(buf.split().freeze())).await.is_err()
    {
        return BodyEnd::Unread;
    }
    let last = match &end {
        BodyEnd::Complete => Piece::End,
        BodyEnd::Cut(why) => Piece::Abort(why.clone()),
        BodyEnd::Unread => return end,
    };
    if tx.send(last).await.is_err() {
        return BodyEnd::Unread;
    }
    end
}

/// Pushes the pieces from `rx` to the job's stream in order, within its
/// window, until the last piece went or the stream was cancelled.
/// Returns true when the whole response went out.
pub async fn push_pieces<B: Broker>(
    broker: &B,
    lease: &Lease,
    mut rx: mpsc::Receiver<Piece>,
) -> bool {
    let mut next: u64 = 0;
    let mut batch: Vec<Piece> = Vec::with_capacity(WINDOW);
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(p) => batch.push(p),
                None => return false,
            }
        }
        while batch.len() < WINDOW && !batch.last().is_some_and(|p| !matches!(p, Piece::Data(_))) {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let done = !matches!(batch.last(), Some(Piece::Data(_)));
        let mut failures = 0;
        let mut full_since: Option<Instant> = None;
        let mut wait = Duration::from_millis(1);
        while !batch.is_empty() {
            match broker.push_pieces(lease, next, &batch).await {
                Ok(Pushed::Taken(n)) => {
                    failures = 0;
                    let n = n.min(batch.len());
                    next += n as u64;
                    batch.drain(..n);
                    if batch.is_empty() {
                        break;
                    }
                    // The window is full: the front has not read yet.
                    if n > 0 {
                        full_since = None;
                        wait = Duration::from_millis(1);
                    }
                    let since = *full_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STALL_LIMIT {
                        tracing::warn!(
                            "nobody read the response for {STALL_LIMIT:?}; giving it up"
                        );
                        let _ = broker.cancel_stream(&lease.id).await;
                        return false;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(20));
                }
                Ok(Pushed::Cancelled) => {
                    tracing::info!("the client went away mid-response");
                    return false;
                }
                Err(err) if failures < PUSH_ATTEMPTS => {
                    failures += 1;
                    tracing::warn!(%err, attempt = failures, "could not push a response piece, asking again");
                    broker.recovery().pause(failures).await;
                }
                Err(err) => {
                    tracing::error!(%err, "response pieces could not be pushed; giving the stream up");
                    return false;
                }
            }
        }
        if done {
            return true;
        }
    }
}
