//! When to try a failed delivery again: DESIGN.md section 15's full jitter, and a receiver's
//! own `Retry-After`.

use std::time::{Duration, SystemTime};

/// The longest `Retry-After` honoured: a receiver cannot park a delivery for longer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3_600);

/// The cap of the delay before attempt `attempts + 1`, after `attempts` (≥ 1) failed ones:
/// `min(max, base · 2^(attempts − 1))`.
pub fn backoff_cap(attempts: u32, base: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(63);
    base.checked_mul(1u32.checked_shl(doublings).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max)
}

/// A full-jitter draw: uniform in `[0, backoff_cap)` (zero when the cap is zero).
pub fn retry_delay(attempts: u32, base: Duration, max: Duration) -> Duration {
    let cap = backoff_cap(attempts, base, max);
    if cap.is_zero() {
        return cap;
    }
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::random_range(0..nanos))
}

/// Reads a `Retry-After` value: delay-seconds or an HTTP date (a date in the past is zero).
/// `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(3_600);

    #[test]
    fn the_cap_doubles_from_the_base_up_to_the_max() {
        let caps: Vec<u64> = (1..=12).map(|n| backoff_cap(n, BASE, MAX).as_secs()).collect();
        assert_eq!(caps, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]);
        assert_eq!(backoff_cap(200, BASE, MAX), MAX);
        assert_eq!(backoff_cap(0, BASE, MAX), BASE);
        assert_eq!(backoff_cap(u32::MAX, Duration::from_secs(u64::MAX / 2), MAX), MAX);
    }

    #[test]
    fn the_default_schedule_totals_about_two_and_a_half_hours_at_most() {
        // Twelve attempts: eleven delays between them.
        let total: Duration = (1..12).map(|n| backoff_cap(n, BASE, MAX)).sum();
        assert_eq!(total, Duration::from_secs(8_715));
    }

    #[test]
    fn draws_stay_below_the_cap() {
        for attempts in 1..=14 {
            let cap = backoff_cap(attempts, BASE, MAX);
            for _ in 0..200 {
                assert!(retry_delay(attempts, BASE, MAX) < cap);
            }
        }
        assert_eq!(retry_delay(3, Duration::ZERO, MAX), Duration::ZERO);
    }

    #[test]
    fn draws_spread_over_the_range() {
        // Full jitter, not a fixed delay: 400 draws below 80 s land on both halves.
        let draws: Vec<Duration> = (0..400).map(|_| retry_delay(5, BASE, MAX)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(40)));
        assert!(draws.iter().any(|d| *d >= Duration::from_secs(40)));
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 06:00:00 GMT").expect("a date");
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 06:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 05:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        for bad in ["", "-5", "soon", "1.5", "Sunday"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }
}
