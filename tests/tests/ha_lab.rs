//! End to end, high availability (issue 14): three controller hosts in network
//! namespaces, each running an etcd member and a `twill-controller --store etcd`, and
//! node hosts whose agents know all three replicas.
//!
//! * the overlay converges (every node has every peer's route, neighbour and FDB
//!   entry, and its subnet.env) and every host pings every other across VXLAN; exactly
//!   one replica leads, and every replica serves the same lease table;
//! * under a continuous ping between the hosts, the leader is SIGKILLed ten times in a
//!   row (and restarted each time, until it is a ready follower), with the replicas on
//!   `--leader-ttl 1s` and etcd electing within 500 ms: a new leader is ready
//!   within 5 s each time (every figure, the median and the worst are printed), no ping
//!   is lost, the agents that watched the dead replica resume their watch on another
//!   one, and etcd still holds the same three leases;
//! * an agent started right after the leader is killed gets its lease within 10 s;
//! * a pod on each node (the real twill-cni): the leader lists all three; once it is
//!   SIGKILLed the new leader lists all three again within seconds, those of agents
//!   that watched a surviving replica (and so never reconnected) included: every
//!   replica asks its agents for their pods when the leader changes.
//!
//! The tests take turns (one lab at a time): failover timings on a busy two-core
//! machine would measure the other tests.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use twill_tests::ha::{replica_host, Role, ETCD_PREFIX, REPLICAS};
use twill_tests::kit::skip;
use twill_tests::pods::{self, CNI_PATH};
use twill_tests::wait::poll_until;
use twill_tests::{
    require_etcd, require_lab, wait_until, Check, ContinuousPing, HaOverlay, Overlay,
    OverlayConfig, SubnetEnv,
};

/// Deadline for the overlay to converge (generous: the machine may be busy).
const CONVERGE: Duration = Duration::from_secs(60);
/// Deadline for one state change the test waits for.
const SETTLE: Duration = Duration::from_secs(30);
/// A new leader must be ready within this of the old one's death.
const FAILOVER_LIMIT: Duration = Duration::from_secs(5);
/// An agent that starts during a failover must hold a lease within this.
const JOIN_LIMIT: Duration = Duration::from_secs(10);
/// How many times the leader is killed in a row.
const KILLS: usize = 10;
/// Deadline for an agent to resume its watch on another replica after the kill: the
/// failover itself (about the election TTL, 2 s) and a retry on each other replica.
const RESUME: Duration = Duration::from_secs(10);

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> parking_lot::MutexGuard<'static, ()> {
    ONE_LAB_AT_A_TIME.lock()
}

/// Starts an HA overlay, or returns `None` after a loud skip (no etcd, not root).
fn start(test: &str, cfg: OverlayConfig) -> Option<HaOverlay> {
    if !require_etcd(test) {
        return None;
    }
    require_lab(test, HaOverlay::start(cfg))
}

fn run(ha: &HaOverlay, scenario: impl FnOnce(&HaOverlay) -> Result<()>) {
    // Panicking while `ha` is alive prints every host's state and every log.
    if let Err(e) = scenario(ha) {
        panic!("{e:#}");
    }
}

/// Every replica but `i`.
fn others(i: usize) -> Vec<usize> {
    (0..REPLICAS).filter(|r| *r != i).collect()
}

/// etcd holds exactly the leases of `envs`' nodes, each with its subnet.env's subnet.
fn etcd_holds(ha: &HaOverlay, envs: &BTreeMap<String, SubnetEnv>) -> Result<()> {
    let stored = ha.etcd_leases()?;
    let got: BTreeMap<&str, &str> = stored
        .iter()
        .map(|(n, l)| (n.as_str(), l.subnet.as_str()))
        .collect();
    let want: BTreeMap<&str, String> = envs
        .iter()
        .map(|(n, e)| (n.as_str(), e.subnet_net().to_string()))
        .collect();
    let want_ref: BTreeMap<&str, &str> = want.iter().map(|(n, s)| (*n, s.as_str())).collect();
    ensure!(
        got == want_ref,
        "etcd {ETCD_PREFIX}lease/ holds {got:?}, want {want_ref:?}"
    );
    Ok(())
}

