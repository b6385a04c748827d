//! Helpers shared by the end-to-end tests: an HTTP client that reports
//! exactly what came back, and a one-call setup of Redis + backend + thr.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
pub use testkit::daemons::{config_text, parse_config};
pub use testkit::{RedisServer, SlowBackend, Thr};

/// What a client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// A request to replay against several servers.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: &'static str,
    pub target: String,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn new(method: &'static str, target: impl Into<String>) -> Req {
        Req {
            method,
            target: target.into(),
            headers: vec![("host", b"app.example".to_vec())],
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Req {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

/// Sends `req` to `base` (`http://host:port`) and reads the whole answer.
pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, base: &str, req: &Req) -> Seen {
    try_send(client, base, req).await.expect("request sent")
}

/// Like [`send`], but a connection error (a server not up yet) is `None`.
pub async fn try_send(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    req: &Req,
) -> Option<Seen> {
    let mut builder = Request::builder()
        .method(Method::from_bytes(req.method.as_bytes()).unwrap())
        .uri(format!("{base}{}", req.target));
    for (name, value) in &req.headers {
        builder = builder.header(*name, value.as_slice());
    }
    let request = builder
        .body(Full::new(Bytes::from(req.body.clone())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("answer within 30 s")
        .ok()?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Some(Seen {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body,
    })
}

/// GET `target` on `base`.
pub async fn get(base: &str, target: &str) -> Seen {
    send(&client(), base, &Req::new("GET", target)).await
}

/// Redis, a backend and thr with `workers` in-process workers.
pub struct Stack {
    pub redis: RedisServer,
    pub backend: SlowBackend,
    pub thr: Thr,
}

impl Stack {
    /// Everything with default settings and `extra` TOML appended.
    pub async fn start(backend: SlowBackend, workers: usize, extra: &str) -> Stack {
        Stack::start_with(backend, workers, |text| text + extra).await
    }

    /// Everything, with the configuration text passed through `edit`.
    pub async fn start_with(
        backend: SlowBackend,
        workers: usize,
        edit: impl FnOnce(String) -> String,
    ) -> Stack {
        testkit::init_logs();
        let redis = RedisServer::start();
        let text = edit(config_text(&redis.url(), &backend.url(), ""));
        let thr = Thr::start(parse_config(&text), workers).await;
        Stack {
            redis,
            backend,
            thr,
        }
    }

    pub fn url(&self) -> String {
        self.thr.url()
    }
}

/// Writes `text` to `thr.toml` in a private temporary directory; returns
/// the directory, removed when dropped (keep it as long as the file is
/// read), and the file's path as text.
pub fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = temp_dir("thr-cfg-");
    let path = dir.path().join("thr.toml");
    std::fs::write(&path, text).unwrap();
    let shown = path.display().to_string();
    (dir, shown)
}

/// A new private directory named `{prefix}…` under the system's temporary
/// directory, removed with its content when dropped: at the end of the test
/// that holds it, whether it passes or panics.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temporary directory")
}

/// `text` (a [`config_text`]) with the front on a free port, and the port.
pub fn on_free_port(text: &str) -> (String, u16) {
    let port = testkit::redis::free_port();
    let text = text.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    (text, port)
}

/// Waits (up to 15 s) until the front on `port` accepts connections.
pub async fn until_listening(port: u16) {
    until(Duration::from_secs(15), "the front listens", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
}

/// Polls `check` every 20 ms; fails the test with `what` after `limit`.
pub async fn until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The keys of the default deployment (tests run in the default namespace).
pub fn keyspace() -> thr_broker::protocol::keys::Keyspace {
    thr_broker::protocol::keys::Keyspace::new(thr_broker::protocol::keys::DEFAULT_NAMESPACE)
}

/// The keys of queue `queue`.
pub fn keys(queue: &str) -> thr_broker::protocol::keys::QueueKeys {
    keyspace().queue(queue)
}

/// Jobs running under concurrency quota `token`, across every worker.
pub fn quota_held(conn: &mut redis::Connection, token: &str) -> u64 {
    let held: Option<u64> = redis::cmd("HGET")
        .arg(&keyspace().held)
        .arg(token)
        .query(conn)
        .unwrap();
    held.unwrap_or(0)
}

/// Waits until `queue` has accepted `n` jobs since Redis started (its
/// sequence counter), so that tests can order submissions without sleeping.
pub async fn until_enqueued(redis: &RedisServer, queue: &str, n: u64) {
    let mut conn = redis.conn();
    let key = keys(queue).seq;
    until(
        Duration::from_secs(10),
        &format!("{n} jobs enqueued"),
        || {
            let seq: Option<u64> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
            seq.unwrap_or(0) >= n
        },
    )
    .await;
}

/// Waits until the backend is handling exactly `n` requests.
pub async fn until_running(backend: &SlowBackend, n: usize) {
    until(Duration::from_secs(10), &format!("{n} running"), || {
        backend.active() == n
    })
    .await;
}

/// Redis, a backend and thr as the real binaries (one front, `workers`
/// workers) reading a config file: for behaviour that must hold for the
/// shipped processes, not only for the libraries run in-process.
pub struct Binaries {
    pub redis: RedisServer,
    pub backend: SlowBackend,
    pub front: testkit::bins::Process,
    pub workers: Vec<testkit::bins::Process>,
    port: u16,
    config: String,
    /// The config file's directory: declared after the daemons, so dropped
    /// (and removed) after them.
    _dir: tempfile::TempDir,
}

impl Binaries {
    /// Everything with default settings and `extra` TOML appended.
    pub async fn start(backend: SlowBackend, workers: usize, extra: &str) -> Binaries {
        Binaries::start_with(RedisServer::start(), backend, workers, |text| text + extra).await
    }

    /// Everything on `redis`, the configuration text passed through `edit`
    /// (its `[redis] url` is `redis.url()`); returns once the front accepts
    /// connections.
    pub async fn start_with(
        redis: RedisServer,
        backend: SlowBackend,
        workers: usize,
        edit: impl FnOnce(String) -> String,
    ) -> Binaries {
        use testkit::bins::Process;
        testkit::init_logs();
        let (text, port) = on_free_port(&edit(config_text(&redis.url(), &backend.url(), "")));
        let (dir, path) = config_file(&text);
        let front = Process::spawn("http2redis", &["--config", &path]);
        let workers = (0..workers)
            .map(|_| Process::spawn("redis2http", &["--config", &path]))
            .collect();
        until_listening(port).await;
        Binaries {
            redis,
            backend,
            front,
            workers,
            port,
            config: path,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// The daemons' configuration file, for one more of them.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// SIGTERM to every daemon; each must exit 0. Gives back Redis and the
    /// backend for a next stack.
    pub fn stop(mut self) -> (RedisServer, SlowBackend) {
        self.front.signal("TERM");
        for w in &self.workers {
            w.signal("TERM");
        }
        assert_eq!(self.front.wait(), Some(0), "http2redis exit code");
        for w in &mut self.workers {
            assert_eq!(w.wait(), Some(0), "redis2http exit code");
        }
        (self.redis, self.backend)
    }
}

/// Sends `req` to `base` on a task of its own (a client that waits while the
/// test goes on).
pub fn spawn_send(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    req: Req,
) -> tokio::task::JoinHandle<Seen> {
    let (client, base) = (client.clone(), base.to_string());
    tokio::spawn(async move { send(&client, &base, &req).await })
}

/// From now on, `redis` logs every command in SLOWLOG (for
/// [`script_calls`]).
pub fn log_every_command(redis: &RedisServer) {
    redis.config_set("slowlog-log-slower-than", "0");
    redis.config_set("slowlog-max-len", "100000");
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut redis.conn())
        .unwrap();
}

/// Calls of script `name` (`scripts/NAME.lua`) since [`log_every_command`]
/// (one refused for want of the script, then run, counts twice).
pub fn script_calls(redis: &RedisServer, name: &str) -> usize {
    let text =
        thr_broker::protocol::script_source(name).unwrap_or_else(|| panic!("no script {name}"));
    let sha = redis::Script::new(text).get_hash().to_string();
    logged_commands(redis, |words| {
        words[0] == "evalsha" && words.get(1) == Some(&sha)
    })
}

/// Commands logged since [`log_every_command`] whose words `matches`
/// accepts: the command's name, lower-cased, then its arguments as text
/// (SLOWLOG keeps at most 128 bytes of each).
pub fn logged_commands(redis: &RedisServer, matches: impl Fn(&[String]) -> bool) -> usize {
    let mut conn = redis.conn();
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    entries
        .iter()
        .filter(|entry| {
            let redis::Value::Array(fields) = entry else {
                return false;
            };
            let Some(redis::Value::Array(args)) = fields.get(3) else {
                return false;
            };
            let mut words: Vec<String> = args
                .iter()
                .map(|a| match a {
                    redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                })
                .collect();
            match words.first_mut() {
                Some(name) => *name = name.to_lowercase(),
                None => return false,
            }
            matches(&words)
        })
        .count()
}

/// Stalls every client of `redis` for `time` (CLIENT PAUSE … ALL), as a
/// slow fork, a long command or a frozen VM would.
pub fn stall(redis: &RedisServer, time: Duration) {
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(time.as_millis() as u64)
        .arg("ALL")
        .query(&mut redis.conn())
        .unwrap();
}

/// Waits for each client task and checks that it was answered 200 (the
/// body is shown when not).
pub async fn all_ok(tasks: impl IntoIterator<Item = tokio::task::JoinHandle<Seen>>) {
    for task in tasks {
        let seen = task.await.unwrap();
        assert_eq!(
            seen.status,
            200,
            "{:?}",
            String::from_utf8_lossy(&seen.body)
        );
    }
}
