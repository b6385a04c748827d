//! The edge limit (`[http2redis.edge_limit]`): a per-client rate kept in
//! this front's memory with governor's keyed GCRA. An abusive client gets a
//! 429 before its request costs a Redis round trip; global quotas, shared
//! by every worker, live in Redis (`[[limits]]`).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use thr_core::config::EdgeLimit;
use thr_core::rules::RuleRequest;

/// Checks between two sweeps of idle clients out of the limiter's memory.
const SWEEP_EVERY: u64 = 10_000;

/// A configured edge limit and its state.
pub struct EdgeLimiter {
    config: EdgeLimit,
    limiter: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl EdgeLimiter {
    /// A limiter for `config`.
    pub fn new(config: &EdgeLimit) -> EdgeLimiter {
        let period = config.rate.per / config.rate.count.get();
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("period is not zero")
            .allow_burst(config.rate.burst.max(NonZeroU32::MIN));
        EdgeLimiter {
            config: config.clone(),
            limiter: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        }
    }

    /// The configuration it enforces.
    pub fn config(&self) -> &EdgeLimit {
        &self.config
    }

    /// Ok, or how long the client must wait.
    pub fn check(&self, req: &RuleRequest) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        // A request without the key (a unix client by address) is not limited.
        let Some(key) = self.config.by.value(req) else {
            return Ok(());
        };
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}
