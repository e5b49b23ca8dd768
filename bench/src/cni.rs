//! What reporting a pod to the agent costs a pod's ADD (REFERENCE 2.11: under 1 ms):
//! the real twill-cni with the real `bridge` and `host-local` plugins in a network
//! namespace of its own, ADD timed with no report (`agentSocket: ""`), with the agent's
//! socket up (the agent's own socket code, in this process), and with the agent down
//! (the report queued on disk). The three alternate, ADD by ADD, so that the machine's
//! noise falls on all of them alike; each ADD is followed by its DEL (not timed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use twill_agent::pods::socket;

use crate::stats::Dist;

/// Where Debian's containernetworking-plugins are.
const PLUGINS: &str = "/usr/lib/cni";

/// ADD latencies, ms, by how the report went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CniOutcome {
    /// ADDs timed per mode.
    pub adds: usize,
    /// No report asked for.
    pub no_report: Dist,
    /// Reported to the agent's socket.
    pub agent_up: Dist,
    /// The agent down: the report queued on disk.
    pub agent_down: Dist,
    /// The report alone, agent up: 110 pods' ADD reports then their DELs, each
    /// `deliver` timed in this process (the whole ADD is too noisy to see it), ms.
    #[serde(default = "crate::stats::nan_dist")]
    pub report_up: Dist,
    /// The same with the agent down (each report queued), ms.
    #[serde(default = "crate::stats::nan_dist")]
    pub report_down: Dist,
}

/// Pods on a node at Kubernetes' default limit: the size of the set a report updates.
const PODS: usize = 110;

/// Times `deliver` of `PODS` ADD reports then their DELs to `sock`, ms each.
fn time_reports(sock: &Path) -> Result<Vec<f64>> {
    use twill_agent::pods::{Attachment, Key, Op, Report};
    let mut ms = Vec::new();
    for op in [Op::Add, Op::Del] {
        for i in 0..PODS {
            let r = Report {
                op,
                at_ns: ms.len() as u64 + 1,
                attachment: Attachment {
                    key: Key {
                        network: "default".into(),
                        container_id: format!("{i:064x}"),
                        ifname: "eth0".into(),
                    },
                    netns: format!("/var/run/netns/cni-{i:08x}-0000-0000-0000-000000000000"),
                    namespace: "default".into(),
                    pod: format!("web-{i}"),
                    ipam_dir: Some("/var/lib/cni/networks/cbr0".into()),
                    ips: vec![format!("10.244.3.{}", i + 2).parse()?],
                    added_at_ns: 0,
                },
            };
            let started = Instant::now();
            socket::deliver(sock, &r).map_err(anyhow::Error::msg)?;
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(ms)
}

/// Whether the scenario can run here: root, `ip` and the plugins.
pub fn available() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("needs root (network namespaces)".into());
    }
    for plugin in ["bridge", "host-local"] {
        if !Path::new(PLUGINS).join(plugin).exists() {
            return Err(format!(
                "needs {PLUGINS}/{plugin} (containernetworking-plugins)"
            ));
        }
    }
    Ok(())
}

/// twill-cni: `TWILL_BENCH_CNI`, else beside this binary (`cargo build --release -p
/// twill-agent` builds both into target/release).
pub fn find_plugin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TWILL_BENCH_CNI") {
        return Ok(PathBuf::from(p));
    }
    crate::servers::find_bin(
        "twill-cni",
        "build it with `cargo build --release -p twill-agent` (or set TWILL_BENCH_CNI)",
    )
}

/// Deletes the namespaces it made, also on error.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `command` of the plugin in `host` for `container`; how long it took, ms.
fn invoke(
    plugin: &Path,
    host: &str,
    pod: &str,
    command: &str,
    container: &str,
    conf: &str,
) -> Result<f64> {
    let netns = format!("/run/netns/{pod}");
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", host])
        .arg(plugin)
        .env_remove("CNI_ARGS")
        .envs([
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", PLUGINS),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod",
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("the plugin's stdin")?
        .write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "twill-cni {command} {container}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

/// Times `adds` ADDs of each mode.
pub async fn run(plugin: &Path, adds: usize) -> Result<CniOutcome> {
    let tag = std::process::id();
    let (host, pod) = (
        format!("twbench-cni-{tag}-h"),
        format!("twbench-cni-{tag}-p"),
    );
    let mut made = Namespaces(Vec::new());
    for n in [&host, &pod] {
        ip(&["netns", "add", n])?;
        made.0.push(n.clone());
    }
    ip(&["-n", &host, "link", "set", "lo", "up"])?;
    let dir = tempfile::tempdir()?;
    let subnet_env = dir.path().join("subnet.env");
    std::fs::write(
        &subnet_env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )?;
    let up_socket = dir.path().join("up/agent.sock");
    let pods = Arc::new(socket::Pods::open(&dir.path().join("attachments.json")));
    let server = tokio::spawn(socket::serve(socket::bind(&up_socket)?, pods));
    let conf = |socket: &str| {
        json!({
            "cniVersion": "1.0.0", "name": "twbench", "type": "twill-cni",
            "subnetFile": subnet_env, "dataDir": dir.path().join("saved"),
            "ipam": {"dataDir": dir.path().join("ipam")}, "agentSocket": socket,
        })
        .to_string()
    };
    let modes = [
        conf(""),
        conf(&up_socket.to_string_lossy()),
        conf(&dir.path().join("down/agent.sock").to_string_lossy()),
    ];
    let (up, down) = (up_socket.clone(), dir.path().join("alone-down/agent.sock"));
    let (report_up, report_down) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((time_reports(&up)?, time_reports(&down)?))
    })
    .await??;
    let plugin = plugin.to_path_buf();
    let samples = tokio::task::spawn_blocking(move || -> Result<[Vec<f64>; 3]> {
        let mut samples: [Vec<f64>; 3] = Default::default();
        for i in 0..adds {
            for k in 0..3 {
                // Rotate which mode goes first, so none always follows another.
                let m = (i + k) % 3;
                let container = format!("bench{i}m{m}");
                samples[m].push(invoke(&plugin, &host, &pod, "ADD", &container, &modes[m])?);
                invoke(&plugin, &host, &pod, "DEL", &container, &modes[m])?;
            }
        }
        Ok(samples)
    })
    .await??;
    server.abort();
    drop(made);
    let [none, up, down] = samples;
    Ok(CniOutcome {
        adds,
        no_report: Dist::of(none),
        agent_up: Dist::of(up),
        agent_down: Dist::of(down),
        report_up: Dist::of(report_up),
        report_down: Dist::of(report_down),
    })
}
