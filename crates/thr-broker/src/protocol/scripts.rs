//! The scripts, one typed call each: the only place that lists a script's
//! KEYS (in the order of the locals at the top of its file) and ARGV.
//!
//! Scripts are assembled by `build.rs` from `scripts/*.lua` and the helpers
//! their header includes. redis-rs runs them with EVALSHA and falls back to
//! EVAL on NOSCRIPT, so a Redis restarted empty gets them again unaided.
//! Each starts with `#!lua` (Redis 7 flags), so a Redis out of memory
//! refuses a writing script before it runs instead of failing half-way.

use std::sync::OnceLock;
use std::time::Duration;

use redis::{Script, ScriptInvocation, Value};

use super::keys::{Keyspace, QueueKeys};
use crate::{BrokerError, HEARTBEAT_TIMEOUT};

mod text {
    include!(concat!(env!("OUT_DIR"), "/scripts.rs"));
}

/// Every script the broker runs, hashed once per process.
pub(crate) struct Scripts {
    enqueue: Script,
    withdraw: Script,
    job_states: Script,
    claim: Script,
    renew: Script,
    release: Script,
    hand_back: Script,
    put_back: Script,
    dead_letter: Script,
    heartbeat: Script,
    reap_scan: Script,
    reap: Script,
    purge: Script,
    stats: Script,
    stream_head: Script,
    push_pieces: Script,
    take_pieces: Script,
}

/// The scripts' text, for tests that run them by hand.
pub fn source(name: &str) -> Option<&'static str> {
    Some(match name {
        "enqueue" => text::ENQUEUE,
        "withdraw" => text::WITHDRAW,
        "job_states" => text::JOB_STATES,
        "claim" => text::CLAIM,
        "renew" => text::RENEW,
        "release" => text::RELEASE,
        "hand_back" => text::HAND_BACK,
        "put_back" => text::PUT_BACK,
        "dead_letter" => text::DEAD_LETTER,
        "heartbeat" => text::HEARTBEAT,
        "reap_scan" => text::REAP_SCAN,
        "reap" => text::REAP,
        "purge" => text::PURGE,
        "stats" => text::STATS,
        "stream_head" => text::STREAM_HEAD,
        "push_pieces" => text::PUSH_PIECES,
        "take_pieces" => text::TAKE_PIECES,
        _ => return None,
    })
}

/// A Lua helper file's text (`scripts/lib/NAME.lua`), for tests that drive
/// helpers with a fake clock.
pub fn helper(name: &str) -> Option<&'static str> {
    Some(match name {
        "clock" => include_str!("../../scripts/lib/clock.lua"),
        "order" => include_str!("../../scripts/lib/order.lua"),
        "records" => include_str!("../../scripts/lib/records.lua"),
        "quota" => include_str!("../../scripts/lib/quota.lua"),
        "drain" => include_str!("../../scripts/lib/drain.lua"),
        "liveness" => include_str!("../../scripts/lib/liveness.lua"),
        "waiting" => include_str!("../../scripts/lib/waiting.lua"),
        "lease" => include_str!("../../scripts/lib/lease.lua"),
        _ => return None,
    })
}

impl Scripts {
    pub(crate) fn get() -> &'static Scripts {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| Scripts {
            enqueue: Script::new(text::ENQUEUE),
            withdraw: Script::new(text::WITHDRAW),
            job_states: Script::new(text::JOB_STATES),
            claim: Script::new(text::CLAIM),
            renew: Script::new(text::RENEW),
            release: Script::new(text::RELEASE),
            hand_back: Script::new(text::HAND_BACK),
            put_back: Script::new(text::PUT_BACK),
            dead_letter: Script::new(text::DEAD_LETTER),
            heartbeat: Script::new(text::HEARTBEAT),
            reap_scan: Script::new(text::REAP_SCAN),
            reap: Script::new(text::REAP),
            purge: Script::new(text::PURGE),
            stats: Script::new(text::STATS),
            stream_head: Script::new(text::STREAM_HEAD),
            push_pieces: Script::new(text::PUSH_PIECES),
            take_pieces: Script::new(text::TAKE_PIECES),
        })
    }
}

