//! Per-token token-bucket rate limiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub struct RateLimiter {
    /// False when `per_sec == 0`: the common "off" case takes no lock.
    enabled: AtomicBool,
    inner: Mutex<Buckets>,
}

struct Buckets {
    per_sec: f64,
    burst: f64,
    by_key: HashMap<String, (f64, Instant)>,
}

impl Buckets {
    fn new(per_sec: u32, burst: u32) -> Buckets {
        Buckets { per_sec: per_sec as f64, burst: burst.max(per_sec).max(1) as f64, by_key: HashMap::new() }
    }
}

impl RateLimiter {
    /// `per_sec == 0` disables limiting.
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter { enabled: AtomicBool::new(per_sec > 0), inner: Mutex::new(Buckets::new(per_sec, burst)) }
    }

    /// New limits (configuration reload); every bucket starts full again.
    pub fn set_limits(&self, per_sec: u32, burst: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *inner = Buckets::new(per_sec, burst);
        self.enabled.store(per_sec > 0, Ordering::Release);
    }

    /// Takes one request's worth from `key`'s bucket.
    pub fn allow(&self, key: &str) -> bool {
        if !self.enabled.load(Ordering::Acquire) {
            return true;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Buckets { per_sec, burst, by_key } = &mut *inner;
        if *per_sec == 0.0 {
            return true;
        }
        let (tokens, last) = match by_key.get_mut(key) {
            Some(b) => b,
            None => by_key.entry(key.to_string()).or_insert((*burst, now)),
        };
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * *per_sec).min(*burst);
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

    #[test]
    fn limits_change_at_runtime() {
        let rl = RateLimiter::new(0, 0);
        assert!((0..100).all(|_| rl.allow("a")));
        rl.set_limits(1, 2);
        assert!(rl.allow("a") && rl.allow("a"));
        assert!(!rl.allow("a"));
        rl.set_limits(0, 0);
        assert!((0..100).all(|_| rl.allow("a")));
    }
}
