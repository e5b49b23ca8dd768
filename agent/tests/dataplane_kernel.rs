//! `Netlink` against the real kernel, each test in a fresh network namespace of its own.
//!
//! Every test runs its body on a new thread that first `unshare(CLONE_NEWNET)`s: the
//! network namespace is per thread, so the host's is never touched, and the `ip`
//! commands the test forks from that thread inherit the new namespace (the first check
//! of every test is that only `lo` exists). The namespace is unnamed and dies with
//! the thread: nothing is left behind. Only TEST-NET addresses (192.0.2.0/24,
//! 198.51.100.0/24, 2001:db8::/32) and private pod subnets are used, on a veth pair
//! that leads nowhere, or, for the end-to-end ping, into a second unnamed namespace
//! the test creates: a [`Netns`] guard holds it by a descriptor, so it goes (with its
//! end of the veth pair) when the guard drops, even on a panic.
//!
//! Without root (or without network namespaces) the tests print a loud SKIPPED and pass,
//! except in CI, where they fail.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nix::sched::CloneFlags;
use serde_json::Value;
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::dataplane::{
    DataPlane, DataPlaneError, Device, Family, KernelState, Route, Underlay, VxlanSpec,
    ROUTE_PROTOCOL,
};
use twill_agent::plane::Plane;
use twill_agent::reconcile::{desired, reconcile, Topology};
use twill_common::model::{Mac, Peer};

const IP: &str = "/usr/sbin/ip";
const BRIDGE: &str = "/usr/sbin/bridge";

/// A loud skip; in CI a failure, since CI runs as root with network namespaces and a
/// skip there would hide the kernel tests.
fn skip(test: &str, why: &str) {
    twill_tests::kit::skip(test, &format!("needs root and network namespaces ({why})"));
}

/// The kernel tests run twice: with netlink's strict checking (what current kernels
/// do) and without it (what older ones do, where dumps ignore the filters we send),
/// as `$strict` and `$loose`, each a call of `$body(strict)` in its own namespace.
macro_rules! strict_and_not {
    ($strict:ident, $loose:ident, $body:ident) => {
        #[test]
        #[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
        fn $strict() {
            in_netns(stringify!($strict), || $body(true));
        }

        #[test]
        #[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
        fn $loose() {
            in_netns(stringify!($loose), || $body(false));
        }
    };
}

/// Runs `body` on a current-thread runtime inside a fresh network namespace with `lo`
/// up and the underlay `veth0` (192.0.2.1/24 and 2001:db8:1::1/64, peer `veth1`) up.
fn in_netns<F, Fut>(test: &'static str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !nix::unistd::Uid::effective().is_root() {
        skip(test, "not root");
        return;
    }
    let thread = std::thread::spawn(move || {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            skip(test, &format!("unshare: {e}"));
            return;
        }
        let links = ip_json("link show");
        let names: Vec<&str> = names(&links);
        assert_eq!(
            names,
            ["lo"],
            "a fresh namespace, seen by the forked ip command"
        );
        sh(IP, "link set lo up");
        sh(IP, "link add veth0 type veth peer name veth1");
        sh(IP, "addr add 192.0.2.1/24 dev veth0");
        // nodad: usable at once, not after duplicate address detection.
        sh(IP, "addr add 2001:db8:1::1/64 dev veth0 nodad");
        sh(IP, "link set veth0 up");
        sh(IP, "link set veth1 up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(body());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// A network namespace held open by a descriptor: the guard that cleans up a second
/// namespace. It lives while this (or a thread or process inside it) does, so dropping
/// it removes the namespace and every link in it.
struct Netns(File);

impl Netns {
    /// The calling thread's namespace.
    fn current() -> Netns {
        Netns(File::open("/proc/thread-self/ns/net").expect("open the thread's netns"))
    }

    /// A new namespace with `lo` up; the calling thread stays where it was.
    fn fresh() -> Netns {
        let here = Netns::current();
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare a second netns");
        let new = Netns::current();
        sh(IP, "link set lo up");
        nix::sched::setns(&here.0, CloneFlags::CLONE_NEWNET).expect("setns back");
        new
    }

    /// Moves the calling thread, and the commands it forks, into this namespace until
    /// the returned guard drops.
    fn enter(&self) -> Entered {
        let back = Netns::current();
        nix::sched::setns(&self.0, CloneFlags::CLONE_NEWNET).expect("setns");
        Entered(back)
    }

    /// The name `ip link set DEV netns NAME` accepts for it.
    fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.0.as_raw_fd())
    }
}

/// The thread is inside another namespace; dropping this takes it back.
struct Entered(Netns);

impl Drop for Entered {
    fn drop(&mut self) {
        let back = nix::sched::setns(&self.0 .0, CloneFlags::CLONE_NEWNET);
        if back.is_err() && !std::thread::panicking() {
            panic!("setns back: {back:?}");
        }
    }
}

