//! twill-bench: Twill's controller measured side by side against flannel's etcd design
//! (one etcd watch per node), and the agent's data plane against `ip -batch`.
//!
//! `cargo run --release -p twill-bench -- <scenario> --nodes N` prints a markdown
//! table and writes the raw figures as JSON (default
//! target/bench-results/<scenario>-<N>.json). See BENCHMARKS.md.

mod charts;
mod cni;
mod coldstart;
mod dataplane;
mod etcd;
mod floors;
mod ha;
mod pki;
mod pods;
mod procstat;
mod report;
mod servers;
mod sim;
mod stats;
mod twill;
mod verdicts;
mod wire;

/// The load generator's thousands of connections receive large messages in bursts;
/// with glibc's allocator a fifth of its CPU went to faulting in fresh pages (perf).
/// Its cost is an artifact of running all nodes on one machine, so keep it small.
/// mimalloc is built without its transparent-huge-page hint (the workspace's `no_thp`):
/// with it each fresh page faulted in a zeroed 2 MiB huge page, 39 % of the load
/// generator's CPU in a 5,000-node storm (perf: `clear_page_erms` under
/// `do_huge_pmd_anonymous_page`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::procstat::{Meter, Usage};
use crate::stats::{median, median_dist, Dist};

/// Benchmarks of Twill against flannel's etcd mode, on this machine.
#[derive(Parser, Debug, Clone)]
#[command(name = "twill-bench", version)]
struct Opts {
    /// What to run.
    scenario: Scenario,
    /// Node counts, comma-separated (e.g. 100,1000,5000).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    nodes: Vec<usize>,
    /// Where to write the raw figures (JSON). Default:
    /// target/bench-results/<scenario>-<N>.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs per node count; medians are reported. Node counts of 5,000 and more run
    /// once unless --repeat-large is given.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// cni-add: ADDs timed of each mode (no report, agent up, agent down).
    #[arg(long, default_value_t = 100)]
    adds: usize,
    /// Runs per node count from 5,000 nodes up.
    #[arg(long, default_value_t = 1)]
    repeat_large: usize,
    /// Fan-out joins per run.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Join-storm deadline in seconds (after it: "not converged", with progress).
    #[arg(long, default_value_t = 120)]
    deadline: u64,
    /// Churn duration in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// How `reconnect` stops the controller.
    #[arg(long, value_enum, default_value = "term")]
    signal: StopSignal,
    /// Peer counts of the data-plane scenario.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    peers: Vec<usize>,
    /// `dataplane`: every peer dual-stack (an IPv4 and an IPv6 side, on flannel.1 and
    /// flannel-v6.1), against batches doing the same.
    #[arg(long)]
    dual_stack: bool,
    /// Which system(s) `join-storm` and `fanout` measure.
    #[arg(long, value_enum, default_value = "twill")]
    system: SystemChoice,
    /// `join-storm`, `fanout` (Twill only): networks every simulated node joins (1 to
    /// 6). Beyond the default one (10.0.0.0/8) the controller serves `net2`, `net3`, …
    /// (VXLAN VNI 2, 3, …; /12s of 100.64.0.0/10, then 172.16.0.0/12, cut into /26s)
    /// from its networks dir; each node holds a lease in every network (N × networks
    /// leases) and watches them all on one stream, and a storm converges when every
    /// node has seen every lease.
    #[arg(long, default_value_t = 1, value_parser = parse_networks)]
    networks: usize,
    /// `compare`: skip etcd.
    #[arg(long)]
    skip_etcd: bool,
    /// `compare`: skip the data-plane scenario.
    #[arg(long)]
    skip_dataplane: bool,
    /// `compare`: skip churn, reconnect, cold-start and the replicas (run at the
    /// largest N).
    #[arg(long)]
    skip_extras: bool,
    /// The twill-controller binary (default: next to this binary, else target/release,
    /// else target/debug).
    #[arg(long, env = "TWILL_BENCH_CONTROLLER")]
    controller_bin: Option<PathBuf>,
    /// `compare`: a twill-controller from before the changes being measured. At the
    /// largest N its join storms and cold starts alternate with this one's, its churn
    /// and its replicas on etcd run beside this one's, and the report sets the two
    /// side by side.
    #[arg(long, env = "TWILL_BENCH_PREVIOUS_CONTROLLER")]
    previous_controller: Option<PathBuf>,
    /// Also write the report as markdown to this file (e.g. BENCHMARKS.md).
    #[arg(long)]
    write_markdown: Option<PathBuf>,
    /// Also draw the join storm / fan-out rows against N as SVG charts, Twill beside
    /// etcd (join storm time, fan-out p99, server peak RSS), into this directory;
    /// `--charts` alone: bench/charts. Give several --nodes (e.g.
    /// 100,500,1000,2000,5000). With --write-markdown the document links them. Works
    /// with `report --from` too.
    #[arg(long, value_name = "DIR")]
    #[allow(clippy::option_option)]
    charts: Option<Option<PathBuf>>,
    /// `ha`, `compare`: leader crashes (SIGKILL) under the N connected nodes, in the
    /// last run of the replicas.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// `report`: the JSON results to render.
    #[arg(long)]
    from: Option<PathBuf>,
}

