//! The Redis broker: the [`Broker`] trait over the protocol of
//! [`crate::protocol`].
//!
//! Connections follow ARCHITECTURE.md decision 2: non-blocking commands share one
//! multiplexed [`ConnectionManager`] (it pipelines concurrent callers for free
//! and reconnects by itself; [`redial`] sends a call it refused with an old
//! failure once more), while every blocking loop (a worker's doorbell,
//! a front's reply stream) owns a dedicated connection whose response timeout
//! outlives its blocking time. redis-rs would otherwise abandon a BLPOP after
//! 500 ms while Redis still pops the item, losing it.
//!
//! Every non-blocking call is bounded by `command_timeout`, which bounds how
//! long a caller waits, never what becomes of the call: one that timed out
//! is reported as [`BrokerError::Timeout`] (it may still run) and every
//! script is safe to call again (ARCHITECTURE.md decision 13).

mod batch;
mod blocking;
pub mod inspect;
mod redial;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use redis::{Client, IntoConnectionInfo};
use thr_core::envelope::{DataReady, Piece, Reply, Started as StartedNotice, WINDOW};

use crate::backoff::Recovery;
use crate::protocol::keys::{DEFAULT_NAMESPACE, Keyspace, LATENCY_SAMPLES, QueueKeys};
use crate::protocol::records::{FlowDef, Handed, Offer};
use crate::protocol::scripts::{self as s, Scripts};
use crate::{
    Admission, Announced, Beat, Broker, BrokerError, ClaimOptions, ClaimOutcome, Claimed, Daemon,
    Delivery, FRONT_TIMEOUT, Gauges, HEARTBEAT_TIMEOUT, JobState, Lease, NewJob, Pushed, Reaped,
    RetryPolicy, STREAM_TTL, Withdrawal,
};
use batch::{Batcher, Limits};
use blocking::Popped;
pub use blocking::{RedisDoorbell, RedisReplies};
use redial::Redial;

/// Most flows one claim call looks at, however many jobs it starts and
/// however many wait behind full quotas: a call costs at most this many steps.
const CLAIM_SCAN: u32 = 1000;

/// Most lost jobs one reap call handles: bounds the time it holds Redis.
const REAP_SLICE: usize = 50;

/// When nobody has beaten for this long, Redis is paused or was down:
/// nobody is judged dead, and silence is counted again from when beats
/// resume (see `lib/liveness.lua`). Over twice the slowest beat period
/// (workers, 250 ms), and shorter than a front's timeout (750 ms), so a
/// pause that could make a live front look dead is always seen as one.
const LIVENESS_GAP: Duration = Duration::from_millis(600);

/// Aging step in ms: a priority level is worth `max_wait_boost / 98` of
/// waiting (priority 99 catches up with priority 1 after `max_wait_boost`).
fn aging_step_ms(boost: Option<Duration>) -> u64 {
    boost.map_or(0, |b| (b.as_millis() as u64 / 98).max(1))
}

/// How long a reply list lives without being read: long enough for any
/// waiting client, short enough that a dead front's replies go away.
pub(crate) const REPLY_TTL: Duration = Duration::from_secs(120);

