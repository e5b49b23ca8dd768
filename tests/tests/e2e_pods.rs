//! End to end with pods: a controller and three hosts in network namespaces, two
//! "pods" per host (network namespaces of their own) attached by the real `twill-cni`
//! binary, invoked exactly as a container runtime invokes a conflist's plugin, which
//! delegates to the real `bridge` and `host-local` plugins in /usr/lib/cni.
//!
//! Every pod pings every other pod (same host and across hosts); a TCP transfer with
//! `iperf3` crosses the overlay from a pod on one host to a pod on another, and the
//! same transfer between the hosts' underlay addresses gives the encapsulation cost
//! (both throughputs and their ratio are printed); a ping of exactly the overlay MTU
//! with DF set passes and one byte more does not; DEL removes the pod's veth, releases
//! its address in host-local's store, and a second DEL succeeds.
//!
//! The same runs twice: over VXLAN, and over the host-gw backend (plain routes via
//! the peers' underlay addresses, no device, the underlay's MTU).
//!
//! Needs root, network namespaces, `iperf3` and Debian's containernetworking-plugins;
//! without them it is skipped loudly, or fails when `CI` is set.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv4Net;
use serde_json::{json, Value};
use twill_tests::kit::skip;
use twill_tests::pods::{self, cni, cni_data_dir, exec_in, ipam_dir, Pod, CNI_PATH, NETWORK};
use twill_tests::{require_lab, wait_until, Check, Overlay, OverlayConfig, SubnetEnv};

const CONVERGE: Duration = Duration::from_secs(60);
/// Pods per host.
const PODS_PER_HOST: usize = 2;
/// iperf3's port (each server runs in a namespace of its own).
const IPERF_PORT: u16 = 5201;
/// Seconds each iperf3 transfer lasts.
const IPERF_SECONDS: &str = "3";
/// How many underlay/overlay pairs of transfers to run.
const IPERF_ROUNDS: usize = 3;

/// The backend a run uses, and what it implies for the pods.
struct Backend {
    /// Its name in logs and printed figures.
    name: &'static str,
    net_conf: &'static str,
    /// FLANNEL_MTU on a 1500-byte underlay.
    mtu: u32,
}

const VXLAN: Backend = Backend {
    name: "VXLAN",
    net_conf: r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
    mtu: 1450,
};

const HOST_GW: Backend = Backend {
    name: "host-gw",
    net_conf: r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
    mtu: 1500,
};

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn pods_attached_by_twill_cni_talk_across_the_overlay() {
    run("e2e_pods", &VXLAN);
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn pods_attached_by_twill_cni_talk_over_host_gw() {
    run("e2e_pods host-gw", &HOST_GW);
}

fn run(test: &str, backend: &Backend) {
    if let Some(why) = missing_tools() {
        skip(test, &why);
        return;
    }
    // Declared before the overlay so that it is dropped after it: on a failure the
    // lab's dump still shows cni0 and the pods' veths, then this guard deletes the pod
    // namespaces (and kills what runs inside them) — also on panic.
    let mut pods = PodGuard::default();
    let config = OverlayConfig::three_nodes().net_conf(backend.net_conf);
    let Some(ov) = require_lab(test, Overlay::start(config)) else {
        return;
    };
    if let Err(e) = scenario(&ov, &mut pods, backend) {
        pods.dump();
        panic!("{e:#}");
    }
}

/// What the machine lacks to run this test, if anything (root is `require_lab`'s).
fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    for p in ["bridge", "host-local"] {
        if !Path::new(CNI_PATH).join(p).is_file() {
            missing.push(format!("{CNI_PATH}/{p} (containernetworking-plugins)"));
        }
    }
    let has_iperf3 = Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_iperf3 {
        missing.push("iperf3 (apt-get install -y iperf3)".into());
    }
    if missing.is_empty() {
        None
    } else {
        Some(format!("needs {}", missing.join(", ")))
    }
}

