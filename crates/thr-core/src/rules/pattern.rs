//! Patterns: what a criterion compares a request's value with.
//!
//! In TOML a pattern is a string (exact match), an array (any of), or a
//! table with one key: `glob`, `regex`, `prefix`, `not` (another pattern),
//! `cidr` (for IP addresses) or `absent = true` (for headers and query
//! parameters that must be missing). Patterns are compiled once, when the
//! configuration is loaded.

use std::net::IpAddr;

use globset::{GlobBuilder, GlobMatcher};
use ipnet::IpNet;
use regex::{Regex, RegexBuilder};

/// What a pattern is matched against; it decides what is allowed and how
/// text is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A URL path: in globs, `*` stays within a segment and `**` crosses them.
    Path,
    /// A method, exact as written.
    Method,
    /// A host name: compared without case.
    Host,
    /// An IP address: exact addresses and `cidr` ranges.
    Ip,
    /// A header or query parameter value, which may be missing.
    Field,
}

/// A compiled pattern.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// Equal to this text.
    Exact(String),
    /// Equal to this address.
    Ip(IpAddr),
    /// Starting with this text.
    Prefix(String),
    /// Matching this glob.
    Glob(Box<GlobMatcher>),
    /// Matching this regular expression (anywhere, unless anchored).
    Regex(Box<Regex>),
    /// Inside this address range.
    Cidr(IpNet),
    /// Matching any of these.
    Any(Vec<Pattern>),
    /// Not matching this.
    Not(Box<Pattern>),
    /// The header or parameter is missing.
    Absent,
}

impl Pattern {
    /// Compiles a TOML value for `subject`; the error says what is wrong.
    pub fn compile(value: &toml::Value, subject: Subject) -> Result<Pattern, String> {
        match value {
            toml::Value::String(s) => Ok(Pattern::exact(s, subject)),
            toml::Value::Array(items) => {
                if items.is_empty() {
                    return Err(
                        "an empty list matches nothing; remove the criterion instead".into(),
                    );
                }
                items
                    .iter()
                    .map(|v| Pattern::compile(v, subject))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Pattern::Any)
            }
            toml::Value::Table(t) => {
                let mut keys = t.iter();
                let (Some((key, inner)), None) = (keys.next(), keys.next()) else {
                    return Err(format!(
                        "a pattern table has exactly one key ({}), found {}",
                        KINDS,
                        t.len()
                    ));
                };
                Pattern::compile_kind(key, inner, subject)
            }
            other => Err(format!(
                "expected a pattern (a string, a list, or a table with one of {KINDS}), found {}",
                other.type_str()
            )),
        }
    }

    fn exact(s: &str, subject: Subject) -> Pattern {
        match subject {
            Subject::Ip => match s.parse::<IpAddr>() {
                Ok(ip) => Pattern::Ip(ip),
                Err(_) => Pattern::Exact(s.to_string()),
            },
            Subject::Host => Pattern::Exact(s.to_ascii_lowercase()),
            _ => Pattern::Exact(s.to_string()),
        }
    }

    fn compile_kind(key: &str, inner: &toml::Value, subject: Subject) -> Result<Pattern, String> {
        let text = || {
            inner
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{key}` takes a string"))
        };
        match key {
            "prefix" => {
                let p = text()?;
                Ok(Pattern::Prefix(if subject == Subject::Host {
                    p.to_ascii_lowercase()
                } else {
                    p
                }))
            }
            "glob" => {
                let p = text()?;
                let glob = GlobBuilder::new(&p)
                    .literal_separator(subject == Subject::Path)
                    .case_insensitive(subject == Subject::Host)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| format!("invalid glob `{p}`: {}", e.kind()))?;
                Ok(Pattern::Glob(Box::new(glob.compile_matcher())))
            }
            "regex" => {
                let p = text()?;
                let re = RegexBuilder::new(&p)
                    .case_insensitive(subject == Subject::Host)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("invalid regex `{p}`: {}", first_line(&e.to_string())))?;
                Ok(Pattern::Regex(Box::new(re)))
            }
            "cidr" => {
                let p = text()?;
                if subject != Subject::Ip && subject != Subject::Field {
                    return Err(
                        "`cidr` only applies to IP addresses (remote_ip, real_ip, headers)".into(),
                    );
                }
                let net = p
                    .parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{p}` is not an address range such as \"10.0.0.0/8\""))?;
                Ok(Pattern::Cidr(net))
            }
            "not" => Ok(Pattern::Not(Box::new(Pattern::compile(inner, subject)?))),
            "absent" => {
                if subject != Subject::Field {
                    return Err("`absent` only applies to `header` and `query` criteria".into());
                }
                match inner.as_bool() {
                    Some(true) => Ok(Pattern::Absent),
                    Some(false) => Ok(Pattern::Not(Box::new(Pattern::Absent))),
                    None => Err("`absent` takes true or false".into()),
                }
            }
            other => Err(format!(
                "unknown pattern kind `{other}`; use one of {KINDS}"
            )),
        }
    }

    /// Does `value` match? (`Absent` never matches a present value.)
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(e) => e == value,
            Pattern::Ip(ip) => value.parse::<IpAddr>().is_ok_and(|v| v == *ip),
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Glob(g) => g.is_match(value),
            Pattern::Regex(r) => r.is_match(value),
            Pattern::Cidr(net) => value
                .trim()
                .parse::<IpAddr>()
                .is_ok_and(|ip| net.contains(&ip)),
            Pattern::Any(items) => items.iter().any(|p| p.matches(value)),
            Pattern::Not(p) => !p.matches(value),
            Pattern::Absent => false,
        }
    }

    /// Does this address match? Exact addresses and ranges compare as
    /// addresses; text patterns see the address written out.
    pub fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            Pattern::Ip(p) => *p == ip,
            Pattern::Cidr(net) => net.contains(&ip),
            Pattern::Any(items) => items.iter().any(|p| p.matches_ip(ip)),
            Pattern::Not(p) => !p.matches_ip(ip),
            Pattern::Absent => false,
            other => other.matches(&ip.to_string()),
        }
    }

    /// Does a missing value match? Only `absent = true` (possibly inside a
    /// list) does; `not` of anything else does not, so `{ not = "x" }`
    /// requires the header to be there.
    pub fn matches_missing(&self) -> bool {
        match self {
            Pattern::Absent => true,
            Pattern::Any(items) => items.iter().any(Pattern::matches_missing),
            _ => false,
        }
    }
}