/// A [`Broker`] on a Redis server.
#[derive(Clone)]
pub struct RedisBroker {
    client: Client,
    manager: Redial,
    /// Body traffic (pieces and chunks, up to 1 MiB per call) has a
    /// connection of its own, so that it never queues control calls
    /// (enqueue, claim, reply, heartbeats) behind it.
    bulk: Redial,
    command_timeout: Duration,
    scripts: &'static Scripts,
    keyspace: Arc<Keyspace>,
    /// Queue key sets, built once per queue.
    queues: Arc<Mutex<HashMap<String, Arc<QueueKeys>>>>,
    /// Per queue, the tasks that batch its enqueues and releases (see
    /// [`batch`]).
    batchers: Arc<Mutex<HashMap<String, Arc<QueueBatchers>>>>,
    /// Per queue, where the reaper's walk over running jobs stands: each
    /// reap looks at one page, so a reap costs the same however many run.
    reap_cursors: Arc<Mutex<HashMap<String, String>>>,
    display_url: String,
    /// Announced when a heartbeat gets through after failed ones.
    recovery: Recovery,
    /// Heartbeats failed in a row, and when `recovery` was last announced.
    beats_failed: Arc<AtomicU32>,
    announced: Arc<Mutex<Option<std::time::Instant>>>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &self.display_url)
            .field("namespace", &self.keyspace.root)
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
    /// A broker for `url` in the default namespace; no connection is made
    /// until the first command, so a daemon starts (and answers 503) while
    /// Redis is down.
    pub fn new(url: &str, command_timeout: Duration) -> Result<RedisBroker, BrokerError> {
        RedisBroker::connect(url, command_timeout, None, DEFAULT_NAMESPACE)
    }

    /// A broker for the `[redis]` settings (URL, timeout, namespace, TLS CA).
    pub fn from_settings(
        settings: &thr_core::config::RedisSettings,
    ) -> Result<RedisBroker, BrokerError> {
        let ca = match &settings.tls_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                BrokerError::failed(format!("cannot read {}: {e}", path.display()))
            })?),
            None => None,
        };
        RedisBroker::connect(
            &settings.url,
            settings.command_timeout,
            ca,
            &settings.namespace,
        )
    }

    /// Like [`RedisBroker::new`]; `rediss://` connections trust the CA in
    /// `ca_pem` (PEM) instead of the system's roots.
    pub fn connect(
        url: &str,
        command_timeout: Duration,
        ca_pem: Option<Vec<u8>>,
        namespace: &str,
    ) -> Result<RedisBroker, BrokerError> {
        let display_url = redact_url(url);
        let info = url
            .into_connection_info()
            .map_err(|e| BrokerError::failed(format!("invalid Redis URL {display_url}: {e}")))?
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
            // Our own timeout bounds each call; the library's would only
            // race it.
            .set_response_timeout(None)
            // Fail fast while Redis is down: a reconnection is one attempt,
            // and a call that meets its refusal tries once more (Redial).
            .set_number_of_retries(0);
        let manager = Redial(ConnectionManager::new_lazy_with_config(
            client.clone(),
            config.clone(),
        )?);
        let bulk = Redial(ConnectionManager::new_lazy_with_config(
            client.clone(),
            config,
        )?);
        Ok(RedisBroker {
            client,
            manager,
            bulk,
            command_timeout,
            scripts: Scripts::get(),
            keyspace: Arc::new(Keyspace::new(namespace)),
            queues: Arc::default(),
            batchers: Arc::default(),
            reap_cursors: Arc::default(),
            display_url,
            recovery: Recovery::default(),
            beats_failed: Arc::default(),
            announced: Arc::default(),
        })
    }

    /// Beats are the process's steady probe of Redis: the first one
    /// through after a failing stretch (two in a row or more) ends every
    /// retry loop's backoff. Not more than once every 2 s, so that beats
    /// that fail and pass in turn (Redis at its memory limit, overloaded)
    /// do not undo the loops' backoff and jitter.
    fn beat_through(&self) {
        const SPACING: Duration = Duration::from_secs(2);
        if self.beats_failed.swap(0, Ordering::Relaxed) < 2 {
            return;
        }
        let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        if announced.is_none_or(|at| at.elapsed() >= SPACING) {
            *announced = Some(std::time::Instant::now());
            self.recovery.announce();
        }
    }

    /// The URL, password hidden.
    pub fn display_url(&self) -> &str {
        &self.display_url
    }

    /// The deployment's keys.
    pub fn keyspace(&self) -> &Keyspace {
        &self.keyspace
    }

    /// The pushes of started notices for `jobs` (front, job id): one LPUSH
    /// of all of a front's notices, and its list's expiry renewed.
    fn started_notices<'a>(
        &self,
        jobs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> redis::Pipeline {
        let mut by_front: HashMap<&str, Vec<Bytes>> = HashMap::new();
        for (front, id) in jobs {
            let frame = StartedNotice { id: id.to_string() }.encode();
            by_front.entry(front).or_default().push(frame);
        }
        let mut pipe = redis::pipe();
        for (front, frames) in by_front {
            let list = self.keyspace.replies(front);
            let frames: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
            pipe.lpush(&list, frames)
                .ignore()
                .expire(&list, REPLY_TTL.as_secs() as i64)
                .ignore();
        }
        pipe
    }

    /// The keys of queue `name` (built once, then shared).
    pub fn queue_keys(&self, name: &str) -> Arc<QueueKeys> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = queues.get(name) {
            return k.clone();
        }
        let k = Arc::new(self.keyspace.queue(name));
        queues.insert(name.to_string(), k.clone());
        k
    }

    /// Runs `f` on the shared connection, bounded by the command timeout.
    pub(crate) async fn run<T, F>(&self, f: impl FnOnce(Redial) -> F) -> Result<T, BrokerError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.run_on(self.manager.clone(), f).await
    }

    /// Runs `f` on the body-traffic connection, bounded by the command
    /// timeout.
    async fn run_bulk<T, F>(&self, f: impl FnOnce(Redial) -> F) -> Result<T, BrokerError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.run_on(self.bulk.clone(), f).await
    }

    async fn run_on<T, F>(
        &self,
        conn: Redial,
        f: impl FnOnce(Redial) -> F,
    ) -> Result<T, BrokerError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        bounded(self.command_timeout, &self.display_url, f(conn)).await
    }

    /// Runs a transaction holding a script (`transact`) on `conn`, bounded
    /// by the command timeout.
    async fn run_transaction<T: redis::FromRedisValue>(
        &self,
        conn: Redial,
        call: &s::Transaction<'_>,
    ) -> Result<T, BrokerError> {
        transact(conn, call, self.command_timeout, &self.display_url).await
    }

    /// The batching tasks of `queue`, started on first use.
    fn batchers(&self, queue: &str) -> Arc<QueueBatchers> {
        let mut all = self.batchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = all.get(queue) {
            return b.clone();
        }
        let b = Arc::new(QueueBatchers::start(self, self.queue_keys(queue)));
        all.insert(queue.to_string(), b.clone());
        b
    }

    /// What a caller that gave up waiting is told.
    fn no_answer(&self) -> String {
        format!(
            "{} did not answer within {:?}",
            self.display_url, self.command_timeout
        )
    }

    /// Runs a prepared script on the shared connection.
    pub(crate) async fn invoke(
        &self,
        script: redis::ScriptInvocation<'_>,
    ) -> Result<redis::Value, BrokerError> {
        self.run(|mut conn| async move { script.invoke_async(&mut conn).await })
            .await
    }

    fn lease_from(&self, queue: &str, token: &str, generation: &str, job: s::Started) -> Claimed {
        let flow = FlowDef::decode(&job.flow_def);
        Claimed {
            frame: Bytes::from(job.frame),
            remaining: Duration::from_millis(job.remaining_ms.max(0) as u64),
            lease: Lease {
                queue: queue.to_string(),
                id: job.id,
                token: token.to_string(),
                front: job.front,
                holds: FlowDef::holds(&flow),
                generation: generation.to_string(),
            },
            handed: false,
        }
    }

    /// What a claim's answer means for the worker.
    fn claim_outcome(
        &self,
        queue: &str,
        token: &str,
        answer: redis::Value,
    ) -> Result<ClaimOutcome, BrokerError> {
        let answer = s::parse_claim(answer)?;
        if answer.unheld {
            return Ok(ClaimOutcome::Unheld);
        }
        if answer.jobs.is_empty() {
            return Ok(ClaimOutcome::Idle {
                retry_in: u64::try_from(answer.retry_in_ms)
                    .ok()
                    .map(Duration::from_millis),
            });
        }
        let generation = answer.generation;
        Ok(ClaimOutcome::Jobs(
            answer
                .jobs
                .into_iter()
                .map(|job| self.lease_from(queue, token, &generation, job))
                .collect(),
        ))
    }

    /// Appends `pieces` to job `id`'s stream (see `push_pieces.lua`).
    async fn push(
        &self,
        id: &str,
        front: &str,
        first: Option<u64>,
        pieces: &[Piece],
    ) -> Result<Pushed, BrokerError> {
        let encoded: Vec<Bytes> = pieces.iter().map(Piece::encode).collect();
        let notice = DataReady { id: id.to_string() }.encode();
        let call = self.scripts.push_pieces(
            &self.keyspace,
            &s::PushPieces {
                id,
                front,
                first,
                window: WINDOW,
                stream_ttl: STREAM_TTL,
                notice: &notice,
                reply_ttl: REPLY_TTL,
                pieces: &encoded,
            },
        );
        let (answer,): (redis::Value,) = self.run_transaction(self.bulk.clone(), &call).await?;
        match s::int(&answer) {
            Some(n) if n >= 0 => Ok(Pushed::Taken(n as usize)),
            Some(_) => Ok(Pushed::Cancelled),
            None => Err(BrokerError::Protocol(format!("push_pieces: {answer:?}"))),
        }
    }

    /// Moves dead letter `id` of `queue` back on its queue in one atomic
    /// step (`frame` is its payload; nobody waits for its reply any more:
    /// it runs for its effect). False when there is no such dead letter.
    pub(crate) async fn requeue_dead(
        &self,
        queue: &str,
        id: &str,
        job: &thr_core::envelope::JobMeta,
        frame: &[u8],
        timeout: Duration,
    ) -> Result<bool, BrokerError> {
        let q = self.queue_keys(queue);
        let flow = FlowDef::decode(&job.flow_def);
        let jobs = [s::Enqueue {
            id: id.to_string(),
            priority: job.priority,
            frame: Bytes::copy_from_slice(frame),
            timeout,
            flow: flow.id(),
            flow_def: job.flow_def.clone(),
            max_waiting: 0,
            aging_step_ms: 0,
            front: String::new(),
            method: job.method.clone(),
            from_dead: true,
        }];
        let call = self.scripts.enqueue(&self.keyspace, &q, &jobs);
        let (answer,) = self.run_transaction(self.manager.clone(), &call).await?;
        let outcome = s::parse_enqueue(answer)?.pop();
        Ok(!matches!(outcome, Some(s::Enqueued::Gone)))
    }
}

