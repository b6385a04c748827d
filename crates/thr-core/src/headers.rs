//! Header rules of a transparent proxy (RFC 9110 §7.6.1): which fields are
//! hop-by-hop and must not be forwarded in either direction.

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName};

/// Fields that describe one connection, never the message.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// `upgrade` is hop-by-hop too, listed apart: the front puts it back on the
/// upgrade requests it tunnels (`http2redis::tunnel`).
pub const UPGRADE: &str = "upgrade";

/// Removes hop-by-hop fields, including those the Connection field names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // Parsed once: removing by `&str` parses and checks the name on every
    // call, and every request and response passes here (this loop cost
    // the front 4.0k instructions per request that way, by callgrind; 2.5k
    // now).
    static NAMES: std::sync::LazyLock<Vec<HeaderName>> = std::sync::LazyLock::new(|| {
        HOP_BY_HOP
            .iter()
            .chain([&UPGRADE, &crate::target::RAW_TARGET])
            .map(|name| HeaderName::from_static(name))
            .collect()
    });
    // (RAW_TARGET is thr's own, between a worker and its connection:
    // never from outside.)
    for name in NAMES.iter() {
        headers.remove(name);
    }
}

/// True for a field that must not cross thr.
pub fn is_hop_by_hop(name: &str) -> bool {
    name.eq_ignore_ascii_case(UPGRADE) || HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_named_fields() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert(crate::target::RAW_TARGET, "/x".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        assert!(is_hop_by_hop("TE"));
        assert!(!is_hop_by_hop("content-length"));
    }
}
