//! redis2http, thr's worker.
//!
//! For every configured queue, a claim loop takes the most urgent jobs (at
//! most `max_inflight` running at once in this process), a job runner
//! forwards each to the queue's backend over a pooled keep-alive connection
//! while keeping its lease alive, and pushes the reply to the front that
//! waits for it. A reaper takes back the jobs of lost workers.
//!
//! - [`worker`]: the process: heartbeat, the queues it serves, shutdown.
//! - [`reload`]: applies a new configuration queue by queue.
//! - [`queue`]: one queue's shared state (room, running jobs, drain).
//! - [`claim_loop`]: claims jobs into free slots.
//! - [`job`]: runs one job: backend call, lease renewal, reply delivery.
//! - [`reaper`]: takes back lost workers' jobs, exports queue gauges.
//! - [`lost_data`]: after Redis lost its data, announces again the jobs
//!   that ran here, so that no front tells their clients to try again.
//!
//! ARCHITECTURE.md has the whole flow.

pub mod claim_loop;
pub mod job;
pub mod lost_data;
pub mod queue;
pub mod reaper;
pub mod reload;
pub mod stream;
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