fn scenario(ov: &Overlay, guard: &mut PodGuard, backend: &Backend) -> Result<()> {
    let (a, b) = ("node-a", "node-b");
    let envs = ov.wait_converged(CONVERGE)?;
    for (node, env) in &envs {
        ensure!(
            env.mtu == backend.mtu,
            "{node}: FLANNEL_MTU {} with a 1500 underlay and {}, not {}",
            env.mtu,
            backend.name,
            backend.mtu
        );
    }
    let cni_bin = ov.bins().path("twill-cni");
    ensure!(
        cni_bin.is_file(),
        "{} missing: run `cargo build --workspace --bins` first",
        cni_bin.display()
    );

    // 1. Two pods per host, attached by twill-cni (ADD) as a runtime would.
    let mut pods = Vec::new();
    for (h, node) in ov.nodes().iter().enumerate() {
        for i in 0..PODS_PER_HOST {
            let pod = add_pod(ov, &cni_bin, node, &format!("{h}{i}"), &envs[node.as_str()])?;
            guard.netns.push(pod.netns.clone());
            pods.push(pod);
        }
    }
    for p in &pods {
        println!(
            "pod {} on {} ({}): {} (host veth {})",
            p.container_id, p.node, p.netns, p.addr, p.host_veth
        );
    }

    // 2. Every pod pings every other pod, on the same host and across hosts.
    for from in &pods {
        for to in pods.iter().filter(|t| t.netns != from.netns) {
            ping(&from.netns, to.addr, &[]).with_context(|| {
                format!(
                    "pod {} on {} -> pod {} ({}) on {}",
                    from.netns, from.node, to.netns, to.addr, to.node
                )
            })?;
        }
    }

    // 2b. Each agent knows its pods from twill-cni's reports (REFERENCE 2.11): its
    //     metrics count them, and the addresses used match host-local's files.
    for node in ov.nodes() {
        let held = std::fs::read_dir(ipam_dir(ov, node).join(NETWORK))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<IpAddr>().ok())
            .count();
        ensure!(
            held == PODS_PER_HOST,
            "host-local on {node} holds {held} addresses"
        );
        wait_until(
            CONVERGE,
            &format!("{node}'s agent to count its pods"),
            || {
                let series = [
                    "twill_agent_pod_attachments",
                    "twill_pod_ips_used{network=\"default\",family=\"ipv4\"}",
                ];
                let seen = match ov.agent_metric_values(node, &series) {
                    Ok(v) => v,
                    Err(e) => return Check::NotYet(format!("{e:#}")),
                };
                let want = vec![Some(PODS_PER_HOST as f64), Some(held as f64)];
                if seen == want {
                    Check::Ready(())
                } else {
                    Check::NotYet(format!("(attachments, used) {seen:?}, want {want:?}"))
                }
            },
        )?;
    }

    // 2c. And the controller lists every pod, with its node and address, from one place.
    wait_until(CONVERGE, "`twillctl pods` to list every pod", || {
        let out = match ov.twillctl(&["pods", "-o", "json"]) {
            Ok(o) => o,
            Err(e) => return Check::NotYet(format!("{e:#}")),
        };
        let doc: Value = match serde_json::from_str(&out) {
            Ok(v) => v,
            Err(e) => return Check::Fatal(format!("not JSON ({e}): {out}")),
        };
        let mut listed: Vec<(String, String, String)> = doc["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["container_id"].as_str().unwrap_or_default().to_string(),
                    p["node"].as_str().unwrap_or_default().to_string(),
                    p["ips"][0].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        listed.sort();
        let mut want: Vec<(String, String, String)> = pods
            .iter()
            .map(|p| (p.container_id.clone(), p.node.clone(), p.addr.to_string()))
            .collect();
        want.sort();
        if listed == want {
            Check::Ready(())
        } else {
            Check::NotYet(format!("listed {listed:?}, want {want:?}"))
        }
    })?;

    // 2c'. `twillctl ipam` counts what host-local holds on each node.
    wait_until(
        CONVERGE,
        "`twillctl ipam` to match host-local's files",
        || {
            let out = match ov.twillctl(&["ipam", "-o", "json"]) {
                Ok(o) => o,
                Err(e) => return Check::NotYet(format!("{e:#}")),
            };
            let doc: Value = match serde_json::from_str(&out) {
                Ok(v) => v,
                Err(e) => return Check::Fatal(format!("not JSON ({e}): {out}")),
            };
            let mut seen: Vec<(String, u64, u64)> = doc["subnets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| {
                    (
                        u["node"].as_str().unwrap_or_default().to_string(),
                        u["used"].as_u64().unwrap_or(u64::MAX),
                        u["total"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            seen.sort();
            let mut want = Vec::new();
            for node in ov.nodes() {
                let held = std::fs::read_dir(ipam_dir(ov, node).join(NETWORK))
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<IpAddr>().ok())
                            .count() as u64
                    })
                    .unwrap_or(0);
                want.push((node.clone(), held, 253));
            }
            if seen == want {
                Check::Ready(())
            } else {
                Check::NotYet(format!("(node, used, total) {seen:?}, want {want:?}"))
            }
        },
    )?;

    // 2d. `twillctl ip` names the pod for an address, and the node for an unused one.
    let p = &pods[0];
    let said = ov.twillctl(&["ip", &p.addr.to_string()])?;
    ensure!(
        said.contains(&format!("on {} ", p.node)) && said.contains("is held by"),
        "twillctl ip {}: {said}",
        p.addr
    );
    let subnet = envs[p.node.as_str()].subnet_net();
    let unused = std::net::Ipv4Addr::from(u32::from(subnet.network()) + 200);
    let said = ov.twillctl(&["ip", &unused.to_string()])?;
    ensure!(
        said.contains(&format!("is free, {}'s subnet {subnet}", p.node)),
        "twillctl ip {unused}: {said}"
    );

    // 3. A ping of exactly the overlay MTU with DF set crosses hosts; one byte more
    //    does not (the pod's eth0 has FLANNEL_MTU).
    let (pa, pb) = (pod_on(&pods, a, 0), pod_on(&pods, b, 0));
    let payload = envs[a].mtu - 28; // IPv4 20 + ICMP 8
    let size = payload.to_string();
    ping(&pa.netns, pb.addr, &["-M", "do", "-s", &size]).with_context(|| {
        format!(
            "a {}-byte packet (payload {payload}) with DF set from {} to {}",
            envs[a].mtu, pa.addr, pb.addr
        )
    })?;
    let over = (payload + 1).to_string();
    let out = exec_in(
        &pa.netns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            &over,
            &pb.addr.to_string(),
        ],
    )?;
    ensure!(
        !out.success,
        "a {}-byte packet with DF set got through from {} to {}, the overlay MTU is {}: {}",
        envs[a].mtu + 1,
        pa.addr,
        pb.addr,
        envs[a].mtu,
        out.stdout
    );

    // 4. Throughput: underlay host to host and overlay pod to pod across the same two
    //    hosts, alternating (never at once), [`IPERF_ROUNDS`] times each; the medians
    //    give the ratio, so that one round disturbed by other load on the machine does
    //    not decide it.
    let (mut underlay, mut overlay) = (Vec::new(), Vec::new());
    for round in 1..=IPERF_ROUNDS {
        let u = iperf(
            &ov.node_host(b).netns,
            &ov.node_host(a).netns,
            ov.public_ip(b).into(),
            guard,
        )
        .with_context(|| {
            format!("round {round}: iperf3 between the underlay addresses of node-a and node-b")
        })?;
        let o = iperf(&pb.netns, &pa.netns, pb.addr, guard).with_context(|| {
            format!(
                "round {round}: iperf3 from pod {} on node-a to pod {} on node-b",
                pa.addr, pb.addr
            )
        })?;
        ensure!(
            o.bits_per_second > 0.0,
            "round {round}: no bytes crossed the overlay: {o:?}"
        );
        println!(
            "throughput round {round}: underlay {:.2} Gbit/s ({} retransmits), \
             overlay {:.2} Gbit/s ({} retransmits)",
            u.gbps(),
            u.retransmits,
            o.gbps(),
            o.retransmits
        );
        underlay.push(u.bits_per_second);
        overlay.push(o.bits_per_second);
    }
    let (u, o) = (median(&mut underlay), median(&mut overlay));
    println!(
        "throughput underlay {} -> {} (host to host, median of {IPERF_ROUNDS} x {IPERF_SECONDS} s): \
         {:.2} Gbit/s",
        ov.public_ip(a),
        ov.public_ip(b),
        u / 1e9
    );
    println!(
        "throughput overlay  {} -> {} (pod to pod over {}, median of {IPERF_ROUNDS} x {IPERF_SECONDS} s): \
         {:.2} Gbit/s",
        pa.addr,
        pb.addr,
        backend.name,
        o / 1e9
    );
    println!(
        "throughput ratio overlay/underlay ({}): {:.3} (cost {:.1} %)",
        backend.name,
        o / u,
        (1.0 - o / u) * 100.0
    );

    // 5. DEL removes the pod's veth and eth0 and releases its address; DEL again
    //    succeeds; the other pods keep theirs.
    let gone = pod_on(&pods, a, 1);
    del_pod(ov, &cni_bin, gone)?;
    for p in pods.iter().filter(|p| p.netns != gone.netns) {
        let lease = ipam_dir(ov, &p.node).join(NETWORK).join(p.addr.to_string());
        ensure!(
            lease.is_file(),
            "DEL of {} released {}'s address too: {} is gone",
            gone.container_id,
            p.container_id,
            lease.display()
        );
    }
    ping(&pb.netns, pa.addr, &[]).context("node-b's pod to node-a's remaining pod after DEL")?;
    Ok(())
}

