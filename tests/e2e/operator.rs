//! An operator's first hour (issue 13): systemd readiness, logs as files
//! and log shippers see them, `thrctl` on a queue with no traffic yet,
//! X-Request-Start, the default configuration path and the quickstart's
//! port check.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use testkit::bins::{Process, binary};

use crate::support::*;

/// A stack's configuration, listening on a free port (returned).
fn stack_config(redis: &RedisServer, backend: &SlowBackend, extra: &str) -> (String, u16) {
    on_free_port(&config_text(&redis.url(), &backend.url(), extra))
}

/// A daemon started with `envs`, its stderr written to `log`.
fn spawn_logged(
    daemon: &str,
    config: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    log: &std::path::Path,
) -> Process {
    let child = Command::new(binary(daemon))
        .args(["--config", config])
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Process::adopt(child, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_stopping_from_both_daemons() {
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let (text, port) = stack_config(&redis, &backend, "");
    let (dir, path) = config_file(&text);
    for daemon in ["redis2http", "http2redis"] {
        let socket_path = dir.path().join(format!("{daemon}.notify"));
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut process = spawn_logged(
            daemon,
            &path,
            &[],
            &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
            &dir.path().join(format!("{daemon}.log")),
        );
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("READY=1 within 15 s");
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]).trim(),
            "READY=1",
            "{daemon}"
        );
        if daemon == "http2redis" {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                "ready means listening"
            );
        }
        process.signal("TERM");
        let n = socket.recv(&mut buf).expect("STOPPING=1");
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]).trim(),
            "STOPPING=1",
            "{daemon}"
        );
        assert_eq!(process.wait(), Some(0), "{daemon} exit code");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_keep_the_path_carry_the_request_id_and_write_one_line_per_request() {
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let (text, port) = stack_config(&redis, &backend, "");
    let (dir, path) = config_file(&text);
    let info = [("RUST_LOG", "info")];
    let front_log = dir.path().join("front.json");
    let worker_log = dir.path().join("worker.txt");
    let mut front = spawn_logged(
        "http2redis",
        &path,
        &["--log-format", "json"],
        &info,
        &front_log,
    );
    let mut worker = spawn_logged("redis2http", &path, &[], &info, &worker_log);
    let url = format!("http://127.0.0.1:{port}");
    until_listening(port).await;
    let seen = send(
        &client(),
        &url,
        &Req::new("GET", "/x?y=1").header("x-request-id", "op-log-1"),
    )
    .await;
    assert_eq!(seen.status, 200);
    front.signal("TERM");
    worker.signal("TERM");
    assert_eq!(front.wait(), Some(0));
    assert_eq!(worker.wait(), Some(0));

    let front_text = std::fs::read_to_string(&front_log).unwrap();
    let summary: serde_json::Value = front_text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "request")
        .unwrap_or_else(|| panic!("no summary line in:\n{front_text}"));
    assert_eq!(summary["path"], "/x?y=1", "{summary}");
    assert_eq!(summary["target"], "http2redis::front", "{summary}");
    assert_eq!(summary["status"], 200, "{summary}");
    assert_eq!(summary["span"]["request_id"], "op-log-1", "{summary}");
    // Each key once: a parser keeping the last of two would lose one.
    let raw = front_text
        .lines()
        .find(|l| l.contains("\"message\":\"request\""))
        .unwrap();
    assert_eq!(raw.matches("\"target\":").count(), 1, "{raw}");

    let worker_text = std::fs::read_to_string(&worker_log).unwrap();
    assert!(
        !worker_text.contains('\u{1b}'),
        "colour codes in a log file:\n{worker_text}"
    );
    let info_lines_about_it = front_text
        .lines()
        .chain(worker_text.lines())
        .filter(|l| l.contains("op-log-1") && l.contains("INFO"))
        .count();
    assert_eq!(
        info_lines_about_it, 1,
        "one line per request at info:\n{front_text}\n{worker_text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrctl_pauses_a_configured_queue_before_its_first_request() {
    if std::path::Path::new("/etc/thr/thr.toml").exists() {
        eprintln!("skipped: thrctl would read this machine's /etc/thr/thr.toml");
        return;
    }
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let extra = format!(
        "[[queues]]\nname = \"fresh\"\nbackend = \"{}\"\n",
        backend.url()
    );
    let (text, _) = stack_config(&redis, &backend, &extra);
    let (dir, path) = config_file(&text);
    let _worker = spawn_logged("redis2http", &path, &[], &[], &dir.path().join("w.log"));
    // No --config, and a working directory without one: thrctl knows the
    // queue from the live worker that serves it.
    let thrctl = |args: &[&str]| {
        Command::new(binary("thrctl"))
            .args(["--redis", &redis.url()])
            .args(args)
            .env_remove("THR_CONFIG")
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let mut last = None;
    for _ in 0..100 {
        let out = thrctl(&["pause", "fresh"]);
        if out.status.success() {
            last = None;
            break;
        }
        last = Some(String::from_utf8_lossy(&out.stderr).into_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, None, "thrctl pause fresh kept failing");
    let out = thrctl(&["pause", "no-such-queue"]);
    assert_eq!(out.status.code(), Some(2), "a typo is still refused");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("fresh"),
        "the known queues are listed: {said}"
    );
    assert!(thrctl(&["resume", "fresh"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_learns_when_the_front_received_the_request() {
    let backend = SlowBackend::builder().record(true).start().await;
    let stack = Stack::start(backend, 1, "").await;
    let micros = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let before = micros();
    assert_eq!(get(&stack.url(), "/apm").await.status, 200);
    let after = micros();
    let value = stack.backend.requests()[0]
        .header("x-request-start")
        .expect("X-Request-Start added");
    let t: u64 = value
        .strip_prefix("t=")
        .and_then(|us| us.parse().ok())
        .unwrap_or_else(|| panic!("not t=<µs>: {value}"));
    assert!((before..=after).contains(&t), "{before} <= {t} <= {after}");
    stack.thr.stop().await;
}

#[test]
fn the_daemons_find_their_configuration_without_flags() {
    let redis = RedisServer::start();
    let text = config_text(&redis.url(), "http://127.0.0.1:9", "");
    let checkout = temp_dir("thr-checkout-");
    std::fs::create_dir(checkout.path().join("config")).unwrap();
    std::fs::write(checkout.path().join("config/thr.toml"), &text).unwrap();
    let check = |dir: &std::path::Path| {
        Command::new(binary("http2redis"))
            .arg("--check")
            .env_remove("THR_CONFIG")
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let out = check(checkout.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("config/thr.toml: ok"));
    if !std::path::Path::new("/etc/thr/thr.toml").exists() {
        let empty = temp_dir("thr-nowhere-");
        let out = check(empty.path());
        assert_eq!(out.status.code(), Some(2));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("config/thr.toml") && said.contains("/etc/thr/thr.toml"),
            "{said}"
        );
    }
}

#[test]
fn the_quickstart_stops_at_once_when_a_port_is_taken() {
    // Held for the test; if something else holds it already, the
    // quickstart must refuse all the same.
    let _held = std::net::TcpListener::bind("127.0.0.1:9181");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/quickstart.sh"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("is in use"), "{said}");
    assert!(
        !said.contains("Compiling") && !said.contains("Finished"),
        "it stops before building: {said}"
    );
}

/// README's `explain` example, run as written: its output block must be
/// what `config/thr.toml` gives today.
#[test]
fn the_readme_explain_example_matches_config_thr_toml() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let command = readme
        .lines()
        .find(|l| l.starts_with("http2redis explain --config config/thr.toml"))
        .expect("README shows an explain command");
    let shown = readme
        .split_once("`explain` prints which rules match, in order, and the result:\n\n```\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(block, _)| block)
        .expect("README shows explain's output");
    let out = Command::new("bash")
        .arg("-c")
        .arg(command.replacen("http2redis", binary("http2redis").to_str().unwrap(), 1))
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), shown);
}

/// The value of `name{limit="foo_bar"}` in a scrape, if present.
fn foo_bar_gauge(metrics: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name}{{limit=\"foo_bar\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_gauges_fall_back_to_zero_once_nobody_waits() {
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let admin = testkit::redis::free_port();
    let limit =
        "[[limits]]\nname = \"foo_bar\"\nby = { header = \"X-User\" }\nmax_concurrent = 1\n";
    let (text, port) = stack_config(&redis, &backend, limit);
    let text = text.replace(
        "[redis2http]\n",
        &format!("[redis2http]\nadmin = \"127.0.0.1:{admin}\"\n"),
    );
    let (dir, path) = config_file(&text);
    let _front = spawn_logged("http2redis", &path, &[], &[], &dir.path().join("f.log"));
    let _worker = spawn_logged("redis2http", &path, &[], &[], &dir.path().join("w.log"));
    until_listening(port).await;
    let url = format!("http://127.0.0.1:{port}");
    let admin_url = format!("http://127.0.0.1:{admin}");
    let client = client();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let req = Req::new("GET", "/hold?delay=2500").header("x-user", "ann");
            spawn_send(&client, &url, req)
        })
        .collect();
    // (The worker's admin listener may not be up at the first look.)
    let gauges = || async {
        let metrics = try_send(&client, &admin_url, &Req::new("GET", "/metrics")).await;
        let text = metrics
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .unwrap_or_default();
        (
            foo_bar_gauge(&text, "thr_quota_waiting"),
            foo_bar_gauge(&text, "thr_quota_saturated_keys"),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = gauges().await;
    while !(seen.0.unwrap_or(0.0) >= 1.0 && seen.1 == Some(1.0)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the gauges never showed ann waiting: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = gauges().await;
    }
    for c in clients {
        assert_eq!(c.await.unwrap().status, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen != (Some(0.0), Some(0.0)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the gauges stayed up once the queue emptied: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = gauges().await;
    }
}

/// A Redis that evicts keys when full would lose jobs, leases and the
/// markers that keep a POST from running twice: both daemons say so in
/// their log, naming the policy and the fix; with `noeviction` they do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_warn_of_a_redis_that_evicts_keys() {
    let redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let (text, port) = stack_config(&redis, &backend, "");
    let (dir, path) = config_file(&text);
    let warned = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("maxmemory-policy"))
    };
    // The default (noeviction): a request goes through, and no warning.
    let quiet: Vec<_> = ["redis2http", "http2redis"]
        .iter()
        .map(|daemon| {
            let log = dir.path().join(format!("{daemon}-quiet.log"));
            (spawn_logged(daemon, &path, &[], &[], &log), log)
        })
        .collect();
    until_listening(port).await;
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}"), "/").await.status,
        200
    );
    // A few beats each: the settings are read at the first.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for (mut process, log) in quiet {
        process.signal("TERM");
        assert_eq!(process.wait(), Some(0));
        assert!(!warned(&log), "{}", std::fs::read_to_string(&log).unwrap());
    }
    redis.config_set("maxmemory-policy", "allkeys-lru");
    for daemon in ["redis2http", "http2redis"] {
        let log = dir.path().join(format!("{daemon}.log"));
        let mut process = spawn_logged(daemon, &path, &[], &[], &log);
        until(Duration::from_secs(10), "the warning", || warned(&log)).await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("maxmemory-policy allkeys-lru") && text.contains("noeviction"),
            "{text}"
        );
        process.signal("TERM");
        assert_eq!(process.wait(), Some(0), "{daemon} exit code");
    }
}

