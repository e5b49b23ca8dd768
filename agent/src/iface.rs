//! Choosing the node's public interface and address, like flanneld:
//! `--iface` (names or addresses, first match wins), `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`, else the interface that holds the default route.

use std::net::Ipv4Addr;

use thiserror::Error;

use crate::dataplane::Underlay;

/// How the operator asked for the public interface.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `--iface`: interface names or IPv4 addresses, in order of preference.
    pub ifaces: Vec<String>,
    /// `--iface-regex`: matched against interface names and addresses.
    pub iface_regex: Option<regex::Regex>,
    /// `--iface-can-reach`: the index of the interface the kernel routes that address through.
    pub can_reach: Option<(std::net::Ipv4Addr, u32)>,
    /// `--public-ip`: the address advertised to peers.
    pub public_ip: Option<Ipv4Addr>,
}

/// No interface matched the selection.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SelectError(String);

/// Picks the underlay interface and the public IP advertised to peers.
/// `default` is the interface of the default route, if there is one.
pub fn select(
    sel: &Selection,
    interfaces: &[Underlay],
    default: Option<&Underlay>,
) -> Result<(Underlay, Ipv4Addr), SelectError> {
    let names = || {
        interfaces
            .iter()
            .map(|i| format!("{} ({})", i.name, i.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = if !sel.ifaces.is_empty() {
        sel.ifaces
            .iter()
            .find_map(|want| match want.parse::<Ipv4Addr>() {
                Ok(ip) => interfaces.iter().find(|i| i.addr.addr() == ip),
                Err(_) => interfaces.iter().find(|i| i.name == *want),
            })
            .ok_or_else(|| {
                SelectError(format!(
                    "none of --iface {} is an interface with an IPv4 address; this host has: {}",
                    sel.ifaces.join(","),
                    names()
                ))
            })?
    } else if let Some(re) = &sel.iface_regex {
        interfaces
            .iter()
            .find(|i| re.is_match(&i.name) || re.is_match(&i.addr.addr().to_string()))
            .ok_or_else(|| {
                SelectError(format!(
                    "--iface-regex {} matches no interface with an IPv4 address; this host has: {}",
                    re.as_str(),
                    names()
                ))
            })?
    } else if let Some((addr, index)) = sel.can_reach {
        interfaces.iter().find(|i| i.index == index).ok_or_else(|| {
            SelectError(format!(
                "--iface-can-reach {addr}: the route to it leaves through an interface without an IPv4 address"
            ))
        })?
    } else if let Some(ip) = sel
        .public_ip
        .filter(|ip| interfaces.iter().any(|i| i.addr.addr() == *ip))
    {
        interfaces
            .iter()
            .find(|i| i.addr.addr() == ip)
            .expect("checked above")
    } else {
        default.ok_or_else(|| {
            SelectError(format!(
                "no IPv4 default route to pick the public interface from: pass --iface or --public-ip; this host has: {}",
                names()
            ))
        })?
    };
    let public = sel.public_ip.unwrap_or(chosen.addr.addr());
    Ok((chosen.clone(), public))
}

#[cfg(test)]
mod tests {
    use super::*;

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
                addr: "198.51.100.9/24".parse().unwrap(),
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