/// Replica `i` serves exactly the leases of `envs` (AdminService.ListLeases).
fn replica_serves(ha: &HaOverlay, i: usize, envs: &BTreeMap<String, SubnetEnv>) -> Result<()> {
    let leases = ha.list_leases(i)?;
    let got: BTreeMap<String, String> = leases
        .into_iter()
        .map(|l| (l.node_name, l.subnet))
        .collect();
    let want: BTreeMap<String, String> = envs
        .iter()
        .map(|(n, e)| (n.clone(), e.subnet_net().to_string()))
        .collect();
    ensure!(
        got == want,
        "replica {i} serves leases {got:?}, want {want:?}"
    );
    Ok(())
}

fn node_names(ha: &HaOverlay) -> Vec<&str> {
    ha.overlay().nodes().iter().map(String::as_str).collect()
}

/// Whether `pid` lives in network namespace `netns` (same inode).
fn in_namespace(pid: u32, netns: &str) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let of_pid = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("pid {pid}"))?
        .ino();
    let named = std::fs::metadata(Path::new("/run/netns").join(netns))?.ino();
    Ok(of_pid == named)
}

/// The median and the worst of `v`.
fn median_and_worst(v: &[Duration]) -> (Duration, Duration) {
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    };
    (median, s[n - 1])
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

// ------------------------------------------------------------ 1. converge

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn three_replicas_on_etcd_converge_and_ping() {
    let _turn = turn();
    let Some(ha) = start("ha_lab", OverlayConfig::three_nodes()) else {
        return;
    };
    run(&ha, converge_scenario);
}

fn converge_scenario(ha: &HaOverlay) -> Result<()> {
    let t0 = Instant::now();
    let ov = ha.overlay();
    let lab = ha.lab();
    let nodes = node_names(ha);

    // etcd runs inside the controller hosts, as etcd's own processes.
    for i in 0..REPLICAS {
        let pid = ha.etcd().pid(i).context("etcd member not running")?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
        ensure!(
            comm.trim() == "etcd",
            "etcd member {i}: pid {pid} is {comm:?}"
        );
        let ns = &lab.host(&replica_host(i)).netns;
        ensure!(
            in_namespace(pid, ns)?,
            "etcd member {i} (pid {pid}) is not in {ns}"
        );
        ensure!(
            ha.etcd().endpoints()[i] == format!("https://{}:2379", lab.host(&replica_host(i)).ip),
            "etcd member {i} listens on {}",
            ha.etcd().endpoints()[i]
        );
    }

    // Exactly one leader: on /readyz, on twill_is_leader, and in Status' replica list.
    let leader = ha.wait_leader(SETTLE)?;
    for i in 0..REPLICAS {
        let want = i == leader;
        ensure!(
            (ha.role(i)? == Role::Leader) == want,
            "replica {i}: role {:?}",
            ha.role(i)?
        );
        ensure!(
            ha.is_leader_metric(i)? == want,
            "replica {i}: twill_is_leader is not {}",
            u8::from(want)
        );
    }
    let follower = others(leader)[0];
    let listed = wait_until_replicas_listed(ha, follower)?;
    let leaders: Vec<&str> = listed
        .iter()
        .filter(|r| r.leader)
        .map(|r| r.url.as_str())
        .collect();
    ensure!(
        leaders == [ha.replica_urls()[leader].as_str()],
        "replica {follower}'s Status lists leaders {leaders:?}, want replica {leader} ({})",
        ha.replica_urls()[leader]
    );

    // Every node: subnet.env, and a route, neighbour and FDB entry for every peer.
    let envs = ov.wait_converged(CONVERGE)?;
    for on in &nodes {
        for peer in nodes.iter().filter(|p| *p != on) {
            ov.wait_vxlan_entries(on, peer, &envs[*peer], SETTLE)?;
        }
    }
    let converged = t0.elapsed();

    // Every host pings every other host's flannel address across the overlay.
    for on in &nodes {
        for peer in nodes.iter().filter(|p| *p != on) {
            lab.ping(on, envs[*peer].flannel_addr())
                .with_context(|| format!("{on} -> {peer}"))?;
        }
    }

    // The same three leases in etcd and on every replica; every agent watches one.
    etcd_holds(ha, &envs)?;
    for i in 0..REPLICAS {
        wait_until_serves(ha, i, &envs)?;
    }
    let placed = ha.wait_watching(&nodes, &[0, 1, 2], SETTLE)?;
    eprintln!(
        "ha converge: replica {leader} leads; agents watch {placed:?}; converged {:.1?} after start, \
         all checks in {:.1?}",
        converged,
        t0.elapsed()
    );
    Ok(())
}

