//! The lease's field types and their rules, each written once for both families: MAC
//! addresses, node names, pod subnets and public (underlay) addresses. Errors name
//! the wire field they came from, so an agent's operator can tell which flag or
//! interface to fix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

use super::Family;

/// Longest node name accepted: a DNS name, as Kubernetes node names are.
pub const MAX_NODE_NAME_LEN: usize = 253;

/// Why a lease field was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseError {
    /// A field does not parse or breaks a rule; the message names it.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: String) -> LeaseError {
    LeaseError::Invalid(msg)
}

/// The wire names of one family's lease fields, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireNames {
    /// The pod subnet (`subnet`, `ipv6_subnet`).
    pub subnet: &'static str,
    /// The subnet an agent asks for (`requested_subnet`, `requested_ipv6_subnet`).
    pub requested: &'static str,
    /// The public address (`public_ip`, `public_ipv6`).
    pub public_ip: &'static str,
    /// The VXLAN device's MAC (`vtep_mac`, `vtep_mac_v6`).
    pub vtep_mac: &'static str,
}

impl Family {
    /// This family's wire field names.
    pub fn wire(self) -> WireNames {
        match self {
            Family::V4 => WireNames {
                subnet: "subnet",
                requested: "requested_subnet",
                public_ip: "public_ip",
                vtep_mac: "vtep_mac",
            },
            Family::V6 => WireNames {
                subnet: "ipv6_subnet",
                requested: "requested_ipv6_subnet",
                public_ip: "public_ipv6",
                vtep_mac: "vtep_mac_v6",
            },
        }
    }
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
            invalid(format!(
                "{s:?} is not a MAC address such as 0a:58:0a:f4:01:01"
            ))
        };
        let bytes: Vec<u8> = s
            .split(':')
            .map(|p| u8::from_str_radix(p, 16).ok().filter(|_| p.len() == 2))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        bytes.try_into().map(Mac).map_err(|_| bad())
    }
}

impl Mac {
    /// Checks that this MAC can name one VXLAN device: not all-zero (the kernel's
    /// default FDB destination, which floods unknown traffic to whoever holds it) and
    /// not a group address (multicast or broadcast: the low bit of the first octet).
    /// `field` names it in the error.
    pub fn check_unicast(&self, field: &str) -> Result<(), LeaseError> {
        if self.0 == [0; 6] {
            return Err(invalid(format!(
                "{field} {self} is the all-zero MAC, which a VXLAN device treats as its \
                 default destination; send the MAC of the node's flannel.<VNI> device"
            )));
        }
        if self.0[0] & 1 == 1 {
            return Err(invalid(format!(
                "{field} {self} is a multicast or broadcast MAC; a VTEP MAC must be unicast"
            )));
        }
        Ok(())
    }
}

/// A node's name, checked: non-empty, at most 253 characters, DNS-name characters
/// only (it lands in logs, metrics labels, store keys and certificate names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    /// Checks `name` (see [`validate_node_name`]).
    pub fn new(name: impl Into<String>) -> Result<Self, LeaseError> {
        let name = name.into();
        validate_node_name(&name)?;
        Ok(NodeName(name))
    }
}

checked_name!(NodeName, LeaseError);

/// The rule for node names, for the places that check a name without keeping it
/// (certificate requests, CLI arguments); [`NodeName`] keeps one that passed.
pub fn validate_node_name(name: &str) -> Result<(), LeaseError> {
    if name.is_empty() {
        return Err(invalid("node name is empty".into()));
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(invalid(format!(
            "node name is {} characters long; the limit is {MAX_NODE_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(invalid(format!(
            "node name {name:?} contains {c:?}: use letters, digits, '-', '.' and '_'"
        )));
    }
    Ok(())
}

/// Parses a pod subnet of `family` in CIDR form; host bits must be clear. The error
/// names the family's `subnet` field.
pub fn parse_subnet(family: Family, s: &str) -> Result<IpNet, LeaseError> {
    let field = family.wire().subnet;
    let net: Option<IpNet> = match family {
        Family::V4 => s.parse::<Ipv4Net>().ok().map(IpNet::from),
        Family::V6 => s.parse::<Ipv6Net>().ok().map(IpNet::from),
    };
    let Some(net) = net else {
        let example = match family {
            Family::V4 => "10.244.3.0/24",
            Family::V6 => "fd00:10:244:3::/64",
        };
        return Err(invalid(format!(
            "{field} {s:?} is not an {family} CIDR such as {example}"
        )));
    };
    if net.addr() != net.network() {
        return Err(invalid(format!(
            "{field} {s:?} has host bits set (expected {})",
            net.trunc()
        )));
    }
    Ok(net)
}

