//! The records scripts and Rust share, one codec each.
//!
//! The records every job's path reads and writes ([`JobInfo`], [`Owner`])
//! are MessagePack values one after the other, led by their version: Lua
//! reads them with Redis's built-in `cmsgpack`, in one C call, with numbers
//! as numbers (ARCHITECTURE.md decision 25: parsing them from tab-separated
//! text was a tenth of Redis's time per job). The others are short text.
//! Each one's Lua twin lives in `scripts/lib/records.lua` and reads the same
//! fields in the same order; the e2e test
//! `protocol::lua_and_rust_read_records_alike` keeps them honest. Change a
//! field here and there, bump [`RECORD_VERSION`].

use std::fmt::Write;

use rmp::decode;
use rmp::encode;
use thr_core::quota::{Flow, QuotaKey};

/// Version, the first value of a [`JobInfo`] or an [`Owner`].
pub const RECORD_VERSION: u8 = 3;

/// Writes the values of a record; writing to a `Vec` cannot fail.
struct Packer(Vec<u8>);

impl Packer {
    fn new() -> Packer {
        let mut p = Packer(Vec::with_capacity(96));
        p.uint(u64::from(RECORD_VERSION));
        p
    }

    fn uint(&mut self, n: u64) -> &mut Packer {
        encode::write_uint(&mut self.0, n).expect("writing to a Vec");
        self
    }

    fn str(&mut self, s: &str) -> &mut Packer {
        encode::write_str(&mut self.0, s).expect("writing to a Vec");
        self
    }

    fn bool(&mut self, b: bool) -> &mut Packer {
        encode::write_bool(&mut self.0, b).expect("writing to a Vec");
        self
    }

    /// Bytes under a string's marker, as Lua's `cmsgpack` packs any string.
    fn bytes(&mut self, b: &[u8]) -> &mut Packer {
        encode::write_str_len(&mut self.0, b.len() as u32).expect("writing to a Vec");
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads the values of a record, after its version (None: not a record of
/// this version).
struct Unpacker<'a>(&'a [u8]);

impl<'a> Unpacker<'a> {
    fn new(bytes: &'a [u8]) -> Option<Unpacker<'a>> {
        let mut u = Unpacker(bytes);
        (u.uint::<u8>()? == RECORD_VERSION).then_some(u)
    }

    /// An unsigned integer of any width that fits a `T`.
    fn uint<T: TryFrom<u64>>(&mut self) -> Option<T> {
        let n: u64 = decode::read_int(&mut self.0).ok()?;
        T::try_from(n).ok()
    }

    fn str(&mut self) -> Option<String> {
        let (s, rest) = decode::read_str_from_slice(self.0).ok()?;
        self.0 = rest;
        Some(s.to_string())
    }

    fn bool(&mut self) -> Option<bool> {
        decode::read_bool(&mut self.0).ok()
    }

    /// A string's bytes, UTF-8 or not (a job's payload).
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = decode::read_str_len(&mut self.0).ok()? as usize;
        let (b, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(b.to_vec())
    }

    /// True when every value was read.
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the broker knows about a job besides its payload (hash `info`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// 1 (most urgent) … 99.
    pub priority: u8,
    /// Order score it was queued with (its place, kept when requeued).
    pub score: u64,
    /// Its flow id.
    pub flow: String,
    /// When it was enqueued (ms, Redis clock).
    pub enqueued_ms: u64,
    /// When its client stops waiting (ms, Redis clock).
    pub deadline_ms: u64,
    /// The front waiting for it.
    pub front: String,
    /// The request method.
    pub method: String,
    /// Times a worker was lost while running it.
    pub attempts: u32,
    /// Its flow's definition ([`FlowDef`]): what it holds while it runs,
    /// and what a reaper needs to put it back.
    pub flow_def: String,
}

impl JobInfo {
    /// The record as stored.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Packer::new();
        p.uint(u64::from(self.priority))
            .uint(self.score)
            .str(&self.flow)
            .uint(self.enqueued_ms)
            .uint(self.deadline_ms)
            .str(&self.front)
            .str(&self.method)
            .uint(u64::from(self.attempts))
            .str(&self.flow_def);
        p.0
    }

    /// Reads a stored record; None when it is not one of this version.
    pub fn decode(bytes: &[u8]) -> Option<JobInfo> {
        let mut u = Unpacker::new(bytes)?;
        let info = JobInfo {
            priority: u.uint()?,
            score: u.uint()?,
            flow: u.str()?,
            enqueued_ms: u.uint()?,
            deadline_ms: u.uint()?,
            front: u.str()?,
            method: u.str()?,
            attempts: u.uint()?,
            flow_def: u.str()?,
        };
        u.done().then_some(info)
    }
}

/// Who holds a job's lease (hash `owners`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The worker's id.
    pub worker: String,
    /// The claim token the lease was made under.
    pub token: String,
    /// When it was claimed (ms, Redis clock).
    pub claimed_ms: u64,
    /// Its response head went out: it streams, and cannot run again.
    pub streaming: bool,
}

impl Owner {
    /// The record as stored.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Packer::new();
        p.str(&self.worker)
            .str(&self.token)
            .uint(self.claimed_ms)
            .bool(self.streaming);
        p.0
    }

    /// Reads a stored record; None when it is not one of this version.
    pub fn decode(bytes: &[u8]) -> Option<Owner> {
        let mut u = Unpacker::new(bytes)?;
        let owner = Owner {
            worker: u.str()?,
            token: u.str()?,
            claimed_ms: u.uint()?,
            streaming: u.bool()?,
        };
        u.done().then_some(owner)
    }
}

/// A worker waiting on a queue's doorbell, ready to take the job an
/// enqueue hands off (hash `offers`, by claim token; ARCHITECTURE.md
/// decision 27).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The worker's id (its heartbeat vouches for the offer).
    pub worker: String,
    /// The lease the job gets.
    pub lease_ms: u64,
    /// The queue's `max_inflight_total` (0: none).
    pub max_inflight_total: u32,
    /// Methods of the jobs it may be handed, space-separated: those it runs
    /// again when their worker is lost (`retry_methods`), since a worker
    /// that dies while it waits takes its handed job with it unseen.
    pub methods: String,
}

