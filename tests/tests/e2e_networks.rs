//! Several networks end to end (issue 26, REFERENCE 2.10): one controller serving
//! `default` (VXLAN, VNI 1), `blue` (VXLAN, VNI 2, only node-a and node-b) and `red`
//! (host-gw), three hosts whose agents run with `--networks '*'`, and pods attached by
//! the real `twill-cni` to each network on each admitted host (a bridge per network).
//!
//! Proven here: each network's pods reach every pod of the same network across hosts;
//! no pod reaches another network's pod (even one routed there on purpose), in either
//! direction; node-c never joins `blue`; a network file added while the agents run is
//! joined by every admitted agent (lease, device, env file, pings) and, once its file
//! is removed, no longer renewed, its devices and env files gone when the leases end;
//! continuous pings on two networks lose nothing across a SIGKILL of the controller
//! and of an agent.
//!
//! Needs root, network namespaces and Debian's containernetworking-plugins; without
//! them it is skipped loudly, or fails when `CI` is set.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use twill_tests::kit::skip;
use twill_tests::pods::{self, exec_in, Pod, PodNetwork, CNI_PATH};
use twill_tests::{
    hold_for, require_lab, wait_until, Check, ContinuousPing, Overlay, OverlayConfig, SubnetEnv,
};

const CONVERGE: Duration = Duration::from_secs(60);
/// The controller's lease TTL: short, so that a removed network's leases end within
/// the test.
const LEASE_TTL: &str = "20s";

const BLUE: &str =
    r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2},"Nodes":["node-a","node-b"]}"#;
const RED: &str = r#"{"Network":"10.20.0.0/16","Backend":{"Type":"host-gw"}}"#;
const GREEN: &str = r#"{"Network":"10.30.0.0/16","Backend":{"Type":"vxlan","VNI":3}}"#;

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn pods_of_each_network_talk_only_within_it() {
    let test = "e2e_networks";
    for p in ["bridge", "host-local"] {
        if !Path::new(CNI_PATH).join(p).is_file() {
            skip(
                test,
                &format!("needs {CNI_PATH}/{p} (containernetworking-plugins)"),
            );
            return;
        }
    }
    let mut config = OverlayConfig::three_nodes()
        .network("blue", BLUE)
        .network("red", RED)
        .controller_args(["--lease-ttl", LEASE_TTL]);
    for n in ["node-a", "node-b", "node-c"] {
        // --ip-masq as kube-flannel runs it: pod-to-pod traffic keeps its source (the
        // bridge plugin would otherwise masquerade it, and a second network's pods have
        // no default route to answer a node address).
        config = config.agent_args(
            n,
            ["--networks", "*", "--reconcile-interval", "2s", "--ip-masq"],
        );
    }
    let Some(ov) = require_lab(test, Overlay::start(config)) else {
        return;
    };
    ov.run_scenario(scenario);
}

/// Where each node's agent writes network `network`'s env file.
fn env_file(ov: &Overlay, node: &str, network: &str) -> std::path::PathBuf {
    ov.subnet_file(node)
        .with_file_name("networks")
        .join(format!("{network}.env"))
}

/// Whether `dev` exists on `node`.
fn has_link(ov: &Overlay, node: &str, dev: &str) -> bool {
    ov.lab().link(node, dev).is_ok()
}

/// Waits until every node of `nodes` has joined `network` (its env file, and with
/// VXLAN its device `flannel.<vni>`), and no other node has; returns the env files.
fn wait_joined(
    ov: &Overlay,
    network: &str,
    vni: Option<u32>,
    nodes: &[&str],
) -> Result<BTreeMap<String, SubnetEnv>> {
    wait_until(
        CONVERGE,
        &format!("network {network} joined by {nodes:?} only"),
        || {
            let mut envs = BTreeMap::new();
            for n in ov.nodes() {
                let file = env_file(ov, n, network);
                let device = vni.map(|v| format!("flannel.{v}"));
                let joined = file.is_file() && device.as_ref().is_none_or(|d| has_link(ov, n, d));
                let want = nodes.contains(&n.as_str());
                if joined != want {
                    return Check::NotYet(format!(
                        "{n}: {} {} (device {device:?})",
                        file.display(),
                        if file.is_file() { "present" } else { "absent" }
                    ));
                }
                if want {
                    match SubnetEnv::read(&file) {
                        Ok(env) => {
                            envs.insert(n.clone(), env);
                        }
                        Err(e) => return Check::NotYet(format!("{n}: {e:#}")),
                    }
                }
            }
            Check::Ready(envs)
        },
    )
}

