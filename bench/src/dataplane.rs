//! The agent's data plane against the kernel's own floor, in a fresh network namespace
//! per measurement (a thread that `unshare(CLONE_NEWNET)`s, as
//! agent/tests/dataplane_kernel.rs does; commands forked from it share it). Only
//! addresses inside that namespace are used: TEST-NET-1 on a veth pair that leads
//! nowhere, 10/8 pod subnets and 198.18/15 peer addresses as data.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::dataplane::{DataPlane, Family, Underlay, VxlanSpec};
use twill_agent::reconcile::{apply_diff, desired, reconcile, Topology};
use twill_common::model::{Mac, Peer};

use crate::stats::median;

const IP: &str = "/usr/sbin/ip";
const BRIDGE: &str = "/usr/sbin/bridge";

/// Results for one peer count (medians over the repeats).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataplaneOutcome {
    /// Peers.
    pub peers: usize,
    /// Every peer had an IPv4 and an IPv6 side (two devices, twice the entries).
    #[serde(default)]
    pub dual_stack: bool,
    /// Repeats the medians are taken over.
    pub repeats: usize,
    /// Twill (`reconcile(desired(..))` over `Netlink`) programming every peer from
    /// empty, ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub twill_full_ms: f64,
    /// Twill applying one change (a peer joins or leaves), ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub twill_change_ms: f64,
    /// `ip -batch` (neighbours + routes) plus `bridge -batch` (FDB), from empty, ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub batch_full_ms: f64,
    /// The same tools applying one change (one process each), ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub batch_change_ms: f64,
    /// Reading the kernel state (`read_state`, the periodic resync) with all peers programmed, ms.
    #[serde(deserialize_with = "crate::stats::f64_or_nan")]
    pub twill_read_state_ms: f64,
}

fn sh(bin: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("run {bin}"))?;
    if !out.status.success() {
        bail!(
            "{bin} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the data-plane scenario can run here (root and network namespaces).
pub fn available() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("needs root (network namespaces)".into());
    }
    if !std::path::Path::new(IP).exists() || !std::path::Path::new(BRIDGE).exists() {
        return Err(format!("needs {IP} and {BRIDGE} (iproute2)"));
    }
    Ok(())
}

/// Runs `body` on a new thread inside a fresh network namespace with `lo` up and the
/// underlay `veth0` (192.0.2.1/24) up.
fn in_netns<T: Send + 'static>(body: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(move || -> Result<T> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow!("unshare(CLONE_NEWNET): {e}"))?;
        let links = sh(IP, &["-o", "link", "show"])?;
        if links.lines().count() != 1 {
            bail!("not a fresh namespace: {links}");
        }
        sh(IP, &["link", "set", "lo", "up"])?;
        sh(
            IP,
            &[
                "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
            ],
        )?;
        sh(IP, &["addr", "add", "192.0.2.1/24", "dev", "veth0"])?;
        sh(IP, &["link", "set", "veth0", "up"])?;
        sh(IP, &["link", "set", "veth1", "up"])?;
        body()
    })
    .join()
    .map_err(|_| anyhow!("data-plane thread panicked"))?
}

/// One family's side of the measurement: its device, this node's tunnel address and
/// the address given to the device.
struct Side {
    family: Family,
    device: &'static str,
    local: &'static str,
    own: &'static str,
}

const V4: Side = Side {
    family: Family::V4,
    device: "flannel.1",
    local: "192.0.2.1",
    own: "10.255.255.0",
};

const V6: Side = Side {
    family: Family::V6,
    device: "flannel-v6.1",
    local: "2001:db8:1::1",
    own: "fd00:10:ffff:ffff::",
};

fn sides(dual: bool) -> &'static [Side] {
    if dual {
        &[V4, V6]
    } else {
        &[V4]
    }
}

/// Peer `i` of `family`: IPv4 subnet 10.(1+i/256).(i%256).0/24 with a public IP in
/// 198.18/15, or IPv6 subnet fd00:10:(i/65536):(i%65536)::/64 with a public IP in
/// 2001:db8:2::/64; a MAC of its own per family.
fn peer(family: Family, i: usize) -> (String, Peer) {
    let (subnet, public_ip): (ipnet::IpNet, IpAddr) = match family {
        Family::V4 => (
            format!("10.{}.{}.0/24", 1 + i / 256, i % 256)
                .parse()
                .expect("subnet"),
            Ipv4Addr::new(198, 18 + ((i >> 16) & 1) as u8, (i >> 8) as u8, i as u8).into(),
        ),
        Family::V6 => (
            format!("fd00:10:{:x}:{:x}::/64", i >> 16, i & 0xffff)
                .parse()
                .expect("subnet"),
            Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, (i >> 16) as u16, i as u16).into(),
        ),
    };
    (
        format!("peer-{i:05}"),
        Peer {
            subnet,
            public_ip,
            vtep_mac: Some(vtep_mac(family, i)),
        },
    )
}

