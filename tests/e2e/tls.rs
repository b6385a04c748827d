//! TLS on the front's listener (`[http2redis.tls]`): HTTPS with HTTP/1.1
//! and h2 chosen by ALPN, `X-Forwarded-Proto: https` for the backend, the
//! certificate read again on SIGHUP, and a reload with broken files keeping
//! the certificate in use.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use testkit::bins::Process;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::*;

/// A fresh self-signed certificate for `localhost`: PEM chain, PEM key, DER.
fn self_signed() -> (String, String, CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        made.cert.pem(),
        made.signing_key.serialize_pem(),
        made.cert.der().clone(),
    )
}

/// A TLS connection to the front that trusts `trusted` alone and offers
/// `alpn`.
async fn connect(
    port: u16,
    trusted: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// GET `target` over `tls` with the protocol ALPN chose; status and body.
async fn get_over(tls: TlsStream<TcpStream>, target: &str) -> (u16, Bytes) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let request = |uri: String| {
        http::Request::get(uri)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
            .send_request(request(format!("https://localhost{target}")))
            .await
            .unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender
            .send_request(request(target.to_string()))
            .await
            .unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

struct TlsStack {
    _redis: RedisServer,
    backend: SlowBackend,
    front: Process,
    _worker: Process,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsStack {
    async fn start(cert: &str, key: &str) -> TlsStack {
        let redis = RedisServer::start();
        let backend = SlowBackend::builder().record(true).start().await;
        let dir = temp_dir("thr-tls-");
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let (text, port) = on_free_port(&config_text(&redis.url(), &backend.url(), ""));
        let text = text.replace(
            "[http2redis]\n",
            &format!(
                "[http2redis]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
                dir.path().join("cert.pem").display(),
                dir.path().join("key.pem").display()
            ),
        );
        let path = dir.path().join("thr.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        let front = Process::spawn("http2redis", &["--config", &path]);
        let worker = Process::spawn("redis2http", &["--config", &path]);
        until_listening(port).await;
        TlsStack {
            _redis: redis,
            backend,
            front,
            _worker: worker,
            port,
            dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http1_and_h2_by_alpn_and_tells_the_backend() {
    let (cert, key, der) = self_signed();
    let stack = TlsStack::start(&cert, &key).await;
    let h1: &[u8] = b"http/1.1";
    let h2: &[u8] = b"h2";
    for (offered, chosen) in [
        (vec![h1], Some(h1)),
        (vec![h2, h1], Some(h2)),
        (vec![], None),
    ] {
        let alpn = offered.clone();
        let tls = connect(stack.port, &der, &offered)
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), chosen, "ALPN {alpn:?}");
        let (status, _) = get_over(tls, "/over-tls?bytes=100").await;
        assert_eq!(status, 200, "ALPN {alpn:?}");
    }
    let seen = stack.backend.requests();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert_eq!(r.header("x-forwarded-proto").as_deref(), Some("https"));
    }
    // A plain-HTTP client on the TLS port gets no answer it could take for
    // one, and the port keeps serving TLS.
    let plain = get_plain(stack.port).await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
    let tls = connect(stack.port, &der, &[]).await.expect("still serving");
    assert_eq!(get_over(tls, "/after").await.0, 200);
}

/// What a plain-HTTP request on the port gets back (as text).
async fn get_plain(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_sighup_and_broken_files_are_not() {
    let (cert, key, old) = self_signed();
    let stack = TlsStack::start(&cert, &key).await;
    let served =
        |tls: &TlsStream<TcpStream>| tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let tls = connect(stack.port, &old, &[]).await.unwrap();
    assert_eq!(served(&tls), old);

    // Broken files: refused, the certificate in use stays. The same reload
    // adds a rule, so that the test knows the reload has happened.
    std::fs::write(stack.dir.path().join("cert.pem"), "not a certificate\n").unwrap();
    let config = stack.dir.path().join("thr.toml");
    let text = std::fs::read_to_string(&config).unwrap()
        + "[[rules]]\nwhen = { path = \"/probe\" }\nthen = { status = 200, body = \"reloaded\" }\nstop = true\n";
    std::fs::write(&config, text).unwrap();
    stack.front.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tls = connect(stack.port, &old, &[])
            .await
            .expect("old certificate kept");
        if get_over(tls, "/probe").await.1 == "reloaded" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never happened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tls = connect(stack.port, &old, &[])
        .await
        .expect("old certificate kept");
    assert_eq!(served(&tls), old);
    assert_eq!(get_over(tls, "/kept").await.0, 200);

    // A renewed pair: new connections get it, without a restart.
    let (cert, key, new) = self_signed();
    std::fs::write(stack.dir.path().join("key.pem"), key).unwrap();
    std::fs::write(stack.dir.path().join("cert.pem"), cert).unwrap();
    stack.front.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(tls) = connect(stack.port, &new, &[]).await {
            assert_eq!(served(&tls), new);
            assert_eq!(get_over(tls, "/renewed").await.0, 200);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
