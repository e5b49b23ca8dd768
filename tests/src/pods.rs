//! Pods for the lab: network namespaces attached to a host by the real `twill-cni`
//! exactly as a container runtime does it (CNI variables, config on stdin), with
//! Debian's `bridge` and `host-local` plugins as delegates. Used by the pod
//! end-to-end test and the demo.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde_json::{json, Value};

use crate::Overlay;

/// Where Debian's containernetworking-plugins installs the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";
/// The network name (kube-flannel's conflist calls it cbr0); host-local keys its
/// store by it.
pub const NETWORK: &str = "cbr0";
/// Seconds any command run here may take.
pub const CMD_TIMEOUT: &str = "60";

/// Which Twill network a pod attaches to, and the CNI names that keep networks apart
/// on a host: the CNI network name (host-local keys its store by it) and the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The Twill network (twill-cni's `"network"`); `default` reads subnet.env.
    pub network: String,
    /// The CNI configuration's `name`.
    pub cni_name: String,
    /// The bridge the delegate makes.
    pub bridge: String,
}

impl PodNetwork {
    /// kube-flannel's: network `default`, CNI name `cbr0`, bridge `cni0`.
    pub fn flannel() -> Self {
        PodNetwork {
            network: "default".into(),
            cni_name: NETWORK.into(),
            bridge: "cni0".into(),
        }
    }

    /// Twill network `name` on a bridge of its own (`cni-<name>`).
    pub fn named(name: &str) -> Self {
        PodNetwork {
            network: name.into(),
            cni_name: format!("twill-{name}"),
            bridge: format!("cni-{name}"),
        }
    }
}

/// A pod attached by twill-cni.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The lab host the pod runs on.
    pub node: String,
    /// The pod's network namespace.
    pub netns: String,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// Its first address on eth0 (IPv4, or IPv6 on an IPv6-only network).
    pub addr: IpAddr,
    /// The host side of its veth pair.
    pub host_veth: String,
    /// The network it is attached to.
    pub net: PodNetwork,
}

/// `dataDir` of twill-cni on `node` (saved delegate configs), in the host's lab dir.
pub fn cni_data_dir(ov: &Overlay, node: &str) -> PathBuf {
    ov.node_host(node).dir.join("cni").join("flannel")
}

/// host-local's `dataDir` on `node`.
pub fn ipam_dir(ov: &Overlay, node: &str) -> PathBuf {
    ov.node_host(node).dir.join("cni").join("ipam")
}

/// The network configuration a runtime hands twill-cni (kube-flannel's conflist
/// entry, with `type` changed and this host's files); another network reads its env
/// file from the agent's `--subnet-dir` and gets a bridge of its own.
fn net_conf(ov: &Overlay, node: &str, net: &PodNetwork) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": net.cni_name,
        "type": "twill-cni",
        "dataDir": cni_data_dir(ov, node),
        "ipam": {"dataDir": ipam_dir(ov, node)},
        "agentSocket": ov.cni_socket(node),
        "delegate": {"hairpinMode": true, "isDefaultGateway": true, "bridge": net.bridge},
    });
    if net.network == "default" {
        conf["subnetFile"] = json!(ov.subnet_file(node));
    } else {
        conf["network"] = json!(net.network);
        conf["subnetDir"] = json!(ov.subnet_file(node).with_file_name("networks"));
        // One default route per pod: a second network's interface has none.
        conf["delegate"]["isDefaultGateway"] = json!(false);
    }
    conf.to_string()
}

/// Creates pod namespace `tw-<lab id>-p<tag>` (owned by the lab) and attaches it to
/// `node` with `twill-cni ADD`. Returns the pod and the plugin's result.
pub fn attach(ov: &Overlay, cni_bin: &Path, node: &str, tag: &str) -> Result<(Pod, Value)> {
    attach_to(ov, cni_bin, node, tag, &PodNetwork::flannel())
}

/// [`attach`] to network `net`.
pub fn attach_to(
    ov: &Overlay,
    cni_bin: &Path,
    node: &str,
    tag: &str,
    net: &PodNetwork,
) -> Result<(Pod, Value)> {
    let netns = ov.lab().add_netns(&format!("p{tag}"))?;
    let mut pod = Pod {
        node: node.to_string(),
        container_id: format!("twill-{}-{node}-{tag}", ov.lab().id()),
        netns,
        addr: Ipv4Addr::UNSPECIFIED.into(),
        host_veth: String::new(),
        net: net.clone(),
    };
    let what = format!("ADD of {} on {node}", pod.container_id);
    let result = cni(ov, cni_bin, node, "ADD", &pod)?
        .with_context(|| format!("{what} printed no result"))?;
    let addr: IpNet = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("{what}: no IP in the result {result}"))?
        .parse()
        .with_context(|| format!("{what}: bad address in {result}"))?;
    pod.addr = addr.addr();
    pod.host_veth = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .find(|n| *n != pod.net.bridge)
        .with_context(|| format!("{what}: no host-side veth in the result {result}"))?
        .to_string();
    Ok((pod, result))
}

/// Runs twill-cni inside `node`'s namespace, as a runtime does: the CNI variables in
/// the environment, the network configuration on stdin. `Ok(Some(result))` on success
/// with output, `Ok(None)` on success without; an error naming the CNI error otherwise.
pub fn cni(
    ov: &Overlay,
    cni_bin: &Path,
    node: &str,
    command: &str,
    pod: &Pod,
) -> Result<Option<Value>> {
    let host_ns = &ov.node_host(node).netns;
    let config = net_conf(ov, node, &pod.net);
    let mut cmd = Command::new("timeout");
    cmd.arg(CMD_TIMEOUT)
        .args(["ip", "netns", "exec", host_ns])
        .arg(cni_bin);
    for k in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
        "CNI_ARGS",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("twill-cni {command} {} on {node}", pod.container_id);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(config.as_bytes())
        .with_context(|| format!("{what}: writing the config to stdin"))?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {stdout} {stderr}\nconfig: {config}",
            out.status
        );
    }
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    let v = serde_json::from_str(&stdout)
        .with_context(|| format!("{what}: stdout is not JSON: {stdout}"))?;
    Ok(Some(v))
}

/// What a command run in a namespace printed and whether it succeeded.
pub struct Out {
    /// Exit status was 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The command, for messages.
    pub cmdline: String,
}

impl Out {
    /// The output when the command succeeded, else an error naming it.
    pub fn ok(self) -> Result<String> {
        if self.success {
            Ok(self.stdout)
        } else {
            bail!("`{}` failed: {}{}", self.cmdline, self.stderr, self.stdout)
        }
    }
}

/// Runs `args` in network namespace `netns` (a lab host's or a pod's).
pub fn exec_in(netns: &str, args: &[&str]) -> Result<Out> {
    let cmdline = format!("ip netns exec {netns} {}", args.join(" "));
    let out = Command::new("timeout")
        .args([CMD_TIMEOUT, "ip", "netns", "exec", netns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{cmdline}`"))?;
    Ok(Out {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        cmdline,
    })
}
