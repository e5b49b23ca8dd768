//! `DataPlane` over rtnetlink: the one place that programs the kernel of the current
//! network namespace for the overlay (docs/compatibility.md, Kernel state).
//!
//! This module owns, for each address family, the VXLAN device (`flannel.<VNI>` with
//! an IPv4 `local`, `flannel-v6.<VNI>` with an IPv6 `local6`: create, reuse or
//! recreate, MTU, up, `accept_ra=0`), its single /32 or /128 address, the permanent
//! neighbour (ARP or NDP) and FDB entries on it, and the main-table routes of that
//! family stamped with protocol [`ROUTE_PROTOCOL`]. It also answers the read-only
//! questions the agent asks to pick its public interface: which addresses exist, which
//! interface holds the IPv4 or IPv6 default route, and which one a destination is
//! routed through. It never touches entries it does not own.
//!
//! Every operation names the `ip`/`bridge` command it equals (`ip -6 ...` for IPv6),
//! and errors carry that command, so an operator can check or repeat it by hand.
//!
//! Dumps are filtered by the kernel when it supports strict checking
//! (`NETLINK_GET_STRICT_CHK`, Linux >= 4.20), and always filtered again here, so the
//! results do not depend on the kernel doing it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteNextHop, RouteProtocol,
    RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use twill_common::model::{Mac, PerFamily};

use super::{
    DataPlane, DataPlaneError, Device, Family, KernelState, Route, Underlay, VxlanSpec,
    ROUTE_PROTOCOL,
};

/// errno values the kernel answers when the thing to delete is already gone.
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

/// The main routing table.
const MAIN: u8 = RouteHeader::RT_TABLE_MAIN;

/// A netlink connection to the kernel of the network namespace it was opened in.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

/// The errno of a netlink error answer, if the error is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// True when a delete failed only because there was nothing (left) to delete.
fn already_gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(ENOENT | ESRCH | ENODEV | EADDRNOTAVAIL))
}

fn netlink_err(op: String, source: rtnetlink::Error) -> DataPlaneError {
    DataPlaneError::Netlink { op, source }
}

fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// The `ip` invocation that changes entries of `family`, as an operator types it: IPv4
/// is `ip`'s default, IPv6 is spelt out.
fn ip_cmd(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip -6",
    }
}

/// The `ip` option of a dump restricted to `family`.
fn ip_flag(family: Family) -> &'static str {
    match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    }
}

