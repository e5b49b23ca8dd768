//! Kernel state as `ip -j` and `bridge -j` report it.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use serde::Deserialize;

/// Twill's route protocol number (`proto 74`).
pub const TWILL_ROUTE_PROTO: u8 = 74;

/// The VXLAN device of VNI 1.
pub const FLANNEL_DEV: &str = "flannel.1";

/// One route from `ip -j route show`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Route {
    /// Destination as printed: `10.244.2.0/24`, a bare address for /32, or `default`.
    pub dst: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
}

impl Route {
    /// The destination as a network (`None` for `default` or unparsable ones).
    pub fn dst_net(&self) -> Option<Ipv4Net> {
        if let Ok(n) = self.dst.parse::<Ipv4Net>() {
            return Some(n);
        }
        self.dst
            .parse::<Ipv4Addr>()
            .ok()
            .map(|a| Ipv4Net::new(a, 32).expect("/32 is valid"))
    }

    pub fn is_onlink(&self) -> bool {
        self.flags.iter().any(|f| f == "onlink")
    }
}

/// One neighbour (ARP) entry from `ip -j neigh show`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Neighbour {
    pub dst: String,
    #[serde(default)]
    pub lladdr: Option<String>,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub state: Vec<String>,
}

impl Neighbour {
    pub fn is_permanent(&self) -> bool {
        self.state
            .iter()
            .any(|s| s.eq_ignore_ascii_case("permanent"))
    }
}

/// One forwarding-database entry from `bridge -j fdb show`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: String,
    /// The remote VTEP for VXLAN entries.
    #[serde(default)]
    pub dst: Option<String>,
    #[serde(default)]
    pub ifname: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub state: Option<String>,
}

/// One link from `ip -j -d link show`.
#[derive(Debug, Clone, Deserialize)]
pub struct Link {
    pub ifname: String,
    /// The MAC address.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub operstate: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LinkInfo {
    #[serde(default)]
    pub info_kind: Option<String>,
    /// Kind-specific data (for vxlan: `id`, `local`, `link`, `port`, `learning`, ...).
    #[serde(default)]
    pub info_data: Option<serde_json::Value>,
}

impl Link {
    pub fn kind(&self) -> Option<&str> {
        self.linkinfo.as_ref()?.info_kind.as_deref()
    }

    /// The MAC address, lower case.
    pub fn mac(&self) -> Option<String> {
        self.address.as_ref().map(|a| a.to_ascii_lowercase())
    }

    pub fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
}

/// Parses `ip -j`/`bridge -j` output (empty output means an empty list).
pub fn parse_json_list<T: for<'de> Deserialize<'de>>(what: &str, text: &str) -> Result<Vec<T>> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(t).with_context(|| format!("cannot parse {what} JSON: {t}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iproute2_json() {
        let r: Vec<Route> = parse_json_list(
            "routes",
            r#"[{"dst":"10.244.2.0/24","gateway":"10.244.2.0","dev":"flannel.1","protocol":"74","flags":["onlink"]},{"dst":"10.244.3.7","dev":"x","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(r[0].dst_net().unwrap().to_string(), "10.244.2.0/24");
        assert!(r[0].is_onlink());
        assert_eq!(r[1].dst_net().unwrap().to_string(), "10.244.3.7/32");
        let n: Vec<Neighbour> = parse_json_list(
            "neighbours",
            r#"[{"dst":"10.244.2.0","lladdr":"aa:bb:cc:dd:ee:ff","state":["PERMANENT"]}]"#,
        )
        .unwrap();
        assert!(n[0].is_permanent());
        let f: Vec<FdbEntry> = parse_json_list(
            "fdb",
            r#"[{"mac":"aa:bb:cc:dd:ee:ff","dst":"198.18.0.2","flags":["self"],"state":"permanent"}]"#,
        )
        .unwrap();
        assert_eq!(f[0].dst.as_deref(), Some("198.18.0.2"));
        assert!(parse_json_list::<Route>("routes", "\n").unwrap().is_empty());
    }
}
