//! Quotas (`[[limits]]`) and flows.
//!
//! A limit counts requests by a key taken from the request (a header, a
//! query parameter, an address, the path…), optionally only for key values
//! matching `when`, optionally only on one queue. Each distinct value gets
//! its own counters: a concurrency cap (`max_concurrent`, a semaphore in
//! Redis shared by every worker) and/or a rate (`rate` + `burst`, GCRA in
//! Redis). Requests over a quota wait; they are not rejected.
//!
//! The set of quota keys a job needs is its *flow*. Jobs of one flow wait in
//! one sub-queue; the claim script walks flows rather than jobs, so a
//! thousand jobs blocked behind one full quota cost one step, and flows of
//! the same priority are served round-robin (ARCHITECTURE.md decision 5).
//!
//! Values from requests never go raw into Redis key names: they are
//! percent-escaped to `[A-Za-z0-9_.-]` (readable, injective), or hashed when
//! long.

use std::fmt::Write;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderName;

use crate::rules::{Pattern, RuleRequest};

/// Where a limit takes its key from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A request header's first value.
    Header(HeaderName),
    /// A query parameter's first value, decoded.
    Query(String),
    /// The TCP peer's address.
    RemoteIp,
    /// The client's address as told by a trusted proxy.
    RealIp,
    /// The path.
    Path,
    /// The method.
    Method,
    /// The Host, without port.
    Host,
}

impl KeySource {
    /// The key's value for `req`; None when the request has none (such a
    /// request is not counted by the limit).
    pub fn value(&self, req: &RuleRequest) -> Option<String> {
        match self {
            KeySource::Header(name) => req
                .headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            KeySource::Query(name) => req.query_values(name).into_iter().next(),
            KeySource::RemoteIp => req.remote_ip.map(|ip| ip.to_string()),
            KeySource::RealIp => req.real_ip.map(|ip| ip.to_string()),
            KeySource::Path => Some(req.path().to_string()),
            KeySource::Method => Some(req.method.to_string()),
            KeySource::Host => req.host(),
        }
    }

    /// How it is written in the configuration.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Header(h) => format!("header {h}"),
            KeySource::Query(q) => format!("query {q}"),
            KeySource::RemoteIp => "remote_ip".into(),
            KeySource::RealIp => "real_ip".into(),
            KeySource::Path => "path".into(),
            KeySource::Method => "method".into(),
            KeySource::Host => "host".into(),
        }
    }
}

/// A rate: `count` requests per `per`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
    /// Requests allowed at once after a quiet time.
    pub burst: NonZeroU32,
}

impl Rate {
    /// Parses `"10/s"`, `"600/min"`, `"1000/h"` (also `/sec`, `/second`,
    /// `/m`, `/minute`, `/hour`, `/d`, `/day`).
    pub fn parse(text: &str, burst: NonZeroU32) -> Result<Rate, String> {
        let bad =
            || format!("`{text}` is not a rate; write e.g. \"10/s\", \"600/min\" or \"1000/h\"");
        let (n, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let count = NonZeroU32::new(count)
            .ok_or_else(|| "a rate must allow at least 1 request".to_string())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per, burst })
    }

    /// Time between two requests at the sustained rate, in ms.
    pub fn interval_ms(&self) -> f64 {
        self.per.as_secs_f64() * 1000.0 / self.count.get() as f64
    }
}

/// One `[[limits]]` entry, compiled.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Name (`[A-Za-z0-9_.-]`), part of Redis keys and of `thrctl` output.
    pub name: String,
    /// Where the key comes from.
    pub by: KeySource,
    /// Only key values matching this are counted.
    pub when: Option<Pattern>,
    /// Only requests of this queue (index) are counted.
    pub queue: Option<usize>,
    /// Requests of one key running at once, across every worker.
    pub max_concurrent: Option<NonZeroU32>,
    /// Requests of one key started per period.
    pub rate: Option<Rate>,
    /// Requests of one key waiting at once; beyond it, 503.
    pub max_waiting: Option<NonZeroU32>,
}

/// The quota of one limit for one key value.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaKey {
    /// `LIMIT=escaped-value`: names the quota's Redis keys.
    pub token: String,
    /// 0 when unlimited.
    pub max_concurrent: u32,
    /// 0 when no rate.
    pub interval_ms: f64,
    /// Burst of the rate.
    pub burst: u32,
    /// 0 when unlimited.
    pub max_waiting: u32,
}

/// The quotas a job needs: its flow.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Flow {
    /// The quota keys, in limit order.
    pub quotas: Vec<QuotaKey>,
}

/// Flow id of jobs subject to no quota.
pub const FREE_FLOW: &str = "-";
/// Longest escaped value kept readable; longer ones are hashed.
const MAX_READABLE: usize = 96;

