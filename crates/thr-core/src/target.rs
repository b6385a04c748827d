//! Request targets as clients really send them: nginx and gunicorn accept
//! `"`, `<` and `>` unencoded in a query string, the `http` crate's URI does
//! not. thr accepts them (http2redis's `lenient` module), lets its URI
//! types see them percent-encoded, and sends the backend the original
//! bytes: the worker names the original target in the [`RAW_TARGET`] field,
//! which its backend connection puts back in the request line
//! (thr-backend's `reuse` module) and never sends on.

/// The field that carries an original request target from the worker's
/// request builder to its connection; removed from every client request.
pub const RAW_TARGET: &str = "x-thr-raw-target";

/// Query bytes the URI type refuses and clients send anyway.
const LENIENT: &[u8] = b"\"<>";

/// `target` with the lenient bytes of its query percent-encoded, or None
/// when it has none (the path is left alone: the URI type accepts what
/// clients put there).
pub fn encode_query(target: &[u8]) -> Option<Vec<u8>> {
    let q = target.iter().position(|&b| b == b'?')?;
    let end = target[q..]
        .iter()
        .position(|&b| b == b'#')
        .map_or(target.len(), |i| q + i);
    if !target[q..end].iter().any(|b| LENIENT.contains(b)) {
        return None;
    }
    let mut encoded = Vec::with_capacity(target.len() + 16);
    encoded.extend_from_slice(&target[..q]);
    for &b in &target[q..end] {
        match b {
            b'"' => encoded.extend_from_slice(b"%22"),
            b'<' => encoded.extend_from_slice(b"%3C"),
            b'>' => encoded.extend_from_slice(b"%3E"),
            b => encoded.push(b),
        }
    }
    encoded.extend_from_slice(&target[end..]);
    Some(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_query_is_encoded() {
        assert_eq!(
            encode_query(b"/a\"b?q=\"<x>\"#f\"").unwrap(),
            b"/a\"b?q=%22%3Cx%3E%22#f\""
        );
        assert_eq!(encode_query(b"/a\"b?q=1"), None);
        assert_eq!(encode_query(b"/plain"), None);
    }
}