/// `--networks`: 1 to [`sim::MAX_NETWORKS`].
fn parse_networks(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(k) if (1..=sim::MAX_NETWORKS).contains(&k) => Ok(k),
        _ => Err(format!(
            "{s:?}: the bench has pools for 1 to {} networks",
            sim::MAX_NETWORKS
        )),
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// N nodes acquire leases at once and each watches; time until all saw all N.
    JoinStorm,
    /// N new nodes bootstrap their certificates with a token, then join; alternated
    /// with join storms of N nodes that hold certificates already.
    ColdStart,
    /// N watchers; one more node joins, 50 times; its request sent → delivery at each
    /// watcher; then the machine's floors at N (see `floors`).
    Fanout,
    /// 1% of nodes release and re-acquire per second.
    Churn,
    /// Restart the controller under N connected agents.
    Reconnect,
    /// The agent's reconcile over netlink vs ip/bridge -batch (needs root).
    Dataplane,
    /// 3 controller replicas on a 3-member etcd beside 1 controller on sled: join storm
    /// and fan-out at N with the nodes spread over the replicas, then --kills leader
    /// crashes under the N nodes (new leader, watches moved, first grant).
    Ha,
    /// join-storm + fanout for Twill and etcd side by side with the machine's floors,
    /// plus churn, reconnect, cold-start, the replicas (ha) and dataplane, and issue
    /// 28's goals against the floors; with --previous-controller, the changed
    /// scenarios before and after.
    Compare,
    /// A few seconds at N=50 (join-storm, fanout, churn, pods, reconnect, cold-start,
    /// ha with one crash when etcd is installed, dataplane P=100, cni-add with 3 ADDs):
    /// keeps the harness from rotting (run by `cargo test`).
    Smoke,
    /// N nodes each report 110 pods at once, then 100 pod changes a second for
    /// --duration: the controller's CPU and memory, report and ListPods latency.
    Pods,
    /// twill-cni's ADD with the real bridge and host-local plugins: with no report,
    /// reported to the agent's socket, and queued with the agent down (needs root).
    CniAdd,
    /// The machine's floors at N: a small write + fsync, a minimal mutual-TLS server
    /// broadcasting a one-lease watch message to N connections, N mutual-TLS
    /// handshakes, N P-256 signatures (fanout and compare measure them too).
    Floors,
    /// Render a results JSON (--from) as markdown.
    Report,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    Term,
    Kill,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum SystemChoice {
    Twill,
    Etcd,
    Both,
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Cores.
    pub cores: usize,
    /// Memory, GiB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// One run of one system at one N.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Run {
    /// Seconds to open the N mTLS connections (before time zero).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub connect_s: f64,
    /// Server CPU seconds spent opening them.
    #[serde(
        default = "crate::stats::nan",
        deserialize_with = "crate::stats::f64_or_nan"
    )]
    pub connect_cpu_s: f64,
    /// The join storm.
    pub storm: sim::StormOutcome,
    /// Server cost during the storm.
    pub storm_usage: Usage,
    /// Watch messages the controller sent in the storm (NaN for etcd).
    #[serde(
        default = "crate::stats::nan",
        deserialize_with = "crate::stats::f64_or_nan"
    )]
    pub storm_watch_messages: f64,
    /// The fan-out, when run.
    pub fanout: Option<sim::FanoutOutcome>,
    /// Server peak RSS over storm and fan-out, MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub peak_rss_mb: f64,
    /// Server RSS at the end (N leases, N watchers), MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub end_rss_mb: f64,
}

impl Run {
    /// A run from its parts; `end` is the server's usage at the end (storm and
    /// fan-out). The watch message count is filled in by the caller that knows it.
    fn measured(
        connect_s: f64,
        connect_cpu_s: f64,
        storm: sim::StormOutcome,
        storm_usage: Usage,
        fanout: Option<sim::FanoutOutcome>,
        end: &Usage,
    ) -> Run {
        Run {
            connect_s,
            connect_cpu_s,
            storm,
            storm_usage,
            storm_watch_messages: f64::NAN,
            fanout,
            peak_rss_mb: end.peak_rss_mb,
            end_rss_mb: end.rss_mb,
        }
    }
}

/// Logs one fan-out's figures.
fn log_fanout(label: &str, n: usize, f: &sim::FanoutOutcome) {
    eprintln!(
        "  {label} N={n}: fan-out from request send p50 {:.2} / p99 {:.2} / max {:.2} ms \
         (from the reply: p50 {:.2} / p99 {:.2}) ({} of {} deliveries)",
        f.from_send_ms.p50,
        f.from_send_ms.p99,
        f.from_send_ms.max,
        f.from_reply_ms.p50,
        f.from_reply_ms.p99,
        f.from_send_ms.count,
        f.expected
    );
}

/// Medians over the runs of one system at one N.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Runs.
    pub runs: usize,
    /// Runs whose storm converged before the deadline.
    pub converged_runs: usize,
    /// Storm convergence, s (median of converged runs; NaN if none).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub storm_s: f64,
    /// Nodes that saw all N leases (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub nodes_converged: f64,
    /// Nodes granted (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub nodes_granted: f64,
    /// Leases seen / N² (median).
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deliveries_fraction: f64,
    /// Grant latency from time zero, ms.
    pub grant_ms: Dist,
    /// Fan-out: the joiner's request sent → delivery at each watcher, ms (NaN in
    /// results from before this figure).
    #[serde(default = "crate::stats::nan_dist")]
    pub fanout_from_send_ms: Dist,
    /// Fan-out: the joiner's reply → delivery, ms (may be negative); the tables'
    /// figure before they started at the send (`fanout_ms` then).
    #[serde(alias = "fanout_ms")]
    pub fanout_from_reply_ms: Dist,
    /// Fan-out deliveries received / expected.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub fanout_delivered: f64,
    /// Server peak RSS, MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub peak_rss_mb: f64,
    /// Server RSS at the end, MB.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub end_rss_mb: f64,
    /// Server CPU seconds during the storm.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub storm_cpu_s: f64,
    /// Load-generator CPU seconds during the storm.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub client_cpu_s: f64,
    /// Deadline of the storm, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub deadline_s: f64,
    /// Seconds to open the N connections before time zero (median).
    #[serde(
        default = "crate::stats::nan",
        deserialize_with = "crate::stats::f64_or_nan"
    )]
    pub connect_s: f64,
    /// Server CPU seconds spent opening them (median).
    #[serde(
        default = "crate::stats::nan",
        deserialize_with = "crate::stats::f64_or_nan"
    )]
    pub connect_cpu_s: f64,
    /// Watch messages the controller sent in the storm (median).
    #[serde(
        default = "crate::stats::nan",
        deserialize_with = "crate::stats::f64_or_nan"
    )]
    pub storm_watch_messages: f64,
}

