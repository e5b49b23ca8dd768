//! The peer set the lease watch builds. A lease becomes a peer only when it is well
//! formed, passes the controller's own field rules, and collides with nothing the
//! kernel entries are keyed by: another peer's VTEP MAC or subnet, or this node's own.
//! A colliding lease would move an FDB entry (and with it another node's traffic) to
//! whoever sent it, so it is refused and logged; the peer that held the key first
//! keeps it, and a refused lease is admitted once the collision is gone.
//!
//! On a dual-stack network a lease makes two peers, one per family, admitted or
//! refused together; its IPv6 subnet and its IPv6 device's MAC are keys like the
//! IPv4 ones. A lease without IPv6 fields (granted before the network had IPv6) is an
//! IPv4 peer only; on an IPv6-only network every lease is an IPv6 peer only.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use tracing::{info, warn};
use twill_common::model::{Family, Mac, Peer, PerFamily};
use twill_proto::{lease_event::Type as EventType, Lease, WatchResponse};

/// No peers (of a family the network does not have).
static NONE: BTreeMap<String, Peer> = BTreeMap::new();

/// Peers by node name, with the indexes that keep their kernel keys unique.
pub struct PeerTable {
    own: String,
    networks: PerFamily<IpNet>,
    own_macs: Vec<Mac>,
    own_subnets: Vec<IpNet>,
    /// The admitted peers' side of each family the network has.
    peers: PerFamily<BTreeMap<String, Peer>>,
    by_mac: HashMap<Mac, String>,
    by_subnet: HashMap<IpNet, String>,
    /// Leases not admitted, and why: retried whenever a peer leaves.
    refused: BTreeMap<String, (Lease, String)>,
}

/// What one watch message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Our own lease disappeared (revoked or expired): acquire again now.
    pub lost_own: bool,
}

impl PeerTable {
    /// An empty table for node `own` of the pod networks of each family the network
    /// has.
    pub fn new(own: &str, networks: PerFamily<IpNet>) -> Self {
        PeerTable {
            own: own.to_string(),
            networks,
            own_macs: Vec::new(),
            own_subnets: Vec::new(),
            peers: networks.map(|_, _| BTreeMap::new()),
            by_mac: HashMap::new(),
            by_subnet: HashMap::new(),
            refused: BTreeMap::new(),
        }
    }

    /// This node's VTEP MACs (none with host-gw) and subnets, of every family, which
    /// no peer may claim.
    pub fn set_own(&mut self, macs: Vec<Mac>, subnets: Vec<IpNet>) {
        self.own_macs = macs;
        self.own_subnets = subnets;
    }

    /// The admitted peers' side of `family` (none when the network lacks it).
    pub fn peers(&self, family: Family) -> &BTreeMap<String, Peer> {
        self.peers.get(family).unwrap_or(&NONE)
    }

    /// Number of admitted peer nodes (every IPv6 peer is an IPv4 one too unless the
    /// network is IPv6-only).
    pub fn len(&self) -> usize {
        self.peers.values().map(BTreeMap::len).max().unwrap_or(0)
    }

    /// True when no peer is admitted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The admitted peers of node `name`, of every family.
    fn sides(&self, name: &str) -> PerFamily<Peer> {
        sides_in(&self.peers, name)
    }

    /// Leases refused, by node name, with the reason.
    pub fn refused(&self) -> impl Iterator<Item = (&str, &str)> {
        self.refused
            .iter()
            .map(|(n, (_, why))| (n.as_str(), why.as_str()))
    }

