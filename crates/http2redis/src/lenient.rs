//! Query strings as leniently as nginx and gunicorn take them. Clients
//! (curl, scripts, old apps) send `"`, `<` and `>` unencoded in queries;
//! hyper's URI type refuses them and the client would get a bare 400.
//!
//! [`Lenient`] sits between an HTTP/1 client socket and hyper. It follows
//! the request stream (heads, and bodies by their framing) and, in a
//! request line whose query holds those bytes, percent-encodes them
//! (`%22`, `%3C`, `%3E`) so hyper accepts it. The original target is kept
//! for the request in order ([`Originals`]): rules see the encoded target
//! (the same values once decoded, which is what query criteria compare),
//! and the backend is sent the original bytes (see `thr_backend::reuse`).
//!
//! Anything the follower is not sure about (an h2 preface, an upgrade or
//! CONNECT, ambiguous or unusual framing, an over-long line) turns it into
//! a plain pipe for the rest of the connection: hyper then judges the
//! bytes alone, as before.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest request line or header line followed (hyper's own bounds are
/// tighter; past this the follower steps aside).
const MAX_LINE: usize = 64 << 10;

/// The original targets of a connection's rewritten requests, by request
/// number. Only rewritten requests are recorded, so the common request
/// costs a counter, not a lock.
#[derive(Debug, Default)]
pub struct Originals {
    /// Request heads followed (the follower's count).
    heads: AtomicU64,
    /// Requests handed to the service (the service's count).
    served: AtomicU64,
    rewritten: Mutex<VecDeque<(u64, String)>>,
    waiting: AtomicUsize,
}

impl Originals {
    fn push(&self, original: Option<String>) {
        let n = self.heads.fetch_add(1, Ordering::Relaxed);
        if let Some(original) = original {
            let mut rewritten = self.rewritten.lock().unwrap_or_else(|p| p.into_inner());
            rewritten.push_back((n, original));
            self.waiting.store(rewritten.len(), Ordering::Release);
        }
    }

    /// The next request's original target, if it was rewritten (called
    /// once per HTTP/1 request, in order).
    pub fn next(&self) -> Option<String> {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        if self.waiting.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut rewritten = self.rewritten.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of requests hyper refused (and never served) are dropped.
        while rewritten.front().is_some_and(|(at, _)| *at < n) {
            rewritten.pop_front();
        }
        let original = match rewritten.front() {
            Some((at, _)) if *at == n => rewritten.pop_front().map(|(_, o)| o),
            _ => None,
        };
        self.waiting.store(rewritten.len(), Ordering::Release);
        original
    }
}

/// The original target of a request whose query was made acceptable (a
/// request extension).
#[derive(Debug, Clone)]
pub struct OriginalTarget(pub String);

