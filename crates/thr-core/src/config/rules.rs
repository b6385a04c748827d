//! Compiling `[[rules]]`: patterns, rewrites and answers checked once, every
//! error placed at its key.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;
use toml::Spanned;

use super::QueueConfig;
use super::compile::{Checker, duration, positive_duration};
use super::locate::Seg;
use super::raw::{RawAuth, RawRule, RawThen, RawWhen};
use crate::priority;
use crate::rules::{
    Actions, Answer, AuthSpec, Criteria, HeaderEdit, PathRewrite, Pattern, Rule, Subject,
};

/// Compiles every rule; problems go to `c`.
pub(super) fn compile_rules(
    c: &mut Checker<'_>,
    raw: &[Spanned<RawRule>],
    queues: &[QueueConfig],
) -> Vec<Rule> {
    raw.iter()
        .enumerate()
        .map(|(i, spanned)| {
            let at = |rest: &[&str]| {
                let mut path = vec![Seg::Key("rules".into()), Seg::Index(i)];
                path.extend(rest.iter().map(|k| Seg::Key(k.to_string())));
                path
            };
            let rule = spanned.get_ref();
            Rule {
                name: rule.name.clone().unwrap_or_else(|| format!("rules[{i}]")),
                line: c.line_of(spanned.span().start),
                when: criteria(c, &rule.when, &at),
                then: actions(c, &rule.then, queues, &at),
                stop: rule.stop.unwrap_or(false),
            }
        })
        .collect()
}

fn pattern(
    c: &mut Checker<'_>,
    path: Vec<Seg>,
    value: &Option<toml::Value>,
    subject: Subject,
) -> Option<Pattern> {
    let value = value.as_ref()?;
    match Pattern::compile(value, subject) {
        Ok(p) => Some(p),
        Err(msg) => {
            c.error(&path, None, msg);
            None
        }
    }
}

fn criteria(c: &mut Checker<'_>, when: &RawWhen, at: &dyn Fn(&[&str]) -> Vec<Seg>) -> Criteria {
    let mut criteria = Criteria {
        path: pattern(c, at(&["when", "path"]), &when.path, Subject::Path),
        method: pattern(c, at(&["when", "method"]), &when.method, Subject::Method),
        host: pattern(c, at(&["when", "host"]), &when.host, Subject::Host),
        remote_ip: pattern(c, at(&["when", "remote_ip"]), &when.remote_ip, Subject::Ip),
        real_ip: pattern(c, at(&["when", "real_ip"]), &when.real_ip, Subject::Ip),
        headers: Vec::new(),
        query: Vec::new(),
    };
    for (name, value) in when.header.iter().flatten() {
        let path = at(&["when", "header", name]);
        let Some(name) = header_name(c, &path, name) else {
            continue;
        };
        if let Some(p) = pattern(c, path, &Some(value.clone()), Subject::Field) {
            criteria.headers.push((name, p));
        }
    }
    for (name, value) in when.query.iter().flatten() {
        if let Some(p) = pattern(
            c,
            at(&["when", "query", name]),
            &Some(value.clone()),
            Subject::Field,
        ) {
            criteria.query.push((name.clone(), p));
        }
    }
    criteria
}

fn header_name(c: &mut Checker<'_>, path: &[Seg], name: &str) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            c.error(path, None, format!("`{name}` is not a valid header name"));
            None
        }
    }
}

fn header_value(c: &mut Checker<'_>, path: &[Seg], value: &str) -> Option<HeaderValue> {
    match HeaderValue::from_str(value) {
        Ok(v) => Some(v),
        Err(_) => {
            c.error(
                path,
                None,
                "header values cannot hold control characters".into(),
            );
            None
        }
    }
}

