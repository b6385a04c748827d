//! The claim loop of one queue: keeps up to `max_inflight` jobs running. It
//! claims while it has room; when nothing can run it waits on the queue's
//! doorbell (or until a rate quota allows, or a one-second fallback poll),
//! offering meanwhile to take a lone new job that an enqueue then leases
//! to it directly, and claims when the doorbell rings
//! ([`Broker::wait_and_claim`]); when Redis fails it backs off with jitter
//! and tries again, forever.
//!
//! A claim whose answer was lost (a timeout) may still have leased jobs in
//! Redis. So the loop asks again with the same claim token and the same
//! free slots until it gets an answer: Redis then returns what the first
//! call leased, and no lease is stranded on a worker that never saw its job.
//! A claim that failed outright after an offer is asked again the same
//! way, since the offer may stand.
//! A loop that stops while it waits on the doorbell settles the token the
//! same way (a claim for no job): it withdraws its offer, and a job handed
//! to it meanwhile runs here.
//!
//! While every slot is busy with short jobs and a backlog waits, the loop
//! claims one job ahead and holds it in hand: it starts the moment a slot
//! frees, instead of a claim's round trip later (ARCHITECTURE.md decision
//! 30). Only a job that may run again if the worker dies holding it (of the
//! queue's `retry_methods`); when the next job is another, the loop claims
//! it once a slot frees, as before. A held job that finds no slot within
//! [`HOLD`] (or whose worker stops) is put back in its place, as if never
//! claimed.

use std::sync::Arc;
use std::time::Duration;

use thr_broker::{Broker, BrokerError, ClaimOptions, ClaimOutcome, Claimed};
use thr_core::config::QueueConfig;
use thr_daemon::log_every::LogEvery;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;

use crate::queue::QueueRunner;

/// Longest wait on the doorbell before looking at the queue anyway.
const POLL: Duration = Duration::from_secs(1);
/// How often a stopping loop asks again to settle its last claim.
const SETTLE_ATTEMPTS: u32 = 5;
/// Most jobs one claim call starts. Bounds the time one script holds Redis
/// (each start is a walk over flows).
const CLAIM_BATCH: usize = 16;
/// Longest a job claimed ahead waits in hand for a slot (at most a third
/// of its lease, which is not renewed meanwhile) before it is put back. A
/// job is claimed ahead only when slots free about twice as often as this.
pub const HOLD: Duration = Duration::from_secs(1);