#[derive(Debug)]
enum State {
    /// Gathering a request line.
    Line(Vec<u8>),
    /// Header lines until the empty one; `line` is the partial one.
    Fields { line: Vec<u8>, frame: Framing },
    /// `n` body bytes left.
    Body(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// A plain pipe from now on.
    Pipe,
}

#[derive(Debug, Default)]
struct Framing {
    length: Option<u64>,
    lengths: usize,
    chunked: bool,
    other_coding: bool,
    upgrade: bool,
}

#[derive(Debug)]
enum Chunk {
    /// The size line so far.
    Size(Vec<u8>),
    /// Data bytes left, then CRLF.
    Data(u64),
    /// The CRLF after data: bytes of it left.
    End(u8),
    /// Trailer lines until the empty one.
    Trailers(Vec<u8>),
}

/// Follows a connection's request stream (see the module's doc).
struct Follower {
    state: State,
    originals: Arc<Originals>,
}

impl Follower {
    /// Follows `bytes` and appends to `passed` what hyper is to read of
    /// them: everything, a request line rewritten where needed. A partial
    /// request line is held back until it is complete.
    fn follow(&mut self, bytes: &[u8], passed: &mut Vec<u8>) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match &mut self.state {
                State::Pipe => {
                    passed.extend_from_slice(rest);
                    break;
                }
                State::Line(partial) => {
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        // A line cut by the read: held back until its end comes.
                        partial.extend_from_slice(rest);
                        if partial.len() > MAX_LINE {
                            passed.append(partial);
                            self.state = State::Pipe;
                        }
                        break;
                    };
                    let (now, after) = rest.split_at(lf + 1);
                    rest = after;
                    let whole;
                    let line = if partial.is_empty() {
                        now
                    } else {
                        partial.extend_from_slice(now);
                        whole = std::mem::take(partial);
                        &whole[..]
                    };
                    if line == b"\r\n" || line == b"\n" {
                        // Empty lines between requests are allowed.
                        passed.extend_from_slice(line);
                        continue;
                    }
                    let Some((connect, rewritten)) = request_line(line) else {
                        // h2 prior knowledge, or something unknown: step aside.
                        passed.extend_from_slice(line);
                        self.state = State::Pipe;
                        continue;
                    };
                    match rewritten {
                        Some((line, original)) => {
                            passed.extend_from_slice(&line);
                            self.originals.push(Some(original));
                        }
                        None => {
                            passed.extend_from_slice(line);
                            self.originals.push(None);
                        }
                    }
                    self.state = State::Fields {
                        line: Vec::new(),
                        frame: Framing {
                            upgrade: connect,
                            ..Framing::default()
                        },
                    };
                }
                State::Fields { line, frame } => {
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        // A field cut by the read: kept until its end comes.
                        line.extend_from_slice(rest);
                        passed.extend_from_slice(rest);
                        if line.len() > MAX_LINE {
                            self.state = State::Pipe;
                        }
                        break;
                    };
                    let (now, after) = rest.split_at(lf + 1);
                    passed.extend_from_slice(now);
                    rest = after;
                    // Most fields arrive whole: looked at where they are.
                    let whole;
                    let field = if line.is_empty() {
                        now
                    } else {
                        line.extend_from_slice(now);
                        whole = std::mem::take(line);
                        &whole[..]
                    };
                    if field != b"\r\n" && field != b"\n" {
                        note_field(field, frame);
                        continue;
                    }
                    let frame = std::mem::take(frame);
                    self.state = next_after_head(&frame);
                }
                State::Body(left) => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    passed.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Line(Vec::new());
                    }
                }
                State::Chunked(chunk) => {
                    let (n, next) = follow_chunk(chunk, rest);
                    passed.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    if let Some(next) = next {
                        self.state = next;
                    }
                }
            }
        }
    }
}

/// A client socket whose request lines are made acceptable to hyper.
pub struct Lenient<T> {
    inner: T,
    follower: Follower,
    /// Bytes ready for hyper, from `sent` on.
    out: Vec<u8>,
    sent: usize,
}

impl<T> Lenient<T> {
    /// `inner`, recording into `originals`.
    pub fn new(inner: T, originals: Arc<Originals>) -> Lenient<T> {
        Lenient {
            inner,
            follower: Follower {
                state: State::Line(Vec::new()),
                originals,
            },
            out: Vec::new(),
            sent: 0,
        }
    }
}

/// Moves bytes of `rest` into `line` up to and including a LF; how many
/// were taken, and whether the line is complete.
fn take_line(rest: &[u8], line: &mut Vec<u8>) -> (usize, bool) {
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) => {
            line.extend_from_slice(&rest[..=i]);
            (i + 1, true)
        }
        None => {
            line.extend_from_slice(rest);
            (rest.len(), false)
        }
    }
}

/// Whether `line` is a request line this follower knows (None: the h2
/// preface or something else), whether its method is CONNECT, and, when
/// its query had to be encoded, the line as hyper should see it and the
/// original target.
#[allow(clippy::type_complexity)]
fn request_line(line: &[u8]) -> Option<(bool, Option<(Vec<u8>, String)>)> {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let mut parts = text.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if !version.starts_with(b"HTTP/1.") || method == b"PRI" || method.is_empty() {
        return None;
    }
    let connect = method == b"CONNECT";
    // Origin-form only: an absolute-form target keeps hyper's judgement.
    if !target.starts_with(b"/") {
        return Some((connect, None));
    }
    let Some(encoded) = thr_core::target::encode_query(target) else {
        return Some((connect, None));
    };
    let Ok(original) = std::str::from_utf8(target) else {
        return Some((connect, None));
    };
    let mut rewritten = Vec::with_capacity(line.len() + 16);
    rewritten.extend_from_slice(method);
    rewritten.push(b' ');
    rewritten.extend_from_slice(&encoded);
    rewritten.push(b' ');
    rewritten.extend_from_slice(version);
    rewritten.extend_from_slice(b"\r\n");
    Some((connect, Some((rewritten, original.to_string()))))
}

