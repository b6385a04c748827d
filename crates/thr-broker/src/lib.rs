//! thr-broker: how thr's processes meet.
//!
//! The daemons never speak Redis directly: they talk to a [`Broker`]
//! (DESIGN.md decision 10) that can enqueue a job, claim the next one, send a
//! reply back to the front that waits for it, and cancel a job whose client
//! has gone. [`RedisBroker`] implements it on a shared Redis, which is what
//! lets fronts and workers run on many machines.

mod broker;
mod error;
pub mod presence;
pub mod redis;

pub use broker::{
    Admission, Broker, ClaimOptions, ClaimOutcome, Claimed, Daemon, Doorbell, HEARTBEAT_EVERY,
    HEARTBEAT_TIMEOUT, NewJob, Reaped, ReplyStream, RetryPolicy,
};
pub use error::BrokerError;
pub use redis::RedisBroker;