fn summarize(runs: &[Run]) -> Summary {
    let conv: Vec<&Run> = runs.iter().filter(|r| r.storm.converged).collect();
    let fan: Vec<&sim::FanoutOutcome> = runs.iter().filter_map(|r| r.fanout.as_ref()).collect();
    Summary {
        runs: runs.len(),
        converged_runs: conv.len(),
        storm_s: median(conv.iter().map(|r| r.storm.converge_s)),
        nodes_converged: median(runs.iter().map(|r| r.storm.nodes_converged as f64)),
        nodes_granted: median(runs.iter().map(|r| r.storm.nodes_granted as f64)),
        deliveries_fraction: median(runs.iter().map(|r| r.storm.deliveries_fraction)),
        grant_ms: median_dist(&runs.iter().map(|r| r.storm.grant_ms).collect::<Vec<_>>()),
        fanout_from_send_ms: median_dist(&fan.iter().map(|f| f.from_send_ms).collect::<Vec<_>>()),
        fanout_from_reply_ms: median_dist(&fan.iter().map(|f| f.from_reply_ms).collect::<Vec<_>>()),
        fanout_delivered: median(fan.iter().map(|f| {
            if f.expected == 0 {
                f64::NAN
            } else {
                f.from_send_ms.count as f64 / f.expected as f64
            }
        })),
        peak_rss_mb: median(runs.iter().map(|r| r.peak_rss_mb)),
        end_rss_mb: median(runs.iter().map(|r| r.end_rss_mb)),
        storm_cpu_s: median(runs.iter().map(|r| r.storm_usage.cpu_s)),
        client_cpu_s: median(runs.iter().map(|r| r.storm_usage.client_cpu_s)),
        deadline_s: runs.first().map_or(f64::NAN, |r| r.storm.deadline_s),
        connect_s: median(runs.iter().map(|r| r.connect_s)),
        connect_cpu_s: median(runs.iter().map(|r| r.connect_cpu_s)),
        storm_watch_messages: median(runs.iter().map(|r| r.storm_watch_messages)),
    }
}

/// One system at one N over its repeats.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SystemRuns {
    /// Every run.
    pub runs: Vec<Run>,
    /// Medians.
    pub median: Summary,
}

/// Both systems at one N.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    /// Nodes.
    pub nodes: usize,
    /// Networks each node joined (`--networks`): N × networks leases. Left out of the
    /// JSON when 1, as before there could be several.
    #[serde(default = "sim::one", skip_serializing_if = "sim::is_one")]
    pub networks: usize,
    /// Twill.
    pub twill: Option<SystemRuns>,
    /// flannel's etcd mode.
    pub etcd: Option<SystemRuns>,
}

/// Cold starts at one N, and join storms of nodes that hold certificates already,
/// run alternately in the same sitting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColdStartRow {
    /// Nodes.
    pub nodes: usize,
    /// Every cold start.
    pub runs: Vec<coldstart::ColdStartOutcome>,
    /// Their medians.
    pub median: coldstart::ColdStartSummary,
    /// The join storms.
    pub join_storm: SystemRuns,
}

/// Everything one invocation measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    /// The scenario.
    pub scenario: String,
    /// The command line.
    pub command: String,
    /// Unix time of the start.
    pub started_unix: u64,
    /// Wall time of the whole invocation, s.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub wall_s: f64,
    /// The machine.
    pub machine: Machine,
    /// The controller: version, build profile, git revision.
    pub controller: String,
    /// etcd's version.
    pub etcd_version: String,
    /// Join storm / fan-out rows.
    pub rows: Vec<Row>,
    /// Churn.
    pub churn: Option<twill::ChurnOutcome>,
    /// Reconnect.
    pub reconnect: Option<twill::ReconnectOutcome>,
    /// Cold start (results from before it existed have none).
    #[serde(default)]
    pub cold_start: Vec<ColdStartRow>,
    /// Replicas on etcd beside one controller on sled (results from before it
    /// existed have none).
    #[serde(default)]
    pub ha: Vec<ha::HaRow>,
    /// Data plane.
    pub dataplane: Vec<dataplane::DataplaneOutcome>,
    /// The machine's floors, per N (results from before they existed have none).
    #[serde(default)]
    pub floors: Vec<floors::Floors>,
    /// twill-cni's ADD with and without its report to the agent.
    #[serde(default)]
    pub cni: Option<cni::CniOutcome>,
    /// The pod view at N nodes.
    #[serde(default)]
    pub pods: Vec<pods::PodsOutcome>,
    /// `compare --previous-controller`: its figures of the same run.
    #[serde(default)]
    pub previous: Option<Previous>,
    /// Notes (skipped parts and why).
    pub notes: Vec<String>,
}

/// The previous controller's figures (`--previous-controller`), measured in the same
/// run as this one's at the largest N.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Previous {
    /// Its version, build profile and git revision.
    pub controller: String,
    /// Its cold starts and join storms, alternated run by run with this one's
    /// (`Results::cold_start`).
    pub cold_start: ColdStartRow,
    /// Its churn, right before this one's.
    pub churn: Option<twill::ChurnOutcome>,
    /// Its replicas on etcd beside it on sled, right before this one's.
    pub ha: Option<ha::HaRow>,
}

/// Leader crashes of the previous controller's replicas at most: without rebalancing
/// each waits the bench's whole limit for the restarted replica to fill again.
const PREVIOUS_KILLS: usize = 2;

const FANOUT_LIMIT: Duration = Duration::from_secs(120);

