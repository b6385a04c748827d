//! `http2redis explain`: which rules match a request, in order, and what the
//! front would do with it — so operators test rules before deploying them.

use std::fmt::Write;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use thr_core::config::Config;
use thr_core::rules::{self, Actions, HeaderEdit, PathRewrite, RuleRequest};

use crate::forwarded;

/// A request described on the command line.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Method, e.g. `GET`.
    pub method: String,
    /// `/path?query` or `http://host/path?query` (the host becomes Host).
    pub url: String,
    /// `Name: value` fields.
    pub headers: Vec<String>,
    /// The client's address (default 127.0.0.1).
    pub remote_ip: Option<IpAddr>,
}

/// Runs the rules of `config` on `probe` and describes the outcome.
pub fn explain(config: &Config, probe: &Probe) -> Result<String, String> {
    let method = Method::from_bytes(probe.method.as_bytes())
        .map_err(|_| format!("`{}` is not a method", probe.method))?;
    let uri: http::Uri = probe
        .url
        .parse()
        .map_err(|_| format!("`{}` is not a URL or path", probe.url))?;
    let target = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let mut headers = HeaderMap::new();
    if let Some(authority) = uri.authority() {
        headers.insert(
            http::header::HOST,
            HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
        );
    }
    for h in &probe.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("`{h}`: write -H 'Name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("`{name}` is not a header name"))?;
        let value =
            HeaderValue::from_str(value.trim()).map_err(|_| format!("bad value for `{name}`"))?;
        headers.append(name, value);
    }
    let peer = Some(probe.remote_ip.unwrap_or(IpAddr::from([127, 0, 0, 1])));
    let real_ip = forwarded::real_ip(&headers, peer, &config.front.trusted_proxies);
    let mut req = RuleRequest {
        method,
        target,
        headers,
        remote_ip: peer,
        real_ip,
    };
    let before = req.clone();
    let decision = rules::evaluate(&config.rules, &mut req);

    let mut out = String::new();
    let ip = |ip: Option<IpAddr>| ip.map_or("-".to_string(), |i| i.to_string());
    let _ = writeln!(
        out,
        "request: {} {}  (host {}, remote_ip {}, real_ip {})",
        before.method,
        before.target,
        before.host().unwrap_or_else(|| "-".into()),
        ip(before.remote_ip),
        ip(before.real_ip)
    );
    if decision.matched.is_empty() {
        let _ = writeln!(out, "matched: no rule ({} rules)", config.rules.len());
    } else {
        let _ = writeln!(out, "matched:");
        for (n, &i) in decision.matched.iter().enumerate() {
            let rule = &config.rules[i];
            let line = rule.line.map_or(String::new(), |l| format!(" (line {l})"));
            let stop = if rule.stop { "  [stop]" } else { "" };
            let _ = writeln!(
                out,
                "  {}. {}{line}: {}{stop}",
                n + 1,
                rule.name,
                describe(&rule.then, config).join(", ")
            );
        }
    }
    let _ = writeln!(out, "result:");
    if let Some(answer) = &decision.answer {
        let _ = writeln!(
            out,
            "  answer directly: {} {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        for (n, v) in &answer.headers {
            let _ = writeln!(out, "    {n}: {}", String::from_utf8_lossy(v.as_bytes()));
        }
        return Ok(out);
    }
    let queue = &config.queues[decision.queue];
    if let Some(auth) = &decision.auth {
        let _ = writeln!(out, "  auth:     ask {} first", auth.url);
    }
    let _ = writeln!(
        out,
        "  queue:    {} -> {}{}",
        queue.name,
        queue.backend.display,
        if decision.bypass {
            " (bypass: forwarded directly, not queued)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "  priority: {}", decision.priority);
    let _ = writeln!(out, "  forward:  {} {}", req.method, req.target);
    let mut changed = Vec::new();
    for (name, value) in &req.headers {
        let old: Vec<&HeaderValue> = before.headers.get_all(name).iter().collect();
        if !old.contains(&value) {
            changed.push(format!(
                "    + {name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
    }
    for (name, value) in &before.headers {
        let new: Vec<&HeaderValue> = req.headers.get_all(name).iter().collect();
        if !new.contains(&value) {
            changed.push(format!(
                "    - {name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
    }
    if !changed.is_empty() {
        let _ = writeln!(out, "  header changes:");
        for c in changed {
            let _ = writeln!(out, "{c}");
        }
    }
    if !decision.response_headers.is_empty() || decision.default_body.is_some() {
        let _ = writeln!(
            out,
            "  response: {}",
            describe_response(&decision.response_headers, decision.default_body.is_some())
        );
    }
    Ok(out)
}

fn describe_response(edits: &[HeaderEdit], default_body: bool) -> String {
    let mut parts: Vec<String> = edits
        .iter()
        .map(|e| match e {
            HeaderEdit::Set(n, vs) => format!(
                "set {n}: {}",
                vs.iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            HeaderEdit::Remove(n) => format!("remove {n}"),
        })
        .collect();
    if default_body {
        parts.push("default body when empty".into());
    }
    parts.join("; ")
}

/// A rule's actions in a few words each.
pub fn describe(a: &Actions, config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(answer) = &a.answer {
        out.push(format!("answer {}", answer.status.as_u16()));
    }
    if let Some(q) = a.queue {
        out.push(format!("queue = {}", config.queues[q].name));
    }
    if let Some(p) = a.priority {
        out.push(format!("priority = {p}"));
    }
    if let Some(b) = a.bypass {
        out.push(format!("bypass = {b}"));
    }
    if let Some(auth) = &a.auth {
        out.push(format!("auth via {}", auth.url));
    }
    let names = |v: &mut Vec<String>, what: &str, list: Vec<String>| {
        if !list.is_empty() {
            v.push(format!("{what} {}", list.join(", ")));
        }
    };
    names(
        &mut out,
        "set_headers",
        a.set_headers.iter().map(|(n, _)| n.to_string()).collect(),
    );
    names(
        &mut out,
        "add_headers",
        a.add_headers.iter().map(|(n, _)| n.to_string()).collect(),
    );
    names(
        &mut out,
        "remove_headers",
        a.remove_headers.iter().map(|n| n.to_string()).collect(),
    );
    match &a.path {
        Some(PathRewrite::Set(p)) => out.push(format!("path = {p}")),
        Some(PathRewrite::Regex(re, with)) => out.push(format!("path ~ s/{}/{with}/", re.as_str())),
        None => {}
    }
    if let Some(m) = &a.method {
        out.push(format!("method = {m}"));
    }
    if let Some(h) = &a.host {
        out.push(format!("host = {}", String::from_utf8_lossy(h.as_bytes())));
    }
    names(
        &mut out,
        "set_query",
        a.set_query
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect(),
    );
    names(&mut out, "remove_query", a.remove_query.clone());
    if !a.response_headers.is_empty() || a.default_body.is_some() {
        out.push(format!(
            "response: {}",
            describe_response(&a.response_headers, a.default_body.is_some())
        ));
    }
    if out.is_empty() {
        out.push("no action".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[[queues]]
name = "default"
backend = "http://127.0.0.1:9000"

[[rules]]
when = { path = "/forbidden" }
then = { status = 403, body = "forbidden\n" }
stop = true

[[rules]]
when = { header = { X-Priority = "high" } }
then = { priority = 1 }

[[rules]]
when = { path = { glob = "/reports/*" }, method = ["GET", "HEAD"] }
then = { priority = 80, set_headers = { X-Slow = "yes" } }
"#,
            "explain.toml",
        )
        .unwrap()
    }

    fn probe(method: &str, url: &str, headers: &[&str]) -> Probe {
        Probe {
            method: method.into(),
            url: url.into(),
            headers: headers.iter().map(|s| s.to_string()).collect(),
            remote_ip: None,
        }
    }

    #[test]
    fn shows_matches_and_result() {
        let out = explain(
            &config(),
            &probe(
                "GET",
                "http://app.example/reports/q1",
                &["X-Priority: high"],
            ),
        )
        .unwrap();
        assert!(
            out.contains("request: GET /reports/q1  (host app.example"),
            "{out}"
        );
        assert!(out.contains("1. rules[1] (line 11): priority = 1"), "{out}");
        assert!(
            out.contains("2. rules[2] (line 15): priority = 80, set_headers x-slow"),
            "{out}"
        );
        assert!(
            out.contains("queue:    default -> http://127.0.0.1:9000"),
            "{out}"
        );
        assert!(out.contains("priority: 80"), "{out}");
        assert!(out.contains("+ x-slow: yes"), "{out}");
    }

    #[test]
    fn shows_direct_answers() {
        let out = explain(&config(), &probe("GET", "/forbidden", &[])).unwrap();
        assert!(
            out.contains("1. rules[0] (line 6): answer 403  [stop]"),
            "{out}"
        );
        assert!(
            out.contains("answer directly: 403 Forbidden \"forbidden\\n\""),
            "{out}"
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(explain(&config(), &probe("G T", "/", &[])).is_err());
        assert!(explain(&config(), &probe("GET", "/", &["no-colon"])).is_err());
    }
}