fn unspecified(family: Family) -> IpAddr {
    match family {
        Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
        Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// IPv6 link-local (fe80::/10): the kernel gives every IPv6 interface one of its own,
/// it names no node beyond the link, and removing it would break neighbour discovery.
fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// The first of `$attrs` that matches `$pat` and for which `$out` is `Some`.
macro_rules! find_attr {
    ($attrs:expr, $pat:pat => $out:expr) => {
        $attrs.iter().find_map(|a| match a {
            $pat => $out,
            _ => None,
        })
    };
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    find_attr!(link.attributes, LinkAttribute::IfName(n) => Some(n.as_str()))
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    find_attr!(link.attributes, LinkAttribute::Mtu(m) => Some(*m))
}

fn mac_from(bytes: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(bytes).ok().map(Mac)
}

fn link_mac(link: &LinkMessage) -> Option<Mac> {
    find_attr!(link.attributes, LinkAttribute::Address(b) => mac_from(b))
}

fn link_infos(link: &LinkMessage) -> &[LinkInfo] {
    find_attr!(link.attributes, LinkAttribute::LinkInfo(infos) => Some(infos.as_slice()))
        .unwrap_or(&[])
}

/// The VXLAN settings of an existing link, as far as Twill cares.
#[derive(Debug, Default, PartialEq, Eq)]
struct VxlanSeen {
    vni: Option<u32>,
    local: Option<IpAddr>,
    port: Option<u16>,
    dev: Option<u32>,
    learning: Option<bool>,
    gbp: bool,
}

/// `None` when the link is not a VXLAN device.
fn vxlan_seen(link: &LinkMessage) -> Option<VxlanSeen> {
    let infos = link_infos(link);
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    let mut seen = VxlanSeen::default();
    for info in infos {
        let LinkInfo::Data(InfoData::Vxlan(attrs)) = info else {
            continue;
        };
        for a in attrs {
            match a {
                InfoVxlan::Id(v) => seen.vni = Some(*v),
                InfoVxlan::Local(v) => seen.local = Some((*v).into()),
                InfoVxlan::Local6(v) => seen.local = Some((*v).into()),
                InfoVxlan::Port(v) => seen.port = Some(*v),
                InfoVxlan::Link(v) => seen.dev = Some(*v),
                InfoVxlan::Learning(v) => seen.learning = Some(*v),
                InfoVxlan::Gbp => seen.gbp = true,
                _ => {}
            }
        }
    }
    Some(seen)
}

/// Why an existing link cannot be reused for `spec`, or `None` when it can. The VNI,
/// local address, port and underlying device must match (docs/compatibility.md, Kernel
/// state); so must
/// GBP, which the kernel cannot change on a live device.
fn incompatibility(link: &LinkMessage, spec: &VxlanSpec) -> Option<String> {
    let Some(seen) = vxlan_seen(link) else {
        return Some("it is not a vxlan device".into());
    };
    fn differs<T: Copy + PartialEq + std::fmt::Display>(
        what: &str,
        seen: Option<T>,
        want: T,
    ) -> Option<String> {
        let shown = || seen.map_or_else(|| "none".into(), |v| v.to_string());
        (seen != Some(want)).then(|| format!("{what} {} instead of {want}", shown()))
    }
    differs("id", seen.vni, spec.vni)
        .or_else(|| differs("local", seen.local, spec.local))
        .or_else(|| differs("dstport", seen.port, spec.port))
        .or_else(|| differs("underlying device index", seen.dev, spec.underlay_index))
        .or_else(|| differs("gbp", Some(seen.gbp), spec.gbp))
}

/// The table of a dumped route (`RTA_TABLE` wins over the 8-bit header field).
fn route_table(r: &RouteMessage) -> u32 {
    find_attr!(r.attributes, RouteAttribute::Table(t) => Some(*t))
        .unwrap_or(u32::from(r.header.table))
}

/// A route dump request of the main table for `family`; with strict checking the
/// kernel only answers routes of `protocol` (0: any).
fn route_dump(family: Family, protocol: u8) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = address_family(family);
    m.header.table = MAIN;
    m.header.protocol = RouteProtocol::from(protocol);
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unspec;
    m
}

/// `ip [-6] route replace DST via GW dev DEV onlink proto 74` as a message; `None`
/// when the gateway is not of the destination's family.
fn route_message(route: &Route) -> Option<RouteMessage> {
    fn finish<T>(builder: RouteMessageBuilder<T>, route: &Route) -> RouteMessage {
        builder
            .table_id(u32::from(MAIN))
            .output_interface(route.oif)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast)
            .onlink()
            .build()
    }
    match (route.dst, route.gateway) {
        (IpNet::V4(dst), IpAddr::V4(gw)) => Some(finish(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .gateway(gw),
            route,
        )),
        (IpNet::V6(dst), IpAddr::V6(gw)) => Some(finish(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .gateway(gw),
            route,
        )),
        _ => None,
    }
}

/// `ip [-6] route del DST via GW dev DEV proto 74` as a message: without `onlink`,
/// which the kernel does not match on when deleting.
fn route_del_message(route: &Route) -> Option<RouteMessage> {
    let mut m = route_message(route)?;
    m.header.flags = Default::default();
    Some(m)
}

/// A route whose gateway is not of its destination's family: no request is sent.
fn mixed_families(op: String) -> DataPlaneError {
    DataPlaneError::Invalid(format!(
        "{op}: the gateway is not of the destination's family"
    ))
}

fn neighbour_del_message(dev: &Device, ip: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = address_family(Family::of(ip));
    m.header.ifindex = dev.index;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    m
}

fn fdb_del_message(dev: &Device, mac: Mac, dst: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = dev.index;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    m
}