/// Twill at N: storm (+ fan-out) on a fresh controller.
async fn twill_run(
    bin: &Path,
    pki: &mut pki::Pki,
    n: usize,
    o: &Opts,
    fanout: bool,
) -> Result<Run> {
    let joiners = if fanout { o.rounds } else { 0 };
    ensure_certs(pki, n, joiners)?;
    let networks = servers::extra_networks(o.networks, n + joiners)?;
    let ctl = servers::Controller::start_with_networks(bin, pki, &networks)?;
    let urls = [ctl.url()];
    let measured = measure("twill", &[ctl.pid()], &[], n, o, fanout, || {
        twill::fleet_on(&urls, pki, n, joiners, o.networks)
    })
    .await?;
    let mut run = measured.run;
    run.storm_watch_messages = ctl.metric(servers::WATCH_MESSAGES).unwrap_or(f64::NAN);
    Ok(run)
}

/// A Twill run measured, with its fleet still connected.
struct Measured {
    run: Run,
    fleet: twill::Fleet,
    /// What the `others` processes used during the storm.
    others_storm: Usage,
}

/// Connects the fleet (`connect`) to the controller processes `pids`, then runs the
/// storm and, when `fanout`, the fan-out, metering the processes together (and the
/// `others`, e.g. the etcd members behind them, apart during the storm).
async fn measure<'a, F>(
    label: &str,
    pids: &[u32],
    others: &[u32],
    n: usize,
    o: &Opts,
    fanout: bool,
    connect: impl FnOnce() -> F,
) -> Result<Measured>
where
    F: std::future::Future<Output = Result<(twill::Fleet, f64)>> + 'a,
{
    let connecting = Meter::start_all(pids);
    let (mut fleet, connect_s) = connect().await?;
    let connect_cpu_s = connecting.read().cpu_s;
    let meter = Meter::start_all(pids);
    let others_meter = Meter::start_all(others);
    let storm = fleet.storm(Duration::from_secs(o.deadline)).await;
    let storm_usage = meter.read();
    let others_storm = others_meter.read();
    eprintln!(
        "  {label} N={n}: storm {} (grant p99 {:.1} ms), server {:.1} s CPU, peak {:.0} MB",
        if storm.converged {
            format!("{:.2} s", storm.converge_s)
        } else {
            format!("NOT converged after {} s", o.deadline)
        },
        storm.grant_ms.p99,
        storm_usage.cpu_s,
        storm_usage.peak_rss_mb
    );
    let fan = if fanout && storm.converged {
        let f = fleet.fanout(o.rounds).await;
        log_fanout(label, n, &f);
        Some(f)
    } else {
        None
    };
    Ok(Measured {
        run: Run::measured(
            connect_s,
            connect_cpu_s,
            storm,
            storm_usage,
            fan,
            &meter.read(),
        ),
        fleet,
        others_storm,
    })
}

/// etcd at N: storm (+ fan-out) on a fresh etcd.
async fn etcd_run(bin: &Path, pki: &mut pki::Pki, n: usize, o: &Opts, fanout: bool) -> Result<Run> {
    let joiners = if fanout { o.rounds } else { 0 };
    ensure_certs(pki, n, joiners)?;
    let mut etcd = servers::Etcd::start(bin, pki)?;
    if let Err(e) = etcd::wait_ready(&etcd.url(), pki, Duration::from_secs(30)).await {
        bail!("{e}:\n{}", etcd.log_tail(20));
    }
    let connecting = Meter::start(etcd.pid());
    let (mut fleet, connect_s) = etcd::fleet(&etcd.url(), pki, n, joiners).await?;
    let connect_cpu_s = connecting.read().cpu_s;
    let meter = Meter::start(etcd.pid());
    let storm = fleet.storm(Duration::from_secs(o.deadline)).await;
    let storm_usage = meter.read();
    eprintln!(
        "  etcd  N={n}: storm {} (grant p99 {:.1} ms, {} failed writes), server {:.1} s CPU, peak {:.0} MB",
        if storm.converged {
            format!("{:.2} s", storm.converge_s)
        } else {
            format!(
                "NOT converged after {} s: {}/{n} granted, {}/{n} saw all, {:.1}% of deliveries",
                o.deadline,
                storm.nodes_granted,
                storm.nodes_converged,
                storm.deliveries_fraction * 100.0
            )
        },
        storm.grant_ms.p99,
        storm.grant_errors,
        storm_usage.cpu_s,
        storm_usage.peak_rss_mb
    );
    let fan = if fanout && etcd.alive() {
        let f = fleet.fanout(o.rounds, FANOUT_LIMIT).await;
        log_fanout("etcd ", n, &f);
        Some(f)
    } else {
        None
    };
    let end = meter.read();
    drop(fleet);
    Ok(Run::measured(
        connect_s,
        connect_cpu_s,
        storm,
        storm_usage,
        fan,
        &end,
    ))
}

/// ` on K networks (L leases)` after N in the log with `--networks` K > 1, else nothing.
fn on_networks(o: &Opts, n: usize) -> String {
    if o.networks > 1 {
        format!(" on {} networks ({} leases)", o.networks, n * o.networks)
    } else {
        String::new()
    }
}

fn ensure_certs(pki: &mut pki::Pki, n: usize, joiners: usize) -> Result<()> {
    let names: Vec<String> = (0..n)
        .map(sim::node_name)
        .chain((0..joiners).map(sim::joiner_name))
        .collect();
    let started = Instant::now();
    pki.ensure_nodes(&names)?;
    if started.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "  issued certificates in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn repeats(o: &Opts, n: usize) -> usize {
    if n >= 5000 {
        o.repeat_large.max(1)
    } else {
        o.repeat.max(1)
    }
}