/// Claims jobs of `runner`'s queue into its free slots until `stop`.
pub async fn run<B: Broker>(runner: Arc<QueueRunner<B>>, mut stop: watch::Receiver<bool>) {
    // However it ends, the drain that waits for it goes on.
    struct Ended<'a>(&'a watch::Sender<bool>);
    impl Drop for Ended<'_> {
        fn drop(&mut self) {
            self.0.send_replace(true);
        }
    }
    let _ended = Ended(&runner.claim_loop_done);
    let name = runner.name.clone();
    let mut doorbell = runner.broker.doorbell(&name);
    let mut failures = 0u32;
    let failure_log = LogEvery::failures();
    {
        let q = runner.queue.load();
        tracing::info!(queue = %name, backend = %q.backend.display, max_inflight = q.max_inflight.get(), "serving queue");
    }
    // A claim to ask again (its answer was lost, or an offer made under
    // its token may stand), with the slots it was for (none: a claim
    // ahead), and whether an offer was made under its token.
    let mut retry: Option<(String, Vec<OwnedSemaphorePermit>, bool)> = None;
    // Set when nothing could start: wait this long on the doorbell first.
    let mut wait: Option<Duration> = None;
    // Set when the last claim filled every slot with short jobs: claim one
    // job ahead of the next free slot.
    let mut ahead = false;
    // A job claimed ahead, and when.
    let mut held: Option<(Claimed, Instant)> = None;
    // Until when not to claim ahead: the last claim ahead met a job it may
    // not hold. Under a backlog of such jobs (POSTs), claiming ahead after
    // every claim would cost Redis a claim call per job for nothing.
    let mut unheld_until: Option<Instant> = None;
    loop {
        if let Some((claimed, at)) = held.take() {
            let limit = HOLD.min(runner.queue.load().lease / 3);
            tokio::select! {
                permit = runner.room.clone().acquire_owned() => {
                    let permit = permit.expect("semaphore never closed");
                    let waited = at.elapsed();
                    if claimed.remaining <= waited || waited >= limit {
                        // Its client has given up (it is dropped), or it
                        // was held past the limit: this process was
                        // stopped or starved, its unrenewed lease may have
                        // run out and the job run elsewhere. It goes back;
                        // Redis knows whether it is still this worker's.
                        put_back(&runner, claimed).await;
                        drop(permit);
                    } else {
                        metrics::counter!("thr_jobs_held_total", "queue" => name.clone()).increment(1);
                        let lease = claimed.lease.clone();
                        runner.spawn_job(lease, crate::job::run(runner.clone(), claimed, permit));
                        ahead = may_hold(&runner, unheld_until);
                    }
                }
                _ = tokio::time::sleep_until(at + limit) => {
                    // Slots stay busy longer than jobs lately took: another
                    // worker may run it sooner, and a more urgent job may
                    // come; it goes back in its place.
                    put_back(&runner, claimed).await;
                    ahead = false;
                }
                _ = stop.changed() => {
                    put_back(&runner, claimed).await;
                    break;
                }
            }
            continue;
        }
        // A token never sent yet (not one to ask again) has nothing to settle.
        let sent = retry.is_some();
        let (token, mut permits, mut offered) = match retry.take() {
            Some(again) => again,
            None => {
                // Every free slot at once: one claim fills them all when a
                // backlog waits, instead of one round trip per job.
                let mut permits = Vec::new();
                fill(&runner, &mut permits);
                if permits.is_empty() && !ahead {
                    let permit = tokio::select! {
                        permit = runner.room.clone().acquire_owned() => permit.expect("semaphore never closed"),
                        _ = stop.changed() => break,
                    };
                    permits.push(permit);
                    fill(&runner, &mut permits);
                }
                (uuid::Uuid::new_v4().simple().to_string(), permits, false)
            }
        };
        if *stop.borrow() {
            if sent {
                settle_last_claim(&runner, &token, permits).await;
            }
            break;
        }
        // No free slot: a claim for one job ahead.
        let for_ahead = permits.is_empty();
        let q = runner.queue.load_full();
        let mut options = claim_options(&runner, &q, &token, permits.len().max(1));
        options.ahead = for_ahead;
        let outcome = match wait.take() {
            Some(max) if !for_ahead => tokio::select! {
                // The offer goes first: from here on, it may stand until
                // a claim under this token withdraws it.
                outcome = async {
                    offered = true;
                    runner.broker.wait_and_claim(&mut doorbell, &name, max, options).await
                } => outcome,
                _ = stop.changed() => {
                    // Closing the doorbell's connection ends the pop;
                    // settling the token withdraws the offer and returns a
                    // job an enqueue handed to it meanwhile (it runs here).
                    drop(doorbell);
                    settle_last_claim(&runner, &token, permits).await;
                    break;
                }
            },
            _ => runner.broker.claim(&name, options).await,
        };
        match outcome {
            Ok(ClaimOutcome::Jobs(claimed)) if for_ahead => {
                failures = 0;
                ahead = false;
                let mut claimed = claimed.into_iter();
                held = claimed.next().map(|c| (c, Instant::now()));
                for extra in claimed {
                    tracing::error!(queue = %name, job = %extra.id(), "claimed more jobs than asked; putting one back");
                    put_back(&runner, extra).await;
                }
            }
            Ok(ClaimOutcome::Jobs(claimed)) => {
                failures = 0;
                // Fewer jobs than free slots: nothing more can start now
                // (the queue is empty, or what waits is blocked), so the
                // loop waits on the doorbell instead of claiming again at
                // once. Whatever could unblock a job rings it. So too after
                // a handed job, which came only because nothing else
                // waited: with one free slot, claiming when the next slot
                // frees would find nothing but the jobs that rang meanwhile
                // (the doorbell's pop returns at once for them), and cost
                // Redis an empty claim per job.
                let all_taken = claimed.len() >= permits.len() && !claimed.iter().any(|c| c.handed);
                for claimed in claimed {
                    let Some(permit) = permits.pop() else {
                        // A broker never starts more than asked; if one
                        // did, another worker gets the job at once.
                        tracing::error!(queue = %name, job = %claimed.id(), "claimed more jobs than free slots; putting one back");
                        put_back(&runner, claimed).await;
                        continue;
                    };
                    let lease = claimed.lease.clone();
                    runner.spawn_job(lease, crate::job::run(runner.clone(), claimed, permit));
                }
                // The jobs just spawned run first, until they first wait
                // (on a kept-alive backend connection, their request is
                // written by then); the loop's next call to Redis (an
                // offer, a claim) follows. Otherwise an idle system's
                // request waited for that call to be built and written
                // before its backend call (`perf sched`: 105 µs from the
                // worker's wake to the backend write, 40 of them the
                // offer).
                tokio::task::yield_now().await;
                if all_taken {
                    ahead = may_hold(&runner, unheld_until);
                } else {
                    wait = Some(POLL);
                }
            }
            Ok(ClaimOutcome::Unheld) => {
                // The next job may not run again if this worker dies while
                // holding it (not of `retry_methods`): it starts when a
                // slot frees, claimed then, without a wait on the doorbell.
                failures = 0;
                ahead = false;
                unheld_until = Some(Instant::now() + HOLD);
            }
            Ok(ClaimOutcome::Idle { retry_in }) => {
                failures = 0;
                ahead = false;
                // A rate quota frees up on its own schedule, without a doorbell.
                wait = Some(retry_in.map_or(POLL, |r| r.clamp(Duration::from_millis(1), POLL)));
            }
            Err(err) => {
                failures += 1;
                metrics::counter!("thr_redis_errors_total", "daemon" => "redis2http").increment(1);
                // A claim that surely did not run goes again under its
                // token too when an offer was made under it (`wait_and_claim`:
                // offer, pop, then claim): only a claim under that token
                // withdraws it. Left there, it is the offer of a live worker
                // that no pop takes from: an enqueue would lease it a job
                // that runs only once its lease ran out (seen after Redis
                // refused writes for a second, out of memory: the next GET
                // got 504 at reply_timeout). Not for an answer thr cannot
                // read: asked again, Redis would give the same.
                let unreadable = matches!(err, BrokerError::Protocol(_));
                let again = err.outcome_unknown() || (offered && !unreadable);
                // Redis down: one line per 10 s, not one per attempt.
                match failure_log.admit() {
                    Some(unlogged) => {
                        tracing::warn!(queue = %name, %err, unlogged, again, "claim failed (again: asked again with the same token)")
                    }
                    None => tracing::debug!(queue = %name, %err, again, "claim failed"),
                }
                if again {
                    retry = Some((token, permits, offered));
                } else {
                    drop(permits);
                    ahead = false;
                }
                let pause = runner.broker.recovery().pause(failures);
                if pause_or_stop(pause, &mut stop).await {
                    if let Some((token, permits, _)) = retry.take() {
                        // Stopping: one last try, so that leased jobs run here.
                        settle_last_claim(&runner, &token, permits).await;
                    }
                    break;
                }
            }
        }
    }
}

