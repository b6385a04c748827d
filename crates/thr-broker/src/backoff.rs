//! The one backoff every retry loop of thr uses (claim loops, reply
//! delivery, the front's reply loop, the reaper).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff from 50 ms to 2 s after `failures` failures in a
/// row, with full jitter so that many daemons do not hammer a recovering
/// Redis in step.
pub fn backoff(failures: u32) -> Duration {
    let cap = Duration::from_millis(50) * 2u32.saturating_pow(failures.saturating_sub(1).min(6));
    let cap = cap.min(Duration::from_secs(2));
    let ms = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

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
