//! The admin listener (`[http2redis] admin`, `[redis2http] admin`):
//! Prometheus metrics on `/metrics`, `/healthz` (the process is up) and
//! `/readyz` (Redis answers). Plain HTTP/1.1, meant for a private network.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Answers whether the daemon can do its work (Redis reachable).
pub type Readiness = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Buckets of the latency histograms, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's metrics recorder (installed once; later calls share it).
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist (several daemons in one test
            // process); the first one wins and every daemon renders it.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ready: Readiness) {
    let handle = metrics();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (handle, ready) = (handle.clone(), ready.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (handle, ready) = (handle.clone(), ready.clone());
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/metrics" => (StatusCode::OK, handle.render()),
                            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                            "/readyz" if ready().await => (StatusCode::OK, "ready\n".to_string()),
                            "/readyz" => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "redis unreachable\n".to_string(),
                            ),
                            _ => (
                                StatusCode::NOT_FOUND,
                                "try /metrics, /healthz or /readyz\n".to_string(),
                            ),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr` and serves the admin endpoints in the background.
pub async fn spawn(
    addr: SocketAddr,
    ready: Readiness,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // The recorder goes in before anything is served: a counter recorded
    // while none is installed is lost for good (the serve task may only
    // run after the first requests on a busy machine).
    metrics();
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin listener: /metrics /healthz /readyz");
    Ok(tokio::spawn(serve(listener, ready)))
}
