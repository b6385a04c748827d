//! What `thrctl` shows: the operator's data types, read from Redis by
//! [`super::reads`] and serialized as-is for `--json` (their field names
//! are thrctl's stable JSON interface, documented in its README). Nothing
//! here touches Redis; [`Latency::from_samples`] is plain arithmetic over
//! the samples the release script records.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Serialize;

use crate::protocol::records::LatencySample;

/// One queue at a glance.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueOverview {
    /// Queue name.
    pub name: String,
    /// Jobs waiting.
    pub waiting: u64,
    /// Waiting jobs per priority.
    pub waiting_by_priority: BTreeMap<u8, u64>,
    /// Jobs running now (live leases).
    pub running: u64,
    /// Jobs started per second over the last minute: the figure the
    /// enqueue script refuses by (the `stats` script, one definition).
    pub drain_per_second: f64,
    /// Age of the oldest waiting job, ms.
    pub oldest_waiting_ms: Option<u64>,
    /// Whether `thrctl pause` holds it.
    pub paused: bool,
    /// Jobs in its dead letters.
    pub dead_letters: u64,
    /// Latency of the jobs served over the last minute (None: none served).
    pub latency: Option<Latency>,
}

/// Latency percentiles of a queue's recently served jobs, in ms. `total`
/// runs from enqueue to reply; `wait` is the part spent before the backend
/// (queueing, quotas, thr's own overhead).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    /// Jobs the percentiles are taken over.
    pub samples: u64,
    /// Median total time.
    pub total_p50: u64,
    /// 90th percentile of the total time.
    pub total_p90: u64,
    /// 99th percentile of the total time.
    pub total_p99: u64,
    /// Median wait before the backend.
    pub wait_p50: u64,
    /// 99th percentile of the wait before the backend.
    pub wait_p99: u64,
    /// Median time at the backend.
    pub backend_p50: u64,
    /// 99th percentile of the time at the backend.
    pub backend_p99: u64,
}

impl Latency {
    /// Percentiles over stored [`LatencySample`]s (the queue's `latency`
    /// list) taken in the minute up to second `now_sec`; records that do
    /// not decode are skipped.
    pub fn from_samples<'a>(
        samples: impl IntoIterator<Item = &'a str>,
        now_sec: u64,
    ) -> Option<Latency> {
        let (mut total, mut wait, mut backend) = (Vec::new(), Vec::new(), Vec::new());
        for sample in samples.into_iter().filter_map(LatencySample::decode) {
            if sample.second + 60 <= now_sec || sample.second > now_sec + 1 {
                continue;
            }
            total.push(sample.total_ms);
            backend.push(sample.backend_ms);
            wait.push(sample.total_ms.saturating_sub(sample.backend_ms));
        }
        if total.is_empty() {
            return None;
        }
        for v in [&mut total, &mut wait, &mut backend] {
            v.sort_unstable();
        }
        Some(Latency {
            samples: total.len() as u64,
            total_p50: percentile(&total, 50),
            total_p90: percentile(&total, 90),
            total_p99: percentile(&total, 99),
            wait_p50: percentile(&wait, 50),
            wait_p99: percentile(&wait, 99),
            backend_p50: percentile(&backend, 50),
            backend_p99: percentile(&backend, 99),
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty values.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// A waiting job.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WaitingJob {
    /// Job id.
    pub id: String,
    /// Request method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Priority.
    pub priority: u8,
    /// Its quota keys (its flow).
    pub quotas: String,
    /// Time waited so far, ms.
    pub age_ms: u64,
    /// The front waiting for its reply.
    pub front: String,
}

/// A running job.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunningJob {
    /// Queue name.
    pub queue: String,
    /// Job id.
    pub id: String,
    /// The worker running it.
    pub worker: String,
    /// Request method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Time since it started, ms.
    pub age_ms: u64,
    /// Time left on its lease, ms (negative: expired, about to be reaped).
    pub lease_left_ms: i64,
}

/// One quota key in use.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuotaUsage {
    /// The limit's name.
    pub limit: String,
    /// The key value (escaped as in Redis).
    pub value: String,
    /// Requests holding a slot now.
    pub running: u64,
    /// Requests waiting for it.
    pub waiting: u64,
    /// Ms until the rate quota is back to a full burst (0: idle).
    pub rate_busy_ms: u64,
    /// Its `max_concurrent`, as recorded with the flows waiting for it
    /// (None: nobody waits, or no concurrency cap). Lets an operator see
    /// saturation without the configuration file.
    pub max: Option<u64>,
}

impl QuotaUsage {
    /// An idle entry for quota token `token` (`LIMIT=value`).
    pub(crate) fn idle(token: &str) -> QuotaUsage {
        let (limit, value) = token.split_once('=').unwrap_or((token, ""));
        QuotaUsage {
            limit: limit.to_string(),
            value: value.to_string(),
            running: 0,
            waiting: 0,
            rate_busy_ms: 0,
            max: None,
        }
    }
}

/// A live daemon.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DaemonInfo {
    /// `http2redis` or `redis2http`.
    pub kind: String,
    /// Its id.
    pub id: String,
    /// Ms since its last heartbeat.
    pub seen_ms_ago: u64,
    /// What it says about itself.
    pub info: serde_json::Value,
}

/// A job set aside.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Queue name.
    pub queue: String,
    /// Job id.
    pub id: String,
    /// Why.
    pub reason: String,
    /// Request method (when decodable).
    pub method: Option<String>,
    /// Request target (when decodable).
    pub target: Option<String>,
}

/// A job in full.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobDetail {
    /// Queue name.
    pub queue: String,
    /// `waiting`, `running` or `dead`.
    pub state: String,
    /// Its metadata, as JSON.
    pub meta: serde_json::Value,
    /// Body size in bytes.
    pub body_bytes: usize,
    /// The body itself.
    #[serde(skip)]
    pub body: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_over_the_last_minute_only() {
        let mut samples: Vec<String> = (1..=100)
            .map(|ms| format!("1000\t{}\t{}", ms + 5, ms))
            .collect();
        // Older than a minute, and garbage: ignored.
        samples.push("900\t99999\t1".into());
        samples.push("not a sample".into());
        let l = Latency::from_samples(samples.iter().map(String::as_str), 1030).unwrap();
        assert_eq!(l.samples, 100);
        assert_eq!((l.total_p50, l.total_p90, l.total_p99), (55, 95, 104));
        assert_eq!((l.backend_p50, l.backend_p99), (50, 99));
        assert_eq!((l.wait_p50, l.wait_p99), (5, 5));
        assert_eq!(Latency::from_samples(["1000\t5\t1"], 1100), None);
    }

    #[test]
    fn a_single_sample_is_every_percentile() {
        let l = Latency::from_samples(["7\t40\t30"], 7).unwrap();
        assert_eq!((l.total_p50, l.total_p99, l.wait_p99), (40, 40, 10));
    }

    #[test]
    fn quota_tokens_split_at_the_first_equals_sign() {
        let u = QuotaUsage::idle("per_user=a%3Db");
        assert_eq!((u.limit.as_str(), u.value.as_str()), ("per_user", "a%3Db"));
        assert_eq!(QuotaUsage::idle("odd").value, "");
    }
}
