//! Every node's pods as its agent last reported them (REFERENCE 2.11), in memory.
//!
//! The truth lives on the nodes (host-local's files and the agents' journals); this
//! table is the place to read it from. It is not stored: a controller that restarts,
//! or a new leader, has it back as agents report again (on every new watch; when any
//! replica sees the leader change it asks its agents on their watch, `Hub::ask_pods`;
//! and every few minutes), where storing it would put every pod's ADD and DEL in the
//! store's write path. A node's report replaces its last one whole, and is checked against
//! its leases before anything is kept: a node reports only for itself (the caller),
//! only in networks it holds a lease in, only addresses inside those leases' subnets.
//! A node's pods leave with its lease (a listing skips networks it no longer holds).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};
use thiserror::Error;
use twill_common::model::{Family, NodeName, PerFamily};
use twill_common::networks::NetworkName;
use twill_proto::{
    Lease, PodAddressFinding, PodAddressUsage, PodAttachment, ReportAttachmentsRequest,
};

/// Most attachments a node may report, whatever its subnets: a node's pods are ~110
/// by Kubernetes' default, so this bounds a node that lies, not one that works.
pub const MAX_PER_NODE: usize = 4096;

/// Why a report is refused (nothing of it is kept).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportError {
    /// A field that does not parse.
    #[error("attachment {index}: {what}")]
    Malformed {
        /// Its place in the report.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// A network the node holds no lease in.
    #[error("attachment {index}: node {node} holds no lease in network {network}")]
    NoLease {
        /// Its place in the report.
        index: usize,
        /// The node.
        node: String,
        /// The network named.
        network: String,
    },
    /// An address outside the node's subnet.
    #[error(
        "attachment {index}: {ip} is outside node {node}'s subnet {subnets} in network {network}"
    )]
    Outside {
        /// Its place in the report.
        index: usize,
        /// The node.
        node: String,
        /// The network.
        network: String,
        /// The address.
        ip: IpAddr,
        /// The node's subnets there.
        subnets: String,
    },
    /// A usage line that names no subnet of the node, or more addresses than it has.
    #[error("usage {index}: {what}")]
    Usage {
        /// Its place in the report.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// More attachments than addresses.
    #[error("{count} attachments is more than node {node}'s subnets have addresses ({limit})")]
    TooMany {
        /// The node.
        node: String,
        /// How many were reported.
        count: usize,
        /// The most it may have.
        limit: usize,
    },
}

/// One pod as kept: the report's attachment less what its place in the table says
/// (node, network), addresses parsed, strings without spare capacity: about half
/// the memory of the wire's form, which 550,000 pods make count.
#[derive(Debug, Clone)]
struct Pod {
    container_id: Box<str>,
    ifname: Box<str>,
    namespace: Box<str>,
    pod: Box<str>,
    ips: Box<[IpAddr]>,
    added_at_unix: i64,
}

impl Pod {
    /// Where it sorts among its node's pods of one network.
    fn order(&self) -> (&str, &str, &str) {
        (&self.namespace, &self.pod, &self.container_id)
    }

    fn to_wire(&self, node: &NodeName, network: &NetworkName) -> PodAttachment {
        PodAttachment {
            network: network.to_string(),
            container_id: self.container_id.to_string(),
            ifname: self.ifname.to_string(),
            namespace: self.namespace.to_string(),
            pod: self.pod.to_string(),
            ips: self.ips.iter().map(ToString::to_string).collect(),
            added_at_unix: self.added_at_unix,
            node_name: node.to_string(),
        }
    }
}

/// Where a finding sorts: by node, network, address and kind.
fn finding_order(f: &PodAddressFinding) -> (&str, &str, &str, &str) {
    (&f.node_name, &f.network, &f.ip, &f.kind)
}

/// One node's last report, checked.
#[derive(Debug, Clone, Default)]
struct NodePods {
    /// By network.
    attachments: BTreeMap<NetworkName, Vec<Pod>>,
    /// Addresses its IPAM holds, by network and family.
    used: BTreeMap<(NetworkName, Family), u64>,
    /// Leaks and conflicts its agent found.
    findings: Vec<PodAddressFinding>,
}

