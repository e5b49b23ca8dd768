//! The agent's kernel side: per joined network, an overlay (its planes: the VXLAN
//! devices, or host-gw routes, one per family; the peer set they are programmed from;
//! the node's own subnets on its devices; its IP masquerade table), and the reconcile
//! runs over all of them. The lease and connection state machine (`super`) tells it
//! what the controller said; it never calls the controller.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{bail, Result};
use ipnet::IpNet;
use tracing::{info, info_span, warn, Instrument};
use twill_agent::dataplane::masq;
use twill_agent::dataplane::{DataPlane, Underlay};
use twill_agent::peers::{Applied, PeerTable};
use twill_agent::plane::Plane;
use twill_common::model::{Lease, Mac, PerFamily};
use twill_common::netconf::BackendType;
use twill_common::networks::NetworkName;
use twill_common::NetConf;
use twill_proto::WatchResponse;

use super::networks;
use crate::http::Stats;

/// The node's fields of an acquisition that come from the kernel: per family, the
/// public address and the VXLAN device's MAC (none with host-gw).
#[derive(Default)]
pub(super) struct Endpoints {
    pub parts: PerFamily<(IpAddr, Option<Mac>)>,
    /// Prefix length of the public address's subnet (0: not known).
    pub public_ip_prefix_len: u32,
}

/// One joined network in the kernel.
struct Overlay {
    /// The overlay of each family the network has.
    planes: PerFamily<Plane>,
    peers: PeerTable,
    /// Its pod network of each family: the routes into them are this overlay's.
    pod_networks: PerFamily<IpNet>,
    /// False until a watch reset covering this network: peers are not removed before
    /// the controller has said who they are (an agent restart must not flap routes).
    heard: bool,
}

pub(super) struct Kernel {
    dp: Box<dyn DataPlane>,
    overlays: BTreeMap<NetworkName, Overlay>,
    stats: Arc<Stats>,
    /// Whether isolation rules are in place (`None`: not known yet, at start).
    isolation: Option<bool>,
}

impl Kernel {
    pub(super) fn new(dp: Box<dyn DataPlane>, stats: Arc<Stats>) -> Self {
        Kernel {
            dp,
            overlays: BTreeMap::new(),
            stats,
            isolation: None,
        }
    }

    /// Creates or reuses `network`'s devices (none with host-gw) with its backend's
    /// settings and `mtu`, over `underlays` (one per family the network has).
    pub(super) async fn join(
        &mut self,
        network: &NetworkName,
        node: &str,
        conf: &NetConf,
        underlays: &PerFamily<(Underlay, IpAddr)>,
        mtu: u32,
    ) -> Result<()> {
        // The controller refuses two networks with one VNI; a controller that did not
        // would have both networks share (and fight over) one device.
        let vni = (conf.backend.kind == BackendType::Vxlan).then_some(conf.backend.vni);
        let taken = self.overlays.iter().find(|(_, o)| {
            vni.is_some()
                && o.planes
                    .values()
                    .any(|p| p.spec.as_ref().map(|s| s.vni) == vni)
        });
        if let Some((other, _)) = taken {
            bail!(
                "network {network} would use device {}, which network {other} uses: each network needs a VXLAN VNI of its own",
                conf.backend.device_name()
            );
        }
        let mut planes = PerFamily::default();
        for (family, (u, ip)) in underlays.iter() {
            let plane = Plane::start(self.dp.as_ref(), &conf.backend, u.clone(), *ip, mtu).await?;
            *planes.slot(family) = Some(plane);
        }
        for plane in planes.values() {
            match plane.mac() {
                Some(mac) => {
                    info!(network = %network, node = %node, device = %plane.name(), vtep_mac = %mac, iface = %plane.topo.underlay.name, public_ip = %plane.public_ip, mtu, "VXLAN device ready")
                }
                None => {
                    info!(network = %network, node = %node, iface = %plane.topo.underlay.name, public_ip = %plane.public_ip, mtu, "host-gw backend: peers are routed via their public addresses")
                }
            }
        }
        let mut peers = PeerTable::new(node, conf.networks());
        peers.set_own(planes.values().filter_map(Plane::mac).collect(), Vec::new());
        let overlay = Overlay {
            planes,
            peers,
            pod_networks: conf.networks(),
            heard: false,
        };
        self.overlays.insert(network.clone(), overlay);
        self.scope();
        self.isolate().await;
        Ok(())
    }

