//! The Redis key scheme (DESIGN.md decision 8).
//!
//! Every key of one queue carries the hash tag `{q:NAME}` and every key of one
//! front carries `{f:ID}`, so that a queue's scripts touch a single Redis
//! Cluster slot. Queue names are restricted by the configuration to
//! `[A-Za-z0-9_.-]`; front ids are generated. Nothing taken from a request is
//! ever spliced into a key name.

/// Prefix of every key thr writes.
pub const PREFIX: &str = "thr";

/// The keys of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    /// Sorted set: job id → priority score, the jobs waiting to be claimed.
    pub pending: String,
    /// Counter giving each job its place within its priority.
    pub seq: String,
    /// Hash: job id → encoded request envelope.
    pub jobs: String,
    /// Sorted set: job id → client deadline (ms, Redis clock).
    pub deadlines: String,
    /// Sorted set: job id → lease deadline (ms, Redis clock), the claimed jobs.
    pub leases: String,
    /// List used as a doorbell: one token per enqueued job wakes one worker.
    pub wake: String,
    /// Hash: job id → encoded job that could not be run (poison, …).
    pub dead: String,
    /// Hash: job id → why it is in `dead`.
    pub dead_reasons: String,
    /// Sorted set: flow id → its turn (the order score of its next job).
    pub flows: String,
    /// Hash: flow id → flow definition (its quotas).
    pub flowdefs: String,
    /// Hash: job id → `priority<TAB>flow`.
    pub jobinfo: String,
    /// Hash: second → jobs started, for drain rates.
    pub drained: String,
    /// Prefix of the flows' own sorted sets (`prefix + flow id`).
    pub flow_prefix: String,
    /// Hash: job id → the worker running it.
    pub owners: String,
    /// Hash: job id → times a worker was lost while running it.
    pub attempts: String,
    /// Set while the queue is paused (`thrctl pause`): workers do not claim.
    pub paused: String,
    /// List of the latest served jobs, newest first, trimmed back to
    /// [`LATENCY_SAMPLES`] every 64 pushes: `second<TAB>total_ms<TAB>backend_ms`, where
    /// total runs from enqueue to reply (Redis clock). Operators' latency
    /// percentiles come from it, whichever worker served the job.
    pub latency: String,
}

/// How many served jobs each queue keeps for latency percentiles.
pub const LATENCY_SAMPLES: usize = 1024;

impl QueueKeys {
    /// Keys of queue `name`.
    pub fn new(name: &str) -> QueueKeys {
        let k = |suffix: &str| format!("{PREFIX}:{{q:{name}}}:{suffix}");
        QueueKeys {
            pending: k("pending"),
            seq: k("seq"),
            jobs: k("jobs"),
            deadlines: k("deadlines"),
            leases: k("leases"),
            wake: k("wake"),
            dead: k("dead"),
            dead_reasons: k("dead:reasons"),
            flows: k("flows"),
            flowdefs: k("flowdefs"),
            jobinfo: k("jobinfo"),
            drained: k("drained"),
            flow_prefix: k("flow:"),
            owners: k("owners"),
            attempts: k("attempts"),
            paused: k("paused"),
            latency: k("latency"),
        }
    }

    /// The sorted set of flow `flow`'s waiting jobs.
    pub fn flow(&self, flow: &str) -> String {
        format!("{}{flow}", self.flow_prefix)
    }
}

/// Sorted set: worker id → last heartbeat (ms, Redis clock).
pub const WORKERS: &str = "thr:workers";
/// Sorted set: front id → last heartbeat (ms, Redis clock).
pub const FRONTS: &str = "thr:fronts";

/// A worker's self-description (JSON, expires with its heartbeat).
pub fn worker_info(id: &str) -> String {
    format!("thr:worker:{id}")
}

/// A front's self-description (JSON, expires with its heartbeat).
pub fn front_info(id: &str) -> String {
    format!("thr:front:{id}")
}

/// Prefix of every quota key: `sem:TOKEN` (concurrency holders), `gcra:TOKEN`
/// (rate state). Quotas are shared by every queue a limit applies to.
pub const QUOTA_PREFIX: &str = "thr:{quota}:";

/// Hash: quota token → jobs waiting for it.
pub fn quota_waiting() -> String {
    format!("{QUOTA_PREFIX}waiting")
}

/// Sorted set: holders of a concurrency quota → lease deadline.
pub fn semaphore(token: &str) -> String {
    format!("{QUOTA_PREFIX}sem:{token}")
}

/// The GCRA state of a rate quota.
pub fn gcra(token: &str) -> String {
    format!("{QUOTA_PREFIX}gcra:{token}")
}

/// The list a front pops its replies from.
pub fn replies(front_id: &str) -> String {
    format!("{PREFIX}:{{f:{front_id}}}:replies")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_share_one_hash_tag() {
        let k = QueueKeys::new("default");
        for key in [
            &k.pending,
            &k.seq,
            &k.jobs,
            &k.deadlines,
            &k.leases,
            &k.wake,
            &k.dead,
            &k.dead_reasons,
            &k.latency,
        ] {
            assert!(key.starts_with("thr:{q:default}:"), "{key}");
        }
        assert_eq!(replies("ab12"), "thr:{f:ab12}:replies");
    }
}
