//! IP masquerade for pod traffic leaving the overlay (`--ip-masq`), as flannel does it
//! (docs/compatibility.md, IP masquerade), in nftables tables of our own: `inet twill`
//! for the `default` network, `inet twill-<name>` for each other network joined, so a
//! network's rules come and go with it and never touch another's.
//!
//! A whole table is replaced in one `nft -f` transaction, so rules are never half
//! applied and re-applying is idempotent. Equivalent by hand: `nft -f <(ruleset)`.

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use twill_common::model::{Family, PerFamily};
use twill_common::networks::NetworkName;

use super::DataPlaneError;

/// The nftables table Twill owns for the `default` network.
pub const TABLE: &str = "inet twill";

/// The table of `network`'s rules: [`TABLE`] for `default` (as before several
/// networks), `inet twill-<name>` for the others (a network name is a DNS label, which
/// nft takes as a table name).
pub fn table(network: &NetworkName) -> String {
    if network.is_default() {
        TABLE.to_string()
    } else {
        format!("{TABLE}-{network}")
    }
}

/// The nft script that replaces `table` with masquerade rules for a node, per family
/// the network has: `(pod network, node subnet)`, IPv4 rules with `ip` (multicast
/// 224.0.0.0/4), IPv6 rules with `ip6` (multicast ff00::/8).
pub fn ruleset(table: &str, families: PerFamily<(IpNet, IpNet)>) -> String {
    let (mut post, mut forward) = (String::new(), String::new());
    for (family, (network, subnet)) in families.iter() {
        let (ip, multicast) = match family {
            Family::V4 => ("ip", "224.0.0.0/4"),
            Family::V6 => ("ip6", "ff00::/8"),
        };
        post.push_str(&family_rules(
            ip,
            &network.to_string(),
            &subnet.to_string(),
            multicast,
        ));
        forward.push_str(&format!(
            "    {ip} saddr {network} accept
    {ip} daddr {network} accept
"
        ));
    }
    format!(
        "table {table}
delete table {table}
table {table} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 return comment \"marked by kube-proxy for masquerade\"
{post}  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
{forward}  }}
}}
"
    )
}

/// flannel's five postrouting rules after the kube-proxy mark, for one family (`ip`
/// or `ip6`).
fn family_rules(ip: &str, network: &str, subnet: &str, multicast: &str) -> String {
    format!(
        "    {ip} saddr {subnet} {ip} daddr {network} return comment \"pod to pod\"
    {ip} saddr {network} {ip} daddr {subnet} return comment \"pod to pod\"
    {ip} saddr != {network} {ip} daddr {subnet} return comment \"outside to this node's pods\"
    {ip} saddr {network} {ip} daddr != {multicast} masquerade fully-random comment \"pods to outside\"
    {ip} saddr != {network} {ip} daddr {network} masquerade fully-random comment \"outside to other nodes' pods\"
"
    )
}

/// The nft script that removes `table` (and succeeds when it is absent).
pub fn teardown(table: &str) -> String {
    format!("table {table}\ndelete table {table}\n")
}

/// Installs or refreshes `network`'s masquerade rules.
pub async fn apply(
    network: &NetworkName,
    families: PerFamily<(IpNet, IpNet)>,
) -> Result<(), DataPlaneError> {
    nft(&ruleset(&table(network), families)).await
}

/// Removes `network`'s masquerade rules, if any.
pub async fn remove(network: &NetworkName) -> Result<(), DataPlaneError> {
    nft(&teardown(&table(network))).await
}

/// Runs `script` with `nft -f -` (one transaction).
pub(super) async fn nft(script: &str) -> Result<(), DataPlaneError> {
    let fail = |msg: String| DataPlaneError::Nft(msg);
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run nft (is the nftables package installed?): {e}"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| fail(format!("nft -f -: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(format!("nft -f -: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "nft -f - failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_follows_flannel_order() {
        let r = ruleset(
            TABLE,
            PerFamily::new(
                Some((
                    "10.244.0.0/16".parse().unwrap(),
                    "10.244.3.0/24".parse().unwrap(),
                )),
                None,
            ),
        );
        let rules: Vec<&str> = r
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ip ") || l.starts_with("meta "))
            .collect();
        assert_eq!(rules.len(), 8);
        assert!(rules[0].starts_with("meta mark & 0x4000 == 0x4000 return"));
        assert!(rules[1].starts_with("ip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return"));
        assert!(rules[4]
            .starts_with("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"));
        assert!(
            r.starts_with("table inet twill\ndelete table inet twill\n"),
            "atomic replace"
        );
    }

    #[test]
    fn dual_stack_adds_the_same_rules_for_ipv6() {
        let r = ruleset(
            TABLE,
            PerFamily::new(
                Some((
                    "10.244.0.0/16".parse().unwrap(),
                    "10.244.3.0/24".parse().unwrap(),
                )),
                Some((
                    "fd00:10:244::/56".parse().unwrap(),
                    "fd00:10:244:3::/64".parse().unwrap(),
                )),
            ),
        );
        let v6: Vec<&str> = r
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ip6 "))
            .collect();
        assert_eq!(v6.len(), 7);
        assert!(v6[0].starts_with("ip6 saddr fd00:10:244:3::/64 ip6 daddr fd00:10:244::/56 return"));
        assert!(v6[3].contains("ip6 daddr != ff00::/8 masquerade fully-random"));
        assert_eq!(r.lines().filter(|l| l.trim().starts_with("ip ")).count(), 7);
    }

    #[test]
    fn ipv6_only_has_no_ipv4_rules() {
        let r = ruleset(
            TABLE,
            PerFamily::new(
                None,
                Some((
                    "fd00:10:244::/56".parse().unwrap(),
                    "fd00:10:244:3::/64".parse().unwrap(),
                )),
            ),
        );
        assert_eq!(
            r.lines().filter(|l| l.trim().starts_with("ip6 ")).count(),
            7
        );
        assert_eq!(r.lines().filter(|l| l.trim().starts_with("ip ")).count(), 0);
    }

    #[test]
    fn each_network_has_a_table_of_its_own_and_default_keeps_twill() {
        let default = NetworkName::default_network();
        let blue = NetworkName::new("blue").unwrap();
        assert_eq!(table(&default), "inet twill");
        assert_eq!(table(&blue), "inet twill-blue");
        let r = ruleset(
            &table(&blue),
            PerFamily::new(
                Some((
                    "10.10.0.0/16".parse().unwrap(),
                    "10.10.3.0/24".parse().unwrap(),
                )),
                None,
            ),
        );
        assert!(
            r.starts_with("table inet twill-blue\ndelete table inet twill-blue\n"),
            "{r}"
        );
        assert!(
            r.contains("ip saddr 10.10.0.0/16 ip daddr != 224.0.0.0/4 masquerade"),
            "{r}"
        );
        assert_eq!(
            teardown(&table(&blue)),
            "table inet twill-blue\ndelete table inet twill-blue\n"
        );
    }
}