    /// Folds a complete watch message (a reset with all its parts, or a batch) in.
    pub fn apply(&mut self, resp: &WatchResponse) -> Applied {
        let mut applied = Applied::default();
        if resp.reset {
            let empty = self.networks.map(|_, _| BTreeMap::new());
            let old = std::mem::replace(&mut self.peers, empty);
            let was = |name: &str| old.values().any(|m| m.contains_key(name));
            self.by_mac.clear();
            self.by_subnet.clear();
            self.refused.clear();
            applied.lost_own = !resp
                .events
                .iter()
                .any(|e| e.lease.as_ref().is_some_and(|l| l.node_name == self.own));
            // Peers that were already programmed keep their keys: a newcomer claiming
            // them is the one refused, in a reset as in a live event.
            let (incumbents, rest): (Vec<&Lease>, Vec<&Lease>) = resp
                .events
                .iter()
                .filter_map(|e| e.lease.as_ref())
                .filter(|l| l.node_name != self.own)
                .partition(|l| {
                    was(&l.node_name) && self.parse(l) == Ok(sides_in(&old, &l.node_name))
                });
            for l in incumbents.into_iter().chain(rest) {
                self.admit(l, resp.revision, was(&l.node_name));
            }
            let names: BTreeSet<&String> = old.values().flat_map(BTreeMap::keys).collect();
            for name in names {
                if self.sides(name).is_empty() {
                    info!(peer = %name, revision = resp.revision, "peer left");
                }
            }
            return applied;
        }
        let mut left = false;
        for ev in &resp.events {
            let Some(lease) = &ev.lease else { continue };
            if lease.node_name == self.own {
                applied.lost_own |= ev.r#type == EventType::Delete as i32;
                continue;
            }
            if ev.r#type == EventType::Delete as i32 {
                self.refused.remove(&lease.node_name);
                if self.drop_peer(&lease.node_name) {
                    info!(peer = %lease.node_name, subnet = %lease.subnet, ipv6_subnet = %lease.ipv6_subnet, revision = ev.revision, "peer left");
                    left = true;
                }
                continue;
            }
            let known = !self.sides(&lease.node_name).is_empty();
            self.admit(lease, ev.revision, known);
        }
        if left && !self.refused.is_empty() {
            let waiting: Vec<Lease> = self.refused.values().map(|(l, _)| l.clone()).collect();
            for l in &waiting {
                self.admit(l, resp.revision, false);
            }
        }
        applied
    }

    /// The lease's sides of each family the network has, checked against the field
    /// rules: one of the network's first family, and an IPv6 one unless the lease was
    /// granted before the network had IPv6.
    fn parse(&self, lease: &Lease) -> Result<PerFamily<Peer>, String> {
        let sides = self
            .networks
            .try_map(|family, network| {
                let p = Peer::of(lease, family).map_err(|e| e.to_string())?;
                if let Some(p) = &p {
                    p.check(network).map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(p)
            })?
            .filter_map(|_, p| p);
        if self.networks.has(Family::V4) && !sides.has(Family::V4) {
            return Err("the lease has no IPv4 subnet, which this network needs".into());
        }
        if sides.is_empty() {
            return Err("the lease has no IPv6 subnet, which an IPv6-only network needs".into());
        }
        if let (Some(p), Some(p6)) = (&sides.v4, &sides.v6) {
            if p6.vtep_mac.is_some() && p6.vtep_mac == p.vtep_mac {
                return Err("vtep_mac_v6 is the lease's IPv4 VTEP MAC too".into());
            }
        }
        Ok(sides)
    }

    /// Admits `lease` (replacing the same node's entries) or records why not.
    fn admit(&mut self, lease: &Lease, revision: u64, quiet_if_same: bool) {
        let name = &lease.node_name;
        let parsed = self.parse(lease).and_then(|sides| {
            let clash = sides.values().find_map(|p| self.collision(name, p));
            clash.map_or(Ok(sides), Err)
        });
        let sides = match parsed {
            Ok(sides) => sides,
            Err(why) => {
                self.drop_peer(name);
                let again = self.refused.get(name).is_some_and(|(_, w)| *w == why);
                if !again {
                    warn!(peer = %name, revision, reason = %why, "refusing to program a peer lease");
                }
                self.refused.insert(name.clone(), (lease.clone(), why));
                return;
            }
        };
        self.refused.remove(name);
        let before = self.sides(name);
        self.drop_peer(name);
        for (family, p) in sides.iter() {
            if let Some(mac) = p.vtep_mac {
                self.by_mac.insert(mac, name.clone());
            }
            self.by_subnet.insert(p.subnet, name.clone());
            if let Some(peers) = self.peers.get_mut(family) {
                peers.insert(name.clone(), *p);
            }
        }
        if before != sides && !(quiet_if_same && before.is_empty()) {
            let text =
                |f: Family, get: fn(&Peer) -> String| sides.get(f).map(get).unwrap_or_default();
            let (subnet, ip) = (
                |p: &Peer| p.subnet.to_string(),
                |p: &Peer| p.public_ip.to_string(),
            );
            info!(
                peer = %name,
                subnet = %text(Family::V4, subnet),
                public_ip = %text(Family::V4, ip),
                ipv6_subnet = %text(Family::V6, subnet),
                public_ipv6 = %text(Family::V6, ip),
                revision,
                "peer up"
            );
        }
    }

    /// Removes `name`'s peers of every family and their index entries; true when it
    /// had any.
    fn drop_peer(&mut self, name: &str) -> bool {
        let old: Vec<Peer> = self
            .peers
            .iter_mut()
            .filter_map(|(_, m)| m.remove(name))
            .collect();
        for p in &old {
            self.unindex(name, p);
        }
        !old.is_empty()
    }

    /// What `peer` would collide with, if anything.
    fn collision(&self, name: &str, peer: &Peer) -> Option<String> {
        if let Some(mac) = peer.vtep_mac.filter(|m| self.own_macs.contains(m)) {
            return Some(format!("vtep_mac {mac} is this node's own VTEP MAC"));
        }
        if let Some(own) = self
            .own_subnets
            .iter()
            .find(|s| s.contains(&peer.subnet) || peer.subnet.contains(*s))
        {
            return Some(format!(
                "subnet {} overlaps this node's own subnet {own}",
                peer.subnet
            ));
        }
        if let Some((mac, other)) = peer
            .vtep_mac
            .and_then(|m| self.by_mac.get(&m).map(|o| (m, o)))
            .filter(|(_, o)| *o != name)
        {
            return Some(format!(
                "vtep_mac {mac} is already the VTEP MAC of peer {other}"
            ));
        }
        if let Some(other) = self.by_subnet.get(&peer.subnet).filter(|o| *o != name) {
            return Some(format!(
                "subnet {} is already the subnet of peer {other}",
                peer.subnet
            ));
        }
        None
    }

    fn unindex(&mut self, name: &str, p: &Peer) {
        if let Some(mac) = p.vtep_mac {
            if self.by_mac.get(&mac).is_some_and(|n| n == name) {
                self.by_mac.remove(&mac);
            }
        }
        if self.by_subnet.get(&p.subnet).is_some_and(|n| n == name) {
            self.by_subnet.remove(&p.subnet);
        }
    }
}