/// Parses a public address of `family`; the error names the family's field.
pub fn parse_public_ip(family: Family, s: &str) -> Result<IpAddr, LeaseError> {
    let ip: Option<IpAddr> = match family {
        Family::V4 => s.parse::<Ipv4Addr>().ok().map(IpAddr::from),
        Family::V6 => s.parse::<Ipv6Addr>().ok().map(IpAddr::from),
    };
    ip.ok_or_else(|| {
        invalid(format!(
            "{} {s:?} is not an {family} address",
            family.wire().public_ip
        ))
    })
}

/// Checks that `ip` can be a node's VXLAN endpoint in pod network `network`: a
/// unicast address of the network's family, nor inside the pod network (that would
/// route the overlay through itself). IPv4: not unspecified (0.0.0.0/8), loopback,
/// multicast, reserved or broadcast (240.0.0.0/4). IPv6: global unicast, not
/// link-local (fe80::/10: it names no node beyond one link, and the kernel needs a
/// scope to use it) nor IPv4-mapped.
pub fn check_public_ip(ip: IpAddr, network: IpNet) -> Result<(), LeaseError> {
    let field = Family::of_net(network).wire().public_ip;
    let why = match (ip, network) {
        (IpAddr::V4(ip), IpNet::V4(net)) => why_not_public4(ip, net),
        (IpAddr::V6(ip), IpNet::V6(net)) => why_not_public6(ip, net),
        (ip, _) => {
            return Err(invalid(format!(
                "public address {ip} is not of the family of the pod network {network}"
            )))
        }
    };
    let underlay = match ip {
        IpAddr::V4(_) => "unicast underlay address",
        IpAddr::V6(_) => "unicast IPv6 underlay address",
    };
    match why {
        Some(why) => Err(invalid(format!(
            "{field} {ip} is {why}; it must be the node's {underlay}"
        ))),
        None => Ok(()),
    }
}

fn why_not_public4(ip: Ipv4Addr, network: Ipv4Net) -> Option<&'static str> {
    let o = ip.octets();
    if o[0] == 0 {
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
    }
}

fn why_not_public6(ip: Ipv6Addr, network: Ipv6Net) -> Option<&'static str> {
    if ip.is_unspecified() {
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
    }
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
        let m = |s: &str| s.parse::<Mac>().unwrap().check_unicast("vtep_mac");
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
        let net: IpNet = "10.244.0.0/16".parse().unwrap();
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
            "2001:db8::1",
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("public"), "{bad}: {e}");
        }
    }

    #[test]
    fn public_ipv6_must_be_a_global_unicast_underlay_address() {
        let net: IpNet = "fd00:10:244::/56".parse().unwrap();
        let ok = |s: &str| check_public_ip(s.parse().unwrap(), net);
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
        let n: NodeName = "worker-1".parse().unwrap();
        assert_eq!((n.as_str(), n.len()), ("worker-1", 8));
        assert!("a b".parse::<NodeName>().is_err());
    }

    #[test]
    fn subnets_parse_by_family_and_refuse_host_bits() {
        assert_eq!(
            parse_subnet(Family::V4, "10.244.3.0/24")
                .unwrap()
                .to_string(),
            "10.244.3.0/24"
        );
        let e = parse_subnet(Family::V4, "10.244.3.1/24")
            .unwrap_err()
            .to_string();
        assert!(e.contains("subnet") && e.contains("10.244.3.0/24"), "{e}");
        assert!(parse_subnet(Family::V4, "fd00::/64").is_err());
        let e6 = parse_subnet(Family::V6, "fd00:10:244:3::1/64")
            .unwrap_err()
            .to_string();
        assert!(e6.starts_with("ipv6_subnet"), "{e6}");
        assert!(parse_public_ip(Family::V6, "192.0.2.1")
            .unwrap_err()
            .to_string()
            .contains("public_ipv6"));
    }
}
