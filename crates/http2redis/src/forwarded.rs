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
    if is_trusted(peer, trusted) {
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

/// How a request reached the front.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// The TCP peer; None on a unix socket.
    pub peer: Option<IpAddr>,
    /// When the front received it (wall clock).
    pub received: SystemTime,
    /// It came over TLS that this front terminated.
    pub via_tls: bool,
    /// The peer is a proxy whose headers are believed ([`is_trusted`]).
    pub trusted: bool,
}

/// True when `peer` is a proxy whose headers are believed: a trusted
/// address, or a unix-socket peer (a local process).
pub fn is_trusted(peer: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    peer.is_none_or(|ip| trusted.iter().any(|net| net.contains(&ip)))
}

/// Longest client-supplied request id kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 200;

/// Rewrites `headers` for the backend and returns the request id to log.
///
/// `authority` is the request URI's authority (HTTP/2 carries the host
/// there, not in a Host field); `job_id` becomes the request id when the
/// client sent none; `arrival` is how the request reached the front;
/// `added` says which fields thr may add.
pub fn prepare(
    headers: &mut HeaderMap,
    authority: Option<&str>,
    job_id: &str,
    arrival: &Arrival,
    added: AddedHeaders,
) -> String {
    let Arrival {
        peer,
        received,
        via_tls,
        trusted,
    } = *arrival;
    strip_hop_by_hop(headers);

    // The New Relic / Scout / AppSignal form. A trusted proxy before thr
    // that set it saw the request first: its time is kept. Anyone else's
    // would skew the queue time APM agents show.
    if added.request_start && !(trusted && headers.contains_key(&X_REQUEST_START)) {
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
    // Over this front's TLS the scheme is known: a client's word does not
    // replace it. Otherwise a proxy before thr may have said.
    if added.forwarded_proto && (via_tls || !headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if via_tls { "https" } else { "http" };
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

    fn arrival(peer: Option<&str>, via_tls: bool, trusted: bool) -> Arrival {
        Arrival {
            peer: peer.map(|p| p.parse().unwrap()),
            received: SystemTime::now(),
            via_tls,
            trusted,
        }
    }

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
        let at = Arrival {
            received: UNIX_EPOCH + std::time::Duration::from_micros(1_795_000_000_123_456),
            ..arrival(Some("10.1.2.3"), false, false)
        };
        let id = prepare(&mut h, None, "abc", &at, AddedHeaders::ALL);
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
        let at = arrival(Some("::1"), true, true);
        let id = prepare(&mut h, Some("h2.example"), "abc", &at, AddedHeaders::ALL);
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
            "abc",
            &arrival(None, false, true),
            AddedHeaders::ALL,
        );
        assert!(!h.contains_key("x-forwarded-for"));
    }

    #[test]
    fn each_added_field_can_be_turned_off() {
        let peer = Some("10.1.2.3");
        let none = AddedHeaders {
            forwarded_for: false,
            forwarded_proto: false,
            forwarded_host: false,
            request_id: false,
            request_start: false,
        };
        let mut h = map(&[("host", "app.example")]);
        let id = prepare(&mut h, None, "abc", &arrival(peer, false, true), none);
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
            prepare(&mut h, None, "abc", &arrival(peer, false, true), only);
            assert_eq!(h.len(), 2, "{name}: {h:?}");
            assert!(h.contains_key(*name), "{name}: {h:?}");
        }
    }
}
