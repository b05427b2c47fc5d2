//! Per-caller request rate limits on `/v1`: a token bucket per caller (its bearer token, or
//! its address on an open server). A caller over its limit gets `429 rate_limited` with a
//! `Retry-After` header saying when a request will be accepted again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use sha2::{Digest, Sha256};

use crate::{ApiError, ApiState};

/// How many callers are remembered before the table is cleared (an idle bucket is full, so
/// forgetting it changes nothing but memory).
const MAX_CALLERS: usize = 100_000;

/// `requests_per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Limiter {
    buckets: Mutex<HashMap<[u8; 32], (f64, Instant)>>,
}

impl Limiter {
    /// Takes one token from the caller's bucket, or says how long until one is there.
    fn check(&self, caller: [u8; 32], limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(&caller) {
            buckets.clear();
        }
        let burst = f64::from(limit.burst.max(1));
        let (tokens, updated) = buckets.entry(caller).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*updated).as_secs_f64() * limit.requests_per_second).min(burst);
        *updated = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / limit.requests_per_second))
        }
    }
}

/// The middleware; a no-op unless `ApiConfig::rate_limit` is set.
pub async fn limit_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, actix_web::Error> {
    let state = req.app_data::<web::Data<ApiState>>().cloned();
    if let Some(state) = state
        && let Some(limit) = state.config.rate_limit
        && req.path().starts_with("/v1/")
    {
        let key = match req.headers().get(actix_web::http::header::AUTHORIZATION) {
            Some(token) => Sha256::digest(token.as_bytes()).into(),
            None => Sha256::digest(req.connection_info().peer_addr().unwrap_or("").as_bytes()).into(),
        };
        if let Err(retry_after) = state.limiter.check(key, limit, Instant::now()) {
            let error = ApiError::RateLimited { retry_after };
            return Ok(req.error_response(error).map_into_right_body());
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_burst_then_the_rate() {
        let limiter = Limiter::default();
        let limit = RateLimit {
            requests_per_second: 10.0,
            burst: 3,
        };
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check([1; 32], limit, start), Ok(()));
        }
        let wait = limiter.check([1; 32], limit, start).expect_err("over the burst");
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(
            limiter.check([2; 32], limit, start),
            Ok(()),
            "callers have their own buckets"
        );
        assert_eq!(
            limiter.check([1; 32], limit, start + Duration::from_millis(100)),
            Ok(())
        );
    }
}