impl Offer {
    /// The record as stored.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Packer::new();
        p.str(&self.worker)
            .uint(self.lease_ms)
            .uint(u64::from(self.max_inflight_total))
            .str(&self.methods);
        p.0
    }

    /// Reads a stored record; None when it is not one of this version.
    pub fn decode(bytes: &[u8]) -> Option<Offer> {
        let mut u = Unpacker::new(bytes)?;
        let offer = Offer {
            worker: u.str()?,
            lease_ms: u.uint()?,
            max_inflight_total: u.uint()?,
            methods: u.str()?,
        };
        u.done().then_some(offer)
    }
}

/// The job an enqueue handed to an [`Offer`], as its worker pops it: what a
/// claim answers for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handed {
    /// The data generation when it was leased.
    pub generation: String,
    /// The job's id.
    pub id: String,
    /// Its payload.
    pub frame: Vec<u8>,
    /// Ms until its client stops waiting.
    pub remaining_ms: u64,
    /// The front waiting for it.
    pub front: String,
    /// Its flow's definition (empty: handed jobs have no quota).
    pub flow_def: String,
}

impl Handed {
    /// The record as stored (the enqueue script writes it; this is for tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Packer::new();
        p.str(&self.generation)
            .str(&self.id)
            .bytes(&self.frame)
            .uint(self.remaining_ms)
            .str(&self.front)
            .str(&self.flow_def);
        p.0
    }

    /// Reads a stored record; None when it is not one of this version.
    pub fn decode(bytes: &[u8]) -> Option<Handed> {
        let mut u = Unpacker::new(bytes)?;
        let handed = Handed {
            generation: u.str()?,
            id: u.str()?,
            frame: u.bytes()?,
            remaining_ms: u.uint()?,
            front: u.str()?,
            flow_def: u.str()?,
        };
        u.done().then_some(handed)
    }
}

/// A flow's quotas as scripts read them (hash `flowdefs`, and the last
/// field of a [`JobInfo`]): quotas separated by `;`, each
/// `token max_concurrent interval_ms burst max_waiting` separated by
/// spaces. Tokens hold neither (`thr_core::quota::escape_value`).
#[derive(Debug, Clone, Copy)]
pub struct FlowDef;

impl FlowDef {
    /// The definition of `flow`.
    pub fn encode(flow: &Flow) -> String {
        let mut out = String::new();
        for q in &flow.quotas {
            if !out.is_empty() {
                out.push(';');
            }
            let _ = write!(
                out,
                "{} {} {} {} {}",
                q.token, q.max_concurrent, q.interval_ms, q.burst, q.max_waiting
            );
        }
        out
    }

    /// Reads a definition; malformed lines are skipped, as in Lua.
    pub fn decode(text: &str) -> Flow {
        let quotas = text
            .split(';')
            .filter_map(|part| {
                let mut f = part.split(' ');
                let q = QuotaKey {
                    token: f.next()?.to_string(),
                    max_concurrent: f.next()?.parse().ok()?,
                    interval_ms: f.next()?.parse().ok()?,
                    burst: f.next()?.parse().ok()?,
                    max_waiting: f.next()?.parse().ok()?,
                };
                f.next().is_none().then_some(q)
            })
            .collect();
        Flow { quotas }
    }

