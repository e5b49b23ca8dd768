//! Lease helpers shared by the controller and the agent: typed views of the wire
//! `Lease`, MAC address text, and the rules for node names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;
use twill_proto::Lease;

/// Longest node name accepted: a DNS name, as Kubernetes node names are.
pub const MAX_NODE_NAME_LEN: usize = 253;

/// Why a lease field was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseError {
    /// A field does not parse; the message names it.
    #[error("{0}")]
    Invalid(String),
}

/// A 6-byte MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            LeaseError::Invalid(format!(
                "{s:?} is not a MAC address such as 0a:58:0a:f4:01:01"
            ))
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl Mac {
    /// Checks that this MAC can name one VXLAN device: not all-zero (the kernel's
    /// default FDB destination, which floods unknown traffic to whoever holds it) and
    /// not a group address (multicast or broadcast: the low bit of the first octet).
    pub fn check_unicast(&self) -> Result<(), LeaseError> {
        if self.0 == [0; 6] {
            return Err(LeaseError::Invalid(format!(
                "vtep_mac {self} is the all-zero MAC, which a VXLAN device treats as its \
                 default destination; send the MAC of the node's flannel.<VNI> device"
            )));
        }
        if self.0[0] & 1 == 1 {
            return Err(LeaseError::Invalid(format!(
                "vtep_mac {self} is a multicast or broadcast MAC; a VTEP MAC must be unicast"
            )));
        }
        Ok(())
    }
}

/// Checks that `ip` can be a node's VXLAN endpoint: a unicast address that is not
/// unspecified (0.0.0.0/8), loopback, multicast, reserved or broadcast (240.0.0.0/4),
/// nor inside the pod network (that would route the overlay through itself).
pub fn check_public_ip(ip: Ipv4Addr, network: Ipv4Net) -> Result<(), LeaseError> {
    let o = ip.octets();
    let why = if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if o[0] >= 240 {
        Some("a broadcast or reserved address (240.0.0.0/4)")
    } else if network.contains(&ip) {
        Some("inside the pod network")
    } else {
        None
    };
    match why {
        Some(why) => Err(LeaseError::Invalid(format!(
            "public_ip {ip} is {why}; it must be the node's unicast underlay address"
        ))),
        None => Ok(()),
    }
}

/// Checks that `ip` can be a node's IPv6 VXLAN endpoint: a global unicast address,
/// not unspecified, loopback, multicast, link-local (fe80::/10: it names no node
/// beyond one link, and the kernel needs a scope to use it), an IPv4-mapped address,
/// nor inside the IPv6 pod network.
pub fn check_public_ipv6(ip: Ipv6Addr, network: Ipv6Net) -> Result<(), LeaseError> {
    let why = if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if ip.is_loopback() {
        Some("the loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
        Some("a link-local address (fe80::/10)")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("an IPv4-mapped address")
    } else if network.contains(&ip) {
        Some("inside the IPv6 pod network")
    } else {
        None
    };
    match why {
        Some(why) => Err(LeaseError::Invalid(format!(
            "public_ipv6 {ip} is {why}; it must be the node's unicast IPv6 underlay address"
        ))),
        None => Ok(()),
    }
}

/// What a peer needs to know about another node's lease to reach its pods, for one
/// address family (a dual-stack lease makes two peers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// The peer's pod subnet.
    pub subnet: IpNet,
    /// The peer's public (underlay) address, of the subnet's family.
    pub public_ip: IpAddr,
    /// The MAC of the peer's VXLAN device of that family; `None` in a host-gw lease,
    /// which has no device.
    pub vtep_mac: Option<Mac>,
}

impl Peer {
    /// Checks the peer's fields against the rules the controller enforces (a subnet of
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
        match (self.public_ip, network) {
            (IpAddr::V4(ip), IpNet::V4(n)) => check_public_ip(ip, n)?,
            (IpAddr::V6(ip), IpNet::V6(n)) => check_public_ipv6(ip, n)?,
            (ip, _) => {
                return Err(LeaseError::Invalid(format!(
                    "public address {ip} is not of the family of subnet {}",
                    self.subnet
                )))
            }
        }
        self.vtep_mac.map_or(Ok(()), |m| m.check_unicast())
    }

    /// The lease's IPv6 peer; `None` when the lease has no IPv6 subnet.
    pub fn v6(l: &Lease) -> Result<Option<Peer>, LeaseError> {
        if l.ipv6_subnet.is_empty() {
            return Ok(None);
        }
        let public: Ipv6Addr = l.public_ipv6.parse().map_err(|_| {
            LeaseError::Invalid(format!(
                "public_ipv6 {:?} is not an IPv6 address",
                l.public_ipv6
            ))
        })?;
        Ok(Some(Peer {
            subnet: parse_subnet6(&l.ipv6_subnet)?.into(),
            public_ip: public.into(),
            vtep_mac: optional_mac(&l.vtep_mac_v6)?,
        }))
    }
}

fn optional_mac(text: &str) -> Result<Option<Mac>, LeaseError> {
    match text {
        "" => Ok(None),
        m => Ok(Some(m.parse()?)),
    }
}

