//! Printing what the admin API returns: kubectl-style `table` / `wide`, and `json` /
//! `yaml` with stable snake_case keys (the `*Doc` structs below are that interface).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use twill_common::networks::DEFAULT_NETWORK;
use twill_common::unix_secs;
use twill_proto::lease_event::Type as EventType;
use twill_proto::{
    BootstrapToken, ConnectedAgent, GetConfigResponse, IssuedCertificate, Lease,
    ListLeasesResponse, NetworkInfo, PodAddressFinding, PodAddressUsage, PodAttachment, Replica,
    Reservation, StatusResponse, WatchResponse,
};

/// Output formats of `-o/--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, e.g. NODE, SUBNET, PUBLIC-IP, VTEP-MAC, EXPIRES-IN, RESERVED.
    Table,
    /// The table plus more columns (for leases: VNI and REVISION).
    Wide,
    /// JSON with stable snake_case keys (`watch`: one object per line).
    Json,
    /// The same documents as YAML (`watch`: one document per event).
    Yaml,
}

/// One lease as printed by `-o json` / `-o yaml`. The field names are a stable interface.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeaseDoc {
    /// Node holding the lease.
    pub node_name: String,
    /// The network the lease is in (`default` for the controller's --net-conf).
    pub network: String,
    /// Pod subnet, CIDR.
    pub subnet: String,
    /// Public (underlay) IPv4 address.
    pub public_ip: String,
    /// MAC of the node's VXLAN device.
    pub vtep_mac: String,
    /// Backend type, e.g. "vxlan".
    pub backend_type: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Revision of the lease's last change.
    pub revision: u64,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at_unix: i64,
    /// Expiry, RFC 3339 UTC.
    pub expires_at: String,
    /// The subnet is reserved for this node.
    pub reserved: bool,
    /// IPv6 pod subnet (dual-stack networks only; absent otherwise).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ipv6_subnet: String,
    /// Public IPv6 address (dual-stack networks only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub public_ipv6: String,
    /// MAC of the node's IPv6 VXLAN device (dual-stack VXLAN networks only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub vtep_mac_v6: String,
}

/// The document printed by `-o json` / `-o yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeasesDoc {
    /// The lease table's revision when the list was taken.
    pub revision: u64,
    /// Leases ordered by node name.
    pub leases: Vec<LeaseDoc>,
}

impl From<&Lease> for LeaseDoc {
    fn from(l: &Lease) -> Self {
        LeaseDoc {
            node_name: l.node_name.clone(),
            network: network_name(&l.network),
            subnet: l.subnet.clone(),
            public_ip: l.public_ip.clone(),
            vtep_mac: l.vtep_mac.clone(),
            backend_type: l.backend_type.clone(),
            vni: l.vni,
            revision: l.revision,
            expires_at_unix: l.expires_at_unix,
            expires_at: unix_to_rfc3339(l.expires_at_unix),
            reserved: l.reserved,
            ipv6_subnet: l.ipv6_subnet.clone(),
            public_ipv6: l.public_ipv6.clone(),
            vtep_mac_v6: l.vtep_mac_v6.clone(),
        }
    }
}

/// A network's name from its wire form, where empty means `default`.
fn network_name(wire: &str) -> String {
    if wire.is_empty() {
        DEFAULT_NETWORK
    } else {
        wire
    }
    .to_string()
}

/// ` in network NAME` for the confirmations of `lease revoke`, `reserve` and
/// `unreserve`; nothing for `default`, whose confirmations read as they always did.
fn in_network(wire: &str) -> String {
    if wire.is_empty() || wire == DEFAULT_NETWORK {
        String::new()
    } else {
        format!(" in network {wire}")
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A timestamp column: RFC 3339, or `<none>` when unknown.
fn rfc3339_or_none(secs: i64) -> String {
    or_none(&unix_to_rfc3339(secs))
}

fn unix_to_rfc3339(secs: i64) -> String {
    match u64::try_from(secs).ok().filter(|s| *s > 0) {
        Some(s) => twill_pki::rfc3339(UNIX_EPOCH + Duration::from_secs(s)),
        None => String::new(),
    }
}

/// Renders the response in `format`; `now` is the reference for EXPIRES-IN.
/// Returns an empty string for an empty table in `table`/`wide` form (the caller says
/// "No leases found." on stderr, as kubectl does).
pub fn render_leases(resp: &ListLeasesResponse, format: Format, now: SystemTime) -> String {
    render(
        format,
        || LeasesDoc {
            revision: resp.revision,
            leases: resp.leases.iter().map(LeaseDoc::from).collect(),
        },
        |wide| lease_table(&resp.leases, wide, now),
    )
}

/// The lease table (header and one row per lease), as `leases` and `lease get` print it.
/// IPv4 tables keep their layout; a dual-stack network adds IPV6-SUBNET (and, wide, the
/// IPv6 address and MAC); an IPv6-only network shows the IPv6 fields in their place.
/// No NETWORK column: every lease listed is of the one network asked for (the
/// documents of `-o json|yaml` name it).
fn lease_table(leases: &[Lease], wide: bool, now: SystemTime) -> String {
    let dual = leases.iter().any(|l| !l.ipv6_subnet.is_empty());
    let v6_only = dual && leases.iter().all(|l| l.subnet.is_empty());
    let dual = dual && !v6_only;
    let pick = |v4: &str, v6: &str| or_none(if v6_only { v6 } else { v4 });
    let [subnet, ip, mac] = if v6_only {
        ["IPV6-SUBNET", "PUBLIC-IPV6", "VTEP-MAC-V6"]
    } else {
        ["SUBNET", "PUBLIC-IP", "VTEP-MAC"]
    };
    listing(
        leases,
        &[
            ("NODE", true, &|l| or_none(&l.node_name)),
            (subnet, true, &|l| pick(&l.subnet, &l.ipv6_subnet)),
            ("IPV6-SUBNET", dual, &|l| or_none(&l.ipv6_subnet)),
            (ip, true, &|l| pick(&l.public_ip, &l.public_ipv6)),
            (mac, true, &|l| pick(&l.vtep_mac, &l.vtep_mac_v6)),
            ("EXPIRES-IN", true, &|l| expires_in(l.expires_at_unix, now)),
            ("RESERVED", true, &|l| yes_no(l.reserved)),
            ("VNI", wide, &|l| l.vni.to_string()),
            ("REVISION", wide, &|l| l.revision.to_string()),
            ("PUBLIC-IPV6", wide && dual, &|l| or_none(&l.public_ipv6)),
            ("VTEP-MAC-V6", wide && dual, &|l| or_none(&l.vtep_mac_v6)),
        ],
    )
}

/// `lease get`: the one-row table, or the lease document.
pub fn render_lease(lease: &Lease, format: Format, now: SystemTime) -> String {
    render(
        format,
        || LeaseDoc::from(lease),
        |wide| lease_table(std::slice::from_ref(lease), wide, now),
    )
}

/// `lease revoke`: a kubectl-style confirmation, or the revoked lease's document.
pub fn render_revoked(lease: &Lease, format: Format) -> String {
    render(
        format,
        || LeaseDoc::from(lease),
        |_| {
            format!(
                "lease/{}{} revoked (subnet {})\n",
                lease.node_name,
                in_network(&lease.network),
                or_none(&both(&lease.subnet, &lease.ipv6_subnet))
            )
        },
    )
}

/// One reservation as printed by `-o json` / `-o yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReservationDoc {
    /// The node the subnet is kept for.
    pub node_name: String,
    /// The network the subnets belong to (`default` for the controller's --net-conf).
    pub network: String,
    /// The reserved subnet, CIDR.
    pub subnet: String,
    /// The reserved IPv6 subnet, CIDR (absent when none is).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ipv6_subnet: String,
    /// Whether the node holds a lease on that subnet now (`reservations -o wide|json|yaml`
    /// only; absent elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_use: Option<bool>,
    /// Why the controller cannot honour the reservation now (absent when it can).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

/// The document printed by `reservations -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReservationsDoc {
    /// Ordered by node name.
    pub reservations: Vec<ReservationDoc>,
}

fn reservation_doc(r: &Reservation, leases: Option<&[Lease]>) -> ReservationDoc {
    ReservationDoc {
        node_name: r.node_name.clone(),
        network: network_name(&r.network),
        subnet: r.subnet.clone(),
        ipv6_subnet: r.ipv6_subnet.clone(),
        in_use: leases.map(|ls| {
            ls.iter().any(|l| {
                l.node_name == r.node_name
                    && (r.subnet.is_empty() || l.subnet == r.subnet)
                    && (r.ipv6_subnet.is_empty() || l.ipv6_subnet == r.ipv6_subnet)
            })
        }),
        stale: Some(r.stale.clone()).filter(|s| !s.is_empty()),
    }
}

/// `reserve` / `unreserve`: a confirmation (`verb`: "created" / "deleted"), or the
/// reservation's document.
pub fn render_reservation_change(r: &Reservation, verb: &str, format: Format) -> String {
    render(
        format,
        || reservation_doc(r, None),
        |_| {
            format!(
                "reservation/{}{} {verb} (subnet {})\n",
                r.node_name,
                in_network(&r.network),
                or_none(&both(&r.subnet, &r.ipv6_subnet))
            )
        },
    )
}

/// `reservations`: NODE, SUBNET (wide: IN-USE, from `leases`). An empty
/// table renders as an empty string (the caller says so on stderr).
pub fn render_reservations(rs: &[Reservation], leases: Option<&[Lease]>, format: Format) -> String {
    let doc = || ReservationsDoc {
        reservations: rs.iter().map(|r| reservation_doc(r, leases)).collect(),
    };
    render(format, doc, |wide| {
        let dual = rs.iter().any(|r| !r.ipv6_subnet.is_empty());
        let in_use = wide && leases.is_some();
        listing(
            &doc().reservations,
            &[
                ("NODE", true, &|r| or_none(&r.node_name)),
                ("SUBNET", true, &|r| or_none(&r.subnet)),
                ("IPV6-SUBNET", dual, &|r| or_none(&r.ipv6_subnet)),
                ("IN-USE", in_use, &|r| yes_no(r.in_use.unwrap_or(false))),
            ],
        )
    })
}

/// The effective network configuration as printed by `config -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConfigDoc {
    /// The pod network, CIDR.
    pub network: String,
    /// Prefix length of node subnets.
    pub subnet_len: u32,
    /// First allocatable subnet.
    pub subnet_min: String,
    /// Last allocatable subnet.
    pub subnet_max: String,
    /// The IPv6 pod network (dual-stack only; the IPv6 keys are absent otherwise).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ipv6_network: String,
    /// Prefix length of node IPv6 subnets.
    #[serde(skip_serializing_if = "is_zero")]
    pub ipv6_subnet_len: u32,
    /// First allocatable IPv6 subnet.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ipv6_subnet_min: String,
    /// Last allocatable IPv6 subnet.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ipv6_subnet_max: String,
    /// Backend type ("vxlan" or "host-gw").
    pub backend_type: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// VXLAN UDP port (0: the kernel default, 8472).
    pub port: u32,
    /// Overlay MTU override (0: interface MTU minus 50).
    pub mtu: u32,
    /// Plain routes between nodes on one L2 subnet.
    pub direct_routing: bool,
    /// Lease time to live, seconds.
    pub lease_ttl_seconds: u64,
    /// net-conf.json exactly as the controller loaded it.
    pub net_conf_json: String,
}

impl From<&GetConfigResponse> for ConfigDoc {
    fn from(c: &GetConfigResponse) -> Self {
        ConfigDoc {
            network: c.network.clone(),
            subnet_len: c.subnet_len,
            subnet_min: c.subnet_min.clone(),
            subnet_max: c.subnet_max.clone(),
            ipv6_network: c.ipv6_network.clone(),
            ipv6_subnet_len: c.ipv6_subnet_len,
            ipv6_subnet_min: c.ipv6_subnet_min.clone(),
            ipv6_subnet_max: c.ipv6_subnet_max.clone(),
            backend_type: c.backend_type.clone(),
            vni: c.vni,
            port: c.port,
            mtu: c.mtu,
            direct_routing: c.direct_routing,
            lease_ttl_seconds: c.lease_ttl_seconds,
            net_conf_json: c.net_conf_json.clone(),
        }
    }
}

/// `config`: FIELD / VALUE rows named as in net-conf.json (wide: plus the document
/// itself on one line), or the config document.
pub fn render_config(c: &GetConfigResponse, format: Format) -> String {
    render(
        format,
        || ConfigDoc::from(c),
        |wide| {
            let port = match c.port {
                0 => "0 (kernel default, 8472)".to_string(),
                p => p.to_string(),
            };
            let mtu = match c.mtu {
                0 => "0 (interface MTU - 50)".to_string(),
                m => m.to_string(),
            };
            let mut rows = vec![
                strings(&["FIELD", "VALUE"]),
                strings(&["Network", &or_none(&c.network)]),
                strings(&["SubnetLen", &c.subnet_len.to_string()]),
                strings(&["SubnetMin", &or_none(&c.subnet_min)]),
                strings(&["SubnetMax", &or_none(&c.subnet_max)]),
                strings(&["Backend.Type", &or_none(&c.backend_type)]),
                strings(&["Backend.VNI", &c.vni.to_string()]),
                strings(&["Backend.Port", &port]),
                strings(&["Backend.MTU", &mtu]),
                strings(&["Backend.DirectRouting", &c.direct_routing.to_string()]),
                strings(&[
                    "LeaseTTL",
                    &humanize(Duration::from_secs(c.lease_ttl_seconds)),
                ]),
            ];
            if !c.ipv6_network.is_empty() {
                let v6 = [
                    strings(&["IPv6Network", &c.ipv6_network]),
                    strings(&["IPv6SubnetLen", &c.ipv6_subnet_len.to_string()]),
                    strings(&["IPv6SubnetMin", &or_none(&c.ipv6_subnet_min)]),
                    strings(&["IPv6SubnetMax", &or_none(&c.ipv6_subnet_max)]),
                ];
                rows.splice(5..5, v6);
            }
            if wide {
                let compact = serde_json::from_str::<serde_json::Value>(&c.net_conf_json)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| c.net_conf_json.replace('\n', " "));
                rows.push(strings(&["net-conf.json", &compact]));
            }
            table(&rows)
        },
    )
}

