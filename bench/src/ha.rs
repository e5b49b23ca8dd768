//! High availability: three controller replicas on a three-member etcd beside one
//! controller on sled, in the same sitting (join storm and fan-out at N, nodes spread
//! over the replicas), and the leader's crash under N connected nodes: how long until
//! another replica leads, until every watch of the dead replica runs on another, and
//! until a new node is granted a lease.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use twill_proto::agent_service_client::AgentServiceClient;

use crate::pki::Pki;
use crate::procstat::Usage;
use crate::servers::{Controller, EtcdCluster};
use crate::stats::{median, Dist};
use crate::twill::{self, Fleet};
use crate::{Opts, Run, SystemRuns};

/// Controller replicas and etcd members.
pub const REPLICAS: usize = 3;
/// The replicas' etcd prefix.
const PREFIX: &str = "/twill-bench/";
/// How long a failover may take before the run gives up on it.
const FAILOVER_LIMIT: Duration = Duration::from_secs(120);
/// How long one probe Acquire may wait for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The probe's pause between failed Acquires.
const PROBE_PAUSE: Duration = Duration::from_millis(20);

/// One crash of the leader under N connected nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailoverOutcome {
    /// Nodes connected.
    pub nodes: usize,
    /// Watches that ran on the killed leader.
    pub moved: usize,
    /// SIGKILL → another replica says it leads (`twill_is_leader`), s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub new_leader_s: f64,
    /// SIGKILL → a new node, asking a surviving replica all along, holds its lease, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub first_grant_s: f64,
    /// Watches of the killed replica that resumed on another.
    pub resumed: usize,
    /// SIGKILL → the last of them resumed, s (NaN if some never did).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub all_moved_s: f64,
    /// SIGKILL → each of them resumed, ms.
    pub resume_ms: Dist,
    /// Resumed watches that got a full reset instead of the missed events.
    pub resets: u64,
    /// Restart of the killed replica → no replica above its share of the watches by
    /// more than the controllers' slack (`replica::rebalance`), s (NaN: not within
    /// [`REBALANCE_LIMIT`]; absent in older results).
    #[serde(default = "nan", deserialize_with = "crate::stats::f64_or_nan")]
    pub rebalanced_s: f64,
    /// Watches on the restarted replica then.
    #[serde(default)]
    pub back: usize,
}

fn nan() -> f64 {
    f64::NAN
}

/// How long a restarted replica may take to get its share of the watches back.
const REBALANCE_LIMIT: Duration = Duration::from_secs(90);

/// Medians and worst of the failovers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FailoverSummary {
    /// Kills.
    pub kills: usize,
    /// New leader, s: median.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub new_leader_s: f64,
    /// New leader, s: worst.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub new_leader_worst_s: f64,
    /// First grant, s: median.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub first_grant_s: f64,
    /// First grant, s: worst.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub first_grant_worst_s: f64,
    /// All watches of the dead replica moved, s: median.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub all_moved_s: f64,
    /// All moved, s: worst.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub all_moved_worst_s: f64,
    /// Watches moved per kill (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub moved: f64,
    /// Full resets over all kills.
    pub resets: u64,
    /// Restart → back to its share, s: median.
    #[serde(default = "nan", deserialize_with = "crate::stats::f64_or_nan")]
    pub rebalanced_s: f64,
}

fn worst(xs: impl Iterator<Item = f64>) -> f64 {
    xs.fold(f64::NAN, f64::max)
}

fn summarize(f: &[FailoverOutcome]) -> FailoverSummary {
    FailoverSummary {
        kills: f.len(),
        new_leader_s: median(f.iter().map(|x| x.new_leader_s)),
        new_leader_worst_s: worst(f.iter().map(|x| x.new_leader_s)),
        first_grant_s: median(f.iter().map(|x| x.first_grant_s)),
        first_grant_worst_s: worst(f.iter().map(|x| x.first_grant_s)),
        all_moved_s: median(f.iter().map(|x| x.all_moved_s)),
        all_moved_worst_s: worst(f.iter().map(|x| x.all_moved_s)),
        moved: median(f.iter().map(|x| x.moved as f64)),
        resets: f.iter().map(|x| x.resets).sum(),
        rebalanced_s: median(f.iter().map(|x| x.rebalanced_s)),
    }
}

/// The high-availability figures at one N.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HaRow {
    /// Nodes.
    pub nodes: usize,
    /// Controller replicas (and etcd members).
    pub replicas: usize,
    /// One controller on sled, alternated with the replica runs.
    pub sled: SystemRuns,
    /// The replicas on etcd; CPU and RSS are the replicas' sums.
    pub etcd: SystemRuns,
    /// The etcd cluster's cost (all members) during each replica run's storm.
    pub etcd_storm_usage: Vec<Usage>,
    /// Every leader crash, in the last replica run.
    pub failovers: Vec<FailoverOutcome>,
    /// Their medians and worst.
    pub failover: FailoverSummary,
}

