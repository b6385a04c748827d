//! The Redis key scheme (ARCHITECTURE.md decisions 8 and 14).
//!
//! Every key of one deployment lives under `thr:{NAMESPACE}:` — one hash
//! tag — so that every script call, which may touch a queue's keys, the
//! shared quota keys and a front's reply list at once, is single-slot. A
//! Redis Cluster can then hold several independent deployments (or groups
//! of queues that share no quota), one `[redis] namespace` each, spread
//! over its slots; one deployment is served by one shard. That is the price
//! of global quotas shared by every queue: a claim must read and take them
//! atomically with the queue it claims from.
//!
//! Key sets are built once per queue ([`QueueKeys`], cached by the broker)
//! and once per deployment ([`Keyspace`]). Per-job keys (a settled marker,
//! a claim record) are made from ids the caller knows and passed through
//! KEYS like every other key, but for one case: the enqueue that hands a
//! job to a waiting worker's offer names that offer's list and claim list
//! itself, from [`QueueKeys::offer`] and [`QueueKeys::claim`] of `""` and
//! the claim token it finds in `offers` (ARCHITECTURE.md decision 27). Nothing taken from a request is ever spliced
//! into a key name: queue names are restricted by the configuration to
//! `[A-Za-z0-9_.-]`, ids are generated, quota tokens are escaped
//! (`thr_core::quota::escape_value`) and only ever used as hash fields or
//! set members.

/// The namespace used when the configuration names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How many served jobs each queue keeps for latency percentiles.
pub const LATENCY_SAMPLES: usize = 1024;

/// The deployment-wide keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    /// `thr:{NAMESPACE}:`, the prefix of every key.
    pub root: String,
    /// Sorted set: worker id → last heartbeat (ms, Redis clock).
    pub workers: String,
    /// Sorted set: front id → last heartbeat (ms, Redis clock).
    pub fronts: String,
    /// String: the data generation. Made by the first script that finds it
    /// missing, so it changes exactly when Redis lost its data.
    pub generation: String,
    /// Hash: `last` (ms of the latest heartbeat of any daemon) and `resumed`
    /// (ms when Redis answered again after nobody could beat for a while).
    /// Silence is counted from `resumed` at the earliest, so a paused Redis
    /// never makes live daemons look dead.
    pub liveness: String,
    /// Hash: quota token → jobs running under it (concurrency quotas).
    pub held: String,
    /// Sorted set: `token<TAB>job id` → lease deadline; the holders behind
    /// `held`, so that a dead worker's slots expire with its lease.
    pub holders: String,
    /// Hash: quota token → theoretical arrival time (rate quotas, GCRA).
    pub gcra: String,
    /// Sorted set: quota token → when its GCRA state is no longer needed.
    pub gcra_expiry: String,
    /// Hash: quota token → jobs waiting for it (for `max_waiting`, thrctl).
    pub quota_waiting: String,
    /// Hash: `LIMIT` → jobs waiting for one of its quotas, `LIMIT#` → its
    /// key values with jobs waiting: what gauges read, a few fields however
    /// many key values wait.
    pub quota_waiting_limits: String,
}

impl Keyspace {
    /// The keys of deployment `namespace` (`[A-Za-z0-9_.-]`).
    pub fn new(namespace: &str) -> Keyspace {
        let root = format!("thr:{{{namespace}}}:");
        let k = |suffix: &str| format!("{root}{suffix}");
        Keyspace {
            workers: k("workers"),
            fronts: k("fronts"),
            generation: k("generation"),
            liveness: k("liveness"),
            held: k("quota:held"),
            holders: k("quota:holders"),
            gcra: k("quota:gcra"),
            gcra_expiry: k("quota:gcra-expiry"),
            quota_waiting: k("quota:waiting"),
            quota_waiting_limits: k("quota:waiting-limits"),
            root,
        }
    }

    /// The keys of queue `name`.
    pub fn queue(&self, name: &str) -> QueueKeys {
        QueueKeys::new(&self.root, name)
    }

    /// Hash: a request body's chunks by index (0, 1, …), while its job
    /// waits or runs. Written and read by plain commands, never by a
    /// script: a chunk passed into Lua would cost Redis about 1 µs per KB
    /// (ARCHITECTURE.md decision 31).
    pub fn upload(&self, id: &str) -> String {
        format!("{}j:{id}:upload", self.root)
    }

    /// Hash: the pieces of a streamed response not yet taken by its front
    /// (at most `WINDOW`, but for an abort), by their numbers. Written and
    /// read by plain commands around the scripts that number them, so
    /// that no piece passes through Lua (ARCHITECTURE.md decision 31).
    pub fn pieces(&self, id: &str) -> String {
        format!("{}j:{id}:pieces", self.root)
    }

    /// Hash: a streamed response's state: `head` (number of the first piece
    /// not yet taken), `next` (number of the next piece to append),
    /// `cancelled` (its client went away).
    pub fn stream(&self, id: &str) -> String {
        format!("{}j:{id}:stream", self.root)
    }

    /// The list front `id` pops its messages from.
    pub fn replies(&self, front: &str) -> String {
        format!("{}f:{front}:replies", self.root)
    }

    /// A daemon's self-description (JSON, expires with its heartbeat).
    pub fn daemon_info(&self, kind: crate::Daemon, id: &str) -> String {
        match kind {
            crate::Daemon::Front => format!("{}front:{id}", self.root),
            crate::Daemon::Worker => format!("{}worker:{id}", self.root),
        }
    }

    /// The heartbeat set of `kind`.
    pub fn beats(&self, kind: crate::Daemon) -> &str {
        match kind {
            crate::Daemon::Front => &self.fronts,
            crate::Daemon::Worker => &self.workers,
        }
    }

