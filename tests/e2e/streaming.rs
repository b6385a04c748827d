//! Bodies through thr in bounded pieces (issue 10), against the real
//! binaries: big downloads and uploads with the daemons' and Redis's memory
//! measured, server-sent events at their pace, truncation when a backend
//! cuts a body, and every resource freed when a client goes away or stops
//! reading.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::support::*;

const MIB: u64 = 1 << 20;

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples the resident memory of `pids` every 50 ms until dropped; the
/// peaks are read with [`Sampler::peaks`].
struct Sampler {
    peaks: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Sampler {
        let peaks = std::sync::Arc::new(std::sync::Mutex::new(vec![0; pids.len()]));
        let task = tokio::spawn({
            let peaks = peaks.clone();
            async move {
                loop {
                    {
                        let mut p = peaks.lock().unwrap();
                        for (i, pid) in pids.iter().enumerate() {
                            p[i] = p[i].max(rss(*pid));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Sampler { peaks, task }
    }

    fn peaks(&self) -> Vec<u64> {
        self.peaks.lock().unwrap().clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn request(base: &str, method: &str, target: &str, body: Bytes) -> http::Response<Incoming> {
    let req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(format!("{base}{target}"))
        .body(Full::new(body))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("a response head within 30 s")
        .expect("a response")
}

/// Reads a body to its end, counting bytes only; returns the bytes read,
/// or the error that cut it.
async fn read_count(body: &mut Incoming) -> Result<u64, String> {
    let mut offset: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("after {offset} bytes: {e}"))?;
        offset += frame.into_data().map_or(0, |d| d.len() as u64);
    }
    Ok(offset)
}

/// Reads a body to its end, checking every byte against the backend's
/// pattern; returns the bytes read, or the error that cut it.
async fn read_pattern(body: &mut Incoming) -> Result<u64, String> {
    let mut offset: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("after {offset} bytes: {e}"))?;
        if let Ok(data) = frame.into_data() {
            for (i, b) in data.iter().enumerate() {
                let at = offset + i as u64;
                assert_eq!(*b, (at * 7 % 256) as u8, "byte {at} differs");
            }
            offset += data.len() as u64;
        }
    }
    Ok(offset)
}

/// Keys holding body bytes still in Redis (response pieces, request
/// chunks); a cancelled stream's small state hash stays a while on
/// purpose (its worker must learn of the cancel).
fn body_keys(redis: &RedisServer) -> Vec<String> {
    let mut conn = redis.conn();
    let mut keys: Vec<String> = Vec::new();
    for suffix in ["pieces", "upload"] {
        let pattern = format!("{}j:*:{suffix}", keyspace().root);
        let found: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut conn).unwrap();
        keys.extend(found);
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_download_streams_in_bounded_memory_and_a_slow_reader_holds_no_more() {
    let backend = SlowBackend::builder().workers(4).start().await;
    let stack = Binaries::start(backend, 1, "").await;
    let base = stack.url();
    assert_eq!(get(&base, "/warm").await.status, 200);
    let pids = vec![stack.front.pid(), stack.workers[0].pid(), stack.redis.pid()];
    let idle: Vec<u64> = pids.iter().map(|p| rss(*p)).collect();
    let sampler = Sampler::start(pids.clone());

    let total = 1u64 << 30;
    let started = Instant::now();
    let response = request(
        &base,
        "GET",
        &format!("/dl?stream={total}&length=1"),
        Bytes::new(),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-length"].to_str().unwrap(),
        total.to_string()
    );
    let mut body = response.into_body();
    assert_eq!(
        read_pattern(&mut body).await,
        Ok(total),
        "the whole GiB, byte for byte"
    );
    let took = started.elapsed();
    let peaks = sampler.peaks();
    for ((name, peak), idle) in ["front", "worker", "redis"].iter().zip(&peaks).zip(&idle) {
        let above = peak.saturating_sub(*idle);
        eprintln!("{name}: idle {} MiB, peak {} MiB", idle / MIB, peak / MIB);
        assert!(
            // README "How bodies travel": a few MiB of live buffers per
            // stream, plus what the allocator keeps of a GiB of churn.
            above <= 96 * MIB,
            "{name} grew {} MiB during a 1 GiB download",
            above / MIB
        );
    }
    eprintln!(
        "1 GiB in {took:?}: {:.0} MiB/s",
        total as f64 / MIB as f64 / took.as_secs_f64()
    );

    // A client reading 1 MiB a second: what waits for it is the window and
    // the worker's read-ahead, not the download.
    let before: Vec<u64> = pids.iter().map(|p| rss(*p)).collect();
    let sampler = Sampler::start(pids.clone());
    let response = request(
        &base,
        "GET",
        &format!("/slow?stream={}", 500 * MIB),
        Bytes::new(),
    )
    .await;
    let mut body = response.into_body();
    let mut read = 0u64;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let want = read + MIB;
        while read < want {
            let frame = body.frame().await.expect("more").expect("a frame");
            read += frame.into_data().map_or(0, |d| d.len() as u64);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for ((name, peak), before) in ["front", "worker", "redis"]
        .iter()
        .zip(&sampler.peaks())
        .zip(&before)
    {
        let above = peak.saturating_sub(*before);
        eprintln!("slow reader: {name} +{} MiB", above / MIB);
        assert!(
            above <= 16 * MIB,
            "{name} grew {} MiB for a slow reader",
            above / MIB
        );
    }
    // The client goes away mid-download: the backend stream, the worker's
    // slot and Redis's pieces are all released.
    drop(body);
    until_async(
        Duration::from_secs(10),
        "the backend stream is dropped",
        || stack.backend.open_streams() == 0,
    )
    .await;
    until_async(
        Duration::from_secs(10),
        "no body keys left in Redis",
        || body_keys(&stack.redis).is_empty(),
    )
    .await;
    assert_eq!(
        get(&base, "/after").await.status,
        200,
        "the slot is free again"
    );
}

async fn until_async(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_stay_fast_while_big_downloads_run() {
    let backend = SlowBackend::builder().workers(16).start().await;
    let stack = Binaries::start_with(RedisServer::start(), backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 8")
    })
    .await;
    let base = stack.url();
    async fn hundred(base: &str) -> Vec<Duration> {
        let mut took = Vec::new();
        for i in 0..100 {
            let started = Instant::now();
            let seen = get(base, &format!("/small/{i}?bytes=100")).await;
            assert_eq!(seen.status, 200);
            took.push(started.elapsed());
        }
        took.sort();
        took
    }
    let quiet = hundred(&base).await;
    let downloads: Vec<_> = (0..3)
        .map(|i| {
            let base = base.clone();
            tokio::spawn(async move {
                let response = request(
                    &base,
                    "GET",
                    &format!("/big/{i}?stream={}", 200 * MIB),
                    Bytes::new(),
                )
                .await;
                read_count(&mut response.into_body()).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let busy = hundred(&base).await;
    let running = downloads.iter().filter(|d| !d.is_finished()).count();
    for d in downloads {
        assert_eq!(d.await.unwrap(), Ok(200 * MIB));
    }
    eprintln!(
        "small requests p50/max: quiet {:?}/{:?}, during downloads {:?}/{:?} ({running} still running at the end)",
        quiet[50], quiet[99], busy[50], busy[99]
    );
    assert!(
        busy[50] <= quiet[50] * 5 + Duration::from_millis(50),
        "median {:?} during downloads vs {:?} without",
        busy[50],
        quiet[50]
    );
    // Before streaming, 9 of 12 such requests waited 30 s for a 504. On a
    // 2-core machine running debug daemons, the downloads and the test's
    // own client share the CPU, hence the loose bound on the slowest (a
    // tail of seconds is still seen there, see the issue 10 note).
    assert!(
        busy[99] < Duration::from_secs(15),
        "slowest: {:?}",
        busy[99]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_as_they_are_sent() {
    let backend = SlowBackend::builder().start().await;
    let stack = Binaries::start(backend, 1, "").await;
    let response = request(
        &stack.url(),
        "GET",
        "/events?events=5&every=400",
        Bytes::new(),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
            while arrivals.len() < text.matches("\n\n").count() {
                arrivals.push(Instant::now());
            }
        }
    }
    assert_eq!(
        text,
        (0..5).map(|i| format!("data: {i}\n\n")).collect::<String>()
    );
    for (i, at) in arrivals.iter().enumerate() {
        let offset = at.duration_since(arrivals[0]).as_millis() as i64 - 400 * i as i64;
        assert!(
            offset.abs() <= 100,
            "event {i} arrived {offset} ms off its pace (arrivals {:?})",
            arrivals
                .iter()
                .map(|a| a.duration_since(arrivals[0]))
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_cutting_a_body_gives_a_truncated_response() {
    let backend = SlowBackend::builder().start().await;
    let stack = Binaries::start(backend, 1, "").await;
    for framing in ["&length=1", ""] {
        let target = format!("/cut?stream={}&cut={}{framing}", 3 * MIB, MIB);
        let response = request(&stack.url(), "GET", &target, Bytes::new()).await;
        assert_eq!(response.status(), 200);
        let read = read_pattern(&mut response.into_body()).await;
        assert!(
            read.is_err(),
            "{framing:?}: a cut body must not look complete, read {read:?}"
        );
    }
    assert_eq!(get(&stack.url(), "/after").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_mib_upload_arrives_intact() {
    let backend = SlowBackend::builder().start().await;
    let stack = Binaries::start_with(RedisServer::start(), backend, 1, |t| {
        t.replace("[http2redis]", "[http2redis]\nmax_body = \"1GiB\"")
    })
    .await;
    let size = 500 * MIB as usize;
    let data = Bytes::from(testkit::backend::pattern(size));
    let front = stack.front.pid();
    let idle = rss(front);
    let sampler = Sampler::start(vec![front, stack.workers[0].pid()]);
    let response = request(&stack.url(), "POST", "/upload?bytes=2", data).await;
    assert_eq!(response.status(), 200);
    let peaks = sampler.peaks();
    eprintln!(
        "upload: front +{} MiB, worker peak {} MiB",
        peaks[0].saturating_sub(idle) / MIB,
        peaks[1] / MIB
    );
    assert!(
        peaks[0].saturating_sub(idle) <= 64 * MIB,
        "the front held the upload"
    );
    let seen = stack.backend.requests();
    let body = &seen.last().unwrap().body;
    assert_eq!(body.len(), size);
    assert!(
        body[..] == testkit::backend::pattern(size)[..],
        "the upload arrived altered"
    );
    until_async(Duration::from_secs(5), "the stored body is dropped", || {
        body_keys(&stack.redis).is_empty()
    })
    .await;
}

/// A request body up to `INLINE_BODY` travels in its job's frame; one
/// byte more and it is stored in chunks (`HSET` on its `upload` key, as
/// SLOWLOG sees every command), so that no big body passes through the
/// claim script. Both arrive as sent, and the stored one is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_inline_body_is_stored_in_chunks_and_arrives_intact() {
    use thr_core::envelope::{CHUNK, INLINE_BODY};

    let backend = SlowBackend::builder().start().await;
    let stack = Binaries::start(backend, 1, "").await;
    // Chunks stored since the last call: `HSET`s of an upload key.
    let chunks_stored = || {
        let n = logged_commands(&stack.redis, |words| {
            words[0] == "hset" && words.get(1).is_some_and(|key| key.ends_with(":upload"))
        });
        log_every_command(&stack.redis);
        n
    };
    log_every_command(&stack.redis);
    for (size, chunks) in [(INLINE_BODY, 0), (INLINE_BODY + 1, 1), (CHUNK + 1, 2)] {
        let data = Bytes::from(testkit::backend::pattern(size));
        let response = request(&stack.url(), "POST", "/upload", data.clone()).await;
        assert_eq!(response.status(), 200, "{size} bytes");
        let seen = stack.backend.requests();
        assert!(
            seen.last().unwrap().body[..] == data[..],
            "{size} bytes altered"
        );
        assert_eq!(chunks_stored(), chunks, "{size} bytes: chunks stored");
    }
    until_async(
        Duration::from_secs(5),
        "the stored bodies are dropped",
        || body_keys(&stack.redis).is_empty(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_timeout_per_rule_max_response_and_a_client_that_never_reads() {
    let backend = SlowBackend::builder().workers(4).start().await;
    let stack = Binaries::start_with(RedisServer::start(), backend, 1, |t| {
        t.replace(
            "[http2redis]",
            "[http2redis]\nclient_write_timeout = \"1s\"",
        )
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"1s\"")
        .replace(
            "max_inflight = 64",
            "max_inflight = 1\nmax_response = \"1MiB\"",
        ) + "[[rules]]\nwhen = { path = \"/poll\" }\nthen = { reply_timeout = \"10s\" }\n"
    })
    .await;
    let base = stack.url();
    // A long-poll gets its own wait for the head; others keep the default.
    assert_eq!(get(&base, "/poll?delay=2000").await.status, 200);
    assert_eq!(get(&base, "/other?delay=2000").await.status, 504);
    // Its job still holds the only slot for a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Past max_response: a declared length is refused with a clear 502, a
    // stream growing past it is cut.
    let big = get(&base, &format!("/big?stream={}&length=1", 2 * MIB)).await;
    assert_eq!(big.status, 502);
    assert!(String::from_utf8_lossy(&big.body).contains("max_response"));
    let response = request(
        &base,
        "GET",
        &format!("/big?stream={}", 2 * MIB),
        Bytes::new(),
    )
    .await;
    assert!(read_pattern(&mut response.into_body()).await.is_err());

    // A client that reads nothing: cut after client_write_timeout, and its
    // stream's resources (backend call, worker slot, Redis pieces) freed.
    use tokio::io::AsyncWriteExt;
    until_async(
        Duration::from_secs(10),
        "the cut stream is released",
        || stack.backend.open_streams() == 0,
    )
    .await;
    let before = stack.backend.count();
    let mut raw = tokio::net::TcpStream::connect(stack.addr()).await.unwrap();
    raw.write_all(
        format!(
            "GET /stuck?stream={} HTTP/1.1\r\nhost: x\r\n\r\n",
            512 * MIB
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    until_async(Duration::from_secs(10), "the download starts", || {
        stack.backend.count() > before
    })
    .await;
    until_async(
        Duration::from_secs(15),
        "the stuck stream is released",
        || stack.backend.open_streams() == 0 && body_keys(&stack.redis).is_empty(),
    )
    .await;
    assert_eq!(
        get(&base, "/after").await.status,
        200,
        "its slot is free (max_inflight = 1)"
    );
    drop(raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_survives_a_redis_pause_byte_for_byte() {
    // A slow Redis is not a failed one: pushes and reads whose answers are
    // late are asked again, and numbering keeps every piece exactly once.
    let backend = SlowBackend::builder().start().await;
    let stack = Binaries::start(backend, 1, "").await;
    let total = 64 * MIB;
    let response = request(
        &stack.url(),
        "GET",
        &format!("/dl?stream={total}"),
        Bytes::new(),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut read = 0u64;
    let mut checked = Vec::new();
    while read < 8 * MIB {
        let data = body
            .frame()
            .await
            .expect("more")
            .expect("a frame")
            .into_data()
            .unwrap();
        read += data.len() as u64;
        checked.extend_from_slice(&data);
    }
    stall(&stack.redis, Duration::from_secs(3));
    while let Some(frame) = body.frame().await {
        let data = frame.expect("not cut by a pause").into_data().unwrap();
        checked.extend_from_slice(&data);
    }
    assert_eq!(checked.len() as u64, total);
    assert!(
        checked == testkit::backend::pattern(total as usize),
        "bytes differ after the pause"
    );
}
