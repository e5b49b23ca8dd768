//! flannel's network configuration (`net-conf.json`): parsing, defaults and validation.
//!
//! Field names and defaults follow flannel (docs/compatibility.md, net-conf.json). Every
//! error names the
//! field and the rule it breaks, so an operator can fix the file without reading code.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use thiserror::Error;

/// VXLAN UDP port the kernel uses when `Backend.Port` is 0.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// Why a `net-conf.json` was refused.
#[derive(Debug, Error)]
pub enum NetConfError {
    /// The document is not valid JSON or a field has the wrong JSON type (the error
    /// names the field, e.g. `Backend.VNI`).
    #[error("net-conf.json is not valid: {0}")]
    Json(#[from] serde_path_to_error::Error<serde_json::Error>),
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

// The keys as flannel spells them: PascalCase, with its capitals for IP, VNI, MTU, GBP.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetConf {
    network: Option<String>,
    #[serde(rename = "EnableIPv4")]
    enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    subnet_len: Option<u8>,
    subnet_min: Option<String>,
    subnet_max: Option<String>,
    #[serde(rename = "IPv6Network")]
    ipv6_network: Option<String>,
    #[serde(rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<u8>,
    #[serde(rename = "IPv6SubnetMin")]
    ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax")]
    ipv6_subnet_max: Option<String>,
    backend: Option<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    port: Option<u16>,
    #[serde(rename = "MTU")]
    mtu: Option<u32>,
    #[serde(rename = "GBP")]
    gbp: Option<bool>,
    learning: Option<bool>,
    direct_routing: Option<bool>,
    tx_checksum_offload: Option<bool>,
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
    /// Twill's own key `TxChecksumOffload` (default true): false turns transmit
    /// checksum offload off on the VXLAN devices whenever they are created, for
    /// kernels and NAT paths that corrupt offloaded VXLAN checksums (flannel users
    /// script `ethtool -K flannel.1 tx-checksum-ip-generic off` for this).
    pub tx_checksum_offload: bool,
}

impl Backend {
    /// Name of the VXLAN device, as flannel names it.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }
}

/// A validated network configuration with flannel's defaults filled in. At least one
/// family is present: IPv4 only (flannel's default), dual-stack, or IPv6 only
/// (`EnableIPv4: false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// The IPv4 pod network (`Network`, `SubnetLen`, `SubnetMin`, `SubnetMax`), `None`
    /// on an IPv6-only network.
    pub ipv4: Option<Ipv4Pool>,
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

/// One family's pod network and its allocatable range of equal-sized node subnets,
/// counted from the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool<N> {
    /// The pod network.
    pub network: N,
    /// Prefix length of every node subnet.
    pub subnet_len: u8,
    /// First subnet the allocator may hand out.
    pub subnet_min: N,
    /// Last subnet the allocator may hand out.
    pub subnet_max: N,
}

/// The IPv4 pool.
pub type Ipv4Pool = Pool<Ipv4Net>;
/// The IPv6 pool.
pub type Ipv6Pool = Pool<Ipv6Net>;

/// What differs between the families' pools: address width, flannel's limits, and the
/// net-conf.json key names errors use.
pub trait PoolNet:
    Copy
    + Eq
    + Ord
    + std::hash::Hash
    + std::fmt::Display
    + std::fmt::Debug
    + std::str::FromStr
    + Send
    + Sync
    + Into<IpNet>
    + 'static
{
    /// Prefix of this family's net-conf.json keys: `""` (`SubnetLen`) or `"IPv6"`.
    const KEY: &'static str;
    /// The family's name in messages.
    const FAMILY: &'static str;
    /// An example network for messages.
    const EXAMPLE: &'static str;
    /// Address width in bits.
    const BITS: u8;
    /// Longest network prefix flannel accepts.
    const MAX_PREFIX: u8;
    /// Longest subnet prefix flannel accepts.
    const MAX_SUBNET_LEN: u8;
    /// The default subnet length, for networks with a prefix up to `DEFAULT_LEN - 2`.
    const DEFAULT_LEN: u8;
    /// Most subnets one pool hands out.
    const MAX_SUBNETS: u32;
    /// The network address as a number.
    fn bits(self) -> u128 {
        match self.into() {
            IpNet::V4(n) => u32::from(n.network()).into(),
            IpNet::V6(n) => n.network().into(),
        }
    }
    /// The subnet of `len` at address `addr`, truncated to its network.
    fn make(addr: u128, len: u8) -> Self;
    /// The address as written before any `/len`, when it is of this family.
    fn parse_addr(text: &str) -> Option<u128> {
        let addr: IpAddr = text.split('/').next()?.parse().ok()?;
        Self::from_net(addr.into()).map(Self::bits)
    }
    /// Prefix length.
    fn prefix(self) -> u8 {
        self.into().prefix_len()
    }
    /// True when `addr` lies inside this network.
    fn holds(self, addr: u128) -> bool {
        let span = 1u128
            .checked_shl(u32::from(Self::BITS - self.prefix()))
            .unwrap_or(0);
        addr >= self.bits() && (span == 0 || addr - self.bits() < span)
    }
    /// Parses a CIDR of this family.
    fn parse_net(text: &str) -> Option<Self> {
        text.parse().ok()
    }
    /// The network, when it is of this family.
    fn from_net(net: IpNet) -> Option<Self>;
}

