//! redis2http, thr's worker.
//!
//! For every configured queue, a loop claims the most urgent job (at most
//! `max_inflight` running at once in this process), forwards it to the
//! queue's backend over a pooled keep-alive connection and pushes the reply
//! to the list of the front that waits for it.
//!
//! - [`worker`] holds the claim loops and runs each job; the backend call
//!   itself is [`thr_backend::Forwarder`]'s.

pub mod worker;

use std::future::Future;
use std::sync::Arc;

use thr_broker::RedisBroker;
use thr_core::config::Config;
use tokio::sync::watch;

pub use worker::Worker;

/// Runs a worker until `shutdown` resolves, then stops claiming, lets
/// running jobs finish (up to `shutdown_grace`) and returns. Each new value
/// of `config` updates the queues served (see `thr_daemon::watch_config`).
pub async fn run(
    config: watch::Receiver<Arc<Config>>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (redis, queues, admin) = {
        let c = config.borrow();
        (c.redis.clone(), c.queues.len(), c.worker.admin)
    };
    let broker = RedisBroker::from_settings(&redis)?;
    let admin = match admin {
        Some(addr) => {
            let probe = broker.clone();
            let ready: thr_daemon::admin::Readiness = std::sync::Arc::new(move || {
                let probe = probe.clone();
                Box::pin(async move { thr_broker::Broker::ping(&probe).await.is_ok() })
            });
            Some(thr_daemon::admin::spawn(addr, ready).await?)
        }
        None => None,
    };
    tracing::info!(redis = broker.display_url(), queues, "redis2http starting");
    Worker::new(broker).run(config, shutdown).await;
    if let Some(admin) = admin {
        admin.abort();
    }
    Ok(())
}