/// Notes what a header field says about the body's framing.
fn note_field(field: &[u8], frame: &mut Framing) {
    let Some(colon) = field.iter().position(|&b| b == b':') else {
        // obs-fold or garbage: hyper will judge; do not guess the framing.
        frame.other_coding = true;
        return;
    };
    let name = &field[..colon];
    let value = field[colon + 1..].trim_ascii();
    if name.eq_ignore_ascii_case(b"content-length") {
        frame.lengths += 1;
        frame.length = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        if frame.length.is_none() {
            frame.other_coding = true;
        }
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        if value.eq_ignore_ascii_case(b"chunked") && !frame.chunked {
            frame.chunked = true;
        } else {
            frame.other_coding = true;
        }
    } else if name.eq_ignore_ascii_case(b"upgrade") {
        frame.upgrade = true;
    } else if name.is_empty() || name.ends_with(b" ") || name.ends_with(b"\t") {
        frame.other_coding = true;
    }
}

/// What follows a request head.
fn next_after_head(frame: &Framing) -> State {
    if frame.upgrade || frame.other_coding || frame.lengths > 1 {
        return State::Pipe;
    }
    match (frame.chunked, frame.length) {
        (true, None) => State::Chunked(Chunk::Size(Vec::new())),
        (true, Some(_)) => State::Pipe,
        (false, Some(0)) | (false, None) => State::Line(Vec::new()),
        (false, Some(n)) => State::Body(n),
    }
}

/// Follows a chunked body over `rest`: bytes consumed, and the next state
/// when the body ended (or the follower gave up). Lines must end in CRLF,
/// as hyper requires: a bare LF here could be read otherwise by hyper (a
/// trailer instead of the end of the body), so the follower steps aside.
fn follow_chunk(chunk: &mut Chunk, rest: &[u8]) -> (usize, Option<State>) {
    match chunk {
        Chunk::Size(line) => {
            let (taken, text) = match crlf_line(rest, line) {
                Crlf::More(taken) => return (taken, None),
                Crlf::Bad(taken) => return (taken, Some(State::Pipe)),
                Crlf::Line(taken, text) => (taken, text),
            };
            let hex = &text[..text.iter().position(|&b| b == b';').unwrap_or(text.len())];
            let size = std::str::from_utf8(hex)
                .ok()
                .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            *chunk = match size {
                None => return (taken, Some(State::Pipe)),
                Some(0) => Chunk::Trailers(Vec::new()),
                Some(n) => Chunk::Data(n),
            };
            (taken, None)
        }
        Chunk::Data(left) => {
            let n = (*left).min(rest.len() as u64) as usize;
            *left -= n as u64;
            if *left == 0 {
                *chunk = Chunk::End(2);
            }
            (n, None)
        }
        Chunk::End(left) => {
            // Exactly CRLF after the data.
            let expected = if *left == 2 { b'\r' } else { b'\n' };
            if rest[0] != expected {
                return (0, Some(State::Pipe));
            }
            *left -= 1;
            if *left == 0 {
                *chunk = Chunk::Size(Vec::new());
            }
            (1, None)
        }
        Chunk::Trailers(line) => match crlf_line(rest, line) {
            Crlf::More(taken) => (taken, None),
            Crlf::Bad(taken) => (taken, Some(State::Pipe)),
            Crlf::Line(taken, text) => (taken, text.is_empty().then(|| State::Line(Vec::new()))),
        },
    }
}

/// A line of a chunked body, gathered across reads.
enum Crlf {
    /// Not complete yet; this many bytes were taken.
    More(usize),
    /// Too long, or ended by a bare LF.
    Bad(usize),
    /// Complete: bytes taken, and the line without its CRLF.
    Line(usize, Vec<u8>),
}

fn crlf_line(rest: &[u8], line: &mut Vec<u8>) -> Crlf {
    let (taken, done) = take_line(rest, line);
    if line.len() > MAX_LINE || (done && !line.ends_with(b"\r\n")) {
        return Crlf::Bad(taken);
    }
    if !done {
        return Crlf::More(taken);
    }
    let mut text = std::mem::take(line);
    text.truncate(text.len() - 2);
    Crlf::Line(taken, text)
}

