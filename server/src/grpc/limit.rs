//! Per-node rate limit of lease writes: one misbehaving certificate in a loop must not
//! cost every other node revisions, fsyncs and broadcasts. A token bucket per node,
//! checked before a request reaches the lease writer.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::Status;

/// Lease writes a node may make per second, sustained. An agent makes one at start
/// and then one per renewal (hours apart by default); restarts and device repairs add
/// a few.
pub const NODE_WRITES_PER_SECOND: f64 = 2.0;
/// Lease writes a node may make in a burst.
pub const NODE_WRITE_BURST: f64 = 10.0;
/// Buckets unused this long are forgotten: they have refilled (a full bucket is what a
/// new node gets anyway).
const IDLE: Duration = Duration::from_secs(600);
/// Keys tracked at most: past it, buckets that have refilled are forgotten at once,
/// and a new key finds no room (refused) until some have.
pub const MAX_KEYS: usize = 100_000;

/// Token buckets by node name.
pub struct NodeLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_node: HashMap<String, Bucket>,
    pruned: Instant,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Default for NodeLimiter {
    fn default() -> Self {
        Self::new(NODE_WRITES_PER_SECOND, NODE_WRITE_BURST)
    }
}

impl NodeLimiter {
    /// `rate` writes per second per node, `burst` at once.
    pub fn new(rate: f64, burst: f64) -> Self {
        NodeLimiter {
            rate,
            burst,
            buckets: Mutex::new(Buckets {
                by_node: HashMap::new(),
                pruned: Instant::now(),
            }),
        }
    }

    /// Whether `key` has a token left, without taking it.
    pub fn allows(&self, key: &str) -> bool {
        let now = Instant::now();
        let buckets = self.buckets.lock();
        buckets
            .by_node
            .get(key)
            .is_none_or(|b| b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate >= 1.0)
    }

    /// Gives back a token taken by `check` for work that turned out not to count (a
    /// bootstrap that succeeded).
    pub fn refund(&self, key: &str) {
        let mut buckets = self.buckets.lock();
        if let Some(b) = buckets.by_node.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(self.burst);
        }
    }

    /// Takes one write for `node`, or says when to retry (RESOURCE_EXHAUSTED).
    pub fn check(&self, node: &str) -> Result<(), Status> {
        self.check_at(node, Instant::now())
    }

    /// `check` at time `now` (tests give the time, so a slow machine cannot refill a
    /// bucket between two calls).
    fn check_at(&self, node: &str, now: Instant) -> Result<(), Status> {
        let mut buckets = self.buckets.lock();
        // A walk over every node's bucket, at most once per idle period: per request it
        // would cost a 5,000-node join storm 25 million visits under this lock.
        if now.duration_since(buckets.pruned) >= IDLE {
            buckets.pruned = now;
            buckets
                .by_node
                .retain(|_, b| now.duration_since(b.at) < IDLE);
        }
        if buckets.by_node.len() >= MAX_KEYS && !buckets.by_node.contains_key(node) {
            let (rate, burst) = (self.rate, self.burst);
            buckets
                .by_node
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if buckets.by_node.len() >= MAX_KEYS {
                return Err(Status::resource_exhausted(format!(
                    "{MAX_KEYS} callers are being rate-limited at once; retry later"
                )));
            }
        }
        let b = match buckets.by_node.get_mut(node) {
            Some(b) => b,
            None => buckets.by_node.entry(node.to_string()).or_insert(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - b.tokens) / self.rate);
        Err(Status::resource_exhausted(format!(
            "node {node} is changing its lease faster than {} times a second (bursts of {}); \
             retry in {} ms",
            self.rate,
            self.burst,
            wait.as_millis().max(1)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_node() {
        let l = NodeLimiter::new(1000.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check_at("a", t0).unwrap();
        }
        let e = l.check_at("a", t0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("node a") && e.message().contains("retry in"),
            "{}",
            e.message()
        );
        l.check_at("b", t0).expect("other nodes are not affected");
        l.check_at("a", t0 + Duration::from_millis(5))
            .expect("refilled at the rate");
    }

    #[test]
    fn a_refund_gives_one_token_back_and_never_more_than_the_burst() {
        let l = NodeLimiter::new(0.001, 2.0);
        let t0 = Instant::now();
        l.check_at("a", t0).unwrap();
        l.check_at("a", t0).unwrap();
        assert!(l.check_at("a", t0).is_err());
        l.refund("a");
        l.check_at("a", t0).expect("refunded");
        l.refund("a");
        l.refund("a");
        l.refund("a");
        l.check_at("a", t0).unwrap();
        l.check_at("a", t0).unwrap();
        assert!(l.check_at("a", t0).is_err(), "never more than the burst");
    }

    #[test]
    fn the_map_of_keys_is_capped() {
        let l = NodeLimiter::new(0.000_001, 1.0);
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            l.check_at(&i.to_string(), t0).unwrap();
        }
        let e = l.check_at("one-more", t0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }
}