/// A `{ Name = "value" }` or `{ Name = ["v1", "v2"] }` table.
fn header_table(
    c: &mut Checker<'_>,
    path: Vec<Seg>,
    table: &Option<toml::Table>,
) -> Vec<(HeaderName, Vec<HeaderValue>)> {
    let mut out = Vec::new();
    for (name, value) in table.iter().flatten() {
        let mut at = path.clone();
        at.push(Seg::Key(name.clone()));
        let Some(hname) = header_name(c, &at, name) else {
            continue;
        };
        let texts: Vec<&str> = match value {
            toml::Value::String(s) => vec![s.as_str()],
            toml::Value::Array(items) if items.iter().all(|v| v.is_str()) => {
                items.iter().filter_map(|v| v.as_str()).collect()
            }
            _ => {
                c.error(&at, None, "expected a string or a list of strings".into());
                continue;
            }
        };
        let values: Vec<HeaderValue> = texts
            .into_iter()
            .filter_map(|t| header_value(c, &at, t))
            .collect();
        out.push((hname, values));
    }
    out
}

fn header_names(
    c: &mut Checker<'_>,
    path: Vec<Seg>,
    names: &Option<Vec<String>>,
) -> Vec<HeaderName> {
    names
        .iter()
        .flatten()
        .filter_map(|n| header_name(c, &path, n))
        .collect()
}

fn actions(
    c: &mut Checker<'_>,
    then: &RawThen,
    queues: &[QueueConfig],
    at: &dyn Fn(&[&str]) -> Vec<Seg>,
) -> Actions {
    let mut a = Actions::default();
    if let Some(name) = &then.queue {
        match queues.iter().position(|q| &q.name == name) {
            Some(i) => a.queue = Some(i),
            None => {
                let known: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
                c.error(
                    &at(&["then", "queue"]),
                    None,
                    format!("no queue named `{name}` (queues: {})", known.join(", ")),
                );
            }
        }
    }
    if let Some(p) = then.priority {
        if (priority::HIGHEST as i64..=priority::LOWEST as i64).contains(&p) {
            a.priority = Some(p as u8);
        } else {
            c.error(
                &at(&["then", "priority"]),
                None,
                "must be between 1 (most urgent) and 99".into(),
            );
        }
    }
    a.bypass = then.bypass;

    match then.status {
        Some(code) => match u16::try_from(code)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(status) if (100..600).contains(&status.as_u16()) => {
                let headers = header_table(c, at(&["then", "headers"]), &then.headers)
                    .into_iter()
                    .flat_map(|(n, vs)| vs.into_iter().map(move |v| (n.clone(), v)))
                    .collect();
                a.answer = Some(Answer {
                    status,
                    body: Bytes::from(then.body.clone().unwrap_or_default()),
                    headers,
                });
            }
            _ => c.error(
                &at(&["then", "status"]),
                None,
                "must be a status code between 100 and 599".into(),
            ),
        },
        None => {
            if then.body.is_some() {
                c.error(
                    &at(&["then", "body"]),
                    None,
                    "`body` needs a `status` (it is a direct answer)".into(),
                );
            }
            if then.headers.is_some() {
                c.error(
                    &at(&["then", "headers"]),
                    None,
                    "`headers` needs a `status` (use set_headers to rewrite the request)".into(),
                );
            }
        }
    }

    a.set_headers = header_table(c, at(&["then", "set_headers"]), &then.set_headers);
    a.add_headers = header_table(c, at(&["then", "add_headers"]), &then.add_headers)
        .into_iter()
        .flat_map(|(n, vs)| vs.into_iter().map(move |v| (n.clone(), v)))
        .collect();
    a.remove_headers = header_names(c, at(&["then", "remove_headers"]), &then.remove_headers);

    if let Some(path) = &then.path {
        a.path = path_rewrite(c, at(&["then", "path"]), path);
    }
    if let Some(m) = &then.method {
        match Method::from_bytes(m.as_bytes()) {
            Ok(m) => a.method = Some(m),
            Err(_) => c.error(
                &at(&["then", "method"]),
                None,
                format!("`{m}` is not a method"),
            ),
        }
    }
    if let Some(h) = &then.host {
        a.host = header_value(c, &at(&["then", "host"]), h);
    }
    for (name, value) in then.set_query.iter().flatten() {
        match value {
            toml::Value::String(s) => a.set_query.push((name.clone(), s.clone())),
            toml::Value::Integer(n) => a.set_query.push((name.clone(), n.to_string())),
            _ => c.error(
                &at(&["then", "set_query", name]),
                None,
                "expected a string".into(),
            ),
        }
    }
    a.remove_query = then.remove_query.clone().unwrap_or_default();

    for name in header_names(
        c,
        at(&["then", "remove_response_headers"]),
        &then.remove_response_headers,
    ) {
        a.response_headers.push(HeaderEdit::Remove(name));
    }
    for (name, values) in header_table(
        c,
        at(&["then", "set_response_headers"]),
        &then.set_response_headers,
    ) {
        a.response_headers.push(HeaderEdit::Set(name, values));
    }
    a.default_body = then.default_body.clone().map(Bytes::from);
    if let Some(text) = &then.reply_timeout {
        match positive_duration(text) {
            Ok(d) => a.reply_timeout = Some(d),
            Err(e) => c.error(&at(&["then", "reply_timeout"]), None, e),
        }
    }
    if let Some(auth) = &then.auth {
        a.auth = auth_spec(c, at(&["then", "auth"]), auth).map(Arc::new);
    }
    a
}