/// One network as printed by `networks -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NetworkDoc {
    /// Its name: `default` (the controller's --net-conf), else its file's name in the
    /// controller's --networks-dir without `.json`.
    pub name: String,
    /// The IPv4 pod network, CIDR (empty when it has none).
    pub ipv4_network: String,
    /// The IPv6 pod network, CIDR (empty when it has none).
    pub ipv6_network: String,
    /// Backend type ("vxlan" or "host-gw").
    pub backend_type: String,
    /// VXLAN network identifier: its devices are flannel.<VNI> (0 with host-gw).
    pub vni: u32,
    /// Who may join: node names and `prefix*` patterns; empty means every node.
    pub nodes: Vec<String>,
    /// Leases held in it now.
    pub leases: u32,
    /// Subnets of its first family still free.
    pub subnets_free: u32,
    /// Subnets of its first family in all.
    pub subnets_total: u32,
    /// Its file was removed: no new leases, the existing ones run out.
    pub retired: bool,
    /// The network's file as the controller loaded it (net-conf.json plus "Nodes").
    pub net_conf_json: String,
}

impl From<&NetworkInfo> for NetworkDoc {
    fn from(n: &NetworkInfo) -> Self {
        NetworkDoc {
            name: n.name.clone(),
            ipv4_network: n.ipv4_network.clone(),
            ipv6_network: n.ipv6_network.clone(),
            backend_type: n.backend_type.clone(),
            vni: n.vni,
            nodes: n.nodes.clone(),
            leases: n.leases,
            subnets_free: n.subnets_free,
            subnets_total: n.subnets_total,
            retired: n.retired,
            net_conf_json: n.net_conf_json.clone(),
        }
    }
}

/// The document printed by `networks -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NetworksDoc {
    /// Ordered by name.
    pub networks: Vec<NetworkDoc>,
}

/// `networks`: NAME, IPV4, IPV6, VNI (`—` for host-gw, which has no device), BACKEND,
/// NODES (`*`: every node), LEASES, FREE, STATUS (`active`, or `retired`: its file was
/// removed and its leases are running out); wide shows every NODES entry and adds
/// TOTAL. An empty table renders as an empty string (the caller says so on stderr).
pub fn render_networks(networks: &[NetworkInfo], format: Format) -> String {
    let doc = || NetworksDoc {
        networks: networks.iter().map(NetworkDoc::from).collect(),
    };
    render(format, doc, |wide| {
        let vni = |n: &NetworkInfo| {
            if n.backend_type == "host-gw" || n.vni == 0 {
                "—".to_string()
            } else {
                n.vni.to_string()
            }
        };
        let nodes = |n: &NetworkInfo| {
            let all = n.nodes.iter().map(|p| one_line(p)).collect();
            joined(all, (!wide).then_some(TABLE_NODES))
        };
        listing(
            networks,
            &[
                ("NAME", true, &|n| or_none(&one_line(&n.name))),
                ("IPV4", true, &|n| or_none(&n.ipv4_network)),
                ("IPV6", true, &|n| or_none(&n.ipv6_network)),
                ("VNI", true, &vni),
                ("BACKEND", true, &|n| or_none(&n.backend_type)),
                ("NODES", true, &nodes),
                ("LEASES", true, &|n| n.leases.to_string()),
                ("FREE", true, &|n| n.subnets_free.to_string()),
                ("STATUS", true, &|n| {
                    if n.retired { "retired" } else { "active" }.to_string()
                }),
                ("TOTAL", wide, &|n| n.subnets_total.to_string()),
            ],
        )
    })
}

/// One pod as printed by `pods -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodDoc {
    /// The pod's namespace (empty when the runtime gave none).
    pub namespace: String,
    /// The pod's name (empty when the runtime gave none).
    pub pod: String,
    /// The node it runs on.
    pub node: String,
    /// Its network.
    pub network: String,
    /// Its addresses.
    pub ips: Vec<String>,
    /// The container (sandbox) ID.
    pub container_id: String,
    /// Its interface in the pod.
    pub ifname: String,
    /// When it was attached, seconds since the Unix epoch.
    pub added_at_unix: i64,
    /// The same, RFC 3339 UTC.
    pub added_at: String,
}

impl PodDoc {
    /// `p` as printed.
    pub fn of(p: &PodAttachment) -> PodDoc {
        PodDoc {
            namespace: p.namespace.clone(),
            pod: p.pod.clone(),
            node: p.node_name.clone(),
            network: network_name(&p.network),
            ips: p.ips.clone(),
            container_id: p.container_id.clone(),
            ifname: p.ifname.clone(),
            added_at_unix: p.added_at_unix,
            added_at: unix_to_rfc3339(p.added_at_unix),
        }
    }
}

/// The document printed by `pods -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodsDoc {
    /// Ordered by node, network, namespace and pod.
    pub pods: Vec<PodDoc>,
}

/// `pods`: NAMESPACE, POD, NODE, NETWORK, IP, IPV6, CONTAINER (its first 12
/// characters), AGE; `-o wide` adds IFNAME and the whole container ID. Empty for no
/// pods in `table`/`wide` form (the caller says so on stderr).
pub fn render_pods(pods: &[PodAttachment], format: Format, now: SystemTime) -> String {
    let doc = || PodsDoc {
        pods: pods.iter().map(PodDoc::of).collect(),
    };
    render(format, doc, |wide| {
        let ips = |p: &PodAttachment, v6: bool| {
            let of: Vec<_> = p
                .ips
                .iter()
                .filter(|ip| ip.contains(':') == v6)
                .cloned()
                .collect();
            or_none(&of.join(","))
        };
        listing(
            pods,
            &[
                ("NAMESPACE", true, &|p| or_none(&one_line(&p.namespace))),
                ("POD", true, &|p| or_none(&one_line(&p.pod))),
                ("NODE", true, &|p| or_none(&p.node_name)),
                ("NETWORK", true, &|p| network_name(&p.network)),
                ("IP", true, &|p| ips(p, false)),
                ("IPV6", true, &|p| ips(p, true)),
                ("CONTAINER", true, &|p| id_cell(&p.container_id, wide, 12)),
                ("AGE", true, &|p| age(p.added_at_unix, now)),
                ("IFNAME", wide, &|p| or_none(&one_line(&p.ifname))),
            ],
        )
    })
}

/// An ID's cell (CONTAINER, KEY-SHA256): all of it with `-o wide`, else its first
/// `short` characters.
fn id_cell(id: &str, wide: bool, short: usize) -> String {
    let shown: String = id
        .chars()
        .take(if wide { usize::MAX } else { short })
        .collect();
    or_none(&one_line(&shown))
}

/// One subnet as printed by `ipam -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageDoc {
    /// The node holding the subnet.
    pub node: String,
    /// Its network.
    pub network: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// The subnet.
    pub subnet: String,
    /// Addresses its IPAM holds.
    pub used: u64,
    /// Addresses it can give pods.
    pub total: u64,
}

/// The document printed by `ipam -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IpamDoc {
    /// The fullest first.
    pub subnets: Vec<UsageDoc>,
}

/// `ipam`: NODE, NETWORK, FAMILY, SUBNET, USED, TOTAL, USE% (as given: the fullest
/// first). Empty for none in `table`/`wide` form.
pub fn render_ipam(usage: &[PodAddressUsage], format: Format) -> String {
    let doc = || IpamDoc {
        subnets: usage
            .iter()
            .map(|u| UsageDoc {
                node: u.node_name.clone(),
                network: network_name(&u.network),
                family: u.family.clone(),
                subnet: u.subnet.clone(),
                used: u.used,
                total: u.total,
            })
            .collect(),
    };
    render(format, doc, |_| {
        listing(
            usage,
            &[
                ("NODE", true, &|u| u.node_name.clone()),
                ("NETWORK", true, &|u| network_name(&u.network)),
                ("FAMILY", true, &|u| u.family.clone()),
                ("SUBNET", true, &|u| u.subnet.clone()),
                ("USED", true, &|u| u.used.to_string()),
                ("TOTAL", true, &|u| u.total.to_string()),
                ("USE%", true, &|u| {
                    (u.used.saturating_mul(100))
                        .checked_div(u.total)
                        .map_or_else(|| "—".to_string(), |p| format!("{p}%"))
                }),
            ],
        )
    })
}

/// One finding as printed by `ipam check -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FindingDoc {
    /// The node.
    pub node: String,
    /// The network.
    pub network: String,
    /// The address.
    pub ip: String,
    /// `leaked`, `conflict` or `duplicate`.
    pub kind: String,
    /// The container (sandbox) ID.
    pub container_id: String,
}

/// The document printed by `ipam check -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FindingsDoc {
    /// By node, network and address.
    pub findings: Vec<FindingDoc>,
}

/// `ipam check`: NODE, NETWORK, IP, KIND, CONTAINER (whole with `-o wide`, else its
/// first 12 characters). Empty for none in `table`/`wide` form.
pub fn render_findings(findings: &[PodAddressFinding], format: Format) -> String {
    let doc = || FindingsDoc {
        findings: findings
            .iter()
            .map(|f| FindingDoc {
                node: f.node_name.clone(),
                network: network_name(&f.network),
                ip: f.ip.clone(),
                kind: f.kind.clone(),
                container_id: f.container_id.clone(),
            })
            .collect(),
    };
    render(format, doc, |wide| {
        listing(
            findings,
            &[
                ("NODE", true, &|f| f.node_name.clone()),
                ("NETWORK", true, &|f| network_name(&f.network)),
                ("IP", true, &|f| f.ip.clone()),
                ("KIND", true, &|f| f.kind.to_ascii_uppercase()),
                ("CONTAINER", true, &|f| id_cell(&f.container_id, wide, 12)),
            ],
        )
    })
}

/// For `status` in `table`/`wide` form: the subnets of `usage` at 90 % or more, as a
/// table under a heading; nothing when there are none, or in `json`/`yaml` form
/// (`twillctl ipam -o json` has the numbers).
pub fn render_nearly_full(usage: &[PodAddressUsage], format: Format) -> String {
    let full: Vec<PodAddressUsage> = usage
        .iter()
        .filter(|u| twill_common::pods::nearly_full(u.used, u.total))
        .cloned()
        .collect();
    if full.is_empty() || matches!(format, Format::Json | Format::Yaml) {
        return String::new();
    }
    format!(
        "\nNearly full (pods will fail to get an address once a subnet is):\n{}",
        render_ipam(&full, Format::Table)
    )
}

/// `ip`: the answer as a sentence, or as a document.
pub fn render_ip(answer: &crate::lookup::Answer, format: Format) -> String {
    render(
        format,
        || answer,
        |_| format!("{}\n", crate::lookup::sentence(answer)),
    )
}

/// One open watch stream as printed by `status -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentDoc {
    /// Node (or admin) name from the client certificate.
    pub name: String,
    /// When the stream opened, seconds since the Unix epoch.
    pub connected_at_unix: i64,
    /// The same, RFC 3339 UTC.
    pub connected_at: String,
    /// When the node last called the controller, seconds since the Unix epoch.
    pub last_seen_unix: i64,
    /// The same, RFC 3339 UTC.
    pub last_seen: String,
    /// Revision of the last message sent to it.
    pub revision: u64,
    /// How many revisions it is behind the table.
    pub revision_lag: u64,
    /// When the client certificate the stream was opened with expires, seconds since
    /// the Unix epoch (0: unknown).
    pub cert_not_after_unix: i64,
    /// The same, RFC 3339 UTC (empty when unknown).
    pub cert_not_after: String,
    /// The advertised URL of the replica the stream is open on (etcd store; absent with
    /// the single-replica sled store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

impl From<&ConnectedAgent> for AgentDoc {
    fn from(a: &ConnectedAgent) -> Self {
        AgentDoc {
            name: a.name.clone(),
            connected_at_unix: a.connected_at_unix,
            connected_at: unix_to_rfc3339(a.connected_at_unix),
            last_seen_unix: a.last_seen_unix,
            last_seen: unix_to_rfc3339(a.last_seen_unix),
            revision: a.revision,
            revision_lag: a.revision_lag,
            cert_not_after_unix: a.cert_not_after_unix,
            cert_not_after: unix_to_rfc3339(a.cert_not_after_unix),
            replica: Some(a.replica.clone()).filter(|r| !r.is_empty()),
        }
    }
}

/// One controller replica as printed by `status -o json|yaml` (etcd store).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplicaDoc {
    /// Its advertised URL.
    pub url: String,
    /// True for the elected leader, the one replica that writes.
    pub leader: bool,
    /// Watch streams open on it (0 when it did not answer).
    pub agents: u32,
    /// Why it did not answer (absent when it did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&Replica> for ReplicaDoc {
    fn from(r: &Replica) -> Self {
        ReplicaDoc {
            url: r.url.clone(),
            leader: r.leader,
            agents: r.agents,
            error: Some(r.error.clone()).filter(|e| !e.is_empty()),
        }
    }
}