/// Status of replica `i` once it lists every replica (each registers under its etcd
/// lease when it campaigns).
fn wait_until_replicas_listed(ha: &HaOverlay, i: usize) -> Result<Vec<twill_proto::Replica>> {
    twill_tests::wait_until(
        SETTLE,
        &format!("replica {i} to list {REPLICAS} replicas"),
        || {
            let st = ha.status(i, false)?;
            let mut urls: Vec<&str> = st.replicas.iter().map(|r| r.url.as_str()).collect();
            urls.sort();
            let mut want: Vec<&str> = ha.replica_urls().iter().map(String::as_str).collect();
            want.sort();
            ensure!(urls == want, "lists {urls:?}");
            Ok(st.replicas)
        },
    )
}

fn wait_until_serves(ha: &HaOverlay, i: usize, envs: &BTreeMap<String, SubnetEnv>) -> Result<()> {
    twill_tests::wait_until(
        SETTLE,
        &format!("replica {i} to serve the lease table"),
        || replica_serves(ha, i, envs),
    )
}

// --------------------------------------------------- 2. kill the leader x10

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn leader_killed_ten_times_under_ping() {
    let _turn = turn();
    // The fast failover a deployment can choose: etcd electing within 500 ms grants
    // 1 s leases, and the replicas ask for them.
    let cfg = OverlayConfig::three_nodes()
        .etcd_election_timeout(Duration::from_millis(500))
        .controller_args(["--leader-ttl", "1s"]);
    let Some(ha) = start("ha_lab", cfg) else {
        return;
    };
    run(&ha, failover_scenario);
}

/// One ping per ordered pair around the ring a -> b -> c -> a, to the peer's flannel
/// address.
fn ring_pings(
    ha: &HaOverlay,
    envs: &BTreeMap<String, SubnetEnv>,
    nodes: &[&str],
) -> Result<Vec<(String, ContinuousPing)>> {
    let mut pings = Vec::new();
    for (k, from) in nodes.iter().enumerate() {
        let to = nodes[(k + 1) % nodes.len()];
        let dst: Ipv4Addr = envs[to].flannel_addr();
        ha.lab().ping(from, dst)?;
        pings.push((
            format!("{from} -> {to} ({dst})"),
            ContinuousPing::start(ha.lab(), from, dst)?,
        ));
    }
    Ok(pings)
}