/// While Redis is down every request fails to enqueue and every retry
/// loop (each running job's too) fails at each attempt: each logs one
/// warning line per 10 s, with how many went unlogged, not one per request
/// or attempt (an outage at thousands of requests a second would flood the
/// log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_logs_one_line_per_ten_seconds_not_one_per_request() {
    let mut redis = RedisServer::start();
    let backend = SlowBackend::builder().start().await;
    let (text, port) = stack_config(&redis, &backend, "");
    let (dir, path) = config_file(&text);
    let info = [("RUST_LOG", "info")];
    let front_log = dir.path().join("http2redis.log");
    let worker_log = dir.path().join("redis2http.log");
    let mut front = spawn_logged("http2redis", &path, &[], &info, &front_log);
    let mut worker = spawn_logged("redis2http", &path, &[], &info, &worker_log);
    until_listening(port).await;
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&url, "/up").await.status, 200);
    // Jobs that end while Redis is down: each retries its reply.
    let client = client();
    let running: Vec<_> = (0..4)
        .map(|i| {
            spawn_send(
                &client,
                &url,
                Req::new("GET", format!("/running/{i}?delay=400")),
            )
        })
        .collect();
    until_running(&backend, 4).await;
    redis.kill();
    let down = Instant::now();
    for i in 0..30 {
        assert_eq!(get(&url, &format!("/down/{i}")).await.status, 503);
    }
    // Long enough for several claims, reaps and replies to fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Back (empty): each client gets one answer, the reply or, for a GET
    // whose job Redis forgot, "try again" (the front's audit; GET is
    // retry-safe). Either ends the job's retries.
    redis.restart();
    for r in running {
        let seen = r.await.unwrap();
        assert!(matches!(seen.status, 200 | 503), "{seen:?}");
    }
    for process in [&mut front, &mut worker] {
        process.signal("TERM");
        assert_eq!(process.wait(), Some(0));
    }
    // One line per 10 s of outage (a loaded machine stretches it).
    let allowed = 1 + down.elapsed().as_secs() as usize / 10;
    let count = |log: &std::path::Path, what: &str| {
        let text = std::fs::read_to_string(log).unwrap();
        let n = text
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(what))
            .count();
        (n, text)
    };
    for (log, what) in [
        (&front_log, "enqueue failed"),
        (&front_log, "reply loop"),
        (&worker_log, "claim failed"),
        (&worker_log, "reaping failed"),
        (&worker_log, "could not push the reply"),
    ] {
        let (n, text) = count(log, what);
        assert!(n <= allowed, "{n} lines with {what:?}:\n{text}");
    }
    assert!(count(&front_log, "enqueue failed").0 >= 1);
    assert!(count(&worker_log, "claim failed").0 >= 1);
    assert!(count(&worker_log, "could not push the reply").0 >= 1);
}
