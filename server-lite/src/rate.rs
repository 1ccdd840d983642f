//! Token-bucket rate limiting keyed by address or username, with a bounded key count.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A set of token buckets.
pub struct RateLimiter<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
    burst: f64,
    per_sec: f64,
    max_keys: usize,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `burst` attempts at once, refilled at `per_min` a minute; at most `max_keys` tracked.
    pub fn new(burst: u32, per_min: u32, max_keys: usize) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_min.max(1)) / 60.0,
            max_keys,
        }
    }

    /// Whether `key` has a token left, without taking it.
    pub fn allowed(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(b) => {
                let tokens = refill(b, now, self.burst, self.per_sec);
                if tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(Duration::from_secs_f64((1.0 - tokens) / self.per_sec))
                }
            }
            None => Ok(()),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(key) && map.len() >= self.max_keys {
            // Forget every bucket that has refilled: it carries no information.
            let (burst, per_sec) = (self.burst, self.per_sec);
            map.retain(|_, b| refill(b, now, burst, per_sec) < burst);
            if map.len() >= self.max_keys {
                return Err(Duration::from_secs(1));
            }
        }
        let b = map.entry(key.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        let tokens = refill(b, now, self.burst, self.per_sec);
        if tokens >= 1.0 {
            *b = Bucket { tokens: tokens - 1.0, at: now };
            Ok(())
        } else {
            *b = Bucket { tokens, at: now };
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_sec))
        }
    }
}

fn refill(b: &Bucket, now: Instant, burst: f64, per_sec: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * per_sec).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let r = RateLimiter::new(3, 60, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            r.check(&"a", t0).unwrap();
        }
        let wait = r.check(&"a", t0).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        r.check(&"b", t0).unwrap();
        assert!(r.allowed(&"a", t0).is_err());
        assert!(r.allowed(&"b", t0).is_ok(), "allowed() takes no token");
        assert!(r.allowed(&"b", t0).is_ok());
        r.check(&"a", t0 + Duration::from_secs(1)).unwrap();
        assert!(r.check(&"a", t0 + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn key_count_is_bounded() {
        let r = RateLimiter::new(1, 1, 2);
        let t0 = Instant::now();
        r.check(&1, t0).unwrap();
        r.check(&2, t0).unwrap();
        assert!(r.check(&3, t0).is_err(), "a third key is refused while both buckets are drained");
        r.check(&3, t0 + Duration::from_secs(120)).unwrap();
    }
}
