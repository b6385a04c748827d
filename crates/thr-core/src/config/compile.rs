//! Raw configuration → validated [`Config`], collecting every error.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::error::{ConfigError, ConfigErrors};
use super::locate::{Locator, Seg, render};
use super::raw::{RawConfig, RawTls, Str};
use super::units::{parse_duration, parse_size};
use super::{
    AddedHeaders, Backend, BackendAddress, Config, FrontSettings, ListenAddr, QueueConfig,
    RedisSettings, TlsFiles, WorkerSettings,
};

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// 100 MiB: ordinary uploads (photos, office files, short videos) pass;
/// a body waits whole in Redis until its job runs, so this is also the
/// Redis memory one upload may take.
const DEFAULT_MAX_BODY: u64 = 100 << 20;
/// 1 MiB read ahead per streamed response (besides Redis's window).
const DEFAULT_RESPONSE_BUFFER: u64 = 1 << 20;
const DEFAULT_MAX_HEADER_BYTES: u64 = 64 << 10;
const DEFAULT_MAX_HEADERS: i64 = 100;
const DEFAULT_MAX_INFLIGHT: usize = 16;
const DEFAULT_MAX_TUNNELS: u32 = 100;
/// One runtime thread per daemon: thr's daemons wait on Redis and sockets,
/// and on the small boxes they share with Redis and the backend a second
/// thread only adds cross-thread wake-ups (measured in ARCHITECTURE.md,
/// decision 19).
const DEFAULT_THREADS: usize = 1;

/// Collects errors while compiling, each tied to a key path and a position.
pub(super) struct Checker<'t> {
    origin: &'t str,
    locator: Locator<'t>,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    pub(super) fn error(
        &mut self,
        path: &[Seg],
        span: Option<std::ops::Range<usize>>,
        message: String,
    ) {
        let span = span.or_else(|| self.locator.span(path));
        let (line, column) = span
            .map(|s| self.locator.line_col(s.start))
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        self.errors.push(ConfigError {
            origin: self.origin.to_string(),
            line,
            column,
            key: render(path),
            message,
        });
    }

    /// 1-based line of a byte offset.
    pub(super) fn line_of(&self, offset: usize) -> Option<usize> {
        Some(self.locator.line_col(offset).0)
    }

    /// Parses an optional spanned value with `parse`, or returns `default`.
    pub(super) fn value<T, R>(
        &mut self,
        path: &[Seg],
        raw: &Option<Spanned<R>>,
        default: T,
        parse: impl FnOnce(&R) -> Result<T, String>,
    ) -> T {
        match raw {
            None => default,
            Some(v) => match parse(v.get_ref()) {
                Ok(t) => t,
                Err(message) => {
                    self.error(path, Some(v.span()), message);
                    default
                }
            },
        }
    }
}

pub(super) fn key(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|p| Seg::Key(p.to_string())).collect()
}

fn size_value(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
        toml::Value::String(s) => parse_size(s),
        other => Err(format!(
            "expected a size such as \"10MiB\" or a number of bytes, found {other}"
        )),
    }
}

pub(super) fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

pub(super) fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// Parses a byte rate such as `"1KiB/s"` (or `"0"`: none).
fn byte_rate(s: &str) -> Result<u64, String> {
    let size = s.trim().strip_suffix("/s").unwrap_or(s);
    parse_size(size).map_err(|_| format!("`{s}` is not a rate; write e.g. \"1KiB/s\" or \"0\""))
}

/// Parses `add_headers`: a list of the field names thr may add.
fn added_headers(list: &[String]) -> Result<AddedHeaders, String> {
    let mut added = AddedHeaders {
        forwarded_for: false,
        forwarded_proto: false,
        forwarded_host: false,
        request_id: false,
        request_start: false,
    };
    for name in list {
        let flag = match name.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => &mut added.forwarded_for,
            "x-forwarded-proto" => &mut added.forwarded_proto,
            "x-forwarded-host" => &mut added.forwarded_host,
            "x-request-id" => &mut added.request_id,
            "x-request-start" => &mut added.request_start,
            _ => {
                return Err(format!(
                    "`{name}` is not a field thr adds; it adds {}",
                    AddedHeaders::NAMES.join(", ")
                ));
            }
        };
        *flag = true;
    }
    Ok(added)
}

/// Parses `listen`: `host:port` or `unix:/path`.
pub fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("`unix:` needs a socket path, e.g. \"unix:/run/thr.sock\"".into());
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
        format!("`{s}` is not an address; write \"127.0.0.1:8080\", \"[::1]:8080\" or \"unix:/path/thr.sock\"")
    })
}