    /// The concurrency tokens a job of this flow holds while it runs.
    pub fn holds(flow: &Flow) -> Vec<String> {
        flow.quotas
            .iter()
            .filter(|q| q.max_concurrent > 0)
            .map(|q| q.token.clone())
            .collect()
    }
}

/// One served job's latency (list `latency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySample {
    /// When it was answered (s, Redis clock).
    pub second: u64,
    /// Enqueue to reply (ms).
    pub total_ms: u64,
    /// Time at the backend (ms).
    pub backend_ms: u64,
}

impl LatencySample {
    /// The record as stored.
    pub fn encode(&self) -> String {
        format!("{}\t{}\t{}", self.second, self.total_ms, self.backend_ms)
    }

    /// Reads a stored record.
    pub fn decode(text: &str) -> Option<LatencySample> {
        let mut f = text.split('\t');
        let s = LatencySample {
            second: f.next()?.parse().ok()?,
            total_ms: f.next()?.parse().ok()?,
            backend_ms: f.next()?.parse().ok()?,
        };
        f.next().is_none().then_some(s)
    }
}

/// A waiting job's member in `flow_jobs`: `flow<TAB>score<TAB>id`, the score
/// zero-padded to 16 digits so that members sort by flow, then score.
pub fn flow_member(flow: &str, score: u64, id: &str) -> String {
    format!("{flow}\t{score:016}\t{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let info = JobInfo {
            priority: 7,
            score: 7 * (1 << 46) + 12,
            flow: "user=alice&ip=1.2.3.4".into(),
            enqueued_ms: 1_700_000_000_123,
            deadline_ms: 1_700_000_030_123,
            front: "f1".into(),
            method: "POST".into(),
            attempts: 2,
            flow_def: "user=alice 1 0 0 0;ip=1.2.3.4 0 100 5 0".into(),
        };
        assert_eq!(JobInfo::decode(&info.encode()), Some(info.clone()));
        // An older record (version 2, text), or one cut short: not read.
        assert_eq!(JobInfo::decode(b"2\t50\t1\t-\t0\t0\tf\tGET\t0\t"), None);
        let whole = info.encode();
        assert_eq!(JobInfo::decode(&whole[..whole.len() - 1]), None);
        let owner = Owner {
            worker: "w".into(),
            token: "t".into(),
            claimed_ms: 5,
            streaming: false,
        };
        assert_eq!(Owner::decode(&owner.encode()), Some(owner.clone()));
        let streaming = Owner {
            streaming: true,
            ..owner.clone()
        };
        assert_eq!(Owner::decode(&streaming.encode()), Some(streaming));
        assert_eq!(Owner::decode(b"w\tt\t5"), None);
        let mut longer = owner.encode();
        longer.push(0);
        assert_eq!(Owner::decode(&longer), None);
        let flow = Flow {
            quotas: vec![QuotaKey {
                token: "user=a".into(),
                max_concurrent: 2,
                interval_ms: 12.5,
                burst: 3,
                max_waiting: 0,
            }],
        };
        assert_eq!(FlowDef::decode(&FlowDef::encode(&flow)), flow);
        assert_eq!(FlowDef::holds(&flow), ["user=a"]);
        let s = LatencySample {
            second: 1,
            total_ms: 2,
            backend_ms: 3,
        };
        assert_eq!(LatencySample::decode(&s.encode()), Some(s));
        let offer = Offer {
            worker: "w".into(),
            lease_ms: 30_000,
            max_inflight_total: 0,
            methods: "GET HEAD".into(),
        };
        assert_eq!(Offer::decode(&offer.encode()), Some(offer));
        let handed = Handed {
            generation: "1700000000.5".into(),
            id: "j".into(),
            // A payload need not be UTF-8.
            frame: vec![b'T', 0, 0xff, 0xfe],
            remaining_ms: 9_000,
            front: "f".into(),
            flow_def: String::new(),
        };
        let whole = handed.encode();
        assert_eq!(Handed::decode(&whole), Some(handed));
        assert_eq!(Handed::decode(&whole[..whole.len() - 1]), None);
    }

    #[test]
    fn flow_members_sort_by_flow_then_score() {
        let a = flow_member("u=a", 50 * (1 << 46) + 9, "x");
        let b = flow_member("u=a", 50 * (1 << 46) + 10, "y");
        let c = flow_member("u=a", 1 << 46, "z");
        assert!(c < a && a < b);
    }
}