fn ping(netns: &str, addr: IpAddr) -> Result<()> {
    let a = addr.to_string();
    let mut last = String::new();
    for _ in 0..3 {
        let out = exec_in(netns, &["ping", "-n", "-q", "-c", "1", "-W", "1", &a])?;
        if out.success {
            return Ok(());
        }
        last = format!("{}{}", out.stdout.trim(), out.stderr.trim());
    }
    bail!("ping {a} from {netns}: no reply to 3 echo requests: {last}")
}

/// Asserts that no echo request from `from` to `to` is answered (3 tries).
fn no_reply(from: &Pod, to: &Pod) -> Result<()> {
    let a = to.addr.to_string();
    let out = exec_in(
        &from.netns,
        &["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", &a],
    )?;
    ensure!(
        !out.success,
        "pod {} ({}, network {}) reached pod {} ({}, network {}): {}",
        from.container_id,
        from.addr,
        from.net.network,
        to.container_id,
        to.addr,
        to.net.network,
        out.stdout
    );
    Ok(())
}

/// Every pod pings every other pod of `pods` (one network).
fn all_ping(pods: &[&Pod]) -> Result<()> {
    for from in pods {
        for to in pods.iter().filter(|t| t.netns != from.netns) {
            ping(&from.netns, to.addr).with_context(|| {
                format!(
                    "network {}: pod on {} -> pod {} on {}",
                    from.net.network, from.node, to.addr, to.node
                )
            })?;
        }
    }
    Ok(())
}

