//! The wire format of jobs and replies travelling through Redis
//! (ARCHITECTURE.md decision 9).
//!
//! One Redis string holds one frame: a 3-byte magic `THR`, a kind byte (`Q`
//! for a request, `R` for a reply, `S` for a started notice), a version byte, the length of the metadata
//! (u32, big endian), the metadata as JSON, then the body as raw bytes. Bodies
//! are never base64'd; header values, which HTTP allows to hold any byte but
//! controls, are written as JSON strings with one char per byte (Latin-1), so
//! they survive byte for byte and stay readable when ASCII. A frame of another
//! version is refused with a clear error instead of being misread.
//!
//! Bodies bigger than one [`CHUNK`] never travel in a frame (ARCHITECTURE.md
//! decision 12): a request body waits in Redis as a list of chunks
//! ([`JobMeta::body_chunks`]); a response is a head frame marked
//! [`ReplyMeta::stream`] followed by [`Piece`]s in a per-job list that holds
//! at most [`WINDOW`] of them, so no Redis command ever carries more than
//! one chunk and Redis holds a bounded window per response.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 3] = b"THR";
const KIND_JOB: u8 = b'Q';
const KIND_REPLY: u8 = b'R';
const KIND_STARTED: u8 = b'S';
const KIND_DATA: u8 = b'D';

/// Largest piece of a body in one Redis value. 128 KiB: a Redis command
/// carrying it takes ~0.1 ms of Redis time, so a stream never delays other
/// daemons' calls noticeably, while a 1 GiB body is still only 8,192
/// commands (at 16 KiB the per-command overhead halved the throughput; at
/// 1 MiB each call held Redis ~1 ms). See README "How bodies travel".
pub const CHUNK: usize = 128 * 1024;

/// Largest request body that travels in its job's frame; a bigger one is
/// stored in chunks of [`CHUNK`] before its job is queued. A frame is read
/// by the claim script, and every byte that passes through Lua costs Redis
/// about 1 µs per KB, against a quarter of that for a chunk stored and
/// read by plain commands (ARCHITECTURE.md decision 31).
pub const INLINE_BODY: usize = 16 * 1024;

/// Most pieces of one response waiting in Redis (8 × 128 KiB = 1 MiB): the
/// flow-control window between a worker and the front that reads them.
pub const WINDOW: usize = 8;
const HEADER_LEN: usize = 3 + 1 + 1 + 4;

/// Version of the frame layout and its metadata; bump on incompatible change.
pub const WIRE_VERSION: u8 = 1;

/// Header fields in order, repeated names kept; values are raw bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderList(#[serde(with = "latin1_pairs")] pub Vec<(String, Vec<u8>)>);

impl HeaderList {
    /// Copies an `http::HeaderMap`, keeping the map's order and repeats.
    pub fn from_map(map: &http::HeaderMap) -> HeaderList {
        HeaderList(
            map.iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    /// Builds an `http::HeaderMap`, skipping fields that are not valid HTTP
    /// (they cannot come from a parsed request, only from a hand-edited job).
    pub fn to_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::with_capacity(self.0.len());
        for (name, value) in &self.0 {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(value),
            ) {
                map.append(n, v);
            }
        }
        map
    }

    /// First value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// What a front knows about a request it puts on a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMeta {
    /// Unique job id, chosen by the front; replies are routed by it.
    pub id: String,
    /// X-Request-Id as received, or the job id: what logs on every side show.
    pub request_id: String,
    /// Queue the job was put on.
    pub queue: String,
    /// 1 (most urgent) … 99.
    pub priority: u8,
    /// Id of the front waiting for the reply (its reply list).
    pub front: String,
    /// Request method, as received.
    pub method: String,
    /// Request target in origin form (path and raw query), byte for byte.
    pub target: String,
    /// Request headers, hop-by-hop removed, X-Forwarded-* added.
    pub headers: HeaderList,
    /// How long the client waits in all (ms); the deadline lives in Redis.
    pub timeout_ms: u64,
    /// The job's flow (its set of quota keys), see `thr_core::quota`.
    #[serde(default)]
    pub flow: String,
    /// The flow's definition (`thr_broker::protocol::records::FlowDef`), so
    /// that `thrctl retry` can put a dead letter back on its queue.
    #[serde(default)]
    pub flow_def: String,
    /// The body waits in Redis as this many chunks (0: it is in the frame).
    #[serde(default)]
    pub body_chunks: u32,
    /// The body's length in bytes when it waits in Redis.
    #[serde(default)]
    pub body_len: u64,
}

