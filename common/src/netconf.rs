//! flannel's network configuration (`net-conf.json`): parsing, defaults and validation.
//!
//! Field names and defaults follow flannel (docs/compatibility.md, net-conf.json). Every
//! error names the
//! field and the rule it breaks, so an operator can fix the file without reading code.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;
use thiserror::Error;

/// VXLAN UDP port the kernel uses when `Backend.Port` is 0.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// Why a `net-conf.json` was refused.
#[derive(Debug, Error)]
pub enum NetConfError {
    /// The document is not valid JSON or a field has the wrong JSON type.
    #[error("net-conf.json is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// A field breaks one of flannel's rules; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The file could not be read.
    #[error("cannot read net-conf.json {path}: {source}")]
    Io {
        /// The path that was read.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn invalid(msg: impl Into<String>) -> NetConfError {
    NetConfError::Invalid(msg.into())
}

#[derive(Debug, Deserialize)]
struct RawNetConf {
    #[serde(rename = "Network")]
    network: Option<String>,
    #[serde(rename = "EnableIPv4")]
    enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(rename = "SubnetLen")]
    subnet_len: Option<u8>,
    #[serde(rename = "SubnetMin")]
    subnet_min: Option<String>,
    #[serde(rename = "SubnetMax")]
    subnet_max: Option<String>,
    #[serde(rename = "IPv6Network")]
    ipv6_network: Option<String>,
    #[serde(rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<u8>,
    #[serde(rename = "IPv6SubnetMin")]
    ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax")]
    ipv6_subnet_max: Option<String>,
    #[serde(rename = "Backend")]
    backend: Option<RawBackend>,
}

#[derive(Debug, Deserialize)]
struct RawBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    #[serde(rename = "Port")]
    port: Option<u16>,
    #[serde(rename = "MTU")]
    mtu: Option<u32>,
    #[serde(rename = "GBP")]
    gbp: Option<bool>,
    #[serde(rename = "Learning")]
    learning: Option<bool>,
    #[serde(rename = "DirectRouting")]
    direct_routing: Option<bool>,
}

/// How peers' pods are reached (`Backend.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendType {
    /// VXLAN encapsulation through `flannel.<VNI>`.
    Vxlan,
    /// Plain routes via each peer's public address: no device, no encapsulation; the
    /// nodes must share an L2 segment.
    HostGw,
}

impl BackendType {
    /// The name used in net-conf.json and in leases.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
        }
    }
}

impl std::fmt::Display for BackendType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The backend settings (`Backend` object). The VXLAN fields keep their defaults and
/// are not used when the type is host-gw, as in flannel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `Backend.Type`.
    pub kind: BackendType,
    /// VXLAN network identifier; the device is `flannel.<vni>`.
    pub vni: u32,
    /// UDP port; never 0 here (0 in the file means 8472).
    pub port: u16,
    /// Overlay MTU override; `None` means interface MTU − 50.
    pub mtu: Option<u32>,
    /// VXLAN group based policy extension.
    pub gbp: bool,
    /// Kernel FDB learning on the device.
    pub learning: bool,
    /// Plain routes to peers on the same L2 subnet.
    pub direct_routing: bool,
}

impl Backend {
    /// Name of the VXLAN device, as flannel names it.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }
}

/// A validated network configuration with flannel's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// The pod network.
    pub network: Ipv4Net,
    /// Prefix length of every node subnet.
    pub subnet_len: u8,
    /// First subnet the allocator may hand out.
    pub subnet_min: Ipv4Net,
    /// Last subnet the allocator may hand out.
    pub subnet_max: Ipv4Net,
    /// The IPv6 pod network (`EnableIPv6`), `None` on an IPv4-only network.
    pub ipv6: Option<Ipv6Pool>,
    /// The backend.
    pub backend: Backend,
    /// The document as it was given, served verbatim to agents.
    pub raw: String,
}

