//! The configuration as written: permissive serde structs whose values keep
//! their position in the file. Unknown keys are collected (all of them) rather
//! than stopping at the first; [`super::compile`] does the validation.

use serde::Deserialize;
use toml::Spanned;

use super::error::{ConfigError, ConfigErrors};
use super::locate::{Locator, Seg, render};

/// A string value with its position.
pub type Str = Spanned<String>;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub redis: RawRedis,
    #[serde(default)]
    pub http2redis: RawFront,
    #[serde(default)]
    pub redis2http: RawWorker,
    #[serde(default)]
    pub queues: Vec<Spanned<RawQueue>>,
    #[serde(default)]
    pub rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub limits: Vec<Spanned<RawLimit>>,
    #[serde(default)]
    pub scheduling: RawScheduling,
}

/// One `[[limits]]` entry.
#[derive(Debug, Default, Deserialize)]
pub struct RawLimit {
    pub name: Option<String>,
    pub by: Option<toml::Value>,
    pub when: Option<toml::Value>,
    pub queue: Option<String>,
    pub max_concurrent: Option<i64>,
    pub rate: Option<String>,
    pub burst: Option<i64>,
    pub max_waiting: Option<i64>,
}

/// `[scheduling]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawScheduling {
    pub max_wait_boost: Option<Str>,
}

/// `[http2redis.edge_limit]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawEdgeLimit {
    pub by: Option<toml::Value>,
    pub rate: Option<String>,
    pub burst: Option<i64>,
}

/// One `[[rules]]` entry. Patterns stay TOML values until compiled; errors
/// are placed by key path.
#[derive(Debug, Default, Deserialize)]
pub struct RawRule {
    pub name: Option<String>,
    #[serde(default)]
    pub when: RawWhen,
    #[serde(default)]
    pub then: RawThen,
    pub stop: Option<bool>,
}

/// A rule's `when`.
#[derive(Debug, Default, Deserialize)]
pub struct RawWhen {
    pub path: Option<toml::Value>,
    pub method: Option<toml::Value>,
    pub host: Option<toml::Value>,
    pub remote_ip: Option<toml::Value>,
    pub real_ip: Option<toml::Value>,
    pub header: Option<toml::Table>,
    pub query: Option<toml::Table>,
}

/// A rule's `then`.
#[derive(Debug, Default, Deserialize)]
pub struct RawThen {
    pub queue: Option<String>,
    pub priority: Option<i64>,
    pub bypass: Option<bool>,
    pub status: Option<i64>,
    pub body: Option<String>,
    pub headers: Option<toml::Table>,
    pub set_headers: Option<toml::Table>,
    pub add_headers: Option<toml::Table>,
    pub remove_headers: Option<Vec<String>>,
    pub path: Option<toml::Value>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub set_query: Option<toml::Table>,
    pub remove_query: Option<Vec<String>>,
    pub set_response_headers: Option<toml::Table>,
    pub remove_response_headers: Option<Vec<String>>,
    pub default_body: Option<String>,
    pub auth: Option<RawAuth>,
    pub reply_timeout: Option<String>,
}

/// `then.auth`.
#[derive(Debug, Default, Deserialize)]
pub struct RawAuth {
    pub url: Option<String>,
    pub forward_headers: Option<Vec<String>>,
    pub copy_headers: Option<Vec<String>>,
    pub cache: Option<String>,
    pub timeout: Option<String>,
}

/// `[redis]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawRedis {
    pub url: Option<Str>,
    pub command_timeout: Option<Str>,
    pub namespace: Option<Str>,
    pub tls_ca_file: Option<Str>,
}