/// Runs a transaction holding a script (`s::Transaction`) on `conn`,
/// bounded by `timeout` (past it, the outcome is unknown). A Redis that
/// lost its scripts (restarted, flushed) runs the plain commands and
/// answers NOSCRIPT for the script: it is loaded and the whole transaction
/// sent again (its commands store and read the same things again).
///
/// Redis does not roll a transaction back: when a command in it fails
/// (NOSCRIPT, a script's error), the others ran. So such a failure, or any
/// failure after a NOSCRIPT, leaves the outcome unknown, never "did
/// nothing": the caller asks again, and the script, once it runs, deletes
/// what its plain commands stored for nothing. A transaction refused
/// before it ran (EXECABORT) did nothing.
async fn transact<T: redis::FromRedisValue>(
    mut conn: Redial,
    call: &s::Transaction<'_>,
    timeout: Duration,
    url: &str,
) -> Result<T, BrokerError> {
    bounded(timeout, url, send_transaction(&mut conn, call)).await
}

/// One attempt of `transact`, with its NOSCRIPT retry, unbounded.
async fn send_transaction<T: redis::FromRedisValue>(
    conn: &mut Redial,
    call: &s::Transaction<'_>,
) -> Result<T, BrokerError> {
    match call.pipe.query_async(conn).await {
        Ok(answer) => Ok(answer),
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            let again = async {
                call.script.load_async(conn).await?;
                call.pipe.query_async(conn).await
            };
            again.await.map_err(ran_in_part)
        }
        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(k) if k != redis::ServerErrorKind::ExecAbort) => {
            Err(ran_in_part(e))
        }
        Err(e) => Err(e.into()),
    }
}

