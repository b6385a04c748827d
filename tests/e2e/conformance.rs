//! The Broker conformance suite (`thr_broker::conformance`) run against
//! [`RedisBroker`] on a real `redis-server`: one test per scenario, each on
//! a fresh, empty server of its own. Below them, what the suite cannot say
//! without naming Redis: a paused queue, and that a finished job leaves no
//! key behind.

use std::time::Duration;

use bytes::Bytes;
use redis::Commands;
use thr_broker::conformance::{self, FRONT, QUEUE, WORKER};
use thr_broker::{
    Broker, ClaimOptions, ClaimOutcome, Daemon, Delivery, HEARTBEAT_TIMEOUT, NewJob, Reaped,
    RedisBroker, ReplyStream, RetryPolicy,
};
use thr_core::envelope::Reply;
use thr_core::quota::{Flow, QuotaKey};

use crate::support::{RedisServer, stall};

fn broker(redis: &RedisServer) -> RedisBroker {
    RedisBroker::new(&redis.url(), Duration::from_millis(750)).expect("a Redis broker")
}

/// One `#[tokio::test]` per scenario, and the list of those tested.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let redis = RedisServer::start();
                conformance::$name(&broker(&redis)).await;
            }
        )*

        const TESTED: &[&str] = &[$(stringify!($name)),*];
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

#[test]
fn every_scenario_runs_against_redis() {
    assert_eq!(
        TESTED,
        conformance::NAMES,
        "add the new scenario to the list above"
    );
}

fn job<'a>(id: &'a str, flow: &'a Flow) -> NewJob<'a> {
    NewJob {
        queue: QUEUE,
        id,
        priority: 50,
        frame: Bytes::from(format!("job {id}")),
        timeout: Duration::from_secs(30),
        flow,
        max_waiting: None,
        max_wait_boost: None,
        front: FRONT,
        method: "GET",
    }
}

fn options(token: &str) -> ClaimOptions<'_> {
    ClaimOptions {
        token,
        lease: Duration::from_secs(30),
        max_inflight_total: None,
        max_wait_boost: None,
        worker: WORKER,
        max_jobs: 8,
        retry_methods: &[],
        ahead: false,
    }
}

/// `thrctl pause` sets the queue's `paused` key: nothing is claimed until
/// it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_queue_is_not_claimed() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    b.enqueue(job("p1", &free)).await.unwrap();
    let paused = b.queue_keys(QUEUE).paused.clone();
    let _: () = redis.conn().set(&paused, 1).unwrap();
    assert!(matches!(
        b.claim(QUEUE, options("t1")).await.unwrap(),
        ClaimOutcome::Idle { retry_in: None }
    ));
    let _: () = redis.conn().del(&paused).unwrap();
    match b.claim(QUEUE, options("t2")).await.unwrap() {
        ClaimOutcome::Jobs(jobs) => assert_eq!(jobs[0].id(), "p1"),
        other => panic!("resumed: p1 is claimed, got {other:?}"),
    }
}

/// A job's whole life (enqueue, claim, reply) leaves no waiting, running or
/// quota state behind: only its settled marker, which expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_leaves_no_state_behind() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let flow = Flow {
        quotas: vec![QuotaKey {
            token: "tenant=a".into(),
            max_concurrent: 2,
            interval_ms: 10.0,
            burst: 5,
            max_waiting: 10,
        }],
    };
    b.enqueue(job("j1", &flow)).await.unwrap();
    let ClaimOutcome::Jobs(jobs) = b.claim(QUEUE, options("t1")).await.unwrap() else {
        panic!("j1 is claimed");
    };
    let lease = &jobs[0].lease;
    let frame = Reply::plain("j1", 200, "ok", WORKER, &[]);
    assert_eq!(b.reply(lease, frame, 1).await.unwrap(), Delivery::Delivered);
    let q = b.queue_keys(QUEUE);
    let ks = b.keyspace();
    let mut conn = redis.conn();
    for key in [&q.pending, &q.flow_jobs, &q.flows, &q.leases, &ks.holders] {
        let n: u64 = conn.zcard(key).unwrap();
        assert_eq!(n, 0, "{key} is empty");
    }
    for key in [
        &q.jobs,
        &q.info,
        &q.owners,
        &q.flowdefs,
        &ks.held,
        &ks.quota_waiting,
    ] {
        let n: u64 = conn.hlen(key).unwrap();
        assert_eq!(n, 0, "{key} is empty");
    }
    let ttl: i64 = conn.pttl(q.settled("j1")).unwrap();
    assert!(ttl > 0, "the settled marker expires (pttl {ttl})");
    let claim_ttl: i64 = conn.pttl(q.claim("t1")).unwrap();
    assert!(
        claim_ttl == -2 || claim_ttl > 0,
        "the claim record expires (pttl {claim_ttl})"
    );
}