/// The replicas on etcd, their cluster and the fleet on them: one run.
struct ReplicaRun {
    run: Run,
    etcd_usage: Usage,
    failovers: Vec<FailoverOutcome>,
}

/// Sled and replica runs alternately at N (so the machine's drift falls on both
/// alike), then `kills` leader crashes in the last replica run.
pub async fn row(
    o: &Opts,
    pki: &mut Pki,
    ctl_bin: &Path,
    etcd_bin: &Path,
    n: usize,
    kills: usize,
) -> Result<HaRow> {
    let k = crate::repeats(o, n);
    let (mut sled, mut reps, mut etcd_usage) = (Vec::new(), Vec::new(), Vec::new());
    let mut failovers = Vec::new();
    for r in 0..k {
        eprintln!("1 controller on sled N={n} run {}/{k}", r + 1);
        sled.push(crate::twill_run(ctl_bin, pki, n, o, true).await?);
        eprintln!("{REPLICAS} replicas on etcd N={n} run {}/{k}", r + 1);
        let last = r + 1 == k;
        let run = replica_run(ctl_bin, etcd_bin, pki, n, o, if last { kills } else { 0 }).await?;
        reps.push(run.run);
        etcd_usage.push(run.etcd_usage);
        failovers.extend(run.failovers);
    }
    Ok(HaRow {
        nodes: n,
        replicas: REPLICAS,
        sled: SystemRuns {
            median: crate::summarize(&sled),
            runs: sled,
        },
        etcd: SystemRuns {
            median: crate::summarize(&reps),
            runs: reps,
        },
        etcd_storm_usage: etcd_usage,
        failover: summarize(&failovers),
        failovers,
    })
}

async fn replica_run(
    ctl_bin: &Path,
    etcd_bin: &Path,
    pki: &mut Pki,
    n: usize,
    o: &Opts,
    kills: usize,
) -> Result<ReplicaRun> {
    let joiners = o.rounds;
    crate::ensure_certs(pki, n, joiners)?;
    let probes: Vec<String> = (0..kills).map(probe_name).collect();
    pki.ensure_nodes(&probes)?;
    let mut cluster = EtcdCluster::start(etcd_bin, pki, REPLICAS)?;
    if let Err(e) =
        crate::etcd::wait_ready(&cluster.members[0].url(), pki, Duration::from_secs(60)).await
    {
        bail!("{e}:\n{}", cluster.members[0].log_tail(20));
    }
    let mut ctls = (0..REPLICAS)
        .map(|_| Controller::start_replica(ctl_bin, pki, &cluster, PREFIX))
        .collect::<Result<Vec<_>>>()?;
    let urls: Vec<String> = ctls.iter().map(Controller::url).collect();
    let pids: Vec<u32> = ctls.iter().map(Controller::pid).collect();
    let label = format!("{REPLICAS} replicas");
    let measured = crate::measure(&label, &pids, &cluster.pids(), n, o, true, || {
        twill::fleet(&urls, pki, n, joiners)
    })
    .await?;
    let etcd_usage = measured.others_storm;
    for (i, m) in cluster.members.iter_mut().enumerate() {
        if !m.alive() {
            eprintln!(
                "  etcd member m{i} exited during the run:\n{}",
                m.log_tail(30)
            );
        }
    }
    let mut run = measured.run;
    run.storm_watch_messages = ctls
        .iter()
        .filter_map(|c| c.metric(crate::servers::WATCH_MESSAGES))
        .sum();
    let mut fleet = measured.fleet;
    let mut failovers = Vec::new();
    if run.storm.converged {
        for k in 0..kills {
            let f = failover(&mut ctls, &mut fleet, pki, n, k, n + joiners)
                .await
                .with_context(|| format!("failover {}", k + 1))?;
            eprintln!(
                "  failover {}/{kills}: new leader after {:.2} s, first grant {:.2} s, \
                 {} of {} watches moved in {:.2} s, {} resets; restarted, back to its \
                 share ({} watches) {:.2} s later",
                k + 1,
                f.new_leader_s,
                f.first_grant_s,
                f.resumed,
                f.moved,
                f.all_moved_s,
                f.resets,
                f.back,
                f.rebalanced_s
            );
            failovers.push(f);
        }
    }
    drop(fleet);
    Ok(ReplicaRun {
        run,
        etcd_usage,
        failovers,
    })
}

