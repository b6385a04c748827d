//! The one backoff every retry loop of thr uses (claim loops, reply
//! delivery, the front's reply loop, the reaper), and [`Recovery`], which
//! ends a loop's backoff as soon as Redis answers again.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;

/// Exponential backoff from 50 ms to 2 s after `failures` failures in a
/// row, with full jitter so that many daemons do not hammer a recovering
/// Redis in step.
pub fn backoff(failures: u32) -> Duration {
    let cap = Duration::from_millis(50) * 2u32.saturating_pow(failures.saturating_sub(1).min(6));
    let cap = cap.min(Duration::from_secs(2));
    let ms = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(ms)
}

/// Tells the retry loops of a process that Redis answers again after
/// failing (a heartbeat got through: [`Broker::recovery`](crate::Broker::recovery)),
/// so that they try again at once instead of sleeping out a backoff of up
/// to 2 s: once Redis is back after a restart, the next request is served
/// within a heartbeat, not a backoff, later.
#[derive(Clone, Default, Debug)]
pub struct Recovery(Arc<Notify>);

impl Recovery {
    /// Wakes every loop pausing now.
    pub fn announce(&self) {
        self.0.notify_waiters();
    }

    /// Sleeps [`backoff`]`(failures)`, or until Redis answers again
    /// after this future was made.
    pub fn pause(&self, failures: u32) -> impl Future<Output = ()> + Send + 'static {
        self.sleep(backoff(failures))
    }

    /// Sleeps `d`, or until Redis answers again after this future was made.
    pub fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        // Made now, not when first polled: it is told of an announcement
        // from this moment on.
        let announced = self.0.clone().notified_owned();
        let sleep = tokio::time::sleep(d);
        async move {
            tokio::select! {
                _ = sleep => {}
                _ = announced => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_when_redis_answers_again() {
        let recovery = Recovery::default();
        let pausing = tokio::spawn({
            let recovery = recovery.clone();
            async move { recovery.pause(30).await }
        });
        // Let it start waiting, then announce before its second is up.
        tokio::time::sleep(Duration::from_millis(10)).await;
        recovery.announce();
        let started = tokio::time::Instant::now();
        pausing.await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "ended by the announcement"
        );
        // Without one, a pause lasts its backoff.
        let started = tokio::time::Instant::now();
        recovery.pause(30).await;
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[test]
    fn grows_then_caps() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(first >= Duration::from_millis(25) && first <= Duration::from_millis(50));
            let late = backoff(30);
            assert!(late >= Duration::from_secs(1) && late <= Duration::from_secs(2));
        }
    }
}