async fn rows(
    o: &Opts,
    pki: &mut pki::Pki,
    ctl_bin: &Path,
    etcd_bin: Option<&Path>,
    twill_on: bool,
    fanout: bool,
) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for &n in &o.nodes {
        let mut row = Row {
            nodes: n,
            networks: o.networks,
            ..Default::default()
        };
        let k = repeats(o, n);
        if twill_on {
            let mut runs = Vec::new();
            for r in 0..k {
                eprintln!("twill N={n}{} run {}/{k}", on_networks(o, n), r + 1);
                runs.push(twill_run(ctl_bin, pki, n, o, fanout).await?);
            }
            row.twill = Some(SystemRuns {
                median: summarize(&runs),
                runs,
            });
        }
        if let Some(bin) = etcd_bin {
            let mut runs = Vec::new();
            for r in 0..k {
                eprintln!("etcd N={n} run {}/{k}", r + 1);
                runs.push(etcd_run(bin, pki, n, o, fanout).await?);
            }
            row.etcd = Some(SystemRuns {
                median: summarize(&runs),
                runs,
            });
        }
        out.push(row);
    }
    Ok(out)
}

/// The pod view at `n` nodes (see `pods`).
async fn pods_run(o: &Opts, pki: &mut pki::Pki, bin: &Path, n: usize) -> Result<pods::PodsOutcome> {
    ensure_certs(pki, n, 0)?;
    let ctl = servers::Controller::start(bin, pki)?;
    let (mut fleet, _) = twill::fleet(&[ctl.url()], pki, n, 0).await?;
    let storm = fleet.storm(Duration::from_secs(o.deadline)).await;
    if !storm.converged {
        bail!("pods setup: the join storm of {n} did not converge");
    }
    let admin = twill::connect_one(
        &ctl.url(),
        twill::node_tls(&pki.ca_pem, &pki.admin.cert_pem, &pki.admin.key_pem),
    )
    .await?;
    let p = pods::run(
        fleet.clients(),
        admin,
        ctl.pid(),
        100,
        Duration::from_secs(o.duration),
    )
    .await?;
    eprintln!(
        "pods N={n}: {} pods reported in {:.2} s (report p50 {:.1} / p99 {:.1} ms, controller {:.1} s CPU, RSS {:.0} -> {:.0} MB); ListPods one node p50 {:.2} ms, all {} pods p50 {:.0} ms; {}/s changes: report p50 {:.2} / p99 {:.2} ms, controller {:.1} s CPU over {:.0} s",
        p.pods, p.report_all_s, p.report_ms.p50, p.report_ms.p99, p.report_usage.cpu_s,
        p.rss_before_mb, p.rss_after_mb, p.list_one_ms.p50, p.listed, p.list_all_ms.p50,
        p.churn_per_s, p.churn_ms.p50, p.churn_ms.p99, p.churn_usage.cpu_s, p.churn_s
    );
    Ok(p)
}

async fn churn(o: &Opts, pki: &mut pki::Pki, bin: &Path, n: usize) -> Result<twill::ChurnOutcome> {
    ensure_certs(pki, n, 0)?;
    let ctl = servers::Controller::start(bin, pki)?;
    let (mut fleet, _) = twill::fleet(&[ctl.url()], pki, n, 0).await?;
    let storm = fleet.storm(Duration::from_secs(o.deadline)).await;
    if !storm.converged {
        bail!("churn setup: the join storm of {n} did not converge");
    }
    eprintln!(
        "churn N={n}: {} s, {} nodes/s",
        o.duration,
        (n / 100).max(1)
    );
    let meter = Meter::start(ctl.pid());
    let mut c = fleet.churn(Duration::from_secs(o.duration)).await;
    c.server = meter.read();
    eprintln!(
        "  churn: delivery p50 {:.2} / p99 {:.2} / max {:.2} ms, controller {:.1} s CPU over {:.0} s",
        c.delivery_ms.p50, c.delivery_ms.p99, c.delivery_ms.max, c.server.cpu_s, c.duration_s
    );
    Ok(c)
}

async fn reconnect(
    o: &Opts,
    pki: &mut pki::Pki,
    bin: &Path,
    n: usize,
) -> Result<twill::ReconnectOutcome> {
    ensure_certs(pki, n, 0)?;
    let mut ctl = servers::Controller::start(bin, pki)?;
    let (mut fleet, _) = twill::fleet(&[ctl.url()], pki, n, 0).await?;
    let storm = fleet.storm(Duration::from_secs(o.deadline)).await;
    if !storm.converged {
        bail!("reconnect setup: the join storm of {n} did not converge");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sig, name) = match o.signal {
        StopSignal::Term => (Signal::SIGTERM, "SIGTERM"),
        StopSignal::Kill => (Signal::SIGKILL, "SIGKILL"),
    };
    eprintln!("reconnect N={n}: {name} the controller, start it again");
    let r = fleet
        .reconnect(
            || {
                let escalated = ctl.stop(sig);
                ctl.start_again()?;
                Ok(escalated)
            },
            name,
        )
        .await?;
    eprintln!(
        "  reconnect: restart {:.2} s, all {} resumed after {:.2} s, {} resets",
        r.restart_s, r.resumed, r.all_resumed_s, r.resets
    );
    Ok(r)
}

/// One cold start of N nodes on a fresh controller that signs node certificates.
async fn cold_run(
    bin: &Path,
    pki: &pki::Pki,
    n: usize,
    o: &Opts,
) -> Result<coldstart::ColdStartOutcome> {
    let ctl = servers::Controller::start_issuing(bin, pki)?;
    let token = coldstart::create_token(&ctl.url(), pki).await?;
    let started = Instant::now();
    let prepared = coldstart::prepare(n)?;
    let prepare_s = started.elapsed().as_secs_f64();
    let meter = Meter::start(ctl.pid());
    let mut c = coldstart::run(
        &ctl.url(),
        &pki.ca_pem,
        &token,
        prepared,
        Duration::from_secs(o.deadline),
    )
    .await;
    c.usage = meter.read();
    c.prepare_s = prepare_s;
    c.watch_messages = ctl.metric(servers::WATCH_MESSAGES).unwrap_or(f64::NAN);
    eprintln!(
        "  cold start N={n}: {} (bootstrap p50 {:.1} / p99 {:.1} ms, join p99 {:.1} ms), server {:.1} s CPU, peak {:.0} MB",
        if c.converged {
            format!("all granted after {:.2} s, all saw all after {:.2} s", c.all_granted_s, c.converge_s)
        } else {
            format!(
                "NOT done after {} s: {}/{n} bootstrapped, {}/{n} granted, {}/{n} saw all",
                o.deadline, c.nodes_bootstrapped, c.nodes_granted, c.nodes_converged
            )
        },
        c.bootstrap_ms.p50,
        c.bootstrap_ms.p99,
        c.join_ms.p99,
        c.usage.cpu_s,
        c.usage.peak_rss_mb
    );
    if let Some(why) = &c.first_failure {
        eprintln!(
            "  cold start: {} node(s) gave up, first: {why}\n{}",
            c.failed_nodes,
            ctl.log_tail(10)
        );
    }
    Ok(c)
}

