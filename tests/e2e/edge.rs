//! Hostile clients and backends at the edge: every connection bounded in
//! time, memory and meaning (ARCHITECTURE.md decision 18). Real sockets
//! against the real front and worker.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use testkit::bins::{Process, binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// `[http2redis]` settings put before the others.
fn front_settings(text: String, settings: &str) -> String {
    text.replacen("[http2redis]\n", &format!("[http2redis]\n{settings}\n"), 1)
}

/// Reads (and drops) what the server sends until it closes; how long that
/// took, or None if it is still open after `limit`.
async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one whole HTTP/1.1 response (head and Content-Length body).
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if got.len() >= end + 4 + length {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(n > 0, "closed before a whole response: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// An empty h2 SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_of_each_kind_are_closed_within_their_timeouts() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        front_settings(t, "header_read_timeout = \"1s\"\nidle_timeout = \"2s\"")
    })
    .await;
    let addr = stack.thr.addr();
    let connect = || async { TcpStream::connect(addr).await.unwrap() };

    // Before a first request: header_read_timeout (1 s), whatever was sent.
    let mut silent = connect().await;
    let mut half_preface = connect().await;
    half_preface.write_all(&PREFACE[..10]).await.unwrap();
    let mut settings_only = connect().await;
    settings_only.write_all(PREFACE).await.unwrap();
    settings_only.write_all(SETTINGS).await.unwrap();
    let mut half_head = connect().await;
    half_head
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // After a request: idle_timeout (2 s).
    let mut keep_alive = connect().await;
    keep_alive
        .write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut keep_alive)
            .await
            .starts_with("HTTP/1.1 200")
    );
    let h2 = {
        let io = hyper_util::rt::TokioIo::new(connect().await);
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get(format!("http://{addr}/h2"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        let idle_from = Instant::now();
        (conn, idle_from)
    };

    let limit = Duration::from_secs(6);
    for (what, stream) in [
        ("nothing sent", &mut silent),
        ("half an h2 preface", &mut half_preface),
        ("a preface and SETTINGS, no stream", &mut settings_only),
        ("half a request head", &mut half_head),
    ] {
        let after = closed_after(stream, limit).await;
        let after = after.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(
            after < Duration::from_millis(2500),
            "{what}: closed after {after:?}"
        );
    }
    let after = closed_after(&mut keep_alive, limit)
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(
        after < Duration::from_secs(4),
        "idle keep-alive closed after {after:?}"
    );
    let (conn, idle_from) = h2;
    tokio::time::timeout(limit, conn)
        .await
        .expect("an idle h2 connection is closed")
        .unwrap()
        .expect("closed cleanly (GOAWAY)");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(5),
        "idle h2 closed after {idle:?}"
    );
    // A connection in use is not idle: a response slower than idle_timeout
    // arrives whole.
    let slow = get(&stack.url(), "/slow?delay_ms=3000").await;
    assert_eq!(slow.status, 200);
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off() {
    // A bypassed download goes from the backend straight to the client's
    // socket: nothing but the socket's own bound stops it.
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        front_settings(t, "client_write_timeout = \"2s\"")
            + "\n[[rules]]\nwhen = { path = { prefix = \"/direct/\" } }\nthen = { bypass = true }\n"
    })
    .await;
    const SIZE: usize = 256 << 20;
    let mut stream = TcpStream::connect(stack.thr.addr()).await.unwrap();
    stream
        .write_all(
            format!("GET /direct/binary?bytes={SIZE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    // Read nothing well past the bound (buffers fill first, slowly on a
    // busy machine), then everything that is left.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the connection was not closed ({got} bytes read)"),
        }
    }
    assert!(got < SIZE, "the whole body came: {got} bytes");
    assert_eq!(get(&stack.url(), "/after").await.status, 200);
    stack.thr.stop().await;
}

/// The front as its own process, with at most `files` descriptors, and its
/// stderr collected.
struct LimitedFront {
    _front: Process,
    stderr: Arc<Mutex<Vec<String>>>,
    port: u16,
    /// The config file's directory: after `_front`, so removed after the
    /// process is killed.
    _dir: tempfile::TempDir,
}

