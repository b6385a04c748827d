//! The Redis broker on its own: ordering, withdrawal, deadlines, blocking
//! pops that outlive redis-rs's default response timeout, restarts. The
//! trait's whole contract is in `conformance.rs`; these are the parts that
//! are about Redis itself.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thr_broker::protocol::keys::{Keyspace, QueueKeys};
use thr_broker::{
    Broker, ClaimOptions, ClaimOutcome, Claimed, Daemon, Doorbell, NewJob, RedisBroker,
    ReplyStream, Withdrawal,
};
use thr_core::quota::{Flow, QuotaKey};

use crate::support::RedisServer;

fn broker(redis: &RedisServer) -> RedisBroker {
    // Generous: these tests are about what the broker does, not about how
    // fast a loaded CI machine lets it answer.
    RedisBroker::new(&redis.url(), Duration::from_secs(2)).unwrap()
}

/// The keys of queue `q` in the default namespace.
fn keys(queue: &str) -> QueueKeys {
    Keyspace::new("default").queue(queue)
}

static FREE: LazyLock<Flow> = LazyLock::new(Flow::default);

fn job<'a>(id: &'a str, priority: u8) -> NewJob<'a> {
    NewJob {
        queue: "q",
        id,
        priority,
        frame: Bytes::from(format!("frame-{id}")),
        timeout: Duration::from_secs(30),
        flow: &FREE,
        max_waiting: None,
        max_wait_boost: None,
        front: "f",
        method: "GET",
    }
}

/// A claim token never used before.
fn token() -> &'static str {
    static N: AtomicU64 = AtomicU64::new(0);
    Box::leak(format!("t{}", N.fetch_add(1, Ordering::Relaxed)).into_boxed_str())
}

fn options() -> ClaimOptions<'static> {
    ClaimOptions {
        token: token(),
        lease: Duration::from_secs(30),
        max_inflight_total: None,
        max_wait_boost: None,
        worker: "",
        max_jobs: 1,
        retry_methods: &[],
        ahead: false,
    }
}

async fn claim(b: &RedisBroker, queue: &str) -> Option<Claimed> {
    match b.claim(queue, options()).await.unwrap() {
        ClaimOutcome::Jobs(mut c) => {
            assert_eq!(c.len(), 1, "one job asked for");
            Some(c.remove(0))
        }
        ClaimOutcome::Idle { .. } => None,
        ClaimOutcome::Unheld => panic!("only a claim ahead answers Unheld"),
    }
}

async fn claim_all(b: &RedisBroker) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(c) = claim(b, "q").await {
        assert_eq!(c.frame, Bytes::from(format!("frame-{}", c.id())));
        ids.push(c.id().to_string());
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
        .arg(&keys("q").leases)
        .query(&mut conn)
        .unwrap();
    assert_eq!(leased, 7, "every claimed job holds a lease");
}

#[tokio::test]
async fn withdraw_removes_waiting_jobs_only() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let remember = Duration::from_secs(30);
    b.enqueue(job("x", 50)).await.unwrap();
    b.enqueue(job("y", 50)).await.unwrap();
    assert_eq!(
        b.withdraw("q", "y", remember).await.unwrap(),
        Withdrawal::Withdrawn
    );
    let claimed = claim(&b, "q").await.unwrap();
    assert_eq!(claimed.id(), "x");
    assert_eq!(
        b.withdraw("q", "x", remember).await.unwrap(),
        Withdrawal::Started,
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
    assert_eq!(claimed.id(), "fresh");
    assert!(
        claimed.remaining > Duration::from_secs(25) && claimed.remaining <= Duration::from_secs(30)
    );
    let mut conn = redis.conn();
    let jobs: usize = redis::cmd("HLEN")
        .arg(&keys("q").jobs)
        .query(&mut conn)
        .unwrap();
    assert_eq!(jobs, 1, "the stale job's payload is gone");
}

