//! The Broker conformance suite: the contract of [`Broker`] written as
//! scenarios (ARCHITECTURE.md decision 15).
//!
//! The trait's doc comments say what a broker promises; this module is the
//! same promises as code, and it is the contract: where the two disagree,
//! one of them is wrong and is fixed. Each scenario drives one part of it
//! (priority order, fairness between flows, quotas, admission limits,
//! withdrawal, deadlines, idempotent calls, leases and the reaper, dead
//! fronts and workers, heartbeats, gauges, the doorbell, the reply stream)
//! through nothing but the [`Broker`] trait, and panics when the broker
//! breaks it. It names no Redis type: every implementation — the Redis
//! broker, an in-memory one for single-box setups — passes the same suite.
//!
//! # Running an implementation through it
//!
//! Every scenario expects a **fresh, empty broker** of its own (scenarios
//! reuse queue, front and job names). Either iterate [`all`]:
//!
//! ```ignore
//! for scenario in thr_broker::conformance::all::<MyBroker>() {
//!     println!("scenario {}", scenario.name);
//!     (scenario.run)(MyBroker::new_empty()).await;
//! }
//! ```
//!
//! or give each scenario its own test (what `tests/e2e/conformance.rs` does
//! for [`RedisBroker`](crate::RedisBroker), one `redis-server` each), calling
//! the scenario's function by name, and check with [`NAMES`] that no
//! scenario was left out. Time passes in `tokio::time::sleep` (leases and
//! deadlines must run out, heartbeats go silent): a broker on tokio's clock
//! may run the suite under paused time; one on a real clock (Redis's) waits
//! for real — most scenarios take well under a second, the silent worker's
//! about seven. Margins are generous (a lease of 200 ms is checked 700 ms
//! later), so no scenario depends on tight timing.
//!
//! Not covered: pausing a queue (an admin action, not the trait's; the
//! Redis tests check it), aging (`max_wait_boost`), and anything about a
//! broker's storage. Implementation-specific checks live with the
//! implementation's tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use thr_core::envelope::{FrontMessage, Piece, Reply, ReplyMeta, WINDOW};
use thr_core::quota::{Flow, QuotaKey};
use tokio::time::{Instant, sleep};

use crate::{
    Admission, Announced, Beat, Broker, ClaimOptions, ClaimOutcome, Claimed, Daemon, Delivery,
    Doorbell, Gauges, JobState, Lease, NewJob, Pushed, Reaped, ReplyStream, RetryPolicy,
    Withdrawal,
};

/// A running scenario.
pub type ScenarioFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// One scenario of the contract, runnable against a fresh broker.
pub struct Scenario<B> {
    /// The scenario's name (its function's name in this module).
    pub name: &'static str,
    /// Runs it on the broker it is given (fresh and empty); panics when
    /// the broker breaks the contract.
    pub run: fn(B) -> ScenarioFuture,
}

impl<B> std::fmt::Debug for Scenario<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scenario")
            .field("name", &self.name)
            .finish()
    }
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        /// The name of every scenario, in the order of [`all`].
        pub const NAMES: &[&str] = &[$(stringify!($name)),*];

        /// Every scenario.
        pub fn all<B: Broker>() -> Vec<Scenario<B>> {
            vec![$(Scenario {
                name: stringify!($name),
                run: |broker: B| -> ScenarioFuture {
                    Box::pin(async move { $name(&broker).await })
                },
            }),*]
        }
    };
}

scenarios![
    priority_order,
    fifo_within_a_priority,
    claim_batches_keep_dispatch_order,
    a_claim_of_many_starts_what_single_claims_would,
    flows_of_a_priority_take_turns,
    concurrency_quota_blocks_only_its_flow,
    quota_keys_are_shared_across_flows_and_queues,
    rate_quota_allows_a_burst_then_says_when,
    queue_max_waiting_refuses,
    concurrent_enqueues_respect_max_waiting,
    quota_max_waiting_refuses,
    max_inflight_total_caps_running_jobs,
    a_lone_job_held_by_max_inflight_total_is_rung_for,
    withdraw_waiting_job,
    withdraw_running_job,
    withdraw_unknown_id_leaves_a_tombstone,
    enqueue_is_idempotent_by_id,
    expired_jobs_are_never_claimed,
    repeated_claim_token_returns_the_same_jobs,
    a_claim_token_leases_once,
    wait_and_claim_takes_a_job_announced_meanwhile,
    a_settled_wait_and_claim_leases_nothing,
    an_idle_workers_wait_is_handed_a_lone_job,
    a_retired_workers_offer_takes_nothing,
    renew_keeps_lease_and_quota_slots,
    reply_is_delivered_once,
    concurrent_replies_are_each_delivered_once,
    reply_after_reap_is_lost,
    hand_back_then_reap,
    lease_handed_back_is_no_longer_the_jobs,
    a_put_back_job_waits_again_in_its_place,
    a_claim_ahead_holds_only_a_job_that_may_run_again,
    a_put_back_job_gives_back_its_rate_slot,
    expired_lease_is_requeued_in_place,
    expired_lease_never_overruns_its_quota,
    reap_frees_quota_slots,
    max_attempts_dead_letters,
    dead_letter_answers_and_settles,
    silent_worker_is_reaped,
    dead_front_jobs_are_dropped,
    a_fronts_fresh_job_shows_it_alive,
    a_lone_job_is_withdrawn_or_dropped_like_any,
    started_notice_precedes_reply,
    started_again_reaches_each_front,
    job_states_report_each_state,
    heartbeat_generation_is_stable,
    gauges_count_waiting_jobs_and_quota_waits,
    queues_are_independent,
    doorbell_rings_on_enqueue,
    doorbell_rings_on_release_only_when_jobs_wait,
    a_claim_stopped_by_a_rate_quota_leaves_a_ring,
    stream_head_then_pieces_in_order,
    stream_window_bounds_waiting_pieces,
    repeated_pushes_and_reads_are_idempotent,
    cancelled_stream_stops_its_worker,
    lost_streaming_worker_aborts_its_stream,
    upload_chunks_are_stored_once_in_order,
];

// ---- fixtures ---------------------------------------------------------------

/// The queue every scenario uses.
pub const QUEUE: &str = "conformance";
/// The front that waits for the scenarios' jobs.
pub const FRONT: &str = "front-1";
/// The worker that claims them.
pub const WORKER: &str = "worker-1";

/// A client's wait, and a worker's lease, long enough for any scenario.
const LONG: Duration = Duration::from_secs(30);
/// A lease meant to run out during a scenario.
const SHORT_LEASE: Duration = Duration::from_millis(200);
/// Comfortably past [`SHORT_LEASE`].
const PAST_SHORT_LEASE: Duration = Duration::from_millis(700);

/// The payload of job `id` (opaque to a broker).
fn frame(id: &str) -> Bytes {
    Bytes::from(format!("conformance job {id}"))
}

/// A GET job of [`QUEUE`] for [`FRONT`], waited for [`LONG`].
fn job<'a>(id: &'a str, priority: u8, flow: &'a Flow) -> NewJob<'a> {
    NewJob {
        queue: QUEUE,
        id,
        priority,
        frame: frame(id),
        timeout: LONG,
        flow,
        max_waiting: None,
        max_wait_boost: None,
        front: FRONT,
        method: "GET",
    }
}

/// Quota key `tenant=NAME` with no limit (set the limits with `..`).
fn tenant(name: &str) -> QuotaKey {
    QuotaKey {
        token: format!("tenant={name}"),
        max_concurrent: 0,
        interval_ms: 0.0,
        burst: 0,
        max_waiting: 0,
    }
}

fn flow_of(quotas: Vec<QuotaKey>) -> Flow {
    Flow { quotas }
}

fn no_quota() -> Flow {
    Flow::default()
}

async fn enqueue<B: Broker>(b: &B, job: NewJob<'_>) -> Admission {
    let id = job.id.to_string();
    b.enqueue(job)
        .await
        .unwrap_or_else(|e| panic!("enqueue {id}: {e}"))
}

/// Enqueues and insists that the job was queued.
async fn queued<B: Broker>(b: &B, job: NewJob<'_>) {
    let id = job.id.to_string();
    assert_eq!(enqueue(b, job).await, Admission::Queued, "enqueue {id}");
}

/// A claim token never used before (in this process).
fn new_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("claim-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The methods a worker runs again when their worker is lost (the
/// configuration's default `retry_methods`).
fn retry_methods() -> &'static [String] {
    static METHODS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    METHODS.get_or_init(|| ["GET", "HEAD", "OPTIONS"].map(String::from).to_vec())
}

/// Claim options for [`WORKER`] with a [`LONG`] lease, one job.
fn options(token: &str) -> ClaimOptions<'_> {
    ClaimOptions {
        token,
        lease: LONG,
        max_inflight_total: None,
        max_wait_boost: None,
        worker: WORKER,
        max_jobs: 1,
        retry_methods: retry_methods(),
        ahead: false,
    }
}

async fn claim_with<B: Broker>(b: &B, options: ClaimOptions<'_>) -> ClaimOutcome {
    b.claim(QUEUE, options)
        .await
        .unwrap_or_else(|e| panic!("claim: {e}"))
}

fn jobs_of(outcome: ClaimOutcome) -> Vec<Claimed> {
    match outcome {
        ClaimOutcome::Jobs(jobs) => {
            assert!(!jobs.is_empty(), "ClaimOutcome::Jobs must hold a job");
            jobs
        }
        ClaimOutcome::Idle { .. } => Vec::new(),
        ClaimOutcome::Unheld => panic!("only a claim ahead answers Unheld"),
    }
}

/// Claims up to `max_jobs` under a new token with lease `lease`.
async fn take<B: Broker>(b: &B, max_jobs: usize, lease: Duration) -> Vec<Claimed> {
    let token = new_token();
    let jobs = jobs_of(
        claim_with(
            b,
            ClaimOptions {
                max_jobs,
                lease,
                ..options(&token)
            },
        )
        .await,
    );
    assert!(
        jobs.len() <= max_jobs.max(1),
        "asked for {max_jobs} jobs, got {:?}",
        ids(&jobs)
    );
    jobs
}

/// Claims exactly one job, which must be `id`.
async fn take_one<B: Broker>(b: &B, id: &str) -> Claimed {
    let mut jobs = take(b, 1, LONG).await;
    assert_eq!(ids(&jobs), [id], "the next job claimed");
    jobs.remove(0)
}

/// Claim options for up to 4 jobs under `token`, with at most `total` jobs
/// of the queue running at once.
fn capped_at(total: u32, token: &str) -> ClaimOptions<'_> {
    ClaimOptions {
        max_jobs: 4,
        max_inflight_total: Some(total),
        ..options(token)
    }
}

/// Claims with a new token and insists that nothing is started; returns
/// the claim's `retry_in`.
async fn idle<B: Broker>(b: &B, why: &str) -> Option<Duration> {
    let token = new_token();
    match claim_with(
        b,
        ClaimOptions {
            max_jobs: 8,
            ..options(&token)
        },
    )
    .await
    {
        ClaimOutcome::Idle { retry_in } => retry_in,
        ClaimOutcome::Jobs(jobs) => panic!("{why}: nothing may be claimed, got {:?}", ids(&jobs)),
        ClaimOutcome::Unheld => panic!("{why}: only a claim ahead answers Unheld"),
    }
}