impl LimitedFront {
    fn start(text: &str, files: u32) -> LimitedFront {
        let port = testkit::redis::free_port();
        let text = text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        let (dir, path) = config_file(&text);
        let front = binary("http2redis");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {files} && exec \"$0\" --config \"$1\""))
            .arg(&front)
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the front");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                eprintln!("front: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        LimitedFront {
            _front: Process::adopt(child, "http2redis"),
            stderr,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn ready(&self) {
        let started = Instant::now();
        while try_send(&client(), &self.url(), &Req::new("GET", "/ready"))
            .await
            .is_none()
        {
            assert!(started.elapsed() < Duration::from_secs(20), "front not up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn lines_with(&self, text: &str) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }
}

/// Opens `n` connections that send nothing.
async fn flood(port: u16, n: usize) -> Vec<TcpStream> {
    let mut idle = Vec::new();
    for _ in 0..n {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => idle.push(s),
            Err(err) => panic!("connect: {err}"),
        }
    }
    idle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_floods_past_the_connection_cap_are_refused_and_later_clients_served() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let text = front_settings(
        config_text(&redis.url(), &backend.url(), ""),
        // Longer than the flood may take: a connect whose SYN is dropped
        // waits 1 s to try again, and a late one must not find the slots
        // of idle ones already freed (it would be let in, rightly).
        "header_read_timeout = \"3s\"",
    );
    let worker = Thr::start(parse_config(&text), 1).await;
    // 128 descriptors: max_connections defaults to what they leave (57).
    let front = LimitedFront::start(&text, 128);
    front.ready().await;
    let mut idle = flood(front.port, 200).await;
    // Those beyond the cap are told so (the others are answered 408 or
    // closed at header_read_timeout). All are read at the same time, each
    // for up to 5 s: read one after the other, 20 ms each, a loaded
    // machine once counted too few.
    let reads = idle.iter_mut().map(|stream| async move {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 503")
        )
    });
    let refused = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter(|&r| r)
        .count();
    assert!(
        refused >= 100,
        "{refused} of 200 idle connections refused with 503 ({} accept-failed lines)",
        front.lines_with("accept failed")
    );
    // Once the idle ones reach header_read_timeout, a client gets in.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let seen = send(&client(), &front.url(), &Req::new("GET", "/after-flood")).await;
    assert_eq!(seen.status, 200);
    assert_eq!(front.lines_with("accept failed"), 0);
    drop(idle);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_backs_off_quietly_and_recovers() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let text = front_settings(
        config_text(&redis.url(), &backend.url(), ""),
        "header_read_timeout = \"1s\"\nmax_connections = 100000",
    );
    let worker = Thr::start(parse_config(&text), 1).await;
    let front = LimitedFront::start(&text, 128);
    front.ready().await;
    // More idle sockets than the front has descriptors: accept fails.
    let idle = flood(front.port, 300).await;
    let started = Instant::now();
    // A client that comes after the idle ones' timeout is served (the
    // flood's backlog first, each for its second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = tokio::time::timeout(
        Duration::from_secs(20),
        send(&client(), &front.url(), &Req::new("GET", "/after-flood")),
    )
    .await
    .expect("served within 20 s of the flood");
    assert_eq!(seen.status, 200);
    let failures = front.lines_with("accept failed");
    assert!(failures >= 1, "the front never ran out of descriptors");
    // One line per 10 s at most.
    let allowed = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(failures <= allowed, "{failures} accept-failed lines");
    drop(idle);
    worker.stop().await;
}

