//! `DataPlane` over rtnetlink: the VXLAN device, its address, permanent neighbours,
//! FDB entries and routes (REFERENCE.md 1.4), plus the interface discovery the agent
//! needs to pick its public address. Every request here names the `ip`/`bridge`
//! command it equals, so an operator can check or repeat it by hand.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use twill_common::lease::Mac;

use super::{DataPlane, DataPlaneError, Device, KernelState, Route, Underlay, VxlanSpec, ROUTE_PROTOCOL};

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

/// A netlink connection to the kernel of the current network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

fn op_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataPlaneError {
    let op = op.into();
    move |source| DataPlaneError::Netlink { op, source }
}

/// The errno of a netlink error answer, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Deleting something already gone is success: deletes must be idempotent.
fn gone_ok(r: Result<(), rtnetlink::Error>, op: String) -> Result<(), DataPlaneError> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | ENODEV | EADDRNOTAVAIL)) => Ok(()),
        other => other.map_err(op_err(op)),
    }
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500)
}

fn link_mac(link: &LinkMessage) -> Option<Mac> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac),
        _ => None,
    })
}

fn vxlan_info(link: &LinkMessage) -> Option<&Vec<InfoVxlan>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v),
            _ => None,
        }),
        _ => None,
    })
}

/// True when an existing vxlan link has the VNI, local address, port and underlying
/// device of `spec`: then it is reused and keeps its MAC.
fn matches_spec(link: &LinkMessage, spec: &VxlanSpec) -> bool {
    let Some(info) = vxlan_info(link) else {
        return false;
    };
    let (mut id, mut local, mut port, mut dev) = (None, None, None, None);
    for i in info {
        match i {
            InfoVxlan::Id(v) => id = Some(*v),
            InfoVxlan::Local(v) => local = Some(*v),
            InfoVxlan::Port(v) => port = Some(*v),
            InfoVxlan::Link(v) => dev = Some(*v),
            _ => {}
        }
    }
    id == Some(spec.vni) && local == Some(spec.local) && port == Some(spec.port) && dev == Some(spec.underlay_index)
}

fn mac_from(bytes: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(bytes).ok().map(Mac)
}

impl Netlink {
    /// Opens a netlink socket; its connection task runs on the current tokio runtime.
    pub fn new() -> Result<Self, DataPlaneError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(DataPlaneError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// `ip link show NAME`; `None` when there is no such link.
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, DataPlaneError> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(op_err(format!("ip link show {name}"))(e)),
        }
    }

    /// Every interface's IPv4 addresses, one entry per address, in interface order
    /// (`ip -4 addr show`).
    pub async fn interfaces(&self) -> Result<Vec<Underlay>, DataPlaneError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(op_err("ip link show"))?;
        let by_index: BTreeMap<u32, &LinkMessage> = links.iter().map(|l| (l.header.index, l)).collect();
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(op_err("ip -4 addr show"))?;
        let mut out = Vec::new();
        for a in addrs {
            let Some(link) = by_index.get(&a.header.index) else { continue };
            let ip = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
            let (Some(ip), Some(name)) = (ip, link_name(link)) else { continue };
            let Ok(addr) = Ipv4Net::new(ip, a.header.prefix_len) else { continue };
            out.push(Underlay {
                index: a.header.index,
                name: name.to_string(),
                addr,
                mtu: link_mtu(link),
            });
        }
        out.sort_by_key(|u| u.index);
        Ok(out)
    }

    /// The interface of the IPv4 default route in the main table, with its first IPv4
    /// address (`ip -4 route show default`).
    pub async fn default_route_interface(&self) -> Result<Underlay, DataPlaneError> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(op_err("ip -4 route show default"))?;
        let oif = routes
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0 && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            })
            .ok_or_else(|| DataPlaneError::NotFound("no IPv4 default route: pass --iface or --public-ip".into()))?;
        self.interfaces()
            .await?
            .into_iter()
            .find(|u| u.index == oif)
            .ok_or_else(|| {
                DataPlaneError::NotFound(format!(
                    "the default route's interface (index {oif}) has no IPv4 address: pass --iface or --public-ip"
                ))
            })
    }

    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), DataPlaneError> {
        let mut builder = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.underlay_index)
            .local(spec.local)
            .port(spec.port)
            .learning(spec.learning)
            .mtu(spec.mtu)
            .up();
        if spec.gbp {
            builder = builder.gbp();
        }
        self.handle.link().add(builder.build()).execute().await.map_err(op_err(format!(
            "ip link add {} type vxlan id {} local {} dev #{} dstport {}{}",
            spec.name,
            spec.vni,
            spec.local,
            spec.underlay_index,
            spec.port,
            if spec.learning { "" } else { " nolearning" }
        )))
    }
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_message(route: &Route) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix_len())
        .gateway(route.gateway)
        .output_interface(route.oif)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .scope(RouteScope::Universe)
        .onlink()
        .build()
}