/// Adds free slots to `permits`, up to [`CLAIM_BATCH`] in all.
fn fill<B: Broker>(runner: &QueueRunner<B>, permits: &mut Vec<OwnedSemaphorePermit>) {
    while permits.len() < CLAIM_BATCH {
        match runner.room.clone().try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
}

/// Whether to claim a job ahead while every slot is busy: when a slot
/// frees, on average, within half of [`HOLD`] (jobs are short, so the held
/// job starts soon and a claim's round trip between two jobs is worth
/// saving), and no `max_inflight_total` caps the queue (a held job counts
/// as running there, and would keep another worker's free slot idle).
fn worth_holding<B: Broker>(runner: &QueueRunner<B>) -> bool {
    let q = runner.queue.load();
    if q.max_inflight_total.is_some() {
        return false;
    }
    let slots = q.max_inflight.get() as u32;
    let limit = HOLD.min(q.lease / 3) / 2;
    runner
        .slot_times
        .average()
        .is_some_and(|took| took / slots.max(1) <= limit)
}

/// Whether to claim a job ahead now: [`worth_holding`], and not within
/// [`HOLD`] of a claim ahead that met a job it may not hold (`unheld_until`).
fn may_hold<B: Broker>(runner: &QueueRunner<B>, unheld_until: Option<Instant>) -> bool {
    unheld_until.is_none_or(|until| Instant::now() >= until) && worth_holding(runner)
}

/// Gives back a job that was claimed but never started.
async fn put_back<B: Broker>(runner: &QueueRunner<B>, claimed: Claimed) {
    metrics::counter!("thr_jobs_put_back_total", "queue" => runner.name.clone()).increment(1);
    for attempt in 1..=SETTLE_ATTEMPTS {
        match runner.broker.put_back(&claimed.lease).await {
            Ok(_) => return,
            Err(err) if attempt < SETTLE_ATTEMPTS => {
                tracing::warn!(queue = %runner.name, job = %claimed.id(), %err, attempt, "could not put a job back; asking again");
                runner.broker.recovery().pause(attempt).await;
            }
            Err(err) => {
                tracing::warn!(queue = %runner.name, job = %claimed.id(), %err, "could not put a job back; it returns when its lease runs out");
            }
        }
    }
}

/// A stopping loop whose last claim went unanswered (or still waits behind
/// the doorbell) settles its token: a claim for no job, which returns what
/// the first call leased, if anything, and makes sure it leases nothing
/// later. What it returns runs here (the drain waits for it as for any job).
async fn settle_last_claim<B: Broker>(
    runner: &Arc<QueueRunner<B>>,
    token: &str,
    mut permits: Vec<OwnedSemaphorePermit>,
) {
    let q = runner.queue.load_full();
    let options = claim_options(runner, &q, token, 0);
    // Asked again while it fails or its answer is lost (an offer may stand
    // under the token, see the loop), a few times: the drain that follows
    // is bounded by the shutdown grace anyway.
    let mut answer = runner.broker.claim(&runner.name, options).await;
    for attempt in 1..=SETTLE_ATTEMPTS {
        match &answer {
            Err(err) => {
                tracing::warn!(queue = %runner.name, %err, attempt, "settling the last claim: failed or unanswered; asking again");
                runner.broker.recovery().pause(attempt).await;
                answer = runner.broker.claim(&runner.name, options).await;
            }
            _ => break,
        }
    }
    if let Err(err) = &answer {
        tracing::warn!(queue = %runner.name, %err, "could not settle the last claim; its jobs, if any, return when their lease runs out");
        // The offer made under the token may stand, with this worker still
        // beating while it drains: no enqueue may hand it a job. A Redis
        // out of memory still takes a plain delete.
        if let Err(err) = runner.broker.withdraw_offer(&runner.name, token).await {
            tracing::warn!(queue = %runner.name, %err, "could not withdraw the offer either");
        }
    }
    if let Ok(ClaimOutcome::Jobs(claimed)) = answer {
        for claimed in claimed {
            match permits.pop() {
                Some(permit) => {
                    let lease = claimed.lease.clone();
                    runner.spawn_job(lease, crate::job::run(runner.clone(), claimed, permit));
                }
                None => put_back(runner, claimed).await,
            }
        }
    }
}

/// How `runner` claims under `token`, for at most `max_jobs` jobs, with
/// `q` (the queue's current configuration).
fn claim_options<'a, B: Broker>(
    runner: &'a QueueRunner<B>,
    q: &'a QueueConfig,
    token: &'a str,
    max_jobs: usize,
) -> ClaimOptions<'a> {
    ClaimOptions {
        token,
        lease: q.lease,
        max_inflight_total: q.max_inflight_total,
        max_wait_boost: runner.scheduling.load().max_wait_boost,
        worker: &runner.worker_id,
        max_jobs,
        retry_methods: &q.retry_methods,
        ahead: false,
    }
}

/// Sleeps for `d`; true when asked to stop meanwhile.
pub(crate) async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    pause_or_stop(tokio::time::sleep(d), stop).await
}

/// Waits for `pause`; true when asked to stop meanwhile.
async fn pause_or_stop(pause: impl Future<Output = ()>, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = pause => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
