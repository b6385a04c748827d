//! The Redis broker.
//!
//! Connections follow DESIGN.md decision 2: non-blocking commands share one
//! multiplexed [`ConnectionManager`] (it pipelines concurrent callers for free
//! and reconnects by itself), while every blocking loop (a worker's doorbell,
//! a front's reply stream) owns a dedicated connection whose response timeout
//! outlives its blocking time. redis-rs would otherwise abandon a BLPOP after
//! 500 ms while Redis still pops the item, losing it.
//!
//! Every non-blocking call is bounded by `command_timeout`, so that a front
//! learns quickly that Redis is down and answers 503 instead of hanging.

mod blocking;
mod inspect;
pub mod scripts;

pub use inspect::*;

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use redis::{Client, IntoConnectionInfo};
use thr_core::keys::{self, QueueKeys};

use crate::{
    Admission, Broker, BrokerError, ClaimOptions, ClaimOutcome, Claimed, Daemon, HEARTBEAT_TIMEOUT,
    NewJob, Reaped, RetryPolicy,
};
pub use blocking::{RedisDoorbell, RedisReplies};
use scripts::Scripts;

/// Most flows one claim call looks at, however many jobs it starts and
/// however many wait behind full quotas: a call costs at most this many steps.
const CLAIM_SCAN: u32 = 1000;

/// Aging step in ms: a priority level is worth `max_wait_boost / 98` of
/// waiting (priority 99 catches up with priority 1 after `max_wait_boost`).
fn aging_step_ms(boost: Option<Duration>) -> u64 {
    boost.map_or(0, |b| (b.as_millis() as u64 / 98).max(1))
}

/// How long a reply list lives without being read: long enough for any
/// waiting client, short enough that a dead front's replies go away.
const REPLY_TTL: Duration = Duration::from_secs(120);

/// A [`Broker`] on a Redis server.
#[derive(Clone)]
pub struct RedisBroker {
    client: Client,
    manager: ConnectionManager,
    command_timeout: Duration,
    scripts: &'static Scripts,
    display_url: String,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &self.display_url)
            .finish_non_exhaustive()
    }
}

/// Hides a password in a Redis URL, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl RedisBroker {
    /// A broker for `url`; no connection is made until the first command, so
    /// a daemon starts (and answers 503) while Redis is down.
    pub fn new(url: &str, command_timeout: Duration) -> Result<RedisBroker, BrokerError> {
        RedisBroker::with_tls_ca(url, command_timeout, None)
    }

    /// A broker for the `[redis]` settings (URL, timeout, TLS CA file).
    pub fn from_settings(
        settings: &thr_core::config::RedisSettings,
    ) -> Result<RedisBroker, BrokerError> {
        let ca = match &settings.tls_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                BrokerError::Failed(format!("cannot read {}: {e}", path.display()))
            })?),
            None => None,
        };
        RedisBroker::with_tls_ca(&settings.url, settings.command_timeout, ca)
    }

    /// Like [`RedisBroker::new`]; `rediss://` connections trust the CA in
    /// `ca_pem` (PEM) instead of the system's roots.
    pub fn with_tls_ca(
        url: &str,
        command_timeout: Duration,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<RedisBroker, BrokerError> {
        let display_url = redact_url(url);
        let info = url
            .into_connection_info()
            .map_err(|e| BrokerError::Failed(format!("invalid Redis URL {display_url}: {e}")))?
            .set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let client = match ca_pem {
            Some(root_cert) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
            None => Client::open(info)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(command_timeout))
            .set_response_timeout(Some(command_timeout))
            // Fail fast while Redis is down; the next command tries again.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(RedisBroker {
            client,
            manager,
            command_timeout,
            scripts: Scripts::get(),
            display_url,
        })
    }

    /// The URL, password hidden.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// Runs `f` on the shared connection, bounded by the command timeout.
    async fn run<T, F>(&self, f: impl FnOnce(ConnectionManager) -> F) -> Result<T, BrokerError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.command_timeout, f(self.manager.clone())).await {
            Ok(result) => result.map_err(BrokerError::from),
            Err(_) => Err(BrokerError::Unavailable(format!(
                "no answer from {} within {:?}",
                self.display_url, self.command_timeout
            ))),
        }
    }
}

impl Broker for RedisBroker {
    type Doorbell = RedisDoorbell;
    type Replies = RedisReplies;