/// A transaction whose plain commands ran while its script did not (or
/// may not have): its outcome is unknown.
fn ran_in_part(err: redis::RedisError) -> BrokerError {
    BrokerError::Timeout {
        what: format!("a transaction ran only in part: {err}"),
        source: Some(Box::new(err)),
    }
}

/// `call`, bounded by `timeout`: past it, the outcome is unknown.
async fn bounded<T, E>(
    timeout: Duration,
    url: &str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, BrokerError>
where
    BrokerError: From<E>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(BrokerError::from),
        Err(_) => Err(BrokerError::Timeout {
            what: format!("{url} did not answer within {timeout:?}"),
            source: None,
        }),
    }
}

/// Most calls of one kind and queue out at once: a burst is admitted at
/// two calls per round trip, not one (with four, batches got so small that
/// throughput fell by a third in `thr-bench`).
const BATCHES_IN_FLIGHT: usize = 2;

/// Most jobs one batched call carries.
const BATCH_JOBS: usize = 16;
/// Most payload bytes one batched call carries (beyond its first job).
const BATCH_BYTES: usize = 1 << 20;

/// What a batching task needs to run its script: the shared connection
/// and one queue's keys.
#[derive(Clone)]
struct QueueCalls {
    conn: Redial,
    scripts: &'static Scripts,
    keyspace: Arc<Keyspace>,
    queue: Arc<QueueKeys>,
    timeout: Duration,
    url: String,
}

impl QueueCalls {
    /// Runs the script `prepare` makes, bounded by the command timeout.
    async fn invoke(
        mut self,
        prepare: impl FnOnce(
            &'static Scripts,
            &Keyspace,
            &QueueKeys,
        ) -> redis::ScriptInvocation<'static>,
    ) -> Result<redis::Value, BrokerError> {
        let call = prepare(self.scripts, &self.keyspace, &self.queue);
        bounded(self.timeout, &self.url, call.invoke_async(&mut self.conn)).await
    }
}

/// The batching tasks of one queue.
struct QueueBatchers {
    enqueue: Batcher<s::Enqueue, s::Enqueued>,
    release: Batcher<s::Release, Delivery>,
}

/// The bounds of one batched call; `size` weighs an item in bytes.
fn batch_limits<T>(size: fn(&T) -> usize) -> Limits<T> {
    Limits {
        items: BATCH_JOBS,
        bytes: BATCH_BYTES,
        size,
        in_flight: BATCHES_IN_FLIGHT,
    }
}

impl QueueBatchers {
    fn start(broker: &RedisBroker, queue: Arc<QueueKeys>) -> QueueBatchers {
        let calls = QueueCalls {
            conn: broker.manager.clone(),
            scripts: broker.scripts,
            keyspace: broker.keyspace.clone(),
            queue,
            timeout: broker.command_timeout,
            url: broker.display_url.clone(),
        };
        let enqueue = Batcher::start(batch_limits(|e: &s::Enqueue| e.frame.len()), {
            let calls = calls.clone();
            move |jobs: Vec<s::Enqueue>| {
                let calls = calls.clone();
                async move {
                    let call = calls.scripts.enqueue(&calls.keyspace, &calls.queue, &jobs);
                    let (answer,) =
                        transact(calls.conn.clone(), &call, calls.timeout, &calls.url).await?;
                    s::parse_enqueue(answer)
                }
            }
        });
        let release = Batcher::start(
            batch_limits(|r: &s::Release| r.frame.len()),
            move |jobs: Vec<s::Release>| {
                let calls = calls.clone();
                async move {
                    s::parse_release(
                        calls
                            .invoke(|sc, ks, q| {
                                sc.release(ks, q, REPLY_TTL, LATENCY_SAMPLES, &jobs)
                            })
                            .await?,
                    )
                }
            },
        );
        QueueBatchers { enqueue, release }
    }
}

impl Broker for RedisBroker {
    type Doorbell = RedisDoorbell;
    type Replies = RedisReplies;