/// Runs a command, asserts it succeeded, returns its stdout.
fn sh(bin: &str, args: &str) -> String {
    let out = Command::new(bin)
        .args(args.split_whitespace())
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{bin} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_json(args: &str) -> Value {
    let out = sh(IP, &format!("-j {args}"));
    if out.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(&out).expect("ip -j output is JSON")
}

fn names(links: &Value) -> Vec<&str> {
    links
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .collect()
}

fn ifindex(name: &str) -> u32 {
    let v = ip_json(&format!("link show {name}"));
    v[0]["ifindex"].as_u64().expect("ifindex") as u32
}

fn mac(s: &str) -> Mac {
    s.parse().expect("MAC")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("CIDR")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP address")
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    Ipv4Addr::new(a, b, c, d).into()
}

fn spec() -> VxlanSpec {
    VxlanSpec {
        name: "flannel.1".into(),
        vni: 1,
        local: v4(192, 0, 2, 1),
        port: 8472,
        underlay_index: ifindex("veth0"),
        mtu: 1450,
        learning: false,
        gbp: false,
        tx_checksum_offload: true,
    }
}

/// flannel's dual-stack device: same VNI and port, IPv6 local, 70 bytes of IPv6 +
/// UDP + VXLAN headers below the underlay MTU.
fn spec6() -> VxlanSpec {
    VxlanSpec {
        name: "flannel-v6.1".into(),
        local: ip("2001:db8:1::1"),
        mtu: 1430,
        ..spec()
    }
}

/// `ip -d -j link show NAME`, the one link.
fn link_details(name: &str) -> Value {
    ip_json(&format!("-d link show {name}"))[0].clone()
}

fn assert_device_matches(dev: &Device, spec: &VxlanSpec) {
    let l = link_details(&spec.name);
    assert_eq!(l["ifindex"].as_u64(), Some(u64::from(dev.index)));
    assert_eq!(l["address"].as_str(), Some(dev.mac.to_string().as_str()));
    assert_eq!(l["mtu"].as_u64(), Some(u64::from(spec.mtu)));
    let flags: Vec<&str> = l["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"UP"), "device is up: {flags:?}");
    let info = &l["linkinfo"];
    assert_eq!(info["info_kind"], "vxlan");
    let d = &info["info_data"];
    assert_eq!(d["id"].as_u64(), Some(u64::from(spec.vni)));
    let local = match spec.local {
        IpAddr::V4(_) => "local",
        IpAddr::V6(_) => "local6",
    };
    assert_eq!(d[local].as_str(), Some(spec.local.to_string().as_str()));
    assert_eq!(d["link"], "veth0");
    assert_eq!(d["port"].as_u64(), Some(u64::from(spec.port)));
    assert_eq!(d["learning"].as_bool(), Some(spec.learning));
    assert_eq!(d["gbp"].as_bool().unwrap_or(false), spec.gbp);
    let accept_ra =
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{}/accept_ra", spec.name))
            .expect("IPv6 is on in the test namespace");
    assert_eq!(accept_ra.trim(), "0");
}

strict_and_not!(
    ensure_device_creates_reuses_and_recreates,
    ensure_device_creates_reuses_and_recreates_without_strict_check,
    ensure_device_creates_reuses_and_recreates_in
);

async fn ensure_device_creates_reuses_and_recreates_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let mut s = spec();

    let dev = nl.ensure_device(&s).await.expect("create");
    assert_device_matches(&dev, &s);

    // Same spec: the same device, same MAC.
    let again = nl.ensure_device(&s).await.expect("reuse");
    assert_eq!(again, dev);

    // Down, other MTU, other learning: all fixed in place, the MAC survives.
    sh(IP, "link set flannel.1 down mtu 1400");
    s.mtu = 1420;
    s.learning = true;
    let fixed = nl.ensure_device(&s).await.expect("fix in place");
    assert_eq!(fixed, dev, "reused: same index and MAC");
    assert_device_matches(&fixed, &s);
    s.learning = false;
    assert_eq!(nl.ensure_device(&s).await.expect("nolearning"), dev);
    assert_device_matches(&dev, &s);

    // Another port: deleted and recreated.
    s.port = 4789;
    let recreated = nl.ensure_device(&s).await.expect("recreate for port");
    assert_ne!(recreated.index, dev.index, "a new device");
    assert_device_matches(&recreated, &s);

    // Another VNI under the same name: recreated.
    s.vni = 7;
    let recreated2 = nl.ensure_device(&s).await.expect("recreate for VNI");
    assert_ne!(recreated2.index, recreated.index);
    assert_device_matches(&recreated2, &s);

    // Another local address (a second address on the underlay): recreated.
    sh(IP, "addr add 192.0.2.9/24 dev veth0");
    s.local = v4(192, 0, 2, 9);
    let recreated3 = nl.ensure_device(&s).await.expect("recreate for local");
    assert_ne!(recreated3.index, recreated2.index);
    assert_device_matches(&recreated3, &s);

    // Another underlying device: recreated.
    sh(IP, "addr add 198.51.100.1/24 dev veth1");
    s.underlay_index = ifindex("veth1");
    s.local = v4(198, 51, 100, 1);
    let on_veth1 = nl.ensure_device(&s).await.expect("recreate for dev");
    assert_ne!(on_veth1.index, recreated3.index);
    let l = link_details("flannel.1");
    assert_eq!(l["linkinfo"]["info_data"]["link"], "veth1");

    // GBP cannot change live: recreated.
    s.gbp = true;
    let gbp = nl.ensure_device(&s).await.expect("recreate for gbp");
    assert_ne!(gbp.index, on_veth1.index);
    assert_eq!(
        link_details("flannel.1")["linkinfo"]["info_data"]["gbp"].as_bool(),
        Some(true)
    );

    // A link of that name that is no VXLAN device at all: replaced.
    nl.delete_device("flannel.1").await.expect("delete");
    nl.delete_device("flannel.1")
        .await
        .expect("delete is idempotent");
    assert!(!names(&ip_json("link show")).contains(&"flannel.1"));
    sh(IP, "link add flannel.1 type veth peer name other");
    let s = spec();
    let replaced = nl.ensure_device(&s).await.expect("replace a veth");
    assert_device_matches(&replaced, &s);

    // An impossible MTU is an error that names the command.
    let mut bad = spec();
    bad.mtu = 9000;
    let err = nl
        .ensure_device(&bad)
        .await
        .expect_err("MTU above the underlay's");
    assert!(
        matches!(&err, DataPlaneError::Netlink { op, .. } if op == "ip link set flannel.1 mtu 9000 up"),
        "{err}"
    );
}

strict_and_not!(
    ensure_address_leaves_exactly_one,
    ensure_address_leaves_exactly_one_without_strict_check,
    ensure_address_leaves_exactly_one_in
);

async fn ensure_address_leaves_exactly_one_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec()).await.expect("device");
    let subnet = v4(10, 244, 74, 0);

    nl.ensure_address(&dev, subnet).await.expect("add");
    let addrs = || -> Vec<String> {
        ip_json("-4 addr show dev flannel.1")[0]["addr_info"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| format!("{}/{}", i["local"].as_str().unwrap_or("?"), i["prefixlen"]))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(addrs(), ["10.244.74.0/32"]);
    nl.ensure_address(&dev, subnet).await.expect("idempotent");
    assert_eq!(addrs(), ["10.244.74.0/32"]);

    // Stale addresses (an old lease, the same address with another prefix) go.
    sh(IP, "addr add 10.244.9.0/32 dev flannel.1");
    sh(IP, "addr add 10.244.74.0/24 dev flannel.1");
    sh(IP, "addr add 10.244.74.7/24 dev flannel.1");
    nl.ensure_address(&dev, subnet).await.expect("clean up");
    assert_eq!(addrs(), ["10.244.74.0/32"]);

    // A new subnet replaces the old one.
    nl.ensure_address(&dev, v4(10, 244, 12, 0))
        .await
        .expect("move");
    assert_eq!(addrs(), ["10.244.12.0/32"]);
    // The underlay keeps its own address.
    assert_eq!(
        ip_json("-4 addr show dev veth0")[0]["addr_info"][0]["local"],
        "192.0.2.1"
    );
}

