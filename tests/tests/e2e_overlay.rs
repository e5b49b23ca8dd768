//! End to end: a controller and three hosts in network namespaces, real binaries.
//!
//! The overlay converges, every host reaches every other host's pods over VXLAN with
//! the kernel state flannel would have; an agent restarted with SIGTERM keeps its
//! subnet and VTEP MAC; an agent leaving with `--release-on-exit` is removed from its
//! peers. A network with `"TxChecksumOffload": false` gets devices without transmit
//! checksum offload.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv4Net;
use twill_tests::{
    hold_for, require_lab, wait_until, Overlay, OverlayConfig, SubnetEnv, FLANNEL_DEV,
};

const CONVERGE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(30);

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn three_hosts_converge_ping_and_survive_agent_restarts() {
    let Some(ov) = require_lab(
        "e2e_overlay",
        Overlay::start(OverlayConfig::three_nodes().agent_args("node-c", ["--release-on-exit"])),
    ) else {
        return;
    };
    // Panicking while `ov` is alive makes its guard print every host's kernel state
    // and every process's log before cleaning up.
    if let Err(e) = scenario(&ov) {
        panic!("{e:#}");
    }
}

/// `"TxChecksumOffload": false` reaches every agent through the controller: each
/// host's flannel.1 sends without transmit checksum offload, and the overlay carries
/// traffic. Each agent also writes its network's `networks/default.env`.
#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn tx_checksum_offload_off_reaches_every_device_and_the_overlay_carries_traffic() {
    let conf =
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","TxChecksumOffload":false}}"#;
    let Some(ov) = require_lab(
        "e2e_overlay (TxChecksumOffload)",
        Overlay::start(OverlayConfig::three_nodes().net_conf(conf)),
    ) else {
        return;
    };
    ov.run_scenario(|ov| {
        let envs = ov.wait_converged(CONVERGE)?;
        for n in ov.nodes() {
            let k = ov.lab().exec(n, &["ethtool", "-k", FLANNEL_DEV])?;
            ensure!(
                k.lines().any(|l| l.trim() == "tx-checksum-ip-generic: off"),
                "{n}: {FLANNEL_DEV} still offloads transmit checksums:\n{k}"
            );
            ov.lab().add_bridge(n, "pods0", envs[n].subnet)?;
            // The network's own env file (`--subnet-dir`, default `networks` beside
            // --subnet-file), for CNI configurations that name their network.
            let file = ov.subnet_file(n);
            let named = file.with_file_name("networks").join("default.env");
            ensure!(
                std::fs::read(&named).ok() == std::fs::read(&file).ok(),
                "{n}: {} is not {}",
                named.display(),
                file.display()
            );
        }
        every_pair_pings(ov, &envs, &["node-a", "node-b", "node-c"])
    });
}

fn scenario(ov: &Overlay) -> Result<()> {
    let (a, b, c) = ("node-a", "node-b", "node-c");

    // 1. Every host gets a subnet and routes to every other host's subnet.
    let envs = ov.wait_converged(CONVERGE)?;
    subnets_are_distinct_and_inside_the_network(ov, &envs)?;
    lease_table_matches_the_hosts(ov, &envs, &[a, b, c])?;

    // 2. Pods: each host gets a bridge holding its subnet's gateway (x.y.z.1).
    for n in ov.nodes() {
        ov.lab().add_bridge(n, "pods0", envs[n].subnet)?;
    }

    // 3. Every host pings every other host's flannel address (x.y.z.0) and pod
    //    gateway (x.y.z.1) across the overlay.
    every_pair_pings(ov, &envs, &[a, b, c])?;

    // 4. Kernel state on each host for each peer, as flannel has it.
    for on in [a, b, c] {
        for peer in [a, b, c].into_iter().filter(|p| *p != on) {
            peer_is_programmed(ov, on, peer, &envs[peer])?;
        }
    }

    // 5. (a) A plain SIGTERM keeps the lease: peers keep their routes, and the
    //    restarted agent gets the same subnet and keeps its VTEP MAC.
    let b_mac = ov.vtep_mac(b)?;
    let status = ov.stop_agent(b).context("SIGTERM to node-b's agent")?;
    ensure!(
        status.success(),
        "node-b's agent exited with {status} after SIGTERM"
    );
    hold_for(
        Duration::from_secs(3),
        "node-a's route, neighbour and FDB entry for node-b to stay while its agent is down",
        || peer_is_programmed(ov, a, b, &envs[b]),
    )?;
    ov.restart_agent(b)?;
    ov.wait_agent_healthy(b, SETTLE)?;
    let b_again = ov.subnet_env(b)?;
    ensure!(
        b_again.subnet == envs[b].subnet,
        "node-b came back with subnet {} instead of {}",
        b_again.subnet,
        envs[b].subnet
    );
    let b_mac_again = ov.vtep_mac(b)?;
    ensure!(
        b_mac_again == b_mac,
        "node-b's VTEP MAC changed across the restart: {b_mac} -> {b_mac_again}"
    );
    ov.wait_converged(SETTLE)?;
    for on in [a, c] {
        peer_is_programmed(ov, on, b, &envs[b])?;
    }
    every_pair_pings(ov, &envs, &[a, b, c])?;

    // 5. (b) node-c leaves with --release-on-exit: node-a and node-b drop its
    //    neighbour, FDB entry and route.
    let c_mac = ov.vtep_mac(c)?;
    let c_subnet = envs[c].subnet_net();
    let status = ov.stop_agent(c).context("SIGTERM to node-c's agent")?;
    ensure!(
        status.success(),
        "node-c's agent exited with {status} after SIGTERM"
    );
    for on in [a, b] {
        wait_until(
            SETTLE,
            &format!("{on} to forget node-c (route {c_subnet}, neighbour, FDB {c_mac})"),
            || ov.peer_gone(on, c_subnet, &c_mac),
        )?;
    }
    every_pair_pings(ov, &envs, &[a, b])?;
    lease_table_matches_the_hosts(ov, &envs, &[a, b])?;
    Ok(())
}