/// The address of a dumped address message (`IFA_LOCAL`, else `IFA_ADDRESS`: IPv6
/// addresses carry only the latter but on point-to-point links).
fn address_ip(a: &AddressMessage) -> Option<IpAddr> {
    find_attr!(a.attributes, AddressAttribute::Local(ip) => Some(*ip))
        .or_else(|| find_attr!(a.attributes, AddressAttribute::Address(ip) => Some(*ip)))
}

/// A dumped neighbour or FDB destination (`NDA_DST`); FDB dumps (AF_BRIDGE) carry it
/// as raw bytes, whose length tells the family.
fn neighbour_dst(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some((*ip).into()),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some((*ip).into()),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

fn neighbour_mac(n: &NeighbourMessage) -> Option<Mac> {
    find_attr!(n.attributes, NeighbourAttribute::LinkLayerAddress(b) => mac_from(b))
}

/// The output interface of a route: `RTA_OIF`, else the first next hop's.
fn route_oif(r: &RouteMessage) -> Option<u32> {
    let first_hop = |hops: &[RouteNextHop]| hops.first().map(|h| h.interface_index);
    find_attr!(r.attributes, RouteAttribute::Oif(i) => Some(*i))
        .or_else(|| find_attr!(r.attributes, RouteAttribute::MultiPath(hops) => first_hop(hops)))
}

fn route_metric(r: &RouteMessage) -> u32 {
    find_attr!(r.attributes, RouteAttribute::Priority(p) => Some(*p)).unwrap_or(0)
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime (must be called inside one).
    /// Asks the kernel for strict checking so dumps are filtered kernel-side; kernels
    /// older than 4.20 lack it and get a plain socket.
    pub fn new() -> Result<Netlink, DataPlaneError> {
        Self::with_strict_check(true)
    }

    /// Like [`Netlink::new`], choosing whether to ask for strict checking
    /// (`NETLINK_GET_STRICT_CHK`). Without it the kernel ignores most dump filters and
    /// answers every device's entries, which this module then filters itself: the
    /// results are the same, only slower on a busy host.
    pub fn with_strict_check(strict: bool) -> Result<Netlink, DataPlaneError> {
        let strict_conn = if strict {
            rtnetlink::new_connection_with_strict_check().ok()
        } else {
            None
        };
        let (connection, handle, _) = match strict_conn {
            Some(c) => c,
            None => rtnetlink::new_connection().map_err(DataPlaneError::Socket)?,
        };
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The name of interface `index` for messages (`ip link show` by index); falls back
    /// to `if<index>` when it cannot be read.
    async fn dev_name(&self, index: u32) -> String {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(link)) => link_name(&link)
                .map(str::to_string)
                .unwrap_or_else(|| format!("if{index}")),
            _ => format!("if{index}"),
        }
    }

    /// Maps a failed request to an error whose op is `op(device name)`; with
    /// `deleting`, "already gone" answers are success.
    async fn check<T: Default>(
        &self,
        result: Result<T, rtnetlink::Error>,
        index: u32,
        deleting: bool,
        op: impl FnOnce(&str) -> String,
    ) -> Result<T, DataPlaneError> {
        match result {
            Ok(t) => Ok(t),
            Err(e) if deleting && already_gone(&e) => Ok(T::default()),
            Err(e) => Err(netlink_err(op(&self.dev_name(index).await), e)),
        }
    }

    /// `ip link show NAME`; `None` when there is no such link.
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, DataPlaneError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(netlink_err(format!("ip link show {name}"), e)),
        }
    }

    /// `ip link del NAME`.
    async fn del_link(&self, link: &LinkMessage, name: &str) -> Result<(), DataPlaneError> {
        let result = self.handle.link().del(link.header.index).execute().await;
        self.check(result, link.header.index, true, |_| {
            format!("ip link del {name}")
        })
        .await
    }

    /// `ip link show`: every link.
    async fn links(&self) -> Result<Vec<LinkMessage>, DataPlaneError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_err("ip link show".into(), e))
    }

    /// `ip -4|-6 addr show [dev DEV]`: the address messages of `family`, of one link or
    /// all.
    async fn addresses(
        &self,
        index: Option<u32>,
        family: Family,
    ) -> Result<Vec<AddressMessage>, DataPlaneError> {
        let af = address_family(family);
        let mut req = self.handle.address().get();
        req.message_mut().header.family = af;
        if let Some(index) = index {
            // Kernel-side filter under strict checking; filtered here as well.
            req.message_mut().header.index = index;
            req = req.set_link_index_filter(index);
        }
        let addrs: Vec<AddressMessage> = req.execute().try_collect().await.map_err(|e| {
            let dev = index.map(|i| format!(" dev if{i}")).unwrap_or_default();
            netlink_err(format!("ip {} addr show{dev}", ip_flag(family)), e)
        })?;
        Ok(addrs
            .into_iter()
            .filter(|a| a.header.family == af)
            .collect())
    }

    /// `ip -4|-6 route show table main [proto P]`.
    async fn main_routes(
        &self,
        family: Family,
        protocol: u8,
    ) -> Result<Vec<RouteMessage>, DataPlaneError> {
        let af = address_family(family);
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(route_dump(family, protocol))
            .execute()
            .try_collect()
            .await
            .map_err(|e| {
                let proto = (protocol != 0).then(|| format!(" proto {protocol}"));
                let flag = ip_flag(family);
                let op = format!(
                    "ip {flag} route show table main{}",
                    proto.unwrap_or_default()
                );
                netlink_err(op, e)
            })?;
        Ok(routes
            .into_iter()
            .filter(|r| {
                r.header.address_family == af
                    && route_table(r) == u32::from(MAIN)
                    && (protocol == 0 || u8::from(r.header.protocol) == protocol)
            })
            .collect())
    }

    /// The permanent neighbours of `family` and the FDB entries with a `dst` of
    /// `family` on the VXLAN device.
    async fn read_device_entries(
        &self,
        dev: &Device,
        family: Family,
        state: &mut KernelState,
    ) -> Result<(), DataPlaneError> {
        let af = address_family(family);
        let mut req = self.handle.neighbours().get().set_address_family(af);
        // NDA_IFINDEX filters kernel-side with or without strict checking.
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::IfIndex(dev.index));
        let neighbours: Vec<NeighbourMessage> = self
            .check(
                req.execute().try_collect().await,
                dev.index,
                false,
                |name| format!("ip {} neigh show dev {name}", ip_flag(family)),
            )
            .await?;
        for n in neighbours {
            if n.header.ifindex != dev.index
                || n.header.family != af
                || n.header.state != NeighbourState::Permanent
            {
                continue;
            }
            if let (Some(ip), Some(mac)) = (neighbour_dst(&n), neighbour_mac(&n)) {
                state.neighbours.insert(ip, mac);
            }
        }

        let mut req = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge);
        // Under strict checking the kernel dumps only this device's FDB; otherwise it
        // dumps every device's and the filter below does the work.
        req.message_mut().header.ifindex = dev.index;
        let fdb: Vec<NeighbourMessage> = self
            .check(
                req.execute().try_collect().await,
                dev.index,
                false,
                |name| format!("bridge fdb show dev {name}"),
            )
            .await?;
        for n in fdb {
            if n.header.ifindex != dev.index || n.header.family != AddressFamily::Bridge {
                continue;
            }
            if let (Some(dst), Some(mac)) = (neighbour_dst(&n), neighbour_mac(&n)) {
                if mac.0 != [0; 6] && Family::of(dst) == family {
                    state.fdb.insert(mac, dst);
                }
            }
        }

        Ok(())
    }

    /// Every interface's addresses of both families, one entry per address (with its
    /// prefix length), in interface-index order; an interface's IPv4 addresses come
    /// first, then its IPv6 ones, each in the kernel's order, primary first. IPv6
    /// link-local addresses are left out: no peer can reach a node through one.
    /// Callers filter by family. (`ip -o addr show`)
    pub async fn interfaces(&self) -> Result<Vec<Underlay>, DataPlaneError> {
        let links = self.links().await?;
        let by_index: BTreeMap<u32, &LinkMessage> =
            links.iter().map(|l| (l.header.index, l)).collect();
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            for a in self.addresses(None, family).await? {
                let Some(link) = by_index.get(&a.header.index) else {
                    continue;
                };
                let (Some(ip), Some(name)) = (address_ip(&a), link_name(link)) else {
                    continue;
                };
                if is_link_local(ip) {
                    continue;
                }
                let Ok(addr) = IpNet::new(ip, a.header.prefix_len) else {
                    continue;
                };
                out.push(Underlay {
                    index: a.header.index,
                    name: name.to_string(),
                    addr,
                    mtu: link_mtu(link).unwrap_or(1500),
                });
            }
        }
        // Stable: each interface keeps IPv4 before IPv6 and the kernel's order within.
        out.sort_by_key(|u| u.index);
        Ok(out)
    }

    /// The interface of the IPv4 default route (main table, `0.0.0.0/0`; the lowest
    /// metric wins), with its first IPv4 address. (`ip -4 route show default`, then
    /// `ip -4 addr show dev DEV`)
    pub async fn default_route_interface(&self) -> Result<Underlay, DataPlaneError> {
        self.default_route_of(Family::V4).await
    }

    /// The interface of the IPv6 default route (main table, `::/0`; the lowest metric
    /// wins), with its first global IPv6 address. (`ip -6 route show default`, then
    /// `ip -6 addr show dev DEV scope global`)
    pub async fn default_route_interface_v6(&self) -> Result<Underlay, DataPlaneError> {
        self.default_route_of(Family::V6).await
    }

    /// The interface of the default route of `family`, as the two above.
    pub async fn default_route_of(&self, family: Family) -> Result<Underlay, DataPlaneError> {
        let public_flag = match family {
            Family::V4 => "--public-ip",
            Family::V6 => "--public-ipv6",
        };
        let oif = self
            .main_routes(family, 0)
            .await?
            .iter()
            .filter(|r| {
                r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast
            })
            .filter_map(|r| route_oif(r).map(|oif| (route_metric(r), oif)))
            .min()
            .map(|(_, oif)| oif)
            .ok_or_else(|| {
                DataPlaneError::NotFound(format!(
                    "no {family} default route: pass --iface or {public_flag}"
                ))
            })?;
        let found = self
            .interfaces()
            .await?
            .into_iter()
            .find(|u| u.index == oif && Family::of_net(u.addr) == family);
        match found {
            Some(u) => Ok(u),
            None => Err(DataPlaneError::NotFound(format!(
                "the {family} default route's interface {} has no {family} address: pass --iface or {public_flag}",
                self.dev_name(oif).await
            ))),
        }
    }

    /// The index of the interface the kernel would send a packet to `addr` through,
    /// for `--iface-can-reach`. (`ip route get ADDR`, `ip -6 route get ADDR6`)
    pub async fn route_interface(&self, addr: IpAddr) -> Result<u32, DataPlaneError> {
        let family = Family::of(addr);
        // A route lookup, not a dump: the header must stay zero but for the family
        // and a host destination (strict checking rejects anything else).
        let mut m = RouteMessage::default();
        m.header.address_family = address_family(family);
        m.header.destination_prefix_length = family.host_prefix_len();
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        let op = || format!("{} route get {addr}", ip_cmd(family));
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(m)
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_err(op(), e))?;
        routes.iter().find_map(route_oif).ok_or_else(|| {
            DataPlaneError::NotFound(format!("{}: the kernel names no output interface", op()))
        })
    }

    /// The MTU of interface `index`. (`ip link show dev DEV`)
    pub async fn link_mtu(&self, index: u32) -> Result<u32, DataPlaneError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(|e| netlink_err(format!("ip link show dev if{index}"), e))?
            .ok_or_else(|| DataPlaneError::NotFound(format!("no interface with index {index}")))?;
        link_mtu(&link)
            .ok_or_else(|| DataPlaneError::NotFound(format!("interface {index} reports no MTU")))
    }

    /// Deletes a dumped address of the device. (`ip [-6] addr del ADDR/LEN dev DEV`)
    async fn del_address(
        &self,
        dev: &Device,
        family: Family,
        a: AddressMessage,
    ) -> Result<(), DataPlaneError> {
        let shown = match address_ip(&a) {
            Some(ip) => format!("{ip}/{}", a.header.prefix_len),
            None => "?".into(),
        };
        let mut del = AddressMessage::default();
        del.header = a.header.clone();
        del.attributes = a
            .attributes
            .into_iter()
            .filter(|attr| {
                matches!(
                    attr,
                    AddressAttribute::Local(_) | AddressAttribute::Address(_)
                )
            })
            .collect();
        let result = self.handle.address().del(del).execute().await;
        self.check(result, dev.index, true, |name| {
            format!("{} addr del {shown} dev {name}", ip_cmd(family))
        })
        .await
    }

    /// `ip link add NAME type vxlan id VNI local IP dev DEV dstport PORT [no]learning
    /// [gbp]`; an IPv6 `local` (netlink `local6`) makes an IPv6 tunnel.
    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), DataPlaneError> {
        let builder = LinkVxlan::new(&spec.name, spec.vni).dev(spec.underlay_index);
        let builder = match spec.local {
            IpAddr::V4(ip) => builder.local(ip),
            IpAddr::V6(ip) => builder.local6(ip),
        };
        let mut builder = builder
            .port(spec.port)
            .learning(spec.learning)
            .mtu(spec.mtu);
        if spec.gbp {
            builder = builder.gbp();
        }
        let result = self.handle.link().add(builder.build()).execute().await;
        self.check(result, spec.underlay_index, false, |dev| {
            format!(
                "ip link add {} type vxlan id {} local {} dev {dev} dstport {}{}{}",
                spec.name,
                spec.vni,
                spec.local,
                spec.port,
                if spec.learning {
                    " learning"
                } else {
                    " nolearning"
                },
                if spec.gbp { " gbp" } else { "" }
            )
        })
        .await
    }

    /// Turns off IPv6 router advertisements on the device, as flannel does
    /// (`sysctl -w net.ipv6.conf.NAME.accept_ra=0`). Absent IPv6 is fine. This is a
    /// blocking write to procfs on purpose: /proc/sys/net resolves to the network
    /// namespace of the writing thread, which must be this one.
    fn disable_accept_ra(name: &str) {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/accept_ra");
        match std::fs::write(&path, "0") {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "cannot disable IPv6 router advertisements")
            }
        }
    }
}

