//! A Twill overlay in a lab: certificates made by `twillctl`, one host running
//! `twill-controller`, one `twill-agent` per node host.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv4Net;

use crate::bins::Bins;
use crate::cmd;
use crate::kernel::{FLANNEL_DEV, TWILL_ROUTE_PROTO};
use crate::lab::{Host, Lab, LabConfig, LabError, HOST_IFACE};
use crate::subnet_env::SubnetEnv;
use crate::wait::{wait_until, Check};

/// The host that runs the controller.
pub const CONTROLLER_HOST: &str = "controller";
/// The controller's process name in the lab.
pub const CONTROLLER_PROC: &str = "controller";
/// Controller gRPC port.
pub const GRPC_PORT: u16 = 8474;
/// Controller HTTP port (`/healthz`, `/readyz`, `/metrics`).
pub const CONTROLLER_METRICS_PORT: u16 = 8475;
/// Agent HTTP port (`/healthz`, `/metrics`).
pub const AGENT_METRICS_PORT: u16 = 8476;
/// The net-conf.json the lab uses unless told otherwise.
pub const DEFAULT_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// The admin user whose certificate `twillctl` uses.
pub const ADMIN_USER: &str = "lab-admin";

/// What overlay to build.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// Node names; each gets a host of the same name.
    pub nodes: Vec<String>,
    /// Contents of net-conf.json.
    pub net_conf: String,
    /// Extra controller flags.
    pub controller_args: Vec<String>,
    /// Extra agent flags, per node.
    pub agent_args: BTreeMap<String, Vec<String>>,
    /// Start the agents in [`Overlay::start`] (else call [`Overlay::start_agent`]).
    pub start_agents: bool,
    /// Underlay MTU.
    pub mtu: u32,
    /// Print progress to stderr.
    pub verbose: bool,
    /// Zero-touch node identity: the controller signs node certificates with the
    /// lab's CA (`--signing-cert`/`--signing-key`), no node certificates are made, and
    /// each agent starts with only the CA certificate and a bootstrap token
    /// ([`Overlay::bootstrap_token_file`]), writing its key and certificate to
    /// [`Overlay::node_key_file`] / [`Overlay::node_cert_file`].
    pub bootstrap: bool,
    /// The controller's `--node-cert-ttl` (with [`OverlayConfig::bootstrap`]), e.g. `2h`.
    pub node_cert_ttl: Option<String>,
    /// An IPv6-only underlay ([`LabConfig::ipv6_only`]): the controller listens on, and
    /// the agents dial, IPv6 addresses.
    pub ipv6_only: bool,
    /// More networks: `<name>.json` contents by name, written to the controller's
    /// `--networks-dir` ([`Overlay::networks_dir`]) before it starts.
    pub networks: BTreeMap<String, String>,
    /// An HA overlay's etcd `--election-timeout` (its heartbeat a tenth of it); etcd's
    /// default (1 s) unless set.
    pub etcd_election_timeout: Option<std::time::Duration>,
}

impl OverlayConfig {
    pub fn new<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> OverlayConfig {
        OverlayConfig {
            nodes: nodes.into_iter().map(Into::into).collect(),
            net_conf: DEFAULT_NET_CONF.into(),
            controller_args: Vec::new(),
            agent_args: BTreeMap::new(),
            start_agents: true,
            mtu: 1500,
            verbose: false,
            bootstrap: false,
            node_cert_ttl: None,
            ipv6_only: false,
            networks: BTreeMap::new(),
            etcd_election_timeout: None,
        }
    }

