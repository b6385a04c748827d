//! thr-core: everything thr knows that does not touch the network.
//!
//! The front (`http2redis`), the worker (`redis2http`) and the CLI share these
//! pieces: the operators' configuration ([`config`]), the binary wire format of
//! jobs and replies that travel through Redis ([`envelope`]), the priority arithmetic ([`priority`]) and the HTTP
//! header rules of a transparent proxy ([`headers`]). Keeping them free of I/O
//! keeps them cheap to test and lets every process agree on them.

pub mod config;
pub mod envelope;
pub mod headers;
pub mod priority;
pub mod quota;
pub mod rules;
pub mod target;
