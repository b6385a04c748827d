//! Timeouts, cancellation, Redis outages and bad input.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use testkit::bins::Process;

use crate::support::*;

/// A front with a short reply timeout and one worker slot, so that a slow
/// request keeps the next one waiting in Redis.
async fn one_slot_stack(reply_timeout: &str) -> Stack {
    let backend = SlowBackend::builder().start().await;
    let timeout = reply_timeout.to_string();
    Stack::start_with(backend, 1, move |text| {
        text.replace(
            "reply_timeout = \"10s\"",
            &format!("reply_timeout = \"{timeout}\""),
        )
        .replace("max_inflight = 64", "max_inflight = 1")
    })
    .await
}

#[tokio::test]
async fn reply_timeout_answers_504_and_the_backend_never_sees_the_job() {
    // A patient front keeps the only worker slot busy for 2 s...
    let stack = one_slot_stack("10s").await;
    let slow = tokio::spawn({
        let url = stack.url();
        async move { get(&url, "/slow?delay=2000").await }
    });
    until_running(&stack.backend, 1).await;
    // ...while a client of an impatient front (1 s) waits behind it.
    let text = config_text(&stack.redis.url(), &stack.backend.url(), "")
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"1s\"");
    let impatient = Thr::start(parse_config(&text), 0).await;
    let started = Instant::now();
    let waiting = get(&impatient.url(), "/never").await;
    assert_eq!(waiting.status, 504);
    assert_eq!(String::from_utf8_lossy(&waiting.body), "no reply in time\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // The slot frees at 2 s; the cancelled job must not run after it.
    assert_eq!(slow.await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let targets: Vec<String> = stack.backend.targets();
    assert_eq!(targets, ["/slow?delay=2000"]);
    // Redis holds nothing of it any more.
    let mut conn = stack.redis.conn();
    let pending: usize = redis::cmd("ZCARD")
        .arg(&keys("default").pending)
        .query(&mut conn)
        .unwrap();
    let jobs: usize = redis::cmd("HLEN")
        .arg(&keys("default").jobs)
        .query(&mut conn)
        .unwrap();
    assert_eq!((pending, jobs), (0, 0));
    impatient.stop().await;
    stack.thr.stop().await;
}

#[tokio::test]
async fn a_slot_stays_taken_until_the_backend_answers_even_if_the_client_left() {
    // A legacy backend keeps working on a request whose client went away:
    // the worker must not send it another one meanwhile.
    let stack = one_slot_stack("1s").await;
    assert_eq!(get(&stack.url(), "/slow?delay=3000").await.status, 504);
    // This one's client gives up at about 2 s, before the slot frees at 3 s.
    assert_eq!(get(&stack.url(), "/while-busy").await.status, 504);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&stack.url(), "/after").await.status, 200);
    let targets: Vec<String> = stack.backend.targets();
    assert_eq!(targets, ["/slow?delay=3000", "/after"]);
    assert_eq!(stack.backend.peak_concurrency(), 1);
    stack.thr.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_job() {
    let stack = one_slot_stack("30s").await;
    let url = stack.url();
    let slow = tokio::spawn({
        let url = url.clone();
        async move { get(&url, "/slow?delay=1500").await }
    });
    until_running(&stack.backend, 1).await;
    let addr = stack.thr.addr();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /abandoned HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Dropping the socket closes it: the client is gone.
    })
    .await
    .unwrap();
    assert_eq!(slow.await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let targets: Vec<String> = stack.backend.targets();
    assert_eq!(
        targets,
        ["/slow?delay=1500"],
        "the abandoned request reached the backend"
    );
    stack.thr.stop().await;
}

#[tokio::test]
async fn redis_down_gives_a_fast_503_and_thr_recovers_by_itself() {
    let mut stack = Binaries::start(SlowBackend::builder().start().await, 1, "").await;
    let url = stack.url();
    assert_eq!(get(&url, "/before").await.status, 200);

    stack.redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let seen = get(&url, "/during").await;
        assert_eq!(seen.status, 503, "{seen:?}");
        assert!(String::from_utf8_lossy(&seen.body).contains("unavailable"));
        assert_eq!(seen.header("retry-after").as_deref(), Some("1"));
        // The issue asks for under a second; allow for a loaded machine.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "503 took {:?}",
            started.elapsed()
        );
    }

    stack.redis.restart();
    let started = Instant::now();
    loop {
        let seen = get(&url, "/after").await;
        if seen.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not recovered: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stack.backend.requests().last().unwrap().target, "/after");
    stack.stop();
}

