//! Faults, with the real binaries: Redis paused or slowed past
//! `command_timeout` under load, a front killed with -9 or stopped, Redis
//! restarted empty. The contract: every client gets exactly one answer, no
//! POST runs twice, nobody is told "try again" (503) for a job that ran, no
//! lease or quota slot outlives its job, no reply is delivered twice, and a
//! dead front's jobs stop reaching the backend within a second.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

/// A stack whose Redis calls time out after 400 ms, with room for slow
/// moments in the clients' wait.
async fn stack(backend: SlowBackend, workers: usize, max_inflight: usize) -> Binaries {
    Binaries::start_with(RedisServer::start(), backend, workers, |text| {
        text.replace("reply_timeout = \"10s\"", "reply_timeout = \"20s\"")
            .replace("[redis]\n", "[redis]\ncommand_timeout = \"400ms\"\n")
            .replace(
                "max_inflight = 64",
                &format!("max_inflight = {max_inflight}"),
            )
    })
    .await
}

/// How many times the backend ran each target.
fn runs(backend: &SlowBackend) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in backend.requests() {
        *n.entry(r.target).or_default() += 1;
    }
    n
}

/// Sends `per_client` POSTs from each of `clients` clients, one after the
/// other, while `fault` runs; returns (target, status) for every request.
async fn load_during(
    url: &str,
    clients: usize,
    per_client: usize,
    fault: impl Future<Output = ()>,
) -> Vec<(String, u16)> {
    let client = client();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for i in 0..per_client {
                    let target = format!("/job/{c}-{i}?delay=40");
                    let req = Req::new("POST", &target).body(target.clone());
                    let status = send(&client, &url, &req).await.status;
                    seen.push((target, status));
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                seen
            })
        })
        .collect();
    fault.await;
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

/// After the dust settles: every 200 ran exactly once, nothing ran twice,
/// no 503 ran at all, no lease or slot is left, each run delivered one reply.
async fn check_contract(stack: &Binaries, seen: &[(String, u16)]) {
    // Let stragglers (a late enqueue, a requeue) show themselves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ran = runs(&stack.backend);
    for (target, status) in seen {
        let n = ran.get(target).copied().unwrap_or(0);
        assert!(n <= 1, "{target} ran {n} times");
        match status {
            200 => assert_eq!(n, 1, "{target} answered 200 but ran {n} times"),
            503 => assert_eq!(n, 0, "{target} was told to try again but ran"),
            504 => {}
            other => panic!("{target}: unexpected status {other}"),
        }
    }
    let mut conn = stack.redis.conn();
    let q = keys("default");
    let leases: usize = redis::cmd("ZCARD").arg(&q.leases).query(&mut conn).unwrap();
    assert_eq!(leases, 0, "no lease outlives its job");
    let holders: usize = redis::cmd("ZCARD")
        .arg(&keyspace().holders)
        .query(&mut conn)
        .unwrap();
    assert_eq!(holders, 0, "no quota slot outlives its job");
    // One latency sample per delivered reply: each run delivered once.
    let delivered: usize = redis::cmd("LLEN").arg(&q.latency).query(&mut conn).unwrap();
    let total_runs: usize = ran.values().sum();
    assert_eq!(delivered, total_runs, "one reply delivered per run");
}

/// A slow Redis is not a failed one: every client of `seen` got 200, and
/// the contract holds.
async fn all_served(stack: &Binaries, seen: &[(String, u16)], what: &str) {
    eprintln!("{what}: {:?}", summary(seen));
    check_contract(stack, seen).await;
    assert!(
        seen.iter().all(|(_, s)| *s == 200),
        "a slow Redis is not a failed one: {:?}",
        summary(seen)
    );
}

