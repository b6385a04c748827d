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
    pub threads: Option<Spanned<i64>>,
    pub tls: Option<Spanned<RawTls>>,
}

/// `[http2redis.tls]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<Str>,
    pub key: Option<Str>,
}

/// `[redis2http]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawWorker {
    pub shutdown_grace: Option<Str>,
    pub admin: Option<Str>,
    pub threads: Option<Spanned<i64>>,
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

    // serde stops at the first value of the wrong type. To report them all
    // at once, each is blanked out (its lines become spaces, so every
    // offset and line number stays that of the file) and the text is read
    // again, up to a bound.
    let mut text_now = text.to_string();
    let mut type_errors: Vec<ConfigError> = Vec::new();
    let mut last_unknown: Vec<ConfigError> = Vec::new();
    loop {
        let deserializer = match toml::de::Deserializer::parse(&text_now) {
            Ok(d) => d,
            Err(err) if type_errors.is_empty() => {
                return Err(ConfigErrors::single(toml_error(&locator, origin, &err)));
            }
            // Blanking broke the syntax (a value sharing its line with
            // another key): what was found so far is the report.
            Err(_) => {
                let mut errors = std::mem::take(&mut last_unknown);
                errors.extend(type_errors);
                errors.sort_by_key(|e| (e.line, e.column));
                errors.dedup();
                return Err(ConfigErrors(errors));
            }
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
            Ok(raw) => {
                errors.extend(type_errors);
                return Ok((raw, errors));
            }
            Err(err) => {
                last_unknown.clone_from(&errors);
                type_errors.push(toml_error(&locator, origin, &err));
                let blanked = err
                    .span()
                    .filter(|_| type_errors.len() < MAX_TYPE_ERRORS)
                    .and_then(|span| blank_lines(&mut text_now, span));
                if blanked.is_none() {
                    errors.extend(type_errors);
                    errors.sort_by_key(|e| (e.line, e.column));
                    errors.dedup();
                    return Err(ConfigErrors(errors));
                }
            }
        }
    }
}

/// Type errors reported in one go before giving up on the rest.
const MAX_TYPE_ERRORS: usize = 50;

/// Replaces the lines that hold `span` with spaces (byte for byte, so
/// offsets keep their meaning). None when they are blank already: no
/// progress is possible.
fn blank_lines(text: &mut String, span: std::ops::Range<usize>) -> Option<()> {
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let end = text[span.end.min(text.len())..]
        .find('\n')
        .map_or(text.len(), |i| span.end + i);
    let blank: String = text[start..end]
        .bytes()
        .map(|b| if b == b'\n' { '\n' } else { ' ' })
        .collect();
    if text[start..end] == blank {
        return None;
    }
    text.replace_range(start..end, &blank);
    Some(())
}

fn toml_error(locator: &Locator<'_>, origin: &str, err: &toml::de::Error) -> ConfigError {
    let (line, column) = err
        .span()
        .map(|s| locator.line_col(s.start))
        .map_or((None, None), |(l, c)| (Some(l), Some(c)));
    let key = err
        .span()
        .map(|s| render(&locator.path_at(s.start)))
        .unwrap_or_default();
    let message = with_hint(err.message().trim(), &key);
    ConfigError {
        origin: origin.to_string(),
        line,
        column,
        key,
        message,
    }
}

/// A number written where a string with a unit is expected gets the
/// quoted form to write instead (`reply_timeout = 30` → `"30s"`).
fn with_hint(message: &str, key: &str) -> String {
    let number = message
        .strip_prefix("invalid type: integer `")
        .or_else(|| message.strip_prefix("invalid type: floating point `"))
        .and_then(|rest| rest.split_once('`'))
        .filter(|(_, rest)| rest.contains("expected a string"))
        .map(|(n, _)| n);
    let Some(n) = number else {
        return message.to_string();
    };
    let name = key.rsplit('.').next().unwrap_or(key);
    // (Sizes take bare numbers: only durations and rates get here.)
    let example = if ["timeout", "grace", "lease", "boost", "cache"]
        .iter()
        .any(|d| name.ends_with(d))
    {
        format!("\"{n}s\"")
    } else if name == "rate" {
        format!("\"{n}/s\"")
    } else {
        format!("\"{n}\"")
    };
    format!("{message}; write {example} (a quoted value with its unit)")
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
