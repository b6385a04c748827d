//! The records scripts and Rust share, one codec each.
//!
//! Records are tab-separated text: cheap to split in Lua with one pattern,
//! readable in `redis-cli`. Each one's Lua twin lives in
//! `scripts/lib/records.lua` and reads the same fields in the same order;
//! the e2e test `protocol::lua_and_rust_read_records_alike` keeps them
//! honest. Change a field here and there, bump [`RECORD_VERSION`].

use std::fmt::Write;

use thr_core::quota::{Flow, QuotaKey};

/// Version tag at the head of a [`JobInfo`].
pub const RECORD_VERSION: &str = "2";

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
    pub fn encode(&self) -> String {
        format!(
            "{RECORD_VERSION}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.priority,
            self.score,
            self.flow,
            self.enqueued_ms,
            self.deadline_ms,
            self.front,
            self.method,
            self.attempts,
            self.flow_def
        )
    }

    /// Reads a stored record; None when it is not one of this version.
    pub fn decode(text: &str) -> Option<JobInfo> {
        let mut f = text.split('\t');
        if f.next()? != RECORD_VERSION {
            return None;
        }
        let info = JobInfo {
            priority: f.next()?.parse().ok()?,
            score: f.next()?.parse().ok()?,
            flow: f.next()?.to_string(),
            enqueued_ms: f.next()?.parse().ok()?,
            deadline_ms: f.next()?.parse().ok()?,
            front: f.next()?.to_string(),
            method: f.next()?.to_string(),
            attempts: f.next()?.parse().ok()?,
            flow_def: f.next()?.to_string(),
        };
        f.next().is_none().then_some(info)
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
    pub fn encode(&self) -> String {
        let streaming = if self.streaming { "\ts" } else { "" };
        format!(
            "{}\t{}\t{}{streaming}",
            self.worker, self.token, self.claimed_ms
        )
    }

    /// Reads a stored record.
    pub fn decode(text: &str) -> Option<Owner> {
        let mut f = text.split('\t');
        let owner = Owner {
            worker: f.next()?.to_string(),
            token: f.next()?.to_string(),
            claimed_ms: f.next()?.parse().ok()?,
            streaming: false,
        };
        match (f.next(), f.next()) {
            (None, _) => Some(owner),
            (Some("s"), None) => Some(Owner {
                streaming: true,
                ..owner
            }),
            _ => None,
        }
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
        assert_eq!(JobInfo::decode(&info.encode()), Some(info));
        assert_eq!(JobInfo::decode("1\t50\t1\t-\t0\t0\tf\tGET\t0\t"), None);
        let owner = Owner {
            worker: "w".into(),
            token: "t".into(),
            claimed_ms: 5,
            streaming: false,
        };
        assert_eq!(Owner::decode(&owner.encode()), Some(owner.clone()));
        let streaming = Owner {
            streaming: true,
            ..owner
        };
        assert_eq!(Owner::decode(&streaming.encode()), Some(streaming));
        assert_eq!(Owner::decode("w\tt\t5\tx"), None);
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
    }

    #[test]
    fn flow_members_sort_by_flow_then_score() {
        let a = flow_member("u=a", 50 * (1 << 46) + 9, "x");
        let b = flow_member("u=a", 50 * (1 << 46) + 10, "y");
        let c = flow_member("u=a", 1 << 46, "z");
        assert!(c < a && a < b);
    }
}