/// The keys of a queue's waiting jobs, KEYS[1..6] of every script that
/// queues or unqueues jobs (`scripts/lib/waiting.lua` relies on the order).
fn waiting_keys<C: CallArgs>(s: &mut C, q: &QueueKeys) {
    s.key(&q.pending)
        .key(&q.flow_jobs)
        .key(&q.flows)
        .key(&q.flowdefs)
        .key(&q.jobs)
        .key(&q.info);
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// One job of an `enqueue` call (a call admits many: see `redis::batch`).
pub(crate) struct Enqueue {
    pub id: String,
    pub priority: u8,
    pub frame: bytes::Bytes,
    pub timeout: Duration,
    pub flow: String,
    pub flow_def: String,
    pub max_waiting: u32,
    pub aging_step_ms: u64,
    pub front: String,
    pub method: String,
    /// Moves dead letter `id` back instead (atomic retry).
    pub from_dead: bool,
}

/// What `enqueue` answered.
pub(crate) enum Enqueued {
    Queued,
    Settled,
    /// `from_dead` found no such dead letter.
    Gone,
    Refused {
        what: String,
        waiting: u64,
        drain_rate: f64,
    },
}

/// A script call sent in one MULTI/EXEC with plain commands before or
/// after it that store or read payloads, so that no payload passes through
/// Lua (each crossing costs Redis about 1 µs per KB: ARCHITECTURE.md
/// decision 31). The transaction keeps a caller killed half-way from
/// leaving a payload behind. Its answer holds the script's answer and
/// what the commands not ignored read, in order.
pub(crate) struct Transaction<'a> {
    pub pipe: redis::Pipeline,
    /// The script in it: loaded when Redis answers NOSCRIPT.
    pub script: &'a Script,
}

impl Scripts {
    /// The jobs' payloads stored by a plain `HSET`, then the script.
    pub(crate) fn enqueue(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        jobs: &[Enqueue],
    ) -> Transaction<'_> {
        let mut payloads = redis::cmd("HSET");
        payloads.arg(&q.jobs);
        for a in jobs {
            payloads.arg(&a.id).arg(a.frame.as_ref());
        }
        let mut s = self.enqueue.prepare_invoke();
        waiting_keys(&mut s, q);
        s.key(&q.seq)
            .key(&q.wake)
            .key(&q.drained)
            .key(&ks.quota_waiting)
            .key(&q.dead)
            .key(&q.dead_reasons)
            .key(&ks.quota_waiting_limits)
            .key(&q.handoff)
            .key(&q.paused)
            .key(&q.offers)
            .key(&q.leases)
            .key(&q.owners)
            .key(&ks.generation)
            .key(&ks.workers)
            .key(&ks.liveness)
            .arg(q.offer(""))
            .arg(q.claim(""))
            .arg(ms(HEARTBEAT_TIMEOUT));
        for a in jobs {
            s.key(q.settled(&a.id))
                .arg(&a.id)
                .arg(a.priority)
                .arg(ms(a.timeout))
                .arg(&a.flow)
                .arg(&a.flow_def)
                .arg(a.max_waiting)
                .arg(a.aging_step_ms)
                .arg(&a.front)
                .arg(&a.method)
                .arg(if a.from_dead { "1" } else { "" });
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(payloads)
            .ignore()
            .invoke_script(&s);
        Transaction {
            pipe,
            script: &self.enqueue,
        }
    }

    pub(crate) fn withdraw(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        id: &str,
        remember: Duration,
    ) -> ScriptInvocation<'_> {
        let mut s = self.withdraw.prepare_invoke();
        waiting_keys(&mut s, q);
        s.key(&ks.quota_waiting)
            .key(q.settled(id))
            .key(&ks.quota_waiting_limits)
            .arg(id)
            .arg(ms(remember));
        s
    }

    pub(crate) fn job_states(&self, q: &QueueKeys, ids: &[&str]) -> ScriptInvocation<'_> {
        let mut s = self.job_states.prepare_invoke();
        s.key(&q.pending).key(&q.info);
        for id in ids {
            s.key(q.settled(id)).arg(*id);
        }
        s
    }
}

/// Where a script call's KEYS and ARGV are written.
trait CallArgs {
    fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self;
    fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self;
}

impl CallArgs for ScriptInvocation<'_> {
    fn key<T: redis::ToRedisArgs>(&mut self, key: T) -> &mut Self {
        ScriptInvocation::key(self, key)
    }
    fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        ScriptInvocation::arg(self, arg)
    }
}

