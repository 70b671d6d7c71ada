//! Jittered exponential backoff for reconnecting to the controller.
//!
//! "Full jitter" (a uniform delay between zero and the exponential cap) so
//! that a fleet of agents cut off together does not reconnect together.

use std::time::Duration;

/// Backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        // Seeded per process and per instance: agents must not share a sequence.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Self {
            initial,
            max,
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The upper bound of the next delay.
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay (uniform in `0..=cap`), and one step further out.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: plenty for spreading reconnects.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let nanos = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 {
            0
        } else {
            self.rng % (nanos + 1)
        })
    }

    /// A connection worked: start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut delays = Vec::new();
        for _ in 0..12 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(d <= cap, "{d:?} > {cap:?}");
            delays.push(d);
        }
        assert_eq!(b.cap(), Duration::from_secs(5));
        // Jitter: not all the same.
        assert!(delays.windows(2).any(|w| w[0] != w[1]));
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(100));
    }
}
