//! redis2http, thr's worker.
//!
//! For every configured queue, a loop claims the most urgent job (at most
//! `max_inflight` running at once in this process), forwards it to the
//! queue's backend over a pooled keep-alive connection and pushes the reply
//! to the list of the front that waits for it.
//!
//! - [`worker`] holds the claim loops and runs each job;
//! - [`forward`] turns a job into a backend request and the response into a reply;
//! - [`connector`] lets the HTTP client reach backends on unix sockets.

pub mod connector;
pub mod forward;
pub mod worker;

use std::future::Future;
use std::sync::Arc;

use thr_broker::RedisBroker;
use thr_core::config::Config;

pub use worker::Worker;

/// Runs a worker until `shutdown` resolves, then stops claiming, lets
/// running jobs finish (up to `shutdown_grace`) and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let broker = RedisBroker::new(&config.redis.url, config.redis.command_timeout)?;
    tracing::info!(
        redis = broker.display_url(),
        queues = config.queues.len(),
        "redis2http starting"
    );
    Worker::new(Arc::new(config), broker).run(shutdown).await;
    Ok(())
}
