//! How often a failed call to another system (the API server) is tried
//! again: a number of attempts, waits doubling from a first one.

use std::time::Duration;

/// Attempts and back-off of one kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// Wait before the second attempt; doubles after each failure.
    pub first_backoff: Duration,
}

impl Retry {
    /// Attempts in all, at least one.
    pub fn attempts(&self) -> u32 {
        self.attempts.max(1)
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.first_backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_and_there_is_always_one_attempt() {
        let r = Retry {
            attempts: 0,
            first_backoff: Duration::from_millis(500),
        };
        assert_eq!(r.attempts(), 1);
        let waits: Vec<u128> = (1..=3).map(|a| r.backoff(a).as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000]);
    }
}
