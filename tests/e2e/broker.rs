//! The Redis broker on its own: ordering, cancellation, deadlines, blocking
//! pops that outlive redis-rs's default response timeout, restarts.

use std::time::Duration;

use bytes::Bytes;
use thr_broker::{
    Broker, ClaimOptions, ClaimOutcome, Claimed, Doorbell, NewJob, RedisBroker, ReplyStream,
};

use crate::support::RedisServer;

fn broker(redis: &RedisServer) -> RedisBroker {
    RedisBroker::new(&redis.url(), Duration::from_millis(750)).unwrap()
}

fn job<'a>(id: &'a str, priority: u8) -> NewJob<'a> {
    NewJob {
        queue: "q",
        id,
        priority,
        frame: Bytes::from(format!("frame-{id}")),
        timeout: Duration::from_secs(30),
        flow: "-",
        flow_definition: "",
        max_waiting: None,
        max_wait_boost: None,
        front: "",
    }
}

const OPTIONS: ClaimOptions = ClaimOptions {
    lease: Duration::from_secs(30),
    max_inflight_total: None,
    max_wait_boost: None,
    worker: "",
    max_jobs: 1,
};

async fn claim(b: &RedisBroker, queue: &str) -> Option<Claimed> {
    match b.claim(queue, OPTIONS).await.unwrap() {
        ClaimOutcome::Jobs(mut c) => {
            assert_eq!(c.len(), 1, "one job asked for");
            Some(c.remove(0))
        }
        ClaimOutcome::Idle { .. } => None,
    }
}

async fn claim_all(b: &RedisBroker) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(c) = claim(b, "q").await {
        assert_eq!(c.frame, Bytes::from(format!("frame-{}", c.id)));
        ids.push(c.id);
    }
    ids
}

#[tokio::test]
async fn claims_by_priority_then_arrival() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    for (id, p) in [
        ("a", 50),
        ("b", 80),
        ("c", 1),
        ("d", 50),
        ("e", 99),
        ("f", 1),
        ("g", 50),
    ] {
        b.enqueue(job(id, p)).await.unwrap();
    }
    assert_eq!(claim_all(&b).await, ["c", "f", "a", "d", "g", "b", "e"]);
    let mut conn = redis.conn();
    let leased: usize = redis::cmd("ZCARD")
        .arg("thr:{q:q}:leases")
        .query(&mut conn)
        .unwrap();
    assert_eq!(leased, 7, "every claimed job holds a lease");
}

#[tokio::test]
async fn cancel_withdraws_waiting_jobs_only() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    b.enqueue(job("x", 50)).await.unwrap();
    b.enqueue(job("y", 50)).await.unwrap();
    assert!(b.cancel("q", "y", "-").await.unwrap());
    let claimed = claim(&b, "q").await.unwrap();
    assert_eq!(claimed.id, "x");
    assert!(
        !b.cancel("q", "x", "-").await.unwrap(),
        "a running job cannot be withdrawn"
    );
    assert!(claim(&b, "q").await.is_none());
}

#[tokio::test]
async fn jobs_past_their_clients_deadline_are_never_claimed() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    b.enqueue(NewJob {
        timeout: Duration::from_millis(100),
        ..job("stale", 1)
    })
    .await
    .unwrap();
    b.enqueue(job("fresh", 50)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let claimed = claim(&b, "q").await.unwrap();
    assert_eq!(claimed.id, "fresh");
    assert!(
        claimed.remaining > Duration::from_secs(25) && claimed.remaining <= Duration::from_secs(30)
    );
    let mut conn = redis.conn();
    let jobs: usize = redis::cmd("HLEN")
        .arg("thr:{q:q}:jobs")
        .query(&mut conn)
        .unwrap();
    assert_eq!(jobs, 1, "the stale job's payload is gone");
}