fn failover_scenario(ha: &HaOverlay) -> Result<()> {
    let ov = ha.overlay();
    let nodes = node_names(ha);
    let envs = ov.wait_converged(CONVERGE)?;
    etcd_holds(ha, &envs)?;
    let mut pings = ring_pings(ha, &envs, &nodes)?;
    let started = Instant::now();

    let mut leader = ha.wait_leader(SETTLE)?;
    let mut figures = Vec::new();
    let mut moved_total = 0;
    for round in 1..=KILLS {
        let placed = ha.wait_watching(&nodes, &[0, 1, 2], SETTLE)?;
        let on_dead: Vec<&str> = nodes
            .iter()
            .copied()
            .filter(|n| placed[*n] == leader)
            .collect();
        let opens: Vec<usize> = on_dead.iter().map(|n| ha.watch_opens(n)).collect();
        let survivors = others(leader);

        let t0 = Instant::now();
        let pid = ha.kill_replica(leader)?;
        let new = ha
            .wait_leader_among(&survivors, SETTLE)
            .with_context(|| format!("round {round}: after killing replica {leader}"))?;
        let took = t0.elapsed();
        figures.push(took);

        // The dead replica's agents resumed their watch on a survivor.
        let now = ha
            .wait_watching(&nodes, &survivors, RESUME.saturating_sub(t0.elapsed()))
            .with_context(|| format!("round {round}: agents of dead replica {leader}"))?;
        let resumed = t0.elapsed();
        for (n, before) in on_dead.iter().zip(&opens) {
            let after = ha.watch_opens(n);
            ensure!(
                after > *before,
                "round {round}: {n}'s agent watched replica {leader}, is now on replica {} \
                 per the replicas, but its log says it opened its watch {after} times, as \
                 before the kill",
                now[*n]
            );
        }
        moved_total += on_dead.len();
        for (n, i) in &placed {
            if *i != leader {
                ensure!(
                    now[n] == *i,
                    "round {round}: {n} watched live replica {i} and moved to {}",
                    now[n]
                );
            }
        }
        // Same leases, same subnets, in etcd and as the new leader serves them.
        etcd_holds(ha, &envs).with_context(|| format!("round {round}"))?;
        replica_serves(ha, new, &envs).with_context(|| format!("round {round}"))?;

        // The killed replica comes back as a follower; the new leader stays.
        let t1 = Instant::now();
        ha.restart_replica(leader)?;
        let role = ha.wait_ready(leader, SETTLE)?;
        ensure!(
            role == Role::Follower,
            "round {round}: restarted replica {leader} is {role:?}"
        );
        eprintln!(
            "failover {round}/{KILLS}: replica {leader} (pid {pid}) SIGKILLed, replica {new} \
             ready (leader) after {} ms; its agents {on_dead:?} watched on {:?} by {} ms; \
             restarted, a ready follower after {} ms",
            ms(took),
            on_dead.iter().map(|n| now[*n]).collect::<Vec<_>>(),
            ms(resumed),
            ms(t1.elapsed())
        );
        let now_leads = ha.wait_leader(SETTLE)?;
        ensure!(
            now_leads == new,
            "round {round}: replica {new} led, now {now_leads} does"
        );
        for (what, p) in &mut pings {
            p.still_running(&format!("round {round}, ping {what}"))?;
        }
        leader = new;
    }
    // The ping covered the whole run; half a second more after the last restart.
    std::thread::sleep(Duration::from_millis(500));
    let elapsed = started.elapsed();
    let mut problems = Vec::new();
    let mut sent = 0;
    let mut lost = 0;
    for (what, p) in &mut pings {
        let report = p.finish()?;
        eprintln!("ping {what}: {report}");
        sent += report.transmitted;
        lost += report.lost.len();
        // 20 a second; at least half of that, so the ping surely ran throughout
        let min = elapsed.as_millis() as u64 / 100;
        problems.extend(
            report
                .problems(min, "the failovers")
                .into_iter()
                .map(|p| format!("{what}: {p}")),
        );
    }

    let (median, worst) = median_and_worst(&figures);
    let all: Vec<String> = figures.iter().map(|d| ms(*d).to_string()).collect();
    eprintln!(
        "failover: median {} ms, worst {} ms over {KILLS} (each: {} ms); {moved_total} agent \
         watches moved; {sent} pings, {lost} lost; {:.1?} in all",
        ms(median),
        ms(worst),
        all.join(", "),
        elapsed
    );
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    let slow: Vec<String> = figures
        .iter()
        .enumerate()
        .filter(|(_, d)| **d >= FAILOVER_LIMIT)
        .map(|(k, d)| format!("#{}: {} ms", k + 1, ms(*d)))
        .collect();
    ensure!(
        slow.is_empty(),
        "failovers slower than {FAILOVER_LIMIT:?}: {}",
        slow.join(", ")
    );
    ensure!(
        moved_total > 0,
        "no agent ever watched the leader that was killed: the watch move was never exercised"
    );
    Ok(())
}

// ------------------------------------------- 3. an agent joins mid-failover

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn agent_started_during_failover_gets_its_lease() {
    let _turn = turn();
    let cfg = OverlayConfig::new(["node-a", "node-b", "node-c", "node-d"]).start_agents(false);
    let Some(ha) = start("ha_lab", cfg) else {
        return;
    };
    run(&ha, join_scenario);
}

