//! `Netlink` against the real kernel, each test in a fresh network namespace of its own.
//!
//! Every test runs its body on a new thread that first `unshare(CLONE_NEWNET)`s: the
//! network namespace is per thread, so the host's is never touched, and the `ip`
//! commands the test forks from that thread inherit the new namespace (the first check
//! of every test is that only `lo` exists). The namespace is unnamed and dies with
//! the thread: nothing is left behind. Only TEST-NET addresses are used, on a veth
//! pair that leads nowhere.
//!
//! Without root (or without network namespaces) the tests print a loud SKIPPED and pass,
//! except in CI, where they fail.

use std::future::Future;
use std::net::Ipv4Addr;
use std::process::Command;

use ipnet::Ipv4Net;
use serde_json::Value;
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::dataplane::{
    DataPlane, DataPlaneError, Device, KernelState, Route, VxlanSpec, ROUTE_PROTOCOL,
};
use twill_common::lease::Mac;

const IP: &str = "/usr/sbin/ip";
const BRIDGE: &str = "/usr/sbin/bridge";

/// A loud skip; in CI (`CI` set to anything but empty, `0` or `false`) a failure, since
/// CI runs as root with network namespaces and a skip there would hide the kernel tests.
fn skip(test: &str, why: &str) {
    let ci = std::env::var("CI")
        .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    assert!(
        !ci,
        "{test} cannot run in CI: needs root and network namespaces ({why})"
    );
    eprintln!("SKIPPED {test}: needs root and network namespaces ({why})");
}

/// Runs `body` on a current-thread runtime inside a fresh network namespace with `lo`
/// up and the underlay `veth0` (192.0.2.1/24, peer `veth1`) up.
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

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("CIDR")
}

fn spec() -> VxlanSpec {
    VxlanSpec {
        name: "flannel.1".into(),
        vni: 1,
        local: Ipv4Addr::new(192, 0, 2, 1),
        port: 8472,
        underlay_index: ifindex("veth0"),
        mtu: 1450,
        learning: false,
        gbp: false,
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
    assert_eq!(d["local"].as_str(), Some(spec.local.to_string().as_str()));
    assert_eq!(d["link"], "veth0");
    assert_eq!(d["port"].as_u64(), Some(u64::from(spec.port)));
    assert_eq!(d["learning"].as_bool(), Some(spec.learning));
    assert_eq!(d["gbp"].as_bool().unwrap_or(false), spec.gbp);
    let accept_ra =
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{}/accept_ra", spec.name))
            .expect("IPv6 is on in the test namespace");
    assert_eq!(accept_ra.trim(), "0");
}

#[test]
fn ensure_device_creates_reuses_and_recreates() {
    in_netns("ensure_device_creates_reuses_and_recreates", || {
        ensure_device_creates_reuses_and_recreates_in(true)
    });
}

#[test]
fn ensure_device_creates_reuses_and_recreates_without_strict_check() {
    in_netns(
        "ensure_device_creates_reuses_and_recreates_without_strict_check",
        || ensure_device_creates_reuses_and_recreates_in(false),
    );
}

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
    s.local = Ipv4Addr::new(192, 0, 2, 9);
    let recreated3 = nl.ensure_device(&s).await.expect("recreate for local");
    assert_ne!(recreated3.index, recreated2.index);
    assert_device_matches(&recreated3, &s);

    // Another underlying device: recreated.
    sh(IP, "addr add 198.51.100.1/24 dev veth1");
    s.underlay_index = ifindex("veth1");
    s.local = Ipv4Addr::new(198, 51, 100, 1);
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

#[test]
fn ensure_address_leaves_exactly_one() {
    in_netns("ensure_address_leaves_exactly_one", || {
        ensure_address_leaves_exactly_one_in(true)
    });
}

#[test]
fn ensure_address_leaves_exactly_one_without_strict_check() {
    in_netns(
        "ensure_address_leaves_exactly_one_without_strict_check",
        || ensure_address_leaves_exactly_one_in(false),
    );
}

async fn ensure_address_leaves_exactly_one_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec()).await.expect("device");
    let subnet = Ipv4Addr::new(10, 244, 74, 0);

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
    nl.ensure_address(&dev, Ipv4Addr::new(10, 244, 12, 0))
        .await
        .expect("move");
    assert_eq!(addrs(), ["10.244.12.0/32"]);
    // The underlay keeps its own address.
    assert_eq!(
        ip_json("-4 addr show dev veth0")[0]["addr_info"][0]["local"],
        "192.0.2.1"
    );
}

#[test]
fn entries_round_trip_through_read_state() {
    in_netns("entries_round_trip_through_read_state", || {
        entries_round_trip_through_read_state_in(true)
    });
}

#[test]
fn entries_round_trip_through_read_state_without_strict_check() {
    in_netns(
        "entries_round_trip_through_read_state_without_strict_check",
        || entries_round_trip_through_read_state_in(false),
    );
}