/// KEYS and ARGV of `claim`.
fn claim_call<C: CallArgs>(s: &mut C, ks: &Keyspace, q: &QueueKeys, a: &Claim<'_>) {
    waiting_keys(s, q);
    s.key(&q.leases)
        .key(&q.owners)
        .key(&q.wake)
        .key(&q.drained)
        .key(&q.seq)
        .key(&q.paused)
        .key(q.claim(a.token))
        .key(&ks.fronts)
        .key(&ks.liveness)
        .key(&ks.generation)
        .key(&ks.held)
        .key(&ks.holders)
        .key(&ks.gcra)
        .key(&ks.gcra_expiry)
        .key(&ks.quota_waiting)
        .key(&ks.quota_waiting_limits)
        .key(&q.handoff)
        .key(&q.offers)
        .key(q.offer(a.token))
        .arg(a.token)
        .arg(a.worker)
        .arg(ms(a.lease))
        .arg(a.max_jobs)
        .arg(a.max_inflight_total)
        .arg(a.aging_step_ms)
        .arg(a.scan_budget)
        .arg(ms(a.front_timeout))
        .arg(ms(a.worker_timeout));
    match a.hold_only {
        Some(methods) => s.arg("1").arg(methods.join(" ")),
        None => s.arg("").arg(""),
    };
}

/// Arguments of `claim`.
pub(crate) struct Claim<'a> {
    pub token: &'a str,
    pub worker: &'a str,
    pub lease: Duration,
    pub max_jobs: usize,
    pub max_inflight_total: u32,
    pub aging_step_ms: u64,
    pub scan_budget: u32,
    pub front_timeout: Duration,
    pub worker_timeout: Duration,
    /// A claim ahead: the methods of the jobs it may start (`retry_methods`).
    pub hold_only: Option<&'a [String]>,
}

/// One job a claim started.
pub(crate) struct Started {
    pub id: String,
    pub frame: Vec<u8>,
    pub remaining_ms: i64,
    pub front: String,
    pub flow_def: String,
}

/// What `claim` answered.
pub(crate) struct ClaimAnswer {
    pub generation: String,
    pub jobs: Vec<Started>,
    /// With no job: ms until a rate quota may allow (negative: unknown).
    pub retry_in_ms: i64,
    /// With no job: a claim ahead left the next job for a free slot.
    pub unheld: bool,
}

impl Scripts {
    pub(crate) fn claim(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        a: &Claim<'_>,
    ) -> ScriptInvocation<'_> {
        let mut s = self.claim.prepare_invoke();
        claim_call(&mut s, ks, q, a);
        s
    }

    pub(crate) fn renew(
        &self,
        q: &QueueKeys,
        ks: &Keyspace,
        id: &str,
        token: &str,
        lease: Duration,
        holds: &[String],
    ) -> ScriptInvocation<'_> {
        let mut s = self.renew.prepare_invoke();
        s.key(&q.leases)
            .key(&q.owners)
            .key(&ks.holders)
            .arg(id)
            .arg(token)
            .arg(ms(lease));
        for h in holds {
            s.arg(h);
        }
        s
    }
}

/// One job of a `release` call (a call settles many: see `redis::batch`).
pub(crate) struct Release {
    pub id: String,
    pub token: String,
    pub front: String,
    pub frame: bytes::Bytes,
    pub backend_ms: u64,
    pub generation: String,
    pub holds: Vec<String>,
}

impl Scripts {
    pub(crate) fn release(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        reply_ttl: Duration,
        samples: usize,
        jobs: &[Release],
    ) -> ScriptInvocation<'_> {
        let mut s = self.release.prepare_invoke();
        s.key(&q.leases)
            .key(&q.owners)
            .key(&q.jobs)
            .key(&q.info)
            .key(&q.wake)
            .key(&q.latency)
            .key(&ks.generation)
            .key(&ks.held)
            .key(&ks.holders)
            .key(&q.flows)
            .key(&q.handoff)
            .arg(reply_ttl.as_secs())
            .arg(samples);
        for job in jobs {
            s.key(ks.replies(&job.front))
                .key(q.settled(&job.id))
                .arg(&job.id)
                .arg(&job.token)
                .arg(job.frame.as_ref())
                .arg(job.backend_ms)
                .arg(&job.generation)
                .arg(job.holds.len());
            for h in &job.holds {
                s.arg(h);
            }
        }
        s
    }

    pub(crate) fn hand_back(&self, q: &QueueKeys, id: &str, token: &str) -> ScriptInvocation<'_> {
        let mut s = self.hand_back.prepare_invoke();
        s.key(&q.leases)
            .key(&q.owners)
            .key(&q.wake)
            .arg(id)
            .arg(token);
        s
    }

    pub(crate) fn put_back(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        id: &str,
        token: &str,
    ) -> ScriptInvocation<'_> {
        let mut s = self.put_back.prepare_invoke();
        waiting_keys(&mut s, q);
        s.key(&q.leases)
            .key(&q.owners)
            .key(&q.wake)
            .key(&ks.held)
            .key(&ks.holders)
            .key(&ks.quota_waiting)
            .key(&ks.quota_waiting_limits)
            .key(&ks.gcra)
            .arg(id)
            .arg(token);
        s
    }
}

