//! End to end, dual-stack and IPv6-only: a controller and three hosts whose underlay
//! has IPv4 and IPv6 addresses (IPv6 only, for the IPv6-only network), with
//! `EnableIPv6` in net-conf.json, real binaries.
//!
//! Every host gets a subnet of each family (subnet.env in flannel's order, the IPv6
//! subnet with its first usable address), a `flannel.1` and a `flannel-v6.1` with
//! flannel's kernel state for every peer; every host reaches every other host's IPv4
//! and IPv6 pod gateway (the ping matrix is printed); pods attached by twill-cni get an
//! address of each family and reach each other over both; a ping of exactly the pod
//! MTU with DF set crosses on both families and one byte more does not; hand-deleted
//! IPv6 entries come back; and a SIGKILLed agent and controller lose no ping on
//! either family.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv6Net;
use twill_tests::pods::{self, exec_in};
use twill_tests::{require_lab, wait_until, ContinuousPing, Overlay, OverlayConfig, FLANNEL_DEV};

const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const V6_DEV: &str = "flannel-v6.1";
const CONVERGE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(30);

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn dual_stack_hosts_and_pods_reach_each_other_over_both_families() {
    let Some(ov) = require_lab(
        "e2e_dual_stack",
        Overlay::start(OverlayConfig::three_nodes().net_conf(NET_CONF)),
    ) else {
        return;
    };
    ov.run_scenario(scenario);
}

