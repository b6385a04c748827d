//! Rules end to end: direct answers, rewrites reaching the backend,
//! priorities reaching the queue, bypass, auth, and reloads under load.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use crate::support::*;

const ISSUE_EXAMPLE: &str = r#"
[[rules]]
when = { path = "/forbidden" }
then = { status = 403, body = "forbidden\n" }
stop = true

[[rules]]
when = { header = { X-Priority = "high" } }
then = { priority = 1 }

[[rules]]
when = { path = { glob = "/reports/*" }, method = ["GET", "HEAD"] }
then = { priority = 80, set_headers = { X-Slow = "yes" } }

[[rules]]
when = { remote_ip = { cidr = "10.0.0.0/8" } }
then = { remove_headers = ["X-Internal-Debug"] }
"#;

#[tokio::test]
async fn the_issue_example_answers_directly_and_rewrites() {
    let stack = Stack::start(SlowBackend::builder().start().await, 1, ISSUE_EXAMPLE).await;
    let client = client();
    let forbidden = send(&client, &stack.url(), &Req::new("GET", "/forbidden")).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(&forbidden.body[..], b"forbidden\n");
    assert_eq!(
        stack.backend.count(),
        0,
        "a direct answer never reaches the backend"
    );

    let report = send(
        &client,
        &stack.url(),
        &Req::new("GET", "/reports/q1").header("x-internal-debug", "1"),
    )
    .await;
    assert_eq!(report.status, 200);
    let got = stack.backend.requests();
    assert_eq!(got[0].header("x-slow").as_deref(), Some("yes"));
    // 127.0.0.1 is not in 10.0.0.0/8: the header stays.
    assert_eq!(got[0].header("x-internal-debug").as_deref(), Some("1"));
    stack.thr.stop().await;
}

#[tokio::test]
async fn rewrites_reach_the_backend_and_responses_are_edited() {
    let rules = r#"
[[rules]]
when = { path = { prefix = "/v1/" }, query = { debug = { absent = false } } }
then = { path = { regex = "^/v1/(.*)$", replace = "/api/$1" }, method = "POST", host = "legacy.internal", set_query = { format = "json" }, remove_query = ["debug"], set_headers = { X-Api = "v1" }, add_headers = { Via = "thr" }, remove_headers = ["Cookie"], set_response_headers = { X-Frame-Options = "DENY" }, remove_response_headers = ["X-Echo-Method"] }

[[rules]]
when = { path = "/empty" }
then = { default_body = "nothing to see\n" }
"#;
    let stack = Stack::start(SlowBackend::builder().start().await, 1, rules).await;
    let client = client();
    let seen = send(
        &client,
        &stack.url(),
        &Req::new("GET", "/v1/users/7?debug=1&keep=a%2Fb").header("cookie", "secret=1"),
    )
    .await;
    assert_eq!(seen.status, 200);
    assert_eq!(seen.header("x-frame-options").as_deref(), Some("DENY"));
    assert!(seen.header("x-echo-method").is_none());
    let got = &stack.backend.requests()[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.target, "/api/users/7?keep=a%2Fb&format=json");
    assert_eq!(got.header("host").as_deref(), Some("legacy.internal"));
    assert_eq!(
        got.header("x-forwarded-host").as_deref(),
        Some("app.example"),
        "the client's host is kept here"
    );
    assert_eq!(got.header("x-api").as_deref(), Some("v1"));
    assert_eq!(got.header("via").as_deref(), Some("thr"));
    assert!(got.header("cookie").is_none());

    let empty = send(&client, &stack.url(), &Req::new("GET", "/empty")).await;
    assert_eq!(&empty.body[..], b"nothing to see\n");
    assert_eq!(empty.header("content-length").as_deref(), Some("15"));
    let head = send(&client, &stack.url(), &Req::new("HEAD", "/empty")).await;
    assert!(head.body.is_empty());
    stack.thr.stop().await;
}

