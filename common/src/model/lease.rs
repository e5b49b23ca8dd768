//! A lease as both sides carry it inside: per-family parts parsed once from the wire
//! `Lease` (all text) and written back to it only at the edge (store, watch, replies).

use std::net::IpAddr;

use ipnet::IpNet;
use twill_proto as wire;

use super::fields::{parse_public_ip, parse_subnet, LeaseError, Mac, NodeName};
use super::{Family, PerFamily};
use crate::netconf::BackendType;
use crate::networks::NetworkName;

/// One family's part of a lease: what a peer needs to reach the node's pods of that
/// family (a dual-stack lease has two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// The node's pod subnet.
    pub subnet: IpNet,
    /// The node's public (underlay) address, of the subnet's family.
    pub public_ip: IpAddr,
    /// The MAC of the node's VXLAN device of that family; `None` in a host-gw lease,
    /// which has no device.
    pub vtep_mac: Option<Mac>,
}

impl Peer {
    /// The wire lease's part of `family`: `None` when it has no subnet of the family
    /// (an IPv4-only lease has no IPv6 part; an IPv6-only one no IPv4 part).
    pub fn of(l: &wire::Lease, family: Family) -> Result<Option<Peer>, LeaseError> {
        let (subnet, public_ip, mac) = match family {
            Family::V4 => (&l.subnet, &l.public_ip, &l.vtep_mac),
            Family::V6 => (&l.ipv6_subnet, &l.public_ipv6, &l.vtep_mac_v6),
        };
        if subnet.is_empty() {
            return Ok(None);
        }
        Ok(Some(Peer {
            subnet: parse_subnet(family, subnet)?,
            public_ip: parse_public_ip(family, public_ip)?,
            vtep_mac: (!mac.is_empty()).then(|| mac.parse()).transpose()?,
        }))
    }

    /// Both parts of a wire lease.
    pub fn parts(l: &wire::Lease) -> Result<PerFamily<Peer>, LeaseError> {
        Ok(PerFamily::new(
            Peer::of(l, Family::V4)?,
            Peer::of(l, Family::V6)?,
        ))
    }

    /// Checks the part against the rules the controller enforces (a subnet of
    /// `network`, a unicast public address of the same family outside it, a unicast
    /// VTEP MAC when it has one): an agent programs nothing a controller should have
    /// refused.
    pub fn check(&self, network: IpNet) -> Result<(), LeaseError> {
        if !network.contains(&self.subnet) {
            return Err(LeaseError::Invalid(format!(
                "subnet {} is outside the network {network}",
                self.subnet
            )));
        }
        super::check_public_ip(self.public_ip, network)?;
        let field = Family::of_net(network).wire().vtep_mac;
        self.vtep_mac.map_or(Ok(()), |m| m.check_unicast(field))
    }
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The network it belongs to.
    pub network: NetworkName,
    /// The node holding it.
    pub node: NodeName,
    /// Its subnet, address and VTEP MAC of each family it has.
    pub parts: PerFamily<Peer>,
    /// How peers reach its pods.
    pub backend: BackendType,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// When it ends unless renewed (Unix seconds).
    pub expires_at_unix: i64,
    /// The table revision of its last change.
    pub revision: u64,
    /// Its subnet is reserved for the node.
    pub reserved: bool,
    /// Prefix length of the node's underlay subnet (0: not known).
    pub public_prefix_len: u8,
    /// SHA-256 of the key that holds it (empty: nobody yet); never leaves the
    /// controller except to its store.
    pub holder_key: Vec<u8>,
}

impl Lease {
    /// The VTEP MACs of its parts.
    pub fn macs(&self) -> impl Iterator<Item = Mac> + '_ {
        self.parts.values().filter_map(|p| p.vtep_mac)
    }
}

impl TryFrom<&wire::Lease> for Lease {
    type Error = LeaseError;
    fn try_from(l: &wire::Lease) -> Result<Self, LeaseError> {
        let backend = match l.backend_type.as_str() {
            "vxlan" => BackendType::Vxlan,
            "host-gw" => BackendType::HostGw,
            other => {
                return Err(LeaseError::Invalid(format!(
                    "backend_type {other:?} is neither \"vxlan\" nor \"host-gw\""
                )))
            }
        };
        Ok(Lease {
            network: NetworkName::from_wire(&l.network)
                .map_err(|e| LeaseError::Invalid(format!("network: {e}")))?,
            node: NodeName::new(l.node_name.as_str())?,
            parts: Peer::parts(l)?,
            backend,
            vni: l.vni,
            expires_at_unix: l.expires_at_unix,
            revision: l.revision,
            reserved: l.reserved,
            public_prefix_len: u8::try_from(l.public_ip_prefix_len).map_err(|_| {
                LeaseError::Invalid(format!(
                    "public_ip_prefix_len {} is not a prefix length",
                    l.public_ip_prefix_len
                ))
            })?,
            holder_key: l.holder_key.clone(),
        })
    }
}

