//! Reconcile, not replay: compute the overlay entries the known leases call for,
//! read what the kernel has, and apply only the difference.
//!
//! Removals run before additions (route, FDB, neighbour; then neighbour, FDB, route,
//! the order docs/compatibility.md gives under Kernel state), and an error on one entry
//! does not stop the
//! others: every error is collected and reported, and the next run retries.
//!
//! One reconciler serves one address family: a dual-stack node runs one per
//! [`Topology`] (`flannel.<VNI>` over the IPv4 underlay, `flannel-v6.<VNI>` over the
//! IPv6 one), each reading and writing only the entries of its family.

use std::collections::BTreeMap;

use twill_common::model::Peer;

use crate::dataplane::{DataPlane, DataPlaneError, Device, Family, KernelState, Route, Underlay};

/// How peers of one address family are reached.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The VXLAN device of the family; `None` with the host-gw backend, which routes
    /// every peer via its public address.
    pub device: Option<Device>,
    /// This node's public interface, with its address of the family.
    pub underlay: Underlay,
    /// `Backend.DirectRouting`: plain routes to peers on the underlay's L2 subnet.
    pub direct_routing: bool,
}

impl Topology {
    /// The address family this topology reaches peers in: its underlay address's.
    pub fn family(&self) -> Family {
        Family::of_net(self.underlay.addr)
    }
}

/// The entries the peers call for, and the peers that cannot be reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// What the kernel should hold.
    pub state: KernelState,
    /// Peers given no entry, by node name, with the reason.
    pub unreachable: BTreeMap<String, String>,
}

/// The entries the peers call for (docs/compatibility.md, Kernel state and host-gw).
///
/// Peers are of the topology's family. A peer whose subnet or public address is of the
/// other family gets no entry and is reported in `unreachable`: a dual-stack caller
/// hands each family's reconciler that family's peers, so such a peer is a mistake that
/// should show (log, metric) rather than vanish.
pub fn desired(peers: &BTreeMap<String, Peer>, topo: &Topology) -> Desired {
    let family = topo.family();
    let mut neighbours = Vec::with_capacity(peers.len());
    let mut fdb = Vec::with_capacity(peers.len());
    let mut routes = Vec::with_capacity(peers.len());
    let mut unreachable = BTreeMap::new();
    for (name, peer) in peers {
        if Family::of_net(peer.subnet) != family || Family::of(peer.public_ip) != family {
            unreachable.insert(
                name.clone(),
                format!(
                    "subnet {} via public_ip {} is not {family}, the family of {}'s address {}",
                    peer.subnet, peer.public_ip, topo.underlay.name, topo.underlay.addr
                ),
            );
            continue;
        }
        let on_link = topo.underlay.addr.contains(&peer.public_ip);
        let direct = Route {
            dst: peer.subnet,
            gateway: peer.public_ip,
            oif: topo.underlay.index,
        };
        let device = match topo.device {
            Some(dev) if !(topo.direct_routing && on_link) => dev,
            // The kernel refuses a gateway that is not on-link (flannel retries that
            // forever); the peer is reported instead and the others go on.
            None if !on_link => {
                unreachable.insert(
                    name.clone(),
                    format!(
                        "public_ip {} is not on {}'s subnet {}: host-gw needs the nodes on one L2 segment",
                        peer.public_ip,
                        topo.underlay.name,
                        topo.underlay.addr.trunc()
                    ),
                );
                continue;
            }
            _ => {
                routes.push((peer.subnet, direct));
                continue;
            }
        };
        let Some(mac) = peer.vtep_mac else {
            unreachable.insert(
                name.clone(),
                "the lease has no VTEP MAC (a host-gw lease in a VXLAN network)".into(),
            );
            continue;
        };
        let gateway = peer.subnet.network();
        neighbours.push((gateway, mac));
        fdb.push((mac, peer.public_ip));
        routes.push((
            peer.subnet,
            Route {
                dst: peer.subnet,
                gateway,
                oif: device.index,
            },
        ));
    }
    // Collecting sorts once and builds each map in bulk (a later duplicate key wins, as
    // with inserts): with thousands of peers this runs after every watch batch.
    Desired {
        state: KernelState {
            neighbours: neighbours.into_iter().collect(),
            fdb: fdb.into_iter().collect(),
            routes: routes.into_iter().collect(),
        },
        unreachable,
    }
}