fn scenario(ov: &Overlay) -> Result<()> {
    let (a, b, c) = ("node-a", "node-b", "node-c");
    let cni_bin = ov.bins().path("twill-cni");
    ensure!(
        cni_bin.is_file(),
        "{} missing: run `cargo build --workspace --bins` first",
        cni_bin.display()
    );
    let default_envs = wait_joined(ov, "default", Some(1), &[a, b, c])?;
    let blue_envs = wait_joined(ov, "blue", Some(2), &[a, b])?;
    let red_envs = wait_joined(ov, "red", None, &[a, b, c])?;
    for (n, env) in &blue_envs {
        ensure!(
            "10.10.0.0/16"
                .parse::<ipnet::Ipv4Net>()?
                .contains(&env.subnet),
            "{n}: blue subnet {} outside blue",
            env.subnet
        );
        ensure!(env.subnet != default_envs[n].subnet && env.subnet != red_envs[n].subnet);
    }
    ensure!(
        !has_link(ov, c, "flannel.2") && !env_file(ov, c, "blue").exists(),
        "node-c is not among blue's nodes, yet joined it"
    );
    println!("default, blue (node-a, node-b) and red joined; node-c kept out of blue");

    // Pods: one per network on each admitted host.
    let mut tag = 0;
    let mut attach = |node: &str, net: &PodNetwork| -> Result<Pod> {
        tag += 1;
        let (pod, _) = pods::attach_to(ov, &cni_bin, node, &format!("n{tag}"), net)?;
        println!(
            "pod {} on {node} in {}: {}",
            pod.container_id, net.network, pod.addr
        );
        Ok(pod)
    };
    let (default_net, blue_net, red_net) = (
        PodNetwork::flannel(),
        PodNetwork::named("blue"),
        PodNetwork::named("red"),
    );
    let defaults: Vec<Pod> = [a, b, c]
        .iter()
        .map(|n| attach(n, &default_net))
        .collect::<Result<_>>()?;
    let blues: Vec<Pod> = [a, b]
        .iter()
        .map(|n| attach(n, &blue_net))
        .collect::<Result<_>>()?;
    let reds: Vec<Pod> = [a, b, c]
        .iter()
        .map(|n| attach(n, &red_net))
        .collect::<Result<_>>()?;
    for p in &blues {
        ensure!(
            blue_envs[&p.node].subnet.contains(&match p.addr {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(_) => bail!("an IPv6 address on an IPv4 network"),
            }),
            "blue pod {} not in {}'s blue subnet",
            p.addr,
            p.node
        );
    }
    all_ping(&defaults.iter().collect::<Vec<_>>())?;
    all_ping(&blues.iter().collect::<Vec<_>>())?;
    all_ping(&reds.iter().collect::<Vec<_>>())?;
    println!("every pod reaches every pod of its own network, across hosts");

    // Isolation: a blue pod routed to default's (and red's) pods on purpose, and the
    // other way round (default pods have a default route), get no answer.
    let blue_a = &blues[0];
    for cidr in ["10.244.0.0/16", "10.20.0.0/16"] {
        let gw = blue_envs[a].gateway().to_string();
        exec_in(&blue_a.netns, &["ip", "route", "replace", cidr, "via", &gw])?.ok()?;
    }
    no_reply(blue_a, &defaults[1])?;
    no_reply(blue_a, &defaults[0])?;
    no_reply(blue_a, &reds[1])?;
    no_reply(&defaults[1], blue_a)?;
    no_reply(&defaults[2], &blues[1])?;
    // It is the agent's isolation table that drops them (not a missing route): without
    // it the blue pod reaches node-a's default pod, and the agent's next reconcile puts
    // it back.
    let reached = (0..10).any(|_| {
        let _ = ov
            .lab()
            .exec(a, &["nft", "delete", "table", "inet", "twill-isolation"]);
        ping(&blue_a.netns, defaults[0].addr).is_ok()
    });
    ensure!(reached, "without the isolation table, blue still did not reach default: the check above proves nothing");
    wait_until(
        CONVERGE,
        "node-a's agent to restore its isolation table",
        || match ov
            .lab()
            .exec(a, &["nft", "list", "table", "inet", "twill-isolation"])
        {
            Ok(t) if t.contains("ip saddr 10.10.0.0/16") => Check::Ready(()),
            Ok(t) => Check::NotYet(t),
            Err(e) => Check::NotYet(format!("{e:#}")),
        },
    )?;
    no_reply(blue_a, &defaults[0])?;
    println!("no pod reaches a pod of another network, on its host or across");

    // A network added while the agents run: every node joins it.
    ov.write_network("green", GREEN)?;
    let started = Instant::now();
    let green_envs = wait_joined(ov, "green", Some(3), &[a, b, c])?;
    println!(
        "green joined by every node {:.1?} after its file appeared",
        started.elapsed()
    );
    let green_net = PodNetwork::named("green");
    let greens: Vec<Pod> = [a, c]
        .iter()
        .map(|n| attach(n, &green_net))
        .collect::<Result<_>>()?;
    all_ping(&greens.iter().collect::<Vec<_>>())?;
    ensure!(green_envs[a].subnet != green_envs[c].subnet);

    // Continuous pings on two networks (from node-a's bridges to node-b's pods) through
    // a SIGKILL of the controller and of node-b's agent: none lost.
    let mut pings = [
        ContinuousPing::start_from(
            ov.lab(),
            a,
            default_envs[a].gateway().into(),
            defaults[1].addr,
        )?,
        ContinuousPing::start_from(ov.lab(), a, blue_envs[a].gateway().into(), blues[1].addr)?,
    ];
    let watch = Instant::now();
    hold_for(Duration::from_secs(2), "pings to run", || {
        pings
            .iter_mut()
            .try_for_each(|p| p.still_running("warm-up"))
    })?;
    println!("controller killed: {}", ov.kill_controller()?);
    hold_for(
        Duration::from_secs(3),
        "pings while the controller is down",
        || {
            pings
                .iter_mut()
                .try_for_each(|p| p.still_running("controller down"))
        },
    )?;
    ov.restart_controller()?;
    println!("node-b's agent killed: {}", ov.kill_agent(b)?);
    hold_for(
        Duration::from_secs(3),
        "pings while node-b's agent is down",
        || {
            pings
                .iter_mut()
                .try_for_each(|p| p.still_running("agent down"))
        },
    )?;
    ov.restart_agent(b)?;
    ov.wait_agent_healthy(b, CONVERGE)?;
    let blue_again = wait_joined(ov, "blue", Some(2), &[a, b])?;
    ensure!(
        blue_again[b].subnet == blue_envs[b].subnet,
        "node-b's blue subnet moved"
    );
    hold_for(Duration::from_secs(3), "pings after the restarts", || {
        pings
            .iter_mut()
            .try_for_each(|p| p.still_running("after the restarts"))
    })?;
    for (net, p) in ["default", "blue"].iter().zip(pings.iter_mut()) {
        let report = p.finish()?;
        println!(
            "continuous ping on {net} ({:.1?}) across a controller and an agent SIGKILL: {report}",
            watch.elapsed()
        );
        let problems = report.problems(100, "the restarts");
        ensure!(problems.is_empty(), "{net}: {}", problems.join("; "));
    }

    // green's file goes: no node renews it; when the leases end, the devices and env
    // files go, and the other networks stay.
    ov.remove_network("green")?;
    let started = Instant::now();
    wait_joined(ov, "green", Some(3), &[])?;
    println!(
        "green's devices and env files gone {:.1?} after its file was removed",
        started.elapsed()
    );
    wait_joined(ov, "blue", Some(2), &[a, b])?;
    all_ping(&blues.iter().collect::<Vec<_>>())?;
    all_ping(&defaults.iter().collect::<Vec<_>>())?;
    Ok(())
}
