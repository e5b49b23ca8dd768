//! Isolation between networks (REFERENCE 2.10): on a node in several networks, the
//! kernel would route a packet from one network's pod to another network's pod (the
//! node has a route to both). One nftables table of our own, `inet twill-isolation`,
//! drops forwarded traffic from any joined network's pods to another joined network's
//! pods, in both directions, before any masquerade could hide where it came from.
//!
//! The table is replaced whole in one `nft -f` transaction (idempotent, never half
//! applied), and removed when the node is in fewer than two networks.

use ipnet::IpNet;
use twill_common::model::{Family, PerFamily};

use super::masq::{nft, teardown};
use super::DataPlaneError;

/// The nftables table of the isolation rules.
pub const TABLE: &str = "inet twill-isolation";

/// The nft script that makes [`TABLE`] drop traffic between the pod networks of
/// different networks (`networks`: each joined network's pod networks); with fewer
/// than two networks, the script that removes it.
pub fn ruleset(networks: &[PerFamily<IpNet>]) -> String {
    let mut rules = String::new();
    for (i, mine) in networks.iter().enumerate() {
        for (family, from) in mine.iter() {
            let others: Vec<String> = networks
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, n)| n.get(family))
                .map(ToString::to_string)
                .collect();
            if others.is_empty() {
                continue;
            }
            let ip = match family {
                Family::V4 => "ip",
                Family::V6 => "ip6",
            };
            rules.push_str(&format!(
                "    {ip} saddr {from} {ip} daddr {{ {} }} drop comment \"between networks\"\n",
                others.join(", ")
            ));
        }
    }
    if rules.is_empty() {
        return teardown(TABLE);
    }
    format!(
        "table {TABLE}
delete table {TABLE}
table {TABLE} {{
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
{rules}  }}
}}
"
    )
}

/// Installs, refreshes or removes the isolation rules for `networks`.
pub async fn apply(networks: &[PerFamily<IpNet>]) -> Result<(), DataPlaneError> {
    nft(&ruleset(networks)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(v4: &str, v6: Option<&str>) -> PerFamily<IpNet> {
        PerFamily::new(Some(v4.parse().unwrap()), v6.map(|s| s.parse().unwrap()))
    }

    #[test]
    fn each_network_is_cut_off_from_the_others_in_both_directions() {
        let r = ruleset(&[
            net("10.244.0.0/16", Some("fd00:10:244::/56")),
            net("10.10.0.0/16", None),
            net("10.20.0.0/16", Some("fd00:20::/56")),
        ]);
        let drops: Vec<&str> = r
            .lines()
            .map(str::trim)
            .filter(|l| l.ends_with("\"between networks\""))
            .collect();
        assert_eq!(
            drops,
            [
                "ip saddr 10.244.0.0/16 ip daddr { 10.10.0.0/16, 10.20.0.0/16 } drop comment \"between networks\"",
                "ip6 saddr fd00:10:244::/56 ip6 daddr { fd00:20::/56 } drop comment \"between networks\"",
                "ip saddr 10.10.0.0/16 ip daddr { 10.244.0.0/16, 10.20.0.0/16 } drop comment \"between networks\"",
                "ip saddr 10.20.0.0/16 ip daddr { 10.244.0.0/16, 10.10.0.0/16 } drop comment \"between networks\"",
                "ip6 saddr fd00:20::/56 ip6 daddr { fd00:10:244::/56 } drop comment \"between networks\"",
            ]
        );
        assert!(r.starts_with("table inet twill-isolation\ndelete table inet twill-isolation\n"));
    }

    #[test]
    fn one_network_needs_no_table() {
        for networks in [vec![], vec![net("10.244.0.0/16", None)]] {
            assert_eq!(
                ruleset(&networks),
                "table inet twill-isolation\ndelete table inet twill-isolation\n"
            );
        }
    }
}