#[tokio::test]
async fn blocking_pops_longer_than_500ms_still_deliver() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    b.enqueue(NewJob {
        front: "front1",
        ..job("j1", 50)
    })
    .await
    .unwrap();
    let j1 = claim(&b, "q").await.unwrap();
    let mut replies = b.replies("front1");
    let mut doorbell = b.doorbell("q");
    // The enqueue's doorbell token was spent by the claim.
    let pusher = {
        let b = b.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(900)).await;
            b.reply(&j1.lease, Bytes::from_static(b"reply-1"), 0)
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
    // Nothing waits: the release does not ring the doorbell.
    assert!(!doorbell.wait(Duration::from_millis(300)).await.unwrap());
    let rang = doorbell.wait(Duration::from_secs(3)).await.unwrap();
    assert!(rang, "the doorbell rang after a wait of about 900 ms");
    pusher.await.unwrap();
    // Nothing was left behind in Redis by a timed-out client-side read.
    let mut conn = redis.conn();
    let left: usize = redis::cmd("LLEN")
        .arg(Keyspace::new("default").replies("front1"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn replies_come_in_batches() {
    let redis = RedisServer::start();
    let b = broker(&redis);
    let ids: Vec<String> = (0..300).map(|i| format!("j{i:03}")).collect();
    for id in &ids {
        b.enqueue(job(id, 50)).await.unwrap();
    }
    for id in &ids {
        let c = claim(&b, "q").await.unwrap();
        assert_eq!(c.id(), id);
        b.reply(&c.lease, Bytes::from(format!("r{id}")), 0)
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
        Bytes::from_static(b"rj000"),
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
async fn the_first_call_after_redis_comes_back_goes_through() {
    let mut redis = RedisServer::start();
    let b = broker(&redis);
    b.enqueue(job("before", 50)).await.unwrap();
    redis.kill();
    // While Redis is down, calls fail, and the shared connection's last
    // reconnection with them.
    assert!(b.enqueue(job("down", 50)).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.enqueue(job("down", 50)).await.is_err());
    // Time for the reconnection that call started to fail too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    // Not told of that old failure: it was a refused connection, so the
    // call was sent again on a new one.
    b.enqueue(job("after", 50))
        .await
        .expect("the first call after the restart goes through");
    assert_eq!(claim_all(&b).await, ["after"]);
}

#[tokio::test]
async fn a_heartbeat_through_after_failed_ones_ends_the_retry_pauses() {
    let mut redis = RedisServer::start();
    let b = broker(&redis);
    let beat = || b.heartbeat(Daemon::Worker, "w1", "{}");
    beat().await.unwrap();
    // A heartbeat through after a single failed one announces nothing:
    // beats that fail and pass in turn (Redis at its memory limit) keep
    // the loops' backoff.
    redis.kill();
    assert!(beat().await.is_err());
    redis.restart();
    let pause = b.recovery().sleep(Duration::from_millis(1500));
    beat().await.expect("Redis is back");
    let started = Instant::now();
    pause.await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "a single failed beat ended the pause"
    );
    // After two or more, it ends every pause.
    redis.kill();
    assert!(beat().await.is_err());
    assert!(beat().await.is_err());
    let pause = b.recovery().sleep(Duration::from_secs(60));
    redis.restart();
    beat().await.expect("Redis is back");
    tokio::time::timeout(Duration::from_secs(20), pause)
        .await
        .expect("the pause ended when a heartbeat got through");
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
                .arg(&keys("default").dead_reasons)
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
    let one = Flow {
        quotas: vec![QuotaKey {
            token: "one=x".into(),
            max_concurrent: 1,
            interval_ms: 0.0,
            burst: 0,
            max_waiting: 0,
        }],
    };
    for (i, id) in ["q1", "q2", "q3"].into_iter().enumerate() {
        b.enqueue(NewJob {
            flow: &one,
            ..job(id, 10 + i as u8)
        })
        .await
        .unwrap();
    }
    for (id, prio) in [("low", 90), ("mid", 50), ("high", 5)] {
        b.enqueue(job(id, prio)).await.unwrap();
    }
    let jobs = |outcome: ClaimOutcome| match outcome {
        ClaimOutcome::Jobs(jobs) => jobs,
        ClaimOutcome::Idle { .. } => Vec::new(),
        ClaimOutcome::Unheld => panic!("only a claim ahead answers Unheld"),
    };
    let ids = |outcome: ClaimOutcome| {
        jobs(outcome)
            .iter()
            .map(|c| c.id().to_string())
            .collect::<Vec<_>>()
    };
    let batch = |n| ClaimOptions {
        max_jobs: n,
        ..options()
    };
    // Priority order; the limited flow gives one job, its others wait.
    let first = jobs(b.claim("q", batch(3)).await.unwrap());
    let first_ids: Vec<&str> = first.iter().map(|c| c.id()).collect();
    assert_eq!(first_ids, ["high", "q1", "mid"]);
    assert_eq!(first[1].lease.holds, ["one=x"], "q1 holds its quota slot");
    let rest = ids(b.claim("q", batch(10)).await.unwrap());
    assert_eq!(rest, ["low"], "q2 and q3 wait for q1's slot");
    assert!(ids(b.claim("q", batch(10)).await.unwrap()).is_empty());
    b.reply(&first[1].lease, Bytes::from_static(b"done"), 1)
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
                ..options()
            },
        )
        .await
        .unwrap()
    {
        for c in jobs {
            b.reply(&c.lease, Bytes::from_static(b"r"), 7)
                .await
                .unwrap();
            served += 1;
        }
    }
    assert_eq!(served, 1200);
    let mut conn = redis.conn();
    let kept: usize = redis::cmd("LLEN")
        .arg(&keys("q").latency)
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
        ..options()
    };
    let ClaimOutcome::Jobs(claimed) = b.claim("q", worker).await.unwrap() else {
        panic!("the job is claimed");
    };
    let reaped = b.reap("q", &policy).await.unwrap();
    assert_eq!(reaped.requeued + reaped.answered + reaped.dead_lettered, 0);

    // The same claim, made long ago by a worker never heard of, while
    // other daemons beat (Redis is not paused): lost.
    b.heartbeat(thr_broker::Daemon::Worker, "w-alive", "{}")
        .await
        .unwrap();
    let mut conn = redis.conn();
    let owner = thr_broker::protocol::records::Owner {
        worker: "w-gone".into(),
        token: claimed[0].lease.token.clone(),
        claimed_ms: 1000,
        streaming: false,
    };
    let _: () = redis::cmd("HSET")
        .arg(&keys("q").owners)
        .arg("fresh")
        .arg(owner.encode())
        .query(&mut conn)
        .unwrap();
    let reaped = b.reap("q", &policy).await.unwrap();
    assert_eq!(
        reaped.requeued + reaped.answered + reaped.dead_lettered,
        1,
        "{reaped:?}"
    );
}