/// Arguments of `dead_letter`.
pub(crate) struct DeadLetter<'a> {
    pub id: &'a str,
    pub token: &'a str,
    pub front: &'a str,
    pub reason: &'a str,
    pub answer: &'a [u8],
    pub reply_ttl: Duration,
    pub holds: &'a [String],
}

impl Scripts {
    pub(crate) fn dead_letter(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        a: &DeadLetter<'_>,
    ) -> ScriptInvocation<'_> {
        let mut s = self.dead_letter.prepare_invoke();
        s.key(&q.leases)
            .key(&q.owners)
            .key(&q.jobs)
            .key(&q.info)
            .key(&q.dead)
            .key(&q.dead_reasons)
            .key(ks.replies(a.front))
            .key(q.settled(a.id))
            .key(&ks.held)
            .key(&ks.holders)
            .arg(a.id)
            .arg(a.token)
            .arg(a.reason)
            .arg(a.answer)
            .arg(a.reply_ttl.as_secs());
        for h in a.holds {
            s.arg(h);
        }
        s
    }

    pub(crate) fn heartbeat(
        &self,
        ks: &Keyspace,
        kind: crate::Daemon,
        id: &str,
        info: &str,
        info_ttl: Duration,
        gap: Duration,
    ) -> ScriptInvocation<'_> {
        let mut s = self.heartbeat.prepare_invoke();
        s.key(ks.beats(kind))
            .key(ks.daemon_info(kind, id))
            .key(&ks.liveness)
            .key(&ks.generation)
            .arg(id)
            .arg(info)
            .arg(info_ttl.as_secs().max(1))
            .arg(ms(gap));
        s
    }

    pub(crate) fn reap_scan(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        timeout: Duration,
        limit: usize,
        cursor: &str,
    ) -> ScriptInvocation<'_> {
        let mut s = self.reap_scan.prepare_invoke();
        s.key(&q.leases)
            .key(&q.owners)
            .key(&q.info)
            .key(&ks.workers)
            .key(&ks.liveness)
            .arg(ms(timeout))
            .arg(limit)
            .arg(cursor);
        s
    }
}

/// What a reaper decided for one lost job.
pub(crate) struct ReapAction<'a> {
    pub id: &'a str,
    pub token: &'a str,
    /// `requeue`, `answer` or `bury`.
    pub action: &'static str,
    pub front: &'a str,
    pub frame: &'a [u8],
}

/// One job a purge withdraws, with its client's answer.
pub(crate) struct PurgeItem<'a> {
    pub id: &'a str,
    pub front: &'a str,
    pub frame: &'a [u8],
}

impl Scripts {
    pub(crate) fn reap(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        timeout: Duration,
        reply_ttl: Duration,
        actions: &[ReapAction<'_>],
    ) -> ScriptInvocation<'_> {
        let mut s = self.reap.prepare_invoke();
        waiting_keys(&mut s, q);
        s.key(&q.leases)
            .key(&q.owners)
            .key(&q.wake)
            .key(&q.dead)
            .key(&q.dead_reasons)
            .key(&ks.quota_waiting)
            .key(&ks.held)
            .key(&ks.holders)
            .key(&ks.workers)
            .key(&ks.liveness)
            .key(&ks.quota_waiting_limits)
            .arg(ms(timeout))
            .arg(reply_ttl.as_secs());
        for a in actions {
            s.key(q.settled(a.id)).key(ks.replies(a.front));
            s.arg(a.id).arg(a.token).arg(a.action).arg(a.frame);
        }
        s
    }

    pub(crate) fn purge(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        reply_ttl: Duration,
        items: &[PurgeItem<'_>],
    ) -> ScriptInvocation<'_> {
        let mut s = self.purge.prepare_invoke();
        waiting_keys(&mut s, q);
        s.key(&ks.quota_waiting)
            .key(&ks.quota_waiting_limits)
            .arg(reply_ttl.as_secs());
        for item in items {
            s.key(q.settled(item.id)).key(ks.replies(item.front));
            s.arg(item.id).arg(item.frame);
        }
        s
    }

