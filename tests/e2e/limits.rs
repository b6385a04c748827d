//! Quotas, priorities and fair scheduling over real Redis (issue 4).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use testkit::bins::Process;

use crate::support::*;

/// THR's published example, verbatim.
const THR_EXAMPLE: &str = r#"
[[limits]]
name = "foo_bar"
by = { header = "Foo" }
when = "bar"
max_concurrent = 2

[[limits]]
name = "per_user"
by = { header = "X-User" }
max_concurrent = 4
rate = "20/s"
burst = 5
"#;

/// Sends `n` concurrent GETs with `header` and returns how long all took.
async fn burst(
    url: &str,
    n: usize,
    header: (&'static str, &'static str),
    target: &str,
) -> (Duration, Vec<u16>) {
    let client = client();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, url) = (client.clone(), url.to_string());
            let target = format!("{target}/{i}");
            tokio::spawn(async move {
                send(
                    &client,
                    &url,
                    &Req::new("GET", target).header(header.0, header.1),
                )
                .await
                .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    (started.elapsed(), statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thr_example_with_one_worker() {
    let backend = SlowBackend::builder()
        .delay(Duration::from_secs(1))
        .start()
        .await;
    let stack = Stack::start(backend, 1, THR_EXAMPLE).await;
    let (took, statuses) = burst(&stack.url(), 10, ("foo", "bar"), "/bar").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        took >= Duration::from_millis(4800) && took < Duration::from_millis(7500),
        "Foo: bar took {took:?}"
    );
    assert!(stack.backend.peak_concurrency() <= 2);
    let (took, statuses) = burst(&stack.url(), 10, ("foo", "baz"), "/baz").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(took < Duration::from_millis(2500), "Foo: baz took {took:?}");
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thr_example_with_three_worker_processes_is_still_global() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder()
        .delay(Duration::from_secs(1))
        .start()
        .await;
    let text = config_text(&redis.url(), &backend.url(), THR_EXAMPLE);
    let (_dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let workers: Vec<Process> = (0..3)
        .map(|_| Process::spawn("redis2http", &["--config", &path]))
        .collect();
    // Warm up: every worker is claiming before the burst.
    for _ in 0..6 {
        assert_eq!(get(&front.url(), "/warm").await.status, 200);
    }
    backend.clear();
    let (took, statuses) = burst(&front.url(), 10, ("foo", "bar"), "/bar").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // THR counted per process: three workers would have taken 2 s.
    assert!(
        took >= Duration::from_millis(4800) && took < Duration::from_millis(7500),
        "took {took:?}"
    );
    assert_eq!(
        backend.peak_concurrency(),
        2,
        "never more than 2 Foo: bar at once"
    );
    drop(workers);
    front.stop().await;
}

#[tokio::test]
async fn a_priority_one_job_submitted_last_starts_next() {
    let backend = SlowBackend::builder().start().await;
    let rules = "[[rules]]\nwhen = { header = { X-Priority = \"high\" } }\nthen = { priority = 1 }\n[[rules]]\nwhen = { path = { prefix = \"/low\" } }\nthen = { priority = 80 }\n";
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 1") + rules
    })
    .await;
    let url = stack.url();
    let client = client();
    let hold = spawn_send(&client, &url, Req::new("GET", "/hold?delay=1000"));
    until_running(&stack.backend, 1).await;
    let low: Vec<_> = (0..50)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                send(&client, &url, &Req::new("GET", format!("/low/{i}")))
                    .await
                    .status
            })
        })
        .collect();
    // Wait until all fifty are queued, then submit the urgent one.
    let mut conn = stack.redis.conn();
    let started = Instant::now();
    loop {
        let n: usize = redis::cmd("ZCARD")
            .arg(&keys("default").pending)
            .query(&mut conn)
            .unwrap();
        if n == 50 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "only {n} queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let urgent = send(
        &client,
        &url,
        &Req::new("GET", "/urgent").header("x-priority", "high"),
    )
    .await;
    assert_eq!(urgent.status, 200);
    assert_eq!(hold.await.unwrap().status, 200);
    for l in low {
        assert_eq!(l.await.unwrap(), 200);
    }
    let order: Vec<String> = stack.backend.targets();
    assert_eq!(order[1], "/urgent", "{:?}", &order[..5]);
    assert!(
        order[2..].iter().all(|t| t.starts_with("/low/")),
        "then the low ones"
    );
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_quota_never_delays_other_jobs() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("reply_timeout = \"10s\"", "reply_timeout = \"60s\"").replace("max_inflight = 64", "max_inflight = 8")
            + "[[limits]]\nname = \"foo_bar\"\nby = { header = \"Foo\" }\nwhen = \"bar\"\nmax_concurrent = 2\n"
    })
    .await;
    let client = client();
    let url = stack.url();
    let bar: Vec<_> = (0..1000)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                send(
                    &client,
                    &url,
                    &Req::new("GET", format!("/bar/{i}?delay=5000"))
                        .header("foo", "bar")
                        .header("connection", "close"),
                )
                .await
                .status
            })
        })
        .collect();
    let mut conn = stack.redis.conn();
    let started = Instant::now();
    loop {
        let n: usize = redis::cmd("ZCARD")
            .arg(&keys("default").pending)
            .query(&mut conn)
            .unwrap();
        if n >= 990 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {n} queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let baz = send(&client, &url, &Req::new("GET", "/baz").header("foo", "baz")).await;
    assert_eq!(baz.status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "Foo: baz waited {:?} behind 1000 blocked jobs",
        t.elapsed()
    );
    // The blocked ones are still waiting: cancel them by dropping the clients.
    for b in bar {
        b.abort();
    }
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_share_a_limited_backend_round_robin() {
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(20))
        .start()
        .await;
    let fair =
        "[[limits]]\nname = \"per_user\"\nby = { header = \"X-User\" }\nmax_concurrent = 10\n";
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 2")
            .replace("reply_timeout = \"10s\"", "reply_timeout = \"60s\"")
            + fair
    })
    .await;
    let client = client();
    let url = stack.url();
    // Alice floods first; Bob and Carol arrive right after.
    let mut tasks = Vec::new();
    for (user, n) in [("alice", 90), ("bob", 45), ("carol", 45)] {
        for i in 0..n {
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                send(
                    &client,
                    &url,
                    &Req::new("GET", format!("/{user}/{i}")).header("x-user", user),
                )
                .await
                .status
            }));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // While all three had work waiting (the first 120 starts after the
    // first few), each got a third of the backend.
    let order: Vec<String> = stack.backend.targets();
    let window = &order[15..120];
    let mut share: HashMap<&str, usize> = HashMap::new();
    for t in window {
        *share.entry(t.split('/').nth(1).unwrap()).or_default() += 1;
    }
    let expected = window.len() as f64 / 3.0;
    for user in ["alice", "bob", "carol"] {
        let got = *share.get(user).unwrap_or(&0) as f64;
        assert!(
            (got - expected).abs() <= expected * 0.2,
            "{user} got {got} of {} ({share:?})",
            window.len()
        );
    }
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_waiting_answers_503_with_a_measured_retry_after() {
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(100))
        .start()
        .await;
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 1\nmax_waiting = 10")
            .replace("reply_timeout = \"10s\"", "reply_timeout = \"60s\"")
            + "[[limits]]\nname = \"per_user\"\nby = { header = \"X-User\" }\nmax_waiting = 3\n"
    })
    .await;
    let client = client();
    let url = stack.url();
    // Drain for a while at ~10 jobs/s so that the rate is measured.
    for i in 0..15 {
        assert_eq!(
            send(&client, &url, &Req::new("GET", format!("/warm/{i}")))
                .await
                .status,
            200
        );
    }
    // The single slot is taken before the burst arrives, so exactly ten
    // can wait whatever the timing.
    let first = spawn_send(&client, &url, Req::new("GET", "/first?delay=2000"));
    until_running(&stack.backend, 1).await;
    let tasks: Vec<_> = (0..14)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(
                async move { send(&client, &url, &Req::new("GET", format!("/q/{i}"))).await },
            )
        })
        .collect();
    let mut refused = Vec::new();
    for t in tasks {
        let seen = t.await.unwrap();
        if seen.status == 503 {
            refused.push(seen);
        } else {
            assert_eq!(seen.status, 200);
        }
    }
    assert_eq!(first.await.unwrap().status, 200);
    // One runs, ten wait: four are refused.
    assert_eq!(refused.len(), 4, "{}", refused.len());
    for r in &refused {
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        // Ten waiting at ~10 jobs/s: about one or two seconds, not a constant.
        assert!((1..=4).contains(&retry), "Retry-After {retry}");
    }

    // Per key: a user may have three waiting.
    let hold = spawn_send(&client, &url, Req::new("GET", "/hold?delay=1500"));
    until_running(&stack.backend, 1).await;
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                send(
                    &client,
                    &url,
                    &Req::new("GET", format!("/u/{i}")).header("x-user", "eve"),
                )
                .await
                .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    hold.await.unwrap();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503, 503]);
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_inflight_total_holds_across_three_workers() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(300))
        .start()
        .await;
    let text = config_text(&redis.url(), &backend.url(), "").replace(
        "max_inflight = 64",
        "max_inflight = 4\nmax_inflight_total = 2",
    );
    let (_dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let workers: Vec<Process> = (0..3)
        .map(|_| Process::spawn("redis2http", &["--config", &path]))
        .collect();
    let (took, statuses) = burst(&front.url(), 20, ("x-a", "1"), "/t").await;
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(
        backend.peak_concurrency(),
        2,
        "12 worker slots, 2 allowed in all"
    );
    assert!(took >= Duration::from_millis(2800), "{took:?}");
    drop(workers);
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_quota_slots_come_back_when_its_lease_expires() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let text = config_text(
        &redis.url(),
        &backend.url(),
        "[[limits]]\nname = \"one\"\nby = { header = \"Foo\" }\nmax_concurrent = 1\n",
    )
    .replace("max_inflight = 64", "max_inflight = 4\nlease = \"2s\"")
    .replace("reply_timeout = \"10s\"", "reply_timeout = \"30s\"");
    let (_dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let mut doomed = Process::spawn("redis2http", &["--config", &path]);
    let client = client();
    let url = front.url();
    // A POST is not run again when its worker dies (its client gets a 502),
    // so the slot it held must simply come back.
    let stuck = spawn_send(
        &client,
        &url,
        Req::new("POST", "/stuck?delay=20000").header("foo", "x"),
    );
    let started = Instant::now();
    while backend.count() == 0 {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.signal("KILL");
    doomed.wait();
    let killed_at = Instant::now();
    let _survivor = Process::spawn("redis2http", &["--config", &path]);
    let next = send(&client, &url, &Req::new("GET", "/next").header("foo", "x")).await;
    assert_eq!(next.status, 200);
    // The slot was locked only until the dead worker's lease (2 s) ran out.
    assert!(
        killed_at.elapsed() < Duration::from_secs(6),
        "{:?}",
        killed_at.elapsed()
    );
    let mut conn = redis.conn();
    assert_eq!(quota_held(&mut conn, "one=x"), 0, "nothing stays locked");
    assert_eq!(stuck.await.unwrap().status, 502);
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_gave_up_never_reach_the_backend_under_load() {
    let backend = SlowBackend::builder()
        .workers(2)
        .delay(Duration::from_millis(200))
        .start()
        .await;
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("reply_timeout = \"10s\"", "reply_timeout = \"1s\"")
            .replace("max_inflight = 64", "max_inflight = 2")
    })
    .await;
    let client = client();
    let url = stack.url();
    let mut sent = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..200 {
        sent.insert(format!("/c/{i}"), Instant::now());
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            send(&client, &url, &Req::new("GET", format!("/c/{i}")))
                .await
                .status
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = stack.backend.requests();
    assert!((5..150).contains(&ok), "{ok} answered in time");
    for r in &got {
        let deadline = sent[&r.target] + Duration::from_secs(1);
        assert!(
            r.started <= deadline + Duration::from_millis(50),
            "{} started after its client gave up",
            r.target
        );
    }
    assert!(got.len() < 150, "the backend saw {} of 200", got.len());
    stack.thr.stop().await;
}

#[tokio::test]
async fn aging_lets_a_long_waiting_low_priority_job_go_first() {
    let backend = SlowBackend::builder().start().await;
    let rules = "[scheduling]\nmax_wait_boost = \"2s\"\n[[rules]]\nwhen = { header = { X-Priority = \"high\" } }\nthen = { priority = 1 }\n[[rules]]\nwhen = { path = { prefix = \"/low\" } }\nthen = { priority = 99 }\n";
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 1") + rules
    })
    .await;
    let url = stack.url();
    let client = client();
    let hold = spawn_send(&client, &url, Req::new("GET", "/hold?delay=4000"));
    until_running(&stack.backend, 1).await;
    let low = spawn_send(&client, &url, Req::new("GET", "/low"));
    until_enqueued(&stack.redis, "default", 2).await;
    tokio::time::sleep(Duration::from_millis(2400)).await;
    let fresh = send(
        &client,
        &url,
        &Req::new("GET", "/fresh-urgent").header("x-priority", "high"),
    )
    .await;
    assert_eq!(fresh.status, 200);
    hold.await.unwrap();
    low.await.unwrap();
    let order: Vec<String> = stack.backend.targets();
    assert_eq!(
        order,
        ["/hold?delay=4000", "/low", "/fresh-urgent"],
        "the low job waited more than max_wait_boost"
    );
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_quota_paces_starts_per_key() {
    let backend = SlowBackend::builder().start().await;
    let limit = "[[limits]]\nname = \"pace\"\nby = { query = \"k\" }\nrate = \"5/s\"\nburst = 2\n";
    let stack = Stack::start(backend, 1, limit).await;
    let client = client();
    let url = stack.url();
    let started = Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                send(&client, &url, &Req::new("GET", format!("/r/{i}?k=a")))
                    .await
                    .status
            })
        })
        .collect();
    let other = send(&client, &url, &Req::new("GET", "/other?k=b")).await;
    assert_eq!(other.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "another key is not slowed: {:?}",
        started.elapsed()
    );
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // 10 starts at 5/s with a burst of 2: the last one no sooner than 1.6 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(4000),
        "{took:?}"
    );
    let starts: Vec<Instant> = stack
        .backend
        .requests()
        .iter()
        .filter(|r| r.target.contains("k=a"))
        .map(|r| r.started)
        .collect();
    for w in starts.windows(4) {
        assert!(
            w[3] - w[0] >= Duration::from_millis(380),
            "more than the rate allows: {:?}",
            w[3] - w[0]
        );
    }
    stack.thr.stop().await;
}

#[tokio::test]
async fn the_edge_limit_answers_429_before_redis() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace(
            "[redis2http]",
            "[http2redis.edge_limit]\nby = \"real_ip\"\nrate = \"50/s\"\nburst = 5\n\n[redis2http]",
        )
    })
    .await;
    let client = client();
    let mut statuses = Vec::new();
    let mut retry = None;
    for i in 0..20 {
        let seen = send(&client, &stack.url(), &Req::new("GET", format!("/e/{i}"))).await;
        if seen.status == 429 {
            retry = seen.header("retry-after");
        }
        statuses.push(seen.status);
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 5, "{statuses:?}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(
        stack.backend.count(),
        20 - limited,
        "429s never reached Redis or the backend"
    );
    stack.thr.stop().await;
}