fn summary(seen: &[(String, u16)]) -> HashMap<u16, usize> {
    let mut by_status = HashMap::new();
    for (_, s) in seen {
        *by_status.entry(*s).or_default() += 1;
    }
    by_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause_longer_than_command_timeout_under_load() {
    let backend = SlowBackend::builder().workers(8).record(true).start().await;
    let stack = stack(backend, 2, 4).await;
    let pause = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        // Every command of every client waits 3 s: enqueues, claims,
        // releases, heartbeats.
        stall(&stack.redis, Duration::from_secs(3));
    };
    let seen = load_during(&stack.url(), 12, 10, pause).await;
    all_served(&stack, &seen, "CLIENT PAUSE 3000 under load").await;
    stack.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_sleep_longer_than_command_timeout_under_load() {
    let backend = SlowBackend::builder().workers(8).record(true).start().await;
    let stack = stack(backend, 2, 4).await;
    let client = stack.redis.client();
    let sleeps = async move {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let client = client.clone();
            // Redis itself is blocked for 2 s, twice.
            tokio::task::spawn_blocking(move || {
                let mut conn = client.get_connection().unwrap();
                let _: () = redis::cmd("DEBUG")
                    .arg("SLEEP")
                    .arg(2)
                    .query(&mut conn)
                    .unwrap();
            })
            .await
            .unwrap();
        }
    };
    let seen = load_during(&stack.url(), 12, 12, sleeps).await;
    all_served(&stack, &seen, "DEBUG SLEEP 2 (twice) under load").await;
    stack.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_fronts_queued_jobs_stop_reaching_the_backend_within_a_second() {
    // One backend slot, 100 ms a request: 80 jobs make a long queue.
    let backend = SlowBackend::builder()
        .workers(1)
        .delay(Duration::from_millis(100))
        .record(true)
        .start()
        .await;
    let mut stack = stack(backend, 1, 1).await;
    let client = client();
    let waiting: Vec<_> = (0..80)
        .map(|i| {
            let (client, url) = (client.clone(), stack.url());
            tokio::spawn(async move {
                let req = Req::new("POST", format!("/job/{i}")).body("x");
                try_send(&client, &url, &req).await
            })
        })
        .collect();
    until_enqueued(&stack.redis, "default", 80).await;
    stack.front.signal("KILL");
    let killed = Instant::now();
    stack.front.wait();
    // Every client's connection died with the front: no answer, not a wrong one.
    for w in waiting {
        if let Ok(Some(seen)) = w.await {
            assert_eq!(seen.status, 200, "only jobs that ran are answered");
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let late: Vec<Duration> = stack
        .backend
        .requests()
        .iter()
        .filter(|r| r.started > killed)
        .map(|r| r.started - killed)
        .collect();
    let ran = stack.backend.count();
    eprintln!(
        "front killed with {} jobs queued: {} reached the backend after the kill, the last {:?} after it",
        80 - ran.min(80),
        late.len(),
        late.iter().max()
    );
    assert!(
        late.iter().all(|d| *d <= Duration::from_secs(1)),
        "jobs of a dead front reached the backend later than 1 s after its death: {late:?}"
    );
    assert!(ran < 40, "most of the 80 queued jobs never ran ({ran} did)");
    for w in &mut stack.workers {
        w.signal("TERM");
        assert_eq!(w.wait(), Some(0));
    }
}

/// Once Redis is back after an outage long enough for every retry loop
/// to back off to its longest pause (1 to 2 s), the next request is served
/// within a heartbeat or so (the first one through ends the loops'
/// pauses), and its front does not answer 503 from an old failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_resumes_at_once_when_redis_comes_back() {
    let mut stack = stack(SlowBackend::builder().start().await, 1, 4).await;
    assert_eq!(get(&stack.url(), "/before").await.status, 200);
    for round in 0..2 {
        stack.redis.kill();
        tokio::time::sleep(Duration::from_secs(4)).await;
        stack.redis.restart();
        let started = Instant::now();
        let seen = get(&stack.url(), &format!("/after/{round}")).await;
        let took = started.elapsed();
        assert_eq!(seen.status, 200, "round {round}: {seen:?}");
        // Heartbeats come every 200 to 250 ms; a backoff pause lasts up to
        // 2 s. Generous for a loaded machine (the announcement itself is
        // tested without timing in broker.rs).
        assert!(
            took < Duration::from_millis(1500),
            "round {round}: served {took:?} after Redis came back"
        );
    }
    stack.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_answers_waiting_clients_before_their_timeout() {
    // One slot, 3 s per request: one POST runs, ten GETs wait.
    let backend = SlowBackend::builder()
        .workers(1)
        .delay(Duration::from_secs(3))
        .record(true)
        .start()
        .await;
    let mut stack = stack(backend, 1, 1).await;
    let client = client();
    let running = spawn_send(
        &client,
        &stack.url(),
        Req::new("POST", "/running").body("x"),
    );
    until_running(&stack.backend, 1).await;
    let waiting: Vec<_> = (0..10)
        .map(|i| {
            spawn_send(
                &client,
                &stack.url(),
                Req::new("GET", format!("/waiting/{i}")),
            )
        })
        .collect();
    until_enqueued(&stack.redis, "default", 11).await;
    // Let the worker's started notice reach the front.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.redis.restart();
    let restarted = Instant::now();
    for w in waiting {
        let seen = w.await.unwrap();
        let after = restarted.elapsed();
        assert_eq!(seen.status, 503, "a lost job's client is told to try again");
        assert!(seen.header("retry-after").is_some());
        // The front audits LOST_DATA_GRACE (1 s) after it sees the loss,
        // at its next beat: well before the 20 s reply timeout.
        assert!(
            after < Duration::from_secs(3),
            "answered {after:?} after the restart"
        );
    }
    eprintln!(
        "Redis restarted empty: 10 waiting clients answered 503 within {:?}",
        restarted.elapsed()
    );
    // The POST that was running is not told to try again: its worker
    // delivers its reply although Redis forgot the job.
    let seen = running.await.unwrap();
    assert_eq!(seen.status, 200, "the running POST gets its real answer");
    assert_eq!(stack.backend.count(), 1, "the waiting GETs never ran");
    stack.stop();
}

/// Redis restarted empty before the front read what the worker sent it
/// about running POSTs (the front stalled a moment, or was just slower
/// than the crash): their started notices, and the replies of those that
/// ended, were lost with the rest. The worker announces them again when it
/// sees the data lost, and the front audits only after that: a POST that
/// ran is never told to try again. One still running gets its reply; one
/// whose reply was lost gets 504 at the reply timeout (its outcome is
/// unknown), not 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_that_ran_when_redis_restarts_empty_are_not_told_to_try_again() {
    let backend = SlowBackend::builder().record(true).start().await;
    let mut stack = Binaries::start_with(RedisServer::start(), backend, 1, |text| {
        text.replace("reply_timeout = \"10s\"", "reply_timeout = \"8s\"")
    })
    .await;
    // Queued while the worker is stopped, so the front knows them queued.
    stack.workers[0].signal("STOP");
    let client = client();
    let posts: Vec<_> = [
        "/running/0?delay=3000",
        "/running/1?delay=3000",
        "/ended/0",
        "/ended/1",
    ]
    .into_iter()
    .map(|target| {
        let sent = spawn_send(&client, &stack.url(), Req::new("POST", target).body("x"));
        (target, sent)
    })
    .collect();
    until_enqueued(&stack.redis, "default", 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The front reads nothing; the worker runs the jobs, two to the end.
    stack.front.signal("STOP");
    stack.workers[0].signal("CONT");
    until(Duration::from_secs(10), "4 ran, 2 running", || {
        stack.backend.count() == 4 && stack.backend.active() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stack.redis.restart();
    stack.front.signal("CONT");
    for (target, sent) in posts {
        let seen = sent.await.unwrap();
        let expected = if target.starts_with("/running") {
            200
        } else {
            504
        };
        assert_eq!(seen.status, expected, "POST {target} ran: {seen:?}");
    }
    assert_eq!(stack.backend.count(), 4, "each ran once");
    stack.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_front_answers_the_jobs_it_lost_meanwhile() {
    // One slot, 300 ms per request; the front stops (SIGSTOP) for 2 s, long
    // enough to be taken for dead: its waiting jobs are dropped at claim.
    let backend = SlowBackend::builder()
        .workers(1)
        .delay(Duration::from_millis(300))
        .record(true)
        .start()
        .await;
    let stack = stack(backend, 1, 1).await;
    let client = client();
    let waiting: Vec<_> = (0..10)
        .map(|i| spawn_send(&client, &stack.url(), Req::new("GET", format!("/w/{i}"))))
        .collect();
    until_enqueued(&stack.redis, "default", 10).await;
    stack.front.signal("STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.front.signal("CONT");
    let resumed = Instant::now();
    let mut statuses = HashMap::new();
    for (i, w) in waiting.into_iter().enumerate() {
        let seen = w.await.unwrap();
        *statuses.entry(seen.status).or_insert(0) += 1;
        let ran = stack
            .backend
            .requests()
            .iter()
            .any(|r| r.target == format!("/w/{i}"));
        match seen.status {
            200 => assert!(ran),
            503 => assert!(!ran, "/w/{i} was told to try again but ran"),
            other => panic!("unexpected {other}"),
        }
    }
    eprintln!(
        "front stopped 2 s: {statuses:?}, all answered {:?} after it resumed",
        resumed.elapsed()
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "some jobs were dropped while the front looked dead"
    );
    assert!(resumed.elapsed() < Duration::from_secs(5));
    stack.stop();
}

/// Redis out of memory for a while (`maxmemory` below what it holds, so it
/// refuses every write): clients get a fast 503 meanwhile, and once it
/// has room again, every daemon goes on by itself. The idle worker's offer
/// made before (decision 27) must not outlive the failure: its claim failed,
/// and a worker that let go of that token left an offer nobody takes from;
/// the next GET an enqueue handed to it waited for its lease (504 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_for_a_while_leaves_no_offer_behind() {
    let backend = SlowBackend::builder().record(true).start().await;
    let stack = Binaries::start_with(RedisServer::start(), backend, 1, |text| text).await;
    let client = client();
    assert_eq!(get(&stack.url(), "/before").await.status, 200);
    let offers = keys("default").offers;
    let mut redis = stack.redis.conn();
    let tokens = |redis: &mut redis::Connection| -> Vec<String> {
        redis::cmd("HKEYS").arg(&offers).query(redis).unwrap()
    };
    until(Duration::from_secs(5), "the idle worker offers", || {
        !tokens(&mut redis).is_empty()
    })
    .await;
    let before = tokens(&mut redis);
    // A POST whose backend answers while Redis refuses writes: its reply
    // waits for room and is delivered once, and the POST runs once.
    let running = spawn_send(
        &client,
        &stack.url(),
        Req::new("POST", "/running?delay=800").body("x"),
    );
    until_running(&stack.backend, 1).await;
    // The worker claimed the POST under its offer's token and waits again
    // with a new offer beside it: that one stands when Redis refuses.
    until(
        Duration::from_secs(5),
        "a new offer beside the POST",
        || tokens(&mut redis).iter().any(|t| !before.contains(t)),
    )
    .await;
    let before: Vec<_> = tokens(&mut redis).into_iter().chain(before).collect();
    stack.redis.config_set("maxmemory", "1");
    let refused = Instant::now();
    let seen = send(
        &client,
        &stack.url(),
        &Req::new("POST", "/refused").body("x"),
    )
    .await;
    assert_eq!(seen.status, 503, "Redis refuses the job: try again");
    assert!(seen.header("retry-after").is_some());
    assert!(refused.elapsed() < Duration::from_secs(2), "a fast 503");
    // The worker's pop returns within its one-second poll and its claim is
    // refused, more than once.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stack.redis.config_set("maxmemory", "0");
    // Its next offer comes after the claim that withdraws the old one.
    until(Duration::from_secs(10), "the worker offers again", || {
        tokens(&mut redis).iter().any(|t| !before.contains(t))
    })
    .await;
    let left: Vec<_> = tokens(&mut redis)
        .into_iter()
        .filter(|t| before.contains(t))
        .collect();
    assert!(
        left.is_empty(),
        "an offer outlived its failed claim: {left:?}"
    );
    assert_eq!(running.await.unwrap().status, 200, "the POST's real answer");
    for i in 0..4 {
        let seen = send(
            &client,
            &stack.url(),
            &Req::new("GET", format!("/after/{i}")),
        )
        .await;
        assert_eq!(seen.status, 200, "/after/{i}");
    }
    let targets: Vec<_> = stack.backend.targets();
    assert_eq!(
        targets,
        [
            "/before",
            "/running?delay=800",
            "/after/0",
            "/after/1",
            "/after/2",
            "/after/3"
        ]
    );
    stack.stop();
}

/// A worker stopped while Redis refuses writes (out of memory) cannot
/// settle the token it waits with (a claim: refused), so it withdraws its
/// offer with a plain delete, which Redis still takes (and were that lost,
/// its beat goes when it retires, and an enqueue lets go of an offer of a
/// worker with no beat: conformance `a_retired_workers_offer_takes_nothing`).
/// Once Redis has room, the next GET waits for a claim and a new worker
/// runs it, instead of being leased to the stopped worker until its lease
/// runs out (504 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_redis_refuses_writes_leaves_no_live_offer() {
    let backend = SlowBackend::builder().record(true).start().await;
    let mut stack = Binaries::start_with(RedisServer::start(), backend, 1, |text| text).await;
    assert_eq!(get(&stack.url(), "/before").await.status, 200);
    let offers = keys("default").offers;
    let mut redis = stack.redis.conn();
    let count = |redis: &mut redis::Connection| -> usize {
        redis::cmd("HLEN").arg(&offers).query(redis).unwrap()
    };
    until(Duration::from_secs(5), "the idle worker offers", || {
        count(&mut redis) > 0
    })
    .await;
    stack.redis.config_set("maxmemory", "1");
    let mut worker = stack.workers.pop().unwrap();
    worker.signal("TERM");
    assert_eq!(worker.wait(), Some(0), "redis2http exit code");
    stack.redis.config_set("maxmemory", "0");
    assert_eq!(count(&mut redis), 0, "the stopped worker's offer is gone");
    // Sent at once: the front may not have beaten since Redis refused its
    // beats, and its job is still not taken for a dead front's.
    let waiting = spawn_send(&client(), &stack.url(), Req::new("GET", "/after"));
    // Its enqueue (the second of this queue) leased it to nobody.
    until_enqueued(&stack.redis, "default", 2).await;
    let leased: usize = redis::cmd("ZCARD")
        .arg(keys("default").leases)
        .query(&mut redis)
        .unwrap();
    assert_eq!(
        leased, 0,
        "the GET was handed to the stopped worker's offer"
    );
    stack.workers.push(testkit::bins::Process::spawn(
        "redis2http",
        &["--config", stack.config()],
    ));
    let seen = waiting.await.unwrap();
    assert_eq!(seen.status, 200, "run by the new worker, not left leased");
    let targets: Vec<_> = stack.backend.targets();
    assert_eq!(targets, ["/before", "/after"]);
    stack.stop();
}
