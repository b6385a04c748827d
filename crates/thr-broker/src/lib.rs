//! thr-broker: how thr's processes meet.
//!
//! The daemons never speak Redis directly: they talk to a [`Broker`]
//! (ARCHITECTURE.md decision 10) that can enqueue a job, claim the next one, send a
//! reply back to the front that waits for it, and withdraw a job whose
//! client has gone. [`RedisBroker`] implements it on a shared Redis, which is
//! what lets fronts and workers run on many machines; [`protocol`] is the
//! single definition of its keys, records and scripts; [`conformance`] is
//! the contract any implementation must pass.

pub mod backoff;
mod broker;
pub mod conformance;
mod error;
pub mod presence;
pub mod protocol;
pub mod redis;

pub use broker::{
    Admission, Announced, Beat, Broker, ClaimOptions, ClaimOutcome, Claimed, Daemon, Delivery,
    Doorbell, FRONT_HEARTBEAT_EVERY, FRONT_TIMEOUT, Gauges, HEARTBEAT_EVERY, HEARTBEAT_TIMEOUT,
    JobState, LOST_DATA_GRACE, Lease, NewJob, Pushed, Reaped, ReplyStream, RetryPolicy, STREAM_TTL,
    Withdrawal,
};
pub use error::BrokerError;
pub use redis::RedisBroker;