/// A request taken off a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its metadata.
    pub meta: JobMeta,
    /// Its body, raw.
    pub body: Bytes,
}

/// What a worker learned from the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyMeta {
    /// The job answered.
    pub id: String,
    /// Response status code.
    pub status: u16,
    /// Response headers, hop-by-hop removed.
    pub headers: HeaderList,
    /// Id of the worker that ran the job (for logs).
    pub worker: String,
    /// Time spent at the backend, ms.
    pub backend_ms: u64,
    /// The backend sent its body without a length (chunked); the front
    /// frames it the same way.
    #[serde(default)]
    pub chunked: bool,
    /// The head of a streamed response: the body follows as [`Piece`]s.
    #[serde(default)]
    pub stream: bool,
    /// The backend's reason phrase when it is not the status code's usual
    /// one ("HTTP/1.1 418 I'M A TEAPOT"): HTTP/1 clients get it as sent.
    /// Absent from the frame otherwise, so older fronts read it unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A reply on its way back to a front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Its metadata.
    pub meta: ReplyMeta,
    /// Its body, raw.
    pub body: Bytes,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Too short to hold a frame header.
    #[error("frame truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a thr frame at all.
    #[error("not a thr frame (bad magic)")]
    BadMagic,
    /// A request where a reply was expected, or the reverse.
    #[error("frame kind {found:?} where {expected:?} was expected")]
    WrongKind {
        /// Kind byte expected.
        expected: char,
        /// Kind byte found.
        found: char,
    },
    /// Written by a thr of another wire version.
    #[error("frame of wire version {0}, this thr reads version {WIRE_VERSION}")]
    Version(u8),
    /// The metadata is not what this version expects.
    #[error("bad metadata: {0}")]
    Meta(#[from] serde_json::Error),
}

fn encode<M: Serialize>(kind: u8, meta: &M, body: &[u8]) -> Bytes {
    let meta = serde_json::to_vec(meta).expect("envelope metadata always serializes");
    let mut out = BytesMut::with_capacity(HEADER_LEN + meta.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[kind, WIRE_VERSION]);
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(body);
    out.freeze()
}

fn decode<M: for<'de> Deserialize<'de>>(kind: u8, frame: Bytes) -> Result<(M, Bytes), DecodeError> {
    if frame.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(frame.len()));
    }
    if &frame[..3] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if frame[3] != kind {
        return Err(DecodeError::WrongKind {
            expected: kind as char,
            found: frame[3] as char,
        });
    }
    if frame[4] != WIRE_VERSION {
        return Err(DecodeError::Version(frame[4]));
    }
    let meta_len = u32::from_be_bytes(frame[5..9].try_into().expect("4 bytes")) as usize;
    let meta_end = HEADER_LEN
        .checked_add(meta_len)
        .filter(|end| *end <= frame.len())
        .ok_or(DecodeError::Truncated(frame.len()))?;
    let meta = serde_json::from_slice(&frame[HEADER_LEN..meta_end])?;
    Ok((meta, frame.slice(meta_end..)))
}

impl Job {
    /// Encodes a job frame.
    pub fn encode(meta: &JobMeta, body: &[u8]) -> Bytes {
        encode(KIND_JOB, meta, body)
    }

    /// Decodes a job frame; the body shares `frame`'s memory.
    pub fn decode(frame: Bytes) -> Result<Job, DecodeError> {
        let (meta, body) = decode(KIND_JOB, frame)?;
        Ok(Job { meta, body })
    }
}

/// A notice to a front that a job has started at a worker: from then on
/// its client must not be told "try again", whatever happens to Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The job.
    pub id: String,
}

impl Started {
    /// Encodes a started notice.
    pub fn encode(&self) -> Bytes {
        encode(KIND_STARTED, self, b"")
    }
}

/// A notice to a front that pieces of a streamed response wait for it
/// (sent when the job's list turns non-empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataReady {
    /// The job.
    pub id: String,
}

impl DataReady {
    /// Encodes a data notice.
    pub fn encode(&self) -> Bytes {
        encode(KIND_DATA, self, b"")
    }
}

/// What a front pops from its list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontMessage {
    /// A job's reply (or the head of its streamed response).
    Reply(Reply),
    /// A job has started.
    Started(Started),
    /// Pieces of a streamed response wait.
    Data(DataReady),
}