strict_and_not!(
    entries_round_trip_through_read_state,
    entries_round_trip_through_read_state_without_strict_check,
    entries_round_trip_through_read_state_in
);

async fn entries_round_trip_through_read_state_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec()).await.expect("device");
    nl.ensure_address(&dev, v4(10, 244, 74, 0))
        .await
        .expect("address");
    let veth0 = ifindex("veth0");
    assert_eq!(
        nl.read_state(Some(&dev), Family::V4).await.expect("read"),
        KernelState::default()
    );

    let peers = [
        ("10.244.12.0/24", "192.0.2.12", "0a:58:0a:f4:0c:00"),
        ("10.244.13.0/24", "192.0.2.13", "0a:58:0a:f4:0d:00"),
    ];
    let mut want = KernelState::default();
    for (subnet, public, vtep) in peers {
        let subnet = net(subnet);
        let public: IpAddr = public.parse().expect("ip");
        let vtep = mac(vtep);
        nl.add_neighbour(&dev, subnet.network(), vtep)
            .await
            .expect("neigh");
        nl.add_fdb(&dev, vtep, public).await.expect("fdb");
        let route = Route {
            dst: subnet,
            gateway: subnet.network(),
            oif: dev.index,
        };
        nl.add_route(&route).await.expect("route");
        want.neighbours.insert(subnet.network(), vtep);
        want.fdb.insert(vtep, public);
        want.routes.insert(subnet, route);
    }
    // DirectRouting: a route through the underlay, no neighbour or FDB entry.
    let direct = Route {
        dst: net("10.244.14.0/24"),
        gateway: v4(192, 0, 2, 14),
        oif: veth0,
    };
    nl.add_route(&direct).await.expect("direct route");
    want.routes.insert(direct.dst, direct);

    // Adds are replaces: doing it all again changes nothing.
    for (ip, m) in &want.neighbours {
        nl.add_neighbour(&dev, *ip, *m).await.expect("neigh again");
    }
    for (m, dst) in &want.fdb {
        nl.add_fdb(&dev, *m, *dst).await.expect("fdb again");
    }
    for r in want.routes.values() {
        nl.add_route(r).await.expect("route again");
    }

    // Entries Twill does not own, which read_state must not report.
    sh(IP, "route add 10.9.0.0/24 dev flannel.1 proto static");
    sh(IP, "route add 10.9.1.0/24 via 192.0.2.77 dev veth0");
    sh(IP, "route add 10.9.2.0/24 dev veth0 proto 74 table 100");
    sh(
        IP,
        "neigh add 10.244.99.0 lladdr 0a:58:00:00:00:99 dev flannel.1 nud reachable",
    );
    sh(
        IP,
        "neigh add 192.0.2.99 lladdr 0a:58:00:00:00:98 dev veth0 nud permanent",
    );
    sh(
        BRIDGE,
        "fdb append 00:00:00:00:00:00 dev flannel.1 dst 192.0.2.50 self permanent",
    );
    sh(BRIDGE, "fdb add 0a:58:00:00:00:97 dev veth0 self permanent");
    // Another VXLAN device's entries: same kinds, other ifindex.
    sh(
        IP,
        "link add flannel.2 type vxlan id 2 local 192.0.2.1 dev veth0 dstport 8473 nolearning",
    );
    sh(IP, "link set flannel.2 up");
    sh(
        BRIDGE,
        "fdb add 0a:58:00:00:00:96 dev flannel.2 dst 192.0.2.96 self permanent",
    );
    sh(
        IP,
        "neigh add 10.244.96.0 lladdr 0a:58:00:00:00:96 dev flannel.2 nud permanent",
    );

    let got = nl.read_state(Some(&dev), Family::V4).await.expect("read");
    assert_eq!(got, want);

    // The kernel agrees with what we wrote.
    let neigh = sh(IP, "neigh show dev flannel.1 nud permanent");
    assert!(
        neigh.contains("10.244.12.0 lladdr 0a:58:0a:f4:0c:00 PERMANENT"),
        "{neigh}"
    );
    let fdb = sh(BRIDGE, "fdb show dev flannel.1");
    assert!(
        fdb.contains("0a:58:0a:f4:0c:00 dst 192.0.2.12 self permanent"),
        "{fdb}"
    );
    let routes = sh(IP, "route show proto 74");
    assert!(
        routes.contains("10.244.12.0/24 via 10.244.12.0 dev flannel.1 onlink"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.14.0/24 via 192.0.2.14 dev veth0 onlink"),
        "{routes}"
    );

    // Replace moves a peer to a new MAC / public IP / gateway.
    let moved_mac = mac("0a:58:0a:f4:0c:ff");
    nl.add_neighbour(&dev, v4(10, 244, 12, 0), moved_mac)
        .await
        .expect("neigh replace");
    let moved_route = Route {
        gateway: v4(192, 0, 2, 15),
        oif: veth0,
        ..direct
    };
    nl.add_route(&moved_route).await.expect("route replace");
    let got = nl.read_state(Some(&dev), Family::V4).await.expect("read");
    assert_eq!(got.neighbours[&v4(10, 244, 12, 0)], moved_mac);
    assert_eq!(got.routes[&direct.dst], moved_route);
    nl.add_neighbour(&dev, v4(10, 244, 12, 0), mac("0a:58:0a:f4:0c:00"))
        .await
        .expect("neigh back");
    nl.add_route(&direct).await.expect("route back");

    // Delete everything, twice: the second round finds nothing and is fine too.
    for _ in 0..2 {
        for r in want.routes.values() {
            nl.del_route(r).await.expect("del route");
        }
        for (m, dst) in &want.fdb {
            nl.del_fdb(&dev, *m, *dst).await.expect("del fdb");
        }
        for ip in want.neighbours.keys() {
            nl.del_neighbour(&dev, *ip).await.expect("del neigh");
        }
    }
    assert_eq!(
        nl.read_state(Some(&dev), Family::V4).await.expect("read"),
        KernelState::default()
    );
    // Only ours went.
    assert!(sh(IP, "route show 10.9.0.0/24").contains("10.9.0.0/24 dev flannel.1"));
    assert!(sh(IP, "neigh show dev flannel.1").contains("10.244.99.0"));
    assert!(sh(BRIDGE, "fdb show dev flannel.1").contains("00:00:00:00:00:00 dst 192.0.2.50"));

    // Deleting on a device that is gone is fine as well.
    nl.delete_device("flannel.1").await.expect("delete device");
    let vtep = mac("0a:58:0a:f4:0c:00");
    nl.del_neighbour(&dev, v4(10, 244, 12, 0))
        .await
        .expect("del neigh, no device");
    nl.del_fdb(&dev, vtep, v4(192, 0, 2, 12))
        .await
        .expect("del fdb, no device");
    nl.del_route(&want.routes[&net("10.244.12.0/24")])
        .await
        .expect("del route, no device");

    // A failed add is an error that reads like the ip command.
    let err = nl
        .add_route(&Route {
            dst: net("10.244.20.0/24"),
            gateway: v4(10, 244, 20, 0),
            oif: dev.index,
        })
        .await
        .expect_err("no such device");
    let DataPlaneError::Netlink { op, .. } = &err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(
        op,
        &format!(
            "ip route replace 10.244.20.0/24 via 10.244.20.0 dev if{} onlink proto {ROUTE_PROTOCOL}",
            dev.index
        )
    );
    let err = nl
        .add_fdb(&dev, vtep, v4(192, 0, 2, 12))
        .await
        .expect_err("no such device");
    assert!(
        err.to_string()
            .starts_with("bridge fdb replace 0a:58:0a:f4:0c:00 dev if"),
        "{err}"
    );
}