fn ids(jobs: &[Claimed]) -> Vec<String> {
    jobs.iter().map(|j| j.id().to_string()).collect()
}

/// A 200 reply frame for job `id`.
fn ok_reply(id: &str) -> Bytes {
    Reply::plain(id, 200, "done\n", WORKER, &[])
}

async fn reply<B: Broker>(b: &B, lease: &Lease) -> Delivery {
    b.reply(lease, ok_reply(&lease.id), 5)
        .await
        .unwrap_or_else(|e| panic!("reply {}: {e}", lease.id))
}

async fn renew<B: Broker>(b: &B, lease: &Lease, duration: Duration) -> bool {
    b.renew(lease, duration)
        .await
        .unwrap_or_else(|e| panic!("renew {}: {e}", lease.id))
}

async fn states<B: Broker>(b: &B, ids: &[&str]) -> Vec<JobState> {
    b.job_states(QUEUE, ids)
        .await
        .unwrap_or_else(|e| panic!("job_states {ids:?}: {e}"))
}

async fn withdraw<B: Broker>(b: &B, id: &str) -> Withdrawal {
    b.withdraw(QUEUE, id, LONG)
        .await
        .unwrap_or_else(|e| panic!("withdraw {id}: {e}"))
}

async fn gauges<B: Broker>(b: &B) -> Gauges {
    b.gauges(QUEUE)
        .await
        .unwrap_or_else(|e| panic!("gauges: {e}"))
}

/// Reaps as a live worker does: it beats, and so does the front.
async fn reap<B: Broker>(b: &B, policy: &RetryPolicy) -> Reaped {
    beat(b).await;
    b.reap(QUEUE, policy)
        .await
        .unwrap_or_else(|e| panic!("reap: {e}"))
}

/// Says that front `id` is alive; what the broker answers.
async fn beat_front<B: Broker>(b: &B, id: &str) -> Beat {
    b.heartbeat(Daemon::Front, id, "{}")
        .await
        .unwrap_or_else(|e| panic!("heartbeat {id}: {e}"))
}

/// `job`, waited for by front `front`.
fn of_front<'a>(job: NewJob<'a>, front: &'a str) -> NewJob<'a> {
    NewJob { front, ..job }
}

/// Says that [`WORKER`] and [`FRONT`] are alive, as running daemons do.
async fn beat<B: Broker>(b: &B) {
    for (kind, id) in [(Daemon::Worker, WORKER), (Daemon::Front, FRONT)] {
        b.heartbeat(kind, id, "{}")
            .await
            .unwrap_or_else(|e| panic!("heartbeat {id}: {e}"));
    }
}

/// Lets `time` pass while [`WORKER`] and [`FRONT`] keep beating, as live
/// daemons do. A broker may judge leases and silences only while someone
/// beats (when nobody does, it may be the broker that was stalled), so a
/// scenario that waits for a lease to run out keeps its daemons alive.
async fn pass<B: Broker>(b: &B, time: Duration) {
    let until = Instant::now() + time;
    loop {
        beat(b).await;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        sleep(left.min(Duration::from_millis(100))).await;
    }
}

/// Beats every 100 ms until `time` has passed with no stall between two
/// beats. A broker may take a stall of its only beating daemon for a
/// stalled broker and count everyone's silence again from its end (so that
/// a paused Redis never makes live daemons look dead); on a loaded machine
/// this process can stall that long, so a stall starts the wait again.
async fn beat_without_a_stall<F, Fut>(time: Duration, mut beat: F)
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    /// Well under any liveness gap a broker may use (Redis: 600 ms).
    const STALL: Duration = Duration::from_millis(400);
    let mut previous = Instant::now();
    beat().await;
    let mut since = Instant::now();
    loop {
        sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        beat().await;
        // From the start of the previous beat to the end of this one
        // bounds the gap the broker saw between them.
        if previous.elapsed() > STALL {
            since = Instant::now();
        }
        previous = started;
        if since.elapsed() >= time {
            return;
        }
    }
}

/// GET, HEAD and OPTIONS run again, up to `max_attempts` runs.
fn retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        methods: vec!["GET".into(), "HEAD".into(), "OPTIONS".into()],
        max_attempts,
    }
}

/// One message of a front's stream, in a form easy to compare:
/// `reply ID STATUS` or `started ID`.
fn describe(frame: Bytes) -> String {
    match FrontMessage::decode(frame) {
        Ok(FrontMessage::Reply(r)) if r.meta.stream => {
            format!("head {} {}", r.meta.id, r.meta.status)
        }
        Ok(FrontMessage::Reply(r)) => format!("reply {} {}", r.meta.id, r.meta.status),
        Ok(FrontMessage::Started(s)) => format!("started {}", s.id),
        Ok(FrontMessage::Data(d)) => format!("data {}", d.id),
        Err(e) => format!("undecodable frame: {e}"),
    }
}

/// Reads a front's stream until `expect` messages came (or 5 s passed),
/// then a little longer: a message beyond `expect` (a duplicate) shows.
async fn front_messages<R: ReplyStream>(replies: &mut R, expect: usize) -> Vec<String> {
    let mut out = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(5);
    while out.len() < expect && Instant::now() < give_up {
        let batch = replies
            .next_batch(Duration::from_millis(250))
            .await
            .unwrap_or_else(|e| panic!("replies: {e}"));
        out.extend(batch.into_iter().map(describe));
    }
    let more = replies
        .next_batch(Duration::from_millis(300))
        .await
        .unwrap_or_else(|e| panic!("replies: {e}"));
    out.extend(more.into_iter().map(describe));
    out
}

// ---- ordering -----------------------------------------------------------------

/// Jobs are claimed most urgent first (priority 1 … 99), whatever their
/// flows; FIFO among equals.
pub async fn priority_order<B: Broker>(b: &B) {
    let free = no_quota();
    let a = flow_of(vec![tenant("a")]);
    let c = flow_of(vec![tenant("c")]);
    queued(b, job("p50", 50, &free)).await;
    queued(b, job("p10-a", 10, &a)).await;
    queued(b, job("p90", 90, &free)).await;
    queued(b, job("p1-c", 1, &c)).await;
    queued(b, job("p10", 10, &free)).await;
    queued(b, job("p99", 99, &free)).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        let jobs = take(b, 1, LONG).await;
        assert_eq!(jobs.len(), 1, "six jobs wait; claimed so far: {order:?}");
        order.push(jobs[0].id().to_string());
    }
    assert_eq!(order, ["p1-c", "p10-a", "p10", "p50", "p90", "p99"]);
    assert_eq!(idle(b, "every job was claimed").await, None);
}

/// Jobs of one priority are claimed in the order they were enqueued, and a
/// claimed job carries its payload, queue, front and remaining time.
pub async fn fifo_within_a_priority<B: Broker>(b: &B) {
    let free = no_quota();
    let names = ["f1", "f2", "f3", "f4", "f5"];
    for id in names {
        queued(b, job(id, 50, &free)).await;
    }
    for id in names {
        let c = take_one(b, id).await;
        assert_eq!(c.frame, frame(id), "{id}: the payload as enqueued");
        assert_eq!(c.lease.queue, QUEUE);
        assert_eq!(c.lease.id, id);
        assert_eq!(c.lease.front, FRONT);
        assert!(c.lease.holds.is_empty(), "{id} holds no quota slot");
        assert!(
            c.remaining <= LONG && c.remaining > LONG - Duration::from_secs(10),
            "{id}: remaining {:?} for a client waiting {LONG:?}",
            c.remaining
        );
    }
}

/// One claim may start several jobs (`max_jobs`), in dispatch order, and
/// never more than asked.
pub async fn claim_batches_keep_dispatch_order<B: Broker>(b: &B) {
    let free = no_quota();
    for id in ["b1", "b2", "b3", "b4", "b5"] {
        queued(b, job(id, 50, &free)).await;
    }
    queued(b, job("urgent", 5, &free)).await;
    assert_eq!(ids(&take(b, 3, LONG).await), ["urgent", "b1", "b2"]);
    assert_eq!(ids(&take(b, 10, LONG).await), ["b3", "b4", "b5"]);
    assert_eq!(idle(b, "every job was claimed").await, None);
}

/// A claim of many jobs starts them in the order that claims of one job
/// each would, across flows of several priorities and lengths: with a few
/// flows, and with more than a claim reads at once.
pub async fn a_claim_of_many_starts_what_single_claims_would<B: Broker>(b: &B) {
    const PRIORITIES: [u8; 5] = [30, 80, 10, 50, 60];
    for flows in [12usize, 60] {
        let tenants: Vec<Flow> = (0..flows)
            .map(|f| flow_of(vec![tenant(&format!("t{f}"))]))
            .collect();
        let mut orders = Vec::new();
        for (round, per_claim) in [(0, 1), (1, 7)] {
            // Flow f holds f % 3 + 1 jobs; the rounds differ only in ids.
            let mut total = 0;
            for j in 0..3 {
                for (f, flow) in tenants.iter().enumerate().filter(|(f, _)| j <= f % 3) {
                    let id = format!("n{flows}-r{round}-f{f}-j{j}");
                    queued(b, job(&id, PRIORITIES[(f + 2 * j) % 5], flow)).await;
                    total += 1;
                }
            }
            let mut order = Vec::new();
            let prefix = format!("n{flows}-r{round}-");
            while order.len() < total {
                let jobs = take(b, per_claim, LONG).await;
                assert!(!jobs.is_empty(), "{total} jobs queued, claimed {order:?}");
                order.extend(
                    jobs.iter()
                        .map(|c| c.id().trim_start_matches(&prefix).to_string()),
                );
            }
            assert_eq!(idle(b, "every job was claimed").await, None);
            orders.push(order);
        }
        assert_eq!(
            orders[0], orders[1],
            "{flows} flows: claims of 7 jobs against claims of one"
        );
    }
}

/// Flows (tenants) of one priority are served round-robin: a tenant that
/// queued first does not get all its jobs run before the others'.
pub async fn flows_of_a_priority_take_turns<B: Broker>(b: &B) {
    let a = flow_of(vec![tenant("a")]);
    let bb = flow_of(vec![tenant("b")]);
    let c = flow_of(vec![tenant("c")]);
    for id in ["a1", "a2", "a3"] {
        queued(b, job(id, 50, &a)).await;
    }
    for id in ["b1", "b2", "b3"] {
        queued(b, job(id, 50, &bb)).await;
    }
    queued(b, job("c1", 50, &c)).await;
    let mut order = Vec::new();
    for _ in 0..7 {
        let jobs = take(b, 1, LONG).await;
        assert_eq!(jobs.len(), 1, "seven jobs wait; claimed so far: {order:?}");
        order.push(jobs[0].id().to_string());
    }
    assert_eq!(order, ["a1", "b1", "c1", "a2", "b2", "a3", "b3"]);
    // The same turns within one claim of many jobs.
    for id in ["a4", "a5"] {
        queued(b, job(id, 50, &a)).await;
    }
    for id in ["b4", "b5"] {
        queued(b, job(id, 50, &bb)).await;
    }
    assert_eq!(ids(&take(b, 4, LONG).await), ["a4", "b4", "a5", "b5"]);
}