fn pod_on<'a>(pods: &'a [Pod], node: &str, i: usize) -> &'a Pod {
    pods.iter()
        .filter(|p| p.node == node)
        .nth(i)
        .expect("pod exists")
}

/// ADD: attaches a pod and checks what it got: an address in the host's subnet with
/// the subnet's gateway, eth0 with FLANNEL_MTU, a default route via the gateway, a
/// host-side veth on cni0, a lease file in host-local's store.
fn add_pod(ov: &Overlay, cni_bin: &Path, node: &str, tag: &str, env: &SubnetEnv) -> Result<Pod> {
    let (pod, result) = pods::attach(ov, cni_bin, node, tag)?;
    let what = format!("ADD of {} on {node}", pod.container_id);
    ensure!(
        result["cniVersion"] == json!("1.0.0"),
        "{what}: result version {}",
        result["cniVersion"]
    );
    let ip = &result["ips"][0];
    let addr: Ipv4Net = ip["address"].as_str().unwrap_or_default().parse()?;
    ensure!(
        addr.trunc() == env.subnet_net() && addr.prefix_len() == env.subnet.prefix_len(),
        "{what}: address {addr} is not in the host's subnet {}",
        env.subnet_net()
    );
    ensure!(
        ip["gateway"] == json!(env.gateway().to_string()),
        "{what}: gateway {} instead of {}",
        ip["gateway"],
        env.gateway()
    );

    let link = exec_in(&pod.netns, &["ip", "-j", "link", "show", "dev", "eth0"])?.ok()?;
    let link: Value = serde_json::from_str(&link)?;
    ensure!(
        link[0]["mtu"] == json!(env.mtu),
        "{what}: pod eth0 MTU {} instead of FLANNEL_MTU {}",
        link[0]["mtu"],
        env.mtu
    );
    let routes = exec_in(&pod.netns, &["ip", "-4", "route"])?.ok()?;
    ensure!(
        routes.contains(&format!("default via {}", env.gateway())),
        "{what}: pod routes lack the default via the gateway:\n{routes}"
    );
    let host_ns = &ov.node_host(node).netns;
    let veth = exec_in(
        host_ns,
        &["ip", "-o", "link", "show", "dev", &pod.host_veth],
    )?
    .ok()?;
    ensure!(
        veth.contains("master cni0"),
        "{what}: host veth not on cni0: {veth}"
    );
    let lease = ipam_dir(ov, node).join(NETWORK).join(pod.addr.to_string());
    ensure!(
        lease.is_file(),
        "{what}: host-local has no lease file {}",
        lease.display()
    );
    Ok(pod)
}