#[tokio::test]
async fn priorities_reach_the_queue() {
    let backend = SlowBackend::builder().start().await;
    let stack = Stack::start_with(backend, 1, |t| {
        t.replace("max_inflight = 64", "max_inflight = 1") + ISSUE_EXAMPLE
    })
    .await;
    let url = stack.url();
    let client = client();
    // Occupy the only slot, then queue five priority-80 reports and, last,
    // one priority-1 request: it must be the next to start.
    let first = spawn_send(&client, &url, Req::new("GET", "/hold?delay=1500"));
    until_running(&stack.backend, 1).await;
    let mut later = Vec::new();
    for i in 0..5 {
        let (client, url) = (client.clone(), url.clone());
        later.push(tokio::spawn(async move {
            send(&client, &url, &Req::new("GET", format!("/reports/{i}"))).await
        }));
        until_enqueued(&stack.redis, "default", i + 2).await;
    }
    let urgent = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            send(
                &client,
                &url,
                &Req::new("GET", "/urgent").header("x-priority", "high"),
            )
            .await
        })
    };
    until_enqueued(&stack.redis, "default", 7).await;
    // While they wait, Redis holds them with their priorities.
    let mut conn = stack.redis.conn();
    let scores: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&keys("default").pending)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut conn)
        .unwrap();
    let priorities: Vec<u8> = scores
        .iter()
        .map(|(_, s)| thr_core::priority::priority_of(*s as u64))
        .collect();
    assert_eq!(priorities, [1, 80, 80, 80, 80, 80]);

    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(urgent.await.unwrap().status, 200);
    for r in later {
        assert_eq!(r.await.unwrap().status, 200);
    }
    let order: Vec<String> = stack.backend.targets();
    assert_eq!(
        order,
        [
            "/hold?delay=1500",
            "/urgent",
            "/reports/0",
            "/reports/1",
            "/reports/2",
            "/reports/3",
            "/reports/4"
        ]
    );
    stack.thr.stop().await;
}

#[tokio::test]
async fn bypass_goes_straight_to_the_backend() {
    let rules =
        "[[rules]]\nwhen = { path = { glob = \"/static/**\" } }\nthen = { bypass = true }\n";
    // No worker at all: only bypassed requests can be answered.
    let stack = Stack::start_with(SlowBackend::builder().start().await, 0, |t| {
        t.replace("reply_timeout = \"10s\"", "reply_timeout = \"1s\"") + rules
    })
    .await;
    let seen = get(&stack.url(), "/static/css/site.css?cookies=2").await;
    assert_eq!(seen.status, 200);
    assert_eq!(
        seen.headers
            .iter()
            .filter(|(n, _)| n == "set-cookie")
            .count(),
        2
    );
    assert_eq!(
        stack.backend.requests()[0].target,
        "/static/css/site.css?cookies=2"
    );
    assert_eq!(
        get(&stack.url(), "/app").await.status,
        504,
        "queued requests need a worker"
    );
    stack.thr.stop().await;
}

#[tokio::test]
async fn real_ip_comes_from_trusted_proxies_only() {
    let text_rules = "[[rules]]\nwhen = { real_ip = \"203.0.113.9\" }\nthen = { status = 451 }\n";
    let trusted = Stack::start_with(SlowBackend::builder().start().await, 1, |t| {
        t.replace(
            "shutdown_grace = \"5s\"\n\n[redis2http]",
            "shutdown_grace = \"5s\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n[redis2http]",
        ) + text_rules
    })
    .await;
    let client = client();
    let via_proxy = Req::new("GET", "/").header("x-forwarded-for", "203.0.113.9, 10.0.0.1");
    assert_eq!(send(&client, &trusted.url(), &via_proxy).await.status, 451);
    trusted.thr.stop().await;

    let untrusted = Stack::start(SlowBackend::builder().start().await, 1, text_rules).await;
    assert_eq!(
        send(&client, &untrusted.url(), &via_proxy).await.status,
        200,
        "a spoofed header is ignored"
    );
    untrusted.thr.stop().await;
}

