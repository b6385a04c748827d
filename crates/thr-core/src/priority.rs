//! Priority arithmetic of the pending queue (ARCHITECTURE.md decision 3).
//!
//! A pending job's sorted-set score is `priority · 2⁴⁶ + sequence`. Priorities
//! run from 1 (most urgent) to 99 (least), THR's scale, default 50; the
//! sequence is a per-queue counter, so jobs of one priority leave in arrival
//! order. The design sketch said 2³²: four billion jobs is only ~50 days at
//! 1,000 req/s, after which FIFO order would break. 2⁴⁶ leaves room for
//! 7·10¹³ jobs per queue while `99 · 2⁴⁶ + 2⁴⁶` stays below 2⁵³, where a
//! double (Redis's score type) is still exact.

/// Most urgent priority.
pub const HIGHEST: u8 = 1;
/// Least urgent priority.
pub const LOWEST: u8 = 99;
/// Priority of a request no rule changed.
pub const DEFAULT: u8 = 50;
/// Weight of the priority in a score; the sequence lives below it.
pub const SEQUENCE_SPACE: u64 = 1 << 46;

/// The pending-set score of a job; `sequence` wraps within its space.
pub fn score(priority: u8, sequence: u64) -> u64 {
    let priority = priority.clamp(HIGHEST, LOWEST) as u64;
    priority * SEQUENCE_SPACE + sequence % SEQUENCE_SPACE
}

/// The priority a score was made from.
pub fn priority_of(score: u64) -> u8 {
    (score / SEQUENCE_SPACE) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn scores_are_exact_in_a_double() {
        let max = score(LOWEST, SEQUENCE_SPACE - 1);
        assert!(max < (1u64 << 53));
        assert_eq!(max as f64 as u64, max);
    }

    proptest! {
        #[test]
        fn priority_dominates_then_fifo(p1 in 1u8..=99, p2 in 1u8..=99, s1 in 0u64..SEQUENCE_SPACE, s2 in 0u64..SEQUENCE_SPACE) {
            let (a, b) = (score(p1, s1), score(p2, s2));
            if p1 != p2 {
                prop_assert_eq!(a < b, p1 < p2);
            } else {
                prop_assert_eq!(a < b, s1 < s2);
            }
            // Ordering survives the trip through a double.
            prop_assert_eq!((a as f64) < (b as f64), a < b);
            prop_assert_eq!(priority_of(a), p1);
        }
    }
}