// ---- quotas and admission ------------------------------------------------------

/// `max_concurrent = 1`: a key's second job waits until its first is
/// answered, while other keys' jobs run meanwhile (no head-of-line
/// blocking, even when the blocked flow is the most urgent).
pub async fn concurrency_quota_blocks_only_its_flow<B: Broker>(b: &B) {
    let one = |name| QuotaKey {
        max_concurrent: 1,
        ..tenant(name)
    };
    let a = flow_of(vec![one("a")]);
    let other = flow_of(vec![one("b")]);
    queued(b, job("a1", 10, &a)).await;
    queued(b, job("a2", 10, &a)).await;
    queued(b, job("b1", 50, &other)).await;
    let a1 = take_one(b, "a1").await;
    assert_eq!(
        a1.lease.holds,
        ["tenant=a"],
        "a1 holds its concurrency slot"
    );
    // a2 is more urgent than b1 but its key is full: b1 runs meanwhile.
    let b1 = take_one(b, "b1").await;
    assert_eq!(
        idle(b, "a2 waits for a1's slot").await,
        None,
        "a full concurrency quota gives no retry time: the doorbell rings when it frees"
    );
    assert_eq!(reply(b, &a1.lease).await, Delivery::Delivered);
    let a2 = take_one(b, "a2").await;
    assert_eq!(reply(b, &a2.lease).await, Delivery::Delivered);
    assert_eq!(reply(b, &b1.lease).await, Delivery::Delivered);
}

/// A quota belongs to its key, not to a flow or a queue: jobs of other
/// flows and other queues that share the key share its slots.
pub async fn quota_keys_are_shared_across_flows_and_queues<B: Broker>(b: &B) {
    let a = QuotaKey {
        max_concurrent: 1,
        ..tenant("a")
    };
    let only_a = flow_of(vec![a.clone()]);
    let a_and_ip = flow_of(vec![a, tenant("ip")]);
    let other = "conformance-other";
    queued(b, job("s1", 50, &only_a)).await;
    queued(b, job("s2", 50, &a_and_ip)).await;
    queued(
        b,
        NewJob {
            queue: other,
            ..job("s3", 50, &only_a)
        },
    )
    .await;
    let s1 = take_one(b, "s1").await;
    assert_eq!(idle(b, "s2's flow needs tenant=a, held by s1").await, None);
    let t = new_token();
    let got = jobs_of(b.claim(other, options(&t)).await.expect("claim"));
    assert!(
        got.is_empty(),
        "s3 (queue {other}) needs tenant=a, held by s1: got {:?}",
        ids(&got)
    );
    assert_eq!(reply(b, &s1.lease).await, Delivery::Delivered);
    let s2 = take_one(b, "s2").await;
    assert_eq!(s2.lease.holds, ["tenant=a"]);
    assert_eq!(reply(b, &s2.lease).await, Delivery::Delivered);
    let t = new_token();
    let got = jobs_of(b.claim(other, options(&t)).await.expect("claim"));
    assert_eq!(ids(&got), ["s3"]);
}

/// A rate quota lets its burst through at once, then nothing of that key
/// until the rate allows, saying when; other flows are not held up.
pub async fn rate_quota_allows_a_burst_then_says_when<B: Broker>(b: &B) {
    let interval = Duration::from_secs(60);
    let rated = flow_of(vec![QuotaKey {
        interval_ms: interval.as_millis() as f64,
        burst: 2,
        ..tenant("r")
    }]);
    let free = no_quota();
    for id in ["r1", "r2", "r3", "r4"] {
        queued(b, job(id, 10, &rated)).await;
    }
    queued(b, job("free", 50, &free)).await;
    let jobs = take(b, 10, LONG).await;
    assert_eq!(
        ids(&jobs),
        ["r1", "r2", "free"],
        "a burst of 2, then the other flow"
    );
    let retry_in = idle(b, "r3 waits for the rate").await;
    let Some(retry_in) = retry_in else {
        panic!("a rate-limited claim says when to try again (retry_in was None)");
    };
    assert!(
        retry_in > interval / 2 && retry_in <= interval,
        "retry_in {retry_in:?}: the next slot of a 1/min rate is about a minute away"
    );
    // Answering frees no rate: r3 still waits.
    for j in &jobs {
        assert_eq!(reply(b, &j.lease).await, Delivery::Delivered);
    }
    assert!(
        idle(b, "answers do not refill a rate").await.is_some(),
        "still rate-limited, with a retry time"
    );
}

/// The queue's `max_waiting` refuses a job when that many wait; nothing of
/// the refused job is kept, and it is admitted once there is room.
pub async fn queue_max_waiting_refuses<B: Broker>(b: &B) {
    let free = no_quota();
    let capped = |id: &'static str| NewJob {
        max_waiting: Some(2),
        ..job(id, 50, &free)
    };
    queued(b, capped("m1")).await;
    queued(b, capped("m2")).await;
    match enqueue(b, capped("m3")).await {
        Admission::Refused {
            what,
            waiting,
            drain_rate,
        } => {
            assert_eq!(what, "queue");
            assert_eq!(waiting, 2);
            assert!(drain_rate.is_finite() && drain_rate >= 0.0, "{drain_rate}");
        }
        other => panic!("m3 must be refused (2 wait, max 2), got {other:?}"),
    }
    // A repeated enqueue of an admitted job is not a new job: not refused.
    assert_eq!(enqueue(b, capped("m2")).await, Admission::Queued);
    assert_eq!(gauges(b).await.waiting, 2, "the refused job is not queued");
    assert_eq!(states(b, &["m3"]).await, [JobState::Unknown]);
    take_one(b, "m1").await;
    assert_eq!(
        enqueue(b, capped("m3")).await,
        Admission::Queued,
        "refused, not settled: admitted once there is room"
    );
}

/// Jobs enqueued at the same moment (a broker may admit them in one call)
/// are judged one after the other: a full queue refuses exactly those
/// beyond its maximum, and a job sent twice at once is queued once.
pub async fn concurrent_enqueues_respect_max_waiting<B: Broker>(b: &B) {
    let free = no_quota();
    let mut names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    names.push("c0".to_string());
    let admissions = futures_util::future::join_all(names.iter().map(|id| {
        enqueue(
            b,
            NewJob {
                max_waiting: Some(4),
                ..job(id, 50, &free)
            },
        )
    }))
    .await;
    let queued = admissions
        .iter()
        .filter(|a| matches!(a, Admission::Queued))
        .count();
    let refused = admissions
        .iter()
        .filter(|a| matches!(a, Admission::Refused { .. }))
        .count();
    assert!(
        (4..=5).contains(&queued) && queued + refused == names.len(),
        "4 jobs fit (c0's second copy may say queued too): {admissions:?}"
    );
    let started = take(b, 16, LONG).await;
    assert_eq!(
        started.len(),
        4,
        "4 jobs wait, each once: {:?}",
        ids(&started)
    );
}

/// A quota key's `max_waiting` refuses a job when that many of its jobs
/// wait, naming the key; other keys are not affected.
pub async fn quota_max_waiting_refuses<B: Broker>(b: &B) {
    let capped = |name| QuotaKey {
        max_waiting: 2,
        ..tenant(name)
    };
    let a = flow_of(vec![capped("a")]);
    let other = flow_of(vec![capped("b")]);
    queued(b, job("a1", 50, &a)).await;
    queued(b, job("a2", 50, &a)).await;
    match enqueue(b, job("a3", 50, &a)).await {
        Admission::Refused { what, waiting, .. } => {
            assert_eq!(what, "tenant=a");
            assert_eq!(waiting, 2);
        }
        other => panic!("a3 must be refused (2 of tenant=a wait, max 2), got {other:?}"),
    }
    assert_eq!(
        enqueue(b, job("a2", 50, &a)).await,
        Admission::Queued,
        "a repeated enqueue of an admitted job is not refused"
    );
    queued(b, job("b1", 50, &other)).await;
    take_one(b, "a1").await;
    assert_eq!(
        enqueue(b, job("a3", 50, &a)).await,
        Admission::Queued,
        "a claimed job no longer waits: room for a3"
    );
}

/// `max_inflight_total` caps the jobs of a queue running at once, across
/// claims.
pub async fn max_inflight_total_caps_running_jobs<B: Broker>(b: &B) {
    let free = no_quota();
    for id in ["i1", "i2", "i3", "i4"] {
        queued(b, job(id, 50, &free)).await;
    }
    let t1 = new_token();
    let first = jobs_of(claim_with(b, capped_at(2, &t1)).await);
    assert_eq!(ids(&first), ["i1", "i2"], "two may run at once");
    let t2 = new_token();
    let blocked = jobs_of(claim_with(b, capped_at(2, &t2)).await);
    assert!(
        blocked.is_empty(),
        "two run already: got {:?}",
        ids(&blocked)
    );
    assert_eq!(reply(b, &first[0].lease).await, Delivery::Delivered);
    let t3 = new_token();
    let next = jobs_of(claim_with(b, capped_at(2, &t3)).await);
    assert_eq!(ids(&next), ["i3"], "one slot freed");
}

/// A job that finds nothing else waiting, held back by `max_inflight_total`,
/// starts once a running job ends: the release rings the doorbell for it.
pub async fn a_lone_job_held_by_max_inflight_total_is_rung_for<B: Broker>(b: &B) {
    let free = no_quota();
    let mut bell = b.doorbell(QUEUE);
    queued(b, job("m1", 50, &free)).await;
    let t1 = new_token();
    let first = jobs_of(claim_with(b, capped_at(1, &t1)).await);
    assert_eq!(ids(&first), ["m1"]);
    queued(b, job("m2", 50, &free)).await;
    let t2 = new_token();
    let held = jobs_of(claim_with(b, capped_at(1, &t2)).await);
    assert!(
        held.is_empty(),
        "m1 runs, the cap is 1: got {:?}",
        ids(&held)
    );
    drain_doorbell(&mut bell).await;
    assert_eq!(reply(b, &first[0].lease).await, Delivery::Delivered);
    assert!(
        drain_doorbell(&mut bell).await,
        "m2 waits for m1's place: the release rings"
    );
    let t3 = new_token();
    assert_eq!(
        ids(&jobs_of(claim_with(b, capped_at(1, &t3)).await)),
        ["m2"]
    );
}

// ---- withdrawal and idempotence ----------------------------------------------

