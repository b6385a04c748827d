//! Reading a request body (ARCHITECTURE.md decision 12): a body of at most
//! `INLINE_BODY` travels in its job's frame; a bigger one is stored in
//! Redis chunk by chunk as it arrives, never whole in the front's memory, and its
//! job is queued only once it is complete, so a slow uploader never holds a
//! backend slot. The worker streams the chunks to the backend.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use thr_broker::Broker;
use thr_core::envelope::{CHUNK, INLINE_BODY};

use crate::error::FrontError;

/// Where a request body is.
#[derive(Debug)]
pub enum Stored {
    /// In memory (at most `INLINE_BODY`): it goes in the job's frame.
    Inline(Bytes),
    /// In Redis, as `chunks` chunks of `len` bytes in all.
    InRedis {
        /// How many chunks.
        chunks: u32,
        /// Bytes in all.
        len: u64,
    },
}

/// Reads `body` (at most `max_body` bytes), storing it in Redis under job
/// `id` for `ttl` when it is bigger than one chunk.
pub async fn store<Bd, B>(
    body: Bd,
    max_body: usize,
    broker: &B,
    id: &str,
    ttl: Duration,
) -> Result<Stored, FrontError>
where
    Bd: Body<Data = Bytes>,
    Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Broker,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    let mut chunks: u32 = 0;
    let mut len: u64 = 0;
    let result = async {
        loop {
            let frame = match body.frame().await {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(err)) => return Err(FrontError::of_body(err.into())),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len += data.len() as u64;
            if len > max_body as u64 {
                return Err(FrontError::BodyTooLarge);
            }
            buf.extend_from_slice(&data);
            // Keep the last chunk's worth in memory: a body that ends
            // within `INLINE_BODY` travels inline.
            while buf.len() > CHUNK {
                put(broker, id, chunks, buf.split_to(CHUNK).freeze(), ttl).await?;
                chunks += 1;
            }
        }
        if chunks == 0 && buf.len() <= INLINE_BODY {
            return Ok(Stored::Inline(buf.split().freeze()));
        }
        if !buf.is_empty() {
            put(broker, id, chunks, buf.split().freeze(), ttl).await?;
            chunks += 1;
        }
        Ok(Stored::InRedis { chunks, len })
    }
    .await;
    if result.is_err() && chunks > 0 {
        // Best effort: what was stored expires anyway.
        let _ = broker.drop_upload(id).await;
    }
    result
}

/// Stores one chunk, asking again while Redis does not answer (storing is
/// idempotent by chunk index).
async fn put<B: Broker>(
    broker: &B,
    id: &str,
    index: u32,
    chunk: Bytes,
    ttl: Duration,
) -> Result<(), FrontError> {
    let mut failures = 0;
    loop {
        match broker.put_upload_chunk(id, index, chunk.clone(), ttl).await {
            Ok(true) => return Ok(()),
            Ok(false) => return Err(FrontError::BrokerDown),
            Err(err) if failures < 5 && err.outcome_unknown() => {
                failures += 1;
                tracing::debug!(%err, index, "storing a body chunk unanswered, asking again");
                broker.recovery().pause(failures).await;
            }
            Err(err) => {
                metrics::counter!("thr_redis_errors_total", "daemon" => "http2redis").increment(1);
                tracing::warn!(%err, "could not store the request body");
                return Err(FrontError::BrokerDown);
            }
        }
    }
}
