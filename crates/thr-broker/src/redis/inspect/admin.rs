//! The operator's actions (`thrctl purge`, `pause`, `resume`, `retry`).
//!
//! Each is either one atomic step (pause, retry) or a walk in slices: a
//! purge decides in Rust which jobs of a slice go, then withdraws that slice
//! with one `purge` script call, so that no call holds Redis for more than
//! a few milliseconds however many jobs wait, and production traffic runs
//! between slices. A job claimed between the read and the script is left
//! alone by the script: a purge never takes back a job that has started.

use std::time::Duration;

use bytes::Bytes;
use thr_core::envelope::{Job, Reply};

use super::reads::{PAGE, ScoreWalk};
use crate::BrokerError;
use crate::protocol::records::JobInfo;
use crate::protocol::scripts::{self as s, PurgeItem};
use crate::redis::{REPLY_TTL, RedisBroker};

/// Most jobs one `purge` script call withdraws. Each costs Redis about
/// 55 µs of CPU (ten commands and their Lua glue: the job's keys, its
/// flow, its quota counts, its client's answer; measured with 100,000 jobs
/// waiting on a slow 2-core VM), so a slice is about 1.4 ms of Redis's
/// time. Short slices matter beyond their average: a Redis busy for
/// several ms at a stretch is likelier to be preempted mid-call on a
/// crowded machine, and then a call stretches past 10 ms (slices of 50
/// averaged 2.8 ms but reached 10–20 ms under a parallel build; slices of
/// 25 stayed under 10 ms). More round trips cost the purge wall time, not
/// Redis.
const PURGE_SLICE: usize = 25;

/// What a purged job's client is told.
const PURGED: &str = "thr: request purged by an operator\n";

/// Which waiting jobs a purge takes.
#[derive(Debug, Clone, Copy)]
struct PurgeFilter {
    /// Redis's clock when the purge began (ms): later arrivals are spared.
    now_ms: u64,
    older_than: Option<Duration>,
    priority_above: Option<u8>,
}

impl PurgeFilter {
    fn takes(&self, info: &JobInfo) -> bool {
        info.enqueued_ms <= self.now_ms
            && self
                .older_than
                .is_none_or(|d| u128::from(self.now_ms - info.enqueued_ms) > d.as_millis())
            && self.priority_above.is_none_or(|p| info.priority > p)
    }
}

impl RedisBroker {
    /// Cancels the jobs of `name` waiting when it is called (only those
    /// waiting longer than `older_than`, and of a priority above — less
    /// urgent than — `priority_above`, when given); their clients get 503
    /// with `Retry-After: 60`. Returns how many were purged.
    ///
    /// The queue is walked in score order a page of [`PAGE`] jobs at a
    /// time: a ZRANGE and an HMGET of their records to choose, then one
    /// `purge` script call per [`PURGE_SLICE`] chosen ones.
    pub async fn purge(
        &self,
        name: &str,
        older_than: Option<Duration>,
        priority_above: Option<u8>,
    ) -> Result<u64, BrokerError> {
        let q = self.queue_keys(name);
        let filter = PurgeFilter {
            now_ms: self.now_ms().await?,
            older_than,
            priority_above,
        };
        let mut walk = ScoreWalk::new(&q.pending, PAGE).up_to_now(self).await?;
        let mut purged = 0;
        while let Some(page) = walk.next(self).await? {
            let ids: Vec<String> = page.into_iter().map(|(id, _)| id).collect();
            let infos: Vec<Option<Vec<u8>>> = self.hmget(&q.info, &ids).await?;
            let chosen: Vec<(String, String, Bytes)> = ids
                .into_iter()
                .zip(infos)
                .filter_map(|(id, info)| {
                    let info = JobInfo::decode(info.as_deref()?)?;
                    filter.takes(&info).then(|| {
                        let frame =
                            Reply::plain(&id, 503, PURGED, "thrctl", &[("retry-after", "60")]);
                        (id, info.front, frame)
                    })
                })
                .collect();
            for slice in chosen.chunks(PURGE_SLICE) {
                let items: Vec<PurgeItem<'_>> = slice
                    .iter()
                    .map(|(id, front, frame)| PurgeItem { id, front, frame })
                    .collect();
                let answer = self
                    .invoke(self.scripts.purge(self.keyspace(), &q, REPLY_TTL, &items))
                    .await?;
                purged += s::int(&answer)
                    .ok_or_else(|| BrokerError::Protocol(format!("purge: {answer:?}")))?
                    .max(0) as u64;
            }
        }
        Ok(purged)
    }

    /// Stops (`true`) or lets (`false`) workers claim from `name`; resuming
    /// rings the doorbell so that idle workers look at once.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), BrokerError> {
        let q = self.queue_keys(name);
        self.run(|mut conn| async move {
            if paused {
                redis::cmd("SET")
                    .arg(&q.paused)
                    .arg(1)
                    .query_async::<()>(&mut conn)
                    .await
            } else {
                redis::pipe()
                    .del(&q.paused)
                    .ignore()
                    .rpush(&q.wake, 1)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            }
        })
        .await
    }

    /// Puts dead letter `id` back on its queue, in its place, in one atomic
    /// step (nobody waits for its reply any more: it runs for its effect;
    /// its client's `timeout` starts again). Returns its queue, or None
    /// when no queue of `queues` holds it. A payload that cannot be decoded
    /// is an error: it could never run.
    pub async fn retry_dead(
        &self,
        queues: &[String],
        id: &str,
        timeout: Duration,
    ) -> Result<Option<String>, BrokerError> {
        for queue in queues {
            let q = self.queue_keys(queue);
            let frame: Option<Vec<u8>> = self
                .run(|mut conn| async move {
                    redis::cmd("HGET")
                        .arg(&q.dead)
                        .arg(id)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let Some(frame) = frame else { continue };
            let job = Job::decode(Bytes::from(frame.clone())).map_err(|e| {
                BrokerError::failed(format!("job {id} cannot be decoded, so it cannot run: {e}"))
            })?;
            // False: retried by someone else since we read it.
            if self
                .requeue_dead(queue, id, &job.meta, &frame, timeout)
                .await?
            {
                return Ok(Some(queue.clone()));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(priority: u8, enqueued_ms: u64) -> JobInfo {
        JobInfo {
            priority,
            score: 0,
            flow: "-".into(),
            enqueued_ms,
            deadline_ms: enqueued_ms + 30_000,
            front: "f".into(),
            method: "GET".into(),
            attempts: 0,
            flow_def: String::new(),
        }
    }

    #[test]
    fn purge_filters_combine_and_spare_later_arrivals() {
        let all = PurgeFilter {
            now_ms: 10_000,
            older_than: None,
            priority_above: None,
        };
        assert!(all.takes(&info(1, 10_000)));
        assert!(
            !all.takes(&info(1, 10_001)),
            "arrived after the purge began"
        );
        let old_and_low = PurgeFilter {
            older_than: Some(Duration::from_secs(5)),
            priority_above: Some(50),
            ..all
        };
        assert!(old_and_low.takes(&info(51, 4_999)));
        assert!(!old_and_low.takes(&info(51, 5_000)), "waited exactly 5 s");
        assert!(
            !old_and_low.takes(&info(50, 0)),
            "priority 50 is not above 50"
        );
    }
}
