//! `twillctl ip ADDRESS`: who holds a pod address, from the pods the agents reported
//! and the leases (REFERENCE 2.11). Pure: the caller fetches, this decides.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use twill_proto::{Lease, NetworkInfo, PodAttachment};

use crate::output::PodDoc;

/// What an address is to Twill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A reported pod has it.
    Held,
    /// It is in a node's subnet and no reported pod has it.
    Free,
    /// It is in a network's pod range but in no node's subnet.
    Unassigned,
    /// It is in no network Twill serves.
    #[default]
    Outside,
}

/// The answer for one address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Answer {
    /// The address asked about.
    pub address: String,
    /// What it is.
    pub status: Status,
    /// The network it is in (empty: none).
    pub network: String,
    /// The node whose subnet it is in (empty: none).
    pub node: String,
    /// That subnet (empty: none).
    pub subnet: String,
    /// The pod holding it, when one does.
    pub pod: Option<PodDoc>,
}

/// Where `addr` stands among `networks`, their `leases` (by network, in the same
/// order) and the reported `pods`.
pub fn locate(
    addr: IpAddr,
    networks: &[NetworkInfo],
    leases: &[Vec<Lease>],
    pods: &[PodAttachment],
) -> Answer {
    let mut answer = Answer {
        address: addr.to_string(),
        ..Default::default()
    };
    let contains = |cidr: &str| cidr.parse::<IpNet>().is_ok_and(|n| n.contains(&addr));
    for (n, leases) in networks.iter().zip(leases) {
        if !contains(&n.ipv4_network) && !contains(&n.ipv6_network) {
            continue;
        }
        answer.network = n.name.clone();
        answer.status = Status::Unassigned;
        let Some(lease) = leases
            .iter()
            .find(|l| contains(&l.subnet) || contains(&l.ipv6_subnet))
        else {
            break;
        };
        answer.node = lease.node_name.clone();
        answer.subnet = if contains(&lease.subnet) {
            lease.subnet.clone()
        } else {
            lease.ipv6_subnet.clone()
        };
        answer.status = Status::Free;
        let text = addr.to_string();
        if let Some(p) = pods
            .iter()
            .find(|p| p.node_name == lease.node_name && p.ips.contains(&text))
        {
            answer.status = Status::Held;
            answer.pod = Some(PodDoc::of(p));
        }
        break;
    }
    answer
}

/// The answer as a sentence.
pub fn sentence(a: &Answer) -> String {
    match (&a.status, &a.pod) {
        (Status::Held, Some(p)) => {
            let who = match (p.namespace.as_str(), p.pod.as_str()) {
                ("", "") => "a pod".to_string(),
                ("", name) => format!("pod {name}"),
                (ns, name) => format!("pod {ns}/{name}"),
            };
            let container: String = p.container_id.chars().take(12).collect();
            format!(
                "{} is held by {who} on {} (network {}, container {container}, {}).",
                a.address, a.node, a.network, p.ifname
            )
        }
        (Status::Free, _) | (Status::Held, None) => format!(
            "{} is free, {}'s subnet {} (network {}): no pod reported it.",
            a.address, a.node, a.subnet, a.network
        ),
        (Status::Unassigned, _) => format!(
            "{} is in network {} but in no node's subnet.",
            a.address, a.network
        ),
        (Status::Outside, _) => format!("{} is in no network Twill serves.", a.address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_held_free_unassigned_or_outside() {
        let networks = vec![NetworkInfo {
            name: "default".into(),
            ipv4_network: "10.244.0.0/16".into(),
            ..Default::default()
        }];
        let leases = vec![vec![
            Lease {
                node_name: "node-a".into(),
                subnet: "10.244.3.0/24".into(),
                ..Default::default()
            },
            Lease {
                node_name: "node-b".into(),
                subnet: "10.244.4.0/24".into(),
                ..Default::default()
            },
        ]];
        let pods = vec![PodAttachment {
            node_name: "node-a".into(),
            namespace: "web".into(),
            pod: "front-1".into(),
            container_id: "0123456789abcdef".into(),
            ifname: "eth0".into(),
            ips: vec!["10.244.3.5".into()],
            ..Default::default()
        }];
        let at = |s: &str| locate(s.parse().unwrap(), &networks, &leases, &pods);
        let held = at("10.244.3.5");
        assert_eq!(held.status, Status::Held);
        assert_eq!(
            sentence(&held),
            "10.244.3.5 is held by pod web/front-1 on node-a (network default, container 0123456789ab, eth0)."
        );
        let free = at("10.244.4.9");
        assert_eq!(
            sentence(&free),
            "10.244.4.9 is free, node-b's subnet 10.244.4.0/24 (network default): no pod reported it."
        );
        assert_eq!(at("10.244.9.1").status, Status::Unassigned);
        assert_eq!(at("192.0.2.1").status, Status::Outside);
    }
}