fn neighbour_message(dev: &Device, ip: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = dev.index;
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m
}

fn fdb_message(dev: &Device, mac: Mac, dst: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = dev.index;
    m.header.flags = NeighbourFlags::Own;
    m.header.state = NeighbourState::Permanent;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    m
}

#[async_trait::async_trait]
impl DataPlane for Netlink {
    async fn ensure_device(&self, spec: &VxlanSpec) -> Result<Device, DataPlaneError> {
        match self.link_by_name(&spec.name).await? {
            Some(link) if matches_spec(&link, spec) => {
                let index = link.header.index;
                if link_mtu(&link) != spec.mtu || !link.header.flags.contains(rtnetlink::packet_route::link::LinkFlags::Up) {
                    self.handle
                        .link()
                        .set(LinkUnspec::new_with_index(index).mtu(spec.mtu).up().build())
                        .execute()
                        .await
                        .map_err(op_err(format!("ip link set {} mtu {} up", spec.name, spec.mtu)))?;
                }
            }
            Some(link) => {
                tracing::warn!(device = %spec.name, "existing device has other VXLAN settings; recreating it");
                gone_ok(
                    self.handle.link().del(link.header.index).execute().await,
                    format!("ip link del {}", spec.name),
                )?;
                self.create_vxlan(spec).await?;
            }
            None => self.create_vxlan(spec).await?,
        }
        let link = self
            .link_by_name(&spec.name)
            .await?
            .ok_or_else(|| DataPlaneError::NotFound(format!("{} vanished right after it was created", spec.name)))?;
        let mac = link_mac(&link)
            .ok_or_else(|| DataPlaneError::NotFound(format!("{} has no MAC address", spec.name)))?;
        // flannel turns off router advertisements on the device; no IPv6 is fine.
        let accept_ra = format!("/proc/sys/net/ipv6/conf/{}/accept_ra", spec.name);
        if std::path::Path::new(&accept_ra).exists() {
            let _ = std::fs::write(&accept_ra, "0");
        }
        Ok(Device {
            index: link.header.index,
            mac,
        })
    }

    async fn ensure_address(&self, dev: &Device, addr: Ipv4Addr) -> Result<(), DataPlaneError> {
        let current: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(dev.index)
            .execute()
            .try_collect()
            .await
            .map_err(op_err(format!("ip -4 addr show dev #{}", dev.index)))?;
        let mut present = false;
        for a in current {
            if a.header.family != AddressFamily::Inet {
                continue;
            }
            let ip = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if ip == Some(addr) && a.header.prefix_len == 32 {
                present = true;
                continue;
            }
            let shown = ip.map(|i| format!("{i}/{}", a.header.prefix_len)).unwrap_or_default();
            gone_ok(
                self.handle.address().del(a).execute().await,
                format!("ip addr del {shown} dev #{}", dev.index),
            )?;
        }
        if !present {
            self.handle
                .address()
                .add(dev.index, IpAddr::V4(addr), 32)
                .replace()
                .execute()
                .await
                .map_err(op_err(format!("ip addr replace {addr}/32 dev #{}", dev.index)))?;
        }
        Ok(())
    }