impl From<&Lease> for wire::Lease {
    fn from(l: &Lease) -> Self {
        let text =
            |f: Family, get: fn(&Peer) -> String| l.parts.get(f).map(get).unwrap_or_default();
        let subnet = |p: &Peer| p.subnet.to_string();
        let ip = |p: &Peer| p.public_ip.to_string();
        let mac = |p: &Peer| p.vtep_mac.map(|m| m.to_string()).unwrap_or_default();
        wire::Lease {
            node_name: l.node.to_string(),
            subnet: text(Family::V4, subnet),
            public_ip: text(Family::V4, ip),
            backend_type: l.backend.as_str().into(),
            vtep_mac: text(Family::V4, mac),
            expires_at_unix: l.expires_at_unix,
            revision: l.revision,
            vni: l.vni,
            reserved: l.reserved,
            ipv6_subnet: text(Family::V6, subnet),
            public_ipv6: text(Family::V6, ip),
            vtep_mac_v6: text(Family::V6, mac),
            public_ip_prefix_len: l.public_prefix_len.into(),
            holder_key: l.holder_key.clone(),
            network: l.network.wire().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> wire::Lease {
        wire::Lease {
            node_name: "b".into(),
            subnet: "10.244.3.0/24".into(),
            public_ip: "192.0.2.7".into(),
            vtep_mac: "aa:bb:cc:dd:ee:ff".into(),
            backend_type: "vxlan".into(),
            ..Default::default()
        }
    }

    #[test]
    fn peer_from_lease() {
        let l = v4();
        let p = Peer::of(&l, Family::V4).unwrap().unwrap();
        assert_eq!(p.subnet.to_string(), "10.244.3.0/24");
        assert_eq!(
            Peer::of(&l, Family::V6).unwrap(),
            None,
            "no IPv6 subnet, no IPv6 peer"
        );
        let dual = wire::Lease {
            ipv6_subnet: "fd00:10:244:3::/64".into(),
            public_ipv6: "2001:db8::7".into(),
            vtep_mac_v6: "aa:bb:cc:dd:ee:01".into(),
            ..l.clone()
        };
        let p6 = Peer::of(&dual, Family::V6).unwrap().unwrap();
        assert_eq!(p6.subnet.to_string(), "fd00:10:244:3::/64");
        assert!(p6.check("fd00:10:244::/56".parse().unwrap()).is_ok());
        assert!(p6.check("10.244.0.0/16".parse().unwrap()).is_err());
        assert_eq!(p.vtep_mac, Some(Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])));
        let host_gw = wire::Lease {
            vtep_mac: String::new(),
            ..l.clone()
        };
        assert_eq!(
            Peer::of(&host_gw, Family::V4).unwrap().unwrap().vtep_mac,
            None
        );
        let host_bits = wire::Lease {
            subnet: "10.244.3.1/24".into(),
            ..l
        };
        assert!(Peer::of(&host_bits, Family::V4).is_err());
    }

    #[test]
    fn a_lease_round_trips_through_the_wire_form() {
        let dual = wire::Lease {
            ipv6_subnet: "fd00:10:244:3::/64".into(),
            public_ipv6: "2001:db8::7".into(),
            vtep_mac_v6: "aa:bb:cc:dd:ee:01".into(),
            expires_at_unix: 99,
            revision: 7,
            vni: 1,
            reserved: true,
            public_ip_prefix_len: 24,
            holder_key: vec![1, 2],
            network: "blue".into(),
            ..v4()
        };
        let l = Lease::try_from(&dual).unwrap();
        assert_eq!(l.macs().count(), 2);
        assert_eq!(wire::Lease::from(&l), dual);
        let bad = wire::Lease {
            backend_type: "udp".into(),
            ..v4()
        };
        assert!(Lease::try_from(&bad)
            .unwrap_err()
            .to_string()
            .contains("udp"));
    }
}