    async fn enqueue(&self, job: NewJob<'_>) -> Result<Admission, BrokerError> {
        let k = QueueKeys::new(job.queue);
        let timeout_ms = job.timeout.as_millis() as u64;
        let answer: redis::Value = self
            .run(|mut conn| async move {
                self.scripts
                    .enqueue
                    .key(&k.pending)
                    .key(&k.seq)
                    .key(&k.jobs)
                    .key(&k.deadlines)
                    .key(&k.wake)
                    .key(&k.flows)
                    .key(&k.flowdefs)
                    .key(&k.jobinfo)
                    .key(&k.drained)
                    .key(k.flow(job.flow))
                    .key(keys::quota_waiting())
                    .arg(job.id)
                    .arg(job.priority)
                    .arg(job.frame.as_ref())
                    .arg(timeout_ms)
                    .arg(job.flow)
                    .arg(job.flow_definition)
                    .arg(job.max_waiting.unwrap_or(0))
                    .arg(aging_step_ms(job.max_wait_boost))
                    .arg(job.front)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let items: Vec<redis::Value> = redis::from_redis_value(answer)?;
        let field = |i: usize| items.get(i).cloned().unwrap_or(redis::Value::Nil);
        let queued: i64 = redis::from_redis_value(field(0))?;
        if queued == 1 {
            return Ok(Admission::Queued);
        }
        let what: Option<String> = redis::from_redis_value(field(1))?;
        let waiting: Option<u64> = redis::from_redis_value(field(2))?;
        let rate: Option<String> = redis::from_redis_value(field(3))?;
        Ok(Admission::Refused {
            what: what.unwrap_or_default(),
            waiting: waiting.unwrap_or(0),
            drain_rate: rate.and_then(|r| r.parse().ok()).unwrap_or(0.0),
        })
    }

    async fn cancel(&self, queue: &str, id: &str, flow: &str) -> Result<bool, BrokerError> {
        let k = QueueKeys::new(queue);
        self.run(|mut conn| async move {
            let removed: i64 = self
                .scripts
                .cancel
                .key(&k.pending)
                .key(&k.jobs)
                .key(&k.deadlines)
                .key(&k.flows)
                .key(&k.flowdefs)
                .key(&k.jobinfo)
                .key(keys::quota_waiting())
                .key(k.flow(flow))
                .arg(id)
                .arg(flow)
                .invoke_async(&mut conn)
                .await?;
            Ok(removed == 1)
        })
        .await
    }

    async fn claim(
        &self,
        queue: &str,
        options: ClaimOptions<'_>,
    ) -> Result<ClaimOutcome, BrokerError> {
        let k = QueueKeys::new(queue);
        let answer: redis::Value = self
            .run(|mut conn| async move {
                self.scripts
                    .claim
                    .key(&k.pending)
                    .key(&k.jobs)
                    .key(&k.deadlines)
                    .key(&k.leases)
                    .key(&k.wake)
                    .key(&k.flows)
                    .key(&k.flowdefs)
                    .key(&k.jobinfo)
                    .key(&k.drained)
                    .key(keys::quota_waiting())
                    .key(&k.seq)
                    .key(&k.owners)
                    .key(keys::FRONTS)
                    .key(&k.paused)
                    .arg(options.lease.as_millis() as u64)
                    .arg(&k.flow_prefix)
                    .arg(keys::QUOTA_PREFIX)
                    .arg(options.max_inflight_total.unwrap_or(0))
                    .arg(aging_step_ms(options.max_wait_boost))
                    .arg(CLAIM_SCAN)
                    .arg(options.worker)
                    .arg(HEARTBEAT_TIMEOUT.as_millis() as u64)
                    .arg(options.max_jobs.max(1))
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let items: Vec<redis::Value> =
            redis::from_redis_value(answer).map_err(BrokerError::from)?;
        let id: String =
            redis::from_redis_value(items.first().cloned().unwrap_or(redis::Value::Nil))
                .map_err(BrokerError::from)?;
        if id.is_empty() {
            let hint: i64 = items
                .get(2)
                .cloned()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or(-1);
            return Ok(ClaimOutcome::Idle {
                retry_in: u64::try_from(hint).ok().map(Duration::from_millis),
            });
        }
        // Four items per job started: id, frame, ms left, flow.
        let mut jobs = Vec::with_capacity(items.len() / 4);
        for job in items.chunks(4) {
            let field = |i: usize| job.get(i).cloned().unwrap_or(redis::Value::Nil);
            let id: String = redis::from_redis_value(field(0)).map_err(BrokerError::from)?;
            let frame: Vec<u8> = redis::from_redis_value(field(1)).map_err(BrokerError::from)?;
            let remaining: i64 = redis::from_redis_value(field(2)).map_err(BrokerError::from)?;
            let flow: String = redis::from_redis_value(field(3)).map_err(BrokerError::from)?;
            jobs.push(Claimed {
                id,
                frame: Bytes::from(frame),
                remaining: Duration::from_millis(remaining.max(0) as u64),
                flow,
            });
        }
        Ok(ClaimOutcome::Jobs(jobs))
    }

    async fn renew(
        &self,
        queue: &str,
        id: &str,
        lease: Duration,
        semaphores: &[String],
    ) -> Result<bool, BrokerError> {
        let k = QueueKeys::new(queue);
        self.run(|mut conn| async move {
            let mut invocation = self.scripts.renew.key(&k.leases);
            for token in semaphores {
                invocation.key(keys::semaphore(token));
            }
            let renewed: i64 = invocation
                .arg(id)
                .arg(lease.as_millis() as u64)
                .invoke_async(&mut conn)
                .await?;
            Ok(renewed == 1)
        })
        .await
    }

    async fn reply(
        &self,
        queue: &str,
        front: &str,
        id: &str,
        frame: Bytes,
        backend_ms: u64,
        semaphores: &[String],
    ) -> Result<(), BrokerError> {
        let k = QueueKeys::new(queue);
        let replies = keys::replies(front);
        self.run(|mut conn| async move {
            let mut invocation = self.scripts.release.key(&k.leases);
            invocation
                .key(&k.owners)
                .key(&k.jobs)
                .key(&k.deadlines)
                .key(&k.jobinfo)
                .key(&k.wake)
                .key(&replies)
                .key(&k.attempts)
                .key(&k.latency);
            for token in semaphores {
                invocation.key(keys::semaphore(token));
            }
            let _: i64 = invocation
                .arg(id)
                .arg(frame.as_ref())
                .arg(REPLY_TTL.as_secs())
                .arg(backend_ms)
                .arg(keys::LATENCY_SAMPLES)
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    async fn dead_letter(
        &self,
        queue: &str,
        id: &str,
        frame: Bytes,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let k = QueueKeys::new(queue);
        self.run(|mut conn| async move {
            redis::pipe()
                .atomic()
                .hset(&k.dead, id, frame.as_ref())
                .ignore()
                .hdel(&k.jobinfo, id)
                .ignore()
                .hset(&k.dead_reasons, id, reason)
                .ignore()
                .zrem(&k.leases, id)
                .ignore()
                .hdel(&k.jobs, id)
                .ignore()
                .zrem(&k.deadlines, id)
                .ignore()
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    async fn reap(&self, queue: &str, policy: &RetryPolicy) -> Result<Reaped, BrokerError> {
        let k = QueueKeys::new(queue);
        let methods = policy.methods.join(" ");
        let (requeued, answered, dead_lettered): (u64, u64, u64) = self
            .run(|mut conn| async move {
                self.scripts
                    .reap
                    .key(&k.leases)
                    .key(&k.jobs)
                    .key(&k.deadlines)
                    .key(&k.jobinfo)
                    .key(&k.owners)
                    .key(&k.pending)
                    .key(&k.flows)
                    .key(&k.flowdefs)
                    .key(keys::quota_waiting())
                    .key(&k.attempts)
                    .key(&k.dead)
                    .key(&k.dead_reasons)
                    .key(&k.wake)
                    .key(keys::WORKERS)
                    .arg(HEARTBEAT_TIMEOUT.as_millis() as u64)
                    .arg(&k.flow_prefix)
                    .arg(keys::QUOTA_PREFIX)
                    .arg(policy.max_attempts)
                    .arg(methods)
                    .arg(REPLY_TTL.as_secs())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(Reaped {
            requeued,
            answered,
            dead_lettered,
        })
    }

    async fn hand_back(&self, queue: &str, id: &str) -> Result<(), BrokerError> {
        let k = QueueKeys::new(queue);
        self.run(|mut conn| async move {
            redis::pipe()
                .cmd("ZADD")
                .arg(&k.leases)
                .arg("XX")
                .arg(0)
                .arg(id)
                .ignore()
                .rpush(&k.wake, 1)
                .ignore()
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    async fn heartbeat(&self, kind: Daemon, id: &str, info: &str) -> Result<(), BrokerError> {
        let (set, info_key) = match kind {
            Daemon::Front => (keys::FRONTS, keys::front_info(id)),
            Daemon::Worker => (keys::WORKERS, keys::worker_info(id)),
        };
        self.run(|mut conn| async move {
            let _: i64 = self
                .scripts
                .heartbeat
                .key(set)
                .key(&info_key)
                .arg(id)
                .arg(info)
                .arg(HEARTBEAT_TIMEOUT.as_secs() * 2)
                .invoke_async(&mut conn)
                .await?;
            Ok(())
        })
        .await
    }

    async fn retire(&self, kind: Daemon, id: &str) -> Result<(), BrokerError> {
        let (set, info_key) = match kind {
            Daemon::Front => (keys::FRONTS, keys::front_info(id)),
            Daemon::Worker => (keys::WORKERS, keys::worker_info(id)),
        };
        self.run(|mut conn| async move {
            redis::pipe()
                .zrem(set, id)
                .ignore()
                .del(&info_key)
                .ignore()
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    fn doorbell(&self, queue: &str) -> RedisDoorbell {
        RedisDoorbell::new(
            self.client.clone(),
            QueueKeys::new(queue).wake,
            self.command_timeout,
        )
    }

    fn replies(&self, front: &str) -> RedisReplies {
        RedisReplies::new(
            self.client.clone(),
            keys::replies(front),
            self.command_timeout,
        )
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.run(|mut conn| async move {
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("redis://:s3cret@h:6379/0"),
            "redis://***@h:6379/0"
        );
        assert_eq!(redact_url("rediss://u:p@h"), "rediss://***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
