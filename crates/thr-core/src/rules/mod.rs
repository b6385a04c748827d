//! Operators' rules: match a request, then steer it.
//!
//! A rule has criteria (`when`: all must hold; none means "every request")
//! and actions (`then`). Rules are evaluated in file order against the
//! request *as rewritten so far*; every matching rule applies, later actions
//! overriding earlier ones, until a rule with `stop = true` matches. The
//! result is a [`Decision`]: which queue and priority, whether to answer
//! directly, bypass the queue, ask an auth service first, and how to edit
//! the response. Patterns are compiled when the configuration loads, so
//! evaluation is string comparisons and pre-built automata only.

mod pattern;
mod request;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

pub use pattern::{Pattern, Subject};
pub use request::RuleRequest;

use crate::priority;

/// One `[[rules]]` entry, compiled.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `name`, or `rules[N]` when unnamed: what logs and `explain` show.
    pub name: String,
    /// Line of the rule in the configuration file, when known.
    pub line: Option<usize>,
    /// What must hold.
    pub when: Criteria,
    /// What to do.
    pub then: Actions,
    /// Stop evaluating after this rule when it matches.
    pub stop: bool,
}

/// A rule's `when`: every present criterion must hold.
#[derive(Debug, Clone, Default)]
pub struct Criteria {
    /// The request path (without query), as received.
    pub path: Option<Pattern>,
    /// The method.
    pub method: Option<Pattern>,
    /// The Host, without port, lower case.
    pub host: Option<Pattern>,
    /// The TCP peer's address.
    pub remote_ip: Option<Pattern>,
    /// The client's address as told by a trusted proxy, else the peer's.
    pub real_ip: Option<Pattern>,
    /// Header name → pattern on its value (any value, when repeated).
    pub headers: Vec<(HeaderName, Pattern)>,
    /// Query parameter name → pattern on its decoded value(s).
    pub query: Vec<(String, Pattern)>,
}

/// A direct answer, given without queueing.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
    /// Response header fields.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// How a rule rewrites the path.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Replace the path (the query stays).
    Set(String),
    /// Replace what a regex matches in the path (`$1` refers to groups).
    Regex(Box<Regex>, String),
}

/// An external authentication check, run before the request is queued.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthSpec {
    /// `http://host:port/path` of the auth service.
    pub url: http::Uri,
    /// Request fields sent to the service (and forming the cache key).
    pub forward_headers: Vec<HeaderName>,
    /// Fields of a 2xx answer copied onto the request.
    pub copy_headers: Vec<HeaderName>,
    /// How long an answer is reused for the same forwarded values (0: never).
    pub cache: Duration,
    /// How long to wait for the service before answering 503.
    pub timeout: Duration,
}

/// One edit of response header fields.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderEdit {
    /// Replace every value of the field.
    Set(HeaderName, Vec<HeaderValue>),
    /// Remove the field.
    Remove(HeaderName),
}

/// A rule's `then`.
#[derive(Debug, Clone, Default)]
pub struct Actions {
    /// Index of the queue in the configuration.
    pub queue: Option<usize>,
    /// 1 (most urgent) … 99.
    pub priority: Option<u8>,
    /// Forward straight to the backend, skipping the queue.
    pub bypass: Option<bool>,
    /// Answer directly.
    pub answer: Option<Answer>,
    /// Replace these request fields.
    pub set_headers: Vec<(HeaderName, Vec<HeaderValue>)>,
    /// Append these request fields.
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    /// Remove these request fields.
    pub remove_headers: Vec<HeaderName>,
    /// Rewrite the path.
    pub path: Option<PathRewrite>,
    /// Rewrite the method.
    pub method: Option<Method>,
    /// Rewrite the Host field.
    pub host: Option<HeaderValue>,
    /// Set these query parameters (replacing every occurrence).
    pub set_query: Vec<(String, String)>,
    /// Remove these query parameters.
    pub remove_query: Vec<String>,
    /// Edit the response's fields, in order.
    pub response_headers: Vec<HeaderEdit>,
    /// Body for an empty backend reply.
    pub default_body: Option<Bytes>,
    /// Check with an auth service first.
    pub auth: Option<Arc<AuthSpec>>,
    /// How long the client waits for the response head (long-polls,
    /// reports), instead of `[http2redis] reply_timeout`.
    pub reply_timeout: Option<std::time::Duration>,
}

/// What the rules decided for one request.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Index of the queue.
    pub queue: usize,
    /// Priority on that queue.
    pub priority: u8,
    /// Forward without queueing.
    pub bypass: bool,
    /// Answer directly instead.
    pub answer: Option<Answer>,
    /// Ask this service first.
    pub auth: Option<Arc<AuthSpec>>,
    /// Response header edits, in order.
    pub response_headers: Vec<HeaderEdit>,
    /// Body for an empty reply.
    pub default_body: Option<Bytes>,
    /// Indices of the rules that matched, in order.
    pub matched: Vec<usize>,
    /// The wait for the response head a rule set (None: the default).
    pub reply_timeout: Option<std::time::Duration>,
}

impl Default for Decision {
    fn default() -> Self {
        Decision {
            queue: 0,
            priority: priority::DEFAULT,
            bypass: false,
            answer: None,
            auth: None,
            response_headers: Vec::new(),
            default_body: None,
            matched: Vec::new(),
            reply_timeout: None,
        }
    }
}

/// Values derived from the request once per evaluation (lower-cased host,
/// decoded query) instead of once per rule; cleared when a rule rewrites.
#[derive(Debug, Default)]
struct Derived {
    host: Option<Option<String>>,
    query: Option<Vec<(String, String)>>,
}

