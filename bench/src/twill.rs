//! Simulated Twill agents: one mTLS gRPC connection per node to the real controller,
//! no netlink. Each node watches the lease table and acquires its lease, as
//! twill-agent does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use twill_agent::client::Backoff;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{AcquireRequest, ReleaseRequest};

use crate::pki::Pki;
use crate::sim::{self, Seen, Tracker, TrackerRx, Who};
use crate::stats::Dist;
use crate::wire;

/// Connections opened at once (a burst of thousands overflows the listen backlog).
pub const CONNECT_PARALLEL: usize = 64;

/// The quiet before the fan-out's first join (both systems): more than the controller's
/// burst window (`events::pacing`, 1 s), in which a change after a storm waits up to a
/// second.
pub const FANOUT_SETTLE: Duration = Duration::from_millis(1500);

type Client = AgentServiceClient<Channel>;

/// The deadline a simulated node's Acquire carries (`grpc-timeout`), twill-agent's
/// `--call-timeout` default: a replica forwarding it to the leader waits as long.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `req` as twill-agent sends it: with its deadline.
fn call(req: AcquireRequest) -> tonic::Request<AcquireRequest> {
    twill_agent::client::request(req, CALL_TIMEOUT)
}

/// Opens one TLS channel to the controller now, trying 5 times half a second apart
/// (a connection refused under a burst of handshakes is retried, as the agent would).
pub async fn connect_one(url: &str, tls: ClientTlsConfig) -> Result<Channel> {
    connect_from(url, tls, None).await
}

/// `connect_one` from source address `local` (`None`: the system's choice).
pub async fn connect_from(
    url: &str,
    tls: ClientTlsConfig,
    local: Option<std::net::IpAddr>,
) -> Result<Channel> {
    let mut last = None;
    for _ in 0..5 {
        match Endpoint::from_shared(url.to_string())?
            .local_address(local)
            .tls_config(tls.clone())?
            .connect_timeout(Duration::from_secs(20))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await
        {
            Ok(ch) => return Ok(ch),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(anyhow::anyhow!("connect: {:?}", last))
}

/// The TLS of a node's channel: the controller verified with the CA, and the node's
/// client certificate.
pub fn node_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name("localhost")
}

/// Connects one mTLS channel per name, the i-th to `urls[i % urls.len()]` (nodes
/// spread over the replicas, as agents do).
pub async fn connect_all(urls: &[String], pki: &Pki, names: &[String]) -> Result<Vec<Channel>> {
    let sem = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let mut set = JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let cert = pki.node(name);
        let tls = node_tls(&pki.ca_pem, &cert.cert_pem, &cert.key_pem);
        let url = urls[i % urls.len()].clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            Ok::<_, anyhow::Error>((i, connect_one(&url, tls).await?))
        });
    }
    let mut out: Vec<Option<Channel>> = (0..names.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r??;
        out[i] = Some(c);
    }
    Ok(out.into_iter().map(|c| c.expect("connected")).collect())
}

/// Storm node `i`'s acquisition (an IPv4 VXLAN network, as the bench runs it) in the
/// default network.
pub fn acquire_request(name: &str, i: usize, joiner: bool) -> AcquireRequest {
    acquire_request_in(name, i, joiner, 0)
}

/// Storm node `i`'s acquisition in network `k` ([`sim::network_name`]; 0, the default
/// network, leaves `network` empty as before there were several).
pub fn acquire_request_in(name: &str, i: usize, joiner: bool, k: usize) -> AcquireRequest {
    AcquireRequest {
        node_name: name.to_string(),
        public_ip: sim::public_ip(i),
        backend_type: "vxlan".into(),
        vtep_mac: sim::vtep_mac_in(i, joiner, k),
        network: sim::network_wire(k),
        ..Default::default()
    }
}

