//! thr-backend: the client side of thr, shared by the worker (which forwards
//! queued jobs) and the front (which forwards `bypass` requests directly).
//!
//! - [`forward`]: a pooled keep-alive client bound to one backend that turns
//!   a job into an outcome (the backend's response, or 502/504);
//! - [`connector`]: reaching backends that listen on a unix socket;
//! - [`reuse`]: finding a kept-alive connection the backend has closed
//!   before a request is written into it;
//! - [`replay`]: a request body that can be sent again when it was not.

pub mod channel;
pub mod connector;
pub mod forward;
pub mod replay;
pub mod reuse;

pub use channel::ChannelBody;
pub use forward::{BoxError, Failure, Forwarder, Head, RequestBody, caused_by, full_body, head_of};
