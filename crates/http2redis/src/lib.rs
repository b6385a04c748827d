//! http2redis, thr's front.
//!
//! For each client request: read it (bounded), turn it into a job envelope,
//! put it on its queue in Redis, and wait for the reply that a worker pushes
//! to this front's reply list; the client sees an ordinary HTTP response.
//!
//! - [`server`] accepts connections (TCP or unix, HTTP/1.1 and h2c) and
//!   drains them on shutdown;
//! - [`front`] is the request handler: envelope, enqueue, wait, answer;
//! - [`replies`] is the one loop per process that pops replies from Redis
//!   and hands each to the request waiting for it (DESIGN.md decision 1);
//! - [`forwarded`] writes the proxy headers (X-Forwarded-*, X-Request-Id);
//! - [`body`] frames reply bodies as the backend framed them;
//! - [`error`] decides, in one place, which status each failure gets.

pub mod body;
pub mod error;
pub mod forwarded;
pub mod front;
pub mod replies;
pub mod server;

use std::future::Future;
use std::sync::Arc;

use thr_broker::RedisBroker;
use thr_core::config::Config;

pub use front::Front;
pub use server::Listener;

/// Runs a front on `listener` until `shutdown` resolves, then stops
/// accepting, answers what it holds (up to `shutdown_grace`) and returns.
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let broker = RedisBroker::new(&config.redis.url, config.redis.command_timeout)?;
    tracing::info!(
        listen = %config.front.listen,
        redis = broker.display_url(),
        queues = config.queues.len(),
        "http2redis starting"
    );
    let front = Front::new(Arc::new(config), broker);
    server::serve(front, listener, shutdown).await
}
