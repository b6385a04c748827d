//! The body of a response to a client: a whole reply, framed the way the
//! backend framed it (a backend that sent chunked is answered chunked
//! again, one that sent a Content-Length gets it again: framing is
//! hop-by-hop, but keeping it makes thr invisible to clients that compare
//! responses); the pieces of a streamed reply as they come from Redis
//! ([`crate::pieces`]); or a bypassed backend's body passed straight on.
//!
//! A streamed body that does not end with its last piece ends with an
//! error, so the client sees a truncated response (a reset stream, or a
//! chunked body without its last chunk), never a complete-looking short one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use thr_backend::BoxError;
use tokio::sync::mpsc;

/// How a streamed body ended, as its reader saw it.
#[derive(Debug, Default)]
pub struct StreamEnd {
    /// Every piece arrived, the last one included.
    pub complete: AtomicBool,
}

/// A response body.
pub struct ReplyBody {
    kind: Kind,
}

enum Kind {
    Whole {
        data: Option<Bytes>,
        sized: bool,
    },
    Pieces {
        rx: mpsc::Receiver<Bytes>,
        end: Arc<StreamEnd>,
    },
    Direct(UnsyncBoxBody<Bytes, BoxError>),
}

impl std::fmt::Debug for ReplyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Whole { .. } => "whole",
            Kind::Pieces { .. } => "pieces",
            Kind::Direct(_) => "direct",
        };
        f.debug_struct("ReplyBody").field("kind", &kind).finish()
    }
}

impl Default for ReplyBody {
    fn default() -> Self {
        ReplyBody::sized(Bytes::new())
    }
}

impl ReplyBody {
    /// A body sent with a Content-Length.
    pub fn sized(data: Bytes) -> ReplyBody {
        ReplyBody {
            kind: Kind::Whole {
                data: Some(data),
                sized: true,
            },
        }
    }

    /// A body sent without a declared length (chunked on HTTP/1.1).
    pub fn streamed(data: Bytes) -> ReplyBody {
        ReplyBody {
            kind: Kind::Whole {
                data: Some(data),
                sized: false,
            },
        }
    }

    /// The pieces arriving on `rx`; complete only if `end` says so when
    /// the channel closes.
    pub fn pieces(rx: mpsc::Receiver<Bytes>, end: Arc<StreamEnd>) -> ReplyBody {
        ReplyBody {
            kind: Kind::Pieces { rx, end },
        }
    }

    /// A body passed straight on (bypass).
    pub fn direct(body: UnsyncBoxBody<Bytes, BoxError>) -> ReplyBody {
        ReplyBody {
            kind: Kind::Direct(body),
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
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Whole { data, .. } => {
                let data = data.take().filter(|d| !d.is_empty());
                Poll::Ready(data.map(|d| Ok(Frame::data(d))))
            }
            Kind::Pieces { rx, end } => match rx.poll_recv(cx) {
                Poll::Ready(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Poll::Ready(None) if end.complete.load(Ordering::Acquire) => Poll::Ready(None),
                Poll::Ready(None) => Poll::Ready(Some(Err("response cut short".into()))),
                Poll::Pending => Poll::Pending,
            },
            Kind::Direct(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Whole { data, sized } => *sized && data.as_ref().is_none_or(|d| d.is_empty()),
            Kind::Pieces { .. } => false,
            Kind::Direct(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Whole { data, sized: true } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Whole { .. } | Kind::Pieces { .. } => SizeHint::default(),
            Kind::Direct(body) => body.size_hint(),
        }
    }
}
