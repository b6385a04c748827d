//! After Redis lost its data (restarted empty, flushed: its generation
//! changed), the started notices and replies still on their way to fronts
//! were lost with it, and a front would tell those jobs' clients "lost
//! before it ran, try again" although their requests ran. So when a beat
//! sees a new generation, the worker announces again every job of an older
//! generation that runs here, and every one not safe to retry that ended
//! lately; the front audits only [`LOST_DATA_GRACE`] after it saw the loss.
//! Announcements go in batches on the connection of bulk traffic, so that
//! thousands of them do not hold up heartbeats and claims.
//! A job announced again waits for its reply (delivered even without a
//! lease record) or, for one that ended, its reply timeout: an honest 504
//! instead of a false "try again".

use std::sync::{Arc, Mutex, Weak};

use futures_util::future::join_all;
use thr_broker::backoff::backoff;
use thr_broker::{Broker, LOST_DATA_GRACE};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::queue::QueueRunner;

/// Every queue runner of the process, those draining after a reload or at
/// shutdown included: their jobs are announced too.
pub struct Runners<B>(Mutex<Vec<Weak<QueueRunner<B>>>>);

impl<B> Default for Runners<B> {
    fn default() -> Runners<B> {
        Runners(Mutex::new(Vec::new()))
    }
}

impl<B> Runners<B> {
    /// Adds `runner`; it is forgotten once dropped.
    pub fn add(&self, runner: &Arc<QueueRunner<B>>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|r| r.strong_count() > 0);
        all.push(Arc::downgrade(runner));
    }

    fn live(&self) -> Vec<Arc<QueueRunner<B>>> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter_map(Weak::upgrade).collect()
    }
}

/// Announces the jobs of older generations each time `generation` (as the
/// heartbeats see it) changes, until its sender is dropped.
pub async fn run<B: Broker>(
    runners: Arc<Runners<B>>,
    mut generation: watch::Receiver<Option<String>>,
) {
    // Each value counts, the first one too: jobs claimed before a first
    // beat that got through may be of an older generation.
    loop {
        let seen = generation.borrow_and_update().clone();
        if let Some(seen) = seen {
            let all = runners.live();
            // Past the grace the fronts have audited: no use going on.
            let announced = join_all(all.iter().map(|r| announce(r, &seen)));
            if tokio::time::timeout(LOST_DATA_GRACE, announced)
                .await
                .is_err()
            {
                tracing::warn!(
                    "Redis lost its data, and some jobs that ran here could not be announced to their fronts again: their clients may be told to try again"
                );
            }
        }
        if generation.changed().await.is_err() {
            return;
        }
    }
}

/// Most jobs announced in one call: bounds the time one pipeline holds
/// Redis and the bulk connection.
const BATCH: usize = 500;

/// Announces `runner`'s jobs older than `generation`, [`BATCH`] at a time,
/// asking again for a batch that failed.
async fn announce<B: Broker>(runner: &QueueRunner<B>, generation: &str) {
    let jobs = runner.jobs_before(generation);
    if jobs.is_empty() {
        return;
    }
    let started = Instant::now();
    for batch in jobs.chunks(BATCH) {
        let mut failures = 0;
        while let Err(err) = runner.broker.started_again(batch).await {
            failures += 1;
            tracing::debug!(queue = %runner.name, %err, "could not announce jobs again; asking again");
            tokio::time::sleep(backoff(failures)).await;
        }
    }
    tracing::warn!(
        queue = %runner.name,
        jobs = jobs.len(),
        ms = started.elapsed().as_millis() as u64,
        "Redis lost its data: jobs that ran here announced to their fronts again"
    );
}