#[async_trait::async_trait]
impl DataPlane for Netlink {
    /// `ip link add flannel.1 type vxlan id 1 local P dev eth0 dstport 8472 nolearning`
    /// (or reuse), `ip link set flannel.1 mtu M up`, `sysctl ...accept_ra=0`.
    async fn ensure_device(&self, spec: &VxlanSpec) -> Result<Device, DataPlaneError> {
        let link = match self.link_by_name(&spec.name).await? {
            Some(link) => match incompatibility(&link, spec) {
                None => Some(link),
                Some(why) => {
                    tracing::warn!(device = %spec.name, reason = %why, "existing device does not match the backend config; recreating it (its MAC changes)");
                    self.del_link(&link, &spec.name).await?;
                    None
                }
            },
            None => None,
        };
        let link = match link {
            Some(link) => {
                let learning = vxlan_seen(&link).and_then(|s| s.learning);
                if learning != Some(spec.learning) {
                    // Learning is one of the few VXLAN settings the kernel changes live.
                    let msg = LinkVxlan::new(&spec.name, spec.vni)
                        .index(link.header.index)
                        .learning(spec.learning)
                        .build();
                    let result = self.handle.link().change(msg).execute().await;
                    self.check(result, link.header.index, false, |_| {
                        format!(
                            "ip link set {} type vxlan {}learning",
                            spec.name,
                            if spec.learning { "" } else { "no" }
                        )
                    })
                    .await?;
                }
                link
            }
            None => {
                self.create_vxlan(spec).await?;
                self.link_by_name(&spec.name).await?.ok_or_else(|| {
                    DataPlaneError::NotFound(format!(
                        "{} vanished right after it was created",
                        spec.name
                    ))
                })?
            }
        };
        let index = link.header.index;
        if link_mtu(&link) != Some(spec.mtu) || !link.header.flags.contains(LinkFlags::Up) {
            let msg = LinkUnspec::new_with_index(index).mtu(spec.mtu).up().build();
            let result = self.handle.link().change(msg).execute().await;
            self.check(result, index, false, |_| {
                format!("ip link set {} mtu {} up", spec.name, spec.mtu)
            })
            .await?;
        }
        Self::disable_accept_ra(&spec.name);
        let mac = link_mac(&link)
            .ok_or_else(|| DataPlaneError::NotFound(format!("{} has no MAC address", spec.name)))?;
        Ok(Device { index, mac })
    }

