//! The operator's read-only queries (`thrctl status`, `queues`, `queue`,
//! `running`, `limits`, `show`, `dead-letters`, `top`), and the paging
//! primitives they and [`super::admin`] share.
//!
//! Reads run beside production traffic, so none of them may hold Redis for
//! long however big the backlog: every command is bounded by a page
//! ([`PAGE`] members, fields or keys), collections are walked with SCAN,
//! HSCAN or score ranges instead of being read whole, and every record is
//! decoded by its codec in [`crate::protocol::records`]. A page costs
//! Redis under a millisecond, so 100,000 waiting jobs make `thrctl queues`
//! slower (a few hundred short calls), never Redis. The price: a glance
//! taken while jobs move between pages may miss or count twice a job that
//! moved; the totals (`waiting`, `running`) come from one command each and
//! are exact.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use redis::FromRedisValue;
use thr_core::envelope::Job;

use super::model::{
    DaemonInfo, DeadLetter, JobDetail, Latency, QueueOverview, QuotaUsage, RunningJob, WaitingJob,
};
use crate::protocol::records::{FlowDef, JobInfo, Owner};
use crate::protocol::scripts as s;
use crate::redis::RedisBroker;
use crate::{BrokerError, Daemon};

/// Most members, fields or keys one command reads or names. Measured with
/// 100,000 jobs waiting, on a busy 2-core machine: an HMGET of 500 job
/// records costs Redis about 0.7 ms, a ZRANGE of 500 members less.
pub(super) const PAGE: usize = 500;

/// A job's payload, its dead-letter payload, and its pending and lease scores.
type JobLookup = (Option<Vec<u8>>, Option<Vec<u8>>, Option<f64>, Option<f64>);

/// Walks a sorted set in score order, a page at a time, by score rather than
/// by rank: members removed behind the walk (claimed, purged) shift nothing,
/// so none is skipped. Members sharing a score across a page boundary are
/// told apart by id. Only scores up to `max` are visited, so that a walk
/// ends even while new members keep arriving behind it.
pub(super) struct ScoreWalk<'k> {
    key: &'k str,
    max: String,
    page: usize,
    /// The last score returned, and the members returned at exactly it.
    boundary: Option<(f64, HashSet<String>)>,
    done: bool,
}

