//! The cold start: N new nodes that hold no certificate yet, only the CA certificate
//! and a bootstrap token. Each does what twill-agent does on its first start: it
//! sends a certificate signing request for its own key with the token
//! (`IdentityService.Bootstrap`, over TLS without a client certificate), then opens
//! its mutual-TLS channel with the certificate it got, watches the lease table and
//! acquires its lease, as in the join storm.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::{Certificate, ClientTlsConfig};
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::identity_service_client::IdentityServiceClient;
use twill_proto::{BootstrapRequest, CreateTokenRequest};

use crate::pki::Pki;
use crate::procstat::Usage;
use crate::sim::{self, Tracker};
use crate::stats::{median, median_dist, Dist};
use crate::twill::{self, connect_from, connect_one, node_tls, CONNECT_PARALLEL};

/// Makes the bootstrap token of a run with the admin certificate, as `twillctl token
/// create` does.
pub async fn create_token(url: &str, pki: &Pki) -> Result<String> {
    let tls = node_tls(&pki.ca_pem, &pki.admin.cert_pem, &pki.admin.key_pem);
    let channel = connect_one(url, tls).await.context("admin connection")?;
    let resp = AdminServiceClient::new(channel)
        .create_token(CreateTokenRequest {
            ttl_seconds: 3600,
            description: "twill-bench cold start".into(),
            ..Default::default()
        })
        .await
        .context("AdminService.CreateToken")?;
    Ok(resp.into_inner().token)
}

/// What a new node has made before it calls the controller: its key and the request.
pub struct Prepared {
    key: KeyPair,
    csr_pem: String,
}

/// Every node's key (ECDSA P-256) and CSR, made with the agent's own code, on all
/// cores. This is before time zero: in a cluster each node makes its own on its own
/// machine (well under a millisecond); here all N would share the controller's cores.
pub fn prepare(n: usize) -> Result<Vec<Prepared>> {
    let threads = std::thread::available_parallelism().map_or(2, |t| t.get());
    let chunk = n.div_ceil(threads).max(1);
    let indices: Vec<usize> = (0..n).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || -> Result<Vec<Prepared>> {
                    part.iter()
                        .map(|&i| {
                            let key = twill_agent::identity::generate_key()?;
                            let csr_pem = twill_agent::identity::csr_pem(&sim::node_name(i), &key)?;
                            Ok(Prepared { key, csr_pem })
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(h.join().expect("key thread")?);
        }
        Ok(all)
    })
}

