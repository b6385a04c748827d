//! Proxy headers on the way in: hop-by-hop fields removed (RFC 9110
//! §7.6.1), X-Forwarded-For/-Proto/-Host added, X-Request-Id kept or created
//! (each can be turned off: `[http2redis] add_headers`), X-Request-Start
//! added for APM agents.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use thr_core::config::AddedHeaders;
use thr_core::headers::strip_hop_by_hop;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `X-Request-Start`.
pub static X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");

/// `X-Real-IP`.
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The client's address for `real_ip` criteria and quotas: when the peer is
/// a trusted proxy, its X-Real-IP, else the first X-Forwarded-For hop; else
/// the peer itself. Headers from untrusted peers are ignored (anyone can
/// write them). A unix-socket peer (`None`) is a local process, typically
/// a proxy in front of thr, and is trusted.
pub fn real_ip(headers: &HeaderMap, peer: Option<IpAddr>, trusted: &[IpNet]) -> Option<IpAddr> {
    let trusted_peer = peer.is_none_or(|ip| trusted.iter().any(|net| net.contains(&ip)));
    if trusted_peer {
        let told = headers
            .get(&X_REAL_IP)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
            .or_else(|| {
                let first = headers
                    .get(&X_FORWARDED_FOR)?
                    .to_str()
                    .ok()?
                    .split(',')
                    .next()?;
                first.trim().parse().ok()
            });
        if told.is_some() {
            return told;
        }
    }
    peer
}

/// Longest client-supplied request id kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 200;

/// Rewrites `headers` for the backend and returns the request id to log.
///
/// `authority` is the request URI's authority (HTTP/2 carries the host
/// there, not in a Host field); `peer` is the TCP peer, absent on unix
/// sockets; `job_id` becomes the request id when the client sent none;
/// `received` is when the front received the request; `proto` is
/// `https` when it came over TLS that this front terminated; `added` says
/// which fields thr may add.
pub fn prepare(
    headers: &mut HeaderMap,
    authority: Option<&str>,
    peer: Option<IpAddr>,
    job_id: &str,
    received: SystemTime,
    proto: &'static str,
    added: AddedHeaders,
) -> String {
    strip_hop_by_hop(headers);

    // The New Relic / Scout / AppSignal form. A proxy before thr that set
    // it saw the request first: its time is kept.
    if added.request_start && !headers.contains_key(&X_REQUEST_START) {
        let micros = received
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let value = HeaderValue::from_str(&format!("t={micros}")).expect("digits");
        headers.insert(X_REQUEST_START.clone(), value);
    }

    if !headers.contains_key(HOST)
        && let Some(value) = authority.and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(HOST, value);
    }

    if let Some(ip) = peer.filter(|_| added.forwarded_for) {
        // Several X-Forwarded-For fields are one list; append our hop to it.
        let previous: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let mut list = previous.join(&b", "[..]);
        if !list.is_empty() {
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(ip.to_string().as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&list) {
            headers.insert(X_FORWARDED_FOR.clone(), value);
        }
    }
    if added.forwarded_proto && !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if added.forwarded_host
        && !headers.contains_key(&X_FORWARDED_HOST)
        && let Some(host) = headers.get(HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }

    let given = headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
        .map(str::to_string);
    match given {
        Some(id) => id,
        None => {
            if added.request_id {
                let value = HeaderValue::from_str(job_id).expect("job ids are hex");
                headers.insert(X_REQUEST_ID.clone(), value);
            }
            job_id.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn adds_forwarding_headers() {
        let mut h = map(&[
            ("host", "app.example"),
            ("connection", "close"),
            ("x-a", "1"),
        ]);
        let id = prepare(
            &mut h,
            None,
            Some("10.1.2.3".parse().unwrap()),
            "abc",
            UNIX_EPOCH + std::time::Duration::from_micros(1_795_000_000_123_456),
            "http",
            AddedHeaders::ALL,
        );
        assert_eq!(id, "abc");
        assert_eq!(h["x-request-start"], "t=1795000000123456");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-request-id"], "abc");
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn appends_to_existing_forwarded_for_and_keeps_request_id() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-request-id", "client-id-7"),
            ("x-request-start", "t=1"),
        ]);
        let id = prepare(
            &mut h,
            Some("h2.example"),
            Some("::1".parse().unwrap()),
            "abc",
            SystemTime::now(),
            "https",
            AddedHeaders::ALL,
        );
        assert_eq!(id, "client-id-7");
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, ::1");
        assert_eq!(h["host"], "h2.example");
        assert_eq!(h["x-forwarded-proto"], "https", "TLS this front ended");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            h["x-request-start"], "t=1",
            "an earlier proxy's time is kept"
        );
    }

    #[test]
    fn real_ip_believes_only_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = map(&[("x-forwarded-for", "203.0.113.9, 10.0.0.2")]);
        let proxy = Some("10.0.0.2".parse().unwrap());
        let stranger = Some("198.51.100.1".parse().unwrap());
        assert_eq!(
            real_ip(&h, proxy, &trusted),
            Some("203.0.113.9".parse().unwrap())
        );
        assert_eq!(real_ip(&h, stranger, &trusted), stranger);
        let h = map(&[
            ("x-real-ip", "203.0.113.5"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            real_ip(&h, proxy, &trusted),
            Some("203.0.113.5".parse().unwrap())
        );
        assert_eq!(real_ip(&map(&[]), proxy, &trusted), proxy);
        assert_eq!(
            real_ip(&map(&[("x-real-ip", "garbage")]), proxy, &trusted),
            proxy
        );
        // A unix-socket peer is local: trusted.
        assert_eq!(real_ip(&h, None, &[]), Some("203.0.113.5".parse().unwrap()));
    }

    #[test]
    fn unix_peers_add_no_forwarded_for() {
        let mut h = map(&[]);
        prepare(
            &mut h,
            None,
            None,
            "abc",
            SystemTime::now(),
            "http",
            AddedHeaders::ALL,
        );
        assert!(!h.contains_key("x-forwarded-for"));
    }

    #[test]
    fn each_added_field_can_be_turned_off() {
        let peer = Some("10.1.2.3".parse().unwrap());
        let none = AddedHeaders {
            forwarded_for: false,
            forwarded_proto: false,
            forwarded_host: false,
            request_id: false,
            request_start: false,
        };
        let mut h = map(&[("host", "app.example")]);
        let id = prepare(&mut h, None, peer, "abc", SystemTime::now(), "http", none);
        assert_eq!(id, "abc", "the request id is still logged");
        assert_eq!(h.len(), 1, "{h:?}");
        for (i, name) in AddedHeaders::NAMES.iter().enumerate() {
            let mut only = none;
            *[
                &mut only.forwarded_for,
                &mut only.forwarded_proto,
                &mut only.forwarded_host,
                &mut only.request_id,
                &mut only.request_start,
            ][i] = true;
            let mut h = map(&[("host", "app.example")]);
            prepare(&mut h, None, peer, "abc", SystemTime::now(), "http", only);
            assert_eq!(h.len(), 2, "{name}: {h:?}");
            assert!(h.contains_key(*name), "{name}: {h:?}");
        }
    }
}