/// The controller's state as printed by `status -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusDoc {
    /// The controller's version.
    pub version: String,
    /// The lease table's revision.
    pub revision: u64,
    /// Bytes the store occupies on disk.
    pub store_size_bytes: u64,
    /// Allocatable subnets between SubnetMin and SubnetMax.
    pub subnets_total: u32,
    /// Subnets leased.
    pub subnets_used: u32,
    /// Subnets neither leased nor reserved.
    pub subnets_free: u32,
    /// Reservations.
    pub subnets_reserved: u32,
    /// Reservations the controller cannot honour now (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservations_stale: Option<u32>,
    /// The controller replicas, by URL (etcd store; absent with the single-replica sled
    /// store).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaDoc>,
    /// Open watch streams, ordered by name.
    pub agents: Vec<AgentDoc>,
    /// host-gw: nodes with peers they cannot route to directly (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub off_link: Vec<OffLinkDoc>,
}

/// A node and the peers outside its underlay subnet (host-gw), in `status -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OffLinkDoc {
    /// The node.
    pub node: String,
    /// Its underlay subnet.
    pub underlay: String,
    /// The peers it has no route to.
    pub peers: Vec<String>,
}

impl From<&StatusResponse> for StatusDoc {
    fn from(s: &StatusResponse) -> Self {
        StatusDoc {
            version: s.version.clone(),
            revision: s.revision,
            store_size_bytes: s.store_size_bytes,
            subnets_total: s.subnets_total,
            subnets_used: s.subnets_used,
            subnets_free: s.subnets_free,
            subnets_reserved: s.subnets_reserved,
            reservations_stale: Some(s.reservations_stale).filter(|n| *n > 0),
            replicas: s.replicas.iter().map(ReplicaDoc::from).collect(),
            agents: s.agents.iter().map(AgentDoc::from).collect(),
            off_link: s
                .off_link
                .iter()
                .map(|o| OffLinkDoc {
                    node: o.node.clone(),
                    underlay: o.underlay.clone(),
                    peers: o.peers.clone(),
                })
                .collect(),
        }
    }
}

/// `status`: a summary (version, revision, store size, capacity; on etcd the number of
/// replicas and the leader), on etcd the table of replicas (URL, ROLE, AGENTS; ERROR
/// when one did not answer), and the table of connected agents (NAME, CONNECTED,
/// LAST-SEEN, REVISION, LAG, CERT-EXPIRES, and on etcd REPLICA; wide: plus the
/// timestamps), or the status document. `now` is the reference for the ages and for the
/// time left on each agent's certificate. Without replicas (the sled store) the output
/// is what it was before high availability.
pub fn render_status(s: &StatusResponse, format: Format, now: SystemTime) -> String {
    render(
        format,
        || StatusDoc::from(s),
        |wide| {
            let ha = !s.replicas.is_empty();
            let mut subnets = format!(
                "{} total, {} used, {} free, {} reserved",
                s.subnets_total, s.subnets_used, s.subnets_free, s.subnets_reserved
            );
            if s.reservations_stale > 0 {
                subnets += &format!(
                    " ({} not honoured now: twillctl reservations -o yaml says why)",
                    s.reservations_stale
                );
            }
            let mut summary = vec![
                strings(&["Version:", &or_none(&s.version)]),
                strings(&["Revision:", &s.revision.to_string()]),
                strings(&["Store size:", &bytes(s.store_size_bytes)]),
                strings(&["Subnets:", &subnets]),
            ];
            if ha {
                summary.push(strings(&["Replicas:", &replicas_summary(&s.replicas)]));
            }
            summary.push(strings(&[
                "Agents:",
                &match s.agents.len() {
                    0 => "none connected".to_string(),
                    n => format!("{n} connected"),
                },
            ]));
            if !s.off_link.is_empty() {
                summary.push(strings(&[
                    "Unreachable:",
                    &format!(
                        "{} node(s) cannot route to some peers directly (host-gw needs one L2 segment)",
                        s.off_link.len()
                    ),
                ]));
            }
            let off_link = listing(
                &s.off_link,
                &[
                    ("NODE", true, &|o| o.node.clone()),
                    ("UNDERLAY", true, &|o| o.underlay.clone()),
                    ("NO-ROUTE-TO", true, &|o| o.peers.join(",")),
                ],
            );
            let agents = listing(
                &s.agents,
                &[
                    ("NAME", true, &|a| or_none(&a.name)),
                    ("CONNECTED", true, &|a| age(a.connected_at_unix, now)),
                    ("LAST-SEEN", true, &|a| age(a.last_seen_unix, now)),
                    ("REVISION", true, &|a| a.revision.to_string()),
                    ("LAG", true, &|a| a.revision_lag.to_string()),
                    ("CERT-EXPIRES", true, &|a| {
                        expires_in(a.cert_not_after_unix, now)
                    }),
                    ("REPLICA", ha, &|a| or_none(&one_line(&a.replica))),
                    ("CONNECTED-AT", wide, &|a| {
                        rfc3339_or_none(a.connected_at_unix)
                    }),
                    ("LAST-SEEN-AT", wide, &|a| rfc3339_or_none(a.last_seen_unix)),
                    ("CERT-NOT-AFTER", wide, &|a| {
                        rfc3339_or_none(a.cert_not_after_unix)
                    }),
                ],
            );
            let mut out = table(&summary);
            for part in [replica_table(&s.replicas), off_link, agents] {
                if !part.is_empty() {
                    out.push('\n');
                    out.push_str(&part);
                }
            }
            out
        },
    )
}

/// The `Replicas:` line of `status`: how many, which one leads, how many did not answer.
fn replicas_summary(replicas: &[Replica]) -> String {
    let leader = match replicas.iter().find(|r| r.leader) {
        Some(r) => format!("leader {}", or_none(&one_line(&r.url))),
        None => "no leader now".to_string(),
    };
    match replicas.iter().filter(|r| !r.error.is_empty()).count() {
        0 => format!("{} ({leader})", replicas.len()),
        down => format!("{} ({leader}, {down} unreachable)", replicas.len()),
    }
}

/// The replica table of `status`: URL, ROLE, AGENTS, and ERROR when one of them did not
/// answer (its AGENTS are then unknown).
fn replica_table(replicas: &[Replica]) -> String {
    let errors = replicas.iter().any(|r| !r.error.is_empty());
    listing(
        replicas,
        &[
            ("URL", true, &|r| or_none(&one_line(&r.url))),
            ("ROLE", true, &|r| {
                if r.leader { "leader" } else { "follower" }.to_string()
            }),
            ("AGENTS", true, &|r| {
                if r.error.is_empty() {
                    r.agents.to_string()
                } else {
                    "<unknown>".to_string()
                }
            }),
            ("ERROR", errors, &|r| {
                if r.error.is_empty() {
                    "<none>".to_string()
                } else {
                    format!("unreachable: {}", one_line(&r.error))
                }
            }),
        ],
    )
}

/// One bootstrap token as printed by `token list -o json|yaml`. There is deliberately no
/// field for the secret: the controller keeps only a hash of it, and `token create` is
/// the only place it is ever shown.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenDoc {
    /// The public part of the token (before the dot).
    pub id: String,
    /// What the token is for.
    pub description: String,
    /// When it was made, seconds since the Unix epoch.
    pub created_at_unix: i64,
    /// The same, RFC 3339 UTC.
    pub created_at: String,
    /// When it expires, seconds since the Unix epoch.
    pub expires_at_unix: i64,
    /// The same, RFC 3339 UTC.
    pub expires_at: String,
    /// How many certificates were issued with it.
    pub uses: u64,
    /// When it was last used, seconds since the Unix epoch (0: never).
    pub last_used_unix: i64,
    /// The same, RFC 3339 UTC; null when never used.
    pub last_used: Option<String>,
    /// The node names it may bootstrap, exactly (with `node_prefix`, a name may match
    /// either; both empty: any name).
    pub nodes: Vec<String>,
    /// It may bootstrap the node names that start with this (empty: none by prefix).
    pub node_prefix: String,
    /// How many certificates it was made for (0: no limit).
    pub max_uses: u32,
    /// How many it may still be exchanged for; null when there is no limit.
    pub uses_left: Option<u64>,
}

impl From<&BootstrapToken> for TokenDoc {
    fn from(t: &BootstrapToken) -> Self {
        TokenDoc {
            id: t.id.clone(),
            description: t.description.clone(),
            created_at_unix: t.created_at_unix,
            created_at: unix_to_rfc3339(t.created_at_unix),
            expires_at_unix: t.expires_at_unix,
            expires_at: unix_to_rfc3339(t.expires_at_unix),
            uses: t.uses,
            last_used_unix: t.last_used_unix,
            last_used: Some(unix_to_rfc3339(t.last_used_unix)).filter(|s| !s.is_empty()),
            nodes: t.nodes.clone(),
            node_prefix: t.node_prefix.clone(),
            max_uses: t.max_uses,
            uses_left: uses_left(t),
        }
    }
}

/// How many more certificates a token may be exchanged for; `None` without a limit.
fn uses_left(t: &BootstrapToken) -> Option<u64> {
    (t.max_uses > 0).then(|| u64::from(t.max_uses).saturating_sub(t.uses))
}

/// The names shown in a table's NODES column before it says how many more there are.
const TABLE_NODES: usize = 3;

/// NODES: the exact names and `prefix*`, comma-separated, or `*` for any name. With
/// `limit`, names past the first `limit` are counted (`a,b,c,+2 more`).
fn token_nodes(t: &BootstrapToken, limit: Option<usize>) -> String {
    let mut all: Vec<String> = t.nodes.iter().map(|n| one_line(n)).collect();
    if !t.node_prefix.is_empty() {
        all.push(format!("{}*", one_line(&t.node_prefix)));
    }
    joined(all, limit)
}

/// A NODES cell (of `token list` and `networks`): the names and patterns
/// comma-separated, `*` when there are none (every node may), at most `limit` of them
/// before the rest are counted.
fn joined(mut all: Vec<String>, limit: Option<usize>) -> String {
    if all.is_empty() {
        return "*".to_string();
    }
    match limit {
        Some(n) if all.len() > n + 1 => {
            let more = all.len() - n;
            all.truncate(n);
            format!("{},+{more} more", all.join(","))
        }
        _ => all.join(","),
    }
}

/// USES: `used/max`, or `used` without a limit.
fn token_uses(t: &BootstrapToken) -> String {
    if t.max_uses > 0 {
        format!("{}/{}", t.uses, t.max_uses)
    } else {
        t.uses.to_string()
    }
}

/// The document printed by `token list -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokensDoc {
    /// The tokens that have not expired, ordered by id.
    pub tokens: Vec<TokenDoc>,
}

/// `token list`: ID, DESCRIPTION, NODES, EXPIRES-IN, USES, LAST-USED (wide: every name
/// in NODES, plus USES-LEFT, CREATED and EXPIRES-AT), or the tokens document. An empty
/// table renders as an empty string (the caller says so on stderr). `now` is the
/// reference for the ages.
pub fn render_tokens(tokens: &[BootstrapToken], format: Format, now: SystemTime) -> String {
    let doc = || TokensDoc {
        tokens: tokens.iter().map(TokenDoc::from).collect(),
    };
    render(format, doc, |wide| {
        listing(
            tokens,
            &[
                ("ID", true, &|t| or_none(&one_line(&t.id))),
                ("DESCRIPTION", true, &|t| or_none(&one_line(&t.description))),
                ("NODES", true, &|t| {
                    token_nodes(t, (!wide).then_some(TABLE_NODES))
                }),
                ("EXPIRES-IN", true, &|t| expires_in(t.expires_at_unix, now)),
                ("USES", true, &token_uses),
                ("LAST-USED", true, &|t| {
                    if t.last_used_unix <= 0 {
                        "never".to_string()
                    } else {
                        age(t.last_used_unix, now)
                    }
                }),
                ("USES-LEFT", wide, &|t| {
                    uses_left(t).map_or_else(|| "unlimited".to_string(), |n| n.to_string())
                }),
                ("CREATED", wide, &|t| age(t.created_at_unix, now)),
                ("EXPIRES-AT", wide, &|t| rfc3339_or_none(t.expires_at_unix)),
            ],
        )
    })
}

/// The id of a token given as `ID` or as a whole `ID.SECRET` token: what may be printed
/// of it (never the secret).
pub fn token_id(token_or_id: &str) -> &str {
    token_or_id
        .split_once('.')
        .map_or(token_or_id, |(id, _)| id)
}

/// What `token delete -o json|yaml` prints.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenDeletedDoc {
    /// The id of the deleted token.
    pub id: String,
    /// Always true: the token is refused from now on.
    pub deleted: bool,
}

/// `token delete`: `token/<id> deleted`, or its document. `arg` is what the user gave
/// (an id, or a whole token whose secret is not repeated).
pub fn render_token_deleted(arg: &str, format: Format) -> String {
    let id = one_line(token_id(arg));
    let doc = || TokenDeletedDoc {
        id: id.clone(),
        deleted: true,
    };
    render(format, doc, |_| format!("token/{id} deleted\n"))
}

