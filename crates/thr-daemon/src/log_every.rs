//! Log lines for failures that repeat for every request or attempt (accept
//! failing for every pending client when descriptors run out, every
//! enqueue refused while Redis is down): one line per period, with how
//! many went unlogged since the last one, so that an outage at thousands
//! of requests a second does not flood the log. Metrics count them all.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one log line per period.
#[derive(Debug)]
pub struct LogEvery {
    period: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    logged: Option<Instant>,
    unlogged: u64,
}

/// The period of the daemons' lines about repeated failures.
pub const FAILURES: Duration = Duration::from_secs(10);

impl LogEvery {
    /// One line per [`FAILURES`] period: what every repeated failure uses.
    pub const fn failures() -> LogEvery {
        LogEvery::new(FAILURES)
    }

    /// One line per `period`.
    pub const fn new(period: Duration) -> LogEvery {
        LogEvery {
            period,
            state: Mutex::new(State {
                logged: None,
                unlogged: 0,
            }),
        }
    }

    /// For an occurrence: `Some(n)` when it is to be logged, `n` being the
    /// occurrences left unlogged since the last line; `None` when it is
    /// only counted.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.logged.is_none_or(|at| at.elapsed() >= self.period) {
            state.logged = Some(Instant::now());
            Some(std::mem::take(&mut state.unlogged))
        } else {
            state.unlogged += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_what_went_unlogged() {
        let every = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(every.admit(), Some(0));
        assert_eq!(every.admit(), None);
        assert_eq!(every.admit(), None);
        let always = LogEvery::new(Duration::ZERO);
        assert_eq!(always.admit(), Some(0));
        assert_eq!(always.admit(), Some(0));
        // The count is carried to the next line.
        let every = LogEvery {
            period: Duration::from_secs(3600),
            state: Mutex::new(State {
                logged: Some(Instant::now()),
                unlogged: 0,
            }),
        };
        assert_eq!(every.admit(), None);
        assert_eq!(every.admit(), None);
        every.state.lock().unwrap().logged = None;
        assert_eq!(every.admit(), Some(2));
    }
}
