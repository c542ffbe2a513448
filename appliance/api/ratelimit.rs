//! Per-token token-bucket rate limiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_sec == 0` disables limiting.
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_sec: per_sec as f64,
            burst: burst.max(per_sec).max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request's worth from `key`'s bucket.
    pub fn allow(&self, key: &str) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = match buckets.get_mut(key) {
            Some(b) => b,
            None => buckets.entry(key.to_string()).or_insert((self.burst, now)),
        };
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_sec).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse() {
        let rl = RateLimiter::new(1, 3);
        assert!((0..3).all(|_| rl.allow("a")));
        assert!(!rl.allow("a"));
        assert!(rl.allow("b"), "buckets are per token");
        assert!((0..1000).all(|_| RateLimiter::new(0, 0).allow("x")));
    }
}