fn join_scenario(ha: &HaOverlay) -> Result<()> {
    let ov = ha.overlay();
    let first = ["node-a", "node-b", "node-c"];
    let late = "node-d";
    for n in first {
        ov.start_agent(n)?;
    }
    let envs = ov.wait_converged_among(&first, CONVERGE)?;
    etcd_holds(ha, &envs)?;
    let leader = ha.wait_leader(SETTLE)?;
    ensure!(
        !ov.subnet_file(late).exists(),
        "{late} has a subnet.env before its agent started"
    );

    let t0 = Instant::now();
    ha.kill_replica(leader)?;
    ov.start_agent(late)?;
    let started = t0.elapsed();
    let survivors = others(leader);
    // Both at once, every 25 ms: when a survivor reports ready (leader), and when the
    // newcomer's subnet.env appears.
    let mut elected: Option<(usize, Duration)> = None;
    let env = poll_until(
        JOIN_LIMIT * 3,
        Duration::from_millis(25),
        &format!("{late}'s agent to write subnet.env"),
        || {
            if !ov.agent_running(late) {
                return Check::Fatal(format!(
                    "{late}'s agent exited; its log ends:\n{}",
                    ha.lab().log_tail(&Overlay::agent_proc(late), 20)
                ));
            }
            if elected.is_none() {
                if let Some(i) = survivors
                    .iter()
                    .find(|i| ha.role(**i).is_ok_and(|r| r == Role::Leader))
                {
                    elected = Some((*i, t0.elapsed()));
                }
            }
            match ov.subnet_env(late) {
                Ok(e) => Check::Ready(e),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        },
    )?;
    let joined = t0.elapsed();
    let (new, failover) = match elected {
        Some(e) => e,
        None => (ha.wait_leader_among(&survivors, SETTLE)?, t0.elapsed()),
    };
    eprintln!(
        "join during failover: {late}'s agent started {} ms after replica {leader} was \
         SIGKILLed and held its lease ({}) {} ms after the kill; replica {new} was ready \
         (leader) {} ms after the kill",
        ms(started),
        env.subnet_net(),
        ms(joined),
        ms(failover)
    );
    if joined >= JOIN_LIMIT {
        // What the agent tried, and when: the reason is in its retries.
        let tries: Vec<String> = ha
            .lab()
            .log(&Overlay::agent_proc(late))
            .lines()
            .filter(|l| l.contains("moving to the next controller") || l.contains("retry_in"))
            .map(String::from)
            .collect();
        anyhow::bail!(
            "{late} got its lease {} ms after the kill ({} ms after the new leader was \
             ready), more than {JOIN_LIMIT:?}; its agent's attempts:\n{}",
            ms(joined),
            ms(joined.saturating_sub(failover)),
            tries.join("\n")
        );
    }

    // Everyone converges with the newcomer, whose lease is in etcd beside the others'.
    let all = ["node-a", "node-b", "node-c", late];
    let envs = ov.wait_converged_among(&all, CONVERGE)?;
    etcd_holds(ha, &envs)?;
    ha.restart_replica(leader)?;
    ensure!(ha.wait_ready(leader, SETTLE)? == Role::Follower);
    ha.wait_watching(&all, &[0, 1, 2], SETTLE)?;
    Ok(())
}

// --------------------------------------------------- 4. pods across a failover

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn a_new_leader_lists_every_pod_soon() {
    let test = "a_new_leader_lists_every_pod_soon";
    let _turn = turn();
    if !Path::new(CNI_PATH).join("bridge").is_file() {
        return skip(test, "needs containernetworking-plugins in /usr/lib/cni");
    }
    let mut cfg = OverlayConfig::three_nodes();
    for n in ["node-a", "node-b", "node-c"] {
        cfg = cfg.agent_args(n, ["--reconcile-interval", "1s"]);
    }
    let Some(ha) = start(test, cfg) else {
        return;
    };
    run(&ha, pods_scenario);
}

fn pods_scenario(ha: &HaOverlay) -> Result<()> {
    let ov = ha.overlay();
    let nodes = node_names(ha);
    ov.wait_converged(CONVERGE)?;
    let cni = ov.bins().path("twill-cni");
    let mut want = Vec::new();
    for n in &nodes {
        let (pod, _) = pods::attach(ov, &cni, n, &n[n.len() - 1..])?;
        want.push((pod.container_id, n.to_string(), pod.addr.to_string()));
    }
    want.sort();
    let listed = |i: usize| -> Check<()> {
        let pods = match ha.list_pods(i) {
            Ok(p) => p,
            Err(e) => return Check::NotYet(format!("{e:#}")),
        };
        let mut got: Vec<(String, String, String)> = pods
            .into_iter()
            .map(|p| {
                let ip = p.ips.first().cloned().unwrap_or_default();
                (p.container_id, p.node_name, ip)
            })
            .collect();
        got.sort();
        if got == want {
            Check::Ready(())
        } else {
            Check::NotYet(format!("listed {got:?}, want {want:?}"))
        }
    };
    let leader = ha.wait_leader(SETTLE)?;
    wait_until(SETTLE, "the leader to list every pod", || listed(leader))?;
    let placed = ha.wait_watching(&nodes, &[0, 1, 2], SETTLE)?;
    let stayed: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| placed[*n] != leader)
        .collect();

    ha.kill_replica(leader)?;
    let new = ha.wait_leader_among(&others(leader), SETTLE)?;
    let led = Instant::now();
    // Far less than the 5 minutes after which agents send their pods anyway.
    wait_until(
        Duration::from_secs(30),
        "the new leader to list every pod",
        || listed(new),
    )?;
    eprintln!(
        "pods: the new leader (replica {new}) listed all {} pods {} ms after it led; the \
         agents of {stayed:?} watched a surviving replica and did not reconnect",
        want.len(),
        led.elapsed().as_millis()
    );
    Ok(())
}