#[tokio::test]
async fn blocking_pops_longer_than_500ms_still_deliver() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let mut replies = b.replies("front1");
    let mut doorbell = b.doorbell("q");
    let pusher = {
        let b = b.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(900)).await;
            b.reply("q", "front1", "j1", Bytes::from_static(b"reply-1"), 0, &[])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(900)).await;
            b.enqueue(job("j2", 50)).await.unwrap();
        })
    };
    let started = std::time::Instant::now();
    let batch = replies.next_batch(Duration::from_secs(3)).await.unwrap();
    assert_eq!(batch, vec![Bytes::from_static(b"reply-1")]);
    assert!(started.elapsed() >= Duration::from_millis(800));
    let rang = doorbell.wait(Duration::from_secs(3)).await.unwrap();
    assert!(rang, "the doorbell rang after a wait of about 900 ms");
    pusher.await.unwrap();
    // Nothing was left behind in Redis by a timed-out client-side read.
    let mut conn = redis.conn();
    let left: usize = redis::cmd("LLEN")
        .arg("thr:{f:front1}:replies")
        .query(&mut conn)
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn replies_come_in_batches() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    for i in 0..300 {
        b.reply(
            "q",
            "f",
            &format!("j{i}"),
            Bytes::from(format!("r{i}")),
            0,
            &[],
        )
        .await
        .unwrap();
    }
    let mut replies = b.replies("f");
    let mut got = Vec::new();
    let mut calls = 0;
    while got.len() < 300 {
        got.extend(replies.next_batch(Duration::from_secs(1)).await.unwrap());
        calls += 1;
    }
    assert!(calls <= 3, "{calls} round trips for 300 replies");
    assert_eq!(
        got[0],
        Bytes::from_static(b"r0"),
        "first pushed, first popped"
    );
}

#[tokio::test]
async fn scripts_survive_a_redis_restart() {
    let mut redis = RedisServer::start();
    let b = broker(&redis);
    b.enqueue(job("before", 50)).await.unwrap();
    redis.restart();
    // The first command may meet the dead connection; the next reconnects
    // and re-sends the script (NOSCRIPT fallback).
    let mut ok = false;
    for _ in 0..20 {
        if b.enqueue(job("after", 50)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "enqueue works again after the restart");
    assert_eq!(claim_all(&b).await, ["after"]);
}

#[tokio::test]
async fn a_poisoned_job_is_set_aside_and_the_worker_keeps_serving() {
    use crate::support::*;
    let stack = Binaries::start(SlowBackend::builder().start().await, 1, "").await;
    let b = broker(&stack.redis);
    b.enqueue(NewJob {
        queue: "default",
        id: "poison",
        priority: 1,
        frame: Bytes::from_static(b"THRQ\x09not a job"),
        ..job("poison", 1)
    })
    .await
    .unwrap();
    assert_eq!(get(&stack.url(), "/fine").await.status, 200);
    let mut conn = stack.redis.conn();
    let mut why: Option<String> = None;
    until(
        Duration::from_secs(10),
        "the poison is dead-lettered",
        || {
            why = redis::cmd("HGET")
                .arg("thr:{q:default}:dead:reasons")
                .arg("poison")
                .query(&mut conn)
                .unwrap();
            why.is_some()
        },
    )
    .await;
    assert!(why.unwrap().contains("wire version 9"));
    assert_eq!(get(&stack.url(), "/still-fine").await.status, 200);
    stack.stop();
}

#[tokio::test]
async fn one_claim_starts_several_jobs_in_dispatch_order_within_their_quotas() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    // Three jobs of a flow limited to one at a time, then three free ones.
    for (i, id) in ["q1", "q2", "q3"].into_iter().enumerate() {
        b.enqueue(NewJob {
            flow: "one=x",
            flow_definition: "one=x\t1\t0\t0\t0\n",
            ..job(id, 10 + i as u8)
        })
        .await
        .unwrap();
    }
    for (id, prio) in [("low", 90), ("mid", 50), ("high", 5)] {
        b.enqueue(job(id, prio)).await.unwrap();
    }
    let ids = |outcome: ClaimOutcome| match outcome {
        ClaimOutcome::Jobs(jobs) => jobs.into_iter().map(|c| c.id).collect::<Vec<_>>(),
        ClaimOutcome::Idle { .. } => Vec::new(),
    };
    let batch = |n| ClaimOptions {
        max_jobs: n,
        ..OPTIONS
    };
    // Priority order; the limited flow gives one job, its others wait.
    let first = ids(b.claim("q", batch(3)).await.unwrap());
    assert_eq!(first, ["high", "q1", "mid"]);
    let rest = ids(b.claim("q", batch(10)).await.unwrap());
    assert_eq!(rest, ["low"], "q2 and q3 wait for q1's slot");
    assert!(ids(b.claim("q", batch(10)).await.unwrap()).is_empty());
    b.reply(
        "q",
        "f",
        "q1",
        Bytes::from_static(b"done"),
        1,
        &["one=x".into()],
    )
    .await
    .unwrap();
    assert_eq!(ids(b.claim("q", batch(10)).await.unwrap()), ["q2"]);
}

