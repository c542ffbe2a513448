//! Token-bucket rate limiting: requests per token, and failed
//! authentications per client address.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How fast a client address earns new failed authentications after its
/// burst (`api.auth_failure_burst`) is spent: one every 10 s. Secrets are 256
/// bits, so this is not what protects them: it tells a client stuck with a
/// bad token to back off, and bounds what it costs.
pub const AUTH_FAILURES_PER_SEC: f64 = 0.1;
/// Buckets kept at most: full ones are forgotten first (a full bucket is
/// the same as none), so many client addresses cannot grow the map without
/// bound.
const MAX_KEYS: usize = 4096;

/// `wait` as a Retry-After value: whole seconds, at least 1.
pub fn retry_after(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

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
    fn new(per_sec: f64, burst: u32) -> Buckets {
        Buckets { per_sec, burst: (burst as f64).max(per_sec).max(1.0), by_key: HashMap::new() }
    }
}

impl RateLimiter {
    /// `per_sec == 0` disables limiting.
    pub fn new(per_sec: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            enabled: AtomicBool::new(per_sec > 0.0),
            inner: Mutex::new(Buckets::new(per_sec, burst)),
        }
    }

    /// New limits (configuration reload); every bucket starts full again.
    pub fn set_limits(&self, per_sec: u32, burst: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *inner = Buckets::new(per_sec as f64, burst);
        self.enabled.store(per_sec > 0, Ordering::Release);
    }

    /// Takes one request's worth from `key`'s bucket, or says how long
    /// until there is one.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        if !self.enabled.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Buckets { per_sec, burst, by_key } = &mut *inner;
        if *per_sec == 0.0 {
            return Ok(());
        }
        let (per_sec, burst) = (*per_sec, *burst);
        let refill = |(tokens, last): (f64, Instant)| {
            (tokens + now.duration_since(last).as_secs_f64() * per_sec).min(burst)
        };
        if !by_key.contains_key(key) {
            if by_key.len() >= MAX_KEYS {
                by_key.retain(|_, b| refill(*b) < burst);
            }
            // Still full of clients in debt: forget the one idle longest.
            if by_key.len() >= MAX_KEYS {
                let oldest = by_key.iter().min_by_key(|(_, (_, last))| *last).map(|(k, _)| k.clone());
                oldest.map(|k| by_key.remove(&k));
            }
        }
        let b = by_key.entry(key.to_string()).or_insert((burst, now));
        let tokens = refill(*b);
        if tokens < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - tokens) / per_sec));
        }
        *b = (tokens - 1.0, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse() {
        let rl = RateLimiter::new(1.0, 3);
        assert!((0..3).all(|_| rl.take("a").is_ok()));
        let wait = rl.take("a").unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(rl.take("b").is_ok(), "buckets are per key");
        assert!((0..1000).all(|_| RateLimiter::new(0.0, 0).take("x").is_ok()));
    }

    #[test]
    fn limits_change_at_runtime() {
        let rl = RateLimiter::new(0.0, 0);
        assert!((0..100).all(|_| rl.take("a").is_ok()));
        rl.set_limits(1, 2);
        assert!(rl.take("a").is_ok() && rl.take("a").is_ok());
        assert!(rl.take("a").is_err());
        rl.set_limits(0, 0);
        assert!((0..100).all(|_| rl.take("a").is_ok()));
    }

    #[test]
    fn auth_failures_burst_then_one_per_10s_and_the_map_stays_bounded() {
        let rl = RateLimiter::new(AUTH_FAILURES_PER_SEC, 10);
        assert!((0..10).all(|_| rl.take("a").is_ok()));
        let wait = rl.take("a").unwrap_err();
        assert!(wait > Duration::from_secs(9) && wait <= Duration::from_secs(10), "{wait:?}");
        for i in 0..3 * MAX_KEYS {
            rl.take(&format!("k{i}")).unwrap();
        }
        let n = rl.inner.lock().unwrap().by_key.len();
        assert!(n <= MAX_KEYS, "{n} buckets");
    }
}