fn vtep_mac(family: Family, i: usize) -> Mac {
    let tag = match family {
        Family::V4 => 0x58,
        Family::V6 => 0x59,
    };
    Mac([0x0a, tag, (i >> 16) as u8, (i >> 8) as u8, i as u8, 0x01])
}

fn ifindex(name: &str) -> Result<u32> {
    let out = sh(IP, &["-o", "link", "show", name])?;
    out.split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| anyhow!("no ifindex for {name}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Gives veth0 the IPv6 underlay address when the run is dual-stack.
fn ipv6_underlay(dual: bool) -> Result<()> {
    if dual {
        sh(
            IP,
            &["addr", "add", "2001:db8:1::1/64", "dev", "veth0", "nodad"],
        )?;
    }
    Ok(())
}

/// Checks that the kernel holds `peers` Twill routes of each family the run uses.
fn check_routes(dual: bool, peers: usize, who: &str) -> Result<()> {
    for side in sides(dual) {
        let fam = match side.family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        let routes = sh(IP, &[fam, "route", "show", "proto", "74"])?;
        if routes.lines().count() != peers {
            bail!(
                "{who}: {} {} routes in the kernel, {peers} expected",
                routes.lines().count(),
                side.family
            );
        }
    }
    Ok(())
}

/// One family's device and peer table in the Twill run.
struct Plane {
    dev: twill_agent::dataplane::Device,
    topo: Topology,
    table: BTreeMap<String, Peer>,
    family: Family,
}

/// Twill: full programming, then `changes` single changes; (full, change, read) ms.
/// With `dual`, every peer has an IPv4 and an IPv6 side, each on its own device.
fn twill_once(peers: usize, changes: usize, dual: bool) -> Result<(f64, f64, f64)> {
    in_netns(move || {
        ipv6_underlay(dual)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let nl = Netlink::new().map_err(|e| anyhow!("{e}"))?;
            let veth0 = ifindex("veth0")?;
            let mut planes = Vec::new();
            for side in sides(dual) {
                let local: IpAddr = side.local.parse()?;
                let spec = VxlanSpec {
                    name: side.device.into(),
                    vni: 1,
                    local,
                    port: 8472,
                    underlay_index: veth0,
                    mtu: 1430,
                    learning: false,
                    gbp: false,
                    tx_checksum_offload: true,
                };
                let dev = nl.ensure_device(&spec).await.map_err(|e| anyhow!("{e}"))?;
                nl.ensure_address(&dev, side.own.parse()?)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                let prefix = side.family.host_prefix_len() - 8;
                planes.push(Plane {
                    dev,
                    topo: Topology {
                        device: Some(dev),
                        underlay: Underlay {
                            index: veth0,
                            name: "veth0".into(),
                            addr: ipnet::IpNet::new(local, prefix)?,
                            mtu: 1500,
                        },
                        direct_routing: false,
                    },
                    table: (0..peers).map(|i| peer(side.family, i)).collect(),
                    family: side.family,
                });
            }

            let started = Instant::now();
            let mut added = 0;
            for p in &planes {
                let want = desired(&p.table, &p.topo).state;
                let report = reconcile(&nl, Some(&p.dev), p.family, &want)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                if let Some(e) = report.errors.first() {
                    bail!("reconcile of {peers} {} peers: {e}", p.family);
                }
                added += report.added;
            }
            let full = ms(started.elapsed());
            if added != 3 * peers * planes.len() {
                bail!("reconcile of {peers} peers: {added} entries added");
            }
            check_routes(dual, peers, "Twill")?;

            let started = Instant::now();
            for p in &planes {
                nl.read_state(Some(&p.dev), p.family)
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
            }
            let read = ms(started.elapsed());

            // One change at a time: a new peer joins, then leaves again. As the agent
            // does after a watch batch: the diff against what it last applied, no dump.
            let mut times = Vec::new();
            let mut applied: Vec<_> = planes
                .iter()
                .map(|p| desired(&p.table, &p.topo).state)
                .collect();
            for k in 0..changes {
                let started = Instant::now();
                let mut changed = 0;
                for (p, have) in planes.iter_mut().zip(applied.iter_mut()) {
                    let (name, extra) = peer(p.family, peers);
                    if k % 2 == 0 {
                        p.table.insert(name, extra);
                    } else {
                        p.table.remove(&name);
                    }
                    let want = desired(&p.table, &p.topo).state;
                    let r = apply_diff(&nl, Some(&p.dev), have, &want).await;
                    if let Some(e) = r.errors.first() {
                        bail!("one change: {e}");
                    }
                    changed += r.added + r.removed;
                    *have = want;
                }
                times.push(ms(started.elapsed()));
                if changed != 3 * planes.len() {
                    bail!("one change: {changed} entries changed");
                }
            }
            Ok((full, median(times), read))
        })
    })
}