/// A waiting job withdrawn never runs; its id is settled; the waiting
/// counts drop.
pub async fn withdraw_waiting_job<B: Broker>(b: &B) {
    let a = flow_of(vec![tenant("a")]);
    queued(b, job("w1", 50, &a)).await;
    queued(b, job("w2", 50, &a)).await;
    assert_eq!(withdraw(b, "w1").await, Withdrawal::Withdrawn);
    let g = gauges(b).await;
    assert_eq!(g.waiting, 1, "{g:?}");
    assert_eq!(g.quota_waiting.get("tenant"), Some(&1), "{g:?}");
    assert_eq!(ids(&take(b, 8, LONG).await), ["w2"], "w1 is never claimed");
    assert_eq!(states(b, &["w1"]).await, [JobState::Settled]);
    assert_eq!(enqueue(b, job("w1", 50, &a)).await, Admission::Settled);
    assert_eq!(withdraw(b, "w1").await, Withdrawal::Settled);
    assert_eq!(idle(b, "w1 was withdrawn").await, None);
}

/// A running job cannot be withdrawn: the caller learns it started, and its
/// reply still comes.
pub async fn withdraw_running_job<B: Broker>(b: &B) {
    let free = no_quota();
    queued(b, job("r1", 50, &free)).await;
    let r1 = take_one(b, "r1").await;
    assert_eq!(withdraw(b, "r1").await, Withdrawal::Started);
    assert_eq!(states(b, &["r1"]).await, [JobState::Running]);
    assert!(
        renew(b, &r1.lease, LONG).await,
        "withdraw leaves the lease alone"
    );
    assert_eq!(reply(b, &r1.lease).await, Delivery::Delivered);
    assert_eq!(withdraw(b, "r1").await, Withdrawal::Settled);
}

/// Withdrawing an id the broker does not know (its enqueue may still be on
/// its way) leaves a tombstone: a later enqueue of it is Settled, not run.
pub async fn withdraw_unknown_id_leaves_a_tombstone<B: Broker>(b: &B) {
    let free = no_quota();
    assert_eq!(withdraw(b, "ghost").await, Withdrawal::Withdrawn);
    assert_eq!(states(b, &["ghost"]).await, [JobState::Settled]);
    assert_eq!(
        enqueue(b, job("ghost", 50, &free)).await,
        Admission::Settled
    );
    assert_eq!(gauges(b).await.waiting, 0);
    assert_eq!(idle(b, "the late enqueue was refused").await, None);
    assert_eq!(withdraw(b, "ghost").await, Withdrawal::Settled);
}

/// Enqueueing one id twice (a lost answer asked again) makes one job, run
/// once; once answered, the id is settled.
pub async fn enqueue_is_idempotent_by_id<B: Broker>(b: &B) {
    let free = no_quota();
    queued(b, job("e1", 50, &free)).await;
    queued(b, job("e1", 50, &free)).await;
    assert_eq!(gauges(b).await.waiting, 1, "one job");
    let e1 = take(b, 8, LONG).await;
    assert_eq!(ids(&e1), ["e1"], "claimed once");
    assert_eq!(
        enqueue(b, job("e1", 50, &free)).await,
        Admission::Queued,
        "a running job is admitted already"
    );
    assert_eq!(idle(b, "e1 runs already").await, None);
    assert_eq!(reply(b, &e1[0].lease).await, Delivery::Delivered);
    assert_eq!(enqueue(b, job("e1", 50, &free)).await, Admission::Settled);
    assert_eq!(idle(b, "e1 was answered").await, None);
}

/// A job whose client has stopped waiting is never claimed; a claimed job's
/// `remaining` is what is left of its client's wait.
pub async fn expired_jobs_are_never_claimed<B: Broker>(b: &B) {
    let free = no_quota();
    queued(
        b,
        NewJob {
            timeout: Duration::from_millis(300),
            ..job("short", 10, &free)
        },
    )
    .await;
    let wait = Duration::from_secs(20);
    queued(
        b,
        NewJob {
            timeout: wait,
            ..job("long", 50, &free)
        },
    )
    .await;
    pass(b, Duration::from_secs(1)).await;
    let jobs = take(b, 8, LONG).await;
    assert_eq!(ids(&jobs), ["long"], "the short job's client gave up");
    let left = jobs[0].remaining;
    assert!(
        left <= wait - Duration::from_millis(900) && left > wait - Duration::from_secs(10),
        "remaining {left:?} of a {wait:?} wait, a second after enqueue"
    );
    assert_eq!(states(b, &["short"]).await, [JobState::Unknown]);
}

/// A claim repeated with its token (its answer was lost) returns the jobs
/// the first leased, with the same leases, and starts nothing new.
pub async fn repeated_claim_token_returns_the_same_jobs<B: Broker>(b: &B) {
    let free = no_quota();
    for id in ["t1", "t2", "t3"] {
        queued(b, job(id, 50, &free)).await;
    }
    let token = new_token();
    let two = ClaimOptions {
        max_jobs: 2,
        ..options(&token)
    };
    let first = jobs_of(claim_with(b, two).await);
    assert_eq!(ids(&first), ["t1", "t2"]);
    let again = jobs_of(claim_with(b, two).await);
    assert_eq!(ids(&again), ["t1", "t2"], "the same jobs, not new ones");
    for (a, f) in again.iter().zip(&first) {
        assert_eq!(a.lease, f.lease, "the same lease");
        assert_eq!(a.frame, f.frame);
    }
    assert_eq!(states(b, &["t3"]).await, [JobState::Waiting]);
    assert_eq!(gauges(b).await.waiting, 1);
    take_one(b, "t3").await;
    assert_eq!(reply(b, &again[0].lease).await, Delivery::Delivered);
}

/// Claims with `token` for up to `max_jobs` jobs.
async fn claim_jobs<B: Broker>(b: &B, token: &str, max_jobs: usize) -> Vec<Claimed> {
    jobs_of(
        claim_with(
            b,
            ClaimOptions {
                max_jobs,
                ..options(token)
            },
        )
        .await,
    )
}

/// Claims with `token` for up to `max_jobs` jobs; their ids.
async fn claim_ids<B: Broker>(b: &B, token: &str, max_jobs: usize) -> Vec<String> {
    ids(&claim_jobs(b, token, max_jobs).await)
}

/// A claim token leases once. A claim that started nothing uses it up too
/// (a late copy of it leases nothing), and a claim for no job (`max_jobs`
/// 0) returns what its token leased and settles it: a worker can give up
/// on a claim it sent without stranding a lease.
pub async fn a_claim_token_leases_once<B: Broker>(b: &B) {
    let free = no_quota();
    let spent = new_token();
    assert!(claim_ids(b, &spent, 4).await.is_empty(), "nothing waits");
    queued(b, job("u1", 50, &free)).await;
    assert!(
        claim_ids(b, &spent, 4).await.is_empty(),
        "a late copy of a claim that found nothing leases nothing"
    );
    let settled = new_token();
    assert!(claim_ids(b, &settled, 0).await.is_empty());
    assert!(
        claim_ids(b, &settled, 4).await.is_empty(),
        "a settled token leases nothing"
    );
    assert_eq!(states(b, &["u1"]).await, [JobState::Waiting]);
    let ran = new_token();
    let first = claim_jobs(b, &ran, 4).await;
    assert_eq!(ids(&first), ["u1"]);
    let again = claim_jobs(b, &ran, 0).await;
    assert_eq!(
        ids(&again),
        ["u1"],
        "settling returns what the token leased"
    );
    assert_eq!(again[0].lease, first[0].lease);
    assert_eq!(reply(b, &again[0].lease).await, Delivery::Delivered);
}

/// A worker waiting on the doorbell is handed a job announced meanwhile by
/// the same call ([`Broker::wait_and_claim`]), long before its wait is up;
/// with nothing announced, the call claims anyway once the wait is up.
pub async fn wait_and_claim_takes_a_job_announced_meanwhile<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    let mut bell = b.doorbell(QUEUE);
    let quiet = new_token();
    let outcome = b
        .wait_and_claim(
            &mut bell,
            QUEUE,
            Duration::from_millis(100),
            options(&quiet),
        )
        .await
        .expect("wait_and_claim");
    assert!(jobs_of(outcome).is_empty(), "nothing waits");
    let token = new_token();
    let announce = async {
        sleep(Duration::from_millis(200)).await;
        queued(b, job("w1", 50, &free)).await;
    };
    let wait = tokio::time::timeout(
        Duration::from_secs(10),
        b.wait_and_claim(&mut bell, QUEUE, LONG, options(&token)),
    );
    let (outcome, ()) = tokio::join!(wait, announce);
    let outcome = outcome
        .expect("the doorbell rang: the call did not wait for its whole 30 s")
        .expect("wait_and_claim");
    let jobs = jobs_of(outcome);
    assert_eq!(ids(&jobs), ["w1"]);
    assert!(
        jobs[0].handed,
        "a lone job announced to a waiting worker is handed to it, and says so"
    );
    assert_eq!(reply(b, &jobs[0].lease).await, Delivery::Delivered);
    // A claim's job was not handed: the worker may claim again at once.
    queued(b, job("w2", 50, &free)).await;
    let claimed = claim_jobs(b, &new_token(), 1).await;
    assert_eq!(ids(&claimed), ["w2"]);
    assert!(!claimed[0].handed, "a claimed job is not marked handed");
    assert_eq!(reply(b, &claimed[0].lease).await, Delivery::Delivered);
}

/// A worker that gives up on a `wait_and_claim` (it stops: it drops its
/// doorbell and settles its token) strands nothing: a job announced
/// afterwards is not leased under that token, even if the claim was already
/// on its way, and another worker is still woken for it.
pub async fn a_settled_wait_and_claim_leases_nothing<B: Broker>(b: &B) {
    let free = no_quota();
    let mut bell = b.doorbell(QUEUE);
    let token = new_token();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        b.wait_and_claim(&mut bell, QUEUE, Duration::from_secs(2), options(&token)),
    )
    .await;
    assert!(gave_up.is_err(), "nothing was announced");
    drop(bell);
    assert!(
        claim_ids(b, &token, 0).await.is_empty(),
        "nothing leased yet"
    );
    queued(b, job("s1", 50, &free)).await;
    // Past the abandoned wait: a claim queued behind it has run by now.
    pass(b, Duration::from_millis(2_500)).await;
    assert_eq!(
        states(b, &["s1"]).await,
        [JobState::Waiting],
        "s1 still waits: the settled token leased nothing"
    );
    let mut other = b.doorbell(QUEUE);
    assert!(
        other.wait(Duration::from_secs(2)).await.expect("doorbell"),
        "s1's ring reaches another worker"
    );
    take_one(b, "s1").await;
}

