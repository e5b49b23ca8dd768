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

/// The most networks a run can join: the default one and one per block of
/// [`EXTRA_NETWORK_BLOCKS`].
pub const MAX_NETWORKS: usize = 1 + EXTRA_NETWORK_BLOCKS.len();

/// The pod networks of the extra networks (`--networks` > 1), the k-th extra network
/// (network index k) on the k-th: each a /12 cut into /26s, 16,383 node subnets (the
/// first one is left out, as flannel's SubnetMin does). They stay clear of the default
/// network's 10.0.0.0/8 ([`crate::servers::NET_CONF`]) and of the simulated nodes'
/// public addresses (198.18.0.0/15): RFC 6598's 100.64.0.0/10 in four /12s, then
/// 172.16.0.0/12. (A /24 per node, as the default network has, would need a /10 per
/// network to hold 5,000 nodes, and only 100.64.0.0/10 is that large outside 10/8.)
pub const EXTRA_NETWORK_BLOCKS: [&str; 5] = [
    "100.64.0.0/12",
    "100.80.0.0/12",
    "100.96.0.0/12",
    "100.112.0.0/12",
    "172.16.0.0/12",
];

/// The node subnet length of the extra networks.
pub const EXTRA_SUBNET_LEN: u8 = 26;

/// The name of network `k` of a run: `default` for 0, else `net<k+1>` (its VNI is
/// k+1 too: `net2` is on VNI 2).
pub fn network_name(k: usize) -> String {
    if k == 0 {
        "default".into()
    } else {
        format!("net{}", k + 1)
    }
}

/// Network `k`'s name as the wire spells it (`Lease.network`, `AcquireRequest.network`):
/// empty for the default network.
pub fn network_wire(k: usize) -> String {
    if k == 0 {
        String::new()
    } else {
        network_name(k)
    }
}

/// The index of a network named by [`network_name`] or [`network_wire`] (`None`:
/// another network).
pub fn network_index(name: &[u8]) -> Option<usize> {
    match name {
        b"" | b"default" => Some(0),
        [b'n', b'e', b't', rest @ ..] => std::str::from_utf8(rest)
            .ok()
            .filter(|d| !d.starts_with('0') && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|&v| v >= 2)
            .map(|v| v - 1),
        _ => None,
    }
}

/// The net-conf.json of extra network `k` (1 ≤ k < [`MAX_NETWORKS`]): VXLAN on VNI k+1.
pub fn network_conf(k: usize) -> String {
    assert!((1..MAX_NETWORKS).contains(&k), "no extra network {k}");
    format!(
        r#"{{"Network": "{}", "SubnetLen": {EXTRA_SUBNET_LEN}, "Backend": {{"Type": "vxlan", "VNI": {}}}}}"#,
        EXTRA_NETWORK_BLOCKS[k - 1],
        k + 1
    )
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
    // Every node reads every node's name: digits are read by hand, without the UTF-8
    // check and the general integer parser (a tenth of the load generator's CPU).
    let num = |b: &[u8]| {
        if b.is_empty() || b.len() > 18 {
            return None;
        }
        b.iter().try_fold(0usize, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + usize::from(c - b'0'))
        })
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
    vtep_mac_in(i, joiner, 0)
}