/// Cold starts at N, each after a join storm of N nodes that hold certificates (on a
/// controller without a signing CA, as the join-storm scenario runs): alternating, so
/// that the machine's drift over the sitting falls on both alike.
async fn cold_start_row(
    o: &Opts,
    pki: &mut pki::Pki,
    bin: &Path,
    n: usize,
) -> Result<ColdStartRow> {
    let mut rows = cold_start_rows(o, pki, &[bin], n).await?;
    Ok(rows.remove(0))
}

/// [`cold_start_row`] for each of `bins`, alternated run by run: one row each.
async fn cold_start_rows(
    o: &Opts,
    pki: &mut pki::Pki,
    bins: &[&Path],
    n: usize,
) -> Result<Vec<ColdStartRow>> {
    let k = repeats(o, n);
    let mut runs: Vec<(Vec<Run>, Vec<coldstart::ColdStartOutcome>)> =
        bins.iter().map(|_| Default::default()).collect();
    for r in 0..k {
        for (bin, (warm, cold)) in bins.iter().zip(&mut runs) {
            let which = if bins.len() > 1 {
                format!(" ({})", bin.display())
            } else {
                String::new()
            };
            eprintln!(
                "join storm N={n} run {}/{k}{which} (certificates held)",
                r + 1
            );
            warm.push(twill_run(bin, pki, n, o, false).await?);
            eprintln!("cold start N={n} run {}/{k}{which}", r + 1);
            cold.push(cold_run(bin, pki, n, o).await?);
        }
    }
    Ok(runs
        .into_iter()
        .map(|(warm, cold)| ColdStartRow {
            nodes: n,
            median: coldstart::summarize(&cold),
            runs: cold,
            join_storm: SystemRuns {
                median: summarize(&warm),
                runs: warm,
            },
        })
        .collect())
}

/// `compare`'s scenarios at the largest N beside the join storm and fan-out: cold
/// start, churn, reconnect, and the replicas on etcd with leader crashes when etcd is
/// there; with `--previous-controller` also its cold start (alternated), churn and
/// replicas.
async fn extras(
    o: &Opts,
    pki: &mut pki::Pki,
    bin: &Path,
    etcd_bin: Option<&Path>,
    n: usize,
    res: &mut Results,
) -> Result<()> {
    let previous = o
        .previous_controller
        .as_deref()
        .map(|p| servers::find_controller(Some(p)))
        .transpose()?;
    let mut bins = vec![bin];
    bins.extend(previous.as_deref());
    let mut rows = cold_start_rows(o, pki, &bins, n).await?.into_iter();
    res.cold_start = rows.next().into_iter().collect();
    let mut before = match &previous {
        Some(p) => Some(Previous {
            controller: servers::describe_controller(p),
            cold_start: rows
                .next()
                .context("the previous controller's cold start")?,
            churn: Some(churn(o, pki, p, n).await?),
            ..Default::default()
        }),
        None => None,
    };
    res.churn = Some(churn(o, pki, bin, n).await?);
    res.reconnect = Some(reconnect(o, pki, bin, n).await?);
    if let Some(etcd) = etcd_bin {
        if let (Some(p), Some(b)) = (&previous, &mut before) {
            b.ha = Some(ha::row(o, pki, p, etcd, n, o.kills.min(PREVIOUS_KILLS)).await?);
        }
        res.ha = vec![ha::row(o, pki, bin, etcd, n, o.kills).await?];
    }
    res.previous = before;
    Ok(())
}

fn dataplane_runs(o: &Opts, peers: &[usize], dual: bool, res: &mut Results) {
    if let Err(why) = dataplane::available() {
        eprintln!("SKIPPED dataplane: {why}");
        res.notes.push(format!("dataplane skipped: {why}"));
        return;
    }
    for &p in peers {
        let k = o.repeat.max(1);
        eprintln!("dataplane P={p} ({k} runs)");
        match dataplane::run(p, k, dual) {
            Ok(d) => {
                eprintln!(
                    "  twill {:.1} ms full, {:.2} ms one change; ip/bridge -batch {:.1} ms full, {:.2} ms one change",
                    d.twill_full_ms, d.twill_change_ms, d.batch_full_ms, d.batch_change_ms
                );
                res.dataplane.push(d);
            }
            Err(e) => {
                eprintln!("dataplane P={p} failed: {e:#}");
                res.notes.push(format!("dataplane P={p} failed: {e:#}"));
            }
        }
    }
}

/// twill-cni's ADD, `adds` of each mode, when it can run here; skipped with a note.
async fn cni_run(adds: usize, res: &mut Results) {
    let plugin = match cni::available()
        .map_err(anyhow::Error::msg)
        .and_then(|()| cni::find_plugin())
    {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED cni-add: {why:#}");
            res.notes.push(format!("cni-add skipped: {why:#}"));
            return;
        }
    };
    eprintln!("cni-add: {adds} ADDs of each mode ({})", plugin.display());
    match cni::run(&plugin, adds).await {
        Ok(c) => {
            eprintln!(
                "  ADD p50: no report {:.2} ms, agent up {:.2} ms, agent down (queued) {:.2} ms; the report alone p50/p99: {:.3}/{:.3} ms up, {:.3}/{:.3} ms queued",
                c.no_report.p50, c.agent_up.p50, c.agent_down.p50,
                c.report_up.p50, c.report_up.p99, c.report_down.p50, c.report_down.p99
            );
            res.cni = Some(c);
        }
        Err(e) => {
            eprintln!("cni-add failed: {e:#}");
            res.notes.push(format!("cni-add failed: {e:#}"));
        }
    }
}