strict_and_not!(
    error_ops_name_the_device,
    error_ops_name_the_device_without_strict_check,
    error_ops_name_the_device_in
);

async fn error_ops_name_the_device_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec()).await.expect("device");
    // A gateway that is not a unicast address is refused.
    let err = nl
        .add_route(&Route {
            dst: net("10.244.21.0/24"),
            gateway: v4(224, 0, 0, 1),
            oif: dev.index,
        })
        .await
        .expect_err("multicast gateway");
    let DataPlaneError::Netlink { op, .. } = &err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(
        op,
        "ip route replace 10.244.21.0/24 via 224.0.0.1 dev flannel.1 onlink proto 74"
    );
}

strict_and_not!(
    underlay_discovery,
    underlay_discovery_without_strict_check,
    underlay_discovery_in
);

async fn underlay_discovery_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let veth0 = ifindex("veth0");
    sh(IP, "addr add 192.0.2.2/24 dev veth0");
    sh(IP, "addr add 198.51.100.1/24 dev veth1");
    sh(IP, "addr add 2001:db8:2::1/64 dev veth1 nodad");
    sh(IP, "link set veth1 mtu 1400");
    // Both ends carry an IPv6 link-local address as well, which is no underlay address.
    assert!(sh(IP, "-6 addr show dev veth0").contains("inet6 fe80::"));

    let all = nl.interfaces().await.expect("interfaces");
    let seen: Vec<(String, String, u32)> = all
        .iter()
        .map(|u| (u.name.clone(), u.addr.to_string(), u.mtu))
        .collect();
    // veth1 (the peer) gets the lower index: `ip link add` creates it first.
    assert!(ifindex("veth1") < veth0);
    assert_eq!(
        seen,
        [
            ("lo".to_string(), "127.0.0.1/8".to_string(), 65536),
            ("lo".into(), "::1/128".into(), 65536),
            ("veth1".into(), "198.51.100.1/24".into(), 1400),
            ("veth1".into(), "2001:db8:2::1/64".into(), 1400),
            ("veth0".into(), "192.0.2.1/24".into(), 1500),
            ("veth0".into(), "192.0.2.2/24".into(), 1500),
            ("veth0".into(), "2001:db8:1::1/64".into(), 1500),
        ],
        "interface-index order, IPv4 (primary first) before IPv6, no link-local"
    );
    assert!(all.windows(2).all(|w| w[0].index <= w[1].index));
    assert_eq!(all[4].index, veth0);

    let err = nl
        .default_route_interface()
        .await
        .expect_err("no default route yet");
    assert!(
        matches!(&err, DataPlaneError::NotFound(m) if m == "no IPv4 default route: pass --iface or --public-ip"),
        "{err}"
    );

    // A default route in another table does not count.
    sh(
        IP,
        "route add default via 198.51.100.254 dev veth1 table 100",
    );
    assert!(nl.default_route_interface().await.is_err());

    sh(
        IP,
        "route add default via 198.51.100.254 dev veth1 metric 200",
    );
    sh(IP, "route add default via 192.0.2.254 dev veth0 metric 100");
    let d = nl.default_route_interface().await.expect("default");
    assert_eq!(d.name, "veth0", "the lowest metric wins");
    assert_eq!(d.index, veth0);
    assert_eq!(d.addr, net("192.0.2.1/24"), "its first address");
    assert_eq!(d.mtu, 1500);

    assert_eq!(
        nl.route_interface(v4(198, 51, 100, 7))
            .await
            .expect("route get"),
        ifindex("veth1")
    );
    assert_eq!(
        nl.route_interface(v4(203, 0, 113, 1))
            .await
            .expect("route get via default"),
        veth0
    );
    assert_eq!(nl.link_mtu(ifindex("veth1")).await.expect("mtu"), 1400);

    // IPv6: the same questions, answered from the IPv6 tables only.
    let err = nl
        .default_route_interface_v6()
        .await
        .expect_err("no IPv6 default route yet, though there is an IPv4 one");
    assert!(
        matches!(&err, DataPlaneError::NotFound(m) if m == "no IPv6 default route: pass --iface or --public-ipv6"),
        "{err}"
    );
    sh(
        IP,
        "-6 route add default via 2001:db8:2::fe dev veth1 table 100",
    );
    assert!(nl.default_route_interface_v6().await.is_err());
    sh(
        IP,
        "-6 route add default via 2001:db8:2::fe dev veth1 metric 200",
    );
    sh(
        IP,
        "-6 route add default via 2001:db8:1::fe dev veth0 metric 100",
    );
    let d = nl.default_route_interface_v6().await.expect("IPv6 default");
    assert_eq!(
        (d.name.as_str(), d.index, d.addr, d.mtu),
        ("veth0", veth0, net("2001:db8:1::1/64"), 1500),
        "the lowest metric wins; its global IPv6 address"
    );
    assert_eq!(
        nl.default_route_interface()
            .await
            .expect("IPv4 default")
            .addr,
        net("192.0.2.1/24"),
        "the IPv4 answer keeps its IPv4 address"
    );
    assert_eq!(
        nl.route_interface(ip("2001:db8:2::7"))
            .await
            .expect("ip -6 route get"),
        ifindex("veth1")
    );
    assert_eq!(
        nl.route_interface(ip("2001:db8:ffff::1"))
            .await
            .expect("ip -6 route get via default"),
        veth0
    );
    // A default route through an interface with only a link-local address.
    sh(IP, "link add vx0 type veth peer name vx1");
    sh(IP, "link set vx1 up");
    sh(IP, "link set vx0 up");
    sh(IP, "-6 route add default dev vx0 metric 50");
    let err = nl
        .default_route_interface_v6()
        .await
        .expect_err("vx0 has no global IPv6 address");
    assert!(
        matches!(&err, DataPlaneError::NotFound(m) if m == "the IPv6 default route's interface vx0 has no IPv6 address: pass --iface or --public-ipv6"),
        "{err}"
    );
}