/// The lease's IPv4 peer.
impl TryFrom<&Lease> for Peer {
    type Error = LeaseError;
    fn try_from(l: &Lease) -> Result<Self, Self::Error> {
        let public: Ipv4Addr = l.public_ip.parse().map_err(|_| {
            LeaseError::Invalid(format!(
                "public_ip {:?} is not an IPv4 address",
                l.public_ip
            ))
        })?;
        Ok(Peer {
            subnet: parse_subnet(&l.subnet)?.into(),
            public_ip: public.into(),
            vtep_mac: optional_mac(&l.vtep_mac)?,
        })
    }
}

/// Parses a subnet in CIDR form; host bits must be clear.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, LeaseError> {
    let net: Ipv4Net = s.parse().map_err(|_| {
        LeaseError::Invalid(format!(
            "subnet {s:?} is not an IPv4 CIDR such as 10.244.3.0/24"
        ))
    })?;
    if net.addr() != net.network() {
        return Err(LeaseError::Invalid(format!(
            "subnet {s:?} has host bits set (expected {})",
            net.trunc()
        )));
    }
    Ok(net)
}

/// Parses an IPv6 subnet in CIDR form; host bits must be clear.
pub fn parse_subnet6(s: &str) -> Result<Ipv6Net, LeaseError> {
    let net: Ipv6Net = s.parse().map_err(|_| {
        LeaseError::Invalid(format!(
            "ipv6_subnet {s:?} is not an IPv6 CIDR such as fd00:10:244:3::/64"
        ))
    })?;
    if net.addr() != net.network() {
        return Err(LeaseError::Invalid(format!(
            "ipv6_subnet {s:?} has host bits set (expected {})",
            net.trunc()
        )));
    }
    Ok(net)
}

/// Checks a node name: non-empty, at most 253 characters, DNS-name characters only
/// (it lands in logs, metrics labels and store keys).
pub fn validate_node_name(name: &str) -> Result<(), LeaseError> {
    if name.is_empty() {
        return Err(LeaseError::Invalid("node name is empty".into()));
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(LeaseError::Invalid(format!(
            "node name is {} characters long; the limit is {MAX_NODE_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(LeaseError::Invalid(format!(
            "node name {name:?} contains {c:?}: use letters, digits, '-', '.' and '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m: Mac = "0a:58:0A:f4:01:ff".parse().unwrap();
        assert_eq!(m.to_string(), "0a:58:0a:f4:01:ff");
        for bad in [
            "",
            "0a:58",
            "0a:58:0a:f4:01:ff:00",
            "0a:58:0a:f4:01:zz",
            "0a:58:0a:f4:1:ff",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vtep_macs_must_be_unicast_and_not_zero() {
        let m = |s: &str| s.parse::<Mac>().unwrap().check_unicast();
        assert!(m("0a:58:0a:f4:01:01").is_ok());
        for bad in [
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
        ] {
            let e = m(bad).unwrap_err().to_string();
            assert!(e.contains("vtep_mac"), "{bad}: {e}");
        }
    }

    #[test]
    fn public_ips_must_be_unicast_underlay_addresses() {
        let net: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let ok = |s: &str| check_public_ip(s.parse().unwrap(), net);
        assert!(ok("192.0.2.7").is_ok());
        assert!(ok("10.0.0.1").is_ok());
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "10.244.3.1",
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("public_ip"), "{bad}: {e}");
        }
    }

    #[test]
    fn public_ipv6_must_be_a_global_unicast_underlay_address() {
        let net: Ipv6Net = "fd00:10:244::/56".parse().unwrap();
        let ok = |s: &str| check_public_ipv6(s.parse().unwrap(), net);
        assert!(ok("2001:db8::7").is_ok());
        assert!(ok("fd00:1::7").is_ok());
        for bad in [
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "::ffff:192.0.2.1",
            "fd00:10:244:3::1",
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("public_ipv6"), "{bad}: {e}");
        }
    }

    #[test]
    fn node_names() {
        assert!(validate_node_name("worker-1.example.com").is_ok());
        assert!(validate_node_name("").is_err());
        assert!(validate_node_name(&"a".repeat(254)).is_err());
        assert!(validate_node_name("a/b").is_err());
    }

    #[test]
    fn peer_from_lease() {
        let l = Lease {
            subnet: "10.244.3.0/24".into(),
            public_ip: "192.0.2.7".into(),
            vtep_mac: "aa:bb:cc:dd:ee:ff".into(),
            ..Default::default()
        };
        let p = Peer::try_from(&l).unwrap();
        assert_eq!(p.subnet.to_string(), "10.244.3.0/24");
        assert_eq!(Peer::v6(&l).unwrap(), None, "no IPv6 subnet, no IPv6 peer");
        let dual = Lease {
            ipv6_subnet: "fd00:10:244:3::/64".into(),
            public_ipv6: "2001:db8::7".into(),
            vtep_mac_v6: "aa:bb:cc:dd:ee:01".into(),
            ..l.clone()
        };
        let p6 = Peer::v6(&dual).unwrap().unwrap();
        assert_eq!(p6.subnet.to_string(), "fd00:10:244:3::/64");
        assert!(p6.check("fd00:10:244::/56".parse().unwrap()).is_ok());
        assert!(p6.check("10.244.0.0/16".parse().unwrap()).is_err());
        assert!(parse_subnet6("fd00:10:244:3::1/64").is_err());
        assert_eq!(p.vtep_mac, Some(Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])));
        let host_gw = Lease {
            vtep_mac: String::new(),
            ..l
        };
        assert_eq!(Peer::try_from(&host_gw).unwrap().vtep_mac, None);
        assert!(parse_subnet("10.244.3.1/24").is_err());
    }
}
