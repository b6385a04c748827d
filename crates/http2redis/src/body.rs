//! The body of a response to a client: the reply's bytes, framed the way
//! the backend framed them. A backend that streamed its response (chunked)
//! is answered chunked again; one that sent a Content-Length gets it again.
//! Framing is hop-by-hop, but keeping it makes thr invisible to clients
//! that compare responses.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A complete body, with or without a declared length.
#[derive(Debug, Default)]
pub struct ReplyBody {
    data: Option<Bytes>,
    sized: bool,
}

impl ReplyBody {
    /// A body sent with a Content-Length.
    pub fn sized(data: Bytes) -> ReplyBody {
        ReplyBody {
            data: Some(data),
            sized: true,
        }
    }

    /// A body sent without a declared length (chunked on HTTP/1.1).
    pub fn streamed(data: Bytes) -> ReplyBody {
        ReplyBody {
            data: Some(data),
            sized: false,
        }
    }
}

impl From<Bytes> for ReplyBody {
    fn from(data: Bytes) -> ReplyBody {
        ReplyBody::sized(data)
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let data = self.get_mut().data.take().filter(|d| !d.is_empty());
        Poll::Ready(data.map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.sized && self.data.as_ref().is_none_or(|d| d.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
        } else {
            SizeHint::default()
        }
    }
}