/// The global-scope IPv6 addresses of a device, as `ADDR/LEN`.
fn global_addrs6(dev: &str) -> Vec<String> {
    ip_json(&format!("-6 addr show dev {dev} scope global"))
        .as_array()
        .and_then(|links| links.first())
        .and_then(|l| l["addr_info"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        // ip -j lists filtered-out addresses as entries without one.
        .filter_map(|i| Some(format!("{}/{}", i["local"].as_str()?, i["prefixlen"])))
        .collect()
}

/// Waits until no IPv6 address of `dev` is tentative: duplicate address detection
/// must end before the kernel sends from an address.
fn wait_for_dad(dev: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh(IP, &format!("-6 addr show dev {dev} tentative"))
        .trim()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "{dev}: DAD did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// This node's IPv6 side over `dev` (an address of it, /64): DirectRouting as asked.
fn topo6(device: Option<Device>, dev: &str, addr: &str, direct_routing: bool) -> Topology {
    Topology {
        device,
        underlay: Underlay {
            index: ifindex(dev),
            name: dev.into(),
            addr: net(addr),
            mtu: 1500,
        },
        direct_routing,
    }
}

fn peer(subnet: &str, public: &str, vtep: &str) -> Peer {
    Peer {
        subnet: net(subnet),
        public_ip: ip(public),
        vtep_mac: Some(mac(vtep)),
    }
}

strict_and_not!(
    ensure_device_ipv6,
    ensure_device_ipv6_without_strict_check,
    ensure_device_ipv6_in
);

async fn ensure_device_ipv6_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let mut s = spec6();
    let dev = nl.ensure_device(&s).await.expect("create flannel-v6.1");
    assert_device_matches(&dev, &s);
    assert_eq!(nl.ensure_device(&s).await.expect("reuse"), dev);

    // Another IPv6 local address: recreated.
    sh(IP, "addr add 2001:db8:1::9/64 dev veth0 nodad");
    s.local = ip("2001:db8:1::9");
    let moved = nl.ensure_device(&s).await.expect("recreate for local6");
    assert_ne!(moved.index, dev.index);
    assert_device_matches(&moved, &s);

    // An IPv4 local where an IPv6 device stands (and back): the family is compared too.
    let as_v4 = VxlanSpec {
        local: v4(192, 0, 2, 1),
        ..s.clone()
    };
    let v4_dev = nl.ensure_device(&as_v4).await.expect("recreate as IPv4");
    assert_ne!(v4_dev.index, moved.index);
    assert_device_matches(&v4_dev, &as_v4);
    let back = nl.ensure_device(&s).await.expect("recreate as IPv6");
    assert_ne!(back.index, v4_dev.index);
    assert_device_matches(&back, &s);

    // The IPv4 device beside it, same VNI and port: both stay, neither is recreated.
    let dev4 = nl.ensure_device(&spec()).await.expect("create flannel.1");
    assert_ne!(dev4.mac, back.mac);
    assert_eq!(nl.ensure_device(&s).await.expect("reuse v6"), back);
    assert_eq!(nl.ensure_device(&spec()).await.expect("reuse v4"), dev4);
    assert_device_matches(&dev4, &spec());
    assert_device_matches(&back, &s);
}

strict_and_not!(
    ensure_address_ipv6_leaves_exactly_one_global,
    ensure_address_ipv6_leaves_exactly_one_global_without_strict_check,
    ensure_address_ipv6_in
);

async fn ensure_address_ipv6_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec6()).await.expect("device");
    let link_local = || sh(IP, "-6 addr show dev flannel-v6.1 scope link");
    assert!(link_local().contains("inet6 fe80::"), "{}", link_local());
    sh(IP, "addr add 10.9.9.9/32 dev flannel-v6.1");

    let subnet = ip("fd00:10:244:4a::");
    nl.ensure_address(&dev, subnet).await.expect("add");
    assert_eq!(global_addrs6("flannel-v6.1"), ["fd00:10:244:4a::/128"]);
    nl.ensure_address(&dev, subnet).await.expect("idempotent");
    assert_eq!(global_addrs6("flannel-v6.1"), ["fd00:10:244:4a::/128"]);

    // Stale addresses (an old lease, the same address with another prefix) go.
    sh(IP, "-6 addr add fd00:10:244:9::/128 dev flannel-v6.1 nodad");
    sh(
        IP,
        "-6 addr add fd00:10:244:4a::7/64 dev flannel-v6.1 nodad",
    );
    nl.ensure_address(&dev, subnet).await.expect("clean up");
    assert_eq!(global_addrs6("flannel-v6.1"), ["fd00:10:244:4a::/128"]);
    // IPv6 holds an address once: the same one with another prefix is replaced, and
    // the address survives.
    sh(IP, "-6 addr del fd00:10:244:4a::/128 dev flannel-v6.1");
    sh(IP, "-6 addr add fd00:10:244:4a::/64 dev flannel-v6.1 nodad");
    nl.ensure_address(&dev, subnet)
        .await
        .expect("fix the prefix");
    assert_eq!(global_addrs6("flannel-v6.1"), ["fd00:10:244:4a::/128"]);

    // A new subnet replaces the old one.
    nl.ensure_address(&dev, ip("fd00:10:244:c::"))
        .await
        .expect("move");
    assert_eq!(global_addrs6("flannel-v6.1"), ["fd00:10:244:c::/128"]);

    // The link-local address and the other family's address stay, and the underlay
    // keeps its own.
    assert!(link_local().contains("inet6 fe80::"), "{}", link_local());
    assert!(sh(IP, "-4 addr show dev flannel-v6.1").contains("10.9.9.9/32"));
    assert_eq!(global_addrs6("veth0"), ["2001:db8:1::1/64"]);

    // And the IPv4 ensure_address leaves the IPv6 one alone.
    nl.ensure_address(&dev, v4(10, 244, 12, 0))
        .await
        .expect("IPv4 on the same device");
    assert_eq!(global_addrs6("flannel-v6.1"), ["fd00:10:244:c::/128"]);
}