    async fn read_state(&self, dev: &Device) -> Result<KernelState, DataPlaneError> {
        let mut state = KernelState::default();
        let neighbours: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(op_err("ip -4 neigh show"))?;
        for n in neighbours {
            if n.header.ifindex != dev.index || n.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
                    NeighbourAttribute::LinkLayerAddress(b) => mac = mac_from(b),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                state.neighbours.insert(ip, mac);
            }
        }
        let fdb: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(op_err("bridge fdb show"))?;
        for n in fdb {
            if n.header.ifindex != dev.index {
                continue;
            }
            let mut dst = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    // In an AF_BRIDGE dump the kernel's NDA_DST arrives as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => dst = Some(*i),
                    NeighbourAttribute::LinkLayerAddress(b) => mac = mac_from(b),
                    _ => {}
                }
            }
            if let (Some(dst), Some(mac)) = (dst, mac) {
                if mac.0 != [0; 6] {
                    state.fdb.insert(mac, dst);
                }
            }
        }
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(op_err("ip -4 route show"))?;
        for r in routes {
            if u8::from(r.header.protocol) != ROUTE_PROTOCOL || route_table(&r) != u32::from(RouteHeader::RT_TABLE_MAIN)
            {
                continue;
            }
            let (mut dst, mut gateway, mut oif) = (None, None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(i)) => dst = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(i)) => gateway = Some(*i),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let (Some(dst), Some(gateway), Some(oif)) = (dst, gateway, oif) else { continue };
            let Ok(dst) = Ipv4Net::new(dst, r.header.destination_prefix_length) else { continue };
            state.routes.insert(dst, Route { dst, gateway, oif });
        }
        Ok(state)
    }

    async fn add_neighbour(&self, dev: &Device, ip: Ipv4Addr, mac: Mac) -> Result<(), DataPlaneError> {
        self.handle
            .neighbours()
            .add(dev.index, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(op_err(format!("ip neigh replace {ip} lladdr {mac} dev #{} nud permanent", dev.index)))
    }

    async fn del_neighbour(&self, dev: &Device, ip: Ipv4Addr) -> Result<(), DataPlaneError> {
        gone_ok(
            self.handle.neighbours().del(neighbour_message(dev, ip)).execute().await,
            format!("ip neigh del {ip} dev #{}", dev.index),
        )
    }

    async fn add_fdb(&self, dev: &Device, mac: Mac, dst: Ipv4Addr) -> Result<(), DataPlaneError> {
        self.handle
            .neighbours()
            .add_bridge(dev.index, &mac.0)
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(op_err(format!("bridge fdb replace {mac} dev #{} dst {dst} self permanent", dev.index)))
    }

    async fn del_fdb(&self, dev: &Device, mac: Mac, dst: Ipv4Addr) -> Result<(), DataPlaneError> {
        gone_ok(
            self.handle.neighbours().del(fdb_message(dev, mac, dst)).execute().await,
            format!("bridge fdb del {mac} dev #{} dst {dst} self", dev.index),
        )
    }

    async fn add_route(&self, route: &Route) -> Result<(), DataPlaneError> {
        self.handle
            .route()
            .add(route_message(route))
            .replace()
            .execute()
            .await
            .map_err(op_err(format!(
                "ip route replace {} via {} dev #{} onlink proto {ROUTE_PROTOCOL}",
                route.dst, route.gateway, route.oif
            )))
    }

    async fn del_route(&self, route: &Route) -> Result<(), DataPlaneError> {
        gone_ok(
            self.handle.route().del(route_message(route)).execute().await,
            format!("ip route del {} via {} dev #{} proto {ROUTE_PROTOCOL}", route.dst, route.gateway, route.oif),
        )
    }
}