/// Most IPv6 subnets one network hands out: a /48 split into /64s already holds
/// 65,536, and the free-subnet bitmap stays at 2 MiB. A larger range is used from
/// `IPv6SubnetMin` on.
pub const MAX_IPV6_SUBNETS: u32 = 1 << 24;

/// The IPv6 pod network and its allocatable range (`IPv6Network`, `IPv6SubnetLen`,
/// `IPv6SubnetMin`, `IPv6SubnetMax`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Pool {
    /// The IPv6 pod network.
    pub network: Ipv6Net,
    /// Prefix length of every node's IPv6 subnet.
    pub subnet_len: u8,
    /// First subnet the allocator may hand out.
    pub subnet_min: Ipv6Net,
    /// Last subnet the allocator may hand out.
    pub subnet_max: Ipv6Net,
}

/// A range of equal-sized subnets counted from its first one: what the allocator
/// hands out, for either family.
pub trait SubnetPool {
    /// The subnet type.
    type Net: Copy + Eq + std::fmt::Display;
    /// Number of allocatable subnets.
    fn count(&self) -> u32;
    /// The `index`-th subnet.
    fn at(&self, index: u32) -> Self::Net;
    /// The index of `subnet`, when it is an allocatable subnet.
    fn index_of(&self, subnet: Self::Net) -> Option<u32>;
}

impl SubnetPool for NetConf {
    type Net = Ipv4Net;
    fn count(&self) -> u32 {
        self.subnet_count()
    }
    fn at(&self, index: u32) -> Ipv4Net {
        self.subnet_at(index)
    }
    fn index_of(&self, subnet: Ipv4Net) -> Option<u32> {
        NetConf::index_of(self, subnet)
    }
}

impl Ipv6Pool {
    fn step(&self) -> u128 {
        1u128 << (128 - u32::from(self.subnet_len))
    }
}

impl SubnetPool for Ipv6Pool {
    type Net = Ipv6Net;
    fn count(&self) -> u32 {
        let span = (u128::from(self.subnet_max.network()) - u128::from(self.subnet_min.network()))
            / self.step()
            + 1;
        u32::try_from(span.min(u128::from(MAX_IPV6_SUBNETS))).unwrap_or(MAX_IPV6_SUBNETS)
    }
    fn at(&self, index: u32) -> Ipv6Net {
        let addr = u128::from(self.subnet_min.network()) + u128::from(index) * self.step();
        Ipv6Net::new(Ipv6Addr::from(addr), self.subnet_len).expect("valid prefix")
    }
    fn index_of(&self, subnet: Ipv6Net) -> Option<u32> {
        if subnet.prefix_len() != self.subnet_len || subnet.network() != subnet.addr() {
            return None;
        }
        let addr = u128::from(subnet.network());
        let min = u128::from(self.subnet_min.network());
        if addr < min || addr > u128::from(self.subnet_max.network()) {
            return None;
        }
        u32::try_from((addr - min) / self.step())
            .ok()
            .filter(|i| *i < self.count())
    }
}