strict_and_not!(
    ipv6_entries_reconcile_and_repair,
    ipv6_entries_reconcile_and_repair_without_strict_check,
    ipv6_entries_reconcile_and_repair_in
);

async fn ipv6_entries_reconcile_and_repair_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec6()).await.expect("device");
    nl.ensure_address(&dev, ip("fd00:10:244:1::"))
        .await
        .expect("address");
    let veth0 = ifindex("veth0");
    assert_eq!(
        nl.read_state(Some(&dev), Family::V6).await.expect("read"),
        KernelState::default()
    );

    // node-2 is off the underlay's /64 (VXLAN); node-3 is on it (DirectRouting).
    let topo = topo6(Some(dev), "veth0", "2001:db8:1::1/64", true);
    let mut peers: BTreeMap<String, Peer> = [
        (
            "node-2".to_string(),
            peer("fd00:10:244:2::/64", "2001:db8:2::2", "0a:58:00:00:06:02"),
        ),
        (
            "node-3".to_string(),
            peer("fd00:10:244:3::/64", "2001:db8:1::3", "0a:58:00:00:06:03"),
        ),
    ]
    .into();
    let want = desired(&peers, &topo);
    assert!(want.unreachable.is_empty(), "{:?}", want.unreachable);
    let want = want.state;
    assert_eq!(
        want.routes[&net("fd00:10:244:3::/64")],
        Route {
            dst: net("fd00:10:244:3::/64"),
            gateway: ip("2001:db8:1::3"),
            oif: veth0
        }
    );

    // Entries Twill does not own, which read_state must not report.
    sh(IP, "-6 route add fd00:9::/64 dev flannel-v6.1 proto static");
    sh(
        IP,
        "-6 route add fd00:9:1::/64 via 2001:db8:1::77 dev veth0",
    );
    sh(
        IP,
        "-6 route add fd00:9:2::/64 dev veth0 proto 74 table 100",
    );
    sh(IP, "route add 10.9.3.0/24 dev veth0 proto 74");
    sh(
        IP,
        "-6 neigh add fd00:10:244:99:: lladdr 0a:58:00:00:00:99 dev flannel-v6.1 nud reachable",
    );
    sh(
        IP,
        "-6 neigh add 2001:db8:1::99 lladdr 0a:58:00:00:00:98 dev veth0 nud permanent",
    );
    sh(
        IP,
        "neigh add 10.244.99.0 lladdr 0a:58:00:00:00:97 dev flannel-v6.1 nud permanent",
    );
    sh(
        BRIDGE,
        "fdb append 00:00:00:00:00:00 dev flannel-v6.1 dst 2001:db8:1::50 self permanent",
    );

    let r = reconcile(&nl, Some(&dev), Family::V6, &want)
        .await
        .expect("reconcile");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.added, r.removed), (4, 0));
    assert_eq!(
        nl.read_state(Some(&dev), Family::V6).await.expect("read"),
        want
    );

    // The kernel agrees with what we wrote.
    let neigh = sh(IP, "-6 neigh show dev flannel-v6.1 nud permanent");
    assert!(
        neigh.contains("fd00:10:244:2:: lladdr 0a:58:00:00:06:02 PERMANENT"),
        "{neigh}"
    );
    let fdb = sh(BRIDGE, "fdb show dev flannel-v6.1");
    assert!(
        fdb.contains("0a:58:00:00:06:02 dst 2001:db8:2::2 self permanent"),
        "{fdb}"
    );
    let routes = sh(IP, "-6 route show proto 74");
    assert!(
        routes
            .contains("fd00:10:244:2::/64 via fd00:10:244:2:: dev flannel-v6.1 metric 1024 onlink"),
        "{routes}"
    );
    assert!(
        routes.contains("fd00:10:244:3::/64 via 2001:db8:1::3 dev veth0"),
        "{routes}"
    );
    let r = reconcile(&nl, Some(&dev), Family::V6, &want)
        .await
        .expect("reconcile");
    assert_eq!((r.added, r.removed), (0, 0), "converged");

    // Deleted or changed by hand: put back by the next run.
    sh(IP, "-6 neigh del fd00:10:244:2:: dev flannel-v6.1");
    sh(
        BRIDGE,
        "fdb del 0a:58:00:00:06:02 dev flannel-v6.1 dst 2001:db8:2::2 self",
    );
    sh(IP, "-6 route del fd00:10:244:2::/64");
    sh(IP, "-6 route del fd00:10:244:3::/64");
    assert_eq!(
        nl.read_state(Some(&dev), Family::V6).await.expect("read"),
        KernelState::default()
    );
    let r = reconcile(&nl, Some(&dev), Family::V6, &want)
        .await
        .expect("repair");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.added, r.removed), (4, 0));
    assert_eq!(
        nl.read_state(Some(&dev), Family::V6).await.expect("read"),
        want
    );
    sh(
        IP,
        "-6 neigh replace fd00:10:244:2:: lladdr 0a:58:00:00:06:ff dev flannel-v6.1 nud permanent",
    );
    sh(
        IP,
        "-6 route replace fd00:10:244:3::/64 via 2001:db8:1::4 dev veth0 proto 74",
    );
    let r = reconcile(&nl, Some(&dev), Family::V6, &want)
        .await
        .expect("repair");
    assert_eq!((r.added, r.removed), (2, 0));
    assert_eq!(
        nl.read_state(Some(&dev), Family::V6).await.expect("read"),
        want
    );

    // Peers gone: everything of ours goes, in both rounds, and nothing else does.
    peers.clear();
    for removed in [4, 0] {
        let r = reconcile(&nl, Some(&dev), Family::V6, &desired(&peers, &topo).state)
            .await
            .expect("remove");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!((r.added, r.removed), (0, removed));
    }
    assert_eq!(
        nl.read_state(Some(&dev), Family::V6).await.expect("read"),
        KernelState::default()
    );
    assert!(sh(IP, "-6 route show fd00:9::/64").contains("dev flannel-v6.1"));
    assert!(sh(IP, "route show 10.9.3.0/24").contains("dev veth0"));
    assert!(sh(IP, "-6 neigh show dev flannel-v6.1").contains("fd00:10:244:99::"));
    assert!(sh(IP, "neigh show dev flannel-v6.1").contains("10.244.99.0"));
    assert!(
        sh(BRIDGE, "fdb show dev flannel-v6.1").contains("00:00:00:00:00:00 dst 2001:db8:1::50")
    );

    // Deleting what is already gone is fine.
    let vtep = mac("0a:58:00:00:06:02");
    nl.del_neighbour(&dev, ip("fd00:10:244:2::"))
        .await
        .expect("del neigh again");
    nl.del_fdb(&dev, vtep, ip("2001:db8:2::2"))
        .await
        .expect("del fdb again");

    // Failures read like the ip command.
    let err = nl
        .add_route(&Route {
            dst: net("fd00:10:244:21::/64"),
            gateway: ip("ff02::1"),
            oif: dev.index,
        })
        .await
        .expect_err("multicast gateway");
    let DataPlaneError::Netlink { op, .. } = &err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(
        op,
        "ip -6 route replace fd00:10:244:21::/64 via ff02::1 dev flannel-v6.1 onlink proto 74"
    );
    let err = nl
        .add_route(&Route {
            dst: net("fd00:10:244:22::/64"),
            gateway: v4(192, 0, 2, 22),
            oif: dev.index,
        })
        .await
        .expect_err("gateway of the other family");
    assert!(
        matches!(&err, DataPlaneError::Invalid(m) if m == "ip -6 route replace fd00:10:244:22::/64 via 192.0.2.22 dev flannel-v6.1 onlink proto 74: the gateway is not of the destination's family"),
        "{err}"
    );
    let err = nl
        .add_fdb(&dev, vtep, v4(192, 0, 2, 2))
        .await
        .expect_err("an IPv4 dst on an IPv6 device");
    assert!(
        err.to_string().starts_with(
            "bridge fdb replace 0a:58:00:00:06:02 dev flannel-v6.1 dst 192.0.2.2 self permanent: "
        ),
        "{err}"
    );
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn ipv6_host_gw_routes_via_public_addresses() {
    in_netns("ipv6_host_gw_routes_via_public_addresses", || async {
        let nl = Netlink::new().expect("netlink");
        let veth0 = ifindex("veth0");
        let topo = topo6(None, "veth0", "2001:db8:1::1/64", false);
        let peers: BTreeMap<String, Peer> = [
            (
                "node-2".to_string(),
                Peer {
                    vtep_mac: None,
                    ..peer("fd00:10:244:2::/64", "2001:db8:1::2", "0a:58:00:00:06:02")
                },
            ),
            (
                "node-3".to_string(),
                peer("fd00:10:244:3::/64", "2001:db8:3::3", "0a:58:00:00:06:03"),
            ),
        ]
        .into();
        let want = desired(&peers, &topo);
        assert!(want.unreachable["node-3"].contains("L2"));
        let r = reconcile(&nl, None, Family::V6, &want.state)
            .await
            .expect("reconcile");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!((r.added, r.removed), (1, 0));
        let routes = sh(IP, "-6 route show proto 74");
        assert_eq!(
            routes.trim(),
            "fd00:10:244:2::/64 via 2001:db8:1::2 dev veth0 metric 1024 onlink pref medium"
        );
        let got = nl.read_state(None, Family::V6).await.expect("read");
        assert_eq!(got, want.state);
        assert_eq!(got.routes[&net("fd00:10:244:2::/64")].oif, veth0);
    });
}