    async fn set_tx_checksum_offload(&self, device: &str, on: bool) -> Result<(), DataPlaneError> {
        super::ethtool::set_tx_checksum(device, on).await
    }

    async fn delete_device(&self, name: &str) -> Result<(), DataPlaneError> {
        match self.link_by_name(name).await? {
            Some(link) => self.del_link(&link, name).await,
            None => Ok(()),
        }
    }

    /// `ip addr replace ADDR/32 dev flannel.1` and `ip addr del OTHER dev flannel.1`
    /// for every other IPv4 address; for IPv6 `ip -6 addr replace ADDR6/128 dev
    /// flannel-v6.1` and `ip -6 addr del OTHER6 dev flannel-v6.1` for every other
    /// IPv6 address but the link-local ones.
    async fn ensure_address(&self, dev: &Device, addr: IpAddr) -> Result<(), DataPlaneError> {
        let family = Family::of(addr);
        let plen = family.host_prefix_len();
        let current = self.addresses(Some(dev.index), family).await?;
        let present = current
            .iter()
            .any(|a| a.header.prefix_len == plen && address_ip(a) == Some(addr));
        let (first, later): (Vec<_>, Vec<_>) = current
            .into_iter()
            .filter(|a| {
                let ip = address_ip(a);
                let wanted = a.header.prefix_len == plen && ip == Some(addr);
                !wanted && !ip.is_some_and(is_link_local)
            })
            // IPv6 knows an address by the address alone: `replace` would keep the old
            // prefix length, and deleting that entry afterwards would delete the
            // address. So the same address with another prefix goes first. IPv4 keeps
            // both, so there the old entries go only once the new one is in place.
            .partition(|a| family == Family::V6 && address_ip(a) == Some(addr));
        for a in first {
            self.del_address(dev, family, a).await?;
        }
        if !present {
            let result = self
                .handle
                .address()
                .add(dev.index, addr, plen)
                .replace()
                .execute()
                .await;
            self.check(result, dev.index, false, |name| {
                format!("{} addr replace {addr}/{plen} dev {name}", ip_cmd(family))
            })
            .await?;
        }
        for a in later {
            self.del_address(dev, family, a).await?;
        }
        Ok(())
    }

