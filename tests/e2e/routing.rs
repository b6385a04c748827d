//! Work sharing between workers, reply routing at scale, FIFO order.

use std::time::{Duration, Instant};

use testkit::bins::Process;

use crate::support::*;

#[tokio::test]
async fn two_worker_processes_share_one_queue() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(400))
        .start()
        .await;
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace("max_inflight = 64", "max_inflight = 1");
    let (_dir, path) = config_file(&text);
    // The front in-process, the two workers as real processes.
    let front = Thr::start(parse_config(&text), 0).await;
    let _w1 = Process::spawn("redis2http", &["--config", &path]);
    let _w2 = Process::spawn("redis2http", &["--config", &path]);

    // Warm up: both workers are up once two requests run side by side.
    let started = Instant::now();
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let url = front.url();
            tokio::spawn(async move { get(&url, &format!("/job/{i}")).await.status })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    // Each worker runs one request at a time: only two of them together can
    // have had two requests at the backend at once.
    assert_eq!(backend.peak_concurrency(), 2, "both workers took work");
    assert_eq!(backend.count(), 8);
    // 8 × 400 ms over two workers: about 1.6 s, far from the 3.2 s of one.
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "{:?}",
        started.elapsed()
    );
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiting_clients_use_a_handful_of_redis_connections() {
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(1))
        .start()
        .await;
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 4")
            .replace("reply_timeout = \"10s\"", "reply_timeout = \"60s\"")
    })
    .await;
    let client = client();
    let url = stack.url();
    let requests: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            // A request per connection, held until its reply arrives.
            tokio::spawn(async move {
                send(
                    &client,
                    &url,
                    &Req::new("GET", format!("/c/{i}?delay=50")).header("connection", "close"),
                )
                .await
                .status
            })
        })
        .collect();
    // While most of them wait, count Redis clients.
    let mut peak_clients = 0usize;
    let mut peak_waiting = 0usize;
    let mut conn = stack.redis.conn();
    // Two seconds of samples at least; on a slow machine the clients take
    // longer to connect, so go on (up to 30 s) until most of them wait.
    let sampling = Instant::now();
    for sample in 0.. {
        if sample >= 20 && (peak_waiting > 500 || sampling.elapsed() > Duration::from_secs(30)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
        peak_clients = peak_clients.max(list.lines().count());
        let waiting: usize = redis::cmd("ZCARD")
            .arg(&keys("default").pending)
            .query(&mut conn)
            .unwrap();
        peak_waiting = peak_waiting.max(waiting);
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert!(
        // Most of them: on a busy 2-core machine the first are served
        // before the last are enqueued.
        peak_waiting > 500,
        "the clients did wait in the queue (peak {peak_waiting})"
    );
    // Front: one shared + one blocking connection; worker: one shared + one
    // doorbell; plus this test's own connection.
    assert!(peak_clients <= 6, "{peak_clients} Redis connections");
    stack.thr.stop().await;
}

#[tokio::test]
async fn jobs_of_one_priority_leave_in_arrival_order() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 1")
    })
    .await;
    let url = stack.url();
    let first = tokio::spawn({
        let url = url.clone();
        async move { get(&url, "/first?delay=1500").await }
    });
    until_running(&stack.backend, 1).await;
    let mut later = Vec::new();
    for i in 0..6 {
        let url = url.clone();
        later.push(tokio::spawn(
            async move { get(&url, &format!("/n/{i}")).await },
        ));
        until_enqueued(&stack.redis, "default", i + 2).await;
    }
    first.await.unwrap();
    for r in later {
        assert_eq!(r.await.unwrap().status, 200);
    }
    let order: Vec<String> = stack.backend.targets();
    assert_eq!(
        order,
        [
            "/first?delay=1500",
            "/n/0",
            "/n/1",
            "/n/2",
            "/n/3",
            "/n/4",
            "/n/5"
        ]
    );
    stack.thr.stop().await;
}