/// Parses a backend: `http://host:port[/prefix]` or `unix:/path/app.sock`.
pub fn parse_backend(s: &str) -> Result<Backend, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("`unix:` needs a socket path, e.g. \"unix:/run/app.sock\"".into());
        }
        return Ok(Backend {
            address: BackendAddress::Unix(PathBuf::from(path)),
            base_path: String::new(),
            display: s.to_string(),
        });
    }
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("`{s}` is not a URL; write \"http://127.0.0.1:9000\""))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("https backends are not supported; thr speaks plain HTTP to backends on a private network".into());
        }
        _ => return Err(format!("`{s}` must start with http:// (or be unix:/path)")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{s}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err("credentials in the backend URL are not supported".into());
    }
    if uri.query().is_some() {
        return Err("a backend URL cannot have a query string".into());
    }
    let authority = match authority.port_u16() {
        Some(_) => authority.as_str().to_string(),
        None => format!("{}:80", authority.host()),
    };
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(Backend {
        address: BackendAddress::Http { authority },
        base_path,
        display: s.to_string(),
    })
}

fn admin_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    s.parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| format!("`{s}` is not an address; write \"127.0.0.1:9180\""))
}

/// `[http2redis.tls]`: both files named. Reading them is the front's
/// business (at start, reload and `--check`): the worker and `thrctl`
/// load the same file and need not be able to read the front's key.
fn tls_files(c: &mut Checker<'_>, raw: &Option<Spanned<RawTls>>) -> Option<TlsFiles> {
    let raw = raw.as_ref()?;
    let span = Some(raw.span());
    let raw = raw.get_ref();
    let mut file = |name: &str, value: &Option<Str>| {
        let path = key(&["http2redis", "tls", name]);
        required(c, &path, value, span.clone(), |s| Ok(PathBuf::from(s)))
    };
    let cert = file("cert", &raw.cert);
    let key = file("key", &raw.key);
    Some(TlsFiles {
        cert: cert?,
        key: key?,
    })
}

fn runtime_threads(n: i64) -> Result<usize, String> {
    match n {
        0..=1024 => Ok(n as usize),
        _ => Err("must be between 0 (one per CPU core) and 1024".into()),
    }
}

fn redis_url(s: &str) -> Result<String, String> {
    const SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];
    if SCHEMES.iter().any(|p| s.starts_with(p)) {
        Ok(s.to_string())
    } else {
        Err("must start with redis://, rediss://, redis+unix:// or unix://".into())
    }
}

fn namespace(s: &String) -> Result<String, String> {
    queue_name(s).map_err(|_| {
        format!("`{s}` is not a valid namespace: use 1 to 64 letters, digits, `_`, `-` or `.`")
    })
}

fn queue_name(s: &String) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(s.clone())
    } else {
        Err(format!(
            "`{s}` is not a valid queue name: use 1 to 64 letters, digits, `_`, `-` or `.`"
        ))
    }
}

