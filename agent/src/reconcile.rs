//! Reconcile, not replay: compute the overlay entries the known leases call for,
//! read what the kernel has, and apply only the difference.
//!
//! Removals run before additions (route, FDB, neighbour; then neighbour, FDB, route,
//! the order REFERENCE.md 1.4 gives), and an error on one entry does not stop the
//! others: every error is collected and reported, and the next run retries.

use std::collections::BTreeMap;

use twill_common::lease::Peer;

use crate::dataplane::{DataPlane, DataPlaneError, Device, KernelState, Route, Underlay};

/// How peers are reached.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The VXLAN device.
    pub device: Device,
    /// This node's public interface.
    pub underlay: Underlay,
    /// `Backend.DirectRouting`: plain routes to peers on the underlay's L2 subnet.
    pub direct_routing: bool,
}

/// The entries the peers call for.
pub fn desired(peers: &BTreeMap<String, Peer>, topo: &Topology) -> KernelState {
    let mut want = KernelState::default();
    for peer in peers.values() {
        let gateway = peer.subnet.network();
        if topo.direct_routing && topo.underlay.addr.contains(&peer.public_ip) {
            want.routes.insert(
                peer.subnet,
                Route {
                    dst: peer.subnet,
                    gateway: peer.public_ip,
                    oif: topo.underlay.index,
                },
            );
            continue;
        }
        want.neighbours.insert(gateway, peer.vtep_mac);
        want.fdb.insert(peer.vtep_mac, peer.public_ip);
        want.routes.insert(
            peer.subnet,
            Route {
                dst: peer.subnet,
                gateway,
                oif: topo.device.index,
            },
        );
    }
    want
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

/// Brings the kernel to `want`: reads the current state and applies the difference.
pub async fn reconcile(
    dp: &dyn DataPlane,
    dev: &Device,
    want: &KernelState,
) -> Result<Report, DataPlaneError> {
    let have = dp.read_state(dev).await?;
    Ok(apply_diff(dp, dev, &have, want).await)
}

/// Applies the difference between `have` (what the kernel is believed to hold) and
/// `want`. Cheaper than `reconcile` when `have` is known (the last applied state): a
/// dump of thousands of entries is skipped, and the periodic `reconcile` catches
/// anything changed behind our back.
pub async fn apply_diff(
    dp: &dyn DataPlane,
    dev: &Device,
    have: &KernelState,
    want: &KernelState,
) -> Report {
    let mut report = Report::default();

    let stale_routes: Vec<&Route> = have
        .routes
        .iter()
        .filter(|(dst, _)| !want.routes.contains_key(*dst))
        .map(|(_, r)| r)
        .collect();
    for r in stale_routes {
        report.record(
            dp.del_route(r).await,
            false,
            format_args!("route {} via {}", r.dst, r.gateway),
        );
    }
    for (mac, dst) in &have.fdb {
        if !want.fdb.contains_key(mac) {
            report.record(
                dp.del_fdb(dev, *mac, *dst).await,
                false,
                format_args!("fdb {mac} dst {dst}"),
            );
        }
    }
    for ip in have.neighbours.keys() {
        if !want.neighbours.contains_key(ip) {
            report.record(
                dp.del_neighbour(dev, *ip).await,
                false,
                format_args!("neighbour {ip}"),
            );
        }
    }

    for (ip, mac) in &want.neighbours {
        if have.neighbours.get(ip) != Some(mac) {
            report.record(
                dp.add_neighbour(dev, *ip, *mac).await,
                true,
                format_args!(
                    "neighbour {ip} lladdr {mac} (had {:?})",
                    have.neighbours.get(ip)
                ),
            );
        }
    }
    for (mac, dst) in &want.fdb {
        if have.fdb.get(mac) != Some(dst) {
            report.record(
                dp.add_fdb(dev, *mac, *dst).await,
                true,
                format_args!("fdb {mac} dst {dst} (had {:?})", have.fdb.get(mac)),
            );
        }
    }
    for (dst, route) in &want.routes {
        if have.routes.get(dst) != Some(route) {
            report.record(
                dp.add_route(route).await,
                true,
                format_args!(
                    "route {dst} via {} (had {:?})",
                    route.gateway,
                    have.routes.get(dst)
                ),
            );
        }
    }
    report
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Mutex;

    use twill_common::lease::Mac;

    use super::*;
    use crate::dataplane::VxlanSpec;

    /// An in-memory kernel: what the reconciler's logic is tested against.
    #[derive(Default)]
    pub struct FakeKernel {
        pub state: Mutex<KernelState>,
        pub ops: Mutex<Vec<String>>,
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
        async fn ensure_address(
            &self,
            _dev: &Device,
            _addr: Ipv4Addr,
        ) -> Result<(), DataPlaneError> {
            Ok(())
        }
        async fn read_state(&self, _dev: &Device) -> Result<KernelState, DataPlaneError> {
            Ok(self.state.lock().unwrap().clone())
        }
        async fn add_neighbour(
            &self,
            _dev: &Device,
            ip: Ipv4Addr,
            mac: Mac,
        ) -> Result<(), DataPlaneError> {
            self.log(format!("neigh replace {ip}"));
            self.state.lock().unwrap().neighbours.insert(ip, mac);
            Ok(())
        }
        async fn del_neighbour(&self, _dev: &Device, ip: Ipv4Addr) -> Result<(), DataPlaneError> {
            self.log(format!("neigh del {ip}"));
            self.state.lock().unwrap().neighbours.remove(&ip);
            Ok(())
        }
        async fn add_fdb(
            &self,
            _dev: &Device,
            mac: Mac,
            dst: Ipv4Addr,
        ) -> Result<(), DataPlaneError> {
            self.log(format!("fdb replace {mac}"));
            self.state.lock().unwrap().fdb.insert(mac, dst);
            Ok(())
        }
        async fn del_fdb(
            &self,
            _dev: &Device,
            mac: Mac,
            _dst: Ipv4Addr,
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
    }

    pub fn dev() -> Device {
        Device {
            index: 7,
            mac: Mac([0x0a, 0, 0, 0, 0, 1]),
        }
    }

    fn topo(direct: bool) -> Topology {
        Topology {
            device: dev(),
            underlay: Underlay {
                index: 2,
                name: "eth0".into(),
                addr: "192.0.2.1/24".parse().unwrap(),
                mtu: 1500,
            },
            direct_routing: direct,
        }
    }

    fn peer(n: u8, public: &str) -> (String, Peer) {
        (
            format!("node-{n}"),
            Peer {
                subnet: format!("10.244.{n}.0/24").parse().unwrap(),
                public_ip: public.parse().unwrap(),
                vtep_mac: Mac([0x0a, 0, 0, 0, 1, n]),
            },
        )
    }

    #[tokio::test]
    async fn programs_then_changes_only_the_difference() {
        let k = FakeKernel::default();
        let mut peers: BTreeMap<_, _> = [peer(1, "192.0.2.11"), peer(2, "198.51.100.12")].into();
        let r = reconcile(&k, &dev(), &desired(&peers, &topo(false)))
            .await
            .unwrap();
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

        let r = reconcile(&k, &dev(), &desired(&peers, &topo(false)))
            .await
            .unwrap();
        assert_eq!((r.added, r.removed), (0, 0), "converged: nothing to do");

        peers.remove("node-1");
        let r = reconcile(&k, &dev(), &desired(&peers, &topo(false)))
            .await
            .unwrap();
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
        let want = desired(&peers, &topo(false));
        reconcile(&k, &dev(), &want).await.unwrap();
        k.state.lock().unwrap().routes.clear();
        let r = reconcile(&k, &dev(), &want).await.unwrap();
        assert_eq!((r.added, r.removed), (1, 0));
        assert_eq!(*k.state.lock().unwrap(), want);
    }

    #[test]
    fn direct_routing_only_for_peers_on_the_same_l2_subnet() {
        let peers: BTreeMap<_, _> = [peer(1, "192.0.2.11"), peer(2, "198.51.100.12")].into();
        let want = desired(&peers, &topo(true));
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
}
