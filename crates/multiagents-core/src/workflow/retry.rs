//! Retry policies: how many attempts a step gets and how long to wait
//! between them. The delay is a pure function of the policy, the attempt and
//! a seed, so the state machine stays deterministic (jitter included).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::RetryDirective;
use crate::time::{Timestamp, duration_serde};

/// Exponential back-off with jitter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Wait before the second attempt.
    #[serde(with = "duration_serde")]
    pub initial_delay: Duration,
    /// Factor applied to the wait after each further failure (≥ 1).
    pub multiplier: f64,
    /// Upper bound on any wait.
    #[serde(with = "duration_serde")]
    pub max_delay: Duration,
    /// Random spread as a fraction of the wait, 0 to 1 (0.2 = ±20%).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// Three attempts, 100 ms then 200 ms, ±10%.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// `attempts` attempts with the default back-off.
    pub fn attempts(attempts: u32) -> Self {
        Self {
            max_attempts: attempts,
            ..Self::default()
        }
    }

    /// The default policy for compensations: they must get through, so they
    /// are retried longer (10 attempts, 200 ms doubling up to 30 s).
    pub fn compensation_default() -> Self {
        Self {
            max_attempts: 10,
            initial_delay: Duration::from_millis(200),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: 0.1,
        }
    }

    /// Sets the first delay.
    pub fn with_initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        self
    }

    /// Sets the multiplier.
    pub fn with_multiplier(mut self, m: f64) -> Self {
        self.multiplier = m;
        self
    }

    /// Sets the largest delay.
    pub fn with_max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Sets the jitter fraction.
    pub fn with_jitter(mut self, j: f64) -> Self {
        self.jitter = j;
        self
    }

    /// The wait after attempt `failed_attempt` (1-based) failed. `seed` picks
    /// the jitter; the same seed always gives the same delay.
    pub fn delay_after(&self, failed_attempt: u32, seed: u64) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_delay.as_secs_f64());
        // Map the seed to [-1, 1).
        let unit = (seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        let jittered = capped * (1.0 + self.jitter * unit);
        Duration::from_secs_f64(jittered.clamp(0.0, self.max_delay.as_secs_f64()))
    }

    /// When to try again after attempt `failed_attempt` failed with the
    /// retry `directive` its error carries, at `now`: `None` when it must not
    /// be tried again (the attempts are spent, or the error says never).
    /// `seed` picks the jitter, as in [`RetryPolicy::delay_after`]. The one
    /// retry rule, for steps and compensations alike.
    pub fn next_try(
        &self,
        failed_attempt: u32,
        directive: RetryDirective,
        now: Timestamp,
        seed: u64,
    ) -> Option<Timestamp> {
        match directive {
            _ if failed_attempt >= self.max_attempts => None,
            RetryDirective::Never => None,
            RetryDirective::Retry => Some(now.plus(self.delay_after(failed_attempt, seed))),
            RetryDirective::RetryAfter(ms) => Some(Timestamp(now.0.saturating_add(ms))),
        }
    }

    /// Checks the policy, returning what is wrong with it.
    pub fn problem(&self) -> Option<String> {
        if self.max_attempts == 0 {
            return Some("max_attempts is 0; it must be at least 1 (1 = no retries)".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Some(format!(
                "multiplier {} must be a number ≥ 1",
                self.multiplier
            ));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Some(format!("jitter {} must be between 0 and 1", self.jitter));
        }
        if self.initial_delay > self.max_delay {
            return Some(format!(
                "initial_delay {:?} is longer than max_delay {:?}",
                self.initial_delay, self.max_delay
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy::default().with_jitter(0.0);
        assert_eq!(p.delay_after(1, 0), Duration::from_millis(100));
        assert_eq!(p.delay_after(2, 0), Duration::from_millis(200));
        assert_eq!(p.delay_after(3, 0), Duration::from_millis(400));
        assert_eq!(p.delay_after(40, 0), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_in_band_and_is_deterministic() {
        let p = RetryPolicy::default().with_jitter(0.5);
        for seed in [0u64, 1, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
            let d = p.delay_after(1, seed);
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(150),
                "{d:?}"
            );
            assert_eq!(d, p.delay_after(1, seed));
        }
    }

    #[test]
    fn the_next_try_follows_the_directive_until_the_attempts_are_spent() {
        let p = RetryPolicy::attempts(3).with_jitter(0.0);
        let now = Timestamp(1_000);
        assert_eq!(
            p.next_try(1, RetryDirective::Retry, now, 0),
            Some(Timestamp(1_100))
        );
        assert_eq!(
            p.next_try(2, RetryDirective::RetryAfter(5), now, 0),
            Some(Timestamp(1_005))
        );
        assert_eq!(p.next_try(1, RetryDirective::Never, now, 0), None);
        assert_eq!(p.next_try(3, RetryDirective::Retry, now, 0), None);
        assert_eq!(p.next_try(3, RetryDirective::RetryAfter(5), now, 0), None);
    }

    #[test]
    fn problems_are_named() {
        assert!(
            RetryPolicy::attempts(0)
                .problem()
                .expect("problem")
                .contains("max_attempts")
        );
        assert!(
            RetryPolicy::default()
                .with_multiplier(0.5)
                .problem()
                .expect("problem")
                .contains("multiplier")
        );
        assert!(
            RetryPolicy::default()
                .with_jitter(2.0)
                .problem()
                .expect("problem")
                .contains("jitter")
        );
        assert!(RetryPolicy::default().problem().is_none());
    }
}