/// The floor: `ip -batch` and `bridge -batch`; (full, change) ms.
fn batch_once(peers: usize, changes: usize, dual: bool) -> Result<(f64, f64)> {
    in_netns(move || {
        ipv6_underlay(dual)?;
        for side in sides(dual) {
            sh(
                IP,
                &[
                    "link",
                    "add",
                    side.device,
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "local",
                    side.local,
                    "dev",
                    "veth0",
                    "dstport",
                    "8472",
                    "nolearning",
                ],
            )?;
            sh(IP, &["link", "set", side.device, "mtu", "1430", "up"])?;
            let own = format!("{}/{}", side.own, side.family.host_prefix_len());
            sh(IP, &["addr", "add", &own, "dev", side.device, "nodad"])?;
        }
        let dir = tempfile::tempdir()?;
        // ip picks the family from the addresses, so both families share one batch.
        let write =
            |range: std::ops::Range<usize>, del: bool, tag: &str| -> Result<(String, String)> {
                let (mut ip, mut br) = (String::new(), String::new());
                for i in range {
                    for side in sides(dual) {
                        let (_, p) = peer(side.family, i);
                        let (gw, mac, dev) =
                            (p.subnet.network(), vtep_mac(side.family, i), side.device);
                        if del {
                            writeln!(ip, "route del {} via {gw} dev {dev} proto 74", p.subnet)?;
                            writeln!(br, "fdb del {mac} dev {dev} dst {} self", p.public_ip)?;
                            writeln!(ip, "neigh del {gw} dev {dev}")?;
                        } else {
                            writeln!(
                                ip,
                                "neigh replace {gw} lladdr {mac} dev {dev} nud permanent"
                            )?;
                            writeln!(
                                br,
                                "fdb replace {mac} dev {dev} dst {} self permanent",
                                p.public_ip
                            )?;
                            writeln!(
                                ip,
                                "route replace {} via {gw} dev {dev} onlink proto 74",
                                p.subnet
                            )?;
                        }
                    }
                }
                let ipf = dir.path().join(format!("{tag}.ip"));
                let brf = dir.path().join(format!("{tag}.bridge"));
                std::fs::write(&ipf, ip)?;
                std::fs::write(&brf, br)?;
                Ok((ipf.display().to_string(), brf.display().to_string()))
            };
        let run = |(ipf, brf): &(String, String)| -> Result<Duration> {
            let started = Instant::now();
            sh(IP, &["-batch", ipf])?;
            sh(BRIDGE, &["-batch", brf])?;
            Ok(started.elapsed())
        };
        let full_files = write(0..peers, false, "full")?;
        let full = ms(run(&full_files)?);
        check_routes(dual, peers, "ip -batch")?;
        let add = write(peers..peers + 1, false, "add")?;
        let del = write(peers..peers + 1, true, "del")?;
        let mut times = Vec::new();
        for k in 0..changes {
            let t = if k % 2 == 0 { run(&add)? } else { run(&del)? };
            times.push(ms(t));
        }
        Ok((full, median(times)))
    })
}

/// Measures `peers` peers (`dual`: each with an IPv4 and an IPv6 side) `repeats`
/// times; medians.
pub fn run(peers: usize, repeats: usize, dual: bool) -> Result<DataplaneOutcome> {
    let (mut tf, mut tc, mut tr, mut bf, mut bc) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..repeats.max(1) {
        let (f, c, r) = twill_once(peers, 20, dual)?;
        tf.push(f);
        tc.push(c);
        tr.push(r);
        let (f, c) = batch_once(peers, 20, dual)?;
        bf.push(f);
        bc.push(c);
    }
    Ok(DataplaneOutcome {
        peers,
        dual_stack: dual,
        repeats: repeats.max(1),
        twill_full_ms: median(tf),
        twill_change_ms: median(tc),
        batch_full_ms: median(bf),
        batch_change_ms: median(bc),
        twill_read_state_ms: median(tr),
    })
}