async fn entries_round_trip_through_read_state_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec()).await.expect("device");
    nl.ensure_address(&dev, Ipv4Addr::new(10, 244, 74, 0))
        .await
        .expect("address");
    let veth0 = ifindex("veth0");
    assert_eq!(
        nl.read_state(Some(&dev)).await.expect("read"),
        KernelState::default()
    );

    let peers = [
        ("10.244.12.0/24", "192.0.2.12", "0a:58:0a:f4:0c:00"),
        ("10.244.13.0/24", "192.0.2.13", "0a:58:0a:f4:0d:00"),
    ];
    let mut want = KernelState::default();
    for (subnet, public, vtep) in peers {
        let subnet = net(subnet);
        let public: Ipv4Addr = public.parse().expect("ip");
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
        gateway: Ipv4Addr::new(192, 0, 2, 14),
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

    let got = nl.read_state(Some(&dev)).await.expect("read");
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
    nl.add_neighbour(&dev, Ipv4Addr::new(10, 244, 12, 0), moved_mac)
        .await
        .expect("neigh replace");
    let moved_route = Route {
        gateway: Ipv4Addr::new(192, 0, 2, 15),
        oif: veth0,
        ..direct
    };
    nl.add_route(&moved_route).await.expect("route replace");
    let got = nl.read_state(Some(&dev)).await.expect("read");
    assert_eq!(got.neighbours[&Ipv4Addr::new(10, 244, 12, 0)], moved_mac);
    assert_eq!(got.routes[&direct.dst], moved_route);
    nl.add_neighbour(
        &dev,
        Ipv4Addr::new(10, 244, 12, 0),
        mac("0a:58:0a:f4:0c:00"),
    )
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
        nl.read_state(Some(&dev)).await.expect("read"),
        KernelState::default()
    );
    // Only ours went.
    assert!(sh(IP, "route show 10.9.0.0/24").contains("10.9.0.0/24 dev flannel.1"));
    assert!(sh(IP, "neigh show dev flannel.1").contains("10.244.99.0"));
    assert!(sh(BRIDGE, "fdb show dev flannel.1").contains("00:00:00:00:00:00 dst 192.0.2.50"));

    // Deleting on a device that is gone is fine as well.
    nl.delete_device("flannel.1").await.expect("delete device");
    let vtep = mac("0a:58:0a:f4:0c:00");
    nl.del_neighbour(&dev, Ipv4Addr::new(10, 244, 12, 0))
        .await
        .expect("del neigh, no device");
    nl.del_fdb(&dev, vtep, Ipv4Addr::new(192, 0, 2, 12))
        .await
        .expect("del fdb, no device");
    nl.del_route(&want.routes[&net("10.244.12.0/24")])
        .await
        .expect("del route, no device");

    // A failed add is an error that reads like the ip command.
    let err = nl
        .add_route(&Route {
            dst: net("10.244.20.0/24"),
            gateway: Ipv4Addr::new(10, 244, 20, 0),
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
        .add_fdb(&dev, vtep, Ipv4Addr::new(192, 0, 2, 12))
        .await
        .expect_err("no such device");
    assert!(
        err.to_string()
            .starts_with("bridge fdb replace 0a:58:0a:f4:0c:00 dev if"),
        "{err}"
    );
}

#[test]
fn error_ops_name_the_device() {
    in_netns("error_ops_name_the_device", || {
        error_ops_name_the_device_in(true)
    });
}

#[test]
fn error_ops_name_the_device_without_strict_check() {
    in_netns("error_ops_name_the_device_without_strict_check", || {
        error_ops_name_the_device_in(false)
    });
}

async fn error_ops_name_the_device_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let dev = nl.ensure_device(&spec()).await.expect("device");
    // A gateway that is not a unicast address is refused.
    let err = nl
        .add_route(&Route {
            dst: net("10.244.21.0/24"),
            gateway: Ipv4Addr::new(224, 0, 0, 1),
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

#[test]
fn underlay_discovery() {
    in_netns("underlay_discovery", || underlay_discovery_in(true));
}

#[test]
fn underlay_discovery_without_strict_check() {
    in_netns("underlay_discovery_without_strict_check", || {
        underlay_discovery_in(false)
    });
}

async fn underlay_discovery_in(strict: bool) {
    let nl = Netlink::with_strict_check(strict).expect("netlink");
    let veth0 = ifindex("veth0");
    sh(IP, "addr add 192.0.2.2/24 dev veth0");
    sh(IP, "addr add 198.51.100.1/24 dev veth1");
    sh(IP, "link set veth1 mtu 1400");

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
            ("veth1".into(), "198.51.100.1/24".into(), 1400),
            ("veth0".into(), "192.0.2.1/24".into(), 1500),
            ("veth0".into(), "192.0.2.2/24".into(), 1500),
        ],
        "interface-index order, primary address first"
    );
    assert!(all.windows(2).all(|w| w[0].index <= w[1].index));
    assert_eq!(all[2].index, veth0);

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
        nl.route_interface(Ipv4Addr::new(198, 51, 100, 7))
            .await
            .expect("route get"),
        ifindex("veth1")
    );
    assert_eq!(
        nl.route_interface(Ipv4Addr::new(203, 0, 113, 1))
            .await
            .expect("route get via default"),
        veth0
    );
    assert_eq!(nl.link_mtu(ifindex("veth1")).await.expect("mtu"), 1400);
}