/// Compiles the raw file; `text` and `origin` are used to place errors.
pub fn compile(
    raw: RawConfig,
    earlier: Vec<ConfigError>,
    text: &str,
    origin: &str,
) -> Result<Config, ConfigErrors> {
    let mut c = Checker {
        origin,
        locator: Locator::new(text),
        errors: earlier,
    };

    let redis = RedisSettings {
        url: c.value(
            &key(&["redis", "url"]),
            &raw.redis.url,
            DEFAULT_REDIS_URL.to_string(),
            |s| redis_url(s),
        ),
        command_timeout: c.value(
            &key(&["redis", "command_timeout"]),
            &raw.redis.command_timeout,
            Duration::from_millis(750),
            |s| positive_duration(s),
        ),
        namespace: c.value(
            &key(&["redis", "namespace"]),
            &raw.redis.namespace,
            "default".to_string(),
            namespace,
        ),
        tls_ca_file: c.value(
            &key(&["redis", "tls_ca_file"]),
            &raw.redis.tls_ca_file,
            None,
            |s| {
                let path = PathBuf::from(s);
                if path.is_file() {
                    Ok(Some(path))
                } else {
                    Err(format!("`{s}` is not a readable file"))
                }
            },
        ),
    };

    let f = &raw.http2redis;
    let front = FrontSettings {
        listen: c.value(
            &key(&["http2redis", "listen"]),
            &f.listen,
            parse_listen(DEFAULT_LISTEN).expect("default listen address parses"),
            |s: &String| parse_listen(s),
        ),
        reply_timeout: c.value(
            &key(&["http2redis", "reply_timeout"]),
            &f.reply_timeout,
            Duration::from_secs(30),
            |s| positive_duration(s),
        ),
        max_body: c.value(
            &key(&["http2redis", "max_body"]),
            &f.max_body,
            DEFAULT_MAX_BODY as usize,
            |v| size_value(v).map(|n| n as usize),
        ),
        max_header_bytes: c.value(
            &key(&["http2redis", "max_header_size"]),
            &f.max_header_size,
            DEFAULT_MAX_HEADER_BYTES as usize,
            |v| {
                let n = size_value(v)?;
                if n < 8192 {
                    return Err("must be at least 8KiB".into());
                }
                Ok(n as usize)
            },
        ),
        max_headers: c.value(
            &key(&["http2redis", "max_headers"]),
            &f.max_headers,
            DEFAULT_MAX_HEADERS as usize,
            |n| match *n {
                1..=10_000 => Ok(*n as usize),
                _ => Err("must be between 1 and 10000".into()),
            },
        ),
        header_read_timeout: c.value(
            &key(&["http2redis", "header_read_timeout"]),
            &f.header_read_timeout,
            Duration::from_secs(10),
            |s| positive_duration(s),
        ),
        shutdown_grace: c.value(
            &key(&["http2redis", "shutdown_grace"]),
            &f.shutdown_grace,
            Duration::from_secs(30),
            |s| duration(s),
        ),
        trusted_proxies: c.value(
            &key(&["http2redis", "trusted_proxies"]),
            &f.trusted_proxies,
            Vec::new(),
            |list| {
                list.iter()
                    .map(|s| {
                        s.parse::<IpNet>()
                            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                            .map_err(|_| {
                                format!("`{s}` is not an address or range such as \"10.0.0.0/8\"")
                            })
                    })
                    .collect()
            },
        ),
        edge_limit: None,
        admin: c.value(&key(&["http2redis", "admin"]), &f.admin, None, |s| {
            admin_addr(s)
        }),
        redis_down_grace: c.value(
            &key(&["http2redis", "redis_down_grace"]),
            &f.redis_down_grace,
            Duration::ZERO,
            |s| duration(s),
        ),
        client_write_timeout: c.value(
            &key(&["http2redis", "client_write_timeout"]),
            &f.client_write_timeout,
            Duration::from_secs(60),
            |s| positive_duration(s),
        ),
        idle_timeout: c.value(
            &key(&["http2redis", "idle_timeout"]),
            &f.idle_timeout,
            Duration::from_secs(60),
            |s| positive_duration(s),
        ),
        body_read_timeout: c.value(
            &key(&["http2redis", "body_read_timeout"]),
            &f.body_read_timeout,
            Duration::from_secs(30),
            |s| positive_duration(s),
        ),
        min_body_rate: c.value(
            &key(&["http2redis", "min_body_rate"]),
            &f.min_body_rate,
            1 << 10,
            |s| byte_rate(s),
        ),
        max_connections: c.value(
            &key(&["http2redis", "max_connections"]),
            &f.max_connections,
            None,
            |n| match u32::try_from(*n) {
                Ok(n @ 1..=10_000_000) => Ok(Some(n)),
                _ => Err("must be between 1 and 10000000".to_string()),
            },
        ),
        add_headers: c.value(
            &key(&["http2redis", "add_headers"]),
            &f.add_headers,
            AddedHeaders::ALL,
            |list| added_headers(list),
        ),
        threads: c.value(
            &key(&["http2redis", "threads"]),
            &f.threads,
            DEFAULT_THREADS,
            |n| runtime_threads(*n),
        ),
        tls: None,
    };

    let worker = WorkerSettings {
        shutdown_grace: c.value(
            &key(&["redis2http", "shutdown_grace"]),
            &raw.redis2http.shutdown_grace,
            Duration::from_secs(30),
            |s| duration(s),
        ),
        admin: c.value(
            &key(&["redis2http", "admin"]),
            &raw.redis2http.admin,
            None,
            |s| admin_addr(s),
        ),
        threads: c.value(
            &key(&["redis2http", "threads"]),
            &raw.redis2http.threads,
            DEFAULT_THREADS,
            |n| runtime_threads(*n),
        ),
    };

    let mut queues = Vec::new();
    let mut seen = HashSet::new();
    if raw.queues.is_empty() {
        c.error(
            &[],
            None,
            "no [[queues]]: define at least one queue with a `name` and a `backend`".into(),
        );
    }
    for (i, q) in raw.queues.iter().enumerate() {
        let at = |k: &str| vec![Seg::Key("queues".into()), Seg::Index(i), Seg::Key(k.into())];
        let table_span = Some(q.span());
        let q = q.get_ref();
        let name = required(&mut c, &at("name"), &q.name, table_span.clone(), queue_name);
        if let Some(name) = &name
            && !seen.insert(name.clone())
        {
            let span = q.name.as_ref().map(|n| n.span());
            c.error(
                &at("name"),
                span,
                format!("queue `{name}` is defined twice"),
            );
        }
        let backend = required(
            &mut c,
            &at("backend"),
            &q.backend,
            table_span,
            |s: &String| parse_backend(s),
        );
        let max_inflight = c.value(
            &at("max_inflight"),
            &q.max_inflight,
            NonZeroUsize::new(DEFAULT_MAX_INFLIGHT),
            |n| match *n {
                1..=100_000 => Ok(NonZeroUsize::new(*n as usize)),
                _ => Err("must be between 1 and 100000".into()),
            },
        );
        let backend_timeout = c.value(
            &at("backend_timeout"),
            &q.backend_timeout,
            Duration::from_secs(60),
            |s| positive_duration(s),
        );
        let lease = c.value(&at("lease"), &q.lease, Duration::from_secs(30), |s| {
            positive_duration(s)
        });
        let count = |n: &i64| match u32::try_from(*n) {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err("must be a whole number of at least 1".to_string()),
        };
        let max_waiting = c.value(&at("max_waiting"), &q.max_waiting, None, count);
        let max_inflight_total = c.value(
            &at("max_inflight_total"),
            &q.max_inflight_total,
            None,
            count,
        );
        let retry_methods = c.value(
            &at("retry_methods"),
            &q.retry_methods,
            vec!["GET".to_string(), "HEAD".to_string(), "OPTIONS".to_string()],
            |list| {
                for m in list {
                    if http::Method::from_bytes(m.as_bytes()).is_err() {
                        return Err(format!("`{m}` is not a method"));
                    }
                }
                Ok(list.clone())
            },
        );
        let max_attempts = c.value(
            &at("max_attempts"),
            &q.max_attempts,
            3,
            |n| match u32::try_from(*n) {
                Ok(n @ 1..=100) => Ok(n),
                _ => Err("must be between 1 and 100".to_string()),
            },
        );
        let response_buffer = c.value(
            &at("response_buffer"),
            &q.response_buffer,
            DEFAULT_RESPONSE_BUFFER as usize,
            |v| {
                let n = size_value(v)?;
                if n > 1 << 30 {
                    return Err("must be at most 1GiB (it is held in the worker's memory)".into());
                }
                Ok(n as usize)
            },
        );
        let max_response = c.value(&at("max_response"), &q.max_response, None, |v| {
            size_value(v).map(Some)
        });
        let max_tunnels = c.value(
            &at("max_tunnels"),
            &q.max_tunnels,
            DEFAULT_MAX_TUNNELS,
            |n| match u32::try_from(*n) {
                Ok(n @ 0..=100_000) => Ok(n),
                _ => Err("must be between 0 and 100000 (0 refuses upgrades)".to_string()),
            },
        );
        let max_response_headers = c.value(
            &at("max_response_headers"),
            &q.max_response_headers,
            DEFAULT_MAX_HEADERS as usize,
            |n| match *n {
                1..=10_000 => Ok(*n as usize),
                _ => Err("must be between 1 and 10000".into()),
            },
        );
        let max_response_header_size = c.value(
            &at("max_response_header_size"),
            &q.max_response_header_size,
            DEFAULT_MAX_HEADER_BYTES as usize,
            |v| match size_value(v)? {
                n @ 8192..=16_777_216 => Ok(n as usize),
                _ => Err("must be between 8KiB and 16MiB".into()),
            },
        );
        if let (Some(name), Some(backend), Some(max_inflight)) = (name, backend, max_inflight) {
            queues.push(QueueConfig {
                name,
                backend,
                max_inflight,
                backend_timeout,
                lease,
                max_waiting,
                max_inflight_total,
                retry_methods,
                max_attempts,
                response_buffer,
                max_response,
                max_tunnels,
                max_response_headers,
                max_response_header_size,
            });
        }
    }

    let rules = super::rules::compile_rules(&mut c, &raw.rules, &queues);
    let limits = super::limits::compile_limits(&mut c, &raw.limits, &queues);
    let scheduling = super::limits::compile_scheduling(&mut c, &raw.scheduling);
    let tls = tls_files(&mut c, &raw.http2redis.tls);
    let edge_limit = super::limits::compile_edge_limit(&mut c, &raw.http2redis.edge_limit);

    let mut front = front;
    front.tls = tls;
    front.edge_limit = edge_limit;

    if c.errors.is_empty() {
        Ok(Config {
            origin: origin.to_string(),
            redis,
            front,
            worker,
            queues,
            rules,
            limits,
            scheduling,
        })
    } else {
        c.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(c.errors))
    }
}

fn required<T>(
    c: &mut Checker<'_>,
    path: &[Seg],
    raw: &Option<Str>,
    table_span: Option<std::ops::Range<usize>>,
    parse: impl FnOnce(&String) -> Result<T, String>,
) -> Option<T> {
    match raw {
        None => {
            c.error(path, table_span, "is required".into());
            None
        }
        Some(v) => match parse(v.get_ref()) {
            Ok(t) => Some(t),
            Err(message) => {
                c.error(path, Some(v.span()), message);
                None
            }
        },
    }
}
