//! Upgrade requests end to end: WebSocket tunnels through the front to the
//! queue's backend (echo both ways, base path and proxy headers, open past
//! `reply_timeout`, TCP and unix backends, metrics), the per-queue cap of
//! open tunnels, refusals by a rule, by `max_tunnels = 0` and by the backend
//! (relayed as they are), an unreachable backend, a shutdown with a tunnel
//! open, and the upgrades thr does not tunnel (h2c offers; a 101 to a client
//! that did not ask for one).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use testkit::ws::EchoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::*;

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `target` through the front at `front`.
async fn ws_connect(front: SocketAddr, target: &str) -> Result<Ws, tungstenite::Error> {
    let mut request = format!("ws://{front}{target}").into_client_request()?;
    request
        .headers_mut()
        .insert("x-request-id", "ws-test-1".parse().unwrap());
    let stream = TcpStream::connect(front).await?;
    let connecting = tokio_tungstenite::client_async(request, stream);
    let (ws, response) = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("handshake answered within 10 s")?;
    assert_eq!(response.status(), 101);
    Ok(ws)
}

/// The status of a refused handshake.
fn refused(result: Result<Ws, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a tunnel"),
    }
}

/// A WebSocket handshake as a plain HTTP request, to see a refusal whole.
fn handshake(target: &str) -> Req {
    Req::new("GET", target)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}

/// Sends `message` and expects it back.
async fn round_trip(ws: &mut Ws, message: Message) {
    ws.send(message.clone()).await.expect("message sent");
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo within 10 s")
        .expect("tunnel still open")
        .expect("a message");
    assert_eq!(echoed, message);
}

/// Closes cleanly: our close frame, the backend's answer, then the end.
async fn close(mut ws: Ws) {
    ws.close(None).await.expect("close frame sent");
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("closed within 10 s");
        match next {
            Some(Ok(Message::Close(_))) => continue,
            None => return,
            Some(Ok(other)) => panic!("unexpected message after close: {other:?}"),
            Some(Err(err)) => panic!("not a clean close: {err}"),
        }
    }
}

/// Echoes text and binary, past `reply_timeout`, then closes cleanly.
async fn converse(front: SocketAddr, target: &str) {
    let mut ws = ws_connect(front, target).await.expect("tunnel opened");
    round_trip(&mut ws, Message::text("hello through thr")).await;
    round_trip(&mut ws, Message::binary(testkit::backend::pattern(70_000))).await;
    // Tunnels are not bound by reply_timeout (500 ms in these tests).
    tokio::time::sleep(Duration::from_millis(800)).await;
    round_trip(&mut ws, Message::text("still here")).await;
    close(ws).await;
}

/// Redis and an in-process front (and `workers` workers) in front of
/// `backend`, with `queue` appended to the default queue's table and the
/// configuration passed through `edit`.
async fn thr(backend: &str, workers: usize, queue: &str) -> (RedisServer, Thr) {
    testkit::init_logs();
    let redis = RedisServer::start();
    let text = config_text(&redis.url(), backend, queue)
        .replace("reply_timeout = \"10s\"", "reply_timeout = \"500ms\"");
    let thr = Thr::start(parse_config(&text), workers).await;
    (redis, thr)
}