/// A worker waiting on the doorbell with nothing to do is handed a lone new
/// job by the enqueue itself (ARCHITECTURE.md decision 27): leased to it
/// before the enqueue returns, under the wait's token (a claim repeated
/// with it returns the job), and returned by the wait. A wait the worker
/// gave up on and settled is handed nothing: the job waits for a claim.
pub async fn an_idle_workers_wait_is_handed_a_lone_job<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    let mut bell = b.doorbell(QUEUE);
    let token = new_token();
    let announce = async {
        // Long enough for the wait to be in place.
        sleep(Duration::from_millis(300)).await;
        queued(b, job("h1", 50, &free)).await;
        states(b, &["h1"]).await
    };
    let wait = tokio::time::timeout(
        Duration::from_secs(10),
        b.wait_and_claim(&mut bell, QUEUE, LONG, options(&token)),
    );
    let (outcome, seen) = tokio::join!(wait, announce);
    assert_eq!(seen, [JobState::Running], "h1 was leased by its enqueue");
    let jobs = jobs_of(
        outcome
            .expect("the wait returned long before its 30 s")
            .expect("wait_and_claim"),
    );
    assert_eq!(ids(&jobs), ["h1"]);
    assert_eq!(jobs[0].lease.token, token, "leased under the wait's token");
    assert_eq!(jobs[0].frame, frame("h1"));
    assert!(jobs[0].remaining > Duration::from_secs(20));
    assert_eq!(
        claim_ids(b, &token, 1).await,
        ["h1"],
        "a claim repeated with the token returns it"
    );
    assert_eq!(reply(b, &jobs[0].lease).await, Delivery::Delivered);

    let token = new_token();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        b.wait_and_claim(&mut bell, QUEUE, Duration::from_secs(2), options(&token)),
    )
    .await;
    assert!(gave_up.is_err(), "nothing was announced");
    // As a stopping worker does: its doorbell goes, its token is settled.
    drop(bell);
    assert!(claim_ids(b, &token, 0).await.is_empty());
    queued(b, job("h2", 50, &free)).await;
    assert_eq!(
        states(b, &["h2"]).await,
        [JobState::Waiting],
        "a settled wait takes nothing"
    );
    take_one(b, "h2").await;
}

/// A worker that retired (it stopped cleanly, its beat is gone) takes no
/// job, even through an offer it made that its last claim could not
/// withdraw (Redis refused writes as it stopped): the job waits for a
/// claim instead of being leased to nobody until its lease runs out.
pub async fn a_retired_workers_offer_takes_nothing<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    let mut bell = b.doorbell(QUEUE);
    let token = new_token();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        b.wait_and_claim(&mut bell, QUEUE, Duration::from_secs(2), options(&token)),
    )
    .await;
    assert!(gave_up.is_err(), "nothing was announced");
    // It stops without settling its token, and says goodbye.
    drop(bell);
    b.retire(Daemon::Worker, WORKER)
        .await
        .unwrap_or_else(|e| panic!("retire: {e}"));
    queued(b, job("r1", 50, &free)).await;
    assert_eq!(
        states(b, &["r1"]).await,
        [JobState::Waiting],
        "a retired worker's offer takes nothing"
    );
    take_one(b, "r1").await;
}

// ---- leases --------------------------------------------------------------------

/// Renewing keeps a job's lease (the reaper leaves it) and its quota slots
/// (its key's next job still waits) past the original lease.
pub async fn renew_keeps_lease_and_quota_slots<B: Broker>(b: &B) {
    beat(b).await;
    let a = flow_of(vec![QuotaKey {
        max_concurrent: 1,
        ..tenant("a")
    }]);
    queued(b, job("n1", 50, &a)).await;
    queued(b, job("n2", 50, &a)).await;
    let n1 = take(b, 1, Duration::from_millis(300)).await;
    assert_eq!(ids(&n1), ["n1"]);
    let lease = &n1[0].lease;
    assert!(renew(b, lease, LONG).await, "renew while held");
    pass(b, Duration::from_millis(800)).await;
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped::default(),
        "renewed: not lost"
    );
    assert_eq!(idle(b, "n1 still holds tenant=a's only slot").await, None);
    assert!(renew(b, lease, LONG).await, "still held");
    assert_eq!(reply(b, lease).await, Delivery::Delivered);
    assert!(!renew(b, lease, LONG).await, "answered: the lease is gone");
    take_one(b, "n2").await;
}

/// A reply reaches the front once, however often it is sent; every call
/// says Delivered.
pub async fn reply_is_delivered_once<B: Broker>(b: &B) {
    let free = no_quota();
    let mut front = b.replies(FRONT);
    queued(b, job("d1", 50, &free)).await;
    let d1 = take_one(b, "d1").await;
    assert_eq!(reply(b, &d1.lease).await, Delivery::Delivered);
    assert_eq!(
        reply(b, &d1.lease).await,
        Delivery::Delivered,
        "repeated: delivered (by the first call)"
    );
    assert_eq!(front_messages(&mut front, 1).await, ["reply d1 200"]);
    pass(b, Duration::from_millis(300)).await;
    assert_eq!(reply(b, &d1.lease).await, Delivery::Delivered);
    assert_eq!(front_messages(&mut front, 0).await, Vec::<String>::new());
    assert_eq!(states(b, &["d1"]).await, [JobState::Settled]);
    assert_eq!(enqueue(b, job("d1", 50, &free)).await, Admission::Settled);
}

/// Jobs answered at the same moment (a broker may settle them in one
/// call), some twice at once: the front gets each reply exactly once.
pub async fn concurrent_replies_are_each_delivered_once<B: Broker>(b: &B) {
    let free = no_quota();
    let mut front = b.replies(FRONT);
    for i in 0..8 {
        queued(b, job(&format!("r{i}"), 50, &free)).await;
    }
    let running = take(b, 8, LONG).await;
    assert_eq!(running.len(), 8);
    let deliveries = futures_util::future::join_all(
        running
            .iter()
            .chain(running.iter().take(3))
            .map(|c| reply(b, &c.lease)),
    )
    .await;
    assert!(
        deliveries.iter().all(|d| *d == Delivery::Delivered),
        "a repeated reply reports delivered too: {deliveries:?}"
    );
    let mut got = front_messages(&mut front, 8).await;
    got.sort();
    let want: Vec<String> = (0..8).map(|i| format!("reply r{i} 200")).collect();
    assert_eq!(got, want, "each reply once");
    assert_eq!(front_messages(&mut front, 0).await, Vec::<String>::new());
}

/// Once a job was reaped, its old lease can neither reply (LeaseLost,
/// nothing pushed) nor renew; the job's next run answers.
pub async fn reply_after_reap_is_lost<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    let mut front = b.replies(FRONT);
    queued(b, job("g1", 50, &free)).await;
    let old = take(b, 1, SHORT_LEASE).await;
    assert_eq!(ids(&old), ["g1"]);
    pass(b, PAST_SHORT_LEASE).await;
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped {
            requeued: 1,
            ..Reaped::default()
        }
    );
    assert_eq!(reply(b, &old[0].lease).await, Delivery::LeaseLost);
    assert!(!renew(b, &old[0].lease, LONG).await, "a reaped lease");
    assert_eq!(
        front_messages(&mut front, 0).await,
        Vec::<String>::new(),
        "a lost lease pushes nothing"
    );
    let again = take_one(b, "g1").await;
    assert_ne!(again.lease, old[0].lease, "a new run, a new lease");
    assert_eq!(reply(b, &again.lease).await, Delivery::Delivered);
    assert_eq!(front_messages(&mut front, 1).await, ["reply g1 200"]);
    // The job was answered, but not under the old lease: that one was
    // never delivered, and saying so again is not "Delivered".
    assert_eq!(
        reply(b, &old[0].lease).await,
        Delivery::LeaseLost,
        "the reaped lease, once the job's next run answered"
    );
    assert_eq!(front_messages(&mut front, 0).await, Vec::<String>::new());
}

/// A handed-back job is lost at the next reap: a GET goes back in its
/// place (before jobs queued after it), a POST is answered 502.
pub async fn hand_back_then_reap<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    let mut front = b.replies(FRONT);
    queued(b, job("g1", 50, &free)).await;
    queued(b, job("g2", 50, &free)).await;
    queued(
        b,
        NewJob {
            method: "POST",
            ..job("p1", 60, &free)
        },
    )
    .await;
    let running = take(b, 3, LONG).await;
    assert_eq!(ids(&running), ["g1", "g2", "p1"]);
    queued(b, job("g3", 50, &free)).await;
    b.hand_back(&running[0].lease).await.expect("hand_back g1");
    b.hand_back(&running[2].lease).await.expect("hand_back p1");
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped {
            requeued: 1,
            answered: 1,
            dead_lettered: 0
        }
    );
    assert_eq!(front_messages(&mut front, 1).await, ["reply p1 502"]);
    assert_eq!(
        states(b, &["p1", "g1", "g2"]).await,
        [JobState::Settled, JobState::Waiting, JobState::Running]
    );
    assert_eq!(
        ids(&take(b, 8, LONG).await),
        ["g1", "g3"],
        "g1 back in its place"
    );
    assert!(
        renew(b, &running[1].lease, LONG).await,
        "g2 was not handed back"
    );
}

/// A claimed job that never started, put back, waits again in its place
/// as if never claimed: a POST too (it did not run, so it is not answered
/// 502), its concurrency slot is free, its waiting counts are back, no
/// attempt is counted, and its old lease renews, replies and puts back
/// nothing.
pub async fn a_put_back_job_waits_again_in_its_place<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    // Not counted as a run: with two runs allowed, a put-back job whose
    // next worker is lost goes back once more instead of being set aside.
    // (First, while beats are steady: reaping judges only then.)
    queued(b, job("g0", 50, &free)).await;
    let g0 = take_one(b, "g0").await;
    assert!(
        b.put_back(&g0.lease).await.expect("put_back g0"),
        "g0 waits again"
    );
    assert_eq!(ids(&take(b, 1, SHORT_LEASE).await), ["g0"]);
    pass(b, PAST_SHORT_LEASE).await;
    assert_eq!(
        reap(b, &retry(2)).await,
        Reaped {
            requeued: 1,
            ..Reaped::default()
        },
        "g0 lost its first run: its put-back was not one"
    );
    take_one(b, "g0").await;

    let one = flow_of(vec![QuotaKey {
        max_concurrent: 1,
        ..tenant("a")
    }]);
    let mut front = b.replies(FRONT);
    queued(
        b,
        NewJob {
            method: "POST",
            ..job("p1", 50, &one)
        },
    )
    .await;
    queued(b, job("a2", 50, &one)).await;
    let p1 = take_one(b, "p1").await;
    assert_eq!(idle(b, "a2 waits for p1's slot").await, None);
    assert!(
        b.put_back(&p1.lease).await.expect("put_back p1"),
        "p1 waits again"
    );
    assert_eq!(gauges(b).await.waiting, 2, "both wait");
    assert!(!renew(b, &p1.lease, LONG).await, "renew after put_back");
    assert_eq!(
        reply(b, &p1.lease).await,
        Delivery::LeaseLost,
        "reply after put_back"
    );
    assert!(
        !b.put_back(&p1.lease).await.expect("put_back p1 again"),
        "a lease put back puts nothing back again"
    );
    // Back before a2, with its slot free; a POST that did not run is not
    // answered "lost".
    let again = take_one(b, "p1").await;
    assert_eq!(
        states(b, &["p1", "a2"]).await,
        [JobState::Running, JobState::Waiting]
    );
    assert_eq!(reply(b, &again.lease).await, Delivery::Delivered);
    assert_eq!(front_messages(&mut front, 1).await, ["reply p1 200"]);
    take_one(b, "a2").await;
}