impl FrontMessage {
    /// Decodes a frame popped from a front's list.
    pub fn decode(frame: Bytes) -> Result<FrontMessage, DecodeError> {
        if frame.len() > 3 && frame[3] == KIND_STARTED {
            let (meta, _) = decode(KIND_STARTED, frame)?;
            return Ok(FrontMessage::Started(meta));
        }
        if frame.len() > 3 && frame[3] == KIND_DATA {
            let (meta, _) = decode(KIND_DATA, frame)?;
            return Ok(FrontMessage::Data(meta));
        }
        Reply::decode(frame).map(FrontMessage::Reply)
    }

    /// The job it is about.
    pub fn id(&self) -> &str {
        match self {
            FrontMessage::Reply(r) => &r.meta.id,
            FrontMessage::Started(s) => &s.id,
            FrontMessage::Data(d) => &d.id,
        }
    }
}

impl Reply {
    /// A reply thr makes itself (reaper, purge, poison): `status` with a
    /// plain-text body and `extra` header fields.
    pub fn plain(id: &str, status: u16, text: &str, who: &str, extra: &[(&str, &str)]) -> Bytes {
        let mut headers = vec![(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )];
        headers.extend(
            extra
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        );
        Reply::encode(
            &ReplyMeta {
                id: id.to_string(),
                status,
                headers: HeaderList(headers),
                worker: who.to_string(),
                backend_ms: 0,
                chunked: false,
                stream: false,
                reason: None,
            },
            text.as_bytes(),
        )
    }

    /// Encodes a reply frame.
    pub fn encode(meta: &ReplyMeta, body: &[u8]) -> Bytes {
        encode(KIND_REPLY, meta, body)
    }

    /// Decodes a reply frame; the body shares `frame`'s memory.
    pub fn decode(frame: Bytes) -> Result<Reply, DecodeError> {
        let (meta, body) = decode(KIND_REPLY, frame)?;
        Ok(Reply { meta, body })
    }
}

/// One element of a streamed response's list: a piece of the body, its
/// end, or an abort (the client must see a truncated response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Body bytes (at most one [`CHUNK`]).
    Data(Bytes),
    /// The body is complete.
    End,
    /// The body stops here, incomplete; why, for logs.
    Abort(String),
}

impl Piece {
    /// The stored form: a tag byte (`d`, `e`, `x`), then the bytes.
    pub fn encode(&self) -> Bytes {
        match self {
            Piece::Data(b) => {
                let mut out = BytesMut::with_capacity(1 + b.len());
                out.extend_from_slice(b"d");
                out.extend_from_slice(b);
                out.freeze()
            }
            Piece::End => Bytes::from_static(b"e"),
            Piece::Abort(why) => Bytes::from(format!("x{why}")),
        }
    }

    /// Reads a stored piece (anything unknown reads as an abort).
    pub fn decode(stored: Bytes) -> Piece {
        match stored.first() {
            Some(b'd') => Piece::Data(stored.slice(1..)),
            Some(b'e') if stored.len() == 1 => Piece::End,
            Some(b'x') => Piece::Abort(String::from_utf8_lossy(&stored[1..]).into_owned()),
            _ => Piece::Abort("unreadable piece".into()),
        }
    }
}

/// Header values as Latin-1 JSON strings: one char per byte, so any byte
/// sequence round-trips and ASCII stays as it is.
mod latin1_pairs {
    use serde::{Deserialize, Deserializer, Serializer};

    use std::borrow::Cow;

