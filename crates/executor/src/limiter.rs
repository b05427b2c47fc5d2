//! A token bucket: `rate` tokens a second, at most `burst` saved up. Time is tokio's, so a
//! paused test clock drives it.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// `rate` per second; `burst` at least 1.
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            updated: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
    }

    /// Takes up to `wanted` whole tokens; returns how many it took.
    pub(crate) fn take(&mut self, wanted: usize) -> usize {
        self.refill();
        let available = self.tokens.floor().max(0.0) as usize;
        let taken = available.min(wanted);
        self.tokens -= taken as f64;
        taken
    }

    /// Returns tokens taken but not used.
    pub(crate) fn give_back(&mut self, unused: usize) {
        self.tokens = (self.tokens + unused as f64).min(self.burst);
    }

    /// How long until one more token is there.
    pub(crate) fn wait_for_one(&mut self) -> Duration {
        self.refill();
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_within_its_burst() {
        let mut bucket = TokenBucket::new(10.0, 5);
        assert_eq!(bucket.take(100), 5, "the burst is there at once");
        assert_eq!(bucket.take(1), 0);
        assert_eq!(bucket.wait_for_one(), Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(bucket.take(100), 2);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(bucket.take(100), 5, "never more than the burst saved up");
        // Over ten seconds of constant demand: the burst plus the rate times the time.
        let mut taken = 0;
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(100)).await;
            taken += bucket.take(100);
        }
        assert_eq!(taken, 100);
    }
}
