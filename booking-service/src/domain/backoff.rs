//! Retry delays for follow-up jobs: exponential with full jitter, capped.
//! Applied by re-scheduling the job with a later `run_at`, so the wait
//! survives a restart (apalis retries at the database level have no delay).

use std::time::Duration;

/// Retry policy of one kind of job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Attempts in all, the first included; then the job gives up.
    pub max_attempts: u32,
}

impl Backoff {
    /// Delay after `attempt` (1-based) failed: a uniformly random value in
    /// [d/2, d] where d = min(max, base * 2^(attempt-1)). Half-jitter keeps
    /// retries spread out without ever retrying at once.
    pub fn delay(&self, attempt: u32, random_unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let full = self.base.saturating_mul(1u32 << exponent).min(self.max);
        let unit = random_unit.clamp(0.0, 1.0);
        full.mul_f64(0.5 + unit / 2.0)
    }

    /// True when `attempt` (1-based, just failed) was the last one allowed.
    pub fn exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// The retry horizon: how long after the first attempt the last one is
    /// made, shortest (every jitter at its low end) and longest. Past it, a
    /// follow-up that never got through is FAILED.
    pub fn horizon(&self) -> (Duration, Duration) {
        (1..self.max_attempts).fold((Duration::ZERO, Duration::ZERO), |(low, high), attempt| {
            (
                low + self.delay(attempt, 0.0),
                high + self.delay(attempt, 1.0),
            )
        })
    }
}

/// A duration as hours with one decimal, for help texts and logs.
pub fn hours(duration: Duration) -> String {
    format!("{:.1} h", duration.as_secs_f64() / 3600.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
        max_attempts: 5,
    };

    #[test]
    fn doubles_each_attempt_within_jitter_bounds() {
        assert_eq!(POLICY.delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(POLICY.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(POLICY.delay(3, 1.0), Duration::from_secs(4));
        assert_eq!(POLICY.delay(3, 0.0), Duration::from_secs(2));
    }

    #[test]
    fn is_capped() {
        assert_eq!(POLICY.delay(20, 1.0), Duration::from_secs(60));
        assert_eq!(POLICY.delay(u32::MAX, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn the_horizon_sums_every_delay() {
        // 1 + 2 + 4 + 8 s at most, half of it at least.
        assert_eq!(
            POLICY.horizon(),
            (Duration::from_millis(7500), Duration::from_secs(15))
        );
    }

    #[test]
    fn gives_up_after_max_attempts() {
        assert!(!POLICY.exhausted(4));
        assert!(POLICY.exhausted(5));
    }
}
