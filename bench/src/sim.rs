//! What the simulated nodes of both systems share: names, addresses, and the tracker
//! every watcher reports into.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::stats::{Dist, Histogram};

/// Name of storm node `i` (its index is recoverable from the name).
pub fn node_name(i: usize) -> String {
    format!("n{i:05}")
}

/// Name of fan-out joiner `r`.
pub fn joiner_name(r: usize) -> String {
    format!("j{r:03}")
}

/// Who a lease belongs to, from its node name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Storm node `i`.
    Node(usize),
    /// Fan-out joiner of round `r`.
    Joiner(u32),
    /// Someone else.
    Other,
}

/// Parses a node name made by [`node_name`] or [`joiner_name`].
pub fn who(name: &[u8]) -> Who {
    let num = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
    };
    match name.first() {
        Some(b'n') => num(&name[1..]).map_or(Who::Other, Who::Node),
        Some(b'j') => num(&name[1..]).map_or(Who::Other, |r| Who::Joiner(r as u32)),
        _ => Who::Other,
    }
}

/// The public (underlay) address of a simulated node: 198.18.0.0/15 is the range set
/// aside for benchmarks; it is only data here, nothing is sent to it.
pub fn public_ip(i: usize) -> String {
    format!("198.18.{}.{}", (i / 256) % 256, i % 256)
}