strict_and_not!(
    dual_stack_families_stay_apart,
    dual_stack_families_stay_apart_without_strict_check,
    dual_stack_families_stay_apart_in
);

async fn dual_stack_families_stay_apart_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev4 = nl.ensure_device(&spec()).await.expect("flannel.1");
    let dev6 = nl.ensure_device(&spec6()).await.expect("flannel-v6.1");
    nl.ensure_address(&dev4, v4(10, 244, 1, 0))
        .await
        .expect("address v4");
    nl.ensure_address(&dev6, ip("fd00:10:244:1::"))
        .await
        .expect("address v6");
    assert_eq!(
        ip_json("-4 addr show dev flannel.1")[0]["addr_info"][0]["local"],
        "10.244.1.0"
    );
    assert_eq!(global_addrs6("flannel.1"), Vec::<String>::new());
    assert_eq!(global_addrs6("flannel-v6.1"), ["fd00:10:244:1::/128"]);

    let topo4 = Topology {
        device: Some(dev4),
        underlay: Underlay {
            index: ifindex("veth0"),
            name: "veth0".into(),
            addr: net("192.0.2.1/24"),
            mtu: 1500,
        },
        direct_routing: true,
    };
    let topo6 = topo6(Some(dev6), "veth0", "2001:db8:1::1/64", true);
    let peers4: BTreeMap<String, Peer> = [
        (
            "node-2".to_string(),
            peer("10.244.2.0/24", "198.51.100.2", "0a:58:00:00:04:02"),
        ),
        (
            "node-3".to_string(),
            peer("10.244.3.0/24", "192.0.2.3", "0a:58:00:00:04:03"),
        ),
    ]
    .into();
    let peers6: BTreeMap<String, Peer> = [
        (
            "node-2".to_string(),
            peer("fd00:10:244:2::/64", "2001:db8:2::2", "0a:58:00:00:06:02"),
        ),
        (
            "node-3".to_string(),
            peer("fd00:10:244:3::/64", "2001:db8:1::3", "0a:58:00:00:06:03"),
        ),
    ]
    .into();
    let want4 = desired(&peers4, &topo4).state;
    let want6 = desired(&peers6, &topo6).state;
    // Entries of the other family on each device, made by hand.
    sh(
        IP,
        "-6 neigh add fd00:10:244:99:: lladdr 0a:58:00:00:00:99 dev flannel.1 nud permanent",
    );
    sh(
        IP,
        "neigh add 10.244.99.0 lladdr 0a:58:00:00:00:98 dev flannel-v6.1 nud permanent",
    );

    for (dev, family, want) in [(&dev4, Family::V4, &want4), (&dev6, Family::V6, &want6)] {
        let r = reconcile(&nl, Some(dev), family, want)
            .await
            .expect("reconcile");
        assert!(r.errors.is_empty(), "{family}: {:?}", r.errors);
        assert_eq!((r.added, r.removed), (4, 0), "{family}: nothing stale");
    }
    assert_eq!(
        nl.read_state(Some(&dev4), Family::V4).await.expect("read"),
        want4,
        "the IPv4 read holds no IPv6 entry"
    );
    assert_eq!(
        nl.read_state(Some(&dev6), Family::V6).await.expect("read"),
        want6,
        "the IPv6 read holds no IPv4 entry"
    );
    // Reading the other family on a device finds only the hand-made entry.
    let cross = nl.read_state(Some(&dev4), Family::V6).await.expect("read");
    assert_eq!(
        cross.neighbours.keys().copied().collect::<Vec<_>>(),
        [ip("fd00:10:244:99::")]
    );
    assert!(cross.fdb.is_empty());

    // Taking the IPv4 side down leaves the IPv6 side as it was.
    let r = reconcile(&nl, Some(&dev4), Family::V4, &KernelState::default())
        .await
        .expect("remove v4");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.added, r.removed), (0, 4));
    assert_eq!(
        nl.read_state(Some(&dev4), Family::V4).await.expect("read"),
        KernelState::default()
    );
    assert_eq!(
        nl.read_state(Some(&dev6), Family::V6).await.expect("read"),
        want6
    );
    let r = reconcile(&nl, Some(&dev6), Family::V6, &want6)
        .await
        .expect("v6 again");
    assert_eq!((r.added, r.removed), (0, 0));
    assert!(sh(IP, "neigh show dev flannel-v6.1").contains("10.244.99.0"));
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn ping6_across_flannel_v6_between_two_namespaces() {
    in_netns("ping6_across_flannel_v6_between_two_namespaces", || async {
        // Node A is this namespace (veth0, 2001:db8:1::1); node B a second one that
        // gets veth1 (2001:db8:1::2). Each has a flannel-v6.1 and the other as peer.
        let b = Netns::fresh();
        sh(IP, &format!("link set veth1 netns {}", b.path()));
        let spec_a = spec6();
        let nl_a = Netlink::new().expect("netlink A");
        let dev_a = nl_a.ensure_device(&spec_a).await.expect("device A");
        nl_a.ensure_address(&dev_a, ip("fd00:10:244:1::"))
            .await
            .expect("address A");
        let topo_a = topo6(Some(dev_a), "veth0", "2001:db8:1::1/64", false);
        let (nl_b, dev_b, topo_b) = {
            let _in_b = b.enter();
            sh(IP, "addr add 2001:db8:1::2/64 dev veth1 nodad");
            sh(IP, "link set veth1 up");
            let nl = Netlink::new().expect("netlink B");
            let spec = VxlanSpec {
                local: ip("2001:db8:1::2"),
                underlay_index: ifindex("veth1"),
                ..spec_a.clone()
            };
            let dev = nl.ensure_device(&spec).await.expect("device B");
            nl.ensure_address(&dev, ip("fd00:10:244:2::"))
                .await
                .expect("address B");
            let topo = topo6(Some(dev), "veth1", "2001:db8:1::2/64", false);
            (nl, dev, topo)
        };
        assert_ne!(dev_a.mac, dev_b.mac);

        let peer_of = |subnet: &str, public: &str, dev: Device| -> BTreeMap<String, Peer> {
            [(
                "other".to_string(),
                Peer {
                    subnet: net(subnet),
                    public_ip: ip(public),
                    vtep_mac: Some(dev.mac),
                },
            )]
            .into()
        };
        let want_a = desired(
            &peer_of("fd00:10:244:2::/64", "2001:db8:1::2", dev_b),
            &topo_a,
        )
        .state;
        let want_b = desired(
            &peer_of("fd00:10:244:1::/64", "2001:db8:1::1", dev_a),
            &topo_b,
        )
        .state;
        for (nl, dev, want) in [(&nl_a, &dev_a, &want_a), (&nl_b, &dev_b, &want_b)] {
            let r = reconcile(nl, Some(dev), Family::V6, want)
                .await
                .expect("reconcile");
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            assert_eq!(r.added, 3);
            assert_eq!(
                &nl.read_state(Some(dev), Family::V6).await.expect("read"),
                want
            );
        }

        wait_for_dad("flannel-v6.1");
        {
            let _in_b = b.enter();
            wait_for_dad("flannel-v6.1");
        }
        let via = sh(IP, "-6 route get fd00:10:244:2::");
        assert!(via.contains("dev flannel-v6.1"), "{via}");
        let ping = |from: &str, to: &str| {
            let out = Command::new("ping")
                .args([
                    "-6", "-n", "-c", "2", "-i", "0.2", "-W", "5", "-I", from, to,
                ])
                .output()
                .expect("run ping");
            assert!(
                out.status.success(),
                "ping -6 {to} from {from}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ping("fd00:10:244:1::", "fd00:10:244:2::");
        {
            let _in_b = b.enter();
            ping("fd00:10:244:2::", "fd00:10:244:1::");
        }
        // The traffic crossed the tunnel: both devices sent packets.
        for ns in [None, Some(&b)] {
            let _in = ns.map(Netns::enter);
            let stats = ip_json("-s link show flannel-v6.1");
            let tx = stats[0]["stats64"]["tx"]["packets"].as_u64().expect("tx");
            assert!(tx >= 2, "flannel-v6.1 sent {tx} packets");
        }
    });
}

/// The test namespace's underlay, `veth0` with 192.0.2.1/24.
fn veth0() -> Underlay {
    Underlay {
        index: ifindex("veth0"),
        name: "veth0".into(),
        addr: "192.0.2.1/24".parse().unwrap(),
        mtu: 1500,
    }
}

/// `ethtool -k DEV`: whether `tx-checksum-ip-generic` is on.
fn tx_checksum_on(dev: &str) -> bool {
    let out = sh("ethtool", &format!("-k {dev}"));
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("tx-checksum-ip-generic:"))
        .unwrap_or_else(|| panic!("no tx-checksum-ip-generic in ethtool -k {dev}:\n{out}"));
    line.trim().starts_with("on")
}

#[test]
#[cfg_attr(not(twill_lab), ignore = "needs root (network namespaces); CI runs it")]
fn tx_checksum_offload_off_holds_from_start_and_after_the_device_is_recreated() {
    in_netns(
        "tx_checksum_offload_off_holds_from_start_and_after_the_device_is_recreated",
        || async {
            let nl = Netlink::new().expect("netlink");
            let conf = twill_common::NetConf::parse(
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "TxChecksumOffload": false}}"#,
            )
            .unwrap();
            let mut plane = Plane::start(&nl, &conf.backend, veth0(), v4(192, 0, 2, 1), 1450)
                .await
                .expect("plane");
            assert!(!tx_checksum_on("flannel.1"), "off from the start");
            sh(IP, "link del flannel.1");
            let recreated = plane.check_device(&nl).await.expect("check");
            assert!(recreated.is_some(), "the device came back");
            assert!(!tx_checksum_on("flannel.1"), "off again after re-creation");
            sh(IP, "link del flannel.1");
            let on = twill_common::NetConf::parse(
                r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
            )
            .unwrap();
            Plane::start(&nl, &on.backend, veth0(), v4(192, 0, 2, 1), 1450)
                .await
                .expect("plane");
            assert!(
                tx_checksum_on("flannel.1"),
                "the kernel's default is left alone"
            );
        },
    );
}