fn scenario(ov: &Overlay) -> Result<()> {
    let nodes: Vec<String> = ov.nodes().to_vec();
    let envs = ov.wait_converged(CONVERGE)?;
    let v6 = |n: &str| -> Result<Ipv6Net> {
        envs[n]
            .subnet6_net()
            .with_context(|| format!("{n}'s subnet.env has no IPv6 subnet: {:?}", envs[n].order))
    };

    // 1. subnet.env: both families, flannel's order, distinct IPv6 subnets in the network.
    let mut seen = BTreeMap::new();
    for n in &nodes {
        let e = &envs[n];
        ensure!(
            e.order
                == [
                    "FLANNEL_NETWORK",
                    "FLANNEL_SUBNET",
                    "FLANNEL_IPV6_NETWORK",
                    "FLANNEL_IPV6_SUBNET",
                    "FLANNEL_MTU",
                    "FLANNEL_IPMASQ"
                ],
            "{n}: subnet.env keys {:?}",
            e.order
        );
        let (network6, subnet6) = e.ipv6.context("no IPv6 lines")?;
        ensure!(
            network6.to_string() == "fd00:10:244::/56"
                && subnet6.prefix_len() == 64
                && subnet6.addr() == e.gateway6().context("gateway6")?,
            "{n}: FLANNEL_IPV6_NETWORK={network6} FLANNEL_IPV6_SUBNET={subnet6} (the subnet's first usable address expected)"
        );
        ensure!(
            network6.contains(&subnet6.trunc()),
            "{n}: {subnet6} outside {network6}"
        );
        if let Some(other) = seen.insert(subnet6.trunc(), n.clone()) {
            bail!("{n} and {other} share the IPv6 subnet {subnet6}");
        }
        // One MTU that fits both encapsulations (IPv6's is 20 bytes longer).
        ensure!(
            e.mtu == 1430,
            "{n}: FLANNEL_MTU {} on a 1500 underlay, dual-stack",
            e.mtu
        );
    }

    // 2. Kernel state of flannel-v6.1 for every peer, and the lease table.
    wait_v6_entries(ov, &nodes, v6)?;
    for n in &nodes {
        let link = ov.lab().link(n, V6_DEV)?;
        let link4 = ov.lab().link(n, FLANNEL_DEV)?;
        ensure!(
            link.mtu == 1430 && link4.mtu == 1430,
            "{n}: MTU {:?} on {V6_DEV}, {:?} on {FLANNEL_DEV}",
            link.mtu,
            link4.mtu
        );
        let addrs = ov.lab().exec(
            n,
            &[
                "ip", "-6", "-o", "addr", "show", "dev", V6_DEV, "scope", "global",
            ],
        )?;
        let want = format!("{}/128", v6(n)?.network());
        ensure!(
            addrs.lines().count() == 1 && addrs.contains(&want),
            "{n}: {V6_DEV} should hold only {want}: {addrs}"
        );
    }
    let leases = ov.leases()?;
    println!("{}", ov.leases_table()?);
    for l in &leases {
        ensure!(
            !l.ipv6_subnet.is_empty() && !l.public_ipv6.is_empty() && !l.vtep_mac_v6.is_empty(),
            "lease without IPv6 fields: {l:?}"
        );
    }

    // 3. Host ping matrix: each host's pod gateway addresses, both families.
    for n in &nodes {
        ov.lab().add_bridge(n, "pods0", envs[n].subnet)?;
        let gw6 = format!("{}/64", envs[n].gateway6().context("gateway6")?);
        ov.lab()
            .exec(n, &["ip", "addr", "add", &gw6, "dev", "pods0", "nodad"])?;
    }
    let mut matrix = Vec::new();
    for from in &nodes {
        for to in nodes.iter().filter(|t| *t != from) {
            let (s4, d4) = (envs[from].gateway(), envs[to].gateway());
            let (s6, d6) = (
                envs[from].gateway6().context("gw6")?,
                envs[to].gateway6().context("gw6")?,
            );
            ov.ping_from(from, s4.into(), d4.into(), SETTLE)?;
            ov.ping_from(from, s6.into(), d6.into(), SETTLE)?;
            matrix.push(format!("{from} -> {to}: {d4} ok, {d6} ok"));
        }
    }
    println!(
        "dual-stack ping matrix (pod gateways):\n  {}",
        matrix.join("\n  ")
    );
    // The bridge plugin gives cni0 the same gateway addresses.
    for n in &nodes {
        ov.lab().exec(n, &["ip", "link", "del", "pods0"])?;
    }

    // 4. Pods attached by twill-cni: an address of each family, both default routes,
    //    reachable over both families, DF pings of exactly the MTU.
    let cni_bin = ov.bins().path("twill-cni");
    let mut attached = Vec::new();
    for (i, n) in nodes.iter().take(2).enumerate() {
        let (pod, result) = pods::attach(ov, &cni_bin, n, &format!("d{i}"))?;
        let ips: Vec<IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        let v6addr = ips
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            })
            .with_context(|| format!("pod on {n} got no IPv6 address: {result}"))?;
        ensure!(
            ips.len() == 2 && v6(n)?.contains(&v6addr),
            "pod on {n}: addresses {ips:?}, want one of {} and one of {}",
            envs[n].subnet_net(),
            v6(n)?
        );
        let routes6 = exec_in(&pod.netns, &["ip", "-6", "route"])?.ok()?;
        ensure!(
            routes6.contains(&format!(
                "default via {}",
                envs[n].gateway6().context("gw6")?
            )),
            "pod on {n}: no IPv6 default route via the gateway:\n{routes6}"
        );
        attached.push((pod, v6addr));
    }
    let ((pa, a6), (pb, b6)) = (&attached[0], &attached[1]);
    for (from, to) in [(pa, pb.addr), (pa, (*b6).into()), (pb, (*a6).into())] {
        wait_pod_ping(from, to)?;
    }
    let mtu = envs[&pa.node].mtu;
    for (dst, header) in [(pb.addr, 28), ((*b6).into(), 48)] {
        let fits = (mtu - header).to_string();
        let over = (mtu - header + 1).to_string();
        let d = dst.to_string();
        let ok = exec_in(
            &pa.netns,
            &[
                "ping", "-n", "-q", "-c", "1", "-W", "2", "-M", "do", "-s", &fits, &d,
            ],
        )?;
        ensure!(
            ok.success,
            "{mtu}-byte DF packet to {d} did not cross: {}",
            ok.stdout
        );
        let big = exec_in(
            &pa.netns,
            &[
                "ping", "-n", "-q", "-c", "1", "-W", "1", "-M", "do", "-s", &over, &d,
            ],
        )?;
        ensure!(!big.success, "a {}-byte DF packet crossed to {d}", mtu + 1);
    }

    // 5. Hand-deleted IPv6 neighbour, FDB entry and route come back.
    let (a, b) = (nodes[0].as_str(), nodes[1].as_str());
    let b6net = v6(b)?;
    let b_mac6 = ov.lab().mac(b, V6_DEV)?;
    let lab = ov.lab();
    lab.exec(
        a,
        &[
            "ip",
            "-6",
            "route",
            "del",
            &b6net.to_string(),
            "proto",
            "74",
        ],
    )?;
    lab.exec(
        a,
        &[
            "ip",
            "-6",
            "neigh",
            "del",
            &b6net.network().to_string(),
            "dev",
            V6_DEV,
        ],
    )?;
    lab.exec(a, &["bridge", "fdb", "del", &b_mac6, "dev", V6_DEV, "self"])?;
    ensure!(v6_entries(ov, a, b, b6net).is_err(), "the deletions took");
    wait_until(
        SETTLE,
        "node-a's IPv6 entries for node-b to be repaired",
        || v6_entries(ov, a, b, b6net),
    )?;

    // 6. kill -9 of the agent, then of the controller, under continuous pings of both
    //    families: nothing lost.
    let mut p4 =
        ContinuousPing::start_from(lab, a, envs[a].gateway().into(), envs[b].gateway().into())?;
    let mut p6 = ContinuousPing::start_from(
        lab,
        a,
        envs[a].gateway6().context("gw6")?.into(),
        envs[b].gateway6().context("gw6")?.into(),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    ov.kill_agent(b)?;
    ov.restart_agent(b)?;
    ov.wait_agent_healthy(b, SETTLE)?;
    ov.kill_controller()?;
    ov.restart_controller()?;
    ov.wait_agent_healthy(a, SETTLE)?;
    std::thread::sleep(Duration::from_secs(1));
    for (what, p) in [("IPv4", &mut p4), ("IPv6", &mut p6)] {
        let report = p.finish()?;
        let problems = report.problems(10, "agent and controller kill -9");
        ensure!(
            problems.is_empty(),
            "{what} ping: {problems:?} ({report:?})"
        );
        println!("{what} ping across kill -9 of agent and controller: {report:?}");
    }
    Ok(())
}

