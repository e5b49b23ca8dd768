//! The agent's data plane: the only code that touches the kernel.
//!
//! `DataPlane` is the seam: `netlink::Netlink` programs the real kernel through
//! rtnetlink, and the reconciler (`crate::reconcile`) only speaks this trait, so its
//! logic is unit-tested against an in-memory implementation.
//! Each operation's doc names the `ip`/`bridge` command it equals.
//!
//! Every type here is family generic: the same operations program `flannel.<VNI>` over
//! IPv4 and, in a dual-stack network, `flannel-v6.<VNI>` over IPv6. Reads take the
//! [`Family`] they are about, so the two data planes never see each other's entries.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;
use twill_common::model::{Mac, PerFamily};

pub mod ethtool;
pub mod isolation;
pub mod masq;
pub mod netlink;

/// Route protocol number stamped on every route Twill writes (`ip route ... proto 74`),
/// so ownership is explicit and routes of others are never touched.
pub const ROUTE_PROTOCOL: u8 = 74;

pub use twill_common::model::Family;

/// A kernel operation failed.
#[derive(Debug, Error)]
pub enum DataPlaneError {
    /// Netlink answered with an error; `op` says what we were doing.
    #[error("{op}: {source}")]
    Netlink {
        /// The operation, written like the `ip` command it equals.
        op: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// Opening the netlink socket failed.
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    /// An interface or address the caller asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Programming nftables failed.
    #[error("{0}")]
    Nft(String),
    /// Changing a device's offloads with ethtool failed.
    #[error("{0}")]
    Ethtool(String),
    /// The caller asked for something no kernel accepts, such as a route whose
    /// gateway is not of its destination's family; the message names the command.
    #[error("{0}")]
    Invalid(String),
}

/// The VXLAN device to create or reuse (docs/compatibility.md, Kernel state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name, `flannel.<VNI>` or `flannel-v6.<VNI>`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Local tunnel address: the node's public IP of the device's family (netlink
    /// `local` for IPv4, `local6` for IPv6).
    pub local: IpAddr,
    /// UDP destination port.
    pub port: u16,
    /// Index of the public (underlay) interface.
    pub underlay_index: u32,
    /// Device MTU.
    pub mtu: u32,
    /// Kernel FDB learning.
    pub learning: bool,
    /// Group based policy.
    pub gbp: bool,
    /// Transmit checksum offload; when false it is turned off whenever the agent
    /// creates the device or starts with it.
    pub tx_checksum_offload: bool,
}

/// The VXLAN device as it exists in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Interface index.
    pub index: u32,
    /// Its MAC address: the VTEP MAC peers program.
    pub mac: Mac,
}

/// The node's public interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// One address of the interface, of either family, with its prefix length (the
    /// L2 subnet); an interface with several addresses is several `Underlay`s.
    pub addr: IpNet,
    /// Interface MTU.
    pub mtu: u32,
}

/// A route Twill owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Destination: a peer's pod subnet.
    pub dst: IpNet,
    /// Next hop, of the destination's family.
    pub gateway: IpAddr,
    /// Output interface index.
    pub oif: u32,
}

/// The overlay entries in the kernel that Twill owns for one family: permanent
/// neighbours and FDB entries on that family's VXLAN device, and routes with protocol
/// `ROUTE_PROTOCOL`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Neighbour (ARP or NDP) entries: peer subnet network address → peer VTEP MAC.
    pub neighbours: BTreeMap<IpAddr, Mac>,
    /// FDB entries: peer VTEP MAC → peer public IP.
    pub fdb: BTreeMap<Mac, IpAddr>,
    /// Routes by destination.
    pub routes: BTreeMap<IpNet, Route>,
}