impl PoolNet for Ipv4Net {
    const KEY: &'static str = "";
    const FAMILY: &'static str = "IPv4";
    const EXAMPLE: &'static str = "10.244.0.0/16";
    const BITS: u8 = 32;
    const MAX_PREFIX: u8 = 28;
    const MAX_SUBNET_LEN: u8 = 30;
    const DEFAULT_LEN: u8 = 24;
    const MAX_SUBNETS: u32 = u32::MAX;
    fn make(addr: u128, len: u8) -> Self {
        let addr = u32::try_from(addr).unwrap_or(u32::MAX);
        Ipv4Net::new(Ipv4Addr::from(addr), len)
            .expect("valid prefix")
            .trunc()
    }
    fn from_net(net: IpNet) -> Option<Self> {
        match net {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }
}

impl PoolNet for Ipv6Net {
    const KEY: &'static str = "IPv6";
    const FAMILY: &'static str = "IPv6";
    const EXAMPLE: &'static str = "fd00:10:244::/56";
    const BITS: u8 = 128;
    const MAX_PREFIX: u8 = 124;
    const MAX_SUBNET_LEN: u8 = 126;
    const DEFAULT_LEN: u8 = 64;
    const MAX_SUBNETS: u32 = MAX_IPV6_SUBNETS;
    fn make(addr: u128, len: u8) -> Self {
        Ipv6Net::new(Ipv6Addr::from(addr), len)
            .expect("valid prefix")
            .trunc()
    }
    fn from_net(net: IpNet) -> Option<Self> {
        match net {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }
    }
}

impl<N: PoolNet> Pool<N> {
    fn step(&self) -> u128 {
        1u128 << (N::BITS - self.subnet_len)
    }

    /// Number of allocatable subnets (at most `MAX_SUBNETS`; a larger range is used
    /// from its first subnet on).
    pub fn count(&self) -> u32 {
        let span = (self.subnet_max.bits() - self.subnet_min.bits()) / self.step() + 1;
        u32::try_from(span.min(u128::from(N::MAX_SUBNETS))).unwrap_or(N::MAX_SUBNETS)
    }

    /// The `index`-th subnet counted from the first one.
    pub fn at(&self, index: u32) -> N {
        N::make(
            self.subnet_min.bits() + u128::from(index) * self.step(),
            self.subnet_len,
        )
    }

    /// The index of `subnet`, when it is an allocatable subnet.
    pub fn index_of(&self, subnet: N) -> Option<u32> {
        if subnet.prefix() != self.subnet_len || N::make(subnet.bits(), subnet.prefix()) != subnet {
            return None;
        }
        let (addr, min) = (subnet.bits(), self.subnet_min.bits());
        if addr < min || addr > self.subnet_max.bits() {
            return None;
        }
        u32::try_from((addr - min) / self.step())
            .ok()
            .filter(|i| *i < self.count())
    }

    /// True when `subnet` is a node-sized subnet of the network (allocatable or not).
    pub fn fits(&self, subnet: N) -> bool {
        subnet.prefix() == self.subnet_len && self.network.holds(subnet.bits())
    }