    /// Removes everything `network` put in the kernel (its routes, neighbours, FDB
    /// entries, devices and masquerade table); every failure is reported and the rest
    /// goes on.
    pub(super) async fn leave(&mut self, network: &NetworkName) {
        let Some(overlay) = self.overlays.remove(network) else {
            return;
        };
        self.scope();
        self.isolate().await;
        let dp = self.dp.as_ref();
        async {
            for plane in overlay.planes.values() {
                plane.teardown(dp).await;
            }
        }
        .instrument(info_span!("network", network = %network))
        .await;
        if let Err(e) = masq::remove(network).await {
            warn!(network = %network, error = %e, "cannot remove the network's masquerade rules");
        }
    }

    /// Keeps the joined networks' pods apart: no packet is forwarded from one network's
    /// pods to another's (re-applied with every full reconcile, like the routes). In
    /// one network there is nothing to keep apart: the rules an earlier run (or more
    /// networks) left are removed once, and a node that was never in two networks never
    /// needs nftables for this.
    async fn isolate(&mut self) {
        let networks: Vec<PerFamily<IpNet>> =
            self.overlays.values().map(|o| o.pod_networks).collect();
        let several = networks.len() > 1;
        if !several && self.isolation == Some(false) {
            return;
        }
        match self.dp.isolate(&networks).await {
            Ok(()) => self.isolation = Some(several),
            Err(e) if several || self.isolation == Some(true) => {
                self.stats.netlink_errors.inc();
                warn!(networks = networks.len(), error = %e, "cannot program the isolation between networks; will retry");
            }
            Err(e) => {
                // Nothing of ours to remove is the usual case (and nft may not even be
                // installed on a node in one network).
                tracing::debug!(error = %e, "no isolation rules removed");
                self.isolation = Some(false);
            }
        }
    }

    /// Tells each overlay's planes the other overlays' pod networks, whose routes they
    /// must leave alone.
    fn scope(&mut self) {
        let all: Vec<(NetworkName, IpNet)> = self
            .overlays
            .iter()
            .flat_map(|(n, o)| o.pod_networks.values().map(|net| (n.clone(), *net)))
            .collect();
        for (name, overlay) in &mut self.overlays {
            let others: Vec<IpNet> = all
                .iter()
                .filter(|(n, _)| n != name)
                .map(|(_, net)| *net)
                .collect();
            for (_, plane) in overlay.planes.iter_mut() {
                plane.leave_alone(others.clone());
            }
        }
    }

    /// Which families `network` has a plane of.
    pub(super) fn families(&self, network: &NetworkName) -> PerFamily<()> {
        self.overlays
            .get(network)
            .map(|o| o.planes.families())
            .unwrap_or_default()
    }

    /// The public addresses and VTEP MACs to advertise in `network`.
    pub(super) fn endpoints(&self, network: &NetworkName) -> Endpoints {
        let Some(planes) = self.overlays.get(network).map(|o| &o.planes) else {
            return Endpoints::default();
        };
        // The controller's host-gw report needs the L2 subnet of the advertised address
        // (IPv4, or IPv6 on an IPv6-only network); an address given by hand
        // (--public-ip) has none it can know.
        let public_ip_prefix_len = planes
            .first()
            .filter(|p| p.public_ip == p.topo.underlay.addr.addr())
            .map_or(0, |p| p.topo.underlay.addr.prefix_len().into());
        Endpoints {
            parts: planes.as_ref().map(|_, p| (p.public_ip, p.mac())),
            public_ip_prefix_len,
        }
    }

    /// Tells `network`'s peer table this node's own MACs and subnets there, which no
    /// peer may claim.
    pub(super) fn set_own(&mut self, network: &NetworkName, lease: Option<&Lease>) {
        let Some(overlay) = self.overlays.get_mut(network) else {
            return;
        };
        let macs = overlay.planes.values().filter_map(Plane::mac).collect();
        let subnets = lease
            .map(|l| l.parts.values().map(|p| p.subnet).collect())
            .unwrap_or_default();
        overlay.peers.set_own(macs, subnets);
    }

    /// Gives each of `network`'s devices its subnet's network address.
    pub(super) async fn address(&self, network: &NetworkName, lease: &Lease) -> Result<()> {
        let Some(overlay) = self.overlays.get(network) else {
            return Ok(());
        };
        for (plane, part) in overlay.planes.as_ref().zip(lease.parts).values() {
            plane
                .address(self.dp.as_ref(), part.subnet.network())
                .await?;
        }
        Ok(())
    }

    /// Folds a complete watch message, from a stream carrying the networks of
    /// `covered`, into each network's peer set; what it changed, by network.
    pub(super) fn apply(
        &mut self,
        resp: &WatchResponse,
        covered: &BTreeSet<NetworkName>,
    ) -> BTreeMap<NetworkName, Applied> {
        let mut applied = BTreeMap::new();
        for (network, part) in networks::split(resp, covered) {
            let Some(overlay) = self.overlays.get_mut(&network) else {
                continue;
            };
            let _span = info_span!("network", network = %network).entered();
            applied.insert(network, overlay.peers.apply(&part));
            overlay.heard |= part.reset;
        }
        let refused: usize = self
            .overlays
            .values()
            .map(|o| o.peers.refused().count())
            .sum();
        self.stats.peers_refused.set(refused as i64);
        applied
    }

