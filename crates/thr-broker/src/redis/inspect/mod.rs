//! The operator's view of the Redis broker, what `thrctl` reads and does:
//! queue depths, waiting and running jobs, quota usage, live daemons, dead
//! letters ([`reads`]), and purge, pause and retry ([`admin`]), over the
//! data types of [`model`]. Everything goes through the protocol module:
//! keys from [`crate::protocol::keys`], records decoded by their codecs,
//! state changes by its scripts. Reads and purges work a bounded page at a
//! time, so an operator never blocks production traffic, whatever the
//! backlog.

mod admin;
mod model;
mod reads;

pub use model::{
    DaemonInfo, DeadLetter, JobDetail, Latency, QueueOverview, QuotaUsage, RunningJob, WaitingJob,
};