    pub(crate) fn stats(&self, q: &QueueKeys) -> ScriptInvocation<'_> {
        let mut s = self.stats.prepare_invoke();
        s.key(&q.pending).key(&q.drained);
        s
    }
}

// ---- reading answers -------------------------------------------------------

fn bad(what: &str, value: &Value) -> BrokerError {
    BrokerError::Protocol(format!("{what}: {value:?}"))
}

fn items(value: Value, what: &str) -> Result<Vec<Value>, BrokerError> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(bad(what, &other)),
    }
}

pub(crate) fn string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => string(other)?.parse().ok(),
    }
}

fn bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(b) => b,
        other => string(&other).unwrap_or_default().into_bytes(),
    }
}

/// One outcome per job of an `enqueue` call.
pub(crate) fn parse_enqueue(value: Value) -> Result<Vec<Enqueued>, BrokerError> {
    items(value, "enqueue")?
        .into_iter()
        .map(parse_enqueued)
        .collect()
}

fn parse_enqueued(value: Value) -> Result<Enqueued, BrokerError> {
    let items = items(value, "enqueue")?;
    match items.first().and_then(string).as_deref() {
        Some("queued") => Ok(Enqueued::Queued),
        Some("settled") => Ok(Enqueued::Settled),
        Some("gone") => Ok(Enqueued::Gone),
        Some("refused") => Ok(Enqueued::Refused {
            what: items.get(1).and_then(string).unwrap_or_default(),
            waiting: items.get(2).and_then(int).unwrap_or(0).max(0) as u64,
            drain_rate: items
                .get(3)
                .and_then(string)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0.0),
        }),
        _ => Err(BrokerError::Protocol(format!("enqueue: {items:?}"))),
    }
}

/// One outcome per job of a `release` call.
pub(crate) fn parse_release(value: Value) -> Result<Vec<crate::Delivery>, BrokerError> {
    items(value, "release")?
        .iter()
        .map(|v| match string(v).as_deref() {
            Some("delivered" | "again") => Ok(crate::Delivery::Delivered),
            Some("lost") => Ok(crate::Delivery::LeaseLost),
            _ => Err(BrokerError::Protocol(format!("release: {v:?}"))),
        })
        .collect()
}

pub(crate) fn parse_claim(value: Value) -> Result<ClaimAnswer, BrokerError> {
    let mut items = items(value, "claim")?.into_iter();
    let generation = items.next().as_ref().and_then(string).unwrap_or_default();
    let kind = items.next().as_ref().and_then(string).unwrap_or_default();
    if kind == "idle" {
        let why = items.next().as_ref().and_then(string).unwrap_or_default();
        let retry_in_ms = items.next().as_ref().and_then(int).unwrap_or(-1);
        return Ok(ClaimAnswer {
            generation,
            jobs: Vec::new(),
            retry_in_ms,
            unheld: why == "unheld",
        });
    }
    if kind != "jobs" {
        return Err(BrokerError::Protocol(format!("claim: kind {kind:?}")));
    }
    let rest: Vec<Value> = items.collect();
    let mut jobs = Vec::with_capacity(rest.len() / 5);
    for job in rest.chunks(5) {
        let [id, frame, left, front, def] = job else {
            return Err(BrokerError::Protocol("claim: truncated job".into()));
        };
        jobs.push(Started {
            id: string(id).ok_or_else(|| bad("claim id", id))?,
            frame: bytes(frame.clone()),
            remaining_ms: int(left).unwrap_or(0),
            front: string(front).unwrap_or_default(),
            flow_def: string(def).unwrap_or_default(),
        });
    }
    Ok(ClaimAnswer {
        generation,
        jobs,
        retry_in_ms: -1,
        unheld: false,
    })
}

/// One candidate found by `reap_scan`.
pub(crate) struct LostJob {
    pub id: String,
    pub token: String,
    pub method: String,
    /// -1 when its record is gone (or unreadable).
    pub attempts: i64,
    pub front: String,
    /// Its response head went out (it streams).
    pub streaming: bool,
}

