//! The pod view at scale (REFERENCE 2.11): N nodes holding leases each report 110
//! pods (Kubernetes' default per node) at once, as their agents would after the
//! controller restarted; then pods change at a steady rate (each change is its node
//! reporting its whole set again, as the agent does). Measured: the controller's CPU
//! and the memory the pods take, the reports' latency, and `ListPods` (one node, and
//! every node) as `twillctl pods` calls it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{ListLeasesRequest, ListPodsRequest, PodAttachment, ReportAttachmentsRequest};

use crate::procstat::{Meter, Usage};
use crate::stats::Dist;

/// Pods per node.
pub const PODS: usize = 110;

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodsOutcome {
    /// Nodes.
    pub nodes: usize,
    /// Pods in all.
    pub pods: usize,
    /// Every node reporting its pods at once: wall time, s.
    pub report_all_s: f64,
    /// Each of those reports' latency, ms.
    pub report_ms: Dist,
    /// The controller in that phase (CPU; RSS at its end).
    pub report_usage: Usage,
    /// Controller RSS before the reports, MB.
    pub rss_before_mb: f64,
    /// And after them, MB.
    pub rss_after_mb: f64,
    /// `ListPods` of one node, ms.
    pub list_one_ms: Dist,
    /// `ListPods` of every node, ms.
    pub list_all_ms: Dist,
    /// Pods in the answer for every node (all must be there).
    pub listed: usize,
    /// Steady changes asked for per second.
    pub churn_per_s: usize,
    /// For how long, s.
    pub churn_s: f64,
    /// Each change's report latency, ms.
    pub churn_ms: Dist,
    /// The controller meanwhile.
    pub churn_usage: Usage,
}

/// Node `i`'s 110 pods, in its subnet `subnet` (an IPv4 /24 or larger), the `gen`th
/// version of pod `changed` (a new container, as a restarted pod gets).
fn pods_of(i: usize, subnet: &ipnet::Ipv4Net, changed: Option<(usize, u64)>) -> Vec<PodAttachment> {
    let base = u32::from(subnet.network());
    (0..PODS)
        .map(|p| {
            let generation = match changed {
                Some((c, g)) if c == p => g,
                _ => 0,
            };
            PodAttachment {
                network: String::new(),
                container_id: format!("{i:08x}{p:04x}{generation:052x}"),
                ifname: "eth0".into(),
                namespace: format!("team-{}", p % 7),
                pod: format!("app-{i}-{p}-{generation}"),
                ips: vec![std::net::Ipv4Addr::from(base + 2 + p as u32).to_string()],
                added_at_unix: 1_700_000_000,
                node_name: String::new(),
            }
        })
        .collect()
}

fn request(name: &str, pods: Vec<PodAttachment>) -> ReportAttachmentsRequest {
    ReportAttachmentsRequest {
        node_name: name.to_string(),
        attachments: pods,
        usage: Vec::new(),
        findings: Vec::new(),
    }
}

/// Runs it over the fleet's `clients` (node `i` is `crate::sim::node_name(i)`, holding
/// a lease) against the controller `pid`, with an admin connection `admin`.
pub async fn run(
    clients: &[Channel],
    admin: Channel,
    pid: u32,
    churn_per_s: usize,
    churn: Duration,
) -> Result<PodsOutcome> {
    let n = clients.len();
    let mut admin = AdminServiceClient::new(admin).max_decoding_message_size(1 << 30);
    // Each node's subnet, from the lease table.
    let mut subnets = vec![None; n];
    let leases = admin
        .list_leases(ListLeasesRequest::default())
        .await
        .context("ListLeases")?
        .into_inner()
        .leases;
    for l in leases {
        if let Some(i) = l
            .node_name
            .strip_prefix('n')
            .and_then(|s| s.parse::<usize>().ok())
        {
            if i < n {
                subnets[i] = l.subnet.parse::<ipnet::Ipv4Net>().ok();
            }
        }
    }
    let subnets: Arc<Vec<ipnet::Ipv4Net>> = Arc::new(
        subnets
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.with_context(|| format!("node {i} holds no IPv4 lease")))
            .collect::<Result<_>>()?,
    );

    let rss_before_mb = crate::procstat::rss_mb(pid).unwrap_or(f64::NAN);
    let meter = Meter::start(pid);
    let started = Instant::now();
    let mut calls = JoinSet::new();
    for (i, channel) in clients.iter().enumerate() {
        let (channel, subnets) = (channel.clone(), subnets.clone());
        calls.spawn(async move {
            let req = request(&crate::sim::node_name(i), pods_of(i, &subnets[i], None));
            let t = Instant::now();
            AgentServiceClient::new(channel)
                .report_attachments(req)
                .await
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut report_ms = Vec::new();
    while let Some(r) = calls.join_next().await {
        report_ms.push(r?.context("ReportAttachments")?);
    }
    let report_all_s = started.elapsed().as_secs_f64();
    let report_usage = meter.read();
    let rss_after_mb = crate::procstat::rss_mb(pid).unwrap_or(f64::NAN);

    let mut list_one = Vec::new();
    for k in 0..20 {
        let node = crate::sim::node_name(k * n / 20);
        let t = Instant::now();
        admin
            .list_pods(ListPodsRequest {
                node_name: node,
                network: String::new(),
            })
            .await
            .context("ListPods of one node")?;
        list_one.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut list_all = Vec::new();
    let mut listed = 0;
    for _ in 0..5 {
        let t = Instant::now();
        listed = admin
            .list_pods(ListPodsRequest::default())
            .await
            .context("ListPods of every node")?
            .into_inner()
            .pods
            .len();
        list_all.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    // Steady changes: one pod replaced on a random node, `churn_per_s` times a second.
    let meter = Meter::start(pid);
    let started = Instant::now();
    let mut churn_ms = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / churn_per_s.max(1) as u32);
    let mut generation = 0u64;
    let mut calls = JoinSet::new();
    while started.elapsed() < churn {
        tick.tick().await;
        generation += 1;
        let (i, p) = {
            let mut rng = rand::rng();
            (rng.random_range(0..n), rng.random_range(0..PODS))
        };
        let (channel, subnets) = (clients[i].clone(), subnets.clone());
        calls.spawn(async move {
            let req = request(
                &crate::sim::node_name(i),
                pods_of(i, &subnets[i], Some((p, generation))),
            );
            let t = Instant::now();
            AgentServiceClient::new(channel)
                .report_attachments(req)
                .await
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        });
        while let Some(r) = calls.try_join_next() {
            // A node changing twice within its rate limit is refused; the agent would
            // send the set again at its next reconcile. Only the taken ones are timed.
            if let Ok(Ok(ms)) = r {
                churn_ms.push(ms);
            }
        }
    }
    while let Some(r) = calls.join_next().await {
        if let Ok(Ok(ms)) = r {
            churn_ms.push(ms);
        }
    }
    let churn_s = started.elapsed().as_secs_f64();
    Ok(PodsOutcome {
        nodes: n,
        pods: n * PODS,
        report_all_s,
        report_ms: Dist::of(report_ms),
        report_usage,
        rss_before_mb,
        rss_after_mb,
        list_one_ms: Dist::of(list_one),
        list_all_ms: Dist::of(list_all),
        listed,
        churn_per_s,
        churn_s,
        churn_ms: Dist::of(churn_ms),
        churn_usage: meter.read(),
    })
}