    /// SCAN pattern matching every queue's sequence key.
    pub fn queue_pattern(&self) -> String {
        format!("{}q:*:seq", self.root)
    }

    /// The queue name in a key matched by [`Keyspace::queue_pattern`].
    pub fn queue_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.root.as_str())?
            .strip_prefix("q:")?
            .strip_suffix(":seq")
    }
}

/// The keys of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// The queue's name.
    pub name: String,
    /// `thr:{NAMESPACE}:q:NAME:`.
    pub prefix: String,
    /// Sorted set: job id → order score, every waiting job.
    pub pending: String,
    /// Sorted set (all scores 0): `flow<TAB>score<TAB>id` for every waiting
    /// job, so a flow's next job is one BYLEX range away. One key instead of
    /// one sorted set per flow: every key a script touches comes in KEYS.
    pub flow_jobs: String,
    /// Counter giving each job its place within its priority.
    pub seq: String,
    /// Hash: job id → encoded job (the payload, opaque to scripts).
    pub jobs: String,
    /// Hash: job id → [`JobInfo`](super::records::JobInfo).
    pub info: String,
    /// Sorted set: job id → lease deadline (ms, Redis clock), the running jobs.
    pub leases: String,
    /// Hash: job id → [`Owner`](super::records::Owner): who holds the lease.
    pub owners: String,
    /// List used as a doorbell: one token per enqueued job wakes one worker.
    pub wake: String,
    /// Hash: job id → encoded job that could not be run (poison, …).
    pub dead: String,
    /// Hash: job id → why it is in `dead`.
    pub dead_reasons: String,
    /// Sorted set: flow id → its turn (the order score of its next job).
    pub flows: String,
    /// Hash: flow id → [`FlowDef`](super::records::FlowDef).
    pub flowdefs: String,
    /// List: the job an enqueue handed to the next claim, having found
    /// nothing waiting and no quota to check (ARCHITECTURE.md decision 26):
    /// it is in `pending` but in no flow. At most one, and ids of jobs
    /// withdrawn meanwhile, which the claim lets go.
    pub handoff: String,
    /// Hash: claim token → [`Offer`](super::records::Offer): a worker
    /// waiting on the doorbell that takes the job an enqueue hands off
    /// (ARCHITECTURE.md decision 27). Removed by the enqueue that uses it and
    /// by the worker's next claim.
    pub offers: String,
    /// Hash: second → jobs started, for drain rates.
    pub drained: String,
    /// Set while the queue is paused (`thrctl pause`): workers do not claim.
    pub paused: String,
    /// List of [`LatencySample`](super::records::LatencySample)s, newest
    /// first, trimmed back to [`LATENCY_SAMPLES`] every 64 pushes.
    pub latency: String,
}

impl QueueKeys {
    fn new(root: &str, name: &str) -> QueueKeys {
        let prefix = format!("{root}q:{name}:");
        let k = |suffix: &str| format!("{prefix}{suffix}");
        QueueKeys {
            name: name.to_string(),
            pending: k("pending"),
            flow_jobs: k("flow-jobs"),
            seq: k("seq"),
            jobs: k("jobs"),
            info: k("info"),
            leases: k("leases"),
            owners: k("owners"),
            wake: k("wake"),
            dead: k("dead"),
            dead_reasons: k("dead:reasons"),
            flows: k("flows"),
            flowdefs: k("flowdefs"),
            handoff: k("handoff"),
            offers: k("offers"),
            drained: k("drained"),
            paused: k("paused"),
            latency: k("latency"),
            prefix,
        }
    }

    /// String: job `id` is settled (answered, withdrawn, purged); a late
    /// enqueue of it is refused. Expires once no client can wait for it.
    pub fn settled(&self, id: &str) -> String {
        format!("{}settled:{id}", self.prefix)
    }

    /// List: the jobs claim `token` leased, so that a repeated claim (its
    /// answer was lost) gets them again. Expires with the lease.
    pub fn claim(&self, token: &str) -> String {
        format!("{}claim:{token}", self.prefix)
    }

    /// List: the [`Handed`](super::records::Handed) job an enqueue gave
    /// offer `token`, which its worker's doorbell pop returns. Expires with
    /// the lease. The enqueue script names it (and the claim list) itself,
    /// from `offer("")` and `claim("")` and the token it finds in `offers`.
    pub fn offer(&self, token: &str) -> String {
        format!("{}offer:{token}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shares_the_deployment_hash_tag() {
        let ks = Keyspace::new("prod");
        let q = ks.queue("web");
        let all = [
            &ks.workers,
            &ks.fronts,
            &ks.generation,
            &ks.liveness,
            &ks.held,
            &ks.holders,
            &ks.gcra,
            &ks.gcra_expiry,
            &ks.quota_waiting,
            &ks.quota_waiting_limits,
            &q.pending,
            &q.flow_jobs,
            &q.seq,
            &q.jobs,
            &q.info,
            &q.leases,
            &q.owners,
            &q.wake,
            &q.dead,
            &q.dead_reasons,
            &q.flows,
            &q.flowdefs,
            &q.handoff,
            &q.offers,
            &q.offer("t1"),
            &q.drained,
            &q.paused,
            &q.latency,
            &q.settled("j1"),
            &q.claim("t1"),
            &ks.replies("f1"),
            &ks.daemon_info(crate::Daemon::Front, "f1"),
        ];
        for key in all {
            assert!(key.starts_with("thr:{prod}:"), "{key}");
            assert_eq!(key.matches('{').count(), 1, "{key}");
        }
        assert_eq!(ks.queue_of(&q.seq), Some("web"));
        assert_eq!(ks.queue_of(&q.pending), None);
    }
}