/// Node `name`'s sides in `peers`.
fn sides_in(peers: &PerFamily<BTreeMap<String, Peer>>, name: &str) -> PerFamily<Peer> {
    PerFamily::from_fn(|f| peers.get(f).and_then(|m| m.get(name)).copied())
}

#[cfg(test)]
mod tests {
    use twill_proto::LeaseEvent;

    use super::*;
    use Family::{V4, V6};

    fn nets(v4: Option<&str>, v6: Option<&str>) -> PerFamily<IpNet> {
        PerFamily::new(
            v4.map(|n| n.parse().unwrap()),
            v6.map(|n| n.parse().unwrap()),
        )
    }

    fn lease(node: &str, subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            node_name: node.into(),
            subnet: subnet.into(),
            public_ip: ip.into(),
            vtep_mac: mac.into(),
            ..Default::default()
        }
    }

    fn batch(reset: bool, leases: &[(EventType, Lease)]) -> WatchResponse {
        WatchResponse {
            reset,
            events: leases
                .iter()
                .map(|(t, l)| LeaseEvent {
                    r#type: *t as i32,
                    lease: Some(l.clone()),
                    revision: 1,
                })
                .collect(),
            revision: 1,
            ..Default::default()
        }
    }

    fn table() -> PeerTable {
        let mut t = PeerTable::new("me", nets(Some("10.244.0.0/16"), None));
        t.set_own(
            vec!["0a:58:00:00:00:ee".parse().unwrap()],
            vec!["10.244.99.0/24".parse().unwrap()],
        );
        t
    }

    fn table6() -> PeerTable {
        let mut t = PeerTable::new("me", nets(Some("10.244.0.0/16"), Some("fd00:10:244::/56")));
        t.set_own(
            vec![
                "0a:58:00:00:00:ee".parse().unwrap(),
                "0a:58:00:00:06:ee".parse().unwrap(),
            ],
            vec![
                "10.244.99.0/24".parse().unwrap(),
                "fd00:10:244:99::/64".parse().unwrap(),
            ],
        );
        t
    }

    fn dual(node: &str, n: u8, ip6: &str, mac6: &str) -> Lease {
        Lease {
            ipv6_subnet: format!("fd00:10:244:{n}::/64"),
            public_ipv6: ip6.into(),
            vtep_mac_v6: mac6.into(),
            ..lease(
                node,
                &format!("10.244.{n}.0/24"),
                &format!("192.0.2.{n}"),
                &format!("0a:58:00:00:00:{n:02x}"),
            )
        }
    }

    #[test]
    fn ipv6_only_leases_are_ipv6_peers_and_leave_on_delete_and_reset() {
        let mut t = PeerTable::new("me", nets(None, Some("fd00:10:244::/56")));
        t.set_own(
            vec!["0a:58:00:00:06:ee".parse().unwrap()],
            vec!["fd00:10:244:99::/64".parse().unwrap()],
        );
        let v6only = |node: &str, n: u8| Lease {
            subnet: String::new(),
            public_ip: String::new(),
            vtep_mac: String::new(),
            ..dual(
                node,
                n,
                &format!("2001:db8::{n}"),
                &format!("0a:58:00:00:06:{n:02x}"),
            )
        };
        t.apply(&batch(
            false,
            &[(PUT, v6only("b", 2)), (PUT, v6only("c", 3))],
        ));
        assert!(t.peers(V4).is_empty(), "no IPv4 side");
        assert_eq!(t.peers(V6)["b"].subnet.to_string(), "fd00:10:244:2::/64");
        assert_eq!(t.len(), 2);
        let no_v6 = Lease {
            ipv6_subnet: String::new(),
            ..v6only("n", 4)
        };
        t.apply(&batch(false, &[(PUT, no_v6)]));
        assert!(t
            .refused()
            .any(|(n, w)| n == "n" && w.contains("no IPv6 subnet")));
        t.apply(&batch(false, &[(DELETE, v6only("c", 3))]));
        assert_eq!(t.peers(V6).keys().collect::<Vec<_>>(), vec!["b"]);
        t.apply(&batch(true, &[(PUT, v6only("b", 2))]));
        assert_eq!(t.len(), 1, "a reset keeps the incumbent");
    }

    #[test]
    fn dual_stack_leases_make_two_peers_refused_together() {
        let mut t = table6();
        t.apply(&batch(
            false,
            &[(PUT, dual("b", 2, "2001:db8::2", "0a:58:00:00:06:02"))],
        ));
        assert_eq!(t.peers(V4)["b"].subnet.to_string(), "10.244.2.0/24");
        assert_eq!(t.peers(V6)["b"].subnet.to_string(), "fd00:10:244:2::/64");
        assert_eq!(t.peers(V6)["b"].public_ip.to_string(), "2001:db8::2");

        for (l, why) in [
            (dual("m", 3, "ff02::1", "0a:58:00:00:06:03"), "multicast"),
            (dual("l", 4, "fe80::4", "0a:58:00:00:06:04"), "link-local"),
            (dual("u", 5, "::", "0a:58:00:00:06:05"), "unspecified"),
            (
                dual("x", 6, "2001:db8::6", "0a:58:00:00:06:02"),
                "VTEP MAC of peer b",
            ),
            (
                dual("y", 7, "2001:db8::7", "0a:58:00:00:06:ee"),
                "own VTEP MAC",
            ),
            (
                dual("z", 8, "2001:db8::8", "0a:58:00:00:00:08"),
                "IPv4 VTEP MAC too",
            ),
        ] {
            t.apply(&batch(false, &[(PUT, l.clone())]));
            assert!(
                !t.peers(V4).contains_key(&l.node_name) && !t.peers(V6).contains_key(&l.node_name),
                "{why}: neither family admitted"
            );
            let reasons: Vec<_> = t.refused().map(|(_, w)| w.to_string()).collect();
            assert!(
                reasons.iter().any(|r| r.contains(why)),
                "{why}: {reasons:?}"
            );
        }
        let own6 = Lease {
            ipv6_subnet: "fd00:10:244:99::/64".into(),
            ..dual("o", 9, "2001:db8::9", "0a:58:00:00:06:09")
        };
        t.apply(&batch(false, &[(PUT, own6)]));
        assert!(!t.peers(V4).contains_key("o"), "our own IPv6 subnet");

        // A lease from before the network had IPv6 is an IPv4 peer only.
        t.apply(&batch(
            false,
            &[(
                PUT,
                lease("v4", "10.244.20.0/24", "192.0.2.20", "0a:58:00:00:00:20"),
            )],
        ));
        assert!(t.peers(V4).contains_key("v4") && !t.peers(V6).contains_key("v4"));
        t.apply(&batch(false, &[(DELETE, dual("b", 2, "2001:db8::2", ""))]));
        assert!(t.peers(V6).is_empty() || !t.peers(V6).contains_key("b"));
        assert!(
            t.peers(V4).contains_key("x"),
            "admitted once b's IPv6 MAC is free: {:?}",
            t.refused().collect::<Vec<_>>()
        );
    }

    const PUT: EventType = EventType::Put;
    const DELETE: EventType = EventType::Delete;

    #[test]
    fn a_lease_claiming_another_peers_mac_is_refused_until_that_peer_leaves() {
        let mut t = table();
        let b = lease("b", "10.244.2.0/24", "192.0.2.2", "0a:58:00:00:00:02");
        t.apply(&batch(false, &[(PUT, b.clone())]));
        let spoof = lease(
            "mallory",
            "10.244.3.0/24",
            "192.0.2.66",
            "0a:58:00:00:00:02",
        );
        t.apply(&batch(false, &[(PUT, spoof.clone())]));
        assert_eq!(
            t.peers(V4)["b"].public_ip.to_string(),
            "192.0.2.2",
            "b keeps its MAC"
        );
        assert!(!t.peers(V4).contains_key("mallory"));
        let refused: Vec<_> = t.refused().collect();
        assert!(refused[0].1.contains("VTEP MAC of peer b"), "{refused:?}");
        // A reset lists mallory first (name order does not matter): b keeps it.
        t.apply(&batch(true, &[(PUT, spoof.clone()), (PUT, b.clone())]));
        assert_eq!(t.peers(V4).keys().collect::<Vec<_>>(), vec!["b"]);
        t.apply(&batch(false, &[(DELETE, b)]));
        assert!(
            t.peers(V4).contains_key("mallory"),
            "admitted once the collision is gone"
        );
    }

    #[test]
    fn leases_that_break_the_field_rules_or_claim_our_keys_are_refused() {
        let mut t = table();
        for (l, why) in [
            (
                lease("z", "10.244.4.0/24", "192.0.2.4", "00:00:00:00:00:00"),
                "all-zero",
            ),
            (
                lease("m", "10.244.5.0/24", "192.0.2.5", "01:00:5e:00:00:01"),
                "multicast",
            ),
            (
                lease("l", "10.244.6.0/24", "127.0.0.1", "0a:58:00:00:00:06"),
                "loopback",
            ),
            (
                lease("o", "10.9.0.0/24", "192.0.2.7", "0a:58:00:00:00:07"),
                "outside",
            ),
            (
                lease("s", "10.244.99.0/24", "192.0.2.8", "0a:58:00:00:00:08"),
                "own subnet",
            ),
            (
                lease("e", "10.244.9.0/24", "192.0.2.9", "0a:58:00:00:00:ee"),
                "own VTEP MAC",
            ),
        ] {
            t.apply(&batch(false, &[(PUT, l)]));
            assert!(t.peers(V4).is_empty(), "{why}");
            let reasons: Vec<_> = t.refused().map(|(_, w)| w.to_string()).collect();
            assert!(
                reasons.iter().any(|r| r.contains(why)),
                "{why}: {reasons:?}"
            );
        }
        let a = lease("a", "10.244.1.0/24", "192.0.2.1", "0a:58:00:00:00:01");
        t.apply(&batch(false, &[(PUT, a.clone())]));
        let same_subnet = lease("c", "10.244.1.0/24", "192.0.2.3", "0a:58:00:00:00:03");
        t.apply(&batch(false, &[(PUT, same_subnet)]));
        assert_eq!(t.peers(V4).keys().collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn own_lease_deleted_or_missing_from_a_reset_is_reported() {
        let mut t = table();
        let me = lease("me", "10.244.99.0/24", "192.0.2.99", "0a:58:00:00:00:ee");
        assert!(!t.apply(&batch(true, &[(PUT, me.clone())])).lost_own);
        assert!(t.peers(V4).is_empty(), "we are no peer of ours");
        assert!(t.apply(&batch(false, &[(DELETE, me)])).lost_own);
        assert!(t.apply(&batch(true, &[])).lost_own);
    }
}
