//! Applies a configuration to the running queues without stopping work: a
//! new queue gets a claim loop and a reaper, a removed one is drained, and a
//! changed one is updated in place — a new backend gets a new client, and
//! the room for running jobs grows or shrinks (shrinking waits for running
//! jobs to end, so the backend never sees more than the new limit for long).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use thr_broker::Broker;
use thr_core::config::Config;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::lost_data::Runners;
use crate::queue::QueueRunner;

/// A queue being served, with what stops it.
pub struct Served<B> {
    /// Its state.
    pub runner: Arc<QueueRunner<B>>,
    /// Turns true to stop its claim loop and reaper.
    pub stop: watch::Sender<bool>,
}

/// What a worker needs to start serving a queue.
pub struct Context<'a, B> {
    /// The broker.
    pub broker: &'a Arc<B>,
    /// This worker's id.
    pub worker_id: &'a str,
    /// Jobs running in this process, all queues.
    pub inflight: &'a Arc<AtomicUsize>,
    /// Where every task of the worker is tracked.
    pub tasks: &'a mut JoinSet<()>,
    /// Every runner, for [`crate::lost_data`].
    pub runners: &'a Runners<B>,
}

/// Makes `served` follow `config`.
pub fn apply<B: Broker>(
    served: &mut HashMap<String, Served<B>>,
    config: &Config,
    cx: Context<'_, B>,
) {
    let grace = config.worker.shutdown_grace;
    served.retain(|name, s| {
        let keep = config.queue(name).is_some();
        if !keep {
            tracing::info!(queue = %name, "queue removed from the configuration; draining it");
            let _ = s.stop.send(true);
            let runner = s.runner.clone();
            cx.tasks.spawn(async move { runner.drain(grace).await });
        }
        keep
    });
    for queue in &config.queues {
        match served.get(&queue.name) {
            Some(s) => s.runner.update(queue, &config.scheduling),
            None => {
                let runner = Arc::new(QueueRunner::new(
                    queue,
                    &config.scheduling,
                    cx.broker.clone(),
                    cx.worker_id.to_string(),
                    cx.inflight.clone(),
                ));
                cx.runners.add(&runner);
                let (stop, stopped) = watch::channel(false);
                cx.tasks
                    .spawn(crate::reaper::run(runner.clone(), stopped.clone()));
                // Running from now: a drain from now on waits for its end.
                runner.claim_loop_done.send_replace(false);
                cx.tasks
                    .spawn(crate::claim_loop::run(runner.clone(), stopped));
                served.insert(queue.name.clone(), Served { runner, stop });
            }
        }
    }
}