/// Per node, when each step ended (ns after time zero; 0: not yet), and what failed.
struct Marks {
    bootstrapped_at: Vec<AtomicU64>,
    connected_at: Vec<AtomicU64>,
    bootstrap_errors: AtomicU64,
    failed_nodes: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl Marks {
    fn fail(&self, i: usize, what: String) {
        self.failed_nodes.fetch_add(1, Ordering::Relaxed);
        self.first_failure
            .lock()
            .get_or_insert_with(|| format!("{}: {what}", sim::node_name(i)));
    }
}

/// What one node needs at time zero.
struct Node {
    i: usize,
    url: String,
    ca_pem: String,
    token: String,
    prepared: Prepared,
}

/// Simulated node `i`'s own source address, in 127.0.0.0/8 (all of it is this
/// machine's loopback): 127.1.0.0 onwards.
fn loopback_source(i: usize) -> std::net::IpAddr {
    let [_, b, c, d] = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
    std::net::Ipv4Addr::new(127, b.saturating_add(1), c, d).into()
}

/// One node's cold start. Connections take a permit of `handshakes`, as the join
/// storm's do before its time zero (a burst of thousands overflows the listen backlog).
async fn cold_node(
    node: Node,
    handshakes: Arc<Semaphore>,
    t: Arc<Tracker>,
    m: Arc<Marks>,
    t0: u64,
) {
    let Node {
        i,
        url,
        ca_pem,
        token,
        prepared,
    } = node;
    let name = sim::node_name(i);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name("localhost");
    let channel = {
        let Ok(_permit) = handshakes.acquire().await else {
            return;
        };
        // Each node from an address of its own, as real nodes are: the controller
        // limits token attempts per source address.
        match connect_from(&url, tls, Some(loopback_source(i))).await {
            Ok(c) => c,
            Err(e) => return m.fail(i, format!("bootstrap connection: {e:#}")),
        }
    };
    let api = IdentityServiceClient::new(channel);
    let req = BootstrapRequest {
        token,
        csr_pem: prepared.csr_pem,
    };
    let Some(chain) = t
        .retry(&m.bootstrap_errors, || {
            let (mut api, req) = (api.clone(), req.clone());
            async move { api.bootstrap(req).await }
        })
        .await
        .map(|r| r.into_inner().certificate_chain_pem)
    else {
        return;
    };
    m.bootstrapped_at[i].store(t.ns(Instant::now()) - t0 + 1, Ordering::Relaxed);
    // The agent leaves the bootstrap connection once it has its certificate.
    drop(api);
    if let Err(e) = twill_agent::identity::check_issued(&chain, &name, &prepared.key) {
        return m.fail(i, format!("issued certificate: {e:#}"));
    }
    let tls = node_tls(&ca_pem, &chain, &prepared.key.serialize_pem());
    let channel = {
        let Ok(_permit) = handshakes.acquire().await else {
            return;
        };
        match connect_one(&url, tls).await {
            Ok(c) => c,
            Err(e) => return m.fail(i, format!("mTLS connection: {e:#}")),
        }
    };
    m.connected_at[i].store(t.ns(Instant::now()) - t0 + 1, Ordering::Relaxed);
    tokio::join!(
        twill::watcher(i, channel.clone(), t.clone(), None),
        twill::acquire(i, channel, t.clone(), t0)
    );
}

/// At time zero all N nodes start at once; returns when every node has its lease and
/// has seen all N, or at the deadline. `usage`, `prepare_s` and `watch_messages` are
/// for the caller.
pub async fn run(
    url: &str,
    ca_pem: &str,
    token: &str,
    prepared: Vec<Prepared>,
    deadline: Duration,
) -> ColdStartOutcome {
    let n = prepared.len();
    let (t, _rx) = Tracker::new(n);
    let t = Arc::new(t);
    let zeros = || (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let m = Arc::new(Marks {
        bootstrapped_at: zeros(),
        connected_at: zeros(),
        bootstrap_errors: AtomicU64::new(0),
        failed_nodes: AtomicU64::new(0),
        first_failure: Mutex::new(None),
    });
    let handshakes = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let mut tasks = JoinSet::new();
    // Time zero: each node has its key, its request, the token and the CA.
    let start = Instant::now();
    let t0 = t.ns(start);
    for (i, prepared) in prepared.into_iter().enumerate() {
        let node = Node {
            i,
            url: url.to_string(),
            ca_pem: ca_pem.to_string(),
            token: token.to_string(),
            prepared,
        };
        tasks.spawn(cold_node(
            node,
            handshakes.clone(),
            t.clone(),
            m.clone(),
            t0,
        ));
    }
    sim::wait_converged(&t, start, deadline, "cold start").await;
    let mut storm = t.storm_outcome(deadline);
    t.stopping.store(true, Ordering::Relaxed);
    tasks.abort_all();
    // converged_at is measured from the tracker's base; shift to time zero.
    if storm.converged {
        storm.converge_s -= (t0 as f64) / 1e9;
    }
    let at = |v: &[AtomicU64]| {
        v.iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    let (boot, conn, granted) = (
        at(&m.bootstrapped_at),
        at(&m.connected_at),
        at(&t.granted_at),
    );
    let ms = |ns: u64| ns as f64 / 1e6;
    let after_boot = |end: &[u64]| {
        Dist::of(
            boot.iter()
                .zip(end)
                .filter(|(&b, &e)| b != 0 && e != 0)
                .map(|(&b, &e)| ms(e) - ms(b))
                .collect(),
        )
    };
    let all_granted = storm.nodes_granted == n;
    let first_failure = m.first_failure.lock().clone();
    ColdStartOutcome {
        nodes: n,
        converged: storm.converged && all_granted,
        all_granted_s: if all_granted {
            storm.grant_ms.max / 1e3
        } else {
            f64::NAN
        },
        converge_s: storm.converge_s,
        deadline_s: deadline.as_secs_f64(),
        prepare_s: f64::NAN,
        nodes_bootstrapped: boot.iter().filter(|&&b| b != 0).count(),
        nodes_granted: storm.nodes_granted,
        nodes_converged: storm.nodes_converged,
        bootstrap_ms: Dist::of(boot.iter().filter(|&&b| b != 0).map(|&b| ms(b)).collect()),
        connect_ms: after_boot(&conn),
        join_ms: after_boot(&granted),
        grant_ms: storm.grant_ms,
        bootstrap_errors: m.bootstrap_errors.load(Ordering::Relaxed),
        grant_errors: storm.grant_errors,
        failed_nodes: m.failed_nodes.load(Ordering::Relaxed),
        first_failure,
        usage: Usage::default(),
        watch_messages: f64::NAN,
    }
}

/// One cold start of N nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColdStartOutcome {
    /// Nodes.
    pub nodes: usize,
    /// Every node had its lease and had seen all N before the deadline.
    pub converged: bool,
    /// Time zero → the last node's lease granted, s (NaN if not all were).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub all_granted_s: f64,
    /// Time zero → the last node had seen all N leases, s (NaN if not all did).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub converge_s: f64,
    /// The deadline, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deadline_s: f64,
    /// Making the N keys and CSRs before time zero, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub prepare_s: f64,
    /// Nodes that got a certificate.
    pub nodes_bootstrapped: usize,
    /// Nodes whose lease was granted.
    pub nodes_granted: usize,
    /// Nodes that had seen all N leases.
    pub nodes_converged: usize,
    /// Time zero → the node's certificate in hand, ms.
    pub bootstrap_ms: Dist,
    /// Certificate in hand → its mutual-TLS channel open, ms.
    pub connect_ms: Dist,
    /// Certificate in hand → lease granted, ms.
    pub join_ms: Dist,
    /// Time zero → lease granted, ms.
    pub grant_ms: Dist,
    /// Failed Bootstrap calls (each retried after 1 s).
    pub bootstrap_errors: u64,
    /// Failed Acquire calls (each retried after 1 s).
    pub grant_errors: u64,
    /// Nodes that gave up (a connection that never opened, a wrong certificate).
    pub failed_nodes: u64,
    /// The first of those failures.
    pub first_failure: Option<String>,
    /// Controller cost from time zero to the end.
    pub usage: Usage,
    /// Watch messages the controller sent (one per watcher per publication).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub watch_messages: f64,
}

/// Medians over the cold starts at one N.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColdStartSummary {
    /// Runs.
    pub runs: usize,
    /// Runs in which every node had its lease and had seen all N before the deadline.
    pub converged_runs: usize,
    /// Time zero → all N granted, s (median of converged runs).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub all_granted_s: f64,
    /// Time zero → all N saw all N, s (median of converged runs).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub converge_s: f64,
    /// Nodes bootstrapped (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub nodes_bootstrapped: f64,
    /// Nodes granted (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub nodes_granted: f64,
    /// Nodes that saw all N (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub nodes_converged: f64,
    /// Time zero → certificate in hand, ms.
    pub bootstrap_ms: Dist,
    /// Certificate in hand → mutual-TLS channel open, ms.
    pub connect_ms: Dist,
    /// Certificate in hand → lease granted, ms.
    pub join_ms: Dist,
    /// Time zero → lease granted, ms.
    pub grant_ms: Dist,
    /// Failed Bootstrap calls, all runs.
    pub bootstrap_errors: u64,
    /// Failed Acquire calls, all runs.
    pub grant_errors: u64,
    /// Nodes that gave up, all runs.
    pub failed_nodes: u64,
    /// Controller CPU, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub server_cpu_s: f64,
    /// Controller peak RSS, MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub peak_rss_mb: f64,
    /// Controller RSS at the end, MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub end_rss_mb: f64,
    /// Load-generator CPU, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub client_cpu_s: f64,
    /// Watch messages the controller sent.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub watch_messages: f64,
    /// The deadline, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deadline_s: f64,
}

/// Medians of `runs`.
pub fn summarize(runs: &[ColdStartOutcome]) -> ColdStartSummary {
    let conv: Vec<&ColdStartOutcome> = runs.iter().filter(|r| r.converged).collect();
    let dist =
        |f: fn(&ColdStartOutcome) -> Dist| median_dist(&runs.iter().map(f).collect::<Vec<_>>());
    ColdStartSummary {
        runs: runs.len(),
        converged_runs: conv.len(),
        all_granted_s: median(conv.iter().map(|r| r.all_granted_s)),
        converge_s: median(conv.iter().map(|r| r.converge_s)),
        nodes_bootstrapped: median(runs.iter().map(|r| r.nodes_bootstrapped as f64)),
        nodes_granted: median(runs.iter().map(|r| r.nodes_granted as f64)),
        nodes_converged: median(runs.iter().map(|r| r.nodes_converged as f64)),
        bootstrap_ms: dist(|r| r.bootstrap_ms),
        connect_ms: dist(|r| r.connect_ms),
        join_ms: dist(|r| r.join_ms),
        grant_ms: dist(|r| r.grant_ms),
        bootstrap_errors: runs.iter().map(|r| r.bootstrap_errors).sum(),
        grant_errors: runs.iter().map(|r| r.grant_errors).sum(),
        failed_nodes: runs.iter().map(|r| r.failed_nodes).sum(),
        server_cpu_s: median(runs.iter().map(|r| r.usage.cpu_s)),
        peak_rss_mb: median(runs.iter().map(|r| r.usage.peak_rss_mb)),
        end_rss_mb: median(runs.iter().map(|r| r.usage.rss_mb)),
        client_cpu_s: median(runs.iter().map(|r| r.usage.client_cpu_s)),
        watch_messages: median(runs.iter().map(|r| r.watch_messages)),
        deadline_s: runs.first().map_or(f64::NAN, |r| r.deadline_s),
    }
}