/// One node certificate the controller signed, as printed by `certs issued -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IssuedCertificateDoc {
    /// The node (the certificate's CN).
    pub node_name: String,
    /// Serial number, hex.
    pub serial: String,
    /// When it was issued, seconds since the Unix epoch.
    pub issued_at_unix: i64,
    /// The same, RFC 3339 UTC.
    pub issued_at: String,
    /// When it expires, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// The same, RFC 3339 UTC.
    pub not_after: String,
    /// Id of the bootstrap token it was issued with (empty for a renewal).
    pub token_id: String,
    /// SHA-256 of its public key (SubjectPublicKeyInfo), hex.
    pub key_sha256: String,
}

impl From<&IssuedCertificate> for IssuedCertificateDoc {
    fn from(c: &IssuedCertificate) -> Self {
        IssuedCertificateDoc {
            node_name: c.node_name.clone(),
            serial: c.serial.clone(),
            issued_at_unix: c.issued_at_unix,
            issued_at: unix_to_rfc3339(c.issued_at_unix),
            not_after_unix: c.not_after_unix,
            not_after: unix_to_rfc3339(c.not_after_unix),
            token_id: c.token_id.clone(),
            key_sha256: c.key_sha256.clone(),
        }
    }
}

/// Hex digits of KEY-SHA256 in the table (wide shows all 64).
const TABLE_KEY_DIGITS: usize = 16;

/// The document printed by `certs issued -o json|yaml`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IssuedCertificatesDoc {
    /// Oldest first.
    pub certificates: Vec<IssuedCertificateDoc>,
}

/// `certs issued`: NODE, SERIAL, ISSUED, EXPIRES-IN, TOKEN, KEY-SHA256 (its first 16
/// hex digits; wide: all of it, plus ISSUED-AT and NOT-AFTER), or the certificates
/// document. An empty table renders as an empty string (the caller says so on stderr).
/// `now` is the reference for the ages.
pub fn render_issued(certs: &[IssuedCertificate], format: Format, now: SystemTime) -> String {
    let doc = || IssuedCertificatesDoc {
        certificates: certs.iter().map(IssuedCertificateDoc::from).collect(),
    };
    render(format, doc, |wide| {
        listing(
            certs,
            &[
                ("NODE", true, &|c| or_none(&one_line(&c.node_name))),
                ("SERIAL", true, &|c| or_none(&one_line(&c.serial))),
                ("ISSUED", true, &|c| age(c.issued_at_unix, now)),
                ("EXPIRES-IN", true, &|c| expires_in(c.not_after_unix, now)),
                ("TOKEN", true, &|c| or_none(&one_line(&c.token_id))),
                ("KEY-SHA256", true, &|c| {
                    id_cell(&c.key_sha256, wide, TABLE_KEY_DIGITS)
                }),
                ("ISSUED-AT", wide, &|c| rfc3339_or_none(c.issued_at_unix)),
                ("NOT-AFTER", wide, &|c| rfc3339_or_none(c.not_after_unix)),
            ],
        )
    })
}

/// A table cell on one line: control characters (newlines, tabs) become spaces, so a
/// free-text value such as a token's description cannot break the columns.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// One line of `watch -o json` (or one document of `watch -o yaml`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WatchEventDoc {
    /// `PUT`, `DELETE`, or `RESET`: the events that follow (with the same `revision`
    /// batch) are the complete lease table; forget every lease not listed.
    #[serde(rename = "type")]
    pub kind: String,
    /// For PUT/DELETE the event's revision; for RESET the table's revision.
    pub revision: u64,
    /// The lease after (PUT) or before (DELETE) the change; absent for RESET.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseDoc>,
}

/// Prints a watch stream: table lines (a header first), NDJSON or YAML documents.
#[derive(Debug)]
pub struct WatchPrinter {
    format: Format,
    header_done: bool,
    network_column: bool,
}

/// Column widths of the `watch` table (wide: EXPIRES-IN and VNI too, so NETWORK lines
/// up); wider values push the line out.
const WATCH_WIDTHS: [usize; 8] = [8, 6, 16, 18, 15, 17, 10, 8];

impl WatchPrinter {
    /// A printer for `format`. The table ends with NETWORK in `wide` form, or always
    /// with [`WatchPrinter::with_network_column`].
    pub fn new(format: Format) -> WatchPrinter {
        WatchPrinter {
            format,
            header_done: false,
            network_column: format == Format::Wide,
        }
    }

    /// Adds the NETWORK column to the narrow table too: when several networks are
    /// watched, a node's events in each would otherwise look alike.
    pub fn with_network_column(mut self) -> WatchPrinter {
        self.network_column = true;
        self
    }

    /// The documents of one response: a RESET marker first when it is a snapshot.
    pub fn docs(resp: &WatchResponse) -> Vec<WatchEventDoc> {
        let mut docs = Vec::with_capacity(resp.events.len() + 1);
        if resp.reset {
            docs.push(WatchEventDoc {
                kind: "RESET".into(),
                revision: resp.revision,
                lease: None,
            });
        }
        for e in &resp.events {
            let kind = match EventType::try_from(e.r#type) {
                Ok(EventType::Put) => "PUT".to_string(),
                Ok(EventType::Delete) => "DELETE".to_string(),
                _ => format!("TYPE_{}", e.r#type),
            };
            docs.push(WatchEventDoc {
                kind,
                revision: e.revision,
                lease: e.lease.as_ref().map(LeaseDoc::from),
            });
        }
        docs
    }

    /// The text for one response, newline-terminated (empty for an empty batch).
    pub fn render(&mut self, resp: &WatchResponse, now: SystemTime) -> String {
        let mut out = String::new();
        let wide = match self.format {
            Format::Table => false,
            Format::Wide => true,
            Format::Json => {
                for d in Self::docs(resp) {
                    out += &format!("{}\n", serde_json::to_string(&d).unwrap_or_default());
                }
                return out;
            }
            Format::Yaml => {
                for d in Self::docs(resp) {
                    out += &format!("---\n{}", yaml(&d));
                }
                return out;
            }
        };
        // The header is out before the first lease is known, so a dual-stack lease shows
        // both families in one cell, as kubectl shows a dual-stack node's addresses.
        let columns: [Column<LeaseDoc>; 7] = [
            ("NODE", true, &|l| or_none(&l.node_name)),
            ("SUBNET", true, &|l| {
                or_none(&both(&l.subnet, &l.ipv6_subnet))
            }),
            ("PUBLIC-IP", true, &|l| {
                or_none(&both(&l.public_ip, &l.public_ipv6))
            }),
            ("VTEP-MAC", true, &|l| {
                or_none(&both(&l.vtep_mac, &l.vtep_mac_v6))
            }),
            ("EXPIRES-IN", wide, &|l| expires_in(l.expires_at_unix, now)),
            ("VNI", wide, &|l| l.vni.to_string()),
            ("NETWORK", self.network_column, &|l| l.network.clone()),
        ];
        let shown: Vec<_> = columns.iter().filter(|c| c.1).collect();
        if !self.header_done {
            let mut h = strings(&["REVISION", "TYPE"]);
            h.extend(shown.iter().map(|c| c.0.to_string()));
            out.push_str(&padded_line(&h, &WATCH_WIDTHS));
            self.header_done = true;
        }
        for d in Self::docs(resp) {
            let mut row = vec![d.revision.to_string(), d.kind];
            match &d.lease {
                Some(l) => row.extend(shown.iter().map(|c| (c.2)(l))),
                None => {
                    let n = resp.events.len();
                    row.push(format!(
                        "(the complete lease table follows: {n} lease{})",
                        if n == 1 { "" } else { "s" }
                    ));
                }
            }
            out.push_str(&padded_line(&row, &WATCH_WIDTHS));
        }
        out
    }
}

/// One line of cells padded to `widths` (a wider cell pushes the line out) and three
/// spaces, without trailing blanks.
fn padded_line(cells: &[String], widths: &[usize]) -> String {
    let mut line = String::new();
    for (i, c) in cells.iter().enumerate() {
        line.push_str(c);
        if i + 1 < cells.len() {
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = w.saturating_sub(c.chars().count()) + 3;
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    let mut line = line.trim_end().to_string();
    line.push('\n');
    line
}

/// `v4,v6`, or whichever of the two is set.
fn both(v4: &str, v6: &str) -> String {
    match (v4.is_empty(), v6.is_empty()) {
        (_, true) => v4.to_string(),
        (true, false) => v6.to_string(),
        (false, false) => format!("{v4},{v6}"),
    }
}

fn strings(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// Time since `unix` (CONNECTED, LAST-SEEN columns).
fn age(unix: i64, now: SystemTime) -> String {
    if unix <= 0 {
        return "<unknown>".to_string();
    }
    humanize(Duration::from_secs(
        unix_secs(now).saturating_sub(unix).max(0) as u64,
    ))
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Pretty JSON of a document, newline-terminated.
pub fn json<T: Serialize>(doc: &T) -> String {
    let mut s = serde_json::to_string_pretty(doc)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()));
    s.push('\n');
    s
}

fn or_none(s: &str) -> String {
    if s.is_empty() { "<none>" } else { s }.to_string()
}

/// EXPIRES-IN and CERT-EXPIRES columns: the time left until `expires_at_unix`,
/// humanized, or `expired`.
fn expires_in(expires_at_unix: i64, now: SystemTime) -> String {
    if expires_at_unix <= 0 {
        return "<unknown>".to_string();
    }
    let left = expires_at_unix - unix_secs(now);
    if left < 0 {
        return "expired".to_string();
    }
    humanize(Duration::from_secs(left as u64))
}

/// Humanizes a duration with at most two units, like kubectl's ages:
/// `45s`, `5m3s`, `59m`, `23h59m`, `3d4h`, `400d`.
pub fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    let (m, s) = (secs / 60, secs % 60);
    let (h, mm) = (secs / 3600, (secs / 60) % 60);
    let (days, hh) = (secs / 86_400, (secs / 3600) % 24);
    let two = |big: u64, bu: &str, small: u64, su: &str| {
        if small == 0 {
            format!("{big}{bu}")
        } else {
            format!("{big}{bu}{small}{su}")
        }
    };
    if secs < 120 {
        format!("{secs}s")
    } else if secs < 3600 {
        two(m, "m", s, "s")
    } else if secs < 48 * 3600 {
        two(h, "h", mm, "m")
    } else if secs < 8 * 86_400 {
        two(days, "d", hh, "h")
    } else {
        format!("{days}d")
    }
}

/// `-o table|wide`: what `table(wide)` draws; `-o json|yaml`: the document `doc()` makes.
fn render<D: Serialize>(
    format: Format,
    doc: impl FnOnce() -> D,
    table: impl FnOnce(bool) -> String,
) -> String {
    match format {
        Format::Table | Format::Wide => table(format == Format::Wide),
        Format::Json => json(&doc()),
        Format::Yaml => yaml(&doc()),
    }
}

/// A listing's column: its header, whether it is shown, and its cell for one item.
type Column<'a, T> = (&'a str, bool, &'a dyn Fn(&T) -> String);

/// The table of `items` in the columns shown, a header first; an empty string for no
/// items (the caller says so on stderr, as kubectl does).
fn listing<T>(items: &[T], columns: &[Column<T>]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let shown: Vec<_> = columns.iter().filter(|c| c.1).collect();
    let mut rows = vec![shown.iter().map(|c| c.0.to_string()).collect()];
    rows.extend(
        items
            .iter()
            .map(|i| shown.iter().map(|c| (c.2)(i)).collect()),
    );
    table(&rows)
}

/// Left-aligned columns separated by three spaces, without trailing blanks (kubectl's look).
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    rows.iter().map(|row| padded_line(row, &widths)).collect()
}

/// YAML for a document, keys in the order the struct declares them. Strings are
/// double-quoted, so values such as MAC addresses are never read back as numbers;
/// sequences of maps use the compact `- key: value` form.
pub fn yaml<T: Serialize>(doc: &T) -> String {
    let value = serde_json::to_value(doc).unwrap_or(serde_json::Value::Null);
    serde_saphyr::to_string(&Quoted(&value)).unwrap_or_else(|e| format!("# {e}\n"))
}

/// A JSON value serialized with every string double-quoted.
struct Quoted<'a>(&'a serde_json::Value);