impl<'k> ScoreWalk<'k> {
    /// A walk over every member of `key`, `page` at a time.
    pub(super) fn new(key: &'k str, page: usize) -> ScoreWalk<'k> {
        ScoreWalk {
            key,
            max: "+inf".into(),
            page: page.max(1),
            boundary: None,
            done: false,
        }
    }

    /// Stops the walk at the highest score `key` holds now (an empty set
    /// ends it at once).
    pub(super) async fn up_to_now(mut self, broker: &RedisBroker) -> Result<Self, BrokerError> {
        let key = self.key;
        let last: Vec<(String, f64)> = broker
            .run(|mut conn| async move {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(-1)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        match last.first() {
            Some((_, score)) => self.max = score.to_string(),
            None => self.done = true,
        }
        Ok(self)
    }

    /// The next page of `(member, score)`, or None at the end.
    pub(super) async fn next(
        &mut self,
        broker: &RedisBroker,
    ) -> Result<Option<Vec<(String, f64)>>, BrokerError> {
        let mut offset = 0;
        while !self.done {
            let min = self
                .boundary
                .as_ref()
                .map_or("-inf".to_string(), |(score, _)| score.to_string());
            let (key, max, page) = (self.key, self.max.as_str(), self.page);
            let rows: Vec<(String, f64)> = broker
                .run(|mut conn| async move {
                    redis::cmd("ZRANGE")
                        .arg(key)
                        .arg(&min)
                        .arg(max)
                        .arg("BYSCORE")
                        .arg("LIMIT")
                        .arg(offset)
                        .arg(page)
                        .arg("WITHSCORES")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let full = rows.len() == page;
            self.done = !full;
            let fresh: Vec<(String, f64)> = rows
                .into_iter()
                .filter(|(id, score)| {
                    !matches!(&self.boundary, Some((b, seen)) if b == score && seen.contains(id))
                })
                .collect();
            let Some(&(_, last)) = fresh.last() else {
                // A whole page of members already returned (that many
                // sharing one score): look past them.
                offset += page;
                continue;
            };
            let at_last = fresh.iter().filter(|(_, s)| *s == last).map(|(id, _)| id);
            match &mut self.boundary {
                Some((b, seen)) if *b == last => seen.extend(at_last.cloned()),
                _ => self.boundary = Some((last, at_last.cloned().collect())),
            }
            return Ok(Some(fresh));
        }
        Ok(None)
    }
}

impl RedisBroker {
    /// Now on Redis's clock (ms): ages and deadlines are all measured on it.
    pub(super) async fn now_ms(&self) -> Result<u64, BrokerError> {
        self.run(|mut conn| async move {
            let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
            Ok(s * 1000 + us / 1000)
        })
        .await
    }

    /// The values of `fields` in hash `key`, same order, [`PAGE`] fields
    /// per HMGET.
    pub(super) async fn hmget<T: FromRedisValue>(
        &self,
        key: &str,
        fields: &[String],
    ) -> Result<Vec<Option<T>>, BrokerError> {
        let mut out = Vec::with_capacity(fields.len());
        for page in fields.chunks(PAGE) {
            let values: Vec<Option<T>> = self
                .run(|mut conn| async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg(page)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            out.extend(values);
        }
        Ok(out)
    }

    /// The job records of `ids` in `info` (None: gone, or unreadable).
    async fn job_infos(
        &self,
        info: &str,
        ids: &[String],
    ) -> Result<Vec<Option<JobInfo>>, BrokerError> {
        let raw: Vec<Option<Vec<u8>>> = self.hmget(info, ids).await?;
        Ok(raw
            .into_iter()
            .map(|r| r.as_deref().and_then(JobInfo::decode))
            .collect())
    }

    /// Calls `each` with every field and value of hash `key`, read with
    /// HSCAN a page at a time (a field may come twice if the hash is
    /// rehashed meanwhile; callers keep the last value).
    pub(super) async fn hscan<V: FromRedisValue>(
        &self,
        key: &str,
        mut each: impl FnMut(Vec<(String, V)>),
    ) -> Result<(), BrokerError> {
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<(String, V)>) = self
                .run(|mut conn| async move {
                    redis::cmd("HSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            each(batch);
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Names of the queues that have held jobs (found by key, with SCAN:
    /// unlike KEYS, it never blocks a busy Redis for the whole keyspace)
    /// or that a live worker serves (its heartbeat lists them), so that a
    /// configured queue is known before its first request.
    pub async fn queue_names(&self) -> Result<Vec<String>, BrokerError> {
        let pattern = self.keyspace().queue_pattern();
        let mut names = Vec::new();
        let mut cursor = 0u64;
        loop {
            let pattern = &pattern;
            let (next, batch): (u64, Vec<String>) = self
                .run(|mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            names.extend(
                batch
                    .iter()
                    .filter_map(|k| self.keyspace().queue_of(k))
                    .map(str::to_string),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for daemon in self.daemons().await? {
            if let Some(served) = daemon.info.get("queues").and_then(|q| q.as_array()) {
                names.extend(served.iter().filter_map(|q| q.as_str()).map(str::to_string));
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// One queue at a glance. The waiting jobs' records are read a page at
    /// a time, so a huge backlog never blocks Redis for long while
    /// production traffic waits behind an operator's `thrctl top`.
    pub async fn queue_overview(&self, name: &str) -> Result<QueueOverview, BrokerError> {
        let q = self.queue_keys(name);
        let now = self.now_ms().await?;
        // Waiting count and drain rate: the figures enqueue refuses by.
        let stats = s::parse_list(self.invoke(self.scripts.stats(&q)).await?, "stats")?;
        let waiting = stats.first().and_then(s::int).unwrap_or(0).max(0) as u64;
        let drain_per_second = stats
            .get(1)
            .and_then(s::string)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0.0);
        let (running, paused, dead, samples): (u64, bool, u64, Vec<String>) = {
            let q = &q;
            self.run(|mut conn| async move {
                redis::pipe()
                    .zcount(&q.leases, format!("({now}"), "+inf")
                    .exists(&q.paused)
                    .hlen(&q.dead)
                    .lrange(&q.latency, 0, -1)
                    .query_async(&mut conn)
                    .await
            })
            .await?
        };
        let mut by_priority = BTreeMap::new();
        let mut oldest = None;
        let mut walk = ScoreWalk::new(&q.pending, PAGE);
        while let Some(page) = walk.next(self).await? {
            let ids: Vec<String> = page.into_iter().map(|(id, _)| id).collect();
            for info in self.job_infos(&q.info, &ids).await?.into_iter().flatten() {
                *by_priority.entry(info.priority).or_insert(0) += 1;
                let age = now.saturating_sub(info.enqueued_ms);
                oldest = Some(oldest.map_or(age, |o: u64| o.max(age)));
            }
        }
        Ok(QueueOverview {
            name: name.to_string(),
            waiting,
            waiting_by_priority: by_priority,
            running,
            drain_per_second,
            oldest_waiting_ms: oldest,
            paused,
            dead_letters: dead,
            latency: Latency::from_samples(samples.iter().map(String::as_str), now / 1000),
        })
    }

    /// Waiting jobs of `name` in order (flows blocked by a full quota are
    /// skipped at claim time), from `offset`, at most `limit`. Jobs claimed
    /// while the page is read are left out.
    pub async fn waiting_jobs(
        &self,
        name: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<WaitingJob>, BrokerError> {
        let q = self.queue_keys(name);
        let now = self.now_ms().await?;
        let mut out = Vec::new();
        let mut start = offset;
        let end = offset.saturating_add(limit);
        while start < end {
            let stop = end.min(start + PAGE) - 1;
            let pending = &q.pending;
            let ids: Vec<String> = self
                .run(|mut conn| async move {
                    redis::cmd("ZRANGE")
                        .arg(pending)
                        .arg(start)
                        .arg(stop)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let infos = self.job_infos(&q.info, &ids).await?;
            let frames: Vec<Option<Vec<u8>>> = self.hmget(&q.jobs, &ids).await?;
            let got = ids.len();
            for ((id, info), frame) in ids.into_iter().zip(infos).zip(frames) {
                let Some(info) = info else { continue };
                out.push(WaitingJob {
                    id,
                    method: info.method,
                    target: target_of(frame),
                    priority: info.priority,
                    quotas: info.flow,
                    age_ms: now.saturating_sub(info.enqueued_ms),
                    front: info.front,
                });
            }
            if got < stop + 1 - start {
                break;
            }
            start = stop + 1;
        }
        Ok(out)
    }

    /// Running jobs of `name`, longest first.
    pub async fn running_jobs(&self, name: &str) -> Result<Vec<RunningJob>, BrokerError> {
        let q = self.queue_keys(name);
        let now = self.now_ms().await?;
        let mut jobs = Vec::new();
        let mut walk = ScoreWalk::new(&q.leases, PAGE);
        while let Some(page) = walk.next(self).await? {
            let ids: Vec<String> = page.iter().map(|(id, _)| id.clone()).collect();
            let owners: Vec<Option<Vec<u8>>> = self.hmget(&q.owners, &ids).await?;
            let infos = self.job_infos(&q.info, &ids).await?;
            let frames: Vec<Option<Vec<u8>>> = self.hmget(&q.jobs, &ids).await?;
            for (((id, until), owner), (info, frame)) in page
                .into_iter()
                .zip(owners)
                .zip(infos.into_iter().zip(frames))
            {
                let owner = owner.as_deref().and_then(Owner::decode);
                jobs.push(RunningJob {
                    queue: name.to_string(),
                    id,
                    worker: owner.as_ref().map_or(String::new(), |o| o.worker.clone()),
                    method: info.map_or("?".into(), |i| i.method),
                    target: target_of(frame),
                    age_ms: now.saturating_sub(owner.map_or(now, |o| o.claimed_ms)),
                    lease_left_ms: until as i64 - now as i64,
                });
            }
        }
        jobs.sort_by_key(|j| std::cmp::Reverse(j.age_ms));
        Ok(jobs)
    }

    /// Every quota token in use: running jobs (`held`), rate state
    /// (`gcra`), waiting jobs (`quota_waiting`), and the concurrency caps
    /// recorded with the flows waiting in each queue (`flowdefs`). Every
    /// hash is read with HSCAN, a page at a time.
    pub async fn quota_usage(&self) -> Result<Vec<QuotaUsage>, BrokerError> {
        let now = self.now_ms().await?;
        let ks = self.keyspace();
        let mut usage: BTreeMap<String, QuotaUsage> = BTreeMap::new();
        let mut running = Vec::new();
        self.hscan::<i64>(&ks.held, |page| running.extend(page))
            .await?;
        for (token, n) in running.into_iter().filter(|(_, n)| *n > 0) {
            entry(&mut usage, &token).running = n as u64;
        }
        let mut rates = Vec::new();
        self.hscan::<f64>(&ks.gcra, |page| rates.extend(page))
            .await?;
        for (token, tat) in rates.into_iter().filter(|(_, tat)| *tat > now as f64) {
            entry(&mut usage, &token).rate_busy_ms = (tat - now as f64) as u64;
        }
        let mut waiting = Vec::new();
        self.hscan::<i64>(&ks.quota_waiting, |page| waiting.extend(page))
            .await?;
        for (token, n) in waiting.into_iter().filter(|(_, n)| *n > 0) {
            entry(&mut usage, &token).waiting = n as u64;
        }
        for queue in self.queue_names().await? {
            let q = self.queue_keys(&queue);
            self.hscan::<String>(&q.flowdefs, |page| {
                for (_, def) in page {
                    for quota in FlowDef::decode(&def).quotas {
                        if let (Some(u), max @ 1..) =
                            (usage.get_mut(&quota.token), quota.max_concurrent)
                        {
                            u.max = Some(u64::from(max));
                        }
                    }
                }
            })
            .await?;
        }
        Ok(usage.into_values().collect())
    }

    /// Live fronts and workers: those whose silence is within their kind's
    /// timeout, counted from Redis's last resumption at the earliest (as
    /// `lib/liveness.lua` counts it, so a daemon is not shown dead just
    /// because Redis was paused). Unlike the scripts, which judge nobody
    /// while no daemon beats at all (they must not take work back while
    /// unsure), this view drops daemons that went silent: with every daemon
    /// dead, an operator sees none.
    pub async fn daemons(&self) -> Result<Vec<DaemonInfo>, BrokerError> {
        let now = self.now_ms().await?;
        let ks = self.keyspace();
        let resumed: Option<u64> = self
            .run(|mut conn| async move {
                redis::cmd("HGET")
                    .arg(&ks.liveness)
                    .arg("resumed")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let mut out = Vec::new();
        for (kind, name) in [
            (Daemon::Front, "http2redis"),
            (Daemon::Worker, "redis2http"),
        ] {
            let set = ks.beats(kind);
            let beats: Vec<(String, f64)> = self
                .run(|mut conn| async move {
                    redis::cmd("ZRANGE")
                        .arg(set)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let timeout = kind.timeout().as_millis() as u64;
            let live: Vec<(String, u64)> = beats
                .into_iter()
                .map(|(id, beat)| (id, beat as u64))
                .filter(|(_, beat)| {
                    now.saturating_sub((*beat).max(resumed.unwrap_or(0))) <= timeout
                })
                .collect();
            for page in live.chunks(PAGE) {
                let keys: Vec<String> = page
                    .iter()
                    .map(|(id, _)| ks.daemon_info(kind, id))
                    .collect();
                let keys = &keys;
                let infos: Vec<Option<String>> = self
                    .run(|mut conn| async move {
                        redis::cmd("MGET").arg(keys).query_async(&mut conn).await
                    })
                    .await?;
                for ((id, beat), info) in page.iter().zip(infos) {
                    out.push(DaemonInfo {
                        kind: name.to_string(),
                        id: id.clone(),
                        seen_ms_ago: now.saturating_sub(*beat),
                        info: info
                            .and_then(|i| serde_json::from_str(&i).ok())
                            .unwrap_or(serde_json::Value::Null),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Finds job `id` in `queues`: waiting, running or dead.
    pub async fn job(&self, queues: &[String], id: &str) -> Result<Option<JobDetail>, BrokerError> {
        for queue in queues {
            let q = self.queue_keys(queue);
            let (frame, dead, pending, leased): JobLookup = {
                let q = &q;
                self.run(|mut conn| async move {
                    redis::pipe()
                        .hget(&q.jobs, id)
                        .hget(&q.dead, id)
                        .zscore(&q.pending, id)
                        .zscore(&q.leases, id)
                        .query_async(&mut conn)
                        .await
                })
                .await?
            };
            let (state, frame) = match (frame, dead) {
                (Some(f), _) if leased.is_some() && pending.is_none() => ("running", f),
                (Some(f), _) => ("waiting", f),
                (None, Some(f)) => ("dead", f),
                (None, None) => continue,
            };
            let (meta, body) = match Job::decode(Bytes::from(frame.clone())) {
                Ok(job) => (
                    serde_json::to_value(&job.meta).unwrap_or_default(),
                    job.body,
                ),
                Err(err) => (
                    serde_json::json!({ "undecodable": err.to_string() }),
                    Bytes::from(frame),
                ),
            };
            return Ok(Some(JobDetail {
                queue: queue.clone(),
                state: state.to_string(),
                meta,
                body_bytes: body.len(),
                body,
            }));
        }
        Ok(None)
    }

    /// The dead letters of `queues`, by queue then id. Reasons are read with
    /// HSCAN, a page at a time, and each page's payloads with one HMGET.
    pub async fn dead_letters(&self, queues: &[String]) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut out = Vec::new();
        for queue in queues {
            let q = self.queue_keys(queue);
            let mut reasons: BTreeMap<String, String> = BTreeMap::new();
            self.hscan::<String>(&q.dead_reasons, |page| reasons.extend(page))
                .await?;
            let reasons: Vec<(String, String)> = reasons.into_iter().collect();
            for page in reasons.chunks(PAGE) {
                let ids: Vec<String> = page.iter().map(|(id, _)| id.clone()).collect();
                let frames: Vec<Option<Vec<u8>>> = self.hmget(&q.dead, &ids).await?;
                for ((id, reason), frame) in page.iter().zip(frames) {
                    let job = frame.and_then(|f| Job::decode(Bytes::from(f)).ok());
                    out.push(DeadLetter {
                        queue: queue.clone(),
                        id: id.clone(),
                        reason: reason.clone(),
                        method: job.as_ref().map(|j| j.meta.method.clone()),
                        target: job.map(|j| j.meta.target),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The usage entry of quota `token`, made idle when new.
fn entry<'a>(usage: &'a mut BTreeMap<String, QuotaUsage>, token: &str) -> &'a mut QuotaUsage {
    usage
        .entry(token.to_string())
        .or_insert_with(|| QuotaUsage::idle(token))
}

/// A stored job's request target, `?` when it cannot be read.
fn target_of(frame: Option<Vec<u8>>) -> String {
    frame
        .and_then(|f| Job::decode(Bytes::from(f)).ok())
        .map_or("?".into(), |j| j.meta.target)
}