/// DEL twice: the first removes the host veth and the pod's eth0 and releases the
/// address (host-local's lease file and twill-cni's saved config are gone); the second
/// succeeds with nothing to do.
fn del_pod(ov: &Overlay, cni_bin: &Path, pod: &Pod) -> Result<()> {
    let node = &pod.node;
    let host_ns = &ov.node_host(node).netns;
    let lease = ipam_dir(ov, node).join(NETWORK).join(pod.addr.to_string());
    let saved = cni_data_dir(ov, node).join(&pod.container_id);
    ensure!(
        saved.is_file(),
        "twill-cni did not save {}",
        saved.display()
    );
    let out = cni(ov, cni_bin, node, "DEL", pod)?;
    ensure!(out.is_none(), "DEL printed {out:?}");
    let veth = exec_in(host_ns, &["ip", "link", "show", "dev", &pod.host_veth])?;
    ensure!(
        !veth.success,
        "DEL of {} left the host veth {}: {}",
        pod.container_id,
        pod.host_veth,
        veth.stdout
    );
    let eth0 = exec_in(&pod.netns, &["ip", "link", "show", "dev", "eth0"])?;
    ensure!(
        !eth0.success,
        "DEL of {} left eth0 in {}",
        pod.container_id,
        pod.netns
    );
    ensure!(
        !lease.exists(),
        "DEL of {} did not release {}: {} is still there",
        pod.container_id,
        pod.addr,
        lease.display()
    );
    ensure!(
        !saved.exists(),
        "DEL of {} left the saved delegate config {}",
        pod.container_id,
        saved.display()
    );
    let again = cni(ov, cni_bin, node, "DEL", pod).context("the second DEL")?;
    ensure!(again.is_none(), "the second DEL printed {again:?}");
    Ok(())
}