    /// An HA overlay whose etcd elects within `timeout` (and so grants leases as short
    /// as 1.5 times it, rounded up to whole seconds).
    pub fn etcd_election_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.etcd_election_timeout = Some(timeout);
        self
    }

    /// A network `name` configured by `json` (net-conf.json plus `"Nodes"`).
    pub fn network(mut self, name: &str, json: &str) -> Self {
        self.networks.insert(name.into(), json.into());
        self
    }

    /// Nodes `node-a`, `node-b`, `node-c`.
    pub fn three_nodes() -> OverlayConfig {
        OverlayConfig::new(["node-a", "node-b", "node-c"])
    }

    pub fn net_conf(mut self, json: &str) -> Self {
        self.net_conf = json.into();
        self
    }

    pub fn controller_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.controller_args
            .extend(args.into_iter().map(Into::into));
        self
    }

    pub fn agent_args<S: Into<String>>(
        mut self,
        node: &str,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        self.agent_args
            .entry(node.into())
            .or_default()
            .extend(args.into_iter().map(Into::into));
        self
    }

    pub fn start_agents(mut self, yes: bool) -> Self {
        self.start_agents = yes;
        self
    }

    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    pub fn verbose(mut self, yes: bool) -> Self {
        self.verbose = yes;
        self
    }

    /// See [`OverlayConfig::ipv6_only`] (the field).
    pub fn ipv6_only(mut self, yes: bool) -> Self {
        self.ipv6_only = yes;
        self
    }

    /// See [`OverlayConfig::bootstrap`] (the field).
    pub fn bootstrap(mut self, yes: bool) -> Self {
        self.bootstrap = yes;
        self
    }

    /// The controller's `--node-cert-ttl`, e.g. `"2h"` (used with bootstrap).
    pub fn node_cert_ttl(mut self, ttl: &str) -> Self {
        self.node_cert_ttl = Some(ttl.into());
        self
    }
}

/// One row of `twillctl leases -o json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LeaseRow {
    pub node_name: String,
    /// The subnet as a network (`10.244.7.0/24`).
    pub subnet: String,
    pub public_ip: String,
    pub vtep_mac: String,
    #[serde(default)]
    pub backend_type: String,
    #[serde(default)]
    pub vni: u32,
    /// Dual-stack networks only (absent from twillctl's JSON otherwise).
    #[serde(default)]
    pub ipv6_subnet: String,
    #[serde(default)]
    pub public_ipv6: String,
    #[serde(default)]
    pub vtep_mac_v6: String,
}

#[derive(Debug, serde::Deserialize)]
struct LeasesDoc {
    leases: Vec<LeaseRow>,
}

/// A running overlay; dropping it (its [`Lab`]) tears everything down.
pub struct Overlay {
    lab: Lab,
    bins: Bins,
    certs: PathBuf,
    nodes: Vec<String>,
    agent_args: BTreeMap<String, Vec<String>>,
    bootstrap: bool,
    /// What the agents get as `--controller`: this overlay's controller, or the
    /// replicas of an HA overlay ([`crate::ha::HaOverlay`]).
    controller_urls: Vec<String>,
}

impl Overlay {
    /// Builds the lab (a `controller` host plus one host per node), makes the
    /// certificates with `twillctl certs`, starts the controller and waits until it is
    /// ready, and starts the agents (unless told not to). Does not wait for the agents.
    pub fn start(cfg: OverlayConfig) -> Result<Overlay, LabError> {
        if cfg.nodes.iter().any(|n| n == CONTROLLER_HOST) {
            return Err(anyhow::anyhow!("a node may not be named {CONTROLLER_HOST}").into());
        }
        let mut hosts = vec![CONTROLLER_HOST.to_string()];
        hosts.extend(cfg.nodes.iter().cloned());
        let lab = Lab::new(
            LabConfig::new(hosts)
                .mtu(cfg.mtu)
                .verbose(cfg.verbose)
                .ipv6_only(cfg.ipv6_only),
        )?;
        let bins = Bins::locate()?;
        let url = format!(
            "https://{}",
            SocketAddr::new(lab.host(CONTROLLER_HOST).addr(), GRPC_PORT)
        );
        let ov = Overlay::on_lab(lab, bins, &cfg, vec![url]);
        match ov.bring_up(&cfg) {
            Ok(()) => Ok(ov),
            Err(e) => {
                eprintln!("twill lab: starting the overlay failed: {e:#}");
                ov.lab.dump();
                Err(LabError::Failed(e))
            }
        }
    }

    /// An overlay of `cfg.nodes` on `lab`, its agents pointed at `controller_urls`;
    /// starts nothing (the caller makes the certificates and starts the controllers).
    pub(crate) fn on_lab(
        lab: Lab,
        bins: Bins,
        cfg: &OverlayConfig,
        controller_urls: Vec<String>,
    ) -> Overlay {
        Overlay {
            certs: lab.dir().join("certs"),
            lab,
            bins,
            nodes: cfg.nodes.clone(),
            agent_args: cfg.agent_args.clone(),
            bootstrap: cfg.bootstrap,
            controller_urls,
        }
    }