/// Storm node `i` asks for its lease in each of the tracker's networks, at once as
/// twill-agent does, until it has it (a failure is retried after a second); records
/// each grant in `t`, in ns after `t0` (a [`Tracker::ns`] time).
pub async fn acquire(i: usize, channel: Channel, t: Arc<Tracker>, t0: u64) {
    let c = Client::new(channel);
    if t.networks == 1 {
        acquire_in(0, i, c, &t, t0).await;
    } else {
        futures::future::join_all((0..t.networks).map(|k| acquire_in(k, i, c.clone(), &t, t0)))
            .await;
    }
}

/// Storm node `i`'s lease in network `k`, retried until granted.
async fn acquire_in(k: usize, i: usize, c: Client, t: &Tracker, t0: u64) {
    let req = acquire_request_in(&sim::node_name(i), i, false, k);
    let granted = t
        .retry(&t.grant_errors, || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.acquire(call(req)).await }
        })
        .await;
    if granted.is_some() {
        t.granted_at[t.lease(k, i)].store(t.ns(Instant::now()) - t0 + 1, Ordering::Relaxed);
    }
}

/// What a node's watch asks for: every network of the run on one stream (none named
/// with one network: the default one, as before there were several).
pub fn watched_networks(networks: usize) -> Vec<String> {
    if networks <= 1 {
        Vec::new()
    } else {
        (0..networks).map(sim::network_name).collect()
    }
}

/// The controller replicas of a run and where each node's watch is, so that a watch
/// that breaks moves to another replica as twill-agent's does.
pub struct Replicas {
    urls: Vec<String>,
    /// Per node: its TLS.
    tls: Vec<ClientTlsConfig>,
    /// Per node: the index in `urls` of the replica it watches.
    pub on: Vec<AtomicUsize>,
}

impl Replicas {
    /// `urls` with node i first on `urls[i % len]` (as [`connect_all`] placed it).
    pub fn new(urls: &[String], pki: &Pki, names: &[String]) -> Replicas {
        Replicas {
            urls: urls.to_vec(),
            tls: names
                .iter()
                .map(|n| {
                    let c = pki.node(n);
                    node_tls(&pki.ca_pem, &c.cert_pem, &c.key_pem)
                })
                .collect(),
            on: (0..names.len())
                .map(|i| AtomicUsize::new(i % urls.len()))
                .collect(),
        }
    }

    /// Node `idx`'s watch broke: a channel to another replica that accepts a
    /// connection, a random one first as twill-agent picks it (so the dead replica's
    /// nodes spread over the others), then the rest in order (`None`: none did).
    async fn fail_over(&self, idx: usize) -> Option<Channel> {
        let k = self.urls.len();
        let from = self.on[idx].load(Ordering::Relaxed);
        let first = rand::Rng::random_range(&mut rand::rng(), 1..k);
        for step in (first..k).chain(1..first) {
            let at = (from + step) % k;
            let connected = Endpoint::from_shared(self.urls[at].clone())
                .ok()?
                .tls_config(self.tls[idx].clone())
                .ok()?
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .connect()
                .await;
            if let Ok(ch) = connected {
                self.on[idx].store(at, Ordering::Relaxed);
                return Some(ch);
            }
        }
        None
    }
}