/// A claim ahead (ARCHITECTURE.md decision 30) starts only a job that may
/// run again if its worker is lost (`retry_methods`), since the job is
/// leased before it runs. When the next job in order is of another method
/// it starts nothing: that job waits for a claim into a free slot, and
/// nothing is taken from behind it. A lone job handed off by its enqueue
/// is judged the same way, and stays handed off.
pub async fn a_claim_ahead_holds_only_a_job_that_may_run_again<B: Broker>(b: &B) {
    let free = no_quota();
    let post = |id| NewJob {
        method: "POST",
        ..job(id, 50, &free)
    };
    // Alone: handed off by its enqueue.
    queued(b, post("p1")).await;
    assert!(
        matches!(ahead(b).await, ClaimOutcome::Unheld),
        "p1, a POST, is not held"
    );
    // g1 waits behind it, in its flow.
    queued(b, job("g1", 50, &free)).await;
    assert!(
        matches!(ahead(b).await, ClaimOutcome::Unheld),
        "g1 is not taken from behind p1"
    );
    assert_eq!(
        states(b, &["p1", "g1"]).await,
        [JobState::Waiting, JobState::Waiting],
        "a claim ahead that starts nothing changes nothing"
    );
    assert_eq!(gauges(b).await.waiting, 2);
    // A claim into a free slot starts p1; then g1 may be held.
    take_one(b, "p1").await;
    let token = new_token();
    let held = jobs_of(
        claim_with(
            b,
            ClaimOptions {
                ahead: true,
                ..options(&token)
            },
        )
        .await,
    );
    assert_eq!(ids(&held), ["g1"]);
    assert_eq!(reply(b, &held[0].lease).await, Delivery::Delivered);
}

/// A job put back before it ran gives back the rate slot its claim took:
/// with one start a minute allowed, it starts again at once, and the job
/// behind it still waits for the rate.
pub async fn a_put_back_job_gives_back_its_rate_slot<B: Broker>(b: &B) {
    beat(b).await;
    let rated = flow_of(vec![QuotaKey {
        interval_ms: 60_000.0,
        burst: 1,
        ..tenant("put-back")
    }]);
    queued(b, job("r1", 50, &rated)).await;
    queued(b, job("r2", 50, &rated)).await;
    let r1 = take_one(b, "r1").await;
    assert!(
        idle(b, "r2 waits for the rate").await.is_some(),
        "a rate-limited claim says when to try again"
    );
    assert!(b.put_back(&r1.lease).await.expect("put_back r1"));
    let again = take_one(b, "r1").await;
    assert!(
        idle(b, "r2 still waits for the rate").await.is_some(),
        "one slot given back, one taken again"
    );
    assert_eq!(reply(b, &again.lease).await, Delivery::Delivered);
}

/// A claim ahead for one job, under a new token.
async fn ahead<B: Broker>(b: &B) -> ClaimOutcome {
    let token = new_token();
    claim_with(
        b,
        ClaimOptions {
            ahead: true,
            ..options(&token)
        },
    )
    .await
}

/// A lease handed back is no longer the job's: renewing it fails (and does
/// not take the job back from the reaper), replying with it pushes nothing.
pub async fn lease_handed_back_is_no_longer_the_jobs<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    let mut front = b.replies(FRONT);
    queued(b, job("h1", 50, &free)).await;
    let h1 = take_one(b, "h1").await;
    b.hand_back(&h1.lease).await.expect("hand_back h1");
    assert!(!renew(b, &h1.lease, LONG).await, "renew after hand_back");
    assert_eq!(
        reply(b, &h1.lease).await,
        Delivery::LeaseLost,
        "reply after hand_back"
    );
    assert_eq!(front_messages(&mut front, 0).await, Vec::<String>::new());
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped {
            requeued: 1,
            ..Reaped::default()
        }
    );
    take_one(b, "h1").await;
}

/// A lease past its deadline is lost: the reaper puts a GET back in its
/// original place, ahead of the jobs queued after it.
pub async fn expired_lease_is_requeued_in_place<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    queued(b, job("x1", 50, &free)).await;
    queued(b, job("x2", 50, &free)).await;
    let x1 = take(b, 1, SHORT_LEASE).await;
    assert_eq!(ids(&x1), ["x1"]);
    pass(b, PAST_SHORT_LEASE).await;
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped {
            requeued: 1,
            ..Reaped::default()
        }
    );
    assert_eq!(reap(b, &retry(3)).await, Reaped::default(), "reaped once");
    assert_eq!(ids(&take(b, 8, LONG).await), ["x1", "x2"]);
}

/// A concurrency quota is never overrun by a lease that ran out: once a
/// job's lease has expired, either its slot went to another job and the old
/// lease can no longer be renewed, or the slot stayed and renewing keeps it.
pub async fn expired_lease_never_overruns_its_quota<B: Broker>(b: &B) {
    beat(b).await;
    let a = flow_of(vec![QuotaKey {
        max_concurrent: 1,
        ..tenant("a")
    }]);
    queued(b, job("o1", 50, &a)).await;
    queued(b, job("o2", 50, &a)).await;
    let o1 = take(b, 1, SHORT_LEASE).await;
    assert_eq!(ids(&o1), ["o1"]);
    pass(b, PAST_SHORT_LEASE).await;
    // No reaper ran. A claim now may give o1's expired slot to o2 …
    let o2 = take(b, 1, LONG).await;
    let renewed = renew(b, &o1[0].lease, LONG).await;
    if ids(&o2) == ["o2"] {
        // … and then o1 must not run on under a renewed lease beside it.
        assert!(
            !renewed,
            "o2 took tenant=a's only slot after o1's lease expired, yet o1's lease was renewed: \
             two jobs run under max_concurrent = 1"
        );
    } else {
        assert!(o2.is_empty(), "{:?}", ids(&o2));
    }
}

/// A lost job's quota slots are freed by the reaper: its key's next job
/// runs.
pub async fn reap_frees_quota_slots<B: Broker>(b: &B) {
    beat(b).await;
    let a = flow_of(vec![QuotaKey {
        max_concurrent: 1,
        ..tenant("a")
    }]);
    let mut front = b.replies(FRONT);
    let post = |id: &'static str| NewJob {
        method: "POST",
        ..job(id, 50, &a)
    };
    queued(b, post("q1")).await;
    queued(b, post("q2")).await;
    let q1 = take(b, 1, SHORT_LEASE).await;
    assert_eq!(ids(&q1), ["q1"]);
    pass(b, PAST_SHORT_LEASE).await;
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped {
            answered: 1,
            ..Reaped::default()
        }
    );
    assert_eq!(front_messages(&mut front, 1).await, ["reply q1 502"]);
    take_one(b, "q2").await;
}

/// A safe job whose worker is lost `max_attempts` times is set aside in
/// the dead letters and its client answered 502; its id is settled.
pub async fn max_attempts_dead_letters<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    let mut front = b.replies(FRONT);
    let policy = retry(2);
    queued(b, job("k1", 50, &free)).await;
    assert_eq!(ids(&take(b, 1, SHORT_LEASE).await), ["k1"], "run 1");
    pass(b, PAST_SHORT_LEASE).await;
    assert_eq!(
        reap(b, &policy).await,
        Reaped {
            requeued: 1,
            ..Reaped::default()
        },
        "one run lost of two allowed"
    );
    assert_eq!(ids(&take(b, 1, SHORT_LEASE).await), ["k1"], "run 2");
    pass(b, PAST_SHORT_LEASE).await;
    assert_eq!(
        reap(b, &policy).await,
        Reaped {
            requeued: 0,
            answered: 1,
            dead_lettered: 1
        },
        "two runs lost of two allowed"
    );
    assert_eq!(front_messages(&mut front, 1).await, ["reply k1 502"]);
    assert_eq!(states(b, &["k1"]).await, [JobState::Settled]);
    assert_eq!(enqueue(b, job("k1", 50, &free)).await, Admission::Settled);
    assert_eq!(idle(b, "k1 is a dead letter").await, None);
}

/// A job set aside (poison) answers its client with the given frame, is
/// settled, and its lease is gone.
pub async fn dead_letter_answers_and_settles<B: Broker>(b: &B) {
    let free = no_quota();
    let mut front = b.replies(FRONT);
    queued(b, job("z1", 50, &free)).await;
    let z1 = take_one(b, "z1").await;
    let answer = Reply::plain("z1", 502, "poison\n", WORKER, &[]);
    b.dead_letter(&z1.lease, "undecodable", answer)
        .await
        .expect("dead_letter");
    let again = Reply::plain("z1", 502, "poison\n", WORKER, &[]);
    b.dead_letter(&z1.lease, "undecodable", again)
        .await
        .expect("dead_letter repeated");
    assert_eq!(
        front_messages(&mut front, 1).await,
        ["reply z1 502"],
        "answered once, however often it is called"
    );
    assert_eq!(states(b, &["z1"]).await, [JobState::Settled]);
    assert_eq!(enqueue(b, job("z1", 50, &free)).await, Admission::Settled);
    assert_eq!(reply(b, &z1.lease).await, Delivery::LeaseLost);
    assert!(!renew(b, &z1.lease, LONG).await);
    assert_eq!(front_messages(&mut front, 0).await, Vec::<String>::new());
    assert_eq!(idle(b, "z1 is a dead letter").await, None);
}

/// A worker silent for longer than its timeout loses its leases (however
/// long they were); a live worker's leases stay.
pub async fn silent_worker_is_reaped<B: Broker>(b: &B) {
    let free = no_quota();
    let beat = |id: &'static str| async move {
        b.heartbeat(Daemon::Worker, id, "{}")
            .await
            .unwrap_or_else(|e| panic!("heartbeat {id}: {e}"))
    };
    beat("w-silent").await;
    beat("w-live").await;
    queued(b, job("s1", 50, &free)).await;
    queued(b, job("l1", 50, &free)).await;
    let claim_as = |worker| async move {
        let token = new_token();
        jobs_of(
            claim_with(
                b,
                ClaimOptions {
                    worker,
                    ..options(&token)
                },
            )
            .await,
        )
    };
    let s1 = claim_as("w-silent").await;
    assert_eq!(ids(&s1), ["s1"]);
    let l1 = claim_as("w-live").await;
    assert_eq!(ids(&l1), ["l1"]);
    beat_without_a_stall(Daemon::Worker.timeout() + Duration::from_secs(2), || {
        beat("w-live")
    })
    .await;
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped {
            requeued: 1,
            ..Reaped::default()
        },
        "w-silent's job is taken back, w-live's is not"
    );
    assert!(renew(b, &l1[0].lease, LONG).await, "w-live keeps l1");
    assert!(!renew(b, &s1[0].lease, LONG).await, "w-silent lost s1");
    take_one(b, "s1").await;
}

/// A job a front enqueued after its last beat shows it alive: its beats
/// may have been refused (Redis out of memory) while the enqueue that
/// followed went through. Such a job is not dropped as a dead front's while
/// it is younger than a front's timeout, so its client is not told to try
/// again (503) for a front that is still there.
pub async fn a_fronts_fresh_job_shows_it_alive<B: Broker>(b: &B) {
    let free = no_quota();
    beat_front(b, "front-quiet").await;
    beat_without_a_stall(Daemon::Front.timeout() * 2, || beat_front(b, FRONT)).await;
    queued(b, of_front(job("fresh", 50, &free), "front-quiet")).await;
    assert_eq!(
        ids(&take(b, 8, LONG).await),
        ["fresh"],
        "front-quiet's beats are old, but it enqueued just now"
    );
}