    /// `SubnetMin..SubnetMax` with this family's key names, for messages.
    pub fn range_text(&self) -> String {
        format!(
            "{k}SubnetMin {}..{k}SubnetMax {} (/{})",
            self.subnet_min,
            self.subnet_max,
            self.subnet_len,
            k = N::KEY
        )
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
        let raw: RawNetConf =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))?;
        let ipv4 = match raw.enable_ipv4 {
            Some(false) => None,
            _ => Some(parse_pool::<Ipv4Net>(
                raw.network,
                raw.subnet_len,
                raw.subnet_min,
                raw.subnet_max,
            )?),
        };
        let ipv6 = match raw.enable_ipv6 {
            Some(true) => Some(parse_pool::<Ipv6Net>(
                raw.ipv6_network,
                raw.ipv6_subnet_len,
                raw.ipv6_subnet_min,
                raw.ipv6_subnet_max,
            )?),
            _ => None,
        };
        if ipv4.is_none() && ipv6.is_none() {
            return Err(invalid(
                "EnableIPv4 is false and EnableIPv6 is not true: the network has no address \
                 family; for an IPv6-only network set \"EnableIPv6\": true and IPv6Network",
            ));
        }
        let backend = parse_backend(raw.backend)?;
        Ok(NetConf {
            ipv4,
            ipv6,
            backend,
            raw: text.to_string(),
        })
    }

    /// The IPv4 pod network, if the network has IPv4.
    pub fn network4(&self) -> Option<Ipv4Net> {
        self.ipv4.as_ref().map(|p| p.network)
    }

    /// The IPv6 pod network, if the network has IPv6.
    pub fn network6(&self) -> Option<Ipv6Net> {
        self.ipv6.as_ref().map(|p| p.network)
    }

    /// The pod network of each family the network has.
    pub fn networks(&self) -> crate::model::PerFamily<IpNet> {
        crate::model::PerFamily::new(
            self.network4().map(IpNet::from),
            self.network6().map(IpNet::from),
        )
    }
}

