//! The agent's kernel side: the planes (the VXLAN devices, or host-gw routes, one per
//! family), the peer set they are programmed from, the node's own subnets on the
//! devices, IP masquerade and the reconcile runs. The lease and connection state
//! machine (`super`) tells it what the controller said; it never calls the controller.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Result;
use tracing::{info, warn};
use twill_agent::dataplane::masq;
use twill_agent::dataplane::DataPlane;
use twill_agent::peers::{Applied, PeerTable};
use twill_agent::plane::Plane;
use twill_common::model::{Lease, Mac, PerFamily};
use twill_common::NetConf;
use twill_proto::WatchResponse;

use crate::http::Stats;

/// The node's fields of an acquisition that come from the kernel: per family, the
/// public address and the VXLAN device's MAC (none with host-gw).
pub(super) struct Endpoints {
    pub parts: PerFamily<(IpAddr, Option<Mac>)>,
    /// Prefix length of the public address's subnet (0: not known).
    pub public_ip_prefix_len: u32,
}

pub(super) struct Kernel {
    dp: Box<dyn DataPlane>,
    /// The overlay of each family the network has.
    planes: PerFamily<Plane>,
    peers: PeerTable,
    stats: Arc<Stats>,
    /// False until the first watch message: peers are not removed before the
    /// controller has said who they are (an agent restart must not flap routes).
    heard: bool,
}

impl Kernel {
    pub(super) fn new(
        dp: Box<dyn DataPlane>,
        planes: PerFamily<Plane>,
        mut peers: PeerTable,
        stats: Arc<Stats>,
    ) -> Self {
        peers.set_own(planes.values().filter_map(Plane::mac).collect(), Vec::new());
        Kernel {
            dp,
            planes,
            peers,
            stats,
            heard: false,
        }
    }

    /// Which families have a plane.
    pub(super) fn families(&self) -> PerFamily<()> {
        self.planes.families()
    }

    /// The public addresses and VTEP MACs to advertise.
    pub(super) fn endpoints(&self) -> Endpoints {
        // The controller's host-gw report needs the L2 subnet of the advertised address
        // (IPv4, or IPv6 on an IPv6-only network); an address given by hand
        // (--public-ip) has none it can know.
        let public_ip_prefix_len = self
            .planes
            .first()
            .filter(|p| p.public_ip == p.topo.underlay.addr.addr())
            .map_or(0, |p| p.topo.underlay.addr.prefix_len().into());
        Endpoints {
            parts: self.planes.as_ref().map(|_, p| (p.public_ip, p.mac())),
            public_ip_prefix_len,
        }
    }

    /// Tells the peer table this node's own MACs and subnets, which no peer may claim.
    pub(super) fn set_own(&mut self, lease: Option<&Lease>) {
        let macs = self.planes.values().filter_map(Plane::mac).collect();
        let subnets = lease
            .map(|l| l.parts.values().map(|p| p.subnet).collect())
            .unwrap_or_default();
        self.peers.set_own(macs, subnets);
    }

    /// Gives each device its subnet's network address.
    pub(super) async fn address(&self, lease: &Lease) -> Result<()> {
        for (plane, part) in self.planes.as_ref().zip(lease.parts).values() {
            plane
                .address(self.dp.as_ref(), part.subnet.network())
                .await?;
        }
        Ok(())
    }

    /// Folds a complete watch message into the peer set.
    pub(super) fn apply(&mut self, resp: &WatchResponse) -> Applied {
        let applied = self.peers.apply(resp);
        self.stats
            .peers_refused
            .set(self.peers.refused().count() as i64);
        self.heard = true;
        applied
    }

    /// Removes everything this agent put in the kernel; reports every failure and
    /// keeps going.
    pub(super) async fn teardown(&self) {
        for plane in self.planes.values() {
            plane.teardown(self.dp.as_ref()).await;
        }
        if let Err(e) = masq::remove().await {
            warn!(error = %e, "teardown");
        }
        info!("exiting; kernel state removed (--teardown-on-exit)");
    }

    /// Makes the masquerade table what `--ip-masq` (`on`) says: present with the
    /// lease's subnets' rules (re-applied on every tick, like flannel's re-check), or
    /// absent (removed once, when the lease is first applied).
    pub(super) async fn masquerade(&self, conf: &NetConf, on: bool, lease: Option<&Lease>) {
        let families = lease.map_or_else(PerFamily::default, |l| {
            conf.networks().zip(l.parts.map(|_, p| p.subnet))
        });
        let result = match (on, lease) {
            (true, Some(_)) => masq::apply(families).await,
            (true, None) => return,
            (false, _) => masq::remove().await,
        };
        if let Err(e) = result {
            self.stats.netlink_errors.inc();
            warn!(error = %e, "cannot program IP masquerade");
        }
    }

    /// Brings the kernel to what the peers call for, family by family. After a watch
    /// batch the diff is taken against what was last applied; `full` (the periodic
    /// run) reads the kernel to repair what was changed behind our back, once the
    /// controller has been heard from.
    pub(super) async fn reconcile(&mut self, full: bool, revision: u64) {
        if full && !self.heard {
            return;
        }
        let (mut added, mut removed, mut errors) = (0, 0, 0);
        let peers = &self.peers;
        let planes = self
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
                        warn!(device = %plane.name(), error = %e, "kernel operation failed; will retry");
                    }
                }
                Err(e) => {
                    errors += 1;
                    warn!(device = %plane.name(), error = %e, "cannot read kernel state; will retry");
                }
            }
        }
        let runs = self.stats.reconciles.inc();
        if runs > 0 {
            self.stats.changes.inc_by((added + removed) as u64);
        }
        self.stats.peers.set(self.peers.len() as i64);
        self.stats.netlink_errors.inc_by(errors as u64);
        let unreachable: usize = self.planes.values().map(Plane::unreachable).sum();
        self.stats.peers_unreachable.set(unreachable as i64);
        if added + removed > 0 {
            info!(
                peers = self.peers.len(),
                added, removed, revision, "kernel state reconciled"
            );
        }
    }

    /// Recreates a device that was deleted, and gives it `lease`'s address again.
    /// True when a device came back with a new MAC, which must reach the peers: the
    /// lease is to be renewed at once.
    pub(super) async fn check_devices(&mut self, lease: Option<&Lease>) -> bool {
        let (mut recreated, mut mac_changed) = (false, false);
        for (_, plane) in self.planes.iter_mut() {
            match plane.check_device(self.dp.as_ref()).await {
                Ok(Some(r)) => {
                    recreated = true;
                    mac_changed |= r.mac_changed;
                }
                Ok(None) => {}
                Err(e) => {
                    self.stats.netlink_errors.inc();
                    warn!(device = %plane.name(), error = %e, "cannot check the VXLAN device");
                }
            }
        }
        if recreated {
            self.set_own(lease);
            if let Some(l) = lease {
                if let Err(e) = self.address(l).await {
                    warn!(error = %e, "cannot address the VXLAN device");
                }
            }
        }
        mac_changed
    }
}
