//! Controllers on etcd starting and stopping (issue 28). Real etcd on 127.0.0.1
//! (`tests/src/etcd.rs`), the real controller binary, signals sent to the controller's
//! own process.
//!
//! 1. `a_controller_started_before_etcd_waits_for_it_and_then_serves`: started while
//!    etcd does not answer, a controller waits, saying so in its log, instead of
//!    exiting; once etcd answers it becomes ready; SIGTERM while it waits ends it at
//!    once with a clean exit.
//! 2. `a_leader_stopped_with_sigterm_hands_over_without_waiting_for_its_lease`: a leader
//!    that stops resigns and revokes its etcd lease on the way out, so the other
//!    replica leads without waiting for the lease's TTL (the time from SIGTERM to the
//!    new leader is printed).
//! 3. `a_replica_that_comes_back_gets_its_share_of_the_agents`: nodes that joined
//!    while one of two replicas was down all watch the other; once it is back, the
//!    busy one ends the watches beyond its share (UNAVAILABLE, with the trailer that
//!    tells an agent to resume elsewhere), they resume on the one that came back, and
//!    then nothing moves any more.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tonic::transport::Channel;
use twill_proto::agent_service_client::AgentServiceClient;
use twill_proto::{AcquireRequest, WatchRequest};
use twill_tests::kit::http_get;
use twill_tests::replicas::{
    channel, metric_value, pick_addrs, replica, replica_bins, run_kept, Controller, Pki,
    ReplicaSet, HA_NET_CONF,
};
use twill_tests::{hold_for, wait_until, Bins, Check, EtcdCluster};

/// The controller's log line for each try while etcd does not answer.
const WAITING: &str = "waiting for etcd";
/// How long the waits of this test may take on a busy machine.
const PATIENCE: Duration = Duration::from_secs(60);

#[test]
fn a_controller_started_before_etcd_waits_for_it_and_then_serves() {
    let test = "a_controller_started_before_etcd_waits_for_it_and_then_serves";
    let Some(bins) = replica_bins(test) else {
        return;
    };
    run_kept("twill-etcd-wait", |dir| scenario(&bins, dir));
}

fn scenario(bins: &Bins, dir: &Path) -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    etcd.kill(0)?;
    let pki = Pki::create(bins, dir)?;
    std::fs::write(dir.join("net-conf.json"), HA_NET_CONF)?;
    let addrs = pick_addrs(2)?;
    let controller = |i: usize| {
        let name = format!("c{i}");
        replica(bins, &etcd, &pki, dir, "/twill-etcd-wait/", &name, addrs[i])
    };

    // 1. SIGTERM while waiting: a clean exit, at once (terminate() fails past 10 s).
    let mut early = controller(0);
    early.start()?;
    keeps_waiting(&mut early)?;
    let status = early.terminate()?;
    ensure!(
        status.success(),
        "SIGTERM while waiting for etcd ended the controller with {status}:\n{}",
        early.log_tail(20)
    );
    ensure!(
        early.log_text().contains("exiting before etcd answered"),
        "{}",
        early.log_tail(20)
    );

    // 2. etcd comes back: the waiting controller opens the store and is ready.
    let mut c = controller(1);
    c.start()?;
    keeps_waiting(&mut c)?;
    etcd.restart(0)?;
    wait_until(
        PATIENCE,
        "the controller to answer /readyz with 200 once etcd answers",
        || {
            if !c.is_running() {
                return Check::Fatal(format!("it exited:\n{}", c.log_tail(30)));
            }
            match http_get(addrs[1].http, "/readyz") {
                Ok(r) if r.status == 200 => Check::Ready(()),
                Ok(r) => Check::NotYet(format!("{} {}", r.status, r.body.trim())),
                Err(e) => Check::NotYet(format!("{e:#}")),
            }
        },
    )?;
    let status = c.terminate()?;
    ensure!(status.success(), "the controller ended with {status}");
    Ok(())
}

/// Waits until `c` has said twice that it waits for etcd and still runs: it retries
/// instead of exiting.
fn keeps_waiting(c: &mut Controller) -> Result<()> {
    let what = format!("{} to say twice that it waits for etcd", c.name);
    wait_until(PATIENCE, &what, || {
        if !c.is_running() {
            return Check::Fatal(format!("it exited:\n{}", c.log_tail(30)));
        }
        let log = c.log_text();
        match log.matches(WAITING).count() {
            n if n >= 2 => Check::Ready(()),
            n => Check::NotYet(format!("{n} time(s) so far")),
        }
    })
}

#[test]
fn a_leader_stopped_with_sigterm_hands_over_without_waiting_for_its_lease() {
    let test = "a_leader_stopped_with_sigterm_hands_over_without_waiting_for_its_lease";
    let Some(bins) = replica_bins(test) else {
        return;
    };
    run_kept("twill-handover", |dir| handover(&bins, dir));
}

