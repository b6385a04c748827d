//! A body fed through a channel, one chunk at a time: how a request body
//! read from Redis reaches the backend without ever being whole in memory.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::forward::BoxError;

/// The receiving end: a body of `len` bytes (when known) whose chunks come
/// from the channel. The sender ends it by closing the channel, or cuts it
/// with an error (the backend then sees an incomplete request).
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    left: Option<u64>,
}

impl ChannelBody {
    /// A body of `len` bytes (None: unknown) read from `rx`.
    pub fn new(rx: mpsc::Receiver<Result<Bytes, BoxError>>, len: Option<u64>) -> ChannelBody {
        ChannelBody { rx, left: len }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(left) = &mut this.left {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) if this.left.is_some_and(|l| l > 0) => {
                Poll::Ready(Some(Err("request body ended early".into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