/// flannel's rules for one family's keys: the network at most /28 (IPv6: /124); the
/// subnet length 24 by default (IPv6: 64), prefix + 2 for a smaller network, at most
/// 30 (126) and longer than the prefix (IPv6: at least prefix + 2, four subnets); the
/// bounds inside the network on a subnet boundary, the second and the last subnet by
/// default.
fn parse_pool<N: PoolNet>(
    network: Option<String>,
    subnet_len: Option<u8>,
    min: Option<String>,
    max: Option<String>,
) -> Result<Pool<N>, NetConfError> {
    let k = N::KEY;
    let text = network.ok_or_else(|| {
        invalid(if k.is_empty() {
            "Network is missing: set it to the pod network, e.g. \"10.244.0.0/16\"".to_string()
        } else {
            format!(
                "EnableIPv6 is true but IPv6Network is missing: set it to the IPv6 pod network, e.g. \"{}\"",
                N::EXAMPLE
            )
        })
    })?;
    let parsed = N::parse_net(&text).ok_or_else(|| {
        invalid(format!(
            "{k}Network {text:?} is not an {} CIDR such as {}",
            N::FAMILY,
            N::EXAMPLE
        ))
    })?;
    let network = N::make(parsed.bits(), parsed.prefix());
    if parsed != network {
        return Err(invalid(format!(
            "{k}Network {parsed} has host bits set: did you mean {network}?"
        )));
    }
    let prefix = network.prefix();
    if prefix > N::MAX_PREFIX {
        return Err(invalid(format!(
            "{k}Network {network} is too small: its prefix must be /{} or shorter",
            N::MAX_PREFIX
        )));
    }
    let subnet_len = match subnet_len {
        Some(len) => len,
        None if prefix <= N::DEFAULT_LEN - 2 => N::DEFAULT_LEN,
        None => prefix + 2,
    };
    if k.is_empty() && subnet_len <= prefix {
        return Err(invalid(format!(
            "SubnetLen {subnet_len} must be longer than the prefix of Network {network}"
        )));
    }
    if subnet_len > N::MAX_SUBNET_LEN {
        return Err(invalid(format!(
            "{k}SubnetLen {subnet_len} must be at most {}",
            N::MAX_SUBNET_LEN
        )));
    }
    if !k.is_empty() && subnet_len < prefix + 2 {
        return Err(invalid(format!(
            "{k}SubnetLen {subnet_len} must be at least the prefix of {k}Network {network} + 2 (room for four subnets)"
        )));
    }
    let step = 1u128 << (N::BITS - subnet_len);
    let first = network.bits();
    let span = 1u128.checked_shl(u32::from(N::BITS - prefix));
    let last = span.map_or(u128::MAX, |s| first + (s - 1)) - (step - 1);
    let bound = |field: &str, text: Option<String>, default: u128| match text {
        Some(t) => parse_bound::<N>(&format!("{k}{field}"), &t, network, subnet_len),
        None => Ok(N::make(default, subnet_len)),
    };
    let subnet_min = bound("SubnetMin", min, first + step)?;
    let subnet_max = bound("SubnetMax", max, last)?;
    if subnet_min.bits() > subnet_max.bits() {
        return Err(invalid(format!(
            "{k}SubnetMin {} is after {k}SubnetMax {}",
            addr_text(subnet_min),
            addr_text(subnet_max)
        )));
    }
    Ok(Pool {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

/// A subnet's address without its prefix length.
fn addr_text<N: PoolNet>(n: N) -> String {
    n.into().addr().to_string()
}

fn parse_bound<N: PoolNet>(
    field: &str,
    text: &str,
    network: N,
    subnet_len: u8,
) -> Result<N, NetConfError> {
    // flannel accepts both "10.244.4.0" and "10.244.4.0/24" here.
    let addr = N::parse_addr(text)
        .ok_or_else(|| invalid(format!("{field} {text:?} is not an {} address", N::FAMILY)))?;
    let addr_only = addr_text(N::make(addr, N::BITS));
    if !network.holds(addr) {
        return Err(invalid(format!(
            "{field} {addr_only} is outside {}Network {network}",
            N::KEY
        )));
    }
    let subnet = N::make(addr, subnet_len);
    if subnet.bits() != addr {
        return Err(invalid(format!(
            "{field} {addr_only} is not on a /{subnet_len} boundary ({}SubnetLen): did you mean {}?",
            N::KEY,
            addr_text(subnet)
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
        tx_checksum_offload: raw.tx_checksum_offload.unwrap_or(true),
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
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 24);
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min.to_string(),
            "10.244.1.0/24"
        );
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_max.to_string(),
            "10.244.255.0/24"
        );
        assert_eq!(c.ipv4.as_ref().unwrap().count(), 255);
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
    fn ipv6_only() {
        let c = NetConf::parse(
            r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        assert!(c.ipv4.is_none());
        assert_eq!(c.network6(), Some("fd00:10:244::/56".parse().unwrap()));
        assert!(
            err(r#"{"EnableIPv4": false, "Backend": {"Type": "vxlan"}}"#)
                .contains("no address family")
        );
        assert!(
            err(r#"{"EnableIPv4": false, "EnableIPv6": true, "Backend": {"Type": "vxlan"}}"#)
                .contains("IPv6Network is missing")
        );
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
        assert_eq!(c.ipv4.as_ref().unwrap().subnet_len, 28);
        assert_eq!(c.ipv4.as_ref().unwrap().count(), 3);
    }

    #[test]
    fn tx_checksum_offload_stays_on_unless_turned_off() {
        let conf = |backend: &str| {
            NetConf::parse(&format!(
                r#"{{"Network": "10.0.0.0/8", "Backend": {backend}}}"#
            ))
        };
        assert!(
            conf(r#"{"Type": "vxlan"}"#)
                .unwrap()
                .backend
                .tx_checksum_offload
        );
        let off = conf(r#"{"Type": "vxlan", "TxChecksumOffload": false}"#).unwrap();
        assert!(!off.backend.tx_checksum_offload);
        let e = conf(r#"{"Type": "vxlan", "TxChecksumOffload": "off"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("TxChecksumOffload"), "{e}");
    }

    #[test]
    fn explicit_fields() {
        let c = NetConf::parse(
            r#"{"Network": "10.0.0.0/8", "SubnetLen": 20, "SubnetMin": "10.16.0.0", "SubnetMax": "10.32.0.0/20",
                "Backend": {"Type": "vxlan", "VNI": 42, "Port": 4789, "MTU": 1400, "DirectRouting": true}}"#,
        )
        .unwrap();
        assert_eq!(
            c.ipv4.as_ref().unwrap().subnet_min.to_string(),
            "10.16.0.0/20"
        );
        assert_eq!(c.ipv4.as_ref().unwrap().count(), 257);
        assert_eq!(c.backend.device_name(), "flannel.42");
        assert_eq!(c.backend.port, 4789);
        assert_eq!(c.backend.mtu, Some(1400));
        assert!(c.backend.direct_routing);
        assert_eq!(
            c.ipv4
                .as_ref()
                .unwrap()
                .index_of("10.16.16.0/20".parse().unwrap()),
            Some(1)
        );
        assert_eq!(c.ipv4.as_ref().unwrap().at(1).to_string(), "10.16.16.0/20");
        assert_eq!(
            c.ipv4
                .as_ref()
                .unwrap()
                .index_of("10.15.0.0/20".parse().unwrap()),
            None
        );
        assert_eq!(
            c.ipv4
                .as_ref()
                .unwrap()
                .index_of("10.16.1.0/20".parse().unwrap()),
            None
        );
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