/// A node's watch, for as long as the run lasts: on a broken stream it resumes from
/// its last revision with the agent's own backoff, on another replica at once when
/// there are several.
pub async fn watcher(
    idx: usize,
    mut channel: Channel,
    t: Arc<Tracker>,
    replicas: Option<Arc<Replicas>>,
) {
    let mut seen = Seen::new(t.leases());
    let networks = watched_networks(t.networks);
    let mut revision = 0u64;
    let mut broken = false;
    let mut backoff = Backoff::new(Duration::from_secs(30));
    loop {
        if t.stopping.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut stream) = wire::watch(channel.clone(), revision, &networks).await else {
            if let Some(moved) = move_on(replicas.as_deref(), idx).await {
                channel = moved;
            }
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        };
        backoff.reset();
        if broken {
            let _ = t.resumed_tx.send(Instant::now());
        }
        let mut first = true;
        while let Ok(Some(msg)) = stream.message().await {
            let now = Instant::now();
            if msg.reset {
                seen.clear();
                if broken && first {
                    t.resets.fetch_add(1, Ordering::Relaxed);
                }
            }
            first = false;
            for &(who, k, delete) in &msg.events {
                if k >= t.networks {
                    continue;
                }
                match who {
                    Who::Node(i) if i < t.n => {
                        let lease = t.lease(k, i);
                        if delete {
                            seen.remove(lease);
                        } else {
                            seen.insert(lease);
                        }
                        if !msg.reset && k == 0 {
                            t.storm_event(i, delete, now);
                        }
                    }
                    Who::Joiner(r) if !delete && !msg.reset => {
                        let _ = t.fanout_tx.send((r, k as u32, now));
                    }
                    _ => {}
                }
            }
            revision = msg.revision;
            t.update_seen(idx, seen.len(), now);
        }
        if t.stopping.load(Ordering::Relaxed) {
            return;
        }
        broken = true;
        t.breaks.fetch_add(1, Ordering::Relaxed);
        if let Some(moved) = move_on(replicas.as_deref(), idx).await {
            channel = moved;
            continue;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn move_on(replicas: Option<&Replicas>, idx: usize) -> Option<Channel> {
    replicas?.fail_over(idx).await
}

/// N connected nodes and their watchers.
pub struct Fleet {
    clients: Vec<Channel>,
    /// With several replicas: where the watches are and may move.
    pub replicas: Option<Arc<Replicas>>,
    joiners: Vec<Channel>,
    /// The tracker of this fleet's run.
    pub tracker: Arc<Tracker>,
    rx: TrackerRx,
    tasks: JoinSet<()>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.tracker.stopping.store(true, Ordering::Relaxed);
        self.tasks.abort_all();
    }
}

/// Connects N nodes and `joiners` extra fan-out joiners (certificates must exist),
/// spread over `urls`: one controller, or replicas (then watches fail over).
pub async fn fleet(urls: &[String], pki: &Pki, n: usize, joiners: usize) -> Result<(Fleet, f64)> {
    fleet_on(urls, pki, n, joiners, 1).await
}

/// [`fleet`] with every node (and joiner) joining `networks` networks
/// ([`sim::network_name`]; the controller must serve them): a lease in each, and one
/// watch stream of them all.
pub async fn fleet_on(
    urls: &[String],
    pki: &Pki,
    n: usize,
    joiners: usize,
    networks: usize,
) -> Result<(Fleet, f64)> {
    let names: Vec<String> = (0..n).map(sim::node_name).collect();
    let jnames: Vec<String> = (0..joiners).map(sim::joiner_name).collect();
    let started = Instant::now();
    let clients = connect_all(urls, pki, &names)
        .await
        .context("connecting nodes")?;
    let connect_s = started.elapsed().as_secs_f64();
    let joiners = connect_all(urls, pki, &jnames)
        .await
        .context("connecting joiners")?;
    let replicas = (urls.len() > 1).then(|| Arc::new(Replicas::new(urls, pki, &names)));
    let (tracker, rx) = Tracker::on_networks(n, networks);
    Ok((
        Fleet {
            clients,
            replicas,
            joiners,
            tracker: Arc::new(tracker),
            rx,
            tasks: JoinSet::new(),
        },
        connect_s,
    ))
}

impl Fleet {
    /// Each node's connection, node `i` at `i`.
    pub fn clients(&self) -> &[Channel] {
        &self.clients
    }

    /// All N nodes start watching and acquire their lease (in each network) at once;
    /// returns when every node has seen all N × networks leases, or at the deadline.
    pub async fn storm(&mut self, deadline: Duration) -> sim::StormOutcome {
        let t = self.tracker.clone();
        // Time zero: the fleet's connections are up, nothing has been asked yet.
        let start = Instant::now();
        let t0 = t.ns(start);
        for (i, c) in self.clients.iter().enumerate() {
            self.tasks
                .spawn(watcher(i, c.clone(), t.clone(), self.replicas.clone()));
            self.tasks.spawn(acquire(i, c.clone(), t.clone(), t0));
        }
        sim::wait_converged(&t, start, deadline, "twill storm").await;
        let mut out = t.storm_outcome(deadline);
        // converged_at is measured from the tracker's base; shift to the storm start.
        if out.converged {
            out.converge_s -= (t0 as f64) / 1e9;
        }
        out
    }

    /// With the N watchers up to date and the cluster settled ([`FANOUT_SETTLE`]), one
    /// more node joins per round; measures the
    /// joiner's Acquire being sent → the lease's delivery at every watcher (and, kept
    /// for comparison, its reply → delivery). With several networks the joiner asks
    /// for its lease in each at once (as twill-agent does), and each lease's delivery
    /// is timed from its own request.
    pub async fn fanout(&mut self, rounds: usize) -> sim::FanoutOutcome {
        let n = self.clients.len();
        let networks = self.tracker.networks;
        let mut out = Vec::new();
        let mut joined = 0;
        // A settled cluster: right after a storm the controller still spaces its
        // publications (`events::pacing`, for a second after a burst).
        tokio::time::sleep(FANOUT_SETTLE).await;
        for r in 0..rounds.min(self.joiners.len()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let c = Client::new(self.joiners[r].clone());
            let reqs: Vec<AcquireRequest> = (0..networks)
                .map(|k| acquire_request_in(&sim::joiner_name(r), r, true, k))
                .collect();
            // The origin of the fan-out delay: the requests leave now.
            let sent = Instant::now();
            let replies = futures::future::join_all(reqs.into_iter().map(|req| {
                let mut c = c.clone();
                async move {
                    let ok = c.acquire(call(req)).await.is_ok();
                    (ok, Instant::now())
                }
            }))
            .await;
            if !replies.iter().any(|&(ok, _)| ok) {
                continue;
            }
            joined += 1;
            let got = sim::collect_round_in(
                &mut self.rx.fanout,
                r as u32,
                networks,
                n,
                Duration::from_secs(15),
            )
            .await;
            for ((ok, granted), got) in replies.into_iter().zip(got) {
                if ok {
                    out.push((sent, granted, got));
                }
            }
        }
        let mut o = sim::fanout_outcome(n, &out);
        o.rounds = joined;
        o.networks = networks;
        o
    }

    /// 1% of the nodes (at least one) leave and rejoin every second for `duration`.
    pub async fn churn(&mut self, duration: Duration) -> ChurnOutcome {
        let n = self.clients.len();
        let per_second = (n / 100).max(1);
        let t = self.tracker.clone();
        t.churn_on.store(true, Ordering::Relaxed);
        let mut ops = JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let seconds = duration.as_secs().max(1) as usize;
        for s in 0..seconds {
            tick.tick().await;
            for k in 0..per_second {
                let i = (s * per_second + k) % n;
                let mut c = Client::new(self.clients[i].clone());
                let t = t.clone();
                ops.spawn(async move {
                    let name = sim::node_name(i);
                    let t_rel = Instant::now();
                    t.release_sent[i].store(t.ns(t_rel), Ordering::Relaxed);
                    let rel = c
                        .release(ReleaseRequest {
                            node_name: name.clone(),
                            ..Default::default()
                        })
                        .await
                        .is_ok();
                    let rel_ms = t_rel.elapsed().as_secs_f64() * 1e3;
                    let t_acq = Instant::now();
                    t.acquire_sent[i].store(t.ns(t_acq), Ordering::Relaxed);
                    let acq = c
                        .acquire(call(acquire_request(&name, i, false)))
                        .await
                        .is_ok();
                    let acq_ms = t_acq.elapsed().as_secs_f64() * 1e3;
                    (rel && acq, rel_ms, acq_ms)
                });
            }
        }
        let mut op_ms = Vec::new();
        let mut failed = 0;
        while let Some(r) = ops.join_next().await {
            if let Ok((ok, a, b)) = r {
                if ok {
                    op_ms.push(a);
                    op_ms.push(b);
                } else {
                    failed += 1;
                }
            }
        }
        let churned = seconds * per_second;
        let expected = (2 * churned * n) as u64;
        let settle = Instant::now();
        while t.churn_hist.dist().count < expected && settle.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t.churn_on.store(false, Ordering::Relaxed);
        ChurnOutcome {
            nodes: n,
            per_second,
            duration_s: seconds as f64,
            cycles: churned,
            failed_cycles: failed,
            expected_deliveries: expected,
            delivery_ms: t.churn_hist.dist(),
            op_ms: Dist::of(op_ms),
            server: Default::default(),
        }
    }

    /// Forgets the watches resumed so far (before a crash is timed).
    pub fn drain_resumed(&mut self) {
        while self.rx.resumed.try_recv().is_ok() {}
    }

    /// Waits until `count` broken watches have resumed, or `limit`; each one's delay
    /// after `since`, s.
    pub async fn collect_resumed(
        &mut self,
        count: usize,
        since: Instant,
        limit: Duration,
    ) -> Vec<f64> {
        let mut resumed = Vec::with_capacity(count);
        let deadline = tokio::time::Instant::now() + limit;
        while resumed.len() < count {
            match tokio::time::timeout_at(deadline, self.rx.resumed.recv()).await {
                Ok(Some(at)) => resumed.push(at.duration_since(since).as_secs_f64()),
                _ => break,
            }
        }
        resumed
    }

    /// Restarts the controller under the connected watchers; times their resumption.
    pub async fn reconnect(
        &mut self,
        restart: impl FnOnce() -> Result<bool>,
        signal: &str,
    ) -> Result<ReconnectOutcome> {
        let t = self.tracker.clone();
        let n = self.clients.len();
        let resets0 = t.resets.load(Ordering::Relaxed);
        self.drain_resumed();
        let killed = Instant::now();
        let (escalated, ready_at) = tokio::task::block_in_place(|| -> Result<(bool, Instant)> {
            let escalated = restart()?;
            Ok((escalated, Instant::now()))
        })?;
        let resumed = self
            .collect_resumed(n, killed, Duration::from_secs(180))
            .await;
        // Resets arrive as the first message of a resumed stream.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let all = resumed.len() == n;
        Ok(ReconnectOutcome {
            nodes: n,
            signal: signal.into(),
            stop_escalated: escalated,
            restart_s: ready_at.duration_since(killed).as_secs_f64(),
            resumed: resumed.len(),
            all_resumed_s: if all {
                resumed.iter().copied().fold(0.0, f64::max)
            } else {
                f64::NAN
            },
            resume_s: Dist::of(resumed.iter().map(|s| s * 1e3).collect()),
            resets: t.resets.load(Ordering::Relaxed) - resets0,
        })
    }
}

/// The result of the churn scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnOutcome {
    /// Nodes.
    pub nodes: usize,
    /// Nodes that leave and rejoin each second.
    pub per_second: usize,
    /// Seconds it ran.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub duration_s: f64,
    /// Leave + rejoin cycles.
    pub cycles: usize,
    /// Cycles with a failed call.
    pub failed_cycles: usize,
    /// Deliveries expected (2 events per cycle × N watchers).
    pub expected_deliveries: u64,
    /// Request sent → delivered at each watcher (release → DELETE, acquire → PUT), ms.
    pub delivery_ms: Dist,
    /// Release and Acquire round trips, ms.
    pub op_ms: Dist,
    /// Controller cost during the churn.
    pub server: crate::procstat::Usage,
}

/// The result of the reconnect scenario.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconnectOutcome {
    /// Nodes.
    pub nodes: usize,
    /// How the controller was stopped.
    pub signal: String,
    /// It did not exit within the grace period and was SIGKILLed.
    pub stop_escalated: bool,
    /// Stop → the new controller ready, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub restart_s: f64,
    /// Watchers that resumed.
    pub resumed: usize,
    /// Stop → the last watcher resumed, s (NaN if some never did).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub all_resumed_s: f64,
    /// Stop → each watcher resumed, ms.
    pub resume_s: Dist,
    /// Resumed watches that got a full reset instead of the missed events.
    pub resets: u64,
}
