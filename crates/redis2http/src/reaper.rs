//! Takes back the jobs of lost workers, about once a second (any live
//! worker does; the scripts re-check every job, so two reapers never handle
//! one twice), and exports the queue's gauges on the way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use thr_broker::{Broker, RetryPolicy};
use thr_daemon::log_every::LogEvery;
use tokio::sync::watch;

use crate::claim_loop::sleep_or_stop;
use crate::queue::QueueRunner;

/// Reaps `runner`'s queue until `stop`.
pub async fn run<B: Broker>(runner: Arc<QueueRunner<B>>, mut stop: watch::Receiver<bool>) {
    // Limits whose gauges were set, so that they go back to 0 when their
    // waits end instead of showing the last value forever.
    let mut exported: Vec<String> = Vec::new();
    let failure_log = LogEvery::failures();
    loop {
        let pause = Duration::from_millis(rand::rng().random_range(700..1300));
        if sleep_or_stop(pause, &mut stop).await {
            return;
        }
        let policy = {
            let q = runner.queue.load();
            RetryPolicy {
                methods: q.retry_methods.clone(),
                max_attempts: q.max_attempts,
            }
        };
        export_gauges(&runner, &mut exported).await;
        match runner.broker.reap(&runner.name, &policy).await {
            Ok(r) if r.requeued + r.answered + r.dead_lettered > 0 => {
                let q = runner.name.clone();
                metrics::counter!("thr_jobs_retried_total", "queue" => q.clone())
                    .increment(r.requeued);
                metrics::counter!("thr_jobs_answered_by_reaper_total", "queue" => q.clone())
                    .increment(r.answered);
                metrics::counter!("thr_jobs_dead_lettered_total", "queue" => q)
                    .increment(r.dead_lettered);
                tracing::warn!(
                    queue = %runner.name,
                    requeued = r.requeued,
                    answered_502 = r.answered,
                    dead_lettered = r.dead_lettered,
                    "took back the jobs of a lost worker"
                )
            }
            Ok(_) => {}
            Err(err) => match failure_log.admit() {
                Some(unlogged) => {
                    tracing::warn!(queue = %runner.name, %err, unlogged, "reaping failed; trying again in a second")
                }
                None => tracing::debug!(queue = %runner.name, %err, "reaping failed"),
            },
        }
    }
}

/// The queue's waiting count and the quota waits per limit.
async fn export_gauges<B: Broker>(runner: &QueueRunner<B>, exported: &mut Vec<String>) {
    let Ok(gauges) = runner.broker.gauges(&runner.name).await else {
        return;
    };
    metrics::gauge!("thr_jobs_waiting", "queue" => runner.name.clone()).set(gauges.waiting as f64);
    let mut per_limit: HashMap<String, (u64, u64)> = HashMap::new();
    for (limit, n) in gauges.quota_waiting {
        per_limit.entry(limit).or_default().0 = n;
    }
    for (limit, n) in gauges.saturated_keys {
        per_limit.entry(limit).or_default().1 = n;
    }
    for limit in exported.iter() {
        per_limit.entry(limit.clone()).or_default();
    }
    exported.clear();
    for (limit, (waiting, saturated)) in per_limit {
        metrics::gauge!("thr_quota_waiting", "limit" => limit.clone()).set(waiting as f64);
        metrics::gauge!("thr_quota_saturated_keys", "limit" => limit.clone()).set(saturated as f64);
        if waiting > 0 {
            exported.push(limit);
        }
    }
}