impl Serialize for Quoted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde_json::Value;
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(n) => n.serialize(s),
            Value::String(t) => serde_saphyr::DoubleQuoted(t.as_str()).serialize(s),
            Value::Array(items) => s.collect_seq(items.iter().map(Quoted)),
            Value::Object(m) => s.collect_map(m.iter().map(|(k, v)| (k, Quoted(v)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, subnet: &str, expires: i64) -> Lease {
        Lease {
            node_name: name.into(),
            subnet: subnet.into(),
            public_ip: "192.168.1.10".into(),
            backend_type: "vxlan".into(),
            vtep_mac: "0a:58:0a:f4:01:01".into(),
            expires_at_unix: expires,
            revision: 7,
            vni: 1,
            ..Default::default()
        }
    }

    #[test]
    fn humanize_like_kubectl() {
        let h = |s| humanize(Duration::from_secs(s));
        assert_eq!(h(0), "0s");
        assert_eq!(h(119), "119s");
        assert_eq!(h(120), "2m");
        assert_eq!(h(303), "5m3s");
        assert_eq!(h(3599), "59m59s");
        assert_eq!(h(3600), "1h");
        assert_eq!(h(86_399), "23h59m");
        assert_eq!(h(47 * 3600 + 60), "47h1m");
        assert_eq!(h(3 * 86_400 + 4 * 3600 + 5), "3d4h");
        assert_eq!(h(400 * 86_400), "400d");
    }

    #[test]
    fn table_aligns_columns() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let resp = ListLeasesResponse {
            leases: vec![
                Lease {
                    reserved: true,
                    ..lease("a", "10.244.1.0/24", 1_000_000 + 86_399)
                },
                lease("node-long-name", "10.244.12.0/24", 1_000_000 - 5),
            ],
            revision: 9,
            ..Default::default()
        };
        let out = render_leases(&resp, Format::Table, now);
        let expected = "\
NODE             SUBNET           PUBLIC-IP      VTEP-MAC            EXPIRES-IN   RESERVED
a                10.244.1.0/24    192.168.1.10   0a:58:0a:f4:01:01   23h59m       yes
node-long-name   10.244.12.0/24   192.168.1.10   0a:58:0a:f4:01:01   expired      no
";
        assert_eq!(out, expected);
        let wide = render_leases(&resp, Format::Wide, now);
        assert!(wide.starts_with("NODE "), "{wide}");
        assert!(
            wide.lines()
                .next()
                .unwrap()
                .ends_with("EXPIRES-IN   RESERVED   VNI   REVISION"),
            "{wide}"
        );
        assert!(
            wide.lines()
                .nth(1)
                .unwrap()
                .ends_with("23h59m       yes        1     7"),
            "{wide}"
        );
    }

    #[test]
    fn status_lists_host_gw_nodes_with_unreachable_peers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = StatusResponse {
            version: "0.1.0".into(),
            off_link: vec![twill_proto::OffLink {
                node: "node-c".into(),
                underlay: "192.0.2.0/24".into(),
                peers: vec!["node-a".into(), "node-b".into()],
            }],
            ..Default::default()
        };
        let t = render_status(&s, Format::Table, now);
        assert!(t.contains("Unreachable:"), "{t}");
        assert!(
            t.contains(
                "NODE     UNDERLAY       NO-ROUTE-TO\nnode-c   192.0.2.0/24   node-a,node-b\n"
            ),
            "{t}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render_status(&s, Format::Json, now)).unwrap();
        assert_eq!(v["off_link"][0]["peers"][1], "node-b");
        let quiet = render_status(&StatusResponse::default(), Format::Json, now);
        assert!(!quiet.contains("off_link"), "{quiet}");
    }

    #[test]
    fn dual_stack_leases_show_both_families() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let resp = ListLeasesResponse {
            leases: vec![Lease {
                ipv6_subnet: "fd00:10:244:1::/64".into(),
                public_ipv6: "2001:db8::10".into(),
                vtep_mac_v6: "0a:58:0a:f4:06:01".into(),
                ..lease("a", "10.244.1.0/24", 1_000_000 + 60)
            }],
            revision: 9,
            ..Default::default()
        };
        let out = render_leases(&resp, Format::Table, now);
        assert_eq!(
            out,
            "\
NODE   SUBNET          IPV6-SUBNET          PUBLIC-IP      VTEP-MAC            EXPIRES-IN   RESERVED
a      10.244.1.0/24   fd00:10:244:1::/64   192.168.1.10   0a:58:0a:f4:01:01   60s          no
"
        );
        let wide = render_leases(&resp, Format::Wide, now);
        assert!(
            wide.lines()
                .next()
                .unwrap()
                .ends_with("PUBLIC-IPV6    VTEP-MAC-V6"),
            "{wide}"
        );
        assert!(wide.contains("2001:db8::10   0a:58:0a:f4:06:01"), "{wide}");
        let v: serde_json::Value =
            serde_json::from_str(&render_leases(&resp, Format::Json, now)).unwrap();
        assert_eq!(v["leases"][0]["ipv6_subnet"], "fd00:10:244:1::/64");
        assert_eq!(v["leases"][0]["public_ipv6"], "2001:db8::10");
        let y = render_leases(&resp, Format::Yaml, now);
        assert!(y.contains("vtep_mac_v6: \"0a:58:0a:f4:06:01\""), "{y}");
        let v4 = ListLeasesResponse {
            leases: vec![lease("a", "10.244.1.0/24", 1_000_000 + 60)],
            ..Default::default()
        };
        assert!(!render_leases(&v4, Format::Json, now).contains("ipv6"));
    }

    #[test]
    fn ipv6_only_leases_show_the_ipv6_fields_in_place_of_the_ipv4_ones() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let resp = ListLeasesResponse {
            leases: vec![Lease {
                subnet: String::new(),
                public_ip: String::new(),
                vtep_mac: String::new(),
                ipv6_subnet: "fd00:10:244:1::/64".into(),
                public_ipv6: "2001:db8::10".into(),
                vtep_mac_v6: "0a:58:0a:f4:06:01".into(),
                ..lease("a", "", 1_000_000 + 60)
            }],
            ..Default::default()
        };
        assert_eq!(
            render_leases(&resp, Format::Table, now),
            "\
NODE   IPV6-SUBNET          PUBLIC-IPV6    VTEP-MAC-V6         EXPIRES-IN   RESERVED
a      fd00:10:244:1::/64   2001:db8::10   0a:58:0a:f4:06:01   60s          no
"
        );
        let r = Reservation {
            node_name: "a".into(),
            ipv6_subnet: "fd00:10:244:7::/64".into(),
            ..Default::default()
        };
        let out = render_reservations(std::slice::from_ref(&r), None, Format::Table);
        assert!(
            out.contains("IPV6-SUBNET") && out.contains("fd00:10:244:7::/64"),
            "{out}"
        );
        assert_eq!(
            render_reservation_change(&r, "created", Format::Table),
            "reservation/a created (subnet fd00:10:244:7::/64)\n"
        );
    }

    #[test]
    fn json_has_stable_keys() {
        let resp = ListLeasesResponse {
            leases: vec![lease("a", "10.244.1.0/24", 86_400)],
            revision: 3,
            ..Default::default()
        };
        let out = render_leases(&resp, Format::Json, UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["revision"], 3);
        let l = &v["leases"][0];
        assert_eq!(l["node_name"], "a");
        assert_eq!(l["subnet"], "10.244.1.0/24");
        assert_eq!(l["public_ip"], "192.168.1.10");
        assert_eq!(l["vtep_mac"], "0a:58:0a:f4:01:01");
        assert_eq!(l["vni"], 1);
        assert_eq!(l["revision"], 7);
        assert_eq!(l["expires_at_unix"], 86_400);
        assert_eq!(l["expires_at"], "1970-01-02T00:00:00Z");
        assert_eq!(l["reserved"], false);
        assert!(out.find("\"revision\"").unwrap() < out.find("\"leases\"").unwrap());
    }

    #[test]
    fn yaml_quotes_strings() {
        let resp = ListLeasesResponse {
            leases: vec![lease("a", "10.244.1.0/24", 86_400)],
            revision: 3,
            ..Default::default()
        };
        let out = render_leases(&resp, Format::Yaml, UNIX_EPOCH);
        assert!(
            out.starts_with("revision: 3\nleases:\n- node_name: \"a\"\n"),
            "{out}"
        );
        assert!(out.contains("  vtep_mac: \"0a:58:0a:f4:01:01\"\n"), "{out}");
        let empty = render_leases(&ListLeasesResponse::default(), Format::Yaml, UNIX_EPOCH);
        assert_eq!(empty, "revision: 0\nleases: []\n");
    }

    #[test]
    fn empty_table_prints_nothing() {
        assert_eq!(
            render_leases(&ListLeasesResponse::default(), Format::Table, UNIX_EPOCH),
            ""
        );
    }

    #[test]
    fn yaml_of_nested_documents() {
        let s = StatusResponse {
            subnets_total: 255,
            subnets_used: 1,
            subnets_free: 254,
            agents: vec![ConnectedAgent {
                name: "node-a".into(),
                connected_at_unix: 86_400,
                last_seen_unix: 86_400,
                revision: 4,
                revision_lag: 0,
                cert_not_after_unix: 86_400 * 8,
                ..Default::default()
            }],
            revision: 4,
            store_size_bytes: 2048,
            version: "0.1.0".into(),
            ..Default::default()
        };
        let y = render_status(&s, Format::Yaml, UNIX_EPOCH);
        let expected = "\
version: \"0.1.0\"
revision: 4
store_size_bytes: 2048
subnets_total: 255
subnets_used: 1
subnets_free: 254
subnets_reserved: 0
agents:
- name: \"node-a\"
  connected_at_unix: 86400
  connected_at: \"1970-01-02T00:00:00Z\"
  last_seen_unix: 86400
  last_seen: \"1970-01-02T00:00:00Z\"
  revision: 4
  revision_lag: 0
  cert_not_after_unix: 691200
  cert_not_after: \"1970-01-09T00:00:00Z\"
";
        assert_eq!(y, expected);
        let none = render_status(&StatusResponse::default(), Format::Yaml, UNIX_EPOCH);
        assert!(none.ends_with("agents: []\n"), "{none}");
        #[derive(Serialize)]
        struct Nested {
            a: Vec<Vec<u8>>,
            b: std::collections::BTreeMap<String, Vec<String>>,
        }
        let n = Nested {
            a: vec![vec![1, 2], vec![]],
            b: [("x-y".to_string(), vec!["z".to_string()])].into(),
        };
        assert_eq!(yaml(&n), "a:\n- - 1\n  - 2\n- []\nb:\n  x-y:\n  - \"z\"\n");
    }

    #[test]
    fn status_table() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let s = StatusResponse {
            subnets_total: 255,
            subnets_used: 3,
            subnets_free: 251,
            subnets_reserved: 1,
            agents: vec![ConnectedAgent {
                name: "node-a".into(),
                connected_at_unix: 10_000 - 303,
                last_seen_unix: 10_000 - 3,
                revision: 9,
                revision_lag: 1,
                cert_not_after_unix: 10_000 + 6 * 86_400 + 23 * 3600 + 59,
                ..Default::default()
            }],
            revision: 10,
            store_size_bytes: 3 * 1024 * 1024 / 2,
            version: "0.1.0".into(),
            ..Default::default()
        };
        let t = render_status(&s, Format::Table, now);
        let expected = "\
Version:      0.1.0
Revision:     10
Store size:   1.5 MiB
Subnets:      255 total, 3 used, 251 free, 1 reserved
Agents:       1 connected

NAME     CONNECTED   LAST-SEEN   REVISION   LAG   CERT-EXPIRES
node-a   5m3s        3s          9          1     6d23h
";
        assert_eq!(t, expected);
        let w = render_status(&s, Format::Wide, now);
        assert!(
            w.contains(
                "CERT-EXPIRES   CONNECTED-AT           LAST-SEEN-AT           CERT-NOT-AFTER\n"
            ),
            "{w}"
        );
        assert!(w.contains("   1970-01-08T01:47:39Z\n"), "{w}");
        let mut expired = s.clone();
        expired.agents[0].cert_not_after_unix = 10_000 - 1;
        let t = render_status(&expired, Format::Table, now);
        assert!(t.ends_with("   1     expired\n"), "{t}");
        expired.agents[0].cert_not_after_unix = 0;
        let t = render_status(&expired, Format::Table, now);
        assert!(t.ends_with("   1     <unknown>\n"), "{t}");
        let empty = render_status(&StatusResponse::default(), Format::Table, now);
        assert!(empty.ends_with("Agents:       none connected\n"), "{empty}");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
    }

    /// What a single-replica (sled) controller answers: no replicas, no agent replica.
    fn sled_status() -> StatusResponse {
        let agent = |name: &str, lag| ConnectedAgent {
            name: name.into(),
            connected_at_unix: 10_000 - 66,
            last_seen_unix: 10_000 - 6,
            revision: 12 - lag,
            revision_lag: lag,
            cert_not_after_unix: 10_000 + 4 * 86_400 + 11 * 3600,
            ..Default::default()
        };
        StatusResponse {
            subnets_total: 255,
            subnets_used: 2,
            subnets_free: 252,
            subnets_reserved: 2,
            reservations_stale: 1,
            agents: vec![agent("worker-1", 0), agent("worker-22", 2)],
            revision: 12,
            store_size_bytes: 1434,
            version: "0.1.0".into(),
            ..Default::default()
        }
    }

    /// Three replicas on etcd: the leader, a follower, and one that did not answer.
    fn ha_status() -> StatusResponse {
        let mut s = sled_status();
        s.reservations_stale = 0;
        s.agents[0].replica = "https://10.0.0.11:8474".into();
        s.agents[1].replica = "https://10.0.0.12:8474".into();
        s.replicas = vec![
            Replica {
                url: "https://10.0.0.11:8474".into(),
                leader: true,
                agents: 1,
                error: String::new(),
            },
            Replica {
                url: "https://10.0.0.12:8474".into(),
                leader: false,
                agents: 1,
                error: String::new(),
            },
            Replica {
                url: "https://10.0.0.13:8474".into(),
                leader: false,
                agents: 0,
                error: "transport error".into(),
            },
        ];
        s
    }

    /// Without replicas (the sled store), `status` prints exactly what it printed before
    /// high availability, in every format: these are the fixtures.
    #[test]
    fn status_without_replicas_is_unchanged() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let s = sled_status();
        let table = "\
Version:      0.1.0
Revision:     12
Store size:   1.4 KiB
Subnets:      255 total, 2 used, 252 free, 2 reserved (1 not honoured now: twillctl reservations -o yaml says why)
Agents:       2 connected