/// Stale entries, then new or changed ones with the value they replace.
type MapDiff<'a, K, V> = (Vec<(&'a K, &'a V)>, Vec<(&'a K, &'a V, Option<&'a V>)>);

/// The keys only `have` holds, and the entries of `want` that `have` lacks or holds
/// with another value (with the old value), from one walk of both maps in key order:
/// no lookups, so a one-peer change among thousands costs a merge, not a search each.
fn diff_maps<'a, K: Ord, V: PartialEq>(
    have: &'a BTreeMap<K, V>,
    want: &'a BTreeMap<K, V>,
) -> MapDiff<'a, K, V> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let (mut stale, mut changed) = (Vec::new(), Vec::new());
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        match (h.peek(), w.peek()) {
            (None, None) => break,
            (Some(_), None) => stale.extend(h.by_ref()),
            (None, Some(_)) => changed.extend(w.by_ref().map(|(k, v)| (k, v, None))),
            (Some(&(hk, hv)), Some(&(wk, wv))) => match hk.cmp(wk) {
                Less => {
                    stale.push((hk, hv));
                    h.next();
                }
                Greater => {
                    changed.push((wk, wv, None));
                    w.next();
                }
                Equal => {
                    if hv != wv {
                        changed.push((wk, wv, Some(hv)));
                    }
                    h.next();
                    w.next();
                }
            },
        }
    }
    (stale, changed)
}

/// What one reconcile run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Entries added or replaced.
    pub added: usize,
    /// Entries removed.
    pub removed: usize,
    /// Every failure; the run went on past each.
    pub errors: Vec<DataPlaneError>,
}

impl Report {
    fn record(
        &mut self,
        result: Result<(), DataPlaneError>,
        added: bool,
        what: std::fmt::Arguments<'_>,
    ) {
        match result {
            Ok(()) if added => {
                self.added += 1;
                tracing::debug!("added {what}");
            }
            Ok(()) => {
                self.removed += 1;
                tracing::debug!("removed {what}");
            }
            Err(e) => self.errors.push(e),
        }
    }
}

/// Brings the kernel to `want`: reads the current state of `family` (the family of
/// `want`'s entries) and applies the difference; the other family's entries are not
/// read, so they are left alone.
pub async fn reconcile(
    dp: &dyn DataPlane,
    dev: Option<&Device>,
    family: Family,
    want: &KernelState,
) -> Result<Report, DataPlaneError> {
    let have = dp.read_state(dev, family).await?;
    Ok(apply_diff(dp, dev, &have, want).await)
}

/// Applies the difference between `have` (what the kernel is believed to hold) and
/// `want`, both of one family. Cheaper than `reconcile` when `have` is known (the last
/// applied state): a dump of thousands of entries is skipped, and the periodic
/// `reconcile` catches anything changed behind our back.
pub async fn apply_diff(
    dp: &dyn DataPlane,
    dev: Option<&Device>,
    have: &KernelState,
    want: &KernelState,
) -> Report {
    let mut report = Report::default();
    let (stale_routes, new_routes) = diff_maps(&have.routes, &want.routes);
    for (_, r) in stale_routes {
        report.record(
            dp.del_route(r).await,
            false,
            format_args!("route {} via {}", r.dst, r.gateway),
        );
    }
    // Without a device (host-gw) there are no neighbours or FDB entries to hold.
    if let Some(dev) = dev {
        apply_device_diff(dp, dev, have, want, &mut report).await;
    }
    for (dst, route, had) in new_routes {
        report.record(
            dp.add_route(route).await,
            true,
            format_args!("route {dst} via {} (had {had:?})", route.gateway),
        );
    }
    report
}