/// Waits until pod `from` gets an answer from `to`.
fn wait_pod_ping(from: &pods::Pod, to: IpAddr) -> Result<()> {
    wait_until(SETTLE, &format!("pod {} -> {to}", from.netns), || {
        let out = exec_in(
            &from.netns,
            &["ping", "-n", "-q", "-c", "1", "-W", "1", &to.to_string()],
        )?;
        ensure!(out.success, "{}", out.stdout.trim());
        Ok::<(), anyhow::Error>(())
    })
}

/// Waits until every host has flannel's IPv6 entries for every other host (`v6`: a
/// node's IPv6 subnet).
fn wait_v6_entries(
    ov: &Overlay,
    nodes: &[String],
    v6: impl Fn(&str) -> Result<Ipv6Net>,
) -> Result<()> {
    wait_until(CONVERGE, "every host's IPv6 entries for every peer", || {
        for on in nodes {
            for peer in nodes.iter().filter(|p| *p != on) {
                v6_entries(ov, on, peer, v6(peer)?)?;
            }
        }
        Ok::<(), anyhow::Error>(())
    })
}

/// `on` has flannel's IPv6 entries for `peer`: neighbour `S6.network -> MAC6`
/// (permanent), FDB `MAC6 -> peer's IPv6 underlay address`, route `S6 via S6.network
/// dev flannel-v6.1 onlink proto 74`.
fn v6_entries(ov: &Overlay, on: &str, peer: &str, subnet6: Ipv6Net) -> Result<()> {
    let lab = ov.lab();
    let mac = lab.mac(peer, V6_DEV)?;
    let gw: Ipv6Addr = subnet6.network();
    let neigh = lab.exec(
        on,
        &[
            "ip",
            "-6",
            "neigh",
            "show",
            "dev",
            V6_DEV,
            "nud",
            "permanent",
        ],
    )?;
    ensure!(
        neigh
            .lines()
            .any(|l| l.starts_with(&format!("{gw} ")) && l.contains(&mac)),
        "{on}: no permanent neighbour {gw} -> {mac} on {V6_DEV}: {neigh}"
    );
    let fdb = lab.exec(on, &["bridge", "fdb", "show", "dev", V6_DEV])?;
    let public6 = ov.node_host(peer).ip6.to_string();
    ensure!(
        fdb.lines()
            .any(|l| l.starts_with(&mac) && l.contains(&format!("dst {public6}"))),
        "{on}: no FDB entry {mac} dst {public6} on {V6_DEV}: {fdb}"
    );
    let routes = lab.exec(on, &["ip", "-6", "route", "show", "proto", "74"])?;
    ensure!(
        routes.lines().any(
            |l| l.starts_with(&format!("{subnet6} via {gw} dev {V6_DEV}")) && l.contains("onlink")
        ),
        "{on}: no route {subnet6} via {gw} dev {V6_DEV} onlink: {routes}"
    );
    Ok(())
}

