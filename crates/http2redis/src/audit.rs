//! Audits of the waiting clients, after a fault that may have lost their
//! jobs. The front's heartbeat tells it when to audit:
//! - Redis lost its data (restarted empty, flushed): its generation changed.
//!   Jobs that were queued are gone and will never run.
//! - This front was silent longer than `FRONT_TIMEOUT` (a stall): workers
//!   may have taken it for dead and dropped its waiting jobs.
//!
//! Either way the front asks the broker where each waiting job is; one it
//! does not know (and that no worker said it started) can never run, so its
//! client is answered 503 with Retry-After, instead of waiting for the
//! reply timeout: at once after a stall, and [`LOST_DATA_GRACE`] after
//! Redis lost its data, which lost the started notices and replies still
//! on their way too. Workers announce again the jobs that ran meanwhile
//! (`redis2http::lost_data`), so that a request that ran is not told to
//! try again.

use thr_broker::{Beat, Broker, BrokerError, FRONT_TIMEOUT, JobState, LOST_DATA_GRACE};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::replies::{Answer, ReplyRouter};

/// Watches the beats on `beats` and audits when one says so, until `stop`.
pub async fn run<B: Broker>(
    broker: &B,
    router: &ReplyRouter,
    mut beats: mpsc::Receiver<Beat>,
    mut stop: watch::Receiver<bool>,
) {
    let mut generation: Option<String> = None;
    // An audit that failed is owed until one succeeds.
    let mut owed = false;
    // After a data loss, no audit before the workers had time to announce
    // their running jobs again.
    let mut not_before = Instant::now();
    loop {
        let beat = tokio::select! {
            beat = beats.recv() => match beat {
                Some(beat) => beat,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let lost_data = generation.as_ref().is_some_and(|g| *g != beat.generation);
        let silent = beat.since_last.is_some_and(|s| s > FRONT_TIMEOUT);
        generation = Some(beat.generation);
        if lost_data || silent {
            tracing::warn!(
                lost_data,
                silent,
                "auditing waiting requests: their jobs may be gone"
            );
            owed = true;
            if lost_data {
                not_before = Instant::now() + LOST_DATA_GRACE;
            }
        }
        if owed && Instant::now() >= not_before {
            match audit(broker, router).await {
                Ok(0) => owed = false,
                Ok(answered) => {
                    owed = false;
                    tracing::warn!(answered, "answered 503 to requests whose jobs were lost");
                }
                Err(err) => tracing::warn!(%err, "audit failed; trying again at the next beat"),
            }
        }
    }
}

/// Answers the waiting clients whose jobs the broker does not know; returns
/// how many.
pub async fn audit<B: Broker>(broker: &B, router: &ReplyRouter) -> Result<usize, BrokerError> {
    let mut answered = 0;
    for (queue, ids) in router.auditable() {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let states = broker.job_states(&queue, &refs).await?;
        for (id, state) in ids.iter().zip(states) {
            if state == JobState::Unknown && router.answer(id, Answer::Lost) {
                metrics::counter!("thr_jobs_lost_total", "queue" => queue.clone()).increment(1);
                answered += 1;
            }
        }
    }
    Ok(answered)
}
