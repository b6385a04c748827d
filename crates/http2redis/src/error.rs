//! Every way a request can fail at the front, and the one place that turns a
//! failure into a status code. Messages are short and never leak internals.

use std::borrow::Cow;

use bytes::Bytes;
use http::{Response, StatusCode, header};

use crate::body::ReplyBody;

/// Why the front answers instead of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontError {
    /// Body larger than `max_body`.
    BodyTooLarge,
    /// The request body could not be read (client went away, bad framing).
    BadBody,
    /// The request body came too slowly (`body_read_timeout`, `min_body_rate`).
    BodyTooSlow,
    /// A request target thr cannot forward (authority-form, `*`).
    BadTarget,
    /// More than one Host, or a Host that disagrees with the target's
    /// authority (RFC 9112 §3.2): which one a rule or the backend would
    /// believe is anyone's guess, so neither is.
    BadHost,
    /// Redis could not take the job.
    BrokerDown,
    /// The auth service named by a rule could not give a verdict.
    AuthUnavailable,
    /// No reply within `reply_timeout`.
    ReplyTimeout,
    /// Redis did not say in time whether it took the job (it may run).
    BrokerTimeout,
    /// The job was lost by Redis before it ran (data lost, or dropped
    /// while this front looked dead): it never ran; safe to try again.
    JobLost,
    /// The front is stopping and will not get the reply.
    ShuttingDown,
    /// A reply that cannot be turned into a response.
    BadReply,
    /// Too many requests wait already (queue or quota `max_waiting`); the
    /// client should come back after this many seconds.
    QueueFull {
        /// Seconds for Retry-After.
        retry_after: u64,
    },
    /// The client is over the edge limit; come back after this many seconds.
    TooManyRequests {
        /// Seconds for Retry-After.
        retry_after: u64,
    },
    /// An upgrade request to a queue whose tunnels are all open
    /// (`max_tunnels`); another may open when one closes.
    TunnelsFull {
        /// The queue.
        queue: String,
    },
    /// An upgrade request to a queue that takes none (`max_tunnels = 0`).
    UpgradeRefused {
        /// The queue.
        queue: String,
    },
    /// The backend could not be reached for a tunnel.
    BackendUnavailable,
    /// The backend did not answer an upgrade within `backend_timeout`.
    BackendTimeout,
}

impl FrontError {
    /// Status and short reason for the client.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            FrontError::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            FrontError::BadBody => (StatusCode::BAD_REQUEST, "could not read the request body"),
            FrontError::BodyTooSlow => (StatusCode::REQUEST_TIMEOUT, "request body too slow"),
            FrontError::BadTarget => (StatusCode::BAD_REQUEST, "unsupported request target"),
            FrontError::BadHost => (
                StatusCode::BAD_REQUEST,
                "one Host field, agreeing with the request target, is required",
            ),
            FrontError::BrokerDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "queue unavailable, try again",
            ),
            FrontError::AuthUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication unavailable, try again",
            ),
            FrontError::ReplyTimeout => (StatusCode::GATEWAY_TIMEOUT, "no reply in time"),
            FrontError::BrokerTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "the queue did not answer in time",
            ),
            FrontError::JobLost => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the queue lost this request before it ran, try again",
            ),
            FrontError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "server shutting down"),
            FrontError::BadReply => (StatusCode::BAD_GATEWAY, "invalid reply from backend"),
            FrontError::QueueFull { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests waiting, try again later",
            ),
            FrontError::TooManyRequests { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests, slow down",
            ),
            FrontError::TunnelsFull { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the tunnel cap is reached, try again later",
            ),
            // Permanent, unlike a full cap: a 403 that no retry changes.
            FrontError::UpgradeRefused { .. } => {
                (StatusCode::FORBIDDEN, "upgrades are not allowed here")
            }
            FrontError::BackendUnavailable => (StatusCode::BAD_GATEWAY, "backend unavailable"),
            FrontError::BackendTimeout => (StatusCode::GATEWAY_TIMEOUT, "backend timed out"),
        }
    }

    /// The reason in the body: [`Self::status`]'s, naming the queue where
    /// the queue's own setting is why (the operator wrote it; it is in logs
    /// and metrics too).
    fn reason(&self) -> Cow<'static, str> {
        match self {
            FrontError::TunnelsFull { queue } => Cow::Owned(format!(
                "the tunnel cap of queue {queue} is reached, try again later"
            )),
            FrontError::UpgradeRefused { queue } => {
                Cow::Owned(format!("queue {queue} does not allow upgrades"))
            }
            _ => Cow::Borrowed(self.status().1),
        }
    }

    /// The error for a request body that could not be read.
    pub fn of_body(err: Box<dyn std::error::Error + Send + Sync>) -> FrontError {
        if thr_backend::caused_by::<crate::conn::BodyTooSlow>(&*err) {
            FrontError::BodyTooSlow
        } else {
            FrontError::BadBody
        }
    }

    /// The response the client gets.
    pub fn into_response(self) -> Response<ReplyBody> {
        let (status, _) = self.status();
        let reason = self.reason();
        let mut response = Response::new(ReplyBody::sized(Bytes::from(format!("{reason}\n"))));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let retry_after = match self {
            FrontError::QueueFull { retry_after } | FrontError::TooManyRequests { retry_after } => {
                Some(retry_after)
            }
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body is not worth waiting for.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}