/// What an enqueue does with a worker's offer (ARCHITECTURE.md decision
/// 27), seen in Redis: a lone GET goes to the offer's list, leased under its
/// token, with no ring and no place in `pending`; the claim with that token
/// returns it. A POST (not among the offer's methods), a paused queue and
/// an offer of a dead worker leave the job waiting for a claim; the dead
/// worker's offer is removed, the others stay.
#[tokio::test]
async fn an_offer_takes_a_lone_job_only_when_it_may() {
    use thr_broker::protocol::records::{Handed, Offer};
    let redis = RedisServer::start();
    let b = broker(&redis);
    let k = keys("q");
    let ks = Keyspace::new("default");
    let mut conn = redis.conn();
    let offer = |worker: &str| {
        Offer {
            worker: worker.into(),
            lease_ms: 30_000,
            max_inflight_total: 0,
            methods: "GET HEAD".into(),
        }
        .encode()
    };
    let offers = |conn: &mut redis::Connection| -> Vec<String> {
        redis::cmd("HKEYS").arg(&k.offers).query(conn).unwrap()
    };
    let waiting = |conn: &mut redis::Connection, id: &str| -> bool {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&k.pending)
            .arg(id)
            .query(conn)
            .unwrap();
        score.is_some()
    };
    let rings = |conn: &mut redis::Connection| -> usize {
        let n: usize = redis::cmd("LLEN").arg(&k.wake).query(conn).unwrap();
        let _: () = redis::cmd("DEL").arg(&k.wake).query(conn).unwrap();
        n
    };

    // w1 is alive: it has beaten (an offer of a worker with no beat, one
    // that retired, takes nothing).
    b.heartbeat(thr_broker::Daemon::Worker, "w1", "{}")
        .await
        .unwrap();
    // A GET: taken.
    let _: () = redis::cmd("HSET")
        .arg(&k.offers)
        .arg("offer-1")
        .arg(offer("w1"))
        .query(&mut conn)
        .unwrap();
    b.enqueue(job("g1", 50)).await.unwrap();
    assert!(offers(&mut conn).is_empty(), "the offer is used up");
    assert!(!waiting(&mut conn, "g1"), "g1 does not wait");
    assert_eq!(rings(&mut conn), 0, "nobody is woken for it");
    let handed: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(k.offer("offer-1"))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(handed.len(), 1);
    let handed = Handed::decode(&handed[0]).expect("a handed record");
    assert_eq!(handed.id, "g1");
    assert_eq!(handed.frame, b"frame-g1");
    let generation: String = redis::cmd("GET")
        .arg(&ks.generation)
        .query(&mut conn)
        .unwrap();
    assert_eq!(handed.generation, generation);
    let lease: Option<f64> = redis::cmd("ZSCORE")
        .arg(&k.leases)
        .arg("g1")
        .query(&mut conn)
        .unwrap();
    assert!(lease.is_some(), "g1 is leased");
    let again = ClaimOptions {
        token: "offer-1",
        worker: "w1",
        ..options()
    };
    let Some(ClaimOutcome::Jobs(jobs)) = b.claim("q", again).await.ok() else {
        panic!("the claim under the offer's token returns g1");
    };
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id(), "g1");
    let left: usize = redis::cmd("EXISTS")
        .arg(k.offer("offer-1"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(left, 0, "the claim cleared the offer's list");
    b.reply(&jobs[0].lease, Bytes::from_static(b"r"), 1)
        .await
        .unwrap();

    // A POST: the offer stays, the job waits and rings.
    let _: () = redis::cmd("HSET")
        .arg(&k.offers)
        .arg("offer-2")
        .arg(offer("w1"))
        .query(&mut conn)
        .unwrap();
    b.enqueue(NewJob {
        method: "POST",
        ..job("p1", 50)
    })
    .await
    .unwrap();
    assert_eq!(offers(&mut conn), ["offer-2"]);
    assert!(waiting(&mut conn, "p1"));
    assert_eq!(rings(&mut conn), 1);
    assert_eq!(claim_all(&b).await, ["p1"]);

    // Paused: the same.
    let _: () = redis::cmd("SET")
        .arg(&k.paused)
        .arg(1)
        .query(&mut conn)
        .unwrap();
    b.enqueue(job("g2", 50)).await.unwrap();
    assert_eq!(offers(&mut conn), ["offer-2"]);
    assert!(waiting(&mut conn, "g2"));
    let _: () = redis::cmd("DEL").arg(&k.paused).query(&mut conn).unwrap();
    assert_eq!(claim_all(&b).await, ["g2"]);
    rings(&mut conn);

    // A dead worker's offer: removed, and the job waits. Beats are being
    // judged (the latest of anyone's just now, no pause since), and
    // w-dead's last was long ago.
    let _: () = redis::cmd("DEL").arg(&k.offers).query(&mut conn).unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&k.offers)
        .arg("offer-3")
        .arg(offer("w-dead"))
        .query(&mut conn)
        .unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut conn).unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let _: () = redis::cmd("HSET")
        .arg(&ks.liveness)
        .arg("last")
        .arg(now_ms)
        .arg("resumed")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(&ks.workers)
        .arg(1)
        .arg("w-dead")
        .query(&mut conn)
        .unwrap();
    b.enqueue(job("g3", 50)).await.unwrap();
    assert!(
        offers(&mut conn).is_empty(),
        "the dead worker's offer is gone"
    );
    assert!(waiting(&mut conn, "g3"));
    assert_eq!(claim_all(&b).await, ["g3"]);
}
