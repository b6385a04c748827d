//! The request as the rules see and rewrite it.

use std::net::IpAddr;

use http::{HeaderMap, Method};

/// A request under evaluation: method, raw target, fields and addresses.
#[derive(Debug, Clone)]
pub struct RuleRequest {
    /// Method.
    pub method: Method,
    /// Raw target: path and query, as received (or rewritten).
    pub target: String,
    /// Header fields.
    pub headers: HeaderMap,
    /// The TCP peer's address (None on a unix socket).
    pub remote_ip: Option<IpAddr>,
    /// The client's address as told by a trusted proxy, else the peer's.
    pub real_ip: Option<IpAddr>,
}

impl RuleRequest {
    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The raw query, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The Host field without port, lower case.
    pub fn host(&self) -> Option<String> {
        let host = self.headers.get(http::header::HOST)?.to_str().ok()?;
        let host = match host.rsplit_once(':') {
            // Keep IPv6 literals whole: "[::1]:8080" → "[::1]".
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
            _ => host,
        };
        Some(host.to_ascii_lowercase())
    }

    /// Decoded values of query parameter `name` (`+` is a space).
    pub fn query_values(&self, name: &str) -> Vec<String> {
        self.query_pairs()
            .into_iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }

    /// Every query parameter, decoded, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query()
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Replaces the path, keeping the query.
    pub fn set_path(&mut self, path: &str) {
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        self.target = match self.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
    }

    /// Removes and sets query parameters; other pairs keep their raw bytes
    /// and order.
    pub fn edit_query(&mut self, remove: &[String], set: &[(String, String)]) {
        let query = self.query().unwrap_or("");
        let mut pairs: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| {
                let raw_name = pair.split_once('=').map_or(*pair, |(n, _)| n);
                let name: String = form_urlencoded::parse(raw_name.as_bytes())
                    .next()
                    .map(|(n, _)| n.into_owned())
                    .unwrap_or_default();
                !remove.contains(&name) && !set.iter().any(|(s, _)| *s == name)
            })
            .map(str::to_string)
            .collect();
        for (name, value) in set {
            let encode =
                |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            pairs.push(format!("{}={}", encode(name), encode(value)));
        }
        let path = self.path().to_string();
        self.target = if pairs.is_empty() {
            path
        } else {
            format!("{path}?{}", pairs.join("&"))
        };
    }
}
