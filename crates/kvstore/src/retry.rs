//! Retry timing: pure computation, no sleeping. The caller sleeps.

use std::time::Duration;

/// How long and how often to retry a request that met a write lock, a stopped node, stale
/// metadata or an unreachable node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up after this much time in total.
    pub deadline: Duration,
    /// First backoff delay.
    pub initial_backoff: Duration,
    /// Backoff delays never exceed this.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(250),
        }
    }
}

/// Exponential backoff with "equal jitter": the n-th delay is uniform in `[d/2, d]` with
/// `d = min(max, initial * 2^n)`, so that clients released by the same unlock do not retry
/// in lock step, while each still waits at least half the nominal delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff sequence; `seed` decides the jitter (any value, e.g. from a clock).
    pub fn new(policy: RetryPolicy, seed: u64) -> Self {
        Self {
            policy,
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .policy
            .initial_backoff
            .saturating_mul(1u32 << self.attempt.min(20));
        let cap = exp.min(self.policy.max_backoff);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: jitter needs no cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = cap / 2;
        let span = (cap - half).as_nanos() as u64;
        half + Duration::from_nanos(if span == 0 { 0 } else { self.rng % (span + 1) })
    }

    /// How many delays were handed out.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps_with_jitter() {
        let policy = RetryPolicy {
            deadline: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        };
        let mut b = Backoff::new(policy, 42);
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(5) && delays[0] <= Duration::from_millis(10));
        assert!(delays[2] >= Duration::from_millis(20) && delays[2] <= Duration::from_millis(40));
        for d in &delays[4..] {
            assert!(*d >= Duration::from_millis(50) && *d <= Duration::from_millis(100));
        }
        assert_eq!(b.attempts(), 10);
        // Different seeds give different jitter.
        let mut c = Backoff::new(policy, 7);
        let other: Vec<_> = (0..10).map(|_| c.next_delay()).collect();
        assert_ne!(delays, other);
    }
}