    fn bring_up(&self, cfg: &OverlayConfig) -> Result<()> {
        self.make_certs(&[self.lab.host(CONTROLLER_HOST).addr()], false)?;
        let ctl = self.lab.host(CONTROLLER_HOST);
        let net_conf = ctl.dir.join("net-conf.json");
        std::fs::write(&net_conf, &cfg.net_conf)
            .with_context(|| format!("cannot write {}", net_conf.display()))?;
        for (name, json) in &cfg.networks {
            self.write_network(name, json)?;
        }
        std::fs::create_dir_all(self.networks_dir())?;
        let c = |f: &str| self.certs.join(f).display().to_string();
        let mut args = vec![
            "--listen".to_string(),
            SocketAddr::new(ctl.addr(), GRPC_PORT).to_string(),
            "--data-dir".into(),
            ctl.dir.join("data").display().to_string(),
            "--net-conf".into(),
            net_conf.display().to_string(),
            "--networks-dir".into(),
            self.networks_dir().display().to_string(),
            "--tls-cert".into(),
            c("controller.crt"),
            "--tls-key".into(),
            c("controller.key"),
            "--tls-client-ca".into(),
            c("ca.crt"),
            "--metrics-addr".into(),
            SocketAddr::new(ctl.addr(), CONTROLLER_METRICS_PORT).to_string(),
        ];
        if cfg.bootstrap {
            args.extend([
                "--signing-cert".into(),
                c("ca.crt"),
                "--signing-key".into(),
                c("ca.key"),
            ]);
            if let Some(ttl) = &cfg.node_cert_ttl {
                args.extend(["--node-cert-ttl".into(), ttl.clone()]);
            }
        }
        args.extend(cfg.controller_args.iter().cloned());
        self.lab.spawn(
            CONTROLLER_HOST,
            CONTROLLER_PROC,
            &self.bins.controller(),
            args,
        )?;
        self.wait_controller_ready(Duration::from_secs(30))?;
        if cfg.bootstrap {
            let token = self.create_bootstrap_token("1h")?;
            for n in &self.nodes {
                self.write_bootstrap_token(n, &token)?;
            }
        }
        if cfg.start_agents {
            for n in &self.nodes {
                self.start_agent(n)?;
            }
        }
        Ok(())
    }

    /// The controller's `--networks-dir` (the lab's own, never /etc/twill/networks).
    pub fn networks_dir(&self) -> PathBuf {
        self.lab.host(CONTROLLER_HOST).dir.join("networks")
    }