/// An enqueue's payloads are stored by its caller in the same transaction
/// as the script (`Scripts::enqueue`): a job the script does not queue
/// (refused, settled, a dead letter gone) leaves no payload behind, a
/// repeat of a waiting job leaves that job's payload in place, and a
/// withdraw takes a payload whose script never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_that_queues_nothing_leaves_no_payload() {
    use thr_broker::Admission;

    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    let q = b.queue_keys(QUEUE);
    let mut conn = redis.conn();
    let mut stored = |id: &str| -> bool { conn.hexists(&q.jobs, id).unwrap() };
    let capped = |id| NewJob {
        max_waiting: Some(1),
        ..job(id, &free)
    };
    assert_eq!(b.enqueue(capped("w1")).await.unwrap(), Admission::Queued);
    assert!(matches!(
        b.enqueue(capped("w2")).await.unwrap(),
        Admission::Refused { .. }
    ));
    assert!(!stored("w2"), "a refused job's payload is gone");
    assert_eq!(b.enqueue(capped("w1")).await.unwrap(), Admission::Queued);
    assert!(stored("w1"), "a repeat keeps the waiting job's payload");
    let ClaimOutcome::Jobs(jobs) = b.claim(QUEUE, options("t1")).await.unwrap() else {
        panic!("w1 is claimed");
    };
    assert_eq!(jobs[0].frame, Bytes::from("job w1"));
    let reply = Reply::plain("w1", 200, "ok", WORKER, &[]);
    assert_eq!(
        b.reply(&jobs[0].lease, reply, 1).await.unwrap(),
        Delivery::Delivered
    );
    assert_eq!(
        b.enqueue(job("w1", &free)).await.unwrap(),
        Admission::Settled
    );
    assert!(!stored("w1"), "a settled job's payload is not stored again");
    // A payload whose script never ran (its transaction failed half-way:
    // the front was told the outcome is unknown) goes with the withdraw
    // that front sends when it gives up.
    let _: () = redis.conn().hset(&q.jobs, "w3", "job w3").unwrap();
    b.withdraw(QUEUE, "w3", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(!stored("w3"), "an orphan payload is withdrawn");
}

/// A streamed response's pieces are stored under their numbers by plain
/// commands around the scripts that number them (`Scripts::push_pieces`,
/// `take_pieces`): a push repeated after the front took its pieces, or
/// one past the window, leaves no piece behind that nobody will read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_not_kept_by_a_push_are_not_left_in_redis() {
    use thr_broker::Pushed;
    use thr_core::envelope::{Piece, WINDOW};

    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    b.enqueue(job("s1", &free)).await.unwrap();
    let ClaimOutcome::Jobs(jobs) = b.claim(QUEUE, options("t1")).await.unwrap() else {
        panic!("s1 is claimed");
    };
    let lease = &jobs[0].lease;
    b.stream_head(lease, Bytes::from("head")).await.unwrap();
    let piece = |n: usize| Piece::Data(Bytes::from(format!("piece {n}")));
    let pieces = |from: usize, count: usize| (from..from + count).map(piece).collect::<Vec<_>>();
    let key = b.keyspace().pieces("s1");
    let mut conn = redis.conn();
    let mut stored = || -> usize { conn.hlen(&key).unwrap() };
    assert_eq!(
        b.push_pieces(lease, 0, &pieces(0, 3)).await.unwrap(),
        Pushed::Taken(3)
    );
    let taken = b.take_pieces("s1", 0, 64).await.unwrap().unwrap();
    assert_eq!(taken, pieces(0, 3));
    // The front has them all: its next read drops them.
    assert_eq!(b.take_pieces("s1", 3, 64).await.unwrap(), Some(vec![]));
    assert_eq!(stored(), 0);
    assert_eq!(
        b.push_pieces(lease, 0, &pieces(0, 3)).await.unwrap(),
        Pushed::Taken(3),
        "repeated after its answer was lost"
    );
    assert_eq!(stored(), 0, "pieces the front took are not stored again");
    let more = WINDOW + 4;
    assert_eq!(
        b.push_pieces(lease, 3, &pieces(3, more)).await.unwrap(),
        Pushed::Taken(WINDOW)
    );
    assert_eq!(stored(), WINDOW, "pieces past the window are not kept");
    assert_eq!(
        b.take_pieces("s1", 3, 64).await.unwrap().unwrap(),
        pieces(3, WINDOW)
    );
}

/// A reply whose job Redis lost (restarted empty, flushed) still reaches
/// its front: nobody else can answer it (ARCHITECTURE.md decision 13). The
/// generation tells daemons the data was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_survives_lost_data() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    let before = b.heartbeat(Daemon::Front, FRONT, "{}").await.unwrap();
    b.enqueue(job("j1", &free)).await.unwrap();
    let ClaimOutcome::Jobs(jobs) = b.claim(QUEUE, options("t1")).await.unwrap() else {
        panic!("j1 is claimed");
    };
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
    let frame = Reply::plain("j1", 200, "ok", WORKER, &[]);
    assert_eq!(
        b.reply(&jobs[0].lease, frame, 1).await.unwrap(),
        Delivery::Delivered
    );
    let mut front = b.replies(FRONT);
    let got = front.next_batch(Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1, "the reply reached {FRONT}");
    let after = b.heartbeat(Daemon::Front, FRONT, "{}").await.unwrap();
    assert_ne!(after.generation, before.generation, "a new generation");
    assert_eq!(after.since_last, None, "Redis forgot {FRONT}");
}