/// `twillctl leases` lists exactly `nodes`, each with the subnet of its subnet.env,
/// its underlay address and the MAC of its flannel.1.
fn lease_table_matches_the_hosts(
    ov: &Overlay,
    envs: &BTreeMap<String, SubnetEnv>,
    nodes: &[&str],
) -> Result<()> {
    let leases = ov.leases()?;
    let listed: Vec<&str> = leases.iter().map(|l| l.node_name.as_str()).collect();
    ensure!(
        listed == nodes,
        "twillctl leases lists {listed:?}, want {nodes:?}"
    );
    for l in &leases {
        let node = l.node_name.as_str();
        ensure!(
            l.subnet == envs[node].subnet_net().to_string(),
            "lease of {node}: subnet {} but its subnet.env says {}",
            l.subnet,
            envs[node].subnet
        );
        ensure!(
            l.public_ip == ov.public_ip(node).to_string(),
            "lease of {node}: public IP {}",
            l.public_ip
        );
        let mac = ov.vtep_mac(node)?;
        ensure!(
            l.vtep_mac.eq_ignore_ascii_case(&mac),
            "lease of {node}: VTEP MAC {} but its {FLANNEL_DEV} has {mac}",
            l.vtep_mac
        );
    }
    Ok(())
}

/// No two hosts share a subnet, each lies in 10.244.0.0/16, FLANNEL_MTU is the
/// underlay's 1500 minus VXLAN's 50, and FLANNEL_SUBNET names the first usable address.
fn subnets_are_distinct_and_inside_the_network(
    ov: &Overlay,
    envs: &BTreeMap<String, SubnetEnv>,
) -> Result<()> {
    let network: Ipv4Net = "10.244.0.0/16".parse()?;
    let mut seen: BTreeMap<Ipv4Net, &str> = BTreeMap::new();
    for (node, env) in envs {
        ensure!(
            env.network == network,
            "{node}: FLANNEL_NETWORK {}",
            env.network
        );
        ensure!(
            network.contains(&env.subnet_net()),
            "{node}: subnet {} outside {network}",
            env.subnet
        );
        ensure!(
            env.subnet.addr() == env.gateway(),
            "{node}: FLANNEL_SUBNET {} is not the subnet's first usable address",
            env.subnet
        );
        let underlay_mtu = ov.lab().link(node, "eth0")?.mtu;
        ensure!(underlay_mtu == 1500, "{node}: eth0 MTU {underlay_mtu}");
        ensure!(
            env.mtu == 1450,
            "{node}: FLANNEL_MTU {} with a 1500 underlay",
            env.mtu
        );
        ensure!(!env.ipmasq, "{node}: FLANNEL_IPMASQ true without --ip-masq");
        ensure!(
            env.order
                == [
                    "FLANNEL_NETWORK",
                    "FLANNEL_SUBNET",
                    "FLANNEL_MTU",
                    "FLANNEL_IPMASQ"
                ],
            "{node}: subnet.env keys in order {:?}",
            env.order
        );
        if let Some(other) = seen.insert(env.subnet_net(), node) {
            bail!("{node} and {other} share subnet {}", env.subnet_net());
        }
        let dev = ov.lab().link(node, FLANNEL_DEV)?;
        ensure!(
            dev.kind() == Some("vxlan"),
            "{node}: {FLANNEL_DEV} is {:?}",
            dev.kind()
        );
        ensure!(dev.mtu == 1450, "{node}: {FLANNEL_DEV} MTU {}", dev.mtu);
    }
    Ok(())
}

fn every_pair_pings(
    ov: &Overlay,
    envs: &BTreeMap<String, SubnetEnv>,
    nodes: &[&str],
) -> Result<()> {
    for from in nodes {
        for to in nodes.iter().filter(|t| *t != from) {
            let env = &envs[*to];
            for addr in [env.flannel_addr(), env.gateway()] {
                ov.lab()
                    .ping(from, addr)
                    .with_context(|| format!("{from} -> {to} ({addr}) over the overlay"))?;
            }
        }
    }
    Ok(())
}

/// `on` has, for `peer`: neighbour `peer.0 -> peer's VTEP MAC` (permanent), FDB entry
/// `MAC -> peer's underlay IP`, and route `subnet via peer.0 dev flannel.1 onlink`.
fn peer_is_programmed(ov: &Overlay, on: &str, peer: &str, env: &SubnetEnv) -> Result<()> {
    ov.vxlan_entries(on, env, &ov.vtep_mac(peer)?, ov.public_ip(peer))
        .with_context(|| format!("{on}'s entries for {peer}"))
}
