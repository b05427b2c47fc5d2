//! The retry policy: how long to wait before an item's next attempt, and whether there is one.

use std::time::Duration;

/// Exponential backoff: before attempt `n + 1` wait `min(max, base · factor^(n − 1))`,
/// less up to half of it at random ("equal jitter"), so retries of many items spread out
/// but never wait longer than the policy says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub base: Duration,
    pub factor: f64,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The delay before the attempt after `attempt` (1-based) without jitter.
    pub fn nominal_delay(&self, attempt: i32) -> Duration {
        let exponent = attempt.saturating_sub(1).clamp(0, 64);
        let secs = self.base.as_secs_f64() * self.factor.powi(exponent);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay with jitter. `unit` is a random draw from `[0, 1)`; the result lies in
    /// `[nominal / 2, nominal]`.
    pub fn delay(&self, attempt: i32, unit: f64) -> Duration {
        let nominal = self.nominal_delay(attempt);
        nominal.mul_f64(1.0 - unit.clamp(0.0, 1.0) / 2.0)
    }
}

/// What becomes of an item whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailureDecision {
    /// Back to pending, to run again after the delay.
    RetryAfter(Duration),
    /// The item ends `failed`.
    GiveUp,
}

/// Decides whether a failed attempt is retried.
///
/// # Preconditions
/// `attempt` is the attempt that just failed, counted from 1.
///
/// # Returns
/// `GiveUp` for a permanent error or when `attempt` has reached `max_attempts`; else
/// `RetryAfter` the handler's own delay (`retry_after`, e.g. from a 429) when it gave one,
/// or the policy's delay with jitter from `unit`.
pub fn decide_failure(
    policy: &RetryPolicy,
    attempt: i32,
    max_attempts: i32,
    permanent: bool,
    retry_after: Option<Duration>,
    unit: f64,
) -> FailureDecision {
    if permanent || attempt >= max_attempts {
        FailureDecision::GiveUp
    } else {
        FailureDecision::RetryAfter(retry_after.unwrap_or_else(|| policy.delay(attempt, unit)))
    }
}

/// Cuts an error message to at most `max_chars` characters (not bytes), marking the cut
/// with a trailing `…` inside the limit.
pub fn truncate_error(message: &str, max_chars: usize) -> String {
    if message.chars().count() <= max_chars {
        return message.to_owned();
    }
    let mut out: String = message.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_base_and_stop_at_the_max() {
        let p = RetryPolicy::default();
        assert_eq!(p.nominal_delay(1), Duration::from_secs(1));
        assert_eq!(p.nominal_delay(2), Duration::from_secs(2));
        assert_eq!(p.nominal_delay(4), Duration::from_secs(8));
        assert_eq!(p.nominal_delay(20), Duration::from_secs(300));
        assert_eq!(p.nominal_delay(i32::MAX), Duration::from_secs(300));
        assert_eq!(p.delay(2, 0.0), Duration::from_secs(2));
        assert_eq!(p.delay(2, 0.999_999).as_millis(), 1000);
    }

    #[test]
    fn permanent_errors_and_used_up_attempts_are_not_retried() {
        let p = RetryPolicy::default();
        assert_eq!(decide_failure(&p, 1, 3, true, None, 0.0), FailureDecision::GiveUp);
        assert_eq!(decide_failure(&p, 3, 3, false, None, 0.0), FailureDecision::GiveUp);
        assert_eq!(
            decide_failure(&p, 2, 3, false, None, 0.0),
            FailureDecision::RetryAfter(Duration::from_secs(2))
        );
        assert_eq!(
            decide_failure(&p, 1, 3, false, Some(Duration::from_secs(7)), 0.5),
            FailureDecision::RetryAfter(Duration::from_secs(7))
        );
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate_error("short", 10), "short");
        let long = "é".repeat(2000);
        let cut = truncate_error(&long, 1000);
        assert_eq!(cut.chars().count(), 1000);
        assert!(cut.ends_with('…'));
    }
}