/// The shipped binary tunnels a WebSocket: messages echoed both ways under
/// the backend's base path, with the proxy headers, and the metrics count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_tunnelled_by_the_front_binary() {
    let echo = EchoBackend::start().await;
    let unused = SlowBackend::builder().start().await;
    let admin = testkit::redis::free_port();
    let (slow, base) = (unused.url(), format!("{}/base", echo.url()));
    let stack = Binaries::start_with(RedisServer::start(), unused, 0, |text| {
        text.replace(&slow, &base)
            .replace("reply_timeout = \"10s\"", "reply_timeout = \"500ms\"")
            .replace(
                "[redis2http]",
                &format!("admin = \"127.0.0.1:{admin}\"\n[redis2http]"),
            )
    })
    .await;

    converse(stack.addr(), "/chat?room=1").await;

    let seen = echo.handshakes();
    assert_eq!(seen.len(), 1);
    let handshake = &seen[0];
    assert_eq!(handshake.target, "/base/chat?room=1");
    assert_eq!(handshake.header("upgrade").as_deref(), Some("websocket"));
    assert_eq!(handshake.header("connection").as_deref(), Some("upgrade"));
    assert_eq!(
        handshake.header("x-request-id").as_deref(),
        Some("ws-test-1")
    );
    assert_eq!(
        handshake.header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert!(handshake.header("sec-websocket-key").is_some());
    until(Duration::from_secs(5), "the backend's side closed", || {
        echo.open() == 0
    })
    .await;

    let metrics = get(&format!("http://127.0.0.1:{admin}"), "/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "thr_tunnels_total{queue=\"default\",status=\"101\"} 1",
        "thr_tunnels_open{queue=\"default\"} 0",
        "thr_requests_total{queue=\"default\",status=\"101\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    stack.stop();
}

#[tokio::test]
async fn a_websocket_reaches_a_unix_socket_backend() {
    let dir = temp_dir("thr-ws-");
    let echo = EchoBackend::start_unix(dir.path().join("echo.sock")).await;
    let (_redis, thr) = thr(&echo.url(), 0, "").await;
    converse(thr.addr(), "/unix").await;
    assert_eq!(echo.handshakes()[0].target, "/unix");
    thr.stop().await;
}

#[tokio::test]
async fn the_tunnel_cap_refuses_beyond_it_until_a_tunnel_closes() {
    let echo = EchoBackend::start().await;
    let (_redis, thr) = thr(&echo.url(), 0, "max_tunnels = 1").await;
    let mut first = ws_connect(thr.addr(), "/first")
        .await
        .expect("first tunnel");
    round_trip(&mut first, Message::text("one")).await;

    assert_eq!(refused(ws_connect(thr.addr(), "/second").await), 503);
    let full = send(&client(), &thr.url(), &handshake("/second")).await;
    assert_eq!(full.status, 503);
    assert_eq!(
        String::from_utf8_lossy(&full.body),
        "the tunnel cap of queue default is reached, try again later\n"
    );
    assert!(full.header("retry-after").is_some());
    assert_eq!(
        echo.handshakes().len(),
        1,
        "refusals never reach the backend"
    );

    close(first).await;
    // The slot comes back once both ends of the first tunnel have closed.
    let started = Instant::now();
    let mut second = loop {
        match ws_connect(thr.addr(), "/second").await {
            Ok(ws) => break ws,
            Err(err) => assert_eq!(refused(Err(err)), 503),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "slot not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    round_trip(&mut second, Message::text("two")).await;
    close(second).await;
    thr.stop().await;
}

#[tokio::test]
async fn rules_and_max_tunnels_zero_refuse_upgrades() {
    let backend = SlowBackend::builder().start().await;
    let refuse = r#"max_tunnels = 0

[[rules]]
when = { path = "/no-ws", header = { Upgrade = { regex = "(?i)^websocket$" } } }
then = { status = 403, body = "no websockets here\n" }
stop = true
"#;
    let (_redis, thr) = thr(&backend.url(), 1, refuse).await;
    let client = client();

    assert_eq!(refused(ws_connect(thr.addr(), "/no-ws").await), 403);
    let mut shouting = handshake("/no-ws");
    shouting.headers.retain(|(name, _)| *name != "upgrade");
    let by_rule = send(
        &client,
        &thr.url(),
        &shouting.header("upgrade", "WebSocket"),
    )
    .await;
    assert_eq!(by_rule.status, 403);
    assert_eq!(&by_rule.body[..], b"no websockets here\n");

    let by_queue = send(&client, &thr.url(), &handshake("/elsewhere")).await;
    assert_eq!(by_queue.status, 403);
    assert_eq!(
        String::from_utf8_lossy(&by_queue.body),
        "queue default does not allow upgrades\n"
    );
    assert!(
        by_queue.header("retry-after").is_none(),
        "not worth retrying"
    );

    // Without an upgrade the rule does not match, and the queue serves it.
    let plain = send(&client, &thr.url(), &Req::new("GET", "/no-ws")).await;
    assert_eq!(plain.status, 200);
    let got = backend.requests();
    assert_eq!(got.len(), 1, "only the plain request reached the backend");
    assert_eq!(got[0].target, "/no-ws");
    thr.stop().await;
}

#[tokio::test]
async fn a_backend_refusing_the_upgrade_is_relayed_as_it_is() {
    let echo = EchoBackend::start().await;
    let (_redis, thr) = thr(&echo.url(), 0, "max_tunnels = 1").await;
    for status in [426, 400] {
        let target = format!("/chat?status={status}");
        let seen = send(&client(), &thr.url(), &handshake(&target)).await;
        assert_eq!(seen.status, status);
        assert_eq!(
            String::from_utf8_lossy(&seen.body),
            format!("refused with {status}\n")
        );
        assert_eq!(seen.header("x-refused").as_deref(), Some("yes"));
        assert!(seen.header("upgrade").is_none());
        assert_eq!(refused(ws_connect(thr.addr(), &target).await), status);
    }
    // Each refusal gave its slot back at once: the only slot is free.
    let ws = ws_connect(thr.addr(), "/chat").await.expect("tunnel");
    close(ws).await;
    assert_eq!(echo.handshakes().len(), 5);
    thr.stop().await;
}

#[tokio::test]
async fn an_unreachable_backend_is_a_502() {
    let closed = format!("http://127.0.0.1:{}", testkit::redis::free_port());
    let (_redis, thr) = thr(&closed, 0, "").await;
    let seen = send(&client(), &thr.url(), &handshake("/chat")).await;
    assert_eq!(seen.status, 502);
    assert_eq!(&seen.body[..], b"backend unavailable\n");
    thr.stop().await;
}

#[tokio::test]
async fn a_stopping_front_closes_its_tunnels_after_the_grace() {
    let echo = EchoBackend::start().await;
    testkit::init_logs();
    let redis = RedisServer::start();
    let text = config_text(&redis.url(), &echo.url(), "")
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"300ms\"");
    let thr = Thr::start(parse_config(&text), 0).await;
    let mut ws = ws_connect(thr.addr(), "/chat").await.expect("tunnel");
    round_trip(&mut ws, Message::text("before the stop")).await;

    let started = Instant::now();
    thr.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the front waited {:?} for its tunnel, past its 300 ms grace",
        started.elapsed()
    );
    let after = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the client sees its tunnel end");
    assert!(
        !matches!(after, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{after:?}"
    );
    until(Duration::from_secs(5), "the backend's side closed", || {
        echo.open() == 0
    })
    .await;
}

/// `Upgrade: h2c` (curl --http2) is an offer the front declines: the
/// request is queued like any other, the offer dropped.
#[tokio::test]
async fn an_h2c_offer_is_queued_not_tunnelled() {
    let backend = SlowBackend::builder().start().await;
    let (_redis, thr) = thr(&backend.url(), 1, "").await;
    let offer = Req::new("GET", "/h2c")
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA");
    let seen = send(&client(), &thr.url(), &offer).await;
    assert_eq!(seen.status, 200);
    let got = &backend.requests()[0];
    assert!(got.header("upgrade").is_none());
    assert!(got.header("http2-settings").is_none());
    thr.stop().await;
}

/// A backend answering 101 to a request that asked for no upgrade (through
/// the queue) does not switch the client's connection: it is a bad reply.
#[tokio::test]
async fn a_101_goes_only_to_a_client_that_asked_to_upgrade() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut rogue = tokio::task::JoinSet::new();
    rogue.spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (_redis, thr) = thr(&format!("http://{addr}"), 1, "").await;
    let seen = send(&client(), &thr.url(), &Req::new("GET", "/plain")).await;
    assert_eq!(seen.status, 502);
    assert_eq!(
        &seen.body[..],
        b"backend switched protocols without being asked to\n"
    );
    thr.stop().await;
}