#[tokio::test]
async fn a_reply_after_a_long_blocking_wait_is_delivered() {
    // 1.5 s at the backend: the front's BLMPOP and the worker's pipeline wait
    // well past redis-rs's default 500 ms response timeout.
    let stack = Stack::start(SlowBackend::builder().start().await, 1, "").await;
    let seen = get(&stack.url(), "/slow?delay=1500").await;
    assert_eq!(seen.status, 200);
    // And an idle worker whose BLPOP waited long still picks new work.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(get(&stack.url(), "/after-idle").await.status, 200);
    stack.thr.stop().await;
}

#[tokio::test]
async fn bodies_over_max_body_get_413() {
    let stack = Stack::start_with(SlowBackend::builder().start().await, 1, |t| {
        t.replace(
            "reply_timeout = \"10s\"",
            "reply_timeout = \"10s\"\nmax_body = \"1KiB\"",
        )
    })
    .await;
    let client = client();
    let small = send(
        &client,
        &stack.url(),
        &Req::new("POST", "/ok").body(vec![1u8; 1024]),
    )
    .await;
    assert_eq!(small.status, 200);
    let big = send(
        &client,
        &stack.url(),
        &Req::new("POST", "/big").body(vec![1u8; 1025]),
    )
    .await;
    assert_eq!(big.status, 413);
    // Without a Content-Length (chunked upload), the limit still holds.
    let addr = stack.thr.addr();
    let answer = tokio::task::spawn_blocking(move || {
        raw_exchange(
            addr,
            &[
                b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .as_slice(),
                b"800\r\n",
                &[b'a'; 2048],
                b"\r\n0\r\n\r\n",
            ]
            .concat(),
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(stack.backend.count(), 1);
    stack.thr.stop().await;
}

/// Writes `bytes` on a fresh connection and returns what comes back.
fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_oversized_heads_get_4xx_and_the_front_lives_on() {
    let stack = Binaries::start(SlowBackend::builder().start().await, 1, "").await;
    let addr = stack.addr();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
        (
            [
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".as_slice(),
                &[b'a'; 100_000],
                b"\r\n\r\n",
            ]
            .concat(),
            "HTTP/1.1 431",
        ),
        (
            (0..200)
                .fold(b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec(), |mut v, i| {
                    v.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
                    v
                })
                .into_iter()
                .chain(*b"\r\n")
                .collect(),
            "HTTP/1.1 431",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
                .to_vec(),
            "HTTP/1.1 400",
        ),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
    ];
    for (bytes, expected) in cases {
        let answer = tokio::task::spawn_blocking(move || raw_exchange(addr, &bytes))
            .await
            .unwrap();
        assert!(
            answer.starts_with(expected),
            "expected {expected}, got {answer:?}"
        );
    }
    assert_eq!(get(&stack.url(), "/still-alive").await.status, 200);
    assert_eq!(
        stack.backend.count(),
        1,
        "no bad request reached the backend"
    );
    stack.stop();
}

#[tokio::test]
async fn absolute_form_targets_cannot_choose_the_backend() {
    let stack = Stack::start(SlowBackend::builder().start().await, 1, "").await;
    let addr = stack.thr.addr();
    let answer = tokio::task::spawn_blocking(move || {
        raw_exchange(addr, b"GET http://169.254.169.254/latest/meta-data?x=1 HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // It went to the configured backend, with the path only.
    assert_eq!(stack.backend.requests()[0].target, "/latest/meta-data?x=1");
    stack.thr.stop().await;
}

#[tokio::test]
async fn backend_refusing_connections_gives_502_and_slow_backend_504() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |text| {
        text.replace(
            "max_inflight = 64",
            "max_inflight = 64\nbackend_timeout = \"500ms\"",
        )
    })
    .await;
    let seen = get(&stack.url(), "/slow?delay=2000").await;
    assert_eq!(seen.status, 504);
    assert_eq!(String::from_utf8_lossy(&seen.body), "backend timed out\n");
    stack.thr.stop().await;

    let port = testkit::redis::free_port();
    let redis = RedisServer::start();
    let text = config_text(&redis.url(), &format!("http://127.0.0.1:{port}"), "");
    let thr = Thr::start(parse_config(&text), 1).await;
    let seen = get(&thr.url(), "/refused").await;
    assert_eq!(seen.status, 502);
    assert_eq!(String::from_utf8_lossy(&seen.body), "backend unavailable\n");
    thr.stop().await;
}

#[tokio::test]
async fn a_doorbell_redis_refuses_still_serves_jobs_without_spinning() {
    // An ACL that denies the doorbell's pop (BLMPOP on the queue's keys; a
    // misconfigured user): the worker cannot wait on its doorbell. It
    // claims after each refused pop, so jobs are served; and it waits out
    // each refusal instead of asking again at once. (The front's BLMPOP on
    // its reply list stays allowed.)
    let stack = Stack::start(SlowBackend::builder().start().await, 1, "").await;
    let mut conn = stack.redis.conn();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-blmpop")
        .arg("(+blmpop ~*:replies)")
        .query(&mut conn)
        .unwrap();
    for target in ["/refused-1", "/refused-2"] {
        assert_eq!(get(&stack.url(), target).await.status, 200);
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut conn)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = stack.redis.command_stats();
    let refused = stats.get("blmpop").map_or(0, |s| s.rejected_calls);
    // About one refused pop per second of the wait; a spinning worker
    // would send thousands.
    assert!(
        (1..=10).contains(&refused),
        "{refused} doorbell pops refused in 3 s:\n{stats:?}"
    );
    stack.thr.stop().await;
}

#[tokio::test]
async fn a_worker_with_one_slot_makes_no_empty_claim_between_handed_jobs() {
    // One request at a time to a worker with one slot: each job is handed
    // to the worker's offer by its enqueue (nothing else waits). The worker
    // then waits on its doorbell again instead of claiming when its slot
    // frees, which would find nothing: no claim script runs, except after
    // a doorbell wait that ran its whole second. (Every claim reads its
    // token's list with the one LRANGE of the idle path.)
    let stack = Stack::start_with(SlowBackend::builder().start().await, 1, |text| {
        text.replace("max_inflight = 64", "max_inflight = 1")
    })
    .await;
    assert_eq!(get(&stack.url(), "/warm").await.status, 200);
    let mut conn = stack.redis.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut conn)
        .unwrap();
    let started = Instant::now();
    const REQUESTS: u64 = 30;
    for i in 0..REQUESTS {
        assert_eq!(get(&stack.url(), &format!("/one/{i}")).await.status, 200);
    }
    let polls = started.elapsed().as_secs() + 1;
    let stats = stack.redis.command_stats();
    let calls = |name: &str| stats.get(name).map_or(0, |s| s.calls);
    let claims = calls("lrange");
    assert!(
        claims <= polls + 2,
        "{claims} claims for {REQUESTS} requests in {polls} s (one per poll at most):\n{stats:?}"
    );
    // The jobs came through the offers: a doorbell pop each (the front's
    // reply pops count here too).
    assert!(calls("blmpop") >= REQUESTS, "{stats:?}");
    stack.thr.stop().await;
}

/// A worker with one slot, warmed with short jobs (so that it claims ahead
/// when its slot is busy and a backlog waits: ARCHITECTURE.md decision 30).
async fn one_slot_warm_stack() -> Stack {
    one_slot_warm_stack_with("").await
}

/// [`one_slot_warm_stack`] with `front` settings first in `[http2redis]`.
async fn one_slot_warm_stack_with(front: &str) -> Stack {
    let stack = Stack::start_with(SlowBackend::builder().start().await, 1, |text| {
        text.replacen("[http2redis]\n", &format!("[http2redis]\n{front}\n"), 1)
            .replace("max_inflight = 64", "max_inflight = 1")
    })
    .await;
    for i in 0..4 {
        assert_eq!(get(&stack.url(), &format!("/warm/{i}")).await.status, 200);
    }
    log_every_command(&stack.redis);
    stack
}

/// Jobs leased (running or held) and jobs waiting in queue `default`.
fn leased_and_waiting(conn: &mut redis::Connection) -> (u64, u64) {
    let k = keys("default");
    redis::pipe()
        .zcard(&k.leases)
        .zcard(&k.pending)
        .query(conn)
        .unwrap()
}

/// A handed job `a` takes the one slot; the POST `b` and the GET `c` wait
/// behind it. When `a` ends, `b` starts and `c` is claimed ahead; returns the
/// three clients' tasks once `c` is seen held (leased, not at the backend).
async fn hold_c_behind(stack: &Stack, b_delay_ms: u64) -> Vec<tokio::task::JoinHandle<Seen>> {
    let client = client();
    let url = stack.url();
    let mut conn = stack.redis.conn();
    let a = spawn_send(&client, &url, Req::new("GET", "/a?delay=400"));
    until_running(&stack.backend, 1).await;
    let b = spawn_send(
        &client,
        &url,
        Req::new("POST", format!("/b?delay={b_delay_ms}")).body("b"),
    );
    until(Duration::from_secs(5), "b waiting", || {
        leased_and_waiting(&mut conn).1 == 1
    })
    .await;
    let c = spawn_send(&client, &url, Req::new("GET", "/c"));
    until(Duration::from_secs(5), "c waiting", || {
        leased_and_waiting(&mut conn).1 == 2
    })
    .await;
    // Held: two leases, nothing waiting, one request at the backend (b).
    until(Duration::from_secs(5), "c held while b runs", || {
        let held = leased_and_waiting(&mut conn) == (2, 0) && stack.backend.active() == 1;
        held && stack
            .backend
            .requests()
            .last()
            .is_some_and(|r| r.target.starts_with("/b"))
    })
    .await;
    vec![a, b, c]
}

/// The backend saw a, b and c once each, in that order, one at a time.
fn each_once_in_order(stack: &Stack) {
    each_once_in_order_as(stack, "/b");
}

/// The backend saw a, then the request whose target starts with `second`,
/// then c, once each, one at a time.
fn each_once_in_order_as(stack: &Stack, second: &str) {
    let seen: Vec<String> = stack
        .backend
        .requests()
        .iter()
        .map(|r| r.target.clone())
        .filter(|t| !t.starts_with("/warm"))
        .collect();
    assert!(
        seen.len() == 3
            && seen[0] == "/a?delay=400"
            && seen[1].starts_with(second)
            && seen[2] == "/c",
        "each once, in order: {seen:?}"
    );
    assert_eq!(stack.backend.peak_concurrency(), 1, "one slot");
}

#[tokio::test]
async fn a_busy_worker_holds_the_next_short_job_and_starts_it_when_its_slot_frees() {
    let stack = one_slot_warm_stack().await;
    let clients = hold_c_behind(&stack, 400).await;
    for task in clients {
        assert_eq!(task.await.unwrap().status, 200);
    }
    each_once_in_order(&stack);
    assert_eq!(
        script_calls(&stack.redis, "put_back"),
        0,
        "c started from the worker's hand"
    );
    stack.thr.stop().await;
}

#[tokio::test]
async fn a_held_job_that_finds_no_slot_in_time_is_put_back_and_runs_once() {
    // b holds the slot past the hold limit (1 s): c goes back to the
    // queue, not counted as a run, and runs after b.
    let stack = one_slot_warm_stack().await;
    let clients = hold_c_behind(&stack, 2500).await;
    let mut conn = stack.redis.conn();
    until(Duration::from_secs(5), "c put back while b runs", || {
        leased_and_waiting(&mut conn) == (1, 1) && stack.backend.active() == 1
    })
    .await;
    assert!(script_calls(&stack.redis, "put_back") >= 1);
    all_ok(clients).await;
    each_once_in_order(&stack);
    stack.thr.stop().await;
}

#[tokio::test]
async fn a_held_job_whose_put_back_meets_a_paused_redis_still_runs_once() {
    // c is held while b runs past the hold limit; Redis is paused (3 s,
    // longer than a command's timeout) just as c goes back. The put back
    // goes unanswered and is asked again; b's reply waits for Redis. Every
    // client gets one answer and each request runs once, in order.
    let stack = one_slot_warm_stack().await;
    let clients = hold_c_behind(&stack, 2000).await;
    let mut conn = stack.redis.conn();
    stall(&stack.redis, Duration::from_secs(3));
    all_ok(clients).await;
    each_once_in_order(&stack);
    // The put back met the pause: asked again while unanswered, Redis ran
    // it more than once (the first gave c back, the others found it gone).
    assert!(
        script_calls(&stack.redis, "put_back") >= 2,
        "the put back was asked again"
    );
    assert_eq!(leased_and_waiting(&mut conn), (0, 0), "nothing left");
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_keeps_a_held_job_waiting_only_until_it_is_cut() {
    // a takes the one slot; a download for a client that reads nothing and
    // the GET c wait behind it. When a ends, the download starts and c is
    // claimed ahead and held; the download never frees the slot, so c goes
    // back (the hold limit, a second). Once the client is cut
    // (client_write_timeout), c runs, once, and nothing is left leased or
    // waiting.
    use tokio::io::AsyncWriteExt;
    let stack = one_slot_warm_stack_with("client_write_timeout = \"3s\"").await;
    let client = client();
    let mut conn = stack.redis.conn();
    let a = spawn_send(&client, &stack.url(), Req::new("GET", "/a?delay=400"));
    until_running(&stack.backend, 1).await;
    let mut stuck = tokio::net::TcpStream::connect(stack.thr.addr())
        .await
        .unwrap();
    let download = format!(
        "GET /stuck?stream={} HTTP/1.1\r\nhost: x\r\n\r\n",
        512 << 20
    );
    stuck.write_all(download.as_bytes()).await.unwrap();
    until(Duration::from_secs(5), "the download waiting", || {
        leased_and_waiting(&mut conn).1 == 1
    })
    .await;
    let c = spawn_send(&client, &stack.url(), Req::new("GET", "/c"));
    until(Duration::from_secs(5), "c waiting", || {
        leased_and_waiting(&mut conn).1 == 2
    })
    .await;
    until(
        Duration::from_secs(10),
        "c held while the download streams",
        || leased_and_waiting(&mut conn) == (2, 0) && stack.backend.open_streams() == 1,
    )
    .await;
    until(Duration::from_secs(5), "c put back", || {
        script_calls(&stack.redis, "put_back") >= 1
    })
    .await;
    assert_eq!(a.await.unwrap().status, 200);
    let seen = tokio::time::timeout(Duration::from_secs(60), c)
        .await
        .expect("c answered once the client that reads nothing is cut")
        .unwrap();
    assert_eq!(seen.status, 200);
    each_once_in_order_as(&stack, "/stuck");
    until(Duration::from_secs(10), "nothing left", || {
        leased_and_waiting(&mut conn) == (0, 0) && stack.backend.open_streams() == 0
    })
    .await;
    drop(stuck);
    stack.thr.stop().await;
}

/// A front in this process and one worker as a process of its own (to be
/// killed or stopped), with one slot, warmed with short jobs so that the
/// worker knows its slot frees often (and claims ahead). `extra` goes in
/// the queue's table.
struct WorkerProcess {
    redis: RedisServer,
    backend: SlowBackend,
    front: Thr,
    worker: Process,
    /// The configuration file, for more workers.
    path: String,
    _dir: tempfile::TempDir,
}

async fn one_slot_worker_process(extra: &str) -> WorkerProcess {
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let text = config_text(&redis.url(), &backend.url(), "")
        .replace("max_inflight = 64", &format!("max_inflight = 1{extra}"))
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"30s\"");
    let (dir, path) = config_file(&text);
    let front = Thr::start(parse_config(&text), 0).await;
    let worker = Process::spawn("redis2http", &["--config", &path]);
    for i in 0..4 {
        assert_eq!(get(&front.url(), &format!("/warm/{i}")).await.status, 200);
    }
    WorkerProcess {
        redis,
        backend,
        front,
        worker,
        path,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_busy_worker_never_holds_a_post_that_could_not_run_again() {
    // A held job is leased to its worker before it runs: a worker killed
    // with -9 takes it along unseen, and the reaper can only run it again
    // if its method allows (`retry_methods`). So a worker claims ahead only
    // a job that may run again: here the POST c waits in the queue while b
    // runs, and when the worker dies, c runs on the next one instead of
    // being answered 502 without ever reaching the backend.
    let WorkerProcess {
        redis,
        backend,
        front,
        worker: mut doomed,
        path,
        _dir,
    } = one_slot_worker_process("").await;
    let url = front.url();
    let client = client();
    let mut conn = redis.conn();
    let a = spawn_send(&client, &url, Req::new("GET", "/a?delay=400"));
    until_running(&backend, 1).await;
    let b = spawn_send(&client, &url, Req::new("POST", "/b?delay=20000").body("b"));
    until(Duration::from_secs(5), "b waiting", || {
        leased_and_waiting(&mut conn).1 == 1
    })
    .await;
    let c = spawn_send(&client, &url, Req::new("POST", "/c").body("c"));
    until(Duration::from_secs(5), "c waiting", || {
        leased_and_waiting(&mut conn).1 == 2
    })
    .await;
    until(Duration::from_secs(5), "b running", || {
        backend.active() == 1
            && backend
                .requests()
                .last()
                .is_some_and(|r| r.target.starts_with("/b"))
    })
    .await;
    // Time to claim c ahead (a worker that holds does so at once, and
    // would hold it for up to a second).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(leased_and_waiting(&mut conn), (1, 1), "c is not held");
    doomed.signal("KILL");
    doomed.wait();
    let _survivor = Process::spawn("redis2http", &["--config", &path]);
    assert_eq!(a.await.unwrap().status, 200);
    // b ran when its worker died: it is not run again.
    assert_eq!(b.await.unwrap().status, 502);
    let c = c.await.unwrap();
    assert_eq!(c.status, 200, "{:?}", String::from_utf8_lossy(&c.body));
    let seen: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| r.target.clone())
        .filter(|t| !t.starts_with("/warm"))
        .collect();
    assert_eq!(seen, ["/a?delay=400", "/b?delay=20000", "/c"], "each once");
    front.stop().await;
}

#[tokio::test]
async fn a_worker_stopped_while_it_holds_a_job_never_runs_it_late() {
    // A job held in hand is leased, and its lease is not renewed while it
    // waits. A worker stopped (SIGSTOP) past the lease loses it: the reaper
    // puts it back and another worker runs it. When the stopped worker
    // resumes, its hold is long past the limit: it puts the job back
    // (Redis refuses, the job is no longer its) instead of running it a
    // second time.
    let WorkerProcess {
        redis,
        backend,
        front,
        worker: mut stopped,
        path,
        _dir,
    } = one_slot_worker_process("\nlease = \"3s\"").await;
    let url = front.url();
    log_every_command(&redis);
    let client = client();
    let mut conn = redis.conn();
    let a = spawn_send(&client, &url, Req::new("GET", "/a?delay=400"));
    until_running(&backend, 1).await;
    let b = spawn_send(&client, &url, Req::new("GET", "/b?delay=1500"));
    until(Duration::from_secs(5), "b waiting", || {
        leased_and_waiting(&mut conn).1 == 1
    })
    .await;
    let c = spawn_send(&client, &url, Req::new("GET", "/c"));
    until(Duration::from_secs(5), "c held while b runs", || {
        let held = leased_and_waiting(&mut conn) == (2, 0) && backend.active() == 1;
        held && backend
            .requests()
            .last()
            .is_some_and(|r| r.target.starts_with("/b"))
    })
    .await;
    stopped.signal("STOP");
    let _survivor = Process::spawn("redis2http", &["--config", &path]);
    assert_eq!(a.await.unwrap().status, 200);
    // Both leases ran out with the stopped worker: the survivor runs b
    // again (a GET may) and c, and answers both clients.
    all_ok([b, c]).await;
    let puts_before = script_calls(&redis, "put_back");
    stopped.signal("CONT");
    // The resumed worker ends b's first run (its reply is refused) and
    // gives c back.
    until(Duration::from_secs(10), "c given back", || {
        script_calls(&redis, "put_back") > puts_before
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = |target: &str| {
        backend
            .requests()
            .iter()
            .filter(|r| r.target == target)
            .count()
    };
    assert_eq!(runs("/c"), 1, "c ran once, on the survivor");
    assert_eq!(runs("/b?delay=1500"), 2, "b ran on each worker");
    assert_eq!(leased_and_waiting(&mut conn), (0, 0), "nothing left");
    stopped.signal("KILL");
    stopped.wait();
    front.stop().await;
}

#[tokio::test]
async fn a_backlog_of_posts_costs_no_claim_ahead_per_job() {
    // A claim ahead that meets a POST starts nothing; the worker then does
    // not claim ahead again for a second, instead of after every job (one
    // claim call per job for nothing).
    let stack = one_slot_warm_stack().await;
    let client = client();
    let url = stack.url();
    const POSTS: usize = 20;
    let posts: Vec<_> = (0..POSTS)
        .map(|i| {
            spawn_send(
                &client,
                &url,
                Req::new("POST", format!("/p/{i}?delay=20")).body("p"),
            )
        })
        .collect();
    for task in posts {
        assert_eq!(task.await.unwrap().status, 200);
    }
    let claims = script_calls(&stack.redis, "claim");
    eprintln!("{claims} claim calls for {POSTS} POSTs through one slot");
    // About one claim per job, a claim ahead per second of the run, and a
    // few claims that found nothing (a doorbell rung for a job another
    // claim took): 24 here, against 41 when a claim ahead followed every
    // claim.
    assert!(
        claims <= POSTS * 3 / 2,
        "{claims} claim calls for {POSTS} POSTs through one slot"
    );
    assert_eq!(stack.backend.peak_concurrency(), 1, "one slot");
    stack.thr.stop().await;
}