fn probe_name(k: usize) -> String {
    format!("failover-probe-{k:03}")
}

/// The replica that leads, within 60 s.
fn wait_leader(ctls: &[Controller], not: Option<usize>) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(i) = (0..ctls.len()).find(|&i| Some(i) != not && ctls[i].is_leader()) {
            return Ok(i);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("no replica leads after 60 s")
}

/// Kills the leader with SIGKILL (its own pid, reaped), measures, and starts it again.
/// `leased`: the nodes holding leases before the first kill (the fleet and the
/// fan-out's joiners).
async fn failover(
    ctls: &mut [Controller],
    fleet: &mut Fleet,
    pki: &Pki,
    n: usize,
    k: usize,
    leased: usize,
) -> Result<FailoverOutcome> {
    let leader = tokio::task::block_in_place(|| wait_leader(ctls, None))?;
    let survivor = (leader + 1) % ctls.len();
    let probe = probe_name(k);
    let cert = pki.node(&probe);
    let channel = twill::connect_one(
        &ctls[survivor].url(),
        twill::node_tls(&pki.ca_pem, &cert.cert_pem, &cert.key_pem),
    )
    .await?;
    let replicas = fleet.replicas.clone().context("a fleet on replicas")?;
    let moved = replicas
        .on
        .iter()
        .filter(|r| r.load(Ordering::Relaxed) == leader)
        .count();
    let resets0 = fleet.tracker.resets.load(Ordering::Relaxed);
    fleet.drain_resumed();
    let killed = Instant::now();
    ctls[leader].stop(Signal::SIGKILL);
    let grant = tokio::spawn(first_grant(channel, probe, n + k));
    let new_leader = tokio::task::block_in_place(|| wait_leader(ctls, Some(leader)))
        .map(|_| killed.elapsed().as_secs_f64())?;
    let resumed = fleet.collect_resumed(moved, killed, FAILOVER_LIMIT).await;
    // A probe that got no lease in time must not go on asking through the next kill.
    let stop_probe = grant.abort_handle();
    let first_grant_s = match tokio::time::timeout(FAILOVER_LIMIT, grant).await {
        Ok(Ok(at)) => at.duration_since(killed).as_secs_f64(),
        _ => {
            stop_probe.abort();
            f64::NAN
        }
    };
    // Resets arrive as the first message of a resumed stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resets = fleet.tracker.resets.load(Ordering::Relaxed) - resets0;
    tokio::task::block_in_place(|| ctls[leader].start_again())?;
    // The controllers' share counts every node holding a lease: the fan-out's joiners
    // (in `leased`) and the probes too.
    let (rebalanced_s, back) = rebalanced(&replicas, leased + k + 1, ctls.len(), leader).await;
    Ok(FailoverOutcome {
        nodes: n,
        moved,
        new_leader_s: new_leader,
        first_grant_s,
        resumed: resumed.len(),
        all_moved_s: if resumed.len() == moved {
            worst(resumed.iter().copied())
        } else {
            f64::NAN
        },
        resume_ms: Dist::of(resumed.iter().map(|s| s * 1e3).collect()),
        resets,
        rebalanced_s,
        back,
    })
}

/// Waits until none of `k` replicas holds more than its share of the `nodes` and the
/// slack the controllers allow (`twill_server::replica::rebalance::slack`): how long it
/// took (NaN: not within [`REBALANCE_LIMIT`]) and how many watches `restarted` holds
/// then.
async fn rebalanced(
    replicas: &twill::Replicas,
    nodes: usize,
    k: usize,
    restarted: usize,
) -> (f64, usize) {
    let started = Instant::now();
    let share = nodes.div_ceil(k);
    let slack = (share / 20).max(1);
    loop {
        let mut per = vec![0usize; k];
        for r in &replicas.on {
            per[r.load(Ordering::Relaxed).min(k - 1)] += 1;
        }
        if per.iter().all(|&c| c <= share + slack) {
            return (started.elapsed().as_secs_f64(), per[restarted]);
        }
        if started.elapsed() > REBALANCE_LIMIT {
            return (f64::NAN, per[restarted]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new node asks the surviving replica for a lease until it holds one; when.
async fn first_grant(channel: Channel, name: String, i: usize) -> Instant {
    let mut c = AgentServiceClient::new(channel);
    let req = twill::acquire_request(&name, i, false);
    loop {
        let mut call = tonic::Request::new(req.clone());
        call.set_timeout(PROBE_TIMEOUT);
        if c.acquire(call).await.is_ok() {
            return Instant::now();
        }
        tokio::time::sleep(PROBE_PAUSE).await;
    }
}
