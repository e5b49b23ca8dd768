//! The agent's kernel side: the planes (the VXLAN devices, or host-gw routes, one per
//! family), the peer set they are programmed from, the node's own subnets on the
//! devices, IP masquerade and the reconcile runs. The lease and connection state
//! machine (`super`) tells it what the controller said; it never calls the controller.

use std::sync::Arc;

use anyhow::Result;
use ipnet::IpNet;
use tracing::{info, warn};
use twill_agent::dataplane::masq;
use twill_agent::dataplane::netlink::Netlink;
use twill_agent::peers::{Applied, PeerTable};
use twill_agent::plane::Plane;
use twill_common::lease::{parse_subnet, parse_subnet6};
use twill_common::NetConf;
use twill_proto::{Lease, WatchResponse};

use crate::http::Stats;

/// The node's fields of an acquisition that come from the kernel.
pub(super) struct Endpoints {
    pub public_ip: String,
    pub vtep_mac: String,
    pub public_ipv6: String,
    pub vtep_mac_v6: String,
    pub public_ip_prefix_len: u32,
}

pub(super) struct Kernel {
    dp: Netlink,
    /// The IPv4 overlay and the IPv6 one, each present when the network has the family.
    v4: Option<Plane>,
    v6: Option<Plane>,
    peers: PeerTable,
    stats: Arc<Stats>,
    /// False until the first watch message: peers are not removed before the
    /// controller has said who they are (an agent restart must not flap routes).
    heard: bool,
}

impl Kernel {
    pub(super) fn new(
        dp: Netlink,
        v4: Option<Plane>,
        v6: Option<Plane>,
        mut peers: PeerTable,
        stats: Arc<Stats>,
    ) -> Self {
        peers.set_own(
            v4.iter().chain(&v6).filter_map(Plane::mac).collect(),
            Vec::new(),
        );
        Kernel {
            dp,
            v4,
            v6,
            peers,
            stats,
            heard: false,
        }
    }

    /// The planes, IPv4 first.
    fn planes(&self) -> impl Iterator<Item = &Plane> {
        self.v4.iter().chain(&self.v6)
    }

    /// Whether the IPv4 and the IPv6 plane exist.
    pub(super) fn families(&self) -> (bool, bool) {
        (self.v4.is_some(), self.v6.is_some())
    }

    /// The public addresses and VTEP MACs to advertise.
    pub(super) fn endpoints(&self) -> Endpoints {
        let text = |v: Option<String>| v.unwrap_or_default();
        let (v4, v6) = (self.v4.as_ref(), self.v6.as_ref());
        // The controller's host-gw report needs the L2 subnet of the advertised address
        // (IPv4, or IPv6 on an IPv6-only network); an address given by hand
        // (--public-ip) has none it can know.
        let public_ip_prefix_len = v4
            .or(v6)
            .filter(|p| p.public_ip == p.topo.underlay.addr.addr())
            .map_or(0, |p| p.topo.underlay.addr.prefix_len().into());
        Endpoints {
            public_ip: text(v4.map(|p| p.public_ip.to_string())),
            vtep_mac: text(v4.and_then(Plane::mac).map(|m| m.to_string())),
            public_ipv6: text(v6.map(|p| p.public_ip.to_string())),
            vtep_mac_v6: text(v6.and_then(Plane::mac).map(|m| m.to_string())),
            public_ip_prefix_len,
        }
    }

    /// Tells the peer table this node's own MACs and subnets, which no peer may claim.
    pub(super) fn set_own(&mut self, lease: Option<&Lease>) {
        let macs = self.planes().filter_map(Plane::mac).collect();
        let subnets = lease
            .map(|l| {
                let v4 = parse_subnet(&l.subnet).ok().map(IpNet::from);
                let v6 = parse_subnet6(&l.ipv6_subnet).ok().map(IpNet::from);
                v4.into_iter().chain(v6).collect()
            })
            .unwrap_or_default();
        self.peers.set_own(macs, subnets);
    }

    /// Gives each device its subnet's network address.
    pub(super) async fn address(&self, lease: &Lease) -> Result<()> {
        if let (Some(plane), Ok(s)) = (&self.v4, parse_subnet(&lease.subnet)) {
            plane.address(&self.dp, s.network().into()).await?;
        }
        if let (Some(plane), Ok(s6)) = (&self.v6, parse_subnet6(&lease.ipv6_subnet)) {
            plane.address(&self.dp, s6.network().into()).await?;
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
        for plane in self.planes() {
            plane.teardown(&self.dp).await;
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
        let v4 = conf
            .network4()
            .zip(lease.and_then(|l| parse_subnet(&l.subnet).ok()));
        let v6 = conf
            .network6()
            .zip(lease.and_then(|l| parse_subnet6(&l.ipv6_subnet).ok()));
        let result = match (on, lease) {
            (true, Some(_)) => masq::apply(v4, v6).await,
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
        let planes = self
            .v4
            .as_mut()
            .map(|p| (p, self.peers.peers()))
            .into_iter()
            .chain(self.v6.as_mut().map(|p| (p, self.peers.peers6())));
        for (plane, peers) in planes {
            match plane.reconcile(&self.dp, peers, full).await {
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
        let unreachable: usize = self.planes().map(Plane::unreachable).sum();
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
        for plane in self.v4.iter_mut().chain(self.v6.as_mut()) {
            match plane.check_device(&self.dp).await {
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