/// The VTEP MAC of simulated node `i`'s device on network `k` (`flannel.<k+1>`): each
/// network has a device, and a MAC, of its own.
pub fn vtep_mac_in(i: usize, joiner: bool, k: usize) -> String {
    format!(
        "0a:{}:{:02x}:{:02x}:{:02x}:{:02x}",
        if joiner { "59" } else { "58" },
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff,
        (k + 1) & 0xff
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
    /// Networks each node joins (one lease in each): storm lease `(k, i)` of network
    /// `k` and node `i` has the index [`Tracker::lease`].
    pub networks: usize,
    /// Per watcher: storm leases it currently knows (of every network).
    pub seen: Vec<AtomicU32>,
    /// Per watcher: when it first knew all `n × networks` (ns after `base`; 0: not
    /// yet).
    pub converged_at: Vec<AtomicU64>,
    /// Watchers that knew all `n × networks` at some point.
    pub converged: AtomicUsize,
    /// Per storm lease ([`Tracker::lease`]): when it was granted (ns after `base`; 0:
    /// not yet).
    pub granted_at: Vec<AtomicU64>,
    /// Failed grant attempts (each retried after 1 s).
    pub grant_errors: AtomicU64,
    /// Fan-out: (round, network, delivery time) from every watcher.
    pub fanout_tx: mpsc::UnboundedSender<(u32, u32, Instant)>,
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
    pub fanout: mpsc::UnboundedReceiver<(u32, u32, Instant)>,
    /// Resumed watches.
    pub resumed: mpsc::UnboundedReceiver<Instant>,
}

impl Tracker {
    /// A tracker for `n` storm nodes on one network.
    pub fn new(n: usize) -> (Tracker, TrackerRx) {
        Tracker::on_networks(n, 1)
    }

    /// A tracker for `n` storm nodes, each joining `networks` networks.
    pub fn on_networks(n: usize, networks: usize) -> (Tracker, TrackerRx) {
        let networks = networks.max(1);
        let (fanout_tx, fanout) = mpsc::unbounded_channel();
        let (resumed_tx, resumed) = mpsc::unbounded_channel();
        let zeros = |k: usize| (0..k).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        (
            Tracker {
                base: Instant::now(),
                n,
                networks,
                seen: (0..n).map(|_| AtomicU32::new(0)).collect(),
                converged_at: zeros(n),
                converged: AtomicUsize::new(0),
                granted_at: zeros(n * networks),
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

    /// The index of storm lease (network `k`, node `i`) in [`Tracker::granted_at`] and
    /// in a watcher's [`Seen`]: `k × n + i` (with one network, `i`).
    pub fn lease(&self, k: usize, i: usize) -> usize {
        k * self.n + i
    }

    /// Storm leases: `n × networks`.
    pub fn leases(&self) -> usize {
        self.n * self.networks
    }

    /// Nanoseconds after `base` (at least 1, so 0 can mean "not yet").
    pub fn ns(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.base).as_nanos() as u64).max(1)
    }

    /// A watcher's count changed.
    pub fn update_seen(&self, watcher: usize, seen: usize, now: Instant) {
        self.seen[watcher].store(seen as u32, Ordering::Relaxed);
        if seen >= self.leases() && self.converged_at[watcher].load(Ordering::Relaxed) == 0 {
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
        let granted_at: Vec<u64> = self
            .granted_at
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let granted: Vec<u64> = granted_at.iter().copied().filter(|&g| g != 0).collect();
        // A node is granted once it holds its lease in every network.
        let nodes_granted = (0..self.n)
            .filter(|&i| (0..self.networks).all(|k| granted_at[self.lease(k, i)] != 0))
            .count();
        let converged = conv.iter().filter(|&&c| c != 0).count();
        let seen_total: u64 = self
            .seen
            .iter()
            .map(|s| u64::from(s.load(Ordering::Relaxed)))
            .sum();
        let all = converged == self.n;
        StormOutcome {
            nodes: self.n,
            networks: self.networks,
            leases_granted: granted.len(),
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
            nodes_granted,
            nodes_converged: converged,
            deliveries_fraction: seen_total as f64 / (self.n as f64 * self.leases() as f64),
            grant_ms: Dist::of(granted.iter().map(|&g| ms(g)).collect()),
            grant_errors: self.grant_errors.load(Ordering::Relaxed),
        }
    }
}

/// One: the number of networks of results from before there could be several.
pub fn one() -> usize {
    1
}

/// Whether a network count is 1 (left out of the JSON, which stays as it was).
pub fn is_one(n: &usize) -> bool {
    *n == 1
}

/// Whether a count is 0 (left out of the JSON).
fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The result of a join storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormOutcome {
    /// Nodes.
    pub nodes: usize,
    /// Networks each node joined (a lease in each): N × networks leases.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub networks: usize,
    /// Leases granted (with one network: `nodes_granted`, and left out).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leases_granted: usize,
    /// Every node saw every lease before the deadline.
    pub converged: bool,
    /// Seconds from the start until the last node had seen all N × networks leases
    /// (NaN if not).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub converge_s: f64,
    /// The deadline.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deadline_s: f64,
    /// Nodes whose lease was granted (in every network).
    pub nodes_granted: usize,
    /// Nodes that had seen all N × networks leases.
    pub nodes_converged: usize,
    /// Leases known over all nodes / (N² × networks).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deliveries_fraction: f64,
    /// Time from the start until each grant (each node's, in each network), ms.
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
        if (done >= t.n && granted >= t.leases()) || start.elapsed() >= deadline {
            return;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "  {label}: {:.0}s: {granted}/{}{} granted, {done}/{} converged",
                start.elapsed().as_secs_f64(),
                t.leases(),
                if t.networks == 1 { "" } else { " leases" },
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
    /// Networks each joiner joined (a lease in each; the delays are per lease).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub networks: usize,
    /// Deliveries expected (rounds × networks × watchers).
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

/// Collects the deliveries of fan-out round `round` (one network) until all
/// `watchers` have it or `limit` passes; returns the delivery times.
pub async fn collect_round(
    rx: &mut mpsc::UnboundedReceiver<(u32, u32, Instant)>,
    round: u32,
    watchers: usize,
    limit: Duration,
) -> Vec<Instant> {
    collect_round_in(rx, round, 1, watchers, limit)
        .await
        .swap_remove(0)
}

/// Collects the deliveries of fan-out round `round`, whose joiner joined `networks`
/// networks, until all `watchers` have each of its leases or `limit` passes; returns
/// the delivery times per network.
pub async fn collect_round_in(
    rx: &mut mpsc::UnboundedReceiver<(u32, u32, Instant)>,
    round: u32,
    networks: usize,
    watchers: usize,
    limit: Duration,
) -> Vec<Vec<Instant>> {
    let mut got: Vec<Vec<Instant>> = (0..networks.max(1))
        .map(|_| Vec::with_capacity(watchers))
        .collect();
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + limit;
    while count < watchers * got.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((r, k, t))) if r == round => {
                if let Some(g) = got.get_mut(k as usize) {
                    g.push(t);
                    count += 1;
                }
            }
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
        networks: 1,
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
    fn node_names_come_back_to_their_node() {
        for i in [0, 7, 4999, 123_456] {
            assert_eq!(who(node_name(i).as_bytes()), Who::Node(i));
            assert_eq!(who(joiner_name(i).as_bytes()), Who::Joiner(i as u32));
        }
        for other in [
            "n",
            "j",
            "n1x",
            "nx1",
            "n-1",
            "n+1",
            "other",
            "",
            "n12345678901234567890",
        ] {
            assert_eq!(who(other.as_bytes()), Who::Other, "{other}");
        }
    }

    #[test]
    fn network_names_come_back_to_their_index() {
        for k in 0..MAX_NETWORKS {
            assert_eq!(network_index(network_name(k).as_bytes()), Some(k));
            assert_eq!(network_index(network_wire(k).as_bytes()), Some(k));
        }
        assert_eq!(
            network_wire(0),
            "",
            "the default network's wire name is empty"
        );
        assert_eq!(
            (network_name(1).as_str(), network_wire(1).as_str()),
            ("net2", "net2")
        );
        for other in ["net1", "net02", "net", "blue", "net2x"] {
            assert_eq!(network_index(other.as_bytes()), None, "{other}");
        }
        assert!(network_conf(1).contains(r#""VNI": 2"#));
    }

    #[test]
    fn a_node_converges_once_it_saw_every_lease_of_every_network() {
        let (t, _rx) = Tracker::on_networks(3, 2);
        assert_eq!((t.leases(), t.lease(1, 2), t.granted_at.len()), (6, 5, 6));
        let now = Instant::now();
        t.update_seen(0, 3, now);
        assert_eq!(
            t.converged.load(Ordering::Relaxed),
            0,
            "one network is not all"
        );
        t.update_seen(0, 6, now);
        assert_eq!(t.converged.load(Ordering::Relaxed), 1);
        // Node 0 holds both leases, node 1 only its default one.
        for lease in [t.lease(0, 0), t.lease(1, 0), t.lease(0, 1)] {
            t.granted_at[lease].store(1_000_000, Ordering::Relaxed);
        }
        let o = t.storm_outcome(Duration::from_secs(1));
        assert_eq!((o.networks, o.leases_granted, o.nodes_granted), (2, 3, 1));
        assert_eq!(o.grant_ms.count, 3);
        assert!(!o.converged);
        assert!((o.deliveries_fraction - 6.0 / 18.0).abs() < 1e-9);
        // One network: the JSON is as it was.
        let (one, _rx) = Tracker::new(2);
        let json = serde_json::to_string(&one.storm_outcome(Duration::from_secs(1))).unwrap();
        assert!(
            !json.contains("networks") && !json.contains("leases_granted"),
            "{json}"
        );
    }

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
