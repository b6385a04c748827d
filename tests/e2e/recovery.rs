//! Nothing lost, nothing let in (issue 5), with real processes and signals.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use testkit::bins::Process;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_with_20_gets_in_flight_loses_nothing() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let text = config_text(
        &redis.url(),
        &backend.url(),
        "[[limits]]\nname = \"all\"\nby = { header = \"X-Tenant\" }\nmax_concurrent = 20\n",
    )
    .replace("reply_timeout = \"10s\"", "reply_timeout = \"30s\"");
    let (_dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let mut doomed = Process::spawn("redis2http", &["--config", &path]);
    let client = client();
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let (client, url) = (client.clone(), front.url());
            tokio::spawn(async move {
                send(
                    &client,
                    &url,
                    &Req::new("GET", format!("/g/{i}?delay=2000")).header("x-tenant", "t"),
                )
                .await
            })
        })
        .collect();
    until(Duration::from_secs(10), "20 requests running", || {
        backend.count() >= 20
    })
    .await;
    let _survivor = Process::spawn("redis2http", &["--config", &path]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.signal("KILL");
    doomed.wait();
    let killed = Instant::now();
    all_ok(requests).await;
    // Silent for 5 s, reaped within a second, then 2 s at the backend.
    assert!(
        killed.elapsed() < Duration::from_secs(12),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(backend.count(), 40, "each request ran again exactly once");
    let mut conn = redis.conn();
    let holders = quota_held(&mut conn, "all=t");
    let leases: usize = redis::cmd("ZCARD")
        .arg(&keys("default").leases)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        (holders, leases),
        (0, 0),
        "quota slots and leases are free again"
    );
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_jobs_of_a_lost_worker_get_502_and_exhausted_ones_are_dead_lettered() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace(
            "max_inflight = 64",
            "max_inflight = 8\nlease = \"2s\"\nmax_attempts = 1",
        )
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"30s\"");
    let (_dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let mut doomed = Process::spawn("redis2http", &["--config", &path]);
    let client = client();
    let post = tokio::spawn({
        let (client, url) = (client.clone(), front.url());
        async move {
            send(
                &client,
                &url,
                &Req::new("POST", "/pay?delay=20000").body("order 7"),
            )
            .await
        }
    });
    let get = tokio::spawn({
        let (client, url) = (client.clone(), front.url());
        async move { send(&client, &url, &Req::new("GET", "/report?delay=20000")).await }
    });
    until(Duration::from_secs(10), "both running", || {
        backend.count() >= 2
    })
    .await;
    let _survivor = Process::spawn("redis2http", &["--config", &path]);
    doomed.signal("KILL");
    doomed.wait();
    let post = post.await.unwrap();
    assert_eq!(post.status, 502);
    assert!(
        String::from_utf8_lossy(&post.body).contains("may or may not have been applied"),
        "{post:?}"
    );
    let get = get.await.unwrap();
    assert_eq!(get.status, 502);
    assert!(
        String::from_utf8_lossy(&get.body).contains("gave up after 1 attempts"),
        "{get:?}"
    );
    assert_eq!(backend.count(), 2, "neither ran again");
    let mut conn = redis.conn();
    let dead: Vec<String> = redis::cmd("HVALS")
        .arg(&keys("default").dead_reasons)
        .query(&mut conn)
        .unwrap();
    assert_eq!(dead, ["worker lost 1 times"]);
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_dead_front_are_never_sent_to_the_backend() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let port = testkit::redis::free_port();
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"60s\"");
    let (_dir, path) = config_file(&text);
    let mut front = Process::spawn("http2redis", &["--config", &path]);
    // No worker yet: the requests wait in Redis.
    let mut clients = Vec::new();
    let started = Instant::now();
    while clients.len() < 5 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(
                format!("GET /orphan/{} HTTP/1.1\r\nHost: x\r\n\r\n", clients.len()).as_bytes(),
            )
            .unwrap();
            clients.push(s);
        } else {
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut conn = redis.conn();
    until(Duration::from_secs(5), "5 jobs waiting", || {
        redis::cmd("ZCARD")
            .arg(&keys("default").pending)
            .query::<usize>(&mut conn)
            .unwrap()
            == 5
    })
    .await;
    front.signal("KILL");
    front.wait();
    // Once the front has been silent past the heartbeat timeout, a worker comes.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let worker = Thr::start(
        parse_config(&text.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:0")),
        1,
    )
    .await;
    until(Duration::from_secs(5), "the orphans dropped", || {
        redis::cmd("ZCARD")
            .arg(&keys("default").pending)
            .query::<usize>(&mut conn)
            .unwrap()
            == 0
    })
    .await;
    assert_eq!(backend.count(), 0, "nobody waited for them");
    assert_eq!(get(&worker.url(), "/alive").await.status, 200);
    drop(clients);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_front_answers_what_it_holds_then_exits_0() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(800))
        .start()
        .await;
    let port = testkit::redis::free_port();
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let (_dir, path) = config_file(&text);
    let mut front = Process::spawn("http2redis", &["--config", &path]);
    let workers = Thr::start(
        parse_config(&text.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:0")),
        1,
    )
    .await;
    let url = format!("http://127.0.0.1:{port}");
    let client = client();
    let started = Instant::now();
    while try_send(&client, &url, &Req::new("GET", "/up"))
        .await
        .is_none()
    {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held: Vec<_> = (0..5)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                send(&client, &url, &Req::new("GET", format!("/held/{i}")))
                    .await
                    .status
            })
        })
        .collect();
    until(
        Duration::from_secs(10),
        "the five held requests run",
        || backend.count() >= 6,
    )
    .await;
    front.signal("TERM");
    for h in held {
        assert_eq!(h.await.unwrap(), 200, "a held request was dropped");
    }
    assert_eq!(front.wait(), Some(0));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer accepting"
    );
    workers.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_worker_loses_nothing_and_returns_no_5xx() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(200))
        .start()
        .await;
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace("max_inflight = 64", "max_inflight = 4");
    let (_dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let mut workers: Vec<Process> = (0..2)
        .map(|_| Process::spawn("redis2http", &["--config", &path]))
        .collect();
    let stop_at = Instant::now() + Duration::from_secs(7);
    let load: Vec<_> = (0..6)
        .map(|i| {
            let url = front.url();
            tokio::spawn(async move {
                let client = client();
                let mut statuses = Vec::new();
                let mut n = 0;
                while Instant::now() < stop_at {
                    statuses.push(
                        send(&client, &url, &Req::new("GET", format!("/roll/{i}/{n}")))
                            .await
                            .status,
                    );
                    n += 1;
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (i, worker) in workers.iter_mut().enumerate() {
        worker.signal("TERM");
        assert_eq!(worker.wait(), Some(0), "worker {i} did not stop cleanly");
        *worker = Process::spawn("redis2http", &["--config", &path]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let mut total = 0;
    for l in load {
        let statuses = l.await.unwrap();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "non-200 during the restart: {statuses:?}"
        );
        total += statuses.len();
    }
    assert!(total > 50, "{total} requests");
    assert_eq!(
        backend.count(),
        total,
        "each request reached the backend once"
    );
    drop(workers);
    front.stop().await;
}

#[tokio::test]
async fn slowloris_is_cut_off_by_the_header_read_timeout() {
    let stack = Binaries::start_with(
        RedisServer::start(),
        SlowBackend::builder().start().await,
        1,
        |t| {
            t.replace(
                "reply_timeout = \"10s\"",
                "reply_timeout = \"10s\"\nheader_read_timeout = \"1s\"",
            )
        },
    )
    .await;
    let addr = stack.addr();
    let took = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let started = Instant::now();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
        let mut buf = [0u8; 512];
        loop {
            // One header byte every 200 ms: never a complete head.
            if s.write_all(b"X").is_err() {
                return started.elapsed();
            }
            match s.read(&mut buf) {
                Ok(0) => return started.elapsed(),
                Ok(_) => return started.elapsed(),
                Err(_) if started.elapsed() > Duration::from_secs(10) => panic!("never cut off"),
                Err(_) => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(took < Duration::from_secs(4), "cut after {took:?}");
    assert_eq!(stack.backend.count(), 0);
    assert_eq!(get(&stack.url(), "/still-serving").await.status, 200);
    stack.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_password_works_and_the_password_never_reaches_the_logs() {
    testkit::init_logs();
    let redis = RedisServer::start_with_password(Some("s3cret-pw"));
    let backend = SlowBackend::builder().start().await;
    let port = testkit::redis::free_port();
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    assert!(text.contains("s3cret-pw"));
    let (dir, path) = config_file(&text);
    let log = std::fs::File::create(dir.path().join("front.log")).unwrap();
    let child = std::process::Command::new(testkit::bins::binary("http2redis"))
        .args(["--config", &path])
        .env("RUST_LOG", "debug")
        .stderr(log)
        .spawn()
        .unwrap();
    let front = Process::adopt(child, "http2redis");
    let worker = Thr::start(
        parse_config(&text.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:0")),
        1,
    )
    .await;
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Some(seen) = try_send(&client(), &url, &Req::new("GET", "/pw")).await
            && seen.status == 200
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    front.signal("TERM");
    drop(front);
    let logs = std::fs::read_to_string(dir.path().join("front.log")).unwrap();
    assert!(logs.contains("redis://***@127.0.0.1"), "{logs}");
    assert!(
        !logs.contains("s3cret-pw"),
        "the password leaked into the logs"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_grace_holds_requests_until_redis_is_back() {
    let mut stack = Binaries::start_with(
        RedisServer::start(),
        SlowBackend::builder().start().await,
        1,
        |t| {
            t.replace(
                "reply_timeout = \"10s\"",
                "reply_timeout = \"10s\"\nredis_down_grace = \"5s\"",
            )
        },
    )
    .await;
    assert_eq!(get(&stack.url(), "/before").await.status, 200);
    stack.redis.kill();
    let url = stack.url();
    let held = tokio::spawn(async move { get(&url, "/held").await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stack.redis.restart();
    let seen = held.await.unwrap();
    assert_eq!(seen.status, 200, "held through the outage: {seen:?}");
    stack.stop();
}

#[tokio::test]
async fn header_values_cannot_inject_into_redis_key_names() {
    let stack = Binaries::start(
        SlowBackend::builder().start().await,
        1,
        "[[limits]]\nname = \"per_user\"\nby = { header = \"X-User\" }\nmax_concurrent = 1\n",
    )
    .await;
    let client = client();
    let url = stack.url();
    let hold = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            send(
                &client,
                &url,
                &Req::new("GET", "/a?delay=800").header("x-user", "a}:b{"),
            )
            .await
            .status
        }
    });
    until_running(&stack.backend, 1).await;
    let mut conn = stack.redis.conn();
    let tokens: Vec<String> = redis::cmd("HKEYS")
        .arg(&keyspace().held)
        .query(&mut conn)
        .unwrap();
    assert_eq!(tokens, ["per_user=a%7D%3Ab%7B"]);
    let all: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(
        all.iter().all(|k| k.starts_with("thr:{default}:")),
        "a request value never makes a key of its own: {all:?}"
    );
    // A value that looks like the escape of another stays distinct.
    let other = send(
        &client,
        &url,
        &Req::new("GET", "/b").header("x-user", "a%7D%3Ab%7B"),
    )
    .await;
    assert_eq!(other.status, 200, "not blocked by the other user's slot");
    assert_eq!(hold.await.unwrap(), 200);
    stack.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_hands_back_what_it_cannot_finish() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace(
            "[redis2http]\nshutdown_grace = \"5s\"",
            "[redis2http]\nshutdown_grace = \"1s\"",
        )
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"30s\"");
    let (_dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let mut stopping = Process::spawn("redis2http", &["--config", &path]);
    let long = tokio::spawn({
        let url = front.url();
        async move { get(&url, "/long?delay=3000").await }
    });
    until(Duration::from_secs(10), "running", || backend.count() == 1).await;
    let _other = Process::spawn("redis2http", &["--config", &path]);
    stopping.signal("TERM");
    let stopped = Instant::now();
    assert_eq!(stopping.wait(), Some(0));
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "the grace is 1 s: {:?}",
        stopped.elapsed()
    );
    // Handed back: the other worker runs it again at once, not after a lease.
    let seen = long.await.unwrap();
    assert_eq!(seen.status, 200);
    assert!(
        stopped.elapsed() < Duration::from_secs(6),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(backend.count(), 2);
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_works() {
    let redis = RedisServer::start_tls();
    let (plain, insecure, ca) = (redis.url(), redis.tls_url(), redis.tls_ca());
    let verified = insecure.replace("/#insecure", "");
    let stack = Binaries::start_with(redis, SlowBackend::builder().start().await, 1, |t| {
        t.replace(&plain, &insecure)
    })
    .await;
    let seen = get(&stack.url(), "/over-tls?cookies=1").await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(stack.backend.count(), 1);
    let (redis, backend) = stack.stop();

    // Verified against a private CA instead of `#insecure`.
    let stack = Binaries::start_with(redis, backend, 1, |t| {
        t.replace(&plain, &verified).replace(
            "[http2redis]",
            &format!("tls_ca_file = \"{}\"\n\n[http2redis]", ca.display()),
        )
    })
    .await;
    assert_eq!(get(&stack.url(), "/verified").await.status, 200);
    let (redis, backend) = stack.stop();

    // Without the CA, the certificate is refused: 503, not a silent pass.
    let stack = Binaries::start_with(redis, backend, 0, |t| t.replace(&plain, &verified)).await;
    assert_eq!(get(&stack.url(), "/untrusted").await.status, 503);
    stack.stop();
}