/// Pings `addr` from `netns` with `extra` options: up to 3 echo requests, one at a
/// time, each waiting up to 1 s; the first reply is success.
fn ping(netns: &str, addr: IpAddr, extra: &[&str]) -> Result<()> {
    let a = addr.to_string();
    let mut args = vec!["ping", "-n", "-q", "-c", "1", "-W", "1"];
    args.extend_from_slice(extra);
    args.push(&a);
    let mut last = String::new();
    for _ in 0..3 {
        let out = exec_in(netns, &args)?;
        if out.success {
            return Ok(());
        }
        last = format!("{}{}", out.stdout.trim(), out.stderr.trim());
    }
    bail!(
        "`ping {}` in {netns}: no reply to 3 echo requests: {last}",
        args[1..].join(" ")
    )
}

/// The median of `v` (not empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One iperf3 measurement.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    /// What the receiver got (`end.sum_received.bits_per_second`).
    bits_per_second: f64,
    /// The sender's TCP retransmissions.
    retransmits: u64,
}

impl Throughput {
    fn gbps(&self) -> f64 {
        self.bits_per_second / 1e9
    }
}

/// A one-off `iperf3` server in `server_ns` listening on `server_addr`, a client in
/// `client_ns` sending to it for [`IPERF_SECONDS`]; what the receiver measured.
fn iperf(
    server_ns: &str,
    client_ns: &str,
    server_addr: IpAddr,
    guard: &mut PodGuard,
) -> Result<Throughput> {
    let addr = server_addr.to_string();
    let port = IPERF_PORT.to_string();
    let server = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", &addr,
        ])
        .args(["-p", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start the iperf3 server in {server_ns}"))?;
    let server = guard.adopt(server);
    let listening = format!("{addr}:{port}");
    wait_until(
        Duration::from_secs(10),
        &format!("iperf3 to listen on {listening} in {server_ns}"),
        || exec_in(server_ns, &["ss", "-Hltn"]).is_ok_and(|o| o.stdout.contains(&listening)),
    )?;
    let out = exec_in(
        client_ns,
        &[
            "iperf3",
            "-c",
            &addr,
            "-p",
            &port,
            "-t",
            IPERF_SECONDS,
            "-J",
            "--connect-timeout",
            "5000",
        ],
    )?;
    guard.reap(server);
    let doc: Value = serde_json::from_str(&out.stdout).with_context(|| {
        format!(
            "`{}` printed no JSON ({}): {}{}",
            out.cmdline,
            if out.success { "exit 0" } else { "failed" },
            out.stdout,
            out.stderr
        )
    })?;
    if let Some(err) = doc.get("error") {
        bail!("`{}`: iperf3 error {err}", out.cmdline);
    }
    ensure!(out.success, "`{}` failed: {}", out.cmdline, out.stderr);
    let end = &doc["end"];
    let bits_per_second = end["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received.bits_per_second in {end}"))?;
    let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok(Throughput {
        bits_per_second,
        retransmits,
    })
}

/// The pod namespaces this test made and the processes it started in them (iperf3
/// servers). Dropping it — also on panic — kills those processes and anything else
/// inside its namespaces, and deletes the namespaces; it touches nothing else.
#[derive(Default)]
struct PodGuard {
    netns: Vec<String>,
    children: Vec<Option<Child>>,
}

impl PodGuard {
    /// Prints each pod namespace's addresses and routes to stderr (before a panic,
    /// while the hosts still exist: the lab's dump follows when it is dropped).
    fn dump(&self) {
        for ns in &self.netns {
            let mut state = String::new();
            for args in [["-br", "addr"], ["-4", "route"]] {
                if let Ok(o) = Command::new("ip").args(["-n", ns]).args(args).output() {
                    state.push_str(&String::from_utf8_lossy(&o.stdout));
                    state.push_str(&String::from_utf8_lossy(&o.stderr));
                }
            }
            eprintln!("\n----- twill e2e_pods: pod netns {ns} -----\n{state}");
        }
    }

    /// Keeps `child` to kill on drop; the index for [`PodGuard::reap`].
    fn adopt(&mut self, child: Child) -> usize {
        self.children.push(Some(child));
        self.children.len() - 1
    }

    /// Waits a moment for a child that should be exiting on its own, then kills it.
    fn reap(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            for _ in 0..25 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PodGuard {
    fn drop(&mut self) {
        for mut c in self.children.iter_mut().filter_map(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.netns.drain(..).rev() {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
