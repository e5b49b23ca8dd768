//! The peer set the lease watch builds. A lease becomes a peer only when it is well
//! formed, passes the controller's own field rules, and collides with nothing the
//! kernel entries are keyed by: another peer's VTEP MAC or subnet, or this node's own.
//! A colliding lease would move an FDB entry (and with it another node's traffic) to
//! whoever sent it, so it is refused and logged; the peer that held the key first
//! keeps it, and a refused lease is admitted once the collision is gone.

use std::collections::{BTreeMap, HashMap};

use ipnet::Ipv4Net;
use tracing::{info, warn};
use twill_common::lease::{Mac, Peer};
use twill_proto::{lease_event::Type as EventType, Lease, WatchResponse};

/// Peers by node name, with the indexes that keep their kernel keys unique.
pub struct PeerTable {
    own: String,
    network: Ipv4Net,
    own_mac: Option<Mac>,
    own_subnet: Option<Ipv4Net>,
    peers: BTreeMap<String, Peer>,
    by_mac: HashMap<Mac, String>,
    by_subnet: HashMap<Ipv4Net, String>,
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
    /// An empty table for node `own` of pod network `network`.
    pub fn new(own: &str, network: Ipv4Net) -> Self {
        PeerTable {
            own: own.to_string(),
            network,
            own_mac: None,
            own_subnet: None,
            peers: BTreeMap::new(),
            by_mac: HashMap::new(),
            by_subnet: HashMap::new(),
            refused: BTreeMap::new(),
        }
    }

    /// This node's VTEP MAC (none with host-gw) and subnet, which no peer may claim.
    pub fn set_own(&mut self, mac: Option<Mac>, subnet: Option<Ipv4Net>) {
        self.own_mac = mac;
        self.own_subnet = subnet;
    }

    /// The admitted peers.
    pub fn peers(&self) -> &BTreeMap<String, Peer> {
        &self.peers
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
            let old = std::mem::take(&mut self.peers);
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
                    old.get(&l.node_name)
                        .is_some_and(|p| Peer::try_from(*l).as_ref() == Ok(p))
                });
            for l in incumbents.into_iter().chain(rest) {
                self.admit(l, resp.revision, old.contains_key(&l.node_name));
            }
            for name in old.keys().filter(|n| !self.peers.contains_key(*n)) {
                info!(peer = %name, revision = resp.revision, "peer left");
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
                if let Some(p) = self.peers.remove(&lease.node_name) {
                    self.unindex(&lease.node_name, &p);
                    info!(peer = %lease.node_name, subnet = %lease.subnet, revision = ev.revision, "peer left");
                    left = true;
                }
                continue;
            }
            let known = self.peers.contains_key(&lease.node_name);
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

    /// Admits `lease` (replacing the same node's entry) or records why not.
    fn admit(&mut self, lease: &Lease, revision: u64, quiet_if_same: bool) {
        let name = &lease.node_name;
        let peer = match Peer::try_from(lease)
            .and_then(|p| p.check(self.network).map(|()| p))
            .map_err(|e| e.to_string())
            .and_then(|p| self.collision(name, &p).map_or(Ok(p), Err))
        {
            Ok(p) => p,
            Err(why) => {
                if let Some(old) = self.peers.remove(name) {
                    self.unindex(name, &old);
                }
                let again = self.refused.get(name).is_some_and(|(_, w)| *w == why);
                if !again {
                    warn!(peer = %name, revision, reason = %why, "refusing to program a peer lease");
                }
                self.refused.insert(name.clone(), (lease.clone(), why));
                return;
            }
        };
        self.refused.remove(name);
        let before = self.peers.insert(name.clone(), peer);
        if let Some(old) = before {
            self.unindex(name, &old);
        }
        if let Some(mac) = peer.vtep_mac {
            self.by_mac.insert(mac, name.clone());
        }
        self.by_subnet.insert(peer.subnet, name.clone());
        if before != Some(peer) && !(quiet_if_same && before.is_none()) {
            info!(peer = %name, subnet = %peer.subnet, public_ip = %peer.public_ip, revision, "peer up");
        }
    }

    /// What `peer` would collide with, if anything.
    fn collision(&self, name: &str, peer: &Peer) -> Option<String> {
        if let Some(mac) = peer.vtep_mac.filter(|m| Some(*m) == self.own_mac) {
            return Some(format!("vtep_mac {mac} is this node's own VTEP MAC"));
        }
        if self
            .own_subnet
            .is_some_and(|s| s.contains(&peer.subnet) || peer.subnet.contains(&s))
        {
            return Some(format!(
                "subnet {} overlaps this node's own subnet",
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

#[cfg(test)]
mod tests {
    use twill_proto::LeaseEvent;

    use super::*;

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
        let mut t = PeerTable::new("me", "10.244.0.0/16".parse().unwrap());
        t.set_own(
            Some("0a:58:00:00:00:ee".parse().unwrap()),
            Some("10.244.99.0/24".parse().unwrap()),
        );
        t
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
            t.peers()["b"].public_ip.to_string(),
            "192.0.2.2",
            "b keeps its MAC"
        );
        assert!(!t.peers().contains_key("mallory"));
        let refused: Vec<_> = t.refused().collect();
        assert!(refused[0].1.contains("VTEP MAC of peer b"), "{refused:?}");
        // A reset lists mallory first (name order does not matter): b keeps it.
        t.apply(&batch(true, &[(PUT, spoof.clone()), (PUT, b.clone())]));
        assert_eq!(t.peers().keys().collect::<Vec<_>>(), vec!["b"]);
        t.apply(&batch(false, &[(DELETE, b)]));
        assert!(
            t.peers().contains_key("mallory"),
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
            assert!(t.peers().is_empty(), "{why}");
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
        assert_eq!(t.peers().keys().collect::<Vec<_>>(), vec!["a"]);
    }

    #[test]
    fn own_lease_deleted_or_missing_from_a_reset_is_reported() {
        let mut t = table();
        let me = lease("me", "10.244.99.0/24", "192.0.2.99", "0a:58:00:00:00:ee");
        assert!(!t.apply(&batch(true, &[(PUT, me.clone())])).lost_own);
        assert!(t.peers().is_empty(), "we are no peer of ours");
        assert!(t.apply(&batch(false, &[(DELETE, me)])).lost_own);
        assert!(t.apply(&batch(true, &[])).lost_own);
    }
}