/// Sends a POST head announcing `len` bytes, then `per_tick` bytes every
/// `tick`; returns what the front answered and when.
async fn trickle_post(
    addr: std::net::SocketAddr,
    len: usize,
    per_tick: usize,
    tick: Duration,
) -> (String, Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < len {
            tokio::time::sleep(tick).await;
            if per_tick == 0 {
                continue;
            }
            let n = per_tick.min(len - sent);
            if write.write_all(&vec![b'x'; n]).await.is_err() {
                return;
            }
            sent += n;
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => panic!("no answer within 30 s"),
        }
    }
    writer.abort();
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_are_cut() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        front_settings(t, "body_read_timeout = \"2s\"\nmin_body_rate = \"1KiB/s\"")
    })
    .await;
    let addr = stack.thr.addr();
    // 20 clients at a byte a second: never silent, far too slow.
    let trickles: Vec<_> = (0..20)
        .map(|_| tokio::spawn(trickle_post(addr, 100, 1, Duration::from_secs(1))))
        .collect();
    // And one that sends a little, then nothing.
    let silent = tokio::spawn(trickle_post(addr, 100, 0, Duration::from_secs(1)));
    for t in trickles.into_iter().chain([silent]) {
        let (answer, after) = t.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert!(after < Duration::from_secs(6), "cut after {after:?}");
    }
    assert_eq!(stack.backend.count(), 0, "no cut body reached the backend");
    // A body at a normal pace passes.
    let seen = send(
        &client(),
        &stack.url(),
        &Req::new("POST", "/fine").body(vec![b'y'; 1 << 20]),
    )
    .await;
    assert_eq!(seen.status, 200);
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_is_refused_before_any_rule_runs() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start(
        backend,
        1,
        r#"
[[rules]]
when = { host = "admin.test" }
then = { status = 403, body = "no admin here\n" }
stop = true
"#,
    )
    .await;
    let addr = stack.thr.addr();
    let ask = |head: &'static str| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        read_response(&mut stream).await
    };
    let rule = ask("GET /panel HTTP/1.1\r\nHost: admin.test\r\n\r\n").await;
    assert!(rule.starts_with("HTTP/1.1 403"), "{rule}");
    let two = ask("GET /panel HTTP/1.1\r\nHost: public.test\r\nHost: admin.test\r\n\r\n").await;
    assert!(two.starts_with("HTTP/1.1 400"), "{two}");
    assert!(two.contains("one Host field"), "{two}");
    let reversed =
        ask("GET /panel HTTP/1.1\r\nHost: admin.test\r\nHost: public.test\r\n\r\n").await;
    assert!(reversed.starts_with("HTTP/1.1 400"), "{reversed}");
    let absolute = ask("GET http://public.test/panel HTTP/1.1\r\nHost: admin.test\r\n\r\n").await;
    assert!(absolute.starts_with("HTTP/1.1 400"), "{absolute}");
    let agreeing = ask("GET http://public.test/panel HTTP/1.1\r\nHost: public.test\r\n\r\n").await;
    assert!(agreeing.starts_with("HTTP/1.1 200"), "{agreeing}");
    assert_eq!(
        stack.backend.count(),
        1,
        "only the agreeing request went through"
    );
    stack.thr.stop().await;
}