impl Flow {
    /// The quotas `limits` impose on `req` bound for queue `queue`.
    pub fn of(limits: &[Limit], queue: usize, req: &RuleRequest) -> Flow {
        let quotas = limits
            .iter()
            .filter(|l| l.queue.is_none_or(|q| q == queue))
            .filter_map(|l| {
                let value = l.by.value(req)?;
                if let Some(when) = &l.when {
                    let ok = match (&l.by, value.parse::<IpAddr>()) {
                        (KeySource::RemoteIp | KeySource::RealIp, Ok(ip)) => when.matches_ip(ip),
                        _ => when.matches(&value),
                    };
                    if !ok {
                        return None;
                    }
                }
                Some(QuotaKey {
                    token: format!("{}={}", l.name, escape_value(&value)),
                    max_concurrent: l.max_concurrent.map_or(0, NonZeroU32::get),
                    interval_ms: l.rate.map_or(0.0, |r| r.interval_ms()),
                    burst: l.rate.map_or(0, |r| r.burst.get()),
                    max_waiting: l.max_waiting.map_or(0, NonZeroU32::get),
                })
            })
            .collect();
        Flow { quotas }
    }

    /// The flow's id: its tokens joined by `&` (tokens hold no `&`).
    pub fn id(&self) -> String {
        if self.quotas.is_empty() {
            return FREE_FLOW.to_string();
        }
        let joined: Vec<&str> = self.quotas.iter().map(|q| q.token.as_str()).collect();
        joined.join("&")
    }
}

/// Escapes a key value for a Redis key name: bytes outside
/// `[A-Za-z0-9_.-]` become `%XX`, so `a}:b{` cannot reach a hash tag or a
/// separator and two values never share an escape. Values that escape to
/// more than 96 bytes become `#` and a SHA-1 of the value.
pub fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.len() > MAX_READABLE {
        return format!("#{}", sha1_smol::Sha1::from(value.as_bytes()).digest());
    }
    out
}

/// GCRA, the rate algorithm the claim script runs in Lua (the same
/// arithmetic, mirrored here for tests and tools). `tat` is the theoretical
/// arrival time of the next request (ms); returns the new `tat` when a
/// request at `now` is allowed, or how long to wait.
pub fn gcra(tat: Option<f64>, now: f64, interval_ms: f64, burst: u32) -> Result<f64, f64> {
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + interval_ms;
    let allowance = interval_ms * burst as f64;
    if new_tat - now <= allowance {
        Ok(new_tat)
    } else {
        Err(new_tat - now - allowance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rates() {
        let one = NonZeroU32::new(1).unwrap();
        assert_eq!(Rate::parse("20/s", one).unwrap().interval_ms(), 50.0);
        assert_eq!(Rate::parse("600/min", one).unwrap().interval_ms(), 100.0);
        assert_eq!(Rate::parse("2/h", one).unwrap().interval_ms(), 1_800_000.0);
        assert!(Rate::parse("0/s", one).is_err());
        assert!(Rate::parse("ten/s", one).is_err());
        assert!(Rate::parse("10/fortnight", one).is_err());
        assert!(Rate::parse("10", one).is_err());
    }

    #[test]
    fn escaping_is_safe_and_injective() {
        assert_eq!(escape_value("alice"), "alice");
        assert_eq!(escape_value("a}:b{"), "a%7D%3Ab%7B");
        assert_ne!(escape_value("a b"), escape_value("a+b"));
        assert_ne!(escape_value("%20"), escape_value(" "));
        let long = "x".repeat(200);
        assert!(escape_value(&long).starts_with('#'));
        assert_eq!(escape_value(&long).len(), 41);
    }

    proptest! {
        #[test]
        fn escaped_values_are_key_safe(v in ".{0,40}") {
            let e = escape_value(&v);
            prop_assert!(e.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.%#".contains(&b)));
        }

        #[test]
        fn escaping_never_collides(a in ".{0,20}", b in ".{0,20}") {
            prop_assume!(a != b);
            prop_assert_ne!(escape_value(&a), escape_value(&b));
        }

        /// Over any run of requests, GCRA admits at most `burst` plus one per
        /// interval elapsed, and admits everything spaced by the interval.
        #[test]
        fn gcra_bounds_admissions(gaps in proptest::collection::vec(0u32..200, 1..200), interval in 1u32..100, burst in 1u32..10) {
            let interval = interval as f64;
            let mut tat = None;
            let mut now = 0.0;
            let mut admitted = Vec::new();
            for gap in gaps {
                now += gap as f64;
                if let Ok(t) = gcra(tat, now, interval, burst) {
                    tat = Some(t);
                    admitted.push(now);
                }
            }
            for (i, start) in admitted.iter().enumerate() {
                for (j, end) in admitted.iter().enumerate().skip(i) {
                    let n = (j - i + 1) as f64;
                    prop_assert!(n <= burst as f64 + (end - start) / interval + 1e-9,
                        "{n} admitted in {} ms", end - start);
                }
            }
        }

        #[test]
        fn gcra_admits_requests_at_the_rate(n in 1usize..100, interval in 1u32..100, burst in 1u32..10) {
            let interval = interval as f64;
            let mut tat = None;
            for i in 0..n {
                let r = gcra(tat, i as f64 * interval, interval, burst);
                prop_assert!(r.is_ok());
                tat = r.ok();
            }
        }

        #[test]
        fn gcra_admits_a_burst_at_once(interval in 1u32..1000, burst in 1u32..20) {
            let mut tat = None;
            for _ in 0..burst {
                let r = gcra(tat, 0.0, interval as f64, burst);
                prop_assert!(r.is_ok());
                tat = r.ok();
            }
            let over = gcra(tat, 0.0, interval as f64, burst);
            prop_assert!(over.is_err());
            prop_assert!((over.unwrap_err() - interval as f64).abs() < 1e-9);
        }
    }
}
