//! A request body that can be sent again after a call that never reached
//! the backend ([`crate::reuse`]): it keeps a copy of the frames it has
//! given the HTTP client (up to [`KEEP`] bytes), and when the client drops
//! it, hands its copy and the rest of the body back to the forwarder.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::forward::{BoxError, RequestBody};

/// Most body bytes kept for a second attempt. Before its first write to
/// the socket, where a stale connection is found, hyper takes at most its
/// write buffer's worth (`max_response_header_size`, which bounds hyper's
/// buffers, at most 16 MiB; 64 KiB by default) plus one frame (a 128 KiB
/// chunk), so a request that failed there has given less than this. The
/// copy lives as long as the call.
pub const KEEP: usize = 1 << 20;

/// What a [`Replay`] body leaves behind when dropped.
pub struct Leftover {
    /// Frames already given, in order (None: more than [`KEEP`] bytes were
    /// given, so the body cannot be sent again).
    given: Option<VecDeque<Frame<Bytes>>>,
    /// The frames not given yet.
    rest: RequestBody,
}

impl Leftover {
    /// The body again from its start, if it can still be had.
    pub fn replay(self) -> Option<(Replay, oneshot::Receiver<Leftover>)> {
        let given = self.given?;
        Some(Replay::with(given, self.rest))
    }
}

/// A body that keeps what it gives (see the module's doc).
pub struct Replay {
    /// Frames to give again before `rest`'s.
    again: VecDeque<Frame<Bytes>>,
    given: Option<VecDeque<Frame<Bytes>>>,
    kept: usize,
    rest: Option<RequestBody>,
    home: Option<oneshot::Sender<Leftover>>,
}

impl Replay {
    /// `body`, and where it comes back when the HTTP client is done with it.
    pub fn new(body: RequestBody) -> (Replay, oneshot::Receiver<Leftover>) {
        Replay::with(VecDeque::new(), body)
    }

    fn with(
        again: VecDeque<Frame<Bytes>>,
        rest: RequestBody,
    ) -> (Replay, oneshot::Receiver<Leftover>) {
        let (home, back) = oneshot::channel();
        let replay = Replay {
            again,
            given: Some(VecDeque::new()),
            kept: 0,
            rest: Some(rest),
            home: Some(home),
        };
        (replay, back)
    }

    fn keep(&mut self, frame: &Frame<Bytes>) {
        let Some(given) = &mut self.given else {
            return;
        };
        let copy = if let Some(data) = frame.data_ref() {
            self.kept += data.len();
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            return;
        };
        if self.kept > KEEP {
            self.given = None;
        } else {
            given.push_back(copy);
        }
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match self.again.pop_front() {
            Some(frame) => frame,
            None => {
                let Some(rest) = &mut self.rest else {
                    return Poll::Ready(None);
                };
                match std::task::ready!(Pin::new(rest).poll_frame(cx)) {
                    Some(Ok(frame)) => frame,
                    other => return Poll::Ready(other),
                }
            }
        };
        self.keep(&frame);
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.again.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let again: u64 = self
            .again
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + again);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + again);
        }
        hint
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        let (Some(home), Some(rest)) = (self.home.take(), self.rest.take()) else {
            return;
        };
        // What was given again and not yet taken comes first, then the rest.
        let given = self.given.take().map(|mut given| {
            given.extend(self.again.drain(..));
            given
        });
        let _ = home.send(Leftover { given, rest });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::full_body;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_taken_in_part_is_given_again_whole() {
        let (mut body, back) = Replay::new(full_body(Bytes::from_static(b"hello")));
        assert_eq!(body.size_hint().exact(), Some(5));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "hello");
        drop(body);
        let (again, _back) = back.await.unwrap().replay().expect("replayable");
        assert_eq!(again.size_hint().exact(), Some(5));
        let collected = again.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "hello");
    }

    #[tokio::test]
    async fn a_body_given_beyond_what_is_kept_cannot_be_replayed() {
        let big = Bytes::from(vec![0u8; KEEP + 1]);
        let (mut body, back) = Replay::new(full_body(big));
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert!(back.await.unwrap().replay().is_none());
    }

    #[tokio::test]
    async fn an_untouched_body_comes_back_untouched() {
        let (body, back) = Replay::new(full_body(Bytes::from_static(b"abc")));
        drop(body);
        let (again, _) = back.await.unwrap().replay().unwrap();
        assert_eq!(again.collect().await.unwrap().to_bytes(), "abc");
    }
}