/// An auth service: `Bearer good` → 200 with X-User; `Bearer crash` → 500;
/// anything else → 401 with a challenge. Counts its calls.
async fn auth_service() -> (
    String,
    Arc<AtomicUsize>,
    Arc<Mutex<Vec<HashMap<String, String>>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (calls.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (c, s) = (c.clone(), s.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        c.fetch_add(1, Ordering::SeqCst);
                        let headers: HashMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        let auth = headers.get("authorization").cloned().unwrap_or_default();
                        s.lock().unwrap().push(headers);
                        let resp = match auth.as_str() {
                            "Bearer good" => http::Response::builder()
                                .status(200)
                                .header("x-user", "alice")
                                .header("x-other", "no"),
                            "Bearer crash" => http::Response::builder().status(500),
                            _ => http::Response::builder()
                                .status(401)
                                .header("www-authenticate", "Bearer realm=\"thr\""),
                        };
                        async move {
                            Ok::<_, Infallible>(
                                resp.body(Full::new(Bytes::from_static(b"auth says\n")))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/check"), calls, seen)
}

#[tokio::test]
async fn auth_lets_in_refuses_and_fails_closed() {
    let (auth_url, calls, seen) = auth_service().await;
    let dead = format!("http://127.0.0.1:{}/check", testkit::redis::free_port());
    let rules = format!(
        r#"
[[rules]]
when = {{ path = {{ prefix = "/private" }} }}
then = {{ auth = {{ url = "{auth_url}", forward_headers = ["Authorization", "Cookie"], copy_headers = ["X-User"], cache = "30s", timeout = "2s" }} }}

[[rules]]
when = {{ path = {{ prefix = "/broken" }} }}
then = {{ auth = {{ url = "{dead}", forward_headers = ["Authorization"], timeout = "500ms" }} }}
"#
    );
    let stack = Stack::start(SlowBackend::builder().start().await, 1, &rules).await;
    let client = client();
    let good = Req::new("GET", "/private/a")
        .header("authorization", "Bearer good")
        .header("x-user", "mallory");
    let seen_good = send(&client, &stack.url(), &good).await;
    assert_eq!(seen_good.status, 200);
    let got = &stack.backend.requests()[0];
    assert_eq!(
        got.header("x-user").as_deref(),
        Some("alice"),
        "copied from the auth answer, not the client's"
    );
    assert!(
        got.header("x-other").is_none(),
        "only the named fields are copied"
    );
    let asked = seen.lock().unwrap()[0].clone();
    assert_eq!(
        asked.get("x-original-uri").map(String::as_str),
        Some("/private/a")
    );
    assert_eq!(
        asked.get("x-original-method").map(String::as_str),
        Some("GET")
    );

    // Same credentials again: answered from the cache.
    assert_eq!(send(&client, &stack.url(), &good).await.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let bad = send(
        &client,
        &stack.url(),
        &Req::new("GET", "/private/a").header("authorization", "Bearer bad"),
    )
    .await;
    assert_eq!(bad.status, 401);
    assert_eq!(
        bad.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"thr\"")
    );
    assert_eq!(&bad.body[..], b"auth says\n");

    let crash = send(
        &client,
        &stack.url(),
        &Req::new("GET", "/private/a").header("authorization", "Bearer crash"),
    )
    .await;
    assert_eq!(crash.status, 503);
    let unreachable = send(
        &client,
        &stack.url(),
        &Req::new("GET", "/broken").header("authorization", "Bearer good"),
    )
    .await;
    assert_eq!(unreachable.status, 503);
    assert_eq!(
        stack.backend.count(),
        2,
        "refused and failed requests never reach the backend"
    );
    stack.thr.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_behaviour_mid_run_without_failing_a_request() {
    let backend = SlowBackend::builder()
        .delay(Duration::from_millis(5))
        .start()
        .await;
    let stack = Stack::start(backend, 1, "").await;
    let url = stack.url();
    let stop_at = Instant::now() + Duration::from_millis(2500);
    let loops: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = client();
                let mut statuses = Vec::new();
                while Instant::now() < stop_at {
                    let seen = send(&client, &url, &Req::new("GET", format!("/load/{i}"))).await;
                    statuses.push((Instant::now(), seen.status, seen.header("x-config")));
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    // New rules, a second queue, a new max_inflight: all at once.
    let text = config_text(&stack.redis.url(), &stack.backend.url(), "")
        .replace("max_inflight = 64", "max_inflight = 2")
        + &format!(
            "[[queues]]\nname = \"other\"\nbackend = \"{}\"\n[[rules]]\nthen = {{ queue = \"other\", set_response_headers = {{ X-Config = \"two\" }} }}\n",
            stack.backend.url()
        );
    let reloaded_at = Instant::now();
    stack.thr.reload(parse_config(&text));
    let mut before = 0;
    let mut after_new = 0;
    for l in loops {
        for (at, status, marker) in l.await.unwrap() {
            assert_eq!(status, 200, "a request failed around the reload");
            if at < reloaded_at {
                before += 1;
                assert!(marker.is_none());
            } else if at > reloaded_at + Duration::from_millis(300) {
                assert_eq!(marker.as_deref(), Some("two"), "the new rules apply");
                after_new += 1;
            }
        }
    }
    assert!(
        before > 10 && after_new > 10,
        "{before} before, {after_new} after"
    );
    stack.thr.stop().await;
}