    /// Removes everything this agent put in the kernel, network by network; reports
    /// every failure and keeps going.
    pub(super) async fn teardown(&mut self) {
        let networks: Vec<NetworkName> = self.overlays.keys().cloned().collect();
        for network in &networks {
            self.leave(network).await;
        }
        info!("exiting; kernel state removed (--teardown-on-exit)");
    }

    /// Makes `network`'s masquerade table what `--ip-masq` (`on`) says: present with
    /// the lease's subnets' rules (re-applied on every tick, like flannel's re-check),
    /// or absent (removed once, when the lease is first applied).
    pub(super) async fn masquerade(
        &self,
        network: &NetworkName,
        conf: &NetConf,
        on: bool,
        lease: Option<&Lease>,
    ) {
        let families = lease.map_or_else(PerFamily::default, |l| {
            conf.networks().zip(l.parts.map(|_, p| p.subnet))
        });
        let result = match (on, lease) {
            (true, Some(_)) => masq::apply(network, families).await,
            (true, None) => return,
            (false, _) => masq::remove(network).await,
        };
        if let Err(e) = result {
            self.stats.netlink_errors.inc();
            warn!(network = %network, error = %e, "cannot program IP masquerade");
        }
    }

    /// Brings the kernel to what the peers call for, network by network and family by
    /// family. After a watch batch the diff is taken against what was last applied;
    /// `full` (the periodic run) reads the kernel to repair what was changed behind
    /// our back, in each network the controller has been heard about.
    pub(super) async fn reconcile(&mut self, full: bool, revision: u64) {
        if full {
            self.isolate().await;
        }
        let (mut added, mut removed, mut errors) = (0, 0, 0);
        for (network, overlay) in &mut self.overlays {
            if full && !overlay.heard {
                continue;
            }
            let peers = &overlay.peers;
            let planes = overlay
                .planes
                .iter_mut()
                .map(|(family, p)| (p, peers.peers(family)));
            for (plane, peers) in planes {
                match plane.reconcile(self.dp.as_ref(), peers, full).await {
                    Ok(report) => {
                        added += report.added;
                        removed += report.removed;
                        errors += report.errors.len();
                        for e in &report.errors {
                            warn!(network = %network, device = %plane.name(), error = %e, "kernel operation failed; will retry");
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        warn!(network = %network, device = %plane.name(), error = %e, "cannot read kernel state; will retry");
                    }
                }
            }
        }
        if full && !self.overlays.values().any(|o| o.heard) {
            return;
        }
        let runs = self.stats.reconciles.inc();
        if runs > 0 {
            self.stats.changes.inc_by((added + removed) as u64);
        }
        let peers: usize = self.overlays.values().map(|o| o.peers.len()).sum();
        self.stats.peers.set(peers as i64);
        self.stats.netlink_errors.inc_by(errors as u64);
        let unreachable: usize = self
            .overlays
            .values()
            .flat_map(|o| o.planes.values())
            .map(Plane::unreachable)
            .sum();
        self.stats.peers_unreachable.set(unreachable as i64);
        if added + removed > 0 {
            info!(peers, added, removed, revision, "kernel state reconciled");
        }
    }

    /// Recreates `network`'s devices that were deleted, and gives them `lease`'s
    /// address again. True when a device came back with a new MAC, which must reach
    /// the peers: the lease is to be renewed at once.
    pub(super) async fn check_devices(
        &mut self,
        network: &NetworkName,
        lease: Option<&Lease>,
    ) -> bool {
        let Some(overlay) = self.overlays.get_mut(network) else {
            return false;
        };
        let (mut recreated, mut mac_changed) = (false, false);
        for (_, plane) in overlay.planes.iter_mut() {
            match plane.check_device(self.dp.as_ref()).await {
                Ok(Some(r)) => {
                    recreated = true;
                    mac_changed |= r.mac_changed;
                }
                Ok(None) => {}
                Err(e) => {
                    self.stats.netlink_errors.inc();
                    warn!(network = %network, device = %plane.name(), error = %e, "cannot check the VXLAN device");
                }
            }
        }
        if recreated {
            self.set_own(network, lease);
            if let Some(l) = lease {
                if let Err(e) = self.address(network, l).await {
                    warn!(network = %network, error = %e, "cannot address the VXLAN device");
                }
            }
        }
        mac_changed
    }
}