/// A backend that answers every request "ok" (after reading its body),
/// counts requests by their `x-n` field, and closes a kept-alive
/// connection after `idle` without a request, as many app servers do.
async fn idle_closing_backend(idle: Duration) -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counts = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // Wait for the next request head, at most `idle`.
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end;
                        }
                        let wait = if buf.is_empty() {
                            idle
                        } else {
                            Duration::from_secs(10)
                        };
                        match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    while buf.len() < end + 4 + length {
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let n = head
                        .lines()
                        .find_map(|l| l.strip_prefix("x-n:"))
                        .unwrap_or("-")
                        .trim()
                        .to_string();
                    *counts.lock().unwrap().entry(n).or_default() += 1;
                    buf.drain(..end + 4 + length);
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_closing_idle_connections_costs_no_502() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let (backend, counts) = idle_closing_backend(Duration::from_millis(200)).await;
    let text =
        config_text(&redis.url(), &backend, "").replace("max_inflight = 64", "max_inflight = 8");
    let thr = Thr::start(parse_config(&text), 1).await;
    let url = thr.url();
    // A busy daemon notices a closed connection late: its runtime learns
    // of the close only when it next polls for events. Two tasks that hold
    // the runtime's threads for 3 ms at a time make this one as busy.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let busy = busy.clone();
            tokio::spawn(async move {
                while busy.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(3));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    // 1,000 requests, GETs and POSTs, from 20 clients pausing around the
    // backend's idle bound between two requests, so that many find a
    // kept-alive connection just as the backend closes it.
    let clients: Vec<_> = (0..20)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = client();
                let mut statuses = Vec::new();
                for i in 0..50 {
                    let n = format!("{c}-{i}");
                    let req = if i % 2 == 0 {
                        Req::new("GET", format!("/g/{n}"))
                    } else {
                        Req::new("POST", format!("/p/{n}")).body(b"payload".to_vec())
                    };
                    let seen = send(&client, &url, &req.header("x-n", n.clone())).await;
                    statuses.push((n, seen.status));
                    let pause = 190 + (c as u64 * 7 + i as u64 * 13) % 20;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                statuses
            })
        })
        .collect();
    let mut failed = Vec::new();
    for c in clients {
        for (n, status) in c.await.unwrap() {
            if status != 200 {
                failed.push((n, status));
            }
        }
    }
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    for hog in hogs {
        hog.await.unwrap();
    }
    assert!(
        failed.is_empty(),
        "{} of 1000 not 200: {failed:?}",
        failed.len()
    );
    let counts = counts.lock().unwrap().clone();
    assert_eq!(counts.len(), 1000, "every request reached the backend");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "requests run twice: {twice:?}");
    thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_head_limits_are_configurable_with_a_clear_502() {
    let backend = SlowBackend::builder().start().await;
    let url = backend.url();
    let stack = Stack::start(
        backend,
        1,
        &format!(
            r#"
[[queues]]
name = "wide"
backend = "{url}"
max_response_headers = 300
max_response_header_size = "1MiB"

[[rules]]
when = {{ path = {{ prefix = "/wide/" }} }}
then = {{ queue = "wide" }}
"#
        ),
    )
    .await;
    // 150 Set-Cookie fields: over the default 100.
    let narrow = get(&stack.url(), "/cookies?cookies=150").await;
    assert_eq!(narrow.status, 502);
    let reason = String::from_utf8_lossy(&narrow.body);
    assert!(reason.contains("max_response_headers"), "{reason}");
    // (Read raw: the test's own client takes 100 fields at most.)
    let mut stream = TcpStream::connect(stack.thr.addr()).await.unwrap();
    stream
        .write_all(b"GET /wide/cookies?cookies=150 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let wide = read_response(&mut stream).await;
    assert!(wide.starts_with("HTTP/1.1 200"), "{wide}");
    let cookies = wide
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .count();
    assert_eq!(cookies, 150);
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_added_fields_can_be_turned_off() {
    let backend = SlowBackend::builder().record(true).start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        front_settings(t, "add_headers = [\"x-request-id\"]")
    })
    .await;
    let seen = get(&stack.url(), "/plain").await;
    assert_eq!(seen.status, 200);
    let recorded = &stack.backend.requests()[0];
    assert!(recorded.header("x-request-id").is_some());
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-start",
    ] {
        assert!(recorded.header(name).is_none(), "{name} was added");
    }
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_backend_read_is_never_sent_twice() {
    // A backend that reads the whole request, then closes without a word:
    // the request may have run, so it is a 502 and is not sent again.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = reads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.ends_with(b"payload") {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    testkit::init_logs();
    let redis = RedisServer::start();
    let thr = Thr::start(parse_config(&config_text(&redis.url(), &backend, "")), 1).await;
    let seen = send(
        &client(),
        &thr.url(),
        &Req::new("POST", "/once").body(b"payload".to_vec()),
    )
    .await;
    assert_eq!(seen.status, 502);
    assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
    thr.stop().await;
}

/// A backend that records each request's head as sent and answers "ok".
async fn head_recording_backend() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let length = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .map_or(0, |v| v.parse::<usize>().unwrap());
                    while buf.len() < end + length {
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    seen.lock().unwrap().push(head);
                    buf.drain(..end + length);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_quotes_and_brackets_in_a_query_pass_through_unchanged() {
    testkit::init_logs();
    let redis = RedisServer::start();
    let (backend, heads) = head_recording_backend().await;
    let rules = r#"
[[rules]]
when = { query = { q = "\"x\"" } }
then = { set_headers = { X-Rule = "matched" } }
"#;
    let thr = Thr::start(
        parse_config(&(config_text(&redis.url(), &backend, "") + rules)),
        1,
    )
    .await;
    let mut stream = TcpStream::connect(thr.addr()).await.unwrap();
    // Two requests on one connection, the second after a body that looks
    // like a request line: only request lines are touched.
    stream
        .write_all(b"GET /s?q=\"x\"&r=<y> HTTP/1.1\r\nHost: x\r\nX-Thr-Raw-Target: /evil\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let body = "GET /?\"b\" HTTP/1.1\r\n\r\n";
    stream
        .write_all(
            format!(
                "POST /p?a=<1> HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let second = read_response(&mut stream).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[0].starts_with("GET /s?q=\"x\"&r=<y> HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    let lower = heads[0].to_ascii_lowercase();
    assert!(
        lower.contains("x-rule: matched"),
        "rules see the decoded value: {}",
        heads[0]
    );
    assert!(!lower.contains("x-thr-raw-target"), "{}", heads[0]);
    assert!(
        heads[1].starts_with("POST /p?a=<1> HTTP/1.1\r\n"),
        "{}",
        heads[1]
    );
    // curl sends such queries unencoded too; direct and through thr agree.
    thr.stop().await;
}
