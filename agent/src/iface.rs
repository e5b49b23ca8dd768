//! Choosing the node's public interface and address, like flanneld:
//! `--iface` (names or addresses, first match wins), `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`, else the interface that holds the default route.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::dataplane::{Family, Underlay};

/// How the operator asked for the public interface.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `--iface`: interface names or addresses (either family), in order of
    /// preference.
    pub ifaces: Vec<String>,
    /// `--iface-regex`: matched against interface names and addresses.
    pub iface_regex: Option<regex::Regex>,
    /// `--iface-can-reach`: the address, and the index of the interface the kernel
    /// routes it through; both families use that interface.
    pub can_reach: Option<(IpAddr, u32)>,
    /// `--public-ip`: the IPv4 address advertised to peers.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`: the IPv6 address advertised to peers (dual-stack).
    pub public_ipv6: Option<Ipv6Addr>,
}

/// No interface matched the selection.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SelectError(String);

/// Picks the underlay interface and the address of `family` advertised to peers, by
/// the same rules for both families (flannel applied --iface-regex and
/// --iface-can-reach to IPv4 only: flannel issue #2081). `default` is the interface of
/// the family's default route, if there is one.
pub fn select_family(
    sel: &Selection,
    family: Family,
    interfaces: &[Underlay],
    default: Option<&Underlay>,
) -> Result<(Underlay, IpAddr), SelectError> {
    let of_family = |u: &Underlay| Family::of(u.addr.addr()) == family;
    // An IPv6 address the operator gives by hand is a candidate on the IPv6 side only.
    let public: Option<IpAddr> = match family {
        Family::V4 => sel.public_ip.map(IpAddr::from),
        Family::V6 => sel.public_ipv6.map(IpAddr::from),
    };
    let candidates: Vec<&Underlay> = interfaces.iter().filter(|u| of_family(u)).collect();
    let names = || {
        candidates
            .iter()
            .map(|i| format!("{} ({})", i.name, i.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let what = format!("an {family} address");
    let chosen: &Underlay = if !sel.ifaces.is_empty() {
        sel.ifaces
            .iter()
            .find_map(|want| match want.parse::<IpAddr>() {
                Ok(ip) => candidates.iter().find(|i| i.addr.addr() == ip),
                Err(_) => candidates.iter().find(|i| i.name == *want),
            })
            .copied()
            .ok_or_else(|| {
                SelectError(format!(
                    "none of --iface {} is an interface with {what}; this host has: {}",
                    sel.ifaces.join(","),
                    names()
                ))
            })?
    } else if let Some(re) = &sel.iface_regex {
        candidates
            .iter()
            .find(|i| re.is_match(&i.name) || re.is_match(&i.addr.addr().to_string()))
            .copied()
            .ok_or_else(|| {
                SelectError(format!(
                    "--iface-regex {} matches no interface with {what}; this host has: {}",
                    re.as_str(),
                    names()
                ))
            })?
    } else if let Some((addr, index)) = sel.can_reach {
        candidates
            .iter()
            .find(|i| i.index == index)
            .copied()
            .ok_or_else(|| {
                SelectError(format!(
                    "--iface-can-reach {addr}: the route to it leaves through an interface without {what}"
                ))
            })?
    } else if let Some(held) = public.and_then(|ip| candidates.iter().find(|i| i.addr.addr() == ip))
    {
        held
    } else {
        default.filter(|u| of_family(u)).ok_or_else(|| {
            let flag = match family {
                Family::V4 => "--public-ip",
                Family::V6 => "--public-ipv6",
            };
            SelectError(format!(
                "no {family} default route to pick the public interface from: pass --iface or {flag}; this host has: {}",
                names()
            ))
        })?
    };
    Ok((chosen.clone(), public.unwrap_or(chosen.addr.addr())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 pick.
    fn select(
        sel: &Selection,
        interfaces: &[Underlay],
        default: Option<&Underlay>,
    ) -> Result<(Underlay, Ipv4Addr), SelectError> {
        let (u, ip) = select_family(sel, Family::V4, interfaces, default)?;
        match ip {
            IpAddr::V4(ip) => Ok((u, ip)),
            IpAddr::V6(_) => unreachable!("only IPv4 entries are candidates"),
        }
    }

    /// The IPv6 pick of a dual-stack node.
    fn select6(
        sel: &Selection,
        interfaces: &[Underlay],
        default: Option<&Underlay>,
    ) -> Result<(Underlay, Ipv6Addr), SelectError> {
        let (u, ip) = select_family(sel, Family::V6, interfaces, default)?;
        match ip {
            IpAddr::V6(ip) => Ok((u, ip)),
            IpAddr::V4(_) => unreachable!("only IPv6 entries are candidates"),
        }
    }

    fn ifaces() -> Vec<Underlay> {
        vec![
            Underlay {
                index: 1,
                name: "lo".into(),
                addr: "127.0.0.1/8".parse().unwrap(),
                mtu: 65536,
            },
            Underlay {
                index: 2,
                name: "eth0".into(),
                addr: "192.0.2.5/24".parse().unwrap(),
                mtu: 1500,
            },
            Underlay {
                index: 3,
                name: "ens4".into(),
                addr: "2001:db8:4::9/64".parse().unwrap(),
                mtu: 9000,
            },
            Underlay {
                index: 3,
                name: "ens4".into(),
                addr: "198.51.100.9/24".parse().unwrap(),
                mtu: 9000,
            },
            Underlay {
                index: 4,
                name: "ens5".into(),
                addr: "2001:db8:5::9/64".parse().unwrap(),
                mtu: 9000,
            },
        ]
    }

    #[test]
    fn default_route_interface_by_default() {
        let all = ifaces();
        let (u, ip) = select(&Selection::default(), &all, Some(&all[1])).unwrap();
        assert_eq!(
            (u.name.as_str(), ip.to_string()),
            ("eth0", "192.0.2.5".into())
        );
        let e = select(&Selection::default(), &all, None).unwrap_err();
        assert!(e.0.contains("pass --iface or --public-ip"), "{e}");
    }

    #[test]
    fn iface_names_and_addresses_first_match_wins() {
        let all = ifaces();
        let sel = Selection {
            ifaces: vec!["wlan0".into(), "198.51.100.9".into(), "eth0".into()],
            ..Default::default()
        };
        assert_eq!(select(&sel, &all, None).unwrap().0.name, "ens4");
        let sel = Selection {
            ifaces: vec!["wlan0".into()],
            ..Default::default()
        };
        let e = select(&sel, &all, Some(&all[1])).unwrap_err();
        assert!(
            e.0.contains("none of --iface wlan0") && e.0.contains("eth0 (192.0.2.5/24)"),
            "{e}"
        );
    }

    #[test]
    fn ipv6_entries_are_no_candidates() {
        let all = ifaces();
        let sel = Selection {
            ifaces: vec!["ens5".into()],
            ..Default::default()
        };
        let e = select(&sel, &all, Some(&all[1])).unwrap_err();
        assert!(
            e.0.contains("none of --iface ens5") && !e.0.contains("2001:db8"),
            "{e}"
        );
        let sel = Selection {
            ifaces: vec!["ens4".into()],
            ..Default::default()
        };
        let (u, ip) = select(&sel, &all, None).unwrap();
        assert_eq!(
            (u.addr.to_string(), ip.to_string()),
            ("198.51.100.9/24".into(), "198.51.100.9".into()),
            "ens4's IPv4 address, though its IPv6 one is listed first"
        );
        let e = select(&Selection::default(), &all, Some(&all[4])).unwrap_err();
        assert!(e.0.contains("no IPv4 default route"), "{e}");
    }

    #[test]
    fn ipv6_selection_follows_the_same_flags() {
        let all = ifaces();
        // The IPv6 default route's interface by default.
        let (u, ip) = select6(&Selection::default(), &all, Some(&all[4])).unwrap();
        assert_eq!(
            (u.name.as_str(), ip.to_string()),
            ("ens5", "2001:db8:5::9".into())
        );
        let e = select6(&Selection::default(), &all, Some(&all[1])).unwrap_err();
        assert!(
            e.0.contains("no IPv6 default route") && e.0.contains("--public-ipv6"),
            "{e}"
        );
        // --iface: names, and addresses of either family (each family takes its own).
        let sel = Selection {
            ifaces: vec!["eth0".into(), "2001:db8:4::9".into(), "ens5".into()],
            ..Default::default()
        };
        assert_eq!(select6(&sel, &all, None).unwrap().0.name, "ens4");
        assert_eq!(select(&sel, &all, None).unwrap().0.name, "eth0");
        // --iface-regex and --iface-can-reach apply to IPv6 too (flannel #2081).
        let sel = Selection {
            iface_regex: Some(regex::Regex::new("^ens").unwrap()),
            public_ipv6: Some("2001:db8:99::1".parse().unwrap()),
            ..Default::default()
        };
        let (u, ip) = select6(&sel, &all, None).unwrap();
        assert_eq!(
            (u.name.as_str(), ip.to_string()),
            ("ens4", "2001:db8:99::1".into())
        );
        let sel = Selection {
            can_reach: Some(("2001:db8:5::1".parse().unwrap(), 4)),
            ..Default::default()
        };
        assert_eq!(select6(&sel, &all, None).unwrap().0.name, "ens5");
        let sel = Selection {
            can_reach: Some(("192.0.2.77".parse().unwrap(), 2)),
            ..Default::default()
        };
        let e = select6(&sel, &all, None).unwrap_err();
        assert!(e.0.contains("without an IPv6 address"), "{e}");
    }

    #[test]
    fn regex_and_public_ip() {
        let all = ifaces();
        let sel = Selection {
            iface_regex: Some(regex::Regex::new("^ens").unwrap()),
            public_ip: Some("203.0.113.1".parse().unwrap()),
            ..Default::default()
        };
        let (u, ip) = select(&sel, &all, None).unwrap();
        assert_eq!(
            (u.name.as_str(), ip.to_string()),
            ("ens4", "203.0.113.1".into())
        );
        let sel = Selection {
            public_ip: Some("198.51.100.9".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            select(&sel, &all, Some(&all[1])).unwrap().0.name,
            "ens4",
            "the interface holding --public-ip"
        );
        let sel = Selection {
            can_reach: Some(("203.0.113.50".parse().unwrap(), 3)),
            ..Default::default()
        };
        assert_eq!(
            select(&sel, &all, Some(&all[1])).unwrap().0.name,
            "ens4",
            "--iface-can-reach"
        );
    }
}
