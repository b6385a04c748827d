//! Compiling `[[limits]]`, `[scheduling]` and `[http2redis.edge_limit]`.

use std::collections::HashSet;
use std::num::NonZeroU32;

use http::HeaderName;
use toml::Spanned;

use super::compile::{Checker, positive_duration};
use super::locate::Seg;
use super::raw::{RawEdgeLimit, RawLimit, RawScheduling};
use super::{EdgeLimit, QueueConfig, Scheduling};
use crate::quota::{KeySource, Limit, Rate};
use crate::rules::{Pattern, Subject};

fn at(i: usize, key: &str) -> Vec<Seg> {
    vec![
        Seg::Key("limits".into()),
        Seg::Index(i),
        Seg::Key(key.into()),
    ]
}

/// Parses `by`: `"remote_ip"`, `"real_ip"`, `"path"`, `"method"`, `"host"`,
/// `{ header = "Name" }` or `{ query = "name" }`.
pub(super) fn key_source(value: &toml::Value) -> Result<KeySource, String> {
    const HELP: &str = "write \"remote_ip\", \"real_ip\", \"path\", \"method\", \"host\", { header = \"Name\" } or { query = \"name\" }";
    match value {
        toml::Value::String(s) => match s.as_str() {
            "remote_ip" => Ok(KeySource::RemoteIp),
            "real_ip" => Ok(KeySource::RealIp),
            "path" => Ok(KeySource::Path),
            "method" => Ok(KeySource::Method),
            "host" => Ok(KeySource::Host),
            other => Err(format!("unknown key `{other}`; {HELP}")),
        },
        toml::Value::Table(t) if t.len() == 1 => {
            let (kind, v) = t.iter().next().expect("one entry");
            let name = v
                .as_str()
                .ok_or_else(|| format!("`{kind}` takes a string"))?;
            match kind.as_str() {
                "header" => HeaderName::from_bytes(name.as_bytes())
                    .map(KeySource::Header)
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                "query" if !name.is_empty() => Ok(KeySource::Query(name.to_string())),
                _ => Err(HELP.to_string()),
            }
        }
        _ => Err(HELP.to_string()),
    }
}

fn positive(c: &mut Checker<'_>, path: Vec<Seg>, value: Option<i64>) -> Option<NonZeroU32> {
    let v = value?;
    match u32::try_from(v).ok().and_then(NonZeroU32::new) {
        Some(n) => Some(n),
        None => {
            c.error(&path, None, "must be a whole number of at least 1".into());
            None
        }
    }
}

fn rate(
    c: &mut Checker<'_>,
    path: Vec<Seg>,
    burst_path: Vec<Seg>,
    rate: &Option<String>,
    burst: Option<i64>,
) -> Option<Rate> {
    let burst = positive(c, burst_path.clone(), burst).unwrap_or(NonZeroU32::MIN);
    match rate {
        None => {
            if burst.get() > 1 {
                c.error(&burst_path, None, "`burst` needs a `rate`".into());
            }
            None
        }
        Some(text) => match Rate::parse(text, burst) {
            Ok(r) => Some(r),
            Err(m) => {
                c.error(&path, None, m);
                None
            }
        },
    }
}

pub(super) fn compile_limits(
    c: &mut Checker<'_>,
    raw: &[Spanned<RawLimit>],
    queues: &[QueueConfig],
) -> Vec<Limit> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let l = spanned.get_ref();
        let name = match &l.name {
            None => {
                c.error(&at(i, "name"), Some(spanned.span()), "is required".into());
                continue;
            }
            Some(n) => n.clone(),
        };
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            c.error(&at(i, "name"), None, format!("`{name}` is not a valid limit name: use 1 to 64 letters, digits, `_`, `-` or `.`"));
        } else if !names.insert(name.clone()) {
            c.error(
                &at(i, "name"),
                None,
                format!("limit `{name}` is defined twice"),
            );
        }
        let by = match &l.by {
            None => {
                c.error(
                    &at(i, "by"),
                    Some(spanned.span()),
                    "is required (e.g. by = { header = \"X-User\" })".into(),
                );
                None
            }
            Some(v) => match key_source(v) {
                Ok(k) => Some(k),
                Err(m) => {
                    c.error(&at(i, "by"), None, m);
                    None
                }
            },
        };
        let when = l.when.as_ref().and_then(|v| {
            let subject = match by {
                Some(KeySource::RemoteIp | KeySource::RealIp) => Subject::Ip,
                Some(KeySource::Path) => Subject::Path,
                Some(KeySource::Host) => Subject::Host,
                _ => Subject::Field,
            };
            Pattern::compile(v, subject)
                .map_err(|m| c.error(&at(i, "when"), None, m))
                .ok()
        });
        let queue = l
            .queue
            .as_ref()
            .and_then(|q| match queues.iter().position(|x| &x.name == q) {
                Some(idx) => Some(idx),
                None => {
                    c.error(&at(i, "queue"), None, format!("no queue named `{q}`"));
                    None
                }
            });
        let max_concurrent = positive(c, at(i, "max_concurrent"), l.max_concurrent);
        let rate = rate(c, at(i, "rate"), at(i, "burst"), &l.rate, l.burst);
        let max_waiting = positive(c, at(i, "max_waiting"), l.max_waiting);
        if let Some(by) = by {
            out.push(Limit {
                name,
                by,
                when,
                queue,
                max_concurrent,
                rate,
                max_waiting,
            });
        }
    }
    out
}

pub(super) fn compile_scheduling(c: &mut Checker<'_>, raw: &RawScheduling) -> Scheduling {
    let path = vec![
        Seg::Key("scheduling".into()),
        Seg::Key("max_wait_boost".into()),
    ];
    Scheduling {
        max_wait_boost: c.value(&path, &raw.max_wait_boost, None, |s| {
            positive_duration(s).map(Some)
        }),
    }
}

pub(super) fn compile_edge_limit(
    c: &mut Checker<'_>,
    raw: &Option<RawEdgeLimit>,
) -> Option<EdgeLimit> {
    let raw = raw.as_ref()?;
    let path = |k: &str| {
        vec![
            Seg::Key("http2redis".into()),
            Seg::Key("edge_limit".into()),
            Seg::Key(k.into()),
        ]
    };
    let by = match &raw.by {
        Some(v) => key_source(v)
            .map_err(|m| c.error(&path("by"), None, m))
            .ok(),
        None => Some(KeySource::RealIp),
    };
    if raw.rate.is_none() {
        c.error(
            &path("rate"),
            None,
            "is required (e.g. rate = \"50/s\")".into(),
        );
    }
    let rate = rate(c, path("rate"), path("burst"), &raw.rate, raw.burst);
    Some(EdgeLimit {
        by: by?,
        rate: rate?,
    })
}