fn path_rewrite(c: &mut Checker<'_>, path: Vec<Seg>, value: &toml::Value) -> Option<PathRewrite> {
    match value {
        toml::Value::String(s) if s.starts_with('/') => Some(PathRewrite::Set(s.clone())),
        toml::Value::Table(t) => {
            let (Some(re), Some(with)) = (
                t.get("regex").and_then(|v| v.as_str()),
                t.get("replace").and_then(|v| v.as_str()),
            ) else {
                c.error(
                    &path,
                    None,
                    "write `{ regex = \"^/old/(.*)\", replace = \"/new/$1\" }`".into(),
                );
                return None;
            };
            if t.len() != 2 {
                c.error(
                    &path,
                    None,
                    "a path rewrite table has only `regex` and `replace`".into(),
                );
                return None;
            }
            match Regex::new(re) {
                Ok(re) => Some(PathRewrite::Regex(Box::new(re), with.to_string())),
                Err(e) => {
                    c.error(
                        &path,
                        None,
                        format!(
                            "invalid regex: {}",
                            e.to_string().lines().last().unwrap_or("")
                        ),
                    );
                    None
                }
            }
        }
        _ => {
            c.error(
                &path,
                None,
                "expected a path starting with `/` or `{ regex = …, replace = … }`".into(),
            );
            None
        }
    }
}

fn auth_spec(c: &mut Checker<'_>, path: Vec<Seg>, raw: &RawAuth) -> Option<AuthSpec> {
    let sub = |k: &str| {
        let mut p = path.clone();
        p.push(Seg::Key(k.into()));
        p
    };
    let Some(url) = &raw.url else {
        c.error(&sub("url"), None, "is required".into());
        return None;
    };
    let uri = match url.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() => u,
        _ => {
            c.error(&sub("url"), None, format!("`{url}` must be an http:// URL"));
            return None;
        }
    };
    let mut check_duration =
        |key: &str, v: &Option<String>, default: Duration, positive: bool| match v {
            None => default,
            Some(s) => match if positive {
                positive_duration(s)
            } else {
                duration(s)
            } {
                Ok(d) => d,
                Err(m) => {
                    c.error(&sub(key), None, m);
                    default
                }
            },
        };
    let cache = check_duration("cache", &raw.cache, Duration::ZERO, false);
    let timeout = check_duration("timeout", &raw.timeout, Duration::from_secs(2), true);
    Some(AuthSpec {
        url: uri,
        forward_headers: header_names(c, sub("forward_headers"), &raw.forward_headers),
        copy_headers: header_names(c, sub("copy_headers"), &raw.copy_headers),
        cache,
        timeout,
    })
}