const V6_ONLY_CONF: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;

/// IPv6-only: `EnableIPv4: false` on an underlay without IPv4 (the controller listens
/// on, and the agents dial, IPv6 addresses). No IPv4 device, lease field or
/// subnet.env line; hosts and pods reach each other over IPv6; kill -9 of an agent
/// and of the controller loses no ping.
#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn ipv6_only_hosts_and_pods_reach_each_other() {
    let Some(ov) = require_lab(
        "e2e_dual_stack (IPv6-only)",
        Overlay::start(
            OverlayConfig::three_nodes()
                .net_conf(V6_ONLY_CONF)
                .ipv6_only(true),
        ),
    ) else {
        return;
    };
    ov.run_scenario(ipv6_only);
}

fn ipv6_only(ov: &Overlay) -> Result<()> {
    let nodes: Vec<String> = ov.nodes().to_vec();
    let lab = ov.lab();

    // 1. subnet.env: the IPv6 lines only, in flannel's order; one MTU for the IPv6
    //    tunnel (1500 - 70).
    let envs: BTreeMap<String, twill_common::SubnetEnv> =
        wait_until(CONVERGE, "every node's subnet.env", || {
            let mut envs = BTreeMap::new();
            for n in &nodes {
                let env = twill_common::SubnetEnv::read(&ov.subnet_file(n))?
                    .with_context(|| format!("{n}: no subnet.env yet"))?;
                envs.insert(n.clone(), env);
            }
            Ok::<_, anyhow::Error>(envs)
        })?;
    let mut seen = BTreeMap::new();
    for n in &nodes {
        let text = std::fs::read_to_string(ov.subnet_file(n))?;
        let keys: Vec<&str> = text.lines().filter_map(|l| l.split('=').next()).collect();
        ensure!(
            keys == [
                "FLANNEL_IPV6_NETWORK",
                "FLANNEL_IPV6_SUBNET",
                "FLANNEL_MTU",
                "FLANNEL_IPMASQ"
            ],
            "{n}: subnet.env keys {keys:?}"
        );
        let e = &envs[n];
        let s6 = e.ipv6_subnet.context("no FLANNEL_IPV6_SUBNET")?;
        ensure!(
            e.ipv6_network.map(|n| n.to_string()).as_deref() == Some("fd00:10:244::/56")
                && s6.prefix_len() == 64
                && e.mtu == Some(1430),
            "{n}: {e:?}"
        );
        if let Some(other) = seen.insert(s6, n.clone()) {
            bail!("{n} and {other} share the IPv6 subnet {s6}");
        }
    }
    let v6 = |n: &str| envs[n].ipv6_subnet.context("no IPv6 subnet");
    let gw = |n: &str| v6(n).map(|s| Ipv6Addr::from(u128::from(s.network()) + 1));

    // 2. Kernel state: no IPv4 anywhere in the underlay or the overlay, flannel-v6.1
    //    with flannel's entries for every peer.
    for n in &nodes {
        let v4 = lab.exec(n, &["ip", "-4", "-o", "addr", "show", "scope", "global"])?;
        ensure!(v4.trim().is_empty(), "{n} has IPv4 addresses: {v4}");
        ensure!(
            !lab.try_exec(n, &["ip", "link", "show", FLANNEL_DEV])?
                .success(),
            "{n}: {FLANNEL_DEV} exists on an IPv6-only network"
        );
    }
    wait_v6_entries(ov, &nodes, v6)?;
    for n in &nodes {
        let link = lab.link(n, V6_DEV)?;
        ensure!(link.mtu == 1430, "{n}: MTU {:?} on {V6_DEV}", link.mtu);
    }
    println!("{}", ov.leases_table()?);
    for l in &ov.leases()? {
        ensure!(
            l.subnet.is_empty()
                && l.public_ip.is_empty()
                && l.vtep_mac.is_empty()
                && !l.ipv6_subnet.is_empty()
                && !l.vtep_mac_v6.is_empty(),
            "an IPv6-only lease with IPv4 fields or without IPv6 ones: {l:?}"
        );
    }

    // 3. Host ping matrix over IPv6, pod gateway to pod gateway.
    for n in &nodes {
        let addr = format!("{}/64", gw(n)?);
        lab.exec(n, &["ip", "link", "add", "pods0", "type", "bridge"])?;
        lab.exec(n, &["ip", "addr", "add", &addr, "dev", "pods0", "nodad"])?;
        lab.exec(n, &["ip", "link", "set", "pods0", "up"])?;
    }
    let mut matrix = Vec::new();
    for from in &nodes {
        for to in nodes.iter().filter(|t| *t != from) {
            ov.ping_from(from, gw(from)?.into(), gw(to)?.into(), SETTLE)?;
            matrix.push(format!("{from} -> {to}: {} ok", gw(to)?));
        }
    }
    println!(
        "IPv6-only ping matrix (pod gateways):\n  {}",
        matrix.join("\n  ")
    );
    for n in &nodes {
        lab.exec(n, &["ip", "link", "del", "pods0"])?;
    }

    // 4. Pods attached by twill-cni: one IPv6 address each, reachable across hosts.
    let cni_bin = ov.bins().path("twill-cni");
    let mut pods_up = Vec::new();
    for (i, n) in nodes.iter().take(2).enumerate() {
        let (pod, result) = pods::attach(ov, &cni_bin, n, &format!("s{i}"))?;
        let ips = result["ips"].as_array().map_or(0, Vec::len);
        ensure!(
            ips == 1 && matches!(pod.addr, IpAddr::V6(a) if v6(n)?.contains(&a)),
            "pod on {n}: {result}"
        );
        pods_up.push(pod);
    }
    let (pa, pb) = (&pods_up[0], &pods_up[1]);
    for (from, to) in [(pa, pb.addr), (pb, pa.addr)] {
        wait_pod_ping(from, to)?;
    }

    // 5. kill -9 of an agent, then of the controller, under a continuous IPv6 ping.
    let (a, b) = (nodes[0].as_str(), nodes[1].as_str());
    // Between the pods' gateways, which cni0 holds on both hosts.
    let mut ping = ContinuousPing::start_from(lab, a, gw(a)?.into(), gw(b)?.into())?;
    std::thread::sleep(Duration::from_secs(1));
    ov.kill_agent(b)?;
    ov.restart_agent(b)?;
    ov.wait_agent_healthy(b, SETTLE)?;
    ov.kill_controller()?;
    ov.restart_controller()?;
    ov.wait_agent_healthy(a, SETTLE)?;
    std::thread::sleep(Duration::from_secs(1));
    let report = ping.finish()?;
    let problems = report.problems(10, "agent and controller kill -9");
    ensure!(problems.is_empty(), "IPv6 ping: {problems:?} ({report:?})");
    println!("IPv6-only ping across kill -9 of agent and controller: {report:?}");
    Ok(())
}
