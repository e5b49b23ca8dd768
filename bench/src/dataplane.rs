//! The agent's data plane against the kernel's own floor, in a fresh network namespace
//! per measurement (a thread that `unshare(CLONE_NEWNET)`s, as
//! agent/tests/dataplane_kernel.rs does; commands forked from it share it). Only
//! addresses inside that namespace are used: TEST-NET-1 on a veth pair that leads
//! nowhere, 10/8 pod subnets and 198.18/15 peer addresses as data.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::dataplane::{DataPlane, Family, Underlay, VxlanSpec};
use twill_agent::reconcile::{apply_diff, desired, reconcile, Topology};
use twill_common::lease::{Mac, Peer};

use crate::stats::median;

const IP: &str = "/usr/sbin/ip";
const BRIDGE: &str = "/usr/sbin/bridge";

/// Results for one peer count (medians over the repeats).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataplaneOutcome {
    /// Peers.
    pub peers: usize,
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

/// Peer `i`: subnet 10.(1+i/256).(i%256).0/24, public IP in 198.18/15, its own MAC.
fn peer(i: usize) -> (String, Peer) {
    let subnet = format!("10.{}.{}.0/24", 1 + i / 256, i % 256);
    (
        format!("peer-{i:05}"),
        Peer {
            subnet: subnet.parse().expect("subnet"),
            public_ip: Ipv4Addr::new(198, 18 + ((i >> 16) & 1) as u8, (i >> 8) as u8, i as u8)
                .into(),
            vtep_mac: Some(vtep_mac(i)),
        },
    )
}

fn vtep_mac(i: usize) -> Mac {
    Mac([0x0a, 0x58, (i >> 16) as u8, (i >> 8) as u8, i as u8, 0x01])
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

/// Twill: full programming, then `changes` single changes; (full, change, read) ms.
fn twill_once(peers: usize, changes: usize) -> Result<(f64, f64, f64)> {
    in_netns(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let nl = Netlink::new().map_err(|e| anyhow!("{e}"))?;
            let veth0 = ifindex("veth0")?;
            let spec = VxlanSpec {
                name: "flannel.1".into(),
                vni: 1,
                local: Ipv4Addr::new(192, 0, 2, 1).into(),
                port: 8472,
                underlay_index: veth0,
                mtu: 1450,
                learning: false,
                gbp: false,
            };
            let dev = nl.ensure_device(&spec).await.map_err(|e| anyhow!("{e}"))?;
            nl.ensure_address(&dev, Ipv4Addr::new(10, 255, 255, 0).into())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let topo = Topology {
                device: Some(dev),
                underlay: Underlay {
                    index: veth0,
                    name: "veth0".into(),
                    addr: "192.0.2.1/24".parse()?,
                    mtu: 1500,
                },
                direct_routing: false,
            };
            let mut table: BTreeMap<String, Peer> = (0..peers).map(peer).collect();

            let started = Instant::now();
            let report = reconcile(&nl, Some(&dev), Family::V4, &desired(&table, &topo).state)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let full = ms(started.elapsed());
            if !report.errors.is_empty() || report.added != 3 * peers {
                bail!(
                    "reconcile of {peers} peers: {} added, errors: {:?}",
                    report.added,
                    report.errors.first()
                );
            }
            let routes = sh(IP, &["route", "show", "proto", "74"])?;
            if routes.lines().count() != peers {
                bail!(
                    "{} routes in the kernel, {peers} expected",
                    routes.lines().count()
                );
            }

            let started = Instant::now();
            nl.read_state(Some(&dev), Family::V4)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let read = ms(started.elapsed());

            // One change at a time: a new peer joins, then leaves again. As the agent
            // does after a watch batch: the diff against what it last applied, no dump.
            let mut times = Vec::new();
            let (name, extra) = peer(peers);
            let mut applied = desired(&table, &topo).state;
            for k in 0..changes {
                if k % 2 == 0 {
                    table.insert(name.clone(), extra);
                } else {
                    table.remove(&name);
                }
                let started = Instant::now();
                let want = desired(&table, &topo).state;
                let r = apply_diff(&nl, Some(&dev), &applied, &want).await;
                times.push(ms(started.elapsed()));
                applied = want;
                if !r.errors.is_empty() || r.added + r.removed != 3 {
                    bail!(
                        "one change: {} added, {} removed, {:?}",
                        r.added,
                        r.removed,
                        r.errors.first()
                    );
                }
            }
            Ok((full, median(times), read))
        })
    })
}

/// The floor: `ip -batch` and `bridge -batch`; (full, change) ms.
fn batch_once(peers: usize, changes: usize) -> Result<(f64, f64)> {
    in_netns(move || {
        sh(
            IP,
            &[
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                "192.0.2.1",
                "dev",
                "veth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        sh(IP, &["link", "set", "flannel.1", "mtu", "1450", "up"])?;
        sh(IP, &["addr", "add", "10.255.255.0/32", "dev", "flannel.1"])?;
        let dir = tempfile::tempdir()?;
        let write =
            |range: std::ops::Range<usize>, del: bool, tag: &str| -> Result<(String, String)> {
                let (mut ip, mut br) = (String::new(), String::new());
                for i in range {
                    let (_, p) = peer(i);
                    let (gw, mac) = (p.subnet.network(), vtep_mac(i));
                    if del {
                        writeln!(ip, "route del {} via {gw} dev flannel.1 proto 74", p.subnet)?;
                        writeln!(br, "fdb del {mac} dev flannel.1 dst {} self", p.public_ip)?;
                        writeln!(ip, "neigh del {gw} dev flannel.1")?;
                    } else {
                        writeln!(
                            ip,
                            "neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent"
                        )?;
                        writeln!(
                            br,
                            "fdb replace {mac} dev flannel.1 dst {} self permanent",
                            p.public_ip
                        )?;
                        writeln!(
                            ip,
                            "route replace {} via {gw} dev flannel.1 onlink proto 74",
                            p.subnet
                        )?;
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
        let routes = sh(IP, &["route", "show", "proto", "74"])?;
        if routes.lines().count() != peers {
            bail!(
                "ip -batch: {} routes, {peers} expected",
                routes.lines().count()
            );
        }
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

/// Measures `peers` peers `repeats` times; medians.
pub fn run(peers: usize, repeats: usize) -> Result<DataplaneOutcome> {
    let (mut tf, mut tc, mut tr, mut bf, mut bc) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..repeats.max(1) {
        let (f, c, r) = twill_once(peers, 20)?;
        tf.push(f);
        tc.push(c);
        tr.push(r);
        let (f, c) = batch_once(peers, 20)?;
        bf.push(f);
        bc.push(c);
    }
    Ok(DataplaneOutcome {
        peers,
        repeats: repeats.max(1),
        twill_full_ms: median(tf),
        twill_change_ms: median(tc),
        batch_full_ms: median(bf),
        batch_change_ms: median(bc),
        twill_read_state_ms: median(tr),
    })
}