    /// `ip -4 neigh show dev flannel.1 nud permanent` (`ip -6 neigh show dev
    /// flannel-v6.1 nud permanent`), `bridge fdb show dev DEV` (entries with a `dst` of
    /// the family; both skipped without a device), `ip -4|-6 route show table main
    /// proto 74`.
    async fn read_state(
        &self,
        dev: Option<&Device>,
        family: Family,
    ) -> Result<KernelState, DataPlaneError> {
        let mut state = KernelState::default();
        if let Some(dev) = dev {
            self.read_device_entries(dev, family, &mut state).await?;
        }
        for r in self.main_routes(family, ROUTE_PROTOCOL).await? {
            let (mut dst, mut gateway) = (unspecified(family), unspecified(family));
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(i)) => dst = (*i).into(),
                    RouteAttribute::Destination(RouteAddress::Inet6(i)) => dst = (*i).into(),
                    RouteAttribute::Gateway(RouteAddress::Inet(i)) => gateway = (*i).into(),
                    RouteAttribute::Gateway(RouteAddress::Inet6(i)) => gateway = (*i).into(),
                    _ => {}
                }
            }
            let Ok(dst) = IpNet::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            let oif = route_oif(&r).unwrap_or(0);
            state.routes.insert(dst, Route { dst, gateway, oif });
        }
        Ok(state)
    }

    /// `ip neigh replace IP lladdr MAC dev flannel.1 nud permanent`
    /// (`ip -6 neigh replace IP6 lladdr MAC dev flannel-v6.1 nud permanent`)
    async fn add_neighbour(
        &self,
        dev: &Device,
        ip: IpAddr,
        mac: Mac,
    ) -> Result<(), DataPlaneError> {
        let result = self
            .handle
            .neighbours()
            .add(dev.index, ip)
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await;
        self.check(result, dev.index, false, |name| {
            format!(
                "{} neigh replace {ip} lladdr {mac} dev {name} nud permanent",
                ip_cmd(Family::of(ip))
            )
        })
        .await
    }

    /// `ip neigh del IP dev flannel.1` (`ip -6 neigh del IP6 dev flannel-v6.1`)
    async fn del_neighbour(&self, dev: &Device, ip: IpAddr) -> Result<(), DataPlaneError> {
        let result = self
            .handle
            .neighbours()
            .del(neighbour_del_message(dev, ip))
            .execute()
            .await;
        self.check(result, dev.index, true, |name| {
            format!("{} neigh del {ip} dev {name}", ip_cmd(Family::of(ip)))
        })
        .await
    }

    /// `bridge fdb replace MAC dev flannel.1 dst IP self permanent`
    /// (`bridge fdb replace MAC dev flannel-v6.1 dst IP6 self permanent`)
    async fn add_fdb(&self, dev: &Device, mac: Mac, dst: IpAddr) -> Result<(), DataPlaneError> {
        let result = self
            .handle
            .neighbours()
            .add_bridge(dev.index, &mac.0)
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await;
        self.check(result, dev.index, false, |name| {
            format!("bridge fdb replace {mac} dev {name} dst {dst} self permanent")
        })
        .await
    }

    /// `bridge fdb del MAC dev flannel.1 dst IP self`
    /// (`bridge fdb del MAC dev flannel-v6.1 dst IP6 self`)
    async fn del_fdb(&self, dev: &Device, mac: Mac, dst: IpAddr) -> Result<(), DataPlaneError> {
        let result = self
            .handle
            .neighbours()
            .del(fdb_del_message(dev, mac, dst))
            .execute()
            .await;
        self.check(result, dev.index, true, |name| {
            format!("bridge fdb del {mac} dev {name} dst {dst} self")
        })
        .await
    }

    /// `ip route replace DST via GW dev DEV onlink proto 74` (`ip -6 route replace
    /// DST6 via GW6 dev DEV onlink proto 74`; main table, scope global)
    async fn add_route(&self, route: &Route) -> Result<(), DataPlaneError> {
        let op = |name: &str| {
            format!(
                "{} route replace {} via {} dev {name} onlink proto {ROUTE_PROTOCOL}",
                ip_cmd(Family::of_net(route.dst)),
                route.dst,
                route.gateway
            )
        };
        let Some(message) = route_message(route) else {
            return Err(mixed_families(op(&self.dev_name(route.oif).await)));
        };
        let result = self.handle.route().add(message).replace().execute().await;
        self.check(result, route.oif, false, op).await
    }

    /// `ip route del DST via GW dev DEV proto 74` (`ip -6 route del DST6 via GW6 dev
    /// DEV proto 74`)
    async fn del_route(&self, route: &Route) -> Result<(), DataPlaneError> {
        let op = |name: &str| {
            format!(
                "{} route del {} via {} dev {name} proto {ROUTE_PROTOCOL}",
                ip_cmd(Family::of_net(route.dst)),
                route.dst,
                route.gateway
            )
        };
        let Some(message) = route_del_message(route) else {
            return Err(mixed_families(op(&self.dev_name(route.oif).await)));
        };
        let result = self.handle.route().del(message).execute().await;
        self.check(result, route.oif, true, op).await
    }

    async fn isolate(&self, networks: &[PerFamily<IpNet>]) -> Result<(), DataPlaneError> {
        super::isolation::apply(networks).await
    }
}