#[tokio::test]
async fn served_jobs_leave_a_bounded_trail_of_latency_samples() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let ids: Vec<String> = (0..1200).map(|i| format!("j{i}")).collect();
    for id in &ids {
        b.enqueue(job(id, 50)).await.unwrap();
    }
    let mut served = 0;
    while let ClaimOutcome::Jobs(jobs) = b
        .claim(
            "q",
            ClaimOptions {
                max_jobs: 16,
                ..OPTIONS
            },
        )
        .await
        .unwrap()
    {
        for c in jobs {
            b.reply("q", "f", &c.id, Bytes::from_static(b"r"), 7, &[])
                .await
                .unwrap();
            served += 1;
        }
    }
    assert_eq!(served, 1200);
    let mut conn = redis.conn();
    let kept: usize = redis::cmd("LLEN")
        .arg("thr:{q:q}:latency")
        .query(&mut conn)
        .unwrap();
    assert!((1024..=1088).contains(&kept), "{kept} samples kept");
    let overview = b.queue_overview("q").await.unwrap();
    let latency = overview.latency.expect("jobs were served");
    assert_eq!(latency.samples as usize, kept);
    assert_eq!((latency.backend_p50, latency.backend_p99), (7, 7));
    assert!(latency.total_p99 >= 7);
}

#[tokio::test]
async fn a_fresh_claim_by_a_worker_with_no_heartbeat_yet_is_not_reaped() {
    // After Redis restarts empty, a live worker's claims precede its next
    // heartbeat: they must not be taken for a dead worker's.
    let redis = RedisServer::start();
    let b = broker(&redis);
    let policy = thr_broker::RetryPolicy {
        methods: vec!["GET".into()],
        max_attempts: 3,
    };
    b.enqueue(job("fresh", 50)).await.unwrap();
    let worker = ClaimOptions {
        worker: "w-just-reconnected",
        ..OPTIONS
    };
    assert!(matches!(
        b.claim("q", worker).await.unwrap(),
        ClaimOutcome::Jobs(_)
    ));
    let reaped = b.reap("q", &policy).await.unwrap();
    assert_eq!(reaped.requeued + reaped.answered + reaped.dead_lettered, 0);

    // The same claim, made long ago by a worker never heard of: lost.
    let mut conn = redis.conn();
    let _: () = redis::cmd("HSET")
        .arg("thr:{q:q}:owners")
        .arg("fresh")
        .arg("w-gone\t1000")
        .query(&mut conn)
        .unwrap();
    let reaped = b.reap("q", &policy).await.unwrap();
    assert_eq!(
        reaped.requeued + reaped.answered + reaped.dead_lettered,
        1,
        "{reaped:?}"
    );
}