    /// A value as text, one char per byte: ASCII values (nearly all) are
    /// borrowed as they are, only others are converted.
    fn as_text(v: &[u8]) -> Cow<'_, str> {
        match std::str::from_utf8(v) {
            // UTF-8 beyond ASCII is not Latin-1: its bytes are converted.
            Ok(text) if text.is_ascii() => Cow::Borrowed(text),
            _ => Cow::Owned(v.iter().map(|&b| b as char).collect()),
        }
    }

    pub fn serialize<S: Serializer>(pairs: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(pairs.iter().map(|(n, v)| (n.as_str(), as_text(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        let as_text: Vec<(String, String)> = Vec::deserialize(d)?;
        as_text
            .into_iter()
            .map(|(n, v)| {
                if v.is_ascii() {
                    // Its bytes are its chars: kept without a copy.
                    return Ok((n, v.into_bytes()));
                }
                let bytes = v
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| {
                        serde::de::Error::custom("header value has a char above U+00FF")
                    })?;
                Ok((n, bytes))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(headers: Vec<(String, Vec<u8>)>) -> JobMeta {
        JobMeta {
            id: "j1".into(),
            request_id: "r1".into(),
            queue: "default".into(),
            priority: 50,
            front: "f1".into(),
            method: "POST".into(),
            target: "/a%2Fb?x=1&x=2&y=&z+w".into(),
            headers: HeaderList(headers),
            timeout_ms: 30_000,
            flow: "-".into(),
            flow_def: String::new(),
            body_chunks: 0,
            body_len: 0,
        }
    }

    #[test]
    fn job_round_trip_keeps_bytes() {
        let m = meta(vec![
            ("set-cookie".into(), b"a=1".to_vec()),
            ("set-cookie".into(), b"b=2".to_vec()),
            ("x-bin".into(), vec![0x80, 0xff, b'a']),
        ]);
        let body: Vec<u8> = (0..=255u8).collect();
        let frame = Job::encode(&m, &body);
        let job = Job::decode(frame).unwrap();
        assert_eq!(job.meta, m);
        assert_eq!(&job.body[..], &body[..]);
    }

    #[test]
    fn a_reply_carries_a_reason_phrase_only_when_it_has_one() {
        let mut meta = ReplyMeta {
            id: "j1".into(),
            status: 418,
            headers: HeaderList::default(),
            worker: "w1".into(),
            backend_ms: 3,
            chunked: false,
            stream: false,
            reason: None,
        };
        // Without one, the frame is what a worker before the field wrote,
        // and it reads back without one.
        let plain = Reply::encode(&meta, b"body");
        assert!(!plain.windows(6).any(|w| w == b"reason"));
        assert_eq!(Reply::decode(plain).unwrap().meta, meta);
        meta.reason = Some("I'M A TEAPOT".into());
        let with = Reply::decode(Reply::encode(&meta, b"body")).unwrap();
        assert_eq!(with.meta, meta);
        assert_eq!(&with.body[..], b"body");
    }

    #[test]
    fn refuses_other_versions_and_kinds() {
        let frame = Job::encode(&meta(vec![]), b"x");
        let mut v2 = frame.to_vec();
        v2[4] = 2;
        assert!(matches!(
            Job::decode(v2.into()),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(
            Reply::decode(frame),
            Err(DecodeError::WrongKind { .. })
        ));
        assert!(matches!(
            Job::decode(Bytes::from_static(b"THRQ")),
            Err(DecodeError::Truncated(4))
        ));
        assert!(matches!(
            Job::decode(Bytes::from_static(b"garbage-garbage")),
            Err(DecodeError::BadMagic)
        ));
        let mut short = Job::encode(&meta(vec![]), b"").to_vec();
        short.truncate(20);
        assert!(Job::decode(short.into()).is_err());
    }

    #[test]
    fn front_messages_tell_replies_from_notices() {
        let started = Started { id: "j9".into() }.encode();
        assert_eq!(
            FrontMessage::decode(started).unwrap(),
            FrontMessage::Started(Started { id: "j9".into() })
        );
        let reply = Reply::plain("j8", 503, "busy\n", "thrctl", &[("retry-after", "5")]);
        match FrontMessage::decode(reply).unwrap() {
            FrontMessage::Reply(r) => {
                assert_eq!((r.meta.id.as_str(), r.meta.status), ("j8", 503));
                assert_eq!(r.meta.headers.get("retry-after"), Some(&b"5"[..]));
                assert_eq!(&r.body[..], b"busy\n");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pieces_and_data_notices_round_trip() {
        for p in [
            Piece::Data(Bytes::from_static(b"abc")),
            Piece::Data(Bytes::new()),
            Piece::End,
            Piece::Abort("backend closed".into()),
        ] {
            assert_eq!(Piece::decode(p.encode()), p);
        }
        assert!(matches!(Piece::decode(Bytes::new()), Piece::Abort(_)));
        let notice = DataReady { id: "j7".into() }.encode();
        assert_eq!(
            FrontMessage::decode(notice).unwrap(),
            FrontMessage::Data(DataReady { id: "j7".into() })
        );
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Job::decode(Bytes::from(bytes.clone()));
            let mut framed = b"THRQ\x01".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = Job::decode(Bytes::from(framed));
        }

        #[test]
        fn any_header_bytes_round_trip(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let headers = values.into_iter().enumerate().map(|(i, v)| (format!("h{i}"), v)).collect();
            let m = meta(headers);
            let job = Job::decode(Job::encode(&m, &body)).unwrap();
            prop_assert_eq!(job.meta, m);
            prop_assert_eq!(&job.body[..], &body[..]);
        }
    }
}
