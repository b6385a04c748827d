//! Operators' configuration: one TOML file read by every thr process.
//!
//! Loading happens in two steps, so that an operator sees every mistake at
//! once: [`raw`] deserializes the file permissively (every value keeps its
//! position in the file, unknown keys are collected instead of aborting), then
//! [`compile`] turns it into a [`Config`] whose types cannot hold invalid
//! states (durations, socket addresses, non-zero limits). Every problem found
//! on the way becomes a [`ConfigError`] naming the file, line and key.

mod compile;
mod error;
mod limits;
mod locate;
mod raw;
mod rules;
mod units;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, ConfigErrors};
pub use units::{parse_duration, parse_size};

/// A validated configuration: what both daemons and the CLI run on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration was read from (for messages and reloads).
    pub origin: String,
    /// How to reach Redis.
    pub redis: RedisSettings,
    /// The front daemon's settings (`[http2redis]`).
    pub front: FrontSettings,
    /// The worker daemon's settings (`[redis2http]`).
    pub worker: WorkerSettings,
    /// The queues, in file order; the first one is the default queue.
    pub queues: Vec<QueueConfig>,
    /// The rules, in file order.
    pub rules: Vec<crate::rules::Rule>,
    /// The quotas, in file order.
    pub limits: Vec<crate::quota::Limit>,
    /// How waiting jobs are ordered.
    pub scheduling: Scheduling,
}

/// `[scheduling]`: the order in which waiting jobs start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scheduling {
    /// Aging: a job never waits behind a more urgent job that arrived more
    /// than this much later. None: strict priority order (THR's).
    pub max_wait_boost: Option<Duration>,
}

/// `[http2redis.edge_limit]`: a per-client rate enforced in the front's
/// memory, answering 429 before any Redis round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeLimit {
    /// What identifies a client.
    pub by: crate::quota::KeySource,
    /// Sustained rate.
    pub rate: crate::quota::Rate,
}

/// `[redis]`: the shared engine every process talks to.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://`, `rediss://`, `redis+unix://` or `unix://` URL.
    pub url: String,
    /// Upper bound for one non-blocking Redis command. A front answers 503
    /// when Redis does not answer within it, so it bounds how long a client
    /// waits to learn that Redis is down.
    pub command_timeout: Duration,
    /// Every key of this deployment lives under `thr:{NAMESPACE}:`, one
    /// Redis Cluster hash tag: deployments sharing a Redis (or a Cluster)
    /// are independent. Default `default`.
    pub namespace: String,
    /// For `rediss://`: a PEM file of the CA that signed Redis's
    /// certificate, instead of the system's roots.
    pub tls_ca_file: Option<PathBuf>,
}

/// `[http2redis]`: the front that accepts clients.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontSettings {
    /// Where clients connect.
    pub listen: ListenAddr,
    /// How long a client waits for its reply before getting a 504 (and its
    /// job being cancelled).
    pub reply_timeout: Duration,
    /// Largest request body accepted; larger ones get a 413. Bodies travel
    /// through Redis in chunks and wait there whole until the job runs, so
    /// this bounds Redis memory per upload, not the daemons'.
    pub max_body: usize,
    /// Largest request head (request line and headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Most header fields accepted in one request.
    pub max_headers: usize,
    /// A client must send its whole request head within this time; a new
    /// connection must bring its first request within it too (whatever the
    /// protocol: an unfinished h2 preface or SETTINGS exchange counts).
    pub header_read_timeout: Duration,
    /// A connection with no request open (an idle keep-alive or h2
    /// connection) is closed after this long.
    pub idle_timeout: Duration,
    /// Longest silence while a request body is being read; a body whose
    /// client says nothing for this long is cut (408).
    pub body_read_timeout: Duration,
    /// Slowest average pace of a request body, in bytes per second, after
    /// its first `body_read_timeout` (0: no minimum). A body sent slower is
    /// cut (408): it would hold a connection and a task for ever.
    pub min_body_rate: u64,
    /// Most client connections open at once; beyond it a new connection is
    /// answered 503 and closed. None: derived from the descriptor limit.
    pub max_connections: Option<u32>,
    /// Which proxy header fields thr adds to forwarded requests.
    pub add_headers: AddedHeaders,
    /// How long a stopping front keeps answering the requests it holds.
    pub shutdown_grace: Duration,
    /// Peers whose X-Real-IP / X-Forwarded-For are believed (for `real_ip`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Per-client rate limit at the edge, if any.
    pub edge_limit: Option<EdgeLimit>,
    /// Where to serve /metrics, /healthz and /readyz (none: not served).
    pub admin: Option<SocketAddr>,
    /// While Redis is unreachable, hold requests this long (retrying) before
    /// answering 503. Zero: answer 503 at once.
    pub redis_down_grace: Duration,
    /// A client that takes nothing of its response for this long is cut
    /// off and its stream's resources (in the front and in Redis) freed.
    pub client_write_timeout: Duration,
    /// Threads of the daemon's async runtime (0: one per CPU core).
    pub threads: usize,
    /// TLS on the listener (`[http2redis.tls]`), if any.
    pub tls: Option<TlsFiles>,
}