const KINDS: &str = "`glob`, `regex`, `prefix`, `not`, `cidr`, `absent`";

fn first_line(s: &str) -> String {
    s.lines().last().unwrap_or(s).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(toml_value: &str, subject: Subject) -> Pattern {
        let v: toml::Table = toml::from_str(&format!("v = {toml_value}")).unwrap();
        Pattern::compile(&v["v"], subject).unwrap()
    }

    fn err(toml_value: &str, subject: Subject) -> String {
        let v: toml::Table = toml::from_str(&format!("v = {toml_value}")).unwrap();
        Pattern::compile(&v["v"], subject).unwrap_err()
    }

    #[test]
    fn exact_list_prefix() {
        assert!(p(r#""/a""#, Subject::Path).matches("/a"));
        assert!(!p(r#""/a""#, Subject::Path).matches("/ab"));
        let list = p(r#"["GET", "HEAD"]"#, Subject::Method);
        assert!(list.matches("HEAD") && !list.matches("POST") && !list.matches("get"));
        assert!(p(r#"{ prefix = "/api/" }"#, Subject::Path).matches("/api/v1"));
    }

    #[test]
    fn path_globs_keep_segments_unless_double_star() {
        let one = p(r#"{ glob = "/reports/*" }"#, Subject::Path);
        assert!(one.matches("/reports/q1"));
        assert!(!one.matches("/reports/2024/q1"));
        let deep = p(r#"{ glob = "/reports/**" }"#, Subject::Path);
        assert!(deep.matches("/reports/2024/q1"));
        // Elsewhere `*` is just "anything".
        assert!(p(r#"{ glob = "Mozilla*" }"#, Subject::Field).matches("Mozilla/5.0 (X11)"));
    }

    #[test]
    fn hosts_ignore_case() {
        assert!(p(r#""API.Example.com""#, Subject::Host).matches("api.example.com"));
        assert!(p(r#"{ glob = "*.EXAMPLE.com" }"#, Subject::Host).matches("a.example.com"));
    }

    #[test]
    fn regex_and_negation() {
        let r = p(r#"{ regex = "^/v[0-9]+/" }"#, Subject::Path);
        assert!(r.matches("/v2/x") && !r.matches("/x/v2/"));
        let n = p(r#"{ not = { prefix = "/static" } }"#, Subject::Path);
        assert!(n.matches("/app") && !n.matches("/static/a.css"));
        let nl = p(r#"{ not = ["a", "b"] }"#, Subject::Field);
        assert!(nl.matches("c") && !nl.matches("b"));
    }

    #[test]
    fn ips_and_ranges() {
        let c = p(r#"{ cidr = "10.0.0.0/8" }"#, Subject::Ip);
        assert!(c.matches_ip("10.2.3.4".parse().unwrap()));
        assert!(!c.matches_ip("11.0.0.1".parse().unwrap()));
        let v6 = p(r#"{ cidr = "fd00::/8" }"#, Subject::Ip);
        assert!(v6.matches_ip("fd12::1".parse().unwrap()));
        let exact = p(r#"["127.0.0.1", "::1"]"#, Subject::Ip);
        assert!(exact.matches_ip("::1".parse().unwrap()));
        assert!(
            p(r#"{ not = { cidr = "10.0.0.0/8" } }"#, Subject::Ip)
                .matches_ip("8.8.8.8".parse().unwrap())
        );
        // A header can hold an address too.
        assert!(p(r#"{ cidr = "192.168.0.0/16" }"#, Subject::Field).matches("192.168.1.9"));
    }

    #[test]
    fn missing_values_match_only_absent() {
        assert!(p("{ absent = true }", Subject::Field).matches_missing());
        assert!(!p("{ absent = true }", Subject::Field).matches("x"));
        assert!(!p(r#"{ not = "x" }"#, Subject::Field).matches_missing());
        assert!(!p("{ absent = false }", Subject::Field).matches_missing());
        assert!(p("{ absent = false }", Subject::Field).matches("anything"));
        assert!(p(r#"["x", { absent = true }]"#, Subject::Field).matches_missing());
    }

    #[test]
    fn bad_patterns_say_why() {
        assert!(err(r#"{ regex = "(" }"#, Subject::Path).contains("invalid regex"));
        assert!(err(r#"{ glob = "[" }"#, Subject::Path).contains("invalid glob"));
        assert!(err(r#"{ cidr = "10.0.0.0/99" }"#, Subject::Ip).contains("not an address range"));
        assert!(err(r#"{ cidr = "10.0.0.0/8" }"#, Subject::Path).contains("only applies"));
        assert!(err("{ absent = true }", Subject::Path).contains("only applies"));
        assert!(err(r#"{ glob = "a", regex = "b" }"#, Subject::Path).contains("exactly one key"));
        assert!(err(r#"{ globe = "a" }"#, Subject::Path).contains("unknown pattern kind"));
        assert!(err("[]", Subject::Path).contains("empty list"));
        assert!(err("42", Subject::Path).contains("found integer"));
    }

    proptest! {
        #[test]
        fn exact_patterns_match_exactly_themselves(s in "[ -~]{0,30}", t in "[ -~]{0,30}") {
            let v = toml::Value::String(s.clone());
            let pat = Pattern::compile(&v, Subject::Field).unwrap();
            prop_assert!(pat.matches(&s));
            prop_assert_eq!(pat.matches(&t), s == t);
            let not = Pattern::Not(Box::new(pat));
            prop_assert_eq!(not.matches(&t), s != t);
        }

        #[test]
        fn prefix_is_starts_with(s in "[a-z/]{0,10}", t in "[a-z/]{0,20}") {
            let mut table = toml::Table::new();
            table.insert("prefix".into(), toml::Value::String(s.clone()));
            let pat = Pattern::compile(&toml::Value::Table(table), Subject::Path).unwrap();
            prop_assert_eq!(pat.matches(&t), t.starts_with(&s));
        }

        #[test]
        fn escaped_literals_compile_and_match_as_regex_and_glob(s in "[ -~]{1,20}") {
            let mut table = toml::Table::new();
            table.insert("regex".into(), toml::Value::String(format!("^{}$", regex::escape(&s))));
            let re = Pattern::compile(&toml::Value::Table(table), Subject::Field).unwrap();
            prop_assert!(re.matches(&s));
            let mut table = toml::Table::new();
            // globset::escape leaves `\\` alone; with backslash escapes on, it needs escaping too.
            table.insert("glob".into(), toml::Value::String(globset::escape(&s).replace('\\', "\\\\")));
            let glob = Pattern::compile(&toml::Value::Table(table), Subject::Field).unwrap();
            prop_assert!(glob.matches(&s));
        }

        /// Fuzz: any pattern text of any kind either compiles or is refused
        /// with a message, and matching anything never panics.
        #[test]
        fn arbitrary_patterns_never_panic(kind in 0usize..7, text in ".{0,24}", values in proptest::collection::vec(".{0,40}", 0..4)) {
            let kinds = ["glob", "regex", "prefix", "cidr", "absent", "not", "exact"];
            let value = match kinds[kind] {
                "exact" => toml::Value::String(text.clone()),
                "absent" => toml::Value::Boolean(text.len() % 2 == 0),
                "not" => {
                    let mut inner = toml::Table::new();
                    inner.insert("regex".into(), toml::Value::String(text.clone()));
                    let mut t = toml::Table::new();
                    t.insert("not".into(), toml::Value::Table(inner));
                    toml::Value::Table(t)
                }
                k => {
                    let mut t = toml::Table::new();
                    t.insert(k.into(), toml::Value::String(text.clone()));
                    toml::Value::Table(t)
                }
            };
            for subject in [Subject::Path, Subject::Method, Subject::Host, Subject::Ip, Subject::Field] {
                if let Ok(p) = Pattern::compile(&value, subject) {
                    for v in &values {
                        let _ = p.matches(v);
                        let _ = p.matches_missing();
                        if let Ok(ip) = v.parse::<IpAddr>() {
                            let _ = p.matches_ip(ip);
                        }
                    }
                }
            }
        }

        #[test]
        fn cidr_contains_its_own_network(a in any::<u8>(), b in any::<u8>(), len in 8u8..=32) {
            let ip = std::net::Ipv4Addr::new(10, a, b, 1);
            let mut table = toml::Table::new();
            table.insert("cidr".into(), toml::Value::String(format!("{ip}/{len}")));
            let pat = Pattern::compile(&toml::Value::Table(table), Subject::Ip).unwrap();
            prop_assert!(pat.matches_ip(IpAddr::V4(ip)));
        }
    }
}