/// A VTEP MAC for simulated node `i` (`joiner` ones differ).
pub fn vtep_mac(i: usize, joiner: bool) -> String {
    format!(
        "0a:{}:{:02x}:{:02x}:{:02x}:01",
        if joiner { "59" } else { "58" },
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

/// A set of storm node indices with a count.
pub struct Seen {
    bits: Vec<u64>,
    count: usize,
}

impl Seen {
    /// Room for `n` nodes.
    pub fn new(n: usize) -> Seen {
        Seen {
            bits: vec![0; n.div_ceil(64).max(1)],
            count: 0,
        }
    }
    /// Marks node `i` present.
    pub fn insert(&mut self, i: usize) {
        if let Some(w) = self.bits.get_mut(i / 64) {
            let m = 1u64 << (i % 64);
            if *w & m == 0 {
                *w |= m;
                self.count += 1;
            }
        }
    }
    /// Marks node `i` absent.
    pub fn remove(&mut self, i: usize) {
        if let Some(w) = self.bits.get_mut(i / 64) {
            let m = 1u64 << (i % 64);
            if *w & m != 0 {
                *w &= !m;
                self.count -= 1;
            }
        }
    }
    /// Forgets everything (a reset).
    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }
    /// Nodes present.
    pub fn len(&self) -> usize {
        self.count
    }
}

/// Shared by the driver and every watcher of one run.
pub struct Tracker {
    /// Time zero of the run.
    pub base: Instant,
    /// Storm nodes.
    pub n: usize,
    /// Per watcher: storm leases it currently knows.
    pub seen: Vec<AtomicU32>,
    /// Per watcher: when it first knew all `n` (ns after `base`; 0: not yet).
    pub converged_at: Vec<AtomicU64>,
    /// Watchers that knew all `n` at some point.
    pub converged: AtomicUsize,
    /// Per storm node: when its lease was granted (ns after `base`; 0: not yet).
    pub granted_at: Vec<AtomicU64>,
    /// Failed grant attempts (each retried after 1 s).
    pub grant_errors: AtomicU64,
    /// Fan-out: (round, delivery time) from every watcher.
    pub fanout_tx: mpsc::UnboundedSender<(u32, Instant)>,
    /// Churn in progress: watchers time deliveries of storm-node events.
    pub churn_on: AtomicBool,
    /// Per storm node: when its last Release was sent (ns after `base`).
    pub release_sent: Vec<AtomicU64>,
    /// Per storm node: when its last Acquire (re-join) was sent (ns after `base`).
    pub acquire_sent: Vec<AtomicU64>,
    /// Churn delivery delays.
    pub churn_hist: Histogram,
    /// Reconnect: watchers whose watch broke and was resumed.
    pub resumed_tx: mpsc::UnboundedSender<Instant>,
    /// Watch responses that were full resets after the first one.
    pub resets: AtomicU64,
    /// Watch streams that broke.
    pub breaks: AtomicU64,
    /// Set at the end: watchers stop retrying.
    pub stopping: AtomicBool,
}

/// Receivers of a [`Tracker`]'s channels.
pub struct TrackerRx {
    /// Fan-out deliveries.
    pub fanout: mpsc::UnboundedReceiver<(u32, Instant)>,
    /// Resumed watches.
    pub resumed: mpsc::UnboundedReceiver<Instant>,
}

impl Tracker {
    /// A tracker for `n` storm nodes.
    pub fn new(n: usize) -> (Tracker, TrackerRx) {
        let (fanout_tx, fanout) = mpsc::unbounded_channel();
        let (resumed_tx, resumed) = mpsc::unbounded_channel();
        let zeros = |k: usize| (0..k).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        (
            Tracker {
                base: Instant::now(),
                n,
                seen: (0..n).map(|_| AtomicU32::new(0)).collect(),
                converged_at: zeros(n),
                converged: AtomicUsize::new(0),
                granted_at: zeros(n),
                grant_errors: AtomicU64::new(0),
                fanout_tx,
                churn_on: AtomicBool::new(false),
                release_sent: zeros(n),
                acquire_sent: zeros(n),
                churn_hist: Histogram::default(),
                resumed_tx,
                resets: AtomicU64::new(0),
                breaks: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
            },
            TrackerRx { fanout, resumed },
        )
    }

    /// Runs `attempt` until it succeeds, counting each failure in `errors` and waiting
    /// a second before the next try (as flanneld and the agents do), or until the run
    /// is stopping (`None`).
    pub async fn retry<T, E, Fut>(
        &self,
        errors: &AtomicU64,
        mut attempt: impl FnMut() -> Fut,
    ) -> Option<T>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        loop {
            match attempt().await {
                Ok(v) => return Some(v),
                Err(_) if !self.stopping.load(Ordering::Relaxed) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// Nanoseconds after `base` (at least 1, so 0 can mean "not yet").
    pub fn ns(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.base).as_nanos() as u64).max(1)
    }

    /// A watcher's count changed.
    pub fn update_seen(&self, watcher: usize, seen: usize, now: Instant) {
        self.seen[watcher].store(seen as u32, Ordering::Relaxed);
        if seen >= self.n && self.converged_at[watcher].load(Ordering::Relaxed) == 0 {
            self.converged_at[watcher].store(self.ns(now), Ordering::Relaxed);
            self.converged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A watcher received an event for storm node `i` (PUT unless `delete`).
    pub fn storm_event(&self, i: usize, delete: bool, now: Instant) {
        if !self.churn_on.load(Ordering::Relaxed) || i >= self.n {
            return;
        }
        let sent = if delete {
            &self.release_sent[i]
        } else {
            &self.acquire_sent[i]
        };
        let sent = sent.load(Ordering::Relaxed);
        if sent != 0 {
            let delay_ns = self.ns(now).saturating_sub(sent);
            self.churn_hist.record_us(delay_ns / 1000);
        }
    }

    /// Storm progress.
    pub fn storm_outcome(&self, deadline: Duration) -> StormOutcome {
        let ms = |ns: u64| ns as f64 / 1e6;
        let conv: Vec<u64> = self
            .converged_at
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let granted: Vec<u64> = self
            .granted_at
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&g| g != 0)
            .collect();
        let converged = conv.iter().filter(|&&c| c != 0).count();
        let seen_total: u64 = self
            .seen
            .iter()
            .map(|s| u64::from(s.load(Ordering::Relaxed)))
            .sum();
        let all = converged == self.n;
        StormOutcome {
            nodes: self.n,
            converged: all,
            converge_s: if all {
                conv.iter()
                    .copied()
                    .max()
                    .map_or(f64::NAN, |c| c as f64 / 1e9)
            } else {
                f64::NAN
            },
            deadline_s: deadline.as_secs_f64(),
            nodes_granted: granted.len(),
            nodes_converged: converged,
            deliveries_fraction: seen_total as f64 / (self.n as f64 * self.n as f64),
            grant_ms: Dist::of(granted.iter().map(|&g| ms(g)).collect()),
            grant_errors: self.grant_errors.load(Ordering::Relaxed),
        }
    }
}

/// The result of a join storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormOutcome {
    /// Nodes.
    pub nodes: usize,
    /// Every node saw every lease before the deadline.
    pub converged: bool,
    /// Seconds from the start until the last node had seen all N leases (NaN if not).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub converge_s: f64,
    /// The deadline.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deadline_s: f64,
    /// Nodes whose lease was granted.
    pub nodes_granted: usize,
    /// Nodes that had seen all N leases.
    pub nodes_converged: usize,
    /// Leases known over all nodes / N².
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deliveries_fraction: f64,
    /// Time from the start until each node's grant, ms.
    pub grant_ms: Dist,
    /// Failed grant attempts (retried every second, as flanneld does).
    pub grant_errors: u64,
}

/// Waits until every watcher converged and every node has its reply, or the deadline
/// passed; prints progress.
pub async fn wait_converged(t: &Tracker, start: Instant, deadline: Duration, label: &str) {
    let mut last_print = Instant::now();
    loop {
        let done = t.converged.load(Ordering::Relaxed);
        // Both: a node's reply can arrive after every watcher has seen its lease (the
        // controller publishes, then answers), and the grant latencies need every reply.
        let granted = t
            .granted_at
            .iter()
            .filter(|g| g.load(Ordering::Relaxed) != 0)
            .count();
        if (done >= t.n && granted >= t.n) || start.elapsed() >= deadline {
            return;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "  {label}: {:.0}s: {granted}/{} granted, {done}/{} converged",
                start.elapsed().as_secs_f64(),
                t.n,
                t.n
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The result of a fan-out run: delay from the joiner's request being sent to the
/// lease's delivery at each watcher.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanoutOutcome {
    /// Watchers.
    pub watchers: usize,
    /// Joins.
    pub rounds: usize,
    /// Deliveries expected (rounds × watchers).
    pub expected: u64,
    /// The joiner's request sent (Twill: its Acquire; etcd: its LeaseGrant, the first
    /// of flannel's two calls) → the lease's arrival at each watcher, ms. Never
    /// negative. Results from before this figure have none (NaN).
    #[serde(default = "crate::stats::nan_dist")]
    pub from_send_ms: Dist,
    /// Request sent → the last watcher, per join, ms.
    #[serde(default = "crate::stats::nan_dist")]
    pub last_from_send_ms: Dist,
    /// The joiner's reply → the lease's arrival at each watcher, ms: the figure the
    /// tables showed before they started at the send (`delivery_ms` then). It may be
    /// negative: a watcher can hear of a lease before its holder has the reply.
    #[serde(alias = "delivery_ms")]
    pub from_reply_ms: Dist,
    /// Reply → the last watcher, per join, ms (`last_delivery_ms` before).
    #[serde(alias = "last_delivery_ms")]
    pub last_from_reply_ms: Dist,
    /// The joiner's request round trip (Twill: Acquire; etcd: LeaseGrant + Put), ms.
    pub grant_rtt_ms: Dist,
}

/// Collects the deliveries of fan-out round `round` until all `watchers` have it or
/// `limit` passes; returns the delivery times.
pub async fn collect_round(
    rx: &mut mpsc::UnboundedReceiver<(u32, Instant)>,
    round: u32,
    watchers: usize,
    limit: Duration,
) -> Vec<Instant> {
    let mut got = Vec::with_capacity(watchers);
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < watchers {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((r, t))) if r == round => got.push(t),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    got
}

/// Turns the rounds of a fan-out, each (request sent, reply received, deliveries),
/// into its outcome.
pub fn fanout_outcome(
    watchers: usize,
    rounds: &[(Instant, Instant, Vec<Instant>)],
) -> FanoutOutcome {
    let ms = |a: Instant, b: Instant| -> f64 {
        if b >= a {
            b.duration_since(a).as_secs_f64() * 1e3
        } else {
            -(a.duration_since(b).as_secs_f64() * 1e3)
        }
    };
    let (mut from_send, mut from_reply) = (Vec::new(), Vec::new());
    let (mut last_send, mut last_reply) = (Vec::new(), Vec::new());
    let mut rtt = Vec::new();
    for (sent, granted, deliveries) in rounds {
        rtt.push(ms(*sent, *granted));
        from_send.extend(deliveries.iter().map(|d| ms(*sent, *d)));
        from_reply.extend(deliveries.iter().map(|d| ms(*granted, *d)));
        if deliveries.len() == watchers {
            if let Some(m) = deliveries.iter().max() {
                last_send.push(ms(*sent, *m));
                last_reply.push(ms(*granted, *m));
            }
        }
    }
    FanoutOutcome {
        watchers,
        rounds: rounds.len(),
        expected: (rounds.len() * watchers) as u64,
        from_send_ms: Dist::of(from_send),
        last_from_send_ms: Dist::of(last_send),
        from_reply_ms: Dist::of(from_reply),
        last_from_reply_ms: Dist::of(last_reply),
        grant_rtt_ms: Dist::of(rtt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_starts_at_the_send() {
        let sent = Instant::now();
        let at = |ms: u64| sent + Duration::from_millis(ms);
        // The reply comes at 10 ms; one watcher hears at 4 ms (before the reply), the
        // other at 12 ms.
        let o = fanout_outcome(2, &[(sent, at(10), vec![at(4), at(12)])]);
        assert_eq!(o.expected, 2);
        assert_eq!((o.from_send_ms.p50, o.from_send_ms.max), (4.0, 12.0));
        assert!(o.from_send_ms.p50 >= 0.0);
        assert_eq!((o.from_reply_ms.p50, o.from_reply_ms.max), (-6.0, 2.0));
        assert_eq!(o.last_from_send_ms.max, 12.0);
        assert_eq!(o.grant_rtt_ms.p50, 10.0);
    }

    #[test]
    fn old_results_keep_their_reply_figure() {
        let old = r#"{"watchers":2,"rounds":1,"expected":2,
            "delivery_ms":{"count":2,"p50":-1.0,"p99":2.0,"max":2.0},
            "last_delivery_ms":{"count":1,"p50":2.0,"p99":2.0,"max":2.0},
            "grant_rtt_ms":{"count":1,"p50":3.0,"p99":3.0,"max":3.0}}"#;
        let o: FanoutOutcome = serde_json::from_str(old).expect("old fan-out JSON");
        assert_eq!(o.from_reply_ms.p50, -1.0);
        assert_eq!(o.from_send_ms.count, 0);
        assert!(o.from_send_ms.p99.is_nan());
    }
}