/// The device's part of `apply_diff`: stale FDB entries and neighbours go, then new
/// neighbours and FDB entries come, between the route removals and additions.
async fn apply_device_diff(
    dp: &dyn DataPlane,
    dev: &Device,
    have: &KernelState,
    want: &KernelState,
    report: &mut Report,
) {
    let (stale_fdb, new_fdb) = diff_maps(&have.fdb, &want.fdb);
    let (stale_neighbours, new_neighbours) = diff_maps(&have.neighbours, &want.neighbours);
    for (mac, dst) in stale_fdb {
        report.record(
            dp.del_fdb(dev, *mac, *dst).await,
            false,
            format_args!("fdb {mac} dst {dst}"),
        );
    }
    for (ip, _) in stale_neighbours {
        report.record(
            dp.del_neighbour(dev, *ip).await,
            false,
            format_args!("neighbour {ip}"),
        );
    }
    for (ip, mac, had) in new_neighbours {
        report.record(
            dp.add_neighbour(dev, *ip, *mac).await,
            true,
            format_args!("neighbour {ip} lladdr {mac} (had {had:?})"),
        );
    }
    for (mac, dst, had) in new_fdb {
        report.record(
            dp.add_fdb(dev, *mac, *dst).await,
            true,
            format_args!("fdb {mac} dst {dst} (had {had:?})"),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Mutex;

    use twill_common::model::Mac;

    use super::*;
    use crate::dataplane::VxlanSpec;

    /// An in-memory kernel: what the reconciler's logic is tested against. It holds
    /// both families' entries, as one kernel does, and reads one family at a time.
    #[derive(Default)]
    struct FakeKernel {
        state: Mutex<KernelState>,
        ops: Mutex<Vec<String>>,
    }

    impl FakeKernel {
        fn log(&self, op: String) {
            self.ops.lock().unwrap().push(op);
        }
    }

    #[async_trait::async_trait]
    impl DataPlane for FakeKernel {
        async fn ensure_device(&self, _spec: &VxlanSpec) -> Result<Device, DataPlaneError> {
            Ok(dev())
        }
        async fn set_tx_checksum_offload(
            &self,
            device: &str,
            on: bool,
        ) -> Result<(), DataPlaneError> {
            self.log(format!("tx-checksum {device} {on}"));
            Ok(())
        }
        async fn delete_device(&self, name: &str) -> Result<(), DataPlaneError> {
            self.log(format!("delete {name}"));
            Ok(())
        }
        async fn ensure_address(&self, _dev: &Device, _addr: IpAddr) -> Result<(), DataPlaneError> {
            Ok(())
        }
        async fn read_state(
            &self,
            _dev: Option<&Device>,
            family: Family,
        ) -> Result<KernelState, DataPlaneError> {
            let all = self.state.lock().unwrap();
            Ok(KernelState {
                neighbours: all
                    .neighbours
                    .iter()
                    .filter(|(ip, _)| Family::of(**ip) == family)
                    .map(|(ip, mac)| (*ip, *mac))
                    .collect(),
                fdb: all
                    .fdb
                    .iter()
                    .filter(|(_, dst)| Family::of(**dst) == family)
                    .map(|(mac, dst)| (*mac, *dst))
                    .collect(),
                routes: all
                    .routes
                    .iter()
                    .filter(|(dst, _)| Family::of_net(**dst) == family)
                    .map(|(dst, r)| (*dst, *r))
                    .collect(),
            })
        }
        async fn add_neighbour(
            &self,
            _dev: &Device,
            ip: IpAddr,
            mac: Mac,
        ) -> Result<(), DataPlaneError> {
            self.log(format!("neigh replace {ip}"));
            self.state.lock().unwrap().neighbours.insert(ip, mac);
            Ok(())
        }
        async fn del_neighbour(&self, _dev: &Device, ip: IpAddr) -> Result<(), DataPlaneError> {
            self.log(format!("neigh del {ip}"));
            self.state.lock().unwrap().neighbours.remove(&ip);
            Ok(())
        }
        async fn add_fdb(
            &self,
            _dev: &Device,
            mac: Mac,
            dst: IpAddr,
        ) -> Result<(), DataPlaneError> {
            self.log(format!("fdb replace {mac}"));
            self.state.lock().unwrap().fdb.insert(mac, dst);
            Ok(())
        }
        async fn del_fdb(
            &self,
            _dev: &Device,
            mac: Mac,
            _dst: IpAddr,
        ) -> Result<(), DataPlaneError> {
            self.log(format!("fdb del {mac}"));
            self.state.lock().unwrap().fdb.remove(&mac);
            Ok(())
        }
        async fn add_route(&self, route: &Route) -> Result<(), DataPlaneError> {
            self.log(format!("route replace {}", route.dst));
            self.state.lock().unwrap().routes.insert(route.dst, *route);
            Ok(())
        }
        async fn del_route(&self, route: &Route) -> Result<(), DataPlaneError> {
            self.log(format!("route del {}", route.dst));
            self.state.lock().unwrap().routes.remove(&route.dst);
            Ok(())
        }
        async fn isolate(
            &self,
            networks: &[twill_common::model::PerFamily<ipnet::IpNet>],
        ) -> Result<(), DataPlaneError> {
            self.log(format!("isolate {}", networks.len()));
            Ok(())
        }
    }

    /// A run against `k` that could read the kernel.
    async fn run(
        k: &FakeKernel,
        dev: Option<&Device>,
        family: Family,
        want: &KernelState,
    ) -> Report {
        reconcile(k, dev, family, want).await.unwrap()
    }

    fn dev() -> Device {
        Device {
            index: 7,
            mac: Mac([0x0a, 0, 0, 0, 0, 1]),
        }
    }

    /// The node's side of one family: `device` over eth0's `addr`.
    fn topo_of(device: Device, addr: &str, direct: bool) -> Topology {
        Topology {
            device: Some(device),
            underlay: Underlay {
                index: 2,
                name: "eth0".into(),
                addr: addr.parse().unwrap(),
                mtu: 1500,
            },
            direct_routing: direct,
        }
    }

    fn topo(direct: bool) -> Topology {
        topo_of(dev(), "192.0.2.1/24", direct)
    }

    /// Peer `node-N` with `subnet` and a VTEP MAC ending in `mac`, N.
    fn peer_of(n: u8, subnet: String, public: &str, mac: u8) -> (String, Peer) {
        (
            format!("node-{n}"),
            Peer {
                subnet: subnet.parse().unwrap(),
                public_ip: public.parse().unwrap(),
                vtep_mac: Some(Mac([0x0a, 0, 0, 0, mac, n])),
            },
        )
    }

    fn peer(n: u8, public: &str) -> (String, Peer) {
        peer_of(n, format!("10.244.{n}.0/24"), public, 1)
    }

    fn dev6() -> Device {
        Device {
            index: 8,
            mac: Mac([0x0a, 0, 0, 0, 0, 2]),
        }
    }

    /// The IPv6 side of the same node: `flannel-v6.1` over eth0's 2001:db8:1::1/64.
    fn topo6(direct: bool) -> Topology {
        topo_of(dev6(), "2001:db8:1::1/64", direct)
    }

    fn peer6(n: u8, public: &str) -> (String, Peer) {
        peer_of(n, format!("fd00:10:244:{n}::/64"), public, 6)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_merge_finds_stale_new_and_changed_entries() {
        let have: BTreeMap<u8, char> = [(1, 'a'), (2, 'b'), (4, 'd'), (6, 'f')].into();
        let want: BTreeMap<u8, char> = [(0, 'z'), (2, 'B'), (3, 'c'), (4, 'd')].into();
        let (stale, changed) = diff_maps(&have, &want);
        assert_eq!(stale, vec![(&1, &'a'), (&6, &'f')]);
        assert_eq!(
            changed,
            vec![(&0, &'z', None), (&2, &'B', Some(&'b')), (&3, &'c', None)]
        );
        let (stale, changed) = diff_maps(&want, &want);
        assert!(stale.is_empty() && changed.is_empty());
    }

    #[tokio::test]
    async fn programs_then_changes_only_the_difference() {
        let k = FakeKernel::default();
        let mut peers: BTreeMap<_, _> = [peer(1, "192.0.2.11"), peer(2, "198.51.100.12")].into();
        let r = run(
            &k,
            Some(&dev()),
            Family::V4,
            &desired(&peers, &topo(false)).state,
        )
        .await;
        assert_eq!((r.added, r.removed), (6, 0));
        assert_eq!(
            k.ops.lock().unwrap()[..3],
            [
                "neigh replace 10.244.1.0",
                "neigh replace 10.244.2.0",
                "fdb replace 0a:00:00:00:01:01"
            ]
        );
        k.ops.lock().unwrap().clear();

        let r = run(
            &k,
            Some(&dev()),
            Family::V4,
            &desired(&peers, &topo(false)).state,
        )
        .await;
        assert_eq!((r.added, r.removed), (0, 0), "converged: nothing to do");

        peers.remove("node-1");
        let r = run(
            &k,
            Some(&dev()),
            Family::V4,
            &desired(&peers, &topo(false)).state,
        )
        .await;
        assert_eq!((r.added, r.removed), (0, 3));
        assert_eq!(
            *k.ops.lock().unwrap(),
            [
                "route del 10.244.1.0/24",
                "fdb del 0a:00:00:00:01:01",
                "neigh del 10.244.1.0"
            ],
            "removal runs route, fdb, neighbour"
        );
    }

    #[tokio::test]
    async fn repairs_a_hand_deleted_route() {
        let k = FakeKernel::default();
        let peers: BTreeMap<_, _> = [peer(1, "192.0.2.11")].into();
        let want = desired(&peers, &topo(false)).state;
        run(&k, Some(&dev()), Family::V4, &want).await;
        k.state.lock().unwrap().routes.clear();
        let r = run(&k, Some(&dev()), Family::V4, &want).await;
        assert_eq!((r.added, r.removed), (1, 0));
        assert_eq!(*k.state.lock().unwrap(), want);
    }

    #[test]
    fn direct_routing_only_for_peers_on_the_same_l2_subnet() {
        let peers: BTreeMap<_, _> = [peer(1, "192.0.2.11"), peer(2, "198.51.100.12")].into();
        let want = desired(&peers, &topo(true)).state;
        let direct = want.routes[&"10.244.1.0/24".parse().unwrap()];
        assert_eq!(
            (direct.gateway.to_string(), direct.oif),
            ("192.0.2.11".into(), 2)
        );
        let vxlan = want.routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            (vxlan.gateway.to_string(), vxlan.oif),
            ("10.244.2.0".into(), 7)
        );
        assert_eq!(want.neighbours.len(), 1);
        assert_eq!(want.fdb.len(), 1);
    }

    #[tokio::test]
    async fn host_gw_routes_on_link_peers_and_reports_the_others() {
        let k = FakeKernel::default();
        let peers: BTreeMap<_, _> = [peer(1, "192.0.2.11"), peer(2, "198.51.100.12")].into();
        let host_gw = Topology {
            device: None,
            ..topo(false)
        };
        let want = desired(&peers, &host_gw);
        assert!(want.state.neighbours.is_empty() && want.state.fdb.is_empty());
        let route = want.state.routes[&"10.244.1.0/24".parse().unwrap()];
        assert_eq!(
            (route.gateway.to_string(), route.oif),
            ("192.0.2.11".into(), 2)
        );
        assert_eq!(want.state.routes.len(), 1);
        let why = &want.unreachable["node-2"];
        assert!(why.contains("198.51.100.12") && why.contains("L2"), "{why}");
        let r = run(&k, None, Family::V4, &want.state).await;
        assert_eq!((r.added, r.removed, r.errors.len()), (1, 0, 0));
        assert_eq!(*k.ops.lock().unwrap(), ["route replace 10.244.1.0/24"]);
    }

    #[test]
    fn a_vxlan_peer_without_a_vtep_mac_is_reported() {
        let (name, mut p) = peer(3, "198.51.100.13");
        p.vtep_mac = None;
        let want = desired(&[(name, p)].into(), &topo(false));
        assert!(want.state.routes.is_empty());
        assert!(want.unreachable["node-3"].contains("VTEP MAC"));
    }

    #[tokio::test]
    async fn ipv6_peers_get_a_neighbour_an_fdb_entry_and_an_onlink_route() {
        let k = FakeKernel::default();
        let mut peers: BTreeMap<_, _> =
            [peer6(1, "2001:db8:1::11"), peer6(2, "2001:db8:2::12")].into();
        let want = desired(&peers, &topo6(false));
        assert!(want.unreachable.is_empty(), "{:?}", want.unreachable);
        let (_, p1) = &peer6(1, "2001:db8:1::11");
        let gw = ip("fd00:10:244:1::");
        assert_eq!(want.state.neighbours[&gw], p1.vtep_mac.unwrap());
        assert_eq!(
            want.state.fdb[&p1.vtep_mac.unwrap()],
            ip("2001:db8:1::11"),
            "FDB to the peer's public IPv6 address"
        );
        assert_eq!(
            want.state.routes[&p1.subnet],
            Route {
                dst: p1.subnet,
                gateway: gw,
                oif: dev6().index
            },
            "S6 via S6.network dev flannel-v6.1"
        );

        let r = run(&k, Some(&dev6()), Family::V6, &want.state).await;
        assert_eq!((r.added, r.removed, r.errors.len()), (6, 0, 0));
        assert_eq!(
            k.ops.lock().unwrap()[..3],
            [
                "neigh replace fd00:10:244:1::",
                "neigh replace fd00:10:244:2::",
                "fdb replace 0a:00:00:00:06:01"
            ]
        );
        k.ops.lock().unwrap().clear();
        let again = desired(&peers, &topo6(false)).state;
        let r = run(&k, Some(&dev6()), Family::V6, &again).await;
        assert_eq!((r.added, r.removed), (0, 0), "converged: nothing to do");

        peers.remove("node-1");
        let r = run(
            &k,
            Some(&dev6()),
            Family::V6,
            &desired(&peers, &topo6(false)).state,
        )
        .await;
        assert_eq!((r.added, r.removed), (0, 3));
        assert_eq!(
            *k.ops.lock().unwrap(),
            [
                "route del fd00:10:244:1::/64",
                "fdb del 0a:00:00:00:06:01",
                "neigh del fd00:10:244:1::"
            ],
            "removal runs route, fdb, neighbour"
        );
    }

    #[test]
    fn ipv6_direct_routing_only_for_peers_on_the_same_l2_subnet() {
        let peers: BTreeMap<_, _> = [peer6(1, "2001:db8:1::11"), peer6(2, "2001:db8:2::12")].into();
        let want = desired(&peers, &topo6(true)).state;
        let direct = want.routes[&"fd00:10:244:1::/64".parse().unwrap()];
        assert_eq!((direct.gateway, direct.oif), (ip("2001:db8:1::11"), 2));
        let vxlan = want.routes[&"fd00:10:244:2::/64".parse().unwrap()];
        assert_eq!((vxlan.gateway, vxlan.oif), (ip("fd00:10:244:2::"), 8));
        assert_eq!(
            want.neighbours.keys().copied().collect::<Vec<_>>(),
            [ip("fd00:10:244:2::")]
        );
        assert_eq!(
            want.fdb.values().copied().collect::<Vec<_>>(),
            [ip("2001:db8:2::12")]
        );
    }

    #[tokio::test]
    async fn ipv6_host_gw_routes_on_link_peers_and_reports_the_others() {
        let k = FakeKernel::default();
        let peers: BTreeMap<_, _> = [peer6(1, "2001:db8:1::11"), peer6(2, "2001:db8:2::12")].into();
        let host_gw = Topology {
            device: None,
            ..topo6(false)
        };
        let want = desired(&peers, &host_gw);
        assert!(want.state.neighbours.is_empty() && want.state.fdb.is_empty());
        let route = want.state.routes[&"fd00:10:244:1::/64".parse().unwrap()];
        assert_eq!((route.gateway, route.oif), (ip("2001:db8:1::11"), 2));
        assert_eq!(want.state.routes.len(), 1);
        let why = &want.unreachable["node-2"];
        assert!(
            why.contains("2001:db8:2::12") && why.contains("2001:db8:1::/64") && why.contains("L2"),
            "{why}"
        );
        let r = run(&k, None, Family::V6, &want.state).await;
        assert_eq!((r.added, r.removed, r.errors.len()), (1, 0, 0));
        assert_eq!(*k.ops.lock().unwrap(), ["route replace fd00:10:244:1::/64"]);
    }

    #[test]
    fn peers_of_the_other_family_are_reported_not_programmed() {
        let v4: BTreeMap<_, _> = [peer(1, "192.0.2.11")].into();
        let v6: BTreeMap<_, _> = [peer6(2, "2001:db8:1::12")].into();
        for (peers, topo, name, family) in [
            (&v4, topo6(false), "node-1", "IPv6"),
            (&v6, topo(false), "node-2", "IPv4"),
        ] {
            let want = desired(peers, &topo);
            assert_eq!(want.state, KernelState::default());
            let why = &want.unreachable[name];
            assert!(why.contains(&format!("is not {family}")), "{why}");
        }
        // A subnet and public address of different families is no peer of either.
        let (name, mut mixed) = peer6(3, "2001:db8:1::13");
        mixed.public_ip = ip("192.0.2.13");
        let peers: BTreeMap<_, _> = [(name, mixed)].into();
        for topo in [topo(false), topo6(false)] {
            let want = desired(&peers, &topo);
            assert_eq!(want.state, KernelState::default());
            assert!(want.unreachable.contains_key("node-3"));
        }
    }

    #[tokio::test]
    async fn each_family_reconciles_only_its_own_entries() {
        let k = FakeKernel::default();
        let v4: BTreeMap<_, _> = [peer(1, "192.0.2.11"), peer(2, "198.51.100.12")].into();
        let v6: BTreeMap<_, _> = [peer6(1, "2001:db8:1::11"), peer6(2, "2001:db8:2::12")].into();
        let want4 = desired(&v4, &topo(false)).state;
        let want6 = desired(&v6, &topo6(false)).state;
        let r = run(&k, Some(&dev()), Family::V4, &want4).await;
        assert_eq!((r.added, r.removed), (6, 0));
        let r = run(&k, Some(&dev6()), Family::V6, &want6).await;
        assert_eq!(
            (r.added, r.removed),
            (6, 0),
            "the IPv4 entries are not stale"
        );
        assert_eq!(k.read_state(None, Family::V4).await.unwrap(), want4);
        assert_eq!(k.read_state(None, Family::V6).await.unwrap(), want6);

        // Losing every IPv4 peer (or tearing the IPv4 side down) leaves IPv6 alone.
        let r = run(&k, Some(&dev()), Family::V4, &KernelState::default()).await;
        assert_eq!((r.added, r.removed), (0, 6));
        assert_eq!(
            k.read_state(None, Family::V4).await.unwrap(),
            KernelState::default()
        );
        assert_eq!(k.read_state(None, Family::V6).await.unwrap(), want6);
        let r = run(&k, Some(&dev6()), Family::V6, &want6).await;
        assert_eq!((r.added, r.removed), (0, 0));
    }
}