/// Jobs whose clients gave up are dropped by claims a slice at a time:
/// a claim that met 200 of them stops and rings, and the next goes on, so
/// a thousand expired jobs never hold Redis in one call, and none is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_drop_expired_jobs_a_slice_at_a_time() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    let ids: Vec<String> = (0..1_000).map(|i| format!("gone-{i}")).collect();
    let enqueues = ids.iter().map(|id| {
        b.enqueue(NewJob {
            timeout: Duration::from_millis(1),
            ..job(id, &free)
        })
    });
    for admitted in futures_util::future::join_all(enqueues).await {
        admitted.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.enqueue(job("fresh", &free)).await.unwrap();
    let mut calls = 0;
    let jobs = loop {
        calls += 1;
        assert!(calls <= 50, "fresh is reached");
        match b
            .claim(QUEUE, options(&format!("slice-{calls}")))
            .await
            .unwrap()
        {
            ClaimOutcome::Jobs(jobs) => break jobs,
            ClaimOutcome::Idle { .. } => {}
            ClaimOutcome::Unheld => panic!("only a claim ahead answers Unheld"),
        }
    };
    assert_eq!(jobs[0].id(), "fresh");
    assert!(calls >= 5, "1,000 drops take several calls, not {calls}");
    let q = b.queue_keys(QUEUE);
    let mut conn = redis.conn();
    let pending: u64 = conn.zcard(&q.pending).unwrap();
    assert_eq!(pending, 0, "no dropped job is left waiting");
    let records: u64 = conn.hlen(&q.info).unwrap();
    assert_eq!(records, 1, "only fresh's record is left");
}

/// A Redis that lost its scripts (restarted, `SCRIPT FLUSH`) answers
/// NOSCRIPT to the claim pipelined behind a doorbell pop: the worker then
/// claims by invocation, which loads the script, and gets its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doorbell_claim_survives_lost_scripts() {
    use thr_broker::Doorbell;

    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    let mut bell = b.doorbell(QUEUE);
    // Enqueues `id`, then waits and claims it under `token`.
    let mut handed = async |id: &str, token: &str| {
        b.enqueue(job(id, &free)).await.unwrap();
        match b
            .wait_and_claim(&mut bell, QUEUE, Duration::from_secs(2), options(token))
            .await
            .unwrap()
        {
            ClaimOutcome::Jobs(jobs) => assert_eq!(jobs[0].id(), id),
            other => panic!("{id} is claimed, got {other:?}"),
        }
    };
    // The pipelined claim works while Redis knows the script, and after.
    handed("k1", "t1").await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.conn())
        .unwrap();
    handed("k2", "t2").await;
    // The doorbell's connection still works for a plain wait.
    assert!(!bell.wait(Duration::from_millis(50)).await.unwrap());
}

/// Nobody can beat while Redis is stalled: when it answers again, silence
/// is counted from then (`LIVENESS_GAP`, `lib/liveness.lua`), whatever call
/// comes first. Here the first call after the stall is a claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_does_not_make_live_fronts_dead() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    b.heartbeat(Daemon::Front, FRONT, "{}").await.unwrap();
    b.enqueue(job("j1", &free)).await.unwrap();
    stall(&redis, Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(3300)).await;
    match b.claim(QUEUE, options("t1")).await.unwrap() {
        ClaimOutcome::Jobs(jobs) => assert_eq!(jobs[0].id(), "j1"),
        other => panic!(
            "{FRONT} could not beat while Redis was stalled: its job must not be dropped; got {other:?}"
        ),
    }
}

/// The same for workers: a reap that comes first after a stall longer
/// than a worker's timeout takes no live worker's job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_does_not_make_live_workers_lost() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let free = Flow::default();
    b.heartbeat(Daemon::Worker, WORKER, "{}").await.unwrap();
    b.enqueue(job("j1", &free)).await.unwrap();
    let ClaimOutcome::Jobs(jobs) = b.claim(QUEUE, options("t1")).await.unwrap() else {
        panic!("j1 is claimed");
    };
    let timeout = HEARTBEAT_TIMEOUT;
    stall(&redis, timeout + Duration::from_secs(1));
    tokio::time::sleep(timeout + Duration::from_millis(1300)).await;
    let policy = RetryPolicy {
        methods: vec!["GET".into()],
        max_attempts: 3,
    };
    assert_eq!(
        b.reap(QUEUE, &policy).await.unwrap(),
        Reaped::default(),
        "{WORKER} could not beat while Redis was stalled: its lease stays"
    );
    assert!(
        b.renew(&jobs[0].lease, Duration::from_secs(30))
            .await
            .unwrap()
    );
}
