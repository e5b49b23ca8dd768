//! End to end, certificate rotation: agents that bootstrapped certificates living
//! only 30 s (`--node-cert-ttl 30s`) replace them, with new keys, through
//! `IdentityService.Renew` at 70–90 % of their lifetime, while pods' traffic crosses
//! the overlay.
//!
//! The bootstrap token is deleted first: agents already running need it no more.
//! For 90 s, a continuous ping runs from every host to the next one (20 echo
//! requests a second each); afterwards:
//! * none was lost;
//! * every agent rotated at least twice (`twill_agent_cert_rotations_total`), and
//!   what is on disk is a new certificate (new serial) with its new key;
//! * no watch was reset (`twill_agent_watch_resets_total` is still the one reset of
//!   the first connection), none broke, each moved to the new certificate's
//!   connection, and no kernel entry was added or removed
//!   (`twill_agent_changes_total` unchanged): the data plane never noticed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use twill_tests::certs::{cert_serial, key_belongs};
use twill_tests::{hold_for, require_lab, ContinuousPing, Overlay, OverlayConfig};

const CONVERGE: Duration = Duration::from_secs(90);
/// How long the pings run while the certificates rotate.
const ROTATING: Duration = Duration::from_secs(90);
/// At 20 requests a second, 90 s is 1,800 (a busy machine sends fewer); well
/// under that means ping stalled.
const MIN_PINGS: u64 = 1_000;

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn certificates_rotate_under_traffic_without_a_lost_ping_or_a_watch_reset() {
    let Some(ov) = require_lab(
        "rotation",
        Overlay::start(
            OverlayConfig::three_nodes()
                .bootstrap(true)
                .node_cert_ttl("30s"),
        ),
    ) else {
        return;
    };
    ov.run_scenario(scenario);
}

/// The agent counters this test reads, by node.
#[derive(Debug, Clone, Copy)]
struct Counters {
    rotations: u64,
    resets: u64,
    changes: u64,
}

fn counters(ov: &Overlay, node: &str) -> Result<Counters> {
    let r = ov
        .lab()
        .http_get(node, ov.agent_metrics_addr(node), "/metrics")?;
    ensure!(r.status == 200, "{node}: GET /metrics: HTTP {}", r.status);
    let get = |name: &str| {
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .with_context(|| format!("{node}: no {name} in /metrics"))
    };
    Ok(Counters {
        rotations: get("twill_agent_cert_rotations_total")?,
        resets: get("twill_agent_watch_resets_total")?,
        changes: get("twill_agent_changes_total")?,
    })
}

fn scenario(ov: &Overlay) -> Result<()> {
    let nodes: Vec<&str> = ov.nodes().iter().map(String::as_str).collect();
    let envs = ov.wait_converged(CONVERGE)?;
    let serials: BTreeMap<&str, String> = nodes
        .iter()
        .map(|n| cert_serial(&ov.node_cert_file(n)).map(|s| (*n, s)))
        .collect::<Result<_>>()?;
    let before: BTreeMap<&str, Counters> = nodes
        .iter()
        .map(|n| counters(ov, n).map(|c| (*n, c)))
        .collect::<Result<_>>()?;

    // Rotation needs no token: the one the agents bootstrapped with is deleted first.
    let token = std::fs::read_to_string(ov.bootstrap_token_file(nodes[0]))?;
    let token_id = token.trim().split('.').next().unwrap_or_default();
    ov.twillctl(&["token", "delete", token_id])?;
    let listed = ov.twillctl(&["token", "list"])?;
    ensure!(
        !listed.contains(token_id),
        "token {token_id} still listed after delete:\n{listed}"
    );

    let mut pings = Vec::new();
    for (i, from) in nodes.iter().enumerate() {
        let to = nodes[(i + 1) % nodes.len()];
        let dst = envs[to].flannel_addr();
        pings.push((
            *from,
            to,
            ContinuousPing::start(ov.lab(), from, dst)
                .with_context(|| format!("ping {from} -> {to}"))?,
        ));
    }
    let started = Instant::now();
    hold_for(ROTATING, "pings and agents to keep running", || {
        for (from, to, ping) in &mut pings {
            ping.still_running(&format!("{from} -> {to} while rotating"))?;
        }
        for n in &nodes {
            ensure!(ov.agent_running(n), "the agent of {n} exited");
        }
        Ok(())
    })?;

    let mut problems = Vec::new();
    for (from, to, ping) in &mut pings {
        match ping.finish() {
            Ok(report) => {
                println!(
                    "rotation: ping {from} -> {to} over {:.1?} of rotations: {report}",
                    started.elapsed()
                );
                problems.extend(
                    report
                        .problems(MIN_PINGS, "the rotations")
                        .into_iter()
                        .map(|p| format!("ping {from} -> {to}: {p}")),
                );
            }
            Err(e) => problems.push(format!("ping {from} -> {to}: {e:#}")),
        }
    }

    for n in &nodes {
        let (was, now) = (before[n], counters(ov, n)?);
        let log = ov.lab().log(&Overlay::agent_proc(n));
        let moved = log
            .matches("lease watch moved to a connection with the current certificate")
            .count();
        println!(
            "rotation: {n}: {} rotations in {ROTATING:?} ({} in all), watch moved {moved} times, \
             watch resets {} -> {}, kernel changes {} -> {}",
            now.rotations - was.rotations,
            now.rotations,
            was.resets,
            now.resets,
            was.changes,
            now.changes
        );
        if now.rotations < was.rotations + 2 {
            problems.push(format!(
                "{n} rotated {} times in {ROTATING:?}, want at least 2",
                now.rotations - was.rotations
            ));
        }
        if now.resets != was.resets {
            problems.push(format!(
                "{n}'s watch was reset {} times while rotating",
                now.resets - was.resets
            ));
        }
        if now.changes != was.changes {
            problems.push(format!(
                "{n} added or removed {} kernel entries while rotating",
                now.changes - was.changes
            ));
        }
        if moved < 2 {
            problems.push(format!(
                "{n}'s watch moved {moved} times to a new certificate's connection, want at least 2"
            ));
        }
        for broke in ["lease watch broke", "controller closed the lease watch"] {
            if log.contains(broke) {
                problems.push(format!("{n}'s log says {broke:?}"));
            }
        }
        let (cert, key) = (ov.node_cert_file(n), ov.node_key_file(n));
        let serial = cert_serial(&cert)?;
        if serial == serials[n] {
            problems.push(format!(
                "{n}'s certificate on disk still has serial {serial}"
            ));
        }
        if !key_belongs(&cert, &key)? {
            problems.push(format!("{n}'s key file does not belong to its certificate"));
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