impl<T: AsyncRead + Unpin> AsyncRead for Lenient<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.sent < this.out.len() {
                let n = (this.out.len() - this.sent).min(buf.remaining());
                buf.put_slice(&this.out[this.sent..this.sent + n]);
                this.sent += n;
                if this.sent == this.out.len() {
                    // Let go of the buffer: an idle connection keeps none.
                    this.out = Vec::new();
                    this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.follower.state {
                State::Pipe => return Pin::new(&mut this.inner).poll_read(cx, buf),
                // Body bytes that cannot reach the next request: straight in.
                State::Body(left) if left >= buf.remaining() as u64 => {
                    let before = buf.filled().len();
                    std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    let n = (buf.filled().len() - before) as u64;
                    this.follower.state = match n {
                        0 => State::Pipe,
                        n if n == left => State::Line(Vec::new()),
                        n => State::Body(left - n),
                    };
                    return Poll::Ready(Ok(()));
                }
                _ => {}
            }
            // On the stack: an idle connection keeps no buffer. Left
            // uninitialised: the read fills what it returns, and zeroing 8
            // KiB on every poll (five per request, most of them finding
            // nothing) was a fifth of the front's instructions per request
            // by callgrind's count (which counts each byte of the zeroing).
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 8 << 10];
            let mut read = ReadBuf::uninit(&mut scratch);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                // End of stream: a held-back partial line goes on as it is.
                if let State::Line(line) = &mut this.follower.state {
                    this.out = std::mem::take(line);
                }
                this.follower.state = State::Pipe;
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.follower.follow(read.filled(), &mut this.out);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Lenient<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn follow_all(pieces: &[&[u8]]) -> (Vec<u8>, Vec<Option<String>>) {
        let originals = Arc::new(Originals::default());
        let mut follower = Follower {
            state: State::Line(Vec::new()),
            originals: originals.clone(),
        };
        let mut out = Vec::new();
        for piece in pieces {
            follower.follow(piece, &mut out);
        }
        let heads = originals.heads.load(Ordering::Relaxed);
        let got = (0..heads).map(|_| originals.next()).collect();
        (out, got)
    }

    #[test]
    fn a_raw_quote_in_a_query_is_encoded_and_the_original_kept() {
        let (out, originals) = follow_all(&[b"GET /s?q=\"a<b>\" HTTP/1.1\r\nHost: x\r\n\r\n"]);
        assert_eq!(out, b"GET /s?q=%22a%3Cb%3E%22 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(originals, [Some("/s?q=\"a<b>\"".to_string())]);
    }

    #[test]
    fn bodies_are_never_touched_whatever_they_hold() {
        let body = b"GET /?x=\"1\" HTTP/1.1\r\n\r\n";
        let head = format!(
            "POST /p?a=\"1\" HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let second = b"GET /n?<> HTTP/1.1\r\n\r\n";
        let stream = [head.as_bytes(), &body[..], &second[..]].concat();
        // Fed byte by byte: every state crosses read boundaries.
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        let (out, originals) = follow_all(&pieces);
        let expected = [
            head.replace("\"1\"", "%221%22").as_bytes(),
            &body[..],
            b"GET /n?%3C%3E HTTP/1.1\r\n\r\n",
        ]
        .concat();
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(
            originals,
            [Some("/p?a=\"1\"".to_string()), Some("/n?<>".to_string())]
        );
    }

    #[test]
    fn chunked_bodies_are_followed_to_their_end() {
        let stream = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nGET /\r\n0\r\nT: 1\r\n\r\nGET /?\"\" HTTP/1.1\r\n\r\n";
        let pieces: Vec<&[u8]> = stream.chunks(3).collect();
        let (out, originals) = follow_all(&pieces);
        let text = String::from_utf8_lossy(&out);
        assert!(text.ends_with("GET /?%22%22 HTTP/1.1\r\n\r\n"), "{text}");
        assert!(text.contains("5;x=y\r\nGET /\r\n0\r\n"), "{text}");
        assert_eq!(originals, [None, Some("/?\"\"".to_string())]);
    }

    #[test]
    fn unsure_framing_h2_and_upgrades_make_it_a_plain_pipe() {
        for stream in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /?\" HTTP/1.1\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxGET /?\" HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\nGET /?\" HTTP/1.1\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET /?\" HTTP/1.1\r\n\r\n",
        ] {
            let (out, _) = follow_all(&[stream]);
            assert_eq!(out, stream, "{}", String::from_utf8_lossy(stream));
        }
    }

    #[test]
    fn a_bare_lf_in_a_chunked_body_makes_it_step_aside() {
        // hyper would read the `/admin` request as trailers: the follower
        // must not take it for a request.
        let stream = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /admin?x=\"\" HTTP/1.1\r\nHost: h\r\n\r\nGET /public HTTP/1.1\r\n\r\n";
        let (out, originals) = follow_all(&[stream]);
        assert_eq!(out, stream);
        assert_eq!(originals, [None]);
        let stream = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxZZGET /?\" HTTP/1.1\r\n\r\n";
        let (out, originals) = follow_all(&[stream]);
        assert_eq!(out, stream);
        assert_eq!(originals, [None]);
    }

    #[test]
    fn paths_and_clean_queries_are_left_alone() {
        let stream = b"GET /a\"b?x=%22&y=1 HTTP/1.1\r\n\r\n";
        let (out, originals) = follow_all(&[stream]);
        assert_eq!(out, stream);
        assert_eq!(originals, [None]);
    }
}
