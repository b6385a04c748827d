//! The operator's view of Redis (what `thrctl` reads and does): queue
//! depths, waiting and running jobs, quota usage, live daemons, purge,
//! pause, dead letters. Reads are plain commands, so they never block the
//! claim path for long; actions that must be atomic are scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use thr_core::envelope::Job;
use thr_core::keys::{self, QueueKeys};

use super::{REPLY_TTL, RedisBroker};
use crate::{Admission, Broker, BrokerError, NewJob};

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
    /// Jobs started per second over the last minute.
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
    /// Percentiles over samples `second<TAB>total_ms<TAB>backend_ms` (see
    /// [`QueueKeys::latency`]) taken in the minute up to second `now_sec`.
    pub fn from_samples<'a>(
        samples: impl IntoIterator<Item = &'a str>,
        now_sec: u64,
    ) -> Option<Latency> {
        let (mut total, mut wait, mut backend) = (Vec::new(), Vec::new(), Vec::new());
        for sample in samples {
            let mut f = sample.split('\t').map(|v| v.parse::<u64>().ok());
            let (Some(Some(sec)), Some(Some(t)), Some(Some(b))) = (f.next(), f.next(), f.next())
            else {
                continue;
            };
            if sec + 60 <= now_sec || sec > now_sec + 1 {
                continue;
            }
            total.push(t);
            backend.push(b);
            wait.push(t.saturating_sub(b));
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
    /// Its `max_concurrent`, as recorded with the jobs waiting for it (None:
    /// nobody waits, or no concurrency cap). Lets an operator see saturation
    /// without the configuration file.
    pub max: Option<u64>,
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

/// A job's payload, its dead-letter payload, and its pending and lease scores.
type JobLookup = (Option<Vec<u8>>, Option<Vec<u8>>, Option<f64>, Option<f64>);

fn parse_info(info: &str) -> (u8, String, u64, String) {
    let mut f = info.split('\t');
    let prio = f.next().and_then(|p| p.parse().ok()).unwrap_or(50);
    let _score = f.next();
    let flow = f.next().unwrap_or("-").to_string();
    let enqueued = f.next().and_then(|e| e.parse().ok()).unwrap_or(0);
    let front = f.next().unwrap_or("").to_string();
    (prio, flow, enqueued, front)
}

impl RedisBroker {
    async fn now_ms(&self) -> Result<u64, BrokerError> {
        self.run(|mut conn| async move {
            let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
            Ok(s * 1000 + us / 1000)
        })
        .await
    }

    /// Cheap numbers for metrics: jobs waiting in `queue`, and jobs waiting
    /// per quota token (all queues).
    pub async fn gauges(&self, queue: &str) -> Result<(u64, BTreeMap<String, u64>), BrokerError> {
        let k = QueueKeys::new(queue);
        self.run(|mut conn| async move {
            redis::pipe()
                .zcard(&k.pending)
                .hgetall(keys::quota_waiting())
                .query_async(&mut conn)
                .await
        })
        .await
    }

    /// Keys matching `pattern`, found with SCAN: unlike KEYS, it never
    /// blocks a busy Redis for the whole keyspace at once.
    async fn scan(&self, pattern: &str) -> Result<Vec<String>, BrokerError> {
        let mut found = Vec::new();
        let mut cursor = 0u64;
        loop {
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
            found.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Names of the queues that have held jobs (found by key).
    pub async fn queue_names(&self) -> Result<Vec<String>, BrokerError> {
        let found = self.scan("thr:{q:*}:seq").await?;
        let mut names: Vec<String> = found
            .iter()
            .filter_map(|k| {
                k.strip_prefix("thr:{q:")?
                    .strip_suffix("}:seq")
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// One queue at a glance. The waiting jobs are read a page at a time,
    /// so that a huge backlog never blocks Redis for long while production
    /// traffic waits behind an operator's `thrctl top`.
    pub async fn queue_overview(&self, name: &str) -> Result<QueueOverview, BrokerError> {
        const PAGE: usize = 2000;
        let k = QueueKeys::new(name);
        let now = self.now_ms().await?;
        let (waiting, running, drained, paused, dead, samples): (
            u64,
            u64,
            BTreeMap<u64, u64>,
            bool,
            u64,
            Vec<String>,
        ) = self
            .run(|mut conn| async move {
                redis::pipe()
                    .zcard(&k.pending)
                    .zcount(&k.leases, format!("({now}"), "+inf")
                    .hgetall(&k.drained)
                    .exists(&k.paused)
                    .hlen(&k.dead)
                    .lrange(&k.latency, 0, -1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let mut by_priority = BTreeMap::new();
        let mut oldest = None;
        // Jobs claimed between pages shift the ranks: a glance may miss or
        // count twice a few jobs of a busy queue; `waiting` is exact.
        let pending = QueueKeys::new(name).pending;
        let mut start = 0;
        while start < waiting as usize {
            let pending = &pending;
            let ids: Vec<String> = self
                .run(|mut conn| async move {
                    redis::cmd("ZRANGE")
                        .arg(pending)
                        .arg(start)
                        .arg(start + PAGE - 1)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            if ids.is_empty() {
                break;
            }
            for info in self.job_infos(name, &ids).await?.iter().flatten() {
                let (prio, _, enqueued, _) = parse_info(info);
                *by_priority.entry(prio).or_insert(0) += 1;
                if enqueued > 0 {
                    let age = now.saturating_sub(enqueued);
                    oldest = Some(oldest.map_or(age, |o: u64| o.max(age)));
                }
            }
            start += PAGE;
        }
        let sec = now / 1000;
        let recent: u64 = drained
            .iter()
            .filter(|(s, _)| **s + 60 > sec && **s <= sec)
            .map(|(_, n)| n)
            .sum();
        Ok(QueueOverview {
            name: name.to_string(),
            waiting,
            waiting_by_priority: by_priority,
            running,
            drain_per_second: recent as f64 / 60.0,
            oldest_waiting_ms: oldest,
            paused,
            dead_letters: dead,
            latency: Latency::from_samples(samples.iter().map(String::as_str), sec),
        })
    }

    /// The values of `ids` in one of a queue's per-job hashes (`hash`
    /// picks it: job infos, frames), in one HMGET.
    async fn per_job<T: redis::FromRedisValue>(
        &self,
        queue: &str,
        hash: fn(&QueueKeys) -> &String,
        ids: &[String],
    ) -> Result<Vec<Option<T>>, BrokerError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let k = QueueKeys::new(queue);
        self.run(|mut conn| async move {
            redis::cmd("HMGET")
                .arg(hash(&k))
                .arg(ids)
                .query_async(&mut conn)
                .await
        })
        .await
    }

    async fn job_infos(
        &self,
        queue: &str,
        ids: &[String],
    ) -> Result<Vec<Option<String>>, BrokerError> {
        self.per_job(queue, |k| &k.jobinfo, ids).await
    }

    async fn job_frames(
        &self,
        queue: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, BrokerError> {
        self.per_job(queue, |k| &k.jobs, ids).await
    }

    /// Waiting jobs of `name`, by priority then arrival (flows blocked by a
    /// full quota are skipped at claim time), from `offset`, at most `limit`.
    pub async fn waiting_jobs(
        &self,
        name: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<WaitingJob>, BrokerError> {
        let k = QueueKeys::new(name);
        let now = self.now_ms().await?;
        let stop = (offset + limit).saturating_sub(1) as isize;
        let ids: Vec<String> = self
            .run(|mut conn| async move {
                redis::cmd("ZRANGE")
                    .arg(&k.pending)
                    .arg(offset)
                    .arg(stop)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let infos = self.job_infos(name, &ids).await?;
        let frames = self.job_frames(name, &ids).await?;
        Ok(ids
            .into_iter()
            .zip(infos)
            .zip(frames)
            .map(|((id, info), frame)| {
                let (priority, flow, enqueued, front) = parse_info(info.as_deref().unwrap_or(""));
                let job = frame.and_then(|f| Job::decode(Bytes::from(f)).ok());
                WaitingJob {
                    id,
                    method: job.as_ref().map_or("?".into(), |j| j.meta.method.clone()),
                    target: job.as_ref().map_or("?".into(), |j| j.meta.target.clone()),
                    priority,
                    quotas: flow,
                    age_ms: now.saturating_sub(enqueued),
                    front,
                }
            })
            .collect())
    }

    /// Running jobs of `name`, longest first.
    pub async fn running_jobs(&self, name: &str) -> Result<Vec<RunningJob>, BrokerError> {
        let k = QueueKeys::new(name);
        let now = self.now_ms().await?;
        let leases: Vec<(String, f64)> = self
            .run(|mut conn| async move {
                redis::cmd("ZRANGE")
                    .arg(&k.leases)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let ids: Vec<String> = leases.iter().map(|(id, _)| id.clone()).collect();
        let owners: Vec<Option<String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let k = QueueKeys::new(name);
            let ids = &ids;
            self.run(|mut conn| async move {
                redis::cmd("HMGET")
                    .arg(&k.owners)
                    .arg(ids)
                    .query_async(&mut conn)
                    .await
            })
            .await?
        };
        let frames = self.job_frames(name, &ids).await?;
        let mut jobs: Vec<RunningJob> = leases
            .into_iter()
            .zip(owners)
            .zip(frames)
            .map(|(((id, until), owner), frame)| {
                let owner = owner.unwrap_or_default();
                let mut parts = owner.split('\t');
                let worker = parts.next().unwrap_or("").to_string();
                let claimed: u64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(now);
                let job = frame.and_then(|f| Job::decode(Bytes::from(f)).ok());
                RunningJob {
                    queue: name.to_string(),
                    id,
                    worker,
                    method: job.as_ref().map_or("?".into(), |j| j.meta.method.clone()),
                    target: job.as_ref().map_or("?".into(), |j| j.meta.target.clone()),
                    age_ms: now.saturating_sub(claimed),
                    lease_left_ms: until as i64 - now as i64,
                }
            })
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.age_ms));
        Ok(jobs)
    }

    /// Every quota key in use: running holders, waiting jobs, rate state.
    pub async fn quota_usage(&self) -> Result<Vec<QuotaUsage>, BrokerError> {
        let now = self.now_ms().await?;
        let prefix = keys::QUOTA_PREFIX;
        let sems = self.scan(&format!("{prefix}sem:*")).await?;
        let gcras = self.scan(&format!("{prefix}gcra:*")).await?;
        let waiting: BTreeMap<String, u64> = self
            .run(|mut conn| async move {
                redis::cmd("HGETALL")
                    .arg(keys::quota_waiting())
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let mut usage: BTreeMap<String, QuotaUsage> = BTreeMap::new();
        let entry = |usage: &mut BTreeMap<String, QuotaUsage>, token: &str| {
            let (limit, value) = token.split_once('=').unwrap_or((token, ""));
            usage
                .entry(token.to_string())
                .or_insert_with(|| QuotaUsage {
                    limit: limit.to_string(),
                    value: value.to_string(),
                    running: 0,
                    waiting: 0,
                    rate_busy_ms: 0,
                    max: None,
                });
        };
        // Pipelined by pages: thousands of per-user keys are a few round
        // trips, not thousands.
        for page in sems.chunks(500) {
            let counts: Vec<u64> = self
                .run(|mut conn| async move {
                    let mut pipe = redis::pipe();
                    for key in page {
                        pipe.zcount(key, format!("({now}"), "+inf");
                    }
                    pipe.query_async(&mut conn).await
                })
                .await?;
            for (key, live) in page.iter().zip(counts) {
                if live > 0 {
                    let token = &key[prefix.len() + "sem:".len()..];
                    entry(&mut usage, token);
                    usage.get_mut(token).expect("inserted").running = live;
                }
            }
        }
        for page in gcras.chunks(500) {
            let tats: Vec<Option<f64>> =
                self.run(|mut conn| async move {
                    redis::cmd("MGET").arg(page).query_async(&mut conn).await
                })
                .await?;
            for (key, tat) in page.iter().zip(tats) {
                if let Some(tat) = tat.filter(|t| *t > now as f64) {
                    let token = &key[prefix.len() + "gcra:".len()..];
                    entry(&mut usage, token);
                    usage.get_mut(token).expect("inserted").rate_busy_ms =
                        (tat - now as f64) as u64;
                }
            }
        }
        for (token, n) in waiting {
            entry(&mut usage, &token);
            usage.get_mut(&token).expect("inserted").waiting = n;
        }
        // Caps travel with the waiting jobs' flow definitions (one line per
        // quota: token, max_concurrent, interval, burst, max_waiting).
        for queue in self.queue_names().await? {
            for (_, definition) in self.hscan(&QueueKeys::new(&queue).flowdefs).await? {
                for line in definition.lines() {
                    let mut fields = line.split('\t');
                    let (Some(token), Some(max)) = (fields.next(), fields.next()) else {
                        continue;
                    };
                    if let (Some(u), Ok(max @ 1..)) = (usage.get_mut(token), max.parse::<u64>()) {
                        u.max = Some(max);
                    }
                }
            }
        }
        Ok(usage.into_values().collect())
    }

    /// Every field and value of hash `key`, read with HSCAN so that a big
    /// hash never blocks Redis at once.
    async fn hscan(&self, key: &str) -> Result<Vec<(String, String)>, BrokerError> {
        let mut found = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<(String, String)>) = self
                .run(|mut conn| async move {
                    redis::cmd("HSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            found.extend(batch);
            if next == 0 {
                return Ok(found);
            }
            cursor = next;
        }
    }

    /// Live fronts and workers.
    pub async fn daemons(&self) -> Result<Vec<DaemonInfo>, BrokerError> {
        let now = self.now_ms().await?;
        let mut out = Vec::new();
        for (kind, set) in [("http2redis", keys::FRONTS), ("redis2http", keys::WORKERS)] {
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
            for (id, beat) in beats {
                let seen = now.saturating_sub(beat as u64);
                if seen > crate::HEARTBEAT_TIMEOUT.as_millis() as u64 {
                    continue;
                }
                let info_key = if kind == "http2redis" {
                    keys::front_info(&id)
                } else {
                    keys::worker_info(&id)
                };
                let info: Option<String> = self
                    .run(|mut conn| async move {
                        redis::cmd("GET")
                            .arg(&info_key)
                            .query_async(&mut conn)
                            .await
                    })
                    .await?;
                out.push(DaemonInfo {
                    kind: kind.to_string(),
                    id,
                    seen_ms_ago: seen,
                    info: info
                        .and_then(|i| serde_json::from_str(&i).ok())
                        .unwrap_or(serde_json::Value::Null),
                });
            }
        }
        Ok(out)
    }

    /// Finds job `id` in `queues`: waiting, running or dead.
    pub async fn job(&self, queues: &[String], id: &str) -> Result<Option<JobDetail>, BrokerError> {
        for queue in queues {
            let k = QueueKeys::new(queue);
            let (frame, dead, pending, leased): JobLookup = self
                .run(|mut conn| async move {
                    redis::pipe()
                        .hget(&k.jobs, id)
                        .hget(&k.dead, id)
                        .zscore(&k.pending, id)
                        .zscore(&k.leases, id)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let (state, frame) = match (frame, dead) {
                (Some(f), _) if pending.is_some() => ("waiting", f),
                (Some(f), _) if leased.is_some() => ("running", f),
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

    /// Cancels waiting jobs of `name` (older than / less urgent than, when
    /// given); their clients get 503. Returns how many.
    pub async fn purge(
        &self,
        name: &str,
        older_than: Option<Duration>,
        priority_above: Option<u8>,
    ) -> Result<u64, BrokerError> {
        let k = QueueKeys::new(name);
        self.run(|mut conn| async move {
            self.scripts
                .purge
                .key(&k.pending)
                .key(&k.jobs)
                .key(&k.deadlines)
                .key(&k.flows)
                .key(&k.flowdefs)
                .key(&k.jobinfo)
                .key(keys::quota_waiting())
                .arg(&k.flow_prefix)
                .arg(older_than.map_or(0, |d| d.as_millis() as u64))
                .arg(priority_above.unwrap_or(0))
                .arg(REPLY_TTL.as_secs())
                .invoke_async(&mut conn)
                .await
        })
        .await
    }

    /// Stops (`true`) or lets (`false`) workers claim from `name`.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), BrokerError> {
        let k = QueueKeys::new(name);
        self.run(|mut conn| async move {
            if paused {
                redis::cmd("SET")
                    .arg(&k.paused)
                    .arg(1)
                    .query_async::<()>(&mut conn)
                    .await
            } else {
                redis::pipe()
                    .del(&k.paused)
                    .ignore()
                    .rpush(&k.wake, 1)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            }
        })
        .await
    }

    /// The dead letters of `queues`.
    pub async fn dead_letters(&self, queues: &[String]) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut out = Vec::new();
        for queue in queues {
            let k = QueueKeys::new(queue);
            let reasons: BTreeMap<String, String> = self
                .run(|mut conn| async move {
                    redis::cmd("HGETALL")
                        .arg(&k.dead_reasons)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            for (id, reason) in reasons {
                let k = QueueKeys::new(queue);
                let key = &id;
                let frame: Option<Vec<u8>> = self
                    .run(|mut conn| async move {
                        redis::cmd("HGET")
                            .arg(&k.dead)
                            .arg(key)
                            .query_async(&mut conn)
                            .await
                    })
                    .await?;
                let job = frame.and_then(|f| Job::decode(Bytes::from(f)).ok());
                out.push(DeadLetter {
                    queue: queue.clone(),
                    id: id.clone(),
                    reason,
                    method: job.as_ref().map(|j| j.meta.method.clone()),
                    target: job.as_ref().map(|j| j.meta.target.clone()),
                });
            }
        }
        Ok(out)
    }

    /// Puts dead letter `id` back on its queue (nobody waits for its reply
    /// any more: it runs for its effect). Returns its queue, or None.
    pub async fn retry_dead(
        &self,
        queues: &[String],
        id: &str,
        timeout: Duration,
    ) -> Result<Option<String>, BrokerError> {
        for queue in queues {
            let k = QueueKeys::new(queue);
            let frame: Option<Vec<u8>> = self
                .run(|mut conn| async move {
                    redis::cmd("HGET")
                        .arg(&k.dead)
                        .arg(id)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let Some(frame) = frame else { continue };
            let job = Job::decode(Bytes::from(frame.clone())).map_err(|e| {
                BrokerError::Failed(format!("job {id} cannot be decoded, so it cannot run: {e}"))
            })?;
            let admitted = self
                .enqueue(NewJob {
                    queue,
                    id,
                    priority: job.meta.priority,
                    frame: Bytes::from(frame),
                    timeout,
                    flow: &job.meta.flow,
                    flow_definition: &job.meta.flow_def,
                    max_waiting: None,
                    max_wait_boost: None,
                    front: "",
                })
                .await?;
            if admitted != Admission::Queued {
                return Err(BrokerError::Failed("the queue refused the job".into()));
            }
            let k = QueueKeys::new(queue);
            self.run(|mut conn| async move {
                redis::pipe()
                    .hdel(&k.dead, id)
                    .ignore()
                    .hdel(&k.dead_reasons, id)
                    .ignore()
                    .hdel(&k.attempts, id)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await?;
            return Ok(Some(queue.clone()));
        }
        Ok(None)
    }
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
}