impl NetConf {
    /// Reads and validates a net-conf.json file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, NetConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| NetConfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates a net-conf.json document.
    pub fn parse(text: &str) -> Result<Self, NetConfError> {
        let raw: RawNetConf = serde_json::from_str(text)?;
        if raw.enable_ipv4 == Some(false) {
            return Err(invalid("EnableIPv4 is false: Twill needs an IPv4 overlay"));
        }
        let network_text = raw.network.ok_or_else(|| {
            invalid("Network is missing: set it to the pod network, e.g. \"10.244.0.0/16\"")
        })?;
        let network: Ipv4Net = network_text.parse().map_err(|_| {
            invalid(format!(
                "Network {network_text:?} is not an IPv4 CIDR such as 10.244.0.0/16"
            ))
        })?;
        if network.network() != network.addr() {
            return Err(invalid(format!(
                "Network {network} has host bits set: did you mean {}?",
                network.trunc()
            )));
        }
        let prefix = network.prefix_len();
        if prefix > 28 {
            return Err(invalid(format!(
                "Network {network} is too small: its prefix must be /28 or shorter"
            )));
        }
        let subnet_len = match raw.subnet_len {
            Some(len) => len,
            None if prefix <= 22 => 24,
            None => prefix + 2,
        };
        if subnet_len <= prefix {
            return Err(invalid(format!(
                "SubnetLen {subnet_len} must be longer than the prefix of Network {network}"
            )));
        }
        if subnet_len > 30 {
            return Err(invalid(format!(
                "SubnetLen {subnet_len} must be at most 30"
            )));
        }
        let step = subnet_size(subnet_len);
        let first = u32::from(network.network());
        let last_subnet = u32::from(network.broadcast()) - (step - 1);
        let subnet_min = match raw.subnet_min {
            Some(s) => parse_bound("SubnetMin", &s, network, subnet_len)?,
            None => Ipv4Net::new(Ipv4Addr::from(first + step), subnet_len).expect("valid prefix"),
        };
        let subnet_max = match raw.subnet_max {
            Some(s) => parse_bound("SubnetMax", &s, network, subnet_len)?,
            None => Ipv4Net::new(Ipv4Addr::from(last_subnet), subnet_len).expect("valid prefix"),
        };
        if u32::from(subnet_min.network()) > u32::from(subnet_max.network()) {
            return Err(invalid(format!(
                "SubnetMin {} is after SubnetMax {}",
                subnet_min.network(),
                subnet_max.network()
            )));
        }
        let ipv6 = match raw.enable_ipv6 {
            Some(true) => Some(parse_ipv6(
                raw.ipv6_network,
                raw.ipv6_subnet_len,
                raw.ipv6_subnet_min,
                raw.ipv6_subnet_max,
            )?),
            _ => None,
        };
        let backend = parse_backend(raw.backend)?;
        Ok(NetConf {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            ipv6,
            backend,
            raw: text.to_string(),
        })
    }

    /// Number of subnets between SubnetMin and SubnetMax, inclusive.
    pub fn subnet_count(&self) -> u32 {
        (u32::from(self.subnet_max.network()) - u32::from(self.subnet_min.network()))
            / subnet_size(self.subnet_len)
            + 1
    }

    /// The `index`-th subnet counted from SubnetMin.
    pub fn subnet_at(&self, index: u32) -> Ipv4Net {
        let addr = u32::from(self.subnet_min.network()) + index * subnet_size(self.subnet_len);
        Ipv4Net::new(Ipv4Addr::from(addr), self.subnet_len).expect("valid prefix")
    }

    /// The index of `subnet` counted from SubnetMin, when it is an allocatable subnet.
    pub fn index_of(&self, subnet: Ipv4Net) -> Option<u32> {
        if subnet.prefix_len() != self.subnet_len || subnet.network() != subnet.addr() {
            return None;
        }
        let addr = u32::from(subnet.network());
        let min = u32::from(self.subnet_min.network());
        let max = u32::from(self.subnet_max.network());
        (min..=max)
            .contains(&addr)
            .then(|| (addr - min) / subnet_size(self.subnet_len))
    }
}

fn subnet_size(len: u8) -> u32 {
    1u32 << (32 - u32::from(len))
}

fn parse_bound(
    field: &str,
    text: &str,
    network: Ipv4Net,
    subnet_len: u8,
) -> Result<Ipv4Net, NetConfError> {
    // flannel accepts both "10.244.4.0" and "10.244.4.0/24" here.
    let addr: Ipv4Addr = text
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|_| invalid(format!("{field} {text:?} is not an IPv4 address")))?;
    if !network.contains(&addr) {
        return Err(invalid(format!(
            "{field} {addr} is outside Network {network}"
        )));
    }
    let subnet = Ipv4Net::new(addr, subnet_len).expect("valid prefix");
    if subnet.network() != addr {
        return Err(invalid(format!(
            "{field} {addr} is not on a /{subnet_len} boundary (SubnetLen): did you mean {}?",
            subnet.network()
        )));
    }
    Ok(subnet)
}