NAME        CONNECTED   LAST-SEEN   REVISION   LAG   CERT-EXPIRES
worker-1    66s         6s          12         0     4d11h
worker-22   66s         6s          10         2     4d11h
";
        assert_eq!(render_status(&s, Format::Table, now), table);
        let wide = "\
Version:      0.1.0
Revision:     12
Store size:   1.4 KiB
Subnets:      255 total, 2 used, 252 free, 2 reserved (1 not honoured now: twillctl reservations -o yaml says why)
Agents:       2 connected

NAME        CONNECTED   LAST-SEEN   REVISION   LAG   CERT-EXPIRES   CONNECTED-AT           LAST-SEEN-AT           CERT-NOT-AFTER
worker-1    66s         6s          12         0     4d11h          1970-01-01T02:45:34Z   1970-01-01T02:46:34Z   1970-01-05T13:46:40Z
worker-22   66s         6s          10         2     4d11h          1970-01-01T02:45:34Z   1970-01-01T02:46:34Z   1970-01-05T13:46:40Z
";
        assert_eq!(render_status(&s, Format::Wide, now), wide);
        let json = r#"{
  "version": "0.1.0",
  "revision": 12,
  "store_size_bytes": 1434,
  "subnets_total": 255,
  "subnets_used": 2,
  "subnets_free": 252,
  "subnets_reserved": 2,
  "reservations_stale": 1,
  "agents": [
    {
      "name": "worker-1",
      "connected_at_unix": 9934,
      "connected_at": "1970-01-01T02:45:34Z",
      "last_seen_unix": 9994,
      "last_seen": "1970-01-01T02:46:34Z",
      "revision": 12,
      "revision_lag": 0,
      "cert_not_after_unix": 395200,
      "cert_not_after": "1970-01-05T13:46:40Z"
    },
    {
      "name": "worker-22",
      "connected_at_unix": 9934,
      "connected_at": "1970-01-01T02:45:34Z",
      "last_seen_unix": 9994,
      "last_seen": "1970-01-01T02:46:34Z",
      "revision": 10,
      "revision_lag": 2,
      "cert_not_after_unix": 395200,
      "cert_not_after": "1970-01-05T13:46:40Z"
    }
  ]
}
"#;
        assert_eq!(render_status(&s, Format::Json, now), json);
        let yaml = "\
version: \"0.1.0\"
revision: 12
store_size_bytes: 1434
subnets_total: 255
subnets_used: 2
subnets_free: 252
subnets_reserved: 2
reservations_stale: 1
agents:
- name: \"worker-1\"
  connected_at_unix: 9934
  connected_at: \"1970-01-01T02:45:34Z\"
  last_seen_unix: 9994
  last_seen: \"1970-01-01T02:46:34Z\"
  revision: 12
  revision_lag: 0
  cert_not_after_unix: 395200
  cert_not_after: \"1970-01-05T13:46:40Z\"
- name: \"worker-22\"
  connected_at_unix: 9934
  connected_at: \"1970-01-01T02:45:34Z\"
  last_seen_unix: 9994
  last_seen: \"1970-01-01T02:46:34Z\"
  revision: 10
  revision_lag: 2
  cert_not_after_unix: 395200
  cert_not_after: \"1970-01-05T13:46:40Z\"
";
        assert_eq!(render_status(&s, Format::Yaml, now), yaml);
        let none = StatusResponse::default();
        let table = "\
Version:      <none>
Revision:     0
Store size:   0 B
Subnets:      0 total, 0 used, 0 free, 0 reserved
Agents:       none connected
";
        assert_eq!(render_status(&none, Format::Table, now), table);
        assert_eq!(render_status(&none, Format::Wide, now), table);
        let json = r#"{
  "version": "",
  "revision": 0,
  "store_size_bytes": 0,
  "subnets_total": 0,
  "subnets_used": 0,
  "subnets_free": 0,
  "subnets_reserved": 0,
  "agents": []
}
"#;
        assert_eq!(render_status(&none, Format::Json, now), json);
        let yaml = "\
version: \"\"
revision: 0
store_size_bytes: 0
subnets_total: 0
subnets_used: 0
subnets_free: 0
subnets_reserved: 0
agents: []
";
        assert_eq!(render_status(&none, Format::Yaml, now), yaml);
        for f in [Format::Table, Format::Wide, Format::Json, Format::Yaml] {
            let out = render_status(&s, f, now);
            assert!(!out.to_lowercase().contains("replica"), "{f:?}: {out}");
        }
    }

    #[test]
    fn status_with_replicas_table() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let s = ha_status();
        let expected = "\
Version:      0.1.0
Revision:     12
Store size:   1.4 KiB
Subnets:      255 total, 2 used, 252 free, 2 reserved
Replicas:     3 (leader https://10.0.0.11:8474, 1 unreachable)
Agents:       2 connected

URL                      ROLE       AGENTS      ERROR
https://10.0.0.11:8474   leader     1           <none>
https://10.0.0.12:8474   follower   1           <none>
https://10.0.0.13:8474   follower   <unknown>   unreachable: transport error

NAME        CONNECTED   LAST-SEEN   REVISION   LAG   CERT-EXPIRES   REPLICA
worker-1    66s         6s          12         0     4d11h          https://10.0.0.11:8474
worker-22   66s         6s          10         2     4d11h          https://10.0.0.12:8474
";
        assert_eq!(render_status(&s, Format::Table, now), expected);

        // All answered: no ERROR column, nor a count of unreachable ones.
        let mut up = s.clone();
        up.replicas.truncate(2);
        let t = render_status(&up, Format::Table, now);
        assert!(
            t.contains("\nReplicas:     2 (leader https://10.0.0.11:8474)\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "\n\nURL                      ROLE       AGENTS\n\
                 https://10.0.0.11:8474   leader     1\n\
                 https://10.0.0.12:8474   follower   1\n\n"
            ),
            "{t}"
        );

        // Between two elections.
        let mut leaderless = up.clone();
        leaderless.replicas[0].leader = false;
        let t = render_status(&leaderless, Format::Table, now);
        assert!(t.contains("\nReplicas:     2 (no leader now)\n"), "{t}");
        assert!(!t.contains("   leader   "), "{t}");

        // Replicas but no agents: the replica table ends the output; an agent whose
        // replica is not known says so.
        let mut idle = up.clone();
        idle.agents.clear();
        let t = render_status(&idle, Format::Table, now);
        assert!(t.contains("Agents:       none connected\n\nURL "), "{t}");
        assert!(
            t.ends_with("https://10.0.0.12:8474   follower   1\n"),
            "{t}"
        );
        let mut unknown = up;
        unknown.agents[1].replica.clear();
        let t = render_status(&unknown, Format::Table, now);
        assert!(t.ends_with("   4d11h          <none>\n"), "{t}");
    }

    #[test]
    fn status_with_replicas_wide() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let expected = "\
Version:      0.1.0
Revision:     12
Store size:   1.4 KiB
Subnets:      255 total, 2 used, 252 free, 2 reserved
Replicas:     3 (leader https://10.0.0.11:8474, 1 unreachable)
Agents:       2 connected

URL                      ROLE       AGENTS      ERROR
https://10.0.0.11:8474   leader     1           <none>
https://10.0.0.12:8474   follower   1           <none>
https://10.0.0.13:8474   follower   <unknown>   unreachable: transport error

NAME        CONNECTED   LAST-SEEN   REVISION   LAG   CERT-EXPIRES   REPLICA                  CONNECTED-AT           LAST-SEEN-AT           CERT-NOT-AFTER
worker-1    66s         6s          12         0     4d11h          https://10.0.0.11:8474   1970-01-01T02:45:34Z   1970-01-01T02:46:34Z   1970-01-05T13:46:40Z
worker-22   66s         6s          10         2     4d11h          https://10.0.0.12:8474   1970-01-01T02:45:34Z   1970-01-01T02:46:34Z   1970-01-05T13:46:40Z
";
        assert_eq!(render_status(&ha_status(), Format::Wide, now), expected);
    }

    #[test]
    fn status_with_replicas_json() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let out = render_status(&ha_status(), Format::Json, now);
        let expected = r#"{
  "version": "0.1.0",
  "revision": 12,
  "store_size_bytes": 1434,
  "subnets_total": 255,
  "subnets_used": 2,
  "subnets_free": 252,
  "subnets_reserved": 2,
  "replicas": [
    {
      "url": "https://10.0.0.11:8474",
      "leader": true,
      "agents": 1
    },
    {
      "url": "https://10.0.0.12:8474",
      "leader": false,
      "agents": 1
    },
    {
      "url": "https://10.0.0.13:8474",
      "leader": false,
      "agents": 0,
      "error": "transport error"
    }
  ],
  "agents": [
    {
      "name": "worker-1",
      "connected_at_unix": 9934,
      "connected_at": "1970-01-01T02:45:34Z",
      "last_seen_unix": 9994,
      "last_seen": "1970-01-01T02:46:34Z",
      "revision": 12,
      "revision_lag": 0,
      "cert_not_after_unix": 395200,
      "cert_not_after": "1970-01-05T13:46:40Z",
      "replica": "https://10.0.0.11:8474"
    },
    {
      "name": "worker-22",
      "connected_at_unix": 9934,
      "connected_at": "1970-01-01T02:45:34Z",
      "last_seen_unix": 9994,
      "last_seen": "1970-01-01T02:46:34Z",
      "revision": 10,
      "revision_lag": 2,
      "cert_not_after_unix": 395200,
      "cert_not_after": "1970-01-05T13:46:40Z",
      "replica": "https://10.0.0.12:8474"
    }
  ]
}
"#;
        assert_eq!(out, expected);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let replicas = v["replicas"].as_array().unwrap();
        assert_eq!(replicas.len(), 3);
        let keys: Vec<&str> = replicas[2]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["url", "leader", "agents", "error"],
            "a stable interface"
        );
        assert!(replicas[0].get("error").is_none());
        assert_eq!(replicas[0]["leader"], true);
        assert_eq!(replicas[2]["error"], "transport error");
        assert_eq!(v["agents"][1]["replica"], "https://10.0.0.12:8474");
        let mut unknown = ha_status();
        unknown.agents[1].replica.clear();
        let v: serde_json::Value =
            serde_json::from_str(&render_status(&unknown, Format::Json, now)).unwrap();
        assert!(v["agents"][1].get("replica").is_none());
    }

    #[test]
    fn status_with_replicas_yaml() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let expected = "\
version: \"0.1.0\"
revision: 12
store_size_bytes: 1434
subnets_total: 255
subnets_used: 2
subnets_free: 252
subnets_reserved: 2
replicas:
- url: \"https://10.0.0.11:8474\"
  leader: true
  agents: 1
- url: \"https://10.0.0.12:8474\"
  leader: false
  agents: 1
- url: \"https://10.0.0.13:8474\"
  leader: false
  agents: 0
  error: \"transport error\"
agents:
- name: \"worker-1\"
  connected_at_unix: 9934
  connected_at: \"1970-01-01T02:45:34Z\"
  last_seen_unix: 9994
  last_seen: \"1970-01-01T02:46:34Z\"
  revision: 12
  revision_lag: 0
  cert_not_after_unix: 395200
  cert_not_after: \"1970-01-05T13:46:40Z\"
  replica: \"https://10.0.0.11:8474\"
- name: \"worker-22\"
  connected_at_unix: 9934
  connected_at: \"1970-01-01T02:45:34Z\"
  last_seen_unix: 9994
  last_seen: \"1970-01-01T02:46:34Z\"
  revision: 10
  revision_lag: 2
  cert_not_after_unix: 395200
  cert_not_after: \"1970-01-05T13:46:40Z\"
  replica: \"https://10.0.0.12:8474\"