impl Derived {
    fn host(&mut self, req: &RuleRequest) -> Option<&str> {
        self.host.get_or_insert_with(|| req.host()).as_deref()
    }

    fn query(&mut self, req: &RuleRequest) -> &[(String, String)] {
        self.query.get_or_insert_with(|| req.query_pairs())
    }
}

impl Criteria {
    /// True when every criterion holds for `req`.
    pub fn matches(&self, req: &RuleRequest) -> bool {
        self.matches_with(req, &mut Derived::default())
    }

    fn matches_with(&self, req: &RuleRequest, derived: &mut Derived) -> bool {
        if let Some(p) = &self.method
            && !p.matches(req.method.as_str())
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches(req.path())
        {
            return false;
        }
        if let Some(p) = &self.host {
            let ok = match derived.host(req) {
                Some(h) => p.matches(h),
                None => p.matches_missing(),
            };
            if !ok {
                return false;
            }
        }
        if !ip_matches(&self.remote_ip, req.remote_ip) || !ip_matches(&self.real_ip, req.real_ip) {
            return false;
        }
        for (name, p) in &self.headers {
            let mut values = req.headers.get_all(name).iter().peekable();
            let ok = if values.peek().is_none() {
                p.matches_missing()
            } else {
                values.any(|v| p.matches(&String::from_utf8_lossy(v.as_bytes())))
            };
            if !ok {
                return false;
            }
        }
        if !self.query.is_empty() {
            let pairs = derived.query(req);
            for (name, p) in &self.query {
                let mut values = pairs.iter().filter(|(k, _)| k == name).peekable();
                let ok = if values.peek().is_none() {
                    p.matches_missing()
                } else {
                    values.any(|(_, v)| p.matches(v))
                };
                if !ok {
                    return false;
                }
            }
        }
        true
    }
}

fn ip_matches(pattern: &Option<Pattern>, ip: Option<IpAddr>) -> bool {
    match (pattern, ip) {
        (None, _) => true,
        (Some(p), Some(ip)) => p.matches_ip(ip),
        // Unix-socket clients have no address.
        (Some(p), None) => p.matches_missing(),
    }
}

impl Actions {
    /// True when applying these actions may change what criteria see.
    fn rewrites_request(&self) -> bool {
        !self.set_headers.is_empty()
            || !self.add_headers.is_empty()
            || !self.remove_headers.is_empty()
            || self.host.is_some()
            || self.path.is_some()
            || !self.set_query.is_empty()
            || !self.remove_query.is_empty()
    }

    /// Applies this rule's rewrites to `req` and its routing to `decision`.
    fn apply(&self, req: &mut RuleRequest, decision: &mut Decision) {
        if let Some(q) = self.queue {
            decision.queue = q;
        }
        if let Some(p) = self.priority {
            decision.priority = p;
        }
        if let Some(b) = self.bypass {
            decision.bypass = b;
        }
        if let Some(a) = &self.answer {
            decision.answer = Some(a.clone());
        }
        if let Some(a) = &self.auth {
            decision.auth = Some(a.clone());
        }
        if let Some(b) = &self.default_body {
            decision.default_body = Some(b.clone());
        }
        if let Some(t) = self.reply_timeout {
            decision.reply_timeout = Some(t);
        }
        decision
            .response_headers
            .extend(self.response_headers.iter().cloned());

        for name in &self.remove_headers {
            req.headers.remove(name);
        }
        for (name, values) in &self.set_headers {
            set_field(&mut req.headers, name, values);
        }
        for (name, value) in &self.add_headers {
            req.headers.append(name.clone(), value.clone());
        }
        if let Some(host) = &self.host {
            req.headers.insert(http::header::HOST, host.clone());
        }
        if let Some(m) = &self.method {
            req.method = m.clone();
        }
        if let Some(rewrite) = &self.path {
            let path = match rewrite {
                PathRewrite::Set(p) => p.clone(),
                PathRewrite::Regex(re, with) => re.replace(req.path(), with.as_str()).into_owned(),
            };
            req.set_path(&path);
        }
        if !self.remove_query.is_empty() || !self.set_query.is_empty() {
            req.edit_query(&self.remove_query, &self.set_query);
        }
    }
}

/// Replaces every value of `name` with `values`.
pub fn set_field(headers: &mut HeaderMap, name: &HeaderName, values: &[HeaderValue]) {
    headers.remove(name);
    for v in values {
        headers.append(name.clone(), v.clone());
    }
}

/// Applies response header edits in order.
pub fn edit_response_headers(headers: &mut HeaderMap, edits: &[HeaderEdit]) {
    for edit in edits {
        match edit {
            HeaderEdit::Set(name, values) => set_field(headers, name, values),
            HeaderEdit::Remove(name) => {
                headers.remove(name);
            }
        }
    }
}

/// Evaluates `rules` in order on `req`, rewriting it, and returns the decision.
pub fn evaluate(rules: &[Rule], req: &mut RuleRequest) -> Decision {
    let mut decision = Decision::default();
    let mut derived = Derived::default();
    for (i, rule) in rules.iter().enumerate() {
        if !rule.when.matches_with(req, &mut derived) {
            continue;
        }
        decision.matched.push(i);
        rule.then.apply(req, &mut decision);
        if rule.then.rewrites_request() {
            derived = Derived::default();
        }
        if rule.stop {
            break;
        }
    }
    decision
}

#[cfg(test)]
mod tests;