/// Jobs of a front that stopped beating are not started (nobody would read
/// the reply); a live front's are, and so are a front's that never beat.
pub async fn dead_front_jobs_are_dropped<B: Broker>(b: &B) {
    let free = no_quota();
    beat_front(b, "front-dead").await;
    beat_front(b, "front-live").await;
    for (id, front) in [
        ("of-dead", "front-dead"),
        ("of-live", "front-live"),
        ("of-never", "front-never"),
    ] {
        queued(b, of_front(job(id, 50, &free), front)).await;
    }
    beat_without_a_stall(Daemon::Front.timeout() * 2, || beat_front(b, "front-live")).await;
    assert_eq!(
        ids(&take(b, 8, LONG).await),
        ["of-live", "of-never"],
        "front-dead is silent: its job is not started"
    );
    assert_eq!(states(b, &["of-dead"]).await, [JobState::Unknown]);
    // The dead front comes back: it learns how long it was silent.
    let back = beat_front(b, "front-dead").await;
    assert!(
        back.since_last.is_some_and(|s| s > Daemon::Front.timeout()),
        "front-dead was silent longer than its timeout: {back:?}"
    );
}

/// A job that finds nothing else waiting is withdrawn, expires and is
/// dropped with a dead front like any other, and leaves nothing behind
/// that would hold the next one.
pub async fn a_lone_job_is_withdrawn_or_dropped_like_any<B: Broker>(b: &B) {
    let free = no_quota();
    queued(b, job("lone-withdrawn", 50, &free)).await;
    assert_eq!(withdraw(b, "lone-withdrawn").await, Withdrawal::Withdrawn);
    queued(b, job("lone-1", 50, &free)).await;
    assert_eq!(ids(&take(b, 8, LONG).await), ["lone-1"]);

    queued(
        b,
        NewJob {
            timeout: Duration::from_millis(300),
            ..job("lone-expired", 50, &free)
        },
    )
    .await;
    pass(b, Duration::from_secs(1)).await;
    idle(b, "lone-expired's client gave up").await;
    assert_eq!(states(b, &["lone-expired"]).await, [JobState::Unknown]);

    beat_front(b, "front-dead").await;
    beat_front(b, "front-live").await;
    queued(b, of_front(job("lone-of-dead", 50, &free), "front-dead")).await;
    beat_without_a_stall(Daemon::Front.timeout() * 2, || beat_front(b, "front-live")).await;
    idle(b, "front-dead is silent: its job is not started").await;
    assert_eq!(states(b, &["lone-of-dead"]).await, [JobState::Unknown]);

    // (FRONT went silent meanwhile too: this one is front-live's.)
    queued(b, of_front(job("lone-2", 50, &free), "front-live")).await;
    assert_eq!(ids(&take(b, 8, LONG).await), ["lone-2"]);
    assert_eq!(idle(b, "every job was served or dropped").await, None);
}

// ---- the front's stream, states, heartbeats, gauges, doorbell ------------

/// A started notice reaches the front, ahead of the job's reply.
pub async fn started_notice_precedes_reply<B: Broker>(b: &B) {
    let free = no_quota();
    let mut front = b.replies(FRONT);
    queued(
        b,
        NewJob {
            method: "POST",
            ..job("s1", 50, &free)
        },
    )
    .await;
    let s1 = take_one(b, "s1").await;
    b.started(&s1.lease).await.expect("started");
    assert_eq!(reply(b, &s1.lease).await, Delivery::Delivered);
    assert_eq!(
        front_messages(&mut front, 2).await,
        ["started s1", "reply s1 200"]
    );
}

/// Jobs announced again after a data loss reach each one's own front, as
/// started notices.
pub async fn started_again_reaches_each_front<B: Broker>(b: &B) {
    let mut first = b.replies(FRONT);
    let mut second = b.replies("front-2");
    let job = |id: &str, front: &str| Announced {
        id: id.into(),
        front: front.into(),
    };
    b.started_again(&[job("a1", FRONT), job("b1", "front-2"), job("a2", FRONT)])
        .await
        .expect("started again");
    let mut at_first = front_messages(&mut first, 2).await;
    at_first.sort();
    assert_eq!(at_first, ["started a1", "started a2"]);
    assert_eq!(front_messages(&mut second, 1).await, ["started b1"]);
    b.started_again(&[]).await.expect("nothing to announce");
}

/// `job_states` tells waiting, running, settled (answered or withdrawn) and
/// unknown jobs apart, in the order asked.
pub async fn job_states_report_each_state<B: Broker>(b: &B) {
    let free = no_quota();
    queued(b, job("answered", 50, &free)).await;
    let answered = take_one(b, "answered").await;
    assert_eq!(reply(b, &answered.lease).await, Delivery::Delivered);
    queued(b, job("running", 50, &free)).await;
    take_one(b, "running").await;
    queued(b, job("waiting", 50, &free)).await;
    queued(b, job("withdrawn", 50, &free)).await;
    assert_eq!(withdraw(b, "withdrawn").await, Withdrawal::Withdrawn);
    assert_eq!(
        states(b, &["never", "answered", "waiting", "running", "withdrawn"]).await,
        [
            JobState::Unknown,
            JobState::Settled,
            JobState::Waiting,
            JobState::Running,
            JobState::Settled
        ]
    );
    assert_eq!(states(b, &[]).await, Vec::<JobState>::new());
}

/// Heartbeats tell the broker's data generation (stable while the data
/// lasts, the same for every daemon) and the time since the daemon's
/// previous beat; a retired daemon is forgotten.
pub async fn heartbeat_generation_is_stable<B: Broker>(b: &B) {
    let beat = |kind, id: &'static str| async move {
        b.heartbeat(kind, id, r#"{"conformance":true}"#)
            .await
            .unwrap_or_else(|e| panic!("heartbeat {id}: {e}"))
    };
    let first = beat(Daemon::Worker, "w1").await;
    assert!(!first.generation.is_empty(), "a generation");
    assert_eq!(first.since_last, None, "w1 never beat before");
    sleep(Duration::from_millis(150)).await;
    let second = beat(Daemon::Worker, "w1").await;
    assert_eq!(second.generation, first.generation);
    let since = second.since_last.expect("w1 beat before");
    assert!(
        since >= Duration::from_millis(100) && since < Duration::from_secs(5),
        "{since:?} since a beat 150 ms ago"
    );
    let front = beat(Daemon::Front, "f1").await;
    assert_eq!(front.generation, first.generation, "one generation for all");
    assert_eq!(front.since_last, None);
    b.retire(Daemon::Worker, "w1").await.expect("retire");
    let after = beat(Daemon::Worker, "w1").await;
    assert_eq!(after.generation, first.generation);
    assert_eq!(after.since_last, None, "a retired daemon is forgotten");
    b.ping().await.expect("ping");
}

/// Gauges count the queue's waiting jobs and, per limit (the part of a
/// quota token before `=`), the jobs waiting for one of its quotas and its
/// key values with jobs waiting; limits with none are absent.
pub async fn gauges_count_waiting_jobs_and_quota_waits<B: Broker>(b: &B) {
    assert_eq!(gauges(b).await, Gauges::default(), "an empty queue");
    let a = flow_of(vec![tenant("a")]);
    let other = flow_of(vec![tenant("b")]);
    let free = no_quota();
    queued(b, job("a1", 50, &a)).await;
    queued(b, job("a2", 50, &a)).await;
    queued(b, job("b1", 50, &other)).await;
    queued(b, job("f1", 50, &free)).await;
    let count = |g: &Gauges| {
        (
            g.waiting,
            g.quota_waiting.get("tenant").copied(),
            g.saturated_keys.get("tenant").copied(),
            g.quota_waiting.len() + g.saturated_keys.len(),
        )
    };
    let g = gauges(b).await;
    assert_eq!(count(&g), (4, Some(3), Some(2), 2), "{g:?}");
    take_one(b, "a1").await;
    let g = gauges(b).await;
    assert_eq!(count(&g), (3, Some(2), Some(2), 2), "{g:?}");
    assert_eq!(withdraw(b, "a2").await, Withdrawal::Withdrawn);
    let g = gauges(b).await;
    assert_eq!(count(&g), (2, Some(1), Some(1), 2), "{g:?}");
    take_one(b, "b1").await;
    let g = gauges(b).await;
    assert_eq!(count(&g), (1, None, None, 0), "{g:?}");
}

/// Queues are independent: a claim, a withdrawal, a state or a gauge of one
/// queue never sees another's jobs.
pub async fn queues_are_independent<B: Broker>(b: &B) {
    let free = no_quota();
    let other = "conformance-other";
    queued(b, job("here", 50, &free)).await;
    queued(
        b,
        NewJob {
            queue: other,
            ..job("there", 10, &free)
        },
    )
    .await;
    assert_eq!(gauges(b).await.waiting, 1);
    let there = b.gauges(other).await.expect("gauges").waiting;
    assert_eq!(there, 1, "one job waits on {other}");
    let states_there = b
        .job_states(other, &["here", "there"])
        .await
        .expect("states");
    assert_eq!(states_there, [JobState::Unknown, JobState::Waiting]);
    assert_eq!(
        b.withdraw(other, "here", LONG).await.expect("withdraw"),
        Withdrawal::Withdrawn,
        "`here` is unknown on {other}: a tombstone there"
    );
    assert_eq!(states(b, &["here"]).await, [JobState::Waiting], "untouched");
    take_one(b, "here").await;
    let token = new_token();
    match b.claim(other, options(&token)).await.expect("claim") {
        ClaimOutcome::Jobs(jobs) => {
            assert_eq!(ids(&jobs), ["there"]);
            assert_eq!(jobs[0].lease.queue, other);
        }
        ClaimOutcome::Idle { .. } | ClaimOutcome::Unheld => panic!("`there` waits on {other}"),
    }
}

/// The doorbell stays silent on an empty queue and rings for a new job.
pub async fn doorbell_rings_on_enqueue<B: Broker>(b: &B) {
    let free = no_quota();
    let mut bell = b.doorbell(QUEUE);
    assert!(
        !bell
            .wait(Duration::from_millis(200))
            .await
            .expect("doorbell"),
        "nothing was enqueued"
    );
    queued(b, job("bell", 50, &free)).await;
    assert!(
        bell.wait(Duration::from_secs(2)).await.expect("doorbell"),
        "a job was enqueued"
    );
    take_one(b, "bell").await;
}

/// Takes every doorbell token there is; true when there was one.
async fn drain_doorbell<D: Doorbell>(bell: &mut D) -> bool {
    let mut any = false;
    while bell
        .wait(Duration::from_millis(100))
        .await
        .expect("doorbell")
    {
        any = true;
    }
    any
}