    /// Writes network `name`'s file as a ConfigMap update does (aside, then renamed
    /// in): the controller never reads it half-written.
    pub fn write_network(&self, name: &str, json: &str) -> Result<()> {
        let dir = self.networks_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{name}.json.tmp"));
        std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(format!("{name}.json")))?;
        Ok(())
    }

    /// Removes network `name`'s file.
    pub fn remove_network(&self, name: &str) -> Result<()> {
        let file = self.networks_dir().join(format!("{name}.json"));
        std::fs::remove_file(&file).with_context(|| format!("cannot remove {}", file.display()))
    }

    fn twillctl_certs(&self, args: &[&str]) -> Result<()> {
        let mut all = vec![self.bins.twillctl().display().to_string(), "certs".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.push("--dir".into());
        all.push(self.certs.display().to_string());
        cmd::run(&all).context("making certificates with twillctl")?;
        Ok(())
    }

    /// The CA, one controller certificate naming every address in `controller_ips`
    /// (with `replica`, for replicas on etcd: `--replica`, clientAuth too), node
    /// certificates (unless bootstrapping) and the admin certificate.
    pub(crate) fn make_certs(&self, controller_ips: &[IpAddr], replica: bool) -> Result<()> {
        self.twillctl_certs(&["init"])?;
        let mut issue = vec!["issue".to_string(), "controller".into()];
        if replica {
            issue.push("--replica".into());
        }
        for ip in controller_ips {
            issue.extend(["--ip".into(), ip.to_string()]);
        }
        issue.extend(["--dns".into(), "localhost".into()]);
        self.twillctl_certs(&issue.iter().map(String::as_str).collect::<Vec<_>>())?;
        if !self.bootstrap {
            for n in &self.nodes {
                self.issue_node_cert(n)?;
            }
        }
        self.twillctl_certs(&["issue", "admin", ADMIN_USER])?;
        for f in ["ca.crt", "ca.key", "controller.crt", "controller.key"] {
            if !self.certs.join(f).is_file() {
                bail!(
                    "twillctl certs did not write {}",
                    self.certs.join(f).display()
                );
            }
        }
        Ok(())
    }

    /// Issues a node certificate for `node` (`node-<node>.crt` and `.key` in
    /// [`Overlay::certs_dir`]) signed by the overlay's CA, as `twillctl certs issue
    /// node` does for the nodes the overlay starts with.
    pub fn issue_node_cert(&self, node: &str) -> Result<()> {
        self.twillctl_certs(&["issue", "node", node])
    }

    /// A new bootstrap token from `twillctl token create --ttl <ttl>` (admin
    /// certificate), which prints the token alone.
    pub fn create_bootstrap_token(&self, ttl: &str) -> Result<String> {
        let out = self
            .twillctl(&["token", "create", "--ttl", ttl])
            .context("creating a bootstrap token with twillctl")?;
        let token = out.trim();
        ensure!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "`twillctl token create` printed {out:?}, not a token alone"
        );
        Ok(token.to_string())
    }

    /// Writes `token` to a node's [`Overlay::bootstrap_token_file`] (mode 0600),
    /// replacing what was there atomically (as a Kubernetes secret volume does), so a
    /// running agent never reads half a file.
    pub fn write_bootstrap_token(&self, node: &str, token: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.bootstrap_token_file(node);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        writeln!(f, "{token}").with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Whether the overlay runs with bootstrap tokens instead of issued node
    /// certificates ([`OverlayConfig::bootstrap`]).
    pub fn bootstraps(&self) -> bool {
        self.bootstrap
    }

    /// A node's bootstrap token file (`<node host dir>/bootstrap-token`).
    pub fn bootstrap_token_file(&self, node: &str) -> PathBuf {
        self.node_host(node).dir.join("bootstrap-token")
    }

    /// The directory a bootstrapping agent writes its key and certificate to
    /// (`<node host dir>/pki`; it does not exist before the agent's first start).
    pub fn node_pki_dir(&self, node: &str) -> PathBuf {
        self.node_host(node).dir.join("pki")
    }

    /// A node's `--tls-cert`: `node-<node>.crt` in [`Overlay::certs_dir`], or with
    /// bootstrap `<node host dir>/pki/node.crt`.
    pub fn node_cert_file(&self, node: &str) -> PathBuf {
        if self.bootstrap {
            self.node_pki_dir(node).join("node.crt")
        } else {
            self.certs.join(format!("node-{node}.crt"))
        }
    }

    /// A node's `--tls-key` (see [`Overlay::node_cert_file`]).
    pub fn node_key_file(&self, node: &str) -> PathBuf {
        if self.bootstrap {
            self.node_pki_dir(node).join("node.key")
        } else {
            self.certs.join(format!("node-{node}.key"))
        }
    }

    /// Runs `scenario` and turns an error into a panic while the overlay is still
    /// alive, so that the lab prints every host's kernel state and every log before it
    /// cleans up (a test returning the error would drop the overlay first).
    pub fn run_scenario(&self, scenario: impl FnOnce(&Overlay) -> Result<()>) {
        if let Err(e) = scenario(self) {
            panic!("{e:#}");
        }
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    /// The node names, in order.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The host a node runs on (same name).
    pub fn node_host(&self, node: &str) -> &Host {
        self.lab.host(node)
    }

    pub fn controller_host(&self) -> &Host {
        self.lab.host(CONTROLLER_HOST)
    }

    /// `https://<controller ip>:8474`.
    pub fn controller_url(&self) -> String {
        format!(
            "https://{}",
            SocketAddr::new(self.controller_host().addr(), GRPC_PORT)
        )
    }

    pub fn controller_metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(self.controller_host().addr(), CONTROLLER_METRICS_PORT)
    }

    pub fn agent_metrics_addr(&self, node: &str) -> SocketAddr {
        SocketAddr::new(self.node_host(node).addr(), AGENT_METRICS_PORT)
    }

    /// The directory with `ca.crt`, `controller.crt`, `node-<n>.crt`, `admin-<u>.crt`
    /// and their keys.
    pub fn certs_dir(&self) -> &Path {
        &self.certs
    }

    /// The lab process name of a node's agent.
    pub fn agent_proc(node: &str) -> String {
        format!("agent-{node}")
    }

    /// A node's subnet.env path (`<lab dir>/<node>/subnet.env`).
    pub fn subnet_file(&self, node: &str) -> PathBuf {
        self.node_host(node).dir.join("subnet.env")
    }

    /// The socket a node's agent takes twill-cni's reports on (`<lab dir>/<node>/run/agent.sock`).
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.node_host(node).dir.join("run").join("agent.sock")
    }

    /// A node's subnet.env, parsed.
    pub fn subnet_env(&self, node: &str) -> Result<SubnetEnv> {
        SubnetEnv::read(&self.subnet_file(node))
    }

    /// The arguments a node's agent is started with.
    pub fn agent_command_args(&self, node: &str) -> Vec<String> {
        let mut args = vec![
            "--controller".to_string(),
            self.controller_urls.join(","),
            "--node-name".into(),
            node.into(),
            "--tls-cert".into(),
            self.node_cert_file(node).display().to_string(),
            "--tls-key".into(),
            self.node_key_file(node).display().to_string(),
            "--tls-ca".into(),
            self.certs.join("ca.crt").display().to_string(),
            "--subnet-file".into(),
            self.subnet_file(node).display().to_string(),
            // Beside subnet.env, never the host's /run/flannel/networks.
            "--subnet-dir".into(),
            self.subnet_file(node)
                .with_file_name("networks")
                .display()
                .to_string(),
            "--metrics-addr".into(),
            self.agent_metrics_addr(node).to_string(),
            // The lab's own, never the host's /run/twill or /var/lib/twill.
            "--cni-socket".into(),
            self.cni_socket(node).display().to_string(),
            "--attachments-file".into(),
            self.node_host(node)
                .dir
                .join("attachments.json")
                .display()
                .to_string(),
        ];
        if self.bootstrap {
            args.extend([
                "--bootstrap-token-file".into(),
                self.bootstrap_token_file(node).display().to_string(),
            ]);
        }
        args.extend(self.agent_args.get(node).into_iter().flatten().cloned());
        args
    }

    /// Starts a node's agent (first time).
    pub fn start_agent(&self, node: &str) -> Result<()> {
        self.lab.spawn(
            node,
            &Self::agent_proc(node),
            &self.bins.agent(),
            self.agent_command_args(node),
        )
    }

    /// Starts a node's agent (first time) with extra flags after the configured ones.
    pub fn start_agent_with<S: Into<String>>(
        &self,
        node: &str,
        extra: impl IntoIterator<Item = S>,
    ) -> Result<()> {
        let mut args = self.agent_command_args(node);
        args.extend(extra.into_iter().map(Into::into));
        self.lab
            .spawn(node, &Self::agent_proc(node), &self.bins.agent(), args)
    }

    /// SIGTERM a node's agent and wait for it to exit.
    pub fn stop_agent(&self, node: &str) -> Result<ExitStatus> {
        self.lab.stop(&Self::agent_proc(node))
    }

    /// SIGKILL a node's agent.
    pub fn kill_agent(&self, node: &str) -> Result<ExitStatus> {
        self.lab.kill(&Self::agent_proc(node))
    }

    /// Starts a node's agent again with the same arguments.
    pub fn restart_agent(&self, node: &str) -> Result<()> {
        self.lab.restart(&Self::agent_proc(node))
    }

    pub fn agent_running(&self, node: &str) -> bool {
        self.lab.is_running(&Self::agent_proc(node))
    }

    pub fn stop_controller(&self) -> Result<ExitStatus> {
        self.lab.stop(CONTROLLER_PROC)
    }

    pub fn kill_controller(&self) -> Result<ExitStatus> {
        self.lab.kill(CONTROLLER_PROC)
    }

    /// Starts the controller again (same arguments, same data dir) and waits until ready.
    pub fn restart_controller(&self) -> Result<()> {
        self.lab.restart(CONTROLLER_PROC)?;
        self.wait_controller_ready(Duration::from_secs(30))
    }

    pub(crate) fn process_gone(&self, proc_name: &str) -> Option<String> {
        if self.lab.is_running(proc_name) {
            return None;
        }
        let status = self
            .lab
            .exit_status(proc_name)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "not running".into());
        Some(format!(
            "{proc_name} exited ({status}); its log ends:\n{}",
            self.lab.log_tail(proc_name, 20)
        ))
    }

    /// Waits until the controller answers `GET /readyz` with 200.
    pub fn wait_controller_ready(&self, timeout: Duration) -> Result<()> {
        let addr = self.controller_metrics_addr();
        wait_until(
            timeout,
            "the controller to be ready (GET /readyz = 200)",
            || {
                if let Some(why) = self.process_gone(CONTROLLER_PROC) {
                    return Check::Fatal(why);
                }
                match self.lab.http_get(CONTROLLER_HOST, addr, "/readyz") {
                    Ok(r) if r.status == 200 => Check::Ready(()),
                    Ok(r) => Check::NotYet(format!("HTTP {}: {}", r.status, r.body.trim())),
                    Err(e) => Check::NotYet(format!("{e:#}")),
                }
            },
        )
    }

    /// The values of `series` (metric names with their labels, as `/metrics` prints
    /// them) in a node's agent's metrics, in order; `None` for one not there.
    pub fn agent_metric_values(&self, node: &str, series: &[&str]) -> Result<Vec<Option<f64>>> {
        let text = self
            .lab
            .http_get(node, self.agent_metrics_addr(node), "/metrics")?
            .body;
        Ok(series
            .iter()
            .map(|s| crate::replicas::metric_value(&text, s))
            .collect())
    }

    /// Waits until a node's agent answers `GET /healthz` with 200.
    pub fn wait_agent_healthy(&self, node: &str, timeout: Duration) -> Result<()> {
        let addr = self.agent_metrics_addr(node);
        let proc_name = Self::agent_proc(node);
        wait_until(
            timeout,
            &format!("the agent of {node} to be healthy (GET /healthz = 200)"),
            || {
                if let Some(why) = self.process_gone(&proc_name) {
                    return Check::Fatal(why);
                }
                match self.lab.http_get(node, addr, "/healthz") {
                    Ok(r) if r.status == 200 => Check::Ready(()),
                    Ok(r) => Check::NotYet(format!("HTTP {}: {}", r.status, r.body.trim())),
                    Err(e) => Check::NotYet(format!("{e:#}")),
                }
            },
        )
    }

    /// Whether `on` has a Twill route to `subnet` via `flannel.1`.
    pub fn has_route(&self, on: &str, subnet: Ipv4Net) -> Result<bool> {
        Ok(self
            .lab
            .routes(on)?
            .iter()
            .any(|r| r.dst_net() == Some(subnet) && r.dev.as_deref() == Some(FLANNEL_DEV)))
    }

    /// One look at convergence: every given node has a subnet.env and a Twill route to
    /// every other given node's subnet. `Err` describes what is missing.
    pub fn converged_among(&self, nodes: &[&str]) -> Check<BTreeMap<String, SubnetEnv>> {
        let mut envs = BTreeMap::new();
        let mut missing = Vec::new();
        for n in nodes {
            if let Some(why) = self.process_gone(&Self::agent_proc(n)) {
                return Check::Fatal(why);
            }
            match self.subnet_env(n) {
                Ok(e) => {
                    envs.insert(n.to_string(), e);
                }
                Err(e) => missing.push(format!("{n}: {e:#}")),
            }
        }
        if !missing.is_empty() {
            return Check::NotYet(missing.join("; "));
        }
        for n in nodes {
            let routes = match self.lab.routes(n) {
                Ok(r) => r,
                Err(e) => return Check::NotYet(format!("{n}: {e:#}")),
            };
            for peer in nodes.iter().filter(|p| *p != n) {
                let want = envs[*peer].subnet_net();
                // Over VXLAN, or straight to the peer's underlay address (host-gw,
                // DirectRouting).
                let via_peer = self.public_ip(peer).to_string();
                if !routes.iter().any(|r| {
                    r.dst_net() == Some(want)
                        && (r.dev.as_deref() == Some(FLANNEL_DEV)
                            || (r.dev.as_deref() == Some(HOST_IFACE)
                                && r.gateway.as_deref() == Some(via_peer.as_str())))
                }) {
                    missing.push(format!("{n} has no route to {peer}'s {want}"));
                }
            }
        }
        if missing.is_empty() {
            Check::Ready(envs)
        } else {
            Check::NotYet(missing.join("; "))
        }
    }

    /// Waits until every node has a subnet.env and a route to every other node's
    /// subnet; returns each node's subnet.env.
    pub fn wait_converged(&self, timeout: Duration) -> Result<BTreeMap<String, SubnetEnv>> {
        let nodes: Vec<&str> = self.nodes.iter().map(String::as_str).collect();
        self.wait_converged_among(&nodes, timeout)
    }

    /// [`Overlay::wait_converged`] for a subset of the nodes.
    pub fn wait_converged_among(
        &self,
        nodes: &[&str],
        timeout: Duration,
    ) -> Result<BTreeMap<String, SubnetEnv>> {
        wait_until(
            timeout,
            &format!("routes between every pair of {nodes:?}"),
            || self.converged_among(nodes),
        )
    }

    /// Runs `twillctl` with the admin certificate against the controller, inside the
    /// controller's namespace; its stdout.
    pub fn twillctl<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let c = |f: String| self.certs.join(f).display().to_string();
        let mut all = vec![
            self.bins.twillctl().display().to_string(),
            "--controller".into(),
            self.controller_url(),
            "--tls-cert".into(),
            c(format!("admin-{ADMIN_USER}.crt")),
            "--tls-key".into(),
            c(format!("admin-{ADMIN_USER}.key")),
            "--tls-ca".into(),
            c("ca.crt".into()),
        ];
        all.extend(args.iter().map(|a| a.as_ref().to_string()));
        self.lab.exec(CONTROLLER_HOST, &all)
    }

    /// One ping from `host` with source `src` to `dst` (either family), retried until
    /// a reply comes (each echo waits up to 1 s), up to `timeout`.
    pub fn ping_from(
        &self,
        host: &str,
        src: std::net::IpAddr,
        dst: std::net::IpAddr,
        timeout: Duration,
    ) -> Result<()> {
        let (s, d) = (src.to_string(), dst.to_string());
        wait_until(timeout, &format!("{host}: ping -I {s} {d}"), || {
            let out = self.lab.try_exec(
                host,
                &["ping", "-n", "-q", "-c", "1", "-W", "1", "-I", &s, &d],
            )?;
            if out.success() {
                Ok(())
            } else {
                bail!("{}", out.stdout.trim().lines().last().unwrap_or("").trim())
            }
        })
    }

    /// `twillctl leases` (a table).
    pub fn leases_table(&self) -> Result<String> {
        self.twillctl(&["leases"])
    }

    /// The lease table from `twillctl leases -o json`.
    pub fn leases(&self) -> Result<Vec<LeaseRow>> {
        let out = self.twillctl(&["leases", "-o", "json"])?;
        let doc: LeasesDoc = serde_json::from_str(&out)
            .with_context(|| format!("cannot parse `twillctl leases -o json`: {out}"))?;
        Ok(doc.leases)
    }

    /// A node's VTEP MAC (the MAC of its `flannel.1`).
    pub fn vtep_mac(&self, node: &str) -> Result<String> {
        self.lab.mac(node, FLANNEL_DEV)
    }

    /// A node's underlay address.
    pub fn public_ip(&self, node: &str) -> Ipv4Addr {
        self.node_host(node).ip
    }

    /// `on` has, for a peer with subnet `env`, VTEP MAC `mac` and underlay address
    /// `public`: neighbour `S.0 -> mac` (permanent), FDB `mac -> public`, and route
    /// `S via S.0 dev flannel.1 onlink proto 74`.
    pub fn vxlan_entries(
        &self,
        on: &str,
        env: &SubnetEnv,
        mac: &str,
        public: Ipv4Addr,
    ) -> Result<()> {
        let lab = self.lab();
        let gw = env.flannel_addr().to_string();
        let neighbours = lab.neighbours(on)?;
        let n = neighbours
            .iter()
            .find(|n| n.dst == gw)
            .with_context(|| format!("{on}: no neighbour {gw} on {FLANNEL_DEV}: {neighbours:?}"))?;
        ensure!(
            n.lladdr.as_deref().map(str::to_ascii_lowercase).as_deref() == Some(mac)
                && n.is_permanent(),
            "{on}: neighbour {n:?}, want {gw} lladdr {mac} PERMANENT"
        );
        let fdb = lab.fdb(on)?;
        let public_s = public.to_string();
        ensure!(
            fdb.iter()
                .any(|f| f.mac.eq_ignore_ascii_case(mac) && f.dst.as_deref() == Some(&*public_s)),
            "{on}: no FDB entry {mac} dst {public} on {FLANNEL_DEV}: {fdb:?}"
        );
        let subnet = env.subnet_net();
        let routes = lab.routes(on)?;
        let r = routes
            .iter()
            .find(|r| r.dst_net() == Some(subnet))
            .with_context(|| format!("{on}: no proto 74 route to {subnet}: {routes:?}"))?;
        ensure!(
            r.gateway.as_deref() == Some(&*gw)
                && r.dev.as_deref() == Some(FLANNEL_DEV)
                && r.is_onlink(),
            "{on}: route {r:?}, want {subnet} via {gw} dev {FLANNEL_DEV} onlink proto 74"
        );
        Ok(())
    }

    /// Waits until `on` has [`Overlay::vxlan_entries`] for `peer`, whose subnet.env is
    /// `env`; returns `peer`'s VTEP MAC.
    pub fn wait_vxlan_entries(
        &self,
        on: &str,
        peer: &str,
        env: &SubnetEnv,
        timeout: Duration,
    ) -> Result<String> {
        let mac = self.vtep_mac(peer)?;
        let public = self.public_ip(peer);
        wait_until(
            timeout,
            &format!("{on} to have {peer}'s route, neighbour and FDB entry"),
            || self.vxlan_entries(on, env, &mac, public),
        )?;
        Ok(mac)
    }

    /// Deletes by hand `on`'s route to the peer whose subnet.env is `env` (`ip route
    /// del S via S.0 dev flannel.1 proto 74`); fails unless that very route was there,
    /// so success proves something was removed.
    pub fn delete_peer_route(&self, on: &str, env: &SubnetEnv) -> Result<()> {
        let (subnet, gw) = (env.subnet_net().to_string(), env.flannel_addr().to_string());
        let proto = TWILL_ROUTE_PROTO.to_string();
        cmd::run(&[
            "ip",
            "-n",
            &self.node_host(on).netns,
            "route",
            "del",
            &subnet,
            "via",
            &gw,
            "dev",
            FLANNEL_DEV,
            "proto",
            &proto,
        ])
        .with_context(|| format!("deleting {on}'s route to {subnet} via {gw} by hand"))?;
        Ok(())
    }

    /// `on` has no route to `subnet`, no neighbour for its network address and no FDB
    /// entry for `mac`.
    pub fn peer_gone(&self, on: &str, subnet: Ipv4Net, mac: &str) -> Result<()> {
        let lab = self.lab();
        let mut left = Vec::new();
        if let Some(r) = lab.routes(on)?.iter().find(|r| r.dst_net() == Some(subnet)) {
            left.push(format!("route {r:?}"));
        }
        let gw = subnet.network().to_string();
        if let Some(n) = lab.neighbours(on)?.iter().find(|n| n.dst == gw) {
            left.push(format!("neighbour {n:?}"));
        }
        if let Some(f) = lab
            .fdb(on)?
            .iter()
            .find(|f| f.mac.eq_ignore_ascii_case(mac))
        {
            left.push(format!("FDB {f:?}"));
        }
        if left.is_empty() {
            Ok(())
        } else {
            bail!("{on} still has {}", left.join(", "))
        }
    }
}