pub(crate) fn parse_reap_scan(value: Value) -> Result<(String, Vec<LostJob>), BrokerError> {
    let items = items(value, "reap_scan")?;
    let cursor = items.first().and_then(string).unwrap_or_else(|| "0".into());
    let lost = items[1.min(items.len())..]
        .chunks(6)
        .filter_map(|c| match c {
            [id, token, method, attempts, front, streaming] => Some(LostJob {
                streaming: string(streaming).as_deref() == Some("1"),
                id: string(id)?,
                token: string(token).unwrap_or_default(),
                method: string(method).unwrap_or_default(),
                attempts: int(attempts).unwrap_or(-1),
                front: string(front).unwrap_or_default(),
            }),
            _ => None,
        })
        .collect();
    Ok((cursor, lost))
}

pub(crate) fn parse_list(value: Value, what: &str) -> Result<Vec<Value>, BrokerError> {
    items(value, what)
}

/// Arguments of `stream_head`.
pub(crate) struct StreamHead<'a> {
    pub id: &'a str,
    pub token: &'a str,
    pub front: &'a str,
    pub frame: &'a [u8],
    pub reply_ttl: Duration,
    pub stream_ttl: Duration,
}

/// Arguments of `push_pieces`.
pub(crate) struct PushPieces<'a> {
    pub id: &'a str,
    pub front: &'a str,
    /// Number of the first piece; None appends whatever the window.
    pub first: Option<u64>,
    pub window: usize,
    pub stream_ttl: Duration,
    pub notice: &'a [u8],
    pub reply_ttl: Duration,
    pub pieces: &'a [bytes::Bytes],
}

impl Scripts {
    pub(crate) fn stream_head(
        &self,
        ks: &Keyspace,
        q: &QueueKeys,
        a: &StreamHead<'_>,
    ) -> ScriptInvocation<'_> {
        let mut s = self.stream_head.prepare_invoke();
        s.key(&q.owners)
            .key(ks.replies(a.front))
            .key(ks.stream(a.id))
            .arg(a.id)
            .arg(a.token)
            .arg(a.frame)
            .arg(a.reply_ttl.as_secs())
            .arg(ms(a.stream_ttl));
        s
    }

    /// Numbered pieces stored under their numbers by plain `HSETNX`s (a
    /// piece already there, such as the reaper's abort, is never replaced)
    /// with the hash's expiry (kept should the script not run), then the
    /// script, which keeps those the window has room for; pieces with no
    /// number (an abort) go to the script itself.
    pub(crate) fn push_pieces(&self, ks: &Keyspace, a: &PushPieces<'_>) -> Transaction<'_> {
        let pieces = ks.pieces(a.id);
        let mut s = self.push_pieces.prepare_invoke();
        s.key(&pieces)
            .key(ks.stream(a.id))
            .key(ks.replies(a.front))
            .arg(a.first.map_or(-1, |f| f as i64))
            .arg(a.pieces.len())
            .arg(a.window)
            .arg(ms(a.stream_ttl))
            .arg(a.notice)
            .arg(a.reply_ttl.as_secs());
        let mut pipe = redis::pipe();
        pipe.atomic();
        match a.first {
            Some(first) if !a.pieces.is_empty() => {
                for (n, p) in (first..).zip(a.pieces) {
                    pipe.hset_nx(&pieces, n, p.as_ref()).ignore();
                }
                pipe.pexpire(&pieces, ms(a.stream_ttl) as i64).ignore();
            }
            Some(_) => {}
            None => {
                for p in a.pieces {
                    s.arg(p.as_ref());
                }
            }
        }
        pipe.invoke_script(&s);
        Transaction {
            pipe,
            script: &self.push_pieces,
        }
    }

    /// The script, which drops the pieces before `from`, then an `HMGET`
    /// of the `max` pieces numbered from `from` (nil past the last).
    pub(crate) fn take_pieces(
        &self,
        ks: &Keyspace,
        id: &str,
        from: u64,
        max: usize,
        stream_ttl: Duration,
    ) -> Transaction<'_> {
        let pieces = ks.pieces(id);
        let mut s = self.take_pieces.prepare_invoke();
        s.key(&pieces)
            .key(ks.stream(id))
            .arg(from)
            .arg(ms(stream_ttl));
        let mut read = redis::cmd("HMGET");
        read.arg(&pieces);
        for n in from..from + max.max(1) as u64 {
            read.arg(n);
        }
        let mut pipe = redis::pipe();
        pipe.atomic().invoke_script(&s).add_command(read);
        Transaction {
            pipe,
            script: &self.take_pieces,
        }
    }
}
