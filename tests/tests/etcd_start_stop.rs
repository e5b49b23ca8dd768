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

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use twill_tests::kit::http_get;
use twill_tests::replicas::{
    pick_addrs, replica, replica_bins, run_kept, Controller, Pki, ReplicaSet, HA_NET_CONF,
};
use twill_tests::{wait_until, Bins, Check, EtcdCluster};

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
