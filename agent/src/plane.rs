//! One address family's overlay on this node: its VXLAN device (`flannel.<VNI>` or
//! `flannel-v6.<VNI>`; none with host-gw), how its peers are reached, and what the
//! last reconcile left in the kernel. A dual-stack node runs two planes side by side;
//! each reads, diffs and repairs only its own family's entries. A node in several
//! networks runs one set of planes per network; routes (read per family, not per
//! device) into another network's pod network are that network's, and are left alone.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use tracing::{error, info, warn};
use twill_common::model::{Mac, Peer};
use twill_common::netconf::{Backend, BackendType};

use crate::dataplane::{
    DataPlane, DataPlaneError, Device, Family, KernelState, Underlay, VxlanSpec,
};
use crate::reconcile::{self, Report, Topology};

/// Extra bytes VXLAN adds on top of the pod packet: outer IP header, UDP (8), VXLAN
/// (8) and the inner Ethernet header (14).
pub fn vxlan_overhead(family: Family) -> u32 {
    match family {
        Family::V4 => 20 + 8 + 8 + 14,
        Family::V6 => 40 + 8 + 8 + 14,
    }
}

/// One family's overlay.
#[derive(Debug)]
pub struct Plane {
    /// The family.
    pub family: Family,
    /// The VXLAN device's settings; `None` with host-gw.
    pub spec: Option<VxlanSpec>,
    /// The device and the public interface of this family.
    pub topo: Topology,
    /// The address peers send this family's traffic to (`--public-ip`,
    /// `--public-ipv6`, else the interface's).
    pub public_ip: IpAddr,
    /// What the last fully successful run left in the kernel; `None` forces a read.
    applied: Option<KernelState>,
    /// Peers the last run could give no entry, with the reason.
    unreachable: BTreeMap<String, String>,
    /// The pod networks of the node's other networks: routes into them belong to
    /// those networks' planes.
    others: Vec<IpNet>,
}

/// A device recreated behind the agent's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recreated {
    /// Its MAC changed: peers must learn the new one (renew the lease now).
    pub mac_changed: bool,
}

impl Plane {
    /// Creates or reuses the family's device (none with host-gw) on `underlay`, with
    /// `mtu`; peers reach this node at `public_ip`.
    pub async fn start(
        dp: &dyn DataPlane,
        backend: &Backend,
        underlay: Underlay,
        public_ip: IpAddr,
        mtu: u32,
    ) -> Result<Plane, DataPlaneError> {
        let family = Family::of(underlay.addr.addr());
        let spec = match backend.kind {
            BackendType::HostGw => None,
            BackendType::Vxlan => Some(VxlanSpec {
                name: match family {
                    Family::V4 => backend.device_name(),
                    Family::V6 => format!("flannel-v6.{}", backend.vni),
                },
                vni: backend.vni,
                local: underlay.addr.addr(),
                port: backend.port,
                underlay_index: underlay.index,
                mtu,
                learning: backend.learning,
                gbp: backend.gbp,
                tx_checksum_offload: backend.tx_checksum_offload,
            }),
        };
        let device = match &spec {
            Some(spec) => {
                let device = dp.ensure_device(spec).await?;
                // At start as well as on re-creation: a device left by an earlier run
                // may predate the setting.
                offloads(dp, spec).await;
                Some(device)
            }
            None => None,
        };
        Ok(Plane {
            family,
            spec,
            topo: Topology {
                device,
                underlay,
                direct_routing: backend.direct_routing,
            },
            public_ip,
            applied: None,
            unreachable: BTreeMap::new(),
            others: Vec::new(),
        })
    }

    /// The device's name, for logs (`host-gw` without one).
    pub fn name(&self) -> &str {
        self.spec.as_ref().map_or("host-gw", |s| s.name.as_str())
    }

    /// The VTEP MAC peers program for this family; `None` with host-gw.
    pub fn mac(&self) -> Option<Mac> {
        self.topo.device.map(|d| d.mac)
    }

    /// Peers given no entry by the last run.
    pub fn unreachable(&self) -> usize {
        self.unreachable.len()
    }

    /// The pod networks of the node's other networks, whose routes this plane must
    /// neither repair nor remove. The next run reads the kernel again.
    pub fn leave_alone(&mut self, others: Vec<IpNet>) {
        if others != self.others {
            self.others = others;
            self.applied = None;
        }
    }