    async fn enqueue(&self, job: NewJob<'_>) -> Result<Admission, BrokerError> {
        let item = s::Enqueue {
            id: job.id.to_string(),
            priority: job
                .priority
                .clamp(thr_core::priority::HIGHEST, thr_core::priority::LOWEST),
            frame: job.frame.clone(),
            timeout: job.timeout,
            flow: job.flow.id(),
            flow_def: FlowDef::encode(job.flow),
            max_waiting: job.max_waiting.unwrap_or(0),
            aging_step_ms: aging_step_ms(job.max_wait_boost),
            front: job.front.to_string(),
            method: job.method.to_string(),
            from_dead: false,
        };
        let outcome = self
            .batchers(job.queue)
            .enqueue
            .call(item, self.command_timeout, || self.no_answer())
            .await?;
        Ok(match outcome {
            s::Enqueued::Queued => Admission::Queued,
            s::Enqueued::Settled | s::Enqueued::Gone => Admission::Settled,
            s::Enqueued::Refused {
                what,
                waiting,
                drain_rate,
            } => Admission::Refused {
                what,
                waiting,
                drain_rate,
            },
        })
    }

    async fn withdraw(
        &self,
        queue: &str,
        id: &str,
        remember: Duration,
    ) -> Result<Withdrawal, BrokerError> {
        let q = self.queue_keys(queue);
        let answer = self
            .invoke(self.scripts.withdraw(&self.keyspace, &q, id, remember))
            .await?;
        match s::string(&answer).as_deref() {
            Some("withdrawn") => Ok(Withdrawal::Withdrawn),
            Some("started") => Ok(Withdrawal::Started),
            Some("settled") => Ok(Withdrawal::Settled),
            _ => Err(BrokerError::Protocol(format!("withdraw: {answer:?}"))),
        }
    }

    async fn job_states(&self, queue: &str, ids: &[&str]) -> Result<Vec<JobState>, BrokerError> {
        let q = self.queue_keys(queue);
        let mut out = Vec::with_capacity(ids.len());
        // Slices keep each call short however many clients wait.
        for slice in ids.chunks(500) {
            let answer = self.invoke(self.scripts.job_states(&q, slice)).await?;
            for v in s::parse_list(answer, "job_states")? {
                out.push(match s::string(&v).as_deref() {
                    Some("w") => JobState::Waiting,
                    Some("r") => JobState::Running,
                    Some("s") => JobState::Settled,
                    _ => JobState::Unknown,
                });
            }
        }
        Ok(out)
    }

    async fn claim(
        &self,
        queue: &str,
        options: ClaimOptions<'_>,
    ) -> Result<ClaimOutcome, BrokerError> {
        let q = self.queue_keys(queue);
        let answer = self
            .invoke(
                self.scripts
                    .claim(&self.keyspace, &q, &claim_args(&options)),
            )
            .await?;
        self.claim_outcome(queue, options.token, answer)
    }

    async fn wait_and_claim(
        &self,
        doorbell: &mut RedisDoorbell,
        queue: &str,
        max: Duration,
        options: ClaimOptions<'_>,
    ) -> Result<ClaimOutcome, BrokerError> {
        let q = self.queue_keys(queue);
        let offer = Offer {
            worker: options.worker.to_string(),
            lease_ms: options.lease.as_millis().min(u128::from(u64::MAX)) as u64,
            max_inflight_total: options.max_inflight_total.unwrap_or(0),
            methods: options.retry_methods.join(" "),
        };
        let mut hset = redis::cmd("HSET");
        hset.arg(&q.offers).arg(options.token).arg(offer.encode());
        match doorbell
            .offer_and_wait(max, hset, &q.offer(options.token))
            .await?
        {
            Popped::Handed(record) => match Handed::decode(&record) {
                Some(h) => {
                    let generation = h.generation.clone();
                    let job = s::Started {
                        id: h.id,
                        frame: h.frame,
                        remaining_ms: i64::try_from(h.remaining_ms).unwrap_or(i64::MAX),
                        front: h.front,
                        flow_def: h.flow_def,
                    };
                    let mut claimed = self.lease_from(queue, options.token, &generation, job);
                    claimed.handed = true;
                    Ok(ClaimOutcome::Jobs(vec![claimed]))
                }
                // Not a record of this version: the claim under the same
                // token returns the job it stands for, as Redis has it.
                None => self.claim(queue, options).await,
            },
            // The claim also withdraws the offer; a job handed meanwhile is
            // leased under this token, and the claim returns it.
            Popped::Claim => self.claim(queue, options).await,
        }
    }

    async fn renew(&self, lease: &Lease, duration: Duration) -> Result<bool, BrokerError> {
        let q = self.queue_keys(&lease.queue);
        let answer = self
            .invoke(self.scripts.renew(
                &q,
                &self.keyspace,
                &lease.id,
                &lease.token,
                duration,
                &lease.holds,
            ))
            .await?;
        Ok(s::int(&answer) == Some(1))
    }

    async fn started(&self, lease: &Lease) -> Result<(), BrokerError> {
        let pipe = self.started_notices([(lease.front.as_str(), lease.id.as_str())]);
        self.run(|mut conn| async move { pipe.exec_async(&mut conn).await })
            .await
    }

