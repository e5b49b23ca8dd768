//! IP masquerade for pod traffic leaving the overlay (`--ip-masq`), as flannel does it
//! (docs/compatibility.md, IP masquerade), in an nftables table of our own, `inet twill`.
//!
//! The whole table is replaced in one `nft -f` transaction, so rules are never half
//! applied and re-applying is idempotent. Equivalent by hand: `nft -f <(ruleset)`.

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::DataPlaneError;

/// The nftables table Twill owns.
pub const TABLE: &str = "inet twill";

/// The nft script that replaces the table with masquerade rules for a node holding
/// `subnet` in pod network `network`.
pub fn ruleset(network: Ipv4Net, subnet: Ipv4Net) -> String {
    format!(
        "table {TABLE}
delete table {TABLE}
table {TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 return comment \"marked by kube-proxy for masquerade\"
    ip saddr {subnet} ip daddr {network} return comment \"pod to pod\"
    ip saddr {network} ip daddr {subnet} return comment \"pod to pod\"
    ip saddr != {network} ip daddr {subnet} return comment \"outside to this node's pods\"
    ip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random comment \"pods to outside\"
    ip saddr != {network} ip daddr {network} masquerade fully-random comment \"outside to other nodes' pods\"
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {network} accept
    ip daddr {network} accept
  }}
}}
"
    )
}

/// The nft script that removes the table (and succeeds when it is absent).
pub fn teardown() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// Installs or refreshes the masquerade rules.
pub async fn apply(network: Ipv4Net, subnet: Ipv4Net) -> Result<(), DataPlaneError> {
    nft(&ruleset(network, subnet)).await
}

/// Removes the masquerade rules, if any.
pub async fn remove() -> Result<(), DataPlaneError> {
    nft(&teardown()).await
}

async fn nft(script: &str) -> Result<(), DataPlaneError> {
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
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
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
}