/// `[http2redis.tls]`: the front terminates TLS itself. The files are read
/// at start and again at every reload (SIGHUP), so a renewed certificate
/// is served without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The header fields thr adds to a request on its way to the backend
/// (`[http2redis] add_headers`); each can be turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedHeaders {
    /// `X-Forwarded-For`: the client's address appended to the list.
    pub forwarded_for: bool,
    /// `X-Forwarded-Proto`: `http`, unless a proxy before thr set it.
    pub forwarded_proto: bool,
    /// `X-Forwarded-Host`: the Host the client asked for.
    pub forwarded_host: bool,
    /// `X-Request-Id`: the request's id, when the client sent none.
    pub request_id: bool,
    /// `X-Request-Start: t=<µs since the epoch>`: when the front received
    /// the request, for APM agents to show the time spent queueing.
    pub request_start: bool,
}

impl AddedHeaders {
    /// Their names, as written in `add_headers`.
    pub const NAMES: [&'static str; 5] = [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "x-request-start",
    ];

    /// Every field on (the default).
    pub const ALL: AddedHeaders = AddedHeaders {
        forwarded_for: true,
        forwarded_proto: true,
        forwarded_host: true,
        request_id: true,
        request_start: true,
    };
}

/// `[redis2http]`: the workers that feed the backends.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    /// How long a stopping worker lets its running requests finish.
    pub shutdown_grace: Duration,
    /// Where to serve /metrics, /healthz and /readyz (none: not served).
    pub admin: Option<SocketAddr>,
    /// Threads of the daemon's async runtime (0: one per CPU core).
    pub threads: usize,
}

/// One `[[queues]]` entry: a backend and the pace it can take.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// Queue name: `[A-Za-z0-9_.-]`, at most 64 bytes (it is part of Redis keys).
    pub name: String,
    /// Where the worker sends this queue's requests. Fixed per queue: a
    /// request's Host header never chooses it.
    pub backend: Backend,
    /// Requests of this queue running at once, per worker process.
    pub max_inflight: NonZeroUsize,
    /// A backend call running longer than this is answered with a 504.
    pub backend_timeout: Duration,
    /// How long a claimed job may run before another worker may take it back.
    pub lease: Duration,
    /// Most jobs waiting in this queue; beyond it new requests get 503.
    pub max_waiting: Option<u32>,
    /// Most jobs of this queue running at once across every worker.
    pub max_inflight_total: Option<u32>,
    /// Methods safe to run again when the worker running them is lost.
    pub retry_methods: Vec<String>,
    /// Runs of one job before it is set aside in the dead letters.
    pub max_attempts: u32,
    /// How much of a response the worker reads ahead of a slow client (on
    /// top of the window held in Redis): a response that fits frees the
    /// backend at once, whatever the client's pace.
    pub response_buffer: usize,
    /// Largest response body passed on (none: no limit). A larger declared
    /// length is answered 502; a stream that grows past it is cut.
    pub max_response: Option<u64>,
    /// Upgrade tunnels (WebSocket and the like) open at once to this queue's
    /// backend, per front process. Tunnels bypass the queue, so this is
    /// what bounds them; 0 refuses upgrade requests on this queue.
    pub max_tunnels: u32,
    /// Most header fields accepted in one backend response; more is a 502.
    pub max_response_headers: usize,
    /// Largest backend response head (status line and fields), in bytes;
    /// a bigger one is a 502.
    pub max_response_header_size: usize,
}

/// Where a daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address such as `127.0.0.1:8080`.
    Tcp(SocketAddr),
    /// A unix socket, written `unix:/path/thr.sock`.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A queue's backend: a plain-HTTP origin, or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// How to connect.
    pub address: BackendAddress,
    /// Path prefix prepended to every request target (`""` when none).
    pub base_path: String,
    /// The backend as the operator wrote it, for logs.
    pub display: String,
}

/// How a worker connects to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddress {
    /// `http://host:port`: the authority to connect to.
    Http {
        /// `host:port` as written (port defaults to 80).
        authority: String,
    },
    /// `unix:/path/app.sock`.
    Unix(PathBuf),
}

/// The configuration of a checkout, relative to the working directory.
pub const LOCAL_CONFIG: &str = "config/thr.toml";
/// The installed configuration (the `contrib/systemd` units name it).
pub const SYSTEM_CONFIG: &str = "/etc/thr/thr.toml";

impl Config {
    /// Where the configuration is when no `--config` (or `THR_CONFIG`)
    /// names it: `config/thr.toml` under the working directory when there
    /// is one (a checkout), else the installed [`SYSTEM_CONFIG`]. None
    /// when neither exists.
    pub fn default_path() -> Option<PathBuf> {
        [Path::new(LOCAL_CONFIG), Path::new(SYSTEM_CONFIG)]
            .into_iter()
            .find(|p| p.is_file())
            .map(Path::to_path_buf)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigErrors::single(ConfigError::whole_file(
                &origin,
                format!("cannot read: {err}"),
            ))
        })?;
        Config::parse(&text, &origin)
    }

    /// Validates `text`; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let (raw, earlier) = raw::read(text, origin)?;
        // A value of the wrong type was left out to read the rest; what
        // compiling then says about its key (missing, say) is not news.
        let reported = earlier.clone();
        compile::compile(raw, earlier, text, origin).map_err(|ConfigErrors(all)| {
            ConfigErrors(
                all.into_iter()
                    .filter(|e| reported.contains(e) || !reported.iter().any(|r| r.key == e.key))
                    .collect(),
            )
        })
    }

    /// The queue called `name`.
    pub fn queue(&self, name: &str) -> Option<&QueueConfig> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The queue requests go to when no rule picks one: the first `[[queues]]`.
    pub fn default_queue(&self) -> &QueueConfig {
        // compile() refuses a configuration without queues.
        &self.queues[0]
    }
}

#[cfg(test)]
mod tests;