    async fn started_again(&self, jobs: &[Announced]) -> Result<(), BrokerError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let pipe = self.started_notices(jobs.iter().map(|j| (j.front.as_str(), j.id.as_str())));
        self.run_bulk(|mut conn| async move { pipe.exec_async(&mut conn).await })
            .await
    }

    async fn reply(
        &self,
        lease: &Lease,
        frame: Bytes,
        backend_ms: u64,
    ) -> Result<Delivery, BrokerError> {
        let job = s::Release {
            id: lease.id.clone(),
            token: lease.token.clone(),
            front: lease.front.clone(),
            frame,
            backend_ms,
            generation: lease.generation.clone(),
            holds: lease.holds.clone(),
        };
        self.batchers(&lease.queue)
            .release
            .call(job, self.command_timeout, || self.no_answer())
            .await
    }

    async fn stream_head(&self, lease: &Lease, frame: Bytes) -> Result<Delivery, BrokerError> {
        let q = self.queue_keys(&lease.queue);
        let answer = self
            .invoke(self.scripts.stream_head(
                &self.keyspace,
                &q,
                &s::StreamHead {
                    id: &lease.id,
                    token: &lease.token,
                    front: &lease.front,
                    frame: &frame,
                    reply_ttl: REPLY_TTL,
                    stream_ttl: STREAM_TTL,
                },
            ))
            .await?;
        match s::string(&answer).as_deref() {
            Some("delivered" | "again") => Ok(Delivery::Delivered),
            Some("lost") => Ok(Delivery::LeaseLost),
            _ => Err(BrokerError::Protocol(format!("stream_head: {answer:?}"))),
        }
    }

    async fn push_pieces(
        &self,
        lease: &Lease,
        first: u64,
        pieces: &[Piece],
    ) -> Result<Pushed, BrokerError> {
        self.push(&lease.id, &lease.front, Some(first), pieces)
            .await
    }

    async fn take_pieces(
        &self,
        id: &str,
        from: u64,
        max: usize,
    ) -> Result<Option<Vec<Piece>>, BrokerError> {
        let call = self
            .scripts
            .take_pieces(&self.keyspace, id, from, max, STREAM_TTL);
        let (answer, read): (redis::Value, Vec<Option<Vec<u8>>>) =
            self.run_transaction(self.bulk.clone(), &call).await?;
        match answer {
            redis::Value::Nil | redis::Value::Boolean(false) => Ok(None),
            redis::Value::Int(1) => Ok(Some(
                // The pieces waiting, up to the first number not pushed yet.
                read.into_iter()
                    .map_while(|piece| piece.map(|b| Piece::decode(Bytes::from(b))))
                    .collect(),
            )),
            other => Err(BrokerError::Protocol(format!("take_pieces: {other:?}"))),
        }
    }

    async fn cancel_stream(&self, id: &str) -> Result<(), BrokerError> {
        let (pieces, state) = (self.keyspace.pieces(id), self.keyspace.stream(id));
        self.run(|mut conn| async move {
            redis::pipe()
                .del(&pieces)
                .ignore()
                .hset(&state, "cancelled", 1)
                .ignore()
                .pexpire(&state, STREAM_TTL.as_millis() as i64)
                .ignore()
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    async fn close_stream(&self, id: &str) -> Result<(), BrokerError> {
        let (pieces, state) = (self.keyspace.pieces(id), self.keyspace.stream(id));
        self.run(|mut conn| async move {
            redis::pipe()
                .del(&[&pieces, &state])
                .ignore()
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    async fn put_upload_chunk(
        &self,
        id: &str,
        index: u32,
        chunk: Bytes,
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        // Stored by its index, so a repeated call stores it once; chunks
        // come in order, so all before it are there when the hash holds
        // more than `index` of them. One transaction: a front killed
        // half-way never leaves a chunk without its expiry.
        let key = self.keyspace.upload(id);
        let (held,): (u64,) = self
            .run_bulk(|mut conn| async move {
                redis::pipe()
                    .atomic()
                    .hset(&key, index, chunk.as_ref())
                    .ignore()
                    .pexpire(&key, ttl.as_millis().min(i64::MAX as u128) as i64)
                    .ignore()
                    .hlen(&key)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(held > u64::from(index))
    }

    async fn upload_chunk(&self, id: &str, index: u32) -> Result<Option<Bytes>, BrokerError> {
        let key = self.keyspace.upload(id);
        let chunk: Option<Vec<u8>> = self
            .run_bulk(|mut conn| async move {
                redis::cmd("HGET")
                    .arg(&key)
                    .arg(index)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(chunk.map(Bytes::from))
    }

    async fn drop_upload(&self, id: &str) -> Result<(), BrokerError> {
        let key = self.keyspace.upload(id);
        self.run(|mut conn| async move { redis::cmd("DEL").arg(&key).exec_async(&mut conn).await })
            .await
    }

    async fn dead_letter(
        &self,
        lease: &Lease,
        reason: &str,
        answer: Bytes,
    ) -> Result<(), BrokerError> {
        let q = self.queue_keys(&lease.queue);
        self.invoke(self.scripts.dead_letter(
            &self.keyspace,
            &q,
            &s::DeadLetter {
                id: &lease.id,
                token: &lease.token,
                front: &lease.front,
                reason,
                answer: &answer,
                reply_ttl: REPLY_TTL,
                holds: &lease.holds,
            },
        ))
        .await?;
        Ok(())
    }

    async fn reap(&self, queue: &str, policy: &RetryPolicy) -> Result<Reaped, BrokerError> {
        let q = self.queue_keys(queue);
        let mut total = Reaped::default();
        let cursor = self
            .reap_cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
            .cloned()
            .unwrap_or_else(|| "0".to_string());
        let answer = self
            .invoke(self.scripts.reap_scan(
                &self.keyspace,
                &q,
                HEARTBEAT_TIMEOUT,
                REAP_SLICE,
                &cursor,
            ))
            .await?;
        let (next, lost) = s::parse_reap_scan(answer)?;
        self.reap_cursors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(queue.to_string(), next);
        if lost.is_empty() {
            return Ok(total);
        }
        let frames: Vec<(&'static str, Bytes)> =
            lost.iter().map(|job| reap_decision(job, policy)).collect();
        let actions: Vec<s::ReapAction<'_>> = lost
            .iter()
            .zip(&frames)
            .map(|(job, (action, frame))| s::ReapAction {
                id: &job.id,
                token: &job.token,
                action,
                front: &job.front,
                frame,
            })
            .collect();
        let answer = self
            .invoke(
                self.scripts
                    .reap(&self.keyspace, &q, HEARTBEAT_TIMEOUT, REPLY_TTL, &actions),
            )
            .await?;
        let counts = s::parse_list(answer, "reap")?;
        for job in lost.iter().filter(|j| j.streaming) {
            let why = Piece::Abort("the worker streaming it was lost".into());
            self.push(&job.id, &job.front, None, &[why]).await?;
        }
        let n = |i: usize| counts.get(i).and_then(s::int).unwrap_or(0).max(0) as u64;
        total.requeued += n(0);
        total.answered += n(1);
        total.dead_lettered += n(2);
        Ok(total)
    }

    async fn hand_back(&self, lease: &Lease) -> Result<(), BrokerError> {
        let q = self.queue_keys(&lease.queue);
        self.invoke(self.scripts.hand_back(&q, &lease.id, &lease.token))
            .await?;
        Ok(())
    }

    async fn put_back(&self, lease: &Lease) -> Result<bool, BrokerError> {
        let q = self.queue_keys(&lease.queue);
        let answer = self
            .invoke(
                self.scripts
                    .put_back(&self.keyspace, &q, &lease.id, &lease.token),
            )
            .await?;
        Ok(s::int(&answer) == Some(1))
    }

    async fn heartbeat(&self, kind: Daemon, id: &str, info: &str) -> Result<Beat, BrokerError> {
        let answer = self
            .invoke(self.scripts.heartbeat(
                &self.keyspace,
                kind,
                id,
                info,
                HEARTBEAT_TIMEOUT * 2,
                LIVENESS_GAP,
            ))
            .await;
        let answer = match answer {
            Ok(answer) => {
                self.beat_through();
                answer
            }
            Err(err) => {
                self.beats_failed.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
        };
        let items = s::parse_list(answer, "heartbeat")?;
        let generation = items.first().and_then(s::string).unwrap_or_default();
        let since = items.get(1).and_then(s::int).unwrap_or(-1);
        Ok(Beat {
            generation,
            since_last: u64::try_from(since).ok().map(Duration::from_millis),
        })
    }

    fn recovery(&self) -> Recovery {
        self.recovery.clone()
    }

    async fn withdraw_offer(&self, queue: &str, token: &str) -> Result<(), BrokerError> {
        let offers = self.queue_keys(queue).offers.clone();
        let token = token.to_string();
        self.run(|mut conn| async move {
            redis::cmd("HDEL")
                .arg(&offers)
                .arg(&token)
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    async fn setup_warnings(&self) -> Result<Vec<String>, BrokerError> {
        // INFO, not CONFIG GET: managed Redis services often refuse CONFIG.
        let info: redis::RedisResult<String> = self
            .run(|mut conn| async move {
                Ok(redis::cmd("INFO")
                    .arg("memory")
                    .query_async(&mut conn)
                    .await)
            })
            .await?;
        match info {
            Ok(info) => Ok(eviction_warning(&info).into_iter().collect()),
            // Not allowed to this ACL user: the settings cannot be read,
            // and asking again will not help.
            Err(err) if err.code() == Some("NOPERM") => Ok(Vec::new()),
            // No answer, or a passing refusal (LOADING, BUSY): asked
            // again at the next beat.
            Err(err) => Err(err.into()),
        }
    }

    async fn retire(&self, kind: Daemon, id: &str) -> Result<(), BrokerError> {
        let set = self.keyspace.beats(kind).to_string();
        let info_key = self.keyspace.daemon_info(kind, id);
        self.run(|mut conn| async move {
            redis::pipe()
                .zrem(&set, id)
                .ignore()
                .del(&info_key)
                .ignore()
                .exec_async(&mut conn)
                .await
        })
        .await
    }

    async fn gauges(&self, queue: &str) -> Result<Gauges, BrokerError> {
        let q = self.queue_keys(queue);
        let by_limit = self.keyspace.quota_waiting_limits.clone();
        let (waiting, fields): (u64, std::collections::BTreeMap<String, i64>) = self
            .run(|mut conn| async move {
                redis::pipe()
                    .zcard(&q.pending)
                    .hgetall(&by_limit)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let mut gauges = Gauges {
            waiting,
            ..Gauges::default()
        };
        for (field, n) in fields {
            let n = n.max(0) as u64;
            match field.strip_suffix('#') {
                Some(limit) => gauges.saturated_keys.insert(limit.to_string(), n),
                None => gauges.quota_waiting.insert(field, n),
            };
        }
        Ok(gauges)
    }

    fn doorbell(&self, queue: &str) -> RedisDoorbell {
        RedisDoorbell::new(
            self.client.clone(),
            self.queue_keys(queue).wake.clone(),
            self.command_timeout,
        )
    }

    fn replies(&self, front: &str) -> RedisReplies {
        RedisReplies::new(
            self.client.clone(),
            self.keyspace.replies(front),
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

/// The warning for a Redis that evicts keys when full, from its `INFO
/// memory`; None under `noeviction` (or when INFO does not say).
fn eviction_warning(info: &str) -> Option<String> {
    let policy = info
        .lines()
        .find_map(|line| line.strip_prefix("maxmemory_policy:"))?
        .trim();
    // Checked even without a `maxmemory` (then Redis evicts nothing yet):
    // the limit is often set later, at runtime, by someone else.
    (policy != "noeviction").then(|| {
        format!(
            "Redis evicts keys when it is full (maxmemory-policy {policy}): thr's jobs, leases and \
             the markers that keep a POST from running twice may vanish once a maxmemory is \
             reached. Set maxmemory-policy noeviction: a full Redis then refuses new requests \
             (503) and loses nothing"
        )
    })
}

/// The claim script's arguments for `options`.
fn claim_args<'a>(options: &ClaimOptions<'a>) -> s::Claim<'a> {
    s::Claim {
        token: options.token,
        worker: options.worker,
        lease: options.lease,
        max_jobs: options.max_jobs,
        max_inflight_total: options.max_inflight_total.unwrap_or(0),
        aging_step_ms: aging_step_ms(options.max_wait_boost),
        scan_budget: CLAIM_SCAN,
        front_timeout: FRONT_TIMEOUT,
        worker_timeout: HEARTBEAT_TIMEOUT,
        hold_only: options.ahead.then_some(options.retry_methods),
    }
}

/// What a reaper does with a job whose worker was lost: put it back when
/// it is safe to run again and has attempts left; otherwise answer its
/// client 502 (setting a safe one aside in the dead letters, since every
/// attempt lost its worker). Returns the action and the answer's frame.
fn reap_decision(job: &s::LostJob, policy: &RetryPolicy) -> (&'static str, Bytes) {
    if job.streaming {
        // Its client has a response head: it cannot run again, and the
        // abort pushed to its stream tells the front to cut the response.
        let text = "thr: the worker streaming this response was lost\n";
        return ("answer", Reply::plain(&job.id, 502, text, "reaper", &[]));
    }
    let safe = policy.methods.contains(&job.method);
    let attempts = job.attempts.max(0) as u32 + 1;
    if safe && attempts < policy.max_attempts {
        return ("requeue", Bytes::new());
    }
    if safe {
        let text = format!(
            "thr: gave up after {attempts} attempts; the worker running it was lost each time\n"
        );
        return ("bury", Reply::plain(&job.id, 502, &text, "reaper", &[]));
    }
    let text = format!(
        "thr: the worker running this {} request was lost; it may or may not have been applied\n",
        job.method
    );
    ("answer", Reply::plain(&job.id, 502, &text, "reaper", &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_of_every_eviction_policy_but_noeviction() {
        let info = |policy: &str| {
            format!("# Memory\r\nused_memory:1024\r\nmaxmemory:0\r\nmaxmemory_policy:{policy}\r\n")
        };
        assert_eq!(eviction_warning(&info("noeviction")), None);
        let warning = eviction_warning(&info("allkeys-lru")).expect("a warning");
        assert!(
            warning.contains("maxmemory-policy allkeys-lru"),
            "{warning}"
        );
        assert!(eviction_warning(&info("volatile-ttl")).is_some());
        assert_eq!(eviction_warning("# Memory\r\nused_memory:1024\r\n"), None);
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("redis://:s3cret@h:6379/0"),
            "redis://***@h:6379/0"
        );
        assert_eq!(redact_url("rediss://u:p@h"), "rediss://***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn reaper_requeues_safe_jobs_until_their_attempts_run_out() {
        let policy = RetryPolicy {
            methods: vec!["GET".into()],
            max_attempts: 3,
        };
        let job = |method: &str, attempts| s::LostJob {
            id: "j".into(),
            token: "t".into(),
            method: method.into(),
            attempts,
            front: "f".into(),
            streaming: false,
        };
        assert_eq!(reap_decision(&job("GET", 0), &policy).0, "requeue");
        assert_eq!(reap_decision(&job("GET", 1), &policy).0, "requeue");
        assert_eq!(reap_decision(&job("GET", 2), &policy).0, "bury");
        assert_eq!(reap_decision(&job("POST", 0), &policy).0, "answer");
    }
}