/// Everything the agent does to the kernel. Every operation works for both families;
/// the family of an entry is the family of its addresses.
#[async_trait::async_trait]
pub trait DataPlane: Send + Sync {
    /// Creates the VXLAN device, or reuses an existing one whose VNI, local address
    /// (`local` or `local6`), port and underlying device match (keeping its MAC); one
    /// that differs is deleted and recreated. Sets the MTU, brings it up and turns off
    /// IPv6 router advertisements.
    /// (`ip link add flannel.1 type vxlan id 1 local P dev eth0 dstport 8472 nolearning`,
    /// `ip link add flannel-v6.1 type vxlan id 1 local P6 dev eth0 dstport 8472
    /// nolearning`)
    async fn ensure_device(&self, spec: &VxlanSpec) -> Result<Device, DataPlaneError>;

    /// Turns the device's transmit checksum offload on or off
    /// (`ethtool -K flannel.1 tx-checksum-ip-generic off`).
    async fn set_tx_checksum_offload(&self, device: &str, on: bool) -> Result<(), DataPlaneError>;

    /// Deletes the VXLAN device (and with it every neighbour, FDB entry and route on
    /// it); an absent device is fine. (`ip link del NAME`)
    async fn delete_device(&self, name: &str) -> Result<(), DataPlaneError>;

    /// Makes `addr/32` (IPv4) or `addr/128` (IPv6) the only global address of its
    /// family on the device; IPv6 link-local addresses stay.
    /// (`ip addr replace 10.244.74.0/32 dev flannel.1`,
    /// `ip -6 addr replace fd00:10:244:4a::/128 dev flannel-v6.1`)
    async fn ensure_address(&self, dev: &Device, addr: IpAddr) -> Result<(), DataPlaneError>;

    /// Reads the entries of `family` Twill owns: the device's permanent neighbours and
    /// its FDB entries whose `dst` is of `family` (none without a device, as with
    /// host-gw), and every main-table route of `family` with Twill's protocol.
    /// (`ip -4|-6 neigh show dev DEV nud permanent`, `bridge fdb show dev DEV`,
    /// `ip -4|-6 route show table main proto 74`)
    async fn read_state(
        &self,
        dev: Option<&Device>,
        family: Family,
    ) -> Result<KernelState, DataPlaneError>;

    /// `ip neigh replace IP lladdr MAC dev flannel.1 nud permanent`
    /// (`ip -6 neigh replace IP6 lladdr MAC dev flannel-v6.1 nud permanent`)
    async fn add_neighbour(&self, dev: &Device, ip: IpAddr, mac: Mac)
        -> Result<(), DataPlaneError>;
    /// `ip neigh del IP dev flannel.1` (`ip -6 neigh del IP6 dev flannel-v6.1`)
    async fn del_neighbour(&self, dev: &Device, ip: IpAddr) -> Result<(), DataPlaneError>;
    /// `bridge fdb replace MAC dev flannel.1 dst IP self permanent`
    /// (`bridge fdb replace MAC dev flannel-v6.1 dst IP6 self permanent`)
    async fn add_fdb(&self, dev: &Device, mac: Mac, dst: IpAddr) -> Result<(), DataPlaneError>;
    /// `bridge fdb del MAC dev flannel.1 dst IP self`
    /// (`bridge fdb del MAC dev flannel-v6.1 dst IP6 self`)
    async fn del_fdb(&self, dev: &Device, mac: Mac, dst: IpAddr) -> Result<(), DataPlaneError>;
    /// `ip route replace DST via GW dev DEV onlink proto 74`
    /// (`ip -6 route replace DST6 via GW6 dev DEV onlink proto 74`)
    async fn add_route(&self, route: &Route) -> Result<(), DataPlaneError>;
    /// `ip route del DST via GW dev DEV proto 74`
    /// (`ip -6 route del DST6 via GW6 dev DEV proto 74`)
    async fn del_route(&self, route: &Route) -> Result<(), DataPlaneError>;

    /// Drops forwarded traffic between the pods of different networks; `networks` holds
    /// each joined network's pod networks (fewer than two: no rule).
    /// (`nft -f`: table `inet twill-isolation`,
    /// `ip saddr 10.10.0.0/16 ip daddr { 10.244.0.0/16 } drop`)
    async fn isolate(&self, networks: &[PerFamily<IpNet>]) -> Result<(), DataPlaneError>;
}