";
        assert_eq!(render_status(&ha_status(), Format::Yaml, now), expected);
    }

    #[test]
    fn config_table_and_json() {
        let c = GetConfigResponse {
            net_conf_json: "{\"Network\": \"10.244.0.0/16\"}\n".into(),
            network: "10.244.0.0/16".into(),
            subnet_len: 24,
            subnet_min: "10.244.1.0/24".into(),
            subnet_max: "10.244.255.0/24".into(),
            backend_type: "vxlan".into(),
            vni: 1,
            port: 0,
            mtu: 0,
            direct_routing: false,
            lease_ttl_seconds: 86_400,
            ..Default::default()
        };
        let t = render_config(&c, Format::Table);
        assert!(
            t.starts_with("FIELD                   VALUE\nNetwork                 10.244.0.0/16\n"),
            "{t}"
        );
        assert!(
            t.contains("\nBackend.Port            0 (kernel default, 8472)\n"),
            "{t}"
        );
        assert!(t.ends_with("\nLeaseTTL                24h\n"), "{t}");
        let w = render_config(&c, Format::Wide);
        assert!(
            w.ends_with("net-conf.json           {\"Network\":\"10.244.0.0/16\"}\n"),
            "{w}"
        );
        let v: serde_json::Value = serde_json::from_str(&render_config(&c, Format::Json)).unwrap();
        assert_eq!(v["network"], "10.244.0.0/16");
        assert_eq!(v["subnet_len"], 24);
        assert_eq!(v["lease_ttl_seconds"], 86_400);
    }

    #[test]
    fn a_stale_reservation_says_why() {
        let rs = vec![Reservation {
            node_name: "node-x".into(),
            subnet: "10.244.0.0/24".into(),
            stale: "10.244.0.0/24 is outside SubnetMin".into(),
            ..Default::default()
        }];
        let v: serde_json::Value =
            serde_json::from_str(&render_reservations(&rs, None, Format::Json)).unwrap();
        assert_eq!(
            v["reservations"][0]["stale"],
            "10.244.0.0/24 is outside SubnetMin"
        );
        let s = StatusResponse {
            subnets_reserved: 1,
            reservations_stale: 1,
            ..Default::default()
        };
        let t = render_status(&s, Format::Table, UNIX_EPOCH);
        assert!(t.contains("1 reserved (1 not honoured now"), "{t}");
        let v: serde_json::Value =
            serde_json::from_str(&render_status(&s, Format::Json, UNIX_EPOCH)).unwrap();
        assert_eq!(v["reservations_stale"], 1);
    }

    #[test]
    fn reservations_and_changes() {
        let rs = vec![
            Reservation {
                node_name: "node-a".into(),
                subnet: "10.244.1.0/24".into(),
                ..Default::default()
            },
            Reservation {
                node_name: "node-b".into(),
                subnet: "10.244.9.0/24".into(),
                ..Default::default()
            },
        ];
        let leases = vec![lease("node-a", "10.244.1.0/24", 1)];
        assert_eq!(
            render_reservations(&rs, None, Format::Table),
            "NODE     SUBNET\nnode-a   10.244.1.0/24\nnode-b   10.244.9.0/24\n"
        );
        assert_eq!(
            render_reservations(&rs, Some(&leases), Format::Wide),
            "NODE     SUBNET          IN-USE\nnode-a   10.244.1.0/24   yes\nnode-b   10.244.9.0/24   no\n"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render_reservations(&rs, None, Format::Json)).unwrap();
        assert_eq!(v["reservations"][1]["subnet"], "10.244.9.0/24");
        assert!(v["reservations"][1].get("in_use").is_none());
        assert_eq!(render_reservations(&[], None, Format::Table), "");
        assert_eq!(
            render_reservation_change(&rs[0], "created", Format::Table),
            "reservation/node-a created (subnet 10.244.1.0/24)\n"
        );
        assert_eq!(
            render_revoked(&lease("node-a", "10.244.1.0/24", 1), Format::Table),
            "lease/node-a revoked (subnet 10.244.1.0/24)\n"
        );
    }

    #[test]
    fn watch_lines_show_both_families_of_a_dual_stack_lease() {
        use twill_proto::LeaseEvent;
        let resp = WatchResponse {
            events: vec![LeaseEvent {
                r#type: EventType::Put as i32,
                lease: Some(Lease {
                    ipv6_subnet: "fd00:10:244:1::/64".into(),
                    public_ipv6: "2001:db8::10".into(),
                    vtep_mac_v6: "0a:58:0a:f4:06:01".into(),
                    ..lease("node-a", "10.244.1.0/24", 86_400)
                }),
                revision: 7,
            }],
            revision: 7,
            ..Default::default()
        };
        let out = WatchPrinter::new(Format::Table).render(&resp, UNIX_EPOCH);
        let row = out.lines().nth(1).unwrap();
        assert!(
            row.contains("10.244.1.0/24,fd00:10:244:1::/64")
                && row.contains("192.168.1.10,2001:db8::10")
                && row.ends_with("0a:58:0a:f4:01:01,0a:58:0a:f4:06:01"),
            "{out}"
        );
    }

    #[test]
    fn watch_lines() {
        use twill_proto::LeaseEvent;
        let now = UNIX_EPOCH;
        let snapshot = WatchResponse {
            reset: true,
            events: vec![LeaseEvent {
                r#type: EventType::Put as i32,
                lease: Some(lease("node-a", "10.244.1.0/24", 86_400)),
                revision: 7,
            }],
            revision: 12,
            ..Default::default()
        };
        let change = WatchResponse {
            reset: false,
            events: vec![LeaseEvent {
                r#type: EventType::Delete as i32,
                lease: Some(lease("node-a", "10.244.1.0/24", 86_400)),
                revision: 13,
            }],
            revision: 13,
            ..Default::default()
        };
        let mut p = WatchPrinter::new(Format::Table);
        let t = p.render(&snapshot, now) + &p.render(&change, now);
        let expected = "\
REVISION   TYPE     NODE               SUBNET               PUBLIC-IP         VTEP-MAC
12         RESET    (the complete lease table follows: 1 lease)
7          PUT      node-a             10.244.1.0/24        192.168.1.10      0a:58:0a:f4:01:01
13         DELETE   node-a             10.244.1.0/24        192.168.1.10      0a:58:0a:f4:01:01
";
        assert_eq!(t, expected);
        let mut p = WatchPrinter::new(Format::Json);
        let j = p.render(&snapshot, now) + &p.render(&change, now);
        let lines: Vec<serde_json::Value> = j
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{j}");
        assert_eq!(lines[0]["type"], "RESET");
        assert_eq!(lines[0]["revision"], 12);
        assert!(lines[0].get("lease").is_none());
        assert_eq!(lines[1]["type"], "PUT");
        assert_eq!(lines[1]["lease"]["node_name"], "node-a");
        assert_eq!(lines[2]["type"], "DELETE");
        assert_eq!(lines[2]["revision"], 13);
        let mut p = WatchPrinter::new(Format::Yaml);
        let y = p.render(&change, now);
        assert!(
            y.starts_with("---\ntype: \"DELETE\"\nrevision: 13\nlease:\n  node_name: \"node-a\"\n"),
            "{y}"
        );
    }

    fn networks() -> Vec<NetworkInfo> {
        vec![
            NetworkInfo {
                name: "blue".into(),
                ipv4_network: "10.10.0.0/16".into(),
                backend_type: "vxlan".into(),
                vni: 2,
                nodes: vec!["gpu-*".into(), "db-1".into()],
                leases: 3,
                subnets_free: 252,
                subnets_total: 255,
                net_conf_json: r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan","VNI":2},"Nodes":["gpu-*","db-1"]}"#.into(),
                ..Default::default()
            },
            NetworkInfo {
                name: "default".into(),
                ipv4_network: "10.244.0.0/16".into(),
                ipv6_network: "fd00:10:244::/56".into(),
                backend_type: "vxlan".into(),
                vni: 1,
                leases: 5,
                subnets_free: 250,
                subnets_total: 255,
                ..Default::default()
            },
            NetworkInfo {
                name: "red".into(),
                ipv4_network: "10.20.0.0/16".into(),
                backend_type: "host-gw".into(),
                nodes: vec!["a".into(), "b".into(), "c".into(), "d".into(), "e".into()],
                leases: 1,
                subnets_free: 254,
                subnets_total: 255,
                retired: true,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn pods_table_wide_json_and_yaml() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let pods = vec![
            PodAttachment {
                network: String::new(),
                container_id: "0123456789abcdef0123".into(),
                ifname: "eth0".into(),
                namespace: "web".into(),
                pod: "front-1".into(),
                ips: vec!["10.244.3.5".into(), "fd00:10:244:3::5".into()],
                added_at_unix: 1_000_000 - 7200,
                node_name: "node-a".into(),
            },
            PodAttachment {
                network: "blue".into(),
                container_id: "feed".into(),
                ifname: "net1".into(),
                ips: vec!["10.10.1.9".into()],
                added_at_unix: 1_000_000 - 30,
                node_name: "node-b".into(),
                ..Default::default()
            },
        ];
        assert_eq!(
            render_pods(&pods, Format::Table, now),
            "\
NAMESPACE   POD       NODE     NETWORK   IP           IPV6               CONTAINER      AGE
web         front-1   node-a   default   10.244.3.5   fd00:10:244:3::5   0123456789ab   2h
<none>      <none>    node-b   blue      10.10.1.9    <none>             feed           30s
"
        );
        let wide = render_pods(&pods, Format::Wide, now);
        assert!(
            wide.lines().next().unwrap().ends_with("AGE   IFNAME"),
            "{wide}"
        );
        assert!(wide.contains("0123456789abcdef0123"), "{wide}");
        assert_eq!(render_pods(&[], Format::Table, now), "");
        let v: serde_json::Value =
            serde_json::from_str(&render_pods(&pods, Format::Json, now)).unwrap();
        assert_eq!(v["pods"][0]["node"], "node-a");
        assert_eq!(v["pods"][0]["network"], "default");
        assert_eq!(
            v["pods"][0]["ips"],
            serde_json::json!(["10.244.3.5", "fd00:10:244:3::5"])
        );
        assert_eq!(v["pods"][1]["ifname"], "net1");
        let y = render_pods(&pods[1..], Format::Yaml, now);
        assert!(y.contains("node: \"node-b\""), "{y}");
    }

    #[test]
    fn findings_table_and_json() {
        let findings = vec![PodAddressFinding {
            kind: "leaked".into(),
            network: String::new(),
            ip: "10.244.3.9".into(),
            container_id: "0123456789abcdef".into(),
            node_name: "node-a".into(),
        }];
        assert_eq!(
            render_findings(&findings, Format::Table),
            "\
NODE     NETWORK   IP           KIND     CONTAINER
node-a   default   10.244.3.9   LEAKED   0123456789ab
"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render_findings(&findings, Format::Json)).unwrap();
        assert_eq!(v["findings"][0]["kind"], "leaked");
        assert_eq!(render_findings(&[], Format::Table), "");
    }

    #[test]
    fn status_names_the_nearly_full_subnets() {
        let u = |node: &str, used: u64| PodAddressUsage {
            network: String::new(),
            family: "ipv4".into(),
            used,
            node_name: node.into(),
            subnet: "10.244.4.0/24".into(),
            total: 253,
        };
        let usage = [u("node-b", 228), u("node-a", 227)];
        let t = render_nearly_full(&usage, Format::Table);
        assert!(t.starts_with("\nNearly full"), "{t}");
        assert!(t.contains("node-b") && !t.contains("node-a"), "{t}");
        assert_eq!(render_nearly_full(&usage, Format::Json), "");
        assert_eq!(render_nearly_full(&[u("node-a", 10)], Format::Table), "");
    }

    #[test]
    fn ipam_table_and_json() {
        let usage = vec![
            PodAddressUsage {
                network: String::new(),
                family: "ipv4".into(),
                used: 230,
                node_name: "node-b".into(),
                subnet: "10.244.4.0/24".into(),
                total: 253,
            },
            PodAddressUsage {
                network: "blue".into(),
                family: "ipv4".into(),
                used: 2,
                node_name: "node-a".into(),
                subnet: "10.10.1.0/24".into(),
                total: 253,
            },
        ];
        assert_eq!(
            render_ipam(&usage, Format::Table),
            "\
NODE     NETWORK   FAMILY   SUBNET          USED   TOTAL   USE%
node-b   default   ipv4     10.244.4.0/24   230    253     90%
node-a   blue      ipv4     10.10.1.0/24    2      253     0%
"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render_ipam(&usage, Format::Json)).unwrap();
        assert_eq!(v["subnets"][0]["used"], 230);
        assert_eq!(v["subnets"][0]["network"], "default");
        assert_eq!(render_ipam(&[], Format::Table), "");
    }

    #[test]
    fn networks_table_shows_who_may_join_and_what_is_free() {
        let ns = networks();
        assert_eq!(
            render_networks(&ns, Format::Table),
            "\
NAME      IPV4            IPV6               VNI   BACKEND   NODES           LEASES   FREE   STATUS
blue      10.10.0.0/16    <none>             2     vxlan     gpu-*,db-1      3        252    active
default   10.244.0.0/16   fd00:10:244::/56   1     vxlan     *               5        250    active
red       10.20.0.0/16    <none>             —     host-gw   a,b,c,+2 more   1        254    retired
"
        );
        let wide = render_networks(&ns, Format::Wide);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(lines[0].ends_with("STATUS    TOTAL"), "{wide}");
        assert!(lines[1].ends_with("active    255"), "{wide}");
        assert!(lines[3].contains("a,b,c,d,e"), "{wide}");
        assert_eq!(render_networks(&[], Format::Table), "");
    }

    #[test]
    fn networks_json_and_yaml() {
        let ns = networks();
        let v: serde_json::Value =
            serde_json::from_str(&render_networks(&ns, Format::Json)).unwrap();
        let blue = &v["networks"][0];
        assert_eq!(blue["name"], "blue");
        assert_eq!(blue["ipv4_network"], "10.10.0.0/16");
        assert_eq!(blue["ipv6_network"], "");
        assert_eq!(blue["vni"], 2);
        assert_eq!(blue["nodes"], serde_json::json!(["gpu-*", "db-1"]));
        assert_eq!(blue["leases"], 3);
        assert_eq!(blue["subnets_free"], 252);
        assert_eq!(blue["subnets_total"], 255);
        assert_eq!(blue["retired"], false);
        assert!(blue["net_conf_json"]
            .as_str()
            .unwrap()
            .contains("\"Nodes\""));
        assert_eq!(v["networks"][1]["nodes"], serde_json::json!([]));
        assert_eq!(v["networks"][2]["vni"], 0);
        assert_eq!(v["networks"][2]["retired"], true);
        let y = render_networks(&ns[..1], Format::Yaml);
        assert!(
            y.starts_with("networks:\n- name: \"blue\"\n  ipv4_network: \"10.10.0.0/16\"\n"),
            "{y}"
        );
        assert!(y.contains("  nodes:\n  - \"gpu-*\"\n  - \"db-1\"\n"), "{y}");
        assert_eq!(
            render_networks(&[], Format::Json),
            "{\n  \"networks\": []\n}\n"
        );
    }

    #[test]
    fn leases_name_their_network_in_documents_only() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let resp = ListLeasesResponse {
            leases: vec![Lease {
                network: "blue".into(),
                vni: 2,
                ..lease("gpu-1", "10.10.3.0/24", 1_000_000 + 60)
            }],
            revision: 4,
            ..Default::default()
        };
        let table = render_leases(&resp, Format::Table, now);
        assert!(
            !table.contains("NETWORK") && !table.contains("blue"),
            "{table}"
        );
        let wide = render_leases(&resp, Format::Wide, now);
        assert!(
            !wide.contains("NETWORK") && wide.lines().nth(1).unwrap().ends_with("   2     7"),
            "the list is of one network, asked for: {wide}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render_leases(&resp, Format::Json, now)).unwrap();
        assert_eq!(v["leases"][0]["network"], "blue");
        let default = render_lease(&lease("a", "10.244.1.0/24", 1), Format::Yaml, now);
        assert!(
            default.starts_with("node_name: \"a\"\nnetwork: \"default\"\n"),
            "{default}"
        );
        let revoked = Lease {
            network: "blue".into(),
            ..lease("gpu-1", "10.10.3.0/24", 1)
        };
        assert_eq!(
            render_revoked(&revoked, Format::Table),
            "lease/gpu-1 in network blue revoked (subnet 10.10.3.0/24)\n"
        );
        let r = Reservation {
            node_name: "gpu-1".into(),
            subnet: "10.10.3.0/24".into(),
            network: "blue".into(),
            ..Default::default()
        };
        assert_eq!(
            render_reservation_change(&r, "created", Format::Table),
            "reservation/gpu-1 in network blue created (subnet 10.10.3.0/24)\n"
        );
        let v: serde_json::Value = serde_json::from_str(&render_reservations(
            std::slice::from_ref(&r),
            None,
            Format::Json,
        ))
        .unwrap();
        assert_eq!(v["reservations"][0]["network"], "blue");
        let t = render_reservations(std::slice::from_ref(&r), None, Format::Table);
        assert!(!t.contains("blue"), "{t}");
    }

    #[test]
    fn watching_several_networks_names_each_lease_network() {
        use twill_proto::LeaseEvent;
        let event = |network: &str, revision| LeaseEvent {
            r#type: EventType::Put as i32,
            lease: Some(Lease {
                network: network.into(),
                ..lease("node-a", "10.244.1.0/24", 86_400)
            }),
            revision,
        };
        let resp = WatchResponse {
            events: vec![event("", 7), event("blue", 8)],
            revision: 8,
            ..Default::default()
        };
        let one = WatchPrinter::new(Format::Table).render(&resp, UNIX_EPOCH);
        assert!(!one.contains("NETWORK"), "{one}");
        let several = WatchPrinter::new(Format::Table)
            .with_network_column()
            .render(&resp, UNIX_EPOCH);
        let lines: Vec<&str> = several.lines().collect();
        assert!(
            lines[0].ends_with("VTEP-MAC            NETWORK"),
            "{several}"
        );
        assert!(
            lines[1].ends_with("0a:58:0a:f4:01:01   default"),
            "{several}"
        );
        assert!(lines[2].ends_with("0a:58:0a:f4:01:01   blue"), "{several}");
        let wide = WatchPrinter::new(Format::Wide).render(&resp, UNIX_EPOCH);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(
            lines[0].ends_with("EXPIRES-IN   VNI        NETWORK"),
            "{wide}"
        );
        assert!(lines[2].ends_with("24h          1          blue"), "{wide}");
        let j = WatchPrinter::new(Format::Json).render(&resp, UNIX_EPOCH);
        let second: serde_json::Value = serde_json::from_str(j.lines().nth(1).unwrap()).unwrap();
        assert_eq!(second["lease"]["network"], "blue");
    }

    fn token(id: &str, description: &str, uses: u64, last_used: i64) -> BootstrapToken {
        BootstrapToken {
            id: id.into(),
            description: description.into(),
            created_at_unix: 1_000_000 - 600,
            expires_at_unix: 1_000_000 + 86_399,
            uses,
            last_used_unix: last_used,
            ..Default::default()
        }
    }

    #[test]
    fn tokens_table() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ts = vec![
            token("abc123", "worker pool\tB", 0, 0),
            token("zz9xy0", "", 3, 1_000_000 - 303),
        ];
        let t = render_tokens(&ts, Format::Table, now);
        let expected = "\
ID       DESCRIPTION     NODES   EXPIRES-IN   USES   LAST-USED
abc123   worker pool B   *       23h59m       0      never
zz9xy0   <none>          *       23h59m       3      5m3s
";
        assert_eq!(t, expected);
        let w = render_tokens(&ts, Format::Wide, now);
        let lines: Vec<&str> = w.lines().collect();
        assert!(
            lines[0].ends_with("LAST-USED   USES-LEFT   CREATED   EXPIRES-AT"),
            "{w}"
        );
        assert!(
            lines[1].ends_with("never       unlimited   10m       1970-01-13T13:46:39Z"),
            "{w}"
        );
        assert_eq!(render_tokens(&[], Format::Table, now), "");
        assert_eq!(render_tokens(&[], Format::Wide, now), "");
        let expired = BootstrapToken {
            expires_at_unix: 1_000_000 - 1,
            ..token("old000", "x", 0, 0)
        };
        assert!(render_tokens(&[expired], Format::Table, now).contains(" expired "));
    }

    #[test]
    fn tokens_show_their_binding_and_uses_left() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ts = vec![
            BootstrapToken {
                node_prefix: "worker-".into(),
                max_uses: 50,
                ..token("abc123", "pool", 3, 1_000_000 - 303)
            },
            BootstrapToken {
                nodes: vec!["db-1".into(), "db-2".into()],
                max_uses: 2,
                ..token("def456", "", 2, 1_000_000 - 60)
            },
            BootstrapToken {
                nodes: (1..=5).map(|i| format!("n{i}")).collect(),
                node_prefix: "x\ty".into(),
                ..token("ghi789", "", 0, 0)
            },
        ];
        let t = render_tokens(&ts, Format::Table, now);
        let expected = "\
ID       DESCRIPTION   NODES              EXPIRES-IN   USES   LAST-USED
abc123   pool          worker-*           23h59m       3/50   5m3s
def456   <none>        db-1,db-2          23h59m       2/2    60s
ghi789   <none>        n1,n2,n3,+3 more   23h59m       0      never
";
        assert_eq!(t, expected);
        let w = render_tokens(&ts, Format::Wide, now);
        let lines: Vec<&str> = w.lines().collect();
        assert!(
            lines[0].contains("   USES   LAST-USED   USES-LEFT   CREATED"),
            "{w}"
        );
        assert!(
            lines[1].contains("   3/50   5m3s        47          10m"),
            "{w}"
        );
        assert!(
            lines[2].contains("   2/2    60s         0           10m"),
            "{w}"
        );
        assert!(lines[3].contains(" n1,n2,n3,n4,n5,x y* "), "{w}");
        assert!(lines[3].contains("   never       unlimited   10m"), "{w}");
        // Four names fit: "+1 more" would not be shorter than the name.
        let four = BootstrapToken {
            nodes: (1..=4).map(|i| format!("n{i}")).collect(),
            ..token("jkl012", "", 0, 0)
        };
        assert!(render_tokens(&[four], Format::Table, now).contains(" n1,n2,n3,n4 "));

        let v: serde_json::Value =
            serde_json::from_str(&render_tokens(&ts, Format::Json, now)).unwrap();
        let list = v["tokens"].as_array().unwrap();
        assert_eq!(list[0]["nodes"], serde_json::json!([]));
        assert_eq!(list[0]["node_prefix"], "worker-");
        assert_eq!(list[0]["max_uses"], 50);
        assert_eq!(list[0]["uses_left"], 47);
        assert_eq!(list[1]["nodes"], serde_json::json!(["db-1", "db-2"]));
        assert_eq!(list[1]["uses_left"], 0);
        assert_eq!(list[2]["max_uses"], 0);
        assert!(list[2]["uses_left"].is_null());
        // More uses than it was made for (a controller that counts a race twice): 0 left.
        let over = BootstrapToken {
            max_uses: 1,
            ..token("mno345", "", 2, 0)
        };
        assert_eq!(uses_left(&over), Some(0));
        let y = render_tokens(&ts[1..2], Format::Yaml, now);
        assert!(
            y.contains("\n  nodes:\n  - \"db-1\"\n  - \"db-2\"\n  node_prefix: \"\"\n  max_uses: 2\n  uses_left: 0\n"),
            "{y}"
        );
    }

    #[test]
    fn tokens_json_and_yaml_have_no_secret() {
        let ts = vec![
            token("abc123", "pool a", 0, 0),
            token("def456", "pool b", 2, 86_400),
        ];
        let out = render_tokens(&ts, Format::Json, UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let list = v["tokens"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        let a = &list[0];
        let keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
        let expected = [
            "id",
            "description",
            "created_at_unix",
            "created_at",
            "expires_at_unix",
            "expires_at",
            "uses",
            "last_used_unix",
            "last_used",
            "nodes",
            "node_prefix",
            "max_uses",
            "uses_left",
        ];
        assert_eq!(keys, expected, "the fields are a stable interface");
        assert!(
            !out.contains("secret") && !out.contains("\"token\""),
            "no field may carry a secret:\n{out}"
        );
        assert_eq!(a["id"], "abc123");
        assert_eq!(a["description"], "pool a");
        assert_eq!(a["uses"], 0);
        assert_eq!(a["last_used_unix"], 0);
        assert!(a["last_used"].is_null());
        assert_eq!(a["expires_at_unix"], 1_000_000 + 86_399);
        assert_eq!(a["expires_at"], "1970-01-13T13:46:39Z");
        assert_eq!(list[1]["uses"], 2);
        assert_eq!(list[1]["last_used"], "1970-01-02T00:00:00Z");
        assert_eq!(
            render_tokens(&[], Format::Json, UNIX_EPOCH),
            "{\n  \"tokens\": []\n}\n"
        );
        let y = render_tokens(&ts[..1], Format::Yaml, UNIX_EPOCH);
        assert!(
            y.starts_with("tokens:\n- id: \"abc123\"\n  description: \"pool a\"\n"),
            "{y}"
        );
        assert!(y.contains("\n  last_used: null\n"), "{y}");
        assert_eq!(render_tokens(&[], Format::Yaml, UNIX_EPOCH), "tokens: []\n");
    }

    #[test]
    fn token_delete_never_repeats_a_secret() {
        assert_eq!(token_id("abc123"), "abc123");
        assert_eq!(token_id("abc123.0123456789abcdef"), "abc123");
        assert_eq!(
            render_token_deleted("abc123.0123456789abcdef", Format::Table),
            "token/abc123 deleted\n"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render_token_deleted("abc123", Format::Json)).unwrap();
        assert_eq!(v, serde_json::json!({"id": "abc123", "deleted": true}));
        let y = render_token_deleted("abc123.0123456789abcdef", Format::Yaml);
        assert_eq!(y, "id: \"abc123\"\ndeleted: true\n");
    }

    const KEY: &str = "2d5daf46033bf6595e4c12269602541565cde5d1d1cdcb50f23c73b34235b722";

    #[test]
    fn issued_certificates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cs = vec![
            IssuedCertificate {
                node_name: "worker-1".into(),
                serial: "3f2a9c01".into(),
                issued_at_unix: 1_000_000 - 7200,
                not_after_unix: 1_000_000 + 365 * 86_400,
                token_id: "abc123".into(),
                key_sha256: KEY.into(),
            },
            IssuedCertificate {
                node_name: "worker-22".into(),
                serial: "01".into(),
                issued_at_unix: 1_000_000 - 30,
                not_after_unix: 1_000_000 + 3600,
                token_id: String::new(),
                key_sha256: String::new(),
            },
        ];
        let t = render_issued(&cs, Format::Table, now);
        let expected = "\
NODE        SERIAL     ISSUED   EXPIRES-IN   TOKEN    KEY-SHA256
worker-1    3f2a9c01   2h       365d         abc123   2d5daf46033bf659
worker-22   01         30s      1h           <none>   <none>
";
        assert_eq!(t, expected);
        let w = render_issued(&cs, Format::Wide, now);
        let lines: Vec<&str> = w.lines().collect();
        assert!(
            lines[0].ends_with(&format!(
                "TOKEN    KEY-SHA256{}   ISSUED-AT              NOT-AFTER",
                " ".repeat(54)
            )),
            "{w}"
        );
        assert!(
            lines[1].contains(&format!("   abc123   {KEY}   1970-01-12T11:46:40Z")),
            "{w}"
        );
        assert_eq!(render_issued(&[], Format::Table, now), "");
        let out = render_issued(&cs, Format::Json, now);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let c = &v["certificates"][0];
        assert_eq!(c["node_name"], "worker-1");
        assert_eq!(c["serial"], "3f2a9c01");
        assert_eq!(c["issued_at_unix"], 1_000_000 - 7200);
        assert_eq!(c["issued_at"], "1970-01-12T11:46:40Z");
        assert_eq!(c["not_after_unix"], 1_000_000 + 365 * 86_400);
        assert_eq!(c["token_id"], "abc123");
        assert_eq!(c["key_sha256"], KEY);
        assert_eq!(v["certificates"][1]["token_id"], "");
        assert_eq!(v["certificates"][1]["key_sha256"], "");
        assert_eq!(
            render_issued(&[], Format::Json, now),
            "{\n  \"certificates\": []\n}\n"
        );
        assert_eq!(render_issued(&[], Format::Yaml, now), "certificates: []\n");
    }
}