/// `[http2redis]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawFront {
    pub listen: Option<Str>,
    pub reply_timeout: Option<Str>,
    pub max_body: Option<Spanned<toml::Value>>,
    pub max_header_size: Option<Spanned<toml::Value>>,
    pub max_headers: Option<Spanned<i64>>,
    pub header_read_timeout: Option<Str>,
    pub shutdown_grace: Option<Str>,
    pub trusted_proxies: Option<Spanned<Vec<String>>>,
    pub admin: Option<Str>,
    pub redis_down_grace: Option<Str>,
    pub client_write_timeout: Option<Str>,
    pub idle_timeout: Option<Str>,
    pub body_read_timeout: Option<Str>,
    pub min_body_rate: Option<Str>,
    pub max_connections: Option<Spanned<i64>>,
    pub add_headers: Option<Spanned<Vec<String>>>,
    pub edge_limit: Option<RawEdgeLimit>,
}

/// `[redis2http]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawWorker {
    pub shutdown_grace: Option<Str>,
    pub admin: Option<Str>,
}

/// One `[[queues]]` entry.
#[derive(Debug, Default, Deserialize)]
pub struct RawQueue {
    pub name: Option<Str>,
    pub backend: Option<Str>,
    pub max_inflight: Option<Spanned<i64>>,
    pub backend_timeout: Option<Str>,
    pub lease: Option<Str>,
    pub max_waiting: Option<Spanned<i64>>,
    pub max_inflight_total: Option<Spanned<i64>>,
    pub retry_methods: Option<Spanned<Vec<String>>>,
    pub max_attempts: Option<Spanned<i64>>,
    pub response_buffer: Option<Spanned<toml::Value>>,
    pub max_response: Option<Spanned<toml::Value>>,
    pub max_tunnels: Option<Spanned<i64>>,
    pub max_response_headers: Option<Spanned<i64>>,
    pub max_response_header_size: Option<Spanned<toml::Value>>,
}

/// Deserializes `text`, reporting syntax errors, type errors and every
/// unknown key together.
pub fn read(text: &str, origin: &str) -> Result<(RawConfig, Vec<ConfigError>), ConfigErrors> {
    let locator = Locator::new(text);
    let at = |path: &[Seg], message: String| {
        let (line, column) = locator
            .span(path)
            .map(|s| locator.line_col(s.start))
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        ConfigError {
            origin: origin.to_string(),
            line,
            column,
            key: render(path),
            message,
        }
    };

    let deserializer = match toml::de::Deserializer::parse(text) {
        Ok(d) => d,
        Err(err) => return Err(ConfigErrors::single(toml_error(&locator, origin, &err))),
    };
    let mut unknown = Vec::new();
    let result: Result<RawConfig, _> = serde_ignored::deserialize(deserializer, |path| {
        unknown.push(segments(&path));
    });
    let mut errors: Vec<ConfigError> = unknown
        .iter()
        .map(|path| at(path, "unknown key".to_string()))
        .collect();
    match result {
        Ok(raw) => Ok((raw, errors)),
        Err(err) => {
            errors.push(toml_error(&locator, origin, &err));
            errors.sort_by_key(|e| (e.line, e.column));
            Err(ConfigErrors(errors))
        }
    }
}

fn toml_error(locator: &Locator<'_>, origin: &str, err: &toml::de::Error) -> ConfigError {
    let (line, column) = err
        .span()
        .map(|s| locator.line_col(s.start))
        .map_or((None, None), |(l, c)| (Some(l), Some(c)));
    let message = err.message().trim().to_string();
    let key = err
        .span()
        .map(|s| render(&locator.path_at(s.start)))
        .unwrap_or_default();
    ConfigError {
        origin: origin.to_string(),
        line,
        column,
        key,
        message,
    }
}

fn segments(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, index } => {
            let mut v = segments(parent);
            v.push(Seg::Index(*index));
            return v;
        }
        Path::Map { parent, key } => {
            let mut v = segments(parent);
            // `Spanned<T>` wraps T in a private map: not a key of the file.
            if !key.starts_with("$__serde_spanned") {
                v.push(Seg::Key(key.clone()));
            }
            return v;
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    out.shrink_to_fit();
    out
}
