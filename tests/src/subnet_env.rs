//! Reading flannel's `subnet.env` as the agent writes it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{bail, Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};

/// A parsed `subnet.env`:
///
/// ```text
/// FLANNEL_NETWORK=10.244.0.0/16
/// FLANNEL_SUBNET=10.244.74.1/24
/// FLANNEL_MTU=1450
/// FLANNEL_IPMASQ=false
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the pod network.
    pub network: Ipv4Net,
    /// `FLANNEL_SUBNET` as written: the node subnet with its first usable address
    /// (`10.244.74.1/24`).
    pub subnet: Ipv4Net,
    /// `FLANNEL_IPV6_NETWORK` and `FLANNEL_IPV6_SUBNET` (the latter with its first
    /// usable address, `fd00:10:244:3::1/64`), on a dual-stack network.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: bool,
    /// Every `KEY=value` line, in file order of keys sorted by name.
    pub vars: BTreeMap<String, String>,
    /// The keys in the order they appear in the file.
    pub order: Vec<String>,
}

impl SubnetEnv {
    /// Parses the text of a `subnet.env`.
    pub fn parse(text: &str) -> Result<SubnetEnv> {
        let mut vars = BTreeMap::new();
        let mut order = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("line {}: `{line}` is not KEY=value", i + 1))?;
            order.push(k.to_string());
            vars.insert(k.to_string(), v.to_string());
        }
        let get = |k: &str| {
            vars.get(k)
                .map(String::as_str)
                .with_context(|| format!("{k} missing"))
        };
        let network: Ipv4Net = get("FLANNEL_NETWORK")?
            .parse()
            .context("FLANNEL_NETWORK is not an IPv4 CIDR")?;
        let subnet: Ipv4Net = get("FLANNEL_SUBNET")?
            .parse()
            .context("FLANNEL_SUBNET is not an IPv4 CIDR")?;
        let ipv6 = match (
            vars.get("FLANNEL_IPV6_NETWORK"),
            vars.get("FLANNEL_IPV6_SUBNET"),
        ) {
            (None, None) => None,
            (Some(n), Some(s)) => Some((
                n.parse()
                    .context("FLANNEL_IPV6_NETWORK is not an IPv6 CIDR")?,
                s.parse()
                    .context("FLANNEL_IPV6_SUBNET is not an IPv6 CIDR")?,
            )),
            _ => bail!("FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET come together"),
        };
        let mtu = get("FLANNEL_MTU")?
            .parse()
            .context("FLANNEL_MTU is not a number")?;
        let ipmasq = match get("FLANNEL_IPMASQ")? {
            "true" => true,
            "false" => false,
            other => bail!("FLANNEL_IPMASQ is {other:?}, not true or false"),
        };
        Ok(SubnetEnv {
            network,
            subnet,
            ipv6,
            mtu,
            ipmasq,
            vars,
            order,
        })
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<SubnetEnv> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        SubnetEnv::parse(&text).with_context(|| format!("bad subnet.env {}", path.display()))
    }

    /// The node subnet as a network (`10.244.74.0/24`).
    pub fn subnet_net(&self) -> Ipv4Net {
        self.subnet.trunc()
    }

    /// The node's address on `flannel.<VNI>`: the subnet's network address (`10.244.74.0`).
    pub fn flannel_addr(&self) -> Ipv4Addr {
        self.subnet.network()
    }

    /// The gateway address of the node's pod bridge: the first usable address
    /// (`10.244.74.1`), as `FLANNEL_SUBNET` writes it.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// The node's IPv6 subnet as a network (`fd00:10:244:3::/64`).
    pub fn subnet6_net(&self) -> Option<Ipv6Net> {
        self.ipv6.map(|(_, s)| s.trunc())
    }

    /// The IPv6 pod bridge's gateway (`fd00:10:244:3::1`).
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.ipv6
            .map(|(_, s)| Ipv6Addr::from(u128::from(s.network()) + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannels_format() {
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.74.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        assert_eq!(e.network.to_string(), "10.244.0.0/16");
        assert_eq!(e.subnet.to_string(), "10.244.74.1/24");
        assert_eq!(e.subnet_net().to_string(), "10.244.74.0/24");
        assert_eq!(e.flannel_addr().to_string(), "10.244.74.0");
        assert_eq!(e.gateway().to_string(), "10.244.74.1");
        assert_eq!(e.mtu, 1450);
        assert!(!e.ipmasq);
        assert_eq!(
            e.order,
            [
                "FLANNEL_NETWORK",
                "FLANNEL_SUBNET",
                "FLANNEL_MTU",
                "FLANNEL_IPMASQ"
            ]
        );
    }

    #[test]
    fn rejects_missing_keys() {
        let err = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").unwrap_err();
        assert!(format!("{err:#}").contains("FLANNEL_SUBNET missing"));
    }
}