/// flannel's IPv6 rules: the network at most /124; `IPv6SubnetLen` 64 by default
/// (prefix + 2 for a network longer than /62), at most 126 and at least prefix + 2
/// (four subnets); the bounds as for IPv4.
fn parse_ipv6(
    network: Option<String>,
    subnet_len: Option<u8>,
    min: Option<String>,
    max: Option<String>,
) -> Result<Ipv6Pool, NetConfError> {
    let text = network.ok_or_else(|| {
        invalid("EnableIPv6 is true but IPv6Network is missing: set it to the IPv6 pod network, e.g. \"fd00:10:244::/56\"")
    })?;
    let network: Ipv6Net = text.parse().map_err(|_| {
        invalid(format!(
            "IPv6Network {text:?} is not an IPv6 CIDR such as fd00:10:244::/56"
        ))
    })?;
    if network.network() != network.addr() {
        return Err(invalid(format!(
            "IPv6Network {network} has host bits set: did you mean {}?",
            network.trunc()
        )));
    }
    let prefix = network.prefix_len();
    if prefix > 124 {
        return Err(invalid(format!(
            "IPv6Network {network} is too small: its prefix must be /124 or shorter"
        )));
    }
    let subnet_len = match subnet_len {
        Some(len) => len,
        None if prefix <= 62 => 64,
        None => prefix + 2,
    };
    if subnet_len > 126 {
        return Err(invalid(format!(
            "IPv6SubnetLen {subnet_len} must be at most 126"
        )));
    }
    if subnet_len < prefix + 2 {
        return Err(invalid(format!(
            "IPv6SubnetLen {subnet_len} must be at least the prefix of IPv6Network {network} + 2 (room for four subnets)"
        )));
    }
    let step = 1u128 << (128 - u32::from(subnet_len));
    let first = u128::from(network.network());
    let last = u128::from(network.broadcast()) - (step - 1);
    let bound = |field: &str, text: Option<String>, default: u128| match text {
        Some(t) => parse_bound6(field, &t, network, subnet_len),
        None => Ok(Ipv6Net::new(Ipv6Addr::from(default), subnet_len).expect("valid prefix")),
    };
    let subnet_min = bound("IPv6SubnetMin", min, first + step)?;
    let subnet_max = bound("IPv6SubnetMax", max, last)?;
    if u128::from(subnet_min.network()) > u128::from(subnet_max.network()) {
        return Err(invalid(format!(
            "IPv6SubnetMin {} is after IPv6SubnetMax {}",
            subnet_min.network(),
            subnet_max.network()
        )));
    }
    Ok(Ipv6Pool {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

fn parse_bound6(
    field: &str,
    text: &str,
    network: Ipv6Net,
    subnet_len: u8,
) -> Result<Ipv6Net, NetConfError> {
    let addr: Ipv6Addr = text
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .map_err(|_| invalid(format!("{field} {text:?} is not an IPv6 address")))?;
    if !network.contains(&addr) {
        return Err(invalid(format!(
            "{field} {addr} is outside IPv6Network {network}"
        )));
    }
    let subnet = Ipv6Net::new(addr, subnet_len).expect("valid prefix");
    if subnet.network() != addr {
        return Err(invalid(format!(
            "{field} {addr} is not on a /{subnet_len} boundary (IPv6SubnetLen): did you mean {}?",
            subnet.network()
        )));
    }
    Ok(subnet)
}

fn parse_backend(raw: Option<RawBackend>) -> Result<Backend, NetConfError> {
    let raw = raw.ok_or_else(|| {
        invalid("Backend is missing: flannel would default to \"udp\", which Twill does not support; add \"Backend\": {\"Type\": \"vxlan\"}")
    })?;
    let kind = match raw.kind.as_deref() {
        Some("vxlan") => BackendType::Vxlan,
        Some("host-gw") => BackendType::HostGw,
        Some(other) => {
            return Err(invalid(format!(
                "Backend.Type {other:?} is not supported: Twill supports \"vxlan\" and \"host-gw\""
            )))
        }
        None => {
            return Err(invalid(
                "Backend.Type is missing: flannel would default to \"udp\", which Twill does not support; set \"Type\": \"vxlan\"",
            ))
        }
    };
    let vni = raw.vni.unwrap_or(1);
    if vni >= 1 << 24 {
        return Err(invalid(format!(
            "Backend.VNI {vni} is out of range: a VNI fits in 24 bits (0 to 16777215)"
        )));
    }
    let mtu = match raw.mtu.unwrap_or(0) {
        0 => None,
        m if !(68..=65535).contains(&m) => {
            return Err(invalid(format!(
                "Backend.MTU {m} is out of range (68 to 65535, or 0 for automatic)"
            )))
        }
        m => Some(m),
    };
    Ok(Backend {
        kind,
        vni,
        port: match raw.port.unwrap_or(0) {
            0 => DEFAULT_VXLAN_PORT,
            p => p,
        },
        mtu,
        gbp: raw.gbp.unwrap_or(false),
        learning: raw.learning.unwrap_or(false),
        direct_routing: raw.direct_routing.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        NetConf::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn flannel_defaults() {
        let c = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min.to_string(), "10.244.1.0/24");
        assert_eq!(c.subnet_max.to_string(), "10.244.255.0/24");
        assert_eq!(c.subnet_count(), 255);
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.backend.mtu, None);
        assert_eq!(c.backend.device_name(), "flannel.1");
        assert_eq!(c.backend.kind, BackendType::Vxlan);
    }

    #[test]
    fn dual_stack_defaults_and_rules() {
        let c = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        let p = c.ipv6.as_ref().unwrap();
        assert_eq!(p.subnet_len, 64);
        assert_eq!(p.subnet_min.to_string(), "fd00:10:244:1::/64");
        assert_eq!(p.subnet_max.to_string(), "fd00:10:244:ff::/64");
        assert_eq!(p.count(), 255);
        assert_eq!(p.at(2).to_string(), "fd00:10:244:3::/64");
        assert_eq!(p.index_of("fd00:10:244:3::/64".parse().unwrap()), Some(2));
        assert_eq!(p.index_of("fd00:10:244::/64".parse().unwrap()), None);
        assert_eq!(p.index_of("fd00:10:244:3::/80".parse().unwrap()), None);

        let small = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/120",
                "IPv6SubnetMin": "fd00::40", "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        let p = small.ipv6.unwrap();
        assert_eq!((p.subnet_len, p.count()), (122, 3));

        let huge = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/16",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(huge.ipv6.unwrap().count(), MAX_IPV6_SUBNETS);

        let off = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "IPv6Network": "fd00::/56", "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        assert!(
            off.ipv6.is_none(),
            "IPv6Network without EnableIPv6 is ignored, as in flannel"
        );

        let v6 = |extra: &str| {
            err(&format!(
                r#"{{"Network": "10.244.0.0/16", "EnableIPv6": true, {extra} "Backend": {{"Type": "vxlan"}}}}"#
            ))
        };
        assert!(v6("").contains("IPv6Network is missing"));
        assert!(v6(r#""IPv6Network": "10.0.0.0/8","#).contains("IPv6Network \"10.0.0.0/8\""));
        assert!(v6(r#""IPv6Network": "fd00::1/56","#).contains("host bits"));
        assert!(v6(r#""IPv6Network": "fd00::/126","#).contains("too small"));
        assert!(v6(r#""IPv6Network": "fd00::/56", "IPv6SubnetLen": 127,"#).contains("at most 126"));
        assert!(v6(r#""IPv6Network": "fd00::/56", "IPv6SubnetLen": 57,"#).contains("at least"));
        assert!(
            v6(r#""IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd01::","#)
                .contains("IPv6SubnetMin fd01:: is outside IPv6Network fd00::/56")
        );
        assert!(
            v6(r#""IPv6Network": "fd00::/56", "IPv6SubnetMax": "fd00:0:0:3::1","#)
                .contains("IPv6SubnetMax fd00:0:0:3::1 is not on a /64 boundary")
        );
        assert!(v6(r#""IPv6Network": "fd00::/56", "IPv6SubnetMin": "fd00:0:0:9::", "IPv6SubnetMax": "fd00:0:0:2::","#)
            .contains("after IPv6SubnetMax"));
    }

    #[test]
    fn host_gw_backend() {
        let c = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#)
            .unwrap();
        assert_eq!(c.backend.kind, BackendType::HostGw);
        assert_eq!(c.backend.kind.to_string(), "host-gw");
    }

    #[test]
    fn small_network_gets_prefix_plus_two() {
        let c =
            NetConf::parse(r#"{"Network": "10.1.0.0/26", "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 28);
        assert_eq!(c.subnet_count(), 3);
    }

    #[test]
    fn explicit_fields() {
        let c = NetConf::parse(
            r#"{"Network": "10.0.0.0/8", "SubnetLen": 20, "SubnetMin": "10.16.0.0", "SubnetMax": "10.32.0.0/20",
                "Backend": {"Type": "vxlan", "VNI": 42, "Port": 4789, "MTU": 1400, "DirectRouting": true}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_min.to_string(), "10.16.0.0/20");
        assert_eq!(c.subnet_count(), 257);
        assert_eq!(c.backend.device_name(), "flannel.42");
        assert_eq!(c.backend.port, 4789);
        assert_eq!(c.backend.mtu, Some(1400));
        assert!(c.backend.direct_routing);
        assert_eq!(c.index_of("10.16.16.0/20".parse().unwrap()), Some(1));
        assert_eq!(c.subnet_at(1).to_string(), "10.16.16.0/20");
        assert_eq!(c.index_of("10.15.0.0/20".parse().unwrap()), None);
        assert_eq!(c.index_of("10.16.1.0/20".parse().unwrap()), None);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err(
            r#"{"Network": "10.244.0.0/16", "SubnetLen": 16, "Backend": {"Type": "vxlan"}}"#
        )
        .contains("SubnetLen 16 must be longer"));
        assert!(err(
            r#"{"Network": "10.244.0.0/16", "SubnetMin": "10.9.0.0", "Backend": {"Type": "vxlan"}}"#
        )
        .contains("SubnetMin 10.9.0.0 is outside Network 10.244.0.0/16"));
        assert!(err(r#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.3.7", "Backend": {"Type": "vxlan"}}"#)
            .contains("SubnetMax 10.244.3.7 is not on a /24 boundary"));
        assert!(
            err(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}"#)
                .contains("Backend.Type \"udp\"")
        );
        assert!(err(r#"{"Network": "10.244.0.0/16"}"#).contains("Backend is missing"));
        assert!(err(r#"{"Backend": {"Type": "vxlan"}}"#).contains("Network is missing"));
        assert!(
            err(r#"{"Network": "banana", "Backend": {"Type": "vxlan"}}"#)
                .contains("Network \"banana\"")
        );
        assert!(
            err(r#"{"Network": "10.0.0.0/30", "Backend": {"Type": "vxlan"}}"#)
                .contains("too small")
        );
        assert!(err(
            r#"{"Network": "10.244.0.0/16", "SubnetLen": 31, "Backend": {"Type": "vxlan"}}"#
        )
        .contains("at most 30"));
        assert!(err(
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#
        )
        .contains("Backend.VNI"));
        assert!(err(r#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.2.0", "Backend": {"Type": "vxlan"}}"#)
            .contains("after SubnetMax"));
        assert!(err("{").contains("not valid"));
        assert!(err(r#"{"Network": 5}"#).contains("not valid"));
    }
}
