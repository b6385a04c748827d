//! http2redis, thr's front.
//!
//! For each client request: read it (bounded), turn it into a job envelope,
//! put it on its queue in Redis, and wait for the reply that a worker pushes
//! to this front's reply list; the client sees an ordinary HTTP response.
//!
//! - [`server`] accepts connections (TCP or unix, HTTP/1.1 and h2c) within
//!   `max_connections`, and drains them on shutdown;
//! - [`conn`] bounds each connection in time, whatever state it is in, and
//!   each request body's pace;
//! - [`lenient`] lets unencoded `"`, `<`, `>` in HTTP/1 query strings
//!   through, as the common servers do;
//! - [`front`] is the request handler, as named phases: admit, read,
//!   rules, authorize, dispatch, respond;
//! - [`queueing`] puts a job on its queue and waits for its answer, never
//!   telling a client "try again" for a job that may run;
//! - [`audit`] answers waiting clients whose jobs Redis lost;
//! - [`replies`] is the one loop per process that pops replies from Redis
//!   and hands each to the request waiting for it (ARCHITECTURE.md decision 1);
//! - [`edge`] sheds abusive clients with 429 before any Redis round trip;
//! - [`auth`] asks an external service before queueing, when a rule says so;
//! - [`tunnel`] takes upgrade requests (WebSocket) straight to the backend,
//!   within each queue's `max_tunnels`;
//! - [`forwarded`] writes the proxy headers (X-Forwarded-*, X-Request-Id);
//! - [`body`] frames reply bodies as the backend framed them;
//! - [`explain`] shows operators what the rules do to a request;
//! - [`error`] decides, in one place, which status each failure gets.

pub mod audit;
pub mod auth;
pub mod body;
pub mod conn;
pub mod edge;
pub mod error;
pub mod explain;
pub mod forwarded;
pub mod front;
pub mod lenient;
pub mod pieces;
pub mod queueing;
pub mod replies;
pub mod server;
pub mod tls;
pub mod tunnel;
pub mod upload;

use std::future::Future;
use std::sync::Arc;

use thr_broker::RedisBroker;
use thr_core::config::Config;
use tokio::sync::watch;

pub use front::Front;
pub use server::Listener;

/// Runs a front on `listener` until `shutdown` resolves, then stops
/// accepting, answers what it holds (up to `shutdown_grace`) and returns.
/// Each new value of `config` is put in force for the requests that start
/// after it (see `thr_daemon::watch_config`).
pub async fn run(
    mut config: watch::Receiver<Arc<Config>>,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let initial = config.borrow_and_update().clone();
    let broker = RedisBroker::from_settings(&initial.redis)?;
    let tls = match &initial.front.tls {
        Some(files) => Some(Arc::new(tls::Tls::load(files)?)),
        None => None,
    };
    tracing::info!(
        listen = %initial.front.listen,
        redis = broker.display_url(),
        queues = initial.queues.len(),
        rules = initial.rules.len(),
        "http2redis starting"
    );
    let admin = match initial.front.admin {
        Some(addr) => {
            let probe = broker.clone();
            let ready: thr_daemon::admin::Readiness = Arc::new(move || {
                let probe = probe.clone();
                Box::pin(async move { thr_broker::Broker::ping(&probe).await.is_ok() })
            });
            Some(thr_daemon::admin::spawn(addr, ready).await?)
        }
        None => None,
    };
    let front = Front::new(initial, broker);
    let reloads = tokio::spawn({
        let front = front.clone();
        let tls = tls.clone();
        async move {
            while config.changed().await.is_ok() {
                let new = config.borrow_and_update().clone();
                if let (Some(tls), Some(files)) = (&tls, &new.front.tls) {
                    tls.reload(files);
                }
                front.reload(new);
            }
        }
    });
    let result = server::serve(front, listener, tls, shutdown).await;
    reloads.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    result
}
