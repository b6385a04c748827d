//! The worker process: says it is alive, serves the queues of the
//! configuration (following its reloads), and on shutdown stops claiming
//! and drains. Every task it starts is tracked in one `JoinSet`, so
//! shutdown waits for all of them and a panicking one is seen.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use thr_broker::{Beat, Broker, Daemon};
use thr_core::config::Config;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::lost_data::{self, Runners};
use crate::reload::{self, Served};

/// A worker process's identity and broker.
pub struct Worker<B> {
    broker: Arc<B>,
    id: String,
}

impl<B: Broker> Worker<B> {
    /// A worker with a fresh id.
    pub fn new(broker: B) -> Worker<B> {
        Worker {
            broker: Arc::new(broker),
            id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// This worker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serves the queues of `config` (following its reloads) until
    /// `shutdown`, then drains.
    pub async fn run(
        self,
        mut config: watch::Receiver<Arc<Config>>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut tasks = JoinSet::new();
        let mut served: HashMap<String, Served<B>> = HashMap::new();
        let mut current = config.borrow_and_update().clone();
        let inflight = Arc::new(AtomicUsize::new(0));
        let describe = {
            let inflight = inflight.clone();
            let id = self.id.clone();
            let started = thr_broker::presence::unix_now();
            // The queues it serves: `thrctl` knows a configured queue by
            // them before any request has reached it.
            let config = config.clone();
            move || {
                let queues: Vec<String> = config
                    .borrow()
                    .queues
                    .iter()
                    .map(|q| q.name.clone())
                    .collect();
                serde_json::json!({
                    "kind": "redis2http",
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "started": started,
                    "inflight": inflight.load(Ordering::Relaxed),
                    "id": id,
                    "queues": queues,
                })
                .to_string()
            }
        };
        // Be known alive before holding any lease.
        let first = match self
            .broker
            .heartbeat(Daemon::Worker, &self.id, &describe())
            .await
        {
            Ok(beat) => Some(beat.generation),
            Err(err) => {
                tracing::warn!(%err, "first heartbeat failed; retrying in the background");
                None
            }
        };
        // The generation of Redis's data, as the beats see it: when it
        // changes, Redis lost its data, and the jobs that ran here are
        // announced again (`lost_data`).
        let (seen_generation, generation) = watch::channel(first);
        let runners = Arc::new(Runners::default());
        let announcer = tokio::spawn(lost_data::run(runners.clone(), generation));
        let (stop_presence, presence_stopped) = watch::channel(false);
        let presence = tokio::spawn({
            let broker = self.broker.clone();
            let id = self.id.clone();
            async move {
                thr_broker::presence::keep_alive(
                    &*broker,
                    Daemon::Worker,
                    &id,
                    describe,
                    move |beat: Beat| {
                        seen_generation.send_if_modified(|g| {
                            let changed = g.as_ref() != Some(&beat.generation);
                            if changed {
                                *g = Some(beat.generation);
                            }
                            changed
                        });
                    },
                    presence_stopped,
                )
                .await
            }
        });
        let apply =
            |served: &mut HashMap<String, Served<B>>, tasks: &mut JoinSet<()>, config: &Config| {
                reload::apply(
                    served,
                    config,
                    reload::Context {
                        broker: &self.broker,
                        worker_id: &self.id,
                        inflight: &inflight,
                        tasks,
                        runners: &runners,
                    },
                )
            };
        apply(&mut served, &mut tasks, &current);
        tracing::info!(worker = %self.id, "redis2http ready");
        thr_daemon::notify_ready();
        tokio::pin!(shutdown);
        let mut follow = true;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                changed = config.changed(), if follow => match changed {
                    Ok(()) => {
                        current = config.borrow_and_update().clone();
                        apply(&mut served, &mut tasks, &current);
                    }
                    // Nobody will send new configurations; keep serving.
                    Err(_) => follow = false,
                },
                Some(done) = tasks.join_next() => {
                    if let Err(err) = done && err.is_panic() {
                        tracing::error!(%err, "a worker task panicked");
                    }
                }
            }
        }
        thr_daemon::notify_stopping();
        let grace = current.worker.shutdown_grace;
        for s in served.values() {
            let _ = s.stop.send(true);
        }
        for (_, s) in served.drain() {
            let runner = s.runner;
            tasks.spawn(async move { runner.drain(grace).await });
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(err) = done
                && err.is_panic()
            {
                tracing::error!(%err, "a worker task panicked");
            }
        }
        let _ = stop_presence.send(true);
        let _ = presence.await;
        // Its watch's sender went with the heartbeats: it ends by itself.
        let _ = announcer.await;
        tracing::info!(worker = %self.id, "redis2http stopped");
    }
}
