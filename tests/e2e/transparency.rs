//! Transparency: what goes through thr arrives as if sent directly, both
//! ways (ARCHITECTURE.md "Transparency").

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use testkit::backend::{Recorded, pattern};
use thr_core::headers::is_hop_by_hop;

use crate::support::*;

/// The request table replayed directly and through thr.
fn table() -> Vec<Req> {
    let long_path = format!("/long/{}", "segment/".repeat(250));
    vec![
        Req::new("GET", "/"),
        Req::new("GET", "/a/b/c"),
        Req::new("GET", "/a%2Fb%2fc"),
        Req::new("GET", "/search?q=a+b&lang=fr"),
        Req::new("GET", "/q?x=1&x=2&x=3"),
        Req::new("GET", "/q?empty=&also&="),
        Req::new("GET", "/q?&&a=1&&"),
        Req::new("GET", "/q?utf=%C3%A9t%C3%A9&slash=%2F%3F%26%3D"),
        Req::new("GET", "/matrix;a=1;b=2/x?y"),
        Req::new("GET", "/trailing/"),
        Req::new("GET", long_path),
        Req::new("GET", "/status?status=201"),
        Req::new("GET", "/status?status=204"),
        Req::new("GET", "/status?status=304"),
        Req::new("GET", "/status?status=404"),
        Req::new("GET", "/status?status=500"),
        Req::new("GET", "/status?status=503"),
        Req::new("GET", "/status?status=418"),
        Req::new("GET", "/redirect?status=302"),
        Req::new("GET", "/cookies?cookies=2"),
        Req::new("GET", "/cookies?cookies=5&status=201"),
        Req::new("GET", "/binary?bytes=1048576"),
        Req::new("GET", "/chunked?bytes=100000&chunked=7"),
        Req::new("GET", "/chunked-small?bytes=10&chunked=3"),
        Req::new("HEAD", "/head"),
        Req::new("HEAD", "/head?bytes=500"),
        Req::new("OPTIONS", "/options"),
        Req::new("DELETE", "/items/7"),
        Req::new("POST", "/form")
            .header("content-type", "application/x-www-form-urlencoded")
            .body("a=1&b=%20two&c="),
        Req::new("POST", "/upload")
            .header("content-type", "application/octet-stream")
            .body(pattern(1 << 20)),
        Req::new("PUT", "/put").body(pattern(65_536)),
        Req::new("PATCH", "/patch?status=202")
            .header("content-type", "application/json")
            .body(r#"{"a":[1,2]}"#),
        Req::new("POST", "/empty"),
        Req::new("PURGE", "/cache/key"),
        Req::new("PROPFIND", "/dav/").body("<propfind/>"),
        Req::new("GET", "/headers")
            .header("x-multi", "one")
            .header("x-multi", "two")
            .header("x-multi", "three")
            .header("accept-language", "fr-CH, fr;q=0.9, en;q=0.8")
            .header("cookie", "a=1; b=2")
            .header("authorization", "Bearer abc.def")
            .header("x-latin1", vec![b'c', b'a', b'f', 0xe9])
            .header("x-empty", ""),
        Req::new("GET", "/hop")
            .header("connection", "keep-alive, x-hop-secret")
            .header("x-hop-secret", "must not pass")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-kept", "kept"),
        Req::new("POST", "/echo?status=500").body(vec![0u8, 1, 2, 255, 254, 0, 0]),
    ]
}

/// Header fields a proxy may legitimately add or drop on the request side.
fn comparable(r: &Recorded, req: &Req) -> Vec<(String, Vec<u8>)> {
    let named_by_connection: Vec<String> = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    r.headers
        .iter()
        .filter(|(n, _)| {
            !is_hop_by_hop(n)
                && !n.starts_with("x-forwarded-")
                && n != "x-request-id"
                && n != "x-request-start"
                && !named_by_connection.contains(n)
        })
        .cloned()
        .collect()
}

#[tokio::test]
async fn round_trip_table_is_byte_identical() {
    let stack = Stack::start(SlowBackend::builder().start().await, 1, "").await;
    let client = client();
    let direct = stack.backend.url();
    let table = table();
    assert!(table.len() >= 30);
    for req in &table {
        stack.backend.clear();
        let straight = send(&client, &direct, req).await;
        let got_direct = stack.backend.requests();
        stack.backend.clear();
        let through = send(&client, &stack.url(), req).await;
        let got_through = stack.backend.requests();
        let what = format!("{} {}", req.method, &req.target[..req.target.len().min(60)]);

        assert_eq!(through.status, straight.status, "{what}: status");
        assert_eq!(
            through.headers, straight.headers,
            "{what}: response headers"
        );
        assert_eq!(through.body, straight.body, "{what}: response body");

        assert_eq!(got_direct.len(), 1, "{what}");
        assert_eq!(got_through.len(), 1, "{what}: backend hit once through thr");
        let (d, t) = (&got_direct[0], &got_through[0]);
        assert_eq!(t.method, d.method, "{what}: method");
        assert_eq!(t.target, d.target, "{what}: target byte for byte");
        assert_eq!(t.body, d.body, "{what}: request body");
        assert_eq!(
            comparable(t, req),
            comparable(d, req),
            "{what}: request headers"
        );
        assert_eq!(
            t.header("x-forwarded-for").as_deref(),
            Some("127.0.0.1"),
            "{what}"
        );
        assert_eq!(
            t.header("x-forwarded-host").as_deref(),
            Some("app.example"),
            "{what}"
        );
        assert_eq!(
            t.header("x-forwarded-proto").as_deref(),
            Some("http"),
            "{what}"
        );
        assert!(
            t.header("x-request-id").is_some_and(|v| !v.is_empty()),
            "{what}"
        );
        assert!(
            t.header("x-request-start").is_some_and(|v| v
                .strip_prefix("t=")
                .is_some_and(|us| us.parse::<u64>().is_ok())),
            "{what}: X-Request-Start t=<µs>"
        );
        assert!(
            t.header("x-hop-secret").is_none() && t.header("te").is_none(),
            "{what}: hop-by-hop dropped"
        );
    }
    stack.thr.stop().await;
}

#[tokio::test]
async fn repeated_response_headers_keep_their_order_and_count() {
    let stack = Stack::start(SlowBackend::builder().start().await, 1, "").await;
    let seen = get(&stack.url(), "/c?cookies=3").await;
    let cookies: Vec<&[u8]> = seen
        .headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(
        cookies,
        [&b"c0=v0; Path=/"[..], b"c1=v1; Path=/", b"c2=v2; Path=/"]
    );
    stack.thr.stop().await;
}

/// The status line an HTTP/1.1 GET of `target` on `addr` is answered with.
async fn status_line(addr: std::net::SocketAddr, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(
        format!("GET {target} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_string()
}

/// A backend's own reason phrase (Flask's "418 I'M A TEAPOT", Django's
/// "418 I'm a Teapot", or a custom one) reaches HTTP/1 clients as sent:
/// whole, chunked, streamed or bypassed; an ordinary one stays ordinary,
/// and an answer thr makes itself has the usual phrase.
#[tokio::test]
async fn a_backends_reason_phrase_reaches_the_client() {
    let stack = Stack::start(
        SlowBackend::builder().start().await,
        1,
        "max_response = \"1MiB\"\n[[rules]]\nwhen = { path = { prefix = \"/direct/\" } }\nthen = { bypass = true }\n",
    )
    .await;
    for target in [
        "/r?status=418&reason=1",
        "/r?status=200&reason=1&chunked=3&bytes=10",
        "/r?status=200&reason=1&stream=300000",
        "/direct/r?status=418&reason=1",
        "/r?status=404",
    ] {
        let direct = status_line(stack.backend.addr(), target).await;
        let through = status_line(stack.thr.addr(), target).await;
        assert_eq!(through, direct, "{target}");
        if target.contains("reason=1") {
            assert!(direct.ends_with(" Custom Reason"), "{target}: {direct}");
        }
    }
    // Past max_response, the worker answers 502 itself: the usual phrase.
    let refused = status_line(stack.thr.addr(), "/r?reason=1&stream=2097152&length=1").await;
    assert_eq!(refused, "HTTP/1.1 502 Bad Gateway");
    stack.thr.stop().await;
}

#[tokio::test]
async fn request_id_is_propagated_or_created() {
    let stack = Stack::start(SlowBackend::builder().start().await, 1, "").await;
    let client = client();
    send(
        &client,
        &stack.url(),
        &Req::new("GET", "/a").header("x-request-id", "trace-42"),
    )
    .await;
    send(&client, &stack.url(), &Req::new("GET", "/b")).await;
    let got = stack.backend.requests();
    assert_eq!(got[0].header("x-request-id").as_deref(), Some("trace-42"));
    let created = got[1].header("x-request-id").expect("created");
    assert_eq!(created.len(), 32, "a fresh id: {created}");
    stack.thr.stop().await;
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let stack = Stack::start(SlowBackend::builder().start().await, 1, "").await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{}/h2?cookies=2", stack.url()))
        .body(Full::new(Bytes::from_static(b"over h2")))
        .unwrap();
    let response = client.request(req).await.expect("h2c request");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get_all("set-cookie").iter().count(), 2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"over h2");
    let got = stack.backend.requests();
    // HTTP/2 carries the host in :authority; the backend still gets a Host.
    assert_eq!(got[0].header("host"), Some(stack.thr.addr().to_string()));
    assert_eq!(got[0].target, "/h2?cookies=2");
    stack.thr.stop().await;
}

/// Browsers send each cookie as an h2 field of its own; an HTTP/1.1 backend
/// must get them as one field joined by "; " (RFC 9113 §8.2.3). Sent as two
/// lines, gunicorn hands Django `a=1,b=2` and a logged-in session is lost
/// (seen with Chromium over TLS in front of Django's admin).
#[tokio::test]
async fn h2_cookie_fields_reach_the_backend_as_one() {
    let stack = Stack::start(
        SlowBackend::builder().start().await,
        1,
        "[[rules]]\nwhen = { header = { Cookie = \"csrftoken=abc; sessionid=xyz; theme=dark\" } }\n\
         then = { set_headers = { X-Rule-Saw = \"joined\" } }\n\
         [[rules]]\nwhen = { path = { prefix = \"/direct/\" } }\nthen = { bypass = true }\n",
    )
    .await;
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for target in ["/queued", "/direct/x"] {
        let req = http::Request::builder()
            .uri(format!("{}{target}", stack.url()))
            .header("cookie", "csrftoken=abc")
            .header("x-between", "1")
            .header("cookie", "sessionid=xyz")
            .header("cookie", "theme=dark")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = h2.request(req).await.expect("h2c request");
        assert_eq!(response.status(), 200, "{target}");
    }
    let got = stack.backend.requests();
    assert_eq!(got.len(), 2);
    for seen in got {
        let cookies: Vec<_> = seen
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert_eq!(
            cookies,
            ["csrftoken=abc; sessionid=xyz; theme=dark"],
            "{}",
            seen.target
        );
        // The rules see the joined field too.
        assert_eq!(seen.header("x-rule-saw").as_deref(), Some("joined"));
    }
    // An HTTP/1.1 client's fields go as they came.
    let h1 = send(
        &client(),
        &stack.url(),
        &Req::new("GET", "/h1")
            .header("cookie", "a=1")
            .header("cookie", "b=2"),
    )
    .await;
    assert_eq!(h1.status, 200);
    let seen = &stack.backend.requests()[2];
    let cookies: Vec<_> = seen
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("cookie"))
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(cookies, [b"a=1".as_slice(), b"b=2"]);
    stack.thr.stop().await;
}

#[tokio::test]
async fn unix_sockets_for_listener_backend_and_redis() {
    testkit::init_logs();
    let tmp = temp_dir("thr-unix-");
    let dir = tmp.path();
    let backend = SlowBackend::builder()
        .unix(dir.join("app.sock"))
        .start()
        .await;
    let redis = RedisServer::start();
    let text = format!(
        "[redis]\nurl = \"{}\"\n[http2redis]\nlisten = \"unix:{}\"\n[[queues]]\nname = \"legacy\"\nbackend = \"{}\"\n",
        redis.unix_url(),
        dir.join("thr.sock").display(),
        backend.url()
    );
    let thr = Thr::start(parse_config(&text), 1).await;

    let stream = tokio::net::UnixStream::connect(dir.join("thr.sock"))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/over/unix?x=1")
        .header("host", "legacy.local")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    assert_eq!(backend.requests()[0].target, "/over/unix?x=1");
    thr.stop().await;
    assert!(
        !dir.join("thr.sock").exists(),
        "socket file removed on shutdown"
    );
}