impl NodePods {
    /// Its leaks and conflicts: how many of each.
    fn totals(&self) -> (usize, usize) {
        let count = |kind: &str| self.findings.iter().filter(|f| f.kind == kind).count();
        (count("leaked"), count("conflict"))
    }
}

/// Every node's pods.
#[derive(Default)]
pub struct PodTable {
    nodes: RwLock<BTreeMap<NodeName, NodePods>>,
    /// Leaks and conflicts over every node, kept with each report (the gauges read
    /// them after every report; recounting every node's would be 5,000 visits each).
    totals: Mutex<(usize, usize)>,
    /// Leaked addresses an admin asked each node to release, handed to it with the
    /// answer to its next report.
    releases: RwLock<BTreeMap<NodeName, Vec<PodAddressFinding>>>,
}

impl PodTable {
    /// Checks `report` from `node` against its subnets in each network (`subnets`,
    /// `None` where it holds no lease) and keeps it in place of the last one.
    pub fn report(
        &self,
        node: &NodeName,
        report: &ReportAttachmentsRequest,
        subnets: &dyn Fn(&NetworkName) -> Option<PerFamily<IpNet>>,
    ) -> Result<usize, ReportError> {
        let mut limit = 0u64;
        let mut seen_networks: BTreeMap<NetworkName, PerFamily<IpNet>> = BTreeMap::new();
        let mut kept = NodePods::default();
        for (index, a) in report.attachments.iter().enumerate() {
            let malformed = |what: String| ReportError::Malformed { index, what };
            let network = NetworkName::from_wire(&a.network)
                .map_err(|e| malformed(format!("network: {e}")))?;
            if !seen_networks.contains_key(&network) {
                let nets = subnets(&network).ok_or_else(|| ReportError::NoLease {
                    index,
                    node: node.to_string(),
                    network: network.to_string(),
                })?;
                limit = nets
                    .values()
                    .map(|n| twill_common::pods::usable(*n))
                    .fold(limit, u64::saturating_add);
                seen_networks.insert(network.clone(), nets);
            }
            let nets = &seen_networks[&network];
            let mut ips = Vec::with_capacity(a.ips.len());
            for text in &a.ips {
                let ip: IpAddr = text
                    .parse()
                    .map_err(|_| malformed(format!("{text:?} is not an IP address")))?;
                ips.push(ip);
                let inside = nets.get(Family::of(ip)).is_some_and(|n| n.contains(&ip));
                if !inside {
                    return Err(ReportError::Outside {
                        index,
                        node: node.to_string(),
                        network: network.to_string(),
                        ip,
                        subnets: nets
                            .values()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
            if a.container_id.is_empty() || a.container_id.len() > 253 {
                return Err(malformed("container_id: 1 to 253 characters".into()));
            }
            for (field, v) in [
                ("ifname", &a.ifname),
                ("namespace", &a.namespace),
                ("pod", &a.pod),
            ] {
                if v.len() > 253 || v.chars().any(char::is_control) {
                    return Err(malformed(format!(
                        "{field}: at most 253 characters, no control characters"
                    )));
                }
            }
            kept.attachments.entry(network).or_default().push(Pod {
                container_id: a.container_id.as_str().into(),
                ifname: a.ifname.as_str().into(),
                namespace: a.namespace.as_str().into(),
                pod: a.pod.as_str().into(),
                ips: ips.into(),
                added_at_unix: a.added_at_unix,
            });
        }
        for (index, u) in report.usage.iter().enumerate() {
            let bad = |what: String| ReportError::Usage { index, what };
            let network =
                NetworkName::from_wire(&u.network).map_err(|e| bad(format!("network: {e}")))?;
            let family = match u.family.as_str() {
                "ipv4" => Family::V4,
                "ipv6" => Family::V6,
                other => return Err(bad(format!("family {other:?}: give ipv4 or ipv6"))),
            };
            let subnet = subnets(&network)
                .and_then(|nets| nets.get(family).copied())
                .ok_or_else(|| {
                    bad(format!(
                        "node {node} holds no {} subnet in network {network}",
                        family.name()
                    ))
                })?;
            let total = twill_common::pods::usable(subnet);
            if u.used > total {
                return Err(bad(format!(
                    "{} addresses used of {subnet}, which has {total}",
                    u.used
                )));
            }
            kept.used.insert((network, family), u.used);
        }
        for (index, f) in report.findings.iter().enumerate() {
            let bad = |what: String| ReportError::Usage { index, what };
            if f.kind != "leaked" && f.kind != "conflict" {
                return Err(bad(format!(
                    "finding kind {:?}: leaked or conflict",
                    f.kind
                )));
            }
            let network =
                NetworkName::from_wire(&f.network).map_err(|e| bad(format!("network: {e}")))?;
            let ip: IpAddr =
                f.ip.parse()
                    .map_err(|_| bad(format!("{:?} is not an IP address", f.ip)))?;
            let inside = subnets(&network)
                .and_then(|nets| nets.get(Family::of(ip)).copied())
                .is_some_and(|n| n.contains(&ip));
            if !inside {
                return Err(bad(format!(
                    "{ip} is not in node {node}'s subnets of network {network}"
                )));
            }
            let mut f = f.clone();
            f.node_name = node.to_string();
            f.network = network.to_string();
            kept.findings.push(f);
        }
        let count = report.attachments.len();
        let limit = limit.min(MAX_PER_NODE as u64) as usize;
        // Findings are bounded as attachments are.
        if let Some(too_many) = [report.findings.len(), count]
            .into_iter()
            .find(|n| *n > limit)
        {
            return Err(ReportError::TooMany {
                node: node.to_string(),
                count: too_many,
                limit,
            });
        }
        for list in kept.attachments.values_mut() {
            list.sort_by(|a, b| a.order().cmp(&b.order()));
            list.shrink_to_fit();
        }
        let (leaks, conflicts) = kept.totals();
        let mut nodes = self.nodes.write();
        let (gone_leaks, gone_conflicts) = nodes
            .insert(node.clone(), kept)
            .map_or((0, 0), |old| old.totals());
        let mut totals = self.totals.lock();
        totals.0 = totals.0 + leaks - gone_leaks;
        totals.1 = totals.1 + conflicts - gone_conflicts;
        Ok(count)
    }

    /// The pods of `node` (or every node) in `network` (or every network), of networks
    /// the node still holds a lease in (`holds`), in node, network, namespace and pod
    /// order.
    pub fn list(
        &self,
        node: Option<&NodeName>,
        network: Option<&NetworkName>,
        holds: &dyn Fn(&NodeName, &NetworkName) -> bool,
    ) -> Vec<PodAttachment> {
        let nodes = self.nodes.read();
        nodes
            .iter()
            .filter(|(n, _)| node.is_none_or(|want| *n == want))
            .flat_map(|(n, pods)| {
                pods.attachments
                    .iter()
                    .filter(move |(net, _)| network.is_none_or(|want| *net == want))
                    .filter(move |(net, _)| holds(n, net))
                    .flat_map(move |(net, list)| list.iter().map(move |p| p.to_wire(n, net)))
            })
            .collect()
    }
}

impl PodTable {
    /// The findings of `node` (or every node) in `network` (or every network) whose
    /// node still holds its lease there, and every address two pods report.
    pub fn check(
        &self,
        node: Option<&NodeName>,
        network: Option<&NetworkName>,
        holds: &dyn Fn(&NodeName, &NetworkName) -> bool,
    ) -> Vec<PodAddressFinding> {
        let nodes = self.nodes.read();
        let wanted = |n: &NodeName, net: &NetworkName| {
            node.is_none_or(|w| w == n) && network.is_none_or(|w| w == net) && holds(n, net)
        };
        let mut out: Vec<PodAddressFinding> = Vec::new();
        let mut seen: BTreeMap<(&NetworkName, IpAddr), Vec<(&NodeName, &Pod)>> = BTreeMap::new();
        for (n, pods) in nodes.iter() {
            for f in &pods.findings {
                let net = NetworkName::from_wire(&f.network)
                    .unwrap_or_else(|_| NetworkName::default_network());
                if wanted(n, &net) {
                    out.push(f.clone());
                }
            }
            for (net, list) in &pods.attachments {
                if !holds(n, net) {
                    continue;
                }
                for a in list {
                    for ip in &a.ips {
                        seen.entry((net, *ip)).or_default().push((n, a));
                    }
                }
            }
        }
        for ((net, ip), holders) in seen {
            if holders.len() < 2 {
                continue;
            }
            for (n, a) in holders {
                if wanted(n, net) {
                    out.push(PodAddressFinding {
                        kind: "duplicate".into(),
                        network: net.to_string(),
                        ip: ip.to_string(),
                        container_id: a.container_id.to_string(),
                        node_name: n.to_string(),
                    });
                }
            }
        }
        out.sort_by(|a, b| finding_order(a).cmp(&finding_order(b)));
        out
    }

    /// Asks `node` (or every node) to release the addresses it reported leaked in
    /// `network` (or every network); what was asked. Asks not yet handed to a node
    /// stay: two releases before its next report add up.
    pub fn release_leaked(
        &self,
        node: Option<&NodeName>,
        network: Option<&NetworkName>,
    ) -> Vec<PodAddressFinding> {
        let nodes = self.nodes.read();
        let mut releases = self.releases.write();
        let mut asked = Vec::new();
        for (n, pods) in nodes.iter().filter(|(n, _)| node.is_none_or(|w| w == *n)) {
            let leaked = pods.findings.iter().filter(|f| {
                f.kind == "leaked"
                    && network
                        .is_none_or(|w| NetworkName::from_wire(&f.network).ok().as_ref() == Some(w))
            });
            let pending = releases.entry(n.clone()).or_default();
            for f in leaked {
                asked.push(f.clone());
                if !pending.contains(f) {
                    pending.push(f.clone());
                }
            }
            if pending.is_empty() {
                releases.remove(n);
            }
        }
        asked
    }

    /// The releases asked of `node` since its last report (each is handed out once).
    pub fn take_releases(&self, node: &NodeName) -> Vec<PodAddressFinding> {
        self.releases.write().remove(node).unwrap_or_default()
    }

    /// Leaks and conflicts reported, over every node.
    pub fn totals(&self) -> (usize, usize) {
        *self.totals.lock()
    }

    /// Per subnet of `leases` (filtered by `node` and `network`): how many addresses its
    /// node last reported used and how many it has, the fullest first.
    pub fn usage(
        &self,
        leases: &[Lease],
        node: Option<&NodeName>,
        network: Option<&NetworkName>,
    ) -> Vec<PodAddressUsage> {
        let nodes = self.nodes.read();
        let mut rows = Vec::new();
        for l in leases {
            let Ok(net) = NetworkName::from_wire(&l.network) else {
                continue;
            };
            if node.is_some_and(|n| n.as_str() != l.node_name) || network.is_some_and(|n| *n != net)
            {
                continue;
            }
            for (family, text) in [(Family::V4, &l.subnet), (Family::V6, &l.ipv6_subnet)] {
                let Ok(subnet) = text.parse::<IpNet>() else {
                    continue;
                };
                let used = NodeName::new(&l.node_name)
                    .ok()
                    .and_then(|n| nodes.get(&n)?.used.get(&(net.clone(), family)).copied())
                    .unwrap_or(0);
                rows.push(PodAddressUsage {
                    network: net.to_string(),
                    family: family.name().to_ascii_lowercase(),
                    used,
                    node_name: l.node_name.clone(),
                    subnet: subnet.to_string(),
                    total: twill_common::pods::usable(subnet),
                });
            }
        }
        let share = |u: &PodAddressUsage| u.used as f64 / (u.total.max(1)) as f64;
        rows.sort_by(|a, b| {
            share(b)
                .total_cmp(&share(a))
                .then_with(|| a.node_name.cmp(&b.node_name))
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(network: &str, id: &str, ips: &[&str]) -> PodAttachment {
        PodAttachment {
            network: network.into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            namespace: "web".into(),
            pod: format!("pod-{id}"),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn node(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    fn subnets(net: &NetworkName) -> Option<PerFamily<IpNet>> {
        (net.to_string() == "default")
            .then(|| PerFamily::new(Some("10.244.3.0/24".parse().unwrap()), None))
    }

    #[test]
    fn a_release_asks_a_node_for_its_own_leaks_in_the_network_named_and_asks_add_up() {
        let t = PodTable::default();
        let a = node("node-a");
        let both = |net: &NetworkName| match net.to_string().as_str() {
            "default" => subnets(net),
            "blue" => Some(PerFamily::new(Some("10.10.1.0/24".parse().unwrap()), None)),
            _ => None,
        };
        let leak = |network: &str, ip: &str| PodAddressFinding {
            kind: "leaked".into(),
            network: network.into(),
            ip: ip.into(),
            container_id: format!("gone-{ip}"),
            node_name: "node-a".into(),
        };
        let conflict = PodAddressFinding {
            kind: "conflict".into(),
            ..leak("blue", "10.10.1.9")
        };
        let report = ReportAttachmentsRequest {
            node_name: "node-a".into(),
            attachments: vec![
                pod("default", "c1", &["10.244.3.5"]),
                pod("blue", "c2", &["10.10.1.5"]),
            ],
            usage: Vec::new(),
            findings: vec![
                leak("default", "10.244.3.7"),
                leak("blue", "10.10.1.7"),
                conflict,
            ],
        };
        assert_eq!(t.report(&a, &report, &both), Ok(2));
        let blue = NetworkName::from_wire("blue").unwrap();
        let ips = |f: &[PodAddressFinding]| f.iter().map(|f| f.ip.clone()).collect::<Vec<_>>();

        assert_eq!(ips(&t.release_leaked(None, Some(&blue))), ["10.10.1.7"]);
        assert!(t.release_leaked(Some(&node("node-b")), None).is_empty());
        // Asked again, and then for every network: one ask of each leak, no conflict.
        assert_eq!(ips(&t.release_leaked(Some(&a), Some(&blue))), ["10.10.1.7"]);
        assert_eq!(
            ips(&t.release_leaked(Some(&a), None)),
            ["10.244.3.7", "10.10.1.7"]
        );
        let mut handed = ips(&t.take_releases(&a));
        handed.sort();
        assert_eq!(handed, ["10.10.1.7", "10.244.3.7"]);
        assert!(t.take_releases(&a).is_empty(), "handed out once");
    }

    #[test]
    fn a_report_replaces_the_last_and_is_checked_against_the_nodes_leases() {
        let t = PodTable::default();
        let a = node("node-a");
        let report = |pods: Vec<PodAttachment>| ReportAttachmentsRequest {
            node_name: "node-a".into(),
            attachments: pods,
            usage: Vec::new(),
            findings: Vec::new(),
        };
        assert_eq!(
            t.report(
                &a,
                &report(vec![
                    pod("", "c1", &["10.244.3.5"]),
                    pod("default", "c2", &["10.244.3.6"])
                ]),
                &subnets
            ),
            Ok(2)
        );
        let all = |_: &NodeName, _: &NetworkName| true;
        let listed = t.list(None, None, &all);
        assert_eq!(listed.len(), 2);
        assert!(listed
            .iter()
            .all(|p| p.node_name == "node-a" && p.network == "default"));

        // Outside its subnet: refused whole, the last report stays.
        let e = t
            .report(
                &a,
                &report(vec![
                    pod("", "c3", &["10.244.3.7"]),
                    pod("", "c4", &["10.244.9.9"]),
                ]),
                &subnets,
            )
            .unwrap_err();
        assert!(matches!(e, ReportError::Outside { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("10.244.3.0/24"), "{e}");
        let e = t
            .report(
                &a,
                &report(vec![pod("blue", "c5", &["10.10.1.2"])]),
                &subnets,
            )
            .unwrap_err();
        assert!(matches!(e, ReportError::NoLease { .. }), "{e}");
        let e = t
            .report(&a, &report(vec![pod("", "c6", &["not-an-ip"])]), &subnets)
            .unwrap_err();
        assert!(matches!(e, ReportError::Malformed { .. }), "{e}");
        let many: Vec<PodAttachment> = (0..254).map(|i| pod("", &format!("x{i}"), &[])).collect();
        let e = t.report(&a, &report(many), &subnets).unwrap_err();
        assert!(matches!(e, ReportError::TooMany { limit: 253, .. }), "{e}");
        assert_eq!(
            t.list(None, None, &all).len(),
            2,
            "nothing of a refused report kept"
        );

        // Address usage: kept per subnet it holds, refused beyond it.
        let usage = |network: &str, family: &str, used: u64| twill_proto::PodAddressUsage {
            network: network.into(),
            family: family.into(),
            used,
            ..Default::default()
        };
        let mut r = report(vec![pod("", "c1", &["10.244.3.5"])]);
        r.usage = vec![usage("", "ipv4", 230)];
        assert_eq!(t.report(&a, &r, &subnets), Ok(1));
        let lease = Lease {
            node_name: "node-a".into(),
            subnet: "10.244.3.0/24".into(),
            ..Default::default()
        };
        let rows = t.usage(std::slice::from_ref(&lease), None, None);
        assert_eq!(
            (
                rows[0].used,
                rows[0].total,
                rows[0].family.as_str(),
                rows[0].subnet.as_str()
            ),
            (230, 253, "ipv4", "10.244.3.0/24")
        );
        for bad in [
            usage("", "ipv4", 254),
            usage("", "ipv6", 1),
            usage("blue", "ipv4", 1),
            usage("", "ipx", 1),
        ] {
            let mut r = report(vec![]);
            r.usage = vec![bad.clone()];
            let e = t.report(&a, &r, &subnets).unwrap_err();
            assert!(matches!(e, ReportError::Usage { .. }), "{bad:?}: {e}");
        }
        assert_eq!(t.usage(&[lease], None, None)[0].used, 230, "kept");

        // Findings: the agent's kept, outside its subnet refused, duplicates found here.
        let finding = |kind: &str, ip: &str| twill_proto::PodAddressFinding {
            kind: kind.into(),
            ip: ip.into(),
            container_id: "gone".into(),
            ..Default::default()
        };
        let mut r = report(vec![
            pod("", "c1", &["10.244.3.5"]),
            pod("", "c2", &["10.244.3.5"]),
        ]);
        r.findings = vec![finding("leaked", "10.244.3.9")];
        assert_eq!(t.report(&a, &r, &subnets), Ok(2));
        let kinds: Vec<(String, String)> = t
            .check(None, None, &all)
            .into_iter()
            .map(|f| (f.kind, f.ip))
            .collect();
        assert_eq!(
            kinds,
            [
                ("duplicate".to_string(), "10.244.3.5".to_string()),
                ("duplicate".to_string(), "10.244.3.5".to_string()),
                ("leaked".to_string(), "10.244.3.9".to_string()),
            ]
        );
        assert_eq!(t.totals(), (1, 0));
        for bad in [
            finding("leaked", "10.244.9.9"),
            finding("stolen", "10.244.3.9"),
        ] {
            let mut r = report(vec![]);
            r.findings = vec![bad];
            assert!(t.report(&a, &r, &subnets).is_err());
        }

        // The pods leave with the lease.
        let none = |_: &NodeName, _: &NetworkName| false;
        assert!(t.list(Some(&a), None, &none).is_empty());
        // An empty report empties the node's pods.
        assert_eq!(t.report(&a, &report(vec![]), &subnets), Ok(0));
        assert!(t.list(None, None, &all).is_empty());
    }
}
