//! Device offloads through the `ethtool` program (Debian's ethtool package), as
//! masquerade goes through `nft`: rtnetlink has no call for them.

use tokio::process::Command;

use super::DataPlaneError;

/// The offload a VXLAN device's transmit checksums depend on.
const TX_CHECKSUM: &str = "tx-checksum-ip-generic";

/// `ethtool -K <device> tx-checksum-ip-generic on|off`.
pub async fn set_tx_checksum(device: &str, on: bool) -> Result<(), DataPlaneError> {
    let state = if on { "on" } else { "off" };
    let command = format!("ethtool -K {device} {TX_CHECKSUM} {state}");
    let out = Command::new("ethtool")
        .args(["-K", device, TX_CHECKSUM, state])
        .output()
        .await
        .map_err(|e| {
            DataPlaneError::Ethtool(format!(
                "cannot run {command} (is the ethtool package installed?): {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(DataPlaneError::Ethtool(format!(
            "{command} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