    /// This plane's entries in the kernel: its device's, and its family's Twill routes
    /// outside the other networks.
    async fn read(&self, dp: &dyn DataPlane) -> Result<KernelState, DataPlaneError> {
        let mut have = dp
            .read_state(self.topo.device.as_ref(), self.family)
            .await?;
        have.routes
            .retain(|dst, _| !self.others.iter().any(|n| n.contains(dst)));
        Ok(have)
    }

    /// Gives the device the node subnet's network address (/32 or /128); nothing to do
    /// with host-gw.
    pub async fn address(&self, dp: &dyn DataPlane, addr: IpAddr) -> Result<(), DataPlaneError> {
        match &self.topo.device {
            Some(dev) => dp.ensure_address(dev, addr).await,
            None => Ok(()),
        }
    }

    /// Brings the kernel to what `peers` call for. `full` reads the kernel to repair
    /// what changed behind our back; otherwise the diff is taken against what was last
    /// applied. Unreachable peers are logged when that changes, each once.
    pub async fn reconcile(
        &mut self,
        dp: &dyn DataPlane,
        peers: &BTreeMap<String, Peer>,
        full: bool,
    ) -> Result<Report, DataPlaneError> {
        let desired = reconcile::desired(peers, &self.topo);
        self.note_unreachable(desired.unreachable, peers);
        let want = desired.state;
        let dev = self.topo.device.as_ref();
        let have = match self.applied.take().filter(|_| !full) {
            Some(have) => have,
            None => self.read(dp).await?,
        };
        let report = reconcile::apply_diff(dp, dev, &have, &want).await;
        if report.errors.is_empty() {
            self.applied = Some(want);
        }
        Ok(report)
    }

    fn note_unreachable(&mut self, now: BTreeMap<String, String>, peers: &BTreeMap<String, Peer>) {
        for (peer, why) in &now {
            if self.unreachable.get(peer) != Some(why) {
                warn!(peer = %peer, device = %self.name(), reason = %why, "peer unreachable: no route programmed");
            }
        }
        for peer in self.unreachable.keys().filter(|p| !now.contains_key(*p)) {
            if peers.contains_key(peer) {
                info!(peer = %peer, device = %self.name(), "peer reachable again");
            }
        }
        self.unreachable = now;
    }

    /// Recreates the device if it was deleted or changed; `Some` when it was, and the
    /// next reconcile reads the kernel again.
    pub async fn check_device(
        &mut self,
        dp: &dyn DataPlane,
    ) -> Result<Option<Recreated>, DataPlaneError> {
        let Some(spec) = &self.spec else {
            return Ok(None);
        };
        let dev: Device = dp.ensure_device(spec).await?;
        if Some(dev) == self.topo.device {
            return Ok(None);
        }
        warn!(device = %spec.name, vtep_mac = %dev.mac, "VXLAN device was recreated");
        offloads(dp, spec).await;
        let mac_changed = Some(dev.mac) != self.mac();
        self.topo.device = Some(dev);
        self.applied = None;
        Ok(Some(Recreated { mac_changed }))
    }

    /// Removes this plane's entries and its device; every failure is logged and the
    /// rest goes on.
    pub async fn teardown(&self, dp: &dyn DataPlane) {
        // Routes through the underlay (DirectRouting, host-gw) outlive the device:
        // remove ours first.
        let dev = self.topo.device.as_ref();
        match self.read(dp).await {
            Ok(have) => {
                let r = reconcile::apply_diff(dp, dev, &have, &KernelState::default()).await;
                r.errors.iter().for_each(|e| warn!(error = %e, "teardown"));
            }
            Err(e) => warn!(error = %e, "teardown: cannot read kernel state"),
        }
        if let Some(spec) = &self.spec {
            if let Err(e) = dp.delete_device(&spec.name).await {
                warn!(error = %e, "teardown");
            }
        }
    }
}

/// Applies the device's offload settings (`TxChecksumOffload: false`); a failure is
/// reported and the device is used anyway: traffic still flows, only where checksums
/// get corrupted does it not.
async fn offloads(dp: &dyn DataPlane, spec: &VxlanSpec) {
    if spec.tx_checksum_offload {
        return;
    }
    match dp.set_tx_checksum_offload(&spec.name, false).await {
        Ok(()) => {
            info!(device = %spec.name, "transmit checksum offload turned off (TxChecksumOffload: false)")
        }
        Err(e) => {
            error!(device = %spec.name, error = %e, "cannot turn transmit checksum offload off as net-conf.json asks (TxChecksumOffload: false)")
        }
    }
}