fn handover(bins: &Bins, dir: &Path) -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let pki = Pki::create(bins, dir)?;
    let set = ReplicaSet::start(bins, &etcd, &pki, dir, 2, "/twill-handover/", HA_NET_CONF)?;
    let leader = set.wait_leader(PATIENCE, None)?;
    let before = etcd.leases()?;
    let t0 = std::time::Instant::now();
    let status = set.with(leader, Controller::terminate)?;
    ensure!(status.success(), "the leader ended with {status}");
    // Right after the exit: a lease left to expire would still be there for its TTL.
    let after = etcd.leases()?;
    ensure!(
        after.len() < before.len(),
        "the stopped leader's etcd lease is still held ({before:?} before, {after:?} after): \
         it did not revoke it, so its successor waits for the TTL"
    );
    let next = set.wait_leader(PATIENCE, Some(leader))?;
    eprintln!(
        "handover: SIGTERM to replica {leader}, replica {next} ready (leader) {} ms later",
        t0.elapsed().as_millis()
    );
    Ok(())
}

#[test]
fn a_replica_that_comes_back_gets_its_share_of_the_agents() {
    let test = "a_replica_that_comes_back_gets_its_share_of_the_agents";
    let Some(bins) = replica_bins(test) else {
        return;
    };
    run_kept("twill-rebalance", |dir| rebalance(&bins, dir));
}

/// Nodes in the rebalance test.
const NODES: usize = 20;

fn rebalance(bins: &Bins, dir: &Path) -> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let pki = Pki::create(bins, dir)?;
    let set = ReplicaSet::start(bins, &etcd, &pki, dir, 2, "/twill-rebalance/", HA_NET_CONF)?;
    // Both rebalance every second; replica 1 stays down while the nodes join.
    for i in [1, 0] {
        set.with(i, |c| {
            c.push_args(["--rebalance-interval", "1s"]);
            c.terminate()
        })?;
    }
    set.with(0, Controller::start)?;
    set.wait_ready(0, PATIENCE)?;

    let rt = tokio::runtime::Runtime::new()?;
    let _in_rt = rt.enter(); // channels are made lazily, on the runtime
    let moved = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for i in 0..NODES {
        let name = format!("rb{i:03}");
        let pem = pki.node(&name)?;
        let chans: Vec<Channel> = (0..2)
            .map(|r| channel(&set.url(r), pki.ca_pem(), &pem))
            .collect::<Result<_>>()?;
        let req = AcquireRequest {
            node_name: name.clone(),
            public_ip: format!("100.64.0.{}", i + 1),
            backend_type: "vxlan".into(),
            vtep_mac: format!("0a:58:0b:00:00:{i:02x}"),
            ..Default::default()
        };
        rt.block_on(AgentServiceClient::new(chans[0].clone()).acquire(req))
            .with_context(|| format!("{name}'s lease"))?;
        watchers.push(rt.spawn(watch_like_an_agent(chans, moved.clone())));
    }
    let watching = |i: usize| -> Result<f64> {
        metric_value(&set.metrics(i)?, "twill_watchers").context("no twill_watchers")
    };
    wait_until(
        PATIENCE,
        "every node to watch replica 0",
        || match watching(0) {
            Ok(n) if n == NODES as f64 => Check::Ready(()),
            other => Check::NotYet(format!("{other:?}")),
        },
    )?;

    set.with(1, Controller::start)?;
    set.wait_ready(1, PATIENCE)?;
    let half = (NODES / 2) as f64;
    wait_until(
        PATIENCE,
        "each replica to serve half the nodes",
        || match (watching(0), watching(1)) {
            (Ok(a), Ok(b)) if a == half && b == half => Check::Ready(()),
            other => Check::NotYet(format!(
                "(replica 0, replica 1) {other:?}; {} moved",
                moved.load(Ordering::SeqCst)
            )),
        },
    )?;
    ensure!(
        moved.load(Ordering::SeqCst) == NODES / 2,
        "{} watches moved, want {}",
        moved.load(Ordering::SeqCst),
        NODES / 2
    );
    // At its share, nothing moves any more (several rounds).
    hold_for(Duration::from_secs(4), "no more moves", || {
        let n = moved.load(Ordering::SeqCst);
        if n == NODES / 2 {
            Check::Ready(())
        } else {
            Check::Fatal(format!("{n} watches moved, want {}", NODES / 2))
        }
    })?;
    for w in watchers {
        w.abort();
    }
    Ok(())
}

/// Watches on `chans[0]`; a watch that ends with the trailer asking it to move is
/// counted in `moved` and opened again on `chans[1]`, as an agent would.
async fn watch_like_an_agent(chans: Vec<Channel>, moved: Arc<AtomicUsize>) -> Result<()> {
    let mut on = 0;
    loop {
        let mut stream = AgentServiceClient::new(chans[on].clone())
            .watch(WatchRequest::default())
            .await?
            .into_inner();
        let end = loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => anyhow::bail!("the watch ended without a status"),
                Err(s) => break s,
            }
        };
        ensure!(
            end.code() == tonic::Code::Unavailable
                && end.metadata().contains_key(twill_common::MOVE_TRAILER),
            "the watch ended with {end:?}"
        );
        moved.fetch_add(1, Ordering::SeqCst);
        on = 1 - on;
    }
}
