//! The daemons started in-process on the test's runtime: a front on a free
//! port and any number of workers, each with its own shutdown switch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thr_core::config::{Config, ListenAddr};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A TOML configuration for one queue in front of `backend`, on `redis_url`.
/// `extra` is appended verbatim (more sections or queues).
pub fn config_text(redis_url: &str, backend: &str, extra: &str) -> String {
    format!(
        r#"
[redis]
url = "{redis_url}"

[http2redis]
listen = "127.0.0.1:0"
reply_timeout = "10s"
shutdown_grace = "5s"

[redis2http]
shutdown_grace = "5s"

[[queues]]
name = "default"
backend = "{backend}"
max_inflight = 64
{extra}
"#
    )
}

/// Parses a configuration written by a test, panicking with every error.
pub fn parse_config(text: &str) -> Config {
    Config::parse(text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// What a daemon task returns: its error, as text.
type RunResult = Result<(), String>;

/// A daemon task and the switch that stops it.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<RunResult>,
}

impl Running {
    /// Asks the daemon to stop and waits for it (at most 30 s).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("daemon failed: {e}"),
            Ok(Err(e)) => panic!("daemon panicked: {e}"),
            Err(_) => panic!("daemon did not stop within 30 s"),
        }
    }

    /// Stops it without waiting for a graceful drain (like a crash).
    pub fn abort(self) {
        self.task.abort();
    }
}

/// A front and its workers, running in-process.
pub struct Thr {
    /// The configuration they started with.
    pub config: Config,
    /// Publishes reloads to the front and the workers.
    updates: watch::Sender<Arc<Config>>,
    /// Where the front listens.
    pub addr: ListenAddr,
    /// The front.
    pub front: Option<Running>,
    /// The workers.
    pub workers: Vec<Running>,
}

impl Thr {
    /// Starts one front and `workers` workers with `config` (its listen
    /// address is used as is; give port 0 for a free one).
    pub async fn start(config: Config, workers: usize) -> Thr {
        let mut thr = Thr {
            addr: config.front.listen.clone(),
            updates: watch::channel(Arc::new(config.clone())).0,
            config,
            front: None,
            workers: Vec::new(),
        };
        thr.start_front().await;
        for _ in 0..workers {
            thr.add_worker();
        }
        thr
    }

    /// Starts the front (again).
    pub async fn start_front(&mut self) {
        let listener = http2redis::Listener::bind(&self.config.front.listen)
            .await
            .expect("bind front");
        self.addr = listener.local_addr().expect("front address");
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.updates.subscribe();
        let task = tokio::spawn(async move {
            http2redis::run(config, listener, async {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| format!("{e:#}"))
        });
        self.front = Some(Running {
            stop: Some(stop),
            task,
        });
    }

    /// Starts one more worker.
    pub fn add_worker(&mut self) {
        let (stop, stopped) = oneshot::channel::<()>();
        let config = self.updates.subscribe();
        let task = tokio::spawn(async move {
            redis2http::run(config, async {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| format!("{e:#}"))
        });
        self.workers.push(Running {
            stop: Some(stop),
            task,
        });
    }

    /// Reloads every daemon with `config` (like SIGHUP after an edit).
    pub fn reload(&self, config: Config) {
        self.updates.send_replace(Arc::new(config));
    }

    /// The front's TCP address.
    pub fn addr(&self) -> SocketAddr {
        match &self.addr {
            ListenAddr::Tcp(addr) => *addr,
            ListenAddr::Unix(_) => panic!("front listens on a unix socket"),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Stops everything gracefully.
    pub async fn stop(mut self) {
        if let Some(front) = self.front.take() {
            front.stop().await;
        }
        for worker in self.workers.drain(..) {
            worker.stop().await;
        }
    }
}
