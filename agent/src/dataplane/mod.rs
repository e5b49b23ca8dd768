//! The agent's data plane: the only code that touches the kernel.
//!
//! `DataPlane` is the seam: `netlink::Netlink` programs the real kernel through
//! rtnetlink, and the reconciler (`crate::reconcile`) only speaks this trait, so its
//! logic is unit-tested against an in-memory implementation.
//! Each operation's doc names the `ip`/`bridge` command it equals.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use thiserror::Error;
use twill_common::lease::Mac;

pub mod masq;
pub mod netlink;

/// Route protocol number stamped on every route Twill writes (`ip route ... proto 74`),
/// so ownership is explicit and routes of others are never touched.
pub const ROUTE_PROTOCOL: u8 = 74;

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
}

/// The VXLAN device to create or reuse (docs/compatibility.md, Kernel state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name, `flannel.<VNI>`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Local tunnel address: the node's public IP.
    pub local: Ipv4Addr,
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
    /// The chosen IPv4 address with its prefix length (the L2 subnet).
    pub addr: Ipv4Net,
    /// Interface MTU.
    pub mtu: u32,
}

/// A route Twill owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// Destination: a peer's pod subnet.
    pub dst: Ipv4Net,
    /// Next hop.
    pub gateway: Ipv4Addr,
    /// Output interface index.
    pub oif: u32,
}

/// The overlay entries in the kernel that Twill owns: permanent neighbours and FDB
/// entries on the VXLAN device, and routes with protocol `ROUTE_PROTOCOL`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Neighbour (ARP) entries: peer subnet network address → peer VTEP MAC.
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
    /// FDB entries: peer VTEP MAC → peer public IP.
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
    /// Routes by destination.
    pub routes: BTreeMap<Ipv4Net, Route>,
}

/// Everything the agent does to the kernel.
#[async_trait::async_trait]
pub trait DataPlane: Send + Sync {
    /// Creates the VXLAN device, or reuses an existing one whose VNI, local address,
    /// port and underlying device match (keeping its MAC); one that differs is deleted
    /// and recreated. Sets the MTU and brings it up.
    /// (`ip link add flannel.1 type vxlan id 1 local P dev eth0 dstport 8472 nolearning`)
    async fn ensure_device(&self, spec: &VxlanSpec) -> Result<Device, DataPlaneError>;

    /// Makes `addr/32` the only IPv4 address of the device.
    /// (`ip addr replace 10.244.74.0/32 dev flannel.1`)
    async fn ensure_address(&self, dev: &Device, addr: Ipv4Addr) -> Result<(), DataPlaneError>;

    /// Reads the entries Twill owns: the device's neighbours and FDB entries (none
    /// without a device, as with host-gw) and every route with Twill's protocol.
    async fn read_state(&self, dev: Option<&Device>) -> Result<KernelState, DataPlaneError>;

    /// `ip neigh replace IP lladdr MAC dev flannel.1 nud permanent`
    async fn add_neighbour(
        &self,
        dev: &Device,
        ip: Ipv4Addr,
        mac: Mac,
    ) -> Result<(), DataPlaneError>;
    /// `ip neigh del IP dev flannel.1`
    async fn del_neighbour(&self, dev: &Device, ip: Ipv4Addr) -> Result<(), DataPlaneError>;
    /// `bridge fdb replace MAC dev flannel.1 dst IP self permanent`
    async fn add_fdb(&self, dev: &Device, mac: Mac, dst: Ipv4Addr) -> Result<(), DataPlaneError>;
    /// `bridge fdb del MAC dev flannel.1 dst IP self`
    async fn del_fdb(&self, dev: &Device, mac: Mac, dst: Ipv4Addr) -> Result<(), DataPlaneError>;
    /// `ip route replace DST via GW dev DEV onlink proto 74`
    async fn add_route(&self, route: &Route) -> Result<(), DataPlaneError>;
    /// `ip route del DST via GW dev DEV proto 74`
    async fn del_route(&self, route: &Route) -> Result<(), DataPlaneError>;
}