/// A finished job rings the doorbell when jobs wait (its quota slot may
/// let one run), and not when none does: an idle worker is not woken for
/// nothing.
pub async fn doorbell_rings_on_release_only_when_jobs_wait<B: Broker>(b: &B) {
    let one = flow_of(vec![QuotaKey {
        max_concurrent: 1,
        ..tenant("a")
    }]);
    let mut bell = b.doorbell(QUEUE);
    queued(b, job("a1", 50, &one)).await;
    queued(b, job("a2", 50, &one)).await;
    let a1 = take_one(b, "a1").await;
    drain_doorbell(&mut bell).await;
    assert_eq!(reply(b, &a1.lease).await, Delivery::Delivered);
    assert!(
        drain_doorbell(&mut bell).await,
        "a2 waits for a1's slot: the release rings"
    );
    let a2 = take_one(b, "a2").await;
    drain_doorbell(&mut bell).await;
    assert_eq!(reply(b, &a2.lease).await, Delivery::Delivered);
    assert!(
        !drain_doorbell(&mut bell).await,
        "nothing waits: the release does not ring"
    );
}

/// A claim that started jobs and then met a rate quota leaves a doorbell
/// token, so that a worker asks again and learns when the rate allows
/// (a worker given fewer jobs than it asked for waits on the doorbell).
pub async fn a_claim_stopped_by_a_rate_quota_leaves_a_ring<B: Broker>(b: &B) {
    let rated = flow_of(vec![QuotaKey {
        interval_ms: 60_000.0,
        burst: 1,
        ..tenant("r")
    }]);
    let mut bell = b.doorbell(QUEUE);
    queued(b, job("r1", 50, &rated)).await;
    queued(b, job("r2", 50, &rated)).await;
    drain_doorbell(&mut bell).await;
    assert_eq!(ids(&take(b, 2, LONG).await), ["r1"], "a burst of one");
    assert!(
        drain_doorbell(&mut bell).await,
        "r2 waits for the rate: the claim leaves a ring"
    );
    assert!(idle(b, "r2 waits for the rate").await.is_some());
}

// ---- streamed bodies ------------------------------------------------------------

/// The head frame of a streamed 200 response to job `id`.
fn stream_head_frame(id: &str) -> Bytes {
    Reply::encode(
        &ReplyMeta {
            id: id.to_string(),
            status: 200,
            headers: Default::default(),
            worker: WORKER.to_string(),
            backend_ms: 1,
            chunked: true,
            stream: true,
            reason: None,
        },
        b"",
    )
}

fn data(text: &str) -> Piece {
    Piece::Data(Bytes::from(text.to_string()))
}

async fn push<B: Broker>(b: &B, lease: &Lease, first: u64, pieces: &[Piece]) -> Pushed {
    b.push_pieces(lease, first, pieces)
        .await
        .unwrap_or_else(|e| panic!("push_pieces {}: {e}", lease.id))
}

async fn take_from<B: Broker>(b: &B, id: &str, from: u64) -> Option<Vec<Piece>> {
    b.take_pieces(id, from, 64)
        .await
        .unwrap_or_else(|e| panic!("take_pieces {id}: {e}"))
}

/// A streamed response: the head reaches the front once (a repeated call
/// pushes nothing), a data notice tells it pieces wait, the pieces come in
/// order, and the job still ends with an empty reply that pushes nothing.
pub async fn stream_head_then_pieces_in_order<B: Broker>(b: &B) {
    let free = no_quota();
    let mut front = b.replies(FRONT);
    queued(b, job("s1", 50, &free)).await;
    let s1 = take_one(b, "s1").await;
    let head = || b.stream_head(&s1.lease, stream_head_frame("s1"));
    assert_eq!(head().await.unwrap(), Delivery::Delivered);
    assert_eq!(head().await.unwrap(), Delivery::Delivered, "repeated");
    assert_eq!(front_messages(&mut front, 1).await, ["head s1 200"]);
    assert_eq!(take_from(b, "s1", 0).await, Some(vec![]), "nothing yet");
    let pieces = [data("ab"), data("cd")];
    assert_eq!(push(b, &s1.lease, 0, &pieces).await, Pushed::Taken(2));
    assert_eq!(front_messages(&mut front, 1).await, ["data s1"]);
    assert_eq!(take_from(b, "s1", 0).await, Some(pieces.to_vec()));
    // The job ends (its slots free) while the rest of its body still flows.
    assert_eq!(
        b.reply(&s1.lease, Bytes::new(), 3).await.unwrap(),
        Delivery::Delivered
    );
    assert_eq!(states(b, &["s1"]).await, [JobState::Settled]);
    assert_eq!(
        push(b, &s1.lease, 2, &[data("ef"), Piece::End]).await,
        Pushed::Taken(2)
    );
    assert_eq!(
        take_from(b, "s1", 2).await,
        Some(vec![data("ef"), Piece::End]),
        "pieces 0 and 1 were dropped as read"
    );
    assert_eq!(
        front_messages(&mut front, 0).await,
        Vec::<String>::new(),
        "no reply frame: the head was the answer"
    );
    b.close_stream("s1").await.unwrap();
    assert_eq!(take_from(b, "s1", 4).await, None, "closed");
}

/// At most [`WINDOW`] pieces wait for the front; the rest is taken once
/// the front has read what was there.
pub async fn stream_window_bounds_waiting_pieces<B: Broker>(b: &B) {
    let free = no_quota();
    queued(b, job("w1", 50, &free)).await;
    let w1 = take_one(b, "w1").await;
    assert_eq!(
        b.stream_head(&w1.lease, stream_head_frame("w1"))
            .await
            .unwrap(),
        Delivery::Delivered
    );
    let many: Vec<Piece> = (0..WINDOW + 3).map(|i| data(&format!("p{i}"))).collect();
    assert_eq!(push(b, &w1.lease, 0, &many).await, Pushed::Taken(WINDOW));
    assert_eq!(
        push(b, &w1.lease, WINDOW as u64, &many[WINDOW..]).await,
        Pushed::Taken(0),
        "the window is full"
    );
    let read = take_from(b, "w1", 0).await.unwrap();
    assert_eq!(read, many[..WINDOW].to_vec());
    // Nothing is dropped until the front says it has read it.
    assert_eq!(
        push(b, &w1.lease, WINDOW as u64, &many[WINDOW..]).await,
        Pushed::Taken(0)
    );
    assert_eq!(take_from(b, "w1", WINDOW as u64).await, Some(vec![]));
    assert_eq!(
        push(b, &w1.lease, WINDOW as u64, &many[WINDOW..]).await,
        Pushed::Taken(3)
    );
    assert_eq!(
        take_from(b, "w1", WINDOW as u64).await,
        Some(many[WINDOW..].to_vec())
    );
}

/// A push or a read repeated after a lost answer neither duplicates nor
/// loses a piece.
pub async fn repeated_pushes_and_reads_are_idempotent<B: Broker>(b: &B) {
    let free = no_quota();
    queued(b, job("r1", 50, &free)).await;
    let r1 = take_one(b, "r1").await;
    b.stream_head(&r1.lease, stream_head_frame("r1"))
        .await
        .unwrap();
    assert_eq!(
        push(b, &r1.lease, 0, &[data("a"), data("b")]).await,
        Pushed::Taken(2)
    );
    assert_eq!(
        push(b, &r1.lease, 0, &[data("a"), data("b")]).await,
        Pushed::Taken(2),
        "again"
    );
    assert_eq!(
        push(b, &r1.lease, 1, &[data("b"), data("c")]).await,
        Pushed::Taken(2),
        "overlapping: only c is new"
    );
    let first = take_from(b, "r1", 0).await.unwrap();
    assert_eq!(first, [data("a"), data("b"), data("c")]);
    assert_eq!(take_from(b, "r1", 0).await.unwrap(), first, "read again");
    assert_eq!(take_from(b, "r1", 1).await.unwrap(), [data("b"), data("c")]);
}

/// A front whose client went away cancels the stream: its pieces go, and
/// the worker's next push is told to stop.
pub async fn cancelled_stream_stops_its_worker<B: Broker>(b: &B) {
    let free = no_quota();
    queued(b, job("c1", 50, &free)).await;
    let c1 = take_one(b, "c1").await;
    b.stream_head(&c1.lease, stream_head_frame("c1"))
        .await
        .unwrap();
    assert_eq!(push(b, &c1.lease, 0, &[data("a")]).await, Pushed::Taken(1));
    b.cancel_stream("c1").await.unwrap();
    assert_eq!(push(b, &c1.lease, 1, &[data("b")]).await, Pushed::Cancelled);
    assert_eq!(take_from(b, "c1", 0).await, None, "cancelled");
    assert_eq!(
        b.reply(&c1.lease, Bytes::new(), 3).await.unwrap(),
        Delivery::Delivered,
        "the job still ends and frees its slots"
    );
}

/// A streaming job whose worker is lost never runs again, even a GET: its
/// client has a head already. The reaper aborts its stream, and a worker
/// that was only slow is then told to stop.
pub async fn lost_streaming_worker_aborts_its_stream<B: Broker>(b: &B) {
    beat(b).await;
    let free = no_quota();
    queued(b, job("l1", 50, &free)).await;
    let l1 = take(b, 1, SHORT_LEASE).await.remove(0);
    b.stream_head(&l1.lease, stream_head_frame("l1"))
        .await
        .unwrap();
    assert_eq!(push(b, &l1.lease, 0, &[data("a")]).await, Pushed::Taken(1));
    pass(b, PAST_SHORT_LEASE).await;
    assert_eq!(
        reap(b, &retry(3)).await,
        Reaped {
            answered: 1,
            ..Reaped::default()
        }
    );
    assert_eq!(idle(b, "a streaming job is not requeued").await, None);
    // The worker was only slow: its next pushes, the piece the abort took
    // the place of and one after it, are refused and replace nothing.
    assert_eq!(
        push(b, &l1.lease, 1, &[data("b"), data("c")]).await,
        Pushed::Cancelled
    );
    let pieces = take_from(b, "l1", 0).await.expect("still readable");
    assert_eq!(pieces.len(), 2, "a, then the abort: {pieces:?}");
    assert_eq!(pieces[0], data("a"));
    assert!(
        matches!(pieces.last(), Some(Piece::Abort(_))),
        "ends with an abort: {pieces:?}"
    );
}

/// Request bodies: chunks are stored in order, once each; a chunk after a
/// gap is reported as not stored (its body is missing a part: the front
/// gives it up); a dropped body is gone.
pub async fn upload_chunks_are_stored_once_in_order<B: Broker>(b: &B) {
    let put = |i: u32, text: &'static str| {
        b.put_upload_chunk("u1", i, Bytes::from_static(text.as_bytes()), LONG)
    };
    assert!(put(0, "zero").await.unwrap());
    assert!(put(0, "zero").await.unwrap(), "repeated: stored once");
    assert!(put(1, "one").await.unwrap());
    assert!(!put(3, "three").await.unwrap(), "chunk 2 is missing");
    let get = |i| b.upload_chunk("u1", i);
    assert_eq!(get(0).await.unwrap().as_deref(), Some(&b"zero"[..]));
    assert_eq!(get(1).await.unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(get(2).await.unwrap(), None);
    b.drop_upload("u1").await.unwrap();
    assert_eq!(get(0).await.unwrap(), None);
}