async fn run(mut o: Opts) -> Result<Results> {
    let started = Instant::now();
    let mut res = Results {
        scenario: format!("{:?}", o.scenario),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: machine(),
        ..Default::default()
    };
    if o.networks > 1 {
        if !matches!(o.scenario, Scenario::JoinStorm | Scenario::Fanout) {
            bail!(
                "--networks {} applies to join-storm and fanout only",
                o.networks
            );
        }
        if o.system != SystemChoice::Twill {
            bail!(
                "--networks {} applies to Twill only (flannel's etcd mode is simulated on one network): use --system twill",
                o.networks
            );
        }
        let joiners = if o.scenario == Scenario::Fanout {
            o.rounds
        } else {
            0
        };
        // Refuse pools too small before anything starts.
        servers::extra_networks(o.networks, max_n_of(&o) + joiners)?;
        res.notes.push(format!(
            "every node joined {} networks ({}): a lease in each, one watch stream for all",
            o.networks,
            (0..o.networks)
                .map(sim::network_name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let nofile = procstat::raise_nofile();
    let max_n = o.nodes.iter().copied().max().unwrap_or(0);
    if (nofile as usize) < 2 * max_n + 256 && o.scenario != Scenario::Dataplane {
        eprintln!("warning: open-file limit {nofile} is low for {max_n} nodes");
    }
    if o.scenario == Scenario::Dataplane {
        dataplane_runs(&o, &o.peers.clone(), o.dual_stack, &mut res);
        res.wall_s = started.elapsed().as_secs_f64();
        return Ok(res);
    }
    if o.scenario == Scenario::CniAdd {
        cni_run(o.adds, &mut res).await;
        res.wall_s = started.elapsed().as_secs_f64();
        return Ok(res);
    }
    if o.scenario == Scenario::Floors {
        let mut pki = pki::Pki::new()?;
        for &n in &o.nodes {
            res.floors.push(floors::measure(&mut pki, n).await?);
        }
        res.wall_s = started.elapsed().as_secs_f64();
        return Ok(res);
    }
    let ctl_bin = servers::find_controller(o.controller_bin.as_deref())?;
    res.controller = servers::describe_controller(&ctl_bin);
    if servers::profile_of(&ctl_bin) != "release" && o.scenario != Scenario::Smoke {
        eprintln!(
            "warning: {} is not a release build; for real figures run `cargo build --release -p twill-server`",
            ctl_bin.display()
        );
    }
    let mut pki = pki::Pki::new()?;
    let want_etcd = match o.scenario {
        Scenario::Compare => !o.skip_etcd,
        Scenario::JoinStorm | Scenario::Fanout => o.system != SystemChoice::Twill,
        Scenario::Ha | Scenario::Smoke => true,
        _ => false,
    };
    let etcd_bin = if want_etcd {
        match servers::find_etcd() {
            Some(b) => {
                res.etcd_version = servers::etcd_version(&b);
                Some(b)
            }
            None => {
                let why = "etcd not found: run scripts/bench-setup.sh (Debian's etcd-server)";
                eprintln!("SKIPPED etcd: {why}");
                res.notes.push(why.into());
                None
            }
        }
    } else {
        None
    };
    let twill_on = !(matches!(o.scenario, Scenario::JoinStorm | Scenario::Fanout)
        && o.system == SystemChoice::Etcd);
    match o.scenario {
        Scenario::JoinStorm => {
            res.rows = rows(&o, &mut pki, &ctl_bin, etcd_bin.as_deref(), twill_on, false).await?;
        }
        Scenario::Fanout | Scenario::Compare => {
            res.rows = rows(&o, &mut pki, &ctl_bin, etcd_bin.as_deref(), twill_on, true).await?;
            for &n in &o.nodes {
                res.floors.push(floors::measure(&mut pki, n).await?);
            }
            if o.scenario == Scenario::Compare && !o.skip_extras {
                extras(&o, &mut pki, &ctl_bin, etcd_bin.as_deref(), max_n, &mut res).await?;
            }
            if o.scenario == Scenario::Compare && !o.skip_dataplane {
                dataplane_runs(&o, &o.peers.clone(), o.dual_stack, &mut res);
            }
        }
        Scenario::ColdStart => {
            for &n in &o.nodes {
                res.cold_start
                    .push(cold_start_row(&o, &mut pki, &ctl_bin, n).await?);
            }
        }
        Scenario::Pods => {
            for &n in &o.nodes {
                res.pods.push(pods_run(&o, &mut pki, &ctl_bin, n).await?);
            }
        }
        Scenario::Churn => {
            for &n in &o.nodes {
                res.churn = Some(churn(&o, &mut pki, &ctl_bin, n).await?);
            }
        }
        Scenario::Ha => {
            let bin = etcd_bin.as_deref().context("the ha scenario needs etcd")?;
            for &n in &o.nodes {
                res.ha
                    .push(ha::row(&o, &mut pki, &ctl_bin, bin, n, o.kills).await?);
            }
        }
        Scenario::Reconnect => {
            for &n in &o.nodes {
                res.reconnect = Some(reconnect(&o, &mut pki, &ctl_bin, n).await?);
            }
        }
        Scenario::Smoke => {
            o.nodes = vec![50];
            o.repeat = 1;
            o.rounds = 5;
            res.rows = rows(&o, &mut pki, &ctl_bin, None, true, true).await?;
            let row = &res.rows[0];
            let t = &row.twill.as_ref().context("twill ran")?.runs[0];
            if !t.storm.converged {
                bail!(
                    "smoke: the join storm of 50 did not converge within {} s",
                    o.deadline
                );
            }
            let f = t.fanout.as_ref().context("fan-out ran")?;
            if f.from_send_ms.count != f.expected {
                bail!(
                    "smoke: fan-out delivered {} of {}",
                    f.from_send_ms.count,
                    f.expected
                );
            }
            o.duration = 2;
            res.churn = Some(churn(&o, &mut pki, &ctl_bin, 50).await?);
            let p = pods_run(&o, &mut pki, &ctl_bin, 50).await?;
            if p.listed != p.pods {
                bail!("smoke: ListPods gave {} of {} pods", p.listed, p.pods);
            }
            res.pods = vec![p];
            res.reconnect = Some(reconnect(&o, &mut pki, &ctl_bin, 50).await?);
            let cold = cold_start_row(&o, &mut pki, &ctl_bin, 50).await?;
            if !cold.runs.iter().all(|c| c.converged) {
                bail!(
                    "smoke: the cold start of 50 did not finish within {} s",
                    o.deadline
                );
            }
            res.cold_start = vec![cold];
            if let Some(bin) = etcd_bin.as_deref() {
                let row = ha::row(&o, &mut pki, &ctl_bin, bin, 50, 1).await?;
                let f = row.failovers.first().context("smoke: no failover ran")?;
                if f.resumed != f.moved || !f.first_grant_s.is_finite() {
                    bail!("smoke: after the leader's crash {} of {} watches moved, first grant {:?} s", f.resumed, f.moved, f.first_grant_s);
                }
                if !f.rebalanced_s.is_finite() {
                    bail!("smoke: the restarted replica did not get its share of the watches back ({} of 50)", f.back);
                }
                res.ha = vec![row];
            }
            dataplane_runs(&o, &[100], false, &mut res);
            dataplane_runs(&o, &[100], true, &mut res);
            cni_run(3, &mut res).await;
            if res.reconnect.as_ref().is_some_and(|r| r.resumed != 50) {
                bail!("smoke: not every watcher resumed after the restart");
            }
            let floors = floors::measure(&mut pki, 50).await?;
            if floors.broadcast_ms.count != (50 * floors.rounds) as u64 {
                bail!(
                    "smoke: the broadcast floor delivered {} of {}",
                    floors.broadcast_ms.count,
                    50 * floors.rounds
                );
            }
            if !(floors.conn_kb.is_finite() && floors.storm_transfer_s > 0.0) {
                bail!("smoke: the server process floor measured nothing: {floors:?}");
            }
            res.floors = vec![floors];
        }
        Scenario::Dataplane | Scenario::Floors | Scenario::CniAdd | Scenario::Report => {
            unreachable!()
        }
    }
    res.wall_s = started.elapsed().as_secs_f64();
    Ok(res)
}

fn max_n_of(o: &Opts) -> usize {
    o.nodes.iter().copied().max().unwrap_or(0)
}

fn default_out(o: &Opts) -> PathBuf {
    let n = o
        .nodes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join("_");
    let scenario = format!("{:?}", o.scenario).to_lowercase();
    let name = match o.scenario {
        Scenario::Dataplane => format!(
            "dataplane-{}.json",
            o.peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("_")
        ),
        Scenario::Smoke => "smoke.json".into(),
        _ => format!(
            "{}-{n}{}.json",
            match o.scenario {
                Scenario::JoinStorm => "join-storm".to_string(),
                Scenario::ColdStart => "cold-start".to_string(),
                Scenario::Ha => "ha".to_string(),
                _ => scenario,
            },
            if o.networks > 1 {
                format!("-{}networks", o.networks)
            } else {
                String::new()
            }
        ),
    };
    target_dir().join("bench-results").join(name)
}

/// The workspace's target dir: CARGO_TARGET_DIR, else the ancestor of this binary
/// named `target`, else ./target.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| {
            e.ancestors()
                .find(|a| a.file_name().is_some_and(|n| n == "target"))
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn main() -> Result<()> {
    if let Some(dir) = std::env::var_os(floors::SERVE_ENV) {
        return floors::serve_process(std::path::Path::new(&dir));
    }
    let o = Opts::parse();
    if o.scenario == Scenario::Report {
        let from = o.from.clone().context("report needs --from results.json")?;
        let res: Results = serde_json::from_str(&std::fs::read_to_string(&from)?)
            .with_context(|| format!("reading {}", from.display()))?;
        let md = report::markdown(&res);
        print_report(&md)?;
        write_outputs(&o, &res)?;
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(run(o.clone()))?;
    rt.shutdown_timeout(Duration::from_secs(2));
    let out = o.out.clone().unwrap_or_else(|| default_out(&o));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&res)?)?;
    print_report(&report::markdown(&res))?;
    eprintln!("raw figures: {}", out.display());
    write_outputs(&o, &res)
}

/// Prints the report on stdout; a reader that stops early (`| head`) is not an error.
fn print_report(md: &str) -> Result<()> {
    use std::io::Write as _;
    match writeln!(std::io::stdout(), "{md}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Where `--charts` alone puts the charts (relative to the current directory: the
/// repository's root in BENCHMARKS.md's commands).
const DEFAULT_CHARTS: &str = "bench/charts";

/// The charts (--charts) and the document (--write-markdown), which links the charts.
fn write_outputs(o: &Opts, res: &Results) -> Result<()> {
    let charts = match &o.charts {
        Some(dir) => {
            let dir = dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CHARTS));
            let charts = charts::write(res, &dir)?;
            for c in &charts {
                eprintln!("chart: {}", c.path.display());
            }
            if charts.is_empty() {
                eprintln!("no charts: no join storm / fan-out rows, cold starts or failovers");
            }
            charts
        }
        None => Vec::new(),
    };
    if let Some(path) = &o.write_markdown {
        let doc_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let links: Vec<report::ChartLink> = charts
            .iter()
            .map(|c| report::ChartLink {
                title: c.title.clone(),
                link: charts::relative(&doc_dir, &c.path),
            })
            .collect();
        std::fs::write(path, report::document(res, &links))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
